"""Crashes while an analyzer is sending: SIGKILL the gateway mid-message, restart, retransmit.

The analyzer's first attempt is written frame by frame here (``build_frame`` of the
fake), so the kill lands exactly where each case says: after the ENQ, after some
frames of a multi-frame message, right after the last frame before its ACK is
read, after that ACK but before the EOT. The gateway restarts on the same state
folder and port; the fake analyzer then sends the whole message again, as an
instrument does when a transfer breaks. Whatever was or was not journaled before
the kill, the LIS ends up with exactly one ORU for each message. A message that
was ACKed and comes again with a new header time is recognised as well.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from fakes.analyzer import build_frame
from lab_gateway import (
    LabBench,
    astm_listener,
    capture,
    field,
    journal,
    lis_destination,
    lis_messages,
    lis_record,
    log_size,
    named,
    quarantine,
    result_routes,
    tcp_analyzer,
    until,
    wait_log,
)
from peers.gateway_proc import Proc, Receiver

pytestmark = pytest.mark.slow

XN550 = capture("04_astm_sysmex_xn550.frame")[0]
E411 = capture("07_astm_roche_cobas_e411_session.bin")[0]
ENQ, ACK, NAK, EOT = b"\x05", b"\x06", b"\x15", b"\x04"


def xn550(sample_id: str) -> bytes:
    """The real XN-550 message for another tube (O.4.3 holds the sample number)."""
    return XN550.replace(b"^^                    27^M", b"^^%22s^M" % sample_id.encode())


def frames_of(text: bytes, frame_size: int = 247) -> list[bytes]:
    """The message's frames as an E1381 instrument cuts them (240 bytes of text each)."""
    room = frame_size - 7
    chunks = [text[i : i + room] for i in range(0, len(text), room)]
    return [build_frame(n, c, final=n == len(chunks)) for n, c in enumerate(chunks, 1)]


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    """Write ``data`` (ENQ or a frame) and read the one-byte reply."""
    writer.write(data)
    return await asyncio.wait_for(reader.readexactly(1), 5)


@pytest.fixture
def bench(
    tmp_path: Path, state_dir: Path, free_port: Callable[[], int], procs: list[Proc]
) -> LabBench:
    return LabBench(tmp_path, state_dir, free_port(), procs)


KILL_POINTS = [
    # (what the analyzer had done when the gateway died, frames ACKed, one more unread)
    ("ENQ answered, no frame yet", 0, False),
    ("first frame ACKed", 1, False),
    ("6 of 11 frames ACKed", 6, False),
    ("last frame written, its ACK not read", 10, True),
    ("last frame ACKed, no EOT yet", 11, False),
]


@pytest.mark.timeout(90)
async def test_sigkill_mid_message_then_retransmission_gives_one_oru(
    bench: LabBench, free_port: Callable[[], int]
) -> None:
    lis = bench.receiver(free_port())
    port = free_port()
    bench.write_config(
        listeners=[astm_listener("xn550", "sysmex-xn", {"tcp_listen": f"127.0.0.1:{port}"})],
        destinations=[lis_destination(lis.port)],
        routes=result_routes(qc=None),
    )
    gateway = bench.gateway().start()

    def at_lis() -> list[str]:
        return [field(named(m, "OBR")[0], 3) for m in lis_messages(lis, bench.state_dir)]

    def arrived(specimen: str) -> Callable[[], bool]:
        return lambda: specimen in at_lis()

    specimens = []
    for n, (point, acked, last_unread) in enumerate(KILL_POINTS, 1):
        specimen = f"CRASH-{n}"
        specimens.append(specimen)
        text = xn550(specimen)
        frames = frames_of(text)
        assert len(frames) == 11
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await exchange(reader, writer, ENQ) == ACK, point
        for frame in frames[:acked]:
            assert await exchange(reader, writer, frame) == ACK, point
        if last_unread:
            writer.write(frames[acked])
            await writer.drain()
        assert gateway.kill() == -9, point  # SIGKILL, right here
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

        gateway.start()
        async with tcp_analyzer(port) as fake:  # the analyzer sends the whole message again
            sent = await fake.send_message(text)
            assert sent.ok and sent.naks == 0, (point, sent)
        await until(arrived(specimen), 15, f"{specimen}'s ORU after a kill with {point}")

    gateway.wait_drained(timeout_s=15)
    seen = Counter(at_lis())
    assert seen == Counter(specimens), f"one ORU per message, whatever the kill point: {seen}"
    assert len(lis_record(lis)) == len(specimens)
    for message in lis_messages(lis, bench.state_dir):
        assert len(named(message, "OBX")) == 37  # the whole message's results, not a part
    with journal(bench.state_dir) as conn:
        stored = conn.execute(
            "SELECT COUNT(*) FROM envelopes "
            "WHERE kind = 'lab-result' AND json_extract(headers, '$.protocol') = 'astm'"
        ).fetchone()[0]
    assert stored == len(specimens), "a retransmission of a journaled message is not stored again"
    assert not quarantine(bench.state_dir), "a broken transfer is not bad input"
    assert gateway.terminate() == 0, gateway.log_tail()


def with_header_time(message: bytes, stamp: str) -> bytes:
    """The message as sent at another time: H.14 (date and time of message) set to ``stamp``."""
    header, rest = message.split(b"\r", 1)
    fields = header.split(b"|")
    fields += [b""] * (14 - len(fields))
    fields[13] = stamp.encode()
    return b"|".join(fields[:14]) + b"\r" + rest


@pytest.mark.timeout(60)
async def test_resent_message_with_a_new_header_time_gives_no_second_oru(
    bench: LabBench, free_port: Callable[[], int]
) -> None:
    lis = bench.receiver(free_port())
    xn_port, e411_port = free_port(), free_port()
    bench.write_config(
        listeners=[
            astm_listener("xn550", "sysmex-xn", {"tcp_listen": f"127.0.0.1:{xn_port}"}),
            astm_listener("e411", "roche-cobas-e411", {"tcp_listen": f"127.0.0.1:{e411_port}"}),
        ],
        destinations=[lis_destination(lis.port)],
        routes=result_routes(qc=None),
    )
    gateway = bench.gateway().start()
    # the XN-550 dates each result (R.13); the e411 dates the sample (O.8)
    sends = [(xn_port, xn550("RESEND-1")), (e411_port, E411)]

    for port, message in sends:
        async with tcp_analyzer(port) as fake:
            sent = await fake.send_message(with_header_time(message, "20240627140000"))
            assert sent.ok, sent
    await until(lambda: len(lis_record(lis)) >= 2, 15, "the two ORUs")
    gateway.wait_drained(timeout_s=10)

    # the same results again, sent later (a new H.14), on the same gateway and after a restart
    for stamp, restart in (("20240627141500", False), ("20240628080000", True)):
        if restart:
            assert gateway.terminate() == 0, gateway.log_tail()
            gateway.start()
        mark = log_size(gateway)
        for port, message in sends:
            async with tcp_analyzer(port) as fake:
                sent = await fake.send_message(with_header_time(message, stamp))
                assert sent.ok and sent.naks == 0, sent  # ACKed: the analyzer is done with it
        wait_log(gateway, "message.duplicate source=xn550", after=mark)
        wait_log(gateway, "message.duplicate source=e411", after=mark)
        gateway.wait_drained(timeout_s=10)

    samples = sorted(field(named(m, "OBR")[0], 3) for m in lis_messages(lis, bench.state_dir))
    assert samples == ["000000-00-0001", "RESEND-1"], "each result set reached the LIS once"
    assert gateway.terminate() == 0, gateway.log_tail()


C311_RESULTS = (
    "H|\\^&|||c311^1|||||host|RSUPL^REAL|P|1\r"
    "P|1\r"
    "O|1|11625^{sid}^1^^004|R1|^^^685/\\^^^717/|R||||||N||^^||SC|||||||20240601113000|||F\r"
    "R|1|^^^685/|31|U/l||N||F||||20240601112900\r"
    "C|1|I|0|I\r"
    "R|2|^^^717/|5.2|mmol/l||N||F||||20240601112900\r"
    "L|1|N\r"
)


@pytest.mark.timeout(60)
async def test_a_journal_failure_is_a_nak_and_the_repeated_frame_is_taken(
    bench: LabBench, free_port: Callable[[], int]
) -> None:
    """The journal cannot store (its blob folder is unusable): the last frame is NAKed,
    not ACKed; once the disk is back the analyzer's repetition of that frame is taken,
    whether the message came as one text in ETB frames or one record per ETX frame."""
    lis = bench.receiver(free_port())
    port = free_port()
    bench.write_config(
        listeners=[astm_listener("c311", "roche-cobas-c311", {"tcp_listen": f"127.0.0.1:{port}"})],
        destinations=[lis_destination(lis.port)],
        routes=result_routes(qc=None),
        journal={"inline_max_bytes": 0},  # every body goes to a blob file
    )
    gateway = bench.gateway().start()
    blobs, aside = bench.state_dir / "blobs", bench.tmp / "blobs-aside"

    for sample_id, one_record_per_frame in (("JF-ETB", False), ("JF-REC", True)):
        text = C311_RESULTS.format(sid=sample_id).encode()
        if one_record_per_frame:
            records = [r + b"\r" for r in text.split(b"\r") if r]
            frames = [build_frame(n, r, final=True) for n, r in enumerate(records, 1)]
        else:
            frames = frames_of(text, frame_size=128)  # three ETB frames and the ETX
        assert len(frames) > 1
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await exchange(reader, writer, ENQ) == ACK
        for frame in frames[:-1]:
            assert await exchange(reader, writer, frame) == ACK
        blobs.rename(aside)
        blobs.write_bytes(b"")  # a file where the blob folder was: nothing can be stored
        try:
            assert await exchange(reader, writer, frames[-1]) == NAK, "not stored: no ACK"
        finally:
            blobs.unlink()
            aside.rename(blobs)
        assert await exchange(reader, writer, frames[-1]) == ACK, f"{sample_id}: repeat taken"
        writer.write(EOT)
        writer.close()
        await until(arrived_at(lis, bench, sample_id), 15, f"{sample_id}'s ORU")

    gateway.wait_drained(timeout_s=10)
    samples = sorted(field(named(m, "OBR")[0], 3) for m in lis_messages(lis, bench.state_dir))
    assert samples == ["JF-ETB", "JF-REC"]
    assert gateway.terminate() == 0, gateway.log_tail()


def arrived_at(lis: Receiver, bench: LabBench, sample_id: str) -> Callable[[], bool]:
    def check() -> bool:
        messages = lis_messages(lis, bench.state_dir)
        return any(field(named(m, "OBR")[0], 3) == sample_id for m in messages)

    return check
