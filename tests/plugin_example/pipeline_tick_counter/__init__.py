"""An example ``pipeline.consumers`` plug-in: counts ring records per (symbol, kind).

Only the plug-in contract is used: an entry point naming ``from_args(args, cfg)``, which returns an
object with ``on_batch``, ``on_tick`` and ``close``; the pipeline's consumer loop does the rest
(attach with retry, idle wait, SIGTERM, sd_notify).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from typing import Any

import numpy as np

log = logging.getLogger("pipeline_tick_counter")


class TickCounter:
    """Counts what it reads; writes the counts as JSON on close (to ``out``, or to the log)."""

    def __init__(self, out: str | None) -> None:
        self.out = out
        self.counts: Counter[tuple[str, int]] = Counter()
        self.missed = 0

    def on_batch(self, batch: np.ndarray, reader: Any) -> None:
        names = list(getattr(reader, "symbols", []) or [])
        for sid, kind in zip(batch["symbol"].tolist(), batch["kind"].tolist(), strict=True):
            name = names[sid] if 0 <= sid < len(names) else f"#{sid}"
            self.counts[(name, kind)] += 1

    def on_tick(self, reader: Any, now: float) -> None:
        self.missed = int(reader.missed)

    def close(self) -> None:
        report = {
            "records": sum(self.counts.values()),
            "missed": self.missed,
            "by_symbol_kind": {f"{s}/{k}": n for (s, k), n in sorted(self.counts.items())},
        }
        if self.out:
            with open(self.out, "w") as f:
                json.dump(report, f)
        log.info("tick-counter stopped", extra={"event": "tick_counter_stopped", **report})


def from_args(args: argparse.Namespace, cfg: Any) -> TickCounter:
    """The entry point: ``pipeline consume tick-counter`` calls this with its flags and config."""
    return TickCounter(os.environ.get("TICK_COUNTER_OUT"))


NOT_A_FACTORY = 42  # tests/test_plugins.py registers this as a broken plug-in


def not_a_consumer(args: argparse.Namespace, cfg: Any) -> object:
    """A factory returning something without on_batch/on_tick/close (a broken plug-in)."""
    return object()
