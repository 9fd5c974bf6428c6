"""Orders, protocol-neutral: what an HIS/LIS order message becomes inside the gateway.

``drivers`` turn HL7 ORM/OMI/OML messages into :class:`Order` (an envelope of kind
``order`` whose body is this model as JSON); ``dicom`` builds worklist items from
them, and the lab drivers answer analyzers' host queries from them. Text fields
hold what the order said, in the form DICOM uses (names as ``Family^Given^Middle``,
dates ``YYYYMMDD``, date-times ``YYYYMMDDHHMMSS``), never invented values.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

ORDER_KIND = "order"


class Order(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    control: Literal["new", "update", "cancel"]
    accession: str  # the key: OBR-3 / ORC-3 / IPC-1
    patient_id: str
    patient_id_issuer: str = ""
    patient_name: str = ""  # DICOM PN: Family^Given^Middle^Prefix^Suffix
    birth_date: str = ""
    sex: str = ""  # M, F, O or empty
    placer_order: str = ""
    filler_order: str = ""
    procedure_code: str = ""
    procedure_scheme: str = ""
    procedure_text: str = ""
    modality: str = ""
    scheduled_start: str = ""  # YYYYMMDD[HHMM[SS]]
    station_ae: str = ""
    study_uid: str = ""  # from the order when it carries one (ZDS-1, IPC-3)
    step_id: str = ""  # scheduled procedure step id (IPC-4)
    priority: str = ""  # as ordered: S (stat), A (asap), R (routine)
    referring_physician: str = ""  # DICOM PN
    specimen_id: str = ""  # lab orders
    tests: tuple[str, ...] = ()  # lab orders: ordered test codes
    message_control_id: str = ""  # the HL7 message it came from

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_defaults=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Order:
        return cls.model_validate_json(data)
