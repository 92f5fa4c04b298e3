"""The simulated venue's self-trade prevention: what happens when a taker meets its own account's
resting order (binance-protocol.md 2.7, 7.2; Binance ``faqs/stp_faq.md``).

Why a module of its own: STP is a rule set of its own (six modes, an effective-mode table, the
prevented-quantity arithmetic and the TRADE_PREVENTION report) that only needs the order, the
ledger and the report builder; the matching engine asks it two questions: which resting orders
of the taker's own account does this taker cross (:meth:`SelfTradePrevention.crossing`), and
what happens at one of them (:meth:`SelfTradePrevention.meet`).

Rules (STP FAQ): the **taker's** mode decides; ``TRANSFER`` only if the maker's mode is
``TRANSFER`` too, else ``DECREMENT``; between orders of one account ``TRANSFER`` behaves as
``DECREMENT`` (the simulator has no trade groups, so that is always the case here).

- ``NONE``: the trade happens (both orders fill at the maker's price).
- ``EXPIRE_TAKER`` / ``EXPIRE_MAKER`` / ``EXPIRE_BOTH``: the named order's whole remaining
  quantity is prevented; it ends ``EXPIRED_IN_MATCH``.
- ``DECREMENT``: both orders' prevented quantity grows by the smaller remaining quantity; the
  smaller order (or both, if equal) ends ``EXPIRED_IN_MATCH``, the other stays open, smaller.

Every order STP touches gets an ``executionReport`` with ``x=TRADE_PREVENTION`` (section 2.15:
``l``/``L``/``Y`` 0, ``pl``/``pL``/``pY``, ``v``, ``A``, ``B``, ``U``, ``Cs``). UNCONFIRMED in our
reference and read conservatively here: (a) the order that stays open under DECREMENT gets that
report too, with its status unchanged (the FAQ shows its ``preventedQuantity`` grew, so a client
must hear of it); (b) an STP expiry carries ``eR=NONE``, as the documented expiry reasons have
no STP value and ``X=EXPIRED_IN_MATCH`` already says why; (c) a resting own order is met before
public liquidity at the same price (the venue keeps user orders beside the public book, so
their relative time priority is unknowable).
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from pipeline.sim.venue_accounts import Ledger
from pipeline.sim.venue_orders import Order, VenueOrderTable
from pipeline.sim.venue_params import VenueEvent, fmt
from pipeline.sim.venue_reports import ExecutionReports

EXPIRED_IN_MATCH = "EXPIRED_IN_MATCH"
STP_EXPIRY_REASON = "NONE"  # see the module docstring, (b)

# (taker, maker, now_ms, events, fills) -> None: the self-trade of mode NONE
SelfFill = Callable[[Order, Order, int, list[VenueEvent], list[dict[str, Any]]], None]


def effective_mode(taker_mode: str, maker_mode: str) -> str:
    """The STP FAQ's table: the taker decides, but TRANSFER needs both sides; one account's
    TRANSFER is DECREMENT."""
    if taker_mode == "TRANSFER":
        return "DECREMENT"  # same account (or maker not TRANSFER): behaves as DECREMENT
    return taker_mode


class SelfTradePrevention:
    """Finds a taker's own crossing orders and applies the taker's STP mode at each one."""

    def __init__(
        self,
        ledger: Ledger,
        table: VenueOrderTable,
        reports: ExecutionReports,
        close: Callable[[Order], None],
        self_fill: SelfFill,
    ) -> None:
        self.ledger = ledger
        self.table = table
        self.reports = reports
        self._close = close
        self._self_fill = self_fill
        self._next_match_id: dict[str, int] = {}  # per symbol, as preventedMatchId is
        self.prevented = 0  # prevented matches so far (for tests and the admin view)

    def crossing(self, taker: Order, limit: Decimal | None) -> list[Order]:
        """The taker account's resting orders on the other side that ``limit`` reaches (all of
        them when None: MARKET), best price first, then oldest."""
        book = self.table.resting.get(taker.symbol)
        if not book:
            return []
        buy = taker.side == "BUY"
        own = [
            o
            for o in book
            if o.account == taker.account
            and o.side != taker.side
            and (limit is None or (o.price <= limit if buy else o.price >= limit))
        ]
        if len(own) > 1:
            own.sort(key=lambda o: (o.price if buy else -o.price, o.time, o.order_id))
        return own

    def meet(
        self,
        taker: Order,
        maker: Order,
        now_ms: int,
        events: list[VenueEvent],
        fills: list[dict[str, Any]],
    ) -> None:
        """The taker reached its own ``maker``: trade (NONE) or prevent per the taker's mode."""
        mode = effective_mode(taker.stp_mode, maker.stp_mode)
        if mode == "NONE":
            self._self_fill(taker, maker, now_ms, events, fills)
            return
        match_id = self._next_match_id.get(taker.symbol, 0)
        self._next_match_id[taker.symbol] = match_id + 1
        self.prevented += 1
        taker_q = maker_q = Decimal(0)
        if mode == "EXPIRE_TAKER":
            taker_q = taker.remaining
        elif mode == "EXPIRE_MAKER":
            maker_q = maker.remaining
        elif mode == "EXPIRE_BOTH":
            taker_q, maker_q = taker.remaining, maker.remaining
        else:  # DECREMENT (and TRANSFER within one account)
            taker_q = maker_q = min(taker.remaining, maker.remaining)
        entry: dict[str, Any] = {
            "preventedMatchId": match_id,
            "makerOrderId": maker.order_id,
            "price": fmt(maker.price),
        }
        if taker_q:
            entry["takerPreventedQuantity"] = fmt(taker_q)
        if maker_q:
            entry["makerPreventedQuantity"] = fmt(maker_q)
        taker.prevented_matches.append(entry)
        if maker_q:
            self._prevent(maker, maker_q, match_id, taker.order_id, maker.price, now_ms, events)
            if not maker.is_open:
                self._close(maker)
        if taker_q:
            # the taker is closed by the engine once its walk ends
            self._prevent(taker, taker_q, match_id, maker.order_id, maker.price, now_ms, events)

    def _prevent(
        self,
        order: Order,
        q: Decimal,
        match_id: int,
        counter_id: int,
        px: Decimal,
        now_ms: int,
        events: list[VenueEvent],
    ) -> None:
        """``q`` of ``order`` is prevented: it expires in match if nothing is left, else what
        ``q`` reserved goes back to free and the order stays open, smaller."""
        order.prevented_qty += q
        order.prevented_match_id = match_id
        order.update_time = now_ms
        expired = order.remaining <= 0
        if expired:
            order.status = EXPIRED_IN_MATCH
        elif order.locked:
            self.ledger.release_part(order, order.price * q if order.side == "BUY" else q)
        report = self.reports.report(
            order,
            "TRADE_PREVENTION",
            now_ms,
            prevented=(q, px, counter_id),
            expiry_reason=STP_EXPIRY_REASON if expired else None,
        )
        events.append((order.account, report))
