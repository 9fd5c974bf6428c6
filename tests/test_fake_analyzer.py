"""The fake analyzer against a tiny scripted host: each fault puts the intended bytes on the wire.

The host here is written from E1381 in a few lines and shares nothing with the fake
or with ``drivers.astm``: it reads the fake's bytes into items (a control byte, a
frame from STX through LF, or a run of other bytes) and answers as each test says.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from fakes.analyzer import (
    GARBAGE,
    ByteWriter,
    FakeAnalyzer,
    Fault,
    FaultKind,
    WireEvent,
    open_serial_stream,
    open_tcp_stream,
    sample_messages,
)
from fakes.pty import socat_pty_pair

STX, ETX, EOT, ENQ, ACK, NAK, ETB = b"\x02", b"\x03", b"\x04", b"\x05", b"\x06", b"\x15", b"\x17"
SAMPLES = Path("/work/shared/samples/lab")
RECORDS = [
    b"H|\\^&|||fake^1|||||host||P|1",
    b"P|1||PID001",
    b"O|1|S0001||^^^GLU\\^^^CREA|R",
    b"R|1|^^^GLU|5.4|mmol/L||N||F",
    b"R|2|^^^CREA|71|umol/L||N||F",
    b"L|1|N",
]
TEXT = b"".join(record + b"\r" for record in RECORDS)
SMALL = [b"H|\\^&|||fake^1", b"L|1|N"]  # one frame, checksum 4F: has a letter


def host_checksum(body: bytes) -> bytes:
    return b"%02X" % (sum(body) % 256)


def host_frame(number: int, text: bytes, end: bytes = ETX) -> bytes:
    body = str(number % 8).encode() + text + end
    return STX + body + host_checksum(body) + b"\r\n"


def valid(frame: bytes) -> bool:
    """STX .. ETB|ETX C1 C2 CR LF with the right uppercase checksum."""
    body = frame[1:-4]
    return (
        frame[:1] == STX
        and frame.endswith(b"\r\n")
        and body[-1:] in (ETX, ETB)
        and frame[-4:-2] == host_checksum(body)
    )


def fn(frame: bytes) -> int:
    return frame[1] - 0x30


def frames_of(items: Sequence[bytes]) -> list[bytes]:
    return [item for item in items if item[:1] == STX]


class Item(NamedTuple):
    t: float
    data: bytes  # a control byte, a frame, other bytes; b"" when the line closed


class HostLine:
    """The computer-system end of the line: what the fake wrote, cut into items."""

    def __init__(self, reader: asyncio.StreamReader, writer: ByteWriter) -> None:
        self.writer = writer
        self.items: asyncio.Queue[Item] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._parse(reader))

    async def _parse(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        frame, junk = bytearray(), bytearray()
        while data := await reader.read(4096):
            now = loop.time()
            for value in data:
                byte = bytes([value])
                if frame:
                    frame += byte
                    if byte == b"\n":
                        self.items.put_nowait(Item(now, bytes(frame)))
                        frame.clear()
                    continue
                if byte in (STX, ENQ, EOT, ACK, NAK) and junk:
                    self.items.put_nowait(Item(now, bytes(junk)))
                    junk.clear()
                if byte == STX:
                    frame += byte
                elif byte in (ENQ, EOT, ACK, NAK):
                    self.items.put_nowait(Item(now, byte))
                else:
                    junk += byte
            if junk:
                self.items.put_nowait(Item(now, bytes(junk)))
                junk.clear()
        self.items.put_nowait(Item(loop.time(), b""))

    async def item(self, timeout_s: float = 3.0) -> Item:
        return await asyncio.wait_for(self.items.get(), timeout_s)

    async def next(self, timeout_s: float = 3.0) -> bytes:
        return (await self.item(timeout_s)).data

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def serve_upload(
        self, frame_replies: Sequence[bytes] = (), enq_replies: Sequence[bytes] = ()
    ) -> tuple[list[bytes], bytes]:
        """Receive one transfer: items seen through EOT (or EOF), and the text accepted.

        ENQ gets ``enq_replies`` in turn, then ACK; frames get ``frame_replies`` in turn,
        then ACK when valid and next in turn (again ACK, text unused, for a repeat),
        else NAK.
        """
        enq_script, frame_script = list(enq_replies), list(frame_replies)
        seen: list[bytes] = []
        text = bytearray()
        last: int | None = None
        while (data := await self.next()) not in (EOT, b""):
            seen.append(data)
            if data == ENQ:
                await self.send(enq_script.pop(0) if enq_script else ACK)
            elif data[:1] == STX:
                if frame_script:
                    await self.send(frame_script.pop(0))
                    continue
                expected = 1 if last is None else (last + 1) % 8
                good = valid(data)
                if good and fn(data) == expected:
                    last = fn(data)
                    text += data[2:-5]
                await self.send(ACK if good and fn(data) in (expected, last) else NAK)
        seen.append(data)
        return seen, bytes(text)

    async def upload(self, frames: Sequence[bytes]) -> list[bytes]:
        """ENQ (expecting ACK), each of ``frames`` once, EOT; the replies to the frames."""
        replies = []
        await self.send(ENQ)
        assert await self.next() == ACK
        for frame in frames:
            await self.send(frame)
            replies.append(await self.next())
        await self.send(EOT)
        return replies


Connect = Callable[..., Awaitable[tuple[FakeAnalyzer, HostLine]]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Call with FakeAnalyzer options: a fake connected over TCP to a :class:`HostLine`."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    made: list[tuple[FakeAnalyzer, HostLine]] = []

    async def make(**options: Any) -> tuple[FakeAnalyzer, HostLine]:
        reader, writer = await open_tcp_stream("127.0.0.1", port)
        options.setdefault("timescale", 0.01)
        options.setdefault("reply_timeout_s", 2.0)
        options.setdefault("receive_timeout_s", 2.0)
        fake = FakeAnalyzer(reader, writer, **options)
        host = HostLine(*await accepted.get())
        made.append((fake, host))
        return fake, host

    yield make
    for fake, host in made:
        await fake.close()
        host.writer.close()
        host.task.cancel()
    server.close()
    await server.wait_closed()


# ---- sending: framing ----


async def test_frames_are_numbered_modulo_8_checksummed_and_cut(connect: Connect) -> None:
    fake, host = await connect(frame_size=20)  # 13 bytes of text per frame
    result, (seen, text) = await asyncio.gather(fake.send_message(RECORDS), host.serve_upload())
    frames = frames_of(seen)
    assert seen[0] == ENQ and seen[-1] == EOT
    assert len(frames) == -(-len(TEXT) // 13) > 8
    assert [fn(frame) for frame in frames] == [(i + 1) % 8 for i in range(len(frames))]
    assert all(valid(frame) and len(frame) <= 20 for frame in frames)
    assert [frame[-5:-4] for frame in frames] == [ETB] * (len(frames) - 1) + [ETX]
    assert text == TEXT
    assert result.ok and result.eot_sent and result.aborted is None
    assert result.frames_sent == result.acks == len(frames)
    assert result.naks == result.retransmissions == 0
    assert result.last_frame_ack_s is not None and result.last_frame_ack_s >= 0


async def test_one_record_per_frame_ends_each_record_in_etx(connect: Connect) -> None:
    fake, host = await connect(one_record_per_frame=True)
    _, (seen, text) = await asyncio.gather(fake.send_message(TEXT), host.serve_upload())
    assert [frame[2:-5] for frame in frames_of(seen)] == [r + b"\r" for r in RECORDS]
    assert all(frame[-5:-4] == ETX for frame in frames_of(seen))
    assert text == TEXT


async def test_a_session_numbers_frames_across_its_messages(connect: Connect) -> None:
    log: list[WireEvent] = []
    fake, host = await connect(one_record_per_frame=True, log=log)
    result, (seen, text) = await asyncio.gather(
        fake.send_session([TEXT, SMALL]), host.serve_upload()
    )
    assert seen.count(ENQ) == 1 and seen.count(EOT) == 1
    assert [fn(frame) for frame in frames_of(seen)] == [1, 2, 3, 4, 5, 6, 7, 0]
    assert text == TEXT + b"".join(r + b"\r" for r in SMALL)
    assert len(result.message_ack_s) == 2
    assert b"".join(event.data for event in log if event.direction == "tx").count(STX) == 8


# ---- sending: faults ----


async def test_bad_checksum_twice_then_a_good_frame(connect: Connect) -> None:
    fake, host = await connect()
    faults = [Fault("bad_checksum", frame=1, times=2)]
    result, (seen, text) = await asyncio.gather(
        fake.send_message(SMALL, faults), host.serve_upload()
    )
    frames = frames_of(seen)
    assert [valid(frame) for frame in frames] == [False, False, True]
    assert {frame[:-4] for frame in frames} == {frames[2][:-4]}  # only C1 C2 differ
    assert text == b"H|\\^&|||fake^1\rL|1|N\r"
    assert result.ok and result.naks == 2 and result.retransmissions == 2


async def test_lowercase_checksum(connect: Connect) -> None:
    fake, host = await connect()
    result, (seen, _) = await asyncio.gather(
        fake.send_message(SMALL, [Fault("lowercase_checksum")]),
        host.serve_upload(frame_replies=[ACK]),
    )
    (frame,) = frames_of(seen)
    assert frame[-4:-2] == b"4f" and frame[-4:-2].upper() == host_checksum(frame[1:-4])
    assert result.ok


async def test_repeat_frame_sends_the_acked_frame_again(connect: Connect) -> None:
    fake, host = await connect(one_record_per_frame=True)
    result, (seen, text) = await asyncio.gather(
        fake.send_message(RECORDS, [Fault("repeat_frame", frame=2)]), host.serve_upload()
    )
    frames = frames_of(seen)
    assert [fn(frame) for frame in frames] == [1, 2, 2, 3, 4, 5, 6]
    assert frames[1] == frames[2]
    assert text == TEXT  # the host ACKed the repeat without using it twice
    assert result.ok and result.repeats == 1 and result.acks == 7


@pytest.mark.parametrize(("kind", "first"), [("skip_frame_number", 2), ("wrong_frame_number", 5)])
async def test_frame_number_faults(connect: Connect, kind: FaultKind, first: int) -> None:
    fake, host = await connect(one_record_per_frame=True)
    result, (seen, text) = await asyncio.gather(
        fake.send_message(SMALL, [Fault(kind, frame=1)]), host.serve_upload()
    )
    frames = frames_of(seen)
    assert [fn(frame) for frame in frames] == [first, 1, 2]
    assert valid(frames[0])  # only the number is wrong
    assert result.ok and result.naks == 1 and text == b"H|\\^&|||fake^1\rL|1|N\r"


async def test_drop_line_after_frame_closes_without_eot(connect: Connect) -> None:
    fake, host = await connect(one_record_per_frame=True)
    result, (seen, _) = await asyncio.gather(
        fake.send_message(RECORDS, [Fault("drop_line_after_frame", frame=2)]),
        host.serve_upload(),
    )
    assert seen[0] == ENQ and len(frames_of(seen)) == 2
    assert seen[-1] == b""  # EOF, no EOT
    assert not result.ok and "dropped after frame 2" in (result.aborted or "")
    again = await fake.send_message(SMALL)  # line trouble is a result, not an exception
    assert not again.ok and "line lost" in (again.aborted or "")


async def test_six_naks_end_in_eot_and_failure(connect: Connect) -> None:
    fake, host = await connect()
    result, (seen, _) = await asyncio.gather(
        fake.send_message(SMALL), host.serve_upload(frame_replies=[NAK] * 6)
    )
    frames = frames_of(seen)
    assert len(frames) == 6 and len(set(frames)) == 1 and valid(frames[0])
    assert seen[-1] == EOT
    assert not result.ok and result.naks == 6 and result.retransmissions == 5
    assert "refused 6 times" in (result.aborted or "") and result.eot_sent


async def test_any_other_reply_counts_as_nak(connect: Connect) -> None:
    fake, host = await connect()
    result, _ = await asyncio.gather(
        fake.send_message(SMALL), host.serve_upload(frame_replies=[b"?"])
    )
    assert result.ok and result.other_replies == 1 and result.retransmissions == 1


async def test_no_eot(connect: Connect) -> None:
    fake, host = await connect()
    send = asyncio.create_task(fake.send_message(SMALL, [Fault("no_eot")]))
    assert await host.next() == ENQ
    await host.send(ACK)
    assert valid(await host.next())
    await host.send(ACK)
    result = await send
    with pytest.raises(TimeoutError):
        await host.next(timeout_s=0.3)
    assert result.ok and not result.eot_sent


async def test_garbage_before_enq(connect: Connect) -> None:
    fake, host = await connect()
    result, (seen, _) = await asyncio.gather(
        fake.send_message(SMALL, [Fault("garbage_before_enq")]), host.serve_upload()
    )
    assert seen[: seen.index(ENQ)] == [GARBAGE]
    assert result.ok


async def test_slow_frame_waits_before_the_frame(connect: Connect) -> None:
    fake, host = await connect(one_record_per_frame=True)
    send = asyncio.create_task(fake.send_message(SMALL, [Fault("slow_frame", 2, delay_s=0.3)]))
    assert await host.next() == ENQ
    await host.send(ACK)
    first = await host.item()
    await host.send(ACK)
    second = await host.item()
    await host.send(ACK)
    assert await host.next() == EOT
    assert (await send).ok
    assert fn(first.data) == 1 and fn(second.data) == 2
    assert second.t - first.t >= 0.3


async def test_bare_lf_after_the_checksum(connect: Connect) -> None:
    fake, host = await connect()
    result, (seen, _) = await asyncio.gather(
        fake.send_message(SMALL, [Fault("bare_lf")]), host.serve_upload()
    )
    bare, good = frames_of(seen)
    assert bare.endswith(b"4F\n") and good.endswith(b"4F\r\n") and bare[:-1] == good[:-2]
    assert result.ok and result.naks == 1  # this host wants CR LF


# ---- sending: establishment and timers ----


async def test_nak_to_enq_waits_10_s_scaled_then_retries(connect: Connect) -> None:
    fake, host = await connect(timescale=0.02)  # 10 s -> 0.2 s
    send = asyncio.create_task(fake.send_message(SMALL))
    first = await host.item()
    await host.send(NAK)  # 6.2.5: not ready
    second = await host.item()
    assert first.data == second.data == ENQ
    assert second.t - first.t >= 0.2
    await host.send(ACK)
    assert valid(await host.next())
    await host.send(ACK)
    assert await host.next() == EOT
    result = await send
    assert result.ok and result.enq_naks == 1 and result.enqs == 2


async def test_contention_instrument_waits_1_s_scaled_and_sends_enq_again(
    connect: Connect,
) -> None:
    fake, host = await connect(timescale=0.1)  # 1 s -> 0.1 s
    send = asyncio.create_task(fake.send_message(SMALL))
    first = await host.item()
    await host.send(ENQ)  # ours crossed theirs: the instrument wins, we wait for its next ENQ
    second = await host.item()
    assert first.data == second.data == ENQ
    assert second.t - first.t >= 0.1
    await host.send(ACK)
    assert valid(await host.next())
    await host.send(ACK)
    assert await host.next() == EOT
    result = await send
    assert result.ok and result.contentions == 1 and result.ignored == b""


async def test_no_reply_to_a_frame_ends_in_eot(connect: Connect) -> None:
    fake, host = await connect(reply_timeout_s=0.2)
    send = asyncio.create_task(fake.send_message(SMALL))
    assert await host.next() == ENQ
    await host.send(ACK)
    frame = await host.item()
    end = await host.item()  # no reply from us
    assert end.data == EOT and end.t - frame.t >= 0.2
    result = await send
    assert not result.ok and "6.5.2.2" in (result.aborted or "")


# ---- receiving: queries and downloads ----

ANSWER = [b"H|\\^&|||host", b"P|1||PID001", b"O|1|S0001||^^^GLU|R", b"L|1|N"]
QUERY = [b"H|\\^&|||fake^1", b"Q|1|^S0001||^^^ALL||||||||O", b"L|1|N"]


async def test_query_returns_the_hosts_records(connect: Connect) -> None:
    fake, host = await connect()

    async def host_side() -> list[bytes]:
        _, text = await host.serve_upload()
        assert text == b"".join(r + b"\r" for r in QUERY)
        answer = [host_frame(i + 1, record + b"\r") for i, record in enumerate(ANSWER)]
        bad = answer[0][:-4] + b"00\r\n"
        await host.send(ENQ)
        assert await host.next() == ACK
        replies = []
        for frame in [bad, answer[0], answer[1], answer[1], *answer[2:]]:
            await host.send(frame)
            replies.append(await host.next())
        await host.send(EOT)
        return replies

    records, replies = await asyncio.gather(fake.query(QUERY, timeout_s=3), host_side())
    assert records == ANSWER
    assert replies == [NAK, ACK, ACK, ACK, ACK, ACK]
    received = fake.last_receive
    assert received is not None and received.repeats == 1 and received.naks == 1
    assert "checksum" in received.rejects[0]


async def test_query_contend_collides_with_the_hosts_enq(connect: Connect) -> None:
    fake, host = await connect(timescale=0.1)

    async def host_side() -> list[bytes]:
        await host.serve_upload()  # the query, through its EOT
        await host.send(ENQ)  # the host has the answer at once ...
        assert await host.next() == ENQ  # ... and so does the instrument: contention
        again = await host.next()  # 6.2.7.1: no reply; its next ENQ gets the ACK
        assert again == ENQ
        await host.send(ACK)
        assert await host.next() == EOT  # the instrument had nothing more to send
        frames = [host_frame(i + 1, record + b"\r") for i, record in enumerate(ANSWER)]
        return await host.upload(frames)

    records, replies = await asyncio.gather(
        fake.query(QUERY, timeout_s=3, faults=[Fault("contend")]), host_side()
    )
    assert records == ANSWER and replies == [ACK] * 4
    assert fake.last_send is not None and fake.last_send.contentions == 1


async def test_receive_faults_busy_nak_interrupt(connect: Connect) -> None:
    fake, host = await connect()
    faults = [Fault("busy"), Fault("nak_frame", frame=2, times=2), Fault("interrupt", frame=4)]

    async def host_side() -> list[bytes]:
        await host.send(ENQ)
        assert await host.next() == NAK  # busy (6.2.5)
        frames = [host_frame(i + 1, record + b"\r") for i, record in enumerate(ANSWER)]
        replies = []
        await host.send(ENQ)
        assert await host.next() == ACK
        for frame in frames:
            await host.send(frame)
            while (reply := await host.next()) == NAK:
                replies.append(reply)
                await host.send(frame)
            replies.append(reply)
        await host.send(EOT)
        return replies

    records, replies = await asyncio.gather(fake.receive_session(3, faults), host_side())
    assert records == ANSWER
    assert replies == [ACK, NAK, NAK, ACK, ACK, EOT]  # EOT: receiver interrupt (6.3.5)


async def test_receive_contend_sends_the_instruments_message_first(connect: Connect) -> None:
    fake, host = await connect(timescale=0.1)
    mine = b"H|\\^&|||fake^1\rL|1|N\r"

    async def host_side() -> bytes:
        await host.send(ENQ)
        assert await host.next() == ENQ  # contention: the instrument keeps the line
        _, text = await host.serve_upload()  # its next ENQ, its message, EOT
        frames = [host_frame(i + 1, record + b"\r") for i, record in enumerate(ANSWER)]
        await host.upload(frames)
        return text

    records, text = await asyncio.gather(
        fake.receive_session(3, [Fault("contend", data=mine)]), host_side()
    )
    assert text == mine and records == ANSWER


async def test_receive_discards_an_unfinished_message(connect: Connect) -> None:
    fake, host = await connect()

    async def host_side() -> None:
        frames = [host_frame(1, b"H|\\^&|||host\r"), host_frame(2, b"P|1\rO|1|S1", ETB)]
        await host.upload(frames)

    records, _ = await asyncio.gather(fake.receive_session(3), host_side())
    assert records == []
    assert fake.last_receive is not None
    assert fake.last_receive.discarded == [b"H|\\^&|||host", b"P|1\rO|1|S1"]


async def test_fault_validation() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        Fault("bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="frame and times"):
        Fault("bad_checksum", frame=0)
    fake = FakeAnalyzer(asyncio.StreamReader(), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not apply"):
        await fake.send_message(SMALL, [Fault("busy")])
    with pytest.raises(ValueError, match="does not apply"):
        await fake.receive_session(1, [Fault("bad_checksum")])


# ---- pacing and the serial adapter ----


async def test_pacing_at_9600_baud_960_bytes_take_a_second() -> None:
    arrived: list[float] = []
    got = bytearray()
    loop = asyncio.get_running_loop()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(4096):
            got.extend(data)
            arrived.append(loop.time())
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    _, writer = await open_tcp_stream(
        "127.0.0.1", server.sockets[0].getsockname()[1], baudrate=9600
    )
    started = loop.time()
    writer.write(bytes(range(256)) * 3 + bytes(192))  # 960 bytes
    await writer.drain()
    drained = loop.time() - started
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    assert len(got) == 960
    assert drained >= 0.9 and arrived[-1] - started >= 0.9
    assert len(arrived) > 10  # spread over the second, not in one burst


async def test_serial_pty_at_9600_baud(tmp_path: Path) -> None:
    text = b"".join(b"R|%d|^^^T%03d|%d|U||N||F\r" % (i, i, i) for i in range(1, 41))
    loop = asyncio.get_running_loop()
    with socat_pty_pair(tmp_path) as (a, b, _pid):
        host_reader, host_writer = await open_serial_stream(b, pace=False)
        host = HostLine(host_reader, host_writer)
        fake = FakeAnalyzer(*await open_serial_stream(a, baudrate=9600, pace=True))
        try:
            started = loop.time()
            result, (seen, received) = await asyncio.gather(
                fake.send_message(text), host.serve_upload()
            )
            elapsed = loop.time() - started
        finally:
            await fake.close()
            host_writer.close()
            host.task.cancel()
    wire = 1 + sum(len(frame) for frame in frames_of(seen)) + 1  # ENQ, frames, EOT
    assert result.ok and received == text
    assert wire >= 960
    assert elapsed >= 0.9 * wire / 960


# ---- captures ----


def test_sample_messages_from_captures() -> None:
    (c111,) = sample_messages(SAMPLES / "01_astm_roche_cobas_c111.frames")
    assert [r[:1] for r in c111.split(b"\r")[:-1]] == [b"H", b"P", b"O", b"R", b"C", b"M", b"L"]
    (pentra,) = sample_messages(SAMPLES / "02_astm_horiba_pentra_xlr.frames")
    assert pentra.count(b"\r") == 28
    (e411,) = sample_messages(SAMPLES / "07_astm_roche_cobas_e411_session.bin")
    assert b"\rR|2|^^^900/1/not|-1^0.521|COI||N" in e411  # joined across the ETB frame
    assert sample_messages(SAMPLES / "10_astm_thermo_indiko_host_query.bin") == [
        b"H|\\^&|||1^Analyzer 1^7.0|||||||P||20240805052700\rQ|1|^2240801063^^||^^^ALL^"
        b"||||||||O\rL|1|N\r"
    ]
    (xn550,) = sample_messages(SAMPLES / "04_astm_sysmex_xn550.frame")  # no LF at the end
    assert xn550.startswith(b"H|") and xn550.endswith(b"L|1|N\r")
    with pytest.raises(ValueError):
        sample_messages(SAMPLES / "14_proprietary_sysmex_xs500i_classA.bin")


async def test_replaying_a_capture(connect: Connect) -> None:
    fake, host = await connect()
    (message,) = sample_messages(SAMPLES / "07_astm_roche_cobas_e411_session.bin")
    result, (seen, text) = await asyncio.gather(fake.send_message(message), host.serve_upload())
    assert text == message and result.ok
    assert len(frames_of(seen)) == -(-len(message) // 240)
