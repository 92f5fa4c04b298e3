"""Fixed-size record layouts shared by every process (one place, numpy structured dtypes).

A tick record is 96 bytes, little-endian, 8-byte aligned fields, so a ring slot (8-byte sequence
word + record) is 104 bytes and a batch of records is one contiguous memcpy. Prices and quantities
are float64: Binance sends decimal strings with at most 8 decimals and <= 16 significant digits in
practice, which float64 round-trips exactly when formatted back with ``repr`` / ``%.8f``.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

import numpy as np


class Kind(IntEnum):
    """What a tick record is; `kind` field."""

    AGG_TRADE = 1
    TRADE = 2
    BOOK_TICKER = 3
    DEPTH_TOP = 4  # top of the locally maintained book (bid/ask fields), after a diff applied
    DEPTH_LEVEL = 5  # one level of a book: `level` index, bid_* and ask_* at that depth
    GAP = 6  # ids [trade_id, aux_id] of `symbol` are missing and could not be recovered
    # (aggregate trade ids; trade ids of the @trade stream when flagged TRADE_IDS)
    BOOK_RESYNC = 7  # the local book was rebuilt from a snapshot (trade_id = new lastUpdateId)


class Flags(IntFlag):
    NONE = 0
    BUYER_IS_MAKER = 1  # `m`: the aggressor sold
    BACKFILLED = 2  # came from REST backfill, not the live stream
    SNAPSHOT = 4  # depth record produced from a REST snapshot / partial depth stream
    RESYNCED = 8  # first record after a depth sequence break
    TRADE_IDS = 16  # GAP: the missing ids are @trade ids, not aggregate trade ids


TICK_DTYPE = np.dtype(
    [
        ("kind", "u1"),
        ("flags", "u1"),
        ("symbol", "<u2"),  # index into the ring's symbol table (RingReader.symbols)
        ("level", "<u2"),  # depth level index for DEPTH_LEVEL, else 0
        ("_pad", "<u2"),
        ("price", "<f8"),
        ("qty", "<f8"),
        ("bid_price", "<f8"),
        ("bid_qty", "<f8"),
        ("ask_price", "<f8"),
        ("ask_qty", "<f8"),
        # agg trade id (`a`) / trade id (`t`) / book update id (`u`); GAP: first missing id
        ("trade_id", "<i8"),
        # agg trade: last underlying trade id (`l`); depth: first update id (`U`); GAP: last missing
        ("aux_id", "<i8"),
        ("event_time_ns", "<i8"),  # exchange event time (`E`, or `T` where there is no `E`)
        ("recv_time_ns", "<i8"),  # local wall clock (time.time_ns) when the frame arrived
        ("publish_time_ns", "<i8"),  # local wall clock when the record entered the ring
    ],
    align=True,
)
assert TICK_DTYPE.itemsize == 96, TICK_DTYPE.itemsize


def empty_ticks(n: int) -> np.ndarray:
    """A zeroed batch of ``n`` tick records."""
    return np.zeros(n, dtype=TICK_DTYPE)


# The tick ring's name when nobody says otherwise: ingest, `pipeline run`, the consumers, the
# latency probe and `pipeline health` must agree on it, or a newcomer's probe finds nothing.
TICK_RING = "pipeline.ticks"
