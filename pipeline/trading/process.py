"""The trading process: a thin asyncio shell around :class:`pipeline.trading.session.Session`.

It owns what the session must not: WebSocket connections (the ``websockets`` client, ping
frames via ``ws.ping()``), timers, signals, the shared-memory order/exec rings and the metrics
block. It does nothing clever: every decision is the session's (see its docstring for the
state table, retry policy and the no-duplicate-order rules).

Shared memory it owns (names are constants so other processes can find them):

- :data:`METRICS_NAME` ``pipeline.trading.metrics`` - a :class:`pipeline.ipc.metrics.MetricsBlock`
  with :data:`METRICS_FIELDS` (``pipeline health`` reads it). ``state`` is
  :class:`pipeline.trading.session.State` (0 Disconnected, 1 Connecting, 2 Authenticating, 3 Ready,
  4 Reconnecting, 5 Failed); ``*_ns`` fields are wall-clock ns; ``last_error_code`` is a
  Binance code (< 0) or a ``LOCAL_*`` code of :mod:`pipeline.trading.session` (-9xxx).
- :data:`pipeline.trading.wire.EXEC_RING` ``pipeline.trading.exec`` - the execution ring.
- :data:`pipeline.trading.wire.REPLY_RING` ``pipeline.trading.replies`` (the exec ring's name
  with ``.exec`` replaced by ``.replies``) - JSON answers to the account-level requests (open
  orders, cancel-all, account), chunked (see :mod:`pipeline.trading.wire`).
- It reads every ``pipeline.orders.<client>`` order ring
  (:class:`pipeline.trading.intake.OrderIntake`).

systemd (``Type=notify``, ``WatchdogSec=``; :mod:`pipeline.ops.sdnotify`, no-ops outside systemd):
READY=1 when the session first reaches Ready (logged on; sent once the metrics block shows it),
STATUS= on every state change, WATCHDOG=1 from the timer loop only while healthy - Ready, or
reconnecting within the attempt budget - so a wedged event loop or a session that cannot get
back starves it, and STOPPING=1 on shutdown.

Pre-trade risk (``TradingConfig.risk_limits`` / ``pipeline trade --risk-limits NAME``): every
place and modify is checked by :class:`RiskGate` against the risk consumer's limits table
(:class:`pipeline.consumers.risk.LimitsView`) plus this process's own in-flight orders; a
refused order never reaches the exchange and is answered on the exec ring with a REJECT,
``error_code`` :data:`pipeline.trading.wire.LOCAL_RISK` and ``error_msg`` naming the limit.

Exit codes: 0 after SIGTERM/SIGINT (segments unlinked), 3 when the exchange rejected the
logon (wrong key: not retried), 4 after ``max_attempts`` failed reconnects, :data:`EXIT_CRASH`
(70) when any long-lived task (timers, order intake, a connection's reader/writer) died of an
exception: the traceback is logged and the process ends rather than live on half dead (no
pings, no timeouts, no reconnects while the block still says READY); the supervisor or systemd
restarts it. After a failure or a crash the metrics block is left in place (writer dead) so
``pipeline health`` reports it; a restarted process replaces it.

Heartbeat: the timer loop wakes at least every ``heartbeat_interval_s`` (1 s) even when idle
(one timer, no polling) and writes the metrics block each time; the block publishes
``heartbeat_interval_ms`` so ``pipeline health`` can call a block that stopped moving stale.

 Bounds: each connection's outbox holds at most ``outbox_capacity`` (4096) frames. Orders,
cancels and queries are refused locally (:data:`pipeline.trading.session.LOCAL_OUTBOX_FULL`)
once fewer than :data:`OUTBOX_RESERVE` (64) slots are left, which keeps room for pings and
reconciliation; a frame that still finds it full means the connection is not draining: it is
dropped (its unanswered orders become UNKNOWN and are reconciled) and reopened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson

from pipeline.binance.wsapi import ApiError, Response
from pipeline.ipc.metrics import MetricsBlock, MetricsError
from pipeline.ipc.ring import RingWriter
from pipeline.logs import RateLimitedLog
from pipeline.ops import sdnotify
from pipeline.trading.intake import OrderIntake
from pipeline.trading.session import (
    ERROR_TEXT,
    FLOAT_METRICS,
    LOCAL_INVALID,
    LOCAL_OUTBOX_FULL,
    METRIC_FIELDS,
    ApiReply,
    Close,
    ExecKind,
    ExecUpdate,
    Exit,
    Open,
    OrderStatus,
    Ping,
    Send,
    Session,
    SessionConfig,
    State,
)
from pipeline.trading.wire import (
    EXEC_DTYPE,
    EXEC_RING,
    LOCAL_REPLY_TOO_LARGE,
    LOCAL_RISK,
    MAX_REPLY_BYTES,
    ORDER_RING_PREFIX,
    REPLY_CAPACITY,
    REPLY_CHUNK,
    REPLY_DTYPE,
    REQUEST_METHODS,
    OrderAction,
    exec_record,
    reply_records,
    reply_ring_for,
)

log = logging.getLogger("pipeline.trading")
# The websockets library logs every frame at DEBUG, session.logon (with its signature)
# included. Its logger for our connections is pinned at INFO so no log level can leak one.
_ws_log = logging.getLogger("pipeline.trading.websockets")
_ws_log.setLevel(logging.INFO)

METRICS_NAME = "pipeline.trading.metrics"
EXIT_CRASH = 70  # EX_SOFTWARE: a long-lived task died of an exception (a bug, or worse)
OUTBOX_RESERVE = 64  # outbox slots kept for pings and reconciliation when refusing orders
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
# Session metrics (see pipeline.session.METRIC_FIELDS) plus the shell's own.
SHELL_FIELDS: tuple[str, ...] = (
    "order_rings",
    "exec_published",
    "orders_stale",
    "pid",
    "orders_risk_rejected",
    "risk_inflight",
    "replies_sent",
    "heartbeat_interval_ms",
    "exec_sanitized",
    "outbox_full_rejects",
    # pipeline.trading.intake.OrderIntake.metrics(): what the shm intake refused, reaped or dropped
    "orders_bad",
    "order_rings_reaped",
    "order_rings_refused",
    "problem_untrusted_order_rings",
    "problem_order_rings_shrunk",
)
METRICS_FIELDS: list[tuple[str, str]] = [
    (name, "<f8" if name in FLOAT_METRICS else "<i8") for name in METRIC_FIELDS
] + [(name, "<i8") for name in SHELL_FIELDS]


@dataclass
class TradingConfig:
    url: str
    session: SessionConfig
    exec_ring: str = EXEC_RING
    exec_capacity: int = 1 << 14
    metrics_name: str = METRICS_NAME
    scan_interval_s: float = 0.5
    poll_interval_s: float = 0.0005
    max_order_age_s: float = 5.0
    open_timeout_s: float = 10.0
    metrics_interval_s: float = 0.05
    keep_metrics_on_failure: bool = True
    order_prefix: str = ORDER_RING_PREFIX
    reply_ring: str | None = None  # default: reply_ring_for(exec_ring)
    reply_capacity: int = REPLY_CAPACITY
    # Pre-trade risk: the limits table's name (None: no check), its max age, and the name the
    # risk consumer's reader has on the exec ring (to know which of our orders it has seen).
    risk_limits: str | None = None
    risk_max_age_s: float = 5.0
    risk_reader: str = "risk"
    risk_observe_interval_s: float = 0.01
    heartbeat_interval_s: float = 1.0  # metrics block written at least this often, even idle
    outbox_capacity: int = 4096  # frames queued per connection (see the module docstring)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _InFlight:
    symbol: str
    side: str
    qty: float
    exec_seq: int | None = None  # exec ring cursor once its first record was published
    seen_ns: int | None = None  # wall clock when the risk reader was seen past exec_seq


class RiskGate:
    """The pre-trade check: the risk consumer's limits table plus our own in-flight orders.

    Why the in-flight part: the table is built by another process from the exec ring, so it
    lags. Two orders sent back to back would both be checked against a table that knows
    neither, and together could breach a limit neither breaches alone. So an order that passed
    is also counted here, as a working order on its side, until the risk process has provably
    taken it into the table: its reader on the exec ring (``risk_reader``) was seen past the
    order's first execution record at time *t* (:meth:`observe`), and a table published after
    *t* is in hand. Until then it may be counted twice: a false reject near a limit is possible,
    a false accept is not. If the risk process never reads the exec ring, nothing is retired
    and orders are refused once the in-flight set is full: that is the fail-closed answer to a
    risk process whose positions cannot be right.

    Fails closed like :class:`LimitsView`: no table, dead writer or stale table -> refused
    (``risk_unavailable`` / ``risk_stale``). A restarted risk process (a new segment under the
    same name) is re-attached, at most every ``retry_s``.
    """

    def __init__(
        self,
        name: str,
        *,
        max_age_s: float = 5.0,
        attach: Any = None,
        now_ns: Any = time.time_ns,
        monotonic: Any = time.monotonic,
        retry_s: float = 0.5,
        max_inflight: int = 10_000,
    ) -> None:
        from pipeline.consumers.risk import LimitsView, check_order, field_name

        if attach is None:
            attach = LimitsView.attach
        self._check_order = check_order
        self._field_name = field_name
        self.name = name
        self.max_age_s = max_age_s
        self.retry_s = retry_s
        self.max_inflight = max_inflight
        self._attach = attach
        self._now_ns = now_ns
        self._mono = monotonic
        self._view: Any = None
        self._next_attach = 0.0
        # Why the last attach failed ("not found", or the trust rule's refusal: a FIFO, another
        # uid's file), so a refused order names the real cause instead of "not found".
        self._unavailable = "not found"
        self.inflight: dict[str, _InFlight] = {}

    def _get_view(self) -> Any:
        view = self._view
        if view is not None and view.block.writer_alive():
            return view
        now = self._mono()
        if now < self._next_attach:
            return view
        self._next_attach = now + self.retry_s
        try:
            new = self._attach(self.name, self.max_age_s)
        except (MetricsError, OSError, ValueError) as exc:
            reason = "not found" if isinstance(exc, FileNotFoundError) else str(exc)
            if reason != self._unavailable:
                log.warning("risk limits table unavailable: %s", reason,
                            extra={"event": "risk_unavailable", "table": self.name})  # fmt: skip
            self._unavailable = reason
            return view
        if view is not None:
            view.close()
        self._view = new
        return new

    def check(self, symbol: str, side: str, qty: float, price: float = 0.0) -> str | None:
        """None if the order may go out, else the reason (it names the limit)."""
        field_name = self._field_name
        view = self._get_view()
        if view is None:
            if self._unavailable == "not found":
                return f"risk_unavailable: limits table {self.name} not found"
            return f"risk_unavailable: {self._unavailable}"
        if not view.block.writer_alive():
            return "risk_unavailable: the risk process is not running"
        snap = dict(view.block.snapshot())
        updated = int(snap.get("updated_ns", 0))
        age = (self._now_ns() - updated) / 1e9
        if age > self.max_age_s:
            return f"risk_stale: limits table not updated for {age:.1f}s"
        self._retire(updated)
        if len(self.inflight) >= self.max_inflight:
            return f"risk_inflight: {len(self.inflight)} orders not yet seen by the risk process"
        buy, sell = self.pending(symbol)
        if buy:
            key = field_name(symbol, "open_buy")
            snap[key] = float(snap.get(key, 0.0)) + buy
        if sell:
            key = field_name(symbol, "open_sell")
            snap[key] = float(snap.get(key, 0.0)) + sell
        reason: str | None = self._check_order(snap, symbol, side, qty, price)
        return reason

    def pending(self, symbol: str) -> tuple[float, float]:
        """In-flight (buy, sell) quantity of ``symbol`` not yet in the table."""
        buy = sell = 0.0
        for o in self.inflight.values():
            if o.symbol == symbol:
                if o.side == "BUY":
                    buy += o.qty
                else:
                    sell += o.qty
        return buy, sell

    def sent(self, coid: str, symbol: str, side: str, qty: float) -> None:
        self.inflight[coid] = _InFlight(symbol, side, qty)

    def published(self, coid: str, kind: int, status: int, exec_cursor: int) -> None:
        """An execution record for ``coid`` is in the exec ring below ``exec_cursor``."""
        o = self.inflight.get(coid)
        if o is None:
            return
        if kind == ExecKind.REJECT and status == OrderStatus.REJECTED:
            del self.inflight[coid]  # never at the exchange: no exposure to count
        elif o.exec_seq is None:
            o.exec_seq = exec_cursor

    @property
    def needs_observation(self) -> bool:
        return any(o.exec_seq is not None and o.seen_ns is None for o in self.inflight.values())

    def observe(self, risk_cursor: int | None, now_ns: int) -> None:
        """The risk reader's position on the exec ring (None: it is not attached)."""
        if risk_cursor is None:
            return
        for o in self.inflight.values():
            if o.seen_ns is None and o.exec_seq is not None and risk_cursor >= o.exec_seq:
                o.seen_ns = now_ns

    def retire(self) -> None:
        """Forget in-flight orders the current table already holds (between orders, so the
        in-flight set and ``risk_inflight`` shrink even when no order is being checked)."""
        if not any(o.seen_ns is not None for o in self.inflight.values()):
            return
        view = self._view
        if view is None or not view.block.writer_alive():
            return
        self._retire(int(view.block.snapshot().get("updated_ns", 0)))

    def _retire(self, table_updated_ns: int) -> None:
        done = [
            c
            for c, o in self.inflight.items()
            if o.seen_ns is not None and table_updated_ns > o.seen_ns
        ]
        for c in done:
            del self.inflight[c]

    def close(self) -> None:
        if self._view is not None:
            self._view.close()
            self._view = None


@dataclass(frozen=True, slots=True)
class _ReplyTag:
    """Routes a generic request's answer to the client that asked (via the reply ring)."""

    client_id: int
    request_id: str
    method: str


class _Conn:
    __slots__ = ("id", "outbox", "tasks", "ws")

    def __init__(self, conn_id: int, capacity: int) -> None:
        self.id = conn_id
        self.ws: Any = None
        self.outbox: asyncio.Queue[str] = asyncio.Queue(capacity)
        self.tasks: list[asyncio.Task[Any]] = []


class TradingProcess:
    """Run with ``exit_code = await TradingProcess(config, signer).run()``."""

    def __init__(self, config: TradingConfig, signer: Any, *, session: Session | None = None):
        self.config = config
        self.session = session or Session(config.session, signer)
        self._conns: dict[int, _Conn] = {}
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._exit_code: int | None = None
        self._exit_reason = ""
        self._exec: RingWriter | None = None
        self._metrics: MetricsBlock | None = None
        self._intake: OrderIntake | None = None
        self._last_metrics = 0.0
        self._published = 0
        self._replies: list[ApiReply] = []
        self._dirty = False
        self._reply_w: RingWriter | None = None
        self._replies_sent = 0
        self._risk = (
            RiskGate(config.risk_limits, max_age_s=config.risk_max_age_s)
            if config.risk_limits
            else None
        )
        self._risk_rejected = 0
        self._next_observe = 0.0
        self._rl = RateLimitedLog(log)
        self._notified_ready = False
        self._pending_ready = False
        self._pending_status: str | None = None
        self._watchdog = sdnotify.Watchdog()
        self._exec_sanitized = 0
        self._outbox_full_rejects = 0
        self.crashed: BaseException | None = None
        self.session.on_transition = self._on_transition

    def _on_transition(self, old: State, new: State, event: str) -> None:
        self._dirty = True  # health readers must see every state change promptly
        # systemd hears of it from _pump, after the metrics block shows the new state, so
        # "started" (READY=1) never precedes what `pipeline health` reports.
        if new is State.READY:
            self._pending_ready = not self._notified_ready
            self._pending_status = "ready: logged on"
        elif new is State.RECONNECTING:
            attempt = int(self.session.metrics["reconnect_attempts"]) + 1
            self._pending_status = f"reconnecting (attempt {attempt})"
        elif new is State.FAILED:
            self._pending_status = f"failed ({event})"
        else:
            self._pending_status = new.name.lower()

    def _notify(self) -> None:
        if self._pending_ready:
            self._pending_ready = False
            self._notified_ready = True
            sdnotify.ready(status=self._pending_status or "ready")
        elif self._pending_status:
            sdnotify.status(self._pending_status)
        self._pending_status = None

    def healthy(self) -> bool:
        """What feeds the watchdog: Ready, or getting there within the reconnect budget."""
        state = self.session.state
        if state is State.READY:
            return True
        if state in (State.CONNECTING, State.AUTHENTICATING, State.RECONNECTING):
            budget = self.config.session.backoff.max_attempts
            return budget == 0 or self.session.metrics["reconnect_attempts"] < budget
        return False

    def _feed_watchdog(self) -> None:
        self._watchdog.tick(healthy=self.healthy())

    # ---- public -----------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    @property
    def exit_reason(self) -> str:
        return self._exit_reason

    def _task(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Start a long-lived task whose death by exception ends the process (see
        :meth:`_task_done`)."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """A task died of an exception: log the traceback, stop with :data:`EXIT_CRASH`.

        Why not carry on: a dead timer task means no pings, no request deadlines and no
        reconnects while everything else looks fine; a restart is the honest answer."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        log.critical(
            "task %s died: %s: %s; exiting with %d",
            task.get_name(),
            type(exc).__name__,
            exc,
            EXIT_CRASH,
            exc_info=exc,
            extra={"event": "task_crashed", "task": task.get_name()},
        )
        if self.crashed is None:
            self.crashed = exc
            self._exit_code = EXIT_CRASH
            self._exit_reason = f"task {task.get_name()} crashed: {type(exc).__name__}: {exc}"
        self._stop.set()
        self._wake.set()

    async def run(self, *, install_signals: bool = False) -> int:
        loop = asyncio.get_running_loop()
        self._metrics = MetricsBlock.create(self.config.metrics_name, METRICS_FIELDS)
        try:
            self._exec = RingWriter.create(
                self.config.exec_ring, EXEC_DTYPE, self.config.exec_capacity
            )
        except BaseException:
            self._metrics.close()
            raise
        try:
            self._reply_w = RingWriter.create(
                self.config.reply_ring or reply_ring_for(self.config.exec_ring),
                REPLY_DTYPE,
                self.config.reply_capacity,
            )
        except BaseException:
            self._exec.close()
            self._metrics.close()
            raise
        self._intake = OrderIntake(
            start_time_ns=time.time_ns(),
            max_order_age_s=self.config.max_order_age_s,
            prefix=self.config.order_prefix,
        )
        self._metrics.set(pid=os.getpid())
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        tasks = [
            self._task(self._timer_loop(), "trading-timers"),
            self._task(self._order_loop(), "trading-orders"),
        ]
        try:
            self.session.start()
            self._pump()
            await self._stop.wait()
        finally:
            sdnotify.stopping()
            if self._exit_code is None and self.session.state is not State.FAILED:
                self.session.stop()
                self._pump()
            for t in tasks:
                t.cancel()
            for conn in list(self._conns.values()):
                self._abort(conn)
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._settle()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            self._flush_metrics(force=True)
            self._intake.close()
            self._exec.close()
            self._reply_w.close()
            if self._risk is not None:
                self._risk.close()
            failed = self.session.state is State.FAILED or self.crashed is not None
            if failed and self.config.keep_metrics_on_failure:
                # Leave the block behind (writer dead, state FAILED) so `pipeline health` can
                # say why we exited; the next start replaces it.
                self._metrics.owner = False
            self._metrics.close()
        return self._exit_code or 0

    # ---- the pump: session actions -> I/O ----------------------------------------------

    def _pump(self) -> None:
        s = self.session
        for action in s.actions():
            if isinstance(action, Send):
                conn = self._conns.get(action.conn)
                if conn is not None:
                    try:
                        conn.outbox.put_nowait(action.text)
                    except asyncio.QueueFull:
                        self._outbox_overflow(conn)
            elif isinstance(action, Open):
                conn = _Conn(action.conn, self.config.outbox_capacity)
                self._conns[conn.id] = conn
                conn.tasks.append(self._task(self._connect(conn), f"connect-{conn.id}"))
            elif isinstance(action, Ping):
                conn = self._conns.get(action.conn)
                if conn is not None and conn.ws is not None:
                    conn.tasks.append(self._task(self._ping(conn), f"ping-{conn.id}"))
            elif isinstance(action, Close):
                conn = self._conns.pop(action.conn, None)
                if conn is not None:
                    self._abort(conn)
            elif isinstance(action, Exit):
                self._exit_code = action.code
                self._exit_reason = action.reason
                self._stop.set()
        updates = s.updates()
        if updates:
            self._publish(updates)
        self._flush_metrics(force=False)
        if self._pending_status is not None:
            self._notify()
        self._wake.set()

    def _outbox_overflow(self, conn: _Conn) -> None:
        """A frame found the outbox full: the connection is not draining. Drop it (its
        unanswered requests become UNKNOWN / failed in the session) and let it reconnect."""
        self._rl.warning(
            "outbox_full",
            f"outbox of connection {conn.id} full ({self.config.outbox_capacity} frames): "
            "dropping the connection",
        )
        if self._conns.pop(conn.id, None) is not None:
            self.session.connection_lost(conn.id, "outbox full: connection not draining")
            self._abort(conn)

    def _outbox_busy(self) -> bool:
        """True if new orders must be refused: the primary's outbox is nearly full."""
        primary = self.session.primary_conn
        conn = self._conns.get(primary) if primary is not None else None
        if conn is None:
            return False  # the session itself answers "not ready"
        queued = conn.outbox.qsize() + self.session.queued_actions
        return queued >= self.config.outbox_capacity - OUTBOX_RESERVE

    def _exec_array(self, execs: list[ExecUpdate], now: int) -> np.ndarray:
        """The exec records for ``execs``. One record that does not fit the dtype (a number
        out of range: a bug, since the decoders validate) must not keep the others out: it is
        published with its numbers zeroed and the error text saying so, and counted."""
        try:
            return np.array([exec_record(u, now) for u in execs], dtype=EXEC_DTYPE)
        except (OverflowError, ValueError, TypeError):
            pass
        out = np.zeros(len(execs), dtype=EXEC_DTYPE)
        for i, u in enumerate(execs):
            try:
                out[i] = exec_record(u, now)
            except (OverflowError, ValueError, TypeError):
                self._exec_sanitized += 1
                self._rl.warning(
                    "exec_sanitized",
                    "execution record with an out-of-range number published sanitized",
                    client_order_id=u.client_order_id[:40],
                )
                out[i] = exec_record(
                    ExecUpdate(
                        u.client_order_id,
                        u.kind,
                        u.status,
                        symbol=u.symbol,
                        side=u.side,
                        client_id=u.client_id,
                        error_code=LOCAL_INVALID,
                        error_msg="record sanitized: number out of range",
                    ),
                    now,
                )
        return out

    def _publish(self, updates: list[ExecUpdate | ApiReply]) -> None:
        now = time.time_ns()
        execs = [u for u in updates if isinstance(u, ExecUpdate)]
        for u in updates:
            if isinstance(u, ApiReply):
                if isinstance(u.tag, _ReplyTag):
                    self._send_reply(u.tag, u.response)
                else:
                    self._replies.append(u)
        del self._replies[:-100]
        if execs and self._exec is not None:
            recs = self._exec_array(execs, now)
            self._exec.publish_many(recs)
            self._published += len(recs)
            if self._risk is not None:
                cursor = self._exec.cursor
                for u in execs:
                    self._risk.published(u.client_order_id, u.kind, u.status, cursor)

    def _send_reply(self, tag: _ReplyTag, resp: Response) -> None:
        """An account-level answer, as chunked JSON on the reply ring (see trading.wire)."""
        if self._reply_w is None:
            return
        err = resp.error
        body: dict[str, Any] = {
            "request_id": tag.request_id,
            "method": tag.method,
            "ok": resp.ok,
            "status": resp.status,
            "result": resp.result,
            "error": {"code": err.code, "msg": err.msg} if err else None,
        }
        try:
            payload = orjson.dumps(body)
        except TypeError:  # not JSON-able (cannot happen for parsed JSON): say so
            body.update(result=None, error={"code": LOCAL_INVALID, "msg": "unencodable reply"})
            payload = orjson.dumps(body)
        limit = min(MAX_REPLY_BYTES, self.config.reply_capacity * REPLY_CHUNK // 4)
        if len(payload) > limit:
            msg = f"reply of {len(payload)} bytes exceeds the {limit}-byte limit; ask per symbol"
            body.update(ok=False, result=None, error={"code": LOCAL_REPLY_TOO_LARGE, "msg": msg})
            payload = orjson.dumps(body)
            self._rl.warning("reply_too_large", msg, method=tag.method)
        self._reply_w.publish_many(reply_records(tag.client_id, tag.request_id, payload))
        self._replies_sent += 1

    def _flush_metrics(self, *, force: bool) -> None:
        m = self._metrics
        if m is None:
            return
        now = time.monotonic()
        if (
            not force
            and not self._dirty
            and now - self._last_metrics < self.config.metrics_interval_s
        ):
            return
        self._last_metrics = now
        self._dirty = False
        values: dict[str, float] = dict(self.session.metrics)
        values["exec_published"] = self._published
        if self._intake is not None:
            values.update(self._intake.metrics())
        values["orders_risk_rejected"] = self._risk_rejected
        values["risk_inflight"] = len(self._risk.inflight) if self._risk is not None else 0
        values["replies_sent"] = self._replies_sent
        values["heartbeat_interval_ms"] = int(self.config.heartbeat_interval_s * 1000)
        values["exec_sanitized"] = self._exec_sanitized
        values["outbox_full_rejects"] = self._outbox_full_rejects
        m.set(**{k: _metric(k, v) for k, v in values.items()})

    # ---- connections ---------------------------------------------------------------------

    async def _connect(self, conn: _Conn) -> None:
        from websockets.asyncio.client import connect

        host = urlsplit(self.config.url).hostname or ""
        kwargs: dict[str, Any] = {}
        if host in ("127.0.0.1", "localhost", "::1"):
            kwargs["proxy"] = None
        try:
            ws = await connect(
                self.config.url,
                ping_interval=None,
                ping_timeout=None,
                compression=None,
                open_timeout=self.config.open_timeout_s,
                close_timeout=1.0,
                max_size=1 << 24,
                logger=_ws_log,
                **kwargs,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every connect failure is the session's to classify
            if conn.id in self._conns:
                self._conns.pop(conn.id, None)
                self.session.connect_failed(conn.id, f"{type(exc).__name__}: {exc}"[:200])
                self._pump()
            return
        if conn.id not in self._conns:  # closed while connecting
            ws.transport.abort()
            return
        conn.ws = ws
        conn.tasks.append(self._task(self._reader(conn), f"reader-{conn.id}"))
        conn.tasks.append(self._task(self._writer(conn), f"writer-{conn.id}"))
        self.session.connected(conn.id)
        self._pump()

    async def _reader(self, conn: _Conn) -> None:
        from websockets.exceptions import ConnectionClosed

        reason = "closed"
        while True:
            # Only the socket's errors mean "connection lost". An exception from the session
            # or the shell below is a bug: it ends this task and so the process (_task_done).
            try:
                msg = await conn.ws.recv()
            except ConnectionClosed as exc:
                reason = f"closed by peer ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"[:200]
                break
            self.session.frame_received(conn.id, msg)
            self._pump()
        if conn.id in self._conns:
            self._conns.pop(conn.id, None)
            self.session.connection_lost(conn.id, reason)
            self._pump()
            self._abort(conn)

    async def _writer(self, conn: _Conn) -> None:
        try:
            while True:
                text = await conn.outbox.get()
                await conn.ws.send(text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket's: send failed
            if conn.id in self._conns:
                self._conns.pop(conn.id, None)
                self.session.connection_lost(conn.id, f"send failed: {type(exc).__name__}")
                self._pump()
                self._abort(conn)

    async def _ping(self, conn: _Conn) -> None:
        try:
            waiter = await conn.ws.ping()
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception:
            return  # the reader sees the closed connection
        if conn.id in self._conns:
            self.session.pong(conn.id)
            self._pump()

    def _abort(self, conn: _Conn) -> None:
        """Kill a connection at once: a black-holed peer would never finish a close handshake."""
        current = asyncio.current_task()
        for t in conn.tasks:
            if t is not current:
                t.cancel()
        if conn.ws is not None:
            with contextlib.suppress(Exception):
                conn.ws.transport.abort()

    async def _settle(self) -> None:
        """Let aborted connections' tasks finish so nothing is left pending at exit."""
        pending = [t for c in self._conns.values() for t in c.tasks]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.sleep(0)

    # ---- timers and order intake ---------------------------------------------------------

    async def _timer_loop(self) -> None:
        s = self.session
        while not self._stop.is_set():
            deadline = s.next_deadline()
            self._wake.clear()
            timeout = None
            if deadline is not None:
                timeout = max(0.0, (deadline - s.clock.monotonic_ns()) / 1e9)
            cap = self.config.heartbeat_interval_s
            if self._watchdog.enabled and self._watchdog.interval_s is not None:
                cap = min(cap, self._watchdog.interval_s / 2)
            timeout = min(timeout if timeout is not None else cap, cap)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            s.tick()
            self._pump()
            # the heartbeat: written on every wake-up at least once per interval, even idle
            self._flush_metrics(
                force=time.monotonic() - self._last_metrics >= self.config.heartbeat_interval_s / 2
            )
            self._feed_watchdog()
            # prune finished tasks
            for conn in self._conns.values():
                conn.tasks = [t for t in conn.tasks if not t.done()]

    async def _order_loop(self) -> None:
        intake = self._intake
        assert intake is not None
        next_scan = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_scan:
                intake.scan()
                next_scan = now + self.config.scan_interval_s
            if self._risk is not None and self._risk.inflight and now >= self._next_observe:
                self._next_observe = now + self.config.risk_observe_interval_s
                if self._risk.needs_observation:
                    self._observe_risk()
                self._risk.retire()
            cmds, rejects = intake.poll(time.time_ns())
            if rejects:
                self._publish(list(rejects))
            for cmd in cmds:
                self._execute(cmd)
            if cmds or rejects:
                self._pump()
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(self.config.poll_interval_s)

    def _observe_risk(self) -> None:
        """Where the risk consumer's exec-ring reader is (see :class:`RiskGate`)."""
        from pipeline.ipc.ring import RingError, ring_stats

        assert self._risk is not None
        try:
            stats = ring_stats(self.config.exec_ring)
        except (RingError, OSError):
            return
        cursors = [r["cursor"] for r in stats["readers"] if r["name"] == self.config.risk_reader]
        self._risk.observe(min(cursors) if cursors else None, time.time_ns())

    def _risk_refused(self, cmd: Any, symbol: str, side: str) -> bool:
        """Run the pre-trade check; on a refusal publish the REJECT and return True."""
        if self._risk is None:
            return False
        reason = self._risk.check(symbol, side, cmd.qty, cmd.price)
        if reason is None:
            return False
        self._risk_rejected += 1
        self._dirty = True
        self._rl.warning(
            "risk_reject",
            f"order refused by risk: {reason}",
            client_order_id=cmd.client_order_id,
            symbol=symbol,
        )
        self._answer_locally(cmd, ExecKind.REJECT, OrderStatus.REJECTED, LOCAL_RISK, reason,
                             symbol=symbol, side=side)  # fmt: skip
        return True

    def _refuse_busy(self, cmd: Any) -> None:
        """Answer a command locally because the outbox is nearly full (never queue it)."""
        self._outbox_full_rejects += 1
        self._dirty = True
        self._rl.warning("outbox_busy", "outbox nearly full: refusing orders locally")
        text = ERROR_TEXT[LOCAL_OUTBOX_FULL]
        if cmd.action in REQUEST_METHODS:
            tag = _ReplyTag(cmd.client_id, cmd.client_order_id, REQUEST_METHODS[cmd.action])
            self._send_reply(tag, Response(None, 503, None, ApiError(LOCAL_OUTBOX_FULL, text)))
            return
        kind = {
            OrderAction.CANCEL: ExecKind.CANCEL_REJECT,
            OrderAction.STATUS: ExecKind.STATUS,
        }.get(cmd.action, ExecKind.REJECT)
        order = self.session.order_status(cmd.client_order_id)
        status = OrderStatus.REJECTED if kind is ExecKind.REJECT else (order or OrderStatus.UNKNOWN)
        self._answer_locally(cmd, kind, status, LOCAL_OUTBOX_FULL, text,
                             symbol=cmd.symbol, side=cmd.side)  # fmt: skip

    def _answer_locally(
        self, cmd: Any, kind: ExecKind, status: OrderStatus, code: int, text: str, *,
        symbol: str, side: str,
    ) -> None:  # fmt: skip
        """Publish the answer to a command that never left the host (refused here)."""
        self._publish(
            [
                ExecUpdate(
                    cmd.client_order_id,
                    kind,
                    status,
                    symbol=symbol,
                    side=side,
                    price=cmd.price,
                    qty=cmd.qty,
                    error_code=code,
                    error_msg=text,
                    submit_time_ns=cmd.submit_time_ns,
                    client_id=cmd.client_id,
                )
            ]
        )

    def _execute(self, cmd: Any) -> None:
        s = self.session
        if self._outbox_busy():
            self._refuse_busy(cmd)
            return
        if cmd.action is OrderAction.PLACE:
            if self._risk_refused(cmd, cmd.symbol, cmd.side):
                return
            sent = s.place(
                cmd.client_order_id,
                cmd.symbol,
                cmd.side,
                cmd.type,
                cmd.qty,
                cmd.price or None,
                cmd.tif or None,
                submit_time_ns=cmd.submit_time_ns,
                client_id=cmd.client_id,
            )
            if sent and self._risk is not None:
                self._risk.sent(cmd.client_order_id, cmd.symbol, cmd.side, cmd.qty)
        elif cmd.action is OrderAction.CANCEL:
            s.cancel(cmd.client_order_id, cmd.symbol or None, client_id=cmd.client_id)
        elif cmd.action is OrderAction.MODIFY:
            info = s.order_info(cmd.orig_client_order_id)
            symbol = cmd.symbol or (info[0] if info else "")
            side = cmd.side or (info[1] if info else "")
            if self._risk_refused(cmd, symbol, side):
                return
            sent = s.modify(
                cmd.orig_client_order_id,
                cmd.client_order_id,
                qty=cmd.qty,
                price=cmd.price or None,
                symbol=cmd.symbol or None,
                side=cmd.side or None,
                type=cmd.type or None,
                tif=cmd.tif or None,
                submit_time_ns=cmd.submit_time_ns,
                client_id=cmd.client_id,
            )
            if sent and self._risk is not None:
                self._risk.sent(cmd.client_order_id, symbol, side, cmd.qty)
        elif cmd.action is OrderAction.STATUS:
            s.query(cmd.client_order_id, cmd.symbol or None, client_id=cmd.client_id)
        elif cmd.action in REQUEST_METHODS:
            method = REQUEST_METHODS[cmd.action]
            tag = _ReplyTag(cmd.client_id, cmd.client_order_id, method)
            params: dict[str, Any] = {"symbol": cmd.symbol} if cmd.symbol else {}
            if cmd.action is OrderAction.ACCOUNT:
                params = {"omitZeroBalances": True}
            if cmd.action is OrderAction.CANCEL_ALL and not cmd.symbol:
                self._send_reply(
                    tag, Response(None, 400, None, ApiError(LOCAL_INVALID, "symbol required"))
                )
                return
            s.request(method, params, tag=tag)


def _metric(name: str, value: float) -> float:
    """A metrics value fit for its field: floats as they are, integers saturated to int64 (a
    bad number must never make the metrics write raise and kill the timer task)."""
    if name in FLOAT_METRICS:
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return 0 if math.isnan(value) else (_I64_MAX if value > 0 else _I64_MIN)
    return max(_I64_MIN, min(_I64_MAX, int(value)))
