"""An ingest process's frame handling, in process, on a real shared-memory ring.

Why: the frame handlers (JSON, SBE, the compiled paths) are tested frame by frame without
sockets, but on the ring and with the setup the process does (``setup_publishing``); REST
recovery tasks are not started (a test feeds what they would).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from pipeline.ipc.records import TICK_DTYPE, Kind


@contextmanager
def inproc_ingest(ring: str, symbols: list[str], capacity: int = 1 << 12,
                  **settings: Any) -> Iterator[Any]:
    """An :class:`~pipeline.marketdata.ingest.Ingest` with ``IngestConfig(symbols=symbols,
    **settings)`` writing ring ``ring``; released and the ring removed on exit."""
    from pipeline.ipc.ring import RingWriter
    from pipeline.marketdata.ingest import Ingest, IngestConfig

    w = RingWriter.create(ring, TICK_DTYPE, capacity, symbols=symbols)
    loop = asyncio.new_event_loop()
    ing = None
    try:
        ing = Ingest(IngestConfig(symbols=symbols, **settings), w, None)
        ing._spawn = lambda coro, running, key: coro.close()  # no REST tasks in process
        ing.setup_publishing(loop)
        yield ing
    finally:
        if ing is not None:
            ing.release()
        loop.close()
        w.close()


_DEPTH_KINDS = (int(Kind.DEPTH_TOP), int(Kind.DEPTH_LEVEL), int(Kind.BOOK_RESYNC),
                int(Kind.BOOK_STALE))


def stale_marks(recs: np.ndarray, sid: int, ends: tuple[Kind, ...]) -> int:
    """Check symbol ``sid``'s BOOK_STALE records against its other depth records and return how
    many there are: each follows a live book record (one per outage, never two in a row) and
    names that record's update id, and what ends it is one of ``ends``."""
    mine = recs[recs["symbol"] == sid]
    depth = mine[np.isin(mine["kind"], _DEPTH_KINDS)]
    kinds = depth["kind"]
    marks = np.flatnonzero(kinds == Kind.BOOK_STALE)
    for i in marks:
        assert i > 0, (sid, "a BOOK_STALE before any book")
        assert kinds[i - 1] in (Kind.DEPTH_TOP, Kind.DEPTH_LEVEL), (sid, kinds[:i + 1])
        assert depth["trade_id"][i] == depth["trade_id"][i - 1], sid
        if i + 1 < len(depth):
            assert Kind(int(kinds[i + 1])) in ends, (sid, kinds[i - 1:i + 2])
    return len(marks)
