"""`pipeline ingest` configuration: one record of every setting, checked before anything opens.

Why a module of its own: the CLI (pipeline/marketdata/cli.py), the process (ingest.py), the
TOML loader (:mod:`pipeline.config`, section ``[ingest]``), the runner (which writes the child's
argv from it) and the tests build and check the same :class:`IngestConfig`; none of them needs
the others to do it. Each field's :func:`~pipeline.settings.setting` says what it means, its flag
and its TOML key; :func:`validate` holds the process's rules (errors name the flag; the loader
renames them to the TOML key).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import ClassVar

from pipeline.settings import ConfigError, setting

DEFAULT_STREAMS_URL = "wss://stream.binance.com:9443"
DEFAULT_REST_URL = "https://api.binance.com"
DEFAULT_SBE_URL = "wss://stream-sbe.binance.com:9443"
#: SBE market-data stream kinds (no aggTrade over SBE) and the JSON kind each one duplicates
SBE_STREAM_KINDS = {"trade": "trade", "bestBidAsk": "bookTicker", "depth": "depth",
                    "depth20": "depth20"}
MAX_STREAMS_PER_CONNECTION = 1024  # section 1.3
# what `pipeline run` ingests with no config: the simulator demo's symbols
RUN_SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]


def _stream_kinds() -> tuple[str, ...]:
    """Every stream suffix ingest can parse: the decoder's own table (imported when needed, so
    ``pipeline --help`` does not load the decoders)."""
    from pipeline.binance.streams import STREAM_SUFFIXES

    return tuple(STREAM_SUFFIXES)


_BY_MODE = "empty: by run.mode, the simulator's in sim mode"


@dataclass
class IngestConfig:
    """Every setting of `pipeline ingest`; the TOML section ``[ingest]`` is this type too."""

    TOML_SECTION: ClassVar[str] = "ingest"

    streams_url: str = field(default=DEFAULT_STREAMS_URL, metadata=setting(
        f"market streams base URL (TOML: {_BY_MODE})", run_default="", url=True))
    rest_url: str = field(default=DEFAULT_REST_URL, metadata=setting(
        f"REST base URL (snapshots, backfill) (TOML: {_BY_MODE})", run_default="", url=True))
    symbols: list[str] = field(default_factory=lambda: ["BTCUSDT", "ETHUSDT"], metadata=setting(
        "comma-separated symbols", run_default=RUN_SYMBOLS, symbols=True))
    # depth@100ms by default: ten times fresher than the 1000 ms `depth`, for the same book
    streams: list[str] = field(
        default_factory=lambda: ["aggTrade", "bookTicker", "depth@100ms"], metadata=setting(
            "stream kinds per symbol: aggTrade, trade, bookTicker, depth@100ms (diff book, "
            "100 ms), depth (1000 ms), depth5/10/20[@100ms] (top N)",
            each_choices=_stream_kinds))
    ring: str = field(default="ticks", metadata=setting(
        "ring (shared-memory) name", toml="ring.name"))
    ring_capacity: int = field(default=1 << 20, metadata=setting(
        "ring slots (power of two)", toml="ring.capacity"))
    cpu: int | None = field(default=None, metadata=setting(
        "pin the process to this CPU", toml=None,
        no_toml="`pipeline run` pins each child itself (run.cpus, run.pin_cpus)"))
    stall_timeout: float = field(default=30.0, metadata=setting(
        "seconds without any message before a connection counts as dead"))
    transport: str = field(default="picows", metadata=setting("picows | websockets"))
    decoder: str = field(default="msgspec", metadata=setting("msgspec | orjson"))
    max_lifetime: float = field(default=23.5 * 3600, metadata=setting(  # before the 24 h limit
        "rotate connections after this many seconds (server limit: 24 h)"))
    metrics: str = field(default="pipeline.ingest.metrics", metadata=setting(
        "metrics block name (TOML: <run.shm_prefix>ingest.metrics)", toml="run.shm_prefix",
        from_toml=lambda prefix: f"{prefix}ingest.metrics"))
    metrics_interval: float = field(default=0.1, metadata=setting(
        "seconds between metrics updates"))
    depth_levels: int = field(default=0, metadata=setting(
        "also publish this many book levels as DEPTH_LEVEL records"))
    depth_snapshot_limit: int = field(default=1000, metadata=setting(
        "levels per REST depth snapshot"))
    backoff_base: float = field(default=1.0, metadata=setting(
        "first reconnect delay (s), doubling"))
    backoff_max: float = field(default=60.0, metadata=setting("reconnect delay cap (s)"))
    healthy_after: float = field(default=30.0, metadata=setting(
        "a connection up this long resets the backoff"))
    ping_interval: float = field(default=20.0, metadata=setting(
        "own keep-alive ping after this many idle seconds (0 = off)"))
    backfill_grace: float = field(default=0.2, metadata=setting(
        "wait this long for the live stream to fill a hole before REST"))
    rest_retries: int = field(default=5, metadata=setting(
        "failed/unproductive REST attempts before a GAP record"))
    rest_timeout: float = field(default=5.0, metadata=setting("REST timeout (s)"))
    rest_weight_limit: int = field(default=6000, metadata=setting(  # restbudget.py
        "the exchange's REST REQUEST_WEIGHT per window (Binance: 6000 per minute per IP); "
        "ingest spends at most four fifths of it, pacing snapshots and backfills to stay inside"))
    rest_weight_interval: float = field(default=60.0, metadata=setting(
        "length of the REQUEST_WEIGHT window (s; Binance: 60, a simulator test may shorten it)"))
    rest_api_key_env: str = field(default="", metadata=setting(
        "name of an environment variable holding an API key sent as X-MBX-APIKEY on "
        "historicalTrades (@trade backfill); the key itself never goes on a command line"))
    streams_per_connection: int = field(default=MAX_STREAMS_PER_CONNECTION, metadata=setting(
        "streams per connection (max 1024)"))
    max_frame_bytes: int = field(default=4 << 20, metadata=setting(
        "larger frames are skipped (counted as oversized)"))
    publish_batch: int = field(default=64, metadata=setting(
        "at most this many records of one frame (a depth update's levels) per ring commit; "
        "every frame is visible as soon as it is decoded (1 = each record at once)"))
    fast_path: str = field(default="auto", metadata=setting(
        "compiled paths (JSON aggTrade/trade/bookTicker frame -> ring, SBE decoder): auto (use "
        "them if built) | on (refuse to start without them) | off (pure Python)"))
    time_unit: str = field(default="MILLISECOND", metadata=setting(
        "exchange timestamps in MILLISECOND (Binance's default) or MICROSECOND (timeUnit on the "
        "stream URL; records carry ns either way)"))
    max_id_jump: int = field(default=5_000_000, metadata=setting(  # gapfill.DEFAULT_MAX_ID_JUMP
        "an id further than this from its stream's last id is held aside, not a gap to "
        "backfill (a stream restart once --id-resync-after agree)"))
    id_resync_after: int = field(default=16, metadata=setting(  # gapfill.DEFAULT_RESYNC_AFTER
        "far ids that must form a run of their own before the stream is re-based on them"))
    max_backfill_ids: int = field(default=200_000, metadata=setting(  # 200 REST pages
        "an aggTrade hole larger than this is reported (GAP) without fetching it over REST "
        "(request weight)"))
    sbe_streams: list[str] = field(default_factory=lambda: [], metadata=setting(
        "SBE (binary) stream kinds per symbol: trade, bestBidAsk, depth, depth20; empty = no "
        "SBE connection. Needs --sbe-api-key-env"))
    sbe_url: str = field(default=DEFAULT_SBE_URL, metadata=setting(
        "SBE market streams base URL", url=True))
    sbe_api_key_env: str = field(default="", metadata=setting(
        "name of an environment variable holding the API key SBE streams require "
        "(X-MBX-APIKEY); the key itself never goes on a command line"))
    sbe_api_key_file: str = field(default="", metadata=setting(
        "file holding the API key SBE streams require, checked as trading's --api-key-file is "
        "(ours, not readable by other users; a systemd credential fits); wins over "
        "--sbe-api-key-env"))
    extra_args: list[str] = field(default_factory=lambda: [], metadata=setting(
        "extra `pipeline ingest` arguments `pipeline run` appends", flag=None,
        no_flag="raw flags for the child's command line, so it has no flag of its own"))

    def stream_names(self) -> list[str]:
        from pipeline.binance.streams import stream_name

        return [stream_name(sym, kind) for sym in self.symbols for kind in self.streams]

    def sbe_stream_names(self) -> list[str]:
        return [f"{sym.lower()}@{kind}" for sym in self.symbols for kind in self.sbe_streams]


_SYMBOL_RE = re.compile(r"[A-Z0-9]{2,20}")  # fullmatch: "$" would accept a trailing newline


def normal_symbol(text: str) -> str:
    """A symbol as the ring and REST name it (upper case). Binance's own stream names are lower
    case (``btcusdt@trade``), so either case is taken; anything that is not 2-20 ASCII letters
    and digits is refused (ConfigError naming --symbols)."""
    sym = text.strip().upper()
    if not sym.isascii() or not _SYMBOL_RE.fullmatch(sym):
        raise ConfigError("--symbols", f"{text!r} is not a Binance symbol (2-20 letters and "
                                       "digits, in any case: BTCUSDT or btcusdt)")
    return sym


def streams_base_url(url: str) -> str:
    """The streams base URL ingest appends ``/stream?streams=...`` to. A URL copied with its
    ``/stream`` or ``/ws`` path (the forms section 1.2 shows) is cut back to its base: kept as
    given it became ``/stream/stream?...``, which the venue answers 404. A URL naming streams
    itself (a query, or ``/ws/<stream>``) is refused with what to give instead."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    example = f"{parts.scheme}://{parts.netloc}"
    if parts.query or parts.fragment or "@" in path.rpartition("/")[2]:
        raise ConfigError("--streams-url", f"give the base URL without streams or a query "
                                           f"(e.g. {example}), got {url!r}")
    for suffix in ("/stream", "/ws"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    return example + path


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if not (value >= 0 if allow_zero else value > 0) or value != value:
        raise ConfigError(name, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: IngestConfig) -> IngestConfig:
    """Check everything before any socket or segment exists; errors name the flag. Symbols
    are normalised to upper case and the streams URL to its base (see the helpers above)."""
    from pipeline.binance.streams import (
        DECODERS,
        DEPTH_DIFF,
        STREAM_SUFFIXES,
        unknown_stream_kind,
    )
    from pipeline.net.ws import TRANSPORTS

    for name, url, schemes in (("--streams-url", cfg.streams_url, ("ws://", "wss://")),
                               ("--rest-url", cfg.rest_url, ("http://", "https://"))):
        if not url.startswith(schemes) or len(url) <= len(schemes[0]) + 1:
            raise ConfigError(name, f"must start with {' or '.join(schemes)}, got {url!r}")
    cfg.streams_url = streams_base_url(cfg.streams_url)
    if not cfg.symbols:
        raise ConfigError("--symbols", "at least one symbol is required")
    cfg.symbols = [normal_symbol(s) for s in cfg.symbols]
    if len(set(cfg.symbols)) != len(cfg.symbols):
        raise ConfigError("--symbols", "duplicate symbol")
    if not cfg.streams and not cfg.sbe_streams:
        raise ConfigError("--streams", "at least one stream kind is required")
    if len(set(cfg.streams)) != len(cfg.streams):
        raise ConfigError("--streams", "duplicate stream kind")
    for k in cfg.streams:
        if k not in STREAM_SUFFIXES:
            raise ConfigError("--streams", unknown_stream_kind(k))
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
    if not 1 <= cfg.rest_weight_limit <= 1 << 40:
        raise ConfigError("--rest-weight-limit", f"must be >= 1, got {cfg.rest_weight_limit}")
    if not 0.1 <= cfg.rest_weight_interval <= 86400:
        raise ConfigError("--rest-weight-interval", "must be in 0.1..86400 s")
    if cfg.rest_api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,200}",
                                                 cfg.rest_api_key_env):
        raise ConfigError("--rest-api-key-env", "must be an environment variable name")
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
    _validate_sbe(cfg)
    return cfg


def _validate_sbe(cfg: IngestConfig) -> None:
    """SBE streams: known kinds, none also subscribed over JSON (two copies of one stream would
    be two trackers racing for the same ids), and a key variable named (whether it is set is
    checked by the process itself at start: the TOML may be checked elsewhere)."""
    if not cfg.sbe_streams:
        return
    if not cfg.sbe_url.startswith(("ws://", "wss://")):
        raise ConfigError("--sbe-url", f"must start with ws:// or wss://, got {cfg.sbe_url!r}")
    cfg.sbe_url = streams_base_url(cfg.sbe_url)
    if len(set(cfg.sbe_streams)) != len(cfg.sbe_streams):
        raise ConfigError("--sbe-streams", "duplicate stream kind")
    for k in cfg.sbe_streams:
        if k not in SBE_STREAM_KINDS:
            extra = " (there is no aggTrade over SBE: use trade)" if k == "aggTrade" else ""
            raise ConfigError("--sbe-streams", f"unknown SBE stream kind {k!r}{extra}; "
                                               f"one of {', '.join(SBE_STREAM_KINDS)}")
        json_kind = SBE_STREAM_KINDS[k]
        both = [s for s in cfg.streams if s == json_kind or s.partition("@")[0] == json_kind]
        if both:
            raise ConfigError("--sbe-streams", f"{k} is also in --streams ({both[0]}): "
                                               "subscribe each kind over one protocol")
    if "depth" in cfg.sbe_streams and any(s.startswith("depth@") for s in cfg.streams):
        raise ConfigError("--sbe-streams", "one diff-depth stream per symbol: depth is also "
                                           "in --streams")
    if not cfg.sbe_api_key_env and not cfg.sbe_api_key_file:
        raise ConfigError("--sbe-api-key-env", "SBE streams need an API key: name the "
                                               "environment variable holding it (or the file: "
                                               "--sbe-api-key-file)")
    if cfg.sbe_api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,200}",
                                                cfg.sbe_api_key_env):
        raise ConfigError("--sbe-api-key-env", "must be an environment variable name")


def sbe_api_key(cfg: IngestConfig) -> str:
    """The API key for SBE connections, from ``--sbe-api-key-file`` or else the variable named
    by ``--sbe-api-key-env``. Read when the process starts (validate() may run on another host,
    for a TOML file); :class:`~pipeline.config.SecretFileError` names the source, never the key.
    """
    from pipeline.config import read_api_key_env, read_api_key_file

    if cfg.sbe_api_key_file:
        return read_api_key_file(cfg.sbe_api_key_file)
    return read_api_key_env(cfg.sbe_api_key_env)

