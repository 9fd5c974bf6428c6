"""A destination that is down, refuses, or comes back: through the running gateway.

The gateway keeps ACKing its senders while the LIS is away (accept before
acknowledge), shows the outage on ``/healthz`` and in ``medgw queue list``, and
delivers everything once the LIS is back: in order for an ordered destination,
after ``medgw queue retry`` for deliveries that went dead, and after a restart
of the gateway itself.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from peers import read_lines
from peers.gateway_proc import (
    Gateway,
    Proc,
    Receiver,
    SenderProc,
    mllp_destination,
    parse_table,
    write_config,
)
from peers.mllp_receiver import read_record
from peers.mllp_sender import all_control_ids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

FAST_RETRY: dict[str, Any] = {
    "backoff": {"initial_s": 0.05, "max_s": 0.5},
    "breaker": {"failures": 3, "cooldown_s": 0.3},
}


class Setup:
    """One gateway (listener ``his`` -> destination ``lis``) and the LIS it feeds."""

    def __init__(
        self,
        tmp_path: Path,
        state_dir: Path,
        free_port: Callable[[], int],
        procs: list[Proc],
        *receiver_options: str,
        **delivery: Any,
    ) -> None:
        self.tmp = tmp_path
        self.procs = procs
        http_port, mllp_port, self.lis_port = free_port(), free_port(), free_port()
        self.receiver = Receiver(self.lis_port, tmp_path / "lis-record.txt", *receiver_options)
        procs.append(self.receiver)
        config = write_config(
            tmp_path / "gateway.yaml",
            state_dir=state_dir,
            http_port=http_port,
            mllp_port=mllp_port,
            destinations=[mllp_destination("lis", self.lis_port, **(FAST_RETRY | delivery))],
        )
        self.gateway = Gateway(config, http_port, mllp_port)
        procs.append(self.gateway)

    def send(self, prefix: str, count: int, connections: int = 1) -> list[str]:
        """Send ``count`` messages and return the control ids the gateway ACKed (AA)."""
        sender = SenderProc(
            self.gateway.mllp_port,
            self.tmp / f"acked-{prefix}.txt",
            count=count,
            connections=connections,
            prefix=prefix,
            deadline_s=60,
        )
        self.procs.append(sender)
        print(sender.start().finish(timeout_s=90))
        return read_lines(sender.acked)

    def received(self) -> list[str]:
        return [cid for cid, _ in read_record(self.receiver.record)]

    def queue_rows(self, state: str) -> list[dict[str, str]]:
        out = self.gateway.queue(
            "list", "--destination", "lis", "--state", state, "--limit", "1000"
        )
        assert out.returncode == 0, out.stderr
        return parse_table(out.stdout)


def test_destination_down_then_back_delivers_everything_in_order(
    tmp_path: Path, state_dir: Path, free_port: Callable[[], int], procs: list[Proc]
) -> None:
    s = Setup(tmp_path, state_dir, free_port, procs, ordered=True)
    s.receiver.start()
    s.gateway.start()
    before = s.send("UP", 20)
    s.gateway.wait_drained(timeout_s=30)
    assert s.received() == all_control_ids("UP", 20, 1)

    assert s.receiver.terminate() == 0
    during = s.send("DOWN", 40)
    assert during == all_control_ids("DOWN", 40, 1), "the gateway must ACK while the LIS is down"

    health = s.gateway.wait_health(
        lambda doc: (
            doc["destinations"]["lis"]["breaker"] != "closed"
            and doc["destinations"]["lis"]["pending"] == 40
        ),
        timeout_s=30,
        what="the LIS breaker to open with 40 pending",
    )
    assert health["status"] == "degraded"
    lis = health["destinations"]["lis"]
    assert lis["last_error"], lis
    assert lis["delivered"] == 20 and lis["dead"] == 0
    assert lis["oldest_pending_s"] is not None

    rows = s.queue_rows("pending")
    assert sorted(r["control_id"] for r in rows) == sorted(during)
    assert all(r["state"] == "pending" and r["destination"] == "lis" for r in rows)
    head = next(r for r in rows if r["control_id"] == during[0])
    assert int(head["attempts"]) >= 1, head
    assert "connect" in head["last_error"], head  # e.g. "cannot connect to 127.0.0.1:P: ..."
    # ordered: nothing behind the head was tried
    assert all(r["attempts"] == "0" for r in rows if r["control_id"] != during[0]), rows

    s.receiver.start()
    s.gateway.wait_drained(timeout_s=30)
    health = s.gateway.wait_health(
        lambda doc: doc["status"] == "ok", timeout_s=10, what="status ok after the LIS is back"
    )
    assert health["destinations"]["lis"]["breaker"] == "closed"
    assert health["destinations"]["lis"]["delivered"] == 60
    assert s.received() == before + during, "order broken or messages lost/duplicated"


@pytest.mark.parametrize("nack", [("--nack-first", "5"), ("--nack-every", "3")])
def test_negative_acks_are_retried_in_order(
    tmp_path: Path,
    state_dir: Path,
    free_port: Callable[[], int],
    procs: list[Proc],
    nack: tuple[str, str],
) -> None:
    s = Setup(tmp_path, state_dir, free_port, procs, *nack, ordered=True)
    s.receiver.start()
    s.gateway.start()
    acked = s.send("NAK", 30)
    assert acked == all_control_ids("NAK", 30, 1)
    s.gateway.wait_drained(timeout_s=30)
    assert s.received() == acked, "AE'd messages must be resent before the next one"

    assert s.receiver.terminate() == 0
    m = re.search(r"receiver received=(\d+) accepted=(\d+)", s.receiver.log_tail())
    assert m, s.receiver.log_tail()
    frames, accepted = int(m.group(1)), int(m.group(2))
    naks = frames - accepted
    assert accepted == 30 and naks >= 5

    done = s.queue_rows("done")
    assert len(done) == 30
    assert sum(int(r["attempts"]) for r in done) == frames, "every NAK counts as an attempt"
    if nack[0] == "--nack-first":
        first = next(r for r in done if r["control_id"] == acked[0])
        assert first["attempts"] == "6", first
    metrics = s.gateway.metrics()
    assert f'medgw_delivery_failures_total{{destination="lis"}} {naks}.0' in metrics
    assert 'medgw_messages_delivered_total{destination="lis"} 30.0' in metrics


def test_dead_deliveries_go_out_after_queue_retry(
    tmp_path: Path, state_dir: Path, free_port: Callable[[], int], procs: list[Proc]
) -> None:
    # a breaker that stays closed: each delivery fails its two attempts without waiting
    breaker = {"failures": 1000, "cooldown_s": 0.3}
    s = Setup(
        tmp_path,
        state_dir,
        free_port,
        procs,
        ordered=False,
        workers=4,
        max_attempts=2,
        breaker=breaker,
    )
    s.gateway.start()  # the LIS is not running
    acked = s.send("DEAD", 20, connections=2)
    assert sorted(acked) == sorted(all_control_ids("DEAD", 20, 2))

    health = s.gateway.wait_health(
        lambda doc: doc["destinations"]["lis"]["dead"] == 20,
        timeout_s=30,
        what="all 20 deliveries to go dead",
    )
    assert health["status"] == "degraded"
    assert health["destinations"]["lis"]["pending"] == 0
    dead = s.queue_rows("dead")
    assert sorted(r["control_id"] for r in dead) == sorted(acked)
    assert all(r["attempts"] == "2" and "connect" in r["last_error"] for r in dead), dead

    s.receiver.start()
    retry = s.gateway.queue("retry", "--destination", "lis")
    assert retry.returncode == 0, retry.stderr
    assert retry.stdout.strip() == "20 deliveries due now"
    s.gateway.wait_health(
        lambda doc: doc["destinations"]["lis"]["delivered"] == 20,
        timeout_s=30,
        what="the retried deliveries to go out",
    )
    health = s.gateway.wait_drained(timeout_s=10)
    assert health["destinations"]["lis"]["dead"] == 0
    assert sorted(s.received()) == sorted(acked)
    assert not s.queue_rows("dead")


def test_pending_deliveries_survive_a_gateway_restart(
    tmp_path: Path, state_dir: Path, free_port: Callable[[], int], procs: list[Proc]
) -> None:
    s = Setup(tmp_path, state_dir, free_port, procs, ordered=True)
    s.gateway.start()  # the LIS is not running
    acked = s.send("RESUME", 25)
    assert acked == all_control_ids("RESUME", 25, 1)
    s.gateway.wait_health(
        lambda doc: doc["destinations"]["lis"]["pending"] == 25,
        timeout_s=10,
        what="25 pending",
    )
    assert s.gateway.terminate() == 0, s.gateway.log_tail()
    assert "gateway.stopped" in s.gateway.log_tail(5)

    s.receiver.start()
    s.gateway.start()
    health = s.gateway.wait_drained(timeout_s=30)
    assert health["destinations"]["lis"]["delivered"] == 25
    assert s.received() == acked, "resumed deliveries out of order, lost or duplicated"
    stats = s.gateway.queue("stats")
    rows = parse_table(stats.stdout)
    assert rows == [
        {"destination": "lis", "pending": "0", "done": "25", "dead": "0", "oldest_pending": "-"}
    ], stats.stdout


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_unordered_destination_down_does_not_busy_loop(
    tmp_path: Path, state_dir: Path, free_port: Callable[[], int], procs: list[Proc]
) -> None:
    s = Setup(
        tmp_path,
        state_dir,
        free_port,
        procs,
        ordered=False,
        workers=4,
        breaker={"failures": 3, "cooldown_s": 60},
    )
    s.gateway.start()  # the LIS is not running
    s.send("IDLE", 8)
    s.gateway.wait_health(
        lambda doc: doc["destinations"]["lis"]["breaker"] == "open",
        timeout_s=30,
        what="the breaker to open",
    )
    # the workers hold the 8 deliveries and wait out the cooldown: nothing to do for 60 s
    cpu, wall = _cpu_seconds(s.gateway.pid), time.monotonic()
    time.sleep(2.0)  # a measuring window, not a wait for an event
    used = (_cpu_seconds(s.gateway.pid) - cpu) / (time.monotonic() - wall)
    print(f"gateway CPU while waiting out the breaker: {used:.0%}")
    assert used < 0.2, f"the gateway burns {used:.0%} of a core while it has nothing to do"
