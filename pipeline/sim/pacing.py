"""Pacing of the random walk: how many walk actions run per loop turn, and when frames leave.

Why apart from the fan-out: the rate rules (``--rate max`` in growing batches while clients
keep up; a finite rate in 10 ms turns, per-action below a threshold and batched above it so the
message rate does not jump) are one idea, tested without sockets
(:meth:`MarketPacer.walk_finite`). The loop also ticks the venue's clock, which runs even while
market data is stalled, and emits the 100 ms / 1 s depth streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.logs import RateLimitedLog
from pipeline.sim import market as mk

if TYPE_CHECKING:
    from pipeline.sim.faults import Faults
    from pipeline.sim.server import SimConfig
    from pipeline.sim.streams import StreamHub

log = logging.getLogger("pipeline.sim")
_rlog = RateLimitedLog(log)

# taker orders per symbol per loop turn at --rate max (Market.step_batch): big enough that
# numpy's per-call cost vanishes, small enough that one turn stays around a millisecond
MAX_BATCH = 2048
# finite --rate: from this many walk actions (``rate_unit="actions"``) or aggTrade messages
# (``"msgs"``) due for one symbol in one loop turn, the turn runs Market.step_batch instead of
# the per-action walk. One batch call costs ~0.5 ms however small; the per-action walk ~10 us
# an action (~25 us an aggTrade), so below this the walk is as cheap and keeps its finer mix
# (a bookTicker after every action, makers and takers interleaved).
BATCH_MIN_ACTIONS = 96
BATCH_MIN_MSGS = 32
# aggTrades per action of the per-action walk (Market.step), measured over long runs. A
# step_batch taker prints ~1.0 aggTrade, so a batched turn of n actions runs
# round(n * WALK_AGGS_PER_ACTION) takers: the message rate does not jump at the threshold.
WALK_AGGS_PER_ACTION = 0.36


class MarketPacer:
    """Runs the seeded walk at the configured rate and hands its events to the stream hub."""

    def __init__(
        self,
        config: SimConfig,
        market: mk.Market,
        hub: StreamHub,
        faults: Faults,
        stats: dict[str, int],
        now_ms: Callable[[], int],
    ) -> None:
        self.config = config
        self.market = market
        self.hub = hub
        self.faults = faults
        self.stats = stats
        self.now_ms = now_ms
        self.wake = asyncio.Event()  # set by the market when a venue order changes the book

    async def run(self, service: Any) -> None:
        """The generation loop until cancelled; ``service`` (the WS API, or None) gets
        ``on_tick(now_ms)`` every 100 ms."""
        hub = self.hub
        cfg = self.config
        loop = asyncio.get_running_loop()
        max_mode = not math.isfinite(cfg.rate) or cfg.rate <= 0
        symbols = self.market.symbols
        budget = dict.fromkeys(symbols, 0.0)  # finite rate: units due per symbol
        cap = cfg.rate * 0.5 + 1 if not max_mode else 0.0  # at most half a second of backlog
        last = loop.time()
        next_100 = next_tick = last + 0.1
        next_1000 = last + 1.0
        batch = 16
        while True:
            now = loop.time()
            self.faults.expire(now)
            stalled = self.faults.stall
            now_ms = self.now_ms()
            paused = stalled or hub.backpressured(now)
            if not paused:
                try:
                    if max_mode:
                        # as fast as clients take: only symbols someone can be sent data for
                        live = hub.writable_symbols()
                        active = [s for s in symbols if s.lower() in live]
                        for sym in active:
                            self.market.step_batch(sym, now_ms, batch)
                        self.stats["walk_actions"] += batch * len(active)
                        self.stats["walk_batches"] += len(active)
                    else:
                        add = cfg.rate * (now - last)
                        for sym in symbols:
                            due = min(budget[sym] + add, cap)
                            n = int(due)
                            budget[sym] = due - (self.walk_finite(sym, n, now_ms) if n else 0)
                except Exception as exc:  # a venue listener bug must not kill the feed
                    self.stats["walk_errors"] = self.stats.get("walk_errors", 0) + 1
                    _rlog.warning("sim_walk_error", "market step failed", error=repr(exc))
            elif not max_mode:
                budget = dict.fromkeys(symbols, 0.0)  # no catch-up burst after a pause
            last = now
            if now >= next_tick:  # the venue's clock runs even while market data stalls
                next_tick = max(next_tick + 0.1, now)
                if service is not None and hasattr(service, "on_tick"):
                    try:
                        service.on_tick(now_ms)
                    except Exception as exc:
                        _rlog.warning("sim_on_tick_error", "venue on_tick failed", error=repr(exc))
            if not stalled:
                hub.dispatch(self.market.drain_raw())
                if now >= next_100:
                    hub.depth_tick(100, now_ms)
                    next_100 = max(next_100 + 0.1, now)
                if now >= next_1000:
                    hub.depth_tick(1000, now_ms)
                    next_1000 = max(next_1000 + 1.0, now)
                hub.flush()
            if max_mode and hub.subs and not paused:
                batch = min(batch * 2, MAX_BATCH)
                await asyncio.sleep(0)
            elif max_mode and paused and not stalled:
                self.stats["backpressure_waits"] += 1  # the clients are the limit now
                await asyncio.sleep(0.0005)
            else:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), cfg.tick_s)

    def walk_finite(self, sym: str, due: int, now_ms: int) -> int:
        """Run ``due`` units of a finite rate's walk on one symbol; returns the units used.

        Few due (a low rate): the per-action walk, exactly as many actions, or in ``msgs``
        unit actions until ``due`` aggTrades are out (a taker may print several, so it can
        overshoot by a few: the caller carries the excess as debt). Many due: Market.step_batch
        in chunks of at most MAX_BATCH takers, which is what lets a finite rate reach hundreds
        of thousands of messages a second; the events of one turn then share one time stamp
        (they do on the per-action path too) and bookTicker follows taker orders only.
        """
        market, stats = self.market, self.stats
        msgs = self.config.rate_unit == "msgs"
        a0 = market.next_agg_id(sym)
        if due < (BATCH_MIN_MSGS if msgs else BATCH_MIN_ACTIONS):
            if not msgs:
                market.step(sym, now_ms, due)
                stats["walk_actions"] += due
                return due
            actions = 0
            limit = 64 * due + 64  # a taker is ~1 action in 3: never loop forever
            while market.next_agg_id(sym) - a0 < due and actions < limit:
                market.step(sym, now_ms, 1)
                actions += 1
            stats["walk_actions"] += actions
            return market.next_agg_id(sym) - a0
        if msgs:
            # a batch taker prints ~1.0 aggTrade; top up (rarely) until due are out, at most
            # a few calls: a thin book drops takers that find nothing
            for _ in range(4):
                left = due - (market.next_agg_id(sym) - a0)
                if left <= 0:
                    break
                k = min(left, MAX_BATCH)
                market.step_batch(sym, now_ms, k)
                stats["walk_actions"] += k
                stats["walk_batches"] += 1
            return market.next_agg_id(sym) - a0
        takers = max(1, round(due * WALK_AGGS_PER_ACTION))
        while takers > 0:
            k = min(takers, MAX_BATCH)
            market.step_batch(sym, now_ms, k)
            stats["walk_actions"] += k
            stats["walk_batches"] += 1
            takers -= k
        return due
