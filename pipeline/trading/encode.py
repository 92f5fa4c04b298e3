"""Request frames written as text, not as a dict handed to a JSON encoder: the order-submit path.

Why: :meth:`pipeline.binance.wsapi.RequestBuilder.build` copies the params twice (dropping
``None``s, rendering values), renders every float through ``Decimal`` and then serialises a
fresh dict - a few microseconds per order, on the path between a strategy's submit and the
bytes on the wire. :class:`TemplateRequestBuilder` writes the same frame directly: a fixed head
per method, each field as ``"key":value`` in the params' own order, ``timestamp`` and
``recvWindow`` appended exactly where the builder appends them, and float renderings cached
(prices, quantities, symbols and sides repeat).

Exactness is the contract: the frame is byte-identical to wsapi's (tests/test_trading_encode.py
compares them for every order shape), values are rendered by wsapi's own rule
(:func:`pipeline.binance.signing.render_value`, ints as JSON numbers), and anything this module
does not handle the same way - a signed request (``session.logon``, ``sign=True``: the signature
covers the rendered params, so wsapi builds it), params that already carry ``timestamp`` or
``recvWindow``, a key that would need escaping - is passed to wsapi's builder unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from pipeline.binance.signing import render_value
from pipeline.binance.wsapi import SIGNED_METHODS, RequestBuilder

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_]{1,64}\Z")
_CACHE_MAX = 4096
# string params worth caching: few distinct values (a client order id never repeats)
_REPEATING = frozenset({"symbol", "side", "type", "timeInForce", "cancelReplaceMode",
                        "newOrderRespType", "selfTradePreventionMode"})  # fmt: skip


def _json_text(s: str) -> str:
    """A JSON string exactly as orjson writes it (plain ASCII fast, the rest through orjson)."""
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return f'"{s}"'
    return orjson.dumps(s).decode()


class TemplateRequestBuilder(RequestBuilder):
    """A :class:`RequestBuilder` whose unsigned requests are written straight to text."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (key, value) -> '"key":value' for values that repeat (prices, sizes, symbols, sides)
        self._floats: dict[tuple[str, float], str] = {}
        self._texts: dict[tuple[str, str], str] = {}
        self._ok_keys: set[str] = set()
        self._heads: dict[str, str] = {}

    def _value(self, v: Any) -> str:
        if type(v) is int:
            return str(v)
        if type(v) is float:
            return _json_text(render_value(v))
        if type(v) is str:
            return _json_text(v)
        if isinstance(v, int) and not isinstance(v, bool):
            return str(int(v))
        return _json_text(render_value(v))  # bool, Decimal; anything else raises as wsapi does

    def build(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timestamp_ms: int | None = None,
        sign: bool = False,
        request_id: str | None = None,
    ) -> tuple[str, str]:
        if sign or method == "session.logon":
            return super().build(method, params, timestamp_ms=timestamp_ms, sign=sign,
                                 request_id=request_id)  # fmt: skip
        fields: list[str] = []
        if params:
            ok_keys, floats, texts = self._ok_keys, self._floats, self._texts
            for k, v in params.items():
                if v is None:
                    continue
                if k not in ok_keys:
                    if not _PLAIN_KEY.match(k) or k in ("timestamp", "recvWindow"):
                        return super().build(method, params, timestamp_ms=timestamp_ms,
                                             sign=sign, request_id=request_id)  # fmt: skip
                    ok_keys.add(k)
                t = type(v)
                # one cache per type: 1, 1.0 and True are equal dict keys but render apart;
                # 0.0 is not cached (-0.0 == 0.0 renders apart too)
                cache = floats if t is float and v else texts if t is str else None
                if cache is None:
                    fields.append(f'"{k}":{self._value(v)}')
                    continue
                frag = cache.get((k, v))
                if frag is None:
                    frag = f'"{k}":{self._value(v)}'
                    if cache is floats or k in _REPEATING:
                        if len(cache) >= _CACHE_MAX:
                            cache.clear()
                        cache[(k, v)] = frag
                fields.append(frag)
        if method in SIGNED_METHODS:
            if timestamp_ms is None:
                raise ValueError(f"{method} needs a timestamp")
            fields.append(f'"timestamp":{int(timestamp_ms)}')
            if self.recv_window_ms is not None:
                fields.append(f'"recvWindow":{self._value(self.recv_window_ms)}')
        rid = request_id or self.next_id()
        head = self._heads.get(method)
        if head is None:
            head = self._heads[method] = f',"method":{_json_text(method)}'
        if fields:
            return rid, f'{{"id":{_json_text(rid)}{head},"params":{{{",".join(fields)}}}}}'
        return rid, f'{{"id":{_json_text(rid)}{head}}}'
