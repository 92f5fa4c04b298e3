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


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sim",
        help="run the local Binance Spot simulator (streams, REST, WS API, fault switches)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    p.add_argument("--symbols", default="BTCUSDT,ETHUSDT,BNBUSDT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rate",
        default="20",
        help="per second per symbol, in --rate-unit; 0 or 'max' = as fast as clients take",
    )
    p.add_argument(
        "--rate-unit",
        choices=("actions", "msgs"),
        default="actions",
        help="what --rate counts: walk actions (taker/maker/cancel; ~0.36 aggTrades each) or "
        "aggTrade messages (exact on average; for benchmarks that want a message rate)",
    )
    p.add_argument(
        "--turbo",
        action="store_true",
        help="same as --rate max (kept for older scripts: the real walk is now the fast path)",
    )
    p.add_argument("--replay", metavar="FILE", help="replay a capture instead of the walk")
    p.add_argument("--replay-speed", choices=("recorded", "max"), default="recorded")
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
    p.add_argument("--ping-interval", type=float, default=20.0)
    p.add_argument("--pong-timeout", type=float, default=60.0)
    p.add_argument("--max-lifetime", type=float, default=24 * 3600.0, help="seconds")
    p.add_argument(
        "--shutdown-notice",
        type=float,
        default=60.0,
        help="seconds before max lifetime to send serverShutdown (0 = never)",
    )
    p.add_argument("--max-incoming-per-s", type=int, default=5, help="0 = unlimited")
    p.add_argument("--max-streams", type=int, default=1024)
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


def parse_rate(text: str) -> float:
    if text.strip().lower() in ("max", "0", "inf"):
        return math.inf
    rate = float(text)
    if rate < 0:
        raise ValueError("--rate must be >= 0")
    return rate


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


def build_config(args: argparse.Namespace) -> Any:
    from pipeline.sim.faults import Faults, apply_switch, parse_fault
    from pipeline.sim.server import SimConfig

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
    return SimConfig(
        host=args.host,
        port=args.port,
        symbols=[s.strip().upper() for s in args.symbols.split(",") if s.strip()],
        seed=args.seed,
        rate=math.inf if args.turbo else parse_rate(args.rate),
        rate_unit=args.rate_unit,
        replay=args.replay,
        replay_speed=args.replay_speed,
        api_keys=dict(
            [load_api_key(s) for s in args.api_key]
            + [load_api_key_from(s, "--api-key-file") for s in args.api_key_file]
            + [load_api_key_from(s, "--api-key-env") for s in args.api_key_env]
        ),
        ping_interval=args.ping_interval,
        pong_timeout=args.pong_timeout,
        max_lifetime=args.max_lifetime,
        shutdown_notice=args.shutdown_notice,
        max_incoming_per_s=args.max_incoming_per_s,
        max_streams=args.max_streams,
        faults=faults,
    )


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
            f"wsapi {sim.urls['wsapi']}  admin {sim.urls['admin']}  "
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
