"""Stream frame parsing on recorded payloads: both decoders agree; bad input is a counted skip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from pipeline.binance import streams as st
from pipeline.ipc.records import TICK_DTYPE, Flags, Kind

FIX = Path(__file__).parent / "fixtures" / "streams_ingest"
SYMBOLS = ["BTCUSDT", "ETHUSDT", "NKNUSDT", "LRCBTC", "BLZETH", "RUNEEUR", "FLMUSDT", "BNBBTC",
           "WAVESUSDT"]
RECV = 1_700_000_000_123_456_789


def lines(name: str) -> list[bytes]:
    """Array fixtures: one JSON element per line; return the raw bytes of each frame."""
    text = (FIX / name).read_text()
    if name.endswith(".jsonl"):
        return [ln.encode() for ln in text.splitlines() if ln.strip()]
    return [orjson.dumps(x) for x in json.loads(text)]


@pytest.fixture(params=["msgspec", "orjson"])
def dec(request: pytest.FixtureRequest) -> st.OrjsonDecoder:
    return st.make_decoder(request.param, SYMBOLS)


def as_record(tup: tuple[Any, ...]) -> np.void:
    assert len(tup) == len(TICK_DTYPE.names) - 1  # publish_time_ns is the shell's
    arr = np.zeros(1, TICK_DTYPE)
    arr[0] = (*tup, 0)
    return arr[0]


def test_agg_trade_fields(dec: st.OrjsonDecoder) -> None:
    frames = lines("aggTrade.json")
    tag, tup = dec.decode(frames[2], RECV)
    assert tag == st.AGG
    r = as_record(tup)
    assert r["kind"] == Kind.AGG_TRADE
    assert r["symbol"] == SYMBOLS.index("BTCUSDT")
    assert r["trade_id"] == 3814332932
    assert r["aux_id"] == 5782154285
    assert r["price"] == 95311.64
    assert repr(float(r["price"])) == "95311.64"
    assert r["qty"] == 0.00084
    assert r["event_time_ns"] == 1768627409826 * 1_000_000
    assert r["recv_time_ns"] == RECV
    assert r["flags"] == Flags.NONE  # m = false
    assert r["publish_time_ns"] == 0
    # 8-decimal price keeps its decimal value through float64
    tag, tup = dec.decode(frames[1], RECV)
    assert "{:.8f}".format(as_record(tup)["price"]) == "0.00000638"


def test_every_fixture_agg_and_trade_parses(dec: st.OrjsonDecoder) -> None:
    for raw in lines("aggTrade.json"):
        tag, tup = dec.decode(raw, RECV)
        assert tag == st.AGG, raw
        assert tup[11] == orjson.loads(raw)["data"]["a"]
    for raw in lines("trade.json"):
        tag, tup = dec.decode(raw, RECV)
        data = orjson.loads(raw)["data"]
        assert tag == st.TRADE, raw
        r = as_record(tup)
        assert r["kind"] == Kind.TRADE
        assert r["trade_id"] == data["t"]
        assert bool(r["flags"] & Flags.BUYER_IS_MAKER) == data["m"]


def test_book_ticker_routes_by_stream_name(dec: st.OrjsonDecoder) -> None:
    for raw in lines("bookTicker.json"):
        tag, tup = dec.decode(raw, RECV)
        data = orjson.loads(raw)["data"]
        assert tag == st.BOOK_TICKER
        r = as_record(tup)
        assert r["kind"] == Kind.BOOK_TICKER
        assert r["symbol"] == SYMBOLS.index(data["s"])
        assert (r["bid_price"], r["bid_qty"]) == (float(data["b"]), float(data["B"]))
        assert (r["ask_price"], r["ask_qty"]) == (float(data["a"]), float(data["A"]))
        assert r["trade_id"] == data["u"]
        assert r["event_time_ns"] == 0  # spot bookTicker carries no time


def test_depth_diff_and_partial(dec: st.OrjsonDecoder) -> None:
    frames = lines("depthUpdate.json")
    tag, diff = dec.decode(frames[0], RECV)
    assert tag == st.DEPTH_DIFF
    assert (diff.first_id, diff.last_id) == (22415664363, 22415664413)
    assert len(diff.bids) == 21
    assert len(diff.asks) == 26
    assert diff.bids[0] == (24488.92, 0.0)
    tag, diff = dec.decode(frames[1], RECV)
    assert diff.asks == []  # empty side is fine
    tag, part = dec.decode(lines("depth20.json")[0], RECV)
    assert tag == st.DEPTH_PARTIAL
    assert part.last_update_id == 165284515
    assert len(part.bids) == 20
    assert part.bids[0] == (0.4856, 2036.02)


def test_decoders_agree_on_whole_session() -> None:
    a = st.make_decoder("msgspec", SYMBOLS)
    b = st.make_decoder("orjson", SYMBOLS)
    tags: dict[int, int] = {}
    for raw in lines("combined_session.jsonl"):
        ra, rb = a.decode(raw, RECV), b.decode(raw, RECV)
        assert ra == rb, raw
        tags[ra[0]] = tags.get(ra[0], 0) + 1
    # counts from SOURCES.md: 177 depth diffs, 84 bookTicker, 2 aggTrade, 2 kline (not subscribed)
    assert tags == {st.DEPTH_DIFF: 177, st.BOOK_TICKER: 84, st.AGG: 2, st.SKIP: 2}


def test_control_replies_and_shutdown(dec: st.OrjsonDecoder) -> None:
    tag, rep = dec.decode((FIX / "hostile/subscribe_ack_result_null.json").read_bytes(), RECV)
    assert tag == st.CONTROL
    assert rep.id == 5000001
    assert rep.result is None
    assert rep.error is None
    tag, rep = dec.decode(
        (FIX / "hostile/error_invalid_request_streams_not_array.json").read_bytes(), RECV)
    assert tag == st.CONTROL
    assert rep.error["code"] == 2
    tag, rep = dec.decode(
        (FIX / "hostile/tokocrypto_mirror_unknown_method_error.json").read_bytes(), RECV)
    assert tag == st.CONTROL
    assert "`FOO`" in rep.error["msg"]
    tag, rep = dec.decode((FIX / "control_list_subscriptions_response.json").read_bytes(), RECV)
    assert tag == st.CONTROL
    assert rep.result == ["btcusdt@aggTrade"]
    for name in ("serverShutdown_raw.json", "serverShutdown_combined.json"):
        tag, ev = dec.decode((FIX / name).read_bytes(), RECV)
        assert tag == st.SHUTDOWN
        assert ev == 1770123456789 * 1_000_000


@pytest.mark.parametrize("name", ["msgspec", "orjson"])
def test_microsecond_time_unit_scales_every_time_field(name: str) -> None:
    """A ``timeUnit=MICROSECOND`` connection: E in microseconds; records carry ns either way."""
    ms = st.make_decoder(name, SYMBOLS)
    us = st.make_decoder(name, SYMBOLS, time_unit="MICROSECOND")
    checked = 0
    for fname in ("aggTrade.json", "trade.json", "depthUpdate.json"):
        for raw in lines(fname):
            msg = json.loads(raw)
            data = msg.get("data", msg)
            sym = data["s"]
            if sym not in SYMBOLS:
                continue
            data["E"] = data["E"] * 1000 + 123  # the same instant, with microseconds
            tag_ms, v_ms = ms.decode(raw, RECV)
            tag_us, v_us = us.decode(orjson.dumps(msg), RECV)
            assert tag_ms == tag_us
            ev_ms = v_ms.event_time_ns if tag_ms == st.DEPTH_DIFF else v_ms[13]
            ev_us = v_us.event_time_ns if tag_us == st.DEPTH_DIFF else v_us[13]
            assert ev_us == ev_ms + 123_000
            checked += 1
    assert checked >= 3
    tag, ev = us.decode(b'{"e":"serverShutdown","E":1770123456789000}', RECV)
    assert (tag, ev) == (st.SHUTDOWN, 1770123456789 * 1_000_000)
    with pytest.raises(ValueError, match="time unit"):
        st.make_decoder(name, SYMBOLS, time_unit="NANOSECOND")


def test_hostile_extra_fields_are_ignored(dec: st.OrjsonDecoder) -> None:
    tag, tup = dec.decode((FIX / "hostile/aggTrade_with_grafted_st_field.json").read_bytes(), RECV)
    assert tag == st.AGG
    assert tup[11] == 226532
    tag, tup = dec.decode(
        (FIX / "hostile/bookTicker_with_T_E_fields_unverified.json").read_bytes(), RECV)
    assert tag == st.BOOK_TICKER
    assert tup[11] == 12711621188


def test_unknown_streams_are_skipped(dec: st.OrjsonDecoder) -> None:
    for raw in [*lines("kline.json"), *lines("ticker.json"),
                (FIX / "hostile/bookTicker_all_market_stream_retired.json").read_bytes()]:
        assert dec.decode(raw, RECV) == (st.SKIP, st.UNKNOWN_STREAM), raw
    # exact suffix routing: a suffix that merely contains a known one is unknown
    raw = b'{"stream":"btcusdt@aggTradeX","data":{"e":"aggTrade"}}'
    assert dec.decode(raw, RECV) == (st.SKIP, st.UNKNOWN_STREAM)
    raw = b'{"stream":"dogeusdt@aggTrade","data":{}}'  # symbol not configured
    assert dec.decode(raw, RECV) == (st.SKIP, st.UNKNOWN_STREAM)


AGG_OK = {"e": "aggTrade", "E": 1, "s": "BTCUSDT", "a": 7, "p": "1.5", "q": "2", "f": 1, "l": 1,
          "T": 1, "m": True, "M": True}


def frame(stream: str, data: Any) -> bytes:
    return orjson.dumps({"stream": stream, "data": data})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", st.MALFORMED_JSON),
        (b"not json", st.MALFORMED_JSON),
        (b'{"stream":"btcusdt@aggTrade","data":{"a":1', st.MALFORMED_JSON),
        (b"[1,2,3]", st.MALFORMED_JSON),
        (b"42", st.MALFORMED_JSON),
        (b'{"foo":"bar"}', st.UNKNOWN_EVENT),
        (b'{"e":"kline","E":1,"s":"BTCUSDT"}', st.UNKNOWN_EVENT),
        (b'{"stream":"btcusdt@aggTrade"}', st.MISSING_FIELD),
        (frame("btcusdt@aggTrade", {k: v for k, v in AGG_OK.items() if k != "p"}),
         st.MISSING_FIELD),
        (frame("btcusdt@aggTrade", {**AGG_OK, "p": "abc"}), st.BAD_NUMBER),
        (frame("btcusdt@aggTrade", {**AGG_OK, "p": "NaN"}), st.BAD_NUMBER),
        (frame("btcusdt@aggTrade", {**AGG_OK, "q": "-1"}), st.BAD_NUMBER),
        (frame("btcusdt@aggTrade", {**AGG_OK, "p": "inf"}), st.BAD_NUMBER),
        (frame("btcusdt@aggTrade", {**AGG_OK, "p": None}), st.BAD_NUMBER),
        (frame("btcusdt@aggTrade", {**AGG_OK, "a": [1]}), st.BAD_NUMBER),
        (frame("btcusdt@bookTicker", {"u": 1, "s": "BTCUSDT", "b": "x", "B": "1", "a": "1",
                                       "A": "1"}), st.BAD_NUMBER),
        (frame("btcusdt@depth", {"e": "depthUpdate", "E": 1, "s": "BTCUSDT", "U": 1, "u": 2,
                                  "b": [["1", "2", "3"]], "a": []}), st.BAD_NUMBER),
        (frame("btcusdt@depth", {"e": "depthUpdate", "E": 1, "s": "BTCUSDT", "U": 1, "u": 2,
                                  "b": [["1", "zz"]], "a": []}), st.BAD_NUMBER),
        (frame("btcusdt@depth", {"e": "depthUpdate", "E": 1, "U": 1, "b": [], "a": []}),
         st.MISSING_FIELD),
        (frame("btcusdt@aggTrade", "a string"), st.MALFORMED_JSON),
    ],
)
def test_bad_input_is_a_skip_with_a_reason(dec: st.OrjsonDecoder, raw: bytes, reason: str) -> None:
    assert dec.decode(raw, RECV) == (st.SKIP, reason)


def test_oversized_frames_are_skipped_before_decoding() -> None:
    for name in ("msgspec", "orjson"):
        d = st.make_decoder(name, SYMBOLS, max_frame_bytes=100)
        assert d.decode(b" " * 101, RECV) == (st.SKIP, st.OVERSIZED)
        assert d.decode(frame("btcusdt@aggTrade", AGG_OK)[:100], RECV)[1] != st.OVERSIZED


def test_raw_frames_route_by_event_or_connection_stream() -> None:
    d = st.OrjsonDecoder(SYMBOLS)
    tag, tup = d.decode(orjson.dumps(AGG_OK), RECV)
    assert tag == st.AGG
    assert tup[11] == 7
    book = {"u": 5, "s": "BTCUSDT", "b": "1", "B": "2", "a": "3", "A": "4"}
    assert d.decode(orjson.dumps(book), RECV) == (st.SKIP, st.UNKNOWN_EVENT)
    d1 = st.OrjsonDecoder(SYMBOLS, raw_stream="btcusdt@bookTicker")
    tag, tup = d1.decode(orjson.dumps(book), RECV)
    assert tag == st.BOOK_TICKER
    assert tup[7:11] == (1.0, 2.0, 3.0, 4.0)
    assert d.decode(orjson.dumps({**AGG_OK, "s": "XYZ"}), RECV) == (st.SKIP, st.UNKNOWN_STREAM)


def test_stream_name_and_decoder_names() -> None:
    assert st.stream_name("BTCUSDT", "aggTrade") == "btcusdt@aggTrade"
    assert st.stream_name("ethusdt", "depth@100ms") == "ethusdt@depth@100ms"
    with pytest.raises(ValueError, match="unknown stream kind"):
        st.stream_name("BTCUSDT", "aggtrade")
    with pytest.raises(ValueError, match="unknown decoder"):
        st.make_decoder("json", SYMBOLS)


def test_tuple_matches_record_layout(dec: st.OrjsonDecoder) -> None:
    _tag, tup = dec.decode(lines("aggTrade.json")[0], RECV)
    assert len(tup) == len(TICK_DTYPE.names) - 1
    as_record(tup)  # packs without error


def test_every_recorded_decimal_round_trips_through_float64() -> None:
    """The precision claim of the module docstring, on every price/qty of the fixtures."""
    import re

    text = "".join((FIX / n).read_text() for n in ("combined_session.jsonl", "aggTrade.json",
                                                   "trade.json", "bookTicker.json",
                                                   "depthUpdate.json", "depth20.json"))
    values = set(re.findall(r'"(\d+\.\d{8})"', text))
    assert len(values) > 500
    for s in values:
        assert f"{float(s):.8f}" == s, s
