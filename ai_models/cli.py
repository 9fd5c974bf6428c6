"""``medgw models list|check|run`` and ``medgw ai history``, for technicians.

``list`` shows the configured models and their cards; ``check`` loads each model
as the gateway would (sha256, embedded card, inputs/outputs) and runs it once on
a blank image; ``run IMAGE`` triages one DICOM file or PNG and prints what the
gateway would decide (applies-to refusal, probabilities, priority) without
sending anything; ``ai history`` lists the audit trail.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ai_models.card import CardError, ModelCard, load_card, model_path
from ai_models.history import FILE_NAME, History
from ai_models.preprocess import PreprocessError, image_from_png, prepare
from ai_models.runtime import InferenceError, ModelRuntime
from ai_models.triage import ELIGIBILITY, findings_of, priority_of
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError

DEFAULT_CONFIG = "/etc/medgw/gateway.yaml"


def _config(path: str, registry: Any) -> GatewayConfig | None:
    try:
        return load_config(path, registry)
    except ConfigError as err:
        print(f"{path}: {len(err.problems)} error(s)", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def _cards(args: argparse.Namespace, registry: Any) -> dict[str, Path] | None:
    if args.card:
        return {Path(args.card).stem: Path(args.card)}
    cfg = _config(args.config, registry)
    return None if cfg is None else cfg.model_cards()


def _load(card_file: Path) -> tuple[ModelCard, ModelRuntime]:
    card = load_card(card_file)
    runtime = ModelRuntime(card, model_path(card, card_file))
    runtime.load()
    return card, runtime


def cmd_list(args: argparse.Namespace, registry: Any) -> int:
    cards = _cards(args, registry)
    if cards is None:
        return 2
    if not cards:
        print("no models configured (models: in the gateway config)")
    for model_id, path in cards.items():
        try:
            card = load_card(path)
        except CardError as err:
            print(f"{model_id:20} CARD ERROR {err}")
            continue
        labels = ", ".join(card.output.labels[:6]) + (" ..." if len(card.output.labels) > 6 else "")
        print(f"{model_id:20} {card.id} {card.version}  {path}")
        print(f"{'':20} applies to: {card.applies_to.summary()}")
        print(f"{'':20} labels: {labels}; urgent: {', '.join(card.output.urgent) or '-'}")
    return 0


def cmd_check(args: argparse.Namespace, registry: Any) -> int:
    cards = _cards(args, registry)
    if cards is None:
        return 2
    bad = 0
    for model_id, path in cards.items():
        try:
            card, runtime = _load(path)
        except CardError as err:
            print(f"{model_id}: FAILED {err}")
            bad += 1
            continue
        if runtime.session is None:
            print(f"{model_id}: FAILED {runtime.unavailable}")
            bad += 1
            continue
        shape = [1 if not isinstance(d, int) or d < 1 else d for d in card.input.shape]
        started = time.perf_counter()
        try:
            probs = runtime.run_sync(np.zeros(shape, dtype=np.float32))
        except InferenceError as err:
            print(f"{model_id}: FAILED {err}")
            bad += 1
            continue
        ms = (time.perf_counter() - started) * 1000
        print(
            f"{model_id}: OK {card.id} {card.version} sha256 verified, provider "
            f"{runtime.provider}, {probs.size} outputs, test run {ms:.0f} ms"
        )
        runtime.close()
    return 1 if bad else 0


def cmd_run(args: argparse.Namespace, registry: Any) -> int:
    cards = _cards(args, registry)
    if cards is None:
        return 2
    if args.model:
        cards = {k: v for k, v in cards.items() if k == args.model}
        if not cards:
            print(f"medgw models run: no model {args.model!r} configured", file=sys.stderr)
            return 2
    image = Path(args.image)
    try:
        if image.suffix.lower() == ".png":
            ds = image_from_png(image)
        else:
            ds = pydicom.dcmread(image, force=True)
    except (OSError, ValueError, InvalidDicomError) as err:  # PreprocessError is a ValueError
        print(f"medgw models run: cannot read {image}: {err}", file=sys.stderr)
        return 2
    facts = {k: str(ds.get(k, "") or "") for k in ELIGIBILITY}
    for model_id, path in cards.items():
        try:
            card, runtime = _load(path)
        except CardError as err:
            print(f"{model_id}: card error: {err}")
            return 1
        refusal = card.applies_to.refusal(facts)
        if refusal and not args.force:
            print(f"{model_id}: not applicable: {refusal} (forwarded unchanged; --force to run)")
            continue
        if refusal:
            print(f"{model_id}: not applicable: {refusal} (run anyway: --force)")
        if runtime.session is None:
            print(f"{model_id}: model unavailable: {runtime.unavailable}")
            return 1
        started = time.perf_counter()
        try:
            prepared = prepare(ds, card.preprocessing, card.input)
            probs = runtime.run_sync(prepared.tensor)
        except (PreprocessError, InferenceError) as err:
            print(f"{model_id}: FAILED {err} (the gateway forwards such an image unchanged)")
            runtime.close()
            return 1
        ms = (time.perf_counter() - started) * 1000
        findings = findings_of(card, probs)
        print(
            f"{model_id}: priority {priority_of(card, findings)} ({ms:.0f} ms, {runtime.provider})"
        )
        for f in sorted(findings, key=lambda f: -f.probability):
            mark = " URGENT" if f.urgent else " positive" if f.positive else ""
            print(f"  {f.label:24} {f.probability:.3f} (threshold {f.threshold:g}){mark}")
        runtime.close()
    return 0


def cmd_history(args: argparse.Namespace, registry: Any) -> int:
    cfg = _config(args.config, registry)
    if cfg is None:
        return 2
    if not (Path(cfg.state_dir) / FILE_NAME).exists():
        print("no AI history yet")
        return 0
    history = History(cfg.state_dir)
    try:
        rows = history.rows(args.study, args.limit)
    finally:
        history.close()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"]))
        ms = f"{r['duration_ms']:.0f} ms" if r["duration_ms"] is not None else "-"
        what = r["priority"] or r["reason"]
        if r["priority"] and r["reason"]:  # done, but not re-issued or an object not built
            what += f" ({r['reason']})"
        sent = ",".join(r["sent"]) if r["sent"] else "-"
        print(
            f"{when} {r['model_id']} {r['model_version']} {r['status']:8} {what} "
            f"study={r['study_uid']} sop={r['sop_uid']} {ms} sent={sent}"
        )
    return 0


def _source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help="gateway config (its models:)")
    p.add_argument("--card", help="a model card file instead of the config's models")


def setup_models(subparsers: Any) -> None:
    p = subparsers.add_parser("models", help="AI triage models: list, check, try on an image")
    sub = p.add_subparsers(dest="models_command", required=True)
    ls = sub.add_parser("list", help="the configured models and their cards")
    _source(ls)
    ls.set_defaults(func=cmd_list)
    ck = sub.add_parser("check", help="load each model as the gateway would, run it once")
    _source(ck)
    ck.set_defaults(func=cmd_check)
    run = sub.add_parser("run", help="triage one image (DICOM or PNG); sends nothing")
    run.add_argument("image", metavar="IMAGE")
    run.add_argument("--model", help="only this model id")
    run.add_argument("--force", action="store_true", help="run even if the card does not apply")
    _source(run)
    run.set_defaults(func=cmd_run)


def setup_ai(subparsers: Any) -> None:
    p = subparsers.add_parser("ai", help="AI triage audit trail")
    sub = p.add_subparsers(dest="ai_command", required=True)
    h = sub.add_parser("history", help="every triage decision, newest first")
    h.add_argument("--config", default=DEFAULT_CONFIG)
    h.add_argument("--study", help="only this StudyInstanceUID")
    h.add_argument("--limit", type=int, default=50)
    h.add_argument("--json", action="store_true")
    h.set_defaults(func=cmd_history)
