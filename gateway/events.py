"""Operational events: what happened to which message, for telemetry and the audit trail.

The service, delivery pumps and plugins call :meth:`EventBus.emit`; subscribers (the
MQTT publisher, the audit log) get every :class:`Event` synchronously and must only
queue it: ``emit`` never blocks clinical traffic and a failing subscriber is logged,
never raised to the emitter.

Event kinds (the ``event`` field of the MQTT payloads and audit records; see
docs/operations.md for each field):

``message.received``   a listener's message journaled (source, peer, ids)
``message.duplicate``  a resend of something already journaled
``message.quarantined`` bad input kept aside with its reason
``message.delivered``  a destination confirmed (destination, confirmation)
``message.dead``       a delivery given up (destination, error)
``destination.down`` / ``destination.up``  the circuit breaker opened / closed
``ai.flagged``         AI triage marked a study urgent (model, findings)
``ai.failed``          AI triage could not run; the study went on unchanged
``session.ended``      an association / connection ended (peer, counts)

Identifiers ride in ``ids``: study_uid, accession, sop_instance_uid, control_id,
sample_id, patient_id. Patient *names* are never put in an event; the patient id is
passed as received and each subscriber applies its own policy (none/hashed/plain).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

# envelope headers that identify a message without naming the patient
ID_HEADERS = {
    "StudyInstanceUID": "study_uid",
    "SOPInstanceUID": "sop_instance_uid",
    "AccessionNumber": "accession",
    "PatientID": "patient_id",
    "control_id": "control_id",
    "sample_id": "sample_id",
    "accession": "accession",
    "study_uid": "study_uid",
    "patient_id": "patient_id",
}

PatientIds = Literal["none", "hashed", "plain"]


@dataclass(frozen=True, slots=True)
class Event:
    event: str
    at: float
    source: str = ""  # listener (or route) id
    destination: str = ""
    envelope: str = ""  # envelope id in the journal
    kind: str = ""  # message kind: dicom, hl7, lab-result, ...
    peer: str = ""  # remote address or AE title
    outcome: str = "ok"  # ok | duplicate | refused | failed
    ids: Mapping[str, str] = field(default_factory=dict)
    detail: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self, patient_ids: PatientIds = "hashed", salt: str = "") -> dict[str, Any]:
        """The JSON shape (schema in docs/operations.md), patient id per policy."""
        ids = {k: v for k, v in self.ids.items() if v}
        pid = ids.pop("patient_id", None)
        if pid is not None and patient_ids == "plain":
            ids["patient_id"] = pid
        elif pid is not None and patient_ids == "hashed":
            ids["patient_id_hash"] = hash_id(pid, salt)
        doc: dict[str, Any] = {
            "event": self.event,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.at))
            + f".{int(self.at * 1000) % 1000:03d}Z",
        }
        for name in ("source", "destination", "envelope", "kind", "peer", "outcome"):
            value = getattr(self, name)
            if value:
                doc[name] = value
        if ids:
            doc["ids"] = ids
        if self.detail:
            doc["detail"] = dict(self.detail)
        return doc


def hash_id(value: str, salt: str) -> str:
    """A stable pseudonym: the same patient id gives the same hash at one site."""
    return hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:16]


def ids_from_headers(headers: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for header, name in ID_HEADERS.items():
        value = headers.get(header)
        if value:
            out[name] = str(value)
    return out


Subscriber = Callable[[Event], None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self.emitted = 0

    def subscribe(self, fn: Subscriber) -> None:
        self._subscribers.append(fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        if fn in self._subscribers:
            self._subscribers.remove(fn)

    def emit(self, event: str, **fields: Any) -> Event:
        ev = Event(event=event, at=fields.pop("at", None) or time.time(), **fields)
        self.emitted += 1
        for fn in list(self._subscribers):
            try:
                fn(ev)
            except Exception:  # a subscriber's bug must never reach the clinical path
                log.exception("events.subscriber_failed event=%s", event)
        return ev
