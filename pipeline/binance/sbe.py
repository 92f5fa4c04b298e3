"""Binance SBE market-data frames -> the same records the JSON decoders produce (parse only, pure:
no I/O, no clock). The pure-Python reference decoder, and :func:`make_decoder`, which picks its
compiled twin (``pipeline/binance/_sbe.c``, fixed offsets) when it is built: the twin must give
identical records, skip reasons and counts for every input (tests/test_sbe_compiled.py fuzzes
one against the other).

Implements ``shared/binance-protocol.md`` 7.1 and the schema ``stream_1_0.xml`` (schema id 1,
version 0, little-endian; a copy with its provenance is in tests/fixtures/sbe/). Why a second
wire format at all: SBE carries diff depth every 20 ms (JSON: 100 ms), an event time on best
bid/ask (JSON bookTicker has none), microsecond times, and frames 2-2.5x smaller.

Frame layout (every template)
-----------------------------
``<HHHH`` header (blockLength, templateId, schemaId, version); the fixed block; then the groups,
which start at ``8 + blockLength`` and not at the end of the fields this schema knows: a newer
schema version may append fields to the block, and SBE's rule is that an old decoder skips them
by ``blockLength``. Each group has a dimension header (``groupSizeEncoding`` u16 blockLength + u32
count for trades, ``groupSize16Encoding`` u16 + u16 for bids/asks) and each entry is likewise
skipped by its own blockLength. Then the var-length ``symbol`` (u8 length + UTF-8). Anything after
the symbol (var data a newer version may append) is ignored for the same reason.

Versions: a frame whose ``version`` differs from this schema's is decoded by the rules above and
counted in :attr:`SbeDecoder.other_version_frames` (so the operator sees the venue moved), not
skipped. Why: SBE schema evolution keeps a version compatible only by appending (longer blocks,
new groups/var data at the end), which the blockLength skipping handles; a breaking change gets a
new schema id, which is skipped (WRONG_SCHEMA). Skipping newer versions instead would turn a
harmless venue upgrade into a total market-data outage. A block or entry *shorter* than this
schema's cannot hold the fields we read: SHORT_BLOCK.

Numbers: ``mantissa * 10**exponent`` with one exponent per message for prices and one for
quantities. :func:`decimal_value` DIVIDES the mantissa by ``10**-exponent`` (int / int, which
CPython rounds correctly): ``m * 1e-8`` gives a different float than ``float("0.12345678")`` for
~13% of 8-decimal values, ``m / 10**8`` gives the same float for all, so an SBE record and a JSON
record of the same event carry identical prices. Exponents outside -18..18 are BAD_EXPONENT
(an int64 mantissa has at most 19 digits: nothing Binance lists needs more).

Times are microseconds on the wire; records carry nanoseconds (``* 1000``), as the JSON path does
for its milliseconds. A time whose ns value would not fit an int64, a negative id or a negative
price/quantity is BAD_NUMBER, exactly as in the JSON decoders.

Calling contract
----------------
One :class:`SbeDecoder` per process, built with the configured symbols (their index is the ring's
symbol id). ``decoder.decode(frame, recv_time_ns)`` never raises and returns ``(tag, value)`` with
the tags of :mod:`pipeline.binance.streams`, plus one of its own:

=============  ================================================================================
tag            value
=============  ================================================================================
TRADES         a ``list`` of record tuples (Kind.TRADE), one per trade of the event, in wire
               order (SBE sends a *group* of trades per event; JSON sends one per frame): the
               shell tracks and publishes each as it does a JSON ``TRADE`` value
BOOK_TICKER    a record tuple (Kind.BOOK_TICKER) like JSON's, with ``event_time_ns`` set
DEPTH_PARTIAL  a :class:`~pipeline.binance.streams.DepthPartial` (depth20): as JSON's,
               plus the event time JSON's lacks
DEPTH_DIFF     a :class:`~pipeline.binance.streams.DepthDiff` (diff depth): as JSON's, for the
               existing book procedure (U/u rules) unchanged
SKIP           a reason string (:data:`SKIP_REASONS`): count it and rate-limit-log it
(JSON tags)    a text frame (``str``: SUBSCRIBE reply, ``serverShutdown``) is handed to the JSON
               decoder, whose tags and skip reasons apply
=============  ================================================================================

:meth:`SbeDecoder.decode_or_raise` is the same decoder raising :class:`SbeSkip` (with the reason)
instead; nothing else escapes either (tests/test_sbe_decode.py fuzzes both).
"""

from __future__ import annotations

import struct
from functools import cache
from types import ModuleType
from typing import Any, Final, Protocol

from pipeline.binance.streams import (
    AGG,
    BAD_NUMBER,
    BOOK_TICKER,
    CONTROL,
    DEPTH_DIFF,
    DEPTH_PARTIAL,
    I64_MAX,
    OVERSIZED,
    SHUTDOWN,
    SKIP,
    TRADE,
    DepthDiff,
    DepthPartial,
    Level,
    OrjsonDecoder,
)
from pipeline.binance.streams import SKIP_REASONS as JSON_SKIP_REASONS
from pipeline.ipc.records import (
    AT_EVENT_TIME_NS,
    Flags,
    Kind,
    TickTuple,
    book_ticker_record,
    trade_record,
)

# ---- the schema (stream_1_0.xml) --------------------------------------------------------------
SCHEMA_ID: Final = 1
SCHEMA_VERSION: Final = 0
TRADES_TEMPLATE: Final = 10000  # TradesStreamEvent, <sym>@trade
BEST_BID_ASK_TEMPLATE: Final = 10001  # BestBidAskStreamEvent, <sym>@bestBidAsk
DEPTH_SNAPSHOT_TEMPLATE: Final = 10002  # DepthSnapshotStreamEvent, <sym>@depth20
DEPTH_DIFF_TEMPLATE: Final = 10003  # DepthDiffStreamEvent, <sym>@depth

HEADER: Final = struct.Struct("<HHHH")  # blockLength, templateId, schemaId, version
#: eventTime us, transactTime us, priceExponent, qtyExponent
TRADES_BLOCK: Final = struct.Struct("<qqbb")
#: eventTime us, bookUpdateId, priceExponent, qtyExponent, bidPrice, bidQty, askPrice, askQty
BEST_BID_ASK_BLOCK: Final = struct.Struct("<qqbbqqqq")
#: eventTime us, bookUpdateId, priceExponent, qtyExponent
DEPTH_SNAPSHOT_BLOCK: Final = struct.Struct("<qqbb")
#: eventTime us, firstBookUpdateId, lastBookUpdateId, priceExponent, qtyExponent
DEPTH_DIFF_BLOCK: Final = struct.Struct("<qqqbb")
GROUP_SIZE: Final = struct.Struct("<HI")  # groupSizeEncoding: blockLength, numInGroup (trades)
GROUP_SIZE16: Final = struct.Struct("<HH")  # groupSize16Encoding: blockLength, numInGroup
#: trades entry: id, price mantissa, qty mantissa, isBuyerMaker (isBestMatch is a constant: no
#: bytes on the wire)
TRADE_ENTRY: Final = struct.Struct("<qqqB")
LEVEL_ENTRY: Final = struct.Struct("<qq")  # bids/asks entry: price mantissa, qty mantissa

# ---- decode result tag of its own (the others are streams.py's) -------------------------------
TRADES: Final = 9  # value: list of Kind.TRADE record tuples, one per trade of the event

# ---- skip reasons (metrics field names are ``skipped_<reason>``) -------------------------------
TRUNCATED: Final = "sbe_truncated"  # the frame ends inside the header, block, a group header
# or the symbol
WRONG_SCHEMA: Final = "sbe_wrong_schema"  # schemaId is not 1 (another, incompatible schema)
UNKNOWN_TEMPLATE: Final = "sbe_unknown_template"  # a templateId this schema does not define
SHORT_BLOCK: Final = "sbe_short_block"  # a block or group entry shorter than the fields we read
GROUP_OVERRUN: Final = "sbe_group_overrun"  # count x entry length runs past the frame's end
BAD_EXPONENT: Final = "sbe_bad_exponent"  # a decimal exponent outside -18..18
BAD_SYMBOL: Final = "sbe_bad_symbol"  # the symbol is empty or not UTF-8
UNKNOWN_SYMBOL: Final = "sbe_unknown_symbol"  # a symbol this process was not configured for
SBE_SKIP_REASONS: Final = (TRUNCATED, WRONG_SCHEMA, UNKNOWN_TEMPLATE, SHORT_BLOCK, GROUP_OVERRUN,
                           BAD_EXPONENT, BAD_SYMBOL, UNKNOWN_SYMBOL)
#: every reason :meth:`SbeDecoder.decode` can return: the JSON ones (text frames go to the JSON
#: decoder; BAD_NUMBER and OVERSIZED mean the same for a binary frame) and the SBE ones
SKIP_REASONS: Final = (*JSON_SKIP_REASONS, *SBE_SKIP_REASONS)

assert TRADES not in (AGG, TRADE, BOOK_TICKER, DEPTH_DIFF, DEPTH_PARTIAL, CONTROL, SHUTDOWN, SKIP)

MAX_EXPONENT: Final = 18  # |exponent| accepted (see the module docstring)
_POW10: Final = tuple(10 ** k for k in range(MAX_EXPONENT + 1))
_US_TO_NS: Final = 1_000
_MAX_US: Final = I64_MAX // _US_TO_NS  # largest time whose ns value fits the record's int64
_F_MAKER: Final = int(Flags.BUYER_IS_MAKER)


class SbeSkip(Exception):
    """A frame that is skipped, and why (``reason``: one of :data:`SKIP_REASONS`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decimal_value(mantissa: int, exponent: int) -> float:
    """``mantissa * 10**exponent`` as the float ``float(text)`` gives for the decimal text: divide
    by ``10**-exponent`` (never multiply by ``1e-k``, which is off by one ulp for ~13% of
    8-decimal values). Raises SbeSkip(BAD_EXPONENT) outside -18..18."""
    if exponent < 0:
        if exponent < -MAX_EXPONENT:
            raise SbeSkip(BAD_EXPONENT)
        return mantissa / _POW10[-exponent]
    if exponent > MAX_EXPONENT:
        raise SbeSkip(BAD_EXPONENT)
    return float(mantissa * _POW10[exponent])


def _check_exponents(price_exp: int, qty_exp: int) -> None:
    if not (-MAX_EXPONENT <= price_exp <= MAX_EXPONENT
            and -MAX_EXPONENT <= qty_exp <= MAX_EXPONENT):
        raise SbeSkip(BAD_EXPONENT)


def _group(frame: Any, off: int, size: struct.Struct, min_entry: int) -> tuple[int, int, int]:
    """Read the group dimension at ``off``: (first entry offset, entry length, count), checking
    that every entry fits in the frame before anything reads one."""
    end = off + size.size
    if end > len(frame):
        raise SbeSkip(TRUNCATED)
    entry_len, count = size.unpack_from(frame, off)
    if entry_len < min_entry:
        raise SbeSkip(SHORT_BLOCK)
    if end + count * entry_len > len(frame):
        raise SbeSkip(GROUP_OVERRUN)
    return end, entry_len, count


def _levels(frame: Any, off: int, entry_len: int, count: int, price_exp: int,
            qty_exp: int) -> list[Level]:
    """``count`` (price, qty) levels from ``off``, each entry ``entry_len`` bytes (16 in this
    schema; a longer one from a newer version is read at its own stride)."""
    if entry_len == 16:
        raw: Any = LEVEL_ENTRY.iter_unpack(frame[off:off + 16 * count])
    else:
        unpack = LEVEL_ENTRY.unpack_from
        raw = [unpack(frame, off + i * entry_len) for i in range(count)]
    if price_exp < 0 and qty_exp < 0:  # the common case: one division per number
        pd, qd = _POW10[-price_exp], _POW10[-qty_exp]
        levels = [(p / pd, q / qd) for p, q in raw]
    else:
        levels = [(decimal_value(p, price_exp), decimal_value(q, qty_exp)) for p, q in raw]
    for p, q in levels:
        if p < 0.0 or q < 0.0:
            raise SbeSkip(BAD_NUMBER)
    return levels


class SbeDecoder:
    """Decoder of the four market-data templates (see the module docstring for the contract)."""

    name = "sbe"

    def __init__(self, symbols: list[str], max_frame_bytes: int = 1 << 20,
                 text_decoder: OrjsonDecoder | None = None) -> None:
        self.symbols = list(symbols)
        self.max_frame_bytes = max_frame_bytes
        #: wire symbol (upper-case UTF-8 bytes, as Binance sends it) -> ring symbol id: a dict
        #: lookup on the raw bytes, no decode on the hot path
        self.sid_by_symbol: dict[bytes, int] = {
            s.upper().encode(): sid for sid, s in enumerate(self.symbols)}
        #: text frames on an SBE connection (control replies, serverShutdown) are JSON
        self.text_decoder = text_decoder or OrjsonDecoder(self.symbols, max_frame_bytes)
        #: frames decoded although their schema version is not this schema's (module docstring)
        self.other_version_frames = 0
        self._templates = {TRADES_TEMPLATE: self._trades,
                           BEST_BID_ASK_TEMPLATE: self._best_bid_ask,
                           DEPTH_SNAPSHOT_TEMPLATE: self._depth_snapshot,
                           DEPTH_DIFF_TEMPLATE: self._depth_diff}

    def decode(self, frame: bytes | bytearray | memoryview | str,
               recv_time_ns: int) -> tuple[int, Any]:
        """One websocket message -> ``(tag, value)``; never raises."""
        if type(frame) is str:
            return self.text_decoder.decode(frame, recv_time_ns)
        if len(frame) > self.max_frame_bytes:
            return SKIP, OVERSIZED
        try:
            return self.decode_or_raise(frame, recv_time_ns)  # type: ignore[arg-type]
        except SbeSkip as skip:
            return SKIP, skip.reason

    def decode_or_raise(self, frame: bytes | bytearray | memoryview,
                        recv_time_ns: int) -> tuple[int, Any]:
        """A binary frame -> ``(tag, value)``, or SbeSkip with the reason."""
        if type(frame) is memoryview:
            frame = frame.tobytes()  # slices below must be hashable bytes (the symbol key)
        if len(frame) < 8:
            raise SbeSkip(TRUNCATED)
        block_len, template, schema, version = HEADER.unpack_from(frame)
        if schema != SCHEMA_ID:
            raise SbeSkip(WRONG_SCHEMA)
        handler = self._templates.get(template)
        if handler is None:
            raise SbeSkip(UNKNOWN_TEMPLATE)
        if version != SCHEMA_VERSION:
            self.other_version_frames += 1
        return handler(frame, block_len, recv_time_ns)

    # -- pieces every template shares --
    def _symbol_id(self, frame: Any, off: int) -> int:
        """The var-length symbol at ``off`` -> ring symbol id."""
        n = len(frame)
        if off >= n:
            raise SbeSkip(TRUNCATED)
        end = off + 1 + frame[off]
        if end > n:
            raise SbeSkip(TRUNCATED)
        sym = bytes(frame[off + 1:end])
        sid = self.sid_by_symbol.get(sym)
        if sid is None:  # error path only: say why
            try:
                sym.decode("utf-8")
            except UnicodeDecodeError:
                raise SbeSkip(BAD_SYMBOL) from None
            raise SbeSkip(BAD_SYMBOL if not sym else UNKNOWN_SYMBOL)
        return sid

    @staticmethod
    def _block(frame: Any, block_len: int, layout: struct.Struct) -> tuple[Any, ...]:
        """The fixed block's fields, after checking it holds them and the frame holds it."""
        if block_len < layout.size:
            raise SbeSkip(SHORT_BLOCK)
        if 8 + block_len > len(frame):
            raise SbeSkip(TRUNCATED)
        return layout.unpack_from(frame, 8)

    # -- the four templates --
    def _trades(self, frame: Any, block_len: int, recv_ns: int) -> tuple[int, Any]:
        ev_us, _transact_us, price_exp, qty_exp = self._block(frame, block_len, TRADES_BLOCK)
        off, entry_len, count = _group(frame, 8 + block_len, GROUP_SIZE, TRADE_ENTRY.size)
        sid = self._symbol_id(frame, off + count * entry_len)
        _check_exponents(price_exp, qty_exp)
        if not 0 <= ev_us <= _MAX_US:
            raise SbeSkip(BAD_NUMBER)
        ev_ns = ev_us * _US_TO_NS
        if entry_len == TRADE_ENTRY.size:
            raw: Any = TRADE_ENTRY.iter_unpack(frame[off:off + entry_len * count])
        else:
            unpack = TRADE_ENTRY.unpack_from
            raw = [unpack(frame, off + i * entry_len) for i in range(count)]
        records: list[TickTuple] = []
        divide = price_exp < 0 and qty_exp < 0  # the common case: one division per number
        pd, qd = (_POW10[-price_exp], _POW10[-qty_exp]) if divide else (1, 1)
        for trade_id, price_m, qty_m, maker in raw:
            if trade_id < 0 or price_m < 0 or qty_m < 0 or maker > 1:
                raise SbeSkip(BAD_NUMBER)
            # symbol, flags, price, qty, trade_id, event_time_ns, recv_time_ns
            records.append(trade_record(
                sid, _F_MAKER if maker else 0,
                price_m / pd if divide else decimal_value(price_m, price_exp),
                qty_m / qd if divide else decimal_value(qty_m, qty_exp), trade_id, ev_ns, recv_ns))
        return TRADES, records

    def _best_bid_ask(self, frame: Any, block_len: int, recv_ns: int) -> tuple[int, Any]:
        ev_us, update_id, price_exp, qty_exp, bid_m, bid_qty_m, ask_m, ask_qty_m = \
            self._block(frame, block_len, BEST_BID_ASK_BLOCK)
        sid = self._symbol_id(frame, 8 + block_len)
        _check_exponents(price_exp, qty_exp)
        if not (0 <= ev_us <= _MAX_US and update_id >= 0 and bid_m >= 0 and bid_qty_m >= 0
                and ask_m >= 0 and ask_qty_m >= 0):
            raise SbeSkip(BAD_NUMBER)
        if price_exp < 0 and qty_exp < 0:  # the common case, inline (a call per number costs)
            pd, qd = _POW10[-price_exp], _POW10[-qty_exp]
            # symbol, bid_price, bid_qty, ask_price, ask_qty, update_id, recv_time_ns
            rec = book_ticker_record(sid, bid_m / pd, bid_qty_m / qd, ask_m / pd, ask_qty_m / qd,
                                     update_id, recv_ns)
        else:
            rec = book_ticker_record(sid, decimal_value(bid_m, price_exp),
                                     decimal_value(bid_qty_m, qty_exp),
                                     decimal_value(ask_m, price_exp),
                                     decimal_value(ask_qty_m, qty_exp), update_id, recv_ns)
        # the builder leaves event_time_ns 0 (JSON bookTicker has no event time); SBE has one
        return BOOK_TICKER, (*rec[:AT_EVENT_TIME_NS], ev_us * _US_TO_NS, recv_ns)

    def _depth_sides(self, frame: Any, off: int, price_exp: int,
                     qty_exp: int) -> tuple[int, list[Level], list[Level]]:
        """The bids and asks groups from ``off``, then the symbol: (symbol id, bids, asks)."""
        bid_off, bid_len, bid_count = _group(frame, off, GROUP_SIZE16, LEVEL_ENTRY.size)
        ask_off, ask_len, ask_count = _group(frame, bid_off + bid_count * bid_len, GROUP_SIZE16,
                                             LEVEL_ENTRY.size)
        sid = self._symbol_id(frame, ask_off + ask_count * ask_len)
        _check_exponents(price_exp, qty_exp)
        return (sid, _levels(frame, bid_off, bid_len, bid_count, price_exp, qty_exp),
                _levels(frame, ask_off, ask_len, ask_count, price_exp, qty_exp))

    def _depth_snapshot(self, frame: Any, block_len: int, recv_ns: int) -> tuple[int, Any]:
        ev_us, update_id, price_exp, qty_exp = self._block(frame, block_len,
                                                           DEPTH_SNAPSHOT_BLOCK)
        sid, bids, asks = self._depth_sides(frame, 8 + block_len, price_exp, qty_exp)
        if not (0 <= ev_us <= _MAX_US and update_id >= 0):
            raise SbeSkip(BAD_NUMBER)
        # JSON depth20 has no event time (0); SBE's is carried into the records
        return DEPTH_PARTIAL, DepthPartial(sid, update_id, recv_ns, bids, asks,
                                           ev_us * _US_TO_NS)

    def _depth_diff(self, frame: Any, block_len: int, recv_ns: int) -> tuple[int, Any]:
        ev_us, first_id, last_id, price_exp, qty_exp = self._block(frame, block_len,
                                                                   DEPTH_DIFF_BLOCK)
        sid, bids, asks = self._depth_sides(frame, 8 + block_len, price_exp, qty_exp)
        if not (0 <= ev_us <= _MAX_US and 0 <= first_id <= last_id):
            raise SbeSkip(BAD_NUMBER)
        return DEPTH_DIFF, DepthDiff(sid, first_id, last_id, ev_us * _US_TO_NS, recv_ns, bids,
                                     asks)


# ---- the compiled twin ---------------------------------------------------------------------------
#: what ``mode`` (the ingest's ``--fast-path``) may be: ``auto`` the compiled decoder when it is
#: built, ``on`` insist on it, ``off`` the reference decoder
DECODER_MODES: Final = ("auto", "on", "off")
#: the interface version of pipeline/binance/_sbe.c this module drives (its API_VERSION)
COMPILED_API_VERSION: Final = 2
#: the skip reasons in the order the C code indexes them (its ``R_*`` enum)
COMPILED_REASONS: Final = (TRUNCATED, WRONG_SCHEMA, UNKNOWN_TEMPLATE, SHORT_BLOCK, GROUP_OVERRUN,
                           BAD_EXPONENT, BAD_SYMBOL, UNKNOWN_SYMBOL, BAD_NUMBER, OVERSIZED)
#: the result tags in the order the C code indexes them (its ``G_*`` enum)
COMPILED_TAGS: Final = (TRADES, BOOK_TICKER, DEPTH_PARTIAL, DEPTH_DIFF, SKIP)


class SbeDecoderUnavailable(RuntimeError):
    """``mode="on"`` but the compiled decoder is not built (or was built from other sources)."""


class FrameDecoder(Protocol):
    """What :func:`make_decoder` returns: :meth:`SbeDecoder.decode`'s contract and its count."""

    @property
    def other_version_frames(self) -> int: ...

    def decode(self, frame: bytes | bytearray | memoryview | str,
               recv_time_ns: int) -> tuple[int, Any]: ...


def load_compiled() -> tuple[ModuleType | None, str]:
    """The compiled module if it is built from these sources, else None; and why."""
    try:
        from pipeline.binance import _sbe  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, (f"pipeline.binance._sbe is not built ({exc}); build it with `make` or pip "
                      "install -e . (needs a C compiler)")
    built = getattr(_sbe, "API_VERSION", None)
    if built != COMPILED_API_VERSION:
        return None, (f"pipeline.binance._sbe was built from other sources (interface {built}, "
                      f"this code needs {COMPILED_API_VERSION}): rebuild it (`make`)")
    return _sbe, "compiled"


@cache
def _compiled_class(mod: ModuleType) -> type:
    """The compiled decoder with the reference's attributes, built once per module.

    Why a subclass rather than the bare C type: the C code keeps no Python-side knowledge
    (tags, reasons, classes are handed in here), and ``other_version_frames`` must include the
    frames the C code hands to the reference (text frames, unusual buffers)."""

    class CompiledSbeDecoder(mod.Decoder):  # type: ignore[name-defined]
        name = "sbe-compiled"

        def __init__(self, reference: SbeDecoder) -> None:
            super().__init__(reference.sid_by_symbol, reference.max_frame_bytes,
                             reference.decode, DepthDiff, DepthPartial, COMPILED_TAGS,
                             COMPILED_REASONS,
                             (int(Kind.TRADE), int(Kind.BOOK_TICKER), _F_MAKER))
            self.reference = reference
            self.symbols = reference.symbols

        @property
        def other_version_frames(self) -> int:
            return int(self.compiled_other_version_frames
                       + self.reference.other_version_frames)

    return CompiledSbeDecoder


def make_decoder(symbols: list[str], max_frame_bytes: int = 1 << 20,
                 mode: str = "auto") -> tuple[FrameDecoder, str]:
    """The SBE decoder for ``mode`` (:data:`DECODER_MODES`) and a line saying which it is.

    ``auto``: the compiled one when it is built, else the reference (say so in the log: the
    compiled one spends less CPU per event); ``on``: the compiled one or
    :class:`SbeDecoderUnavailable`; ``off``: the reference :class:`SbeDecoder`."""
    if mode not in DECODER_MODES:
        raise ValueError(f"SBE decoder mode {mode!r}; known: {', '.join(DECODER_MODES)}")
    reference = SbeDecoder(symbols, max_frame_bytes)
    if mode == "off":
        return reference, "python (reference, --fast-path off)"
    mod, why = load_compiled()
    if mod is None:
        if mode == "on":
            raise SbeDecoderUnavailable(f"compiled SBE decoder required (mode 'on'): {why}")
        return reference, f"python (reference): {why}"
    decoder: FrameDecoder = _compiled_class(mod)(reference)
    return decoder, "compiled"
