"""MLLP benchmark: fsync cost, durable accept+ACK, end to end, and the no-persistence ceiling.

    .venv/bin/python bench/mllp.py [--messages N] [--quick] [--json FILE]

Runs the real gateway (``python -m gateway.cli run``) as a subprocess on free
loopback ports with a temporary state directory on a real disk, drives it with
sender processes that use their own MLLP framing (``bench/_peers.py``), and
prints one summary table. bench/README.md explains every figure. Never run by
the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers

REPO, PYTHON = _peers.REPO, _peers.PYTHON

TARGET_GROUP_COMMIT = 5.0  # durable 8-connection rate / one-fsync-per-message rate
TARGET_DELIVERED = 2000.0  # ORU/s end to end
SLOW_DISK_CONNECTIONS = (1, 8, 32)  # group commit gives about N/2 messages per fsync


def say(text: str = "") -> None:
    print(text, flush=True)


# -- where the state goes ----------------------------------------------------------------


def mount_of(path: Path) -> tuple[str, str, str]:
    """(mount point, device, fs type) of the filesystem holding ``path``."""
    real = str(path.resolve())
    best = ("/", "?", "?")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype, *_ = line.split()
            mnt = mnt.replace("\\040", " ")
            inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best[0]):
                best = (mnt, dev, fstype)
    return best


def pick_workdir(requested: str | None) -> Path:
    """A scratch folder on a real disk: the temp dir if it shares the repo's filesystem."""
    if requested:
        base = Path(requested)
    else:
        tmp = Path(tempfile.gettempdir())
        same = os.stat(tmp).st_dev == os.stat(REPO).st_dev
        base = tmp if same and mount_of(tmp)[2] not in ("tmpfs", "ramfs") else REPO / "var/bench"
    base.mkdir(parents=True, exist_ok=True)
    if mount_of(base)[2] in ("tmpfs", "ramfs"):
        say(f"WARNING: {base} is on {mount_of(base)[2]}: fsync costs nothing there")
    return Path(tempfile.mkdtemp(prefix="medgw-bench-", dir=base))


# -- 1. the machine's fsync cost -----------------------------------------------------------


def _loop(seconds: float, body: Callable[[int], None]) -> dict[str, float]:
    n, t0 = 0, time.perf_counter()
    deadline = t0 + seconds
    while True:
        body(n)
        n += 1
        now = time.perf_counter()
        if now >= deadline:
            break
    elapsed = now - t0
    return {"n": n, "seconds": elapsed, "per_s": n / elapsed, "us_each": elapsed / n * 1e6}


def probe_disk(work: Path, seconds: float) -> dict[str, Any]:
    """fsync/fdatasync of 3 kB appends, 500 kB files with a folder fsync, SQLite commits."""
    d = work / "probe"
    d.mkdir()
    out: dict[str, Any] = {}
    record = os.urandom(3000)

    for name, sync in (("fsync_3k", os.fsync), ("fdatasync_3k", os.fdatasync)):
        fd = os.open(d / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            out[name] = _loop(
                seconds, lambda _n, fd=fd, sync=sync: (os.write(fd, record), sync(fd))
            )
        finally:
            os.close(fd)

    blob = os.urandom(500 * 1024)
    dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)

    def file_500k(n: int) -> None:
        tmp, final = d / "blob.tmp", d / f"blob{n % 8}"
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        os.fsync(dir_fd)

    try:
        out["file_500k_dirsync"] = _loop(seconds, file_500k)
    finally:
        os.close(dir_fd)

    out["sqlite_single_row"] = probe_sqlite_single_row(d / "single.sqlite", seconds)
    out.update(probe_journal_schema(d, seconds, os.urandom(2500)))
    shutil.rmtree(d, ignore_errors=True)
    return out


def probe_sqlite_single_row(db: Path, seconds: float) -> dict[str, float]:
    """One ~2.5 kB row per transaction, WAL, synchronous=FULL: one fsync per message."""
    body = os.urandom(2500)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE m (seq INTEGER PRIMARY KEY, cid TEXT NOT NULL, body BLOB NOT NULL)")

    def single_row(n: int) -> None:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO m (cid, body) VALUES (?, ?)", (f"C{n:09d}", body))
        conn.execute("COMMIT")

    try:
        return _loop(seconds, single_row)
    finally:
        conn.close()


def probe_journal_schema(d: Path, seconds: float, body: bytes) -> dict[str, Any]:
    """The gateway's own accept transaction (envelope + delivery row, savepoint per op)
    run directly on SQLite, 1 and 8 messages per commit: the writer thread's ceiling."""
    try:
        from gateway.journal import SCHEMA  # noqa: PLC0415 - optional: the schema only
    except ImportError as err:
        return {"journal_schema": {"skipped": str(err)}}
    out: dict[str, Any] = {}
    for per_commit in (1, 8):
        conn = sqlite3.connect(d / f"journal{per_commit}.sqlite", isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.executescript(SCHEMA)
        now = time.time()

        def commit(
            n: int, conn: sqlite3.Connection = conn, k: int = per_commit, now: float = now
        ) -> None:
            conn.execute("BEGIN IMMEDIATE")
            for i in range(n * k, n * k + k):
                conn.execute("SAVEPOINT op")
                key = f"hl7:in:COBAS8000:M{i:09d}"
                conn.execute(
                    "SELECT id FROM envelopes WHERE idem_key = ? AND digest = ? LIMIT 1",
                    (key, "0" * 64),
                ).fetchone()
                cur = conn.execute(
                    "INSERT INTO envelopes (id, kind, source, received_at, idem_key, digest, "
                    "parent_id, headers, size, body, blob) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        f"{i:032x}",
                        "hl7",
                        "in",
                        now,
                        key,
                        "0" * 64,
                        None,
                        "{}",
                        len(body),
                        body,
                        None,
                    ),
                )
                conn.executemany(
                    "INSERT INTO deliveries (seq, destination, state, next_at, updated_at) "
                    "VALUES (?, ?, 'pending', ?, ?)",
                    [(cur.lastrowid, "lis", now, now)],
                )
                conn.execute("RELEASE op")
            conn.execute("COMMIT")

        try:
            r = _loop(seconds, commit)
            r["messages_per_s"] = r["per_s"] * per_commit
            out[f"journal_tx_{per_commit}_per_commit"] = r
        except sqlite3.Error as err:  # the schema moved on: say so, do not fail the run
            out[f"journal_tx_{per_commit}_per_commit"] = {"skipped": str(err)}
        finally:
            conn.close()
    return out


def measure_disk(work: Path, probe_s: float, wait_s: float) -> dict[str, Any]:
    quiet = _peers.wait_quiet(wait_s)
    out: dict[str, Any] = probe_disk(work, probe_s)
    for k, v in out.items():
        if "per_s" in v:
            say(
                f"  {k:<28} {fmt_rate(v.get('messages_per_s', v['per_s'])):>8}/s "
                f"({v['us_each']:.0f} µs per commit/sync)"
            )
        else:
            say(f"  {k:<28} {v}")
    return out | quiet


def best_disk(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per probe, the faster of two samples: the disk's cost, not the neighbours'."""
    out = {}
    for k in a.keys() | b.keys():
        x, y = a.get(k), b.get(k)
        if not isinstance(x, dict) or not isinstance(y, dict) or "per_s" not in y:
            out[k] = x if isinstance(x, dict) else y
        elif "per_s" not in x:
            out[k] = y
        else:
            out[k] = x if x["per_s"] >= y["per_s"] else y
    return out


# -- 2. durable accept + ACK ---------------------------------------------------------------


def bench_accept(
    work: Path,
    name: str,
    conns: int,
    total: int,
    warmup: int,
    *,
    level: str = "WARNING",
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    with _peers.gateway_without_delivery(work, name, level=level, env=env) as gw:
        r = _peers.drive(gw.port, conns, total, warmup, watch_pid=gw.pid)
        m = gw.metrics()
        r["journaled"] = m.get('medgw_messages_received_total{listener="in"}', 0.0)
        r["expected_journaled"] = total + conns * warmup
        gw.stop()
        r |= gw.log_stats()
    r.pop("cpu_before", None)
    return r


def bench_syncs(work: Path, name: str, conns: int, total: int, warmup: int) -> dict[str, Any]:
    """Accept run under ``strace -c`` (seccomp filter: only fsync/fdatasync stop):
    syncs per message, the physical proof of group commit."""
    if not shutil.which("strace"):
        return {"skipped": "strace is not installed"}
    trace = work / f"{name}.strace"
    try:
        with _peers.gateway_without_delivery(work, name, strace=trace) as gw:
            r = _peers.drive(gw.port, conns, total, warmup)
            gw.stop()
    except RuntimeError as err:
        return {"skipped": f"strace run failed: {err}"}
    syncs = {}
    for line in trace.read_text().splitlines():
        parts = line.split()
        if parts and parts[-1] in ("fsync", "fdatasync"):
            syncs[parts[-1]] = int(parts[3])  # % time, seconds, usecs/call, calls
    messages = total + conns * warmup
    n = sum(syncs.values())
    return {
        "connections": conns,
        "messages": messages,
        "syncs": syncs,
        "syncs_per_message": n / messages,
        "messages_per_sync": messages / n if n else 0.0,
        "per_s_under_strace": r["per_s"],
    }


# -- 6. an emulated slow disk -------------------------------------------------------------

SLOW_SYNC_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
static long delay_ns = -1;
static void slow(void) {
    if (delay_ns < 0) {
        const char *e = getenv("BENCH_FSYNC_DELAY_US");
        delay_ns = e ? atol(e) * 1000L : 0;
    }
    if (delay_ns > 0) {
        struct timespec ts = {delay_ns / 1000000000L, delay_ns % 1000000000L};
        nanosleep(&ts, NULL);
    }
}
#define WRAP(name) int name(int fd) { \
    static int (*real)(int); \
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, #name); \
    int r = real(fd); slow(); return r; }
WRAP(fsync)
WRAP(fdatasync)
"""


def slow_disk_env(work: Path, delay_ms: float) -> dict[str, str] | str:
    """LD_PRELOAD settings that add ``delay_ms`` to every fsync/fdatasync (SQLite's
    too): a disk without a write-back cache. A str says why that is not available."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler to build the fsync shim"
    src, lib = work / "slowsync.c", work / "slowsync.so"
    src.write_text(SLOW_SYNC_C)
    done = subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src), "-ldl"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        return f"cannot build the fsync shim: {done.stderr.strip()[:200]}"
    return {"LD_PRELOAD": str(lib), "BENCH_FSYNC_DELAY_US": str(int(delay_ms * 1000))}


def bench_slow_disk(
    work: Path, delay_ms: float, total: int, warmup: int, probe_s: float
) -> dict[str, Any]:
    """Sections 1 and 2 again with ``delay_ms`` added to every fsync, and with 32
    connections too: how group commit scales when the disk is the limit."""
    env = slow_disk_env(work, delay_ms)
    if isinstance(env, str):
        return {"skipped": env}
    probe = subprocess.run(
        [PYTHON, __file__, "--probe-sqlite", str(work / "slow.sqlite"), str(probe_s)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    out: dict[str, Any] = {"delay_ms": delay_ms, "sqlite_single_row": json.loads(probe.stdout)}
    for c in SLOW_DISK_CONNECTIONS:
        out[str(c)] = quietest(
            lambda c=c: bench_accept(work, f"slow{c}", c, total, warmup, env=env)
        )
    return out


# -- 3. end to end -------------------------------------------------------------------------


def bench_e2e(
    work: Path, name: str, conns: int, total: int, warmup: int, *, profile: Path | None = None
) -> dict[str, Any]:
    port_q, rres, stop = _peers.MP.Queue(), _peers.MP.Queue(), _peers.MP.Event()
    counts = _peers.MP.RawArray("q", 2)  # warm-up, measured messages at the receiver
    recv = _peers.MP.Process(
        target=_peers.receiver_main,
        args=(total, port_q, rres, counts, stop),
        name="receiver",
        daemon=True,
    )
    recv.start()
    try:
        rport = port_q.get(timeout=30)
        destination = {
            "id": "lis",
            "type": "hl7-mllp",
            "connect": f"127.0.0.1:{rport}",
            "delivery": {"ordered": True, "workers": 1},
        }
        with _peers.GatewayProc(work, name, destination=destination, profile=profile) as gw:

            def warm_delivered() -> None:
                deadline = time.monotonic() + 120
                while counts[0] < conns * warmup:
                    if time.monotonic() > deadline:
                        raise RuntimeError("warm-up messages were not delivered")
                    time.sleep(0.02)

            r = _peers.drive(
                gw.port,
                conns,
                total,
                warmup,
                before_go=warm_delivered,
                watch_pid=gw.pid,
                other_pids=(recv.pid or 0,),
                sample=lambda: counts[1],
            )
            rx = rres.get(timeout=max(120.0, total / 50))
            cpu_done = _peers.proc_cpu(gw.pid)
            m = gw.metrics()
            gw.stop()
            r |= gw.log_stats()
        delivered_wall = rx["t_done"] - r["t0"]
        r |= {
            "delivered_per_s": total / delivered_wall,
            "delivered_seconds": delivered_wall,
            "accepted_per_s": r.pop("per_s"),
            "backlog_when_senders_done": total - _at(r["timeline"], r["seconds"]),
            "receiver": rx,
            "delivered_metric": m.get('medgw_messages_delivered_total{destination="lis"}', 0.0),
        }
        r |= {
            f"e2e_{k}": v
            for k, v in _peers.cpu_split(gw.pid, r["cpu_before"], cpu_done, delivered_wall).items()
        }
        r.pop("cpu_before", None)
        return r
    finally:
        stop.set()
        recv.join(timeout=5)
        if recv.is_alive():
            recv.terminate()
            recv.join()


def _at(timeline: list[tuple[float, int, int]], t: float) -> int:
    """Receiver's measured count at the last sample before ``t``."""
    seen = 0
    for when, _, received in timeline:
        if when <= t:
            seen = received
    return seen


def profile_top(path: Path, messages: int, n: int = 15) -> dict[str, list[dict[str, Any]]]:
    """The top ``n`` functions by cumulative and by own time, per message.

    Frames that merely wrap the whole run (``runpy``, ``main``, ``asyncio.run``,
    ``run_forever``, ``_run_once``: over 90% of the total) are left out of the
    cumulative list: they say nothing about where a message's time goes.
    """
    raw = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in raw.items():
        where = "/".join(Path(file).parts[-2:]) + f":{line}" if line else file
        rows.append(
            {
                "function": f"{func} ({where})",
                "ncalls": nc if nc == cc else f"{nc}/{cc}",
                "tottime_s": tt,
                "cumtime_s": ct,
                "tottime_us_per_msg": tt / messages * 1e6,
                "cumtime_us_per_msg": ct / messages * 1e6,
            }
        )
    total = max(r["cumtime_s"] for r in rows)
    inner = [r for r in rows if r["cumtime_s"] < 0.9 * total]
    return {
        "cumulative": sorted(inner, key=lambda r: -r["cumtime_s"])[:n],
        "tottime": sorted(rows, key=lambda r: -r["tottime_s"])[:n],
    }


# -- 4. the no-persistence ceiling ---------------------------------------------------------


def bench_echo(conns: int, total: int, warmup: int) -> dict[str, Any]:
    port_q, stop = _peers.MP.Queue(), _peers.MP.Event()
    echo = _peers.MP.Process(target=_peers.echo_main, args=(port_q, stop), name="echo", daemon=True)
    echo.start()
    try:
        port = port_q.get(timeout=30)
        r = _peers.drive(port, conns, total, warmup, watch_pid=echo.pid or 0)
        r.pop("cpu_before", None)
        return r
    finally:
        stop.set()
        echo.join(timeout=5)
        if echo.is_alive():
            echo.terminate()
            echo.join()


tries = 2  # set by main (--tries)


def quietest(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run again (up to ``tries`` times in all) while other processes disturbed the run;
    keep the least disturbed result. The machine is shared: say so, do not hide it."""
    best: dict[str, Any] | None = None
    for attempt in range(1, tries + 1):
        r = run()
        r["attempt"] = attempt
        if best is None or r.get("foreign_cores", 0.0) < best.get("foreign_cores", 0.0):
            best = r
        if r.get("foreign_cores", 0.0) < _peers.NOISY_CORES:
            break
    assert best is not None
    return best


# -- report --------------------------------------------------------------------------------


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def line_for(label: str, r: dict[str, Any], extra: str = "") -> str:
    if "skipped" in r:
        return f"  {label:<44} skipped: {r['skipped']}"
    return (
        f"  {label:<44} {fmt_rate(r['per_s']):>8} msg/s  p50 {r['lat_p50_ms']:.2f} ms"
        f"  p99 {r['lat_p99_ms']:.2f} ms  gw loop {r['loop_cores']:.2f} + other "
        f"{r['other_threads_cores']:.2f} cores, senders {r['sender_cores']:.2f}{extra}" + noisy(r)
    )


def noisy(r: dict[str, Any]) -> str:
    """A warning when something else on the machine used CPU during the run."""
    f = r.get("foreign_cores", 0.0)
    return f"  [!] {f:.2f} cores used by other processes" if f >= 0.15 else ""


def print_profile(top: dict[str, list[dict[str, Any]]]) -> None:
    for key in ("cumulative", "tottime"):
        say(f"  top 15 by {key} (event-loop thread only; µs per delivered message):")
        say(
            f"    {'ncalls':>10} {'tottime':>8} {'cumtime':>8} {'tt/msg':>7} {'ct/msg':>7}"
            "  function"
        )
        for r in top[key]:
            say(
                f"    {r['ncalls']!s:>10} {r['tottime_s']:8.3f} {r['cumtime_s']:8.3f} "
                f"{r['tottime_us_per_msg']:7.1f} {r['cumtime_us_per_msg']:7.1f}  {r['function']}"
            )


def summarize(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, value, note) rows of the summary table."""
    rows: list[tuple[str, str, str]] = []

    def add(figure: str, value: str, note: str = "") -> None:
        rows.append((figure, value, note))

    def verdict(value: float, target: float) -> str:
        return "PASS" if value >= target else "FAIL"

    disk, accept, echo = res["disk"], res["accept"], res["echo"]
    one_fsync = disk["sqlite_single_row"]["per_s"]
    for key, label in (
        ("fsync_3k", "fsync, 3 kB append"),
        ("fdatasync_3k", "fdatasync, 3 kB append"),
        ("file_500k_dirsync", "500 kB file + fsync + rename + dir fsync"),
    ):
        add(label, f"{fmt_rate(disk[key]['per_s'])}/s", f"{disk[key]['us_each']:.0f} µs each")
    add(
        "SQLite WAL FULL, 1-row INSERT+COMMIT",
        f"{fmt_rate(one_fsync)}/s",
        "= one-fsync-per-message",
    )
    for k in (1, 8):
        j = disk.get(f"journal_tx_{k}_per_commit", {})
        if "messages_per_s" in j:
            add(
                f"journal tx, {k} msg/commit, no event loop",
                f"{fmt_rate(j['messages_per_s'])}/s",
                "what the writer thread could do alone",
            )
    for c in (1, 8):
        a, e = accept.get(str(c)), echo.get(str(c))
        if a:
            add(
                f"durable accept+ACK, {c} conn",
                f"{fmt_rate(a['per_s'])}/s",
                f"p50 {a['lat_p50_ms']:.2f} ms, {a['disk_bytes_per_msg'] / 1024:.1f} kB "
                f"written per {a['message_bytes_avg'] / 1024:.1f} kB message" + noisy(a),
            )
        if e:
            add(
                f"no-persistence echo ceiling, {c} conn",
                f"{fmt_rate(e['per_s'])}/s",
                f"p50 {e['lat_p50_ms']:.2f} ms" + noisy(e),
            )
    info = res.get("accept_info")
    if info and "8" in accept:
        change = info["per_s"] / accept["8"]["per_s"] - 1
        add(
            "durable accept+ACK, 8 conn, log INFO",
            f"{fmt_rate(info['per_s'])}/s",
            f"{change:+.0%} vs WARNING" + noisy(info),
        )
    e2e = res.get("e2e")
    if e2e:
        add(
            f"end to end delivered, {e2e['connections']} senders, ordered",
            f"{fmt_rate(e2e['delivered_per_s'])}/s",
            f"target ≥ {TARGET_DELIVERED:,.0f}: "
            f"{verdict(e2e['delivered_per_s'], TARGET_DELIVERED)}" + noisy(e2e),
        )
        add(
            "  accepted during that run",
            f"{fmt_rate(e2e['accepted_per_s'])}/s",
            f"backlog {e2e['backlog_when_senders_done']:,} when the senders finished",
        )
    if "8" in accept:
        ratio = accept["8"]["per_s"] / one_fsync
        add(
            "durable 8 conn ÷ one-fsync-per-message",
            f"{ratio:.2f}x",
            f"target ≥ {TARGET_GROUP_COMMIT:g}x: {verdict(ratio, TARGET_GROUP_COMMIT)}",
        )
    if "8" in echo:
        add(
            "  bound here: echo 8 conn ÷ one-fsync",
            f"{echo['8']['per_s'] / one_fsync:.2f}x",
            "no gateway, however fast, can beat this",
        )
    for c in (1, 8):
        a, e = accept.get(str(c)), echo.get(str(c))
        if a and e:
            add(f"durable ÷ no-persistence ceiling, {c} conn", f"{a['per_s'] / e['per_s']:.0%}")
    for c, s in res.get("syncs", {}).items():
        if "skipped" in s:
            add(f"messages per fsync, {c} conn", "n/a", s["skipped"])
        else:
            add(
                f"messages per fsync (strace), {c} conn",
                f"{s['messages_per_sync']:.2f}",
                f"{sum(s['syncs'].values()):,} syncs for {s['messages']:,} messages",
            )
    slow = res.get("slow_disk")
    if slow and "skipped" not in slow:
        base = slow["sqlite_single_row"]["per_s"]
        tag = f"slow disk (+{slow['delay_ms']:g} ms)"
        add(f"{tag}: 1-row commit", f"{fmt_rate(base)}/s", "= one-fsync-per-message")
        for c in SLOW_DISK_CONNECTIONS:
            a = slow[str(c)]
            add(
                f"{tag}: durable {c} conn",
                f"{fmt_rate(a['per_s'])}/s",
                f"{a['per_s'] / base:.2f}x one-fsync" + noisy(a),
            )
    return rows


def code_version() -> dict[str, Any]:
    """The commit measured, and product files changed since (others edit as we run)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--", "gateway", "drivers", "pyproject.toml")
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": dirty.splitlines()}


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, help="messages per measured run (default 20000)")
    p.add_argument("--quick", action="store_true", help="small runs: a smoke test, not figures")
    p.add_argument("--json", metavar="FILE", help="also write every result as JSON")
    p.add_argument("--workdir", help="scratch folder (default: temp dir if on the repo's disk)")
    p.add_argument("--e2e-connections", type=int, default=8)
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile'd e2e run")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument(
        "--slow-disk-ms",
        type=float,
        default=2.0,
        help="also run with this much added to every fsync (LD_PRELOAD shim; 0: skip)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=30.0,
        metavar="S",
        help="before each run wait up to S seconds for the machine to go idle (default 30)",
    )
    p.add_argument(
        "--tries",
        type=int,
        default=2,
        help="runs disturbed by other processes are repeated, up to this many in all",
    )
    p.add_argument("--probe-sqlite", nargs=2, metavar=("DB", "SECONDS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _peers.quiet_wait_s = args.wait_quiet
    global tries  # noqa: PLW0603 - one setting for the whole run
    tries = max(1, args.tries)
    if args.probe_sqlite:  # bench_slow_disk runs this under the fsync shim
        db, seconds = Path(args.probe_sqlite[0]), float(args.probe_sqlite[1])
        print(json.dumps(probe_sqlite_single_row(db, seconds)))
        return 0
    total = args.messages or (2000 if args.quick else 20000)
    warmup = 20 if args.quick else 100
    probe_s = 0.5 if args.quick else 2.0

    work = pick_workdir(args.workdir)
    out_dir = REPO / "bench/out"
    out_dir.mkdir(parents=True, exist_ok=True)
    mnt, dev, fstype = mount_of(work)
    res: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "state_fs": f"{dev} {fstype} on {mnt}",
            "loadavg_start": os.getloadavg(),
        },
        "code": code_version(),
        "messages": total,
        "warmup_per_connection": warmup,
        "accept": {},
        "echo": {},
    }
    say(
        f"medgw MLLP bench: {total:,} messages per run, {warmup} warm-up per connection, "
        f"{os.cpu_count()} CPUs, state in {work} ({dev} {fstype}), "
        f"code {res['code']['commit']}{' + local changes' if res['code']['dirty'] else ''}"
    )
    try:
        say("\n1. the machine's fsync cost (probed again at the end; the better one counts)")
        res["disk_start"] = measure_disk(work, probe_s, args.wait_quiet)

        say("\n4. no-persistence ceiling: own asyncio echo-ACK server, no gateway")
        for c in (1, 8):
            res["echo"][str(c)] = r = quietest(lambda c=c: bench_echo(c, total, warmup))
            say(line_for(f"echo, {c} conn", r).replace("gw loop", "server loop"))

        say("\n2. durable accept+ACK: gateway, destination never reachable, log WARNING")
        for c in (1, 8):
            res["accept"][str(c)] = r = quietest(
                lambda c=c: bench_accept(work, f"accept{c}", c, total, warmup)
            )
            say(line_for(f"accept, {c} conn", r, f"  journaled {r['journaled']:,.0f}"))
        res["accept_info"] = r = quietest(
            lambda: bench_accept(work, "accept8-info", 8, total, warmup, level="INFO")
        )
        say(line_for("accept, 8 conn, log INFO", r, f"  log {r['log_lines']:,} lines"))

        say("\n   group commit: fsync/fdatasync calls of the gateway under strace")
        res["syncs"] = {}
        for c in (1, 8):
            res["syncs"][str(c)] = s = bench_syncs(
                work, f"syncs{c}", c, max(total // 4, 500), warmup
            )
            say(f"  {c} conn: {s}")

        say(
            f"\n3. end to end: {args.e2e_connections} senders -> gateway -> own MLLP receiver "
            "(ordered, 1 worker)"
        )
        res["e2e"] = r = quietest(
            lambda: bench_e2e(work, "e2e", args.e2e_connections, total, warmup)
        )
        say(
            f"  delivered {fmt_rate(r['delivered_per_s'])}/s ({r['delivered_seconds']:.1f} s), "
            f"accepted {fmt_rate(r['accepted_per_s'])}/s, receiver {r['receiver']}, "
            f"gw loop {r['e2e_loop_cores']:.2f} + other {r['e2e_other_threads_cores']:.2f} cores"
        )
        if not args.no_profile:
            prof = out_dir / "mllp-e2e.prof"
            r = bench_e2e(work, "e2e-profile", args.e2e_connections, total, warmup, profile=prof)
            res["e2e_profiled"] = {k: r[k] for k in ("delivered_per_s", "accepted_per_s")}
            res["profile"] = top = profile_top(prof, total + args.e2e_connections * warmup)
            say(
                f"\n   the same under cProfile ({prof.relative_to(REPO)}): delivered "
                f"{fmt_rate(r['delivered_per_s'])}/s, accepted {fmt_rate(r['accepted_per_s'])}/s"
            )
            print_profile(top)

        if args.slow_disk_ms > 0:
            say(f"\n6. emulated slow disk: {args.slow_disk_ms:g} ms added to every fsync")
            slow_n = max(total // 4, 500)
            res["slow_disk"] = r = bench_slow_disk(work, args.slow_disk_ms, slow_n, warmup, probe_s)
            if "skipped" in r:
                say(f"  skipped: {r['skipped']}")
            else:
                say(f"  SQLite 1-row commits {fmt_rate(r['sqlite_single_row']['per_s'])}/s")
                for c in SLOW_DISK_CONNECTIONS:
                    say(line_for(f"accept, {c} conn, slow disk", r[str(c)]))

        say("\n1'. the machine's fsync cost, again")
        res["disk_end"] = measure_disk(work, probe_s, args.wait_quiet)
    finally:
        if args.keep:
            say(f"\nscratch kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    res["disk"] = best_disk(res.get("disk_start", {}), res.get("disk_end", {}))
    say("\n5. summary")
    rows = summarize(res)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for figure, value, note in rows:
        say(f"  {figure:<{w0}}  {value:>{w1}}  {note}")
    say("  (senders and gateway share the same 2 cores; see bench/README.md)")
    res["summary"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
        say(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
