"""The REST weight budget and request order (pipeline/marketdata/restbudget.py), on a fake
clock: no sockets, no sleeping."""

from __future__ import annotations

import pytest

from pipeline.marketdata.restbudget import (
    Priority,
    RestBudget,
    RestQueue,
    depth_weight,
)


def test_depth_weight_follows_the_documented_limit_bands() -> None:
    assert [depth_weight(n) for n in (1, 100, 101, 500, 501, 1000, 1001, 5000)] == \
        [5, 5, 25, 25, 50, 50, 250, 250]


def test_never_more_than_the_allowance_per_window_then_waits_for_the_next_window() -> None:
    b = RestBudget(limit=1000, interval_s=60.0, share=0.8)  # 800 per window
    now = 120.0  # the start of a window (windows are aligned, like Binance's minute)
    sent = 0
    while b.delay(50, now) == 0:
        b.charge(50, now)
        sent += 1
    assert sent == 16  # 16 * 50 = 800
    assert b.delay(50, now + 1.0) == pytest.approx(59.0)  # until the next window starts
    assert b.delay(50, 180.0) == 0  # a new window: its own allowance
    assert b.peak_used == 800


def test_the_servers_count_raises_ours_but_a_late_answer_does_not_spill_into_the_next_window(
) -> None:
    b = RestBudget(limit=1000, interval_s=60.0, share=0.8)
    w = b.charge(5, 10.0)
    b.on_answer(200, 790, None, w, 10.1)  # someone else on the IP spent most of it
    assert b.used == 790
    assert b.delay(25, 10.2) == pytest.approx(49.8)
    w = b.charge(5, 59.9)
    b.on_answer(200, 795, None, w, 60.1)  # answered in the next window: its count is stale
    assert b.used == 0
    assert b.delay(25, 60.1) == 0


def test_a_429_holds_every_request_until_retry_after() -> None:
    b = RestBudget(limit=6000, interval_s=60.0)
    w = b.charge(5, 0.5)
    b.on_answer(429, 6001, 7.0, w, 1.0)
    assert b.rate_limited == 1
    assert b.delay(1, 1.0) == pytest.approx(7.0)
    assert b.delay(1, 7.9) == pytest.approx(0.1)
    assert b.delay(1, 8.0) == pytest.approx(52.0)  # and nothing more in that window
    assert b.delay(1, 60.0) == 0


def test_a_429_whose_count_leaves_room_waits_only_for_retry_after() -> None:
    """The server's used-weight count on the 429 says the window is not spent (the 429 was for
    something else): requests resume after Retry-After, not at the next window."""
    b = RestBudget(limit=6000, interval_s=60.0)
    w = b.charge(5, 0.5)
    b.on_answer(429, 100, 2.0, w, 1.0)
    assert b.delay(1, 1.0) == pytest.approx(2.0)
    assert b.delay(1, 3.0) == 0


def test_a_418_stops_all_rest_until_the_ban_ends_and_says_so() -> None:
    b = RestBudget(limit=6000, interval_s=60.0)
    w = b.charge(5, 0.0)
    b.on_answer(418, None, 120.0, w, 0.0)
    assert b.bans == 1
    assert b.banned(100.0)
    assert b.delay(1, 100.0) == pytest.approx(20.0)
    assert not b.banned(120.0)
    assert b.delay(1, 120.0) == 0


def test_a_429_without_retry_after_waits_for_the_end_of_the_window() -> None:
    b = RestBudget(limit=6000, interval_s=60.0)
    w = b.charge(5, 30.0)
    b.on_answer(429, None, None, w, 30.0)
    assert b.delay(1, 30.0) == pytest.approx(30.0)


def test_a_request_heavier_than_the_allowance_goes_alone_in_a_fresh_window() -> None:
    b = RestBudget(limit=100, interval_s=60.0, share=0.8)
    assert b.delay(250, 0.0) == 0
    b.charge(250, 0.0)
    assert b.delay(250, 1.0) == pytest.approx(59.0)


def test_queue_backfills_newest_gap_first_then_snapshots_in_arrival_order() -> None:
    q = RestQueue()
    s1 = q.submit(Priority.SNAPSHOT, 50)
    b_old = q.submit(Priority.BACKFILL, 25, since=10.0)
    s2 = q.submit(Priority.SNAPSHOT, 50)
    b_new = q.submit(Priority.BACKFILL, 25, since=20.0)
    order = []
    while (t := q.head()) is not None:
        q.pop(t)
        order.append(t)
    assert order == [b_new, b_old, s1, s2]


def test_queue_skips_requests_whose_task_went_away() -> None:
    q = RestQueue()
    a = q.submit(Priority.SNAPSHOT, 5)
    b = q.submit(Priority.SNAPSHOT, 5)
    q.discard(a)
    assert len(q) == 1
    assert q.head() is b
    q.pop(b)
    assert q.head() is None
    assert len(q) == 0
