"""Futex wake-ups of sleeping ring readers (pipeline/ipc/wake.py), across real processes.

No timing assertions: a woken reader is one whose wait returns the record before its (long)
timeout, having been seen asleep in the ring header first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.ipc import wake
from pipeline.ipc.layout import W_SLEEPERS, W_WAKEUPS
from pipeline.ipc.records import TICK_DTYPE
from pipeline.ipc.segments import RingReader, RingWriter, ring_stats

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not wake.AVAILABLE, reason=f"no futex wake-ups here: {wake.WHY}"),
]


def child(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def stop(p: subprocess.Popen[str]) -> None:
    """Kill a child (if still running) and close its pipes."""
    p.kill()
    p.communicate()


def until(what: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Poll a condition (a precondition of the test, not a measurement)."""
    deadline = time.monotonic() + timeout_s
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def record(k: int) -> tuple[int, ...]:
    return (1, 0, 0, 0, 0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, k, 0, 0, 0, 0)


# A reader in its own process: attaches, says so, waits (long timeout, long check interval:
# only a wake-up ends the wait early), prints what it saw.
SLEEPING_READER = """
    import sys
    from pipeline.ipc.segments import RingReader
    r = RingReader.attach(sys.argv[1], name="sleeper", idle=sys.argv[2], check_interval_s=60)
    print("ready", flush=True)
    got = r.wait(60)
    recs = r.poll()
    print(got, recs["trade_id"].tolist(), r.sleeps, r.woken, flush=True)
    r.close()
"""


@pytest.mark.parametrize("idle", ["low-latency", "balanced", "low-cpu"])
def test_a_sleeping_reader_is_woken_by_a_publish(shm_name: str, idle: str) -> None:
    w = RingWriter.create(shm_name, TICK_DTYPE, 64)
    p = child(SLEEPING_READER, shm_name, idle)
    try:
        assert w._hdr[W_WAKEUPS] == 1  # this writer wakes sleepers
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        until(lambda: w.sleepers == 1)  # asleep on the cursor, not napping or spinning
        assert ring_stats(shm_name)["sleeping"] == 1
        w.publish(record(7))
        out, _ = p.communicate(timeout=30)
        assert out.startswith("True [7]")  # the record, long before the 60 s timeout
        sleeps, woken = out.split()[-2:]
        assert int(sleeps) >= 1
        assert int(woken) >= 1
        assert w.wakes >= 1
        assert w.sleepers == 0  # the reader cleared its bit when it woke
    finally:
        stop(p)
        w.close()


def test_a_sleepers_bit_outside_the_word_is_refused(shm_name: str) -> None:
    w = RingWriter.create(shm_name, TICK_DTYPE, 64)
    try:
        bell = w._bell
        assert bell is not None
        for bad in (-1, 64):
            with pytest.raises(ValueError, match=r"must be in 0\.\.63"):
                bell.sleep(bad, 0, 0.0)
            with pytest.raises(ValueError, match=r"must be in 0\.\.63"):
                bell.clear(bad)
        assert bell.sleep(0, 1, 0.0) == 1  # the cursor is not at 1: no sleep at all
        assert bell.sleep(0, 0, 0.0) == -1  # a zero timeout: asleep and timed out at once
        assert w.sleepers == 0
    finally:
        w.close()


def test_a_publish_with_nobody_asleep_makes_no_wake_call(shm_name: str) -> None:
    """The writer's cost when nobody sleeps is one load: no system call."""
    w = RingWriter.create(shm_name, TICK_DTYPE, 64)
    try:
        with RingReader.attach(shm_name, idle="balanced") as r:
            for k in range(50):
                w.publish(record(k))
            assert len(r.poll()) == 50
        assert w.wakes == 0
    finally:
        w.close()


WRITER_THEN_KILLED = """
    import sys, time
    from pipeline.ipc.records import TICK_DTYPE
    from pipeline.ipc.segments import RingWriter
    w = RingWriter.create(sys.argv[1], TICK_DTYPE, 64)
    print("ready", flush=True)
    time.sleep(600)
"""


def test_a_reader_asleep_when_its_writer_is_killed_notices(shm_name: str) -> None:
    """The sleep is bounded (check_interval_s), so a dead writer never strands the reader: its
    wait times out, and it can tell the writer is gone."""
    p = child(WRITER_THEN_KILLED, shm_name)
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        with RingReader.attach(shm_name, idle="low-cpu", check_interval_s=0.05) as r:
            assert r.writer_alive()
            p.send_signal(signal.SIGKILL)
            p.wait(10)
            assert r.wait(0.5) is False  # returns (a timeout), nothing to read
            assert r.sleeps >= 1  # it did sleep on the futex meanwhile
            assert not r.writer_alive()
    finally:
        stop(p)
        os.unlink(f"/dev/shm/{shm_name}")  # the killed writer could not


def test_a_reader_killed_asleep_leaves_no_stuck_sleeper(shm_name: str) -> None:
    """The sleepers word is one bit per reader entry, so it can never go negative; a reader
    SIGKILLed while asleep leaves its bit, and reaping its entry clears it (the writer's own
    reap, a new reader's attach, or ``pipeline ring stats``)."""
    w = RingWriter.create(shm_name, TICK_DTYPE, 64)
    procs = [child(SLEEPING_READER, shm_name, "low-cpu") for _ in range(3)]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        until(lambda: w.sleepers == 3)
        for p in procs[:2]:
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        assert w.sleepers == 3  # the dead cannot clear their bits
        assert w.reap_dead_readers() == 2
        assert w.sleepers == 1  # only the live sleeper's bit is left
        assert [r["name"] for r in ring_stats(shm_name)["readers"]] == ["sleeper"]
        w.publish(record(1))
        out, _ = procs[2].communicate(timeout=30)
        assert out.startswith("True [1]")
        until(lambda: w.sleepers == 0)
        assert int(w._hdr[W_SLEEPERS]) == 0  # no bit stuck, none below zero
        # a killed sleeper reaped by the next reader's attach instead of the writer
        p = child(SLEEPING_READER, shm_name, "low-cpu")
        procs.append(p)
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        until(lambda: w.sleepers == 1)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        with RingReader.attach(shm_name, idle="low-cpu"):
            assert w.sleepers == 0
    finally:
        for p in procs:
            stop(p)
        w.close()


def test_closing_the_writer_wakes_its_sleepers(shm_name: str) -> None:
    """A closing writer wakes its sleepers, which look at the writer at once (their own check
    would come only after ``check_interval_s``, 60 s here)."""
    w = RingWriter.create(shm_name, TICK_DTYPE, 64)
    code = """
        import sys
        from pipeline.ipc.segments import RingReader
        r = RingReader.attach(sys.argv[1], idle="low-cpu", check_interval_s=60)
        print("ready", flush=True)
        r.wait(1.0)
        print(r.woken, r.writer_closed, flush=True)
    """
    p = child(code, shm_name)
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        until(lambda: w.sleepers == 1)
        w.close()
        out, _ = p.communicate(timeout=30)
    finally:
        stop(p)
        w.close()
    woken, closed = out.split()
    assert int(woken) >= 1
    assert closed == "True"
