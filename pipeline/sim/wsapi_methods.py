"""The WS API's methods: session logon/status/logout, user-data stream subscriptions, orders
and account queries (binance-protocol.md 2.7-2.14).

Why apart from the service: :class:`~pipeline.sim.wsapi.WsApiService` owns what every request
goes through (parsing, weights and bans, the response envelope, sessions); this module is what
each method does once admitted, including the order-entry rules (unfilled-order limits, the
``order_fault`` and ``hostile_reply`` faults) in front of the pure venue.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import orjson

from pipeline.binance.wsapi import SIGNED_METHODS
from pipeline.sim.signatures import MSG_BAD_SIG
from pipeline.sim.venue import VenueError, VenueEvent, missing

if TYPE_CHECKING:
    from pipeline.sim.wsapi import ApiRequest, ApiSession, WsApiService

log = logging.getLogger("pipeline.sim.wsapi")

# The signed methods this simulator executes through the venue: Binance's documented list (one
# list, pipeline.binance.wsapi.SIGNED_METHODS, section 2.6 of our protocol notes) less the two
# that are session plumbing here (logon and the signed user-data subscription, handled before
# this table is consulted).
SIGNED = SIGNED_METHODS - {"session.logon", "userDataStream.subscribe.signature"}
MSG_TIMEOUT = (
    "Timeout waiting for response from backend server. Send status unknown; "
    "execution status unknown."
)
MSG_UNKNOWN_ERR = "An unknown error occured while processing the request."


class HostileReply(Exception):
    """Carries a deliberately bad response frame (fault ``hostile_reply``) out of a handler."""

    def __init__(self, kind: str, result: Any) -> None:
        super().__init__(kind)
        self.kind = kind
        self.result = result

    def frame(self, rid: Any) -> bytes:
        head = b'{"id":' + orjson.dumps(rid) + b',"status":200,"result":'
        if self.kind == "null_result":
            return head + b"null}"
        if self.kind == "deep_json":
            return head + b"[" * 100_000 + b"]" * 100_000 + b"}"
        # order_id_overflow: 2**64 does not fit orjson's integers; the stdlib writes any int
        result = dict(self.result) if isinstance(self.result, dict) else {}
        result["orderId"] = 2**64
        return head + json.dumps(result).encode() + b"}"


class MethodHandlers:
    """Runs one admitted request of a :class:`~pipeline.sim.wsapi.WsApiService`."""

    def __init__(self, service: WsApiService) -> None:
        self.service = service

    def authenticate(self, s: ApiSession, req: ApiRequest, now: int) -> str:
        svc = self.service
        p = req.params
        if "apiKey" in p or "signature" in p:
            account = svc.keys.verify(p, now)
        elif s.api_key is not None:
            svc.keys.check_timestamp(p, now)
            account = s.api_key
        else:
            raise missing("apiKey")
        req.account = account
        return account

    def _session_info(self, s: ApiSession, now: int) -> dict[str, Any]:
        # null = no user data stream available (not logged on), else whether one is active
        uds = bool(s.subscriptions) if s.api_key is not None or s.subscriptions else None
        return {
            "apiKey": s.api_key,
            "authorizedSince": s.authorized_since,
            "connectedSince": s.connected_since,
            "returnRateLimits": s.return_rate_limits,
            "serverTime": now,
            "userDataStream": uds,
        }

    def _end_logon_subs(self, s: ApiSession) -> list[bytes]:
        drop = self.service.drop_subscription
        return [drop(s, sid) for sid, (_, logon) in list(s.subscriptions.items()) if logon]

    def run(
        self,
        s: ApiSession,
        req: ApiRequest,
        now: int,
        before: list[bytes],
        events: list[VenueEvent],
    ) -> tuple[int, Any]:
        """Run one method; fills ``before`` (session frames) and ``events`` (user data)."""
        svc = self.service
        m, p = req.method, req.params
        v = svc.venue
        if m == "ping":
            return 200, {}
        if m == "time":
            return 200, {"serverTime": now}
        if m == "session.logon":
            if not p.get("apiKey"):
                raise missing("apiKey")
            if not p.get("signature"):
                raise missing("signature")
            if getattr(svc.faults, "reject_logons", 0) > 0:
                svc.faults.reject_logons -= 1
                svc.fault_fired("reject_logons")
                svc.counters["logon_failures"] += 1
                raise VenueError(-1022, MSG_BAD_SIG)
            try:
                key = svc.keys.verify(p, now)
            except VenueError:
                svc.counters["logon_failures"] += 1
                raise
            if s.api_key is not None and s.api_key != key:
                before.extend(self._end_logon_subs(s))
            if s.api_key != key:
                s.authorized_since = now
            s.api_key = key
            svc.counters["logons"] += 1
            log.info("wsapi: session logon", extra={"conn": s.conn_id, "key": key[:8]})
            return 200, self._session_info(s, now)
        if m == "session.status":
            return 200, self._session_info(s, now)
        if m == "session.logout":
            before.extend(self._end_logon_subs(s))
            s.api_key = None
            s.authorized_since = None
            return 200, self._session_info(s, now)
        if m == "session.subscriptions":
            return 200, [{"subscriptionId": i} for i in sorted(s.subscriptions)]
        if m == "userDataStream.subscribe":
            if s.api_key is None:
                raise VenueError(-1002, "You are not authorized to execute this request.")
            return 200, {"subscriptionId": svc.add_subscription(s, s.api_key, True)}
        if m == "userDataStream.subscribe.signature":
            account = svc.keys.verify(p, now)
            return 200, {"subscriptionId": svc.add_subscription(s, account, False)}
        if m == "userDataStream.unsubscribe":
            text = p.get("subscriptionId")
            if text:
                if not text.isdigit() or int(text) not in s.subscriptions:
                    raise VenueError(-2036, "User Data Stream subscription not active.")
                before.append(svc.drop_subscription(s, int(text)))
            else:
                if not s.subscriptions:
                    raise VenueError(-2036, "User Data Stream subscription not active.")
                before.extend(svc.drop_subscription(s, sid) for sid in list(s.subscriptions))
            return 200, {}
        if m not in SIGNED:
            raise VenueError(-1100, f"Unknown method: {m}")
        account = self.authenticate(s, req, now)
        if m == "order.place" or m == "order.cancelReplace":
            return self._order_method(s, req, account, now, events)
        if m == "order.test":
            return 200, v.test_order(account, p, now)
        if m == "order.cancel":
            result, evs = v.cancel(account, p, now)
            events.extend(evs)
            return 200, result
        if m == "order.amend.keepPriority":
            result, evs = v.amend_keep_priority(account, p, now)
            events.extend(evs)
            return 200, result
        if m in ("order.status", "openOrders.status") and svc.take_hostile(("status_5xx",)):
            raise VenueError(-1000, MSG_UNKNOWN_ERR, 500)
        if m == "order.status":
            return 200, v.order_status(account, p)
        if m == "openOrders.status":
            return 200, v.open_orders(account, p)
        if m == "openOrders.cancelAll":
            results, evs = v.cancel_all(account, p, now)
            events.extend(evs)
            return 200, results
        if m == "account.status":
            return 200, v.account_status(account, p, now)
        if m == "account.rateLimits.orders":
            return 200, svc.limits.orders(account).entries(now)
        raise VenueError(-1100, f"Unknown method: {m}")  # pragma: no cover - SIGNED is closed


    def _order_method(
        self, s: ApiSession, req: ApiRequest, account: str, now: int, events: list[VenueEvent]
    ) -> tuple[int, Any]:
        """order.place / order.cancelReplace: unfilled-order limits, faults, then the venue."""
        svc = self.service
        p = req.params
        limits = svc.limits.orders(account)
        full = limits.exceeded(now)
        cr = req.method == "order.cancelReplace"
        limit_err: VenueError | None = None
        if full is not None:
            unit = {"SECOND": "SECOND", "DAY": "DAY"}.get(full.interval, full.interval)
            limit_err = VenueError(
                -1015,
                f"Too many new orders; current limit is {full.limit} orders per "
                f"{full.interval_num} {unit}.",
                status=429,
                data={"serverTime": now, "retryAfter": full.resets_at(now)},
            )
            if not (cr and p.get("orderRateLimitExceededMode") == "CANCEL_ONLY"):
                svc.counters["rate_limited"] += 1
                raise limit_err
        if svc.take_hostile(("retry_after_overflow",)):
            raise VenueError(
                -1003,
                "Too many requests.",
                status=429,
                data={"serverTime": now, "retryAfter": 10**17},
            )
        fault = svc.take_order_fault()
        if fault == "429":
            retry = now + svc.fault_retry_after_ms
            svc.limits.ip(s.ip).penalize(retry)
            raise svc.weight_429(s.ip, now, retry)
        if fault == "5xx":
            raise VenueError(-1000, MSG_UNKNOWN_ERR, status=500)
        # Count first, undo if the request is refused before the matching engine: a fill inside
        # the call then decrements a count that already includes this order (FAQ: unfilled
        # order count, "when an order is first filled ... decreases by one").
        counted = limit_err is None
        if counted:
            limits.add(now)
        if cr:
            new_err = None
            if limit_err is not None:
                new_err = VenueError(limit_err.code, limit_err.msg)
            try:
                status, body, evs = svc.venue.cancel_replace(
                    account, p, now, new_order_error=new_err
                )
            except VenueError:
                if counted:
                    limits.remove(now)
                raise
            events.extend(evs)
            if fault == "-1007":
                raise VenueError(-1007, MSG_TIMEOUT, status=408)
            if status != 200:
                raise VenueError(body["code"], body["msg"], status=status, data=body.get("data"))
            return 200, body
        try:
            result, evs = svc.venue.place(account, p, now)
        except VenueError:
            limits.remove(now)  # only successful placements count
            raise
        events.extend(evs)
        if fault == "-1007":
            raise VenueError(-1007, MSG_TIMEOUT, status=408)
        hostile = svc.take_hostile(("null_result", "order_id_overflow", "deep_json"))
        if hostile:
            raise HostileReply(hostile, result)
        return 200, result
