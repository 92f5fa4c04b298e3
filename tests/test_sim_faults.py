"""Every fault switch of `pipeline sim`, shown by its effect on the wire (real sockets)."""

from __future__ import annotations

import asyncio
import json
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets
from simhelpers import FIX, drain, run
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from pipeline.sim.faults import FaultError, Faults, apply_switch, parse_fault
from pipeline.sim.server import SimConfig
from pipeline.sim.testing import RawWs, SimServer, http_json, http_request, run_sim_process


def cfg(**kw: Any) -> SimConfig:
    base: dict[str, Any] = {"symbols": ["BTCUSDT"], "rate": 300.0, "seed": 3}
    base.update(kw)
    return SimConfig(**base)


async def post_fault(sim: SimServer, name: str, **params: Any) -> tuple[int, Any]:
    return await http_json(f"{sim.admin_url}/fault/{name}", "POST", params)


async def wsapi_or_skip(sim: SimServer) -> Any:
    if sim.sim.service is None:
        pytest.skip("pipeline.sim.wsapi not available")
    return await websockets.connect(sim.wsapi_url)


# ---- pure validation ------------------------------------------------------------------------


def test_parse_fault_validates_names_and_params() -> None:
    assert parse_fault("order_fault", {"kind": "-1007", "count": 3}).params == {
        "kind": "-1007",
        "count": 3,
    }
    assert parse_fault("malformed", {}).params["kind"] == "truncated"
    cases: list[tuple[str, dict[str, Any]]] = [
        ("nope", {}),
        ("drop", {"mode": "explode"}),
        ("malformed", {"kind": "weird"}),
        ("malformed", {"count": 0}),
        ("stall", {"duration": -1}),
        ("stall", {"durationn": 1}),
        ("order_fault", {"kind": "418"}),
        ("skip_agg_ids", {"count": 1.5}),
        ("refuse", {"mode": 503}),
    ]
    for name, params in cases:
        with pytest.raises(FaultError):
            parse_fault(name, params)


def test_switches_count_down_and_expire() -> None:
    f = Faults()
    apply_switch(f, parse_fault("rest_fail", {"count": 2}), now=0)
    assert [f.rest_should_fail(0), f.rest_should_fail(0), f.rest_should_fail(0)] == [500, 500, None]
    apply_switch(f, parse_fault("rest_fail", {"duration": 5, "status": 503}), now=10)
    assert f.rest_should_fail(14.9) == 503
    f.expire(15.0)
    assert f.rest_should_fail(15.0) is None
    apply_switch(f, parse_fault("stall", {"duration": 1}), now=0)
    assert f.stall
    f.expire(0.5)
    assert f.stall
    f.expire(1.0)
    assert not f.stall
    apply_switch(f, parse_fault("skip_agg_ids", {"count": 2, "symbol": "btcusdt"}), now=0)
    assert not f.take_skip_agg("ETHUSDT")
    assert [f.take_skip_agg("BTCUSDT") for _ in range(3)] == [True, True, False]
    apply_switch(f, parse_fault("order_fault", {"kind": "5xx", "count": 2}), now=0)
    assert (f.order_fault, f.order_fault_count) == ("5xx", 2)
    apply_switch(f, parse_fault("clear", {}), now=0)
    assert (f.order_fault, f.order_fault_count, f.stall) == (None, 0, False)
    assert f.fired["skip_agg_ids"] == 2  # counters survive clear


# ---- connection-level faults ---------------------------------------------------------------


def test_drop_aborts_every_connection_including_wsapi() -> None:
    async def go() -> None:
        async with SimServer(cfg()) as sim:
            streams = await websockets.connect(f"{sim.streams_url}/ws/btcusdt@trade")
            api = await wsapi_or_skip(sim)
            await streams.recv()
            params = {"target": "all", "mode": "abort", "code": 1011}
            assert await post_fault(sim, "drop") == (
                200,
                {"ok": True, "fault": "drop", "params": params},
            )
            for ws in (streams, api):
                with pytest.raises(ConnectionClosed):
                    await drain(ws)
                assert ws.close_code == 1006  # no closing handshake: TCP just went away
            # close mode sends a real close frame with the chosen code, streams only
            streams = await websockets.connect(f"{sim.streams_url}/ws/btcusdt@trade")
            api = await websockets.connect(sim.wsapi_url)
            await post_fault(sim, "drop", mode="close", code=1012, target="streams")
            with pytest.raises(ConnectionClosed):
                await drain(streams)
            assert streams.close_code == 1012
            await api.ping()  # untouched
            await api.close()
            assert sim.state()["faults"]["fired"]["drop"] == 2

    run(go)


def test_blackhole_stops_data_and_pongs_until_it_ends() -> None:
    async def go() -> None:
        async with SimServer(cfg()) as sim:
            url = f"{sim.streams_url}/ws/btcusdt@trade"
            # a client with a short keepalive notices the black hole by itself
            victim = await websockets.connect(
                url, ping_interval=0.05, ping_timeout=0.2, close_timeout=0.2
            )
            await victim.recv()
            raw = await RawWs.connect(url)
            await raw.read_frame()
            await post_fault(sim, "blackhole")
            with pytest.raises(ConnectionClosed):
                await drain(victim)
            # the client gave up on its keepalive (sent 1011), the server never answered
            assert victim.protocol.close_sent is not None
            assert victim.protocol.close_sent.code == 1011
            assert victim.protocol.close_rcvd is None
            assert sim.state()["faults"]["blackhole"]
            # the raw client's ping is held, not answered, while the hole lasts
            raw.send_frame(0x9, b"hi")
            await post_fault(sim, "blackhole", on=False)
            ops = []
            while 0xA not in ops:
                op, payload = await raw.read_frame()
                ops.append(op)
                if op == 0xA:
                    assert payload == b"hi"
            op, _ = await raw.read_frame()
            assert op == 0x1  # data flows again
            await raw.close()

    run(go)


def test_blackhole_with_duration_ends_by_itself() -> None:
    async def go() -> None:
        async with (
            SimServer(cfg()) as sim,
            websockets.connect(f"{sim.streams_url}/ws/btcusdt@trade") as ws,
        ):
            await ws.recv()
            await post_fault(sim, "blackhole", duration=0.2)
            pong = await ws.ping()
            await asyncio.wait_for(pong, 5)  # answered once the hole closes
            assert not sim.faults.blackhole

    run(go)


def test_stall_stops_market_data_but_answers_pings_and_ids_stay_contiguous() -> None:
    async def go() -> None:
        async with SimServer(cfg()) as sim:
            async with websockets.connect(f"{sim.streams_url}/ws/btcusdt@aggTrade") as ws:
                before = [orjson.loads(await ws.recv()) for _ in range(3)]
                await post_fault(sim, "stall")
                sent = sim.state()["stats"]["frames_sent"]
                await asyncio.wait_for(await ws.ping(), 5)  # pings still answered
                await asyncio.wait_for(await ws.ping(), 5)
                assert sim.state()["stats"]["frames_sent"] == sent
                await post_fault(sim, "stall", on=False)
                after: list[dict[str, Any]] = []
                while len(after) < 3:
                    after.append(orjson.loads(await ws.recv()))
                ids = [m["a"] for m in before + after]
                assert ids == list(range(ids[0], ids[0] + len(ids)))  # frozen, not dropped
            assert sim.state()["faults"]["fired"]["stall"] == 2

    run(go)


@pytest.mark.parametrize(
    ("kind", "check"),
    [
        ("truncated", "json_error"),
        ("invalid_json", "json_error"),
        ("binary", "bytes"),
        ("oversized", 1009),
        ("bad_utf8", 1007),
    ],
)
def test_malformed_frames_reach_the_client(kind: str, check: Any) -> None:
    async def go() -> None:
        async with SimServer(cfg(rate=5.0)) as sim:
            url = f"{sim.streams_url}/stream?streams=btcusdt@trade"
            async with websockets.connect(url) as ws:
                await post_fault(sim, "malformed", kind=kind, count=2)
                got: list[Any] = []
                try:
                    while len(got) < 2:
                        msg = await ws.recv()
                        if isinstance(msg, bytes):
                            got.append("bytes")
                            continue
                        try:
                            obj = json.loads(msg)
                        except ValueError:
                            got.append("json_error")
                            continue
                        assert "stream" in obj  # ordinary data in between is fine
                except ConnectionClosed:
                    sent = ws.protocol.close_sent  # the client failed the connection
                    got.append(sent.code if sent is not None else ws.close_code)
                assert got[0] == check
                assert sim.state()["faults"]["fired"]["malformed"] == 1

    run(go)


def test_torn_frame_desyncs_the_stream() -> None:
    async def go() -> None:
        async with SimServer(cfg(rate=50.0)) as sim:
            raw = await RawWs.connect(f"{sim.streams_url}/ws/btcusdt@trade")
            await post_fault(sim, "malformed", kind="torn", count=1)
            while True:
                _op, payload = await raw.read_frame()
                if payload.startswith(b'{"stream":"btcusdt@a'):
                    break  # the torn frame swallowed bytes of the frames after it
            assert len(payload) == 100
            await raw.close()

    run(go)


def test_shutdown_event_in_all_three_forms() -> None:
    async def go() -> None:
        async with SimServer(cfg(rate=100.0)) as sim:
            comb = await websockets.connect(f"{sim.streams_url}/stream?streams=btcusdt@trade")
            raw = await websockets.connect(f"{sim.streams_url}/ws/btcusdt@trade")
            api = await wsapi_or_skip(sim)
            await post_fault(sim, "shutdown", close_after=0.1)

            async def shutdown_frame(ws: Any) -> Any:
                while True:
                    msg = json.loads(await ws.recv())
                    if "serverShutdown" in json.dumps(msg):
                        return msg

            c, r, a = [await shutdown_frame(w) for w in (comb, raw, api)]
            event = {"e": "serverShutdown", "E": c["data"]["E"]}
            assert c == {"stream": "!serverShutdown", "data": event}
            assert r == {"e": "serverShutdown", "E": r["E"]}
            assert a == {"event": {"e": "serverShutdown", "E": a["event"]["E"]}}
            docs = json.loads((FIX / "serverShutdown_combined.json").read_text())
            assert list(c) == list(docs)
            for ws in (comb, raw, api):
                with pytest.raises(ConnectionClosed):
                    await drain(ws)
                assert ws.close_code == 1001

    run(go)


def test_skip_agg_ids_leaves_a_gap_only_rest_can_fill() -> None:
    async def go() -> None:
        async with SimServer(cfg()) as sim:
            async with websockets.connect(f"{sim.streams_url}/ws/btcusdt@aggTrade") as ws:
                first = orjson.loads(await ws.recv())
                await post_fault(sim, "skip_agg_ids", count=3, symbol="BTCUSDT")
                ids = [first["a"]]
                while len(ids) < 8:
                    ids.append(orjson.loads(await ws.recv())["a"])
            gaps = [(a, b) for a, b in pairwise(ids) if b != a + 1]
            assert len(gaps) == 1
            lo, hi = gaps[0]
            assert hi - lo - 1 == 3
            status, rest = await http_json(
                f"{sim.rest_url}/api/v3/aggTrades?symbol=BTCUSDT&fromId={lo + 1}&limit=3"
            )
            assert status == 200
            assert [r["a"] for r in rest] == [lo + 1, lo + 2, lo + 3]

    run(go)


def test_refuse_new_connections_503_and_tcp_close() -> None:
    async def go() -> None:
        async with SimServer(cfg(rate=100.0)) as sim:
            existing = await websockets.connect(f"{sim.streams_url}/ws/btcusdt@trade")
            await post_fault(sim, "refuse")
            with pytest.raises(InvalidStatus) as info:
                await websockets.connect(f"{sim.streams_url}/ws/btcusdt@trade")
            assert info.value.response.status_code == 503
            status, _ = await http_json(f"{sim.rest_url}/api/v3/time")
            assert status == 503
            await existing.recv()  # existing connections are untouched
            await post_fault(sim, "refuse", mode="close")
            with pytest.raises((InvalidMessage, OSError, EOFError)):
                await websockets.connect(f"{sim.wsapi_url}")
            await post_fault(sim, "refuse", on=False)
            async with websockets.connect(f"{sim.streams_url}/ws/btcusdt@trade") as ws:
                await ws.recv()
            await existing.close()
            assert sim.state()["faults"]["fired"]["refuse"] >= 3

    run(go)


def test_rest_fail_count_and_query_string_parameters() -> None:
    async def go() -> None:
        async with SimServer(cfg(rate=5.0)) as sim:
            status, _h, _b = await http_request(f"{sim.admin_url}/fault/rest_fail?count=2", "POST")
            assert status == 200
            url = f"{sim.rest_url}/api/v3/depth?symbol=BTCUSDT"
            statuses = [(await http_json(url))[0] for _ in range(3)]
            assert statuses == [500, 500, 200]

    run(go)


def test_venue_pass_through_switches_and_state() -> None:
    async def go() -> None:
        async with SimServer(cfg(rate=100.0)) as sim:
            assert (await post_fault(sim, "wsapi_delay", ms=250))[0] == 200
            assert (await post_fault(sim, "reject_logons", count=2))[0] == 200
            assert (await post_fault(sim, "order_fault", kind="-1007", count=3))[0] == 200
            f = sim.faults
            assert (f.wsapi_delay_ms, f.reject_logons, f.order_fault, f.order_fault_count) == (
                250, 2, "-1007", 3)
            status, err = await post_fault(sim, "order_fault", kind="teapot")
            assert status == 400
            assert "order_fault kind" in err["error"]
            status, _ = await http_json(f"{sim.admin_url}/fault/bogus", "POST", {})
            assert status == 400
            status, _h, body = await http_request(f"{sim.admin_url}/fault/stall", "POST", b"[1,")
            assert status == 400
            assert b"not JSON" in body
            async with websockets.connect(f"{sim.streams_url}/stream?streams=btcusdt@trade") as ws:
                await ws.recv()
                status, state = await http_json(f"{sim.admin_url}/state")
            assert status == 200
            assert state["connections"]["streams"] == 1
            assert state["subscriptions"] == {"btcusdt@trade": 1}
            assert state["stats"]["frames_sent"] >= 1
            assert state["faults"]["order_fault"] == "-1007"
            assert "BTCUSDT" in state["market"]
            await post_fault(sim, "clear")
            assert (f.wsapi_delay_ms, f.order_fault) == (0, None)

    run(go)


def test_subprocess_prints_urls_takes_faults_and_stops_on_sigterm() -> None:
    with run_sim_process("--symbols", "BTCUSDT", "--rate", "50", "--order-fault", "5xx:2",
                         "--fault", 'rest_fail={"count":1}') as sim:
        assert sim.streams_url == f"ws://127.0.0.1:{sim.port}"
        assert sim.wsapi_url.endswith("/ws-api/v3")
        state = sim.state()
        assert state["faults"]["order_fault"] == "5xx"
        assert state["faults"]["rest_fail_count"] == 1
        assert sim.fault("stall", duration=0.1)["ok"]
        with pytest.raises(RuntimeError, match="unknown fault"):
            sim.fault("nope")
        proc = sim.proc
    assert proc.returncode == 0


def test_cli_api_key_flag_parses_ed25519_public_pem(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

    from pipeline.sim.cli import load_api_key, parse_rate

    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "k.pem").write_bytes(pem)
    name, raw = load_api_key(f"alice={tmp_path / 'k.pem'}")
    assert name == "alice"
    assert raw == key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    rsa = generate_private_key(public_exponent=65537, key_size=1024).public_key()
    (tmp_path / "rsa.pem").write_bytes(
        rsa.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(ValueError, match="not an Ed25519"):
        load_api_key(f"bob={tmp_path / 'rsa.pem'}")
    with pytest.raises(ValueError, match="NAME=PUBLIC_KEY_PEM_PATH"):
        load_api_key("nokey")
    assert parse_rate("max") == parse_rate("0") == float("inf")
    assert parse_rate("12.5") == 12.5


# ---- 2026 changelog: serverShutdown with no fixed lead, a close with no notice (#15) --------


async def _until_closed(ws: Any) -> list[Any]:
    """Every text message until the server closes the connection."""
    got: list[Any] = []
    try:
        while True:
            got.append(json.loads(await ws.recv()))
    except ConnectionClosed:
        return got


def test_shutdown_with_no_lead_closes_right_after_the_event() -> None:
    async def go() -> None:
        async with SimServer(cfg(rate=100.0)) as sim:
            comb = await websockets.connect(f"{sim.streams_url}/stream?streams=btcusdt@trade")
            api = await wsapi_or_skip(sim)
            status, body = await post_fault(sim, "shutdown", close_after=0)
            assert status == 200
            assert body["params"] == {"target": "all", "close_after": 0.0, "notice": True}
            for ws, wrap in ((comb, "stream"), (api, "event")):
                msgs = await _until_closed(ws)
                assert ws.close_code == 1001
                shutdowns = [m for m in msgs if "serverShutdown" in json.dumps(m)]
                assert len(shutdowns) == 1
                assert msgs[-1] is shutdowns[0]  # the close follows it, nothing in between
                assert wrap in shutdowns[0]

    run(go)


def test_shutdown_without_notice_only_closes() -> None:
    """A 24 h close may come with no serverShutdown at all (binance-protocol.md 7.3)."""

    async def go() -> None:
        async with SimServer(cfg(rate=100.0)) as sim:
            raw = await websockets.connect(f"{sim.streams_url}/ws/btcusdt@trade")
            assert json.loads(await raw.recv())["e"] == "trade"  # it was streaming
            status, body = await post_fault(sim, "shutdown", notice=False)
            assert status == 200
            assert body["params"]["close_after"] == 0.0
            msgs = await _until_closed(raw)
            assert raw.close_code == 1001
            assert not [m for m in msgs if "serverShutdown" in json.dumps(m)]
            assert sim.state()["faults"]["fired"].get("server_shutdown_sent", 0) == 0

    run(go)


@pytest.mark.parametrize(("lead", "notices"), [("none", 0), ("random", 1), ("fixed", 1)])
def test_lifetime_close_with_a_random_lead_or_none(lead: str, notices: int) -> None:
    async def go() -> None:
        config = cfg(rate=50.0, max_lifetime=0.6, shutdown_notice=0.5, shutdown_lead=lead)
        async with SimServer(config) as sim:
            ws = await websockets.connect(f"{sim.streams_url}/ws/btcusdt@trade")
            msgs = await _until_closed(ws)
            assert ws.close_code == 1001
            assert len([m for m in msgs if "serverShutdown" in json.dumps(m)]) == notices
            assert sim.state()["stats"]["lifetime_disconnects"] == 1

    run(go)


def test_random_leads_differ_between_connections() -> None:
    """No fixed lead: the simulator draws one per connection (seeded, so runs repeat)."""
    from pipeline.sim.server import Simulator

    sim = Simulator(cfg(shutdown_notice=60.0))
    leads = {round(sim._lead_rng.uniform(0.0, 60.0), 6) for _ in range(5)}
    assert len(leads) == 5
    assert all(0.0 <= x <= 60.0 for x in leads)


def test_refuse_with_a_4xx_status_answers_the_handshake_with_it() -> None:
    async def go() -> None:
        async with SimServer(cfg()) as sim:
            status, _ = await post_fault(sim, "refuse", status=404)
            assert status == 200
            with pytest.raises(InvalidStatus) as err:
                await websockets.connect(f"{sim.streams_url}/stream?streams=btcusdt@trade")
            assert err.value.response.status_code == 404
            await post_fault(sim, "refuse", on=False)
            ws = await websockets.connect(f"{sim.streams_url}/stream?streams=btcusdt@trade")
            await ws.close()
            assert (await post_fault(sim, "refuse", status=200))[0] == 400
            assert (await post_fault(sim, "shutdown", notice="no"))[0] == 400

    run(go)
