"""The simulated exchange's trading core: accounts, orders, filters, matching, execution reports.

PURE: no sockets, no clock, no asyncio. Every call that changes state takes ``now_ms``; the WS API
shell (:mod:`pipeline.sim.wsapi`) owns time, signatures, rate limits and the connections.

Wire shapes follow the shared protocol reference (binance-protocol.md) section 2 (order.place
2.7, order.test 2.8, order.cancel 2.9, order.cancelReplace 2.10, order.amend.keepPriority 2.11,
queries 2.12, user data events 2.15). Parameter values
arrive as the TEXT the client sent (the shell turns JSON numbers into their text), so numbers are
parsed here with :class:`~decimal.Decimal`, never float.

Calling contract
----------------
1. ``v = Venue(market, accounts=["key1"])`` -- every account starts with ``quote_balance`` of each
   quote asset and ``base_balance`` of each base asset of the market's symbols. The venue registers
   itself as a trade listener on the market (if the market supports it).
2. Request handlers (:meth:`Venue.place`, :meth:`Venue.cancel`, :meth:`Venue.cancel_replace`,
   :meth:`Venue.order_status`, :meth:`Venue.open_orders`, :meth:`Venue.cancel_all`,
   :meth:`Venue.account_status`) take ``(account, params, now_ms)`` and either return a result or
   raise :class:`VenueError` (code/msg/status as Binance would send them). A handler that raises
   has changed NOTHING. Handlers that change state return ``(result, events)``.
3. ``events`` is a list of ``(account, payload)``: user-data payloads (``executionReport``,
   ``outboundAccountPosition``) the shell must push to that account's subscriptions, in order.
4. Resting orders fill when the market's walk prints a trade at or through their price
   (:meth:`Venue.on_public_trade`, called by the market's trade listener). Events produced that way
   go to ``event_sink`` (set by the shell), since no request is there to carry them.

Simplifications (documented so that nobody mistakes them for Binance behaviour):
- User orders resting on the book are invisible to the market (they do not add public liquidity).
- A resting order fills at its own price when a public trade prints at or through that price,
  for at most the printed quantity (shared by price, then time priority among user orders).
- Commission is a flat rate on the received asset (0 by default). Self-trade prevention
  (:mod:`~pipeline.sim.venue_stp`): an order without ``selfTradePreventionMode`` takes its
  symbol's ``defaultSelfTradePreventionMode`` (EXPIRE_MAKER unless ``--stp-default``), one
  outside the symbol's allowed set (``--stp-modes``) is refused with -1013 (Binance documents
  no code for it: see ``pipeline.binance.filters.MSG_STP_NOT_ALLOWED``).
- MAX_NUM_ORDERS (200 open orders per account and symbol) is enforced with -1013.
- Only LIMIT, LIMIT_MAKER and MARKET are simulated; other order types get -1116.

Layout: :class:`Venue` is the coordinator that keeps this contract; the work is done by
collaborators, one idea each -- :mod:`~pipeline.sim.venue_params` (errors, enums, parameter
parsing), :mod:`~pipeline.sim.venue_filters` (SymbolRules, request validation),
:mod:`~pipeline.sim.venue_accounts` (balances), :mod:`~pipeline.sim.venue_orders` (order shapes
and the order table), :mod:`~pipeline.sim.venue_matching` (the order lifecycle),
:mod:`~pipeline.sim.venue_reports` (executionReport) and :mod:`~pipeline.sim.venue_market_view`
(the Decimal view of the market).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any

from pipeline.binance.filters import SymbolRules
from pipeline.sim.venue_accounts import Account, AssetBalance, Ledger
from pipeline.sim.venue_filters import OrderValidator, check_qty, check_status, parse_order_ref
from pipeline.sim.venue_market_view import MarketLike, MarketView
from pipeline.sim.venue_matching import MatchingEngine
from pipeline.sim.venue_orders import NewOrder, Order, VenueOrderTable
from pipeline.sim.venue_params import (
    CANCEL_REPLACE_MODES,
    MSG_DUPLICATE,
    MSG_NO_SUCH_ORDER,
    MSG_UNKNOWN_ORDER,
    ZERO,
    VenueError,
    VenueEvent,
    fmt,
    illegal,
    missing,
    not_required,
    param_text,
    parse_cancel_restriction,
    parse_client_id,
    parse_decimal,
    parse_enum,
)
from pipeline.sim.venue_reports import ExecutionReports

__all__ = [
    "Account",
    "AssetBalance",
    "MarketLike",
    "NewOrder",
    "Order",
    "SymbolRules",
    "Venue",
    "VenueError",
    "VenueEvent",
    "fmt",
    "illegal",
    "missing",
    "not_required",
]


class Venue:
    """All accounts and orders of the simulated exchange; the module docstring has the contract.

    A coordinator: it parses each request, asks the filters, and hands the accepted work to the
    matching engine, so that each collaborator holds one idea and callers see one object.
    """

    def __init__(
        self,
        market: MarketLike,
        accounts: Iterable[str] = (),
        *,
        quote_balance: Decimal | str | int = Decimal(1_000_000),
        base_balance: Decimal | str | int = Decimal(100),
        balances: Mapping[str, Decimal | str | int] | None = None,
        maker_commission: Decimal | str = ZERO,
        taker_commission: Decimal | str = ZERO,
        stp_mode: str = "",  # "" = each symbol's defaultSelfTradePreventionMode
        max_num_orders: int = 200,
        fill_on_touch: bool = True,
        max_closed_orders: int = 100_000,
        symbols: Iterable[str] | None = None,
    ) -> None:
        self.market = market
        syms = list(symbols) if symbols is not None else list(getattr(market, "symbols", []))
        self.rules: dict[str, SymbolRules] = {s: market.rules(s) for s in syms}
        view = MarketView(market)
        self.ledger = Ledger(
            self.rules,
            quote_balance=quote_balance,
            base_balance=base_balance,
            balances=balances,
            maker_commission=maker_commission,
            taker_commission=taker_commission,
        )
        self.validator = OrderValidator(self.rules, view)
        self.table = VenueOrderTable(self.rules, max_closed_orders)
        self.counters: dict[str, int] = {
            "orders_placed": 0,
            "orders_rejected": 0,
            "orders_canceled": 0,
            "fills": 0,
            "maker_fills": 0,
        }
        self.engine = MatchingEngine(
            view,
            self.rules,
            self.ledger,
            self.table,
            ExecutionReports(),
            self.counters,
            stp_mode=stp_mode,
            max_num_orders=max_num_orders,
            fill_on_touch=fill_on_touch,
        )
        self.event_sink: Callable[[list[VenueEvent]], None] | None = None
        for name in accounts:
            self.add_account(name)
        add_listener = getattr(market, "add_trade_listener", None)
        if add_listener is not None:
            add_listener(self._trade_listener)

    # ---------------------------------------------------------------- state the shell reads

    @property
    def accounts(self) -> dict[str, Account]:
        return self.ledger.accounts

    @property
    def orders(self) -> dict[int, Order]:
        """Open orders plus a bounded tail of closed ones, by order id."""
        return self.table.orders

    @property
    def first_fill_sink(self) -> Callable[[str], None] | None:
        """Called with the account when one of its orders trades for the first time."""
        return self.engine.first_fill_sink

    @first_fill_sink.setter
    def first_fill_sink(self, sink: Callable[[str], None] | None) -> None:
        self.engine.first_fill_sink = sink

    def add_account(
        self, name: str, balances: Mapping[str, Decimal | str | int] | None = None
    ) -> Account:
        """Create (or return) an account, funded with the configured starting balances."""
        return self.ledger.add_account(name, balances)

    def parse_new_order(self, params: Mapping[str, str], now_ms: int) -> NewOrder:
        """Validate order.place params and the symbol filters (no state is read or changed)."""
        return self.validator.new_order(params)

    def submit(
        self, account: str, spec: NewOrder, now_ms: int
    ) -> tuple[Order, list[dict[str, Any]], list[VenueEvent]]:
        """Run a validated order through the (simulated) matching engine."""
        return self.engine.submit(account, spec, now_ms)

    def find_order(
        self,
        account: str,
        symbol: str,
        order_id: int | None,
        client_id: str | None,
        *,
        open_only: bool,
    ) -> Order | None:
        """By orderId (then checked against client_id, -2039 on mismatch) or by client id."""
        return self.table.find(account, symbol, order_id, client_id, open_only=open_only)

    # ---------------------------------------------------------------- order.place / order.test

    def test_order(self, account: str, params: Mapping[str, str], now_ms: int) -> dict[str, Any]:
        """order.test: validation only, nothing reaches the matching engine (section 2.8)."""
        self.ledger.get(account)
        self.validator.new_order(params)
        if param_text(params, "computeCommissionRates") == "true":
            return self.ledger.commission_rates()
        return {}

    def place(
        self, account: str, params: Mapping[str, str], now_ms: int
    ) -> tuple[dict[str, Any], list[VenueEvent]]:
        """order.place: validate, then submit to the matching engine. Raises VenueError."""
        spec = self.validator.new_order(params)
        try:
            order, fills, events = self.engine.submit(account, spec, now_ms)
        except VenueError:
            self.counters["orders_rejected"] += 1
            raise
        return order.place_result(spec.resp_type, now_ms, fills), events

    # ---------------------------------------------------------------- resting fills

    def _trade_listener(
        self, symbol: str, price: Any, qty: Any, taker_side: Any, now_ms: int
    ) -> None:
        if self.engine.taking:  # our own taker order's prints: never fill our own resting orders
            return
        events = self.engine.on_public_trade(symbol, price, qty, now_ms)
        if events and self.event_sink is not None:
            self.event_sink(events)

    def on_public_trade(self, symbol: str, price: Any, qty: Any, now_ms: int) -> list[VenueEvent]:
        """A public trade printed: fill resting user orders it reached (price, time priority)."""
        return self.engine.on_public_trade(symbol, price, qty, now_ms)

    # ---------------------------------------------------------------- queries / cancel

    def order_status(self, account: str, params: Mapping[str, str]) -> dict[str, Any]:
        """order.status (section 2.12); -2013 when the order is unknown to this account."""
        rules = self.validator.symbol(params)
        oid, cid = parse_order_ref(params, "orderId", "origClientOrderId")
        o = self.table.find(account, rules.symbol, oid, cid, open_only=False)
        if o is None:
            raise VenueError(-2013, MSG_NO_SUCH_ORDER)
        return o.status_result()

    def open_orders(self, account: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """openOrders.status: optional ``symbol``; oldest first."""
        symbols: Iterable[str]
        if param_text(params, "symbol") is not None:
            symbols = [self.validator.symbol(params).symbol]
        else:
            symbols = list(self.table.resting)
        return [o.status_result() for s in symbols for o in self.table.open_of(account, s)]

    def cancel(
        self, account: str, params: Mapping[str, str], now_ms: int
    ) -> tuple[dict[str, Any], list[VenueEvent]]:
        """order.cancel (section 2.9): -2011 "Unknown order sent." for unknown/closed orders."""
        rules = self.validator.symbol(params)
        oid, cid = parse_order_ref(params, "orderId", "origClientOrderId")
        new_cid = parse_client_id(params, "newClientOrderId")
        restriction = parse_cancel_restriction(params)
        order = self._cancel_target(account, rules.symbol, oid, cid, restriction)
        return self.engine.cancel(order, new_cid, now_ms)

    def _cancel_target(
        self,
        account: str,
        symbol: str,
        oid: int | None,
        cid: str | None,
        restriction: str | None,
    ) -> Order:
        order = self.table.find(account, symbol, oid, cid, open_only=True)
        if order is None:
            raise VenueError(-2011, MSG_UNKNOWN_ORDER)
        if (restriction == "ONLY_NEW" and order.status != "NEW") or (
            restriction == "ONLY_PARTIALLY_FILLED" and order.status != "PARTIALLY_FILLED"
        ):
            raise VenueError(-2011, "Order was not canceled due to cancel restrictions.")
        return order

    def cancel_all(
        self, account: str, params: Mapping[str, str], now_ms: int
    ) -> tuple[list[dict[str, Any]], list[VenueEvent]]:
        """openOrders.cancelAll: every open order of the account on ``symbol``; -2011 if none."""
        rules = self.validator.symbol(params)
        mine = self.table.open_of(account, rules.symbol)
        if not mine:
            raise VenueError(-2011, MSG_UNKNOWN_ORDER)
        results: list[dict[str, Any]] = []
        events: list[VenueEvent] = []
        for o in mine:
            res, ev = self.engine.cancel(o, None, now_ms)
            results.append(res)
            events.extend(ev)
        return results, events

    # ---------------------------------------------------------------- amend (section 2.11)

    def amend_keep_priority(
        self, account: str, params: Mapping[str, str], now_ms: int
    ) -> tuple[dict[str, Any], list[VenueEvent]]:
        """order.amend.keepPriority: reduce an open order's quantity, keeping its place.

        -1013 LOT_SIZE for a bad ``newQty``, -2013 unknown/closed order, -2038 when ``newQty``
        is not below the current quantity or not above the executed quantity, -1013
        MAX_NUM_ORDER_AMENDS after 10 amends, -2010 for a ``newClientOrderId`` already open.
        """
        rules = self.validator.symbol(params)
        oid, cid = parse_order_ref(params, "orderId", "origClientOrderId")
        new_cid = parse_client_id(params, "newClientOrderId")
        new_qty = parse_decimal(params, "newQty", required=True, precision=rules.base_precision)
        assert new_qty is not None
        check_status(rules)  # CANCEL_ONLY: an amend is not a cancel (UNCONFIRMED: refuse)
        check_qty(rules, new_qty)
        order = self.table.find(account, rules.symbol, oid, cid, open_only=True)
        if order is None:
            raise VenueError(-2013, MSG_NO_SUCH_ORDER)
        if new_qty >= order.orig_qty:
            raise VenueError(-2038, "Order amend (quantity increase) is not supported.")
        if new_qty <= order.executed_qty:
            raise VenueError(-2038, "Order amend rejected: newQty must exceed executedQty.")
        if order.amends >= 10:
            raise VenueError(-1013, "Filter failure: MAX_NUM_ORDER_AMENDS")
        prev = order.client_order_id
        if (
            new_cid is not None
            and new_cid != prev
            and self.table.has_open_client_id(account, rules.symbol, new_cid)
        ):
            raise VenueError(-2010, MSG_DUPLICATE)
        # ---- accepted
        report, events = self.engine.amend(order, new_qty, new_cid, now_ms)
        result = {
            "transactTime": now_ms,
            "executionId": report["I"],
            "amendedOrder": order.amended_order(prev),
        }
        return result, events

    # ---------------------------------------------------------------- cancelReplace

    def cancel_replace(
        self,
        account: str,
        params: Mapping[str, str],
        now_ms: int,
        *,
        new_order_error: VenueError | None = None,
    ) -> tuple[int, dict[str, Any], list[VenueEvent]]:
        """order.cancelReplace (section 2.10). Returns ``(status, body, events)``.

        ``body`` is the ``result`` object when status is 200, else the ``error`` object
        (``{code,msg,data{cancelResult,newOrderResult,cancelResponse,newOrderResponse}}``).
        Parameter/filter errors of either leg raise :class:`VenueError` before anything happens.
        ``new_order_error`` (set by the shell for orderRateLimitExceededMode=CANCEL_ONLY when the
        unfilled-order limit is hit) fails the new-order leg with that error after the cancel.
        """
        rules = self.validator.symbol(params)
        mode = parse_enum(params, "cancelReplaceMode", CANCEL_REPLACE_MODES, required=True)
        oid, cid = parse_order_ref(params, "cancelOrderId", "cancelOrigClientOrderId")
        cancel_cid = parse_client_id(params, "cancelNewClientOrderId")
        restriction = parse_cancel_restriction(params)
        parse_enum(
            params,
            "orderRateLimitExceededMode",
            ("DO_NOTHING", "CANCEL_ONLY"),
            required=False,
        )
        spec = self.validator.new_order(params)
        assert spec.symbol == rules.symbol
        events: list[VenueEvent] = []
        cancel_resp: dict[str, Any]
        cancel_ok = False
        try:
            target = self._cancel_target(account, rules.symbol, oid, cid, restriction)
            cancel_resp, ev = self.engine.cancel(target, cancel_cid, now_ms)
            events.extend(ev)
            cancel_ok = True
        except VenueError as exc:
            cancel_resp = {"code": exc.code, "msg": exc.msg}
        if not cancel_ok and mode == "STOP_ON_FAILURE":
            return (
                400,
                {
                    "code": -2022,
                    "msg": "Order cancel-replace failed.",
                    "data": {
                        "cancelResult": "FAILURE",
                        "newOrderResult": "NOT_ATTEMPTED",
                        "cancelResponse": cancel_resp,
                        "newOrderResponse": None,
                    },
                },
                events,
            )
        new_resp: dict[str, Any]
        new_ok = False
        try:
            if new_order_error is not None:
                raise new_order_error
            order, fills, ev = self.engine.submit(account, spec, now_ms)
            events.extend(ev)
            new_resp = order.place_result(spec.resp_type, now_ms, fills)
            new_ok = True
        except VenueError as exc:
            self.counters["orders_rejected"] += 1
            new_resp = {"code": exc.code, "msg": exc.msg}
        if cancel_ok and new_ok:
            return (
                200,
                {
                    "cancelResult": "SUCCESS",
                    "newOrderResult": "SUCCESS",
                    "cancelResponse": cancel_resp,
                    "newOrderResponse": new_resp,
                },
                events,
            )
        data = {
            "cancelResult": "SUCCESS" if cancel_ok else "FAILURE",
            "newOrderResult": "SUCCESS" if new_ok else "FAILURE",
            "cancelResponse": cancel_resp,
            "newOrderResponse": new_resp,
        }
        if cancel_ok or new_ok:
            return (
                409,
                {
                    "code": -2021,
                    "msg": "Order cancel-replace partially failed.",
                    "data": data,
                },
                events,
            )
        return 400, {"code": -2022, "msg": "Order cancel-replace failed.", "data": data}, events

    # ---------------------------------------------------------------- account

    # ---------------------------------------------------------------- account

    def account_status(
        self, account: str, params: Mapping[str, str], now_ms: int
    ) -> dict[str, Any]:
        """account.status (section 2.12); ``omitZeroBalances=true`` drops empty assets."""
        return self.ledger.status(account, params)

    def set_symbol_status(self, symbol: str, status: str) -> None:
        """The symbol's status changed (``POST /sim/symbol_status``): new orders are refused
        unless TRADING, cancels are always accepted. Replaced in the one rules table every
        collaborator shares, so nothing holds the old status."""
        self.rules[symbol] = self.rules[symbol].with_status(status)

    def open_order_count(self) -> int:
        return self.table.open_count()

    def open_orders_by_client_id(self) -> dict[str, dict[str, Any]]:
        """For the admin ``/sim/state`` endpoint: every open order keyed by its client order id."""
        return self.table.open_by_client_id()
