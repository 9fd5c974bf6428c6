"""HL7 analyzer messages: results -> LabReport (real BA400 and Mindray captures), host
queries, and every message medgw builds, each validated with hl7apy (STRICT)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message, parse_segment

from drivers.hl7.ack import build_ack
from drivers.hl7.message import Hl7Error, parse_msh
from drivers.lab import hl7_build
from drivers.lab.hl7_results import (
    LabMessageError,
    LabQuery,
    is_result_message,
    parse_query,
    reports_from_hl7,
    unframe,
)
from drivers.lab.profiles import Hl7Fields, Profile, QcRule
from gateway.lab import LabReport, LabResult
from gateway.orders import Order

SAMPLES = Path("/work/shared/samples/lab")
MANIFEST = {e["file"][:2]: e for e in json.loads((SAMPLES / "MANIFEST.json").read_text())}
PROFILE = Profile(name="t", title="t", protocol="hl7")
TS = "20240101120000+0000"


def sample(prefix: str) -> bytes:
    return (SAMPLES / MANIFEST[prefix]["file"]).read_bytes()


def messages(prefix: str) -> list[bytes]:
    """The MLLP-framed messages of a capture file (VT ... FS CR each)."""
    return [m + b"\x1c\r" for m in sample(prefix).split(b"\x1c\r") if m.strip()]


def obx_count(prefix: str, index: int = 0) -> int:
    expected: dict[str, Any] = MANIFEST[prefix]["expected"][index]
    count: int = expected["segments"]["OBX"]
    return count


def hl7(*segments: str, encoding: str = "utf-8") -> bytes:
    return ("\r".join(segments) + "\r").encode(encoding)


def strict(raw: bytes, codec: str = "utf-8") -> Message:
    """hl7apy's STRICT parse and validation of a whole message (structure, groups,
    required fields, data types)."""
    msg = parse_message(
        raw.decode(codec), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True
    )
    msg.validate()
    return msg


def segments_of(raw: bytes) -> list[str]:
    return [s for s in raw.decode("utf-8").split("\r") if s]


# -- real captures ---------------------------------------------------------------------------


def test_ba400_oul_r22_sample() -> None:
    (report,) = reports_from_hl7(sample("11"), PROFILE, "ba400")
    assert len(report.results) == obx_count("11") == 3
    assert report.sample_id == "PATIENT32988998"  # SPM-2.1 (no PID in LAW results)
    assert report.patient_id == report.patient_name == ""
    assert not report.qc  # SPM-11 "P"
    assert report.instrument_id == "A400"  # OBX-18.1, first repetition
    assert report.message_time == "20230511165533"
    assert report.source_format == "hl7"
    hdl, chol, trig = report.results
    assert (hdl.test_code, hdl.test_name, hdl.value, hdl.units) == (
        "CHOL HDL DIRECT",
        "CHOL HDL DIRECT",
        "60.9779778",
        "mg/dL",
    )
    assert hdl.number == pytest.approx(60.9779778)
    assert hdl.flags == ("025",)  # odd OBX-8 values are kept as sent
    assert chol.flags == trig.flags == ("NONE",)
    assert (hdl.status, hdl.operator) == ("F", "ADMIN")
    assert hdl.result_time == "20230511222533"  # OBX-19 (date/time of analysis)
    assert (chol.test_code, chol.value, trig.test_code, trig.value) == (
        "CHOLESTEROL",
        "177.710159",
        "TRIGLYCERIDES",
        "52.4089546",
    )


def test_mindray_oru_r01_sample() -> None:
    oru, _ = messages("13")
    (report,) = reports_from_hl7(oru, PROFILE, "bs200")
    assert len(report.results) == obx_count("13") == 7
    assert report.patient_name == "PATIENT^TEST"  # PID-5, padding stripped
    assert report.sex == "M"
    assert report.sample_id == "3721"  # OBR-3 with the default paths
    first, *_, potassium = report.results
    # v2.3.1 Mindray: OBX-3 empty, the test in OBX-4
    assert first.test_code == "Amilas 405 AA l?quida"
    assert (first.value, first.units, first.reference_range, first.flags) == (
        "53.431886",
        "U/L",
        "-",
        ("N",),
    )
    assert first.result_time == "20240418063007"  # OBX-14 (OBX-19 empty)
    assert (potassium.test_code, potassium.number, potassium.units) == ("K", 3.29111, "mmol/L")


def test_mindray_profile_paths_pick_the_barcode() -> None:
    oru, _ = messages("13")
    profile = PROFILE.model_copy(update={"hl7": Hl7Fields(sample_id=("OBR-2.1",))})
    (report,) = reports_from_hl7(oru, profile, "bs200")
    assert report.sample_id == "SAMPLE-05H"


def test_explicit_null_is_empty() -> None:
    # BA400 OBR-2 is "" (HL7 null): a profile reading it first falls through to SPM-2
    profile = PROFILE.model_copy(update={"hl7": Hl7Fields(sample_id=("OBR-2.1", "SPM-2.1"))})
    (report,) = reports_from_hl7(sample("11"), profile, "ba400")
    assert report.sample_id == "PATIENT32988998"
    raw = hl7(
        "MSH|^~\\&|A||||20240101||ORU^R01|1|P|2.5.1",
        'PID|1||""||""',
        "OBR|1||S1",
        'OBX|1|ST|T1^Test||""|""||""|||F',
    )
    (report,) = reports_from_hl7(raw, PROFILE, "x")
    assert (report.patient_id, report.patient_name) == ("", "")
    (result,) = report.results
    assert (result.value, result.units, result.flags, result.number) == ("", "", (), None)


def test_queries_from_samples() -> None:
    law = parse_query(sample("12"))
    assert law.kind == "law"
    assert law.specimen_ids == ("32971968",)  # QPD-3
    assert law.query_tag == "105c0474b00b4c728492fba65c1563d6"  # QPD-2
    assert law.query_name == "WOS^Work Order Step^IHE_LABTF"
    assert law.msh.control_id == "105c0474-b00b-4c72-8492-fba65c1563d6"
    _, qry = messages("13")
    mindray = parse_query(qry)
    assert mindray.kind == "mindray"
    assert mindray.specimen_ids == ("123456789012",)  # QRD-8
    assert mindray.query_tag == "12"  # QRD-4
    assert mindray.echo == (
        "QRD|20240828151212|R|D|12|||RD|123456789012|OTH|||T|",
        "QRF||||||RCT|COR|ALL||",
    )


def test_query_echo_uses_default_delimiters() -> None:
    raw = hl7(
        "MSH#^~\\&#BA400##Host##20230511180307##QBP^Q11^QBP_Q11#Q1#P#2.5.1",
        "QPD#WOS^Work Order Step^IHE_LABTF#tag-1#S|9",
        "RCP#I##R",
    )
    query = parse_query(raw)
    assert query.specimen_ids == ("S|9",)
    assert query.echo == ("QPD|WOS^Work Order Step^IHE_LABTF|tag-1|S\\F\\9",)
    rsp = hl7_build.build_rsp_k11(query, [ORDER], control_id="R", timestamp=TS)
    assert segments_of(rsp)[2] == "QAK|tag-1|OK|WOS^Work Order Step^IHE_LABTF"


def test_is_result_message_and_errors() -> None:
    assert is_result_message(parse_msh(unframe(sample("11"))))
    assert not is_result_message(parse_msh(unframe(sample("12"))))
    with pytest.raises(LabMessageError, match="not a result message") as err:
        reports_from_hl7(sample("12"), PROFILE, "x")
    assert err.value.error_code == "200"
    with pytest.raises(LabMessageError, match="no OBX results"):
        reports_from_hl7(hl7("MSH|^~\\&|A||||1||ORU^R01|1|P|2.5.1", "OBR|1||S1"), PROFILE, "x")
    with pytest.raises(LabMessageError, match="unreadable"):
        reports_from_hl7(b"garbage", PROFILE, "x")
    with pytest.raises(LabMessageError, match="not a host query"):
        parse_query(sample("11"))
    with pytest.raises(LabMessageError, match="no QPD"):
        parse_query(hl7("MSH|^~\\&|A||||1||QBP^Q11^QBP_Q11|1|P|2.5.1", "RCP|I||R"))
    assert issubclass(LabMessageError, ValueError)


# -- grouping, QC, numbers, charsets ---------------------------------------------------------


def test_oru_groups_by_specimen_and_comments() -> None:
    raw = hl7(
        "MSH|^~\\&|A||||20240101||ORU^R01^ORU_R01|1|P|2.5.1",
        "PID|1||P1||Doe^John||19700101|F",
        "ORC|RE||S1",
        "OBR|1||S1|GLU",
        "NTE|1|L|order note",
        "OBX|1|NM|GLU^Glucose||5.4|mmol/L|3.9-6.1|N|||F",
        "NTE|1|L|haemolysed",
        "NTE|2|L|re-run",
        "OBR|2||S1|NA",
        "OBX|1|NM|NA^Sodium||140|mmol/L||N|||F",
        "OBR|3||S2|K",
        "OBX|1|NM|K^Potassium||4.1|mmol/L||N|||F",
        "SPM|1|S2||SER",
        "OBX|1|NM|VOL^Volume||2|mL",  # describes the specimen, not a result
    )
    s1, s2 = reports_from_hl7(raw, PROFILE, "x")
    assert [r.test_code for r in s1.results] == ["GLU", "NA"]
    assert s1.comments == ("order note",)
    assert s1.results[0].comments == ("haemolysed", "re-run")
    assert (s1.patient_id, s1.birth_date, s1.sex) == ("P1", "19700101", "F")
    assert s2.sample_id == "S2"
    assert [r.test_code for r in s2.results] == ["K"]


def test_law_qc_by_specimen_role() -> None:
    raw = hl7(
        "MSH|^~\\&|BA400|Biosystems|Host||20240101||OUL^R22^OUL_R22|1|P|2.5.1",
        "SPM|1|CTRL-N1||SER|||||||Q",
        "SAC|||CTRL-N1",
        "INV|NORM1^Control Normal",
        'OBR|1|""||GLU',
        "ORC|SC||||CM",
        "OBX|1|NM|GLU||5.1|mmol/L||N|||F",
        "SPM|2|PAT-7||SER|||||||P",
        'OBR|1|""||GLU',
        "OBX|1|NM|GLU||6.2|mmol/L||H|||F",
    )
    control, patient = reports_from_hl7(raw, PROFILE, "ba400")
    assert control.qc and control.control == "NORM1"
    assert control.sample_id == "CTRL-N1"
    assert not patient.qc and patient.results[0].flags == ("H",)


def test_qc_by_profile_rule() -> None:
    oru, _ = messages("13")
    rule = QcRule(field="MSH-16", equals=("2",))  # Mindray: 0 patient, 2 QC
    profile = PROFILE.model_copy(update={"qc": (rule,)})
    (patient,) = reports_from_hl7(oru, profile, "bs")
    assert not patient.qc and patient.patient_name
    as_qc = oru.replace(b"||||0||ASCII", b"||||2||ASCII", 1)
    (qc,) = reports_from_hl7(as_qc, profile, "bs")
    assert qc.qc
    assert qc.patient_name == qc.sex == ""  # never patient fields on QC
    assert qc.control == qc.sample_id == "3721"


def test_number_parsing() -> None:
    raw = hl7(
        "MSH|^~\\&|A||||20240101||ORU^R01|1|P|2.5.1",
        "OBR|1||S1",
        "OBX|1|SN|A||<^2.00|mg/L||L|||F",
        "OBX|2|ST|B||> 15000.00|U/L||>|||F",
        "OBX|3|NM|C||7,41|pH|||||F",
        "OBX|4|ST|D||Positive||||||F",
        "OBX|5|SN|E||^1^:^128",
        "OBX|6|ST|F||-----",
    )
    (report,) = reports_from_hl7(raw, PROFILE, "x")
    got = [(r.value, r.number, r.comparator) for r in report.results]
    assert got == [
        ("<2.00", 2.0, "<"),
        ("> 15000.00", 15000.0, ">"),
        ("7,41", 7.41, ""),
        ("Positive", None, ""),
        ("1:128", None, ""),
        ("-----", None, ""),
    ]


@pytest.mark.parametrize(
    ("charset", "codec"), [("UNICODE UTF-8", "utf-8"), ("8859/1", "latin-1"), ("", "latin-1")]
)
def test_charset_from_msh18(charset: str, codec: str) -> None:
    raw = hl7(
        f"MSH|^~\\&|A||||20240101||ORU^R01|1|P|2.5.1||||||{charset}",
        "PID|1||P1||Müller^Jürgen",
        "OBR|1||S1",
        "OBX|1|ST|T||négatif||||||F",
        encoding=codec,
    )
    (report,) = reports_from_hl7(raw, PROFILE, "x")  # no MSH-18: profile.encoding (latin-1)
    assert report.patient_name == "Müller^Jürgen"
    assert report.results[0].value == "négatif"


def test_unknown_charset_is_an_error() -> None:
    raw = hl7("MSH|^~\\&|A||||1||ORU^R01|1|P|2.5.1||||||KLINGON", "OBR|1", "OBX|1|ST|T||x")
    with pytest.raises(LabMessageError) as err:
        reports_from_hl7(raw, PROFILE, "x")
    assert err.value.error_code == "103"


# -- building: ORU^R01 / OUL^R22 -------------------------------------------------------------

REPORT = LabReport(
    instrument="ba400",
    instrument_id="A400",
    sample_id="S-100",
    patient_id="P-1",
    patient_name="Doe^John",
    birth_date="19700101",
    sex="F",
    message_time="20240101110000",
    source_format="astm",
    comments=("lipaemic",),
    results=(
        LabResult.of(
            "CHOL",
            "177.71",
            test_name="Cholesterol",
            lis_code="2093",
            lis_name="Chol total",
            loinc="2093-3",
            units="mg/dL",
            reference_range="0-200",
            flags=("N",),
            status="F",
            result_time="20240101105500",
            operator="ADMIN",
        ),
        LabResult.of(
            "CRP",
            "<2.00",
            units="mg/L",
            flags=("L", "<"),
            status="C",
            result_time="20240101105600",
            comments=("below the range",),
        ),
        LabResult.of("HIV", "NOT DETECTED", status="W"),
        LabResult.of("PH", "7,41"),
    ),
)


def test_oru_r01_is_valid_and_round_trips() -> None:
    raw = hl7_build.build_oru_r01(REPORT, control_id="C1", timestamp=TS, sending_facility="SITE")
    msg = strict(raw)
    assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    lines = segments_of(raw)
    assert lines[0].startswith(
        "MSH|^~\\&|MEDGW|SITE|LIS||20240101120000+0000||ORU^R01^ORU_R01|C1|P|2.5.1"
    )
    assert "PID|1||P-1||Doe^John||19700101|F" in lines
    obx = [s for s in lines if s.startswith("OBX")]
    assert obx[0].startswith("OBX|1|NM|2093^Chol total^L^2093-3^^LN||177.71|mg/dL|0-200|N|||F")
    assert obx[0].endswith("|ADMIN||A400|20240101105500")
    assert obx[1].startswith("OBX|2|SN|CRP^^99MGW||<^2.00|mg/L||L~<|||C")
    assert obx[2].startswith("OBX|3|ST|HIV^^99MGW||NOT DETECTED||||||F")  # W -> F
    assert obx[3].startswith("OBX|4|NM|PH^^99MGW||7.41")  # decimal comma -> NM point
    assert any(
        s.startswith("OBR|1||S-100|") and s.endswith("|20240101120000+0000|||C") for s in lines
    )

    (back,) = reports_from_hl7(raw, PROFILE, "ba400")
    assert (back.sample_id, back.patient_id, back.patient_name) == ("S-100", "P-1", "Doe^John")
    assert back.comments == ("lipaemic",)
    for before, after in zip(REPORT.results, back.results, strict=True):
        assert after.test_code == (before.lis_code or before.test_code)
        assert (after.number, after.comparator) == (before.number, before.comparator)
        assert (after.units, after.flags) == (before.units, before.flags)
        # no result time of its own: OBR-7 (the first result's time) is next in the paths
        assert after.result_time == (before.result_time or "20240101105500")
    assert [r.value for r in back.results] == ["177.71", "<2.00", "NOT DETECTED", "7.41"]
    assert back.results[1].comments == ("below the range",)
    assert [r.status for r in back.results] == ["F", "C", "F", "F"]


def test_result_status_mapping() -> None:
    status = hl7_build.result_status
    # ASTM R.9: F, C, P, X (and I, S) keep their meaning; V, R, W, M, Q, "" become F
    for astm, hl7_code in [
        ("F", "F"),
        ("C", "C"),
        ("P", "P"),
        ("X", "X"),
        ("V", "F"),
        ("R", "F"),
        ("W", "F"),
        ("", "F"),
    ]:
        assert status(LabResult.of("T", "1", status=astm), "astm") == hl7_code
    # an HL7 analyzer's table 0085 value passes unchanged (R: not verified, W: wrong)
    assert status(LabResult.of("T", "1", status="R"), "hl7") == "R"
    assert status(LabResult.of("T", "1", status="W"), "hl7") == "W"
    assert hl7_build.order_status(["F", "C"]) == "C"
    assert hl7_build.order_status(["F", "P"]) == "P"
    assert hl7_build.order_status(["X", "X"]) == "X"
    assert hl7_build.order_status(["F", "X"]) == "F"


def test_oru_r01_for_qc_has_no_pid_and_round_trips_as_qc() -> None:
    qc = REPORT.model_copy(
        update={"qc": True, "patient_id": "", "patient_name": "", "control": "NORM1"}
    )
    raw = hl7_build.build_oru_r01(qc, control_id="C2", timestamp=TS, sending_facility="SITE")
    strict(raw)  # v2.5.1 ORU_R01: the PATIENT group is optional
    lines = segments_of(raw)
    assert not any(s.startswith("PID") for s in lines)
    assert lines[-1] == "SPM|1|S-100||^Quality control material|||||||Q"
    (back,) = reports_from_hl7(raw, PROFILE, "ba400")
    assert back.qc and back.sample_id == "S-100"


def test_escaping_round_trip() -> None:
    nasty = "a|b^c~d\\e&f"
    report = REPORT.model_copy(
        update={
            "patient_name": "O&Brien^Ann|Marie",
            "results": (
                LabResult.of("T^1", nasty, units="m|g", reference_range="1^2", comments=(nasty,)),
            ),
        }
    )
    raw = hl7_build.build_oru_r01(report, control_id="C3", timestamp=TS, sending_facility="S")
    strict(raw)
    assert "||a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f|m\\F\\g|1\\S\\2|" in raw.decode()
    (back,) = reports_from_hl7(raw, PROFILE, "x")
    (result,) = back.results
    assert result.value == nasty
    assert result.units == "m|g"
    assert result.reference_range == "1^2"
    assert result.comments == (nasty,)
    assert back.patient_name == "O&Brien^Ann|Marie"


def test_builders_are_deterministic() -> None:
    kwargs: dict[str, Any] = {"control_id": "C", "timestamp": TS, "sending_facility": "S"}
    assert hl7_build.build_oru_r01(REPORT, **kwargs) == hl7_build.build_oru_r01(REPORT, **kwargs)
    assert hl7_build.build_oul_r22(REPORT, **kwargs) == hl7_build.build_oul_r22(REPORT, **kwargs)


def test_oul_r22_is_valid_and_round_trips() -> None:
    raw = hl7_build.build_oul_r22(
        REPORT, control_id="C4", timestamp=TS, sending_facility="SITE", specimen_type="SER"
    )
    strict(raw)
    lines = segments_of(raw)
    assert lines[0].endswith("|ER|AL||UNICODE UTF-8|||LAB-29^IHE")
    assert "SPM|1|S-100||SER|||||||P" in lines
    assert lines.count("ORC|SC||||CM") == len(REPORT.results)
    (back,) = reports_from_hl7(raw, PROFILE, "x")
    assert back.sample_id == "S-100"
    assert [r.value for r in back.results] == ["177.71", "<2.00", "NOT DETECTED", "7.41"]
    qc = hl7_build.build_oul_r22(
        REPORT.model_copy(update={"qc": True, "patient_id": "", "patient_name": ""}),
        control_id="C5",
        timestamp=TS,
        sending_facility="SITE",
    )
    strict(qc)
    (back_qc,) = reports_from_hl7(qc, PROFILE, "x")
    assert back_qc.qc


def test_utf8_names_survive() -> None:
    report = REPORT.model_copy(update={"patient_name": "Nguyễn^Văn Ánh"})
    raw = hl7_build.build_oru_r01(report, control_id="C6", timestamp=TS, sending_facility="S")
    strict(raw)
    (back,) = reports_from_hl7(raw, PROFILE, "x")
    assert back.patient_name == "Nguyễn^Văn Ánh"


# -- building: IHE LAW LAB-27 / LAB-28 -------------------------------------------------------

ORDER = Order(
    control="new",
    accession="ACC-9",
    patient_id="P-1",
    patient_id_issuer="HOSP",
    patient_name="Doe^John^Q^Dr",
    birth_date="19700101",
    sex="F",
    specimen_id="32971968",
    tests=("CHOLESTEROL", "TRIGLYCERIDES"),
    priority="S",
)


def test_rsp_k11_ok_and_nf() -> None:
    query = parse_query(sample("12"))
    raw = hl7_build.build_rsp_k11(query, [ORDER], control_id="R1", timestamp=TS)
    msg = strict(raw)
    assert msg.name == "RSP_K11"
    lines = segments_of(raw)
    assert lines[0].startswith("MSH|^~\\&|MEDGW||BA400|Biosystems|")
    assert "|RSP^K11^RSP_K11|R1|P|2.5.1|" in lines[0]
    assert lines[1] == "MSA|AA|105c0474-b00b-4c72-8492-fba65c1563d6"
    assert lines[2] == ("QAK|105c0474b00b4c728492fba65c1563d6|OK|WOS^Work Order Step^IHE_LABTF")
    assert lines[3] == "QPD|WOS^Work Order Step^IHE_LABTF|105c0474b00b4c728492fba65c1563d6|32971968"
    for orders in ([], [ORDER.model_copy(update={"control": "cancel"})]):
        nf = hl7_build.build_rsp_k11(query, orders, control_id="R2", timestamp=TS)
        strict(nf)
        assert segments_of(nf)[2].split("|")[2] == "NF"


def strict_per_order(raw: bytes) -> None:
    """hl7apy's group finder reads an ORC after an OBR as the optional PRIOR_RESULT's
    ORC (OML_O33 is ambiguous there), so a message with several ORDER groups is
    validated one ORDER group at a time, each with the message's MSH, PID, SPM, SAC."""
    lines = segments_of(raw)
    head = [s for s in lines if s[:3] in ("MSH", "PID", "SPM", "SAC")]
    orders: list[list[str]] = []
    for line in lines:
        if line.startswith("ORC"):
            orders.append([])
        if orders:
            orders[-1].append(line)
    assert orders
    for group in orders:
        strict(("\r".join(head + group) + "\r").encode())


def test_oml_o33_work_order() -> None:
    raw = hl7_build.build_oml_o33(
        ORDER, control_id="O1", timestamp=TS, receiving_app="BA400", specimen_type="SER"
    )
    strict_per_order(raw)
    single = hl7_build.build_oml_o33(
        ORDER.model_copy(update={"tests": ("CHOLESTEROL",)}), control_id="O2", timestamp=TS
    )
    strict(single)
    lines = segments_of(raw)
    assert lines[0].endswith("|OML^O33^OML_O33|O1|P|2.5.1|||ER|AL||UNICODE UTF-8|||LAB-28^IHE")
    assert lines[1:] == [
        "PID|1||P-1^^^HOSP||Doe^John^Q^^Dr||19700101|F",
        "SPM|1|32971968||SER|||||||P",
        "SAC|||32971968",
        "ORC|NW|ACC-9-1",
        "TQ1|||||||||S",
        "OBR|1|ACC-9-1||CHOLESTEROL",
        "ORC|NW|ACC-9-2",
        "TQ1|||||||||S",
        "OBR|2|ACC-9-2||TRIGLYCERIDES",
    ]
    cancel = hl7_build.build_oml_o33(
        ORDER.model_copy(update={"control": "cancel"}), control_id="O3", timestamp=TS
    )
    assert "ORC|CA|ACC-9-1" in segments_of(cancel)
    with pytest.raises(ValueError, match="update"):
        hl7_build.build_oml_o33(
            ORDER.model_copy(update={"control": "update"}), control_id="O4", timestamp=TS
        )
    with pytest.raises(ValueError, match="no tests"):
        hl7_build.build_oml_o33(
            ORDER.model_copy(update={"tests": ()}), control_id="O5", timestamp=TS
        )


def test_answers_to_queries_without_echo() -> None:
    law = LabQuery(
        kind="law", specimen_ids=("S1",), query_tag="t1", msh=parse_query(sample("12")).msh
    )
    rsp = hl7_build.build_rsp_k11(law, [], control_id="R", timestamp=TS)
    strict(rsp)
    assert segments_of(rsp)[3] == "QPD|WOS^Work Order Step^IHE_LABTF|t1|S1"
    _, qry = messages("13")
    mindray = LabQuery(
        kind="mindray", specimen_ids=("B7",), query_tag="4", msh=parse_query(qry).msh
    )
    dsr = hl7_build.build_dsr_q03(mindray, ORDER, control_id="Q", timestamp="20240101120000")
    assert segments_of(dsr)[4] == "QRD|20240101120000|R|D|4|||RD|B7|OTH|||T|"
    mindray_check(dsr, "DSR_Q03")


def test_oml_o33_no_work() -> None:
    query = parse_query(sample("12"))
    raw = hl7_build.build_oml_o33_no_work(query, control_id="O6", timestamp=TS)
    strict(raw)
    assert segments_of(raw)[1:] == [
        "SPM|1|32971968||^Unknown|||||||P",
        "SAC|||32971968",
        "ORC|DC",
    ]
    all_query = LabQuery(kind="law", specimen_ids=(), query_tag="t", msh=query.msh)
    with pytest.raises(ValueError, match="no specimen"):
        hl7_build.build_oml_o33_no_work(all_query, control_id="O7", timestamp=TS)


# -- building: Mindray QCK^Q02 + DSR^Q03 -----------------------------------------------------


# A QRY^Q02 shaped like Mindray's but valid v2.3.1: Mindray's own QRD-7 is ``RD``
# where v2.3.1 has a CQ (quantity^units), and it leaves the required QRD-10 and
# QRF-1 empty, so hl7apy rejects the analyzer's segments that a DSR^Q03 echoes.
VALID_QRY = hl7(
    "MSH|^~\\&|||||20240828151212||QRY^Q02|1|P|2.3.1||||||ASCII",
    "QRD|20240828151212|R|D|12|||1^RD|123456789012|OTH|ALL||T",
    "QRF|BS-200||||RCT|COR|ALL",
    encoding="ascii",
)


def mindray_check(raw: bytes, structure: str) -> None:
    """hl7apy checks of a Mindray answer (v2.3.1).

    Mindray's manual writes DSP lines that v2.3.1 does not allow: DSP-3 (TX) holds
    components for tests (``ALT^^^``) and is empty on unused lines, though required.
    So: (1) the message structure: every segment must find its place in hl7apy's
    ``structure`` (a TOLERANT parse drops what does not fit); (2) every segment we
    write except the echoed QRD/QRF and those DSP lines, STRICT on its own."""
    lines = segments_of(raw)
    msg = parse_message(
        raw.decode("ascii"), validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=True
    )
    assert msg.name == structure
    assert [c.name for c in msg.children] == [line[:3] for line in lines]
    for line in lines:
        fields = line.split("|")
        mindray_dsp = fields[0] == "DSP" and (not fields[3] or "^" in fields[3])
        if fields[0] not in ("QRD", "QRF") and not mindray_dsp:
            parse_segment(
                line, version="2.3.1", validation_level=VALIDATION_LEVEL.STRICT
            ).validate()


def test_mindray_answers_valid_231() -> None:
    query = parse_query(VALID_QRY)
    for has_orders in (True, False):
        qck = hl7_build.build_qck_q02(query, has_orders, control_id="Q", timestamp="20240101")
        assert strict(qck, "ascii").name == "QCK_Q02"  # whole message, STRICT
        mindray_check(qck, "QCK_Q02")
    for order in (ORDER, None):
        dsr = hl7_build.build_dsr_q03(query, order, control_id="Q", timestamp="20240101")
        mindray_check(dsr, "DSR_Q03")
        parse_segment(
            segments_of(dsr)[4], version="2.3.1", validation_level=VALIDATION_LEVEL.STRICT
        ).validate()  # this QRD is valid, and echoed unchanged


def test_mindray_sample_query_fails_hl7apy_on_its_own_segments() -> None:
    _, qry = messages("13")
    with pytest.raises(ValueError, match="RD"):
        strict(unframe(qry), "ascii")


def test_mindray_query_answer() -> None:
    _, qry = messages("13")
    query = parse_query(qry)
    qck = hl7_build.build_qck_q02(query, True, control_id="Q1", timestamp="20240101120000")
    mindray_check(qck, "QCK_Q02")
    assert segments_of(qck) == [
        "MSH|^~\\&|MEDGW||||20240101120000||QCK^Q02|Q1|P|2.3.1||||||ASCII|||",
        "MSA|AA|1|Message accepted|||0|",
        "ERR|0|",
        "QAK|SR|OK|",
    ]
    nf = hl7_build.build_qck_q02(query, False, control_id="Q2", timestamp="20240101120000")
    assert segments_of(nf)[-1] == "QAK|SR|NF|"

    order = ORDER.model_copy(update={"tests": ("ALT", "AST"), "referring_physician": "Lee^Ann"})
    dsr = hl7_build.build_dsr_q03(
        query, order, control_id="Q3", timestamp="20240101120000", sample_type="serum"
    )
    mindray_check(dsr, "DSR_Q03")
    lines = segments_of(dsr)
    assert "|DSR^Q03|Q3|P|2.3.1|" in lines[0]
    assert lines[1:6] == [
        "MSA|AA|1|Message accepted|||0|",
        "ERR|0|",
        "QAK|SR|OK|",
        "QRD|20240828151212|R|D|12|||RD|123456789012|OTH|||T|",
        "QRF||||||RCT|COR|ALL||",
    ]
    dsp = [s for s in lines if s.startswith("DSP")]
    assert len(dsp) == 28 + 2
    assert dsp[0] == "DSP|1||P-1|||"
    assert dsp[2] == "DSP|3||Doe John Q Dr|||"
    assert dsp[3] == "DSP|4||19700101000000|||"
    assert dsp[4] == "DSP|5||F|||"
    assert dsp[20] == "DSP|21||123456789012|||"
    assert dsp[23] == "DSP|24||Y|||"
    assert dsp[25] == "DSP|26||serum|||"
    assert dsp[26] == "DSP|27||Lee Ann|||"
    assert dsp[28:] == ["DSP|29||ALT^^^|||", "DSP|30||AST^^^|||"]
    assert lines[-1] == "DSC||"

    none = hl7_build.build_dsr_q03(query, None, control_id="Q4", timestamp="20240101120000")
    mindray_check(none, "DSR_Q03")
    none_lines = segments_of(none)
    assert "QAK|SR|NF|" in none_lines
    assert "DSP|21||123456789012|||" in none_lines
    assert not any(s.startswith("DSP|29") for s in none_lines)


# -- acknowledgements ------------------------------------------------------------------------


def test_ack_for_law_enhanced_mode() -> None:
    raw = hl7_build.build_ack_for(sample("11"), "AA", control_id="K1", timestamp=TS)
    msg = strict(raw, "latin-1")
    assert msg.name == "ACK"
    msh, msa = segments_of(raw)
    assert msh == (
        "MSH|^~\\&|Host|Host provider|BA400|Biosystems|20240101120000+0000||ACK^R22^ACK|K1|P"
        "|2.5.1|||NE|NE"
    )
    assert msa == "MSA|AA|f7c9b548-0a48-49c2-9223-9f488efbfdeb"


def test_ack_for_original_mode_is_build_ack() -> None:
    oru, _ = messages("13")
    ours = hl7_build.build_ack_for(oru, "AA", control_id="K2", timestamp=TS)
    assert ours == build_ack(parse_msh(unframe(oru)), "AA", control_id="K2", timestamp=TS)
    # Mindray sets MSH-16 "0" (its sample-kind flag, not an HL7 ack type): original mode
    # is what it gets, because only MSH-15/16 values of table 0155 ask for enhanced mode
    with pytest.raises(Hl7Error):
        hl7_build.build_ack_for(b"nonsense", "AA", control_id="K3", timestamp=TS)


# -- single segments hl7apy checks on their own ----------------------------------------------


@pytest.mark.parametrize(
    "segment",
    [
        "SPM|1|32971968||^Unknown|||||||P",
        "SAC|||32971968",
        "TQ1|||||||||S",
        "NTE|1|L|line1\\.br\\line2",
    ],
)
def test_segments_strict(segment: str) -> None:
    parse_segment(segment, version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT).validate()
