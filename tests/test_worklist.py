"""Worklist store: apply/update/cancel, C-FIND matching (PS3.4 C.2.2.2), responses,
Vietnamese names through DICOM encoding, threads, and the ``worklist`` step."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom.dsutils import decode, encode

from dicom.worklist import (
    CHARSET,
    SERVICE_KEY,
    WorklistStep,
    WorklistStore,
    fold_name,
    worklist_store,
)
from gateway.envelope import Envelope
from gateway.errors import PermanentError
from gateway.orders import Order
from gateway.registry import PluginContext

VIET = "Nguyễn^Văn Ánh"


def order(accession: str = "ACC1", **fields: Any) -> Order:
    base: dict[str, Any] = {
        "control": "new",
        "accession": accession,
        "patient_id": "BN123456",
        "patient_id_issuer": "BVTW",
        "patient_name": VIET,
        "birth_date": "19800521",
        "sex": "M",
        "procedure_code": "XQ-NGUC",
        "procedure_scheme": "L",
        "procedure_text": "Chụp X-quang ngực thẳng",
        "modality": "CR",
        "scheduled_start": "20240315090000",
        "station_ae": "CR_ROOM1",
        "priority": "R",
        "referring_physician": "Lê^Minh",
        "message_control_id": "MSG1",
    }
    return Order(**{**base, **fields})


@pytest.fixture
def store(tmp_path: Path) -> WorklistStore:
    return WorklistStore(tmp_path / "worklist.sqlite")


def query(**top: Any) -> Dataset:
    """An MWL identifier: top-level keys, ``sps`` a dict of SPS sequence keys."""
    sps_keys = top.pop("sps", {})
    ds = Dataset()
    for keyword, value in top.items():
        setattr(ds, keyword, value)
    item = Dataset()
    for keyword, value in sps_keys.items():
        setattr(item, keyword, value)
    if sps_keys:
        ds.ScheduledProcedureStepSequence = Sequence([item])
    return ds


def accessions(results: Iterator[Dataset]) -> list[str]:
    return [str(ds.AccessionNumber) for ds in results]


def found(store: WorklistStore, **keys: Any) -> list[str]:
    keys.setdefault("AccessionNumber", "")
    return accessions(store.find(query(**keys)))


# -- apply ---------------------------------------------------------------------------------


def test_new_order_creates_a_scheduled_item_with_a_generated_study_uid(
    store: WorklistStore,
) -> None:
    assert store.apply(order()) == 1
    (item,) = store.items()
    assert (item.accession, item.step_id, item.status) == ("ACC1", "", "scheduled")
    assert item.study_uid.startswith("1.2.826.0.1.3680043.8.498.")  # pydicom's root
    assert item.order.study_uid == item.study_uid


def test_update_keeps_study_uid_and_merges_non_empty_fields(store: WorklistStore) -> None:
    store.apply(order())
    uid = store.items()[0].study_uid
    store.apply(Order(control="update", accession="ACC1", patient_id="", station_ae="CR_ROOM2"))
    store.apply(order(control="update", scheduled_start="20240316080000", study_uid=""))
    (item,) = store.items()
    assert item.study_uid == uid
    assert item.status == "scheduled"
    assert item.order.station_ae == "CR_ROOM1"  # the full re-send put it back
    assert item.order.scheduled_start == "20240316080000"
    assert item.order.patient_name == VIET
    store.apply(Order(control="update", accession="ACC1", patient_id="", station_ae="CR_ROOM2"))
    assert store.items()[0].order.station_ae == "CR_ROOM2"
    assert store.items()[0].order.patient_id == "BN123456"  # empty means "no change"


def test_new_for_a_known_accession_replaces_but_keeps_the_study_uid(
    store: WorklistStore,
) -> None:
    store.apply(order(station_ae="X1"))
    uid = store.items()[0].study_uid
    store.apply(order(station_ae="", modality="DX"))
    (item,) = store.items()
    assert item.study_uid == uid
    assert (item.order.station_ae, item.order.modality) == ("", "DX")


def test_study_uid_from_the_order_is_used(store: WorklistStore) -> None:
    store.apply(order(study_uid="1.2.3.4"))
    assert store.items()[0].study_uid == "1.2.3.4"
    store.apply(order(control="update", study_uid=""))
    assert store.items()[0].study_uid == "1.2.3.4"


def test_update_of_unknown_accession_creates_it(store: WorklistStore) -> None:
    store.apply(order(control="update"))
    assert [i.status for i in store.items()] == ["scheduled"]


def test_update_without_patient_for_unknown_accession_creates_nothing(
    store: WorklistStore,
) -> None:
    assert store.apply(Order(control="update", accession="ACC9", patient_id="")) == 0
    assert store.items() == []


def test_cancel_removes_from_answers_and_keeps_the_row(store: WorklistStore) -> None:
    store.apply(order("ACC1"))
    store.apply(order("ACC2"))
    assert found(store) == ["ACC1", "ACC2"]
    assert store.apply(Order(control="cancel", accession="ACC1", patient_id="")) == 1
    assert found(store) == ["ACC2"]
    assert [(i.accession, i.status) for i in store.items()] == [
        ("ACC1", "cancelled"),
        ("ACC2", "scheduled"),
    ]
    # cancelling again or an unknown accession changes nothing
    assert store.apply(Order(control="cancel", accession="ACC1", patient_id="")) == 0
    assert store.apply(Order(control="cancel", accession="NOPE", patient_id="")) == 0


def test_update_does_not_revive_a_cancelled_item_but_new_does(store: WorklistStore) -> None:
    store.apply(order())
    uid = store.items()[0].study_uid
    store.apply(Order(control="cancel", accession="ACC1", patient_id=""))
    store.apply(order(control="update", station_ae="CR_ROOM9"))
    assert store.items()[0].status == "cancelled"
    store.apply(order())
    assert (store.items()[0].status, store.items()[0].study_uid) == ("scheduled", uid)


def test_steps_of_one_accession_share_the_study_uid(store: WorklistStore) -> None:
    store.apply(order("A7", step_id="SPS1", station_ae="CT01"))
    store.apply(order("A7", step_id="SPS2", station_ae="CT02"))
    items = store.items("A7")
    assert [i.step_id for i in items] == ["SPS1", "SPS2"]
    assert items[0].study_uid == items[1].study_uid
    result = list(
        store.find(query(sps={"ScheduledProcedureStepID": "", "ScheduledStationAETitle": ""}))
    )
    got = [
        (
            ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID,
            ds.ScheduledProcedureStepSequence[0].ScheduledStationAETitle,
        )
        for ds in result
    ]
    assert got == [("SPS1", "CT01"), ("SPS2", "CT02")]
    # a cancel naming one step cancels that one; without a step id, all of them
    store.apply(Order(control="cancel", accession="A7", patient_id="", step_id="SPS1"))
    assert [i.status for i in store.items("A7")] == ["cancelled", "scheduled"]
    store.apply(Order(control="cancel", accession="A7", patient_id=""))
    assert [i.status for i in store.items("A7")] == ["cancelled", "cancelled"]


def test_mark_received_completes_the_item(store: WorklistStore) -> None:
    store.apply(order("ACC1"))
    store.apply(order("ACC2"))
    assert store.mark_received("ACC1") == 1
    assert store.mark_received("ACC1") == 0
    assert store.mark_received("UNKNOWN") == 0
    assert store.mark_received("  ") == 0
    assert found(store) == ["ACC2"]
    assert store.items("ACC1")[0].status == "completed"


def test_every_change_is_audited(store: WorklistStore, tmp_path: Path) -> None:
    store.apply(order())
    store.apply(order(control="update", message_control_id="MSG2"))
    store.mark_received("ACC1")
    store.apply(Order(control="cancel", accession="ACC1", patient_id="", message_control_id="M3"))
    with closing(sqlite3.connect(tmp_path / "worklist.sqlite")) as conn:
        rows = conn.execute("SELECT action, status, message FROM events ORDER BY id").fetchall()
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert rows == [
        ("new", "scheduled", "MSG1"),
        ("update", "scheduled", "MSG2"),
        ("received", "completed", ""),
        ("cancel", "cancelled", "M3"),
    ]
    assert mode == "wal"


# -- matching --------------------------------------------------------------------------------


@pytest.fixture
def filled(store: WorklistStore) -> WorklistStore:
    store.apply(
        order("CR1", station_ae="CR_ROOM1", modality="CR", scheduled_start="20240315090000")
    )
    store.apply(
        order(
            "CT1",
            patient_id="BN2",
            patient_name="Trần^Thị Ngọc Hà",
            station_ae="CT01",
            modality="CT",
            scheduled_start="20240316143000",
        )
    )
    store.apply(
        order(
            "US1",
            patient_id="BN3",
            patient_name="Đặng^Văn Đức",
            station_ae="US_ROOM2",
            modality="US",
            scheduled_start="20240320",
        )
    )
    store.apply(
        order(
            "ANY1",
            patient_id="BN4",
            patient_name="Smith^John",
            station_ae="",
            modality="",
            scheduled_start="",
        )
    )
    return store


def test_universal_matching_returns_every_scheduled_item(filled: WorklistStore) -> None:
    assert found(filled) == ["ANY1", "CR1", "CT1", "US1"]
    # nothing asked: every item matches, each answer holds the character set only
    answers = list(filled.find(Dataset()))
    assert [[e.keyword for e in ds] for ds in answers] == [["SpecificCharacterSet"]] * 4


@pytest.mark.parametrize(
    ("sps", "expected"),
    [
        ({"ScheduledStationAETitle": "CT01"}, ["ANY1", "CT1"]),
        ({"ScheduledStationAETitle": "CR_*"}, ["ANY1", "CR1"]),
        ({"Modality": "US"}, ["ANY1", "US1"]),
        ({"Modality": ["CT", "MR"]}, ["ANY1", "CT1"]),
        ({"ScheduledProcedureStepStartDate": "20240315"}, ["ANY1", "CR1"]),
        ({"ScheduledProcedureStepStartDate": "20240315-20240316"}, ["ANY1", "CR1", "CT1"]),
        ({"ScheduledProcedureStepStartDate": "20240316-"}, ["ANY1", "CT1", "US1"]),
        ({"ScheduledProcedureStepStartDate": "-20240315"}, ["ANY1", "CR1"]),
        ({"ScheduledProcedureStepStartDate": "20240401-"}, ["ANY1"]),
        ({"ScheduledProcedureStepStartTime": "0800-1000"}, ["ANY1", "CR1", "US1"]),
        ({"ScheduledProcedureStepStartTime": "14-"}, ["ANY1", "CT1", "US1"]),
        ({"ScheduledProcedureStepStartTime": "-09"}, ["ANY1", "CR1", "US1"]),
        (
            {"ScheduledStationAETitle": "CT01", "ScheduledProcedureStepStartDate": "20240315"},
            ["ANY1"],
        ),
        (
            {"ScheduledStationAETitle": "", "Modality": "", "ScheduledProcedureStepStartDate": ""},
            ["ANY1", "CR1", "CT1", "US1"],
        ),
    ],
)
def test_scheduled_step_keys(
    filled: WorklistStore, sps: dict[str, Any], expected: list[str]
) -> None:
    # an item with no station, modality or time ("ANY1") is offered to every modality
    assert found(filled, sps=sps) == expected


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"PatientID": "BN2"}, ["CT1"]),
        ({"PatientID": "BN*"}, ["ANY1", "CR1", "CT1", "US1"]),
        ({"PatientID": "BN?"}, ["ANY1", "CT1", "US1"]),
        ({"PatientID": "bn2"}, []),  # LO matching is case-sensitive
        ({"AccessionNumber": "CT1"}, ["CT1"]),
        ({"AccessionNumber": "C*"}, ["CR1", "CT1"]),
        ({"AccessionNumber": "*"}, ["ANY1", "CR1", "CT1", "US1"]),
        ({"PatientName": VIET}, ["CR1"]),
        ({"PatientName": "Nguyễn*"}, ["CR1"]),
        ({"PatientName": "NGUYEN^VAN ANH"}, ["CR1"]),  # case and accents ignored for PN
        ({"PatientName": "nguyen*"}, ["CR1"]),
        ({"PatientName": "Dang*"}, ["US1"]),  # đ folds to d
        ({"PatientName": "*Ngọc*"}, ["CT1"]),
        ({"PatientName": "Tr?n^*"}, ["CT1"]),
        ({"PatientName": "Nguyen"}, []),  # no wildcard: the whole name
        ({"PatientSex": "M"}, ["ANY1", "CR1", "CT1", "US1"]),
        ({"PatientBirthDate": "19800101-19801231"}, ["ANY1", "CR1", "CT1", "US1"]),
        ({"PatientBirthDate": "19900101-"}, []),
        ({"StudyInstanceUID": "1.2.3"}, []),
    ],
)
def test_patient_and_request_keys(
    filled: WorklistStore, keys: dict[str, Any], expected: list[str]
) -> None:
    keys.setdefault("AccessionNumber", "")
    assert accessions(filled.find(query(**keys))) == expected


def test_study_uid_list_matching(filled: WorklistStore) -> None:
    uids = {i.accession: i.study_uid for i in filled.items()}
    got = found(filled, StudyInstanceUID=[uids["CR1"], uids["US1"], "1.2.3"])
    assert got == ["CR1", "US1"]


def test_unknown_values_do_not_match_patient_keys(store: WorklistStore) -> None:
    store.apply(order("X1", sex="", birth_date=""))
    assert found(store, PatientSex="F") == []
    assert found(store, PatientBirthDate="19800521") == []


def test_fold_name() -> None:
    assert fold_name("Nguyễn^Văn Ánh^^") == "nguyen^van anh"
    assert fold_name("ĐẶNG") == "dang"


# -- responses -------------------------------------------------------------------------------


def test_response_holds_the_requested_attributes_only(store: WorklistStore) -> None:
    store.apply(order())
    identifier = query(
        PatientName="",
        PatientID="",
        AccessionNumber="",
        PatientWeight=None,  # a key this store does not know: returned empty
        sps={"Modality": "", "ScheduledStationAETitle": "", "ScheduledProcedureStepStartDate": ""},
    )
    (ds,) = store.find(identifier)
    assert {e.keyword for e in ds} == {
        "SpecificCharacterSet",
        "AccessionNumber",
        "PatientName",
        "PatientID",
        "PatientWeight",
        "ScheduledProcedureStepSequence",
    }
    assert ds.SpecificCharacterSet == CHARSET
    assert ds.PatientWeight is None
    (sps,) = ds.ScheduledProcedureStepSequence
    assert {e.keyword for e in sps} == {
        "Modality",
        "ScheduledStationAETitle",
        "ScheduledProcedureStepStartDate",
    }
    assert (sps.Modality, sps.ScheduledStationAETitle, sps.ScheduledProcedureStepStartDate) == (
        "CR",
        "CR_ROOM1",
        "20240315",
    )


def test_empty_sequence_key_returns_the_whole_sequence(store: WorklistStore) -> None:
    store.apply(order(step_id="SPS9"))
    ds = Dataset()
    ds.ScheduledProcedureStepSequence = Sequence([])
    ds.RequestedProcedureCodeSequence = Sequence([])
    ds.ReferencedStudySequence = Sequence([])
    (out,) = store.find(ds)
    (sps,) = out.ScheduledProcedureStepSequence
    assert sps.ScheduledProcedureStepID == "SPS9"
    assert sps.ScheduledProcedureStepStartTime == "090000"
    assert sps.ScheduledProcedureStepStatus == "SCHEDULED"
    assert sps.ScheduledProtocolCodeSequence[0].CodeValue == "XQ-NGUC"
    (code,) = out.RequestedProcedureCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "XQ-NGUC",
        "L",
        "Chụp X-quang ngực thẳng",
    )
    assert len(out.ReferencedStudySequence) == 0


def test_full_item_attributes(store: WorklistStore) -> None:
    store.apply(order(priority="S"))
    item = store.items()[0].dataset()
    assert item.RequestedProcedureID == "ACC1"
    assert item.RequestedProcedurePriority == "STAT"
    assert item.ReferringPhysicianName == "Lê^Minh"
    assert item.IssuerOfPatientID == "BVTW"
    assert item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID == "ACC1"
    assert item.StudyInstanceUID == store.items()[0].study_uid


def test_vietnamese_name_survives_dicom_encoding(store: WorklistStore) -> None:
    store.apply(order())
    identifier = query(PatientName="NGUYEN*", PatientID="", RequestedProcedureDescription="")
    identifier.SpecificCharacterSet = "ISO_IR 100"  # what the modality sent does not matter
    (ds,) = store.find(identifier)
    for implicit in (True, False):
        raw = encode(ds, implicit, True)
        assert raw is not None
        assert VIET.encode("utf-8") in raw
        back = decode(BytesIO(raw), implicit, True)
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert str(back.PatientName) == VIET
        assert back.PatientName.family_name == "Nguyễn"
        assert back.RequestedProcedureDescription == "Chụp X-quang ngực thẳng"


def test_find_is_lazy_and_safe_to_stop(store: WorklistStore) -> None:
    for n in range(5):
        store.apply(order(f"A{n}"))
    results = store.find(query(AccessionNumber=""))
    assert str(next(results).AccessionNumber) == "A0"
    results.close()  # what an SCP does on C-CANCEL


def test_private_and_group_length_keys_are_ignored(store: WorklistStore) -> None:
    store.apply(order())
    ds = query(AccessionNumber="ACC1")
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091001, "LO", "x")
    (out,) = store.find(ds)
    assert [e.keyword for e in out] == ["SpecificCharacterSet", "AccessionNumber"]


# -- threads ---------------------------------------------------------------------------------


def test_threads_apply_and_find_concurrently(store: WorklistStore) -> None:
    errors: list[BaseException] = []
    counts: list[int] = []

    def writer(w: int) -> None:
        try:
            for n in range(40):
                store.apply(order(f"W{w}-{n}", patient_id=f"P{w}"))
                if n % 4 == 0:
                    store.apply(Order(control="cancel", accession=f"W{w}-{n}", patient_id=""))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    def reader() -> None:
        try:
            for _ in range(40):
                counts.append(len(list(store.find(query(PatientName="NGUYEN*")))))
        except BaseException as err:  # pragma: no cover
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(counts) == 160
    assert len(found(store)) == 4 * 30
    assert len({i.study_uid for i in store.items()}) == 160


# -- plugin: shared store and the step -----------------------------------------------------


def test_worklist_store_is_created_once_per_context(tmp_path: Path) -> None:
    ctx = PluginContext("site", str(tmp_path / "state"), None)
    store = worklist_store(ctx)
    assert worklist_store(ctx) is store
    assert ctx.services[SERVICE_KEY] is store
    assert store.path == tmp_path / "state" / "worklist.sqlite"
    assert store.path.exists()


async def test_step_applies_orders_and_consumes_them(store: WorklistStore) -> None:
    step = WorklistStep(store)
    env = Envelope(kind="order", source="his", body=order().to_json())
    assert await step.run(env) == []
    assert [i.accession for i in store.items()] == ["ACC1"]
    cancel = Order(control="cancel", accession="ACC1", patient_id="")
    assert await step.run(Envelope(kind="order", source="his", body=cancel.to_json())) == []
    assert store.items()[0].status == "cancelled"


async def test_step_rejects_bad_bodies_and_skips_others(store: WorklistStore) -> None:
    step = WorklistStep(store)
    with pytest.raises(PermanentError, match="not a valid Order"):
        await step.run(Envelope(kind="order", source="his", body=b'{"control": "maybe"}'))
    assert await step.run(Envelope(kind="hl7", source="his", body=b"MSH|")) == []
    lab = Order(control="new", accession="L1", patient_id="P", specimen_id="S1", tests=("GLU",))
    assert await step.run(Envelope(kind="order", source="lis", body=lab.to_json())) == []
    assert store.items() == []
