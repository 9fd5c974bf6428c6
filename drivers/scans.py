"""Drop folders for scanned X-ray film and paper ECGs: ``film-folder`` and ``ecg-folder``.

```yaml
- {id: film-room2, type: film-folder, path: /srv/scans/film, dpi: 150,
   filename_pattern: "{accession}_{n}.png", body_part: CHEST}
- {id: ecg-ward, type: ecg-folder, path: /srv/scans/ecg, dpi: 200,
   layout: 3x4+II, speed_mm_s: 25, gain_mm_mv: 10}
```

A scanner (or a technician) writes files into ``path``. A file is taken only when
it is complete: a sidecar ``NAME.ready`` exists (it may hold JSON with
``accession``/``patient_id``), or its size and time have not changed for
``stable_s``. It is then matched to an order — the accession or patient id from
the file name (``filename_pattern``), a sidecar, or the worklist (one scheduled
order for that patient) — never guessed. A matched scan becomes DICOM (a
multi-frame Secondary Capture, conversion type DF; for an ECG also a 12-lead
waveform when the digitizer's own checks pass), is journaled and routed like
anything a modality sends, and the file moves to ``done/``. A file that cannot be
read goes to ``failed/`` with ``NAME.reason.txt``; an unmatched one to
``unmatched/`` (re-tried against the worklist every ``rematch_s``: the order may
come later). Nothing is deleted. ``medgw digitize pending`` lists the waiting ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps
from pydantic import Field, field_validator

from dicom.ecg_waveform import EcgError, ecg_12lead, hr_oru, scan_sc
from dicom.film import FilmError, ScanImage, film_sc, read_scan
from dicom.headers import routing_headers
from dicom.worklist import WorklistStore, worklist_store
from drivers.ecg.digitize import EcgDigitization, digitize
from gateway.config import ListenerBase
from gateway.envelope import Envelope
from gateway.errors import JournalError
from gateway.interfaces import Intake
from gateway.orders import Order
from gateway.registry import PluginContext

log = logging.getLogger(__name__)

SUBFOLDERS = ("done", "failed", "unmatched")
IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".reason.txt", ".ready")
FIELDS = {"accession": r"[A-Za-z0-9._-]+", "patient_id": r"[A-Za-z0-9._-]+", "n": r"\d+"}
# Pillow modes of a colour page: the digitizer finds the ECG grid by its red
COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr"})


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """``{accession}_{n}.png`` -> a regex with named groups; ``*`` matches anything;
    the extension is matched without regard to case."""
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}|\*", pattern):
        out += re.escape(pattern[pos : m.start()])
        name = m.group(1)
        if name is None:
            out += ".*?"
        elif name in FIELDS:
            out += f"(?P<{name}>{FIELDS[name]})"
        else:
            raise ValueError(f"unknown field {{{name}}} (known: {', '.join(FIELDS)})")
        pos = m.end()
    out += re.escape(pattern[pos:])
    return re.compile(f"^{out}$", re.IGNORECASE)


class ScanFolderBase(ListenerBase):
    path: Path
    dpi: float = Field(gt=0, le=4800)
    filename_pattern: str = "{accession}_{n}.*"
    match: tuple[Literal["filename", "sidecar", "barcode", "worklist"], ...] = (
        "sidecar",
        "filename",
        "barcode",  # a QR code / barcode on the sheet (optional package zxing-cpp)
        "worklist",
    )
    stable_s: float = Field(default=2.0, ge=0)
    poll_s: float = Field(default=1.0, gt=0)
    rematch_s: float = Field(default=60.0, gt=0)
    institution: str = ""

    @field_validator("filename_pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        pattern_regex(v)
        return v


class FilmFolderSettings(ScanFolderBase):
    """``body_part`` (e.g. CHEST) and ``modality`` go into the DICOM header, so routes
    (and AI triage cards) can select digitized chest films."""

    type: Literal["film-folder"]
    modality: str = Field(default="OT", pattern=r"^[A-Z0-9]{1,16}$")
    body_part: str = ""
    burned_in_label: bool = True  # films usually carry a name label: say so honestly
    auto_crop: bool = False
    auto_levels: bool = False


class EcgFolderSettings(ScanFolderBase):
    type: Literal["ecg-folder"]
    layout: str = "3x4+II"
    speed_mm_s: float = Field(default=25.0, gt=0)
    gain_mm_mv: float = Field(default=10.0, gt=0)
    sampling_hz: int = Field(default=500, ge=100, le=2000)
    hl7_oru: bool = False  # heart rate to the HIS (routed like any message)


ScanSettings = FilmFolderSettings | EcgFolderSettings


class Unmatched(Exception):
    """No order for the scan (the reason says what was tried)."""


@dataclass
class Candidate:
    size: int
    mtime: float
    seen: float


@dataclass
class FolderState:
    candidates: dict[str, Candidate] = field(default_factory=dict)
    last_rematch: float = 0.0


def sidecar(path: Path) -> dict[str, str] | None:
    """The ``NAME.ready`` marker's content (JSON with accession/patient_id, or empty)."""
    marker = path.with_name(path.name + ".ready")
    if not marker.exists():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return {k: str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def barcode_ids(data: bytes) -> dict[str, str]:
    """Accession / patient id from a QR code or barcode on the sheet: ``ACC:…``,
    ``PID:…``, JSON ``{"accession": …}``, or a bare token taken as the accession.
    Needs the optional ``zxing-cpp`` package; without it (or without a code) nothing."""
    try:
        import zxingcpp  # type: ignore[import-not-found, unused-ignore]  # noqa: PLC0415
    except ImportError:
        return {}
    try:
        with Image.open(io.BytesIO(data)) as image:
            codes = zxingcpp.read_barcodes(image.convert("L"))
    except (OSError, ValueError):
        return {}
    for code in codes:
        text = str(code.text).strip()
        if text.startswith("{"):
            try:
                doc = json.loads(text)
            except ValueError:
                continue
            found = {k: str(doc[k]) for k in ("accession", "patient_id") if doc.get(k)}
        elif ":" in text:
            key, _, value = text.partition(":")
            name = {"ACC": "accession", "PID": "patient_id"}.get(key.strip().upper())
            found = {name: value.strip()} if name and value.strip() else {}
        else:
            found = {"accession": text} if re.fullmatch(FIELDS["accession"], text) else {}
        if found:
            return found
    return {}


def find_order(
    cfg: ScanFolderBase,
    name: str,
    meta: dict[str, str] | None,
    ctx: PluginContext,
    data: bytes | None = None,
) -> Order:
    """The order of a scan, by the configured means, in order; Unmatched otherwise."""
    store = worklist_store(ctx)
    tried = []
    wanted: dict[str, str] = {}
    for how in cfg.match:
        if how == "sidecar" and meta:
            wanted = {k: meta[k] for k in ("accession", "patient_id") if meta.get(k)}
        elif how == "barcode" and not wanted and data is not None:
            wanted = barcode_ids(data)
            if not wanted:
                tried.append("no readable code on the sheet")
        elif how == "filename" and not wanted:
            m = pattern_regex(cfg.filename_pattern).match(name)
            if m:
                wanted = {k: v for k, v in m.groupdict().items() if k != "n" and v}
            else:
                tried.append(f"file name does not match {cfg.filename_pattern!r}")
        elif how == "worklist" and wanted:
            return _from_worklist(store, wanted)
    if wanted and "worklist" not in cfg.match:
        # the technician named the patient/accession: use exactly that, nothing invented
        return Order(
            control="new",
            accession=wanted.get("accession", ""),
            patient_id=wanted.get("patient_id", ""),
        )
    raise Unmatched("; ".join(tried) or "nothing identifies the patient or the order")


def _from_worklist(store: WorklistStore, wanted: dict[str, str]) -> Order:
    """The one order ``wanted`` names; Unmatched (saying why) for none, several, or an
    accession whose order is another patient's: a person decides."""
    patient_id = wanted.get("patient_id", "")
    if "accession" in wanted:
        items = [i for i in store.items(wanted["accession"]) if i.status != "cancelled"]
        what = f"accession {wanted['accession']}"
    else:
        items = [
            i for i in store.items() if i.status == "scheduled" and i.order.patient_id == patient_id
        ]
        what = f"patient_id {patient_id}"
    if not items:
        raise Unmatched(f"no scheduled order in the worklist for {what}")
    if len(items) > 1:
        found = ", ".join(sorted({f"{i.accession}/{i.step_id or '-'}" for i in items}))
        raise Unmatched(f"{len(items)} scheduled orders in the worklist for {what}: {found}")
    item = items[0]
    if patient_id and item.order.patient_id != patient_id:
        raise Unmatched(
            f"accession {item.accession} is patient_id {item.order.patient_id} in the worklist,"
            f" not {patient_id}"
        )
    return item.order.model_copy(update={"study_uid": item.study_uid})


def convert(
    cfg: ScanSettings, data: bytes, order: Order, scanned: datetime | None = None
) -> list[Envelope]:
    """The DICOM (and HL7) envelopes of one scan; FilmError when it cannot be read.

    ``scanned`` (the file's time) dates the objects, so a re-run makes the same bytes."""
    scanned = scanned or datetime.now(UTC)
    scan = read_scan(data)
    out: list[bytes] = []
    extra: dict[str, str] = {}
    hl7: bytes | None = None
    if isinstance(cfg, FilmFolderSettings):
        out.append(
            film_sc(
                scan,
                order,
                dpi=cfg.dpi,
                modality=cfg.modality,
                body_part=cfg.body_part,
                burned_in_label=cfg.burned_in_label,
                auto_crop=cfg.auto_crop,
                auto_levels=cfg.auto_levels,
                institution=cfg.institution,
                created=scanned,
            )
        )
    else:
        page = scan_sc(scan, order, dpi=cfg.dpi, created=scanned, institution=cfg.institution)
        out.append(page)
        try:
            waveform, hl7 = _waveform(cfg, data, scan, order, page=page, scanned=scanned)
        except EcgError as err:  # the page is still stored; a person reads it
            extra["ecg_not_digitized"] = str(err)[:200]
        except Exception as err:  # a digitizer bug must not lose the page
            log.exception("scans.digitizer_failed listener=%s", cfg.id)
            extra["ecg_not_digitized"] = f"digitizer failed: {err!r}"[:200]
        else:
            out.append(waveform)
    envelopes = []
    for obj in out:
        headers = routing_headers(obj) | extra
        envelopes.append(
            Envelope(
                kind="dicom",
                source=cfg.id,
                body=obj,
                headers=headers,
                idem_key=f"dicom:{headers.get('SOPInstanceUID', '')}",
                as_file=True,
            )
        )
    if hl7 is not None:
        envelopes.append(
            Envelope(kind="hl7", source=cfg.id, body=hl7, headers={"message_type": "ORU^R01"})
        )
    return envelopes


def _waveform(
    cfg: EcgFolderSettings,
    data: bytes,
    scan: ScanImage,
    order: Order,
    *,
    page: bytes,
    scanned: datetime,
) -> tuple[bytes, bytes | None]:
    """The 12-lead waveform in the page's study, and the heart-rate ORU when configured;
    EcgError naming the digitizer's failed checks when the page cannot be read back."""
    result = digitize(
        _page_for_digitizer(data, scan),
        dpi=cfg.dpi,
        layout=cfg.layout,
        speed_mm_s=cfg.speed_mm_s,
        gain_mm_mv=cfg.gain_mm_mv,
        sampling_hz=cfg.sampling_hz,
    )
    if not result.ok:
        raise EcgError("; ".join(result.checks))
    waveform = ecg_12lead(
        full_record(result),
        result.sampling_hz,
        order,
        acquired=scanned,
        study_uid=routing_headers(page).get("StudyInstanceUID") or None,
        heart_rate_bpm=result.heart_rate_bpm,
        institution=cfg.institution,
    )
    hl7: bytes | None = None
    if cfg.hl7_oru and result.heart_rate_bpm is not None:
        hl7 = hr_oru(order, result.heart_rate_bpm, observed=scanned, timestamp=scanned)
    return waveform, hl7


def _page_for_digitizer(data: bytes, scan: ScanImage) -> NDArray[np.uint8]:
    """The page as the digitizer needs it: in colour when the file is (it finds the grid by
    its red), turned as the file's EXIF tag says like ``scan.pixels``; gray in 8 bits."""
    if scan.mode in COLOUR_MODES:
        with Image.open(io.BytesIO(data)) as image:
            rgb: NDArray[np.uint8] = np.asarray(
                ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8
            )
        return rgb
    if scan.pixels.dtype == np.uint16:
        return (scan.pixels >> 8).astype(np.uint8)
    gray: NDArray[np.uint8] = scan.pixels
    return gray


def full_record(result: EcgDigitization) -> dict[str, NDArray[np.float64]]:
    """Each lead over the whole record at its true time (NaN where the paper does not show
    it: a 3x4 page shows each lead for 2.5 s), the rhythm strip's leads whole."""
    fs = result.sampling_hz
    length = max(
        [len(v) for v in result.rhythm.values()]
        + [round(result.lead_start_s.get(k, 0.0) * fs) + len(v) for k, v in result.leads.items()]
    )
    out: dict[str, NDArray[np.float64]] = {}
    for name, segment in result.leads.items():
        full = np.full(length, np.nan)
        if name in result.rhythm:
            strip = np.asarray(result.rhythm[name], dtype=np.float64)
            full[: len(strip)] = strip
        else:
            start = round(result.lead_start_s.get(name, 0.0) * fs)
            full[start : start + len(segment)] = segment
        out[name] = full
    return out


def _move(path: Path, base: Path, folder: str, reason: str = "") -> Path:
    """Move a scan (and its sidecar) from the drop folder or one of its sub-folders into
    ``base/folder``, with ``reason`` beside it; a reason left at the old place goes."""
    target_dir = base / folder
    target_dir.mkdir(exist_ok=True)
    target = target_dir / path.name
    if target.exists():  # never overwrite an earlier scan with the same name
        target = target_dir / f"{path.stem}.{int(time.time() * 1000)}{path.suffix}"
    os.replace(path, target)
    marker = path.with_name(path.name + ".ready")
    if marker.exists():
        os.replace(marker, target.with_name(target.name + ".ready"))
    old_reason = path.with_name(path.name + ".reason.txt")
    if old_reason.parent != target_dir:
        old_reason.unlink(missing_ok=True)
    if reason:
        target.with_name(target.name + ".reason.txt").write_text(reason + "\n", encoding="utf-8")
    else:
        target.with_name(target.name + ".reason.txt").unlink(missing_ok=True)
    return target


def waiting_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(IGNORED_SUFFIXES)
    )


class ScanFolderListener:
    def __init__(self, cfg: ScanSettings, intake: Intake, ctx: PluginContext) -> None:
        self.id = cfg.id
        self.cfg = cfg
        self.intake = intake
        self.ctx = ctx
        self.state = FolderState()
        self._task: asyncio.Task[None] | None = None
        self.processed = 0

    async def __aenter__(self) -> ScanFolderListener:
        self.cfg.path.mkdir(parents=True, exist_ok=True)
        for sub in SUBFOLDERS:
            (self.cfg.path / sub).mkdir(exist_ok=True)
        self._task = asyncio.create_task(self._watch(), name=f"scans-{self.id}")
        log.info(
            "scans.watching listener=%s path=%s type=%s", self.id, self.cfg.path, self.cfg.type
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            try:
                await self.scan_once(time.monotonic())
            except Exception:
                log.exception("scans.poll_failed listener=%s", self.id)
            await asyncio.sleep(self.cfg.poll_s)

    async def scan_once(self, now: float) -> None:
        """One look at the folder: take what is complete; re-match the unmatched."""
        for path in waiting_files(self.cfg.path):
            if self._complete(path, now):
                await self._take(path)
        if now - self.state.last_rematch >= self.cfg.rematch_s:
            self.state.last_rematch = now
            for path in waiting_files(self.cfg.path / "unmatched"):
                await self._take(path, rematch=True)

    def _complete(self, path: Path, now: float) -> bool:
        """Complete: a ``.ready`` sidecar, or size and mtime unchanged for ``stable_s``."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        if sidecar(path) is not None:
            return st.st_size > 0
        seen = self.state.candidates.get(path.name)
        if seen is None or (seen.size, seen.mtime) != (st.st_size, st.st_mtime):
            self.state.candidates[path.name] = Candidate(st.st_size, st.st_mtime, now)
            return False
        return st.st_size > 0 and now - seen.seen >= self.cfg.stable_s

    async def _take(self, path: Path, *, rematch: bool = False) -> None:
        self.state.candidates.pop(path.name, None)
        meta = sidecar(path)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as err:
            log.warning("scans.unreadable listener=%s file=%s error=%s", self.id, path.name, err)
            return
        try:
            order = await asyncio.to_thread(find_order, self.cfg, path.name, meta, self.ctx, data)
        except Unmatched as err:
            if not rematch:
                await asyncio.to_thread(_move, path, self.cfg.path, "unmatched", str(err))
                log.warning(
                    "scans.unmatched listener=%s file=%s reason=%s", self.id, path.name, err
                )
            return
        try:
            stat = await asyncio.to_thread(path.stat)
            scanned = datetime.fromtimestamp(stat.st_mtime, UTC)
            envelopes = await asyncio.to_thread(convert, self.cfg, data, order, scanned)
        except (FilmError, OSError, ValueError) as err:
            await asyncio.to_thread(_move, path, self.cfg.path, "failed", f"cannot digitize: {err}")
            log.warning("scans.failed listener=%s file=%s reason=%s", self.id, path.name, err)
            return
        try:
            for env in envelopes:
                staged = await asyncio.to_thread(self.intake.stage, env)  # writes the blob
                await self.intake.accept(staged)
        except JournalError as err:  # stays where it is; taken again at the next look
            log.error("scans.not_stored listener=%s file=%s error=%s", self.id, path.name, err)
            return
        done = await asyncio.to_thread(_move, path, self.cfg.path, "done")
        self.processed += 1
        not_digitized = envelopes[0].headers.get("ecg_not_digitized") if envelopes else None
        log.info(
            "scans.done listener=%s file=%s accession=%s objects=%d%s",
            self.id,
            done.name,
            order.accession or "-",
            len(envelopes),
            f" waveform_not_made={not_digitized!r}" if not_digitized else "",
        )
