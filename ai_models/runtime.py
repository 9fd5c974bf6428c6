"""ONNX Runtime sessions: loaded once, run off the event loop, bounded, with a time budget.

Each model gets one ``InferenceSession`` (CUDA when onnxruntime offers it, else CPU)
and a small thread pool of ``workers`` threads; at most ``workers + queue`` images
wait or run at once, beyond that :meth:`ModelRuntime.infer` refuses at once
(``busy``) so a burst of X-rays slows triage, never ingest. A run that overstays
its budget is told to stop (``RunOptions.terminate``) and reported as a timeout;
the caller forwards the study unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ai_models.card import CardError, ModelCard, card_from_metadata, cross_check, verify_sha256

log = logging.getLogger(__name__)
ort.set_default_logger_severity(3)


class InferenceError(RuntimeError):
    """The model could not give a result (the reason is recorded, the study goes on)."""


class ModelBusy(InferenceError):
    """More images waiting than the queue holds."""


class ModelTimeout(InferenceError):
    """The run overstayed the time budget."""


def providers() -> list[str]:
    """CUDA first when this onnxruntime build has it (onnxruntime-gpu), then CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    workers: int = 1  # images run at once per model
    queue: int = 8  # images that may wait for a worker
    intra_op_threads: int = 0  # 0: onnxruntime's default (cores)


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    x = logits.astype(np.float64).reshape(-1)
    if activation == "softmax":
        e = np.exp(x - x.max())
        return np.asarray(e / e.sum(), dtype=np.float64)
    if activation == "sigmoid":
        return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float64)
    return x


class ModelRuntime:
    """One model, ready to run (or the reason it is not)."""

    def __init__(
        self, card: ModelCard, model_file: Path, settings: RuntimeSettings = RuntimeSettings()
    ) -> None:
        self.card = card
        self.model_file = model_file
        self.settings = settings
        self.session: Any = None
        self.unavailable = "not loaded"
        self.provider = ""
        self._slots = threading.BoundedSemaphore(settings.workers + settings.queue)
        self._pool = ThreadPoolExecutor(settings.workers, thread_name_prefix=f"ai-{card.id}")

    def load(self) -> bool:
        """Check the file against the card and open the session; False (with the reason
        in ``unavailable``) when the model cannot be used."""
        try:
            verify_sha256(self.card, self.model_file)
            options = ort.SessionOptions()
            options.log_severity_level = 3  # errors only: graph-cleanup notes are not ours
            if self.settings.intra_op_threads:
                options.intra_op_num_threads = self.settings.intra_op_threads
            session = ort.InferenceSession(
                str(self.model_file), sess_options=options, providers=providers()
            )
            self._check(session)
        except (CardError, OSError, ValueError) as err:
            self.unavailable = str(err)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types
            self.unavailable = f"cannot load {self.model_file.name}: {err}"
        else:
            self.session = session
            self.provider = session.get_providers()[0]
            self.unavailable = ""
            log.info(
                "ai.model_loaded model=%s version=%s provider=%s",
                self.card.id,
                self.card.version,
                self.provider,
            )
            return True
        log.error("ai.model_unavailable model=%s reason=%s", self.card.id, self.unavailable)
        return False

    def _check(self, session: Any) -> None:
        """The card embedded in the model (if any) agrees; the named input/output exist."""
        meta = session.get_modelmeta().custom_metadata_map
        differences = cross_check(self.card, card_from_metadata(meta, self.model_file))
        if differences:
            raise CardError(self.model_file, "embedded card differs: " + "; ".join(differences))
        self._check_io(session)

    def _check_io(self, session: Any) -> None:
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        if self.card.input.name not in inputs:
            raise ValueError(f"model has no input {self.card.input.name!r} (has {sorted(inputs)})")
        if self.card.output.name not in outputs:
            raise ValueError(
                f"model has no output {self.card.output.name!r} (has {sorted(outputs)})"
            )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def run_sync(self, tensor: np.ndarray, options: Any = None) -> np.ndarray:
        """Probabilities (after the card's activation) for one prepared image."""
        if self.session is None:
            raise InferenceError(f"model unavailable: {self.unavailable}")
        if options is None:
            options = ort.RunOptions()
            options.log_severity_level = 4  # the error is raised below, with its message
        try:
            out = self.session.run(
                [self.card.output.name], {self.card.input.name: tensor}, options
            )[0]
        except Exception as err:
            raise InferenceError(f"model error: {str(err).strip()}") from err  # ORT ends with \n
        probs = activate(np.asarray(out), self.card.output.activation)
        if probs.size != len(self.card.output.labels):
            raise InferenceError(
                f"model gave {probs.size} outputs, the card lists "
                f"{len(self.card.output.labels)} labels"
            )
        return probs

    async def infer(self, tensor: np.ndarray, budget_s: float) -> tuple[np.ndarray, float]:
        """(probabilities, milliseconds) within ``budget_s``; raises InferenceError."""
        if self.session is None:
            raise InferenceError(f"model unavailable: {self.unavailable}")
        if not self._slots.acquire(blocking=False):
            raise ModelBusy(f"busy: more than {self.settings.queue} images waiting")
        options = ort.RunOptions()
        options.log_severity_level = 4  # a run stopped at the budget is reported by us, once
        loop = asyncio.get_running_loop()
        started = time.perf_counter()

        def run() -> np.ndarray:
            try:
                return self.run_sync(tensor, options)
            finally:
                self._slots.release()

        future = loop.run_in_executor(self._pool, run)
        try:
            async with asyncio.timeout(budget_s):
                probs = await asyncio.shield(future)
        except TimeoutError:
            options.terminate = True  # the running call returns with an error soon
            future.add_done_callback(_consume)
            raise ModelTimeout(f"timeout: no result within {budget_s:g} s") from None
        except asyncio.CancelledError:
            # the caller gave up first (its own budget, a shutdown): stop the run as well,
            # or it keeps the worker and its slot until the model is done
            options.terminate = True
            future.add_done_callback(_consume)
            raise
        return probs, (time.perf_counter() - started) * 1000.0


def _consume(future: asyncio.Future[Any]) -> None:
    with contextlib.suppress(BaseException):
        future.result()
