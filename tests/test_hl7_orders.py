"""HL7 ORM^O01 / OMI^O23 -> Order: mapping, order control, escapes, charsets, groups."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from drivers.hl7.message import parse_msh
from drivers.hl7.orders import (
    Delimiters,
    Hl7OrderParams,
    Hl7OrderStep,
    dicom_datetime,
    parse_orders,
    unescape,
)
from gateway.envelope import Envelope
from gateway.errors import PermanentError
from gateway.orders import Order


def message(*segments: str, encoding: str = "utf-8") -> bytes:
    return ("\r".join(segments) + "\r").encode(encoding)


# A HIS in Hue: v2.3.1, UTF-8 declared in MSH-18, Vietnamese names, IHE's ZDS.
ORM_UTF8 = message(
    "MSH|^~\\&|HIS|BVTW|MEDGW|BVTW|20240315083000||ORM^O01|MSG00001|P|2.3.1||||||UNICODE UTF-8",
    "PID|1||BN123456^^^BVTW^MR~079080001234^^^BHYT^HC||Nguyễn^Văn Ánh||19800521|M"
    "|||12 Lê Lợi^^Huế^^^VN",
    "PV1|1|O|CDHA^P101^1^BVTW|||||BS01^Trần^Thị Bích^^^BS.",
    "ORC|NW|ORD-7781^HIS|ACC0001^RIS||SC||1^^^20240315090000^^R||20240315083000|||"
    "BS02^Lê^Minh^^^TS.||||||CR_ROOM1",
    "OBR|1|ORD-7781^HIS|ACC0001^RIS|XQ-NGUC^Chụp X-quang ngực thẳng^L|||20240315083000|||"
    "|||Ho kéo dài 2 tuần|||BS02^Lê^Minh^^^TS.||||||||CR|||1^^^20240315090000^^R|||||||||"
    "20240315090000",
    "ZDS|1.2.840.113619.2.55.3.604688119.971.1710487800.1^HIS^Application^DICOM",
)

# A v2.4 sender in ISO 8859-1: accented Latin names, HL7 section "NMR", timing in OBR-27.
ORM_LATIN1 = message(
    "MSH|^~\\&|HIS|CHU|MEDGW|CHU|20240316101500||ORM^O01|L-0042|P|2.4||||||8859/1",
    "PID|1||445566^^^CHU||Müller^Zoë^^Jr^Dr||19621103|F",
    "ORC|NW|P-55^HIS|F-55^RIS||SC||||20240316101500|||D77^Dupont^Hélène",
    "OBR|1|P-55^HIS|F-55^RIS|MRKNEE^IRM du genou droit^L||||||||||||D77^Dupont^Hélène"
    "||||||||NMR|||^^^202403161130+0100^^S",
    encoding="latin-1",
)

# OMI^O23 v2.5.1 (IHE RAD-4): TQ1 timing, IPC per scheduled step, two order groups.
OMI_O23 = message(
    "MSH|^~\\&|HIS|BVTW|MEDGW|BVTW|20240317070000||OMI^O23^OMI_O23|OMI-1|P|2.5.1||||||"
    "UNICODE UTF-8",
    "PID|1||BN777^^^BVTW^MR||Trần^Thị Ngọc Hà||1975|F",
    "PV1|1|I|NOI^301^2",
    "ORC|NW|HIS-9001^HIS|RIS-9001^RIS||SC||||20240317070000|||BS09^Phạm^Thu Hà|||||CDHA",
    "TQ1|1||||||20240317080000||R^Routine^HL70485",
    "OBR|1|HIS-9001^HIS|RIS-9001^RIS|CT-BUNG^CT bụng có cản quang^L||||||||||||"
    "BS09^Phạm^Thu Hà||||||||CT",
    "IPC|A2024031701|RP1|1.2.392.200036.9116.2.1.1.1|SPS1|CT||||CT01",
    "IPC|A2024031701|RP1|1.2.392.200036.9116.2.1.1.1|SPS2|CT||||CT02",
    "ORC|NW|HIS-9002^HIS|RIS-9002^RIS||SC||||20240317070000|||BS09^Phạm^Thu Hà",
    "TQ1|1||||||20240317093000||S^Stat^HL70485",
    "OBR|2|HIS-9002^HIS|RIS-9002^RIS|SA-BUNG^Siêu âm bụng tổng quát^L||||||||||||||||||||US",
    "IPC|A2024031702|RP2|1.2.392.200036.9116.2.1.1.2|SPS1|US||||US_ROOM2",
)

PARAMS = Hl7OrderParams()


def orders(raw: bytes, params: Hl7OrderParams = PARAMS, encoding: str | None = None) -> list[Order]:
    return parse_orders(raw, params, encoding=encoding)[1]


def variant(raw: bytes, old: str, new: str, encoding: str = "utf-8") -> bytes:
    text = raw.decode(encoding)
    assert old in text, old
    return text.replace(old, new, 1).encode(encoding)


# -- mapping -------------------------------------------------------------------------------


def test_orm_o01_utf8_maps_every_field() -> None:
    (order,) = orders(ORM_UTF8)
    assert order == Order(
        control="new",
        accession="ACC0001",
        patient_id="BN123456",
        patient_id_issuer="BVTW",
        patient_name="Nguyễn^Văn Ánh",
        birth_date="19800521",
        sex="M",
        placer_order="ORD-7781",
        filler_order="ACC0001",
        procedure_code="XQ-NGUC",
        procedure_scheme="L",
        procedure_text="Chụp X-quang ngực thẳng",
        modality="CR",
        scheduled_start="20240315090000",
        station_ae="CR_ROOM1",
        study_uid="1.2.840.113619.2.55.3.604688119.971.1710487800.1",
        priority="R",
        referring_physician="Lê^Minh^^TS.",
        message_control_id="MSG00001",
    )


def test_orm_o01_latin1_declared_8859_1() -> None:
    assert "Müller".encode("latin-1") in ORM_LATIN1  # really latin-1 bytes, not UTF-8
    (order,) = orders(ORM_LATIN1)
    assert order.patient_name == "Müller^Zoë^^Dr^Jr"  # XPN suffix^prefix -> PN prefix^suffix
    assert order.patient_id == "445566"
    assert order.patient_id_issuer == "CHU"
    assert order.accession == "F-55"
    assert order.modality == "MR"  # HL7 table 0074 "NMR"
    assert order.scheduled_start == "202403161130"  # offset dropped, local time kept
    assert order.priority == "S"
    assert order.referring_physician == "Dupont^Hélène"
    assert order.procedure_text == "IRM du genou droit"
    assert order.station_ae == ""
    assert order.study_uid == ""


def test_omi_o23_one_order_per_ipc_in_each_group() -> None:
    result = orders(OMI_O23)
    got = [(o.accession, o.step_id, o.station_ae, o.modality, o.scheduled_start) for o in result]
    assert got == [
        ("A2024031701", "SPS1", "CT01", "CT", "20240317080000"),
        ("A2024031701", "SPS2", "CT02", "CT", "20240317080000"),
        ("A2024031702", "SPS1", "US_ROOM2", "US", "20240317093000"),
    ]
    first, _, last = result
    assert first.study_uid == "1.2.392.200036.9116.2.1.1.1"
    assert last.study_uid == "1.2.392.200036.9116.2.1.1.2"
    assert first.priority == "R" and last.priority == "S"
    assert first.patient_name == "Trần^Thị Ngọc Hà"
    assert first.birth_date == ""  # PID-7 "1975" is no full date: left empty, not invented
    assert first.referring_physician == "Phạm^Thu Hà"
    assert last.referring_physician == "Phạm^Thu Hà"  # OBR-16 empty: ORC-12
    assert last.procedure_text == "Siêu âm bụng tổng quát"
    assert {o.placer_order for o in result} == {"HIS-9001", "HIS-9002"}


def test_orm_with_several_orc_obr_groups() -> None:
    second = (
        "ORC|NW|ORD-7782^HIS|ACC0002^RIS||SC||1^^^20240315100000^^S\r"
        "OBR|2|ORD-7782^HIS|ACC0002^RIS|SA-TIM^Siêu âm tim^L||||||||||||||||||||ES\r"
    )
    raw = ORM_UTF8 + second.encode()
    first, other = orders(raw)
    assert (first.accession, other.accession) == ("ACC0001", "ACC0002")
    assert other.modality == "ES"
    assert other.scheduled_start == "20240315100000"
    assert other.study_uid == ""  # the ZDS belonged to the first group
    assert other.patient_name == first.patient_name == "Nguyễn^Văn Ánh"
    assert other.station_ae == ""


def test_second_obr_under_one_orc_is_its_own_order() -> None:
    extra = "OBR|2|ORD-7781^HIS|ACC0009^RIS|XQ-COT^Chụp cột sống^L||||||||||||||||||||DX\r"
    first, second = orders(ORM_UTF8 + extra.encode())
    assert second.accession == "ACC0009"
    assert second.control == first.control == "new"
    assert second.modality == "DX"


# -- order control ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "control"),
    [
        ("NW", "SC", "new"),
        ("XO", "SC", "update"),
        ("SC", "IP", "update"),
        ("SC", "CM", "update"),
        ("SC", "CA", "cancel"),
        ("SC", "DC", "cancel"),
        ("CA", "", "cancel"),
        ("DC", "", "cancel"),
        ("OC", "CA", "cancel"),
        ("OD", "DC", "cancel"),
        ("ca", "", "cancel"),
    ],
)
def test_order_control(code: str, status: str, control: str) -> None:
    raw = variant(
        ORM_UTF8,
        "ORC|NW|ORD-7781^HIS|ACC0001^RIS||SC|",
        f"ORC|{code}|ORD-7781^HIS|ACC0001^RIS||{status}|",
    )
    (order,) = orders(raw)
    assert order.control == control


@pytest.mark.parametrize("code", ["ZZ", "RP", "HD"])
def test_unknown_order_control_is_permanent(code: str) -> None:
    raw = variant(ORM_UTF8, "ORC|NW|", f"ORC|{code}|")
    with pytest.raises(PermanentError, match=rf"MSG00001.*group 1.*ORC-1 '{code}'.*NW, XO, SC"):
        orders(raw)


def test_empty_order_control_is_permanent() -> None:
    with pytest.raises(PermanentError, match="ORC-1 order control is empty"):
        orders(variant(ORM_UTF8, "ORC|NW|", "ORC||"))


def test_one_bad_group_rejects_the_whole_message() -> None:
    bad = "ORC|ZZ|ORD-7782^HIS|ACC0002^RIS\rOBR|2|ORD-7782^HIS|ACC0002^RIS|X^Y^L\r"
    with pytest.raises(PermanentError, match="group 2"):
        orders(ORM_UTF8 + bad.encode())


def test_cancel_needs_no_patient() -> None:
    raw = message(
        "MSH|^~\\&|HIS|BVTW|MEDGW|BVTW|20240315120000||ORM^O01|MSG00002|P|2.3.1",
        "ORC|CA|ORD-7781^HIS|ACC0001^RIS",
    )
    (order,) = orders(raw)
    assert (order.control, order.accession, order.patient_id) == ("cancel", "ACC0001", "")


def test_status_change_without_patient_is_an_update() -> None:
    raw = message(
        "MSH|^~\\&|HIS|BVTW|MEDGW|BVTW|20240315120000||ORM^O01|MSG00003|P|2.3.1",
        "ORC|SC|ORD-7781^HIS|ACC0001^RIS||IP",
    )
    (order,) = orders(raw)
    assert (order.control, order.accession, order.patient_id) == ("update", "ACC0001", "")


def test_message_without_orc_is_permanent() -> None:
    raw = message("MSH|^~\\&|HIS|H|MEDGW|H|20240315||ORM^O01|M3|P|2.3.1", "PID|1||42")
    with pytest.raises(PermanentError, match="no ORC segment"):
        orders(raw)


def test_second_patient_in_one_message_is_permanent() -> None:
    other = "PID|1||BN999^^^BVTW^MR||Lê^Thị B\rORC|NW|P9|F9\rOBR|1|P9|F9\r"
    with pytest.raises(PermanentError, match="more than one PID"):
        orders(ORM_UTF8 + other.encode())


def test_non_order_messages_give_nothing() -> None:
    adt = message(
        "MSH|^~\\&|HIS|H|MEDGW|H|20240315||ADT^A08|A1|P|2.3.1||||||UNICODE UTF-8",
        "PID|1||BN123456||Nguyễn^Văn Ánh",
    )
    msh, result = parse_orders(adt, PARAMS)
    assert (msh.message_code, result) == ("ADT", [])


# -- missing and odd fields --------------------------------------------------------------


def test_missing_optional_fields_stay_empty() -> None:
    raw = message(
        "MSH|^~\\&|HIS|H|MEDGW|H|20240315||ORM^O01|M4|P|2.5",
        "PID|1||42",
        "ORC|NW|P1|F1",
        "OBR|1|P1|F1",
    )
    (order,) = orders(raw)
    assert order == Order(
        control="new",
        accession="F1",
        patient_id="42",
        placer_order="P1",
        filler_order="F1",
        message_control_id="M4",
    )


def test_accession_falls_back_to_placer_number() -> None:
    raw = message(
        "MSH|^~\\&|HIS|H|MEDGW|H|20240315||ORM^O01|M5|P|2.3.1",
        "PID|1||42",
        "ORC|NW|P77",
        "OBR|1|P77",
    )
    (order,) = orders(raw)
    assert (order.accession, order.filler_order, order.placer_order) == ("P77", "", "P77")


def test_accession_from_ihe_placer_field_1() -> None:
    raw = variant(ORM_UTF8, "^TS.||||||||CR|", "^TS.||IHE-ACC-7|RP7|SPS7||||CR|")
    (order,) = orders(raw, Hl7OrderParams(accession_from=("OBR-18",)))
    assert order.accession == "IHE-ACC-7"


def test_missing_accession_is_permanent() -> None:
    raw = message("MSH|^~\\&|HIS|H|MEDGW|H|20240315||ORM^O01|M6|P|2.3.1", "PID|1||42", "ORC|NW")
    with pytest.raises(PermanentError, match=r"no accession number \(looked in IPC-1, OBR-3"):
        orders(raw)


def test_accession_longer_than_dicom_sh_is_permanent() -> None:
    raw = variant(ORM_UTF8, "ACC0001^RIS||SC", "ACC0001-2024-0315-XYZ^RIS||SC")
    raw = variant(raw, "|ACC0001^RIS|XQ", "|ACC0001-2024-0315-XYZ^RIS|XQ")
    with pytest.raises(PermanentError, match="longer than 16"):
        orders(raw)


def test_new_order_without_patient_id_is_permanent() -> None:
    raw = variant(ORM_UTF8, "PID|1||BN123456^^^BVTW^MR~079080001234^^^BHYT^HC|", "PID|1|||")
    with pytest.raises(PermanentError, match="PID-3 patient identifier missing"):
        orders(raw)


def test_bad_study_uid_is_permanent() -> None:
    raw = variant(ORM_UTF8, "ZDS|1.2.840", "ZDS|1.2.abc")
    with pytest.raises(PermanentError, match="not a UID"):
        orders(raw)


def test_patient_id_by_identifier_type() -> None:
    (order,) = orders(ORM_UTF8, Hl7OrderParams(patient_id_type="HC"))
    assert (order.patient_id, order.patient_id_issuer) == ("079080001234", "BHYT")


@pytest.mark.parametrize(
    ("obr24", "modality"),
    [("CR", "CR"), ("us", "US"), ("PT", "PT"), ("RUS", "US"), ("RAD", ""), ("RX", ""), ("", "")],
)
def test_modality_is_never_guessed(obr24: str, modality: str) -> None:
    raw = variant(ORM_UTF8, "||CR|||1^^^", f"||{obr24}|||1^^^")
    (order,) = orders(raw)
    assert order.modality == modality


def test_modality_map_for_site_codes_and_procedure_codes() -> None:
    params = Hl7OrderParams(modality_map={"rad": "DX", "xq-nguc": "CR"})
    assert orders(variant(ORM_UTF8, "||CR|||1^^^", "||RAD|||1^^^"), params)[0].modality == "DX"
    assert orders(variant(ORM_UTF8, "||CR|||1^^^", "|||||1^^^"), params)[0].modality == "CR"


def test_ipc_modality_wins_over_obr24() -> None:
    raw = variant(OMI_O23, "^L||||||||||||||||||||US", "^L||||||||||||||||||||MR")
    assert orders(raw)[-1].modality == "US"


@pytest.mark.parametrize(
    ("ts", "dicom"),
    [
        ("20240315090000", "20240315090000"),
        ("202403150900", "202403150900"),
        ("2024031509", "202403150900"),
        ("20240315", "20240315"),
        ("20240315090000.1234+0700", "20240315090000"),
        ("202403", ""),
        ("20241315", ""),
        ("20240315250000", ""),
        ("2024-03-15", ""),
        ("", ""),
    ],
)
def test_dicom_datetime(ts: str, dicom: str) -> None:
    assert dicom_datetime(ts) == dicom


def test_sex_values() -> None:
    for hl7, dicom in (("M", "M"), ("F", "F"), ("O", "O"), ("U", ""), ("X", ""), ("", "")):
        raw = variant(ORM_UTF8, "|19800521|M|", f"|19800521|{hl7}|")
        assert orders(raw)[0].sex == dicom


def test_start_time_precedence_tq1_orc7_obr27_obr36() -> None:
    no_orc7 = variant(ORM_UTF8, "||1^^^20240315090000^^R||2024", "||||2024")
    assert orders(no_orc7)[0].scheduled_start == "20240315090000"  # OBR-27
    only_obr36 = variant(no_orc7, "CR|||1^^^20240315090000^^R|", "CR||||")
    only_obr36 = variant(only_obr36, "|||||||||20240315090000\r", "|||||||||202403151015\r")
    assert orders(only_obr36)[0].scheduled_start == "202403151015"
    assert orders(only_obr36)[0].priority == ""


# -- escapes and character sets ----------------------------------------------------------


D = Delimiters("|", "^", "~", "\\", "&")


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (r"A\F\B\S\C\T\D\R\E\E\F", "A|B^C&D~E\\F"),
        (r"caf\XC3A9\ au lait", "café au lait"),
        (r"\H\bold\N\ text", "bold text"),
        (r"line\.br\two", "line two"),
        (r"keep \Q\ unknown", r"keep \Q\ unknown"),
        (r"odd \XZZ\ hex", r"odd \XZZ\ hex"),
        ("trailing \\", "trailing \\"),
        ("no escapes", "no escapes"),
    ],
)
def test_unescape(raw: str, text: str) -> None:
    assert unescape(raw, D, "utf-8") == text


def escape(text: str) -> str:
    table = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}
    return "".join(table.get(c, c) for c in text)


@given(st.text())
def test_unescape_undoes_escaping(text: str) -> None:
    assert unescape(escape(text), D, "utf-8") == text


def test_escapes_inside_fields_are_resolved_after_splitting() -> None:
    raw = variant(
        ORM_UTF8, "XQ-NGUC^Chụp X-quang ngực thẳng^L", r"XQ-NGUC^Ngực \T\ cột sống\S\2 tư thế^L"
    )
    raw = variant(raw, "Nguyễn^Văn Ánh", r"O\XC3A9\Brien\S\X^Seán")
    (order,) = orders(raw)
    assert order.procedure_text == "Ngực & cột sống^2 tư thế"
    assert order.procedure_code == "XQ-NGUC"
    # a component separator inside a name cannot reach DICOM PN
    assert order.patient_name == "OéBrien X^Seán"


def test_custom_delimiters_from_msh() -> None:
    raw = message(
        "MSH#:*!@#HIS#H#MEDGW#H#20240315##ORM:O01#M7#P#2.3.1######UNICODE UTF-8",
        "PID#1##42:::H1##Đặng:Thị Thu*Alias:X",
        "ORC#NW#P1#F!F!1",
        "OBR#1#P1#F!F!1#CODE:Chụp:L",
    )
    (order,) = orders(raw)
    assert order.accession == "F#1"  # !F! is the field separator escaped
    assert order.procedure_text == "Chụp"
    assert order.patient_name == "Đặng^Thị Thu"  # first repetition
    assert order.patient_id_issuer == "H1"


def test_null_value_is_empty() -> None:
    raw = variant(ORM_UTF8, "|19800521|M|", '|""|""|')
    (order,) = orders(raw)
    assert (order.birth_date, order.sex) == ("", "")


def test_undeclared_charset_uses_the_listener_decision() -> None:
    raw = variant(ORM_LATIN1, "|2.4||||||8859/1", "|2.4", encoding="latin-1")
    with pytest.raises(PermanentError, match="cannot decode as utf-8"):
        orders(raw)  # fallback utf-8 cannot read latin-1 bytes: never replaced silently
    assert orders(raw, encoding="iso8859-1")[0].patient_name == "Müller^Zoë^^Dr^Jr"
    forced = Hl7OrderParams(encoding="latin-1")
    assert orders(raw, forced)[0].patient_name == "Müller^Zoë^^Dr^Jr"


def test_unknown_charset_is_permanent() -> None:
    raw = variant(ORM_UTF8, "UNICODE UTF-8", "KLINGON")
    with pytest.raises(PermanentError, match="unsupported character set"):
        orders(raw)


def test_lf_segment_endings_are_tolerated() -> None:
    (order,) = orders(ORM_UTF8.replace(b"\r", b"\n"))
    assert order.accession == "ACC0001" and order.study_uid.startswith("1.2.840")


def test_params_are_validated() -> None:
    with pytest.raises(ValidationError, match="SEGMENT-FIELD"):
        Hl7OrderParams(accession_from=("PID-3",))
    with pytest.raises(ValidationError, match="unknown character encoding"):
        Hl7OrderParams(fallback_encoding="klingon")
    with pytest.raises(ValidationError, match="not a DICOM modality"):
        Hl7OrderParams(modality_map={"RAD": "x-ray"})
    with pytest.raises(ValidationError):
        Hl7OrderParams.model_validate({"bogus": 1})


# -- the step ------------------------------------------------------------------------------


async def test_step_makes_order_envelopes_without_patient_data_in_headers() -> None:
    msh = parse_msh(OMI_O23)
    env = Envelope(kind="hl7", source="his-orders", body=OMI_O23, headers={"charset": "utf-8"})
    out = await Hl7OrderStep(PARAMS).run(env)
    assert len(out) == 3
    assert all(e.kind == "order" and e.source == "his-orders" for e in out)
    assert out[0].headers == {
        "control": "new",
        "accession": "A2024031701",
        "modality": "CT",
        "message_type": "OMI^O23",
    }
    for e in out:
        assert "Trần" not in repr(e.headers) and "BN777" not in repr(e.headers)
        assert Order.from_json(e.body).message_control_id == msh.control_id


async def test_step_ignores_other_messages_and_kinds() -> None:
    adt = message("MSH|^~\\&|HIS|H|MEDGW|H|20240315||ADT^A01|A1|P|2.3.1", "PID|1||42")
    step = Hl7OrderStep(PARAMS)
    assert await step.run(Envelope(kind="hl7", source="x", body=adt)) == []
    assert await step.run(Envelope(kind="dicom", source="x", body=b"DICM")) == []


async def test_step_respects_the_listener_charset_header() -> None:
    raw = variant(ORM_LATIN1, "|2.4||||||8859/1", "|2.4", encoding="latin-1")
    env = Envelope(kind="hl7", source="his", body=raw, headers={"charset": "iso8859-1"})
    (out,) = await Hl7OrderStep(PARAMS).run(env)
    assert Order.from_json(out.body).patient_name == "Müller^Zoë^^Dr^Jr"
