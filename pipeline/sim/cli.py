"""``pipeline sim``: run the local Binance Spot simulator on loopback.

First stdout line: a JSON object with the URLs (``streams``, ``rest``, ``wsapi``, ``admin``),
flushed, so a parent process can start it with ``--port 0`` and read where it listens. Human
text goes to stderr. SIGINT/SIGTERM stop it cleanly (exit code 0).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from pipeline.sim.config import SimConfig, parse_rate  # parse_rate re-exported (scripts, tests)


def register(subparsers: Any) -> None:
    """Add the ``sim`` subcommand: a flag per :class:`~pipeline.sim.config.SimConfig` field
    (from its metadata, as the runner writes them), then the flags that are not fields (key
    sources, fault switches, the ``--turbo`` alias)."""
    from pipeline.settings import add_arguments

    p = subparsers.add_parser(
        "sim",
        help="run the local Binance Spot simulator (streams, REST, WS API, fault switches)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p, SimConfig)
    p.add_argument(
        "--turbo",
        action="store_true",
        help="same as --rate max (kept for older scripts: the real walk is now the fast path)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="NAME=PUBLIC_KEY_PEM",
        help="Ed25519 API key accepted by the WS API (repeatable); NAME is visible in the "
        "process list, prefer --api-key-file / --api-key-env",
    )
    p.add_argument(
        "--api-key-file",
        action="append",
        default=[],
        metavar="NAME_FILE=PUBLIC_KEY_PEM",
        help="as --api-key, the API key NAME read from NAME_FILE (mode 0600) so it is not in "
        "argv (repeatable)",
    )
    p.add_argument(
        "--api-key-env",
        action="append",
        default=[],
        metavar="VAR=PUBLIC_KEY_PEM",
        help="as --api-key, the API key NAME read from environment variable VAR (repeatable)",
    )
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME[=JSON]",
        help='fault set at start, e.g. --fault \'order_fault={"kind":"-1007","count":3}\'',
    )
    p.add_argument("--wsapi-delay-ms", type=int, default=0)
    p.add_argument("--reject-logons", type=int, default=0)
    p.add_argument("--order-fault", metavar="KIND[:COUNT]", help="429 | 5xx | -1007")
    p.set_defaults(func=run)


def load_api_key(spec: str) -> tuple[str, bytes]:
    """NAME=PATH -> (NAME, 32 raw Ed25519 public-key bytes).

    The file is read by the WS API's own :func:`~pipeline.sim.signatures.parse_public_key`, so the
    command line and the service accept the same key formats (PEM as Binance's generator
    writes it, its base64 body, or hex).
    """
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--api-key must be NAME=PUBLIC_KEY_PEM_PATH, got {spec!r}")
    return name, _public_key(path)


def _public_key(path: str) -> bytes:
    """The 32 raw bytes of the Ed25519 public key in the PEM file ``path`` (errors name it)."""
    from pipeline.sim.signatures import parse_public_key

    with open(path, "rb") as f:
        data = f.read()
    try:
        return parse_public_key(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def load_api_key_from(spec: str, flag: str) -> tuple[str, bytes]:
    """``SOURCE=PATH`` for ``--api-key-file`` (SOURCE a file) or ``--api-key-env`` (SOURCE an
    environment variable) -> (API key name, 32 raw public-key bytes). The name is read and
    checked by the same code as ``pipeline trade`` uses, so both sides accept the same key
    files; errors name the source, never the key."""
    from pipeline.config import SecretFileError, read_api_key_env, read_api_key_file

    source, sep, path = spec.rpartition("=")
    if not sep or not source or not path:
        raise ValueError(f"{flag} must be SOURCE=PUBLIC_KEY_PEM_PATH, got {spec!r}")
    try:
        name = read_api_key_file(source) if flag == "--api-key-file" else read_api_key_env(source)
    except SecretFileError as exc:
        raise ValueError(f"{flag}: {exc}") from None
    return name, _public_key(path)


def build_config(args: argparse.Namespace) -> SimConfig:
    """The :class:`SimConfig` of parsed ``pipeline sim`` flags (ValueError/OSError: bad flag)."""
    from pipeline.settings import values_from_args
    from pipeline.sim.faults import Faults, apply_switch, parse_fault

    faults = Faults(wsapi_delay_ms=args.wsapi_delay_ms, reject_logons=args.reject_logons)
    if args.order_fault:
        kind, _, count = args.order_fault.partition(":")
        req = parse_fault("order_fault", {"kind": kind, "count": int(count or 1)})
        apply_switch(faults, req, 0.0)
    for spec in args.fault:
        name, _, raw = spec.partition("=")
        params = json.loads(raw) if raw else {}
        req = parse_fault(name, params)
        if req.name in ("drop", "malformed", "shutdown", "blackhole"):
            raise ValueError(f"--fault {name}: only switches can be set at start")
        # durations count from start; the server's monotonic clock starts near 0 per process
        apply_switch(faults, req, 0.0)
    values = values_from_args(SimConfig, args)
    if args.turbo:
        values["rate"] = math.inf
    api_keys = dict(
        [load_api_key(s) for s in args.api_key]
        + [load_api_key_from(s, "--api-key-file") for s in args.api_key_file]
        + [load_api_key_from(s, "--api-key-env") for s in args.api_key_env]
    )
    config = SimConfig(**values, api_keys=api_keys, faults=faults)
    if config.stp_problem():
        raise ValueError(f"--stp-default/--stp-modes: {config.stp_problem()}")
    return config


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except (ValueError, OSError) as exc:
        print(f"pipeline sim: {exc}", file=sys.stderr)
        return 2
    import asyncio
    import signal

    from pipeline import aio
    from pipeline.sim.server import Simulator

    async def main() -> int:
        # timed switches given at start count from now
        loop = asyncio.get_running_loop()
        f = config.faults
        t = loop.time()
        for attr in ("stall_until", "refuse_until", "rest_fail_until"):
            if getattr(f, attr) is not None:
                setattr(f, attr, getattr(f, attr) + t)
        sim = Simulator(config)
        await sim.start()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        sys.stdout.write(json.dumps(sim.urls) + "\n")
        sys.stdout.flush()
        print(
            f"pipeline sim: streams {sim.urls['streams']}  rest {sim.urls['rest']}  "
            f"wsapi {sim.urls['wsapi']}  sbe {sim.urls['sbe']}  admin {sim.urls['admin']}  "
            f"symbols {','.join(sim.market.symbols)}",
            file=sys.stderr,
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            await sim.stop()
        print("pipeline sim: stopped", file=sys.stderr, flush=True)
        return 0

    return aio.run(main())


__all__ = ["build_config", "load_api_key", "load_api_key_from", "parse_rate", "register", "run"]
