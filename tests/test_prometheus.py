"""Prometheus exposition (pipeline/ops/prometheus.py): every process's real metrics block, read
from shared memory, scraped, parsed back with prometheus-client's parser and held to the naming
rules; ``promtool check metrics`` where promtool is installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.consumers import monitor, persist
from pipeline.consumers.risk import table_fields
from pipeline.ipc.metrics import MetricsBlock
from pipeline.ipc.records import TICK_DTYPE
from pipeline.ipc.segments import RingReader, RingWriter
from pipeline.marketdata.ingest_metrics import metrics_fields
from pipeline.ops.health import collect, evaluate, render_prometheus
from pipeline.ops.prometheus import field_family, kind_of
from pipeline.trading.process import METRICS_FIELDS as TRADING_FIELDS

SYMBOLS = ["BTCUSDT", "ETHUSDT", "BNBUSDT"]
HOSTILE = 'evil\\name"\nfake_metric{x="1"} 1'
#: every process's block: component name -> the (name, dtype) list the process creates it with
BLOCKS: dict[str, list[tuple[str, str]]] = {
    "ingest.metrics": metrics_fields(len(SYMBOLS)),
    "trading.metrics": TRADING_FIELDS,
    "persist.metrics": persist.METRICS_FIELDS,
    "monitor.metrics": monitor.METRICS_FIELDS,
    "risk.limits": table_fields(SYMBOLS[:2]),
}

UNIT_ABBREVIATION = re.compile(r"_(ns|us|ms|s|sec|m|h|d|b|kb|mb|gb)(_|$)")
INDEX_SUFFIX = re.compile(r"_\d+$")
RESERVED_SUFFIX = re.compile(r"_(count|sum|bucket)$")


def naming_problems(text: str) -> list[str]:
    """The exposition rules we hold ourselves to, checked on the parsed families (and on the
    raw TYPE lines: the parser adds ``_total`` to a counter's samples by itself)."""
    problems = []
    for line in text.splitlines():
        parts = line.split()
        is_counter = parts[:2] == ["#", "TYPE"] and parts[3:] == ["counter"]
        if is_counter and not parts[2].endswith("_total"):
            problems.append(f"{parts[2]}: counter without _total")
    for fam in text_string_to_metric_families(text):
        if not fam.documentation:
            problems.append(f"{fam.name}: no HELP")
        if fam.type == "unknown":
            problems.append(f"{fam.name}: no TYPE")
        for s in fam.samples:
            if fam.type != "counter" and s.name.endswith("_total"):
                problems.append(f"{s.name}: _total on a {fam.type}")
            if UNIT_ABBREVIATION.search(s.name):
                problems.append(f"{s.name}: abbreviated unit (use seconds/bytes)")
            if INDEX_SUFFIX.search(s.name):
                problems.append(f"{s.name}: index folded into the name (use a label)")
            if fam.type not in ("histogram", "summary") and RESERVED_SUFFIX.search(s.name):
                problems.append(f"{s.name}: histogram suffix on a {fam.type}")
    return sorted(set(problems))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


@pytest.fixture
def pipeline_shm(shm_name: str) -> Iterator[tuple[str, str, dict[str, MetricsBlock]]]:
    """Every process's block with its real field list, and a tick ring with two readers (one
    named with a backslash, a quote and a newline), under a unique prefix."""
    prefix, ring = f"{shm_name}.", f"{shm_name}.ticks"
    opened: list[Any] = []
    try:
        w = RingWriter.create(ring, TICK_DTYPE, 1024, SYMBOLS)
        opened.append(w)
        opened.append(RingReader.attach(ring, "monitor"))
        try:
            opened.append(RingReader.attach(ring, 'a\\b"c\nd'))
        except ValueError:
            pass  # the ring refuses such names at attach: the unit test below covers the report
        blocks = {}
        for name, fields in BLOCKS.items():
            blocks[name] = MetricsBlock.create(f"{prefix}{name}", fields)
            opened.append(blocks[name])
        yield prefix, ring, blocks
    finally:
        for x in reversed(opened):
            x.close()


def scrape(prefix: str, ring: str) -> str:
    return render_prometheus(collect([ring], prefix=prefix), SYMBOLS)


def test_every_process_block_follows_the_naming_rules(
    pipeline_shm: tuple[str, str, dict[str, MetricsBlock]],
) -> None:
    prefix, ring, blocks = pipeline_shm
    blocks["ingest.metrics"].set(frames_received=10, last_frame_ns=1_700_000_000_500_000_000)
    blocks["trading.metrics"].set(state=3, rtt_us=250.0, clock_offset_ms=-1.5)
    text = scrape(prefix, ring)
    assert naming_problems(text) == [], text
    names = {s[0] for s in samples(text)}
    expected = {
        "pipeline_build_info", "pipeline_component_healthy", "pipeline_trading_rtt_seconds",
        "pipeline_ingest_frames_received_total", "pipeline_ring_reader_lag_records",
        "pipeline_risk_position", "pipeline_persist_inserted_total",
        "pipeline_monitor_records_total",
    }  # fmt: skip
    assert expected <= names, expected - names
    assert "pipeline_component_field" not in names, "a process field has no family of its own"


def test_the_rules_checker_catches_what_the_old_output_did() -> None:
    """The checker is not vacuous: the hand-written output's faults are each reported."""
    old = (
        "pipeline_ingest_conn_state_0 2\n"
        "pipeline_trading_rtt_us 150.5\n"
        "# HELP pipeline_ingest_reconnects reconnects\n"
        "# TYPE pipeline_ingest_reconnects counter\n"
        "pipeline_ingest_reconnects 3\n"
    )
    found = "\n".join(naming_problems(old))
    assert "pipeline_ingest_conn_state_0: no HELP" in found
    assert "pipeline_ingest_conn_state_0: index folded into the name" in found
    assert "pipeline_trading_rtt_us: abbreviated unit" in found
    assert "pipeline_ingest_reconnects: counter without _total" in found


def test_values_in_base_units_and_labels_instead_of_indexes(
    pipeline_shm: tuple[str, str, dict[str, MetricsBlock]],
) -> None:
    prefix, ring, blocks = pipeline_shm
    blocks["ingest.metrics"].set(
        conn_state_2=2, last_agg_id_1=4242, skipped_oversized=7, last_frame_ns=1_700_000_000 * 10**9
    )
    blocks["trading.metrics"].set(state=4, rtt_us=250.0, clock_offset_ms=-1.5, orders_in_doubt=2,
                                  problem_unknown_orders_stale=1)  # fmt: skip
    blocks["persist.metrics"].set(last_flush_us=1500.0, inserted=9)
    blocks["risk.limits"].set(s_ETHUSDT__pos=-0.5)
    got = samples(scrape(prefix, ring))
    assert got["pipeline_ingest_connection_state", (("shard", "2"),)] == 2
    assert got["pipeline_ingest_last_agg_trade_id", (("symbol", "ETHUSDT"),)] == 4242
    assert got["pipeline_ingest_frames_skipped_total", (("reason", "oversized"),)] == 7
    assert got["pipeline_ingest_last_frame_timestamp_seconds", ()] == 1_700_000_000
    assert got["pipeline_trading_rtt_seconds", ()] == 0.00025
    assert got["pipeline_trading_clock_offset_seconds", ()] == -0.0015
    assert got["pipeline_trading_orders_in_doubt", ()] == 2
    assert got["pipeline_trading_session_state", (("state", "RECONNECTING"),)] == 1
    assert got["pipeline_trading_session_state", (("state", "READY"),)] == 0
    assert got["pipeline_component_healthy", (("component", "trading"),)] == 0
    stale = (("component", "trading"), ("problem", "unknown_orders_stale"))
    assert got["pipeline_component_problem", stale] == 1
    assert got["pipeline_persist_last_flush_duration_seconds", ()] == 0.0015
    assert got["pipeline_persist_inserted_total", ()] == 9
    assert got["pipeline_risk_position", (("symbol", "ETHUSDT"),)] == -0.5
    assert got["pipeline_ring_reader_lag_records", (("reader", "monitor"), ("ring", ring))] == 0
    version = [k for k in got if k[0] == "pipeline_build_info"]
    assert len(version) == 1, version
    assert dict(version[0][1])["version"], version


def test_the_order_round_trip_is_a_histogram_in_seconds(
    pipeline_shm: tuple[str, str, dict[str, MetricsBlock]],
) -> None:
    """The trading block's bucket counts become one Prometheus histogram: cumulative buckets
    with their bounds in seconds, +Inf, _count and _sum; the parts appear nowhere else."""
    prefix, ring, blocks = pipeline_shm
    blocks["trading.metrics"].set(order_rtt_le_300us=2, order_rtt_le_1000us=5,
                                  order_rtt_le_inf=1,
                                  order_rtt_sum_us=9000.0)  # fmt: skip
    text = scrape(prefix, ring)
    assert naming_problems(text) == [], text
    got = samples(text)
    name = "pipeline_trading_order_rtt_seconds"
    assert got[f"{name}_bucket", (("le", "0.0002"),)] == 0
    assert got[f"{name}_bucket", (("le", "0.0003"),)] == 2
    assert got[f"{name}_bucket", (("le", "0.001"),)] == 7
    assert got[f"{name}_bucket", (("le", "0.1"),)] == 7
    assert got[f"{name}_bucket", (("le", "+Inf"),)] == 8
    assert got[f"{name}_count", ()] == 8
    assert got[f"{name}_sum", ()] == 0.009
    assert not any("order_rtt" in n and not n.startswith(name) for n, _ in got)


def test_every_field_of_every_process_has_a_family_of_its_own() -> None:
    """A field added to a process's block without a name here fails this test (it would be
    exposed raw as pipeline_component_field, which the naming rules let through)."""
    for block, fields in BLOCKS.items():
        comp = block.removesuffix(".metrics")
        assert kind_of(comp) is not None, comp
        for name, _ in fields:
            found = field_family(comp, name, SYMBOLS)
            if found is None:
                continue  # deliberately not exposed (a sum of other fields)
            assert found[0].name != "pipeline_component_field", f"{comp}.{name}"


def test_unknown_component_and_field_are_exposed_raw_not_dropped() -> None:
    rep = evaluate({"pipeline.mysink.metrics": {"rows_9": 5, "_writer_alive": True}}, {}, 0)
    got = samples(render_prometheus(rep))
    assert got["pipeline_component_field", (("component", "mysink"), ("field", "rows_9"))] == 5
    assert got["pipeline_component_writer_alive", (("component", "mysink"),)] == 1


def test_hostile_reader_name_round_trips_through_the_parser() -> None:
    rep = evaluate(
        {},
        {"pipeline.ticks": {"writer_alive": True, "writer_pid": 7, "generation": 1, "cursor": 3,
                            "capacity": 8, "readers": [{"name": HOSTILE, "lag": 2, "missed": 1}]}},
        0,
    )  # fmt: skip
    text = render_prometheus(rep)
    assert not any(line.startswith("fake_metric") for line in text.splitlines()), text
    got = samples(text)
    key = (("reader", HOSTILE), ("ring", "pipeline.ticks"))
    assert got["pipeline_ring_reader_lag_records", key] == 2
    assert got["pipeline_ring_reader_missed_records_total", key] == 1
    assert naming_problems(text) == []


def test_real_reader_with_hostile_name_in_a_scrape(
    pipeline_shm: tuple[str, str, dict[str, MetricsBlock]],
) -> None:
    prefix, ring, _ = pipeline_shm
    readers = {
        dict(k[1])["reader"]
        for k in samples(scrape(prefix, ring))
        if k[0] == "pipeline_ring_reader_lag_records"
    }
    if 'a\\b"c\nd' not in readers:
        pytest.skip("the ring refuses such reader names at attach; the report-level test covers it")
    assert readers == {"monitor", 'a\\b"c\nd'}


def test_cli_prints_the_exposition(pipeline_shm: tuple[str, str, dict[str, MetricsBlock]]) -> None:
    prefix, ring, blocks = pipeline_shm
    blocks["trading.metrics"].set(state=3)
    env = {**os.environ, "PIPELINE_RUN_SHM_PREFIX": prefix, "PIPELINE_RING_NAME": ring}
    cmd = [sys.executable, "-m", "pipeline", "health", "--prometheus"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode in (0, 1), out.stderr  # 1: the blocks' writers say "no frame yet"
    assert naming_problems(out.stdout) == []
    assert samples(out.stdout)["pipeline_trading_state", ()] == 3


def test_promtool_check_metrics(pipeline_shm: tuple[str, str, dict[str, MetricsBlock]]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (Debian: apt-get install prometheus): lint not run")
    prefix, ring, blocks = pipeline_shm
    blocks["trading.metrics"].set(state=3, rtt_us=99.0)
    text = scrape(prefix, ring)
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# the Grafana dashboard (deploy/grafana/pipeline.json) queries only what a scrape has

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "pipeline.json"
METRIC_IN_EXPR = re.compile(r"\bpipeline_[a-z0-9_]+\b")


def _exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                yield v
            else:
                yield from _exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _exprs(v)


def test_dashboard_queries_only_metrics_a_scrape_has(
    pipeline_shm: tuple[str, str, dict[str, MetricsBlock]],
) -> None:
    prefix, ring, _ = pipeline_shm
    emitted = {name for name, _ in samples(scrape(prefix, ring))}
    dash = json.loads(DASHBOARD.read_text())
    exprs = list(_exprs(dash["panels"]))
    assert len(exprs) >= 20, exprs
    for expr in exprs:
        names = set(METRIC_IN_EXPR.findall(expr))
        assert names, f"no pipeline metric in {expr!r}"
        assert names <= emitted, f"{expr!r}: not emitted: {sorted(names - emitted)}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in dash["panels"]}
    issue_panels = {"Feed rate", "Gaps", "Reconnects", "Reader lag", "Records missed",
                    "Session state", "Round trip", "Orders in doubt"}  # fmt: skip
    assert issue_panels <= titles, issue_panels - titles
