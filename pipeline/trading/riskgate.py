"""The pre-trade risk check of the trading process (``pipeline trade --risk-limits NAME``).

Why apart from the process: it is a small state machine of its own (the limits table it
attaches and re-attaches, plus the orders it has let through that the table cannot know yet),
testable with a fake table and injected clocks, and nothing in it touches a socket.

Every place and modify is checked against the risk consumer's limits table
(:class:`pipeline.consumers.risk.LimitsView`) plus this process's own in-flight orders; a refused
order never reaches the exchange and is answered on the exec ring with a REJECT, ``error_code``
:data:`pipeline.trading.wire.LOCAL_RISK` and ``error_msg`` naming the limit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from pipeline.ipc.metrics import MetricsError
from pipeline.trading.wire import ExecKind, OrderStatus

log = logging.getLogger("pipeline.trading")


@dataclass(slots=True)
class _InFlight:
    symbol: str
    side: str
    qty: float
    exec_seq: int | None = None  # exec ring cursor once its first record was published
    seen_ns: int | None = None  # wall clock when the risk reader was seen past exec_seq


class RiskGate:
    """The pre-trade check: the risk consumer's limits table plus our own in-flight orders.

    Why the in-flight part: the table is built by another process from the exec ring, so it
    lags. Two orders sent back to back would both be checked against a table that knows
    neither, and together could breach a limit neither breaches alone. So an order that passed
    is also counted here, as a working order on its side, until the risk process has provably
    taken it into the table: its reader on the exec ring (``risk_reader``) was seen past the
    order's first execution record at time *t* (:meth:`observe`), and a table published after
    *t* is in hand. Until then it may be counted twice: a false reject near a limit is possible,
    a false accept is not. If the risk process never reads the exec ring, nothing is retired
    and orders are refused once the in-flight set is full: that is the fail-closed answer to a
    risk process whose positions cannot be right.

    Fails closed like :class:`LimitsView`: no table, dead writer or stale table -> refused
    (``risk_unavailable`` / ``risk_stale``). A restarted risk process (a new segment under the
    same name) is re-attached, at most every ``retry_s``.
    """

    def __init__(
        self,
        name: str,
        *,
        max_age_s: float = 5.0,
        attach: Any = None,
        now_ns: Any = time.time_ns,
        monotonic: Any = time.monotonic,
        retry_s: float = 0.5,
        max_inflight: int = 10_000,
    ) -> None:
        from pipeline.consumers.risk import LimitsView, check_order, field_name

        if attach is None:
            attach = LimitsView.attach
        self._check_order = check_order
        self._field_name = field_name
        self.name = name
        self.max_age_s = max_age_s
        self.retry_s = retry_s
        self.max_inflight = max_inflight
        self._attach = attach
        self._now_ns = now_ns
        self._mono = monotonic
        self._view: Any = None
        self._next_attach = 0.0
        # Why the last attach failed ("not found", or the trust rule's refusal: a FIFO, another
        # uid's file), so a refused order names the real cause instead of "not found".
        self._unavailable = "not found"
        self.inflight: dict[str, _InFlight] = {}

    def _get_view(self) -> Any:
        view = self._view
        if view is not None and view.block.writer_alive():
            return view
        now = self._mono()
        if now < self._next_attach:
            return view
        self._next_attach = now + self.retry_s
        try:
            new = self._attach(self.name, self.max_age_s)
        except (MetricsError, OSError, ValueError) as exc:
            reason = "not found" if isinstance(exc, FileNotFoundError) else str(exc)
            if reason != self._unavailable:
                log.warning("risk limits table unavailable: %s", reason,
                            extra={"event": "risk_unavailable", "table": self.name})  # fmt: skip
            self._unavailable = reason
            return view
        if view is not None:
            view.close()
        self._view = new
        return new

    def check(self, symbol: str, side: str, qty: float, price: float = 0.0) -> str | None:
        """None if the order may go out, else the reason (it names the limit)."""
        field_name = self._field_name
        view = self._get_view()
        if view is None:
            if self._unavailable == "not found":
                return f"risk_unavailable: limits table {self.name} not found"
            return f"risk_unavailable: {self._unavailable}"
        if not view.block.writer_alive():
            return "risk_unavailable: the risk process is not running"
        snap = dict(view.block.snapshot())
        updated = int(snap.get("updated_ns", 0))
        age = (self._now_ns() - updated) / 1e9
        if age > self.max_age_s:
            return f"risk_stale: limits table not updated for {age:.1f}s"
        self._retire(updated)
        if len(self.inflight) >= self.max_inflight:
            return f"risk_inflight: {len(self.inflight)} orders not yet seen by the risk process"
        buy, sell = self.pending(symbol)
        if buy:
            key = field_name(symbol, "open_buy")
            snap[key] = float(snap.get(key, 0.0)) + buy
        if sell:
            key = field_name(symbol, "open_sell")
            snap[key] = float(snap.get(key, 0.0)) + sell
        reason: str | None = self._check_order(snap, symbol, side, qty, price)
        return reason

    def pending(self, symbol: str) -> tuple[float, float]:
        """In-flight (buy, sell) quantity of ``symbol`` not yet in the table."""
        buy = sell = 0.0
        for o in self.inflight.values():
            if o.symbol == symbol:
                if o.side == "BUY":
                    buy += o.qty
                else:
                    sell += o.qty
        return buy, sell

    def sent(self, coid: str, symbol: str, side: str, qty: float) -> None:
        self.inflight[coid] = _InFlight(symbol, side, qty)

    def published(self, coid: str, kind: int, status: int, exec_cursor: int) -> None:
        """An execution record for ``coid`` is in the exec ring below ``exec_cursor``."""
        o = self.inflight.get(coid)
        if o is None:
            return
        if kind == ExecKind.REJECT and status == OrderStatus.REJECTED:
            del self.inflight[coid]  # never at the exchange: no exposure to count
        elif o.exec_seq is None:
            o.exec_seq = exec_cursor

    @property
    def needs_observation(self) -> bool:
        return any(o.exec_seq is not None and o.seen_ns is None for o in self.inflight.values())

    def observe(self, risk_cursor: int | None, now_ns: int) -> None:
        """The risk reader's position on the exec ring (None: it is not attached)."""
        if risk_cursor is None:
            return
        for o in self.inflight.values():
            if o.seen_ns is None and o.exec_seq is not None and risk_cursor >= o.exec_seq:
                o.seen_ns = now_ns

    def retire(self) -> None:
        """Forget in-flight orders the current table already holds (between orders, so the
        in-flight set and ``risk_inflight`` shrink even when no order is being checked)."""
        if not any(o.seen_ns is not None for o in self.inflight.values()):
            return
        view = self._view
        if view is None or not view.block.writer_alive():
            return
        self._retire(int(view.block.snapshot().get("updated_ns", 0)))

    def _retire(self, table_updated_ns: int) -> None:
        done = [
            c
            for c, o in self.inflight.items()
            if o.seen_ns is not None and table_updated_ns > o.seen_ns
        ]
        for c in done:
            del self.inflight[c]

    def close(self) -> None:
        if self._view is not None:
            self._view.close()
            self._view = None
