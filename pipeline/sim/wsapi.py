"""Simulated Binance WebSocket API (``/ws-api/v3``): envelopes, auth, rate limits, user data.

Implements the shared protocol reference (binance-protocol.md) sections 2 (envelope 2.2/2.3,
errors 2.4, limits 2.5, methods 2.6-2.14, events 2.15), 3.2 (signature payload) and 4
(connection rules). Not implemented: ``timeUnit=MICROSECOND``, SBE, order lists, the
market-data methods of the WS API (``depth``, ``exchangeInfo``, ...). The exchange
itself (orders, balances, matching) is the pure :mod:`pipeline.sim.venue`; this module adds what
belongs to a connection and an IP: sessions, signatures, timestamps, weights, faults.

Layers
------
- :class:`WsApiService` is sans-I/O: ``open_session`` / ``handle(session, frame)`` /
  ``close_session``. ``handle`` returns a :class:`Reply` (the response frame, the session-local
  frames to send before it, the user-data events it caused, whether to disconnect, how long to
  delay it). :meth:`WsApiService.dispatch` pushes user-data events to every subscribed session
  through ``ApiSession.push`` (also called by the venue for fills caused by the market walk).
- :func:`serve_connection` is the thin asyncio shell the server calls per connection.
- What each method does is :mod:`pipeline.sim.wsapi_methods`; who sent a request is
  :mod:`pipeline.sim.signatures`; the weights and counters are :mod:`pipeline.sim.ratelimit`.

Choices where Binance is silent or the reference says UNCONFIRMED (README-worthy):
- Unknown method -> 400 ``-1100`` "Unknown method: X". Invalid JSON / non-object -> 400
  ``-1100`` with ``id: null``. Missing ``method`` -> 400 ``-1102``.
- 429 responses carry ``error.data = {"serverTime", "retryAfter"}`` (epoch ms), like the
  documented 418. Weight 429s use code -1003, unfilled-order 429s code -1015.
- After a weight 429 (or an injected ``order_fault="429"``) with retryAfter R, the IP may send
  ``ban_grace`` more requests before R (each answered 429); the next one is answered 418
  (-1003 "IP banned until ...") and the connection is closed. Ban lasts ``ban_ms``.
  -1015 (order count) 429s never lead to a ban.
- ``userDataStream.subscribe`` without a logged-on session -> 400 ``-1002``.
- Fault ``reject_logons`` answers ``session.logon`` with -1022 (invalid signature).
- Fault ``order_fault``: "429" -> 429 -1003, nothing placed; "5xx" -> 500 -1000, NOTHING
  placed; "-1007" -> 408 -1007 "Timeout waiting for response from backend server. Send status
  unknown; execution status unknown." with the order ACTUALLY PLACED (its user-data events are
  sent), so a client must reconcile with ``order.status``.
- Fault ``hostile_reply`` (see :mod:`pipeline.sim.faults`) sends replies a real exchange should
  not: numbers out of int64, ``result: null`` for an executed order, 100 000-deep JSON, 5xx to
  every status query. The orders concerned ARE executed, so a client must reconcile them.
- ``eventStreamTerminated`` frames are sent just before the response of the request that ended
  the subscription (``userDataStream.unsubscribe``, ``session.logout``, re-logon with another key).
- User-data events caused by a request are sent right AFTER its response. A response delayed
  by ``wsapi_delay_ms`` is computed (and the order executed) on receipt; only the response frame
  waits, so the events then arrive BEFORE it. Clients must handle both orders.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.logs import RateLimitedLog
from pipeline.sim.ratelimit import FREE_WHEN_SUCCESSFUL, WEIGHTS, ApiLimits, request_weight
from pipeline.sim.signatures import (
    ApiKeyring,
    NumberText,
    param_text,
)
from pipeline.sim.venue import Venue, VenueError, VenueEvent, missing
from pipeline.sim.wsapi_methods import MSG_UNKNOWN_ERR, HostileReply, MethodHandlers

log = logging.getLogger("pipeline.sim.wsapi")
_slow_log = RateLimitedLog(log)

ORDER_METHODS = frozenset({"order.place", "order.cancelReplace"})
CONNECT_WEIGHT = 2
MAX_PENDING_FRAMES = 50_000  # unsent frames per connection before it is dropped as too slow

_MAX_CONCURRENT_SUBS = 1000
_MAX_TOTAL_SUBS = 65535


@dataclass
class ApiSession:
    """Per-connection state; it dies with the connection (accounts/orders live in the venue)."""

    conn_id: int
    ip: str
    connected_since: int
    return_rate_limits: bool = True
    api_key: str | None = None
    authorized_since: int | None = None
    subscriptions: dict[int, tuple[str, bool]] = field(default_factory=dict)  # id -> (acct, logon)
    subs_total: int = 0
    push: Callable[[bytes], None] = field(default=lambda frame: None)
    closed: bool = False


@dataclass
class Reply:
    """What the shell does for one request frame, in this order: send ``before`` (this
    session's eventStreamTerminated frames); send ``frame`` (the response), after ``delay_ms``
    if set; hand ``events`` to :meth:`WsApiService.dispatch` (immediately when delayed, so the
    user data then overtakes the response); disconnect if ``close``."""

    frame: bytes
    before: list[bytes] = field(default_factory=list)
    events: list[VenueEvent] = field(default_factory=list)
    close: bool = False
    delay_ms: int = 0


class ApiRequest:
    __slots__ = ("account", "id", "method", "params")

    def __init__(self, rid: Any, method: str, params: dict[str, str]) -> None:
        self.id = rid
        self.method = method
        self.params = params
        self.account: str | None = None  # set once authenticated (selects ORDERS rateLimits)


class _Fail(Exception):
    """Internal: a response-level error (status + error object)."""

    def __init__(self, err: VenueError) -> None:
        super().__init__(err.msg)
        self.err = err


class _NoFaults:
    wsapi_delay_ms = 0
    reject_logons = 0
    order_fault: str | None = None
    order_fault_count = 0
    hostile_reply: str | None = None
    hostile_reply_count = 0


class WsApiService:
    """The WS API of one simulated exchange: all sessions, accounts (via :class:`Venue`), limits.

    ``api_keys`` maps the ``apiKey`` string a client sends to its raw 32-byte Ed25519 public key;
    each key gets its own funded account. ``faults`` is :class:`pipeline.sim.faults.Faults` (or
    anything with the same four fields). ``limits`` (all optional): ``weight_per_minute``
    (6000), ``orders_per_10s`` (50), ``orders_per_day`` (160000), ``ban_ms`` (120000),
    ``ban_grace`` (1), ``fault_retry_after_ms`` (1000), and the venue's ``quote_balance``,
    ``base_balance``, ``balances``, ``maker_commission``, ``taker_commission``, ``stp_mode``,
    ``fill_on_touch``.
    """

    _VENUE_KW = frozenset(
        {
            "quote_balance",
            "base_balance",
            "balances",
            "maker_commission",
            "taker_commission",
            "stp_mode",
            "fill_on_touch",
            "max_num_orders",
            "max_closed_orders",
        }
    )

    def __init__(
        self,
        market: Any,
        api_keys: Mapping[str, bytes],
        faults: Any,
        clock_ms: Callable[[], int],
        **limits: Any,
    ) -> None:
        venue_kw = {k: v for k, v in limits.items() if k in self._VENUE_KW}
        own = {k: v for k, v in limits.items() if k not in self._VENUE_KW}
        self.limits = ApiLimits(
            weight_per_minute=int(own.pop("weight_per_minute", 6000)),
            orders_per_10s=int(own.pop("orders_per_10s", 50)),
            orders_per_day=int(own.pop("orders_per_day", 160_000)),
            ban_ms=int(own.pop("ban_ms", 120_000)),
            ban_grace=int(own.pop("ban_grace", 1)),
        )
        self.fault_retry_after_ms = int(own.pop("fault_retry_after_ms", 1000))
        if own:
            raise TypeError(f"unknown WsApiService limits: {sorted(own)}")
        self.market = market
        self.faults = faults if faults is not None else _NoFaults()
        self.clock_ms = clock_ms
        self.keys = ApiKeyring()
        self.venue = Venue(market, **venue_kw)
        for name, pub in api_keys.items():
            self.add_api_key(name, pub)
        self.venue.event_sink = self.dispatch
        self.venue.first_fill_sink = self._first_fill
        self.sessions: dict[int, ApiSession] = {}
        self._subs: dict[str, dict[tuple[int, int], ApiSession]] = {}  # acct -> (conn, sub) -> sess
        self._next_conn = 1
        self.counters: dict[str, int] = {
            "connections": 0,
            "requests": 0,
            "logons": 0,
            "logon_failures": 0,
            "events_sent": 0,
            "rate_limited": 0,
            "bans": 0,
            "faults_fired": 0,
            "bad_frames": 0,
            "internal_errors": 0,
        }
        self.errors_by_code: dict[int, int] = {}
        # requests per method (known methods only, else "other": bounded by WEIGHTS)
        self.method_counts: dict[str, int] = {}
        self._bad_input = RateLimitedLog(log)
        self.methods = MethodHandlers(self)

    # ---------------------------------------------------------------- setup

    def add_api_key(self, name: str, public_key: bytes) -> None:
        """Register an API key (raw 32-byte Ed25519 public key) and fund its account."""
        self.keys.add(name, public_key)
        self.venue.add_account(name)

    def rate_limits_info(self) -> list[dict[str, Any]]:
        """The limits this service enforces, in exchangeInfo's ``rateLimits`` shape."""
        return self.limits.info()

    def on_tick(self, now_ms: int) -> None:
        """Periodic hook of the server; nothing time-driven is pending in this venue."""

    def state(self) -> dict[str, Any]:
        """Counters and open orders for ``GET /sim/state``."""
        now = self.clock_ms()
        return {
            "counters": dict(self.counters),
            "methods": dict(self.method_counts),
            "venue": dict(self.venue.counters),
            "errors_by_code": {str(k): v for k, v in sorted(self.errors_by_code.items())},
            "sessions": [
                {
                    "conn": s.conn_id,
                    "logged_on": s.api_key is not None,
                    "subscriptions": len(s.subscriptions),
                }
                for s in self.sessions.values()
            ],
            "open_orders": self.venue.open_orders_by_client_id(),
            "banned_ips": self.limits.banned_ips(now),
        }

    # ---------------------------------------------------------------- sessions

    def open_session(self, ip: str, path: str = "/ws-api/v3") -> ApiSession:
        """A new connection: counts CONNECT_WEIGHT against the IP (section 4)."""
        now = self.clock_ms()
        s = ApiSession(conn_id=self._next_conn, ip=ip, connected_since=now)
        self._next_conn += 1
        if "returnRateLimits=false" in path:
            s.return_rate_limits = False
        self.limits.ip(ip).weight.add(now, CONNECT_WEIGHT)
        self.sessions[s.conn_id] = s
        self.counters["connections"] += 1
        return s

    def close_session(self, s: ApiSession) -> None:
        """Connection gone: its logon and subscriptions vanish with it."""
        s.closed = True
        for sub_id in list(s.subscriptions):
            self.drop_subscription(s, sub_id)
        self.sessions.pop(s.conn_id, None)

    def _first_fill(self, account: str) -> None:
        """An order traded for the first time: it no longer counts as unfilled."""
        self.limits.orders(account).remove(self.clock_ms())

    # ---------------------------------------------------------------- events

    def dispatch(self, events: list[VenueEvent]) -> None:
        """Push user-data events to every session subscribed to the event's account."""
        for account, payload in events:
            targets = self._subs.get(account)
            if not targets:
                continue
            body = orjson.dumps(payload)
            for (_conn, sub_id), sess in list(targets.items()):
                sess.push(b'{"subscriptionId":%d,"event":%s}' % (sub_id, body))
                self.counters["events_sent"] += 1

    def add_subscription(self, s: ApiSession, account: str, via_logon: bool) -> int:
        if any(acct == account for acct, _ in s.subscriptions.values()):
            raise VenueError(-2035, "User Data Stream subscription already active.")
        if len(s.subscriptions) >= _MAX_CONCURRENT_SUBS or s.subs_total >= _MAX_TOTAL_SUBS:
            raise VenueError(-2042, "Maximum subscription ID reached for this connection.")
        sub_id = s.subs_total
        s.subs_total += 1
        s.subscriptions[sub_id] = (account, via_logon)
        self._subs.setdefault(account, {})[(s.conn_id, sub_id)] = s
        return sub_id

    def drop_subscription(self, s: ApiSession, sub_id: int) -> bytes:
        account, _ = s.subscriptions.pop(sub_id)
        targets = self._subs.get(account)
        if targets is not None:
            targets.pop((s.conn_id, sub_id), None)
            if not targets:
                del self._subs[account]
        ev = {"e": "eventStreamTerminated", "E": self.clock_ms()}
        return orjson.dumps({"subscriptionId": sub_id, "event": ev})

    # ---------------------------------------------------------------- requests

    def handle(self, s: ApiSession, frame: str | bytes) -> Reply:
        """One request frame -> its :class:`Reply`. Never raises for bad input."""
        now = self.clock_ms()
        self.counters["requests"] += 1
        delay = int(getattr(self.faults, "wsapi_delay_ms", 0) or 0)
        if isinstance(frame, bytes | bytearray | memoryview):
            self.counters["bad_frames"] += 1
            self._bad_input.warning("binary_frame", "wsapi: binary frame from client")
            return self._error_reply(None, VenueError(-1100, "Binary frames are not supported."))
        try:
            req = self._parse(frame)
        except _Fail as f:
            self.counters["bad_frames"] += 1
            self._bad_input.warning("bad_request", "wsapi: malformed request frame")
            return self._error_reply(getattr(f, "rid", None), f.err)
        before: list[bytes] = []
        events: list[VenueEvent] = []
        key = req.method if req.method in WEIGHTS else "other"
        self.method_counts[key] = self.method_counts.get(key, 0) + 1
        weight = request_weight(req.method, req.params)
        # a successful order request weighs 0 (2026-04-02): admitted at 0 (refused only when
        # the IP is already over its limit or banned), charged its weight if it fails
        charge_if_failed = weight if req.method in FREE_WHEN_SUCCESSFUL else 0
        try:
            verdict, retry = self.limits.ip(s.ip).admit(now, weight - charge_if_failed,
                                                        self.limits.ban_ms)
            if verdict == "418":
                self.counters["bans"] += 1
                err = VenueError(
                    -1003,
                    f"Way too much request weight used; IP banned until {retry}. "
                    "Please use WebSocket Streams for live updates to avoid bans.",
                    status=418,
                    data={"serverTime": now, "retryAfter": retry},
                )
                return Reply(self._envelope(s, req, now, error=err), close=True)
            if verdict == "429":
                self.counters["rate_limited"] += 1
                raise _Fail(self.weight_429(s.ip, now, retry))
            status, result = self.methods.run(s, req, now, before, events)
            if status >= 400:
                self.limits.ip(s.ip).weight.add(now, charge_if_failed)
            out = self._envelope(s, req, now, result=result, status=status)
        except HostileReply as h:
            out = h.frame(req.id)
        except _Fail as f:
            self.limits.ip(s.ip).weight.add(now, charge_if_failed)
            out = self._envelope(s, req, now, error=f.err)
        except VenueError as e:
            self.limits.ip(s.ip).weight.add(now, charge_if_failed)
            out = self._envelope(s, req, now, error=e)
        except Exception:  # a simulator bug: answer like Binance's "unknown", keep serving
            log.exception("wsapi: request handler failed", extra={"method": req.method})
            self.counters["internal_errors"] += 1
            out = self._envelope(s, req, now, error=VenueError(-1000, MSG_UNKNOWN_ERR, 500))
        return Reply(out, before=before, events=events, delay_ms=delay)

    def weight_429(self, ip: str, now: int, retry: int) -> VenueError:
        return VenueError(
            -1003,
            f"Too many requests; current limit of IP({ip}) request weight per 1 MINUTE is "
            f"{self.limits.weight_per_minute}. Please use WebSocket Streams for live updates to "
            "avoid polling the API.",
            status=429,
            data={"serverTime": now, "retryAfter": retry},
        )

    def _parse(self, frame: str) -> ApiRequest:
        try:
            obj = orjson.loads(frame)
        except orjson.JSONDecodeError as exc:
            raise _Fail(VenueError(-1100, f"Invalid JSON: {exc.msg}.")) from None
        if not isinstance(obj, dict):
            raise _Fail(VenueError(-1100, "Invalid request: expected a JSON object."))
        if "id" not in obj:
            raise _Fail(missing("id"))
        rid = obj["id"]
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, int | str)):
            raise _Fail(VenueError(-1100, "Illegal characters found in parameter 'id'."))
        method = obj.get("method")
        if not isinstance(method, str) or not method:
            raise _FailWithId(rid, missing("method"))
        if method.startswith("v3/"):
            method = method[3:]
        raw = obj.get("params", {})
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise _FailWithId(rid, VenueError(-1100, "Illegal characters found in 'params'."))
        if any(isinstance(v, float) for v in raw.values()):
            # recover the exact text of JSON numbers: that text is what the client signed
            raw = json.loads(frame, parse_float=NumberText).get("params", {})
        params: dict[str, str] = {}
        for k, v in raw.items():
            try:
                params[k] = param_text(v)
            except TypeError:
                raise _FailWithId(
                    rid, VenueError(-1100, f"Illegal characters found in parameter '{k}'.")
                ) from None
        return ApiRequest(rid, method, params)

    # ---------------------------------------------------------------- envelope

    def _rate_limits(
        self, s: ApiSession, req: ApiRequest | None, now: int, account: str | None
    ) -> list[dict[str, Any]] | None:
        flag = req.params.get("returnRateLimits") if req is not None else None
        if flag == "false" or (flag is None and not s.return_rate_limits):
            return None
        entries: list[dict[str, Any]] = []
        if req is not None and req.method in ORDER_METHODS and account is not None:
            entries.extend(self.limits.orders(account).entries(now))
        entries.append(self.limits.ip(s.ip).weight.entry(now))
        return entries

    def _envelope(
        self,
        s: ApiSession,
        req: ApiRequest,
        now: int,
        *,
        result: Any = None,
        error: VenueError | None = None,
        status: int = 200,
    ) -> bytes:
        out: dict[str, Any] = {"id": req.id}
        if error is not None:
            out["status"] = error.status
            out["error"] = error.error_obj()
            self.errors_by_code[error.code] = self.errors_by_code.get(error.code, 0) + 1
        else:
            out["status"] = status
            out["result"] = result
        limits = self._rate_limits(s, req, now, req.account)
        if self.take_hostile(("rate_limits_overflow",)):
            limits = [dict(e) for e in (limits or [self.limits.ip(s.ip).weight.entry(now)])]
            limits[-1]["count"] = 2**63  # still a u64: orjson writes it
        if limits is not None:
            out["rateLimits"] = limits
        return orjson.dumps(out)

    def _error_reply(self, rid: Any, err: VenueError) -> Reply:
        self.errors_by_code[err.code] = self.errors_by_code.get(err.code, 0) + 1
        return Reply(orjson.dumps({"id": rid, "status": err.status, "error": err.error_obj()}))

    def fault_fired(self, name: str) -> None:
        self.counters["faults_fired"] += 1
        count = getattr(self.faults, "count", None)
        if callable(count):
            count(name)

    def take_hostile(self, kinds: tuple[str, ...]) -> str | None:
        """The pending ``hostile_reply`` kind if it is one of ``kinds`` (consumes one)."""
        kind = getattr(self.faults, "hostile_reply", None)
        if kind in kinds and getattr(self.faults, "hostile_reply_count", 0) > 0:
            self.faults.hostile_reply_count -= 1
            if self.faults.hostile_reply_count == 0:
                self.faults.hostile_reply = None
            self.fault_fired("hostile_reply")
            return str(kind)
        return None

    def take_order_fault(self) -> str | None:
        kind = getattr(self.faults, "order_fault", None)
        if kind and getattr(self.faults, "order_fault_count", 0) > 0:
            self.faults.order_fault_count -= 1
            self.fault_fired("order_fault")
            return str(kind)
        return None

class _FailWithId(_Fail):
    def __init__(self, rid: Any, err: VenueError) -> None:
        super().__init__(err)
        self.rid = rid


# --------------------------------------------------------------------------------------------
# the asyncio shell


async def serve_connection(service: WsApiService, conn: Any) -> None:
    """Run one WS API connection (a ``websockets.asyncio.server.ServerConnection``) until it
    closes: read text frames, answer them, and push user-data events for its subscriptions."""
    remote = getattr(conn, "remote_address", None)
    ip = str(remote[0]) if remote else "?"
    request = getattr(conn, "request", None)
    path = getattr(request, "path", "/ws-api/v3") or "/ws-api/v3"
    session = service.open_session(ip, path)
    queue: asyncio.Queue[bytes | int] = asyncio.Queue()

    def push(frame: bytes) -> None:
        # A client that stops reading must not grow the server without bound: disconnect it.
        if queue.qsize() >= MAX_PENDING_FRAMES:
            if not session.closed:
                session.closed = True
                service.counters["slow_consumers"] = service.counters.get("slow_consumers", 0) + 1
                _slow_log.warning("slow_consumer", "wsapi: client not reading, disconnecting")
                queue.put_nowait(1008)
            return
        queue.put_nowait(frame)

    session.push = push
    loop = asyncio.get_running_loop()
    writer = asyncio.create_task(_writer(conn, queue), name=f"wsapi-writer-{session.conn_id}")
    try:
        async for message in conn:
            reply = service.handle(session, message)
            for frame in reply.before:
                queue.put_nowait(frame)
            if reply.close:
                service.dispatch(reply.events)
                queue.put_nowait(reply.frame)
                queue.put_nowait(1008)  # banned: answer, then disconnect (section 2.5)
                break
            if reply.delay_ms > 0:
                loop.call_later(reply.delay_ms / 1000, _push_if_open, session, reply.frame)
                service.dispatch(reply.events)
            else:
                queue.put_nowait(reply.frame)
                service.dispatch(reply.events)
            if writer.done():
                break
    except Exception as exc:  # connection errors end the connection, never the server
        if not _is_closed(exc):
            log.warning(
                "wsapi: connection error", extra={"conn": session.conn_id, "err": repr(exc)}
            )
    finally:
        service.close_session(session)
        session.push = _discard
        if not writer.done():
            queue.put_nowait(1000)
            try:
                await writer
            except asyncio.CancelledError:
                raise
            except Exception:  # already logged by _writer
                pass


def _discard(frame: bytes) -> None:
    """Frames for a closed session (e.g. a delayed response) go nowhere."""


def _push_if_open(session: ApiSession, frame: bytes) -> None:
    if not session.closed:
        session.push(frame)


def _is_closed(exc: BaseException) -> bool:
    try:
        from websockets.exceptions import ConnectionClosed
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, ConnectionClosed)


async def _writer(conn: Any, queue: asyncio.Queue[bytes | int]) -> None:
    """The only task that sends on ``conn``: keeps response/event order; an int is a close code."""
    try:
        while True:
            frame = await queue.get()
            if isinstance(frame, int):
                await conn.close(frame)
                return
            await conn.send(frame, text=True)
    except Exception as exc:
        if not _is_closed(exc):
            log.warning("wsapi: send failed", extra={"err": repr(exc)})
