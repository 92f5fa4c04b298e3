"""Market-stream names and control messages (SUBSCRIBE, LIST_SUBSCRIPTIONS, SET_PROPERTY, ...).

Why apart from the stream fan-out: this is the protocol half of a stream connection
(binance-protocol.md 1.5), pure and tested frame by frame; the fan-out (:mod:`pipeline.sim.streams`)
only applies the changes a :class:`ControlResult` asks for.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.sim.market_events import PARTIAL_LEVELS

#: The stream kinds the simulator serves, each under the one spelling the stream fan-out
#: (:meth:`pipeline.sim.streams.StreamHub.depth_tick`) publishes it as. Deliberately not
#: :data:`pipeline.binance.streams.STREAM_SUFFIXES` (what the client subscribes): the venue's
#: list is its own, built from :data:`PARTIAL_LEVELS`, what the fan-out publishes. Both keep to
#: the documented names (the 1000 ms speed has no suffix); the simulator refuses anything else,
#: e.g. ``depth@1000ms``: acking it would promise a subscription that never gets a frame.
SERVED_STREAM_KINDS = (
    "aggTrade",
    "trade",
    "bookTicker",
    "depth",
    "depth@100ms",
    *(f"depth{n}{sfx}" for n in PARTIAL_LEVELS for sfx in ("", "@100ms")),
)
_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,36}$")
_CONTROL_METHODS = (
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "LIST_SUBSCRIPTIONS",
    "SET_PROPERTY",
    "GET_PROPERTY",
)
_INT64 = (-(2**63), 2**63 - 1)


def parse_stream(name: str, symbols: set[str]) -> str | None:
    """Canonical stream name if valid for these (lowercase) symbols, else None.

    Conservative: the symbol must be lowercase and configured, the suffix spelled as documented.
    """
    sym, sep, kind = name.partition("@")
    if not sep or sym not in symbols or kind not in SERVED_STREAM_KINDS:
        return None
    return name


def _ctl_error(code: int, msg: str, req_id: Any) -> bytes:
    # Live captures (fixtures: hostile/error_*.json) wrap errors in "error"; the docs' table
    # shows them flat. We follow the wire.
    return orjson.dumps({"error": {"code": code, "msg": msg}, "id": req_id})


@dataclass
class ControlResult:
    """The reply to send and the changes to apply, in that order, for one control frame."""

    reply: bytes
    subscribe: list[str] = field(default_factory=list)
    unsubscribe: list[str] = field(default_factory=list)
    combined: bool | None = None


def handle_control(
    text: str | bytes,
    *,
    current: list[str],
    combined: bool,
    valid_stream: Callable[[str], str | None],
    max_streams: int,
) -> ControlResult:
    """One client control frame -> reply + requested changes (binance-protocol.md 1.5)."""
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return ControlResult(_ctl_error(3, f"Invalid JSON: {exc}", None))
    if not isinstance(msg, dict):
        return ControlResult(_ctl_error(2, "Invalid request: expected a JSON object", None))
    req_id = msg.get("id")
    if not (
        req_id is None
        or (
            isinstance(req_id, int)
            and not isinstance(req_id, bool)
            and _INT64[0] <= req_id <= _INT64[1]
        )
        or (isinstance(req_id, str) and _ID_RE.match(req_id))
    ):
        return ControlResult(
            _ctl_error(2, "Invalid request: request ID must be an unsigned integer", None)
        )
    method = msg.get("method")
    if method is None:
        return ControlResult(_ctl_error(2, "Invalid request: missing field `method`", req_id))
    if method not in _CONTROL_METHODS:
        expected = ", ".join(f"`{m}`" for m in _CONTROL_METHODS)
        return ControlResult(
            _ctl_error(
                2,
                f"Invalid request: unknown variant `{method}`, expected one of {expected}",
                req_id,
            )
        )
    params = msg.get("params", [])
    ok = orjson.dumps({"result": None, "id": req_id})
    if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            return ControlResult(_ctl_error(2, "Invalid request: streams must be an array", req_id))
        names: list[str] = []
        for p in params:
            canon = valid_stream(p)
            if canon is None:
                return ControlResult(
                    _ctl_error(2, f"Invalid request: unknown stream name `{p}`", req_id)
                )
            if canon not in names:
                names.append(canon)
        if method == "SUBSCRIBE":
            new = [n for n in names if n not in current]
            if len(current) + len(new) > max_streams:
                return ControlResult(
                    _ctl_error(2, f"Invalid request: too many streams (max {max_streams})", req_id)
                )
            return ControlResult(ok, subscribe=new)
        return ControlResult(ok, unsubscribe=[n for n in names if n in current])
    if method == "LIST_SUBSCRIPTIONS":
        return ControlResult(orjson.dumps({"result": list(current), "id": req_id}))
    # SET_PROPERTY / GET_PROPERTY
    if not isinstance(params, list):
        return ControlResult(_ctl_error(2, "Invalid request: params must be an array", req_id))
    want = 2 if method == "SET_PROPERTY" else 1
    if len(params) > want:
        return ControlResult(_ctl_error(2, "Invalid request: too many parameters", req_id))
    if len(params) < want:
        return ControlResult(_ctl_error(2, "Invalid request: missing parameters", req_id))
    if not isinstance(params[0], str):
        return ControlResult(
            _ctl_error(2, "Invalid request: property name must be a string", req_id)
        )
    if params[0] != "combined":
        return ControlResult(_ctl_error(0, "Unknown property", req_id))
    if method == "GET_PROPERTY":
        return ControlResult(orjson.dumps({"result": combined, "id": req_id}))
    if not isinstance(params[1], bool):
        return ControlResult(_ctl_error(1, "Invalid value type: expected Boolean", req_id))
    return ControlResult(ok, combined=params[1])
