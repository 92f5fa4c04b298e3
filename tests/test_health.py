"""`pipeline health`: pure rules, real metrics blocks and rings, the CLI, Prometheus text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest

from pipeline.health import (
    collect,
    evaluate,
    overall,
    render_prometheus,
    render_text,
    serve_prometheus,
)
from pipeline.metrics import MetricsBlock
from pipeline.records import TICK_DTYPE
from pipeline.ring import RingReader, RingWriter

NOW = 1_800_000_000_000_000_000
TRADING_FIELDS = [("state", "<i8"), ("rtt_us", "<f8"), ("reconnects_total", "<i8"),
                  ("orders_unknown", "<i8")]  # fmt: skip
INGEST_FIELDS = [("last_frame_ns", "<i8"), ("published", "<i8")]


def trading(state: int, alive: bool = True) -> dict[str, object]:
    return {"state": state, "rtt_us": 150.5, "reconnects_total": 2, "orders_unknown": 1,
            "_writer_alive": alive}  # fmt: skip


def test_trading_ready_and_fresh_ingest_is_healthy() -> None:
    rep = evaluate(
        {
            "pipeline.trading.metrics": trading(3),
            "pipeline.ingest.metrics": {"last_frame_ns": NOW - 10**9, "_writer_alive": True},
        },
        {"pipeline.ticks": {"writer_alive": True, "writer_pid": 7, "cursor": 5, "readers": []}},
        NOW,
        expect=["ingest", "trading"],
    )
    assert overall(rep)
    t = rep["trading"]
    assert (t["state"], t["reconnects"], t["last_rtt_us"], t["orders_unknown"]) == (
        "READY",
        2,
        150.5,
        1,
    )
    assert rep["ingest"]["last_frame_age_s"] == 1.0


T, IG = "pipeline.trading.metrics", "pipeline.ingest.metrics"
P, R = "pipeline.persist.metrics", "pipeline.ticks"
OLD = NOW - 30 * 10**9


@pytest.mark.parametrize(
    ("blocks", "rings", "component", "problem"),
    [
        ({T: trading(4)}, {}, "trading", "RECONNECTING, not READY"),
        ({T: trading(3, alive=False)}, {}, "trading", "writer process is dead"),
        ({IG: {"last_frame_ns": OLD}}, {}, "ingest", "30.0s ago"),
        ({IG: {"last_frame_ns": 0}}, {}, "ingest", "no frame yet"),
        ({}, {R: {"writer_alive": False, "writer_pid": 9}}, f"ring:{R}", "pid 9 is dead"),
        ({}, {R: None}, f"ring:{R}", "does not exist"),
        ({}, {}, "trading", "not running"),
        ({P: {"inserted": 1, "_writer_alive": False}}, {}, "persist", "dead"),
    ],
)  # fmt: skip
def test_unhealthy_cases_name_the_problem(
    blocks: dict[str, dict[str, object]], rings: dict[str, object], component: str, problem: str
) -> None:
    rep = evaluate(blocks, rings, NOW, expect=["trading"])  # type: ignore[arg-type]
    assert not overall(rep)
    assert not rep[component]["healthy"]
    assert any(problem in p for p in rep[component]["problems"]), rep[component]


def test_renderers() -> None:
    rep = evaluate(
        {"pipeline.trading.metrics": trading(3), "pipeline.persist.metrics": {"inserted": 5}},
        {"pipeline.ticks": {"writer_alive": True, "writer_pid": 7, "generation": 2, "cursor": 9,
                            "readers": [{"name": "monitor", "pid": 8, "lag": 1, "missed": 3}]}},
        NOW,
    )  # fmt: skip
    text = render_text(rep)
    assert "OK   trading" in text
    assert "state=READY" in text
    assert "monitor(lag 1, missed 3)" in text
    assert text.endswith("overall: healthy")
    prom = render_prometheus(rep)
    assert 'pipeline_component_healthy{component="trading"} 1' in prom
    assert "pipeline_persist_inserted 5" in prom
    assert 'pipeline_ring_reader_missed{ring="ring:pipeline.ticks",reader="monitor"} 3' in prom


@pytest.fixture
def live(shm_name: str) -> Iterator[tuple[str, str, MetricsBlock, MetricsBlock]]:
    """A ring with one reader and trading/ingest metrics blocks under a unique prefix."""
    prefix, ring = f"{shm_name}.", f"{shm_name}.ticks"
    w = RingWriter.create(ring, TICK_DTYPE, 1024, ["BTCUSDT"])
    r = RingReader.attach(ring, "monitor")
    t = MetricsBlock.create(f"{prefix}trading.metrics", TRADING_FIELDS)
    i = MetricsBlock.create(f"{prefix}ingest.metrics", INGEST_FIELDS)
    try:
        yield prefix, ring, t, i
    finally:
        for x in (i, t, r, w):
            x.close()


def test_collect_reads_shared_memory(live: tuple[str, str, MetricsBlock, MetricsBlock]) -> None:
    prefix, ring, t, i = live
    t.set(state=3, rtt_us=99.0, reconnects_total=1, orders_unknown=0)
    i.set(last_frame_ns=NOW - 2 * 10**9, published=10)
    rep = collect([ring], expect=["trading", "ingest"], prefix=prefix, now_ns=lambda: NOW)
    assert overall(rep), rep
    assert rep["trading"]["state"] == "READY"
    assert rep[f"ring:{ring}"]["readers"][0]["name"] == "monitor"
    t.set(state=1)
    assert not overall(collect([ring], prefix=prefix, now_ns=lambda: NOW))


def test_cli_json_and_exit_status(live: tuple[str, str, MetricsBlock, MetricsBlock]) -> None:
    import time

    prefix, ring, t, i = live
    env = {**os.environ, "PIPELINE_RUN_SHM_PREFIX": prefix, "PIPELINE_RING_NAME": ring}
    cmd = [sys.executable, "-m", "pipeline", "health", "--json"]
    t.set(state=3, rtt_us=120.0, reconnects_total=0, orders_unknown=0)
    i.set(last_frame_ns=time.time_ns())
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    doc = json.loads(ok.stdout)
    assert {"trading", "ingest", f"ring:{ring}"} <= set(doc)
    assert {"state", "reconnects", "last_rtt_us", "orders_unknown"} <= set(doc["trading"])
    assert doc["trading"]["state"] == "READY"
    t.set(state=4)
    bad = subprocess.run(cmd[:-1], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "FAIL trading" in bad.stdout
    assert "RECONNECTING" in bad.stdout


def test_prometheus_endpoint(live: tuple[str, str, MetricsBlock, MetricsBlock]) -> None:
    prefix, ring, t, _ = live
    t.set(state=3, rtt_us=5.0)
    server = serve_prometheus(0, lambda: collect([ring], prefix=prefix))
    try:
        host, port = server.server_address[:2]
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
            ctype = resp.headers["Content-Type"]
        assert ctype.startswith("text/plain")
        assert 'pipeline_component_healthy{component="trading"} 1' in body
        assert "pipeline_trading_rtt_us 5.0" in body
    finally:
        server.shutdown()
        server.server_close()
