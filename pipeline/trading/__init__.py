"""The trading wing: the WS API session core, the trading process, order entry over shared
memory and its CLI."""
