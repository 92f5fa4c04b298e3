"""Writer and readers in separate processes over real shared memory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

from pipeline.ipc.records import TICK_DTYPE
from pipeline.ipc.segments import RingReader, RingWriter, ring_stats

pytestmark = pytest.mark.slow

MASK = (1 << 61) - 1


def checksum(seq: np.ndarray) -> np.ndarray:
    return (seq * 2654435761 + 12345) & MASK


def make_records(start: int, n: int) -> np.ndarray:
    out = np.zeros(n, TICK_DTYPE)
    seq = np.arange(start, start + n, dtype=np.int64)
    out["trade_id"] = seq
    out["aux_id"] = checksum(seq)
    out["price"] = seq * 0.25
    out["symbol"] = seq % 7
    return out


def _intact(b: np.ndarray) -> bool:
    seq = b["trade_id"]
    return bool(
        np.array_equal(b["aux_id"], checksum(seq))
        and np.array_equal(b["price"], seq * 0.25)
        and np.array_equal(b["symbol"], seq % 7)
    )


def _reader_every_record(ring: str, name: str, total: int) -> dict[str, Any]:
    r = RingReader.attach(ring, name=name)
    print("ready", flush=True)
    expected = 0
    error = ""
    deadline = time.monotonic() + 60
    try:
        while expected < total and time.monotonic() < deadline:
            b = r.poll_blocking(timeout_s=0.2)
            if not b.size:
                continue
            seq = b["trade_id"]
            if not np.array_equal(seq, np.arange(expected, expected + len(b))):
                error = f"expected {expected}, got {seq[:3].tolist()}..."
                break
            if not _intact(b):
                error = f"corrupt record in [{expected}, {expected + len(b)})"
                break
            expected += len(b)
        return {"name": name, "received": expected, "missed": r.missed, "error": error}
    finally:
        r.close()


def _slow_reader(ring: str, total: int) -> dict[str, Any]:
    r = RingReader.attach(ring, name="slow")
    print("ready", flush=True)
    sys.stdin.readline()  # held back until the writer has lapped us
    received: list[int] = []
    error = ""
    deadline = time.monotonic() + 60
    try:
        while (not received or received[-1] < total - 1) and time.monotonic() < deadline:
            b = r.poll_blocking(timeout_s=0.2, max_records=100)
            if b.size and not _intact(b):
                error = "corrupt record"
            received.extend(b["trade_id"].tolist())
        return {"received": received, "missed": r.missed, "error": error}
    finally:
        r.close()


def spawn(*args: str) -> subprocess.Popen[str]:
    """This file run as a script: a separate interpreter, like a real consumer process."""
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def wait_ready(p: subprocess.Popen[str]) -> None:
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    assert line == "ready", f"child said {line!r}"


def result(p: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=10)


def test_two_reader_processes_see_a_million_records_exactly_once(shm_name: str) -> None:
    total = 1_000_000
    records = make_records(0, total)
    w = RingWriter.create(shm_name, TICK_DTYPE, 1 << 20)
    procs = []
    try:
        for k in range(2):
            procs.append(spawn("every", shm_name, f"reader{k}", str(total)))
        for p in procs:
            wait_ready(p)
        pos = 0
        for i in range(2000):  # single-record publishes, both numpy rows and tuples
            w.publish(records[pos] if i % 2 else tuple(records[pos].tolist()))
            pos += 1
        sizes = [1, 7, 100, 999, 3, 250, 4096, 64]
        k = 0
        while pos < total:
            n = min(sizes[k % len(sizes)], total - pos)
            w.publish_many(records[pos : pos + n])
            pos += n
            k += 1
        assert w.cursor == total
        for res in [result(p) for p in procs]:
            assert res["error"] == ""
            assert res["received"] == total
            assert res["missed"] == 0
    finally:
        _stop(procs)
        w.close()


def test_slow_reader_is_lapped_counts_exactly_what_it_missed_and_carries_on(
    shm_name: str,
) -> None:
    cap = 1024
    phase1, phase2 = 5000, 3000
    total = phase1 + phase2
    records = make_records(0, total)
    w = RingWriter.create(shm_name, TICK_DTYPE, cap)
    p = spawn("slow", shm_name, str(total))
    try:
        wait_ready(p)
        for pos in range(0, phase1, 50):  # the reader is held back: it will be lapped
            w.publish_many(records[pos : pos + 50])
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
        for pos in range(phase1, total, 50):
            w.publish_many(records[pos : pos + 50])
            # pace the test writer (not the ring) so the reader can show it keeps up again
            t_end = time.monotonic() + 5
            while time.monotonic() < t_end:
                readers = ring_stats(shm_name)["readers"]
                if not readers or readers[0]["lag"] < cap // 2:
                    break
                time.sleep(0.001)
        res = result(p)
    finally:
        _stop([p])
        w.close()
    received = res["received"]
    assert res["error"] == ""
    assert received == sorted(set(received)), "out of order or duplicated"
    assert received[-1] == total - 1
    unseen = set(range(total)) - set(received)
    assert res["missed"] == len(unseen)  # the sequence numbers prove the count
    assert res["missed"] >= phase1 - cap  # it really was lapped
    assert len([s for s in received if s >= phase1]) > cap  # and read on afterwards


if __name__ == "__main__":
    if sys.argv[1] == "every":
        res = _reader_every_record(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        res = _slow_reader(sys.argv[2], int(sys.argv[3]))
    print(json.dumps(res), flush=True)
