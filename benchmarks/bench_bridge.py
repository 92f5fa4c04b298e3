"""The NATS bridge end to end: source ring -> `pipeline bridge publish` -> JetStream (a real
nats-server from the venv) -> `pipeline bridge mirror` -> mirror ring -> a reader here.

Cases: 1 vs 64 records per message (batching is the design), each at saturation and at fixed
source rates of 10 k and 100 k records/s (``BENCH_BRIDGE_RATES``, ``max`` for saturation).

* saturation: the source ring is filled with ``N`` records first, then the bridge starts; the rate
  is records bridged per second between the mirror's first and last record (the processes'
  start-up is not in it);
* fixed rates: once both bridge processes are up (a warm-up record went through), a producer
  process writes the source ring at the rate for the window; records/s is what arrived in the
  window (+2 s to drain) over the window; latency is
  ``seen on the mirror ring`` minus the source's ``publish_time_ns`` (the mirror keeps the
  source's bytes, stamps included). Same host, same clock here; across hosts this number is only
  as good as the clocks' sync;
* CPU per record: user+sys of the publisher and of the mirror process over the window (psutil),
  divided by the records bridged. The NATS server's CPU is reported apart.

Everything runs on this one machine (2 cores here, shared by the producer, both bridge processes,
the server and the reader): the numbers are a floor for a real deployment, not its ceiling.
``BENCH_SCALE`` (default 1.0) scales the window and N.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from summary import emit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from nats_helpers import NatsServer  # the tests' real-server helper, shared on purpose

from pipeline.ipc import shm
from pipeline.ipc.records import TICK_DTYPE, agg_trade_record
from pipeline.ipc.ring import RingError, RingReader, RingWriter

SCALE = float(os.environ.get("BENCH_SCALE", "1.0"))
WINDOW_S = max(1.0, 5.0 * SCALE)
SATURATION_N = max(20_000, int(300_000 * SCALE))
RATES = os.environ.get("BENCH_BRIDGE_RATES", "max,10000,100000").split(",")
BATCHES = (1, 64)
ROWS: list[dict[str, Any]] = []


def _feeder(name: str, rate: int, seconds: float, ready: Any, go: Any) -> None:
    """Producer process: a new ring ``name`` with one warm-up record (``ready``), then, once
    ``go`` is set (the bridge is up and has carried the warm-up record), ``rate`` records/s
    for ``seconds`` in 1 ms ticks."""
    w = RingWriter.create(name, TICK_DTYPE, 1 << 20, ["BTCUSDT", "ETHUSDT"])
    w.configure_staging("publish_time_ns")
    w.stage(agg_trade_record(0, 0, 100.0, 1.0, 0, 0, 0, 0))
    w.commit(time.time_ns())
    ready.set()
    go.wait(120)
    per_ms = max(1, rate // 1000)
    ids = [1, 0]
    start = time.perf_counter()
    k = 0
    tick = 0
    while time.perf_counter() - start < seconds:
        for _ in range(per_ms):
            s = k & 1
            rec = agg_trade_record(s, 0, 100.0, 1.0, ids[s], ids[s], 0, time.time_ns())
            ids[s] += 1
            k += 1
            w.stage(rec)
        w.commit(time.time_ns())
        tick += 1
        delay = start + tick / 1000 - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    time.sleep(3.0)  # keep the ring until the bridge has read it
    w.close()


@contextmanager
def bridge(url: str, source: str, mirror: str, batch: int, root: Path,
           case: str) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Publisher and mirror for one case: a stream (and subjects) of its own."""
    def spawn(*args: str) -> subprocess.Popen[bytes]:
        with open(root / f"{args[0]}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "pipeline", "--log-format", "json", "bridge", *args,
                 "--nats-url", url, "--stream", f"B{case}", "--metrics-name", ""],
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip

    pub = spawn("publish", "--ring", source, "--batch-records", str(batch),
                "--max-in-flight", "1024", "--subject-prefix", f"b{case}")  # fmt: skip
    mir = spawn("mirror", "--ring", mirror, "--state-dir", str(root / "state"),
                "--capacity", str(1 << 20))  # fmt: skip
    try:
        yield {"publish": psutil.Process(pub.pid), "mirror": psutil.Process(mir.pid)}
    finally:
        for p in (pub, mir):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shm.unlink(mirror)


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def attach(name: str, limit_s: float = 30.0) -> RingReader:
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return RingReader.attach(name, "bench", start="oldest")
        except RingError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def run_case(srv: NatsServer, batch: int, rate: str, root: Path) -> dict[str, Any]:
    tag = f"bb_{os.getpid()}_{batch}_{rate}"
    source, mirror = f"{tag}_src", f"{tag}_mir"
    server = psutil.Process(srv.proc.pid) if srv.proc else None
    row: dict[str, Any] = {"batch": batch, "rate": rate}
    if rate == "max":
        w = RingWriter.create(source, TICK_DTYPE, 1 << 20, ["BTCUSDT", "ETHUSDT"])
        w.configure_staging("publish_time_ns")
        for k in range(SATURATION_N):
            w.stage(agg_trade_record(k & 1, 0, 100.0, 1.0, k >> 1, k >> 1, 0, 0))
            if k % 256 == 255:
                w.commit(time.time_ns())
        w.commit(time.time_ns())
        try:
            with bridge(srv.url, source, mirror, batch, root, f"{batch}_{rate}") as procs:
                r = attach(mirror)
                got = 0
                t_first = 0.0
                first_n = 0
                c0 = {k: cpu_s(p) for k, p in procs.items()}
                s0 = cpu_s(server) if server else 0.0
                deadline = time.monotonic() + 300
                while got < SATURATION_N and time.monotonic() < deadline:
                    n = len(r.poll())
                    if n and not t_first:
                        t_first, first_n = time.perf_counter(), n
                    got += n
                    if not n:
                        time.sleep(0.0005)
                t_last = time.perf_counter()
                c1 = {k: cpu_s(p) for k, p in procs.items()}
                s1 = cpu_s(server) if server else 0.0
                r.close()
        finally:
            w.close()
        bridged = got - first_n
        row.update(records=got, records_per_s=bridged / max(1e-9, t_last - t_first))
        row.update({f"cpu_us_per_rec_{k}": (c1[k] - c0[k]) * 1e6 / max(1, got) for k in c0})
        row["cpu_us_per_rec_server"] = (s1 - s0) * 1e6 / max(1, got)
        row["missed"] = 0
        return row
    target = int(rate)
    ctx = mp.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    prod = ctx.Process(target=_feeder, args=(source, target, WINDOW_S, ready, go), daemon=True)
    prod.start()
    ready.wait(30)
    lat: list[np.ndarray] = []
    try:
        with bridge(srv.url, source, mirror, batch, root, f"{batch}_{rate}") as procs:
            r = attach(mirror)
            while not len(r.poll()):  # the warm-up record: both bridge processes are up
                time.sleep(0.001)
            c0 = {k: cpu_s(p) for k, p in procs.items()}
            s0 = cpu_s(server) if server else 0.0
            go.set()
            t0 = time.perf_counter()
            got = 0
            while time.perf_counter() - t0 < WINDOW_S + 2:
                b = r.poll()
                if len(b):
                    lat.append(time.time_ns() - b["publish_time_ns"])
                    got += len(b)
                else:
                    time.sleep(0.0001)
            c1 = {k: cpu_s(p) for k, p in procs.items()}
            s1 = cpu_s(server) if server else 0.0
            row["missed"] = r.missed
            r.close()
    finally:
        go.set()
        prod.join(30)
        shm.unlink(source)
    all_lat = np.concatenate(lat) / 1e3 if lat else np.zeros(1)
    row.update(records=got, records_per_s=got / WINDOW_S, p50_us=float(np.percentile(all_lat, 50)),
               p99_us=float(np.percentile(all_lat, 99)))  # fmt: skip
    row.update({f"cpu_us_per_rec_{k}": (c1[k] - c0[k]) * 1e6 / max(1, got) for k in c0})
    row["cpu_us_per_rec_server"] = (s1 - s0) * 1e6 / max(1, got)
    return row


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as d:
        srv = NatsServer(Path(d))
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


CASES = [(b, r) for r in RATES for b in BATCHES]


@pytest.mark.parametrize(("batch", "rate"), CASES, ids=[f"batch{b}-{r}" for b, r in CASES])
def test_bridge(benchmark: Any, nats_server: NatsServer, batch: int, rate: str,
                tmp_path: Path) -> None:  # fmt: skip
    benchmark.group = f"bridge {rate} records/s"
    res: dict[str, Any] = {}
    benchmark.pedantic(lambda: res.update(run_case(nats_server, batch, rate, tmp_path)),
                       rounds=1, iterations=1)  # fmt: skip
    assert res["records"] > 0
    if rate != "max" and batch == 64:
        assert res["missed"] == 0
    benchmark.extra_info.update(res)
    ROWS.append(res)
    if len(ROWS) == len(CASES):
        emit(format_rows(ROWS))


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = ["", "bridge: ring -> publish -> JetStream -> mirror -> ring, one host, 2 cores "
             "(latency = mirror seen - source publish_time_ns, us)",
             f"{'rate':>7} {'batch':>5} {'records/s':>10} {'p50':>8} {'p99':>9} "
             f"{'CPU us/rec: publish':>20} {'mirror':>7} {'server':>7}"]  # fmt: skip
    for r in rows:
        p50 = f"{r['p50_us']:.0f}" if "p50_us" in r else "-"
        p99 = f"{r['p99_us']:.0f}" if "p99_us" in r else "-"
        lines.append(
            f"{r['rate']:>7} {r['batch']:>5} {r['records_per_s']:>10.0f} {p50:>8} {p99:>9} "
            f"{r['cpu_us_per_rec_publish']:>20.2f} {r['cpu_us_per_rec_mirror']:>7.2f} "
            f"{r['cpu_us_per_rec_server']:>7.2f}"
        )
    return "\n".join(lines)
