"""Aggregate trade id tracking: exactly once, in order, backfill planning, GAP on give-up."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as hs

from pipeline.marketdata.gapfill import REST_PAGE_LIMIT, AggTracker, Gap

FIX = Path(__file__).parent / "fixtures" / "streams_ingest"


def gap_marker(g: Gap) -> str:
    return f"GAP {g.first}-{g.last}"


def test_contiguous_stream_passes_straight_through() -> None:
    t: AggTracker[int] = AggTracker()
    out = [r for i in range(5, 10) for r in t.on_live(i, i)]
    assert out == [5, 6, 7, 8, 9]
    assert t.missing() is None
    assert t.next_request() is None


def test_duplicates_are_dropped() -> None:
    t: AggTracker[int] = AggTracker()
    t.on_live(1, 1)
    t.on_live(2, 2)
    assert t.on_live(2, 2) == []
    assert t.on_live(1, 1) == []
    assert t.stats.duplicates == 2


def test_jump_is_buffered_then_backfilled_in_order() -> None:
    rows = json.loads((FIX / "aggTrades.json").read_text())  # ids 966492862..871
    ids = [r["a"] for r in rows]
    assert ids == list(range(ids[0], ids[0] + 10))
    t: AggTracker[str] = AggTracker()
    t.on_live(ids[0], "live")
    # reconnect: the first live trade after it is ids[7]; 1..6 missing
    assert t.on_live(ids[7], "live") == []
    assert t.on_live(ids[8], "live") == []
    assert t.on_live(ids[8], "live") == []  # duplicate while buffered
    assert t.missing() == (ids[1], ids[6])
    assert t.next_request() == (ids[1], 6)
    # REST page (may include rows beyond the gap and rows already published)
    page = [(r["a"], "rest") for r in rows]
    out = t.on_backfill(page)
    assert out == ["rest"] * 6 + ["live", "live"]
    assert t.last == ids[8]
    assert t.missing() is None
    assert t.stats.gaps_detected == 1
    assert t.stats.published_backfill == 6


def test_live_can_fill_the_gap_before_rest_does() -> None:
    t: AggTracker[int] = AggTracker()
    t.on_live(10, 10)
    t.on_live(13, 13)  # new connection ahead of the old one during rotation
    assert t.missing() == (11, 12)
    assert t.on_live(11, 11) == [11]
    assert t.missing() == (12, 12)
    assert t.on_live(12, 12) == [12, 13]
    assert t.missing() is None
    assert t.stats.gaps_detected == 1


def test_paging_large_gap() -> None:
    t: AggTracker[int] = AggTracker()
    t.on_live(0, 0)
    t.on_live(2501, 2501)
    assert t.next_request() == (1, REST_PAGE_LIMIT)
    t.on_backfill([(i, i) for i in range(1, 1001)])
    assert t.next_request() == (1001, 1000)
    t.on_backfill([(i, i) for i in range(1001, 2001)])
    assert t.next_request() == (2001, 500)
    out = t.on_backfill([(i, i) for i in range(2001, 2501)])
    assert out[-1] == 2501
    assert t.last == 2501


def test_partial_page_keeps_the_rest_missing() -> None:
    t: AggTracker[int] = AggTracker()
    t.on_live(0, 0)
    t.on_live(10, 10)
    assert t.on_backfill([(1, 1), (2, 2), (4, 4)]) == [1, 2]  # 3 absent: stop at the hole
    assert t.missing() == (3, 9)
    assert t.on_backfill([]) == []


def test_give_up_emits_gap_and_continues() -> None:
    t: AggTracker[object] = AggTracker()
    t.on_live(100, 100)
    t.on_live(105, 105)
    t.on_live(106, 106)
    t.on_live(110, 110)  # a second hole behind the first
    out = t.give_up(gap_marker)
    assert out == ["GAP 101-104", 105, 106]
    assert t.missing() == (107, 109)
    assert t.stats.gaps_detected == 2
    out = t.give_up(gap_marker)
    assert out == ["GAP 107-109", 110]
    assert t.stats.ids_lost == 7
    assert t.give_up(gap_marker) == []


def test_overflow_flag() -> None:
    t: AggTracker[int] = AggTracker(max_buffer=3)
    t.on_live(0, 0)
    for i in range(10, 14):
        t.on_live(i, i)
    assert t.overflowing


@settings(max_examples=100, deadline=None)
@given(hs.data())
def test_any_arrival_order_publishes_each_id_once_in_order(data: hs.DataObject) -> None:
    """Live ids arrive shuffled, duplicated and with holes; REST can fill any hole or fail.
    Whatever happens, published ids are strictly increasing, each once, and every id from the
    first to the last is either published or inside a GAP."""
    n = data.draw(hs.integers(2, 60))
    ids = list(range(1000, 1000 + n))
    live = data.draw(hs.lists(hs.sampled_from(ids), min_size=1, max_size=3 * n))
    live = [ids[0], *live]
    t: AggTracker[object] = AggTracker()
    out: list[object] = []
    for i in live:
        out += t.on_live(i, i)
        if t.missing() and data.draw(hs.booleans()):
            req = t.next_request()
            assert req is not None
            if data.draw(hs.booleans()):
                frm, lim = req
                out += t.on_backfill([(j, j) for j in range(frm, frm + lim) if j in ids])
            else:
                out += t.give_up(lambda g: g)
    while t.missing():
        out += t.give_up(lambda g: g)
    covered: list[int] = []
    for r in out:
        if isinstance(r, Gap):
            covered += range(r.first, r.last + 1)
        else:
            assert isinstance(r, int)
            covered.append(r)
    assert covered == list(range(ids[0], max(live) + 1))


def test_one_far_id_is_held_not_a_gap_and_the_stream_goes_on() -> None:
    """Issue 11: a=10**18 used to open a 10**18-id gap; then every real id was a duplicate."""
    t: AggTracker[str] = AggTracker(last=100, max_jump=1000, resync_after=3)
    assert t.on_live(10**18, "bogus") == []
    assert t.missing() is None  # nothing to backfill
    assert t.on_live(101, "r101") == ["r101"]
    assert t.on_live(10**18 + 1, "bogus2") == []  # still no run: the real stream went on
    assert t.on_live(102, "r102") == ["r102"]
    assert (t.stats.far_ids, t.stats.resets, t.last) == (2, 0, 102)
    assert t.on_live(1101, "x") == []  # within max_jump: a plain hole, not far
    assert t.missing() == (103, 1100)


def test_a_run_of_far_ids_restarts_the_sequence_with_a_marker() -> None:
    resets: list[tuple[int, int]] = []
    gaps: list[Gap] = []

    def reset(old: int, new: int) -> str:
        resets.append((old, new))
        return f"reset {old}->{new}"

    def gap(g: Gap) -> str:
        gaps.append(g)
        return f"gap {g.first}-{g.last}"

    t: AggTracker[str] = AggTracker(last=100, max_jump=1000, resync_after=3, make_reset=reset,
                                    make_gap=gap)
    assert t.on_live(105, "r105") == []  # an open hole behind the restart: closed by a GAP
    assert t.on_live(5000, "a") == []
    assert t.on_live(5001, "b") == []
    assert t.on_live(5001, "b") == []  # a repeat inside the run: ignored
    assert t.on_live(5002, "c") == ["gap 101-104", "r105", "reset 105->5000", "a", "b", "c"]
    assert t.last == 5002
    assert t.pending == {}
    # real ids far below a bogus last come back the same way: a run of resync_after of them
    t.on_live(5003, "d")
    assert [t.on_live(i, f"r{i}") for i in (7, 8)] == [[], []]
    assert t.on_live(9, "r9") == ["reset 5003->7", "r7", "r8", "r9"]
    assert (t.stats.resets, t.stats.duplicates) == (2, 0)


def test_rewind_reopens_the_ids_that_did_not_reach_the_ring() -> None:
    t: AggTracker[str] = AggTracker(last=10)
    t.on_live(13, "r13")
    t.on_live(12, "r12")
    out = t.on_live(11, "r11")
    assert out == ["r11", "r12", "r13"]
    t.rewind(10, [(12, "r12"), (13, "r13")])  # r11 failed to pack: 11 is a hole again
    assert t.missing() == (11, 11)
    assert t.on_backfill([(11, "b11")]) == ["b11", "r12", "r13"]
