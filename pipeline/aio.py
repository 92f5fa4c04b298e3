"""One way to run a process's top-level coroutine: on uvloop when it is importable (lower
per-wakeup latency, the loop every process here is tuned and measured on), else on the standard
asyncio loop, so a checkout without uvloop still runs the same code."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a fresh event loop and return its result."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
