"""The ring's pure core over a bytearray: layout, slot protocol, wrap-around and lapping."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.ipc.records import TICK_DTYPE
from pipeline.ipc.ring import (
    MAGIC,
    FastPathView,
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


# --- staging (stage / commit) -------------------------------------------------------------------

STAMPED = np.dtype([("id", "<i8"), ("x", "<f8"), ("stamp", "<i8")])  # 24-byte records
ODD = np.dtype([("id", "<i4"), ("stamp", "<i8")])  # packed: 12-byte records, stamp at offset 4


def test_struct_for_a_prefix_of_the_fields_leaves_the_rest_alone() -> None:
    st_ = struct_for(TICK_DTYPE, len(TICK_DTYPE.names) - 1)  # type: ignore[arg-type]
    assert st_ is not None
    assert st_.size == TICK_DTYPE.fields["publish_time_ns"][1]  # type: ignore[index]
    out = bytearray(b"\xee" * 96)
    st_.pack_into(out, 0, *([0] * 15))
    assert out[88:] == b"\xee" * 8


@pytest.mark.parametrize("dtype", [STAMPED, ODD, TICK_DTYPE])
@pytest.mark.parametrize("n", [1, 3, 9, 13])
def test_staged_records_are_invisible_until_commit_then_in_order(dtype: np.dtype, n: int) -> None:
    buf, layout = make_ring(16, dtype)
    w, r = WriterCore(buf, layout), ReaderCore(buf, layout, verify=True)
    w.configure_staging("stamp" if dtype is not TICK_DTYPE else "publish_time_ns", 64)
    nf = len(dtype.names) - 1  # type: ignore[arg-type]
    w.publish_many(np.zeros(11, dtype))  # n > 5 stages across the wrap (slots 11..15, 0..)
    r.poll()
    for k in range(n):
        rec = [0] * nf
        rec[0] = 100 + k
        w.stage(tuple(rec))
    assert w.staged == n
    assert w.cursor == 11
    assert r.poll().size == 0  # nothing visible yet
    assert w.commit(stamp=777) == n
    assert w.staged == 0
    assert w.cursor == 11 + n
    got = r.poll()
    first = dtype.names[0]  # type: ignore[index]
    last = dtype.names[-1]  # type: ignore[index]
    assert got[first].tolist() == [100 + k for k in range(n)]
    assert got[last].tolist() == [777] * n
    assert r.missed == 0
    assert w.commit(1) == 0  # nothing staged: nothing happens


def test_stage_says_when_to_commit_and_never_holds_more_than_capacity() -> None:
    buf, layout = make_ring(8, STAMPED)
    w, r = WriterCore(buf, layout), ReaderCore(buf, layout, verify=True)
    w.configure_staging("stamp", max_staged=3)
    assert [w.stage((k, 0.5)) for k in range(3)] == [False, False, True]
    w.commit(5)
    w.configure_staging("stamp", max_staged=100)  # capped at the capacity
    assert w.max_staged == 8
    for k in range(3, 3 + 8):  # the 8th stage commits by itself (the next would overwrite)
        w.stage((k, 0.5))
    assert w.staged == 0
    assert w.cursor == 11
    got = r.poll()
    assert r.missed == 3
    assert got["id"].tolist() == list(range(3, 11))


def test_publish_and_close_commit_staged_records_first() -> None:
    buf, layout = make_ring(16, TICK_DTYPE)
    w, r = WriterCore(buf, layout), ReaderCore(buf, layout)
    w.configure_staging("publish_time_ns")
    w.stage((1, 0, 0, 0, 0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 10, 0, 0, 0))
    w.publish((1, 0, 0, 0, 0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 11, 0, 0, 0, 5))
    w.stage((1, 0, 0, 0, 0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 12, 0, 0, 0))
    w.publish_many(np.zeros(1, TICK_DTYPE))
    got = r.poll()
    assert got["trade_id"].tolist() == [10, 11, 12, 0]
    assert got["publish_time_ns"][0] > 0  # stamped with the clock by the implicit commit
    assert got["publish_time_ns"][1] == 5


def test_staging_configuration_errors() -> None:
    buf, layout = make_ring(8, TICK_DTYPE)
    w = WriterCore(buf, layout)
    with pytest.raises(ValueError, match="last field"):
        w.configure_staging("price")
    with pytest.raises(ValueError, match="max_staged"):
        w.configure_staging("publish_time_ns", 0)
    buf, layout = make_ring(8, np.dtype([("a", "<i8"), ("t", "<f8")]))
    with pytest.raises(ValueError, match="<i8"):
        WriterCore(buf, layout).configure_staging("t")
    buf, layout = make_ring(8, np.dtype([("a", "<f8", (2,)), ("t", "<i8")]))
    w = WriterCore(buf, layout)
    with pytest.raises(ValueError, match="cannot be staged"):
        w.configure_staging("t")
    with pytest.raises(TypeError, match="cannot be staged"):
        w.stage(((1.0, 2.0), 3))  # no stamp field, and the dtype is not packable either


def test_a_lapped_reader_never_takes_a_staged_slot_for_a_good_one() -> None:
    """stage() announces each slot (intent) before writing it, like publish()."""
    buf, layout = make_ring(8, STAMPED)
    w, r = WriterCore(buf, layout), ReaderCore(buf, layout, verify=True)
    w.configure_staging("stamp")
    w.publish_many(np.zeros(8, STAMPED))  # reader at 0, ring full

    def stage_during_copy() -> None:
        w.stage((99, 0.0))  # overwrites slot 0 (sequence 0) while the reader copies it
        r._after_copy = None

    r._after_copy = stage_during_copy
    got = r.poll()
    assert r.missed == 1  # sequence 0 was dropped, not delivered torn
    assert len(got) == 7
    assert not np.any(got["id"] == 99)
    w.commit(1)
    assert r.poll()["id"].tolist() == [99]


def stage_through_view(view: FastPathView, record: bytes) -> bool:
    """The staging protocol of :class:`FastPathView`, step by step as a compiled path follows
    it (its pure-Python twin): False (nothing written) while a full batch waits."""
    hdr = view.header
    s = hdr[view.intent_word]  # cursor + staged
    if s - hdr[view.cursor_word] >= view.max_staged:
        return False
    i, rs = s & (view.capacity - 1), view.record_size
    hdr[view.intent_word] = s + 1
    view.data[i * rs : (i + 1) * rs] = record
    view.seqs[i] = s
    return True


def test_a_fast_path_stages_into_the_writers_batch_through_the_public_view() -> None:
    """The batch is in the ring header, not in the writer object: records staged through the
    view and by stage() form one batch, in order, counted by ``staged`` and published by one
    commit, across the wrap."""
    buf, layout = make_ring(8, STAMPED)
    w, r = WriterCore(buf, layout), ReaderCore(buf, layout, verify=True)
    w.configure_staging("stamp", 3)
    view = w.fast_path_view()
    assert (view.capacity, view.record_size, view.max_staged, view.stamp_offset) == (8, 24, 3, 16)
    assert view.header[view.cursor_word] == view.header[view.intent_word] == 0
    seen: list[int] = []
    for k in range(0, 30, 3):
        w.stage((k, 0.5))
        assert stage_through_view(view, np.array([(k + 1, 1.5, 0)], STAMPED).tobytes())
        assert w.staged == 2
        assert w.stage((k + 2, 2.5)) is True  # the batch (3) is full, the view's record counted
        assert not stage_through_view(view, bytes(24))  # full: declined, nothing written
        assert w.commit(k) == 3
        got = r.poll()
        assert got["stamp"].tolist() == [k] * 3
        seen += got["id"].tolist()
    assert seen == list(range(30))
    assert r.missed == 0
    assert w.cursor == view.header[view.cursor_word] == 30


def test_a_writer_refuses_a_ring_with_uncommitted_staged_records() -> None:
    """A writer that staged and never committed leaves intent > cursor: a second writer on that
    memory cannot tell which of those slots a reader may still trust, so it refuses."""
    buf, layout = make_ring(8, STAMPED)
    w = WriterCore(buf, layout)
    w.configure_staging("stamp")
    w.stage((1, 0.0))
    with pytest.raises(RingError, match="never committed"):
        WriterCore(buf, layout)
    w.commit(1)
    assert WriterCore(buf, layout).cursor == 1


# --- idle policy (pure) -------------------------------------------------------------------------


def test_nap_schedule_spins_then_doubles_then_relaxes() -> None:
    from pipeline.ipc.idle import IdlePolicy, nap_schedule, next_nap

    p = IdlePolicy(spin_s=50e-6, first_nap_s=10e-6, max_sleep_s=200e-6, relax_after_s=0.01,
                   relaxed_max_sleep_s=1e-3)
    assert next_nap(p, 0.0, 0.0) == 0.0  # spin
    assert next_nap(p, 49e-6, 0.0) == 0.0
    assert next_nap(p, 50e-6, 0.0) == 10e-6
    naps = [n for _, n in nap_schedule(p, 0.05)]
    assert naps[:6] == pytest.approx([10e-6, 20e-6, 40e-6, 80e-6, 160e-6, 200e-6])
    early = [n for t, n in nap_schedule(p, 0.05) if t < 0.01]
    late = [n for t, n in nap_schedule(p, 0.05) if t >= 0.01]
    assert max(early) == pytest.approx(200e-6)  # latency bound while recently active
    assert late[:3] == pytest.approx([400e-6, 800e-6, 1e-3])  # keeps doubling from there
    assert max(late) == pytest.approx(1e-3)
    assert all(b >= a for a, b in itertools.pairwise(naps))  # never shrinks


def test_idle_profiles_trade_latency_for_cpu() -> None:
    from pipeline.ipc.idle import IDLE_PROFILES, nap_schedule

    wakeups = {name: len(nap_schedule(p, 1.0)) for name, p in IDLE_PROFILES.items()}
    worst = {name: max(n for _, n in nap_schedule(p, 1.0)) for name, p in IDLE_PROFILES.items()}
    assert worst["low-latency"] == pytest.approx(200e-6)
    assert worst["balanced"] == pytest.approx(1e-3)
    assert worst["low-cpu"] == pytest.approx(2e-3)
    # wake-ups in one idle second (each costs a few us of CPU): ~5000 / ~1000 / ~500
    assert wakeups["low-latency"] > 4 * wakeups["balanced"]
    assert wakeups["balanced"] > 1.8 * wakeups["low-cpu"]
    assert IDLE_PROFILES["low-cpu"].spin_s == 0.0
    for p in IDLE_PROFILES.values():  # every profile keeps <= its short cap for the first 5 ms
        assert all(n <= p.max_sleep_s for t, n in nap_schedule(p, 0.005) if t < p.relax_after_s)


def test_idle_policy_validation() -> None:
    from pipeline.ipc.idle import IdlePolicy, idle_policy

    with pytest.raises(ValueError, match="first_nap_s"):
        IdlePolicy(first_nap_s=0.0)
    with pytest.raises(ValueError, match="spin_s"):
        IdlePolicy(spin_s=-1.0)
    with pytest.raises(ValueError, match="max_sleep_s"):
        IdlePolicy(max_sleep_s=1e-6, first_nap_s=1e-5)
    with pytest.raises(ValueError, match="relaxed_max_sleep_s"):
        IdlePolicy(relaxed_max_sleep_s=1e-5)
    with pytest.raises(ValueError, match="spin_s"):
        IdlePolicy(spin_s=float("nan"))
    with pytest.raises(ValueError, match="unknown idle profile 'fast'"):
        idle_policy("fast")
    custom = IdlePolicy(spin_s=0.0)
    assert idle_policy(custom) is custom
    assert idle_policy("balanced") == IdlePolicy()
