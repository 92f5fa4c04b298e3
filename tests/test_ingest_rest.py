"""`pipeline ingest`'s REST against the simulator (issue #15): one keep-alive connection, a
weight budget that paces resync storms, Retry-After honoured on 429 and 418, @trade holes
backfilled from historicalTrades. Real processes and sockets; the simulator counts what
arrives (``GET /sim/state`` -> ``rest``), ingest's metrics block shows the pacing.

The REQUEST_WEIGHT window is shortened on both sides (the sim's ``rest_rate_limit`` fault,
ingest's ``--rest-weight-interval``) so a storm that must span several windows takes seconds.
"""

from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
from test_ingest_integration import run_ingest

from pipeline.ipc.records import Flags, Kind
from pipeline.sim.testing import SimProcess, run_sim_process
from tests.ingesthelpers import stale_marks

STORM_SYMBOLS = [f"S{i:02d}USDT" for i in range(50)]
# the fast path is the lead's (#14) and irrelevant to REST; off keeps these tests about REST
REST = ["--fast-path", "off", "--stall-timeout", "5"]


def rest_state(sim: SimProcess) -> dict[str, int]:
    return dict(sim.state()["rest"])


def resync_all_books(sim: SimProcess) -> None:
    """Every stream connection misses a second of diffs: every book has a gap and resyncs."""
    sim.fault("blackhole", duration=1.0, target="streams")


def test_resync_storm_of_50_books_stays_under_the_budget(shm_name: str) -> None:
    """50 books sync at start and again all at once after a gap, with the REST limit lowered
    to 400 per 2 s: every book resyncs, the sim never answers 429 or 418, the weight used in
    any window stays under the limit, one connection carries it all, and the metrics show the
    waiting."""
    with run_sim_process("--symbols", ",".join(STORM_SYMBOLS), "--rate", "20") as sim:
        sim.fault("rest_rate_limit", limit=400, interval=2)
        with run_ingest(sim, shm_name, *REST, "--streams", "depth@100ms",
                        "--depth-snapshot-limit", "500",  # weight 25: 16 fit in a window
                        "--rest-weight-limit", "400", "--rest-weight-interval", "2",
                        symbols=STORM_SYMBOLS) as ing:
            ing.wait_for(lambda: ing.metrics()["book_resyncs"] >= 50, 40, "50 initial syncs")
            resync_all_books(sim)
            ing.wait_for(lambda: ing.metrics()["book_resyncs"] >= 100, 40, "50 resyncs")
            m = ing.metrics()
            st = rest_state(sim)
            recs = ing.records()
        assert (st["rate_limited"], st["banned"]) == (0, 0), st
        assert st["peak_used_weight"] <= 400
        assert st["connections"] == 1
        assert (m["rest_429"], m["rest_418"], m["problem_rest_banned"]) == (0, 0, 0)
        assert m["rest_waits"] > 0  # paced: requests waited for the next window
        assert m["rest_wait_ms"] > 0
        assert 0 < m["rest_weight_peak"] <= 320  # ingest's own share (80%)
        assert m["rest_connections"] == 1
        resynced = recs[(recs["kind"] == Kind.BOOK_RESYNC)
                        & ((recs["flags"] & Flags.RESYNCED) != 0)]
        assert set(resynced["symbol"].tolist()) == set(range(50))
        # each book said it was stale from its break until its snapshot came
        marks = [stale_marks(recs, sid, ends=(Kind.BOOK_RESYNC,)) for sid in range(50)]
        assert min(marks) >= 1
        assert m["books_stale"] == sum(marks)


def test_a_429_is_honoured_and_a_418_stops_all_rest_until_it_ends(shm_name: str) -> None:
    """A forced 429 (Retry-After 2 s): no request reaches the sim before it elapses. A forced
    418 (a 3 s ban): nothing at all during the ban, a health problem while it lasts, then the
    books resync."""
    symbols = ["BTCUSDT", "ETHUSDT"]
    with run_sim_process("--symbols", ",".join(symbols), "--rate", "50") as sim, \
            run_ingest(sim, shm_name, *REST, "--streams", "depth@100ms",
                       symbols=symbols) as ing:
        ing.wait_for(lambda: ing.metrics()["book_resyncs"] >= 2, 20, "initial syncs")
        sim.fault("rest_rate_limit", force="429", retry_after=2)
        resync_all_books(sim)
        ing.wait_for(lambda: ing.metrics()["book_resyncs"] >= 4, 30, "resyncs after a 429")
        st = rest_state(sim)
        assert (st["rate_limited"], st["early_after_429"], st["banned"]) == (1, 0, 0), st
        assert ing.metrics()["rest_429"] == 1

        sim.fault("rest_rate_limit", force="418", retry_after=3)
        resync_all_books(sim)
        ing.wait_for(lambda: ing.metrics()["problem_rest_banned"] == 1, 20, "the ban seen")
        during = rest_state(sim)["requests"]
        ing.wait_for(lambda: ing.metrics()["book_resyncs"] >= 6, 30, "resyncs after the ban")
        st = rest_state(sim)
        m = ing.metrics()
        assert st["during_ban"] == 0, st  # not one request while banned
        assert st["banned"] == 1
        assert st["requests"] > during
        assert (m["rest_418"], m["problem_rest_banned"]) == (1, 0)
        assert "HTTP 418" in ing.log_text()


def exchange_trades(sim: SimProcess, symbol: str, ids: np.ndarray) -> dict[int, dict]:
    """The simulator's trades with these ids (historicalTrades, page by page)."""
    out: dict[int, dict] = {}
    for i in sorted(set(ids.tolist())):
        if i in out:
            continue
        url = f"{sim.rest_url}/api/v3/historicalTrades?symbol={symbol}&fromId={i}&limit=1000"
        with urllib.request.urlopen(url, timeout=5) as resp:
            out.update((r["id"], r) for r in json.loads(resp.read()))
    return out


def trades_of(recs: np.ndarray, sid: int) -> np.ndarray:
    return recs[(recs["symbol"] == sid) & (recs["kind"] == Kind.TRADE)]


def test_trade_holes_are_backfilled_exactly_once_in_order(shm_name: str) -> None:
    """The stream is cut three times while @trade flows: every trade id of the run arrives
    exactly once, in order, the ones fetched from historicalTrades flagged BACKFILLED and
    equal to what the exchange printed; no GAP record (REST did not fail)."""
    symbols = ["BTCUSDT", "ETHUSDT"]
    with run_sim_process("--symbols", ",".join(symbols), "--rate", "300") as sim:
        with run_ingest(sim, shm_name, *REST, "--streams", "trade",
                        symbols=symbols) as ing:
            ing.wait_for(lambda: len(ing.records()) > 200, 20, "trades")
            for _ in range(3):
                sim.fault("refuse")  # held off a while: trades are printed while it is away
                sim.fault("drop", target="streams")
                time.sleep(0.2)
                sim.fault("refuse", on=False)
                time.sleep(0.4)
            ing.wait_for(lambda: ing.metrics()["trade_gaps_backfilled"] >= 1, 20, "a backfill")
            time.sleep(0.5)
            recs = ing.records()
            m = ing.metrics()
        assert not (recs["kind"] == Kind.GAP).any()
        assert m["trade_gaps"] == 0
        assert m["trades_backfilled"] > 0
        filled = 0
        for sid, sym in enumerate(symbols):
            t = trades_of(recs, sid)
            ids = t["trade_id"].astype(np.int64)
            assert (np.diff(ids) == 1).all(), f"{sym}: not every id once, in order"
            back = t[(t["flags"] & Flags.BACKFILLED) != 0]
            filled += len(back)
            truth = exchange_trades(sim, sym, back["trade_id"].astype(np.int64))
            for rec in back:  # the backfilled ones are the trades the exchange printed
                r = truth[int(rec["trade_id"])]
                assert (float(rec["price"]), float(rec["qty"])) == \
                    (float(r["price"]), float(r["qty"]))
                assert int(rec["event_time_ns"]) == r["time"] * 1_000_000
                assert bool(rec["flags"] & Flags.BUYER_IS_MAKER) == r["isBuyerMaker"]
        assert filled == m["trades_backfilled"]


def test_a_trade_hole_is_a_gap_only_when_rest_fails(shm_name: str) -> None:
    symbols = ["BTCUSDT"]
    with run_sim_process("--symbols", "BTCUSDT", "--rate", "300") as sim:
        with run_ingest(sim, shm_name, *REST, "--streams", "trade", "--rest-retries", "1",
                        symbols=symbols) as ing:
            ing.wait_for(lambda: len(ing.records()) > 100, 20, "trades")
            sim.fault("rest_fail", count=1000, status=500)
            # held off for a while, so trades are certainly printed while it is away (a bare
            # drop reconnects in ~40 ms, and a quiet market may print nothing in that time)
            sim.fault("refuse")
            sim.fault("drop", target="streams")
            time.sleep(0.5)
            sim.fault("refuse", on=False)
            ing.wait_for(lambda: ing.metrics()["trade_gaps"] >= 1, 20, "a GAP record")
            recs = ing.records()
        gaps = recs[recs["kind"] == Kind.GAP]
        assert len(gaps) >= 1
        assert ((gaps["flags"] & Flags.TRADE_IDS) != 0).all()
        t = trades_of(recs, 0)
        ids = t["trade_id"].astype(np.int64)
        assert (np.diff(ids) >= 1).all()  # in order, never twice
        # the ids the GAP records name are exactly the ones missing
        missing = int((np.diff(ids) - 1).sum())
        named = int((gaps["aux_id"].astype(np.int64) - gaps["trade_id"].astype(np.int64)
                     + 1).sum())
        assert missing == named


def test_a_trade_hole_refused_for_want_of_a_key_is_a_gap_at_once_said_once(
        shm_name: str) -> None:
    """historicalTrades answering 401 (no or a bad API key) cannot be cured by retrying: each
    hole becomes a GAP after one request (not --rest-retries of them), and the operator is told
    once what to configure, however many holes follow."""
    with run_sim_process("--symbols", "BTCUSDT", "--rate", "300") as sim:
        with run_ingest(sim, shm_name, *REST, "--streams", "trade", "--rest-retries", "5",
                        symbols=["BTCUSDT"]) as ing:
            ing.wait_for(lambda: len(ing.records()) > 100, 20, "trades")
            sim.fault("rest_fail", count=1000, status=401)
            for k in range(2):
                # held off for a while, so trades are certainly printed while it is away
                sim.fault("refuse")
                sim.fault("drop", target="streams")
                time.sleep(0.5)
                sim.fault("refuse", on=False)
                ing.wait_for(lambda k=k: ing.metrics()["trade_gaps"] >= k + 1, 30,
                             f"GAP record {k + 1}")
                ing.wait_for(lambda: ing.metrics()["conn_state_0"] == 2, 20, "reconnected")
            m = ing.metrics()
            recs = ing.records()
            log = ing.log_text()
        assert m["trades_backfilled"] == 0
        # one request per hole: a 401 is not retried
        assert m["rest_requests"] == m["trade_gaps"], m
        gaps = recs[recs["kind"] == Kind.GAP]
        assert len(gaps) == m["trade_gaps"]
        assert ((gaps["flags"] & Flags.TRADE_IDS) != 0).all()
        assert log.count("historicalTrades refused the request") == 1


def test_a_book_stale_for_long_is_a_health_problem_until_it_is_current_again(
        shm_name: str) -> None:
    """A break whose snapshots keep failing leaves the book stale behind a live connection:
    half dead, so `problem_books_stale` makes ingest unhealthy once it lasts longer than a
    reconnect cycle (here 2 x 1 s stall timeout + 1 s backoff), and clears after the resync."""
    from pipeline.ops.health import problem_fields

    with run_sim_process("--symbols", "BTCUSDT", "--rate", "50") as sim, \
            run_ingest(sim, shm_name, "--fast-path", "off", "--stall-timeout", "1",
                       "--backoff-max", "1", "--streams", "aggTrade,depth@100ms",
                       symbols=["BTCUSDT"]) as ing:
        ing.wait_for(lambda: ing.metrics()["book_resyncs"] >= 1, 20, "the book synced")
        assert ing.metrics()["problem_books_stale"] == 0
        sim.fault("rest_fail", duration=10)
        resync_all_books(sim)
        ing.wait_for(lambda: ing.metrics()["problem_books_stale"] == 1, 20, "problem raised")
        assert "books_stale=1" in problem_fields(ing.metrics())
        ing.wait_for(lambda: ing.metrics()["problem_books_stale"] == 0, 30, "problem cleared")
        m = ing.metrics()
        recs = ing.records()
    assert m["book_resyncs"] >= 2
    assert stale_marks(recs, 0, ends=(Kind.BOOK_RESYNC,)) >= 1
    assert m["rest_errors"] > 0
