"""The session's connection machine: one or two WS API connections, rollover, clock and pings.

It drives the session's :class:`State` and each connection's :class:`ConnPhase` and
:class:`ConnRole` through their tables (:data:`TRANSITIONS`, :data:`PHASE_TRANSITIONS`,
:data:`ROLE_TRANSITIONS` in :mod:`pipeline.trading.session_types`), so a change not listed
is our bug (:class:`LocalProtocolError`), never a silent assignment. The replies of the
connection set-up are its :class:`pipeline.trading.handshake.Handshake`'s. It knows nothing
of orders: a request that will never be answered goes to ``request_failed`` and a primary
that became usable to ``primary_ready`` (both wired by
:class:`pipeline.trading.session.Session`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pipeline.backoff import Backoff
from pipeline.binance.wsapi import RequestBuilder
from pipeline.trading.handshake import Handshake
from pipeline.trading.session_types import (
    EXIT_GAVE_UP,
    LOCAL_DISCONNECTED,
    LOCAL_NOT_READY,
    LOCAL_RATE_LIMITED,
    LOCAL_TIMEOUT,
    SETUP_KINDS,
    TRANSITIONS,
    Clock,
    Close,
    Connection,
    ConnPhase,
    ConnRole,
    Exit,
    LocalProtocolError,
    Open,
    PendingRequest,
    Ping,
    Send,
    SessionAction,
    SessionConfig,
    State,
    SystemClock,
)

log = logging.getLogger("pipeline.session")


class ConnectionMachine:
    """Connections and rollover, the clock offset, pings and sending; see the module docstring
    of :mod:`pipeline.trading.session` for the calling contract this implements its half of."""

    def __init__(
        self,
        config: SessionConfig,
        clock: Clock,
        builder: RequestBuilder,
        backoff: Backoff,
        metrics: dict[str, float],
        *,
        request_failed: Callable[[PendingRequest, int], None],
        primary_ready: Callable[[], None],
    ) -> None:
        self.config = config
        self.clock = clock
        # The clock's two readings, bound once. The system clock's methods only forward to
        # time.monotonic_ns / time.time_ns: called directly, a reading on the order-submit
        # path is a C call instead of a Python one (three per request).
        self._mono_ns: Callable[[], int] = clock.monotonic_ns
        self._wall_ns: Callable[[], int] = clock.time_ns
        if type(clock) is SystemClock:
            self._mono_ns, self._wall_ns = time.monotonic_ns, time.time_ns
        self.metrics = metrics
        self.state = State.DISCONNECTED
        self.failure: str = ""
        self.exit_code: int | None = None
        self.on_transition: Callable[[State, State, str], None] | None = None
        self.actions: list[SessionAction] = []  # the shell drains them (Session.actions swaps it)
        self.conns: dict[int, Connection] = {}
        self.primary: int | None = None
        self.standby: int | None = None
        self.rate_limited_until_ns = 0  # nothing but pings is sent before this
        self.request_failed = request_failed
        self.primary_ready = primary_ready
        self._builder = builder
        self._backoff = backoff
        self._next_conn = 1
        self._reconnect_at: int | None = None
        self._rollover_wanted = False
        self._rollover_retry_at = 0
        self.offset_ms = 0.0  # server time - local wall time (the handshake measures it)
        self.next_time_sync_ns = 0
        self.handshake = Handshake(self)

    def _now(self) -> int:
        return self._mono_ns()

    def timestamp_ms(self) -> int:
        """Venue time now, as signed requests and retryAfter use it."""
        return int(self._wall_ns() / 1e6 + self.offset_ms)

    def transition(self, event: str, why: str = "") -> None:
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

    @property
    def ready(self) -> bool:
        return self.state is State.READY and self.primary is not None and self.primary in self.conns

    # ---- connection lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self.transition("start")
        self._open(ConnRole.PRIMARY)

    def stop(self) -> None:
        if self.state is State.FAILED:
            return
        self.transition("stop")
        self._reconnect_at = None
        for conn in list(self.conns.values()):
            self.drop(conn, "stop", lost=False)
        self.primary = self.standby = None

    def _open(self, role: ConnRole) -> Connection:
        conn = Connection(id=self._next_conn, role=role, opened_ns=self._now())
        self._next_conn += 1
        self.conns[conn.id] = conn
        if role is ConnRole.PRIMARY:
            self.primary = conn.id
        else:
            self.standby = conn.id
        self.actions.append(Open(conn.id))
        return conn

    def connected(self, conn_id: int) -> None:
        conn = self.conns.get(conn_id)
        if conn is None:
            self.actions.append(Close(conn_id, "not wanted any more"))
            return
        now = self._now()
        conn.opened_ns = now
        conn.to_phase("connected")
        conn.next_ping_ns = now + int(self.config.ping_interval_s * 1e9)
        conn.next_json_ping_ns = now + int(self.config.json_ping_interval_s * 1e9)
        if conn.role is ConnRole.PRIMARY:
            self.transition("connected")
            self.metrics["connected_since_ns"] = self.clock.time_ns()
        self.request(conn, "time", {}, "time")

    def connect_failed(self, conn_id: int, reason: str) -> None:
        conn = self.conns.pop(conn_id, None)
        if conn is None:
            return
        log.warning(
            "connect failed: %s", reason, extra={"event": "connect_failed", "conn": conn_id}
        )
        if conn.role is ConnRole.STANDBY:
            self._standby_failed()
            return
        self.primary = None
        self._schedule_reconnect("connect_failed", reason)

    def connection_lost(self, conn_id: int, reason: str) -> None:
        conn = self.conns.get(conn_id)
        if conn is None:
            return  # we closed it ourselves
        self.drop(conn, reason, lost=True)

    def _standby_failed(self) -> None:
        self.standby = None
        delay = self._backoff.base_delay(1)
        self._rollover_retry_at = self._now() + int(delay * 1e9)

    def drop(self, conn: Connection, reason: str, *, lost: bool) -> None:
        """Forget a connection; its unanswered requests become unknown / failed."""
        self.conns.pop(conn.id, None)
        if lost:
            log.warning(
                "connection %d (%s) lost: %s",
                conn.id,
                conn.role.value,
                reason,
                extra={"event": "connection_lost", "conn": conn.id, "role": conn.role.value},
            )
        self.actions.append(Close(conn.id, reason))
        was_primary = conn.id == self.primary
        if was_primary:
            self.primary = None
            self.metrics["user_data_subscribed"] = 0
        for p in list(conn.pending.values()):
            self.request_failed(p, LOCAL_DISCONNECTED)
        conn.pending.clear()
        for p in self.handshake.take_waiters(conn.id):  # waiting for a clock resync: never now
            self.request_failed(p, LOCAL_DISCONNECTED)
        if conn.id == self.standby:
            self._standby_failed()
        elif was_primary and self.state in (State.READY, State.AUTHENTICATING):
            self._schedule_reconnect("lost", reason)

    def _schedule_reconnect(self, event: str, reason: str) -> None:
        # A ready standby can take over at once (it is already logged on and subscribed).
        sb = self.conns.get(self.standby) if self.standby is not None else None
        if sb is not None and sb.phase is ConnPhase.READY and self.state is State.READY:
            self.promote(sb)
            return
        if sb is not None:
            self.drop(sb, "primary lost during rollover", lost=False)
        self.transition(event, reason)
        delay = self._backoff.next_delay()
        self.metrics["reconnect_attempts"] = self._backoff.attempts
        if delay is None:
            self.fail(
                EXIT_GAVE_UP,
                f"gave up after {self._backoff.attempts} failed connection attempts ({reason})",
            )
            return
        now = self._now()
        at = now + int(delay * 1e9)
        at = max(at, self.rate_limited_until_ns)
        self._reconnect_at = at
        log.info(
            "reconnecting in %.2f s (attempt %d)",
            (at - now) / 1e9,
            self._backoff.attempts,
            extra={"event": "reconnect_scheduled"},
        )

    def fail(self, code: int, message: str) -> None:
        self.transition("give_up" if code == EXIT_GAVE_UP else "auth_rejected", message)
        self.failure = message
        self.exit_code = code
        self._reconnect_at = None
        for conn in list(self.conns.values()):
            self.conns.pop(conn.id, None)
            self.actions.append(Close(conn.id, "failed"))
            for p in conn.pending.values():
                self.request_failed(p, LOCAL_DISCONNECTED)
        self.primary = self.standby = None
        log.error("session failed: %s", message, extra={"event": "session_failed"})
        self.actions.append(Exit(code, message))

    def promote(self, conn: Connection) -> None:
        old = self.conns.get(self.primary) if self.primary is not None else None
        conn.to_role("promoted")
        self.primary, self.standby = conn.id, None
        self._rollover_wanted = False
        self.metrics["rollovers_total"] += 1
        self.metrics["connected_since_ns"] = self.clock.time_ns()
        self.metrics["authenticated_since_ns"] = self.clock.time_ns()
        self.metrics["user_data_subscribed"] = 1
        log.info("connection %d promoted to primary", conn.id, extra={"event": "rollover"})
        if old is not None:
            old.to_role("replaced")
            now = self._now()
            old.drain_deadline_ns = now + int(self.config.drain_timeout_s * 1e9)
            if old.subscribed:  # its user data may still be on the way: see Session._on_event
                old.linger_until_ns = now + int(self.config.handover_grace_s * 1e9)
            if old.drained(now):
                self.drop(old, "replaced", lost=False)
        self.primary_ready()

    def primary_logged_on(self) -> None:
        """The primary's logon succeeded: the session is Ready and reconnects start afresh."""
        self.transition("logon_ok")
        self.metrics["authenticated_since_ns"] = self.clock.time_ns()
        self._backoff.reset()
        self.metrics["reconnect_attempts"] = 0
        self.next_time_sync_ns = self._now() + int(self.config.time_sync_interval_s * 1e9)

    def server_shutdown(self, conn: Connection) -> None:
        """The venue will close ``conn`` soon: roll over now if it is the primary."""
        if conn.id == self.primary:
            self._rollover_wanted = True
            self._rollover_retry_at = 0

    def stream_terminated(self, conn: Connection) -> None:
        self.metrics["user_data_subscribed"] = 0
        conn.subscribed = False
        if self.ready:
            self.request(conn, "userDataStream.subscribe", {}, "subscribe")

    def drain_done(self, conn: Connection) -> None:
        """Close a replaced connection once its last in-flight request is answered and the
        handover grace for its user data is over."""
        if conn.role is ConnRole.DRAINING and conn.id in self.conns and conn.drained(self._now()):
            self.drop(conn, "replaced", lost=False)

    # ---- sending -----------------------------------------------------------------------

    def request(
        self,
        conn: Connection,
        method: str,
        params: dict[str, Any],
        kind: str,
        *,
        coid: str = "",
        new_coid: str = "",
        tag: Any = None,
        retried: bool = False,
    ) -> PendingRequest:
        """Write one request on ``conn`` and remember it until answered. The clock's bound
        readers are called here, not through :meth:`_now` / :meth:`timestamp_ms` (the same
        readings, in the same order): this is on the order-submit path."""
        wall_ns = self._wall_ns
        now = self._mono_ns()
        rid, text = self._builder.build(
            method, params, timestamp_ms=int(wall_ns() / 1e6 + self.offset_ms)
        )
        conn_id = conn.id
        p = PendingRequest(
            rid,
            conn_id,
            method,
            params,
            kind,
            now + int(self.config.request_timeout_s * 1e9),
            wall_ns(),
            coid,
            new_coid,
            tag,
            retried,
        )
        conn.pending[rid] = p
        self.actions.append(Send(conn_id, text))
        return p

    def send_gate(self) -> int:
        """0 if a request may go out on the primary now, else the local code saying why not.
        (:attr:`ready` spelt out: this is asked for every order.)"""
        primary = self.primary
        if self.state is not State.READY or primary is None or primary not in self.conns:
            return LOCAL_NOT_READY
        if self._mono_ns() < self.rate_limited_until_ns:
            return LOCAL_RATE_LIMITED
        return 0

    def send_on_primary(self, method: str, params: dict[str, Any], kind: str, **kw: Any) -> bool:
        if not self.ready or self.primary is None:
            return False
        if self._now() < self.rate_limited_until_ns:
            return False
        self.request(self.conns[self.primary], method, params, kind, **kw)
        return True

    def send_gated(
        self, method: str, params: dict[str, Any], kind: str, coid: str, new_coid: str = ""
    ) -> None:
        """Send on the primary a request whose caller got 0 from :meth:`send_gate` in this same
        synchronous call (a new order: :class:`pipeline.trading.orderentry.OrderEntry`), so
        the gate is not asked twice on the order-submit path; nothing between the two can
        change the connections."""
        self.request(self.conns[self.primary], method, params, kind,  # type: ignore[index]
                     coid=coid, new_coid=new_coid)  # fmt: skip

    def json_ping_failed(self, p: PendingRequest, code: int) -> None:
        """A JSON ping that will never be answered: the next one may go out."""
        conn = self.conns.get(p.conn)
        if conn is not None:
            conn.json_ping_rid = None

    # ---- time --------------------------------------------------------------------------

    def pong(self, conn_id: int) -> None:
        conn = self.conns.get(conn_id)
        if conn is None or conn.ping_sent_ns is None:
            return
        now = self._now()
        self.rtt((now - conn.ping_sent_ns) / 1000.0)
        conn.ping_sent_ns = None
        self.metrics["last_pong_ns"] = self.clock.time_ns()

    def rtt(self, us: float) -> None:
        self.metrics["rtt_us"] = us
        s = self.metrics["rtt_smoothed_us"]
        self.metrics["rtt_smoothed_us"] = us if s == 0 else 0.875 * s + 0.125 * us

    def deadlines(self) -> list[int]:
        """The monotonic ns at which :meth:`tick` has something to do."""
        times: list[int] = []
        if self._reconnect_at is not None:
            times.append(self._reconnect_at)
        for conn in self.conns.values():
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
                times.append(conn.linger_until_ns)
        return times

    def primary_deadlines(self) -> tuple[int, int] | None:
        """When the primary's clock resync and its age limit are due (None: not ready)."""
        if self.ready and self.primary is not None:
            age_limit = int(self.config.max_connection_age_s * 1e9)
            return self.next_time_sync_ns, self.conns[self.primary].opened_ns + age_limit
        return None

    def tick(self, now: int) -> None:
        if self._reconnect_at is not None and now >= self._reconnect_at:
            self._reconnect_at = None
            if self.state is State.RECONNECTING:
                self.transition("retry")
                self.metrics["reconnects_total"] += 1
                self._open(ConnRole.PRIMARY)
        for conn in list(self.conns.values()):
            if conn.id not in self.conns or conn.phase is ConnPhase.CONNECTING:
                continue
            self._tick_conn(conn, now)
        if self.ready and self.primary is not None:
            primary = self.conns[self.primary]
            if now >= self.next_time_sync_ns and now >= self.rate_limited_until_ns:
                self.next_time_sync_ns = now + int(self.config.time_sync_interval_s * 1e9)
                self.request(primary, "time", {}, "time")
            age = now - primary.opened_ns
            if age >= int(self.config.max_connection_age_s * 1e9):
                self._rollover_wanted = True
            if (
                self._rollover_wanted
                and self.standby is None
                and now >= self._rollover_retry_at
                and now >= self.rate_limited_until_ns
            ):
                log.info("opening a standby connection", extra={"event": "rollover_start"})
                self._open(ConnRole.STANDBY)

    def _tick_conn(self, conn: Connection, now: int) -> None:
        """Pings, pong and request deadlines, and the end of a drain, for one connection."""
        pong_to = int(self.config.pong_timeout_s * 1e9)
        if conn.ping_sent_ns is not None and now - conn.ping_sent_ns > pong_to:
            self.drop(conn, "no pong within pong timeout", lost=True)
            return
        if conn.json_ping_rid is not None and now - conn.json_ping_sent_ns > pong_to:
            self.drop(conn, "no reply to JSON ping within pong timeout", lost=True)
            return
        if conn.ping_sent_ns is None and now >= conn.next_ping_ns:
            conn.ping_sent_ns = now
            conn.next_ping_ns = now + int(self.config.ping_interval_s * 1e9)
            self.metrics["last_ping_sent_ns"] = self.clock.time_ns()
            self.actions.append(Ping(conn.id))
        if (
            conn.phase is ConnPhase.READY
            and conn.json_ping_rid is None
            and now >= conn.next_json_ping_ns
            and now >= self.rate_limited_until_ns
        ):
            p = self.request(conn, "ping", {}, "ping")
            conn.json_ping_rid = p.rid
            conn.json_ping_sent_ns = now
            conn.next_json_ping_ns = now + int(self.config.json_ping_interval_s * 1e9)
        for p in [p for p in conn.pending.values() if now >= p.deadline_ns]:
            conn.pending.pop(p.rid, None)
            self.metrics["requests_timed_out"] += 1
            self.request_failed(p, LOCAL_TIMEOUT)
            if p.kind in SETUP_KINDS:
                self.drop(conn, f"{p.method} timed out", lost=True)
                break
        if conn.id in self.conns and conn.role is ConnRole.DRAINING and conn.drained(now):
            self.drop(conn, "replaced", lost=False)
