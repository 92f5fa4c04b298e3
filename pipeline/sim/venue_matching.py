"""The simulated venue's matching engine: accepting orders, filling them, cancelling, amending.

Why a module of its own: this is the order lifecycle (NEW -> TRADE... -> FILLED / EXPIRED /
CANCELED, REPLACED on amend) and the only code that changes an order's state. Requests arrive
already validated (:mod:`pipeline.sim.venue_filters`); money moves through the ledger
(:mod:`pipeline.sim.venue_accounts`); orders are found through the table
(:mod:`pipeline.sim.venue_orders`). Every rejection (-2010, -1013) is decided before anything
changes, so a request that raises has changed NOTHING.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from pipeline.sim.venue_accounts import Ledger
from pipeline.sim.venue_filters import SymbolRules
from pipeline.sim.venue_market_view import MarketView
from pipeline.sim.venue_orders import NewOrder, Order, VenueOrderTable
from pipeline.sim.venue_params import (
    MSG_DUPLICATE,
    MSG_INSUFFICIENT,
    MSG_WOULD_TAKE,
    ZERO,
    VenueError,
    VenueEvent,
    fmt,
)
from pipeline.sim.venue_reports import ExecutionReports
from pipeline.sim.venue_stp import SelfTradePrevention

# ``eR`` of an order that expires unfilled (section 2.15's expiry reasons)
EXPIRY_REASONS = {
    "MARKET": "INSUFFICIENT_LIQUIDITY",
    "IOC": "UNFILLED_IOC_QUANTITY_EXPIRED",
    "FOK": "UNFILLED_FOK_ORDER_EXPIRED",
}


class MatchingEngine:
    """Runs validated orders against the market and resting orders against public prints."""

    def __init__(
        self,
        view: MarketView,
        rules: Mapping[str, SymbolRules],
        ledger: Ledger,
        table: VenueOrderTable,
        reports: ExecutionReports,
        counters: dict[str, int],
        *,
        stp_mode: str,
        max_num_orders: int,
        fill_on_touch: bool,
    ) -> None:
        self.view = view
        self.market = view.market
        self.rules = rules
        self.ledger = ledger
        self.table = table
        self.reports = reports
        self.counters = counters
        self.stp_mode = stp_mode
        self.max_num_orders = max_num_orders
        self.fill_on_touch = fill_on_touch
        self._next_maker_trade_id = 10**12  # maker fills from public prints; far from market ids
        self.taking = False  # our own taker order is walking the market right now
        # called with the account when one of its orders trades for the first time
        self.first_fill_sink: Callable[[str], None] | None = None
        self.stp = SelfTradePrevention(ledger, table, reports, self.close, self._self_fill)

    def submit(
        self, account: str, spec: NewOrder, now_ms: int
    ) -> tuple[Order, list[dict[str, Any]], list[VenueEvent]]:
        """Run a validated order through the (simulated) matching engine.

        Every rejection (-2010) is decided before anything changes. Returns the order, the FULL
        ``fills`` list and the user-data events (NEW, TRADE..., EXPIRED, account position).
        """
        acct = self.ledger.get(account)
        rules = self.rules[spec.symbol]
        bid, _, ask, _ = self.view.best(spec.symbol)
        buy = spec.side == "BUY"
        if spec.type == "LIMIT_MAKER" and (
            (buy and ask is not None and spec.price >= ask)
            or (not buy and bid is not None and spec.price <= bid)
        ):
            raise VenueError(-2010, MSG_WOULD_TAKE)
        cid = spec.client_order_id
        if cid is not None and self.table.has_open_client_id(account, spec.symbol, cid):
            raise VenueError(-2010, MSG_DUPLICATE)
        if (
            self.max_num_orders
            and spec.type != "MARKET"
            and spec.tif == "GTC"
            and self.table.resting_count(account, spec.symbol) >= self.max_num_orders
        ):
            raise VenueError(-1013, "Filter failure: MAX_NUM_ORDERS")
        qty = spec.qty
        if spec.type == "MARKET" and spec.quote_qty:
            ref = ask if buy else bid
            qty = rules.floor_qty(spec.quote_qty / ref) if ref is not None else ZERO
            if qty <= 0 or (rules.min_qty and qty < rules.min_qty):
                raise VenueError(-1013, "Filter failure: LOT_SIZE")
        # balance check (what must be reserved or spent)
        if buy:
            lock_asset = rules.quote_asset
            if spec.type == "MARKET":
                need = spec.quote_qty if spec.quote_qty else qty * (ask or ZERO)
            else:
                need = spec.price * qty
        else:
            lock_asset = rules.base_asset
            need = qty
        bal = acct.bal(lock_asset)
        if need > bal.free:
            raise VenueError(-2010, MSG_INSUFFICIENT)

        # ---- accepted: from here on state changes
        order = Order(
            account=account,
            symbol=spec.symbol,
            order_id=self.table.next_order_id(),
            client_order_id=cid or self.table.gen_client_id(),
            side=spec.side,
            type=spec.type,
            tif=spec.tif,
            price=spec.price,
            orig_qty=qty,
            orig_quote_qty=spec.quote_qty,
            time=now_ms,
            update_time=now_ms,
            working_time=now_ms,
            stp_mode=spec.stp_mode or self.stp_mode or self.rules[spec.symbol].default_stp_mode,
            strategy_id=spec.strategy_id,
            strategy_type=spec.strategy_type,
        )
        self.table.add(order)
        self.counters["orders_placed"] += 1
        changed: set[str] = {rules.base_asset, rules.quote_asset}
        is_market_buy = buy and spec.type == "MARKET"
        if not is_market_buy:  # MARKET BUY spends from free per fill, bounded by limit price
            self.ledger.reserve(order, bal, need)
        events: list[VenueEvent] = [(account, self.reports.report(order, "NEW", now_ms))]

        marketable = spec.type == "MARKET" or (
            (buy and ask is not None and spec.price >= ask)
            or (not buy and bid is not None and spec.price <= bid)
        )
        limit: Decimal | None = None if spec.type == "MARKET" else spec.price
        if is_market_buy:
            cap = spec.quote_qty if spec.quote_qty else bal.free
            limit = rules.floor_price(min(cap, bal.free) / qty) if qty > 0 else ZERO
        own = self.stp.crossing(order, limit)  # our own resting orders this one would meet
        fills: list[dict[str, Any]] = []
        # FOK looks at public liquidity only (simplification: own orders are not counted)
        if (marketable or own) and not (
            spec.tif == "FOK" and self.view.available(spec.symbol, spec.side, limit) < qty
        ):
            for maker in own:  # public liquidity at better (or equal) prices first, see venue_stp
                self._take(order, maker.price, now_ms, fills, events)
                if order.remaining <= 0 or not order.is_open:
                    break
                self.stp.meet(order, maker, now_ms, events, fills)
                if order.remaining <= 0 or not order.is_open:
                    break
            if order.remaining > 0 and order.is_open:
                self._take(order, limit, now_ms, fills, events)
        if order.status == "EXPIRED_IN_MATCH":
            pass  # STP expired it (its TRADE_PREVENTION report is out)
        elif order.remaining <= 0:
            order.status = "FILLED"
        elif spec.type == "MARKET" or spec.tif in ("IOC", "FOK"):
            order.status = "EXPIRED"
            reason = EXPIRY_REASONS["MARKET" if spec.type == "MARKET" else spec.tif]
            events.append(
                (account, self.reports.report(order, "EXPIRED", now_ms, expiry_reason=reason))
            )
        else:
            self.table.rest(order)
        if not order.is_open:
            self.close(order)
        events.append((account, self.ledger.position(acct, changed, now_ms)))
        return order, fills, events

    def _take(
        self,
        order: Order,
        limit: Decimal | None,
        now_ms: int,
        fills: list[dict[str, Any]],
        events: list[VenueEvent],
    ) -> None:
        """Walk the public book for what ``order`` still wants, up to ``limit``."""
        self.taking = True
        try:
            raw = self.market.take(order.symbol, order.side, order.remaining, limit, now_ms)
        finally:
            self.taking = False
        for px, q, trade_id in raw:
            px = px if isinstance(px, Decimal) else Decimal(str(px))
            q = q if isinstance(q, Decimal) else Decimal(str(q))
            if q <= 0:
                continue
            fills.append(
                self.fill(order, px, q, int(trade_id), maker=False, now_ms=now_ms, events=events)
            )

    def _self_fill(
        self,
        taker: Order,
        maker: Order,
        now_ms: int,
        events: list[VenueEvent],
        fills: list[dict[str, Any]],
    ) -> None:
        """STP mode NONE: the two orders of one account trade at the maker's price."""
        q = min(taker.remaining, maker.remaining)
        self.taking = True  # the print must not fill resting orders through the listener
        try:
            trade_id = self._print_maker_fill(maker, q, now_ms)
        finally:
            self.taking = False
        self.fill(maker, maker.price, q, trade_id, maker=True, now_ms=now_ms, events=events)
        if not maker.is_open:
            self.close(maker)
        fills.append(
            self.fill(taker, maker.price, q, trade_id, maker=False, now_ms=now_ms, events=events)
        )

    def close(self, order: Order) -> None:
        """Order left the book: release what it still reserved, free its client id."""
        self.ledger.release_rest(order)
        self.table.retire(order)

    def fill(
        self,
        order: Order,
        px: Decimal,
        q: Decimal,
        trade_id: int,
        *,
        maker: bool,
        now_ms: int,
        events: list[VenueEvent],
    ) -> dict[str, Any]:
        """Apply one fill to the order and the balances; append its TRADE report."""
        commission, commission_asset = self.ledger.settle_fill(order, px, q, maker=maker)
        if order.executed_qty == 0 and self.first_fill_sink is not None:
            self.first_fill_sink(order.account)
        order.executed_qty += q
        order.cum_quote += px * q
        order.update_time = now_ms
        order.status = "FILLED" if order.remaining <= 0 else "PARTIALLY_FILLED"
        self.ledger.get(order.account).update_time = now_ms
        self.counters["fills"] += 1
        if maker:
            self.counters["maker_fills"] += 1
        events.append(
            (
                order.account,
                self.reports.report(
                    order,
                    "TRADE",
                    now_ms,
                    last_qty=q,
                    last_px=px,
                    commission=commission,
                    commission_asset=commission_asset,
                    trade_id=trade_id,
                    maker=maker,
                ),
            )
        )
        return {
            "price": fmt(px),
            "qty": fmt(q),
            "commission": fmt(commission),
            "commissionAsset": commission_asset,
            "tradeId": trade_id,
        }

    # ---------------------------------------------------------------- resting fills

    def on_public_trade(self, symbol: str, price: Any, qty: Any, now_ms: int) -> list[VenueEvent]:
        """A public trade printed: fill resting user orders it reached (price, time priority)."""
        book = self.table.resting.get(symbol)
        if not book:
            return []
        px = price if isinstance(price, Decimal) else Decimal(str(price))
        left = qty if isinstance(qty, Decimal) else Decimal(str(qty))

        def crossed(o: Order) -> bool:
            if o.side == "BUY":
                return px < o.price or (self.fill_on_touch and px == o.price)
            return px > o.price or (self.fill_on_touch and px == o.price)

        hits = [o for o in book if crossed(o)]
        if not hits:
            return []
        hits.sort(key=lambda o: (-o.price if o.side == "BUY" else o.price, o.time, o.order_id))
        events: list[VenueEvent] = []
        touched: dict[str, set[str]] = {}
        for o in hits:
            if left <= 0:
                break
            q = min(o.remaining, left)
            left -= q
            trade_id = self._print_maker_fill(o, q, now_ms)
            self.fill(o, o.price, q, trade_id, maker=True, now_ms=now_ms, events=events)
            rules = self.rules[symbol]
            touched.setdefault(o.account, set()).update((rules.base_asset, rules.quote_asset))
            if not o.is_open:
                self.close(o)
        for account, assets in touched.items():
            events.append((account, self.ledger.position(self.ledger.get(account), assets, now_ms)))
        return events

    def _print_maker_fill(self, o: Order, q: Decimal, now_ms: int) -> int:
        """A resting user order filled: that is a public trade too (taker = the other side)."""
        publish = getattr(self.market, "publish_trade", None)
        if publish is not None:
            taker = "SELL" if o.side == "BUY" else "BUY"
            return int(publish(o.symbol, o.price, q, taker, now_ms))
        trade_id = self._next_maker_trade_id
        self._next_maker_trade_id += 1
        return trade_id

    # ---------------------------------------------------------------- cancel / amend

    def cancel(
        self, order: Order, new_cid: str | None, now_ms: int
    ) -> tuple[dict[str, Any], list[VenueEvent]]:
        """Cancel an open order (already found and checked); returns ``(result, events)``."""
        order.cancel_client_id = new_cid or self.table.gen_client_id()
        order.status = "CANCELED"
        order.update_time = now_ms
        self.close(order)
        self.counters["orders_canceled"] += 1
        acct = self.ledger.get(order.account)
        acct.update_time = now_ms
        rules = self.rules[order.symbol]
        events: list[VenueEvent] = [
            (order.account, self.reports.report(order, "CANCELED", now_ms, cancel=True)),
            (
                order.account,
                self.ledger.position(acct, {rules.base_asset, rules.quote_asset}, now_ms),
            ),
        ]
        return order.cancel_result(now_ms), events

    def amend(
        self, order: Order, new_qty: Decimal, new_cid: str | None, now_ms: int
    ) -> tuple[dict[str, Any], list[VenueEvent]]:
        """Reduce an open order's quantity in place (checks already passed); returns the REPLACED
        report and the events. A new client id, if any, replaces the old one."""
        account = order.account
        rules = self.rules[order.symbol]
        prev = order.client_order_id
        acct = self.ledger.get(account)
        delta = order.orig_qty - new_qty
        self.ledger.release_part(order, order.price * delta if order.side == "BUY" else delta)
        order.orig_qty = new_qty
        order.amends += 1
        order.update_time = now_ms
        acct.update_time = now_ms
        if new_cid is not None and new_cid != prev:
            self.table.rename(order, new_cid)
        report = self.reports.report(
            order, "REPLACED", now_ms, prev_client_id=prev if order.client_order_id != prev else ""
        )
        events: list[VenueEvent] = [
            (account, report),
            (account, self.ledger.position(acct, {rules.base_asset, rules.quote_asset}, now_ms)),
        ]
        return report, events
