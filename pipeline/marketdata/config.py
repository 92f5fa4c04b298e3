"""`pipeline ingest` configuration: one record of every setting, checked before anything opens.

Why a module of its own: the CLI (pipeline/marketdata/cli.py), the process (ingest.py) and the
tests build and check the same :class:`IngestConfig`; none of them needs the others to do it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_STREAMS_URL = "wss://stream.binance.com:9443"
DEFAULT_REST_URL = "https://api.binance.com"
MAX_STREAMS_PER_CONNECTION = 1024  # section 1.3


class ConfigError(ValueError):
    """Bad configuration; ``field`` names the flag."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name


@dataclass
class IngestConfig:
    streams_url: str = DEFAULT_STREAMS_URL
    rest_url: str = DEFAULT_REST_URL
    symbols: list[str] = field(default_factory=lambda: ["BTCUSDT", "ETHUSDT"])
    streams: list[str] = field(default_factory=lambda: ["aggTrade", "bookTicker", "depth"])
    ring: str = "ticks"
    ring_capacity: int = 1 << 20
    cpu: int | None = None
    stall_timeout: float = 30.0
    transport: str = "picows"
    decoder: str = "msgspec"
    max_lifetime: float = 23.5 * 3600  # rotate before the 24 h server limit
    metrics: str = "pipeline.ingest.metrics"
    metrics_interval: float = 0.1
    depth_levels: int = 0
    depth_snapshot_limit: int = 1000
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    healthy_after: float = 30.0
    ping_interval: float = 20.0
    backfill_grace: float = 0.2
    rest_retries: int = 5
    rest_timeout: float = 5.0
    streams_per_connection: int = MAX_STREAMS_PER_CONNECTION
    max_frame_bytes: int = 4 << 20
    publish_batch: int = 64
    fast_path: str = "auto"
    time_unit: str = "MILLISECOND"
    max_id_jump: int = 5_000_000  # pipeline.gapfill.DEFAULT_MAX_ID_JUMP
    max_backfill_ids: int = 200_000  # 200 REST pages: a hole larger than this is a GAP at once
    id_resync_after: int = 16  # pipeline.gapfill.DEFAULT_RESYNC_AFTER

    def stream_names(self) -> list[str]:
        from pipeline.binance.streams import stream_name

        return [stream_name(sym, kind) for sym in self.symbols for kind in self.streams]


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if not (value >= 0 if allow_zero else value > 0) or value != value:
        raise ConfigError(name, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: IngestConfig) -> IngestConfig:
    """Check everything before any socket or segment exists; errors name the flag."""
    import re

    from pipeline.binance.streams import DECODERS, DEPTH_DIFF, STREAM_SUFFIXES
    from pipeline.net.ws import TRANSPORTS

    for name, url, schemes in (("--streams-url", cfg.streams_url, ("ws://", "wss://")),
                               ("--rest-url", cfg.rest_url, ("http://", "https://"))):
        if not url.startswith(schemes) or len(url) <= len(schemes[0]) + 1:
            raise ConfigError(name, f"must start with {' or '.join(schemes)}, got {url!r}")
    if not cfg.symbols:
        raise ConfigError("--symbols", "at least one symbol is required")
    for s in cfg.symbols:
        if not re.fullmatch(r"[A-Z0-9]{2,20}", s):
            raise ConfigError("--symbols", f"{s!r} is not an upper-case Binance symbol")
    if len(set(cfg.symbols)) != len(cfg.symbols):
        raise ConfigError("--symbols", "duplicate symbol")
    if not cfg.streams:
        raise ConfigError("--streams", "at least one stream kind is required")
    if len(set(cfg.streams)) != len(cfg.streams):
        raise ConfigError("--streams", "duplicate stream kind")
    for k in cfg.streams:
        if k not in STREAM_SUFFIXES:
            raise ConfigError("--streams", f"unknown stream kind {k!r}; known: "
                              f"{', '.join(STREAM_SUFFIXES)}")
    diff = [k for k in cfg.streams if STREAM_SUFFIXES[k] == DEPTH_DIFF]
    if len(diff) > 1:  # one local book per symbol
        raise ConfigError("--streams", f"subscribe one diff-depth stream per symbol, got {diff}")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", cfg.ring):
        raise ConfigError("--ring", f"not a valid shared-memory name: {cfg.ring!r}")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", cfg.metrics):
        raise ConfigError("--metrics", f"not a valid shared-memory name: {cfg.metrics!r}")
    cap = cfg.ring_capacity
    if cap < 2 or cap & (cap - 1):
        raise ConfigError("--ring-capacity", f"must be a power of two >= 2, got {cap}")
    if cfg.cpu is not None:
        allowed = sorted(os.sched_getaffinity(0))
        if cfg.cpu not in allowed:
            raise ConfigError("--cpu", f"CPU {cfg.cpu} is not available (allowed: {allowed})")
    if cfg.transport not in TRANSPORTS:
        raise ConfigError("--transport", f"must be one of {', '.join(TRANSPORTS)}")
    if cfg.decoder not in DECODERS:
        raise ConfigError("--decoder", f"must be {' or '.join(DECODERS)}")
    for name, v in (("--stall-timeout", cfg.stall_timeout), ("--max-lifetime", cfg.max_lifetime),
                    ("--metrics-interval", cfg.metrics_interval),
                    ("--backoff-base", cfg.backoff_base), ("--backoff-max", cfg.backoff_max),
                    ("--rest-timeout", cfg.rest_timeout)):
        _positive(name, v)
    for name, v in (("--healthy-after", cfg.healthy_after), ("--ping-interval", cfg.ping_interval),
                    ("--backfill-grace", cfg.backfill_grace),
                    ("--rest-retries", cfg.rest_retries), ("--depth-levels", cfg.depth_levels)):
        _positive(name, v, allow_zero=True)
    if cfg.backoff_max < cfg.backoff_base:
        raise ConfigError("--backoff-max", "must be >= --backoff-base")
    if not 1 <= cfg.streams_per_connection <= MAX_STREAMS_PER_CONNECTION:
        raise ConfigError("--streams-per-connection", f"must be in 1..{MAX_STREAMS_PER_CONNECTION}")
    if not 1 <= cfg.depth_snapshot_limit <= 5000:
        raise ConfigError("--depth-snapshot-limit", "must be in 1..5000")
    if cfg.depth_levels > 1000:
        raise ConfigError("--depth-levels", "must be <= 1000")
    if not 1 <= cfg.publish_batch <= min(4096, cfg.ring_capacity):
        raise ConfigError("--publish-batch", "must be in 1..min(4096, --ring-capacity)")
    from pipeline.marketdata.fastpath import FAST_PATH_MODES

    if cfg.fast_path not in FAST_PATH_MODES:
        raise ConfigError("--fast-path", f"must be one of {', '.join(FAST_PATH_MODES)}")
    from pipeline.binance.streams import TIME_UNITS

    if cfg.time_unit not in TIME_UNITS:
        raise ConfigError("--time-unit", f"must be one of {', '.join(TIME_UNITS)}")
    if len(cfg.symbols) > 65535:
        raise ConfigError("--symbols", "too many symbols for the ring's u2 symbol id")
    if not 1 <= cfg.max_id_jump <= 1 << 62:
        raise ConfigError("--max-id-jump", f"must be in 1..2**62, got {cfg.max_id_jump}")
    if not 1 <= cfg.max_backfill_ids <= 1 << 62:
        raise ConfigError("--max-backfill-ids", f"must be >= 1, got {cfg.max_backfill_ids}")
    if not 1 <= cfg.id_resync_after <= 10_000:
        raise ConfigError("--id-resync-after",
                          f"must be in 1..10000, got {cfg.id_resync_after}")
    return cfg

