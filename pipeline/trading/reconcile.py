"""Reconciliation: finding out what became of UNKNOWN orders, within a budget of request weight.

An order whose request was written but not answered, timed out, or got 5xx / -1006 / -1007 /
a reply we could not understand is UNKNOWN: it is never resent, it is asked about. Issue #11:
40 UNKNOWN orders once cost 240 ``order.status`` in 6 s, so each order backs off exponentially
(``reconcile_interval_s`` doubling up to ``reconcile_max_interval_s``); all reconciliation
shares one token bucket, ``reconcile_weight_share`` of the per-minute weight limit (burst
``reconcile_burst_weight``), paused while the venue reports the weight used above
``1 - share`` of it; ``reconcile_bulk_min`` or more due orders of one symbol are asked with
one ``openOrders.status`` (weight 6) instead of one ``order.status`` (weight 4) each.
"""

from __future__ import annotations

import logging

from pipeline.binance.wsapi import OrderInfo, ProtocolError, Response, parse_order
from pipeline.logs import RateLimitedLog
from pipeline.trading.connections import ConnectionMachine
from pipeline.trading.ordertable import OrderTable, TrackedOrder, venue_status
from pipeline.trading.session_types import (
    ERROR_TEXT,
    LOCAL_NOT_FOUND,
    Connection,
    PendingRequest,
    SessionConfig,
)
from pipeline.trading.wire import FINAL, ExecKind, OrderStatus

log = logging.getLogger("pipeline.session")

# Request weights of the reconciliation requests (Binance WS API docs; the simulator agrees).
WEIGHT_ORDER_STATUS = 4
WEIGHT_OPEN_ORDERS_SYMBOL = 6


class Reconciler:
    def __init__(
        self,
        config: SessionConfig,
        table: OrderTable,
        link: ConnectionMachine,
        rate_limited_log: RateLimitedLog,
    ) -> None:
        self.config = config
        self.metrics = table.metrics
        self.unknown: set[str] = set()  # client order ids that became UNKNOWN (pruned lazily)
        self.next_pass_ns = 0  # monotonic, when the next pass over them is due
        self._table = table
        self._orders = table.orders
        self._link = link
        self._rl = rate_limited_log
        self._budget = float(config.reconcile_burst_weight)  # reconciliation weight tokens
        self._budget_ns = 0

    def _now(self) -> int:
        return self._link.clock.monotonic_ns()

    def make_unknown(self, order: TrackedOrder, code: int) -> None:
        if order.status in FINAL:
            return
        now = self._now()
        if order.status is not OrderStatus.UNKNOWN:  # newly unknown: a fresh backoff
            order.unknown_since_ns = now
            order.reconcile_tries = 0
            order.next_reconcile_ns = now
            order.bulk_checked = False
        order.status = OrderStatus.UNKNOWN
        self.unknown.add(order.coid)
        order.was_unknown = True
        self.metrics["orders_unknown"] += 1
        self.metrics["orders_unknown_now"] = self.metrics["orders_in_doubt"] = len(self.unknown)
        self._table.emit(order, ExecKind.UNKNOWN, error_code=code)
        self._reconcile(order, now)

    def tick(self, now: int) -> None:
        if self.unknown and now >= self.next_pass_ns:
            self.next_pass_ns = now + int(self.config.reconcile_interval_s * 1e9)
            self.reconcile_all()
        elif not self.unknown and self.metrics["orders_in_doubt"]:
            self._unknown_gauges(now)

    # ---- answers ---------------------------------------------------------------------

    def on_reconcile(self, conn: Connection, p: PendingRequest, msg: Response) -> None:
        order = self._orders.get(p.coid)
        if order is None:
            return
        info = parse_order(msg.result) if msg.ok else None
        if info is not None:
            venue_status(info.status)
        order.reconciling = False
        if order.status is not OrderStatus.UNKNOWN:
            return  # the user data stream resolved it first
        if info is not None:
            self._table.apply_info(order, info)
            self.metrics["orders_reconciled"] += 1
            self._table.emit(order, ExecKind.RECONCILED)
        elif msg.code == -2013:
            self.metrics["orders_reconciled"] += 1
            self._table.reject(order, LOCAL_NOT_FOUND, ERROR_TEXT[LOCAL_NOT_FOUND])
        else:  # timeout, -1007 again, rate limit: still unknown; asked again after a backoff
            self._failed(order)

    def on_bulk(self, conn: Connection, p: PendingRequest, msg: Response) -> None:
        """openOrders.status for one symbol's UNKNOWN orders: listed = open (reconciled);
        not listed = filled, canceled or never placed, which only order.status can tell."""
        orders = [o for c in p.tag for o in (self._orders.get(c),) if o is not None]
        found: dict[str, OrderInfo] = {}
        if msg.ok:
            if not isinstance(msg.result, list):
                raise ProtocolError("openOrders.status result is not a list")
            for item in msg.result:
                info = parse_order(item)
                venue_status(info.status)
                found[info.client_order_id] = info
        for order in orders:
            order.reconciling = False
            if order.status is not OrderStatus.UNKNOWN:
                continue
            if not msg.ok:
                self._failed(order)
                continue
            info_ = found.get(order.coid)
            if info_ is None:
                order.bulk_checked = True
                order.next_reconcile_ns = self._now()
                self.next_pass_ns = min(self.next_pass_ns, order.next_reconcile_ns)
                continue
            self._table.apply_info(order, info_)
            self.metrics["orders_reconciled"] += 1
            self._table.emit(order, ExecKind.RECONCILED)

    def reconcile_request_failed(self, p: PendingRequest, code: int) -> None:
        order = self._orders.get(p.coid)
        if order is not None:
            self._failed(order)

    def bulk_request_failed(self, p: PendingRequest, code: int) -> None:
        for c in p.tag:
            order = self._orders.get(c)
            if order is not None and order.reconciling:
                self._failed(order)

    def _failed(self, order: TrackedOrder) -> None:
        """An inconclusive answer: ask again after an exponential backoff."""
        order.reconciling = False
        order.reconcile_tries += 1
        cfg = self.config
        delay = min(
            cfg.reconcile_interval_s * 2 ** min(order.reconcile_tries - 1, 30),
            cfg.reconcile_max_interval_s,
        )
        order.next_reconcile_ns = self._now() + int(delay * 1e9)

    # ---- asking ----------------------------------------------------------------------

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
        link = self._link
        return link.ready and link.primary is not None and now >= link.rate_limited_until_ns

    def _reconcile(self, order: TrackedOrder, now: int) -> None:
        """Ask order.status for one UNKNOWN order now if it is due and the budget allows;
        otherwise the next pass (:meth:`reconcile_all`) will."""
        if order.reconciling or now < order.next_reconcile_ns or not self._can_reconcile(now):
            return
        if self._refill_budget(now) < WEIGHT_ORDER_STATUS:
            return
        self._budget -= WEIGHT_ORDER_STATUS
        self._query_one(order)

    def _query_one(self, order: TrackedOrder) -> None:
        link = self._link
        assert link.primary is not None
        order.reconciling = True
        self.metrics["reconcile_requests"] += 1
        link.request(
            link.conns[link.primary],
            "order.status",
            {"symbol": order.symbol, "origClientOrderId": order.coid},
            "reconcile",
            coid=order.coid,
        )

    def _unknown_gauges(self, now: int) -> None:
        """Prune :attr:`unknown`; publish how many are UNKNOWN now and how many for too long."""
        stale_ns = int(self.config.unknown_stale_s * 1e9)
        n = stale = 0
        for coid in list(self.unknown):
            order = self._orders.get(coid)
            if order is None or order.status is not OrderStatus.UNKNOWN:
                self.unknown.discard(coid)
                continue
            n += 1
            if now - order.unknown_since_ns > stale_ns:
                stale += 1
        if stale and not self.metrics["problem_unknown_orders_stale"]:
            self._rl.warning(
                "unknown_orders_stale",
                f"{stale} orders UNKNOWN for more than {self.config.unknown_stale_s:.0f} s",
            )
        self.metrics["orders_unknown_now"] = self.metrics["orders_in_doubt"] = n
        self.metrics["problem_unknown_orders_stale"] = stale

    def reconcile_all(self) -> None:
        """One reconciliation pass over the due UNKNOWN orders, within the budget: a symbol
        with ``reconcile_bulk_min`` or more due orders gets one openOrders.status, the rest one
        order.status each (after Ready, and every ``reconcile_interval_s``)."""
        now = self._now()
        self._unknown_gauges(now)
        if not self._can_reconcile(now):
            return
        due: dict[str, list[TrackedOrder]] = {}
        for coid in self.unknown:
            order = self._orders.get(coid)
            if order is None or order.reconciling or now < order.next_reconcile_ns:
                continue
            due.setdefault(order.symbol, []).append(order)
        singles: list[TrackedOrder] = []
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
            assert self._link.primary is not None
            self._link.request(
                self._link.conns[self._link.primary],
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
