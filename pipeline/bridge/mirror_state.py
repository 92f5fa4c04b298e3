"""Where a mirror is in the stream, kept across its restarts (sans-I/O apart from one file).

The mirror writes the records of stream messages into its ring and then, every ~50 ms, saves
``(next stream sequence, its ring's epoch, its ring's cursor)`` as one consistent pair. A mirror
killed between a write and the next save has written more than it saved; the ring it left in
``/dev/shm`` still says how much (its cursor), so the restarted mirror replays from the saved
sequence and drops exactly ``cursor - saved cursor`` records, which are whole messages because
each message is written with one ``publish_many``. No duplicate for a reader that had read them,
no hole for one that had not, without a save per message.

``--start`` (all, new, seq:N, time:ISO8601) applies only when no position is saved, so the same
command line after a crash resumes instead of replaying or skipping.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class StartError(ValueError):
    """A ``--start`` value that is not all, new, seq:N or time:ISO8601."""


@dataclass(frozen=True)
class StartAt:
    """Where a mirror without a saved position begins."""

    policy: str  #: "all", "new", "seq" or "time"
    seq: int = 0
    time: dt.datetime | None = None


def parse_start(text: str) -> StartAt:
    if text in ("all", "new"):
        return StartAt(text)
    kind, _, value = text.partition(":")
    if kind == "seq":
        try:
            seq = int(value)
        except ValueError:
            raise StartError(f"--start {text!r}: seq:N needs an integer") from None
        if seq < 1:
            raise StartError(f"--start {text!r}: stream sequences start at 1")
        return StartAt("seq", seq=seq)
    if kind == "time":
        try:
            when = dt.datetime.fromisoformat(value)
        except ValueError:
            raise StartError(
                f"--start {text!r}: time:ISO8601, e.g. time:2026-01-02T03:04:05Z"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        return StartAt("time", time=when)
    raise StartError(f"--start {text!r}: one of all, new, seq:N, time:ISO8601")


@dataclass(frozen=True)
class MirrorPosition:
    stream: str
    next_seq: int  #: the next stream sequence to read
    ring_epoch_ns: int  #: the mirror ring these records went into (0: none yet)
    ring_cursor: int  #: that ring's cursor once everything below next_seq was written


def records_to_skip(saved: MirrorPosition | None, ring: dict[str, Any] | None) -> int:
    """Records already in the mirror's ring beyond the saved position: the replay from
    ``saved.next_seq`` drops that many. ``ring``: ``ring_stats`` of the ring the last run left,
    or None. Another ring (epoch differs) or none: nothing to skip (its readers are gone too)."""
    if saved is None or ring is None or not saved.ring_epoch_ns:
        return 0
    if int(ring.get("epoch_ns", 0)) != saved.ring_epoch_ns:
        return 0
    return max(0, int(ring.get("cursor", 0)) - saved.ring_cursor)


class PositionFile:
    """The saved position, as JSON written by rename (never half a file)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self, stream: str) -> MirrorPosition | None:
        """The saved position for ``stream``; None when there is none (first start). A file
        for another stream, or one that does not parse, is an error: guessing would replay or
        skip silently."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
            pos = MirrorPosition(
                stream=str(doc["stream"]), next_seq=int(doc["next_seq"]),
                ring_epoch_ns=int(doc["ring_epoch_ns"]), ring_cursor=int(doc["ring_cursor"]),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"mirror position file {self.path} is unreadable: {exc}") from exc
        if pos.stream != stream:
            raise ValueError(
                f"mirror position file {self.path} is for stream {pos.stream!r}, not {stream!r}"
            )
        return pos

    def save(self, pos: MirrorPosition) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(asdict(pos), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
