"""ModelRuntime: loading (and every reason a model is unavailable), activations, the
output count, model errors, the bounded queue and the time budget, with tiny ONNX
models built here (tests/ai_models_fixtures.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from ai_models_fixtures import (
    DEFAULT_LABELS,
    card_metadata,
    constant_model,
    echo_mean_model,
    raising_model,
    slow_model,
    write_card,
)

from ai_models.card import embeddable, load_card, model_path
from ai_models.runtime import (
    InferenceError,
    ModelBusy,
    ModelRuntime,
    ModelTimeout,
    RuntimeSettings,
    activate,
    providers,
)

IMAGE = np.zeros((1, 1, 224, 224), np.float32)


def runtime(card_file: Path, **settings: Any) -> ModelRuntime:
    card = load_card(card_file)
    rt = ModelRuntime(card, model_path(card, card_file), RuntimeSettings(**settings))
    rt.load()
    return rt


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., ModelRuntime]]:
    """``make(builder, card overrides..., model=kwargs)``: a loaded runtime, closed at the end."""
    made: list[ModelRuntime] = []

    def build(
        builder: Callable[..., Path],
        *,
        model: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
        **card: Any,
    ) -> ModelRuntime:
        path = builder(tmp_path / f"m{len(made)}.onnx", **(model or {}))
        card_file = write_card(tmp_path, path, id=f"m{len(made)}", **card)
        rt = runtime(card_file, **(settings or {}))
        made.append(rt)
        return rt

    yield build
    for rt in made:
        rt.close()


# -- loading ---------------------------------------------------------------------------


def test_a_good_model_loads_once_with_its_provider(make: Any) -> None:
    rt = make(constant_model)
    assert rt.session is not None and rt.unavailable == ""
    assert rt.provider == providers()[0] == rt.session.get_providers()[0]
    assert providers()[-1] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in providers()) == (
        "CUDAExecutionProvider" in ort.get_available_providers()
    )
    session = rt.session
    rt.run_sync(IMAGE)
    rt.run_sync(IMAGE)
    assert rt.session is session  # loaded once, not per image


def test_an_embedded_card_that_agrees_is_accepted(tmp_path: Path) -> None:
    first = write_card(tmp_path, constant_model(tmp_path / "a.onnx"), id="emb")
    meta = card_metadata(load_card(first))
    path = constant_model(tmp_path / "b.onnx", metadata=meta)
    rt = runtime(write_card(tmp_path, path, id="emb"))
    assert rt.session is not None, rt.unavailable


def model_for(case: str, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """The model file and the card overrides that make the model unusable in ``case``."""
    model = tmp_path / "model.onnx"
    if case == "missing":
        return tmp_path / "absent.onnx", {}
    if case == "junk":  # not an ONNX file, but the card's sha256 is right: loading is tried
        model.write_bytes(b"not a model at all")
        return model, {}
    if case == "embedded":  # the model says softmax, the card sigmoid
        data = embeddable(load_card(write_card(tmp_path, constant_model(model))))
        data["output"]["activation"] = "softmax"
        return constant_model(model, metadata=card_metadata(data)), {}
    overrides: dict[str, dict[str, Any]] = {
        "sha256": {"sha256": "f" * 64},
        "input": {"input": {"name": "image"}},
        "output": {"output": {"name": "probs"}},
    }
    return constant_model(model), overrides[case]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing", "model file missing (card test-model 1.0)"),
        ("sha256", "does not match card test-model 1.0 (" + "f" * 64 + ")"),
        ("embedded", "embedded card differs: output.activation: card 'sigmoid', embedded"),
        ("input", "model has no input 'image' (has ['input'])"),
        ("output", "model has no output 'probs' (has ['output'])"),
        ("junk", "cannot load model.onnx: "),
    ],
)
async def test_unavailable_models_say_why(tmp_path: Path, case: str, reason: str) -> None:
    model, overrides = model_for(case, tmp_path)
    rt = runtime(write_card(tmp_path, model, **overrides))
    assert rt.session is None
    assert reason in rt.unavailable
    assert rt.load() is False  # and stays so
    with pytest.raises(InferenceError, match=r"^model unavailable: ") as sync_err:
        rt.run_sync(IMAGE)
    with pytest.raises(InferenceError, match=r"^model unavailable: ") as async_err:
        await rt.infer(IMAGE, 1.0)
    assert reason in str(sync_err.value) and reason in str(async_err.value)
    rt.close()


# -- outputs ---------------------------------------------------------------------------


def test_activate() -> None:
    logits = np.array([[1.0, 2.0, 3.0]], np.float32)
    soft = activate(logits, "softmax")
    assert soft.shape == (3,) and soft.sum() == pytest.approx(1.0)
    assert soft == pytest.approx(np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum())
    assert activate(logits, "sigmoid") == pytest.approx(1 / (1 + np.exp(-np.array([1, 2, 3]))))
    assert activate(logits, "none") == pytest.approx([1.0, 2.0, 3.0])
    big = activate(np.array([1000.0, 0.0]), "softmax")  # no overflow
    assert big == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_the_cards_activation_is_applied(make: Any, activation: str) -> None:
    wanted = [0.2, 0.3, 0.5] if activation != "none" else [0.25, 1.5, -2.0]
    rt = make(
        constant_model,
        model={"probabilities": wanted, "activation": activation},
        output={"activation": activation},
    )
    assert rt.run_sync(IMAGE) == pytest.approx(wanted, abs=1e-6)


def test_the_input_reaches_the_model(make: Any) -> None:
    rt = make(echo_mean_model, output={"activation": "none"})
    assert rt.run_sync(np.full_like(IMAGE, 0.25)) == pytest.approx([0.25] * 3)
    assert rt.run_sync(np.full_like(IMAGE, 0.75)) == pytest.approx([0.75] * 3)


def test_more_outputs_than_the_card_has_labels(make: Any) -> None:
    rt = make(constant_model, model={"labels": (*DEFAULT_LABELS, "Extra")})
    assert rt.session is not None
    with pytest.raises(InferenceError, match="model gave 4 outputs, the card lists 3 labels"):
        rt.run_sync(IMAGE)


def test_a_model_that_raises(make: Any) -> None:
    rt = make(raising_model)
    assert rt.session is not None  # it loads; each run fails
    with pytest.raises(InferenceError, match=r"^model error: .*cannot be reshaped"):
        rt.run_sync(IMAGE)


# -- off the loop, bounded, within a budget --------------------------------------------


async def test_infer_gives_probabilities_and_milliseconds(make: Any) -> None:
    rt = make(constant_model, model={"probabilities": [0.1, 0.2, 0.9]})
    probs, ms = await rt.infer(IMAGE, 5.0)
    assert probs == pytest.approx([0.1, 0.2, 0.9], abs=1e-6)
    assert 0 < ms < 5000


async def test_a_model_error_is_an_inference_error(make: Any) -> None:
    rt = make(raising_model, settings={"workers": 1, "queue": 0})
    for _ in range(3):  # the slot comes back after each failure
        with pytest.raises(InferenceError, match="model error"):
            await rt.infer(IMAGE, 5.0)


async def wait_free(rt: ModelRuntime, within_s: float) -> float:
    """Seconds until the runtime takes an image again (a 50 ms probe is not refused)."""
    started = time.monotonic()
    while True:
        try:
            await rt.infer(IMAGE, 0.05)
        except ModelBusy:
            if time.monotonic() - started > within_s:
                raise AssertionError(f"still busy after {within_s} s") from None
            await asyncio.sleep(0.02)
            continue
        except ModelTimeout:
            pass  # it ran: the worker was free
        return time.monotonic() - started


async def test_busy_when_the_queue_is_full(make: Any) -> None:
    """workers 1 + queue 1: two images in, the third is refused at once (never waits)."""
    rt = make(slow_model, model={"min_ms": 150}, settings={"workers": 1, "queue": 1})
    first = asyncio.create_task(rt.infer(IMAGE, 10.0))
    second = asyncio.create_task(rt.infer(IMAGE, 10.0))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(ModelBusy, match="busy: more than 1 images waiting"):
        await rt.infer(IMAGE, 10.0)
    assert time.monotonic() - started < 0.2  # refused, not queued behind 300 ms runs
    (p1, _), (p2, _) = await first, await second
    assert p1 == pytest.approx(p2)
    await rt.infer(IMAGE, 10.0)  # room again


async def test_timeout_terminates_the_run(make: Any) -> None:
    """A run past its budget is a ModelTimeout at the budget, and onnxruntime is told to
    stop (RunOptions.terminate): the worker is free again at once, not when the model
    would have finished (about 6 s here)."""
    rt = make(slow_model, model={"min_ms": 3000}, settings={"workers": 1, "queue": 0})
    started = time.monotonic()
    with pytest.raises(ModelTimeout, match=r"^timeout: no result within 0.3 s$"):
        await rt.infer(IMAGE, 0.3)
    assert 0.3 <= time.monotonic() - started < 1.0
    assert await wait_free(rt, 1.0) < 1.0


async def test_a_caller_giving_up_terminates_the_run_too(make: Any) -> None:
    """The triage step's own budget cancels ``infer`` before the runtime's deadline: the
    run must be stopped as well, or it holds the worker for the model's whole run."""
    rt = make(slow_model, model={"min_ms": 3000}, settings={"workers": 1, "queue": 0})
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(rt.infer(IMAGE, 30.0), 0.3)
    assert await wait_free(rt, 1.0) < 1.0
