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

The ``[sim]``, ``[ingest]`` and ``[trading]`` sections are the processes' own config types
(:class:`pipeline.sim.config.SimConfig`, :class:`pipeline.marketdata.config.IngestConfig`,
:class:`pipeline.trading.config.TradingConfig`):
their fields' metadata (:mod:`pipeline.settings`) gives each TOML key, and the same metadata
gives the process's flags, so `pipeline run` hands a child exactly the configured settings.
Fields set in a shared section (ingest's ring is ``ring.name``, trading's exec ring
``ring.exec_name``) are copied in after loading,
and ingest's own rules run on the result with errors naming the TOML key.

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

from pipeline.bridge.config import BridgeConfig
from pipeline.ipc.records import TICK_RING
from pipeline.marketdata.config import IngestConfig
from pipeline.marketdata.config import validate as validate_ingest
from pipeline.settings import (
    ConfigError,
    build_section,
    check,
    coerce,
    default_of,
    own_keys,
    toml_key_of,
    translate_error,
)
from pipeline.sim.config import SimConfig
from pipeline.trading.config import TradingConfig

ENV_PREFIX = "PIPELINE_"

MODES = ("sim", "testnet", "live")
CONSUMERS = ("monitor", "persist", "risk")  # the built-ins; plug-ins add names (entry points)


def _consumer_names() -> tuple[str, ...]:
    """Built-in and plug-in consumer names, read only when ``run.consumers`` is checked."""
    from pipeline.consumers.registry import consumer_names

    return consumer_names()


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
        metadata=_m("consumers `pipeline run` starts", each_choices=_consumer_names),
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
    block_stale_books: bool = field(
        default=True,
        metadata=_m("refuse a symbol's orders while its depth is stale (a BOOK_STALE record "
                    "and no depth record since): no order priced off a frozen book"),
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
    # the processes' own types; left out, they hold `pipeline run`'s defaults (the demo)
    sim: SimConfig = field(default_factory=lambda: build_section("sim", SimConfig, {}))
    ingest: IngestConfig = field(default_factory=lambda: _default_ingest())
    trading: TradingConfig = field(
        default_factory=lambda: build_section("trading", TradingConfig, {})
    )
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    persist: PersistConfig = field(default_factory=PersistConfig)
    risk: RiskConfig = field(default_factory=RiskConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)

    def endpoint(self, key: str) -> str:
        """The configured URL for ``key`` (streams_url/rest_url/wsapi_url), else the mode's."""
        if key == "wsapi_url":  # the trading process's ``url`` (TOML key trading.wsapi_url)
            value: str = self.trading.url
        else:
            value = getattr(self.ingest, key)
        if value:
            return value
        return ENDPOINTS.get(self.run.mode, {}).get(key, "")


# section name -> section dataclass (annotations are strings here; resolve them once).
SECTIONS: dict[str, type] = dict(typing.get_type_hints(Config))
# the sections no process owns (read by several): built before the processes' sections
_SHARED_SECTIONS = {n: c for n, c in SECTIONS.items() if not hasattr(c, "TOML_SECTION")}


# ---------------------------------------------------------------------------------------------
# building the sections


def _build_section(section: str, cls: type, raw: Mapping[str, tuple[Any, str]]) -> Any:
    """Build one section from ``{key: (value, source)}``; unknown keys are errors."""
    if hasattr(cls, "TOML_SECTION"):  # a process's own type: pipeline.settings metadata
        return build_section(section, cls, raw)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, (value, source) in raw.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(dotted, f"unknown key (known: {known})", source)
        coerced = coerce(dotted, hints[key], value, source)
        check(dotted, fields[key].metadata, coerced, source)
        kwargs[key] = coerced
    return cls(**kwargs)


def _wire_shared_keys(sections: dict[str, Any]) -> None:
    """Give each process section the fields whose TOML key lives in a shared section (e.g.
    ingest's ``ring`` is ``ring.name``, which the consumers read too), in place."""
    for name, section in sections.items():
        if not hasattr(type(section), "TOML_SECTION"):
            continue
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(section):
            key = toml_key_of(name, f)
            if key is None:
                continue
            home, _, attr = key.partition(".")
            if home == name:  # its own section's key (maybe renamed: trading.wsapi_url)
                continue
            value = getattr(sections[home], attr)
            changes[f.name] = f.metadata["from_toml"](value) if "from_toml" in f.metadata else value
        sections[name] = dataclasses.replace(section, **changes)


def _default_ingest() -> IngestConfig:
    """The ``[ingest]`` section of an empty config (what ``Config()`` holds)."""
    sections: dict[str, Any] = {
        name: _build_section(name, cls, {}) for name, cls in _SHARED_SECTIONS.items()
    }
    sections["ingest"] = build_section("ingest", IngestConfig, {})
    _wire_shared_keys(sections)
    return typing.cast(IngestConfig, sections["ingest"])


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
    _wire_shared_keys(sections)
    cfg = Config(**sections)
    validate(cfg)
    _validate_ingest(cfg)
    return cfg


def _validate_ingest(cfg: Config) -> None:
    """ingest's own rules (the ones `pipeline ingest` applies to its flags) on the TOML-built
    section, so a bad value fails here, naming its TOML key, not in a restart loop later. An
    endpoint still empty (sim mode: the simulator's, known at run time) is checked then."""
    urls = {key: cfg.endpoint(key) for key in ("streams_url", "rest_url")}
    probe = dataclasses.replace(
        cfg.ingest,
        streams_url=urls["streams_url"] or "ws://127.0.0.1:1",
        rest_url=urls["rest_url"] or "http://127.0.0.1:1",
    )
    if cfg.run.mode == "sim" and not (cfg.ingest.sbe_api_key_env or cfg.ingest.sbe_api_key_file):
        # the simulator's SBE key is the one `pipeline run` generates and registers with it
        probe.sbe_api_key_file = "sim: generated"
    try:
        validate_ingest(probe)
    except ConfigError as exc:
        raise translate_error("ingest", IngestConfig, exc) from None


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
    if cfg.sim.stp_problem():
        raise ConfigError("sim.stp_default", cfg.sim.stp_problem())
    if cfg.run.mode == "sim":
        missing = [s for s in cfg.ingest.symbols if s not in cfg.sim.symbols]
        if missing:
            raise ConfigError(
                "ingest.symbols", f"not simulated (add to sim.symbols): {', '.join(missing)}"
            )
    for name in cfg.run.cpus:
        if name not in ("sim", "ingest", "trading", *CONSUMERS, *cfg.run.consumers):
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
        for key, f in own_keys(section, cls).items():
            default = default_of(f, for_run=True)
            out.append((f"{section}.{key}", repr(default), f.metadata.get("doc", "")))
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
    "SimConfig",
    "SupervisorConfig",
    "TradingConfig",
    "check_api_key",
    "describe",
    "load_config",
    "load_config_for_cli",
    "read_api_key_env",
    "read_api_key_file",
]
