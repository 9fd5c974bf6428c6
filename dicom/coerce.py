"""Route step ``dicom-coerce``: a tag-coerced copy of a DICOM instance for forwarding.

``{match: {kind: dicom}, steps: [{dicom-coerce: {set: {InstitutionName: Lao Cai GH},
prefix: {PatientID: "LC-"}}}], to: [pacs]}`` forwards a copy whose named elements
are changed; the original stays in the journal byte-exact (ARCHITECTURE.md,
"Bodies are kept exactly as received") and is not passed on. The copy is a new
envelope pointing to its parent, with header ``coerced`` naming what changed.

Only the named elements change. The copy is written back in the original's
transfer syntax with its file meta, and pixel data is never decoded: compressed
fragments are written back as read, byte for byte. ``prefix`` is idempotent (a
value that already starts with the prefix is left alone), so an instance that
comes back through a second gateway is not prefixed twice. A new value the
instance's character set cannot encode (Vietnamese text in a Latin-1 instance)
switches the copy to ``ISO_IR 192`` (UTF-8, PS3.3 C.12.1.1.2) with every text
element re-encoded, and ``SpecificCharacterSet`` is listed as coerced.

``record_original: true`` also records the previous values in an Original
Attributes Sequence item (PS3.3 C.12.1.1.9, reason ``COERCE``), the standard's
way to tell the PACS what a system changed. Its modification time is the
original's receive time, so a re-run after a crash yields the same bytes (and
the journal drops the duplicate).
"""

from __future__ import annotations

import asyncio
import codecs
import logging
from collections.abc import Sequence
from io import BytesIO
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydicom import dcmread, dcmwrite
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import validate_value

from gateway.envelope import Envelope, StoredEnvelope
from gateway.errors import PermanentError
from gateway.registry import PluginContext, Registry

log = logging.getLogger(__name__)

AnyEnvelope = Envelope | StoredEnvelope

# elements that identify the instance or steer the decoding of everything else
PROTECTED = {"SOPClassUID", "SOPInstanceUID", "SpecificCharacterSet", "PixelData"}
TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"}
NOT_SETTABLE_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "AT"}
BINARY_NUMBER_VRS = {"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"}
RAISE = 2  # pydicom.config.RAISE: validation errors raise ValueError
UTF8 = "ISO_IR 192"


def _checked_keyword(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword!r} is not a DICOM keyword in pydicom's dictionary")
    if tag >> 16 == 0x0002 or keyword in PROTECTED:
        raise ValueError(f"{keyword} cannot be coerced (file meta or instance identity)")
    if tag >> 16 & 1:
        raise ValueError(f"{keyword} is a private element")
    return keyword


class CoerceParams(BaseModel):
    """``set``: keyword -> new value; ``prefix``: keyword -> text put in front."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    set_: dict[str, str | int | float] = Field(default_factory=dict, alias="set")
    prefix: dict[str, str] = Field(default_factory=dict)
    record_original: bool = False

    @field_validator("set_")
    @classmethod
    def _set_values(cls, values: dict[str, str | int | float]) -> dict[str, str | int | float]:
        out: dict[str, str | int | float] = {}
        for keyword, given in values.items():
            vr = dictionary_VR(tag_for_keyword(_checked_keyword(keyword)) or 0)
            if vr in NOT_SETTABLE_VRS or "or" in vr:
                raise ValueError(f"{keyword} (VR {vr}) cannot be set from configuration")
            value = given
            if vr in BINARY_NUMBER_VRS:
                if isinstance(given, str):
                    raise ValueError(f"{keyword} (VR {vr}) takes a number, got {given!r}")
            else:  # text VRs, IS and DS: a YAML number becomes its text
                value = str(given)
            _validate(keyword, vr, value)
            out[keyword] = value
        return out

    @field_validator("prefix")
    @classmethod
    def _prefixes(cls, values: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        for keyword, text in values.items():
            vr = dictionary_VR(tag_for_keyword(_checked_keyword(keyword)) or 0)
            if vr not in TEXT_VRS:
                raise ValueError(f"{keyword} (VR {vr}) is not text: it cannot take a prefix")
            if not text:
                raise ValueError(f"the prefix for {keyword} is empty")
            _validate(keyword, vr, text)
        both = set(values) & set(info.data.get("set_", {}))
        if both:
            raise ValueError(f"{', '.join(sorted(both))}: both set and prefixed")
        return values


def _validate(keyword: str, vr: str, value: object) -> None:
    try:
        validate_value(vr, value, RAISE)
    except ValueError as err:
        raise ValueError(f"{keyword}: {err}") from err


def _encodable(value: str, charset: Any) -> bool:
    """Whether ``value`` can be written in the instance's declared character set."""
    if value.isascii():
        return True
    terms = [charset] if isinstance(charset, str) else list(charset or [])
    if len(terms) != 1:  # default repertoire, or ISO 2022 code extensions: keep it simple
        return False
    if terms[0].strip() == UTF8:
        return True
    try:
        for codec in convert_encodings(terms):
            value.encode(codecs.lookup(codec).name)
    except (UnicodeError, LookupError):
        return False
    return True


class CoerceStep:
    """``async run(envelope) -> [coerced copy]`` (gateway.steps.Step)."""

    def __init__(self, params: CoerceParams, site_id: str = "") -> None:
        self.params = params
        self.site_id = site_id

    async def run(self, envelope: AnyEnvelope) -> Sequence[AnyEnvelope]:
        if envelope.kind != "dicom":
            log.info("coerce.skip kind=%s envelope=%s", envelope.kind, envelope.id)
            return [envelope]
        body, changed = await asyncio.to_thread(self.coerce, envelope)
        if not changed:  # nothing to change: the original goes on as it is
            return [envelope]
        headers = {**envelope.headers, "coerced": ",".join(changed)}
        for keyword in changed:
            if keyword in headers and keyword in self.params.set_:
                headers[keyword] = str(self.params.set_[keyword])
        return [
            Envelope(
                kind="dicom",
                source=envelope.source,
                body=body,
                headers=headers,
                parent_id=envelope.id,
                as_file=True,
            )
        ]

    def coerce(self, envelope: AnyEnvelope) -> tuple[bytes, list[str]]:
        """The coerced Part-10 bytes and the keywords changed (blocking: run in a thread)."""
        source = BytesIO(envelope.body) if envelope.body else getattr(envelope, "blob_path", None)
        if source is None:
            raise PermanentError("envelope has neither a body nor a blob file")
        try:
            ds = dcmread(source)
        except Exception as err:  # any parse failure means this instance cannot be coerced
            raise PermanentError(f"cannot read DICOM to coerce it: {err}") from err
        if "SOPInstanceUID" not in ds or "TransferSyntaxUID" not in ds.file_meta:
            raise PermanentError("not a DICOM Part-10 instance (no SOP Instance UID or file meta)")
        before: dict[str, DataElement | None] = {}
        updates: dict[str, Any] = {}
        for keyword, value in self.params.set_.items():
            current = _element(ds, keyword)
            if current is None or current.value != value:
                updates[keyword] = value
        for keyword, text in self.params.prefix.items():
            current = _element(ds, keyword)
            old = "" if current is None or current.value is None else str(current.value)
            if old and not old.startswith(text):
                updates[keyword] = text + old
        if not updates:
            return b"", []
        changed = sorted(updates)
        texts = [v for v in updates.values() if isinstance(v, str)]
        if not all(_encodable(v, ds.get("SpecificCharacterSet")) for v in texts):
            _to_utf8(ds)
            changed.append("SpecificCharacterSet")
        for keyword, value in updates.items():
            before[keyword] = _element(ds, keyword)
            tag = tag_for_keyword(keyword)
            assert tag is not None
            ds[tag] = DataElement(tag, dictionary_VR(tag), value)
            _check_length(keyword, ds[tag])
        if self.params.record_original:
            self._record(ds, before, envelope)
        out = BytesIO()
        try:
            dcmwrite(out, ds, enforce_file_format=True)
        except (ValueError, AttributeError, TypeError) as err:
            raise PermanentError(f"cannot write the coerced copy: {err}") from err
        return out.getvalue(), changed

    def _record(
        self, ds: Dataset, before: dict[str, DataElement | None], envelope: AnyEnvelope
    ) -> None:
        """Append an Original Attributes Sequence item (PS3.3 Table C.12-1)."""
        previous = Dataset()
        for keyword, elem in before.items():
            tag = tag_for_keyword(keyword)
            assert tag is not None
            previous[tag] = elem if elem is not None else DataElement(tag, dictionary_VR(tag), None)
        item = Dataset()
        item.ModifiedAttributesSequence = DicomSequence([previous])
        item.AttributeModificationDateTime = envelope.received_at.strftime("%Y%m%d%H%M%S.%f+0000")
        item.ModifyingSystem = f"medgw {self.site_id}".strip()[:64]
        item.SourceOfPreviousValues = ""
        item.ReasonForTheAttributeModification = "COERCE"
        if "OriginalAttributesSequence" in ds:
            ds.OriginalAttributesSequence.append(item)
        else:
            ds.OriginalAttributesSequence = DicomSequence([item])


def _element(ds: Dataset, keyword: str) -> DataElement | None:
    tag = tag_for_keyword(keyword)
    return ds[tag] if tag is not None and tag in ds else None


def _to_utf8(ds: Dataset) -> None:
    """Decode every text element with the current character set, then declare UTF-8,
    so that writing re-encodes all of them (undecoded raw elements would be written
    as their old bytes)."""
    for _ in ds.iterall():
        pass
    ds.SpecificCharacterSet = UTF8


def _check_length(keyword: str, elem: DataElement) -> None:
    try:
        validate_value(elem.VR, elem.value, RAISE)
    except ValueError as err:
        raise PermanentError(f"coerced {keyword} is not valid for VR {elem.VR}: {err}") from err


def register(registry: Registry) -> None:
    def make(params: CoerceParams, ctx: PluginContext) -> CoerceStep:
        return CoerceStep(params, ctx.site_id)

    registry.step(
        "dicom-coerce",
        CoerceParams,
        make,
        "forwards a copy with DICOM elements set or prefixed (original kept unchanged)",
    )


__all__ = ["CoerceParams", "CoerceStep"]
