"""`medgw queue stats|list|retry|purge` as subprocesses against a journal filled through Journal.

The state built by :func:`build_state` (the gateway is stopped):

=====  ========  ============================  ===========================
name   received  deliveries                    notes
=====  ========  ============================  ===========================
e1     10 d ago  outbox done, lis done
e2     10 d ago  outbox done                   body in a blob file
e3     10 d ago  outbox done, lis dead
e4     now       outbox done
e5     now       lis pending (2 attempts)      next attempt in an hour
e6     now       lis dead
e7     10 d ago  none (unrouted)
=====  ========  ============================  ===========================

plus two quarantined items received now.
"""

from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway import cli
from gateway.envelope import Envelope
from gateway.journal import Journal

REPO = Path(__file__).resolve().parents[1]
OLD = datetime.now(UTC) - timedelta(days=10)


@dataclass
class State:
    config: Path
    state_dir: Path
    ids: dict[str, str]
    blob: Path

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.state_dir / 'journal.sqlite'}?mode=ro", uri=True)

    def deliveries(self) -> dict[tuple[str, str], tuple[str, int]]:
        """(envelope name, destination) -> (state, attempts)."""
        names = {v: k for k, v in self.ids.items()}
        with self.db() as c:
            return {
                (names[eid], dest): (state, attempts)
                for eid, dest, state, attempts in c.execute(
                    "SELECT e.id, d.destination, d.state, d.attempts "
                    "FROM deliveries d JOIN envelopes e ON e.seq = d.seq"
                )
            }

    def envelopes(self) -> set[str]:
        names = {v: k for k, v in self.ids.items()}
        with self.db() as c:
            return {names[eid] for (eid,) in c.execute("SELECT id FROM envelopes")}


def write_config(tmp_path: Path, state_dir: Path) -> Path:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        f"site: {{id: q}}\n"
        f"state_dir: {state_dir}\n"
        f"destinations:\n"
        f"  - {{id: outbox, type: folder, path: {tmp_path / 'outbox'}}}\n"
        f"  - {{id: lis, type: hl7-mllp, connect: 127.0.0.1:2576}}\n",
        encoding="utf-8",
    )
    return cfg


async def build_state(tmp_path: Path) -> State:
    state_dir = tmp_path / "state"
    j = Journal(state_dir, inline_max_bytes=1024).open()
    ids: dict[str, str] = {}
    seqs: dict[str, int] = {}
    plan = {
        "e1": (OLD, ["outbox", "lis"]),
        "e2": (OLD, ["outbox"]),
        "e3": (OLD, ["outbox", "lis"]),
        "e4": (None, ["outbox"]),
        "e5": (None, ["lis"]),
        "e6": (None, ["lis"]),
        "e7": (OLD, []),
    }
    try:
        for name, (received, dests) in plan.items():
            body = b"B" * 5000 if name == "e2" else f"MSH|{name}".encode()
            kw = {"received_at": received} if received else {}
            env = Envelope(
                kind="hl7",
                source="his",
                body=body,
                headers={"message_type": "ORU^R01", "control_id": f"CTL-{name}"},
                **kw,  # type: ignore[arg-type]
            )
            await j.accept(env, dests)
            ids[name] = env.id
            seqs[name] = j.reader.execute(
                "SELECT seq FROM envelopes WHERE id = ?", (env.id,)
            ).fetchone()[0]
        for name, dest in (("e1", "outbox"), ("e1", "lis"), ("e2", "outbox"), ("e3", "outbox")):
            await j.mark_done(dest, seqs[name], "AA")
        await j.mark_done("outbox", seqs["e4"], "AA")
        later = time.time() + 3600
        for _ in range(2):
            await j.mark_failed("lis", seqs["e5"], error="refused", next_at=later, dead=False)
        await j.mark_failed("lis", seqs["e3"], error="AR: bad", next_at=0, dead=True)
        await j.mark_failed("lis", seqs["e6"], error="AR: worse", next_at=0, dead=True)
        await j.quarantine("his", b"\x00junk", "junk: 5 bytes outside an MLLP frame", "1.2.3.4:5")
        await j.quarantine("his", b"PID|x", "message does not start with an MSH segment")
        (blob_rel,) = [
            r[0] for r in j.reader.execute("SELECT blob FROM envelopes WHERE blob IS NOT NULL")
        ]
        blob = j.blob_dir / blob_rel
    finally:
        j.close()
    assert blob.is_file()
    return State(write_config(tmp_path, state_dir), state_dir, ids, blob)


@pytest.fixture
async def state(tmp_path: Path) -> State:
    return await build_state(tmp_path)


def queue(st: State | Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`medgw queue ARGS --config ...` as a subprocess, as a technician runs it."""
    config = st.config if isinstance(st, State) else st
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "queue", *args, "--config", str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def queue_fast(st: State | Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The same command through ``gateway.cli.main`` in this process, for the many
    variations of a command already covered once as a subprocess (keeps the suite fast)."""
    config = st.config if isinstance(st, State) else st
    argv = ["queue", *args, "--config", str(config)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:  # argparse usage errors
            code = int(exit_.code or 0)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def table(stdout: str) -> tuple[list[str], list[list[str]]]:
    header, *rows = stdout.splitlines()
    return header.split(), [r.split() for r in rows]


# -- read-only ---------------------------------------------------------------------------


def test_stats(state: State) -> None:
    r = queue(state, "stats")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["DESTINATION", "PENDING", "DONE", "DEAD", "OLDEST_PENDING"]
    lis, outbox = lines[1].split(), lines[2].split()
    assert lis[:4] == ["lis", "1", "1", "2"]
    assert lis[4] == datetime.now(UTC).strftime("%Y-%m-%d")  # e5 is pending, received today
    assert outbox == ["outbox", "0", "4", "0", "-"]
    assert lines[3] == "envelopes=7 unrouted=1 quarantined=2"
    assert len(lines) == 4


def test_list_all_filtered_and_limited(state: State) -> None:
    r = queue(state, "list")
    assert r.returncode == 0, r.stderr
    header, rows = table(r.stdout)
    assert header == [
        "RECEIVED",
        "ENVELOPE",
        "SOURCE",
        "TYPE",
        "CONTROL_ID",
        "DESTINATION",
        "STATE",
        "ATTEMPTS",
        "NEXT",
        "LAST_ERROR",
    ]
    assert len(rows) == 8  # one row per delivery
    # newest first; received is two columns (date, time)
    assert [row[5] for row in rows][:3] == ["CTL-e6", "CTL-e5", "CTL-e4"]
    e5 = next(row for row in rows if row[5] == "CTL-e5")
    assert e5[6:9] == ["lis", "pending", "2"]
    assert e5[-1] == "refused"

    dead = table(queue_fast(state, "list", "--state", "dead").stdout)[1]
    assert sorted(row[5] for row in dead) == ["CTL-e3", "CTL-e6"]
    assert all(row[6:8] == ["lis", "dead"] and row[9] == "-" for row in dead)

    outbox = table(queue_fast(state, "list", "--destination", "outbox").stdout)[1]
    assert sorted(row[5] for row in outbox) == ["CTL-e1", "CTL-e2", "CTL-e3", "CTL-e4"]

    assert len(table(queue_fast(state, "list", "--limit", "3").stdout)[1]) == 3


def test_list_quarantine(state: State) -> None:
    r = queue(state, "list", "--quarantine")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ID", "RECEIVED", "SOURCE", "PEER", "SIZE", "REASON", "HEAD"]
    assert len(lines) == 3
    assert lines[1].split()[0] == "2" and "message does not start with an MSH" in lines[1]
    assert lines[2].split()[0] == "1" and "1.2.3.4:5" in lines[2]
    assert "b'\\x00junk'" in lines[2]


def test_empty_journal_lists_none(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    Journal(state_dir).open().close()
    cfg = write_config(tmp_path, state_dir)
    r = queue_fast(cfg, "list")
    assert (r.returncode, r.stdout) == (0, "(none)\n")
    r = queue_fast(cfg, "stats")
    assert r.stdout.splitlines() == ["(none)", "envelopes=0 unrouted=0 quarantined=0"]


def test_missing_journal_is_an_error(tmp_path: Path) -> None:
    r = queue_fast(write_config(tmp_path, tmp_path / "nowhere"), "stats")
    assert r.returncode == 1
    assert "no journal at" in r.stderr
    assert not (tmp_path / "nowhere").exists()  # looking does not create one


def test_invalid_config_is_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: {}\n", encoding="utf-8")
    r = queue_fast(bad, "stats")
    assert r.returncode == 2
    assert "site.id: required setting is missing" in r.stderr


# -- retry -------------------------------------------------------------------------------------


def test_retry_moves_dead_to_pending(state: State) -> None:
    before = state.deliveries()
    r = queue(state, "retry", "--destination", "lis")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "3 deliveries due now\n"  # e3 and e6 (dead) and e5 (waiting)
    after = state.deliveries()
    for key in (("e3", "lis"), ("e6", "lis"), ("e5", "lis")):
        assert after[key] == ("pending", before[key][1])  # attempts kept
    assert after[("e1", "lis")] == ("done", 1)  # done stays done
    with state.db() as c:
        (late,) = c.execute(
            "SELECT COUNT(*) FROM deliveries WHERE state = 'pending' AND next_at > ?",
            (time.time(),),
        ).fetchone()
    assert late == 0  # all due now


async def test_retry_one_envelope_and_the_journal_sees_it(state: State) -> None:
    r = queue_fast(state, "retry", "--envelope", state.ids["e6"])
    assert r.stdout == "1 deliveries due now\n"
    assert state.deliveries()[("e3", "lis")] == ("dead", 1)  # the other dead one is untouched
    j = Journal(state.state_dir).open()
    try:
        due = j.pending("lis", limit=10, due_before=time.time())
        assert [p.envelope.id for p in due] == [state.ids["e6"]]
    finally:
        j.close()


def test_retry_nothing_matches(state: State) -> None:
    r = queue_fast(state, "retry", "--destination", "outbox")
    assert (r.returncode, r.stdout) == (0, "0 deliveries due now\n")


# -- purge -------------------------------------------------------------------------------------


def test_purge_dead_needs_yes_and_destination(state: State) -> None:
    before = state.deliveries()
    r = queue(state, "purge", "dead", "--destination", "lis")
    assert r.returncode == 2
    assert "--destination" in r.stderr and "--yes" in r.stderr
    for args in (("purge", "dead"), ("purge", "dead", "--yes")):
        r = queue_fast(state, *args)
        assert r.returncode == 2, args
        assert "--destination" in r.stderr and "--yes" in r.stderr
    assert state.deliveries() == before

    r = queue(state, "purge", "dead", "--destination", "lis", "--yes")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "2 dead deliveries to lis abandoned\n"
    after = state.deliveries()
    assert ("e3", "lis") not in after and ("e6", "lis") not in after
    assert after[("e5", "lis")] == ("pending", 2)
    assert state.envelopes() == {"e1", "e2", "e3", "e4", "e5", "e6", "e7"}  # envelopes stay


def test_purge_delivered_removes_old_done_envelopes_and_blobs(state: State) -> None:
    r = queue(state, "purge", "delivered")  # default: older than 7 days
    assert r.returncode == 0, r.stderr
    assert r.stdout == "3 delivered envelopes removed\n"  # e1, e2 (blob), e7 (unrouted)
    assert state.envelopes() == {"e3", "e4", "e5", "e6"}
    assert not state.blob.exists()
    assert ("e3", "outbox") in state.deliveries()  # e3 still has a dead delivery: kept whole

    r = queue_fast(state, "purge", "delivered", "--older-than", "0s")
    assert r.stdout == "1 delivered envelopes removed\n"  # e4 now too
    assert state.envelopes() == {"e3", "e5", "e6"}
    stats = queue_fast(state, "stats").stdout.splitlines()
    assert stats[-1] == "envelopes=3 unrouted=0 quarantined=2"


def test_purge_delivered_older_than_longer_keeps_all(state: State) -> None:
    r = queue_fast(state, "purge", "delivered", "--older-than", "30d")
    assert r.stdout == "0 delivered envelopes removed\n"
    assert state.blob.exists()
    assert len(state.envelopes()) == 7


def test_purge_quarantine(state: State) -> None:
    assert queue_fast(state, "purge", "quarantine").stdout == "0 quarantined items removed\n"
    assert queue(state, "purge", "quarantine", "--older-than", "0").stdout == (
        "2 quarantined items removed\n"
    )
    assert queue_fast(state, "list", "--quarantine").stdout == "(none)\n"


def test_purge_bad_duration_is_usage_error(state: State) -> None:
    r = queue_fast(state, "purge", "delivered", "--older-than", "a week")
    assert r.returncode == 2
    assert "expected a duration like 30s, 12h, 7d" in r.stderr
