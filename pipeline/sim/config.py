"""`pipeline sim` configuration: one record of every simulator setting.

Why a module of its own: the simulator (:mod:`pipeline.sim.server`), its CLI
(:mod:`pipeline.sim.cli`), the TOML loader (:mod:`pipeline.config`, section ``[sim]``) and the
runner (which writes the child's argv from it) all use this one :class:`SimConfig`; each field's
:func:`~pipeline.settings.setting` says what it means, its flag and its TOML key, or why it has
none (key material, in-process test hooks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.binance.filters import DEFAULT_STP_MODE, STP_MODES
from pipeline.settings import setting
from pipeline.sim.faults import Faults

# what --rate counts: walk actions or aggTrade messages per second per symbol (pacing.py)
RATE_UNITS = ("actions", "msgs")

DEFAULT_SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT")
# what `pipeline run` simulates with no config: the demo's symbols
RUN_SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
SHUTDOWN_LEADS = ("random", "fixed", "none")  # SimConfig.shutdown_lead
_IN_PROCESS = "an in-process hook (tests embed the simulator); a child process has no use for it"


def parse_rate(text: str) -> float:
    """``--rate`` text -> actions (or messages) per second; ``max``/``0``/``inf`` -> inf."""
    if text.strip().lower() in ("max", "0", "inf"):
        return math.inf
    rate = float(text)
    if rate < 0:
        raise ValueError("--rate must be >= 0")
    return rate


def show_rate(rate: float) -> str:
    """The ``--rate`` text :func:`parse_rate` reads back as ``rate``."""
    return "max" if not math.isfinite(rate) or rate <= 0 else repr(rate)


def _upper_symbols(text: str) -> list[str]:
    return [s.strip().upper() for s in text.split(",") if s.strip()]


@dataclass
class SimConfig:
    """Everything a simulator run needs; defaults are Binance's real values."""

    TOML_SECTION: ClassVar[str] = "sim"

    host: str = field(default="127.0.0.1", metadata=setting("simulator listen address"))
    port: int = field(default=0, metadata=setting(
        "0 = pick a free port", toml=None,
        no_toml="`pipeline run` lets the simulator pick a free port and reads its URLs from "
                "the first stdout line (dependents follow it across restarts)"))
    sbe_port: int = field(default=0, metadata=setting(
        "port of the SBE market-data endpoint (Binance serves SBE on its own host); 0 = pick "
        "a free port", toml=None,
        no_toml="as port: `pipeline run` reads the SBE URL from the first stdout line"))
    symbols: list[str] = field(default_factory=lambda: list(DEFAULT_SYMBOLS), metadata=setting(
        "simulated symbols (comma-separated)", run_default=RUN_SYMBOLS, symbols=True,
        parse=_upper_symbols))
    # Binance allows a subset per symbol (exchangeInfo allowedSelfTradePreventionModes)
    stp_modes: list[str] = field(default_factory=lambda: list(STP_MODES), metadata=setting(
        "selfTradePreventionMode values every simulated symbol allows (comma-separated); an "
        "order naming another is refused with -1013", each_choices=STP_MODES,
        parse=_upper_symbols))
    stp_default: str = field(default=DEFAULT_STP_MODE, metadata=setting(
        "selfTradePreventionMode of an order that names none (exchangeInfo "
        "defaultSelfTradePreventionMode); one of --stp-modes", choices=STP_MODES))
    seed: int = field(default=0, metadata=setting("seed of the market walk"))
    # per second per symbol: walk actions (taker order / maker order / cancel) or, with
    # rate_unit="msgs", aggTrade messages; inf = max (as fast as clients take)
    rate: float = field(default=20.0, metadata=setting(
        "walk actions per second per symbol, in --rate-unit; 0 or 'max' = as fast as clients "
        "take", min=0.0, parse=parse_rate, show=show_rate,
        from_toml=lambda rate: math.inf if rate == 0 else rate))
    rate_unit: str = field(default="actions", metadata=setting(
        "what --rate counts: walk actions (taker/maker/cancel; ~0.36 aggTrades each) or "
        "aggTrade messages (exact on average; for benchmarks that want a message rate)",
        choices=RATE_UNITS))
    replay: str | None = field(default=None, metadata=setting(
        "replay a capture file instead of the walk (TOML: empty = walk)", metavar="FILE",
        run_default="",
        from_toml=lambda path: path or None))
    replay_speed: str = field(default="recorded", metadata=setting(
        "recorded | max: pace of --replay", choices=("recorded", "max")))
    api_keys: dict[str, bytes] = field(default_factory=dict, metadata=setting(
        "API key name -> Ed25519 public key accepted by the WS API",
        flag=None, no_flag="key material: --api-key/--api-key-file/--api-key-env name its "
                           "sources, read at start (pipeline.sim.cli)",
        toml=None, no_toml="`pipeline run` registers the trading process's own key"))
    ping_interval: float = field(default=20.0, metadata=setting(
        "seconds between server pings", min=0.0))
    pong_timeout: float = field(default=60.0, metadata=setting(
        "seconds without pong before a connection is dropped", min=0.0))
    max_lifetime: float = field(default=24 * 3600.0, metadata=setting(
        "seconds a connection may live (Binance: 24 h)", min=0.0))
    shutdown_notice: float = field(default=60.0, metadata=setting(
        "seconds before max lifetime to send serverShutdown (0 = never); with "
        "--shutdown-lead random, the most it may be", min=0.0))
    # Binance dropped its "10 minutes before" wording on 2026-06-09: no lead is promised, and
    # a 24 h close may come with no notice at all (binance-protocol.md 1.4, 7.3)
    shutdown_lead: str = field(default="random", metadata=setting(
        "when serverShutdown precedes the lifetime close: random (a lead drawn per connection "
        "in 0..--shutdown-notice, as Binance promises none), fixed (--shutdown-notice "
        "exactly), none (the close comes with no notice)", choices=SHUTDOWN_LEADS))
    max_incoming_per_s: int = field(default=5, metadata=setting(
        "incoming frames per second a stream connection may send (0 = unlimited)", min=0))
    max_streams: int = field(default=1024, metadata=setting(
        "streams per connection", min=1))
    history: int = field(default=100_000, metadata=setting(
        "aggTrades kept per symbol for REST /aggTrades", min=1))
    tick_s: float = field(default=0.01, metadata=setting(  # generation tick in rate mode
        "seconds per pacing turn at a finite --rate", min=0.001))
    write_high_water: int = field(default=1 << 20, metadata=setting(
        "bytes buffered for a stream client before the walk waits for it", min=1))
    slow_consumer_timeout: float = field(default=10.0, metadata=setting(
        "seconds a client may stay above --write-high-water before it is dropped", min=0.0))
    clock_ms: Callable[[], int] | None = field(default=None, metadata=setting(  # ms wall clock
        "wall clock for event times (ms)", flag=None, no_flag=_IN_PROCESS, toml=None,
        no_toml=_IN_PROCESS))
    wsapi_options: dict[str, Any] = field(default_factory=dict, metadata=setting(
        "WsApiService limits (**kwargs)", flag=None, no_flag=_IN_PROCESS, toml=None,
        no_toml=_IN_PROCESS))
    faults: Faults = field(default_factory=Faults, metadata=setting(
        "fault switches", flag=None,
        no_flag="set at start by --fault/--wsapi-delay-ms/--reject-logons/--order-fault "
                "(pipeline.sim.cli), at run time by POST /sim/fault",
        toml=None, no_toml="faults are for tests and demos, not a deployment setting"))
    extra_args: list[str] = field(default_factory=lambda: [], metadata=setting(
        "extra `pipeline sim` arguments `pipeline run` appends", flag=None,
        no_flag="raw flags for the child's command line, so it has no flag of its own"))

    def stp_problem(self) -> str:
        """Why ``stp_modes``/``stp_default`` cannot be simulated ("" if they can): a symbol's
        default STP mode must be one it allows (the CLI and the TOML loader both ask)."""
        unknown = [m for m in self.stp_modes if m not in STP_MODES]
        if unknown or not self.stp_modes:
            return f"STP modes are some of {','.join(STP_MODES)}, not {','.join(unknown)}"
        if self.stp_default not in self.stp_modes:
            return f"{self.stp_default} is not among the allowed {','.join(self.stp_modes)}"
        return ""


__all__ = ["DEFAULT_SYMBOLS", "SHUTDOWN_LEADS", "SimConfig", "parse_rate", "show_rate"]
