"""The processes around the gateway under test, for ``bench/mllp.py``.

HL7 senders, an ACK-ing receiver and an echo server each run in their own process
(``multiprocessing``, spawn), so the process under test is measured alone; the
gateway itself runs as ``python -m gateway.cli run`` (:class:`GatewayProc`).
Nothing here imports medgw: the MLLP framing (HL7 v2.5.1 Appendix C: VT message
FS CR) and the minimal ACK are written here, so a bug in the gateway's framer
cannot hide behind the same bug in its peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable
TICK = os.sysconf("SC_CLK_TCK")
MP = mp.get_context("spawn")  # peers start clean: no inherited sockets, threads or loops
QUIET_CORES = 0.15  # the machine counts as idle below this
NOISY_CORES = 0.3  # a run during which others used this much is repeated (--tries)
quiet_wait_s = 30.0  # how long a run waits for an idle machine (set by bench/mllp.py)

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"
READ_SIZE = 256 * 1024

# LOINC code, short name, unit, low, high, decimals: a chemistry panel as an analyzer sends it
ANALYTES = (
    ("2345-7", "Glucose SerPl-mCnc", "mg/dL", 70, 99, 0),
    ("2160-0", "Creat SerPl-mCnc", "mg/dL", 0.6, 1.3, 2),
    ("3094-0", "BUN SerPl-mCnc", "mg/dL", 7, 20, 0),
    ("2951-2", "Sodium SerPl-sCnc", "mmol/L", 135, 145, 0),
    ("2823-3", "Potassium SerPl-sCnc", "mmol/L", 3.5, 5.1, 1),
    ("2075-0", "Chloride SerPl-sCnc", "mmol/L", 98, 107, 0),
    ("2028-9", "CO2 SerPl-sCnc", "mmol/L", 22, 29, 0),
    ("17861-6", "Calcium SerPl-mCnc", "mg/dL", 8.6, 10.3, 1),
    ("2885-2", "Prot SerPl-mCnc", "g/dL", 6.0, 8.3, 1),
    ("1751-7", "Albumin SerPl-mCnc", "g/dL", 3.5, 5.2, 1),
    ("1975-2", "Bilirub SerPl-mCnc", "mg/dL", 0.1, 1.2, 1),
    ("6768-6", "ALP SerPl-cCnc", "U/L", 40, 129, 0),
    ("1742-6", "ALT SerPl-cCnc", "U/L", 7, 56, 0),
    ("1920-8", "AST SerPl-cCnc", "U/L", 8, 48, 0),
    ("2093-3", "Cholest SerPl-mCnc", "mg/dL", 125, 200, 0),
    ("2571-8", "Trigl SerPl-mCnc", "mg/dL", 35, 150, 0),
    ("2085-9", "HDLc SerPl-mCnc", "mg/dL", 40, 60, 0),
    ("13457-7", "LDLc SerPl Calc-mCnc", "mg/dL", 0, 100, 0),
    ("2532-0", "LDH SerPl-cCnc", "U/L", 140, 280, 0),
    ("2324-2", "GGT SerPl-cCnc", "U/L", 8, 61, 0),
)
NAMES = (("MÜLLER", "JÜRGEN"), ("NGUYEN", "THI LAN"), ("OKAFOR", "CHIDI"), ("SILVA", "ANA"))


def oru_templates(conn: int, count: int = 32) -> list[tuple[bytes, bytes]]:
    """``count`` ORU^R01 messages (10-20 OBX, ~2-3 kB, UTF-8) as (before, after) MSH-10."""
    rng = random.Random(conn)
    out = []
    for n in range(count):
        ts = f"20250314{8 + n % 10:02d}{n % 60:02d}{rng.randrange(60):02d}"
        last, first = NAMES[n % len(NAMES)]
        mrn = f"{rng.randrange(10**7, 10**8)}"
        placer, filler = f"PL{rng.randrange(10**8)}", f"FI{rng.randrange(10**8)}"
        msh_head = "MSH|^~\\&|COBAS8000|CORELAB|LIS|GENHOSP|" + ts + "||ORU^R01^ORU_R01|"
        msh_tail = "|P|2.5.1|||NE|NE|DEU|UNICODE UTF-8"
        segs = [
            f"PID|1||{mrn}^^^GENHOSP^MR||{last}^{first}^^^^^L||19{rng.randrange(30, 99)}0"
            f"{rng.randrange(1, 9)}1{rng.randrange(9)}|{'MF'[n % 2]}|||Hauptstraße "
            f"{rng.randrange(1, 200)}^^Berlin^^10{rng.randrange(100, 999)}^DE",
            f"PV1|1|O|LAB^^^CORELAB||||4711^HOUSE^GREGORY^^^DR|||||||||||V{rng.randrange(10**6)}",
            f"ORC|RE|{placer}^LIS|{filler}^CORELAB||CM||||{ts}",
            f"OBR|1|{placer}^LIS|{filler}^CORELAB|CMP^Comprehensive metabolic panel^L|||{ts}"
            f"|||||||{ts}|SER^Serum|4711^HOUSE^GREGORY^^^DR||||||{ts}||CH|F",
        ]
        for i, (code, name, unit, low, high, dec) in enumerate(
            rng.sample(ANALYTES, rng.randrange(10, 21)), start=1
        ):
            value = rng.uniform(low * 0.7, high * 1.3)
            flag = "L" if value < low else "H" if value > high else "N"
            segs.append(
                f"OBX|{i}|NM|{code}^{name}^LN||{value:.{dec}f}|{unit}^{unit}^UCUM|"
                f"{low}-{high}|{flag}|||F|||{ts}|CORELAB|OP{rng.randrange(99)}"
                f"|COBAS8000^Roche^c702-{rng.randrange(9)}"
            )
            if flag != "N" and rng.random() < 0.3:
                segs.append(f"NTE|1|L|Result verified by repeat analysis {ts}")
        after = (msh_tail + "\r" + "\r".join(segs) + "\r").encode()
        out.append((msh_head.encode(), after))
    return out


def control_id(tag: str, conn: int, seq: int) -> bytes:
    """A unique MSH-10 that says which connection sent it, and its order there."""
    return f"{tag}{conn:02d}{seq:08d}".encode()


def msh_control_id(message: bytes) -> bytes:
    """MSH-10 of a message whose field separator is ``|``."""
    end = message.find(CR)
    fields = message[: end if end >= 0 else len(message)].split(b"|", 10)
    return fields[9] if len(fields) > 9 else b""


def ack_for(message: bytes) -> bytes:
    """A framed minimal ACK (MSA-1 AA, MSA-2 = the message's MSH-10)."""
    cid = msh_control_id(message)
    return (
        VT
        + b"MSH|^~\\&|BENCHRCV|BENCH|COBAS8000|CORELAB|20250314120000||ACK^R01^ACK|A"
        + cid
        + b"|P|2.5.1\rMSA|AA|"
        + cid
        + b"\r"
        + FS
        + CR
    )


def take_frames(buf: bytearray) -> list[bytes]:
    """Remove complete MLLP blocks from ``buf``; return their contents."""
    out = []
    while True:
        end = buf.find(FS)
        if end < 0 or end + 1 >= len(buf):  # wait for the CR after FS too
            return out
        start = buf.find(VT, 0, end)
        out.append(bytes(buf[start + 1 if start >= 0 else 0 : end]))
        del buf[: end + 2 if buf[end + 1 : end + 2] == CR else end + 1]


# -- sender (one connection per process) -----------------------------------------------


def sender_main(
    host: str,
    port: int,
    conn: int,
    count: int,
    warmup: int,
    ready: Any,
    go: Any,
    results: Any,
    progress: Any,
) -> None:
    """One connection: send, wait for the ACK, repeat; ``warmup`` first, then ``count``
    after ``go``. Reports {conn, t_start, t_end, n, cpu_s, lat_*} or {conn, error}."""
    try:
        sock = socket.create_connection((host, port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        templates = oru_templates(conn)
        buf = bytearray()

        def roundtrip(cid: bytes, i: int) -> None:
            before, after = templates[i % len(templates)]
            sock.sendall(VT + before + cid + after + FS + CR)
            while True:
                end = buf.find(FS)
                if end >= 0:
                    break
                chunk = sock.recv(READ_SIZE)
                if not chunk:
                    raise ConnectionError("peer closed before the ACK")
                buf.extend(chunk)
            ack = bytes(buf[:end])
            del buf[: end + 2]
            if b"\rMSA|AA|" + cid + b"\r" not in ack:
                raise RuntimeError(f"not an AA for {cid!r}: {ack[-200:]!r}")

        for i in range(warmup):
            roundtrip(control_id("W", conn, i), i)
        ready.put({"conn": conn, "ready": True})
        go.wait()
        lat = [0.0] * count
        cpu0, t0 = time.process_time(), time.monotonic()
        for i in range(count):
            t = time.monotonic()
            roundtrip(control_id("M", conn, i), i)
            lat[i] = time.monotonic() - t
            progress[conn] = i + 1
        t1 = time.monotonic()
        cpu = time.process_time() - cpu0
        sock.close()
        lat.sort()
        results.put(
            {
                "conn": conn,
                "t_start": t0,
                "t_end": t1,
                "n": count,
                "cpu_s": cpu,
                "bytes_avg": sum(len(b) + len(a) + 11 for b, a in templates) / len(templates),
                "lat_p50_ms": lat[count // 2] * 1e3 if count else 0.0,
                "lat_p99_ms": lat[min(count - 1, count * 99 // 100)] * 1e3 if count else 0.0,
                "lat_max_ms": lat[-1] * 1e3 if count else 0.0,
            }
        )
    except Exception as err:
        results.put({"conn": conn, "error": f"{type(err).__name__}: {err}"})
        with contextlib.suppress(Exception):
            ready.put({"conn": conn, "error": f"{type(err).__name__}: {err}"})


# -- receiver (the gateway's destination) ----------------------------------------------


def receiver_main(expected: int, port_q: Any, results: Any, counts: Any, stop: Any) -> None:
    """A fast MLLP receiver: AA for each message, blocking socket, one connection at a time.

    ``counts[0]``/``counts[1]``: warm-up/measured messages received so far. Puts one
    result when ``expected`` measured (``M``) messages have arrived: time, duplicates,
    and order violations per sending connection (ordered delivery must keep them).
    """
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    port_q.put(srv.getsockname()[1])
    seen: set[bytes] = set()
    last_seq: dict[bytes, int] = {}
    duplicates = out_of_order = connections = 0
    measured = 0
    cpu0 = time.process_time()
    while not stop.is_set():
        try:
            sock, _ = srv.accept()
        except TimeoutError:
            continue
        connections += 1
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(0.2)
        buf = bytearray()
        while not stop.is_set():
            try:
                chunk = sock.recv(READ_SIZE)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            buf.extend(chunk)
            frames = take_frames(buf)
            if not frames:
                continue
            sock.sendall(b"".join(ack_for(m) for m in frames))
            for m in frames:
                cid = msh_control_id(m)
                if cid in seen:
                    duplicates += 1
                    continue
                seen.add(cid)
                if cid[:1] != b"M":
                    counts[0] += 1
                    continue
                sender, seq = cid[1:3], int(cid[3:])
                if seq <= last_seq.get(sender, -1):
                    out_of_order += 1
                last_seq[sender] = seq
                measured += 1
                counts[1] = measured
                if measured == expected:
                    results.put(
                        {
                            "t_done": time.monotonic(),
                            "received": measured,
                            "duplicates": duplicates,
                            "out_of_order": out_of_order,
                            "connections": connections,
                            "cpu_s": time.process_time() - cpu0,
                        }
                    )
        sock.close()
    srv.close()


# -- echo server (the no-persistence ceiling) ------------------------------------------


def echo_main(port_q: Any, stop: Any) -> None:
    """An asyncio MLLP server that ACKs every message at once and stores nothing."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        try:
            while data := await reader.read(READ_SIZE):
                buf.extend(data)
                frames = take_frames(buf)
                if frames:
                    writer.write(b"".join(ack_for(m) for m in frames))
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0, limit=READ_SIZE)
        port_q.put(server.sockets[0].getsockname()[1])
        async with server:
            while not stop.is_set():
                await asyncio.sleep(0.2)

    asyncio.run(main())


_ports_given: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on now (never the same one twice in a run)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _ports_given:
            _ports_given.add(port)
            return port


# -- the gateway under test ----------------------------------------------------------------


def proc_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) per thread of ``pid``; {} once it is gone."""
    out = {}
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
                out[int(tid)] = (int(rest[11]) + int(rest[12])) / TICK
    return out


def proc_write_bytes(pid: int) -> int:
    """Bytes ``pid`` has sent towards the disk (``write_bytes`` of /proc/PID/io)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def machine_busy() -> float:
    """CPU seconds all CPUs have spent busy since boot (from /proc/stat): user, system
    and steal. Interrupt time is left out: loopback TCP runs much of itself in softirq,
    which no process is charged for, so counting it would blame our traffic on others."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = v
    return (user + nice + system + steal) / TICK


def wait_quiet(max_s: float) -> dict[str, float]:
    """Wait (up to ``max_s``) until the machine is idle, so runs do not measure the
    neighbours; returns the busy cores seen last and the time waited."""
    t0 = time.monotonic()
    while True:
        b0 = machine_busy()
        time.sleep(0.5)
        busy = (machine_busy() - b0) / 0.5
        waited = time.monotonic() - t0
        if busy < QUIET_CORES or waited >= max_s:
            return {"busy_before_cores": busy, "waited_for_quiet_s": waited}


def cpu_split(pid: int, before: dict[int, float], after: dict[int, float], wall: float) -> dict:
    """Cores used in the window: the main (event loop) thread and all others."""
    main = after.get(pid, 0.0) - before.get(pid, 0.0)
    other = sum(v - before.get(t, 0.0) for t, v in after.items() if t != pid)
    return {"loop_cores": main / wall, "other_threads_cores": other / wall}


class GatewayProc:
    """``medgw run`` in a subprocess with a one-listener config; stopped by SIGTERM."""

    def __init__(
        self,
        work: Path,
        name: str,
        *,
        level: str = "WARNING",
        destination: dict[str, Any],
        profile: Path | None = None,
        strace: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.dir = work / name
        for n in range(2, 100):  # a repeated run gets its own folder
            if not self.dir.exists():
                break
            self.dir = work / f"{name}-{n}"
        self.env = {**os.environ, **env} if env else None
        self.dir.mkdir()
        self.port, self.http_port = free_port(), free_port()
        self.profile, self.strace = profile, strace
        self.log_path = self.dir / "gateway.log"
        self.config_path = self.dir / "gateway.yaml"
        config = {
            "site": {"id": "bench"},
            "state_dir": str(self.dir / "state"),
            "http": {"listen": f"127.0.0.1:{self.http_port}"},
            "journal": {"min_free_mb": 256},
            "logging": {"level": level, "format": "text"},
            "listeners": [{"id": "in", "type": "hl7-mllp", "listen": f"127.0.0.1:{self.port}"}],
            "destinations": [destination],
            "routes": [{"match": {"source": "in"}, "to": [destination["id"]]}],
        }
        self.config_path.write_text(json.dumps(config, indent=1))  # JSON is YAML
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def __enter__(self) -> GatewayProc:
        cmd = [PYTHON, "-m", "gateway.cli", "run", "--config", str(self.config_path)]
        if self.profile:
            cmd[1:1] = ["-m", "cProfile", "-o", str(self.profile)]
        if self.strace:
            trace = ["strace", "-f", "--seccomp-bpf", "-e", "trace=fsync,fdatasync", "-c"]
            cmd = [*trace, "-o", str(self.strace), *cmd]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.pid = self._python_pid()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _python_pid(self) -> int:
        assert self.proc is not None
        if not self.strace:
            return self.proc.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # strace's child is the gateway
            with contextlib.suppress(FileNotFoundError):
                kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
                if kids.split():
                    return int(kids.split()[0])
            time.sleep(0.02)
        raise RuntimeError("strace started no gateway")

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self._url("/healthz"), timeout=1) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"gateway not ready in 30 s:\n{self.log_tail()}")

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def cpu(self) -> dict[int, float]:
        return proc_cpu(self.pid)

    def metrics(self) -> dict[str, float]:
        out = {}
        with urllib.request.urlopen(self._url("/metrics"), timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    with contextlib.suppress(ValueError):
                        out[name] = float(value)
        return out

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def log_stats(self) -> dict[str, int]:
        text = self.log_path.read_bytes() if self.log_path.exists() else b""
        return {
            "log_bytes": len(text),
            "log_lines": text.count(b"\n"),
            "warnings_or_worse": len(re.findall(rb" (?:WARNING|ERROR|CRITICAL) ", text)),
        }

    def stop(self) -> None:
        """SIGTERM the gateway (it drains), then wait; SIGKILL if it hangs."""
        if self.proc is None:
            return
        if self.proc.poll() is None and self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def dead_destination(hold: socket.socket) -> dict[str, Any]:
    """An MLLP destination nobody will ever answer: a bound, never-listening port."""
    return {
        "id": "nowhere",
        "type": "hl7-mllp",
        "connect": f"127.0.0.1:{hold.getsockname()[1]}",
        "connect_timeout_s": 1,
        "delivery": {"ordered": True, "backoff": {"initial_s": 3600, "max_s": 3600}},
    }


@contextlib.contextmanager
def refused_port() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused at once
    try:
        yield s
    finally:
        s.close()


@contextlib.contextmanager
def gateway_without_delivery(work: Path, name: str, **kw: Any) -> Iterator[GatewayProc]:
    """A gateway whose one destination never answers: accept+ACK alone is measured."""
    with (
        refused_port() as hold,
        GatewayProc(work, name, destination=dead_destination(hold), **kw) as gw,
    ):
        yield gw


# -- senders -----------------------------------------------------------------------------


def drive(
    port: int,
    conns: int,
    total: int,
    warmup: int,
    *,
    before_go: Callable[[], None] | None = None,
    watch_pid: int = 0,
    other_pids: tuple[int, ...] = (),
    sample: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """``conns`` sender processes, ``total`` messages between them after ``warmup`` each.

    The rate is total / (last sender done - go). ``watch_pid``: a process whose CPU is
    split into its main thread and the rest over the same window; ``other_pids``: more
    of ours (peers), so that ``foreign_cores`` is what the rest of the machine used.
    """
    shares = [total // conns + (1 if c < total % conns else 0) for c in range(conns)]
    ready, results, go = MP.Queue(), MP.Queue(), MP.Event()
    progress = MP.RawArray("q", conns)
    procs = [
        MP.Process(
            target=sender_main,
            args=("127.0.0.1", port, c, shares[c], warmup, ready, go, results, progress),
            name=f"sender-{c}",
            daemon=True,
        )
        for c in range(conns)
    ]
    out: dict[str, Any] = {"connections": conns, "messages": total, **wait_quiet(quiet_wait_s)}
    started: list[Any] = []
    try:
        for p in procs:
            p.start()
            started.append(p)
        _wait_ready(ready, started, time.monotonic() + 120)
        if before_go:
            before_go()
        cpu0 = proc_cpu(watch_pid) if watch_pid else {}
        io0 = proc_write_bytes(watch_pid) if watch_pid else 0
        peers0 = sum(sum(proc_cpu(p).values()) for p in other_pids)
        busy0 = machine_busy()
        t0 = time.monotonic()
        go.set()
        done: list[dict[str, Any]] = []
        timeline: list[tuple[float, int, int]] = []
        deadline = t0 + max(120.0, total / 100)
        while len(done) < conns:
            if time.monotonic() > deadline:
                raise RuntimeError(f"senders not done in {deadline - t0:.0f} s")
            try:
                r = results.get(timeout=0.25)
            except queue.Empty:
                timeline.append((time.monotonic() - t0, sum(progress), sample() if sample else 0))
                continue
            if "error" in r:
                raise RuntimeError(f"sender {r['conn']}: {r['error']}")
            done.append(r)
        t_end = max(r["t_end"] for r in done)
        busy = machine_busy() - busy0
        cpu1 = proc_cpu(watch_pid) if watch_pid else {}
        written = proc_write_bytes(watch_pid) - io0 if watch_pid else 0
        peers = sum(sum(proc_cpu(p).values()) for p in other_pids) - peers0
        wall = t_end - t0
        ours = sum(r["cpu_s"] for r in done) + peers
        ours += sum(v - cpu0.get(t, 0.0) for t, v in cpu1.items())
        out |= {
            "t0": t0,
            "t_end": t_end,
            "seconds": wall,
            "per_s": total / wall,
            "per_conn_per_s": [r["n"] / (r["t_end"] - r["t_start"]) for r in done],
            "lat_p50_ms": sorted(r["lat_p50_ms"] for r in done)[conns // 2],
            "lat_p99_ms": max(r["lat_p99_ms"] for r in done),
            "lat_max_ms": max(r["lat_max_ms"] for r in done),
            "message_bytes_avg": sum(r["bytes_avg"] for r in done) / conns,
            "sender_cores": sum(r["cpu_s"] for r in done) / wall,
            "disk_bytes_per_msg": written / total,
            "machine_busy_cores": busy / wall,
            "foreign_cores": max(0.0, busy - ours) / wall,
            "timeline": timeline,
        }
        if watch_pid:
            out |= cpu_split(watch_pid, cpu0, cpu1, wall)
            out["cpu_before"] = cpu0
    finally:
        for p in started:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join()
    return out


def _wait_ready(ready: Any, procs: list[Any], deadline: float) -> None:
    """Wait for every sender's warm-up to finish; fail fast if one dies."""
    waiting = len(procs)
    while waiting:
        try:
            msg = ready.get(timeout=0.25)
        except queue.Empty:
            dead = [p.name for p in procs if p.exitcode is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"senders not ready (exited: {dead})") from None
            continue
        if "error" in msg:
            raise RuntimeError(f"sender {msg['conn']}: {msg['error']}")
        waiting -= 1
