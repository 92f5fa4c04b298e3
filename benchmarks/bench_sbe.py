"""SBE vs JSON decode, in process (``BENCH_SCALE`` scales the timed runs; smoke: 0.05).

Per event, the pure-Python SBE reference decoder (pipeline/binance/sbe.py), its compiled twin
(pipeline/binance/_sbe.c, column ``sbe-c``: what the ingest uses unless ``--fast-path off``) and the
JSON decoders (msgspec, the hot-path default, and orjson) on the equivalent JSON frames of the same
event: a trade event of 1 and of 5 trades (JSON: one ``@trade`` frame per trade, so 5 frames),
bestBidAsk (JSON: ``bookTicker``), and a diff depth of 10x10 and 100x100 levels (JSON:
``depthUpdate``). Reported: CPU us per event (best of the runs: the machine is shared) and bytes
per event on the wire both ways. Decode only: no ring, no socket (bench_ingest.py has those).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from summary import emit

from pipeline.binance import sbe
from pipeline.binance import streams as st

SCALE = float(os.environ.get("BENCH_SCALE", "1.0"))
SYMBOLS = ["BTCUSDT", "ETHUSDT"]
EV_MS = 1_790_649_901_913
RESULTS: dict[str, dict[str, float]] = {}


# ---- the same events, both encodings (SBE built from the schema with struct, here) -------------
def _sbe(template: int, block: bytes, body: bytes) -> bytes:
    return struct.pack("<HHHH", len(block), template, 1, 0) + block + body + b"\x07BTCUSDT"


def _price(i: int) -> tuple[int, str]:
    m = 8_303_429_000_000 + i * 1_000_000  # 83034.29 + i * 0.01, 8 decimals
    return m, f"{m // 10**8}.{m % 10**8:08d}"


def _qty(i: int) -> tuple[int, str]:
    m = 62_000 + i * 1_013
    return m, f"{m // 10**8}.{m % 10**8:08d}"


def trades_event(n: int) -> tuple[bytes, list[bytes]]:
    rows = [(6_720_857_582 + i, *_price(i), *_qty(i), i % 2) for i in range(n)]
    body = struct.pack("<HI", 25, n) + b"".join(
        struct.pack("<qqqB", t, pm, qm, mk) for t, pm, _, qm, _, mk in rows)
    frame = _sbe(10000, struct.pack("<qqbb", EV_MS * 1000, EV_MS * 1000, -8, -8), body)
    js = [orjson.dumps({"stream": "btcusdt@trade", "data": {
        "e": "trade", "E": EV_MS, "s": "BTCUSDT", "t": t, "p": ps, "q": qs, "T": EV_MS,
        "m": bool(mk), "M": True}}) for t, _, ps, _, qs, mk in rows]
    return frame, js


def best_bid_ask_event() -> tuple[bytes, list[bytes]]:
    (bp, bps), (bq, bqs), (ap, aps), (aq, aqs) = _price(0), _qty(0), _price(1), _qty(1)
    frame = _sbe(10001, struct.pack("<qqbbqqqq", EV_MS * 1000, 400_900_217, -8, -8, bp, bq, ap,
                                    aq), b"")
    js = orjson.dumps({"stream": "btcusdt@bookTicker", "data": {
        "u": 400_900_217, "s": "BTCUSDT", "b": bps, "B": bqs, "a": aps, "A": aqs}})
    return frame, [js]


def depth_event(n: int) -> tuple[bytes, list[bytes]]:
    bids = [(_price(-i), _qty(i)) for i in range(n)]
    asks = [(_price(i + 1), _qty(i)) for i in range(n)]

    def group(levels: list[Any]) -> bytes:
        return struct.pack("<HH", 16, len(levels)) + b"".join(
            struct.pack("<qq", p[0], q[0]) for p, q in levels)

    frame = _sbe(10003, struct.pack("<qqqbb", EV_MS * 1000, 100, 160, -8, -8),
                 group(bids) + group(asks))
    js = orjson.dumps({"stream": "btcusdt@depth@100ms", "data": {
        "e": "depthUpdate", "E": EV_MS, "s": "BTCUSDT", "U": 100, "u": 160,
        "b": [[p[1], q[1]] for p, q in bids], "a": [[p[1], q[1]] for p, q in asks]}})
    return frame, [js]


EVENTS: dict[str, Callable[[], tuple[bytes, list[bytes]]]] = {
    "trade x1": lambda: trades_event(1),
    "trade x5": lambda: trades_event(5),
    "bestBidAsk / bookTicker": best_bid_ask_event,
    "depth diff 10x10": lambda: depth_event(10),
    "depth diff 100x100": lambda: depth_event(100),
}
WANT_TAG = {"trade x1": (sbe.TRADES, st.TRADE), "trade x5": (sbe.TRADES, st.TRADE),
            "bestBidAsk / bookTicker": (st.BOOK_TICKER, st.BOOK_TICKER),
            "depth diff 10x10": (st.DEPTH_DIFF, st.DEPTH_DIFF),
            "depth diff 100x100": (st.DEPTH_DIFF, st.DEPTH_DIFF)}


def cpu_us_per_event(fn: Callable[[], None], events_per_run: int, runs: int) -> float:
    """CPU us per event: the best run (the machine is shared; the minimum is the stable one)."""
    best = float("inf")
    for _ in range(runs):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best / events_per_run * 1e6


@pytest.mark.parametrize("decoder", ["sbe", "sbe-c", "msgspec", "orjson"])
@pytest.mark.parametrize("event", list(EVENTS))
def test_decode_event(benchmark: Any, event: str, decoder: str) -> None:
    sbe_frame, json_frames = EVENTS[event]()
    n = 200
    if decoder in ("sbe", "sbe-c"):
        if decoder == "sbe-c" and sbe.load_compiled()[0] is None:
            pytest.skip(f"SKIPPED LOUDLY: {sbe.load_compiled()[1]}")
        dec: Any = (sbe.SbeDecoder(SYMBOLS) if decoder == "sbe"
                    else sbe.make_decoder(SYMBOLS, mode="on")[0])
        frames = [sbe_frame] * n
        want = WANT_TAG[event][0]
    else:
        dec = st.make_decoder(decoder, SYMBOLS)
        frames = json_frames * n  # one SBE event is len(json_frames) JSON frames
        want = WANT_TAG[event][1]
    out: list[Any] = []

    def run() -> None:
        out.clear()
        d = dec.decode
        for f in frames:
            out.append(d(f, 1))

    benchmark(run)
    assert {t for t, _ in out} == {want}
    if decoder == "sbe-c":  # exactly the reference's result
        assert out[0] == sbe.SbeDecoder(SYMBOLS).decode(sbe_frame, 1)
    if decoder in ("sbe", "sbe-c"):  # the same values as the JSON path
        ref = [v for _, v in (st.make_decoder("orjson", SYMBOLS).decode(f, 1)
                              for f in json_frames)]
        got = out[0][1]
        if want == st.BOOK_TICKER:
            assert got[:13] == ref[0][:13]
        elif want == sbe.TRADES:
            assert got == ref
        else:
            assert (got.bids, got.asks, got.first_id, got.last_id) == (
                ref[0].bids, ref[0].asks, ref[0].first_id, ref[0].last_id)
    row = RESULTS.setdefault(event, {})
    row[f"{decoder}_us"] = cpu_us_per_event(run, n, max(3, int(50 * SCALE)))
    row["sbe_bytes"] = len(sbe_frame)
    row["json_bytes"] = sum(map(len, json_frames))


@pytest.fixture(scope="module", autouse=True)
def _sbe_report() -> Iterator[None]:
    """Hand the side-by-side table to the end-of-run summary after the module's last case."""
    yield
    if not RESULTS:
        return
    nan = float("nan")
    lines = ["", "SBE vs JSON decode (CPU us per event, in process; bytes per event on the wire;"
                 " JSON trade x5 = 5 frames)",
             f"{'event':26} {'sbe us':>8} {'sbe-c us':>9} {'msgspec us':>11} {'orjson us':>10} "
             f"{'sbe B':>7} {'json B':>7} {'json/sbe':>9}"]
    for name, r in RESULTS.items():
        lines.append(f"{name:26} {r.get('sbe_us', nan):>8.2f} {r.get('sbe-c_us', nan):>9.2f} "
                     f"{r.get('msgspec_us', nan):>11.2f} "
                     f"{r.get('orjson_us', nan):>10.2f} {r['sbe_bytes']:>7.0f} "
                     f"{r['json_bytes']:>7.0f} {r['json_bytes'] / r['sbe_bytes']:>9.2f}")
    emit("\n".join(lines))
