"""The trading process: a thin asyncio shell around :class:`pipeline.session.Session`.

It owns what the session must not: WebSocket connections (the ``websockets`` client, ping
frames via ``ws.ping()``), timers, signals, the shared-memory order/exec rings and the metrics
block. It does nothing clever: every decision is the session's (see its docstring for the
state table, retry policy and the no-duplicate-order rules).

Shared memory it owns (names are constants so other processes can find them):

- :data:`METRICS_NAME` ``pipeline.trading.metrics`` - a :class:`pipeline.metrics.MetricsBlock`
  with :data:`METRICS_FIELDS` (``pipeline health`` reads it). ``state`` is
  :class:`pipeline.session.State` (0 Disconnected, 1 Connecting, 2 Authenticating, 3 Ready,
  4 Reconnecting, 5 Failed); ``*_ns`` fields are wall-clock ns; ``last_error_code`` is a
  Binance code (< 0) or a ``LOCAL_*`` code of :mod:`pipeline.session` (-9xxx).
- :data:`pipeline.orders.EXEC_RING` ``pipeline.trading.exec`` - the execution ring.
- It reads every ``pipeline.orders.<client>`` order ring (:class:`pipeline.orders.OrderIntake`).

Exit codes: 0 after SIGTERM/SIGINT (segments unlinked), 3 when the exchange rejected the
logon (wrong key: not retried), 4 after ``max_attempts`` failed reconnects. After a failure the
metrics block is left in place (state FAILED, writer dead) so ``pipeline health`` reports it; a
restarted process replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from pipeline.metrics import MetricsBlock
from pipeline.orders import EXEC_DTYPE, EXEC_RING, Action, OrderIntake, exec_record
from pipeline.ring import RingWriter
from pipeline.session import (
    FLOAT_METRICS,
    METRIC_FIELDS,
    ApiReply,
    Close,
    ExecUpdate,
    Exit,
    Open,
    Ping,
    Send,
    Session,
    SessionConfig,
    State,
)

log = logging.getLogger("pipeline.trading")
# The websockets library logs every frame at DEBUG, session.logon (with its signature)
# included. Its logger for our connections is pinned at INFO so no log level can leak one.
_ws_log = logging.getLogger("pipeline.trading.websockets")
_ws_log.setLevel(logging.INFO)

METRICS_NAME = "pipeline.trading.metrics"
# Session metrics (see pipeline.session.METRIC_FIELDS) plus the shell's own.
SHELL_FIELDS: tuple[str, ...] = ("order_rings", "exec_published", "orders_stale", "pid")
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
    extra: dict[str, Any] = field(default_factory=dict)


class _Conn:
    __slots__ = ("id", "outbox", "tasks", "ws")

    def __init__(self, conn_id: int) -> None:
        self.id = conn_id
        self.ws: Any = None
        self.outbox: asyncio.Queue[str] = asyncio.Queue()
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
        self.session.on_transition = self._on_transition

    def _on_transition(self, old: State, new: State, event: str) -> None:
        self._dirty = True  # health readers must see every state change promptly

    # ---- public -----------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    @property
    def exit_reason(self) -> str:
        return self._exit_reason

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
        self._intake = OrderIntake(
            start_time_ns=time.time_ns(), max_order_age_s=self.config.max_order_age_s
        )
        self._metrics.set(pid=__import__("os").getpid())
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        tasks = [
            asyncio.create_task(self._timer_loop(), name="trading-timers"),
            asyncio.create_task(self._order_loop(), name="trading-orders"),
        ]
        try:
            self.session.start()
            self._pump()
            await self._stop.wait()
        finally:
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
            if self.session.state is State.FAILED and self.config.keep_metrics_on_failure:
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
                    conn.outbox.put_nowait(action.text)
            elif isinstance(action, Open):
                conn = _Conn(action.conn)
                self._conns[conn.id] = conn
                conn.tasks.append(asyncio.create_task(self._connect(conn)))
            elif isinstance(action, Ping):
                conn = self._conns.get(action.conn)
                if conn is not None and conn.ws is not None:
                    conn.tasks.append(asyncio.create_task(self._ping(conn)))
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
        self._wake.set()

    def _publish(self, updates: list[ExecUpdate | ApiReply]) -> None:
        now = time.time_ns()
        recs = [exec_record(u, now) for u in updates if isinstance(u, ExecUpdate)]
        self._replies.extend(u for u in updates if isinstance(u, ApiReply))
        del self._replies[:-100]
        if recs and self._exec is not None:
            self._exec.publish_many(np.array(recs, dtype=EXEC_DTYPE))
            self._published += len(recs)

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
            values["order_rings"] = len(self._intake.readers)
            values["orders_stale"] = self._intake.stale
        m.set(**{k: (float(v) if k in FLOAT_METRICS else int(v)) for k, v in values.items()})

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
        conn.tasks.append(asyncio.create_task(self._reader(conn)))
        conn.tasks.append(asyncio.create_task(self._writer(conn)))
        self.session.connected(conn.id)
        self._pump()

    async def _reader(self, conn: _Conn) -> None:
        from websockets.exceptions import ConnectionClosed

        reason = "closed"
        try:
            async for msg in conn.ws:
                self.session.frame_received(conn.id, msg)
                self._pump()
        except ConnectionClosed as exc:
            reason = f"closed by peer ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:200]
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
        except Exception as exc:
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
            timeout = min(timeout if timeout is not None else 1.0, 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            s.tick()
            self._pump()
            self._flush_metrics(force=False)
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

    def _execute(self, cmd: Any) -> None:
        s = self.session
        if cmd.action is Action.PLACE:
            s.place(
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
        elif cmd.action is Action.CANCEL:
            s.cancel(cmd.client_order_id, cmd.symbol or None, client_id=cmd.client_id)
        elif cmd.action is Action.MODIFY:
            s.modify(
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
        elif cmd.action is Action.STATUS:
            s.query(cmd.client_order_id, cmd.symbol or None, client_id=cmd.client_id)
