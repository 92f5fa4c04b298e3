"""The trading process's WebSocket connections: open, read, write, ping, abort.

Why apart from the process: this is the only code that touches sockets (through
:mod:`pipeline.net.ws`, the same shell as ingest: picows by default, ``websockets`` as the
``--transport websockets`` fallback); every decision about a connection is the session's, so
all this does is turn its Open/Send/Ping/Close actions into I/O and report back what happened
(``connected``, ``frame_received``, ``pong``, ``connection_lost``, ``connect_failed``), then
let the process pump the session's answers out again.

The frame path has no task in it: a received frame goes from the library's callback straight
into the session, and a frame to send is written to the transport at once (:meth:`send`).
An exception from the session on that path is a bug, not a lost connection: it ends the
process (a task dies with it, see ``TradingProcess._task_done``).

Bounds: a frame goes to the connection's outbox instead only while the transport is backed up
(more than :data:`WRITE_HIGH_WATER` bytes not yet taken by the kernel: a peer that stopped
reading) or its writer task is gone; the outbox holds at most ``outbox_capacity`` frames;
orders are refused locally once fewer than :data:`OUTBOX_RESERVE` slots are left
(:meth:`WsConnections.busy`), and a frame that still finds it full drops the connection
(:meth:`WsConnections.overflow`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from pipeline.logs import RateLimitedLog
from pipeline.net import ws as net_ws
from pipeline.trading.session import Session

if TYPE_CHECKING:
    from pipeline.trading.process import TradingConfig

OUTBOX_RESERVE = 64  # outbox slots kept for pings and reconciliation when refusing orders
WRITE_HIGH_WATER = 256 << 10  # bytes queued in the transport before frames wait in the outbox
WRITER_RETRY_S = 0.001  # how often a backed-up writer looks at the transport again

StartTask = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[Any]"]


class WsConn:
    """One WebSocket connection of the session: its socket, outbox and tasks."""

    __slots__ = ("id", "outbox", "tasks", "writer", "ws")

    def __init__(self, conn_id: int, capacity: int) -> None:
        self.id = conn_id
        self.ws: net_ws.WsClient | None = None
        self.outbox: asyncio.Queue[str] = asyncio.Queue(capacity)
        self.tasks: list[asyncio.Task[Any]] = []
        self.writer: asyncio.Task[Any] | None = None


class WsConnections:
    """The session's connections by id (``conns``, shared with the process's pump).

    ``pump`` is the process's pump (session actions -> I/O, updates -> rings), called after
    every event handed to the session; ``start_task`` starts a long-lived task whose death by
    exception ends the process.
    """

    def __init__(
        self,
        config: TradingConfig,
        session: Session,
        *,
        pump: Callable[[], None],
        start_task: StartTask,
        rate_limited_log: RateLimitedLog,
    ) -> None:
        self.config = config
        self.session = session
        self.conns: dict[int, WsConn] = {}
        self._pump = pump
        self._task = start_task
        self._rl = rate_limited_log

    def open(self, conn_id: int) -> None:
        """The session's Open: a new connection, connecting in its own task."""
        conn = WsConn(conn_id, self.config.outbox_capacity)
        self.conns[conn.id] = conn
        conn.tasks.append(self._task(self._connect(conn), f"connect-{conn.id}"))

    def ping(self, conn_id: int) -> None:
        """The session's Ping: a ping frame, its pong reported to the session (``on_pong``)."""
        conn = self.conns.get(conn_id)
        if conn is not None and conn.ws is not None and not conn.ws.closed:
            conn.ws.ping()

    def close(self, conn_id: int) -> None:
        """The session's Close: forget the connection and kill it at once."""
        conn = self.conns.pop(conn_id, None)
        if conn is not None:
            self.abort(conn)

    def prune(self) -> None:
        """Forget finished tasks (the timer loop calls this on every wake-up)."""
        for conn in self.conns.values():
            conn.tasks = [t for t in conn.tasks if not t.done()]

    def overflow(self, conn: WsConn) -> None:
        """A frame found the outbox full: the connection is not draining. Drop it (its
        unanswered requests become UNKNOWN / failed in the session) and let it reconnect."""
        self._rl.warning(
            "outbox_full",
            f"outbox of connection {conn.id} full ({self.config.outbox_capacity} frames): "
            "dropping the connection",
        )
        if self.conns.pop(conn.id, None) is not None:
            self.session.connection_lost(conn.id, "outbox full: connection not draining")
            self.abort(conn)

    def busy(self) -> bool:
        """True if new orders must be refused: the primary's outbox is nearly full."""
        primary = self.session.primary_conn
        conn = self.conns.get(primary) if primary is not None else None
        if conn is None:
            return False  # the session itself answers "not ready"
        queued = conn.outbox.qsize() + self.session.queued_actions
        return queued >= self.config.outbox_capacity - OUTBOX_RESERVE

    def send(self, conn: WsConn, text: str) -> None:
        """The session's Send: straight to the transport, or to the outbox while it is backed
        up (see the module docstring). A full outbox drops the connection."""
        ws = conn.ws
        writer = conn.writer
        if (
            ws is not None
            and writer is not None
            and not writer.done()
            and conn.outbox.empty()
            and ws.write_buffer_size() < WRITE_HIGH_WATER
        ):
            ws.send_text(text)
            return
        try:
            conn.outbox.put_nowait(text)
        except asyncio.QueueFull:
            self.overflow(conn)

    async def _connect(self, conn: WsConn) -> None:
        try:
            ws = await net_ws.connect(
                self.config.url,
                lambda payload, _t: self._frame(conn, payload),
                transport=self.config.transport,
                ping_interval=0,  # the session times its own pings (liveness is its decision)
                ping_timeout=0,
                max_frame_size=1 << 24,
                handshake_timeout=self.config.open_timeout_s,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every connect failure is the session's to classify
            if conn.id in self.conns:
                self.conns.pop(conn.id, None)
                cause = exc.__cause__ if isinstance(exc, net_ws.WsConnectError) else None
                what = cause if cause is not None else exc
                self.session.connect_failed(conn.id, f"{type(what).__name__}: {what}"[:200])
                self._pump()
            return
        if conn.id not in self.conns:  # closed while connecting
            ws.abort()
            return
        conn.ws = ws
        ws.on_pong = lambda: self._pong(conn)
        conn.tasks.append(self._task(self._watch(conn, ws), f"reader-{conn.id}"))
        conn.writer = self._task(self._writer(conn, ws), f"writer-{conn.id}")
        conn.tasks.append(conn.writer)
        self.session.connected(conn.id)
        self._pump()

    def _frame(self, conn: WsConn, payload: bytes) -> None:
        """A received frame, from the library's callback: into the session, answers out."""
        try:
            self.session.frame_received(conn.id, payload)
            self._pump()
        except Exception as exc:  # a bug: end the process, as a dying reader task did
            self._task(_reraise(exc), f"reader-{conn.id}")

    def _pong(self, conn: WsConn) -> None:
        if conn.id in self.conns:
            self.session.pong(conn.id)
            self._pump()

    async def _watch(self, conn: WsConn, ws: net_ws.WsClient) -> None:
        """Waits for the connection to end and tells the session why."""
        info = await ws.wait_closed()
        if info.code is not None:
            reason = f"closed by peer ({info.code})"
        else:
            reason = f"closed by peer (no close frame{': ' + info.error if info.error else ''})"
        if conn.id in self.conns:
            self.conns.pop(conn.id, None)
            self.session.connection_lost(conn.id, reason[:200])
            self._pump()
            self.abort(conn)

    async def _writer(self, conn: WsConn, ws: net_ws.WsClient) -> None:
        """Empties the outbox once the transport takes frames again (idle: waits, no polling)."""
        outbox = conn.outbox
        while True:
            text = await outbox.get()
            # only while the peer is not reading: neither library offers a drain event on
            # this interface, and an idle connection never gets here
            while ws.write_buffer_size() >= WRITE_HIGH_WATER and not ws.closed:  # noqa: ASYNC110
                await asyncio.sleep(WRITER_RETRY_S)
            if ws.closed:
                return  # the watcher reports it
            ws.send_text(text)

    def abort(self, conn: WsConn) -> None:
        """Kill a connection at once: a black-holed peer would never finish a close handshake."""
        current = asyncio.current_task()
        for t in conn.tasks:
            if t is not current:
                t.cancel()
        if conn.ws is not None:
            conn.ws.abort()

    async def settle(self) -> None:
        """Let aborted connections' tasks finish so nothing is left pending at exit."""
        pending = [t for c in self.conns.values() for t in c.tasks]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.sleep(0)


async def _reraise(exc: Exception) -> None:
    raise exc
