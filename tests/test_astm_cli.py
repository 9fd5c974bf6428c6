"""The technicians' lab tools as they run them: ``medgw drivers list``, ``medgw drivers sniff``
(a file, a live line), ``medgw astm replay`` against the running gateway (results into a
folder, a host query answered from the LIS's orders), and ``check-config`` of analyzer
listeners."""

from __future__ import annotations

import asyncio
import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from lab_samples import SAMPLES, entry
from peers.gateway_proc import Gateway, medgw, pick_free_port, wait_for

from drivers.astm.cli import LinkPump, messages_in_capture, replay, sniff
from drivers.astm.link import AstmLink
from drivers.transports import TransportSettings

needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason="no sample captures")
SHIPPED = Path(__file__).resolve().parents[1] / "config" / "drivers"
VT, FS, CR = b"\x0b", b"\x1c", b"\r"


def sample(prefix: str) -> Path:
    name: str = entry(prefix)["file"]
    return SAMPLES / name


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


# -- drivers list ----------------------------------------------------------------------------


def test_drivers_list_shows_the_shipped_profiles(tmp_path: Path) -> None:
    done = medgw("drivers", "list", "--config-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1] for line in lines(done.stdout)}
    shipped = {p.stem for p in SHIPPED.glob("*.yaml")}
    assert set(rows) == shipped
    assert len(shipped) == 16
    assert rows["sysmex-xn"] == "astm"
    assert rows["biosystems-ba400"] == rows["mindray-bs"] == "hl7"
    assert "Sysmex XN series hematology (ASTM) (XN-10, XN-20" in done.stdout


def test_drivers_list_with_site_profiles(tmp_path: Path) -> None:
    site = tmp_path / "drivers"
    site.mkdir()
    (site / "our-analyzer.yaml").write_text(
        "title: Our bench analyzer\nprotocol: astm\nmodels: [Bench 1]\n", encoding="utf-8"
    )
    done = medgw("drivers", "list", "--config-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "our-analyzer           astm  Our bench analyzer (Bench 1)" in done.stdout
    (site / "broken.yaml").write_text("title: x\nprotocol: smtp\n", encoding="utf-8")
    bad = medgw("drivers", "list", "--config-dir", str(tmp_path))
    assert bad.returncode == 2
    assert "broken.yaml: protocol" in bad.stderr


# -- drivers sniff ---------------------------------------------------------------------------


@needs_samples
def test_sniff_file_masks_the_patient() -> None:
    done = medgw("drivers", "sniff", "--file", str(sample("02")))
    assert done.returncode == 0, done.stderr
    out = lines(done.stdout)
    assert out[0] == "message 1 (1508 bytes):"
    assert out[1] == "H|\\^&|||ABX|||||||P|E1394-97|20220727121551"
    assert out[2] == "P|1||||***||***|F"
    assert "R|10|^^^BAS#^704-7^1|-----|1||HH||X||NNE NNEMT||20220727121550" in out
    assert "C|1|I|Alarm_WBC^LMNE-^BASO+^LL^NL^LN^NO^SL1|I" in out
    assert out[-1] == "L|1|N"
    assert "Mohale" not in done.stdout and "19771201" not in done.stdout


@needs_samples
def test_sniff_file_shows_the_patient_when_asked() -> None:
    done = medgw("drivers", "sniff", "--file", str(sample("02")), "--show-patient")
    assert done.returncode == 0, done.stderr
    assert "P|1||||Mohale^Rita||19771201|F" in lines(done.stdout)


@needs_samples
def test_sniff_file_of_other_captures() -> None:
    xn = medgw("drivers", "sniff", "--file", str(sample("04")))
    assert xn.returncode == 0, xn.stderr
    p_record = next(line for line in lines(xn.stdout) if line.startswith("P|"))
    assert p_record.startswith("P|1|||***|***||***|M|")
    for secret in ("37182", "Jim", "Brown", "19870626"):
        assert secret not in xn.stdout
    assert "R|41|^^^^DIST_PLT|PNG&R&20240628&R&2024_06_27_13_54_27_PLT.PNG" in xn.stdout
    genexpert = medgw("drivers", "sniff", "--file", str(sample("05")))
    assert genexpert.returncode == 0, genexpert.stderr
    assert "H|@^\\|URM-8lT4abZA-06||.806149 Happy Hospital^GeneXpert^4.8" in genexpert.stdout
    assert genexpert.stdout.count("\n  R|") == 84
    e411 = medgw("drivers", "sniff", "--file", str(sample("07")))  # a record split by ETB
    assert "R|2|^^^900/1/not|-1^0.521|COI||N||F||ADMIN|||E1" in lines(e411.stdout)


@needs_samples
def test_sniff_file_that_is_not_astm(tmp_path: Path) -> None:
    done = medgw("drivers", "sniff", "--file", str(sample("14")))  # Sysmex class A
    assert done.returncode == 1
    assert done.stderr.startswith("medgw drivers sniff: frame 1:")
    missing = medgw("drivers", "sniff", "--file", str(tmp_path / "none.bin"))
    assert missing.returncode == 1
    assert "none.bin" in missing.stderr
    nothing = medgw("drivers", "sniff")
    assert nothing.returncode == 2
    assert "give a LINE" in nothing.stderr


async def replay_when_listening(
    messages: list[bytes], port: int, out: io.StringIO, **options: Any
) -> int:
    """In-process replay, retried until the listener is up (a probe connection would be
    taken as the analyzer's line)."""
    settings = TransportSettings.model_validate({"tcp_connect": f"127.0.0.1:{port}"})
    deadline = time.monotonic() + 10
    while True:
        try:
            return await replay(messages, settings, frame_size=247, out=out, **options)
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "the sniffer never listened"
            await asyncio.sleep(0.02)


@needs_samples
async def test_live_sniff_acks_everything_and_prints_masked_records() -> None:
    port = pick_free_port()
    settings = TransportSettings.model_validate({"tcp_listen": f"127.0.0.1:{port}"})
    seen = io.StringIO()
    sniffer = asyncio.create_task(
        sniff(settings, encoding="latin-1", show_patient=False, seconds=10, out=seen)
    )
    sent = io.StringIO()
    messages = messages_in_capture(sample("02").read_bytes())
    failed = await replay_when_listening(messages, port, sent, answer_wait_s=0)
    assert failed == 0
    assert sent.getvalue() == "message 1: sent (1508 bytes)\n"
    await asyncio.wait({sniffer}, timeout=5)  # ends when the analyzer hangs up
    assert sniffer.done()
    ended = sniffer.exception()
    assert isinstance(ended, ConnectionError) and str(ended) == "the line closed"
    out = lines(seen.getvalue())
    assert out[0] == "message (1508 bytes):"
    assert "P|1||||***||***|F" in out
    assert "R|21|^^^RDWSD^2100-5^1|43|1||||F||NNE NNEMT||20220727121550" in out
    assert out[-1] == "end of transfer"
    assert "Mohale" not in seen.getvalue()


# -- the link pump ---------------------------------------------------------------------------


class ScriptedLine:
    """A line whose writes take the event loop a turn (as a serial port's do)."""

    peer = "scripted"

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[bytes] = asyncio.Queue()
        self.written: list[bytes] = []

    async def read(self) -> bytes:
        return await self.incoming.get()

    async def write(self, data: bytes) -> None:
        self.written.append(data)
        for _ in range(3):
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        return None


class RecordingLink:
    def __init__(self) -> None:
        self.outgoing = [b"\x04"]  # our EOT: the host may answer ENQ at once
        self.received: list[bytes] = []

    def data_to_send(self) -> bytes:
        return self.outgoing.pop() if self.outgoing else b""

    def next_deadline(self) -> float | None:
        return None

    def receive(self, data: bytes, now: float) -> list[object]:
        self.received.append(data)
        return []

    def tick(self, now: float) -> list[object]:
        return []


async def test_bytes_arriving_between_two_runs_are_not_lost() -> None:
    line, link = ScriptedLine(), RecordingLink()
    pump = LinkPump(line, cast(AstmLink, link))
    line.incoming.put_nowait(b"\x05")  # the host's ENQ, there while our EOT goes out
    await pump.run(lambda event: [], lambda: True, timeout_s=1.0)
    assert line.written == [b"\x04"]
    await pump.run(lambda event: [], lambda: bool(link.received), timeout_s=1.0)
    pump.close()
    assert link.received == [b"\x05"]


# -- astm replay against the gateway --------------------------------------------------------


def gateway_config(tmp: Path, ports: dict[str, int]) -> Path:
    doc = {
        "site": {"id": "cli-test"},
        "state_dir": str(tmp / "state"),
        "http": {"listen": f"127.0.0.1:{ports['http']}"},
        "journal": {"min_free_mb": 0},
        "logging": {"level": "INFO", "format": "text"},
        "listeners": [
            {
                "id": "indiko",
                "type": "astm",
                "profile": "thermo-indiko",
                "transport": {"tcp_listen": f"127.0.0.1:{ports['astm']}"},
            },
            {"id": "lis", "type": "hl7-mllp", "listen": f"127.0.0.1:{ports['lis']}"},
        ],
        "destinations": [{"id": "results", "type": "folder", "path": str(tmp / "results")}],
        "routes": [
            {"id": "results", "match": {"kind": "lab-result"}, "to": ["results"]},
            {"id": "orders", "match": {"source": "lis"}, "steps": ["lab-orders"]},
        ],
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, dict[str, int]]]:
    tmp = tmp_path_factory.mktemp("astm-cli")
    ports = {name: pick_free_port() for name in ("http", "astm", "lis")}
    gw = Gateway(gateway_config(tmp, ports), ports["http"], ports["lis"])
    try:
        gw.start()
        yield gw, ports
    finally:
        if gw.running():
            gw.terminate()
        print(f"gateway log: {gw.log}")


def results_folder(gw: Gateway) -> Path:
    return gw.config.parent / "results"


def delivered(folder: Path) -> list[Path]:
    """Files the folder destination finished (one being written is a hidden temp file)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def send_lis_order(port: int, message: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(VT + message + FS + CR)
        reply = b""
        while not reply.endswith(FS + CR):
            chunk = s.recv(65536)
            assert chunk, "the LIS listener closed"
            reply += chunk
    return reply


@needs_samples
def test_replay_reaches_a_folder_through_the_gateway(
    gateway: tuple[Gateway, dict[str, int]],
) -> None:
    gw, ports = gateway
    folder = results_folder(gw)
    for n, prefix in enumerate(("02", "09"), 1):  # 1508 bytes: 7 frames of 247; then ARCHITECT
        done = medgw(
            "astm", "replay", str(sample(prefix)), "--to", f"127.0.0.1:{ports['astm']}",
            "--answer-wait", "0",
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        (message,) = messages_in_capture(sample(prefix).read_bytes())
        assert done.stdout == f"message 1: sent ({len(message)} bytes)\n"

        def done_files(n: int = n) -> list[Path] | None:
            found = delivered(folder)
            return found if len(found) == n else None

        files = wait_for(done_files, 10, f"{n} result file(s) in {folder}")
        assert files[-1].read_bytes() == message  # the analyzer's message, byte-exact


@needs_samples
def test_replay_of_a_host_query_prints_the_answer(gateway: tuple[Gateway, dict[str, int]]) -> None:
    gw, ports = gateway
    target = f"127.0.0.1:{ports['astm']}"
    query = str(sample("10"))  # Q|1|^2240801063^^||^^^ALL^||||||||O

    none = medgw("astm", "replay", query, "--to", target, "--answer-wait", "1")
    assert none.returncode == 0, none.stdout + none.stderr
    out = lines(none.stdout)
    assert out[0] == "message 1: sent (91 bytes)"
    assert out[1] == "answer from the host:"
    assert out[2].startswith("H|\\^&|||MEDGW|||||||P|LIS2-A2|")
    assert out[3:] == ["L|1|I"]  # no information: no order yet

    order = (
        b"MSH|^~\\&|LIS|HOSP|MEDGW|LAB|20240805050000||OML^O21^OML_O21|LIS-CLI-1|P|2.5.1\r"
        b"PID|1||BN4711^^^HOSP||Tran^Thi Lan||19851224|F\r"
        b"ORC|NW|ORD-4711\rOBR|1|ORD-4711||GLU\rSPM|1|2240801063||SER\r"
        b"ORC|NW|ORD-4711\rOBR|2|ORD-4711||CHOL\rSPM|1|2240801063||SER\r"
    )
    assert b"MSA|AA|LIS-CLI-1" in send_lis_order(ports["lis"], order)
    state = gw.config.parent / "state" / "lab_orders.sqlite"
    wait_for(state.exists, 10, "the lab orders table")

    def answered() -> list[str] | None:
        done = medgw("astm", "replay", query, "--to", target, "--answer-wait", "1")
        assert done.returncode == 0, done.stdout + done.stderr
        got = lines(done.stdout)
        return got if any(line.startswith("O|") for line in got) else None

    masked = wait_for(answered, 15, "an answer with the order")
    p_record = next(line for line in masked if line.startswith("P|"))
    assert p_record == "P|1|***|||***||***|F"
    assert "O|1|2240801063||^^^GLU\\^^^CHOL|||||||N||||||||||||||Q" in masked
    assert masked[-1] == "L|1|N"
    assert "Tran" not in "\n".join(masked)

    shown = medgw("astm", "replay", query, "--to", target, "--answer-wait", "1", "--show-patient")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "P|1|BN4711|||Tran^Thi Lan||19851224|F" in lines(shown.stdout)


def test_replay_errors(tmp_path: Path) -> None:
    port = pick_free_port()  # nobody listens there
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    no_message = medgw("astm", "replay", str(empty), "--to", f"127.0.0.1:{port}")
    assert no_message.returncode == 2
    assert "no H..L message" in no_message.stderr
    records = tmp_path / "records.txt"
    records.write_bytes(b"H|\\^&\nP|1\nL|1|N\n")  # plain record text with LF line ends
    refused = medgw("astm", "replay", str(records), "--to", f"127.0.0.1:{port}")
    assert refused.returncode == 1
    assert refused.stderr.startswith("medgw astm replay:")


# -- check-config -----------------------------------------------------------------------------


def astm_config(tmp_path: Path, *listeners: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "site: {id: s}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "http: {listen: null}\n"
        "listeners:\n"
        + "".join(f"  - {listener}\n" for listener in listeners)
        + f"destinations:\n  - {{id: out, type: folder, path: {tmp_path / 'out'}}}\n"
        + "routes:\n  - {match: {source: a0}, to: [out]}\n",
        encoding="utf-8",
    )
    return path


def test_check_config_errors_name_each_listener_setting(tmp_path: Path) -> None:
    config = astm_config(
        tmp_path,
        "{id: a0, type: astm, profile: cobas-9000, transport: {tcp_listen: 127.0.0.1:5001}}",
        "{id: a1, type: astm, profile: sysmex-xn,"
        " transport: {tcp_listen: 127.0.0.1:5002, baudrate: 9600}}",
        "{id: a2, type: astm, profile: mindray-bs, transport: {tcp_listen: 127.0.0.1:5003}}",
        "{id: a3, type: astm, profile: sysmex-xn, transport: {serial: /dev/ttyS0, parity: X}}",
        "{id: a4, type: astm, profile: sysmex-xn, transport: {tcp_listen: 127.0.0.1:5004}}",
    )
    done = medgw("check-config", str(config))
    assert done.returncode == 2
    problems = lines(done.stderr)
    assert problems[0] == f"{config}: 4 error(s)"
    assert problems[1].startswith(
        "listeners[0].profile: unknown profile 'cobas-9000' (known: abbott-architect,"
    )
    assert problems[1].endswith("(line 5)")
    assert problems[2:] == [
        "listeners[1].transport.baudrate: only allowed with serial (line 6)",
        "listeners[2].profile: profile 'mindray-bs' is for HL7 analyzers"
        " (use type: hl7-mllp with it) (line 7)",
        "listeners[3].transport.parity: must be one of N, E, O, M, S (line 8)",
    ]


def test_check_config_accepts_profile_line_defaults(tmp_path: Path) -> None:
    config = astm_config(
        tmp_path,
        "{id: a0, type: astm, profile: sysmex-xn, transport: {tcp_listen: 127.0.0.1:5001}}",
        "{id: a1, type: astm, profile: sysmex-xn, transport: {serial: /dev/ttyUSB7}}",
    )
    done = medgw("check-config", str(config))
    assert done.returncode == 0, done.stderr


def test_check_config_accepts_a_profile_on_a_serial_over_ip_box(tmp_path: Path) -> None:
    config = astm_config(
        tmp_path,
        "{id: a0, type: astm, profile: sysmex-xn, transport: {serial: 'socket://10.0.0.9:4001'}}",
    )
    done = medgw("check-config", str(config))
    assert done.returncode == 0, done.stderr
