"""Run the simulator from tests: in-process (async) or as a real subprocess (sync).

In-process::

    async with SimServer(SimConfig(symbols=["BTCUSDT"], rate=200)) as sim:
        async with websockets.connect(sim.streams_url + "/ws/btcusdt@trade") as ws: ...
        await sim.set_fault("stall", duration=1)      # same as POST /sim/fault/stall

Subprocess (other helpers' integration tests)::

    with run_sim_process("--symbols", "BTCUSDT", "--rate", "100") as sim:
        sim.streams_url, sim.rest_url, sim.wsapi_url, sim.port
        sim.fault("drop")                                # POST /sim/fault/drop
        sim.state()                                      # GET /sim/state

Both clean up on exit (server closed; subprocess SIGTERM, then killed after a timeout).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from pipeline.sim.faults import Faults, parse_fault
from pipeline.sim.market import Market
from pipeline.sim.server import SimConfig, Simulator


class SimServer:
    """Async context manager around an in-process :class:`Simulator` on 127.0.0.1."""

    def __init__(self, config: SimConfig | None = None, **overrides: Any) -> None:
        cfg = config or SimConfig()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"SimConfig has no field {k!r}")
            setattr(cfg, k, v)
        self.sim = Simulator(cfg)

    async def __aenter__(self) -> SimServer:
        await self.sim.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.sim.stop()

    @property
    def port(self) -> int:
        return self.sim.port

    @property
    def streams_url(self) -> str:
        return self.sim.urls["streams"]

    @property
    def rest_url(self) -> str:
        return self.sim.urls["rest"]

    @property
    def wsapi_url(self) -> str:
        return self.sim.urls["wsapi"]

    @property
    def sbe_url(self) -> str:
        return self.sim.urls["sbe"]

    @property
    def admin_url(self) -> str:
        return self.sim.urls["admin"]

    @property
    def faults(self) -> Faults:
        return self.sim.faults

    @property
    def market(self) -> Market:
        return self.sim.market

    async def set_fault(self, name: str, **params: Any) -> None:
        """Apply a fault directly (same validation as POST /sim/fault/<name>)."""
        self.sim.fault(parse_fault(name, params))

    def state(self) -> dict[str, Any]:
        return self.sim.state()


async def http_request(
    url: str, method: str = "GET", body: bytes | None = None, deadline_s: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """Minimal async HTTP/1.1 client (Connection: close) for tests: (status, headers, body)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    path = u.path + (f"?{u.query}" if u.query else "")

    async def go() -> tuple[int, dict[str, str], bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
            if body is not None:
                lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
        head, _, payload = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for h in header_lines:
            k, _, v = h.partition(":")
            headers[k.strip().lower()] = v.strip()
        return status, headers, payload

    return await asyncio.wait_for(go(), deadline_s)


async def http_json(url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    raw = None if body is None else json.dumps(body).encode()
    status, _h, payload = await http_request(url, method, raw)
    return status, json.loads(payload) if payload else None


class SimProcess:
    """A running ``python -m pipeline sim`` subprocess (see :func:`run_sim_process`)."""

    def __init__(self, proc: subprocess.Popen[bytes], urls: dict[str, str], log_path: str):
        self.proc = proc
        self.urls = urls
        self.log_path = log_path
        self.streams_url = urls["streams"]
        self.rest_url = urls["rest"]
        self.wsapi_url = urls["wsapi"]
        self.admin_url = urls["admin"]
        self.sbe_url = urls.get("sbe", "")  # the SBE market-data endpoint (its own port)
        self.port = int(self.rest_url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fault(self, name: str, **params: Any) -> dict[str, Any]:
        """POST /sim/fault/<name> with a JSON body; raises RuntimeError on a 4xx answer."""
        req = urllib.request.Request(
            f"{self.admin_url}/fault/{name}",
            data=json.dumps(params).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return dict(json.loads(resp.read()))
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"fault {name} rejected: {exc.read().decode()}") from None

    def inject(self, **spec: Any) -> dict[str, Any]:
        """POST /sim/inject (hand-made frames into live streams, :meth:`Admin.inject`), e.g.
        ``sim.inject(target="sbe", hex=frame.hex())``; raises RuntimeError on a 4xx answer."""
        req = urllib.request.Request(
            f"{self.admin_url}/inject", data=json.dumps(spec).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return dict(json.loads(resp.read()))
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"inject rejected: {exc.read().decode()}") from None

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.admin_url}/state", timeout=5) as resp:
            return dict(json.loads(resp.read()))

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 5.0) -> int:
        stop_process(self.proc, timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int:
    """SIGTERM, up to ``timeout`` s for a clean exit, then SIGKILL. Returns the exit code
    (``-signal.SIGKILL`` if it had to be killed). Tests and benchmarks stop every child this
    way, so none outlives them and a clean shutdown is tried first."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextmanager
def run_sim_process(*args: str, startup_timeout: float = 15.0) -> Iterator[SimProcess]:
    """Start ``python -m pipeline sim --port 0 *args`` and yield it once it prints its URLs.

    stderr (logs) goes to a temporary file (``sim.log_text()``), removed on exit.
    """
    fd, log_path = tempfile.mkstemp(prefix="pipeline-sim-", suffix=".log")
    cmd = [sys.executable, "-m", "pipeline", "sim", "--port", "0", *args]
    env = dict(os.environ)
    env.setdefault("PIPELINE_LOG_FORMAT", "text")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=fd, env=env)
    os.close(fd)
    sim: SimProcess | None = None
    try:
        line = _readline_with_timeout(proc, startup_timeout)
        if not line:
            proc.kill()
            proc.wait()
            with open(log_path, encoding="utf-8", errors="replace") as f:
                raise RuntimeError(f"simulator did not start: {cmd}\n{f.read()[-4000:]}")
        sim = SimProcess(proc, json.loads(line), log_path)
        yield sim
    finally:
        if sim is not None:
            sim.stop()
        elif proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None and not proc.stdout.closed:
            proc.stdout.close()
        os.unlink(log_path)


def _readline_with_timeout(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    out: list[bytes] = []
    assert proc.stdout is not None
    stdout = proc.stdout

    def read() -> None:
        out.append(stdout.readline())

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():  # kill unblocks the reader
        proc.kill()
        t.join(5)
        return b""
    return out[0] if out else b""


class RawWs:
    """A deliberately dumb WebSocket client over asyncio streams, for tests and benchmarks.

    It never answers pings by itself (so tests can play a client that ignores them), reads
    frames as (opcode, payload) and writes masked frames. Not for production use.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, url: str) -> RawWs:
        import base64
        from urllib.parse import urlsplit

        u = urlsplit(url)
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        key = base64.b64encode(os.urandom(16)).decode()
        path = u.path + (f"?{u.query}" if u.query else "")
        writer.write(
            (
                f"GET {path or '/'} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            writer.close()
            raise ConnectionError(f"handshake refused with HTTP {status}")
        return cls(reader, writer)

    async def read_frame(self) -> tuple[int, bytes]:
        """Next frame as (opcode, payload); raises asyncio.IncompleteReadError on EOF."""
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        if b1 & 0x80:
            await self.reader.readexactly(4)  # servers must not mask; tolerate anyway
        return b0 & 0x0F, await self.reader.readexactly(n)

    def send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass
