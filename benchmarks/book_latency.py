"""How fresh an ingest's local book is, from the records it put in the ring (bench_ingest.py).

Pure: a record array in (what a reader polled from one ingest's ring), numbers out, so the
definitions below are the whole story. Why three numbers: the age of the book change a
DEPTH_TOP record first reflects is not on the wire (a diff covers all changes of its window and
carries one event time, at the window's end), so the book's update latency is bounded from
three sides, each measured with one clock:

- ``interval``: milliseconds between consecutive DEPTH_TOP publications of a symbol: the
  cadence the consumer sees (20 ms SBE ``depth`` vs 100 ms JSON ``depth@100ms``), longer when a
  window had no change (the venue then sends no diff);
- ``staleness``: ``publish_time_ns - event_time_ns`` of each DEPTH_TOP: the venue's diff event
  time (end of its window) to the book's top in the ring: transport, decode, apply, publish.
  It leaves out the wait for the window to close. Venue clock vs ours: on one host (the
  simulator) the same clock; the simulator stamps whole milliseconds, so this is overstated by
  up to 1 ms alike for both encodings;
- ``lag``: for each best bid/ask update (JSON bookTicker, SBE bestBidAsk; their ``u`` is the
  book's update id, the id space of the diffs' ``U``/``u``), the time from its publication to
  the publication of the first DEPTH_TOP whose last update id ``u`` covers it, both local
  publish times of one process. This is the book's delay behind the fastest feed of the same
  change: the wait for the diff window to close plus the diff's own transport and apply,
  minus the ticker's transport. It is the number that says what the cadence costs.

Only plain diffs count (flags 0: no RESYNCED or SNAPSHOT records) and only records published
from ``since_ns`` on (the measurement window); samples of all symbols are pooled.
"""

from __future__ import annotations

import numpy as np

from pipeline.ipc.records import Kind


def _pcts(values: np.ndarray, name: str) -> dict[str, float]:
    if len(values) == 0:
        return {f"{name}_p50_ms": float("nan"), f"{name}_p99_ms": float("nan")}
    p50, p99 = np.percentile(values, [50, 99])
    return {f"{name}_p50_ms": float(p50), f"{name}_p99_ms": float(p99)}


def book_latency(recs: np.ndarray, symbols: int, since_ns: int) -> dict[str, float]:
    """Interval, staleness and lag (module docstring) as p50/p99 in ms, plus how many book
    publications per second per symbol (``books_per_s``) and the sample counts."""
    recs = recs[recs["publish_time_ns"] >= since_ns]
    intervals, stale, lags = [], [], []
    tops = 0
    span_ns = 0
    for sid in range(symbols):
        mine = recs[recs["symbol"] == sid]
        top = mine[(mine["kind"] == Kind.DEPTH_TOP) & (mine["flags"] == 0)]
        tick = mine[mine["kind"] == Kind.BOOK_TICKER]
        if len(top) < 2:
            continue
        pub = top["publish_time_ns"]
        tops += len(top)
        span_ns = max(span_ns, int(pub[-1] - pub[0]))
        intervals.append(np.diff(pub) / 1e6)
        stale.append((pub - top["event_time_ns"]) / 1e6)
        covered = np.maximum.accumulate(top["trade_id"])  # update ids only grow; be safe
        tick = tick[tick["trade_id"] > covered[0]]  # its first book is in the window
        idx = np.searchsorted(covered, tick["trade_id"], side="left")
        ok = idx < len(top)  # a ticker after the window's last book has none yet
        lags.append((pub[idx[ok]] - tick["publish_time_ns"][ok]) / 1e6)
    out: dict[str, float] = {
        "books": float(tops),
        "books_per_s": tops / symbols / (span_ns / 1e9) if span_ns else float("nan"),
        "lag_samples": float(sum(map(len, lags))),
    }

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.empty(0)

    out.update(_pcts(cat(intervals), "interval"))
    out.update(_pcts(cat(stale), "staleness"))
    out.update(_pcts(cat(lags), "lag"))
    return out
