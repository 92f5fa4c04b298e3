"""`pipeline run`: the whole pipeline on one host, each component in its own pinned process.

With no config this is the demo `make run` shows: the local simulator, ingest (3 symbols,
aggTrade + bookTicker + depth) into the shared-memory ring, the trading session with a freshly
generated Ed25519 key (private temp dir, 0600, registered with the simulator), and the price
monitor. ``--config FILE`` (see ``examples/pipeline.toml``) switches to the testnet or live
endpoints, picks consumers, CPUs, restart policy.

What the runner does, and why it is small: it builds one :class:`~pipeline.ops.supervisor.ChildSpec`
per component (``python -m pipeline <subcommand> ...``; the simulator's, ingest's and trading's
flags are written from their config types by :func:`pipeline.settings.to_argv`, the same metadata
their parsers are built from, so no setting is translated by hand), hands them to the
:class:`~pipeline.ops.supervisor.Supervisor` (restart with backoff, dependents bounced when the
simulator comes back on new ports, ordered shutdown) and prints a status line every few seconds
from shared memory (:mod:`pipeline.ops.health`). A component whose subcommand does not exist in this
build is reported and skipped, so `make run` works at every stage of the project.

The API key never goes into a command line (every local user can read argv through ``ps``):
children get ``--api-key-file`` (``trading.api_key_file``, or in sim mode a 0600 file in the
private key directory) or, for a key given inline in the config, ``--api-key-env`` with the key
in that one child's environment (readable only by our uid and root).

Shutdown (SIGINT, SIGTERM or ``--duration``): consumers, then trading, then ingest, then the
simulator, each SIGTERM then SIGKILL after ``supervisor.stop_timeout_s``; then any ``pipeline``
shared-memory segment whose owner process is dead is unlinked, and the key directory is removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from pipeline.settings import to_argv

log = logging.getLogger("pipeline.run")

# stop_order: lower stops first (consumers, trading, ingest, simulator)
STOP_ORDER = {"consumer": 0, "bridge": 0, "trading": 1, "ingest": 2, "sim": 3}
# environment variable carrying an inline (config) API key to the children that need it
API_KEY_ENV = "PIPELINE_CHILD_API_KEY"
# subcommand each component needs
SUBCOMMANDS = {"sim": "sim", "ingest": "ingest", "trading": "trade", "consumer": "consume",
               "bridge": "bridge"}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the whole pipeline (simulator, ingest, trading, consumers) under supervision",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="TOML config (default: the embedded demo)")
    p.add_argument("--duration", type=float, default=None, help="stop after S seconds (exit 0)")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument(
        "--status-interval", type=float, default=5.0, help="seconds between status lines (0: off)"
    )
    p.set_defaults(func=main)


# ------------------------------------------------------------------------------------------------
# plan (pure: config + what exists -> child specs)


@dataclass
class RunContext:
    """Facts discovered at run time that child command lines need."""

    python: str = sys.executable
    global_args: list[str] = field(default_factory=list)  # --log-format ... before the command
    config_path: str | None = None
    key_dir: Path | None = None
    api_key: str = ""  # inline key (config): handed over by environment, never argv
    api_key_file: str = ""  # preferred: the children read the key from this file
    private_key: str = ""
    public_key: str = ""
    sim_urls: dict[str, str] = field(default_factory=dict)  # filled from the sim's first line


def available_subcommands() -> set[str]:
    """Subcommands registered in this build (a component's module may not exist yet)."""
    from pipeline.cli import build_parser

    parser = build_parser()
    for action in parser._actions:  # argparse has no public accessor for subparsers
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


@dataclass
class Component:
    name: str  # sim, ingest, trading, monitor, persist, risk
    role: str  # key of STOP_ORDER
    argv: Callable[[], list[str]]
    depends_on: tuple[str, ...] = ()
    capture_first_line: bool = False
    final_codes: frozenset[int] = frozenset({2})  # exit codes a restart cannot fix
    env: dict[str, str] | None = None  # extra environment (secrets that must not be in argv)


def api_key_args(ctx: RunContext, flag_prefix: str = "", suffix: str = "") -> list[str]:
    """The flag pair telling a child where the API key is: ``--api-key-file PATH`` when there
    is a file, else ``--api-key-env VAR`` (the child's env holds it: :func:`api_key_env`).
    ``suffix`` is appended to the value (the simulator wants ``SOURCE=PUBLIC_KEY``)."""
    if ctx.api_key_file:
        return [f"{flag_prefix}--api-key-file", ctx.api_key_file + suffix]
    if ctx.api_key:
        return [f"{flag_prefix}--api-key-env", API_KEY_ENV + suffix]
    return []


def api_key_env(ctx: RunContext) -> dict[str, str] | None:
    """Environment for a child that reads the key via ``--api-key-env`` (None: not needed)."""
    return {API_KEY_ENV: ctx.api_key} if ctx.api_key and not ctx.api_key_file else None


def plan_components(
    cfg: Any, ctx: RunContext, available: set[str]
) -> tuple[list[Component], list[str]]:
    """The components to run, in start order, and notes about what is skipped and why."""
    base = [ctx.python, "-m", "pipeline", *ctx.global_args]
    cfg_args = ["--config", ctx.config_path] if ctx.config_path else []
    comps: list[Component] = []
    notes: list[str] = []
    sim_mode = cfg.run.mode == "sim"
    upstream: tuple[str, ...] = ()

    def missing(role: str, what: str) -> bool:
        if SUBCOMMANDS[role] in available:
            return False
        notes.append(
            f"{what}: not available in this build (no `pipeline {SUBCOMMANDS[role]}`); skipped"
        )
        return True

    if sim_mode:
        if missing("sim", "simulator"):
            notes.append("ingest and trading need the simulator in sim mode; skipped")
        else:

            def sim_argv() -> list[str]:
                # port 0: the simulator picks one and says it on its first line
                argv = [*base, "sim", *to_argv(dataclasses.replace(cfg.sim, port=0))]
                if ctx.public_key:
                    argv += api_key_args(ctx, suffix=f"={ctx.public_key}")
                return argv + list(cfg.sim.extra_args)

            comps.append(
                Component("sim", "sim", sim_argv, capture_first_line=True, env=api_key_env(ctx))
            )
            upstream = ("sim",)

    def url(key: str, sim_key: str) -> str:
        return ctx.sim_urls.get(sim_key, "") if sim_mode else cfg.endpoint(key)

    can_connect = not sim_mode or bool(upstream)
    if can_connect and not missing("ingest", "ingest"):

        def ingest_argv() -> list[str]:
            streams_url, rest_url = url("streams_url", "streams"), url("rest_url", "rest")
            child = dataclasses.replace(cfg.ingest, streams_url=streams_url, rest_url=rest_url)
            if sim_mode and cfg.ingest.sbe_streams:
                # the simulator's SBE port, and (unless the config names one) the API key
                # registered with it: the sim refuses SBE without a key, as Binance does
                child.sbe_url = ctx.sim_urls.get("sbe", "")
                if not (child.sbe_api_key_env or child.sbe_api_key_file):
                    child.sbe_api_key_file = ctx.api_key_file
            return [*base, "ingest", *to_argv(child), *cfg.ingest.extra_args]

        comps.append(Component("ingest", "ingest", ingest_argv, depends_on=upstream))
    if not cfg.trading.enabled:
        notes.append("trading: disabled in the config (trading.enabled = false)")
    elif can_connect and not missing("trading", "trading"):

        def trading_argv() -> list[str]:
            # exec ring and metrics name come from [ring]/[run] (wired into cfg.trading by the
            # loader); the key goes by --api-key-file/--api-key-env, never as a value
            child = dataclasses.replace(
                cfg.trading,
                url=url("wsapi_url", "wsapi"),
                private_key=ctx.private_key,
                # with the risk consumer running, every order passes its limits first
                risk_limits=cfg.risk.limits_name if "risk" in cfg.run.consumers else None,
            )
            return [*base, "trade", *api_key_args(ctx), *to_argv(child),
                    *cfg.trading.extra_args]  # fmt: skip

        # exit 3: the exchange rejected the logon; retrying would only hammer it
        comps.append(
            Component(
                "trading", "trading", trading_argv, depends_on=upstream,
                final_codes=frozenset({2, 3}), env=api_key_env(ctx),
            )
        )  # fmt: skip
    for name in cfg.run.consumers:
        if missing("consumer", f"consumer {name}"):
            continue

        def consumer_argv(name: str = name) -> list[str]:
            return [*base, "consume", name, "--ring", cfg.ring.name, *cfg_args]

        comps.append(Component(name, "consumer", consumer_argv))
    # the NATS bridge ([bridge]): publish this host's ring, and/or mirror a stream into a ring
    bridge_roles = (["publish"] if cfg.bridge.publish else []) + (
        ["mirror"] if cfg.bridge.mirror_ring else []
    )
    for role in bridge_roles:
        if missing("bridge", f"bridge {role}"):
            continue

        def bridge_argv(role: str = role) -> list[str]:
            ring = ["--ring", cfg.ring.name] if role == "publish" else []
            return [*base, "bridge", role, *ring, *cfg_args]

        comps.append(Component(f"bridge-{role}", "bridge", bridge_argv))
    return comps, notes


def write_api_key_file(key_dir: Path, api_key: str) -> str:
    """Write ``api_key`` to ``key_dir/api_key`` (mode 0600, created exclusively) and return the
    path: the sim-mode key reaches the simulator and the trader as a file, not as argv."""
    path = key_dir / "api_key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, api_key.encode("ascii") + b"\n")
    finally:
        os.close(fd)
    return str(path)


def cleanup_segments(names: Sequence[str], prefix: str = "pipeline.") -> list[str]:
    """Unlink rings/metrics blocks named in ``names`` or starting with ``prefix`` whose owner
    process is dead (never one with a live owner: another pipeline may be running). Returns
    what was removed."""
    from pipeline.ipc import shm
    from pipeline.ipc.header import HEAD_BYTES
    from pipeline.ipc.layout import RING_HEADER
    from pipeline.ipc.metrics import METRICS_HEADER

    removed = []
    candidates = set(shm.list_names(prefix)) | {n for n in names if (shm.SHM_DIR / n).exists()}
    for name in sorted(candidates):
        head = shm.read_head(name, HEAD_BYTES)
        if head is None:
            continue
        owner = RING_HEADER.owner_of_head(head) or METRICS_HEADER.owner_of_head(head)
        if owner is None:
            continue  # not ours to judge
        pid, start = owner
        if not shm.pid_alive(pid, start) and shm.unlink(name):
            removed.append(name)
    return removed


# ------------------------------------------------------------------------------------------------
# shell


def _say(text: str) -> None:
    """Human-facing line on stdout (children's lines are whole lines too: no interleaving)."""
    try:
        sys.stdout.write(f"pipeline run: {text}\n")
        sys.stdout.flush()
    except (OSError, ValueError):  # stdout closed (e.g. piped into `head`): keep supervising
        log.info(text, extra={"event": "run_status"})


def _status_line(sup: Any, cfg: Any, expect_trading: bool) -> str:
    from pipeline.ops.health import collect

    try:
        rep = collect([cfg.ring.name], prefix=cfg.run.shm_prefix)
    except Exception as exc:  # health must never take the runner down
        rep = {"_error": {"healthy": False, "problems": [str(exc)]}}
    parts = []
    for name, st in sup.status().items():
        piece = f"{name} {st['state']}"
        if st["restarts"]:
            piece += f" (restarts {st['restarts']})"
        if name == "trading" and "trading" in rep:
            t = rep["trading"]
            piece = f"trading {t.get('state', '?')}"
            if t.get("last_rtt_us") is not None:
                piece += f" rtt {float(t['last_rtt_us']):.0f}us"
            if st["restarts"]:
                piece += f" (restarts {st['restarts']})"
        parts.append(piece)
    ring = rep.get(f"ring:{cfg.ring.name}")
    if ring and "cursor" in ring:
        parts.append(f"ring {ring['cursor']} records gen {ring['generation']}")
    return " | ".join(parts)


def main(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.ops.affinity import available_cpus, plan_cpus
    from pipeline.ops.supervisor import ChildSpec, RestartPolicy, StartError, Supervisor

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"pipeline run: config error: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    ctx = RunContext(config_path=args.config)
    ctx.global_args = ["--log-format", args.log_format, "--log-level", args.log_level]
    available = available_subcommands()
    key_dir: Path | None = None
    try:
        # sim mode: a throwaway key pair registered with the simulator, for the trading
        # session and for SBE streams (which need an API key there as on Binance)
        if cfg.run.mode == "sim" and (cfg.trading.enabled or cfg.ingest.sbe_streams):
            from pipeline.binance.keys import generate_keypair

            key_dir = Path(tempfile.mkdtemp(prefix="pipeline-run-keys-"))  # mode 0700
            priv, pub = generate_keypair(key_dir)
            ctx.key_dir = key_dir
            ctx.private_key, ctx.public_key = str(priv), str(pub)
            if cfg.trading.api_key_file:
                ctx.api_key_file = cfg.trading.api_key_file
            else:
                ctx.api_key_file = write_api_key_file(
                    key_dir, cfg.trading.api_key or f"sim-{secrets.token_hex(8)}"
                )
        else:
            ctx.private_key = cfg.trading.private_key
            ctx.api_key, ctx.api_key_file = cfg.trading.api_key, cfg.trading.api_key_file

        comps, notes = plan_components(cfg, ctx, available)
        for note in notes:
            _say(note)
        if not comps:
            _say("nothing to run")
            return 1
        cpus: dict[str, frozenset[int]] = {}
        if cfg.run.pin_cpus and not args.no_pin:
            plan = plan_cpus([c.name for c in comps], available_cpus(), cfg.run.cpus)
            cpus = plan.assignment
            for note in plan.notes:
                _say(note)
            _say(f"CPU pinning: {plan.describe()}")
        sc = cfg.supervisor
        policy = RestartPolicy(
            initial_s=sc.backoff_initial_s, max_s=sc.backoff_max_s, factor=sc.backoff_factor,
            stable_after_s=sc.stable_after_s, max_restarts=sc.max_restarts,
            window_s=sc.restart_window_s,
        )  # fmt: skip

        def on_event(what: str, child: Any, detail: str) -> None:
            if child.spec.name == "sim" and what == "started":
                ctx.sim_urls.update({k: str(v) for k, v in child.info.items()})
            if what in ("crashed", "restarted", "gave_up", "start_failed", "done", "unavailable"):
                _say(f"{child.spec.name} {what}{': ' + detail if detail else ''}")

        sup = Supervisor(policy, stop_timeout_s=sc.stop_timeout_s, on_event=on_event)
        for c in comps:
            sup.add(
                ChildSpec(
                    c.name, argv=c.argv, stop_order=STOP_ORDER[c.role], depends_on=c.depends_on,
                    cpus=cpus.get(c.name), capture_first_line=c.capture_first_line, env=c.env,
                    start_timeout_s=sc.start_timeout_s, final_codes=c.final_codes,
                )
            )  # fmt: skip
        _say(
            f"mode {cfg.run.mode}: starting {', '.join(c.name for c in comps)}"
            + (f" for {args.duration:g}s" if args.duration else " (Ctrl-C to stop)")
        )
        rc = 0
        try:
            sup.start_all()
        except StartError as exc:
            _say(f"start failed: {exc}")
            rc = 1
            stop.set()
        if ctx.sim_urls:
            _say(f"simulator at {ctx.sim_urls.get('rest', '?')}")
        rc = _loop(sup, cfg, args, stop) if rc == 0 else rc
        why = "duration reached" if not received else f"{signal.Signals(received[0]).name}"
        _say(f"stopping ({why}): consumers, trading, ingest, simulator")
        result = sup.stop_all()
        _say("stopped: " + ", ".join(f"{n} {how}" for n, how in result.items()))
    finally:
        names = [cfg.ring.name, cfg.ring.exec_name, cfg.risk.limits_name]
        removed = cleanup_segments(names, prefix=cfg.run.shm_prefix)
        if removed:
            _say(f"removed stale shared memory: {', '.join(removed)}")
        if key_dir is not None:
            shutil.rmtree(key_dir, ignore_errors=True)
    return rc


def _loop(sup: Any, cfg: Any, args: argparse.Namespace, stop: threading.Event) -> int:
    start = time.monotonic()
    end = None if args.duration is None else start + args.duration
    next_status = start + min(args.status_interval, 3.0) if args.status_interval > 0 else None
    while not stop.is_set():
        now = time.monotonic()
        if end is not None and now >= end:
            break
        sup.poll()
        if next_status is not None and now >= next_status:
            next_status = now + args.status_interval
            _say(_status_line(sup, cfg, cfg.trading.enabled))
        if all(c.state in ("failed", "done") for c in sup.children.values()):
            _say("every component has stopped")
            return 1
        stop.wait(0.05)
    return 0


__all__ = [
    "API_KEY_ENV",
    "RunContext",
    "api_key_args",
    "api_key_env",
    "cleanup_segments",
    "main",
    "plan_components",
    "register",
    "write_api_key_file",
]
