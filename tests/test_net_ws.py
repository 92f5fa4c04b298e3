"""Both websocket transports against a real server on 127.0.0.1 port 0: messages, fragments,
pings both ways, close codes, handshake failures, reconnect."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from pipeline.net import ws as wsmod

Handler = Callable[[ServerConnection], Awaitable[None]]


async def with_server(handler: Handler, body: Callable[[str], Awaitable[Any]]) -> Any:
    async with serve(handler, "127.0.0.1", 0, ping_interval=None, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        return await body(f"ws://127.0.0.1:{port}/stream")


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


@pytest.fixture(params=wsmod.TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_messages_in_order_with_fragments_and_echo(transport: str) -> None:
    async def handler(conn: ServerConnection) -> None:
        for i in range(50):
            await conn.send(f'{{"n":{i}}}')
        await conn.send(["frag", "mented", "!"])  # one message in three frames
        await conn.send(b"\x00binary")
        msg = await conn.recv()
        await conn.send(f"echo:{msg}")
        await conn.wait_closed()

    async def body(url: str) -> None:
        got: list[tuple[bytes, int]] = []
        done = asyncio.Event()

        def on_message(payload: bytes, t: int) -> None:
            got.append((payload, t))
            if payload.startswith(b"echo:"):
                done.set()

        c = await wsmod.connect(url, on_message, transport=transport)
        c.send_text('{"method":"SUBSCRIBE"}')
        await asyncio.wait_for(done.wait(), 10)
        payloads = [p for p, _ in got]
        assert payloads[:50] == [f'{{"n":{i}}}'.encode() for i in range(50)]
        assert payloads[50] == b"fragmented!"
        assert payloads[51] == b"\x00binary"
        assert payloads[52] == b'echo:{"method":"SUBSCRIBE"}'
        assert all(t > 0 for _, t in got)
        assert len(got) == 53
        info = await c.close()
        assert info.by_us
        assert info.error is None
        assert c.closed

    run(with_server(handler, body))


def test_server_ping_is_answered_and_own_ping_gets_pong(transport: str) -> None:
    async def handler(conn: ServerConnection) -> None:
        waiter = await conn.ping(b"srv")
        await asyncio.wait_for(waiter, 5)  # raises if the client never answers
        await conn.send("pong-ok")
        await conn.wait_closed()

    async def body(url: str) -> None:
        c = await wsmod.connect(url, transport=transport, ping_interval=0)
        it = aiter(c)
        assert await anext(it) == b"pong-ok"
        c.ping(b"cli")
        for _ in range(200):
            if c.last_pong_ns:
                break
            await asyncio.sleep(0.01)
        assert c.last_pong_ns > 0
        await c.close()

    run(with_server(handler, body))


def test_server_close_code_and_reason_are_surfaced(transport: str) -> None:
    async def handler(conn: ServerConnection) -> None:
        await conn.send("hi")
        await conn.close(4001, "rotate now")

    async def body(url: str) -> None:
        got: list[bytes] = []
        c = await wsmod.connect(url, lambda p, _t: got.append(p), transport=transport)
        info = await asyncio.wait_for(c.wait_closed(), 10)
        assert info.code == 4001
        assert info.reason == "rotate now"
        assert not info.by_us
        assert info.error is None
        assert got == [b"hi"]

    run(with_server(handler, body))


def test_dropped_tcp_connection_is_reported_as_lost(transport: str) -> None:
    async def handler(conn: ServerConnection) -> None:
        await conn.send("x")
        conn.transport.abort()  # no close frame: like a black-holed then reset peer

    async def body(url: str) -> None:
        c = await wsmod.connect(url, transport=transport)
        info = await asyncio.wait_for(c.wait_closed(), 10)
        assert info.code is None
        assert info.error is not None

    run(with_server(handler, body))


def test_unanswered_keepalive_closes_the_connection(transport: str) -> None:
    """A peer that stops reading (black hole) is detected by the client's own pings."""

    released = asyncio.Event()

    async def handler(conn: ServerConnection) -> None:
        conn.transport.pause_reading()  # never sees our pings, never answers
        await released.wait()
        conn.transport.abort()

    async def body(url: str) -> None:
        try:
            c = await wsmod.connect(url, transport=transport, ping_interval=0.2,
                                    ping_timeout=0.3)
            info = await asyncio.wait_for(c.wait_closed(), 10)
            assert info.error is not None
            assert not info.by_us
        finally:
            released.set()

    run(with_server(handler, body))


def test_close_does_not_hang_on_a_peer_that_ignores_it(transport: str) -> None:
    """A peer that keeps sending and never reads our close frame: close() aborts after grace
    instead of waiting for a reply that never comes."""
    released = asyncio.Event()

    async def handler(conn: ServerConnection) -> None:
        conn.transport.pause_reading()
        with contextlib.suppress(Exception):
            while not released.is_set():
                await conn.send('{"tick":1}')
                await asyncio.sleep(0.005)
        conn.transport.abort()

    async def body(url: str) -> None:
        flowing = asyncio.Event()
        try:
            c = await wsmod.connect(url, lambda _p, _t: flowing.set(), transport=transport)
            await flowing.wait()
            info = await asyncio.wait_for(c.close(grace_s=0.2), 10)
            assert info.by_us
            assert c.closed
        finally:
            released.set()

    run(with_server(handler, body))


def test_handshake_failures_raise_connect_error(transport: str) -> None:
    async def body() -> None:
        # nothing listening
        with pytest.raises(wsmod.WsConnectError):
            await wsmod.connect("ws://127.0.0.1:9/x", transport=transport, handshake_timeout=2)

        # an HTTP server that is not a websocket endpoint
        async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()

        srv = await asyncio.start_server(http, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            with pytest.raises(wsmod.WsConnectError):
                await wsmod.connect(f"ws://127.0.0.1:{port}/x", transport=transport,
                                    handshake_timeout=2)
        finally:
            srv.close()
            await srv.wait_closed()

    run(body())


def test_reconnect_after_close(transport: str) -> None:
    count = 0

    async def handler(conn: ServerConnection) -> None:
        nonlocal count
        count += 1
        await conn.send(f"conn{count}")
        await conn.close(1001, "going away")

    async def body(url: str) -> None:
        for i in range(1, 4):
            c = await wsmod.connect(url, transport=transport)
            assert await anext(aiter(c)) == f"conn{i}".encode()
            info = await c.wait_closed()
            assert info.code == 1001

    run(with_server(handler, body))


def test_callback_errors_are_counted_not_fatal(transport: str) -> None:
    async def handler(conn: ServerConnection) -> None:
        for i in range(3):
            await conn.send(str(i))
        await conn.wait_closed()

    async def body(url: str) -> None:
        seen: list[bytes] = []
        done = asyncio.Event()

        def on_message(payload: bytes, _t: int) -> None:
            seen.append(payload)
            if payload == b"2":
                done.set()
            if payload == b"1":
                raise RuntimeError("handler bug")

        c = await wsmod.connect(url, on_message, transport=transport)
        await asyncio.wait_for(done.wait(), 10)
        assert seen == [b"0", b"1", b"2"]
        assert c.callback_errors == 1
        assert not c.closed
        await c.close()

    run(with_server(handler, body))


def test_pre_encoded_send_pong_callback_buffer_level_and_abort(transport: str) -> None:
    """What the trading shell uses: text frames from bytes, a pong callback with keep-alive off,
    the write-buffer level, and an abort reported as closed by us."""

    async def handler(conn: ServerConnection) -> None:
        async for msg in conn:
            await conn.send(f"echo:{msg}")

    async def body(url: str) -> None:
        got: list[bytes] = []
        pongs: list[int] = []
        c = await wsmod.connect(url, lambda p, _t: got.append(p), transport=transport,
                                ping_interval=0, ping_timeout=0)  # fmt: skip
        c.on_pong = lambda: pongs.append(c.last_pong_ns)
        c.send_text_bytes('{"id":"1","price":"1.5","sym":"é"}'.encode())
        c.ping()
        for _ in range(500):
            if got and pongs:
                break
            await asyncio.sleep(0.01)
        assert got == ['echo:{"id":"1","price":"1.5","sym":"é"}'.encode()]
        assert pongs
        assert pongs[0] > 0
        assert c.write_buffer_size() == 0  # nothing backed up on an idle loopback connection
        c.abort()
        info = await asyncio.wait_for(c.wait_closed(), 5)
        assert info.by_us
        assert c.closed

    run(with_server(handler, body))


def test_bad_arguments() -> None:
    async def body() -> None:
        with pytest.raises(ValueError, match="ws:// or wss://"):
            await wsmod.connect("http://127.0.0.1/x")
        with pytest.raises(ValueError, match="unknown transport"):
            await wsmod.connect("ws://127.0.0.1/x", transport="aiohttp")

    run(body())


# --- the small REST getter (pipeline/net/http.py) -----------------------------------------------

from pipeline.net import http as httpmod  # noqa: E402


async def with_http(responses: dict[str, bytes], body: Callable[[str], Awaitable[Any]]) -> Any:
    """A raw HTTP server: path -> full response bytes (b"" = never answer)."""
    seen: list[str] = []

    async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        target = head.split(b" ")[1].decode()
        seen.append(target)
        resp = responses[target.split("?")[0]]
        if not resp:  # say nothing until the client gives up and closes
            await reader.read()
        else:
            writer.write(resp)
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    srv = await asyncio.start_server(serve_one, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        return await body(f"http://127.0.0.1:{port}"), seen
    finally:
        srv.close()
        await srv.wait_closed()


def _resp(status: str, body: bytes, chunked: bool = False) -> bytes:
    if chunked:
        mid = len(body) // 2
        parts = [body[:mid], body[mid:]]
        enc = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        return f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + enc
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def test_http_get_json_variants() -> None:
    depth = b'{"lastUpdateId":1,"bids":[["1.0","2.0"]],"asks":[]}'
    responses = {
        "/api/v3/depth": _resp("200 OK", depth),
        "/api/v3/aggTrades": _resp("200 OK", b'[{"a":1},{"a":2}]', chunked=True),
        "/bad": _resp("400 Bad Request", b'{"code":-1121,"msg":"Invalid symbol."}'),
        "/html": _resp("200 OK", b"<html>"),
        "/slow": b"",
    }

    async def body(base: str) -> None:
        status, obj = await httpmod.get_json(base, "/api/v3/depth", {"symbol": "BTCUSDT",
                                                                     "limit": 5})
        assert status == 200
        assert obj["lastUpdateId"] == 1
        _, rows = await httpmod.get_json(base, "/api/v3/aggTrades", {"fromId": 1})
        assert [r["a"] for r in rows] == [1, 2]
        with pytest.raises(httpmod.HttpError, match="HTTP 400") as ei:
            await httpmod.get_json(base, "/bad")
        assert ei.value.status == 400
        assert b"-1121" in ei.value.body
        with pytest.raises(httpmod.HttpError, match="not JSON"):
            await httpmod.get_json(base, "/html")
        with pytest.raises(httpmod.HttpError, match="timed out"):
            await httpmod.get_json(base, "/slow", timeout_s=0.2)

    _, seen = run(with_http(responses, body))
    assert seen[0] == "/api/v3/depth?symbol=BTCUSDT&limit=5"


def test_http_connection_refused_and_bad_scheme() -> None:
    async def body() -> None:
        with pytest.raises(httpmod.HttpError):
            await httpmod.get_json("http://127.0.0.1:9", "/x", timeout_s=2)
        with pytest.raises(httpmod.HttpError, match="http"):
            await httpmod.get_json("ftp://127.0.0.1", "/x")

    run(body())
