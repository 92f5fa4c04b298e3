"""`pipeline ingest` against the simulator when the venue refuses the handshake or shuts a
connection with no lead (#15): real processes, real sockets.

- a 4xx (not 429/418) on the first connection is a configuration error: exit 2 with a message;
- later, a loud health problem (problem_streams_rejected) and a slow retry, cleared once the
  venue serves the streams again;
- serverShutdown followed by the close at once (no lead): every aggregate id still exactly once,
  in order, no GAP record.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from simhelpers import run
from test_ingest_integration import (
    FAST,
    SYMBOLS,
    agg_of,
    assert_exactly_once_in_order,
    run_ingest,
)

from pipeline.ipc.records import Kind
from pipeline.marketdata.shards import UP, is_config_rejection
from pipeline.ops.health import problem_fields
from pipeline.sim.testing import SimServer, run_sim_process

# the connection handling under test is the same either way; the pure-Python frame path keeps
# these tests independent of the compiled extension's build state
PURE = ("--fast-path", "off")


def test_config_rejection_is_4xx_but_not_429_or_418() -> None:
    assert [s for s in (None, 101, 400, 403, 404, 418, 429, 451, 500, 503)
            if is_config_rejection(s)] == [400, 403, 404, 451]


def test_a_404_streams_url_exits_2_with_a_message(shm_name: str) -> None:
    with run_sim_process("--symbols", "BTCUSDT", "--rate", "20") as sim:
        # the simulator answers 404 to any path but /stream and /ws: a wrong URL prefix
        cmd = [sys.executable, "-m", "pipeline", "--log-format", "text", "ingest",
               "--streams-url", f"{sim.streams_url}/nothing-here", "--rest-url", sim.rest_url,
               "--symbols", "BTCUSDT", "--ring", f"{shm_name}_ring",
               "--metrics", f"{shm_name}_met", *FAST, *PURE]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pipeline ingest: error: --streams-url" in proc.stderr
    assert "HTTP 404" in proc.stderr
    assert "/nothing-here" in proc.stderr


def test_a_refusal_after_start_is_a_health_problem_retried_slowly(shm_name: str) -> None:
    """Lower-case symbols and a URL with its /stream path are taken as given (#15)."""
    with run_sim_process("--symbols", ",".join(SYMBOLS), "--rate", "60", "--seed", "5") as sim, \
            run_ingest(sim, shm_name, "--streams-url", f"{sim.streams_url}/stream",
                       "--streams", "aggTrade", "--backoff-max", "1.5", *PURE,
                       symbols=[s.lower() for s in SYMBOLS]) as ing:
        ing.wait_for(lambda: len(agg_of(ing.records(), 0)) > 3, 15, "first trades")
        sim.fault("refuse", status=403)
        sim.fault("drop", mode="close")
        ing.wait_for(lambda: ing.metrics()["problem_streams_rejected"] == 403, 15,
                     "the refusal shown as a problem")
        assert "streams_rejected=403" in problem_fields(ing.metrics())
        assert ing.proc.poll() is None  # still running: the venue may come back
        log = ing.log_text()
        assert "streams handshake refused" in log
        assert "HTTP 403" in log
        assert "retry_in_s=1.5" in log  # the slow retry (--backoff-max), not the fast backoff
        sim.fault("refuse", on=False)
        ing.wait_for(lambda: ing.metrics()["problem_streams_rejected"] == 0
                     and ing.metrics()["conn_state_0"] == UP, 15, "served again")
        ing.wait_for(lambda: all(len(agg_of(ing.records(), s)) > 5 for s in (0, 1)), 15,
                     "trades of both symbols")
        last = {sid: int(agg_of(ing.records(), sid)["trade_id"][-1]) for sid in (0, 1)}
        ing.wait_for(lambda: all(int(agg_of(ing.records(), s)["trade_id"][-1]) > last[s] + 2
                                 for s in (0, 1)), 15, "trades after the refusal")
        recs = ing.records()
        assert_exactly_once_in_order(sim, recs, min_trades=5)
        assert not np.any(recs["kind"] == Kind.GAP)


def test_server_shutdown_with_no_lead_loses_nothing(shm_name: str) -> None:
    """serverShutdown and the close at once (Binance promises no lead since 2026-06-09): the
    shard reconnects at once and the id trackers backfill what the gap missed."""
    with run_sim_process("--symbols", ",".join(SYMBOLS), "--rate", "60", "--seed", "11") as sim, \
            run_ingest(sim, shm_name, "--streams", "aggTrade,bookTicker,depth@100ms",
                       *PURE) as ing:
        # both symbols: the rounds below name each one's last trade (a random walk may print
        # none for one of them in the first second)
        ing.wait_for(lambda: all(len(agg_of(ing.records(), s)) > 5 for s in (0, 1)), 30,
                     "first trades")
        for round_ in range(3):
            shutdowns = ing.metrics()["server_shutdowns"]
            sim.fault("shutdown", close_after=0)
            ing.wait_for(lambda s=shutdowns: ing.metrics()["server_shutdowns"] > s, 15,
                         "serverShutdown seen")
            ing.wait_for(lambda: ing.metrics()["conn_state_0"] == UP, 15, "connected again")
            last = {sid: int(agg_of(ing.records(), sid)["trade_id"][-1]) for sid in (0, 1)}
            ing.wait_for(lambda last=last: all(
                int(agg_of(ing.records(), s)["trade_id"][-1]) > last[s] + 2 for s in (0, 1)),
                15, f"trades after shutdown {round_}")
        sim.fault("shutdown", notice=False)  # a close with no notice at all
        last = {sid: int(agg_of(ing.records(), sid)["trade_id"][-1]) for sid in (0, 1)}
        ing.wait_for(lambda: all(int(agg_of(ing.records(), s)["trade_id"][-1]) > last[s] + 2
                                 for s in (0, 1)), 15, "trades after the silent close")
        m = ing.metrics()
        recs = ing.records()
        assert_exactly_once_in_order(sim, recs, min_trades=10)
        assert not np.any(recs["kind"] == Kind.GAP)
        assert m["server_shutdowns"] >= 3
        assert m["gaps_unrecoverable"] == 0
        assert m["ids_lost"] == 0
        assert np.any(recs["kind"] == Kind.BOOK_RESYNC)


@pytest.mark.parametrize("transport", ["picows", "websockets"])
def test_both_transports_surface_the_handshake_status(transport: str) -> None:
    from pipeline.net.ws import TRANSPORTS, WsConnectError, connect

    assert transport in TRANSPORTS

    async def go() -> None:
        async with SimServer(symbols=["BTCUSDT"]) as sim:
            with pytest.raises(WsConnectError) as err:
                await connect(f"{sim.streams_url}/nope/stream?streams=btcusdt@trade",
                              transport=transport, handshake_timeout=5)
            assert err.value.status == 404
            await sim.set_fault("refuse", status=429)
            with pytest.raises(WsConnectError) as err:
                await connect(f"{sim.streams_url}/stream?streams=btcusdt@trade",
                              transport=transport, handshake_timeout=5)
            assert err.value.status == 429
            assert not is_config_rejection(err.value.status)

    run(go)
