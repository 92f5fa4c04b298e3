"""Wire encodings of the bare event payloads (binance-protocol.md section 1.6).

Why apart from the market: encoding is the shell's concern (and REST's); the market only makes
events. One event at a time here; a whole :class:`~pipeline.sim.market_events.TakerBatch` is
encoded from its columns by :mod:`pipeline.sim.framing`, which must give the same bytes.
"""

from __future__ import annotations

from pipeline.sim.market_events import AggTrade, BookTicker, DepthUpdate, Event, Trade
from pipeline.sim.units import fmt_units

_TRUE_FALSE = ("false", "true")


def encode_trade(ev: Trade) -> bytes:
    return (
        f'{{"e":"trade","E":{ev.time},"s":"{ev.symbol}","t":{ev.t},'
        f'"p":"{fmt_units(ev.price)}","q":"{fmt_units(ev.qty)}","T":{ev.time},'
        f'"m":{_TRUE_FALSE[ev.buyer_maker]},"M":true}}'
    ).encode()


def encode_agg_trade(ev: AggTrade) -> bytes:
    return (
        f'{{"e":"aggTrade","E":{ev.time},"s":"{ev.symbol}","a":{ev.a},'
        f'"p":"{fmt_units(ev.price)}","q":"{fmt_units(ev.qty)}","f":{ev.f},"l":{ev.l},'
        f'"T":{ev.time},"m":{_TRUE_FALSE[ev.buyer_maker]},"M":true}}'
    ).encode()


def encode_book_ticker(ev: BookTicker) -> bytes:
    return (
        f'{{"u":{ev.u},"s":"{ev.symbol}","b":"{fmt_units(ev.bid_px)}",'
        f'"B":"{fmt_units(ev.bid_qty)}","a":"{fmt_units(ev.ask_px)}",'
        f'"A":"{fmt_units(ev.ask_qty)}"}}'
    ).encode()


def _levels(levels: list[tuple[int, int]]) -> str:
    return ",".join(f'["{fmt_units(p)}","{fmt_units(q)}"]' for p, q in levels)


def encode_depth_diff(ev: DepthUpdate) -> bytes:
    return (
        f'{{"e":"depthUpdate","E":{ev.E},"s":"{ev.symbol}","U":{ev.U},"u":{ev.u},'
        f'"b":[{_levels(ev.bids)}],"a":[{_levels(ev.asks)}]}}'
    ).encode()


def encode_partial_depth(
    last_update_id: int, bids: list[tuple[int, int]], asks: list[tuple[int, int]]
) -> bytes:
    return (
        f'{{"lastUpdateId":{last_update_id},"bids":[{_levels(bids)}],"asks":[{_levels(asks)}]}}'
    ).encode()


def encode_event(ev: Event) -> bytes:
    if isinstance(ev, AggTrade):
        return encode_agg_trade(ev)
    if isinstance(ev, Trade):
        return encode_trade(ev)
    return encode_book_ticker(ev)
