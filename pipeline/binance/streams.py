"""Market-data stream frames -> tick record tuples (parse only, pure: no I/O, no clock).

Implements ``shared/binance-protocol.md`` section 1 (1.2 URL forms, 1.4 serverShutdown, 1.5 control
replies, 1.6 payloads). Wire field names are kept as on the wire, each with a one-line comment.

Calling contract
----------------
Build one :class:`StreamDecoder` per process with the configured symbols (their index is the ring's
symbol id). For every websocket message call ``decoder.decode(payload, recv_time_ns)``; it never
raises and returns one ``(tag, value)`` pair, where ``tag`` tells the shell what to do:

============  ==============================================================================
tag           value / what the caller does
============  ==============================================================================
AGG           a record tuple (Kind.AGG_TRADE): pass it through aggTrade id tracking (gapfill)
TRADE         a record tuple (Kind.TRADE): dedupe by trade id, publish
BOOK_TICKER   a record tuple (Kind.BOOK_TICKER): dedupe by update id ``u``, publish
DEPTH_DIFF    a :class:`DepthDiff`: feed the symbol's local book (book.py)
DEPTH_PARTIAL a :class:`DepthPartial` (``@depth<N>`` top-N snapshot): publish its levels
CONTROL       a :class:`ControlReply` (SUBSCRIBE ack or error, section 1.5)
SHUTDOWN      event time in ns of a ``serverShutdown`` (section 1.4): rotate the connection
SKIP          a reason string (one of :data:`SKIP_REASONS`): count it and rate-limit-log it
============  ==============================================================================

A record tuple has the fields of :data:`pipeline.ipc.records.TICK_DTYPE` in order, all but the last:
the shell appends ``publish_time_ns`` when the record enters the ring (``(*rec, time_ns())``,
one allocation, cheaper than rebuilding a 16-tuple). Both decoders and the REST backfill
(:func:`agg_trade_from_rest`) build it with the one builder per kind in pipeline/ipc/records.py,
one call per frame (positional there: see the note in records.py); readers name its fields
with ``records.AT_*``.

Numbers: Binance sends prices and quantities as decimal strings with 8 decimals. They become
float64 here. Any decimal with <= 15 significant digits survives that exactly: ``float(s)`` is
the nearest double and formatting it back with the symbol's precision (``f"{x:.8f}"``) gives the
original string, so records need not carry the text (tests/test_streams_parse.py checks every
recorded value). Only values with 16-17 significant digits (e.g. "12345678.12345678") can be off
in the last digit; nothing in aggTrade/bookTicker/depth prices gets there in practice.

Times: ``E`` / ``T`` are milliseconds unless the connection asked for ``timeUnit=MICROSECOND``
(section 1.2); the decoder is told which (``time_unit``) and records carry nanoseconds either way.

Ids and times: every id (``a``, ``l``, ``t``, ``u``, ``U``, ``lastUpdateId``) must be an
integer in 0..2**63-1 and ``E`` small enough that ``E`` in ns fits an int64; anything else is
BAD_NUMBER (counted and skipped by the shell), so a record built here always packs into the
ring. An id that is in range but absurd (10**18 after 4 million) is not judged here: the id
trackers treat a jump beyond ``--max-id-jump`` as a suspected stream reset
(pipeline/marketdata/gapfill.py).
A frame nested deeper than the parsers' limit is MALFORMED_JSON, never a RecursionError.

Two decoders with one behaviour: :class:`MsgspecDecoder` (typed ``msgspec.json.Decoder`` per
stream kind, strings -> float in C; the hot-path default, ~2x faster here, see
benchmarks/bench_ingest.py) and :class:`OrjsonDecoder` (orjson to dicts; the baseline). Tests run
every fixture through both and require identical output.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec
import orjson

from pipeline.ipc.records import (
    Flags,
    Kind,
    TickTuple,
    agg_trade_record,
    book_ticker_record,
    trade_record,
)

# ---- decode result tags ----------------------------------------------------------------------
AGG: Final = 1
TRADE: Final = 2
BOOK_TICKER: Final = 3
DEPTH_DIFF: Final = 4
DEPTH_PARTIAL: Final = 5
CONTROL: Final = 6
SHUTDOWN: Final = 7
SKIP: Final = 8

# ---- skip reasons (metrics field names are ``skipped_<reason>``) -------------------------------
MALFORMED_JSON: Final = "malformed_json"  # not JSON, or not a JSON object
UNKNOWN_STREAM: Final = "unknown_stream"  # combined frame for a stream we did not subscribe
UNKNOWN_EVENT: Final = "unknown_event"  # raw frame whose event type we do not handle
MISSING_FIELD: Final = "missing_field"  # a required field is absent
BAD_NUMBER: Final = "bad_number"  # price/qty not finite >= 0; id/time not in 0..2**63-1; type
OVERSIZED: Final = "oversized"  # frame longer than the configured maximum
SKIP_REASONS: Final = (MALFORMED_JSON, UNKNOWN_STREAM, UNKNOWN_EVENT, MISSING_FIELD, BAD_NUMBER,
                       OVERSIZED)

_INF: Final = float("inf")
#: Largest id / count a record can carry (its int64 fields). Venue ids and times are checked
#: against it at decode time: a negative or larger one is BAD_NUMBER, never a record that fails
#: to pack later (after the id tracker had already moved past it).
I64_MAX: Final = (1 << 63) - 1
#: ``timeUnit`` URL parameter value (section 1.2) -> ns per unit of the stream's time fields
TIME_UNITS: Final[dict[str, int]] = {"MILLISECOND": 1_000_000, "MICROSECOND": 1_000}
_F_NONE: Final = int(Flags.NONE)
_F_MAKER: Final = int(Flags.BUYER_IS_MAKER)

#: The depth stream names Binance documents (binance-protocol.md 1.6 and 7.3): the diff stream
#: ``depth`` (1000 ms) or ``depth@100ms``, the top-N books ``depth5/10/20``, each optionally
#: ``@100ms``. There is no documented ``@1000ms`` suffix: the 1000 ms speed is the bare name, and
#: an undocumented spelling may be refused (or acked and never served) by the venue, so the
#: client refuses it at config time rather than subscribe to silence.
DEPTH_STREAMS: Final = ("depth", "depth@100ms",
                        *(f"depth{n}{sfx}" for n in (5, 10, 20) for sfx in ("", "@100ms")))

# Stream kinds a subscription can name (section 1.6); value = decode tag.
STREAM_SUFFIXES: Final[dict[str, int]] = {
    "aggTrade": AGG,
    "trade": TRADE,
    "bookTicker": BOOK_TICKER,
    **{name: DEPTH_DIFF if name.partition("@")[0] == "depth" else DEPTH_PARTIAL
       for name in DEPTH_STREAMS},
}

#: Stream kinds whose every frame is exactly one record, and that record's kind (derived from
#: the list above, not a second list): the streams the compiled path takes without Python
#: (pipeline/marketdata/fastpath.py).
ONE_RECORD_STREAMS: Final[dict[str, int]] = {
    suffix: {AGG: int(Kind.AGG_TRADE), TRADE: int(Kind.TRADE),
             BOOK_TICKER: int(Kind.BOOK_TICKER)}[tag]
    for suffix, tag in STREAM_SUFFIXES.items() if tag in (AGG, TRADE, BOOK_TICKER)}

Level = tuple[float, float]  # (price, qty); qty 0 = remove the level (diff depth)


@dataclass(slots=True)
class DepthDiff:
    """One ``depthUpdate`` event (section 1.6): levels are absolute quantities."""

    symbol: int  # ring symbol id
    first_id: int  # `U`
    last_id: int  # `u`
    event_time_ns: int  # `E`
    recv_time_ns: int
    bids: list[Level]  # `b`
    asks: list[Level]  # `a`


@dataclass(slots=True)
class DepthPartial:
    """One partial-book frame ``@depth<N>`` (section 1.6): a full top-N. JSON's has no event
    time (0); SBE's depth20 has one (``event_time_ns``), carried into the records."""

    symbol: int
    last_update_id: int  # `lastUpdateId`
    recv_time_ns: int
    bids: list[Level]
    asks: list[Level]
    event_time_ns: int = 0


@dataclass(slots=True)
class ControlReply:
    """Reply to a control message (section 1.5): ``result`` on success, ``error`` otherwise."""

    id: Any
    result: Any
    error: Any  # {"code": n, "msg": "..."} or None


def unknown_stream_kind(kind: str) -> str:
    """Why ``kind`` is not a stream we subscribe, naming the documented spellings: the one
    message for the CLI, the TOML loader and :func:`stream_name`."""
    if kind.lower().startswith("depth"):
        return (f"{kind!r} is not a documented depth stream; the documented ones are "
                f"{', '.join(DEPTH_STREAMS)} (the bare name is the 1000 ms speed)")
    return f"unknown stream kind {kind!r}; known: {', '.join(STREAM_SUFFIXES)}"


def stream_name(symbol: str, suffix: str) -> str:
    """The wire stream name: symbol lowercase, suffix exactly as documented (section 1.2)."""
    if suffix not in STREAM_SUFFIXES:
        raise ValueError(unknown_stream_kind(suffix))
    return f"{symbol.lower()}@{suffix}"


def _levels_ok(levels: list[Level]) -> bool:
    return all(0.0 <= p < _INF and 0.0 <= q < _INF for p, q in levels)


class _Routing:
    """Exact stream-name routing shared by both decoders (no substring search)."""

    def __init__(self, symbols: list[str], max_frame_bytes: int) -> None:
        self.symbols = list(symbols)
        self.max_frame_bytes = max_frame_bytes
        # stream name -> (tag, symbol id), for every symbol x every known suffix
        self.routes: dict[str, tuple[int, int]] = {}
        self.by_upper: dict[str, int] = {}
        for sid, sym in enumerate(self.symbols):
            self.by_upper[sym.upper()] = sid
            for suffix, tag in STREAM_SUFFIXES.items():
                self.routes[f"{sym.lower()}@{suffix}"] = (tag, sid)


class OrjsonDecoder(_Routing):
    """Baseline decoder: ``orjson.loads`` to dicts, then field access by wire name."""

    name = "orjson"

    def __init__(self, symbols: list[str], max_frame_bytes: int = 1 << 20,
                 raw_stream: str | None = None, time_unit: str = "MILLISECOND") -> None:
        super().__init__(symbols, max_frame_bytes)
        #: For a raw ``/ws/<stream>`` connection with one stream: route bare payloads by it.
        self.raw_route = self.routes.get(raw_stream) if raw_stream else None
        if time_unit not in TIME_UNITS:
            raise ValueError(f"time unit must be one of {sorted(TIME_UNITS)}, got {time_unit!r}")
        #: ns per unit of ``E`` / ``T`` (the connection's ``timeUnit``)
        self.time_mult = TIME_UNITS[time_unit]
        #: largest ``E`` whose ns value fits the record's int64 (larger: BAD_NUMBER)
        self.max_event = I64_MAX // self.time_mult

    def decode(self, payload: bytes | bytearray | memoryview | str,
               recv_time_ns: int) -> tuple[int, Any]:
        if len(payload) > self.max_frame_bytes:
            return SKIP, OVERSIZED
        try:
            msg = orjson.loads(payload)
        except (orjson.JSONDecodeError, RecursionError):  # orjson caps depth at 1024 itself
            return SKIP, MALFORMED_JSON
        if type(msg) is not dict:
            return SKIP, MALFORMED_JSON
        return self.decode_obj(msg, recv_time_ns)

    def decode_obj(self, msg: dict[str, Any], recv_time_ns: int) -> tuple[int, Any]:
        """Route an already-decoded frame (combined, raw, control)."""
        stream = msg.get("stream")
        if stream is not None:
            data = msg.get("data")
            route = self.routes.get(stream) if type(stream) is str else None
            if route is None:
                if stream == "!serverShutdown" and type(data) is dict:
                    return _shutdown(data, self.time_mult)
                return SKIP, UNKNOWN_STREAM
            if type(data) is not dict:
                return SKIP, MISSING_FIELD if data is None else MALFORMED_JSON
            return self._payload(route[0], route[1], data, recv_time_ns)
        if "id" in msg and ("result" in msg or "error" in msg):
            return CONTROL, ControlReply(msg["id"], msg.get("result"), msg.get("error"))
        return self._raw(msg, recv_time_ns)

    def _raw(self, msg: dict[str, Any], recv_time_ns: int) -> tuple[int, Any]:
        """A bare payload (``/ws/...``): route by ``e``, else by the connection's one stream."""
        event = msg.get("e")
        if event == "serverShutdown":
            return _shutdown(msg, self.time_mult)
        if event is not None:
            tag = _RAW_EVENTS.get(event) if type(event) is str else None
            if tag is None:
                return SKIP, UNKNOWN_EVENT
            sid = self.by_upper.get(msg.get("s"))  # type: ignore[arg-type]
            if sid is None:
                return SKIP, UNKNOWN_STREAM
            return self._payload(tag, sid, msg, recv_time_ns)
        if self.raw_route is not None:  # bookTicker / partial depth have no `e`
            return self._payload(self.raw_route[0], self.raw_route[1], msg, recv_time_ns)
        return SKIP, UNKNOWN_EVENT

    def _payload(self, tag: int, sid: int, d: dict[str, Any], recv_ns: int) -> tuple[int, Any]:
        tm = self.time_mult
        try:
            if tag == AGG:
                p = float(d["p"])  # price
                q = float(d["q"])  # quantity
                if not (0.0 <= p < _INF and 0.0 <= q < _INF):
                    return SKIP, BAD_NUMBER
                a = d["a"]  # aggregate trade id
                last = d["l"]  # last underlying trade id
                ev = d["E"]  # event time, ms
                m = d["m"]  # buyer is maker
                if type(a) is not int or type(last) is not int or type(ev) is not int \
                        or type(m) is not bool or not (0 <= a <= I64_MAX and 0 <= last <= I64_MAX
                                                       and 0 <= ev <= self.max_event):
                    return SKIP, BAD_NUMBER
                # symbol, flags, price, qty, agg_id, last_trade_id, event_time_ns, recv_time_ns
                return AGG, agg_trade_record(sid, _F_MAKER if m else _F_NONE, p, q, a, last,
                                             ev * tm, recv_ns)
            if tag == BOOK_TICKER:
                b, bq = float(d["b"]), float(d["B"])  # best bid price / qty
                a_, aq = float(d["a"]), float(d["A"])  # best ask price / qty
                u = d["u"]  # order book update id
                if not (0.0 <= b < _INF and 0.0 <= bq < _INF and 0.0 <= a_ < _INF
                        and 0.0 <= aq < _INF) \
                        or type(u) is not int or not 0 <= u <= I64_MAX:
                    return SKIP, BAD_NUMBER
                # symbol, bid_price, bid_qty, ask_price, ask_qty, update_id, recv_time_ns
                return BOOK_TICKER, book_ticker_record(sid, b, bq, a_, aq, u, recv_ns)
            if tag == TRADE:
                p, q = float(d["p"]), float(d["q"])
                t = d["t"]  # trade id
                ev = d["E"]
                m = d["m"]
                if not (0.0 <= p < _INF and 0.0 <= q < _INF) or type(t) is not int \
                        or type(ev) is not int or type(m) is not bool \
                        or not (0 <= t <= I64_MAX and 0 <= ev <= self.max_event):
                    return SKIP, BAD_NUMBER
                # symbol, flags, price, qty, trade_id, event_time_ns, recv_time_ns
                return TRADE, trade_record(sid, _F_MAKER if m else _F_NONE, p, q, t, ev * tm,
                                           recv_ns)
            if tag == DEPTH_DIFF:
                first, last_, ev = d["U"], d["u"], d["E"]
                if type(first) is not int or type(last_) is not int or type(ev) is not int \
                        or not (0 <= first <= last_ <= I64_MAX and 0 <= ev <= self.max_event):
                    return SKIP, BAD_NUMBER
                bids = [(float(p), float(q)) for p, q in d["b"]]
                asks = [(float(p), float(q)) for p, q in d["a"]]
                if not (_levels_ok(bids) and _levels_ok(asks)):
                    return SKIP, BAD_NUMBER
                return DEPTH_DIFF, DepthDiff(sid, first, last_, ev * tm, recv_ns, bids, asks)
            # DEPTH_PARTIAL
            lid = d["lastUpdateId"]
            if type(lid) is not int or not 0 <= lid <= I64_MAX:
                return SKIP, BAD_NUMBER
            bids = [(float(p), float(q)) for p, q in d["bids"]]
            asks = [(float(p), float(q)) for p, q in d["asks"]]
            if not (_levels_ok(bids) and _levels_ok(asks)):
                return SKIP, BAD_NUMBER
            return DEPTH_PARTIAL, DepthPartial(sid, lid, recv_ns, bids, asks)
        except KeyError:
            return SKIP, MISSING_FIELD
        except (TypeError, ValueError):  # float("abc"), float(None), bad level shape
            return SKIP, BAD_NUMBER


_RAW_EVENTS: Final[dict[str, int]] = {"aggTrade": AGG, "trade": TRADE, "depthUpdate": DEPTH_DIFF}


def _shutdown(data: dict[str, Any], time_mult: int) -> tuple[int, Any]:
    ev = data.get("E")
    return SHUTDOWN, ev * time_mult if type(ev) is int and 0 <= ev <= I64_MAX // time_mult else 0


# ---- msgspec typed decoding ------------------------------------------------------------------


class _Envelope(msgspec.Struct, gc=False):  # no cycles: untracked, cheaper
    stream: str = ""  # combined-stream name
    data: msgspec.Raw = msgspec.Raw(b"")  # payload, decoded by the typed decoder of its kind


#: an id / count: the range of the record's int64 fields, checked by msgspec in C (free)
_Id = Annotated[int, msgspec.Meta(ge=0, le=I64_MAX)]


class _Kinds:
    """The typed payload structs of one ``timeUnit``: ``E`` is bounded so that ``E * time_mult``
    fits an int64 (checked by msgspec while decoding, no Python comparison on the hot path).
    Built once per decoder (:func:`_kinds` caches them by bound)."""

    def __init__(self, max_event: int) -> None:
        # defstruct, not class statements: the bound is a runtime value, and this module's
        # postponed annotations would be evaluated by msgspec outside this scope
        ev = Annotated[int, msgspec.Meta(ge=0, le=max_event)]
        lv = list[tuple[float, float]]  # [price, qty] levels
        d = msgspec.defstruct
        # flat structs of numbers hold no references, so they can never be in a cycle: gc=False
        # keeps them out of the collector (cheaper to create and free, once per frame)
        flat = functools.partial(d, gc=False)
        #: fields as on the wire: E event time, a aggregate id, p price, q qty, l last trade id,
        #: m buyer is maker
        self.agg = flat("_AggTrade", [("E", ev), ("a", _Id), ("p", float), ("q", float),
                                   ("l", _Id), ("m", bool)])
        #: t trade id
        self.trade = flat("_Trade", [("E", ev), ("t", _Id), ("p", float), ("q", float),
                                  ("m", bool)])
        #: u update id, b/B best bid price/qty, a/A best ask price/qty
        self.book = flat("_BookTicker", [("u", _Id), ("b", float), ("B", float), ("a", float),
                                      ("A", float)])
        #: U first / u final update id of the event, b bids, a asks
        self.diff = d("_DepthUpdate", [("E", ev), ("U", _Id), ("u", _Id), ("b", lv),
                                       ("a", lv)])
        self.partial = d("_DepthPartial", [("lastUpdateId", _Id), ("bids", lv),
                                           ("asks", lv)])


_KINDS: dict[int, _Kinds] = {}  # at most one entry per TIME_UNITS value (2)


def _kinds(max_event: int) -> _Kinds:
    k = _KINDS.get(max_event)
    if k is None:
        k = _KINDS[max_event] = _Kinds(max_event)
    return k


class MsgspecDecoder(OrjsonDecoder):
    """Hot-path decoder: the envelope is scanned once (``data`` kept as a raw slice), then decoded
    by the ``msgspec`` decoder typed for its stream kind, which converts the decimal strings to
    float64 in C (``strict=False``). Anything that is not a combined data frame (control replies,
    raw frames, serverShutdown) falls back to the orjson path, which is not hot."""

    name = "msgspec"

    def __init__(self, symbols: list[str], max_frame_bytes: int = 1 << 20,
                 raw_stream: str | None = None, time_unit: str = "MILLISECOND") -> None:
        super().__init__(symbols, max_frame_bytes, raw_stream, time_unit)
        k = _kinds(self.max_event)
        # bound ``decode`` methods, looked up once here rather than twice per frame
        self._env: Any = msgspec.json.Decoder(_Envelope).decode
        self._agg: Any = msgspec.json.Decoder(k.agg, strict=False).decode
        self._trade: Any = msgspec.json.Decoder(k.trade, strict=False).decode
        self._book: Any = msgspec.json.Decoder(k.book, strict=False).decode
        self._diff: Any = msgspec.json.Decoder(k.diff, strict=False).decode
        self._partial: Any = msgspec.json.Decoder(k.partial, strict=False).decode

    def decode(self, payload: bytes | bytearray | memoryview | str,
               recv_time_ns: int) -> tuple[int, Any]:
        if len(payload) > self.max_frame_bytes:
            return SKIP, OVERSIZED
        try:
            env = self._env(payload)
        except RecursionError:  # msgspec skips a deep `data` value recursively (100k `[`)
            return SKIP, MALFORMED_JSON
        except msgspec.DecodeError:
            # not an object with a string `stream`: malformed, or a raw/control frame -> orjson
            return OrjsonDecoder.decode(self, payload, recv_time_ns)
        try:  # a subscript, not .get(): no method call for the common routed frame
            tag, sid = self.routes[env.stream]
        except KeyError:  # raw / control frame, or a stream we did not subscribe
            return OrjsonDecoder.decode(self, payload, recv_time_ns)
        tm = self.time_mult
        try:
            if tag == AGG:
                x = self._agg(env.data)
                p, q = x.p, x.q
                if not (0.0 <= p < _INF and 0.0 <= q < _INF):
                    return SKIP, BAD_NUMBER
                # symbol, flags, price, qty, agg_id, last_trade_id, event_time_ns, recv_time_ns
                return AGG, agg_trade_record(sid, _F_MAKER if x.m else _F_NONE, p, q, x.a, x.l,
                                             x.E * tm, recv_time_ns)
            if tag == BOOK_TICKER:
                k = self._book(env.data)
                # finite and >= 0 (NaN fails every comparison), inline: a call each would cost
                # more than building the record
                if not (0.0 <= k.b < _INF and 0.0 <= k.B < _INF and 0.0 <= k.a < _INF
                        and 0.0 <= k.A < _INF):
                    return SKIP, BAD_NUMBER
                # symbol, bid_price, bid_qty, ask_price, ask_qty, update_id, recv_time_ns
                return BOOK_TICKER, book_ticker_record(sid, k.b, k.B, k.a, k.A, k.u,
                                                       recv_time_ns)
            if tag == TRADE:
                t = self._trade(env.data)
                if not (0.0 <= t.p < _INF and 0.0 <= t.q < _INF):
                    return SKIP, BAD_NUMBER
                # symbol, flags, price, qty, trade_id, event_time_ns, recv_time_ns
                return TRADE, trade_record(sid, _F_MAKER if t.m else _F_NONE, t.p, t.q, t.t,
                                           t.E * tm, recv_time_ns)
            if tag == DEPTH_DIFF:
                d = self._diff(env.data)
                if not (_levels_ok(d.b) and _levels_ok(d.a)) or d.u < d.U:
                    return SKIP, BAD_NUMBER
                return DEPTH_DIFF, DepthDiff(sid, d.U, d.u, d.E * tm, recv_time_ns, d.b, d.a)
            s = self._partial(env.data)
            if not (_levels_ok(s.bids) and _levels_ok(s.asks)):
                return SKIP, BAD_NUMBER
            return DEPTH_PARTIAL, DepthPartial(sid, s.lastUpdateId, recv_time_ns, s.bids, s.asks)
        except msgspec.ValidationError as exc:
            return SKIP, _classify(str(exc))
        except msgspec.DecodeError:
            if len(env.data) == 0:
                return SKIP, MISSING_FIELD  # combined frame without `data`
            return SKIP, MALFORMED_JSON
        except RecursionError:
            return SKIP, MALFORMED_JSON


def _classify(error: str) -> str:
    """Skip reason from a msgspec validation message (error path only)."""
    if "missing required field" in error:
        return MISSING_FIELD
    if error.startswith("Expected `object`"):  # `data` is not an object
        return MALFORMED_JSON
    return BAD_NUMBER


# ---- REST answers that become records (the backfill and the book's snapshot) -----------------

_F_BACKFILLED: Final = int(Flags.BACKFILLED)
_MS: Final = 1_000_000  # REST times are milliseconds: the URL's timeUnit applies to streams only


def agg_trade_from_rest(row: Any, symbol: int, recv_time_ns: int) -> TickTuple | None:
    """One row of ``/api/v3/aggTrades`` -> an AGG_TRADE record flagged BACKFILLED, or None when
    the row breaks the rules a live aggTrade is held to (missing field, price/qty not finite
    >= 0, id or time outside int64). The row has no event time, so ``T`` (trade time) stands in.
    """
    try:
        a, p, q, last, t, m = row["a"], float(row["p"]), float(row["q"]), row["l"], \
            row["T"], row["m"]
    except (KeyError, TypeError, ValueError):
        return None
    if type(a) is not int or type(last) is not int or type(t) is not int \
            or not (0.0 <= p < _INF and 0.0 <= q < _INF) \
            or not (0 <= a <= I64_MAX and 0 <= last <= I64_MAX and 0 <= t <= I64_MAX // _MS):
        return None
    return agg_trade_record(symbol=symbol, flags=_F_BACKFILLED | (_F_MAKER if m is True else 0),
                            price=p, qty=q, agg_id=a, last_trade_id=last, event_time_ns=t * _MS,
                            recv_time_ns=recv_time_ns)


def depth_snapshot(body: Any) -> tuple[int, list[Level], list[Level]]:
    """A ``/api/v3/depth`` answer -> (lastUpdateId, bids, asks). Raises KeyError, TypeError or
    ValueError for an answer that is not one (the caller counts it and fetches again)."""
    lid = body["lastUpdateId"]
    bids = [(float(p), float(q)) for p, q in body["bids"]]
    asks = [(float(p), float(q)) for p, q in body["asks"]]
    if type(lid) is not int or not 0 <= lid <= I64_MAX:
        raise ValueError("lastUpdateId is not an integer in 0..2**63-1")
    return lid, bids, asks


StreamDecoder = OrjsonDecoder  # the common interface; MsgspecDecoder is a drop-in subclass
DECODERS: Final[dict[str, type[OrjsonDecoder]]] = {"msgspec": MsgspecDecoder,
                                                    "orjson": OrjsonDecoder}


def make_decoder(name: str, symbols: list[str], max_frame_bytes: int = 1 << 20,
                 time_unit: str = "MILLISECOND") -> OrjsonDecoder:
    """Decoder by name (``msgspec`` is the hot-path default, ``orjson`` the baseline);
    ``time_unit``: the connections' ``timeUnit`` (MILLISECOND, the default, or MICROSECOND)."""
    try:
        cls = DECODERS[name]
    except KeyError:
        raise ValueError(f"unknown decoder {name!r}; choose one of {sorted(DECODERS)}") from None
    return cls(symbols, max_frame_bytes, time_unit=time_unit)
