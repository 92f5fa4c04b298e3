"""Small helpers shared by the tests that talk to the simulator over real sockets.

A plain module next to the tests: pytest's default ("prepend") import mode puts tests/ on
sys.path (there is no tests/__init__.py), so the test modules import it as ``simhelpers``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

FIX = Path(__file__).parent / "fixtures" / "streams"


def run(coro_fn: Callable[[], Awaitable[None]], timeout: float = 15.0) -> None:
    """Run ``coro_fn()`` in a fresh event loop, failing it after ``timeout`` seconds."""

    async def main() -> None:
        await asyncio.wait_for(coro_fn(), timeout)

    asyncio.run(main())


def async_test(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run an async test body in a fresh event loop (no asyncio pytest plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))

    return wrapper


def fixture(name: str) -> Any:
    """A captured payload from tests/fixtures/streams (parsed JSON)."""
    return json.loads((FIX / name).read_text())


def shape(d: Any) -> Any:
    """Key order and value types (recursively for dicts; element types for lists)."""
    if isinstance(d, dict):
        return [(k, shape(v)) for k, v in d.items()]
    if isinstance(d, list):
        return ["list", shape(d[0]) if d else None]
    return type(d).__name__


async def drain(ws: Any) -> None:
    """Receive until the connection closes (raises ConnectionClosed)."""
    while True:
        await ws.recv()


async def until(pred: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Wait for ``pred()`` to hold, polling; fail if it does not within ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def block_snapshot(name: str) -> dict[str, int | float]:
    """A metrics block's fields ({} while it does not exist or is still being created): for
    tests that wait on a real process's block."""
    from pipeline.ipc.metrics import MetricsBlock, MetricsError

    try:
        block = MetricsBlock.attach(name)
    except (FileNotFoundError, MetricsError):
        return {}
    try:
        return block.snapshot()
    finally:
        block.close()
