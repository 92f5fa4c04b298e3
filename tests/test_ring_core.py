"""The ring's pure core over a bytearray: layout, slot protocol, wrap-around and lapping."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.records import TICK_DTYPE
from pipeline.ring import (
    MAGIC,
    ReaderCore,
    RingError,
    RingLayout,
    RingLayoutError,
    WriterCore,
    dtype_from_json,
    dtype_to_json,
    format_header,
    parse_header,
    plan_read,
    struct_for,
    valid_after_copy,
)

SMALL = np.dtype([("seq", "<i8"), ("check", "<u4"), ("tag", "u1")], align=True)


def make_ring(
    capacity: int, dtype: np.dtype = SMALL, symbols: tuple[str, ...] = ()
) -> tuple[bytearray, RingLayout]:
    layout = RingLayout.compute(dtype, capacity, symbols)
    buf = bytearray(layout.total_size)
    format_header(buf, layout, generation=3, writer_pid=1234, epoch_ns=42)
    return buf, layout


def batch(start: int, n: int) -> np.ndarray:
    out = np.zeros(n, SMALL)
    out["seq"] = np.arange(start, start + n)
    out["check"] = (out["seq"] * 2654435761) & 0xFFFFFFFF
    out["tag"] = out["seq"] & 0xFF
    return out


def check_intact(got: np.ndarray) -> None:
    assert np.array_equal(got["check"], (got["seq"] * 2654435761) & 0xFFFFFFFF)
    assert np.array_equal(got["tag"], got["seq"] & 0xFF)


# --- layout and header --------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, 1, 3, 100, -4, 2.0])
def test_capacity_must_be_a_power_of_two(capacity: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        RingLayout.compute(SMALL, capacity)


def test_layout_is_cache_line_aligned_and_header_round_trips() -> None:
    buf, layout = make_ring(8, TICK_DTYPE, ("BTCUSDT", "ETHUSDT"))
    assert bytes(buf[:8]) == MAGIC
    for off in (layout.dtype_off, layout.symbols_off, layout.seqs_off, layout.data_off):
        assert off % 64 == 0
    parsed, symbols = parse_header(buf, "t")
    assert parsed == layout
    assert parsed.dtype == TICK_DTYPE
    assert parsed.record_size == 96
    assert symbols == ["BTCUSDT", "ETHUSDT"]


@pytest.mark.parametrize(
    "dtype",
    [
        TICK_DTYPE,
        SMALL,
        np.dtype("<i8"),
        np.dtype([("a", "u1"), ("b", "<f8", (3,)), ("c", [("x", "<i4"), ("y", "u1")])]),
    ],
)
def test_dtype_description_round_trips(dtype: np.dtype) -> None:
    back = dtype_from_json(dtype_to_json(dtype))
    assert back == dtype
    assert back.itemsize == dtype.itemsize


def test_header_rejects_bad_magic_and_version() -> None:
    buf, _ = make_ring(8)
    foreign = bytearray(b"NOTARING" + bytes(len(buf) - 8))
    with pytest.raises(RingLayoutError, match="'victim' is not a ring"):
        parse_header(foreign, "victim")
    buf[8:16] = (99).to_bytes(8, "little")
    with pytest.raises(RingLayoutError, match="layout version 99"):
        parse_header(buf, "old")
    with pytest.raises(RingLayoutError, match="too small"):
        parse_header(bytearray(10), "tiny")


def test_struct_packing_matches_numpy_bytes() -> None:
    st_ = struct_for(TICK_DTYPE)
    assert st_ is not None
    rec = np.zeros(1, TICK_DTYPE)[0]
    rec["kind"], rec["symbol"], rec["price"], rec["trade_id"] = 3, 7, 101.25, -5
    out = bytearray(96)
    st_.pack_into(out, 0, *rec.tolist())
    assert bytes(out) == rec.tobytes()
    assert struct_for(np.dtype([("a", "<f8", (2,))])) is None  # subarray: numpy fallback


# --- publish and poll -------------------------------------------------------------------------


def test_void_tuple_and_bytes_publish_the_same_record() -> None:
    buf, layout = make_ring(8, TICK_DTYPE)
    w, r = WriterCore(buf, layout), ReaderCore(buf, layout, verify=True)
    rec = np.zeros(1, TICK_DTYPE)[0]
    rec["price"], rec["trade_id"], rec["kind"] = 1.5, 77, 2
    assert w.publish(rec) == 0
    assert w.publish(tuple(rec.tolist())) == 1
    assert w.publish(rec.tobytes()) == 2
    got = r.poll()
    assert len(got) == 3
    assert got.dtype == TICK_DTYPE
    assert all(g.tobytes() == rec.tobytes() for g in got)
    assert got.flags.writeable  # a private copy the consumer may keep or modify
    assert r.poll().size == 0


def test_publish_rejects_wrong_records() -> None:
    buf, layout = make_ring(8, TICK_DTYPE)
    w = WriterCore(buf, layout)
    with pytest.raises(TypeError, match="not the ring dtype"):
        w.publish(np.zeros(1, SMALL)[0])
    with pytest.raises(ValueError, match="96"):
        w.publish(b"short")
    with pytest.raises(TypeError, match="not the ring dtype"):
        w.publish_many(np.zeros(3, SMALL))
    assert w.cursor == 0


def test_batch_wraps_as_two_runs_and_keeps_order() -> None:
    buf, layout = make_ring(8)
    w, r = WriterCore(buf, layout), ReaderCore(buf, layout, verify=True)
    w.publish_many(batch(0, 6))
    assert len(r.poll()) == 6
    w.publish_many(batch(6, 5))  # slots 6, 7, 0, 1, 2
    got = r.poll()
    assert got["seq"].tolist() == [6, 7, 8, 9, 10]
    check_intact(got)
    assert r.missed == 0


def test_batch_larger_than_capacity_keeps_the_tail() -> None:
    buf, layout = make_ring(8)
    w, r = WriterCore(buf, layout), ReaderCore(buf, layout, verify=True)
    assert w.publish_many(batch(0, 21)) == 0
    assert w.cursor == 21
    got = r.poll()
    assert got["seq"].tolist() == list(range(13, 21))
    assert r.missed == 13


def test_reader_start_positions() -> None:
    buf, layout = make_ring(8)
    w = WriterCore(buf, layout)
    w.publish_many(batch(0, 12))
    assert ReaderCore(buf, layout).poll().size == 0  # head: only what comes next
    oldest = ReaderCore(buf, layout, start="oldest")
    assert oldest.poll()["seq"].tolist() == list(range(4, 12))
    assert oldest.missed == 0  # nothing published after it attached was lost
    assert ReaderCore(buf, layout, start=10).poll()["seq"].tolist() == [10, 11]


def test_max_records_limits_a_poll() -> None:
    buf, layout = make_ring(16)
    w, r = WriterCore(buf, layout), ReaderCore(buf, layout)
    w.publish_many(batch(0, 10))
    assert r.lag == 10
    assert r.poll(max_records=4)["seq"].tolist() == [0, 1, 2, 3]
    assert r.lag == 6
    assert r.poll()["seq"].tolist() == list(range(4, 10))


def test_verify_catches_a_slot_holding_the_wrong_sequence() -> None:
    buf, layout = make_ring(8)
    w, r = WriterCore(buf, layout), ReaderCore(buf, layout, verify=True)
    w.publish_many(batch(0, 3))
    seqs = memoryview(buf)[layout.seqs_off : layout.seqs_off + 64].cast("q")
    seqs[1] = 99  # as if a second writer had been here
    with pytest.raises(RingError, match="sequence 1 holds sequence 99"):
        r.poll()


def test_cursor_behind_reader_is_reported_as_corruption() -> None:
    with pytest.raises(RingError, match="behind"):
        plan_read(10, 5, 8, None)


# --- properties: arithmetic -------------------------------------------------------------------


@given(
    pos=st.integers(0, 10_000),
    ahead=st.integers(0, 10_000),
    cap_log=st.integers(1, 12),
    max_records=st.one_of(st.none(), st.integers(1, 5000)),
)
def test_plan_read_matches_the_model(
    pos: int, ahead: int, cap_log: int, max_records: int | None
) -> None:
    cap = 1 << cap_log
    cursor = pos + ahead
    start, count, lapped = plan_read(pos, cursor, cap, max_records)
    alive = set(range(max(0, cursor - cap), cursor))  # sequences still in the ring
    assert start == pos + lapped
    assert lapped == len([s for s in range(pos, cursor) if s not in alive])
    assert set(range(start, start + count)) <= alive
    assert count == min(cursor - start, max_records if max_records is not None else cap)


@given(
    start=st.integers(0, 10_000),
    count=st.integers(0, 300),
    extra=st.integers(0, 1000),
    cap_log=st.integers(1, 9),
)
def test_valid_after_copy_drops_exactly_the_possibly_overwritten(
    start: int, count: int, extra: int, cap_log: int
) -> None:
    cap = 1 << cap_log
    count = min(count, cap)
    intent = start + count + extra  # the writer announced slots up to here during the copy
    drop = valid_after_copy(start, count, intent, cap)
    # slot of s is reused by s + cap; the writer may have begun any sequence < intent
    overwritten = [s for s in range(start, start + count) if s + cap < intent]
    assert drop == len(overwritten)
    # what survives was not touched: its slot's next owner (s + cap) is not yet announced
    assert all(s + cap >= intent for s in range(start + drop, start + count))


# --- properties: a writer and a reader interleaved over a bytearray ----------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("one"), st.integers(1, 1)),
        st.tuples(st.just("many"), st.integers(0, 40)),
        st.tuples(st.just("poll"), st.one_of(st.none(), st.integers(1, 20))),
        st.tuples(st.just("race"), st.integers(1, 40)),  # writer runs during the reader's copy
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(cap_log=st.integers(1, 5), script=ops)
def test_every_record_is_read_once_in_order_or_counted_missed(
    cap_log: int, script: list[tuple[str, int | None]]
) -> None:
    cap = 1 << cap_log
    buf, layout = make_ring(cap)
    w, r = WriterCore(buf, layout), ReaderCore(buf, layout, start=0, verify=True)
    seen: list[int] = []

    def collect(got: np.ndarray) -> None:
        check_intact(got)
        seen.extend(got["seq"].tolist())

    def during_copy(k: int) -> None:
        w.publish_many(batch(w.cursor, k))

    for op, arg in script:
        if op == "one":
            w.publish(batch(w.cursor, 1)[0])
        elif op == "many":
            assert arg is not None
            w.publish_many(batch(w.cursor, arg))
        elif op == "poll":
            before = r.pos
            missed_before = r.missed
            got = r.poll(max_records=arg)
            collect(got)
            if got.size:
                # a jump forward is exactly the number of records counted missed
                assert got["seq"][0] - before == r.missed - missed_before
        else:
            assert arg is not None
            w.publish_many(batch(w.cursor, 1))
            k = arg
            r._after_copy = lambda k=k: during_copy(k)
            intent_floor = w.cursor + k - cap
            got = r.poll()
            r._after_copy = None
            collect(got)
            # nothing that the racing writer may have overwritten was delivered
            assert all(s >= intent_floor for s in got["seq"].tolist())
    while (got := r.poll()).size:
        collect(got)
    assert seen == sorted(set(seen))  # in order, no duplicates
    assert len(seen) + r.missed == w.cursor  # nothing lost silently
    assert r.lag == 0
