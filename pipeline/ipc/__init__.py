"""Shared memory between processes: the record layout, the trust rule for segments, the
lock-free ring and the metrics blocks. Nothing here knows about Binance."""
