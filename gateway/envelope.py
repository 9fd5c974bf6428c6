"""Envelopes: every message the gateway holds, as received, plus routing headers."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple


def new_id() -> str:
    """A time-ordered id (UUIDv7 layout, RFC 9562 section 5.7) as 32 hex digits.

    Lexical order of ids follows creation time to the millisecond, so the
    journal and the outbox list in arrival order.
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand & ((1 << 76) - 1))
    # set the RFC 4122 variant bits (10xx) at bits 62..63
    value = (value & ~(0x3 << 62)) | (0x2 << 62)
    return f"{value:032x}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class StagedBlob(NamedTuple):
    """A body already written to the journal's blob folder (``Journal.stage``)."""

    rel: str
    digest: str


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message as received: the body is kept byte-exact.

    ``headers`` is a small dict of strings that routing matches on (message
    type, modality, calling AE, ...); it never holds patient names.
    ``idem_key`` identifies the same clinical message across retransmissions
    (MSH-10 with its sender, SOP Instance UID, ...).
    """

    kind: str
    source: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    idem_key: str | None = None
    parent_id: str | None = None
    id: str = field(default_factory=new_id)
    received_at: datetime = field(default_factory=utcnow)
    as_file: bool = False  # keep the body as a blob file whatever its size (DICOM)
    staged: StagedBlob | None = None  # body already written as a blob file (see Journal.stage)
    # the key alone identifies the message (it is built from the content, e.g. lab results:
    # analyzer + sample + tests + values + result times), so a resend whose bytes differ
    # only in framing or a header time is still a duplicate
    dedupe_on_key: bool = False


@dataclass(frozen=True, slots=True)
class StoredEnvelope:
    """An envelope read back from the journal for delivery."""

    id: str
    seq: int
    kind: str
    source: str
    headers: dict[str, str]
    idem_key: str | None
    parent_id: str | None
    received_at: datetime
    body: bytes
    blob_path: Path | None = None  # the body's file when stored as a blob
