"""The simulator's asyncio shell: market streams, REST, WS API and admin on ONE port.

``websockets`` (asyncio server) does the handshakes, ping/pong and closing handshakes; plain HTTP
(REST, ``/sim`` admin) is answered from ``process_request``. Market data bypasses websockets'
send path: frames are pre-encoded once per (event, wrapping) and written straight to the
connection's transport as whole frames from the single event-loop thread, so they never
interleave with the protocol's own frames (pings, pongs, close).

Speed (``--rate max``): the walk runs in batches (:meth:`pipeline.sim.market.Market.step_batch`,
numpy), each batch's frames are formatted by one ``%`` over a byte template per stream and
wrapping (:func:`batch_frames`), and all pending frames of a client leave in one
``transport.write`` per loop turn. One client subscribed to one aggTrade stream gets about
0.5-0.8 M msg/s on a small shared 2-core machine (benchmarks/bench_sim.py; ~1.3 us of
simulator CPU per message), above what a Python client ingests, so ingest benchmarks measure
the client.

A finite ``--rate`` paces the same walk in 10 ms turns (``rate_unit`` "actions": walk actions
per second per symbol; "msgs": aggTrade messages per second per symbol, exact on average). A
turn with few units due runs the per-action walk (a bookTicker after every action); from
BATCH_MIN_ACTIONS / BATCH_MIN_MSGS due it runs step_batch, so fixed rates reach the hundreds of
thousands of msgs/s too (100 k aggTrade msgs/s over 2 symbols: about a third of a core).

Paths (binance-protocol.md section 1.2):
- ``/stream?streams=a/b`` combined, ``/stream`` then SUBSCRIBE, ``/ws/<stream>[/<stream>...]`` raw,
  ``/ws`` then SUBSCRIBE; ``timeUnit=MICROSECOND`` on any of them gives that connection its ``E``
  and ``T`` fields in microseconds (the simulator's clock has millisecond steps: ms * 1000);
- ``/ws-api/v3`` -> :func:`pipeline.sim.wsapi.serve_connection` (SIM-VENUE's module);
- ``GET /api/v3/{ping,time,exchangeInfo,depth,aggTrades,ticker/bookTicker}``;
- ``GET /sim/state``, ``POST /sim/fault/<name>`` (JSON body or query parameters);
- ``POST /sim/inject``: hostile or hand-made frames into live streams (:meth:`Simulator.inject`).

Rules with tunable timings (section 1.3): server pings every ``ping_interval`` and drops a
connection without pong after ``pong_timeout``; ``serverShutdown`` ``shutdown_notice`` before
``max_lifetime`` then close; more than ``max_incoming_per_s`` incoming frames in one second
(data, ping and pong frames all count) drops a stream connection; at most ``max_streams`` streams.

Backpressure: a stream client whose transport buffer exceeds ``write_high_water`` pauses the
walk (nobody is sent more than it can take); one that stays above it for
``slow_consumer_timeout`` seconds is disconnected, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import math
import re
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import numpy.typing as npt
import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State

from pipeline.logs import RateLimitedLog
from pipeline.sim import market as mk
from pipeline.sim.faults import (
    IMMEDIATE,
    FaultError,
    FaultRequest,
    Faults,
    apply_switch,
    parse_fault,
)

log = logging.getLogger("pipeline.sim")
_rlog = RateLimitedLog(log)

DEFAULT_SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT")
STREAM_KINDS = (
    "aggTrade",
    "trade",
    "bookTicker",
    "depth",
    "depth@100ms",
    *(f"depth{n}{sfx}" for n in mk.PARTIAL_LEVELS for sfx in ("", "@100ms")),
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
# taker orders per symbol per loop turn at --rate max (Market.step_batch): big enough that
# numpy's per-call cost vanishes, small enough that one turn stays around a millisecond
MAX_BATCH = 2048
# finite --rate: from this many walk actions (``rate_unit="actions"``) or aggTrade messages
# (``"msgs"``) due for one symbol in one loop turn, the turn runs Market.step_batch instead of
# the per-action walk. One batch call costs ~0.5 ms however small; the per-action walk ~10 us
# an action (~25 us an aggTrade), so below this the walk is as cheap and keeps its finer mix
# (a bookTicker after every action, makers and takers interleaved).
BATCH_MIN_ACTIONS = 96
BATCH_MIN_MSGS = 32
# aggTrades per action of the per-action walk (Market.step), measured over long runs. A
# step_batch taker prints ~1.0 aggTrade, so a batched turn of n actions runs
# round(n * WALK_AGGS_PER_ACTION) takers: the message rate does not jump at the threshold.
WALK_AGGS_PER_ACTION = 0.36
RATE_UNITS = ("actions", "msgs")


@dataclass
class SimConfig:
    """Everything a simulator run needs; defaults are Binance's real values."""

    host: str = "127.0.0.1"
    port: int = 0
    symbols: list[str] = field(default_factory=lambda: list(DEFAULT_SYMBOLS))
    seed: int = 0
    # per second per symbol: walk actions (taker order / maker order / cancel) or, with
    # rate_unit="msgs", aggTrade messages; inf = max (as fast as clients take)
    rate: float = 20.0
    rate_unit: str = "actions"  # "actions" | "msgs"
    replay: str | None = None
    replay_speed: str = "recorded"  # "recorded" | "max"
    api_keys: dict[str, bytes] = field(default_factory=dict)
    ping_interval: float = 20.0
    pong_timeout: float = 60.0
    max_lifetime: float = 24 * 3600.0
    shutdown_notice: float = 60.0
    max_incoming_per_s: int = 5  # 0 = unlimited
    max_streams: int = 1024
    history: int = 100_000
    tick_s: float = 0.01  # generation tick in rate mode
    write_high_water: int = 1 << 20
    slow_consumer_timeout: float = 10.0
    clock_ms: Callable[[], int] | None = None  # wall clock for event times (ms)
    wsapi_options: dict[str, Any] = field(default_factory=dict)  # WsApiService **limits
    faults: Faults = field(default_factory=Faults)


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final, unmasked server frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def _json_bytes(obj: Any) -> bytes:
    return orjson.dumps(obj)


_TF = (b"false", b"true")
_POW10 = np.array([10**i for i in range(19)], np.int64)
# a batch column for _frames: the row values and the length of each formatted
_Col = tuple[list[Any], npt.NDArray[np.int64]]


def _ints(col: npt.NDArray[np.int64]) -> _Col:
    """A column of non-negative ints and the length of each in decimal."""
    return col.tolist(), np.maximum(np.searchsorted(_POW10, col, side="right"), 1)


_P10_8 = 10 ** np.arange(7, -1, -1, dtype=np.int64)


def _units(col: npt.NDArray[np.int64]) -> list[_Col]:
    """A column of 1e-8 units as the two values of a ``%d.%s`` placeholder: the whole part,
    and the 8 fraction digits rendered by numpy (``%08d`` is several times slower)."""
    whole, frac = np.divmod(col, mk.SCALE)
    digits = ((frac[:, None] // _P10_8) % 10 + 48).astype(np.uint8)
    return [_ints(whole), (digits.view("S8").ravel().tolist(), np.full(len(col), 8, np.int64))]


def _prices(col: npt.NDArray[np.int64]) -> _Col:
    """A column of 1e-8 units with few distinct values (prices) as ready 8-decimal bytes."""
    uniq, inv = np.unique(col, return_inverse=True)
    strs = np.array([mk.fmt_units(x).encode() for x in uniq.tolist()], dtype=object)
    lens = np.array([len(x) for x in strs], np.int64)
    return strs[inv].tolist(), lens[inv]


_TF_OBJ = np.array([b"false", b"true"], dtype=object)


def _bools(col: npt.NDArray[np.bool_]) -> _Col:
    idx = col.astype(np.int64)
    return _TF_OBJ[idx].tolist(), 5 - idx  # false: 5 bytes, true: 4


# every frame header for payloads shorter than 4096 bytes, indexable by a numpy length array
_HDR_OBJ = np.array(
    [ws_frame(b"\0" * n)[: -n or None] for n in range(4096)],
    dtype=object,
)


def _frames(tpl: bytes, cols: list[_Col]) -> bytes:
    """All frames ``tpl % row`` for the rows of ``cols``, headers included, as ONE bytes.

    Each column is (values, their formatted lengths). The payload lengths come from the
    columns' lengths (numpy), so the frame headers are one more %s column and a single
    ``(tpl * n) % args`` formats the whole batch in C. Only %d and %s placeholders: they are
    the fast ones (``%c`` and ``%08d`` cost several times more)."""
    n = len(cols[0][0])
    if n == 0:
        return b""
    fixed = len(tpl % tuple(c[0][0] for c in cols)) - sum(int(c[1][0]) for c in cols)
    total: npt.NDArray[np.int64] = cols[0][1] + fixed
    for c in cols[1:]:
        total = total + c[1]
    if int(total.max()) >= len(_HDR_OBJ):  # not for market data: one frame at a time
        rows = zip(*(c[0] for c in cols), strict=True)
        return b"".join(ws_frame(tpl % row) for row in rows)
    cols = [(_HDR_OBJ[total].tolist(), total), *cols]
    k = len(cols)
    args: list[Any] = [None] * (n * k)
    for i, (vals, _lens) in enumerate(cols):
        args[i::k] = vals
    return ((b"%s" + tpl) * n) % tuple(args)


def micros_payload(payload: bytes) -> bytes:
    """A payload with its ``E`` and ``T`` times in microseconds (``timeUnit=MICROSECOND``)."""
    return _TIME_FIELD.sub(rb"\1\g<2>000", payload)


_TIME_FIELD = re.compile(rb'("[ET]":)(\d+)')


def batch_frames(
    b: mk.TakerBatch, kind: str, head: bytes = b"", tail: bytes = b"", micros: bool = False
) -> tuple[bytes, int]:
    """(wire frames, count) of one kind of a TakerBatch; each payload wrapped as
    ``head + payload + tail`` (the combined-stream envelope, or nothing); ``micros``: times in
    microseconds.

    Byte templates and %-formatting of ints instead of a dict or an object per event: this is
    what lets ``--rate max`` outrun a client. The bytes equal the ``encode_*`` output framed.
    """
    now, sym = b"%d" % (b.time * 1000 if micros else b.time), b.symbol.encode()
    if kind == "aggTrade":
        tpl = (
            head + b'{"e":"aggTrade","E":' + now + b',"s":"' + sym + b'","a":%d,"p":"%s",'
            b'"q":"%d.%s","f":%d,"l":%d,"T":' + now + b',"m":%s,"M":true}' + tail
        )
        n = len(b.a_price)
        cols = [
            _ints(np.arange(b.a0, b.a0 + n, dtype=np.int64)),
            _prices(b.a_price),
            *_units(b.a_qty),
            _ints(b.a_f),
            _ints(b.a_l),
            _bools(b.a_bm),
        ]
    elif kind == "trade":
        tpl = (
            head + b'{"e":"trade","E":' + now + b',"s":"' + sym + b'","t":%d,"p":"%s",'
            b'"q":"%d.%s","T":' + now + b',"m":%s,"M":true}' + tail
        )
        n = len(b.t_price)
        cols = [
            _ints(np.arange(b.t0, b.t0 + n, dtype=np.int64)),
            _prices(b.t_price),
            *_units(b.t_qty),
            _bools(b.t_bm),
        ]
    else:
        tpl = head + b'{"u":%d,"s":"' + sym + b'","b":"%s","B":"%d.%s","a":"%s","A":"%d.%s"}' + tail
        n = len(b.bt_u)
        cols = [
            _ints(b.bt_u),
            _prices(b.bt_bp),
            *_units(b.bt_bq),
            _prices(b.bt_ap),
            *_units(b.bt_aq),
        ]
    return _frames(tpl, cols), n


# --------------------------------------------------------------------------------------------
# Connection subclass: sniff HTTP bodies, count incoming frames, hold writes when black-holed


class SimConnection(ServerConnection):
    """websockets' ServerConnection plus the hooks the simulator needs.

    - websockets' HTTP parser rejects request bodies; admin ``POST`` carries a JSON body, so the
      first request is buffered here, its body cut out into ``sim_body`` and the request fed on
      with ``Content-Length: 0``.
    - ``process_event`` counts every incoming frame (data, ping, pong) for the 5 msg/s rule.
    - ``send_data`` is held while black-holed (nothing leaves; flushed when it ends).
    - the ``refuse`` fault in "close" mode drops the TCP connection once the request line is
      known (so ``/sim`` admin requests still get through).
    """

    def __init__(self, sim: Simulator, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sim = sim
        self.sim_sniff: bytearray | None = bytearray()
        self.sim_body = b""
        self.sim_route: tuple[str, Any] | None = None
        self.sim_kind = ""  # "streams" | "wsapi" once accepted
        self.sim_blackholed = False
        self.sim_on_frame: Callable[[], None] | None = None

    def data_received(self, data: bytes) -> None:
        buf = self.sim_sniff
        if buf is None:
            super().data_received(data)
            return
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > 65536:  # not our business: let websockets reject it
                self.sim_sniff = None
                super().data_received(bytes(buf))
            return
        head = bytes(buf[: end + 4])
        faults = self.sim.faults
        if faults.refuse and faults.refuse_mode == "close":
            target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            if not target.startswith(b"/sim"):  # the admin API must stay reachable
                faults.count("refuse")
                self.sim_sniff = None
                self.transport.abort()
                return
        length = 0
        m = re.search(rb"(?im)^content-length:[ \t]*(\d+)[ \t]*\r\n", head)
        if m:
            length = int(m.group(1))
        if length > 1 << 20:
            self.sim_sniff = None
            super().data_received(bytes(buf))  # websockets answers 400
            return
        if len(buf) < end + 4 + length:
            return  # wait for the whole body
        self.sim_sniff = None
        if length:
            self.sim_body = bytes(buf[end + 4 : end + 4 + length])
            assert m is not None
            head = head[: m.start()] + head[m.end() :]
            rest = b""  # nothing may follow a non-upgrade request: we close after answering
        else:
            rest = bytes(buf[end + 4 :])
        super().data_received(head + rest)

    def process_event(self, event: Any) -> None:
        if (
            self.sim_on_frame is not None
            and isinstance(event, Frame)
            and event.opcode is not Opcode.CLOSE
        ):
            self.sim_on_frame()
        super().process_event(event)

    def send_data(self) -> None:
        if self.sim_blackholed:
            return
        super().send_data()

    # ---- fast path ----

    def sim_can_write(self) -> bool:
        return (
            not self.sim_blackholed
            and self.protocol.state is State.OPEN
            and not self.transport.is_closing()
        )

    def sim_write(self, data: bytes) -> bool:
        if not self.sim_can_write():
            return False
        self.transport.write(data)
        self.sim.stats["bytes_sent"] += len(data)
        return True

    def sim_blackhole(self) -> None:
        self.sim_blackholed = True
        with contextlib.suppress(Exception):
            self.transport.pause_reading()
        if self.keepalive_task is not None:
            self.keepalive_task.cancel()
            self.keepalive_task = None

    def sim_unblackhole(self) -> None:
        if not self.sim_blackholed:
            return
        self.sim_blackholed = False
        if self.transport.is_closing():
            return
        with contextlib.suppress(Exception):
            self.transport.resume_reading()
        self.send_data()
        if self.protocol.state is State.OPEN and self.keepalive_task is None:
            self.start_keepalive()


# --------------------------------------------------------------------------------------------
# Stream names and control messages (pure)


def parse_stream(name: str, symbols: set[str]) -> str | None:
    """Canonical stream name if valid for these (lowercase) symbols, else None.

    Conservative: the symbol must be lowercase and configured, the suffix spelled as documented.
    """
    sym, sep, kind = name.partition("@")
    if not sep or sym not in symbols or kind not in STREAM_KINDS:
        return None
    return name


def _ctl_error(code: int, msg: str, req_id: Any) -> bytes:
    # Live captures (fixtures: hostile/error_*.json) wrap errors in "error"; the docs' table
    # shows them flat. We follow the wire.
    return _json_bytes({"error": {"code": code, "msg": msg}, "id": req_id})


@dataclass
class ControlResult:
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
    ok = _json_bytes({"result": None, "id": req_id})
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
        return ControlResult(_json_bytes({"result": list(current), "id": req_id}))
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
        return ControlResult(_json_bytes({"result": combined, "id": req_id}))
    if not isinstance(params[1], bool):
        return ControlResult(_ctl_error(1, "Invalid value type: expected Boolean", req_id))
    return ControlResult(ok, combined=params[1])


# --------------------------------------------------------------------------------------------
# Stream clients


class StreamClient:
    """Per-connection state of a market-stream connection."""

    __slots__ = (
        "combined",
        "conn",
        "frames_sent",
        "incoming",
        "micros",
        "over_since",
        "pending",
        "pending_frames",
        "streams",
    )

    def __init__(self, conn: SimConnection, combined: bool, micros: bool = False) -> None:
        self.conn = conn
        self.combined = combined
        self.micros = micros  # timeUnit=MICROSECOND: E and T in microseconds
        self.streams: list[str] = []
        self.pending: list[bytes] = []  # whole frames, possibly many in one bytes
        self.pending_frames = 0
        self.frames_sent = 0
        self.incoming: deque[float] = deque()
        self.over_since: float | None = None


# --------------------------------------------------------------------------------------------
# Replay of captured sessions


@dataclass
class Capture:
    """A loaded capture: frames (receive time or None, stream, combined line, raw payload) and
    REST depth snapshots per symbol (receive time, body)."""

    frames: list[tuple[float | None, str, bytes, bytes]]
    snapshots: dict[str, list[tuple[float, dict[str, Any]]]]
    streams: set[str]


_TS_PREFIX = re.compile(rb"^\s*(\d+(?:\.\d+)?)\s*[:,\s]\s*(\{.*)$", re.S)


def _split_combined(line: bytes, frame: dict[str, Any]) -> tuple[str, bytes, bytes]:
    stream = frame["stream"]
    head = b'{"stream":' + orjson.dumps(stream) + b',"data":'
    if line.startswith(head) and line.endswith(b"}"):
        return stream, line, line[len(head) : -1]  # verbatim bytes
    data = orjson.dumps(frame["data"])
    return stream, head + data + b"}", data


def load_capture(path: str | Path) -> Capture:
    """Parse a capture file: one frame per line, optionally prefixed by its receive time
    (``1633998512.06: {...}``), or the timeline form ``{"recv_ts","source":"ws","frame"}`` /
    ``{"recv_ts","source":"rest","url","body"}``. Raises ValueError naming the bad line."""
    frames: list[tuple[float | None, str, bytes, bytes]] = []
    snaps: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for lineno, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        ts: float | None = None
        m = _TS_PREFIX.match(line)
        if m and not line.startswith(b"{"):
            ts, line = float(m.group(1)), m.group(2).strip()
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object")
        if "source" in obj and "recv_ts" in obj:
            ts = float(obj["recv_ts"])
            if obj["source"] == "rest":
                q = parse_qs(urlsplit(str(obj.get("url", ""))).query)
                sym = (q.get("symbol") or [""])[0].upper()
                if sym and isinstance(obj.get("body"), dict):
                    snaps.setdefault(sym, []).append((ts, obj["body"]))
                continue
            frame = obj.get("frame")
            if not isinstance(frame, dict):
                raise ValueError(f"{path}:{lineno}: timeline ws entry without a frame object")
            line = orjson.dumps(frame)
            obj = frame
        if "stream" not in obj or "data" not in obj:
            raise ValueError(f"{path}:{lineno}: not a combined-stream frame (no stream/data)")
        stream, combined, payload = _split_combined(line, obj)
        frames.append((ts, stream, combined, payload))
    if not frames:
        raise ValueError(f"{path}: no frames")
    return Capture(frames, snaps, {f[1] for f in frames})


def capture_symbols(cap: Capture) -> list[str]:
    syms: list[str] = []
    for s in sorted(cap.streams):
        sym = s.partition("@")[0].upper()
        if sym and sym not in syms:
            syms.append(sym)
    for sym in cap.snapshots:
        if sym not in syms:
            syms.append(sym)
    return syms


# --------------------------------------------------------------------------------------------
# The simulator


class Simulator:
    """One simulator: market, venue service, websockets server, generation loop.

    ``await sim.start()`` binds and starts; ``await sim.stop()`` closes everything. Use
    :class:`pipeline.sim.testing.SimServer` in tests.
    """

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = cfg = config or SimConfig()
        if cfg.rate_unit not in RATE_UNITS:
            raise ValueError(f"rate_unit must be one of {RATE_UNITS}, not {cfg.rate_unit!r}")
        self.faults = cfg.faults
        self.capture: Capture | None = None
        symbols = [s.upper() for s in cfg.symbols]
        if cfg.replay:
            self.capture = load_capture(cfg.replay)
            for s in capture_symbols(self.capture):
                if s not in symbols:
                    symbols.append(s)
        self.market = mk.Market(symbols, cfg.seed, history=cfg.history)
        self.symbols_lower = {s.lower(): s for s in self.market.symbols}
        self._stream_b: dict[str, bytes] = {}
        self._subs: dict[str, set[StreamClient]] = {}
        self._clients: set[StreamClient] = set()
        self._conns: set[SimConnection] = set()
        self._dirty: set[StreamClient] = set()
        self._timers: dict[SimConnection, list[asyncio.TimerHandle]] = {}
        self._server: Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._bg: set[asyncio.Task[Any]] = set()
        self._last_ms = 0
        self._wake = asyncio.Event()
        self._replay_started = asyncio.Event()
        self._replay_pos: float | None = None
        self._blackhole_timer: asyncio.TimerHandle | None = None
        self._weight: tuple[int, int] = (0, 0)  # (minute, used)
        self.stats: dict[str, int] = {
            "connections_total": 0,
            "stream_connections_total": 0,
            "wsapi_connections_total": 0,
            "http_requests": 0,
            "frames_sent": 0,
            "bytes_sent": 0,
            "control_messages": 0,
            "rate_limit_disconnects": 0,
            "lifetime_disconnects": 0,
            "slow_consumer_disconnects": 0,
            "backpressure_waits": 0,
            "walk_actions": 0,  # a batched taker order counts as one
            "walk_batches": 0,  # Market.step_batch calls (--rate max, or a busy finite rate)
            "replay_frames": 0,
        }
        self.service: Any = None
        self._wsapi_error: str | None = None
        self.port = 0

    # ---- lifecycle ----

    def now_ms(self) -> int:
        """Event time in ms: the configured wall clock, never going backwards."""
        clock = self.config.clock_ms
        now = clock() if clock is not None else time.time_ns() // 1_000_000
        if now < self._last_ms:
            now = self._last_ms
        self._last_ms = now
        return now

    async def start(self) -> None:
        cfg = self.config
        self._make_service()
        self.market.set_wakeup(self._wake.set)

        def factory(*args: Any, **kwargs: Any) -> SimConnection:
            return SimConnection(self, *args, **kwargs)

        self._server = await serve(
            self._handler,
            cfg.host,
            cfg.port,
            process_request=self._process_request,
            create_connection=cast(Any, factory),
            ping_interval=cfg.ping_interval,
            ping_timeout=cfg.pong_timeout,
            compression=None,
            max_size=1 << 20,
            write_limit=cfg.write_high_water,
            close_timeout=2,
            server_header="pipeline-sim",
            logger=logging.getLogger("pipeline.sim.ws"),
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        if self.capture is not None:
            self._tasks.append(loop.create_task(self._replay_loop(), name="sim-replay"))
        else:
            self._tasks.append(loop.create_task(self._market_loop(), name="sim-market"))
        log.info(
            "sim listening",
            extra={"port": self.port, "symbols": ",".join(self.market.symbols)},
        )

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        for handles in self._timers.values():
            for h in handles:
                h.cancel()
        if self._blackhole_timer is not None:
            self._blackhole_timer.cancel()
        for conn in list(self._conns):
            if conn.sim_blackholed:  # let the closing handshake out
                conn.sim_unblackhole()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._bg):
            task.cancel()
        if self._bg:
            await asyncio.wait(list(self._bg), timeout=2)
        self.market.set_wakeup(None)

    @property
    def urls(self) -> dict[str, str]:
        h, p = self.config.host, self.port
        return {
            "streams": f"ws://{h}:{p}",
            "rest": f"http://{h}:{p}",
            "wsapi": f"ws://{h}:{p}/ws-api/v3",
            "admin": f"http://{h}:{p}/sim",
        }

    def _make_service(self) -> None:
        try:
            from pipeline.sim import wsapi
        except ModuleNotFoundError as exc:
            if exc.name != "pipeline.sim.wsapi":
                raise
            self._wsapi_error = "pipeline.sim.wsapi is not available"
            log.warning("sim wsapi unavailable", extra={"reason": self._wsapi_error})
            return
        self.service = wsapi.WsApiService(
            market=self.market,
            api_keys=dict(self.config.api_keys),
            faults=self.faults,
            clock_ms=self.now_ms,
            **self.config.wsapi_options,
        )

    # ---- HTTP: routing, REST, admin ----

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        sconn = cast(SimConnection, conn)
        url = urlsplit(request.path)
        path = unquote(url.path)
        query = parse_qs(url.query, keep_blank_values=True)
        if path.startswith("/sim/") or path == "/sim":
            self.stats["http_requests"] += 1
            return self._admin(request.method, path, query, sconn.sim_body)
        if self.faults.refuse:
            self.faults.count("refuse")
            return _json_response(503, {"code": -1008, "msg": "Service unavailable (simulated)."})
        if path.startswith("/api/"):
            self.stats["http_requests"] += 1
            return self._rest(request.method, path, query)
        if path == "/ws-api/v3":
            sconn.sim_route = ("wsapi", None)
            return None
        if path in ("/stream", "/ws") or path.startswith("/ws/"):
            return self._route_stream(sconn, path, query)
        return _json_response(404, {"code": -1000, "msg": f"Unknown path {path}"})

    def _route_stream(
        self, conn: SimConnection, path: str, query: dict[str, list[str]]
    ) -> Response | None:
        tu = (query.get("timeUnit") or ["MILLISECOND"])[0]
        if tu not in ("MILLISECOND", "millisecond", "MICROSECOND", "microsecond"):
            # the streams service's exact answer is UNCONFIRMED (section 1.2): the error code
            # is the documented -1194 INVALID_TIME_UNIT
            return _json_response(400, {"code": -1194, "msg": "Invalid timeUnit."})
        micros = tu in ("MICROSECOND", "microsecond")
        if path == "/stream":
            raw = (query.get("streams") or [""])[0]
            names = [n for n in raw.split("/") if n]
            combined = True
        else:
            names = [n for n in path[len("/ws/") :].split("/") if n] if path != "/ws" else []
            combined = False
        valid: list[str] = []
        for n in names:
            canon = self._valid_stream(n)
            if canon is None:
                return _json_response(
                    400, {"code": 2, "msg": f"Invalid request: unknown stream name `{n}`"}
                )
            if canon not in valid:
                valid.append(canon)
        if len(valid) > self.config.max_streams:
            return _json_response(
                400, {"code": 2, "msg": f"Too many streams (max {self.config.max_streams})"}
            )
        conn.sim_route = ("streams", (combined, valid, micros))
        return None

    def _valid_stream(self, name: str) -> str | None:
        if self.capture is not None and name in self.capture.streams:
            return name
        return parse_stream(name, set(self.symbols_lower))

    def _rest(self, method: str, path: str, q: dict[str, list[str]]) -> Response:
        now = asyncio.get_running_loop().time()
        fail = self.faults.rest_should_fail(now)
        if fail is not None:
            return _json_response(fail, {"code": -1000, "msg": "Simulated server error."})
        if method != "GET":
            return _json_response(405, {"code": -1000, "msg": f"{method} not supported"})
        weight = 1
        try:
            if path == "/api/v3/ping":
                body: Any = {}
            elif path == "/api/v3/time":
                body = {"serverTime": self.now_ms()}
            elif path == "/api/v3/exchangeInfo":
                body, weight = self._exchange_info(q), 20
            elif path == "/api/v3/depth":
                body, weight = self._rest_depth(q)
            elif path == "/api/v3/aggTrades":
                body, weight = self._rest_agg_trades(q), 4
            elif path == "/api/v3/ticker/bookTicker":
                sym = self._symbol_param(q)
                bp, bq, ap, aq = self.market.best_units(sym)
                body = {
                    "symbol": sym,
                    "bidPrice": mk.fmt_units(bp),
                    "bidQty": mk.fmt_units(bq),
                    "askPrice": mk.fmt_units(ap),
                    "askQty": mk.fmt_units(aq),
                }
                weight = 2
            else:
                return _json_response(404, {"code": -1000, "msg": f"Unknown endpoint {path}"})
        except _RestError as exc:
            return _json_response(400, {"code": exc.code, "msg": exc.msg})
        minute = int(now // 60)
        used = (self._weight[1] if self._weight[0] == minute else 0) + weight
        self._weight = (minute, used)
        return _json_response(200, body, {"X-MBX-USED-WEIGHT-1M": str(used)})

    def _symbol_param(self, q: dict[str, list[str]]) -> str:
        sym = (q.get("symbol") or [""])[0]
        if not sym:
            raise _RestError(
                -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed."
            )
        if sym not in self.market.symbols:  # case-sensitive like Binance
            raise _RestError(-1121, "Invalid symbol.")
        return sym

    def _int_param(self, q: dict[str, list[str]], name: str) -> int | None:
        vals = q.get(name)
        if not vals:
            return None
        v = vals[0]
        if not re.fullmatch(r"[0-9]{1,20}", v):
            raise _RestError(
                -1100,
                f"Illegal characters found in parameter '{name}'; "
                "legal range is '^[0-9]{1,20}$'.",
            )
        return int(v)

    def _rest_depth(self, q: dict[str, list[str]]) -> tuple[Any, int]:
        sym = self._symbol_param(q)
        limit = self._int_param(q, "limit") or 100
        limit = min(limit, 5000)
        weight = 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250
        if self.capture is not None and sym in self.capture.snapshots:
            snaps = self.capture.snapshots[sym]
            pos = self._replay_pos
            chosen = snaps[0][1]
            if pos is not None:
                for ts, body in snaps:
                    if ts <= pos:
                        chosen = body
            return {
                "lastUpdateId": chosen.get("lastUpdateId"),
                "bids": list(chosen.get("bids", []))[:limit],
                "asks": list(chosen.get("asks", []))[:limit],
            }, weight
        return self.market.depth_snapshot(sym, limit), weight

    def _rest_agg_trades(self, q: dict[str, list[str]]) -> list[dict[str, object]]:
        sym = self._symbol_param(q)
        limit = self._int_param(q, "limit")
        if limit is None:
            limit = 500
        if not 1 <= limit <= 1000:
            raise _RestError(-1130, "Data sent for parameter 'limit' is not valid.")
        from_id = self._int_param(q, "fromId")
        start = self._int_param(q, "startTime")
        end = self._int_param(q, "endTime")
        if start is not None and end is not None and end - start > 3_600_000:
            raise _RestError(-1127, "More than 1 hours between startTime and endTime.")
        trades = self.market.agg_trades(
            sym, from_id=from_id, start_time=start, end_time=end, limit=limit
        )
        return [a.rest_dict() for a in trades]

    def _exchange_info(self, q: dict[str, list[str]]) -> dict[str, Any]:
        wanted = list(self.market.symbols)
        if q.get("symbol"):
            wanted = [self._symbol_param(q)]
        elif q.get("symbols"):
            try:
                lst = orjson.loads(q["symbols"][0])
            except orjson.JSONDecodeError:
                raise _RestError(
                    -1100, "Illegal characters found in parameter 'symbols'."
                ) from None
            if not isinstance(lst, list) or not all(isinstance(s, str) for s in lst):
                raise _RestError(-1100, "Illegal characters found in parameter 'symbols'.")
            for s in lst:
                if s not in self.market.symbols:
                    raise _RestError(-1121, "Invalid symbol.")
            wanted = lst
        return {
            "timezone": "UTC",
            "serverTime": self.now_ms(),
            "rateLimits": [
                {
                    "rateLimitType": "REQUEST_WEIGHT",
                    "interval": "MINUTE",
                    "intervalNum": 1,
                    "limit": 6000,
                },
                {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
                {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
                {
                    "rateLimitType": "RAW_REQUESTS",
                    "interval": "MINUTE",
                    "intervalNum": 5,
                    "limit": 61000,
                },
            ],
            "exchangeFilters": [],
            "symbols": [_symbol_entry(self.market.spec(s)) for s in wanted],
        }

    def _admin(self, method: str, path: str, q: dict[str, list[str]], body: bytes) -> Response:
        if path == "/sim/state" and method == "GET":
            return _json_response(200, self.state())
        if path == "/sim/inject":
            if method != "POST":
                return _json_response(405, {"error": "use POST"})
            try:
                spec = orjson.loads(body or b"null")
                if not isinstance(spec, dict):
                    raise FaultError("body must be a JSON object")
                return _json_response(200, self.inject(spec))
            except orjson.JSONDecodeError as exc:
                return _json_response(400, {"error": f"body is not JSON: {exc}"})
            except FaultError as exc:
                return _json_response(400, {"error": str(exc)})
        if path.startswith("/sim/fault/"):
            if method != "POST":
                return _json_response(405, {"error": "use POST"})
            name = path[len("/sim/fault/") :]
            params: dict[str, Any] = {}
            if body:
                try:
                    params = orjson.loads(body)
                except orjson.JSONDecodeError as exc:
                    return _json_response(400, {"error": f"body is not JSON: {exc}"})
                if not isinstance(params, dict):
                    return _json_response(400, {"error": "body must be a JSON object"})
            else:
                params = {k: _query_value(v[0]) for k, v in q.items()}
            try:
                req = parse_fault(name, params)
                self.fault(req)
            except FaultError as exc:
                return _json_response(400, {"error": str(exc)})
            return _json_response(200, {"ok": True, "fault": name, "params": req.params})
        return _json_response(404, {"error": f"unknown admin path {path}"})

    def state(self) -> dict[str, Any]:
        """Counters for GET /sim/state."""
        subs = {s: len(c) for s, c in self._subs.items() if c}
        kinds: dict[str, int] = {"streams": 0, "wsapi": 0}
        for c in self._conns:
            if c.sim_kind in kinds:
                kinds[c.sim_kind] += 1
        market = {}
        for s in self.market.symbols:
            bp, _bq, ap, _aq = self.market.best_units(s)
            market[s] = {
                "last_update_id": self.market.last_update_id(s),
                "best_bid": mk.fmt_units(bp),
                "best_ask": mk.fmt_units(ap),
            }
        venue: Any = None
        if self.service is not None and hasattr(self.service, "state"):
            try:
                venue = self.service.state()
            except Exception as exc:  # the venue's bug must not break the admin endpoint
                venue = {"error": repr(exc)}
        return {
            "port": self.port,
            "connections": kinds,
            "stats": dict(self.stats),
            "subscriptions": subs,
            "faults": self.faults.snapshot(),
            "market": market,
            "venue": venue,
            "wsapi_error": self._wsapi_error,
            "replay": None
            if self.capture is None
            else {"frames": len(self.capture.frames), "position": self._replay_pos},
        }

    def _spawn(self, coro: Any) -> None:
        """Fire-and-forget task that is kept referenced until done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    # ---- faults ----

    def fault(self, req: FaultRequest) -> None:
        """Apply one validated fault now."""
        loop = asyncio.get_running_loop()
        log.info("sim fault", extra={"fault": req.name, "params": str(req.params)})
        if req.name not in IMMEDIATE and req.name != "blackhole":
            apply_switch(self.faults, req, loop.time())
            if req.name == "clear":
                self._end_blackhole()
            self.faults.count(req.name)
            return
        target = req.params.get("target", "all")
        conns = [c for c in self._conns if target == "all" or c.sim_kind == target]
        self.faults.count(req.name)
        if req.name == "drop":
            for c in conns:
                if req.params["mode"] == "abort":
                    c.transport.abort()
                else:
                    self._spawn(c.close(req.params["code"], "simulated drop"))
        elif req.name == "malformed":
            frames = _malformed_frames(req.params["kind"], req.params["count"], req.params["size"])
            for c in conns:
                for f in frames:
                    c.sim_write(f)
        elif req.name == "shutdown":
            for c in conns:
                self._send_shutdown(c)
                if req.params["close_after"] is not None:
                    loop.call_later(req.params["close_after"], self._lifetime_close, c)
        elif req.name == "blackhole":
            if not req.params["on"]:
                self._end_blackhole()
                return
            self.faults.blackhole = True
            for c in conns:
                c.sim_blackhole()
            dur = req.params["duration"]
            if self._blackhole_timer is not None:
                self._blackhole_timer.cancel()
                self._blackhole_timer = None
            if dur is not None:
                self.faults.blackhole_until = loop.time() + dur
                self._blackhole_timer = loop.call_later(dur, self._end_blackhole)

    #: most frames one inject request may send (each goes to every subscriber at once)
    MAX_INJECT = 10_000

    def inject(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Send hand-made frames now, ahead of the market's next event (``POST /sim/inject``).

        Why: the venue a client must survive sends more than well-formed market data (a 19-digit
        id, an out-of-range time, 100k-deep JSON); tests inject exactly that into a live stream
        and watch the client carry on with the real frames that follow.

        ``{"stream": "btcusdt@aggTrade", "payload": "<the data object as JSON text>",
        "count": 1, "seq_from": 0}`` goes to every subscriber of the stream, wrapped like the
        stream's own frames (combined envelope, raw, timeUnit). Tokens in ``payload``:
        ``$NEXT_AGG_ID`` / ``$NEXT_TRADE_ID`` (the id the market's next aggregate trade / trade
        of the stream's symbol will get: a race-free "same id as the real next frame"),
        ``$LAST_UPDATE_ID`` (the book's current update id), ``$SEQ`` (``seq_from`` + the frame's
        index, for runs). ``{"frame": "<text>", "count": n}`` instead writes that text frame
        as-is to every market-stream connection. Returns how many clients got each frame.
        """
        count = spec.get("count", 1)
        if type(count) is not int or not 1 <= count <= self.MAX_INJECT:
            raise FaultError(f"count must be an integer in 1..{self.MAX_INJECT}")
        frame = spec.get("frame")
        if frame is not None:
            if not isinstance(frame, str):
                raise FaultError("frame must be a string")
            conns = [c for c in self._conns if c.sim_kind == "streams"]
            data = ws_frame(frame.encode())
            for c in conns:
                for _ in range(count):
                    c.sim_write(data)
            self.faults.count("inject", count)
            return {"ok": True, "clients": len(conns), "frames": count}
        stream, payload = spec.get("stream"), spec.get("payload")
        if not isinstance(stream, str) or not isinstance(payload, str):
            raise FaultError("give `stream` and `payload` (strings), or `frame`")
        canon = self._valid_stream(stream)
        if canon is None or "@" not in canon:
            raise FaultError(f"unknown stream {stream!r}")
        seq_from = spec.get("seq_from", 0)
        if type(seq_from) is not int:
            raise FaultError("seq_from must be an integer")
        sym = canon.split("@", 1)[0].upper()
        known = sym in self.market.symbols
        tokens = {
            "$NEXT_AGG_ID": str(self.market.next_agg_id(sym)) if known else "0",
            "$NEXT_TRADE_ID": str(self.market.next_trade_id(sym)) if known else "0",
            "$LAST_UPDATE_ID": str(self.market.last_update_id(sym)) if known else "0",
        }
        for k, v in tokens.items():
            payload = payload.replace(k, v)
        self._stream_b.setdefault(canon, canon.encode())
        for i in range(count):
            self._publish(canon, payload.replace("$SEQ", str(seq_from + i)).encode())
        self._flush()
        self.faults.count("inject", count)
        return {"ok": True, "clients": len(self._subs.get(canon) or ()), "frames": count,
                **{k.lstrip("$").lower(): v for k, v in tokens.items()}}

    def _end_blackhole(self) -> None:
        self.faults.blackhole = False
        self.faults.blackhole_until = None
        if self._blackhole_timer is not None:
            self._blackhole_timer.cancel()
            self._blackhole_timer = None
        for c in list(self._conns):
            c.sim_unblackhole()

    # ---- WebSocket handlers ----

    async def _handler(self, ws: ServerConnection) -> None:
        conn = cast(SimConnection, ws)
        route = conn.sim_route
        if route is None:  # cannot happen: process_request routed it
            await conn.close(1011, "no route")
            return
        self.stats["connections_total"] += 1
        self._conns.add(conn)
        self._arm_lifetime(conn)
        try:
            if route[0] == "wsapi":
                conn.sim_kind = "wsapi"
                self.stats["wsapi_connections_total"] += 1
                await self._wsapi(conn)
            else:
                conn.sim_kind = "streams"
                self.stats["stream_connections_total"] += 1
                combined, streams, micros = route[1]
                await self._stream(conn, combined, streams, micros)
        finally:
            self._conns.discard(conn)
            for h in self._timers.pop(conn, []):
                h.cancel()

    async def _wsapi(self, conn: SimConnection) -> None:
        if self.service is None:
            await conn.close(1011, "WS API not available in this build (pipeline.sim.wsapi)")
            return
        from pipeline.sim import wsapi

        await wsapi.serve_connection(self.service, conn)

    async def _stream(self, conn: SimConnection, combined: bool, streams: list[str],
                      micros: bool = False) -> None:
        client = StreamClient(conn, combined, micros)
        self._clients.add(client)
        self._subscribe(client, streams)
        limit = self.config.max_incoming_per_s
        loop = asyncio.get_running_loop()

        def on_frame() -> None:
            if not limit:
                return
            now = loop.time()
            q = client.incoming
            q.append(now)
            while q and now - q[0] >= 1.0:
                q.popleft()
            if len(q) > limit and conn.protocol.state is State.OPEN:
                self.stats["rate_limit_disconnects"] += 1
                _rlog.warning("sim_rate_limit", "stream client sent > limit msgs/s; closing")
                self._spawn(conn.close(1008, "Too many requests"))

        conn.sim_on_frame = on_frame
        if self.capture is not None:
            self._replay_started.set()
        try:
            async for msg in conn:
                self.stats["control_messages"] += 1
                res = handle_control(
                    msg,
                    current=client.streams,
                    combined=client.combined,
                    valid_stream=self._valid_stream,
                    max_streams=self.config.max_streams,
                )
                if res.subscribe:
                    self._subscribe(client, res.subscribe)
                if res.unsubscribe:
                    self._unsubscribe(client, res.unsubscribe)
                if res.combined is not None:
                    client.combined = res.combined
                self._flush_client(client)  # keep data sent before the reply in order
                if conn.sim_write(ws_frame(res.reply)):
                    self.stats["frames_sent"] += 1
        except ConnectionClosed:
            pass
        finally:
            conn.sim_on_frame = None
            self._unsubscribe(client, list(client.streams))
            self._clients.discard(client)
            self._dirty.discard(client)

    def _writable_symbols(self) -> set[str]:
        """Lowercase symbols with a subscriber that can be written to now (not closing, not
        black-holed): at --rate max nobody else is worth a batch."""
        out: set[str] = set()
        for stream, subs in self._subs.items():
            sym = stream.partition("@")[0]
            if sym not in out and any(c.conn.sim_can_write() for c in subs):
                out.add(sym)
        return out

    def _subscribe(self, client: StreamClient, streams: list[str]) -> None:
        for s in streams:
            if s not in client.streams:
                client.streams.append(s)
                self._subs.setdefault(s, set()).add(client)
                if s not in self._stream_b:
                    self._stream_b[s] = s.encode()

    def _unsubscribe(self, client: StreamClient, streams: list[str]) -> None:
        for s in streams:
            if s in client.streams:
                client.streams.remove(s)
                subs = self._subs.get(s)
                if subs is not None:
                    subs.discard(client)
                    if not subs:
                        del self._subs[s]

    # ---- lifetime / serverShutdown ----

    def _arm_lifetime(self, conn: SimConnection) -> None:
        cfg = self.config
        if not math.isfinite(cfg.max_lifetime):
            return
        loop = asyncio.get_running_loop()
        handles = [loop.call_later(cfg.max_lifetime, self._lifetime_close, conn)]
        notice_at = cfg.max_lifetime - cfg.shutdown_notice
        if cfg.shutdown_notice > 0:
            handles.append(loop.call_later(max(0.0, notice_at), self._send_shutdown, conn))
        self._timers[conn] = handles

    def _send_shutdown(self, conn: SimConnection) -> None:
        now = self.now_ms()
        event = {"e": "serverShutdown", "E": now}
        if conn.sim_kind == "wsapi":
            payload = _json_bytes({"event": event})
        else:
            client = next((c for c in self._clients if c.conn is conn), None)
            if client is not None and client.micros:
                event["E"] = now * 1000
            if client is not None and client.combined:
                payload = _json_bytes({"stream": "!serverShutdown", "data": event})
            else:
                payload = _json_bytes(event)
            if client is not None:
                self._flush_client(client)
        if conn.sim_write(ws_frame(payload)):
            self.stats["frames_sent"] += 1
            self.faults.count("server_shutdown_sent")

    def _lifetime_close(self, conn: SimConnection) -> None:
        if conn.protocol.state is State.OPEN:
            self.stats["lifetime_disconnects"] += 1
            self._spawn(conn.close(1001, "connection lifetime"))

    # ---- fan-out ----

    def _publish(self, stream: str, payload: bytes) -> None:
        subs = self._subs.get(stream)
        if not subs:
            return
        raw_f: bytes | None = None
        comb_f: bytes | None = None
        us_f: dict[bool, bytes] | None = None  # timeUnit=MICROSECOND clients, by wrapping
        for c in subs:
            if c.micros:
                if us_f is None:
                    us_f = {}
                f = us_f.get(c.combined)
                if f is None:
                    p = micros_payload(payload)
                    f = us_f[c.combined] = ws_frame(
                        b'{"stream":"' + self._stream_b[stream] + b'","data":' + p + b"}"
                        if c.combined else p
                    )
                c.pending.append(f)
            elif c.combined:
                if comb_f is None:
                    comb_f = ws_frame(
                        b'{"stream":"' + self._stream_b[stream] + b'","data":' + payload + b"}"
                    )
                c.pending.append(comb_f)
            else:
                if raw_f is None:
                    raw_f = ws_frame(payload)
                c.pending.append(raw_f)
            c.pending_frames += 1
            self._dirty.add(c)

    def _flush_client(self, c: StreamClient) -> None:
        if not c.pending:
            return
        n = c.pending_frames
        data = c.pending[0] if len(c.pending) == 1 else b"".join(c.pending)
        c.pending = []
        c.pending_frames = 0
        self._dirty.discard(c)
        if c.conn.sim_write(data):
            c.frames_sent += n
            self.stats["frames_sent"] += n

    def _flush(self) -> None:
        for c in list(self._dirty):
            self._flush_client(c)

    def _dispatch(self, events: list[mk.Event | mk.TakerBatch]) -> None:
        subs = self._subs
        faults = self.faults
        for ev in events:
            if isinstance(ev, mk.TakerBatch):
                if faults.skip_agg_ids:  # rare: per event, so the budget counts exactly
                    self._dispatch(list(ev.events()))
                else:
                    self._publish_batch(ev)
                continue
            sym = ev.symbol.lower()
            if isinstance(ev, mk.AggTrade):
                if faults.skip_agg_ids and faults.take_skip_agg(ev.symbol):
                    continue
                stream = sym + "@aggTrade"
                if stream in subs:
                    self._publish(stream, mk.encode_agg_trade(ev))
            elif isinstance(ev, mk.Trade):
                stream = sym + "@trade"
                if stream in subs:
                    self._publish(stream, mk.encode_trade(ev))
            else:
                stream = sym + "@bookTicker"
                if stream in subs:
                    self._publish(stream, mk.encode_book_ticker(ev))

    def _publish_batch(self, b: mk.TakerBatch) -> None:
        """Fan a TakerBatch out: per subscribed stream its frames, encoded once per wrapping.

        Within one batch (one instant) each stream's frames stay in order, but the trade,
        aggTrade and bookTicker streams follow one another rather than interleave."""
        low = b.symbol.lower()
        for kind in ("trade", "aggTrade", "bookTicker"):
            stream = f"{low}@{kind}"
            subs = self._subs.get(stream)
            if not subs:
                continue
            done: dict[tuple[bool, bool], tuple[bytes, int]] = {}  # by (combined, micros)
            for c in subs:
                key = (c.combined, c.micros)
                got = done.get(key)
                if got is None:
                    head = b'{"stream":"' + self._stream_b[stream] + b'","data":'
                    got = done[key] = batch_frames(b, kind, head, b"}", c.micros) if c.combined \
                        else batch_frames(b, kind, micros=c.micros)
                data, n = got
                if n:
                    c.pending.append(data)
                    c.pending_frames += n
                    self._dirty.add(c)

    def _depth_tick(self, speed: int, now_ms: int) -> None:
        sfx = "@100ms" if speed == 100 else ""
        for sym in self.market.symbols:
            low = sym.lower()
            diff = self.market.flush_depth(sym, speed, now_ms)
            stream = f"{low}@depth{sfx}"
            if diff is not None and stream in self._subs:
                self._publish(stream, mk.encode_depth_diff(diff))
            for n in mk.PARTIAL_LEVELS:
                stream = f"{low}@depth{n}{sfx}"
                if stream in self._subs:
                    self._publish(stream, mk.encode_partial_depth(*self.market.top(sym, n)))

    def _backpressured(self, now: float) -> bool:
        """True if some stream client cannot take more now; drops ones stuck too long."""
        high = self.config.write_high_water
        over = False
        for c in list(self._clients):
            conn = c.conn
            if conn.sim_blackholed or not c.streams or conn.transport.is_closing():
                continue
            if conn.transport.get_write_buffer_size() > high:
                if c.over_since is None:
                    c.over_since = now
                elif now - c.over_since > self.config.slow_consumer_timeout:
                    self.stats["slow_consumer_disconnects"] += 1
                    _rlog.warning("sim_slow_consumer", "stream client too slow; dropping it")
                    conn.transport.abort()
                    continue
                over = True
            else:
                c.over_since = None
        return over

    async def _market_loop(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        max_mode = not math.isfinite(cfg.rate) or cfg.rate <= 0
        symbols = self.market.symbols
        budget = dict.fromkeys(symbols, 0.0)  # finite rate: units due per symbol
        cap = cfg.rate * 0.5 + 1 if not max_mode else 0.0  # at most half a second of backlog
        last = loop.time()
        next_100 = next_tick = last + 0.1
        next_1000 = last + 1.0
        batch = 16
        while True:
            now = loop.time()
            self.faults.expire(now)
            stalled = self.faults.stall
            now_ms = self.now_ms()
            paused = stalled or self._backpressured(now)
            if not paused:
                try:
                    if max_mode:
                        # as fast as clients take: only symbols someone can be sent data for
                        live = self._writable_symbols()
                        active = [s for s in symbols if s.lower() in live]
                        for sym in active:
                            self.market.step_batch(sym, now_ms, batch)
                        self.stats["walk_actions"] += batch * len(active)
                        self.stats["walk_batches"] += len(active)
                    else:
                        add = cfg.rate * (now - last)
                        for sym in symbols:
                            due = min(budget[sym] + add, cap)
                            n = int(due)
                            budget[sym] = due - (self._walk_finite(sym, n, now_ms) if n else 0)
                except Exception as exc:  # a venue listener bug must not kill the feed
                    self.stats["walk_errors"] = self.stats.get("walk_errors", 0) + 1
                    _rlog.warning("sim_walk_error", "market step failed", error=repr(exc))
            elif not max_mode:
                budget = dict.fromkeys(symbols, 0.0)  # no catch-up burst after a pause
            last = now
            if now >= next_tick:  # the venue's clock runs even while market data stalls
                next_tick = max(next_tick + 0.1, now)
                if self.service is not None and hasattr(self.service, "on_tick"):
                    try:
                        self.service.on_tick(now_ms)
                    except Exception as exc:
                        _rlog.warning("sim_on_tick_error", "venue on_tick failed", error=repr(exc))
            if not stalled:
                self._dispatch(self.market.drain_raw())
                if now >= next_100:
                    self._depth_tick(100, now_ms)
                    next_100 = max(next_100 + 0.1, now)
                if now >= next_1000:
                    self._depth_tick(1000, now_ms)
                    next_1000 = max(next_1000 + 1.0, now)
                self._flush()
            if max_mode and self._subs and not paused:
                batch = min(batch * 2, MAX_BATCH)
                await asyncio.sleep(0)
            elif max_mode and paused and not stalled:
                self.stats["backpressure_waits"] += 1  # the clients are the limit now
                await asyncio.sleep(0.0005)
            else:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), cfg.tick_s)

    def _walk_finite(self, sym: str, due: int, now_ms: int) -> int:
        """Run ``due`` units of a finite rate's walk on one symbol; returns the units used.

        Few due (a low rate): the per-action walk, exactly as many actions, or in ``msgs``
        unit actions until ``due`` aggTrades are out (a taker may print several, so it can
        overshoot by a few: the caller carries the excess as debt). Many due: Market.step_batch
        in chunks of at most MAX_BATCH takers, which is what lets a finite rate reach hundreds
        of thousands of messages a second; the events of one turn then share one time stamp
        (they do on the per-action path too) and bookTicker follows taker orders only.
        """
        market, stats = self.market, self.stats
        msgs = self.config.rate_unit == "msgs"
        a0 = market.next_agg_id(sym)
        if due < (BATCH_MIN_MSGS if msgs else BATCH_MIN_ACTIONS):
            if not msgs:
                market.step(sym, now_ms, due)
                stats["walk_actions"] += due
                return due
            actions = 0
            limit = 64 * due + 64  # a taker is ~1 action in 3: never loop forever
            while market.next_agg_id(sym) - a0 < due and actions < limit:
                market.step(sym, now_ms, 1)
                actions += 1
            stats["walk_actions"] += actions
            return market.next_agg_id(sym) - a0
        if msgs:
            # a batch taker prints ~1.0 aggTrade; top up (rarely) until due are out, at most
            # a few calls: a thin book drops takers that find nothing
            for _ in range(4):
                left = due - (market.next_agg_id(sym) - a0)
                if left <= 0:
                    break
                k = min(left, MAX_BATCH)
                market.step_batch(sym, now_ms, k)
                stats["walk_actions"] += k
                stats["walk_batches"] += 1
            return market.next_agg_id(sym) - a0
        takers = max(1, round(due * WALK_AGGS_PER_ACTION))
        while takers > 0:
            k = min(takers, MAX_BATCH)
            market.step_batch(sym, now_ms, k)
            stats["walk_actions"] += k
            stats["walk_batches"] += 1
            takers -= k
        return due

    async def _replay_loop(self) -> None:
        cap = self.capture
        assert cap is not None
        loop = asyncio.get_running_loop()
        await self._replay_started.wait()
        frames = cap.frames
        t0_rec = next((f[0] for f in frames if f[0] is not None), None)
        t0 = loop.time()
        if t0_rec is not None:
            self._replay_pos = t0_rec
        recorded = self.config.replay_speed == "recorded"
        for ts, stream, combined_line, payload in frames:
            if recorded and ts is not None and t0_rec is not None:
                delay = (ts - t0_rec) - (loop.time() - t0)
                if delay > 0:
                    self._flush()
                    await asyncio.sleep(delay)
            while self.faults.stall or self._backpressured(loop.time()):
                self._flush()
                await asyncio.sleep(0.005)
                self.faults.expire(loop.time())
            if ts is not None:
                self._replay_pos = ts
            subs = self._subs.get(stream)
            if subs:
                comb_f = raw_f = None
                for c in subs:
                    if c.micros:  # rare in replay: converted per client
                        c.pending.append(ws_frame(micros_payload(
                            combined_line if c.combined else payload)))
                    elif c.combined:
                        comb_f = comb_f or ws_frame(combined_line)
                        c.pending.append(comb_f)
                    else:
                        raw_f = raw_f or ws_frame(payload)
                        c.pending.append(raw_f)
                    c.pending_frames += 1
                    self._dirty.add(c)
            self.stats["replay_frames"] += 1
            if not recorded and self.stats["replay_frames"] % 256 == 0:
                self._flush()
                await asyncio.sleep(0)
        self._flush()
        log.info("sim replay finished", extra={"frames": len(frames)})


class _RestError(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def _query_value(v: str) -> Any:
    """Query-string fault parameters: numbers and true/false/null parse as JSON."""
    try:
        return orjson.loads(v)
    except orjson.JSONDecodeError:
        return v


def _json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    data = _json_bytes(body)
    h = Headers()
    h["Content-Type"] = "application/json;charset=UTF-8"
    h["Content-Length"] = str(len(data))
    h["Connection"] = "close"
    for k, v in (headers or {}).items():
        h[k] = v
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    return Response(status, reason, h, data)


def _symbol_entry(spec: mk.SymbolSpec) -> dict[str, Any]:
    """One exchangeInfo symbol, current schema (rest/docs/exchangeInfo.json + filters.json)."""

    def d(x: Any) -> str:
        return mk.fmt_units(mk.to_units(x))

    return {
        "symbol": spec.symbol,
        "status": "TRADING",
        "baseAsset": spec.base_asset,
        "baseAssetPrecision": 8,
        "quoteAsset": spec.quote_asset,
        "quotePrecision": 8,
        "quoteAssetPrecision": 8,
        "baseCommissionPrecision": 8,
        "quoteCommissionPrecision": 8,
        "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET"],
        "icebergAllowed": False,
        "ocoAllowed": False,
        "otoAllowed": False,
        "opoAllowed": False,
        "quoteOrderQtyMarketAllowed": False,
        "allowTrailingStop": False,
        "cancelReplaceAllowed": True,
        "amendAllowed": True,
        "pegInstructionsAllowed": False,
        "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": False,
        "filters": [
            {
                "filterType": "PRICE_FILTER",
                "minPrice": d(spec.tick_size),
                "maxPrice": d("1000000"),
                "tickSize": d(spec.tick_size),
            },
            {
                "filterType": "LOT_SIZE",
                "minQty": d(spec.min_qty),
                "maxQty": d(spec.max_qty),
                "stepSize": d(spec.step_size),
            },
            {
                "filterType": "MARKET_LOT_SIZE",
                "minQty": d(spec.min_qty),
                "maxQty": d(spec.max_qty),
                "stepSize": d(spec.step_size),
            },
            {
                "filterType": "NOTIONAL",
                "minNotional": d(spec.min_notional),
                "applyMinToMarket": True,
                "maxNotional": d(spec.max_notional),
                "applyMaxToMarket": False,
                "avgPriceMins": 5,
            },
            {"filterType": "MAX_NUM_ORDERS", "maxNumOrders": 200},
        ],
        "permissions": [],
        "permissionSets": [["SPOT"]],
        "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": ["NONE", "EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
    }


def _malformed_frames(kind: str, count: int, size: int) -> list[bytes]:
    """Bytes to write for the ``malformed`` fault (each entry is written as-is)."""
    sample = b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1,"s":"BTCUSDT","a":1}}'
    if kind == "truncated":  # valid frame, JSON cut short
        one = ws_frame(sample[: len(sample) // 2])
    elif kind == "invalid_json":
        one = ws_frame(b"this is not json {")
    elif kind == "oversized":  # valid JSON, larger than clients' usual 1 MiB max_size
        pad = max(0, size - 16)
        one = ws_frame(b'{"pad":"' + b"x" * pad + b'"}')
    elif kind == "binary":
        one = ws_frame(b"\x00\x01\x02\xffbinary", opcode=0x2)
    elif kind == "bad_utf8":
        one = ws_frame(b'{"s":"\xff\xfe"}')
    elif kind == "torn":  # header promises more bytes than follow: the stream desyncs
        one = struct.pack("!BB", 0x81, 100) + sample[:20]
    else:  # parse_fault validated it
        raise FaultError(kind)
    return [one] * count
