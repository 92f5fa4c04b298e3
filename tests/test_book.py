"""Order-book sync (section 1.7) on the recorded session and on constructed sequence breaks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from pipeline.binance import streams as st
from pipeline.marketdata.book import TRANSITIONS, BookAction, BookState, OrderBook

FIX = Path(__file__).parent / "fixtures" / "streams_ingest"


def session_diffs(symbol: str) -> list[st.DepthDiff]:
    dec = st.MsgspecDecoder([symbol])
    out = []
    for line in (FIX / "combined_session.jsonl").read_bytes().splitlines():
        tag, val = dec.decode(line, 0)
        if tag == st.DEPTH_DIFF:
            out.append(val)
    return out


def snapshot() -> tuple[int, list[tuple[float, float]], list[tuple[float, float]]]:
    body = json.loads((FIX / "depth_snapshot.json").read_text())
    conv = lambda side: [(float(p), float(q)) for p, q in body[side]]  # noqa: E731
    return body["lastUpdateId"], conv("bids"), conv("asks")


def reference_book(lid: int, bids: list, asks: list, diffs: list[st.DepthDiff]) -> tuple:
    """Naive model: dicts, apply every diff with u > lid in order."""
    b, a = dict(bids), dict(asks)
    for d in diffs:
        if d.last_id <= lid:
            continue
        for side, levels in ((b, d.bids), (a, d.asks)):
            for p, q in levels:
                if q == 0:
                    side.pop(p, None)
                else:
                    side[p] = q
    return sorted(b.items(), reverse=True), sorted(a.items())


def test_recorded_session_syncs_and_matches_reference() -> None:
    diffs = session_diffs("NKNUSDT")
    assert len(diffs) == 150
    lid, bids, asks = snapshot()
    book = OrderBook()
    # the snapshot was fetched after the first diff arrived (timeline): buffer a few first
    assert book.on_diff(diffs[0].first_id, diffs[0].last_id, diffs[0].bids, diffs[0].asks) \
        == BookAction.NEED_SNAPSHOT
    for d in diffs[1:5]:
        assert book.on_diff(d.first_id, d.last_id, d.bids, d.asks) == BookAction.BUFFERED
    assert book.on_snapshot(lid, bids, asks) == BookAction.SYNCED
    assert book.update_id == diffs[4].last_id
    assert not book.resynced_after_break
    for d in diffs[5:]:
        assert book.on_diff(d.first_id, d.last_id, d.bids, d.asks) == BookAction.APPLIED
    ref_b, ref_a = reference_book(lid, bids, asks, diffs)
    top_b, top_a = book.top(len(ref_b) + len(ref_a))
    assert top_b == ref_b
    assert top_a == ref_a
    assert top_b[0][0] < top_a[0][0]  # not crossed
    assert book.update_id == diffs[-1].last_id


def test_first_diff_ending_at_snapshot_is_dropped() -> None:
    diffs = session_diffs("NKNUSDT")
    lid, bids, asks = snapshot()
    assert diffs[0].last_id == lid  # fixture property (SOURCES.md)
    book = OrderBook()
    book.on_diff(diffs[0].first_id, diffs[0].last_id, diffs[0].bids, diffs[0].asks)
    assert book.on_snapshot(lid, bids, asks) == BookAction.SYNCED
    assert book.update_id == lid
    assert book.top(1) == ([bids[0]], [asks[0]])


def test_old_snapshot_is_refetched() -> None:
    book = OrderBook()
    book.on_diff(100, 105, [(1.0, 1.0)], [])
    assert book.on_snapshot(90, [(1.0, 2.0)], [(2.0, 1.0)]) == BookAction.REFETCH
    assert book.state is BookState.WAIT_SNAPSHOT
    # lastUpdateId == U - 1: the first event continues it exactly -> usable
    assert book.on_snapshot(99, [(1.0, 2.0)], [(2.0, 1.0)]) == BookAction.SYNCED
    assert book.top(1) == ([(1.0, 1.0)], [(2.0, 1.0)])


def test_sequence_break_resyncs_and_is_marked() -> None:
    book = OrderBook()
    book.on_diff(10, 11, [], [])
    book.on_snapshot(11, [(5.0, 1.0)], [(6.0, 1.0)])
    assert book.on_diff(12, 13, [(5.5, 2.0)], []) == BookAction.APPLIED
    assert book.on_diff(12, 13, [(5.5, 9.0)], []) == BookAction.IGNORED  # duplicate
    assert book.top(1)[0] == [(5.5, 2.0)]
    assert book.on_diff(20, 21, [], []) == BookAction.NEED_SNAPSHOT  # 14..19 missing
    assert book.breaks == 1
    assert book.top(1) == ([], [])  # discarded, not served stale
    assert book.on_diff(22, 22, [(5.1, 1.0)], []) == BookAction.BUFFERED
    assert book.on_snapshot(21, [(5.0, 3.0)], [(6.0, 3.0)]) == BookAction.SYNCED
    assert book.resynced_after_break
    assert book.top(2)[0] == [(5.1, 1.0), (5.0, 3.0)]
    assert book.on_snapshot(30, [], []) == BookAction.IGNORED  # stale fetch after sync


def test_deletions_and_unknown_deletions() -> None:
    book = OrderBook()
    book.on_diff(1, 1, [], [])
    book.on_snapshot(1, [(10.0, 1.0), (9.0, 1.0)], [(11.0, 1.0), (12.0, 1.0)])
    book.on_diff(2, 2, [(10.0, 0.0), (8.0, 0.0)], [(11.0, 0.0), (11.5, 4.0)])
    assert book.top(5) == ([(9.0, 1.0)], [(11.5, 4.0), (12.0, 1.0)])


def test_buffer_keeps_latest_contiguous_run_and_is_bounded() -> None:
    book = OrderBook(max_buffer=3)
    book.on_diff(1, 1, [], [])
    book.on_diff(2, 2, [], [])
    book.on_diff(2, 2, [], [])  # duplicate ignored
    book.on_diff(5, 5, [(1.0, 1.0)], [])  # hole 3..4: older run useless
    for i in range(6, 10):
        book.on_diff(i, i, [], [])
    assert [e[0] for e in book.buffer] == [7, 8, 9]
    assert book.on_snapshot(5, [], []) == BookAction.REFETCH  # 6 was dropped by the bound
    assert book.on_snapshot(6, [], []) == BookAction.SYNCED
    assert book.update_id == 9


def test_every_transition_is_in_the_table() -> None:
    for (state, _event), outs in TRANSITIONS.items():
        assert all(isinstance(s, BookState) and isinstance(a, BookAction) for s, a in outs), state


@settings(max_examples=60, deadline=None)
@given(hs.lists(hs.tuples(hs.integers(0, 9), hs.integers(0, 3)), min_size=1, max_size=40),
       hs.integers(0, 39))
def test_random_diffs_match_reference(steps: list[tuple[int, int]], snap_at: int) -> None:
    """Contiguous event stream, snapshot taken at an arbitrary point: same book as the model."""
    events = []
    uid = 100
    for price_i, qty in steps:
        events.append((uid + 1, uid + 1, [(float(price_i), float(qty))], []))
        uid += 1
    book = OrderBook()
    model: dict[float, float] = {}
    snap_at = min(snap_at, len(events) - 1)
    book.on_diff(*events[0])
    for ev in events[1:snap_at + 1]:
        book.on_diff(*ev)
    # snapshot state = model after events[0..k] for some k <= snap_at; use k = snap_at - 1
    k = max(0, snap_at - 1)
    for ev in events[:k + 1]:
        for p, q in ev[2]:
            model.pop(p, None) if q == 0 else model.__setitem__(p, q)
    assert book.on_snapshot(events[k][1], sorted(model.items()), []) == BookAction.SYNCED
    for ev in events[k + 1:]:
        for p, q in ev[2]:
            model.pop(p, None) if q == 0 else model.__setitem__(p, q)
    for ev in events[snap_at + 1:]:
        assert book.on_diff(*ev) == BookAction.APPLIED
    assert book.top(100)[0] == sorted(model.items(), reverse=True)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_top_n(n: int) -> None:
    book = OrderBook()
    book.on_diff(1, 1, [], [])
    book.on_snapshot(1, [(1.0, 1.0), (2.0, 1.0)], [(3.0, 1.0)])
    b, a = book.top(n)
    assert b == [(2.0, 1.0), (1.0, 1.0)][:n]
    assert a == [(3.0, 1.0)][:n]


def test_levels_are_bounded_per_side_keeping_the_best() -> None:
    """Issue 11: levels far from the top were never removed, so the map grew without bound."""
    b = OrderBook(max_levels=50)
    b.on_diff(1, 1, [], [])
    b.on_snapshot(1, [(float(100 - i), 1.0) for i in range(40)], [(200.0, 1.0)])
    b.on_diff(2, 2, [(float(50 - i), 1.0) for i in range(30)], [])  # 30 worse bids
    assert len(b.bids.levels) == 50 == len(b.bids.keys)
    assert b.bids.trimmed == 20
    bids, _ = b.top(50)
    assert bids[0] == (100.0, 1.0)
    assert bids[-1][0] == 41.0  # the 20 worst ones (40..21) went
    b.on_diff(3, 3, [(101.0, 2.0)], [])  # a better level still gets in
    assert b.top(1)[0] == [(101.0, 2.0)]
    assert len(b.bids.levels) == 50


def test_a_far_update_id_is_held_and_does_not_freeze_the_book() -> None:
    """Issue 11: one diff with u=10**17 made every later diff "older" than the book (IGNORED
    forever) or, while buffering, kept the snapshot refetching forever."""
    b = OrderBook(max_jump=1000, resync_after=3)
    b.on_diff(10, 11, [], [])
    assert b.on_snapshot(11, [(1.0, 1.0)], [(2.0, 1.0)]) == BookAction.SYNCED
    assert b.on_diff(10**17, 10**17, [(1.5, 1.0)], []) == BookAction.IGNORED
    assert b.on_diff(12, 12, [(1.2, 1.0)], []) == BookAction.APPLIED
    assert b.top(1)[0] == [(1.2, 1.0)]  # the bogus level was never applied
    assert (b.far_ids, b.resets, b.breaks) == (1, 0, 0)
    # a run of far ids that agree: the stream restarted -> resync from a snapshot after it
    assert b.on_diff(50_000, 50_000, [], []) == BookAction.IGNORED
    assert b.on_diff(50_001, 50_002, [], []) == BookAction.IGNORED
    assert b.on_diff(50_003, 50_003, [], []) == BookAction.NEED_SNAPSHOT
    assert b.resets == 1
    assert b.on_snapshot(50_003, [(3.0, 1.0)], [(4.0, 1.0)]) == BookAction.SYNCED
    assert b.resynced_after_break
    # while buffering, a far diff does not replace the run the snapshot must continue
    b2 = OrderBook(max_jump=1000, resync_after=3)
    b2.on_diff(10, 11, [], [])
    assert b2.on_diff(10**17, 10**17, [], []) == BookAction.BUFFERED
    b2.on_diff(12, 12, [], [])
    assert b2.on_snapshot(11, [(1.0, 1.0)], [(2.0, 1.0)]) == BookAction.SYNCED
    assert b2.update_id == 12
