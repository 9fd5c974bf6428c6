"""The dicom-scp listener inside a running gateway, driven by real DICOM peers.

The gateway runs in-process (journal, a folder outbox for instances, a folder for
study events); the peers are DCMTK's ``echoscu``, ``storescu``, ``findscu`` and
``storescp`` (the reference for "the bytes storescu sent", in bit-preserving
mode), plus pynetdicom as a scripted SCU where a test needs to misbehave
mid-association.

What is byte-identical: the data set part of each journaled/outbox file (every
byte after the file meta information) equals the data set bytes storescu put on
the wire, as DCMTK's own bit-preserving storescp writes them. The preamble and
file meta are pynetdicom's (built from the C-STORE request: SOP class and
instance, the negotiated transfer syntax, pynetdicom's implementation UID): the
network carries no file meta. storescu itself re-encodes what it reads (it
drops group lengths, for one), so its wire bytes are not always the source
file's bytes; ``test_dicom_cli`` checks the source-file identity with a sender
that does not re-encode.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dicom_peers import (
    MIXED_SET,
    copy_testdata,
    eventually,
    file_info,
    need_dcmtk,
    run_tool,
    running_gateway,
    sample_file,
    storescp,
    storescu,
)
from pydicom import Dataset, dcmread
from pydicom.uid import UID
from pynetdicom import AE, build_context

from dicom import scp as scp_module
from dicom.studies import Instance, StudyStore
from gateway.config import parse_config
from gateway.errors import ConfigError, DiskFullError
from gateway.registry import default_registry

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def dataset_bytes(path: Path) -> bytes:
    return path.read_bytes()[file_info(path).dataset_offset :]


class Scu:
    """pynetdicom as a scripted storage SCU (in a thread: the gateway owns the loop)."""

    def __init__(self, port: int, contexts: list[tuple[str, str]], calling: str = "SCRIPTED"):
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        self.assoc = ae.associate(
            "127.0.0.1",
            port,
            contexts=[build_context(sop, [ts]) for sop, ts in contexts],
            ae_title="MEDGW",
        )
        assert self.assoc.is_established, "association not established"

    def store(self, path: Path) -> int:
        rsp = self.assoc.send_c_store(path)
        return int(rsp.Status)


def corrupt_file(folder: Path) -> Path:
    """Valid file meta (a CT, explicit VR LE), then bytes that are no data set."""
    source = sample_file("CT_small.dcm")
    info = file_info(source)
    path = folder / "corrupt.dcm"
    path.write_bytes(source.read_bytes()[: info.dataset_offset] + b"\xff\xff\xff\xff" * 64)
    return path


# -- tests ----------------------------------------------------------------------------------


async def test_echoscu_gets_success(tmp_path: Path) -> None:
    need_dcmtk("echoscu")
    async with running_gateway(tmp_path) as gw:
        result = await asyncio.to_thread(
            run_tool, ["echoscu", "-aet", "ECHOSCU", "-aec", "MEDGW", "127.0.0.1", str(gw.port)]
        )
        assert result.returncode == 0, result.stdout
        session = (await eventually(gw.sessions, what="the session record"))[0]
    assert session["calling_ae"] == "ECHOSCU"
    assert session["called_ae"] == "MEDGW"
    assert session["released"] is True
    assert session["aborted"] is False
    assert session["files"] == 0


@pytest.mark.slow
async def test_storescu_mixed_set_is_journaled_as_sent(tmp_path: Path) -> None:
    need_dcmtk("storescu", "storescp")
    files = copy_testdata(MIXED_SET, tmp_path / "in")
    expected = {sop_uid(p): file_info(p) for p in files}
    assert len(expected) == len(files), "the set needs distinct SOP Instance UIDs"

    # the reference: what storescu puts on the wire, as DCMTK's bit-preserving storescp keeps it
    with storescp(tmp_path / "reference") as ref_port:
        sent = await asyncio.to_thread(storescu, files, ref_port, tmp_path / "work")
        assert sent.returncode == 0, sent.stdout
    wire = {sop_uid(p): dataset_bytes(p) for p in (tmp_path / "reference").iterdir()}
    assert set(wire) == set(expected)

    async with running_gateway(tmp_path) as gw:
        result = await asyncio.to_thread(storescu, files, gw.port, tmp_path / "work")
        assert result.returncode == 0, result.stdout
        assert "Store Failed" not in result.stdout
        await eventually(
            lambda: len(gw.outbox_files()) == len(files), what="every instance in the outbox"
        )
        headers = gw.headers()
        session = (await eventually(gw.sessions, what="the session record"))[0]
        blobs = {
            sop: (gw.state / "blobs" / blob).read_bytes()
            for sop, blob in gw.query(
                "SELECT json_extract(headers, '$.SOPInstanceUID'), blob FROM envelopes"
            )
        }

    for path in gw.outbox_files():
        info, sop = file_info(path), sop_uid(path)
        source = expected[sop]
        assert dataset_bytes(path) == wire[sop], source.path.name
        assert path.read_bytes() == blobs[sop], "outbox = journal blob"
        assert info.transfer_syntax == source.transfer_syntax, source.path.name
        dcmread(path)  # a valid Part-10 file
    by_sop = {h["SOPInstanceUID"]: h for h in headers}
    for sop, source in expected.items():
        h = by_sop[sop]
        assert h["TransferSyntaxUID"] == source.transfer_syntax
        assert h["calling_ae"] == "STORESCU"
        assert h["called_ae"] == "MEDGW"
        assert h["peer"] == "127.0.0.1"
        assert "PatientName" not in h
    assert by_sop[expected_uid(files, "RG3_UNCI.dcm")]["Modality"] == "CR"
    assert session["files"] == len(files)
    assert session["bytes"] == sum(len(b) for b in blobs.values())
    assert session["errors"] == 0
    assert session["released"] is True


def expected_uid(files: list[Path], name: str) -> str:
    return next(sop_uid(p) for p in files if p.name == name)


def sop_uid(path: Path) -> str:
    """The data set's SOP Instance UID (a test file's meta may disagree: rtplan.dcm)."""
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.mark.slow
async def test_unknown_calling_ae_is_rejected(tmp_path: Path) -> None:
    need_dcmtk("storescu")
    files = copy_testdata(["CT_small.dcm"], tmp_path / "in")
    async with running_gateway(tmp_path, ", allowed_calling_aes: [CT01, CR_ROOM1]") as gw:
        refused = await asyncio.to_thread(
            storescu, files, gw.port, tmp_path / "work", calling="INTRUDER"
        )
        allowed = await asyncio.to_thread(storescu, files, gw.port, tmp_path / "w2", calling="CT01")
        await eventually(lambda: len(gw.sessions()) == 2, what="two session records")
        sessions = gw.sessions()
        headers = gw.headers()
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout
    assert allowed.returncode == 0, allowed.stdout
    assert [h["calling_ae"] for h in headers] == ["CT01"]  # only the allowed one stored
    rejected = [s for s in sessions if s.get("rejected")]
    assert len(rejected) == 1
    assert rejected[0]["calling_ae"] == "INTRUDER"
    assert rejected[0]["rejected"] == "calling AE not allowed"
    assert rejected[0]["files"] == 0


async def test_unknown_ip_is_disconnected_before_the_association(tmp_path: Path) -> None:
    need_dcmtk("echoscu")
    async with running_gateway(tmp_path, ", allowed_ips: [10.0.0.0/8, 'fd00::/8']") as gw:
        result = await asyncio.to_thread(
            run_tool, ["echoscu", "-aec", "MEDGW", "127.0.0.1", str(gw.port)]
        )
        sessions = await eventually(gw.sessions, what="the refusal record")
    assert result.returncode != 0
    assert sessions[0]["rejected"] == "address not allowed"
    assert sessions[0]["peer"] == "127.0.0.1"


async def test_corrupt_dataset_is_quarantined_and_earlier_instances_kept(
    tmp_path: Path, chunked_send: None
) -> None:
    bad = corrupt_file(tmp_path)
    async with running_gateway(tmp_path) as gw:
        contexts = [(CT_IMAGE, EXPLICIT_LE), (MR_IMAGE, EXPLICIT_LE)]

        def scripted() -> list[int]:
            scu = Scu(gw.port, contexts)
            try:
                return [
                    scu.store(sample_file("CT_small.dcm")),
                    scu.store(bad),
                    scu.store(sample_file("MR_small.dcm")),
                ]
            finally:
                scu.assoc.release()

        statuses = await asyncio.to_thread(scripted)
        await eventually(lambda: len(gw.outbox_files()) == 2, what="the two good instances")
        quarantined = gw.query("SELECT reason, size, peer, raw FROM quarantine")
        session = (await eventually(gw.sessions))[0]
    assert statuses[0] == 0x0000
    assert 0xC000 <= statuses[1] <= 0xCFFF
    assert statuses[2] == 0x0000
    assert len(quarantined) == 1
    reason, size, peer, raw = quarantined[0]
    assert "SOP Instance UID" in reason or "header" in reason
    assert raw.endswith(b"\xff" * 256)  # the data set as received, after pynetdicom's meta
    assert size == len(raw)
    assert peer.startswith("127.0.0.1:")
    assert session["files"] == 2
    assert session["errors"] == 1
    assert session["failures"] == {"0xC000": 1}


async def test_abort_mid_transfer_keeps_earlier_instances(
    tmp_path: Path, chunked_send: None
) -> None:
    async with running_gateway(tmp_path) as gw:

        def scripted() -> int:
            scu = Scu(gw.port, [(CT_IMAGE, EXPLICIT_LE)])
            status = scu.store(sample_file("CT_small.dcm"))
            assert scu.assoc.dul.socket is not None
            sock = scu.assoc.dul.socket.socket
            assert sock is not None
            # a P-DATA-TF PDU announcing 100000 bytes, 1000 of them sent, then the end
            sock.sendall(b"\x04\x00" + struct.pack(">L", 100_000) + b"\x00" * 1000)
            sock.shutdown(socket.SHUT_RDWR)
            scu.assoc.abort()
            return status

        status = await asyncio.to_thread(scripted)
        await eventually(lambda: len(gw.outbox_files()) == 1, what="the first instance")
        session = (await eventually(gw.sessions, what="the aborted session"))[0]
        assert gw.count("envelopes") == 1
    assert status == 0x0000
    assert session["aborted"] is True
    assert session["files"] == 1


@pytest.mark.slow
async def test_journal_failure_answers_out_of_resources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_dcmtk("storescu")
    files = copy_testdata(["CT_small.dcm", "MR_small.dcm"], tmp_path / "in")
    async with running_gateway(tmp_path) as gw:

        async def full(*args: Any, **kwargs: Any) -> Any:
            raise DiskFullError("free space below the watermark")

        monkeypatch.setattr(gw.gw.journal, "accept", full)
        result = await asyncio.to_thread(
            storescu, files, gw.port, tmp_path / "work", extra=("-v", "--no-halt")
        )
        session = (await eventually(gw.sessions))[0]
        assert gw.count("envelopes") == 0
    # storescu reports the status it got, for each file
    assert result.stdout.count("Received Store Response (Refused: OutOfResources)") == 2, (
        result.stdout
    )
    assert session["files"] == 0
    assert session["failures"] == {"0xA700": 2}


async def test_journal_timeout_answers_out_of_resources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunked_send: None
) -> None:
    async with running_gateway(tmp_path, ", accept_timeout_s: 0.3") as gw:
        real = gw.gw.journal.accept

        async def slow(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(1.0)
            return await real(*args, **kwargs)

        monkeypatch.setattr(gw.gw.journal, "accept", slow)

        def scripted() -> int:
            scu = Scu(gw.port, [(CT_IMAGE, EXPLICIT_LE)])
            try:
                return scu.store(sample_file("CT_small.dcm"))
            finally:
                scu.assoc.release()

        assert await asyncio.to_thread(scripted) == 0xA700


async def test_maximum_associations_rejects_the_next_one(tmp_path: Path) -> None:
    """pynetdicom does not queue: over the limit it answers A-ASSOCIATE-RJ (rejected
    transient, local limit exceeded) at once; the modality retries later."""
    need_dcmtk("echoscu")
    async with running_gateway(tmp_path, ", maximum_associations: 1") as gw:
        first = await asyncio.to_thread(Scu, gw.port, [(CT_IMAGE, EXPLICIT_LE)], "FIRST")
        try:
            busy = await asyncio.to_thread(
                run_tool, ["echoscu", "-aet", "SECOND", "-aec", "MEDGW", "127.0.0.1", str(gw.port)]
            )
        finally:
            await asyncio.to_thread(first.assoc.release)
        await asyncio.sleep(0.2)  # the first association's thread ends
        free = await asyncio.to_thread(
            run_tool, ["echoscu", "-aet", "THIRD", "-aec", "MEDGW", "127.0.0.1", str(gw.port)]
        )
        await eventually(lambda: len(gw.sessions()) == 3, what="three sessions")
        sessions = {s["calling_ae"]: s for s in gw.sessions()}
    assert busy.returncode != 0
    assert "Local Limit Exceeded" in busy.stdout, busy.stdout
    assert free.returncode == 0, free.stdout
    assert sessions["SECOND"]["rejected"] == "too many associations"
    assert "rejected" not in sessions["FIRST"]


@pytest.mark.slow
async def test_study_complete_event_after_quiet_time_and_across_restart(tmp_path: Path) -> None:
    need_dcmtk("storescu")
    ct = copy_testdata(["CT_small.dcm"], tmp_path / "in")
    nm = copy_testdata(["JPEG2000.dcm", "JPEG-LL.dcm"], tmp_path / "in")  # one NM study
    nm_study = str(dcmread(nm[0], stop_before_pixels=True).StudyInstanceUID)
    mr = dcmread(sample_file("MR_small.dcm"))  # an MR instance in that study too
    mr.StudyInstanceUID = nm_study
    mr.SOPInstanceUID = mr.file_meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.99.1")
    mr.save_as(tmp_path / "in" / "mr-in-nm-study.dcm")
    files = [*ct, *nm, tmp_path / "in" / "mr-in-nm-study.dcm"]
    async with running_gateway(tmp_path, ", study_quiet_s: 0.5") as gw:
        result = await asyncio.to_thread(storescu, files, gw.port, tmp_path / "work")
        assert result.returncode == 0, result.stdout
        await eventually(lambda: len(gw.event_files()) == 2, what="two study.complete events")
        events = {e["study_uid"]: e for e in map(_json, gw.event_files())}
        event_headers = gw.headers("event")
    ct_study = str(dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    assert events[ct_study]["instances"] == 1
    assert events[ct_study]["modality"] == "CT"
    assert events[nm_study]["instances"] == 3
    assert events[nm_study]["modalities"] == {"MR": 1, "NM": 2}
    assert events[nm_study]["modality"] == "NM"
    assert events[nm_study]["calling_ae"] == "STORESCU"
    by_study = {h["study_uid"]: h for h in event_headers}
    assert by_study[nm_study] == {
        "event": "study.complete",
        "study_uid": nm_study,
        "instances": "3",
        "modality": "NM",
        "calling_ae": "STORESCU",
    }

    # a late instance reopens the study; the gateway stops before it is quiet; the
    # restarted gateway remembers it and completes it with the new count
    (tmp_path / "events").rename(tmp_path / "events-1")
    late = copy_testdata(["JPGExtended.dcm"], tmp_path / "late")  # the same NM study
    async with running_gateway(tmp_path, ", study_quiet_s: 30") as gw:
        result = await asyncio.to_thread(storescu, late, gw.port, tmp_path / "work")
        assert result.returncode == 0, result.stdout
        await eventually(lambda: len(gw.outbox_files()) >= 1, what="the late instance")
        assert gw.event_files() == []
    async with running_gateway(tmp_path, ", study_quiet_s: 0.3") as gw:
        await eventually(lambda: len(gw.event_files()) == 1, what="the reopened study's event")
        (event,) = map(_json, gw.event_files())
        keys = [k for (k,) in gw.query("SELECT idem_key FROM envelopes WHERE kind = 'event'")]
    assert event["study_uid"] == nm_study
    assert event["instances"] == 4
    assert sorted(keys) == sorted(
        [
            f"study-complete:{ct_study}:1",
            f"study-complete:{nm_study}:3",
            f"study-complete:{nm_study}:4",
        ]
    )


def _json(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_bytes())
    return doc


# -- worklist -------------------------------------------------------------------------------


class FakeWorklist:
    """The interface dicom.worklist provides: find() from association threads,
    mark_received() after stores."""

    def __init__(self, items: int, delay_s: float = 0.0) -> None:
        self.items = items
        self.delay_s = delay_s
        self.yielded = 0
        self.identifiers: list[Dataset] = []
        self.received: list[str] = []
        self.lock = threading.Lock()

    def find(self, identifier: Dataset) -> Iterator[Dataset]:
        self.identifiers.append(identifier)
        for n in range(self.items):
            if self.delay_s:
                time.sleep(self.delay_s)
            ds = Dataset()
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.PatientName = f"NGUYỄN^VĂN {n}"
            ds.PatientID = f"P{n}"
            ds.AccessionNumber = f"A{n}"
            with self.lock:
                self.yielded += 1
            yield ds

    def mark_received(self, accession: str) -> int:
        self.received.append(accession)
        return 1


@pytest.fixture
def fake_worklist(monkeypatch: pytest.MonkeyPatch) -> Callable[[FakeWorklist], None]:
    def install(store: FakeWorklist) -> None:
        monkeypatch.setattr(scp_module.DicomScp, "_find_worklist", lambda self: store)

    return install


def _query_file(folder: Path) -> Path:
    ds = Dataset()
    ds.PatientName = "*"
    ds.PatientID = ""
    ds.AccessionNumber = ""
    step = Dataset()
    step.Modality = "CR"
    step.ScheduledStationAETitle = ""
    step.ScheduledProcedureStepStartDate = ""
    ds.ScheduledProcedureStepSequence = [step]
    path = folder / "query.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True)
    return path


@pytest.mark.slow
async def test_worklist_find_and_cancel(
    tmp_path: Path, fake_worklist: Callable[[FakeWorklist], None]
) -> None:
    need_dcmtk("findscu")
    query = _query_file(tmp_path)
    store = FakeWorklist(items=3)
    fake_worklist(store)
    async with running_gateway(tmp_path, ", worklist: true") as gw:
        base = ["findscu", "-W", "-aet", "CR_ROOM1", "-aec", "MEDGW", "-od", str(tmp_path)]
        found = await asyncio.to_thread(
            run_tool, [*base, "-X", "127.0.0.1", str(gw.port), str(query)]
        )
        store.items, store.delay_s, store.yielded = 20, 0.05, 0
        cancelled = await asyncio.to_thread(
            run_tool, [*base, "--cancel", "2", "127.0.0.1", str(gw.port), str(query)]
        )
    assert found.returncode == 0, found.stdout
    responses = sorted(tmp_path.glob("rsp*.dcm"))
    assert len(responses) == 3
    first = dcmread(responses[0])
    assert str(first.PatientName).startswith("NGUYỄN^VĂN")  # UTF-8 survives
    assert store.identifiers[0].ScheduledProcedureStepSequence[0].Modality == "CR"
    assert cancelled.returncode == 0, cancelled.stdout
    assert store.yielded < 20, "C-CANCEL stopped the query"


async def test_stored_accession_marks_the_worklist(
    tmp_path: Path, fake_worklist: Callable[[FakeWorklist], None], chunked_send: None
) -> None:
    store = FakeWorklist(items=0)
    fake_worklist(store)
    async with running_gateway(tmp_path) as gw:  # worklist: false, but the service exists

        def scripted() -> int:
            scu = Scu(gw.port, [("1.2.840.10008.5.1.4.1.1.1", EXPLICIT_LE)])
            try:
                return scu.store(sample_file("RG3_UNCI.dcm"))
            finally:
                scu.assoc.release()

        assert await asyncio.to_thread(scripted) == 0x0000
        await eventually(lambda: store.received, what="mark_received")
    assert store.received == ["FUJI95706"]


# -- the study tracker's store, unit-tested ------------------------------------------------


def test_study_store_counts_each_instance_once_and_guards_the_close(tmp_path: Path) -> None:
    def inst(sop: str, at: float, modality: str = "CT", accession: str = "") -> Instance:
        return Instance("scp", "1.2.3", sop, accession, modality, "CT01", at)

    with StudyStore(tmp_path / "s.sqlite") as store:
        assert store.record([inst("1", 100.0), inst("2", 101.0, accession="A1")]) == 2
        assert store.record([inst("2", 102.0)]) == 0  # a resend counts once
        assert store.due("scp", quiet_before=100.5) == []
        (study,) = store.due("scp", quiet_before=101.0)
        assert (study.instances, study.accession, study.modality) == (2, "A1", "CT")
        store.record([inst("3", 103.0, modality="SR")])
        assert not store.mark_complete(study), "an instance arrived since it was read"
        (study,) = store.due("scp", quiet_before=200.0)
        assert study.instances == 3
        assert study.modalities == {"CT": 2, "SR": 1}
        assert study.modality == "CT"
        assert store.mark_complete(study, at=300.0)
        assert store.due("scp", quiet_before=1e12) == []
        event = study.event()
        assert event.idem_key == "study-complete:1.2.3:3"
        assert event.body == store.find("1.2.3")[0].event().body, "a repeat has the same bytes"
        store.record([inst("4", 400.0)])  # late: reopens
        (late,) = store.due("scp", quiet_before=1e12)
        assert late.instances == 4
        assert store.prune(completed_before=1e12) == 0  # open again: kept
        store.mark_complete(late, at=500.0)
        assert store.prune(completed_before=501.0) == 1
        assert store.find("1.2.3") == []


# -- configuration ----------------------------------------------------------------------------


def test_listener_settings_are_validated_with_their_paths() -> None:
    text = (
        "site: {id: s}\n"
        "listeners:\n"
        "  - {id: m, type: dicom-scp, ae_title: 'THIS_AE_TITLE_IS_TOO_LONG', listen: 0.0.0.0:104,\n"
        "     allowed_calling_aes: [CT01, 'BAD\\\\AE'], allowed_ips: [10.0.0.0/8, not-an-ip],\n"
        "     max_pdu: 100, maximum_associations: 0}\n"
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, default_registry())
    problems = "\n".join(err.value.problems)
    assert "listeners[0].ae_title: an AE title has at most 16 characters" in problems
    assert "listeners[0].allowed_calling_aes[1]: an AE title is printable ASCII" in problems
    assert "not an IP address or CIDR network: 'not-an-ip'" in problems
    assert "listeners[0].maximum_associations" in problems
    ok = parse_config(
        "site: {id: s}\nlisteners:\n"
        "  - {id: m, type: dicom-scp, ae_title: ' MEDGW ', listen: '[::]:11112', max_pdu: 0}\n",
        default_registry(),
    )
    assert ok.listeners[0].ae_title == "MEDGW"
    assert ok.listeners[0].study_quiet_s == 60
    with pytest.raises(ConfigError, match="max_pdu must be 0"):
        parse_config(
            "site: {id: s}\nlisteners:\n"
            "  - {id: m, type: dicom-scp, ae_title: A, listen: 0.0.0.0:104, max_pdu: 100}\n",
            default_registry(),
        )


def test_pdu_reads_take_exactly_the_length_asked_and_stop_at_a_close() -> None:
    """The patched ``AssociationSocket.recv`` (dicom.net): whole PDUs from many small
    writes, nothing of the next PDU, and what there is when the peer closes."""
    from pynetdicom.transport import AssociationSocket  # noqa: PLC0415

    import dicom.net  # noqa: F401, PLC0415 - installs the patch

    ours, theirs = socket.socketpair()
    with ours, theirs:
        asock = AssociationSocket.__new__(AssociationSocket)
        asock.socket = ours
        payload = bytes(range(256)) * 8192  # 2 MiB: more than any socket buffer
        sender = threading.Thread(
            target=lambda: [
                theirs.sendall(payload[i : min(i + 3000, len(payload) - 10)])
                for i in range(0, len(payload) - 10, 3000)
            ]
        )
        sender.start()
        assert asock.recv(1024 * 1024) == payload[: 1024 * 1024]
        assert asock.recv(1024 * 1024 - 10) == payload[1024 * 1024 : -10]
        sender.join()
        theirs.sendall(payload[-10:-5])
        theirs.shutdown(socket.SHUT_WR)
        assert asock.recv(100) == payload[-10:-5]  # closed after 5 of 100 bytes
        assert asock.recv(6) == b""


async def test_silent_and_closed_connections_hold_no_association_slot(tmp_path: Path) -> None:
    """Health checks and port scans (connect, then close or say nothing) must not
    use up ``maximum_associations``: a modality still gets in (found by test_fuzz)."""
    need_dcmtk("echoscu")
    settings = ", maximum_associations: 2, acse_timeout_s: 20"
    async with running_gateway(tmp_path, settings) as gw:
        silent = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(3)]
        for _ in range(3):
            socket.create_connection(("127.0.0.1", gw.port)).close()
        await asyncio.sleep(0.3)
        try:
            for _ in range(2):
                result = await asyncio.to_thread(
                    run_tool, ["echoscu", "-aec", "MEDGW", "127.0.0.1", str(gw.port)]
                )
                assert result.returncode == 0, result.stdout + result.stderr
        finally:
            for sock in silent:
                sock.close()
