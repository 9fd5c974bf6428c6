"""Large C-STORE data sets written to disk while their PDUs are still arriving.

Without this, a 7 MB radiograph is received into memory (pynetdicom), then hashed,
written and fsynced by the C-STORE handler: the disk starts only when the network
is done, and the fsync of 7 MB is most of the handler's time (bench/README.md,
``dicom.py``). With it, once a data set passes :data:`THRESHOLD` in pynetdicom's
receive buffer, each new P-DATA's bytes are appended to a hidden ``.tmp`` file in
the journal's spool folder, hashed, and handed to the kernel's writeback
(``sync_file_range(SYNC_FILE_RANGE_WRITE)``: start writing, do not wait), all from
the association's DUL thread as the data arrives. The handler then finds the file
written and mostly on disk; :meth:`Spool.commit` fsyncs what is left and renames it
into the blob store, and the journal commits as for any staged blob.

The file holds exactly the bytes the handler gets from
:func:`dicom.net.received_file` (the same prefix, then the same data set buffer),
and the handler checks the prefix and length before using it; the bytes also stay
in memory, as before, for the routing headers and the envelope. A spool that is
never committed (association aborted mid data set, data set refused) is closed and
unlinked when the message is dropped; one left by a crash is a ``.tmp`` file, which
the journal removes at start. A write error (disk full) drops the spool and the
handler writes the blob itself, which then fails with 0xA700 as before.

Installed by patching two methods of pynetdicom 3.0.4's ``DIMSEMessage`` (pinned),
active only for associations of an AE given a folder by :func:`enable`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
import os
import uuid
import weakref
from pathlib import Path
from typing import Any

from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.events import Event

from dicom.net import received_prefix

log = logging.getLogger(__name__)

THRESHOLD = 1024 * 1024
"""Default: spool a data set once this much of it has arrived; smaller ones come in one
or two PDUs (the default maximum PDU is 1 MiB), where there is nothing to overlap."""

_FOLDER_ATTR = "_medgw_spool_dir"
_MESSAGE_ATTR = "_medgw_spool"
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>


def _load_sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or None: then the kernel starts writeback
    on its own schedule and the final fsync does the rest."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        func = ctypes.CDLL(name, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_sync_file_range = _load_sync_file_range()


def _discard(fd: int, path: Path) -> None:
    """Finalizer of an uncommitted spool: nothing was acknowledged from it."""
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(OSError):
        path.unlink()


class Spool:
    """One data set being written: its file, how much of the receive buffer it holds,
    and the running sha256 of everything written."""

    def __init__(self, folder: Path, prefix: bytes) -> None:
        self.path = folder / f".{uuid.uuid4().hex}.tmp"
        self.prefix = prefix
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._discard = weakref.finalize(self, _discard, self.fd, self.path)
        self.size = 0  # bytes in the file
        self.fed = 0  # bytes of the receive buffer in the file
        self._hash = hashlib.sha256()
        self._write(memoryview(prefix))

    def _write(self, view: memoryview) -> None:
        start = self.size
        while view:
            n = os.write(self.fd, view)
            self._hash.update(view[:n])
            view = view[n:]
            self.size += n
        if _sync_file_range is not None and self.size > start:
            _sync_file_range(self.fd, start, self.size - start, _SYNC_FILE_RANGE_WRITE)

    def feed(self, buffer: Any) -> None:
        """Append what ``buffer`` (pynetdicom's ``io.BytesIO``) got since the last call."""
        with buffer.getbuffer() as view:
            new = view[self.fed :]
            self.fed += len(new)
            self._write(new)

    def commit(self, dest: Path) -> str:
        """Make the file durable as ``dest`` (same filesystem) and return its sha256;
        the caller fsyncs ``dest``'s folder before committing a reference to it."""
        os.fsync(self.fd)
        os.close(self.fd)
        self._discard.detach()
        os.replace(self.path, dest)
        return self._hash.hexdigest()

    def discard(self) -> None:
        self._discard()


def enable(ae: Any, folder: Path, threshold: int = THRESHOLD) -> None:
    """Spool C-STORE data sets of ``threshold`` bytes or more received by ``ae``'s
    associations into ``folder`` (on the blob store's filesystem)."""
    folder.mkdir(parents=True, exist_ok=True)
    setattr(ae, _FOLDER_ATTR, (folder, threshold))


def spooled(event: Event, data: bytes) -> Spool | None:
    """The spool that holds exactly ``data`` (the handler's :func:`received_file`), if
    this C-STORE was spooled; a spool that does not match is discarded."""
    spool: Spool | None = getattr(event.request, _MESSAGE_ATTR, None)
    if spool is None:
        return None
    if spool.size == len(data) and data.startswith(spool.prefix):
        return spool
    log.error("dicom.spool_mismatch size=%d expected=%d", spool.size, len(data))
    spool.discard()
    return None


def discard(event: Event) -> None:
    """Drop this C-STORE's spool file unless it was committed (then: nothing to do)."""
    spool: Spool | None = getattr(event.request, _MESSAGE_ATTR, None)
    if spool is not None:
        spool.discard()


def abandon(assoc: Any) -> None:
    """The association is gone: drop the spool of a data set it did not finish (its
    message would otherwise wait for the garbage collector)."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    spool = message.__dict__.get(_MESSAGE_ATTR) if message is not None else None
    if spool:
        spool.discard()


def _prefix(message: C_STORE_RQ, assoc: Any) -> bytes:
    command = message.command_set
    context = assoc._accepted_cx[message.context_id]
    return received_prefix(
        command.AffectedSOPClassUID, command.AffectedSOPInstanceUID, context.transfer_syntax[0]
    )


def _spool_step(message: DIMSEMessage, assoc: Any) -> None:
    """After each P-DATA of a message: start or extend its spool."""
    spool = message.__dict__.get(_MESSAGE_ATTR)
    if spool is False:  # failed once for this data set: the handler writes it
        return
    try:
        if spool is None:
            where = getattr(getattr(assoc, "ae", None), _FOLDER_ATTR, None)
            if where is None or not isinstance(message, C_STORE_RQ):
                return
            folder, threshold = where
            if message.data_set is None or message.data_set.tell() < threshold:
                return
            spool = Spool(folder, _prefix(message, assoc))
            setattr(message, _MESSAGE_ATTR, spool)
        spool.feed(message.data_set)
    except Exception as err:  # noqa: BLE001 - never break the DUL thread; handler writes instead
        log.warning("dicom.spool_failed error=%s", err)
        if isinstance(spool, Spool):
            spool.discard()
        setattr(message, _MESSAGE_ATTR, False)


_decode_msg = DIMSEMessage.decode_msg
_message_to_primitive = DIMSEMessage.message_to_primitive


def _decode_msg_spooling(self: DIMSEMessage, primitive: Any, assoc: Any = None) -> bool:
    done: bool = _decode_msg(self, primitive, assoc)
    if assoc is not None:
        _spool_step(self, assoc)
    return done


def _message_to_primitive_spooling(self: DIMSEMessage) -> Any:
    primitive = _message_to_primitive(self)
    spool = self.__dict__.get(_MESSAGE_ATTR)
    if spool:
        setattr(primitive, _MESSAGE_ATTR, spool)
    return primitive


DIMSEMessage.decode_msg = _decode_msg_spooling  # type: ignore[method-assign]
DIMSEMessage.message_to_primitive = _message_to_primitive_spooling  # type: ignore[method-assign]
