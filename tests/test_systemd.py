"""systemd units (verified by systemd-analyze, command lines parsed by our CLI) and sd_notify."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cli import build_parser
from pipeline.ops import sdnotify

UNITS = Path(__file__).resolve().parents[1] / "systemd"
BINARY = "/opt/pipeline/.venv/bin/pipeline"
CONSUMER_INSTANCES = ("monitor", "persist", "risk")
#: instances each template unit is started as (`pipeline-bridge@publish`, ...)
TEMPLATE_INSTANCES = {
    "pipeline-consumer@.service": CONSUMER_INSTANCES,
    "pipeline-bridge@.service": ("publish", "mirror"),
}


def unit_files() -> list[Path]:
    return sorted(p for p in UNITS.iterdir() if p.suffix in (".service", ".target"))


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) with backslash continuations joined and comments dropped."""
    out: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def test_expected_units_exist() -> None:
    names = {p.name for p in unit_files()}
    assert {
        "pipeline.target",
        "pipeline-ingest.service",
        "pipeline-trading.service",
        "pipeline-consumer@.service",
    } <= names


@pytest.mark.parametrize("path", [p for p in unit_files() if p.suffix == ".service"], ids=str)
def test_service_units_have_the_required_settings(path: Path) -> None:
    d = {(s, k): v for s, k, v in directives(path)}
    keys = {k for _, k, _ in directives(path)}
    assert d[("Service", "Type")] == "notify"
    assert d[("Service", "Restart")] == "on-failure"
    assert "WatchdogSec" in keys
    assert "CPUAffinity" in keys
    assert "StartLimitIntervalSec" in keys
    assert "StartLimitBurst" in keys
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert hardening in keys, hardening
    assert d[("Service", "ProtectSystem")] == "strict"
    # what would stop the units from sharing /dev/shm
    for forbidden in ("PrivateIPC", "PrivateDevices", "DynamicUser"):
        assert d.get(("Service", forbidden), "no") in ("no", "false"), forbidden
    assert d[("Service", "RemoveIPC")] == "no"
    assert d[("Service", "User")] == "pipeline"
    for _, key, value in directives(path):
        if key in ("InaccessiblePaths", "TemporaryFileSystem", "ReadOnlyPaths"):
            assert "/dev/shm" not in value, (key, value)
            assert value != "/dev", (key, value)


def test_trading_keys_come_from_credentials() -> None:
    """Both the private key and the API key are systemd credentials passed as file paths:
    nothing secret in the unit, its environment or the command line (argv is world-readable)."""
    path = UNITS / "pipeline-trading.service"
    creds = dict(v.partition(":")[::2] for _, k, v in directives(path) if k == "LoadCredential")
    assert all(src.startswith("/etc/") for src in creds.values()), creds
    start = next(v for _, k, v in directives(path) if k == "ExecStart")
    argv = shlex.split(start)
    private = argv[argv.index("--private-key") + 1]
    api = argv[argv.index("--api-key-file") + 1]
    for value in (private, api):
        assert value.startswith("%d/"), value
        assert value[3:] in creds, (value, creds)
    assert "--api-key" not in argv  # the flag that would put the key in argv
    assert "API_KEY" not in start
    assert "BEGIN" not in path.read_text()  # no key material in the unit


def _expand(cmd: str, env: dict[str, str], instance: str) -> list[str]:
    cmd = cmd.replace("%i", instance).replace("%d", "/run/credentials/unit")
    cmd = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), f"<{m.group(1)}>"), cmd)
    # unbraced $VAR: systemd splits the value into words (an empty one gives none)
    cmd = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), f"<{m.group(1)}>"), cmd)
    return shlex.split(cmd)


@pytest.mark.parametrize("path", [p for p in unit_files() if p.suffix == ".service"], ids=str)
def test_exec_start_parses_with_our_cli(path: Path) -> None:
    env: dict[str, str] = {}
    for _, key, value in directives(path):
        if key == "Environment":
            k, _, v = value.partition("=")
            env[k] = v
    starts = [v for _, k, v in directives(path) if k == "ExecStart"]
    assert len(starts) == 1
    instances = TEMPLATE_INSTANCES[path.name] if "@" in path.name else ("",)
    parser = build_parser()
    for instance in instances:
        argv = _expand(starts[0], env, instance)
        assert argv[0] == BINARY
        ns = parser.parse_args(argv[1:])  # SystemExit (test error) if the CLI rejects it
        assert callable(ns.func)


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed: unit files NOT verified (apt install systemd)")
    vendor = next(
        (Path(p) for p in ("/usr/lib/systemd/system", "/lib/systemd/system") if Path(p).is_dir()),
        None,
    )
    if vendor is None:
        pytest.skip("no /usr/lib/systemd/system to resolve default dependencies against")
    # A throwaway root: the host's vendor units (sysinit.target, ...), our units, and a stub
    # at the ExecStart path, so verify checks the units and not whether we are installed here.
    root = tmp_path / "root"
    shutil.copytree(vendor, root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for p in unit_files():
        shutil.copy(p, etc / p.name)
    stub = root / BINARY.lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    names = [p.name for p in unit_files() if "@" not in p.name]
    names += [
        path.replace("@.", f"@{i}.") for path, insts in TEMPLATE_INSTANCES.items() for i in insts
    ]
    proc = subprocess.run(
        [tool, "verify", "--man=no", f"--root={root}", *names],
        cwd=etc, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    # verify exits 0 on many warnings (unknown keys, bad values): any output is a failure.
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, output
    assert output == "", output


# ---------------------------------------------------------------------------------------------
# sd_notify


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify"))
    s.settimeout(5)
    yield s
    s.close()


def test_notify_sends_one_datagram(notify_socket: socket.socket, tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify")}
    assert sdnotify.notify("READY=1", "STATUS=up\nand running", env=env)
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=up and running"
    assert sdnotify.ready("streaming", env=env)
    msg = notify_socket.recv(4096).decode().split("\n")
    assert msg[0] == "READY=1"
    assert f"MAINPID={os.getpid()}" in msg
    assert "STATUS=streaming" in msg
    assert sdnotify.stopping(env=env)
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_notify_abstract_namespace() -> None:
    name = f"pipeline-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        s.settimeout(5)
        assert sdnotify.status("hello", env={"NOTIFY_SOCKET": f"@{name}"})
        assert s.recv(4096) == b"STATUS=hello"


def test_notify_outside_systemd_is_a_quiet_no() -> None:
    assert sdnotify.notify("READY=1", env={}) is False
    assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "/nonexistent/sock"}) is False
    assert sdnotify.socket_address("vsock:2:1") is None


def test_watchdog_feeds_only_when_due_and_healthy() -> None:
    t = [100.0]
    sent: list[tuple[str, ...]] = []

    def send(*lines: str, env: object = None) -> bool:
        sent.append(lines)
        return True

    wd = sdnotify.Watchdog(
        env={"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())},
        clock=lambda: t[0], send=send,
    )  # fmt: skip
    assert wd.enabled
    assert wd.interval_s == 2.0  # half of WatchdogSec
    assert wd.tick(healthy=True, status="ok")
    assert sent == [("WATCHDOG=1", "STATUS=ok")]
    t[0] += 1.0
    assert not wd.tick()  # not due yet
    t[0] += 1.5
    assert not wd.tick(healthy=False)  # due, but unhealthy: starve it
    assert wd.starved == 1
    assert wd.tick(healthy=True)
    assert wd.sent == 2


def test_watchdog_disabled_without_env_or_for_another_pid() -> None:
    assert not sdnotify.Watchdog(env={}).enabled
    assert not sdnotify.Watchdog(env={"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).enabled
    assert not sdnotify.Watchdog(env={}).tick()


def test_segments_live_in_a_private_runtime_directory() -> None:
    """Issue #11: every unit keeps its segments in the same 0700 directory only user pipeline
    can enter (a neighbour cannot create a name there), kept while any unit still uses it."""
    dirs = set()
    for path in (p for p in unit_files() if p.suffix == ".service"):
        d = {k: v for _, k, v in directives(path)}
        env = dict(v.partition("=")[::2] for _, k, v in directives(path) if k == "Environment")
        assert d["RuntimeDirectory"] == "pipeline", path.name
        assert d["RuntimeDirectoryMode"] == "0700", path.name
        assert d["RuntimeDirectoryPreserve"] == "yes", path.name
        assert env["PIPELINE_SHM_DIR"] == "/run/" + d["RuntimeDirectory"], path.name
        dirs.add(env["PIPELINE_SHM_DIR"])
    assert len(dirs) == 1, dirs


def test_the_ingest_units_sbe_recipe_parses_with_our_cli() -> None:
    """The SBE recipe in the ingest unit's comment (STREAMS and SBE_ARGS for pipeline.env) is a
    command line our CLI accepts, with the key as a file (a credential), never a value."""
    path = UNITS / "pipeline-ingest.service"
    text = path.read_text()
    recipe = dict(m.groups() for m in re.finditer(r"^#\s+(STREAMS|SBE_ARGS)=(.*)$", text, re.M))
    assert set(recipe) == {"STREAMS", "SBE_ARGS"}, recipe
    env = dict(v.split("=", 1) for _, k, v in directives(path) if k == "Environment")
    assert env["SBE_ARGS"] == ""  # no SBE unless configured
    env.update(recipe)
    start = next(v for _, k, v in directives(path) if k == "ExecStart")
    argv = _expand(start, env, "")
    ns = build_parser().parse_args(argv[1:])
    assert "bestBidAsk" in ns.sbe_streams
    assert "--sbe-api-key-file" in argv
    assert argv[argv.index("--sbe-api-key-file") + 1].startswith("/run/credentials/")
