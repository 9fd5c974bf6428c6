"""Fuzz: hypothesis-driven bad input on every listener; no crash, no hang, no lost message.

One real gateway per listener kind runs in a background thread (``fuzz_support``)
with a folder outbox; the tests talk to it over raw loopback sockets with framing
written in the test. After every fuzzed input:

* the service is still running and has logged no traceback (no crash);
* every socket read has a timeout and every test a ``pytest.mark.timeout`` (no hang);
* a valid message from a real capture (or a real DICOM file, or a real scan) sent
  next is acknowledged and reaches the outbox byte-exact (no lost valid message).

Config files are fuzzed through ``parse_config`` and ``medgw check-config``: a broken
file is a :class:`ConfigError` naming where the problem is, never another exception.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import os
import re
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from fuzz_support import (
    ACK,
    CR,
    ENQ,
    EOT,
    ETB,
    ETX,
    FS,
    NAK,
    STX,
    VT,
    GatewayThread,
    MllpReplies,
    associate_rq,
    astm_frame,
    astm_session,
    astm_texts,
    connect,
    folder_bodies,
    free_port,
    mllp,
    msa,
    pdu,
    pdu_item,
    read_some,
    send_quietly,
    wait_until,
)
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, build_context
from pynetdicom.association import Association

from gateway.cli import main as medgw
from gateway.config import GatewayConfig, parse_config
from gateway.errors import ConfigError
from gateway.registry import default_registry

SAMPLES = Path("/work/shared/samples")  # real captures and films (not in the repository)


@functools.cache
def sample(name: str) -> bytes:
    """A file of the shared samples; the test is skipped where they are absent."""
    path = SAMPLES / name
    if not path.is_file():
        pytest.skip(f"sample {path} not available")
    return path.read_bytes()


EXPLORE = int(os.environ.get("MEDGW_FUZZ_EXPLORE", "0"))  # N: N times the examples, new ones


def fuzz(examples: int) -> settings:
    """Hypothesis settings for a test that talks to a running gateway.

    The test command runs the same examples every time (``derandomize``: CI fails only
    for a change in the code, never for a newly drawn input); ``MEDGW_FUZZ_EXPLORE=10``
    draws new ones, ten times as many, to hunt for bugs.
    """
    if EXPLORE:
        return settings(
            max_examples=examples * EXPLORE,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def config(state: Path, listener: str, outbox: Path, route: str) -> str:
    return (
        "site: {id: fuzz-site}\n"
        f"state_dir: {state}\n"
        "http: {listen: null}\n"
        "journal: {min_free_mb: 0}\n"
        "listeners:\n"
        f"  - {listener}\n"
        "destinations:\n"
        f"  - {{id: outbox, type: folder, path: {outbox}}}\n"
        "routes:\n"
        f"  - {{match: {route}, to: [outbox]}}\n"
    )


@dataclass
class Bench:
    gw: GatewayThread
    port: int
    outbox: Path


# == HL7 over MLLP ==========================================================================

MLLP_MAX = 16_384  # the listener's max_message_bytes: oversize blocks are cheap to make
BA400_ID = b"f7c9b548-0a48-49c2-9223-9f488efbfdeb"  # MSH-10 of the BA400 capture


def valid_hl7() -> tuple[bytes, bytes]:
    """The real BA400 OUL^R22 with a control id (MSH-10) of its own: (id, message)."""
    ba400 = sample("lab/11_hl7_biosystems_ba400_oul_r22.mllp")[1:].split(FS)[0]
    assert ba400.startswith(b"MSH|") and ba400.count(BA400_ID) == 1
    control_id = str(uuid.uuid4()).encode()
    return control_id, ba400.replace(BA400_ID, control_id)


@pytest.fixture(scope="module")
def mllp_bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    valid_hl7()  # skips here where the sample is absent
    tmp = tmp_path_factory.mktemp("mllp")
    port = free_port()
    listener = (
        f"{{id: his, type: hl7-mllp, listen: 127.0.0.1:{port}, max_message_bytes: {MLLP_MAX}}}"
    )
    text = config(tmp / "state", listener, tmp / "outbox", "{source: his}")
    with GatewayThread(text, tmp / "gateway.yaml") as gw:
        yield Bench(gw, port, tmp / "outbox")


HL7_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x0b\x1c"), max_size=200
)


@st.composite
def bad_msh(draw: st.DrawFn) -> bytes:
    """An MSH whose separators, fields or character set are wrong in some way."""
    fields = [
        "MSH",
        draw(st.sampled_from(["^~\\&", "", "^", "^^^^", "\x00~\\&", "^~\\&#"])),
        *draw(st.lists(HL7_TEXT, max_size=18)),
    ]
    sep = draw(st.sampled_from(["|", "", "^", "\r", "\n"]))
    head = sep.join(fields).encode("utf-8", "surrogatepass")
    tail = draw(st.binary(max_size=100))
    return head + b"\r" + tail


@st.composite
def broken_encoding(draw: st.DrawFn) -> bytes:
    """A real message whose bytes do not fit its MSH-18 (or name a charset that is none)."""
    _, message = valid_hl7()
    charset = draw(st.sampled_from([b"UNICODE UTF-8", b"KLINGON", b"8859/1", b"", b"UTF-16"]))
    message = message.replace(b"UNICODE UTF-8", charset, 1)
    junk = draw(st.binary(min_size=1, max_size=20).filter(lambda b: VT not in b and FS not in b))
    at = draw(st.integers(0, len(message)))
    return message[:at] + junk + message[at:]


# pieces of an MLLP stream: ("valid", id, bytes) must be taken; the rest may not be
MLLP_PIECES = st.one_of(
    st.binary(max_size=300).map(lambda b: ("junk", b"", b)),
    st.binary(max_size=300).map(lambda b: ("framed-junk", b"", mllp(b))),
    bad_msh().map(lambda b: ("bad-msh", b"", mllp(b))),
    broken_encoding().map(lambda b: ("bad-encoding", b"", mllp(b))),
    st.integers(1, 400).map(lambda n: ("truncated", b"", VT + valid_hl7()[1][:n])),
    st.integers(MLLP_MAX + 1, 3 * MLLP_MAX).map(
        lambda n: ("oversize", b"", mllp(valid_hl7()[1] + b"NTE|1||" + b"x" * n + CR))
    ),
    st.sampled_from([VT, FS, CR, FS + CR, VT + FS, b"\n", b"\r\n"]).map(lambda b: ("ctl", b"", b)),
    st.builds(valid_hl7).map(lambda v: ("valid", v[0], mllp(v[1]))),
)


@pytest.mark.timeout(120)
@fuzz(60)
@given(
    pieces=st.lists(MLLP_PIECES, min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 1 << 16), max_size=6),
    hang_up=st.booleans(),
)
# found in CI: '^' as the field separator (and NUL as the component one) is answered in
# kind, so the ACK's segments are split on the reply's own MSH-1
@example(pieces=[("bad-msh", b"", mllp(b"MSH^\x00~\\&^^^^^^^0^0^^0\r"))], cuts=[], hang_up=False)
def test_mllp_listener_survives_bad_streams_and_takes_every_valid_frame(
    mllp_bench: Bench,
    pieces: list[tuple[str, bytes, bytes]],
    cuts: list[int],
    hang_up: bool,
) -> None:
    """A stream of junk, broken frames and valid frames, written in random pieces.

    VT always opens a new block (HL7 v2.5.1 Appendix C; what was open is reported
    truncated), so a valid frame is received whole whatever came before it: each
    must be answered AA, in order, and reach the outbox byte-exact. Invalid
    blocks get AE/AR; junk gets nothing. With ``hang_up`` the client hangs up
    without reading, and a new connection must be served as if nothing happened.
    """
    b = mllp_bench
    stream = b"".join(data for _, _, data in pieces)
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    sentinel_id, sentinel = valid_hl7()
    valid = [(cid, data[1:-2]) for kind, cid, data in pieces if kind == "valid"]
    with contextlib.closing(connect(b.port)) as sock:
        for start, end in itertools.pairwise(bounds):
            assert send_quietly(sock, stream[start:end]), "the gateway closed the connection"
        if hang_up:
            sock.shutdown(socket.SHUT_RDWR)
            valid = []  # no ACK was read: the sender would send them again
        else:
            assert send_quietly(sock, mllp(sentinel))
            replies = MllpReplies(sock)
            acks: list[tuple[bytes, bytes]] = []
            while not acks or acks[-1][1] != sentinel_id:
                reply = replies.next()
                assert reply is not None, f"closed after {acks}; stream {stream[:200]!r}"
                acks.append(msa(reply))
            assert all(code in (b"AA", b"AE", b"AR") for code, _ in acks), acks
            taken = [cid for code, cid in acks if code == b"AA"]
            ids = [cid for cid, _ in valid]
            assert [cid for cid in taken if cid in ids] == ids, (acks, ids)
    if hang_up:  # a fresh connection after the hang-up
        with contextlib.closing(connect(b.port)) as sock:
            assert send_quietly(sock, mllp(sentinel))
            reply = MllpReplies(sock).next()
            assert reply is not None, "a new connection after a hang-up was closed unanswered"
            assert msa(reply) == (b"AA", sentinel_id)
    wanted = {msg for _, msg in valid} | {sentinel}
    wait_until(lambda: wanted <= folder_bodies(b.outbox, "hl7"), "the valid messages in the outbox")
    b.gw.assert_healthy()


# == ASTM E1381/E1394 over TCP ===============================================================

E411_SAMPLE = b"000000-00-0001"  # the specimen id (O-3) of the e411 capture, 14 characters


def valid_astm() -> bytes:
    """The real cobas e411 message for a tube of its own (its results are new to the journal)."""
    e411 = astm_texts(sample("lab/07_astm_roche_cobas_e411_session.bin"))
    assert e411.startswith(b"H|\\^&|") and e411.count(E411_SAMPLE) == 1
    return e411.replace(E411_SAMPLE, uuid.uuid4().hex[:14].upper().encode())


@pytest.fixture(scope="module")
def astm_bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    valid_astm()  # skips here where the sample is absent
    tmp = tmp_path_factory.mktemp("astm")
    port = free_port()
    listener = (
        "{id: e411, type: astm, profile: roche-cobas-e411, orders: none, "
        f"transport: {{tcp_listen: '127.0.0.1:{port}', max_connections: 16}}}}"
    )
    text = config(tmp / "state", listener, tmp / "outbox", "{kind: lab-result}")
    with GatewayThread(text, tmp / "gateway.yaml") as gw:
        yield Bench(gw, port, tmp / "outbox")


CONTROLS = [bytes([c]) for c in (STX, ETX, EOT, ENQ, ACK, NAK, ETB, 0x0D, 0x0A)]


@st.composite
def corrupted_frame(draw: st.DrawFn) -> bytes:
    """A frame of the real message with a wrong checksum, frame number, or cut short."""
    text = valid_astm()[: draw(st.integers(1, 240))]
    number = draw(st.integers(0, 9))
    frame = astm_frame(number, text, last=draw(st.booleans()))
    how = draw(st.sampled_from(["checksum", "number", "truncated", "no-crlf", "lowercase"]))
    if how == "checksum":
        bad = draw(st.binary(min_size=2, max_size=2).filter(lambda c: c != frame[-4:-2]))
        return frame[:-4] + bad + b"\r\n"
    if how == "number":
        return frame[:1] + draw(st.sampled_from([b"8", b"9", b"A", b" ", b"\x02"])) + frame[2:]
    if how == "truncated":
        return frame[: draw(st.integers(1, len(frame) - 1))]
    if how == "no-crlf":
        return frame[:-2]
    return frame[:-4] + frame[-4:-2].lower() + b"\r\n"


@st.composite
def fuzzed_message(draw: st.DrawFn) -> bytes:
    """A whole transfer (ENQ, well-formed frames, EOT) of records that are not a valid
    message: the real one with bytes changed, cut, or records made up."""
    how = draw(st.sampled_from(["mutate", "cut", "records"]))
    text = valid_astm()
    if how == "mutate":
        for _ in range(draw(st.integers(1, 6))):
            at = draw(st.integers(0, len(text) - 1))
            text = text[:at] + draw(st.binary(min_size=1, max_size=3)) + text[at + 1 :]
    elif how == "cut":
        text = text[: draw(st.integers(1, len(text) - 1))]
    else:
        record = st.builds(
            lambda t, f: t + b"|" + b"|".join(f) + b"\r",
            st.sampled_from([b"H", b"P", b"O", b"R", b"C", b"M", b"Q", b"L", b"X", b""]),
            st.lists(st.binary(max_size=20), max_size=12),
        )
        delimiters = draw(st.sampled_from([b"\\^&", b"^^&", b"", b"\\^&|||", b"@^\\"]))
        text = b"H|" + delimiters + b"|\r" + b"".join(draw(st.lists(record, max_size=8)))
    frames = [
        astm_frame(n, text[i : i + 240], last=i + 240 >= len(text))
        for n, i in enumerate(range(0, len(text), 240), start=1)
    ]
    return bytes([ENQ]) + b"".join(frames) + bytes([EOT])


ASTM_PIECES = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from(CONTROLS), min_size=1, max_size=10).map(b"".join),
    corrupted_frame(),
    fuzzed_message(),
    st.binary(max_size=240).map(lambda t: astm_frame(1, t, last=True)),  # any text, good sum
)


@pytest.mark.timeout(180)
@fuzz(40)
@given(
    pieces=st.lists(ASTM_PIECES, min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 1 << 16), max_size=4),
    same_line=st.booleans(),
)
def test_astm_listener_survives_bad_links_and_takes_the_next_valid_session(
    astm_bench: Bench, pieces: list[bytes], cuts: list[int], same_line: bool
) -> None:
    """Random ENQ/frame/EOT sequences, corrupt checksums, wrong frame numbers, control
    bytes, truncated frames and made-up records, written in random pieces without
    waiting for answers; then a valid E1381 session of the real capture, on the same
    line after an EOT (``same_line``) or on a new connection, must be ACKed frame by
    frame and its message reach the outbox byte-exact."""
    b = astm_bench
    stream = b"".join(pieces)
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    message = valid_astm()
    with contextlib.closing(connect(b.port)) as sock:
        for start, end in itertools.pairwise(bounds):
            assert send_quietly(sock, stream[start:end]), "the gateway closed the line"
        if same_line:  # E1381: EOT ends any transfer and returns the line to neutral
            assert send_quietly(sock, bytes([EOT]))
            read_some(sock, quiet_s=0.5)  # the answers to the junk, thrown away
            astm_session(sock, message)
    if not same_line:
        with contextlib.closing(connect(b.port)) as sock:
            astm_session(sock, message)
    wait_until(lambda: message in folder_bodies(b.outbox, "astm"), "the valid message")
    b.gw.assert_healthy()


# == DICOM upper layer (PS3.8) ===============================================================

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
REPLY_PDU_TYPES = {0x02, 0x03, 0x04, 0x06, 0x07}  # AC, RJ, P-DATA, RELEASE-RP, ABORT
# pynetdicom 3.0 (its own bugs, reported with this test file; see the xfail tests below):
EVEN_CONTEXT_ID = "'context_id' must be an odd integer"  # the reactor dies, the slot is held
# the association thread dies with a traceback on stderr, the peer gets no answer; the
# gateway goes on (no slot is held): tolerated here, each pinned by an xfail test below
HARMLESS_THREAD_DEATHS = (
    "Invalid event 'Evt7' for the current state 'Sta13'",  # P-DATA before our A-ASSOCIATE-AC
)


@pytest.fixture(scope="module")
def dicom_bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    tmp = tmp_path_factory.mktemp("dicom")
    port = free_port()
    listener = (
        f"{{id: modalities, type: dicom-scp, ae_title: MEDGW, listen: 127.0.0.1:{port}, "
        "study_quiet_s: null, acse_timeout_s: 0.5, network_timeout_s: 10, drain_timeout_s: 2}"
    )
    text = config(tmp / "state", listener, tmp / "outbox", "{kind: dicom}")
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # the SCU sends the file's bytes, undecoded
    try:
        with GatewayThread(text, tmp / "gateway.yaml") as gw:
            gw.tolerated = HARMLESS_THREAD_DEATHS
            yield Bench(gw, port, tmp / "outbox")
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def dataset_part(data: bytes) -> bytes:
    """A Part-10 file's data set bytes: after the preamble, DICM and the group 2
    elements (always explicit VR little endian, PS3.10 7.1)."""
    assert data[128:132] == b"DICM", "not a Part-10 file"
    pos = 132
    while pos + 8 <= len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            pos += 12 + struct.unpack_from("<L", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
    return data[pos:]


def store_real_file(port: int, folder: Path) -> tuple[int, bytes]:
    """pynetdicom as the modality: CT_small.dcm as a new instance, C-STORE over a real
    association; (status, the data set bytes sent)."""
    ds = dcmread(CT_SMALL)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    ae = AE(ae_title="FUZZ-SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate(
        "127.0.0.1", port, contexts=[build_context(CT_IMAGE, [EXPLICIT_LE])], ae_title="MEDGW"
    )
    assert assoc.is_established, "the real association was not established"
    try:
        rsp = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert "Status" in rsp, f"no C-STORE response: {rsp}"
    return int(rsp.Status), dataset_part(path.read_bytes())


AE_BYTES = st.binary(max_size=20)
UID_BYTES = st.one_of(
    st.sampled_from([b"1.2.840.10008.1.1", b"1.2.840.10008.5.1.4.1.1.2", b"1.2.840.10008.1.2"]),
    st.binary(max_size=80),
)


@st.composite
def fuzzed_associate_rq(draw: st.DrawFn) -> bytes:
    """An A-ASSOCIATE-RQ with fields, items, the PDU length or the end made wrong."""
    body = associate_rq(
        called=draw(st.one_of(st.just(b"MEDGW"), AE_BYTES)),
        calling=draw(st.one_of(st.just(b"FUZZ"), AE_BYTES)),
        version=draw(st.sampled_from([1, 0, 2, 0xFFFF])),
        context=draw(st.one_of(st.just(b"1.2.840.10008.3.1.1.1"), UID_BYTES)),
        abstract=draw(UID_BYTES),
        transfer=draw(UID_BYTES),
        # odd only: an even id kills pynetdicom's reactor (see the xfail test below)
        context_id=draw(st.integers(0, 127)) * 2 + 1,
        max_length=draw(st.sampled_from([0, 1, 16384, 0xFFFFFFFF])),
        extra_items=b"".join(
            draw(
                st.lists(
                    st.builds(pdu_item, st.integers(0, 255), st.binary(max_size=40)), max_size=3
                )
            )
        ),
    )
    if draw(st.booleans()):  # a byte changed somewhere (item lengths, reserved fields, ...)
        at = draw(st.integers(0, len(body) - 1))
        if body[at - 4 : at] != b"\x20\x00" + body[at - 2 : at]:  # not the context id
            body = body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1 :]
    length = draw(st.one_of(st.none(), st.integers(0, 0xFFFFFFFF)))
    whole = pdu(0x01, body, length)
    return whole[: draw(st.integers(1, len(whole)))] if draw(st.booleans()) else whole


DICOM_PIECES = st.one_of(
    st.binary(max_size=300),
    fuzzed_associate_rq(),
    st.builds(
        pdu,
        st.integers(0, 255),
        st.binary(max_size=200),
        st.one_of(st.none(), st.integers(0, 0xFFFFFFFF)),
    ),
    # after a good association request: P-DATA with junk, release, abort, or junk
    st.builds(
        lambda junk: pdu(0x01, associate_rq()) + junk,
        st.one_of(
            st.binary(max_size=200).map(lambda b: pdu(0x04, b)),
            st.builds(
                lambda pc_id, flags, b: pdu(
                    0x04, struct.pack(">LBB", len(b) + 2, pc_id, flags) + b
                ),
                st.integers(0, 255),
                st.integers(0, 255),
                st.binary(max_size=200),
            ),
            st.sampled_from([pdu(0x05, bytes(4)), pdu(0x07, bytes(4)), pdu(0x06, bytes(4))]),
            st.binary(max_size=200),
        ),
    ),
)


def associations() -> set[threading.Thread]:
    """pynetdicom's association threads alive in this process (the SCP's and ours)."""
    return {t for t in threading.enumerate() if isinstance(t, Association) and t.is_alive()}


@contextlib.contextmanager
def small_scp(tmp_path: Path, settings_yaml: str) -> Iterator[Bench]:
    """A gateway of its own with a dicom-scp listener (for the xfail tests' limits)."""
    port = free_port()
    listener = (
        f"{{id: modalities, type: dicom-scp, ae_title: MEDGW, listen: 127.0.0.1:{port}, "
        f"study_quiet_s: null, drain_timeout_s: 1, {settings_yaml}}}"
    )
    text = config(tmp_path / "state", listener, tmp_path / "outbox", "{kind: dicom}")
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        with GatewayThread(text, tmp_path / "gateway.yaml") as gw:
            yield Bench(gw, port, tmp_path / "outbox")
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


@pytest.mark.timeout(60)
def test_connections_closed_before_a_pdu_do_not_hold_association_slots(tmp_path: Path) -> None:
    with small_scp(tmp_path, "maximum_associations: 2, acse_timeout_s: 10") as b:
        for _ in range(3):
            connect(b.port).close()
        time.sleep(0.5)
        status, _ = store_real_file(b.port, tmp_path)  # "association not established"
        assert status == 0x0000


@pytest.mark.timeout(60)
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="pynetdicom 3.0: an A-ASSOCIATE-RQ whose presentation context id is even is now "
    "answered with an A-ABORT (dicom.net checks the request as it is decoded; before, the "
    "reactor thread died and the slot was held until network_timeout_s), but the acceptor "
    "still waits acse_timeout_s for the request that never reaches it, holding the slot",
)
def test_even_presentation_context_id_is_answered_and_holds_no_slot(tmp_path: Path) -> None:
    with small_scp(tmp_path, "maximum_associations: 2, network_timeout_s: 10") as b:
        answers = []
        for _ in range(3):
            with contextlib.closing(connect(b.port)) as sock:
                sock.sendall(pdu(0x01, associate_rq(context_id=2)))
                answers.append(read_some(sock, quiet_s=0.5))
        b.gw.tolerated = (EVEN_CONTEXT_ID,)  # what the assertions below show, said plainly
        status, _ = store_real_file(b.port, tmp_path)
        assert status == 0x0000
        assert all(a[:1] in (b"\x02", b"\x03", b"\x07") for a in answers), answers


@pytest.mark.timeout(60)
def test_empty_transfer_syntax_is_answered(tmp_path: Path) -> None:
    with small_scp(tmp_path, "acse_timeout_s: 2") as b:
        with contextlib.closing(connect(b.port)) as sock:
            sock.sendall(pdu(0x01, associate_rq(transfer=b"")))
            answer = read_some(sock, quiet_s=1.0)
        assert answer[:1] in (b"\x02", b"\x03", b"\x07"), answer
        b.gw.assert_healthy()


@pytest.mark.timeout(60)
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="pynetdicom 3.0 race: a P-DATA-TF that arrives before the SCP has answered the "
    "A-ASSOCIATE-RQ aborts the DUL (Sta13), then the acceptor's A-ASSOCIATE-AC is an "
    "invalid event (InvalidEventError Evt7/Sta13) that kills the reactor thread; more "
    "than half of the tries hit it, so 40 tries all but always do",
)
def test_pdata_before_the_associate_ac_kills_no_thread(tmp_path: Path) -> None:
    with small_scp(tmp_path, "acse_timeout_s: 2") as b:
        for _ in range(40):
            with contextlib.closing(connect(b.port)) as sock:
                sock.sendall(pdu(0x01, associate_rq()) + pdu(0x04, b"\xe2\x1a\x12"))
                read_some(sock, quiet_s=0.2)
        time.sleep(0.5)
        b.gw.assert_healthy()


@pytest.mark.timeout(180)
@fuzz(50)
@given(pieces=st.lists(DICOM_PIECES, min_size=1, max_size=3))
def test_dicom_scp_survives_bad_pdus_and_stores_the_next_real_file(
    dicom_bench: Bench, tmp_path: Path, pieces: list[bytes]
) -> None:
    """Raw bytes to the SCP port: random PDU types and lengths, A-ASSOCIATE-RQs with
    fuzzed AE titles, UIDs, items, lengths and truncations, junk after an accepted
    association. Whatever the SCP answers is a PDU an SCU may get (AC, RJ, ABORT...);
    once the peer has closed, the SCP lets go of the association within the ACSE
    timeout (0.5 s here; it holds one of ``maximum_associations`` until then: see the
    xfail test below); then a real association storing a real file gets 0x0000 and
    the outbox holds the data set byte-exact."""
    b = dicom_bench
    before = associations()
    errors = len(b.gw.thread_errors)
    with contextlib.closing(connect(b.port)) as sock:
        for piece in pieces:
            if not send_quietly(sock, piece):
                break
        answer = read_some(sock, quiet_s=0.2, limit_s=3.0)
    if answer:
        assert answer[0] in REPLY_PDU_TYPES, f"answered {answer[:16]!r} to {pieces!r}"
    new_errors = b.gw.thread_errors[errors:]
    # the known pynetdicom bug (xfail test below) is not this test's to find again
    assume(not any(EVEN_CONTEXT_ID in e for e in new_errors))
    wait_until(
        lambda: not associations() - before, "the SCP to end the association the peer closed", 4
    )
    status, dataset = store_real_file(b.port, tmp_path)
    assert status == 0x0000, f"C-STORE status {status:#06x} after {pieces!r}"
    wait_until(
        lambda: dataset in {dataset_part(f) for f in folder_bodies(b.outbox, "dcm")},
        "the real file in the outbox",
    )
    b.gw.assert_healthy()


# == film and ECG drop folders ===============================================================

CXR = "cxr/00000075_000.png"  # a real chest film (NIH ChestX-ray14), 8-bit gray


def image_bytes(array: np.ndarray, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **params)
    return out.getvalue()


ECG_PAGE = image_bytes(
    np.where(np.add.outer(np.arange(850) % 20 == 0, np.arange(1100) % 20 == 0), 200, 255)
    .astype(np.uint8)[..., None]
    .repeat(3, axis=2),
    "PNG",
)
GRADIENT = (np.add.outer(np.arange(48), np.arange(64)) * 2).astype(np.uint8)
SMALL = {
    "png": image_bytes(GRADIENT, "PNG"),
    "jpeg": image_bytes(GRADIENT, "JPEG", quality=80),
    "tiff": image_bytes(GRADIENT, "TIFF"),
}


def odd_images() -> list[bytes]:
    """Real image files of the kinds a film importer refuses or must take care with."""
    pages, cmyk = io.BytesIO(), io.BytesIO()
    Image.new("L", (8, 8)).save(
        pages, "TIFF", save_all=True, append_images=[Image.new("L", (8, 8))]
    )
    Image.new("CMYK", (8, 8), (10, 20, 30, 40)).save(cmyk, "JPEG")
    bomb = bytearray(SMALL["png"])  # its IHDR claims 60000 x 60000 (3.6 gigapixels)
    bomb[16:24] = struct.pack(">LL", 60_000, 60_000)
    bomb[29:33] = struct.pack(">L", zlib.crc32(bytes(bomb[12:29])))
    return [
        image_bytes(np.zeros((8, 8), dtype=bool), "PNG"),  # 1-bit
        image_bytes(np.zeros((8, 8), dtype=np.float32), "TIFF"),  # 32-bit float
        image_bytes(np.zeros((1, 1), dtype=np.uint8), "PNG"),  # one pixel
        image_bytes(np.zeros((8, 8, 4), dtype=np.uint8), "PNG"),  # transparent RGBA
        image_bytes(np.zeros((8, 8, 2), dtype=np.uint8), "PNG"),  # LA
        pages.getvalue(),  # two pages
        cmyk.getvalue(),
        bytes(bomb),
        Image.new("CMYK", (8, 8)).tobytes(),  # raw pixels, no format
        image_bytes(np.zeros((8, 8, 3), dtype=np.uint8), "GIF"),
        image_bytes(np.zeros((8, 8, 3), dtype=np.uint8), "BMP"),
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n",
    ]


ODD_IMAGES = odd_images()


@st.composite
def scan_content(draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["random", "truncated", "mutated", "odd", "empty-ish"]))
    if how == "random":
        return draw(st.binary(min_size=1, max_size=2000))
    if how == "odd":
        return draw(st.sampled_from(ODD_IMAGES))
    if how == "empty-ish":
        return draw(
            st.sampled_from([b"\x00", b"\n", b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"II*\x00"])
        )
    data = SMALL[draw(st.sampled_from(sorted(SMALL)))]
    if how == "truncated":
        return data[: draw(st.integers(1, len(data) - 1))]
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    return data


SIDECARS = st.one_of(
    st.none(),
    st.just(b""),
    st.binary(max_size=60),
    st.builds(
        lambda d: json.dumps(d).encode(),
        st.one_of(
            st.dictionaries(
                st.sampled_from(["accession", "patient_id", "other"]),
                st.one_of(st.text(max_size=20), st.integers(), st.none(), st.lists(st.integers())),
            ),
            st.lists(st.integers(), max_size=3),
            st.text(max_size=10),
        ),
    ),
)
EXTENSIONS = [".png", ".PNG", ".jpg", ".jpeg", ".tif", ".tiff", ".pdf", ".txt", "", ".bin"]
# mostly names the pattern {accession}_{n}.* matches (so the file is read), some not
SCAN_NAMES = st.one_of(
    st.builds(lambda n, ext: f"_{n}{ext}", st.integers(0, 99), st.sampled_from(EXTENSIONS)),
    st.builds(lambda n, ext: f"_{n}{ext}", st.integers(0, 99), st.sampled_from(EXTENSIONS)),
    st.builds(
        lambda stem, ext: f" {stem}{ext}",
        st.text(
            alphabet=st.characters(categories=["L", "N"], include_characters=" _-.()+ễ"),
            max_size=16,
        ),
        st.sampled_from(EXTENSIONS),
    ),
)


@pytest.fixture(scope="module")
def scan_bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    sample(CXR)  # skips here where the sample is absent
    tmp = tmp_path_factory.mktemp("scans")
    common = "poll_s: 0.05, stable_s: 0.1, rematch_s: 3600, match: [sidecar, filename]"
    listeners = (
        f"{{id: film, type: film-folder, path: {tmp / 'film'}, dpi: 150, {common}}}\n"
        f"  - {{id: ecg, type: ecg-folder, path: {tmp / 'ecg'}, dpi: 100, {common}}}"
    )
    text = config(tmp / "state", listeners, tmp / "outbox", "{kind: dicom}")
    with GatewayThread(text, tmp / "gateway.yaml") as gw:
        yield Bench(gw, 0, tmp / "outbox")


def delivered_accessions(outbox: Path) -> dict[str, bytes]:
    """AccessionNumber -> PixelData of each delivered DICOM object."""
    out = {}
    for data in folder_bodies(outbox, "dcm"):
        ds = dcmread(io.BytesIO(data))
        out[str(ds.AccessionNumber)] = bytes(ds.PixelData) if "PixelData" in ds else b""
    return out


def left_the_drop_folder(folder: Path, name: str) -> bool:
    """Taken: moved to done/, or set aside in failed/ or unmatched/ with a reason."""
    if (folder / name).exists():
        return False
    for sub in ("failed", "unmatched"):
        if (folder / sub / name).exists():
            return (folder / sub / f"{name}.reason.txt").exists()
    return (folder / "done" / name).exists()


@pytest.mark.timeout(240)
@fuzz(25)
@given(
    drops=st.lists(
        st.tuples(st.sampled_from(["film", "ecg"]), SCAN_NAMES, scan_content(), SIDECARS),
        min_size=1,
        max_size=3,
    )
)
def test_drop_folders_set_bad_files_aside_and_take_the_next_real_scan(
    scan_bench: Bench, drops: list[tuple[str, str, bytes, bytes | None]]
) -> None:
    """Random bytes, cut and bit-flipped PNG/JPEG/TIFF, refused image kinds (1-bit, float,
    CMYK, multi-page, a decompression bomb, GIF, BMP, PDF), odd names and extensions,
    broken ``.ready`` sidecars: each file leaves the drop folder (done/, or failed/ or
    unmatched/ with a reason beside it); then a real chest film and an ECG page dropped
    after are both digitized and delivered, the film's pixels exactly those of the PNG."""
    b = scan_bench
    root = b.outbox.parent
    names = []
    for folder, tail, data, ready in drops:
        name = f"FZ{uuid.uuid4().hex[:8]}{tail}"
        (root / folder / name).write_bytes(data)
        if ready is not None:
            (root / folder / f"{name}.ready").write_bytes(ready)
        names.append((folder, name))
    film_acc, ecg_acc = f"F{uuid.uuid4().hex[:10]}", f"E{uuid.uuid4().hex[:10]}"
    (root / "film" / f"{film_acc}_1.png").write_bytes(sample(CXR))
    (root / "ecg" / f"{ecg_acc}_1.png").write_bytes(ECG_PAGE)
    wait_until(
        lambda: all(left_the_drop_folder(root / f, n) for f, n in names),
        f"{names} to leave the drop folders",
        15,
    )
    wait_until(
        lambda: {film_acc, ecg_acc} <= delivered_accessions(b.outbox).keys(),
        "the real film and ECG page delivered",
        15,
    )
    pixels = np.asarray(Image.open(io.BytesIO(sample(CXR)))).tobytes()
    assert delivered_accessions(b.outbox)[film_acc] == pixels
    for folder, acc in (("film", film_acc), ("ecg", ecg_acc)):
        assert left_the_drop_folder(root / folder, f"{acc}_1.png")
        assert (root / folder / "done" / f"{acc}_1.png").exists()
    b.gw.assert_healthy()


# == configuration files =====================================================================

SHIPPED = Path(__file__).resolve().parents[1] / "config" / "gateway.yaml"
REGISTRY = default_registry()
# the shipped file plus what it shows commented out (PACS, LIS, telemetry) and the drop
# folders, so that every listener and destination type's settings get mutated
EXTRA_YAML = """
mqtt: {url: "mqtts://broker.province.local:8883", topic_prefix: medgw/laocai/gh,
       username: gw, patient_ids: hashed}
audit: {syslog: {url: "tls://collector:6514"}}
listeners:
  - {id: film, type: film-folder, path: ./var/film, dpi: 150, body_part: CHEST, modality: CR}
  - {id: ecg, type: ecg-folder, path: ./var/ecg, dpi: 200, layout: 3x4+II, hl7_oru: true}
  - {id: xn, type: astm, profile: sysmex-xn,
     transport: {serial: /dev/serial/by-id/usb-FTDI-if00, baudrate: 9600, parity: E}}
destinations:
  - {id: pacs, type: dicom-store, ae_title: PACS, connect: 10.0.0.5:104,
     delivery: {ordered: false, workers: 2}}
  - {id: lis, type: hl7-mllp, connect: 10.0.0.7:2576,
     delivery: {ordered: true, backoff: {initial_s: 1, max_s: 300}}}
routes:
  - {match: {kind: dicom, source: [film, ecg]}, to: [pacs]}
  - {match: {source: xn}, steps: [map-codes, hl7-oru], to: [lis]}
"""


def fuzz_base() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    extra: dict[str, Any] = yaml.safe_load(EXTRA_YAML)
    for key, value in extra.items():
        doc[key] = [*doc.get(key, []), *value] if isinstance(value, list) else value
    return doc


SHIPPED_DOC = fuzz_base()


def test_the_fuzz_base_config_is_valid(tmp_path: Path) -> None:
    """Mutations start from a valid file (or they would test one error over and over)."""
    text = yaml.safe_dump(SHIPPED_DOC, sort_keys=False)
    cfg = parse_config(text, REGISTRY, source=str(tmp_path / "base.yaml"))
    assert {type(x).__name__ for x in cfg.listeners} >= {"FilmFolderSettings", "ScpSettings"}
    assert len(cfg.destinations) == 4


YAML_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**40), 2**40),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(["hl7-mllp", "astm", "dicom-scp", "folder", "127.0.0.1:0", "0", "-1"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def mutated_doc(draw: st.DrawFn) -> Any:
    """The shipped config/gateway.yaml with one to four things changed somewhere in it:
    a value replaced (wrong type, out of range, random), a key or list item removed,
    an unknown key added, a key renamed."""
    doc: Any = json.loads(json.dumps(SHIPPED_DOC))  # a deep copy
    for _ in range(draw(st.integers(1, 4))):
        node: Any = doc
        parent: Any = None
        key: Any = None
        while isinstance(node, dict | list) and node and draw(st.integers(0, 3)):
            keys = sorted(node, key=str) if isinstance(node, dict) else range(len(node))
            parent, key = node, draw(st.sampled_from(keys))
            node = node[key]
        how = draw(st.sampled_from(["replace", "delete", "unknown-key", "rename"]))
        if parent is None:
            doc = draw(YAML_VALUES) if how == "replace" else doc
        elif how == "replace":
            parent[key] = draw(YAML_VALUES)
        elif how == "delete":
            del parent[key]
        elif how == "unknown-key" and isinstance(node, dict):
            node[draw(st.text(min_size=1, max_size=10))] = draw(YAML_VALUES)
        elif how == "rename" and isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = parent.pop(key)
    return doc


@st.composite
def config_text(draw: st.DrawFn) -> str:
    """A YAML document: the shipped file mutated as data, or as text, or random text."""
    how = draw(st.sampled_from(["doc", "doc", "doc", "text", "random"]))
    if how == "doc":
        return yaml.safe_dump(draw(mutated_doc()), allow_unicode=True, sort_keys=False)
    if how == "random":
        return draw(st.text(max_size=300))
    text = SHIPPED.read_text(encoding="utf-8")
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 20))
        text = text[:at] + draw(st.text(max_size=10)) + text[at + cut :]
    return text


def check_problems(err: ConfigError, text: str, source: str) -> None:
    """Each problem is one line that starts with where it is: the file (YAML syntax, not
    a mapping) or a path into the document (``listeners[0].type: ...``)."""
    assert err.problems, "ConfigError without problems"
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        doc = None
    tops = (*(str(k) for k in doc), *GatewayConfig.model_fields) if isinstance(doc, dict) else ()
    for problem in err.problems:
        assert isinstance(problem, str) and problem.strip(), err.problems
        assert ": " in problem, f"no location in {problem!r}"
        assert problem.startswith((source, "(top level)", "[", *tops)), (
            f"{problem!r} does not start with a place in the file"
        )


@pytest.mark.timeout(180)
@fuzz(300)
@given(text=config_text())
def test_fuzzed_config_is_valid_or_a_config_error_naming_the_place(
    tmp_path: Path, text: str
) -> None:
    """Mutations of the shipped config/gateway.yaml (wrong types, missing and unknown
    keys, renamed keys, broken text, random text) through ``parse_config`` and
    ``medgw check-config``: a valid config or ConfigError with every problem located;
    never TypeError, KeyError, AttributeError, ... and ``check-config`` exits 0 or 2."""
    source = str(tmp_path / "fuzz.yaml")
    try:
        cfg = parse_config(text, REGISTRY, source=source)
    except ConfigError as err:
        check_problems(err, text, source)
        expected = 2
    else:
        assert isinstance(cfg, GatewayConfig)
        expected = 0
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    out, err_out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err_out):
        code = medgw(["check-config", str(path)])
    assert code == expected, (code, out.getvalue(), err_out.getvalue())
    if code == 2:
        assert re.match(rf"{re.escape(str(path))}: \d+ error\(s\)\n", err_out.getvalue())
        assert out.getvalue() == ""
    else:
        assert out.getvalue().startswith("OK: site ")


@pytest.mark.timeout(60)
@fuzz(50)
@given(data=st.binary(max_size=300))
def test_check_config_on_any_bytes_exits_2_with_the_file_named(tmp_path: Path, data: bytes) -> None:
    """Not UTF-8, NUL bytes, a binary file given by mistake: exit 2 naming the file."""
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    out, err_out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err_out):
        code = medgw(["check-config", str(path)])
    assert code in (0, 2), code
    if code == 2:
        assert err_out.getvalue().startswith(f"{path}: "), err_out.getvalue()


def test_listener_type_that_is_a_list_is_a_config_error() -> None:
    text = "site: {id: s}\nlisteners:\n  - {id: his, type: [hl7-mllp]}\n"
    with pytest.raises(ConfigError, match=r"listeners\[0\]\.type"):
        parse_config(text, REGISTRY, source="fuzz.yaml")
