"""What every connection goes through before it carries orders, and the clock it signs with.

``time`` (fixes the offset between our wall clock and the venue's) -> ``session.logon`` ->
``userDataStream.subscribe``; the connection's phase follows
:data:`pipeline.trading.session_types.PHASE_TRANSITIONS`. A signed request the venue refused
with -1021 (timestamp outside recvWindow) waits here for the next ``time`` answer and is
resent once. Part of :class:`pipeline.trading.connections.ConnectionMachine`, which owns the
connections; this class owns only the replies to these requests and the waiting requests.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pipeline.backoff import Outcome, classify_response
from pipeline.binance.wsapi import Response, venue_time_ms
from pipeline.trading.session_types import (
    EXIT_AUTH,
    LOCAL_BAD_REPLY,
    Connection,
    ConnPhase,
    ConnRole,
    PendingRequest,
)

if TYPE_CHECKING:
    from pipeline.trading.connections import ConnectionMachine

log = logging.getLogger("pipeline.session")


class Handshake:
    def __init__(self, link: ConnectionMachine) -> None:
        self._link = link
        self._resync_waiters: list[PendingRequest] = []

    def on_time(self, conn: Connection, p: PendingRequest, msg: Response) -> None:
        link = self._link
        if msg.ok and isinstance(msg.result, dict) and "serverTime" in msg.result:
            server_ms = venue_time_ms(msg.result["serverTime"], "serverTime")
            recv_wall = link.clock.time_ns()
            mid_ms = (p.sent_wall_ns + recv_wall) / 2e6
            link.offset_ms = float(server_ms) - mid_ms
            link.metrics["clock_offset_ms"] = link.offset_ms
            link.rtt((recv_wall - p.sent_wall_ns) / 1000.0)
            waiters, self._resync_waiters = self._resync_waiters, []
            for w in waiters:
                wc = link.conns.get(w.conn)
                if wc is not None:
                    link.request(
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
            self.fail_waiters(conn.id, LOCAL_BAD_REPLY if msg.ok else (msg.code or 0))
        if conn.phase is ConnPhase.SYNCING:
            conn.to_phase("time_synced")
            link.request(conn, "session.logon", {}, "logon")

    def on_logon(self, conn: Connection, p: PendingRequest, msg: Response) -> None:
        link = self._link
        outcome = classify_response(msg.status, msg.code)
        if outcome is Outcome.OK:
            conn.to_phase("logon_ok")
            if conn.role is ConnRole.PRIMARY:
                link.primary_logged_on()
            link.request(conn, "userDataStream.subscribe", {}, "subscribe")
            if conn.role is ConnRole.PRIMARY:
                link.primary_ready()
            return
        if outcome is Outcome.AUTH_FATAL:
            link.fail(
                EXIT_AUTH,
                f"session.logon rejected by the exchange (code {msg.code}: "
                f"{msg.error.msg if msg.error else ''}); check the API key and that its "
                "Ed25519 public key is registered for it",
            )
            return
        if outcome is Outcome.RESYNC_RETRY and not p.retried:
            link.metrics["time_resyncs"] += 1
            conn.to_phase("resync")
            link.request(conn, "time", {}, "time")
            return
        link.drop(conn, f"session.logon failed (code {msg.code})", lost=True)

    def on_subscribe(self, conn: Connection, p: PendingRequest, msg: Response) -> None:
        link = self._link
        if msg.ok or msg.code == -2035:  # -2035: already subscribed, which is what we want
            conn.subscribed = True
            conn.to_phase("subscribed")
            if conn.role is ConnRole.PRIMARY:
                link.metrics["user_data_subscribed"] = 1
            elif conn.role is ConnRole.STANDBY:
                link.promote(conn)
            return
        log.warning(
            "userDataStream.subscribe failed (code %s)",
            msg.code,
            extra={"event": "subscribe_failed"},
        )
        link.drop(conn, "user data subscription failed", lost=True)

    def on_ping(self, conn: Connection, p: PendingRequest, msg: Response) -> None:
        if conn.json_ping_rid == p.rid:
            conn.json_ping_rid = None
            self._link.metrics["last_json_ping_reply_ns"] = self._link.clock.time_ns()

    def resync_and_retry(self, p: PendingRequest) -> None:
        """``p`` was refused with -1021: resend it once the next ``time`` answer is in."""
        self._link.metrics["time_resyncs"] += 1
        self._resync_waiters.append(p)
        conn = self._link.conns.get(p.conn)
        if conn is not None:
            self._link.request(conn, "time", {}, "time")

    def fail_waiters(self, conn_id: int, code: int) -> None:
        """The ``time`` request on ``conn_id`` failed: what waited for it is never resent."""
        waiters = [w for w in self._resync_waiters if w.conn == conn_id]
        if waiters:
            self._resync_waiters = [w for w in self._resync_waiters if w.conn != conn_id]
            for w in waiters:
                self._link.request_failed(w, code or LOCAL_BAD_REPLY)

    def time_failed(self, p: PendingRequest, code: int) -> None:
        self.fail_waiters(p.conn, code)

    def take_waiters(self, conn_id: int) -> list[PendingRequest]:
        """Forget (and return) the requests of a connection that is gone."""
        orphans = [p for p in self._resync_waiters if p.conn == conn_id]
        self._resync_waiters = [p for p in self._resync_waiters if p.conn != conn_id]
        return orphans
