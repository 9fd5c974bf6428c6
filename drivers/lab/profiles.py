"""Analyzer profiles: per-model differences as data (``config/drivers/*.yaml``), not code.

A profile says which protocol an analyzer model speaks, its line defaults, its
link-layer relaxations, where each result field lives in its records, how QC is
recognised, and how its test codes and units map to the LIS. Profiles are found
in ``<folder of the gateway config>/drivers/`` (site profiles, which win) and in
the ``config/drivers/`` folder shipped with medgw. Field paths are written the way
the standards number them: ``O.3.1`` (ASTM record O, field 3, component 1) and
``OBX-5.1`` (HL7 segment OBX, field 5, component 1).
"""

from __future__ import annotations

import codecs
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# a source checkout's config/drivers, else the copy pip installed under <prefix>/share
SHIPPED_DIRS = (
    Path(__file__).resolve().parents[2] / "config" / "drivers",
    Path(sys.prefix) / "share" / "medgw" / "drivers",
)
_ASTM_PATH = re.compile(r"^[HPOROCMQSL]\.\d+(\.\d+)?$")
_HL7_PATH = re.compile(r"^[A-Z][A-Z0-9]{2}-\d+(\.\d+)?$")


class ProfileError(ValueError):
    """A profile file that cannot be used (its path and the field are in the message)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def _paths(value: object, pattern: re.Pattern[str]) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)  # type: ignore[arg-type]
    for item in items:
        if not isinstance(item, str) or not pattern.match(item):
            raise ValueError(f"{item!r} is not a field path like {pattern.pattern}")
    return items


class AstmFields(_Frozen):
    """Where each value lives in E1394 records; a tuple means "first non-empty"."""

    sample_id: tuple[str, ...] = ("O.3.1", "O.4.1")
    patient_id: tuple[str, ...] = ("P.3.1", "P.4.1", "P.5.1")
    patient_name: str = "P.6"
    birth_date: str = "P.8.1"
    sex: str = "P.9.1"
    priority: str = "O.6.1"
    instrument_id: tuple[str, ...] = ("R.14.1", "H.5.1")
    message_time: str = "H.14.1"
    test_code: tuple[str, ...] = ("R.3.4", "R.3.1")
    test_name: str = "R.3.5"
    aspect: str = ""  # e.g. Abbott R.3.10: F final, I interpretation, P raw
    value: tuple[str, ...] = ("R.4.1",)
    units: str = "R.5.1"
    reference_range: str = "R.6"
    flags: str = "R.7"
    status: str = "R.9.1"
    operator: str = "R.11.1"
    # never H.14: a resend gets a new header time, and the fingerprint (analyzer +
    # sample + test + result time) must stay the same; the message time is kept apart
    result_time: tuple[str, ...] = ("R.13.1", "R.12.1", "O.8.1", "O.7.1")
    control: tuple[str, ...] = ("O.16.3", "O.3.1")  # QC material name when qc
    # host queries: the specimen id in Q.3 (starting range: patient id ^ specimen id ^ ...)
    query_specimen: tuple[str, ...] = ("Q.3.2", "Q.3.3", "Q.3.1")

    @field_validator(
        "sample_id",
        "patient_id",
        "instrument_id",
        "test_code",
        "value",
        "result_time",
        "control",
        "query_specimen",
        mode="before",
    )
    @classmethod
    def _many(cls, v: object) -> tuple[str, ...]:
        return _paths(v, _ASTM_PATH)

    @field_validator(
        "patient_name",
        "birth_date",
        "sex",
        "priority",
        "message_time",
        "test_name",
        "units",
        "reference_range",
        "flags",
        "status",
        "operator",
    )
    @classmethod
    def _one(cls, v: str) -> str:
        return _paths(v, _ASTM_PATH)[0] if v else v

    @field_validator("aspect")
    @classmethod
    def _optional(cls, v: str) -> str:
        return _paths(v, _ASTM_PATH)[0] if v else v


class Hl7Fields(_Frozen):
    """Where each value lives in an ORU^R01 / OUL^R22 (HL7 v2 field numbering)."""

    sample_id: tuple[str, ...] = ("SPM-2.1", "OBR-3.1", "OBR-2.1")
    patient_id: tuple[str, ...] = ("PID-3.1", "PID-2.1")
    patient_name: str = "PID-5"
    birth_date: str = "PID-7.1"
    sex: str = "PID-8.1"
    instrument_id: tuple[str, ...] = ("OBX-18.1", "MSH-3.1")
    test_code: tuple[str, ...] = ("OBX-3.1", "OBX-4.1")
    test_name: tuple[str, ...] = ("OBX-3.2", "OBX-4.2")
    value: str = "OBX-5"
    units: str = "OBX-6.1"
    reference_range: str = "OBX-7"
    flags: str = "OBX-8"
    status: str = "OBX-11.1"
    result_time: tuple[str, ...] = ("OBX-19.1", "OBX-14.1", "OBR-7.1", "MSH-7.1")

    @field_validator(
        "sample_id",
        "patient_id",
        "instrument_id",
        "test_code",
        "test_name",
        "result_time",
        mode="before",
    )
    @classmethod
    def _many(cls, v: object) -> tuple[str, ...]:
        return _paths(v, _HL7_PATH)

    @field_validator(
        "patient_name", "birth_date", "sex", "value", "units", "reference_range", "flags", "status"
    )
    @classmethod
    def _one(cls, v: str) -> str:
        return _paths(v, _HL7_PATH)[0] if v else v


class QcRule(_Frozen):
    """A message (or specimen) is QC when ``field`` equals one of ``equals`` or
    matches ``pattern`` (e.g. ASTM H.12 ``Q``, O.12 action code ``Q``)."""

    field: str
    equals: tuple[str, ...] = ()
    pattern: str = ""

    @field_validator("field")
    @classmethod
    def _path(cls, v: str) -> str:
        if not (_ASTM_PATH.match(v) or _HL7_PATH.match(v)):
            raise ValueError(f"{v!r} is not a field path (O.12, MSH-11.1, ...)")
        return v

    @field_validator("pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        if v:
            re.compile(v)
        return v

    def matches(self, value: str) -> bool:
        value = value.strip()
        return bool(value) and (
            value in self.equals or bool(self.pattern and re.search(self.pattern, value))
        )


class CodeMap(_Frozen):
    """An analyzer test code as the LIS knows it."""

    lis: str
    name: str = ""
    loinc: str = ""


class UnitConversion(_Frozen):
    """``value * factor + offset``, for one test (or every test, ``test: "*"``) sent in
    ``from`` units; the original value stays in the journal's raw message."""

    test: str = "*"
    from_units: str = Field(alias="from")
    to: str
    factor: float
    offset: float = 0.0
    decimals: int | None = Field(default=None, ge=0, le=6)


class Relaxations(_Frozen):
    """Deviations from E1381 some instruments need; all off unless the profile says."""

    bare_lf: bool = False  # checksum followed by LF only
    missing_frame_number: bool = False


class Hl7Behaviour(_Frozen):
    """HL7 analyzers: which host query style they use and how they want orders."""

    queries: Literal["none", "law", "mindray"] = "none"  # QBP^Q11 (LAB-27) / QRY^Q02
    order_push: bool = False  # OML^O33 (LAB-28) pushed to the analyzer
    # decode with the profile's encoding whatever MSH-18 says (Mindray BC writes the
    # ambiguous "UNICODE" and sends UTF-8)
    force_encoding: bool = False


class Profile(_Frozen):
    name: str
    title: str
    protocol: Literal["astm", "hl7"]
    models: tuple[str, ...] = ()
    transport: dict[str, Any] = {}  # defaults for the listener's transport section
    frame_size: int = Field(default=247, ge=64, le=64_000)
    encoding: str = "latin-1"
    relaxations: Relaxations = Relaxations()
    astm: AstmFields = AstmFields()
    hl7: Hl7Fields = Hl7Fields()
    hl7_behaviour: Hl7Behaviour = Hl7Behaviour()
    test_code_pattern: str = ""  # regex; group 1 is the code (``685/`` -> ``685``)
    qc: tuple[QcRule, ...] = ()
    orders: Literal["none", "host-query", "download"] = "host-query"
    # how an ordered test is written in O.5 for the analyzer ({code}: its own code)
    order_test_id: str = "^^^{code}"
    # results an analyzer sends besides the final one that the LIS does not want
    # (Abbott ARCHITECT: P = raw RLU); matched against the result's aspect
    drop_aspects: tuple[str, ...] = ()
    # analyzer codes (regular expressions, whole code) that are not results for the LIS:
    # instrument-internal rows such as scattergram coordinates or image names
    ignore_tests: tuple[str, ...] = ()
    codes: dict[str, CodeMap] = {}
    units: tuple[UnitConversion, ...] = ()
    notes: str = ""

    @field_validator("encoding")
    @classmethod
    def _codec(cls, v: str) -> str:
        try:
            return codecs.lookup(v).name
        except LookupError:
            raise ValueError(f"unknown character encoding {v!r}") from None

    @field_validator("test_code_pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        if v and re.compile(v).groups < 1:
            raise ValueError("needs a group: the part of the test id that is the code")
        return v

    @field_validator("ignore_tests")
    @classmethod
    def _regexes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in v:
            re.compile(pattern)
        return v

    def ignored(self, code: str) -> bool:
        return any(re.fullmatch(p, code) for p in self.ignore_tests)

    def analyzer_code(self, lis_code: str) -> str:
        """The analyzer's code for a LIS code: the first ``codes`` entry that maps to it
        (aspect suffixes such as ``651/F`` dropped); the LIS code itself when none does."""
        for code, mapping in self.codes.items():
            if mapping.lis == lis_code:
                return code.split("/")[0]
        return lis_code

    def code_of(self, raw: str) -> str:
        code = raw.strip()
        if self.test_code_pattern:
            m = re.search(self.test_code_pattern, code)
            if m:
                return m.group(1)
        return code


def profile_dirs(config_dir: str | Path | None) -> tuple[Path, ...]:
    """Site profiles (beside the config file) first, then the shipped ones."""
    dirs = []
    if config_dir is not None:
        dirs.append(Path(config_dir) / "drivers")
    shipped = next((d for d in SHIPPED_DIRS if d.is_dir()), SHIPPED_DIRS[0])
    dirs.append(shipped)
    return tuple(d.resolve() for d in dirs)


def load_profile_file(path: Path) -> Profile:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ProfileError(f"{path}: cannot read: {err}") from err
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a profile is a YAML mapping")
    data.setdefault("name", path.stem)
    if data["name"] != path.stem:
        raise ProfileError(f"{path}: name {data['name']!r} differs from the file name")
    try:
        return Profile.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProfileError(f"{path}: {where}: {first['msg']}") from err


@lru_cache(maxsize=8)
def catalog(dirs: tuple[Path, ...]) -> dict[str, Profile]:
    """Every profile in ``dirs``; a name found earlier wins (site over shipped)."""
    found: dict[str, Profile] = {}
    for folder in reversed(dirs):
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                found[path.stem] = load_profile_file(path)
    return found


def find_profile(name: str, config_dir: str | Path | None = None) -> Profile:
    """The profile called ``name``; ProfileError naming the known ones when absent."""
    profiles = catalog(profile_dirs(config_dir))
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none installed"
        raise ProfileError(f"unknown profile {name!r} (known: {known})")
    return profiles[name]
