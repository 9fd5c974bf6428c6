"""HL7 v2 over MLLP: the sending side (one persistent connection per delivery worker).

Sends one message, waits for the whole ACK frame, and checks MSA-1 (accept
codes) and MSA-2 (our MSH-10). A negative ACK, a timeout, a lost connection or
an ACK for another message is a transient failure: the delivery retries. The
connection is dropped on any failure so a late ACK cannot be mistaken for the
next message's. With ``tls`` the connection is TLS; a failed handshake is a
connection failure (retried).
"""

from __future__ import annotations

import ssl

from drivers.hl7.ack import parse_ack
from drivers.hl7.client import MllpClient
from drivers.hl7.message import Hl7Error, parse_msh
from drivers.hl7.settings import MllpDestinationSettings
from gateway.envelope import StoredEnvelope
from gateway.errors import PermanentError, TransientError


class MllpSender:
    def __init__(
        self, cfg: MllpDestinationSettings, tls_context: ssl.SSLContext | None = None
    ) -> None:
        self.cfg = cfg
        self._client = MllpClient(
            cfg.connect.host,
            cfg.connect.port,
            connect_timeout_s=cfg.connect_timeout_s,
            ssl_context=tls_context,
            server_hostname=cfg.tls.hostname_for(cfg.connect.host) if cfg.tls else None,
        )

    async def send(self, envelope: StoredEnvelope) -> str:
        try:
            control_id = parse_msh(envelope.body).control_id
        except Hl7Error as err:
            raise PermanentError(f"not an HL7 message: {err}") from err
        try:
            await self._client.connect()
        except (OSError, TimeoutError) as err:
            raise TransientError(
                f"cannot connect to {self.cfg.connect}: {err or 'timeout'}"
            ) from err
        try:
            ack = parse_ack(await self._client.request(envelope.body, self.cfg.ack_timeout_s))
        except TimeoutError as err:
            await self.aclose()
            raise TransientError(f"no ACK within {self.cfg.ack_timeout_s:g}s") from err
        except (OSError, EOFError, Hl7Error) as err:
            await self.aclose()
            raise TransientError(f"{type(err).__name__}: {err}") from err
        if ack.control_id != control_id:
            await self.aclose()
            raise TransientError(f"ACK for {ack.control_id!r}, expected {control_id!r}")
        if ack.code not in self.cfg.accept_codes:
            raise TransientError(f"{ack.code}: {ack.text or ack.error or 'negative ACK'}")
        return ack.code

    async def aclose(self) -> None:
        await self._client.close()


class MllpDestination:
    def __init__(
        self, cfg: MllpDestinationSettings, tls_context: ssl.SSLContext | None = None
    ) -> None:
        self.id = cfg.id
        self.cfg = cfg
        self.tls_context = tls_context

    def sender(self) -> MllpSender:
        return MllpSender(self.cfg, self.tls_context)
