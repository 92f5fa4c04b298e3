"""Config: defaults, TOML, env overrides, and errors that name the key."""

from __future__ import annotations

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
    assert set(cfg.ingest.streams) == {"aggTrade", "bookTicker", "depth"}
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
        ("[ingest]\nsymbols = ['BTCUSDT', 'eth']\n", {}, "ingest.symbols[1]", "symbol"),
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
