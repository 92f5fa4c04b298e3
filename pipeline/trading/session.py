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
5. Submit orders with ``place`` / ``cancel`` / ``modify`` / ``amend`` / ``query``; results
   come back as :class:`ExecUpdate` from :meth:`Session.updates`.

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
  Lossless handover: user data is accepted from every connection, the replaced one included
  for ``handover_grace_s`` after the promotion (a fill the venue sent it before the standby
  subscribed is still on its way), and an executionReport seen twice is delivered once:
  de-duplicated by (orderId, execution id ``I``) while more than one connection is open
  (counted in ``user_data_duplicates``). A report without ``I`` is accepted from the primary
  only, as before.
- Order semantics (7.2): ``amend`` is order.amend.keepPriority (quantity down, priority kept,
  the client id re-sent so it stays the order's), ``modify`` is order.cancelReplace; cancels
  go by ``orderId`` once known; new orders ask ``newOrderRespType=RESULT``. See
  :mod:`pipeline.trading.orderentry`.
- ``orders_in_doubt`` is the gauge of orders UNKNOWN now (``orders_unknown_now`` is its older
  name, kept for existing readers); ``orders_unknown`` counts every time one became UNKNOWN.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from pipeline.backoff import Backoff
from pipeline.binance import userdata as ud
from pipeline.binance.signing import Signer
from pipeline.binance.wsapi import (
    ProtocolError,
    RequestBuilder,
    Response,
    StreamEvent,
    decode_frame,
)
from pipeline.logs import RateLimitedLog
from pipeline.trading.connections import ConnectionMachine
from pipeline.trading.orderentry import OrderEntry
from pipeline.trading.ordertable import OrderTable, TrackedOrder
from pipeline.trading.reconcile import (  # re-exported: callers name them from here
    WEIGHT_OPEN_ORDERS_SYMBOL as WEIGHT_OPEN_ORDERS_SYMBOL,
)
from pipeline.trading.reconcile import WEIGHT_ORDER_STATUS as WEIGHT_ORDER_STATUS
from pipeline.trading.reconcile import Reconciler
from pipeline.trading.session_types import (  # re-exported: callers name them from here
    ERROR_TEXT as ERROR_TEXT,
)
from pipeline.trading.session_types import EXIT_AUTH as EXIT_AUTH
from pipeline.trading.session_types import EXIT_GAVE_UP as EXIT_GAVE_UP
from pipeline.trading.session_types import EXIT_OK as EXIT_OK
from pipeline.trading.session_types import LOCAL_AMEND_LIMIT as LOCAL_AMEND_LIMIT
from pipeline.trading.session_types import LOCAL_BAD_REPLY as LOCAL_BAD_REPLY
from pipeline.trading.session_types import LOCAL_DISCONNECTED as LOCAL_DISCONNECTED
from pipeline.trading.session_types import LOCAL_DUPLICATE_ID as LOCAL_DUPLICATE_ID
from pipeline.trading.session_types import LOCAL_INVALID as LOCAL_INVALID
from pipeline.trading.session_types import LOCAL_NOT_FOUND as LOCAL_NOT_FOUND
from pipeline.trading.session_types import LOCAL_NOT_READY as LOCAL_NOT_READY
from pipeline.trading.session_types import LOCAL_OUTBOX_FULL as LOCAL_OUTBOX_FULL
from pipeline.trading.session_types import LOCAL_RATE_LIMITED as LOCAL_RATE_LIMITED
from pipeline.trading.session_types import LOCAL_TABLE_FULL as LOCAL_TABLE_FULL
from pipeline.trading.session_types import LOCAL_TIMEOUT as LOCAL_TIMEOUT
from pipeline.trading.session_types import PHASE_TRANSITIONS as PHASE_TRANSITIONS
from pipeline.trading.session_types import ROLE_TRANSITIONS as ROLE_TRANSITIONS
from pipeline.trading.session_types import SETUP_KINDS, local_error
from pipeline.trading.session_types import TRANSITIONS as TRANSITIONS
from pipeline.trading.session_types import ApiReply as ApiReply
from pipeline.trading.session_types import Clock as Clock
from pipeline.trading.session_types import Close as Close
from pipeline.trading.session_types import Connection as Connection
from pipeline.trading.session_types import ConnPhase as ConnPhase
from pipeline.trading.session_types import ConnRole as ConnRole
from pipeline.trading.session_types import Exit as Exit
from pipeline.trading.session_types import LocalProtocolError as LocalProtocolError
from pipeline.trading.session_types import Open as Open
from pipeline.trading.session_types import PendingRequest as PendingRequest
from pipeline.trading.session_types import Ping as Ping
from pipeline.trading.session_types import Send as Send
from pipeline.trading.session_types import SessionAction as SessionAction
from pipeline.trading.session_types import SessionConfig as SessionConfig
from pipeline.trading.session_types import State as State
from pipeline.trading.session_types import SystemClock as SystemClock
from pipeline.trading.wire import CLIENT_ORDER_ID_RE as CLIENT_ORDER_ID_RE
from pipeline.trading.wire import FINAL as FINAL
from pipeline.trading.wire import ExecKind as ExecKind
from pipeline.trading.wire import ExecUpdate as ExecUpdate
from pipeline.trading.wire import OrderStatus as OrderStatus

log = logging.getLogger("pipeline.session")

ReplyHandler = Callable[[Connection, PendingRequest, Response], None]
FailureHandler = Callable[[PendingRequest, int], None]

#: Upper bounds (us) of the order round-trip histogram: an order request (place, cancel,
#: modify, amend) written -> its answer received. Why a histogram in the block: the last or
#: smoothed RTT hides the tail an operator alerts on; bucket counts can be summed across
#: scrapes and processes (Prometheus histogram_quantile), a gauge cannot. The field names carry
#: the bounds, so the exporter needs no copy of this tuple.
ORDER_RTT_BUCKETS_US = (100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10_000, 30_000,
                        100_000)
ORDER_RTT_FIELDS = (*(f"order_rtt_le_{b}us" for b in ORDER_RTT_BUCKETS_US), "order_rtt_le_inf")
_ORDER_KINDS = frozenset({"place", "cancel", "modify", "amend"})

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
    "orders_in_doubt",
    "problem_unknown_orders_stale",
    "user_data_duplicates",
    "user_data_fields_skipped",
    "orders_amended",
    "reconcile_requests",
    "orders_table_full",
    *ORDER_RTT_FIELDS,  # their sum is the count: not kept twice
    "order_rtt_sum_us",
)
FLOAT_METRICS = frozenset({"rtt_us", "rtt_smoothed_us", "clock_offset_ms", "order_rtt_sum_us"})


class Session:
    """See the module docstring for the calling contract.

    A facade: the connection machine (:attr:`connections`), the order table (:attr:`table`)
    with its order entry and reconciler do the work; the session wires them, routes each
    received frame to the part that asked, and keeps the venue's rate limits and the metrics.
    Order entry and the shell's calls are bound straight to the part that does them (no
    forwarding call on the order-submit path).
    """

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
        self.metrics: dict[str, float] = {k: 0 for k in METRIC_FIELDS}
        self._rl = RateLimitedLog(log)
        self.connections = link = ConnectionMachine(
            config,
            self.clock,
            builder or RequestBuilder(config.api_key, signer, recv_window_ms=config.recv_window_ms),
            backoff or Backoff(config.backoff),
            self.metrics,
            request_failed=self._request_failed,
            primary_ready=self._primary_ready,
        )
        self.table = table = OrderTable(config, self.clock, self.metrics, self._rl)
        self.reconciler = reconciler = Reconciler(config, table, link, self._rl)
        table.reconciler = reconciler
        table.handshake = hs = link.handshake
        entry = OrderEntry(config, table, link)
        self._conns = link.conns  # the same dict, for the per-frame lookup
        # The calling contract, bound to the part that does it.
        self.start = link.start
        self.connected = link.connected
        self.connect_failed = link.connect_failed
        self.connection_lost = link.connection_lost
        self.pong = link.pong
        self.place = entry.place
        self.cancel = entry.cancel
        self.modify = entry.modify
        self.amend = entry.amend
        self.query = entry.query
        # (orderId, I) of executionReports seen while more than one connection was open
        self._seen_exec: dict[tuple[int, int], None] = {}
        # The answer to a request goes to the handler of its kind; one that will never be
        # answered to the failure handler of its kind. Built once: looked up for every reply.
        self._reply_handlers: dict[str, ReplyHandler] = {
            "time": hs.on_time,
            "logon": hs.on_logon,
            "subscribe": hs.on_subscribe,
            "ping": hs.on_ping,
            "generic": self._on_generic,
            "place": table.on_place,
            "cancel": table.on_cancel,
            "modify": table.on_modify,
            "amend": table.on_amend,
            "status": table.on_status,
            "reconcile": reconciler.on_reconcile,
            "bulk": reconciler.on_bulk,
        }
        self._failure_handlers: dict[str, FailureHandler] = {
            "time": hs.time_failed,
            "logon": _nothing_to_settle,
            "subscribe": _nothing_to_settle,
            "ping": link.json_ping_failed,
            "generic": self._generic_failed,
            "place": table.new_order_failed,
            "modify": table.new_order_failed,
            "cancel": table.cancel_failed,
            "amend": table.cancel_failed,
            "status": table.status_failed,
            "reconcile": reconciler.reconcile_request_failed,
            "bulk": reconciler.bulk_request_failed,
        }

    # ---- plumbing --------------------------------------------------------------------

    def actions(self) -> list[SessionAction]:
        link = self.connections
        out, link.actions = link.actions, []
        return out

    def updates(self) -> list[ExecUpdate | ApiReply]:
        table = self.table
        out, table.updates = table.updates, []
        return out

    @property
    def state(self) -> State:
        return self.connections.state

    @state.setter
    def state(self, state: State) -> None:
        """Bypasses :data:`TRANSITIONS`: only for tests of the shell's reaction to a state
        (``state`` was a plain attribute before the split, and they set it)."""
        self.connections.state = state

    @property
    def failure(self) -> str:
        return self.connections.failure

    @property
    def exit_code(self) -> int | None:
        return self.connections.exit_code

    @property
    def on_transition(self) -> Callable[[State, State, str], None] | None:
        return self.connections.on_transition

    @on_transition.setter
    def on_transition(self, hook: Callable[[State, State, str], None] | None) -> None:
        self.connections.on_transition = hook

    @property
    def ready(self) -> bool:
        return self.connections.ready

    @property
    def primary_conn(self) -> int | None:
        return self.connections.primary

    @property
    def queued_actions(self) -> int:
        """Actions not yet drained by :meth:`actions` (the shell's outbox check counts them:
        a batch of orders is pumped at once)."""
        return len(self.connections.actions)

    def order_status(self, coid: str) -> OrderStatus | None:
        order = self.table.orders.get(coid)
        return order.status if order else None

    def orders(self) -> dict[str, OrderStatus]:
        return {k: o.status for k, o in self.table.orders.items()}

    def order_info(self, coid: str) -> tuple[str, str] | None:
        """``(symbol, side)`` of an order this session placed (the shell's risk check needs
        them for a modify that does not restate them)."""
        order = self.table.orders.get(coid)
        return (order.symbol, order.side) if order else None

    def tracked(self, coid: str) -> TrackedOrder | None:
        """The order table's entry for ``coid`` (read only): what the shell's checks of an
        amend need (price, type, quantity, filled quantity), None if this session does not
        know the order."""
        return self.table.orders.get(coid)

    def stop(self) -> None:
        """Close everything (SIGTERM). Unanswered orders stay UNKNOWN in the final report."""
        self.connections.stop()

    def request(self, method: str, params: dict[str, Any] | None = None, tag: Any = None) -> bool:
        """Any other request (openOrders.status, openOrders.cancelAll, account.status, ...).

        The answer comes back as an :class:`ApiReply` with ``tag``.
        """
        code = self.connections.send_gate()
        if code:
            self.table.updates.append(ApiReply(tag, Response(None, 503, None, local_error(code))))
            return False
        return self.connections.send_on_primary(method, dict(params or {}), "generic", tag=tag)

    def next_deadline(self) -> int | None:
        """The monotonic ns by which :meth:`tick` must be called (None: nothing scheduled)."""
        times = self.connections.deadlines()
        if self.reconciler.unknown:
            times.append(self.reconciler.next_pass_ns)
        primary = self.connections.primary_deadlines()
        if primary is not None:
            times.extend(primary)
        return min(times) if times else None

    def tick(self) -> None:
        now = self.clock.monotonic_ns()
        self.connections.tick(now)
        self.reconciler.tick(now)

    def _primary_ready(self) -> None:
        """A primary is logged on (or promoted): what is UNKNOWN can be asked about now."""
        self.reconciler.reconcile_all()

    def _observe_order_rtt(self, ns: int) -> None:
        """One answered order request into the histogram (wall clock: a step back counts 0)."""
        us = max(0.0, ns / 1000)
        m = self.metrics
        m[ORDER_RTT_FIELDS[bisect_left(ORDER_RTT_BUCKETS_US, us)]] += 1
        m["order_rtt_sum_us"] += us

    def _request_failed(self, p: PendingRequest, code: int) -> None:
        """A request that will never be answered (connection gone or deadline passed)."""
        self._failure_handlers[p.kind](p, code)

    def _generic_failed(self, p: PendingRequest, code: int) -> None:
        self.table.updates.append(ApiReply(p.tag, Response(None, 503, None, local_error(code))))

    def _on_generic(self, conn: Connection, p: PendingRequest, msg: Response) -> None:
        if msg.code == -1021 and not p.retried:
            self.connections.handshake.resync_and_retry(p)
            return
        self.table.updates.append(ApiReply(p.tag, msg))

    # ---- receiving -----------------------------------------------------------------------

    def frame_received(self, conn_id: int, text: str | bytes) -> None:
        conn = self._conns.get(conn_id)
        if conn is None:
            return
        self.table.reply_ns = self.clock.time_ns()
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
                self.metrics["last_error_code"] = msg.code or -2015
                self.connections.fail(
                    EXIT_AUTH, f"the exchange revoked the session (code {msg.code})"
                )
            return
        p = conn.pending.pop(str(msg.id), None)
        if p is None:
            self.metrics["protocol_errors"] += 1
            log.warning("response to an unknown request id", extra={"event": "unmatched_reply"})
            return
        if p.kind in _ORDER_KINDS:
            self._observe_order_rtt(self.table.reply_ns - p.sent_wall_ns)
        if msg.error is not None:
            self.metrics["last_error_code"] = msg.error.code
        if msg.status in (418, 429) or msg.code in (-1003,):
            self._rate_limited(msg)
        try:
            self._reply_handlers[p.kind](conn, p, msg)
        except ProtocolError as exc:  # handlers parse before they change anything
            self._protocol_error(f"{p.method} answer not understood: {exc}")
            self._bad_reply(conn, p)
            return
        if conn.role is ConnRole.DRAINING and conn.id in self._conns:
            self.connections.drain_done(conn)

    def _protocol_error(self, what: str, n: int = 1) -> None:
        """Count and log (rate limited: a hostile venue must not flood the log) a remote fault."""
        self.metrics["protocol_errors"] += n
        self._rl.warning("protocol_error", f"protocol error: {what[:200]}", remote=True)

    def _bad_reply(self, conn: Connection, p: PendingRequest) -> None:
        """Settle a request whose answer we could not understand, as if it had timed out: an
        order it was about becomes UNKNOWN and is reconciled (the -1007 path)."""
        self._request_failed(p, LOCAL_BAD_REPLY)
        if conn.id not in self._conns:
            return
        if p.kind in SETUP_KINDS and conn.phase is not ConnPhase.READY:
            self.connections.drop(conn, f"{p.method} answer not understood", lost=True)
        elif conn.role is ConnRole.DRAINING:
            self.connections.drain_done(conn)

    def _track_limits(self, msg: Response) -> None:
        for rl in msg.rate_limits:
            if rl.rate_limit_type == "REQUEST_WEIGHT":
                self.metrics["weight_used"] = rl.count
                self.metrics["weight_limit"] = rl.limit
            elif rl.rate_limit_type == "ORDERS" and rl.interval == "SECOND":
                self.metrics["orders_used"] = rl.count
                self.metrics["orders_limit"] = rl.limit

    def _rate_limited(self, msg: Response) -> None:
        link = self.connections
        now = self.clock.monotonic_ns()
        retry_ms = msg.error.retry_after_ms if msg.error else None
        wait_ns: int | None = None
        if retry_ms is not None:
            wait_ns = int((retry_ms - link.timestamp_ms()) * 1e6)
            if wait_ns > self.config.max_retry_after_s * 1e9:
                # not a ban any exchange hands out: waiting it out would silence us for good
                self._protocol_error(f"retryAfter {retry_ms} is beyond max_retry_after_s")
                wait_ns = None
        if wait_ns is None:
            wait_ns = int(self.config.default_retry_after_s * 1e9)
        until = now + max(0, wait_ns)
        link.rate_limited_until_ns = max(link.rate_limited_until_ns, until)
        self.metrics["rate_limited_until_ns"] = self.clock.time_ns() + max(0, wait_ns)
        log.warning(
            "rate limited (status %d, code %s) for %.1f s",
            msg.status,
            msg.code,
            wait_ns / 1e9,
            extra={"event": "rate_limited"},
        )

    def _on_event(self, conn: Connection, msg: StreamEvent) -> None:
        recv = self.clock.time_ns()
        try:
            ev = ud.parse_event(msg.event, recv)
        except ud.UserDataError as exc:
            self.metrics["protocol_errors"] += 1
            log.warning("bad user data event: %s", exc, extra={"event": "protocol_error"})
            return
        if isinstance(ev, ud.ServerShutdown):
            log.info("serverShutdown received", extra={"event": "server_shutdown"})
            self.connections.server_shutdown(conn)
            return
        primary = conn.id == self.connections.primary
        if isinstance(ev, ud.ExecutionReport):
            if len(self._conns) > 1 or self._seen_exec:
                if not self._first_copy(ev, primary):
                    return
            elif not primary:
                return
            self.metrics["user_data_events"] += 1
            self.table.on_execution_report(ev)
            return
        if not primary:
            return  # balances, list status: the primary's copy (no id to de-duplicate by)
        self.metrics["user_data_events"] += 1
        if isinstance(ev, ud.StreamTerminated):
            self.connections.stream_terminated(conn)

    # The (orderId, I) pairs remembered across a rollover's overlap: far more reports than
    # can be in flight on two connections at once.
    SEEN_EXEC_MAX = 4096

    def _first_copy(self, ev: ud.ExecutionReport, primary: bool) -> bool:
        """True for the first copy of an executionReport while connections overlap (the
        handover): both connections carry the account's user data, each report once per
        connection. Without ``I`` there is nothing to match by: only the primary's copy."""
        if ev.exec_id < 0:
            return primary
        seen = self._seen_exec
        key = (ev.order_id, ev.exec_id)
        if key in seen:
            self.metrics["user_data_duplicates"] += 1
            return False
        if len(self._conns) <= 1:
            seen.clear()  # the overlap is over: the other copy can no longer come
            return True
        if len(seen) >= self.SEEN_EXEC_MAX:
            del seen[next(iter(seen))]
        seen[key] = None
        return True


def _nothing_to_settle(p: PendingRequest, code: int) -> None:
    """logon / subscribe: the connection they were for is dropped; nothing else waits."""
