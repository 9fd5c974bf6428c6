"""Configuration: the shipped file, broken files through `medgw check-config`, the models.

Each file in tests/configs/broken/ states what `check-config` must report in its
``# expect:`` header lines (``...`` matches any text); the test requires exactly
those problems (one per line of stderr, in any order), exit code 2 and nothing on
stdout.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import (
    Endpoint,
    GatewayConfig,
    Route,
    format_loc,
    parse_config,
    parse_endpoint,
    summary,
)
from gateway.envelope import Envelope
from gateway.errors import ConfigError
from gateway.registry import default_registry
from gateway.router import Router

REPO = Path(__file__).resolve().parents[1]
BROKEN = Path(__file__).resolve().parent / "configs" / "broken"
SHIPPED = REPO / "config" / "gateway.yaml"
MEDGW = [sys.executable, "-m", "gateway.cli"]

BROKEN_FILES = sorted(BROKEN.glob("*.yaml"))
WITH_LINE = re.compile(r"^\S+: .+ \(line \d+\)$")


def medgw(*args: str, cwd: Path = REPO, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [*MEDGW, *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=env,
    )


def expectations(path: Path) -> list[str]:
    return [
        line.removeprefix("# expect:").strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.startswith("# expect:")
    ]


def expect_pattern(want: str) -> re.Pattern[str]:
    """An expectation as a regex: literal text, where ``...`` stands for any text (lists
    of installed plugin types, which grow as plugins are added)."""
    return re.compile(".*".join(re.escape(part) for part in want.split("...")))


@pytest.fixture(scope="module")
def broken_results() -> dict[str, subprocess.CompletedProcess[str]]:
    """`medgw check-config` over every broken file, run in parallel once per module."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = pool.map(lambda p: medgw("check-config", str(p)), BROKEN_FILES)
        return {p.name: r for p, r in zip(BROKEN_FILES, results, strict=True)}


# -- the shipped config ------------------------------------------------------------------


SUMMARY = re.compile(
    r"^OK: site (\S+): (\d+) listener\(s\), (\d+) destination\(s\), (\d+) route\(s\), "
    r"state in (.+)$"
)


def test_shipped_config_is_valid() -> None:
    result = medgw("check-config", str(SHIPPED))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    m = SUMMARY.match(lines[0])
    assert m, lines[0]
    cfg = parse_config(SHIPPED.read_text(encoding="utf-8"), default_registry(), source="x")
    assert m.groups() == (
        cfg.site.id,
        str(len(cfg.listeners)),
        str(len(cfg.destinations)),
        str(len(cfg.routes)),
        str(cfg.state_dir),
    )


def test_shipped_config_runs_without_external_servers() -> None:
    """ARCHITECTURE.md: loopback listeners, deliveries to a local folder, all routed."""
    cfg = parse_config(SHIPPED.read_text(encoding="utf-8"), default_registry(), source="x")
    assert cfg.listeners and cfg.destinations and cfg.routes
    for listener in cfg.listeners:
        listen = getattr(listener, "listen", None)
        if listen is not None:
            assert listen.host in ("127.0.0.1", "::1", "localhost"), listener.id
    assert cfg.http.listen is not None
    assert cfg.http.listen.host == "127.0.0.1"
    assert any(d.type == "folder" for d in cfg.destinations)
    assert summary(cfg).startswith(f"OK: site {cfg.site.id}:")


# -- broken files ------------------------------------------------------------------------


def test_there_are_enough_broken_files() -> None:
    assert len(BROKEN_FILES) >= 16
    for path in BROKEN_FILES:
        assert expectations(path), f"{path.name} has no '# expect:' line"


@pytest.mark.parametrize("path", BROKEN_FILES, ids=[p.stem for p in BROKEN_FILES])
def test_broken_config_is_rejected(
    path: Path, broken_results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    result = broken_results[path.name]
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    header, *problems = result.stderr.splitlines()
    problems = [p.strip() for p in problems]
    expected = expectations(path)
    assert header == f"{path}: {len(expected)} error(s)"
    assert len(problems) == len(expected), problems
    for want in expected:
        assert any(expect_pattern(want).search(p) for p in problems), (
            f"missing {want!r} in {problems}"
        )
    file_level = any(p.startswith(str(path)) for p in problems)
    if not file_level:  # path-level problems name their path and line
        for p in problems:
            assert WITH_LINE.match(p), p


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    result = medgw("check-config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_refuses_a_broken_config(tmp_path: Path) -> None:
    """`medgw run` with an invalid file exits 2 before opening the journal or binding."""
    port = free_port()
    state = tmp_path / "state"
    cfg = tmp_path / "broken.yaml"
    cfg.write_text(
        f"site: {{id: t1}}\n"
        f"state_dir: {state}\n"
        f"http: {{listen: null}}\n"
        f"listeners:\n"
        f"  - {{id: his, type: hl7-mllp, listen: 127.0.0.1:{port}}}\n"
        f"routes:\n"
        f"  - {{match: {{source: his}}, to: [nowhere]}}\n",
        encoding="utf-8",
    )
    result = medgw("run", "--config", str(cfg), cwd=tmp_path, timeout=20)
    assert result.returncode == 2, result.stderr
    assert "routes[0].to[0]: unknown destination 'nowhere' (known: none) (line 7)" in result.stderr
    assert not state.exists()  # the journal was never opened
    with socket.socket() as s:  # and the listener's port is free
        s.bind(("127.0.0.1", port))


# -- line numbers and error cascades (bugs found by these tests, now fixed) ----------


def test_line_of_an_unknown_key_with_a_block_value_is_the_key_line() -> None:
    text = "site: {id: t1}\nlistners:\n  - {id: his, type: hl7-mllp, listen: 127.0.0.1:2575}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, default_registry())
    assert info.value.problems == ["listners: unknown setting (line 2)"]


def test_invalid_listener_does_not_cascade_into_route_errors() -> None:
    text = (
        "site: {id: t1}\n"
        "listeners:\n"
        "  - {id: his, type: hl7-mllp, listen: 127.0.0.1:70000}\n"
        "destinations:\n"
        "  - {id: outbox, type: folder, path: ./out}\n"
        "routes:\n"
        "  - {match: {source: his}, to: [outbox]}\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, default_registry())
    assert info.value.problems == ["listeners[0].listen: port must be 1..65535 (line 3)"]


# -- parse_endpoint -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:2575", Endpoint("127.0.0.1", 2575)),
        ("localhost:1", Endpoint("localhost", 1)),
        ("  lis.hospital.local:65535 ", Endpoint("lis.hospital.local", 65535)),
        ("[::1]:2575", Endpoint("::1", 2575)),
        ("[fe80::1]:104", Endpoint("fe80::1", 104)),
    ],
)
def test_parse_endpoint_valid(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("127.0.0.1:0", "port must be 1..65535"),
        ("127.0.0.1:65536", "port must be 1..65535"),
        ("127.0.0.1:-1", "port must be 1..65535"),
        ("127.0.0.1:http", "port must be a number 1..65535, got 'http'"),
        ("127.0.0.1:", "port must be a number 1..65535, got ''"),
        ("127.0.0.1", "expected 'host:port'"),
        (":2575", "expected 'host:port'"),
        ("::1:2575", "write IPv6 addresses as '[addr]:port'"),
        ("[::1:2575", "unbalanced brackets"),
        ("[not-an-address]:2575", "not-an-address"),
        (2575, "expected 'host:port'"),
        (None, "expected 'host:port'"),
    ],
)
def test_parse_endpoint_invalid(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_endpoint(value)


def test_endpoint_passthrough_and_str() -> None:
    ep = Endpoint("::1", 2575)
    assert parse_endpoint(ep) is ep
    assert str(ep) == "[::1]:2575"
    assert parse_endpoint(str(ep)) == ep
    assert str(Endpoint("10.0.0.7", 2576)) == "10.0.0.7:2576"


def test_format_loc() -> None:
    assert format_loc(("listeners", 1, "listen")) == "listeners[1].listen"
    assert format_loc(("routes", 0, "to", 2)) == "routes[0].to[2]"
    assert format_loc(()) == "(top level)"


# -- routes -------------------------------------------------------------------------------


def test_route_match_string_values() -> None:
    route = Route(match={"source": "his", "kind": "hl7"}, to=["outbox"])
    assert route.matches("hl7", "his", {})
    assert not route.matches("hl7", "lab", {})
    assert not route.matches("astm", "his", {})


def test_route_match_list_means_any_of() -> None:
    route = Route(
        match={"source": ["his", "lab"], "message_type": ["ORU^R01", "ORM^O01"]}, to=["x"]
    )
    assert route.matches("hl7", "lab", {"message_type": "ORM^O01"})
    assert route.matches("hl7", "his", {"message_type": "ORU^R01"})
    assert not route.matches("hl7", "his", {"message_type": "ADT^A01"})
    assert not route.matches("hl7", "ris", {"message_type": "ORU^R01"})


def test_route_match_header_keys() -> None:
    route = Route(match={"modality": "CR"}, to=["pacs"])
    assert route.matches("dicom", "scp", {"modality": "CR", "other": "x"})
    assert not route.matches("dicom", "scp", {"modality": "CT"})
    assert not route.matches("dicom", "scp", {})  # a missing header never matches


def test_route_without_match_matches_everything() -> None:
    assert Route(to=["outbox"]).matches("anything", "anyone", {})


def test_route_needs_to_or_steps() -> None:
    with pytest.raises(ValidationError, match="a route needs 'to'"):
        Route(match={"source": "his"})
    assert [name for name, _ in Route(steps=["map"]).steps] == ["map"]


def test_router_fans_out_without_duplicates() -> None:
    router = Router(
        (
            Route(match={"source": "his"}, to=["outbox", "lis"]),
            Route(match={"kind": "hl7"}, to=["lis", "archive"]),
            Route(match={"source": "lab"}, to=["never"]),
        )
    )
    env = Envelope(kind="hl7", source="his", body=b"x")
    assert router.destinations(env) == ["outbox", "lis", "archive"]
    assert router.destinations(Envelope(kind="astm", source="ecg", body=b"")) == []


# -- models are frozen ----------------------------------------------------------------------


def test_models_are_frozen() -> None:
    cfg = parse_config(SHIPPED.read_text(encoding="utf-8"), default_registry())
    assert isinstance(cfg, GatewayConfig)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.site.id = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.state_dir = Path("/tmp")  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.listeners[0].listen = Endpoint("0.0.0.0", 1)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.destinations[0].delivery.workers = 8
    with pytest.raises(ValidationError, match="frozen"):
        cfg.routes[0].to = ["elsewhere"]  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.listeners[0].listen.port = 1  # type: ignore[misc]
    assert isinstance(cfg.listeners, tuple)
    assert isinstance(cfg.routes, tuple)


def test_defaults_of_delivery_policy() -> None:
    cfg = parse_config(
        "site: {id: t1}\ndestinations: [{id: o, type: folder, path: ./o}]\n", default_registry()
    )
    policy = cfg.destinations[0].delivery
    assert policy.workers == 1
    assert policy.ordered is True
    assert policy.max_attempts is None  # never gives up on clinical data by default
    assert cfg.journal.min_free_mb == 512
    assert cfg.http.listen == Endpoint("127.0.0.1", 9110)
