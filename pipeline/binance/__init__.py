"""Binance wire formats: signing, key loading, the WS API codec and user-data events.

Everything in this package is pure (no sockets, no clocks read): the processes in
``pipeline.trading.process`` / ``pipeline.marketdata.ingest`` own the I/O and feed bytes and time
in.
"""
