"""HL7 v2 over MLLP: the asyncio listener (HL7 v2.5.1 ch. 2 original-mode acknowledgement).

Per connection: bytes -> :class:`MllpFramer` -> read MSH -> decode check ->
``intake.accept`` (durable) -> ``AA``. Bad input gets ``AE``/``AR`` with an ERR
segment and is quarantined; bytes outside frames are quarantined without a
reply. Connections are persistent; replies go out in the order messages came.

With a TLS context the port speaks TLS only: each connection's first step is the
handshake (bounded by ``handshake_timeout_s``); a peer that fails it (plain MLLP,
missing or untrusted client certificate) is logged once and closed. A peer
outside ``allowed_ips`` is closed before a byte is read. Every connection, and
every refusal, is recorded as a session in the journal (the audit trail's
"who sent what").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Protocol

from drivers.hl7.ack import build_ack
from drivers.hl7.message import Hl7Error, Msh, decode_message, parse_msh
from drivers.hl7.mllp import (
    FrameReceived,
    FramerEvent,
    FrameTooLarge,
    FrameTruncated,
    JunkReceived,
    MllpFramer,
    frame,
)
from drivers.hl7.settings import MllpListenerSettings
from gateway.allowlist import address_allowed, parse_networks
from gateway.envelope import Envelope, new_id
from gateway.errors import DiskFullError, JournalError
from gateway.interfaces import Intake

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024


def hl7_timestamp() -> str:
    return time.strftime("%Y%m%d%H%M%S+0000", time.gmtime())


def envelope_for(raw: bytes, msh: Msh, source: str, codec: str) -> Envelope:
    """The journal envelope of a valid message: body byte-exact, headers for routing."""
    trigger = f"^{msh.trigger_event}" if msh.trigger_event else ""
    headers = {
        "message_type": f"{msh.message_code}{trigger}",
        "control_id": msh.control_id,
        "sending_app": msh.sending_app.split(msh.encoding_chars[:1] or "^")[0],
        "sending_facility": msh.sending_facility.split(msh.encoding_chars[:1] or "^")[0],
        "version": msh.version,
        "charset": codec,
    }
    return Envelope(
        kind="hl7",
        source=source,
        body=raw,
        headers=headers,
        idem_key=f"hl7:{source}:{msh.sending_app}:{msh.control_id}",
    )


@dataclass
class _Connection:
    task: asyncio.Task[None]
    busy: bool = False
    messages: int = 0  # frames received on it, for the one INFO line at disconnect


class MessageHooks(Protocol):
    """Takes over well-formed messages (an analyzer's profile): returns the replies."""

    async def handle(
        self, raw: bytes, msh: Msh, *, codec: str, base: Envelope, intake: Intake, peer: str
    ) -> list[bytes]: ...


class MllpListener:
    def __init__(
        self,
        cfg: MllpListenerSettings,
        intake: Intake,
        hooks: MessageHooks | None = None,
        *,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.id = cfg.id
        self.cfg = cfg
        self.intake = intake
        self.hooks = hooks
        self.tls_context = tls_context
        self._server: asyncio.Server | None = None
        self._conns: dict[int, _Connection] = {}
        self._networks = parse_networks(cfg.allowed_ips)
        self._closing = False
        self.port = 0

    @property
    def connections(self) -> int:
        """Connections open now (for the status page)."""
        return len(self._conns)

    async def __aenter__(self) -> MllpListener:
        self._server = await asyncio.start_server(
            self._serve, self.cfg.listen.host, self.cfg.listen.port, limit=READ_SIZE
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info(
            "mllp.listening listener=%s address=%s:%d%s",
            self.id,
            self.cfg.listen.host,
            self.port,
            " tls" if self.tls_context is not None else "",
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop accepting; let messages being journaled finish; close connections."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            if not conn.busy:
                conn.task.cancel()
        tasks = [c.task for c in self._conns.values()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.cfg.drain_timeout_s)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        started = time.time()
        if not address_allowed(peername[0] if peername else "", self._networks):
            log.warning(
                "mllp.refused listener=%s peer=%s reason=address not allowed", self.id, peer
            )
            writer.transport.abort()
            await self._record(peer, started, {"rejected": "address not allowed"})
            return
        if self._closing or len(self._conns) >= self.cfg.max_connections:
            log.warning(
                "mllp.refused listener=%s peer=%s connections=%d", self.id, peer, len(self._conns)
            )
            writer.close()
            return
        conn = _Connection(task)
        self._conns[id(task)] = conn  # counted (max_connections, drain) from here on
        if self.tls_context is not None:
            secured = False
            try:
                secured = await self._handshake(writer, peer)
            finally:  # failed, timed out, or cancelled by the listener closing
                if not secured:
                    self._conns.pop(id(task), None)
                    writer.transport.abort()
            if not secured:
                await self._record(peer, started, {"rejected": "TLS handshake failed"})
                return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log.info("mllp.connected listener=%s peer=%s", self.id, peer)
        framer = MllpFramer(self.cfg.max_message_bytes)
        try:
            while not self._closing:
                try:
                    async with asyncio.timeout(self.cfg.idle_timeout_s):
                        data = await reader.read(READ_SIZE)
                except TimeoutError:
                    log.info("mllp.idle_close listener=%s peer=%s", self.id, peer)
                    break
                if not data:
                    break
                events = framer.feed(data)
                if not events:
                    continue
                conn.messages += len(events)
                conn.busy = True
                # several messages in one read share one journal commit; replies keep order
                if len(events) == 1:
                    replies = [await self._handle(events[0], peer)]
                else:
                    replies = await asyncio.gather(*(self._handle(ev, peer) for ev in events))
                for reply in replies:
                    for message in reply:
                        writer.write(frame(message))
                try:  # a sender that stops reading its ACKs gets dropped, not waited on
                    async with asyncio.timeout(self.cfg.idle_timeout_s):
                        await writer.drain()
                except TimeoutError:
                    log.warning("mllp.ack_not_read listener=%s peer=%s", self.id, peer)
                    break
                conn.busy = False
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._conns.pop(id(task), None)
            if framer.buffered:
                log.warning(
                    "mllp.incomplete_frame listener=%s peer=%s bytes=%d",
                    self.id,
                    peer,
                    framer.buffered,
                )
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            log.info(
                "mllp.disconnected listener=%s peer=%s messages=%d", self.id, peer, conn.messages
            )
            await self._record(
                peer, started, {"messages": conn.messages, "tls": bool(self.tls_context)}
            )

    async def _record(self, peer: str, started: float, details: dict[str, object]) -> None:
        """The connection's session record (never raises: it is bookkeeping)."""
        try:
            await self.intake.record_session(
                self.id, peer, started, time.time(), {"protocol": "hl7-mllp", **details}
            )
        except JournalError as err:  # bookkeeping: the connection itself went fine
            log.warning("mllp.session_not_recorded listener=%s error=%r", self.id, err)

    async def _handshake(self, writer: asyncio.StreamWriter, peer: str) -> bool:
        """TLS server handshake on the accepted connection; False (logged) if it
        fails. Done here rather than by ``start_server(ssl=...)``, which drops failed
        handshakes without a word."""
        assert self.tls_context is not None
        try:
            await writer.start_tls(
                self.tls_context, ssl_handshake_timeout=self.cfg.handshake_timeout_s
            )
        except (OSError, TimeoutError, EOFError) as err:  # ssl.SSLError is an OSError
            reason = getattr(err, "reason", None) or str(err) or type(err).__name__
            log.warning(
                "mllp.refused listener=%s peer=%s reason=TLS handshake failed: %s",
                self.id,
                peer,
                reason,
            )
            return False
        return True

    async def _handle(self, event: FramerEvent, peer: str) -> list[bytes]:
        if isinstance(event, FrameReceived):
            return await self._message(event.data, peer)
        if isinstance(event, JunkReceived):
            await self.intake.quarantine(
                self.id,
                event.data,
                f"junk: {event.size} bytes outside an MLLP frame",
                peer,
                size=event.size,
            )
            return []
        if isinstance(event, FrameTruncated):
            reason = "truncated: frame ended by a new start block before its end block"
            return [
                await self._reject(
                    event.data, peer, Hl7Error(reason, ack_code="AR", error_code="100")
                )
            ]
        if isinstance(event, FrameTooLarge):
            reason = (
                f"too large: {event.size} bytes exceeds max_message_bytes "
                f"{self.cfg.max_message_bytes}"
            )
            return [
                await self._reject(
                    event.head,
                    peer,
                    Hl7Error(reason, ack_code="AR", error_code="207"),
                    size=event.size,
                )
            ]
        raise TypeError(f"unexpected framer event {event!r}")

    async def _reject(self, raw: bytes, peer: str, err: Hl7Error, size: int | None = None) -> bytes:
        await self.intake.quarantine(self.id, raw, str(err), peer, size=size)
        try:
            msh: Msh | None = parse_msh(raw)
        except Hl7Error:
            msh = None
        return build_ack(
            msh, err.ack_code, control_id=new_id()[:20], timestamp=hl7_timestamp(), error=err
        )

    async def _message(self, raw: bytes, peer: str) -> list[bytes]:
        try:
            msh = parse_msh(raw)
            _, codec = decode_message(
                raw, msh, encoding=self.cfg.forced_encoding, fallback=self.cfg.fallback_encoding
            )
        except Hl7Error as err:
            return [await self._reject(raw, peer, err)]
        env = envelope_for(raw, msh, self.id, codec)
        if self.hooks is not None:
            return await self.hooks.handle(
                raw, msh, codec=codec, base=env, intake=self.intake, peer=peer
            )
        return [await self._store(raw, msh, env)]

    async def _store(self, raw: bytes, msh: Msh, env: Envelope) -> bytes:
        try:
            accepted = await self.intake.accept(env)
        except JournalError as err:
            # valid message we could not store: AR tells the sender to resend later
            log.error(
                "mllp.not_stored listener=%s control_id=%s error=%s", self.id, msh.control_id, err
            )
            text = (
                "out of storage, resend later"
                if isinstance(err, DiskFullError)
                else "cannot store message now, resend later"
            )
            return build_ack(
                msh,
                "AR",
                control_id=new_id()[:20],
                timestamp=hl7_timestamp(),
                error=Hl7Error(text, ack_code="AR", error_code="207"),
            )
        log.debug(
            "mllp.accepted listener=%s type=%s control_id=%s envelope=%s%s",
            self.id,
            env.headers["message_type"],
            msh.control_id,
            accepted.id,
            " duplicate" if accepted.duplicate_of else "",
        )
        return build_ack(msh, "AA", control_id=new_id()[:20], timestamp=hl7_timestamp())
