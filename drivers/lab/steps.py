"""Route steps for lab results and lab orders.

- ``map-codes``: an analyzer's ``lab-result`` (raw ASTM or HL7 as journaled, or
  already normalized) -> one normalized report per specimen, with LIS codes,
  LOINC and unit conversions from the analyzer's profile.
- ``hl7-oru``: normalized reports -> HL7 v2.5.1 ORU^R01 (or OUL^R22) for the LIS.
- ``lab-orders``: OML^O21 / ORM^O01 from the LIS -> the lab orders table, which
  answers analyzers' host queries and feeds order downloads.
- ``lab-order-push``: orders -> OML^O33 (IHE LAW LAB-28) for analyzers that want
  their orders pushed over HL7.

Each step is deterministic for a given input, and derived envelopes carry a key
built from the results' content, so a re-run after a crash, or an analyzer's
retransmission, never reaches the LIS twice.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from drivers.astm.codec import AstmError, decode_records
from drivers.hl7.message import Hl7Error
from drivers.lab import hl7_build
from drivers.lab.astm_results import reports_from_records
from drivers.lab.hl7_results import reports_from_hl7
from drivers.lab.lis_orders import DEFAULT_SPECIMEN_FROM, parse_lab_orders
from drivers.lab.order_store import order_store
from drivers.lab.profiles import Profile, ProfileError, UnitConversion, find_profile
from gateway.envelope import Envelope
from gateway.errors import PermanentError
from gateway.lab import FORMAT_NORMALIZED, LAB_RESULT_KIND, LabReport, LabResult
from gateway.orders import ORDER_KIND, Order
from gateway.registry import PluginContext, Registry
from gateway.steps import AnyEnvelope

log = logging.getLogger(__name__)
_UNMAPPED_SEEN: set[tuple[str, str]] = set()


class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Profiles:
    """Profiles by name, found beside the config file or in the shipped set."""

    def __init__(self, config_dir: str) -> None:
        self.config_dir = config_dir or None

    def get(self, name: str) -> Profile:
        try:
            return find_profile(name or "generic-astm", self.config_dir)
        except ProfileError as err:
            raise PermanentError(str(err)) from err


def reports_of(envelope: AnyEnvelope, profiles: Profiles) -> list[LabReport]:
    """The normalized reports of a lab-result envelope, whatever its format. A raw
    message's ``qc`` header says which of its reports the envelope stands for (a
    message with QC and patient specimens is journaled once for each)."""
    headers = envelope.headers
    if headers.get("format") == FORMAT_NORMALIZED:
        return [LabReport.from_json(envelope.body)]
    protocol = headers.get("protocol", "")
    profile = profiles.get(headers.get("profile", ""))
    try:
        if protocol == "astm":
            records = decode_records(envelope.body, encoding=headers.get("charset", "latin-1"))
            reports = reports_from_records(records, profile, envelope.source)
        elif protocol == "hl7":
            reports = reports_from_hl7(envelope.body, profile, envelope.source)
        else:
            raise PermanentError(f"envelope {envelope.id}: unknown lab protocol {protocol!r}")
    except (AstmError, Hl7Error, ValueError) as err:
        raise PermanentError(f"envelope {envelope.id}: cannot read results: {err}") from err
    qc = headers.get("qc")
    if qc in ("true", "false"):
        reports = [r for r in reports if r.qc == (qc == "true")]
    return reports


def normalized_envelope(report: LabReport, parent: AnyEnvelope) -> Envelope:
    return Envelope(
        kind=LAB_RESULT_KIND,
        source=parent.source,
        body=report.to_json(),
        headers={
            "format": FORMAT_NORMALIZED,
            "qc": "true" if report.qc else "false",
            "instrument": report.instrument,
            "profile": report.profile,
        },
        idem_key=f"labreport:{report.fingerprint()}",
        dedupe_on_key=True,
        received_at=parent.received_at,
    )


# -- map-codes --------------------------------------------------------------------------


class MapCodesParams(_Params):
    """``unmapped: keep`` sends a test the profile does not map with the analyzer's
    code (and logs it); ``drop`` leaves it out of what goes to the LIS (it stays in
    the journal's raw message); ``fail`` holds the message for a technician instead.
    Tests the profile lists in ``ignore_tests`` are always left out."""

    unmapped: Literal["keep", "drop", "fail"] = "keep"
    profile: str | None = None  # default: the profile of the listener that received it


_RANGE_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")


def number_text(number: float, decimals: int | None) -> str:
    """A converted value as plain decimal text (never ``1.5e+07``)."""
    if decimals is not None:
        return f"{number:.{decimals}f}"
    return format(Decimal(f"{number:.10g}"), "f")


def convert_range(text: str, conv: UnitConversion) -> str:
    """A reference range (``70-110``, ``< 200``, ``84.0 - 94.0``) in the new units: a
    range left in the old ones beside a converted value would mislead."""

    def one(m: re.Match[str]) -> str:
        number = float(m.group().replace(",", "."))
        return number_text(number * conv.factor + conv.offset, conv.decimals)

    return _RANGE_NUMBER.sub(one, text)


def map_result(result: LabResult, profile: Profile) -> LabResult:
    """LIS code, name and LOINC from the profile; value, units and reference range
    converted where it says (units compared without case: ``mg/dl`` is ``mg/dL``)."""
    code = result.test_code
    mapping = profile.codes.get(f"{code}/{result.aspect}") if result.aspect else None
    mapping = mapping or profile.codes.get(code)
    update: dict[str, object] = {}
    if mapping is not None:
        update |= {"lis_code": mapping.lis, "lis_name": mapping.name, "loinc": mapping.loinc}
    for conv in profile.units:
        applies = conv.test in ("*", code, update.get("lis_code"))
        same_units = conv.from_units.strip().casefold() == result.units.strip().casefold()
        if applies and result.number is not None and same_units:
            number = result.number * conv.factor + conv.offset
            text = number_text(number, conv.decimals)
            update |= {
                "value": f"{result.comparator}{text}",
                "number": float(text),
                "units": conv.to,
                "reference_range": convert_range(result.reference_range, conv),
                "comments": (
                    *result.comments,
                    f"converted by medgw from {result.value} {result.units}",
                ),
            }
            break
    return result.model_copy(update=update) if update else result


def map_report(report: LabReport, profile: Profile, unmapped: str) -> LabReport:
    results = []
    for result in report.results:
        if (result.aspect and result.aspect in profile.drop_aspects) or profile.ignored(
            result.test_code
        ):
            continue
        mapped = map_result(result, profile)
        if not mapped.lis_code:
            if unmapped == "fail":
                raise PermanentError(
                    f"profile {profile.name!r} has no LIS code for test {result.test_code!r}"
                )
            if unmapped == "drop":
                continue
            key = (report.instrument, result.test_code)
            # once per analyzer and code at INFO (a technician adds it to the profile);
            # after that DEBUG, or every message would repeat it
            level = logging.DEBUG if key in _UNMAPPED_SEEN else logging.INFO
            _UNMAPPED_SEEN.add(key)
            log.log(
                level,
                "lab.unmapped_code instrument=%s profile=%s test=%s: sent with the analyzer's code",
                report.instrument,
                profile.name,
                result.test_code,
            )
        results.append(mapped)
    return report.model_copy(update={"results": tuple(results)})


class MapCodesStep:
    def __init__(self, params: MapCodesParams, profiles: Profiles) -> None:
        self.params = params
        self.profiles = profiles

    async def run(self, envelope: AnyEnvelope) -> Sequence[AnyEnvelope]:
        if envelope.kind != LAB_RESULT_KIND:
            return [envelope]
        out = []
        for report in reports_of(envelope, self.profiles):
            profile = self.profiles.get(self.params.profile or report.profile)
            mapped = map_report(report, profile, self.params.unmapped)
            out.append(normalized_envelope(mapped, envelope))
        return out


# -- hl7-oru ----------------------------------------------------------------------------


class Hl7OruParams(_Params):
    message: Literal["ORU^R01", "OUL^R22"] = "ORU^R01"
    sending_app: str = "MEDGW"
    sending_facility: str = ""  # default: the site id
    receiving_app: str = "LIS"
    receiving_facility: str = ""


def hl7_timestamp(envelope: AnyEnvelope) -> str:
    return envelope.received_at.strftime("%Y%m%d%H%M%S+0000")


class Hl7OruStep:
    def __init__(self, params: Hl7OruParams, profiles: Profiles, site_id: str) -> None:
        self.params = params
        self.profiles = profiles
        self.facility = params.sending_facility or site_id

    async def run(self, envelope: AnyEnvelope) -> Sequence[AnyEnvelope]:
        if envelope.kind != LAB_RESULT_KIND:
            return [envelope]
        build = (
            hl7_build.build_oru_r01 if self.params.message == "ORU^R01" else hl7_build.build_oul_r22
        )
        out = []
        for report in reports_of(envelope, self.profiles):
            fingerprint = report.fingerprint()
            body = build(
                report,
                control_id=fingerprint[:20],
                timestamp=hl7_timestamp(envelope),
                sending_app=self.params.sending_app,
                sending_facility=self.facility,
                receiving_app=self.params.receiving_app,
                receiving_facility=self.params.receiving_facility,
            )
            out.append(
                Envelope(
                    kind="hl7",
                    source=envelope.source,
                    body=body,
                    headers={
                        "message_type": self.params.message,
                        "control_id": fingerprint[:20],
                        "qc": "true" if report.qc else "false",
                        "instrument": report.instrument,
                    },
                    idem_key=f"oru:{self.params.message}:{fingerprint}",
                    dedupe_on_key=True,
                    received_at=envelope.received_at,
                )
            )
        return out


# -- lab-orders -------------------------------------------------------------------------


class LabOrdersParams(_Params):
    """``specimen_from``: fields tried in order for the specimen (tube barcode) id.
    ``emit``: also pass the orders on (as ``order`` envelopes) to the route's
    destinations/steps, e.g. ``lab-order-push`` for HL7 analyzers."""

    specimen_from: tuple[str, ...] = Field(default=DEFAULT_SPECIMEN_FROM, min_length=1)
    encoding: str | None = None
    fallback_encoding: str = "utf-8"
    emit: bool = False


class LabOrdersStep:
    def __init__(self, params: LabOrdersParams, ctx: PluginContext) -> None:
        self.params = params
        self.store = order_store(ctx)

    async def run(self, envelope: AnyEnvelope) -> Sequence[AnyEnvelope]:
        if envelope.kind == ORDER_KIND:
            orders = [Order.from_json(envelope.body)]
        elif envelope.kind == "hl7":
            msh, orders = parse_lab_orders(
                envelope.body,
                specimen_from=self.params.specimen_from,
                encoding=self.params.encoding or envelope.headers.get("charset") or None,
                fallback=self.params.fallback_encoding,
            )
            if not orders:
                log.debug(
                    "lab_orders.not_an_order envelope=%s type=%s", envelope.id, msh.message_type
                )
                return []
        else:
            return []
        for order in orders:
            self.store.apply(order)
        log.info(
            "lab_orders.stored envelope=%s orders=%d tests=%d",
            envelope.id,
            len(orders),
            sum(len(o.tests) for o in orders),
        )
        if not self.params.emit:
            return []
        return [
            Envelope(
                kind=ORDER_KIND,
                source=envelope.source,
                body=o.to_json(),
                headers={"control": o.control, "specimen_id": o.specimen_id},
            )
            for o in orders
        ]


# -- lab-order-push ---------------------------------------------------------------------


class LabOrderPushParams(_Params):
    profile: str  # the analyzer's profile: its codes map LIS codes back to its own
    sending_app: str = "MEDGW"
    sending_facility: str = ""
    receiving_app: str = ""
    receiving_facility: str = ""


def analyzer_tests(order: Order, profile: Profile) -> Order:
    """The order with LIS test codes written as the analyzer's own codes."""
    return order.model_copy(update={"tests": tuple(profile.analyzer_code(t) for t in order.tests)})


class LabOrderPushStep:
    def __init__(self, params: LabOrderPushParams, profiles: Profiles, site_id: str) -> None:
        self.params = params
        self.profile = profiles.get(params.profile)
        self.facility = params.sending_facility or site_id

    async def run(self, envelope: AnyEnvelope) -> Sequence[AnyEnvelope]:
        if envelope.kind != ORDER_KIND:
            return []
        order = analyzer_tests(Order.from_json(envelope.body), self.profile)
        control_id = envelope.id[-20:]
        body = hl7_build.build_oml_o33(
            order,
            control_id=control_id,
            timestamp=hl7_timestamp(envelope),
            sending_app=self.params.sending_app,
            sending_facility=self.facility,
            receiving_app=self.params.receiving_app,
            receiving_facility=self.params.receiving_facility,
        )
        return [
            Envelope(
                kind="hl7",
                source=envelope.source,
                body=body,
                headers={"message_type": "OML^O33", "control_id": control_id},
                received_at=envelope.received_at,
            )
        ]


def register(registry: Registry) -> None:
    registry.step(
        "map-codes",
        MapCodesParams,
        lambda p, ctx: MapCodesStep(p, Profiles(ctx.config_dir)),
        "lab results -> normalized reports with LIS codes, LOINC, unit conversions (profile)",
    )
    registry.step(
        "hl7-oru",
        Hl7OruParams,
        lambda p, ctx: Hl7OruStep(p, Profiles(ctx.config_dir), ctx.site_id),
        "lab results -> HL7 v2.5.1 ORU^R01 (or OUL^R22) for the LIS",
    )
    registry.step(
        "lab-orders",
        LabOrdersParams,
        LabOrdersStep,
        "OML^O21 / ORM^O01 from the LIS -> the lab orders table (host queries, downloads)",
    )
    registry.step(
        "lab-order-push",
        LabOrderPushParams,
        lambda p, ctx: LabOrderPushStep(p, Profiles(ctx.config_dir), ctx.site_id),
        "orders -> OML^O33 (IHE LAW LAB-28) for analyzers that take pushed orders",
    )
