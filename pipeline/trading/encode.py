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
    """A :class:`RequestBuilder` whose unsigned requests are written straight to text.

    Why one cache keyed ``(key, type, value)``: the fragment of a repeating field is then one
    dict lookup per field on the order path (type in the key because 1, 1.0 and True are equal
    dict keys that render apart; 0.0 is never stored, since -0.0 == 0.0 renders apart too), and
    only a miss pays for checking the key and rendering the value."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (key, type(value), value) -> '"key":value' for values that repeat (prices, sizes,
        # symbols, sides, the recvWindow)
        self._frags: dict[tuple[str, type, Any], str] = {}
        self._ok_keys: set[str] = set()
        self._heads: dict[str, tuple[str, str]] = {}
        self._rw_frag: tuple[Any, str] = (None, "")  # (recv_window_ms, its fragment)
        # generated ids are the prefix and a decimal number: plain JSON text if the prefix is
        prefix = getattr(self, "_prefix", None)
        self._plain_ids = isinstance(prefix, str) and _json_text(prefix) == f'"{prefix}"'

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

    def _fragment(self, k: str, v: Any) -> str | None:
        """``"k":value`` for a field the cache did not have; None if wsapi must build the
        frame (a key that needs escaping, or ``timestamp`` / ``recvWindow`` given)."""
        if k not in self._ok_keys:
            if not _PLAIN_KEY.match(k) or k in ("timestamp", "recvWindow"):
                return None
            self._ok_keys.add(k)
        frag = f'"{k}":{self._value(v)}'
        t = type(v)
        if (t is float and v) or (t is str and k in _REPEATING):
            frags = self._frags
            if len(frags) >= _CACHE_MAX:
                frags.clear()
            frags[(k, t, v)] = frag
        return frag

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
        frags = self._frags
        if params:
            try:
                for k, v in params.items():
                    frag = frags.get((k, type(v), v))
                    if frag is None:
                        if v is None:
                            continue
                        frag = self._fragment(k, v)
                        if frag is None:
                            raise _WsapiBuilds
                    fields.append(frag)
            except (_WsapiBuilds, TypeError):  # TypeError: unhashable; wsapi says what it is
                return super().build(method, params, timestamp_ms=timestamp_ms, sign=sign,
                                     request_id=request_id)  # fmt: skip
        if method in SIGNED_METHODS:
            if timestamp_ms is None:
                raise ValueError(f"{method} needs a timestamp")
            fields.append(f'"timestamp":{int(timestamp_ms)}')
            rw = self.recv_window_ms
            if rw is not None:
                if self._rw_frag[0] is not rw:  # the value it was rendered from, by identity
                    self._rw_frag = (rw, f'"recvWindow":{self._value(rw)}')
                fields.append(self._rw_frag[1])
        heads = self._heads.get(method)
        if heads is None:
            head = f',"method":{_json_text(method)}'
            heads = self._heads[method] = (head + "}", head + ',"params":{')
        if request_id is None and self._plain_ids:
            rid = self.next_id()
            opening = f'{{"id":"{rid}"'
        else:
            rid = request_id or self.next_id()
            opening = f'{{"id":{_json_text(rid)}'
        if fields:
            return rid, f"{opening}{heads[1]}{','.join(fields)}}}}}"
        return rid, opening + heads[0]


class _WsapiBuilds(Exception):
    """Raised inside :meth:`TemplateRequestBuilder.build`: this frame is wsapi's to write."""
