"""Low-latency Binance gateway: ingest -> shared-memory ring -> consumers, and trading.

The public API is this one import; everything below ``pipeline.`` else is internal and may move::

    from pipeline import RingReader, TICK_DTYPE, Kind, Flags, OrderClient

Names are loaded on first use (PEP 562 ``__getattr__``), so ``import pipeline`` costs nothing and
a strategy that only needs :class:`OrderClient` does not pay for the ring writer or the trading
session. ``tests/test_public_api.py`` pins the list.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "RingReader": "pipeline.ipc.segments",
    "RingWriter": "pipeline.ipc.segments",
    "RingError": "pipeline.ipc.layout",
    "TICK_DTYPE": "pipeline.ipc.records",
    "TICK_RING": "pipeline.ipc.records",
    "Kind": "pipeline.ipc.records",
    "Flags": "pipeline.ipc.records",
    "MetricsBlock": "pipeline.ipc.metrics",
    "OrderClient": "pipeline.trading.client",
    "ExecReport": "pipeline.trading.client",
    "TradingNotRunningError": "pipeline.trading.client",
}

__all__ = [
    "TICK_DTYPE",
    "TICK_RING",
    "ExecReport",
    "Flags",
    "Kind",
    "MetricsBlock",
    "OrderClient",
    "RingError",
    "RingReader",
    "RingWriter",
    "TradingNotRunningError",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ loads lazily
    __version__: str
    from pipeline.ipc.layout import RingError
    from pipeline.ipc.metrics import MetricsBlock
    from pipeline.ipc.records import TICK_DTYPE, TICK_RING, Flags, Kind
    from pipeline.ipc.segments import RingReader, RingWriter
    from pipeline.trading.client import ExecReport, OrderClient, TradingNotRunningError


def __getattr__(name: str) -> Any:
    if name == "__version__":  # one source: pyproject's version, via the package metadata
        from pipeline.distribution import version

        return version()
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
