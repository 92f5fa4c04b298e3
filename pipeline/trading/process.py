"""The trading process: a thin asyncio shell around :class:`pipeline.trading.session.Session`.

It owns what the session must not: WebSocket connections, timers, signals, the shared-memory
order/exec rings and the metrics block. It does nothing clever: every decision is the session's
(see its docstring for the state table, retry policy and the no-duplicate-order rules).

:class:`TradingProcess` holds the lifecycle, the pump (session actions -> I/O), the timer loop,
the metrics block and systemd; each other job has a collaborator of its own, so each can be
read alone: :class:`~pipeline.trading.sockets.WsConnections` (the sockets),
:class:`~pipeline.trading.dispatch.OrderDispatcher` (order rings -> checks -> session),
:class:`~pipeline.trading.answers.AnswerPublisher` (exec and reply rings),
:class:`~pipeline.trading.pretrade.PreTradeRules` (the exchangeInfo rules, fetched by a task of
their own) and :class:`~pipeline.trading.riskgate.RiskGate` (the pre-trade risk check).

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
place and modify is checked by :class:`~pipeline.trading.riskgate.RiskGate` against the risk
consumer's limits table (:class:`pipeline.consumers.risk.LimitsView`) plus this process's own
in-flight orders; a refused order never reaches the exchange and is answered on the exec ring
with a REJECT, ``error_code`` :data:`pipeline.trading.wire.LOCAL_RISK` and ``error_msg`` naming
the limit.

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
once fewer than :data:`pipeline.trading.sockets.OUTBOX_RESERVE` (64) slots are left, which
keeps room for pings and reconciliation; a frame that still finds it full means the connection
is not draining: it is dropped (its unanswered orders become UNKNOWN and are reconciled) and
reopened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from typing import Any

from pipeline.ipc.metrics import MetricsBlock
from pipeline.ipc.ring import RingWriter
from pipeline.logs import RateLimitedLog
from pipeline.ops import sdnotify
from pipeline.trading.answers import AnswerPublisher
from pipeline.trading.config import METRICS_NAME as METRICS_NAME
from pipeline.trading.config import TradingConfig as TradingConfig  # re-export: one type
from pipeline.trading.dispatch import OrderDispatcher
from pipeline.trading.encode import TemplateRequestBuilder
from pipeline.trading.intake import OrderIntake
from pipeline.trading.pretrade import METRIC_FIELDS as PRETRADE_FIELDS
from pipeline.trading.pretrade import PreTradeRules, RulesFetcher, rest_url_for
from pipeline.trading.riskgate import RiskGate
from pipeline.trading.session import (
    FLOAT_METRICS,
    METRIC_FIELDS,
    Close,
    Exit,
    Open,
    Ping,
    Send,
    Session,
    State,
)
from pipeline.trading.sockets import WsConnections
from pipeline.trading.wake import WakeChannel, wake_name_for
from pipeline.trading.wire import (
    EXEC_DTYPE,
    REPLY_DTYPE,
    reply_ring_for,
)

log = logging.getLogger("pipeline.trading")

EXIT_CRASH = 70  # EX_SOFTWARE: a long-lived task died of an exception (a bug, or worse)
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
# Session metrics (see pipeline.session.METRIC_FIELDS) plus the shell's own.
SHELL_FIELDS: tuple[str, ...] = (
    # pipeline.trading.pretrade.PreTradeRules.metrics(): the exchangeInfo rules and their use
    *PRETRADE_FIELDS,
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
    # pipeline.trading.dispatch.OrderDispatcher.metrics(): the order rings' doorbell
    "order_wakes",
    "order_wakes_foreign",
    "problem_order_wake_unavailable",
)
METRICS_FIELDS: list[tuple[str, str]] = [
    (name, "<f8" if name in FLOAT_METRICS else "<i8") for name in METRIC_FIELDS
] + [(name, "<i8") for name in SHELL_FIELDS]


class TradingProcess:
    """Run with ``exit_code = await TradingProcess(config, signer).run()``."""

    def __init__(self, config: TradingConfig, signer: Any, *, session: Session | None = None):
        self.config = config
        # requests written as text on the order path (trading/encode.py), byte-identical
        builder = TemplateRequestBuilder(
            config.session.api_key, signer, recv_window_ms=config.session.recv_window_ms
        )
        self.session = session or Session(config.session, signer, builder=builder)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._exit_code: int | None = None
        self._exit_reason = ""
        self._metrics: MetricsBlock | None = None
        self._intake: OrderIntake | None = None
        self._last_metrics = 0.0
        self._dirty = False
        self._risk = (
            RiskGate(config.risk_limits, max_age_s=config.risk_max_age_s)
            if config.risk_limits
            else None
        )
        self._rules = (
            PreTradeRules(config.rules_symbols, refresh_s=config.rules_refresh_s)
            if config.rules_refresh_s > 0
            else None
        )
        self._rl = RateLimitedLog(log)
        self._notified_ready = False
        self._pending_ready = False
        self._pending_status: str | None = None
        self._watchdog = sdnotify.Watchdog()
        self.crashed: BaseException | None = None
        # The collaborators. Their methods on the order and frame paths are bound here once,
        # so splitting the shell added no call per order or frame.
        self._answers = AnswerPublisher(config, risk=self._risk, rate_limited_log=self._rl)
        self._sockets = WsConnections(
            config, self.session, pump=self._pump, start_task=self._task, rate_limited_log=self._rl
        )
        self._orders = OrderDispatcher(
            config,
            self.session,
            answers=self._answers,
            sockets=self._sockets,
            risk=self._risk,
            pump=self._pump,
            rules=self._rules,
            mark_dirty=self._mark_dirty,
            rate_limited_log=self._rl,
        )
        self._conns = self._sockets.conns
        self._publish = self._answers.publish
        self._send = self._sockets.send
        self._execute = self._orders.execute
        self.session.on_transition = self._on_transition

    def _mark_dirty(self) -> None:
        self._dirty = True

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
            exec_writer = RingWriter.create(
                self.config.exec_ring, EXEC_DTYPE, self.config.exec_capacity
            )
        except BaseException:
            self._metrics.close()
            raise
        try:
            reply_writer = RingWriter.create(
                self.config.reply_ring or reply_ring_for(self.config.exec_ring),
                REPLY_DTYPE,
                self.config.reply_capacity,
            )
        except BaseException:
            exec_writer.close()
            self._metrics.close()
            raise
        self._answers.exec_writer = exec_writer
        self._answers.reply_writer = reply_writer
        self._intake = self._orders.intake = OrderIntake(
            start_time_ns=time.time_ns(),
            max_order_age_s=self.config.max_order_age_s,
            prefix=self.config.order_prefix,
        )
        self._orders.wake = self._open_wake() if self.config.order_wake else None
        self._metrics.set(pid=os.getpid())
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        tasks = [
            self._task(self._timer_loop(), "trading-timers"),
            self._task(self._orders.run(self._stop), "trading-orders"),
        ]
        if self._rules is not None:
            rest_url = self.config.rest_url or rest_url_for(self.config.url)
            fetcher = RulesFetcher(self._rules, rest_url)
            tasks.append(self._task(fetcher.run(self._stop), "trading-rules"))
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
                self._sockets.abort(conn)
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._sockets.settle()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            self._flush_metrics(force=True)
            self._intake.close()
            if self._orders.wake is not None:
                self._orders.wake.close()
            exec_writer.close()
            reply_writer.close()
            if self._risk is not None:
                self._risk.close()
            failed = self.session.state is State.FAILED or self.crashed is not None
            if failed and self.config.keep_metrics_on_failure:
                # Leave the block behind (writer dead, state FAILED) so `pipeline health` can
                # say why we exited; the next start replaces it.
                self._metrics.owner = False
            self._metrics.close()
        return self._exit_code or 0

    def _open_wake(self) -> WakeChannel | None:
        """The order rings' doorbell, or None (poll instead; health shows the problem)."""
        name = wake_name_for(self.config.exec_ring)
        try:
            return WakeChannel.create(name)
        except (OSError, ValueError) as exc:
            log.warning(
                "order wake channel unavailable: polling the order rings instead",
                extra={"event": "order_wake_unavailable", "segment": name, "error": str(exc)},
            )
            return None

    # ---- the pump: session actions -> I/O ----------------------------------------------

    def _pump(self) -> None:
        s = self.session
        for action in s.actions():
            if isinstance(action, Send):
                conn = self._conns.get(action.conn)
                if conn is not None:
                    self._send(conn, action.text)
            elif isinstance(action, Open):
                self._sockets.open(action.conn)
            elif isinstance(action, Ping):
                self._sockets.ping(action.conn)
            elif isinstance(action, Close):
                self._sockets.close(action.conn)
            elif isinstance(action, Exit):
                self._exit_code = action.code
                self._exit_reason = action.reason
                self._stop.set()
        updates = s.updates()
        if updates:
            if self._rules is not None:
                self._rules.note_refusals(updates)
            self._publish(updates)
        self._flush_metrics(force=False)
        if self._pending_status is not None:
            self._notify()
        self._wake.set()

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
        answers, orders = self._answers, self._orders
        values["exec_published"] = answers.published
        if self._intake is not None:
            values.update(self._intake.metrics())
        values["orders_risk_rejected"] = orders.risk_rejected
        values["risk_inflight"] = len(self._risk.inflight) if self._risk is not None else 0
        values["replies_sent"] = answers.replies_sent
        values["heartbeat_interval_ms"] = int(self.config.heartbeat_interval_s * 1000)
        values["exec_sanitized"] = answers.sanitized
        values["outbox_full_rejects"] = orders.outbox_full_rejects
        if self._rules is not None:
            values.update(self._rules.metrics())
        values.update(orders.metrics())
        m.set(**{k: _metric(k, v) for k, v in values.items()})

    # ---- timers ------------------------------------------------------------------------

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
            self._sockets.prune()


def _metric(name: str, value: float) -> float:
    """A metrics value fit for its field: floats as they are, integers saturated to int64 (a
    bad number must never make the metrics write raise and kill the timer task)."""
    if name in FLOAT_METRICS:
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return 0 if math.isnan(value) else (_I64_MAX if value > 0 else _I64_MIN)
    return max(_I64_MIN, min(_I64_MAX, int(value)))
