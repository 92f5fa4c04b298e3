"""The order path of the trading process: order rings -> pre-trade checks -> session.

Why apart from the process: what happens to one order command (refused because the outbox is
nearly full, refused by the risk gate, or handed to the session as a place, cancel, modify,
status or account-level request) is a rule of its own, and the loop that polls the order rings
is the only place that feeds it. The rings are drained when a client rings the doorbell
(:mod:`pipeline.trading.wake`), with a slow safety poll behind it; without a doorbell they are
polled (the fallback, flagged in health).

Every command that never leaves the host is still answered: a REJECT (or CANCEL_REJECT /
STATUS) on the exec ring, or an error reply on the reply ring for account-level requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.binance.wsapi import ApiError, Response
from pipeline.logs import RateLimitedLog
from pipeline.trading.answers import AnswerPublisher, ReplyTag
from pipeline.trading.intake import OrderIntake
from pipeline.trading.pretrade import PreTradeRules
from pipeline.trading.riskgate import RiskGate
from pipeline.trading.session import ERROR_TEXT, LOCAL_INVALID, LOCAL_OUTBOX_FULL, Session
from pipeline.trading.sockets import WsConnections
from pipeline.trading.wake import WakeChannel
from pipeline.trading.wire import (
    LOCAL_RISK,
    REQUEST_METHODS,
    ExecKind,
    ExecUpdate,
    OrderAction,
    OrderStatus,
)

if TYPE_CHECKING:
    from pipeline.trading.process import TradingConfig

DRAIN_BATCHES = 8  # ring polls per drain before yielding to the event loop
PLACE = OrderAction.PLACE


class OrderDispatcher:
    """Drains the order rings (:meth:`drain`, woken by :meth:`_on_wake` or the safety poll in
    :meth:`run`) and carries out each command (:meth:`execute`).

    ``intake`` is set by the process once its rings exist; ``pump`` is the process's pump,
    called after each batch so the session's frames go out at once; ``mark_dirty`` asks for the
    metrics block to be written promptly (a local refusal changes a counter health reads).
    """

    def __init__(
        self,
        config: TradingConfig,
        session: Session,
        *,
        answers: AnswerPublisher,
        sockets: WsConnections,
        risk: RiskGate | None,
        pump: Callable[[], None],
        rules: PreTradeRules | None = None,
        mark_dirty: Callable[[], None],
        rate_limited_log: RateLimitedLog,
    ) -> None:
        self.config = config
        self.session = session
        self.intake: OrderIntake | None = None
        self._publish = answers.publish
        self._send_reply = answers.send_reply
        self._outbox_busy = sockets.busy
        self._risk = risk
        self._rules = rules
        self._pump = pump
        self._mark_dirty = mark_dirty
        self._rl = rate_limited_log
        self._next_observe = 0.0
        self.wake: WakeChannel | None = None  # set by the process; None: poll (the fallback)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._more_scheduled = False
        self._scan_allowed_at = 0.0
        self._spin_until = 0.0  # time.monotonic(): poll the rings until then (after an order)
        self._spinning = False
        self.risk_rejected = 0
        self.outbox_full_rejects = 0

    async def run(self, stop: asyncio.Event) -> None:
        """The periodic jobs (ring scan, risk observation) and the safety poll.

        With a wake channel the rings are drained from its readiness callback
        (:meth:`_on_wake`), so this loop sleeps ``wake_poll_interval_s`` (a lost wake-up costs
        at most that, never an order); without one it polls every ``poll_interval_s`` as the
        fallback. ``stop`` ends it (the process also cancels it at shutdown)."""
        intake = self.intake
        assert intake is not None
        loop = asyncio.get_running_loop()
        wake = self.wake
        self._loop = loop
        if wake is not None:
            loop.add_reader(wake.fileno(), self._on_wake)
        try:
            next_scan = 0.0
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_scan:
                    intake.scan()
                    next_scan = now + self.config.scan_interval_s
                risk_due = self._risk is not None and bool(self._risk.inflight)
                if risk_due and now >= self._next_observe:
                    assert self._risk is not None
                    self._next_observe = now + self.config.risk_observe_interval_s
                    if self._risk.needs_observation:
                        self._observe_risk()
                    self._risk.retire()
                busy = self.drain()
                if wake is None:
                    await asyncio.sleep(0 if busy else self.config.poll_interval_s)
                    continue
                nap = min(self.config.wake_poll_interval_s, max(0.0, next_scan - now))
                if risk_due:
                    nap = min(nap, self.config.risk_observe_interval_s)
                await asyncio.sleep(nap)
        finally:
            if wake is not None:
                loop.remove_reader(wake.fileno())

    def _on_wake(self) -> None:
        """A client rang: read the doorbell, scan if a new ring was announced, drain."""
        assert self.wake is not None
        assert self.intake is not None
        # The rings first: they are trusted and a datagram only says "look", so reading the
        # datagrams with their senders' credentials (~20 us here) waits until the orders are
        # on the wire. Then drain again: a client that published after the first drain's last
        # look rang a bell this take() has just consumed.
        self.drain()
        own, scan = self.wake.take()
        if scan:
            now = time.monotonic()
            if now >= self._scan_allowed_at:  # announced rings: at most one scan per ms
                self._scan_allowed_at = now + 0.001
                self.intake.scan()
        if own or scan:
            self.drain()

    def drain(self) -> bool:
        """Execute everything the rings hold, then go back to sleep without losing a wake-up:
        set ``sleeping``, look once more, and only then return (see :mod:`.wake`).

        At most :data:`DRAIN_BATCHES` batches per call so a client that never stops publishing
        cannot starve the sockets: the rest is taken on the next loop turn (returns True)."""
        intake = self.intake
        assert intake is not None
        wake = self.wake
        if wake is not None:
            wake.set_sleeping(False)
        for _ in range(DRAIN_BATCHES):
            cmds, rejects = intake.poll(time.time_ns())
            if not cmds and not rejects:
                if wake is None:
                    return False
                if self._spinning or self._start_spin():
                    return False  # still awake: clients need not ring, _spin looks again
                wake.set_sleeping(True)
                cmds, rejects = intake.poll(time.time_ns())
                if not cmds and not rejects:
                    return False
                wake.set_sleeping(False)
            if rejects:
                self._publish(list(rejects))
            for cmd in cmds:
                self.execute(cmd)
            self._pump()
            if cmds:
                self._spin_until = time.monotonic() + self.config.spin_after_order_s
        if wake is not None and self._loop is not None and not self._more_scheduled:
            self._more_scheduled = True
            self._loop.call_soon(self._drain_more)
        return True

    def _start_spin(self) -> bool:
        """Stay awake (``sleeping`` left clear) until ``spin_after_order_s`` after the last
        order, polling the rings once per event-loop turn (:meth:`_spin`), so that a strategy's
        next order is taken without the wake-up of a sleeping process (tens of microseconds on
        a virtual machine). True if spinning."""
        if self._loop is None or time.monotonic() >= self._spin_until:
            return False
        self._spinning = True
        self._loop.call_soon(self._spin)
        return True

    def _spin(self) -> None:
        self._spinning = False
        if time.monotonic() < self._spin_until:
            self._spinning = True
            self.drain()
            if self._spinning:
                self._loop.call_soon(self._spin)  # type: ignore[union-attr]
        else:
            self.drain()  # the last look sets ``sleeping`` (drain's no-lost-wake-up rule)

    def _drain_more(self) -> None:
        self._more_scheduled = False
        self.drain()

    def metrics(self) -> dict[str, int]:
        """The doorbell's counters and its problem flag for the metrics block."""
        wake = self.wake
        return {
            "order_wakes": wake.wakes if wake is not None else 0,
            "order_wakes_foreign": wake.foreign if wake is not None else 0,
            "problem_order_wake_unavailable": int(wake is None and self.intake is not None),
        }

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
        self.risk_rejected += 1
        self._mark_dirty()
        self._rl.warning(
            "risk_reject",
            f"order refused by risk: {reason}",
            client_order_id=cmd.client_order_id,
            symbol=symbol,
        )
        self._answer_locally(cmd, ExecKind.REJECT, OrderStatus.REJECTED, LOCAL_RISK, reason,
                             symbol=symbol, side=side)  # fmt: skip
        return True

    def _rules_refused(self, cmd: Any, symbol: str, side: str, stp: str = "") -> bool:
        """The symbol's exchangeInfo rules (:mod:`pipeline.trading.pretrade`); on a violation
        publish the REJECT with the venue's code and the filter's name, and return True.
        ``stp``: the STP mode the request will carry (a place's or a modify's replacement's)."""
        if self._rules is None:
            return False
        refused = self._rules.check(symbol, cmd.type, cmd.price, cmd.qty, stp)
        if refused is None:
            return False
        code, text = refused
        self._mark_dirty()
        self._rl.warning("pretrade_reject", f"order refused locally: {text}",
                         client_order_id=cmd.client_order_id, symbol=symbol)  # fmt: skip
        self._answer_locally(cmd, ExecKind.REJECT, OrderStatus.REJECTED, code, text,
                             symbol=symbol, side=side)  # fmt: skip
        return True

    def _amend_refused(self, cmd: Any) -> bool:
        """An amend through the same local rules as a new order (:meth:`PreTradeRules.
        check_amend`: LOT_SIZE (not the notional: undocumented), a reduction above the filled
        quantity), judged on what the order table knows of the order; on a refusal publish
        the AMEND_REJECT (the order as it stands, the venue's code, the rule named) and return
        True. An order the table does not know goes out unchecked (the venue answers it)."""
        rules = self._rules
        if rules is None:
            return False
        order = self.session.tracked(cmd.client_order_id)
        if order is None:
            rules.amend_untracked()
            self._mark_dirty()
            return False
        symbol = order.symbol  # the order's own (a restated symbol is the venue's to judge)
        refused = rules.check_amend(symbol, order.qty, order.cum_qty, cmd.qty)
        if refused is None:
            return False
        code, text = refused
        self._mark_dirty()
        self._rl.warning("pretrade_reject", f"amend refused locally: {text}",
                         client_order_id=cmd.client_order_id, symbol=symbol)  # fmt: skip
        self._publish(
            [
                ExecUpdate(
                    cmd.client_order_id,
                    ExecKind.AMEND_REJECT,
                    order.status,
                    symbol=symbol,
                    side=order.side,
                    order_id=order.order_id,
                    price=order.price,
                    qty=order.qty,
                    cum_qty=order.cum_qty,
                    cum_quote=order.cum_quote,
                    error_code=code,
                    error_msg=text,
                    submit_time_ns=cmd.submit_time_ns,
                    client_id=cmd.client_id,
                )
            ]
        )
        return True

    def _refuse_busy(self, cmd: Any) -> None:
        """Answer a command locally because the outbox is nearly full (never queue it)."""
        self.outbox_full_rejects += 1
        self._mark_dirty()
        self._rl.warning("outbox_busy", "outbox nearly full: refusing orders locally")
        text = ERROR_TEXT[LOCAL_OUTBOX_FULL]
        if cmd.action in REQUEST_METHODS:
            tag = ReplyTag(cmd.client_id, cmd.client_order_id, REQUEST_METHODS[cmd.action])
            self._send_reply(tag, Response(None, 503, None, ApiError(LOCAL_OUTBOX_FULL, text)))
            return
        kind = {
            OrderAction.CANCEL: ExecKind.CANCEL_REJECT,
            OrderAction.STATUS: ExecKind.STATUS,
            OrderAction.AMEND: ExecKind.AMEND_REJECT,
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

    def execute(self, cmd: Any) -> None:
        """Carry out one command. A PLACE is this process's hot path: its fields are read
        once, and a check that is off (no exchangeInfo rules, no risk gate) costs no call."""
        s = self.session
        if self._outbox_busy():
            self._refuse_busy(cmd)
            return
        action = cmd.action
        if action is PLACE:
            symbol, side, qty, price, stp = cmd.symbol, cmd.side, cmd.qty, cmd.price, cmd.stp
            if self._rules is not None and self._rules_refused(cmd, symbol, side, stp):
                return
            risk = self._risk
            if risk is not None and self._risk_refused(cmd, symbol, side):
                return
            sent = s.place(cmd.client_order_id, symbol, side, cmd.type, qty, price or None,
                           cmd.tif or None, submit_time_ns=cmd.submit_time_ns,
                           client_id=cmd.client_id, stp=stp)  # fmt: skip
            if sent and risk is not None:
                risk.sent(cmd.client_order_id, symbol, side, qty)
        elif action is OrderAction.AMEND:  # only reduces exposure: no risk check needed
            if self._amend_refused(cmd):
                return
            s.amend(cmd.client_order_id, cmd.qty, cmd.symbol or None, client_id=cmd.client_id)
        elif cmd.action is OrderAction.CANCEL:
            s.cancel(cmd.client_order_id, cmd.symbol or None, client_id=cmd.client_id)
        elif cmd.action is OrderAction.MODIFY:
            info = s.order_info(cmd.orig_client_order_id)
            symbol = cmd.symbol or (info[0] if info else "")
            side = cmd.side or (info[1] if info else "")
            if self._rules_refused(cmd, symbol, side, cmd.stp):
                return
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
                stp=cmd.stp,
            )
            if sent and self._risk is not None:
                self._risk.sent(cmd.client_order_id, symbol, side, cmd.qty)
        elif cmd.action is OrderAction.STATUS:
            s.query(cmd.client_order_id, cmd.symbol or None, client_id=cmd.client_id)
        elif cmd.action in REQUEST_METHODS:
            method = REQUEST_METHODS[cmd.action]
            tag = ReplyTag(cmd.client_id, cmd.client_order_id, method)
            params: dict[str, Any] = {"symbol": cmd.symbol} if cmd.symbol else {}
            if cmd.action is OrderAction.ACCOUNT:
                params = {"omitZeroBalances": True}
            if cmd.action is OrderAction.CANCEL_ALL and not cmd.symbol:
                self._send_reply(
                    tag, Response(None, 400, None, ApiError(LOCAL_INVALID, "symbol required"))
                )
                return
            s.request(method, params, tag=tag)
