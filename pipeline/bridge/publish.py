"""`pipeline bridge publish`: a ring consumer that publishes the ring's records to JetStream.

The asyncio shell around :class:`~pipeline.bridge.batcher.Batcher`. One *session* is: read where
the stream ends (its last message's ``Bridge-Low`` / ``Bridge-High`` / ``Bridge-Epoch``), attach
to the ring there, publish a meta message, then poll -> batch -> publish asynchronously with at
most ``max_in_flight`` messages unacknowledged. Every message names the stream sequence it must
follow (``Nats-Expected-Last-Sequence``), so a lost message makes every later one fail instead of
leaving a hole.

Anything that goes wrong in a session (the connection dropped, an ack timed out or came back as
an error or a duplicate, the stream was changed under us) ends it, and the next session starts
again from what the stream holds: one recovery path for a bridge restart, a server restart and a
network cut, and it is the one that restarts test. The ring keeps the records meanwhile; if the
ring writer laps the bridge before it is back, the loss is counted (``lapped_records``,
``lap_gaps``) and told downstream as GAP records: one flagged LAPPED per lap with the lost count,
where the records were lost, and id GAPs for the symbols whose trade ids jumped
(:mod:`pipeline.bridge.batcher`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Any

from nats.js.errors import NotFoundError

from pipeline.bridge.batcher import Batch, Batcher
from pipeline.bridge.nats_io import (
    Backoff,
    BridgeConfigError,
    Link,
    connect,
    ensure_stream,
    wait_or_stop,
)
from pipeline.bridge.wire import (
    SourceMeta,
    data_headers,
    meta_headers,
    meta_subject,
    resume_point,
)
from pipeline.ipc.metrics import MetricsBlock
from pipeline.ipc.ring import RingError, RingNotFoundError, RingReader

log = logging.getLogger("pipeline.bridge.publish")

HEARTBEAT_MS = 500
#: a link down this long raises the problem_nats_down field (health turns red)
DOWN_PROBLEM_S = 5.0

METRICS_FIELDS = [
    ("heartbeat_interval_ms", "i8"), ("connected", "i8"), ("reconnects", "i8"),
    ("sessions", "i8"), ("published_msgs", "i8"), ("published_records", "i8"),
    ("in_flight", "i8"), ("acked_msgs", "i8"), ("acked_records", "i8"), ("lag", "i8"),
    ("last_ack_ns", "i8"), ("last_ack_age_ms", "i8"), ("stream_seq", "i8"),
    ("lapped_records", "i8"), ("gap_records", "i8"), ("lap_gaps", "i8"), ("skipped_stored", "i8"),
    ("problem_nats_down", "i8"),
]  # fmt: skip


class SessionOver(Exception):
    """This session cannot go on (see the module docstring); the next one resumes."""


@dataclass
class PublishOptions:
    nats_url: str
    ring: str
    stream: str
    prefix: str
    max_records: int = 64  #: records per message (batches are cut at this size)
    linger_s: float = 0.001  #: a record waits at most this long for its batch to fill
    max_in_flight: int = 256  #: unacknowledged messages before publishing waits
    ack_timeout_s: float = 5.0
    max_age_s: float = 3600.0  #: stream retention by age (stream created by us)
    max_bytes: int = 0  #: stream retention by size (0: unlimited)
    dedupe_window_s: float = 120.0
    metrics_name: str = ""
    reader_name: str = "bridge"
    duration_s: float | None = None


@dataclass
class _InFlight:
    future: Any
    batch: Batch
    stream_seq: int
    sent: float


class Publisher:
    def __init__(self, opts: PublishOptions) -> None:
        self.opts = opts
        self.link = Link()
        self.stop = asyncio.Event()
        self.reader: RingReader | None = None
        self.batcher: Batcher | None = None
        self.meta: SourceMeta | None = None
        self.meta_seq = 0
        self.next_stream_seq = 0  #: stream sequence of the last message we sent (expected next)
        self.in_flight: collections.deque[_InFlight] = collections.deque()
        self.sessions = 0
        self.published_msgs = self.published_records = 0
        self.acked_msgs = self.acked_records = 0
        self.last_ack_ns = 0
        self.stream_seq = 0
        self._lapped_before = 0  # batcher counters of earlier sessions
        self._gaps_before = 0
        self._lap_gaps_before = 0
        self._skipped_before = 0
        self._missed_seen = 0
        self.metrics: MetricsBlock | None = None
        self._next_metrics = 0.0

    # --- process --------------------------------------------------------------------------

    async def run(self) -> int:
        opts = self.opts
        if opts.metrics_name:
            self.metrics = MetricsBlock.create(opts.metrics_name, METRICS_FIELDS)
        deadline = None if opts.duration_s is None else time.monotonic() + opts.duration_s
        if deadline is not None:
            asyncio.get_running_loop().call_later(opts.duration_s or 0.0, self.stop.set)
        try:
            nc = await self._connect()
            if nc is None:
                return 0
            js = nc.jetstream(timeout=opts.ack_timeout_s)
            backoff = Backoff()
            while not self.stop.is_set():
                progress = self.acked_msgs
                try:
                    await self._session(nc, js)
                except BridgeConfigError:
                    raise
                except (SessionOver, Exception) as exc:  # every NATS error
                    if self.stop.is_set():
                        break
                    log.warning("publish session over; resuming", extra={"error": repr(exc)})
                    self._abandon_in_flight()
                    self._update_metrics(force=True)
                    while not self.link.connected and not self.stop.is_set():
                        self._update_metrics()
                        await wait_or_stop(self.stop, 0.05)
                    if self.acked_msgs != progress:
                        backoff.reset()
                    await wait_or_stop(self.stop, backoff.next())
            await self._drain()
            return 0
        except BridgeConfigError as exc:
            log.error("bridge publish cannot run", extra={"error": str(exc)})
            return 2
        finally:
            if self.reader is not None:
                self.reader.close()
            if self.link.nc is not None:
                self.link.closing = True
                try:
                    await self.link.nc.close()
                except Exception:  # closing after a failure
                    pass
            if self.metrics is not None:
                self.metrics.close()

    async def _connect(self) -> Any:
        while True:
            task = asyncio.ensure_future(
                connect(self.opts.nats_url, "pipeline-bridge-publish", self.link, self.stop)
            )
            while not task.done():
                self._update_metrics()
                await asyncio.wait({task}, timeout=0.1)
            return task.result()

    async def _drain(self) -> None:
        """On stop: publish what is buffered and wait (bounded) for the acks."""
        if self.batcher is None or self.link.nc is None or not self.link.connected:
            return
        try:
            js = self.link.nc.jetstream(timeout=self.opts.ack_timeout_s)
            for b in self.batcher.ready(time.time_ns(), idle=True):
                await self._send(js, b)
            deadline = time.monotonic() + self.opts.ack_timeout_s
            while self.in_flight and time.monotonic() < deadline:
                self._reap()
                await asyncio.sleep(0.001)
        except Exception as exc:  # the next start resumes from the stream
            log.warning("publish drain incomplete", extra={"error": repr(exc)})
        self._update_metrics(force=True)

    # --- one session ----------------------------------------------------------------------

    async def _session(self, nc: Any, js: Any) -> None:
        opts = self.opts
        self.link.session_broken = False
        self.sessions += 1
        info = await ensure_stream(
            js, opts.stream, opts.prefix, max_age_s=opts.max_age_s, max_bytes=opts.max_bytes,
            dedupe_window_s=opts.dedupe_window_s,
        )  # fmt: skip
        last_seq = int(info.state.last_seq)
        point = None
        if last_seq:
            msg = await js.get_msg(opts.stream, seq=last_seq)
            point = resume_point(msg.headers)
            if point is None:
                raise BridgeConfigError(
                    f"stream {opts.stream!r} ends with a message that is not the bridge's "
                    f"(seq {last_seq}, subject {msg.subject}): one stream per bridge"
                )
        reader = await self._attach_at(point)
        self.next_stream_seq = last_seq
        await self._publish_meta(js, reader)
        log.info(
            "publish session started",
            extra={"stream": opts.stream, "ring": opts.ring, "stream_seq": last_seq,
                   "ring_pos": reader.pos, "generation": reader.generation},
        )  # fmt: skip
        await self._loop(js, reader)

    async def _attach_at(self, point: tuple[int, int, int] | None) -> RingReader:
        """(Re)attach to the ring where the stream says we got to."""
        opts = self.opts
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        while True:
            try:
                probe = RingReader.attach(opts.ring, opts.reader_name, start="oldest")
                break
            except (RingNotFoundError, RingError):
                self._update_metrics()
                if await wait_or_stop(self.stop, 0.2):
                    raise SessionOver("stopped") from None
        epoch = probe.epoch_ns
        oldest = probe.pos
        cursor = probe.writer_cursor
        if point is not None and point[0] == epoch:
            low, high = point[1], point[2]
            if low > cursor:  # the stream is ahead of this ring: not the ring it came from
                raise BridgeConfigError(
                    f"stream resumes at ring sequence {low} but ring {opts.ring!r} holds "
                    f"{cursor}: a different ring with the same epoch?"
                )
            probe.close()
            reader = RingReader.attach(opts.ring, opts.reader_name, start=low)
        else:
            if point is not None:
                log.warning(
                    "source ring restarted since the stream's last message; its unsent tail "
                    "is gone, publishing the new ring from its oldest record",
                    extra={"ring": opts.ring, "stream_epoch": point[0], "ring_epoch": epoch},
                )
            reader, low, high = probe, oldest, oldest
        self.reader = reader
        self._missed_seen = reader.missed
        self._new_batcher(reader, low, high)
        return reader

    def _new_batcher(self, reader: RingReader, low: int, high: int) -> None:
        old = self.batcher
        if old is not None:
            self._lapped_before += old.dropped_lapped
            self._gaps_before += old.gap_records
            self._lap_gaps_before += old.lap_gaps
            self._skipped_before += old.skipped_stored
        opts = self.opts
        self.batcher = Batcher(
            reader.dtype, list(reader.symbols), opts.prefix, max_records=opts.max_records,
            linger_ns=int(opts.linger_s * 1e9), next_seq=low,
        )  # fmt: skip
        self.batcher.resume(low, high)

    async def _publish_meta(self, js: Any, reader: RingReader) -> None:
        meta = SourceMeta(
            dtype=reader.dtype, symbols=tuple(reader.symbols), epoch_ns=reader.epoch_ns,
            generation=reader.generation, ring=self.opts.ring,
        )  # fmt: skip
        assert self.batcher is not None
        expected = self.next_stream_seq
        ack = await js.publish(
            meta_subject(self.opts.prefix), meta.encode(),
            headers=meta_headers(meta, expected, self.batcher.next_seq, self.batcher.high),
        )  # fmt: skip
        if ack.duplicate or ack.seq != expected + 1:
            raise SessionOver(f"meta stored at {ack.seq}, expected {expected + 1}")
        self.meta, self.meta_seq = meta, ack.seq
        self.next_stream_seq = self.stream_seq = ack.seq

    async def _loop(self, js: Any, reader: RingReader) -> None:
        idle_nap = 0.0
        idle_since = 0.0
        polls = 0
        while not self.stop.is_set():
            if self.link.session_broken:
                raise SessionOver("connection lost")
            batcher = self.batcher
            assert batcher is not None
            assert self.meta is not None
            recs = reader.poll(8192)
            now = time.time_ns()
            if reader.epoch_ns != self.meta.epoch_ns:  # the ring writer restarted: resynced
                await self._source_restarted(js, reader, now)
                continue
            if reader.missed != self._missed_seen:
                lost = reader.missed - self._missed_seen
                self._missed_seen = reader.missed
                batcher.note_lap(lost)
                log.warning(
                    "bridge lapped by the ring writer: records lost",
                    extra={"ring": self.opts.ring, "lost": lost, "total": reader.missed},
                )
            n = len(recs)
            if n:
                first = reader.pos - n
                for key in batcher.unknown_keys(recs, first):
                    await self._learn(js, batcher, key)
                batcher.add(recs, first, now)
                batches = batcher.ready(now)
                idle_nap = 0.0
            else:
                batches = batcher.ready(now, idle=True)
            for b in batches:
                await self._send(js, b)
            self._reap()
            self._update_metrics()
            polls += 1
            if n:
                if polls % 16 == 0:
                    await asyncio.sleep(0)  # let the client read acks under sustained load
                continue
            # like the ring's "balanced" idle policy: naps up to 200 us for the first 10 ms of
            # quiet (a source at 10 k records/s is quiet between its 1 ms bursts), then 1 ms
            if not idle_nap:
                idle_since = time.monotonic()
            cap = 0.0002 if time.monotonic() - idle_since < 0.01 else 0.001
            idle_nap = min(cap, idle_nap * 2 or 0.00005)
            await asyncio.sleep(idle_nap)

    async def _source_restarted(self, js: Any, reader: RingReader, now: int) -> None:
        """The reader resynced to a restarted ring writer: what was read of the old ring goes
        out under the old meta, then a meta message for the new one."""
        assert self.batcher is not None
        for b in self.batcher.ready(now, idle=True):
            await self._send(js, b)
        while self.in_flight:
            self._reap()
            await asyncio.sleep(0.0005)
        log.info(
            "source ring restarted; publishing its new generation",
            extra={"ring": self.opts.ring, "generation": reader.generation},
        )
        self._missed_seen = reader.missed
        self._new_batcher(reader, reader.pos, reader.pos)
        await self._publish_meta(js, reader)

    async def _learn(self, js: Any, batcher: Batcher, key: int) -> None:
        """Ask the stream how far subject ``key`` got (its last message) for the batcher."""
        assert self.meta is not None
        try:
            msg = await js.get_msg(self.opts.stream, subject=batcher.subject_of(key))
        except NotFoundError:
            batcher.learn(key, -1, None)
            return
        hdrs = msg.headers or {}
        if str(hdrs.get("Bridge-Epoch")) != str(self.meta.epoch_ns):
            batcher.learn(key, -1, None)
            return
        size = batcher.dtype.itemsize
        data = msg.data or b""
        batcher.learn(key, int(hdrs.get("Bridge-Last", -1)), data[-size:] if data else None)

    async def _send(self, js: Any, b: Batch) -> None:
        timeout = self.opts.ack_timeout_s
        while len(self.in_flight) >= self.opts.max_in_flight:
            oldest = self.in_flight[0]
            try:
                await asyncio.wait_for(asyncio.shield(oldest.future), timeout)
            except TimeoutError:
                raise SessionOver("ack timeout with the in-flight window full") from None
            except Exception:  # _reap says what it was
                pass
            self._reap()
        assert self.meta is not None
        expected = self.next_stream_seq
        headers = data_headers(
            epoch_ns=self.meta.epoch_ns, first=b.first, last=b.last, low=b.low, high=b.high,
            layout=self.meta.layout, meta_seq=self.meta_seq, expected_last_seq=expected,
            tag=b.tag,
        )  # fmt: skip
        fut = await js.publish_async(b.subject, b.payload, headers=headers)
        self.next_stream_seq = expected + 1
        self.in_flight.append(_InFlight(fut, b, expected + 1, time.monotonic()))
        self.published_msgs += 1
        self.published_records += b.count

    def _reap(self) -> None:
        """Account for acknowledged messages, oldest first; end the session on a bad one."""
        q = self.in_flight
        while q and q[0].future.done():
            item = q.popleft()
            fut = item.future
            if fut.cancelled():
                raise SessionOver("publish cancelled")
            exc = fut.exception()
            if exc is not None:
                raise SessionOver(f"publish failed at stream seq {item.stream_seq}: {exc!r}")
            ack = fut.result()
            if ack.duplicate or ack.seq != item.stream_seq:
                raise SessionOver(
                    f"ack for stream seq {ack.seq} (duplicate={ack.duplicate}), "
                    f"expected {item.stream_seq}"
                )
            self.acked_msgs += 1
            self.acked_records += item.batch.count
            self.stream_seq = ack.seq
            self.last_ack_ns = time.time_ns()
        if q and time.monotonic() - q[0].sent > self.opts.ack_timeout_s:
            raise SessionOver(f"no ack for stream seq {q[0].stream_seq} in time")

    def _abandon_in_flight(self) -> None:
        for item in self.in_flight:
            if not item.future.done():
                item.future.cancel()
            elif not item.future.cancelled():
                item.future.exception()  # retrieved: no "never retrieved" warning
        self.in_flight.clear()

    # --- metrics --------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        b = self.batcher
        lapped = self._lapped_before + (b.dropped_lapped if b else 0)
        now_ns = time.time_ns()
        down = self.link.down_for_s()
        return {
            "heartbeat_interval_ms": HEARTBEAT_MS,
            "connected": int(self.link.connected),
            "reconnects": self.link.reconnects,
            "sessions": self.sessions,
            "published_msgs": self.published_msgs,
            "published_records": self.published_records,
            "in_flight": len(self.in_flight),
            "acked_msgs": self.acked_msgs,
            "acked_records": self.acked_records,
            "lag": self.reader.lag if self.reader is not None and not self.reader.closed else 0,
            "last_ack_ns": self.last_ack_ns,
            "last_ack_age_ms": (now_ns - self.last_ack_ns) // 1_000_000 if self.last_ack_ns else -1,
            "stream_seq": self.stream_seq,
            "lapped_records": lapped,
            "gap_records": self._gaps_before + (b.gap_records if b else 0),
            "lap_gaps": self._lap_gaps_before + (b.lap_gaps if b else 0),
            "skipped_stored": self._skipped_before + (b.skipped_stored if b else 0),
            "problem_nats_down": int(down) if down >= DOWN_PROBLEM_S else 0,
        }

    def _update_metrics(self, force: bool = False) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        if not force and now < self._next_metrics:
            return
        self._next_metrics = now + 0.1
        self.metrics.set(**self.counters())

