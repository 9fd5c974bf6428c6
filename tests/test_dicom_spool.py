"""Large C-STORE data sets written to disk while they arrive (``dicom.spool``).

The gateway runs in-process with its real journal; a pynetdicom SCU sends real
radiographs from pydicom-data as stored (no re-encoding), or, to stop in the middle
of a data set, raw P-DATA-TF PDUs built by pynetdicom's own encoder.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from io import BytesIO
from pathlib import Path

import pytest
from dicom_peers import eventually, file_info, running_gateway, sample_file
from pynetdicom import AE, build_context
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from dicom import spool
from gateway.journal import Journal

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
RADIOGRAPH = "RG1_UNCR.dcm"  # 7 MB CR, explicit VR little endian


@pytest.fixture
def commits(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Where each spool was committed to (a spy: the real commit runs)."""
    seen: list[Path] = []
    real = spool.Spool.commit

    def spy(self: spool.Spool, dest: Path) -> str:
        seen.append(dest)
        return real(self, dest)

    monkeypatch.setattr(spool.Spool, "commit", spy)
    return seen


def associate(port: int) -> tuple[AE, object]:
    ae = AE(ae_title="SCRIPTED")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate(
        "127.0.0.1", port, contexts=[build_context(CR_IMAGE, [EXPLICIT_LE])], ae_title="MEDGW"
    )
    assert assoc.is_established
    return ae, assoc


def send(port: int, path: Path) -> int:
    _, assoc = associate(port)
    try:
        return int(assoc.send_c_store(path).Status)  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]


def spool_files(state: Path) -> list[Path]:
    folder = state / "blobs" / "spool"
    return sorted(folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("spool_from_kb", [1024, 0], ids=["spooled", "in-memory"])
async def test_a_radiograph_is_journaled_byte_exact_either_way(
    tmp_path: Path, chunked_send: None, commits: list[Path], spool_from_kb: int
) -> None:
    source = sample_file(RADIOGRAPH)
    async with running_gateway(tmp_path, f", spool_from_kb: {spool_from_kb}") as gw:
        assert await asyncio.to_thread(send, gw.port, source) == 0x0000
        ((blob, digest, size),) = gw.query("SELECT blob, digest, size FROM envelopes")
        stored = (gw.state / "blobs" / blob).read_bytes()
        await eventually(lambda: len(gw.outbox_files()) == 1, what="the instance delivered")
        leftovers = spool_files(gw.state)
    assert (
        stored[file_info(gw.outbox_files()[0]).dataset_offset :] == file_info(source).dataset_bytes
    )
    assert gw.outbox_files()[0].read_bytes() == stored
    assert size == len(stored)
    assert digest == hashlib.sha256(stored).hexdigest(), "the spool's running hash"
    assert commits == ([gw.state / "blobs" / blob] if spool_from_kb else [])
    assert leftovers == []


async def test_an_association_aborted_mid_data_set_leaves_no_spool_file(tmp_path: Path) -> None:
    source = sample_file(RADIOGRAPH)
    body = file_info(source).dataset_bytes
    async with running_gateway(tmp_path) as gw:

        def start_then_abort() -> list[Path]:
            _ae, assoc = associate(gw.port)
            context_id = assoc.accepted_contexts[0].context_id  # type: ignore[attr-defined]
            request = C_STORE()
            request.MessageID = 1
            request.AffectedSOPClassUID = CR_IMAGE
            request.AffectedSOPInstanceUID = file_info(source).sop_instance
            request.Priority = 2
            request.DataSet = BytesIO(body)
            message = C_STORE_RQ()
            message.primitive_to_message(request)
            sock = assoc.dul.socket.socket  # type: ignore[attr-defined]
            for sent, primitive in enumerate(message.encode_msg(context_id, 256 * 1024), 1):
                pdu = P_DATA_TF()
                pdu.from_primitive(primitive)
                sock.sendall(pdu.encode())
                if sent == 12:  # the command set, then 11 fragments: 2.75 MB of 7
                    break
            seen = spool_files_eventually(gw.state)
            sock.shutdown(socket.SHUT_RDWR)
            assoc.abort()  # type: ignore[attr-defined]
            return seen

        seen = await asyncio.to_thread(start_then_abort)
        session = (await eventually(gw.sessions, what="the aborted session"))[0]
        await eventually(lambda: spool_files(gw.state) == [], what="the spool file removed")
        assert gw.count("envelopes") == 0
    assert len(seen) == 1 and seen[0].name.endswith(".tmp"), "it was being spooled"
    assert session["aborted"] is True
    assert session["files"] == 0


def spool_files_eventually(state: Path) -> list[Path]:
    deadline = time.monotonic() + 10
    while not (files := spool_files(state)):
        assert time.monotonic() < deadline, "no spool file appeared"
        time.sleep(0.02)
    return files


async def test_a_spool_that_cannot_be_written_falls_back_to_the_handler(
    tmp_path: Path, chunked_send: None, commits: list[Path]
) -> None:
    source = sample_file(RADIOGRAPH)
    async with running_gateway(tmp_path) as gw:
        folder = gw.state / "blobs" / "spool"
        folder.rmdir()
        folder.write_bytes(b"")  # a file where the folder was: every spool open fails
        assert await asyncio.to_thread(send, gw.port, source) == 0x0000
        ((blob,),) = gw.query("SELECT blob FROM envelopes")
        stored = (gw.state / "blobs" / blob).read_bytes()
    assert stored.endswith(file_info(source).dataset_bytes)
    assert commits == []


def test_spool_files_left_by_a_crash_are_removed_at_start(tmp_path: Path) -> None:
    journal = Journal(tmp_path).open()
    left = journal.spool_dir / ".0123abcd.tmp"
    journal.close()
    left.parent.mkdir(parents=True, exist_ok=True)
    left.write_bytes(b"half a radiograph")
    Journal(tmp_path).open().close()
    assert not left.exists()
