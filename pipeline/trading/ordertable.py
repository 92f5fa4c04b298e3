"""The session's order table: every order it placed, and what the venue says about each.

The venue speaks through replies to order requests (:meth:`OrderTable.on_place` ...), the
user data stream (:meth:`OrderTable.on_execution_report`) and requests that will never be
answered (:meth:`OrderTable.place_failed` ...); each turns into :class:`ExecUpdate` for the
shell. An answer we cannot be sure of makes the order UNKNOWN, which the
:class:`pipeline.trading.reconcile.Reconciler` resolves. Submitting is
:mod:`pipeline.trading.orderentry`'s; the connection is
:class:`pipeline.trading.connections.ConnectionMachine`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.backoff import Outcome, classify_response
from pipeline.binance import userdata as ud
from pipeline.binance.wsapi import (
    OrderInfo,
    ProtocolError,
    Response,
    parse_amend,
    parse_cancel_replace,
    parse_order,
)
from pipeline.logs import RateLimitedLog
from pipeline.trading.amends import amend_requester, first_replace
from pipeline.trading.session_types import (
    ERROR_TEXT,
    LOCAL_TIMEOUT,
    ApiReply,
    Clock,
    Connection,
    PendingRequest,
    SessionConfig,
)
from pipeline.trading.wire import FINAL, ExecKind, ExecUpdate, OrderStatus

if TYPE_CHECKING:
    from pipeline.trading.handshake import Handshake
    from pipeline.trading.reconcile import Reconciler

log = logging.getLogger("pipeline.session")

STATUS_BY_NAME = {s.name: s for s in OrderStatus}
#: final statuses only the venue sets (REJECTED may be ours: see OrderTable.apply)
_ENDED = FINAL - {OrderStatus.REJECTED}
# What the venue may say an order's status is (PENDING and UNKNOWN are ours alone).
VENUE_STATUS = {
    n: st
    for n, st in STATUS_BY_NAME.items()
    if st not in (OrderStatus.PENDING, OrderStatus.UNKNOWN)
}


def venue_status(name: str, *, missing: OrderStatus | None = None) -> OrderStatus:
    """The status a reply states; an unknown one makes the reply not understood."""
    st = VENUE_STATUS.get(name)
    if st is None:
        if name == "" and missing is not None:
            return missing
        raise ProtocolError("order result with an unknown status")
    return st


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


@dataclass(slots=True)
class TrackedOrder:
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
    amends: int = 0  # order.amend.keepPriority accepted (the venue allows MAX_ORDER_AMENDS)
    replaced_qty: float = 0.0  # the quantity the last REPLACED we published gave (0: none)
    # amends sent and not yet seen as REPLACED: new quantity -> the client that asked (at most
    # MAX_ORDER_AMENDS and a few refused ones; None until the first amend)
    amend_requesters: dict[float, int] | None = None


class OrderTable:
    """The orders and their lifecycle; wired to its reconciler and handshake by the Session."""

    def __init__(
        self,
        config: SessionConfig,
        clock: Clock,
        metrics: dict[str, float],
        rate_limited_log: RateLimitedLog,
    ) -> None:
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self.orders: dict[str, TrackedOrder] = {}
        self.updates: list[ExecUpdate | ApiReply] = []  # the shell drains them (swapped)
        self.reply_ns = 0  # wall clock when the frame being handled arrived
        self._rl = rate_limited_log
        self._next_prune_ns = 0
        # set by the Session once both exist (each needs the other)
        self.reconciler: Reconciler
        self.handshake: Handshake

    # ---- state changes and what they publish -------------------------------------------

    def apply(
        self, order: TrackedOrder, status: str, order_id: int, cum_qty: float, cum_quote: float
    ) -> None:
        """Take what the venue says of an order. Replies and reports of one order travel apart
        (a reply on the request's connection, reports on the user-data subscription), so an
        older one can arrive after a newer one: the status never moves back from an ended
        order to a working one, nor from PARTIALLY_FILLED to NEW (quantities only grow).
        REJECTED is the exception: set by us when reconciling found no order, a later report
        that the order exists must win (``late`` in :meth:`on_execution_report`)."""
        new = VENUE_STATUS.get(status, order.status)
        cur = order.status
        if not ((cur in _ENDED and new not in FINAL)
                or (cur is OrderStatus.PARTIALLY_FILLED and new is OrderStatus.NEW)):
            order.status = new
        if order_id >= 0:
            order.order_id = order_id
        order.cum_qty = max(order.cum_qty, cum_qty)
        order.cum_quote = max(order.cum_quote, cum_quote)

    def apply_info(self, order: TrackedOrder, info: OrderInfo) -> None:
        """:meth:`apply` with what an order.place / cancel / status result says, including the
        quantity (an amend we lost the answer to is learnt from order.status's ``origQty``)."""
        self.apply(order, info.status, info.order_id, info.executed_qty, info.cum_quote_qty)
        if info.orig_qty > 0:
            order.qty = info.orig_qty

    def emit(
        self, order: TrackedOrder, kind: ExecKind, *, client_id: int | None = None, **kw: Any
    ) -> None:
        """Publish an order's state; answers to a request go to the requesting client."""
        self.updates.append(
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

    def reject(self, order: TrackedOrder, code: int, msg: str) -> None:
        order.status = OrderStatus.REJECTED
        self.metrics["orders_rejected"] += 1
        self.metrics["last_error_code"] = code
        self.emit(order, ExecKind.REJECT, error_code=code, error_msg=msg[:60])

    def local_reject(
        self, coid: str, code: int, order: TrackedOrder | None = None, **kw: Any
    ) -> None:
        """Refused before anything was sent: a REJECT with a local code (-9xxx)."""
        self.metrics["orders_local_rejected"] += 1
        self.metrics["last_error_code"] = code
        self.updates.append(
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

    def full(self) -> bool:
        """True if the order table has no room even after forgetting final orders (oldest
        first, down to 90 % of ``max_orders``). A table full of live orders is re-scanned at
        most once a second, so refusing orders stays cheap."""
        cap = self.config.max_orders
        if len(self.orders) < cap:
            return False
        now = self.clock.monotonic_ns()
        if now < self._next_prune_ns:
            return True
        excess = len(self.orders) - int(cap * 0.9)
        for coid in [c for c, o in self.orders.items() if o.status in FINAL][:excess]:
            del self.orders[coid]
        if len(self.orders) < cap:
            return False
        self._next_prune_ns = now + 1_000_000_000
        self.metrics["orders_table_full"] += 1
        self._rl.warning("orders_table_full", f"order table full: {cap} live orders")
        return True

    # ---- replies to order requests -----------------------------------------------------

    def on_place(self, conn: Connection, p: PendingRequest, msg: Response) -> None:
        order = self.orders.get(p.coid)
        if order is None:
            return
        outcome = classify_response(msg.status, msg.code)
        if outcome is Outcome.OK:
            info = parse_order(msg.result)
            # an ACK-type answer has no status: accepted by the engine means NEW
            venue_status(info.status, missing=OrderStatus.NEW if info.order_id >= 0 else None)
            self.metrics["orders_acked"] += 1
            if not info.status:
                order.status = OrderStatus.NEW
            self.apply_info(order, info)
            self.emit(
                order,
                ExecKind.ACK,
                event_time_ns=info.transact_time_ms * 1_000_000,
                sent_time_ns=p.sent_wall_ns,
                reply_time_ns=self.reply_ns,
            )
        elif outcome is Outcome.RESYNC_RETRY and not p.retried:
            self.handshake.resync_and_retry(p)  # -1021 is rejected before the engine: resend
        elif outcome is Outcome.UNKNOWN:
            self.reconciler.make_unknown(order, msg.code or LOCAL_TIMEOUT)
        else:  # rejected, rate limited, or auth: the order was not accepted
            self.reject(order, msg.code or 0, msg.error.msg if msg.error else "")

    def on_cancel(self, conn: Connection, p: PendingRequest, msg: Response) -> None:
        order = self.orders.get(p.coid)
        outcome = classify_response(msg.status, msg.code)
        if outcome is Outcome.OK:
            info = parse_order(msg.result)
            venue_status(info.status, missing=OrderStatus.CANCELED)
            if order is not None:
                self.apply_info(order, info)
                if not info.status:
                    order.status = OrderStatus.CANCELED
                self.emit(order, ExecKind.CANCELED, client_id=p.tag or order.client_id)
            else:
                self.updates.append(
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
        self._request_failed(p, order, msg, outcome, ExecKind.CANCEL_REJECT,
                             client_id=p.tag or (order.client_id if order else 0))  # fmt: skip

    def _request_failed(
        self,
        p: PendingRequest,
        order: TrackedOrder | None,
        msg: Response,
        outcome: Outcome,
        kind: ExecKind,
        **kw: Any,
    ) -> None:
        """A request about an existing order (cancel, amend) was not carried out: resend once
        after a clock resync (-1021), mark the order UNKNOWN if the answer may hide an executed
        request, and answer the requester with ``kind``; the order stays as it was."""
        if outcome is Outcome.RESYNC_RETRY and not p.retried:
            self.handshake.resync_and_retry(p)
            return
        if outcome is Outcome.UNKNOWN and order is not None:
            self.reconciler.make_unknown(order, msg.code or LOCAL_TIMEOUT)
        self.updates.append(
            ExecUpdate(
                p.coid,
                kind,
                order.status if order else OrderStatus.UNKNOWN,
                symbol=order.symbol if order else "",
                error_code=msg.code or 0,
                error_msg=msg.error.msg[:60] if msg.error else "",
                **kw,
            )
        )

    def on_modify(self, conn: Connection, p: PendingRequest, msg: Response) -> None:
        old = self.orders.get(p.coid)
        new = self.orders.get(p.new_coid)
        outcome = classify_response(msg.status, msg.code)
        if outcome is Outcome.RESYNC_RETRY and not p.retried:
            self.handshake.resync_and_retry(p)
            return
        if outcome is Outcome.UNKNOWN:
            if new is not None:
                self.reconciler.make_unknown(new, msg.code or LOCAL_TIMEOUT)
            if old is not None:
                self.reconciler.make_unknown(old, msg.code or LOCAL_TIMEOUT)
            return
        res = parse_cancel_replace(msg)
        if res.cancel is not None:
            venue_status(res.cancel.status, missing=OrderStatus.CANCELED)
        if res.new_order is not None:
            venue_status(res.new_order.status, missing=OrderStatus.NEW)
        if old is not None and res.cancel_ok and res.cancel is not None:
            c = res.cancel
            self.apply_info(old, c)
            self.emit(old, ExecKind.CANCELED)
        elif res.cancel_error is not None:
            self.updates.append(
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
            self.apply_info(new, n)
            self.emit(new, ExecKind.ACK, event_time_ns=n.transact_time_ms * 1_000_000)
        else:
            err = res.new_order_error or res.cancel_error or msg.error
            code = err.code if err else (msg.code or 0)
            if res.new_order_ok is None and err is res.cancel_error:
                code = code or -2022
            self.reject(new, code, err.msg if err else "new order not attempted")

    def on_amend(self, conn: Connection, p: PendingRequest, msg: Response) -> None:
        """order.amend.keepPriority answered: REPLACED with the new quantity (unless its
        executionReport came first: one per amend, :mod:`pipeline.trading.amends`), or
        AMEND_REJECT (-2038, MAX_NUM_ORDER_AMENDS, ...) leaving the order as it was. An answer
        that may hide an executed amend (5xx, -1006/-1007) makes the order UNKNOWN: its
        quantity is then learnt from order.status. An amend never creates an order, so no
        answer here can lead to a duplicate."""
        order = self.orders.get(p.coid)
        client_id = p.tag or (order.client_id if order else 0)
        outcome = classify_response(msg.status, msg.code)
        if outcome is Outcome.OK:
            info = parse_amend(msg.result)
            venue_status(info.status, missing=OrderStatus.NEW)
            if order is not None:
                self._amend_answered(order, info, client_id)
            else:
                self.updates.append(
                    ExecUpdate(
                        p.coid,
                        ExecKind.REPLACED,
                        STATUS_BY_NAME.get(info.status, OrderStatus.NEW),
                        symbol=info.symbol,
                        order_id=info.order_id,
                        price=info.price,
                        qty=info.orig_qty,
                        cum_qty=info.executed_qty,
                        client_id=client_id,
                    )
                )
            return
        if order is not None and outcome is Outcome.REJECTED:  # it will not be REPLACED
            amend_requester(order, float(p.params.get("newQty", 0.0)), 0)
        self._request_failed(p, order, msg, outcome, ExecKind.AMEND_REJECT, client_id=client_id,
                             order_id=order.order_id if order else -1,
                             qty=order.qty if order else 0.0)  # fmt: skip

    def _amend_answered(self, order: TrackedOrder, info: OrderInfo, client_id: int) -> None:
        """An amend's reply: REPLACED unless its report came first (then only its state)."""
        first = first_replace(order, info.orig_qty, self.metrics)
        amend_requester(order, info.orig_qty, client_id)  # answered: forget the requester
        self.apply(order, info.status, info.order_id, info.executed_qty, info.cum_quote_qty)
        if first:
            self.emit(
                order,
                ExecKind.REPLACED,
                client_id=client_id,
                event_time_ns=info.transact_time_ms * 1_000_000,
            )

    def on_status(self, conn: Connection, p: PendingRequest, msg: Response) -> None:
        order = self.orders.get(p.coid)
        if msg.ok:
            info = parse_order(msg.result)
            venue_status(info.status)
            if order is not None and order.status is OrderStatus.UNKNOWN:
                self.apply_info(order, info)
                self.metrics["orders_reconciled"] += 1
                self.emit(order, ExecKind.RECONCILED)
                self.emit(order, ExecKind.STATUS, client_id=p.tag or order.client_id)
            elif order is not None:
                self.apply_info(order, info)
                self.emit(order, ExecKind.STATUS, client_id=p.tag or order.client_id)
            else:
                st = STATUS_BY_NAME.get(info.status, OrderStatus.UNKNOWN)
                self.updates.append(
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
            self.handshake.resync_and_retry(p)
            return
        self.updates.append(
            ExecUpdate(
                p.coid,
                ExecKind.STATUS,
                order.status if order else OrderStatus.UNKNOWN,
                error_code=msg.code or 0,
                client_id=p.tag or 0,
            )
        )

    # ---- requests that will never be answered (connection gone or deadline passed) -----

    def new_order_failed(self, p: PendingRequest, code: int) -> None:
        """order.place / order.cancelReplace: the orders it was about are UNKNOWN."""
        order = self.orders.get(p.new_coid or p.coid)
        if order is not None and order.status is OrderStatus.PENDING:
            self.reconciler.make_unknown(order, code)
        old = self.orders.get(p.coid) if p.kind == "modify" else None
        if old is not None:
            self.reconciler.make_unknown(old, code)

    def cancel_failed(self, p: PendingRequest, code: int) -> None:
        """order.cancel / order.amend.keepPriority never answered: the order may or may not
        have changed, so it is UNKNOWN until order.status says."""
        order = self.orders.get(p.coid)
        if order is not None:
            self.reconciler.make_unknown(order, code)

    def status_failed(self, p: PendingRequest, code: int) -> None:
        self.updates.append(
            ExecUpdate(
                p.coid,
                ExecKind.STATUS,
                OrderStatus.UNKNOWN,
                error_code=code,
                client_id=p.tag or 0,
            )
        )

    # ---- user data -----------------------------------------------------------------------

    def on_execution_report(self, ev: ud.ExecutionReport) -> None:
        order = self.orders.get(ev.order_key) or self.orders.get(ev.client_order_id)
        if order is None:
            return  # not ours (web UI, another process on the same account)
        was_unknown = order.status is OrderStatus.UNKNOWN
        late = order.status is OrderStatus.REJECTED and order.was_unknown
        self.apply(order, ev.status, ev.order_id, ev.cum_qty, ev.cum_quote)
        kind = _EXEC_KIND.get(ev.exec_type, ExecKind.STATUS)
        if kind is ExecKind.EXPIRED and order.status not in FINAL:
            kind = ExecKind.STATUS  # STP DECREMENT shrank the order; it is still working
        client_id = order.client_id
        seen = False
        if kind is ExecKind.REPLACED:  # an amend: the report carries the new quantity
            client_id = amend_requester(order, ev.qty, client_id)
            if not first_replace(order, ev.qty, self.metrics):
                # its reply came first and was published: only the state it lacked is new
                seen = True
                kind = ExecKind.STATUS
        if was_unknown:
            self.metrics["orders_reconciled"] += 1
            kind = ExecKind.RECONCILED if kind in (ExecKind.NEW, ExecKind.STATUS) else kind
        if late:
            self.metrics["orders_late"] += 1
            log.warning(
                "late report for an order reported not found", extra={"event": "order_late"}
            )
        if ev.skipped_fields:
            # the parser dropped malformed optional fields (and logged them): count, never hide
            self.metrics["user_data_fields_skipped"] += len(ev.skipped_fields)
        if seen and not was_unknown:
            return  # one REPLACED per amend (its reply's); the state is applied above
        self.emit(
            order,
            kind,
            client_id=client_id,
            last_qty=ev.last_qty,
            last_price=ev.last_price,
            event_time_ns=ev.event_time_ns,
            exec_id=ev.exec_id,
            expiry_reason=ev.expiry_reason,
            stp_mode=ev.stp_mode,
            working=ev.working,
            last_quote=ev.last_quote,
            prevented_qty=ev.prevented_qty,
            quote_order_qty=ev.quote_order_qty,
        )
