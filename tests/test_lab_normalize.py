"""Lab results, normalized: value parsing, the report model and its fingerprint, and every
real ASTM capture with results (samples 01-09) read through its shipped profile."""

from __future__ import annotations

import pytest
from lab_samples import SAMPLES, capture
from pydantic import ValidationError

from drivers.astm.codec import decode_records
from drivers.lab.astm_results import reports_from_records
from drivers.lab.profiles import find_profile
from gateway.lab import LabReport, LabResult, message_fingerprint, parse_value

needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason="no sample captures")

# the shipped profile of each ASTM capture that carries results
PROFILES = {
    "01": "roche-cobas-c111",
    "02": "horiba-pentra",
    "03": "horiba-yumizen",
    "04": "sysmex-xn",
    "05": "cepheid-genexpert",
    "06": "roche-cobas-c311",
    "07": "roche-cobas-e411",
    "08": "hitachi-7600",
    "09": "abbott-architect",
}


def reports(text: bytes, profile: str, instrument: str = "analyzer") -> list[LabReport]:
    p = find_profile(profile)
    return reports_from_records(decode_records(text, encoding=p.encoding), p, instrument)


def sample_report(prefix: str) -> LabReport:
    (report,) = reports(capture(prefix).text, PROFILES[prefix], PROFILES[prefix])
    return report


def astm(*records: str) -> bytes:
    return "".join(r + "\r" for r in records).encode("latin-1")


def by_code(report: LabReport) -> dict[str, LabResult]:
    """The first result of each test code."""
    out: dict[str, LabResult] = {}
    for r in report.results:
        out.setdefault(r.test_code, r)
    return out


# -- parse_value ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "number", "comparator"),
    [
        ("40.13", 40.13, ""),
        ("<2.00", 2.0, "<"),
        ("> 15000.00", 15000.0, ">"),
        (">=5", 5.0, ">="),
        ("<= 0.5", 0.5, "<="),
        ("7,41", 7.41, ""),
        (",5", 0.5, ""),
        ("-1.5", -1.5, ""),
        ("+3", 3.0, ""),
        ("1.2e3", 1200.0, ""),
        ("  88  ", 88.0, ""),
        ("2423973", 2423973.0, ""),
    ],
)
def test_numbers_are_parsed(text: str, number: float, comparator: str) -> None:
    got, comp = parse_value(text)
    assert got == pytest.approx(number)
    assert comp == comparator


@pytest.mark.parametrize(
    "text",
    [
        "-----",
        "Positive",
        "NOT DETECTED",
        "",
        "       ",  # the e 411's "no result"
        "1,234.5",  # a thousands separator is not a decimal comma
        "1,2,3",
        "1:128",
        "< >",
        "PNG\\20240628\\2024_06_27_13_54_27_WDF.PNG",
        "nan",
        "inf",
    ],
)
def test_text_values_are_not_numbers(text: str) -> None:
    assert parse_value(text) == (None, "")


def test_result_of_fills_number_and_comparator() -> None:
    r = LabResult.of("CRP", "<2.00", units="mg/L", flags=("L",), status="F")
    assert (r.value, r.number, r.comparator, r.units, r.flags) == (
        "<2.00",
        2.0,
        "<",
        "mg/L",
        ("L",),
    )
    text = LabResult.of("HIV", "NOT DETECTED")
    assert (text.number, text.comparator) == (None, "")
    with pytest.raises(ValidationError):
        LabResult.of("X", "1", no_such_field="y")
    with pytest.raises(ValidationError):
        r.value = "3"  # frozen


def test_report_json_round_trip() -> None:
    report = LabReport(
        instrument="xn",
        sample_id="S1",
        patient_name="Nguyễn^Văn",
        results=(LabResult.of("WBC", "8,13", units="10*3/uL", flags=("N",)),),
    )
    back = LabReport.from_json(report.to_json())
    assert back == report
    assert back.results[0].number == pytest.approx(8.13)
    assert b'"qc"' not in report.to_json()  # defaults left out


# -- fingerprint -----------------------------------------------------------------------------


def test_fingerprint_ignores_the_header_time_and_follows_values() -> None:
    text = capture("01").text
    new_header = text.replace(b"|P|1|20230803131713\r", b"|P|1|20240101000000\r", 1)
    assert new_header != text
    a, b = reports(text, "roche-cobas-c111")[0], reports(new_header, "roche-cobas-c111")[0]
    assert a.message_time != b.message_time
    assert a.fingerprint() == b.fingerprint()
    rerun = text.replace(b"|40.13|", b"|40.14|", 1)
    assert reports(rerun, "roche-cobas-c111")[0].fingerprint() != a.fingerprint()
    other = reports(text, "roche-cobas-c111", instrument="c111-b")[0]
    assert other.fingerprint() != a.fingerprint()
    as_qc = a.model_copy(update={"qc": True})
    assert as_qc.fingerprint() != a.fingerprint()


def test_fingerprint_of_results_without_their_own_time_ignores_the_header_time() -> None:
    # the c 311 sends no result time (R.12/R.13) and no order time: the header time must
    # not stand in for it, or a resend with a new H.14 would reach the LIS again
    text = capture("06").text
    assert b"|P|1\r" in text  # no H.14 in the capture
    first = text.replace(b"|P|1\r", b"|P|1|20240203132011\r", 1)
    second = text.replace(b"|P|1\r", b"|P|1|20240203140000\r", 1)
    (a,) = reports(first, "roche-cobas-c311")
    (b,) = reports(second, "roche-cobas-c311")
    assert a.message_time == "20240203132011"
    assert {r.result_time for r in a.results} == {""}
    assert a.fingerprint() == b.fingerprint()


def test_message_fingerprint() -> None:
    (one,) = reports(capture("01").text, "roche-cobas-c111")
    assert message_fingerprint([one]) == one.fingerprint()
    two = one.model_copy(update={"sample_id": "S2"})
    both = message_fingerprint([one, two])
    assert len(both) == 32
    assert both not in (one.fingerprint(), two.fingerprint())
    assert message_fingerprint([two, one]) != both  # order is part of the message


# -- the real captures -----------------------------------------------------------------------


@needs_samples
@pytest.mark.parametrize(
    ("prefix", "count", "sample_id", "qc"),
    [
        ("01", 1, "T20 10134GA D28", False),
        ("02", 21, "S1234", False),
        ("03", 21, "PX440N", True),
        ("04", 41, "27", False),
        ("05", 84, "PR25A137", False),
        ("06", 7, "CL-PL-24-0370", False),
        ("07", 4, "000000-00-0001", False),
        ("08", 5, "PCCC2", True),
        ("09", 3, "1379 anonymous", False),
    ],
)
def test_capture_gives_one_report(prefix: str, count: int, sample_id: str, qc: bool) -> None:
    report = sample_report(prefix)
    assert report.profile == PROFILES[prefix]
    assert report.instrument == PROFILES[prefix]
    assert report.source_format == "astm"
    assert len(report.results) == count
    assert report.sample_id == sample_id
    assert report.qc is qc
    if qc:  # QC reports never carry patient fields
        assert (report.patient_id, report.patient_name, report.birth_date, report.sex) == (
            "",
            "",
            "",
            "",
        )
        assert report.control


@needs_samples
def test_cobas_c111() -> None:
    report = sample_report("01")
    assert (report.instrument_id, report.priority, report.message_time) == (
        "SENAITE",
        "S",
        "20230803131713",
    )
    (r,) = report.results
    assert (r.test_code, r.value, r.number, r.units, r.flags, r.status) == (
        "413",
        "40.13",
        40.13,
        "g/L",
        ("N",),
        "F",
    )
    assert (r.operator, r.result_time) == ("$SYS$", "20230803131700")
    assert r.comments == ()  # C|1|I||I is an empty instrument flag comment
    assert report.comments == ()


@needs_samples
def test_pentra_unavailable_values_flags_and_alarm_comments() -> None:
    report = sample_report("02")
    assert (report.patient_name, report.birth_date, report.sex) == ("Mohale^Rita", "19771201", "F")
    assert report.message_time == "20220727121551"
    results = by_code(report)
    bas = results["BAS#"]
    assert (bas.value, bas.number, bas.comparator, bas.flags, bas.status) == (
        "-----",
        None,
        "",
        ("HH",),
        "X",
    )
    assert results["BAS%"].value == "-----"
    assert results["MON#"].flags == ("L",)
    assert (results["WBC"].value, results["WBC"].status) == ("8.5", "W")
    assert (results["MCV"].number, results["RDWSD"].value) == (88.0, "43")
    # every component of an alarm comment, not only the first
    assert results["WBC"].comments == (
        "Alarm_WBC LMNE- BASO+ LL NL LN NO SL1",
        "LARGE IMMATURE CELL NRBCs",
    )
    assert results["PLT"].comments == ("PLATELET AGGREGATS",)
    assert results["LYM#"].comments == ()


@needs_samples
def test_yumizen_qc_with_ranges_and_control_failure() -> None:
    report = sample_report("03")
    assert (report.control, report.instrument_id, report.priority) == ("CTRL MEDIUM", "H500", "R")
    # C records after the O comment on the specimen, every component kept
    assert report.comments == ("CONTROL_FAILED PLT_ABOVE_TOLERANCE", "ABXdifftrol N")
    mcv = by_code(report)["MCV"]
    assert (mcv.value, mcv.units, mcv.reference_range, mcv.flags) == (
        "90.6",
        "um3",
        "84.0 - 94.0",
        ("N",),
    )
    assert (mcv.operator, mcv.result_time) == ("MATYL", "20230329110631")
    assert by_code(report)["PLT"].reference_range == "231 - 291"


@needs_samples
def test_sysmex_xn_sample_number_flags_and_image_rows() -> None:
    report = sample_report("04")
    assert (report.patient_id, report.birth_date, report.sex) == ("37182", "19870626", "M")
    assert report.instrument_id == "XN-550"  # H.5.1, space padding stripped
    results = by_code(report)
    assert (results["HGB"].value, results["HGB"].units) == ("8.0", "g/dL")
    assert results["HCT"].flags == ("L",)
    assert results["EO%"].flags == ("H",)
    assert (results["WBC"].value, results["WBC"].result_time) == ("8.13", "20240627135407")
    assert results["Blasts/Abn_Lympho?"].number == 40.0
    assert (results["Anemia"].value, results["Anemia"].flags) == ("", ("A",))
    # &R& is the escape of the repeat delimiter (E1394 section 7.3)
    assert results["SCAT_WDF"].value == "PNG\\20240628\\2024_06_27_13_54_27_WDF.PNG"
    assert [r.test_code for r in report.results][-4:] == [
        "SCAT_WDF",
        "SCAT_WDF-CBC",
        "DIST_RBC",
        "DIST_PLT",
    ]


@needs_samples
def test_genexpert_non_default_delimiters_and_aspects() -> None:
    report = sample_report("05")
    mtb = report.results[0]
    assert (mtb.test_code, mtb.test_name, mtb.value, mtb.aspect) == (
        "MTB",
        "Xpert MTB-RIF Ultra",
        "NOT DETECTED",
        "",
    )
    assert (mtb.status, mtb.operator, mtb.result_time) == ("F", "John Doe", "20250514132103")
    ct = report.results[2]
    assert (ct.test_code, ct.aspect, ct.value, ct.number) == ("rpoB1", "Ct", "0.0", 0.0)
    assert report.results[3].number == -2.0  # rpoB1 EndPt ^-2.0
    aspects = {r.aspect for r in report.results}
    assert aspects == {"", "Ct", "EndPt"}
    assert [r.test_code for r in report.results if r.test_name] == [
        "MTB",
        "MTB Trace",
        "RIF Resistance",
    ]
    # report-level fields come from the first result: R.14.2 is the instrument S/N
    assert report.instrument_id == "806149"
    assert report.patient_name == ""  # P.6 is ^^^^: no name at all
    assert report.message_time == "20250516125515"


@needs_samples
def test_cobas_c311_padding_and_instrument_flag_comments() -> None:
    report = sample_report("06")
    assert report.instrument_id == "c311"
    assert [r.test_code for r in report.results] == [
        "685",
        "687",
        "712",
        "158",
        "735",
        "717",
        "690",
    ]
    alt = report.results[0]
    assert (alt.value, alt.units, alt.flags, alt.status, alt.comments) == (
        "22.4",
        "U/l",
        ("A",),
        "F",
        ("43",),
    )
    glu = by_code(report)["717"]
    assert (glu.value, glu.units, glu.comments) == ("5.85", "mmol/l", ("0",))


@needs_samples
def test_cobas_e411_value_split_across_frames() -> None:
    report = sample_report("07")
    got = [(r.test_code, r.value, r.units) for r in report.results]
    assert got == [
        ("117", "5.41", "IU/l"),
        ("900", "0.521", "COI"),  # -1^0.521: the profile keeps the cut-off index
        ("880", "0.337", "COI"),
        ("136", "0.117", "COI"),
    ]
    assert report.priority == "R"
    assert {r.operator for r in report.results} == {"ADMIN"}


@needs_samples
def test_hitachi_qc_upload() -> None:
    report = sample_report("08")
    assert (report.control, report.instrument_id) == ("PCCC2", "H7600")
    assert report.comments == ()  # C|1|I|^^^^|G has no text
    first = report.results[0]
    assert (first.test_code, first.value, first.units, first.flags) == (
        "798",
        "4.60",
        "mmol/l",
        ("A",),
    )
    assert (first.operator, first.comments) == ("ADMIN", ("101",))
    assert by_code(report)["717"].number == 13.12


@needs_samples
def test_architect_three_aspects_of_one_test() -> None:
    report = sample_report("09")
    assert (report.instrument_id, report.sex, report.message_time) == (
        "i1SR02762",
        "U",
        "20120217144954",
    )
    final, interpretation, raw = report.results
    assert {r.test_code for r in report.results} == {"651"}
    assert [r.aspect for r in report.results] == ["F", "I", "P"]
    assert (final.value, final.number, final.comparator, final.flags, final.units) == (
        "> 15000.00",
        15000.0,
        ">",
        (">",),
        "mIU/mL",
    )
    assert (interpretation.value, interpretation.number) == ("Positive", None)
    assert (raw.value, raw.number, raw.units) == ("2423973", 2423973.0, "RLU")
    assert final.test_name == "_B-hCG"


@needs_samples
def test_qc_by_action_code() -> None:
    text = capture("01").text
    assert b"||||||N|" in text  # O.12 action code N
    (qc,) = reports(text.replace(b"||||||N|", b"||||||Q|", 1), "roche-cobas-c111")
    assert qc.qc
    assert qc.control == "T20 10134GA D28"  # no O.16.3: the sample id


@needs_samples
def test_yumizen_patient_run_is_not_qc() -> None:
    text = capture("03").text.replace(b"|||||||Q|LIS2-A2|", b"|||||||P|LIS2-A2|", 1)
    text = text.replace(b"CTRL^^CTRL MEDIUM", b"", 1)
    (report,) = reports(text, "horiba-yumizen")
    assert not report.qc
    assert report.control == ""


# -- structure -------------------------------------------------------------------------------


def test_one_report_per_specimen_with_its_patient() -> None:
    text = astm(
        "H|\\^&|||LAB^1|||||||P|1|20240101120000",
        "P|1||PID-1||Doe^Jane||19700101|F",
        "C|1|I|before any order|G",
        "O|1|S1||^^^GLU\\^^^CREA|R",
        "C|1|I|haemolysed|G",
        "R|1|^^^GLU|7,41|mmol/L||H||F||||20240101115900",
        "R|2|^^^CREA|<20|umol/L||L||F",
        "C|1|I|below range^re-run advised|G",
        "P|2||PID-2||Roe^Rick",
        "O|1|S2||^^^GLU|S",
        "R|1|^^^GLU|5.0|mmol/L||N||F",
        "O|2|S3||^^^NA|R",
        "L|1|N",
    )
    s1, s2 = reports(text, "generic-astm")  # S3 has no results: no report
    assert (s1.sample_id, s1.patient_id, s1.patient_name, s1.sex) == (
        "S1",
        "PID-1",
        "Doe^Jane",
        "F",
    )
    assert s1.comments == ("haemolysed",)
    glu, crea = s1.results
    assert (glu.value, glu.number, glu.flags, glu.result_time) == (
        "7,41",
        7.41,
        ("H",),
        "20240101115900",
    )
    assert (crea.number, crea.comparator, crea.comments) == (
        20.0,
        "<",
        ("below range re-run advised",),
    )
    assert crea.result_time == ""  # none of its own, and not the header's
    assert (s2.sample_id, s2.patient_id, s2.patient_name, s2.priority) == (
        "S2",
        "PID-2",
        "Roe^Rick",
        "S",
    )
    assert s2.birth_date == ""  # not inherited from the first patient
    assert s1.message_time == s2.message_time == "20240101120000"


def test_repeated_flags_and_component_separated_flags() -> None:
    text = astm(
        "H|\\^&",
        "O|1|S1",
        "R|1|^^^A|1|||H\\A||F",
        "R|2|^^^B|2|||<^L||F",
        "L|1|N",
    )
    (report,) = reports(text, "generic-astm")
    assert [r.flags for r in report.results] == [("H", "A"), ("<", "L")]


@needs_samples
def test_host_query_capture_has_no_results() -> None:
    text = capture("10").text
    assert b"Q|1|^2240801063^^||^^^ALL^||||||||O\r" in text
    assert reports(text, "thermo-indiko") == []
