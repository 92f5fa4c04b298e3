"""The ring in real shared memory: lifetime, errors, readers table, writer restarts, CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.ipc import shm
from pipeline.ipc.cli import format_stats
from pipeline.ipc.records import TICK_DTYPE
from pipeline.ipc.ring import (
    W_VERSION,
    RingError,
    RingExistsError,
    RingLayoutError,
    RingNotFoundError,
    RingReader,
    RingUntrustedError,
    RingWriter,
    list_rings,
    ring_stats,
)

ROOT = Path(__file__).resolve().parents[1]


def ticks(start: int, n: int) -> np.ndarray:
    out = np.zeros(n, TICK_DTYPE)
    out["trade_id"] = np.arange(start, start + n)
    out["price"] = out["trade_id"] * 0.5
    return out


@pytest.fixture
def writer(shm_name: str) -> Iterator[RingWriter]:
    w = RingWriter.create(shm_name, TICK_DTYPE, 64, symbols=["BTCUSDT", "ETHUSDT"])
    try:
        yield w
    finally:
        w.close()


def run_child(code: str, *args: str) -> subprocess.Popen[str]:
    """A fully separate Python process (own resource_tracker, if it ever started one)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_segment_is_private_and_gone_after_close(shm_name: str) -> None:
    w = RingWriter.create(shm_name, TICK_DTYPE, 8)
    path = shm.SHM_DIR / shm_name
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert shm_name in list_rings(shm_name)
    finally:
        w.close()
    assert not path.exists()
    w.close()  # idempotent


def test_attach_to_missing_ring_names_it(shm_name: str) -> None:
    with pytest.raises(RingNotFoundError, match=shm_name) as exc:
        RingReader.attach(shm_name)
    assert isinstance(exc.value, RingError)
    with pytest.raises(RingNotFoundError, match=shm_name):
        ring_stats(shm_name)


def test_attach_can_wait_for_a_writer_that_starts_later(shm_name: str) -> None:
    child = run_child(
        """
        import sys, time
        from pipeline.ipc.segments import RingWriter
        time.sleep(0.2)
        w = RingWriter.create(sys.argv[1], "<i8", 8)
        w.publish((7).to_bytes(8, "little"))
        sys.stdin.readline()
        w.close()
        """,
        shm_name,
    )
    try:
        with RingReader.attach(shm_name, wait_s=30, start="oldest") as r:
            assert r.poll_blocking(timeout_s=30).tolist() == [7]
    finally:
        child.communicate("bye\n", timeout=30)
    assert child.returncode == 0
    assert not (shm.SHM_DIR / shm_name).exists()


def test_invalid_names_are_refused() -> None:
    for bad in ("", "../etc/passwd", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="invalid shared-memory name"):
            RingWriter.create(bad, TICK_DTYPE, 8)


def test_foreign_segment_is_refused_and_left_alone(shm_name: str) -> None:
    path = shm.SHM_DIR / shm_name
    junk = b"somebody else's data" * 100
    path.write_bytes(junk)
    try:
        with pytest.raises(RingUntrustedError, match="mode 0644 lets group/other in"):
            RingReader.attach(shm_name, wait_s=30)  # refused at once: waiting cannot help
        os.chmod(path, 0o600)  # ours and private, but not a ring
        with pytest.raises(RingLayoutError, match=f"'{shm_name}' is not a ring"):
            RingReader.attach(shm_name)
        with pytest.raises(RingLayoutError, match=shm_name):
            RingWriter.create(shm_name, TICK_DTYPE, 8)
        assert path.read_bytes() == junk
        assert shm_name not in list_rings(shm_name)
    finally:
        path.unlink()


def test_other_layout_version_is_refused(writer: RingWriter, shm_name: str) -> None:
    fd = os.open(shm.SHM_DIR / shm_name, os.O_RDWR)
    try:
        os.pwrite(fd, (7).to_bytes(8, "little"), 8 * W_VERSION)
    finally:
        os.close(fd)
    with pytest.raises(RingLayoutError, match="layout version 7"):
        RingReader.attach(shm_name)


def test_live_writer_is_not_replaced(writer: RingWriter, shm_name: str) -> None:
    with pytest.raises(RingExistsError, match=f"{shm_name}.*live writer.*{os.getpid()}"):
        RingWriter.create(shm_name, TICK_DTYPE, 8)
    writer.publish_many(ticks(0, 3))  # the original is untouched
    assert writer.cursor == 3


def test_late_reader_starts_at_the_head(writer: RingWriter, shm_name: str) -> None:
    writer.publish_many(ticks(0, 10))
    with RingReader.attach(shm_name, name="late") as r:
        assert r.symbols == ["BTCUSDT", "ETHUSDT"]
        assert r.dtype == TICK_DTYPE
        assert r.poll().size == 0
        assert r.lag == 0
        writer.publish_many(ticks(10, 2))
        assert r.lag == 2
        assert r.poll()["trade_id"].tolist() == [10, 11]
    with RingReader.attach(shm_name, start="oldest") as r:
        assert r.poll()["trade_id"].tolist() == list(range(12))


def test_writer_restart_after_crash_bumps_generation_and_reader_resyncs(shm_name: str) -> None:
    child = run_child(
        """
        import sys, numpy as np
        from pipeline.ipc.segments import RingWriter
        from pipeline.ipc.records import TICK_DTYPE
        w = RingWriter.create(sys.argv[1], TICK_DTYPE, 64)
        batch = np.zeros(5, TICK_DTYPE); batch["trade_id"] = np.arange(5)
        w.publish_many(batch)
        # crash: exit without close(), leaving the segment and a dead writer pid behind
        """,
        shm_name,
    )
    child.communicate(timeout=30)
    assert child.returncode == 0
    r = RingReader.attach(shm_name, name="survivor", start="oldest", check_interval_s=0.0)
    w2 = None
    try:
        assert r.generation == 1
        assert not r.writer_alive()
        assert ring_stats(shm_name)["writer_alive"] is False
        w2 = RingWriter.create(shm_name, TICK_DTYPE, 64)
        assert w2.generation == 2
        w2.publish_many(ticks(100, 3))
        # the old segment's records come first, then the switch, then the new generation
        assert r.poll()["trade_id"].tolist() == [0, 1, 2, 3, 4]
        assert r.poll().size == 0  # idle: notices the new segment
        assert (r.resyncs, r.generation) == (1, 2)
        assert r.poll()["trade_id"].tolist() == [100, 101, 102]
        assert r.missed == 0
        assert r.writer_alive()
        assert [x["name"] for x in ring_stats(shm_name)["readers"]] == ["survivor"]
    finally:
        r.close()
        if w2 is not None:
            w2.close()
        shm.unlink(shm_name)


def test_clean_restart_is_followed_too(shm_name: str) -> None:
    w = RingWriter.create(shm_name, TICK_DTYPE, 8)
    r = RingReader.attach(shm_name, check_interval_s=0.0)
    w2 = None
    try:
        w.publish_many(ticks(0, 2))
        w.close()
        assert r.poll()["trade_id"].tolist() == [0, 1]  # still readable after unlink
        assert r.poll().size == 0
        assert r.writer_closed
        w2 = RingWriter.create(shm_name, TICK_DTYPE, 8)
        w2.publish_many(ticks(50, 12))  # more than the capacity before the reader looks
        # a blocking wait notices the new segment by itself, then reads it
        assert r.poll_blocking(timeout_s=30)["trade_id"].tolist() == list(range(54, 62))
        assert r.resyncs == 1
        assert not r.writer_closed
        assert r.missed == 4  # sequences 50..53 of the new segment were overwritten
    finally:
        r.close()
        if w2 is not None:
            w2.close()


def test_restart_with_another_dtype_is_an_error(shm_name: str) -> None:
    w = RingWriter.create(shm_name, TICK_DTYPE, 8)
    r = RingReader.attach(shm_name, check_interval_s=0.0)
    w.close()
    w2 = RingWriter.create(shm_name, np.dtype("<i8"), 8)
    try:
        with pytest.raises(RingLayoutError, match="restarted with record dtype"):
            r.poll()
    finally:
        r.close()
        w2.close()


def test_attached_reader_process_exit_does_not_unlink(writer: RingWriter, shm_name: str) -> None:
    child = run_child(
        """
        import sys
        from pipeline.ipc.segments import RingReader
        r = RingReader.attach(sys.argv[1], name="visitor", start="oldest")
        print(len(r.poll()), flush=True)
        # exit without close(): a resource_tracker, had it been involved, would unlink now
        """,
        shm_name,
    )
    writer.publish_many(ticks(0, 4))
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    assert out.strip() in {"0", "4"}
    assert (shm.SHM_DIR / shm_name).exists()
    with RingReader.attach(shm_name) as r:
        writer.publish_many(ticks(4, 1))
        assert r.poll()["trade_id"].tolist() == [4]
    # the visitor's entry (dead pid) was reaped when this reader registered
    assert ring_stats(shm_name)["readers"] == []


def test_stats_show_reader_lag_and_reap_dead_readers(writer: RingWriter, shm_name: str) -> None:
    child = run_child(
        """
        import sys
        from pipeline.ipc.segments import RingReader
        r = RingReader.attach(sys.argv[1], name="doomed")
        print("ready", flush=True)
        sys.stdin.readline()
        """,
        shm_name,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        with RingReader.attach(shm_name, name="monitor") as r:
            writer.publish_many(ticks(0, 5))
            r.poll(max_records=2)
            stats = ring_stats(shm_name)
            by_name = {x["name"]: x for x in stats["readers"]}
            assert set(by_name) == {"doomed", "monitor"}
            assert by_name["monitor"]["lag"] == 3
            assert by_name["monitor"]["pid"] == os.getpid()
            assert by_name["doomed"]["lag"] == 5
            assert by_name["doomed"]["pid"] == child.pid
            assert stats["writer_alive"] is True
            assert stats["cursor"] == 5
            text = format_stats(stats, now_ns=by_name["monitor"]["attached_ns"])
            assert "monitor" in text
            assert "doomed" in text
            assert (f"{stats['sleeping']} reader(s) asleep on its futex" if stats["wakeups"]
                    else "readers nap") in text
            child.kill()
            child.wait(timeout=10)
            assert [x["name"] for x in ring_stats(shm_name)["readers"]] == ["monitor"]
    finally:
        child.kill()
        child.communicate(timeout=10)


def test_full_readers_table_still_reads(shm_name: str) -> None:
    w = RingWriter.create(shm_name, TICK_DTYPE, 8, max_readers=2)
    readers = [RingReader.attach(shm_name, name=f"r{k}") for k in range(3)]
    try:
        assert [r.registered for r in readers] == [True, True, False]
        w.publish_many(ticks(0, 2))
        assert all(r.poll()["trade_id"].tolist() == [0, 1] for r in readers)
        readers[0].close()  # frees an entry
        with RingReader.attach(shm_name, name="r3") as r3:
            assert r3.registered
    finally:
        for r in readers:
            r.close()
        w.close()


def test_wait_returns_when_data_is_there(writer: RingWriter, shm_name: str) -> None:
    with RingReader.attach(shm_name) as r:
        assert r.wait(timeout_s=0.002) is False
        assert r.poll_blocking(timeout_s=0.0).size == 0
        writer.publish_many(ticks(0, 2))
        assert r.wait(timeout_s=0) is True
        assert r.poll_blocking(timeout_s=1.0, spin=True)["trade_id"].tolist() == [0, 1]


def test_cli_stats_json_and_text(
    writer: RingWriter, shm_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with RingReader.attach(shm_name, name="cli-test"):
        writer.publish_many(ticks(0, 7))
        assert main(["ring", "stats", shm_name, "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["cursor"] == 7
        assert data["readers"][0]["name"] == "cli-test"
        assert data["readers"][0]["lag"] == 7
        assert main(["ring", "stats", shm_name]) == 0
        out = capsys.readouterr().out
        assert f"ring {shm_name}" in out
        assert "cli-test" in out
        assert main(["ring", "list", "--prefix", shm_name]) == 0
        assert capsys.readouterr().out.split() == [shm_name]
    assert main(["ring", "stats", shm_name + "_nope"]) == 1
    assert "not found" in capsys.readouterr().err


def test_cli_on_a_fifo_says_why_instead_of_hanging(
    shm_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    os.mkfifo(shm.SHM_DIR / shm_name, 0o600)
    try:
        assert main(["ring", "stats", shm_name]) == 1
        assert "not a regular file (a FIFO)" in capsys.readouterr().err
        assert main(["ring", "list", "--prefix", shm_name]) == 0
        assert capsys.readouterr().out == ""
    finally:
        (shm.SHM_DIR / shm_name).unlink()


class FakeTime:
    """perf_counter + sleep for RingReader.wait: sleeping advances the clock by the nap."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.naps: list[float] = []
        self.on_sleep: Any = None

    def perf_counter(self) -> float:
        self.t += 1e-7  # each look at the clock costs a little, so spinning ends
        return self.t

    def sleep(self, s: float) -> None:
        self.naps.append(s)
        self.t += s
        if self.on_sleep is not None:
            self.on_sleep(self)


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    import pipeline.ipc.segments as segments_mod

    ft = FakeTime()
    monkeypatch.setattr(segments_mod.time, "perf_counter", ft.perf_counter)
    monkeypatch.setattr(segments_mod.time, "sleep", ft.sleep)
    # the nap schedule is the fallback where there are no futex wake-ups: as if not built
    monkeypatch.setattr(segments_mod.wake, "doorbell", lambda *_args: None)
    return ft


def test_wait_naps_by_the_readers_idle_policy(
    writer: RingWriter, shm_name: str, fake_time: FakeTime
) -> None:
    from pipeline.ipc.idle import IDLE_PROFILES, nap_schedule

    with RingReader.attach(shm_name, idle="balanced", check_interval_s=1e9) as r:
        assert r.idle == IDLE_PROFILES["balanced"]
        assert r.wait(timeout_s=0.03) is False
        expect = [n for _, n in nap_schedule(r.idle, 0.03)]
        got = fake_time.naps
        assert got[: len(expect) - 1] == pytest.approx(expect[:-1], rel=0.02)
        assert max(got) == pytest.approx(1e-3)  # relaxed after 10 ms of idleness
        assert max(n for n in got[:40]) == pytest.approx(200e-6)
        # the idle period goes on across timed-out waits: no spin, no short naps again
        fake_time.naps.clear()
        assert r.wait(timeout_s=0.005) is False
        assert min(fake_time.naps[:-1]) == pytest.approx(1e-3)
        # data ends it: the next idle period starts short again
        writer.publish_many(ticks(0, 1))
        assert r.wait(timeout_s=1.0) is True
        assert r.poll().size == 1
        fake_time.naps.clear()
        assert r.wait(timeout_s=0.001) is False
        assert fake_time.naps[0] == pytest.approx(10e-6)


def test_wait_wakes_for_a_record_published_during_a_nap(
    writer: RingWriter, shm_name: str, fake_time: FakeTime
) -> None:
    with RingReader.attach(shm_name, idle="low-cpu", check_interval_s=1e9) as r:

        def publish_on_third_nap(ft: FakeTime) -> None:
            if len(ft.naps) == 3:
                writer.publish_many(ticks(5, 1))

        fake_time.on_sleep = publish_on_third_nap
        assert r.wait() is True  # no timeout: returns once the record is there
        assert len(fake_time.naps) == 3
        assert fake_time.naps[0] == pytest.approx(50e-6)  # low-cpu: no spin, naps from 50 us
        assert r.poll()["trade_id"].tolist() == [5]


def test_wait_explicit_caps_override_the_policy(
    writer: RingWriter, shm_name: str, fake_time: FakeTime
) -> None:
    with RingReader.attach(shm_name, check_interval_s=1e9) as r:
        assert r.wait(timeout_s=0.05, max_sleep_s=1e-3) is False
        assert max(fake_time.naps) == pytest.approx(1e-3)
        assert fake_time.naps[5] == pytest.approx(320e-6)  # 1 ms cap from the start
    with RingReader.attach(shm_name, idle="low-latency", check_interval_s=1e9) as r:
        fake_time.naps.clear()
        assert r.wait(timeout_s=0.05) is False
        assert max(fake_time.naps) == pytest.approx(200e-6)


def test_attach_refuses_an_unknown_idle_profile(writer: RingWriter, shm_name: str) -> None:
    with pytest.raises(ValueError, match="unknown idle profile"):
        RingReader.attach(shm_name, idle="sleepy")


def test_prefault_allocates_the_whole_segment_up_front(shm_name: str) -> None:
    w = RingWriter.create(shm_name, TICK_DTYPE, 1 << 12)
    try:
        st = os.stat(f"/dev/shm/{shm_name}")
        assert st.st_blocks * 512 >= w.layout.total_size  # no page left to fault in later
    finally:
        w.close()
    w = RingWriter.create(shm_name, TICK_DTYPE, 1 << 12, prefault=False)
    try:
        st = os.stat(f"/dev/shm/{shm_name}")
        assert st.st_blocks * 512 < w.layout.total_size  # sparse: pages come on first write
    finally:
        w.close()


def test_a_full_dev_shm_is_a_clear_error_not_a_sigbus_later(
    shm_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import pipeline.ipc.segments as segments_mod

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segments_mod.os, "posix_fallocate", no_space)
    with pytest.raises(RingError, match=r"cannot allocate .* in /dev/shm"):
        RingWriter.create(shm_name, TICK_DTYPE, 1 << 12)
    assert not os.path.exists(f"/dev/shm/{shm_name}")  # nothing left behind


def test_default_idle_profile_keeps_the_short_naps(writer: RingWriter, shm_name: str) -> None:
    """Readers that do not choose (order-reply waits) keep the 200 us cap however long idle."""
    from pipeline.ipc.idle import IDLE_PROFILES, IdlePolicy

    with RingReader.attach(shm_name) as r:
        assert r.idle == IDLE_PROFILES["low-latency"]
        assert r.idle.relaxed_max_sleep_s == r.idle.max_sleep_s == 200e-6
    custom = IdlePolicy(spin_s=0.0, relaxed_max_sleep_s=5e-3)
    with RingReader.attach(shm_name, idle=custom) as r:
        assert r.idle is custom
