"""What the trading process and its clients agree on, with no session machinery behind it.

Why a module of its own: a strategy's :class:`~pipeline.trading.client.OrderClient` and the
trading process (:mod:`pipeline.trading.process`, :mod:`pipeline.trading.intake`) must agree on
every byte of the rings between them, yet the client must not import the WS API session core or
the signing library. So the ring names, record layouts, local error codes, order states,
execution-report kinds and the execution update the session emits all live here, and nothing
here imports either side.

Three kinds of ring, all the ordinary :mod:`pipeline.ipc.ring` machinery:

- **Order rings** ``pipeline.orders.<client>`` (:data:`ORDER_DTYPE`), one per client process,
  written by :class:`~pipeline.trading.client.OrderClient`, read by the trading process, which
  discovers them by scanning ``/dev/shm`` for the prefix every ``scan_interval_s``. A client may
  publish as soon as its ring exists: the trading process reads a newly found ring from its
  oldest record.
- **The execution ring** ``pipeline.trading.exec`` (:data:`EXEC_DTYPE`), written by the trading
  process: acks, rejects, fills, cancels, UNKNOWN / RECONCILED states, status answers. Each
  client reads it (``RingReader``) and keeps the records of its ``client_id``.
- **The reply ring** ``pipeline.trading.replies`` (:data:`REPLY_DTYPE`), written by the trading
  process: the JSON answers to the account-level requests (``OPEN_ORDERS`` ->
  ``openOrders.status``, ``CANCEL_ALL`` -> ``openOrders.cancelAll``, ``ACCOUNT`` ->
  ``account.status``). Those answers are unbounded JSON (an account lists every asset), so they
  do not fit a fixed exec record: each is cut into :data:`REPLY_CHUNK`-byte chunks, one record
  each, tagged with the client id, the request id, the chunk index and the chunk count; the
  client reassembles them (:class:`~pipeline.trading.client.ReplyAssembler`). A reply is capped
  at :data:`MAX_REPLY_BYTES` (a quarter of the ring, so a reader that is merely slow is never
  lapped mid-reply); a bigger one is replaced by an error reply saying so (ask per symbol
  instead). A reader that *was* lapped (``missed`` grew) gets an error, never a corrupt reply.
  Why a ring and not files: it is the mechanism every process already has, needs no cleanup of
  per-request files, and the conftest/health tooling already understands its segments.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from pipeline.binance.filters import STP_MODES as VENUE_STP_MODES

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
    AMEND_REJECT = 12  # an amend (order.amend.keepPriority) failed: the order is as it was


@dataclass(slots=True)
class ExecUpdate:
    """One line of the execution ring (see :data:`EXEC_DTYPE`)."""

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
    # from the executionReport (section 7.2), for the strategy; defaults when there was none
    exec_id: int = -1  # I
    expiry_reason: str = ""  # eR
    stp_mode: str = ""  # V
    working: bool = False  # w
    last_quote: float = 0.0  # Y
    prevented_qty: float = 0.0  # A: quantity expired by self-trade prevention
    quote_order_qty: float = 0.0  # Q: a MARKET order's quote quantity (0 if not one)


# ---- the rings -----------------------------------------------------------------------------

ORDER_RING_PREFIX = "pipeline.orders."
EXEC_RING = "pipeline.trading.exec"
REPLY_RING = "pipeline.trading.replies"


def reply_ring_for(exec_ring: str) -> str:
    """The reply ring that goes with an exec ring (``X.exec`` -> ``X.replies``), so a trading
    process and its clients agree on it from the one name they already share."""
    base = exec_ring[: -len(".exec")] if exec_ring.endswith(".exec") else exec_ring
    return f"{base}.replies"


# Local error codes (never sent by the exchange, whose codes are > -9000): the trading process
# answered without asking it. LOCAL_STALE: an order record from before this process started or
# older than ``max_order_age_s`` (see pipeline.trading.intake), never executed.
LOCAL_STALE = -9008
# The pre-trade risk check (``pipeline trade --risk-limits``) refused the order; error_msg
# names the limit (``max_position BTCUSDT: ...``, ``risk_unavailable: ...``, ``risk_stale: ...``).
LOCAL_RISK = -9009
LOCAL_REPLY_TOO_LARGE = -9010


class OrderAction(IntEnum):
    """What an order record asks for (``ORDER_DTYPE.action``)."""

    PLACE = 1
    CANCEL = 2
    MODIFY = 3  # order.cancelReplace: cancel orig_client_order_id, place client_order_id
    STATUS = 4
    OPEN_ORDERS = 5  # openOrders.status (symbol optional); answer on the reply ring
    CANCEL_ALL = 6  # openOrders.cancelAll (symbol required); answer on the reply ring
    ACCOUNT = 7  # account.status (zero balances omitted); answer on the reply ring
    AMEND = 8  # order.amend.keepPriority: reduce client_order_id's qty, keep queue priority


# Account-level requests: action -> WS API method. Their answers go to the reply ring.
REQUEST_METHODS: dict[OrderAction, str] = {
    OrderAction.OPEN_ORDERS: "openOrders.status",
    OrderAction.CANCEL_ALL: "openOrders.cancelAll",
    OrderAction.ACCOUNT: "account.status",
}

# executionReport ``eR`` and ``V`` as one byte each (0 = not sent; "OTHER" = a value this
# table does not know yet: kept as a fact, not dropped as nothing)
EXPIRY_REASONS = (
    "",
    "NONE",
    "REJECTED",
    "EXCHANGE_CANCELED",
    "OCO_TRIGGER",
    "OTO_PHASE_ONE_EXPIRED",
    "UNFILLED_IOC_QUANTITY_EXPIRED",
    "UNFILLED_FOK_ORDER_EXPIRED",
    "INSUFFICIENT_LIQUIDITY",
    "EXECUTION_RULE_PRICE_RANGE_EXCEEDED",
    "OTHER",
)
# "" = the venue's default (order records) / absent (exec records); "OTHER" = a newer mode
STP_MODES = ("", *VENUE_STP_MODES, "OTHER")
_EXPIRY_INDEX = {name: i for i, name in enumerate(EXPIRY_REASONS)}
_STP_INDEX = {name: i for i, name in enumerate(STP_MODES)}
_EXPIRY_OTHER = len(EXPIRY_REASONS) - 1
_STP_OTHER = len(STP_MODES) - 1
FLAG_WORKING = 1  # EXEC_DTYPE.flags: the order is on the book (executionReport ``w``)

SIDES = ("", "BUY", "SELL")
TYPES = ("", "LIMIT", "MARKET", "LIMIT_MAKER")
TIFS = ("", "GTC", "IOC", "FOK")

ORDER_DTYPE = np.dtype(
    [
        ("action", "u1"),  # OrderAction
        ("side", "u1"),  # index into SIDES
        ("type", "u1"),  # index into TYPES
        ("tif", "u1"),  # index into TIFS (0 = exchange default / not applicable)
        ("client_id", "<u4"),  # crc32 of the client name; routes execution records back
        ("price", "<f8"),  # 0 = none (MARKET)
        ("qty", "<f8"),
        ("submit_time_ns", "<i8"),  # client wall clock at submission
        ("symbol", "S24"),
        ("client_order_id", "S40"),  # PLACE/MODIFY: the new order's id; CANCEL/STATUS: target
        ("orig_client_order_id", "S40"),  # MODIFY: the order being replaced
        ("stp", "u1"),  # PLACE, MODIFY: index into STP_MODES (0: the venue's default)
    ],
    align=True,
)

EXEC_DTYPE = np.dtype(
    [
        ("kind", "u1"),  # ExecKind
        ("status", "u1"),  # OrderStatus
        ("side", "u1"),  # index into SIDES
        ("flags", "u1"),  # FLAG_WORKING
        ("error_code", "<i4"),  # Binance code (< 0), or a LOCAL_* code (-9xxx), 0 = none
        ("client_id", "<u4"),
        ("expiry_reason", "u1"),  # index into EXPIRY_REASONS (eR)
        ("stp_mode", "u1"),  # index into STP_MODES (V)
        ("_pad2", "<u2"),
        ("order_id", "<i8"),  # exchange orderId, -1 until known
        ("price", "<f8"),
        ("qty", "<f8"),
        ("last_qty", "<f8"),  # this fill (TRADE)
        ("last_price", "<f8"),
        ("cum_qty", "<f8"),  # executed so far
        ("cum_quote", "<f8"),
        ("submit_time_ns", "<i8"),  # copied from the order record: end-to-end latency
        ("event_time_ns", "<i8"),  # exchange time of the event (0 if none)
        ("publish_time_ns", "<i8"),  # trading process wall clock when published
        ("sent_time_ns", "<i8"),  # ACK: request handed to the socket layer (trading process)
        ("reply_time_ns", "<i8"),  # ACK: response frame received (trading process)
        ("exec_id", "<i8"),  # executionReport I, -1 if none
        ("last_quote", "<f8"),  # executionReport Y (last_qty * last_price)
        ("prevented_qty", "<f8"),  # executionReport A: expired by self-trade prevention
        ("quote_order_qty", "<f8"),  # executionReport Q: a MARKET order's quote quantity
        ("symbol", "S24"),
        ("client_order_id", "S40"),
        ("error_msg", "S128"),  # short text (truncated); codes are the contract
    ],
    align=True,
)

REPLY_CHUNK = 968  # data bytes per reply record: a record is exactly 1 KiB
REPLY_DTYPE = np.dtype(
    [
        ("client_id", "<u4"),  # crc32 of the client name, as in the exec ring
        ("chunk", "<u4"),  # 0 .. nchunks-1
        ("nchunks", "<u4"),
        ("total_len", "<u4"),  # bytes of the whole JSON text
        ("request_id", "S40"),  # the request's id (the order record's client_order_id)
        ("data", f"S{REPLY_CHUNK}"),  # a slice of UTF-8 JSON text (JSON never contains NUL)
    ],
    align=True,
)
REPLY_CAPACITY = 1 << 12  # records: 4 MiB
MAX_REPLY_BYTES = REPLY_CAPACITY * REPLY_CHUNK // 4
MAX_REPLY_CHUNKS = -(-MAX_REPLY_BYTES // REPLY_CHUNK)  # 1024: chunks of the largest reply


def client_id_of(name: str) -> int:
    """The number a client's records carry (crc32 of its name): how the trading process routes
    exec records and replies back to the one client that asked, in a fixed-size field."""
    return zlib.crc32(name.encode("utf-8")) & 0xFFFFFFFF


def exec_record(u: ExecUpdate, publish_time_ns: int) -> tuple[Any, ...]:
    """An :class:`ExecUpdate` as an :data:`EXEC_DTYPE` tuple."""
    return (
        int(u.kind),
        int(u.status),
        SIDES.index(u.side) if u.side in SIDES else 0,
        FLAG_WORKING if u.working else 0,
        int(u.error_code),
        int(u.client_id) & 0xFFFFFFFF,
        _EXPIRY_INDEX.get(u.expiry_reason, _EXPIRY_OTHER),
        _STP_INDEX.get(u.stp_mode, _STP_OTHER),
        0,
        int(u.order_id),
        float(u.price),
        float(u.qty),
        float(u.last_qty),
        float(u.last_price),
        float(u.cum_qty),
        float(u.cum_quote),
        int(u.submit_time_ns),
        int(u.event_time_ns),
        publish_time_ns,
        int(u.sent_time_ns),
        int(u.reply_time_ns),
        int(u.exec_id),
        float(u.last_quote),
        float(u.prevented_qty),
        float(u.quote_order_qty),
        u.symbol.encode()[:24],
        u.client_order_id.encode()[:40],
        _truncate_utf8(u.error_msg, 128),
    )


def _truncate_utf8(text: str, n: int) -> bytes:
    """At most ``n`` bytes of ``text`` without cutting a multi-byte character in half."""
    return text.encode("utf-8", "replace")[:n].decode("utf-8", "ignore").encode()


def reply_records(client_id: int, request_id: str, payload: bytes) -> np.ndarray:
    """``payload`` (JSON text) as :data:`REPLY_DTYPE` records, ready for ``publish_many``."""
    n = max(1, -(-len(payload) // REPLY_CHUNK))
    out = np.zeros(n, dtype=REPLY_DTYPE)
    out["client_id"] = client_id & 0xFFFFFFFF
    out["chunk"] = np.arange(n)
    out["nchunks"] = n
    out["total_len"] = len(payload)
    out["request_id"] = request_id.encode()[:40]
    data = out["data"]
    for k in range(n):
        data[k] = payload[k * REPLY_CHUNK : (k + 1) * REPLY_CHUNK]
    return out
