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
from pipeline.binance.filters import STP_MODES as VENUE_STP_MODES
from pipeline.binance.wsapi import ApiError, Response
from pipeline.settings import setting

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
STP_MODES = frozenset(VENUE_STP_MODES)


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


def _recv_window_arg(text: str) -> int | Decimal:
    """``--recv-window``: checked by the request builder's own rule, a usage error if bad."""
    import argparse

    from pipeline.binance.wsapi import recv_window_param

    try:
        return recv_window_param(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_KEY_SOURCE = (
    "key material: `pipeline trade` reads it from --api-key-file/--api-key-env (or --api-key) at "
    "start, so the key is never another process's argv value"
)
# BackoffPolicy is pipeline.backoff's: the flags that reach its fields (flatten rule, settings)
_BACKOFF_FLAGS = {
    "initial_s": setting("first reconnect delay (s)", flag="--backoff-initial", metavar="S"),
    "max_s": setting("reconnect delay cap (s)", flag="--backoff-max", metavar="S"),
    "factor": setting("reconnect delay multiplier per failure", flag="--backoff-factor"),
    "jitter": setting("each delay is drawn from [d*(1-jitter), d]", flag="--backoff-jitter"),
    "max_attempts": setting("failed reconnects before giving up (exit 4); 0 = never",
                            flag="--max-attempts", metavar="N"),
}


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """The session core's settings; each field's :func:`~pipeline.settings.setting` gives its
    `pipeline trade` flag (trading's config flattens this type into its own flags)."""

    api_key: str = field(default="", metadata=setting(
        "the API key registered for the public key", flag=None, no_flag=_KEY_SOURCE,
        toml=None, no_toml="trading.api_key / trading.api_key_file (launch-level fields)"))
    ping_interval_s: float = field(default=30.0, metadata=setting(
        "WebSocket ping frame interval (default 30)", flag="--ping-interval", metavar="S"))
    json_ping_interval_s: float = field(default=30.0, metadata=setting(
        "JSON `ping` request interval (default 30)", flag="--json-ping-interval", metavar="S"))
    pong_timeout_s: float = field(default=10.0, metadata=setting(
        "a pong / ping reply missing this long means dead (default 10)", flag="--pong-timeout",
        metavar="S"))
    request_timeout_s: float = field(default=15.0, metadata=setting(
        "seconds a request may wait for its answer before it is in doubt",
        flag="--request-timeout", metavar="S"))
    max_connection_age_s: float = field(default=23 * 3600.0, metadata=setting(
        "roll a connection over to a fresh one after this long (Binance ends them at 24 h)",
        flag="--max-connection-age", metavar="S"))
    drain_timeout_s: float = field(default=15.0, metadata=setting(
        "seconds a replaced connection may take to answer its open requests",
        flag="--drain-timeout", metavar="S"))
    time_sync_interval_s: float = field(default=600.0, metadata=setting(
        "seconds between server time checks", flag="--time-sync-interval", metavar="S"))
    # ms, up to 3 decimals (5000.5: microsecond precision), 0 < value <= 60000; checked by
    # pipeline.binance.wsapi.recv_window_text when the request builder is made
    recv_window_ms: float | Decimal | None = field(default=None, metadata=setting(
        "recvWindow in ms, up to 3 decimals (5000.5), at most 60000 (default: venue's 5000)",
        flag="--recv-window", metavar="MS", arg_type=_recv_window_arg))
    default_retry_after_s: float = field(default=10.0, metadata=setting(  # 429 without retryAfter
        "seconds to wait after a 429 that names no retryAfter", flag="--default-retry-after",
        metavar="S"))
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy, metadata=setting(
        "reconnect backoff", flatten=_BACKOFF_FLAGS))
    cancel_replace_mode: str = field(default="STOP_ON_FAILURE", metadata=setting(
        "order.cancelReplace cancelReplaceMode of `order modify`",
        choices=("STOP_ON_FAILURE", "ALLOW_FAILURE")))
    reconcile_interval_s: float = field(default=1.0, metadata=setting(  # then doubling
        "first re-ask of an UNKNOWN order (s); then doubling", flag="--reconcile-interval",
        metavar="S"))
    reconcile_max_interval_s: float = field(default=30.0, metadata=setting(
        "cap of the re-ask interval per order (s)", flag="--reconcile-max-interval",
        metavar="S"))
    reconcile_weight_share: float = field(default=0.2, metadata=setting(
        "share of the per-minute weight limit reconciliation may use"))
    reconcile_burst_weight: float = field(default=40.0, metadata=setting(
        "reconciliation token bucket depth (weight; 40 = 10 order.status)"))
    reconcile_bulk_min: int = field(default=3, metadata=setting(
        "this many due UNKNOWN orders of a symbol are asked with one openOrders.status"))
    assumed_weight_limit: int = field(default=6000, metadata=setting(
        "request weight per minute, until the venue's rateLimits say otherwise"))
    # An order in doubt (UNKNOWN) longer than this raises problem_unknown_orders_stale, which
    # makes `pipeline health` report trading unhealthy (`pipeline trade --unknown-stale`).
    unknown_stale_s: float = field(default=30.0, metadata=setting(
        "an order in doubt (UNKNOWN) longer than this makes `pipeline health` report "
        "trading unhealthy (problem unknown_orders_stale)", flag="--unknown-stale", metavar="S"))
    # After a rollover the replaced connection keeps delivering user data this long (events
    # the venue sent it before the standby subscribed are still on their way); both copies of
    # an event are de-duplicated by (orderId, execution id I).
    handover_grace_s: float = field(default=1.0, metadata=setting(
        "after a rollover, user data is still taken from the replaced connection this long",
        flag="--handover-grace", metavar="S"))
    max_retry_after_s: float = field(default=4 * 86400.0, metadata=setting(
        "a later retryAfter is nonsense: a protocol error", flag="--max-retry-after",
        metavar="S"))
    max_orders: int = field(default=100_000, metadata=setting(
        "order table size; the oldest final orders are forgotten"))


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
