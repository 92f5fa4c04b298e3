"""User data events from recorded payloads (tests/fixtures/trading, see SOURCES.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.binance.userdata import (
    AccountPosition,
    BalanceUpdate,
    ExecutionReport,
    ListStatus,
    ServerShutdown,
    StreamTerminated,
    UnknownEvent,
    UserDataError,
    parse_event,
)

FIX = Path(__file__).parent / "fixtures" / "trading"


def load(name: str):
    return json.loads((FIX / name).read_text())


def test_execution_report_new_all_wrappers() -> None:
    frames = load("ud_executionReport_NEW.json")
    reports = [parse_event(f, 7) for f in frames]
    assert all(isinstance(r, ExecutionReport) for r in reports)
    first = reports[0]
    assert isinstance(first, ExecutionReport)
    assert first == reports[1]  # raw and combined forms of the same event agree
    assert first.client_order_id == "web_5440a9bd3e684127861fbc54783f70c4"
    assert first.status == "NEW"
    assert first.exec_type == "NEW"
    assert first.order_id == 3511418495
    assert first.price == 57883.65
    assert first.qty == 0.00034
    assert first.event_time_ns == 1634211568285 * 1_000_000
    assert first.recv_time_ns == 7
    assert first.commission_asset == ""
    wsapi = reports[3]
    assert isinstance(wsapi, ExecutionReport)
    assert wsapi.symbol == "BTCUSDT"


def test_execution_report_canceled_keys_by_original_id() -> None:
    r = parse_event(load("ud_executionReport_CANCELED.json")[0], 0)
    assert isinstance(r, ExecutionReport)
    assert r.status == "CANCELED"
    assert r.orig_client_order_id == "qQAC6gMAAQAAS-jxw4MW"
    assert r.order_key == "qQAC6gMAAQAAS-jxw4MW"


def test_execution_report_trade() -> None:
    frames = load("ud_executionReport_TRADE.json")
    r = parse_event(frames[0], 0)
    assert isinstance(r, ExecutionReport)
    assert (r.exec_type, r.status) == ("TRADE", "FILLED")
    assert r.last_qty == 0.1
    assert r.last_price == 198.3
    assert r.cum_quote == 19.83
    assert r.is_maker
    assert r.commission_asset == "BNB"
    assert r.trade_id == 207081035
    assert isinstance(parse_event(frames[1], 0), ExecutionReport)


def test_doc_execution_report() -> None:
    r = parse_event(load("ud_doc_executionReport.json"), 0)
    assert isinstance(r, ExecutionReport)
    assert r.client_order_id == "mUvoqJxFIILMdfAW5iGSOW"


def test_account_position() -> None:
    for frame in load("ud_outboundAccountPosition.json"):
        ev = parse_event(frame, 0)
        assert isinstance(ev, AccountPosition)
        assert ev.balances
    ev = parse_event(load("ud_outboundAccountPosition.json")[0], 0)
    assert isinstance(ev, AccountPosition)
    assert ev.balances[0].asset == "BTC"
    assert ev.balances[0].locked == 0.00029725
    assert isinstance(parse_event(load("ud_doc_outboundAccountPosition.json"), 0), AccountPosition)


def test_balance_update_list_status_terminated() -> None:
    bu = parse_event(load("ud_doc_balanceUpdate.json"), 0)
    assert isinstance(bu, BalanceUpdate)
    assert bu.delta == 100.0
    assert bu.asset == "BTC"
    ls = parse_event(load("ud_doc_listStatus.json"), 0)
    assert isinstance(ls, ListStatus)
    assert ls.order_list_id == 2
    assert ls.orders[1] == ("ETHBTC", 18, "bfYPSQdLoqAJeNrOr9adzq")
    t = parse_event(load("ud_eventStreamTerminated.json"), 0)
    assert isinstance(t, StreamTerminated)
    assert t.event_time_ns == 1771931296343 * 1_000_000
    assert isinstance(parse_event(load("ud_doc_eventStreamTerminated.json"), 0), StreamTerminated)
    assert isinstance(parse_event(load("doc_serverShutdown.json"), 0), ServerShutdown)


def test_unknown_event_types_are_not_errors() -> None:
    ev = parse_event(load("ud_doc_externalLockUpdate.json"), 0)
    assert isinstance(ev, UnknownEvent)
    assert ev.type == "externalLockUpdate"
    assert isinstance(parse_event({"foo": 1}, 0), UnknownEvent)


@pytest.mark.parametrize(
    "event",
    [
        {"e": "executionReport", "E": 1},
        {
            "e": "executionReport",
            "E": 1,
            "s": "X",
            "c": "a",
            "S": "BUY",
            "o": "LIMIT",
            "q": "abc",
            "p": "1",
            "x": "NEW",
            "X": "NEW",
            "i": 1,
        },
        {"e": "outboundAccountPosition", "E": 1, "B": "nope"},
        {"e": "balanceUpdate", "E": "x", "a": "BTC", "d": "1"},
        {"e": "eventStreamTerminated"},
    ],
)
def test_broken_known_events_raise_remote_error(event: dict) -> None:
    with pytest.raises(UserDataError) as exc:
        parse_event({"subscriptionId": 0, "event": event}, 0)
    assert exc.value.remote


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("i", 2**64),  # orderId beyond int64
        ("i", -3),
        ("i", 1.5),
        ("E", 10**17),  # ms whose ns would not fit int64
        ("T", "12x"),
        ("z", "nan"),
        ("q", "1e400"),
        ("l", "-1"),
        ("s", [[["deep"]]]),  # text fields must be strings (str() of deep JSON recurses)
        ("X", {"a": 1}),
    ],
)
def test_out_of_range_or_mistyped_fields_are_user_data_errors(field: str, value: object) -> None:
    """Venue numbers are validated at decode time (issue #11): a counted skip, never a bad
    record in the exec ring or an OverflowError later."""
    ev = load("ud_executionReport_NEW.json")[0]
    ev = dict(ev.get("event", ev))
    ev[field] = value
    with pytest.raises(UserDataError):
        parse_event(ev, 1)


def test_balance_delta_may_be_negative_but_finite() -> None:
    ev = {"e": "balanceUpdate", "E": 1, "a": "BTC", "d": "-0.5", "T": 1}
    assert isinstance(parse_event(ev, 1), BalanceUpdate)
    with pytest.raises(UserDataError):
        parse_event({**ev, "d": "-inf"}, 1)
