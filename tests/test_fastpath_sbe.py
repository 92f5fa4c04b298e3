"""The compiled SBE entry of the fast path (``TickFastPath.on_sbe_message``, issue #18).

Its one safety property, as for the JSON entry: whatever SBE frame it takes, the ring ends up
with exactly the bytes (publish_time_ns aside) the Python path (``Ingest.handle_sbe`` with the
reference decoder, ``--fast-path off``) would have published, the same skip and duplicate
counters, and the same per-symbol id state; everything else goes to the Python path untouched.
Checked by feeding one sequence of frames to two real ingests on real rings, one with the fast
path and one without, on hand-made streams and hypothesis-generated ones (hostile frames, first
frames, duplicates, gaps, far ids, other exponents, huge mantissas, other versions), and with
JSON @trade / bookTicker frames of the same symbols interleaved (one id sequence for both).

The frames are built by tests/test_sbe_decode.py's builders (spelled out from the schema and
checked against it there); the simulator's own encoder (pipeline/sim/sbe_encode.py) supplies a
second, independent source of well-formed frames.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as hs

from pipeline.binance import sbe
from pipeline.ipc.records import TICK_DTYPE, Kind
from pipeline.ipc.ring import RingReader
from pipeline.marketdata import fastpath
from tests.ingesthelpers import inproc_ingest
from tests.test_sbe_decode import bba_frame, diff_frame, message, trades_frame

SYMS = ["BTCUSDT", "ETHUSDT"]
WIRE = [s.encode() for s in SYMS]
EV_US = 1_700_000_000_000_000
ALLOW_PURE = os.environ.get("PIPELINE_ALLOW_PURE_PYTHON") == "1"


@pytest.fixture(scope="module", autouse=True)
def ticks() -> Any:
    mod, why = fastpath.load()
    if mod is None:
        if ALLOW_PURE:
            pytest.skip(f"PIPELINE_ALLOW_PURE_PYTHON=1 and {why}")
        pytest.fail(f"the compiled fast path is not available: {why}. `make test` builds it.")
    return mod


class _Conn:
    """What the handlers read of a connection (no socket: frames are handed in directly)."""

    def __init__(self, sbe_conn: bool = True) -> None:
        self.sbe = sbe_conn
        self.last_ns = 0
        self.first_pending = False
        self.shutdown_requested = False

    def got_first(self) -> None:
        self.first_pending = False


@contextmanager
def ingest(name: str, fast_path: str, *, id_resync_after: int = 16,
           max_id_jump: int = 5_000_000) -> Iterator[Any]:
    """An Ingest on a real shared-memory ring, set up as the process does (setup_publishing),
    with JSON @trade / bookTicker and SBE trade / bestBidAsk connections' handlers."""
    with inproc_ingest(name, SYMS, streams=["aggTrade"],
                       sbe_streams=["trade", "bestBidAsk", "depth"], sbe_api_key_env="SBE_KEY",
                       publish_batch=1, fast_path=fast_path, id_resync_after=id_resync_after,
                       max_id_jump=max_id_jump) as ing:
        yield ing


def ring_records(name: str) -> np.ndarray:
    """Everything in the ring, publish_time_ns zeroed (the one field the paths may differ in)."""
    with RingReader.attach(name, start="oldest") as rd:
        recs = rd.poll().copy()
    recs["publish_time_ns"] = 0
    return recs


def state(ing: Any) -> dict[str, Any]:
    """What the two paths must agree on besides the ring (read after release(): the compiled
    path's last ids are then the trackers' again)."""
    from pipeline.marketdata.ingest_metrics import metric_values

    vals = metric_values(ing)
    return {"counters": {k: v for k, v in ing.c.items() if k != "frames_received"},
            "frames": vals["frames_received"], "skipped": dict(ing.skipped),
            "other_version": ing.sbe_decoder.other_version_frames,
            "trade_last": [t.last for t in ing.trade_trackers],
            "trade_pending": [sorted(t.pending) for t in ing.trade_trackers],
            "book_last": list(ing.last_book_u),
            "book_far": [len(f.held) for f in ing.book_far]}


def run_both(shm_name: str, feed: list[tuple[str, Any]], **kw: Any) -> tuple[int, np.ndarray]:
    """Feed the same frames to an ingest with and one without the fast path; require identical
    ring contents and state. Returns (frames the fast path took, the ring's records).

    ``feed`` items: ("sbe", frame), ("json", frame) on one of two connections each, or
    ("tick", None): the event loop went round (the per-iteration bookkeeping starts again)."""
    results = []
    taken = 0
    for mode in ("on", "off"):
        name = f"{shm_name}_{mode}"
        with ingest(name, mode, **kw) as ing:
            assert (ing.fast is not None) == (mode == "on")
            conns = {"sbe": (_Conn(), _Conn()), "json": (_Conn(False), _Conn(False))}
            for i, (kind, frame) in enumerate(feed):
                if kind == "tick":
                    ing._end_iteration()
                    continue
                on = ing.on_sbe_frame if kind == "sbe" else ing.on_frame
                on(conns[kind][i % 2], frame, 1_000 + i)
            if ing.fast is not None:
                taken = ing.fast.frames
            recs = ring_records(name)
            ing.release()
            results.append((recs.tobytes(), state(ing)))
            if mode == "on":
                published = recs
    (fast_recs, fast_state), (ref_recs, ref_state) = results
    assert fast_state == ref_state
    assert fast_recs == ref_recs
    return taken, published


# ---- hand-made streams -----------------------------------------------------------------------


def test_build_gives_the_sbe_entry_and_its_symbols() -> None:
    """The fast path's symbol table is the reference decoder's (same bytes -> same id)."""
    assert fastpath.sbe_symbols(SYMS) == sbe.SbeDecoder(SYMS).sid_by_symbol
    assert fastpath.sbe_symbols(["btcusdt", "x"]) == {b"BTCUSDT": 0, b"X": 1}


def test_a_stream_of_trades_and_best_bid_asks_is_taken_and_identical(shm_name: str) -> None:
    feed: list[tuple[str, Any]] = []
    tid = {0: 100, 1: 7}
    u = {0: 50, 1: 9}
    for k in range(40):
        sid = k % 2
        if k % 3:
            n = 1 + k % 4
            trades = [(tid[sid] + j, 6_000_000_000_000 + 37 * k + j, 12_345 + j, (k + j) % 2)
                      for j in range(n)]
            tid[sid] += n
            feed.append(("sbe", trades_frame(EV_US + k, trades, sym=WIRE[sid])))
        else:
            u[sid] += 1 + k % 5  # bestBidAsk is culled: skipped ids are normal
            feed.append(("sbe", bba_frame(EV_US + k, u[sid], 6_000_000_000_000 + k, 3_000,
                                          6_000_000_100_000 + k, 4_000, sym=WIRE[sid])))
        if k % 7 == 0:
            feed.append(("tick", None))
    taken, recs = run_both(shm_name, feed)
    # all but each symbol's first trades event and first bestBidAsk (nothing armed yet)
    assert taken == 40 - 4
    assert len(recs) == sum(1 + k % 4 if k % 3 else 1 for k in range(40))


def test_records_carry_what_the_python_decoder_gives(shm_name: str) -> None:
    """Flags, times in ns (us * 1000), the receive time, prices by exact division."""
    feed: list[tuple[str, Any]] = [
        ("sbe", trades_frame(EV_US, [(1, 1, 1, 0)])),
        ("sbe", trades_frame(EV_US + 7, [(2, 9_531_164_000_000, 84_000, 1),
                                         (3, 9_531_164_000_001, 1, 0)])),
        ("sbe", bba_frame(EV_US, 5, 1, 1, 1, 1)),
        ("sbe", bba_frame(EV_US + 9, 6, 123_456_789, 2, 123_456_790, 3, pexp=-3, qexp=-1)),
    ]
    taken, recs = run_both(shm_name, feed)
    assert taken == 2
    t2, t3, b6 = recs[1], recs[2], recs[4]
    assert (t2["kind"], t2["flags"], t2["trade_id"], t2["price"], t2["qty"]) == (
        Kind.TRADE, 1, 2, 95311.64, 0.00084)
    assert t2["event_time_ns"] == (EV_US + 7) * 1000
    assert t2["recv_time_ns"] == 1001
    assert (t3["flags"], t3["price"]) == (0, 9_531_164_000_001 / 10**8)
    assert (b6["kind"], b6["trade_id"], b6["bid_price"], b6["ask_qty"]) == (
        Kind.BOOK_TICKER, 6, 123456.789, 0.3)
    assert b6["event_time_ns"] == (EV_US + 9) * 1000


def test_parse_sbe_matches_the_reference_decoder_on_the_simulators_frames() -> None:
    """The simulator's encoder (written from the schema, sharing no code with either decoder)
    as a second source of frames: what parse_sbe takes, it decodes as SbeDecoder does."""
    from pipeline.sim import sbe_encode

    ticks_mod, _ = fastpath.load()
    p = ticks_mod.TickFastPath(fastpath.routes(SYMS), 2, sbe_symbols=fastpath.sbe_symbols(SYMS))
    ref = sbe.SbeDecoder(SYMS)
    # amounts in the simulator's 1e-8 units; exponents as it picks them from tick/step sizes
    frames = [
        sbe_encode.encode_trades("ETHUSDT", EV_US, EV_US - 3,
                                 [(11, 300_001_000_000, 12_345_000, True),
                                  (12, 300_002_000_000, 100_000_000, False)], -2, -5),
        sbe_encode.encode_trades("BTCUSDT", EV_US, EV_US, [(5, 6_000_001_000_000, 7, False)],
                                 -2, -8),
        sbe_encode.encode_trades("BTCUSDT", EV_US, EV_US, [(5, 6_000_000_000_000, 300_000_000,
                                                            False)], -2, 0),  # step size 1
        sbe_encode.encode_best_bid_ask("BTCUSDT", EV_US, 77, (6_000_001_000_000, 5,
                                                              6_000_002_000_000, 7), -2, -8),
    ]
    for frame in frames + _builder_frames():
        got = p.parse_sbe(frame, 5)
        tag, val = ref.decode(frame, 5)
        assert got is not None, frame.hex()
        expect = val if tag == sbe.TRADES else [val]
        assert got[3] == np.array([(*r, 0) for r in expect], TICK_DTYPE).tobytes()
        assert got[2] == expect[0][11]


def _builder_frames() -> list[bytes]:
    return [trades_frame(EV_US, [(1, 2, 3, 1)], sym=b"ETHUSDT", pexp=-18, qexp=-1),
            trades_frame(0, [(0, 0, 0, 0), (1, 1 << 53, 1 << 53, 1)]),
            bba_frame(sbe._MAX_US, (1 << 63) - 1, 0, 0, 1 << 53, 1 << 53)]


@pytest.mark.parametrize(("what", "frame"), [
    ("version 1 (longer block)", trades_frame(EV_US, [(5, 1, 1, 0)], version=1,
                                              extra_block=b"\0" * 4)),
    ("version 1, same layout", bba_frame(EV_US, 5, 1, 1, 1, 1, version=1)),
    ("wrong schema", trades_frame(EV_US, [(5, 1, 1, 0)], schema=2)),
    ("longer entry", trades_frame(EV_US, [(5, 1, 1, 0)], extra_entry=b"\0")),
    ("empty group", trades_frame(EV_US, [])),
    ("non-contiguous group", trades_frame(EV_US, [(5, 1, 1, 0), (7, 1, 1, 0)])),
    ("positive exponent", trades_frame(EV_US, [(5, 1, 1, 0)], pexp=1)),
    ("exponent -19", bba_frame(EV_US, 5, 1, 1, 1, 1, qexp=-19)),
    ("mantissa above 2**53", bba_frame(EV_US, 5, (1 << 53) + 1, 1, 1, 1)),
    ("negative mantissa", trades_frame(EV_US, [(5, 1, -1, 0)])),
    ("maker 2", trades_frame(EV_US, [(5, 1, 1, 2)])),
    ("negative id", trades_frame(EV_US, [(-5, 1, 1, 0)])),
    ("time beyond int64 ns", bba_frame(sbe._MAX_US + 1, 5, 1, 1, 1, 1)),
    ("negative time", trades_frame(-1, [(5, 1, 1, 0)])),
    ("unknown symbol", bba_frame(EV_US, 5, 1, 1, 1, 1, sym=b"XRPUSDT")),
    ("lower-case symbol", bba_frame(EV_US, 5, 1, 1, 1, 1, sym=b"btcusdt")),
    ("trailing byte", bba_frame(EV_US, 5, 1, 1, 1, 1) + b"\0"),
    ("truncated", bba_frame(EV_US, 5, 1, 1, 1, 1)[:-1]),
    ("group overrun", trades_frame(EV_US, [(5, 1, 1, 0)], count=2)),
    ("depth diff", diff_frame(EV_US, 1, 2, [(1, 1)], [])),
    ("unknown template", message(10004, b"\0" * 18, b"")),
    ("header only", message(10000, b"", b"")),
])
def test_declines_what_it_does_not_take_exactly_as_python_would(what: str, frame: bytes) -> None:
    """parse_sbe declines it (so on_sbe_message hands it to Python whatever the id state)."""
    ticks_mod, _ = fastpath.load()
    p = ticks_mod.TickFastPath(fastpath.routes(SYMS), 2, sbe_symbols=fastpath.sbe_symbols(SYMS))
    assert p.parse_sbe(frame, 1) is None, what


def test_a_group_is_taken_whole_or_not_at_all(shm_name: str) -> None:
    """A group that starts before the next id (a reconnect's overlap) or contains a hole goes
    to Python entirely: its tracker drops the duplicates and holds what follows a hole."""
    feed: list[tuple[str, Any]] = [
        ("sbe", trades_frame(EV_US, [(10, 1, 1, 0)])),          # first: Python, arms
        ("sbe", trades_frame(EV_US, [(11, 1, 1, 0), (12, 1, 1, 0)])),  # taken
        ("sbe", trades_frame(EV_US, [(12, 1, 1, 0), (13, 1, 1, 0)])),  # overlap: Python
        ("sbe", trades_frame(EV_US, [(14, 1, 1, 0), (16, 1, 1, 0)])),  # hole inside: Python
        ("sbe", trades_frame(EV_US, [(15, 1, 1, 0)])),          # fills it: Python
        ("sbe", trades_frame(EV_US, [(17, 1, 1, 0), (18, 1, 1, 0)])),  # armed again: taken
        ("sbe", trades_frame(EV_US, [(18, 1, 1, 0)])),          # duplicate: Python
    ]
    taken, recs = run_both(shm_name, feed)
    assert taken == 2
    assert recs["trade_id"].tolist() == list(range(10, 19))
    assert len(recs) == 9


def test_far_trade_ids_held_aside_are_forgotten_alike_on_both_paths(shm_name: str) -> None:
    """A far id held aside is forgotten when the next id arrives. With ids held, the compiled
    lane stays disarmed so that id reaches the tracker: otherwise the far run would keep
    growing on one path only and re-base the stream there (3 far ids here) but not on the
    other."""
    far = 10**6
    feed: list[tuple[str, Any]] = [
        ("sbe", trades_frame(EV_US, [(t, 1, 1, 0)])) for t in (10, 11, far, 12, far + 1,
                                                               far + 2, 13, 14)]
    taken, recs = run_both(shm_name, feed, max_id_jump=1_000, id_resync_after=3)
    assert recs["trade_id"].tolist() == [10, 11, 12, 13, 14]  # no re-base on the far ids
    assert taken == 2  # 11, and 14 once nothing is held any more


def test_far_and_duplicate_best_bid_ask_ids_go_to_python(shm_name: str) -> None:
    feed: list[tuple[str, Any]] = [("sbe", bba_frame(EV_US, u, 1, 1, 1, 1)) for u in
                                   (100, 101, 101, 99, 1100, 1101, 10**12, 1102, 10**12 + 1)]
    taken, recs = run_both(shm_name, feed, max_id_jump=1_000)
    # 101, 1100 (exactly max_id_jump newer), 1101, 1102 (the far ones are held aside)
    assert taken == 4
    assert recs["trade_id"].tolist() == [100, 101, 1100, 1101, 1102]


def test_the_fast_path_tells_python_of_each_connection_once_per_iteration(
        shm_name: str) -> None:
    """As on_message: the first frame of a connection in a loop iteration reaches the shell
    (its last frame time, its first message), the rest do not."""
    with ingest(shm_name, "on") as ing:
        assert ing.on_sbe_frame == ing.fast.on_sbe_message  # what SBE connections are given
        a, b = _Conn(), _Conn()
        b.first_pending = True
        seen: list[int] = []
        real = ing._fast_fallback
        ing._fast_fallback = lambda c, p, r, code: (seen.append(r), real(c, p, r, code))
        on = ing.on_sbe_frame
        on(a, trades_frame(EV_US, [(1, 1, 1, 0)]), 10)  # Python: arms
        on(a, trades_frame(EV_US, [(2, 1, 1, 0)]), 11)  # taken: a is told (no iteration open)
        on(a, trades_frame(EV_US, [(3, 1, 1, 0)]), 12)  # taken, silently
        on(b, trades_frame(EV_US, [(4, 1, 1, 0)]), 13)  # taken: b's first, told
        assert seen == [11, 13]
        assert (a.last_ns, b.last_ns, b.first_pending) == (11, 13, False)
        ing._end_iteration()
        on(a, trades_frame(EV_US, [(5, 1, 1, 0)]), 14)
        assert seen == [11, 13, 14]
        assert ing.fast.frames == 4
        assert ing.c["frames_received"] == 1  # the one frame Python decoded


# ---- JSON and SBE of the same symbols: one id sequence ----------------------------------------


def json_trade(sym: str, t: int) -> bytes:
    return (f'{{"stream":"{sym.lower()}@trade","data":{{"e":"trade","E":1768627409826,'
            f'"s":"{sym}","t":{t},"p":"95311.64000000","q":"0.00084000","T":1768627409825,'
            f'"m":true,"M":true}}}}').encode()


def json_book(sym: str, u: int) -> bytes:
    return (f'{{"stream":"{sym.lower()}@bookTicker","data":{{"u":{u},"s":"{sym}","b":"1.5",'
            f'"B":"2.0","a":"1.6","A":"3"}}}}').encode()


def test_json_and_sbe_frames_of_one_symbol_keep_one_id_sequence(shm_name: str) -> None:
    """A JSON @trade and an SBE trade stream of the same symbol (a migration, or both running
    during a rotation): each id is published once, in order, whichever path and format carried
    it; bookTicker and bestBidAsk share one newest-u dedupe likewise."""
    feed: list[tuple[str, Any]] = []
    t, u = 1, 1
    for k in range(30):
        if k % 2:
            feed.append(("json", json_trade("BTCUSDT", t)))
            feed.append(("sbe", trades_frame(EV_US, [(t, 1, 1, 1), (t + 1, 2, 2, 0)])))
            feed.append(("json", json_trade("BTCUSDT", t + 1)))  # duplicate of the SBE one
            t += 2
            feed.append(("json", json_book("BTCUSDT", u)))
        else:
            feed.append(("sbe", trades_frame(EV_US, [(t, 1, 1, 0)])))
            feed.append(("json", json_trade("BTCUSDT", t)))  # duplicate
            feed.append(("json", json_trade("BTCUSDT", t + 1)))
            t += 2
            feed.append(("sbe", bba_frame(EV_US, u, 1, 1, 1, 1)))
            feed.append(("json", json_book("BTCUSDT", u)))  # duplicate
        u += 1
        if k % 4 == 0:
            feed.append(("tick", None))
    taken, recs = run_both(shm_name, feed)
    assert taken > 20
    trades = recs[recs["kind"] == Kind.TRADE]["trade_id"].tolist()
    books = recs[recs["kind"] == Kind.BOOK_TICKER]["trade_id"].tolist()
    assert trades == list(range(1, t))
    assert books == list(range(1, u))


# ---- fuzzing: the two paths on generated streams ----------------------------------------------


@hs.composite
def sbe_feed(draw: Any) -> list[tuple[str, Any]]:
    """Streams that mostly continue each symbol's ids (so the fast path takes a good share),
    with every way off the common case mixed in."""
    feed: list[tuple[str, Any]] = []
    nxt = [draw(hs.integers(0, 5)), draw(hs.integers(0, 5))]
    u = [draw(hs.integers(0, 5)), draw(hs.integers(0, 5))]
    for _ in range(draw(hs.integers(1, 30))):
        sid = draw(hs.integers(0, 1))
        op = draw(hs.sampled_from(["trades"] * 6 + ["bba"] * 4 + ["tick", "json", "mutant",
                                                                  "junk", "text"]))
        if op == "tick":
            feed.append(("tick", None))
            continue
        if op == "junk":
            feed.append(("sbe", draw(hs.binary(max_size=80))))
            continue
        if op == "text":
            feed.append(("sbe", '{"result":null,"id":7}'))
            continue
        if op == "json":
            if draw(hs.booleans()):
                feed.append(("json", json_trade(SYMS[sid], nxt[sid])))
                nxt[sid] += 1
            else:
                feed.append(("json", json_book(SYMS[sid], u[sid])))
                u[sid] += 1
            continue
        # most frames are the common case, the rest off it in one or more ways
        odd = draw(hs.integers(0, 9)) < 4

        def pick(good: list[Any], bad: list[Any], odd: bool = odd) -> Any:
            return draw(hs.sampled_from(good + bad if odd else good))

        pexp = pick([-8, -2, -1], [-18, 0, 2, -19, 19])
        qexp = pick([-8, -5], [-1, -18, 0, -22])
        mant = hs.integers(0, 10**12) if not odd else hs.one_of(
            hs.integers(0, 10**12), hs.sampled_from(
                [0, (1 << 53) - 1, 1 << 53, (1 << 53) + 1, (1 << 63) - 1, -1, -(1 << 63)]))
        kw: dict[str, Any] = {}
        if odd and draw(hs.integers(0, 4)) == 0:
            kw["version"] = draw(hs.sampled_from([1, 2]))
            if draw(hs.booleans()):
                kw["extra_block"] = b"\0" * draw(hs.integers(1, 9))
        if odd and draw(hs.integers(0, 9)) == 0:
            kw["schema"] = 2
        ev_us = pick([EV_US], [0, sbe._MAX_US, sbe._MAX_US + 1, -1])
        sym = pick([WIRE[sid]], [b"XRPUSDT", b"", b"\xff\xfe", WIRE[sid].lower()])
        if op == "trades":
            jump = pick([0], [-1, -3, 1, 2, 10**9, 10**15])
            first = max(0, nxt[sid] + jump) if jump < 10**9 else jump
            n = draw(hs.integers(1, 4)) if not odd else draw(hs.integers(0, 4))
            ids = [first + j for j in range(n)]
            if odd and n > 1 and draw(hs.booleans()):  # a hole or repeat inside the group
                ids[draw(hs.integers(1, n - 1))] += draw(hs.sampled_from([-1, 1, 2]))
            trades = [(i, draw(mant), draw(mant), pick([0, 1], [2, 255])) for i in ids]
            if jump == 0 and ids:
                nxt[sid] = max(nxt[sid], ids[-1] + 1)
            if odd and draw(hs.integers(0, 5)) == 0:
                kw["extra_entry"] = b"\0" * draw(hs.integers(1, 3))
            frame = trades_frame(ev_us, trades, sym=sym, pexp=pexp, qexp=qexp, **kw)
        else:
            step = pick([1, 3], [0, -1, 10**8, 10**15])
            u[sid] = max(0, u[sid] + step)
            frame = bba_frame(ev_us, u[sid], draw(mant), draw(mant), draw(mant), draw(mant),
                              sym=sym, pexp=pexp, qexp=qexp, **kw)
        if op == "mutant":
            raw = bytearray(frame)
            cut = draw(hs.integers(0, 2))
            if cut == 0:
                raw = raw[:draw(hs.integers(0, len(raw) - 1))]
            elif cut == 1:
                raw[draw(hs.integers(0, len(raw) - 1))] = draw(hs.integers(0, 255))
            else:
                raw += draw(hs.binary(min_size=1, max_size=4))
            frame = bytes(raw)
        feed.append(("sbe", frame))
    return feed


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(feed=sbe_feed())
def test_fuzz_identical_rings_and_counters_with_and_without_the_fast_path(
        shm_name: str, feed: list[tuple[str, Any]]) -> None:
    """A small id_resync_after (3), so runs of far ids that re-base the stream happen in the
    feeds: the compiled lane is disarmed while far ids are held aside
    (pipeline/marketdata/trade_ids.py), so both paths forget or re-base alike."""
    taken, _ = run_both(shm_name, feed, max_id_jump=10**6, id_resync_after=3)
    event(f"frames the fast path took: {min(taken, 5)}{'+' if taken >= 5 else ''}")


def test_the_fuzz_generator_makes_streams_the_fast_path_takes() -> None:
    """The generator is not degenerate: it makes streams in which the fast path takes frames
    (otherwise the fuzz above would compare the Python path with itself)."""
    ticks_mod, _ = fastpath.load()
    p = ticks_mod.TickFastPath(fastpath.routes(SYMS), 2, sbe_symbols=fastpath.sbe_symbols(SYMS))

    counts: list[int] = []

    @settings(max_examples=50, database=None, derandomize=True, phases=[Phase.generate])
    @given(feed=sbe_feed())
    def takeable(feed: list[tuple[str, Any]]) -> None:
        counts.append(sum(1 for kind, f in feed if kind == "sbe" and isinstance(f, bytes)
                          and p.parse_sbe(f) is not None))

    takeable()
    assert len(counts) == 50
    assert sum(c > 0 for c in counts) > 25  # most streams have frames in the fast path's subset


def test_frames_of_many_trades_are_one_frame_and_publish_in_order(shm_name: str) -> None:
    """A large trades group (one matching event can fill many orders)."""
    n = 300
    big = trades_frame(EV_US, [(2 + j, 10**8 + j, 1 + j, j % 2) for j in range(n)])
    taken, recs = run_both(shm_name, [("sbe", trades_frame(EV_US, [(1, 1, 1, 0)])),
                                      ("sbe", big)])
    assert (taken, len(recs)) == (1, n + 1)



# ---- the real process, over real sockets -----------------------------------------------------


@pytest.mark.slow
def test_the_ingest_process_takes_sbe_frames_in_c_with_the_same_records(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, shm_name: str) -> None:
    """Two ingest processes on one simulator's SBE streams, ``--fast-path on`` and ``off``:
    the compiled entry is what the SBE connections call (frames_fast grows, the log says so),
    and over their common trade ids and update ids both rings hold the same records (receive
    and publish times aside: two processes)."""
    from nacl.signing import SigningKey

    from pipeline.sim.testing import run_sim_process
    from tests.test_ingest_integration import run_ingest

    pub = tmp_path / "pub.hex"
    pub.write_text(SigningKey.generate().verify_key.encode().hex())
    monkeypatch.setenv("PIPELINE_TEST_SBE_KEY", "sbe-ingest-key")
    sbe_args = ("--streams", "aggTrade", "--sbe-streams", "trade,bestBidAsk",
                "--sbe-api-key-env", "PIPELINE_TEST_SBE_KEY")
    with run_sim_process("--api-key", f"sbe-ingest-key={pub}", "--symbols",
                         ",".join(SYMS)) as sim, \
            run_ingest(sim, f"{shm_name}_c", "--sbe-url", sim.sbe_url, *sbe_args,
                       "--fast-path", "on", symbols=SYMS) as fast, \
            run_ingest(sim, f"{shm_name}_py", "--sbe-url", sim.sbe_url, *sbe_args,
                       "--fast-path", "off", symbols=SYMS) as slow:
        def of(ing: Any, kind: Kind) -> np.ndarray:
            r = ing.records()
            return r[(r["kind"] == kind) & (r["symbol"] == 0)]

        def enough() -> bool:
            common = np.intersect1d(of(fast, Kind.TRADE)["trade_id"],
                                    of(slow, Kind.TRADE)["trade_id"])
            return len(common) > 50 and fast.metrics()["frames_fast"] > 50

        fast.wait_for(enough, 60, "50 common trade ids and 50 frames taken in C")
        assert "fast path: compiled (aggTrade, trade, bookTicker; SBE trade, bestBidAsk)" in \
            fast.log_text()
        assert slow.metrics()["frames_fast"] == 0
        for kind in (Kind.TRADE, Kind.BOOK_TICKER):
            a, b = of(fast, kind), of(slow, kind)
            common = np.intersect1d(a["trade_id"], b["trade_id"])
            a = a[np.isin(a["trade_id"], common)]
            b = b[np.isin(b["trade_id"], common)]
            assert len(common) > 0
            assert len(a) == len(b) == len(common)  # each id once in each ring
            for f in ("kind", "flags", "symbol", "price", "qty", "bid_price", "bid_qty",
                      "ask_price", "ask_qty", "trade_id", "aux_id", "event_time_ns"):
                assert np.array_equal(a[f], b[f]), (kind, f)
        assert fast.metrics()["skipped_total"] == slow.metrics()["skipped_total"] == 0
