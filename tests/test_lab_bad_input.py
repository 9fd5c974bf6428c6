"""Bad input from an analyzer over TCP, through the running gateway.

One analyzer connection gets, in turn: line noise, a header with unusable
delimiters, a 100 kB record, bytes that are not the listener's UTF-8, corrupted
checksums and a wrong frame number, with valid messages between and after them.
Each bad piece is refused (NAK) or, where E1381 says to ignore it, ignored; what
cannot be used is kept in the journal's quarantine for a technician
(``medgw queue``); the session goes on, and every valid message reaches the LIS
exactly once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fakes.analyzer import GARBAGE, Fault
from lab_gateway import (
    LabBench,
    astm_listener,
    capture,
    field,
    lis_destination,
    lis_messages,
    lis_record,
    named,
    quarantine,
    result_routes,
    sessions,
    tcp_analyzer,
    until,
)
from peers.gateway_proc import Proc, parse_table

pytestmark = pytest.mark.slow

E411 = capture("07_astm_roche_cobas_e411_session.bin")[0]


def e411(sample_id: str) -> bytes:
    """The real e411 message for another tube (two frames of 247 bytes)."""
    return E411.replace(b"000000-00-0001", sample_id.encode())


@pytest.fixture
def bench(
    tmp_path: Path, state_dir: Path, free_port: Callable[[], int], procs: list[Proc]
) -> LabBench:
    return LabBench(tmp_path, state_dir, free_port(), procs)


@pytest.mark.timeout(60)
async def test_bad_input_is_refused_quarantined_and_the_session_goes_on(
    bench: LabBench, free_port: Callable[[], int]
) -> None:
    lis = bench.receiver(free_port())
    port, small_port = free_port(), free_port()
    bench.write_config(
        listeners=[
            astm_listener(
                "e411", "roche-cobas-e411", {"tcp_listen": f"127.0.0.1:{port}"}, encoding="utf-8"
            ),
            astm_listener(
                "small",
                "roche-cobas-e411",
                {"tcp_listen": f"127.0.0.1:{small_port}"},
                max_message_bytes=16_384,
            ),
        ],
        destinations=[lis_destination(lis.port)],
        routes=result_routes(qc=None),
    )
    gateway = bench.gateway().start()
    valid: list[str] = []

    async with tcp_analyzer(port) as fake:
        # line noise on the neutral line before the ENQ: ignored (E1381 6.5.1.2), kept aside
        sent = await fake.send_message(e411("OK-1"), [Fault("garbage_before_enq")])
        assert sent.ok and sent.naks == 0, sent
        valid.append("OK-1")

        # a header whose delimiters are not four distinct characters: the message is NAKed
        # each time it comes (six attempts, E1381 6.5.1.4), then the analyzer gives up
        bad_header = e411("BAD-H").replace(b"H|\\^&|", b"H|^^&|", 1)
        sent = await fake.send_message(bad_header)
        assert not sent.ok and sent.naks == 6, sent

        # a 100 kB record (the bound is 64 kB a record): NAKed, kept aside
        huge = e411("BAD-BIG").replace(b"|5.41|", b"|" + b"9" * 100_000 + b"|")
        sent = await fake.send_message(huge)
        assert not sent.ok and sent.naks == 6, sent
        assert sent.frames_sent > 400  # it did cross the line, 240 bytes a frame

        # Latin-1 bytes on a line configured for UTF-8: not decodable, NAKed, kept aside
        name = "\rP|1||PID-7||Müller^Jürgen\r".encode("latin-1")
        latin1 = e411("BAD-ENC").replace(b"\rP|1\r", name)
        sent = await fake.send_message(latin1)
        assert not sent.ok and sent.naks == 6, sent

        # corrupted checksums: NAKed, the retransmission is taken
        sent = await fake.send_message(e411("CK-5"), [Fault("bad_checksum", frame=1, times=2)])
        assert sent.ok and sent.naks == 2 and sent.retransmissions == 2, sent
        valid.append("CK-5")

        # a frame number out of turn (as if a frame had been lost): NAKed, then taken
        sent = await fake.send_message(e411("FN-6"), [Fault("wrong_frame_number", frame=2)])
        assert sent.ok and sent.naks == 1, sent
        valid.append("FN-6")

        # and the session is still good for ordinary work
        sent = await fake.send_message(e411("OK-7"))
        assert sent.ok and sent.naks == 0, sent
        valid.append("OK-7")

    # a listener that takes messages of 16 kB at most gets 24 kB of ordinary records
    h, p, o, *results, end = [r + b"\r" for r in e411("BIG-MSG").split(b"\r") if r]
    big = b"".join([h, p, o, *results * 130, end])
    assert 24_000 < len(big) < 65_536
    async with tcp_analyzer(small_port) as fake:
        sent = await fake.send_message(big)
        assert not sent.ok and sent.naks == 6, sent
        sent = await fake.send_message(e411("SMALL-8"))
        assert sent.ok and sent.naks == 0, sent
        valid.append("SMALL-8")

    await until(lambda: len(lis_record(lis)) >= len(valid), 15, "the valid messages at the LIS")
    health = gateway.wait_drained(timeout_s=10)
    assert all(d["dead"] == 0 for d in health["destinations"].values()), health

    # nothing valid lost, nothing twice, nothing of the bad input at the LIS
    got = [field(named(m, "OBR")[0], 3) for m in lis_messages(lis, bench.state_dir)]
    assert sorted(got) == sorted(valid)

    # the quarantine holds each bad input once, with a reason a technician can act on
    rows = quarantine(bench.state_dir)
    print("quarantined:", *(reason for _, reason, _, _ in rows), sep="\n  ")  # on a failure
    assert {source for source, *_ in rows} == {"e411", "small"}
    assert len({raw for _, _, raw, _ in rows}) == len(rows), "six attempts, kept once"

    def kept(*words: str) -> list[tuple[str, bytes, int]]:
        return [
            (reason, raw, size)
            for _, reason, raw, size in rows
            if all(w.lower() in reason.lower() for w in words)
        ]

    (junk,) = kept("junk")
    assert junk[1] == GARBAGE
    ((_, raw, _),) = kept("bad H record", "delimiters")
    assert raw.startswith(b"H|^^&|")
    ((_, raw, size),) = kept("over 65536 bytes")
    assert size > 100_000 and b"9" * 1000 in raw
    ((_, raw, _),) = kept("not valid utf-8")
    assert "Müller".encode("latin-1") in raw
    ((_, raw, _),) = kept("message over 16384 bytes")
    assert raw.startswith(b"H|") and b"BIG-MSG" in raw

    stats = gateway.queue("stats")
    assert stats.returncode == 0, stats.stderr
    assert f"quarantined={len(rows)}" in stats.stdout, stats.stdout
    listed = gateway.queue("list", "--quarantine")
    assert listed.returncode == 0, listed.stderr
    assert len(parse_table(listed.stdout)) == len(rows)

    # the session's record counts the frames refused at the link layer
    await until(lambda: sessions(bench.state_dir, "e411"), 10, "the session's record")
    (details,) = [json.loads(d) for d in sessions(bench.state_dir, "e411")]
    assert details["rejected_frames"] == 3, details  # two checksums, one frame number
    assert gateway.terminate() == 0, gateway.log_tail()
