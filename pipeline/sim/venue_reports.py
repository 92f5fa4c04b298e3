"""The simulated venue's execution reports: the ``executionReport`` user-data event (2.15).

Why a module of its own: the report is the widest wire shape of the venue (30-odd one-letter
fields) and it owns the execution id sequence, which every report of every order shares.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pipeline.sim.venue_orders import Order
from pipeline.sim.venue_params import ZERO, fmt


class ExecutionReports:
    """Builds ``executionReport`` payloads and numbers them (``I``, the execution id)."""

    def __init__(self) -> None:
        self._next_exec_id = 1

    def report(
        self,
        o: Order,
        x: str,
        now_ms: int,
        *,
        last_qty: Decimal = ZERO,
        last_px: Decimal = ZERO,
        commission: Decimal | None = None,
        commission_asset: str | None = None,
        trade_id: int = -1,
        maker: bool = False,
        cancel: bool = False,
        prev_client_id: str = "",
        expiry_reason: str | None = None,
        prevented: tuple[Decimal, Decimal, int] | None = None,
    ) -> dict[str, Any]:
        """One ``executionReport`` of ``o`` with execution type ``x`` (NEW, TRADE, CANCELED,
        EXPIRED, REPLACED, TRADE_PREVENTION); ``cancel`` swaps the client ids as a cancel
        reports them. ``expiry_reason`` is ``eR`` (sent only when given: the docs list it as
        conditional). ``prevented`` = (last prevented qty, match price, counter order id) of a
        TRADE_PREVENTION report: its ``l``/``L``/``Y`` stay 0 and ``pl``/``pL``/``pY`` carry the
        values (section 2.15), with ``v``/``A``/``B``/``U``/``Cs``."""
        exec_id = self._next_exec_id
        self._next_exec_id += 1
        ev: dict[str, Any] = {
            "e": "executionReport",
            "E": now_ms,
            "s": o.symbol,
            "c": o.cancel_client_id if cancel else o.client_order_id,
            "S": o.side,
            "o": o.type,
            "f": o.tif,
            "q": fmt(o.orig_qty),
            "p": fmt(o.price),
            "P": fmt(ZERO),
            "F": fmt(ZERO),
            "g": -1,
            "C": o.client_order_id if cancel else prev_client_id,
            "x": x,
            "X": o.status,
            "r": "NONE",
            "i": o.order_id,
            "l": fmt(last_qty),
            "z": fmt(o.executed_qty),
            "L": fmt(last_px),
            "n": fmt(commission) if commission is not None else "0",
            "N": commission_asset,
            "T": now_ms,
            "t": trade_id,
            "I": exec_id,
            "w": o.is_open,
            "m": maker,
            "M": x == "TRADE",
            "O": o.time,
            "Z": fmt(o.cum_quote),
            "Y": fmt(last_qty * last_px),
            "Q": fmt(o.orig_quote_qty),
        }
        if o.working_time >= 0:
            ev["W"] = o.working_time
        ev["V"] = o.stp_mode
        if o.strategy_id is not None:
            ev["j"] = o.strategy_id
        if o.strategy_type is not None:
            ev["J"] = o.strategy_type
        if prevented is not None:
            last, px, counter_id = prevented
            ev["v"] = o.prevented_match_id
            ev["A"] = fmt(o.prevented_qty)
            ev["B"] = fmt(last)
            ev["U"] = counter_id
            ev["Cs"] = o.symbol
            ev["pl"] = fmt(last)
            ev["pL"] = fmt(px)
            ev["pY"] = fmt(last * px)
        if expiry_reason is not None:
            ev["eR"] = expiry_reason
        return ev
