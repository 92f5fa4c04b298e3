"""`pipeline ingest` metrics: the block's fields, and their values from a running process.

The frame handler counts in plain Python ints (a seqlock write per frame would cost more than the
frame); every ``--metrics-interval`` the process copies them, with the values derived here, into
its MetricsBlock (pipeline/ipc/metrics.py), which ``pipeline health`` and the monitor read.

Why apart from the process (ingest.py): what an operator sees is one list kept in one place, and
deriving it (sums over trackers, books, shards) is no business of the frame handler.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.marketdata.ingest import Ingest

MAX_SHARDS_IN_METRICS = 8
MAX_SYMBOLS_IN_METRICS = 16

COUNTERS = (
    "frames_received", "frames_decoded", "published", "control_replies", "control_errors",
    "duplicates", "reconnects", "rotations", "stalls", "server_shutdowns", "connect_failures",
    "gaps_detected", "gaps_backfilled", "ids_backfilled", "gaps_unrecoverable", "ids_lost",
    "trade_gaps", "trade_ids_lost",
    "book_resyncs", "book_breaks", "rest_requests", "rest_errors", "callback_errors",
    # ids more than --max-id-jump from their stream's last id (held aside, not published), and
    # runs of them taken as a stream restart (re-based; a GAP record flagged RESYNCED for trades)
    "ids_far", "id_resets",
    # records the ring refused to pack (the tracker re-opened a hole for them), book levels
    # dropped beyond the per-side bound (pipeline/marketdata/book.py MAX_LEVELS)
    "publish_errors", "book_levels_trimmed",
    # @trade ids fetched from REST historicalTrades, and @trade holes closed that way
    "trades_backfilled", "trade_gaps_backfilled",
    # BOOK_STALE records: a symbol's depth stopped being current (connection lost, break)
    "books_stale",
)
#: the REST client's budget (pipeline/net/rest.py): weight used in the current window and the
#: highest of any window, requests that waited for it and for how long, 429s and 418s
#: answered, connections opened (keep-alive: 1 while the exchange keeps it)
REST_FIELDS = ("rest_weight_used", "rest_weight_peak", "rest_waits", "rest_wait_ms",
               "rest_429", "rest_418", "rest_connections")


def metrics_fields(n_symbols: int) -> list[tuple[str, str]]:
    """The block's (name, dtype) fields for ``n_symbols`` symbols (last ids of the first 16)."""
    # the SBE decoder's reasons include every JSON one: one list for both connection kinds
    from pipeline.binance.sbe import SKIP_REASONS

    fields = [(c, "<i8") for c in COUNTERS]
    fields += [(f"skipped_{r}", "<i8") for r in SKIP_REASONS]
    fields += [("skipped_total", "<i8"), ("last_frame_ns", "<i8"), ("shards", "<i8"),
               ("symbols", "<i8")]
    # fast_path: 1 while the compiled path is in use (an operator sees a fallback to pure
    # Python in `pipeline health`); frames_fast: frames it handled without Python
    fields += [("fast_path", "<i8"), ("frames_fast", "<i8")]
    # SBE frames of another schema version than ours, decoded by their block lengths (the venue
    # moved on: an operator should look at the schema, nothing is lost yet)
    fields += [("sbe_other_version_frames", "<i8")]
    # written every --metrics-interval even when no frame arrives: `pipeline health` calls the
    # process stuck when the block is older than a few of these
    fields += [("heartbeat_interval_ms", "<i8")]
    # shards without a delivering connection for longer than a reconnect cycle takes
    # (Ingest.down_grace_s): non-zero makes `pipeline health` call ingest unhealthy
    fields += [("problem_shards_down", "<i8")]
    fields += [(f, "<i8") for f in REST_FIELDS]
    # 1 while the exchange bans our REST (418): no snapshot, no backfill until it ends
    fields += [("problem_rest_banned", "<i8")]
    # HTTP status of a handshake refused 4xx (not 429/418) after ingest had connected: the
    # venue no longer serves this URL or these streams (pipeline/marketdata/shards.py); the
    # shard retries slowly until it is served again
    fields += [("problem_streams_rejected", "<i8")]
    # symbols whose depth has been stale (BOOK_STALE, no depth record since) for longer than a
    # reconnect cycle takes: a book half dead behind a live connection (snapshots failing, say)
    fields += [("problem_books_stale", "<i8")]
    fields += [(f"conn_state_{i}", "<i8") for i in range(MAX_SHARDS_IN_METRICS)]
    fields += [(f"last_agg_id_{i}", "<i8") for i in range(min(n_symbols, MAX_SYMBOLS_IN_METRICS))]
    return fields


def metric_values(ing: Ingest) -> dict[str, float]:
    """Every field of the process's metrics block, from its counters and cores."""
    c = ing.c
    vals: dict[str, float] = dict(c)
    vals["fast_path"] = int(ing.fast is not None)
    vals["frames_fast"] = ing.frames_fast
    vals["sbe_other_version_frames"] = ing.sbe_decoder.other_version_frames
    vals["frames_received"] = c["frames_received"] + vals["frames_fast"]
    for r, n in ing.skipped.items():
        vals[f"skipped_{r}"] = n
    skipped = vals["skipped_total"] = sum(ing.skipped.values())
    # derived here rather than counted per frame on the hot path
    vals["published"] = ing.ring.cursor - ing.cursor0
    vals["frames_decoded"] = (vals["frames_received"] - skipped - c["control_replies"]
                              - c["server_shutdowns"] - c["callback_errors"])
    vals["last_frame_ns"] = ing.last_frame_ns
    vals["callback_errors"] = ing.c["callback_errors"] + sum(
        sh.conn.ws.callback_errors for sh in ing.shards if sh.conn and sh.conn.ws)
    vals["shards"] = len(ing.shards)
    vals["symbols"] = len(ing.cfg.symbols)
    vals["heartbeat_interval_ms"] = max(1, round(ing.cfg.metrics_interval * 1000))
    now = time.monotonic()
    vals["problem_shards_down"] = sum(
        1 for sh in ing.shards
        if sh.down_since is not None and now - sh.down_since > ing.down_grace_s)
    vals["problem_streams_rejected"] = max(sh.rejected_status for sh in ing.shards)
    vals["problem_books_stale"] = sum(
        1 for t in ing.depth.stale_since if t is not None and now - t > ing.down_grace_s)
    trackers = (*ing.trackers, *ing.trade_trackers)
    books = ing.depth.books
    vals["ids_far"] = (sum(t.stats.far_ids for t in trackers) + ing.book_far_seen
                       + ing.depth.partial_far_seen + sum(b.far_ids for b in books))
    vals["id_resets"] = (sum(t.stats.resets for t in trackers) + ing.book_resets
                         + ing.depth.partial_resets + sum(b.resets for b in books))
    vals["book_levels_trimmed"] = sum(b.bids.trimmed + b.asks.trimmed for b in books)
    for i, sh in enumerate(ing.shards[:MAX_SHARDS_IN_METRICS]):
        vals[f"conn_state_{i}"] = sh.state
    for i in range(min(len(ing.trackers), MAX_SYMBOLS_IN_METRICS)):
        last = ing.last_agg_id(i)
        vals[f"last_agg_id_{i}"] = last if last is not None else -1
    vals["gaps_detected"] = sum(t.stats.gaps_detected for t in ing.trackers)
    vals.update(rest_values(ing))
    vals["book_breaks"] = sum(b.breaks for b in books)
    return vals


def rest_values(ing: Ingest) -> dict[str, float]:
    """The REST fields (REST_FIELDS, problem_rest_banned); zeros before the first request."""
    client = ing.recovery._client
    if client is None:
        return {**dict.fromkeys(REST_FIELDS, 0), "problem_rest_banned": 0}
    b = client.budget
    now = client.clock()
    b.delay(0, now)  # rolls the window: `used` is this window's
    return {"rest_weight_used": b.used, "rest_weight_peak": b.peak_used, "rest_waits": b.waits,
            "rest_wait_ms": round(client.wait_s * 1000), "rest_429": b.rate_limited,
            "rest_418": b.bans, "rest_connections": client.conn.opened,
            "problem_rest_banned": int(b.banned(now))}
