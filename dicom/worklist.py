"""Modality worklist: orders stored as scheduled procedure steps, answered to C-FIND
(DICOM PS3.4 Annex K, Basic Worklist Management; matching per PS3.4 C.2.2.2).

:class:`WorklistStore` keeps one row per (accession, scheduled step) in its own
SQLite file, ``<state_dir>/worklist.sqlite`` (WAL, ``synchronous=FULL``), never in
the journal. The ``worklist`` route step applies ``order`` envelopes to it; the
``dicom-scp`` listener answers MWL C-FIND with :meth:`WorklistStore.find` and calls
:meth:`WorklistStore.mark_received` when an instance with a known accession arrives.
Both share one store through ``ctx.services`` (:func:`worklist_store`).

Every call opens and closes its own SQLite connection, so the store is safe to use
from the event loop's worker threads and from pynetdicom's association threads
alike, and has nothing to close at shutdown. Writes are serialized by a lock.
See docs/worklist.md for the field mapping and the matching rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import generate_uid

from gateway.errors import PermanentError, TransientError
from gateway.journal import transaction
from gateway.orders import ORDER_KIND, Order
from gateway.registry import PluginContext, Registry
from gateway.steps import AnyEnvelope

log = logging.getLogger(__name__)

SERVICE_KEY = "dicom.worklist"
FILE_NAME = "worklist.sqlite"
CHARSET = "ISO_IR 192"  # UTF-8: Vietnamese names reach the modality intact

SCHEDULED, COMPLETED, CANCELLED = "scheduled", "completed", "cancelled"

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    accession   TEXT NOT NULL,
    step_id     TEXT NOT NULL,                  -- IPC-4, '' when the order has none
    status      TEXT NOT NULL,                  -- scheduled | completed | cancelled
    study_uid   TEXT NOT NULL,                  -- from the order, else generated once, kept
    patient_id  TEXT NOT NULL,
    data        TEXT NOT NULL,                  -- the Order as JSON (merged over updates)
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (accession, step_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_status ON items (status, patient_id);
CREATE TABLE IF NOT EXISTS events (             -- audit: what changed each item, and why
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL NOT NULL,
    accession   TEXT NOT NULL,
    step_id     TEXT NOT NULL,
    action      TEXT NOT NULL,                  -- new | update | cancel | received
    status      TEXT NOT NULL,                  -- the item's status afterwards
    message     TEXT NOT NULL                   -- HL7 MSH-10 of the order, if any
);
"""

# RequestedProcedurePriority (0040,1003) from the order's priority (HL7 TQ.6 / TQ1-9)
_PRIORITY = {"S": "STAT", "A": "HIGH", "R": "ROUTINE"}

# what an update may change: everything but the keys (and lab-only fields)
_UPDATABLE = tuple(
    name
    for name in Order.model_fields
    if name not in {"control", "accession", "step_id", "specimen_id", "tests"}
)
SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class WorklistItem:
    """One stored scheduled procedure step."""

    accession: str
    step_id: str
    status: str
    study_uid: str
    order: Order

    def dataset(self) -> Dataset:
        """The full MWL item (every attribute this store knows, PS3.4 Table K.6-1)."""
        return item_dataset(self.order, self.step_id, self.study_uid)


class WorklistStore:
    """Worklist items in ``path`` (SQLite). Thread-safe; see the module docstring."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        with self._connect() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: schema {version} is newer than this medgw")
            conn.executescript(SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock, self._connect() as conn, transaction(conn):
            yield conn

    # -- writes -----------------------------------------------------------------------

    def apply(self, order: Order) -> int:
        """Apply one order; returns how many items it changed (created, updated, cancelled).

        ``new`` (re)schedules the step with the order's data; ``update`` merges the
        order's non-empty fields into it (an empty field in HL7 means "no change"),
        creating the item when it is unknown and the order names the patient;
        ``cancel`` marks it cancelled, kept for audit and no longer answered. An
        order without ``step_id`` applies to every step of its accession. The Study
        Instance UID is the order's when it has one, else the one already stored for
        the accession, else a new one, kept from then on.
        """
        now = time.time()
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT step_id, status, study_uid, data FROM items WHERE accession = ?",
                (order.accession,),
            ).fetchall()
            study_uid = order.study_uid or next((r[2] for r in rows), "") or generate_uid()
            targets = [r for r in rows if not order.step_id or r[0] == order.step_id]
            changed = 0
            if order.control == "cancel":
                for step_id, status, _, _ in targets:
                    if status != CANCELLED:
                        self._set_status(conn, order.accession, step_id, CANCELLED, now)
                        changed += 1
                    self._event(conn, now, order, step_id, CANCELLED)
                if not targets:
                    log.info("worklist.cancel_unknown accession=%s", order.accession)
                    self._event(conn, now, order, order.step_id, "unknown")
                return changed
            if not targets and not order.patient_id:
                # an update that carries no patient (an SC with ORC only) cannot make an item
                log.warning("worklist.update_unknown accession=%s: no patient", order.accession)
                self._event(conn, now, order, order.step_id, "unknown")
                return 0
            if not targets:
                data = order.model_copy(update={"study_uid": study_uid})
                conn.execute(
                    "INSERT INTO items (accession, step_id, status, study_uid, patient_id, data,"
                    " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        order.accession,
                        order.step_id,
                        SCHEDULED,
                        study_uid,
                        order.patient_id,
                        data.model_dump_json(),
                        now,
                        now,
                    ),
                )
                self._event(conn, now, order, order.step_id, SCHEDULED)
                return 1
            for step_id, status, stored_uid, data_json in targets:
                if order.control == "new":
                    merged = order.model_copy(update={"step_id": step_id})
                    new_status = SCHEDULED
                else:
                    old = Order.model_validate_json(data_json)
                    merged = _merge(old, order)
                    new_status = status
                    if status != SCHEDULED:
                        log.warning(
                            "worklist.update_of_%s accession=%s step=%s: kept %s",
                            status,
                            order.accession,
                            step_id,
                            status,
                        )
                uid = order.study_uid or stored_uid
                merged = merged.model_copy(update={"study_uid": uid})
                conn.execute(
                    "UPDATE items SET status = ?, study_uid = ?, patient_id = ?, data = ?,"
                    " updated_at = ? WHERE accession = ? AND step_id = ?",
                    (
                        new_status,
                        uid,
                        merged.patient_id,
                        merged.model_dump_json(),
                        now,
                        order.accession,
                        step_id,
                    ),
                )
                self._event(conn, now, order, step_id, new_status)
                changed += 1
            return changed

    def mark_received(self, accession: str) -> int:
        """An instance with this AccessionNumber arrived: its scheduled steps become
        ``completed`` and are no longer answered (MWL lists what is still to be done).
        Returns how many steps changed; 0 for an unknown or empty accession."""
        accession = accession.strip()
        if not accession:
            return 0
        now = time.time()
        with self._transaction() as conn:
            steps = [
                r[0]
                for r in conn.execute(
                    "SELECT step_id FROM items WHERE accession = ? AND status = ?",
                    (accession, SCHEDULED),
                )
            ]
            for step_id in steps:
                self._set_status(conn, accession, step_id, COMPLETED, now)
                conn.execute(
                    "INSERT INTO events (at, accession, step_id, action, status, message)"
                    " VALUES (?, ?, ?, 'received', ?, '')",
                    (now, accession, step_id, COMPLETED),
                )
        if steps:
            log.info("worklist.completed accession=%s steps=%d", accession, len(steps))
        return len(steps)

    @staticmethod
    def _set_status(
        conn: sqlite3.Connection, accession: str, step_id: str, status: str, now: float
    ) -> None:
        conn.execute(
            "UPDATE items SET status = ?, updated_at = ? WHERE accession = ? AND step_id = ?",
            (status, now, accession, step_id),
        )

    @staticmethod
    def _event(
        conn: sqlite3.Connection, now: float, order: Order, step_id: str, status: str
    ) -> None:
        conn.execute(
            "INSERT INTO events (at, accession, step_id, action, status, message)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (now, order.accession, step_id, order.control, status, order.message_control_id),
        )

    # -- reads ------------------------------------------------------------------------

    def items(self, accession: str | None = None) -> list[WorklistItem]:
        """Stored items, any status (all of them, or one accession's)."""
        sql = "SELECT accession, step_id, status, study_uid, data FROM items"
        args: tuple[str, ...] = ()
        if accession is not None:
            sql += " WHERE accession = ?"
            args = (accession,)
        with self._connect() as conn:
            rows = conn.execute(sql + " ORDER BY accession, step_id", args).fetchall()
        return [_item(row) for row in rows]

    def find(self, identifier: Dataset) -> Generator[Dataset, None, None]:
        """MWL C-FIND (PS3.4 K.4.1.3.1): one response identifier per scheduled step that
        matches every matching key of ``identifier``, holding the requested attributes
        only (absent ones empty) plus SpecificCharacterSet ``ISO_IR 192``.

        Rows are read at the first ``next()``; responses are built one at a time, so
        an SCP that stops iterating on C-CANCEL does no further work.
        """
        sql = "SELECT accession, step_id, status, study_uid, data FROM items WHERE status = ?"
        args: list[str] = [SCHEDULED]
        for keyword, column in (("AccessionNumber", "accession"), ("PatientID", "patient_id")):
            value = _single_literal(identifier, keyword)
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        with self._connect() as conn:
            rows = conn.execute(sql + " ORDER BY accession, step_id", args).fetchall()
        for row in rows:
            full = _item(row).dataset()
            if matches(full, identifier):
                yield project(full, identifier)


def _item(row: Sequence[Any]) -> WorklistItem:
    accession, step_id, status, study_uid, data = row
    return WorklistItem(accession, step_id, status, study_uid, Order.model_validate_json(data))


def _merge(old: Order, new: Order) -> Order:
    """``old`` with ``new``'s non-empty fields (HL7: an empty field is "no change")."""
    changes = {name: getattr(new, name) for name in _UPDATABLE if getattr(new, name)}
    return old.model_copy(update={**changes, "control": new.control})


def _single_literal(identifier: Dataset, keyword: str) -> str | None:
    """The key's value when it is one literal (no wildcard, no list), for an SQL filter."""
    if keyword not in identifier:
        return None
    value = identifier[keyword].value
    if not isinstance(value, str) or not value or "*" in value or "?" in value:
        return None
    return value.strip()


# -- the DICOM item ------------------------------------------------------------------


def item_dataset(order: Order, step_id: str, study_uid: str) -> Dataset:
    """Order -> MWL item (PS3.4 Table K.6-1; docs/worklist.md has the mapping)."""
    start = order.scheduled_start

    sps = Dataset()
    sps.ScheduledStationAETitle = order.station_ae
    sps.ScheduledProcedureStepStartDate = start[:8]
    sps.ScheduledProcedureStepStartTime = start[8:]
    sps.Modality = order.modality
    sps.ScheduledPerformingPhysicianName = ""
    sps.ScheduledProcedureStepDescription = order.procedure_text
    sps.ScheduledProtocolCodeSequence = DicomSequence(_code_items(order))
    sps.ScheduledProcedureStepID = step_id or order.accession
    sps.ScheduledProcedureStepStatus = "SCHEDULED"

    ds = Dataset()
    ds.SpecificCharacterSet = CHARSET
    ds.AccessionNumber = order.accession
    ds.ReferringPhysicianName = order.referring_physician
    ds.PatientName = order.patient_name
    ds.PatientID = order.patient_id
    ds.IssuerOfPatientID = order.patient_id_issuer
    ds.PatientBirthDate = order.birth_date
    ds.PatientSex = order.sex
    ds.StudyInstanceUID = study_uid
    ds.RequestedProcedureDescription = order.procedure_text
    ds.RequestedProcedureCodeSequence = DicomSequence(_code_items(order))
    ds.RequestedProcedureID = order.accession
    ds.RequestedProcedurePriority = _PRIORITY.get(order.priority[:1].upper(), "")
    ds.ReferencedStudySequence = DicomSequence([])
    ds.ReferencedPatientSequence = DicomSequence([])
    ds.ScheduledProcedureStepSequence = DicomSequence([sps])
    return ds


def _code_items(order: Order) -> list[Dataset]:
    """The requested procedure code (OBR-4) as a code sequence item, if the order has one."""
    if not order.procedure_code:
        return []
    code = Dataset()
    code.CodeValue = order.procedure_code
    code.CodingSchemeDesignator = order.procedure_scheme or "L"  # "L": local (HL7 0396)
    code.CodeMeaning = order.procedure_text
    return [code]


# -- matching (PS3.4 C.2.2.2) ---------------------------------------------------------

_CHARSET_TAG = Tag(0x0008, 0x0005)
# Wild card matching applies to these VRs (PS3.4 C.2.2.2.4)
_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_RANGE_VRS = frozenset({"DA", "TM", "DT"})
# Scheduling keys that an item with no value matches: an order that names no station,
# modality or time is offered to every modality instead of being hidden (we never guess).
_MATCH_UNKNOWN = frozenset(
    {
        Tag(0x0040, 0x0001),  # ScheduledStationAETitle
        Tag(0x0008, 0x0060),  # Modality
        Tag(0x0040, 0x0002),  # ScheduledProcedureStepStartDate
        Tag(0x0040, 0x0003),  # ScheduledProcedureStepStartTime
    }
)


def _is_key(tag: BaseTag) -> bool:
    """Attributes of the identifier that are keys (not charset, group lengths, private)."""
    return tag.group >= 0x0008 and tag.element != 0 and not tag.is_private and tag != _CHARSET_TAG


def matches(item: Dataset, identifier: Dataset) -> bool:
    """Whether ``item`` matches every matching key in ``identifier`` (an empty key,
    or a sequence with no item or an empty item, is universal matching)."""
    for elem in identifier:
        if not _is_key(elem.tag):
            continue
        if elem.VR == "SQ":
            if not elem.value or not any(_is_key(e.tag) for e in elem.value[0]):
                continue
            have = item[elem.tag].value if elem.tag in item else []
            if not any(matches(sub, elem.value[0]) for sub in have):
                return False
            continue
        wanted = _texts(elem)
        if not wanted:
            continue  # universal matching
        have_text = _text(item[elem.tag]) if elem.tag in item else ""
        if not have_text:
            if elem.tag in _MATCH_UNKNOWN:
                continue
            return False
        if not any(_value_matches(elem.VR, want, have_text) for want in wanted):
            return False
    return True


def _texts(elem: DataElement) -> list[str]:
    """The key's non-empty values as strings (several for a multi-valued key)."""
    value = elem.value
    if value is None:
        return []
    values: Iterable[Any] = value if isinstance(value, MultiValue | list) else [value]
    out = []
    for v in values:
        text = str(v).strip() if not isinstance(v, bytes) else ""
        if text:
            out.append(text)
    return out


def _text(elem: DataElement) -> str:
    texts = _texts(elem)
    return "\\".join(texts)


def _value_matches(vr: str, want: str, have: str) -> bool:
    if vr in _RANGE_VRS:
        return _in_range(vr, want, have)
    if vr == "PN":
        want, have = fold_name(want), fold_name(have)
    if vr in _WILDCARD_VRS and ("*" in want or "?" in want):
        return _wildcard(want).fullmatch(have) is not None
    return want == have


def fold_name(name: str) -> str:
    """Person names compare without case or accents ("NGUYEN*" finds "Nguyễn^Văn Ánh"),
    as PS3.4 C.2.2.2.1 allows for PN; trailing empty components are ignored."""
    name = name.replace("đ", "d").replace("Đ", "D").rstrip("^")
    decomposed = unicodedata.normalize("NFD", name)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _wildcard(pattern: str) -> re.Pattern[str]:
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)


_RANGE_WIDTH = {"DA": 8, "TM": 6, "DT": 14}


def _in_range(vr: str, want: str, have: str) -> bool:
    """Single value or range (``A-B``, ``A-``, ``-B``) on DA/TM/DT (PS3.4 C.2.2.2.5).

    Values compare as digit strings: a partial lower bound is padded with zeros, a
    partial upper bound with nines (``-10`` on TM ends at 10:59:59); fractions and
    offsets are ignored. A single time or date-time value matches at its precision."""
    width = _RANGE_WIDTH[vr]
    have_digits = _digits(have, vr)[:width]
    if ("-" in want and vr != "DT") or (vr == "DT" and re.fullmatch(r"\d*-\d*", want)):
        low, _, high = want.partition("-")
    else:
        low = high = want
    low_digits, high_digits = _digits(low, vr), _digits(high, vr)
    if low_digits and have_digits.ljust(width, "0") < low_digits.ljust(width, "0")[:width]:
        return False
    return not (high_digits and have_digits.ljust(width, "0") > high_digits.ljust(width, "9"))


def _digits(value: str, vr: str) -> str:
    value = value.strip()
    if vr == "DT":
        value = re.split(r"[+-]", value, maxsplit=1)[0]
    value = value.split(".", 1)[0]
    return value.replace(":", "") if vr == "TM" else value


def project(item: Dataset, identifier: Dataset) -> Dataset:
    """The response identifier: the keys of ``identifier`` with ``item``'s values
    (empty when the item has none); a sequence key with no item, or an empty item,
    returns the whole sequence (PS3.4 C.2.2.2.6). SpecificCharacterSet is ours."""
    out = _project(item, identifier)
    out.SpecificCharacterSet = CHARSET
    return out


def _project(item: Dataset, identifier: Dataset) -> Dataset:
    out = Dataset()
    for elem in identifier:
        if not _is_key(elem.tag):
            continue
        have: DataElement | None = None
        if elem.tag in item:
            have = item[elem.tag]
        if elem.VR == "SQ":
            if have is None:
                out.add_new(elem.tag, "SQ", DicomSequence([]))
            elif not elem.value or not any(_is_key(e.tag) for e in elem.value[0]):
                out.add_new(elem.tag, "SQ", DicomSequence([_copy(x) for x in have.value]))
            else:
                sub = elem.value[0]
                out.add_new(elem.tag, "SQ", DicomSequence([_project(x, sub) for x in have.value]))
        elif have is None:
            out.add_new(elem.tag, elem.VR, None)
        else:
            out.add_new(have.tag, have.VR, have.value)
    return out


def _copy(ds: Dataset) -> Dataset:
    out = Dataset()
    for elem in ds:
        if elem.VR == "SQ":
            out.add_new(elem.tag, "SQ", DicomSequence([_copy(x) for x in elem.value]))
        else:
            out.add_new(elem.tag, elem.VR, elem.value)
    return out


# -- plugin ---------------------------------------------------------------------------


def worklist_store(ctx: PluginContext) -> WorklistStore:
    """The gateway's one store (``<state_dir>/worklist.sqlite``), created on first use and
    shared through ``ctx.services`` by the ``worklist`` step and the ``dicom-scp`` listener."""
    store = ctx.services.get(SERVICE_KEY)
    if store is None:
        store = WorklistStore(Path(ctx.state_dir) / FILE_NAME)
        ctx.services[SERVICE_KEY] = store
    if not isinstance(store, WorklistStore):
        raise TypeError(f"ctx.services[{SERVICE_KEY!r}] is a {type(store).__name__}")
    return store


class WorklistParams(BaseModel):
    """The ``worklist`` step has no parameters (the store is the gateway's one)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class WorklistStep:
    """Route step: ``order`` envelopes -> worklist items; consumes them (returns [])."""

    def __init__(self, store: WorklistStore) -> None:
        self.store = store

    async def run(self, envelope: AnyEnvelope) -> Sequence[AnyEnvelope]:
        if envelope.kind != ORDER_KIND:
            log.warning(
                "worklist.not_an_order envelope=%s kind=%s: ignored", envelope.id, envelope.kind
            )
            return []
        try:
            order = Order.from_json(envelope.body)
        except ValidationError as err:
            raise PermanentError(f"envelope {envelope.id} is not a valid Order: {err}") from err
        if order.tests or order.specimen_id:
            log.debug("worklist.lab_order_skipped accession=%s", order.accession)
            return []
        try:
            changed = await asyncio.to_thread(self.store.apply, order)
        except sqlite3.Error as err:
            raise TransientError(f"worklist store: {err}") from err
        log.info(
            "worklist.applied accession=%s step=%s control=%s changed=%d message=%s",
            order.accession,
            order.step_id or "-",
            order.control,
            changed,
            order.message_control_id,
        )
        return []


def register(registry: Registry) -> None:
    registry.step(
        "worklist",
        WorklistParams,
        lambda params, ctx: WorklistStep(worklist_store(ctx)),
        "stores order envelopes as modality worklist items (answered by dicom-scp C-FIND)",
    )


__all__ = [
    "CHARSET",
    "SERVICE_KEY",
    "WorklistItem",
    "WorklistStep",
    "WorklistStore",
    "fold_name",
    "item_dataset",
    "matches",
    "project",
    "worklist_store",
]
