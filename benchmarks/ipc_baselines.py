"""Cross-process transports for the ring benchmarks: our ring and the usual alternatives.

Every transport moves the same 96-byte message (a TICK_DTYPE record whose ``trade_id`` is the
sequence number and ``recv_time_ns`` the sender's ``perf_counter_ns`` stamp, which is
CLOCK_MONOTONIC and so comparable across processes). The sender runs in the benchmark process;
the receiver runs in a spawned child driven over a control pipe:

    ("count", n)    receive n messages, check they arrive in order, reply ("done", got, ok, info)
    ("latency", n)  receive n spaced messages, reply ("lat", latencies_ns array, ok, info)
    ("stop",)       exit

Baselines import lazily; a missing or unusable one is reported by :func:`unavailable_reason`.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import struct
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from pipeline.ipc.records import TICK_DTYPE

MSG = struct.Struct("<56xq16xq8x")  # trade_id @56, recv_time_ns @80, 96 bytes = TICK_DTYPE
assert MSG.size == TICK_DTYPE.itemsize == 96
#: ring: a busy-polling reader; ring_sleep: ``idle="balanced"`` (a 20 us spin, then asleep until
#: the writer's futex wake-up); ring_lowcpu: ``idle="low-cpu"`` (no spin: every message wakes it)
TRANSPORTS = ("ring", "ring_sleep", "ring_lowcpu", "mp_queue", "mp_pipe", "faster_fifo",
              "iceoryx2")
CTX = mp.get_context("spawn")


def unavailable_reason(kind: str) -> str | None:
    """None if the transport can run here, else why not (the benchmark skips with it)."""
    base = kind.removesuffix("_sleep").removesuffix("_lowcpu")
    if base == "faster_fifo":
        try:
            import faster_fifo  # noqa: F401
        except ImportError as exc:
            return f"faster_fifo not importable ({exc}); pip install faster-fifo"
    if base == "iceoryx2":
        try:
            import iceoryx2  # noqa: F401
        except ImportError as exc:
            return f"iceoryx2 not importable ({exc}); pip install iceoryx2"
    return None


def cores() -> tuple[set[int] | None, set[int] | None]:
    """(sender cores, receiver cores): one core each when there are at least two."""
    try:
        avail = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None, None
    if len(avail) < 2:
        return None, None
    return {avail[0]}, {avail[1]}


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Any:
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# --- senders (benchmark process) --------------------------------------------------------------


class Sender:
    """The sending end; ``send(seq, stamp)`` one message, ``send_batch(records)`` many."""

    kind = ""

    def child_args(self) -> dict[str, Any]:
        return {}

    def send(self, seq: int, stamp: int) -> None:
        raise NotImplementedError

    def send_batch(self, records: np.ndarray) -> None:
        raise NotImplementedError

    def send_loop(self, start: int, n: int) -> None:
        """Send sequences [start, start + n) back to back, each stamped when sent. Transports
        override it with their tightest loop (bound methods in locals), so none of them pays
        for the harness."""
        send, pc = self.send, time.perf_counter_ns
        for seq in range(start, start + n):
            send(seq, pc())

    def close(self) -> None:
        pass


class RingSender(Sender):
    def __init__(self, name: str, capacity: int = 1 << 20) -> None:
        from pipeline.ipc.segments import RingWriter

        self.name = name
        self.w = RingWriter.create(name, TICK_DTYPE, capacity)
        self._buf = bytearray(96)

    def child_args(self) -> dict[str, Any]:
        return {"ring": self.name}

    def send(self, seq: int, stamp: int) -> None:
        self.w.publish(MSG.pack(seq, stamp))

    def send_batch(self, records: np.ndarray) -> None:
        self.w.publish_many(records)

    def send_loop(self, start: int, n: int) -> None:
        publish, pack, pc = self.w.publish, MSG.pack, time.perf_counter_ns
        for seq in range(start, start + n):
            publish(pack(seq, pc()))

    def close(self) -> None:
        self.w.close()


class QueueSender(Sender):
    def __init__(self) -> None:
        self.q: Any = CTX.Queue()

    def child_args(self) -> dict[str, Any]:
        return {"q": self.q}

    def send(self, seq: int, stamp: int) -> None:
        self.q.put(MSG.pack(seq, stamp))

    def send_batch(self, records: np.ndarray) -> None:
        self.q.put(records.tobytes())

    def send_loop(self, start: int, n: int) -> None:
        put, pack, pc = self.q.put, MSG.pack, time.perf_counter_ns
        for seq in range(start, start + n):
            put(pack(seq, pc()))

    def close(self) -> None:
        self.q.close()
        self.q.join_thread()


class PipeSender(Sender):
    def __init__(self) -> None:
        self.rx, self.tx = CTX.Pipe(duplex=False)

    def child_args(self) -> dict[str, Any]:
        return {"conn": self.rx}

    def send(self, seq: int, stamp: int) -> None:
        self.tx.send_bytes(MSG.pack(seq, stamp))

    def send_batch(self, records: np.ndarray) -> None:
        self.tx.send_bytes(records.view(np.uint8).data)

    def send_loop(self, start: int, n: int) -> None:
        send, pack, pc = self.tx.send_bytes, MSG.pack, time.perf_counter_ns
        for seq in range(start, start + n):
            send(pack(seq, pc()))

    def close(self) -> None:
        self.tx.close()
        self.rx.close()


class FasterFifoSender(Sender):
    def __init__(self) -> None:
        import faster_fifo

        self.q = faster_fifo.Queue(max_size_bytes=64 * 1024 * 1024)

    def child_args(self) -> dict[str, Any]:
        return {"q": self.q}

    def send(self, seq: int, stamp: int) -> None:
        self.q.put(MSG.pack(seq, stamp), timeout=10)

    def send_batch(self, records: np.ndarray) -> None:
        self.q.put(records.tobytes(), timeout=10)

    def close(self) -> None:
        self.q.close()


def _iox_payload() -> Any:
    import ctypes

    class Tick(ctypes.Structure):
        _fields_ = [("raw", ctypes.c_uint8 * 96)]

    return Tick


class IceoryxSender(Sender):
    def __init__(self, name: str, buffer: int = 1 << 16) -> None:
        import iceoryx2 as iox

        iox.set_log_level(iox.LogLevel.Error)
        self.name = name
        self.buffer = buffer
        self.Tick = _iox_payload()
        self.node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)
        self.service = (
            self.node.service_builder(iox.ServiceName.new(name))
            .publish_subscribe(self.Tick)
            .subscriber_max_buffer_size(buffer)
            .enable_safe_overflow(False)
            .max_subscribers(2)
            .max_publishers(1)
            .open_or_create()
        )
        self.pub = (
            self.service.publisher_builder()
            .backpressure_strategy(iox.BackpressureStrategy.RetryUntilDelivered)
            .max_loaned_samples(4)
            .create()
        )

    def child_args(self) -> dict[str, Any]:
        return {"service": self.name, "buffer": self.buffer}

    def send(self, seq: int, stamp: int) -> None:
        sample = self.pub.loan_uninit()
        sample.write_payload(self.Tick.from_buffer_copy(MSG.pack(seq, stamp))).send()

    def send_batch(self, records: np.ndarray) -> None:
        for rec in records.view(np.dtype((np.void, 96))):
            sample = self.pub.loan_uninit()
            sample.write_payload(self.Tick.from_buffer_copy(rec.tobytes())).send()

    def close(self) -> None:
        self.pub.delete()  # the node and service go with their last reference
        del self.service, self.node


def make_sender(kind: str, name: str) -> Sender:
    base = kind.removesuffix("_sleep").removesuffix("_lowcpu")
    sender: Sender
    if base == "ring":
        sender = RingSender(name)
    elif base == "mp_queue":
        sender = QueueSender()
    elif base == "mp_pipe":
        sender = PipeSender()
    elif base == "faster_fifo":
        sender = FasterFifoSender()
    elif base == "iceoryx2":
        sender = IceoryxSender(name)
    else:
        raise ValueError(f"unknown transport {kind!r}")
    sender.kind = kind
    return sender


# --- receivers (child process) ------------------------------------------------------------------


def _decode(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    recs = np.frombuffer(blob, TICK_DTYPE)
    return recs["trade_id"], recs["recv_time_ns"]


def _receiver(kind: str, args: dict[str, Any]) -> tuple[Callable[[], Any], Callable[[], None]]:
    """Returns (receive, close); receive() -> (seqs, stamps) arrays, possibly empty, waiting at
    most ~50 ms for blocking transports."""
    empty = (np.empty(0, np.int64), np.empty(0, np.int64))
    if kind in ("ring", "ring_sleep", "ring_lowcpu"):
        from pipeline.ipc.segments import RingReader

        r = RingReader.attach(args["ring"], name=kind,
                              idle="low-cpu" if kind == "ring_lowcpu" else "balanced")
        if kind == "ring":

            def recv() -> Any:
                b = r.poll()
                return (b["trade_id"], b["recv_time_ns"]) if b.size else empty

        else:

            def recv() -> Any:
                b = r.poll_blocking(timeout_s=0.05)
                return (b["trade_id"], b["recv_time_ns"]) if b.size else empty

        return recv, r.close
    if kind in ("mp_queue", "faster_fifo"):  # same get(timeout) API, same queue.Empty
        import queue

        q = args["q"]

        def recv() -> Any:
            try:
                return _decode(q.get(timeout=0.05))
            except queue.Empty:
                return empty

        return recv, lambda: None
    if kind == "mp_pipe":
        conn = args["conn"]

        def recv() -> Any:
            if not conn.poll(0.05):
                return empty
            return _decode(conn.recv_bytes())

        return recv, conn.close
    if kind == "iceoryx2":
        import iceoryx2 as iox

        iox.set_log_level(iox.LogLevel.Error)
        tick = _iox_payload()
        node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)
        service = (
            node.service_builder(iox.ServiceName.new(args["service"]))
            .publish_subscribe(tick)
            .subscriber_max_buffer_size(args["buffer"])
            .enable_safe_overflow(False)
            .max_subscribers(2)
            .max_publishers(1)
            .open_or_create()
        )
        sub = service.subscriber_builder().buffer_size(args["buffer"]).create()

        def recv() -> Any:
            sample = sub.receive()
            if sample is None:
                return empty
            raw = bytes(sample.payload().contents.raw)
            sample.delete()
            seq, stamp = MSG.unpack(raw)
            return (np.array([seq]), np.array([stamp]))

        def close() -> None:
            sub.delete()

        return recv, close
    raise ValueError(f"unknown transport {kind!r}")


def child_main(kind: str, args: dict[str, Any], ctrl: Connection, cpus: set[int] | None) -> None:
    """Receiver process: obeys commands on ``ctrl`` (see the module docstring)."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    from pipeline.ipc import shm

    shm.set_timer_slack_ns(1)
    recv, close = _receiver(kind, args)
    ctrl.send(("ready",))
    expected = 0
    try:
        while True:
            cmd = ctrl.recv()
            if cmd[0] == "stop":
                return
            n = cmd[1]
            got = 0
            ok = True
            lat = np.empty(n, np.int64) if cmd[0] == "latency" else None
            deadline = time.monotonic() + 120
            while got < n and time.monotonic() < deadline:
                seqs, stamps = recv()
                k = len(seqs)
                if not k:
                    continue
                now = time.perf_counter_ns()
                if seqs[0] != expected or seqs[-1] != expected + k - 1:
                    ok = False
                if lat is not None:
                    lat[got : got + k] = now - stamps[: n - got]
                got += k
                expected += k
            info = "" if got == n else f"timed out after {got} of {n}"
            if lat is not None:
                ctrl.send(("lat", lat[:got], ok, info))
            else:
                ctrl.send(("done", got, ok, info))
    finally:
        close()


class Harness:
    """Sender in this process + receiver child, started once per benchmark."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.send_cpus, recv_cpus = cores()
        self.sender = make_sender(kind, name)
        self.ctrl, child_ctrl = CTX.Pipe()
        self.proc = CTX.Process(
            target=child_main,
            args=(kind, self.sender.child_args(), child_ctrl, recv_cpus),
            daemon=True,
        )
        self.proc.start()
        deadline = time.monotonic() + 60
        while not self.ctrl.poll(0.1):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                code = self.proc.exitcode
                self.close()
                raise RuntimeError(f"{kind} receiver did not start (exit code {code})")
        assert self.ctrl.recv() == ("ready",)
        self.seq = 0

    def prepare(self, n: int) -> np.ndarray:
        """The next n records (sequence numbers filled in), built outside the timed region."""
        recs = np.zeros(n, TICK_DTYPE)
        recs["trade_id"] = np.arange(self.seq, self.seq + n)
        return recs

    def throughput_round(
        self, n: int, records: np.ndarray | None = None, batch: int = 100
    ) -> tuple[int, bool, str]:
        """Send n messages (one by one, or ``records`` in slices of ``batch``) and wait until
        the receiver has counted them all."""
        self.ctrl.send(("count", n))
        with pinned(self.send_cpus):
            if records is None:
                self.sender.send_loop(self.seq, n)
            else:
                send_batch = self.sender.send_batch
                for start in range(0, n, batch):
                    send_batch(records[start : start + batch])
            self.seq += n
            reply = self.ctrl.recv()
        return reply[1], reply[2], reply[3]

    def latency_round(self, n: int, gap_ns: int = 50_000) -> tuple[np.ndarray, bool, str]:
        """Send n messages spaced by ``gap_ns`` (so each travels alone); one-way latencies."""
        from pipeline.ipc import shm

        shm.set_timer_slack_ns(1)
        self.ctrl.send(("latency", n))
        gap_s = gap_ns / 1e9
        with pinned(self.send_cpus):
            send, pc, sleep = self.sender.send, time.perf_counter_ns, time.sleep
            for seq in range(self.seq, self.seq + n):
                send(seq, pc())
                # sleep, not spin: a spinning sender would hold the GIL and starve
                # multiprocessing.Queue's feeder thread, charging its latency to the queue
                sleep(gap_s)
            self.seq += n
            reply = self.ctrl.recv()
        return reply[1], reply[2], reply[3]

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.ctrl.send(("stop",))
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.sender.close()
        self.ctrl.close()


def percentiles_us(lat_ns: np.ndarray) -> dict[str, float]:
    p = np.percentile(lat_ns, [50, 99, 99.9]) / 1e3
    return {"p50_us": round(float(p[0]), 2), "p99_us": round(float(p[1]), 2),
            "p999_us": round(float(p[2]), 2)}  # fmt: skip


# --- the side-by-side summary -----------------------------------------------------------------

RESULTS: dict[str, dict[str, float]] = {}
BASELINE = "mp_queue"


def record_result(metric: str, kind: str, value: float) -> None:
    RESULTS.setdefault(metric, {})[kind] = value


def report() -> str:
    """One table per metric: value and how many times better than multiprocessing.Queue."""
    lines = ["", "ring vs IPC baselines (ratio: times better than multiprocessing.Queue)"]
    for metric, by_kind in RESULTS.items():
        lines.append(f"  {metric}")
        base = by_kind.get(BASELINE)
        higher_is_better = "rec/s" in metric
        for kind, value in sorted(by_kind.items(), key=lambda kv: -kv[1] if higher_is_better
                                  else kv[1]):  # fmt: skip
            ratio = ""
            if base and value and kind != BASELINE:
                r = value / base if higher_is_better else base / value
                ratio = f"{r:8.1f}x"
            shown = f"{value:14,.0f}" if value >= 1000 else f"{value:14.2f}"
            lines.append(f"    {kind:<16}{shown} {ratio}")
    return "\n".join(lines)
