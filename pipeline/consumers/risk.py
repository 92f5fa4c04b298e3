"""Risk: positions and notional per symbol from execution reports, limits the trading process
enforces before it sends an order.

Data flow::

    trading --exec ring (pipeline.trading.exec)--> risk <--tick ring-- ingest
    risk --limits table (/dev/shm/pipeline.risk.limits, a MetricsBlock)--> trading (pre-trade check)

Pieces (pure first):

* :class:`RiskBook` - per symbol: position (from fills: the *increase* of ``cum_qty`` per
  client order id, so a repeated execution record never double counts), open buy/sell
  quantity (working orders), mark price (last trade, else book mid), notional = |pos| * mark.
* :class:`RiskLimits` - max |position| and max notional per symbol (with defaults), max notional
  of one order, and a ``halt`` switch.
* Stale books: a BOOK_STALE tick marks the symbol's book stale until its next depth record
  (DEPTH_TOP, DEPTH_LEVEL, BOOK_RESYNC); with ``block_stale_books`` (the default) its orders
  are refused meanwhile, so nothing is priced off a frozen book by a strategy that missed it.
* :func:`check_order` - the pre-trade check over a *snapshot* of the table (a plain dict):
  returns None (allowed) or a reason that names the limit, e.g.
  ``"max_position BTCUSDT: 0.4 + open buys 0.1 + order 0.2 = 0.7 > 0.5"``.
  Worst case is assumed: an order is checked as if it and every working order on the same side
  filled completely.
* :class:`LimitsTable` - the writer of the shared table; :class:`LimitsView` - what the trading
  process attaches to (``LimitsView.attach(name).check(symbol, side, qty, price)``).

Heartbeat: the table is republished at least every ``heartbeat_s`` (0.5 s;
``heartbeat_interval_ms`` in the table) while the process runs, also while the tick ring does
not exist yet (positions still come from the exec ring then; ``tick_ring_attached`` is 0 and no
mark is known, so MARKET orders are refused for want of a price).

Fail closed: a view whose writer (the risk process) is dead, or whose table is older than
``max_age_s``, rejects every order with a reason saying so. A symbol not in the table is
rejected too (its limits are unknown).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.consumers import symbol_names, symbol_of
from pipeline.ipc.records import Kind, StaleBooks

log = logging.getLogger("pipeline.risk")

# pipeline.session.ExecKind / OrderStatus values (kept as ints: this module must not need the
# session's import graph to run the check inside the trading process's hot path)
EXEC_TRADE = 3
OPEN_STATUSES = frozenset(
    {0, 1, 2, 7, 9}
)  # PENDING, NEW, PARTIALLY_FILLED, UNKNOWN, PENDING_CANCEL
SIDE_NAMES = ("", "BUY", "SELL")

PER_SYMBOL = ("pos", "open_buy", "open_sell", "mark", "notional", "max_pos", "max_notional",
              "book_stale")
GLOBAL_FIELDS = (
    ("halt", "<i8"),
    ("max_order_notional", "<f8"),
    ("updated_ns", "<i8"),
    ("exec_records", "<i8"),
    ("fills", "<i8"),
    ("ticks", "<i8"),
    ("heartbeat_interval_ms", "<i8"),  # pipeline health: stale after 3 intervals (min 2 s)
    ("tick_ring_attached", "<i8"),
    ("block_stale_books", "<i8"),
)


def field_name(symbol: str, what: str) -> str:
    """Table field for ``symbol``'s ``what`` (``s_BTCUSDT__pos``): identifiers even for
    symbols that start with a digit."""
    return f"s_{symbol}__{what}"


# ------------------------------------------------------------------------------------------------
# pure core


@dataclass
class RiskLimits:
    max_position: dict[str, float] = field(default_factory=dict)
    max_notional: dict[str, float] = field(default_factory=dict)
    default_max_position: float = 10.0
    default_max_notional: float = 1e6
    max_order_notional: float = 1e5
    block_stale_books: bool = True

    def position_limit(self, symbol: str) -> float:
        return self.max_position.get(symbol, self.default_max_position)

    def notional_limit(self, symbol: str) -> float:
        return self.max_notional.get(symbol, self.default_max_notional)

    @classmethod
    def from_config(cls, rc: Any) -> RiskLimits:
        return cls(
            max_position=dict(rc.max_position), max_notional=dict(rc.max_notional),
            default_max_position=rc.default_max_position,
            default_max_notional=rc.default_max_notional,
            max_order_notional=rc.max_order_notional,
            block_stale_books=rc.block_stale_books,
        )  # fmt: skip


@dataclass
class _Order:
    symbol: str
    side: str
    qty: float
    cum: float = 0.0
    open: bool = True


@dataclass
class SymbolRisk:
    pos: float = 0.0
    open_buy: float = 0.0
    open_sell: float = 0.0
    mark: float = math.nan

    @property
    def notional(self) -> float:
        return abs(self.pos) * self.mark if math.isfinite(self.mark) else 0.0


class RiskBook:
    """Positions from execution records, marks from ticks. Pure: records in, state out."""

    def __init__(self, symbols: Iterable[str] = ()) -> None:
        self.symbols: dict[str, SymbolRisk] = {s: SymbolRisk() for s in symbols}
        self.orders: dict[str, _Order] = {}
        self.exec_records = 0
        self.fills = 0
        self.ticks = 0
        self.stale_books = StaleBooks()

    def _sym(self, symbol: str) -> SymbolRisk:
        st = self.symbols.get(symbol)
        if st is None:
            st = self.symbols[symbol] = SymbolRisk()
        return st

    def on_exec(
        self, *, symbol: str, side: str, client_order_id: str, kind: int, status: int,
        qty: float, cum_qty: float,
    ) -> float:  # fmt: skip
        """Apply one execution record; returns the position change it caused."""
        self.exec_records += 1
        if not symbol or not client_order_id or side not in ("BUY", "SELL"):
            return 0.0
        st = self._sym(symbol)
        order = self.orders.get(client_order_id)
        if order is None:
            order = self.orders[client_order_id] = _Order(symbol, side, qty)
        else:
            self._add_open(st, order, -1)  # take out its working qty; re-added below if open
        if qty > 0:
            order.qty = qty
        delta = 0.0
        if cum_qty > order.cum:
            filled = cum_qty - order.cum
            order.cum = cum_qty
            delta = filled if side == "BUY" else -filled
            st.pos += delta
            self.fills += 1
        order.open = status in OPEN_STATUSES
        self._add_open(st, order, +1)
        if not order.open:
            del self.orders[client_order_id]
        return delta

    @staticmethod
    def _add_open(st: SymbolRisk, order: _Order, sign: int) -> None:
        if not order.open:
            return
        remaining = max(0.0, order.qty - order.cum) * sign
        if order.side == "BUY":
            st.open_buy = max(0.0, st.open_buy + remaining)
        else:
            st.open_sell = max(0.0, st.open_sell + remaining)

    def on_mark(self, symbol: str, price: float) -> None:
        if price > 0 and math.isfinite(price):
            self._sym(symbol).mark = price
            self.ticks += 1

    def on_ticks(self, batch: np.ndarray, names: list[str]) -> None:
        """Marks from a tick batch: trade prices, else book mids; the last per symbol wins."""
        self.stale_books.update(batch, names)
        kinds = batch["kind"]
        trades = np.isin(kinds, (int(Kind.AGG_TRADE), int(Kind.TRADE)))
        books = np.isin(kinds, (int(Kind.BOOK_TICKER), int(Kind.DEPTH_TOP)))
        for rec in batch[trades | books]:
            sym = symbol_of(names, int(rec["symbol"]))
            if int(rec["kind"]) in (int(Kind.AGG_TRADE), int(Kind.TRADE)):
                self.on_mark(sym, float(rec["price"]))
            elif rec["bid_price"] > 0 and rec["ask_price"] > 0:
                self.on_mark(sym, (float(rec["bid_price"]) + float(rec["ask_price"])) / 2)

    def table(self, limits: RiskLimits, halt: bool, now_ns: int) -> dict[str, float]:
        """The flat field -> value mapping the limits table holds."""
        out: dict[str, float] = {
            "halt": int(halt), "max_order_notional": limits.max_order_notional,
            "updated_ns": now_ns, "exec_records": self.exec_records, "fills": self.fills,
            "ticks": self.ticks, "block_stale_books": int(limits.block_stale_books),
        }  # fmt: skip
        for sym, st in self.symbols.items():
            out[field_name(sym, "pos")] = st.pos
            out[field_name(sym, "open_buy")] = st.open_buy
            out[field_name(sym, "open_sell")] = st.open_sell
            out[field_name(sym, "mark")] = st.mark if math.isfinite(st.mark) else 0.0
            out[field_name(sym, "notional")] = st.notional
            out[field_name(sym, "max_pos")] = limits.position_limit(sym)
            out[field_name(sym, "max_notional")] = limits.notional_limit(sym)
            out[field_name(sym, "book_stale")] = int(sym in self.stale_books.names)
        return out


def check_order(
    table: Mapping[str, float], symbol: str, side: str, qty: float, price: float = 0.0
) -> str | None:
    """Pre-trade check against a limits-table snapshot. None = allowed, else the reason (which
    names the limit). ``price`` 0 (MARKET) uses the table's mark price."""
    if table.get("halt"):
        return "halt: trading halted by risk"
    pos_key = field_name(symbol, "pos")
    if pos_key not in table:
        return f"unknown_symbol {symbol}: no risk limits for it"
    if side not in ("BUY", "SELL"):
        return f"bad_side {side!r}"
    if not (qty > 0 and math.isfinite(qty)):
        return f"bad_qty {qty!r}"
    if table.get("block_stale_books") and table.get(field_name(symbol, "book_stale")):
        return (f"stale_book {symbol}: its order book is not current (BOOK_STALE); orders wait "
                "until it is (risk.block_stale_books)")
    mark = float(table.get(field_name(symbol, "mark"), 0.0))
    px = price if price > 0 else mark
    if not px > 0:
        return f"no_price {symbol}: MARKET order and no mark price yet"
    notional = qty * px
    max_order = float(table.get("max_order_notional", math.inf))
    if notional > max_order:
        return f"max_order_notional: order notional {notional:g} > {max_order:g}"
    pos = float(table[pos_key])
    if side == "BUY":
        open_same = float(table.get(field_name(symbol, "open_buy"), 0.0))
        worst = pos + open_same + qty
        what = "open buys"
    else:
        open_same = float(table.get(field_name(symbol, "open_sell"), 0.0))
        worst = pos - open_same - qty
        what = "open sells"
    max_pos = float(table.get(field_name(symbol, "max_pos"), math.inf))
    if abs(worst) > max_pos and abs(worst) > abs(pos):
        return (
            f"max_position {symbol}: {pos:g} {'+' if side == 'BUY' else '-'} {what} {open_same:g}"
            f" {'+' if side == 'BUY' else '-'} order {qty:g} = {worst:g}, limit {max_pos:g}"
        )
    max_notional = float(table.get(field_name(symbol, "max_notional"), math.inf))
    worst_notional = abs(worst) * (mark if mark > 0 else px)
    if worst_notional > max_notional and abs(worst) > abs(pos):
        return (
            f"max_notional {symbol}: |{worst:g}| x {mark if mark > 0 else px:g} = "
            f"{worst_notional:g} > {max_notional:g}"
        )
    return None


# ------------------------------------------------------------------------------------------------
# shared table


def table_fields(symbols: Iterable[str]) -> list[tuple[str, str]]:
    fields = list(GLOBAL_FIELDS)
    for sym in symbols:
        fields += [(field_name(sym, w), "<f8") for w in PER_SYMBOL]
    return fields


class LimitsTable:
    """Owner of the limits table (the risk process). Symbols are fixed at creation."""

    def __init__(self, name: str, symbols: Iterable[str]) -> None:
        from pipeline.ipc.metrics import MetricsBlock

        self.symbols = list(dict.fromkeys(symbols))
        self.block = MetricsBlock.create(name, table_fields(self.symbols))
        self._names = {n for n, _ in self.block.fields}

    def publish(self, values: Mapping[str, float]) -> None:
        known = {k: v for k, v in values.items() if k in self._names}
        self.block.set(**known)

    def close(self) -> None:
        self.block.close()


class LimitsView:
    """The trading process's side: ``check(symbol, side, qty, price) -> reason | None``.

    Each check takes a fresh seqlock snapshot (a few microseconds), so it always sees the
    latest positions. Fails closed when the risk process is gone or the table is stale.
    """

    def __init__(
        self, block: Any, max_age_s: float = 5.0, now_ns: Callable[[], int] = time.time_ns
    ):
        self.block = block
        self.max_age_s = max_age_s
        self._now_ns = now_ns

    @classmethod
    def attach(cls, name: str = "pipeline.risk.limits", max_age_s: float = 5.0) -> LimitsView:
        """Raises ``pipeline.ipc.metrics.MetricsNotFoundError`` when the risk process never ran."""
        from pipeline.ipc.metrics import MetricsBlock

        return cls(MetricsBlock.attach(name), max_age_s)

    def check(self, symbol: str, side: str, qty: float, price: float = 0.0) -> str | None:
        if not self.block.writer_alive():
            return "risk_unavailable: the risk process is not running"
        snap = self.block.snapshot()
        age = (self._now_ns() - int(snap.get("updated_ns", 0))) / 1e9
        if age > self.max_age_s:
            return f"risk_stale: limits table not updated for {age:.1f}s"
        return check_order(snap, symbol, side, qty, price)

    def close(self) -> None:
        self.block.close()


# ------------------------------------------------------------------------------------------------
# consumer shell


def _decode(b: Any) -> str:
    return bytes(b).rstrip(b"\x00").decode("utf-8", "replace")


class Risk:
    """Reads ticks (run_consumer's ring) and the exec ring (polled here), publishes the table."""

    tick_interval_s = 0.01  # the exec ring is polled on every tick: keep the table fresh

    def __init__(
        self, book: RiskBook, limits: RiskLimits, table: Any, exec_ring: str,
        *, clock_ns: Callable[[], int] = time.time_ns, heartbeat_s: float = 0.5,
    ) -> None:  # fmt: skip
        self.book = book
        self.limits = limits
        self.table = table
        self.exec_ring = exec_ring
        self.exec_reader: Any = None
        self.halt = False
        self._clock_ns = clock_ns
        self._heartbeat_ns = int(heartbeat_s * 1e9)
        self._last_publish = 0
        self._dirty = True
        self._next_attach = 0.0
        self._tick_ring = False
        self._refused = ""

    def _poll_exec(self, now: float) -> None:
        if self.exec_reader is None:
            if now < self._next_attach:
                return
            self._next_attach = now + 0.5
            from pipeline.ipc.segments import RingError, RingReader

            try:
                self.exec_reader = RingReader.attach(
                    self.exec_ring, "risk", start="oldest", check_interval_s=3600.0,
                    idle="balanced",
                )  # fmt: skip
            except (RingError, FileNotFoundError) as exc:
                from pipeline.ipc.shm import UntrustedSegmentError

                if isinstance(exc, UntrustedSegmentError) and str(exc) != self._refused:
                    self._refused = str(exc)  # once per reason; retried every 0.5 s
                    log.error(
                        "exec ring %s refused: %s", self.exec_ring, exc,
                        extra={"event": "ring_untrusted", "ring": self.exec_ring},
                    )  # fmt: skip
                return
            log.info(
                "exec ring attached", extra={"event": "risk_exec_attached", "ring": self.exec_ring}
            )
        self.exec_reader.check_writer()
        while True:
            recs = self.exec_reader.poll(4096)
            if not len(recs):
                break
            for r in recs:
                side_i = int(r["side"])
                self.book.on_exec(
                    symbol=_decode(r["symbol"]), side=SIDE_NAMES[side_i] if side_i < 3 else "",
                    client_order_id=_decode(r["client_order_id"]), kind=int(r["kind"]),
                    status=int(r["status"]), qty=float(r["qty"]), cum_qty=float(r["cum_qty"]),
                )  # fmt: skip
            self._dirty = True

    def _publish(self) -> None:
        now_ns = self._clock_ns()
        if self._dirty or now_ns - self._last_publish >= self._heartbeat_ns:
            values = self.book.table(self.limits, self.halt, now_ns)
            values["heartbeat_interval_ms"] = self._heartbeat_ns // 1_000_000
            values["tick_ring_attached"] = int(self._tick_ring)
            self.table.publish(values)
            self._last_publish = now_ns
            self._dirty = False

    def heartbeat(self, now: float) -> None:
        """While the tick ring is missing (run_consumer waits for it): positions from the exec
        ring still count, and the table stays fresh."""
        self._tick_ring = False
        self._poll_exec(now)
        self._publish()

    def on_batch(self, batch: np.ndarray, reader: Any) -> None:
        self._tick_ring = True
        self.book.on_ticks(batch, symbol_names(reader))
        self._dirty = True
        self._poll_exec(time.monotonic())
        self._publish()

    def on_tick(self, reader: Any, now: float) -> None:
        self._tick_ring = True
        self._poll_exec(now)
        self._publish()

    def close(self) -> None:
        if self.exec_reader is not None:
            self.exec_reader.close()
        self.table.close()


def from_args(args: argparse.Namespace, cfg: Any) -> Risk:
    # Load the ring shells before the table exists, as the process did when ring.py held them
    # (imported early by the CLI): the table is visible from its creation but first published at
    # the first heartbeat, and an import in between (~10 ms) would show readers (pipeline health)
    # a table whose heartbeat_interval_ms is still 0 for that long.
    import pipeline.ipc.segments  # noqa: F401

    limits = RiskLimits.from_config(cfg.risk)
    symbols = list(dict.fromkeys([*cfg.ingest.symbols, *limits.max_position, *limits.max_notional]))
    name = args.limits_name or cfg.risk.limits_name
    table = LimitsTable(name, symbols)
    return Risk(RiskBook(symbols), limits, table, args.exec_ring or cfg.ring.exec_name)


__all__ = [
    "LimitsTable",
    "LimitsView",
    "RiskBook",
    "RiskLimits",
    "check_order",
    "field_name",
    "table_fields",
]
