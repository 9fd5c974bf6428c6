"""Lab orders: OML^O21 / ORM^O01 from the LIS -> Order per specimen, the lab orders table
(new, update, cancel, partial cancel, merge, download bookkeeping), and what the gateway
sends ASTM analyzers from it (host query answers and downloads, E1394 / LIS2-A2)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.astm import answers
from drivers.astm.codec import Record, decode_records
from drivers.lab.lis_orders import parse_lab_orders
from drivers.lab.order_store import SERVICE_KEY, LabOrderStore, merge, order_store
from drivers.lab.profiles import find_profile
from gateway.errors import PermanentError
from gateway.orders import Order
from gateway.registry import PluginContext


def hl7(*segments: str, encoding: str = "utf-8") -> bytes:
    return ("\r".join(segments) + "\r").encode(encoding)


OML_MSH = (
    "MSH|^~\\&|LIS|HOSP|MEDGW|LAB|20240601080000||OML^O21^OML_O21|OML-1|P|2.5.1||||||UNICODE UTF-8"
)
ORM_MSH = "MSH|^~\\&|LIS|HOSP|MEDGW|LAB|20240601090000||ORM^O01|ORM-1|P|2.3.1"

# OML^O21 v2.5.1 (HL7 4.4.6): ORDER { ORC, OBSERVATION REQUEST { OBR, SPECIMEN { SPM } } },
# one ORC/OBR per test; two tubes of one patient.
OML_O21 = hl7(
    OML_MSH,
    "PID|1||BN123456^^^BVTW^MR||Nguyễn^Văn Ánh||19800521|M",
    "PV1|1|O",
    "ORC|NW|ORD-1001^LIS|||||^^^20240601080000^^S",
    "OBR|1|ORD-1001^LIS||GLU^Glucose^L|||20240601075500",
    "SPM|1|2406010001^LIS||SER^Serum^HL70487",
    "ORC|NW|ORD-1001^LIS",
    "OBR|2|ORD-1001^LIS||CREA^Creatinine^L",
    "SPM|1|2406010001^LIS||SER^Serum^HL70487",
    "ORC|NW|ORD-1002^LIS",
    "OBR|3|ORD-1002^LIS||HGB^Hemoglobin^L|R",
    "SPM|2|2406010002^LIS||WB^Whole blood^HL70487",
)


def order(specimen: str = "S1", accession: str = "A1", *tests: str, **fields: Any) -> Order:
    base: dict[str, Any] = {
        "control": "new",
        "accession": accession,
        "specimen_id": specimen,
        "patient_id": "P1",
        "patient_name": "Doe^John",
        "birth_date": "19700101",
        "sex": "M",
        "tests": tests or ("GLU",),
        "priority": "R",
    }
    return Order(**{**base, **fields})


# -- parsing ---------------------------------------------------------------------------------


def test_oml_o21_gives_one_order_per_specimen_with_its_tests() -> None:
    msh, orders = parse_lab_orders(OML_O21)
    assert msh.control_id == "OML-1"
    first, second = orders
    assert (first.control, first.specimen_id, first.accession, first.tests) == (
        "new",
        "2406010001",
        "ORD-1001",
        ("GLU", "CREA"),
    )
    assert first.priority == "S"  # ORC-7.6
    assert (first.patient_id, first.patient_id_issuer, first.patient_name) == (
        "BN123456",
        "BVTW",
        "Nguyễn^Văn Ánh",
    )
    assert (first.birth_date, first.sex, first.message_control_id) == ("19800521", "M", "OML-1")
    assert (second.specimen_id, second.accession, second.tests) == (
        "2406010002",
        "ORD-1002",
        ("HGB",),
    )
    assert second.priority == "R"  # OBR-5
    assert second.patient_name == first.patient_name


def test_orm_o01_specimen_in_obr3() -> None:
    raw = hl7(
        ORM_MSH,
        "PID|1||P77||Doe^Jane||19650304|F",
        "ORC|NW|PL-55",
        "OBR|1|PL-55|SPEC-55|685^ALT",
        "ORC|NW|PL-55",
        "OBR|2|PL-55|SPEC-55|690^CREA",
        "OBR|3|PL-55|SPEC-55|690^CREA",  # a repeated test is ordered once
    )
    _, (o,) = parse_lab_orders(raw)
    assert (o.specimen_id, o.accession, o.filler_order, o.tests) == (
        "SPEC-55",
        "PL-55",
        "SPEC-55",
        ("685", "690"),
    )
    assert (o.patient_id, o.patient_name, o.sex) == ("P77", "Doe^Jane", "F")


def test_orm_o01_specimen_in_orc2() -> None:
    raw = hl7(ORM_MSH, "PID|1||P78", "ORC|NW|2406010077", "OBR|1|||GLU", "OBR|2|||NA")
    _, (o,) = parse_lab_orders(raw)
    assert (o.specimen_id, o.accession, o.tests) == ("2406010077", "2406010077", ("GLU", "NA"))
    # the route step's specimen_from picks ORC-2 even where OBR-3 has a value
    with_obr3 = hl7(ORM_MSH, "PID|1||P78", "ORC|NW|TUBE-9", "OBR|1||FILLER-1|GLU")
    _, (default,) = parse_lab_orders(with_obr3)
    _, (tube,) = parse_lab_orders(with_obr3, specimen_from=("ORC-2",))
    assert (default.specimen_id, tube.specimen_id) == ("FILLER-1", "TUBE-9")


def test_cancel_controls() -> None:
    _, (ca,) = parse_lab_orders(hl7(ORM_MSH, "ORC|CA|PL-55", "OBR|1|PL-55|SPEC-55|685"))
    assert (ca.control, ca.specimen_id, ca.tests) == ("cancel", "SPEC-55", ("685",))
    _, (sc,) = parse_lab_orders(hl7(ORM_MSH, "ORC|SC|PL-55|||CA", "OBR|1|PL-55|SPEC-55|685"))
    assert sc.control == "cancel"  # status changed to cancelled
    _, (xo,) = parse_lab_orders(hl7(ORM_MSH, "ORC|XO|PL-55", "OBR|1|PL-55|SPEC-55|685"))
    assert xo.control == "update"
    # a status change (in process) for one test leaves the stored order's tests alone
    _, status_only = parse_lab_orders(
        hl7(ORM_MSH, "ORC|SC|PL-55|||IP", "OBR|1|PL-55|SPEC-55|685")
    )
    assert status_only == []


def test_new_and_cancelled_tests_of_one_order_stay_apart() -> None:
    raw = hl7(
        ORM_MSH,
        "PID|1||P77",
        "ORC|NW|PL-55",
        "OBR|1|PL-55|SPEC-55|685",
        "ORC|CA|PL-55",
        "OBR|2|PL-55|SPEC-55|690",
    )
    _, orders = parse_lab_orders(raw)
    assert [(o.control, o.tests) for o in orders] == [("new", ("685",)), ("cancel", ("690",))]


def test_other_messages_give_no_orders() -> None:
    oru = hl7("MSH|^~\\&|A||||20240101||ORU^R01|9|P|2.5.1", "OBR|1||S1", "OBX|1|NM|GLU||5")
    msh, orders = parse_lab_orders(oru)
    assert (msh.message_code, orders) == ("ORU", [])


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        (("PID|1||P1",), "no ORC/OBR order group"),
        (("ORC|ZZ|PL-1", "OBR|1|PL-1|S1|GLU"), "unknown order control ORC-1 'ZZ'"),
        (("ORC|NW", "OBR|1|||GLU"), "group 1: no specimen id"),
        (("ORC|NW|PL-1", "OBR|1|PL-1|S1|"), "OBR-4 test code is empty"),
    ],
)
def test_unusable_order_messages_are_permanent_errors(
    segments: tuple[str, ...], message: str
) -> None:
    with pytest.raises(PermanentError, match=message) as err:
        parse_lab_orders(hl7(ORM_MSH, *segments))
    assert "ORM^O01 control id ORM-1" in str(err.value)


def test_unreadable_message_is_a_permanent_error() -> None:
    with pytest.raises(PermanentError, match="unreadable HL7 message"):
        parse_lab_orders(b"this is not HL7")


def test_latin1_lis_with_msh18() -> None:
    raw = hl7(
        "MSH|^~\\&|LIS|H|MEDGW|L|20240601||ORM^O01|L1|P|2.4||||||8859/1",
        "PID|1||P9||Müller^Zoë",
        "ORC|NW|A9",
        "OBR|1|A9|S9|GLU",
        encoding="latin-1",
    )
    _, (o,) = parse_lab_orders(raw)
    assert o.patient_name == "Müller^Zoë"


# -- the store -------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LabOrderStore]:
    s = LabOrderStore(tmp_path / "state")
    yield s
    s.close()


def test_new_update_and_cancel(store: LabOrderStore) -> None:
    store.apply(order("S1", "A1", "GLU", "CREA"))
    assert store.count() == 1
    found = store.find(" S1 ")  # barcode padding
    assert found is not None
    assert found.tests == ("GLU", "CREA")
    store.apply(order("S1", "A1", "NA", control="update", priority="S"))
    updated = store.find("S1")
    assert updated is not None
    assert (updated.tests, updated.priority) == (("NA",), "S")
    store.apply(order("S1", "A1", control="cancel", tests=()))
    assert store.find("S1") is None
    assert store.count() == 0
    store.apply(order("S-none", "A-none", control="cancel"))  # unknown: nothing to do
    assert store.count() == 0


def test_partial_cancel_keeps_the_other_tests(store: LabOrderStore) -> None:
    store.apply(order("S1", "A1", "GLU", "CREA", "NA"))
    store.apply(order("S1", "A1", "CREA", control="cancel"))
    left = store.find("S1")
    assert left is not None
    assert left.tests == ("GLU", "NA")
    assert left.control == "new"
    store.apply(order("S1", "A1", "GLU", "NA", control="cancel"))
    assert store.find("S1") is None


def test_orders_of_one_specimen_are_merged(store: LabOrderStore) -> None:
    store.apply(order("S1", "A1", "GLU", "CREA", priority="S"))
    store.apply(order("S1", "A2", "CREA", "ALT", priority="R", patient_name="Doe^Johnny"))
    store.apply(order("S2", "A3", "HGB"))
    merged = store.find("S1")
    assert merged is not None
    assert merged.tests == ("GLU", "CREA", "ALT")  # in order, no repeats
    assert merged.priority == "S"  # stat when any of them is
    assert merged.patient_name == "Doe^Johnny"  # the latest
    store.apply(order("S1", "A1", control="cancel", tests=()))
    rest = store.find("S1")
    assert rest is not None
    assert rest.tests == ("CREA", "ALT")
    assert merge([]) is None


def test_specimen_defaults_to_the_accession(store: LabOrderStore) -> None:
    store.apply(order("", "ACC-7", "GLU"))
    found = store.find("ACC-7")
    assert found is not None
    assert found.tests == ("GLU",)


def test_orders_survive_a_restart(tmp_path: Path) -> None:
    first = LabOrderStore(tmp_path)
    first.apply(order("S1", "A1", "GLU"))
    first.close()
    again = LabOrderStore(tmp_path)
    try:
        found = again.find("S1")
        assert found is not None
        assert found.tests == ("GLU",)
    finally:
        again.close()


def test_download_bookkeeping(store: LabOrderStore) -> None:
    store.apply(order("S1", "A1", "GLU"))
    store.apply(order("S2", "A2", "HGB"))
    assert [o.specimen_id for o in store.not_downloaded("c311")] == ["S1", "S2"]
    assert [o.specimen_id for o in store.not_downloaded("c311", limit=1)] == ["S1"]
    store.mark_downloaded("c311", ["S1"])
    assert [o.specimen_id for o in store.not_downloaded("c311")] == ["S2"]
    assert len(store.not_downloaded("e411")) == 2  # per instrument
    store.apply(order("S1", "A9", "NA"))  # a new order for a sent specimen: send again
    again = store.not_downloaded("c311")
    assert [(o.specimen_id, o.tests) for o in again] == [("S1", ("GLU", "NA")), ("S2", ("HGB",))]
    store.mark_downloaded("c311", ["S1", "S2"])
    assert store.not_downloaded("c311") == []
    store.apply(order("S2", "A2", control="cancel", tests=()))
    assert store.not_downloaded("c311") == []


def test_an_update_while_a_download_is_on_the_wire_is_sent_later(store: LabOrderStore) -> None:
    store.apply(order("S1", "A1", "GLU"))
    (sending,) = store.not_downloaded("c311")
    store.apply(order("S1", "A1", "GLU", "CREA", control="update"))  # arrives meanwhile
    store.mark_downloaded("c311", [sending.specimen_id])  # the older version was sent
    (pending,) = store.not_downloaded("c311")
    assert pending.tests == ("GLU", "CREA")
    store.mark_downloaded("c311", ["S1"])
    assert store.not_downloaded("c311") == []


def test_store_is_thread_safe(store: LabOrderStore) -> None:
    def work(n: int) -> None:
        for i in range(25):
            store.apply(order(f"S{n}-{i}", f"A{n}-{i}", "GLU"))
            assert store.find(f"S{n}-{i}") is not None

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count() == 100


def test_one_store_per_gateway(tmp_path: Path) -> None:
    ctx = PluginContext("site", str(tmp_path / "state"), None)
    store = order_store(ctx)
    try:
        assert order_store(ctx) is store
        assert ctx.services[SERVICE_KEY] is store
        assert (tmp_path / "state" / "lab_orders.sqlite").exists()
        ctx.services[SERVICE_KEY] = object()
        with pytest.raises(TypeError, match="services"):
            order_store(ctx)
    finally:
        store.close()


# -- what ASTM analyzers get (drivers.astm.answers) ------------------------------------------

TS = "20240601120000"


def records(text: bytes) -> list[Record]:
    assert text.endswith(b"\r")
    return decode_records(text)


def types(recs: list[Record]) -> str:
    return "".join(r.type for r in recs)


def test_query_answer_with_orders() -> None:
    profile = find_profile("hitachi-7600")
    found = [
        order("S1", "A1", "GLU", "ALT", "XYZ", patient_id="BN1", patient_name="Doe^John^Q"),
        order("S2", "A2", "CREA", priority="S", patient_id="BN2", sex="F"),
    ]
    text = answers.query_answer(["S1", "S2"], found, profile, timestamp=TS)
    recs = records(text)
    assert types(recs) == "HPOPOL"
    h, p1, o1, p2, o2, last = recs
    assert h.text(2) == "\\^&"
    assert (h.get("5"), h.get("12"), h.get("13"), h.get("14")) == ("MEDGW", "P", "LIS2-A2", TS)
    assert (p1.get("2"), p1.get("3"), p1.get("6"), p1.get("8"), p1.get("9")) == (
        "1",
        "BN1",
        "Doe^John^Q",
        "19700101",
        "M",
    )
    assert (p2.get("2"), p2.get("3"), p2.get("9")) == ("2", "BN2", "F")
    assert (o1.get("3"), o1.get("6"), o1.get("12"), o1.get("26")) == ("S1", "R", "N", "Q")
    # LIS codes written back as the analyzer's (GLU -> 717, ALT -> 685) in ^^^{code}^ form;
    # a code the profile does not map goes as it is
    assert o1.repeats(5) == [
        ["", "", "", "717", ""],
        ["", "", "", "685", ""],
        ["", "", "", "XYZ", ""],
    ]
    assert (o2.get("3"), o2.get("6"), o2.repeats(5)) == ("S2", "S", [["", "", "", "690", ""]])
    assert (last.get("2"), last.get("3")) == ("1", "N")


def test_query_answer_without_orders_is_no_information() -> None:
    text = answers.query_answer(["S404"], [], find_profile("generic-astm"), timestamp=TS)
    recs = records(text)
    assert types(recs) == "HL"
    assert recs[1].get("3") == "I"


def test_download_message() -> None:
    text = answers.download_message(
        [order("S1", "A1", "B-HCG", "B-HCG-INT")], find_profile("abbott-architect"), timestamp=TS
    )
    h, p, o, last = records(text)
    assert (h.type, p.type, o.type, last.type) == ("H", "P", "O", "L")
    assert o.get("26") == "O"  # an order, not a query answer
    # 651/F and 651/I both map back to the assay number
    assert [rep[3] for rep in o.repeats(5)] == ["651", "651"]
    assert last.get("3") == "N"


def test_answer_forms_and_escapes() -> None:
    sysmex = answers.query_answer(
        ["27"], [order("27", "A", "WBC", "HGB")], find_profile("sysmex-xn"), timestamp=TS
    )
    o = records(sysmex)[2]
    assert o.repeats(5) == [["", "", "", "", "WBC"], ["", "", "", "", "HGB"]]  # ^^^^{code}
    odd = order("S|1^2", "A", "T\\1", patient_name="O&Brien^Ann")
    text = answers.query_answer(["S|1^2"], [odd], find_profile("generic-astm"), timestamp=TS)
    _, p, o, _ = records(text)
    assert o.get("3") == "S|1^2"
    assert o.get("5.4") == "T\\1"
    assert (p.get("6.1"), p.get("6.2")) == ("O&Brien", "Ann")


def test_answer_in_the_profile_encoding() -> None:
    named = order("S1", "A1", "GLU", patient_name="Müller^Zoë")
    text = answers.query_answer(
        ["S1"], [named], find_profile("generic-astm"), encoding="latin-1", timestamp=TS
    )
    assert "Müller^Zoë".encode("latin-1") in text
    (p,) = [r for r in decode_records(text, encoding="latin-1") if r.type == "P"]
    assert p.get("6") == "Müller^Zoë"
