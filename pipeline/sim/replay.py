"""Replay of captured sessions: load a capture file, then send its frames to stream clients.

Why: a recorded session is the only way to feed a client the market it actually met (a gap, a
burst, a symbol the random walk does not have). Loading is pure and strict (a bad line is named);
:class:`CaptureReplay` paces the frames at their recorded times (or as fast as clients take)
through the same fan-out buffers as the random walk, and answers REST depth with the snapshot
that was current at the replay position.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import orjson

from pipeline.sim.framing import micros_payload, ws_frame

if TYPE_CHECKING:
    from pipeline.sim.faults import Faults
    from pipeline.sim.streams import StreamHub

log = logging.getLogger("pipeline.sim")


@dataclass
class Capture:
    """A loaded capture: frames (receive time or None, stream, combined line, raw payload) and
    REST depth snapshots per symbol (receive time, body)."""

    frames: list[tuple[float | None, str, bytes, bytes]]
    snapshots: dict[str, list[tuple[float, dict[str, Any]]]]
    streams: set[str]


_TS_PREFIX = re.compile(rb"^\s*(\d+(?:\.\d+)?)\s*[:,\s]\s*(\{.*)$", re.S)


def _split_combined(line: bytes, frame: dict[str, Any]) -> tuple[str, bytes, bytes]:
    stream = frame["stream"]
    head = b'{"stream":' + orjson.dumps(stream) + b',"data":'
    if line.startswith(head) and line.endswith(b"}"):
        return stream, line, line[len(head) : -1]  # verbatim bytes
    data = orjson.dumps(frame["data"])
    return stream, head + data + b"}", data


def load_capture(path: str | Path) -> Capture:
    """Parse a capture file: one frame per line, optionally prefixed by its receive time
    (``1633998512.06: {...}``), or the timeline form ``{"recv_ts","source":"ws","frame"}`` /
    ``{"recv_ts","source":"rest","url","body"}``. Raises ValueError naming the bad line."""
    frames: list[tuple[float | None, str, bytes, bytes]] = []
    snaps: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for lineno, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        ts: float | None = None
        m = _TS_PREFIX.match(line)
        if m and not line.startswith(b"{"):
            ts, line = float(m.group(1)), m.group(2).strip()
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object")
        if "source" in obj and "recv_ts" in obj:
            ts = float(obj["recv_ts"])
            if obj["source"] == "rest":
                q = parse_qs(urlsplit(str(obj.get("url", ""))).query)
                sym = (q.get("symbol") or [""])[0].upper()
                if sym and isinstance(obj.get("body"), dict):
                    snaps.setdefault(sym, []).append((ts, obj["body"]))
                continue
            frame = obj.get("frame")
            if not isinstance(frame, dict):
                raise ValueError(f"{path}:{lineno}: timeline ws entry without a frame object")
            line = orjson.dumps(frame)
            obj = frame
        if "stream" not in obj or "data" not in obj:
            raise ValueError(f"{path}:{lineno}: not a combined-stream frame (no stream/data)")
        stream, combined, payload = _split_combined(line, obj)
        frames.append((ts, stream, combined, payload))
    if not frames:
        raise ValueError(f"{path}: no frames")
    return Capture(frames, snaps, {f[1] for f in frames})


def capture_symbols(cap: Capture) -> list[str]:
    syms: list[str] = []
    for s in sorted(cap.streams):
        sym = s.partition("@")[0].upper()
        if sym and sym not in syms:
            syms.append(sym)
    for sym in cap.snapshots:
        if sym not in syms:
            syms.append(sym)
    return syms


# --------------------------------------------------------------------------------------------
# The simulator


class CaptureReplay:
    """Sends one capture's frames once, starting when the first stream client connects.

    ``position`` is the receive time of the last frame sent (None before the first timed
    one): REST depth and ``/sim/state`` read it.
    """

    def __init__(
        self, capture: Capture, speed: str, hub: StreamHub, faults: Faults, stats: dict[str, int]
    ) -> None:
        self.capture = capture
        self.speed = speed  # "recorded" | "max"
        self.hub = hub
        self.faults = faults
        self.stats = stats
        self.position: float | None = None

    def depth_snapshot(self, sym: str, limit: int) -> dict[str, Any] | None:
        """The captured REST depth of ``sym`` current at the replay position (the first one
        before the replay starts), cut to ``limit`` levels; None if the capture has none."""
        snaps = self.capture.snapshots.get(sym)
        if not snaps:
            return None
        pos = self.position
        chosen = snaps[0][1]
        if pos is not None:
            for ts, body in snaps:
                if ts <= pos:
                    chosen = body
        return {
            "lastUpdateId": chosen.get("lastUpdateId"),
            "bids": list(chosen.get("bids", []))[:limit],
            "asks": list(chosen.get("asks", []))[:limit],
        }

    async def run(self) -> None:
        hub, faults, stats = self.hub, self.faults, self.stats
        all_subs, dirty = hub.subs, hub.dirty
        loop = asyncio.get_running_loop()
        await hub.client_joined.wait()
        frames = self.capture.frames
        t0_rec = next((f[0] for f in frames if f[0] is not None), None)
        t0 = loop.time()
        if t0_rec is not None:
            self.position = t0_rec
        recorded = self.speed == "recorded"
        for ts, stream, combined_line, payload in frames:
            if recorded and ts is not None and t0_rec is not None:
                delay = (ts - t0_rec) - (loop.time() - t0)
                if delay > 0:
                    hub.flush()
                    await asyncio.sleep(delay)
            while faults.stall or hub.backpressured(loop.time()):
                hub.flush()
                await asyncio.sleep(0.005)
                faults.expire(loop.time())
            if ts is not None:
                self.position = ts
            subs = all_subs.get(stream)
            if subs:
                comb_f = raw_f = None
                for c in subs:
                    if c.micros:  # rare in replay: converted per client
                        c.pending.append(ws_frame(micros_payload(
                            combined_line if c.combined else payload)))
                    elif c.combined:
                        comb_f = comb_f or ws_frame(combined_line)
                        c.pending.append(comb_f)
                    else:
                        raw_f = raw_f or ws_frame(payload)
                        c.pending.append(raw_f)
                    c.pending_frames += 1
                    dirty.add(c)
            stats["replay_frames"] += 1
            if not recorded and stats["replay_frames"] % 256 == 0:
                hub.flush()
                await asyncio.sleep(0)
        hub.flush()
        log.info("sim replay finished", extra={"frames": len(frames)})
