"""`pipeline bridge publish|mirror`: the ring carried across hosts on NATS JetStream.

Settings come from the ``[bridge]`` section of ``--config`` (and ``PIPELINE_BRIDGE_*``); flags
override them for one run. Both run until SIGTERM/SIGINT and never exit because the NATS server
went away (they reconnect and resume); exit 2 is a setting a restart cannot fix.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
from pathlib import Path
from typing import Any

from pipeline.ipc.records import TICK_RING

log = logging.getLogger("pipeline.bridge")

_STREAM_RE = re.compile(r"[A-Za-z0-9_-]{1,200}")
_URL_RE = re.compile(r"^(nats|tls)://[^\s/]+$")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bridge",
        help="carry the tick ring across hosts on NATS JetStream (publish / mirror)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="bridge_command", metavar="ROLE")
    sub.required = True
    pub = sub.add_parser("publish", help="publish a ring's records to a JetStream stream")
    _common(pub)
    pub.add_argument("--ring", default=None, help="ring to publish (default: ring.name)")
    pub.add_argument("--subject-prefix", default=None, help="subjects <prefix>.<SYMBOL>.<kind>")
    pub.add_argument("--batch-records", type=int, default=None, help="records per message")
    pub.add_argument("--linger-ms", type=float, default=None, help="max batch wait, ms (<= 1)")
    pub.add_argument("--max-in-flight", type=int, default=None, help="unacked messages at most")
    pub.add_argument("--max-age", type=float, default=None, help="stream retention by age, s")
    pub.add_argument("--max-bytes", type=int, default=None, help="stream retention by size")
    pub.add_argument("--reader-name", default="bridge", help="name in the ring's readers table")
    pub.set_defaults(func=main_publish)
    mir = sub.add_parser("mirror", help="write a JetStream stream into a local ring")
    _common(mir)
    mir.add_argument("--ring", default=None, help="local ring to create (default: mirror_ring)")
    mir.add_argument(
        "--start", default=None,
        help="all | new | seq:N | time:ISO8601; only when no position is saved (default: all)",
    )  # fmt: skip
    mir.add_argument("--state-dir", default=None, help="where the position file is kept")
    mir.add_argument("--capacity", type=int, default=None, help="mirror ring slots")
    mir.set_defaults(func=main_mirror)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="TOML config file (see examples/pipeline.toml)")
    p.add_argument("--nats-url", default=None, help="nats://HOST:PORT (default: bridge.nats_url)")
    p.add_argument("--stream", default=None, help="JetStream stream (default: bridge.stream)")
    p.add_argument("--metrics-name", default=None, help="metrics block name ('' for none)")
    p.add_argument("--duration", type=float, default=None, help="stop after S seconds")


def _pick(flag: Any, configured: Any) -> Any:
    return configured if flag is None else flag


def _settings(args: argparse.Namespace, command: str) -> tuple[Any, Any] | None:
    from pipeline.config import load_config_for_cli

    cfg = load_config_for_cli(args.config, command)
    if cfg is None:
        return None
    bc = cfg.bridge
    url = _pick(args.nats_url, bc.nats_url)
    stream = _pick(args.stream, bc.stream)
    if not _URL_RE.match(url):
        print(f"{command}: --nats-url: expected nats://HOST:PORT, got {url!r}")
        return None
    if not _STREAM_RE.fullmatch(stream):
        print(f"{command}: --stream: letters, digits, '_' and '-' only, got {stream!r}")
        return None
    return cfg, bc


def _run(component: Any) -> int:
    """Run a publisher or mirror until it ends or SIGTERM/SIGINT; SIGTERM is a clean stop."""
    from pipeline.aio import run
    from pipeline.ops import sdnotify

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, component.stop.set)
        sdnotify.ready("bridge running")
        watchdog = sdnotify.Watchdog()

        async def feed() -> None:
            while True:
                watchdog.tick(healthy=True)
                await asyncio.sleep(1.0)

        feeder = asyncio.ensure_future(feed())
        try:
            return int(await component.run())
        finally:
            feeder.cancel()
            sdnotify.stopping()

    return run(main())


def main_publish(args: argparse.Namespace) -> int:
    from pipeline.bridge.publish import Publisher, PublishOptions
    from pipeline.bridge.wire import check_prefix

    got = _settings(args, "pipeline bridge publish")
    if got is None:
        return 2
    cfg, bc = got
    stream = _pick(args.stream, bc.stream)
    prefix = _pick(args.subject_prefix, bc.subject_prefix)
    linger_ms = _pick(args.linger_ms, bc.linger_ms)
    try:
        check_prefix(prefix)
        if not 0 <= linger_ms <= 1.0:
            raise ValueError(f"--linger-ms must be within 0..1, got {linger_ms}")
    except ValueError as exc:
        print(f"pipeline bridge publish: {exc}")
        return 2
    metrics = _pick(args.metrics_name, f"{cfg.run.shm_prefix}bridge.publish.{stream}.metrics")
    opts = PublishOptions(
        nats_url=_pick(args.nats_url, bc.nats_url),
        ring=_pick(args.ring, cfg.ring.name or TICK_RING), stream=stream, prefix=prefix,
        max_records=_pick(args.batch_records, bc.batch_records), linger_s=linger_ms / 1000.0,
        max_in_flight=_pick(args.max_in_flight, bc.max_in_flight),
        max_age_s=_pick(args.max_age, bc.max_age_s), max_bytes=_pick(args.max_bytes, bc.max_bytes),
        metrics_name=metrics, reader_name=args.reader_name, duration_s=args.duration,
    )  # fmt: skip
    return _run(Publisher(opts))


def main_mirror(args: argparse.Namespace) -> int:
    from pipeline.bridge.config import default_state_dir
    from pipeline.bridge.mirror import Mirror, MirrorOptions
    from pipeline.bridge.mirror_state import StartError, parse_start

    got = _settings(args, "pipeline bridge mirror")
    if got is None:
        return 2
    cfg, bc = got
    ring = _pick(args.ring, bc.mirror_ring)
    stream = _pick(args.stream, bc.stream)
    if not ring:
        print("pipeline bridge mirror: --ring (or bridge.mirror_ring) is required")
        return 2
    try:
        start = parse_start(_pick(args.start, bc.start))
    except StartError as exc:
        print(f"pipeline bridge mirror: {exc}")
        return 2
    capacity = _pick(args.capacity, bc.mirror_capacity)
    if capacity < 2 or capacity & (capacity - 1):
        print(f"pipeline bridge mirror: --capacity must be a power of two, got {capacity}")
        return 2
    state_dir = Path(_pick(args.state_dir, bc.state_dir) or default_state_dir())
    metrics = _pick(args.metrics_name, f"{cfg.run.shm_prefix}bridge.mirror.{ring}.metrics")
    opts = MirrorOptions(
        nats_url=_pick(args.nats_url, bc.nats_url), ring=ring, stream=stream, start=start,
        position_file=str(state_dir / f"mirror-{stream}-{ring}.json"), capacity=capacity,
        metrics_name=metrics, duration_s=args.duration,
    )  # fmt: skip
    return _run(Mirror(opts))
