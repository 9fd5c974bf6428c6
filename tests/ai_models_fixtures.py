"""Tiny ONNX models built at test time (onnx.helper), with outputs the tests know, and
model cards for them.

Every builder writes ``path`` and returns it; the model takes one float32 image input
(``input_shape``, batch first: an int or a name such as ``"N"``) and gives one
``[batch, len(labels)]`` float32 output; ``metadata`` becomes ``metadata_props``
(:func:`card_metadata` gives the entry that embeds a card).

- :func:`constant_model`: fixed logits (or the logits that give ``probabilities``
  after the card's activation), whatever the image;
- :func:`echo_mean_model`: every output is ``mean(image) * weight + bias``, so a
  change in preprocessing shows in the result;
- :func:`raising_model`: loads, then fails on every run (a Reshape to twice the
  input's shape);
- :func:`slow_model`: a Loop of matrix products that takes at least ``min_ms``
  (calibrated on this machine when built); ``RunOptions.terminate`` stops it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from ai_models.card import METADATA_KEY, ModelCard, embeddable, sha256_of

DEFAULT_LABELS = ("No Finding", "Effusion", "Pneumothorax")
DEFAULT_SHAPE: tuple[int | str, ...] = (1, 1, 224, 224)
OPSET = 17  # onnxruntime 1.17+ runs it
Dims = Sequence[int | str]


def card_metadata(card: ModelCard | Mapping[str, Any]) -> dict[str, str]:
    """The ``metadata_props`` entry that embeds ``card`` (a card or its JSON data)."""
    data = embeddable(card) if isinstance(card, ModelCard) else dict(card)
    return {METADATA_KEY: json.dumps(data)}


def _save(
    path: Path | str,
    nodes: list[onnx.NodeProto],
    initializers: dict[str, np.ndarray],
    input_shape: Dims,
    n_out: int,
    input_name: str,
    output_name: str,
    metadata: Mapping[str, str] | None,
) -> Path:
    graph = helper.make_graph(
        nodes,
        "medgw_test",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [input_shape[0], n_out])],
        initializer=[numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=8,
        producer_name="medgw-tests",
    )
    if metadata:
        helper.set_model_props(model, dict(metadata))
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def _batch_mean(input_name: str, rank: int, out: str) -> list[onnx.NodeProto]:
    """``out`` = the image's mean per batch item, shape [batch, 1]."""
    return [
        helper.make_node(
            "ReduceMean", [input_name], [f"{out}_4d"], axes=list(range(1, rank)), keepdims=1
        ),
        helper.make_node("Flatten", [f"{out}_4d"], [out], axis=1),
    ]


def logits_for(probabilities: Sequence[float], activation: str) -> np.ndarray:
    """Logits that the card's ``activation`` turns into ``probabilities``."""
    p = np.asarray(probabilities, dtype=np.float64)
    if activation == "sigmoid":
        return np.asarray(np.log(p / (1.0 - p)))
    if activation == "softmax":
        return np.asarray(np.log(p / p.sum()))
    return p


def constant_model(
    path: Path | str,
    labels: Sequence[str] = DEFAULT_LABELS,
    logits: Sequence[float] | None = None,
    *,
    probabilities: Sequence[float] | None = None,
    activation: str = "sigmoid",
    input_shape: Dims = DEFAULT_SHAPE,
    input_name: str = "input",
    output_name: str = "output",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """The same ``logits`` for every image (from ``probabilities`` and ``activation``
    when given; all zeros when neither is)."""
    if probabilities is not None:
        values = logits_for(probabilities, activation)
    else:
        values = np.asarray(logits if logits is not None else [0.0] * len(labels), np.float64)
    if values.size != len(labels):
        raise ValueError(f"{values.size} values for {len(labels)} labels")
    nodes = [
        *_batch_mean(input_name, len(input_shape), "mean"),
        helper.make_node("Mul", ["mean", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "logits"], [output_name]),
    ]
    inits = {
        "zero": np.array(0.0, np.float32),
        "logits": values.astype(np.float32).reshape(1, -1),
    }
    return _save(path, nodes, inits, input_shape, len(labels), input_name, output_name, metadata)


def echo_mean_model(
    path: Path | str,
    labels: Sequence[str] = DEFAULT_LABELS,
    *,
    weights: Sequence[float] | None = None,
    bias: Sequence[float] | None = None,
    input_shape: Dims = DEFAULT_SHAPE,
    input_name: str = "input",
    output_name: str = "output",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Output k = mean(image) * weights[k] + bias[k] (weights 1, bias 0 by default)."""
    n = len(labels)
    w = np.asarray(weights if weights is not None else [1.0] * n, np.float32).reshape(1, n)
    b = np.asarray(bias if bias is not None else [0.0] * n, np.float32).reshape(1, n)
    nodes = [
        *_batch_mean(input_name, len(input_shape), "mean"),
        helper.make_node("Mul", ["mean", "weights"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], [output_name]),
    ]
    inits = {"weights": w, "bias": b}
    return _save(path, nodes, inits, input_shape, n, input_name, output_name, metadata)


def raising_model(
    path: Path | str,
    labels: Sequence[str] = DEFAULT_LABELS,
    *,
    input_shape: Dims = DEFAULT_SHAPE,
    input_name: str = "input",
    output_name: str = "output",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """A model that loads but fails on every run: it reshapes the image to twice its
    own shape, computed at run time (onnxruntime: "cannot be reshaped")."""
    rank = len(input_shape)
    nodes = [
        helper.make_node("Shape", [input_name], ["shape"]),
        helper.make_node("Mul", ["shape", "two"], ["bigger"]),
        helper.make_node("Reshape", [input_name, "bigger"], ["reshaped"]),
        *_batch_mean("reshaped", rank, "mean"),
        helper.make_node("Add", ["mean", "logits"], [output_name]),
    ]
    inits: dict[str, np.ndarray] = {
        "two": np.full(rank, 2, np.int64),
        "logits": np.zeros((1, len(labels)), np.float32),
    }
    return _save(path, nodes, inits, input_shape, len(labels), input_name, output_name, metadata)


def _slow_graph(
    path: Path | str,
    iterations: int,
    labels: Sequence[str],
    input_shape: Dims,
    input_name: str,
    output_name: str,
    metadata: Mapping[str, str] | None,
    size: int = 128,
) -> Path:
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["state", "w"], ["product"]),
            helper.make_node("Tanh", ["product"], ["state_out"]),
        ],
        "slow_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [size, size]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [size, size]),
        ],
    )
    nodes = [
        *_batch_mean(input_name, len(input_shape), "mean"),
        helper.make_node("ReduceMean", [input_name], ["overall"], keepdims=0),
        helper.make_node("Add", ["zeros", "overall"], ["state0"]),  # depends on the input:
        helper.make_node("Loop", ["trips", "", "state0"], ["final"], body=body),  # not folded
        helper.make_node("ReduceSum", ["final"], ["total"], keepdims=0),
        helper.make_node("Add", ["mean", "total"], ["both"]),
        helper.make_node("Mul", ["both", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "logits"], [output_name]),
    ]
    rng = np.random.default_rng(0)
    inits = {
        "trips": np.array(iterations, np.int64),
        "zeros": np.zeros((size, size), np.float32),
        "w": (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32),
        "zero": np.array(0.0, np.float32),
        "logits": np.zeros((1, len(labels)), np.float32),
    }
    return _save(path, nodes, inits, input_shape, len(labels), input_name, output_name, metadata)


def _run_ms(path: Path, input_name: str, input_shape: Dims) -> float:
    import onnxruntime as ort  # noqa: PLC0415 - only the calibration runs a model

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in input_shape]
    image = np.zeros(shape, np.float32)
    session.run(None, {input_name: image})
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        session.run(None, {input_name: image})
        best = min(best, (time.perf_counter() - started) * 1000.0)
    return best


def slow_model(
    path: Path | str,
    labels: Sequence[str] = DEFAULT_LABELS,
    *,
    min_ms: float = 300.0,
    iterations: int | None = None,
    input_shape: Dims = DEFAULT_SHAPE,
    input_name: str = "input",
    output_name: str = "output",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Zero logits after a Loop of 128x128 MatMuls taking at least ``min_ms`` (twice
    that, as measured here, for margin), or exactly ``iterations`` of them."""
    args = (labels, input_shape, input_name, output_name, metadata)
    if iterations is None:
        probe = _slow_graph(path, 200, *args)
        per_iteration = max(_run_ms(probe, input_name, input_shape), 0.01) / 200
        iterations = max(200, int(2.0 * min_ms / per_iteration) + 1)
    return _slow_graph(path, iterations, *args)


# -- cards -------------------------------------------------------------------------------


def _merge(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def card_dict(model_path: Path, card_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A valid card for ``model_path`` (chest CR/DX, the default labels and input, unit
    scale, sigmoid) as data; ``overrides`` merge into it section by section (a mapping
    updates that section, ``None`` removes a key)."""
    try:
        model: str | Path = model_path.relative_to(card_dir)
    except ValueError:
        model = model_path
    base: dict[str, Any] = {
        "id": "test-model",
        "version": "1.0",
        "model": str(model),
        "sha256": sha256_of(model_path) if model_path.exists() else "0" * 64,
        "intended_use": "Tests only: a tiny model with known outputs.",
        "applies_to": {
            "modalities": ["CR", "DX"],
            "body_parts": ["CHEST", "THORAX"],
            "view_positions": ["PA", "AP"],
            "photometric": ["MONOCHROME1", "MONOCHROME2"],
            "min_rows": 256,
            "min_columns": 256,
        },
        "input": {"name": "input", "shape": list(DEFAULT_SHAPE), "dtype": "float32", "channels": 1},
        "preprocessing": {
            "window": "tags",
            "percentile": [1, 99],
            "invert_monochrome1": True,
            "resize": {"policy": "stretch", "size": [224, 224]},
            "scale": "unit",
        },
        "output": {
            "name": "output",
            "labels": list(DEFAULT_LABELS),
            "activation": "sigmoid",
            "default_threshold": 0.5,
            "thresholds": {"Pneumothorax": 0.3},
            "urgent": ["Pneumothorax"],
            "normal_labels": ["No Finding"],
        },
        "outputs": {"sr": True, "sc": False, "hl7": True, "event": True},
    }
    return _merge(base, overrides)


def write_card(tmp_path: Path, model_path: Path, **overrides: Any) -> Path:
    """Write :func:`card_dict` as ``<id>.yaml`` in ``tmp_path``; the path."""
    data = card_dict(Path(model_path), tmp_path, **overrides)
    path = tmp_path / f"{data.get('id', 'card')}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
