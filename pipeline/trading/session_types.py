"""What the trading session's parts share with each other and with the shell.

The session (:mod:`pipeline.trading.session`) is a facade over a connection machine
(:mod:`pipeline.trading.connections`), an order table (:mod:`pipeline.trading.ordertable`),
its order entry (:mod:`pipeline.trading.orderentry`) and reconciliation
(:mod:`pipeline.trading.reconcile`). They speak the vocabulary below: the actions the shell
carries out, the config, a request in flight, the local error codes and the clock. Kept apart
so that none of the parts imports another just for a name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from decimal import Decimal
from enum import Enum, IntEnum
from typing import Any, Protocol

from pipeline.backoff import BackoffPolicy
from pipeline.binance.wsapi import ApiError, Response

EXIT_OK = 0
EXIT_AUTH = 3
EXIT_GAVE_UP = 4

# Local error codes (never produced by Binance, whose codes are > -3000).
LOCAL_NOT_READY = -9001
LOCAL_RATE_LIMITED = -9002
LOCAL_DUPLICATE_ID = -9003
LOCAL_INVALID = -9004
LOCAL_NOT_FOUND = -9005  # UNKNOWN order, then order.status said -2013: reported rejected
LOCAL_DISCONNECTED = -9006
LOCAL_TIMEOUT = -9007
# -9008..-9010 are pipeline.orders' (stale, risk, reply too large); these start at -9021.
LOCAL_BAD_REPLY = -9021  # the answer could not be understood: the order is UNKNOWN, reconciled
LOCAL_TABLE_FULL = -9022  # the order table is full of live orders
LOCAL_OUTBOX_FULL = -9023  # the trading shell's outbox to the connection is full
LOCAL_AMEND_LIMIT = -9024  # the order was amended MAX_ORDER_AMENDS times already
ERROR_TEXT: dict[int, str] = {
    LOCAL_NOT_READY: "session not ready",
    LOCAL_RATE_LIMITED: "rate limited until retryAfter",
    LOCAL_DUPLICATE_ID: "duplicate client order id",
    LOCAL_INVALID: "invalid order",
    LOCAL_NOT_FOUND: "order unknown after reconnect and not found by order.status",
    LOCAL_DISCONNECTED: "connection lost",
    LOCAL_TIMEOUT: "request deadline passed",
    LOCAL_BAD_REPLY: "reply not understood (protocol error)",
    LOCAL_TABLE_FULL: "order table full of live orders",
    LOCAL_OUTBOX_FULL: "outbox to the exchange full (connection not draining)",
    LOCAL_AMEND_LIMIT: "Filter failure: MAX_NUM_ORDER_AMENDS (10 amends per order, local)",
}


# The venue allows this many order.amend.keepPriority per order (filter MAX_NUM_ORDER_AMENDS).
MAX_ORDER_AMENDS = 10
# selfTradePreventionMode values (binance-protocol.md 7.2); the venue allows a per-symbol subset.
STP_MODES = frozenset(
    {"NONE", "EXPIRE_MAKER", "EXPIRE_TAKER", "EXPIRE_BOTH", "DECREMENT", "TRANSFER"}
)


def local_error(code: int) -> ApiError:
    """A local error code dressed as the venue's error, for callers that read only those."""
    return ApiError(code, ERROR_TEXT.get(code, ""))


class LocalProtocolError(RuntimeError):
    """We asked for something the state table does not allow: our bug, not the exchange's."""

    remote = False


class Clock(Protocol):
    def monotonic_ns(self) -> int: ...

    def time_ns(self) -> int: ...


class SystemClock:
    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def time_ns(self) -> int:
        return time.time_ns()


@dataclass(frozen=True, slots=True)
class Open:
    conn: int


@dataclass(frozen=True, slots=True)
class Send:
    conn: int
    text: str


@dataclass(frozen=True, slots=True)
class Ping:
    conn: int


@dataclass(frozen=True, slots=True)
class Close:
    conn: int
    reason: str


@dataclass(frozen=True, slots=True)
class Exit:
    code: int
    reason: str


SessionAction = Open | Send | Ping | Close | Exit


@dataclass(slots=True)
class ApiReply:
    """The answer to a generic request (:meth:`Session.request`), for tags the caller chose."""

    tag: Any
    response: Response


@dataclass(frozen=True, slots=True)
class SessionConfig:
    api_key: str
    ping_interval_s: float = 30.0
    json_ping_interval_s: float = 30.0
    pong_timeout_s: float = 10.0
    request_timeout_s: float = 15.0
    max_connection_age_s: float = 23 * 3600.0
    drain_timeout_s: float = 15.0
    time_sync_interval_s: float = 600.0
    # ms, up to 3 decimals (5000.5: microsecond precision), 0 < value <= 60000; checked by
    # pipeline.binance.wsapi.recv_window_text when the request builder is made
    recv_window_ms: float | Decimal | None = None
    default_retry_after_s: float = 10.0  # 429 without retryAfter
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    cancel_replace_mode: str = "STOP_ON_FAILURE"
    reconcile_interval_s: float = 1.0  # first re-ask of an UNKNOWN order; then doubling
    reconcile_max_interval_s: float = 30.0  # backoff cap per order
    reconcile_weight_share: float = 0.2  # of the per-minute weight limit, for reconciliation
    reconcile_burst_weight: float = 40.0  # token bucket depth (10 order.status)
    reconcile_bulk_min: int = 3  # this many due UNKNOWN orders of a symbol: openOrders.status
    assumed_weight_limit: int = 6000  # per minute, until the venue's rateLimits say otherwise
    # An order in doubt (UNKNOWN) longer than this raises problem_unknown_orders_stale, which
    # makes `pipeline health` report trading unhealthy (`pipeline trade --unknown-stale`).
    unknown_stale_s: float = 30.0
    # After a rollover the replaced connection keeps delivering user data this long (events
    # the venue sent it before the standby subscribed are still on their way); both copies of
    # an event are de-duplicated by (orderId, execution id I).
    handover_grace_s: float = 1.0
    max_retry_after_s: float = 4 * 86400.0  # a later retryAfter is nonsense: protocol error
    max_orders: int = 100_000  # order table size; the oldest final orders are forgotten


@dataclass(slots=True)
class PendingRequest:
    """A request written to a connection and not answered yet."""

    rid: str
    conn: int
    method: str
    params: dict[str, Any]
    kind: str  # the handler: time, logon, subscribe, ping, place, cancel, modify, amend, ...
    # ... reconcile, bulk (openOrders.status while reconciling), generic
    deadline_ns: int
    sent_wall_ns: int
    coid: str = ""  # the order this request is about
    new_coid: str = ""  # modify: the replacement order
    tag: Any = None
    retried: bool = False


class State(IntEnum):
    DISCONNECTED = 0
    CONNECTING = 1
    AUTHENTICATING = 2
    READY = 3
    RECONNECTING = 4
    FAILED = 5


TRANSITIONS: dict[tuple[State, str], State] = {
    (State.DISCONNECTED, "start"): State.CONNECTING,
    (State.CONNECTING, "connected"): State.AUTHENTICATING,
    (State.CONNECTING, "connect_failed"): State.RECONNECTING,
    (State.CONNECTING, "give_up"): State.FAILED,
    (State.AUTHENTICATING, "logon_ok"): State.READY,
    (State.AUTHENTICATING, "lost"): State.RECONNECTING,
    (State.AUTHENTICATING, "give_up"): State.FAILED,
    (State.AUTHENTICATING, "auth_rejected"): State.FAILED,
    (State.READY, "lost"): State.RECONNECTING,
    (State.READY, "auth_rejected"): State.FAILED,
    (State.RECONNECTING, "retry"): State.CONNECTING,
    (State.RECONNECTING, "give_up"): State.FAILED,
}
for _s in State:
    if _s is not State.FAILED:
        TRANSITIONS[(_s, "stop")] = State.DISCONNECTED


class ConnPhase(Enum):
    """Where one connection is on its way to carrying orders; a standby goes the same way."""

    CONNECTING = "connecting"  # Open sent, the shell has not called connected() yet
    SYNCING = "syncing"  # a ``time`` request fixes the clock offset before signing anything
    LOGGING_ON = "logging_on"
    SUBSCRIBING = "subscribing"  # userDataStream.subscribe
    READY = "ready"


class ConnRole(Enum):
    """What a connection is for (make-before-break rollover keeps up to three at once)."""

    PRIMARY = "primary"  # carries orders
    STANDBY = "standby"  # being readied to replace the primary
    DRAINING = "draining"  # replaced: closed once its in-flight requests are answered


# Every change of a connection's phase or role, and the event that makes it (the session's
# own state is in TRANSITIONS). A change not listed is our bug: LocalProtocolError.
PHASE_TRANSITIONS: dict[tuple[ConnPhase, str], ConnPhase] = {
    (ConnPhase.CONNECTING, "connected"): ConnPhase.SYNCING,
    (ConnPhase.SYNCING, "time_synced"): ConnPhase.LOGGING_ON,
    (ConnPhase.LOGGING_ON, "logon_ok"): ConnPhase.SUBSCRIBING,
    (ConnPhase.LOGGING_ON, "resync"): ConnPhase.SYNCING,  # logon said -1021: clock first
    (ConnPhase.SUBSCRIBING, "subscribed"): ConnPhase.READY,
    (ConnPhase.READY, "subscribed"): ConnPhase.READY,  # resubscribed after streamTerminated
}
ROLE_TRANSITIONS: dict[tuple[ConnRole, str], ConnRole] = {
    (ConnRole.STANDBY, "promoted"): ConnRole.PRIMARY,
    (ConnRole.PRIMARY, "replaced"): ConnRole.DRAINING,
}


@dataclass(slots=True)
class Connection:
    """One WS API connection as the session sees it (the socket is the shell's)."""

    id: int
    role: ConnRole
    phase: ConnPhase = ConnPhase.CONNECTING
    opened_ns: int = 0
    pending: dict[str, PendingRequest] = field(default_factory=dict)
    ping_sent_ns: int | None = None  # outstanding WebSocket ping
    next_ping_ns: int = 0
    json_ping_rid: str | None = None
    json_ping_sent_ns: int = 0
    next_json_ping_ns: int = 0
    drain_deadline_ns: int = 0
    linger_until_ns: int = 0  # draining: user data still accepted until then (handover)
    subscribed: bool = False

    def drained(self, now_ns: int) -> bool:
        """A replaced connection may close: nothing pending and the handover grace is over,
        or its drain deadline passed."""
        return (not self.pending and now_ns >= self.linger_until_ns) or (
            now_ns >= self.drain_deadline_ns
        )

    def to_phase(self, event: str) -> None:
        new = PHASE_TRANSITIONS.get((self.phase, event))
        if new is None:
            raise LocalProtocolError(f"no phase change from {self.phase.name} on {event!r}")
        self.phase = new

    def to_role(self, event: str) -> None:
        new = ROLE_TRANSITIONS.get((self.role, event))
        if new is None:
            raise LocalProtocolError(f"no role change from {self.role.name} on {event!r}")
        self.role = new


# Requests a connection cannot work without: one that fails or times out drops it.
SETUP_KINDS = ("time", "logon", "subscribe")
