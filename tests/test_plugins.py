"""Plug-in consumers: a package of its own (tests/plugin_example) registers a consumer under the
``pipeline.consumers`` entry points, and ``pipeline consume NAME``, ``pipeline run``'s plan and
the ``pipeline-consumer@NAME`` unit's command line all start it; broken plug-ins are one clear
line naming them.

The example is really installed (``pip install --target``: built by its own pyproject, with its
dist-info and entry points) into a temp directory that the child processes get on PYTHONPATH,
which is how ``importlib.metadata`` finds any installed distribution; this environment's own
site-packages is left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.consumers.registry import (
    BUILTINS,
    ConsumerNames,
    ConsumerPluginError,
    check_consumer,
    load_factory,
)
from pipeline.ipc.records import TICK_DTYPE, Kind
from pipeline.ipc.segments import RingWriter

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "tests" / "plugin_example"
SYMBOLS = ["BTCUSDT", "ETHUSDT"]

# Broken plug-ins, registered the way any package registers one: a dist-info with entry points.
BROKEN_ENTRY_POINTS = """\
[pipeline.consumers]
broken-import = no_such_module_for_pipeline_tests:from_args
not-callable = pipeline_tick_counter:NOT_A_FACTORY
not-a-consumer = pipeline_tick_counter:not_a_consumer
persist = pipeline_tick_counter:from_args
"""


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("plugin_site")
    build = tmp_path_factory.mktemp("plugin_src")
    src = build / "plugin_example"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--target", str(site), str(src)],
        check=True,
    )  # fmt: skip
    broken = site / "pipeline_broken_plugins-0.0.1.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: pipeline-broken-plugins\nVersion: 0.0.1\n"
    )
    (broken / "entry_points.txt").write_text(BROKEN_ENTRY_POINTS)
    return site


def plugin_env(site: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(site), "PIPELINE_LOG_FORMAT": "json", **extra}


def publish(w: RingWriter, n_per_symbol: int) -> None:
    out = np.zeros(2 * n_per_symbol, dtype=TICK_DTYPE)
    for i in range(len(out)):
        out[i]["kind"] = int(Kind.AGG_TRADE) if i % 2 else int(Kind.BOOK_TICKER)
        out[i]["symbol"] = i % 2
        out[i]["trade_id"] = i + 1
        out[i]["price"] = 100.0 + i
    w.publish_many(out)


def consume(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_the_installed_plugin_runs_against_a_real_ring(
    plugin_site: Path, shm_name: str, tmp_path: Path
) -> None:
    out = tmp_path / "counts.json"
    w = RingWriter.create(shm_name, TICK_DTYPE, 1024, SYMBOLS)
    try:
        publish(w, 50)
        done = consume(
            [sys.executable, "-m", "pipeline", "consume", "tick-counter", "--ring", shm_name,
             "--start", "oldest", "--duration", "1"],
            plugin_env(plugin_site, TICK_COUNTER_OUT=str(out)), tmp_path,
        )  # fmt: skip
    finally:
        w.close()
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["records"] == 100
    assert report["missed"] == 0
    assert report["by_symbol_kind"] == {
        f"BTCUSDT/{int(Kind.BOOK_TICKER)}": 50,
        f"ETHUSDT/{int(Kind.AGG_TRADE)}": 50,
    }
    assert '"event":"consumer_start"' in done.stderr.replace(" ", "")


@pytest.mark.slow
def test_run_and_the_systemd_unit_start_the_plugin(
    plugin_site: Path, shm_name: str, tmp_path: Path
) -> None:
    """``run.consumers`` accepts the plug-in's name and the runner plans `pipeline consume NAME`
    for it; the unit's ExecStart with %i = the name parses to the same consumer. Then the argv the
    runner planned is started against a real ring."""
    toml = tmp_path / "pipeline.toml"
    toml.write_text(
        f"[run]\nconsumers = ['monitor', 'tick-counter']\n[ring]\nname = '{shm_name}'\n"
    )
    unit = (ROOT / "systemd" / "pipeline-consumer@.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*?)(?<!\\)$", unit, re.M | re.S)
    assert exec_start is not None
    unit_argv = exec_start.group(1).replace("\\\n", " ").replace("%i", "tick-counter").split()
    probe = f"""
import json, sys
from pipeline.cli import build_parser
from pipeline.config import load_config
from pipeline.ops.runner import RunContext, plan_components
cfg = load_config({str(toml)!r}, env={{}})
comps, _ = plan_components(cfg, RunContext(), {{"consume"}})
by = {{c.name: c for c in comps}}
unit = build_parser().parse_args({unit_argv[1:]!r})
print(json.dumps({{"consumers": list(cfg.run.consumers), "argv": by["tick-counter"].argv(),
                  "unit_command": unit.command, "unit_name": unit.name}}))
"""
    env = plugin_env(plugin_site, TICK_COUNTER_OUT=str(tmp_path / "counts.json"))
    planned = consume([sys.executable, "-c", probe], env, tmp_path)
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["consumers"] == ["monitor", "tick-counter"]
    assert plan["unit_command"] == "consume"
    assert plan["unit_name"] == "tick-counter"
    argv = plan["argv"]
    assert argv[argv.index("consume") + 1] == "tick-counter"
    w = RingWriter.create(shm_name, TICK_DTYPE, 1024, SYMBOLS)
    try:
        publish(w, 10)
        done = consume([*argv, "--start", "oldest", "--duration", "1"], env, tmp_path)
    finally:
        w.close()
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "counts.json").read_text())["records"] == 20


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("broken-import", "failed to import: ModuleNotFoundError"),
        ("not-callable", "is a int, not a factory"),
        ("not-a-consumer", "returned a object without on_batch, on_tick, close"),
    ],
)
def test_a_broken_plugin_is_one_line_naming_it(
    plugin_site: Path, shm_name: str, tmp_path: Path, name: str, says: str
) -> None:
    done = consume(
        [sys.executable, "-m", "pipeline", "consume", name, "--ring", shm_name,
         "--attach-timeout", "0.1"],
        plugin_env(plugin_site), tmp_path,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"consumer plug-in '{name}'" in done.stderr
    assert says in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_plugin_cannot_take_a_builtin_name_and_unknown_names_are_usage_errors(
    plugin_site: Path, tmp_path: Path
) -> None:
    probe = (
        "import json; from pipeline.consumers.registry import available;"
        "print(json.dumps(available()))"
    )
    done = consume([sys.executable, "-c", probe], plugin_env(plugin_site), tmp_path)
    assert done.returncode == 0, done.stderr
    names = json.loads(done.stdout)
    assert names["persist"] == BUILTINS["persist"]  # the plug-in claiming "persist" is ignored
    assert names["tick-counter"] == "pipeline_tick_counter:from_args"
    assert "belongs to a built-in consumer" in done.stderr
    usage = consume(
        [sys.executable, "-m", "pipeline", "consume", "no-such-consumer"],
        plugin_env(plugin_site), tmp_path,
    )  # fmt: skip
    assert usage.returncode == 2
    assert "invalid choice: 'no-such-consumer'" in usage.stderr
    assert "tick-counter" in usage.stderr  # the message lists what is installed


def test_builtins_resolve_in_process_and_checks_name_the_consumer() -> None:
    assert {"monitor", "persist", "risk"} <= set(ConsumerNames())
    assert "monitor" in ConsumerNames()
    from pipeline.consumers.persist import from_args

    assert load_factory("persist") is from_args
    with pytest.raises(ConsumerPluginError, match="unknown consumer 'nope'"):
        load_factory("nope")
    with pytest.raises(ConsumerPluginError, match="'x' returned a int without on_batch"):
        check_consumer("x", 3)
