"""Model cards: a YAML file beside each ``.onnx`` saying what the model is and how to feed it.

The card's shape follows the MONAI bundle's ``network_data_format`` (inputs with
their shape, type and channels; outputs with their channel definitions), plus what a
gateway must know before it lets a model near a study::

    id: cxr-nih15                 # [A-Za-z0-9._-]
    version: "1.0"
    model: cxr-nih15.onnx         # relative to the card file
    sha256: 1ed18d0d...           # of the model file, checked at load
    intended_use: Triage of adult chest radiographs; not for diagnosis.
    applies_to:                   # empty list or 0 = any
      modalities: [CR, DX]
      body_parts: [CHEST, THORAX] # synonyms are simply listed
      view_positions: [PA, AP]
      lateralities: []
      sop_classes: [ComputedRadiographyImageStorage, 1.2.840.10008.5.1.4.1.1.1.1]
      photometric: [MONOCHROME1, MONOCHROME2]
      min_rows: 512
      min_columns: 512
    input: {name: input, shape: [N, 1, 224, 224], dtype: float32, channels: 1}
    preprocessing:                # see ai_models.preprocess
      window: tags                # tags | percentile | none
      percentile: [1, 99]
      invert_monochrome1: true
      resize: {policy: stretch, size: [224, 224]}   # stretch | crop-center | pad
      scale: imagenet             # unit | imagenet | xrv | {mean: [...], std: [...]}
    output:
      name: output
      labels: [No Finding, Effusion, Pneumothorax]
      activation: softmax         # softmax | sigmoid | none
      default_threshold: 0.5
      thresholds: {Pneumothorax: 0.3}
      urgent: [Pneumothorax]
      abnormal: []                # empty: any positive label not in normal_labels
      normal_labels: [No Finding]
    outputs: {sr: true, sc: false, hl7: true, event: true}

The same card (without ``model`` and ``sha256``) may be embedded in the ONNX file's
``metadata_props`` under ``medgw.card`` as JSON; :func:`cross_check` lists where the
two disagree. Only this package imports onnxruntime, and only when a model is read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import pydicom.uid
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.triage import Priority

METADATA_KEY = "medgw.card"
_Loc = tuple[str | int, ...]


class CardError(Exception):
    """A card (or the model file it describes) cannot be used; ``path`` names the file."""

    def __init__(self, path: str | Path, message: str, problems: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self.message = message
        self.problems = list(problems) or [message]
        super().__init__(f"{path}: {message}")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _upper(value: str) -> str:
    return value.strip().upper()


def _sop_class(value: str) -> str:
    """A SOP Class UID, or its keyword (``ComputedRadiographyImageStorage``)."""
    value = value.strip()
    if value[:1].isdigit():
        if not pydicom.uid.UID(value).is_valid:
            raise ValueError(f"not a valid UID: {value!r}")
        return value
    uid = getattr(pydicom.uid, value, None)
    if not isinstance(uid, pydicom.uid.UID):
        raise ValueError(f"unknown SOP class keyword {value!r}")  # noqa: TRY004 - for pydantic
    return str(uid)


Upper = Annotated[str, AfterValidator(_upper)]
SopClass = Annotated[str, AfterValidator(_sop_class)]


def _lookup(headers: Mapping[str, str], keyword: str) -> str:
    """A header by its DICOM keyword, also in a looser spelling (``image_laterality``)."""
    value = headers.get(keyword)
    if value is None:
        folded = keyword.lower()
        value = next((v for k, v in headers.items() if k.replace("_", "").lower() == folded), None)
    return "" if value is None else str(value).strip()


class AppliesTo(_Frozen):
    """Which images the model may judge; every non-empty rule must hold (case-insensitive).

    A header that is missing or empty fails a rule that lists values: a chest model
    must not guess that an image without BodyPartExamined is a chest.
    """

    modalities: tuple[Upper, ...] = ()
    body_parts: tuple[Upper, ...] = ()  # list synonyms: [CHEST, THORAX]
    view_positions: tuple[Upper, ...] = ()
    lateralities: tuple[Upper, ...] = ()
    sop_classes: tuple[SopClass, ...] = ()
    photometric: tuple[Upper, ...] = ()
    min_rows: int = Field(default=0, ge=0)
    min_columns: int = Field(default=0, ge=0)

    def _rules(self) -> tuple[tuple[str, tuple[str, ...], bool], ...]:
        return (
            ("Modality", self.modalities, True),
            ("BodyPartExamined", self.body_parts, True),
            ("ViewPosition", self.view_positions, True),
            ("ImageLaterality", self.lateralities, True),
            ("SOPClassUID", self.sop_classes, False),
            ("PhotometricInterpretation", self.photometric, True),
        )

    def refusal(self, headers: Mapping[str, str]) -> str | None:
        """Why the image is not for this model ("Modality CT not in [CR, DX]"), or None.

        ``headers`` are DICOM keywords to values (Modality, BodyPartExamined,
        ViewPosition, ImageLaterality, SOPClassUID, PhotometricInterpretation, Rows,
        Columns); several reasons are joined with "; ".
        """
        reasons = []
        for keyword, allowed, fold in self._rules():
            if not allowed:
                continue
            value = _lookup(headers, keyword)
            listed = "[" + ", ".join(allowed) + "]"
            if not value:
                reasons.append(f"{keyword} missing (expected one of {listed})")
            elif (value.upper() if fold else value) not in allowed:
                reasons.append(f"{keyword} {value} not in {listed}")
        for keyword, least in (("Rows", self.min_rows), ("Columns", self.min_columns)):
            if not least:
                continue
            value = _lookup(headers, keyword)
            if not value.isdigit():
                reasons.append(f"{keyword} {value or 'missing'} (expected at least {least})")
            elif int(value) < least:
                reasons.append(f"{keyword} {value} < {least}")
        return "; ".join(reasons) or None

    def summary(self) -> str:
        """One line for technicians: ``Modality CR/DX, BodyPartExamined CHEST/THORAX``."""
        parts = [
            f"{keyword} {'/'.join(allowed)}" for keyword, allowed, _ in self._rules() if allowed
        ]
        if self.min_rows or self.min_columns:
            parts.append(f"at least {self.min_rows}x{self.min_columns} (rows x columns)")
        return ", ".join(parts) or "any image"


def _dim(value: int | str) -> int | str:
    if isinstance(value, str):
        if not value.isidentifier():
            raise ValueError(f"a symbolic dimension is a name like 'N', got {value!r}")
        return value
    if value < 1 and value != -1:
        raise ValueError(f"a dimension is >= 1, -1 or a name, got {value}")
    return value


class InputSpec(_Frozen):
    """The model's image input: batch first (1, -1 or a name like ``N``), then the
    channel and spatial dimensions in ``layout`` order."""

    name: str = Field(min_length=1)
    shape: tuple[Annotated[int | str, AfterValidator(_dim)], ...] = Field(
        min_length=4, max_length=4
    )
    dtype: Literal["float32"] = "float32"
    channels: Literal[1, 3] = 1
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        batch, *rest = self.shape
        if isinstance(batch, int) and batch not in (1, -1):
            raise ValueError(f"shape: the batch dimension must be 1, -1 or a name, got {batch}")
        if not all(isinstance(d, int) and d > 0 for d in rest):
            raise ValueError(f"shape: only the batch dimension may be dynamic, got {rest}")
        channel_dim = rest[0] if self.layout == "NCHW" else rest[2]
        if channel_dim != self.channels:
            raise ValueError(
                f"shape {list(self.shape)} has {channel_dim} channel(s) in {self.layout} "
                f"layout, channels says {self.channels}"
            )
        return self

    @property
    def spatial(self) -> tuple[int, int]:
        """(height, width)."""
        h, w = self.shape[2:4] if self.layout == "NCHW" else self.shape[1:3]
        return int(h), int(w)  # ints: checked by _consistent


class Resize(_Frozen):
    """``stretch``: whole image to ``size``; ``crop-center``: the largest centred box of
    the target's aspect ratio, then resize; ``pad``: pad (black) to the target's aspect
    ratio, centred, then resize. ``size`` is [height, width]."""

    policy: Literal["stretch", "crop-center", "pad"] = "stretch"
    size: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]]


class CustomScale(_Frozen):
    """(x - mean) / std on the 0-1 image, one value for all channels or one per channel."""

    mean: tuple[float, ...] = Field(min_length=1, max_length=3)
    std: tuple[float, ...] = Field(min_length=1, max_length=3)

    @model_validator(mode="after")
    def _same_length(self) -> CustomScale:
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std need the same number of values")
        if min(self.std) <= 0:
            raise ValueError(f"std must be > 0, got {list(self.std)}")
        return self


ScaleName = Literal["unit", "imagenet", "xrv"]


def _scale_tag(value: Any) -> str:
    return "custom" if isinstance(value, (dict, CustomScale)) else "name"


def _scale_shape(value: Any) -> Any:
    if isinstance(value, str) and value not in ("unit", "imagenet", "xrv"):
        raise ValueError(f"expected unit, imagenet, xrv or {{mean, std}}, got {value!r}")
    if not isinstance(value, (str, dict, CustomScale)):
        raise ValueError("expected unit, imagenet, xrv or {mean, std}")  # noqa: TRY004
    return value


Scale = Annotated[
    Annotated[ScaleName, Tag("name")] | Annotated[CustomScale, Tag("custom")],
    Discriminator(_scale_tag),
    BeforeValidator(_scale_shape),
]


class Recipe(_Frozen):
    """The preprocessing pinned by the card (implemented in :mod:`ai_models.preprocess`).

    ``window``: ``tags`` = the image's VOI LUT or Window Center/Width (PS3.3 C.11.2),
    a ``percentile`` window when the header has neither; ``percentile`` = the
    ``percentile`` [low, high] % of the image; ``none`` = the full range of the stored
    bits (x / 255 for 8-bit). ``scale`` maps the 0-1 image: ``unit`` as is,
    ``imagenet`` (x - 0.485) / 0.229 for one channel (per-channel ImageNet values for
    three), ``xrv`` to [-1024, 1024] (TorchXRayVision), or a custom mean/std.
    """

    window: Literal["tags", "percentile", "none"] = "tags"
    percentile: tuple[float, float] = (1.0, 99.0)
    invert_monochrome1: bool = True
    resize: Resize
    scale: Scale = "unit"

    @field_validator("percentile")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] < v[1] <= 100.0:
            raise ValueError(f"expected [low, high] with 0 <= low < high <= 100, got {list(v)}")
        return v


def _known_labels(v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
    labels = info.data.get("labels")
    if labels is None:  # labels themselves are invalid: reported there
        return v
    unknown = [label for label in v if label not in labels]
    if unknown:
        raise ValueError(f"unknown label {unknown[0]!r} (labels: {', '.join(labels)})")
    return v


class OutputSpec(_Frozen):
    """The model's scores: one per label, in order, turned into probabilities by
    ``activation``; a label is positive at or above its threshold."""

    name: str = Field(min_length=1)
    labels: tuple[Annotated[str, Field(min_length=1)], ...] = Field(min_length=1)
    activation: Literal["softmax", "sigmoid", "none"]
    default_threshold: float = 0.5
    thresholds: dict[str, float] = Field(default_factory=dict)
    urgent: tuple[str, ...] = ()
    abnormal: tuple[str, ...] = ()
    normal_labels: tuple[str, ...] = ()  # "No Finding": never positive, never abnormal

    @field_validator("labels")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        dup = sorted({label for label in v if v.count(label) > 1})
        if dup:
            raise ValueError(f"duplicate label {dup[0]!r}")
        return v

    @field_validator("thresholds")
    @classmethod
    def _threshold_labels(cls, v: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        _known_labels(tuple(v), info)
        return v

    _urgent_known = field_validator("urgent", "abnormal", "normal_labels")(_known_labels)

    @model_validator(mode="after")
    def _coherent(self) -> OutputSpec:
        if self.activation != "none":
            named = {"default_threshold": self.default_threshold, **self.thresholds}
            for label, t in named.items():
                if not 0.0 <= t <= 1.0:
                    raise ValueError(f"threshold {label} {t} is not a probability (0-1)")
        both = [label for label in (*self.urgent, *self.abnormal) if label in self.normal_labels]
        if both:
            raise ValueError(f"{both[0]!r} is listed as a normal label and as a finding")
        return self

    def threshold_for(self, label: str) -> float:
        return self.thresholds.get(label, self.default_threshold)

    def priority(self, positives: Iterable[str]) -> Priority:
        """``urgent`` if a positive label is urgent; ``abnormal`` if one is listed in
        ``abnormal`` (or, with that list empty, any positive label that is not a normal
        label); else ``normal``."""
        found = [p for p in positives if p not in self.normal_labels]
        if any(p in self.urgent for p in found):
            return "urgent"
        if any(p in self.abnormal for p in found) if self.abnormal else found:
            return "abnormal"
        return "normal"


class Outputs(_Frozen):
    """What a result produces: DICOM SR, summary Secondary Capture, HL7 ORU, event."""

    sr: bool = True
    sc: bool = False
    hl7: bool = True
    event: bool = True


class ModelCard(_Frozen):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    version: str = Field(min_length=1)
    model: Path
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    intended_use: str = Field(min_length=1)
    applies_to: AppliesTo = AppliesTo()
    input: InputSpec
    preprocessing: Recipe
    output: OutputSpec
    outputs: Outputs = Outputs()

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, v: Any) -> Any:
        if isinstance(v, float):
            msg = f'write the version as text in quotes ("{v}"): YAML reads 1.10 as 1.1'
            raise ValueError(msg)  # noqa: TRY004 - pydantic reports ValueError
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("sha256")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()

    @model_validator(mode="after")
    def _fits_input(self) -> ModelCard:
        size = self.preprocessing.resize.size
        if size != self.input.spatial:
            raise ValueError(
                f"preprocessing.resize.size {list(size)} does not match the input's "
                f"height and width {list(self.input.spatial)}"
            )
        scale = self.preprocessing.scale
        if isinstance(scale, CustomScale) and len(scale.mean) not in (1, self.input.channels):
            raise ValueError(
                f"preprocessing.scale: {len(scale.mean)} mean/std values for "
                f"{self.input.channels} channel(s)"
            )
        return self


# -- loading ---------------------------------------------------------------------------


def _format_loc(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _lines(node: yaml.Node, loc: _Loc, out: dict[_Loc, int]) -> None:
    """1-based line of every key path in the document."""
    out[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _lines(value, (*loc, str(key.value)), out)
            out[(*loc, str(key.value))] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _lines(item, (*loc, i), out)


def _drop_union_tag(loc: _Loc) -> _Loc:
    """``preprocessing.scale.custom.std`` -> ``preprocessing.scale.std`` (see Scale)."""
    if loc[:2] == ("preprocessing", "scale") and loc[2:3] in (("name",), ("custom",)):
        return (*loc[:2], *loc[3:])
    return loc


def _problems(err: ValidationError, lines: Mapping[_Loc, int]) -> list[str]:
    out = []
    for e in err.errors():
        loc = _drop_union_tag(tuple(e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        where = f" (line {line})" if line else ""
        out.append(f"{_format_loc(loc)}: {msg}{where}" if loc else f"{msg}{where}")
    return out


def parse_card(text: str, source: str | Path = "<string>") -> ModelCard:
    """A card from YAML text; :class:`CardError` names each bad field with its line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise CardError(source, f"not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise CardError(source, "a model card is a YAML mapping (id, version, model, ...)")
    lines: dict[_Loc, int] = {}
    if node is not None:
        _lines(node, (), lines)
    try:
        return ModelCard.model_validate(data)
    except ValidationError as err:
        problems = _problems(err, lines)
        raise CardError(source, "; ".join(problems), problems) from None


def load_card(path: str | Path) -> ModelCard:
    """The card in ``path``; :class:`CardError` with the file and the field path."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CardError(path, f"cannot read the card: {err}") from None
    return parse_card(text, path)


def model_path(card: ModelCard, card_file: str | Path) -> Path:
    """The model file: ``card.model`` as written, relative to the card file's folder."""
    return card.model if card.model.is_absolute() else Path(card_file).parent / card.model


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(card: ModelCard, model_file: str | Path) -> None:
    """CardError unless ``model_file`` exists and hashes to the card's sha256."""
    try:
        actual = sha256_of(model_file)
    except FileNotFoundError:
        raise CardError(model_file, f"model file missing (card {card.id} {card.version})") from None
    except OSError as err:
        raise CardError(model_file, f"cannot read the model file: {err}") from None
    if actual != card.sha256:
        raise CardError(
            model_file,
            f"sha256 {actual} does not match card {card.id} {card.version} ({card.sha256})",
        )


# -- the card embedded in the ONNX file ------------------------------------------------


def embeddable(card: ModelCard) -> dict[str, Any]:
    """The card as JSON data to embed in the model (everything but model and sha256)."""
    return card.model_dump(mode="json", exclude={"model", "sha256"})


def metadata_props(card: ModelCard) -> dict[str, str]:
    """``metadata_props`` entries that embed ``card`` (for whoever writes the model)."""
    return {METADATA_KEY: json.dumps(embeddable(card), sort_keys=True)}


def card_from_metadata(
    meta: Mapping[str, str], source: str | Path = "<model>"
) -> dict[str, Any] | None:
    """The embedded card from a model's custom metadata map, None when there is none."""
    text = meta.get(METADATA_KEY)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError as err:
        raise CardError(source, f"metadata {METADATA_KEY!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CardError(source, f"metadata {METADATA_KEY!r} is not a JSON object")
    return data


def _read_metadata(model_file: Path) -> dict[str, str]:
    """The model's custom metadata: onnxruntime (a product dependency), imported only
    here; the ``onnx`` package (development only) where onnxruntime is missing."""
    try:
        import onnxruntime as ort  # noqa: PLC0415 - loaded only when a model is read
    except ImportError:
        import onnx  # noqa: PLC0415 - ImportError when neither is installed

        proto = onnx.load(str(model_file), load_external_data=False)
        return {p.key: p.value for p in proto.metadata_props}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(model_file), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return dict(session.get_modelmeta().custom_metadata_map)


def embedded_card(model_file: str | Path) -> dict[str, Any] | None:
    """The card embedded in the model's ``metadata_props`` (key ``medgw.card``), or None."""
    path = Path(model_file)
    if not path.is_file():
        raise CardError(path, "model file missing")
    try:
        meta = _read_metadata(path)
    except ImportError:
        raise CardError(path, "neither onnxruntime nor onnx is installed") from None
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise CardError(path, f"cannot read the model's metadata: {err}") from None
    return card_from_metadata(meta, path)


_REQUIRED = (("id",), ("version",), ("output", "labels"))
_COMPARED = (
    ("input", "name"),
    ("input", "shape"),
    ("input", "dtype"),
    ("input", "channels"),
    ("input", "layout"),
    ("output", "name"),
    ("output", "activation"),
)


_MISSING = object()


def _get(data: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = data
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _norm(path: tuple[str, ...], value: Any) -> Any:
    if path == ("input", "shape") and isinstance(value, list):
        return ["batch", *value[1:]]  # 1, -1 or a name: a batch of one fits each
    if path in (("id",), ("version",)):
        return str(value)
    return value


def cross_check(card: ModelCard, embedded: Mapping[str, Any] | None) -> list[str]:
    """Where the card embedded in the model disagrees with ``card`` (empty: none, or no
    embedded card). id, version and labels must be embedded; the input and output specs
    and the preprocessing recipe are compared where the embedded card has them."""
    if embedded is None:
        return []
    ours = card.model_dump(mode="json")
    out = []
    for path in (*_REQUIRED, *_COMPARED):
        theirs = _get(embedded, path)
        name = ".".join(path)
        if theirs is _MISSING:
            if path in _REQUIRED:
                out.append(f"{name}: missing from the embedded card")
            continue
        mine = _get(ours, path)
        if _norm(path, theirs) != _norm(path, mine):
            out.append(f"{name}: card {mine!r}, embedded {theirs!r}")
    recipe = embedded.get("preprocessing")
    if recipe is not None:
        try:
            theirs_recipe = Recipe.model_validate(recipe)
        except ValidationError as err:
            count = err.error_count()
            out.append(f"preprocessing: the embedded recipe is invalid ({count} errors)")
        else:
            if theirs_recipe != card.preprocessing:
                out.append(
                    f"preprocessing: card {card.preprocessing.model_dump(mode='json')}, "
                    f"embedded {theirs_recipe.model_dump(mode='json')}"
                )
    return out
