"""Order entry over shared memory: strategy processes -> trading process -> back.

Two kinds of ring, both the ordinary :mod:`pipeline.ipc.ring` machinery:

- **Order rings** ``pipeline.orders.<client>`` (:data:`ORDER_DTYPE`), one per client process,
  written by :class:`OrderClient`, read by the trading process, which discovers them by
  scanning ``/dev/shm`` for the prefix every ``scan_interval_s``. A client may publish as soon
  as its ring exists: the trading process reads a newly found ring from its oldest record.
- **The execution ring** ``pipeline.trading.exec`` (:data:`EXEC_DTYPE`), written by the trading
  process: acks, rejects, fills, cancels, UNKNOWN / RECONCILED states, status answers. Each
  client reads it (``RingReader``) and keeps the records of its ``client_id``.
- **The reply ring** ``pipeline.trading.replies`` (:data:`REPLY_DTYPE`), written by the trading
  process: the JSON answers to the account-level requests (``OPEN_ORDERS`` ->
  ``openOrders.status``, ``CANCEL_ALL`` -> ``openOrders.cancelAll``, ``ACCOUNT`` ->
  ``account.status``). Those answers are unbounded JSON (an account lists every asset), so they
  do not fit a fixed exec record: each is cut into :data:`REPLY_CHUNK`-byte chunks, one record
  each, tagged with the client id, the request id, the chunk index and the chunk count; the
  client reassembles them (:class:`ReplyAssembler`). A reply is capped at :data:`MAX_REPLY_BYTES`
  (a quarter of the ring, so a reader that is merely slow is never lapped mid-reply); a bigger
  one is replaced by an error reply saying so (ask per symbol instead). A reader that *was*
  lapped (``missed`` grew) gets an error, never a corrupt reply. Why a ring and not files: it
  is the mechanism every process already has, needs no cleanup of per-request files, and the
  conftest/health tooling already understands its segments.

Duplicate protection at the boundary: the trading process refuses (REJECT, code
:data:`LOCAL_STALE`) any order record submitted before it started or older than
``max_order_age_s``, so a restarted trading process never re-executes what an earlier instance
may already have sent. Client order ids are generated here, unique across restarts
(``<client tag>`` + start time in base 36 + sequence), and match ``[A-Za-z0-9_-]{1,36}``.
"""

from __future__ import annotations

import logging
import os
import re
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from pipeline.ipc import shm
from pipeline.ipc.ring import RingLayoutError, RingReader, RingUntrustedError, RingWriter
from pipeline.trading.wire import ExecKind, ExecUpdate, OrderStatus

log = logging.getLogger("pipeline.orders")

ORDER_RING_PREFIX = "pipeline.orders."
EXEC_RING = "pipeline.trading.exec"
REPLY_RING = "pipeline.trading.replies"


def reply_ring_for(exec_ring: str) -> str:
    """The reply ring that goes with an exec ring (``X.exec`` -> ``X.replies``), so a trading
    process and its clients agree on it from the one name they already share."""
    base = exec_ring[: -len(".exec")] if exec_ring.endswith(".exec") else exec_ring
    return f"{base}.replies"


LOCAL_STALE = -9008
# The pre-trade risk check (``pipeline trade --risk-limits``) refused the order; error_msg
# names the limit (``max_position BTCUSDT: ...``, ``risk_unavailable: ...``, ``risk_stale: ...``).
LOCAL_RISK = -9009
LOCAL_REPLY_TOO_LARGE = -9010


class Action(IntEnum):
    PLACE = 1
    CANCEL = 2
    MODIFY = 3  # order.cancelReplace: cancel orig_client_order_id, place client_order_id
    STATUS = 4
    OPEN_ORDERS = 5  # openOrders.status (symbol optional); answer on the reply ring
    CANCEL_ALL = 6  # openOrders.cancelAll (symbol required); answer on the reply ring
    ACCOUNT = 7  # account.status (zero balances omitted); answer on the reply ring


# Account-level requests: action -> WS API method. Their answers go to the reply ring.
REQUEST_METHODS: dict[Action, str] = {
    Action.OPEN_ORDERS: "openOrders.status",
    Action.CANCEL_ALL: "openOrders.cancelAll",
    Action.ACCOUNT: "account.status",
}

SIDES = ("", "BUY", "SELL")
TYPES = ("", "LIMIT", "MARKET", "LIMIT_MAKER")
TIFS = ("", "GTC", "IOC", "FOK")

ORDER_DTYPE = np.dtype(
    [
        ("action", "u1"),  # Action
        ("side", "u1"),  # index into SIDES
        ("type", "u1"),  # index into TYPES
        ("tif", "u1"),  # index into TIFS (0 = exchange default / not applicable)
        ("client_id", "<u4"),  # crc32 of the client name; routes execution records back
        ("price", "<f8"),  # 0 = none (MARKET)
        ("qty", "<f8"),
        ("submit_time_ns", "<i8"),  # client wall clock at submission
        ("symbol", "S24"),
        ("client_order_id", "S40"),  # PLACE/MODIFY: the new order's id; CANCEL/STATUS: target
        ("orig_client_order_id", "S40"),  # MODIFY: the order being replaced
    ],
    align=True,
)

EXEC_DTYPE = np.dtype(
    [
        ("kind", "u1"),  # pipeline.session.ExecKind
        ("status", "u1"),  # pipeline.session.OrderStatus
        ("side", "u1"),  # index into SIDES
        ("_pad", "u1"),
        ("error_code", "<i4"),  # Binance code (< 0), or a LOCAL_* code (-9xxx), 0 = none
        ("client_id", "<u4"),
        ("_pad2", "<u4"),
        ("order_id", "<i8"),  # exchange orderId, -1 until known
        ("price", "<f8"),
        ("qty", "<f8"),
        ("last_qty", "<f8"),  # this fill (TRADE)
        ("last_price", "<f8"),
        ("cum_qty", "<f8"),  # executed so far
        ("cum_quote", "<f8"),
        ("submit_time_ns", "<i8"),  # copied from the order record: end-to-end latency
        ("event_time_ns", "<i8"),  # exchange time of the event (0 if none)
        ("publish_time_ns", "<i8"),  # trading process wall clock when published
        ("sent_time_ns", "<i8"),  # ACK: request handed to the socket layer (trading process)
        ("reply_time_ns", "<i8"),  # ACK: response frame received (trading process)
        ("symbol", "S24"),
        ("client_order_id", "S40"),
        ("error_msg", "S128"),  # short text (truncated); codes are the contract
    ],
    align=True,
)

REPLY_CHUNK = 968  # data bytes per reply record: a record is exactly 1 KiB
REPLY_DTYPE = np.dtype(
    [
        ("client_id", "<u4"),  # crc32 of the client name, as in the exec ring
        ("chunk", "<u4"),  # 0 .. nchunks-1
        ("nchunks", "<u4"),
        ("total_len", "<u4"),  # bytes of the whole JSON text
        ("request_id", "S40"),  # the request's id (the order record's client_order_id)
        ("data", f"S{REPLY_CHUNK}"),  # a slice of UTF-8 JSON text (JSON never contains NUL)
    ],
    align=True,
)
REPLY_CAPACITY = 1 << 12  # records: 4 MiB
MAX_REPLY_BYTES = REPLY_CAPACITY * REPLY_CHUNK // 4


def client_id_of(name: str) -> int:
    return zlib.crc32(name.encode("utf-8")) & 0xFFFFFFFF


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


_TAG_RE = re.compile(r"[^A-Za-z0-9]")


class ClientOrderIds:
    """``<tag><start µs, base 36>-<seq, base 36>``: unique per client start, <= 36 chars."""

    def __init__(self, tag: str, start_ns: int | None = None) -> None:
        self._prefix = _TAG_RE.sub("", tag)[:10] + _b36((start_ns or time.time_ns()) // 1000)
        self._seq = 0

    def next(self) -> str:
        self._seq += 1
        return f"{self._prefix}-{_b36(self._seq)}"


def exec_record(u: ExecUpdate, publish_time_ns: int) -> tuple[Any, ...]:
    """An :class:`ExecUpdate` as an :data:`EXEC_DTYPE` tuple."""
    return (
        int(u.kind),
        int(u.status),
        SIDES.index(u.side) if u.side in SIDES else 0,
        0,
        int(u.error_code),
        int(u.client_id) & 0xFFFFFFFF,
        0,
        int(u.order_id),
        float(u.price),
        float(u.qty),
        float(u.last_qty),
        float(u.last_price),
        float(u.cum_qty),
        float(u.cum_quote),
        int(u.submit_time_ns),
        int(u.event_time_ns),
        publish_time_ns,
        int(u.sent_time_ns),
        int(u.reply_time_ns),
        u.symbol.encode()[:24],
        u.client_order_id.encode()[:40],
        _truncate_utf8(u.error_msg, 128),
    )


def _truncate_utf8(text: str, n: int) -> bytes:
    """At most ``n`` bytes of ``text`` without cutting a multi-byte character in half."""
    return text.encode("utf-8", "replace")[:n].decode("utf-8", "ignore").encode()


def reply_records(client_id: int, request_id: str, payload: bytes) -> np.ndarray:
    """``payload`` (JSON text) as :data:`REPLY_DTYPE` records, ready for ``publish_many``."""
    n = max(1, -(-len(payload) // REPLY_CHUNK))
    out = np.zeros(n, dtype=REPLY_DTYPE)
    out["client_id"] = client_id & 0xFFFFFFFF
    out["chunk"] = np.arange(n)
    out["nchunks"] = n
    out["total_len"] = len(payload)
    out["request_id"] = request_id.encode()[:40]
    data = out["data"]
    for k in range(n):
        data[k] = payload[k * REPLY_CHUNK : (k + 1) * REPLY_CHUNK]
    return out


class ReplyLostError(RuntimeError):
    """Part of a reply was overwritten before this client read it (its reader was lapped)."""


MAX_REPLY_CHUNKS = -(-MAX_REPLY_BYTES // REPLY_CHUNK)  # 1024: chunks of the largest reply


class ReplyAssembler:
    """Collects reply chunks for one client; :meth:`feed` returns the replies it completed.

    Chunks of one reply are published contiguously by one writer, so a reply is complete when
    all ``nchunks`` have arrived; a chunk of a reply we were not waiting for starts it afresh
    (a restarted request id, or chunks we missed the start of, are dropped by the length check).

    Bounds: at most :attr:`MAX_PENDING` (64) partial replies are kept (a reply whose first chunks
    were lapped never completes: the oldest partial one is dropped and counted in ``corrupt``),
    a chunk index or count beyond :data:`MAX_REPLY_CHUNKS` (1024) is corrupt, and at most
    :attr:`MAX_DONE` (64) finished replies wait in ``done`` for a :meth:`OrderClient.wait_reply`
    (the oldest unclaimed one goes first, counted in ``unclaimed``).
    """

    MAX_PENDING = 64
    MAX_DONE = 64

    def __init__(self, client_id: int) -> None:
        self.client_id = client_id
        self._parts: dict[str, dict[int, bytes]] = {}
        self.done: dict[str, bytes] = {}
        self.corrupt = 0
        self.unclaimed = 0

    def feed(self, batch: np.ndarray) -> list[str]:
        finished: list[str] = []
        for r in batch:
            if int(r["client_id"]) != self.client_id:
                continue
            rid = bytes(r["request_id"]).decode("ascii", "replace")
            n = int(r["nchunks"])
            chunk = int(r["chunk"])
            if not (0 < n <= MAX_REPLY_CHUNKS and 0 <= chunk < n):
                self.corrupt += 1
                continue
            parts = self._parts.get(rid)
            if parts is None:
                if len(self._parts) >= self.MAX_PENDING:
                    del self._parts[next(iter(self._parts))]
                    self.corrupt += 1
                parts = self._parts[rid] = {}
            parts[chunk] = bytes(r["data"])
            if len(parts) == n:
                payload = b"".join(parts[k] for k in range(n) if k in parts)
                del self._parts[rid]
                if len(payload) != int(r["total_len"]):
                    self.corrupt += 1
                    continue
                if rid not in self.done and len(self.done) >= self.MAX_DONE:
                    del self.done[next(iter(self.done))]
                    self.unclaimed += 1
                self.done[rid] = payload
                finished.append(rid)
        return finished


@dataclass(frozen=True, slots=True)
class ExecReport:
    """One execution record, decoded for people and JSON."""

    client_order_id: str
    kind: str
    status: str
    symbol: str
    side: str
    order_id: int
    price: float
    qty: float
    last_qty: float
    last_price: float
    cum_qty: float
    cum_quote: float
    error_code: int
    error_msg: str
    submit_time_ns: int
    event_time_ns: int
    publish_time_ns: int
    sent_time_ns: int
    reply_time_ns: int

    @classmethod
    def from_record(cls, r: Any) -> ExecReport:
        return cls(
            client_order_id=bytes(r["client_order_id"]).decode("ascii", "replace"),
            kind=ExecKind(int(r["kind"])).name,
            status=OrderStatus(int(r["status"])).name,
            symbol=bytes(r["symbol"]).decode("utf-8", "replace"),
            side=SIDES[int(r["side"])] if int(r["side"]) < len(SIDES) else "",
            order_id=int(r["order_id"]),
            price=float(r["price"]),
            qty=float(r["qty"]),
            last_qty=float(r["last_qty"]),
            last_price=float(r["last_price"]),
            cum_qty=float(r["cum_qty"]),
            cum_quote=float(r["cum_quote"]),
            error_code=int(r["error_code"]),
            error_msg=bytes(r["error_msg"]).decode("utf-8", "replace"),
            submit_time_ns=int(r["submit_time_ns"]),
            event_time_ns=int(r["event_time_ns"]),
            publish_time_ns=int(r["publish_time_ns"]),
            sent_time_ns=int(r["sent_time_ns"]),
            reply_time_ns=int(r["reply_time_ns"]),
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


class TradingNotRunningError(RuntimeError):
    pass


# What ends a wait for each kind of request (UNKNOWN never does: it is resolved later).
PLACE_ANSWERS = frozenset({"ACK", "REJECT", "NEW", "TRADE", "RECONCILED", "CANCELED", "EXPIRED"})
CANCEL_ANSWERS = frozenset({"CANCELED", "CANCEL_REJECT", "RECONCILED", "EXPIRED"})
STATUS_ANSWERS = frozenset({"STATUS"})


class OrderClient:
    """A strategy's handle on the trading process.

    ``attach`` creates this client's order ring and attaches to the execution ring *before*
    anything is sent, so no answer can be missed. ``place``/``cancel``/``modify``/``status``
    return at once (with the client order id); ``wait`` blocks for the answer.

    Bounds (a long-running strategy must not grow without limit): the last :attr:`MAX_SEEN`
    (10 000) execution reports are kept for :meth:`reports` / :meth:`wait` (the oldest half is
    dropped past that), and the submission marks of the last :attr:`MAX_MARKS` (10 000) client
    order ids; ``wait`` for an id older than that scans the reports still kept.
    """

    MAX_SEEN = 10_000
    MAX_MARKS = 10_000

    def __init__(
        self, name: str, writer: RingWriter, reader: RingReader, *, reply_ring: str = REPLY_RING
    ) -> None:
        self.name = name
        self.client_id = client_id_of(name)
        self._writer = writer
        self._reader = reader
        self._ids = ClientOrderIds(name)
        self._seen: list[ExecReport] = []
        self._seen_base = 0  # reports dropped from the front of _seen (marks are absolute)
        self._mark: dict[str, int] = {}
        self.missed = 0
        self.reply_ring = reply_ring
        self._replies: RingReader | None = None
        self._assembler = ReplyAssembler(self.client_id)
        self._reply_missed = 0

    @classmethod
    def attach(
        cls,
        name: str,
        *,
        exec_ring: str = EXEC_RING,
        capacity: int = 1024,
        prefix: str | None = None,
        reply_ring: str | None = None,
    ) -> OrderClient:
        """``prefix`` (default :data:`ORDER_RING_PREFIX`) must match the trading process's
        ``TradingConfig.order_prefix``; ``reply_ring`` (default :func:`reply_ring_for` the exec
        ring) its reply ring."""
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", name):
            raise ValueError("client name: 1-40 letters, digits, '_' or '-'")
        try:
            reader = RingReader.attach(exec_ring, name=f"oc.{name}"[:24])
        except FileNotFoundError:
            raise TradingNotRunningError(
                f"execution ring {exec_ring!r} not found: is `pipeline trade` running?"
            ) from None
        try:
            writer = RingWriter.create(
                (ORDER_RING_PREFIX if prefix is None else prefix) + name, ORDER_DTYPE, capacity
            )
        except BaseException:
            reader.close()
            raise
        return cls(name, writer, reader, reply_ring=reply_ring or reply_ring_for(exec_ring))

    def close(self) -> None:
        self._writer.close()
        self._reader.close()
        if self._replies is not None:
            self._replies.close()

    def __enter__(self) -> OrderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _publish(
        self,
        action: Action,
        coid: str,
        symbol: str,
        *,
        side: str = "",
        type: str = "",
        tif: str = "",
        price: float | None = None,
        qty: float = 0.0,
        orig: str = "",
    ) -> None:
        rec = (
            int(action),
            SIDES.index(side),
            TYPES.index(type),
            TIFS.index(tif),
            self.client_id,
            float(price or 0.0),
            float(qty),
            time.time_ns(),
            symbol.encode(),
            coid.encode(),
            orig.encode(),
        )
        marks = self._mark
        marks.pop(coid, None)
        if len(marks) >= self.MAX_MARKS:
            del marks[next(iter(marks))]
        marks[coid] = self._seen_base + len(self._seen)
        self._writer.publish(rec)

    def place(
        self,
        *,
        symbol: str,
        side: str,
        type: str = "LIMIT",
        qty: float,
        price: float | None = None,
        tif: str | None = None,
        client_order_id: str | None = None,
    ) -> str:
        """Submit a new order; returns its client order id."""
        coid = client_order_id or self._ids.next()
        _check(side, type, tif or "", symbol)
        if type == "LIMIT" and tif is None:
            tif = "GTC"
        self._publish(
            Action.PLACE, coid, symbol, side=side, type=type, tif=tif or "", price=price, qty=qty
        )
        return coid

    def cancel(self, client_order_id: str, *, symbol: str = "") -> str:
        self._publish(Action.CANCEL, client_order_id, symbol)
        return client_order_id

    def modify(
        self,
        client_order_id: str,
        *,
        qty: float,
        price: float | None = None,
        symbol: str = "",
        side: str = "",
        type: str = "",
        tif: str | None = None,
    ) -> str:
        """Cancel-replace ``client_order_id``; returns the replacement's client order id."""
        _check(side, type, tif or "", symbol or "X")
        new = self._ids.next()
        self._publish(
            Action.MODIFY,
            new,
            symbol,
            side=side,
            type=type,
            tif=tif or "",
            price=price,
            qty=qty,
            orig=client_order_id,
        )
        return new

    def status(self, client_order_id: str, *, symbol: str = "") -> str:
        self._publish(Action.STATUS, client_order_id, symbol)
        return client_order_id

    # ---- account-level requests (answers on the reply ring) -----------------------------

    def request(self, action: Action, symbol: str = "") -> str:
        """Send an account-level request (:data:`REQUEST_METHODS`); returns its request id.

        The reply ring is attached *before* the request goes out, so the answer cannot be
        missed. Raises :class:`TradingNotRunningError` if the trading process has no reply ring.
        """
        if action not in REQUEST_METHODS:
            raise ValueError(f"{action!r} is not an account-level request")
        if action is Action.CANCEL_ALL and not symbol:
            raise ValueError("cancel-all needs a symbol")
        if symbol and len(symbol.encode()) > 24:
            raise ValueError("symbol: 1-24 bytes")
        if self._replies is None:
            try:
                self._replies = RingReader.attach(self.reply_ring, name=f"or.{self.name}"[:24])
            except FileNotFoundError:
                raise TradingNotRunningError(
                    f"reply ring {self.reply_ring!r} not found: is `pipeline trade` running?"
                ) from None
        rid = "r" + self._ids.next()
        self._publish(action, rid[:36], symbol)
        return rid[:36]

    def open_orders(self, symbol: str = "", timeout: float = 10.0) -> dict[str, Any]:
        """``openOrders.status`` (all symbols when ``symbol`` is empty)."""
        return self.wait_reply(self.request(Action.OPEN_ORDERS, symbol), timeout)

    def cancel_all(self, symbol: str, timeout: float = 10.0) -> dict[str, Any]:
        """``openOrders.cancelAll`` for ``symbol``."""
        return self.wait_reply(self.request(Action.CANCEL_ALL, symbol), timeout)

    def account(self, timeout: float = 10.0) -> dict[str, Any]:
        """``account.status`` (zero balances omitted)."""
        return self.wait_reply(self.request(Action.ACCOUNT), timeout)

    def wait_reply(self, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The decoded reply: ``{"request_id", "method", "ok", "status", "result", "error"}``.

        Raises ``TimeoutError``, or :class:`ReplyLostError` when this client's reply reader
        was lapped while the reply was in the ring.
        """
        import json

        if self._replies is None:
            raise ValueError("no request sent yet")
        reader = self._replies
        deadline = time.monotonic() + timeout
        while True:
            payload = self._assembler.done.pop(request_id, None)
            if payload is not None:
                out: dict[str, Any] = json.loads(payload)
                return out
            if reader.missed > self._reply_missed:
                self._reply_missed = reader.missed
                raise ReplyLostError(
                    f"reply ring {self.reply_ring!r} lapped this reader: answer to "
                    f"{request_id} lost, ask again"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply for {request_id} within {timeout} s")
            reader.wait(min(left, 0.05))
            self._assembler.feed(reader.poll())

    def poll(self) -> list[ExecReport]:
        """New execution records for this client."""
        batch = self._reader.poll()
        self.missed = self._reader.missed
        out = [ExecReport.from_record(r) for r in batch if int(r["client_id"]) == self.client_id]
        seen = self._seen
        seen.extend(out)
        if len(seen) > self.MAX_SEEN:
            drop = len(seen) - self.MAX_SEEN // 2
            del seen[:drop]
            self._seen_base += drop
        return out

    def reports(self, client_order_id: str) -> list[ExecReport]:
        return [r for r in self._seen if r.client_order_id == client_order_id]

    def wait(
        self, client_order_id: str, timeout: float = 10.0, kinds: frozenset[str] | None = None
    ) -> ExecReport:
        """The first answer for ``client_order_id`` since it was submitted.

        ``kinds`` defaults to any record but UNKNOWN (an unknown order is being reconciled:
        keep waiting for the verdict). Raises ``TimeoutError``.
        """
        pos = self._mark.get(client_order_id, 0)  # absolute report number (see _seen_base)
        deadline = time.monotonic() + timeout
        while True:
            seen, base = self._seen, self._seen_base
            for r in seen[max(0, pos - base) :]:
                if r.client_order_id != client_order_id:
                    continue
                if (kinds is None and r.kind != "UNKNOWN") or (kinds and r.kind in kinds):
                    return r
            pos = base + len(seen)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer for {client_order_id} within {timeout} s")
            self._reader.wait(min(left, 0.05))
            self.poll()


def _check(side: str, type: str, tif: str, symbol: str) -> None:
    if side not in SIDES or type not in TYPES or tif not in TIFS:
        raise ValueError("side must be BUY|SELL, type LIMIT|MARKET|LIMIT_MAKER, tif GTC|IOC|FOK")
    if not symbol or len(symbol.encode()) > 24:
        raise ValueError("symbol: 1-24 bytes")


@dataclass(slots=True)
class OrderCommand:
    """A decoded order record, ready for the session."""

    action: Action
    client_id: int
    client_order_id: str
    orig_client_order_id: str
    symbol: str
    side: str
    type: str
    tif: str
    price: float
    qty: float
    submit_time_ns: int


def decode_order(r: Any) -> OrderCommand:
    def idx(table: tuple[str, ...], v: Any) -> str:
        i = int(v)
        return table[i] if 0 <= i < len(table) else "?"

    return OrderCommand(
        action=Action(int(r["action"])),
        client_id=int(r["client_id"]),
        client_order_id=bytes(r["client_order_id"]).decode("ascii", "replace"),
        orig_client_order_id=bytes(r["orig_client_order_id"]).decode("ascii", "replace"),
        symbol=bytes(r["symbol"]).decode("utf-8", "replace"),
        side=idx(SIDES, r["side"]),
        type=idx(TYPES, r["type"]),
        tif=idx(TIFS, r["tif"]),
        price=float(r["price"]),
        qty=float(r["qty"]),
        submit_time_ns=int(r["submit_time_ns"]),
    )


class OrderIntake:
    """The trading process's side: finds order rings and yields their commands.

    Pure except for the ring calls; time comes in as arguments.

    Trust: a name under the prefix is attached only if it passes the shared-memory trust rule
    (:mod:`pipeline.ipc.shm`: a regular file of our uid, no group/other bits, no symlink, no FIFO);
    anything else is refused once per (name, inode), logged, counted in ``untrusted`` and not
    opened again until the name holds another file. Another uid therefore cannot place orders
    through us by planting ``pipeline.orders.<x>``.

    Dead clients: a ring whose writer died (or closed) is read to its end once, its records
    executed or rejected as stale by the usual rules, then *reaped*: closed and unlinked by us
    if the name still holds that same file (``reaped`` += 1). Every command is taken at most
    once per ring incarnation whatever happens to the name: the next sequence to read is kept
    per (name, inode, epoch), so a ring that is found again (an unlink that failed, a rescan)
    resumes where it was left instead of being re-read from its oldest record. That makes every
    action idempotent across re-reads, cancel-all, status and account included.

    Bounds: at most :data:`MAX_TRACKED` (4096) ring incarnations are remembered as read-up-to
    and as refused (oldest forgotten first).
    """

    MAX_TRACKED = 4096

    def __init__(
        self, *, start_time_ns: int, max_order_age_s: float = 5.0, prefix: str = ORDER_RING_PREFIX
    ) -> None:
        self.prefix = prefix
        self.start_time_ns = start_time_ns
        self.max_age_ns = int(max_order_age_s * 1e9)
        self.readers: dict[str, RingReader] = {}
        self.stale = 0
        self.bad = 0
        self.untrusted = 0  # names refused by the trust rule (once per name and inode)
        self.untrusted_present = 0  # of those, how many were still there at the last scan
        self.reaped = 0  # rings of dead clients drained and unlinked
        self.shrunk = 0  # rings found shorter than mapped (dropped unread, never polled)
        # (name, inode, epoch_ns) -> next sequence to read: what was taken from each incarnation
        self._done: OrderedDict[tuple[str, int, int], int] = OrderedDict()
        # name -> inode not to attach again (refused, reaped, foreign dtype, shrunk)
        self._skip: OrderedDict[str, int] = OrderedDict()
        self._refused: OrderedDict[str, int] = OrderedDict()  # name -> inode, the untrusted

    @staticmethod
    def _key(name: str, reader: RingReader) -> tuple[str, int, int]:
        return (name, reader.inode, reader.epoch_ns)

    def _remember(self, table: OrderedDict[Any, int], key: Any, value: int) -> None:
        table[key] = value
        table.move_to_end(key)
        if len(table) > self.MAX_TRACKED:
            table.popitem(last=False)

    def scan(self) -> int:
        """Attach to new order rings, reap drained rings of dead clients; returns the count."""
        present = 0
        for name in shm.list_names(self.prefix):
            if name in self.readers:
                continue
            ino = shm.current_inode(name)
            if ino is not None and self._refused.get(name) == ino:
                present += 1
            if ino is None or self._skip.get(name) == ino:
                continue
            try:
                reader = RingReader.attach(name, name=f"trading{os.getpid()}"[:24], start="oldest")
            except RingUntrustedError as exc:
                self._remember(self._skip, name, ino)  # never opened again while it is this file
                self._remember(self._refused, name, ino)
                self.untrusted += 1
                present += 1
                shm.note_refusal(exc)  # logged once per process, whoever met it first
                continue
            except (FileNotFoundError, RingLayoutError, ValueError, OSError):
                continue  # gone again, or still being created: look at the next scan
            if reader.layout.dtype != ORDER_DTYPE:
                log.warning(
                    "order ring skipped: not an order ring",
                    extra={"ring": name, "dtype": str(reader.layout.dtype)},
                )
                self._remember(self._skip, name, reader.inode)
                self.bad += 1
                reader.close()
                continue
            done = self._done.get(self._key(name, reader))
            if done is not None and done > reader.pos:
                reader.pos = done  # already taken up to there: never again
            self.readers[name] = reader
        for name, reader in list(self.readers.items()):
            if reader.shrunk():
                log.warning("order ring shrank under us: dropped unread", extra={"ring": name})
                self.shrunk += 1
                self._remember(self._skip, name, reader.inode)
                reader.close()
                del self.readers[name]
            elif not reader.writer_alive() and reader.lag <= 0:
                self._reap(name, reader)
        self.untrusted_present = present
        return len(self.readers)

    def metrics(self) -> dict[str, int]:
        """Counters for the trading process's metrics block.

        ``problem_untrusted_order_rings`` counts refused names *still present* (someone planted
        a file under the order prefix: find its owner, remove it), so health clears once it is
        gone; ``problem_order_rings_shrunk`` is cumulative (only our own uid can shrink a ring:
        something is badly wrong)."""
        return {
            "order_rings": len(self.readers),
            "orders_stale": self.stale,
            "orders_bad": self.bad,
            "order_rings_reaped": self.reaped,
            "order_rings_refused": self.untrusted,
            "problem_untrusted_order_rings": self.untrusted_present,
            "problem_order_rings_shrunk": self.shrunk,
        }

    def _reap(self, name: str, reader: RingReader) -> None:
        """A dead (or closed) client's ring, read to its end: close it and remove the name if it
        still holds this very file; remember it so it is never read again either way."""
        ino = reader.inode
        self._remember(self._done, self._key(name, reader), reader.pos)
        self._remember(self._skip, name, ino)
        reader.close()
        del self.readers[name]
        removed = False
        try:
            removed = shm.unlink_if_inode(name, ino)
        except OSError as exc:
            log.warning("order ring of a dead client not removed", extra={"ring": name,
                        "error": str(exc)})  # fmt: skip
        if removed:
            self.reaped += 1
            log.info("order ring of a dead client reaped", extra={"ring": name})

    def poll(self, now_ns: int) -> tuple[list[OrderCommand], list[ExecUpdate]]:
        """Commands to execute, and REJECTs for stale or undecodable records."""
        cmds: list[OrderCommand] = []
        rejects: list[ExecUpdate] = []
        for name, reader in self.readers.items():
            batch = reader.poll()
            if len(batch):
                self._remember(self._done, self._key(name, reader), reader.pos)
            for r in batch:
                try:
                    cmd = decode_order(r)
                except (ValueError, KeyError):
                    self.bad += 1
                    continue
                if cmd.submit_time_ns < self.start_time_ns or now_ns - cmd.submit_time_ns > (
                    self.max_age_ns
                ):
                    self.stale += 1
                    rejects.append(
                        ExecUpdate(
                            cmd.client_order_id,
                            ExecKind.REJECT,
                            OrderStatus.REJECTED,
                            symbol=cmd.symbol,
                            side=cmd.side,
                            error_code=LOCAL_STALE,
                            error_msg="stale order record not executed",
                            submit_time_ns=cmd.submit_time_ns,
                            client_id=cmd.client_id,
                        )
                    )
                    continue
                cmds.append(cmd)
        return cmds, rejects

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()
