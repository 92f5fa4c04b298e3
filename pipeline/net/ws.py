"""Thin WebSocket client shell: one interface, two implementations (picows, websockets).

Why two: ``picows`` (Cython) costs ~0.75 us of CPU per message against ~8 us for ``websockets``;
``websockets`` is the pure-Python reference we fall back to (``--transport websockets``) if picows
misbehaves somewhere. Both are driven the same way and the same tests run against both
(tests/test_net_ws.py).

Calling contract::

    ws = await connect(url, on_message, transport="picows", ping_interval=20, ping_timeout=20)
    # on_message(payload: bytes, recv_time_ns: int) is called synchronously, once per complete
    # text/binary message, in arrival order, on the event loop. It must not block and should not
    # raise (an exception is logged, counted in ws.callback_errors, and the connection stays up).
    ws.send_text('{"method":"SUBSCRIBE",...}')
    ws.send_text_bytes(b'{...}')   # the same, already UTF-8 encoded (no copy to encode)
    ws.ping()                      # own ping; pongs update ws.last_pong_ns and call ws.on_pong
    ws.write_buffer_size()         # bytes accepted but not yet handed to the kernel
    ws.abort()                     # drop the TCP connection now (no closing handshake)
    info = await ws.wait_closed()  # CloseInfo(code, reason, error): who closed and why
    await ws.close(1000, "bye")    # idempotent

Or, without a callback, ``async for payload in ws`` yields message bytes (tests, tools).

Liveness: server pings are answered by the library; our own keep-alive pings go out every
``ping_interval`` s of silence and a missing pong within ``ping_timeout`` s closes the connection
(picows auto-ping / websockets keepalive). Data-level stalls (pongs but no data) are the caller's
job (the ingest watchdog). ``wss://`` URLs use ``ssl_context`` (default: system trust store).
``ping_interval=0`` turns our keep-alive off for a caller that runs its own (the trading
session times its pings itself and hears of pongs through ``on_pong``).

Logging: neither library may log frames: the trading session's ``session.logon`` carries a
signature. Both libraries' loggers for our connections are pinned at INFO.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from pipeline.logs import RateLimitedLog

log = logging.getLogger("pipeline.net.ws")
_rlog = RateLimitedLog(log)
# The libraries' own loggers for our connections: pinned at INFO so no log level can make them
# print frames (websockets logs every frame at DEBUG, a signed session.logon included).
_PICOWS_LOGGER = "pipeline.net.picows"
_websockets_log = logging.getLogger("pipeline.net.websockets")
_websockets_log.setLevel(logging.INFO)
logging.getLogger(_PICOWS_LOGGER).setLevel(logging.INFO)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")

OnMessage = Callable[[bytes, int], None]
TRANSPORTS = ("picows", "websockets")


class WsConnectError(Exception):
    """The connection could not be opened (refused, handshake rejected, timeout).

    ``status``: the HTTP status the server answered the handshake with instead of 101, None
    when there was no answer (refused, timeout, TLS). Callers tell a venue that does not know
    the URL (4xx: a configuration error, retrying will not help) from one that is busy (429,
    418 ban, 5xx) or unreachable."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class CloseInfo:
    """How a connection ended. ``code``/``reason``: the close frame the peer sent (None if it
    sent none, e.g. the TCP connection dropped). ``error``: a local reason (ping timeout,
    protocol error, frame too big), None for a clean close."""

    code: int | None
    reason: str
    error: str | None = None
    by_us: bool = False


class WsClient:
    """Interface both implementations provide (see the module docstring)."""

    transport_name = ""

    def __init__(self, url: str, on_message: OnMessage | None) -> None:
        self.url = url
        self.last_pong_ns = 0
        self.callback_errors = 0
        self.on_pong: Callable[[], None] | None = None  # called on every pong to our pings
        self._queue: asyncio.Queue[bytes | None] | None = None
        if on_message is None:
            self._queue = asyncio.Queue()
            q = self._queue
            on_message = lambda payload, _t: q.put_nowait(payload)  # noqa: E731
        self._on_message: OnMessage = on_message
        self._closed: asyncio.Future[CloseInfo] = asyncio.get_running_loop().create_future()
        self._closing_by_us = False

    # --- to implement ---
    def send_text(self, text: str) -> None:
        raise NotImplementedError

    def send_text_bytes(self, data: bytes) -> None:
        """Send ``data`` (valid UTF-8) as one text frame: for callers that encode themselves."""
        raise NotImplementedError

    def write_buffer_size(self) -> int:
        """Bytes accepted by :meth:`send_text` but not yet written to the socket: a peer that
        stops reading shows here first (the caller's backpressure signal)."""
        raise NotImplementedError

    def abort(self) -> None:
        """Drop the TCP connection now, no closing handshake (a black-holed peer would never
        finish one). :meth:`wait_closed` then reports it."""
        self._closing_by_us = True
        with contextlib.suppress(Exception):
            self._abort()

    def ping(self, payload: bytes = b"") -> None:
        raise NotImplementedError

    def _send_close(self, code: int, reason: str) -> None:
        """Start the closing handshake (send our close frame)."""
        raise NotImplementedError

    def _abort(self) -> None:
        """Drop the TCP connection now."""
        raise NotImplementedError

    # --- shared ---
    @property
    def closed(self) -> bool:
        return self._closed.done()

    @property
    def close_info(self) -> CloseInfo | None:
        """How it ended, once it has (else None)."""
        return self._closed.result() if self._closed.done() else None

    async def close(self, code: int = 1000, reason: str = "", grace_s: float = 1.0) -> CloseInfo:
        """Close (idempotent): send our close frame, give the peer ``grace_s`` s to answer, then
        drop the TCP connection. Returns how it ended. Never hangs on an unresponsive peer."""
        if not self._closed.done():
            self._closing_by_us = True
            try:
                self._send_close(code, reason)
            except Exception as exc:  # already broken: just drop it
                log.debug("send_close failed", extra={"error": repr(exc)})
            try:
                await asyncio.wait_for(asyncio.shield(self._closed), grace_s)
            except TimeoutError:
                self._abort()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._closed), 1.0)
                self._finish(CloseInfo(None, "", "no close reply; aborted", True))
        return await self.wait_closed()

    async def wait_closed(self) -> CloseInfo:
        return await asyncio.shield(self._closed)

    def _finish(self, info: CloseInfo) -> None:
        if not self._closed.done():
            self._closed.set_result(info)
        if self._queue is not None:
            self._queue.put_nowait(None)

    def _pong(self) -> None:
        self.last_pong_ns = time.time_ns()
        on_pong = self.on_pong
        if on_pong is not None:
            try:
                on_pong()
            except Exception as exc:
                self._callback_failed(exc)

    def _callback_failed(self, exc: Exception) -> None:
        """The message handler raised: count and log; the connection stays up."""
        self.callback_errors += 1
        _rlog.warning("ws_callback_error", "message handler raised", error=repr(exc))

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        if self._queue is None:
            raise RuntimeError("connect(..., on_message=None) to iterate over messages")
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item


def default_ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context()


async def connect(
    url: str,
    on_message: OnMessage | None = None,
    *,
    transport: str = "picows",
    ssl_context: ssl.SSLContext | None = None,
    ping_interval: float = 20.0,
    ping_timeout: float = 20.0,
    max_frame_size: int = 16 << 20,
    handshake_timeout: float = 10.0,
    headers: dict[str, str] | None = None,
) -> WsClient:
    """Open a WebSocket connection with the chosen implementation. Raises
    :class:`WsConnectError` if it cannot be opened. ``headers``: extra handshake headers
    (``X-MBX-APIKEY`` for SBE market data)."""
    if not url.startswith(("ws://", "wss://")):
        raise ValueError(f"websocket URL must start with ws:// or wss://, got {url!r}")
    if url.startswith("wss://") and ssl_context is None:
        ssl_context = default_ssl_context()
    if transport == "picows":
        return await _PicowsClient.open(url, on_message, ssl_context, ping_interval, ping_timeout,
                                        max_frame_size, handshake_timeout, headers)
    if transport == "websockets":
        return await _WebsocketsClient.open(url, on_message, ssl_context, ping_interval,
                                            ping_timeout, max_frame_size, handshake_timeout,
                                            headers)
    raise ValueError(f"unknown transport {transport!r}; choose one of {TRANSPORTS}")


# --- picows ---------------------------------------------------------------------------------


_PICOWS_TEXT: Any = None  # picows.WSMsgType.TEXT once picows is imported (it is optional)


def _code(c: Any) -> int:
    return int(getattr(c, "value", c))


class _PicowsClient(WsClient):
    transport_name = "picows"
    _transport: Any

    @classmethod
    async def open(cls, url: str, on_message: OnMessage | None, ssl_context: ssl.SSLContext | None,
                   ping_interval: float, ping_timeout: float, max_frame_size: int,
                   handshake_timeout: float,
                   headers: dict[str, str] | None = None) -> _PicowsClient:
        import picows

        global _PICOWS_TEXT
        _PICOWS_TEXT = picows.WSMsgType.TEXT
        self = cls(url, on_message)
        cb = self._on_message  # called straight from the frame callback: no extra layer
        failed = self._callback_failed
        time_ns = time.time_ns
        TEXT, BINARY, CONT = picows.WSMsgType.TEXT, picows.WSMsgType.BINARY, \
            picows.WSMsgType.CONTINUATION
        CLOSE, PONG = picows.WSMsgType.CLOSE, picows.WSMsgType.PONG
        client = self

        class Listener(picows.WSListener):
            frag: bytearray | None = None

            def on_ws_frame(self, transport: Any, frame: Any) -> None:
                t = frame.msg_type
                if t is TEXT or t is BINARY:
                    if frame.fin:
                        try:
                            cb(frame.get_payload_as_bytes(), time_ns())
                        except Exception as exc:
                            failed(exc)
                    else:
                        self.frag = bytearray(frame.get_payload_as_memoryview())
                elif t is CONT:
                    if self.frag is None:
                        return
                    self.frag += frame.get_payload_as_memoryview()
                    if frame.fin:
                        data, self.frag = bytes(self.frag), None
                        try:
                            cb(data, time_ns())
                        except Exception as exc:
                            failed(exc)
                elif t is PONG:
                    client._pong()
                elif t is CLOSE:
                    # answer the peer's close and drop the socket (picows leaves this to us)
                    if not transport.is_close_frame_sent:
                        transport.send_close(frame.get_close_code(), frame.get_close_message())
                    transport.disconnect()

            def on_ws_disconnected(self, transport: Any) -> None:
                client._on_disconnected(transport)

        try:
            self._transport, _ = await picows.ws_connect(
                Listener, url, ssl_context=ssl_context,
                websocket_handshake_timeout=handshake_timeout,
                enable_auto_ping=ping_interval > 0,
                auto_ping_idle_timeout=max(ping_interval, 0.01),
                # picows requires reply timeout <= idle timeout
                auto_ping_reply_timeout=min(ping_timeout, max(ping_interval, 0.01)),
                enable_auto_pong=True, max_frame_size=max_frame_size,
                logger_name=_PICOWS_LOGGER, extra_headers=headers,
            )
        except (TimeoutError, OSError, picows.WSError) as exc:
            response = getattr(exc, "response", None)  # WSHandshakeError: the HTTP answer
            status = getattr(response, "status", None)
            raise WsConnectError(f"{url}: {exc!r}",
                                 None if status is None else int(status)) from exc
        return self

    def _on_disconnected(self, transport: Any) -> None:
        hs = transport.close_handshake
        recv = hs.recv if hs is not None else None
        sent = hs.sent if hs is not None else None
        error = None
        if sent is not None and not self._closing_by_us and not hs.recv_then_sent:
            error = f"{_code(sent.code)} {sent.reason or ''}".strip()  # local failure
        elif recv is None and not self._closing_by_us:
            error = "connection lost"
        self._finish(CloseInfo(_code(recv.code) if recv is not None else None,
                               (recv.reason or "") if recv is not None else "",
                               error, self._closing_by_us))

    def send_text(self, text: str) -> None:
        self._transport.send(_PICOWS_TEXT, text.encode())

    def send_text_bytes(self, data: bytes) -> None:
        self._transport.send(_PICOWS_TEXT, data)

    def write_buffer_size(self) -> int:
        size: int = self._transport.underlying_transport.get_write_buffer_size()
        return size

    def ping(self, payload: bytes = b"") -> None:
        self._transport.send_ping(payload)

    def _send_close(self, code: int, reason: str) -> None:
        import picows

        tr = self._transport
        if tr.is_close_frame_sent:
            return
        try:
            close_code = picows.WSCloseCode(code)
        except ValueError:  # a code outside picows' enum
            close_code = picows.WSCloseCode.OK
        tr.send_close(close_code, reason.encode())

    def _abort(self) -> None:
        self._transport.disconnect(graceful=False)


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or ""


# --- websockets -----------------------------------------------------------------------------


class _WebsocketsClient(WsClient):
    transport_name = "websockets"
    _ws: Any
    _reader: asyncio.Task[None]
    _bg: set[asyncio.Task[Any]]

    @classmethod
    async def open(cls, url: str, on_message: OnMessage | None, ssl_context: ssl.SSLContext | None,
                   ping_interval: float, ping_timeout: float, max_frame_size: int,
                   handshake_timeout: float,
                   headers: dict[str, str] | None = None) -> _WebsocketsClient:
        from websockets.asyncio.client import connect as ws_connect
        from websockets.exceptions import InvalidHandshake, InvalidURI

        self = cls(url, on_message)
        self._bg = set()
        # a loopback URL never goes through a proxy named in the environment
        local: dict[str, Any] = {"proxy": None} if _host(url) in _LOOPBACK else {}
        try:
            self._ws = await ws_connect(
                url, ssl=ssl_context, ping_interval=ping_interval or None,
                ping_timeout=ping_timeout or None, max_size=max_frame_size,
                open_timeout=handshake_timeout, compression=None, max_queue=4096,
                close_timeout=1.0, logger=_websockets_log, additional_headers=headers,
                **local,
            )
        except (TimeoutError, OSError, InvalidHandshake, InvalidURI) as exc:
            response = getattr(exc, "response", None)  # InvalidStatus: the HTTP answer
            status = getattr(response, "status_code", None)
            raise WsConnectError(f"{url}: {exc!r}",
                                 None if status is None else int(status)) from exc
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        ws = self._ws
        cb = self._on_message
        time_ns = time.time_ns
        error: str | None = None
        rcvd = None
        try:
            while True:
                msg = await ws.recv(decode=False)
                try:
                    cb(msg, time_ns())
                except Exception as exc:
                    self._callback_failed(exc)
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            if rcvd is None and not self._closing_by_us:
                sent = exc.sent
                error = f"{sent.code} {sent.reason}".strip() if sent else "connection lost"
        except Exception as exc:
            error = repr(exc)
        self._finish(CloseInfo(rcvd.code if rcvd is not None else None,
                               rcvd.reason if rcvd is not None else "", error,
                               self._closing_by_us))

    def send_text(self, text: str) -> None:
        # websockets' send() is a coroutine; a text frame is written without waiting for drain
        asyncio.get_running_loop().create_task(self._send(text))

    def send_text_bytes(self, data: bytes) -> None:
        asyncio.get_running_loop().create_task(self._send(data))

    async def _send(self, text: str | bytes, *, text_frame: bool = True) -> None:
        with contextlib.suppress(Exception):
            await self._ws.send(text, text=text_frame)

    def write_buffer_size(self) -> int:
        size: int = self._ws.transport.get_write_buffer_size()
        return size

    def ping(self, payload: bytes = b"") -> None:
        asyncio.get_running_loop().create_task(self._ping(payload))

    async def _ping(self, payload: bytes) -> None:
        try:
            waiter = await self._ws.ping(payload)
            await waiter
        except Exception:
            return
        self._pong()

    def _send_close(self, code: int, reason: str) -> None:
        # websockets' close() runs the handshake (and aborts after close_timeout) in a task
        task = asyncio.get_running_loop().create_task(self._ws.close(code, reason))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _abort(self) -> None:
        self._ws.transport.abort()
