"""What a strategy imports to trade: :class:`OrderClient` and the answers it reads back.

Why a module of its own: a strategy process should load the ring client and the record layouts
(:mod:`pipeline.trading.wire`), never the WS API session core, the signing library or the
WebSocket client that the trading process needs (``tests/test_trading_client_imports.py`` holds
this).

Client order ids are generated here, unique across restarts (``<client tag>`` + start time in
base 36 + sequence), and match ``[A-Za-z0-9_-]{1,36}``.
"""

from __future__ import annotations

import re
import struct
import time
from typing import Any, NamedTuple

import numpy as np

from pipeline.ipc.ring import RingReader, RingWriter
from pipeline.trading.wake import WAKE_SCAN, WakeSender, wake_name_for
from pipeline.trading.wire import (
    EXEC_DTYPE,
    EXEC_RING,
    EXPIRY_REASONS,
    FLAG_WORKING,
    MAX_REPLY_CHUNKS,
    ORDER_DTYPE,
    ORDER_RING_PREFIX,
    REPLY_RING,
    REQUEST_METHODS,
    SIDES,
    STP_MODES,
    TIFS,
    TYPES,
    ExecKind,
    OrderAction,
    OrderStatus,
    client_id_of,
    reply_ring_for,
)


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


class ReplyLostError(RuntimeError):
    """Part of a reply was overwritten before this client read it (its reader was lapped)."""


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


class ExecReport(NamedTuple):
    """One execution record, decoded for people and JSON.

    Why a NamedTuple (it was a frozen dataclass): a report is built for every record a strategy
    reads, on the path between an answer landing in the exec ring and the strategy seeing it,
    and a tuple is one allocation where the frozen dataclass set each of its 26 fields through
    ``object.__setattr__`` (3 of the 7 us a report cost). What users relied on is kept: the
    same attributes, read only (assigning one raises ``AttributeError``, as the dataclass's
    ``FrozenInstanceError`` is one), equal only to an :class:`ExecReport` with equal fields
    (never to a plain tuple), the same hash, the same repr, no ordering. ``_replace`` does what
    ``dataclasses.replace`` did; :meth:`as_dict` is unchanged.
    """

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
    # from the venue's executionReport (issue #13); defaults on records that had none
    exec_id: int = -1  # I
    expiry_reason: str = ""  # eR, e.g. UNFILLED_IOC_QUANTITY_EXPIRED ("" = not sent)
    stp_mode: str = ""  # V
    working: bool = False  # w: on the book
    last_quote: float = 0.0  # Y
    prevented_qty: float = 0.0  # A: expired by self-trade prevention
    quote_order_qty: float = 0.0  # Q: a MARKET order's quote quantity

    # Equal to an ExecReport with equal fields only: a plain tuple of the same values is not
    # one (a tuple's own __eq__ would say it is, either way round).
    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return tuple.__eq__(self, other)
        return False if isinstance(other, tuple) else NotImplemented

    def __ne__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return tuple.__ne__(self, other)
        return True if isinstance(other, tuple) else NotImplemented

    def __hash__(self) -> int:  # the frozen dataclass's: the fields' (__eq__ would unset it)
        return tuple.__hash__(self)

    # No order, as the dataclass had none (a tuple's would compare field by field).
    def __lt__(self, other: object) -> bool:
        raise TypeError("execution reports have no order")

    def __le__(self, other: object) -> bool:
        raise TypeError("execution reports have no order")

    def __gt__(self, other: object) -> bool:
        raise TypeError("execution reports have no order")

    def __ge__(self, other: object) -> bool:
        raise TypeError("execution reports have no order")

    @classmethod
    def from_record(cls, r: Any) -> ExecReport:
        """Decode one EXEC_DTYPE record. Why through its bytes and :data:`_EXEC_STRUCT`: one
        ``struct`` call turns the record into Python scalars (~0.5 us; numpy's ``item()``
        took ~1 us, a numpy field lookup per attribute ~16 us)."""
        return _report(_unpack_exec(r.tobytes()))

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(self._fields, self, strict=True))


def _record_struct(dtype: np.dtype[Any]) -> struct.Struct:
    """The :mod:`struct` layout of one record of ``dtype``: its fields in order, at their
    offsets (padding skipped), each as the same Python value numpy's ``item()`` gives, except
    that a bytes field keeps its trailing NULs (numpy strips them; :func:`_report` does).
    Derived from the dtype, so the two cannot drift apart; a field kind it does not know is an
    ImportError, not a wrong decode."""
    codes = {"u1": "B", "u2": "H", "u4": "I", "i4": "i", "i8": "q", "f8": "d"}
    fmt, pos = ["<"], 0
    for name in dtype.names or ():
        ft, off = dtype.fields[name][:2]  # type: ignore[index]
        if off < pos or ft.str[0] not in "<|":
            raise ImportError(f"exec record field {name!r}: unexpected layout {ft.str}")
        fmt.append(f"{off - pos}x" if off > pos else "")
        if ft.kind == "S":
            fmt.append(f"{ft.itemsize}s")
        elif ft.str[1:] in codes:
            fmt.append(codes[ft.str[1:]])
        else:
            raise ImportError(f"exec record field {name!r}: no struct code for {ft.str}")
        pos = off + ft.itemsize
    fmt.append(f"{dtype.itemsize - pos}x" if dtype.itemsize > pos else "")
    out = struct.Struct("".join(fmt))
    if out.size != dtype.itemsize:
        raise ImportError(f"exec record: struct size {out.size} != {dtype.itemsize}")
    return out


_EXEC_STRUCT = _record_struct(EXEC_DTYPE)
_unpack_exec = _EXEC_STRUCT.unpack
_iter_unpack_exec = _EXEC_STRUCT.iter_unpack
# The order of the unpacked values: the unpacking in _report names each field by position, so a
# change to EXEC_DTYPE must be made there too (checked here, at import, not on a strategy's
# first report).
_EXEC_FIELDS = ("kind", "status", "side", "flags", "error_code", "client_id", "expiry_reason",
                "stp_mode", "_pad2", "order_id", "price", "qty", "last_qty", "last_price",
                "cum_qty", "cum_quote", "submit_time_ns", "event_time_ns", "publish_time_ns",
                "sent_time_ns", "reply_time_ns", "exec_id", "last_quote", "prevented_qty",
                "quote_order_qty", "symbol", "client_order_id", "error_msg")  # fmt: skip
if EXEC_DTYPE.names != _EXEC_FIELDS:
    raise ImportError("EXEC_DTYPE changed: update _EXEC_FIELDS and _report in trading/client.py")
_CLIENT_ID = _EXEC_FIELDS.index("client_id")
# number -> name, as ExecKind(n).name / OrderStatus(n).name give it (a number neither knows
# still raises their ValueError: a corrupt record is not given a name)
_KIND_NAMES = {k.value: k.name for k in ExecKind}
_STATUS_NAMES = {s.value: s.name for s in OrderStatus}
_SIDE_NAMES = dict(enumerate(SIDES))
_EXPIRY_NAMES = dict(enumerate(EXPIRY_REASONS))
_STP_NAMES = dict(enumerate(STP_MODES))
_new_report = tuple.__new__  # the NamedTuple's own __new__ takes 26 arguments one by one
# Text fields as numpy gives them (trailing NULs stripped, then decoded), at less cost: an
# empty error message is compared whole (stripping 128 NULs costs ~0.3 us), and the few
# symbols a strategy trades are decoded once.
_NO_TEXT = bytes(EXEC_DTYPE["error_msg"].itemsize)
_SYMBOL_TEXT: dict[bytes, str] = {}


def _symbol_text(raw: bytes) -> str:
    text = raw.rstrip(b"\0").decode("utf-8", "replace")
    if len(_SYMBOL_TEXT) >= 4096:  # bounded: a feed of ever new symbols must not grow it
        _SYMBOL_TEXT.clear()
    _SYMBOL_TEXT[raw] = text
    return text


def _report(v: tuple[Any, ...]) -> ExecReport:
    """The report for one record's unpacked values (see :meth:`ExecReport.from_record`)."""
    (kind, status, side, flags, error_code, _client_id, expiry, stp, _pad, order_id, price, qty,
     last_qty, last_price, cum_qty, cum_quote, submit, event, publish, sent, reply, exec_id,
     last_quote, prevented, quote_qty, symbol, coid, error_msg) = v  # fmt: skip
    return _new_report(
        ExecReport,
        (
            coid.rstrip(b"\0").decode("ascii", "replace"),
            _KIND_NAMES.get(kind) or ExecKind(kind).name,
            _STATUS_NAMES.get(status) or OrderStatus(status).name,
            _SYMBOL_TEXT.get(symbol) or _symbol_text(symbol),
            _SIDE_NAMES.get(side, ""),
            order_id,
            price,
            qty,
            last_qty,
            last_price,
            cum_qty,
            cum_quote,
            error_code,
            "" if error_msg == _NO_TEXT else error_msg.rstrip(b"\0").decode("utf-8", "replace"),
            submit,
            event,
            publish,
            sent,
            reply,
            exec_id,
            _EXPIRY_NAMES.get(expiry, "OTHER"),
            _STP_NAMES.get(stp, "OTHER"),
            (flags & FLAG_WORKING) != 0,
            last_quote,
            prevented,
            quote_qty,
        ),
    )


class TradingNotRunningError(RuntimeError):
    """The trading process's rings are not there: a strategy gets this at once instead of
    sending orders nobody reads."""


# What ends a wait for each kind of request (UNKNOWN never does: it is resolved later).
PLACE_ANSWERS = frozenset({"ACK", "REJECT", "NEW", "TRADE", "RECONCILED", "CANCELED", "EXPIRED"})
CANCEL_ANSWERS = frozenset({"CANCELED", "CANCEL_REJECT", "RECONCILED", "EXPIRED"})
STATUS_ANSWERS = frozenset({"STATUS"})
AMEND_ANSWERS = frozenset({"REPLACED", "AMEND_REJECT", "RECONCILED", "CANCELED", "EXPIRED"})


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
        self,
        name: str,
        writer: RingWriter,
        reader: RingReader,
        *,
        reply_ring: str = REPLY_RING,
        wake: WakeSender | None = None,
    ) -> None:
        self.name = name
        self._wake = wake  # rings the trading process after each record (see trading/wake.py)
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
        wake = WakeSender(wake_name_for(exec_ring))
        wake.notify(WAKE_SCAN)  # a new ring: the trading process attaches now, not at its next scan
        return cls(
            name, writer, reader, reply_ring=reply_ring or reply_ring_for(exec_ring), wake=wake
        )

    def close(self) -> None:
        if self._wake is not None:
            self._wake.close()
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
        action: OrderAction,
        coid: str,
        symbol: str,
        *,
        side: str = "",
        type: str = "",
        tif: str = "",
        price: float | None = None,
        qty: float = 0.0,
        orig: str = "",
        stp: str = "",
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
            STP_MODES.index(stp),
        )
        marks = self._mark
        marks.pop(coid, None)
        if len(marks) >= self.MAX_MARKS:
            del marks[next(iter(marks))]
        marks[coid] = self._seen_base + len(self._seen)
        self._writer.publish(rec)
        if self._wake is not None:
            self._wake.notify()

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
        stp: str = "",
    ) -> str:
        """Submit a new order; returns its client order id. ``stp`` is the
        ``selfTradePreventionMode`` (NONE, EXPIRE_TAKER, EXPIRE_MAKER, EXPIRE_BOTH, DECREMENT,
        TRANSFER; "" = the venue's default for the symbol)."""
        coid = client_order_id or self._ids.next()
        _check(side, type, tif or "", symbol)
        _check_stp(stp)
        if type == "LIMIT" and tif is None:
            tif = "GTC"
        self._publish(
            OrderAction.PLACE,
            coid,
            symbol,
            side=side,
            type=type,
            tif=tif or "",
            price=price,
            qty=qty,
            stp=stp,
        )
        return coid

    def cancel(self, client_order_id: str, *, symbol: str = "") -> str:
        self._publish(OrderAction.CANCEL, client_order_id, symbol)
        return client_order_id

    def amend(self, client_order_id: str, *, qty: float, symbol: str = "") -> str:
        """Reduce ``client_order_id``'s quantity to ``qty`` keeping its queue priority
        (``order.amend.keepPriority``); the order keeps its client order id, which is returned.
        The answer is exactly one REPLACED (with the new ``qty``; from the venue's reply or its
        executionReport, whichever came first) or AMEND_REJECT: -2038 when ``qty`` is not below
        the order's quantity or not above its filled quantity, -1013 for the symbol's LOT_SIZE
        (Binance documents no notional rule for amends), or the venue's limit of 10 amends per
        order. What
        the trading process can tell from the order and the symbol's rules it refuses without
        sending (``error_msg`` says "checked locally"). An amend whose outcome is in doubt is
        answered RECONCILED once order.status has told the order's quantity.
        Use :meth:`modify` to change the price or increase the quantity."""
        if not qty > 0:
            raise ValueError("amend: qty must be positive (and below the current quantity)")
        if len(symbol.encode()) > 24:
            raise ValueError("symbol: 1-24 bytes")
        self._publish(OrderAction.AMEND, client_order_id, symbol, qty=qty)
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
        stp: str = "",
    ) -> str:
        """Cancel-replace ``client_order_id`` (``order.cancelReplace``: a price change or a
        quantity increase; queue priority is lost and the replacement is a new order); returns
        the replacement's client order id. To only reduce the quantity use :meth:`amend`.
        ``stp`` is the replacement's ``selfTradePreventionMode`` as for :meth:`place` ("" = the
        venue's default for the symbol, not the replaced order's mode)."""
        _check(side, type, tif or "", symbol or "X")
        _check_stp(stp)
        new = self._ids.next()
        self._publish(
            OrderAction.MODIFY,
            new,
            symbol,
            side=side,
            type=type,
            tif=tif or "",
            price=price,
            qty=qty,
            orig=client_order_id,
            stp=stp,
        )
        return new

    def status(self, client_order_id: str, *, symbol: str = "") -> str:
        self._publish(OrderAction.STATUS, client_order_id, symbol)
        return client_order_id

    # ---- account-level requests (answers on the reply ring) -----------------------------

    def request(self, action: OrderAction, symbol: str = "") -> str:
        """Send an account-level request (:data:`REQUEST_METHODS`); returns its request id.

        The reply ring is attached *before* the request goes out, so the answer cannot be
        missed. Raises :class:`TradingNotRunningError` if the trading process has no reply ring.
        """
        if action not in REQUEST_METHODS:
            raise ValueError(f"{action!r} is not an account-level request")
        if action is OrderAction.CANCEL_ALL and not symbol:
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
        return self.wait_reply(self.request(OrderAction.OPEN_ORDERS, symbol), timeout)

    def cancel_all(self, symbol: str, timeout: float = 10.0) -> dict[str, Any]:
        """``openOrders.cancelAll`` for ``symbol``."""
        return self.wait_reply(self.request(OrderAction.CANCEL_ALL, symbol), timeout)

    def account(self, timeout: float = 10.0) -> dict[str, Any]:
        """``account.status`` (zero balances omitted)."""
        return self.wait_reply(self.request(OrderAction.ACCOUNT), timeout)

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
        # the batch's bytes unpacked in one call: the client id is then read from each
        # record's values, not by a numpy field lookup (or numpy scalar) per record
        cid = self.client_id
        out = [_report(v) for v in _iter_unpack_exec(batch.tobytes()) if v[_CLIENT_ID] == cid]
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


def _check_stp(stp: str) -> None:
    if stp not in STP_MODES or stp == "OTHER":
        raise ValueError(f"stp must be one of {', '.join(STP_MODES[1:-1])}")
