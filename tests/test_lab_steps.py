"""Route steps for lab work: ``map-codes`` (LIS codes, LOINC, unit conversions, dropped
aspects and ignored rows, unmapped keep/drop/fail), ``hl7-oru`` (read back and validated
with hl7apy), ``lab-orders`` and ``lab-order-push``, on the real captures."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message
from lab_samples import SAMPLES, capture
from lab_samples import read as read_sample
from pydantic import ValidationError

from drivers.astm.codec import decode_records
from drivers.lab.astm_results import reports_from_records
from drivers.lab.hl7_results import reports_from_hl7
from drivers.lab.order_store import order_store
from drivers.lab.profiles import Profile, ProfileError, UnitConversion, find_profile
from drivers.lab.steps import (
    Hl7OruParams,
    Hl7OruStep,
    LabOrderPushParams,
    LabOrderPushStep,
    LabOrdersParams,
    LabOrdersStep,
    MapCodesParams,
    MapCodesStep,
    Profiles,
    convert_range,
    map_report,
    map_result,
)
from gateway.config import parse_config
from gateway.envelope import Envelope
from gateway.errors import ConfigError, PermanentError
from gateway.lab import FORMAT_NORMALIZED, LAB_RESULT_KIND, LabReport, LabResult
from gateway.orders import ORDER_KIND, Order
from gateway.registry import PluginContext, default_registry
from gateway.steps import AnyEnvelope

needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason="no sample captures")
PROFILES = Profiles("")
GENERIC_HL7 = find_profile("generic-hl7")


def astm_envelope(prefix: str, profile: str, source: str = "analyzer") -> Envelope:
    """A lab-result envelope as the ASTM session journals it: the raw message text."""
    return Envelope(
        kind=LAB_RESULT_KIND,
        source=source,
        body=capture(prefix).text,
        headers={"protocol": "astm", "profile": profile, "charset": "latin-1"},
    )


def astm_report(prefix: str, profile: str) -> LabReport:
    p = find_profile(profile)
    (report,) = reports_from_records(decode_records(capture(prefix).text), p, profile)
    return report


def strict(raw: bytes) -> Message:
    """hl7apy's STRICT parse and validation (structure, groups, required fields, types)."""
    msg = parse_message(
        raw.decode("utf-8"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True
    )
    msg.validate()
    return msg


async def mapped(envelope: Envelope, **params: str) -> list[LabReport]:
    out = await MapCodesStep(MapCodesParams.model_validate(params), PROFILES).run(envelope)
    assert all(e.headers["format"] == FORMAT_NORMALIZED for e in out)
    return [LabReport.from_json(e.body) for e in out]


async def oru(envelope: AnyEnvelope, message: str = "ORU^R01") -> list[AnyEnvelope]:
    step = Hl7OruStep(Hl7OruParams.model_validate({"message": message}), PROFILES, "SITE-1")
    return list(await step.run(envelope))


# -- map-codes: codes, LOINC, units ------------------------------------------------------------


@needs_samples
def test_ba400_results_get_lis_codes_loinc_and_si_units() -> None:
    profile = find_profile("biosystems-ba400")
    (report,) = reports_from_hl7(read_sample("11"), profile, "ba400")
    got = map_report(report, profile, "keep")
    rows = [(r.test_code, r.lis_code, r.loinc, r.value, r.units) for r in got.results]
    assert rows == [
        ("CHOL HDL DIRECT", "HDL-C", "14646-4", "1.58", "mmol/L"),  # 60.9779778 * 0.02586
        ("CHOLESTEROL", "CHOL", "14647-2", "4.60", "mmol/L"),  # 177.710159 * 0.02586
        ("TRIGLYCERIDES", "TG", "14927-8", "0.59", "mmol/L"),  # 52.4089546 * 0.01129
    ]
    chol = got.results[1]
    assert chol.number == pytest.approx(4.6)
    assert chol.lis_name == "Cholesterol, total"
    assert chol.comments == ("converted by medgw from 177.710159 mg/dL",)
    assert chol.flags == ("NONE",)  # flags are not touched


def test_glucose_mg_dl_to_mmol_l_with_its_reference_range() -> None:
    profile = find_profile("biosystems-ba400")  # GLU: mg/dL * 0.0555, 2 decimals
    glu = LabResult.of("GLUCOSE", "126", units="mg/dL", reference_range="70-110", flags=("H",))
    got = map_result(glu, profile)
    assert (got.lis_code, got.loinc, got.value, got.number, got.units) == (
        "GLU",
        "14749-6",
        "6.99",
        6.99,
        "mmol/L",
    )
    assert got.reference_range == "3.89-6.11"  # in the new units too
    low = map_result(LabResult.of("GLUCOSE", "<20", units="mg/dL"), profile)
    assert (low.value, low.comparator, low.number) == ("<1.11", "<", 1.11)
    already = map_result(LabResult.of("GLUCOSE", "5.2", units="mmol/L"), profile)
    assert (already.value, already.units, already.comments) == ("5.2", "mmol/L", ())
    text = map_result(LabResult.of("GLUCOSE", "see comment", units="mg/dL"), profile)
    assert (text.value, text.units, text.lis_code) == ("see comment", "mg/dL", "GLU")


def test_unit_names_match_without_case() -> None:
    profile = find_profile("hitachi-7600")  # 717 -> GLU, from: mg/dl
    got = map_result(LabResult.of("717", "99", units="mg/dL"), profile)
    assert (got.value, got.units) == ("5.49", "mmol/L")


def test_conversion_without_decimals_stays_plain_decimal() -> None:
    conv = UnitConversion.model_validate(
        {"test": "*", "from": "10*3/uL", "to": "/uL", "factor": 1000}
    )
    profile = find_profile("generic-astm").model_copy(update={"units": (conv,)})
    got = map_result(
        LabResult.of("WBC", "8130.5", units="10*3/uL", reference_range="4-10"), profile
    )
    assert (got.value, got.units, got.reference_range) == ("8130500", "/uL", "4000-10000")
    assert convert_range("< 200", conv) == "< 200000"
    assert convert_range("negative", conv) == "negative"


@needs_samples
def test_conversion_only_for_the_named_test() -> None:
    # the c 311 sends glucose in mmol/l already: nothing to convert, only codes
    report = map_report(
        astm_report("06", "roche-cobas-c311"), find_profile("roche-cobas-c311"), "keep"
    )
    glu = next(r for r in report.results if r.test_code == "717")
    assert (glu.lis_code, glu.loinc, glu.value, glu.units) == ("GLU", "14749-6", "5.85", "mmol/l")
    crea = next(r for r in report.results if r.test_code == "690")
    assert (crea.lis_code, crea.value, crea.units) == ("CREA", "34", "umol/l")
    unmapped = next(r for r in report.results if r.test_code == "687")
    assert (unmapped.lis_code, unmapped.value) == ("", "15.0")


@needs_samples
def test_sysmex_image_rows_are_ignored_and_unmapped_flags_kept_dropped_or_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    profile = find_profile("sysmex-xn")
    report = astm_report("04", "sysmex-xn")
    with caplog.at_level(logging.INFO, logger="drivers.lab.steps"):
        kept = map_report(report, profile, "keep")
    codes = [r.test_code for r in kept.results]
    assert not [c for c in codes if c.startswith(("SCAT_", "DIST_"))]
    assert len(kept.results) == 41 - 4
    unmapped = [r.test_code for r in kept.results if not r.lis_code]
    assert unmapped[:3] == ["Eosinophilia", "Anemia", "Blasts/Abn_Lympho?"]
    assert len(unmapped) == 14
    assert "lab.unmapped_code" in caplog.text and "test=Blasts/Abn_Lympho?" in caplog.text
    hgb = next(r for r in kept.results if r.test_code == "HGB")
    assert (hgb.lis_code, hgb.value, hgb.units, hgb.loinc) == ("HGB", "80", "g/L", "718-7")

    dropped = map_report(report, profile, "drop")
    assert len(dropped.results) == 23
    assert all(r.lis_code for r in dropped.results)
    with pytest.raises(PermanentError, match="no LIS code for test 'Eosinophilia'"):
        map_report(report, profile, "fail")


@needs_samples
def test_architect_raw_aspect_is_dropped() -> None:
    profile = find_profile("abbott-architect")
    report = map_report(astm_report("09", "abbott-architect"), profile, "fail")
    assert [(r.aspect, r.lis_code, r.value) for r in report.results] == [
        ("F", "B-HCG", "> 15000.00"),
        ("I", "B-HCG-INT", "Positive"),
    ]


def test_ignore_tests_are_whole_code_patterns() -> None:
    profile = find_profile("sysmex-xn")
    assert profile.ignored("SCAT_WDF") and profile.ignored("DIST_PLT")
    assert not profile.ignored("XSCAT_WDF")
    assert not profile.ignored("WBC")


def test_map_codes_params() -> None:
    assert MapCodesParams().unmapped == "keep"
    with pytest.raises(ValidationError):
        MapCodesParams.model_validate({"unmapped": "ignore"})
    registry = default_registry()
    text = (
        "site: {id: s}\nstate_dir: /tmp/x\nhttp: {listen: null}\n"
        "listeners: [{id: a, type: hl7-mllp, listen: 127.0.0.1:2575}]\n"
        "destinations: [{id: o, type: folder, path: /tmp/o}]\n"
        "routes: [{match: {source: a}, steps: [{map-codes: {unmapped: sometimes}}], to: [o]}]\n"
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, registry, source="t.yaml")
    assert any("routes[0].steps[0].map-codes.unmapped" in p for p in err.value.problems)


# -- map-codes as a step -------------------------------------------------------------------------


@needs_samples
async def test_map_codes_step_on_a_raw_astm_envelope() -> None:
    envelope = astm_envelope("04", "sysmex-xn", source="xn550")
    out = await MapCodesStep(MapCodesParams(), PROFILES).run(envelope)
    (normalized,) = out
    assert normalized.kind == LAB_RESULT_KIND
    assert normalized.headers == {
        "format": FORMAT_NORMALIZED,
        "qc": "false",
        "instrument": "xn550",
        "profile": "sysmex-xn",
    }
    report = LabReport.from_json(normalized.body)
    assert report.instrument == "xn550"
    assert report.sample_id == "27"
    assert normalized.idem_key == f"labreport:{report.fingerprint()}"
    assert isinstance(normalized, Envelope) and normalized.dedupe_on_key
    again = await MapCodesStep(MapCodesParams(), PROFILES).run(envelope)
    assert again[0].idem_key == normalized.idem_key  # deterministic: a re-run is a duplicate
    # a normalized envelope maps to itself (steps may be re-run after a crash)
    (twice,) = await MapCodesStep(MapCodesParams(), PROFILES).run(normalized)
    assert LabReport.from_json(twice.body) == report


@needs_samples
async def test_the_qc_header_says_which_reports_an_envelope_stands_for() -> None:
    """A message with QC and patient specimens is journaled once per kind (qc header):
    each copy gives only its own reports, so no patient result goes the QC way."""
    qc_run = astm_envelope("08", "hitachi-7600")
    as_patient = replace(qc_run, headers={**qc_run.headers, "qc": "false"})
    assert await MapCodesStep(MapCodesParams(), PROFILES).run(as_patient) == []
    as_qc = replace(qc_run, headers={**qc_run.headers, "qc": "true"})
    (out,) = await MapCodesStep(MapCodesParams(), PROFILES).run(as_qc)
    assert LabReport.from_json(out.body).qc


@needs_samples
async def test_map_codes_step_profile_parameter_and_qc_header() -> None:
    (report,) = await mapped(astm_envelope("08", "generic-astm"), profile="hitachi-7600")
    assert report.profile == "generic-astm"  # read with the listener's profile
    glu = next(r for r in report.results if r.test_code == "717/")  # generic: no pattern
    assert glu.lis_code == ""
    out = await MapCodesStep(MapCodesParams(), PROFILES).run(astm_envelope("08", "hitachi-7600"))
    assert out[0].headers["qc"] == "true"
    qc = LabReport.from_json(out[0].body)
    assert qc.qc and next(r for r in qc.results if r.test_code == "717").lis_code == "GLU"


async def test_map_codes_step_passes_other_kinds_and_rejects_bad_input() -> None:
    step = MapCodesStep(MapCodesParams(), PROFILES)
    other = Envelope(kind="hl7", source="his", body=b"MSH|^~\\&|")
    assert await step.run(other) == [other]
    bad_astm = Envelope(
        kind=LAB_RESULT_KIND, source="a", body=b"not astm", headers={"protocol": "astm"}
    )
    with pytest.raises(PermanentError, match="cannot read results"):
        await step.run(bad_astm)
    unknown = Envelope(kind=LAB_RESULT_KIND, source="a", body=b"x", headers={"protocol": "x"})
    with pytest.raises(PermanentError, match="unknown lab protocol 'x'"):
        await step.run(unknown)
    no_profile = Envelope(
        kind=LAB_RESULT_KIND,
        source="a",
        body=b"H|\\^&\rL|1|N\r",
        headers={"protocol": "astm", "profile": "no-such"},
    )
    with pytest.raises(PermanentError, match="unknown profile 'no-such'"):
        await step.run(no_profile)


# -- hl7-oru --------------------------------------------------------------------------------------


def assert_same_results(sent: LabReport, back: LabReport) -> None:
    assert back.sample_id == sent.sample_id
    assert back.qc is sent.qc
    assert len(back.results) == len(sent.results)
    for before, after in zip(sent.results, back.results, strict=True):
        assert after.test_code == (before.lis_code or before.test_code)
        assert (after.number, after.comparator) == (before.number, before.comparator)
        assert after.units == before.units
        assert after.flags == before.flags
        assert after.comments == before.comments
        if before.number is None:
            assert after.value == before.value
        else:
            assert after.value.lstrip("<>= ") == before.value.lstrip("<>= ").replace(",", ".")


CAPTURES = [
    ("01", "roche-cobas-c111"),
    ("02", "horiba-pentra"),
    ("03", "horiba-yumizen"),
    ("04", "sysmex-xn"),
    ("05", "cepheid-genexpert"),
    ("06", "roche-cobas-c311"),
    ("07", "roche-cobas-e411"),
    ("08", "hitachi-7600"),
    ("09", "abbott-architect"),
]


async def oru_of_capture(prefix: str, profile: str) -> tuple[LabReport, AnyEnvelope]:
    (normalized,) = await MapCodesStep(MapCodesParams(), PROFILES).run(
        astm_envelope(prefix, profile)
    )
    (message,) = await oru(normalized)
    return LabReport.from_json(normalized.body), message


@needs_samples
@pytest.mark.parametrize(("prefix", "profile"), CAPTURES)
async def test_oru_for_each_capture_reads_back(prefix: str, profile: str) -> None:
    report, message = await oru_of_capture(prefix, profile)
    assert message.kind == "hl7"
    fingerprint = report.fingerprint()
    assert message.headers == {
        "message_type": "ORU^R01",
        "control_id": fingerprint[:20],
        "qc": "true" if report.qc else "false",
        "instrument": "analyzer",
    }
    assert message.idem_key == f"oru:ORU^R01:{fingerprint}"
    assert isinstance(message, Envelope) and message.dedupe_on_key
    (back,) = reports_from_hl7(message.body, GENERIC_HL7, "lis")
    assert_same_results(report, back)
    if not report.qc:
        assert (back.patient_id, back.patient_name) == (report.patient_id, report.patient_name)
    assert message.body.startswith(b"MSH|^~\\&|MEDGW|SITE-1|LIS||")


# the Pentra sends a patient name without an id (P.6 only): PID-3 is then the explicit null
VALID_HL7 = [pytest.param(prefix, profile) for prefix, profile in CAPTURES]


@needs_samples
@pytest.mark.parametrize(("prefix", "profile"), VALID_HL7)
async def test_oru_for_each_capture_is_valid_hl7(prefix: str, profile: str) -> None:
    _, message = await oru_of_capture(prefix, profile)
    msg = strict(message.body)
    assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"


@needs_samples
async def test_oru_values_from_the_captures() -> None:
    _, pentra = await oru_of_capture("02", "horiba-pentra")
    text = pentra.body.decode()
    assert "|ST|BASO#^Basophils^L^704-7^^LN||-----|1||HH|||X|" in text
    assert "NTE|1|L|Alarm_WBC LMNE- BASO+ LL NL LN NO SL1" in text
    _, architect = await oru_of_capture("09", "abbott-architect")
    lines = architect.body.decode().split("\r")
    obx = [s for s in lines if s.startswith("OBX")]
    assert obx[0].startswith("OBX|1|SN|B-HCG^Beta-hCG, total^L||>^15000.00|mIU/mL||>|||F")
    assert obx[1].startswith("OBX|2|ST|B-HCG-INT^Beta-hCG interpretation^L||Positive|")
    assert len(obx) == 2  # the raw RLU is not sent
    assert "PID|1|||||||U" not in lines  # an ARCHITECT P record names nobody


async def test_decimal_comma_reaches_the_lis_as_a_number() -> None:
    text = b"H|\\^&|||X|||||||P|1\rP|1||P9||Roe^Ann\rO|1|S9||^^^PH\rR|1|^^^PH|7,41|||N||F\rL|1|N\r"
    envelope = Envelope(
        kind=LAB_RESULT_KIND,
        source="bg",
        body=text,
        headers={"protocol": "astm", "profile": "generic-astm"},
    )
    (message,) = await oru(envelope)
    strict(message.body)
    assert "OBX|1|NM|PH^^99MGW||7.41|" in message.body.decode()
    (back,) = reports_from_hl7(message.body, GENERIC_HL7, "lis")
    assert back.results[0].number == pytest.approx(7.41)


@needs_samples
async def test_oul_r22_for_a_qc_capture() -> None:
    (normalized,) = await MapCodesStep(MapCodesParams(), PROFILES).run(
        astm_envelope("03", "horiba-yumizen")
    )
    (message,) = await oru(normalized, "OUL^R22")
    assert message.headers["message_type"] == "OUL^R22"
    assert message.headers["qc"] == "true"
    strict(message.body)
    (back,) = reports_from_hl7(message.body, GENERIC_HL7, "lis")
    assert back.qc
    assert len(back.results) == 21
    hgb = next(r for r in back.results if r.test_code == "HGB")
    assert (hgb.value, hgb.units, hgb.reference_range) == ("133", "g/L", "127 - 137")


@needs_samples
async def test_hl7_analyzer_results_through_both_steps() -> None:
    envelope = Envelope(
        kind=LAB_RESULT_KIND,
        source="ba400",
        body=read_sample("11"),
        headers={"protocol": "hl7", "profile": "biosystems-ba400", "qc": "false"},
    )
    (normalized,) = await MapCodesStep(MapCodesParams(), PROFILES).run(envelope)
    (message,) = await oru(normalized)
    strict(message.body)
    (back,) = reports_from_hl7(message.body, GENERIC_HL7, "lis")
    assert [(r.test_code, r.value, r.units) for r in back.results] == [
        ("HDL-C", "1.58", "mmol/L"),
        ("CHOL", "4.60", "mmol/L"),
        ("TG", "0.59", "mmol/L"),
    ]
    assert back.instrument_id == "A400"  # OBX-18
    assert "OBX|2|NM|CHOL^Cholesterol, total^L^14647-2^^LN||4.60|mmol/L||NONE|||F" in (
        message.body.decode()
    )


async def test_oru_passes_other_kinds() -> None:
    other = Envelope(kind="dicom", source="x", body=b"")
    assert await oru(other) == [other]


# -- lab-orders and lab-order-push ------------------------------------------------------------

OML = (
    b"MSH|^~\\&|LIS|HOSP|MEDGW|LAB|20240601080000||OML^O21^OML_O21|OML-7|P|2.5.1\r"
    b"PID|1||BN9||Doe^Jane||19700101|F\r"
    b"ORC|NW|ORD-7\r"
    b"OBR|1|ORD-7||CHOL\r"
    b"SPM|1|32971968||SER\r"
    b"ORC|NW|ORD-7\r"
    b"OBR|2|ORD-7||TG\r"
    b"SPM|1|32971968||SER\r"
)


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[PluginContext]:
    context = PluginContext("site", str(tmp_path / "state"), None)
    yield context
    order_store(context).close()


async def test_lab_orders_step_fills_the_table(ctx: PluginContext) -> None:
    step = LabOrdersStep(LabOrdersParams(), ctx)
    envelope = Envelope(kind="hl7", source="lis", body=OML, headers={"charset": "utf-8"})
    assert await step.run(envelope) == []  # consumed
    found = order_store(ctx).find("32971968")
    assert found is not None
    assert (found.tests, found.accession, found.patient_name) == (
        ("CHOL", "TG"),
        "ORD-7",
        "Doe^Jane",
    )
    oru_message = Envelope(
        kind="hl7", source="lis", body=b"MSH|^~\\&|A||||1||ORU^R01|1|P|2.5.1\rOBR|1\r"
    )
    assert await step.run(oru_message) == []
    assert order_store(ctx).count() == 1
    cancel = OML.replace(b"ORC|NW|ORD-7\rOBR|2", b"ORC|CA|ORD-7\rOBR|2")
    await step.run(Envelope(kind="hl7", source="lis", body=cancel))
    left = order_store(ctx).find("32971968")
    assert left is not None
    assert left.tests == ("CHOL",)
    bad = Envelope(kind="hl7", source="lis", body=OML.replace(b"ORC|NW", b"ORC|ZZ"))
    with pytest.raises(PermanentError, match="unknown order control"):
        await step.run(bad)
    assert await step.run(Envelope(kind="dicom", source="x", body=b"")) == []


async def test_lab_orders_step_emits_orders_and_takes_order_envelopes(ctx: PluginContext) -> None:
    step = LabOrdersStep(LabOrdersParams(emit=True, specimen_from=("ORC-2",)), ctx)
    (emitted,) = await step.run(Envelope(kind="hl7", source="lis", body=OML))
    assert emitted.kind == ORDER_KIND
    assert emitted.headers == {"control": "new", "specimen_id": "ORD-7"}
    assert Order.from_json(emitted.body).tests == ("CHOL", "TG")
    plain = Order(control="new", accession="A5", patient_id="P5", specimen_id="S5", tests=("GLU",))
    await step.run(Envelope(kind=ORDER_KIND, source="his", body=plain.to_json()))
    assert order_store(ctx).find("S5") == plain
    with pytest.raises(ValidationError):
        LabOrdersParams(specimen_from=())


async def test_lab_order_push_builds_oml_o33_in_analyzer_codes() -> None:
    step = LabOrderPushStep(
        LabOrderPushParams(profile="biosystems-ba400", receiving_app="BA400"), PROFILES, "SITE-1"
    )
    lis_order = Order(
        control="new",
        accession="ORD-7",
        patient_id="BN9",
        patient_name="Doe^Jane",
        specimen_id="32971968",
        tests=("CHOL",),
        priority="R",
    )
    envelope = Envelope(kind=ORDER_KIND, source="lis", body=lis_order.to_json())
    (message,) = await step.run(envelope)
    assert message.headers == {"message_type": "OML^O33", "control_id": envelope.id[-20:]}
    strict(message.body)
    lines = message.body.decode().split("\r")
    assert lines[0].startswith("MSH|^~\\&|MEDGW|SITE-1|BA400||")
    assert "SPM|1|32971968||" in "\r".join(lines)
    assert "OBR|1|ORD-7-1||CHOLESTEROL" in lines  # the BA400's own test name
    two = lis_order.model_copy(update={"tests": ("CHOL", "NOT-MAPPED")})
    (both,) = await step.run(Envelope(kind=ORDER_KIND, source="lis", body=two.to_json()))
    assert "OBR|2|ORD-7-2||NOT-MAPPED" in both.body.decode().split("\r")
    assert await step.run(Envelope(kind="hl7", source="lis", body=OML)) == []
    with pytest.raises(PermanentError, match="unknown profile"):
        LabOrderPushStep(LabOrderPushParams(profile="nope"), PROFILES, "S")


def test_profiles_default_to_generic_astm(tmp_path: Path) -> None:
    assert Profiles("").get("").name == "generic-astm"
    site = tmp_path / "drivers"
    site.mkdir()
    shipped = find_profile("sysmex-xn")
    doc = json.loads(shipped.model_dump_json(by_alias=True))
    doc["title"] = "our XN"
    (site / "sysmex-xn.yaml").write_text(json.dumps(doc), encoding="utf-8")
    assert Profiles(str(tmp_path)).get("sysmex-xn").title == "our XN"
    assert isinstance(Profiles(str(tmp_path)).get("sysmex-xn"), Profile)


def test_profile_code_helpers() -> None:
    hitachi = find_profile("hitachi-7600")
    assert hitachi.code_of(" 798/ ") == "798"  # ^^^798/: the ACN before the slash
    assert hitachi.code_of("ALT") == "ALT"
    assert hitachi.analyzer_code("GLU") == "717"  # 717 and 767 both map to GLU: the first
    assert hitachi.analyzer_code("NOT-MAPPED") == "NOT-MAPPED"
    architect = find_profile("abbott-architect")
    assert architect.analyzer_code("B-HCG-INT") == "651"  # 651/I: the aspect dropped
    assert find_profile("generic-astm").code_of("^^^GLU") == "^^^GLU"  # no pattern
    with pytest.raises(ProfileError, match=r"unknown profile 'x-ray' \(known: abbott-architect"):
        find_profile("x-ray")
