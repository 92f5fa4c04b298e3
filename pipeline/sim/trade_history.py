"""The retained individual trades of one simulated symbol, for ``GET /api/v3/historicalTrades``.

Why apart from :class:`~pipeline.sim.market_book.AggHistory`: an aggregate trade keeps only
the sum of its fills, and a client backfilling ``@trade`` holes needs each fill exactly as the
stream printed it (binance-protocol.md 7.3). Same compact columns, same trimming: trade ids
are contiguous, so the id is implicit (``first`` + index), and a full-speed walk pays an array
append per fill (the batch walk one ``frombytes`` per column per batch).
"""

from __future__ import annotations

from array import array
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.sim.units import fmt_units


class TradeHistory:
    """The newest ``keep`` trades of one symbol (trimmed once a quarter more piled up)."""

    __slots__ = ("bm", "first", "keep", "limit", "price", "qty", "time")

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.limit = keep + max(1, keep // 4)
        self.first = 0  # id of the oldest retained trade
        self.price = array("q")
        self.qty = array("q")
        self.time = array("q")
        self.bm = array("b")

    def __len__(self) -> int:
        return len(self.price)

    def append(self, t: int, price: int, qty: int, time_ms: int, buyer_maker: bool) -> None:
        if not self.price:
            self.first = t
        self.price.append(price)
        self.qty.append(qty)
        self.time.append(time_ms)
        self.bm.append(buyer_maker)
        if len(self.price) > self.limit:
            self._trim()

    def extend(self, t0: int, price: npt.NDArray[np.int64], qty: npt.NDArray[np.int64],
               time_ms: int, bm: npt.NDArray[np.bool_]) -> None:
        if not self.price:
            self.first = t0
        self.price.frombytes(price.astype(np.int64).tobytes())
        self.qty.frombytes(qty.astype(np.int64).tobytes())
        self.time.frombytes(np.full(len(price), time_ms, np.int64).tobytes())
        self.bm.frombytes(bm.astype(np.int8).tobytes())
        if len(self.price) > self.limit:
            self._trim()

    def _trim(self) -> None:
        drop = len(self.price) - self.keep
        if drop > 0:
            for col in (self.price, self.qty, self.time, self.bm):
                del col[:drop]
            self.first += drop

    def rows(self, from_id: int | None, limit: int, time_mult: int = 1) -> list[dict[str, Any]]:
        """``historicalTrades`` rows: ids >= ``from_id`` (an id older than the history starts
        at the oldest retained one), or the newest ``limit`` without it. ``time_mult`` 1000
        gives microsecond times (``X-MBX-TIME-UNIT``)."""
        n = len(self.price)
        lo = max(0, from_id - self.first) if from_id is not None else max(0, n - limit)
        hi = min(n, lo + limit)
        out = []
        for i in range(lo, hi):
            p, q = self.price[i], self.qty[i]
            out.append({
                "id": self.first + i,
                "price": fmt_units(p),
                "qty": fmt_units(q),
                "quoteQty": fmt_units(p * q // 100_000_000),
                "time": self.time[i] * time_mult,
                "isBuyerMaker": bool(self.bm[i]),
                "isBestMatch": True,
            })
        return out
