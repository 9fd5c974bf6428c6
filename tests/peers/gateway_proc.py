"""Running the real gateway and the peers as subprocesses, for end-to-end tests.

The gateway runs as ``python -m gateway.cli run --config FILE`` from the
repository root, with its log (stdout and stderr, appended over restarts) in a
file next to the config. It is ready when ``GET /healthz`` answers 200, and is
stopped by pid: SIGTERM (drain) or SIGKILL (crash).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[2]
PEERS = Path(__file__).resolve().parent
T = TypeVar("T")


def pick_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    check: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.05
) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(port: int, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# -- configuration ---------------------------------------------------------------------


def mllp_destination(dest_id: str, port: int, **delivery: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": dest_id,
        "type": "hl7-mllp",
        "connect": f"127.0.0.1:{port}",
        "connect_timeout_s": 2,
        "ack_timeout_s": 10,
    }
    if delivery:
        d["delivery"] = delivery
    return d


def folder_destination(dest_id: str, path: Path) -> dict[str, Any]:
    return {"id": dest_id, "type": "folder", "path": str(path)}


def write_config(
    path: Path,
    *,
    state_dir: Path,
    http_port: int,
    mllp_port: int,
    destinations: list[dict[str, Any]],
    log_level: str = "INFO",
) -> Path:
    """A config with one MLLP listener ``his`` routed to every destination."""
    doc = {
        "site": {"id": "e2e-test"},
        "state_dir": str(state_dir),
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "journal": {"min_free_mb": 0},
        "logging": {"level": log_level, "format": "text"},
        "listeners": [{"id": "his", "type": "hl7-mllp", "listen": f"127.0.0.1:{mllp_port}"}],
        "destinations": destinations,
        "routes": [{"match": {"source": "his"}, "to": [d["id"] for d in destinations]}],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


# -- processes -------------------------------------------------------------------------


class Proc:
    """A subprocess with its output in a log file, stopped by pid."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with open(self.log, "ab") as out:
            out.write(f"\n==== {self.name} started {time.strftime('%H:%M:%S')} ====\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int, timeout_s: float = 30.0) -> int | None:
        """Send ``sig`` to the pid and wait for the exit; returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
            raise

    def kill(self) -> int | None:
        return self.signal(signal.SIGKILL)

    def terminate(self, timeout_s: float = 30.0) -> int | None:
        return self.signal(signal.SIGTERM, timeout_s)

    def wait(self, timeout_s: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout_s)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Gateway(Proc):
    def __init__(self, config: Path, http_port: int, mllp_port: int) -> None:
        super().__init__(
            "gateway",
            [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
            config.with_suffix(".log"),
        )
        self.config = config
        self.http_port = http_port
        self.mllp_port = mllp_port
        self.starts = 0

    def start(self, timeout_s: float = 30.0) -> Gateway:
        self.spawn()
        self.starts += 1

        def ready() -> bool:
            if not self.running():
                raise AssertionError(f"gateway exited at start:\n{self.log_tail()}")
            try:
                return http_get(self.http_port, "/healthz", 1.0)[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout_s, "the gateway's /healthz to answer 200")
        return self

    def health(self) -> dict[str, Any]:
        _, body = http_get(self.http_port, "/healthz")
        doc: dict[str, Any] = json.loads(body)
        return doc

    def metrics(self) -> str:
        status, body = http_get(self.http_port, "/metrics")
        assert status == 200
        return body.decode()

    def wait_health(
        self, check: Callable[[dict[str, Any]], bool], timeout_s: float, what: str
    ) -> dict[str, Any]:
        def poll() -> dict[str, Any] | None:
            doc = self.health()
            return doc if check(doc) else None

        try:
            return wait_for(poll, timeout_s, what)
        except AssertionError as err:
            raise AssertionError(f"{err}; last /healthz: {self.health()}") from None

    def wait_drained(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait until no destination has pending deliveries."""
        return self.wait_health(
            lambda doc: all(d["pending"] == 0 for d in doc["destinations"].values()),
            timeout_s,
            "every destination to have 0 pending",
        )

    def queue(self, *args: str) -> subprocess.CompletedProcess[str]:
        return medgw("queue", *args, "--config", str(self.config))


def medgw(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``medgw ARGS...`` as a technician would run it beside the gateway."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of a ``medgw queue`` table, cut at the header's column starts."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or lines[0] == "(none)":
        return []
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()
    rows = []
    for line in lines[1:]:
        if "=" in line and "  " not in line:  # the totals line of `queue stats`
            continue
        cells = [
            line[a:b].strip() for a, b in zip(starts, [*starts[1:], len(line) + 1], strict=True)
        ]
        rows.append(dict(zip([n.lower() for n in names], cells, strict=True)))
    return rows


class Receiver(Proc):
    def __init__(self, port: int, record: Path, *options: str) -> None:
        super().__init__(
            "receiver",
            [
                sys.executable,
                str(PEERS / "mllp_receiver.py"),
                "--port",
                str(port),
                "--record",
                str(record),
                *options,
            ],
            record.with_suffix(".log"),
        )
        self.port = port
        self.record = record

    def start(self, timeout_s: float = 20.0) -> Receiver:
        self.spawn()

        def ready() -> bool:
            if not self.running():
                raise AssertionError(f"receiver exited at start:\n{self.log_tail()}")
            return port_open(self.port)

        wait_for(ready, timeout_s, f"the receiver on port {self.port}")
        return self


class SenderProc(Proc):
    def __init__(
        self,
        port: int,
        acked: Path,
        *,
        count: int,
        connections: int,
        prefix: str,
        deadline_s: float = 120.0,
    ) -> None:
        super().__init__(
            "sender",
            [
                sys.executable,
                str(PEERS / "mllp_sender.py"),
                *("--port", str(port), "--count", str(count)),
                *("--connections", str(connections), "--prefix", prefix),
                *("--acked", str(acked), "--deadline-s", str(deadline_s)),
            ],
            acked.with_suffix(".log"),
        )
        self.acked = acked

    def start(self) -> SenderProc:
        self.spawn()
        return self

    def finish(self, timeout_s: float) -> str:
        """Wait for the sender to exit 0 and return its summary line."""
        rc = self.wait(timeout_s)
        assert rc == 0, f"sender exited {rc}:\n{self.log_tail()}"
        return self.log_tail(1)
