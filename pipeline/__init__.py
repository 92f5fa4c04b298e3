"""Low-latency Binance gateway: ingest -> shared-memory ring -> consumers, and trading."""

__version__ = "0.1.0"
