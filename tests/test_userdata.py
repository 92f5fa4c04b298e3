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


# ---- the 2026 fields (issue #13): I, eR, V, w, Y, Q and the STP set ---------------------------


def test_execution_report_carries_execution_id_working_quote_and_stp_mode() -> None:
    """Live captures: the 2026 WS API NEW (``W``/``V`` present) and the 2021 maker fill."""
    new = parse_event(load("ud_executionReport_NEW.json")[3], 0)
    assert isinstance(new, ExecutionReport)
    assert new.exec_id == 117599651999
    assert new.working is True
    assert new.stp_mode == "EXPIRE_MAKER"
    assert (new.last_quote, new.quote_order_qty) == (0.0, 0.0)
    assert new.expiry_reason == ""  # not sent on a NEW
    assert new.skipped_fields == ()
    fill = parse_event(load("ud_executionReport_TRADE.json")[0], 0)
    assert isinstance(fill, ExecutionReport)
    assert fill.exec_id == 5048627145
    assert fill.working is False
    assert fill.last_quote == 19.83
    assert fill.stp_mode == ""  # 2021 payload: no V
    assert (fill.prevented_match_id, fill.counter_order_id) == (-1, -1)


def test_doc_execution_report_prevented_match_id() -> None:
    r = parse_event(load("ud_doc_executionReport.json"), 0)
    assert isinstance(r, ExecutionReport)
    assert (r.exec_id, r.prevented_match_id, r.stp_mode) == (8641984, 3, "NONE")


def _stp_expired() -> dict:
    """A TRADE_PREVENTION report shaped like the docs' field list (section 2.15): no live
    capture exists (SOURCES.md, Gaps), so it is the docs example with the STP set filled in."""
    ev = dict(load("ud_doc_executionReport.json")["event"])
    ev.update(
        x="TRADE_PREVENTION",
        X="EXPIRED_IN_MATCH",
        v=4,
        A="2.00000000",
        B="2.00000000",
        U=23,
        Cs="ETHBTC",
        pl="2.00000000",
        pL="0.10264410",
        pY="0.20528820",
        eR="NONE",
        V="DECREMENT",
        w=False,
    )
    return ev


def test_trade_prevention_report_prevented_fields() -> None:
    r = parse_event(_stp_expired(), 0)
    assert isinstance(r, ExecutionReport)
    assert (r.exec_type, r.status) == ("TRADE_PREVENTION", "EXPIRED_IN_MATCH")
    assert (r.prevented_match_id, r.counter_order_id) == (4, 23)
    assert (r.prevented_qty, r.last_prevented_qty) == (2.0, 2.0)
    assert r.last_qty == 0.0  # l/L/Y are 0 on TRADE_PREVENTION; pl/pL/pY carry the values
    assert (r.expiry_reason, r.stp_mode) == ("NONE", "DECREMENT")


def test_expiry_reason_is_read() -> None:
    ev = dict(load("ud_doc_executionReport.json")["event"])
    ev.update(x="EXPIRED", X="EXPIRED", eR="UNFILLED_IOC_QUANTITY_EXPIRED")
    r = parse_event(ev, 0)
    assert isinstance(r, ExecutionReport)
    assert r.expiry_reason == "UNFILLED_IOC_QUANTITY_EXPIRED"


@pytest.mark.parametrize(
    ("field", "value", "attr", "default"),
    [
        ("eR", ["x"], "expiry_reason", ""),
        ("eR", "E" * 65, "expiry_reason", ""),
        ("V", 3, "stp_mode", ""),
        ("w", "true", "working", False),
        ("Y", "nan", "last_quote", 0.0),
        ("Y", "-1", "last_quote", 0.0),
        ("Q", [[["deep"]]], "quote_order_qty", 0.0),
        ("v", 2**64, "prevented_match_id", -1),
        ("A", "inf", "prevented_qty", 0.0),
        ("U", 1.5, "counter_order_id", -1),
    ],
)
def test_bad_descriptive_field_is_dropped_alone_and_named(
    field: str, value: object, attr: str, default: object
) -> None:
    """A malformed descriptive field must not cost the report (it may be a fill): the field
    keeps its default and the report names it for the caller's counter."""
    ev = _stp_expired()
    ev[field] = value
    r = parse_event(ev, 0)
    assert isinstance(r, ExecutionReport)
    assert getattr(r, attr) == default
    assert r.skipped_fields == (field,)
    assert r.order_id == 4293153  # the rest of the report is intact


def test_dropped_field_is_logged_without_its_value(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from pipeline.binance import userdata
    from pipeline.logs import RateLimitedLog

    monkeypatch.setattr(userdata, "_skip_log", RateLimitedLog(logging.getLogger("pipeline.ud")))
    ev = _stp_expired()
    ev["V"] = {"secret": "s3cr3t"}
    with caplog.at_level(logging.WARNING, logger="pipeline.ud"):
        parse_event(ev, 0)
    assert [r.getMessage() for r in caplog.records] == ["execution report field dropped"]
    assert caplog.records[0].field == "V"
    assert "s3cr3t" not in caplog.text


@pytest.mark.parametrize("value", [2**63, -2, 1.5, "x1", [1]])
def test_bad_execution_id_refuses_the_report(value: object) -> None:
    """``I`` de-duplicates reports across connections: a wrong one is a bad report."""
    ev = dict(load("ud_executionReport_NEW.json")[0])
    ev["I"] = value
    with pytest.raises(UserDataError):
        parse_event(ev, 0)


def test_missing_execution_id_is_minus_one() -> None:
    ev = dict(load("ud_executionReport_NEW.json")[0])
    del ev["I"]
    r = parse_event(ev, 0)
    assert isinstance(r, ExecutionReport)
    assert r.exec_id == -1
