"""Shared-memory metrics blocks: seqlock snapshots, lifetime, errors, discovery."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.ipc import shm
from pipeline.ipc.metrics import (
    W_SEQ,
    MetricsBlock,
    MetricsBusyError,
    MetricsError,
    MetricsLayoutError,
    MetricsNotFoundError,
    list_blocks,
    snapshot_all,
)

ROOT = Path(__file__).resolve().parents[1]
FIELDS = [("state", "<i8"), ("rtt_us", "<f8"), ("reconnects", "i8")]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        self.now += 1
        return self.now


def test_set_incr_snapshot(shm_name: str) -> None:
    clock = FakeClock()
    m = MetricsBlock.create(shm_name, FIELDS, clock=clock)
    try:
        assert stat.S_IMODE((shm.SHM_DIR / shm_name).stat().st_mode) == 0o600
        m.set(state=3, rtt_us=120.5)
        assert m.incr("reconnects") == 1
        assert m.incr("reconnects", 2) == 3
        reader = MetricsBlock.attach(shm_name)
        try:
            snap = reader.snapshot()
            assert snap["state"] == 3
            assert snap["rtt_us"] == 120.5
            assert snap["reconnects"] == 3
            assert isinstance(snap["state"], int)
            assert snap["_updated_at_ns"] == clock.now
            assert snap["_writer_pid"] == os.getpid()
            assert reader.writer_alive()
            with pytest.raises(MetricsError, match="read-only"):
                reader.set(state=1)
        finally:
            reader.close()
        with pytest.raises(KeyError, match="nope"):
            m.set(nope=1)
    finally:
        m.close()
    assert not (shm.SHM_DIR / shm_name).exists()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ([], "at least one"),
        ([("a", "<i8"), ("a", "<f8")], "duplicate"),
        ([("not an identifier", "<i8")], "identifier"),
        ([("s", "U8")], "unsupported dtype"),
    ],
)
def test_bad_field_lists(shm_name: str, fields: list[tuple[str, str]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MetricsBlock.create(shm_name, fields)


def test_attach_missing_and_foreign(shm_name: str) -> None:
    with pytest.raises(MetricsNotFoundError, match=shm_name):
        MetricsBlock.attach(shm_name)
    path = shm.SHM_DIR / shm_name
    path.write_bytes(b"x" * 4096)
    os.chmod(path, 0o600)  # ours and private (the trust rule passes), but not a block
    try:
        with pytest.raises(MetricsLayoutError, match=f"'{shm_name}' is not a metrics block"):
            MetricsBlock.attach(shm_name)
        with pytest.raises(MetricsLayoutError):
            MetricsBlock.create(shm_name, FIELDS)  # never clobbers what it does not understand
        assert path.read_bytes() == b"x" * 4096
    finally:
        path.unlink()


def test_live_owner_is_not_replaced_but_a_dead_ones_block_is(shm_name: str) -> None:
    m = MetricsBlock.create(shm_name, FIELDS)
    try:
        with pytest.raises(MetricsError, match="live process"):
            MetricsBlock.create(shm_name, FIELDS)
    finally:
        m.close()
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pipeline.ipc.metrics import MetricsBlock; "
            "MetricsBlock.create(sys.argv[1], [('x', '<i8')]).set(x=5)",
            shm_name,
        ],
        cwd=ROOT,
        timeout=30,
        check=True,
    )
    assert child.returncode == 0
    with MetricsBlock.attach(shm_name) as left:  # left behind by a dead owner
        assert left.snapshot()["x"] == 5
        assert not left.writer_alive()
    m2 = MetricsBlock.create(shm_name, FIELDS)
    try:
        assert m2.writer_pid == os.getpid()
    finally:
        m2.close()


def test_list_blocks_and_snapshot_all(shm_name: str) -> None:
    a = MetricsBlock.create(shm_name + ".a", FIELDS)
    b = MetricsBlock.create(shm_name + ".b", [("n", "<i8")])
    other = shm.SHM_DIR / (shm_name + ".junk")
    other.write_bytes(b"not metrics")
    try:
        b.set(n=9)
        assert list_blocks(shm_name) == [shm_name + ".a", shm_name + ".b"]
        snaps = snapshot_all(shm_name)
        assert snaps[shm_name + ".b"]["n"] == 9
        assert snaps[shm_name + ".a"]["_writer_alive"] is True
    finally:
        a.close()
        b.close()
        other.unlink()


def test_snapshot_gives_up_on_a_writer_stuck_mid_update(shm_name: str) -> None:
    m = MetricsBlock.create(shm_name, FIELDS)
    try:
        m._hdr[W_SEQ] = 1  # odd: as if the owner died inside set()
        with pytest.raises(MetricsBusyError, match=shm_name):
            m.snapshot(max_tries=100)
    finally:
        m.close()


def test_snapshots_are_consistent_while_another_process_writes(shm_name: str) -> None:
    code = textwrap.dedent(
        """
        import sys
        from pipeline.ipc.metrics import MetricsBlock
        m = MetricsBlock.create(sys.argv[1], [("a", "<i8"), ("b", "<f8"), ("c", "<i8")])
        print("ready", flush=True)
        sys.stdin.readline()
        for i in range(1, 200_001):
            m.set(a=i, b=i * 0.5, c=-i)
        print("done", flush=True)
        sys.stdin.readline()
        m.close()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, shm_name],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        block = MetricsBlock.attach(shm_name)
        try:
            child.stdin.write("go\n")
            child.stdin.flush()
            seen = set()
            for _ in range(1_000_000):  # bounded: a dead child must not hang the test
                snap = block.snapshot()
                a = snap["a"]
                assert snap["b"] == a * 0.5, snap
                assert snap["c"] == -a, snap
                seen.add(a)
                if a == 200_000 or len(seen) >= 5000:
                    break
            assert len(seen) > 10  # we really raced a moving writer
        finally:
            block.close()
    finally:
        child.kill()
        child.communicate(timeout=10)
        shm.unlink(shm_name)


def test_out_of_range_values_saturate_instead_of_raising(shm_name: str) -> None:
    """A venue number beyond int64 (``rateLimits`` count 2**63, ``retryAfter`` 10**17 ms in ns)
    used to raise out of ``set`` and kill the caller's flush task; now it is clamped."""
    fields = [("count", "<i8"), ("big", "<u8"), ("ratio", "<f8")]
    with MetricsBlock.create(shm_name, fields) as m:
        m.set(count=2**63, big=-5, ratio=10**400)
        snap = m.snapshot()
        assert (snap["count"], snap["big"], snap["ratio"]) == (2**63 - 1, 0, float("inf"))
        m.set(count=-(2**70), big=2**64 + 7)
        snap = m.snapshot()
        assert (snap["count"], snap["big"]) == (-(2**63), 2**64 - 1)
        m.set(count=float("inf"))
        assert m.snapshot()["count"] == 2**63 - 1
        m.set(count=float("nan"))
        assert m.snapshot()["count"] == 0
        m.set(count=2**63 - 2)
        assert m.incr("count", 10) == 2**63 - 1  # incr saturates too
        m.set(count=5, ratio=1.5)  # in range: stored exactly, nothing counted
        assert (m.snapshot()["count"], m.snapshot()["ratio"]) == (5, 1.5)
        assert m.saturated == 8
        with pytest.raises(TypeError):
            m.set(count="many")  # type: ignore[arg-type]  # not a number: a programming error
