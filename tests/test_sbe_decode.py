"""The SBE market-data decoder (pipeline/binance/sbe.py) against frames built here by hand with
``struct`` from the schema (tests/fixtures/sbe/stream_1_0.xml): every field, parity with the JSON
decoder on the JSON fixtures' events, forward compatibility, hostile frames, and fuzzing.

The builders below share no code with the decoder (nor with the simulator's encoder): they spell
the layout out from the schema, and :func:`test_builder_layouts_match_the_schema` checks them
against the XML itself, so a wrong layout cannot hide in both places at once.
"""

from __future__ import annotations

import json
import random
import re
import struct
import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from pipeline.binance import sbe
from pipeline.binance import streams as st
from pipeline.ipc.records import (
    AT_EVENT_TIME_NS,
    AT_FLAGS,
    AT_PRICE,
    AT_QTY,
    AT_TRADE_ID,
    Flags,
    Kind,
    book_ticker_record,
    trade_record,
)

FIX = Path(__file__).parent / "fixtures"
SCHEMA = FIX / "sbe" / "stream_1_0.xml"
# the symbols of the JSON fixtures (tests/fixtures/streams), in a fixed order: index = symbol id
SYMBOLS = ["BTCUSDT", "ETHUSDT", "WAVESUSDT", "BNBBTC", "NKNUSDT", "LRCBTC", "BLZETH", "FLMUSDT",
           "RUNEEUR"]
RECV = 1_700_000_000_123_456_789

# ---- hand-built frames, from the schema -------------------------------------------------------
# little-endian; header blockLength u16, templateId u16, schemaId u16, version u16
B_HEADER = "<HHHH"
B_TRADES = "<qqbb"  # eventTime, transactTime, priceExponent, qtyExponent
B_TRADE = "<qqqB"  # id, price, qty, isBuyerMaker (isBestMatch: constant, not on the wire)
B_BBA = "<qqbbqqqq"  # eventTime, bookUpdateId, pExp, qExp, bidPrice, bidQty, askPrice, askQty
B_SNAP = "<qqbb"  # eventTime, bookUpdateId, pExp, qExp
B_DIFF = "<qqqbb"  # eventTime, firstBookUpdateId, lastBookUpdateId, pExp, qExp
B_LEVEL = "<qq"  # price, qty
G32 = "<HI"  # groupSizeEncoding
G16 = "<HH"  # groupSize16Encoding


def var_symbol(sym: bytes) -> bytes:
    return struct.pack("<B", len(sym)) + sym


def message(template: int, block: bytes, body: bytes, *, extra_block: bytes = b"",
            version: int = 0, schema: int = 1) -> bytes:
    """Header + block (+ ``extra_block``: fields a newer schema version appended) + body."""
    full = block + extra_block
    return struct.pack(B_HEADER, len(full), template, schema, version) + full + body


def trades_frame(ev_us: int, trades: list[tuple[int, int, int, int]], sym: bytes = b"BTCUSDT",
                 pexp: int = -8, qexp: int = -8, *, extra_entry: bytes = b"",
                 count: int | None = None, entry_len: int | None = None, **kw: Any) -> bytes:
    entries = b"".join(struct.pack(B_TRADE, *t) + extra_entry for t in trades)
    size = struct.calcsize(B_TRADE) + len(extra_entry)
    group = struct.pack(G32, size if entry_len is None else entry_len,
                        len(trades) if count is None else count)
    return message(10000, struct.pack(B_TRADES, ev_us, ev_us - 1, pexp, qexp),
                   group + entries + var_symbol(sym), **kw)


def bba_frame(ev_us: int, uid: int, bid: int, bid_q: int, ask: int, ask_q: int,
              sym: bytes = b"BTCUSDT", pexp: int = -8, qexp: int = -8, **kw: Any) -> bytes:
    return message(10001, struct.pack(B_BBA, ev_us, uid, pexp, qexp, bid, bid_q, ask, ask_q),
                   var_symbol(sym), **kw)


def levels_group(levels: list[tuple[int, int]], extra_entry: bytes = b"",
                 count: int | None = None) -> bytes:
    size = struct.calcsize(B_LEVEL) + len(extra_entry)
    return struct.pack(G16, size, len(levels) if count is None else count) + b"".join(
        struct.pack(B_LEVEL, *lv) + extra_entry for lv in levels)


def snapshot_frame(ev_us: int, uid: int, bids: list[tuple[int, int]],
                   asks: list[tuple[int, int]], sym: bytes = b"BTCUSDT", pexp: int = -8,
                   qexp: int = -8, extra_entry: bytes = b"", **kw: Any) -> bytes:
    return message(10002, struct.pack(B_SNAP, ev_us, uid, pexp, qexp),
                   levels_group(bids, extra_entry) + levels_group(asks, extra_entry)
                   + var_symbol(sym), **kw)


def diff_frame(ev_us: int, first: int, last: int, bids: list[tuple[int, int]],
               asks: list[tuple[int, int]], sym: bytes = b"BTCUSDT", pexp: int = -8,
               qexp: int = -8, extra_entry: bytes = b"", **kw: Any) -> bytes:
    return message(10003, struct.pack(B_DIFF, ev_us, first, last, pexp, qexp),
                   levels_group(bids, extra_entry) + levels_group(asks, extra_entry)
                   + var_symbol(sym), **kw)


def m8(text: str) -> int:
    """The mantissa of an 8-decimal string at exponent -8 (exact, via Decimal)."""
    return int(Decimal(text).scaleb(8))


@pytest.fixture
def dec() -> sbe.SbeDecoder:
    return sbe.SbeDecoder(SYMBOLS)


# ---- the layouts are the schema's ---------------------------------------------------------------
_PRIM = {"int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4, "int64": 8,
         "uint64": 8}


def _schema_sizes() -> dict[str, Any]:
    """Fixed block and group entry sizes of each message, computed from the XML."""
    ns = {"sbe": "http://fixprotocol.io/2016/sbe"}
    root = ET.parse(SCHEMA).getroot()
    types: dict[str, int] = {}
    for t in root.find("types") or []:
        if t.tag == "type":
            types[t.get("name", "")] = _PRIM[t.get("primitiveType", "")]
        elif t.tag == "enum":
            types[t.get("name", "")] = _PRIM[t.get("encodingType", "")]
        elif t.tag == "composite":
            types[t.get("name", "")] = sum(_PRIM[c.get("primitiveType", "")] for c in t
                                           if c.get("length") != "0")

    def size(fields: Any) -> int:
        return sum(types[f.get("type")] for f in fields
                   if f.tag == "field" and f.get("presence") != "constant")

    out: dict[str, Any] = {"header": types["messageHeader"], "schema": root.attrib}
    for msg in root.findall("sbe:message", ns):
        groups = [(g.get("dimensionType", "groupSizeEncoding"), size(g))
                  for g in msg.findall("group")]
        out[msg.get("id", "")] = (size(msg), [(types[d], s) for d, s in groups],
                                  [d.get("type") for d in msg.findall("data")])
    return out


def test_builder_layouts_match_the_schema() -> None:
    sizes = _schema_sizes()
    assert sizes["schema"]["id"] == str(sbe.SCHEMA_ID)
    assert sizes["schema"]["version"] == str(sbe.SCHEMA_VERSION)
    assert sizes["schema"]["byteOrder"] == "littleEndian"
    assert sizes["header"] == struct.calcsize(B_HEADER) == sbe.HEADER.size == 8
    g32, g16, lv = struct.calcsize(G32), struct.calcsize(G16), struct.calcsize(B_LEVEL)
    assert sizes["10000"] == (struct.calcsize(B_TRADES), [(g32, struct.calcsize(B_TRADE))],
                              ["varString8"])
    assert sizes["10001"] == (struct.calcsize(B_BBA), [], ["varString8"])
    assert sizes["10002"] == (struct.calcsize(B_SNAP), [(g16, lv), (g16, lv)], ["varString8"])
    assert sizes["10003"] == (struct.calcsize(B_DIFF), [(g16, lv), (g16, lv)], ["varString8"])
    # and the decoder reads the same sizes
    assert (sbe.TRADES_BLOCK.size, sbe.TRADE_ENTRY.size, sbe.BEST_BID_ASK_BLOCK.size,
            sbe.DEPTH_SNAPSHOT_BLOCK.size, sbe.DEPTH_DIFF_BLOCK.size, sbe.LEVEL_ENTRY.size,
            sbe.GROUP_SIZE.size, sbe.GROUP_SIZE16.size) == (18, 25, 50, 18, 26, 16, 6, 4)


# ---- every field --------------------------------------------------------------------------------
def test_trades_event_becomes_one_trade_record_per_trade(dec: sbe.SbeDecoder) -> None:
    ev_us = 1_790_649_901_913_456
    trades = [(6720857582, m8("83034.29000000"), m8("0.00062000"), 1),
              (6720857583, m8("83034.30000000"), m8("1.50000000"), 0),
              (6720857584, m8("0.00000001"), m8("92233720368.54775807"), 0)]
    tag, recs = dec.decode(trades_frame(ev_us, trades, b"ETHUSDT"), RECV)
    assert tag == sbe.TRADES
    assert recs == [
        trade_record(1, int(Flags.BUYER_IS_MAKER), 83034.29, 0.00062, 6720857582,
                     ev_us * 1000, RECV),
        trade_record(1, 0, 83034.30, 1.5, 6720857583, ev_us * 1000, RECV),
        trade_record(1, 0, 1e-8, float("92233720368.54775807"), 6720857584, ev_us * 1000, RECV),
    ]
    assert all(r[0] == Kind.TRADE for r in recs)
    assert dec.decode(trades_frame(ev_us, []), RECV) == (sbe.TRADES, [])  # nothing to lose


def test_best_bid_ask_is_a_book_ticker_with_an_event_time(dec: sbe.SbeDecoder) -> None:
    f = bba_frame(1_633_998_512_068_001, 499869768, m8("0.35210000"), m8("672.00000000"),
                  m8("0.35260000"), m8("3199.00000000"), b"NKNUSDT")
    tag, rec = dec.decode(f, RECV)
    assert tag == st.BOOK_TICKER
    json_rec = book_ticker_record(4, 0.3521, 672.0, 0.3526, 3199.0, 499869768, RECV)
    assert rec[AT_EVENT_TIME_NS] == 1_633_998_512_068_001_000
    assert rec == (*json_rec[:AT_EVENT_TIME_NS], 1_633_998_512_068_001_000, RECV)
    assert len(rec) == len(json_rec)


def test_depth20_is_a_depth_partial(dec: sbe.SbeDecoder) -> None:
    bids = [(m8("0.48560000"), m8("2036.02000000")), (m8("0.48550000"), m8("480.00000000"))]
    asks = [(m8("0.48570000"), m8("0.00000000"))]
    tag, val = dec.decode(snapshot_frame(1, 165284515, bids, asks, b"FLMUSDT"), RECV)
    assert tag == st.DEPTH_PARTIAL
    assert val == st.DepthPartial(7, 165284515, RECV, [(0.4856, 2036.02), (0.4855, 480.0)],
                                  [(0.4857, 0.0)], 1000)  # the event time (1 us) in ns


def test_diff_depth_is_a_depth_diff(dec: sbe.SbeDecoder) -> None:
    tag, val = dec.decode(diff_frame(1_660_386_669_440_123, 22415664363, 22415664413,
                                     [(m8("24488.92000000"), 0)], []), RECV)
    assert tag == st.DEPTH_DIFF
    assert val == st.DepthDiff(0, 22415664363, 22415664413, 1_660_386_669_440_123_000, RECV,
                               [(24488.92, 0.0)], [])


def test_other_exponents(dec: sbe.SbeDecoder) -> None:
    """Non-negative exponents multiply; each message has its own price and qty exponent."""
    _tag, recs = dec.decode(trades_frame(5, [(1, 12345, 7, 0)], pexp=-2, qexp=3), RECV)
    assert (recs[0][AT_PRICE], recs[0][AT_QTY]) == (123.45, 7000.0)
    _, val = dec.decode(diff_frame(5, 1, 1, [(3, 25)], [(4, 1)], pexp=0, qexp=-1), RECV)
    assert (val.bids, val.asks) == ([(3.0, 2.5)], [(4.0, 0.1)])
    assert sbe.decimal_value(7, 18) == 7e18
    assert sbe.decimal_value(-5, -1) == -0.5
    i64_max = (1 << 63) - 1
    assert sbe.decimal_value(i64_max, -18) == float(Decimal(i64_max).scaleb(-18))


def test_bytearray_and_memoryview_frames(dec: sbe.SbeDecoder) -> None:
    f = trades_frame(9, [(1, 100, 200, 1)], b"BNBBTC")
    want = dec.decode(f, RECV)
    assert want[0] == sbe.TRADES
    assert dec.decode(bytearray(f), RECV) == want
    assert dec.decode(memoryview(f), RECV) == want


def test_text_frames_go_to_the_json_decoder(dec: sbe.SbeDecoder) -> None:
    """Control replies and serverShutdown are JSON text frames on an SBE connection."""
    tag, reply = dec.decode('{"result":null,"id":7}', RECV)
    assert tag == st.CONTROL
    assert reply.id == 7
    assert dec.decode('{"e":"serverShutdown","E":1700000000000}', RECV) == (
        st.SHUTDOWN, 1_700_000_000_000 * 1_000_000)
    assert dec.decode("not json", RECV) == (st.SKIP, st.MALFORMED_JSON)


# ---- exact prices ------------------------------------------------------------------------------
def _fixture_decimals() -> list[str]:
    found: set[str] = set()
    for d in ("streams", "streams_ingest"):
        for p in sorted((FIX / d).glob("*.json*")):
            found.update(re.findall(r'"(\d+\.\d{8})"', p.read_text()))
    return sorted(found)


def test_every_8_decimal_fixture_price_converts_to_the_float_json_gives() -> None:
    texts = _fixture_decimals()
    assert len(texts) > 500  # the recorded sessions' prices and quantities
    multiply_differs = 0
    for text in texts:
        mantissa = int(text.replace(".", ""))
        assert sbe.decimal_value(mantissa, -8) == float(text) == mantissa / 10**8, text
        multiply_differs += mantissa * 1e-8 != float(text)
    # why divide: the multiply form is off for a share of these very values
    assert multiply_differs > 0


def test_divide_is_exact_where_multiply_is_not() -> None:
    rnd = random.Random(18)
    for _ in range(20_000):
        mantissa = rnd.randrange(0, 10**16)
        text = f"{mantissa // 10**8}.{mantissa % 10**8:08d}"
        assert sbe.decimal_value(mantissa, -8) == float(text)


# ---- the same records as the JSON path, for the same events -------------------------------------
def _json_frames(name: str) -> list[dict[str, Any]]:
    lines = (FIX / "streams" / name).read_text().splitlines()
    return [json.loads(line.rstrip(",")) for line in lines if line.startswith("{")]


def _sym(stream: str) -> bytes:
    return stream.split("@")[0].upper().encode()


def test_same_records_as_json_for_the_same_events(dec: sbe.SbeDecoder) -> None:
    """Each JSON fixture event re-encoded as SBE (ms -> us) decodes to the JSON path's records:
    equal except bookTicker's event time, which only SBE has."""
    js = st.make_decoder("msgspec", SYMBOLS)
    checked = 0
    for fr in _json_frames("trade.json"):
        d = fr["data"]
        tag, want = js.decode(orjson.dumps(fr), RECV)
        assert tag == st.TRADE
        f = trades_frame(d["E"] * 1000, [(d["t"], m8(d["p"]), m8(d["q"]), int(d["m"]))],
                         _sym(fr["stream"]))
        assert dec.decode(f, RECV) == (sbe.TRADES, [want])
        checked += 1
    for fr in _json_frames("bookTicker.json"):
        d = fr["data"]
        tag, want = js.decode(orjson.dumps(fr), RECV)
        f = bba_frame(77, d["u"], m8(d["b"]), m8(d["B"]), m8(d["a"]), m8(d["A"]),
                      _sym(fr["stream"]))
        assert tag == st.BOOK_TICKER
        assert dec.decode(f, RECV) == (tag, (*want[:AT_EVENT_TIME_NS], 77_000, RECV))
        checked += 1
    for fr in _json_frames("depthUpdate.json"):
        d = fr["data"]
        want = js.decode(orjson.dumps(fr), RECV)
        f = diff_frame(d["E"] * 1000, d["U"], d["u"], [(m8(p), m8(q)) for p, q in d["b"]],
                       [(m8(p), m8(q)) for p, q in d["a"]], _sym(fr["stream"]))
        assert want[0] == st.DEPTH_DIFF
        assert dec.decode(f, RECV) == want
        checked += 1
    for fr in _json_frames("depth20.json"):
        d = fr["data"]
        want = js.decode(orjson.dumps(fr), RECV)
        f = snapshot_frame(1, d["lastUpdateId"], [(m8(p), m8(q)) for p, q in d["bids"]],
                           [(m8(p), m8(q)) for p, q in d["asks"]], _sym(fr["stream"]))
        assert want[0] == st.DEPTH_PARTIAL
        # the same book; SBE also carries the event time JSON's depth20 lacks (1 us here)
        want[1].event_time_ns = 1000
        assert dec.decode(f, RECV) == want
        checked += 1
    assert checked >= 20


# ---- forward compatibility ----------------------------------------------------------------------
def test_longer_block_and_entries_from_a_newer_version_decode_the_same(
        dec: sbe.SbeDecoder) -> None:
    pad = b"\xee" * 8
    cases = [
        (trades_frame(5, [(1, 100, 200, 1), (2, 300, 400, 0)]),
         trades_frame(5, [(1, 100, 200, 1), (2, 300, 400, 0)], extra_block=pad,
                      extra_entry=b"\xff" * 5, version=1)),
        (bba_frame(5, 9, 1, 2, 3, 4), bba_frame(5, 9, 1, 2, 3, 4, extra_block=pad, version=1)),
        (snapshot_frame(5, 9, [(1, 2)], [(3, 4), (5, 6)]),
         snapshot_frame(5, 9, [(1, 2)], [(3, 4), (5, 6)], extra_block=pad, extra_entry=b"\x01",
                        version=3)),
        (diff_frame(5, 8, 9, [(1, 2)], [(3, 4)]),
         diff_frame(5, 8, 9, [(1, 2)], [(3, 4)], extra_block=pad, extra_entry=b"\x07" * 8,
                    version=1)),
    ]
    for current, newer in cases:
        want = dec.decode(current, RECV)
        assert want[0] != st.SKIP
        assert dec.decode(newer, RECV) == want
        # var data a newer version may append after the symbol is ignored too
        assert dec.decode(newer + b"\x03abc", RECV) == want
    assert dec.other_version_frames == 8  # decoded, and counted for the operator


# ---- hostile frames: each a counted skip with its own reason ------------------------------------
def _valid_frames() -> list[bytes]:
    return [
        trades_frame(5, [(1, 100, 200, 1), (2, 300, 400, 0)]),
        bba_frame(5, 9, 1, 2, 3, 4),
        snapshot_frame(5, 9, [(1, 2), (3, 4)], [(5, 6)]),
        diff_frame(5, 8, 9, [(1, 2)], [(3, 4), (5, 6)]),
    ]


def test_truncated_at_every_length(dec: sbe.SbeDecoder) -> None:
    for f in _valid_frames():
        assert dec.decode(f, RECV)[0] != st.SKIP
        group_ends = set()
        for cut in range(len(f)):
            tag, reason = dec.decode(f[:cut], RECV)
            assert tag == st.SKIP, cut
            # a cut inside a group's entries is seen as a group running past the end
            assert reason in (sbe.TRUNCATED, sbe.GROUP_OVERRUN), (cut, reason)
            if cut <= 8 + struct.unpack_from("<H", f)[0] or cut >= len(f) - len(b"BTCUSDT"):
                assert reason == sbe.TRUNCATED, cut
            if reason == sbe.GROUP_OVERRUN:
                group_ends.add(cut)
        assert bool(group_ends) == (f[2:4] != b"\x11\x27")  # bestBidAsk has no group


HOSTILE: list[tuple[str, bytes, str]] = [
    ("wrong schema id", trades_frame(5, [(1, 1, 1, 0)], schema=2), sbe.WRONG_SCHEMA),
    ("unknown template", message(10004, b"\0" * 18, b""), sbe.UNKNOWN_TEMPLATE),
    ("template of another kind", message(50, b"", b""), sbe.UNKNOWN_TEMPLATE),
    ("block shorter than the schema's", message(10001, struct.pack("<qq", 1, 2), b"\x07BTCUSDT"),
     sbe.SHORT_BLOCK),
    ("trade entry shorter than the schema's",
     trades_frame(5, [(1, 1, 1, 0)], entry_len=24), sbe.SHORT_BLOCK),
    ("level entry shorter than the schema's",
     message(10003, struct.pack(B_DIFF, 1, 1, 1, -8, -8),
             struct.pack(G16, 8, 1) + b"\0" * 8 + struct.pack(G16, 16, 0) + b"\x07BTCUSDT"),
     sbe.SHORT_BLOCK),
    ("absurd trade count", trades_frame(5, [(1, 1, 1, 0)], count=2**31 - 1), sbe.GROUP_OVERRUN),
    ("count beyond u31", trades_frame(5, [(1, 1, 1, 0)], count=2**32 - 1), sbe.GROUP_OVERRUN),
    ("absurd level count",
     message(10002, struct.pack(B_SNAP, 1, 1, -8, -8),
             levels_group([(1, 1)], count=65535) + levels_group([]) + b"\x07BTCUSDT"),
     sbe.GROUP_OVERRUN),
    ("absurd entry length", trades_frame(5, [(1, 1, 1, 0)], entry_len=65535), sbe.GROUP_OVERRUN),
    ("symbol length beyond the frame", bba_frame(5, 9, 1, 2, 3, 4)[:-8] + b"\xffBTCUSDT",
     sbe.TRUNCATED),
    ("invalid UTF-8 symbol", bba_frame(5, 9, 1, 2, 3, 4, b"BTC\xff\xfe"), sbe.BAD_SYMBOL),
    ("empty symbol", bba_frame(5, 9, 1, 2, 3, 4, b""), sbe.BAD_SYMBOL),
    ("oversized symbol", bba_frame(5, 9, 1, 2, 3, 4, b"X" * 255), sbe.UNKNOWN_SYMBOL),
    ("unknown symbol", trades_frame(5, [(1, 1, 1, 0)], b"NOPEUSDT"), sbe.UNKNOWN_SYMBOL),
    ("non-ASCII unknown symbol", bba_frame(5, 9, 1, 2, 3, 4, "币安人生USDT".encode()),
     sbe.UNKNOWN_SYMBOL),
    ("lowercase symbol", bba_frame(5, 9, 1, 2, 3, 4, b"btcusdt"), sbe.UNKNOWN_SYMBOL),
    ("price exponent -19", trades_frame(5, [(1, 1, 1, 0)], pexp=-19), sbe.BAD_EXPONENT),
    ("qty exponent -128", bba_frame(5, 9, 1, 2, 3, 4, qexp=-128), sbe.BAD_EXPONENT),
    ("price exponent 127", diff_frame(5, 1, 2, [], [], pexp=127), sbe.BAD_EXPONENT),
    ("qty exponent 19", snapshot_frame(5, 1, [], [], qexp=19), sbe.BAD_EXPONENT),
    ("negative price", trades_frame(5, [(1, -1, 1, 0)]), st.BAD_NUMBER),
    ("negative qty", bba_frame(5, 9, 1, 2, 3, -4), st.BAD_NUMBER),
    ("negative level qty", diff_frame(5, 1, 2, [(1, -2)], []), st.BAD_NUMBER),
    ("negative level price", snapshot_frame(5, 1, [], [(-1, 2)]), st.BAD_NUMBER),
    ("negative trade id", trades_frame(5, [(-1, 1, 1, 0)]), st.BAD_NUMBER),
    ("negative update id", bba_frame(5, -9, 1, 2, 3, 4), st.BAD_NUMBER),
    ("negative event time", diff_frame(-5, 1, 2, [], []), st.BAD_NUMBER),
    ("event time beyond int64 ns", snapshot_frame(2**62, 1, [], []), st.BAD_NUMBER),
    ("first update id after last", diff_frame(5, 3, 2, [], []), st.BAD_NUMBER),
    ("isBuyerMaker not a boolEnum value", trades_frame(5, [(1, 1, 1, 2)]), st.BAD_NUMBER),
    ("empty frame", b"", sbe.TRUNCATED),
    ("header only", struct.pack(B_HEADER, 18, 10000, 1, 0), sbe.TRUNCATED),
]


@pytest.mark.parametrize(("what", "frame", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_frame_is_a_skip_with_its_reason(dec: sbe.SbeDecoder, what: str, frame: bytes,
                                                 reason: str) -> None:
    assert dec.decode(frame, RECV) == (st.SKIP, reason)
    with pytest.raises(sbe.SbeSkip) as exc:
        dec.decode_or_raise(frame, RECV)
    assert exc.value.reason == reason
    assert reason in sbe.SKIP_REASONS


def test_oversized_frame_is_skipped_before_decoding() -> None:
    small = sbe.SbeDecoder(SYMBOLS, max_frame_bytes=64)
    f = diff_frame(5, 1, 2, [(1, 1)] * 4, [])
    assert len(f) > 64
    assert small.decode(f, RECV) == (st.SKIP, st.OVERSIZED)


def test_skip_reasons_are_distinct_and_json_compatible() -> None:
    assert len(set(sbe.SKIP_REASONS)) == len(sbe.SKIP_REASONS)
    assert set(st.SKIP_REASONS) <= set(sbe.SKIP_REASONS)
    assert all(re.fullmatch(r"[a-z0-9_]+", r) for r in sbe.SKIP_REASONS)  # metric names


# ---- fuzzing ------------------------------------------------------------------------------------
def _check_result(dec: sbe.SbeDecoder, frame: bytes) -> None:
    tag, val = dec.decode(frame, RECV)
    if tag == st.SKIP:
        assert val in sbe.SKIP_REASONS
    else:
        assert tag in (sbe.TRADES, st.BOOK_TICKER, st.DEPTH_PARTIAL, st.DEPTH_DIFF)
    try:
        dec.decode_or_raise(frame, RECV)
    except sbe.SbeSkip:
        pass


@settings(max_examples=400, deadline=None)
@given(hs.binary(max_size=300))
def test_fuzz_random_bytes_only_skip(data: bytes) -> None:
    _check_result(sbe.SbeDecoder(SYMBOLS), data)


@settings(max_examples=400, deadline=None)
@given(hs.binary(max_size=300), hs.sampled_from([10000, 10001, 10002, 10003]),
       hs.integers(0, 3))
def test_fuzz_random_bodies_behind_a_valid_header(body: bytes, template: int,
                                                  version: int) -> None:
    bl = {10000: 18, 10001: 50, 10002: 18, 10003: 26}[template]
    _check_result(sbe.SbeDecoder(SYMBOLS), struct.pack(B_HEADER, bl, template, 1, version) + body)


#: edits a fuzzer applies to a valid frame: (operation, position, byte)
EDITS = hs.lists(hs.tuples(hs.sampled_from(["flip", "insert", "delete", "cut"]),
                           hs.integers(0, 400), hs.integers(0, 255)), min_size=1, max_size=6)


def mutate(frame: bytes, edits: list[tuple[str, int, int]]) -> bytearray:
    """``frame`` with ``edits`` (:data:`EDITS`) applied in order (positions wrap around)."""
    buf = bytearray(frame)
    for op, pos, byte in edits:
        pos %= len(buf) + 1
        if op == "flip" and pos < len(buf):
            buf[pos] = byte
        elif op == "insert":
            buf.insert(pos, byte)
        elif op == "delete" and pos < len(buf):
            del buf[pos]
        elif op == "cut":
            del buf[pos:]
        if not buf:
            break
    return buf


@settings(max_examples=600, deadline=None)
@given(hs.sampled_from(_valid_frames()), EDITS)
def test_fuzz_mutated_valid_frames_only_skip(frame: bytes, edits: list[tuple[str, int, int]]
                                             ) -> None:
    _check_result(sbe.SbeDecoder(SYMBOLS), bytes(mutate(frame, edits)))


_mantissa = hs.integers(0, (1 << 63) - 1)
_level = hs.tuples(_mantissa, _mantissa)


@settings(max_examples=200, deadline=None)
@given(hs.integers(0, (1 << 63) // 1000 - 1), hs.integers(-18, 18), hs.integers(-18, 18),
       hs.lists(hs.tuples(hs.integers(0, (1 << 63) - 1), _mantissa, _mantissa, hs.booleans()),
                max_size=8),
       hs.lists(_level, max_size=8), hs.lists(_level, max_size=8),
       hs.sampled_from(range(len(SYMBOLS))))
def test_random_events_decode_to_their_values(ev_us: int, pexp: int, qexp: int,
                                              trades: list[tuple[int, int, int, bool]],
                                              bids: list[tuple[int, int]],
                                              asks: list[tuple[int, int]], sid: int) -> None:
    """Any in-range event decodes to exactly its values (Decimal as the oracle)."""
    d = sbe.SbeDecoder(SYMBOLS)
    sym = SYMBOLS[sid].encode()

    def val(m: int, e: int) -> float:
        return float(Decimal(m).scaleb(e))

    tag, recs = d.decode(trades_frame(ev_us, [(t, p, q, int(mk)) for t, p, q, mk in trades],
                                      sym, pexp, qexp), RECV)
    assert tag == sbe.TRADES
    assert [(r[AT_TRADE_ID], r[AT_PRICE], r[AT_QTY], r[AT_FLAGS]) for r in recs] == [
        (t, val(p, pexp), val(q, qexp), int(mk)) for t, p, q, mk in trades]
    want_b = [(val(p, pexp), val(q, qexp)) for p, q in bids]
    want_a = [(val(p, pexp), val(q, qexp)) for p, q in asks]
    assert d.decode(diff_frame(ev_us, 1, 1, bids, asks, sym, pexp, qexp), RECV) == (
        st.DEPTH_DIFF, st.DepthDiff(sid, 1, 1, ev_us * 1000, RECV, want_b, want_a))


# ---- round trip with the simulator's encoder (written apart from the decoder) -------------------
_units = hs.integers(0, 10**17)  # amounts in the simulator's 1e-8 units
_unit_levels = hs.lists(hs.tuples(_units, _units), max_size=6)


@settings(max_examples=200, deadline=None)
@given(hs.integers(0, 2**52), hs.integers(0, 2**62), hs.integers(-8, 0), hs.integers(-8, 0),
       hs.lists(hs.tuples(hs.integers(0, 2**62), _units, _units, hs.booleans()), max_size=6),
       _unit_levels, _unit_levels, hs.tuples(_units, _units, _units, _units),
       hs.sampled_from(range(len(SYMBOLS))), hs.booleans())
def test_sim_encoder_round_trip(ev_us: int, uid: int, pexp: int, qexp: int,
                                trades: list[tuple[int, int, int, bool]],
                                bids: list[tuple[int, int]], asks: list[tuple[int, int]],
                                best: tuple[int, int, int, int], sid: int,
                                on_grid: bool) -> None:
    """Random events through pipeline/sim/sbe_encode.py and back: every value is the float of
    its 8-decimal text, whatever exponent the encoder picked (``on_grid``: every amount is a
    multiple of 10**exponent, so the encoder uses pexp/qexp; otherwise it may fall back to -8).
    """
    from pipeline.sim import sbe_encode as enc

    if on_grid:
        pm, qm = 10 ** (8 + pexp), 10 ** (8 + qexp)
        trades = [(t, p // 1000 * pm, q // 1000 * qm, mk) for t, p, q, mk in trades]
        bids = [(p // 1000 * pm, q // 1000 * qm) for p, q in bids]
        asks = [(p // 1000 * pm, q // 1000 * qm) for p, q in asks]
        best = (best[0] // 1000 * pm, best[1] // 1000 * qm, best[2] // 1000 * pm,
                best[3] // 1000 * qm)

    d = sbe.SbeDecoder(SYMBOLS)
    sym = SYMBOLS[sid]
    ev_ns = ev_us * 1000

    def f(units: int) -> float:
        return float(Decimal(units).scaleb(-8))

    tag, recs = d.decode(enc.encode_trades(sym, ev_us, ev_us, trades, pexp, qexp), RECV)
    assert (tag, recs) == (sbe.TRADES, [
        trade_record(sid, int(Flags.BUYER_IS_MAKER) if mk else 0, f(p), f(q), t, ev_ns, RECV)
        for t, p, q, mk in trades])
    bp, bq, ap, aq = best
    assert d.decode(enc.encode_best_bid_ask(sym, ev_us, uid, best, pexp, qexp), RECV) == (
        st.BOOK_TICKER, (*book_ticker_record(sid, f(bp), f(bq), f(ap), f(aq), uid,
                                             RECV)[:AT_EVENT_TIME_NS], ev_ns, RECV))
    want_b = [(f(p), f(q)) for p, q in bids]
    want_a = [(f(p), f(q)) for p, q in asks]
    assert d.decode(enc.encode_depth_snapshot(sym, ev_us, uid, bids, asks, pexp, qexp),
                    RECV) == (st.DEPTH_PARTIAL,
                              st.DepthPartial(sid, uid, RECV, want_b, want_a, ev_ns))
    assert d.decode(enc.encode_depth_diff(sym, ev_us, uid, uid + 3, bids, asks, pexp, qexp),
                    RECV) == (st.DEPTH_DIFF,
                              st.DepthDiff(sid, uid, uid + 3, ev_ns, RECV, want_b, want_a))
