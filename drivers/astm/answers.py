"""What the gateway sends to analyzers: host query answers and order downloads (E1394).

A host query (Q record, E1394 section 12) is answered with a message of its own:
H, then per specimen with orders a P and an O record whose report type O.26 is
``Q`` (response to query), then L. When no queried specimen has an order the
answer is H and L with termination code ``I`` (LIS02-A2 section 13: no
information available from the last query). Downloads are the same with report
type ``O`` (order). Tests are written in the analyzer's own codes (the profile's
map read backwards) in the profile's ``order_test_id`` form (``^^^{code}``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from drivers.astm.codec import Delimiters, escape
from drivers.lab.profiles import Profile
from gateway.orders import Order

D = Delimiters()
SENDER = "MEDGW"


def _timestamp() -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime())


def _record(*fields: str) -> str:
    return D.field.join(fields).rstrip(D.field) + "\r"


def header(timestamp: str) -> str:
    # H.2 delimiters, H.5 sender name, H.12 processing id P (production), H.13 version
    return _record(
        "H",
        D.repeat + D.component + D.escape,
        "",
        "",
        SENDER,
        "",
        "",
        "",
        "",
        "",
        "",
        "P",
        "LIS2-A2",
        timestamp,
    )


def analyzer_codes(order: Order, profile: Profile) -> list[str]:
    return [profile.analyzer_code(test) for test in order.tests]


def _name(pn: str) -> str:
    """DICOM/HL7 style ``Family^Given`` -> E1394 P.6 components (last^first^middle)."""
    return D.component.join(escape(part, D) for part in pn.split("^")[:3])


def order_records(n: int, order: Order, profile: Profile, report_type: str) -> str:
    tests = D.repeat.join(
        profile.order_test_id.format(code=escape(code, D))
        for code in analyzer_codes(order, profile)
    )
    patient = _record(
        "P",
        str(n),
        escape(order.patient_id, D),
        "",
        "",
        _name(order.patient_name),
        "",
        escape(order.birth_date, D),
        escape(order.sex, D),
    )
    # O.2 seq, O.3 specimen id, O.5 tests, O.6 priority, O.12 action code N (new), O.26
    fields = ["O", "1", escape(order.specimen_id, D), "", tests, escape(order.priority, D)]
    fields += [""] * 5 + ["N"] + [""] * 13 + [report_type]
    return patient + _record(*fields)


def query_answer(
    specimens: Sequence[str],
    orders: Sequence[Order],
    profile: Profile,
    *,
    encoding: str = "latin-1",
    timestamp: str | None = None,
) -> bytes:
    """The answer to one host query (``specimens`` as asked, ``orders`` found)."""
    text = header(timestamp or _timestamp())
    for n, order in enumerate(orders, 1):
        text += order_records(n, order, profile, "Q")
    text += _record("L", "1", "N" if orders else "I")
    return text.encode(encoding, errors="replace")


def download_message(
    orders: Sequence[Order],
    profile: Profile,
    *,
    encoding: str = "latin-1",
    timestamp: str | None = None,
) -> bytes:
    text = header(timestamp or _timestamp())
    for n, order in enumerate(orders, 1):
        text += order_records(n, order, profile, "O")
    text += _record("L", "1", "N")
    return text.encode(encoding, errors="replace")
