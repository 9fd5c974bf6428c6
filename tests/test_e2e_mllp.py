"""End to end through the running gateway: a real MLLP sender process, the gateway
subprocess, a real MLLP receiver process and a folder outbox.

Nothing here imports the gateway: the peers speak MLLP with their own framing
(``tests/peers``), and the gateway is looked at only from outside (its ports,
``/healthz``, ``/metrics``, ``medgw queue``, the outbox folder).
"""

from __future__ import annotations

import base64
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from peers import control_id_of, digest, frame, read_lines
from peers.gateway_proc import (
    Gateway,
    Proc,
    Receiver,
    SenderProc,
    folder_destination,
    medgw,
    mllp_destination,
    parse_table,
    write_config,
)
from peers.mllp_receiver import read_record
from peers.mllp_sender import all_control_ids, build_message

pytestmark = pytest.mark.slow

COUNT = 3000
CONNECTIONS = 4


def _expected(prefix: str, count: int, connections: int) -> dict[str, bytes]:
    out = {}
    for cid in all_control_ids(prefix, count, connections):
        _, conn, n = cid.rsplit("-", 2)
        out[cid] = build_message(prefix, int(conn), int(n))
    return out


def _received_total(metrics: str) -> float:
    m = re.search(r'^medgw_messages_received_total\{listener="his"\} (\S+)$', metrics, re.M)
    assert m, 'medgw_messages_received_total{listener="his"} missing from /metrics'
    return float(m.group(1))


@pytest.mark.timeout(240)
def test_thousands_of_messages_reach_both_destinations_byte_exact(
    tmp_path: Path, state_dir: Path, free_port: Callable[[], int], procs: list[Proc]
) -> None:
    http_port, mllp_port, lis_port = free_port(), free_port(), free_port()
    outbox = tmp_path / "outbox"
    receiver = Receiver(lis_port, tmp_path / "lis-record.txt")
    procs.append(receiver)
    receiver.start()
    config = write_config(
        tmp_path / "gateway.yaml",
        state_dir=state_dir,
        http_port=http_port,
        mllp_port=mllp_port,
        destinations=[mllp_destination("lis", lis_port), folder_destination("outbox", outbox)],
    )
    gateway = Gateway(config, http_port, mllp_port)
    procs.append(gateway)
    gateway.start()

    sender = SenderProc(
        mllp_port, tmp_path / "acked.txt", count=COUNT, connections=CONNECTIONS, prefix="E2E"
    )
    procs.append(sender)
    summary = sender.start().finish(timeout_s=180)
    print(summary)
    expected = _expected("E2E", COUNT, CONNECTIONS)
    acked = read_lines(sender.acked)
    assert sorted(acked) == sorted(expected), "the sender got an AA for every message, once"

    health = gateway.wait_drained(timeout_s=120)
    assert health["status"] == "ok"
    for dest in ("lis", "outbox"):
        assert health["destinations"][dest]["delivered"] == COUNT
        assert health["destinations"][dest]["dead"] == 0

    # the receiving system got each message once, byte-exact, in per-connection order
    record = read_record(receiver.record)
    assert len(record) == COUNT, Counter(c for c, _ in record).most_common(3)
    assert {cid for cid, _ in record} == set(acked)
    for cid, sha in record:
        assert sha == digest(expected[cid]), f"{cid} reached the LIS altered"
    order: dict[str, list[int]] = defaultdict(list)
    for cid, _ in record:
        _, conn, n = cid.rsplit("-", 2)
        order[conn].append(int(n))
    assert all(ns == sorted(ns) for ns in order.values()), "ordered destination reordered"

    # the outbox has one file per message with exactly the bytes the sender sent
    files = sorted(outbox.glob("*.hl7"))
    assert len(files) == COUNT
    by_cid = {}
    for f in files:
        body = f.read_bytes()
        by_cid[control_id_of(body)] = body
    assert set(by_cid) == set(acked)
    altered = [cid for cid, body in by_cid.items() if body != expected[cid]]
    assert not altered, f"outbox bytes differ from what was sent: {altered[:5]}"

    stats = gateway.queue("stats")
    assert stats.returncode == 0, stats.stderr
    rows = {r["destination"]: r for r in parse_table(stats.stdout)}
    assert rows["lis"]["pending"] == rows["outbox"]["pending"] == "0", stats.stdout
    assert rows["lis"]["done"] == rows["outbox"]["done"] == str(COUNT), stats.stdout
    assert f"envelopes={COUNT} " in stats.stdout

    assert _received_total(gateway.metrics()) == COUNT
    assert gateway.terminate() == 0, gateway.log_tail()


@pytest.mark.timeout(120)
def test_hl7_send_cli_healthz_and_metrics(
    tmp_path: Path, state_dir: Path, free_port: Callable[[], int], procs: list[Proc]
) -> None:
    http_port, mllp_port, lis_port = free_port(), free_port(), free_port()
    receiver = Receiver(lis_port, tmp_path / "lis-record.txt")
    procs.append(receiver)
    receiver.start()
    config = write_config(
        tmp_path / "gateway.yaml",
        state_dir=state_dir,
        http_port=http_port,
        mllp_port=mllp_port,
        destinations=[
            mllp_destination("lis", lis_port),
            folder_destination("outbox", tmp_path / "outbox"),
        ],
    )
    gateway = Gateway(config, http_port, mllp_port)
    procs.append(gateway)
    gateway.start()

    # a technician's text file: LF line ends, two messages
    first, second = build_message("CLI", 0, 0), build_message("CLI", 0, 1)
    text = (first + second).replace(b"\r", b"\n")
    message_file = tmp_path / "results.hl7"
    message_file.write_bytes(text)
    target = f"127.0.0.1:{mllp_port}"
    sent = medgw("hl7", "send", str(message_file), target)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert sent.stdout.count(": AA") == 2, sent.stdout
    assert "CLI-0-0: AA" in sent.stdout and "CLI-0-1: AA" in sent.stdout

    # the same file again: retransmissions are ACKed but journaled once
    again = medgw("hl7", "send", str(message_file), target)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count(": AA") == 2

    health = gateway.wait_drained(timeout_s=30)
    assert health["status"] == "ok"
    assert health["site"] == "e2e-test"
    assert health["listeners"] == {"his": "MllpListener"}
    assert health["destinations"]["lis"]["delivered"] == 2
    assert health["destinations"]["lis"]["breaker"] == "closed"
    metrics = gateway.metrics()
    assert _received_total(metrics) == 2
    assert 'medgw_messages_duplicate_total{listener="his"} 2.0' in metrics
    assert 'medgw_messages_delivered_total{destination="lis"} 2.0' in metrics

    # the files were sent as segments ended by CR: that is what arrives
    assert [cid for cid, _ in read_record(receiver.record)] == ["CLI-0-0", "CLI-0-1"]
    assert [sha for _, sha in read_record(receiver.record)] == [digest(first), digest(second)]

    # nothing listens on this port: exit 1 and a FAILED line, not a traceback
    dead_port = str(free_port())
    failed = medgw("hl7", "send", str(message_file), f"127.0.0.1:{dead_port}", "--timeout", "2")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert failed.stdout.count(": FAILED") == 2, failed.stdout
    assert "Traceback" not in failed.stderr


@pytest.mark.timeout(60)
def test_peers_work_without_the_gateway(
    tmp_path: Path, free_port: Callable[[], int], procs: list[Proc]
) -> None:
    """The test peers themselves: the sender resends what the receiver NAKs."""
    receiver = Receiver(free_port(), tmp_path / "record.txt", "--nack-first", "3")
    procs.append(receiver)
    receiver.start()
    sender = SenderProc(
        receiver.port, tmp_path / "acked.txt", count=50, connections=2, prefix="PEER"
    )
    procs.append(sender)
    summary = sender.start().finish(timeout_s=30)
    assert "acked=50 naks=3 " in summary, summary
    expected = _expected("PEER", 50, 2)
    assert sorted(read_lines(sender.acked)) == sorted(expected)
    record = read_record(receiver.record)
    assert sorted(cid for cid, _ in record) == sorted(expected)
    assert all(sha == digest(expected[cid]) for cid, sha in record)
    assert receiver.terminate() == 0
    assert "receiver received=53 accepted=50" in receiver.log_tail(1)


@pytest.mark.timeout(60)
def test_large_message_goes_through_a_blob_byte_exact(
    tmp_path: Path, state_dir: Path, free_port: Callable[[], int], procs: list[Proc]
) -> None:
    """A result with an embedded PDF (OBX ED, ~600 kB) is kept in a blob file, not inline."""
    http_port, mllp_port, lis_port = free_port(), free_port(), free_port()
    receiver = Receiver(lis_port, tmp_path / "lis-record.txt")
    procs.append(receiver)
    receiver.start()
    outbox = tmp_path / "outbox"
    config = write_config(
        tmp_path / "gateway.yaml",
        state_dir=state_dir,
        http_port=http_port,
        mllp_port=mllp_port,
        destinations=[mllp_destination("lis", lis_port), folder_destination("outbox", outbox)],
    )
    gateway = Gateway(config, http_port, mllp_port)
    procs.append(gateway)
    gateway.start()

    pdf = base64.b64encode(random.Random(7).randbytes(450_000)).decode()
    big = build_message("BIG", 0, 0) + (
        f"OBX|99|ED|18750-0^ECG report^LN||^application^pdf^Base64^{pdf}||||||F\r".encode()
    )
    assert len(big) > 256 * 1024  # above the journal's default inline_max_bytes
    message_file = tmp_path / "big.hl7"
    message_file.write_bytes(frame(big))  # an MLLP capture: sent exactly as is
    sent = medgw("hl7", "send", str(message_file), f"127.0.0.1:{mllp_port}")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "BIG-0-0: AA" in sent.stdout

    gateway.wait_drained(timeout_s=30)
    assert read_record(receiver.record) == [("BIG-0-0", digest(big))]
    files = list(outbox.glob("*.hl7"))
    assert len(files) == 1 and files[0].read_bytes() == big
    blobs = [p for p in (state_dir / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 1 and blobs[0].read_bytes() == big
