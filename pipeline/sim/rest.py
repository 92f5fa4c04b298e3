"""The REST endpoints a client of the streams needs: ping, time, exchangeInfo, depth, aggTrades,
bookTicker, with Binance's parameter errors and the used-weight header.

Why apart from the router: each endpoint's parameter rules and answer shapes are Binance's
(binance-protocol.md section 2), numerous and independent of sockets. A running capture replay
answers depth from its snapshots instead of the random walk's book.
"""

from __future__ import annotations

import asyncio
import http
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from websockets.datastructures import Headers
from websockets.http11 import Response

from pipeline.binance.filters import SymbolRules
from pipeline.sim import market as mk
from pipeline.sim.venue_params import STP_MODES

if TYPE_CHECKING:
    from pipeline.sim.faults import Faults
    from pipeline.sim.replay import CaptureReplay

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
        "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": list(STP_MODES),  # all six (section 7.2)
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
        self._weight: tuple[int, int] = (0, 0)  # (minute, used)

    def handle(self, method: str, path: str, q: dict[str, list[str]]) -> Response:
        now = asyncio.get_running_loop().time()
        fail = self.faults.rest_should_fail(now)
        if fail is not None:
            return json_response(fail, {"code": -1000, "msg": "Simulated server error."})
        if method != "GET":
            return json_response(405, {"code": -1000, "msg": f"{method} not supported"})
        weight = 1
        try:
            if path == "/api/v3/ping":
                body: Any = {}
            elif path == "/api/v3/time":
                body = {"serverTime": self.now_ms()}
            elif path == "/api/v3/exchangeInfo":
                body, weight = self._exchange_info(q), 20
            elif path == "/api/v3/depth":
                body, weight = self._rest_depth(q)
            elif path == "/api/v3/aggTrades":
                body, weight = self._rest_agg_trades(q), 4
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
                weight = 2
            else:
                return json_response(404, {"code": -1000, "msg": f"Unknown endpoint {path}"})
        except RestError as exc:
            return json_response(400, {"code": exc.code, "msg": exc.msg})
        minute = int(now // 60)
        used = (self._weight[1] if self._weight[0] == minute else 0) + weight
        self._weight = (minute, used)
        return json_response(200, body, {"X-MBX-USED-WEIGHT-1M": str(used)})

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

    def _rest_depth(self, q: dict[str, list[str]]) -> tuple[Any, int]:
        sym = self._symbol_param(q)
        limit = self._int_param(q, "limit") or 100
        limit = min(limit, 5000)
        weight = 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250
        if self.replay is not None:
            captured = self.replay.depth_snapshot(sym, limit)
            if captured is not None:
                return captured, weight
        return self.market.depth_snapshot(sym, limit), weight

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
