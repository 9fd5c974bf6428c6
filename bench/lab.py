"""Lab analyzer benchmark: many ASTM analyzers at line rate -> gateway -> ORU to a LIS.

    .venv/bin/python bench/lab.py [--duration S] [--serial N] [--tcp N] [--quick] [--json FILE]

Runs the real gateway (``python -m gateway.cli run``) as a subprocess with one
``astm`` listener per simulated analyzer: ``--serial`` of them on socat pty pairs
(``transport: {serial: <pty>, baudrate: 9600}``), ``--tcp`` on loopback
(``tcp_listen``), profiles sysmex-xn, roche-cobas-c311, roche-cobas-e411 and
generic-astm in turn, and one route ``{match: {kind: lab-result}, steps: [map-codes,
hl7-oru], to: [lis]}`` to an MLLP receiver process of this script that ACKs at once
and records when each ORU arrived. The analyzers are the independent fake of
``tests/fakes/analyzer.py`` (two processes: serial, TCP), replaying the real captures
in ``/work/shared/samples/lab`` with a new sample id in every message, back to back
for ``--duration`` seconds, every byte paced at 9600 baud (TCP too: serial-over-IP
boxes). Prints one summary table with PASS/FAIL; bench/README.md explains it.
Never run by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers

REPO, PYTHON, TICK = _peers.REPO, _peers.PYTHON, _peers.TICK
SAMPLES = Path("/work/shared/samples/lab")
BAUDRATE = 9600
LINE_RATE = BAUDRATE / 10  # bytes/s at 8N1: 960
TARGET_P99_MS = 250.0  # analyzer's last frame -> ORU at the LIS
TARGET_CPU = 0.25  # gateway, cores (25% of one)
READY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 60.0  # after the analyzers stop, for the last ORUs to reach the LIS


@dataclass(frozen=True)
class Template:
    """A real capture and the sample id in its O record (replaced in every message)."""

    profile: str
    capture: str
    sample_id: bytes  # as it appears in the O record (first occurrence is replaced)


# four analyzer types in turn; each profile reads its sample id where the capture has it
TEMPLATES = (
    Template("sysmex-xn", "04_astm_sysmex_xn550.frame", b"                    27"),  # O.4.3
    Template("roche-cobas-c311", "06_astm_roche_cobas_c311.frame", b"CL-PL-24-0370"),  # O.3.2
    Template("roche-cobas-e411", "07_astm_roche_cobas_e411_session.bin", b"000000-00-0001"),
    Template("generic-astm", "02_astm_horiba_pentra_xlr.frames", b"S1234"),  # O.3.1
)


# one row per message sent, in the analyzers' results and the JSON
MESSAGE_FIELDS = (
    "sample_id",
    "last_frame_sent_monotonic",
    "last_frame_ack_s",
    "ok",
    "aborted",
    "naks",
    "retransmissions",
    "enq_refusals",
    "intermediate_ack_max_s",
    "frames",
)


def say(text: str = "") -> None:
    print(text, flush=True)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def sample_id_for(analyzer: int, seq: int) -> str:
    return f"B{analyzer:02d}S{seq:06d}"


def with_sample_id(text: bytes, template: Template, sample_id: str) -> bytes:
    """The message with ``sample_id`` in place of the capture's, in the O record only."""
    start = text.index(b"\rO|") + 1
    end = text.index(b"\r", start)
    new = sample_id.encode()
    if template.sample_id.startswith(b" "):  # a fixed-width, right-aligned field: keep it so
        new = new.rjust(len(template.sample_id))
    record = text[start:end].replace(template.sample_id, new, 1)
    return text[:start] + record + text[end:]


def load_templates() -> list[bytes]:
    """The first message of each capture; fails loudly if a sample id is not where expected."""
    sys.path.insert(0, str(REPO / "tests"))
    from fakes.analyzer import sample_messages  # noqa: PLC0415 - the test tree, on demand

    texts = []
    for t in TEMPLATES:
        text = sample_messages(SAMPLES / t.capture)[0]
        o_start = text.index(b"\rO|") + 1
        o_record = text[o_start : text.index(b"\r", o_start)]
        if o_record.count(t.sample_id) != 1:
            raise RuntimeError(f"{t.capture}: sample id {t.sample_id!r} not once in the O record")
        texts.append(text)
    return texts


# -- the LIS: an MLLP receiver that records arrival times ---------------------------------


def serve_lis(port: int, record: Path) -> int:
    """``--serve-lis PORT FILE``: ACK (AA) every message at once; append one line per
    message: ``<monotonic arrival> TAB <MSH-10> TAB <OBR-3.1,...>`` (line-buffered)."""

    async def main() -> None:
        out = record.open("a", buffering=1, encoding="utf-8")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = bytearray()
            try:
                while data := await reader.read(65536):
                    buf.extend(data)
                    for message in _peers.take_frames(buf):
                        now = time.monotonic()
                        writer.write(_peers.ack_for(message))
                        await writer.drain()
                        cid = _peers.msh_control_id(message).decode(errors="replace")
                        sids = [
                            seg.split(b"|")[3].split(b"^")[0].decode(errors="replace")
                            for seg in message.split(b"\r")
                            if seg.startswith(b"OBR|") and seg.count(b"|") >= 3
                        ]
                        out.write(f"{now:.6f}\t{cid}\t{','.join(sids)}\n")
            except ConnectionError:
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", port)
        async with server:
            await stop.wait()
        out.close()

    asyncio.run(main())
    return 0


def read_lis(record: Path) -> list[tuple[float, str, list[str]]]:
    rows = []
    with contextlib.suppress(FileNotFoundError):
        for line in record.read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                rows.append((float(parts[0]), parts[1], [s for s in parts[2].split(",") if s]))
    return rows


# -- the analyzers: the fake of tests/fakes, one process per transport kind ----------------


def serve_analyzers(spec_path: Path) -> int:
    """``--serve-analyzers SPEC``: open every line, print ``ready``, read the start time
    (monotonic) from stdin, stream until start + duration, write the results JSON."""
    spec = json.loads(spec_path.read_text())
    sys.path.insert(0, str(REPO / "tests"))
    from fakes import analyzer as fake  # noqa: PLC0415 - the test tree, in this process only

    texts = load_templates()
    opened: list[asyncio.Event] = []
    go = asyncio.Event()
    start: dict[str, float] = {}

    async def stream(a: dict[str, Any], opened: asyncio.Event) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if a["kind"] == "serial":
            reader, writer = await fake.open_serial_stream(a["path"], BAUDRATE, pace=True)
        else:
            reader, writer = await fake.open_tcp_stream("127.0.0.1", a["port"], baudrate=BAUDRATE)
        wire: list[Any] = []
        analyzer = fake.FakeAnalyzer(reader, writer, log=wire)
        opened.set()
        await go.wait()
        t0 = start["t0"]
        deadline = t0 + spec["duration"]
        await asyncio.sleep(max(0.0, t0 - loop.time()))
        template = TEMPLATES[a["template"]]
        rows: list[list[Any]] = []
        tx_bytes, seq, end = 0, 0, t0
        try:
            while loop.time() < deadline:
                seq += 1
                sid = sample_id_for(a["index"], seq)
                wire.clear()
                r = await analyzer.send_message(with_sample_id(texts[a["template"]], template, sid))
                end = loop.time()
                frames = [e for e in wire if e.direction == "tx" and e.data[:1] == b"\x02"]
                tx_bytes += sum(len(e.data) for e in wire if e.direction == "tx")
                rows.append(
                    [
                        sid,
                        frames[-1].t if frames else None,  # the last frame's last byte left
                        r.last_frame_ack_s if r.ok else None,
                        r.ok,
                        r.aborted,
                        r.naks + r.other_replies,
                        r.retransmissions,
                        r.enq_naks + r.contentions,
                        max(r.ack_latencies_s[:-1], default=0.0),  # intermediate frames
                        len(frames),
                    ]
                )
                if r.aborted and "line lost" in r.aborted:
                    break
        finally:
            await analyzer.close()
        return {
            "index": a["index"],
            "kind": a["kind"],
            "profile": template.profile,
            "messages": rows,
            "tx_bytes": tx_bytes,
            "seconds": end - t0,
        }

    async def run() -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        tasks = []
        for a in spec["analyzers"]:
            opened.append(asyncio.Event())
            tasks.append(asyncio.create_task(stream(a, opened[-1]), name=f"analyzer-{a['index']}"))
        waiting = asyncio.gather(*(e.wait() for e in opened))
        done, _ = await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if waiting not in done:  # a line failed to open: its exception ends the process
            for t in done:
                t.result()
        print("ready", flush=True)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        start["t0"] = float(line)
        go.set()
        return list(await asyncio.gather(*tasks))

    cpu0 = time.process_time()
    results = asyncio.run(run())
    Path(spec["out"]).write_text(
        json.dumps({"analyzers": results, "cpu_s": time.process_time() - cpu0})
    )
    return 0


# -- processes around the gateway ------------------------------------------------------------


def pick_workdir() -> Path:
    """A scratch folder on the repo's disk (the journal fsyncs: never tmpfs)."""
    tmp = Path(tempfile.gettempdir())
    base = tmp if os.stat(tmp).st_dev == os.stat(REPO).st_dev else REPO / "var/bench"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="medgw-lab-", dir=base))


def stop_pid(proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """SIGTERM by pid, then SIGKILL by pid if it lingers; a no-op once it is gone."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def pid_cpu(pid: int) -> float:
    """CPU seconds (utime + stime, all threads, living and ended) of ``pid``; 0 once gone."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / TICK
    return 0.0


def wait_until(check: Any, timeout_s: float, what: str, proc: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.02)


def start_pty_pair(work: Path, n: int) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """A socat null-modem cable: (process, gateway end, analyzer end)."""
    gw_end, an_end = work / f"tty-gw{n:02d}", work / f"tty-an{n:02d}"
    log = work / f"socat{n:02d}.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            ["socat", "-d", "-d", f"pty,raw,echo=0,link={gw_end}", f"pty,raw,echo=0,link={an_end}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    wait_until(
        lambda: (
            gw_end.exists()
            and an_end.exists()
            and b"starting data transfer loop" in log.read_bytes()
        ),
        10,
        f"socat pair {n}",
        proc,
    )
    return proc, gw_end, an_end


class LabGateway(_peers.GatewayProc):
    """``medgw run`` with one astm listener per analyzer and the lab-result route."""

    def __init__(
        self, work: Path, listeners: list[dict[str, Any]], lis_port: int, level: str
    ) -> None:
        lis = {"id": "lis", "type": "hl7-mllp", "connect": f"127.0.0.1:{lis_port}"}
        super().__init__(work, "gateway", destination=lis, level=level)
        config = {
            "site": {"id": "bench-lab"},
            "state_dir": str(self.dir / "state"),
            "http": {"listen": f"127.0.0.1:{self.http_port}"},
            "journal": {"min_free_mb": 256},
            "logging": {"level": level, "format": "text"},
            "listeners": listeners,
            "destinations": [lis],
            "routes": [
                {"match": {"kind": "lab-result"}, "steps": ["map-codes", "hl7-oru"], "to": ["lis"]}
            ],
        }
        self.config_path.write_text(json.dumps(config, indent=1))  # JSON is YAML

    def problems(self, limit: int = 30) -> tuple[int, list[str]]:
        """WARNING-or-worse lines of the gateway's log: how many, and the first ``limit``."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        bad = [x for x in lines if re.search(r" (?:WARNING|ERROR|CRITICAL) |Traceback", x)]
        return len(bad), bad[:limit]


def start_analyzers(
    work: Path, kind: str, analyzers: list[dict[str, Any]], duration: float
) -> tuple[subprocess.Popen[str], Path]:
    spec, out = work / f"analyzers-{kind}.json", work / f"analyzers-{kind}.out.json"
    spec.write_text(json.dumps({"analyzers": analyzers, "duration": duration, "out": str(out)}))
    log = (work / f"analyzers-{kind}.log").open("w")
    proc = subprocess.Popen(
        [PYTHON, __file__, "--serve-analyzers", str(spec)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,
    )
    log.close()
    return proc, out


def wait_ready(proc: subprocess.Popen[str], what: str, log: Path) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"{what} analyzers did not open their lines ({line!r}):\n{tail}")


# -- one run -------------------------------------------------------------------------------


def run_bench(work: Path, n_serial: int, n_tcp: int, duration: float, level: str) -> dict:
    """Start everything, stream for ``duration``, wait for the ORUs, stop everything."""
    res: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        socats = []
        listeners: list[dict[str, Any]] = []
        specs: dict[str, list[dict[str, Any]]] = {"serial": [], "tcp": []}
        for i in range(n_serial + n_tcp):
            t = i % len(TEMPLATES)
            lid = f"an{i + 1:02d}-{TEMPLATES[t].profile}"
            a: dict[str, Any] = {"index": i + 1, "template": t, "listener": lid}
            if i < n_serial:
                proc, gw_end, an_end = start_pty_pair(work, i + 1)
                socats.append(proc)
                stack.callback(stop_pid, proc)
                transport: dict[str, Any] = {"serial": str(gw_end), "baudrate": BAUDRATE}
                a |= {"kind": "serial", "path": str(an_end)}
            else:
                port = _peers.free_port()
                transport = {"tcp_listen": f"127.0.0.1:{port}"}
                a |= {"kind": "tcp", "port": port}
            listeners.append(
                {"id": lid, "type": "astm", "profile": TEMPLATES[t].profile, "transport": transport}
            )
            specs[a["kind"]].append(a)

        lis_port, lis_record = _peers.free_port(), work / "lis.tsv"
        with (work / "lis.log").open("wb") as log:
            lis = subprocess.Popen(
                [PYTHON, __file__, "--serve-lis", str(lis_port), str(lis_record)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        stack.callback(stop_pid, lis)
        wait_until(lambda: port_open(lis_port), 20, "LIS receiver", lis)

        gw = LabGateway(work, listeners, lis_port, level)
        stack.callback(gw.stop)
        gw.__enter__()
        res["gateway_config"] = str(gw.config_path)

        analyzers = []
        for kind, group in specs.items():
            if group:
                proc, out = start_analyzers(work, kind, group, duration)
                stack.callback(stop_pid, proc)
                analyzers.append((kind, proc, out))
        for kind, proc, _ in analyzers:
            wait_ready(proc, kind, work / f"analyzers-{kind}.log")

        res |= _peers.wait_quiet(_peers.quiet_wait_s)
        idle_s = 3.0
        c0, w0 = pid_cpu(gw.pid), time.monotonic()
        time.sleep(idle_s)
        res["gateway_idle_cores"] = (pid_cpu(gw.pid) - c0) / (time.monotonic() - w0)

        t0 = time.monotonic() + 0.5
        for _, proc, _ in analyzers:
            assert proc.stdin is not None
            proc.stdin.write(f"{t0!r}\n")
            proc.stdin.flush()
        ours = [lis.pid] + [p.pid for p in socats]  # alive all along (analyzers: their own)
        time.sleep(max(0.0, t0 - time.monotonic()))
        gw_cpu0, ours0, busy0 = gw.cpu(), sum(pid_cpu(p) for p in ours), _peers.machine_busy()
        gw_total0 = pid_cpu(gw.pid)

        # the analyzers stream; then every message the gateway ACKed must reach the LIS
        deadline = t0 + duration + 60
        while any(p.poll() is None for _, p, _ in analyzers):
            if time.monotonic() > deadline:
                raise RuntimeError("the analyzers did not finish in time")
            time.sleep(0.1)
        for kind, proc, _ in analyzers:
            if proc.returncode:
                log = (work / f"analyzers-{kind}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{kind} analyzers exited {proc.returncode}:\n{log}")
        lines = []
        for _, _, out in analyzers:
            lines += json.loads(out.read_text())["analyzers"]
        ours_cpu_analyzers = sum(json.loads(o.read_text())["cpu_s"] for _, _, o in analyzers)
        acked = {m[0] for a in lines for m in a["messages"] if m[3]}
        t_analyzers_done = time.monotonic()

        def all_there() -> bool:
            seen = {s for _, _, sids in read_lis(lis_record) for s in sids}
            return acked <= seen

        drain_deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while not all_there() and time.monotonic() < drain_deadline:
            time.sleep(0.05)
        t_end = time.monotonic()
        gw_total1, gw_cpu1 = pid_cpu(gw.pid), gw.cpu()
        ours1, busy1 = sum(pid_cpu(p) for p in ours), _peers.machine_busy()
        wall = t_end - t0
        try:
            res["metrics"] = {
                k: v
                for k, v in gw.metrics().items()
                if "received_total" in k or "delivered_total" in k or "dead" in k
            }
        except OSError as err:
            res["metrics"] = {"error": str(err)}
        time.sleep(0.5)  # any late duplicate shows at the LIS
        lis_rows = read_lis(lis_record)
        gw.stop()
        res["gateway_log_problems"], res["gateway_log_first_problems"] = gw.problems()
        res |= {"gateway_" + k: v for k, v in gw.log_stats().items()}

    peers_cpu = ours1 - ours0  # the LIS receiver and the socat relays
    gw_cpu = gw_total1 - gw_total0
    res |= {
        "t0": t0,
        "wall_s": wall,
        "drain_s": t_end - t_analyzers_done,
        "gateway_cpu_s": gw_cpu,
        "gateway_cores": gw_cpu / wall,
        **{f"gateway_{k}": v for k, v in _peers.cpu_split(gw.pid, gw_cpu0, gw_cpu1, wall).items()},
        "analyzer_procs_cores": ours_cpu_analyzers / wall,
        "machine_busy_cores": (busy1 - busy0) / wall,
        "lis_socat_cores": peers_cpu / wall,
        "foreign_cores": max(0.0, busy1 - busy0 - gw_cpu - peers_cpu - ours_cpu_analyzers) / wall,
        "lines": lines,
        "lis": lis_rows,
    }
    return res


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


# -- figures -------------------------------------------------------------------------------


def _lat(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": percentile(values, 50),
        "p95_ms": percentile(values, 95),
        "p99_ms": percentile(values, 99),
        "max_ms": max(values, default=math.nan),
    }


def figures(res: dict[str, Any]) -> dict[str, Any]:
    """Per message: analyzer's last frame -> ORU at the LIS (matched by OBR-3), the
    gateway's ACK of the last frame, what went wrong on the line; per line: bytes/s."""
    arrivals: dict[str, float] = {}
    copies: dict[str, int] = {}
    for t, _, sids in res["lis"]:
        for s in sids:
            copies[s] = copies.get(s, 0) + 1
            arrivals.setdefault(s, t)
    sent: set[str] = set()
    per_line, all_e2e, all_ack, all_inter = [], [], [], []
    by_kind: dict[str, list[float]] = {}
    by_profile: dict[str, dict[str, Any]] = {}
    timers, refusals, retransmissions, enq_refusals, aborted, lost = 0, 0, 0, 0, [], []
    for line in sorted(res["lines"], key=lambda a: a["index"]):
        e2e, ack, inter = [], [], []
        ok = 0
        for sid, t_last, ack_s, good, why, naks, retx, enq, inter_max, _ in line["messages"]:
            sent.add(sid)
            refusals += naks
            retransmissions += retx
            enq_refusals += enq
            inter.append(inter_max * 1000)
            if not good:
                aborted.append(f"{sid}: {why}")
                timers += bool(why and "6.5.2" in why)
                continue
            ok += 1
            ack.append(ack_s * 1000)
            if sid in arrivals and t_last is not None:
                e2e.append((arrivals[sid] - t_last) * 1000)
            else:
                lost.append(sid)
        rate = line["tx_bytes"] / line["seconds"] if line["seconds"] > 0 else 0.0
        row = {
            "analyzer": line["index"],
            "kind": line["kind"],
            "profile": line["profile"],
            "messages": len(line["messages"]),
            "acked": ok,
            "delivered": sum(1 for m in line["messages"] if m[3] and m[0] in arrivals),
            "bytes_per_s": rate,
            "line_use": rate / LINE_RATE,
            "e2e": _lat(e2e),
            "ack": _lat(ack),
        }
        per_line.append(row)
        all_e2e += e2e
        all_ack += ack
        all_inter += inter
        by_kind.setdefault(line["kind"], []).extend(e2e)
        p = by_profile.setdefault(line["profile"], {"messages": 0, "e2e": [], "bytes": 0})
        p["messages"] += len(line["messages"])
        p["e2e"] += e2e
    rates = [r["bytes_per_s"] for r in per_line]
    out = {
        "analyzers": len(per_line),
        "messages_sent": sum(r["messages"] for r in per_line),
        "messages_acked": sum(r["acked"] for r in per_line),
        "messages_delivered": sum(r["delivered"] for r in per_line),
        "lost": lost,
        "duplicates_at_lis": sum(n - 1 for n in copies.values() if n > 1),
        "unexpected_at_lis": sorted(set(arrivals) - sent)[:20],
        "orus_at_lis": len(res["lis"]),
        "aborted": aborted,
        "timer_expiries": timers,
        "frame_refusals": refusals,
        "retransmissions": retransmissions,
        "enq_refusals": enq_refusals,
        "e2e": _lat(all_e2e),
        "e2e_by_kind": {k: _lat(v) for k, v in by_kind.items()},
        "e2e_by_profile": {
            k: {"messages": v["messages"], **_lat(v["e2e"])} for k, v in by_profile.items()
        },
        "gateway_ack": _lat(all_ack),
        "intermediate_ack_max_ms": max(all_inter, default=math.nan),
        "line_bytes_per_s_mean": sum(rates) / len(rates) if rates else 0.0,
        "line_bytes_per_s_min": min(rates, default=0.0),
        "line_use_mean": sum(rates) / len(rates) / LINE_RATE if rates else 0.0,
        "line_use_min": min(rates, default=0.0) / LINE_RATE,
        "per_line": per_line,
    }
    out["verdicts"] = {
        "p99": out["e2e"]["p99_ms"] < TARGET_P99_MS,
        "cpu": res["gateway_cores"] < TARGET_CPU,
        "no_timer": not timers and not aborted and not refusals and not enq_refusals,
        "all_delivered": (
            out["messages_sent"] > 0
            and out["messages_delivered"] == out["messages_acked"] == out["messages_sent"]
            and not out["unexpected_at_lis"]
        ),
    }
    return out


def ms(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.1f}"


def report(res: dict[str, Any], fig: dict[str, Any]) -> bool:
    """Print the per-analyzer and summary tables; True if every target is met."""
    say("\nper analyzer (e2e = last frame sent -> ORU at the LIS; ack = last frame -> its ACK)")
    say(
        f"  {'#':>2} {'line':<6} {'profile':<17} {'msgs':>5} {'acked':>5} {'deliv':>5} "
        f"{'B/s':>6} {'use':>5} {'e2e p50':>8} {'e2e p99':>8} {'e2e max':>8} {'ack p99':>8}"
    )
    for r in fig["per_line"]:
        say(
            f"  {r['analyzer']:>2} {r['kind']:<6} {r['profile']:<17} {r['messages']:>5} "
            f"{r['acked']:>5} {r['delivered']:>5} {r['bytes_per_s']:>6.0f} {r['line_use']:>5.1%} "
            f"{ms(r['e2e']['p50_ms']):>8} {ms(r['e2e']['p99_ms']):>8} "
            f"{ms(r['e2e']['max_ms']):>8} {ms(r['ack']['p99_ms']):>8}"
        )
    v = fig["verdicts"]
    e, a = fig["e2e"], fig["gateway_ack"]
    rows = [
        (
            "messages sent / ACKed by gateway / at LIS",
            f"{fig['messages_sent']:,} / {fig['messages_acked']:,} / {fig['messages_delivered']:,}",
            f"all delivered: {'PASS' if v['all_delivered'] else 'FAIL'}"
            + (f" (lost {len(fig['lost'])})" if fig["lost"] else "")
            + (f", {fig['duplicates_at_lis']} duplicates" if fig["duplicates_at_lis"] else ""),
        ),
        (
            "last frame -> ORU at LIS, p50 / p95 / p99 / max",
            f"{ms(e['p50_ms'])} / {ms(e['p95_ms'])} / {ms(e['p99_ms'])} / {ms(e['max_ms'])} ms",
            f"p99 < {TARGET_P99_MS:g} ms: {'PASS' if v['p99'] else 'FAIL'}",
        ),
    ]
    for kind, x in sorted(fig["e2e_by_kind"].items()):
        rows.append((f"  {kind} lines, p50 / p99", f"{ms(x['p50_ms'])} / {ms(x['p99_ms'])} ms", ""))
    for prof, x in fig["e2e_by_profile"].items():
        rows.append(
            (
                f"  {prof}, p50 / p99",
                f"{ms(x['p50_ms'])} / {ms(x['p99_ms'])} ms",
                f"{x['messages']} messages",
            )
        )
    rows += [
        (
            "last frame -> gateway ACK, p50 / p99 / max",
            f"{ms(a['p50_ms'])} / {ms(a['p99_ms'])} / {ms(a['max_ms'])} ms",
            "journal commit before the ACK",
        ),
        (
            "other frames -> ACK, max",
            f"{ms(fig['intermediate_ack_max_ms'])} ms",
            "the analyzer's timer is 15 s (6.5.2.2)",
        ),
        (
            "analyzer timers fired / aborted / NAKs / ENQ refused",
            f"{fig['timer_expiries']} / {len(fig['aborted'])} / {fig['frame_refusals']} / "
            f"{fig['enq_refusals']}",
            f"none: {'PASS' if v['no_timer'] else 'FAIL'}",
        ),
        (
            "bytes/s per line, mean / min (line rate 960)",
            f"{fig['line_bytes_per_s_mean']:.0f} / {fig['line_bytes_per_s_min']:.0f}",
            f"{fig['line_use_mean']:.1%} / {fig['line_use_min']:.1%} of line rate",
        ),
        (
            "gateway CPU over the run",
            f"{res['gateway_cores']:.1%} of one core",
            f"< {TARGET_CPU:.0%}: {'PASS' if v['cpu'] else 'FAIL'}; loop thread "
            f"{res['gateway_loop_cores']:.1%}, others {res['gateway_other_threads_cores']:.1%}",
        ),
        ("gateway CPU idle, lines open", f"{res['gateway_idle_cores']:.1%} of one core", ""),
        (
            "analyzers / LIS + socat / others on the machine",
            f"{res['analyzer_procs_cores']:.2f} / {res['lis_socat_cores']:.2f} / "
            f"{res['foreign_cores']:.2f} cores",
            "[!] noisy" if res["foreign_cores"] >= _peers.QUIET_CORES else "",
        ),
        (
            "run / drain after the analyzers stopped",
            f"{res['wall_s']:.1f} s / {res['drain_s']:.2f} s",
            f"{fig['orus_at_lis']:,} ORUs at the LIS",
        ),
        (
            "gateway log: lines / WARNING or worse",
            f"{res['gateway_log_lines']:,} / {res['gateway_log_problems']}",
            "",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    say("\nsummary")
    for figure, value, note in rows:
        say(f"  {figure:<{width}}  {value:>{vwidth}}  {note}")
    if fig["aborted"]:
        say("\naborted transmissions (first 10):")
        for x in fig["aborted"][:10]:
            say(f"  {x}")
    if fig["lost"]:
        say(f"\nACKed by the gateway, never at the LIS (first 20): {fig['lost'][:20]}")
    if fig["unexpected_at_lis"]:
        say(f"\nORUs at the LIS with sample ids never sent: {fig['unexpected_at_lis']}")
    if res["gateway_log_problems"]:
        say(f"\ngateway log, WARNING or worse (first {len(res['gateway_log_first_problems'])}):")
        for x in res["gateway_log_first_problems"]:
            say(f"  {x}")
    passed = all(v.values())
    say(
        f"\n{'PASS' if passed else 'FAIL'}: "
        + ", ".join(f"{k} {'ok' if ok else 'FAIL'}" for k, ok in v.items())
    )
    return passed


# -- main ----------------------------------------------------------------------------------


def code_version() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--", "gateway", "drivers", "config", "pyproject.toml")
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": dirty.splitlines()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, help="seconds of streaming (default 60)")
    p.add_argument("--serial", type=int, help="analyzers on pty pairs at 9600 baud (default 8)")
    p.add_argument("--tcp", type=int, help="analyzers over TCP, paced at 9600 baud (default 8)")
    p.add_argument("--quick", action="store_true", help="10 s, 4 + 4 analyzers: a smoke run")
    p.add_argument(
        "--json",
        metavar="FILE",
        help="every figure and message as JSON (a bare name: in bench/out/)",
    )
    p.add_argument("--log-level", default="INFO", help="the gateway's (default INFO, as shipped)")
    p.add_argument("--wait-quiet", type=float, default=30.0, metavar="S")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--serve-lis", nargs=2, metavar=("PORT", "FILE"), help=argparse.SUPPRESS)
    p.add_argument("--serve-analyzers", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_lis:
        return serve_lis(int(args.serve_lis[0]), Path(args.serve_lis[1]))
    if args.serve_analyzers:
        return serve_analyzers(Path(args.serve_analyzers))

    duration = args.duration or (10.0 if args.quick else 60.0)
    n_serial = args.serial if args.serial is not None else (4 if args.quick else 8)
    n_tcp = args.tcp if args.tcp is not None else (4 if args.quick else 8)
    if n_serial + n_tcp < 1 or duration <= 0:
        p.error("need at least one analyzer and a positive duration")
    if n_serial and not shutil.which("socat"):
        p.error("socat is not installed (needed for the serial lines; or --serial 0)")
    _peers.quiet_wait_s = args.wait_quiet
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as on Ctrl-C

    work = pick_workdir()
    code = code_version()
    say(
        f"medgw lab bench: {n_serial} serial (pty, {BAUDRATE} baud) + {n_tcp} TCP analyzers, "
        f"{duration:g} s, gateway log {args.log_level}, {os.cpu_count()} CPUs, "
        f"code {code['commit']}{' + local changes' if code['dirty'] else ''}, scratch {work}"
    )
    try:
        res = run_bench(work, n_serial, n_tcp, duration, args.log_level)
        fig = figures(res)
        passed = report(res, fig)
        if args.json:
            path = Path(args.json)
            if path.parent == Path():  # a bare name goes with the other scratch output
                path = REPO / "bench/out" / path
            path.parent.mkdir(parents=True, exist_ok=True)
            doc = {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "kernel": platform.release(),
                },
                "code": code,
                "options": {
                    "duration": duration,
                    "serial": n_serial,
                    "tcp": n_tcp,
                    "log_level": args.log_level,
                },
                **{k: v for k, v in res.items() if k not in ("lines", "lis")},
                "figures": fig,
                "message_fields": list(MESSAGE_FIELDS),
                "lines": res["lines"],  # every message, as MESSAGE_FIELDS
            }
            path.write_text(json.dumps(doc, indent=1, default=str))
            say(f"JSON written to {path}")
    except KeyboardInterrupt:
        say("\ninterrupted: every process stopped")
        return 130
    finally:
        if args.keep:
            say(f"scratch kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
