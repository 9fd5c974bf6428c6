"""Lab analyzers end to end: real captures in over a serial line or TCP, ORU^R01 out to a real LIS.

The gateway runs as a subprocess with ``astm`` listeners; the analyzer is the
scripted fake (``tests/fakes/analyzer.py``) on the other end of a socat pty pair
(paced at 9600 baud) or of a TCP connection; the LIS is the MLLP receiver process.
What the LIS got is read from its record (see ``tests/lab_gateway.py``), and each
expectation is computed here from the capture and the profile's YAML, not by the
gateway's own parsers.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from fakes.analyzer import Fault
from fakes.pty import socat_pty_pair
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from lab_gateway import (
    LabBench,
    astm_listener,
    capture,
    field,
    lis_destination,
    lis_messages,
    lis_record,
    log_size,
    named,
    profile_codes,
    quarantine,
    result_routes,
    send_hl7,
    serial_analyzer,
    steps_idle,
    tcp_analyzer,
    until,
    wait_log,
)
from peers.gateway_proc import Proc, folder_destination

pytestmark = pytest.mark.slow

E411 = capture("07_astm_roche_cobas_e411_session.bin")[0]
XN550 = capture("04_astm_sysmex_xn550.frame")[0]
H7600_QC = capture("08_astm_hitachi_h7600_qc_session.bin")[0]
YUMIZEN_QC = capture("03_astm_horiba_yumizen_h500.frames")[0]
INDIKO_QUERY = capture("10_astm_thermo_indiko_host_query.bin")[0]


@pytest.fixture
def bench(
    tmp_path: Path, state_dir: Path, free_port: Callable[[], int], procs: list[Proc]
) -> LabBench:
    return LabBench(tmp_path, state_dir, free_port(), procs)


# -- expectations from the captures, read by hand ---------------------------------------


def records(message: bytes) -> list[list[str]]:
    return [r.split("|") for r in message.decode("latin-1").split("\r") if r]


def expected_results(
    message: bytes, *, code: Callable[[str], str], value: Callable[[str], str]
) -> list[tuple[str, str, str, str]]:
    """(analyzer code, value, units, flags) of each R record, as the analyzer sent them."""
    return [(code(r[2]), value(r[3]), r[4], r[6]) for r in records(message) if r[0] == "R"]


def acn_code(test_id: str) -> str:  # Roche/Hitachi ^^^117/1/not or ^^^798/ -> 117, 798
    return test_id.split("^")[3].split("/", maxsplit=1)[0]


def e411_value(value: str) -> str:  # -1^0.521 (interpretation^COI) -> the COI
    parts = value.split("^")
    return parts[1] if len(parts) > 1 and parts[1] else parts[0]


def xn_code(test_id: str) -> str:  # ^^^^WBC^1 -> WBC
    return test_id.split("^")[4]


def e411_specimens() -> bytes:
    """The e411 capture's records for two more specimens in one message (one value changed)."""
    h, _, o, *results, end = [r for r in E411.split(b"\r") if r]
    out = [h]
    for n, first_value in ((2, b"6.02"), (3, b"4.87")):
        out += [b"P|%d" % n, o.replace(b"000000-00-0001", b"000000-00-000%d" % n)]
        out += [results[0].replace(b"|5.41|", b"|" + first_value + b"|"), *results[1:]]
    out.append(end)
    return b"".join(r + b"\r" for r in out)


def strict_oru(message: bytes) -> None:
    """hl7apy's STRICT parse and validation: ORU_R01 structure, required fields, types."""
    parse_message(
        message.decode("utf-8"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True
    ).validate()


def check_oru(
    message: bytes,
    sample_id: str,
    expected: list[tuple[str, str, str, str]],
    codes: dict[str, dict[str, str]],
    converted: dict[str, tuple[str, str]] | None = None,
) -> None:
    """One specimen's ORU^R01: header, OBR-3, and one OBX per result in the analyzer's order."""
    (msh,) = named(message, "MSH")
    assert field(msh, 9) == "ORU^R01^ORU_R01"
    assert field(msh, 12) == "2.5.1"
    (obr,) = named(message, "OBR")
    assert field(obr, 3) == sample_id
    (orc,) = named(message, "ORC")
    assert field(orc, 3) == sample_id
    obx = named(message, "OBX")
    assert len(obx) == len(expected), [field(s, 3) for s in obx]
    converted = converted or {}
    for n, (seg, (code, value, units, flags)) in enumerate(zip(obx, expected, strict=True), 1):
        assert field(seg, 1) == str(n)
        ident = field(seg, 3).split("^")
        if code in codes:  # mapped: the LIS code (L), LOINC as the alternate id
            mapping = codes[code]
            assert ident[:3] == [mapping["lis"], mapping["name"], "L"], ident
            if mapping.get("loinc"):
                assert ident[3:6] == [mapping["loinc"], "", "LN"], ident
        else:  # unmapped codes go on as the analyzer's own (unmapped: keep)
            assert (ident[0], ident[2]) == (code, "99MGW"), ident
        want_value, want_units = converted.get(code, (value, units))
        assert field(seg, 5) == want_value, (code, field(seg, 5))
        assert field(seg, 6) == want_units, (code, field(seg, 6))
        assert field(seg, 8) == flags, (code, field(seg, 8))
        assert field(seg, 11) == "F"
    strict_oru(message)


# -- 1. a real serial line ---------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_serial_e411_and_xn550_captures_reach_the_lis_as_one_oru_per_specimen(
    bench: LabBench, free_port: Callable[[], int]
) -> None:
    lis = bench.receiver(free_port())
    with (
        socat_pty_pair(bench.tmp, ("e411-gw", "e411-an")) as (e411_gw, e411_an, _),
        socat_pty_pair(bench.tmp, ("xn-gw", "xn-an")) as (xn_gw, xn_an, _),
    ):
        bench.write_config(
            listeners=[
                astm_listener("e411", "roche-cobas-e411", {"serial": str(e411_gw)}),
                astm_listener("xn550", "sysmex-xn", {"serial": str(xn_gw), "baudrate": 9600}),
            ],
            destinations=[lis_destination(lis.port)],
            routes=result_routes(qc=None),
        )
        gateway = bench.gateway().start()
        wait_log(gateway, "transport.connected name=e411")
        wait_log(gateway, "transport.connected name=xn550")

        async def e411() -> None:
            async with serial_analyzer(e411_an) as fake:
                sent = await fake.send_session([E411, e411_specimens()])
                assert sent.ok and sent.naks == 0, sent

        async def xn550() -> None:
            async with serial_analyzer(xn_an) as fake:
                sent = await fake.send_message(XN550)
                assert sent.ok and sent.naks == 0, sent
                assert sent.frames_sent == 11  # 2,607 bytes in 247-byte frames

        await asyncio.gather(e411(), xn550())
        await until(lambda: len(lis_record(lis)) >= 4, 20, "four ORUs at the LIS")
        gateway.wait_drained(timeout_s=10)

        messages = lis_messages(lis, bench.state_dir)
        assert len(messages) == 4, "one ORU per specimen, each once"
        by_sample = {field(named(m, "OBR")[0], 3): m for m in messages}
        assert sorted(by_sample) == ["000000-00-0001", "000000-00-0002", "000000-00-0003", "27"]

        e411_expected = expected_results(E411, code=acn_code, value=e411_value)
        assert e411_expected[:2] == [("117", "5.41", "IU/l", "N"), ("900", "0.521", "COI", "N")]
        codes = profile_codes("roche-cobas-e411")
        check_oru(by_sample["000000-00-0001"], "000000-00-0001", e411_expected, codes)
        second = [("117", "6.02", "IU/l", "N"), *e411_expected[1:]]
        check_oru(by_sample["000000-00-0002"], "000000-00-0002", second, codes)

        xn_codes = profile_codes("sysmex-xn")
        xn_expected = [
            r
            for r in expected_results(XN550, code=xn_code, value=lambda v: v)
            if not re.fullmatch(r"SCAT_.*|DIST_.*", r[0])  # image names: the profile ignores them
        ]
        assert len(xn_expected) == 37
        assert sum(code in xn_codes for code, *_ in xn_expected) == 23
        check_oru(
            by_sample["27"],
            "27",
            xn_expected,
            xn_codes,
            converted={"HGB": ("80", "g/L"), "MCHC": ("352", "g/L")},  # g/dL x 10, profile units
        )
        (pid,) = named(by_sample["27"], "PID")  # P.5 patient id, P.6 name, P.8 born, P.9 sex
        assert (field(pid, 3), field(pid, 5), field(pid, 7), field(pid, 8)) == (
            "37182",
            "^Jim^Brown",
            "19870626",
            "M",
        )
        assert not quarantine(bench.state_dir), "a clean line leaves nothing in quarantine"
        assert gateway.terminate() == 0, gateway.log_tail()


# -- 2. QC results go to their own place ---------------------------------------------------


def h7600_patient(sample_id: str) -> bytes:
    """The H7600 QC capture turned into a patient sample: O.3 the tube, O.4.5 and O.12 not QC."""
    out = []
    for rec in records(H7600_QC):
        if rec[0] == "O":
            rec = list(rec)  # noqa: PLW2901
            rec[2] = sample_id.ljust(len(rec[2]))  # padded like the capture
            rec[3] = rec[3].replace("^^QC^", "^^S1^")
            rec[11] = "N"
        out.append("|".join(rec))
    return "".join(r + "\r" for r in out).encode("latin-1")


@pytest.mark.timeout(60)
async def test_qc_captures_go_to_the_qc_folder_and_patients_to_the_lis(
    bench: LabBench, free_port: Callable[[], int]
) -> None:
    lis = bench.receiver(free_port())
    h7600_port, yumizen_port = free_port(), free_port()
    qc_folder = bench.tmp / "qc"
    bench.write_config(
        listeners=[
            astm_listener("h7600", "hitachi-7600", {"tcp_listen": f"127.0.0.1:{h7600_port}"}),
            astm_listener("yumizen", "horiba-yumizen", {"tcp_listen": f"127.0.0.1:{yumizen_port}"}),
        ],
        destinations=[lis_destination(lis.port), folder_destination("qc", qc_folder)],
        routes=result_routes(),
    )
    gateway = bench.gateway().start()

    patient = h7600_patient("HP-000123")
    async with tcp_analyzer(h7600_port) as fake:
        sent = await fake.send_session([H7600_QC, patient])  # QC and a patient, one transfer
        assert sent.ok and sent.naks == 0, sent
    assert len(YUMIZEN_QC) > 30_000
    async with tcp_analyzer(yumizen_port, frame_size=64_000) as fake:  # LIS01-A2 frames
        sent = await fake.send_message(YUMIZEN_QC)
        assert sent.ok and sent.naks == 0 and sent.frames_sent == 1, sent

    await until(lambda: len(list(qc_folder.glob("*.hl7"))) >= 2, 15, "two QC ORUs in the folder")
    await until(lambda: lis_record(lis), 15, "the patient's ORU at the LIS")
    gateway.wait_drained(timeout_s=10)

    (oru,) = lis_messages(lis, bench.state_dir)  # the patient, and nothing of the QC runs
    expected = expected_results(patient, code=acn_code, value=lambda v: v)
    check_oru(oru, "HP-000123", expected, profile_codes("hitachi-7600"))
    assert field(named(oru, "OBX")[2], 3).startswith("GLU^Glucose (GLUC3)^L^14749-6")

    in_folder = [path.read_bytes() for path in qc_folder.glob("*.hl7")]
    qc = {field(named(m, "OBR")[0], 3): m for m in in_folder}
    assert sorted(qc) == ["PCCC2", "PX440N"]
    for sample_id, message, count in (("PCCC2", qc["PCCC2"], 5), ("PX440N", qc["PX440N"], 21)):
        assert field(named(message, "MSH")[0], 9) == "ORU^R01^ORU_R01"
        assert not named(message, "PID"), "a QC report names no patient"
        (spm,) = named(message, "SPM")
        assert (field(spm, 2), field(spm, 11)) == (sample_id, "Q")  # control specimen
        assert len(named(message, "OBX")) == count
        strict_oru(message)
    assert gateway.terminate() == 0, gateway.log_tail()


@pytest.mark.timeout(30)
async def test_one_message_with_qc_and_patient_specimens_is_split_by_kind(
    bench: LabBench, free_port: Callable[[], int]
) -> None:
    lis = bench.receiver(free_port())
    port = free_port()
    qc_folder = bench.tmp / "qc"
    bench.write_config(
        listeners=[astm_listener("h7600", "hitachi-7600", {"tcp_listen": f"127.0.0.1:{port}"})],
        destinations=[lis_destination(lis.port), folder_destination("qc", qc_folder)],
        routes=result_routes(),
    )
    gateway = bench.gateway().start()
    # a batch upload: the control, then a patient's tube, in one H .. L message
    qc_part = H7600_QC.split(b"\rL|")[0] + b"\r"
    patient_part = h7600_patient("HP-000777").split(b"\r", 1)[1]  # without its H record
    async with tcp_analyzer(port) as fake:
        sent = await fake.send_message(qc_part + patient_part.replace(b"P|1|", b"P|2|", 1))
        assert sent.ok and sent.naks == 0, sent
    gateway.wait_drained(timeout_s=10)
    at_lis = [field(named(m, "OBR")[0], 3) for m in lis_messages(lis, bench.state_dir)]
    in_qc = [field(named(p.read_bytes(), "OBR")[0], 3) for p in qc_folder.glob("*.hl7")]
    assert (at_lis, in_qc) == (["HP-000777"], ["PCCC2"])


# -- 3. host queries answered from the LIS's orders ----------------------------------------

C311_CODES = {"ALT": "685", "CREA": "690", "GLU": "717"}  # the profile's map, read backwards


def oml_o21(control_id: str, specimen: str, tests: list[str]) -> bytes:
    """An OML^O21 as a LIS sends it: one ORC/OBR/SPM group per test of one tube (SPM-2)."""
    lines = [
        f"MSH|^~\\&|LIS|HOSP|MEDGW|LAB|20240601101500||OML^O21^OML_O21|{control_id}|P|2.5.1"
        "|||AL|NE||UNICODE UTF-8",
        "PID|1||P-4711^^^HOSP^MR||Doe^Jane||19800202|F",
    ]
    for n, test in enumerate(tests, 1):
        lines += [
            "ORC|NW|PL-0001|||||^^^^^R",
            f"OBR|{n}|PL-0001||{test}^{test} test^L|||20240601100000",
            f"SPM|1|{specimen}||SER^Serum^HL70487",
        ]
    return "".join(line + "\r" for line in lines).encode()


def orm_o01(control_id: str, specimen: str, tests: list[str]) -> bytes:
    """An ORM^O01: the tube's barcode as the filler order number (OBR-3)."""
    lines = [
        f"MSH|^~\\&|LIS|HOSP|MEDGW|LAB|20240601101500||ORM^O01^ORM_O01|{control_id}|P|2.5.1",
        "PID|1||P-0815^^^HOSP^MR||Roe^Rich||19700707|M",
    ]
    for n, test in enumerate(tests, 1):
        lines += ["ORC|NW|PL-0815", f"OBR|{n}|PL-0815|{specimen}|{test}^{test} test^L"]
    return "".join(line + "\r" for line in lines).encode()


def host_query(specimen: str) -> bytes:
    """The Indiko's real host query (H, Q, L) asking for ``specimen`` (Q.3 component 2)."""
    return INDIKO_QUERY.replace(b"^2240801063^", f"^{specimen}^".encode())


def answer_fields(answer: list[bytes]) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for rec in answer:
        fields = rec.decode("latin-1").split("|")
        out.setdefault(fields[0], []).append(fields)
    return out


def check_answer(answer: list[bytes], specimen: str, codes: list[str]) -> None:
    """H, P, O (O.3 the specimen, O.5 the tests as ^^^code^, O.26 Q), L with code N."""
    by_type = answer_fields(answer)
    assert [rec[:1] for rec in answer] == [b"H", b"P", b"O", b"L"], answer
    assert by_type["H"][0][1] == "\\^&"
    (o,) = by_type["O"]
    assert o[2] == specimen
    assert o[4].split("\\") == [f"^^^{code}^" for code in codes]
    assert o[11] == "N" and o[25] == "Q"  # action code new, report type: answer to a query
    assert by_type["L"][0][:3] == ["L", "1", "N"]


def c311_results(specimen: str) -> bytes:
    """Results for ``specimen`` shaped like the c311 capture (counter^id in O.3, mg/dl units)."""
    rows = [("685", "31", "U/l"), ("690", "0.90", "mg/dl"), ("717", "99", "mg/dl")]
    lines = [
        "H|\\^&|||c311^1|||||host|RSUPL^REAL|P|1",
        "P|1",
        f"O|1|11625^{specimen}^1^^004|R1|^^^685/\\^^^690/\\^^^717/|R||||||N||^^||SC"
        "|||||||20240601113000|||F",
    ]
    for n, (code, value, units) in enumerate(rows, 1):
        lines += [f"R|{n}|^^^{code}/|{value}|{units}||N||F||||20240601112900", "C|1|I|0|I"]
    lines.append("L|1|N")
    return "".join(line + "\r" for line in lines).encode()


@pytest.mark.timeout(60)
async def test_host_query_is_answered_from_an_hl7_order_while_the_lis_is_down(
    bench: LabBench, free_port: Callable[[], int]
) -> None:
    lis_port, c311_port, orders_port = free_port(), free_port(), free_port()  # nothing on lis_port
    bench.write_config(
        listeners=[
            astm_listener("c311", "roche-cobas-c311", {"tcp_listen": f"127.0.0.1:{c311_port}"}),
            {"id": "lis-orders", "type": "hl7-mllp", "listen": f"127.0.0.1:{orders_port}"},
        ],
        destinations=[lis_destination(lis_port)],
        routes=[
            *result_routes(qc=None),
            {"id": "orders", "match": {"source": "lis-orders"}, "steps": ["lab-orders"]},
        ],
    )
    gateway = bench.gateway().start()

    msa = send_hl7(orders_port, oml_o21("ORD-0001", "SPC-1001", ["ALT", "CREA", "GLU"]))
    assert msa[1:3] == ["AA", "ORD-0001"], msa
    steps_idle(gateway, "orders")  # the order is in the orders table

    async with tcp_analyzer(c311_port) as fake:
        answer = await fake.query(host_query("SPC-1001"), timeout_s=10)
        check_answer(answer, "SPC-1001", [C311_CODES[t] for t in ("ALT", "CREA", "GLU")])
        (p,) = answer_fields(answer)["P"]
        (o,) = answer_fields(answer)["O"]
        assert o[5] == "R"  # the priority the LIS gave (ORC-7.6)
        assert (p[2], p[5], p[7], p[8]) == ("P-4711", "Doe^Jane", "19800202", "F")
        assert fake.last_receive is not None and fake.last_receive.naks == 0

        unknown = await fake.query(host_query("NOPE-999"), timeout_s=10)
        assert [rec.split(b"|")[0] for rec in unknown] == [b"H", b"L"], unknown
        assert unknown[-1].split(b"|")[:3] == [b"L", b"1", b"I"]  # no information

        # the specimen's results, while the LIS is still down: kept, sent when it is back
        sent = await fake.send_message(c311_results("SPC-1001"))
        assert sent.ok and sent.naks == 0, sent
    await until(
        lambda: gateway.health()["destinations"]["lis"]["last_error"], 10, "a failed LIS delivery"
    )
    assert gateway.health()["destinations"]["lis"]["pending"] == 1

    lis = bench.receiver(lis_port)
    await until(lambda: lis_record(lis), 15, "the ORU once the LIS is up")
    gateway.wait_drained(timeout_s=10)
    (oru,) = lis_messages(lis, bench.state_dir)
    obx = named(oru, "OBX")
    assert [field(s, 3).split("^")[0] for s in obx] == ["ALT", "CREA", "GLU"]
    # mg/dl converted by the profile: creatinine x 88.42 -> umol/L, glucose x 0.0555 -> mmol/L
    assert [(field(s, 5), field(s, 6)) for s in obx] == [
        ("31", "U/l"),
        ("80", "umol/L"),
        ("5.49", "mmol/L"),
    ]
    assert field(named(oru, "OBR")[0], 3) == "SPC-1001"
    strict_oru(oru)
    assert gateway.terminate() == 0, gateway.log_tail()


# -- 6. link faults through the real gateway ---------------------------------------------


@pytest.mark.timeout(60)
async def test_link_faults_lost_acks_and_refused_frames_give_one_result_each(
    bench: LabBench, free_port: Callable[[], int]
) -> None:
    lis = bench.receiver(free_port())
    c311_port = free_port()
    bench.write_config(
        listeners=[
            astm_listener("c311", "roche-cobas-c311", {"tcp_listen": f"127.0.0.1:{c311_port}"})
        ],
        destinations=[lis_destination(lis.port)],
        routes=result_routes(qc=None),
    )
    gateway = bench.gateway().start()

    def at_lis(specimen: str) -> list[bytes]:
        return [
            m
            for m in lis_messages(lis, bench.state_dir)
            if field(named(m, "OBR")[0], 3) == specimen
        ]

    # the c311 sends one record per frame (ten frames here), each ending in ETX
    async with tcp_analyzer(c311_port, one_record_per_frame=True) as fake:
        # lost ACKs (6.5.1.3): the P frame sent twice more, and the last (L) frame once more
        sent = await fake.send_message(
            c311_results("SPC-2001"),
            [Fault("repeat_frame", frame=2, times=2), Fault("repeat_frame", frame=10)],
        )
        assert sent.ok and sent.repeats == 3 and sent.naks == 0 and sent.acks == 13, sent

        # five corrupted copies of the first R frame: only those are NAKed, the sixth is good
        sent = await fake.send_message(
            c311_results("SPC-2002"), [Fault("bad_checksum", frame=4, times=5)]
        )
        assert sent.ok and sent.naks == 5 and sent.acks == 10, sent
        assert sent.retransmissions == 5 and sent.frames_sent == 15

        # six refusals abort the message (6.5.1.4): its H, P, O are kept aside (quarantine),
        # nothing goes to the LIS; the analyzer sends the message again later
        sent = await fake.send_message(
            c311_results("SPC-2003"), [Fault("bad_checksum", frame=4, times=6)]
        )
        assert not sent.ok and sent.naks == 6 and sent.eot_sent, sent
        sent = await fake.send_message(c311_results("SPC-2003"))
        assert sent.ok and sent.naks == 0, sent

    await until(lambda: len(lis_record(lis)) >= 3, 15, "three ORUs at the LIS")
    gateway.wait_drained(timeout_s=10)
    for specimen in ("SPC-2001", "SPC-2002", "SPC-2003"):
        (oru,) = at_lis(specimen)  # exactly one each: no repeat or refusal made a second
        assert [field(s, 5) for s in named(oru, "OBX")] == ["31", "80", "5.49"]
    assert len(lis_record(lis)) == 3
    # the aborted attempt's records (H, P, O before the refused R frame) were kept aside
    (incomplete,) = [r for r in quarantine(bench.state_dir) if r[1].startswith("incomplete")]
    assert b"SPC-2003" in incomplete[2] and b"\rR|" not in incomplete[2]
    assert gateway.terminate() == 0, gateway.log_tail()


@pytest.mark.timeout(60)
async def test_contention_during_a_query_answer_the_instrument_goes_first(
    bench: LabBench, free_port: Callable[[], int]
) -> None:
    lis = bench.receiver(free_port())
    orders_port = free_port()
    with socat_pty_pair(bench.tmp) as (gateway_end, analyzer_end, _):
        bench.write_config(
            listeners=[
                astm_listener(
                    "c311",
                    "roche-cobas-c311",
                    {"serial": str(gateway_end), "baudrate": 9600},
                    contention_wait_s=1.0,  # E1381's 20 s, shortened for the test
                ),
                {"id": "lis-orders", "type": "hl7-mllp", "listen": f"127.0.0.1:{orders_port}"},
            ],
            destinations=[lis_destination(lis.port)],
            routes=[
                *result_routes(qc=None),
                {"id": "orders", "match": {"source": "lis-orders"}, "steps": ["lab-orders"]},
            ],
        )
        gateway = bench.gateway().start()
        wait_log(gateway, "transport.connected name=c311")
        msa = send_hl7(orders_port, orm_o01("ORM-0001", "SPC-3001", ["GLU", "ALT"]))
        assert msa[1:3] == ["AA", "ORM-0001"], msa
        steps_idle(gateway, "orders")

        # right behind the query's EOT the analyzer wants the line again for results, as
        # the gateway sends its ENQ with the answer. Whether the two ENQs cross on the
        # wire (6.2.7) depends on timing, so up to three rounds until they do once.
        crossed, specimens = 0, []
        async with serial_analyzer(analyzer_end, timescale=0.2) as fake:
            for n in range(1, 4):
                specimens.append(f"SPC-400{n}")
                mark = log_size(gateway)
                answer = await fake.query(
                    host_query("SPC-3001"),
                    timeout_s=15,
                    faults=[Fault("contend", data=c311_results(specimens[-1]))],
                )
                sent = fake.last_send
                assert sent is not None and sent.ok and sent.naks == 0, sent
                # the instrument's results went first; the answer came after, complete
                check_answer(answer, "SPC-3001", [C311_CODES["GLU"], C311_CODES["ALT"]])
                if sent.contentions:
                    wait_log(gateway, "astm.contention listener=c311", after=mark)
                    crossed += 1
                    break
        assert crossed, "the ENQs never crossed in three rounds"

        await until(lambda: len(lis_record(lis)) >= len(specimens), 15, "the results at the LIS")
        gateway.wait_drained(timeout_s=10)
        got = sorted(field(named(m, "OBR")[0], 3) for m in lis_messages(lis, bench.state_dir))
        assert got == specimens
        assert gateway.terminate() == 0, gateway.log_tail()


@pytest.mark.timeout(40)
async def test_orders_are_downloaded_to_an_analyzer_that_takes_them(
    bench: LabBench, free_port: Callable[[], int]
) -> None:
    """orders: download — an order from the LIS goes to the analyzer when the line is
    idle (O.26 report type O), once; an update goes again."""
    lis_port, c311_port, orders_port = free_port(), free_port(), free_port()
    bench.write_config(
        listeners=[
            astm_listener(
                "c311",
                "roche-cobas-c311",
                {"tcp_listen": f"127.0.0.1:{c311_port}"},
                orders="download",
                download_poll_s=0.2,
            ),
            {"id": "lis-orders", "type": "hl7-mllp", "listen": f"127.0.0.1:{orders_port}"},
        ],
        destinations=[lis_destination(lis_port)],
        routes=[
            *result_routes(qc=None),
            {"id": "orders", "match": {"source": "lis-orders"}, "steps": ["lab-orders"]},
        ],
    )
    gateway = bench.gateway().start()
    async with tcp_analyzer(c311_port) as fake:
        msa = send_hl7(orders_port, oml_o21("ORD-0002", "SPC-2002", ["ALT", "GLU"]))
        assert msa[1:3] == ["AA", "ORD-0002"], msa
        records_ = await fake.receive_session(timeout_s=15)
        by_type = answer_fields(records_)
        assert [rec[:1] for rec in records_] == [b"H", b"P", b"O", b"L"], records_
        (o,) = by_type["O"]
        assert o[2] == "SPC-2002"
        assert o[4].split("\\") == [f"^^^{C311_CODES[t]}^" for t in ("ALT", "GLU")]
        assert o[25] == "O"  # report type: an order, not an answer
        assert fake.last_receive is not None and fake.last_receive.naks == 0
        # downloaded once: nothing more while the order is unchanged
        with pytest.raises(TimeoutError):
            await fake.receive_session(timeout_s=1.5)
        # the LIS adds a test to the same order: the analyzer gets the new version
        msa = send_hl7(orders_port, oml_o21("ORD-0003", "SPC-2002", ["ALT", "GLU", "CREA"]))
        assert msa[1:3] == ["AA", "ORD-0003"], msa
        again = await fake.receive_session(timeout_s=15)
        (o,) = answer_fields(again)["O"]
        assert o[4].split("\\") == [f"^^^{C311_CODES[t]}^" for t in ("ALT", "GLU", "CREA")]
    wait_log(gateway, "astm.downloaded listener=c311 orders=1")
    assert gateway.terminate() == 0, gateway.log_tail()
