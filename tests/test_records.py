from pipeline.ipc.records import TICK_DTYPE, Kind, empty_ticks


def test_tick_record_is_fixed_size_and_aligned() -> None:
    assert TICK_DTYPE.itemsize == 96
    # every 8-byte field sits on an 8-byte boundary, so a slot copy never splits a word
    for name in ("price", "trade_id", "event_time_ns", "publish_time_ns"):
        assert TICK_DTYPE.fields[name][1] % 8 == 0


def test_empty_ticks_are_zeroed() -> None:
    batch = empty_ticks(3)
    batch["kind"][1] = Kind.AGG_TRADE
    assert batch["kind"].tolist() == [0, 1, 0]
    assert batch["price"].sum() == 0.0


def test_each_builder_puts_every_named_argument_in_the_field_of_that_name() -> None:
    """The builders are the one place a record tuple is spelled out (the decoders, the REST
    backfill and the C path's checks all go through them): a keyword lands in its dtype field,
    and AT_* name the same positions as TICK_DTYPE."""
    from collections.abc import Callable
    from typing import Any

    import numpy as np

    from pipeline.ipc import records as r

    names = TICK_DTYPE.names or ()
    for i, name in enumerate(names):
        assert getattr(r, f"AT_{name.strip('_').upper()}") == i
    common = {"symbol": 3, "recv_time_ns": 99}
    depth = {"flags": 4, "bid_price": 1.5, "bid_qty": 2.5, "ask_price": 3.5, "ask_qty": 4.5,
             "update_id": 11, "first_update_id": 7, "event_time_ns": 55}
    cases: list[tuple[Callable[..., r.TickTuple], dict[str, Any], dict[str, Any], Kind]] = [
        # builder, its arguments, the fields they must land in (beyond kind)
        (r.agg_trade_record, {"flags": 1, "price": 1.25, "qty": 2.5, "agg_id": 10,
                              "last_trade_id": 12, "event_time_ns": 55},
         {"flags": 1, "price": 1.25, "qty": 2.5, "trade_id": 10, "aux_id": 12,
          "event_time_ns": 55}, Kind.AGG_TRADE),
        (r.trade_record, {"flags": 1, "price": 1.25, "qty": 2.5, "trade_id": 10,
                          "event_time_ns": 55},
         {"flags": 1, "price": 1.25, "qty": 2.5, "trade_id": 10, "event_time_ns": 55},
         Kind.TRADE),
        (r.book_ticker_record, {"bid_price": 1.5, "bid_qty": 2.5, "ask_price": 3.5,
                                "ask_qty": 4.5, "update_id": 11},
         {"bid_price": 1.5, "bid_qty": 2.5, "ask_price": 3.5, "ask_qty": 4.5, "trade_id": 11},
         Kind.BOOK_TICKER),
        (r.depth_top_record, depth,
         {**{k: v for k, v in depth.items() if k not in ("update_id", "first_update_id")},
          "trade_id": 11, "aux_id": 7}, Kind.DEPTH_TOP),
        (r.depth_level_record, {**depth, "level": 2},
         {**{k: v for k, v in depth.items() if k not in ("update_id", "first_update_id")},
          "trade_id": 11, "aux_id": 7, "level": 2}, Kind.DEPTH_LEVEL),
        (r.gap_record, {"flags": 16, "first_missing": 5, "last_missing": 9},
         {"flags": 16, "trade_id": 5, "aux_id": 9}, Kind.GAP),
        (r.id_reset_record, {"flags": 16, "last_before": 5, "first_after": 10**12},
         {"flags": 16 | 8, "trade_id": 5, "aux_id": 10**12}, Kind.GAP),
        (r.book_resync_record, {"flags": 12, "snapshot_update_id": 5, "book_update_id": 9},
         {"flags": 12, "trade_id": 5, "aux_id": 9}, Kind.BOOK_RESYNC),
        (r.book_stale_record, {"update_id": 41}, {"trade_id": 41}, Kind.BOOK_STALE),
    ]
    for build, kwargs, fields, kind in cases:
        rec = build(**common, **kwargs)
        assert len(rec) == len(names) - 1  # publish_time_ns is stamped by the ring
        row = np.array([(*rec, 0)], dtype=TICK_DTYPE)[0]
        want = {n: 0 for n in names} | {"kind": int(kind), "symbol": 3, "recv_time_ns": 99}
        for name, value in (want | fields).items():
            assert row[name] == value, (build.__name__, name)
