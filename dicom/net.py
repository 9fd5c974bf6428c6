"""DICOM network plumbing shared by the SCP, the SCU and the CLI (PS3.7, PS3.8).

The one place where pynetdicom's threads meet the gateway's event loop
(:func:`run_in_loop`, STYLE.md rule 4), the presentation contexts medgw
accepts, the association server class (TCP_NODELAY on every accepted socket,
IP allow-list checked before a byte is read, then the TLS handshake when the
listener has a TLS context), and AE title / address parsing.

Costs behind the defaults (ARCHITECTURE.md, "Costs"): Nagle's algorithm on the
*sending* side costs 8x here on 40 kB instances (storescu without TCP_NODELAY:
21/s instead of 167/s), so every socket medgw opens or accepts gets TCP_NODELAY
(on the receiving side alone it changes little: the C-STORE response is one
write); a small maximum PDU slows radiographs from pynetdicom senders, so medgw
offers 1 MiB (:data:`DEFAULT_MAX_PDU`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import logging
import select
import socket
import socketserver
import ssl
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NamedTuple, TypeVar

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    _config,
    build_context,
    evt,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from dicom.headers import part10_prefix
from gateway.allowlist import Network, address_allowed
from gateway.config import Endpoint, parse_endpoint

log = logging.getLogger(__name__)

T = TypeVar("T")

VERIFICATION = "1.2.840.10008.1.1"  # PS3.4 annex A
MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"  # PS3.4 annex K.6.1

# Identifiers of C-FIND requests and responses hold patient names: pynetdicom logs them
# at INFO unless told not to (STYLE.md rule 9: no patient data above DEBUG).
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False


def _recv_exactly(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` with one ``recv_into`` per kernel read instead of a
    4 kB ``recv()`` plus a copy per call: a 1 MiB P-DATA PDU is read in a handful of
    calls instead of 256. Same contract as pynetdicom 3.0.4's: blocks until
    ``nr_bytes`` are read, returns what it has when the peer closes, lets socket
    errors (timeouts included) propagate. The bench's discard ceiling on radiographs
    went from 109-116 to 138-154 images/s with it (bench/README.md, dicom.py)."""
    sock = self.socket
    assert sock is not None
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    while got < nr_bytes:
        n = sock.recv_into(view[got:], nr_bytes - got)
        if not n:
            del view
            del buf[got:]
            return buf
        got += n
    return buf


AssociationSocket.recv = _recv_exactly  # type: ignore[method-assign]  # pinned 3.0.4

_decode_associate_rq = A_ASSOCIATE_RQ.decode


def _decode_checked(self: A_ASSOCIATE_RQ, bytestream: bytes) -> None:
    """``A_ASSOCIATE_RQ.decode``, then the checks pynetdicom 3.0.4 makes too late.

    An even presentation context id (PS3.8 9.3.2.2: odd, 1-255) makes its FSM's AE-6
    raise in the reactor thread, which dies with the request unanswered and holds
    one of ``maximum_associations`` until the network timeout; a context without a
    transfer syntax sub-item (PS3.8 9.3.2.2.1: one or more) kills the acceptor
    thread the same way. Raised here, inside the decode, pynetdicom treats them as
    an invalid PDU (Evt19): A-ABORT, connection closed, nothing held. Found by
    tests/test_fuzz.py."""
    _decode_associate_rq(self, bytestream)
    primitive = self.to_primitive()  # ValueError for an even context id
    for context in primitive.presentation_context_definition_list:
        if not context.transfer_syntax:
            raise ValueError(f"presentation context {context.context_id} has no transfer syntax")


A_ASSOCIATE_RQ.decode = _decode_checked  # type: ignore[method-assign, assignment]

DEFAULT_MAX_PDU = 1024 * 1024
"""Maximum PDU medgw receives (bytes; 0 = no limit). Measured on the 2-core test
machine, 6 MB radiographs from a pynetdicom sender into the SCP (journal stubbed
out): 16 kB 21/s, 128 kB 29/s, 1 MiB 35/s, no limit 20/s. pynetdicom reads each
PDU with 4 kB ``recv`` calls into one growing buffer, so a whole-image PDU costs
more than several 1 MiB ones. DCMTK's storescu sends at most 128 kB whatever is
offered, so for it anything from 128 kB up is the same."""

# Preference order when a requestor offers several syntaxes in one context
# (pynetdicom's acceptor walks *our* list): never pick a lossy syntax when a
# lossless one is on offer, and keep what arrives forwardable to any PACS.
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    JPEGLSNearLossless,
    JPEG2000,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def storage_contexts() -> list[PresentationContext]:
    """One SCP context per storage SOP class (all of them: the 128-context limit binds
    only requestors), each with every syntax of :data:`STORAGE_TRANSFER_SYNTAXES`."""
    return [
        build_context(cx.abstract_syntax, list(STORAGE_TRANSFER_SYNTAXES))
        for cx in AllStoragePresentationContexts
        if cx.abstract_syntax is not None
    ]


def verification_context() -> PresentationContext:
    return build_context(VERIFICATION, list(UNCOMPRESSED))


# -- the thread <-> loop seam ------------------------------------------------------------


def run_in_loop(coro: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop, timeout: float) -> T:
    """Run ``coro`` on ``loop`` from a pynetdicom thread and wait for its result.

    Raises :class:`TimeoutError` after ``timeout`` seconds (the coroutine is then
    cancelled) and whatever the coroutine raised. Never call it on the loop's thread.
    """
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"no result from the event loop within {timeout:g} s") from None


# -- C-STORE data sets --------------------------------------------------------------------


def received_file(event: Event) -> bytes:
    """The C-STORE data set as a Part-10 file: the bytes ``event.encoded_dataset()``
    returns (preamble, file meta built from the request and the negotiated transfer
    syntax, then the data set exactly as received), built with one copy of the data
    set and without pydicom's writer."""
    request = event.request
    dataset = getattr(request, "DataSet", None)
    # with _config.STORE_RECV_CHUNKED_DATASET the data set is in a temp file instead
    if not isinstance(request, C_STORE) or not isinstance(dataset, io.BytesIO):
        data: bytes = event.encoded_dataset(include_meta=True)
        return data
    prefix = received_prefix(
        request.AffectedSOPClassUID,
        request.AffectedSOPInstanceUID,
        event.context.transfer_syntax,
    )
    with dataset.getbuffer() as view:
        return b"".join((prefix, view))


def received_prefix(sop_class: Any, sop_instance: Any, transfer_syntax: Any) -> bytes:
    """What :func:`received_file` puts before a C-STORE's data set (also written first
    by :mod:`dicom.spool`): preamble and the file meta pynetdicom would build."""
    return part10_prefix(
        str(sop_class),
        str(sop_instance),
        str(transfer_syntax),
        PYNETDICOM_IMPLEMENTATION_UID,
        PYNETDICOM_IMPLEMENTATION_VERSION,
    )


# -- sockets -------------------------------------------------------------------------------


def set_nodelay(sock: socket.socket | None) -> None:
    """Turn Nagle's algorithm off: DICOM is request/response over small PDUs."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as err:  # not TCP (a test double), or already closed
        log.debug("dicom.nodelay_failed error=%s", err)


def _on_conn_open(event: Event) -> None:
    dul_socket = event.assoc.dul.socket
    set_nodelay(dul_socket.socket if dul_socket is not None else None)


NODELAY_HANDLER: tuple[Any, Callable[[Event], None]] = (evt.EVT_CONN_OPEN, _on_conn_open)
"""Bind on requestor associations (``ae.associate(..., evt_handlers=[NODELAY_HANDLER])``):
pynetdicom 3.0.4 has no socket option setting; the handler runs after ``connect()``
and before the A-ASSOCIATE-RQ is written."""


class AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, plus: TCP_NODELAY on each accepted socket,
    peers outside ``allowed_networks`` closed before the association starts, and,
    with ``tls_context``, a TLS handshake (PS3.15 B.1) before the association.

    Created with ``ae.make_server(..., server_class=AssociationServer,
    allowed_networks=..., on_refused=..., tls_context=..., on_tls_failed=...)`` and
    served by the caller's own thread, so that shutting it down does not touch the
    AE's private server list.

    The handshake runs in the connection's own thread, after the IP check and
    bounded by ``handshake_timeout_s`` (pynetdicom's own ``ssl_context`` would run
    it in the accept loop, where one silent peer stalls every other). A peer that
    fails it (plain TCP, no or an untrusted client certificate) is closed and
    reported once to ``on_tls_failed(host, reason)``.
    """

    def __init__(
        self,
        *args: Any,
        allowed_networks: Sequence[Network] = (),
        on_refused: Callable[[str], None] | None = None,
        tls_context: ssl.SSLContext | None = None,
        handshake_timeout_s: float = 10.0,
        on_tls_failed: Callable[[str, str], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self.allowed_networks = tuple(allowed_networks)
        self.on_refused = on_refused
        self.tls_context = tls_context
        self.handshake_timeout_s = handshake_timeout_s
        self.on_tls_failed = on_tls_failed
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        set_nodelay(sock)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0]) if isinstance(client_address, tuple) else ""
        if address_allowed(host, self.allowed_networks):
            return True
        if self.on_refused is not None:
            self.on_refused(host)
        return False

    def process_request_thread(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: tuple[str, int] | str,
    ) -> None:
        if self.tls_context is not None and isinstance(request, socket.socket):
            wrapped = self._handshake(request, client_address)
            if wrapped is None:
                return
            request = wrapped
        if isinstance(request, socket.socket) and not self._peer_speaks(request):
            with contextlib.suppress(OSError):
                request.close()
            return
        super().process_request_thread(request, client_address)

    def _peer_speaks(self, sock: socket.socket) -> bool:
        """Wait (in this connection's own thread) for the peer's first byte.

        pynetdicom 3.0 counts a connection against ``maximum_associations`` from the
        moment it is accepted, and keeps one whose peer closed before sending its
        A-ASSOCIATE-RQ until the ACSE timeout: a port scan or a TCP health check
        would make the SCP refuse every modality meanwhile (found by
        tests/test_fuzz.py). A peer that closes, or stays silent for the ACSE
        timeout, is closed here and never becomes an association.
        """
        timeout = float(getattr(self.ae, "acse_timeout", None) or 30.0)
        try:
            if isinstance(sock, ssl.SSLSocket):  # no MSG_PEEK through TLS
                readable, _, _ = select.select([sock], [], [], timeout)
                return bool(readable) or sock.pending() > 0
            sock.settimeout(timeout)
            return sock.recv(1, socket.MSG_PEEK) != b""
        except OSError:  # reset, or silent until the timeout
            return False
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(None)

    def _handshake(self, sock: socket.socket, client_address: Any) -> ssl.SSLSocket | None:
        assert self.tls_context is not None
        host = str(client_address[0]) if isinstance(client_address, tuple) else ""
        try:
            sock.settimeout(self.handshake_timeout_s)
            tls = self.tls_context.wrap_socket(sock, server_side=True)
            tls.settimeout(None)
        except (ssl.SSLError, OSError) as err:  # the peer's fault: plain TCP, bad cert, gone
            with contextlib.suppress(OSError):
                sock.close()
            reason = getattr(err, "reason", None) or str(err) or type(err).__name__
            if self.on_tls_failed is not None:
                self.on_tls_failed(host, f"TLS handshake failed: {reason}")
            return None
        return tls

    def shutdown(self) -> None:
        """Stop ``serve_forever`` and close the listening socket (associations already
        running carry on; the caller waits for or aborts them)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


# -- names and addresses --------------------------------------------------------------------


def check_ae_title(value: str) -> str:
    """An AE title (PS3.5 table 6.2-1, VR AE): 1..16 characters of the default
    repertoire, no backslash or control characters, not only spaces; leading and
    trailing spaces are not significant and are removed."""
    text = value.strip(" ")
    if not text:
        raise ValueError("an AE title needs 1 to 16 characters (not only spaces)")
    if len(value.rstrip(" ")) > 16:
        raise ValueError(f"an AE title has at most 16 characters, got {len(text)}: {value!r}")
    if not text.isascii() or "\\" in text or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"an AE title is printable ASCII without backslash: {value!r}")
    return text


class AeAddress(NamedTuple):
    ae_title: str
    endpoint: Endpoint

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.endpoint}"


def parse_ae_address(text: str) -> AeAddress:
    """``AE@host:port`` (``AE@[v6]:port``) -> AeAddress; ValueError says what is wrong."""
    ae, sep, rest = text.partition("@")
    if not sep:
        raise ValueError(f"expected AE@host:port, got {text!r}")
    return AeAddress(check_ae_title(ae), parse_endpoint(rest))
