"""Config: defaults, TOML, env overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from pipeline.config import ENDPOINTS, ConfigError, describe, load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipeline.toml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_are_the_simulator_demo() -> None:
    cfg = load_config(env={})
    assert cfg.run.mode == "sim"
    assert 2 <= len(cfg.ingest.symbols) <= 3
    assert set(cfg.ingest.streams) == {"aggTrade", "bookTicker", "depth@100ms"}
    assert cfg.trading.enabled
    assert cfg.run.consumers == ["monitor"]
    assert cfg.endpoint("streams_url") == ""  # sim: comes from the simulator at run time


def test_toml_values_are_typed(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
[ingest]
symbols = ["BTCUSDT", "ETHUSDT"]
streams = ["aggTrade"]
[ring]
capacity = 4096
[run]
consumers = ["monitor", "persist"]
cpus = { ingest = 0 }
[risk]
max_position = { BTCUSDT = 0.5 }
""",
        ),
        env={},
    )
    assert cfg.ingest.symbols == ["BTCUSDT", "ETHUSDT"]
    assert cfg.ring.capacity == 4096
    assert cfg.run.cpus == {"ingest": 0}
    assert cfg.risk.max_position == {"BTCUSDT": 0.5}
    assert isinstance(cfg.risk.max_position["BTCUSDT"], float)


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[monitor]\nstatus_interval_s = 3\n[persist]\nbatch_max = 10\n")
    cfg = load_config(
        path,
        env={
            "PIPELINE_MONITOR_STATUS_INTERVAL_S": "1.5",
            "PIPELINE_INGEST_SYMBOLS": "BTCUSDT, ETHUSDT",
            "PIPELINE_TRADING_ENABLED": "no",
            "PIPELINE_RISK_MAX_NOTIONAL": "BTCUSDT=1000,ETHUSDT=20",
            "PIPELINE_LOG_FORMAT": "json",  # not a config section: ignored, not an error
            "HOME": "/root",
        },
    )
    assert cfg.monitor.status_interval_s == 1.5
    assert cfg.persist.batch_max == 10
    assert cfg.ingest.symbols == ["BTCUSDT", "ETHUSDT"]
    assert cfg.trading.enabled is False
    assert cfg.risk.max_notional == {"BTCUSDT": 1000.0, "ETHUSDT": 20.0}


@pytest.mark.parametrize(
    ("toml", "env", "key", "problem"),
    [
        ("[ingest]\nsymbol = ['BTCUSDT']\n", {}, "ingest.symbol", "unknown key"),
        ("[ingets]\n", {}, "ingets", "unknown section"),
        ("[ring]\ncapacity = 1000\n", {}, "ring.capacity", ">= 1024"),
        ("[ring]\ncapacity = 3000\n", {}, "ring.capacity", "power of two"),
        ("[ring]\ncapacity = 'big'\n", {}, "ring.capacity", "expected an integer"),
        ("[ingest]\nsymbols = ['BTCUSDT', 'eth-usd']\n", {}, "ingest.symbols[1]", "symbol"),
        ("[ingest]\nsymbols = ['BTCUSDT', 'btcusdt']\n", {}, "ingest.symbols", "duplicate"),
        ("[ingest]\nstreams = ['kline']\n", {}, "ingest.streams[0]", "one of"),
        ("[run]\nmode = 'prod'\n", {}, "run.mode", "one of"),
        ("[trading]\nenabled = 'maybe'\n", {}, "trading.enabled", "boolean"),
        ("[ingest]\nstreams_url = 'stream.example'\n", {}, "ingest.streams_url", "URL"),
        ("", {"PIPELINE_PERSIST_BATCH_MAX": "0"}, "persist.batch_max", ">= 1"),
        ("", {"PIPELINE_PERSIST_NOPE": "1"}, "persist.nope", "unknown key"),
        ("", {"PIPELINE_RISK_MAX_POSITION": "BTCUSDT"}, "risk.max_position", "NAME=VALUE"),
        ("", {"PIPELINE_RISK_MAX_POSITION": "BTCUSDT=-1"}, "risk.max_position.BTCUSDT", ">="),
        ("[run]\nmode = 'live'\n", {}, "trading.api_key_file", "required"),
        ("[trading]\napi_key = 'a'\napi_key_file = '/x'\n", {}, "trading.api_key_file", "not both"),
        ("[trading]\napi_key_file = '/nonexistent/k'\n", {}, "trading.api_key_file", "no such"),
        ("[trading]\napi_key = 'two words'\n", {}, "trading.api_key", "not an API key"),
        # a trailing newline must not pass (a "$" anchor lets it through)
        ('[ingest]\nsymbols = ["BTCUSDT\\n"]\n', {}, "ingest.symbols[0]", "not a symbol"),
        ('[ring]\nname = "ticks\\n"\n', {}, "ring.name", "shared-memory name"),
        ("[ingest]\nsymbols = ['XRPUSDT']\n", {}, "ingest.symbols", "not simulated"),
        ("[run]\ncpus = { gpu = 1 }\n", {}, "run.cpus.gpu", "unknown component"),
        ("ring = 3\n", {}, "ring", "table"),
    ],
)
def test_errors_name_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, toml), env=env)
    assert exc.value.key == key
    assert problem in str(exc.value)
    assert str(exc.value).startswith(f"{key}: ")


def test_symbols_in_any_case_are_upper_case_in_the_config(tmp_path: Path) -> None:
    """Binance's own stream names are lower case: a TOML list written that way is taken."""
    cfg = load_config(write(tmp_path, "[ingest]\nsymbols = ['btcusdt', 'EthUsdt']\n"), env={})
    assert cfg.ingest.symbols == ["BTCUSDT", "ETHUSDT"]


def test_error_says_where_the_value_came_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={"PIPELINE_RING_CAPACITY": "12"})
    assert "env PIPELINE_RING_CAPACITY" in str(exc.value)
    path = write(tmp_path, "[ring]\ncapacity = 12\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    assert str(path) in str(exc.value)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[run\n"), env={})


def test_live_mode_uses_public_endpoints(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("not read by the config loader")
    cfg = load_config(
        write(
            tmp_path,
            f"[run]\nmode = 'testnet'\n[trading]\napi_key = 'abc'\nprivate_key = '{key}'\n",
        ),
        env={},
    )
    assert cfg.endpoint("streams_url") == ENDPOINTS["testnet"]["streams_url"]
    assert cfg.endpoint("wsapi_url") == ENDPOINTS["testnet"]["wsapi_url"]
    with pytest.raises(ConfigError) as exc:
        load_config(
            write(
                tmp_path, "[run]\nmode = 'live'\n[trading]\napi_key = 'a'\nprivate_key = '/no'\n"
            ),
            env={},
        )
    assert exc.value.key == "trading.private_key"


def test_example_config_loads_and_documents_every_key() -> None:
    """examples/pipeline.toml must stay loadable and mention every setting."""
    assert EXAMPLE.is_file(), EXAMPLE
    text = EXAMPLE.read_text()
    load_config(EXAMPLE, env={})
    for dotted, _default, doc in describe():
        section, key = dotted.split(".", 1)
        assert f"[{section}]" in text, section
        assert key in text, dotted
        assert doc, f"{dotted} has no description"


# ---------------------------------------------------------------------------------------------
# API key sources: a file checked like a private key, or an environment variable


def test_api_key_file_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    from pipeline.config import SecretFileError, read_api_key_env, read_api_key_file

    key = tmp_path / "api.key"
    key.write_text("SeCrEtKeY123\n")
    os.chmod(key, 0o600)
    assert read_api_key_file(key) == "SeCrEtKeY123"
    warned: list[str] = []
    os.chmod(key, 0o640)  # root:pipeline 0640 is a common way to hand a secret to a service
    assert read_api_key_file(key, warned.append) == "SeCrEtKeY123"
    assert "group-readable" in warned[0]
    for mode in (0o644, 0o604, 0o660, 0o606):
        os.chmod(key, mode)
        with pytest.raises(SecretFileError, match="chmod 600") as exc:
            read_api_key_file(key)
        assert "SeCrEtKeY" not in str(exc.value)
    os.chmod(key, 0o600)
    if os.geteuid() == 0:  # root can hand the file to another uid
        os.chown(key, 65534, 65534)
        with pytest.raises(SecretFileError, match="owned by uid 65534"):
            read_api_key_file(key)
        os.chown(key, 0, 0)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(SecretFileError, match="not a regular file"):  # and did not hang
        read_api_key_file(fifo)
    with pytest.raises(SecretFileError, match="does not exist"):
        read_api_key_file(tmp_path / "missing")
    pem = tmp_path / "pem"
    pem.write_text(
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n"
    )
    os.chmod(pem, 0o600)
    with pytest.raises(SecretFileError, match="PEM key, not an API key"):
        read_api_key_file(pem)
    two = tmp_path / "two"
    two.write_text("abc def\n")
    os.chmod(two, 0o600)
    with pytest.raises(SecretFileError, match="not an API key") as exc:
        read_api_key_file(two)
    assert "abc" not in str(exc.value)
    assert read_api_key_env("K", {"K": " k-1_x \n"}) == "k-1_x"
    with pytest.raises(SecretFileError, match="K is not set"):
        read_api_key_env("K", {})


def test_api_key_file_in_config(tmp_path: Path) -> None:
    key = tmp_path / "api.key"
    key.write_text("abc\n")
    priv = tmp_path / "k.pem"
    priv.write_text("x")
    cfg = load_config(
        write(tmp_path, f"[run]\nmode = 'testnet'\n[trading]\napi_key_file = '{key}'\n"
              f"private_key = '{priv}'\n"),
        env={},
    )  # fmt: skip
    assert cfg.trading.api_key_file == str(key)
    assert cfg.trading.api_key == ""


# ---------------------------------------------------------------------------------------------
# one config type per process: the TOML loader, the process's CLI and the runner's argv agree

# A valid non-default value for every field a surface can set. A new field fails
# test_every_field_is_reachable_or_says_why until it gets one here (and so is round-tripped).
INGEST_SAMPLES: dict[str, object] = {
    "streams_url": "wss://stream.example.test:9443", "rest_url": "https://api.example.test",
    "symbols": ["ETHUSDT", "XRPUSDT"], "streams": ["trade", "bookTicker"],
    "ring": "other.ticks", "ring_capacity": 4096, "cpu": min(os.sched_getaffinity(0)),
    "stall_timeout": 12.5, "transport": "websockets", "decoder": "orjson",
    "max_lifetime": 3600.0, "metrics": "other.ingest.metrics", "metrics_interval": 0.25,
    "depth_levels": 10, "depth_snapshot_limit": 500, "backoff_base": 0.5, "backoff_max": 30.0,
    "healthy_after": 15.0, "ping_interval": 0.0, "backfill_grace": 0.5, "rest_retries": 2,
    "rest_timeout": 2.5, "streams_per_connection": 100, "max_frame_bytes": 1 << 20,
    "publish_batch": 16, "fast_path": "off", "time_unit": "MICROSECOND", "max_id_jump": 1000,
    "id_resync_after": 4, "max_backfill_ids": 5000, "extra_args": ["--decoder", "orjson"],
    "rest_weight_limit": 1200, "rest_weight_interval": 10.0, "rest_api_key_env": "MY_KEY",
    "sbe_streams": ["depth20"], "sbe_url": "ws://127.0.0.3:9000", "sbe_api_key_env": "MY_SBE",
    "sbe_api_key_file": "/run/credentials/pipeline-ingest.service/sbe-api-key",
}  # fmt: skip
SIM_SAMPLES: dict[str, object] = {
    "host": "127.0.0.2", "port": 8765, "sbe_port": 8766, "symbols": ["ETHUSDT", "XRPUSDT"],
    "stp_modes": ["NONE", "EXPIRE_TAKER"], "stp_default": "NONE", "seed": 7,
    "rate": 55.5, "rate_unit": "msgs", "replay": "/captures/day1.jsonl", "replay_speed": "max",
    "ping_interval": 5.0, "pong_timeout": 7.0, "max_lifetime": 600.0, "shutdown_notice": 30.0,
    "shutdown_lead": "fixed", "max_incoming_per_s": 0, "max_streams": 10, "history": 5000,
    "tick_s": 0.02,
    "write_high_water": 65536, "slow_consumer_timeout": 3.0, "extra_args": ["--seed", "7"],
}  # fmt: skip
# the TOML value that gives a field its sample, where the two differ
TOML_VALUE = {"metrics": "other."}  # run.shm_prefix + "ingest.metrics"


def _process_types() -> list[tuple[str, type, dict[str, object]]]:
    from pipeline.marketdata.config import IngestConfig
    from pipeline.sim.config import SimConfig

    return [("ingest", IngestConfig, INGEST_SAMPLES), ("sim", SimConfig, SIM_SAMPLES)]


def _toml(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)  # strings, ints and floats are spelled alike in TOML and JSON


def _parse_child(command: str, argv: list[str]) -> object:
    """What `pipeline <command> ARGV` would run with: its parser, then its config builder."""
    from pipeline.cli import build_parser
    from pipeline.marketdata.cli import config_from_args
    from pipeline.sim.cli import build_config

    args = build_parser().parse_args([command, *argv])
    return config_from_args(args) if command == "ingest" else build_config(args)


@pytest.mark.parametrize("section", ["ingest", "sim"])
def test_every_field_is_reachable_or_says_why(section: str) -> None:
    from pipeline.settings import flag_of, toml_key_of

    _name, cls, samples = next(p for p in _process_types() if p[0] == section)
    reachable = set()
    for f in dataclasses.fields(cls):
        flag, key = flag_of(f), toml_key_of(section, f)
        assert flag is not None or f.metadata["no_flag"], f.name
        assert key is not None or f.metadata["no_toml"], f.name
        assert f.metadata["doc"], f.name
        if flag is not None or key is not None:
            reachable.add(f.name)
    assert set(samples) == reachable


@pytest.mark.parametrize("section", ["ingest", "sim"])
def test_every_toml_key_reaches_its_field(tmp_path: Path, section: str) -> None:
    from pipeline.settings import toml_key_of

    _name, cls, samples = next(p for p in _process_types() if p[0] == section)
    # sim mode: every ingested symbol must be simulated
    tables: dict[str, dict[str, object]] = {
        "sim": {"symbols": ["ETHUSDT", "XRPUSDT"]}, "ingest": {"symbols": ["ETHUSDT"]}
    }
    expected = {}
    for f in dataclasses.fields(cls):
        key = toml_key_of(section, f)
        if key is None:
            continue
        home, _, attr = key.partition(".")
        tables.setdefault(home, {})[attr] = TOML_VALUE.get(f.name, samples[f.name])
        expected[f.name] = samples[f.name]
    text = "".join(
        f"[{home}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in body.items())
        for home, body in tables.items()
    )
    cfg = load_config(write(tmp_path, text), env={})
    got = getattr(cfg, section)
    assert {name: getattr(got, name) for name in expected} == expected


@pytest.mark.parametrize("section", ["ingest", "sim"])
def test_config_to_argv_and_back_is_the_same_config(section: str) -> None:
    """The runner's argv (pipeline.settings.to_argv) parsed by the child's own CLI gives back
    the config, for every flagged field set to a non-default value, and for the defaults."""
    from pipeline.settings import flag_of, to_argv

    _name, cls, samples = next(p for p in _process_types() if p[0] == section)
    flagged = {f.name for f in dataclasses.fields(cls) if flag_of(f) is not None}
    full = cls(**{k: v for k, v in samples.items() if k in flagged})
    for config in (cls(), full):
        assert _parse_child(section, to_argv(config)) == config
    assert to_argv(cls()) == []


def test_sim_rate_max_round_trips_and_toml_zero_means_max(tmp_path: Path) -> None:
    import math

    from pipeline.settings import to_argv
    from pipeline.sim.config import SimConfig

    fast = SimConfig(rate=math.inf)
    assert to_argv(fast) == ["--rate", "max"]
    assert _parse_child("sim", to_argv(fast)) == fast
    assert load_config(write(tmp_path, "[sim]\nrate = 0\n"), env={}).sim.rate == math.inf
    assert _parse_child("sim", ["--turbo"]) == fast  # the old alias still works


@pytest.mark.parametrize(
    ("toml", "key", "problem"),
    [  # ingest's own rules (pipeline ingest's flags) name the TOML key when the TOML is wrong
        ("[ingest]\npublish_batch = 0\n", "ingest.publish_batch", "must be in 1..min(4096"),
        ("[ingest]\ntransport = 'pigeon'\n", "ingest.transport", "must be one of"),
        ("[ingest]\nbackoff_max = 0.5\n", "ingest.backoff_max", "must be >= --backoff-base"),
        ("[ingest]\nstreams = ['depth', 'depth@100ms']\n", "ingest.streams", "one diff-depth"),
        ("[ingest]\ncpu = 1\n", "ingest.cpu", "unknown key"),  # pinned by run.cpus
        ("[sim]\nrate_unit = 'bytes'\n", "sim.rate_unit", "must be one of actions, msgs"),
        ("[sim]\nport = 9000\n", "sim.port", "unknown key"),  # the runner picks it
        ("[sim]\nmax_streams = 0\n", "sim.max_streams", ">= 1"),
    ],
)
def test_process_rules_apply_to_the_toml(tmp_path: Path, toml: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, toml), env={})
    assert exc.value.key == key
    assert problem in str(exc.value)


def test_one_config_error_for_the_project() -> None:
    import pipeline.config
    import pipeline.marketdata.config
    import pipeline.marketdata.ingest
    from pipeline.settings import ConfigError as Base

    assert pipeline.config.ConfigError is Base
    assert pipeline.marketdata.config.ConfigError is Base
    assert pipeline.marketdata.ingest.ConfigError is Base


# ---------------------------------------------------------------------------------------------
# trading: one config type (pipeline.trading.config) for the TOML, `pipeline trade` and the runner

# a non-default value for every flag-level setting, by dotted path (session.* are flattened)
TRADING_SAMPLES: dict[str, object] = {
    "url": "ws://127.0.0.1:9/ws-api/v3",
    "session.ping_interval_s": 7.5,
    "session.json_ping_interval_s": 8.5,
    "session.pong_timeout_s": 3.0,
    "session.request_timeout_s": 4.0,
    "session.max_connection_age_s": 3600.0,
    "session.drain_timeout_s": 2.0,
    "session.time_sync_interval_s": 60.0,
    "session.recv_window_ms": __import__("decimal").Decimal("5000.5"),
    "session.default_retry_after_s": 5.0,
    "session.backoff.initial_s": 0.5,
    "session.backoff.max_s": 9.0,
    "session.backoff.factor": 1.5,
    "session.backoff.jitter": 0.1,
    "session.backoff.max_attempts": 3,
    "session.cancel_replace_mode": "ALLOW_FAILURE",
    "session.reconcile_interval_s": 2.0,
    "session.reconcile_max_interval_s": 20.0,
    "session.reconcile_weight_share": 0.3,
    "session.reconcile_burst_weight": 20.0,
    "session.reconcile_bulk_min": 5,
    "session.assumed_weight_limit": 1200,
    "session.unknown_stale_s": 12.0,
    "session.handover_grace_s": 0.5,
    "session.max_retry_after_s": 600.0,
    "session.max_orders": 5000,
    "testnet": True,
    "private_key": "/keys/k.pem",
    "exec_ring": "other.exec",
    "exec_capacity": 1024,
    "metrics_name": "other.trading.metrics",
    "scan_interval_s": 0.25,
    "poll_interval_s": 0.001,
    "wake_poll_interval_s": 0.2,
    "spin_after_order_s": 0.01,
    "order_wake": False,
    "max_order_age_s": 2.0,
    "open_timeout_s": 3.0,
    "metrics_interval_s": 0.1,
    "keep_metrics_on_failure": False,
    "order_prefix": "other.orders.",
    "reply_ring": "other.replies",
    "reply_capacity": 64,
    "risk_limits": "pipeline.risk.limits",
    "risk_max_age_s": 1.0,
    "risk_reader": "risk2",
    "risk_observe_interval_s": 0.02,
    "heartbeat_interval_s": 2.0,
    "outbox_capacity": 128,
    "transport": "websockets",
    "rest_url": "http://127.0.0.1:9",
    "rules_refresh_s": 0.0,
    "rules_symbols": ("BTCUSDT", "ETHUSDT"),
}


def _set_path(config: object, dotted: str, value: object) -> object:
    """``config`` with the (possibly nested) setting at ``dotted`` replaced."""
    head, _, rest = dotted.partition(".")
    inner = _set_path(getattr(config, head), rest, value) if rest else value
    return dataclasses.replace(config, **{head: inner})  # type: ignore[type-var]


def _parse_trade(argv: list[str]) -> object:
    """What `pipeline trade ARGV` would run with (the key source is a name, never a value)."""
    from pipeline.cli import build_parser
    from pipeline.trading.cli import config_from_args

    args = build_parser().parse_args(["trade", *argv, "--api-key-env", "SOME_VAR"])
    return config_from_args(args)


def test_every_trading_setting_is_reachable_or_says_why() -> None:
    from pipeline.settings import reachable
    from pipeline.trading.config import TradingConfig

    flagged = set()
    for dest, flag, key, meta in reachable(TradingConfig, "trading"):
        assert flag is not None or meta["no_flag"], dest
        assert key is not None or meta["no_toml"], dest
        assert meta["doc"], dest
        if flag is not None:
            flagged.add(dest)
    assert flagged == set(TRADING_SAMPLES)


def test_trading_config_to_argv_and_back_is_the_same_config() -> None:
    """The runner's argv for trading parsed by `pipeline trade` gives back the config, with
    every flag-level setting (nested session and backoff ones too) off its default."""
    from pipeline.settings import to_argv
    from pipeline.trading.config import TradingConfig

    assert to_argv(TradingConfig()) == []
    plain = TradingConfig(url="ws://127.0.0.1:9/ws", private_key="/k.pem")
    assert to_argv(plain) == ["--wsapi-url", "ws://127.0.0.1:9/ws", "--private-key", "/k.pem"]
    full: object = TradingConfig()
    for dotted, value in TRADING_SAMPLES.items():
        full = _set_path(full, dotted, value)
    for config in (plain, full):
        assert _parse_trade(to_argv(config)) == config
    assert "--no-order-wake" in to_argv(full)


def test_trade_flags_keep_their_defaults_and_meanings() -> None:
    """The generated `pipeline trade` parser gives what the hand-written one gave."""
    from pipeline.binance.wsapi import PROD_URL, TESTNET_URL
    from pipeline.trading.config import METRICS_NAME

    cfg = _parse_trade(["--private-key", "/k.pem"])
    assert cfg.url == PROD_URL  # type: ignore[attr-defined]
    assert cfg.metrics_name == METRICS_NAME  # type: ignore[attr-defined]
    assert cfg.session.backoff.max_attempts == 10  # type: ignore[attr-defined]
    assert _parse_trade(["--private-key", "k", "--testnet"]).url == TESTNET_URL  # type: ignore[attr-defined]
    symbols = _parse_trade(["--private-key", "k", "--symbols", "btcusdt,,ethusdt"])
    assert symbols.rules_symbols == ("BTCUSDT", "ETHUSDT")  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="backoff needs"):
        _parse_trade(["--private-key", "k", "--backoff-initial", "5", "--backoff-max", "1"])


def test_trade_bad_recv_window_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parse_trade(["--private-key", "k", "--recv-window", "60000.5"])
    assert exc.value.code == 2
    assert "argument --recv-window: recvWindow must be in (0, 60000]" in capsys.readouterr().err


def test_trading_api_key_is_never_an_argv_value() -> None:
    from pipeline.settings import to_argv
    from pipeline.trading.config import TradingConfig

    secret = "abcDEF0123456789secret"
    cfg = TradingConfig(api_key=secret, api_key_file="/k", url="ws://x/ws")
    cfg.session = dataclasses.replace(cfg.session, api_key=secret)
    assert all(secret not in a and a != "/k" for a in to_argv(cfg))


def test_trading_toml_keys_reach_the_process_config(tmp_path: Path) -> None:
    """Today's [trading] keys keep working; shared keys (ring.exec_name, run.shm_prefix) feed
    the trading process's exec ring and metrics name, as [ring]/[run] feed ingest's."""
    pem = tmp_path / "k.pem"
    pem.write_text("x")
    cfg = load_config(write(tmp_path, (
        "[run]\nshm_prefix = 'other.'\n[ring]\nexec_name = 'other.exec'\n"
        f"[trading]\nwsapi_url = 'wss://x.example/ws'\nprivate_key = '{pem}'\n"
        "extra_args = ['--unknown-stale', '5']\nenabled = true\n"
    )), env={"PIPELINE_TRADING_API_KEY": "abc123"})
    t = cfg.trading
    assert (t.url, t.private_key, t.extra_args) == ("wss://x.example/ws", str(pem),
                                                   ["--unknown-stale", "5"])
    assert (t.exec_ring, t.metrics_name, t.api_key) == ("other.exec", "other.trading.metrics",
                                                        "abc123")
    assert cfg.endpoint("wsapi_url") == "wss://x.example/ws"
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "[trading]\nurl = 'wss://x/ws'\n"), env={})
    assert exc.value.key == "trading.url"  # the TOML key is wsapi_url, as before
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "[trading]\nwsapi_url = 'ftp://x'\n"), env={})
    assert exc.value.key == "trading.wsapi_url"
