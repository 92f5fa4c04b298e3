"""The trading session: a sans-I/O state machine over one or two WS API connections.

States (one table, :data:`TRANSITIONS`, h11 style)::

    Disconnected --start--> Connecting --connected--> Authenticating --logon_ok--> Ready
    Connecting --connect_failed--> Reconnecting      Authenticating/Ready --lost--> Reconnecting
    Reconnecting --retry--> Connecting               Reconnecting --give_up--> Failed
    Authenticating/Ready --auth_rejected--> Failed   any --stop--> Disconnected

Calling contract (the asyncio shell in ``pipeline.trading.process`` does exactly this):

1. ``start()``; then repeatedly drain :meth:`Session.actions` and :meth:`Session.updates`.
2. For ``Open(conn)``: open a WebSocket, then call ``connected(conn)`` or
   ``connect_failed(conn, reason)``. For ``Send(conn, text)``: write one text frame. For
   ``Ping(conn)``: send a ping frame and call ``pong(conn)`` when its pong arrives. For
   ``Close(conn)``: abort that socket (the session has already forgotten it). For ``Exit``:
   stop and exit with ``code``.
3. Feed every received text frame to ``frame_received(conn, text)`` and a closed socket to
   ``connection_lost(conn, reason)``.
4. Call ``tick()`` no later than :meth:`Session.next_deadline` (monotonic ns).
5. Submit orders with ``place`` / ``cancel`` / ``modify`` / ``query``; results come back as
   :class:`ExecUpdate` from :meth:`Session.updates`.

Decisions (documented, tested in tests/test_session.py):

- ``session.logon`` once per connection (after a ``time`` request fixes the clock offset);
  later signed requests carry only ``timestamp``. ``-1021`` -> resync the clock, retry once.
- A rejected logon (-1022 / -2014 / -2015, or an unsolicited 401) is **fatal**: state Failed,
  exit code :data:`EXIT_AUTH` (3), no retry. A wrong key does not improve with retries and a
  retry storm risks an IP ban; systemd units should use ``RestartPreventExitStatus=3``.
- ``max_attempts`` consecutive failed connection attempts -> Failed, exit :data:`EXIT_GAVE_UP`.
- Never a duplicated order: an order whose request was written but not answered when the
  connection died, that timed out, or that got 5xx / -1006 / -1007 is UNKNOWN. Once Ready the
  session asks ``order.status`` by ``origClientOrderId`` (a user-data ``executionReport`` for
  it resolves it too). If the exchange answers ``-2013`` (no such order) the order is reported
  REJECTED with :data:`LOCAL_NOT_FOUND` and is **never resent**; should it still appear later
  on the user data stream, the late report is applied and counted (``orders_late``).
- A reply we cannot understand (``"result": null``, an ``orderId`` of 2**64, an unknown status,
  a field of the wrong type) is a counted, logged protocol error that settles its request with
  :data:`LOCAL_BAD_REPLY`: an order it was about becomes UNKNOWN and is reconciled exactly like
  a -1007. Nothing the venue sends can leave an order PENDING with no request in flight.
- Reconciliation has a budget (issue #11: 40 UNKNOWN orders once cost 240 ``order.status`` in
  6 s). Each order backs off exponentially (``reconcile_interval_s`` doubling up to
  ``reconcile_max_interval_s``); all reconciliation shares one token bucket of request weight,
  ``reconcile_weight_share`` of the per-minute weight limit the venue reports (burst
  ``reconcile_burst_weight``), and pauses while the venue says the weight used is already above
  ``1 - reconcile_weight_share`` of it; ``reconcile_bulk_min`` or more due orders of one symbol
  are asked with one ``openOrders.status`` (weight 6) instead of one ``order.status`` (weight 4)
  each; the ones it does not list are then asked one by one. Orders UNKNOWN for longer than
  ``unknown_stale_s`` are counted in metric ``problem_unknown_orders_stale`` (``pipeline health``
  then marks trading unhealthy); ``orders_unknown_now`` is the gauge of UNKNOWN orders.
- Bounds: the order table holds at most ``max_orders`` (100 000) orders; final orders are
  forgotten oldest first when it is full, and when it is full of live orders a new one is
  rejected locally with :data:`LOCAL_TABLE_FULL` (never silently dropped).
- 429 / 418: nothing but WebSocket ping frames is sent until ``retryAfter``; orders submitted
  meanwhile are rejected locally with :data:`LOCAL_RATE_LIMITED` (stale orders are worse than
  rejected ones). Reconnects also wait for it.
- Orders submitted while not Ready are rejected locally (:data:`LOCAL_NOT_READY`), never queued.
- Make-before-break: before the 24 h limit (``max_connection_age_s``) or on ``serverShutdown``
  a standby connection is opened, synced, logged on and subscribed; then it becomes primary
  and the old one is closed as soon as its in-flight requests are answered (or after
  ``drain_timeout_s``; whatever is still unanswered then becomes UNKNOWN and is reconciled).
  User data is accepted only from the primary, so the overlap neither loses nor duplicates it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, Protocol

from pipeline.backoff import Backoff, BackoffPolicy, Outcome, classify_response
from pipeline.binance import userdata as ud
from pipeline.binance.signing import Signer
from pipeline.binance.wsapi import (
    ApiError,
    OrderInfo,
    ProtocolError,
    RequestBuilder,
    Response,
    StreamEvent,
    decode_frame,
    parse_cancel_replace,
    parse_order,
    venue_time_ms,
)
from pipeline.logs import RateLimitedLog
from pipeline.trading.wire import (  # re-exported: callers of the session name them from here
    CLIENT_ORDER_ID_RE as CLIENT_ORDER_ID_RE,
)
from pipeline.trading.wire import FINAL as FINAL
from pipeline.trading.wire import ExecKind as ExecKind
from pipeline.trading.wire import ExecUpdate as ExecUpdate
from pipeline.trading.wire import OrderStatus as OrderStatus

log = logging.getLogger("pipeline.session")


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
}
# Request weights of the reconciliation requests (Binance WS API docs; the simulator agrees).
WEIGHT_ORDER_STATUS = 4
WEIGHT_OPEN_ORDERS_SYMBOL = 6


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

    PRIMARY = "primary"  # carries orders; the only one whose user data is accepted
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


class LocalProtocolError(RuntimeError):
    """We asked for something the state table does not allow: our bug, not the exchange's."""

    remote = False


_STATUS_BY_NAME = {s.name: s for s in OrderStatus}
# What the venue may say an order's status is (PENDING and UNKNOWN are ours alone).
_VENUE_STATUS = {
    n: st
    for n, st in _STATUS_BY_NAME.items()
    if st not in (OrderStatus.PENDING, OrderStatus.UNKNOWN)
}


def _venue_status(name: str, *, missing: OrderStatus | None = None) -> OrderStatus:
    """The status a reply states; an unknown one makes the reply not understood."""
    st = _VENUE_STATUS.get(name)
    if st is None:
        if name == "" and missing is not None:
            return missing
        raise ProtocolError("order result with an unknown status")
    return st


class Clock(Protocol):
    def monotonic_ns(self) -> int: ...

    def time_ns(self) -> int: ...


class SystemClock:
    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def time_ns(self) -> int:
        return time.time_ns()


# executionReport ``x`` -> what we publish (anything else: STATUS). Built once: it is looked up
# for every user data event.
_EXEC_KIND: dict[str, ExecKind] = {
    "NEW": ExecKind.NEW,
    "TRADE": ExecKind.TRADE,
    "CANCELED": ExecKind.CANCELED,
    "EXPIRED": ExecKind.EXPIRED,
    "REJECTED": ExecKind.REJECT,
    "REPLACED": ExecKind.REPLACED,
    "TRADE_PREVENTION": ExecKind.EXPIRED,
}


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


Action = Open | Send | Ping | Close | Exit


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
    recv_window_ms: int | None = None
    default_retry_after_s: float = 10.0  # 429 without retryAfter
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    cancel_replace_mode: str = "STOP_ON_FAILURE"
    reconcile_interval_s: float = 1.0  # first re-ask of an UNKNOWN order; then doubling
    reconcile_max_interval_s: float = 30.0  # backoff cap per order
    reconcile_weight_share: float = 0.2  # of the per-minute weight limit, for reconciliation
    reconcile_burst_weight: float = 40.0  # token bucket depth (10 order.status)
    reconcile_bulk_min: int = 3  # this many due UNKNOWN orders of a symbol: openOrders.status
    assumed_weight_limit: int = 6000  # per minute, until the venue's rateLimits say otherwise
    unknown_stale_s: float = 30.0  # UNKNOWN longer than this: problem_unknown_orders_stale
    max_retry_after_s: float = 4 * 86400.0  # a later retryAfter is nonsense: protocol error
    max_orders: int = 100_000  # order table size; the oldest final orders are forgotten


@dataclass(slots=True)
class _Order:
    coid: str
    symbol: str
    side: str
    type: str
    price: float
    qty: float
    tif: str
    status: OrderStatus = OrderStatus.PENDING
    order_id: int = -1
    cum_qty: float = 0.0
    cum_quote: float = 0.0
    submit_time_ns: int = 0
    client_id: int = 0
    reconciling: bool = False  # an order.status (or a bulk openOrders.status) is in flight
    was_unknown: bool = False
    unknown_since_ns: int = 0  # monotonic, when it last became UNKNOWN
    reconcile_tries: int = 0  # inconclusive answers since then (drives the backoff)
    next_reconcile_ns: int = 0  # monotonic, when it may be asked again
    bulk_checked: bool = False  # openOrders.status did not list it: ask order.status


@dataclass(slots=True)
class _Pending:
    rid: str
    conn: int
    method: str
    params: dict[str, Any]
    kind: str  # time, logon, subscribe, ping, place, cancel, modify, status, reconcile, generic
    deadline_ns: int
    sent_wall_ns: int
    coid: str = ""  # the order this request is about
    new_coid: str = ""  # modify: the replacement order
    tag: Any = None
    retried: bool = False


@dataclass(slots=True)
class _Conn:
    id: int
    role: ConnRole
    phase: ConnPhase = ConnPhase.CONNECTING
    opened_ns: int = 0
    pending: dict[str, _Pending] = field(default_factory=dict)
    ping_sent_ns: int | None = None  # outstanding WebSocket ping
    next_ping_ns: int = 0
    json_ping_rid: str | None = None
    json_ping_sent_ns: int = 0
    next_json_ping_ns: int = 0
    drain_deadline_ns: int = 0
    subscribed: bool = False

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


METRIC_FIELDS: tuple[str, ...] = (
    "state",
    "connected_since_ns",
    "authenticated_since_ns",
    "last_ping_sent_ns",
    "last_pong_ns",
    "last_json_ping_reply_ns",
    "rtt_us",
    "rtt_smoothed_us",
    "reconnect_attempts",
    "reconnects_total",
    "transitions_total",
    "rollovers_total",
    "orders_sent",
    "orders_acked",
    "orders_rejected",
    "orders_unknown",
    "orders_reconciled",
    "orders_late",
    "orders_local_rejected",
    "requests_timed_out",
    "last_error_code",
    "weight_used",
    "weight_limit",
    "orders_used",
    "orders_limit",
    "rate_limited_until_ns",
    "user_data_subscribed",
    "user_data_events",
    "protocol_errors",
    "clock_offset_ms",
    "time_resyncs",
    "orders_unknown_now",
    "problem_unknown_orders_stale",
    "reconcile_requests",
    "orders_table_full",
)
FLOAT_METRICS = frozenset({"rtt_us", "rtt_smoothed_us", "clock_offset_ms"})


class Session:
    """See the module docstring for the calling contract."""

    def __init__(
        self,
        config: SessionConfig,
        signer: Signer | None,
        *,
        clock: Clock | None = None,
        backoff: Backoff | None = None,
        builder: RequestBuilder | None = None,
    ) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.state = State.DISCONNECTED
        self.failure: str = ""
        self.exit_code: int | None = None
        self._builder = builder or RequestBuilder(
            config.api_key, signer, recv_window_ms=config.recv_window_ms
        )
        self._backoff = backoff or Backoff(config.backoff)
        self._actions: list[Action] = []
        self._updates: list[ExecUpdate | ApiReply] = []
        self._conns: dict[int, _Conn] = {}
        self._primary: int | None = None
        self._standby: int | None = None
        self._next_conn = 1
        self._reconnect_at: int | None = None
        self._rollover_wanted = False
        self._rollover_retry_at = 0
        self._offset_ms = 0.0  # server time - local wall time
        self._next_time_sync_ns = 0
        self._rate_limited_until_ns = 0
        self._orders: dict[str, _Order] = {}
        self._resync_waiters: list[_Pending] = []
        self._reply_ns = 0
        self._unknown: set[str] = set()  # client order ids that became UNKNOWN (pruned lazily)
        self._next_reconcile_ns = 0
        self._budget = float(config.reconcile_burst_weight)  # reconciliation weight tokens
        self._budget_ns = 0
        self._next_prune_ns = 0
        self._rl = RateLimitedLog(log)
        self.metrics: dict[str, float] = {k: 0 for k in METRIC_FIELDS}
        self.on_transition: Callable[[State, State, str], None] | None = None
        # The answer to a request goes to the handler of its kind (built once: looked up for
        # every reply).
        self._reply_handlers: dict[str, Callable[[_Conn, _Pending, Response], None]] = {
            "time": self._on_time,
            "logon": self._on_logon,
            "subscribe": self._on_subscribe,
            "ping": self._on_ping,
            "generic": self._on_generic,
            "place": self._on_place,
            "cancel": self._on_cancel,
            "modify": self._on_modify,
            "status": self._on_status,
            "reconcile": self._on_reconcile,
            "bulk": self._on_bulk,
        }

    # ---- plumbing --------------------------------------------------------------------

    def actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out

    def updates(self) -> list[ExecUpdate | ApiReply]:
        out, self._updates = self._updates, []
        return out

    def _now(self) -> int:
        return self.clock.monotonic_ns()

    def _timestamp_ms(self) -> int:
        return int(self.clock.time_ns() / 1e6 + self._offset_ms)

    def _transition(self, event: str, why: str = "") -> None:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise LocalProtocolError(f"no transition from {self.state.name} on {event!r}")
        old, self.state = self.state, new
        self.metrics["state"] = int(new)
        self.metrics["transitions_total"] += 1
        log.info(
            "session %s -> %s on %s%s",
            old.name,
            new.name,
            event,
            f" ({why})" if why else "",
            extra={"event": "session_transition", "from": old.name, "to": new.name, "on": event},
        )
        if self.on_transition is not None:
            self.on_transition(old, new, event)

    def _error(self, code: int) -> None:
        self.metrics["last_error_code"] = code

    @property
    def ready(self) -> bool:
        return (
            self.state is State.READY and self._primary is not None and self._primary in self._conns
        )

    @property
    def primary_conn(self) -> int | None:
        return self._primary

    @property
    def queued_actions(self) -> int:
        """Actions not yet drained by :meth:`actions` (the shell's outbox check counts them:
        a batch of orders is pumped at once)."""
        return len(self._actions)

    def order_status(self, coid: str) -> OrderStatus | None:
        order = self._orders.get(coid)
        return order.status if order else None

    def orders(self) -> dict[str, OrderStatus]:
        return {k: o.status for k, o in self._orders.items()}

    def order_info(self, coid: str) -> tuple[str, str] | None:
        """``(symbol, side)`` of an order this session placed (the shell's risk check needs
        them for a modify that does not restate them)."""
        order = self._orders.get(coid)
        return (order.symbol, order.side) if order else None

    # ---- connection lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self._transition("start")
        self._open(ConnRole.PRIMARY)

    def stop(self) -> None:
        """Close everything (SIGTERM). Unanswered orders stay UNKNOWN in the final report."""
        if self.state is State.FAILED:
            return
        self._transition("stop")
        self._reconnect_at = None
        for conn in list(self._conns.values()):
            self._drop(conn, "stop", lost=False)
        self._primary = self._standby = None

    def _open(self, role: ConnRole) -> _Conn:
        conn = _Conn(id=self._next_conn, role=role, opened_ns=self._now())
        self._next_conn += 1
        self._conns[conn.id] = conn
        if role is ConnRole.PRIMARY:
            self._primary = conn.id
        else:
            self._standby = conn.id
        self._actions.append(Open(conn.id))
        return conn

    def connected(self, conn_id: int) -> None:
        conn = self._conns.get(conn_id)
        if conn is None:
            self._actions.append(Close(conn_id, "not wanted any more"))
            return
        now = self._now()
        conn.opened_ns = now
        conn.to_phase("connected")
        conn.next_ping_ns = now + int(self.config.ping_interval_s * 1e9)
        conn.next_json_ping_ns = now + int(self.config.json_ping_interval_s * 1e9)
        if conn.role is ConnRole.PRIMARY:
            self._transition("connected")
            self.metrics["connected_since_ns"] = self.clock.time_ns()
        self._request(conn, "time", {}, "time")

    def connect_failed(self, conn_id: int, reason: str) -> None:
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return
        log.warning(
            "connect failed: %s", reason, extra={"event": "connect_failed", "conn": conn_id}
        )
        if conn.role is ConnRole.STANDBY:
            self._standby_failed()
            return
        self._primary = None
        self._schedule_reconnect("connect_failed", reason)

    def connection_lost(self, conn_id: int, reason: str) -> None:
        conn = self._conns.get(conn_id)
        if conn is None:
            return  # we closed it ourselves
        self._drop(conn, reason, lost=True)

    def _standby_failed(self) -> None:
        self._standby = None
        delay = self._backoff.base_delay(1)
        self._rollover_retry_at = self._now() + int(delay * 1e9)

    def _drop(self, conn: _Conn, reason: str, *, lost: bool) -> None:
        """Forget a connection; its unanswered requests become unknown / failed."""
        self._conns.pop(conn.id, None)
        if lost:
            log.warning(
                "connection %d (%s) lost: %s",
                conn.id,
                conn.role.value,
                reason,
                extra={"event": "connection_lost", "conn": conn.id, "role": conn.role.value},
            )
        self._actions.append(Close(conn.id, reason))
        was_primary = conn.id == self._primary
        if was_primary:
            self._primary = None
            self.metrics["user_data_subscribed"] = 0
        for p in list(conn.pending.values()):
            self._request_failed(p, LOCAL_DISCONNECTED, unknown=True)
        conn.pending.clear()
        orphans = [p for p in self._resync_waiters if p.conn == conn.id]
        self._resync_waiters = [p for p in self._resync_waiters if p.conn != conn.id]
        for p in orphans:  # waiting for a clock resync to be retried: never will be now
            self._request_failed(p, LOCAL_DISCONNECTED, unknown=True)
        if conn.id == self._standby:
            self._standby_failed()
        elif was_primary and self.state in (State.READY, State.AUTHENTICATING):
            self._schedule_reconnect("lost", reason)

    def _schedule_reconnect(self, event: str, reason: str) -> None:
        # A ready standby can take over at once (it is already logged on and subscribed).
        sb = self._conns.get(self._standby) if self._standby is not None else None
        if sb is not None and sb.phase is ConnPhase.READY and self.state is State.READY:
            self._promote(sb)
            return
        if sb is not None:
            self._drop(sb, "primary lost during rollover", lost=False)
        self._transition(event, reason)
        delay = self._backoff.next_delay()
        self.metrics["reconnect_attempts"] = self._backoff.attempts
        if delay is None:
            self._fail(
                EXIT_GAVE_UP,
                f"gave up after {self._backoff.attempts} failed connection attempts ({reason})",
            )
            return
        now = self._now()
        at = now + int(delay * 1e9)
        at = max(at, self._rate_limited_until_ns)
        self._reconnect_at = at
        log.info(
            "reconnecting in %.2f s (attempt %d)",
            (at - now) / 1e9,
            self._backoff.attempts,
            extra={"event": "reconnect_scheduled"},
        )

    def _fail(self, code: int, message: str) -> None:
        self._transition("give_up" if code == EXIT_GAVE_UP else "auth_rejected", message)
        self.failure = message
        self.exit_code = code
        self._reconnect_at = None
        for conn in list(self._conns.values()):
            self._conns.pop(conn.id, None)
            self._actions.append(Close(conn.id, "failed"))
            for p in conn.pending.values():
                self._request_failed(p, LOCAL_DISCONNECTED, unknown=True)
        self._primary = self._standby = None
        log.error("session failed: %s", message, extra={"event": "session_failed"})
        self._actions.append(Exit(code, message))

    def _promote(self, conn: _Conn) -> None:
        old = self._conns.get(self._primary) if self._primary is not None else None
        conn.to_role("promoted")
        self._primary, self._standby = conn.id, None
        self._rollover_wanted = False
        self.metrics["rollovers_total"] += 1
        self.metrics["connected_since_ns"] = self.clock.time_ns()
        self.metrics["authenticated_since_ns"] = self.clock.time_ns()
        self.metrics["user_data_subscribed"] = 1
        log.info("connection %d promoted to primary", conn.id, extra={"event": "rollover"})
        if old is not None:
            old.to_role("replaced")
            old.drain_deadline_ns = self._now() + int(self.config.drain_timeout_s * 1e9)
            if not old.pending:
                self._drop(old, "replaced", lost=False)
        self._reconcile_all()

    # ---- requests --------------------------------------------------------------------

    def _request(
        self,
        conn: _Conn,
        method: str,
        params: dict[str, Any],
        kind: str,
        *,
        coid: str = "",
        new_coid: str = "",
        tag: Any = None,
        retried: bool = False,
    ) -> _Pending:
        now = self._now()
        rid, text = self._builder.build(method, params, timestamp_ms=self._timestamp_ms())
        p = _Pending(
            rid,
            conn.id,
            method,
            params,
            kind,
            now + int(self.config.request_timeout_s * 1e9),
            self.clock.time_ns(),
            coid,
            new_coid,
            tag,
            retried,
        )
        conn.pending[rid] = p
        self._actions.append(Send(conn.id, text))
        return p

    def _send_ready(self, method: str, params: dict[str, Any], kind: str, **kw: Any) -> bool:
        if not self.ready or self._primary is None:
            return False
        if self._now() < self._rate_limited_until_ns:
            return False
        self._request(self._conns[self._primary], method, params, kind, **kw)
        return True

    def _local_reject(self, coid: str, code: int, order: _Order | None = None, **kw: Any) -> None:
        self.metrics["orders_local_rejected"] += 1
        self._error(code)
        self._updates.append(
            ExecUpdate(
                coid,
                ExecKind.REJECT,
                OrderStatus.REJECTED,
                error_code=code,
                error_msg=ERROR_TEXT.get(code, ""),
                symbol=order.symbol if order else "",
                side=order.side if order else "",
                submit_time_ns=order.submit_time_ns if order else 0,
                client_id=order.client_id if order else 0,
                **kw,
            )
        )

    def _gate(self) -> int:
        if not self.ready:
            return LOCAL_NOT_READY
        if self._now() < self._rate_limited_until_ns:
            return LOCAL_RATE_LIMITED
        return 0

    def place(
        self,
        client_order_id: str,
        symbol: str,
        side: str,
        type: str,
        qty: float,
        price: float | None = None,
        tif: str | None = None,
        *,
        submit_time_ns: int = 0,
        client_id: int = 0,
    ) -> bool:
        """Send ``order.place``; False (and a REJECT update) if refused locally."""
        order = _Order(
            client_order_id,
            symbol,
            side,
            type,
            price or 0.0,
            qty,
            tif or "",
            submit_time_ns=submit_time_ns,
            client_id=client_id,
        )
        bad_fields = side not in ("BUY", "SELL") or qty <= 0 or (type == "LIMIT" and not price)
        if self._refused(order, bad_fields=bad_fields):
            return False
        self._send_new(order, "order.place", {"symbol": symbol}, "place", coid=client_order_id)
        return True

    def cancel(
        self, client_order_id: str, symbol: str | None = None, *, client_id: int = 0
    ) -> bool:
        order = self._orders.get(client_order_id)
        sym = symbol or (order.symbol if order else "")
        code = self._gate() or (LOCAL_INVALID if not sym else 0)
        if code:
            self._updates.append(
                ExecUpdate(
                    client_order_id,
                    ExecKind.CANCEL_REJECT,
                    order.status if order else OrderStatus.UNKNOWN,
                    symbol=sym,
                    error_code=code,
                    error_msg=ERROR_TEXT.get(code, ""),
                    client_id=client_id,
                )
            )
            return False
        params = {"symbol": sym, "origClientOrderId": client_order_id}
        return self._send_ready(
            "order.cancel", params, "cancel", coid=client_order_id, tag=client_id
        )

    def modify(
        self,
        client_order_id: str,
        new_client_order_id: str,
        *,
        qty: float,
        price: float | None = None,
        symbol: str | None = None,
        side: str | None = None,
        type: str | None = None,
        tif: str | None = None,
        submit_time_ns: int = 0,
        client_id: int = 0,
    ) -> bool:
        """``order.cancelReplace``: cancel ``client_order_id``, place ``new_client_order_id``."""
        old = self._orders.get(client_order_id)
        sym = symbol or (old.symbol if old else "")
        sd = side or (old.side if old else "")
        tp = type or (old.type if old else "LIMIT")
        new = _Order(
            new_client_order_id,
            sym,
            sd,
            tp,
            price or 0.0,
            qty,
            tif or (old.tif if old else "GTC"),
            submit_time_ns=submit_time_ns,
            client_id=client_id,
        )
        if self._refused(new, malformed=not sym or not sd):
            return False
        params: dict[str, Any] = {
            "symbol": sym,
            "cancelReplaceMode": self.config.cancel_replace_mode,
            "cancelOrigClientOrderId": client_order_id,
        }
        return self._send_new(
            new,
            "order.cancelReplace",
            params,
            "modify",
            coid=client_order_id,
            new_coid=new_client_order_id,
        )

    def _refused(self, order: _Order, *, malformed: bool = False, bad_fields: bool = False) -> bool:
        """Reject a new order locally if it cannot go out; True if it was.

        One order of checks for place and modify, so both report the same code for the same
        fault: an invalid id (or ``malformed``), a duplicate id, ``bad_fields``, :meth:`_gate`.
        """
        coid = order.coid
        if malformed or not CLIENT_ORDER_ID_RE.match(coid):
            code = LOCAL_INVALID
        elif coid in self._orders:
            code = LOCAL_DUPLICATE_ID
        elif bad_fields:
            code = LOCAL_INVALID
        else:
            code = self._gate() or (LOCAL_TABLE_FULL if self._table_full() else 0)
        if code:
            self._local_reject(coid, code, order)
        return bool(code)

    def _send_new(
        self, order: _Order, method: str, params: dict[str, Any], kind: str, **kw: Any
    ) -> bool:
        """Send a request creating ``order``: its fields follow the method's own ``params``."""
        params["side"] = order.side
        params["type"] = order.type
        params["quantity"] = order.qty
        params["newClientOrderId"] = order.coid
        if order.price:
            params["price"] = order.price
        if order.type != "MARKET":
            params["timeInForce"] = order.tif or "GTC"
        self._add_order(order)
        self.metrics["orders_sent"] += 1
        return self._send_ready(method, params, kind, **kw)

    def query(self, client_order_id: str, symbol: str | None = None, *, client_id: int = 0) -> bool:
        order = self._orders.get(client_order_id)
        sym = symbol or (order.symbol if order else "")
        code = self._gate() or (LOCAL_INVALID if not sym else 0)
        if code:
            self._updates.append(
                ExecUpdate(
                    client_order_id,
                    ExecKind.STATUS,
                    order.status if order else OrderStatus.UNKNOWN,
                    symbol=sym,
                    error_code=code,
                    client_id=client_id,
                )
            )
            return False
        return self._send_ready(
            "order.status",
            {"symbol": sym, "origClientOrderId": client_order_id},
            "status",
            coid=client_order_id,
            tag=client_id,
        )

    def request(self, method: str, params: dict[str, Any] | None = None, tag: Any = None) -> bool:
        """Any other request (openOrders.status, openOrders.cancelAll, account.status, ...).

        The answer comes back as an :class:`ApiReply` with ``tag``.
        """
        code = self._gate()
        if code:
            self._updates.append(ApiReply(tag, Response(None, 503, None, _local_error(code))))
            return False
        return self._send_ready(method, dict(params or {}), "generic", tag=tag)

    # ---- time --------------------------------------------------------------------------

    def pong(self, conn_id: int) -> None:
        conn = self._conns.get(conn_id)
        if conn is None or conn.ping_sent_ns is None:
            return
        now = self._now()
        self._rtt((now - conn.ping_sent_ns) / 1000.0)
        conn.ping_sent_ns = None
        self.metrics["last_pong_ns"] = self.clock.time_ns()

    def _rtt(self, us: float) -> None:
        self.metrics["rtt_us"] = us
        s = self.metrics["rtt_smoothed_us"]
        self.metrics["rtt_smoothed_us"] = us if s == 0 else 0.875 * s + 0.125 * us

    def next_deadline(self) -> int | None:
        """The monotonic ns by which :meth:`tick` must be called (None: nothing scheduled)."""
        times: list[int] = []
        if self._reconnect_at is not None:
            times.append(self._reconnect_at)
        for conn in self._conns.values():
            if conn.phase is ConnPhase.CONNECTING:
                continue
            times.append(conn.next_ping_ns)
            if conn.ping_sent_ns is not None:
                times.append(conn.ping_sent_ns + int(self.config.pong_timeout_s * 1e9))
            if conn.phase is ConnPhase.READY:
                if conn.json_ping_rid is None:
                    times.append(conn.next_json_ping_ns)
                else:
                    times.append(conn.json_ping_sent_ns + int(self.config.pong_timeout_s * 1e9))
            times.extend(p.deadline_ns for p in conn.pending.values())
            if conn.role is ConnRole.DRAINING:
                times.append(conn.drain_deadline_ns)
        if self._unknown:
            times.append(self._next_reconcile_ns)
        if self.ready and self._primary is not None:
            times.append(self._next_time_sync_ns)
            times.append(
                self._conns[self._primary].opened_ns + int(self.config.max_connection_age_s * 1e9)
            )
        return min(times) if times else None

    def tick(self) -> None:
        now = self._now()
        if self._reconnect_at is not None and now >= self._reconnect_at:
            self._reconnect_at = None
            if self.state is State.RECONNECTING:
                self._transition("retry")
                self.metrics["reconnects_total"] += 1
                self._open(ConnRole.PRIMARY)
        pong_to = int(self.config.pong_timeout_s * 1e9)
        for conn in list(self._conns.values()):
            if conn.id not in self._conns or conn.phase is ConnPhase.CONNECTING:
                continue
            if conn.ping_sent_ns is not None and now - conn.ping_sent_ns > pong_to:
                self._drop(conn, "no pong within pong timeout", lost=True)
                continue
            if conn.json_ping_rid is not None and now - conn.json_ping_sent_ns > pong_to:
                self._drop(conn, "no reply to JSON ping within pong timeout", lost=True)
                continue
            if conn.ping_sent_ns is None and now >= conn.next_ping_ns:
                conn.ping_sent_ns = now
                conn.next_ping_ns = now + int(self.config.ping_interval_s * 1e9)
                self.metrics["last_ping_sent_ns"] = self.clock.time_ns()
                self._actions.append(Ping(conn.id))
            if (
                conn.phase is ConnPhase.READY
                and conn.json_ping_rid is None
                and now >= conn.next_json_ping_ns
                and now >= self._rate_limited_until_ns
            ):
                p = self._request(conn, "ping", {}, "ping")
                conn.json_ping_rid = p.rid
                conn.json_ping_sent_ns = now
                conn.next_json_ping_ns = now + int(self.config.json_ping_interval_s * 1e9)
            for p in [p for p in conn.pending.values() if now >= p.deadline_ns]:
                conn.pending.pop(p.rid, None)
                self.metrics["requests_timed_out"] += 1
                self._request_failed(p, LOCAL_TIMEOUT, unknown=True)
                if p.kind in ("time", "logon", "subscribe"):
                    self._drop(conn, f"{p.method} timed out", lost=True)
                    break
            if (
                conn.id in self._conns
                and conn.role is ConnRole.DRAINING
                and (not conn.pending or now >= conn.drain_deadline_ns)
            ):
                self._drop(conn, "replaced", lost=False)
        if self.ready and self._primary is not None:
            primary = self._conns[self._primary]
            if now >= self._next_time_sync_ns and now >= self._rate_limited_until_ns:
                self._next_time_sync_ns = now + int(self.config.time_sync_interval_s * 1e9)
                self._request(primary, "time", {}, "time")
            age = now - primary.opened_ns
            if age >= int(self.config.max_connection_age_s * 1e9):
                self._rollover_wanted = True
            if (
                self._rollover_wanted
                and self._standby is None
                and now >= self._rollover_retry_at
                and now >= self._rate_limited_until_ns
            ):
                log.info("opening a standby connection", extra={"event": "rollover_start"})
                self._open(ConnRole.STANDBY)
        if self._unknown and now >= self._next_reconcile_ns:
            self._next_reconcile_ns = now + int(self.config.reconcile_interval_s * 1e9)
            self._reconcile_all()
        elif not self._unknown and self.metrics["orders_unknown_now"]:
            self._unknown_gauges(now)

    # ---- receiving -----------------------------------------------------------------------

    def frame_received(self, conn_id: int, text: str | bytes) -> None:
        conn = self._conns.get(conn_id)
        if conn is None:
            return
        self._reply_ns = self.clock.time_ns()
        try:
            msg = decode_frame(text)
        except ProtocolError as exc:
            self._protocol_error(f"bad frame: {exc}")
            p = conn.pending.pop(str(exc.request_id), None) if exc.request_id is not None else None
            if p is not None:
                self._bad_reply(conn, p)
            return
        if isinstance(msg, StreamEvent):
            self._on_event(conn, msg)
            return
        if msg.bad_fields:
            self._protocol_error(
                f"fields dropped: {'; '.join(msg.bad_fields)}", len(msg.bad_fields)
            )
        self._track_limits(msg)
        if msg.id is None:
            if msg.status == 401 or msg.code in (-2015, -2014):
                self._error(msg.code or -2015)
                self._fail(EXIT_AUTH, f"the exchange revoked the session (code {msg.code})")
            return
        p = conn.pending.pop(str(msg.id), None)
        if p is None:
            self.metrics["protocol_errors"] += 1
            log.warning("response to an unknown request id", extra={"event": "unmatched_reply"})
            return
        if msg.error is not None:
            self._error(msg.error.code)
        if msg.status in (418, 429) or msg.code in (-1003,):
            self._rate_limited(msg)
        handler = self._reply_handlers[p.kind]
        try:
            handler(conn, p, msg)
        except ProtocolError as exc:  # handlers parse before they change anything
            self._protocol_error(f"{p.method} answer not understood: {exc}")
            self._bad_reply(conn, p)
            return
        if conn.role is ConnRole.DRAINING and not conn.pending and conn.id in self._conns:
            self._drop(conn, "replaced", lost=False)

    def _protocol_error(self, what: str, n: int = 1) -> None:
        """Count and log (rate limited: a hostile venue must not flood the log) a remote fault."""
        self.metrics["protocol_errors"] += n
        self._rl.warning("protocol_error", f"protocol error: {what[:200]}", remote=True)

    def _bad_reply(self, conn: _Conn, p: _Pending) -> None:
        """Settle a request whose answer we could not understand, as if it had timed out: an
        order it was about becomes UNKNOWN and is reconciled (the -1007 path)."""
        self._request_failed(p, LOCAL_BAD_REPLY, unknown=True)
        if conn.id not in self._conns:
            return
        if p.kind in ("time", "logon", "subscribe") and conn.phase is not ConnPhase.READY:
            self._drop(conn, f"{p.method} answer not understood", lost=True)
        elif conn.role is ConnRole.DRAINING and not conn.pending:
            self._drop(conn, "replaced", lost=False)

    def _track_limits(self, msg: Response) -> None:
        for rl in msg.rate_limits:
            if rl.rate_limit_type == "REQUEST_WEIGHT":
                self.metrics["weight_used"] = rl.count
                self.metrics["weight_limit"] = rl.limit
            elif rl.rate_limit_type == "ORDERS" and rl.interval == "SECOND":
                self.metrics["orders_used"] = rl.count
                self.metrics["orders_limit"] = rl.limit

    def _rate_limited(self, msg: Response) -> None:
        now = self._now()
        retry_ms = msg.error.retry_after_ms if msg.error else None
        wait_ns: int | None = None
        if retry_ms is not None:
            wait_ns = int((retry_ms - self._timestamp_ms()) * 1e6)
            if wait_ns > self.config.max_retry_after_s * 1e9:
                # not a ban any exchange hands out: waiting it out would silence us for good
                self._protocol_error(f"retryAfter {retry_ms} is beyond max_retry_after_s")
                wait_ns = None
        if wait_ns is None:
            wait_ns = int(self.config.default_retry_after_s * 1e9)
        until = now + max(0, wait_ns)
        self._rate_limited_until_ns = max(self._rate_limited_until_ns, until)
        self.metrics["rate_limited_until_ns"] = self.clock.time_ns() + max(0, wait_ns)
        log.warning(
            "rate limited (status %d, code %s) for %.1f s",
            msg.status,
            msg.code,
            wait_ns / 1e9,
            extra={"event": "rate_limited"},
        )

    # handlers: one per request kind -----------------------------------------------------

    def _on_time(self, conn: _Conn, p: _Pending, msg: Response) -> None:
        if msg.ok and isinstance(msg.result, dict) and "serverTime" in msg.result:
            server_ms = venue_time_ms(msg.result["serverTime"], "serverTime")
            recv_wall = self.clock.time_ns()
            mid_ms = (p.sent_wall_ns + recv_wall) / 2e6
            self._offset_ms = float(server_ms) - mid_ms
            self.metrics["clock_offset_ms"] = self._offset_ms
            self._rtt((recv_wall - p.sent_wall_ns) / 1000.0)
            waiters, self._resync_waiters = self._resync_waiters, []
            for w in waiters:
                wc = self._conns.get(w.conn)
                if wc is not None:
                    self._request(
                        wc,
                        w.method,
                        w.params,
                        w.kind,
                        coid=w.coid,
                        new_coid=w.new_coid,
                        tag=w.tag,
                        retried=True,
                    )
        else:  # no usable time: whatever waited for it will not be retried
            self._fail_resync_waiters(conn.id, LOCAL_BAD_REPLY if msg.ok else (msg.code or 0))
        if conn.phase is ConnPhase.SYNCING:
            conn.to_phase("time_synced")
            self._request(conn, "session.logon", {}, "logon")

    def _on_logon(self, conn: _Conn, p: _Pending, msg: Response) -> None:
        outcome = classify_response(msg.status, msg.code)
        if outcome is Outcome.OK:
            conn.to_phase("logon_ok")
            if conn.role is ConnRole.PRIMARY:
                self._transition("logon_ok")
                self.metrics["authenticated_since_ns"] = self.clock.time_ns()
                self._backoff.reset()
                self.metrics["reconnect_attempts"] = 0
                self._next_time_sync_ns = self._now() + int(self.config.time_sync_interval_s * 1e9)
            self._request(conn, "userDataStream.subscribe", {}, "subscribe")
            if conn.role is ConnRole.PRIMARY:
                self._reconcile_all()
            return
        if outcome is Outcome.AUTH_FATAL:
            self._fail(
                EXIT_AUTH,
                f"session.logon rejected by the exchange (code {msg.code}: "
                f"{msg.error.msg if msg.error else ''}); check the API key and that its "
                "Ed25519 public key is registered for it",
            )
            return
        if outcome is Outcome.RESYNC_RETRY and not p.retried:
            self.metrics["time_resyncs"] += 1
            conn.to_phase("resync")
            self._request(conn, "time", {}, "time")
            return
        self._drop(conn, f"session.logon failed (code {msg.code})", lost=True)

    def _on_subscribe(self, conn: _Conn, p: _Pending, msg: Response) -> None:
        if msg.ok or msg.code == -2035:  # -2035: already subscribed, which is what we want
            conn.subscribed = True
            conn.to_phase("subscribed")
            if conn.role is ConnRole.PRIMARY:
                self.metrics["user_data_subscribed"] = 1
            elif conn.role is ConnRole.STANDBY:
                self._promote(conn)
            return
        log.warning(
            "userDataStream.subscribe failed (code %s)",
            msg.code,
            extra={"event": "subscribe_failed"},
        )
        self._drop(conn, "user data subscription failed", lost=True)

    def _on_ping(self, conn: _Conn, p: _Pending, msg: Response) -> None:
        if conn.json_ping_rid == p.rid:
            conn.json_ping_rid = None
            self.metrics["last_json_ping_reply_ns"] = self.clock.time_ns()

    def _on_generic(self, conn: _Conn, p: _Pending, msg: Response) -> None:
        if msg.code == -1021 and not p.retried:
            self._resync_and_retry(p)
            return
        self._updates.append(ApiReply(p.tag, msg))

    def _fail_resync_waiters(self, conn_id: int, code: int) -> None:
        waiters = [w for w in self._resync_waiters if w.conn == conn_id]
        if waiters:
            self._resync_waiters = [w for w in self._resync_waiters if w.conn != conn_id]
            for w in waiters:
                self._request_failed(w, code or LOCAL_BAD_REPLY, unknown=True)

    def _resync_and_retry(self, p: _Pending) -> None:
        self.metrics["time_resyncs"] += 1
        self._resync_waiters.append(p)
        conn = self._conns.get(p.conn)
        if conn is not None:
            self._request(conn, "time", {}, "time")

    def _on_place(self, conn: _Conn, p: _Pending, msg: Response) -> None:
        order = self._orders.get(p.coid)
        if order is None:
            return
        outcome = classify_response(msg.status, msg.code)
        if outcome is Outcome.OK:
            info = parse_order(msg.result)
            # an ACK-type answer has no status: accepted by the engine means NEW
            _venue_status(info.status, missing=OrderStatus.NEW if info.order_id >= 0 else None)
            self.metrics["orders_acked"] += 1
            if not info.status:
                order.status = OrderStatus.NEW
            self._apply_info(order, info)
            self._emit(
                order,
                ExecKind.ACK,
                event_time_ns=info.transact_time_ms * 1_000_000,
                sent_time_ns=p.sent_wall_ns,
                reply_time_ns=self._reply_ns,
            )
        elif outcome is Outcome.RESYNC_RETRY and not p.retried:
            self._resync_and_retry(p)  # -1021 is rejected before the engine: safe to resend
        elif outcome is Outcome.UNKNOWN:
            self._make_unknown(order, msg.code or LOCAL_TIMEOUT)
        else:  # rejected, rate limited, or auth: the order was not accepted
            self._reject(order, msg.code or 0, msg.error.msg if msg.error else "")

    def _on_cancel(self, conn: _Conn, p: _Pending, msg: Response) -> None:
        order = self._orders.get(p.coid)
        outcome = classify_response(msg.status, msg.code)
        if outcome is Outcome.OK:
            info = parse_order(msg.result)
            _venue_status(info.status, missing=OrderStatus.CANCELED)
            if order is not None:
                self._apply_info(order, info)
                if not info.status:
                    order.status = OrderStatus.CANCELED
                self._emit(order, ExecKind.CANCELED, client_id=p.tag or order.client_id)
            else:
                self._updates.append(
                    ExecUpdate(
                        p.coid,
                        ExecKind.CANCELED,
                        OrderStatus.CANCELED,
                        symbol=info.symbol,
                        order_id=info.order_id,
                        client_id=p.tag or 0,
                    )
                )
            return
        if outcome is Outcome.RESYNC_RETRY and not p.retried:
            self._resync_and_retry(p)
            return
        if outcome is Outcome.UNKNOWN and order is not None:
            self._make_unknown(order, msg.code or LOCAL_TIMEOUT)
        self._updates.append(
            ExecUpdate(
                p.coid,
                ExecKind.CANCEL_REJECT,
                order.status if order else OrderStatus.UNKNOWN,
                symbol=order.symbol if order else "",
                error_code=msg.code or 0,
                error_msg=msg.error.msg[:60] if msg.error else "",
                client_id=p.tag or (order.client_id if order else 0),
            )
        )

    def _on_modify(self, conn: _Conn, p: _Pending, msg: Response) -> None:
        old = self._orders.get(p.coid)
        new = self._orders.get(p.new_coid)
        outcome = classify_response(msg.status, msg.code)
        if outcome is Outcome.RESYNC_RETRY and not p.retried:
            self._resync_and_retry(p)
            return
        if outcome is Outcome.UNKNOWN:
            if new is not None:
                self._make_unknown(new, msg.code or LOCAL_TIMEOUT)
            if old is not None:
                self._make_unknown(old, msg.code or LOCAL_TIMEOUT)
            return
        res = parse_cancel_replace(msg)
        if res.cancel is not None:
            _venue_status(res.cancel.status, missing=OrderStatus.CANCELED)
        if res.new_order is not None:
            _venue_status(res.new_order.status, missing=OrderStatus.NEW)
        if old is not None and res.cancel_ok and res.cancel is not None:
            c = res.cancel
            self._apply_info(old, c)
            self._emit(old, ExecKind.CANCELED)
        elif res.cancel_error is not None:
            self._updates.append(
                ExecUpdate(
                    p.coid,
                    ExecKind.CANCEL_REJECT,
                    old.status if old else OrderStatus.UNKNOWN,
                    symbol=old.symbol if old else (new.symbol if new else ""),
                    error_code=res.cancel_error.code,
                    error_msg=res.cancel_error.msg[:60],
                    client_id=old.client_id if old else (new.client_id if new else 0),
                )
            )
        if new is None:
            return
        if res.new_order_ok and res.new_order is not None:
            n = res.new_order
            self.metrics["orders_acked"] += 1
            self._apply_info(new, n)
            self._emit(new, ExecKind.ACK, event_time_ns=n.transact_time_ms * 1_000_000)
        else:
            err = res.new_order_error or res.cancel_error or msg.error
            code = err.code if err else (msg.code or 0)
            if res.new_order_ok is None and err is res.cancel_error:
                code = code or -2022
            self._reject(new, code, err.msg if err else "new order not attempted")

    def _on_status(self, conn: _Conn, p: _Pending, msg: Response) -> None:
        order = self._orders.get(p.coid)
        if msg.ok:
            info = parse_order(msg.result)
            _venue_status(info.status)
            if order is not None and order.status is OrderStatus.UNKNOWN:
                self._apply_info(order, info)
                self.metrics["orders_reconciled"] += 1
                self._emit(order, ExecKind.RECONCILED)
                self._emit(order, ExecKind.STATUS, client_id=p.tag or order.client_id)
            elif order is not None:
                self._apply_info(order, info)
                self._emit(order, ExecKind.STATUS, client_id=p.tag or order.client_id)
            else:
                st = _STATUS_BY_NAME.get(info.status, OrderStatus.UNKNOWN)
                self._updates.append(
                    ExecUpdate(
                        p.coid,
                        ExecKind.STATUS,
                        st,
                        symbol=info.symbol,
                        order_id=info.order_id,
                        price=info.price,
                        qty=info.orig_qty,
                        cum_qty=info.executed_qty,
                        client_id=p.tag or 0,
                    )
                )
            return
        if msg.code == -1021 and not p.retried:
            self._resync_and_retry(p)
            return
        self._updates.append(
            ExecUpdate(
                p.coid,
                ExecKind.STATUS,
                order.status if order else OrderStatus.UNKNOWN,
                error_code=msg.code or 0,
                client_id=p.tag or 0,
            )
        )

    def _on_reconcile(self, conn: _Conn, p: _Pending, msg: Response) -> None:
        order = self._orders.get(p.coid)
        if order is None:
            return
        info = parse_order(msg.result) if msg.ok else None
        if info is not None:
            _venue_status(info.status)
        order.reconciling = False
        if order.status is not OrderStatus.UNKNOWN:
            return  # the user data stream resolved it first
        if info is not None:
            self._apply_info(order, info)
            self.metrics["orders_reconciled"] += 1
            self._emit(order, ExecKind.RECONCILED)
        elif msg.code == -2013:
            self.metrics["orders_reconciled"] += 1
            self._reject(order, LOCAL_NOT_FOUND, ERROR_TEXT[LOCAL_NOT_FOUND])
        else:  # timeout, -1007 again, rate limit: still unknown; asked again after a backoff
            self._reconcile_failed(order)

    def _on_bulk(self, conn: _Conn, p: _Pending, msg: Response) -> None:
        """openOrders.status for one symbol's UNKNOWN orders: listed = open (reconciled);
        not listed = filled, canceled or never placed, which only order.status can tell."""
        orders = [o for c in p.tag for o in (self._orders.get(c),) if o is not None]
        found: dict[str, OrderInfo] = {}
        if msg.ok:
            if not isinstance(msg.result, list):
                raise ProtocolError("openOrders.status result is not a list")
            for item in msg.result:
                info = parse_order(item)
                _venue_status(info.status)
                found[info.client_order_id] = info
        for order in orders:
            order.reconciling = False
            if order.status is not OrderStatus.UNKNOWN:
                continue
            if not msg.ok:
                self._reconcile_failed(order)
                continue
            info_ = found.get(order.coid)
            if info_ is None:
                order.bulk_checked = True
                order.next_reconcile_ns = self._now()
                self._next_reconcile_ns = min(self._next_reconcile_ns, order.next_reconcile_ns)
                continue
            self._apply_info(order, info_)
            self.metrics["orders_reconciled"] += 1
            self._emit(order, ExecKind.RECONCILED)

    # ---- orders ------------------------------------------------------------------------

    def _apply(
        self, order: _Order, status: str, order_id: int, cum_qty: float, cum_quote: float
    ) -> None:
        order.status = _VENUE_STATUS.get(status, order.status)
        if order_id >= 0:
            order.order_id = order_id
        order.cum_qty = max(order.cum_qty, cum_qty)
        order.cum_quote = max(order.cum_quote, cum_quote)

    def _apply_info(self, order: _Order, info: OrderInfo) -> None:
        """:meth:`_apply` with what an order.place / cancel / status result says."""
        self._apply(order, info.status, info.order_id, info.executed_qty, info.cum_quote_qty)

    def _emit(
        self, order: _Order, kind: ExecKind, *, client_id: int | None = None, **kw: Any
    ) -> None:
        """Publish an order's state; answers to a request go to the requesting client."""
        self._updates.append(
            ExecUpdate(
                order.coid,
                kind,
                order.status,
                symbol=order.symbol,
                side=order.side,
                order_id=order.order_id,
                price=order.price,
                qty=order.qty,
                cum_qty=order.cum_qty,
                cum_quote=order.cum_quote,
                submit_time_ns=order.submit_time_ns,
                client_id=order.client_id if client_id is None else client_id,
                **kw,
            )
        )

    def _reject(self, order: _Order, code: int, msg: str) -> None:
        order.status = OrderStatus.REJECTED
        self.metrics["orders_rejected"] += 1
        self._error(code)
        self._emit(order, ExecKind.REJECT, error_code=code, error_msg=msg[:60])

    def _make_unknown(self, order: _Order, code: int) -> None:
        if order.status in FINAL:
            return
        now = self._now()
        if order.status is not OrderStatus.UNKNOWN:  # newly unknown: a fresh backoff
            order.unknown_since_ns = now
            order.reconcile_tries = 0
            order.next_reconcile_ns = now
            order.bulk_checked = False
        order.status = OrderStatus.UNKNOWN
        self._unknown.add(order.coid)
        order.was_unknown = True
        self.metrics["orders_unknown"] += 1
        self._emit(order, ExecKind.UNKNOWN, error_code=code)
        self._reconcile(order, now)

    def _refill_budget(self, now: int) -> float:
        """Reconciliation's weight tokens: ``reconcile_weight_share`` of the per-minute weight
        limit, paused while the venue reports the weight used above ``1 - share`` of it."""
        cfg = self.config
        limit = self.metrics["weight_limit"] or cfg.assumed_weight_limit
        share = cfg.reconcile_weight_share
        if self._budget_ns and self.metrics["weight_used"] <= limit * (1.0 - share):
            rate_per_ns = limit * share / 60e9
            self._budget = min(
                cfg.reconcile_burst_weight, self._budget + (now - self._budget_ns) * rate_per_ns
            )
        self._budget_ns = now
        return self._budget

    def _can_reconcile(self, now: int) -> bool:
        return self.ready and self._primary is not None and now >= self._rate_limited_until_ns

    def _reconcile(self, order: _Order, now: int) -> None:
        """Ask order.status for one UNKNOWN order now if it is due and the budget allows;
        otherwise the next pass (:meth:`_reconcile_all`) will."""
        if order.reconciling or now < order.next_reconcile_ns or not self._can_reconcile(now):
            return
        if self._refill_budget(now) < WEIGHT_ORDER_STATUS:
            return
        self._budget -= WEIGHT_ORDER_STATUS
        self._query_one(order)

    def _query_one(self, order: _Order) -> None:
        assert self._primary is not None
        order.reconciling = True
        self.metrics["reconcile_requests"] += 1
        self._request(
            self._conns[self._primary],
            "order.status",
            {"symbol": order.symbol, "origClientOrderId": order.coid},
            "reconcile",
            coid=order.coid,
        )

    def _reconcile_failed(self, order: _Order) -> None:
        """An inconclusive answer: ask again after an exponential backoff."""
        order.reconciling = False
        order.reconcile_tries += 1
        cfg = self.config
        delay = min(
            cfg.reconcile_interval_s * 2 ** min(order.reconcile_tries - 1, 30),
            cfg.reconcile_max_interval_s,
        )
        order.next_reconcile_ns = self._now() + int(delay * 1e9)

    def _unknown_gauges(self, now: int) -> None:
        """Prune :attr:`_unknown`; publish how many are UNKNOWN now and how many for too long."""
        stale_ns = int(self.config.unknown_stale_s * 1e9)
        n = stale = 0
        for coid in list(self._unknown):
            order = self._orders.get(coid)
            if order is None or order.status is not OrderStatus.UNKNOWN:
                self._unknown.discard(coid)
                continue
            n += 1
            if now - order.unknown_since_ns > stale_ns:
                stale += 1
        if stale and not self.metrics["problem_unknown_orders_stale"]:
            self._rl.warning(
                "unknown_orders_stale",
                f"{stale} orders UNKNOWN for more than {self.config.unknown_stale_s:.0f} s",
            )
        self.metrics["orders_unknown_now"] = n
        self.metrics["problem_unknown_orders_stale"] = stale

    def _reconcile_all(self) -> None:
        """One reconciliation pass over the due UNKNOWN orders, within the budget: a symbol
        with ``reconcile_bulk_min`` or more due orders gets one openOrders.status, the rest one
        order.status each (after Ready, and every ``reconcile_interval_s``)."""
        now = self._now()
        self._unknown_gauges(now)
        if not self._can_reconcile(now):
            return
        due: dict[str, list[_Order]] = {}
        for coid in self._unknown:
            order = self._orders.get(coid)
            if order is None or order.reconciling or now < order.next_reconcile_ns:
                continue
            due.setdefault(order.symbol, []).append(order)
        singles: list[_Order] = []
        for symbol, group in due.items():
            fresh = [o for o in group if not o.bulk_checked]
            singles.extend(o for o in group if o.bulk_checked)
            if len(fresh) < self.config.reconcile_bulk_min or not symbol:
                singles.extend(fresh)
                continue
            if self._refill_budget(now) < WEIGHT_OPEN_ORDERS_SYMBOL:
                break
            self._budget -= WEIGHT_OPEN_ORDERS_SYMBOL
            for o in fresh:
                o.reconciling = True
            self.metrics["reconcile_requests"] += 1
            assert self._primary is not None
            self._request(
                self._conns[self._primary],
                "openOrders.status",
                {"symbol": symbol},
                "bulk",
                tag=tuple(o.coid for o in fresh),
            )
        singles.sort(key=lambda o: o.next_reconcile_ns)  # longest waiting first
        for order in singles:
            if self._refill_budget(now) < WEIGHT_ORDER_STATUS:
                break
            self._budget -= WEIGHT_ORDER_STATUS
            self._query_one(order)

    def _table_full(self) -> bool:
        """True if the order table has no room even after forgetting final orders (oldest
        first, down to 90 % of ``max_orders``). A table full of live orders is re-scanned at
        most once a second, so refusing orders stays cheap."""
        cap = self.config.max_orders
        if len(self._orders) < cap:
            return False
        now = self._now()
        if now < self._next_prune_ns:
            return True
        excess = len(self._orders) - int(cap * 0.9)
        for coid in [c for c, o in self._orders.items() if o.status in FINAL][:excess]:
            del self._orders[coid]
        if len(self._orders) < cap:
            return False
        self._next_prune_ns = now + 1_000_000_000
        self.metrics["orders_table_full"] += 1
        self._rl.warning("orders_table_full", f"order table full: {cap} live orders")
        return True

    def _add_order(self, order: _Order) -> None:
        self._orders[order.coid] = order

    def _request_failed(self, p: _Pending, code: int, *, unknown: bool) -> None:
        """A request that will never be answered (connection gone or deadline passed)."""
        if p.kind == "ping":
            conn = self._conns.get(p.conn)
            if conn is not None:
                conn.json_ping_rid = None
            return
        if p.kind in ("place", "modify"):
            order = self._orders.get(p.new_coid or p.coid)
            if order is not None and order.status is OrderStatus.PENDING:
                self._make_unknown(order, code)
            old = self._orders.get(p.coid) if p.kind == "modify" else None
            if old is not None:
                self._make_unknown(old, code)
        elif p.kind == "cancel":
            order = self._orders.get(p.coid)
            if order is not None:
                self._make_unknown(order, code)
        elif p.kind == "reconcile":
            order = self._orders.get(p.coid)
            if order is not None:
                self._reconcile_failed(order)
        elif p.kind == "bulk":
            for c in p.tag:
                order = self._orders.get(c)
                if order is not None and order.reconciling:
                    self._reconcile_failed(order)
        elif p.kind == "time":
            self._fail_resync_waiters(p.conn, code)
        elif p.kind == "status":
            self._updates.append(
                ExecUpdate(
                    p.coid,
                    ExecKind.STATUS,
                    OrderStatus.UNKNOWN,
                    error_code=code,
                    client_id=p.tag or 0,
                )
            )
        elif p.kind == "generic":
            self._updates.append(ApiReply(p.tag, Response(None, 503, None, _local_error(code))))

    # ---- user data -----------------------------------------------------------------------

    def _on_event(self, conn: _Conn, msg: StreamEvent) -> None:
        recv = self.clock.time_ns()
        try:
            ev = ud.parse_event(msg.event, recv)
        except ud.UserDataError as exc:
            self.metrics["protocol_errors"] += 1
            log.warning("bad user data event: %s", exc, extra={"event": "protocol_error"})
            return
        if isinstance(ev, ud.ServerShutdown):
            log.info("serverShutdown received", extra={"event": "server_shutdown"})
            if conn.id == self._primary:
                self._rollover_wanted = True
                self._rollover_retry_at = 0
            return
        if conn.id != self._primary:
            return  # user data only from the primary: no duplicates during a rollover
        self.metrics["user_data_events"] += 1
        if isinstance(ev, ud.StreamTerminated):
            self.metrics["user_data_subscribed"] = 0
            conn.subscribed = False
            if self.ready:
                self._request(conn, "userDataStream.subscribe", {}, "subscribe")
            return
        if isinstance(ev, ud.ExecutionReport):
            self._on_execution_report(ev)

    def _on_execution_report(self, ev: ud.ExecutionReport) -> None:
        order = self._orders.get(ev.order_key) or self._orders.get(ev.client_order_id)
        if order is None:
            return  # not ours (web UI, another process on the same account)
        was_unknown = order.status is OrderStatus.UNKNOWN
        late = order.status is OrderStatus.REJECTED and order.was_unknown
        self._apply(order, ev.status, ev.order_id, ev.cum_qty, ev.cum_quote)
        kind = _EXEC_KIND.get(ev.exec_type, ExecKind.STATUS)
        if was_unknown:
            self.metrics["orders_reconciled"] += 1
            kind = ExecKind.RECONCILED if kind in (ExecKind.NEW, ExecKind.STATUS) else kind
        if late:
            self.metrics["orders_late"] += 1
            log.warning(
                "late report for an order reported not found", extra={"event": "order_late"}
            )
        self._emit(
            order,
            kind,
            last_qty=ev.last_qty,
            last_price=ev.last_price,
            event_time_ns=ev.event_time_ns,
        )


def _local_error(code: int) -> ApiError:
    return ApiError(code, ERROR_TEXT.get(code, ""))
