"""`pipeline run` end to end: real processes, the simulator, the ring, and nothing left behind."""

from __future__ import annotations

import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from pipeline.config import load_config
from pipeline.ops.runner import (
    API_KEY_ENV,
    RunContext,
    available_subcommands,
    cleanup_segments,
    plan_components,
)
from pipeline.settings import ConfigError

PRICE_LINE = re.compile(r"^[A-Z0-9]+ \| \d+\.\d+ \| vol \d+\.\d{4}$")
AVAILABLE = available_subcommands()


# ---------------------------------------------------------------------------------------------
# pure planning


def test_plan_tolerates_missing_components() -> None:
    cfg = load_config(env={})
    ctx = RunContext(api_key_file="/keys/api_key", private_key="/k.pem", public_key="/k.pub")
    comps, notes = plan_components(cfg, ctx, {"consume"})
    assert [c.name for c in comps] == ["monitor"]
    assert any("simulator: not available" in n for n in notes)
    assert any("ingest and trading need the simulator" in n for n in notes)
    comps, notes = plan_components(cfg, ctx, {"sim", "ingest", "trade", "consume"})
    assert [c.name for c in comps] == ["sim", "ingest", "trading", "monitor"]
    assert notes == []
    ctx.sim_urls.update(streams="ws://127.0.0.1:9", rest="http://127.0.0.1:9", wsapi="ws://x/ws")
    by = {c.name: c for c in comps}
    ingest = by["ingest"].argv()
    assert ingest[ingest.index("--streams-url") + 1] == "ws://127.0.0.1:9"
    assert ingest[ingest.index("--ring") + 1] == cfg.ring.name
    assert by["ingest"].depends_on == ("sim",)
    trade = by["trading"].argv()
    assert trade[trade.index("--private-key") + 1] == "/k.pem"
    assert trade[trade.index("--api-key-file") + 1] == "/keys/api_key"
    sim = by["sim"].argv()
    assert sim[sim.index("--api-key-file") + 1] == "/keys/api_key=/k.pub"
    for c in comps:
        assert "--api-key" not in c.argv(), c.name
        assert c.env is None, c.name  # the key travels as a file path


def test_plan_inline_api_key_goes_by_environment_never_argv() -> None:
    """An inline trading.api_key (live/testnet) reaches only the trading child, in its env."""
    cfg = load_config(env={})
    ctx = RunContext(api_key="SeCrEt-inline", private_key="/k.pem", public_key="/k.pub")
    ctx.sim_urls.update(streams="ws://127.0.0.1:9", rest="http://127.0.0.1:9", wsapi="ws://x/ws")
    comps, _ = plan_components(cfg, ctx, {"sim", "ingest", "trade", "consume"})
    by = {c.name: c for c in comps}
    for c in comps:
        assert not any("SeCrEt-inline" in a for a in c.argv()), c.name
    trade = by["trading"].argv()
    assert trade[trade.index("--api-key-env") + 1] == API_KEY_ENV
    assert by["trading"].env == {API_KEY_ENV: "SeCrEt-inline"}
    sim = by["sim"].argv()
    assert sim[sim.index("--api-key-env") + 1] == f"{API_KEY_ENV}=/k.pub"
    assert by["ingest"].env is None
    assert by["monitor"].env is None


def test_plan_sim_mode_sbe_streams_use_the_simulators_port_and_registered_key() -> None:
    """SBE in sim mode needs no key in the config: ingest is pointed at the simulator's SBE
    port with the API key `pipeline run` registered with it (a file path, never the key)."""
    cfg = load_config(env={"PIPELINE_INGEST_STREAMS": "aggTrade",
                           "PIPELINE_INGEST_SBE_STREAMS": "trade,depth"})  # fmt: skip
    ctx = RunContext(api_key_file="/keys/api_key", private_key="/k.pem", public_key="/k.pub")
    ctx.sim_urls.update(streams="ws://127.0.0.1:9", rest="http://127.0.0.1:9",
                        wsapi="ws://x/ws", sbe="ws://127.0.0.1:10")  # fmt: skip
    comps, _ = plan_components(cfg, ctx, {"sim", "ingest", "trade", "consume"})
    ingest = {c.name: c for c in comps}["ingest"].argv()
    assert ingest[ingest.index("--sbe-url") + 1] == "ws://127.0.0.1:10"
    assert ingest[ingest.index("--sbe-api-key-file") + 1] == "/keys/api_key"
    # a key the config names wins; outside sim mode one is required
    named = load_config(env={"PIPELINE_INGEST_STREAMS": "aggTrade",
                             "PIPELINE_INGEST_SBE_STREAMS": "trade",
                             "PIPELINE_INGEST_SBE_API_KEY_ENV": "MY_SBE_KEY"})  # fmt: skip
    comps, _ = plan_components(named, ctx, {"sim", "ingest", "trade", "consume"})
    ingest = {c.name: c for c in comps}["ingest"].argv()
    assert ingest[ingest.index("--sbe-api-key-env") + 1] == "MY_SBE_KEY"
    assert "--sbe-api-key-file" not in ingest
    with pytest.raises(ConfigError, match="sbe_api_key_env"):
        load_config(env={"PIPELINE_RUN_MODE": "testnet", "PIPELINE_TRADING_ENABLED": "false",
                         "PIPELINE_INGEST_SBE_STREAMS": "trade"})  # fmt: skip


def test_plan_live_mode_uses_config_endpoints_and_no_simulator(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("x")
    cfg = load_config(
        env={
            "PIPELINE_RUN_MODE": "testnet",
            "PIPELINE_TRADING_API_KEY": "abc",
            "PIPELINE_TRADING_PRIVATE_KEY": str(key),
        }
    )
    ctx = RunContext(api_key="abc", private_key=str(key))
    comps, _ = plan_components(cfg, ctx, {"sim", "ingest", "trade", "consume"})
    assert [c.name for c in comps] == ["ingest", "trading", "monitor"]
    assert "abc" not in comps[1].argv()
    argv = comps[0].argv()
    assert argv[argv.index("--streams-url") + 1] == "wss://stream.testnet.binance.vision"


def test_cleanup_removes_only_segments_of_dead_owners(shm_name: str) -> None:
    code = (
        "import sys,os,signal; from pipeline.ipc.segments import RingWriter;"
        " from pipeline.ipc.records import TICK_DTYPE;"
        " w=RingWriter.create(sys.argv[1], TICK_DTYPE, 1024, ['A']);"
        " os.kill(os.getpid(), signal.SIGKILL)"
    )
    dead = f"{shm_name}_dead"
    subprocess.run([sys.executable, "-c", code, dead], check=False, timeout=60)
    assert Path(f"/dev/shm/{dead}").exists()
    from pipeline.ipc.records import TICK_DTYPE
    from pipeline.ipc.segments import RingWriter

    live = RingWriter.create(f"{shm_name}_live", TICK_DTYPE, 1024, ["A"])
    try:
        removed = cleanup_segments([dead, f"{shm_name}_live"], prefix=f"{shm_name}_")
        assert removed == [dead]
        assert Path(f"/dev/shm/{shm_name}_live").exists()
    finally:
        live.close()


# ---------------------------------------------------------------------------------------------
# the real thing


class Run:
    """`pipeline run` as a subprocess with its stdout collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], stderr: Path) -> None:
        with stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "--log-format", "json", "run", *args],
                stdout=subprocess.PIPE, stderr=err, env=env, text=True,
            )  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self.stderr = stderr
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, pred: Callable[[str], bool], timeout: float, after: int = 0) -> int:
        """Index of the first line (from ``after``) matching ``pred``."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(after, len(self.lines)):
                if pred(self.lines[i][1]):
                    return i
            if time.monotonic() > deadline or (self.proc.poll() is not None and not self._more()):
                raise AssertionError(
                    f"no matching line; stdout:\n{self.text()[-4000:]}\n"
                    f"stderr tail:\n{self.stderr.read_text()[-3000:]}"
                )
            time.sleep(0.05)

    def _more(self) -> bool:
        self._reader.join(0.2)
        return self._reader.is_alive()

    def finish(self, timeout: float = 60) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)
            assert self.proc.stdout is not None
            self.proc.stdout.close()
        return rc


@pytest.fixture
def run_env(shm_name: str, tmp_path: Path) -> Iterator[SimpleNamespace]:
    """Env isolating one `pipeline run` (own ring and metrics names), and a leak check after."""
    ring = f"{shm_name}.ticks"
    prefix = f"{shm_name}."
    env = {
        **os.environ,
        "PIPELINE_RING_NAME": ring,
        "PIPELINE_RING_CAPACITY": "65536",
        "PIPELINE_RING_EXEC_NAME": f"{shm_name}.exec",
        "PIPELINE_RISK_LIMITS_NAME": f"{shm_name}.limits",
        "PIPELINE_RUN_SHM_PREFIX": prefix,
        "PIPELINE_MONITOR_STATUS_INTERVAL_S": "1",
        "PIPELINE_SUPERVISOR_STOP_TIMEOUT_S": "5",
        "PIPELINE_PERSIST_SQLITE_PATH": str(tmp_path / "ticks.sqlite"),
    }
    ns = SimpleNamespace(env=env, ring=ring, prefix=prefix, db=tmp_path / "ticks.sqlite",
                         stderr=tmp_path / "stderr.log")  # fmt: skip
    yield ns
    leftovers = [n for n in os.listdir("/dev/shm") if n.startswith(shm_name)]
    assert leftovers == [], f"shared memory left behind: {leftovers}"
    stray = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if ring in cmd and "pipeline" in cmd:
            stray.append((p.pid, cmd))
    assert stray == [], f"processes left behind: {stray}"


needs_pipeline = pytest.mark.skipif(
    not {"sim", "ingest", "consume"} <= AVAILABLE,
    reason=f"simulator/ingest/consume subcommands not all present (have {sorted(AVAILABLE)})",
)


@pytest.mark.slow
@needs_pipeline
def test_run_shows_ticks_and_leaves_nothing_behind(run_env: SimpleNamespace) -> None:
    run_env.env["PIPELINE_RUN_CONSUMERS"] = "monitor,persist"
    run = Run(["--duration", "8", "--status-interval", "1"], run_env.env, run_env.stderr)
    rc = run.finish(timeout=60)
    out = run.text()
    assert rc == 0, f"{out[-3000:]}\n{run_env.stderr.read_text()[-3000:]}"
    price_lines = [line for _, line in run.lines if PRICE_LINE.match(line)]
    assert len(price_lines) >= 3, f"{out[-3000:]}\n{run_env.stderr.read_text()[-5000:]}"
    assert any(line.startswith("monitor | ") for _, line in run.lines), out[-3000:]
    if "trade" in AVAILABLE:
        assert re.search(r"\btrading READY\b", out), out[-3000:]
    assert "stopping (duration reached)" in out
    # persisted aggregate trades: per symbol a contiguous run of ids, none twice
    with sqlite3.connect(run_env.db) as c:
        rows = c.execute(
            "SELECT symbol, count(*), count(DISTINCT trade_id), min(trade_id), max(trade_id)"
            " FROM market_ticks WHERE kind = 1 GROUP BY symbol"
        ).fetchall()
    assert rows, "persist stored no aggregate trades"
    for symbol, n, distinct, lo, hi in rows:
        assert n == distinct == hi - lo + 1, (symbol, n, distinct, lo, hi)


@pytest.mark.slow
@needs_pipeline
def test_killed_ingest_is_restarted_and_consumers_carry_on(run_env: SimpleNamespace) -> None:
    run_env.env["PIPELINE_RUN_CONSUMERS"] = "monitor"
    run_env.env["PIPELINE_TRADING_ENABLED"] = "false"  # keep the test to the data path
    # SBE trades beside JSON: sim mode supplies the simulator's SBE port and a registered key
    # even with trading off (its shard connects, or ingest would exit 2 on the 401)
    run_env.env["PIPELINE_INGEST_SBE_STREAMS"] = "trade"
    run = Run(["--duration", "14", "--status-interval", "1"], run_env.env, run_env.stderr)
    try:
        first = run.wait_for(lambda s: bool(PRICE_LINE.match(s)), timeout=20)
        me = psutil.Process(run.proc.pid)
        ingest = [
            p for p in me.children()
            if " ingest " in " ".join(p.cmdline()) and run_env.ring in " ".join(p.cmdline())
        ]  # fmt: skip
        assert len(ingest) == 1
        ingest[0].send_signal(signal.SIGKILL)
        crashed = run.wait_for(lambda s: "ingest crashed" in s, timeout=10, after=first)
        assert "killed by SIGKILL" in run.lines[crashed][1]
        restarted = run.wait_for(lambda s: "ingest restarted" in s, timeout=15, after=crashed)
        # the same monitor process keeps printing prices from the new ingest's ring ...
        run.wait_for(lambda s: bool(PRICE_LINE.match(s)), timeout=15, after=restarted)
        # ... and its status line says it followed a writer restart
        run.wait_for(
            lambda s: s.startswith("monitor | ") and "resyncs 1" in s and "gen " in s,
            timeout=15, after=restarted,
        )  # fmt: skip
        # a status line of the runner counts the restart
        run.wait_for(lambda s: "ingest running (restarts 1)" in s, timeout=10, after=restarted)
    finally:
        run.proc.send_signal(signal.SIGTERM)
        rc = run.finish(timeout=60)
    assert rc == 0
    assert "stopping (SIGTERM)" in run.text()
    monitors = [line for _, line in run.lines if "monitor exited 0" in line]
    assert monitors, run.text()[-2000:]
    sbe_shard = re.compile(r'"msg":"connected".*"shard":1\b')
    connects = [line for line in run_env.stderr.read_text().splitlines() if sbe_shard.search(line)]
    assert len(connects) >= 2, "the SBE shard connected before and after the restart"


@pytest.mark.slow
@needs_pipeline
@pytest.mark.skipif("trade" not in AVAILABLE, reason="no `pipeline trade` in this build")
def test_run_puts_the_api_key_in_no_command_line(run_env: SimpleNamespace) -> None:
    """Issue #11: the runner passed the key as `--api-key` to the simulator and the trader,
    so every local user could read it with ps. Now no process in the tree has it in argv, and
    trading still logs on with it (READY), so the key did travel."""
    api_key = f"SeCrEt{secrets.token_hex(12)}"
    run_env.env["PIPELINE_TRADING_API_KEY"] = api_key  # inline config key: the harder case
    run_env.env["PIPELINE_RUN_CONSUMERS"] = "monitor"
    run = Run(["--duration", "60", "--status-interval", "1"], run_env.env, run_env.stderr)
    try:
        run.wait_for(lambda s: bool(re.search(r"\btrading READY\b", s)), timeout=40)
        tree = [psutil.Process(run.proc.pid), *psutil.Process(run.proc.pid).children(True)]
        argvs = {p.pid: p.cmdline() for p in tree}
        assert len(argvs) >= 4, argvs  # runner, sim, ingest, trading, monitor
        leaks = {pid: a for pid, a in argvs.items() if any(api_key in x for x in a)}
        assert leaks == {}, leaks
        trade = next(a for a in argvs.values() if "trade" in a)
        assert "--api-key-file" in trade
        assert "--api-key" not in trade
        sim = next(a for a in argvs.values() if "sim" in a)
        assert "--api-key-file" in sim
        key_file = Path(trade[trade.index("--api-key-file") + 1])
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert key_file.read_text().strip() == api_key
    finally:
        run.proc.send_signal(signal.SIGTERM)
        rc = run.finish(timeout=60)
    assert rc == 0
    assert not key_file.exists()  # the key directory went with the run
    assert api_key not in run.text()
    assert api_key not in run_env.stderr.read_text()


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[ingest]\nsymbols = ['BTCUSDT', 'no pe']\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--config", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "ingest.symbols[1]" in proc.stderr


def test_plan_gates_trading_on_risk_limits_only_when_risk_runs() -> None:
    ctx = RunContext(api_key_file="/k", private_key="/k.pem", public_key="/k.pub")
    ctx.sim_urls.update(streams="ws://127.0.0.1:9", rest="http://127.0.0.1:9", wsapi="ws://x/ws")
    have = {"sim", "ingest", "trade", "consume"}
    plain = load_config(env={})
    comps, _ = plan_components(plain, ctx, have)
    assert "--risk-limits" not in {c.name: c for c in comps}["trading"].argv()
    with_risk = load_config(env={"PIPELINE_RUN_CONSUMERS": "monitor,risk"})
    comps, _ = plan_components(with_risk, ctx, have)
    trade = {c.name: c for c in comps}["trading"].argv()
    assert trade[trade.index("--risk-limits") + 1] == with_risk.risk.limits_name


def test_plan_children_parse_back_to_the_configured_processes(tmp_path: Path) -> None:
    """The runner writes ingest's and the simulator's argv from their config types, so the
    child's own parser rebuilds exactly the configured process (one config type per process)."""
    import dataclasses

    from pipeline.cli import build_parser
    from pipeline.marketdata.cli import config_from_args
    from pipeline.sim.cli import build_config

    toml = tmp_path / "c.toml"
    toml.write_text(
        "[run]\nshm_prefix = 'other.'\n[ring]\nname = 'other.ticks'\ncapacity = 4096\n"
        "[sim]\nsymbols = ['ETHUSDT', 'XRPUSDT']\nrate = 0\nseed = 9\nmax_streams = 50\n"
        "[ingest]\nsymbols = ['XRPUSDT']\nstreams = ['trade']\npublish_batch = 8\n"
        "decoder = 'orjson'\ntime_unit = 'MICROSECOND'\n"
    )
    cfg = load_config(toml, env={})
    ctx = RunContext()  # no key material: the simulator child would read key files
    ctx.sim_urls.update(streams="ws://127.0.0.1:9", rest="http://127.0.0.1:9", wsapi="ws://x/ws")
    comps, _ = plan_components(cfg, ctx, {"sim", "ingest", "consume"})
    by = {c.name: c for c in comps}
    parser = build_parser()

    def child_args(name: str, command: str) -> list[str]:
        argv = by[name].argv()
        return argv[argv.index(command) :]

    ingest = config_from_args(parser.parse_args(child_args("ingest", "ingest")))
    assert ingest == dataclasses.replace(
        cfg.ingest, streams_url="ws://127.0.0.1:9", rest_url="http://127.0.0.1:9"
    )
    assert ingest.ring == "other.ticks"
    assert ingest.metrics == "other.ingest.metrics"
    sim = build_config(parser.parse_args(child_args("sim", "sim")))
    assert sim == cfg.sim
    assert sim.seed == 9
    assert sim.max_streams == 50


def test_plan_trading_child_parses_back_to_the_configured_process(tmp_path: Path) -> None:
    """The runner writes trading's argv from its config type (pipeline.trading.config): the
    child's own parser rebuilds the configured process, with the run-time URL and key path, the
    shared ring/metrics names and the risk gate; the inline API key is in no argv."""
    import dataclasses

    from pipeline.cli import build_parser
    from pipeline.trading.cli import config_from_args

    toml = tmp_path / "c.toml"
    toml.write_text(
        "[run]\nshm_prefix = 'other.'\nconsumers = ['monitor', 'risk']\n"
        "[ring]\nexec_name = 'other.trading.exec'\n"
        "[trading]\napi_key = 'inlinekey123'\nextra_args = ['--unknown-stale', '5']\n"
    )
    cfg = load_config(toml, env={})
    ctx = RunContext(api_key="inlinekey123", private_key="/keys/k.pem")
    ctx.sim_urls.update(streams="ws://127.0.0.1:9", rest="http://127.0.0.1:9", wsapi="ws://x/ws")
    comps, _ = plan_components(cfg, ctx, {"sim", "ingest", "trade", "consume"})
    argv = {c.name: c for c in comps}["trading"].argv()
    assert not any("inlinekey123" in a for a in argv)
    child = argv[argv.index("trade") :]
    got = config_from_args(build_parser().parse_args(child))
    want = dataclasses.replace(
        cfg.trading, url="ws://x/ws", private_key="/keys/k.pem",
        risk_limits=cfg.risk.limits_name,
        session=dataclasses.replace(cfg.trading.session, unknown_stale_s=5.0),
    )  # fmt: skip
    launch_level = {"api_key": "", "extra_args": []}  # read by the runner, not the child
    assert got == dataclasses.replace(want, **launch_level)
    assert (got.exec_ring, got.metrics_name) == ("other.trading.exec", "other.trading.metrics")
