"""Fault switches of the simulator: one mutable dataclass shared by the shell and the venue.

The venue (:mod:`pipeline.sim.wsapi`) READS ``wsapi_delay_ms``, ``reject_logons``,
``order_fault`` / ``order_fault_count`` and ``hostile_reply`` / ``hostile_reply_count`` (and
decrements the counts it consumes).

``hostile_reply`` plays a confused or hostile exchange (issue #11), one kind at a time, for the
next ``count`` replies it applies to:

- ``rate_limits_overflow``: any response carries a REQUEST_WEIGHT entry whose ``count`` is 2**63.
- ``retry_after_overflow``: an order request is answered 429 -1003 with ``retryAfter`` 10**17
  (nothing placed).
- ``null_result``: an order.place is executed, and answered ``{"status": 200, "result": null}``.
- ``order_id_overflow``: an order.place is executed, and its result says ``orderId`` 2**64.
- ``deep_json``: an order.place is executed, and its result is a 100 000-deep JSON array.
- ``status_5xx``: order.status and openOrders.status are answered 500 -1000 (nothing known).

The shell (:mod:`pipeline.sim.server`) owns the connection-level switches below them.

:func:`parse_fault` validates a ``POST /sim/fault/<name>`` request (or a CLI flag) into a
:class:`FaultRequest` without touching anything, so bad input gets a clear 400 and tests can
check validation without a server. Times here are monotonic seconds (``loop.time()``); the shell
passes ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ORDER_FAULT_KINDS = ("429", "5xx", "-1007")
HOSTILE_REPLY_KINDS = (
    "rate_limits_overflow",
    "retry_after_overflow",
    "null_result",
    "order_id_overflow",
    "deep_json",
    "status_5xx",
)
MALFORMED_KINDS = ("truncated", "invalid_json", "oversized", "binary", "bad_utf8", "torn")
TARGETS = ("all", "streams", "wsapi", "sbe")

# Faults acting once, now (the shell performs them) vs switches that stay set.
IMMEDIATE = ("drop", "malformed", "shutdown")
SWITCHES = (
    "blackhole",
    "stall",
    "skip_agg_ids",
    "refuse",
    "rest_fail",
    "rest_rate_limit",
    "wsapi_delay",
    "reject_logons",
    "order_fault",
    "hostile_reply",
    "sbe_cull",
    "clear",
)
ALL_FAULTS = IMMEDIATE + SWITCHES


@dataclass
class Faults:
    """Current fault state. ``None`` deadlines mean "until cleared"; 0/None means off."""

    # --- read by the venue (SIM-VENUE) ---
    wsapi_delay_ms: int = 0
    reject_logons: int = 0
    order_fault: str | None = None  # "429" | "5xx" | "-1007"
    order_fault_count: int = 0
    hostile_reply: str | None = None  # one of HOSTILE_REPLY_KINDS
    hostile_reply_count: int = 0

    # --- connection level (server) ---
    stall: bool = False
    stall_until: float | None = None
    blackhole: bool = False
    blackhole_until: float | None = None
    refuse: bool = False
    refuse_until: float | None = None
    refuse_mode: str = "503"  # "503" (HTTP reject) | "close" (drop TCP before the handshake)
    skip_agg_ids: int = 0  # aggTrade events still to be withheld from the live stream
    # HTTP status of a "503"-mode refusal: 503 (busy), or a 4xx as a venue answers a URL or a
    # stream it does not serve (a configuration error for the client, not a retry)
    refuse_status: int = 503
    skip_agg_symbol: str | None = None  # None = any symbol
    rest_fail_count: int = 0
    rest_fail_until: float | None = None
    rest_fail_status: int = 500
    # REST REQUEST_WEIGHT on demand (pipeline/sim/rest_limits.py): a lower limit / shorter
    # window (None: Binance's 6000 per 60 s), and the next `rest_force_count` requests answered
    # `rest_force` ("429" | "418") with Retry-After `rest_retry_after` s
    rest_limit: int | None = None
    rest_limit_interval: float = 60.0
    rest_force: str | None = None
    rest_force_count: int = 0
    rest_retry_after: float = 2.0
    # SBE bestBidAsk keeps only the newest update per symbol per loop turn (Binance culls
    # stale ones under load; pipeline/sim/sbe_streams.py)
    sbe_cull: bool = False

    # --- counters (GET /sim/state) ---
    fired: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.fired[name] = self.fired.get(name, 0) + n

    def expire(self, now: float) -> None:
        """Turn off switches whose deadline passed (the shell calls this on its ticks)."""
        if self.stall and self.stall_until is not None and now >= self.stall_until:
            self.stall, self.stall_until = False, None
        if self.refuse and self.refuse_until is not None and now >= self.refuse_until:
            self.refuse, self.refuse_until = False, None
        if self.rest_fail_until is not None and now >= self.rest_fail_until:
            self.rest_fail_until = None
        # blackhole expiry needs connection work; the shell handles it.

    def rest_should_fail(self, now: float) -> int | None:
        """HTTP status to fail this REST request with (and count it), or None."""
        if self.rest_fail_until is not None and now < self.rest_fail_until:
            self.count("rest_fail")
            return self.rest_fail_status
        if self.rest_fail_count > 0:
            self.rest_fail_count -= 1
            self.count("rest_fail")
            return self.rest_fail_status
        return None

    def take_skip_agg(self, symbol: str) -> bool:
        """True if this live aggTrade must be withheld (consumes one from the budget)."""
        if self.skip_agg_ids > 0 and self.skip_agg_symbol in (None, symbol):
            self.skip_agg_ids -= 1
            self.count("skip_agg_ids")
            return True
        return False

    def clear(self) -> None:
        """Every switch off (counters kept)."""
        fired = self.fired
        self.__init__()  # type: ignore[misc]
        self.fired = fired

    def snapshot(self) -> dict[str, Any]:
        return {
            "wsapi_delay_ms": self.wsapi_delay_ms,
            "reject_logons": self.reject_logons,
            "order_fault": self.order_fault,
            "order_fault_count": self.order_fault_count,
            "hostile_reply": self.hostile_reply,
            "hostile_reply_count": self.hostile_reply_count,
            "stall": self.stall,
            "blackhole": self.blackhole,
            "refuse": self.refuse,
            "skip_agg_ids": self.skip_agg_ids,
            "rest_fail_count": self.rest_fail_count,
            "rest_fail_timed": self.rest_fail_until is not None,
            "rest_limit": self.rest_limit,
            "rest_limit_interval": self.rest_limit_interval,
            "rest_force": self.rest_force,
            "rest_force_count": self.rest_force_count,
            "sbe_cull": self.sbe_cull,
            "fired": dict(self.fired),
        }


class FaultError(ValueError):
    """Invalid fault name or parameters (HTTP 400 / CLI usage error)."""


@dataclass(frozen=True)
class FaultRequest:
    name: str
    params: dict[str, Any]


def _num(params: dict[str, Any], key: str, default: float | None, *, lo: float = 0) -> float | None:
    if key not in params or params[key] is None:
        return default
    v = params[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise FaultError(f"{key} must be a number, got {params[key]!r}") from None
    if v < lo:
        raise FaultError(f"{key} must be >= {lo}, got {v}")
    return float(v)


def _int(params: dict[str, Any], key: str, default: int, *, lo: int = 0) -> int:
    v = _num(params, key, default, lo=lo)
    assert v is not None
    if v != int(v):
        raise FaultError(f"{key} must be an integer, got {params[key]!r}")
    return int(v)


def parse_fault(name: str, params: dict[str, Any] | None) -> FaultRequest:
    """Validate and normalise one fault request. Unknown keys are an error (typos bite)."""
    p = dict(params or {})
    allowed: dict[str, tuple[str, ...]] = {
        "drop": ("mode", "code", "target"),
        "malformed": ("count", "kind", "target", "size"),
        "shutdown": ("target", "close_after", "notice"),
        "blackhole": ("duration", "target", "on"),
        "stall": ("duration", "on"),
        "skip_agg_ids": ("count", "symbol"),
        "refuse": ("duration", "mode", "on", "status"),
        "rest_fail": ("count", "duration", "status"),
        "rest_rate_limit": ("limit", "interval", "force", "count", "retry_after", "on"),
        "wsapi_delay": ("ms",),
        "reject_logons": ("count",),
        "order_fault": ("kind", "count"),
        "hostile_reply": ("kind", "count"),
        "sbe_cull": ("on",),
        "clear": (),
    }
    if name not in allowed:
        raise FaultError(f"unknown fault {name!r}; known: {', '.join(ALL_FAULTS)}")
    extra = set(p) - set(allowed[name])
    if extra:
        raise FaultError(f"fault {name!r} does not take {sorted(extra)}; takes {allowed[name]}")
    out: dict[str, Any] = {}
    if "target" in allowed[name]:
        target = p.get("target", "all")
        if target not in TARGETS:
            raise FaultError(f"target must be one of {TARGETS}, got {target!r}")
        out["target"] = target
    if "duration" in allowed[name]:
        out["duration"] = _num(p, "duration", None)
    if "on" in allowed[name]:
        on = p.get("on", True)
        if not isinstance(on, bool):
            raise FaultError(f"on must be true/false, got {on!r}")
        out["on"] = on
    if name == "drop":
        mode = p.get("mode", "abort")
        if mode not in ("abort", "close"):
            raise FaultError(f"drop mode must be abort or close, got {mode!r}")
        out["mode"] = mode
        out["code"] = _int(p, "code", 1011, lo=1000)
    elif name == "malformed":
        kind = p.get("kind", "truncated")
        if kind not in MALFORMED_KINDS:
            raise FaultError(f"malformed kind must be one of {MALFORMED_KINDS}, got {kind!r}")
        out["kind"] = kind
        out["count"] = _int(p, "count", 1, lo=1)
        out["size"] = _int(p, "size", 2 * 1024 * 1024, lo=1)
    elif name == "shutdown":
        # serverShutdown now, the close `close_after` s later (None: left to the client, 0: no
        # lead at all); notice=false closes without any serverShutdown, as a 24 h close may
        notice = p.get("notice", True)
        if not isinstance(notice, bool):
            raise FaultError(f"notice must be true/false, got {notice!r}")
        out["notice"] = notice
        out["close_after"] = _num(p, "close_after", None if notice else 0.0)
    elif name == "skip_agg_ids":
        out["count"] = _int(p, "count", 1, lo=0)
        sym = p.get("symbol")
        if sym is not None and not isinstance(sym, str):
            raise FaultError(f"symbol must be a string, got {sym!r}")
        out["symbol"] = sym.upper() if sym else None
    elif name == "refuse":
        mode = p.get("mode", "503")
        if mode not in ("503", "close"):
            raise FaultError(f"refuse mode must be '503' or 'close', got {mode!r}")
        out["mode"] = mode
        out["status"] = _int(p, "status", 503, lo=400)
        if out["status"] > 599:
            raise FaultError(f"refuse status must be an HTTP error status, got {out['status']}")
    elif name == "rest_fail":
        out["count"] = _int(p, "count", 0 if "duration" in p else 1, lo=0)
        out["status"] = _int(p, "status", 500, lo=400)
    elif name == "rest_rate_limit":
        out["limit"] = _int(p, "limit", 6000, lo=1)
        out["interval"] = _num(p, "interval", 60.0, lo=0.1)
        force = p.get("force")
        if force is not None and str(force) not in ("429", "418"):
            raise FaultError(f"rest_rate_limit force must be '429' or '418', got {force!r}")
        out["force"] = None if force is None else str(force)
        out["count"] = _int(p, "count", 1 if force is not None else 0, lo=0)
        out["retry_after"] = _num(p, "retry_after", 2.0, lo=0)
    elif name == "wsapi_delay":
        out["ms"] = _int(p, "ms", 0, lo=0)
    elif name == "reject_logons":
        out["count"] = _int(p, "count", 1, lo=0)
    elif name == "order_fault":
        kind = p.get("kind")
        if kind is not None:
            kind = str(kind)
            if kind not in ORDER_FAULT_KINDS:
                raise FaultError(f"order_fault kind must be one of {ORDER_FAULT_KINDS}")
        out["kind"] = kind
        out["count"] = _int(p, "count", 1 if kind else 0, lo=0)
    elif name == "hostile_reply":
        kind = p.get("kind")
        if kind not in HOSTILE_REPLY_KINDS:
            raise FaultError(f"hostile_reply kind must be one of {HOSTILE_REPLY_KINDS}")
        out["kind"] = kind
        out["count"] = _int(p, "count", 1, lo=0)
    return FaultRequest(name, out)


def apply_switch(faults: Faults, req: FaultRequest, now: float) -> None:
    """Set a persistent switch (not the IMMEDIATE ones, which need connections)."""
    p = req.params
    dur = p.get("duration")
    until = None if dur is None else now + dur
    if req.name == "stall":
        faults.stall = p["on"]
        faults.stall_until = until if p["on"] else None
    elif req.name == "refuse":
        faults.refuse = p["on"]
        faults.refuse_until = until if p["on"] else None
        faults.refuse_mode = p["mode"]
        faults.refuse_status = p.get("status", 503)
    elif req.name == "skip_agg_ids":
        faults.skip_agg_ids = p["count"]
        faults.skip_agg_symbol = p["symbol"]
    elif req.name == "rest_fail":
        faults.rest_fail_count = p["count"]
        faults.rest_fail_until = until
        faults.rest_fail_status = p["status"]
    elif req.name == "rest_rate_limit":
        on = p["on"]
        faults.rest_limit = p["limit"] if on else None
        faults.rest_limit_interval = p["interval"] if on else 60.0
        faults.rest_force = p["force"] if on and p["count"] else None
        faults.rest_force_count = p["count"] if on else 0
        faults.rest_retry_after = p["retry_after"]
    elif req.name == "wsapi_delay":
        faults.wsapi_delay_ms = p["ms"]
    elif req.name == "reject_logons":
        faults.reject_logons = p["count"]
    elif req.name == "order_fault":
        faults.order_fault = p["kind"] if p["count"] else None
        faults.order_fault_count = p["count"]
    elif req.name == "hostile_reply":
        faults.hostile_reply = p["kind"] if p["count"] else None
        faults.hostile_reply_count = p["count"]
    elif req.name == "sbe_cull":
        faults.sbe_cull = p["on"]
    elif req.name == "clear":
        faults.clear()
    else:
        raise FaultError(f"{req.name} is not a switch")
