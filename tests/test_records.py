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
