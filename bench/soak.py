"""Soak: DICOM, HL7 and ASTM traffic through one gateway while everything around it fails.

For ``--minutes`` a CT modality (pynetdicom), a HIS (MLLP) and a hematology
analyzer (ASTM E1381 over TCP, the real Sysmex XN-550 capture) send at once to
one gateway, which forwards the images to a PACS (DCMTK ``storescp``) and the
HIS messages and the analyzer's results (as ORU^R01) to a LIS (an MLLP server).
Meanwhile, at random moments, the gateway is SIGKILLed and restarted on the same
state folder, the PACS is killed and restarted, and the LIS goes down and comes
back. Senders retry until the gateway accepts, as real devices do.

At the end everything comes back up, the gateway drains, and the report counts,
per flow: items accepted by the gateway, delivered, delivered more than once
(at-least-once delivery allows it; the count is the cost of the crashes), lost
(accepted and never delivered: must be 0) and altered (delivered bytes that are
not what was sent: must be 0); and, sampled every second, the gateway's resident
memory and open file descriptors, with the trend of each over the longest run
between two kills.

    .venv/bin/python bench/soak.py --minutes 30 --json bench/out/soak.json
    .venv/bin/python bench/soak.py --minutes 1.5 --kill-every 20     # the test's short form

Exit status 0 when nothing was lost or altered, no item went dead and neither
memory nor descriptors grew; 1 otherwise. ``tests/test_soak.py`` runs the short
form and asserts on the JSON report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peers import PYTHON, REPO, free_port
from _soak_peers import (
    AnalyzerSender,
    HisSender,
    Lis,
    ModalitySender,
    Pacs,
    Sender,
    Tally,
    dataset_part,
    wait_until,
)

CAPTURE = Path(os.environ.get("MEDGW_SAMPLES", REPO.parent / "shared" / "samples")) / "lab"
XN550 = CAPTURE / "04_astm_sysmex_xn550.frame"
FAST_RETRY = {"backoff": {"initial_s": 0.1, "max_s": 1.0}, "breaker": {"cooldown_s": 1.0}}
RSS_GROWTH_MB_PER_MIN = 2.0  # a steady gateway stays below this over a long run
FD_GROWTH = 10  # descriptors: the end of a run against its start, idle both times


def gateway_config(work: Path, ports: dict[str, int]) -> dict[str, Any]:
    return {
        "site": {"id": "soak"},
        "state_dir": str(work / "state"),
        "http": {"listen": f"127.0.0.1:{ports['http']}"},
        "journal": {"min_free_mb": 64},
        "logging": {"level": "INFO", "format": "text"},
        "listeners": [
            {
                "id": "modalities",
                "type": "dicom-scp",
                "ae_title": "MEDGW",
                "listen": f"127.0.0.1:{ports['dicom']}",
                "study_quiet_s": 5,
            },
            {"id": "his", "type": "hl7-mllp", "listen": f"127.0.0.1:{ports['mllp']}"},
            {
                "id": "xn550",
                "type": "astm",
                "profile": "sysmex-xn",
                "transport": {"tcp_listen": f"127.0.0.1:{ports['astm']}"},
            },
        ],
        "destinations": [
            {
                "id": "pacs",
                "type": "dicom-store",
                "ae_title": "PACS",
                "connect": f"127.0.0.1:{ports['pacs']}",
                "connect_timeout_s": 2,
                "dimse_timeout_s": 10,
                "delivery": {"ordered": False, "workers": 2, **FAST_RETRY},
            },
            {
                "id": "lis",
                "type": "hl7-mllp",
                "connect": f"127.0.0.1:{ports['lis']}",
                "connect_timeout_s": 2,
                "ack_timeout_s": 10,
                "delivery": FAST_RETRY,
            },
        ],
        "routes": [
            {"id": "images", "match": {"kind": "dicom"}, "to": ["pacs"]},
            {"id": "his", "match": {"source": "his"}, "to": ["lis"]},
            {
                "id": "results",
                "match": {"kind": "lab-result", "qc": "false"},
                "steps": ["map-codes", "hl7-oru"],
                "to": ["lis"],
            },
        ],
    }


class Gateway:
    """``medgw run`` as a subprocess; SIGKILLed and restarted on the same state folder."""

    def __init__(self, config: Path, http_port: int, log: Path) -> None:
        self.config, self.http_port, self.log = config, http_port, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.lock = threading.Lock()  # a kill and a sample never interleave

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "gateway.cli", "run", "--config", str(self.config)],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.starts += 1
        wait_until(self.ready, 60, "the gateway's /healthz")

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"the gateway exited at start; see {self.log}")
        with contextlib.suppress(OSError):
            return self.health() is not None
        return False

    def health(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc

    def kill(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait()

    def terminate(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


class Sampler(threading.Thread):
    """The gateway's RSS, open descriptors and threads, every ``interval_s``."""

    def __init__(self, gateway: Gateway, interval_s: float = 1.0) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.gateway, self.interval_s = gateway, interval_s
        self.samples: list[dict[str, float]] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            with self.gateway.lock:
                proc = self.gateway.proc
                if proc is None or proc.poll() is not None:
                    continue
                sample = proc_sample(proc.pid)
            if sample:
                sample.update(t=round(time.monotonic() - self.t0, 1), run=self.gateway.starts)
                self.samples.append(sample)


def proc_sample(pid: int) -> dict[str, float] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
        "fds": fds,
        "threads": int(fields["Threads"]),
    }


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / var if var else 0.0


def resources(samples: list[dict[str, float]]) -> dict[str, Any]:
    """Per run between kills: memory and descriptors; the trend over the longest run."""
    runs: dict[int, list[dict[str, float]]] = {}
    for s in samples:
        runs.setdefault(int(s["run"]), []).append(s)
    if not runs:
        return {"runs": 0}
    longest = max(runs.values(), key=lambda r: r[-1]["t"] - r[0]["t"])
    settled = longest[len(longest) // 3 :]  # after start-up and warm-up
    return {
        "runs": len(runs),
        "samples": len(samples),
        "rss_mb_max": max(s["rss_mb"] for s in samples),
        "fds_max": max(s["fds"] for s in samples),
        "threads_max": max(s["threads"] for s in samples),
        "longest_run_s": round(longest[-1]["t"] - longest[0]["t"], 1),
        "rss_mb_per_min": round(slope_per_min([(s["t"], s["rss_mb"]) for s in settled]), 3),
        "fds_per_min": round(slope_per_min([(s["t"], s["fds"]) for s in settled]), 3),
        "per_run": [
            {
                "run": k,
                "seconds": round(r[-1]["t"] - r[0]["t"], 1),
                "rss_mb": [r[0]["rss_mb"], max(s["rss_mb"] for s in r), r[-1]["rss_mb"]],
                "fds": [r[0]["fds"], max(s["fds"] for s in r), r[-1]["fds"]],
            }
            for k, r in sorted(runs.items())
        ],
    }


def flow_report(
    tally: Tally,
    delivered: list[tuple[str, str]],
    delivered_at: dict[str, float],
    *,
    check_bytes: bool,
) -> dict[str, Any]:
    """Accepted vs delivered for one flow; ``delivered`` is (item id, sha256) per delivery."""
    seen = Counter(item for item, _ in delivered)
    accepted = set(tally.accepted)
    altered = sorted(
        {item for item, digest in delivered if check_bytes and tally.accepted.get(item) != digest}
        & accepted
    )
    return {
        "attempts": tally.attempts,
        "accepted": len(accepted),
        "delivered": len(set(seen) & accepted),
        "duplicate_deliveries": sum(k - 1 for k in seen.values() if k > 1),
        "lost": sorted(accepted - set(seen))[:20],
        "lost_count": len(accepted - set(seen)),
        "unknown": sorted(set(seen) - accepted)[:20],
        "altered": altered[:20],
        "failed_attempts": dict(tally.failures.most_common()),
        "latency_s": percentiles(
            [delivered_at[i] - t for i, t in tally.accepted_at.items() if i in delivered_at]
        ),
    }


def percentiles(values: list[float]) -> dict[str, float]:
    """Accepted-by-the-gateway to first delivery, in seconds (outages and kills included)."""
    if not values:
        return {}
    values = sorted(values)
    at = {f"p{q}": values[min(len(values) - 1, q * len(values) // 100)] for q in (50, 90, 99)}
    return {k: round(v, 2) for k, v in {**at, "max": values[-1]}.items()}


def pacs_deliveries(pacs: Pacs, modality: ModalitySender) -> list[tuple[str, str]]:
    """(SOP Instance UID, sha) per stored file; a file torn by a PACS kill is left out.

    A torn file holds a strict prefix of what was sent: storescp (``-B``, written
    as it arrives) was killed while writing it, before its C-STORE response, so
    the gateway had to send it again.
    """
    out = []
    for uid, digest, path in pacs.received():
        if digest != modality.tally.accepted.get(uid):
            sent = modality.folder / f"{uid.rsplit('.', 1)[-1]}.dcm"
            stored = dataset_part(path.read_bytes())
            whole = dataset_part(sent.read_bytes()) if sent.exists() else b""
            if len(stored) < len(whole) and whole.startswith(stored):
                continue
        out.append((uid, digest))
    return out


class Chaos(threading.Thread):
    """Kills the gateway and takes the destinations down at random moments."""

    def __init__(
        self, rng: random.Random, gateway: Gateway, pacs: Pacs, lis: Lis, kill_every_s: float
    ) -> None:
        super().__init__(name="soak-chaos", daemon=True)
        self.rng, self.gateway, self.pacs, self.lis = rng, gateway, pacs, lis
        self.kill_every_s = kill_every_s
        self.stop = threading.Event()
        self.events: list[str] = []
        self.timers: list[threading.Timer] = []
        self.t0 = time.monotonic()
        self.error: BaseException | None = None

    def log(self, what: str) -> None:
        line = f"{time.monotonic() - self.t0:7.1f}s {what}"
        self.events.append(line)
        print(line, flush=True)

    def run(self) -> None:
        try:
            next_kill = self.t0 + self.rng.uniform(0.5, 1.5) * self.kill_every_s
            while not self.stop.wait(self.rng.uniform(2, 6)):
                if time.monotonic() >= next_kill:
                    self.kill_gateway()
                    next_kill = time.monotonic() + self.rng.uniform(0.5, 1.5) * self.kill_every_s
                elif self.rng.random() < 0.5:
                    self.outage(self.pacs, "PACS")
                else:
                    self.outage(self.lis, "LIS")
        except BaseException as err:
            self.error = err
            raise

    def kill_gateway(self) -> None:
        with self.gateway.lock:
            rc = self.gateway.kill()
        self.log(f"gateway SIGKILLed (exit {rc}); restarting")
        time.sleep(self.rng.uniform(0, 1))
        self.gateway.start()
        self.log(f"gateway up again (start {self.gateway.starts})")

    def outage(self, peer: Pacs | Lis, name: str) -> None:
        if not peer.is_up:
            return
        seconds = self.rng.uniform(1, 8)
        peer.down()
        self.log(f"{name} down for {seconds:.1f}s")
        timer = threading.Timer(seconds, self._up, args=(peer, name))
        timer.daemon = True
        timer.start()
        self.timers.append(timer)

    def _up(self, peer: Pacs | Lis, name: str) -> None:
        peer.up()
        self.log(f"{name} up")


def drained(gateway: Gateway) -> bool:
    doc = gateway.health()
    return all(d["pending"] == 0 for d in doc["destinations"].values())


def run(
    minutes: float, kill_every_s: float, seed: int, work: Path, rates: dict[str, float]
) -> dict[str, Any]:
    rng = random.Random(seed)
    ports = {k: free_port() for k in ("http", "dicom", "mllp", "astm", "pacs", "lis")}
    config = work / "gateway.yaml"
    config.write_text(json.dumps(gateway_config(work, ports), indent=1))  # JSON is YAML
    gateway = Gateway(config, ports["http"], work / "gateway.log")
    pacs = Pacs(ports["pacs"], work / "pacs", work / "pacs.log")
    lis = Lis(ports["lis"])
    senders: list[Sender] = []
    sampler = Sampler(gateway)
    chaos = Chaos(rng, gateway, pacs, lis, kill_every_s)
    try:
        pacs.up()
        lis.up()
        gateway.start()
        senders = [
            ModalitySender(Tally("dicom"), rates["dicom"], ports["dicom"], work / "sent"),
            HisSender(Tally("hl7"), rates["hl7"], ports["mllp"]),
            AnalyzerSender(Tally("astm"), rates["astm"], ports["astm"], XN550.read_bytes()),
        ]
        sampler.start()
        start_fds = _idle_fds(gateway)
        for sender in senders:
            sender.start()
        chaos.start()
        time.sleep(minutes * 60)

        chaos.stop.set()
        chaos.join(120)
        for sender in senders:
            sender.stop()
        for sender in senders:
            sender.join(60)
        for timer in chaos.timers:
            timer.cancel()
        pacs.up()
        lis.up()
        if gateway.proc is None or gateway.proc.poll() is not None:
            gateway.start()
        chaos.log("traffic stopped, everything up; draining")
        drain_started = time.monotonic()
        wait_until(lambda: drained(gateway), 300, "the gateway to drain")
        drain_s = time.monotonic() - drain_started
        health = gateway.health()
        time.sleep(2)  # the last sample after the drain, idle
        end_fds = _idle_fds(gateway)
        sampler.stop.set()
        exit_code = gateway.terminate()
        gateway.proc = None
    finally:
        chaos.stop.set()
        sampler.stop.set()
        for sender in senders:
            sender.stop()
        for timer in chaos.timers:
            timer.cancel()
        gateway.terminate()
        pacs.down()
        lis.down()

    by_name = {s.tally.name: s for s in senders}
    modality = by_name["dicom"]
    assert isinstance(modality, ModalitySender)
    lis_hl7 = [(k, d) for k, d, _ in lis.received if k.startswith("SOAKH")]
    lis_oru = [(k, d) for k, d, _ in lis.received if k.startswith("SOAKA")]
    # every message carries the same results (only the sample id differs): so must each ORU
    result_sets = Counter(r for k, _, r in lis.received if k.startswith("SOAKA"))
    usual = result_sets.most_common(1)[0][0] if result_sets else ""
    odd_orus = sorted({k for k, _, r in lis.received if k.startswith("SOAKA") and r != usual})
    flows = {
        "dicom": flow_report(
            modality.tally, pacs_deliveries(pacs, modality), pacs.received_at(), check_bytes=True
        ),
        "hl7": flow_report(by_name["hl7"].tally, lis_hl7, lis.received_at, check_bytes=True),
        "astm": flow_report(by_name["astm"].tally, lis_oru, lis.received_at, check_bytes=False),
    }
    flows["astm"]["altered"] = odd_orus[:20]  # an ORU whose results differ from the others'
    flows["astm"]["distinct_result_sets"] = len(result_sets)
    dead = {d: v.get("dead", 0) for d, v in health["destinations"].items()}
    res = resources(sampler.samples)
    report = {
        "minutes": minutes,
        "seed": seed,
        "rates_per_s": rates,
        "gateway_starts": gateway.starts,
        "kills": gateway.starts - 1,
        "pacs_outages": pacs.outages,
        "lis_outages": lis.outages,
        "drain_s": round(drain_s, 1),
        "dead": dead,
        "flows": flows,
        "resources": res,
        "fds_idle": {"start": start_fds, "end": end_fds},
        "clean_exit_code": exit_code,
        "sender_errors": [repr(s.error) for s in senders if s.error is not None],
        "chaos_error": repr(chaos.error) if chaos.error else None,
        "events": chaos.events,
    }
    report["verdict"] = verdict(report)
    return report


def _idle_fds(gateway: Gateway) -> int:
    assert gateway.proc is not None
    sample = proc_sample(gateway.proc.pid)
    return int(sample["fds"]) if sample else -1


def verdict(report: dict[str, Any]) -> list[str]:
    """What went wrong, in words; empty when the soak passed."""
    problems = []
    for name, flow in report["flows"].items():
        if flow["lost_count"]:
            problems.append(f"{name}: {flow['lost_count']} accepted and never delivered")
        if flow["altered"]:
            problems.append(f"{name}: delivered altered: {flow['altered'][:5]}")
        if flow["unknown"]:
            problems.append(f"{name}: delivered items nobody sent: {flow['unknown'][:5]}")
        if not flow["accepted"]:
            problems.append(f"{name}: nothing was accepted")
    if any(report["dead"].values()):
        problems.append(f"dead deliveries: {report['dead']}")
    res = report["resources"]
    if res.get("longest_run_s", 0) >= 600 and res["rss_mb_per_min"] > RSS_GROWTH_MB_PER_MIN:
        problems.append(f"memory grows {res['rss_mb_per_min']} MB/min over the longest run")
    fds = report["fds_idle"]
    if fds["end"] > fds["start"] + FD_GROWTH:
        problems.append(f"open descriptors grew: {fds['start']} idle at start, {fds['end']} at end")
    if report["clean_exit_code"] != 0:
        problems.append(f"SIGTERM at the end: exit {report['clean_exit_code']}")
    if report["sender_errors"] or report["chaos_error"]:
        problems.append(f"bench errors: {report['sender_errors']} {report['chaos_error']}")
    return problems


def print_report(report: dict[str, Any]) -> None:
    print(
        f"\nsoak: {report['minutes']} min, seed {report['seed']}, {report['kills']} SIGKILLs, "
        f"PACS down {report['pacs_outages']}x, LIS down {report['lis_outages']}x, "
        f"drained in {report['drain_s']} s"
    )
    print(
        f"{'flow':6} {'accepted':>9} {'delivered':>9} {'duplicates':>10} {'lost':>5} "
        f"{'altered':>7}   latency p50/p99/max s"
    )
    for name, f in report["flows"].items():
        lat = f["latency_s"]
        print(
            f"{name:6} {f['accepted']:9} {f['delivered']:9} {f['duplicate_deliveries']:10} "
            f"{f['lost_count']:5} {len(f['altered']):7}   "
            f"{lat.get('p50')}/{lat.get('p99')}/{lat.get('max')}"
        )
    res = report["resources"]
    print(
        f"gateway: RSS max {res.get('rss_mb_max')} MB, trend {res.get('rss_mb_per_min')} MB/min "
        f"over the longest run ({res.get('longest_run_s')} s); fds max {res.get('fds_max')}, "
        f"idle {report['fds_idle']['start']} -> {report['fds_idle']['end']}; "
        f"threads max {res.get('threads_max')}"
    )
    print("verdict:", "PASS" if not report["verdict"] else "; ".join(report["verdict"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--kill-every", type=float, default=120.0, help="mean s between SIGKILLs")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--dicom-rate", type=float, default=8.0, help="instances/s offered")
    parser.add_argument("--hl7-rate", type=float, default=20.0, help="messages/s offered")
    parser.add_argument("--astm-rate", type=float, default=2.0, help="messages/s offered")
    parser.add_argument("--json", type=Path, help="write the whole report here")
    parser.add_argument("--workdir", type=Path, help="keep state, logs and PACS files here")
    args = parser.parse_args()
    for tool in ("storescp",):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install dcmtk", file=sys.stderr)
            return 2
    rates = {"dicom": args.dicom_rate, "hl7": args.hl7_rate, "astm": args.astm_rate}
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        print(f"soak: seed {args.seed}, work folder {work}", flush=True)
        report = run(args.minutes, args.kill_every, args.seed, work, rates)
        print_report(report)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))
    return 0 if not report["verdict"] else 1


if __name__ == "__main__":
    sys.exit(main())
