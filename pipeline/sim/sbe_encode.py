"""The simulator's own SBE encoder of Binance's four market-data templates (schema id 1, v0).

Why the simulator has its own: a client decoder tested only against frames its own code wrote
would agree with itself whatever the schema says. This module is written from the schema
``stream_1_0.xml`` (binance-protocol.md 7.1) and shares no code with the client's decoder
(:mod:`pipeline.binance.sbe`), so the two can catch each other's mistakes.

PURE: bytes in, bytes out. Layout, little-endian throughout:

- message header ``<HHHH``: blockLength, templateId, schemaId = 1, version = 0;
- the fixed block (``blockLength`` bytes);
- repeating groups: ``groupSizeEncoding`` (u16 blockLength, u32 numInGroup) for trades,
  ``groupSize16Encoding`` (u16 blockLength, u16 numInGroup) for bids/asks, then the entries;
- the var-length ``symbol``: u8 length + UTF-8 bytes.

Times are microseconds. Prices and quantities are ``mantissa * 10**exponent`` with one exponent
for the prices and one for the quantities of a message; :func:`exponents` picks them from the
symbol's tick and step size, so a BTCUSDT price 60000.01 (tick 0.01) goes out as mantissa
6000001, exponent -2. The simulator keeps amounts as integers in 1e-8 units
(:mod:`pipeline.sim.units`); a message whose amounts are not all on the chosen grid (a user
order's odd quantity) falls back to exponent -8 for that field, so no value is ever rounded.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from decimal import Decimal

from pipeline.binance.filters import SymbolRules

SCHEMA_ID = 1
SCHEMA_VERSION = 0
UNITS_EXPONENT = -8  # the simulator's internal unit is 1e-8

TEMPLATE_TRADES = 10000
TEMPLATE_BEST_BID_ASK = 10001
TEMPLATE_DEPTH_SNAPSHOT = 10002
TEMPLATE_DEPTH_DIFF = 10003

_HEADER = struct.Struct("<HHHH")
# fixed blocks (field order as in the schema)
_TRADES_BLOCK = struct.Struct("<qqbb")  # eventTime, transactTime, priceExp, qtyExp
_TRADE_ENTRY = struct.Struct("<qqqB")  # id, price, qty, isBuyerMaker (isBestMatch is constant)
_BBA_BLOCK = struct.Struct("<qqbbqqqq")  # eventTime, bookUpdateId, exps, bid px/qty, ask px/qty
_SNAPSHOT_BLOCK = struct.Struct("<qqbb")  # eventTime, bookUpdateId, priceExp, qtyExp
_DIFF_BLOCK = struct.Struct("<qqqbb")  # eventTime, first/last bookUpdateId, priceExp, qtyExp
_LEVEL = struct.Struct("<qq")  # price, qty
_GROUP32 = struct.Struct("<HI")  # groupSizeEncoding
_GROUP16 = struct.Struct("<HH")  # groupSize16Encoding

MAX_GROUP16 = 0xFFFF
MAX_GROUP32 = 2_147_483_647  # the schema's maxValue for numInGroup
MAX_SYMBOL_BYTES = 0xFF


class SbeEncodeError(ValueError):
    """A value the schema cannot carry (symbol over 255 bytes, too many levels, int64 overflow)."""


def exponent_of(size: Decimal) -> int:
    """The decimal exponent of a tick or step size: 0.01 -> -2, 1 -> 0, 10 -> 0.

    Sizes above 1 use exponent 0 (integers), finer than 1e-8 cannot occur (Binance and the
    simulator have 8 decimals).
    """
    exp = size.normalize().as_tuple().exponent
    assert isinstance(exp, int)
    return max(UNITS_EXPONENT, min(0, exp))


def exponents(rules: SymbolRules) -> tuple[int, int]:
    """(price exponent, quantity exponent) of a symbol: from its tick size and step size."""
    return exponent_of(rules.tick_size), exponent_of(rules.step_size)


def _fit(values: Sequence[int], exp: int) -> int:
    """``exp`` if every value (1e-8 units) is a whole multiple of 10**exp, else -8."""
    div = 10 ** (exp - UNITS_EXPONENT)
    if div == 1 or all(v % div == 0 for v in values):
        return exp
    return UNITS_EXPONENT


def _symbol(symbol: str) -> bytes:
    raw = symbol.encode()
    if len(raw) > MAX_SYMBOL_BYTES:
        raise SbeEncodeError(f"symbol of {len(raw)} bytes does not fit varString8")
    return bytes((len(raw),)) + raw


def _levels(levels: Sequence[tuple[int, int]], pdiv: int, qdiv: int) -> bytes:
    if len(levels) > MAX_GROUP16:
        raise SbeEncodeError(f"{len(levels)} levels do not fit groupSize16Encoding")
    pack = _LEVEL.pack
    return _GROUP16.pack(_LEVEL.size, len(levels)) + b"".join(
        pack(p // pdiv, q // qdiv) for p, q in levels
    )


def encode_trades(
    symbol: str,
    event_time_us: int,
    transact_time_us: int,
    trades: Sequence[tuple[int, int, int, bool]],
    price_exp: int,
    qty_exp: int,
) -> bytes:
    """TradesStreamEvent (10000): the trades ``(id, price units, qty units, buyer_maker)`` of
    one taker order, one event."""
    if len(trades) > MAX_GROUP32:
        raise SbeEncodeError(f"{len(trades)} trades do not fit groupSizeEncoding")
    pe = _fit([t[1] for t in trades], price_exp)
    qe = _fit([t[2] for t in trades], qty_exp)
    pdiv, qdiv = 10 ** (pe - UNITS_EXPONENT), 10 ** (qe - UNITS_EXPONENT)
    pack = _TRADE_ENTRY.pack
    try:
        body = b"".join(pack(t, p // pdiv, q // qdiv, 1 if bm else 0) for t, p, q, bm in trades)
        return b"".join((
            _HEADER.pack(_TRADES_BLOCK.size, TEMPLATE_TRADES, SCHEMA_ID, SCHEMA_VERSION),
            _TRADES_BLOCK.pack(event_time_us, transact_time_us, pe, qe),
            _GROUP32.pack(_TRADE_ENTRY.size, len(trades)),
            body,
            _symbol(symbol),
        ))
    except struct.error as exc:
        raise SbeEncodeError(f"trade event does not fit the schema: {exc}") from None


def encode_best_bid_ask(
    symbol: str,
    event_time_us: int,
    book_update_id: int,
    best: tuple[int, int, int, int],
    price_exp: int,
    qty_exp: int,
) -> bytes:
    """BestBidAskStreamEvent (10001): ``best`` = (bid px, bid qty, ask px, ask qty) in units."""
    bp, bq, ap, aq = best
    pe = _fit((bp, ap), price_exp)
    qe = _fit((bq, aq), qty_exp)
    pdiv, qdiv = 10 ** (pe - UNITS_EXPONENT), 10 ** (qe - UNITS_EXPONENT)
    try:
        return b"".join((
            _HEADER.pack(_BBA_BLOCK.size, TEMPLATE_BEST_BID_ASK, SCHEMA_ID, SCHEMA_VERSION),
            _BBA_BLOCK.pack(event_time_us, book_update_id, pe, qe,
                            bp // pdiv, bq // qdiv, ap // pdiv, aq // qdiv),
            _symbol(symbol),
        ))
    except struct.error as exc:
        raise SbeEncodeError(f"bestBidAsk does not fit the schema: {exc}") from None


def _book_exps(
    bids: Sequence[tuple[int, int]], asks: Sequence[tuple[int, int]], price_exp: int,
    qty_exp: int,
) -> tuple[int, int, int, int]:
    pe = _fit([p for p, _ in bids] + [p for p, _ in asks], price_exp)
    qe = _fit([q for _, q in bids] + [q for _, q in asks], qty_exp)
    return pe, qe, 10 ** (pe - UNITS_EXPONENT), 10 ** (qe - UNITS_EXPONENT)


def encode_depth_snapshot(
    symbol: str,
    event_time_us: int,
    book_update_id: int,
    bids: Sequence[tuple[int, int]],
    asks: Sequence[tuple[int, int]],
    price_exp: int,
    qty_exp: int,
) -> bytes:
    """DepthSnapshotStreamEvent (10002): the top levels (``<sym>@depth20``), best first."""
    pe, qe, pdiv, qdiv = _book_exps(bids, asks, price_exp, qty_exp)
    try:
        return b"".join((
            _HEADER.pack(_SNAPSHOT_BLOCK.size, TEMPLATE_DEPTH_SNAPSHOT, SCHEMA_ID,
                         SCHEMA_VERSION),
            _SNAPSHOT_BLOCK.pack(event_time_us, book_update_id, pe, qe),
            _levels(bids, pdiv, qdiv),
            _levels(asks, pdiv, qdiv),
            _symbol(symbol),
        ))
    except struct.error as exc:
        raise SbeEncodeError(f"depth snapshot does not fit the schema: {exc}") from None


def encode_depth_diff(
    symbol: str,
    event_time_us: int,
    first_update_id: int,
    last_update_id: int,
    bids: Sequence[tuple[int, int]],
    asks: Sequence[tuple[int, int]],
    price_exp: int,
    qty_exp: int,
) -> bytes:
    """DepthDiffStreamEvent (10003): levels changed by updates U..u, absolute qty (0 = gone)."""
    pe, qe, pdiv, qdiv = _book_exps(bids, asks, price_exp, qty_exp)
    try:
        return b"".join((
            _HEADER.pack(_DIFF_BLOCK.size, TEMPLATE_DEPTH_DIFF, SCHEMA_ID, SCHEMA_VERSION),
            _DIFF_BLOCK.pack(event_time_us, first_update_id, last_update_id, pe, qe),
            _levels(bids, pdiv, qdiv),
            _levels(asks, pdiv, qdiv),
            _symbol(symbol),
        ))
    except struct.error as exc:
        raise SbeEncodeError(f"depth diff does not fit the schema: {exc}") from None


__all__ = [
    "SCHEMA_ID",
    "SCHEMA_VERSION",
    "TEMPLATE_BEST_BID_ASK",
    "TEMPLATE_DEPTH_DIFF",
    "TEMPLATE_DEPTH_SNAPSHOT",
    "TEMPLATE_TRADES",
    "SbeEncodeError",
    "encode_best_bid_ask",
    "encode_depth_diff",
    "encode_depth_snapshot",
    "encode_trades",
    "exponent_of",
    "exponents",
]
