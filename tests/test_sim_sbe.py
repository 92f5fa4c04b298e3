"""The simulator's SBE endpoint over real sockets (issue #18).

Frames are parsed HERE by hand with ``struct`` from the schema's layout (binance-protocol.md
7.1: header ``<HHHH``, fixed block, groups, u8-length symbol), not with the client's decoder
(``pipeline.binance.sbe``) nor the simulator's encoder: the test is a third reading of the
schema. Cadences are checked as loose counts over a window, never per frame.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey
from simhelpers import async_test
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from pipeline.sim.sbe_encode import SbeEncodeError, encode_trades, exponent_of
from pipeline.sim.testing import SimServer, http_json, run_sim_process

KEY = "sbe-test-key"
PUB = SigningKey.generate().verify_key.encode()
HEADERS = {"X-MBX-APIKEY": KEY}


def parse_sbe(msg: bytes) -> dict[str, Any]:
    """One SBE message -> dict, by the schema (stream_1_0.xml), checking every length."""
    block_len, template, schema, version = struct.unpack_from("<HHHH", msg, 0)
    out: dict[str, Any] = {"template": template, "schema": schema, "version": version,
                           "block_len": block_len}
    pos = 8

    def levels(pos: int) -> tuple[list[tuple[Decimal, Decimal]], int]:
        gbl, n = struct.unpack_from("<HH", msg, pos)
        assert gbl == 16
        pos += 4
        got = []
        for _ in range(n):
            p, q = struct.unpack_from("<qq", msg, pos)
            got.append((Decimal(p).scaleb(out["pexp"]), Decimal(q).scaleb(out["qexp"])))
            pos += gbl
        return got, pos

    if template == 10000:
        out["E"], out["T"], out["pexp"], out["qexp"] = struct.unpack_from("<qqbb", msg, pos)
        pos += block_len
        gbl, n = struct.unpack_from("<HI", msg, pos)
        assert gbl == 25
        pos += 6
        trades = []
        for _ in range(n):
            t, p, q, bm = struct.unpack_from("<qqqB", msg, pos)
            trades.append((t, Decimal(p).scaleb(out["pexp"]), Decimal(q).scaleb(out["qexp"]),
                           bool(bm)))
            pos += gbl
        out["trades"] = trades
    elif template == 10001:
        (out["E"], out["u"], out["pexp"], out["qexp"], bp, bq, ap, aq) = struct.unpack_from(
            "<qqbbqqqq", msg, pos)
        pos += block_len
        out["best"] = (Decimal(bp).scaleb(out["pexp"]), Decimal(bq).scaleb(out["qexp"]),
                       Decimal(ap).scaleb(out["pexp"]), Decimal(aq).scaleb(out["qexp"]))
    elif template == 10002:
        out["E"], out["u"], out["pexp"], out["qexp"] = struct.unpack_from("<qqbb", msg, pos)
        pos += block_len
        out["bids"], pos = levels(pos)
        out["asks"], pos = levels(pos)
    elif template == 10003:
        (out["E"], out["U"], out["u"], out["pexp"], out["qexp"]) = struct.unpack_from(
            "<qqqbb", msg, pos)
        pos += block_len
        out["bids"], pos = levels(pos)
        out["asks"], pos = levels(pos)
    else:
        raise AssertionError(f"unexpected template {template}")
    n = msg[pos]
    out["symbol"] = msg[pos + 1 : pos + 1 + n].decode()
    assert pos + 1 + n == len(msg), "trailing bytes after the symbol"
    return out


async def collect(ws: ClientConnection, seconds: float) -> tuple[list[bytes], list[str]]:
    """Binary and text frames received during ``seconds`` (a window, not a deadline test)."""
    binary: list[bytes] = []
    text: list[str] = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        try:
            msg = await asyncio.wait_for(ws.recv(), left)
        except TimeoutError:
            break
        if isinstance(msg, bytes):
            binary.append(msg)
        else:
            text.append(msg)
    return binary, text


def sim(**kw: Any) -> SimServer:
    kw.setdefault("symbols", ["BTCUSDT"])
    kw.setdefault("rate", 2000)
    return SimServer(api_keys={KEY: PUB}, **kw)


# ---- pure encoder checks (what the wire tests cannot force) ----


def test_exponents_follow_tick_and_step_and_odd_values_fall_back_to_units() -> None:
    assert exponent_of(Decimal("0.01")) == -2
    assert exponent_of(Decimal("0.00001")) == -5
    assert exponent_of(Decimal("1.00")) == 0
    assert exponent_of(Decimal("10")) == 0
    # 60000.01 on a 0.01 grid, qty 0.00012345 (off the 1e-5 step: user fill) -> exponent -8
    msg = encode_trades("BTCUSDT", 5, 6, [(7, 6000001000000, 12345, True)], -2, -5)
    ev = parse_sbe(msg)
    assert (ev["pexp"], ev["qexp"]) == (-2, -8)
    assert ev["trades"] == [(7, Decimal("60000.01"), Decimal("0.00012345"), True)]
    assert (ev["E"], ev["T"], ev["symbol"]) == (5, 6, "BTCUSDT")


def test_encoder_refuses_what_the_schema_cannot_carry() -> None:
    with pytest.raises(SbeEncodeError):
        encode_trades("X" * 256, 0, 0, [], -2, -5)
    with pytest.raises(SbeEncodeError):
        encode_trades("BTCUSDT", 2**63, 0, [], -2, -5)


# ---- the endpoint ----


@async_test
async def test_connection_without_a_registered_key_is_refused_with_401() -> None:
    async with sim() as s:
        url = s.sbe_url + "/ws/btcusdt@trade"
        for headers, code in (({}, -2014), ({"X-MBX-APIKEY": "nobody"}, -2015)):
            with pytest.raises(InvalidStatus) as info:
                async with connect(url, additional_headers=headers):
                    pass
            assert info.value.response.status_code == 401
            assert json.loads(info.value.response.body)["code"] == code
        # aggTrade has no SBE form: refused at the handshake even with a key
        with pytest.raises(InvalidStatus) as info:
            async with connect(s.sbe_url + "/ws/btcusdt@aggTrade", additional_headers=HEADERS):
                pass
        assert info.value.response.status_code == 400
        assert s.state()["faults"]["fired"]["sbe_key_refused"] == 2


@async_test
async def test_trade_events_carry_the_json_trade_streams_ids_prices_and_sides() -> None:
    async with sim(rate=400) as s, connect(s.streams_url + "/ws/btcusdt@trade") as js, \
                connect(s.sbe_url + "/ws/btcusdt@trade", additional_headers=HEADERS) as sb:
        (sbe_frames, _), (_, json_frames) = await asyncio.gather(
            collect(sb, 2.0), collect(js, 2.0))
    events = [parse_sbe(m) for m in sbe_frames]
    assert events, "no SBE trade events"
    for ev in events:
        assert (ev["template"], ev["schema"], ev["version"], ev["block_len"]) == (10000, 1, 0, 18)
        assert ev["symbol"] == "BTCUSDT"
        assert (ev["pexp"], ev["qexp"]) == (-2, -5)  # BTCUSDT tick 0.01, step 0.00001
        assert ev["E"] > 10**15
        assert ev["T"] == ev["E"]
        ids = [t[0] for t in ev["trades"]]
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # one taker's fills, in order
    from_sbe = {t[0]: (t[1], t[2], t[3], ev["T"] // 1000) for ev in events for t in ev["trades"]}
    from_json = {}
    for raw in json_frames:
        d = json.loads(raw)
        from_json[d["t"]] = (Decimal(d["p"]), Decimal(d["q"]), d["m"], d["T"])
    lo, hi = max(min(from_sbe), min(from_json)), min(max(from_sbe), max(from_json))
    assert hi - lo > 10, "too little overlap to compare"
    common = range(lo, hi + 1)
    assert {i: from_sbe[i] for i in common} == {i: from_json[i] for i in common}


@async_test
async def test_subscribe_replies_as_text_and_streams_arrive_as_binary() -> None:
    async with sim() as s, connect(s.sbe_url + "/ws", additional_headers=HEADERS) as ws:
        await ws.send(json.dumps({"method": "SUBSCRIBE", "id": 1,
                                  "params": ["btcusdt@bestBidAsk", "btcusdt@depth"]}))
        await ws.send(json.dumps({"method": "SUBSCRIBE", "id": 2,
                                  "params": ["btcusdt@aggTrade"]}))
        await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 3}))
        binary, text = await collect(ws, 1.0)
        assert s.state()["connections"] == {"streams": 0, "wsapi": 0, "sbe": 1}
    replies = [json.loads(t) for t in text]
    assert replies[0] == {"result": None, "id": 1}
    assert replies[1]["id"] == 2
    assert replies[1]["error"]["code"] == 2
    assert replies[2] == {"result": ["btcusdt@bestBidAsk", "btcusdt@depth"], "id": 3}
    templates = {parse_sbe(m)["template"] for m in binary}
    assert templates == {10001, 10003}
    for m in binary:
        ev = parse_sbe(m)
        if ev["template"] == 10001:
            bp, bq, ap, aq = ev["best"]
            assert 0 < bp < ap
            assert bq > 0
            assert aq > 0
            assert ev["E"] > 10**15


@async_test
async def test_depth_every_20ms_and_depth20_every_50ms_agree_with_the_rest_snapshot() -> None:
    async with sim() as s:
        url = s.sbe_url + "/stream?streams=btcusdt@depth/btcusdt@depth20"
        async with connect(url, additional_headers=HEADERS) as ws:
            first = await ws.recv()
            _, snap = await http_json(s.rest_url + "/api/v3/depth?symbol=BTCUSDT&limit=1000")
            binary, _ = await collect(ws, 2.0)
    assert isinstance(first, bytes)
    events = [parse_sbe(m) for m in [first, *binary]]
    diffs = [e for e in events if e["template"] == 10003]
    tops = [e for e in events if e["template"] == 10002]
    # 2 s of 20 ms and 50 ms ticks: ~100 and ~40; loose bounds for a busy 2-core machine
    assert len(diffs) >= 40
    assert len(tops) >= 15
    for a, b in itertools.pairwise(diffs):
        assert b["U"] == a["u"] + 1
    # the documented book procedure from the REST snapshot, then compare with depth20
    last = snap["lastUpdateId"]
    book = {"bids": {Decimal(p): Decimal(q) for p, q in snap["bids"]},
            "asks": {Decimal(p): Decimal(q) for p, q in snap["asks"]}}
    live = [d for d in diffs if d["u"] > last]
    assert live
    assert live[0]["U"] <= last + 1 <= live[0]["u"]
    tops_by_u = {t["u"]: t for t in tops}
    compared = 0
    for d in live:
        for side in ("bids", "asks"):
            for p, q in d[side]:
                if q == 0:
                    book[side].pop(p, None)
                else:
                    book[side][p] = q
        top = tops_by_u.get(d["u"])
        if top is not None:
            compared += 1
            assert top["bids"] == sorted(book["bids"].items(), reverse=True)[:20]
            assert top["asks"] == sorted(book["asks"].items())[:20]
    assert compared >= 1


@async_test
async def test_server_shutdown_is_a_text_frame_in_microseconds() -> None:
    async with sim() as s, \
            connect(s.sbe_url + "/ws/btcusdt@trade", additional_headers=HEADERS) as raw, \
            connect(s.sbe_url + "/stream?streams=btcusdt@trade", additional_headers=HEADERS) as cb:
        await s.set_fault("shutdown", target="sbe")
        (_, raw_text), (_, comb_text) = await asyncio.gather(
            collect(raw, 0.5), collect(cb, 0.5))
    ev = json.loads(raw_text[0])
    assert ev["e"] == "serverShutdown"
    assert ev["E"] > 10**15
    wrapped = json.loads(comb_text[0])
    assert wrapped["stream"] == "!serverShutdown"
    assert wrapped["data"]["e"] == "serverShutdown"


@async_test
async def test_cull_switch_skips_stale_best_bid_ask_updates() -> None:
    async with sim(rate=5000) as s:
        async with connect(s.streams_url + "/ws/btcusdt@bookTicker") as js, \
                connect(s.sbe_url + "/ws/btcusdt@bestBidAsk", additional_headers=HEADERS) as sb:
            (plain, _), (_, json_plain) = await asyncio.gather(collect(sb, 1.0),
                                                                collect(js, 1.0))
            await s.set_fault("sbe_cull")
            (culled, _), (_, json_culled) = await asyncio.gather(collect(sb, 1.0),
                                                                  collect(js, 1.0))
        fired = s.state()["faults"]["fired"]

    def ids(frames: list[bytes]) -> list[int]:
        return [parse_sbe(m)["u"] for m in frames]

    def json_ids(frames: list[str]) -> list[int]:
        return [json.loads(f)["u"] for f in frames]

    sbe_plain, sbe_culled = ids(plain), ids(culled)
    both_plain = json_ids(json_plain)
    lo, hi = max(sbe_plain[0], both_plain[0]), min(sbe_plain[-1], both_plain[-1])
    # unculled: every bookTicker update has its bestBidAsk
    assert [u for u in sbe_plain if lo <= u <= hi] == [u for u in both_plain if lo <= u <= hi]
    # culled: newest first never goes backwards, and some updates were skipped
    assert sbe_culled == sorted(set(sbe_culled))
    assert fired.get("sbe_cull", 0) > 0
    lo, hi = sbe_culled[0], sbe_culled[-1]
    assert len(sbe_culled) < len([u for u in json_ids(json_culled) if lo <= u <= hi])


@pytest.mark.slow
def test_sim_process_reports_the_sbe_url_and_takes_the_key_and_cull_flags(
    tmp_path: Path,
) -> None:
    pub_file = tmp_path / "pub.hex"
    pub_file.write_text(PUB.hex())
    with run_sim_process("--api-key", f"{KEY}={pub_file}", "--fault", "sbe_cull",
                         "--symbols", "BTCUSDT") as proc:
        assert proc.sbe_url.startswith("ws://127.0.0.1:")
        assert proc.state()["faults"]["sbe_cull"] is True

        async def one_event() -> dict[str, Any]:
            async with connect(proc.sbe_url + "/ws/btcusdt@depth20",
                               additional_headers=HEADERS) as ws:
                msg = await asyncio.wait_for(ws.recv(), 10)
                assert isinstance(msg, bytes)
                return parse_sbe(msg)

        ev = asyncio.run(one_event())
        assert ev["template"] == 10002
        assert ev["symbol"] == "BTCUSDT"
        assert len(ev["bids"]) == 20
