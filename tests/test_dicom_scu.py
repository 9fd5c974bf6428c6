"""The ``dicom-store`` destination against a scripted pynetdicom PACS, DCMTK storescp
and Orthanc: bytes sent unchanged, one association reused, statuses mapped to
retry or dead letter, decompression when the PACS refuses a compressed syntax."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from peers.gateway_proc import Proc, pick_free_port, port_open, wait_for
from peers.orthanc import (
    MIXED_SET,
    UNCOMPRESSED_ONLY,
    Orthanc,
    compare_stored,
    dataset_part,
    make_ct_series,
    running_orthanc,
    sample_file,
)
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

from dicom import coerce, scu
from dicom.scu import DicomStoreConfig, DicomStoreDestination, DicomStoreSender, Outcome
from gateway.config import DeliveryPolicy, parse_config
from gateway.delivery import DestinationPump
from gateway.envelope import Envelope, StoredEnvelope
from gateway.errors import ConfigError, PermanentError, TransientError
from gateway.journal import Journal
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.service import Gateway

DEST = "pacs"
CTImageStorage = UID("1.2.840.10008.5.1.4.1.1.2")
HAVE_STORESCP = shutil.which("storescp") is not None
HAVE_ORTHANC = Path("/usr/sbin/Orthanc").exists() or shutil.which("Orthanc") is not None


def store_config(port: int, **kw: Any) -> DicomStoreConfig:
    doc = {"id": DEST, "type": "dicom-store", "ae_title": "PACS", "connect": f"127.0.0.1:{port}"}
    return DicomStoreConfig.model_validate({**doc, **kw})


def envelope(path: Path, seq: int = 1, *, inline: bool = False) -> StoredEnvelope:
    return StoredEnvelope(
        id=f"{seq:032x}",
        seq=seq,
        kind="dicom",
        source="modalities",
        headers={},
        idem_key=None,
        parent_id=None,
        received_at=datetime.now(UTC),
        body=path.read_bytes() if inline else b"",
        blob_path=None if inline else path,
    )


def sop_uid(path: Path) -> str:
    return str(read_file_meta_info(path).MediaStorageSOPInstanceUID)


def pixels(data: bytes) -> np.ndarray[Any, Any]:
    return dcmread(BytesIO(data)).pixel_array


# -- a scripted PACS (pynetdicom, in-process) ------------------------------------------


@dataclass
class Received:
    uid: str
    ts: str
    data: bytes
    status: int


@dataclass
class ScriptedPacs:
    """A C-STORE SCP whose answers are scripted per SOP Instance UID."""

    contexts: list[tuple[str, list[str]]] | None = None  # None: every storage class, any TS
    require_called_aet: bool = False
    script: dict[str, list[int | Dataset]] = field(default_factory=dict)
    hook: Callable[[Any, str], int | None] | None = None
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    releases: int = 0
    aborts: int = 0
    port: int = 0

    def __post_init__(self) -> None:
        self.ae = AE(ae_title="PACS")
        self.ae.require_called_aet = self.require_called_aet
        self.ae.maximum_pdu_size = 131072
        if self.contexts is None:
            for cx in StoragePresentationContexts:
                assert cx.abstract_syntax is not None
                self.ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        else:
            for sop, syntaxes in self.contexts:
                self.ae.add_supported_context(sop, syntaxes)
        self._lock = threading.Lock()

    def _store(self, event: Any) -> int | Dataset:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            queued = self.script.get(uid)
            status = queued.pop(0) if queued else 0x0000
        if self.hook is not None:
            forced = self.hook(event, uid)
            status = status if forced is None else forced
        data = event.request.DataSet.getvalue()
        code = int(status.Status) if isinstance(status, Dataset) else status
        self.received.append(Received(uid, str(event.context.transfer_syntax), data, code))
        return status

    def _opened(self, event: Any) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections += 1

    def _released(self, event: Any) -> None:
        self.releases += 1

    def _aborted(self, event: Any) -> None:
        self.aborts += 1

    def __enter__(self) -> ScriptedPacs:
        server = self.ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._store),
                (evt.EVT_CONN_OPEN, self._opened),
                (evt.EVT_RELEASED, self._released),
                (evt.EVT_ABORTED, self._aborted),
            ],
        )
        assert server is not None
        self.server = server
        self.port = int(server.server_address[1])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()

    def by_uid(self) -> dict[str, Received]:
        return {r.uid: r for r in self.received if r.status == 0}


def failure(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment
    return status


@pytest.fixture
def pacs() -> Iterator[ScriptedPacs]:
    with ScriptedPacs() as p:
        yield p


# -- journal + pump --------------------------------------------------------------------


class RecordingDestination(DicomStoreDestination):
    def __init__(self, cfg: DicomStoreConfig) -> None:
        super().__init__(cfg)
        self.senders: list[DicomStoreSender] = []

    def sender(self) -> DicomStoreSender:
        s = super().sender()
        self.senders.append(s)
        return s


def fast_policy(**kw: Any) -> DeliveryPolicy:
    doc: dict[str, Any] = {
        "backoff": {"initial_s": 0.02, "max_s": 0.3},
        "breaker": {"failures": 1000, "cooldown_s": 0.5},
    }
    return DeliveryPolicy.model_validate({**doc, **kw})


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = Journal(tmp_path / "state")
    j.open()
    yield j
    j.close()


async def journal_files(j: Journal, paths: list[Path]) -> None:
    for p in paths:
        body = p.read_bytes()
        env = Envelope(kind="dicom", source="modalities", body=body, idem_key=sop_uid(p))
        await j.accept(replace(env, as_file=True), [DEST])


def outcomes(j: Journal) -> dict[str, tuple[str, int, str | None, str | None]]:
    """SOP Instance UID -> (state, attempts, last_error, confirmation)."""
    rows = j.reader.execute(
        "SELECT e.idem_key, d.state, d.attempts, d.last_error, d.confirmation "
        "FROM deliveries d JOIN envelopes e ON e.seq = d.seq WHERE d.destination = ?",
        (DEST,),
    )
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


def pending(j: Journal) -> int:
    return j.depth().get(DEST, {}).get("pending", 0)


@asynccontextmanager
async def pumping(
    j: Journal, cfg: DicomStoreConfig, policy: DeliveryPolicy | None = None
) -> AsyncIterator[RecordingDestination]:
    dest = RecordingDestination(cfg)
    pump = DestinationPump(dest, policy or fast_policy(), j, Metrics())
    async with asyncio.TaskGroup() as tg:
        pump.start(tg)
        try:
            yield dest
        finally:
            await pump.stop(10)


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def deliver(
    j: Journal, cfg: DicomStoreConfig, timeout: float = 30, policy: DeliveryPolicy | None = None
) -> RecordingDestination:
    async with pumping(j, cfg, policy) as dest:
        await until(lambda: pending(j) == 0, timeout, "no pending deliveries")
    return dest


# -- configuration and tables ----------------------------------------------------------


def registry() -> Registry:
    reg = Registry()
    scu.register(reg)
    coerce.register(reg)
    return reg


def config_text(tmp_path: Path, dest: str) -> str:
    return f"""
site: {{id: lc}}
state_dir: {tmp_path / "state"}
http: {{listen: null}}
journal: {{min_free_mb: 0}}
destinations:
  - {dest}
routes:
  - {{match: {{kind: dicom}}, to: [pacs]}}
"""


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    cfg = parse_config(
        config_text(
            tmp_path, "{id: pacs, type: dicom-store, ae_title: PACS, connect: '10.0.0.5:104'}"
        ),
        registry(),
    )
    d = cfg.destinations[0]
    assert isinstance(d, DicomStoreConfig)
    assert (d.ae_title, d.calling_ae, str(d.connect)) == ("PACS", "MEDGW", "10.0.0.5:104")
    assert d.decompress_on_reject and d.max_pdu == 131072 and d.idle_release_s == 20
    bad = (
        "{id: pacs, type: dicom-store, ae_title: 'A_VERY_LONG_AE_TITLE', "
        "calling_ae: 'MED\\\\GW', connect: 'pacs', dimse_timeout_s: 0, colour: red}"
    )
    with pytest.raises(ConfigError) as err:
        parse_config(config_text(tmp_path, bad), registry())
    text = "\n".join(err.value.problems)
    assert "destinations[0].ae_title: an AE title has at most 16 characters" in text
    assert "destinations[0].calling_ae: an AE title is printable ASCII without backslash" in text
    assert "destinations[0].connect: expected 'host:port'" in text
    assert "destinations[0].dimse_timeout_s" in text
    assert "destinations[0].colour: unknown setting" in text


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (0x0000, Outcome.SUCCESS),
        (0x0001, Outcome.WARNING),
        (0xB000, Outcome.WARNING),
        (0xB006, Outcome.WARNING),
        (0xB007, Outcome.WARNING),
        (0xA700, Outcome.TRANSIENT),
        (0xA7FF, Outcome.TRANSIENT),
        (0xA900, Outcome.PERMANENT),
        (0xA9FF, Outcome.PERMANENT),
        (0xC000, Outcome.PERMANENT),
        (0xCFFF, Outcome.PERMANENT),
        (0x0122, Outcome.PERMANENT),
        (0x0124, Outcome.TRANSIENT),
        (0x0110, Outcome.TRANSIENT),
        (0xFE00, Outcome.TRANSIENT),
        (0xA800, Outcome.TRANSIENT),  # unknown failure: retried, surfaces as stuck
    ],
)
def test_status_table(code: int, outcome: Outcome) -> None:
    assert scu.classify_status(code)[0] is outcome


def test_contexts_are_capped_keeping_the_most_recent() -> None:
    link = scu.StoreLink(store_config(104))
    for n in range(100):
        link.remember((f"1.2.3.{n}", "1.2.840.10008.1.2.4.90"))
    contexts = link.contexts_for(list(link.seen))
    assert len(contexts) <= scu.MAX_CONTEXTS
    assert ("1.2.3.99", "1.2.840.10008.1.2.4.90") in link.seen
    assert ("1.2.3.0", "1.2.840.10008.1.2.4.90") not in link.seen
    # a pair of the same SOP class in an uncompressed syntax adds no context
    assert link.contexts_for([("1.2", "1.2.840.10008.1.2.4.90"), ("1.2", "1.2.840.10008.1.2")]) == [
        ("1.2", "1.2.840.10008.1.2.4.90"),
        ("1.2", "1.2.840.10008.1.2.1"),
        ("1.2", "1.2.840.10008.1.2"),
    ]


# -- against the scripted PACS ---------------------------------------------------------


async def test_files_go_out_unchanged_on_one_reused_association(
    tmp_path: Path, pacs: ScriptedPacs
) -> None:
    cts = make_ct_series(tmp_path / "ct", 30)
    others = [sample_file(n) for n in ("RG1_J2KR.dcm", "MR_small.dcm", "SC_rgb_rle.dcm")]
    sender = DicomStoreSender(store_config(pacs.port))
    try:
        for n, p in enumerate(cts):
            assert await sender.send(envelope(p, n)) == "0x0000"
        assert sender.associations == 1 and pacs.connections == 1  # 30 images, 1 association
        sock = sender.link.assoc.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        for p in others:  # each new (SOP class, syntax) pair: re-associate with the union
            assert await sender.send(envelope(p)) == "0x0000"
        assert sender.associations == 4
        for p in [*reversed(others), *cts[:5]]:  # all known now: no new association
            await sender.send(envelope(p))
        assert sender.associations == 4 and pacs.connections == 4
    finally:
        await sender.aclose()
    assert pacs.releases == 4 and pacs.aborts == 0  # every association released cleanly
    got = pacs.by_uid()
    for p in [*cts, *others]:
        meta = read_file_meta_info(p)
        r = got[str(meta.MediaStorageSOPInstanceUID)]
        assert r.ts == meta.TransferSyntaxUID  # sent in its own syntax ...
        assert r.data == dataset_part(p.read_bytes())  # ... byte for byte


async def test_inline_body_is_sent_too(pacs: ScriptedPacs) -> None:
    path = sample_file("CT_small.dcm")
    sender = DicomStoreSender(store_config(pacs.port))
    try:
        assert await sender.send(envelope(path, inline=True)) == "0x0000"
    finally:
        await sender.aclose()
    assert pacs.received[0].data == dataset_part(path.read_bytes())


async def test_statuses_retry_dead_letter_or_succeed(
    tmp_path: Path, journal: Journal, pacs: ScriptedPacs
) -> None:
    files = make_ct_series(tmp_path / "ct", 7)
    uids = [sop_uid(p) for p in files]
    pacs.script = {
        uids[0]: [0xA700, 0xA701],  # out of resources twice, then success
        uids[1]: [0x0122],  # SOP class not supported: dead letter
        uids[2]: [0xB000],  # coercion warning: success
        uids[3]: [failure(0xA900, "Rows missing")],  # does not match SOP class: dead
        uids[4]: [0xC123],  # cannot understand: dead letter
        uids[5]: [0xFE00],  # cancelled: retried
        uids[6]: [0xB007],
    }
    await journal_files(journal, files)
    await deliver(journal, store_config(pacs.port))
    got = outcomes(journal)
    assert got[uids[0]] == ("done", 3, None, "0x0000")
    state, attempts, error, _ = got[uids[1]]
    assert (state, attempts) == ("dead", 1)
    assert error is not None and error.startswith("0x0122 refused: SOP class not supported")
    assert got[uids[2]] == ("done", 1, None, "0xB000 warning: coercion of data elements")
    assert got[uids[3]][:2] == ("dead", 1)
    assert str(got[uids[3]][2]).startswith("0xA900 error: data set does not match SOP class")
    assert str(got[uids[3]][2]).endswith(": Rows missing")  # the PACS's error comment
    assert got[uids[4]][:2] == ("dead", 1) and "0xC123 error: cannot understand" in str(
        got[uids[4]][2]
    )
    assert got[uids[5]] == ("done", 2, None, "0x0000")
    assert got[uids[6]][0] == "done" and str(got[uids[6]][3]).startswith("0xB007 warning")
    assert pacs.connections == 1  # failure statuses do not cost the association


async def test_transient_status_is_reported_with_its_code(pacs: ScriptedPacs) -> None:
    path = sample_file("CT_small.dcm")
    pacs.script = {sop_uid(path): [0xA702]}
    sender = DicomStoreSender(store_config(pacs.port))
    try:
        with pytest.raises(TransientError, match=r"^0xA702 refused: out of resources"):
            await sender.send(envelope(path))
        assert await sender.send(envelope(path)) == "0x0000"
    finally:
        await sender.aclose()


async def test_sop_class_the_pacs_does_not_accept_is_dead_lettered(
    tmp_path: Path, journal: Journal
) -> None:
    ct, mr = sample_file("CT_small.dcm"), sample_file("MR_small.dcm")
    with ScriptedPacs(contexts=[(CTImageStorage, ALL_TRANSFER_SYNTAXES)]) as only_ct:
        await journal_files(journal, [mr, ct])
        await deliver(journal, store_config(only_ct.port))
    got = outcomes(journal)
    assert got[sop_uid(ct)][0] == "done"
    state, _, error, _ = got[sop_uid(mr)]
    assert state == "dead"
    assert "SOP class not supported" in str(error) and "MR Image Storage" in str(error)


@pytest.mark.parametrize(
    "name", ["RG1_J2KR.dcm", "emri_small_jpeg_ls_lossless.dcm", "SC_rgb_rle.dcm", "JPEG-LL.dcm"]
)
async def test_refused_compressed_syntax_is_decompressed(name: str) -> None:
    path = sample_file(name)
    original = path.read_bytes()
    meta = read_file_meta_info(path)
    plain = [("1.2.840.10008.1.2.1"), ("1.2.840.10008.1.2")]
    with ScriptedPacs(contexts=[(str(meta.MediaStorageSOPClassUID), plain)]) as pacs:
        sender = DicomStoreSender(store_config(pacs.port))
        try:
            answer = await sender.send(envelope(path))
        finally:
            await sender.aclose()
    assert answer == f"0x0000 decompressed from {meta.TransferSyntaxUID}"
    r = pacs.received[0]
    assert r.ts == "1.2.840.10008.1.2.1"
    sent = dcmread(BytesIO(r.data), force=True)
    sent.file_meta = dcmread(path, stop_before_pixels=True).file_meta
    sent.file_meta.TransferSyntaxUID = UID(r.ts)
    assert sent.SOPInstanceUID == meta.MediaStorageSOPInstanceUID  # same instance
    assert np.array_equal(sent.pixel_array, pixels(original))  # same pixels (lossless)
    assert path.read_bytes() == original


async def test_decompression_can_be_turned_off() -> None:
    path = sample_file("RG1_J2KR.dcm")
    sop = str(read_file_meta_info(path).MediaStorageSOPClassUID)
    with ScriptedPacs(contexts=[(sop, ["1.2.840.10008.1.2.1"])]) as pacs:
        sender = DicomStoreSender(store_config(pacs.port, decompress_on_reject=False))
        try:
            with pytest.raises(PermanentError, match="decompress_on_reject is off"):
                await sender.send(envelope(path))
        finally:
            await sender.aclose()
    assert pacs.received == []


async def test_implicit_only_pacs_gets_a_converted_copy() -> None:
    path = sample_file("CT_small.dcm")
    with ScriptedPacs(contexts=[(CTImageStorage, [ImplicitVRLittleEndian])]) as pacs:
        sender = DicomStoreSender(store_config(pacs.port))
        try:
            answer = await sender.send(envelope(path))
        finally:
            await sender.aclose()
    assert answer == "0x0000 converted from 1.2.840.10008.1.2.1 to 1.2.840.10008.1.2"
    assert pacs.received[0].ts == ImplicitVRLittleEndian


async def test_rejected_association_is_transient_with_the_reason() -> None:
    with ScriptedPacs(require_called_aet=True) as pacs:
        sender = DicomStoreSender(store_config(pacs.port, ae_title="NOT_PACS"))
        try:
            with pytest.raises(TransientError, match="association rejected by NOT_PACS@") as err:
                await sender.send(envelope(sample_file("CT_small.dcm")))
            assert "Called AE title not recognised" in str(err.value)
            assert "reason 0x07" in str(err.value)
        finally:
            await sender.aclose()


async def test_no_listener_is_transient() -> None:
    sender = DicomStoreSender(store_config(pick_free_port(), connect_timeout_s=2))
    try:
        with pytest.raises(TransientError, match=r"cannot connect to PACS@127\.0\.0\.1"):
            await sender.send(envelope(sample_file("CT_small.dcm")))
    finally:
        await sender.aclose()


async def test_abort_mid_association_retries_on_a_new_one(
    tmp_path: Path, journal: Journal, pacs: ScriptedPacs
) -> None:
    files = make_ct_series(tmp_path / "ct", 5)
    victim = sop_uid(files[2])
    aborted: list[str] = []

    def abort_once(event: Any, uid: str) -> int | None:
        if uid == victim and not aborted:
            aborted.append(uid)
            event.assoc.abort()
        return None

    pacs.hook = abort_once
    await journal_files(journal, files)
    dest = await deliver(journal, store_config(pacs.port))
    got = outcomes(journal)
    assert all(state == "done" for state, *_ in got.values())
    assert got[victim][1] == 2  # the aborted one went again, on a fresh association
    assert dest.senders[0].associations == 2 and pacs.connections == 2


async def test_send_on_an_association_that_dies_unnoticed_fails_fast(pacs: ScriptedPacs) -> None:
    """The pynetdicom race behind a CI stall, made deterministic: the PACS aborts right
    after ``ensure()`` found the association alive, the reactor takes the wake-up off the
    DIMSE queue, and pynetdicom's own establishment check still passes. Without the
    watchdog the send waits the whole 60 s DIMSE timeout (or spins on the dead reactor)."""
    path = sample_file("CT_small.dcm")
    sender = DicomStoreSender(store_config(pacs.port, dimse_timeout_s=60))
    real_ensure = sender.link.ensure
    armed, killed = [False], []

    def ensure_then_die(pair: tuple[str, str]) -> Any:
        assoc = real_ensure(pair)
        if armed[0] and not killed:
            killed.append(assoc)
            for peer_side in pacs.server.active_associations:
                peer_side.abort()
            deadline = time.monotonic() + 10
            while assoc.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            while not assoc.dimse.msg_queue.empty():  # the reactor ate the wake-up
                assoc.dimse.msg_queue.get_nowait()
            assoc.is_aborted, assoc.is_established = False, True  # not yet marked
        return assoc

    sender.link.ensure = ensure_then_die  # type: ignore[method-assign]
    try:
        assert await sender.send(envelope(path)) == "0x0000"
        armed[0] = True
        async with asyncio.timeout(20):  # a third of the DIMSE timeout
            with pytest.raises(TransientError, match="no C-STORE response"):
                await sender.send(envelope(path))
        assert not killed[0].is_alive()
        assert await sender.send(envelope(path)) == "0x0000"  # on a fresh association
        assert sender.associations == 2
    finally:
        await sender.aclose()


async def test_no_response_within_dimse_timeout_is_transient(pacs: ScriptedPacs) -> None:
    path = sample_file("CT_small.dcm")
    slow = [True]

    def stall(event: Any, uid: str) -> int | None:
        if slow and slow.pop():
            time.sleep(1.5)
        return None

    pacs.hook = stall
    sender = DicomStoreSender(store_config(pacs.port, dimse_timeout_s=0.5))
    try:
        with pytest.raises(TransientError, match="no C-STORE response"):
            await sender.send(envelope(path))
        assert await sender.send(envelope(path)) == "0x0000"
        assert sender.associations == 2
    finally:
        await sender.aclose()


async def test_idle_association_is_released(pacs: ScriptedPacs) -> None:
    path = sample_file("CT_small.dcm")
    sender = DicomStoreSender(store_config(pacs.port, idle_release_s=0.2))
    try:
        await sender.send(envelope(path))
        await sender.send(envelope(path))
        await until(lambda: pacs.releases == 1, 5, "the idle association to be released")
        assert sender.link.assoc is None
        await sender.send(envelope(path))
        assert sender.associations == 2
    finally:
        await sender.aclose()
    assert pacs.releases == 2


async def test_close_aborts_a_send_the_pump_gave_up_on(pacs: ScriptedPacs) -> None:
    release = threading.Event()
    pacs.hook = lambda event, uid: (release.wait(10), None)[1]  # the PACS hangs
    sender = DicomStoreSender(store_config(pacs.port, dimse_timeout_s=30))
    task = asyncio.create_task(sender.send(envelope(sample_file("CT_small.dcm"))))
    await until(lambda: sender.link.assoc is not None, 5, "the association")
    await asyncio.sleep(0.2)
    task.cancel()  # what the pump does to a worker once its grace period is over
    started = time.monotonic()
    await sender.aclose()
    assert time.monotonic() - started < 5  # not the 30 s DIMSE timeout
    release.set()
    await until(lambda: pacs.aborts == 1, 5, "the PACS to see the abort")


async def test_non_dicom_envelope_is_permanent(pacs: ScriptedPacs) -> None:
    sender = DicomStoreSender(store_config(pacs.port))
    env = replace(envelope(sample_file("CT_small.dcm")), kind="hl7")
    try:
        with pytest.raises(PermanentError, match="not kind 'hl7'"):
            await sender.send(env)
    finally:
        await sender.aclose()


# -- against DCMTK storescp ------------------------------------------------------------


class StoreScp(Proc):
    """DCMTK storescp writing what it receives bit-preserving (``+B``) into a folder."""

    def __init__(self, folder: Path, *options: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = pick_free_port()
        self.folder = folder
        argv = ["storescp", "-v", "+B", "-aet", "PACS", "-pdu", "131072", "-od", str(folder)]
        super().__init__("storescp", [*argv, *options, str(self.port)], folder.parent / "scp.log")

    def spawn(self) -> None:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                env={**os.environ, "TCP_NODELAY": "1"},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_for(lambda: port_open(self.port), 10, f"storescp on {self.port}")

    def associations(self) -> int:
        return self.log.read_text(errors="replace").count("Association Acknowledged")

    def files(self) -> dict[str, Path]:
        return {sop_uid(p): p for p in self.folder.iterdir()}


@pytest.fixture
def storescp_factory(tmp_path: Path) -> Iterator[Callable[..., StoreScp]]:
    started: list[StoreScp] = []

    def start(*options: str) -> StoreScp:
        scp = StoreScp(tmp_path / f"scp{len(started)}" / "in", *options)
        scp.spawn()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        if scp.running():
            scp.terminate(5)


@pytest.mark.skipif(not HAVE_STORESCP, reason="DCMTK storescp not installed")
async def test_storescp_receives_the_journaled_files_byte_exact(
    tmp_path: Path, journal: Journal, storescp_factory: Callable[..., StoreScp]
) -> None:
    scp = storescp_factory("+xa")  # accept every syntax it knows
    files = make_ct_series(tmp_path / "ct", 50)
    await journal_files(journal, files)
    await deliver(journal, store_config(scp.port))
    assert scp.associations() == 1  # 50 instances, one association
    extra = [sample_file(n) for n in ("RG1_J2KR.dcm", "RG3_UNCI.dcm", "JPEG2000.dcm")]
    await journal_files(journal, extra)
    await deliver(journal, store_config(scp.port))
    got = scp.files()
    for p in [*files, *extra]:
        assert dataset_part(got[sop_uid(p)].read_bytes()) == dataset_part(p.read_bytes())
    assert all(str(c).startswith("0x0000") for *_, c in outcomes(journal).values())


@pytest.mark.skipif(not HAVE_STORESCP, reason="DCMTK storescp not installed")
async def test_storescp_without_compression_gets_decompressed_pixels(
    journal: Journal, storescp_factory: Callable[..., StoreScp]
) -> None:
    scp = storescp_factory()  # default: uncompressed transfer syntaxes only
    path = sample_file("RG1_J2KR.dcm")
    original = path.read_bytes()
    await journal_files(journal, [path])
    await deliver(journal, store_config(scp.port))
    (state, _, _, confirmation) = outcomes(journal)[sop_uid(path)]
    assert (state, confirmation) == ("done", "0x0000 decompressed from 1.2.840.10008.1.2.4.90")
    stored = scp.files()[sop_uid(path)].read_bytes()
    stored_meta = dcmread(BytesIO(stored), stop_before_pixels=True).file_meta
    assert stored_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert np.array_equal(pixels(stored), pixels(original))
    blob = next(p for p in journal.blob_dir.rglob("*") if p.is_file())
    assert blob.read_bytes() == original  # the journal keeps the original


# -- against Orthanc -------------------------------------------------------------------

orthanc_only = pytest.mark.skipif(not HAVE_ORTHANC, reason="Orthanc not installed")


@orthanc_only
async def test_orthanc_stores_the_mixed_set_as_sent(tmp_path: Path, journal: Journal) -> None:
    files = [sample_file(n) for n in MIXED_SET]
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        await journal_files(journal, files)
        await deliver(journal, store_config(orthanc.dicom_port, ae_title="ORTHANC"))
        kinds = {}
        for p in files:
            oid = orthanc.lookup(sop_uid(p))
            assert oid is not None, f"{p.name} not in Orthanc"
            kinds[p.name] = compare_stored(p.read_bytes(), orthanc.instance_file(oid))
        assert orthanc.count_instances() == len(files)
        # what reached Orthanc was in each file's own transfer syntax (nothing decoded)
        syntaxes = {uid: ts for uid, ts, _ in orthanc.received()}
    for p in files:
        assert syntaxes[sop_uid(p)] == read_file_meta_info(p).TransferSyntaxUID
    # Orthanc (DCMTK) writes sequences with explicit lengths and encapsulated pixel data
    # as OB; every other byte is as sent (compare_stored checks exactly that)
    assert kinds == {
        "CT_small.dcm": {"identical"},
        "MR_small.dcm": {"identical"},
        "JPEG2000.dcm": {"sequence lengths"},
        "RG1_J2KR.dcm": {"sequence lengths"},
        "RG3_UNCI.dcm": {"sequence lengths"},
        "emri_small_jpeg_ls_lossless.dcm": {"pixel data VR"},
        "SC_rgb_rle.dcm": {"identical"},
        "JPEG-LL.dcm": {"sequence lengths"},
        "SC_rgb_jpeg_dcmtk.dcm": {"identical"},
    }
    assert all(str(c).startswith("0x0000") for *_, c in outcomes(journal).values())


@orthanc_only
async def test_orthanc_refusing_compression_gets_decompressed_radiograph(
    tmp_path: Path, journal: Journal
) -> None:
    path = sample_file("RG1_J2KR.dcm")
    original = path.read_bytes()
    opts = {"accepted_transfer_syntaxes": UNCOMPRESSED_ONLY}
    with running_orthanc(tmp_path / "orthanc", **opts) as orthanc:
        await journal_files(journal, [path, sample_file("CT_small.dcm")])
        await deliver(journal, store_config(orthanc.dicom_port, ae_title="ORTHANC"))
        oid = orthanc.lookup(sop_uid(path))
        assert oid is not None
        stored = orthanc.instance_file(oid)
        received = {uid: ts for uid, ts, _ in orthanc.received()}
    assert received[sop_uid(path)] == "1.2.840.10008.1.2.1"
    assert np.array_equal(pixels(stored), pixels(original))
    got = outcomes(journal)
    assert got[sop_uid(path)][3] == "0x0000 decompressed from 1.2.840.10008.1.2.4.90"
    assert got[sop_uid(sample_file("CT_small.dcm"))][3] == "0x0000"
    digest = journal.reader.execute(
        "SELECT digest FROM envelopes WHERE idem_key = ?", (sop_uid(path),)
    ).fetchone()[0]
    assert digest == hashlib.sha256(original).hexdigest()  # the journal keeps the original


@orthanc_only
@pytest.mark.slow
async def test_orthanc_killed_mid_transfer_and_restarted_gets_everything_once(
    tmp_path: Path, journal: Journal
) -> None:
    files = make_ct_series(tmp_path / "ct", 100)
    uids = {sop_uid(p) for p in files}
    orthanc = Orthanc(tmp_path / "orthanc")
    orthanc.start()
    try:
        await journal_files(journal, files)
        cfg = store_config(orthanc.dicom_port, ae_title="ORTHANC", connect_timeout_s=1)
        async with pumping(journal, cfg) as dest:
            await until(lambda: len(orthanc.received()) >= 30, 30, "30 instances in Orthanc")
            orthanc.kill()  # SIGKILL: mid-transfer, no goodbye
            stopped_at = len(orthanc.received())
            await asyncio.sleep(1.0)  # the sender fails and backs off meanwhile
            assert pending(journal) > 0
            orthanc.start()
            await until(lambda: pending(journal) == 0, 60, "every delivery done")
        received = [uid for uid, _, _ in orthanc.received()]
        assert stopped_at < len(files)
        # nothing lost: Orthanc holds exactly the instances sent, each once
        assert orthanc.count_instances() == len(uids)
        assert {orthanc.instance_tags(i)["SOPInstanceUID"] for i in orthanc.instances()} == uids
        # C-STORE requests that reached Orthanc: each instance at least once; a resend
        # only for what was in flight when it died (at most the one, with one worker),
        # and Orthanc keeps the first copy of a SOP Instance UID (OverwriteInstances: false)
        assert set(received) == uids
        assert len(received) - len(uids) <= 1
        assert dest.senders[0].associations >= 2
        for p in files[::10]:
            oid = orthanc.lookup(sop_uid(p))
            assert oid is not None
            assert compare_stored(p.read_bytes(), orthanc.instance_file(oid)) == {"identical"}
    finally:
        orthanc.stop(grace_s=1.0)


@orthanc_only
async def test_gateway_route_coerces_then_stores_in_orthanc(tmp_path: Path) -> None:
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        dest = (
            f"{{id: pacs, type: dicom-store, ae_title: ORTHANC, connect: '{orthanc.endpoint}', "
            "delivery: {backoff: {initial_s: 0.05, max_s: 0.5}}}"
        )
        text = config_text(tmp_path, dest).replace(
            "  - {match: {kind: dicom}, to: [pacs]}",
            "  - {id: fix, match: {kind: dicom}, steps: [{dicom-coerce: {set: "
            "{InstitutionName: Lao Cai GH}, prefix: {PatientID: 'LC-'}}}], to: [pacs]}",
        )
        gw = Gateway(parse_config(text, registry()), registry())
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop))
        try:
            await asyncio.wait_for(gw.ready.wait(), 5)
            for name in ("CT_small.dcm", "RG1_J2KR.dcm"):
                p = sample_file(name)
                env = Envelope(kind="dicom", source="x", body=p.read_bytes(), as_file=True)
                await gw.accept(env)
            await until(lambda: orthanc.count_instances() == 2, 30, "2 instances in Orthanc")
        finally:
            stop.set()
            await task
        for oid in orthanc.instances():
            tags = orthanc.instance_tags(oid)
            assert tags["InstitutionName"] == "Lao Cai GH"
            assert tags["PatientID"].startswith("LC-")
        assert len(orthanc.received()) == 2  # the originals were not sent
