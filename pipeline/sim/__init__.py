"""Local Binance Spot simulator: a real server on loopback that speaks Binance's wire formats.

Layout (pure cores, thin shell):

- :mod:`pipeline.sim.market` -- seeded random-walk order books, trade/depth/bookTicker events and
  their wire encodings. Pure: no sockets, no clock (callers pass ``now_ms``).
- :mod:`pipeline.sim.faults` -- the fault switches shared by the shell and the venue.
- :mod:`pipeline.sim.venue` / :mod:`pipeline.sim.wsapi` -- the trading side (WS API).
- :mod:`pipeline.sim.server` -- the asyncio shell: one port for market streams, REST, WS API and
  the ``/sim`` admin endpoints.
- :mod:`pipeline.sim.testing` -- run a simulator in-process or as a subprocess from tests.

Nothing is imported here so that ``import pipeline.sim.market`` stays cheap.
"""
