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

from pipeline.ipc.records import TICK_DTYPE


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
