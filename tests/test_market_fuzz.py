"""Arbitrary JSON values in every market field the decoders read (issue 11): no exception escapes
a decoder or the ingest frame handler (compiled path and pure Python), nothing out of range
becomes a record, and every frame ends as a record, a counted skip, a counted duplicate or a
counted held-aside id. The handler runs in-process on a real ring."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.binance import streams as S
from tests.ingesthelpers import inproc_ingest

SYMS = ["BTCUSDT", "ETHUSDT"]
I64 = (1 << 63) - 1

#: stream suffix -> (the fields the decoders read, a valid payload to mutate)
KINDS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "aggTrade": (("E", "a", "p", "q", "l", "m"),
                 {"e": "aggTrade", "E": 1768627409826, "s": "BTCUSDT", "a": 7, "p": "1.5",
                  "q": "2.5", "f": 1, "l": 3, "T": 1768627409825, "m": True, "M": True}),
    "trade": (("E", "t", "p", "q", "m"),
              {"e": "trade", "E": 1768627409826, "s": "BTCUSDT", "t": 7, "p": "1.5", "q": "2.5",
               "T": 1768627409825, "m": False, "M": True}),
    "bookTicker": (("u", "b", "B", "a", "A"),
                   {"u": 7, "s": "BTCUSDT", "b": "1.5", "B": "2.5", "a": "1.6", "A": "3.5"}),
    "depth": (("E", "U", "u", "b", "a"),
              {"e": "depthUpdate", "E": 1768627409826, "s": "BTCUSDT", "U": 5, "u": 7,
               "b": [["1.5", "2.5"]], "a": [["1.6", "0"]]}),
    "depth5": (("lastUpdateId", "bids", "asks"),
               {"lastUpdateId": 7, "bids": [["1.5", "2.5"]], "asks": [["1.6", "3.5"]]}),
}
MISSING = object()

scalars = (st.none() | st.booleans()
           | st.integers(min_value=-(1 << 70), max_value=1 << 70)
           | st.sampled_from([0, -1, I64, I64 + 1, 1 << 64, 10**18, 10**17, -(1 << 63)])
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12)
           | st.sampled_from(["1e999", "-1", "NaN", "inf", "0x10", "1_0", " 1", "", "9" * 40]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=8)


@st.composite
def hostile(draw: st.DrawFn) -> tuple[str, str, Any]:
    kind = draw(st.sampled_from(sorted(KINDS)))
    field = draw(st.sampled_from(KINDS[kind][0]))
    value = draw(values | st.just(MISSING))
    return kind, field, value


def frame(kind: str, payload: dict[str, Any]) -> bytes:
    return json.dumps({"stream": f"btcusdt@{kind}", "data": payload}).encode()


def mutate(kind: str, field: str, value: Any, **ids: int) -> dict[str, Any]:
    d = dict(KINDS[kind][1], **ids)
    if value is MISSING:
        del d[field]
    else:
        d[field] = value
    return d


def check_result(tag: int, val: Any) -> None:
    """A decode result is a counted skip or a record that fits the ring."""
    if tag == S.SKIP:
        assert val in S.SKIP_REASONS
        return
    assert tag in (S.AGG, S.TRADE, S.BOOK_TICKER, S.DEPTH_DIFF, S.DEPTH_PARTIAL), (tag, val)
    if tag in (S.AGG, S.TRADE, S.BOOK_TICKER):
        for x in val[5:11]:
            assert 0.0 <= x < math.inf
        for x in val[11:15]:
            assert type(x) is int
            assert 0 <= x <= I64
        import struct

        struct.pack("<BBHHHddddddqqqqq", *val, 0)  # packs like the ring would
    elif tag == S.DEPTH_DIFF:
        assert 0 <= val.first_id <= val.last_id <= I64
        assert 0 <= val.event_time_ns <= I64
    else:
        assert 0 <= val.last_update_id <= I64


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile())
def test_decoders_never_raise_and_never_build_an_unpackable_record(case: tuple[str, str, Any]
                                                                  ) -> None:
    kind, field, value = case
    raw = frame(kind, mutate(kind, field, value))
    for name in S.DECODERS:
        for unit in S.TIME_UNITS:
            tag, val = S.make_decoder(name, SYMS, time_unit=unit).decode(raw, 1)
            check_result(tag, val)


@pytest.fixture(params=["auto", "off"])
def handler(request: pytest.FixtureRequest, shm_name: str) -> Iterator[Any]:
    """An ingest frame handler on a real ring (the compiled path too when built)."""
    with inproc_ingest(shm_name, SYMS, 1 << 14,
                       streams=["aggTrade", "trade", "bookTicker", "depth", "depth5"],
                       fast_path=request.param, publish_batch=1) as ing:
        yield ing


class _Conn:
    last_ns = 0
    first_pending = False
    shutdown_requested = False


def last_id(ing: Any, kind: int) -> int | None:
    """The last aggTrade (1) / trade (2) id published for BTCUSDT, by either path."""
    if ing.fast is not None:
        last = ing.fast.last_id(0, kind)
        if last is not None:
            return int(last)
    return (ing.trackers[0] if kind == 1 else ing.trade_trackers[0]).last  # type: ignore[no-any-return]


def accounted(ing: Any) -> int:
    """Everything a frame can become, summed: a record, a counted skip / duplicate, an id held
    aside (far, or early behind a hole)."""
    ing.flush_metrics()
    trackers = (*ing.trackers, *ing.trade_trackers)
    return (ing.ring.cursor + ing.ring.staged + sum(ing.skipped.values()) + ing.c["duplicates"]
            + sum(t.stats.far_ids + len(t.pending) for t in trackers) + ing.book_far_seen
            + ing.depth.partial_far_seen)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=hostile(), step=st.integers(min_value=1, max_value=3))
def test_ingest_handler_survives_any_field_value_and_keeps_the_symbol(handler: Any,
                                                                      case: tuple[str, str, Any],
                                                                      step: int) -> None:
    ing = handler
    kind, field, value = case
    conn = _Conn()
    # the real stream goes on after the hostile frame: ids continue from what was published
    nxt = (last_id(ing, 2 if kind == "trade" else 1) or 0) + 1
    bu = max(ing.last_book_u[0], 0) + 1
    ids = {"aggTrade": {"a": nxt}, "trade": {"t": nxt}, "bookTicker": {"u": bu},
           "depth": {"U": bu, "u": bu}, "depth5": {"lastUpdateId": bu}}[kind]
    before = accounted(ing)
    ing.on_frame(conn, frame(kind, mutate(kind, field, value, **ids)), 1)
    if kind != "depth":  # a diff may only be buffered for a snapshot that never comes here
        assert accounted(ing) > before, "a frame vanished without a count"
    assert ing.c["callback_errors"] == 0
    if kind in ("aggTrade", "trade"):
        key = "a" if kind == "aggTrade" else "t"
        for i in range(step * 20):
            ing.on_frame(conn, frame(kind, dict(KINDS[kind][1], **{key: nxt + i})), 2)
        last = last_id(ing, 1 if kind == "aggTrade" else 2)
        assert last is not None
        assert last >= nxt + step * 20 - 1, "the symbol went silent"
    assert ing.c["callback_errors"] == 0


def test_partial_depth_far_id_is_held_and_the_stream_goes_on(handler: Any) -> None:
    """A depth<N> frame with lastUpdateId 10**17 used to make every later snapshot a
    "duplicate"; now it is held aside (counted) and the real ones keep coming."""
    ing = handler
    conn = _Conn()
    for lid in (10, 10**17, 11, 12):
        ing.on_frame(conn, frame("depth5", dict(KINDS["depth5"][1], lastUpdateId=lid)), 1)
    assert ing.depth.last_partial[0] == 12
    assert ing.depth.partial_far_seen == 1
    from pipeline.ipc.records import Kind
    from pipeline.ipc.ring import RingReader

    with RingReader.attach(ing.ring.name, start="oldest") as rd:
        r = rd.poll()
    tops = r[r["kind"] == Kind.DEPTH_TOP]["trade_id"].tolist()
    assert tops == [10, 11, 12]
