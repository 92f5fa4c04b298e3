"""Local pre-trade checks from exchangeInfo: refuse an order the venue would refuse, unsent.

Why: an order off the tick size, below the minimum quantity or notional, or for a symbol in
CANCEL_ONLY costs a round trip (hundreds of microseconds, a request weight, sometimes an
unfilled-order count) to learn what the symbol's rules already say. The trading process keeps
those rules (:class:`pipeline.binance.filters.SymbolRules`, the same class the simulator's venue
enforces) and answers such an order at once with a REJECT naming the filter.

Two parts, as everywhere in the trading process:

- :class:`PreTradeRules` (sans-I/O): the rules per symbol, the check, and when to fetch. A
  symbol's rules are wanted from its first order on (or from the start, ``symbols``); until they
  are loaded, or when the venue cannot be asked, orders go to the venue as they would without
  this module (the venue stays the authority). The rules are fetched again every
  ``refresh_s`` and soon after the venue refused an order with -1013 (a filter changed) or
  "Market is closed." (the status changed).
- :class:`RulesFetcher`: the thin asyncio shell, ``GET /api/v3/exchangeInfo?symbols=[...]``
  through :func:`pipeline.net.http.get_json`, fed back into the core.

A refused order's exec record carries the venue's own code (-1013, or -2010 for a symbol that is
not TRADING) so a strategy handles both alike, and ``error_msg`` says the check was local
(``Filter failure: PRICE_FILTER (checked locally)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from pipeline.binance.filters import RulesError, SymbolRules, parse_exchange_info
from pipeline.net.http import HttpError, get_json

log = logging.getLogger("pipeline.trading")

#: the venue's codes whose refusal may mean our rules are stale (a filter or a status changed)
STALE_RULE_CODES = frozenset({-1013, -2010})
MAX_SYMBOLS = 1000  # symbols whose rules we keep; an order for one more is not checked
LOCAL_SUFFIX = " (checked locally)"


def rest_url_for(wsapi_url: str) -> str:
    """The REST base URL that goes with a WS API URL, so ``pipeline trade`` needs no new
    setting: Binance's ``ws-api.<host>`` serves REST at ``api.<host>`` (testnet: the bare
    ``testnet.binance.vision``); anything else (the simulator) serves both on one port."""
    u = urlsplit(wsapi_url)
    scheme = "https" if u.scheme == "wss" else "http"
    host = u.hostname or ""
    if host == "ws-api.testnet.binance.vision":
        return "https://testnet.binance.vision"
    if host.startswith("ws-api."):
        return f"https://api.{host[len('ws-api.'):]}"
    return urlunsplit((scheme, u.netloc, "", "", ""))


class PreTradeRules:
    """The rules of the symbols this process trades, and the check of one order against them.

    ``wake`` is called when a fetch became due early (a new symbol, a -1013), so the shell can
    fetch now instead of at its next timer. ``monotonic`` is injectable for tests.
    """

    def __init__(
        self,
        symbols: Iterable[str] = (),
        *,
        refresh_s: float = 300.0,
        retry_s: float = 5.0,
        stale_refresh_s: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.refresh_s = refresh_s
        self.retry_s = retry_s
        self.stale_refresh_s = stale_refresh_s
        self._mono = monotonic
        self.wake = wake
        self.rules: dict[str, SymbolRules] = {}
        self.wanted: set[str] = {s for s in symbols if s}
        self.next_fetch = 0.0  # monotonic seconds; 0: at once
        self.in_flight = False
        # what the metrics block shows
        self.rejected = 0  # orders refused locally
        self.loads = 0  # exchangeInfo answers taken in
        self.load_failures = 0
        self.symbols_skipped = 0  # symbol entries we could not parse, over all loads
        self.unchecked_filters = 0  # filter types kept by name only (latest load)
        self.untracked = 0  # orders for a symbol beyond MAX_SYMBOLS (sent unchecked)
        self.last_error = ""

    # ---- the check (the order path) ----------------------------------------------------

    def check(
        self, symbol: str, order_type: str, price: float, qty: float, stp: str = ""
    ) -> tuple[int, str] | None:
        """None when the order may go out (or its rules are not known yet), else the venue's
        code and the message for the local REJECT. ``price`` 0 means none (MARKET); ``stp``
        the ``selfTradePreventionMode`` sent ("" none: the symbol's default applies)."""
        rules = self.rules.get(symbol)
        if rules is None:
            self._learn(symbol)
            return None
        try:
            p = Decimal(repr(price)) if price else None
            q = Decimal(repr(qty)) if qty else None
            v = rules.check(order_type or "LIMIT", p, q)
        except InvalidOperation:  # a Decimal NaN (or inf off a grid): no rule passes it
            self.rejected += 1
            return -1013, f"Filter failure: {_not_finite(price, qty) or 'LOT_SIZE'}{LOCAL_SUFFIX}"
        if v is None and stp:
            v = rules.stp_violation(stp)  # exchangeInfo allowedSelfTradePreventionModes
        if v is None:
            return None
        self.rejected += 1
        if v.filter == "SYMBOL_STATUS":
            return -2010, f"{v.msg}{LOCAL_SUFFIX}: {symbol} is {rules.status}"
        return -1013, f"{v.msg}{LOCAL_SUFFIX}"

    def check_amend(
        self, symbol: str, open_qty: float, filled_qty: float, new_qty: float
    ) -> tuple[int, str] | None:  # fmt: skip
        """None when an amend (order.amend.keepPriority) of a tracked order may go out, else
        the venue's code and the message for the local AMEND_REJECT.

        Why: an amend off the step size or one that is not a reduction costs a round trip and
        request weight to learn what we already know. Checked, in the venue's order:
        LOT_SIZE on ``new_qty`` (:func:`amend_filter_violation`: not the notional), then
        :func:`amend_reduction_violation`. The symbol's status
        is not: whether Binance takes an amend on a CANCEL_ONLY symbol is not documented,
        so the venue decides (as for an order whose rules are not loaded yet)."""
        rules = self.rules.get(symbol)
        refused = None
        if rules is not None:
            refused = amend_filter_violation(rules, new_qty)
        elif symbol:
            self._learn(symbol)
        refused = refused or amend_reduction_violation(open_qty, filled_qty, new_qty)
        if refused is not None:
            self.rejected += 1
        return refused

    def amend_untracked(self) -> None:
        """An amend of an order the order table does not know (placed before a restart, or
        by another process): sent unchecked, the venue answers it; counted with the orders
        sent unchecked (``pretrade_untracked``)."""
        self.untracked += 1

    def _learn(self, symbol: str) -> None:
        if symbol in self.wanted or not symbol:
            return
        if len(self.wanted) >= MAX_SYMBOLS:
            self.untracked += 1
            return
        self.wanted.add(symbol)
        self._due_soon(0.0)

    def note_refusals(self, updates: Iterable[Any]) -> None:
        """The session's updates on their way to the exec ring: a venue refusal that may mean
        stale rules (-1013 a filter, -2010 a status) makes a fetch due soon. One attribute
        read per update: this is on the reply path."""
        for u in updates:
            if getattr(u, "error_code", 0) in STALE_RULE_CODES:
                self._due_soon(self.stale_refresh_s)
                return

    def _due_soon(self, delay_s: float) -> None:
        self.next_fetch = min(self.next_fetch, self._mono() + delay_s)
        if self.wake is not None:
            self.wake()

    # ---- fetching (driven by the shell) ------------------------------------------------

    def seconds_until_fetch(self) -> float | None:
        """How long until a fetch is due (0: now); None while one is running or none wanted."""
        if self.in_flight or not self.wanted:
            return None
        return max(0.0, self.next_fetch - self._mono())

    def start_fetch(self) -> list[str]:
        """The symbols to ask for; the shell must answer with :meth:`loaded` or :meth:`failed`."""
        self.in_flight = True
        return sorted(self.wanted)

    def loaded(self, body: Any, asked: list[str]) -> None:
        """An exchangeInfo answer for ``asked``: take every entry that parses."""
        self.in_flight = False
        try:
            parsed = parse_exchange_info(body, asked)
        except RulesError as exc:
            self.failed(str(exc))
            return
        self.rules.update(parsed.rules)
        self.loads += 1
        self.symbols_skipped += len(parsed.skipped)
        self.unchecked_filters = parsed.unchecked_filters
        for reason in parsed.skipped[:5]:
            log.warning("exchangeInfo entry skipped: %s", reason,
                        extra={"event": "pretrade_skip"})  # fmt: skip
        self.next_fetch = self._mono() + self.refresh_s
        self.last_error = ""

    def unknown_symbols(self, symbols: Iterable[str]) -> None:
        """The venue does not list these (-1121): stop asking; their orders go out unchecked
        and the venue answers them."""
        for s in symbols:
            self.wanted.discard(s)
            self.rules.pop(s, None)

    def failed(self, reason: str) -> None:
        """The fetch failed: logged once per distinct reason and counted; the rules we have stay
        in force, symbols without rules keep going to the venue unchecked, and we try again
        after ``retry_s``."""
        self.in_flight = False
        self.load_failures += 1
        if reason != self.last_error:
            log.warning("exchangeInfo fetch failed: %s", reason[:300],
                        extra={"event": "pretrade_fetch_failed"})  # fmt: skip
        self.last_error = reason
        self.next_fetch = self._mono() + self.retry_s

    def metrics(self) -> dict[str, int]:
        return {
            "pretrade_symbols": len(self.rules),
            "pretrade_rejected": self.rejected,
            "pretrade_loads": self.loads,
            "pretrade_load_failures": self.load_failures,
            "pretrade_symbols_skipped": self.symbols_skipped,
            "pretrade_unchecked_filters": self.unchecked_filters,
            "pretrade_untracked": self.untracked,
        }


METRIC_FIELDS: tuple[str, ...] = tuple(PreTradeRules().metrics())


#: What the venue answers an amend that is not a reduction (binance-protocol.md 2.11, -2038)
AMEND_NOT_BELOW = "Order amend (quantity increase) is not supported."
AMEND_NOT_ABOVE_FILLED = "Order amend rejected: newQty must exceed executedQty."


def amend_filter_violation(rules: SymbolRules, new_qty: float) -> tuple[int, str] | None:
    """LOT_SIZE of ``rules`` on an amend's ``new_qty`` (a quantity off the step or below the
    minimum is no quantity the venue holds an order at). -1013 "Filter failure: LOT_SIZE" like a
    refused new order, marked as checked locally.

    Not (MIN_)NOTIONAL: Binance documents no notional rule for amends (2.11 names only
    MAX_NUM_ORDER_AMENDS), and an amend is a reduction, the way out of risk: refusing locally
    one the venue might take would be the worse mistake, so the venue decides."""
    if _not_finite(0.0, new_qty):
        return -1013, f"Filter failure: LOT_SIZE{LOCAL_SUFFIX}"
    v = rules.qty_violation(Decimal(repr(new_qty)))
    return None if v is None else (-1013, f"{v.msg}{LOCAL_SUFFIX}")


def _not_finite(price: float, qty: float) -> str:
    """The filter a NaN or infinite ``price``/``qty`` fails ("" when both are finite): such a
    value can come from a client writing its order ring by hand, and must be refused, never
    turned into a Decimal NaN that raises on the first comparison."""
    if not math.isfinite(price):
        return "PRICE_FILTER"
    if not math.isfinite(qty):
        return "LOT_SIZE"
    return ""


def amend_reduction_violation(
    open_qty: float, filled_qty: float, new_qty: float
) -> tuple[int, str] | None:
    """An amend only reduces (2.11: ``0 < newQty < qty``) and the venue refuses a new quantity
    at or below what is already filled, both -2038. ``open_qty`` and ``filled_qty`` are what
    the order table has confirmed: the venue's quantity can only be lower (amends reduce) and
    its filled quantity only higher, so each refusal here is one the venue would certainly
    make. ``open_qty`` 0 means unknown (not checked)."""
    if not new_qty > 0 or (open_qty > 0 and not new_qty < open_qty):  # NaN too
        return -2038, f"{AMEND_NOT_BELOW}{LOCAL_SUFFIX}"
    if new_qty <= filled_qty:
        return -2038, f"{AMEND_NOT_ABOVE_FILLED}{LOCAL_SUFFIX}"
    return None


class RulesFetcher:
    """Fetches exchangeInfo for :class:`PreTradeRules` whenever it says a fetch is due."""

    def __init__(self, core: PreTradeRules, rest_url: str, *, timeout_s: float = 10.0) -> None:
        self.core = core
        self.rest_url = rest_url
        self.timeout_s = timeout_s
        self._wake = asyncio.Event()
        core.wake = self._wake.set

    async def run(self, stop: asyncio.Event) -> None:
        core = self.core
        while not stop.is_set():
            wait = core.seconds_until_fetch()
            if wait is None or wait > 0:
                self._wake.clear()
                timeout = 1.0 if wait is None else min(wait, 1.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            await self.fetch_once()

    async def fetch_once(self) -> None:
        """One fetch of every wanted symbol; a -1121 (a symbol the venue does not list) is
        retried per symbol so one bad name does not keep the others unchecked."""
        core = self.core
        asked = core.start_fetch()
        try:
            body = await self._get(asked)
        except HttpError as exc:
            if _error_code(exc) == -1121 and len(asked) > 1:
                body = await self._one_by_one(asked)
                if body is not None:
                    core.loaded(body, asked)
                    return
            elif _error_code(exc) == -1121:
                core.unknown_symbols(asked)
                core.failed(f"venue does not list {asked[0][:40]!r}")
                return
            core.failed(str(exc))
            return
        core.loaded(body, asked)

    async def _get(self, symbols: list[str]) -> Any:
        params = {"symbols": orjson.dumps(symbols).decode()}
        _status, body = await get_json(
            self.rest_url, "/api/v3/exchangeInfo", params, timeout_s=self.timeout_s
        )
        return body

    async def _one_by_one(self, asked: list[str]) -> dict[str, Any] | None:
        entries: list[Any] = []
        unknown: list[str] = []
        for sym in asked:
            try:
                entries.extend((await self._get([sym])).get("symbols", []))
            except HttpError as exc:
                if _error_code(exc) != -1121:
                    return None
                unknown.append(sym)
            except AttributeError:  # an answer that is not an object
                return None
        self.core.unknown_symbols(unknown)
        if unknown:
            log.warning("venue does not list %s: their orders are not checked locally",
                        ", ".join(s[:40] for s in unknown[:10]),
                        extra={"event": "pretrade_unknown_symbols"})  # fmt: skip
        return {"symbols": entries}


def _error_code(exc: HttpError) -> int | None:
    """Binance's error code from a refused REST call's body, if it has one."""
    try:
        body = orjson.loads(exc.body)
    except orjson.JSONDecodeError:
        return None
    code = body.get("code") if isinstance(body, dict) else None
    return code if isinstance(code, int) else None
