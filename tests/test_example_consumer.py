"""examples/print_ticks.py really is a complete consumer: run it against a ring we write."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.ipc.records import TICK_DTYPE, Kind
from pipeline.ipc.ring import RingWriter, ring_stats

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "print_ticks.py"


def test_example_is_short() -> None:
    code = [
        line for line in EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", '"""'))
    ]  # fmt: skip
    assert len(code) <= 12, code


def test_print_ticks_prints_what_the_ring_carries(shm_name: str) -> None:
    w = RingWriter.create(shm_name, TICK_DTYPE, 1024, ["BTCUSDT", "ETHUSDT"])
    try:
        env = {**os.environ, "PYTHONPATH": str(EXAMPLE.parents[1])}
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLE), shm_name, "3"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
        )  # fmt: skip
        # the example attaches at the head: publish once it is registered as a reader
        deadline = time.monotonic() + 20
        while not ring_stats(shm_name)["readers"]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        batch = np.zeros(3, dtype=TICK_DTYPE)
        batch["kind"] = int(Kind.AGG_TRADE)
        batch["symbol"] = [0, 1, 1]
        batch["trade_id"] = [11, 12, 13]
        batch["price"] = [97000.5, 3098.07, 3098.1]
        batch["qty"] = [0.001, 0.5, 0.25]
        w.publish_many(batch)
        out, err = proc.communicate(timeout=30)
    finally:
        w.close()
    assert proc.returncode == 0, err
    assert out.splitlines() == [
        "BTCUSDT 1 11 97000.5 0.001",
        "ETHUSDT 1 12 3098.07 0.5",
        "ETHUSDT 1 13 3098.1 0.25",
    ]
