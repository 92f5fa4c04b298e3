"""scripts/latency_probe.py: the stage math, the sample store, and the probe as a real subprocess
attached to a ring this test writes (plus the order path's safety refusal)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from pipeline.ipc.records import TICK_DTYPE, Flags, Kind
from pipeline.ipc.ring import RingWriter, ring_stats

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "latency_probe.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("latency_probe", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["latency_probe"] = mod
    spec.loader.exec_module(mod)
    return mod


lp = _load()


def records(kind: int, n: int, *, ev: int, recv_after_us: int, publish_after_us: int,
            flags: int = 0, symbol: int = 0, first_id: int = 1) -> np.ndarray:
    """n records whose stamps are exact offsets from ``ev`` (ns)."""
    r = np.zeros(n, TICK_DTYPE)
    r["kind"] = kind
    r["flags"] = flags
    r["symbol"] = symbol
    r["trade_id"] = np.arange(first_id, first_id + n)
    r["price"] = 100.0
    r["bid_price"] = 99.5 if kind == Kind.BOOK_TICKER else 0.0
    r["event_time_ns"] = ev
    r["recv_time_ns"] = ev + recv_after_us * 1000
    r["publish_time_ns"] = ev + (recv_after_us + publish_after_us) * 1000
    return r


# --- pure functions -------------------------------------------------------------------------------


def test_summarize_percentiles_of_known_data() -> None:
    us = np.arange(1, 1001, dtype=np.float64)  # 1..1000
    s = lp.summarize(us)
    assert s["count"] == 1000
    assert s["max"] == 1000
    assert s["p50"] == pytest.approx(500.5)
    assert s["p99"] == pytest.approx(990.01)
    assert s["p99.9"] == pytest.approx(999.001)
    assert lp.summarize(np.array([]))["count"] == 0


def test_stage_latencies_exact_stamps_and_offset_sign() -> None:
    ev = 1_700_000_000_000_000_000
    batch = records(Kind.AGG_TRADE, 4, ev=ev, recv_after_us=2000, publish_after_us=7)
    seen = ev + 2_000_000 + 7_000 + 3_000
    st = lp.stage_latencies(batch, seen)
    assert np.all(st["exchange->recv"] == 2000.0)
    assert np.all(st["recv->publish"] == 7.0)
    assert np.all(st["publish->seen"] == 3.0)
    assert np.all(st["end-to-end"] == 2010.0)
    assert "exchange->recv (offset-corrected)" not in st
    # exchange clock 1.5 ms ahead of ours: the raw network stage understates by 1.5 ms
    st = lp.stage_latencies(batch, seen, offset_ms=1.5)
    assert np.all(st["exchange->recv (offset-corrected)"] == 3500.0)


def test_stage_latencies_leave_out_missing_stamps() -> None:
    batch = records(Kind.TRADE, 3, ev=10_000_000, recv_after_us=5, publish_after_us=5)
    batch["event_time_ns"][0] = 0  # e.g. a GAP record: no exchange time
    batch["recv_time_ns"][1] = 0
    st = lp.stage_latencies(batch, 10_000_000 + 20_000)
    assert st["exchange->recv"].size == 1
    assert st["recv->publish"].size == 2
    assert st["publish->seen"].size == 3
    assert st["end-to-end"].size == 2


def test_split_batch_groups_kinds_and_excludes_backfill() -> None:
    names = lp.kind_names()
    batch = np.concatenate([
        records(Kind.AGG_TRADE, 5, ev=1, recv_after_us=1, publish_after_us=1),
        records(Kind.AGG_TRADE, 2, ev=1, recv_after_us=1, publish_after_us=1,
                flags=int(Flags.BACKFILLED)),
        records(Kind.BOOK_TICKER, 3, ev=1, recv_after_us=1, publish_after_us=1),
        records(Kind.DEPTH_LEVEL, 1, ev=1, recv_after_us=1, publish_after_us=1,
                flags=int(Flags.SNAPSHOT)),
    ])
    parts, skipped = lp.split_batch(batch, names)
    assert skipped == 3
    assert {k: len(v) for k, v in parts} == {"agg_trade": 5, "book_ticker": 3}


def test_reservoir_bounded_exact_count_and_max_and_unbiased() -> None:
    res = lp.Reservoir(10_000, np.random.default_rng(1))
    stream = np.arange(1_000_000, dtype=np.float64)
    for chunk in np.array_split(stream, 97):
        res.add(chunk)
    assert res.count == 1_000_000
    assert res.size == 10_000
    assert res.max == 999_999.0
    # a store that kept only the first samples would have a median near 5_000
    assert 450_000 < float(np.median(res.values())) < 550_000


def test_stage_samples_summary_uses_exact_max() -> None:
    s = lp.StageSamples(limit=10)
    s.add("agg_trade", "publish->seen", np.arange(1000, dtype=np.float64))
    s.add("agg_trade", "publish->seen", np.array([], dtype=np.float64))
    out = s.summary()["agg_trade"]["publish->seen"]
    assert out["count"] == 1000
    assert out["max"] == 999.0


def test_ack_split_ours_plus_wire_is_total() -> None:
    t = lp.ack_split(submit_ns=1_000, sent_ns=31_000, reply_ns=531_000, publish_ns=541_000,
                     seen_ns=551_000)
    assert t.submit_ack == 550.0
    assert t.wire == 500.0
    assert t.ours == 50.0
    missing = lp.ack_split(1_000, 0, 0, 5_000, 9_000)
    assert missing.ours is None
    assert missing.wire is None
    assert missing.submit_ack == 8.0


def test_resting_order_on_grid_and_above_min_notional() -> None:
    rules = lp.SymbolRules(tick=0.01, step=0.00001, min_qty=0.00001, min_notional=5.0)
    price, qty = lp.resting_order(60_000.0, rules)
    assert price == 57_000.0
    assert price * qty >= 5.0
    assert round(qty / rules.step) * rules.step == pytest.approx(qty)
    with pytest.raises(ValueError, match="order-price"):
        lp.resting_order(0.0, rules)


@pytest.mark.parametrize(
    ("host", "loop"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("10.0.0.1", False), ("example.com", False), ("", False)],
)
def test_is_loopback_host(host: str, loop: bool) -> None:
    assert lp.is_loopback_host(host) is loop


def test_trading_venue_from_command_line() -> None:
    base = ["python", "-m", "pipeline", "trade", "--api-key", "k"]
    assert lp.trading_venue([*base, "--wsapi-url", "ws://127.0.0.1:5/ws-api/v3"]).endswith("/v3")
    assert lp.trading_venue([*base, "--wsapi-url=ws://h:1/x"]) == "ws://h:1/x"
    assert lp.trading_venue([*base, "--testnet"]) == "testnet"
    assert lp.trading_venue(base) == ""


def test_check_trading_venue_refuses_a_process_without_loopback_url() -> None:
    v = lp.check_trading_venue(os.getpid())  # pytest: no --wsapi-url -> production default
    assert not v.loopback
    assert "production" in v.why


def test_format_table_rows() -> None:
    s = lp.StageSamples()
    s.add("agg_trade", "recv->publish", np.array([1.0, 2.0, 3.0]))
    text = lp.format_table(s.summary(), "hdr")
    assert text.splitlines()[0] == "hdr"
    assert "agg_trade" in text
    assert "recv->publish" in text


def test_write_plot_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    s = lp.StageSamples()
    rng = np.random.default_rng(0)
    s.add("agg_trade", "publish->seen", rng.lognormal(2, 1, 1000))
    s.add("agg_trade", "end-to-end", rng.lognormal(7, 1, 1000))
    out = tmp_path / "cdf.png"
    assert lp.write_plot(s, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the probe as a subprocess --------------------------------------------------------------------


def _start_probe(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=ROOT,
    )


def _wait_registered(ring: str, proc: subprocess.Popen[str], reader: str) -> None:
    deadline = time.monotonic() + 30
    while not any(r["name"] == reader for r in ring_stats(ring)["readers"]):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "probe never attached"
        time.sleep(0.02)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


@pytest.mark.slow
def test_probe_subprocess_counts_kinds_and_writes_json_and_plot(
    shm_name: str, tmp_path: Path
) -> None:
    out_json, out_png = tmp_path / "out.json", tmp_path / "cdf.png"
    with RingWriter.create(shm_name, TICK_DTYPE, 1 << 14, symbols=["BTCUSDT"]) as w:
        proc = _start_probe("--ring", shm_name, "--seconds", "3", "--json", str(out_json),
                            "--refresh", "0", "--plot", str(out_png))
        try:
            _wait_registered(shm_name, proc, "latency-probe")
            published = {"agg_trade": 0, "book_ticker": 0, "trade": 0}
            for i in range(20):  # paced batches, stamped "now" so the IPC stage is real
                now = time.time_ns()
                batch = np.concatenate([
                    records(Kind.AGG_TRADE, 30, ev=now - 2_000_000, recv_after_us=1900,
                            publish_after_us=25, first_id=1 + 30 * i),
                    records(Kind.BOOK_TICKER, 20, ev=now - 2_000_000, recv_after_us=1900,
                            publish_after_us=25),
                    records(Kind.TRADE, 10, ev=now - 2_000_000, recv_after_us=1900,
                            publish_after_us=25),
                    records(Kind.AGG_TRADE, 1, ev=now - 9_000_000_000, recv_after_us=1900,
                            publish_after_us=25, flags=int(Flags.BACKFILLED)),
                ])
                w.publish_many(batch)
                published["agg_trade"] += 30
                published["book_ticker"] += 20
                published["trade"] += 10
                time.sleep(0.005)
        finally:
            code, out, err = _finish(proc)
    assert code == 0, err
    assert "final:" in out
    res = json.loads(out_json.read_text())
    assert res["missed"] == 0
    assert res["records_by_kind"] == published
    assert res["excluded_backfill_snapshot"] == 20
    assert res["records"] == sum(published.values()) + 20
    assert res["clock_offset_ms"] is None
    assert res["clock_offset_assumed_ms"] == 0.0
    agg = res["latency_us"]["agg_trade"]
    assert agg["recv->publish"]["p50"] == pytest.approx(25.0)
    assert agg["exchange->recv"]["max"] == pytest.approx(1900.0)
    assert agg["publish->seen"]["count"] == 600
    assert agg["publish->seen"]["p50"] >= 0.0
    assert agg["end-to-end"]["p50"] >= 1925.0
    if importlib.util.find_spec("matplotlib") is not None:
        assert res["plot"] == str(out_png)
        assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_probe_measures_each_idle_policy_in_turn(shm_name: str, tmp_path: Path) -> None:
    """``--idle a,b`` reads the ring as one reader per policy, one after the other, and reports
    publish->seen per policy besides the combined figures."""
    out_json = tmp_path / "out.json"
    with RingWriter.create(shm_name, TICK_DTYPE, 1 << 14, symbols=["BTCUSDT"]) as w:
        proc = _start_probe("--ring", shm_name, "--seconds", "1.5", "--json", str(out_json),
                            "--refresh", "0", "--idle", "balanced,low-cpu")
        try:
            _wait_registered(shm_name, proc, "latency-probe")
            first = 1
            while proc.poll() is None:  # until both phases are over
                now = time.time_ns()
                w.publish_many(records(Kind.AGG_TRADE, 5, ev=now - 1_000_000, recv_after_us=900,
                                       publish_after_us=10, first_id=first))
                first += 5
                time.sleep(0.01)
        finally:
            code, out, err = _finish(proc)
    assert code == 0, err
    assert "idle balanced:" in out
    assert "idle low-cpu:" in out
    res = json.loads(out_json.read_text())
    assert list(res["by_idle"]) == ["balanced", "low-cpu"]
    phases = res["by_idle"].values()
    assert all(ph["records"] > 0 for ph in phases)
    assert sum(ph["records"] for ph in phases) == res["records"]
    assert all(ph["latency_us"]["agg_trade"]["recv->publish"]["p50"] == pytest.approx(10.0)
               for ph in phases)


def test_probe_refuses_an_unknown_idle_policy(shm_name: str) -> None:
    with RingWriter.create(shm_name, TICK_DTYPE, 64, symbols=["BTCUSDT"]):
        code, _, err = _finish(_start_probe("--ring", shm_name, "--idle", "sleepy"))
    assert code == 1
    assert "--idle takes a comma list of low-latency, balanced, low-cpu, spin" in err


def test_probe_missing_ring_is_a_clear_error(shm_name: str) -> None:
    code, _out, err = _finish(_start_probe("--ring", shm_name + "_none", "--seconds", "1"))
    assert code == 1
    assert "not found" in err


@pytest.mark.slow
def test_orders_refused_when_trading_is_not_on_loopback(shm_name: str) -> None:
    """The execution ring's writer is this pytest process, whose command line names no loopback
    WS API URL: the probe must refuse before creating an order ring or sending anything."""
    from pipeline.trading.wire import EXEC_DTYPE

    with RingWriter.create(shm_name, TICK_DTYPE, 1 << 10, symbols=["BTCUSDT"]), \
            RingWriter.create(shm_name + ".exec", EXEC_DTYPE, 1 << 10):
        code, _out, err = _finish(_start_probe(
            "--ring", shm_name, "--seconds", "0.2", "--refresh", "0", "--orders", "1",
            "--exec-ring", shm_name + ".exec", "--order-price", "100", "--order-qty", "1",
            "--trading-metrics", shm_name + ".nometrics",
        ))
        assert not any(r["name"].startswith("oc.") for r in ring_stats(shm_name + ".exec")
                       ["readers"])
    assert code != 0
    assert "refusing to send orders" in err
    assert "--live-i-know" in err


@pytest.mark.slow
def test_orders_through_trading_process_against_simulator(shm_name: str, tmp_path: Path) -> None:
    """sim (loopback) <- `pipeline trade` <- probe --orders 3: acks and execution reports come
    back, the ack splits into our time + wire time, and every order is cancelled again."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from pipeline.sim.testing import run_sim_process

    key = ed25519.Ed25519PrivateKey.generate()
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(priv, 0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    exec_ring, out_json = f"{shm_name}.exec", tmp_path / "o.json"
    with run_sim_process("--symbols", "BTCUSDT", "--rate", "5", "--api-key", f"k={pub}") as sim, \
            RingWriter.create(shm_name, TICK_DTYPE, 1 << 10, symbols=["BTCUSDT"]):
        trade = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "--log-level", "WARNING", "trade",
             "--wsapi-url", sim.wsapi_url, "--api-key", "k", "--private-key", str(priv),
             "--exec-ring", exec_ring, "--metrics", f"{shm_name}.tm"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            code, out, err = _finish(_start_probe(
                "--ring", shm_name, "--seconds", "0.2", "--refresh", "0", "--orders", "3",
                "--exec-ring", exec_ring, "--attach-wait", "5", "--order-price", "50000",
                "--order-interval", "0", "--rest-url", sim.rest_url, "--json", str(out_json),
                "--order-symbol", "BTCUSDT", "--trading-metrics", f"{shm_name}.tm",
            ))
        finally:
            trade.terminate()
            try:
                trade.wait(10)
            except subprocess.TimeoutExpired:
                trade.kill()
                trade.wait()
            assert trade.stderr is not None
            trade.stderr.close()
        assert code == 0, err
        assert "loopback" in err
    res = json.loads(out_json.read_text())["orders"]
    assert res["sent"] == 3
    assert res["acked"] == 3, res["errors"]
    assert res["exec_reports"] == 3
    lat = res["latency_us"]
    assert lat["submit->ack"]["count"] == 3
    assert lat["ack: wire"]["count"] == 3
    assert lat["ack: ours"]["p50"] >= 0
    assert lat["submit->cancel"]["count"] == 3
    assert "orders:" in out


def test_last_price_prefers_latest_bid_then_trade_price() -> None:
    a = records(Kind.AGG_TRADE, 2, ev=1, recv_after_us=1, publish_after_us=1, symbol=1)
    a["price"] = [10.0, 11.0]
    b = records(Kind.BOOK_TICKER, 1, ev=1, recv_after_us=1, publish_after_us=1, symbol=1)
    other = records(Kind.AGG_TRADE, 1, ev=1, recv_after_us=1, publish_after_us=1, symbol=0)
    assert lp.last_price(np.concatenate([a, other]), 1) == 11.0
    assert lp.last_price(np.concatenate([a, b, other]), 1) == 99.5
    assert lp.last_price(other, 1) == 0.0


def test_wait_trading_ready_names_the_missing_ring(shm_name: str) -> None:
    with pytest.raises(RuntimeError, match="not found"):
        lp.wait_trading_ready(shm_name + ".exec", shm_name + ".m", 0.0)


def test_probe_refreshing_table_without_tty(shm_name: str) -> None:
    with RingWriter.create(shm_name, TICK_DTYPE, 1 << 10, symbols=["BTCUSDT"]):
        code, out, err = _finish(_start_probe("--ring", shm_name, "--seconds", "1",
                                              "--refresh", "0.25"))
    assert code == 0, err
    assert "\x1b[" not in out  # no screen control codes into a pipe
    assert out.count("records,") >= 2  # refreshed tables before the final one
    assert "final: 0 records" in out
