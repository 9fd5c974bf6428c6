"""Storage safety: the journal's integrity check at start, retention, backup and restore."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from peers import control_id_of
from peers.gateway_proc import mllp_destination, pick_free_port
from peers.mllp_receiver import MllpReceiver, read_record
from peers.mllp_sender import build_message

from gateway.backup import BackupError, backup, restore
from gateway.config import GatewayConfig, JournalRetention, parse_config
from gateway.envelope import Envelope
from gateway.errors import JournalError
from gateway.journal import Journal
from gateway.registry import default_registry
from gateway.sdnotify import Notifier
from gateway.service import Gateway

DAY = 86400.0


def config(state_dir: Path, destinations: list[dict[str, Any]], **journal: Any) -> GatewayConfig:
    doc = {
        "site": {"id": "storage-test"},
        "state_dir": str(state_dir),
        "journal": {"min_free_mb": 0, "inline_max_bytes": 2000, **journal},
        "listeners": [{"id": "his", "type": "hl7-mllp", "listen": f"127.0.0.1:{pick_free_port()}"}],
        "destinations": destinations,
        "routes": [{"match": {"source": "his"}, "to": [d["id"] for d in destinations]}],
    }
    return parse_config(yaml.safe_dump(doc), default_registry())


@asynccontextmanager
async def running(cfg: GatewayConfig) -> AsyncIterator[Gateway]:
    gw = Gateway(cfg, default_registry(), notifier=Notifier(env={}), drain_grace_s=1)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    ready = asyncio.create_task(gw.ready.wait())
    await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises what stopped the start
    assert gw.ready.is_set(), "gateway did not become ready"
    try:
        yield gw
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def hl7(n: int, body: bytes | None = None) -> Envelope:
    message = body or build_message("ST", 1, n)
    return Envelope(kind="hl7", source="his", body=message, idem_key=f"hl7:his:{n}")


async def wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def outbox(tmp_path: Path) -> dict[str, Any]:
    return {"id": "outbox", "type": "folder", "path": str(tmp_path / "outbox")}


# -- integrity check at start ---------------------------------------------------------


async def test_damaged_journal_refuses_to_start_naming_the_file(
    tmp_path: Path, state_dir: Path
) -> None:
    async with Journal(state_dir) as journal:
        for n in range(300):
            await journal.accept(hl7(n), ["outbox"])
    db = state_dir / "journal.sqlite"
    assert db.stat().st_size > 5 * 4096
    with open(db, "r+b") as f:  # garbage over pages 2..4: what a failing disk leaves
        f.seek(4096)
        f.write(b"\xa5" * 3 * 4096)
    cfg = config(state_dir, [outbox(tmp_path)])
    with pytest.raises(JournalError) as caught:
        async with running(cfg):
            pass
    text = str(caught.value)
    assert str(db) in text
    assert "failed its integrity check (PRAGMA quick_check: " in text
    assert "medgw restore" in text or "docs/storage.md" in text


async def test_integrity_check_passes_on_a_sound_journal(tmp_path: Path, state_dir: Path) -> None:
    async with Journal(state_dir) as journal:
        await journal.accept(hl7(1), [])
    async with running(config(state_dir, [outbox(tmp_path)])) as gw:
        assert gw.journal.integrity_check


async def test_missing_blob_of_a_pending_delivery_is_dead_with_reason(
    tmp_path: Path, state_dir: Path
) -> None:
    async with Journal(state_dir, inline_max_bytes=10) as journal:
        lost = await journal.accept(hl7(1), ["outbox"])
        kept = await journal.accept(hl7(2), ["outbox"])
    blob = state_dir / "blobs" / lost.id[:4] / lost.id
    blob.unlink()
    async with running(config(state_dir, [outbox(tmp_path)])) as gw:
        await wait_for(lambda: gw.journal.depth().get("outbox", {}).get("done") == 1)
        assert gw.journal.depth()["outbox"] == {"dead": 1, "done": 1}
        state, error = gw.journal.reader.execute(
            "SELECT d.state, d.last_error FROM deliveries d JOIN envelopes e ON e.seq = d.seq "
            "WHERE e.id = ?",
            (lost.id,),
        ).fetchone()
        assert state == "dead"
        assert error == f"blob file missing at start: blobs/{lost.id[:4]}/{lost.id}"
    assert (tmp_path / "outbox").is_dir()
    assert kept.id


# -- retention ------------------------------------------------------------------------


async def test_retention_prunes_only_finished_old_data(state_dir: Path) -> None:
    now = time.time()
    async with Journal(state_dir, inline_max_bytes=10) as journal:
        ids = {}
        for name, dests in (
            ("old_done", ["a"]),
            ("old_done_two", ["a", "b"]),
            ("old_unrouted", []),
            ("old_pending", ["a"]),
            ("old_dead", ["a"]),
            ("old_half", ["a", "b"]),
            ("recent_done", ["a"]),
        ):
            ids[name] = (await journal.accept(hl7(len(ids)), dests)).id
        seq = dict(journal.reader.execute("SELECT id, seq FROM envelopes").fetchall())
        for name in ("old_done", "old_done_two", "old_half", "recent_done"):
            await journal.mark_done("a", seq[ids[name]], "AA")
        await journal.mark_done("b", seq[ids["old_done_two"]], "AA")
        await journal.mark_failed("a", seq[ids["old_dead"]], error="AR", next_at=now, dead=True)
        await journal.quarantine("his", b"junk-old", "bad MSH")
        await journal.quarantine("his", b"junk-new", "bad MSH")
        await journal.record_session("his", "10.0.0.1", now - 400 * DAY, now - 400 * DAY, {})
        await journal.record_session("his", "10.0.0.1", now, now, {})
        conn = journal.reader
        conn.execute(
            "UPDATE envelopes SET received_at = ? WHERE id != ?",
            (now - 31 * DAY, ids["recent_done"]),
        )
        conn.execute(
            "UPDATE quarantine SET received_at = ? WHERE raw = ?", (now - 91 * DAY, b"junk-old")
        )
        blobs = {n: state_dir / "blobs" / i[:4] / i for n, i in ids.items()}
        assert all(p.is_file() for p in blobs.values())

        counts = await journal.prune(JournalRetention())

        assert counts == {"envelopes": 3, "blobs": 3, "quarantine": 1, "sessions": 1}
        left = {r[0] for r in conn.execute("SELECT id FROM envelopes")}
        gone = {"old_done", "old_done_two", "old_unrouted"}
        assert left == {i for n, i in ids.items() if n not in gone}
        assert {n for n, p in blobs.items() if p.exists()} == set(ids) - gone
        assert conn.execute("SELECT raw FROM quarantine").fetchall() == [(b"junk-new",)]
        assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone() == (1,)
        orphans = conn.execute(
            "SELECT COUNT(*) FROM deliveries WHERE seq NOT IN (SELECT seq FROM envelopes)"
        ).fetchone()
        assert orphans == (0,)
        assert await journal.prune(JournalRetention()) == dict.fromkeys(counts, 0)


async def test_retention_can_be_switched_off_per_kind(state_dir: Path) -> None:
    async with Journal(state_dir) as journal:
        await journal.accept(hl7(1), [])
        journal.reader.execute("UPDATE envelopes SET received_at = 0")
        keep = JournalRetention(delivered_days=None, quarantine_days=None, sessions_days=None)
        assert sum((await journal.prune(keep)).values()) == 0
        assert journal.reader.execute("SELECT COUNT(*) FROM envelopes").fetchone() == (1,)


# -- backup and restore ---------------------------------------------------------------


async def test_backup_while_running_then_restore_delivers_the_pending(tmp_path: Path) -> None:
    state, fresh, saved = tmp_path / "state", tmp_path / "fresh", tmp_path / "backup"
    lis_port = pick_free_port()  # nothing listens yet: deliveries stay pending
    lis = mllp_destination(
        "lis", lis_port, backoff={"initial_s": 0.1, "max_s": 0.3}, breaker={"failures": 1000}
    )
    messages = [build_message("ST", 1, n) for n in range(20)]
    messages.append(messages[0][:-1] + b"\rNTE|2|L|" + b"x" * 4000 + b"\r")  # a blob file
    messages[-1] = messages[-1].replace(b"ST-", b"SB-", 1)
    async with running(config(state, [lis])) as gw:
        for n, body in enumerate(messages):
            await gw.accept(hl7(n, body))
        assert any((state / "blobs").rglob("*"))
        result = await asyncio.to_thread(backup, state, saved)
        with pytest.raises(BackupError, match="in use by a running gateway"):
            restore(saved, state)
    assert result.blobs >= 1
    assert result.missing_blobs == []
    assert (saved / "manifest.json").is_file()

    assert restore(saved, fresh) is None  # a fresh folder: nothing moved aside
    receiver = await MllpReceiver(tmp_path / "lis.txt").start(lis_port)
    try:
        async with running(config(fresh, [lis])) as gw:
            await wait_for(lambda: receiver.accepted == len(messages), timeout=15)
            await wait_for(lambda: gw.journal.depth()["lis"] == {"done": len(messages)})
    finally:
        await receiver.close()
    recorded = [cid for cid, _ in read_record(tmp_path / "lis.txt")]
    assert recorded == [control_id_of(m) for m in messages]


def test_restore_moves_the_previous_state_aside(tmp_path: Path, state_dir: Path) -> None:
    async def fill() -> None:
        async with Journal(state_dir) as journal:
            await journal.accept(hl7(1), ["x"])

    asyncio.run(fill())
    saved = tmp_path / "backup"
    backup(state_dir, saved)
    with pytest.raises(BackupError, match="not empty"):
        backup(state_dir, saved)
    aside = restore(saved, state_dir)
    assert aside is not None
    assert (aside / "journal.sqlite").is_file()
    conn = sqlite3.connect(state_dir / "journal.sqlite")
    try:
        assert conn.execute("SELECT COUNT(*) FROM deliveries").fetchone() == (1,)
    finally:
        conn.close()
    (saved / "journal.sqlite").write_bytes(b"tampered")
    with pytest.raises(BackupError, match="changed since the backup"):
        restore(saved, state_dir)
