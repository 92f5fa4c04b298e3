"""End to end on one machine: simulator -> ingest -> ring -> K consumer processes, against the
same load fanned out through one ``multiprocessing.Queue`` per consumer, in the same run.

Paths:
  ring      ``pipeline sim`` -> ``pipeline ingest`` (picows + msgspec) -> tick ring -> K spawned
            consumers (RingReader, idle wait without spinning, as a strategy would run on 2 cores)
  mp_queue  ``pipeline sim`` -> a spawned "ingest-like" process built the obvious way (websockets
            client, orjson.loads, one tuple per message put on one Queue per consumer) -> K
            spawned consumers doing ``Queue.get()``

Loads (aggTrade streams of 2 symbols): fixed totals of 1 k, 10 k, 100 k messages/s and
saturation (``--rate max``: the simulator as fast as clients read). Fixed rates ask the simulator
for exact aggTrade message rates (``--rate N --rate-unit msgs``, N = total / symbols per symbol);
above a few thousand msgs/s per symbol it generates each 10 ms turn with its batched walk, so
100 k msgs/s costs it about a third of a core and it reaches several hundred thousand msgs/s at
``max``. The *achieved* rate is what gets reported; a case whose producer got less than 80 % of
its target is flagged ``sim-bound`` (with the batched walk that means the machine, or the
producer's own ceiling, not the simulator's, was the limit).

Reported per case (``benchmark.extra_info`` and the table printed at the end of the session):
msgs/s delivered to each consumer; per-stage latency percentiles from the record stamps, computed
exactly like scripts/latency_probe.py (exchange->recv, recv->publish, publish->seen, end-to-end
and ``local`` = recv->seen, which excludes the exchange's 1 ms timestamp resolution); and CPU
microseconds per message of the producer (ingest or the Queue fan-out process) plus all
consumers (psutil user+sys over the measurement window, divided by the messages received from
the socket in it). The simulator's CPU is not counted: it is the exchange.

Answers are checked: every consumer saw each symbol's aggregate trade ids contiguous (any hole
accounted for by the ring's ``missed`` counter, which must be 0 at the fixed rates), nothing
twice, and a non-zero count in the window.

Scale with ``BENCH_SCALE`` (default 1.0 = 10 s windows, K in 1/2/4, all rates); below 0.1 the
matrix shrinks to a smoke configuration (K = 1, 2; 1 k/s and saturation; 1 s windows).
``BENCH_E2E_K`` / ``BENCH_E2E_RATES`` (comma-separated, ``max`` for saturation) override it.
``BENCH_E2E_JSON=path`` also writes the summary rows as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from summary import emit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import latency_probe as lp  # the probe's stage math, shared on purpose

SCALE = float(os.environ.get("BENCH_SCALE", "1.0"))
SMOKE = SCALE < 0.1
SYMBOLS = ["BTCUSDT", "ETHUSDT"]
WINDOW_S = max(1.0, 10.0 * SCALE)
CTX = mp.get_context("spawn")
E2E_STAGES = ("exchange->recv", "recv->publish", "publish->seen", "end-to-end", "local")

# phase word shared with the children: what they should be doing
WARMUP, MEASURE, STOP = 0, 1, 2


def _env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    return [x.strip() for x in raw.split(",") if x.strip()] if raw else default


KS = [int(k) for k in _env_list("BENCH_E2E_K", ["1", "2"] if SMOKE else ["1", "2", "4"])]
RATES = _env_list("BENCH_E2E_RATES", ["1000", "max"] if SMOKE else
                  ["1000", "10000", "100000", "max"])
ROWS: list[dict[str, Any]] = []


# --- consumers (spawned children) -----------------------------------------------------------------


class IdCheck:
    """Per-symbol contiguity of aggregate trade ids as seen by one consumer."""

    def __init__(self, n_symbols: int) -> None:
        self.first = [-1] * n_symbols
        self.last = [-1] * n_symbols
        self.count = [0] * n_symbols
        self.bad = 0  # ids that went backwards or repeated

    def add(self, sid: int, ids: np.ndarray) -> None:
        if ids.size == 0:
            return
        if self.first[sid] < 0:
            self.first[sid] = int(ids[0])
        elif ids[0] <= self.last[sid]:
            self.bad += 1
        self.bad += int(np.count_nonzero(np.diff(ids) <= 0))
        self.last[sid] = int(ids[-1])
        self.count[sid] += int(ids.size)

    def holes(self) -> int:
        """Ids skipped between the first and last seen (per symbol, summed)."""
        return sum(last - first + 1 - n for first, last, n in
                   zip(self.first, self.last, self.count, strict=True) if first >= 0)

    def as_dict(self) -> dict[str, Any]:
        return {"first": self.first, "last": self.last, "count": self.count, "bad": self.bad,
                "holes": self.holes()}


def _add_local(samples: lp.StageSamples, recv: np.ndarray, seen_ns: int) -> None:
    recv = recv[recv > 0]
    samples.add("agg", "local", (seen_ns - recv) / 1e3)


def _ring_consumer(ring: str, idx: int, phase: Any, ready: Any, out: Connection) -> None:
    """Attach from the oldest record, read until STOP, send counts, id check and samples."""
    from pipeline.ipc.records import Kind
    from pipeline.ipc.ring import RingReader

    # BENCH_E2E_IDLE: the consumers' idle policy (pipeline.ring.IdlePolicy); the built-in
    # consumers use "balanced", a latency-critical strategy "low-latency".
    idle = os.environ.get("BENCH_E2E_IDLE", "low-latency")
    r = RingReader.attach(ring, name=f"e2e{idx}", start="oldest", wait_s=30, idle=idle)
    samples = lp.StageSamples(limit=200_000, seed=idx)
    check = IdCheck(len(SYMBOLS))
    window = total = 0
    try:
        while True:
            ph = phase.value
            if ph == STOP:
                break
            if not r.wait(0.05):
                continue
            batch = r.poll()
            if batch.size == 0:
                continue
            seen = time.time_ns()
            ready[idx] = 1  # attached and receiving
            agg = batch[batch["kind"] == Kind.AGG_TRADE]
            total += int(agg.size)
            for sid in range(len(SYMBOLS)):
                check.add(sid, agg["trade_id"][agg["symbol"] == sid])
            if ph == MEASURE:
                window += int(agg.size)
                for stage, us in lp.stage_latencies(agg, seen).items():
                    samples.add("agg", stage, us)
                _add_local(samples, agg["recv_time_ns"], seen)
        out.send({"window": window, "total": total, "missed": int(r.missed),
                  "ids": check.as_dict(), "samples": samples.arrays()})
    finally:
        r.close()
        out.close()


def _queue_consumer(q: Any, idx: int, phase: Any, ready: Any, out: Connection) -> None:
    """``Queue.get()`` one message at a time, the obvious way, until STOP."""
    import queue as queue_mod

    samples = lp.StageSamples(limit=200_000, seed=idx)
    check = IdCheck(len(SYMBOLS))
    window = total = 0
    pending: list[tuple[Any, ...]] = []
    time_ns = time.time_ns
    try:
        while True:
            ph = phase.value
            if ph == STOP:
                break
            try:
                msg = q.get(timeout=0.05)
            except queue_mod.Empty:
                continue
            seen = time_ns()
            if not total:
                ready[idx] = 1
            total += 1
            sid, agg_id = msg[0], msg[1]
            if check.first[sid] < 0:
                check.first[sid] = agg_id
            elif agg_id != check.last[sid] + 1:
                check.bad += agg_id <= check.last[sid]
            check.last[sid] = agg_id
            check.count[sid] += 1
            if ph == MEASURE:
                window += 1
                pending.append((*msg[4:7], seen))
                if len(pending) >= 4096:
                    _queue_samples(samples, pending)
        _queue_samples(samples, pending)
        out.send({"window": window, "total": total, "missed": 0, "ids": check.as_dict(),
                  "samples": samples.arrays()})
    finally:
        out.close()


def _queue_samples(samples: lp.StageSamples, pending: list[tuple[Any, ...]]) -> None:
    if not pending:
        return
    a = np.array(pending, dtype=np.int64)  # event, recv, publish, seen
    pending.clear()
    ev, rv, pb, seen = a[:, 0], a[:, 1], a[:, 2], a[:, 3]
    samples.add("agg", "exchange->recv", (rv - ev) / 1e3)
    samples.add("agg", "recv->publish", (pb - rv) / 1e3)
    samples.add("agg", "publish->seen", (seen - pb) / 1e3)
    samples.add("agg", "end-to-end", (seen - ev) / 1e3)
    samples.add("agg", "local", (seen - rv) / 1e3)


def _queue_producer(url: str, queues: list[Any], phase: Any, frames: Any, connected: Any) -> None:
    """The baseline's ingest: websockets + orjson, one tuple per message onto every Queue."""
    import orjson
    import websockets

    sym_index = {s: i for i, s in enumerate(SYMBOLS)}

    async def main() -> None:
        streams = "/".join(f"{s.lower()}@aggTrade" for s in SYMBOLS)
        async with websockets.connect(f"{url}/stream?streams={streams}", max_size=None,
                                      compression=None) as ws:
            connected.set()
            time_ns = time.time_ns
            n = 0
            async for raw in ws:
                recv = time_ns()
                d = orjson.loads(raw)["data"]
                msg = (sym_index[d["s"]], d["a"], float(d["p"]), float(d["q"]),
                       d["E"] * 1_000_000, recv, time_ns())
                for q in queues:
                    q.put(msg)
                n += 1
                frames.value = n
                if phase.value == STOP:
                    break

    with contextlib.suppress(Exception):  # the sim going away at the end is not an error
        asyncio.run(main())
    for q in queues:
        q.cancel_join_thread()  # consumers are gone; do not block exit on unread items


# --- process plumbing (benchmark process) ---------------------------------------------------------


def sim_rate(target: str) -> list[str]:
    """Simulator flags for a total aggTrade rate over SYMBOLS (``max`` = as fast as read)."""
    if target == "max":
        return ["--rate", "max"]
    return ["--rate", f"{float(target) / len(SYMBOLS):.1f}", "--rate-unit", "msgs"]


@contextlib.contextmanager
def simulator(target: str) -> Iterator[Any]:
    from pipeline.sim.testing import run_sim_process

    with run_sim_process("--symbols", ",".join(SYMBOLS), *sim_rate(target)) as sim:
        yield sim


def _stop(proc: subprocess.Popen[bytes]) -> None:
    from pipeline.sim.testing import stop_process

    stop_process(proc, 10)


def _join(procs: list[Any]) -> None:
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()


@contextlib.contextmanager
def ring_path(sim: Any, k: int, tag: str) -> Iterator[dict[str, Any]]:
    """ingest subprocess + K ring consumers; yields handles for the measurement."""
    from pipeline.ipc.metrics import MetricsBlock
    from pipeline.ipc.ring import ring_stats

    ring, met = f"bench_{os.getpid()}_{tag}_r", f"bench_{os.getpid()}_{tag}_m"
    cmd = [sys.executable, "-m", "pipeline", "--log-format", "text", "--log-level", "WARNING",
           "ingest", "--streams-url", sim.streams_url, "--rest-url", sim.rest_url,
           "--symbols", ",".join(SYMBOLS), "--streams", "aggTrade", "--ring", ring,
           "--metrics", met, "--ring-capacity", str(1 << 20), "--stall-timeout", "5",
           "--metrics-interval", "0.05"]
    phase = CTX.RawValue("i", WARMUP)
    ready = CTX.RawArray("i", k)
    ingest = subprocess.Popen(cmd)
    consumers: list[Any] = []
    pipes: list[Connection] = []
    block = None
    try:
        deadline = time.monotonic() + 30
        while block is None:
            try:
                block = MetricsBlock.attach(met)
            except FileNotFoundError:
                assert ingest.poll() is None, "ingest exited"
                assert time.monotonic() < deadline, "ingest did not start"
                time.sleep(0.05)
        for i in range(k):
            parent, child = CTX.Pipe(duplex=False)
            p = CTX.Process(target=_ring_consumer, args=(ring, i, phase, ready, child),
                            daemon=True)
            p.start()
            child.close()
            consumers.append(p)
            pipes.append(parent)

        def frames() -> int:
            # records published = aggTrade frames (one record each, duplicates dropped); the
            # ring cursor is exact at any moment, the metrics block only every flush interval
            try:
                return int(ring_stats(ring)["cursor"])
            except FileNotFoundError:
                return 0

        yield {"producer": ingest.pid, "consumers": consumers, "pipes": pipes, "phase": phase,
               "frames": frames, "ring": ring, "ready": ready}
    finally:
        phase.value = STOP
        _join(consumers)
        _stop(ingest)
        if block is not None:
            block.close()


@contextlib.contextmanager
def queue_path(sim: Any, k: int) -> Iterator[dict[str, Any]]:
    phase = CTX.RawValue("i", WARMUP)
    ready = CTX.RawArray("i", k)
    frames = CTX.RawValue("q", 0)
    connected = CTX.Event()
    queues = [CTX.Queue() for _ in range(k)]
    consumers: list[Any] = []
    pipes: list[Connection] = []
    for i, q in enumerate(queues):
        parent, child = CTX.Pipe(duplex=False)
        p = CTX.Process(target=_queue_consumer, args=(q, i, phase, ready, child), daemon=True)
        p.start()
        child.close()
        consumers.append(p)
        pipes.append(parent)
    producer = CTX.Process(target=_queue_producer, args=(sim.streams_url, queues, phase, frames,
                                                         connected), daemon=True)
    producer.start()
    try:
        assert connected.wait(30), "queue producer did not connect"
        yield {"producer": producer.pid, "consumers": consumers, "pipes": pipes, "phase": phase,
               "frames": lambda: int(frames.value), "ready": ready}
    finally:
        phase.value = STOP
        _join([producer, *consumers])
        for q in queues:
            q.cancel_join_thread()
            q.close()


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def measure(h: dict[str, Any], window_s: float) -> dict[str, Any]:
    """Warm up until messages flow, then one measurement window; collect the children."""
    deadline = time.monotonic() + 30
    while h["frames"]() < 50 or not all(h["ready"]):
        assert time.monotonic() < deadline, "no messages reached the producer or a consumer"
        for p in h["consumers"]:
            assert p.is_alive(), "a consumer died"
        time.sleep(0.05)
    time.sleep(0.3)  # consumers caught up with the backlog
    cons_pids = [p.pid for p in h["consumers"]]
    f0, p0, c0, t0 = h["frames"](), _cpu([h["producer"]]), _cpu(cons_pids), time.monotonic()
    h["phase"].value = MEASURE
    time.sleep(window_s)
    f1, p1, c1, t1 = h["frames"](), _cpu([h["producer"]]), _cpu(cons_pids), time.monotonic()
    h["phase"].value = STOP
    results = []
    for pipe in h["pipes"]:
        assert pipe.poll(30), "a consumer did not report"
        results.append(pipe.recv())
    msgs = max(f1 - f0, 1)
    return {"elapsed": t1 - t0, "frames": f1 - f0,
            "producer_cpu_us_per_msg": (p1 - p0) / msgs * 1e6,
            "consumers_cpu_us_per_msg": (c1 - c0) / msgs * 1e6, "consumers": results}


def summarize_case(path: str, k: int, rate: str, m: dict[str, Any]) -> dict[str, Any]:
    pooled: dict[str, list[np.ndarray]] = {}
    for c in m["consumers"]:
        for (_kind, stage), arr in c["samples"].items():
            pooled.setdefault(stage, []).append(arr)
    lat = {stage: lp.summarize(np.concatenate(arrs)) for stage, arrs in pooled.items()}
    per_consumer = [c["window"] / m["elapsed"] for c in m["consumers"]]
    row = {
        "path": path, "K": k, "rate": rate,
        "producer_msgs_per_s": m["frames"] / m["elapsed"],
        "msgs_per_s": float(np.mean(per_consumer)),  # delivered to each consumer
        "min_consumer_msgs_per_s": float(min(per_consumer)),
        "cpu_us_per_msg": m["producer_cpu_us_per_msg"] + m["consumers_cpu_us_per_msg"],
        "producer_cpu_us_per_msg": m["producer_cpu_us_per_msg"],
        "consumers_cpu_us_per_msg": m["consumers_cpu_us_per_msg"],
        "missed": sum(c["missed"] for c in m["consumers"]),
        "latency_us": lat,
    }  # fmt: skip
    if rate != "max":
        row["sim_bound"] = row["producer_msgs_per_s"] < 0.8 * float(rate)
    return row


def check_answers(path: str, rate: str, m: dict[str, Any]) -> None:
    for c in m["consumers"]:
        ids = c["ids"]
        assert c["window"] > 0, f"{path}: a consumer saw nothing in the window"
        assert ids["bad"] == 0, f"{path}: ids repeated or out of order"
        assert ids["holes"] == c["missed"], f"{path}: {ids['holes']} ids missing, " \
            f"{c['missed']} reported missed"
        if rate != "max" or path == "mp_queue":
            assert c["missed"] == 0
        assert all(n > 0 for n in ids["count"]), f"{path}: a symbol never arrived"


def _record(benchmark: Any, row: dict[str, Any]) -> None:
    info = {k: v for k, v in row.items() if k != "latency_us"}
    for stage, s in row["latency_us"].items():
        for p in ("p50", "p99", "p99.9"):
            if p in s:
                info[f"{stage} {p} us"] = round(s[p], 1)
    benchmark.extra_info.update(info)
    ROWS.append(row)


CASES = [(path, k, rate) for rate in RATES for k in KS for path in ("ring", "mp_queue")]


@pytest.mark.parametrize(("path", "k", "rate"), CASES,
                         ids=[f"{p}-K{k}-{r}" for p, k, r in CASES])
def test_e2e(benchmark: Any, path: str, k: int, rate: str) -> None:
    benchmark.group = f"e2e {rate} msgs/s"
    with simulator(rate) as sim:
        ctx = ring_path(sim, k, f"{k}_{rate}") if path == "ring" else queue_path(sim, k)
        with ctx as h:
            res: dict[str, Any] = {}
            benchmark.pedantic(lambda: res.update(measure(h, WINDOW_S)), rounds=1, iterations=1)
    check_answers(path, rate, res)
    _record(benchmark, summarize_case(path, k, rate, res))


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = (f"{'path':<9} {'K':>2} {'rate':>7} {'msgs/s':>9} {'e2e p50':>9} {'e2e p99':>9} "
            f"{'local p50':>9} {'local p99':>9} {'CPU us/msg':>10} {'(prod':>7} {'+ cons)':>7} "
            f"{'ring vs queue':>20}")
    lines = ["", "end to end: sim -> producer -> K consumers (latencies in us; e2e = exchange "
             "event time -> consumer, local = socket receive -> consumer)", head]
    by = {(r["path"], r["K"], r["rate"]): r for r in rows}
    for r in rows:
        e2e, loc = r["latency_us"].get("end-to-end", {}), r["latency_us"].get("local", {})
        base = by.get(("mp_queue", r["K"], r["rate"]))
        ratio = ""
        if r["path"] == "ring" and base and base["cpu_us_per_msg"] > 0:
            ratio = (f"{base['cpu_us_per_msg'] / max(r['cpu_us_per_msg'], 1e-9):.1f}x cpu "
                     f"{r['msgs_per_s'] / max(base['msgs_per_s'], 1e-9):.1f}x msgs/s")
        flag = " sim-bound" if r.get("sim_bound") else ""
        lines.append(
            f"{r['path']:<9} {r['K']:>2} {r['rate']:>7} {r['msgs_per_s']:>9.0f} "
            f"{e2e.get('p50', float('nan')):>9.0f} {e2e.get('p99', float('nan')):>9.0f} "
            f"{loc.get('p50', float('nan')):>9.1f} {loc.get('p99', float('nan')):>9.1f} "
            f"{r['cpu_us_per_msg']:>10.2f} {r['producer_cpu_us_per_msg']:>7.2f} "
            f"{r['consumers_cpu_us_per_msg']:>7.2f} {ratio:>20}{flag}")
    lines.append("ring vs queue: queue CPU per message / ring CPU per message, and ring msgs/s / "
                 "queue msgs/s, same K and rate")
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def _e2e_report(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the table after the module's last case (works under --benchmark-only, which skips
    tests that do not use the benchmark fixture)."""
    yield
    if not ROWS:
        return
    emit(format_rows(ROWS))
    out = os.environ.get("BENCH_E2E_JSON")
    if out:
        Path(out).write_text(json.dumps(ROWS, indent=2))
