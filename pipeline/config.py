"""Typed configuration for `pipeline run` and the consumers: TOML file, then env overrides.

Why a hand-rolled loader: the whole config is a handful of flat sections, and what matters is
that a typo fails loudly *before* any process starts, with an error that names the key
(``ingest.symbols[1]: ...``), instead of a silently ignored setting in production.

Layering (later wins):

1. the embedded defaults below (the local simulator demo, what ``make run`` uses);
2. ``--config FILE`` (TOML, read with :mod:`tomllib`); unknown sections/keys are errors;
3. environment variables ``PIPELINE_<SECTION>_<KEY>`` (e.g.
   ``PIPELINE_INGEST_SYMBOLS=BTCUSDT,ETHUSDT``, ``PIPELINE_RUN_MODE=testnet``). Only variables
   whose ``<SECTION>`` is a known section are considered (``PIPELINE_LOG_FORMAT`` belongs to
   :mod:`pipeline.logs`); within a known section an unknown key is an error. Lists are comma
   separated, tables are ``K=V,K=V``, booleans are ``1/0/true/false/yes/no/on/off``.

See ``examples/pipeline.toml`` for every key with its meaning.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import sys
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.binance.streams import STREAM_SUFFIXES
from pipeline.ipc.records import TICK_RING

ENV_PREFIX = "PIPELINE_"

MODES = ("sim", "testnet", "live")
# Every stream suffix ingest can parse (binance-protocol.md §1.6): the decoder's own table, so
# the config cannot accept a kind ingest does not decode, or refuse one it does.
STREAM_KINDS = tuple(STREAM_SUFFIXES)
CONSUMERS = ("monitor", "persist", "risk")

# Public endpoints per mode (binance-protocol.md §1.1, §2.1). "sim" endpoints come from the
# simulator's first stdout line at run time.
ENDPOINTS: dict[str, dict[str, str]] = {
    "live": {
        "streams_url": "wss://stream.binance.com:9443",
        "rest_url": "https://api.binance.com",
        "wsapi_url": "wss://ws-api.binance.com:443/ws-api/v3",
    },
    "testnet": {
        "streams_url": "wss://stream.testnet.binance.vision",
        "rest_url": "https://testnet.binance.vision",
        "wsapi_url": "wss://ws-api.testnet.binance.vision/ws-api/v3",
    },
}

_SYMBOL_RE = re.compile(r"[A-Z0-9]{2,20}")  # fullmatch: "$" would accept a trailing newline
_SHM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")  # as pipeline.shm, fullmatch


class ConfigError(ValueError):
    """A configuration problem; ``key`` is the dotted name of the offending setting."""

    def __init__(self, key: str, problem: str, source: str = "") -> None:
        self.key = key
        self.problem = problem
        self.source = source
        where = f" (from {source})" if source else ""
        super().__init__(f"{key}: {problem}{where}")


def _m(doc: str, **checks: Any) -> dict[str, Any]:
    """Field metadata: a one-line meaning plus validation rules (min/max/choices/...)."""
    return {"doc": doc, **checks}


@dataclass(frozen=True)
class RunConfig:
    mode: str = field(
        default="sim",
        metadata=_m("sim | testnet | live: where market data and orders go", choices=MODES),
    )
    consumers: list[str] = field(
        default_factory=lambda: ["monitor"],
        metadata=_m("consumers `pipeline run` starts", each_choices=CONSUMERS),
    )
    shm_prefix: str = field(
        default="pipeline.",
        metadata=_m(
            "prefix of the metrics blocks (<prefix>ingest.metrics, ...), read by `pipeline health`",
            shm_name=True,
        ),
    )
    pin_cpus: bool = field(
        default=True, metadata=_m("pin each process to its own CPU (shared when too few)")
    )
    cpus: dict[str, int] = field(
        default_factory=lambda: {},
        metadata=_m(
            "explicit CPU per component name (sim, ingest, trading, monitor, ...)", each_min=0
        ),
    )


@dataclass(frozen=True)
class RingConfig:
    name: str = field(
        default=TICK_RING,
        metadata=_m("market-data ring segment name (/dev/shm)", shm_name=True),
    )
    capacity: int = field(
        default=1 << 16, metadata=_m("ring slots (power of two)", min=1024, power_of_two=True)
    )
    exec_name: str = field(
        default="pipeline.trading.exec",
        metadata=_m("execution-report ring from trading", shm_name=True),
    )


@dataclass(frozen=True)
class SimConfig:
    host: str = field(default="127.0.0.1", metadata=_m("simulator listen address"))
    symbols: list[str] = field(
        default_factory=lambda: ["BTCUSDT", "ETHUSDT", "SOLUSDT"],
        metadata=_m("simulated symbols", symbols=True),
    )
    rate: float = field(
        default=20.0,
        metadata=_m(
            "simulator walk actions per second per symbol (0 = as fast as possible)", min=0.0
        ),
    )
    extra_args: list[str] = field(
        default_factory=lambda: [], metadata=_m("extra `pipeline sim` arguments")
    )


@dataclass(frozen=True)
class IngestConfig:
    symbols: list[str] = field(
        default_factory=lambda: ["BTCUSDT", "ETHUSDT", "SOLUSDT"],
        metadata=_m("symbols to ingest", symbols=True),
    )
    streams: list[str] = field(
        default_factory=lambda: ["aggTrade", "bookTicker", "depth"],
        metadata=_m("stream kinds per symbol", each_choices=STREAM_KINDS),
    )
    streams_url: str = field(
        default="", metadata=_m("market streams base URL (empty: by run.mode)", url=True)
    )
    rest_url: str = field(
        default="",
        metadata=_m("REST base URL for snapshots/backfill (empty: by run.mode)", url=True),
    )
    extra_args: list[str] = field(
        default_factory=lambda: [], metadata=_m("extra `pipeline ingest` arguments")
    )


@dataclass(frozen=True)
class TradingConfig:
    enabled: bool = field(default=True, metadata=_m("start the trading session process"))
    wsapi_url: str = field(
        default="", metadata=_m("WebSocket API URL (empty: by run.mode)", url=True)
    )
    api_key: str = field(
        default="",
        metadata=_m("API key inline (prefer api_key_file; sim: generated when both are empty)"),
    )
    api_key_file: str = field(
        default="",
        metadata=_m("file holding the API key (mode 0600 or 0640, ours or root's; never in argv)"),
    )
    private_key: str = field(
        default="", metadata=_m("Ed25519 private key PEM path (sim: generated)")
    )
    extra_args: list[str] = field(
        default_factory=lambda: [], metadata=_m("extra `pipeline trade` arguments")
    )


@dataclass(frozen=True)
class MonitorConfig:
    status_interval_s: float = field(
        default=5.0, metadata=_m("seconds between status lines", min=0.1)
    )
    print_interval_s: float = field(
        default=0.5, metadata=_m("min seconds between price lines per symbol", min=0.0)
    )


@dataclass(frozen=True)
class PersistConfig:
    sqlite_path: str = field(
        default="var/pipeline.sqlite", metadata=_m("SQLite database file (when no postgres_url)")
    )
    postgres_url: str = field(
        default="", metadata=_m("PostgreSQL conninfo/URL; when set, used instead of SQLite")
    )
    batch_max: int = field(default=8192, metadata=_m("max rows per transaction", min=1))
    flush_interval_s: float = field(
        default=0.2, metadata=_m("max seconds a row waits before commit", min=0.0)
    )
    book_tops: bool = field(
        default=True, metadata=_m("also store bookTicker / depth tops in book_tops")
    )


@dataclass(frozen=True)
class RiskConfig:
    limits_name: str = field(
        default="pipeline.risk.limits", metadata=_m("limits table segment name", shm_name=True)
    )
    max_position: dict[str, float] = field(
        default_factory=lambda: {},
        metadata=_m("max |position| (base qty) per symbol", each_min=0.0),
    )
    max_notional: dict[str, float] = field(
        default_factory=lambda: {},
        metadata=_m("max |position| * mark per symbol (quote)", each_min=0.0),
    )
    default_max_position: float = field(
        default=10.0, metadata=_m("max |position| for symbols not listed", min=0.0)
    )
    default_max_notional: float = field(
        default=1e6, metadata=_m("max notional for symbols not listed", min=0.0)
    )
    max_order_notional: float = field(
        default=1e5, metadata=_m("max notional of one order", min=0.0)
    )


@dataclass(frozen=True)
class SupervisorConfig:
    backoff_initial_s: float = field(default=0.5, metadata=_m("first restart delay", min=0.0))
    backoff_max_s: float = field(default=10.0, metadata=_m("restart delay cap", min=0.0))
    backoff_factor: float = field(
        default=2.0, metadata=_m("delay multiplier per consecutive crash", min=1.0)
    )
    stable_after_s: float = field(
        default=10.0, metadata=_m("uptime after which the delay resets", min=0.0)
    )
    max_restarts: int = field(
        default=10, metadata=_m("give up after this many crashes within restart_window_s", min=1)
    )
    restart_window_s: float = field(default=60.0, metadata=_m("window for max_restarts", min=0.0))
    stop_timeout_s: float = field(default=5.0, metadata=_m("SIGTERM grace before SIGKILL", min=0.0))
    start_timeout_s: float = field(
        default=15.0, metadata=_m("max wait for the simulator's address line", min=0.1)
    )


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    ring: RingConfig = field(default_factory=RingConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    trading: TradingConfig = field(default_factory=TradingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    persist: PersistConfig = field(default_factory=PersistConfig)
    risk: RiskConfig = field(default_factory=RiskConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)

    def endpoint(self, key: str) -> str:
        """The configured URL for ``key`` (streams_url/rest_url/wsapi_url), else the mode's."""
        section = self.trading if key == "wsapi_url" else self.ingest
        value: str = getattr(section, key)
        if value:
            return value
        return ENDPOINTS.get(self.run.mode, {}).get(key, "")


# section name -> section dataclass (annotations are strings here; resolve them once).
SECTIONS: dict[str, type] = dict(typing.get_type_hints(Config))


# ---------------------------------------------------------------------------------------------
# coercion and validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _section_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, tp: Any, value: Any, source: str) -> Any:
    """Turn a TOML value (or an env string, already split) into ``tp``, or raise naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        raise ConfigError(key, f"expected a boolean, got {value!r}", source)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected an integer, got {value!r}", source)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""), 0)
            except ValueError:
                pass
        raise ConfigError(key, f"expected an integer, got {value!r}", source)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected a number, got {value!r}", source)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}", source)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}", source)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # env form
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}", source)
        return [_coerce(f"{key}[{i}]", item_tp, v, source) for i, v in enumerate(value)]
    if origin is dict:
        _k_tp, v_tp = typing.get_args(tp)
        if isinstance(value, str):  # env form: K=V,K=V
            parsed: dict[str, str] = {}
            for part in (p.strip() for p in value.split(",")):
                if not part:
                    continue
                name, sep, val = part.partition("=")
                if not sep or not name.strip():
                    raise ConfigError(key, f"expected NAME=VALUE pairs, got {part!r}", source)
                parsed[name.strip()] = val.strip()
            value = parsed
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {value!r}", source)
        return {str(k): _coerce(f"{key}.{k}", v_tp, v, source) for k, v in value.items()}
    raise ConfigError(key, f"unsupported type {_type_name(tp)}", source)  # pragma: no cover


def _check(key: str, meta: Mapping[str, Any], value: Any, source: str) -> None:
    """Apply a field's validation rules; errors name the key (and the item, for lists/tables)."""

    def bounds(k: str, v: Any, lo: Any, hi: Any) -> None:
        if lo is not None and v < lo:
            raise ConfigError(k, f"must be >= {lo}, got {v!r}", source)
        if hi is not None and v > hi:
            raise ConfigError(k, f"must be <= {hi}, got {v!r}", source)

    if isinstance(value, int | float) and not isinstance(value, bool):
        bounds(key, value, meta.get("min"), meta.get("max"))
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(meta["choices"])
        raise ConfigError(key, f"must be one of {allowed}; got {value!r}", source)
    if "each_choices" in meta:
        for i, v in enumerate(value):
            if v not in meta["each_choices"]:
                allowed = ", ".join(meta["each_choices"])
                raise ConfigError(f"{key}[{i}]", f"must be one of {allowed}; got {v!r}", source)
    if "each_min" in meta and isinstance(value, dict):
        for k, v in value.items():
            bounds(f"{key}.{k}", v, meta["each_min"], None)
    if meta.get("symbols"):
        if not value:
            raise ConfigError(key, "must list at least one symbol", source)
        for i, v in enumerate(value):
            if not isinstance(v, str) or not _SYMBOL_RE.fullmatch(v):
                raise ConfigError(f"{key}[{i}]", f"not a symbol like BTCUSDT: {v!r}", source)
        if len(set(value)) != len(value):
            raise ConfigError(key, "duplicate symbols", source)
    if meta.get("power_of_two") and value & (value - 1):
        raise ConfigError(key, f"must be a power of two, got {value}", source)
    if meta.get("shm_name") and not _SHM_NAME_RE.fullmatch(value):
        raise ConfigError(key, f"not a valid shared-memory name: {value!r}", source)
    if meta.get("url") and value and not re.match(r"^(wss?|https?)://[^\s/]+", value):
        raise ConfigError(key, f"expected a ws(s):// or http(s):// URL: {value!r}", source)


def _build_section(section: str, cls: type, raw: Mapping[str, tuple[Any, str]]) -> Any:
    """Build one section dataclass from ``{key: (value, source)}``; unknown keys are errors."""
    hints = _section_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, (value, source) in raw.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(dotted, f"unknown key (known: {known})", source)
        coerced = _coerce(dotted, hints[key], value, source)
        _check(dotted, fields[key].metadata, coerced, source)
        kwargs[key] = coerced
    # defaults are validated too: an env override elsewhere must not make them inconsistent.
    return cls(**kwargs)


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Defaults, then the TOML file at ``path`` (if any), then ``PIPELINE_<SECTION>_<KEY>`` env."""
    env = os.environ if env is None else env
    layered: dict[str, dict[str, tuple[Any, str]]] = {name: {} for name in SECTIONS}
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("--config", f"no such file: {source}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"invalid TOML in {source}: {exc}") from None
        for section, body in doc.items():
            if section not in SECTIONS:
                known = ", ".join(SECTIONS)
                raise ConfigError(section, f"unknown section (known: {known})", source)
            if not isinstance(body, dict):
                raise ConfigError(section, "expected a [section] table", source)
            for key, value in body.items():
                layered[section][key] = (value, source)
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        section, sep, key = rest.partition("_")
        if not sep or section not in SECTIONS:
            continue  # e.g. PIPELINE_LOG_FORMAT: not ours
        layered[section][key] = (value, f"env {var}")
    sections = {name: _build_section(name, cls, layered[name]) for name, cls in SECTIONS.items()}
    cfg = Config(**sections)
    validate(cfg)
    return cfg


def load_config_for_cli(path: str | os.PathLike[str] | None, command: str) -> Config | None:
    """:func:`load_config` for a subcommand: a bad file or setting is reported on stderr as
    ``<command>: config error: ...`` and gives None, so every command words (and exits 2 on)
    a config error the same way instead of dying with a traceback."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{command}: config error: {exc}", file=sys.stderr)
        return None


def validate(cfg: Config) -> None:
    """Cross-field rules (each error names the key to fix)."""
    if cfg.run.mode != "sim":
        for key in ("streams_url", "rest_url"):
            if not cfg.endpoint(key):
                raise ConfigError(f"ingest.{key}", f"required when run.mode = {cfg.run.mode!r}")
        if cfg.trading.enabled:
            if not cfg.trading.api_key and not cfg.trading.api_key_file:
                raise ConfigError(
                    "trading.api_key_file",
                    f"required (or trading.api_key) when run.mode = {cfg.run.mode!r} and "
                    "trading.enabled (or set trading.enabled = false)",
                )
            if not cfg.trading.private_key:
                raise ConfigError("trading.private_key", "required with trading.api_key_file")
            if not Path(cfg.trading.private_key).is_file():
                raise ConfigError("trading.private_key", f"no such file: {cfg.trading.private_key}")
    if cfg.trading.api_key and cfg.trading.api_key_file:
        raise ConfigError("trading.api_key_file", "set either it or trading.api_key, not both")
    if cfg.trading.api_key_file and not Path(cfg.trading.api_key_file).is_file():
        raise ConfigError("trading.api_key_file", f"no such file: {cfg.trading.api_key_file}")
    if cfg.trading.api_key:
        try:
            check_api_key(cfg.trading.api_key, "trading.api_key")
        except SecretFileError as exc:
            raise ConfigError("trading.api_key", str(exc)) from None
    if cfg.supervisor.backoff_max_s < cfg.supervisor.backoff_initial_s:
        raise ConfigError("supervisor.backoff_max_s", "must be >= supervisor.backoff_initial_s")
    if cfg.run.mode == "sim":
        missing = [s for s in cfg.ingest.symbols if s not in cfg.sim.symbols]
        if missing:
            raise ConfigError(
                "ingest.symbols", f"not simulated (add to sim.symbols): {', '.join(missing)}"
            )
    for name in cfg.run.cpus:
        if name not in ("sim", "ingest", "trading", *CONSUMERS):
            raise ConfigError(f"run.cpus.{name}", "unknown component")


# ------------------------------------------------------------------------------------------------
# the API key: read from a file or an environment variable, never from argv


class SecretFileError(ValueError):
    """An API key source is unusable. The message names the source, never its content."""


# Binance API keys are 64 alphanumerics; allow any printable ASCII without spaces (the simulator
# and other venues use '-'/'_'), at most this long, so a wrong file (a PEM, a binary) is refused.
API_KEY_MAX_LEN = 256
_API_KEY_RE = re.compile(rf"[!-~]{{1,{API_KEY_MAX_LEN}}}")
_SECRET_FILE_MAX_BYTES = 4096


def check_api_key(value: str, source: str) -> str:
    """``value`` stripped of surrounding whitespace (a trailing newline from ``echo``), or
    :class:`SecretFileError` naming ``source`` when it cannot be an API key."""
    key = value.strip()
    if not key:
        raise SecretFileError(f"{source}: the API key is empty")
    if "BEGIN" in key and "KEY" in key:
        raise SecretFileError(
            f"{source}: holds a PEM key, not an API key (the API key is the string Binance "
            "gives when the public key is registered)"
        )
    if not _API_KEY_RE.fullmatch(key):
        raise SecretFileError(
            f"{source}: not an API key (one line of at most {API_KEY_MAX_LEN} printable "
            "characters without spaces expected)"
        )
    return key


def read_api_key_file(path: str | os.PathLike[str], warn: Any = None) -> str:
    """The API key in file ``path``, checked like a private key before it is read.

    Why these rules: the key in a file only helps if other local users cannot read the file.
    Refused (:class:`SecretFileError`): not a regular file (a FIFO must not hang us: opened
    O_NONBLOCK, then fstat), owned by someone other than us or root, readable or writable by
    every user, writable by the group. A group-readable file (``root:pipeline 0640``, a common
    way to hand a root-managed secret to a service user) is accepted with a warning through
    ``warn(text)`` (default: stderr). systemd credentials (``%d/...``) are 0400, ours.
    """
    where = os.fspath(path)
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise SecretFileError(f"API key file {where!r} does not exist") from None
    except OSError as exc:
        raise SecretFileError(f"cannot open API key file {where!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileError(f"API key file {where!r} is not a regular file")
        euid = os.geteuid()
        if st.st_uid not in (euid, 0):
            raise SecretFileError(
                f"API key file {where!r} is owned by uid {st.st_uid}, not by us (uid {euid}) "
                "or root: anyone who owns it can swap the key"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o027:  # other: any access; group: write
            raise SecretFileError(
                f"API key file {where!r} is accessible by other users (mode {mode:04o}): "
                f"chmod 600 {where}"
            )
        if mode & 0o040:
            say = warn or (lambda text: print(text, file=sys.stderr))
            say(f"warning: API key file {where!r} is group-readable (mode {mode:04o})")
        if st.st_size > _SECRET_FILE_MAX_BYTES:
            raise SecretFileError(f"API key file {where!r} is too large to hold an API key")
        data = os.read(fd, _SECRET_FILE_MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise SecretFileError(f"API key file {where!r}: not ASCII text") from None
    return check_api_key(text, f"API key file {where!r}")


def read_api_key_env(var: str, env: Mapping[str, str] | None = None) -> str:
    """The API key in environment variable ``var`` (readable only by our uid and root through
    /proc, unlike argv); :class:`SecretFileError` when unset or not a key."""
    value = (os.environ if env is None else env).get(var)
    if value is None:
        raise SecretFileError(f"environment variable {var} is not set")
    return check_api_key(value, f"environment variable {var}")


def describe() -> list[tuple[str, str, str]]:
    """(dotted key, default, meaning) for every setting; used to keep the example in sync."""
    out: list[tuple[str, str, str]] = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default
            if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            out.append((f"{section}.{f.name}", repr(default), f.metadata.get("doc", "")))
    return out


__all__ = [
    "CONSUMERS",
    "ENDPOINTS",
    "MODES",
    "Config",
    "ConfigError",
    "IngestConfig",
    "MonitorConfig",
    "PersistConfig",
    "RiskConfig",
    "RunConfig",
    "SecretFileError",
    "SupervisorConfig",
    "TradingConfig",
    "check_api_key",
    "describe",
    "load_config",
    "load_config_for_cli",
    "read_api_key_env",
    "read_api_key_file",
]
