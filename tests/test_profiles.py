"""The analyzer profiles shipped in config/drivers: they load, say what their analyzer
speaks, carry well-formed LOINC codes, and read the real captures correctly."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest
from lab_samples import capture

from drivers.astm.codec import decode_records
from drivers.lab.astm_results import reports_from_records
from drivers.lab.hl7_results import reports_from_hl7
from drivers.lab.profiles import (
    SHIPPED_DIRS,
    Profile,
    ProfileError,
    catalog,
    find_profile,
    load_profile_file,
    profile_dirs,
)
from drivers.lab.steps import map_report
from gateway.lab import LabReport

PROFILE_FILES = sorted(SHIPPED_DIRS[0].glob("*.yaml"))

# every analyzer the gateway promises a profile for, and the protocol it speaks
EXPECTED = {
    "sysmex-xn": "astm",
    "sysmex-xs": "astm",
    "roche-cobas-c111": "astm",
    "roche-cobas-c311": "astm",
    "roche-cobas-e411": "astm",
    "abbott-architect": "astm",
    "horiba-pentra": "astm",
    "horiba-yumizen": "astm",
    "mindray-bs": "hl7",
    "mindray-bc": "hl7",
    "biosystems-ba400": "hl7",
    "cepheid-genexpert": "astm",
    "generic-astm": "astm",
    "generic-hl7": "hl7",
    "hitachi-7600": "astm",
    "thermo-indiko": "astm",
}

LOINC_FORMAT = re.compile(r"^(\d{1,7})-(\d)$")
ASTM_PATH = re.compile(r"^[HPOROCMQSL]\.")
HL7_PATH = re.compile(r"^[A-Z][A-Z0-9]{2}-")


def loinc_check_digit(body: str) -> int:
    """The LOINC mod-10 check digit of the digits before the hyphen.

    From the right, every other digit starting with the rightmost is doubled (the
    digits of a two-digit product are added); the others are added as they are. The
    check digit brings that sum up to the next multiple of ten (LOINC Users' Guide,
    "Calculating Mod 10 check digits")."""
    total = 0
    for position, char in enumerate(reversed(body)):
        digit = int(char)
        if position % 2 == 0:
            digit *= 2
            digit = digit // 10 + digit % 10
        total += digit
    return (10 - total % 10) % 10


def is_valid_loinc(code: str) -> bool:
    m = LOINC_FORMAT.match(code)
    return bool(m) and loinc_check_digit(m.group(1)) == int(m.group(2))


def shipped() -> dict[str, Profile]:
    return {path.stem: load_profile_file(path) for path in PROFILE_FILES}


# -- the check digit itself --------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    ["6690-2", "789-8", "718-7", "4544-3", "2345-7", "14749-6", "21000-5", "3016-3", "1742-6"],
)
def test_check_digit_of_known_loinc_codes(code: str) -> None:
    assert is_valid_loinc(code)


@pytest.mark.parametrize(
    "code",
    [
        "789-9",  # RBC with a wrong check digit, as the Pentra XLR sends it (sample 02)
        "2100-5",  # RDW-SD with a digit missing, also from the Pentra
        "6690-3",
        "6690",
        "6690-",
        "-2",
        "66 90-2",
        "LP6690-2",
    ],
)
def test_malformed_or_wrong_loinc_codes_are_rejected(code: str) -> None:
    assert not is_valid_loinc(code)


# -- the shipped files ----------------------------------------------------------------


def test_every_expected_profile_is_shipped() -> None:
    names = {path.stem for path in PROFILE_FILES}
    assert set(EXPECTED) <= names, f"missing: {sorted(set(EXPECTED) - names)}"


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_profile_file_loads_under_its_file_name(path: Path) -> None:
    profile = load_profile_file(path)
    assert profile.name == path.stem
    assert profile.title.strip()
    assert profile.notes.strip(), "technicians need the notes (settings, cable, sample ID)"


def test_catalog_holds_every_shipped_profile() -> None:
    found = catalog(profile_dirs(None))
    assert set(found) == {path.stem for path in PROFILE_FILES}
    assert all(name == profile.name for name, profile in found.items())


@pytest.mark.parametrize(("name", "protocol"), sorted(EXPECTED.items()))
def test_profile_speaks_its_protocol(name: str, protocol: str) -> None:
    profile = find_profile(name)
    assert profile.protocol == protocol
    if protocol == "astm":
        assert profile.hl7_behaviour.queries == "none"
        assert profile.frame_size in (247, 64_000)
    else:
        assert profile.frame_size == 247  # the default: MLLP has no frames
        assert profile.test_code_pattern == ""


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_profile_files_are_block_style_with_two_space_indents(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    assert "\t" not in text
    for number, line in enumerate(text.splitlines(), 1):
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0, f"{path.name}:{number}: odd indentation"
        assert not re.match(r"^\s*[\w-]+:\s*[\[{]", line), f"{path.name}:{number}: flow style"


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_every_loinc_in_a_code_map_has_a_valid_check_digit(path: Path) -> None:
    profile = load_profile_file(path)
    for code, mapping in profile.codes.items():
        assert mapping.lis, f"{path.name}: {code} has no LIS code"
        if mapping.loinc:
            assert LOINC_FORMAT.match(mapping.loinc), f"{path.name}: {code}: {mapping.loinc}"
            assert is_valid_loinc(mapping.loinc), f"{path.name}: {code}: bad check digit"


def test_one_loinc_means_one_lis_code_and_back_across_profiles() -> None:
    """The LIS sees one catalogue: the same analyte has the same LIS code (and LOINC)
    whichever analyzer measured it."""
    lis_of: dict[str, set[str]] = defaultdict(set)
    loinc_of: dict[str, set[str]] = defaultdict(set)
    for name, profile in shipped().items():
        for code, mapping in profile.codes.items():
            if mapping.loinc:
                lis_of[mapping.loinc].add(f"{mapping.lis} ({name} {code})")
                loinc_of[mapping.lis].add(mapping.loinc)
    for loinc, lis in lis_of.items():
        assert len({entry.split(" (")[0] for entry in lis}) == 1, f"{loinc}: {sorted(lis)}"
    for lis_code, loincs in loinc_of.items():
        assert len(loincs) == 1, f"{lis_code}: {sorted(loincs)}"


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_unit_conversions_name_a_mapped_test(path: Path) -> None:
    profile = load_profile_file(path)
    known = set(profile.codes) | {m.lis for m in profile.codes.values()} | {"*"}
    for conv in profile.units:
        assert conv.test in known, f"{path.name}: conversion for unknown test {conv.test}"
        assert conv.factor > 0
        assert conv.from_units != conv.to


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_qc_rules_use_the_protocols_field_paths(path: Path) -> None:
    profile = load_profile_file(path)
    pattern = ASTM_PATH if profile.protocol == "astm" else HL7_PATH
    for rule in profile.qc:
        assert pattern.match(rule.field), f"{path.name}: {rule.field}"
        assert rule.equals or rule.pattern


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_order_test_id_takes_the_code(path: Path) -> None:
    profile = load_profile_file(path)
    assert "{code}" in profile.order_test_id
    assert "WBC" in profile.order_test_id.format(code="WBC")


def test_hl7_query_styles() -> None:
    assert find_profile("mindray-bs").hl7_behaviour.queries == "mindray"
    assert find_profile("biosystems-ba400").hl7_behaviour.queries == "law"
    for name, profile in shipped().items():
        if profile.hl7_behaviour.queries != "none":
            assert profile.orders == "host-query", name


@pytest.mark.parametrize(
    ("name", "raw", "code"),
    [
        ("roche-cobas-c311", "685/", "685"),
        ("roche-cobas-e411", "117/1/not", "117"),
        ("roche-cobas-c111", "413", "413"),
        ("hitachi-7600", "798/", "798"),
    ],
)
def test_roche_test_ids_keep_the_part_before_the_slash(name: str, raw: str, code: str) -> None:
    assert find_profile(name).code_of(raw) == code


def test_sysmex_xs_says_class_a_is_not_supported() -> None:
    notes = find_profile("sysmex-xs").notes
    assert "class A" in notes
    assert "not ASTM" in notes


# -- broken and unknown profiles -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("title: t\nprotocol: astm\nframe_size: 10\n", "frame_size"),
        ("title: t\nprotocol: serial\n", "protocol"),
        ("title: t\nprotocol: astm\nastm:\n  sample_id:\n    - X.3\n", "astm.sample_id"),
        ("title: t\nprotocol: hl7\nqc:\n  - field: nowhere\n    equals:\n      - Q\n", "qc.0"),
        ("title: t\nprotocol: astm\ntest_code_pattern: '^[^/]+'\n", "test_code_pattern"),
        ("title: t\nprotocol: astm\nencoding: klingon\n", "encoding"),
        ("title: t\nprotocol: astm\ncodes:\n  WBC:\n    name: no lis code\n", "codes.WBC.lis"),
        ("title: t\nprotocol: astm\nbaudrate: 9600\n", "baudrate"),
        ("protocol: astm\n", "title"),
    ],
)
def test_broken_profile_names_its_file_and_field(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ProfileError) as info:
        load_profile_file(path)
    message = str(info.value)
    assert str(path) in message
    assert f": {where}" in message


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("title: [unclosed\n", "cannot read"),
        ("- just\n- a list\n", "YAML mapping"),
        ("name: other\ntitle: t\nprotocol: astm\n", "differs from the file name"),
    ],
)
def test_unreadable_profile_names_its_file(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ProfileError, match=re.escape(reason)) as info:
        load_profile_file(path)
    assert str(path) in str(info.value)


def test_unknown_profile_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as info:
        find_profile("sysmex-xt-4000i", tmp_path)
    message = str(info.value)
    assert "'sysmex-xt-4000i'" in message
    for name in EXPECTED:
        assert name in message


def test_site_profile_wins_over_the_shipped_one(tmp_path: Path) -> None:
    site = tmp_path / "drivers"
    site.mkdir()
    (site / "sysmex-xn.yaml").write_text(
        "title: Our XN-550\nprotocol: astm\ntransport:\n  baudrate: 19200\n", encoding="utf-8"
    )
    profile = find_profile("sysmex-xn", tmp_path)
    assert profile.title == "Our XN-550"
    assert profile.transport == {"baudrate": 19200}
    assert find_profile("sysmex-xn").title != "Our XN-550"


def test_broken_site_profile_is_reported_by_find_profile(tmp_path: Path) -> None:
    site = tmp_path / "drivers"
    site.mkdir()
    (site / "lab-x.yaml").write_text("title: x\nprotocol: astm\nframe_size: 1\n")
    with pytest.raises(ProfileError, match=r"lab-x\.yaml: frame_size"):
        find_profile("generic-astm", tmp_path)


# -- the profiles against the real captures --------------------------------------------

SAMPLES = Path("/work/shared/samples/lab")
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason="no sample captures")


def astm_reports(prefix: str, name: str) -> list[LabReport]:
    """The capture's reports as the map-codes step leaves them."""
    profile = find_profile(name)
    records = decode_records(capture(prefix).text, encoding=profile.encoding)
    return [map_report(r, profile, "keep") for r in reports_from_records(records, profile, name)]


@needs_samples
@pytest.mark.parametrize(
    ("prefix", "name", "sample_id", "qc", "mapped"),
    [
        ("01", "roche-cobas-c111", "T20 10134GA D28", False, {}),
        ("02", "horiba-pentra", "S1234", False, {"WBC": "WBC", "NEU#": "NEUT#", "RDW": "RDW-CV"}),
        ("03", "horiba-yumizen", "PX440N", True, {"HGB": "HGB", "LYM%": "LYMPH%"}),
        ("04", "sysmex-xn", "27", False, {"WBC": "WBC", "NEUT#": "NEUT#", "RDW-SD": "RDW-SD"}),
        ("05", "cepheid-genexpert", "PR25A137", False, {"MTB": "MTB", "RIF Resistance": "RIF"}),
        ("06", "roche-cobas-c311", "CL-PL-24-0370", False, {"685": "ALT"}),
        ("07", "roche-cobas-e411", "000000-00-0001", False, {}),
        ("08", "hitachi-7600", "PCCC2", True, {"717": "GLU"}),
        ("09", "abbott-architect", "1379 anonymous", False, {"651/F": "B-HCG"}),
    ],
)
def test_profile_reads_its_capture(
    prefix: str, name: str, sample_id: str, qc: bool, mapped: dict[str, str]
) -> None:
    (report,) = astm_reports(prefix, name)
    assert report.sample_id == sample_id
    assert report.qc is qc
    lis = {
        f"{r.test_code}/{r.aspect}" if r.aspect else r.test_code: r.lis_code
        for r in report.results
        if r.lis_code
    }
    assert mapped.items() <= lis.items()
    for result in report.results:
        if result.loinc:
            assert is_valid_loinc(result.loinc)


@needs_samples
def test_sysmex_hgb_in_g_dl_reaches_the_lis_in_g_l() -> None:
    (report,) = astm_reports("04", "sysmex-xn")
    hgb = next(r for r in report.results if r.test_code == "HGB")
    assert (hgb.value, hgb.units, hgb.loinc) == ("80", "g/L", "718-7")


@needs_samples
def test_yumizen_qc_names_its_control_level() -> None:
    (report,) = astm_reports("03", "horiba-yumizen")
    assert report.control == "CTRL MEDIUM"
    assert report.patient_id == ""


@needs_samples
def test_e411_qualitative_result_is_its_cut_off_index() -> None:
    (report,) = astm_reports("07", "roche-cobas-e411")
    values = {r.test_code: (r.value, r.units) for r in report.results}
    assert values["900"] == ("0.521", "COI")
    assert values["117"] == ("5.41", "IU/l")


@needs_samples
def test_architect_keeps_final_and_interpretation_and_drops_raw_rlu() -> None:
    (report,) = astm_reports("09", "abbott-architect")
    assert [(r.aspect, r.lis_code) for r in report.results] == [
        ("F", "B-HCG"),
        ("I", "B-HCG-INT"),
    ]
    assert report.results[0].comparator == ">"


@needs_samples
def test_genexpert_drops_ct_and_endpoint_values() -> None:
    (report,) = astm_reports("05", "cepheid-genexpert")
    assert not {r.aspect for r in report.results} & {"Ct", "EndPt"}
    mtb = next(r for r in report.results if r.test_code == "MTB")
    assert mtb.value == "NOT DETECTED"


@needs_samples
def test_ba400_capture_is_mapped_and_converted_to_si() -> None:
    profile = find_profile("biosystems-ba400")
    raw = next(SAMPLES.glob("11_*")).read_bytes()
    (report,) = [map_report(r, profile, "keep") for r in reports_from_hl7(raw, profile, "ba400")]
    assert report.sample_id == "PATIENT32988998"
    chol = next(r for r in report.results if r.test_code == "CHOLESTEROL")
    assert (chol.lis_code, chol.value, chol.units, chol.loinc) == (
        "CHOL",
        "4.60",
        "mmol/L",
        "14647-2",
    )
