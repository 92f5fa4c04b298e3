"""`pipeline ingest` command line: one flag per :class:`IngestConfig` field, from one table.

Why apart from the process: ``pipeline --help`` builds every wing's parser, and a parser needs
only the config's fields and defaults, not the sockets, the ring or the cores.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline.marketdata.config import ConfigError, IngestConfig, validate


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# (IngestConfig field, argparse type, help), in --help order. The flag is the field with dashes
# and its default the field's default; ``config_from_args`` reads the same table back, so a flag
# cannot be added on one side and forgotten on the other.
_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("streams_url", str, "market streams base URL"),
    ("rest_url", str, "REST base URL (snapshots, backfill)"),
    ("symbols", str, "comma-separated symbols"),
    ("streams", str, "stream kinds per symbol: aggTrade, trade, bookTicker, depth, "
                     "depth@100ms, depth5/10/20[@100ms]"),
    ("ring", str, "ring (shared-memory) name"),
    ("ring_capacity", int, "ring slots (power of two)"),
    ("cpu", int, "pin the process to this CPU"),
    ("stall_timeout", float, "seconds without any message before a connection counts as dead"),
    ("transport", str, "picows | websockets"),
    ("decoder", str, "msgspec | orjson"),
    ("max_lifetime", float, "rotate connections after this many seconds (server limit: 24 h)"),
    ("metrics", str, "metrics block name"),
    ("metrics_interval", float, "seconds between metrics updates"),
    ("depth_levels", int, "also publish this many book levels as DEPTH_LEVEL records"),
    ("depth_snapshot_limit", int, "levels per REST depth snapshot"),
    ("backoff_base", float, "first reconnect delay (s), doubling"),
    ("backoff_max", float, "reconnect delay cap (s)"),
    ("healthy_after", float, "a connection up this long resets the backoff"),
    ("ping_interval", float, "own keep-alive ping after this many idle seconds (0 = off)"),
    ("backfill_grace", float, "wait this long for the live stream to fill a hole before REST"),
    ("rest_retries", int, "failed/unproductive REST attempts before a GAP record"),
    ("rest_timeout", float, "REST timeout (s)"),
    ("streams_per_connection", int, "streams per connection (max 1024)"),
    ("max_frame_bytes", int, "larger frames are skipped (counted as oversized)"),
    ("publish_batch", int, "at most this many records per ring commit within one event-loop "
                           "iteration (1 = publish each record at once)"),
    ("fast_path", str, "compiled aggTrade frame -> ring path: auto (use it if built) | on "
                       "(refuse to start without it) | off (pure Python)"),
    ("time_unit", str, "exchange timestamps in MILLISECOND (Binance's default) or MICROSECOND "
                       "(timeUnit on the stream URL; records carry ns either way)"),
    ("max_id_jump", int, "an id further than this from its stream's last id is held aside, not "
                         "a gap to backfill (a stream restart once --id-resync-after agree)"),
    ("id_resync_after", int, "far ids that must form a run of their own before the stream is "
                             "re-based on them"),
    ("max_backfill_ids", int, "an aggTrade hole larger than this is reported (GAP) without "
                              "fetching it over REST (request weight)"),
)
_CSV_FIELDS = frozenset({"symbols", "streams"})  # comma-separated on the command line


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    values = {name: getattr(args, name) for name, _, _ in _FLAGS}
    for name in _CSV_FIELDS:
        values[name] = _csv(values[name])
    return validate(IngestConfig(**values))


def _main(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"pipeline ingest: error: {exc}", file=sys.stderr)
        return 2
    from pipeline.marketdata.ingest import run

    return run(cfg)


def register(subparsers: Any) -> None:
    """Add the ``ingest`` subcommand."""
    d = IngestConfig()
    p = subparsers.add_parser(
        "ingest", help="market-data streams -> shared-memory tick ring (gap-free)",
        description="Subscribe Binance market-data streams and publish ticks into a ring.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, kind, help_ in _FLAGS:
        default = getattr(d, name)
        if name in _CSV_FIELDS:
            default = ",".join(default)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=help_)
    p.set_defaults(func=_main)
