"""`pipeline trade` configuration: one record of every trading-process setting.

Why a module of its own: the trading process (:mod:`pipeline.trading.process`), its CLI
(:mod:`pipeline.trading.cli`), the TOML loader (:mod:`pipeline.config`, section ``[trading]``)
and the runner (which writes the child's argv with :func:`pipeline.settings.to_argv`) all use
this one :class:`TradingConfig`. Before, ``[trading]`` had a TOML type of its own, the process
another, and the CLI and the runner spelled the flags by hand on each side.

Each field's :func:`~pipeline.settings.setting` says what it means, its flag and its TOML key,
or why it has none. The session core's settings stay a nested :class:`SessionConfig` (the core
takes it whole) and are flattened into `pipeline trade`'s flags (``--ping-interval`` sets
``session.ping_interval_s``). Launch-level fields (``enabled``, ``api_key``, ``api_key_file``,
``extra_args``) are read by `pipeline run` only: the API key reaches the child through a 0600
file or an environment variable named on its command line, never as an argv value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.net.ws import TRANSPORTS
from pipeline.settings import setting
from pipeline.trading.session_types import SessionConfig
from pipeline.trading.wire import EXEC_RING, ORDER_RING_PREFIX, REPLY_CAPACITY

METRICS_NAME = "pipeline.trading.metrics"

_IN_PROCESS = "an in-process hook (tests embed the process); a child process has no use for it"
_LAUNCH = "read by `pipeline run` to decide how to start the child, not by the process itself"
_TUNING = ("process tuning that no deployment has needed in the TOML yet: pass the flag in "
           "trading.extra_args")


def _upper_symbols(text: str) -> tuple[str, ...]:
    return tuple(s for s in text.upper().split(",") if s)


@dataclass
class TradingConfig:
    """Everything a trading process needs, and what `pipeline run` needs to launch one."""

    TOML_SECTION: ClassVar[str] = "trading"

    url: str = field(default="", metadata=setting(
        "WS API URL (default: production; --testnet for the testnet; TOML: empty = by run.mode)",
        flag="--wsapi-url", toml="trading.wsapi_url", url=True))
    session: SessionConfig = field(default_factory=SessionConfig, metadata=setting(
        "the session core's settings", flatten=True, toml=None,
        no_toml=_TUNING.replace("the flag", "its flags")))
    testnet: bool = field(default=False, metadata=setting(
        "use the Spot testnet WS API (when no --wsapi-url)", toml=None,
        no_toml="run.mode = 'testnet' picks the testnet endpoints"))
    private_key: str = field(default="", metadata=setting(
        "Ed25519 private key: PEM, DER, hex or base64 seed (mode 0600; TOML: sim: generated)",
        metavar="PATH", required=True))
    exec_ring: str = field(default=EXEC_RING, metadata=setting(
        "execution-report ring", metavar="NAME", toml="ring.exec_name", shm_name=True))
    exec_capacity: int = field(default=1 << 14, metadata=setting(
        "execution-report ring slots", toml=None, no_toml=_TUNING))
    metrics_name: str = field(default=METRICS_NAME, metadata=setting(
        f"metrics block name (default {METRICS_NAME}; TOML: <run.shm_prefix>trading.metrics)",
        flag="--metrics", metavar="NAME", toml="run.shm_prefix",
        from_toml=lambda prefix: f"{prefix}trading.metrics"))
    scan_interval_s: float = field(default=0.5, metadata=setting(
        "seconds between scans for new order rings", flag="--scan-interval", toml=None,
        no_toml=_TUNING))
    poll_interval_s: float = field(default=0.0005, metadata=setting(
        "order-ring polling interval (s), only without the wake channel", flag="--poll-interval",
        toml=None, no_toml=_TUNING))
    wake_poll_interval_s: float = field(default=0.1, metadata=setting(
        "safety poll behind the wake channel (s)", flag="--wake-poll-interval", toml=None,
        no_toml=_TUNING))
    spin_after_order_s: float = field(default=0.002, metadata=setting(
        "after an order, keep polling the order rings this long before sleeping on the doorbell"
        " (s; 0: sleep at once): a strategy's next order is then taken without waking a sleeping"
        " process, for CPU spent only while orders flow", flag="--spin-after-order", toml=None,
        no_toml=_TUNING, min=0.0, max=1.0))
    order_wake: bool = field(default=True, metadata=setting(
        "wake on the order rings' doorbell (--no-order-wake: poll them, flagged in health)",
        toml=None, no_toml=_TUNING))
    max_order_age_s: float = field(default=5.0, metadata=setting(
        "orders older than this when read are refused as stale (s)", flag="--max-order-age",
        toml=None, no_toml=_TUNING))
    open_timeout_s: float = field(default=10.0, metadata=setting(
        "seconds a connection may take to open", flag="--open-timeout", toml=None,
        no_toml=_TUNING))
    metrics_interval_s: float = field(default=0.05, metadata=setting(
        "seconds between metrics block updates", flag="--metrics-interval", toml=None,
        no_toml=_TUNING))
    keep_metrics_on_failure: bool = field(default=True, metadata=setting(
        "leave the metrics block behind after Failed, for `pipeline health`", toml=None,
        no_toml=_TUNING))
    order_prefix: str = field(default=ORDER_RING_PREFIX, metadata=setting(
        f"order rings to read: /dev/shm/PREFIX<client> (default {ORDER_RING_PREFIX})",
        metavar="PREFIX", toml=None, no_toml=_TUNING))
    reply_ring: str | None = field(default=None, metadata=setting(
        "ring for open-orders / cancel-all / account answers (default: the exec ring's name "
        "with .exec -> .replies)", metavar="NAME", toml=None, no_toml=_TUNING))
    reply_capacity: int = field(default=REPLY_CAPACITY, metadata=setting(
        "reply ring slots", toml=None, no_toml=_TUNING))
    # Pre-trade risk: the limits table's name (None: no check), its max age, and the name the
    # risk consumer's reader has on the exec ring (to know which of our orders it has seen).
    risk_limits: str | None = field(default=None, metadata=setting(
        "check every order against this risk limits table (e.g. pipeline.risk.limits; "
        "default: no pre-trade check)", metavar="NAME", toml=None,
        no_toml="`pipeline run` sets it to risk.limits_name when the risk consumer runs"))
    risk_max_age_s: float = field(default=5.0, metadata=setting(
        "refuse orders when the limits table is older than this (default 5)",
        flag="--risk-max-age", metavar="S", toml=None, no_toml=_TUNING))
    risk_reader: str = field(default="risk", metadata=setting(
        "the risk consumer's reader name on the exec ring", toml=None, no_toml=_TUNING))
    risk_observe_interval_s: float = field(default=0.01, metadata=setting(
        "seconds between looks at the risk consumer's progress",
        flag="--risk-observe-interval", toml=None, no_toml=_TUNING))
    heartbeat_interval_s: float = field(default=1.0, metadata=setting(
        "metrics block written at least this often, even idle (s)", flag="--heartbeat-interval",
        toml=None, no_toml=_TUNING))
    outbox_capacity: int = field(default=4096, metadata=setting(
        "frames queued per connection while its transport is backed up", toml=None,
        no_toml=_TUNING))
    transport: str = field(default="picows", metadata=setting(
        "WebSocket implementation (pipeline.net.ws); websockets is the fallback",
        choices=TRANSPORTS, toml=None, no_toml=_TUNING))
    # Local pre-trade checks from exchangeInfo (pipeline.trading.pretrade): the REST base URL
    # (None: the one that goes with ``url``), how often the rules are fetched again (0: no
    # local checks), and symbols whose rules are loaded at start (others: from their first order).
    rest_url: str | None = field(default=None, metadata=setting(
        "REST base URL for exchangeInfo (default: the one that goes with the WS API URL)",
        metavar="URL", toml=None, no_toml="`pipeline run` derives it from the WS API URL"))
    rules_refresh_s: float = field(default=300.0, metadata=setting(
        "fetch the symbols' exchangeInfo rules again this often, for local pre-trade checks "
        "(default 300; 0 = no local checks)", flag="--rules-refresh", metavar="S", toml=None,
        no_toml=_TUNING))
    rules_symbols: tuple[str, ...] = field(default=(), metadata=setting(
        "load these symbols' rules at start (others: from their first order)", flag="--symbols",
        metavar="S1,S2", parse=_upper_symbols, toml=None, no_toml=_TUNING))
    extra: dict[str, Any] = field(default_factory=dict, metadata=setting(
        "in-process extras", flag=None, no_flag=_IN_PROCESS, toml=None, no_toml=_IN_PROCESS))
    # launch-level: `pipeline run` reads these, the process does not
    enabled: bool = field(default=True, metadata=setting(
        "start the trading session process", flag=None, no_flag=_LAUNCH))
    api_key: str = field(default="", metadata=setting(
        "API key inline (prefer api_key_file; sim: generated when both are empty)", flag=None,
        no_flag="a secret: `pipeline run` hands it over in a 0600 file or an environment "
                "variable (--api-key-file/--api-key-env), never as an argv value"))
    api_key_file: str = field(default="", metadata=setting(
        "file holding the API key (mode 0600 or 0640, ours or root's; never in argv)", flag=None,
        no_flag="a key source: `pipeline run` passes it as --api-key-file, a flag `pipeline "
                "trade` keeps beside --api-key-env (sources, not settings)"))
    extra_args: list[str] = field(default_factory=lambda: [], metadata=setting(
        "extra `pipeline trade` arguments `pipeline run` appends", flag=None,
        no_flag="raw flags for the child's command line, so it has no flag of its own"))


__all__ = ["METRICS_NAME", "SessionConfig", "TradingConfig"]
