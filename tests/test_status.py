"""The technician view: ``GET /api/status``, the HTML page (rendered by a real headless
Chromium), ``medgw status`` and the HTTP token, through a running gateway."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway import cli
from gateway.config import load_config, parse_config
from gateway.errors import ConfigError
from gateway.registry import default_registry
from gateway.sdnotify import Notifier
from gateway.service import Gateway

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token-for-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    gw: Gateway
    config: Path
    http_port: int
    mllp_port: int
    outbox: Path


def write_config(tmp_path: Path, *, down_port: int | None, token: bool = False) -> Path:
    """An MLLP listener ``his`` routed to a folder ``outbox`` and, with ``down_port``, to
    an MLLP destination ``lis`` that nobody listens on (its breaker opens at once)."""
    mllp_port, http_port = free_port(), free_port()
    http = f"{{listen: 127.0.0.1:{http_port}"
    if token:
        (tmp_path / "http.token").write_text(TOKEN + "\n", encoding="utf-8")
        http += ", token_file: http.token"
    lines = [
        "site: {id: status-site, name: Ward 7}",
        f"state_dir: {tmp_path / 'state'}",
        f"http: {http}}}",
        "journal: {min_free_mb: 0}",
        "listeners:",
        f"  - {{id: his, type: hl7-mllp, listen: 127.0.0.1:{mllp_port}}}",
        "destinations:",
        f"  - {{id: outbox, type: folder, path: {tmp_path / 'outbox'}}}",
    ]
    to = "[outbox]"
    if down_port is not None:
        lines += [
            f"  - {{id: lis, type: hl7-mllp, connect: 127.0.0.1:{down_port},",
            "      connect_timeout_s: 1, ack_timeout_s: 2,",
            "      delivery: {breaker: {failures: 1, cooldown_s: 60}, backoff: {initial_s: 30}}}",
        ]
        to = "[outbox, lis]"
    lines += ["routes:", f"  - {{match: {{source: his}}, to: {to}}}"]
    path = tmp_path / "gateway.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@asynccontextmanager
async def running_gateway(config: Path) -> AsyncIterator[Running]:
    registry = default_registry()
    cfg = load_config(str(config), registry)
    assert cfg.http.listen is not None
    gw = Gateway(cfg, registry, notifier=Notifier(env={}), drain_grace_s=1)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop), name="gateway")
    ready = asyncio.create_task(gw.ready.wait())
    await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if not gw.ready.is_set():
        ready.cancel()
        stop.set()
        await task
        raise AssertionError("gateway did not become ready")
    mllp_port = cfg.listeners[0].listen.port
    try:
        yield Running(gw, config, cfg.http.listen.port, mllp_port, config.parent / "outbox")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def http_get(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def send_hl7(port: int, control_id: str) -> bytes:
    msg = (
        f"MSH|^~\\&|LAB|HOSP|LIS|HOSP|20240101120000||ORU^R01|{control_id}|P|2.5.1\r"
        f"OBX|1|NM|GLU||5.4|mmol/L\r"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x0b" + msg + b"\x1c\r")
    await writer.drain()
    reply = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 5)
    writer.close()
    return reply


async def medgw(*args: str) -> tuple[int, str, str]:
    """``medgw ARGS`` as a subprocess (the gateway runs in this test's event loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def with_down_destination(r: Running, token: str | None = None) -> dict[str, dict[str, Any]]:
    """Send two messages; wait until ``outbox`` has them and ``lis`` has failed."""
    for n in (1, 2):
        assert b"|AA|" in await send_hl7(r.mllp_port, f"ST-{n}")
    await until(lambda: r.gw.journal.depth().get("outbox") == {"done": 2}, what="outbox delivery")
    await until(lambda: r.gw.pumps["lis"].breaker.state == "open", what="lis breaker open")
    _, body = await http_get(r.http_port, "/api/status", token)
    doc = json.loads(body)
    return {d["id"]: d for d in doc["destinations"]}


# -- /api/status and medgw status -----------------------------------------------------------


@pytest.mark.timeout(60)
async def test_api_status_and_cli_show_a_down_destination(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_gateway(write_config(tmp_path, down_port=free_port())) as r:
        dests = await with_down_destination(r)
        status, body = await http_get(r.http_port, "/api/status")
        assert status == 200
        doc = json.loads(body)
        assert doc["site"] == "status-site"
        assert doc["state"] == "degraded"
        assert doc["uptime_s"] >= 0
        assert doc["models"] == []
        (his,) = doc["listeners"]
        assert his["id"] == "his"
        assert his["type"] == "hl7-mllp"
        assert his["state"] == "listening"
        assert his["received"] == 2
        assert his["rejected"] == 0
        assert his["last_message_at"] is not None
        assert his["connections"] in (0, 1)  # the sender's close may not be seen yet

        outbox, lis = dests["outbox"], dests["lis"]
        assert outbox["ok"] is True
        assert outbox["breaker"] == "closed"
        assert (outbox["pending"], outbox["delivered"], outbox["dead"]) == (0, 2, 0)
        assert outbox["rate"] == {"last_minute": 2, "last_hour": 2}
        assert outbox["last_error"] is None
        assert lis["ok"] is False
        assert "failing" in lis["problems"]
        assert lis["breaker"] == "open"
        assert (lis["pending"], lis["delivered"]) == (2, 0)
        assert lis["oldest_pending_s"] is not None
        assert lis["rate"] == {"last_minute": 0, "last_hour": 0}
        assert lis["last_error"]
        assert lis["last_error_at"] is not None

        code, out, err = await medgw("status", "--config", str(r.config))
        assert code == 1, err
        lines = out.splitlines()
        assert max(len(line) for line in lines) <= 100
        assert "status-site" in lines[0]
        assert "DEGRADED" in lines[0]
        row = {line.split()[0]: line for line in lines if line.split()[:1] in (["lis"], ["outbox"])}
        assert row["lis"].split()[1:4] == ["open", "2", "0"]
        assert "failing" in row["lis"]
        assert row["outbox"].split()[1:4] == ["closed", "0", "0"]
        assert any(line.startswith("his ") and "listening" in line for line in lines)

        code, out, _ = await medgw("status", "--config", str(r.config), "--json")
        assert code == 1
        assert json.loads(out)["state"] == "degraded"

    # the queue commands take the same --destination filter (the gateway is stopped now)
    capsys.readouterr()
    config = ["--config", str(r.config)]
    assert cli.main(["queue", "stats", *config, "--destination", "lis"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[:4] for line in out.splitlines()[1:-1]] == [["lis", "2", "0", "0"]]
    assert cli.main(["queue", "purge", "quarantine", *config, "--destination", "lis"]) == 2
    assert "no destination" in capsys.readouterr().err
    purge = ["queue", "purge", "delivered", "--older-than", "0", *config]
    assert cli.main([*purge, "--destination", "outbox"]) == 0
    assert capsys.readouterr().out.startswith("0 delivered")  # lis still owes both


async def test_cli_exit_codes_ok_and_unreachable(tmp_path: Path) -> None:
    async with running_gateway(write_config(tmp_path, down_port=None)) as r:
        code, out, err = await medgw("status", "--url", f"http://127.0.0.1:{r.http_port}")
        assert code == 0, err
        assert "OK" in out.splitlines()[0]
    code, out, err = await medgw("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 2
    assert "cannot reach the gateway at http://127.0.0.1:" in err
    assert out == ""


# -- tokens --------------------------------------------------------------------------------------


async def test_token_is_required_when_configured(tmp_path: Path) -> None:
    async with running_gateway(write_config(tmp_path, down_port=None, token=True)) as r:
        for path in ("/api/status", "/healthz", "/metrics", "/"):
            assert (await http_get(r.http_port, path))[0] == 401, path
            assert (await http_get(r.http_port, path, "wrong"))[0] == 401, path
            assert (await http_get(r.http_port, path, TOKEN))[0] == 200, path
        assert (await http_get(r.http_port, f"/?token={TOKEN}"))[0] == 200
        assert (await http_get(r.http_port, f"/api/status?token={TOKEN}"))[0] == 401

        code, _, err = await medgw("status", "--url", f"http://127.0.0.1:{r.http_port}")
        assert code == 2
        assert "401" in err
        code, out, err = await medgw("status", "--config", str(r.config))  # reads the token
        assert code == 0, err
        assert "status-site" in out


def test_non_loopback_listen_needs_a_token_file() -> None:
    registry = default_registry()
    with pytest.raises(ConfigError) as err:
        parse_config("site: {id: s}\nhttp: {listen: 0.0.0.0:9110}\n", registry)
    (problem,) = err.value.problems
    assert problem.startswith("http: listen 0.0.0.0:9110 is not a loopback address")
    assert "token_file" in problem
    cfg = parse_config(
        "site: {id: s}\nhttp: {listen: 0.0.0.0:9110, token_file: /etc/medgw/http.token}\n",
        registry,
    )
    assert cfg.http.token_file == Path("/etc/medgw/http.token")
    for loopback in ("127.0.0.1:9110", "[::1]:9110", "localhost:9110"):
        parse_config(f"site: {{id: s}}\nhttp: {{listen: '{loopback}'}}\n", registry)


# -- the page in a real browser ---------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (make debs installs it)",
)
@pytest.mark.parametrize("token", [False, True], ids=["loopback", "token"])
async def test_page_renders_in_headless_chromium(tmp_path: Path, token: bool) -> None:
    """With a token the page is opened once as ``/?token=`` and sends it as a header."""
    config = write_config(tmp_path, down_port=free_port(), token=token)
    async with running_gateway(config) as r:
        await with_down_destination(r, TOKEN if token else None)
        proc = await asyncio.create_subprocess_exec(
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            f"http://127.0.0.1:{r.http_port}/" + (f"?token={TOKEN}" if token else ""),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    dom = out.decode()
    assert proc.returncode == 0, err.decode()[-2000:]
    # rows exist only if the script fetched /api/status and rendered it
    assert '<tr class="bad"><td>lis</td><td>hl7-mllp</td><td>open</td><td class="num">2</td>' in dom
    assert '<tr><td>outbox</td><td>folder</td><td>closed</td><td class="num">0</td>' in dom
    assert '<span id="state" class="state-bad">degraded</span>' in dom
    assert "<td>his</td><td>hl7-mllp</td><td>listening</td>" in dom
