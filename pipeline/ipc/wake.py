"""Futex wake-ups for ring readers: sleep until the writer publishes, not for a fixed nap.

Why: an idle reader used to nap in fixed steps (tens to hundreds of microseconds), so a tick that
landed during a nap waited for its end, and a reader that wanted better burned a core spinning.
A futex lets it sleep in the kernel until the writer's next publish wakes it (~10 us on a 2-core
VM), and costs the writer nothing when nobody sleeps: one load of the sleepers word per publish.

The protocol (the C side is ``pipeline/ipc/_futex.c``; the ingest fast path in
``pipeline/marketdata/_ticks.c`` follows the writer's half of it too):

- the writer stores the cursor (sequentially consistent), then loads the sleepers word and, only
  if it is non-zero, wakes every waiter on the cursor word;
- a reader sets its bit in the sleepers word (its reader-table entry's index, below
  :data:`~pipeline.ipc.layout.SLEEPER_BITS`), re-checks the cursor, and sleeps on the cursor's
  low 32 bits with a timeout (a dead writer never strands it); the bit is cleared on every
  return, and by whoever reaps the entry of a reader killed while asleep.

The writer says it takes part by setting the header's wake-ups word; a reader sleeps on the futex
only if that word is set and it has the extension and a bit. Otherwise it naps as before
(:mod:`pipeline.ipc.idle`): the extension is optional (built by the default install; a machine
without a C compiler, or not Linux, gets the naps).
"""

from __future__ import annotations

import sys
from typing import Any, Final, Protocol

#: the interface version of pipeline/ipc/_futex.c this module drives
API_VERSION: Final = 1


class Doorbell(Protocol):
    """What the extension's ``Doorbell(header, cursor_word, sleepers_word)`` offers."""

    wakes: int

    def publish(self, cursor: int, /) -> None: ...

    def wake(self) -> None: ...

    def sleep(self, bit: int, pos: int, timeout_s: float, /) -> int: ...

    def clear(self, bit: int, /) -> None: ...

    def close(self) -> None: ...


def _load() -> tuple[Any, str]:
    if not sys.platform.startswith("linux"):
        return None, f"futex wake-ups need Linux (this is {sys.platform}): readers nap"
    try:
        from pipeline.ipc import _futex  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"pipeline.ipc._futex is not built ({exc}): readers nap"
    if getattr(_futex, "API_VERSION", None) != API_VERSION:
        return None, "pipeline.ipc._futex was built from other sources: rebuild it (`make`)"
    return _futex, "futex"


_MODULE, WHY = _load()
#: True when this process can sleep on and wake through the cursor futex
AVAILABLE: Final = _MODULE is not None


def doorbell(header: Any, cursor_word: int, sleepers_word: int) -> Doorbell | None:
    """A doorbell on a ring header (int64 words, writable), or None without the extension."""
    if _MODULE is None:
        return None
    bell: Doorbell = _MODULE.Doorbell(header, cursor_word, sleepers_word)
    return bell
