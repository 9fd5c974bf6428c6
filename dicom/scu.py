"""DICOM C-STORE SCU: the ``dicom-store`` destination that forwards instances to a PACS.

Each delivery worker gets one :class:`DicomStoreSender`, which owns one association
in one worker thread (STYLE.md rule 4) and reuses it across deliveries. Instances
are sent from the journal's blob file without decoding them (pynetdicom's
``STORE_SEND_CHUNKED_DATASET``: the dataset bytes after the file meta go out as
read, in PDUs no larger than the peer's maximum), so what the PACS receives is
byte for byte what the modality sent.

Presentation contexts (PS3.8 9.3.2.2) are proposed from what has been queued: for
each (SOP class, transfer syntax) pair seen, one context with that syntax alone
plus one each for explicit and implicit VR little endian, so the PACS can accept
or refuse the compressed syntax without refusing the SOP class. A small LRU of the
pairs seen (at most 128 contexts, PS3.8 7.1.1.13: odd ids 1..255) keeps a mixed
series on one association; an instance whose pair was not proposed releases the
association and re-associates with the union.

When the PACS accepted the SOP class only uncompressed, the instance is decoded
and decompressed to explicit VR little endian (``decompress_on_reject``), sent,
and the confirmation says so; the journal keeps the original unchanged.
Decoding uses pydicom with the pylibjpeg plugins (pylibjpeg-libjpeg: JPEG
baseline/extended/lossless and JPEG-LS; pylibjpeg-openjpeg: JPEG 2000; pydicom's
own RLE decoder) rather than GDCM: they are self-contained wheels with no system
library to install or keep in step on an edge box, they are the decoders
pydicom's own test-suite runs against, and the forwarding path needs nothing
else from GDCM. Decompression keeps the SOP Instance UID: it is lossless with
respect to the received pixels (PS3.5 8.2), so the PACS sees the same instance.

C-STORE response statuses (PS3.4 B.2.3, PS3.7 Annex C) are classified by the
table :data:`STATUS_TABLE`: success and warnings confirm the delivery; failures
that depend on the PACS's state (out of resources, not authorised, processing
failure) retry; failures that belong to the instance (SOP class not supported,
data set does not match the SOP class, cannot understand) dead-letter it. The
hex status is in every confirmation and error. A lost, rejected or aborted
association, a timeout or a network error retries on a fresh association.

With ``tls`` the association runs over TLS (PS3.15 B.1): the PACS's certificate
is checked against ``tls.ca_file`` and its name (``tls.server_hostname``, else
the ``connect`` host); ``tls.cert_file``/``key_file`` are medgw's client
certificate. A failed handshake is a connection failure: retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import build_context

from dicom.net import UNCOMPRESSED, check_ae_title, set_nodelay
from gateway.config import DestinationBase, EndpointField
from gateway.envelope import StoredEnvelope
from gateway.errors import PermanentError, TransientError
from gateway.registry import PluginContext, Registry
from gateway.tls import TlsSettings

log = logging.getLogger(__name__)

# Send files as stored, without decoding them (see the module docstring). This is a
# process-wide pynetdicom switch: a send_c_store(path) anywhere then needs an
# accepted context with exactly the file's transfer syntax; Dataset sends are
# unaffected.
_config.STORE_SEND_CHUNKED_DATASET = True

MAX_CONTEXTS = 128  # PS3.8 7.1.1.13: presentation context ids are odd numbers 1..255

Pair = tuple[str, str]  # (SOP class UID, transfer syntax UID)
GatewayErrorType = TransientError | PermanentError


AeTitle = Annotated[str, AfterValidator(check_ae_title)]


class DicomStoreConfig(DestinationBase):
    """``{id: pacs, type: dicom-store, ae_title: PACS, connect: 10.0.0.5:104}``."""

    type: Literal["dicom-store"]
    ae_title: AeTitle  # the PACS's (called) AE title
    calling_ae: AeTitle = "MEDGW"
    connect: EndpointField
    connect_timeout_s: float = Field(default=10.0, gt=0)
    acse_timeout_s: float = Field(default=30.0, gt=0)  # association request / release
    dimse_timeout_s: float = Field(default=120.0, gt=0)  # C-STORE response after the data
    network_timeout_s: float = Field(default=300.0, gt=0)  # pynetdicom's idle limit
    max_pdu: int = Field(default=131072, ge=0)  # what we receive; 0 = unlimited
    decompress_on_reject: bool = True
    idle_release_s: float | None = Field(default=20.0, gt=0)  # null: keep until closed
    tls: TlsSettings | None = None  # set: associate over TLS (docs/security.md)


# -- C-STORE response statuses ----------------------------------------------------------


class Outcome(Enum):
    SUCCESS = "success"
    WARNING = "warning"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


# (first, last, outcome, meaning); the first row that contains the code wins.
# PS3.4 Table B.2-1 (Storage Service Class) and PS3.7 Annex C (general statuses; its
# class convention: warning 0001, Bxxx, 0107, 0116; failure Axxx, Cxxx, 01xx, 02xx).
STATUS_TABLE: tuple[tuple[int, int, Outcome, str], ...] = (
    (0x0000, 0x0000, Outcome.SUCCESS, "success"),
    (0xB000, 0xB000, Outcome.WARNING, "coercion of data elements"),
    (0xB006, 0xB006, Outcome.WARNING, "elements discarded"),
    (0xB007, 0xB007, Outcome.WARNING, "data set does not match SOP class"),
    (0xB000, 0xBFFF, Outcome.WARNING, "warning"),
    (0x0001, 0x0001, Outcome.WARNING, "warning"),
    (0x0107, 0x0107, Outcome.WARNING, "attribute list error"),
    (0x0116, 0x0116, Outcome.WARNING, "attribute value out of range"),
    (0xA700, 0xA7FF, Outcome.TRANSIENT, "refused: out of resources"),
    (0xA900, 0xA9FF, Outcome.PERMANENT, "error: data set does not match SOP class"),
    (0xC000, 0xCFFF, Outcome.PERMANENT, "error: cannot understand"),
    (0x0122, 0x0122, Outcome.PERMANENT, "refused: SOP class not supported"),
    (0x0117, 0x0117, Outcome.PERMANENT, "invalid SOP instance"),
    (0x0211, 0x0211, Outcome.PERMANENT, "unrecognized operation"),
    (0x0212, 0x0212, Outcome.PERMANENT, "mistyped argument"),
    # the PACS's configuration or state, not this instance: retried until fixed
    (0x0124, 0x0124, Outcome.TRANSIENT, "refused: not authorized"),
    (0x0110, 0x0110, Outcome.TRANSIENT, "processing failure"),
    (0x0210, 0x0210, Outcome.TRANSIENT, "duplicate invocation"),
    (0xFE00, 0xFE00, Outcome.TRANSIENT, "cancelled"),
)


def classify_status(code: int) -> tuple[Outcome, str]:
    """The outcome of a C-STORE status; an unknown failure code is retried (it
    surfaces as a stuck delivery rather than silently dead-lettering an image)."""
    for first, last, outcome, meaning in STATUS_TABLE:
        if first <= code <= last:
            return outcome, meaning
    return Outcome.TRANSIENT, "unknown status"


# -- the association, confined to one worker thread -------------------------------------


@dataclass(frozen=True, slots=True)
class FileMeta:
    sop_class: UID
    sop_instance: UID
    transfer_syntax: UID


def read_meta(path: Path) -> FileMeta:
    """The Part-10 file meta of a stored instance (PS3.10 7.1), nothing else read."""
    try:
        meta = read_file_meta_info(path)
        return FileMeta(
            UID(meta.MediaStorageSOPClassUID),
            UID(meta.MediaStorageSOPInstanceUID),
            UID(meta.TransferSyntaxUID),
        )
    except (InvalidDicomError, AttributeError, KeyError, ValueError) as err:
        raise PermanentError(f"not a DICOM Part-10 file with file meta: {err}") from err


class StoreLink:
    """One association to the PACS and the contexts it was asked for.

    Used only from its sender's worker thread; every method blocks.
    """

    def __init__(self, cfg: DicomStoreConfig, tls_context: ssl.SSLContext | None = None) -> None:
        self.cfg = cfg
        self.peer = f"{cfg.ae_title}@{cfg.connect}"
        self.tls_args: tuple[ssl.SSLContext, str] | None = None
        if tls_context is not None:
            assert cfg.tls is not None
            self.tls_args = (tls_context, cfg.tls.hostname_for(cfg.connect.host))
        self.ae = AE(ae_title=cfg.calling_ae)
        self.ae.connection_timeout = cfg.connect_timeout_s
        self.ae.acse_timeout = cfg.acse_timeout_s
        self.ae.dimse_timeout = cfg.dimse_timeout_s
        self.ae.network_timeout = cfg.network_timeout_s
        self.assoc: Any = None  # pynetdicom Association while one is open
        self.seen: OrderedDict[Pair, None] = OrderedDict()  # LRU, most recent last
        self.proposed: set[Pair] = set()  # contexts of the current association
        self.associations = 0  # associations established (tests, logs)
        self._msg_id = 0
        self._files = 0
        self._bytes = 0
        self._since = 0.0
        self._connected = False

    # -- contexts -----------------------------------------------------------------------

    @staticmethod
    def contexts_for(pairs: list[Pair]) -> list[Pair]:
        """Each pair's own context, then explicit and implicit VR LE for its SOP class."""
        out: dict[Pair, None] = {}
        for sop, ts in pairs:
            out[(sop, ts)] = None
            for plain in UNCOMPRESSED:
                out[(sop, str(plain))] = None
        return list(out)

    def remember(self, pair: Pair) -> None:
        """Note a pair as recently seen; forget the oldest while over MAX_CONTEXTS."""
        self.seen[pair] = None
        self.seen.move_to_end(pair)
        while len(self.seen) > 1 and len(self.contexts_for(list(self.seen))) > MAX_CONTEXTS:
            self.seen.popitem(last=False)

    # -- association --------------------------------------------------------------------

    def ensure(self, pair: Pair) -> Any:
        if self.assoc is not None and _association_dead(self.assoc):
            log.info("dicom.association_lost destination=%s peer=%s", self.cfg.id, self.peer)
            self.drop()
        if self.assoc is not None and pair not in self.proposed:
            log.info(
                "dicom.reassociate destination=%s reason=new-context sop=%s ts=%s",
                self.cfg.id,
                *pair,
            )
            self.release("new presentation context")
        if self.assoc is None:
            self.associate(pair)
        return self.assoc

    def associate(self, pair: Pair) -> None:
        # most recent pairs first, so they keep the lowest context ids
        wanted = self.contexts_for(list(reversed(self.seen)))[:MAX_CONTEXTS]
        self._connected = False

        def opened(event: evt.Event) -> None:  # EVT_CONN_OPEN: after connect(), before the RQ
            self._connected = True
            transport = event.assoc.dul.socket
            set_nodelay(transport.socket if transport is not None else None)

        assoc = self.ae.associate(
            self.cfg.connect.host,
            self.cfg.connect.port,
            contexts=[build_context(sop, ts) for sop, ts in wanted],
            ae_title=self.cfg.ae_title,
            max_pdu=self.cfg.max_pdu,
            evt_handlers=[(evt.EVT_CONN_OPEN, opened)],
            tls_args=self.tls_args,
        )
        if assoc.is_established:
            self.assoc = assoc
            self.proposed = set(wanted)
            self.associations += 1
            self._files = self._bytes = 0
            self._since = time.monotonic()
            log.info(
                "dicom.associated destination=%s peer=%s contexts=%d accepted=%d peer_max_pdu=%s",
                self.cfg.id,
                self.peer,
                len(wanted),
                len(assoc.accepted_contexts),
                assoc.acceptor.maximum_length,
            )
            return
        raise self._association_failure(assoc, pair)

    def _association_failure(self, assoc: Any, pair: Pair) -> GatewayErrorType:
        where = f"{self.peer}"
        if assoc.is_rejected:
            rsp = assoc.acceptor.primitive
            return TransientError(
                f"association rejected by {where}: {rsp.result_str}, {rsp.source_str}: "
                f"{rsp.reason_str} (result 0x{rsp.result:02X}, source 0x{rsp.result_source:02X}, "
                f"reason 0x{rsp.diagnostic:02X})"
            )
        rsp = assoc.acceptor.primitive
        if rsp is not None and getattr(rsp, "result", None) == 0 and assoc.rejected_contexts:
            # A-ASSOCIATE-AC with every proposed context refused; pynetdicom aborts it
            return self._not_accepted(pair, assoc.rejected_contexts)
        if not self._connected:
            tls = ", or the TLS handshake failed" if self.tls_args is not None else ""
            return TransientError(
                f"cannot connect to {where} (refused or no answer within "
                f"{self.cfg.connect_timeout_s:g}s{tls})"
            )
        if assoc.is_aborted:
            # TLS 1.3: a server that refuses our client certificate says so after the
            # handshake, so it shows as an abort
            tls = " (TLS: our client certificate refused?)" if self.tls_args is not None else ""
            return TransientError(f"association aborted by {where} during negotiation{tls}")
        return TransientError(
            f"no association response from {where} within {self.cfg.acse_timeout_s:g}s"
        )

    def _not_accepted(self, pair: Pair, rejected: list[Any]) -> GatewayErrorType:
        sop, ts = UID(pair[0]), UID(pair[1])
        reasons = sorted({cx.status for cx in rejected if cx.abstract_syntax == sop}) or [
            "not negotiated"
        ]
        return PermanentError(
            f"SOP class not supported by {self.peer}: no presentation context accepted for "
            f"{sop.name} ({sop}) with {ts} ({', '.join(reasons)}); no C-STORE status"
        )

    def release(self, why: str) -> None:
        """Release the association (A-RELEASE); abort it if that fails."""
        assoc, self.assoc = self.assoc, None
        if assoc is None:
            return
        try:
            if assoc.is_established:
                assoc.release()
        except Exception:  # a failed release must not fail the caller
            log.warning("dicom.release_failed destination=%s", self.cfg.id, exc_info=True)
            with contextlib.suppress(Exception):
                assoc.abort()
        log.info(
            "dicom.released destination=%s peer=%s why=%r files=%d bytes=%d duration_s=%.1f",
            self.cfg.id,
            self.peer,
            why,
            self._files,
            self._bytes,
            time.monotonic() - self._since,
        )

    def drop(self) -> None:
        """Forget the association after a failure (abort it if still up)."""
        assoc, self.assoc = self.assoc, None
        if assoc is not None and assoc.is_established:
            with contextlib.suppress(Exception):
                assoc.abort()

    # -- one instance -------------------------------------------------------------------

    def store(self, path: Path | None, body: bytes) -> str:
        if path is None:  # an inline body (not written as a blob): send it from a temp file
            with tempfile.TemporaryDirectory(prefix="medgw-scu-") as tmp:
                temp = Path(tmp) / "instance.dcm"
                temp.write_bytes(body)
                return self.store(temp, b"")
        meta = read_meta(path)
        pair = (str(meta.sop_class), str(meta.transfer_syntax))
        self.remember(pair)
        assoc = self.ensure(pair)
        accepted = {
            UID(cx.transfer_syntax[0])
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == meta.sop_class
        }
        size = path.stat().st_size
        dataset: Path | Dataset = path
        note = ""
        if meta.transfer_syntax not in accepted:
            dataset, note = self._converted(path, meta, accepted, assoc)
        code, comment = self._c_store(assoc, dataset, meta)
        self._files += 1
        self._bytes += size
        return self._outcome(code, comment, meta, note)

    def _converted(
        self, path: Path, meta: FileMeta, accepted: set[UID], assoc: Any
    ) -> tuple[Dataset, str]:
        """The instance re-encoded for an accepted uncompressed syntax (see docstring)."""
        if not accepted:
            raise self._not_accepted(
                (str(meta.sop_class), str(meta.transfer_syntax)), assoc.rejected_contexts
            )
        target = next((ts for ts in UNCOMPRESSED if ts in accepted), None)
        if target is None:
            raise PermanentError(
                f"{self.peer} accepts {meta.sop_class.name} only as "
                f"{', '.join(sorted(accepted))}, not as {meta.transfer_syntax} or uncompressed"
            )
        if meta.transfer_syntax.is_compressed and not self.cfg.decompress_on_reject:
            raise PermanentError(
                f"{self.peer} refused {meta.transfer_syntax} ({meta.transfer_syntax.name}) "
                f"for {meta.sop_class.name} and decompress_on_reject is off"
            )
        try:
            ds = dcmread(path)
            if meta.transfer_syntax.is_compressed:
                ds.decompress(generate_instance_uid=False)
                note = f"decompressed from {meta.transfer_syntax}"
            else:  # implicit <-> explicit, deflated -> inflated: pynetdicom re-encodes
                note = f"converted from {meta.transfer_syntax}"
        except Exception as err:  # any decoder failure is this instance's
            raise PermanentError(
                f"cannot decode {meta.transfer_syntax} ({meta.transfer_syntax.name}) "
                f"to send it uncompressed: {err}"
            ) from err
        if target != ExplicitVRLittleEndian:
            note += f" to {target}"
        log.info(
            "dicom.reencoded destination=%s sop_instance=%s %s",
            self.cfg.id,
            meta.sop_instance,
            note,
        )
        return ds, note

    def _c_store(self, assoc: Any, dataset: Path | Dataset, meta: FileMeta) -> tuple[int, str]:
        """Send one C-STORE; the response's status and error comment (PS3.7 C.4, C.5)."""
        self._msg_id = self._msg_id % 0xFFFF + 1
        try:
            status = assoc.send_c_store(dataset, msg_id=self._msg_id)
            _wait_reactor_resumed(assoc)
        except RuntimeError as err:  # the association ended between our check and the send
            self.drop()
            raise TransientError(f"association with {self.peer} ended: {err}") from err
        except (ValueError, AttributeError) as err:  # no context / cannot encode / bad meta
            raise PermanentError(f"cannot send {meta.sop_instance}: {err}") from err
        except OSError as err:
            self.drop()
            raise TransientError(f"C-STORE to {self.peer} failed: {err}") from err
        if "Status" not in status:
            self.drop()
            raise TransientError(
                f"no C-STORE response from {self.peer}: association aborted, connection "
                f"lost or no answer within {self.cfg.dimse_timeout_s:g}s"
            )
        return int(status.Status), str(status.get("ErrorComment") or "")

    def _outcome(self, code: int, comment: str, meta: FileMeta, note: str) -> str:
        outcome, meaning = classify_status(code)
        text = f"0x{code:04X}"
        suffix = f" {note}" if note else ""
        if outcome is Outcome.SUCCESS:
            return text + suffix
        if outcome is Outcome.WARNING:
            return f"{text} warning: {meaning}{suffix}"
        message = f"{text} {meaning} (C-STORE of {meta.sop_class.name} to {self.peer})"
        if comment:  # the PACS's own words (PS3.7: default repertoire, no patient data)
            message += f": {comment[:200]}"
        if outcome is Outcome.TRANSIENT:
            raise TransientError(message)
        raise PermanentError(message)


# -- the asyncio side -------------------------------------------------------------------


class DicomStoreSender:
    """One delivery worker's sender: its own thread and association (STYLE.md rule 4).

    ``send()`` runs the blocking pynetdicom work on a single-thread executor, so
    each association is only ever touched by one thread (an abort at close time
    aside); ``aclose()`` releases it. An association idle for ``idle_release_s``
    is released from a loop timer.
    """

    wants_body = False  # the pump leaves body empty; we read envelope.blob_path

    def __init__(self, cfg: DicomStoreConfig, tls_context: ssl.SSLContext | None = None) -> None:
        self.cfg = cfg
        self.link = StoreLink(cfg, tls_context)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dicom-store-{cfg.id}")
        self._idle: asyncio.TimerHandle | None = None
        self._inflight: Future[str] | None = None  # the store running in the worker thread
        self._closed = False

    @property
    def associations(self) -> int:
        """Associations established so far (one per burst, not one per image)."""
        return self.link.associations

    async def send(self, envelope: StoredEnvelope) -> str:
        if envelope.kind != "dicom":
            raise PermanentError(f"dicom-store sends DICOM envelopes, not kind {envelope.kind!r}")
        if self._closed:
            raise TransientError("sender is closed")
        if envelope.blob_path is None and not envelope.body:
            raise PermanentError("envelope has neither a blob file nor a body")
        self._cancel_idle()
        loop = asyncio.get_running_loop()
        self._inflight = self._pool.submit(self.link.store, envelope.blob_path, envelope.body)
        done = asyncio.wrap_future(self._inflight)
        try:
            while True:  # wake a store that waits on an association that already died
                finished, _ = await asyncio.wait({done}, timeout=LOST_CHECK_S)
                if finished:
                    return done.result()
                self._wake_if_lost()
        except asyncio.CancelledError:
            done.cancel()
            raise
        finally:
            if self.cfg.idle_release_s is not None and not self._closed:
                self._idle = loop.call_later(self.cfg.idle_release_s, self._on_idle)

    def _wake_if_lost(self) -> None:
        assoc = self.link.assoc
        if assoc is None or not _association_dead(assoc):
            return
        log.warning(
            "dicom.association_lost_in_flight destination=%s peer=%s", self.cfg.id, self.link.peer
        )
        _wake_blocked_send(assoc)

    def _busy(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _on_idle(self) -> None:
        self._idle = None
        if not self._busy() and not self._closed:
            self._pool.submit(self.link.release, "idle")

    async def aclose(self) -> None:
        """Release the association; a store still running in the worker thread (the
        pump gave up waiting for it) is aborted instead of waited for."""
        if self._closed:
            return
        self._closed = True
        self._cancel_idle()
        assoc = self.link.assoc
        if self._busy() and assoc is not None:
            log.warning("dicom.abort_in_flight destination=%s", self.cfg.id)
            await asyncio.to_thread(_abort_quietly, assoc)
        release = asyncio.wrap_future(self._pool.submit(self.link.release, "closing"))
        try:
            await asyncio.wait_for(release, self.cfg.acse_timeout_s + 5)
        except TimeoutError:
            log.warning("dicom.close_timeout destination=%s", self.cfg.id)
        finally:
            self._pool.shutdown(wait=False)


REACTOR_RESUME_WAIT_S = 0.01


def _wait_reactor_resumed(assoc: Any) -> None:
    """Guard against a pynetdicom 3.0.4 race between back-to-back C-STOREs.

    ``send_c_store`` resumes the association's reactor thread when it returns; the
    next call trusts ``_is_paused``, still True until that thread runs again, so the
    reactor can consume the next C-STORE-RSP ("Received unexpected C-STORE service
    message") and the send then waits for the whole DIMSE timeout. Found by
    bench/dicom.py: 4 stalls in 15,000 back-to-back sends, none in 12,000 with this
    wait (at most 10 ms, normally a few microseconds).
    """
    deadline = time.monotonic() + REACTOR_RESUME_WAIT_S
    while getattr(assoc, "_is_paused", False) and time.monotonic() < deadline:
        time.sleep(0.00005)


LOST_CHECK_S = 1.0  # how often a send in flight checks its association is still there


def _association_dead(assoc: Any) -> bool:
    """Aborted, no longer established, or its reactor or DUL thread has ended."""
    return bool(
        assoc.is_aborted
        or not assoc.is_established
        or not assoc.is_alive()
        or not assoc.dul.is_alive()
    )


def _wake_blocked_send(assoc: Any) -> None:
    """Unblock a ``send_c_store`` on an association that died before it started.

    pynetdicom 3.0.4 race (found by the Orthanc kill test under load): the peer's
    abort puts ``(None, None)`` on the DIMSE queue, the reactor takes it off with its
    own non-blocking read and only then marks the association not established; a
    send that checked ``is_established`` in between waits the whole DIMSE timeout
    for a response that cannot come, or spins forever waiting for the dead reactor
    to pause. Marking the reactor paused and queueing ``(None, None)`` again makes
    that send return "no response" at once; the association is dropped after it.
    """
    if not assoc.is_alive():
        assoc._is_paused = True  # the dead reactor cannot say so itself
    with contextlib.suppress(Exception):
        assoc.dimse.msg_queue.put((None, None))


def _abort_quietly(assoc: Any) -> None:
    """A-ABORT from another thread than the one blocked in ``send_c_store``.

    pynetdicom wakes a C-STORE waiting for its response when the *peer* aborts or
    the connection drops (the state machine puts ``(None, None)`` on the DIMSE
    queue), but not after a local abort; we put it there, so the blocked store
    returns "no response" at once instead of after the DIMSE timeout.
    """
    with contextlib.suppress(Exception):
        assoc.abort()
    with contextlib.suppress(Exception):
        assoc.dimse.msg_queue.put((None, None))


class DicomStoreDestination:
    def __init__(self, cfg: DicomStoreConfig, tls_context: ssl.SSLContext | None = None) -> None:
        self.id = cfg.id
        self.cfg = cfg
        self.tls_context = tls_context

    def sender(self) -> DicomStoreSender:
        return DicomStoreSender(self.cfg, self.tls_context)


def register(registry: Registry) -> None:
    def make(cfg: DicomStoreConfig, ctx: PluginContext) -> DicomStoreDestination:
        if cfg.tls is None:
            return DicomStoreDestination(cfg)
        where = f"destination {cfg.id}: tls"
        return DicomStoreDestination(cfg, cfg.tls.client_context(ctx.config_dir, where=where))

    registry.destination(
        "dicom-store",
        DicomStoreConfig,
        make,
        "forwards DICOM instances to a PACS by C-STORE (one reused association per worker, "
        "files sent as received, decompressed only if the PACS refuses the syntax)",
    )


__all__ = [
    "STATUS_TABLE",
    "DicomStoreConfig",
    "DicomStoreDestination",
    "DicomStoreSender",
    "Outcome",
    "classify_status",
]
