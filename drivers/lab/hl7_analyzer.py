"""HL7 analyzers on an ``hl7-mllp`` listener with a ``profile:``: results, host queries, ACKs.

The MLLP listener hands every well-formed message here. Results (ORU^R01,
OUL^R22) become ``lab-result`` envelopes keyed by their content, ACKed only after
the journal commit. Host queries are answered at once from the lab orders table,
whether the LIS is reachable or not:

- IHE LAW LAB-27 QBP^Q11 -> RSP^K11 (the query acknowledged), then on the same
  connection the work itself: OML^O33 per order found (LAB-28), or an OML^O33
  with ORC-1 ``DC`` when there is none (LAB27-003/004).
- Mindray QRY^Q02 -> QCK^Q02, then DSR^Q03 with the order (or none found).

Acknowledgements the analyzer sends back (ACK^Q03, ACK^O33) are read and dropped:
an acknowledgement is never acknowledged, nor journaled.
"""

from __future__ import annotations

import logging
import time

from drivers.hl7.ack import build_ack
from drivers.hl7.message import Hl7Error, Msh
from drivers.lab import hl7_build
from drivers.lab.hl7_results import (
    LabMessageError,
    LabQuery,
    is_query_message,
    is_result_message,
    parse_query,
    reports_from_hl7,
)
from drivers.lab.order_store import LabOrderStore
from drivers.lab.profiles import Profile
from drivers.lab.steps import analyzer_tests
from gateway.envelope import Envelope, new_id
from gateway.errors import DiskFullError, JournalError
from gateway.interfaces import Intake
from gateway.lab import LAB_RESULT_KIND, LabReport, message_fingerprint
from gateway.orders import Order

log = logging.getLogger(__name__)


def _timestamp() -> str:
    return time.strftime("%Y%m%d%H%M%S+0000", time.gmtime())


class Hl7AnalyzerHooks:
    """What an analyzer-facing MLLP listener does with each message (replies in order)."""

    def __init__(
        self, listener_id: str, profile: Profile, store: LabOrderStore | None, site_id: str
    ) -> None:
        self.id = listener_id
        self.profile = profile
        self.store = store
        self.site_id = site_id

    def is_ack(self, msh: Msh) -> bool:
        return msh.message_code.upper() == "ACK"

    async def handle(
        self, raw: bytes, msh: Msh, *, codec: str, base: Envelope, intake: Intake, peer: str
    ) -> list[bytes]:
        """Replies for one message; ``base`` is the plain journal envelope of it."""
        if self.is_ack(msh):
            log.debug("hl7_lab.ack_received listener=%s control_id=%s", self.id, msh.control_id)
            return []
        if is_query_message(msh):
            return await self._query(raw, base, intake, peer)
        envelopes = [base]
        if is_result_message(msh):
            try:
                reports = reports_from_hl7(raw, self.profile, self.id)
            except LabMessageError as err:
                await intake.quarantine(self.id, raw, f"bad results: {err}", peer)
                error = Hl7Error(str(err), ack_code="AE", error_code=err.error_code)
                return [self._ack(raw, msh, "AE", error)]
            envelopes = self._result_envelopes(raw, base, reports)
        for env in envelopes:
            try:
                await intake.accept(env)
            except JournalError as err:
                log.error("hl7_lab.not_stored listener=%s error=%s", self.id, err)
                text = "out of storage" if isinstance(err, DiskFullError) else "cannot store now"
                error = Hl7Error(f"{text}, resend later", ack_code="AR", error_code="207")
                return [self._ack(raw, msh, "AR", error)]
        return [self._ack(raw, msh, "AA")]

    def _result_envelopes(
        self, raw: bytes, base: Envelope, reports: list[LabReport]
    ) -> list[Envelope]:
        """Keyed by content; a message with QC and patient specimens once for each (the
        ``qc`` header tells map-codes which of its reports each copy stands for)."""
        out = []
        for qc in sorted({r.qc for r in reports}) or [False]:
            mine = [r for r in reports if r.qc == qc]
            out.append(
                Envelope(
                    kind=LAB_RESULT_KIND,
                    source=self.id,
                    body=raw,
                    headers={
                        **base.headers,
                        "protocol": "hl7",
                        "profile": self.profile.name,
                        "qc": "true" if qc else "false",
                        "instrument": self.id,
                    },
                    idem_key=f"lab:{self.id}:{message_fingerprint(mine)}" if mine else None,
                    dedupe_on_key=bool(mine),
                )
            )
        return out

    def _ack(self, raw: bytes, msh: Msh, code: str, error: Hl7Error | None = None) -> bytes:
        try:
            return hl7_build.build_ack_for(
                raw, code, control_id=new_id()[:20], timestamp=_timestamp(), error=error
            )
        except Hl7Error:
            return build_ack(msh, code, control_id=new_id()[:20], timestamp=_timestamp())

    async def _query(self, raw: bytes, base: Envelope, intake: Intake, peer: str) -> list[bytes]:
        try:
            query = parse_query(raw)
        except LabMessageError as err:
            await intake.quarantine(self.id, raw, f"bad query: {err}", peer)
            error = Hl7Error(str(err), ack_code="AE", error_code=err.error_code)
            return [self._ack(raw, base_msh(raw), "AE", error)]
        try:  # kept for the audit trail; a journal problem never leaves a query unanswered
            await intake.accept(base, [])
        except JournalError as err:
            log.warning("hl7_lab.query_not_journaled listener=%s error=%s", self.id, err)
        orders = self._orders(query)
        log.info(
            "hl7_lab.query listener=%s kind=%s specimens=%d found=%d",
            self.id,
            query.kind,
            len(query.specimen_ids),
            len(orders),
        )
        return self.answer(query, orders)

    def _orders(self, query: LabQuery) -> list[Order]:
        if self.store is None:
            return []
        found = (self.store.find(s) for s in query.specimen_ids)
        return [analyzer_tests(o, self.profile) for o in found if o is not None]

    def answer(self, query: LabQuery, orders: list[Order]) -> list[bytes]:
        now = _timestamp()
        if query.kind == "mindray":
            return [
                hl7_build.build_qck_q02(
                    query, bool(orders), control_id=new_id()[:20], timestamp=now
                ),
                hl7_build.build_dsr_q03(
                    query, orders[0] if orders else None, control_id=new_id()[:20], timestamp=now
                ),
            ]
        replies = [hl7_build.build_rsp_k11(query, orders, control_id=new_id()[:20], timestamp=now)]
        for order in orders:
            if not order.tests:
                continue
            replies.append(
                hl7_build.build_oml_o33(
                    order.model_copy(update={"control": "new"}),
                    control_id=new_id()[:20],
                    timestamp=now,
                    sending_facility=self.site_id,
                )
            )
        if len(replies) == 1 and query.specimen_ids:  # "no work" names the specimen asked for
            replies.append(
                hl7_build.build_oml_o33_no_work(
                    query, control_id=new_id()[:20], timestamp=now, sending_facility=self.site_id
                )
            )
        return replies


def base_msh(raw: bytes) -> Msh:
    from drivers.hl7.message import parse_msh  # noqa: PLC0415 - only on this error path

    return parse_msh(raw)
