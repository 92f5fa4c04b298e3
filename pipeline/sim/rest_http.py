"""Keep-alive HTTP/1.1 for the simulator's REST: many requests on one connection.

Why: websockets (which owns the simulator's port) answers a plain HTTP request from
``process_request`` and closes the connection, so a client's keep-alive could never be tested.
A connection whose first request is a ``GET /api/...`` without ``Upgrade`` is handed over here
before websockets parses it (:meth:`pipeline.sim.connection.SimConnection.data_received`): the
transport gets a :class:`RestSession` protocol that answers request after request with the same
:class:`~pipeline.sim.rest.RestApi` (``/sim`` admin requests too), ``Connection: keep-alive``
unless the client asks to close (or speaks HTTP/1.0). ``RestApi.connections`` counts these
connections, so a test sees whether a client reused one.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.http11 import Response
from websockets.protocol import State

from pipeline.sim.rest import json_response

if TYPE_CHECKING:
    from pipeline.sim.connection import SimConnection
    from pipeline.sim.server import Simulator

MAX_HEAD = 65536
MAX_BODY = 1 << 20
IDLE_CLOSE_S = 60.0  # an idle keep-alive connection is closed (servers do; clients reconnect)

_REST_HEAD = re.compile(rb"\AGET /api/[^ ]* HTTP/1\.[01]\r\n")
_UPGRADE = re.compile(rb"(?im)^upgrade:")


def wants(head: bytes) -> bool:
    """A first request this module answers: a REST GET that is no WebSocket handshake."""
    return _REST_HEAD.match(head) is not None and _UPGRADE.search(head) is None


class _Detached:
    """What the websockets connection is left holding once its transport moved on: its
    handler ends with ``transport.abort()``, which must not reach the REST session's socket."""

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return True


def take_over(conn: SimConnection, data: bytes) -> None:
    """Move ``conn``'s transport to a new :class:`RestSession` and feed it ``data`` (every byte
    received so far); websockets' side of the connection ends quietly."""
    transport = conn.transport
    session = RestSession(conn.sim)
    transport.set_protocol(session)
    session.connection_made(transport)
    conn.transport = _Detached()  # type: ignore[assignment]
    conn.protocol.state = State.CLOSED
    if not conn.connection_lost_waiter.done():
        conn.connection_lost_waiter.set_result(None)
    session.data_received(data)


class RestSession(asyncio.Protocol):
    """One keep-alive REST connection (module docstring)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.sim.rest.connections += 1
        self.sim.rest.sessions.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.sim.rest.sessions.discard(self)
        if self.idle is not None:
            self.idle.cancel()
        self.transport = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _arm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(IDLE_CLOSE_S, self.close)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self._send(json_response(431, {"code": -1000, "msg": "Header too large."}),
                               keep=False)
                return
            head = bytes(self.buf[: end + 4])
            m = re.search(rb"(?im)^content-length:[ \t]*(\d+)[ \t]*\r\n", head)
            length = int(m.group(1)) if m else 0
            if length > MAX_BODY:
                self._send(json_response(413, {"code": -1000, "msg": "Body too large."}),
                           keep=False)
                return
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        self._arm_idle()
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._send(json_response(400, {"code": -1000, "msg": "Bad request line."}),
                       keep=False)
            return
        method, target, version = parts
        headers: dict[str, str] = {}
        for h in lines[1:]:
            if h:
                k, _, v = h.partition(":")
                headers[k.strip().lower()] = v.strip()
        keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        url = urlsplit(target)
        path = unquote(url.path)
        query = parse_qs(url.query, keep_blank_values=True)
        sim = self.sim
        sim.stats["http_requests"] += 1
        resp: Response
        if path.startswith("/sim/") or path == "/sim":
            resp = sim.admin.handle(method, path, query, body)
        elif sim.faults.refuse:
            sim.faults.count("refuse")
            resp = json_response(503, {"code": -1008, "msg": "Service unavailable (simulated)."})
            keep = False
        elif path.startswith("/api/"):
            resp = sim.rest.handle(method, path, query, headers)
        else:
            resp = json_response(404, {"code": -1000, "msg": f"Unknown path {path}"})
        self._send(resp, keep)

    def _send(self, resp: Response, keep: bool) -> None:
        t = self.transport
        if t is None:
            return
        out: list[Any] = [f"HTTP/1.1 {resp.status_code} {resp.reason_phrase}"]
        for k, v in resp.headers.raw_items():
            if k.lower() != "connection":
                out.append(f"{k}: {v}")
        out.append(f"Connection: {'keep-alive' if keep else 'close'}")
        t.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + bytes(resp.body))
        if not keep:
            t.close()
            self.transport = None
