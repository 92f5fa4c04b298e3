"""The compiled aggTrade fast path (pipeline/marketdata/_ticks.c, pipeline/marketdata/fastpath.py).

Its one safety property: whatever frame it takes, it writes exactly the bytes the Python
decoders (orjson baseline and msgspec) would have published for it; anything else it declines
without touching the ring. Checked on every recorded aggTrade frame, on generated frames, on
mutated frames, and on a real ring in shared memory.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from pipeline.binance import streams as st
from pipeline.ipc.records import TICK_DTYPE, Flags, Kind
from pipeline.ipc.ring import RingReader, RingWriter
from pipeline.marketdata import fastpath

FIX = Path(__file__).parent / "fixtures"
SYMBOLS = ["BTCUSDT", "ETHUSDT"]
ALLOW_PURE = os.environ.get("PIPELINE_ALLOW_PURE_PYTHON") == "1"


@pytest.fixture(scope="module")
def ticks() -> Any:
    mod, why = fastpath.load()
    if mod is None:
        if ALLOW_PURE:
            pytest.skip(f"PIPELINE_ALLOW_PURE_PYTHON=1 and {why}")
        pytest.fail(f"the compiled fast path is not available: {why}. `make test` builds it "
                    "(needs a C compiler and the Python headers); set "
                    "PIPELINE_ALLOW_PURE_PYTHON=1 to test the pure-Python path alone.")
    return mod


def test_a_stale_build_is_refused_not_used(ticks: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert fastpath.load()[0] is ticks
    monkeypatch.setattr(ticks, "API_VERSION", fastpath.API_VERSION - 1)
    mod, why = fastpath.load()
    assert mod is None
    assert "rebuild" in why


def test_the_extension_is_built_and_matches_the_record_layout(ticks: Any) -> None:
    assert fastpath.layout_mismatch(ticks, TICK_DTYPE) is None
    # and the check catches a moved field: price and qty swapped
    names = list(TICK_DTYPE.names or ())
    i, j = names.index("price"), names.index("qty")
    names[i], names[j] = names[j], names[i]
    moved = np.dtype({"names": names, "formats": [TICK_DTYPE.fields[n][0] for n in names],  # type: ignore[index]
                      "offsets": [TICK_DTYPE.fields[n][1] for n in TICK_DTYPE.names or ()],  # type: ignore[index]
                      "itemsize": TICK_DTYPE.itemsize})
    problem = fastpath.layout_mismatch(ticks, moved)
    assert problem is not None
    assert "price" in problem


RECORD_TAGS = (st.AGG, st.TRADE, st.BOOK_TICKER)  # what the compiled path may produce


def reference(frame: bytes, symbols: list[str], recv_ns: int = 77) -> bytes | None:
    """What the Python decoders publish for a frame: record bytes, or None if it is not an
    aggTrade / trade / bookTicker record. orjson and msgspec must agree whenever both decode
    it."""
    out = []
    for name in ("orjson", "msgspec"):
        tag, val = st.make_decoder(name, symbols).decode(frame, recv_ns)
        out.append(np.array([(*val, 0)], TICK_DTYPE).tobytes() if tag in RECORD_TAGS else None)
    if out[0] is not None and out[1] is not None:
        assert out[0] == out[1], frame
    return out[0]


def parser(ticks: Any, symbols: list[str]) -> Any:
    return ticks.TickFastPath(fastpath.routes(symbols), len(symbols))


def frames_recorded() -> list[bytes]:
    """Every recorded aggTrade, trade and bookTicker frame (combined form)."""
    frames = []
    for name in ("aggTrade.json", "trade.json", "bookTicker.json"):
        frames += [json.dumps(x, separators=(",", ":")).encode()
                   for x in json.loads((FIX / "streams" / name).read_text())]
    for line in (FIX / "streams" / "combined_session.jsonl").read_text().splitlines():
        if any(f'@{k}"' in line for k in ("aggTrade", "trade", "bookTicker")):
            frames.append(line.encode())
    frames.append((FIX / "streams_ingest" / "hostile" / "aggTrade_with_grafted_st_field.json")
                  .read_bytes().strip())
    return frames


ID_FIELD = {Kind.AGG_TRADE: "a", Kind.TRADE: "t", Kind.BOOK_TICKER: "u"}


def test_every_recorded_frame_gives_the_python_record(ticks: Any) -> None:
    frames = frames_recorded()
    kinds = set()
    for frame in frames:
        msg = json.loads(frame)
        sym = msg["data"]["s"]
        p = parser(ticks, ["XXXUSDT", sym])
        got = p.parse(frame, 77)
        assert got is not None, frame
        kind, sid, tick_id, rec = got
        kinds.add(kind)
        assert msg["stream"].endswith({Kind.AGG_TRADE: "@aggTrade", Kind.TRADE: "@trade",
                                       Kind.BOOK_TICKER: "@bookTicker"}[Kind(kind)])
        assert sid == 1
        assert tick_id == msg["data"][ID_FIELD[Kind(kind)]]
        assert rec == reference(frame, ["XXXUSDT", sym]), frame
    assert kinds == {Kind.AGG_TRADE, Kind.TRADE, Kind.BOOK_TICKER}
    assert len(frames) >= 30


def frame(a: int = 100, p: str = "95311.64000000", q: str = "0.00084000", m: str = "false",
          stream: str = "btcusdt@aggTrade", e_ms: int = 1768627409826, extra: str = "") -> bytes:
    return (f'{{"stream":"{stream}","data":{{"e":"aggTrade","E":{e_ms},"s":"BTCUSDT","a":{a},'
            f'"p":"{p}","q":"{q}","f":5782154285,"l":5782154285,"T":1768627409825,"m":{m},'
            f'"M":true{extra}}}}}').encode()


def trade_frame(t: int = 7, extra: str = "") -> bytes:
    return (f'{{"stream":"btcusdt@trade","data":{{"e":"trade","E":1768627409826,"s":"BTCUSDT",'
            f'"t":{t},"p":"95311.64000000","q":"0.00084000","T":1768627409825,"m":true,'
            f'"M":true{extra}}}}}').encode()


def book_frame(u: int = 9, b: str = "1.5", extra: str = "") -> bytes:
    return (f'{{"stream":"ethusdt@bookTicker","data":{{"u":{u},"s":"ETHUSDT","b":"{b}",'
            f'"B":"2.0","a":"1.6","A":"3"{extra}}}}}').encode()


@pytest.mark.parametrize("bad", [
    frame(stream="btcusdt@depth"),                      # a stream this path does not take
    frame(stream="btcusdt@bookTicker"),                 # aggTrade fields on a bookTicker stream
    frame(stream="btcusdt@trade"),                      # ... on a trade stream (no `t`)
    trade_frame(extra=',"t":8'),                        # trade id twice
    book_frame(b="1e3"), book_frame(extra=',"u":10'),   # bookTicker: exponent, u twice
    book_frame().replace(b'"u":9', b'"u":"9"'),
    frame().replace(b'{"stream":"btcusdt@aggTrade",', b'{').replace(
        b'true}}', b'true},"stream":"btcusdt@aggTrade"}'),  # `data` before `stream`
    frame(stream="xrpusdt@aggTrade"),                   # not our symbol
    frame(stream="btcusdt\\u0040aggTrade"),             # escape in the stream name
    frame(extra=',"x":"caf\\u00e9"'),                   # escape in a skipped string
    frame(extra=',"x":"café"'),                         # non-ASCII
    frame(extra=',"x":{}'),                             # nested value
    frame(extra=',"x":[1]'),
    frame(extra=',"x":1e999'),                          # JSON, but overflows in the decoders
    frame(extra=',"x":1e5'),                            # exponents: not taken at all
    frame(extra=',"x":123456789012345678901234567890'),  # beyond 64 bits
    frame(extra=',"x":01'),                             # not JSON
    frame(extra=',"a":101'),                            # a required key twice
    frame(p="95311.64000000\",\"p\":\"1"),              # price twice
    frame(a=-1),                                        # negative id
    frame(a=10**18),                                    # 19 digits
    frame(p="01.5"), frame(p=".5"), frame(p="5."), frame(p="1e5"), frame(p=""), frame(p="-1"),
    frame(p="1" * 41),                                  # longer than the path takes
    frame(q="NaN"), frame(q="inf"), frame(q="1_0"),
    frame(m="1"), frame(m="null"),
    frame(e_ms=10**13),                                 # E * 1e6 would overflow int64
    frame()[:-1],                                       # truncated
    frame() + b"x",                                     # trailing garbage
    frame() + b"{}",
    frame().replace(b'"p":"95311.64000000",', b""),     # missing field
    frame().replace(b'"a":100', b'"a":100.0'),          # float where an int belongs
    frame().replace(b'"a":100', b'"a":"100"'),          # string where an int belongs
    frame().replace(b'"p":"95311.64000000"', b'"p":95311.64'),  # number where a string belongs
    frame().replace(b'{"stream"', b'{"x":1,"stream"'),  # unknown top-level key
    frame().replace(b'"data":{', b'"data":[').replace(b'true}}', b'true]}'),
    b'{"stream":"btcusdt@aggTrade"}',                    # no data
    b'{"result":null,"id":1}',
    b"",
    b"not json",
])
def test_declines_anything_but_the_canonical_case(ticks: Any, bad: bytes) -> None:
    assert parser(ticks, SYMBOLS).parse(bad, 1) is None


def test_accepts_json_the_live_exchange_could_send_in_another_layout(ticks: Any) -> None:
    p = parser(ticks, SYMBOLS)
    spaced = (b' { "stream" : "ethusdt@aggTrade" ,\n "data" : { "m" : true , "l" : 7 , '
              b'"q" : "2" , "p" : "0.1" , "a" : 5 , "E" : 3 , "new" : null , "n2" : -1.5 , '
              b'"n3" : false } } ')
    got = p.parse(spaced, 9)
    assert got is not None
    assert got[:3] == (Kind.AGG_TRADE, 1, 5)
    assert got[3] == reference(spaced, SYMBOLS, 9)
    rec = np.frombuffer(got[3], TICK_DTYPE)[0]
    assert rec["kind"] == Kind.AGG_TRADE
    assert rec["flags"] == Flags.BUYER_IS_MAKER
    assert (rec["price"], rec["qty"], rec["aux_id"], rec["event_time_ns"]) == (0.1, 2.0, 7,
                                                                               3_000_000)
    assert p.parse(frame(), 1) is not None
    assert ticks.TickFastPath(fastpath.routes(SYMBOLS), 2,
                               max_frame_bytes=100).parse(frame(), 1) is None  # oversized


decimals = hs.builds(
    lambda i, f: i + ("." + f if f else ""),
    hs.from_regex(r"(0|[1-9][0-9]{0,14})", fullmatch=True),
    hs.from_regex(r"[0-9]{0,20}", fullmatch=True),
)
ids = hs.integers(0, 10**18 - 1)


INT_FIELDS = {"E", "T", "a", "l", "f", "t", "u"}
DEC_FIELDS = {"p", "q", "b", "B", "A"}
LAYOUTS = {  # stream suffix -> (kind, wire fields in live order)
    "aggTrade": (Kind.AGG_TRADE, ["e", "E", "s", "a", "p", "q", "f", "l", "T", "m", "M"]),
    "trade": (Kind.TRADE, ["e", "E", "s", "t", "p", "q", "T", "m", "M"]),
    "bookTicker": (Kind.BOOK_TICKER, ["u", "s", "b", "B", "a", "A"]),
}


@pytest.mark.parametrize("suffix", list(LAYOUTS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hs.data(), stream_first=hs.booleans(), ws=hs.sampled_from(["", " ", "\n\t "]))
def test_generated_frames_match_the_python_decoders(ticks: Any, suffix: str, data: Any,
                                                    stream_first: bool, ws: str) -> None:
    kind, names = LAYOUTS[suffix]
    order = data.draw(hs.permutations(names))
    vals: dict[str, str] = {}
    for k in order:
        if k == "e":
            vals[k] = f'"{suffix}"'
        elif k == "s":
            vals[k] = '"ETHUSDT"'
        elif k in ("m", "M"):
            vals[k] = json.dumps(data.draw(hs.booleans()))
        elif k == "E" or k == "T":
            vals[k] = str(data.draw(hs.integers(0, 9_000_000_000_000)))
        elif k in DEC_FIELDS or (k == "a" and kind == Kind.BOOK_TICKER):
            vals[k] = f'"{data.draw(decimals)}"'
        else:
            vals[k] = str(data.draw(ids))
    body = "{" + f",{ws}".join(f'"{k}"{ws}:{ws}{vals[k]}' for k in order) + "}"
    parts = [f'"stream":"ethusdt@{suffix}"', f'"data":{body}']
    if not stream_first:
        parts.reverse()
    raw = (ws + "{" + ws + f",{ws}".join(parts) + ws + "}" + ws).encode()
    ref = reference(raw, SYMBOLS, 5)
    assert ref is not None  # the Python decoders take every such frame
    got = parser(ticks, SYMBOLS).parse(raw, 5)
    if not stream_first:  # decodable, but not the canonical layout: Python's job
        assert got is None
        return
    assert got is not None, raw  # every such frame is in the canonical subset
    assert got[:3] == (kind, 1, int(vals[ID_FIELD[kind]]))
    assert got[3] == ref


BASES = [frame(a=123456789, p="1.23000000", q="45.60000000", m="true"), trade_frame(),
         book_frame()]


@pytest.mark.parametrize("base", BASES, ids=["aggTrade", "trade", "bookTicker"])
@settings(max_examples=800, deadline=None)
@given(edits=hs.lists(hs.tuples(hs.sampled_from(["del", "ins", "set"]), hs.integers(0, 400),
                                hs.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_frames_are_declined_or_decoded_exactly_as_python_would(
        ticks: Any, base: bytes, edits: list[tuple[str, int, int]]) -> None:
    buf = bytearray(base)
    for op, pos, byte in edits:
        pos %= len(buf) + 1
        if op == "del" and pos < len(buf):
            del buf[pos]
        elif op == "ins":
            buf.insert(pos, byte)
        elif pos < len(buf):
            buf[pos] = byte
    raw = bytes(buf)
    got = parser(ticks, SYMBOLS).parse(raw, 5)
    if got is not None:
        assert got[3] == reference(raw, SYMBOLS, 5), raw


# ---- on a real ring ---------------------------------------------------------------------------


class Conn:
    """A connection as the shell keeps it: the compiled path never looks inside (it only hands
    the object back to the fallback), so its state is whatever the shell records."""

    def __init__(self) -> None:
        self.last_ns = 0
        self.first_pending = False


class Shell:
    """The Python side on_message hands over to: records every call and, as Ingest does, the
    connection's last frame time."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []  # (code, recv_ns)

    def __call__(self, conn: Any, payload: bytes, recv_ns: int, code: int) -> None:
        self.calls.append((code, recv_ns))
        if isinstance(conn, Conn):
            conn.last_ns = recv_ns


def make_writer(name: str, capacity: int, max_staged: int) -> RingWriter:
    w = RingWriter.create(name, TICK_DTYPE, capacity, symbols=SYMBOLS)
    w.configure_staging("publish_time_ns", max_staged)
    return w


def test_publishes_the_next_id_into_the_ring_at_once_and_declines_the_rest(
        ticks: Any, shm_name: str) -> None:
    """Every record the compiled path takes is visible when on_message returns (a burst of
    frames from one socket read is not held back until its last frame), stamped with the time
    it became visible; everything it does not take is the shell's."""
    w = make_writer(shm_name, 16, 4)
    shell = Shell()
    fast, how = fastpath.build("on", SYMBOLS, w, shell, 1 << 20)
    try:
        assert how == "compiled (aggTrade, trade, bookTicker)"
        conn = Conn()
        fast.on_message(conn, frame(a=100), 1)  # disarmed: the shell decides
        assert shell.calls == [(0, 1)]
        assert w.cursor == 0
        assert fast.last_id(0) is None
        fast.set_last(0, 99)
        t0 = time.time_ns()
        fast.on_message(conn, frame(a=100), 2)  # no loop iteration open: the shell is told
        t1 = time.time_ns()
        assert shell.calls[-1] == (2, 2)
        assert (w.cursor, w.staged) == (1, 0)
        assert conn.last_ns == 2
        fast.iter_open = 1  # a loop iteration opened (by the shell, in Ingest)
        for k in range(101, 106):  # visible one by one, more than max_staged (4) of them
            fast.on_message(conn, frame(a=k), k)
            assert (w.cursor, w.staged) == (k - 99, 0)
        # the shell hears only of the connection's first frame in the iteration (its
        # per-connection state: the compiled path keeps none)
        assert shell.calls[2:] == [(2, 101)]
        assert conn.last_ns == 101
        fast.on_message(conn, frame(a=104), 106)  # duplicate: the shell's tracker decides
        fast.on_message(conn, frame(a=107), 107)  # gap: likewise
        assert [c for c, _ in shell.calls[-2:]] == [0, 0]
        assert fast.last_id(0) == 105
        assert fast.frames == 6
        conn = Conn()  # a new connection (a rotation) in the same loop iteration
        conn.first_pending = True
        fast.on_message(conn, frame(a=106), 108)
        assert shell.calls[-1] == (2, 108)  # the connection's first frame: the shell is told
        assert conn.last_ns == 108
        assert w.cursor == 7
        with RingReader.attach(shm_name, start="oldest") as rd:
            r = rd.poll()
        assert r["trade_id"].tolist() == [100, 101, 102, 103, 104, 105, 106]
        assert r["recv_time_ns"].tolist() == [2, 101, 102, 103, 104, 105, 108]
        stamps = r["publish_time_ns"].tolist()
        assert t0 <= stamps[0] <= t1
        assert stamps == sorted(stamps)
        ref = parser(ticks, SYMBOLS).parse(frame(a=101), 101)[3]
        got = r[1:2].copy()
        got["publish_time_ns"] = 0
        assert got.tobytes() == ref
        fast.set_last(0, None)
        fast.on_message(conn, frame(a=107), 109)
        assert shell.calls[-1] == (0, 109)
    finally:
        fast.close()
        w.close()


def test_records_the_python_side_staged_go_out_with_the_next_compiled_publish(
        ticks: Any, shm_name: str) -> None:
    """The Python writer between stage() and commit() (a depth frame's levels): a compiled
    publish behind them publishes them too, stamped with its own time, as commit() would; a
    full batch waiting is left to the shell."""
    w = make_writer(shm_name, 16, 3)
    shell = Shell()
    fast, _ = fastpath.build("on", SYMBOLS, w, shell, 1 << 20)
    try:
        fast.set_last(0, 99)
        fast.iter_open = 1
        w.stage((int(Kind.TRADE), 0, 0, 0, 0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 7, 0, 0, 0))
        fast.on_message(Conn(), frame(a=100), 1)
        assert (w.cursor, w.staged) == (2, 0)
        w.stage((int(Kind.TRADE), 0, 0, 0, 0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 8, 0, 0, 0))
        w.stage((int(Kind.TRADE), 0, 0, 0, 0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 9, 0, 0, 0))
        w.stage((int(Kind.TRADE), 0, 0, 0, 0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 10, 0, 0, 0))
        fast.on_message(Conn(), frame(a=101), 2)  # max_staged (3) wait: the shell decides
        assert shell.calls[-1] == (0, 2)
        assert (w.cursor, w.staged) == (2, 3)
        w.commit(5)
        with RingReader.attach(shm_name, start="oldest") as rd:
            r = rd.poll()
        assert r["trade_id"].tolist() == [7, 100, 8, 9, 10]
        stamps = r["publish_time_ns"].tolist()
        assert stamps[0] == stamps[1] > 5
        assert stamps[2:] == [5, 5, 5]
    finally:
        fast.close()
        w.close()


def test_trade_and_book_ticker_state(ticks: Any, shm_name: str) -> None:
    """trade: the next id of an armed symbol, like aggTrade (its own state); bookTicker: any
    newer update id, older or equal ones to the shell (duplicates of a rotation)."""
    w = make_writer(shm_name, 16, 8)
    shell = Shell()
    fast, _ = fastpath.build("on", SYMBOLS, w, shell, 1 << 20)
    try:
        conn = Conn()
        fast.iter_open = 1
        fast.on_message(conn, trade_frame(t=7), 1)
        fast.on_message(conn, book_frame(u=9), 2)
        assert [c for c, _ in shell.calls] == [0, 0]  # nothing armed yet
        fast.set_last(0, 6, int(Kind.TRADE))
        fast.set_last(1, 8, int(Kind.BOOK_TICKER))
        assert fast.last_id(0) is None  # aggTrade state is separate
        fast.on_message(conn, trade_frame(t=7), 3)
        fast.on_message(conn, trade_frame(t=9), 4)  # a hole: the shell's tracker decides
        fast.on_message(conn, book_frame(u=9), 5)
        fast.on_message(conn, book_frame(u=9), 6)  # same u: duplicate, the shell drops it
        fast.on_message(conn, book_frame(u=30, b="1.75"), 7)  # newer by any amount
        # declined: the two unarmed, the hole, the duplicate; 2: the first frame published for
        # this connection in this iteration
        assert [c for c, _ in shell.calls] == [0, 0, 2, 0, 0]
        assert (w.cursor, w.staged) == (3, 0)
        assert fast.last_id(0, int(Kind.TRADE)) == 7
        assert fast.last_id(1, int(Kind.BOOK_TICKER)) == 30
        with RingReader.attach(shm_name, start="oldest") as rd:
            r = rd.poll()
        assert [(int(k), int(i)) for k, i in zip(r["kind"], r["trade_id"], strict=True)] == [
            (Kind.TRADE, 7), (Kind.BOOK_TICKER, 9), (Kind.BOOK_TICKER, 30)]
        assert r[2]["bid_price"] == 1.75
        assert r[2]["event_time_ns"] == 0
        for rec, raw in zip(r, (trade_frame(t=7), book_frame(u=9), book_frame(u=30, b="1.75")),
                            strict=True):
            expect = reference(raw, SYMBOLS, int(rec["recv_time_ns"]))
            mine = rec.copy()
            mine["publish_time_ns"] = 0
            assert mine.tobytes() == expect
    finally:
        fast.close()
        w.close()


def test_wraps_around_the_ring_and_interleaves_with_python_publishes(ticks: Any,
                                                                     shm_name: str) -> None:
    w = make_writer(shm_name, 8, 3)
    fast, _ = fastpath.build("on", SYMBOLS, w, Shell(), 1 << 20)
    rd = RingReader.attach(shm_name, start="oldest")
    try:
        fast.set_last(1, 0)
        fast.iter_open = 1
        seen: list[int] = []
        expect: list[int] = []
        conn = Conn()
        agg = 0
        for k in range(1, 60):
            if k % 5 == 0:  # a record from the Python side, staged behind the C ones
                w.stage((int(Kind.TRADE), 0, 0, 0, 0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, -k, 0, 0, 0))
                expect.append(-k)
            else:
                agg += 1
                fast.on_message(conn, frame(a=agg, stream="ethusdt@aggTrade"), k)
                expect.append(agg)
            if w.staged >= 2 or k % 7 == 0:
                w.commit(k)
                seen += rd.poll()["trade_id"].tolist()
        w.commit(0)
        seen += rd.poll()["trade_id"].tolist()
        assert rd.missed == 0
        assert seen == expect
        assert fast.last_id(1) == agg == 48
    finally:
        rd.close()
        fast.close()
        w.close()


def test_close_releases_the_ring(ticks: Any, shm_name: str) -> None:
    w = make_writer(shm_name, 8, 4)
    fast, _ = fastpath.build("on", SYMBOLS, w, Shell(), 1 << 20)
    fast.close()
    fast.close()  # idempotent
    w.close()  # would raise BufferError if the fast path still held the buffers
    with pytest.raises(RuntimeError, match="no ring writer"):
        fast.on_message(Conn(), frame(), 1)


def test_build_modes(ticks: Any, shm_name: str) -> None:
    w = make_writer(shm_name, 8, 4)
    try:
        assert fastpath.build("off", SYMBOLS, w, Shell(), 1) == (None, "off (--fast-path off)")
        with pytest.raises(ValueError, match="fast path mode"):
            fastpath.build("maybe", SYMBOLS, w, Shell(), 1)
        w.configure_staging(None)
        with pytest.raises(ValueError, match="stamp field"):
            fastpath.build("auto", SYMBOLS, w, Shell(), 1)
    finally:
        w.close()


def test_microsecond_event_times_match_the_python_decoders(ticks: Any) -> None:
    """timeUnit=MICROSECOND: E is in microseconds, records still carry ns (both paths)."""
    f = frame(e_ms=1768627409826123)  # microseconds on such a connection
    us = ticks.TickFastPath(fastpath.routes(SYMBOLS), 2, time_mult=1_000)
    got = us.parse(f, 7)
    assert got is not None
    got = got[1:]  # (symbol, id, record)
    for name in ("orjson", "msgspec"):
        tag, val = st.make_decoder(name, SYMBOLS, time_unit="MICROSECOND").decode(f, 7)
        assert tag == st.AGG
        assert got[2] == np.array([(*val, 0)], TICK_DTYPE).tobytes()
    assert np.frombuffer(got[2], TICK_DTYPE)[0]["event_time_ns"] == 1768627409826123000
    # a millisecond-path instance declines it: E * 1e6 would not fit in int64
    assert parser(ticks, SYMBOLS).parse(f, 7) is None
    with pytest.raises(ValueError, match="time_mult"):
        ticks.TickFastPath(fastpath.routes(SYMBOLS), 2, time_mult=0)


def test_a_far_book_ticker_id_goes_to_python(ticks: Any, shm_name: str) -> None:
    """A bookTicker `u` more than max_id_jump above the last one is not taken (the shell's
    far-id rule decides): taking u=10**17 would make every real update after it a duplicate."""
    w = make_writer(shm_name, 16, 8)
    shell = Shell()
    fast, _ = fastpath.build("on", SYMBOLS, w, shell, 1 << 20, max_id_jump=1000)
    try:
        conn = Conn()
        fast.iter_open = 1
        fast.set_last(1, 8, int(Kind.BOOK_TICKER))
        fast.on_message(conn, book_frame(u=10**17), 1)  # 18 digits: parsed, but far
        fast.on_message(conn, book_frame(u=1008), 2)  # exactly max_id_jump newer: taken
        fast.on_message(conn, book_frame(u=2009), 3)  # one more than that: declined
        assert [c for c, _ in shell.calls] == [0, 2, 0]  # (2: the connection's first)
        assert w.cursor == 1
        assert fast.last_id(1, int(Kind.BOOK_TICKER)) == 1008
        fast.set_last(1, -3, int(Kind.BOOK_TICKER))  # never armed on a negative id
        assert fast.last_id(1, int(Kind.BOOK_TICKER)) is None
        with pytest.raises(ValueError, match="max_id_jump"):
            ticks.TickFastPath(fastpath.routes(SYMBOLS), 2, max_id_jump=0)
    finally:
        fast.close()
        w.close()


# ---- the boundary: buffers and integers in, no attribute of a Python object -------------------


class AttributeTrap:
    """An object any attribute access of which fails the test: what the compiled path is given
    as a connection must stay an opaque token to it."""

    def __getattribute__(self, name: str) -> Any:
        raise AssertionError(f"the compiled path looked up attribute {name!r}")


class PublicViewOnly:
    """A ring writer reduced to its public view for a fast path: any other attribute fails."""

    def __init__(self, core: Any) -> None:
        object.__setattr__(self, "_view", core.fast_path_view())

    def fast_path_view(self) -> Any:
        return object.__getattribute__(self, "_view")

    def __getattribute__(self, name: str) -> Any:
        if name != "fast_path_view":
            raise AssertionError(f"the fast path reached for writer.{name}")
        return object.__getattribute__(self, name)


def test_the_compiled_path_needs_only_the_writers_public_view(ticks: Any) -> None:
    """Built from an object that has nothing but ``fast_path_view()``, fed connections that
    fail on any attribute access, it publishes into the writer's ring: the writer's ``cursor``,
    ``staged`` and ``commit`` see its records (cursor and intent live in the ring header), and
    it keeps no reference to the writer object itself."""
    import gc
    import weakref

    from pipeline.ipc.layout import RingLayout, format_header
    from pipeline.ipc.ring import ReaderCore, WriterCore

    layout = RingLayout.compute(TICK_DTYPE, 8, SYMBOLS, 4)
    buf = bytearray(layout.total_size)
    format_header(buf, layout)
    core = WriterCore(buf, layout)
    core.configure_staging("publish_time_ns", 4)
    calls: list[tuple[int, int]] = []
    writer = PublicViewOnly(core)
    fast, _ = fastpath.build("on", SYMBOLS, writer, lambda c, p, r, code: calls.append((code, r)),
                             1 << 20)
    gone = weakref.ref(writer)
    del writer
    gc.collect()
    assert gone() is None  # the extension holds buffers, not the writer
    try:
        conn = AttributeTrap()
        fast.set_last(0, 99)
        fast.on_message(conn, frame(a=100), 1)  # told: no iteration open
        fast.iter_open = 1
        fast.on_message(conn, frame(a=101), 2)  # told: first of this connection in the iteration
        fast.on_message(conn, frame(a=102), 3)  # published silently
        assert calls == [(2, 1), (2, 2)]
        assert (core.cursor, core.staged) == (3, 0)
        assert core.commit(42) == 0  # nothing staged: the cursor it read back is the header's
        core.stage((int(Kind.TRADE), 0, 0, 0, 0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 7, 0, 0, 0))
        assert core.staged == 1
        fast.on_message(conn, frame(a=103), 4)  # behind the Python-staged record: both out
        assert (core.cursor, core.staged) == (5, 0)
        assert core.publish((int(Kind.TRADE), 0, 0, 0, 0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 8, 0, 0,
                             0, 44)) == 5
        got = ReaderCore(buf, layout, start="oldest").poll()
        assert got["trade_id"].tolist() == [100, 101, 102, 7, 103, 8]
        assert got["publish_time_ns"][-1] == 44
        mine = got[[0]].copy()
        mine["publish_time_ns"] = 0
        assert mine.tobytes() == reference(frame(a=100), SYMBOLS, 1)
    finally:
        fast.close()


def test_each_connection_is_handed_to_the_shell_once_per_loop_iteration(ticks: Any,
                                                                         shm_name: str) -> None:
    """The shell keeps per-connection state (last frame time, first frame seen): the compiled
    path calls it (code 2) for the first frame it takes of each connection in a loop iteration,
    again when the connections alternate, and never for the rest."""
    w = make_writer(shm_name, 64, 32)
    shell = Shell()
    fast, _ = fastpath.build("on", SYMBOLS, w, shell, 1 << 20)
    try:
        a, b = Conn(), Conn()
        fast.set_last(0, 0)
        fast.set_last(1, 0)
        fast.iter_open = 1
        fast.on_message(a, frame(a=1), 10)
        fast.on_message(a, frame(a=2), 11)
        fast.on_message(b, frame(a=1, stream="ethusdt@aggTrade"), 12)
        fast.on_message(b, frame(a=2, stream="ethusdt@aggTrade"), 13)
        fast.on_message(a, frame(a=3), 14)
        assert shell.calls == [(2, 10), (2, 12), (2, 14)]
        assert (a.last_ns, b.last_ns) == (14, 12)
        fast.iter_open = 1  # the next iteration: every connection is told again
        fast.on_message(a, frame(a=4), 15)
        fast.on_message(a, frame(a=5), 16)
        assert shell.calls[3:] == [(2, 15)]
        assert w.cursor == 7
        assert fast.frames == 7
    finally:
        fast.close()
        w.close()
