"""`pipeline health`: pure rules, real metrics blocks and rings, the CLI, Prometheus text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline.ipc.metrics import MetricsBlock
from pipeline.ipc.records import TICK_DTYPE
from pipeline.ipc.segments import RingReader, RingWriter
from pipeline.ops.health import (
    collect,
    evaluate,
    overall,
    render_prometheus,
    render_text,
    serve_prometheus,
)

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
    assert 'pipeline_component_healthy{component="trading"} 1.0' in prom
    assert "pipeline_persist_inserted_total 5.0" in prom
    assert (
        'pipeline_ring_reader_missed_records_total{reader="monitor",ring="pipeline.ticks"} 3.0'
        in prom
    )


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
        assert 'pipeline_component_healthy{component="trading"} 1.0' in body
        assert "pipeline_trading_rtt_seconds 5e-06" in body  # the block's us, in base units
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------
# half-dead components: problem_* fields and heartbeats (issue #11)


def test_problem_fields_make_any_component_unhealthy() -> None:
    blocks: dict[str, dict[str, Any]] = {
        "pipeline.trading.metrics": {**trading(3), "problem_unknown_orders_stale": 3,
                                     "problem_other": 0},
        P: {"inserted": 5, "problem_sink_errors": 0.0},
    }  # fmt: skip
    rep = evaluate(blocks, {}, NOW)
    assert not rep["trading"]["healthy"]
    assert rep["trading"]["problems"] == ["unknown_orders_stale=3"]
    assert rep["persist"]["healthy"], rep["persist"]  # zero problem fields are no problem
    text = render_text(rep)
    assert "FAIL trading" in text
    assert "unknown_orders_stale=3" in text
    blocks[P]["problem_sink_errors"] = float("nan")  # a torn/NaN problem field is not "fine"
    assert not evaluate(blocks, {}, NOW)["persist"]["healthy"]


@pytest.mark.parametrize(
    ("interval_ms", "age_s", "healthy"),
    [
        (1000, 2.9, True),  # within 3 intervals
        (1000, 3.5, False),  # more than 3 intervals
        (100, 1.5, True),  # the 2 s floor: a fast heartbeat does not flap on one late flush
        (100, 2.5, False),
        (0, 3600.0, True),  # no heartbeat promised: no staleness rule (today's behaviour)
    ],
)
def test_heartbeat_staleness(interval_ms: int, age_s: float, healthy: bool) -> None:
    snap = {"heartbeat_interval_ms": interval_ms, "_updated_at_ns": NOW - int(age_s * 1e9),
            "_writer_alive": True}  # fmt: skip
    rep = evaluate({"pipeline.risk.metrics": snap}, {}, NOW)
    assert rep["risk"]["healthy"] is healthy, rep["risk"]
    if not healthy:
        assert rep["risk"]["problems"] == [
            f"metrics not updated for {age_s:.1f} s: process stalled"
        ]


def test_block_without_heartbeat_keeps_old_rules() -> None:
    snap = {"inserted": 1, "_updated_at_ns": NOW - 3600 * 10**9, "_writer_alive": True}
    assert evaluate({P: snap}, {}, NOW)["persist"]["healthy"]


def test_dead_writer_is_named_not_stalled() -> None:
    snap = {"heartbeat_interval_ms": 100, "_updated_at_ns": OLD, "_writer_alive": False}
    assert evaluate({P: snap}, {}, NOW)["persist"]["problems"] == ["writer process is dead"]


def test_trading_reports_orders_unknown_now() -> None:
    """A block of an older trading process (only ``orders_unknown_now``): read as in doubt."""
    rep = evaluate({T: {**trading(3), "orders_unknown_now": 4}}, {}, NOW)
    assert rep["trading"]["orders_unknown_now"] == 4
    assert rep["trading"]["orders_in_doubt"] == 4
    assert "orders_in_doubt=4" in render_text(rep)


def test_orders_in_doubt_gauge_next_to_the_counter_and_stale_is_unhealthy() -> None:
    snap = {**trading(3), "orders_unknown": 9, "orders_in_doubt": 2, "orders_unknown_now": 2}
    rep = evaluate({T: snap}, {}, NOW)
    e = rep["trading"]
    assert (e["orders_in_doubt"], e["orders_unknown"], e["orders_unknown_total"]) == (2, 9, 9)
    assert e["healthy"]  # in doubt, but not for longer than unknown_stale_s
    text = render_text(rep)
    assert "orders_unknown=9" in text
    assert "orders_in_doubt=2" in text
    assert "pipeline_trading_orders_in_doubt 2.0" in render_prometheus(rep)
    rep = evaluate({T: {**snap, "problem_unknown_orders_stale": 1}}, {}, NOW)
    assert not rep["trading"]["healthy"]
    assert "unknown_orders_stale=1" in rep["trading"]["problems"]


# ---------------------------------------------------------------------------------------------
# Prometheus label escaping (issue #11: "Prometheus labels do not escape \n")

HOSTILE = 'evil\\name"\nfake_metric{x="1"} 1'


def _unescape_label(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1]
            out.append({"n": "\n", "\\": "\\", '"': '"'}[nxt])
            i += 2
            continue
        assert c not in '"\n', f"unescaped {c!r} in label value {text!r}"
        out.append(c)
        i += 1
    return "".join(out)


def test_prometheus_escapes_hostile_reader_names() -> None:
    rep = evaluate(
        {},
        {"pipeline.ticks": {"writer_alive": True, "writer_pid": 7, "generation": 1, "cursor": 0,
                            "readers": [{"name": HOSTILE, "pid": 8, "lag": 2, "missed": 0}]}},
        NOW,
    )  # fmt: skip
    prom = render_prometheus(rep)
    lines = prom.splitlines()
    # the name's newline did not start a line of its own: no injected series
    assert not any(line.startswith("fake_metric") for line in lines), prom
    lag = [line for line in lines if line.startswith("pipeline_ring_reader_lag_records{")]
    assert len(lag) == 1, prom
    assert lag[0] == (
        'pipeline_ring_reader_lag_records{reader="evil\\\\name\\"\\nfake_metric{x=\\"1\\"} 1",'
        'ring="pipeline.ticks"} 2.0'
    )
    label = lag[0].split('reader="', 1)[1].rsplit('",ring=', 1)[0]
    assert _unescape_label(label) == HOSTILE
    # every sample line is `name{labels} value` or `name value`: nothing else leaked through
    for line in lines:
        if not line.startswith("#"):
            assert line.rsplit(" ", 1)[1].replace(".", "").replace("-", "").isdigit(), line
    text = render_text(rep)
    assert "\nfake_metric" not in text  # the text view escapes it too


def test_prometheus_endpoint_with_hostile_reader_name(shm_name: str) -> None:
    """A real ring whose reader table holds a hostile name, scraped over HTTP."""
    ring = f"{shm_name}.ticks"
    w = RingWriter.create(ring, TICK_DTYPE, 1024, ["BTCUSDT"])
    try:
        r = RingReader.attach(ring, 'a\\b"c\nd')
    except ValueError as exc:  # names are validated at attach: then nothing can reach health
        w.close()
        pytest.skip(f"ring refuses hostile reader names at attach ({exc}); covered by unit test")
    server = serve_prometheus(0, lambda: collect([ring], prefix=f"{shm_name}."))
    try:
        host, port = server.server_address[:2]
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
        readers = [ln for ln in body.splitlines() if ln.startswith("pipeline_ring_reader_lag_")]
        assert len(readers) == 1, body
        assert 'reader="a\\\\b\\"c\\nd"' in readers[0], readers
    finally:
        server.shutdown()
        server.server_close()
        r.close()
        w.close()


# ---------------------------------------------------------------------------------------------
# a real process that stops updating (SIGSTOP) turns `pipeline health` red, SIGCONT green again

HEARTBEAT_CHILD = r"""
import signal, sys, threading
from pipeline.ipc.metrics import MetricsBlock
from pipeline.ipc.records import TICK_DTYPE
from pipeline.ipc.segments import RingWriter

ring, block = sys.argv[1], sys.argv[2]
w = RingWriter.create(ring, TICK_DTYPE, 1024, ["BTCUSDT"])
m = MetricsBlock.create(block, [("heartbeat_interval_ms", "<i8"), ("beats", "<i8")])
m.set(heartbeat_interval_ms=200, beats=0)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
print("ready", flush=True)
beats = 0
while not stop.wait(0.2):  # the heartbeat timer: one store per interval, even when idle
    beats += 1
    m.set(beats=beats)
m.close()
w.close()
"""


def _health(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "health", "--expect", "hb"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _until_exit(env: dict[str, str], code: int, limit_s: float = 30.0) -> str:
    import time

    deadline = time.monotonic() + limit_s
    while True:
        res = _health(env)
        if res.returncode == code:
            return res.stdout
        assert time.monotonic() < deadline, (
            f"`pipeline health` never exited {code}:\n{res.stdout}{res.stderr}"
        )
        time.sleep(0.2)  # one check per heartbeat interval is plenty


def test_stopped_process_turns_health_red_and_back(shm_name: str) -> None:
    import signal

    prefix, ring = f"{shm_name}.", f"{shm_name}.ticks"
    env = {**os.environ, "PIPELINE_RUN_SHM_PREFIX": prefix, "PIPELINE_RING_NAME": ring}
    child = subprocess.Popen(
        [sys.executable, "-c", HEARTBEAT_CHILD, ring, f"{prefix}hb.metrics"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        first = _health(env)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "OK   hb" in first.stdout
        child.send_signal(signal.SIGSTOP)
        red = _until_exit(env, 1)
        assert "FAIL hb" in red, red
        assert "process stalled" in red, red
        assert f"OK   ring:{ring}" in red  # the pid is alive: only the heartbeat tells
        child.send_signal(signal.SIGCONT)
        green = _until_exit(env, 0)
        assert "OK   hb" in green
    finally:
        child.send_signal(signal.SIGCONT)
        child.terminate()
        child.wait(30)
        assert child.stdout is not None
        child.stdout.close()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(shm_name)]


def test_refused_segment_is_reported_not_dropped(shm_name: str) -> None:
    """A segment with our metrics magic that cannot be read as a block (here a corrupt
    description; in the field a neighbour's file the trust rule refuses) shows as unhealthy."""
    from pipeline.ipc.metrics import MAGIC

    path = f"/dev/shm/{shm_name}.bogus.metrics"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, MAGIC + b"\xff" * 248)
        os.close(fd)
        rep = collect([], prefix=f"{shm_name}.")
        entry = rep[f"segment:{shm_name}.bogus.metrics"]
        assert not entry["healthy"]
        assert entry["problems"][0].startswith("refused: ")
        assert not overall(rep)
    finally:
        os.unlink(path)


def test_foreign_segment_under_the_prefix_is_named(shm_name: str) -> None:
    """A neighbour (uid 65534, a real process) plants a file with our metrics magic under our
    prefix. The trust rule refuses to map it; health names it instead of staying silent."""
    import shutil

    from pipeline.ipc.metrics import MAGIC

    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs setpriv and root to act as uid 65534: foreign segment NOT verified")
    if not os.access("/usr/bin/python3", os.X_OK):  # ours lives under /root: 65534 cannot run it
        pytest.skip("no system python3 for the uid-65534 planter: foreign segment NOT verified")
    path = f"/dev/shm/{shm_name}.planted.metrics"
    planter = (
        "import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT|os.O_EXCL, 0o666); "
        "os.fchmod(fd, 0o666); os.write(fd, bytes.fromhex(sys.argv[2]) + bytes(248))"
    )
    res = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "/usr/bin/python3", "-c", planter, path, MAGIC.hex()],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    try:
        assert os.stat(path).st_uid == 65534
        rep = collect([], prefix=f"{shm_name}.")
        entry = rep[f"segment:{shm_name}.planted.metrics"]
        assert not entry["healthy"]
        assert "owned by uid 65534" in entry["problems"][0], entry
        assert "planted" not in rep  # never read as a component
    finally:
        os.unlink(path)
