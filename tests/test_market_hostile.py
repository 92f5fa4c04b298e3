"""Hostile market frames against a real `pipeline ingest` process fed by the simulator (issue 11):
a 19-digit id, an id or time out of int64 range, a bookTicker / depth update id far ahead, a
run of far ids (a stream restart), and a record that cannot be packed with ``--fast-path off``.
Each is injected into a live stream (``POST /sim/inject``); the symbol must keep publishing the
real frames that follow, exactly once, and the event must be counted in the metrics block."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import numpy as np
import pytest
from test_ingest_integration import (
    SYMBOLS,
    Ingest,
    agg_of,
    assert_exactly_once_in_order,
    fastpath_built,
    run_ingest,
)

from pipeline.ipc.records import Flags, Kind
from pipeline.sim.testing import SimProcess, run_sim_process

BIG = 10**18  # 19 digits: in int64, but no real id sequence gets there from 50000
AGG = ('{"e":"aggTrade","E":1768627409826,"s":"BTCUSDT","a":%s,"p":"1.00000000",'
       '"q":"1.00000000","f":1,"l":%s,"T":1768627409825,"m":true,"M":true}')


def inject(sim: SimProcess, **spec: Any) -> dict[str, Any]:
    req = urllib.request.Request(f"{sim.admin_url}/inject",
                                 data=json.dumps(spec).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        out = dict(json.loads(resp.read()))
    assert out["ok"], out
    assert out["clients"] >= 1, out
    return out


def more_trades(ing: Ingest, sid: int, n: int, label: str) -> None:
    """Wait until ``n`` more aggregate trades of the symbol are in the ring."""
    have = len(agg_of(ing.records(), sid))
    ing.wait_for(lambda: len(agg_of(ing.records(), sid)) >= have + n, 20, label)


def modes() -> list[str]:
    return ["auto", "off"] if fastpath_built() else ["off"]


@pytest.mark.parametrize("fast_path", modes())
def test_far_and_out_of_range_ids_never_silence_a_symbol(shm_name: str, fast_path: str) -> None:
    """Before: a=10**18 opened a 10**18-id "gap", backfill gave up, and every real trade after
    it was dropped as a duplicate (health green); a bookTicker u=10**17 (18 digits: the compiled
    path took it) froze the symbol's bookTicker; a depth u far ahead froze the book."""
    with run_sim_process("--symbols", ",".join(SYMBOLS), "--rate", "60", "--seed", "5") as sim, \
            run_ingest(sim, shm_name, "--fast-path", fast_path) as ing:
        ing.wait_for(lambda: len(agg_of(ing.records(), 0)) > 10, 20, "first trades")
        ing.wait_for(lambda: np.any(ing.records()["kind"] == Kind.DEPTH_TOP), 20, "book synced")
        inject(sim, stream="btcusdt@aggTrade", payload=AGG % (BIG, BIG))
        inject(sim, stream="btcusdt@aggTrade", payload=AGG % (2**63, 1))  # beyond int64
        inject(sim, stream="btcusdt@aggTrade", payload=AGG % (-5, 1))
        inject(sim, stream="btcusdt@bookTicker",
               payload=f'{{"u":{10**17},"s":"BTCUSDT","b":"1.0","B":"1.0","a":"2.0","A":"1.0"}}')
        inject(sim, stream="btcusdt@depth@100ms",  # the default depth stream
               payload='{"e":"depthUpdate","E":1768627409826,"s":"BTCUSDT","U":%d,"u":%d,'  # noqa: UP031
                       '"b":[],"a":[]}' % (10**17, 10**17))
        snap = ing.records()  # one snapshot: ingest keeps publishing while we count
        n_tops = int(np.count_nonzero((snap["kind"] == Kind.DEPTH_TOP) & (snap["symbol"] == 0)))
        n_bt = int(np.count_nonzero((snap["kind"] == Kind.BOOK_TICKER) & (snap["symbol"] == 0)))
        more_trades(ing, 0, 40, "real trades after the hostile frames")
        # the check below wants 50 of each symbol; the 100 ms book no longer makes it wait 1 s
        ing.wait_for(lambda: len(agg_of(ing.records(), 1)) > 50, 20, "ETHUSDT trades")

        def book_moves() -> bool:
            r = ing.records()
            return (np.count_nonzero((r["kind"] == Kind.DEPTH_TOP) & (r["symbol"] == 0))
                    > n_tops + 3 and np.count_nonzero((r["kind"] == Kind.BOOK_TICKER)
                                                      & (r["symbol"] == 0)) > n_bt + 3)

        ing.wait_for(book_moves, 20, "bookTicker and book after the hostile frames")
        m = ing.metrics()
        recs = ing.records()
        assert_exactly_once_in_order(sim, recs)  # every real id once; 10**18 never published
        assert not np.any(recs["trade_id"] >= 10**17), "a hostile id reached the ring"
        bt = recs[(recs["kind"] == Kind.BOOK_TICKER) & (recs["symbol"] == 0)]["trade_id"]
        assert np.all(np.diff(bt) > 0)
        assert not np.any(recs["kind"] == Kind.GAP)
        assert m["ids_far"] >= 3, m  # aggTrade, bookTicker, depth: held aside and counted
        assert m["skipped_bad_number"] >= 2, m  # 2**63 and -5
        assert m["id_resets"] == 0
        assert m["gaps_unrecoverable"] == 0
        assert m["ids_lost"] == 0
        assert m["callback_errors"] == 0, m
        assert m["heartbeat_interval_ms"] == 50
        assert "update id far from the last one" in ing.log_text()  # bookTicker
        assert "id far from the last one: held aside" in ing.log_text()


def test_a_run_of_far_ids_is_a_restart_and_real_ids_come_back(shm_name: str) -> None:
    """A run of contiguous far ids is taken as a stream restart (a GAP record flagged RESYNCED,
    nothing backfilled across it); the real trades that continue far below it are a run too,
    so the symbol comes back, and none of its real trades is lost."""
    base = 10**15
    with run_sim_process("--symbols", ",".join(SYMBOLS), "--rate", "60", "--seed", "9") as sim, \
            run_ingest(sim, shm_name, "--streams", "aggTrade", "--id-resync-after", "4") as ing:
        ing.wait_for(lambda: len(agg_of(ing.records(), 0)) > 10, 20, "first trades")
        inject(sim, stream="btcusdt@aggTrade", payload=AGG % ("$SEQ", "$SEQ"), count=4,
               seq_from=base)
        ing.wait_for(lambda: ing.metrics()["id_resets"] >= 1, 20, "restart taken")
        more_trades(ing, 0, 30, "real trades after the restart")
        ing.wait_for(lambda: ing.metrics()["id_resets"] >= 2, 20, "back on the real ids")
        m = ing.metrics()
        recs = ing.records()
        btc = recs[recs["symbol"] == 0]
        resets = btc[btc["kind"] == Kind.GAP]
        assert len(resets) == 2
        assert np.all(resets["flags"] & Flags.RESYNCED)
        assert resets[0]["aux_id"] == base
        assert resets[1]["trade_id"] == base + 3
        real = btc[(btc["kind"] == Kind.AGG_TRADE) & (btc["trade_id"] < base)]["trade_id"]
        assert np.all(np.diff(real) == 1), "a real trade was lost or repeated"
        fake = btc[(btc["kind"] == Kind.AGG_TRADE) & (btc["trade_id"] >= base)]["trade_id"]
        assert fake.tolist() == [base, base + 1, base + 2, base + 3]
        assert m["gaps_unrecoverable"] == 0
        assert m["rest_requests"] == 0


def test_unpackable_record_is_not_lost_with_the_fast_path_off(shm_name: str) -> None:
    """Before: with --fast-path off an aggTrade carrying the next id and an E whose ns value
    overflows int64 advanced the tracker, then failed to pack: the real frame with that id was
    dropped as a duplicate, no GAP. Now E out of range is bad_number at decode, and the tracker
    only advances once its record is in the ring: the real trade is published, exactly once."""
    with run_sim_process("--symbols", ",".join(SYMBOLS), "--rate", "60", "--seed", "11") as sim, \
            run_ingest(sim, shm_name, "--fast-path", "off", "--decoder", "msgspec") as ing:
        ing.wait_for(lambda: len(agg_of(ing.records(), 0)) > 10, 20, "first trades")
        out = inject(sim, stream="btcusdt@aggTrade",
                     payload=AGG.replace("1768627409826", str(10**17)) % ("$NEXT_AGG_ID", 1))
        target = int(out["next_agg_id"])
        ing.wait_for(lambda: int(agg_of(ing.records(), 0)["trade_id"][-1]) > target + 5, 20,
                     "the real trade with the injected id, and more")
        m = ing.metrics()
        recs = ing.records()
        assert_exactly_once_in_order(sim, recs, min_trades=10)
        assert target in agg_of(recs, 0)["trade_id"].tolist()
        assert not np.any(recs["kind"] == Kind.GAP)
        assert m["skipped_bad_number"] >= 1, m
        assert m["callback_errors"] == 0, m


def test_deep_json_is_a_counted_skip(shm_name: str) -> None:
    """100k-deep JSON in a market frame was a RecursionError out of the handler (a callback
    error); now it is a malformed_json skip and the stream goes on."""
    deep = '{"stream":"btcusdt@aggTrade","data":' + "[" * 100_000 + "]" * 100_000 + "}"
    with run_sim_process("--symbols", ",".join(SYMBOLS), "--rate", "60", "--seed", "13") as sim, \
            run_ingest(sim, shm_name, "--streams", "aggTrade") as ing:
        ing.wait_for(lambda: len(agg_of(ing.records(), 0)) > 5, 20, "first trades")
        inject(sim, frame=deep, count=3)
        ing.wait_for(lambda: ing.metrics()["skipped_malformed_json"] >= 3, 20, "skips counted")
        more_trades(ing, 0, 10, "trades after the deep frames")
        m = ing.metrics()
        assert m["callback_errors"] == 0, m
        assert_exactly_once_in_order(sim, ing.records(), min_trades=10)


def test_a_failing_long_lived_task_ends_ingest_non_zero(shm_name: str,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A long-lived task that dies (here the metrics task: its block lacks a field it writes)
    used to be logged and forgotten, leaving ingest half alive; now the process stops, logs the
    traceback and exits 1, with its ring and block cleaned up."""
    import logging
    import os

    from pipeline.marketdata import ingest

    full = ingest.metrics_fields
    monkeypatch.setattr(ingest, "metrics_fields",
                        lambda n: [f for f in full(n) if f[0] != "heartbeat_interval_ms"])
    with run_sim_process("--symbols", ",".join(SYMBOLS), "--rate", "20") as sim:
        cfg = ingest.validate(ingest.IngestConfig(
            streams_url=sim.streams_url, rest_url=sim.rest_url, symbols=SYMBOLS,
            streams=["aggTrade"], ring=f"{shm_name}_r", metrics=f"{shm_name}_m"))
        with caplog.at_level(logging.ERROR, logger="pipeline.ingest"):
            assert ingest.run(cfg) == 1
    failed = [r for r in caplog.records if "task metrics failed" in r.getMessage()]
    assert failed, caplog.text
    assert failed[0].exc_info is not None
    assert failed[0].exc_info[0] is KeyError
    assert not os.path.exists(f"/dev/shm/{shm_name}_r")
    assert not os.path.exists(f"/dev/shm/{shm_name}_m")


def test_rest_answer_with_an_endless_header_is_an_http_error() -> None:
    """A REST server (the venue) sending a header line longer than the stream limit raised
    LimitOverrunError out of get_json, which now ends ingest's long-lived task: it must be an
    HttpError the caller retries."""
    import asyncio

    from pipeline.net.http import HttpError, get_json

    async def main() -> None:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * (2 << 20))
            await w.drain()
            w.close()

        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            with pytest.raises(HttpError):
                await get_json(f"http://127.0.0.1:{port}", "/api/v3/depth", timeout_s=10)
        finally:
            srv.close()
            await srv.wait_closed()

    asyncio.run(main())


def test_a_shard_without_a_connection_is_a_named_problem(shm_name: str) -> None:
    """Half dead: the process runs, but a shard has had no delivering connection for longer
    than a reconnect cycle. `problem_shards_down` says so (health marks ingest unhealthy on a
    non-zero problem_* field) and clears once the connection is back."""
    with run_sim_process("--symbols", ",".join(SYMBOLS), "--rate", "20") as sim, \
            run_ingest(sim, shm_name, "--streams", "aggTrade") as ing:
        ing.wait_for(lambda: len(agg_of(ing.records(), 0)) > 3, 20, "first trades")
        assert ing.metrics()["problem_shards_down"] == 0
        sim.fault("refuse", duration=6)
        sim.fault("drop")
        ing.wait_for(lambda: ing.metrics()["problem_shards_down"] == 1, 20, "problem raised")
        ing.wait_for(lambda: ing.metrics()["problem_shards_down"] == 0, 30, "problem cleared")
        more_trades(ing, 0, 3, "trades after the outage")


def test_a_hole_beyond_max_backfill_ids_is_reported_not_fetched(shm_name: str) -> None:
    """A hole just inside --max-id-jump (millions of ids) must not turn into thousands of REST
    pages (request weight, a 418 ban): beyond --max-backfill-ids it is a GAP at once."""
    with run_sim_process("--symbols", ",".join(SYMBOLS), "--rate", "40") as sim, \
            run_ingest(sim, shm_name, "--streams", "aggTrade", "--max-backfill-ids", "3") as ing:
        ing.wait_for(lambda: len(agg_of(ing.records(), 0)) > 3, 20, "first trades")
        sim.fault("skip_agg_ids", count=5, symbol="BTCUSDT")
        ing.wait_for(lambda: np.any(ing.records()["kind"] == Kind.GAP), 20, "a GAP record")
        more_trades(ing, 0, 3, "trades after the hole")
        gap = ing.records()[ing.records()["kind"] == Kind.GAP][0]
        assert gap["aux_id"] - gap["trade_id"] + 1 == 5
        assert ing.metrics()["rest_requests"] == 0
