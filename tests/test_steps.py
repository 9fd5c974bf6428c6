"""Route steps: pass-through, derived envelopes, consumption, config errors, resume."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel

from drivers import folder
from gateway.config import Route, parse_config
from gateway.envelope import Envelope, StoredEnvelope, utcnow
from gateway.errors import ConfigError, TransientError
from gateway.registry import PluginContext, Registry
from gateway.service import Gateway
from gateway.steps import AnyEnvelope, StepChain


class UpperParams(BaseModel):
    keep_original: bool = False


class Upper:
    """Derives an upper-cased copy; optionally passes the original on too."""

    def __init__(self, params: UpperParams) -> None:
        self.params = params

    async def run(self, envelope: AnyEnvelope) -> Sequence[AnyEnvelope]:
        copy = Envelope(
            kind=envelope.kind,
            source=envelope.source,
            body=envelope.body.upper(),
            headers={**envelope.headers, "derived": "upper"},
        )
        return [envelope, copy] if self.params.keep_original else [copy]


class Sink(BaseModel):
    mode: Literal["consume", "flaky"] = "consume"


SEEN: list[bytes] = []


class Consume:
    def __init__(self, params: Sink) -> None:
        self.params = params
        self.calls = 0

    async def run(self, envelope: AnyEnvelope) -> Sequence[AnyEnvelope]:
        self.calls += 1
        if self.params.mode == "flaky" and self.calls < 3:
            raise TransientError("not yet")
        SEEN.append(envelope.body)
        return []


def registry() -> Registry:
    reg = Registry()
    folder.register(reg)
    reg.step("upper", UpperParams, lambda p, ctx: Upper(p), "upper-case copy")
    reg.step("consume", Sink, lambda p, ctx: Consume(p), "store and stop")
    return reg


def config(tmp_path: Path, routes: str) -> str:
    return f"""
site: {{id: t}}
state_dir: {tmp_path / "state"}
http: {{listen: null}}
journal: {{min_free_mb: 0}}
destinations:
  - {{id: out, type: folder, path: {tmp_path / "out"}}}
  - {{id: raw, type: folder, path: {tmp_path / "raw"}}}
routes:
{routes}
"""


def query(tmp_path: Path, sql: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(tmp_path / "state" / "journal.sqlite")) as conn:
        return conn.execute(sql).fetchall()


async def run_until(gw: Gateway, done: Callable[[], bool], timeout: float = 10.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    await asyncio.wait_for(gw.ready.wait(), 5)
    try:
        async with asyncio.timeout(timeout):
            while not done():
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await task


async def test_steps_derive_and_pass_original(tmp_path: Path) -> None:
    routes = """
  - {id: up, match: {kind: hl7}, steps: [{upper: {keep_original: true}}], to: [out]}
  - {match: {kind: hl7}, to: [raw]}
"""
    cfg = parse_config(config(tmp_path, routes), registry())
    gw = Gateway(cfg, registry())

    async def feed() -> None:
        await gw.ready.wait()
        await gw.accept(Envelope(kind="hl7", source="x", body=b"abc"))

    files = lambda d: sorted((tmp_path / d).glob("*")) if (tmp_path / d).exists() else []  # noqa: E731
    feeder = asyncio.create_task(feed())
    await run_until(gw, lambda: len(files("out")) == 2 and len(files("raw")) == 1)
    await feeder
    bodies = sorted(p.read_bytes() for p in files("out"))
    assert bodies == [b"ABC", b"abc"]  # derived copy and the original, unchanged
    assert files("raw")[0].read_bytes() == b"abc"
    rows = query(
        tmp_path,
        "SELECT e.parent_id IS NOT NULL, d.destination FROM envelopes e "
        "JOIN deliveries d ON d.seq = e.seq ORDER BY e.seq, d.destination",
    )
    # original: delivered to raw, to the chain, then passed on to out; the copy points to it
    assert rows == [(0, "out"), (0, "raw"), (0, "steps:up"), (1, "out")]


async def test_consuming_step_retries_and_forwards_nothing(tmp_path: Path) -> None:
    SEEN.clear()
    routes = "  - {id: c, match: {kind: order}, steps: [{consume: {mode: flaky}}], to: [out]}\n"
    routes = routes.replace(
        "to: [out]", "to: [out], delivery: {backoff: {initial_s: 0.01, max_s: 0.02}}"
    )
    cfg = parse_config(config(tmp_path, routes), registry())
    gw = Gateway(cfg, registry())

    async def feed() -> None:
        await gw.ready.wait()
        await gw.accept(Envelope(kind="order", source="x", body=b"o1"))

    feeder = asyncio.create_task(feed())
    await run_until(gw, lambda: SEEN == [b"o1"])
    await feeder
    assert not (tmp_path / "out").exists()
    state = query(tmp_path, "SELECT state, attempts FROM deliveries WHERE destination = 'steps:c'")
    assert state == [("done", 3)]


def test_unknown_step_and_bad_params_are_config_errors(tmp_path: Path) -> None:
    routes = """
  - {match: {kind: hl7}, steps: [nope], to: [out]}
  - {match: {kind: hl7}, steps: [{upper: {keep_original: maybe}}], to: [out]}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(config(tmp_path, routes), registry())
    text = "\n".join(err.value.problems)
    assert "routes[0].steps[0]: unknown step 'nope' (known: consume, upper)" in text
    assert "routes[1].steps[0].upper.keep_original" in text


def test_plugin_context_services_are_shared() -> None:
    ctx = PluginContext("s", "/tmp", None)
    ctx.services["x"] = 1
    assert PluginContext("s", "/tmp", None).services == {}
    assert ctx.services == {"x": 1}


def test_route_keys_match_headers_by_loose_spelling() -> None:
    headers = {"Modality": "CR", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1", "calling_ae": "CR1"}
    assert Route(match={"modality": ["CR", "DX"]}, to=["x"]).matches("dicom", "s", headers)
    assert Route(match={"sop_class_uid": "1.2.840.10008.5.1.4.1.1.1"}, to=["x"]).matches(
        "dicom", "s", headers
    )
    assert Route(match={"CallingAE": "CR1"}, to=["x"]).matches("dicom", "s", headers)
    assert not Route(match={"modality": "CT"}, to=["x"]).matches("dicom", "s", headers)
    assert not Route(match={"station_name": "X"}, to=["x"]).matches("dicom", "s", headers)


class Marked:
    """Derives one envelope per destination class: plain, notification, routed event."""

    async def run(self, envelope: AnyEnvelope) -> Sequence[AnyEnvelope]:
        def derived(**headers: str) -> Envelope:
            return Envelope(kind="x", source=envelope.source, body=b"d", headers=headers)

        return [envelope, derived(), derived(notify="true"), derived(route="true")]


async def test_derived_envelopes_go_to_to_notify_or_the_routing_table() -> None:
    calls: list[tuple[str, object]] = []

    class Recorder:
        async def accept(self, envelope: Envelope, destinations: list[str] | None = None) -> None:
            calls.append(
                (envelope.headers.get("notify", envelope.headers.get("route", "")), destinations)
            )

        async def forward(self, seq: int, destinations: list[str]) -> None:
            calls.append(("forward", destinations))

    chain = StepChain("steps:t", [Marked()], ["pacs"], Recorder(), notify=["ris"])
    stored = StoredEnvelope("id1", 1, "dicom", "scp", {}, None, None, utcnow(), b"orig")
    await chain.send(stored)
    assert calls == [
        ("forward", ["pacs"]),
        ("", ["pacs"]),
        ("true", ["ris"]),
        ("true", None),
    ]


class PassesFirst:
    passes_first = True

    def __init__(self, calls: list[tuple[str, object]]) -> None:
        self.calls = calls

    async def run(self, envelope: AnyEnvelope) -> Sequence[AnyEnvelope]:
        self.calls.append(("step ran", None))
        return [envelope]


async def test_a_step_that_always_passes_its_input_lets_it_go_first() -> None:
    """ai-triage: the original is forwarded before the model runs, never after."""
    calls: list[tuple[str, object]] = []

    class Recorder:
        async def accept(self, envelope: Envelope, destinations: list[str] | None = None) -> None:
            calls.append(("accept", destinations))

        async def forward(self, seq: int, destinations: list[str]) -> None:
            calls.append(("forward", destinations))

    chain = StepChain("steps:t", [PassesFirst(calls)], ["pacs"], Recorder())
    stored = StoredEnvelope("id1", 1, "dicom", "scp", {}, None, None, utcnow(), b"orig")
    await chain.send(stored)
    assert calls == [("forward", ["pacs"]), ("step ran", None)]
