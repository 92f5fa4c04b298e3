"""The compiled aggTrade fast path (pipeline/_fastagg.c, pipeline/fastpath.py).

Its one safety property: whatever frame it takes, it writes exactly the bytes the Python
decoders (orjson baseline and msgspec) would have published for it; anything else it declines
without touching the ring. Checked on every recorded aggTrade frame, on generated frames, on
mutated frames, and on a real ring in shared memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from pipeline import fastpath
from pipeline.binance import streams as st
from pipeline.records import TICK_DTYPE, Flags, Kind
from pipeline.ring import RingReader, RingWriter

FIX = Path(__file__).parent / "fixtures"
SYMBOLS = ["BTCUSDT", "ETHUSDT"]
ALLOW_PURE = os.environ.get("PIPELINE_ALLOW_PURE_PYTHON") == "1"


@pytest.fixture(scope="module")
def fastagg() -> Any:
    mod, why = fastpath.load()
    if mod is None:
        if ALLOW_PURE:
            pytest.skip(f"PIPELINE_ALLOW_PURE_PYTHON=1 and {why}")
        pytest.fail(f"the compiled fast path is not available: {why}. `make test` builds it "
                    "(needs a C compiler and the Python headers); set "
                    "PIPELINE_ALLOW_PURE_PYTHON=1 to test the pure-Python path alone.")
    return mod


def test_the_extension_is_built_and_matches_the_record_layout(fastagg: Any) -> None:
    assert fastpath.layout_mismatch(fastagg, TICK_DTYPE) is None
    # and the check catches a moved field: price and qty swapped
    names = list(TICK_DTYPE.names or ())
    i, j = names.index("price"), names.index("qty")
    names[i], names[j] = names[j], names[i]
    moved = np.dtype({"names": names, "formats": [TICK_DTYPE.fields[n][0] for n in names],  # type: ignore[index]
                      "offsets": [TICK_DTYPE.fields[n][1] for n in TICK_DTYPE.names or ()],  # type: ignore[index]
                      "itemsize": TICK_DTYPE.itemsize})
    problem = fastpath.layout_mismatch(fastagg, moved)
    assert problem is not None
    assert "price" in problem


def reference(frame: bytes, symbols: list[str], recv_ns: int = 77) -> bytes | None:
    """What the Python decoders publish for a frame: record bytes, or None if not an AGG.
    orjson and msgspec must agree whenever both decode it."""
    out = []
    for name in ("orjson", "msgspec"):
        tag, val = st.make_decoder(name, symbols).decode(frame, recv_ns)
        out.append(np.array([(*val, 0)], TICK_DTYPE).tobytes() if tag == st.AGG else None)
    if out[0] is not None and out[1] is not None:
        assert out[0] == out[1], frame
    return out[0]


def parser(fastagg: Any, symbols: list[str]) -> Any:
    return fastagg.AggFastPath(fastpath.agg_routes(symbols), len(symbols))


def agg_frames_recorded() -> list[bytes]:
    frames = [json.dumps(x, separators=(",", ":")).encode()
              for x in json.loads((FIX / "streams" / "aggTrade.json").read_text())]
    for line in (FIX / "streams" / "combined_session.jsonl").read_text().splitlines():
        if "@aggTrade" in line:
            frames.append(line.encode())
    frames.append((FIX / "streams_ingest" / "hostile" / "aggTrade_with_grafted_st_field.json")
                  .read_bytes().strip())
    return frames


def test_every_recorded_agg_trade_frame_gives_the_python_record(fastagg: Any) -> None:
    frames = agg_frames_recorded()
    assert len(frames) >= 8
    for frame in frames:
        sym = json.loads(frame)["data"]["s"]
        p = parser(fastagg, ["XXXUSDT", sym])
        got = p.parse(frame, 77)
        assert got is not None, frame
        sid, agg_id, rec = got
        assert sid == 1
        assert agg_id == json.loads(frame)["data"]["a"]
        assert rec == reference(frame, ["XXXUSDT", sym]), frame


def frame(a: int = 100, p: str = "95311.64000000", q: str = "0.00084000", m: str = "false",
          stream: str = "btcusdt@aggTrade", e_ms: int = 1768627409826, extra: str = "") -> bytes:
    return (f'{{"stream":"{stream}","data":{{"e":"aggTrade","E":{e_ms},"s":"BTCUSDT","a":{a},'
            f'"p":"{p}","q":"{q}","f":5782154285,"l":5782154285,"T":1768627409825,"m":{m},'
            f'"M":true{extra}}}}}').encode()


@pytest.mark.parametrize("bad", [
    frame(stream="btcusdt@bookTicker"),                 # not an aggTrade route
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
def test_declines_anything_but_the_canonical_case(fastagg: Any, bad: bytes) -> None:
    assert parser(fastagg, SYMBOLS).parse(bad, 1) is None


def test_accepts_json_the_live_exchange_could_send_in_another_layout(fastagg: Any) -> None:
    p = parser(fastagg, SYMBOLS)
    spaced = (b' { "data" : { "m" : true , "l" : 7 , "q" : "2" , "p" : "0.1" , "a" : 5 ,'
              b' "E" : 3 , "new" : null , "n2" : -1.5 , "n3" : false } ,\n'
              b' "stream" : "ethusdt@aggTrade" } ')
    got = p.parse(spaced, 9)
    assert got is not None
    assert got[:2] == (1, 5)
    assert got[2] == reference(spaced, SYMBOLS, 9)
    rec = np.frombuffer(got[2], TICK_DTYPE)[0]
    assert rec["kind"] == Kind.AGG_TRADE
    assert rec["flags"] == Flags.BUYER_IS_MAKER
    assert (rec["price"], rec["qty"], rec["aux_id"], rec["event_time_ns"]) == (0.1, 2.0, 7,
                                                                               3_000_000)
    assert p.parse(frame(), 1) is not None
    assert fastagg.AggFastPath(fastpath.agg_routes(SYMBOLS), 2,
                               max_frame_bytes=100).parse(frame(), 1) is None  # oversized


decimals = hs.builds(
    lambda i, f: i + ("." + f if f else ""),
    hs.from_regex(r"(0|[1-9][0-9]{0,14})", fullmatch=True),
    hs.from_regex(r"[0-9]{0,20}", fullmatch=True),
)
ids = hs.integers(0, 10**18 - 1)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=ids, last=ids, e_ms=hs.integers(0, 9_000_000_000_000), p=decimals, q=decimals,
       maker=hs.booleans(), order=hs.permutations(["e", "E", "s", "a", "p", "q", "f", "l", "T",
                                                   "m", "M"]),
       stream_first=hs.booleans(), ws=hs.sampled_from(["", " ", "\n\t "]))
def test_generated_frames_match_the_python_decoders(fastagg: Any, a: int, last: int, e_ms: int,
                                                    p: str, q: str, maker: bool,
                                                    order: list[str], stream_first: bool,
                                                    ws: str) -> None:
    vals = {"e": '"aggTrade"', "E": str(e_ms), "s": '"ETHUSDT"', "a": str(a), "p": f'"{p}"',
            "q": f'"{q}"', "f": "1", "l": str(last), "T": str(e_ms), "m": json.dumps(maker),
            "M": "true"}
    data = "{" + f",{ws}".join(f'"{k}"{ws}:{ws}{vals[k]}' for k in order) + "}"
    parts = ['"stream":"ethusdt@aggTrade"', f'"data":{data}']
    if not stream_first:
        parts.reverse()
    raw = (ws + "{" + ws + f",{ws}".join(parts) + ws + "}" + ws).encode()
    got = parser(fastagg, SYMBOLS).parse(raw, 5)
    assert got is not None, raw  # every such frame is in the canonical subset
    assert got[:2] == (1, a)
    ref = st.make_decoder("orjson", SYMBOLS).decode(raw, 5)
    assert ref[0] == st.AGG
    assert got[2] == np.array([(*ref[1], 0)], TICK_DTYPE).tobytes()


@settings(max_examples=1500, deadline=None)
@given(edits=hs.lists(hs.tuples(hs.sampled_from(["del", "ins", "set"]), hs.integers(0, 400),
                                hs.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_frames_are_declined_or_decoded_exactly_as_python_would(
        fastagg: Any, edits: list[tuple[str, int, int]]) -> None:
    buf = bytearray(frame(a=123456789, p="1.23000000", q="45.60000000", m="true"))
    for op, pos, byte in edits:
        pos %= len(buf) + 1
        if op == "del" and pos < len(buf):
            del buf[pos]
        elif op == "ins":
            buf.insert(pos, byte)
        elif pos < len(buf):
            buf[pos] = byte
    raw = bytes(buf)
    got = parser(fastagg, SYMBOLS).parse(raw, 5)
    if got is not None:
        assert got[2] == reference(raw, SYMBOLS, 5), raw


# ---- on a real ring ---------------------------------------------------------------------------


class Conn:
    def __init__(self) -> None:
        self.last_ns = 0
        self.first_pending = False


class Shell:
    """The Python side on_message hands over to: records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []  # (code, recv_ns)

    def __call__(self, conn: Any, payload: bytes, recv_ns: int, code: int) -> None:
        self.calls.append((code, recv_ns))


def make_writer(name: str, capacity: int, max_staged: int) -> RingWriter:
    w = RingWriter.create(name, TICK_DTYPE, capacity, symbols=SYMBOLS)
    w.configure_staging("publish_time_ns", max_staged)
    return w


def test_stages_the_next_id_into_the_ring_and_declines_the_rest(fastagg: Any,
                                                               shm_name: str) -> None:
    w = make_writer(shm_name, 16, 4)
    shell = Shell()
    fast, how = fastpath.build("on", SYMBOLS, w, shell, 1 << 20)
    try:
        assert how == "compiled aggTrade path"
        conn = Conn()
        fast.on_message(conn, frame(a=100), 1)  # disarmed: the shell decides
        assert shell.calls == [(0, 1)]
        assert w.staged == 0
        assert fast.last_id(0) is None
        fast.set_last(0, 99)
        fast.on_message(conn, frame(a=100), 2)  # no loop iteration open: the shell commits
        assert shell.calls[-1] == (2, 2)
        assert w.staged == 1
        assert conn.last_ns == 2
        w.commit(555)
        fast.iter_open = 1
        for k in range(101, 104):  # staged silently until the batch (4) is full
            fast.on_message(conn, frame(a=k), k)
        assert len(shell.calls) == 2
        assert w.staged == 3
        fast.on_message(conn, frame(a=104), 104)
        assert shell.calls[-1] == (2, 104)
        assert w.staged == 4
        fast.on_message(conn, frame(a=105), 105)  # batch still uncommitted: not taken
        assert shell.calls[-1] == (0, 105)
        assert w.staged == 4
        w.commit(666)
        fast.on_message(conn, frame(a=104), 106)  # duplicate: the shell's tracker decides
        fast.on_message(conn, frame(a=107), 107)  # gap: likewise
        assert [c for c, _ in shell.calls[-2:]] == [0, 0]
        assert fast.last_id(0) == 104
        assert fast.frames == 5
        conn.first_pending = True
        fast.on_message(conn, frame(a=105), 108)
        assert shell.calls[-1] == (2, 108)  # the connection's first frame: the shell is told
        w.commit(777)
        with RingReader.attach(shm_name, start="oldest") as rd:
            r = rd.poll()
        assert r["trade_id"].tolist() == [100, 101, 102, 103, 104, 105]
        assert r["publish_time_ns"].tolist() == [555, 666, 666, 666, 666, 777]
        assert r["recv_time_ns"].tolist() == [2, 101, 102, 103, 104, 108]
        ref = parser(fastagg, SYMBOLS).parse(frame(a=101), 101)[2]
        got = r[1:2].copy()
        got["publish_time_ns"] = 0
        assert got.tobytes() == ref
        fast.set_last(0, None)
        fast.on_message(conn, frame(a=106), 109)
        assert shell.calls[-1] == (0, 109)
    finally:
        fast.close()
        w.close()


def test_wraps_around_the_ring_and_interleaves_with_python_publishes(fastagg: Any,
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
            if w.staged >= 2:
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


def test_close_releases_the_ring(fastagg: Any, shm_name: str) -> None:
    w = make_writer(shm_name, 8, 4)
    fast, _ = fastpath.build("on", SYMBOLS, w, Shell(), 1 << 20)
    fast.close()
    fast.close()  # idempotent
    w.close()  # would raise BufferError if the fast path still held the buffers
    with pytest.raises(RuntimeError, match="no ring writer"):
        fast.on_message(Conn(), frame(), 1)


def test_build_modes(fastagg: Any, shm_name: str) -> None:
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


def test_microsecond_event_times_match_the_python_decoders(fastagg: Any) -> None:
    """timeUnit=MICROSECOND: E is in microseconds, records still carry ns (both paths)."""
    f = frame(e_ms=1768627409826123)  # microseconds on such a connection
    us = fastagg.AggFastPath(fastpath.agg_routes(SYMBOLS), 2, time_mult=1_000)
    got = us.parse(f, 7)
    assert got is not None
    for name in ("orjson", "msgspec"):
        tag, val = st.make_decoder(name, SYMBOLS, time_unit="MICROSECOND").decode(f, 7)
        assert tag == st.AGG
        assert got[2] == np.array([(*val, 0)], TICK_DTYPE).tobytes()
    assert np.frombuffer(got[2], TICK_DTYPE)[0]["event_time_ns"] == 1768627409826123000
    # a millisecond-path instance declines it: E * 1e6 would not fit in int64
    assert parser(fastagg, SYMBOLS).parse(f, 7) is None
    with pytest.raises(ValueError, match="time_mult"):
        fastagg.AggFastPath(fastpath.agg_routes(SYMBOLS), 2, time_mult=0)
