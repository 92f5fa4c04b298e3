from __future__ import annotations

import random

import pytest

from pipeline.backoff import (
    Backoff,
    BackoffPolicy,
    Outcome,
    classify_response,
    is_fatal_connect_error,
)


def test_doubling_to_cap_without_jitter() -> None:
    b = Backoff(BackoffPolicy(jitter=0.0, max_attempts=0))
    delays = [b.next_delay() for _ in range(10)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]


def test_jitter_stays_within_bounds_and_varies() -> None:
    b = Backoff(BackoffPolicy(jitter=0.5, max_attempts=0), rng=random.Random(7))
    seen = []
    for attempt in range(1, 200):
        d = b.next_delay()
        assert d is not None
        base = b.base_delay(attempt)
        assert base * 0.5 <= d <= base
        assert d <= 60
        seen.append(d)
    assert len({round(x, 6) for x in seen[-50:]}) > 10  # jittered, not constant


def test_gives_up_after_max_attempts_and_reset() -> None:
    b = Backoff(BackoffPolicy(jitter=0.0, max_attempts=3))
    assert b.next_delay() == 1
    assert b.next_delay() == 2
    assert not b.exhausted
    assert b.next_delay() is None
    assert b.exhausted
    b.reset()
    assert b.attempts == 0
    assert b.next_delay() == 1


def test_huge_attempt_counts_do_not_overflow() -> None:
    assert Backoff(BackoffPolicy()).base_delay(10_000) == 60


@pytest.mark.parametrize(
    "kwargs",
    [{"initial_s": 0}, {"max_s": 0.5}, {"factor": 0.5}, {"jitter": 1.0}, {"max_attempts": -1}],
)
def test_policy_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        BackoffPolicy(**kwargs)


@pytest.mark.parametrize(
    ("status", "code", "outcome"),
    [
        (200, None, Outcome.OK),
        (400, -2010, Outcome.REJECTED),
        (400, -1013, Outcome.REJECTED),
        (400, -2013, Outcome.REJECTED),
        (400, -1007, Outcome.UNKNOWN),
        (500, -1006, Outcome.UNKNOWN),
        (503, -1000, Outcome.UNKNOWN),
        (502, None, Outcome.UNKNOWN),
        (429, -1003, Outcome.RATE_LIMITED),
        (418, -1003, Outcome.RATE_LIMITED),
        (429, -1015, Outcome.RATE_LIMITED),
        (400, -1021, Outcome.RESYNC_RETRY),
        (400, -1022, Outcome.AUTH_FATAL),
        (401, -2015, Outcome.AUTH_FATAL),
        (400, -2014, Outcome.AUTH_FATAL),
    ],
)
def test_classify_response(status: int, code: int | None, outcome: Outcome) -> None:
    assert classify_response(status, code) is outcome


def test_fatal_connect_errors() -> None:
    assert is_fatal_connect_error(ValueError("bad url"))
    assert not is_fatal_connect_error(ConnectionRefusedError())
    assert not is_fatal_connect_error(TimeoutError())
