"""HL7 analyzers on an ``hl7-mllp`` listener with a ``profile:``, through the running gateway:
results ACKed after the journal (BA400 OUL^R22, Mindray ORU^R01), IHE LAW QBP^Q11 and
Mindray QRY^Q02 answered from the lab orders the LIS sent, analyzers' ACKs dropped, and
configuration errors for profiles that do not fit."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lab_samples import SAMPLES, entry
from peers.gateway_proc import medgw, pick_free_port

from drivers.hl7.settings import MllpListenerSettings
from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.registry import default_registry
from gateway.service import Gateway

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason="no sample captures")


def sample_messages(prefix: str) -> list[bytes]:
    """The messages of an MLLP capture, without their framing."""
    data = (SAMPLES / entry(prefix)["file"]).read_bytes()
    return [m.lstrip(VT) for m in data.split(FS + CR) if m.strip()]


def hl7(*segments: str) -> bytes:
    return ("\r".join(segments) + "\r").encode("utf-8")


def segments(raw: bytes) -> dict[str, list[str]]:
    """First segment of each name, split into fields (MSH-1 is not a field here)."""
    out: dict[str, list[str]] = {}
    for line in raw.decode("utf-8").split("\r"):
        if line:
            out.setdefault(line[:3], line.split("|"))
    return out


def all_segments(raw: bytes, name: str) -> list[list[str]]:
    return [s.split("|") for s in raw.decode("utf-8").split("\r") if s.startswith(name)]


# -- harness ---------------------------------------------------------------------------------


@dataclass
class Lab:
    gw: Gateway
    ports: dict[str, int]
    state: Path
    outbox: Path
    qc: Path

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(f"file:{self.state / 'journal.sqlite'}?mode=ro", uri=True) as c:
            return list(c.execute(sql, args))

    def envelopes(self, source: str) -> list[tuple[str, dict[str, str], str | None]]:
        """(kind, headers, idem_key) of what the listener ``source`` journaled (not what
        route steps derived from it), oldest first."""
        sql = (
            "SELECT kind, headers, idem_key FROM envelopes"
            " WHERE source = ? AND parent_id IS NULL ORDER BY seq"
        )
        return [(kind, json.loads(h), key) for kind, h, key in self.rows(sql, source)]

    def order_count(self, specimen: str) -> int:
        path = self.state / "lab_orders.sqlite"
        if not path.exists():
            return 0
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as c:
            sql = "SELECT COUNT(*) FROM lab_orders WHERE specimen_id = ?"
            return int(c.execute(sql, (specimen,)).fetchone()[0])


def lab_config(tmp_path: Path, ports: dict[str, int]) -> str:
    state, outbox, qc = tmp_path / "state", tmp_path / "outbox", tmp_path / "qc"
    return (
        "site: {id: lab-site}\n"
        f"state_dir: {state}\n"
        "http: {listen: null}\n"
        "journal: {min_free_mb: 0}\n"
        "listeners:\n"
        f"  - {{id: ba400, type: hl7-mllp, listen: 127.0.0.1:{ports['ba400']},"
        " profile: biosystems-ba400}\n"
        f"  - {{id: bs200, type: hl7-mllp, listen: 127.0.0.1:{ports['bs200']},"
        " profile: mindray-bs}\n"
        f"  - {{id: lis, type: hl7-mllp, listen: 127.0.0.1:{ports['lis']}}}\n"
        "destinations:\n"
        f"  - {{id: outbox, type: folder, path: {outbox}}}\n"
        f"  - {{id: qc, type: folder, path: {qc}}}\n"
        "routes:\n"
        "  - {id: orders, match: {source: lis}, steps: [lab-orders]}\n"
        "  - {id: results, match: {kind: lab-result, qc: 'false'},"
        " steps: [map-codes, hl7-oru], to: [outbox]}\n"
        "  - {id: qc-results, match: {kind: lab-result, qc: 'true'},"
        " steps: [map-codes, hl7-oru], to: [qc]}\n"
    )


@asynccontextmanager
async def running_lab(tmp_path: Path) -> AsyncIterator[Lab]:
    ports = {name: pick_free_port() for name in ("ba400", "bs200", "lis")}
    text = lab_config(tmp_path, ports)
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(text, encoding="utf-8")
    registry = default_registry()
    gw = Gateway(parse_config(text, registry, source=str(config_file)), registry, drain_grace_s=2)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop), name="gateway")
    ready = asyncio.create_task(gw.ready.wait())
    await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if not gw.ready.is_set():
        ready.cancel()
        stop.set()
        await task  # raises the start failure
        raise AssertionError("gateway did not become ready")
    try:
        yield Lab(gw, ports, tmp_path / "state", tmp_path / "outbox", tmp_path / "qc")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


class Analyzer:
    """An MLLP peer: writes framed messages, reads framed replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buf = b""

    async def send(self, message: bytes) -> None:
        self.writer.write(VT + message + FS + CR)
        await self.writer.drain()

    async def reply(self, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            start = self.buf.find(VT)
            end = self.buf.find(FS + CR, start + 1) if start >= 0 else -1
            if end >= 0:
                msg, self.buf = self.buf[start + 1 : end], self.buf[end + 2 :]
                return msg
            data = await asyncio.wait_for(
                self.reader.read(65536), max(0.01, deadline - time.monotonic())
            )
            if not data:
                raise EOFError(f"closed; unframed bytes: {self.buf!r}")
            self.buf += data

    async def request(self, message: bytes, replies: int = 1) -> list[bytes]:
        await self.send(message)
        return [await self.reply() for _ in range(replies)]


@asynccontextmanager
async def analyzer(port: int) -> AsyncIterator[Analyzer]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    peer = Analyzer(reader, writer)
    try:
        yield peer
    finally:
        writer.close()
        await writer.wait_closed()


async def until(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def oml_o21(control_id: str, specimen: str, *tests: str, control: str = "NW") -> bytes:
    """The LIS's order for one specimen (LIS test codes), one ORC/OBR/SPM per test."""
    lines = [
        f"MSH|^~\\&|LIS|HOSP|MEDGW|LAB|20240601080000||OML^O21^OML_O21|{control_id}|P|2.5.1",
        "PID|1||BN9^^^HOSP||Doe^Jane||19700101|F",
    ]
    for n, test in enumerate(tests, 1):
        lines += [f"ORC|{control}|ORD-{specimen}", f"OBR|{n}|ORD-{specimen}||{test}"]
        lines.append(f"SPM|{n}|{specimen}||SER")
    return hl7(*lines)


async def order_from_lis(lab: Lab, message: bytes, specimen: str, rows: int = 1) -> None:
    async with analyzer(lab.ports["lis"]) as lis:
        (ack,) = await lis.request(message)
    assert segments(ack)["MSA"][1] == "AA"
    await until(lambda: lab.order_count(specimen) == rows, f"the order for {specimen}")


# -- results ---------------------------------------------------------------------------------


@needs_samples
async def test_ba400_results_are_acked_after_the_journal(tmp_path: Path) -> None:
    (oul,) = sample_messages("11")
    async with running_lab(tmp_path) as lab, analyzer(lab.ports["ba400"]) as ba400:
        (ack,) = await ba400.request(oul)
        seg = segments(ack)
        # enhanced mode (MSH-15 ER, MSH-16 AL): the ACK itself asks for no ACK (NE, NE)
        assert seg["MSH"][8] == "ACK^R22^ACK"
        assert seg["MSH"][2:6] == ["Host", "Host provider", "BA400", "Biosystems"]
        assert (seg["MSH"][14], seg["MSH"][15]) == ("NE", "NE")
        assert seg["MSA"][1:3] == ["AA", "f7c9b548-0a48-49c2-9223-9f488efbfdeb"]
        ((kind, headers, key),) = lab.envelopes("ba400")  # journaled before the ACK
        assert kind == "lab-result"
        assert {k: headers[k] for k in ("protocol", "profile", "qc", "instrument")} == {
            "protocol": "hl7",
            "profile": "biosystems-ba400",
            "qc": "false",
            "instrument": "ba400",
        }
        assert headers["message_type"] == "OUL^R22"
        assert key is not None and key.startswith("lab:ba400:")

        (again,) = await ba400.request(oul)  # a resend: ACKed, stored once
        assert segments(again)["MSA"][1] == "AA"
        assert len(lab.envelopes("ba400")) == 1

        qc = oul.replace(b"SPM|1|PATIENT32988998||SER|||||||P|", b"SPM|1|CTRL-1||SER|||||||Q|")
        assert qc != oul
        (qc_ack,) = await ba400.request(qc)
        assert segments(qc_ack)["MSA"][1] == "AA"
        assert [h["qc"] for _, h, _ in lab.envelopes("ba400")] == ["false", "true"]

        await until(lambda: list(lab.outbox.glob("*.hl7")), "the ORU in the outbox")
        await until(lambda: list(lab.qc.glob("*.hl7")), "the QC ORU in its folder")
        (patient,) = [p.read_bytes() for p in lab.outbox.glob("*.hl7")]
        assert b"OBX|2|NM|CHOL^Cholesterol, total^L^14647-2^^LN||4.60|mmol/L" in patient
        (control,) = [p.read_bytes() for p in lab.qc.glob("*.hl7")]
        assert b"OBR|1||CTRL-1|" in control


@needs_samples
async def test_mindray_results_get_an_original_mode_ack(tmp_path: Path) -> None:
    oru, _ = sample_messages("13")
    async with running_lab(tmp_path) as lab, analyzer(lab.ports["bs200"]) as bs200:
        (ack,) = await bs200.request(oru)
        seg = segments(ack)
        assert seg["MSA"][1:3] == ["AA", "7"]
        assert seg["MSH"][8] == "ACK^R01^ACK"
        assert len(seg["MSH"]) < 15  # MSH-16 "0" is Mindray's sample kind, not an ack type
        ((kind, headers, _),) = lab.envelopes("bs200")
        assert (kind, headers["qc"], headers["profile"]) == ("lab-result", "false", "mindray-bs")
        await until(lambda: list(lab.outbox.glob("*.hl7")), "the ORU in the outbox")
        (message,) = [p.read_bytes() for p in lab.outbox.glob("*.hl7")]
        assert b"|NA^Sodium^L^2951-2^^LN||138.060280|mmol/L|" in message


async def test_acks_from_the_analyzer_get_no_reply_and_are_not_journaled(tmp_path: Path) -> None:
    ack = hl7(
        "MSH|^~\\&|BA400|Biosystems|Host|Host provider|20230511180310||ACK^O33^ACK|A-1|P|2.5.1",
        "MSA|AA|OML-77",
    )
    result = hl7(
        "MSH|^~\\&|BA400|Biosystems|Host||20230511180311||OUL^R22^OUL_R22|R-1|P|2.5.1",
        "SPM|1|S-9||SER|||||||P",
        'OBR||""||GLUCOSE',
        "ORC|OK||||CM",
        "OBX|1|NM|GLUCOSE^GLUCOSE^A400||99|mg/dL||N|||F",
    )
    async with running_lab(tmp_path) as lab, analyzer(lab.ports["ba400"]) as ba400:
        await ba400.send(ack)
        (reply,) = await ba400.request(result)
        # replies keep the order of messages: the first one is the result's, so the ACK got none
        assert segments(reply)["MSA"][1:3] == ["AA", "R-1"]
        assert [kind for kind, _, _ in lab.envelopes("ba400")] == ["lab-result"]


# -- host queries ----------------------------------------------------------------------------


@needs_samples
async def test_law_query_without_an_order_gets_nf_and_no_work(tmp_path: Path) -> None:
    (qbp,) = sample_messages("12")
    async with running_lab(tmp_path) as lab, analyzer(lab.ports["ba400"]) as ba400:
        rsp, oml = await ba400.request(qbp, replies=2)
        rsp_seg = segments(rsp)
        assert rsp_seg["MSH"][8] == "RSP^K11^RSP_K11"
        assert rsp_seg["MSA"][1:3] == ["AA", "105c0474-b00b-4c72-8492-fba65c1563d6"]
        assert rsp_seg["QAK"][1:3] == ["105c0474b00b4c728492fba65c1563d6", "NF"]
        oml_seg = segments(oml)
        assert oml_seg["MSH"][8] == "OML^O33^OML_O33"
        assert oml_seg["SPM"][2] == "32971968"
        assert oml_seg["ORC"][1] == "DC"  # no work for this specimen
        assert "OBR" not in oml_seg


@needs_samples
async def test_law_query_after_the_lis_order_gets_the_work(tmp_path: Path) -> None:
    (qbp,) = sample_messages("12")
    async with running_lab(tmp_path) as lab:
        await order_from_lis(lab, oml_o21("LIS-1", "32971968", "CHOL", "TG", "XYZ"), "32971968")
        async with analyzer(lab.ports["ba400"]) as ba400:
            rsp, oml = await ba400.request(qbp, replies=2)
            (ack,) = await ba400.request(  # the analyzer's ACK of the work: dropped, no reply
                hl7(
                    "MSH|^~\\&|BA400|Biosystems|MEDGW||20230511180308||ACK^O33^ACK|A-2|P|2.5.1",
                    f"MSA|AA|{segments(oml)['MSH'][9]}",
                )
                + b"\x1c\r\x0b"
                + qbp.replace(b"|105c0474-b00b", b"|205c0474-b00b", 1)
            )
    assert segments(rsp)["QAK"][2] == "OK"
    oml_seg = segments(oml)
    assert oml_seg["MSH"][8] == "OML^O33^OML_O33"
    assert oml_seg["MSH"][20] == "LAB-28^IHE"
    assert oml_seg["MSH"][3] == "lab-site"  # MSH-4 sending facility: the site
    assert oml_seg["PID"][5] == "Doe^Jane"
    assert oml_seg["SPM"][2] == "32971968"
    # the LIS's codes as the BA400 names its tests; an unmapped one goes as it is
    assert [obr[4] for obr in all_segments(oml, "OBR")] == [
        "CHOLESTEROL",
        "TRIGLYCERIDES",
        "XYZ",
    ]
    assert {orc[1] for orc in all_segments(oml, "ORC")} == {"NW"}
    # the second query (sent right after the ACK) got the first reply after it
    assert segments(ack)["MSH"][8] == "RSP^K11^RSP_K11"
    assert segments(ack)["MSA"][2] == "205c0474-b00b-4c72-8492-fba65c1563d6"


async def test_law_query_for_all_work_is_answered_without_a_no_work_message(
    tmp_path: Path,
) -> None:
    query = hl7(
        "MSH|^~\\&|BA400|Biosystems|Host||20230511180307||QBP^Q11^QBP_Q11|Q-ALL|P|2.5.1"
        "|||ER|AL||UNICODE UTF-8|||LAB-27^IHE",
        "QPD|WOS_ALL^Work Order Step All^IHE_LABTF|tag-all",
        "RCP|I||R",
    )
    async with running_lab(tmp_path) as lab, analyzer(lab.ports["ba400"]) as ba400:
        (rsp,) = await ba400.request(query)
        assert segments(rsp)["QAK"][1:3] == ["tag-all", "NF"]
        # the connection is still served
        (again,) = await ba400.request(query.replace(b"Q-ALL", b"Q-ALL-2"))
        assert segments(again)["MSA"][2] == "Q-ALL-2"


@needs_samples
async def test_mindray_query_gets_qck_then_dsr(tmp_path: Path) -> None:
    _, qry = sample_messages("13")
    async with running_lab(tmp_path) as lab, analyzer(lab.ports["bs200"]) as bs200:
        qck, dsr = await bs200.request(qry, replies=2)
        assert segments(qck)["MSH"][8] == "QCK^Q02"
        assert segments(qck)["QAK"][2] == "NF"
        assert segments(dsr)["MSH"][8] == "DSR^Q03"
        dsp = all_segments(dsr, "DSP")
        assert (dsp[20][1], dsp[20][3]) == ("21", "123456789012")
        assert len(dsp) == 28  # no tests

        await order_from_lis(lab, oml_o21("LIS-2", "123456789012", "GLU", "CA"), "123456789012")
        qck, dsr = await bs200.request(qry, replies=2)
    assert segments(qck)["QAK"][2] == "OK"
    seg = segments(dsr)
    assert seg["MSA"][1:3] == ["AA", "1"]
    assert "|".join(seg["QRD"]) == "QRD|20240828151212|R|D|12|||RD|123456789012|OTH|||T|"
    dsp = all_segments(dsr, "DSP")
    assert (dsp[0][3], dsp[2][3], dsp[4][3]) == ("BN9", "Doe Jane", "F")
    # LIS CA is the Mindray test "Ca"
    assert [d[3] for d in dsp[28:]] == ["GLU^^^", "Ca^^^"]


@needs_samples
async def test_a_cancel_from_the_lis_takes_the_work_back(tmp_path: Path) -> None:
    (qbp,) = sample_messages("12")
    async with running_lab(tmp_path) as lab:
        await order_from_lis(lab, oml_o21("LIS-3", "32971968", "CHOL", "TG"), "32971968")
        cancel = oml_o21("LIS-4", "32971968", "CHOL", "TG", control="CA")
        await order_from_lis(lab, cancel, "32971968", rows=0)
        async with analyzer(lab.ports["ba400"]) as ba400:
            rsp, oml = await ba400.request(qbp, replies=2)
    assert segments(rsp)["QAK"][2] == "NF"
    assert segments(oml)["ORC"][1] == "DC"


# -- configuration ---------------------------------------------------------------------------


def listener_config(tmp_path: Path, listener: str) -> str:
    return (
        "site: {id: s}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "http: {listen: null}\n"
        "listeners:\n"
        f"  - {listener}\n"
        "destinations:\n"
        f"  - {{id: out, type: folder, path: {tmp_path / 'out'}}}\n"
        "routes:\n"
        "  - {match: {source: an}, to: [out]}\n"
    )


@pytest.mark.parametrize(
    ("profile", "problem"),
    [
        ("no-such-analyzer", "listeners[0].profile: unknown profile 'no-such-analyzer' (known: "),
        ("sysmex-xn", "listeners[0].profile: profile 'sysmex-xn' is for ASTM analyzers"),
    ],
)
def test_profiles_that_do_not_fit_are_config_errors(
    tmp_path: Path, profile: str, problem: str
) -> None:
    listener = f"{{id: an, type: hl7-mllp, listen: 127.0.0.1:2599, profile: {profile}}}"
    with pytest.raises(ConfigError) as err:
        parse_config(listener_config(tmp_path, listener), default_registry(), source="g.yaml")
    assert any(problem in p for p in err.value.problems), err.value.problems


def test_check_config_names_the_profile_path(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        listener_config(
            tmp_path, "{id: an, type: hl7-mllp, listen: 127.0.0.1:2599, profile: sysmex-xn}"
        ),
        encoding="utf-8",
    )
    done = medgw("check-config", str(config))
    assert done.returncode == 2
    assert "listeners[0].profile: profile 'sysmex-xn' is for ASTM analyzers" in done.stderr
    assert "(line 5)" in done.stderr
    config.write_text(
        listener_config(
            tmp_path,
            "{id: an, type: hl7-mllp, listen: 127.0.0.1:2599, profile: biosystems-ba400}",
        ),
        encoding="utf-8",
    )
    ok = medgw("check-config", str(config))
    assert ok.returncode == 0, ok.stderr


def test_profile_option_and_forced_encoding() -> None:
    def settings(**extra: str) -> MllpListenerSettings:
        doc = {"id": "an", "type": "hl7-mllp", "listen": "127.0.0.1:2599", **extra}
        return MllpListenerSettings.model_validate(doc)

    assert settings().profile is None
    assert settings().forced_encoding is None
    ba400 = settings(profile="biosystems-ba400")
    assert ba400.profile is not None and ba400.profile.name == "biosystems-ba400"
    assert ba400.forced_encoding is None  # MSH-18 decides
    # Mindray BC writes the ambiguous "UNICODE" in MSH-18 and sends UTF-8
    assert settings(profile="mindray-bc").forced_encoding == "utf-8"
    assert settings(profile="mindray-bc", encoding="latin-1").forced_encoding == "iso8859-1"
