"""What the trading process and its clients agree on, with no session machinery behind it.

Order states, execution-report kinds and the execution update the session emits (and the exec
ring carries) live here, so a strategy's :class:`~pipeline.trading.orders.OrderClient` can read
them without importing the WS API session core or the signing library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum

CLIENT_ORDER_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,36}$")


class OrderStatus(IntEnum):
    PENDING = 0  # sent, not yet answered
    NEW = 1
    PARTIALLY_FILLED = 2
    FILLED = 3
    CANCELED = 4
    REJECTED = 5
    EXPIRED = 6
    UNKNOWN = 7  # may or may not exist at the exchange; being reconciled
    EXPIRED_IN_MATCH = 8
    PENDING_CANCEL = 9


FINAL = frozenset(
    {
        OrderStatus.FILLED,
        OrderStatus.CANCELED,
        OrderStatus.REJECTED,
        OrderStatus.EXPIRED,
        OrderStatus.EXPIRED_IN_MATCH,
    }
)


class ExecKind(IntEnum):
    ACK = 1  # order.place answered OK
    REJECT = 2  # order.place (or the new leg of a modify) rejected
    TRADE = 3  # executionReport x=TRADE
    CANCELED = 4  # order canceled (cancel answer or executionReport)
    EXPIRED = 5
    UNKNOWN = 6  # outcome unknown; reconciliation started
    RECONCILED = 7  # an UNKNOWN order's state is known again
    REPLACED = 8  # executionReport x=REPLACED (amend)
    NEW = 9  # executionReport x=NEW
    STATUS = 10  # answer to a status query
    CANCEL_REJECT = 11  # a cancel (or the cancel leg of a modify) failed


@dataclass(slots=True)
class ExecUpdate:
    """One line of the execution ring (see ``pipeline.trading.orders.EXEC_DTYPE``)."""

    client_order_id: str
    kind: ExecKind
    status: OrderStatus
    symbol: str = ""
    side: str = ""
    order_id: int = -1
    price: float = 0.0
    qty: float = 0.0
    last_qty: float = 0.0
    last_price: float = 0.0
    cum_qty: float = 0.0
    cum_quote: float = 0.0
    error_code: int = 0
    error_msg: str = ""
    event_time_ns: int = 0
    submit_time_ns: int = 0
    client_id: int = 0
    orig_client_order_id: str = ""
    sent_time_ns: int = 0  # wall clock when the request was handed to the socket layer
    reply_time_ns: int = 0  # wall clock when its response frame arrived
