"""Shared fixtures: free loopback ports, a state folder, subprocess cleanup, chunked sends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from peers.gateway_proc import Proc, pick_free_port
from pynetdicom import _config


@pytest.fixture
def free_port() -> Callable[[], int]:
    """Call it for a loopback port that was free just now (a new one each call)."""
    given: set[int] = set()

    def pick() -> int:
        while (port := pick_free_port()) in given:
            pass
        given.add(port)
        return port

    return pick


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """The gateway's state folder (journal and blobs), inside the test's tmp_path."""
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Append subprocesses here; any still running at the end are killed (by pid)."""
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        if proc.running():
            proc.kill()
        print(f"{proc.name} log: {proc.log}")  # shown with a failing test's report


@pytest.fixture
def chunked_send() -> Iterator[None]:
    """Let pynetdicom send files as stored (no decode), like ``medgw dicom send``."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = before
