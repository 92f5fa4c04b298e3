"""The compiled fast path (``pipeline/marketdata/_ticks.c``): loading it, checking it, building it.

Why a compiled path: pure Python spends ~3.6 us of CPU per aggTrade frame from socket to ring
(benchmarks/bench_ingest.py), most of it in decoding and packing the record; the C path parses
the frame bytes and writes the record straight into its ring slot in one call. It takes the
common case of the three high-rate streams (aggTrade and trade: the next id of the symbol;
bookTicker: a newer update id; strictly canonical JSON) and hands everything else, untouched, to
the Python handler, so every rule about duplicates, gaps, backfill and bad input stays in one
place (pipeline/marketdata/ingest.py, pipeline/marketdata/gapfill.py).

SBE connections have their own entry, ``on_sbe_message``: the trades event (every trade of its
group, when the group starts at the symbol's next @trade id and is contiguous) and bestBidAsk
(a newer ``u``) at the schema's version-0 fixed offsets, everything else to ``sbe_fallback``
(``Ingest.handle_sbe``, the reference decoder's path). Why: decoding in Python then tracking cost
~1.5-2 us per SBE event against ~0.2 us for a JSON frame here. It shares the @trade and
bookTicker id state with the JSON entry, so the two wire formats publish one id sequence.

Its boundary is narrow on purpose: the C code reads and writes no attribute of any Python
object, so a refactor of the writer or of the connections cannot silently break it. It is given
buffers and integers once (the ring writer's public ``fast_path_view()``: record slots, sequence
stamps, header words and geometry; the batch it shares with the writer is the header's
``intent - cursor``), and per frame the connection as an opaque token, the payload and its
receive time; it calls the Python fallback for everything else, including once per connection
and loop iteration so the per-connection state stays Python's.

The extension is optional: ``FAST_PATH_MODES`` says what ``--fast-path`` may be. ``auto`` uses
it when it was built (the default install builds it; a machine without a C compiler gets the
pure-Python path and a log line saying so), ``on`` refuses to start without it, ``off`` never
uses it (the reference path, and the baseline in the benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, Final, Protocol

import numpy as np

from pipeline.binance.streams import ONE_RECORD_STREAMS
from pipeline.ipc.records import TICK_DTYPE, Flags, Kind
from pipeline.ipc.ring import FastPathView

FAST_PATH_MODES: Final = ("auto", "on", "off")
#: the interface version of pipeline/marketdata/_ticks.c this module drives (its API_VERSION)
API_VERSION: Final = 6


class FastPathUnavailable(RuntimeError):
    """``--fast-path on`` but the extension is not built (or does not match the record layout)."""


def load() -> tuple[ModuleType | None, str]:
    """The extension module if it is built and matches :data:`TICK_DTYPE`, else None; and why."""
    try:
        from pipeline.marketdata import _ticks  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"pipeline.marketdata._ticks is not built ({exc}); reinstall with a C compiler"
    built = getattr(_ticks, "API_VERSION", None)
    if built != API_VERSION:
        return None, (f"pipeline.marketdata._ticks was built from other sources (interface "
                      f"{built}, this code needs {API_VERSION}): rebuild it (`make`, or pip "
                      "install -e .)")  # fmt: skip
    problem = layout_mismatch(_ticks, TICK_DTYPE)
    if problem:
        return None, problem
    return _ticks, "compiled"


def layout_mismatch(mod: Any, dtype: np.dtype) -> str | None:
    """Why the extension's hard-wired record layout differs from ``dtype`` (None: it matches).

    Checked before the extension may write a single ring slot: a field moved in records.py
    without the C file following would otherwise corrupt every record silently."""
    if dtype.itemsize != mod.RECORD_BYTES:
        return f"record size {dtype.itemsize} != the fast path's {mod.RECORD_BYTES}"
    fields: Mapping[str, Any] = dtype.fields or {}
    for name, off in mod.LAYOUT.items():
        if name not in fields or fields[name][1] != off:
            got = fields[name][1] if name in fields else "missing"
            return f"field {name!r} at offset {got}, the fast path writes it at {off}"
    expect = {"kind": "u1", "flags": "u1", "symbol": "<u2", "level": "<u2", "_pad": "<u2",
              **dict.fromkeys(("price", "qty", "bid_price", "bid_qty", "ask_price", "ask_qty"),
                              "<f8"),
              **dict.fromkeys(("trade_id", "aux_id", "event_time_ns", "recv_time_ns",
                               "publish_time_ns"), "<i8")}
    for name, code in expect.items():
        if fields[name][0] != np.dtype(code):
            return f"field {name!r} is {fields[name][0]}, the fast path writes {code}"
    if (int(Kind.AGG_TRADE), int(Kind.TRADE), int(Kind.BOOK_TICKER),
            int(Flags.BUYER_IS_MAKER)) != (mod.KIND_AGG_TRADE, mod.KIND_TRADE,
                                           mod.KIND_BOOK_TICKER, mod.FLAG_BUYER_IS_MAKER):
        return "Kind / Flags values differ from the fast path's constants"
    return None


#: stream suffix -> record kind, for the streams the compiled path takes: every stream whose
#: frame is one record (the one list of stream kinds is in pipeline/binance/streams.py)
FAST_STREAMS: Final = ONE_RECORD_STREAMS


def routes(symbols: list[str]) -> dict[bytes, tuple[int, int]]:
    """Wire stream name -> (ring symbol id, record kind), for every symbol x fast stream."""
    return {f"{s.lower()}@{suffix}".encode(): (i, kind)
            for i, s in enumerate(symbols) for suffix, kind in FAST_STREAMS.items()}


def sbe_symbols(symbols: list[str]) -> dict[bytes, int]:
    """SBE wire symbol (upper-case bytes, as Binance sends it) -> ring symbol id: the mapping of
    :attr:`pipeline.binance.sbe.SbeDecoder.sid_by_symbol`, so both paths name the same symbol
    (a dict, like the decoder's: if two configured names collide, the later one wins in both)."""
    return {s.upper().encode(): sid for sid, s in enumerate(symbols)}


class StagingWriter(Protocol):
    """What :func:`build` needs of a ring writer: its public view for a fast path, nothing
    else (:class:`~pipeline.ipc.ring.WriterCore` and the shared-memory RingWriter have it)."""

    def fast_path_view(self) -> FastPathView: ...


def build(mode: str, symbols: list[str], writer: StagingWriter,
          fallback: Callable[[Any, bytes, int, int], None],
          max_frame_bytes: int, time_mult: int = 1_000_000,
          max_id_jump: int = (1 << 63) - 1,
          sbe_fallback: Callable[[Any, Any, int, int], None] | None = None,
          ) -> tuple[Any | None, str]:
    """The fast path for an ingest process, or None; and a line for the log saying which.

    ``writer`` must have staging configured with ``publish_time_ns`` as the stamp field (the C
    path leaves it 0; the commit writes it); the fast path holds its buffers until ``close()``.
    ``fallback(conn, payload, recv_time_ns, code)`` is the Python handler (see the extension's
    ``on_message``). ``time_mult``: ns per unit of ``E`` (the
    connections' ``timeUnit``, as in the Python decoders). ``max_id_jump``: a bookTicker ``u``
    further than this above the last one is left to the Python handler's far-id rule (aggTrade
    and trade only ever take the next id). ``sbe_fallback(conn, payload, recv_time_ns, code)``:
    the Python handler of SBE frames (``on_sbe_message``'s fallback, same codes); without it
    the fast path has no SBE entry. Raises
    :class:`FastPathUnavailable` for ``on`` without the extension, ValueError for an unknown
    mode."""
    if mode not in FAST_PATH_MODES:
        raise ValueError(f"fast path mode must be one of {FAST_PATH_MODES}, got {mode!r}")
    if mode == "off":
        return None, "off (--fast-path off)"
    mod, why = load()
    if mod is None:
        if mode == "on":
            raise FastPathUnavailable(why)
        return None, f"off: {why}"
    view = writer.fast_path_view()
    if view.stamp_offset != TICK_DTYPE.fields["publish_time_ns"][1]:  # type: ignore[index]
        raise ValueError("the ring writer must stage with publish_time_ns as the stamp field")
    fast = mod.TickFastPath(routes(symbols), len(symbols), fallback=fallback,
                            max_frame_bytes=max_frame_bytes, time_mult=time_mult,
                            max_id_jump=max_id_jump, sbe_symbols=sbe_symbols(symbols),
                            sbe_fallback=sbe_fallback, **view._asdict())
    if sbe_fallback is None:
        return fast, "compiled (aggTrade, trade, bookTicker)"
    return fast, "compiled (aggTrade, trade, bookTicker; SBE trade, bestBidAsk)"
