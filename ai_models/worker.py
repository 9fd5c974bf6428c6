"""Triage work in separate, lower-priority processes: decode, preprocess, infer, build SR/SC.

The gateway's own process receives and journals; on a 2-core edge server the
Python parts of triage (decoding, highdicom) would otherwise compete with it for
the interpreter lock and slow ingest down. A worker process runs at a lower CPU
priority (``nice``), so a burst of chest X-rays slows triage, never ingest. Each
process loads a model once (sha256 checked again) and keeps its session.
Functions here are the jobs; they take file paths and plain values (picklable).
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pydicom

from ai_models.card import ModelCard, load_card, model_path, verify_sha256
from ai_models.preprocess import prepare
from ai_models.runtime import InferenceError, activate, providers
from dicom.ai_objects import build_sc, build_sr
from gateway.triage import TriageResult

_SESSIONS: dict[str, tuple[ModelCard, Any]] = {}
_THREADS = 1


def init(nice: int, threads: int) -> None:
    """Worker start: lower priority, quiet onnxruntime, its thread count."""
    global _THREADS  # noqa: PLW0603 - per-process setting, set once at start
    _THREADS = threads
    if nice:
        os.nice(nice)
    ort.set_default_logger_severity(4)  # model errors come back as exceptions, reported once


def _session(card_file: str) -> tuple[ModelCard, Any]:
    found = _SESSIONS.get(card_file)
    if found is None:
        card = load_card(card_file)
        model_file = model_path(card, card_file)
        verify_sha256(card, model_file)
        options = ort.SessionOptions()
        options.log_severity_level = 4
        if _THREADS:
            options.intra_op_num_threads = _THREADS
        session = ort.InferenceSession(str(model_file), sess_options=options, providers=providers())
        found = _SESSIONS[card_file] = (card, session)
    return found


def warm(card_files: list[str]) -> int:
    """Load the models before the first image (the pool starts with this job); one that
    cannot load is skipped here (its runtime in the gateway reports why)."""
    for card_file in card_files:
        try:
            _session(card_file)
        except Exception:  # noqa: BLE001, S112 - reported by the gateway's own check
            continue
    return os.getpid()


def _read(source: str | bytes, header_only: bool = False) -> pydicom.Dataset:
    data: Any = source if isinstance(source, str) else io.BytesIO(source)
    return pydicom.dcmread(data, stop_before_pixels=header_only, force=True)


def infer(
    card_file: str,
    source: str | bytes,
    want_display: bool,
    template_json: bytes | None = None,
    sr: bool = False,
) -> tuple[list[float], float, np.ndarray | None, tuple[dict[str, bytes], list[str]] | None]:
    """(probabilities, inference ms, the display image if asked, the SR/SC built from
    ``template_json`` completed with the findings — or None without a template)."""
    card, session = _session(card_file)
    prepared = prepare(_read(source), card.preprocessing, card.input)
    started = time.perf_counter()
    try:
        out = session.run([card.output.name], {card.input.name: prepared.tensor})[0]
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types
        raise InferenceError(f"model error: {str(err).strip()}") from None
    ms = (time.perf_counter() - started) * 1000.0
    probs = activate(np.asarray(out), card.output.activation)
    if probs.size != len(card.output.labels):
        raise InferenceError(
            f"model gave {probs.size} outputs, the card lists {len(card.output.labels)} labels"
        )
    display = prepared.display if want_display else None
    outputs = None
    if template_json is not None and (sr or want_display):
        from ai_models.triage import result_of  # noqa: PLC0415 - triage imports this module

        template = TriageResult.from_json(template_json)
        result = result_of(template, card, probs, ms)
        outputs = build(result.to_json(), source, sr, want_display, display)
    return probs.tolist(), ms, display, outputs


def build(
    result_json: bytes, source: str | bytes, sr: bool, sc: bool, display: np.ndarray | None
) -> tuple[dict[str, bytes], list[str]]:
    """The SR and/or SC of a result ({"sr": bytes, ...}, problems) — built here, not in
    the gateway's process (highdicom is pure Python)."""
    result = TriageResult.from_json(result_json)
    made: dict[str, bytes] = {}
    problems: list[str] = []
    if sr:
        try:
            made["sr"] = build_sr(result, _read(source, header_only=True))
        except Exception as err:  # noqa: BLE001 - odd source headers; highdicom's types
            problems.append(f"SR not built: {err}")
    if sc and display is not None:
        try:
            made["sc"] = build_sc(result, _read(source), display, None)
        except Exception as err:  # noqa: BLE001
            problems.append(f"SC not built: {err}")
    return made, problems


def source_of(envelope: Any) -> str | bytes:
    """What a worker reads: the journal's blob file (no copy), else the bytes."""
    path: Path | None = getattr(envelope, "blob_path", None)
    return str(path) if path is not None else bytes(envelope.body)
