"""REST trade rows -> ring records, in the time unit ingest asked REST for (pure).

Why here and not beside the stream decoders: REST rows have their own shapes (``aggTrades``:
``a, p, q, f, l, T, m``; ``historicalTrades``: ``id, price, qty, quoteQty, time, isBuyerMaker,
isBestMatch``, binance-protocol.md 7.3) and their own time unit: ingest sends
``X-MBX-TIME-UNIT: MICROSECOND`` when it runs with ``--time-unit MICROSECOND``, so rows come back
in the same unit as the streams' ``E``/``T`` and convert with the same ``time_mult`` (ns per
unit). A row is held to the rules a live trade is (ids and times in int64, finite prices and
quantities >= 0); one that breaks them is skipped (None) and its id stays a hole.
"""

from __future__ import annotations

from typing import Any

from pipeline.ipc.records import Flags, TickTuple, agg_trade_record, trade_record

I64_MAX = (1 << 63) - 1
_INF = float("inf")
_BACKFILLED = int(Flags.BACKFILLED)
_MAKER = int(Flags.BUYER_IS_MAKER)


def _ok(p: float, q: float, ids: tuple[Any, ...], t: Any, time_mult: int) -> bool:
    return (all(type(i) is int and 0 <= i <= I64_MAX for i in ids) and type(t) is int
            and 0 <= t <= I64_MAX // time_mult and 0.0 <= p < _INF and 0.0 <= q < _INF)


def agg_trade_row(row: Any, symbol: int, recv_time_ns: int, time_mult: int) -> TickTuple | None:
    """One ``/api/v3/aggTrades`` row -> an AGG_TRADE record flagged BACKFILLED (the row has no
    event time: ``T``, the trade time, stands in)."""
    try:
        a, p, q, last, t, m = row["a"], float(row["p"]), float(row["q"]), row["l"], \
            row["T"], row["m"]
    except (KeyError, TypeError, ValueError):
        return None
    if not _ok(p, q, (a, last), t, time_mult):
        return None
    return agg_trade_record(symbol=symbol, flags=_BACKFILLED | (_MAKER if m is True else 0),
                            price=p, qty=q, agg_id=a, last_trade_id=last,
                            event_time_ns=t * time_mult, recv_time_ns=recv_time_ns)


def trade_row(row: Any, symbol: int, recv_time_ns: int, time_mult: int) -> TickTuple | None:
    """One ``/api/v3/historicalTrades`` row -> a TRADE record flagged BACKFILLED (``time``
    stands in for the event time, as for aggTrades rows)."""
    try:
        t_id, p, q, t, m = row["id"], float(row["price"]), float(row["qty"]), row["time"], \
            row["isBuyerMaker"]
    except (KeyError, TypeError, ValueError):
        return None
    if not _ok(p, q, (t_id,), t, time_mult):
        return None
    return trade_record(symbol=symbol, flags=_BACKFILLED | (_MAKER if m is True else 0),
                        price=p, qty=q, trade_id=t_id, event_time_ns=t * time_mult,
                        recv_time_ns=recv_time_ns)
