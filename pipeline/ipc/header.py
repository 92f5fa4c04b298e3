"""What every shared-memory segment of ours begins with: a magic, a version, and its owner.

Rings (:mod:`pipeline.ipc.layout`) and metrics blocks (:mod:`pipeline.ipc.metrics`) both start
with an 8-byte magic and a version word, and both name their writer process (pid and start
ticks, so a recycled pid is not taken for it) at fixed header words. A :class:`HeaderFormat`
describes one such format once; the format's parser (magic and version checks), its stale-segment
replacement and the runner's cleanup of dead owners' segments all read the header through it, so
no reader of a segment spells those rules out again. Pure: works over header words or the first
bytes of a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: bytes of a segment that hold every word a :class:`HeaderFormat` may name (its first line)
HEAD_BYTES = 64


@dataclass(frozen=True)
class HeaderFormat:
    """One segment format's identity: magic (word 0), version (word 1), owner pid/start words.

    ``what`` names the format in messages ("ring"); ``version_name`` and the two hints complete
    the messages :meth:`problem` returns, so each format keeps its own wording."""

    what: str
    magic: bytes
    version: int
    pid_word: int
    start_word: int
    version_name: str = "version"
    magic_hint: str = ""
    version_hint: str = ""

    def __post_init__(self) -> None:
        if len(self.magic) != 8:
            raise ValueError(f"a segment magic is 8 bytes, got {self.magic!r}")
        if max(self.pid_word, self.start_word) >= HEAD_BYTES // 8:
            raise ValueError("owner words must lie in the first header line")

    @property
    def magic_word(self) -> int:
        """The magic as the int64 word 0 holds it (native little-endian)."""
        return int.from_bytes(self.magic, "little")

    def problem(self, words: Sequence[int], name: str) -> str | None:
        """Why header ``words`` (int64, from word 0) are not this format at this version: a
        message naming segment ``name``, or None when they are. The caller raises its own error
        class with it."""
        magic = words[0]
        if magic != self.magic_word:
            raw = (magic & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
            return (
                f"shared memory {name!r} is not a {self.what} (bad magic {raw!r}{self.magic_hint})"
            )
        if words[1] != self.version:
            return (
                f"{self.what} {name!r} has {self.version_name} {words[1]}, this code reads "
                f"{self.version}{self.version_hint}"
            )
        return None

    def owner(self, words: Sequence[int]) -> tuple[int, int]:
        """``(pid, start ticks)`` of the segment's writer, from its header words."""
        return int(words[self.pid_word]), int(words[self.start_word])

    def owner_of_head(self, head: bytes) -> tuple[int, int] | None:
        """The writer of a segment whose first bytes are ``head`` (at least :data:`HEAD_BYTES`,
        read without mapping it), or None if it is not of this format."""
        if len(head) < HEAD_BYTES or head[:8] != self.magic:
            return None
        words = [int.from_bytes(head[i : i + 8], "little", signed=True) for i in range(0, 64, 8)]
        return self.owner(words)
