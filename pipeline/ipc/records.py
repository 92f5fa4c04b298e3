"""Fixed-size record layouts shared by every process (one place, numpy structured dtypes), and
the one builder per tick record kind that every Python producer uses (decoders, REST backfill,
books, gap reports), with ``AT_*`` naming a record tuple's fields for its readers.

A tick record is 96 bytes, little-endian, 8-byte aligned fields, so a ring slot (8-byte sequence
word + record) is 104 bytes and a batch of records is one contiguous memcpy. Prices and quantities
are float64: Binance sends decimal strings with at most 8 decimals and <= 16 significant digits in
practice, which float64 round-trips exactly when formatted back with ``repr`` / ``%.8f``.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

import numpy as np


class Kind(IntEnum):
    """What a tick record is; `kind` field."""

    AGG_TRADE = 1
    TRADE = 2
    BOOK_TICKER = 3
    DEPTH_TOP = 4  # top of the locally maintained book (bid/ask fields), after a diff applied
    DEPTH_LEVEL = 5  # one level of a book: `level` index, bid_* and ask_* at that depth
    GAP = 6  # ids [trade_id, aux_id] of `symbol` are missing and could not be recovered
    # (aggregate trade ids; trade ids of the @trade stream when flagged TRADE_IDS; flagged
    # LAPPED: source ring sequences a bridge lost, of every symbol; see Flags)
    BOOK_RESYNC = 7  # the local book was rebuilt from a snapshot (trade_id = new lastUpdateId)
    # the symbol's depth stopped following the exchange (its connection was lost, or after a
    # sequence break, while it waits for a snapshot): its last depth records are stale until
    # its next depth record (DEPTH_TOP / DEPTH_LEVEL / BOOK_RESYNC); trade_id = the
    # book's last update id (0 if it never synced)
    BOOK_STALE = 8


class Flags(IntFlag):
    NONE = 0
    BUYER_IS_MAKER = 1  # `m`: the aggressor sold
    BACKFILLED = 2  # came from REST backfill, not the live stream
    SNAPSHOT = 4  # depth record produced from a REST snapshot / partial depth stream
    RESYNCED = 8  # first record after a depth sequence break
    TRADE_IDS = 16  # GAP: the missing ids are @trade ids, not aggregate trade ids
    # GAP: not exchange ids but a lap: the NATS bridge publisher (pipeline.bridge) lost source
    # ring sequences [trade_id, aux_id] (aux_id - trade_id + 1 records of any kind and symbol:
    # `symbol` is 0 and means nothing) because the ring writer overwrote them unread. A mirror's
    # readers see it where the lost records would have been.
    LAPPED = 32


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


# ---- record tuples -----------------------------------------------------------------------------
# Python code carries a tick record as a plain tuple of TICK_DTYPE's fields in order, all but the
# last: ``publish_time_ns`` is appended when the record enters the ring (``(*rec, time_ns())``).
# Why a tuple and not a class: the ring packs it with one struct call, and a frame handler that
# costs ~1-2 us cannot afford an object per record. The builders below are the one place that
# spells a record out; everything else names its fields through the positions that follow.

#: A record tuple: TICK_DTYPE's fields in order, without ``publish_time_ns``.
TickTuple = tuple[int, int, int, int, int, float, float, float, float, float, float, int, int, int,
                  int]

#: Position of each field in a record tuple (TICK_DTYPE order): ``rec[AT_TRADE_ID]``, never
#: ``rec[11]``. Module constants rather than an enum: a frame handler reads them on every frame
#: (and Final literals let the type checker know which field of the tuple it gets).
AT_KIND: Final = 0
AT_FLAGS: Final = 1
AT_SYMBOL: Final = 2
AT_LEVEL: Final = 3
AT_PAD: Final = 4
AT_PRICE: Final = 5
AT_QTY: Final = 6
AT_BID_PRICE: Final = 7
AT_BID_QTY: Final = 8
AT_ASK_PRICE: Final = 9
AT_ASK_QTY: Final = 10
AT_TRADE_ID: Final = 11
AT_AUX_ID: Final = 12
AT_EVENT_TIME_NS: Final = 13
AT_RECV_TIME_NS: Final = 14
AT_PUBLISH_TIME_NS: Final = 15
assert [n.strip("_") for n in TICK_DTYPE.names or ()] == [
    "kind", "flags", "symbol", "level", "pad", "price", "qty", "bid_price", "bid_qty", "ask_price",
    "ask_qty", "trade_id", "aux_id", "event_time_ns", "recv_time_ns", "publish_time_ns"
], "TICK_DTYPE changed: update the AT_* positions and the builders below"

# plain ints: the builders run once per frame and an IntEnum member costs a lookup each time
_AGG_TRADE = int(Kind.AGG_TRADE)
_TRADE = int(Kind.TRADE)
_BOOK_TICKER = int(Kind.BOOK_TICKER)
_DEPTH_TOP = int(Kind.DEPTH_TOP)
_DEPTH_LEVEL = int(Kind.DEPTH_LEVEL)
_GAP = int(Kind.GAP)
_BOOK_RESYNC = int(Kind.BOOK_RESYNC)
_BOOK_STALE = int(Kind.BOOK_STALE)
_RESYNCED = int(Flags.RESYNCED)

#: The record kinds whose ``trade_id`` an id tracker accounts for (gap-free, exactly once).
TRACKED_KINDS = (_AGG_TRADE, _TRADE)

# Calling them: with keywords (the builders below that are keyword-only insist). The three that
# the stream decoders call on every frame also take their arguments by position, in the order
# of their parameters: on CPython 3.11 a call with 7-8 keywords costs ~110 ns in the decoder
# against ~45 ns positional, on a ~1 us decode (measured in-process, interleaved A/B); the
# decoders pass them positionally with the parameter names beside, everyone else by name.


def agg_trade_record(symbol: int, flags: int, price: float, qty: float, agg_id: int,
                     last_trade_id: int, event_time_ns: int, recv_time_ns: int) -> TickTuple:
    """An aggregate trade (live ``aggTrade`` or a REST ``/api/v3/aggTrades`` row):
    ``trade_id`` = aggregate id ``a``, ``aux_id`` = last underlying trade id ``l``."""
    return (_AGG_TRADE, flags, symbol, 0, 0, price, qty, 0.0, 0.0, 0.0, 0.0, agg_id,
            last_trade_id, event_time_ns, recv_time_ns)


def trade_record(symbol: int, flags: int, price: float, qty: float, trade_id: int,
                 event_time_ns: int, recv_time_ns: int) -> TickTuple:
    """One ``@trade`` trade: ``trade_id`` = trade id ``t``."""
    return (_TRADE, flags, symbol, 0, 0, price, qty, 0.0, 0.0, 0.0, 0.0, trade_id, 0,
            event_time_ns, recv_time_ns)


def book_ticker_record(symbol: int, bid_price: float, bid_qty: float, ask_price: float,
                       ask_qty: float, update_id: int, recv_time_ns: int) -> TickTuple:
    """Best bid/ask from ``bookTicker``: ``trade_id`` = book update id ``u``. It carries no
    event time (the stream has none), so ``event_time_ns`` is 0."""
    return (_BOOK_TICKER, 0, symbol, 0, 0, 0.0, 0.0, bid_price, bid_qty, ask_price, ask_qty,
            update_id, 0, 0, recv_time_ns)


def depth_top_record(*, symbol: int, flags: int, bid_price: float, bid_qty: float,
                     ask_price: float, ask_qty: float, update_id: int, first_update_id: int,
                     event_time_ns: int, recv_time_ns: int) -> TickTuple:
    """Top of a local book after a change: ``trade_id`` = the book's update id, ``aux_id`` = the
    first update id of the diff (0 for a snapshot / partial depth)."""
    return (_DEPTH_TOP, flags, symbol, 0, 0, 0.0, 0.0, bid_price, bid_qty, ask_price, ask_qty,
            update_id, first_update_id, event_time_ns, recv_time_ns)


def depth_level_record(*, symbol: int, flags: int, level: int, bid_price: float, bid_qty: float,
                       ask_price: float, ask_qty: float, update_id: int, first_update_id: int,
                       event_time_ns: int, recv_time_ns: int) -> TickTuple:
    """Level ``level`` (0 = best) of a local book, ids as in :func:`depth_top_record`; a side
    with fewer levels has price and quantity 0 there."""
    return (_DEPTH_LEVEL, flags, symbol, level, 0, 0.0, 0.0, bid_price, bid_qty, ask_price,
            ask_qty, update_id, first_update_id, event_time_ns, recv_time_ns)


def gap_record(*, symbol: int, flags: int, first_missing: int, last_missing: int,
               recv_time_ns: int) -> TickTuple:
    """Ids ``first_missing..last_missing`` of ``symbol`` are lost for good (Flags.TRADE_IDS in
    ``flags``: @trade ids, else aggregate trade ids)."""
    return (_GAP, flags, symbol, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, first_missing, last_missing,
            0, recv_time_ns)


def id_reset_record(*, symbol: int, flags: int, last_before: int, first_after: int,
                    recv_time_ns: int) -> TickTuple:
    """An id sequence restarted: a GAP flagged RESYNCED (added here) whose ``trade_id`` is the
    last id before the restart and ``aux_id`` the first after it. The ids between are not a
    range of missing trades, so nothing is fetched for them."""
    return (_GAP, flags | _RESYNCED, symbol, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, last_before,
            first_after, 0, recv_time_ns)


def book_resync_record(*, symbol: int, flags: int, snapshot_update_id: int, book_update_id: int,
                       recv_time_ns: int) -> TickTuple:
    """The local book was rebuilt from a REST snapshot: ``trade_id`` = the snapshot's
    ``lastUpdateId``, ``aux_id`` = the book's update id once the buffered diffs are applied."""
    return (_BOOK_RESYNC, flags, symbol, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, snapshot_update_id,
            book_update_id, 0, recv_time_ns)


def book_stale_record(*, symbol: int, update_id: int, recv_time_ns: int) -> TickTuple:
    """The symbol's depth records stopped being current (:data:`Kind.BOOK_STALE`): a consumer
    holding its last book must not trade on it until the symbol's next depth record.
    ``trade_id`` = the last update id the book had; ``recv_time_ns`` = when ingest noticed."""
    return (_BOOK_STALE, 0, symbol, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, update_id, 0, 0,
            recv_time_ns)


def symbol_of(symbols: list[str], sid: int) -> str:
    """A record's symbol name; ``#<id>`` for an id outside the ring's table (never an error)."""
    return symbols[sid] if 0 <= sid < len(symbols) else f"#{sid}"


#: depth records that say a symbol's book is current (again, after a BOOK_STALE)
BOOK_LIVE_KINDS = (_DEPTH_TOP, _DEPTH_LEVEL, _BOOK_RESYNC)


class StaleBooks:
    """Which symbols' books are stale now (a BOOK_STALE and no depth record since), followed
    from tick batches in ring order. One reading of the rule for every consumer (the monitor
    says it, risk refuses orders on it). Costs one comparison per batch while no book is stale.
    """

    def __init__(self) -> None:
        self.names: set[str] = set()

    def update(self, batch: np.ndarray, names: list[str]) -> list[tuple[str, bool, int]]:
        """The changes ``batch`` makes, in ring order: (symbol, stale now, update id)."""
        kinds = batch["kind"]
        stale = kinds == _BOOK_STALE
        if not self.names and not stale.any():
            return []
        sel = batch[stale | np.isin(kinds, BOOK_LIVE_KINDS)]
        out = []
        for kind, sid, uid in zip(sel["kind"].tolist(), sel["symbol"].tolist(),
                                  sel["trade_id"].tolist(), strict=True):
            name, now_stale = symbol_of(names, sid), kind == _BOOK_STALE
            if now_stale != (name in self.names):
                (self.names.add if now_stale else self.names.discard)(name)
                out.append((name, now_stale, uid))
        return out

