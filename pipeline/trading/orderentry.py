"""Order entry: what a strategy asks of the session (place, cancel, modify, amend, query).

Every check that can refuse an order runs here, before anything is sent, and a refusal is a
REJECT / CANCEL_REJECT with a local code, never a silent drop: an invalid or duplicate client
order id, a malformed order, a session that is not Ready (orders are never queued: a stale
order is worse than a rejected one), a venue rate limit in force, a full order table. The
order is entered in the :class:`pipeline.trading.ordertable.OrderTable` before its request
goes out on the primary connection. This is the order-submit hot path: no call here that the
one-class session did not make.

Order semantics (binance-protocol.md 7.2): ``amend`` is ``order.amend.keepPriority`` (reduce
quantity, keep queue priority), sent with the order's own client id as ``newClientOrderId`` so
the venue does not give it a random new one and tracking by client id survives; ``modify`` is
``order.cancelReplace`` (a price change or an increase: priority lost, a new order). Cancel and
the cancel leg of cancelReplace go by ``orderId`` once an answer told us the order's id (the
venue's faster path), by ``origClientOrderId`` while it is not known or the order is UNKNOWN.
New orders ask ``newOrderRespType=RESULT``: the ack needs status, ids and executed quantity,
not the FULL fills list (the user data stream reports fills).
"""

from __future__ import annotations

from typing import Any

from pipeline.trading.amends import amend_sent
from pipeline.trading.connections import ConnectionMachine
from pipeline.trading.ordertable import OrderTable, TrackedOrder
from pipeline.trading.session_types import (
    ERROR_TEXT,
    LOCAL_AMEND_LIMIT,
    LOCAL_DUPLICATE_ID,
    LOCAL_INVALID,
    LOCAL_TABLE_FULL,
    MAX_ORDER_AMENDS,
    STP_MODES,
    SessionConfig,
)
from pipeline.trading.wire import CLIENT_ORDER_ID_RE, ExecKind, ExecUpdate, OrderStatus

PENDING = OrderStatus.PENDING


class OrderEntry:
    def __init__(self, config: SessionConfig, table: OrderTable, link: ConnectionMachine) -> None:
        self.config = config
        self._table = table
        self._orders = table.orders
        self._metrics = table.metrics
        self._link = link

    def place(
        self,
        client_order_id: str,
        symbol: str,
        side: str,
        type: str,
        qty: float,
        price: float | None = None,
        tif: str | None = None,
        *,
        submit_time_ns: int = 0,
        client_id: int = 0,
        stp: str = "",
    ) -> bool:
        """Send ``order.place``; False (and a REJECT update) if refused locally. ``stp`` is the
        ``selfTradePreventionMode`` ("" = the venue's default for the symbol)."""
        order = TrackedOrder(client_order_id, symbol, side, type, price or 0.0, qty, tif or "",
                             PENDING, -1, 0.0, 0.0, submit_time_ns, client_id)  # fmt: skip
        bad_fields = side not in ("BUY", "SELL") or qty <= 0 or (type == "LIMIT" and not price)
        if stp and stp not in STP_MODES:
            bad_fields = True
        if self._refused(order, bad_fields=bad_fields):
            return False
        params: dict[str, Any] = {"symbol": symbol}
        if stp:
            params["selfTradePreventionMode"] = stp
        self._send_new(order, "order.place", params, "place", client_order_id)
        return True

    def cancel(
        self, client_order_id: str, symbol: str | None = None, *, client_id: int = 0
    ) -> bool:
        sym = self._gate_existing(client_order_id, symbol, ExecKind.CANCEL_REJECT, client_id)
        if sym is None:
            return False
        params: dict[str, Any] = {"symbol": sym}
        self._order_ref(params, client_order_id, "orderId", "origClientOrderId")
        return self._link.send_on_primary(
            "order.cancel", params, "cancel", coid=client_order_id, tag=client_id
        )

    def amend(
        self,
        client_order_id: str,
        qty: float,
        symbol: str | None = None,
        *,
        client_id: int = 0,
    ) -> bool:
        """``order.amend.keepPriority``: reduce the quantity of ``client_order_id`` to ``qty``
        keeping its queue priority; False (and an AMEND_REJECT update) if refused locally.

        Refused here: a quantity that is not positive, or not below the order's current one
        (the venue's -2038, without the round trip), and an order amended
        :data:`MAX_ORDER_AMENDS` times already (the venue's MAX_NUM_ORDER_AMENDS filter).
        """
        sym = self._gate_existing(client_order_id, symbol, ExecKind.AMEND_REJECT, client_id)
        if sym is None:
            return False
        order = self._orders.get(client_order_id)
        code = 0
        if qty <= 0 or (order is not None and order.qty > 0 and qty >= order.qty):
            code = LOCAL_INVALID
        elif order is not None and order.amends >= MAX_ORDER_AMENDS:
            code = LOCAL_AMEND_LIMIT
        if code:
            self._answer(client_order_id, ExecKind.AMEND_REJECT, sym, code, client_id)
            return False
        params: dict[str, Any] = {"symbol": sym}
        self._order_ref(params, client_order_id, "orderId", "origClientOrderId")
        params["newClientOrderId"] = client_order_id  # keep the id: tracking survives (7.2)
        params["newQty"] = qty
        sent = self._link.send_on_primary(
            "order.amend.keepPriority", params, "amend", coid=client_order_id, tag=client_id
        )
        if sent and order is not None:  # its REPLACED goes to this client, reply or report
            amend_sent(order, qty, client_id)
        return sent

    def _order_ref(self, params: dict[str, Any], coid: str, by_id: str, by_coid: str) -> None:
        """Name an existing order by ``orderId`` once acknowledged (the venue's faster lookup,
        7.2), by client order id while its id is not known or it is UNKNOWN (the id an earlier
        answer gave may belong to what reconciliation is still finding out about)."""
        order = self._orders.get(coid)
        if (
            order is not None
            and order.order_id >= 0
            and order.status is not OrderStatus.UNKNOWN
            and order.status is not OrderStatus.PENDING
        ):
            params[by_id] = order.order_id
        else:
            params[by_coid] = coid

    def modify(
        self,
        client_order_id: str,
        new_client_order_id: str,
        *,
        qty: float,
        price: float | None = None,
        symbol: str | None = None,
        side: str | None = None,
        type: str | None = None,
        tif: str | None = None,
        submit_time_ns: int = 0,
        client_id: int = 0,
        stp: str = "",
    ) -> bool:
        """``order.cancelReplace``: cancel ``client_order_id``, place ``new_client_order_id``;
        ``stp`` is the replacement's ``selfTradePreventionMode`` ("" = the venue's default: the
        replaced order's mode is not carried over, as on Binance)."""
        old = self._orders.get(client_order_id)
        sym = symbol or (old.symbol if old else "")
        sd = side or (old.side if old else "")
        tp = type or (old.type if old else "LIMIT")
        new = TrackedOrder(
            new_client_order_id,
            sym,
            sd,
            tp,
            price or 0.0,
            qty,
            tif or (old.tif if old else "GTC"),
            submit_time_ns=submit_time_ns,
            client_id=client_id,
        )
        if self._refused(new, malformed=not sym or not sd,
                         bad_fields=bool(stp) and stp not in STP_MODES):
            return False
        params: dict[str, Any] = {
            "symbol": sym,
            "cancelReplaceMode": self.config.cancel_replace_mode,
        }
        if stp:
            params["selfTradePreventionMode"] = stp
        self._order_ref(params, client_order_id, "cancelOrderId", "cancelOrigClientOrderId")
        return self._send_new(
            new, "order.cancelReplace", params, "modify", client_order_id, new_client_order_id
        )

    def query(self, client_order_id: str, symbol: str | None = None, *, client_id: int = 0) -> bool:
        sym = self._gate_existing(
            client_order_id, symbol, ExecKind.STATUS, client_id, explain=False
        )
        if sym is None:
            return False
        return self._link.send_on_primary(
            "order.status",
            {"symbol": sym, "origClientOrderId": client_order_id},
            "status",
            coid=client_order_id,
            tag=client_id,
        )

    def _refused(
        self, order: TrackedOrder, *, malformed: bool = False, bad_fields: bool = False
    ) -> bool:
        """Reject a new order locally if it cannot go out; True if it was.

        One order of checks for place and modify, so both report the same code for the same
        fault: an invalid id (or ``malformed``), a duplicate id, ``bad_fields``, then what
        :meth:`ConnectionMachine.send_gate` says, then a full table.
        """
        coid = order.coid
        if malformed or not CLIENT_ORDER_ID_RE.match(coid):
            code = LOCAL_INVALID
        elif coid in self._orders:
            code = LOCAL_DUPLICATE_ID
        elif bad_fields:
            code = LOCAL_INVALID
        else:
            code = self._link.send_gate() or (LOCAL_TABLE_FULL if self._table.full() else 0)
        if code:
            self._table.local_reject(coid, code, order)
        return bool(code)

    def _send_new(
        self,
        order: TrackedOrder,
        method: str,
        params: dict[str, Any],
        kind: str,
        coid: str,
        new_coid: str = "",
    ) -> bool:
        """Send a request creating ``order``: its fields follow the method's own ``params``.
        Only after :meth:`_refused` passed it, in the same call: the send gate is not asked
        again (:meth:`ConnectionMachine.send_gated`)."""
        params["side"] = order.side
        params["type"] = order.type
        params["quantity"] = order.qty
        params["newClientOrderId"] = order.coid
        if order.price:
            params["price"] = order.price
        if order.type != "MARKET":
            params["timeInForce"] = order.tif or "GTC"
        params["newOrderRespType"] = "RESULT"
        self._orders[order.coid] = order
        self._metrics["orders_sent"] += 1
        self._link.send_gated(method, params, kind, coid, new_coid)
        return True

    def _gate_existing(
        self,
        client_order_id: str,
        symbol: str | None,
        kind: ExecKind,
        client_id: int,
        *,
        explain: bool = True,
    ) -> str | None:
        """The symbol a request about an existing order goes out with, or None after answering
        it locally (not ready, rate limited, or no symbol known): cancel, amend and status
        share this gate, each with its own answer kind."""
        order = self._orders.get(client_order_id)
        sym = symbol or (order.symbol if order else "")
        code = self._link.send_gate() or (LOCAL_INVALID if not sym else 0)
        if not code:
            return sym
        self._answer(client_order_id, kind, sym, code, client_id, explain=explain)
        return None

    def _answer(
        self, coid: str, kind: ExecKind, sym: str, code: int, client_id: int, *,
        explain: bool = True,
    ) -> None:  # fmt: skip
        """A request about an existing order answered locally: the order's state unchanged."""
        order = self._orders.get(coid)
        self._table.updates.append(
            ExecUpdate(
                coid,
                kind,
                order.status if order else OrderStatus.UNKNOWN,
                symbol=sym,
                qty=order.qty if order else 0.0,
                error_code=code,
                error_msg=ERROR_TEXT.get(code, "") if explain else "",
                client_id=client_id,
            )
        )
