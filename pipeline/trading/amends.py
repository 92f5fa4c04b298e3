"""One REPLACED per amend: which of an amend's two messages (its reply, its executionReport
``x=REPLACED``) is the first, and which client the answer goes to.

Why apart from the order table: it is one rule with its own state on each order
(:attr:`TrackedOrder.replaced_qty`, :attr:`TrackedOrder.amend_requesters`), used by the
table's reply and user-data handlers and by order entry when an amend is sent. Pure: no I/O.

Why the quantity identifies the amend: an amend only reduces (binance-protocol.md 2.11), so the
quantities an order's amends leave are strictly decreasing. A REPLACED at or above the lowest
quantity already published is one we have published; a lower one is a new amend (ours, or one
whose reply was lost in a reconnect). Nothing depends on which message arrives first, or on the
reply arriving at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.trading.ordertable import TrackedOrder


def amend_sent(order: TrackedOrder, qty: float, client_id: int) -> None:
    """An amend of ``order`` to ``qty`` went out for ``client_id``: its REPLACED goes there."""
    if order.amend_requesters is None:
        order.amend_requesters = {}
    order.amend_requesters[qty] = client_id


def amend_requester(order: TrackedOrder, qty: float, default: int) -> int:
    """The client that asked for the amend to ``qty`` (forgotten once asked), else
    ``default``. At most one entry per amend sent: the venue allows 10 per order."""
    requesters = order.amend_requesters
    if not requesters:
        return default
    return requesters.pop(qty, default)


def first_replace(order: TrackedOrder, qty: float, metrics: dict[str, float]) -> bool:
    """True (and the amend counted, the quantity taken) the first time the amend that left
    ``order`` at ``qty`` is seen, from its reply or its report, whichever came first; False
    for the other one, which then only adds state (never raises the quantity back)."""
    if qty <= 0 or (order.replaced_qty and qty >= order.replaced_qty):
        return False
    order.replaced_qty = qty
    order.qty = qty if not order.qty else min(order.qty, qty)
    order.amends += 1
    metrics["orders_amended"] += 1
    return True
