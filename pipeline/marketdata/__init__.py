"""The ingest wing: Binance streams in, records into the tick ring (decoding, id tracking,
backfill, depth books, the compiled fast path)."""
