"""Order entry over shared memory: strategy processes -> trading process -> back.

Two kinds of ring, both the ordinary :mod:`pipeline.ring` machinery:

- **Order rings** ``pipeline.orders.<client>`` (:data:`ORDER_DTYPE`), one per client process,
  written by :class:`OrderClient`, read by the trading process, which discovers them by
  scanning ``/dev/shm`` for the prefix every ``scan_interval_s``. A client may publish as soon
  as its ring exists: the trading process reads a newly found ring from its oldest record.
- **The execution ring** ``pipeline.trading.exec`` (:data:`EXEC_DTYPE`), written by the trading
  process: acks, rejects, fills, cancels, UNKNOWN / RECONCILED states, status answers. Each
  client reads it (``RingReader``) and keeps the records of its ``client_id``.

Duplicate protection at the boundary: the trading process refuses (REJECT, code
:data:`LOCAL_STALE`) any order record submitted before it started or older than
``max_order_age_s``, so a restarted trading process never re-executes what an earlier instance
may already have sent. Client order ids are generated here, unique across restarts
(``<client tag>`` + start time in base 36 + sequence), and match ``[A-Za-z0-9_-]{1,36}``.
"""

from __future__ import annotations

import os
import re
import time
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from pipeline.ring import RingReader, RingWriter
from pipeline.session import ExecKind, ExecUpdate, OrderStatus

ORDER_RING_PREFIX = "pipeline.orders."
EXEC_RING = "pipeline.trading.exec"
LOCAL_STALE = -9008


class Action(IntEnum):
    PLACE = 1
    CANCEL = 2
    MODIFY = 3  # order.cancelReplace: cancel orig_client_order_id, place client_order_id
    STATUS = 4


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
        ("error_msg", "S64"),  # short text (truncated); codes are the contract
    ],
    align=True,
)


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
        u.error_msg.encode("utf-8", "replace")[:64],
    )


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
    """

    def __init__(self, name: str, writer: RingWriter, reader: RingReader) -> None:
        self.name = name
        self.client_id = client_id_of(name)
        self._writer = writer
        self._reader = reader
        self._ids = ClientOrderIds(name)
        self._seen: list[ExecReport] = []
        self._mark: dict[str, int] = {}
        self.missed = 0

    @classmethod
    def attach(cls, name: str, *, exec_ring: str = EXEC_RING, capacity: int = 1024) -> OrderClient:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", name):
            raise ValueError("client name: 1-40 letters, digits, '_' or '-'")
        try:
            reader = RingReader.attach(exec_ring, name=f"oc.{name}"[:24])
        except FileNotFoundError:
            raise TradingNotRunningError(
                f"execution ring {exec_ring!r} not found: is `pipeline trade` running?"
            ) from None
        try:
            writer = RingWriter.create(ORDER_RING_PREFIX + name, ORDER_DTYPE, capacity)
        except BaseException:
            reader.close()
            raise
        return cls(name, writer, reader)

    def close(self) -> None:
        self._writer.close()
        self._reader.close()

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
        self._mark[coid] = len(self._seen)
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

    def poll(self) -> list[ExecReport]:
        """New execution records for this client."""
        batch = self._reader.poll()
        self.missed = self._reader.missed
        out = [ExecReport.from_record(r) for r in batch if int(r["client_id"]) == self.client_id]
        self._seen.extend(out)
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
        start = self._mark.get(client_order_id, 0)
        deadline = time.monotonic() + timeout
        while True:
            for r in self._seen[start:]:
                if r.client_order_id != client_order_id:
                    continue
                if (kinds is None and r.kind != "UNKNOWN") or (kinds and r.kind in kinds):
                    return r
            start = len(self._seen)
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
    """

    def __init__(
        self, *, start_time_ns: int, max_order_age_s: float = 5.0, prefix: str = ORDER_RING_PREFIX
    ) -> None:
        self.prefix = prefix
        self.start_time_ns = start_time_ns
        self.max_age_ns = int(max_order_age_s * 1e9)
        self.readers: dict[str, RingReader] = {}
        self.stale = 0
        self.bad = 0

    def scan(self) -> int:
        """Attach to new order rings, drop ones whose writer is gone; returns the count."""
        from pipeline.ring import list_rings

        for name in list_rings(self.prefix):
            if name in self.readers:
                continue
            try:
                reader = RingReader.attach(name, name=f"trading{os.getpid()}"[:24], start="oldest")
            except (FileNotFoundError, ValueError, OSError):
                continue
            if reader.layout.dtype != ORDER_DTYPE:
                reader.close()
                continue
            self.readers[name] = reader
        for name, reader in list(self.readers.items()):
            if not reader.writer_alive() and reader.lag == 0:
                reader.close()
                del self.readers[name]
        return len(self.readers)

    def poll(self, now_ns: int) -> tuple[list[OrderCommand], list[ExecUpdate]]:
        """Commands to execute, and REJECTs for stale or undecodable records."""
        cmds: list[OrderCommand] = []
        rejects: list[ExecUpdate] = []
        for reader in self.readers.values():
            batch = reader.poll()
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
