"""insert_sync: CLI commands journal small envelopes beside a running gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.envelope import Envelope
from gateway.journal import Journal, admin_connection, insert_sync


async def test_insert_sync_is_seen_by_the_service_and_deduplicated(tmp_path: Path) -> None:
    journal = Journal(tmp_path).open()
    try:
        env = Envelope(
            kind="event",
            source="cli",
            body=b'{"e":1}',
            idem_key="k1",
            headers={"event": "study.complete"},
        )
        with admin_connection(tmp_path) as conn:
            first = insert_sync(conn, env, ["out", "audit"])
            again = insert_sync(
                conn, Envelope(kind="event", source="cli", body=b'{"e":1}', idem_key="k1"), ["out"]
            )
        assert first.duplicate_of is None
        assert again.duplicate_of == env.id
        pending = journal.pending("out", limit=10)
        assert [p.envelope.id for p in pending] == [env.id]
        assert pending[0].envelope.headers == {"event": "study.complete"}
        assert journal.depth() == {"out": {"pending": 1}, "audit": {"pending": 1}}
        # the service's own writer still works beside it
        await journal.accept(Envelope(kind="hl7", source="x", body=b"MSH"), ["out"])
        assert len(journal.pending("out", limit=10)) == 2
    finally:
        await asyncio.to_thread(journal.close)


def test_insert_sync_refuses_file_bodies(tmp_path: Path) -> None:
    Journal(tmp_path).open().close()
    with admin_connection(tmp_path) as conn, pytest.raises(ValueError, match="inline"):
        insert_sync(conn, Envelope(kind="dicom", source="x", body=b"x", as_file=True), [])


async def test_accepts_of_one_loop_iteration_share_one_commit(tmp_path: Path) -> None:
    """Group commit is deterministic: what the event loop submits in one iteration
    (e.g. messages read from 8 connections in one poll) goes to disk in one commit."""
    journal = Journal(tmp_path).open()
    try:
        await journal.accept(Envelope(kind="hl7", source="x", body=b"warm"), ["out"])
        before = journal.commits
        bodies = [f"MSH|{i}".encode() for i in range(50)]
        results = await asyncio.gather(
            *(journal.accept(Envelope(kind="hl7", source="x", body=b), ["out"]) for b in bodies)
        )
        assert len({r.id for r in results}) == 50
        assert journal.commits == before + 1
        assert journal.depth() == {"out": {"pending": 51}}
    finally:
        await asyncio.to_thread(journal.close)


async def test_staged_blob_is_committed_by_accept_and_removed_when_a_duplicate(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path).open()
    try:
        body = b"DICM" * 1000
        first = await asyncio.to_thread(
            journal.stage,
            Envelope(kind="dicom", source="x", body=body, idem_key="sop:1", as_file=True),
        )
        assert first.staged is not None
        assert (journal.blob_dir / first.staged.rel).read_bytes() == body
        accepted = await journal.accept(first, ["pacs"])
        assert accepted.duplicate_of is None
        [pending] = journal.pending("pacs", limit=5)
        assert pending.envelope.blob_path == journal.blob_dir / first.staged.rel
        again = journal.stage(Envelope(kind="dicom", source="x", body=body, idem_key="sop:1"))
        assert (await journal.accept(again, ["pacs"])).duplicate_of == first.id
        assert again.staged is not None
        assert not (journal.blob_dir / again.staged.rel).exists()
    finally:
        await asyncio.to_thread(journal.close)
