"""Model cards: loading with precise errors, sha256, the card embedded in the ONNX file,
applies-to rules on real radiographs (pydicom-data), and the cards of the two real
models in ../shared/models (skipped where that folder is absent)."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pydicom
import pytest
from ai_models_fixtures import (
    DEFAULT_LABELS,
    card_dict,
    card_metadata,
    constant_model,
    echo_mean_model,
    raising_model,
    slow_model,
    write_card,
)
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from ai_models.card import (
    METADATA_KEY,
    CardError,
    ModelCard,
    OutputSpec,
    cross_check,
    embedded_card,
    load_card,
    metadata_props,
    model_path,
    parse_card,
    verify_sha256,
)
from ai_models.preprocess import prepare

CARDS = Path(__file__).parent / "cards"
SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
ELIGIBILITY = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "ImageLaterality",
    "SOPClassUID",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
)


def read(name: str, **kwargs: Any) -> Dataset:
    """A DICOM file of pydicom's test data (pydicom-data for RG1/RG3)."""
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return pydicom.dcmread(path, **kwargs)


def headers_of(name: str) -> dict[str, str]:
    """Applies-to headers of a pydicom-data file, read as the gateway reads them."""
    ds = read(name, stop_before_pixels=True)
    return {k: str(ds.get(k, "") or "") for k in ELIGIBILITY}


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return constant_model(tmp_path / "model.onnx", probabilities=[0.1, 0.2, 0.9])


@pytest.fixture
def card(tmp_path: Path, model: Path) -> ModelCard:
    return load_card(write_card(tmp_path, model))


# -- loading -----------------------------------------------------------------------------


def test_a_card_loads_with_its_sections(tmp_path: Path, model: Path) -> None:
    path = write_card(tmp_path, model)
    card = load_card(path)
    assert (card.id, card.version) == ("test-model", "1.0")
    assert model_path(card, path) == model
    verify_sha256(card, model_path(card, path))
    assert card.applies_to.modalities == ("CR", "DX")
    assert card.input.shape == (1, 1, 224, 224)
    assert card.input.spatial == (224, 224)
    assert card.preprocessing.window == "tags"
    assert card.preprocessing.scale == "unit"
    assert card.output.labels == DEFAULT_LABELS
    assert (card.outputs.sr, card.outputs.sc, card.outputs.hl7, card.outputs.event) == (
        True,
        False,
        True,
        True,
    )


def test_model_path_is_relative_to_the_card_unless_absolute(tmp_path: Path, model: Path) -> None:
    sub = tmp_path / "cards"
    sub.mkdir()
    relative = load_card(write_card(sub, model, model="../model.onnx"))
    assert model_path(relative, sub / "x.yaml").resolve() == model.resolve()
    absolute = load_card(write_card(sub, model, model=str(model)))
    assert model_path(absolute, sub / "x.yaml") == model


def test_a_custom_scale_and_a_symbolic_batch_load(tmp_path: Path, model: Path) -> None:
    card = load_card(
        write_card(
            tmp_path,
            model,
            input={"shape": ["N", 3, 224, 224], "channels": 3},
            preprocessing={"scale": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}},
        )
    )
    assert card.input.shape[0] == "N"
    assert card.preprocessing.scale.model_dump() == {  # type: ignore[union-attr]
        "mean": (0.5, 0.4, 0.3),
        "std": (0.2, 0.2, 0.2),
    }


BAD_CARDS: list[tuple[dict[str, Any], str]] = [
    ({"colour": "red"}, "colour: unknown field"),
    ({"id": None}, "id: required field is missing"),
    ({"id": "has space"}, "id: String should match pattern"),
    ({"version": 1.1}, 'version: write the version as text in quotes ("1.1")'),
    ({"sha256": "abc"}, "sha256: String should match pattern '^[0-9a-fA-F]{64}$'"),
    ({"intended_use": ""}, "intended_use: String should have at least 1 character"),
    ({"applies_to": {"modalities": "CR"}}, "applies_to.modalities: Input should be a valid tuple"),
    (
        {"applies_to": {"sop_classes": ["ChestImageStorage"]}},
        "applies_to.sop_classes[0]: unknown SOP class keyword 'ChestImageStorage'",
    ),
    ({"applies_to": {"min_rows": -1}}, "applies_to.min_rows: Input should be greater than"),
    ({"input": {"shape": [1, 3, 224, 224]}}, "input: shape [1, 3, 224, 224] has 3 channel(s)"),
    ({"input": {"shape": [2, 1, 224, 224]}}, "input: shape: the batch dimension must be 1"),
    ({"input": {"shape": [1, 1, 224]}}, "input.shape: Tuple should have at least 4 items"),
    ({"input": {"dtype": "float16"}}, "input.dtype: Input should be 'float32'"),
    (
        {"preprocessing": {"resize": {"size": [256, 256]}}},
        "preprocessing.resize.size [256, 256] does not match the input's height and width",
    ),
    ({"preprocessing": {"resize": {"policy": "squash"}}}, "preprocessing.resize.policy: Input"),
    ({"preprocessing": {"window": "auto"}}, "preprocessing.window: Input should be 'tags'"),
    ({"preprocessing": {"percentile": [99, 1]}}, "preprocessing.percentile: expected [low, high]"),
    (
        {"preprocessing": {"scale": "imagnet"}},
        "preprocessing.scale: expected unit, imagenet, xrv or {mean, std}, got 'imagnet'",
    ),
    ({"preprocessing": {"scale": {"mean": [0.5], "std": [0]}}}, "preprocessing.scale: std must"),
    ({"preprocessing": {"scale": {"mean": [0.5]}}}, "preprocessing.scale.std: required field"),
    (
        {"preprocessing": {"scale": {"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]}}},
        "preprocessing.scale: 3 mean/std values for 1 channel(s)",
    ),
    ({"output": {"activation": "relu"}}, "output.activation: Input should be 'softmax'"),
    ({"output": {"labels": ["A", "A"]}}, "output.labels: duplicate label 'A'"),
    ({"output": {"urgent": ["Pneumo"]}}, "output.urgent: unknown label 'Pneumo' (labels: No"),
    ({"output": {"thresholds": {"Mass": 0.2}}}, "output.thresholds: unknown label 'Mass'"),
    ({"output": {"thresholds": {"Effusion": 1.5}}}, "output: threshold Effusion 1.5 is not a"),
    (
        {"output": {"normal_labels": ["Pneumothorax"]}},
        "output: 'Pneumothorax' is listed as a normal label and as a finding",
    ),
    ({"outputs": {"pdf": True}}, "outputs.pdf: unknown field"),
]


@pytest.mark.parametrize(
    ("overrides", "expected"), BAD_CARDS, ids=[e.split(":")[0].split(" ")[0] for _, e in BAD_CARDS]
)
def test_errors_name_the_file_and_the_field(
    tmp_path: Path, model: Path, overrides: dict[str, Any], expected: str
) -> None:
    path = write_card(tmp_path, model, **overrides)
    with pytest.raises(CardError) as caught:
        load_card(path)
    assert caught.value.path == path
    assert str(caught.value).startswith(f"{path}: ")
    assert expected in caught.value.message, caught.value.message


def test_errors_give_the_line(tmp_path: Path, model: Path) -> None:
    path = write_card(tmp_path, model, output={"urgent": ["Pneumothorax", "Pneumo"]})
    lines = path.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.strip() == "urgent:")
    with pytest.raises(CardError) as caught:
        load_card(path)
    assert caught.value.message.endswith(f"(line {line})")


def test_every_problem_is_reported_at_once(tmp_path: Path, model: Path) -> None:
    path = write_card(tmp_path, model, id=None, sha256="x", output={"urgent": ["Nope"]})
    with pytest.raises(CardError) as caught:
        load_card(path)
    assert [p.split(":")[0] for p in caught.value.problems] == ["id", "sha256", "output.urgent"]


def test_cards_that_are_not_cards(tmp_path: Path) -> None:
    with pytest.raises(CardError, match="cannot read the card"):
        load_card(tmp_path / "absent.yaml")
    with pytest.raises(CardError, match="not valid YAML"):
        parse_card("id: [unclosed", "x.yaml")
    with pytest.raises(CardError, match="a model card is a YAML mapping"):
        parse_card("- a list\n", "x.yaml")


# -- sha256 ------------------------------------------------------------------------------


def test_sha256_mismatch_names_both_hashes(tmp_path: Path, model: Path, card: ModelCard) -> None:
    constant_model(model, probabilities=[0.1, 0.2, 0.8])  # same path, other weights
    with pytest.raises(CardError) as caught:
        verify_sha256(card, model)
    assert caught.value.path == model
    assert "does not match card test-model 1.0" in caught.value.message
    assert card.sha256 in caught.value.message


def test_a_missing_model_file_is_a_card_error(tmp_path: Path, card: ModelCard) -> None:
    with pytest.raises(CardError, match="model file missing"):
        verify_sha256(card, tmp_path / "gone.onnx")
    with pytest.raises(CardError, match="model file missing"):
        embedded_card(tmp_path / "gone.onnx")


def test_sha256_is_case_insensitive(tmp_path: Path, model: Path, card: ModelCard) -> None:
    upper = load_card(write_card(tmp_path, model, sha256=card.sha256.upper()))
    verify_sha256(upper, model)


# -- the card embedded in the model ------------------------------------------------------


def test_an_embedded_card_that_agrees(tmp_path: Path, card: ModelCard) -> None:
    path = echo_mean_model(tmp_path / "embedded.onnx", metadata=metadata_props(card))
    embedded = embedded_card(path)
    assert embedded is not None
    assert embedded["id"] == "test-model"
    assert "sha256" not in embedded
    assert cross_check(card, embedded) == []


def test_no_embedded_card(card: ModelCard, model: Path) -> None:
    assert embedded_card(model) is None
    assert cross_check(card, None) == []


def test_embedded_differences_are_listed(tmp_path: Path, card: ModelCard) -> None:
    data = card_dict(tmp_path / "m.onnx", tmp_path, version="2.0")
    data["output"]["labels"] = ["No Finding", "Effusion", "Mass"]
    data["input"]["name"] = "image"
    data["preprocessing"]["scale"] = "imagenet"
    path = constant_model(tmp_path / "other.onnx", metadata=card_metadata(data))
    differences = cross_check(card, embedded_card(path))
    assert [d.split(":")[0] for d in differences] == [
        "version",
        "output.labels",
        "input.name",
        "preprocessing",
    ]
    assert "version: card '1.0', embedded '2.0'" in differences


def test_embedded_card_needs_id_version_and_labels(tmp_path: Path, card: ModelCard) -> None:
    differences = cross_check(card, {"id": "test-model", "input": {"shape": ["N", 1, 224, 224]}})
    assert differences == [
        "version: missing from the embedded card",
        "output.labels: missing from the embedded card",
    ]  # a symbolic batch matches a batch of 1


def test_embedded_card_that_is_not_json(tmp_path: Path) -> None:
    path = constant_model(tmp_path / "bad.onnx", metadata={METADATA_KEY: "{not json"})
    with pytest.raises(CardError, match="is not valid JSON"):
        embedded_card(path)


def test_embedded_card_read_with_onnx_where_onnxruntime_is_missing(
    tmp_path: Path, card: ModelCard, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = constant_model(tmp_path / "m.onnx", metadata=metadata_props(card))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    embedded = embedded_card(path)
    assert embedded == json.loads(metadata_props(card)[METADATA_KEY])


def test_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(CardError, match="cannot read the model's metadata"):
        embedded_card(path)


# -- applies-to --------------------------------------------------------------------------


def test_rg1_chest_is_accepted(card: ModelCard) -> None:
    assert card.applies_to.refusal(headers_of("RG1_UNCR.dcm")) is None
    assert card.applies_to.refusal(headers_of("RG1_J2KR.dcm")) is None


def test_rg3_tibia_is_refused_with_a_reason(card: ModelCard) -> None:
    assert card.applies_to.refusal(headers_of("RG3_UNCI.dcm")) == (
        "BodyPartExamined EXTREMITY not in [CHEST, THORAX]"
    )


def test_a_ct_is_refused(card: ModelCard) -> None:
    reason = card.applies_to.refusal(headers_of("CT_small.dcm"))
    assert reason is not None
    assert reason.startswith("Modality CT not in [CR, DX]; BodyPartExamined missing")
    assert "Rows 128 < 256" in reason


def test_matching_is_case_insensitive_and_synonyms_are_listed(card: ModelCard) -> None:
    headers = headers_of("RG1_UNCR.dcm") | {"Modality": "dx", "BodyPartExamined": " Thorax "}
    assert card.applies_to.refusal(headers) is None


def test_missing_or_odd_headers_are_refused(card: ModelCard) -> None:
    rules = card.applies_to
    assert rules.refusal({}) == (
        "Modality missing (expected one of [CR, DX]); "
        "BodyPartExamined missing (expected one of [CHEST, THORAX]); "
        "ViewPosition missing (expected one of [PA, AP]); "
        "PhotometricInterpretation missing (expected one of [MONOCHROME1, MONOCHROME2]); "
        "Rows missing (expected at least 256); Columns missing (expected at least 256)"
    )
    headers = headers_of("RG1_UNCR.dcm") | {"Columns": "200", "PhotometricInterpretation": "RGB"}
    assert rules.refusal(headers) == (
        "PhotometricInterpretation RGB not in [MONOCHROME1, MONOCHROME2]; Columns 200 < 256"
    )


def test_sop_classes_and_lateralities(tmp_path: Path, model: Path) -> None:
    card = load_card(
        write_card(
            tmp_path,
            model,
            applies_to={
                "sop_classes": ["DigitalXRayImageStorageForPresentation"],
                "lateralities": ["L", "R"],
            },
        )
    )
    headers = headers_of("RG1_UNCR.dcm") | {"ImageLaterality": "l"}
    assert card.applies_to.refusal(headers) == (
        "SOPClassUID 1.2.840.10008.5.1.4.1.1.1 not in [1.2.840.10008.5.1.4.1.1.1.1]"
    )
    dx = headers | {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1", "image_laterality": "x"}
    del dx["ImageLaterality"]
    assert card.applies_to.refusal(dx) == "ImageLaterality x not in [L, R]"


def test_empty_rules_apply_to_any_image(tmp_path: Path, model: Path) -> None:
    card = load_card(write_card(tmp_path, model, applies_to=None))
    assert card.applies_to.refusal(headers_of("CT_small.dcm")) is None
    assert card.applies_to.summary() == "any image"


def test_summary(card: ModelCard) -> None:
    assert card.applies_to.summary() == (
        "Modality CR/DX, BodyPartExamined CHEST/THORAX, ViewPosition PA/AP, "
        "PhotometricInterpretation MONOCHROME1/MONOCHROME2, at least 256x256 (rows x columns)"
    )


# -- output rules ------------------------------------------------------------------------


def test_thresholds_and_priority(card: ModelCard) -> None:
    spec = card.output
    assert spec.threshold_for("Pneumothorax") == 0.3
    assert spec.threshold_for("Effusion") == 0.5
    assert spec.priority(["Pneumothorax", "Effusion"]) == "urgent"
    assert spec.priority(["Effusion"]) == "abnormal"
    assert spec.priority(["No Finding"]) == "normal"
    assert spec.priority([]) == "normal"


def test_an_abnormal_list_limits_what_is_abnormal() -> None:
    spec = OutputSpec(
        name="out",
        labels=("No Finding", "Effusion", "Support Devices", "Pneumothorax"),
        activation="sigmoid",
        urgent=("Pneumothorax",),
        abnormal=("Effusion",),
        normal_labels=("No Finding",),
    )
    assert spec.priority(["Support Devices"]) == "normal"
    assert spec.priority(["Support Devices", "Effusion"]) == "abnormal"


def test_thresholds_of_unbounded_scores_are_not_probabilities() -> None:
    spec = OutputSpec(name="out", labels=("Score",), activation="none", default_threshold=2.5)
    assert spec.threshold_for("Score") == 2.5


# -- the two real models (../shared/models) ----------------------------------------------

needs_shared_models = pytest.mark.skipif(
    not SHARED_MODELS.is_dir(),
    reason=f"real models absent: {SHARED_MODELS} (see ../shared/models/README.md)",
)


@needs_shared_models
@pytest.mark.parametrize(
    ("card_name", "low", "high"),
    [
        ("cxr-nih15-mobilenetv3.yaml", -0.485 / 0.229, (1 - 0.485) / 0.229),
        ("densenet121-xrv-random.yaml", -1024.0, 1024.0),
    ],
)
def test_real_model_cards_load_verify_and_prepare_rg1(
    card_name: str, low: float, high: float
) -> None:
    card_file = CARDS / card_name
    card = load_card(card_file)
    model_file = model_path(card, card_file)
    verify_sha256(card, model_file)
    assert cross_check(card, embedded_card(model_file)) == []
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == (card.input.name, card.output.name)
    assert inp.shape[1:] == list(card.input.shape[1:])
    assert out.shape[1] == len(card.output.labels)

    assert card.applies_to.refusal(headers_of("RG1_UNCR.dcm")) is None
    assert card.applies_to.refusal(headers_of("RG3_UNCI.dcm")) == (
        "BodyPartExamined EXTREMITY not in [CHEST, THORAX]"
    )
    prepared = prepare(read("RG1_UNCR.dcm"), card.preprocessing, card.input)
    assert prepared.tensor.shape == (1, 1, 224, 224)
    assert prepared.tensor.dtype == np.float32
    assert low - 1e-4 <= prepared.tensor.min() < prepared.tensor.max() <= high + 1e-4
    assert prepared.display.shape == (1955, 1841)
    (scores,) = session.run([card.output.name], {card.input.name: prepared.tensor})
    assert scores.shape == (1, len(card.output.labels))


@needs_shared_models
def test_the_real_classifier_depends_on_the_window_as_its_readme_says() -> None:
    """RG1: Mass 0.98 with the tag window, Atelectasis 0.85 with a 1-99 % window."""
    card_file = CARDS / "cxr-nih15-mobilenetv3.yaml"
    card = load_card(card_file)
    session = ort.InferenceSession(
        str(model_path(card, card_file)), providers=["CPUExecutionProvider"]
    )
    ds = read("RG1_UNCR.dcm")
    tops = []
    for window in ("tags", "percentile"):
        recipe = card.preprocessing.model_copy(update={"window": window})
        (logits,) = session.run(None, {"input": prepare(ds, recipe, card.input).tensor})
        e = np.exp(logits[0] - logits[0].max())
        probs = e / e.sum()
        tops.append((card.output.labels[int(probs.argmax())], round(float(probs.max()), 1)))
    assert tops == [("Mass", 1.0), ("Atelectasis", 0.9)]


# -- the tiny test models (ai_models_fixtures) behave as documented ----------------------


def _session(path: Path) -> Any:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "none"])
def test_constant_model_gives_the_probabilities_asked_for(tmp_path: Path, activation: str) -> None:
    wanted = [0.1, 0.2, 0.7]
    path = constant_model(
        tmp_path / "c.onnx", probabilities=wanted, activation=activation, input_shape=("N", 1, 8, 8)
    )
    (logits,) = _session(path).run(None, {"input": np.ones((2, 1, 8, 8), np.float32)})
    assert logits.shape == (2, 3)
    x = logits.astype(np.float64)
    if activation == "sigmoid":
        x = 1 / (1 + np.exp(-x))
    elif activation == "softmax":
        x = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(x, [wanted, wanted], rtol=1e-5)


def test_echo_mean_model_follows_the_image(tmp_path: Path) -> None:
    path = echo_mean_model(tmp_path / "e.onnx", weights=[1, 2, -1], bias=[0, 0, 1])
    session = _session(path)
    for level in (0.25, 0.75):
        (out,) = session.run(None, {"input": np.full((1, 1, 224, 224), level, np.float32)})
        np.testing.assert_allclose(out, [[level, 2 * level, 1 - level]], rtol=1e-6)


def test_raising_model_loads_then_fails_on_every_run(tmp_path: Path) -> None:
    session = _session(raising_model(tmp_path / "r.onnx"))
    with pytest.raises(Exception, match="cannot be reshaped"):
        session.run(None, {"input": np.zeros((1, 1, 224, 224), np.float32)})


def test_slow_model_is_slow_and_can_be_stopped(tmp_path: Path) -> None:
    session = _session(slow_model(tmp_path / "s.onnx", min_ms=100))
    image = np.zeros((1, 1, 224, 224), np.float32)
    started = time.perf_counter()
    (out,) = session.run(None, {"input": image})
    assert (time.perf_counter() - started) * 1000 >= 100
    assert np.array_equal(out, np.zeros((1, 3), np.float32))
    options = ort.RunOptions()
    timer = threading.Timer(0.02, lambda: setattr(options, "terminate", True))
    timer.start()
    with pytest.raises(Exception, match="terminate"):
        session.run(None, {"input": image}, options)
