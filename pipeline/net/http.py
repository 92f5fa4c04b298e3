"""A small async REST getter: HTTP/1.1 GET over asyncio streams (TLS for https://), JSON body.

Why not a library: ingest makes a handful of REST calls (depth snapshots, trade backfill) and
must never block its event loop; aiohttp is not a dependency and urllib would need a thread
(not cancellable on shutdown). Side by side against the simulator (issue #15,
benchmarks/bench_rest_client.py: sequential depth snapshots over 127.0.0.1) this client with
keep-alive has the same median per request as aiohttp's pooled session (278-344 us vs 339-351 us
on the shared 2-core box; p99s there are noise-bound), so a dependency would buy nothing: REST
is off the hot path, and what matters is the connection reuse (a new connection per request
doubles the median, ~760 us).

Two ways in:

- ``status, body = await get_json(base_url, path, params, timeout_s=5)``: one request on its
  own connection (``Connection: close``), for rare one-off calls.
- :class:`HttpConnection`: one keep-alive connection to one origin, reused request after
  request (a TCP+TLS handshake per request is most of a REST call's cost, and Binance counts
  connection attempts per IP). A reused connection the server closed while idle is reopened
  once and the GET sent again (GETs are idempotent); anything else is an error.

Both raise :class:`HttpError` for transport failures, timeouts and bodies that are not what
was promised. ``get_json`` also raises it for non-2xx answers (with ``status`` and the first
bytes of the body, e.g. a Binance ``{"code":-1121,"msg":...}``) and non-JSON bodies;
:class:`HttpConnection` hands every status back with the headers (a 429's ``Retry-After`` is
the caller's business).
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
        writer.write(_request_head(target, u.netloc, "close", headers))
        await writer.drain()
        status, _hdrs, body, _keep = await _read_response(reader)
        return status, body
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _request_head(target: str, netloc: str, connection: str, headers: dict[str, str]) -> bytes:
    lines = [f"GET {target} HTTP/1.1", f"Host: {netloc}", f"Connection: {connection}",
             "Accept: application/json", "User-Agent: pipeline-ingest"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes, bool]:
    """One response: (status, lower-cased headers, body, whether the connection may be
    reused). Raises ValueError / IncompleteReadError / LimitOverrunError on garbage."""
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
    keep = parts[0] == "HTTP/1.1" and "close" not in hdrs.get("connection", "").lower()
    if "chunked" in hdrs.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    elif "content-length" in hdrs:
        n = int(hdrs["content-length"])
        if not 0 <= n <= MAX_BODY:
            raise ValueError(f"body of {n} bytes is too large")
        body = await reader.readexactly(n)
    else:  # the body ends with the connection
        body = await reader.read(MAX_BODY)
        keep = False
    return status, hdrs, body, keep


class HttpConnection:
    """One HTTP/1.1 keep-alive connection to ``base_url``'s origin (module docstring).

    Not for concurrent use: one request at a time (callers serialise; ingest's
    :class:`pipeline.net.rest.RestClient` does). ``opened`` counts connections made.
    """

    def __init__(self, base_url: str, *, ssl_context: ssl.SSLContext | None = None) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"REST URL must be http:// or https://, got {base_url!r}")
        self.secure = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.secure else 80)
        self.netloc = u.netloc
        self.prefix = u.path.rstrip("/")
        self.ssl_context = ssl_context
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.opened = 0

    async def _open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(
            self.host, self.port,
            ssl=(self.ssl_context or _ssl_context()) if self.secure else None,
            server_hostname=self.host if self.secure else None, limit=1 << 20)
        self.opened += 1

    async def get(self, path: str, params: dict[str, Any] | None = None, *,
                  headers: dict[str, str] | None = None,
                  timeout_s: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        """GET ``path?params``: (status, lower-cased headers, body), any status."""
        target = self.prefix + path + (f"?{urlencode(params)}" if params else "")
        head = _request_head(target, self.netloc, "keep-alive", headers or {})
        try:
            return await asyncio.wait_for(self._exchange(head), timeout_s)
        except TimeoutError:
            await self.close()  # a late answer must not be read as the next one's
            raise HttpError(f"GET {target}: timed out after {timeout_s} s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as exc:
            await self.close()
            raise HttpError(f"GET {target}: {exc!r}") from exc

    async def _exchange(self, head: bytes) -> tuple[int, dict[str, str], bytes]:
        reused = self._writer is not None and not self._writer.is_closing()
        if not reused:
            await self._open()
        try:
            return await self._once(head)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            # the server closed the idle connection before our request reached it: nothing
            # of an answer arrived, so sending the GET again on a new connection is safe
            partial = getattr(exc, "partial", b"")
            if not reused or partial:
                raise
            await self.close()
            await self._open()
            return await self._once(head)

    async def _once(self, head: bytes) -> tuple[int, dict[str, str], bytes]:
        reader, writer = self._reader, self._writer
        assert reader is not None
        assert writer is not None
        writer.write(head)
        await writer.drain()
        status, hdrs, body, keep = await _read_response(reader)
        if not keep:
            await self.close()
        return status, hdrs, body

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
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
