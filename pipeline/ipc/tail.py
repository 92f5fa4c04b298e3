"""`pipeline ring tail`: a ring's records as lines a person (or ``jq``) can read.

Why: "what is in the ring right now?" is the first question when a consumer sees something odd
(a price, a GAP, a stale book), and answering it took a Python session with numpy. The tail
is an ordinary reader (``tail<pid>`` in ``pipeline ring stats``): the writer never notices it.

Tick records get one line per record, its fields named by kind (ids where the kind has them,
flags by name, times in UTC); any other ring (the exec ring, a plug-in's) is printed as JSON
objects of its dtype's fields. ``--json`` prints tick records as JSON too. The formatting is
pure (records in, text out) and tested without a process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from pipeline.ipc.records import TICK_DTYPE, Flags, Kind, symbol_of

_KIND_NAMES = {int(k): k.name for k in Kind}
_FLAG_NAMES = [(int(f), f.name or "") for f in Flags if f.value]


def is_tick_dtype(dtype: np.dtype[Any]) -> bool:
    return dtype == TICK_DTYPE


def kind_name(kind: int) -> str:
    return _KIND_NAMES.get(kind, f"KIND{kind}")


def flag_names(flags: int) -> str:
    """``BUYER_IS_MAKER|BACKFILLED``; ``-`` for none; bits we do not know as ``0x..``."""
    names = [name for bit, name in _FLAG_NAMES if flags & bit]
    rest = flags & ~sum(bit for bit, _ in _FLAG_NAMES)
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "-"


def utc(ns: int) -> str:
    """``14:20:01.123456`` (UTC, microseconds); ``-`` for 0 (a time the record does not have)."""
    if not ns:
        return "-"
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%H:%M:%S.%f")


def tick_line(rec: Any, symbols: list[str]) -> str:
    """One tick record (a numpy void of TICK_DTYPE, or its ``item()`` tuple's mapping) as text:
    publish time, kind, symbol, then the fields that kind uses."""
    kind = int(rec["kind"])
    sym = symbol_of(symbols, int(rec["symbol"]))
    head = f"{utc(int(rec['publish_time_ns']))} {kind_name(kind):<11} {sym:<10}"
    tid, aux = int(rec["trade_id"]), int(rec["aux_id"])
    if kind in (Kind.AGG_TRADE, Kind.TRADE):
        body = f"price {float(rec['price'])!r} qty {float(rec['qty'])!r} id {tid}"
        if kind == Kind.AGG_TRADE:
            body += f" last {aux}"
    elif kind in (Kind.BOOK_TICKER, Kind.DEPTH_TOP, Kind.DEPTH_LEVEL):
        body = (f"bid {float(rec['bid_price'])!r} x {float(rec['bid_qty'])!r} "
                f"ask {float(rec['ask_price'])!r} x {float(rec['ask_qty'])!r} u {tid}")
        if kind == Kind.DEPTH_LEVEL:
            body = f"level {int(rec['level'])} " + body
        if kind != Kind.BOOK_TICKER and aux:
            body += f" U {aux}"
    elif kind == Kind.GAP:
        body = f"missing {tid}..{aux}"
    elif kind == Kind.BOOK_RESYNC:
        body = f"snapshot {tid} book {aux}"
    elif kind == Kind.BOOK_STALE:
        body = f"stale since u {tid}"
    else:
        body = f"id {tid} aux {aux}"
    return (f"{head} {body} flags {flag_names(int(rec['flags']))} "
            f"E {utc(int(rec['event_time_ns']))}")


def record_dict(rec: Any, dtype: np.dtype[Any], symbols: list[str]) -> dict[str, Any]:
    """One record of any dtype as JSON-ready values: bytes fields as text (NULs stripped, bytes
    that are not UTF-8 replaced, never an error); for tick records the kind, symbol and flags
    by name beside their numbers."""
    out: dict[str, Any] = {}
    for name in dtype.names or ():
        if name.startswith("_"):
            continue  # padding
        v = rec[name]
        if isinstance(v, bytes | np.bytes_):
            out[name] = bytes(v).rstrip(b"\0").decode("utf-8", "replace")
        elif isinstance(v, np.ndarray):
            out[name] = v.tolist()
        else:
            out[name] = v.item() if hasattr(v, "item") else v
    if is_tick_dtype(dtype):
        out["kind_name"] = kind_name(int(rec["kind"]))
        out["symbol_name"] = symbol_of(symbols, int(rec["symbol"]))
        out["flag_names"] = flag_names(int(rec["flags"]))
    return out


def record_filter(dtype: np.dtype[Any], symbols: list[str], kinds: Iterable[str] = (),
                  only_symbols: Iterable[str] = ()) -> Callable[[np.ndarray], np.ndarray]:
    """A batch -> selected records function for ``--kind`` / ``--symbol`` (tick rings only;
    ValueError naming an unknown kind or symbol, so a typo is an error, not an empty tail)."""
    want_kinds = [k.strip().upper() for k in kinds if k.strip()]
    want_syms = [s.strip().upper() for s in only_symbols if s.strip()]
    if (want_kinds or want_syms) and not is_tick_dtype(dtype):
        raise ValueError("--kind and --symbol apply to tick rings only")
    by_name = {k.name: int(k) for k in Kind}
    bad = [k for k in want_kinds if k not in by_name]
    if bad:
        raise ValueError(f"unknown kind {bad[0]!r} (one of {', '.join(by_name)})")
    missing = [s for s in want_syms if s not in symbols]
    if missing:
        raise ValueError(f"symbol {missing[0]!r} is not in this ring ({', '.join(symbols)})")
    kind_ids = [by_name[k] for k in want_kinds]
    sym_ids = [symbols.index(s) for s in want_syms]

    def select(batch: np.ndarray) -> np.ndarray:
        keep = np.ones(len(batch), dtype=bool)
        if kind_ids:
            keep &= np.isin(batch["kind"], kind_ids)
        if sym_ids:
            keep &= np.isin(batch["symbol"], sym_ids)
        return batch if keep.all() else batch[keep]

    return select


#: a ring's own record -> dict decoder (the exec ring's names its enums), else record_dict
Decoder = Callable[[Any], dict[str, Any]]


def render(batch: np.ndarray, symbols: list[str], as_json: bool,
           decode: Decoder | None = None) -> Iterator[str]:
    """The lines of a batch: tick lines, or one JSON object per record."""
    dtype = batch.dtype
    if is_tick_dtype(dtype) and not as_json:
        for rec in batch:
            yield tick_line(rec, symbols)
        return
    for rec in batch:
        d = decode(rec) if decode is not None else record_dict(rec, dtype, symbols)
        yield orjson.dumps(d).decode()


def tail(reader: Any, select: Callable[[np.ndarray], np.ndarray], *, as_json: bool,
         follow: bool, max_records: int | None, write: Callable[[str], None],
         should_stop: Callable[[], bool] = lambda: False, decode: Decoder | None = None) -> int:
    """Print what ``reader`` reads until caught up (or, with ``follow``, until ``should_stop``
    or ``max_records`` printed); returns the records printed. Records the writer overwrote
    before we read them are said, not skipped silently."""
    printed = 0
    missed = reader.missed
    while not should_stop():
        batch = reader.poll()
        if reader.missed != missed:
            write(f"# {reader.missed - missed} record(s) overwritten before they were read")
            missed = reader.missed
        if len(batch) == 0:
            if not follow:
                break
            reader.wait(0.25)
            continue
        for line in render(select(batch), reader.symbols, as_json, decode):
            write(line)
            printed += 1
            if max_records is not None and printed >= max_records:
                return printed
    return printed


__all__ = ["flag_names", "is_tick_dtype", "kind_name", "record_dict", "record_filter", "render",
           "tail", "tick_line", "utc"]
