"""`pipeline bridge mirror`: a JetStream stream written back into a local ring.

The asyncio shell: read the stream in order with an ephemeral pull consumer (no acks: the
position is ours, in :class:`~pipeline.bridge.mirror_state.PositionFile`), turn each data message
back into records (the payload *is* the records; the layout hash is checked) and write them into a
local ring created with the source's dtype and symbol table (from the stream's meta messages), so
consumers on this host use ``RingReader.attach(LOCAL_NAME)`` exactly as on the source host.

Records arrive byte for byte as the source wrote them, ``publish_time_ns`` included: a reader here
measures the whole way from the source ring (same host clocks: meaningful; across hosts: as good as
their clock sync). A symbol table or dtype change at the source recreates the ring (generation
bump; readers resync as they do for a restarted writer). Any NATS trouble ends the session and the
next one resumes from the next unread stream sequence, which this process keeps in memory.

A lap GAP (the source's publisher was lapped by its ring writer; subject ``<prefix>._lap``) is
written into the ring like any record, where the loss happened, and also counted here
(``upstream_lapped``: records lost before they reached the stream) and logged, so an operator of
this host sees it without reading the ring.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import nats.errors
import numpy as np
from nats.js import api
from nats.js.errors import NotFoundError

from pipeline.bridge.mirror_state import (
    MirrorPosition,
    PositionFile,
    StartAt,
    records_to_skip,
)
from pipeline.bridge.nats_io import Backoff, BridgeConfigError, Link, connect, wait_or_stop
from pipeline.bridge.wire import (
    LAP_TOKEN,
    BridgeWireError,
    SourceMeta,
    decode_records,
    is_meta,
    parse_data_headers,
)
from pipeline.ipc.metrics import MetricsBlock
from pipeline.ipc.records import Flags
from pipeline.ipc.ring import RingNotFoundError, RingWriter, ring_stats

log = logging.getLogger("pipeline.bridge.mirror")

HEARTBEAT_MS = 500
DOWN_PROBLEM_S = 5.0
SAVE_INTERVAL_S = 0.05
FETCH_BATCH = 512
_LAP_SUFFIX = f".{LAP_TOKEN}"
_LAPPED = int(Flags.LAPPED)

METRICS_FIELDS = [
    ("heartbeat_interval_ms", "i8"), ("connected", "i8"), ("reconnects", "i8"),
    ("sessions", "i8"), ("position", "i8"), ("lag", "i8"), ("msgs", "i8"), ("records", "i8"),
    ("last_msg_ns", "i8"), ("stream_holes", "i8"), ("replay_skipped", "i8"),
    ("ring_generation", "i8"), ("ring_recreated", "i8"), ("problem_nats_down", "i8"),
    ("upstream_lapped", "i8"),
]  # fmt: skip


class SessionOver(Exception):
    """This session cannot go on; the next resumes from the next unread sequence."""


@dataclass
class MirrorOptions:
    nats_url: str
    ring: str
    stream: str
    start: StartAt
    position_file: str
    capacity: int = 1 << 16
    metrics_name: str = ""
    duration_s: float | None = None


class Mirror:
    def __init__(self, opts: MirrorOptions) -> None:
        self.opts = opts
        self.link = Link()
        self.stop = asyncio.Event()
        self.positions = PositionFile(opts.position_file)
        self.next_seq: int | None = None  #: next stream sequence to read (None: not decided)
        self.skip = 0  #: records already in the ring from before a crash (see mirror_state)
        self.writer: RingWriter | None = None
        self.ring_meta: SourceMeta | None = None  #: the shape the ring was created for
        self.meta: SourceMeta | None = None  #: the meta of the records being read
        self.meta_seq = 0
        self.ring_epoch = 0
        self.sessions = self.msgs = self.records = self.stream_holes = 0
        self.replay_skipped = self.ring_recreated = 0
        self.upstream_lapped = 0  #: records the source's publisher lost in laps (its lap GAPs)
        self.lag = 0
        self.last_msg_ns = 0
        self._dirty = False
        self._next_save = 0.0
        self.metrics: MetricsBlock | None = None
        self._next_metrics = 0.0

    # --- process --------------------------------------------------------------------------

    async def run(self) -> int:
        opts = self.opts
        try:
            saved = self.positions.load(opts.stream)
        except ValueError as exc:
            log.error("bridge mirror cannot run", extra={"error": str(exc)})
            return 2
        if saved is not None:
            try:
                left = ring_stats(opts.ring)
            except (RingNotFoundError, OSError, ValueError):
                left = None
            self.next_seq = saved.next_seq
            self.skip = records_to_skip(saved, left)
            log.info(
                "mirror resumes from its saved position",
                extra={"stream": opts.stream, "next_seq": saved.next_seq, "skip": self.skip},
            )
        if opts.metrics_name:
            self.metrics = MetricsBlock.create(opts.metrics_name, METRICS_FIELDS)
        if opts.duration_s is not None:
            asyncio.get_running_loop().call_later(opts.duration_s, self.stop.set)
        try:
            task = asyncio.ensure_future(
                connect(opts.nats_url, "pipeline-bridge-mirror", self.link, self.stop)
            )
            while not task.done():
                self._update_metrics()
                await asyncio.wait({task}, timeout=0.1)
            nc = task.result()
            if nc is None:
                return 0
            js = nc.jetstream(timeout=5)
            backoff = Backoff()
            while not self.stop.is_set():
                progress = self.msgs
                try:
                    await self._session(js)
                except (BridgeWireError, BridgeConfigError):
                    raise
                except (SessionOver, Exception) as exc:  # every NATS error
                    if self.stop.is_set():
                        break
                    log.warning("mirror session over; resuming", extra={"error": repr(exc)})
                    self._update_metrics(force=True)
                    while not self.link.connected and not self.stop.is_set():
                        self._update_metrics()
                        await wait_or_stop(self.stop, 0.05)
                    if self.msgs != progress:
                        backoff.reset()
                    await wait_or_stop(self.stop, backoff.next())
            return 0
        except (BridgeWireError, BridgeConfigError) as exc:
            log.error("bridge mirror cannot go on", extra={"error": str(exc)})
            return 2
        finally:
            self._save(force=True)
            if self.writer is not None:
                self.writer.close()
            if self.link.nc is not None:
                self.link.closing = True
                try:
                    await self.link.nc.close()
                except Exception:  # closing after a failure
                    pass
            if self.metrics is not None:
                self.metrics.close()

    # --- one session ----------------------------------------------------------------------

    async def _session(self, js: Any) -> None:
        opts = self.opts
        self.link.session_broken = False
        self.sessions += 1
        try:
            info = await js.stream_info(opts.stream)
        except NotFoundError:
            log.info("stream not there yet; waiting", extra={"stream": opts.stream})
            await wait_or_stop(self.stop, 0.5)
            return
        subjects = list(info.config.subjects or [])
        cfg = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE, inactive_threshold=30.0,
            filter_subject=subjects[0] if len(subjects) == 1 else None,
        )  # fmt: skip
        if self.next_seq is None:
            start = opts.start
            if start.policy == "all":
                self.next_seq = max(1, int(info.state.first_seq))
            elif start.policy == "new":
                self.next_seq = int(info.state.last_seq) + 1
            elif start.policy == "seq":
                self.next_seq = start.seq
        if self.next_seq is None:  # time: the server finds the sequence
            cfg.deliver_policy = api.DeliverPolicy.BY_START_TIME
            cfg.opt_start_time = opts.start.time
        else:
            cfg.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            cfg.opt_start_seq = self.next_seq
        sub = await js.pull_subscribe(cfg.filter_subject or "", stream=opts.stream, config=cfg)
        log.info(
            "mirror session started",
            extra={"stream": opts.stream, "next_seq": self.next_seq, "ring": opts.ring},
        )
        idle_since = time.monotonic()
        try:
            while not self.stop.is_set():
                if self.link.session_broken:
                    raise SessionOver("connection lost")
                try:
                    msgs = await sub.fetch(FETCH_BATCH, timeout=0.25)
                except nats.errors.TimeoutError:
                    msgs = []
                self._update_metrics()
                if msgs:
                    await self._handle(js, msgs)
                    idle_since = time.monotonic()
                    self._save()
                    continue
                self._save(force=self._dirty)
                if time.monotonic() - idle_since > 1.0:  # nothing for a while: is it stuck?
                    idle_since = time.monotonic()
                    info = await js.stream_info(opts.stream)
                    last = int(info.state.last_seq)
                    self.lag = max(0, last + 1 - (self.next_seq or last + 1))
                    if self.next_seq is not None and last >= self.next_seq:
                        raise SessionOver("consumer delivers nothing while the stream has more")
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection may be gone
                pass

    async def _handle(self, js: Any, msgs: list[Any]) -> None:
        chunks: list[np.ndarray] = []
        for m in msgs:
            md = m.metadata
            seq = int(md.sequence.stream)
            if self.next_seq is not None and seq < self.next_seq:
                continue  # delivered again (a consumer recreated over an old one)
            if self.next_seq is not None and seq > self.next_seq:
                lost = seq - self.next_seq
                self.stream_holes += lost
                log.warning(
                    "stream messages gone before the mirror read them (retention)",
                    extra={"stream": self.opts.stream, "from": self.next_seq, "count": lost},
                )
            self.lag = int(md.num_pending)
            headers = m.headers
            if is_meta(headers):
                self._write(chunks, seq)
                chunks = []
                self._use_meta(SourceMeta.decode(m.data), seq, seq + 1)
                self.next_seq = seq + 1
                continue
            dh = parse_data_headers(headers)
            if dh.meta_seq != self.meta_seq or self.meta is None:
                self._write(chunks, seq)
                chunks = []
                self._use_meta(await self._fetch_meta(js, dh.meta_seq, dh.layout), dh.meta_seq, seq)
            assert self.meta is not None
            recs = decode_records(m.data, self.meta.dtype, self.meta.layout, dh)
            self.next_seq = seq + 1
            self.msgs += 1
            if self.skip:
                if self.skip >= len(recs):
                    self.skip -= len(recs)
                    self.replay_skipped += len(recs)
                    continue
                raise BridgeWireError(
                    f"replay skip of {self.skip} records ends inside the message at {seq}: "
                    "the ring left by the last run is not the one the position file describes"
                )
            if m.subject.endswith(_LAP_SUFFIX):
                self._upstream_lap(recs)
            chunks.append(recs)
        self._write(chunks, self.next_seq or 0)
        self.last_msg_ns = time.time_ns()

    def _upstream_lap(self, recs: np.ndarray) -> None:
        """Count and log the lap GAPs of a ``_lap`` message (they are written on as they are)."""
        if not {"flags", "trade_id", "aux_id"} <= set(recs.dtype.names or ()):
            return
        for rec in recs[(recs["flags"] & _LAPPED) != 0]:
            first, last = int(rec["trade_id"]), int(rec["aux_id"])
            self.upstream_lapped += last - first + 1
            log.warning(
                "the source's publisher was lapped: records lost before the stream",
                extra={"stream": self.opts.stream, "lost": last - first + 1,
                       "source_seq_first": first, "source_seq_last": last},
            )  # fmt: skip

    def _write(self, chunks: list[np.ndarray], next_seq: int) -> None:
        if not chunks:
            return
        assert self.writer is not None
        batch = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        self.writer.publish_many(batch)
        self.records += len(batch)
        self._dirty = True

    async def _fetch_meta(self, js: Any, meta_seq: int, layout: str) -> SourceMeta:
        """The meta message a data message names; if retention removed it, the stream's last
        meta message when it has the same layout (a symbol table is republished every session)."""
        try:
            msg = await js.get_msg(self.opts.stream, seq=meta_seq)
            if is_meta(msg.headers):
                return SourceMeta.decode(msg.data)
        except NotFoundError:
            pass
        if self.meta is not None and self.meta.layout == layout:
            return self.meta
        raise BridgeWireError(
            f"meta message {meta_seq} is gone from stream {self.opts.stream!r} and no other "
            f"describes layout {layout}: cannot create the ring"
        )

    def _use_meta(self, meta: SourceMeta, meta_seq: int, at_seq: int) -> None:
        """Records from here on are described by ``meta``: recreate the ring if its shape
        changed (or create it on the first message)."""
        self.meta, self.meta_seq = meta, meta_seq
        if self.writer is not None and self.ring_meta is not None:
            if self.ring_meta.same_ring_shape(meta):
                return
            log.info(
                "source symbols or dtype changed: recreating the mirror ring",
                extra={"ring": self.opts.ring, "symbols": len(meta.symbols)},
            )
            self.writer.close(unlink=False)  # a closed segment: the next create bumps generation
            self.writer = None
            self.ring_recreated += 1
        capacity = self.opts.capacity
        self.writer = RingWriter.create(self.opts.ring, meta.dtype, capacity, list(meta.symbols))
        self.ring_meta = meta
        self.ring_epoch = int(ring_stats(self.opts.ring)["epoch_ns"])
        # the pairing (position, ring, cursor) restarts with this ring: save it now, unless
        # records of the ring before are still to be skipped (that pairing must stay on file)
        if not self.skip:
            self.positions.save(MirrorPosition(self.opts.stream, at_seq, self.ring_epoch, 0))
            self._dirty = False

    def _save(self, force: bool = False) -> None:
        if not self._dirty or self.writer is None or self.next_seq is None:
            return
        now = time.monotonic()
        if not force and now < self._next_save:
            return
        self._next_save = now + SAVE_INTERVAL_S
        self.positions.save(
            MirrorPosition(self.opts.stream, self.next_seq, self.ring_epoch, self.writer.cursor)
        )
        self._dirty = False

    # --- metrics --------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        down = self.link.down_for_s()
        return {
            "heartbeat_interval_ms": HEARTBEAT_MS,
            "connected": int(self.link.connected),
            "reconnects": self.link.reconnects,
            "sessions": self.sessions,
            "position": self.next_seq or 0,
            "lag": self.lag,
            "msgs": self.msgs,
            "records": self.records,
            "last_msg_ns": self.last_msg_ns,
            "stream_holes": self.stream_holes,
            "replay_skipped": self.replay_skipped,
            "ring_generation": self.writer.generation if self.writer is not None else 0,
            "ring_recreated": self.ring_recreated,
            "problem_nats_down": int(down) if down >= DOWN_PROBLEM_S else 0,
            "upstream_lapped": self.upstream_lapped,
        }

    def _update_metrics(self, force: bool = False) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        if not force and now < self._next_metrics:
            return
        self._next_metrics = now + 0.1
        self.metrics.set(**self.counters())
