"""Local Binance Spot simulator: a real server on loopback that speaks Binance's wire formats.

Layout (pure cores, thin shell; one idea per module):

- :mod:`pipeline.sim.market` -- seeded random-walk order books, trade/depth/bookTicker events and
  their wire encodings. Pure: no sockets, no clock (callers pass ``now_ms``). It coordinates
  ``market_book`` (one symbol's book and ids), ``market_walk`` / ``market_batch`` (the walk, one
  step or a numpy batch), ``market_events``, ``market_payloads``, ``market_specs`` and ``units``.
- :mod:`pipeline.sim.faults` -- the fault switches shared by the shell and the venue.
- :mod:`pipeline.sim.venue` / :mod:`pipeline.sim.wsapi` -- the trading side (WS API). The venue
  coordinates ``venue_filters`` (symbol rules, order checks), ``venue_accounts`` (balances),
  ``venue_orders``, ``venue_matching``, ``venue_reports`` and ``venue_market_view``; the WS API
  has ``wsapi_methods``, ``signatures`` and ``ratelimit``.
- :mod:`pipeline.sim.server` -- the asyncio shell and router: one port for market streams, REST,
  WS API and the ``/sim`` admin endpoints; :mod:`pipeline.sim.connection` is its connection.
- :mod:`pipeline.sim.streams` -- market-stream subscriptions and fan-out;
  :mod:`pipeline.sim.pacing` runs the walk at a rate, :mod:`pipeline.sim.replay` replays a
  capture; :mod:`pipeline.sim.framing` and :mod:`pipeline.sim.control` are their pure wire rules.
- :mod:`pipeline.sim.rest` -- ``/api/v3`` REST and exchangeInfo; :mod:`pipeline.sim.admin` --
  ``/sim/state``, ``/sim/fault``, ``/sim/inject``.
- :mod:`pipeline.sim.testing` -- run a simulator in-process or as a subprocess from tests.

Nothing is imported here so that ``import pipeline.sim.market`` stays cheap.
"""
