"""Stream names and forgiving input (#15): the documented depth names only, symbols in any case,
a streams URL given with its ``/stream`` or ``/ws`` path. Pure: config checks and name building,
plus the CLI's exit 2 for a bad depth name (no socket opened)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.binance.streams import (
    DEPTH_DIFF,
    DEPTH_PARTIAL,
    DEPTH_STREAMS,
    STREAM_SUFFIXES,
    stream_name,
)
from pipeline.marketdata.config import (
    ConfigError,
    IngestConfig,
    normal_symbol,
    streams_base_url,
    validate,
)

# binance-protocol.md 7.3 (from the official docs' web-socket-streams.md): the depth names
DOCUMENTED_DEPTH = {"depth", "depth@100ms", "depth5", "depth5@100ms", "depth10",
                    "depth10@100ms", "depth20", "depth20@100ms"}


def test_only_documented_depth_names_are_known() -> None:
    assert set(DEPTH_STREAMS) == DOCUMENTED_DEPTH
    depth_kinds = {k for k in STREAM_SUFFIXES if k.startswith("depth")}
    assert depth_kinds == DOCUMENTED_DEPTH
    assert STREAM_SUFFIXES["depth@100ms"] == STREAM_SUFFIXES["depth"] == DEPTH_DIFF
    assert {STREAM_SUFFIXES[k] for k in DOCUMENTED_DEPTH - {"depth", "depth@100ms"}} \
        == {DEPTH_PARTIAL}


def test_default_depth_stream_is_the_100ms_one() -> None:
    cfg = validate(IngestConfig(symbols=["BTCUSDT"]))
    assert "depth@100ms" in cfg.streams
    assert "btcusdt@depth@100ms" in cfg.stream_names()


@pytest.mark.parametrize("kind", ["depth@1000ms", "depth5@1000ms", "depth20@1000ms",
                                  "depth@500ms", "depth15", "Depth"])
def test_undocumented_depth_names_are_refused_naming_the_documented_ones(kind: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(IngestConfig(streams=["aggTrade", kind]))
    assert err.value.key == "--streams"
    for name in DOCUMENTED_DEPTH:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="documented"):
        stream_name("BTCUSDT", kind)


def test_cli_exits_2_with_the_documented_names_for_a_bad_depth_name() -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline", "ingest", "--streams",
                           "aggTrade,depth@1000ms"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "depth@1000ms" in proc.stderr
    assert "depth@100ms" in proc.stderr
    assert "depth20@100ms" in proc.stderr


def test_symbols_in_any_case_are_normalised() -> None:
    cfg = validate(IngestConfig(symbols=["btcusdt", "EthUsdt", " SOLUSDT "]))
    assert cfg.symbols == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    assert cfg.stream_names()[0] == "btcusdt@aggTrade"
    assert normal_symbol("bnbbtc") == "BNBBTC"


@pytest.mark.parametrize("junk", ["btc-usdt", "btc usdt", "b", "x" * 21, "btc/usdt", "",
                                  "ＢＴＣ", "btcusdt@trade"])
def test_non_symbols_are_still_refused(junk: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(IngestConfig(symbols=["ETHUSDT", junk]))
    assert err.value.key == "--symbols"
    assert "not a Binance symbol" in str(err.value)


def test_same_symbol_in_two_cases_is_a_duplicate() -> None:
    with pytest.raises(ConfigError, match="duplicate"):
        validate(IngestConfig(symbols=["btcusdt", "BTCUSDT"]))


@pytest.mark.parametrize(("given", "base"), [
    ("wss://stream.binance.com:9443", "wss://stream.binance.com:9443"),
    ("wss://stream.binance.com:9443/", "wss://stream.binance.com:9443"),
    ("wss://stream.binance.com:9443/stream", "wss://stream.binance.com:9443"),
    ("wss://stream.binance.com:9443/stream/", "wss://stream.binance.com:9443"),
    ("wss://data-stream.binance.vision/ws", "wss://data-stream.binance.vision"),
    ("ws://127.0.0.1:8765/proxy/ws", "ws://127.0.0.1:8765/proxy"),
])
def test_streams_url_with_its_path_is_cut_back_to_the_base(given: str, base: str) -> None:
    assert streams_base_url(given) == base
    cfg = validate(IngestConfig(streams_url=given))
    assert cfg.streams_url == base


@pytest.mark.parametrize("given", [
    "wss://stream.binance.com:9443/ws/btcusdt@trade",
    "wss://stream.binance.com:9443/stream?streams=btcusdt@trade",
    "wss://stream.binance.com:9443/stream#x",
])
def test_streams_url_naming_streams_is_refused_saying_what_to_give(given: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(IngestConfig(streams_url=given))
    assert err.value.key == "--streams-url"
    assert "wss://stream.binance.com:9443)" in str(err.value)  # the base to give instead
