"""The price monitor: ``ETHUSDT | 3098.07 | vol 0.0220`` lines plus a periodic status line.

``vol`` is the traded base quantity (aggTrade / trade records) of that symbol since its previous
price line, so the column reads as "how much traded at around this price just now".

Status line (every ``status_interval_s``)::

    monitor | 412.3 rec/s | 118.0 trades/s | lag 0 rec | latency avg 0.080 max 0.310 ms
        | missed 0 | gaps 0 | resyncs 0 | gen 1      (one line)

``lag`` is the reader's backlog in records; ``latency`` is ring delivery time (our wall clock
minus the newest record's ``publish_time_ns`` when a batch arrives; avg and max since the last
status line); ``missed`` counts records lost because the writer lapped us; ``gaps``
counts GAP records ingest published (exchange ids it could not recover; on a bridge mirror's
ring also the source bridge's laps, flagged LAPPED, one per lap); ``resyncs`` counts
writer restarts this reader followed (``gen`` is the current writer generation).

A BOOK_STALE record (a symbol's depth stopped being current: its connection was lost) prints
``ETHUSDT | book stale (depth not current since update 123)`` at once, and the symbol's next
depth record ``ETHUSDT | book live again``: an operator watching the monitor sees the outage
where it matters, per symbol.

Metrics block (``{shm_prefix}monitor.metrics``, ``--metrics-name``; '' for none): the same
counters for ``pipeline health``, written on every tick (0.25 s) and while waiting for the ring,
with ``heartbeat_interval_ms`` = 1000, so a monitor that hangs shows as stale. A second monitor
started by hand while one runs gets no block (a warning says so) instead of failing.

:class:`MonitorCore` is pure (records in, lines out, clock passed in); :class:`Monitor` prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from pipeline.consumers import symbol_names, symbol_of
from pipeline.ipc.records import Kind, StaleBooks

log = logging.getLogger("pipeline.monitor")

TRADE_KINDS = (int(Kind.AGG_TRADE), int(Kind.TRADE))

METRICS_FIELDS = [
    ("records", "<i8"),
    ("trades", "<i8"),
    ("gaps", "<i8"),
    ("lag", "<i8"),
    ("missed", "<i8"),
    ("resyncs", "<i8"),
    ("generation", "<i8"),
    ("last_publish_ns", "<i8"),
    ("ring_attached", "<i8"),
    ("heartbeat_interval_ms", "<i8"),
]


def format_price(price: float) -> str:
    """2 decimals for ordinary prices, more significant digits for tiny ones (0.00001234)."""
    if price >= 1.0 or price == 0.0:
        return f"{price:.2f}"
    return f"{price:.8f}".rstrip("0")


@dataclass
class _SymbolState:
    price: float = 0.0
    vol: float = 0.0
    dirty: bool = False
    last_print: float = float("-inf")


@dataclass
class MonitorCore:
    """Turns batches into price lines and counters into status lines. Pure (clock passed in)."""

    print_interval_s: float = 0.5
    status_interval_s: float = 5.0
    symbols: dict[str, _SymbolState] = field(default_factory=dict)
    records: int = 0
    trades: int = 0
    gaps: int = 0
    resyncs_seen: int = 0
    #: symbols whose book a BOOK_STALE marked and no depth record has refreshed since
    stale_books: StaleBooks = field(default_factory=StaleBooks)
    _last_status: float | None = None
    _records_at_status: int = 0
    _trades_at_status: int = 0
    last_publish_ns: int = 0
    # delivery latency (ring publish -> this reader), newest record of each batch, per interval
    _lat_sum_ns: int = 0
    _lat_n: int = 0
    _lat_max_ns: int = 0

    def on_batch(
        self, batch: np.ndarray, names: list[str], now: float, now_ns: int | None = None
    ) -> list[str]:
        self.records += len(batch)
        if len(batch):
            self.last_publish_ns = int(batch["publish_time_ns"][-1])
            if now_ns is not None and self.last_publish_ns:
                lat = max(0, now_ns - self.last_publish_ns)
                self._lat_sum_ns += lat
                self._lat_n += 1
                self._lat_max_ns = max(self._lat_max_ns, lat)
        kinds = batch["kind"]
        gap_mask = kinds == int(Kind.GAP)
        if gap_mask.any():
            self.gaps += int(gap_mask.sum())
        book_lines = [
            f"{name} | book stale (depth not current since update {uid})" if stale
            else f"{name} | book live again"
            for name, stale, uid in self.stale_books.update(batch, names)
        ]  # fmt: skip
        trades = batch[np.isin(kinds, TRADE_KINDS)]
        self.trades += len(trades)
        for sid, price, qty in zip(
            trades["symbol"].tolist(), trades["price"].tolist(), trades["qty"].tolist(),
            strict=True,
        ):  # fmt: skip
            name = symbol_of(names, sid)
            st = self.symbols.get(name)
            if st is None:
                st = self.symbols[name] = _SymbolState()
            st.price = price
            st.vol += qty
            st.dirty = True
        return book_lines + self.due_lines(now)

    def due_lines(self, now: float) -> list[str]:
        out = []
        for name, st in self.symbols.items():
            if st.dirty and now - st.last_print >= self.print_interval_s:
                out.append(f"{name} | {format_price(st.price)} | vol {st.vol:.4f}")
                st.vol = 0.0
                st.dirty = False
                st.last_print = now
        return out

    def status_line(
        self, now: float, now_ns: int, *, lag: int, missed: int, resyncs: int, generation: int
    ) -> str | None:
        """A status line if one is due (the first call only starts the clock)."""
        if self._last_status is None:
            self._last_status = now
            self._records_at_status = self.records
            self._trades_at_status = self.trades
            return None
        elapsed = now - self._last_status
        if elapsed < self.status_interval_s:
            return None
        rate = (self.records - self._records_at_status) / elapsed if elapsed > 0 else 0.0
        trate = (self.trades - self._trades_at_status) / elapsed if elapsed > 0 else 0.0
        self._last_status = now
        self._records_at_status = self.records
        self._trades_at_status = self.trades
        if self._lat_n:
            avg_ms = self._lat_sum_ns / self._lat_n / 1e6
            latency = f"latency avg {avg_ms:.3f} max {self._lat_max_ns / 1e6:.3f} ms"
        else:
            latency = "latency -"
        self._lat_sum_ns = self._lat_n = self._lat_max_ns = 0
        return (
            f"monitor | {rate:.1f} rec/s | {trate:.1f} trades/s | lag {lag} rec | {latency}"
            f" | missed {missed} | gaps {self.gaps} | resyncs {resyncs} | gen {generation}"
        )


class Monitor:
    """The printing shell around :class:`MonitorCore` (one line per write, flushed), and the
    owner of the monitor's metrics block (optional)."""

    heartbeat_interval_ms = 1000

    def __init__(
        self,
        core: MonitorCore,
        out: TextIO | None = None,
        wall_ns: Callable[[], int] = time.time_ns,
        metrics_name: str | None = None,
    ) -> None:
        self.core = core
        self.out = out if out is not None else sys.stdout
        self._wall_ns = wall_ns
        self._now = time.monotonic
        self.metrics: Any = None
        if metrics_name:
            from pipeline.ipc.metrics import MetricsBlock, MetricsError

            try:
                self.metrics = MetricsBlock.create(metrics_name, METRICS_FIELDS)
            except (MetricsError, OSError) as exc:
                log.warning(
                    "monitor runs without a metrics block: %s", exc,
                    extra={"event": "monitor_no_metrics", "block": metrics_name},
                )  # fmt: skip
            else:
                self._publish(None)

    def _publish(self, reader: Any) -> None:
        if self.metrics is None:
            return
        c = self.core
        values: dict[str, float] = {
            "records": c.records, "trades": c.trades, "gaps": c.gaps,
            "last_publish_ns": c.last_publish_ns, "ring_attached": int(reader is not None),
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
        }  # fmt: skip
        if reader is not None:
            values.update(
                lag=int(reader.lag), missed=int(reader.missed),
                resyncs=int(getattr(reader, "resyncs", 0)),
                generation=int(getattr(reader, "generation", 0)),
            )  # fmt: skip
        self.metrics.set(**values)

    def heartbeat(self, now: float) -> None:
        """While the ring is missing: keep the block fresh (it says ``ring_attached`` 0)."""
        self._publish(None)

    def _emit(self, lines: list[str]) -> None:
        if lines:
            self.out.write("\n".join(lines) + "\n")
            self.out.flush()

    def on_batch(self, batch: np.ndarray, reader: Any) -> None:
        self._emit(self.core.on_batch(batch, symbol_names(reader), self._now(), self._wall_ns()))

    def on_tick(self, reader: Any, now: float) -> None:
        lines = self.core.due_lines(now)
        status = self.core.status_line(
            now, self._wall_ns(), lag=int(reader.lag), missed=int(reader.missed),
            resyncs=int(getattr(reader, "resyncs", 0)),
            generation=int(getattr(reader, "generation", 0)),
        )  # fmt: skip
        if status:
            lines.append(status)
        self._emit(lines)
        self._publish(reader)

    def close(self) -> None:
        try:
            self.out.flush()
        except (OSError, ValueError):
            pass
        finally:
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None


def from_args(args: argparse.Namespace, cfg: Any) -> Monitor:
    core = MonitorCore(
        print_interval_s=args.print_interval if args.print_interval is not None
        else cfg.monitor.print_interval_s,
        status_interval_s=args.status_interval if args.status_interval is not None
        else cfg.monitor.status_interval_s,
    )  # fmt: skip
    metrics = getattr(args, "metrics_name", None)
    if metrics is None:
        metrics = f"{cfg.run.shm_prefix}monitor.metrics"
    return Monitor(core, metrics_name=metrics or None)
