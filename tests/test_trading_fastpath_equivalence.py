"""The order path's fast forms do what the plain forms they replaced did (issue 13 follow-up).

- The request builder's one fragment cache cannot smuggle a cached field into a frame that
  wsapi must build (``recvWindow`` given in the params), and values equal as dict keys but
  rendered apart stay apart whatever the order they arrive in.
- A PLACE through the dispatcher (send gate asked once) writes the same frame, pending request
  and order table entry as the session did, and a refused order still writes nothing.
- :class:`ExecReport` decoded by :meth:`ExecReport.from_record` equals, field for field, the
  frozen dataclass it was: same attributes, equality, hash, repr, immutability.
"""

from __future__ import annotations

import dataclasses
import json
import random
from decimal import Decimal
from typing import Any

import numpy as np
import pytest

from pipeline.binance.wsapi import RequestBuilder
from pipeline.trading.encode import TemplateRequestBuilder
from pipeline.trading.wire import (
    EXEC_DTYPE,
    EXPIRY_REASONS,
    FLAG_WORKING,
    SIDES,
    STP_MODES,
    ExecKind,
    ExecUpdate,
    OrderStatus,
    exec_record,
)

TS = 1_767_225_600_123
PLACE = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "quantity": 0.001,
         "newClientOrderId": "s-1", "price": 45000.12, "timeInForce": "GTC"}  # fmt: skip


def _pair(recv_window: int | None = 5000) -> tuple[RequestBuilder, TemplateRequestBuilder]:
    ref = RequestBuilder("key", None, recv_window_ms=recv_window, id_prefix="p-")
    tpl = TemplateRequestBuilder("key", None, recv_window_ms=recv_window, id_prefix="p-")
    return ref, tpl


def test_a_recv_window_in_the_params_is_never_served_from_the_cache() -> None:
    """The builder's own recvWindow fragment is cached; params that carry the same value must
    still go to wsapi (which keeps the caller's value once), not get it twice."""
    ref, tpl = _pair(5000)
    for params in (PLACE, {**PLACE, "recvWindow": 5000}, {**PLACE, "recvWindow": 5000}, PLACE):
        got = tpl.build("order.place", params, timestamp_ms=TS)
        assert got == ref.build("order.place", params, timestamp_ms=TS)
        assert got[1].count("recvWindow") == 1


def test_equal_keys_rendered_apart_in_any_order() -> None:
    """1, 1.0, True, Decimal 1, 0.0 and -0.0 are equal dict keys: a cache keyed by value alone
    would answer one with another's text. Shuffled, twice each, against wsapi."""
    values: list[Any] = [1, 1.0, True, Decimal("1"), 0.0, -0.0, 2.5, "1", "1.0", 1e-08]
    rng = random.Random(7)
    for recv_window in (None, 5000):
        ref, tpl = _pair(recv_window)
        seq = values * 2
        rng.shuffle(seq)
        for v in seq:
            for key in ("quantity", "price", "symbol"):
                params = {**PLACE, key: v}
                assert tpl.build("order.place", params, timestamp_ms=TS) == ref.build(
                    "order.place", params, timestamp_ms=TS
                ), (key, v)


def test_request_ids_that_need_escaping_are_escaped() -> None:
    """Generated ids skip the escape check only when the prefix is plain text."""
    for prefix in ("p-", 'q"\\-', "é-"):
        ref = RequestBuilder("key", None, id_prefix=prefix)
        tpl = TemplateRequestBuilder("key", None, id_prefix=prefix)
        for _ in range(3):
            got = tpl.build("order.place", PLACE, timestamp_ms=TS)
            assert got == ref.build("order.place", PLACE, timestamp_ms=TS)
            assert json.loads(got[1])["id"] == got[0]


class _Clock:
    def __init__(self) -> None:
        self.mono = 1_000 * 10**9
        self.wall = 1_767_225_600_123 * 10**6

    def monotonic_ns(self) -> int:
        return self.mono

    def time_ns(self) -> int:
        return self.wall


def _ready_session(recv_window: int | None) -> Any:
    """A session logged on by hand (the venue's answers written here), building its frames
    with the template builder."""
    from pipeline.binance.keys import parse_private_key
    from pipeline.trading.session import Send, Session, SessionConfig, State

    signer = parse_private_key(bytes(range(32)).hex())
    cfg = SessionConfig(api_key="key", recv_window_ms=recv_window)
    builder = TemplateRequestBuilder("key", signer, recv_window_ms=recv_window, id_prefix="p-")
    s = Session(cfg, signer, clock=_Clock(), builder=builder)

    def answer(result: dict[str, Any]) -> None:
        sends = [a for a in s.actions() if isinstance(a, Send)]
        rid = json.loads(sends[-1].text)["id"]
        s.frame_received(1, json.dumps({"id": rid, "status": 200, "result": result}))

    s.start()
    s.actions()
    s.connected(1)
    answer({"serverTime": 1_767_225_600_123})
    answer({"apiKey": "key"})
    answer({"subscriptionId": 0})
    assert s.state is State.READY
    s.updates()
    return s


def test_place_writes_the_frame_pending_request_and_order_wsapi_would() -> None:
    """A PLACE asks the send gate once now: the frame is still wsapi's byte for byte, the
    pending request and the order table entry are the ones the session always kept, and a
    refused order (duplicate id, bad side, not ready) writes nothing."""
    from pipeline.trading.session import Send

    for recv_window in (None, 5000):
        s = _ready_session(recv_window)
        ref = RequestBuilder("key", None, recv_window_ms=recv_window, id_prefix="p-")
        for _ in range(3):  # the id sequence so far: time, session.logon, subscribe
            ref.next_id()
        assert s.place("o-1", "BTCUSDT", "BUY", "LIMIT", 0.001, 45000.12, "GTC",
                       submit_time_ns=5, client_id=7, stp="EXPIRE_MAKER")  # fmt: skip
        (send,) = s.actions()
        assert isinstance(send, Send)
        params = {"symbol": "BTCUSDT", "selfTradePreventionMode": "EXPIRE_MAKER",
                  "side": "BUY", "type": "LIMIT", "quantity": 0.001, "newClientOrderId": "o-1",
                  "price": 45000.12, "timeInForce": "GTC",
                  "newOrderRespType": "RESULT"}  # fmt: skip
        rid, text = ref.build("order.place", params, timestamp_ms=1_767_225_600_123)
        assert send.text == text
        p = s.connections.conns[1].pending[rid]
        assert (p.method, p.kind, p.coid, p.new_coid, p.params) == (
            "order.place", "place", "o-1", "", params)  # fmt: skip
        assert p.deadline_ns == s.clock.mono + int(s.config.request_timeout_s * 1e9)
        order = s.tracked("o-1")
        assert (order.status, order.order_id, order.submit_time_ns, order.client_id) == (
            OrderStatus.PENDING, -1, 5, 7)  # fmt: skip
        assert s.metrics["orders_sent"] == 1
        assert not s.place("o-1", "BTCUSDT", "BUY", "LIMIT", 0.001, 45000.12)  # duplicate
        assert not s.place("o-2", "BTCUSDT", "UP", "LIMIT", 0.001, 45000.12)  # bad side
        s.stop()
        assert not s.place("o-3", "BTCUSDT", "BUY", "LIMIT", 0.001, 45000.12)  # not ready
        assert not [a for a in s.actions() if isinstance(a, Send)]
        kinds = [(u.client_order_id, u.kind) for u in s.updates()]
        # the stop leaves o-1 in doubt (written, never answered): UNKNOWN, never resent
        assert kinds == [("o-1", ExecKind.REJECT), ("o-2", ExecKind.REJECT),
                         ("o-1", ExecKind.UNKNOWN), ("o-3", ExecKind.REJECT)]  # fmt: skip
        assert s.metrics["orders_sent"] == 1


# ---- ExecReport: the NamedTuple against the frozen dataclass it replaced -------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ExecReport:
    """The reference: ExecReport and its from_record as they were before the NamedTuple (the
    class name is the same so that the reprs can be compared as they are)."""

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
    exec_id: int = -1
    expiry_reason: str = ""
    stp_mode: str = ""
    working: bool = False
    last_quote: float = 0.0
    prevented_qty: float = 0.0
    quote_order_qty: float = 0.0

    @classmethod
    def from_record(cls, r: Any) -> ExecReport:
        v = r.item()
        g = {name: i for i, name in enumerate(EXEC_DTYPE.names or ())}

        def name(names: tuple[str, ...], i: int) -> str:
            return names[i] if i < len(names) else "OTHER"

        side = v[g["side"]]
        return cls(
            client_order_id=v[g["client_order_id"]].decode("ascii", "replace"),
            kind=ExecKind(v[g["kind"]]).name,
            status=OrderStatus(v[g["status"]]).name,
            symbol=v[g["symbol"]].decode("utf-8", "replace"),
            side=SIDES[side] if side < len(SIDES) else "",
            order_id=v[g["order_id"]],
            price=v[g["price"]],
            qty=v[g["qty"]],
            last_qty=v[g["last_qty"]],
            last_price=v[g["last_price"]],
            cum_qty=v[g["cum_qty"]],
            cum_quote=v[g["cum_quote"]],
            error_code=v[g["error_code"]],
            error_msg=v[g["error_msg"]].decode("utf-8", "replace"),
            submit_time_ns=v[g["submit_time_ns"]],
            event_time_ns=v[g["event_time_ns"]],
            publish_time_ns=v[g["publish_time_ns"]],
            sent_time_ns=v[g["sent_time_ns"]],
            reply_time_ns=v[g["reply_time_ns"]],
            exec_id=v[g["exec_id"]],
            expiry_reason=name(EXPIRY_REASONS, v[g["expiry_reason"]]),
            stp_mode=name(STP_MODES, v[g["stp_mode"]]),
            working=bool(v[g["flags"]] & FLAG_WORKING),
            last_quote=v[g["last_quote"]],
            prevented_qty=v[g["prevented_qty"]],
            quote_order_qty=v[g["quote_order_qty"]],
        )


def _records(n: int) -> np.ndarray:
    """Exec records of every kind, status, side, reason and mode, odd bytes included."""
    rng = random.Random(13)
    out = np.zeros(n, dtype=EXEC_DTYPE)
    for i in range(n):
        u = ExecUpdate(
            rng.choice(["c-1", f"strat{i}-x", "ü-not-ascii", ""]),
            rng.choice(list(ExecKind)),
            rng.choice(list(OrderStatus)),
            symbol=rng.choice(["BTCUSDT", "币安USDT", ""]),
            side=rng.choice(["BUY", "SELL", ""]),
            order_id=rng.choice([-1, 0, 2**63 - 1, rng.randrange(10**12)]),
            price=rng.choice([0.0, 45000.12, 1e-08]),
            qty=rng.random(),
            last_qty=rng.random(),
            last_price=rng.random() * 1e5,
            cum_qty=rng.random(),
            cum_quote=rng.random(),
            error_code=rng.choice([0, -2010, -9001]),
            error_msg=rng.choice(["", "Filter failure: LOT_SIZE (checked locally)", "é" * 70]),
            submit_time_ns=rng.randrange(2**62),
            event_time_ns=rng.randrange(2**62),
            sent_time_ns=rng.randrange(2**62),
            reply_time_ns=rng.randrange(2**62),
            exec_id=rng.choice([-1, 117599651999]),
            expiry_reason=rng.choice([*EXPIRY_REASONS, "NEW_2027"]),
            stp_mode=rng.choice([*STP_MODES[:-1], "NEW_MODE"]),
            working=rng.random() < 0.5,
            last_quote=rng.random(),
            prevented_qty=rng.random(),
            quote_order_qty=rng.random(),
            client_id=rng.choice([7, 8]),
        )
        out[i] = exec_record(u, rng.randrange(2**62))
    out["side"][::7] = 200  # a side number no table knows: "" as before
    out["expiry_reason"][::5] = 250  # and reason / mode numbers past the tables: OTHER
    out["stp_mode"][::3] = 251
    out["flags"][::4] |= 0x80  # a flag bit of the future: only FLAG_WORKING is read
    out["symbol"][::11] = b"BT\x00C\xff"  # a NUL inside (kept) and a byte that is not UTF-8
    out["client_order_id"][::9] = b"x" * 40  # full width: no NUL to strip
    out["error_msg"][::10] = "é".encode() * 64  # full width, multi-byte
    return out


def test_exec_report_decodes_and_behaves_as_the_dataclass_did() -> None:
    from pipeline.trading.client import ExecReport as Fast

    assert Fast._fields == tuple(f.name for f in dataclasses.fields(ExecReport))
    assert Fast._field_defaults == {
        f.name: f.default for f in dataclasses.fields(ExecReport)
        if f.default is not dataclasses.MISSING
    }  # fmt: skip
    recs = _records(400)
    for r in recs:
        got, want = Fast.from_record(r), ExecReport.from_record(r)
        assert got.as_dict() == dataclasses.asdict(want)
        assert [type(x) for x in got] == [type(getattr(want, f)) for f in Fast._fields]
        assert repr(got) == repr(want)
        assert hash(got) == hash(want)
        assert got == Fast.from_record(r)
        assert not got != Fast.from_record(r)  # noqa: SIM202 (__ne__ is its own method)
        assert got != tuple(got)  # a plain tuple of the same values is not a report
        assert tuple(got) != got
        assert got != want  # nor is another class with equal fields, as for the dataclass
        assert got._replace(qty=9.0).as_dict() == dataclasses.asdict(
            dataclasses.replace(want, qty=9.0)
        )
    with pytest.raises(AttributeError):
        got.kind = "ACK"  # type: ignore[misc]
    with pytest.raises(TypeError):
        _ = got < got
    bad = recs[:1].copy()
    bad["kind"] = 99  # a kind nobody defined: the same ValueError as before, not a name
    with pytest.raises(ValueError, match="99"):
        ExecReport.from_record(bad[0])
    with pytest.raises(ValueError, match="99"):
        Fast.from_record(bad[0])


def test_poll_returns_this_clients_reports_as_from_record_does(shm_name: str) -> None:
    """OrderClient.poll reads the client id off each record's tuple now: the same reports,
    in order, and only this client's."""
    from pipeline.ipc.ring import RingReader, RingWriter
    from pipeline.trading.client import ExecReport as Fast
    from pipeline.trading.client import OrderClient

    recs = _records(300)
    writer = RingWriter.create(f"{shm_name}.exec", EXEC_DTYPE, 512)
    orders = RingWriter.create(f"{shm_name}.o", np.dtype([("x", "u1")]), 16)
    reader = RingReader.attach(f"{shm_name}.exec", name="t")
    try:
        client = OrderClient("t", orders, reader)
        client.client_id = 7
        for r in recs:
            writer.publish(r)
        got: list[Fast] = []
        while len(got) < int((recs["client_id"] == 7).sum()):
            got.extend(client.poll())
        assert got == [Fast.from_record(r) for r in recs if r["client_id"] == 7]
        assert client.reports(got[0].client_order_id)
    finally:
        reader.close()
        orders.close()
        writer.close()


def test_the_record_layout_is_derived_from_the_dtype_and_refuses_what_it_cannot_read() -> None:
    """The struct that decodes exec records follows EXEC_DTYPE (offsets, padding, widths); a
    field it has no exact code for (a float32, a big-endian number) is an ImportError at
    import time, never a silently wrong decode."""
    from pipeline.trading.client import _EXEC_STRUCT, _record_struct

    assert _EXEC_STRUCT.size == EXEC_DTYPE.itemsize
    padded = np.dtype({"names": ["a", "b"], "formats": ["u1", "<i8"], "offsets": [0, 8],
                       "itemsize": 24})  # fmt: skip
    s = _record_struct(padded)
    rec = np.zeros(1, dtype=padded)
    rec["a"], rec["b"] = 7, -5
    assert s.unpack(rec[0].tobytes()) == rec[0].item()
    for bad in (np.dtype([("a", "<f4")]), np.dtype([("a", ">i8")])):
        with pytest.raises(ImportError):
            _record_struct(bad)
