"""A small async REST getter: HTTP/1.1 GET over asyncio streams (TLS for https://), JSON body.

Why not a library: the ingest process makes a handful of REST calls (depth snapshots, aggTrade
backfill) and must never block its event loop; aiohttp is not a dependency and urllib would need
a thread (not cancellable on shutdown). One request per connection (``Connection: close``) keeps
this tiny; the calls are rare enough that connection reuse does not matter.

Calling contract: ``status, body = await get_json(base_url, path, params, timeout_s=5)``. It raises
:class:`HttpError` for transport failures, timeouts, non-2xx answers (with ``status`` and the
first bytes of the body, e.g. a Binance ``{"code":-1121,"msg":...}``) and non-JSON bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any
from urllib.parse import urlencode, urlsplit

import orjson

MAX_BODY = 64 << 20  # a 5000-level depth snapshot is ~250 KB; anything near this is wrong


class HttpError(Exception):
    """A REST call failed. ``status`` is the HTTP status, or 0 when there was no answer."""

    def __init__(self, message: str, status: int = 0, body: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


_default_ctx: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _default_ctx
    if _default_ctx is None:
        _default_ctx = ssl.create_default_context()
    return _default_ctx


async def get_json(base_url: str, path: str, params: dict[str, Any] | None = None, *,
                   timeout_s: float = 5.0, ssl_context: ssl.SSLContext | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """GET ``base_url + path?params`` and decode the JSON body. See the module docstring."""
    url = base_url.rstrip("/") + path + (f"?{urlencode(params)}" if params else "")
    try:
        status, body = await asyncio.wait_for(_get(url, ssl_context, headers or {}), timeout_s)
    except TimeoutError:
        raise HttpError(f"GET {url}: timed out after {timeout_s} s") from None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        # LimitOverrunError: a header line longer than the 1 MiB stream limit. Whatever bytes
        # the server sends, the caller sees an HttpError it retries, never an exception that
        # would end its (long-lived) task
        raise HttpError(f"GET {url}: {exc!r}") from exc
    if not 200 <= status < 300:
        raise HttpError(f"GET {url}: HTTP {status} {body[:200]!r}", status, body[:1000])
    try:
        return status, orjson.loads(body)
    except orjson.JSONDecodeError:
        raise HttpError(f"GET {url}: body is not JSON: {body[:100]!r}", status, body[:1000]) \
            from None


async def _get(url: str, ssl_context: ssl.SSLContext | None,
               headers: dict[str, str]) -> tuple[int, bytes]:
    u = urlsplit(url)
    if u.scheme not in ("http", "https"):
        raise ValueError(f"REST URL must be http:// or https://, got {url!r}")
    secure = u.scheme == "https"
    host = u.hostname or ""
    port = u.port or (443 if secure else 80)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    reader, writer = await asyncio.open_connection(
        host, port, ssl=(ssl_context or _ssl_context()) if secure else None,
        server_hostname=host if secure else None, limit=1 << 20)
    try:
        lines = [f"GET {target} HTTP/1.1", f"Host: {u.netloc}", "Connection: close",
                 "Accept: application/json", "User-Agent: pipeline-ingest"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise ValueError(f"bad status line {status_line!r}")
        status = int(parts[1])
        hdrs: dict[str, str] = {}
        for h in header_lines:
            if h:
                k, _, v = h.partition(":")
                hdrs[k.strip().lower()] = v.strip()
        if "chunked" in hdrs.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        elif "content-length" in hdrs:
            n = int(hdrs["content-length"])
            if n > MAX_BODY:
                raise ValueError(f"body of {n} bytes is too large")
            body = await reader.readexactly(n)
        else:
            body = await reader.read(MAX_BODY)
        return status, body
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # trailer end (no trailers expected)
            return bytes(out)
        if len(out) + size > MAX_BODY:
            raise ValueError("chunked body too large")
        out += await reader.readexactly(size)
        await reader.readexactly(2)
