"""A connected pair of pseudo-terminals made by socat: a null-modem cable for serial tests.

``socat_pty_pair(tmp_path)`` starts ``socat -d -d pty,raw,echo=0,link=A
pty,raw,echo=0,link=B``, waits until both links exist and socat is relaying, and
yields ``(A, B, pid)``; bytes written to one end are read at the other. Kill the
pid to "unplug" the cable (SIGTERM also removes the links); starting a new pair
with the same names plugs it back. The process is stopped by pid on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

READY = b"starting data transfer loop"


@contextlib.contextmanager
def socat_pty_pair(
    tmp_path: Path, names: tuple[str, str] = ("ttyA", "ttyB"), timeout_s: float = 5.0
) -> Iterator[tuple[Path, Path, int]]:
    socat = shutil.which("socat")
    if socat is None:
        pytest.skip("socat is not installed")
    a, b = tmp_path / names[0], tmp_path / names[1]
    for link in (a, b):
        link.unlink(missing_ok=True)  # left behind by a socat that was SIGKILLed
    log_path = tmp_path / f"socat-{names[0]}-{names[1]}.log"
    start = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not (a.exists() and b.exists() and READY in log_path.read_bytes()[start:]):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = log_path.read_bytes()[start:].decode(errors="replace")
                raise RuntimeError(f"socat did not make the pty pair; its log:\n{log}")
            time.sleep(0.01)
        yield a, b, proc.pid
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by pid (a no-op if it is gone already), then SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
