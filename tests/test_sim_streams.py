"""Market-stream conformance of `pipeline sim` over real sockets (plain websockets client as peer).

Compared with live captures in tests/fixtures/streams (key order, value types, envelopes, control
replies and error codes; binance-protocol.md section 1).
"""

from __future__ import annotations

import asyncio
import json
import math
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import websockets
from simhelpers import FIX, drain, fixture, run, shape
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State

from pipeline.sim import framing, pacing
from pipeline.sim import market as mk
from pipeline.sim import server as srv
from pipeline.sim.control import handle_control, parse_stream
from pipeline.sim.market import Market
from pipeline.sim.server import SimConfig
from pipeline.sim.testing import RawWs, SimServer, http_json


def payload_fixture(name: str, i: int = 0) -> dict[str, Any]:
    item = fixture(name)[i]
    return item["data"] if "stream" in item else item


def cfg(**kw: Any) -> SimConfig:
    base: dict[str, Any] = {"symbols": ["BTCUSDT", "ETHUSDT"], "rate": 400.0, "seed": 1}
    base.update(kw)
    return SimConfig(**base)


async def recv_json(ws: Any) -> Any:
    return orjson.loads(await ws.recv())


async def recv_reply(ws: Any, limit: int = 2000) -> dict[str, Any]:
    """Skip data frames until a control reply (has "id") arrives."""
    for _ in range(limit):
        msg = await recv_json(ws)
        if "id" in msg:
            return msg
    raise AssertionError("no reply")


# ---- combined / raw payload conformance -----------------------------------------------------

LIVE = {
    "aggTrade": ("aggTrade.json", 0),
    "trade": ("trade.json", 0),
    "bookTicker": ("bookTicker.json", 0),
    "depth@100ms": ("depthUpdate.json", 0),
    "depth20@100ms": ("depth20.json", 0),
}


def test_combined_stream_payloads_match_live_captures() -> None:
    async def go() -> None:
        async with SimServer(cfg()) as sim:
            names = [f"btcusdt@{k}" for k in LIVE]
            url = f"{sim.streams_url}/stream?streams={'/'.join(names)}"
            seen: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            async with websockets.connect(url) as ws:
                while any(len(v) < 3 for v in seen.values()):
                    msg = await recv_json(ws)
                    assert list(msg) == ["stream", "data"]
                    seen[msg["stream"]].append(msg["data"])
            for kind, (fname, i) in LIVE.items():
                live = payload_fixture(fname, i)
                for ours in seen[f"btcusdt@{kind}"]:
                    assert shape(ours) == shape(live), kind
            # ids on the wire are contiguous
            aggs = seen["btcusdt@aggTrade"]
            assert [a["a"] for a in aggs] == list(range(aggs[0]["a"], aggs[0]["a"] + len(aggs)))
            for prev, a in pairwise(aggs):
                assert a["f"] == prev["l"] + 1
            diffs = seen["btcusdt@depth@100ms"]
            for prev, d in pairwise(diffs):
                assert d["U"] == prev["u"] + 1
                assert d["E"] >= prev["E"]
            assert all(a["s"] == "BTCUSDT" for a in aggs)
            assert all(len(d["bids"]) == 20 for d in seen["btcusdt@depth20@100ms"])

    run(go)


def test_raw_ws_path_sends_bare_payloads_and_slow_depth_is_1000ms() -> None:
    async def go() -> None:
        async with SimServer(cfg()) as sim:
            async with websockets.connect(f"{sim.streams_url}/ws/ethusdt@trade") as ws:
                msg = await recv_json(ws)
                assert shape(msg) == shape(payload_fixture("trade.json", 0))
                assert msg["s"] == "ETHUSDT"
            url = f"{sim.streams_url}/ws/btcusdt@depth/btcusdt@depth5"
            async with websockets.connect(url) as ws:
                got = [await recv_json(ws) for _ in range(2)]
                kinds = {"e" in m for m in got}
                assert kinds == {True, False}  # one diff, one partial, raw form
                partial = next(m for m in got if "e" not in m)
                assert list(partial) == ["lastUpdateId", "bids", "asks"]
                assert len(partial["bids"]) == 5

    run(go)


# ---- live control messages ----------------------------------------------------------------------


def test_subscribe_list_unsubscribe_and_properties_on_bare_stream() -> None:
    async def go() -> None:
        async with SimServer(cfg()) as sim:
            async with websockets.connect(f"{sim.streams_url}/stream") as ws:
                await ws.send(
                    '{"method":"SUBSCRIBE","params":["btcusdt@aggTrade","btcusdt@bookTicker"],'
                    '"id":1}'
                )
                ack = await recv_reply(ws)
                assert ack == fixture("subscribe_ack_result_null.json") | {"id": 1}
                msg = await recv_json(ws)
                assert msg["stream"] in ("btcusdt@aggTrade", "btcusdt@bookTicker")
                uuid = "e2a85d9f-07a5-4f94-8d5f-789dc3deb097"
                await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": uuid}))
                listing = await recv_reply(ws)
                assert listing == {"result": ["btcusdt@aggTrade", "btcusdt@bookTicker"], "id": uuid}
                doc = fixture("control_list_subscriptions_response.json")
                assert list(listing) == list(doc)
                await ws.send('{"method":"UNSUBSCRIBE","params":["btcusdt@aggTrade"],"id":-7}')
                assert await recv_reply(ws) == {"result": None, "id": -7}
                await ws.send('{"method":"GET_PROPERTY","params":["combined"],"id":2}')
                got = await recv_reply(ws)
                assert got == fixture("control_get_property_response.json")
                await ws.send('{"method":"SET_PROPERTY","params":["combined",false],"id":5}')
                assert await recv_reply(ws) == {"result": None, "id": 5}
                # now raw: bookTicker payloads without the wrapper, and no more aggTrade
                for _ in range(5):
                    msg = await recv_json(ws)
                    if "result" in msg:
                        continue
                    assert "stream" not in msg
                    assert list(msg) == ["u", "s", "b", "B", "a", "A"]
            async with websockets.connect(f"{sim.streams_url}/ws") as ws:
                await ws.send('{"method":"GET_PROPERTY","params":["combined"],"id":9}')
                assert await recv_reply(ws) == {"result": False, "id": 9}

    run(go)


ERROR_CASES = [
    ("{not json", 3, None),
    ('{"method":"FOO","id":20}', 2, 20),
    ('{"method":"SUBSCRIBE","params":"btcusdt@trade","id":5000001}', 2, 5000001),
    ('{"method":"SUBSCRIBE","params":["btcusdt@kline_1m"],"id":4}', 2, 4),
    ('{"method":"SUBSCRIBE","params":["BTCUSDT@trade"],"id":4}', 2, 4),
    ('{"method":"SET_PROPERTY","params":["foo",true],"id":6}', 0, 6),
    ('{"method":"SET_PROPERTY","params":["combined","yes"],"id":7}', 1, 7),
    ('{"method":"SET_PROPERTY","params":[1,true],"id":8}', 2, 8),
    ('{"method":"GET_PROPERTY","params":["combined","x"],"id":8}', 2, 8),
    ('{"method":"LIST_SUBSCRIPTIONS","id":1.5}', 2, None),
    ('{"method":"LIST_SUBSCRIPTIONS","id":"has space"}', 2, None),
    ('{"params":[],"id":3}', 2, 3),
]


@pytest.mark.parametrize(("text", "code", "rid"), ERROR_CASES)
def test_control_errors_pure(text: str, code: int, rid: Any) -> None:
    res = handle_control(
        text,
        current=[],
        combined=True,
        valid_stream=lambda n: parse_stream(n, {"btcusdt"}),
        max_streams=1024,
    )
    reply = orjson.loads(res.reply)
    assert reply["id"] == rid
    assert reply["error"]["code"] == code
    live = fixture("error_invalid_request_streams_not_array.json")
    assert list(reply) == list(live)
    assert shape(reply["error"]) == shape(live["error"])
    assert not res.subscribe
    assert res.combined is None


def test_control_error_texts_match_live_ones() -> None:
    live_unknown = fixture("tokocrypto_mirror_unknown_method_error.json")
    live_array = fixture("error_invalid_request_streams_not_array.json")
    kw: dict[str, Any] = {
        "current": [],
        "combined": True,
        "valid_stream": lambda n: n,
        "max_streams": 1024,
    }
    assert orjson.loads(handle_control('{"method":"FOO","id":20}', **kw).reply) == live_unknown
    got = handle_control('{"method":"SUBSCRIBE","params":"x","id":5000001}', **kw)
    assert orjson.loads(got.reply) == live_array


def test_control_errors_on_the_wire_and_connection_survives() -> None:
    async def go() -> None:
        async with (
            SimServer(cfg(max_incoming_per_s=0)) as sim,
            websockets.connect(f"{sim.streams_url}/stream") as ws,
        ):
            for text, code, rid in ERROR_CASES:
                await ws.send(text)
                reply = await recv_reply(ws)
                assert reply["error"]["code"] == code, text
                assert reply["id"] == rid
            await ws.send('{"method":"LIST_SUBSCRIPTIONS","id":1}')
            assert await recv_reply(ws) == {"result": [], "id": 1}

    run(go)


def test_time_unit_microsecond_gives_that_connection_microsecond_times() -> None:
    """``timeUnit=MICROSECOND`` (section 1.2): E and T of that connection in microseconds, the
    same events as a millisecond connection sees; other connections unchanged."""
    async def go() -> None:
        async with SimServer(cfg()) as sim:
            async with websockets.connect(f"{sim.streams_url}/ws/btcusdt@aggTrade"
                                          "?timeUnit=microsecond") as raw_us:
                raw = await recv_json(raw_us)
                assert raw["E"] > 10**15
            names = "btcusdt@aggTrade/btcusdt@trade/btcusdt@depth@100ms"
            ms_url = f"{sim.streams_url}/stream?streams={names}"
            async with websockets.connect(ms_url) as ms_ws, \
                    websockets.connect(ms_url + "&timeUnit=MICROSECOND") as us_ws:
                got: dict[str, dict[tuple[str, int], dict[str, Any]]] = {"ms": {}, "us": {}}

                def done() -> bool:  # both saw some of the same aggTrades and depth updates
                    common = set(got["ms"]) & set(got["us"])
                    return {k[0] for k in common} >= {"btcusdt@aggTrade", "btcusdt@depth@100ms"}

                async def read(label: str, ws: Any) -> None:  # all at once: no backpressure
                    while not done():
                        m = await recv_json(ws)
                        d = m["data"]
                        key = d[{"aggTrade": "a", "trade": "t"}.get(d["e"], "u")]
                        got[label][(m["stream"], key)] = d

                await asyncio.gather(read("ms", ms_ws), read("us", us_ws))
        common = set(got["ms"]) & set(got["us"])
        for k in common:
            ms, us = got["ms"][k], got["us"][k]
            assert us["E"] == ms["E"] * 1000
            if "T" in ms:
                assert us["T"] == ms["T"] * 1000
            assert {f: v for f, v in us.items() if f not in "ET"} == \
                {f: v for f, v in ms.items() if f not in "ET"}

    run(go)


def test_time_unit_microsecond_at_rate_max_batches() -> None:
    """The --rate max encoder (one template per batch) with microsecond times: the same bytes
    as the per-event encoding converted, for every kind and wrapping."""
    m = Market(["BTCUSDT"], seed=3)
    m.step_batch("BTCUSDT", 1_700_000_000_123, 300)
    batch = next(e for e in m.drain_raw() if isinstance(e, mk.TakerBatch))
    head, tail = b'{"stream":"x","data":', b"}"
    for kind in ("trade", "aggTrade", "bookTicker"):
        for h, t in ((b"", b""), (head, tail)):
            ms, n_ms = framing.batch_frames(batch, kind, h, t)
            us, n_us = framing.batch_frames(batch, kind, h, t, micros=True)
            assert n_ms == n_us > 0
            ms_payloads = [p for _, p in split_frames(ms)]
            us_payloads = [p for _, p in split_frames(us)]
            assert us_payloads == [framing.micros_payload(p) for p in ms_payloads]
            if kind != "bookTicker":
                assert b'"E":1700000000123000,' in us_payloads[0]


def split_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split concatenated server frames (unmasked) into (opcode, payload)."""
    out = []
    i = 0
    while i < len(data):
        op, ln = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if ln == 126:
            ln = int.from_bytes(data[i:i + 2], "big")
            i += 2
        elif ln == 127:
            ln = int.from_bytes(data[i:i + 8], "big")
            i += 8
        out.append((op, data[i:i + ln]))
        i += ln
    return out


def test_unknown_stream_in_url_is_refused_with_400() -> None:
    async def go() -> None:
        async with SimServer(cfg()) as sim:
            for path in (
                "/ws/btcusdt@nope",
                "/stream?streams=xrpusdt@trade",
                "/stream?streams=btcusdt@trade&timeUnit=NANOSECOND",
            ):
                with pytest.raises(InvalidStatus) as info:
                    async with websockets.connect(sim.streams_url + path):
                        pass
                assert info.value.response.status_code == 400
                body = orjson.loads(info.value.response.body)
                assert set(body) == {"code", "msg"}

    run(go)


def test_max_streams_per_connection() -> None:
    async def go() -> None:
        async with SimServer(cfg(max_streams=3)) as sim:
            async with websockets.connect(f"{sim.streams_url}/stream?streams=btcusdt@trade") as ws:
                await ws.send(
                    '{"method":"SUBSCRIBE","params":["btcusdt@aggTrade","btcusdt@depth",'
                    '"btcusdt@depth5"],"id":1}'
                )
                reply = await recv_reply(ws)
                assert reply["error"]["code"] == 2
                assert "too many streams" in reply["error"]["msg"]
                await ws.send('{"method":"SUBSCRIBE","params":["btcusdt@aggTrade"],"id":2}')
                assert await recv_reply(ws) == {"result": None, "id": 2}
            url = (
                sim.streams_url
                + "/stream?streams="
                + "/".join(f"btcusdt@{k}" for k in ("trade", "aggTrade", "depth", "depth5"))
            )
            with pytest.raises(InvalidStatus):
                await websockets.connect(url)

    run(go)


# ---- connection rules ----------------------------------------------------------------------


def test_more_than_5_incoming_messages_per_second_disconnects() -> None:
    async def go() -> None:
        async with SimServer(cfg()) as sim:
            async with websockets.connect(f"{sim.streams_url}/stream") as ws:
                for i in range(5):
                    await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": i}))
                for _ in range(5):
                    await recv_reply(ws)
                await ws.ping()  # pings count too: this is the 6th message within a second
                with pytest.raises(ConnectionClosed):
                    await drain(ws)
                assert ws.close_code == 1008
            assert sim.state()["stats"]["rate_limit_disconnects"] == 1

    run(go)


def test_server_pings_and_drops_a_client_that_never_pongs() -> None:
    async def go() -> None:
        # pongs count as incoming messages: lift the 5/s rule at this ping rate
        async with SimServer(
            cfg(ping_interval=0.1, pong_timeout=0.3, max_incoming_per_s=0, rate=20.0)
        ) as sim:
            raw = await RawWs.connect(f"{sim.streams_url}/ws/btcusdt@bookTicker")
            opcodes = []
            try:
                while True:
                    op, payload = await raw.read_frame()
                    opcodes.append(op)
                    if op == 0x8:  # close frame from the server
                        assert int.from_bytes(payload[:2], "big") == 1011
                        break
            except asyncio.IncompleteReadError:
                pass
            finally:
                await raw.close()
            assert 0x9 in opcodes  # it pinged
            assert opcodes[-1] == 0x8
            # a client that answers pings (websockets does) stays connected
            # max_queue=None: a client that stops reading also stops answering pings
            async with websockets.connect(
                f"{sim.streams_url}/ws/btcusdt@bookTicker", ping_interval=None, max_queue=None
            ) as ws:
                await asyncio.sleep(0.6)  # > pong_timeout: server pings were answered
                await ws.recv()
                assert ws.state is State.OPEN

    run(go)


def test_lifetime_sends_server_shutdown_then_closes_in_both_forms() -> None:
    async def go() -> None:
        async with SimServer(cfg(max_lifetime=0.8, shutdown_notice=0.4, rate=50.0)) as sim:

            async def until_shutdown(url: str) -> tuple[dict[str, Any], int | None]:
                async with websockets.connect(url) as ws:
                    event = None
                    try:
                        while True:
                            msg = await recv_json(ws)
                            if "serverShutdown" in json.dumps(msg):
                                event = msg
                    except ConnectionClosed:
                        pass
                    assert event is not None
                    return event, ws.close_code

            comb, code1 = await until_shutdown(f"{sim.streams_url}/stream?streams=btcusdt@trade")
            raw, code2 = await until_shutdown(f"{sim.streams_url}/ws/btcusdt@trade")
            assert shape(comb) == shape(fixture("serverShutdown_combined.json"))
            assert comb["stream"] == "!serverShutdown"
            assert shape(raw) == shape(fixture("serverShutdown_raw.json"))
            assert code1 == code2 == 1001
            assert sim.state()["stats"]["lifetime_disconnects"] == 2

    run(go)


# ---- replay of captured sessions -----------------------------------------------------------


def test_replay_at_max_speed_sends_the_capture_verbatim() -> None:
    lines = (FIX / "combined_session.jsonl").read_bytes().splitlines()
    wanted = ("nknusdt@depth@100ms", "nknusdt@bookTicker", "lrcbtc@aggTrade")
    expected = [ln for ln in lines if orjson.loads(ln)["stream"] in wanted]

    async def go() -> None:
        config = cfg(replay=str(FIX / "combined_session.jsonl"), replay_speed="max")
        async with SimServer(config) as sim:
            assert "NKNUSDT" in sim.market.symbols  # capture symbols are known to REST too
            url = f"{sim.streams_url}/stream?streams={'/'.join(wanted)}"
            async with websockets.connect(url) as ws:
                got = [await ws.recv(decode=False) for _ in expected]
            assert got == expected
            raw_url = f"{sim.streams_url}/ws/nknusdt@bookTicker"
            async with websockets.connect(raw_url):
                pass  # the replay runs once; later clients get nothing (and that is fine)

    run(go)


def test_replay_timeline_serves_recorded_snapshots_for_the_sync() -> None:
    async def go() -> None:
        config = cfg(replay=str(FIX / "combined_session_timeline.jsonl"), replay_speed="max")
        async with SimServer(config) as sim:
            url = f"{sim.streams_url}/ws/nknusdt@depth@100ms"
            async with websockets.connect(url) as ws:
                first = orjson.loads(await ws.recv())
                from pipeline.sim.testing import http_json

                status, snap = await http_json(
                    f"{sim.rest_url}/api/v3/depth?symbol=NKNUSDT&limit=1000"
                )
                assert status == 200
                assert snap["lastUpdateId"] == 499869752  # the recorded one
                assert first["U"] <= snap["lastUpdateId"]
                diffs = [first]
                while diffs[-1]["u"] <= snap["lastUpdateId"]:
                    diffs.append(orjson.loads(await ws.recv()))
                assert diffs[-1]["U"] <= snap["lastUpdateId"] + 1 <= diffs[-1]["u"]

    run(go)


def test_replay_recorded_speed_with_time_prefixes(tmp_path: Path) -> None:
    frames = [
        {"stream": "btcusdt@trade", "data": {"e": "trade", "E": i, "s": "BTCUSDT", "t": i}}
        for i in range(4)
    ]
    cap = tmp_path / "cap.txt"
    cap.write_text(
        "".join(f"{1000 + i * 0.05:.3f}: {json.dumps(f)}\n" for i, f in enumerate(frames))
    )

    async def go() -> None:
        async with SimServer(cfg(replay=str(cap))) as sim:
            async with websockets.connect(f"{sim.streams_url}/ws/btcusdt@trade") as ws:
                got = [orjson.loads(await ws.recv()) for _ in frames]
            assert got == [f["data"] for f in frames]
            assert sim.state()["replay"]["position"] == pytest.approx(1000.15)

    run(go)


def test_bad_capture_file_is_a_clear_error(tmp_path: Path) -> None:
    from pipeline.sim.replay import load_capture

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"stream":"x","data":{}}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        load_capture(bad)
    bad.write_text('{"e":"trade"}\n')
    with pytest.raises(ValueError, match="not a combined-stream frame"):
        load_capture(bad)


def test_slow_consumer_pauses_the_walk_then_is_dropped() -> None:
    async def go() -> None:
        config = cfg(rate=float("inf"), write_high_water=1 << 16, slow_consumer_timeout=0.3)
        async with SimServer(config) as sim:
            raw = await RawWs.connect(
                f"{sim.streams_url}/stream?streams=btcusdt@trade/btcusdt@aggTrade/btcusdt@bookTicker"
            )
            transport = raw.writer.transport
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()  # a client that never reads
            try:
                # polls the server's own counter (the paused client cannot see the EOF)
                while sim.state()["stats"]["slow_consumer_disconnects"] == 0:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            finally:
                await raw.close()
            assert sim.state()["connections"]["streams"] == 0

    run(go)


# ---- --rate max: the batched walk and its encoder ------------------------------------------


def test_frames_encoder_matches_ws_frame_at_every_header_size() -> None:
    """The one-format batch encoder picks each frame's 2- or 4-byte header from the computed
    payload lengths (also when one batch straddles 126 bytes), and frames one at a time past
    its header table (4096)."""
    for pad in (*range(90, 135), 4040, 4060, 4085, 70_000):
        tpl = b'{"v":%d,"p":"%s","m":%s,"x":"' + b"x" * pad + b'"}'
        vals = [1, 12, 10**9, 7, 10**12, 0]
        strs = [b"0.10000000", b"60000.01000000", b"1.00000000", b"", b"9", b"0.00000001"]
        flags = [True, False, True, True, False, False]
        cols = [
            framing._ints(np.array(vals, np.int64)),
            (strs, np.array([len(s) for s in strs], np.int64)),
            framing._bools(np.array(flags)),
        ]
        want = b"".join(
            framing.ws_frame(tpl % (v, s, b"true" if f else b"false"))
            for v, s, f in zip(vals, strs, flags, strict=True)
        )
        assert framing._frames(tpl, cols) == want, pad
        one = [(c[0][:1], c[1][:1]) for c in cols]
        assert framing._frames(tpl, one) == framing.ws_frame(tpl % (1, strs[0], b"true"))


def test_batch_frames_equal_the_per_event_encoders() -> None:
    m = Market(["BTCUSDT", "ETHUSDT"], seed=4)
    for i in range(6):
        for sym in m.symbols:
            m.step_batch(sym, 1_700_000_000_000 + i, 100 * (i + 1))
    batches = [b for b in m.drain_raw() if isinstance(b, mk.TakerBatch)]
    assert len(batches) == 12
    for b in batches:
        events = b.events()
        for kind in ("aggTrade", "trade", "bookTicker"):
            envelope = b'{"stream":"ethusdt@' + kind.encode() + b'","data":'
            for head, tail in ((b"", b""), (envelope, b"}")):
                data, n = framing.batch_frames(b, kind, head, tail)
                want = [
                    framing.ws_frame(head + mk.encode_event(e) + tail)
                    for e in events
                    if e.kind == kind
                ]
                assert n == len(want) > 0
                assert data == b"".join(want)


BATCH_KINDS = ["aggTrade", "trade", "bookTicker", "depth@100ms"]


async def collect_btc(sim: SimServer, n_aggs: int) -> dict[str, list[dict[str, Any]]]:
    """``n_aggs`` aggTrades of BTCUSDT and what the other BATCH_KINDS streams sent meanwhile
    (at least two depth diffs), from one combined connection."""
    url = f"{sim.streams_url}/stream?streams={'/'.join(f'btcusdt@{k}' for k in BATCH_KINDS)}"
    seen: dict[str, list[dict[str, Any]]] = {k: [] for k in BATCH_KINDS}
    async with websockets.connect(url) as ws:
        while len(seen["aggTrade"]) < n_aggs or len(seen["depth@100ms"]) < 2:
            msg = await recv_json(ws)
            seen[msg["stream"].partition("@")[2]].append(msg["data"])
        ws.transport.abort()  # a closing handshake would first read MBs of backlog
    return seen


async def check_consistent(sim: SimServer, seen: dict[str, list[dict[str, Any]]]) -> None:
    """Contiguous trade and aggTrade ids, each aggTrade covering trades at its price, bookTicker
    ``u`` increasing, diff depth ``U`` = previous ``u`` + 1, REST history equal to the stream."""
    aggs, trades = seen["aggTrade"], seen["trade"]
    assert [a["a"] for a in aggs] == list(range(aggs[0]["a"], aggs[0]["a"] + len(aggs)))
    t_ids = [t["t"] for t in trades]
    assert t_ids == list(range(t_ids[0], t_ids[0] + len(t_ids)))
    for prev, a in pairwise(aggs):
        assert a["f"] == prev["l"] + 1
    by_id = {t["t"]: t for t in trades}
    checked = 0
    for a in aggs:
        covered = [by_id.get(i) for i in range(a["f"], a["l"] + 1)]
        if None in covered:
            continue
        assert {t["p"] for t in covered} == {a["p"]}  # type: ignore[index]
        checked += 1
    assert checked > 1000
    us = [b["u"] for b in seen["bookTicker"]]
    assert us == sorted(set(us))
    for prev, d in pairwise(seen["depth@100ms"]):
        assert d["U"] == prev["u"] + 1
    # REST history is the stream's
    first = aggs[100]["a"]
    status, rest = await http_json(
        f"{sim.rest_url}/api/v3/aggTrades?symbol=BTCUSDT&fromId={first}&limit=1000"
    )
    assert status == 200
    stream = [{k: a[k] for k in ("a", "p", "q", "f", "l", "T", "m", "M")} for a in aggs]
    assert rest == stream[100:1100]


def test_rate_max_streams_are_consistent_with_rest() -> None:
    """At --rate max (Market.step_batch + the batch encoder) every protocol rule still holds:
    contiguous ids, aggTrades covering the trades, REST history equal to the stream, diff
    depth contiguous, bookTicker monotonic; skip_agg_ids still withholds exactly N."""

    async def go() -> None:
        async with SimServer(cfg(rate=math.inf, symbols=["BTCUSDT"], history=1_000_000)) as sim:
            seen = await collect_btc(sim, 4000)
            await check_consistent(sim, seen)
            # skip_agg_ids at full speed. Nobody listens now, so the walk is idle: the next
            # client's first 3 aggTrades are withheld from the stream, not from REST
            status, last = await http_json(
                f"{sim.rest_url}/api/v3/aggTrades?symbol=BTCUSDT&limit=1"
            )
            await sim.set_fault("skip_agg_ids", count=3, symbol="BTCUSDT")
            async with websockets.connect(f"{sim.streams_url}/ws/btcusdt@aggTrade") as ws:
                got = [(await recv_json(ws))["a"] for _ in range(50)]
                ws.transport.abort()
            assert got == list(range(last[0]["a"] + 4, last[0]["a"] + 54))
            assert sim.faults.fired.get("skip_agg_ids") == 1 + 3  # the request + 3 withheld
            status, rest = await http_json(
                f"{sim.rest_url}/api/v3/aggTrades?symbol=BTCUSDT&fromId={last[0]['a'] + 1}&limit=3"
            )
            assert status == 200
            assert [a["a"] for a in rest] == [last[0]["a"] + i for i in (1, 2, 3)]

    run(go, timeout=30)


# ---- a high finite --rate: the batched walk, paced ----------------------------------------


@pytest.mark.parametrize("unit", ["actions", "msgs"])
def test_walk_finite_switches_to_batches_above_the_threshold(unit: str) -> None:
    """Pure (no loop, no clock): few units due run the per-action walk, many run step_batch;
    in ``msgs`` unit the aggTrades printed cover what was due and the units used say so."""
    sim = srv.Simulator(cfg(symbols=["BTCUSDT"], rate_unit=unit))
    m = sim.market
    small = (pacing.BATCH_MIN_MSGS if unit == "msgs" else pacing.BATCH_MIN_ACTIONS) - 1
    a0 = m.next_agg_id("BTCUSDT")
    used = sim.pacer.walk_finite("BTCUSDT", small, 1000)
    assert sim.stats["walk_batches"] == 0
    if unit == "msgs":
        assert used == m.next_agg_id("BTCUSDT") - a0 >= small
    else:
        assert used == small == sim.stats["walk_actions"]
    a1 = m.next_agg_id("BTCUSDT")
    big = 5000 if unit == "msgs" else 20_000  # > MAX_BATCH takers: several chunks
    used = sim.pacer.walk_finite("BTCUSDT", big, 1001)
    assert sim.stats["walk_batches"] >= 3
    printed = m.next_agg_id("BTCUSDT") - a1
    if unit == "msgs":
        assert used == printed >= big
    else:
        assert used == big
        # the batched walk prints about what the per-action walk would (no rate jump)
        expect = big * pacing.WALK_AGGS_PER_ACTION
        assert 0.8 * expect < printed < 1.3 * expect
    m.check_invariants("BTCUSDT")
    assert [a.a for a in m.agg_trades("BTCUSDT", from_id=a0, limit=100_000)] == list(
        range(a0, m.next_agg_id("BTCUSDT"))
    )


def test_rejects_an_unknown_rate_unit() -> None:
    with pytest.raises(ValueError, match="rate_unit"):
        srv.Simulator(cfg(rate_unit="bytes"))


def test_high_finite_rate_uses_batches_and_stays_consistent() -> None:
    """20 k aggTrade msgs/s on one symbol: ~200 due per 10 ms turn, so the walk runs in
    batches (stats say so), and every stream and REST rule of the per-action walk holds."""

    async def go() -> None:
        config = cfg(rate=20_000.0, rate_unit="msgs", symbols=["BTCUSDT"], history=1_000_000)
        async with SimServer(config) as sim:
            seen = await collect_btc(sim, 3000)
            assert sim.sim.stats["walk_batches"] > 0
            await check_consistent(sim, seen)
            # aggTrade times never go backwards (one stamp per turn)
            times = [a["T"] for a in seen["aggTrade"]]
            assert times == sorted(times)

    run(go, timeout=30)


def test_cli_rate_unit_reaches_the_config() -> None:
    import argparse

    from pipeline.sim import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["sim", "--rate", "50000", "--rate-unit", "msgs"])
    config = cli.build_config(args)
    assert (config.rate, config.rate_unit) == (50_000.0, "msgs")
    assert cli.build_config(parser.parse_args(["sim"])).rate_unit == "actions"
    with pytest.raises(SystemExit):
        parser.parse_args(["sim", "--rate-unit", "bytes"])
