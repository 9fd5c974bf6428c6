"""The small contracts between the core and protocol plugins.

A *listener* receives from devices and hands each message to an :class:`Intake`;
a *destination* makes :class:`Sender` objects, one per delivery worker, that
deliver a stored envelope and return only once the peer confirmed it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gateway.envelope import Envelope, StoredEnvelope


@dataclass(frozen=True, slots=True)
class Accepted:
    """What :meth:`Intake.accept` returns once the envelope is durable.

    ``duplicate_of`` is set when the same idempotency key with identical bytes
    was already journaled: nothing new was written, the sender may be ACKed.
    """

    id: str
    duplicate_of: str | None = None


class Intake(Protocol):
    """How listeners hand messages to the core (implemented by the service)."""

    async def accept(self, envelope: Envelope, destinations: list[str] | None = None) -> Accepted:
        """Journal durably and route (or deliver to ``destinations``); returns only after
        the commit (raises JournalError)."""
        ...

    def stage(self, envelope: Envelope, written: Callable[[Path], str] | None = None) -> Envelope:
        """Write a large body to the journal's blob folder now, from the caller's own
        thread (any thread); ``accept`` of the returned envelope then only commits.
        ``written``: the body is already in a file of :meth:`spool_dir` (see
        ``Journal.stage``). Raises JournalError (DiskFullError below the disk
        watermark)."""
        ...

    def spool_dir(self) -> Path:
        """A folder on the blob store's filesystem for bodies written as they arrive."""
        ...

    async def quarantine(
        self, source: str, raw: bytes, reason: str, peer: str = "", size: int | None = None
    ) -> int:
        """Keep bad input for a human to look at; returns the quarantine row id.

        ``size`` is the input's real size when ``raw`` is only its head."""
        ...

    async def record_session(
        self, source: str, peer: str, started_at: float, ended_at: float, details: dict[str, Any]
    ) -> None:
        """Record one finished connection or association (who, when, what, errors)."""
        ...


class Listener(AbstractAsyncContextManager["Listener"], Protocol):
    """Entering starts serving (bound when ``__aenter__`` returns); exiting stops
    accepting new work, lets in-flight messages finish, and closes."""

    id: str


class Sender(Protocol):
    """Delivers envelopes to one destination over one connection (one per worker).

    A sender class may set ``wants_body = False`` to read large bodies from
    ``envelope.blob_path`` itself (DICOM files sent without loading them).
    """

    async def send(self, envelope: StoredEnvelope) -> str:
        """Deliver; return a short confirmation (ACK code, status) only when the peer
        confirmed. Raise TransientError to retry later, PermanentError to dead-letter."""
        ...

    async def aclose(self) -> None: ...


class Destination(Protocol):
    id: str

    def sender(self) -> Sender: ...
