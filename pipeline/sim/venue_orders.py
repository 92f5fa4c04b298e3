"""The simulated venue's orders: the validated request, one order's state and wire shapes, and
the table of every order the venue knows.

Why a module of its own: an order's shapes (section 2.7 place, 2.9 cancel, 2.11 amend, 2.12
status) and the bookkeeping that finds orders again (ids, client ids, the resting list per symbol,
a bounded tail of closed orders) change together and do not depend on balances or matching.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pipeline.sim.venue_params import OPEN_STATUSES, ZERO, VenueError, fmt


@dataclass
class NewOrder:
    """A validated order.place request (filters passed; the matching engine has not seen it)."""

    symbol: str
    side: str
    type: str
    tif: str
    price: Decimal  # 0 for MARKET
    qty: Decimal  # 0 for MARKET by quoteOrderQty until sized against the book
    quote_qty: Decimal  # quoteOrderQty, 0 if not used
    client_order_id: str | None
    resp_type: str
    stp_mode: str | None = None
    strategy_id: int | None = None
    strategy_type: int | None = None


@dataclass
class Order:
    """One order's full state, as order.status reports it."""

    account: str
    symbol: str
    order_id: int
    client_order_id: str
    side: str
    type: str
    tif: str
    price: Decimal
    orig_qty: Decimal
    orig_quote_qty: Decimal
    time: int
    stp_mode: str
    executed_qty: Decimal = ZERO
    cum_quote: Decimal = ZERO
    status: str = "NEW"
    update_time: int = 0
    working_time: int = -1
    locked: Decimal = ZERO  # still reserved for the unfilled part (quote if BUY, base if SELL)
    cancel_client_id: str = ""
    amends: int = 0
    strategy_id: int | None = None
    strategy_type: int | None = None
    # self-trade prevention (faqs/stp_faq.md): quantity expired by STP over the order's life,
    # its last prevented match, and (taker only) the matches for the FULL place response
    prevented_qty: Decimal = ZERO
    prevented_match_id: int = -1
    prevented_matches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def remaining(self) -> Decimal:
        """Quantity still available: ``origQty - executedQty - preventedQuantity`` (STP FAQ)."""
        return self.orig_qty - self.executed_qty - self.prevented_qty

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    def _common(self) -> dict[str, Any]:
        return {
            "price": fmt(self.price),
            "origQty": fmt(self.orig_qty),
            "executedQty": fmt(self.executed_qty),
            "origQuoteOrderQty": fmt(self.orig_quote_qty),
            "cummulativeQuoteQty": fmt(self.cum_quote),
            "status": self.status,
            "timeInForce": self.tif,
            "type": self.type,
            "side": self.side,
        }

    def _strategy(self, out: dict[str, Any]) -> None:
        if self.strategy_id is not None:
            out["strategyId"] = self.strategy_id
        if self.strategy_type is not None:
            out["strategyType"] = self.strategy_type

    def _prevented(self, out: dict[str, Any]) -> None:
        """``preventedMatchId`` / ``preventedQuantity``: only on an order STP touched."""
        if self.prevented_match_id >= 0:
            out["preventedMatchId"] = self.prevented_match_id
            out["preventedQuantity"] = fmt(self.prevented_qty)

    def ack(self, transact_time: int) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "orderId": self.order_id,
            "orderListId": -1,
            "clientOrderId": self.client_order_id,
            "transactTime": transact_time,
        }

    def place_result(
        self, resp_type: str, transact_time: int, fills: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """order.place result in the ACK / RESULT / FULL shape (section 2.7)."""
        out = self.ack(transact_time)
        if resp_type == "ACK":
            return out
        out.update(self._common())
        out["workingTime"] = self.working_time
        self._strategy(out)
        if resp_type == "FULL":
            out["fills"] = fills
            if self.prevented_matches:
                out["preventedMatches"] = self.prevented_matches
        out["selfTradePreventionMode"] = self.stp_mode
        self._prevented(out)
        return out

    def cancel_result(self, transact_time: int) -> dict[str, Any]:
        """order.cancel result (section 2.9); clientOrderId is the cancel's id."""
        out: dict[str, Any] = {
            "symbol": self.symbol,
            "origClientOrderId": self.client_order_id,
            "orderId": self.order_id,
            "orderListId": -1,
            "clientOrderId": self.cancel_client_id,
            "transactTime": transact_time,
        }
        out.update(self._common())
        self._strategy(out)
        out["selfTradePreventionMode"] = self.stp_mode
        return out

    def status_result(self) -> dict[str, Any]:
        """order.status / openOrders.status element (section 2.12)."""
        out: dict[str, Any] = {
            "symbol": self.symbol,
            "orderId": self.order_id,
            "orderListId": -1,
            "clientOrderId": self.client_order_id,
        }
        out.update(self._common())
        out["stopPrice"] = fmt(ZERO)
        out["icebergQty"] = fmt(ZERO)
        out["time"] = self.time
        out["updateTime"] = self.update_time
        out["isWorking"] = self.working_time >= 0
        out["workingTime"] = self.working_time
        self._strategy(out)
        out["selfTradePreventionMode"] = self.stp_mode
        self._prevented(out)
        return out

    def amended_order(self, prev_client_id: str) -> dict[str, Any]:
        """The ``amendedOrder`` member of order.amend.keepPriority (section 2.11)."""
        return {
            "symbol": self.symbol,
            "orderId": self.order_id,
            "orderListId": -1,
            "origClientOrderId": prev_client_id,
            "clientOrderId": self.client_order_id,
            "price": fmt(self.price),
            "qty": fmt(self.orig_qty),
            "executedQty": fmt(self.executed_qty),
            "preventedQty": fmt(self.prevented_qty),
            "quoteOrderQty": fmt(self.orig_quote_qty),
            "cumulativeQuoteQty": fmt(self.cum_quote),  # sic: single m in amend responses
            "status": self.status,
            "timeInForce": self.tif,
            "type": self.type,
            "side": self.side,
            "workingTime": self.working_time,
            "selfTradePreventionMode": self.stp_mode,
        }


class VenueOrderTable:
    """Every order the venue knows, and the indexes that find one again.

    Holds open orders plus a bounded tail of closed ones (``max_closed_orders``), so that
    order.status answers for recent orders without the table growing forever. Knows nothing of
    balances: releasing what an order reserved is the ledger's job, done before :meth:`retire`.
    """

    def __init__(self, symbols: Iterable[str], max_closed_orders: int) -> None:
        self.max_closed_orders = max_closed_orders
        self.orders: dict[int, Order] = {}  # open orders + a bounded tail of closed ones
        self._closed: OrderedDict[int, None] = OrderedDict()
        self._open_by_cid: dict[tuple[str, str, str], int] = {}  # (account, symbol, cid) -> id
        self._last_by_cid: dict[tuple[str, str, str], int] = {}  # incl. closed orders
        self.resting: dict[str, list[Order]] = {s: [] for s in symbols}  # resting user orders
        self._next_order_id = 1
        self._next_cid = 1

    def next_order_id(self) -> int:
        n = self._next_order_id
        self._next_order_id += 1
        return n

    def gen_client_id(self) -> str:
        """A client order id for a request that sent none, shaped like the exchange's own."""
        n = self._next_cid
        self._next_cid += 1
        return f"sim{n:019d}"

    def has_open_client_id(self, account: str, symbol: str, client_id: str) -> bool:
        return (account, symbol, client_id) in self._open_by_cid

    def resting_count(self, account: str, symbol: str) -> int:
        """Open orders of one account on one symbol (the MAX_NUM_ORDERS filter counts these)."""
        return sum(1 for o in self.resting[symbol] if o.account == account)

    def add(self, order: Order) -> None:
        """An accepted order: known by id and by client id from now on."""
        key = (order.account, order.symbol, order.client_order_id)
        self.orders[order.order_id] = order
        self._open_by_cid[key] = order.order_id
        self._last_by_cid[key] = order.order_id

    def rest(self, order: Order) -> None:
        self.resting[order.symbol].append(order)

    def rename(self, order: Order, new_client_id: str) -> None:
        """An amend gave the open order a new client id: the old one is free again."""
        self._open_by_cid.pop((order.account, order.symbol, order.client_order_id), None)
        order.client_order_id = new_client_id
        key = (order.account, order.symbol, new_client_id)
        self._open_by_cid[key] = order.order_id
        self._last_by_cid[key] = order.order_id

    def retire(self, order: Order) -> None:
        """Order left the book: free its client id, keep it findable in the closed tail."""
        self._open_by_cid.pop((order.account, order.symbol, order.client_order_id), None)
        book = self.resting[order.symbol]
        if order in book:
            book.remove(order)
        self._closed[order.order_id] = None
        while len(self._closed) > self.max_closed_orders:
            old, _ = self._closed.popitem(last=False)
            gone = self.orders.pop(old, None)
            if gone is not None:
                key = (gone.account, gone.symbol, gone.client_order_id)
                if self._last_by_cid.get(key) == old:
                    del self._last_by_cid[key]

    def find(
        self,
        account: str,
        symbol: str,
        order_id: int | None,
        client_id: str | None,
        *,
        open_only: bool,
    ) -> Order | None:
        """By orderId (then checked against client_id, -2039 on mismatch) or by client id."""
        if order_id is not None:
            o = self.orders.get(order_id)
            if o is None or o.account != account or o.symbol != symbol:
                return None
            if client_id is not None and client_id != o.client_order_id:
                raise VenueError(-2039, "Client order id is not valid.")
        else:
            assert client_id is not None
            key = (account, symbol, client_id)
            oid = self._open_by_cid.get(key)
            if oid is None and not open_only:
                oid = self._last_by_cid.get(key)
            o = self.orders.get(oid) if oid is not None else None
        if o is not None and open_only and not o.is_open:
            return None
        return o

    def open_of(self, account: str, symbol: str) -> list[Order]:
        """One account's open orders on ``symbol``, oldest first."""
        return sorted(
            (o for o in self.resting[symbol] if o.account == account), key=lambda o: o.order_id
        )

    def open_count(self) -> int:
        return sum(len(b) for b in self.resting.values())

    def open_by_client_id(self) -> dict[str, dict[str, Any]]:
        """For the admin ``/sim/state`` endpoint: every open order keyed by its client order id."""
        out: dict[str, dict[str, Any]] = {}
        for book in self.resting.values():
            for o in book:
                out[o.client_order_id] = {
                    "account": o.account,
                    "symbol": o.symbol,
                    "orderId": o.order_id,
                    "side": o.side,
                    "type": o.type,
                    "price": fmt(o.price),
                    "origQty": fmt(o.orig_qty),
                    "executedQty": fmt(o.executed_qty),
                    "status": o.status,
                }
        return out
