"""The REST endpoints a client of the streams needs: ping, time, exchangeInfo, depth, aggTrades,
historicalTrades, bookTicker, with Binance's parameter errors, weights, the used-weight header
on every answer and 429 / 418 with ``Retry-After`` (:mod:`pipeline.sim.rest_limits`).

Why apart from the router: each endpoint's parameter rules and answer shapes are Binance's
(binance-protocol.md section 2), numerous and independent of sockets. A running capture replay
answers depth from its snapshots instead of the random walk's book.
"""

from __future__ import annotations

import asyncio
import http
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from websockets.datastructures import Headers
from websockets.http11 import Response

from pipeline.binance.filters import SymbolRules
from pipeline.sim import market as mk
from pipeline.sim.rest_limits import RestLimits

if TYPE_CHECKING:
    from pipeline.sim.faults import Faults
    from pipeline.sim.replay import CaptureReplay

#: Request weights (binance-protocol.md 1.7, 7.3); depth's depends on its limit.
_WEIGHTS = {"/api/v3/exchangeInfo": 20, "/api/v3/aggTrades": 4,
            "/api/v3/historicalTrades": 25, "/api/v3/ticker/bookTicker": 2}


def _depth_weight(q: dict[str, list[str]]) -> int:
    v = (q.get("limit") or ["100"])[0]
    limit = min(int(v), 5000) if v.isdigit() and len(v) <= 9 else 100
    return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250


class RestError(Exception):
    """A request Binance answers with HTTP 400 and this error code and message."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg



def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    """A complete HTTP answer; ``Connection: close`` because the shell answers one request per
    connection (a POST body was cut out of the stream, so nothing may follow it)."""
    data = orjson.dumps(body)
    h = Headers()
    h["Content-Type"] = "application/json;charset=UTF-8"
    h["Content-Length"] = str(len(data))
    h["Connection"] = "close"
    for k, v in (headers or {}).items():
        h[k] = v
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    return Response(status, reason, h, data)


def _symbol_entry(rules: SymbolRules) -> dict[str, Any]:
    """One exchangeInfo symbol, current schema (rest/docs/exchangeInfo.json + filters.json);
    the filters and status come from the same rules the venue enforces."""
    return {
        "symbol": rules.symbol,
        "status": rules.status,
        "baseAsset": rules.base_asset,
        "baseAssetPrecision": rules.base_precision,
        "quoteAsset": rules.quote_asset,
        "quotePrecision": rules.quote_precision,
        "quoteAssetPrecision": rules.quote_precision,
        "baseCommissionPrecision": 8,
        "quoteCommissionPrecision": 8,
        "orderTypes": list(rules.order_types),
        "icebergAllowed": False,
        "ocoAllowed": False,
        "otoAllowed": False,
        "opoAllowed": False,
        "quoteOrderQtyMarketAllowed": False,
        "allowTrailingStop": False,
        "cancelReplaceAllowed": True,
        "amendAllowed": True,
        "pegInstructionsAllowed": False,
        "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": False,
        "filters": rules.exchange_info_filters(),
        "permissions": [],
        "permissionSets": [["SPOT"]],
        "defaultSelfTradePreventionMode": rules.default_stp_mode,
        "allowedSelfTradePreventionModes": list(rules.allowed_stp_modes),  # --stp-modes
    }


class RestApi:
    """``GET /api/v3/...`` of one simulator; :meth:`handle` answers one request."""

    def __init__(
        self,
        market: mk.Market,
        faults: Faults,
        now_ms: Callable[[], int],
        replay: CaptureReplay | None = None,
    ) -> None:
        self.market = market
        self.faults = faults
        self.now_ms = now_ms
        self.replay = replay
        self.limits = RestLimits(faults)
        #: keep-alive REST connections (pipeline/sim/rest_http.py): made, and open now
        self.connections = 0
        self.sessions: set[Any] = set()

    def handle(self, method: str, path: str, q: dict[str, list[str]],
               headers: Mapping[str, str] | None = None) -> Response:
        now = asyncio.get_running_loop().time()
        fail = self.faults.rest_should_fail(now)
        if fail is not None:
            return json_response(fail, {"code": -1000, "msg": "Simulated server error."})
        if method != "GET":
            return json_response(405, {"code": -1000, "msg": f"{method} not supported"})
        weight = _WEIGHTS.get(path, 1)
        if path == "/api/v3/depth":
            weight = _depth_weight(q)
        now_ms = self.now_ms()
        status, retry_after, used = self.limits.admit(now_ms, weight)
        if status != 200:
            msg = ("Way too much request weight used; IP banned until "
                   f"{now_ms + (retry_after or 0) * 1000}." if status == 418 else
                   "Too much request weight used; current limit is "
                   f"{self.limits.lim.weight.limit} request weight per "
                   f"{self.limits.lim.weight.interval_ms // 1000} s.")
            return json_response(status, {"code": -1003, "msg": msg},
                                 {"X-MBX-USED-WEIGHT-1M": str(used),
                                  "Retry-After": str(retry_after)})
        unit = (headers or {}).get("x-mbx-time-unit", "MILLISECOND")
        if unit.upper() not in ("MILLISECOND", "MICROSECOND"):
            return json_response(400, {"code": -1194, "msg": "Invalid time unit."},
                                 {"X-MBX-USED-WEIGHT-1M": str(used)})
        time_mult = 1000 if unit.upper() == "MICROSECOND" else 1
        try:
            if path == "/api/v3/ping":
                body: Any = {}
            elif path == "/api/v3/time":
                body = {"serverTime": now_ms * time_mult}
            elif path == "/api/v3/exchangeInfo":
                body = self._exchange_info(q)
            elif path == "/api/v3/depth":
                body = self._rest_depth(q)
            elif path == "/api/v3/aggTrades":
                body = self._rest_agg_trades(q)
                if time_mult != 1:
                    for row in body:
                        row["T"] = int(row["T"]) * time_mult
            elif path == "/api/v3/historicalTrades":
                body = self._historical_trades(q, time_mult)
            elif path == "/api/v3/ticker/bookTicker":
                sym = self._symbol_param(q)
                bp, bq, ap, aq = self.market.best_units(sym)
                body = {
                    "symbol": sym,
                    "bidPrice": mk.fmt_units(bp),
                    "bidQty": mk.fmt_units(bq),
                    "askPrice": mk.fmt_units(ap),
                    "askQty": mk.fmt_units(aq),
                }
            else:
                return json_response(404, {"code": -1000, "msg": f"Unknown endpoint {path}"},
                                     {"X-MBX-USED-WEIGHT-1M": str(used)})
        except RestError as exc:
            return json_response(400, {"code": exc.code, "msg": exc.msg},
                                 {"X-MBX-USED-WEIGHT-1M": str(used)})
        return json_response(200, body, {"X-MBX-USED-WEIGHT-1M": str(used)})

    def close_sessions(self) -> None:
        """The simulator stops: close every keep-alive REST connection."""
        for session in list(self.sessions):
            session.close()

    def _historical_trades(self, q: dict[str, list[str]], time_mult: int) -> list[Any]:
        """``GET /api/v3/historicalTrades?symbol=&fromId=&limit=`` (7.3: weight 25): single
        trades by id, from the market's retained trades (no API key required here)."""
        sym = self._symbol_param(q)
        limit = self._int_param(q, "limit")
        if limit is None:
            limit = 500
        if not 1 <= limit <= 1000:
            raise RestError(-1130, "Data sent for parameter 'limit' is not valid.")
        return self.market.historical_trades(sym, self._int_param(q, "fromId"), limit, time_mult)

    def _symbol_param(self, q: dict[str, list[str]]) -> str:
        sym = (q.get("symbol") or [""])[0]
        if not sym:
            raise RestError(
                -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed."
            )
        if sym not in self.market.symbols:  # case-sensitive like Binance
            raise RestError(-1121, "Invalid symbol.")
        return sym

    def _int_param(self, q: dict[str, list[str]], name: str) -> int | None:
        vals = q.get(name)
        if not vals:
            return None
        v = vals[0]
        if not re.fullmatch(r"[0-9]{1,20}", v):
            raise RestError(
                -1100,
                f"Illegal characters found in parameter '{name}'; "
                "legal range is '^[0-9]{1,20}$'.",
            )
        return int(v)

    def _rest_depth(self, q: dict[str, list[str]]) -> Any:
        sym = self._symbol_param(q)
        limit = self._int_param(q, "limit") or 100
        limit = min(limit, 5000)
        if self.replay is not None:
            captured = self.replay.depth_snapshot(sym, limit)
            if captured is not None:
                return captured
        return self.market.depth_snapshot(sym, limit)

    def _rest_agg_trades(self, q: dict[str, list[str]]) -> list[dict[str, object]]:
        sym = self._symbol_param(q)
        limit = self._int_param(q, "limit")
        if limit is None:
            limit = 500
        if not 1 <= limit <= 1000:
            raise RestError(-1130, "Data sent for parameter 'limit' is not valid.")
        from_id = self._int_param(q, "fromId")
        start = self._int_param(q, "startTime")
        end = self._int_param(q, "endTime")
        if start is not None and end is not None and end - start > 3_600_000:
            raise RestError(-1127, "More than 1 hours between startTime and endTime.")
        trades = self.market.agg_trades(
            sym, from_id=from_id, start_time=start, end_time=end, limit=limit
        )
        return [a.rest_dict() for a in trades]

    def _exchange_info(self, q: dict[str, list[str]]) -> dict[str, Any]:
        wanted = list(self.market.symbols)
        if q.get("symbol"):
            wanted = [self._symbol_param(q)]
        elif q.get("symbols"):
            try:
                lst = orjson.loads(q["symbols"][0])
            except orjson.JSONDecodeError:
                raise RestError(
                    -1100, "Illegal characters found in parameter 'symbols'."
                ) from None
            if not isinstance(lst, list) or not all(isinstance(s, str) for s in lst):
                raise RestError(-1100, "Illegal characters found in parameter 'symbols'.")
            for s in lst:
                if s not in self.market.symbols:
                    raise RestError(-1121, "Invalid symbol.")
            wanted = lst
        return {
            "timezone": "UTC",
            "serverTime": self.now_ms(),
            "rateLimits": [
                {
                    "rateLimitType": "REQUEST_WEIGHT",
                    "interval": "MINUTE",
                    "intervalNum": 1,
                    "limit": 6000,
                },
                {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
                {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
                {
                    "rateLimitType": "RAW_REQUESTS",
                    "interval": "MINUTE",
                    "intervalNum": 5,
                    "limit": 300_000,  # since 2026 (ratelimit.RAW_REQUESTS_PER_5MIN; was 61,000)
                },
            ],
            "exchangeFilters": [],
            "symbols": [_symbol_entry(self.market.rules(s)) for s in wanted],
        }
