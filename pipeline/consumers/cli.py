"""`pipeline consume NAME`: run one ring consumer (monitor, persist, risk, or a plug-in registered
under the ``pipeline.consumers`` entry points, see :mod:`pipeline.consumers.registry`) as its own
process. A plug-in that does not import or is not a consumer is exit 1 with one line naming it.

Settings come from ``--config`` / ``PIPELINE_*`` env (see :mod:`pipeline.config`); the flags here
override them for one run. The loop (attach with retry, idle wait, writer restarts, SIGTERM,
sd_notify, heartbeat, exit 1 with the traceback logged when the consumer raises) is
:func:`pipeline.consumers.run_consumer`. A database that is down at start is not a start
failure: persist retries it (see :class:`pipeline.consumers.persist.Persist`).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

log = logging.getLogger("pipeline.consumer")

DEFAULT_START = {"monitor": "head", "persist": "oldest", "risk": "oldest"}


def register(subparsers: Any) -> None:
    from pipeline.consumers.registry import ConsumerNames

    p = subparsers.add_parser(
        "consume",
        help="run a ring consumer (monitor, persist, risk, or a plug-in)",
        description="Attach to the tick ring and run one consumer until SIGTERM/SIGINT.",
    )
    p.add_argument(
        "name", choices=ConsumerNames(), metavar="NAME",
        help="which consumer: monitor, persist, risk, or an installed plug-in's name",
    )  # fmt: skip
    p.add_argument("--config", default=None, help="TOML config file (see examples/pipeline.toml)")
    p.add_argument("--ring", default=None, help="ring name (default: ring.name from config)")
    p.add_argument("--reader-name", default=None, help="name in the ring's readers table")
    p.add_argument(
        "--start", choices=("head", "oldest"), default=None,
        help="where to start reading (monitor: head; persist/risk: oldest)",
    )  # fmt: skip
    p.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    p.add_argument(
        "--attach-timeout", type=float, default=None,
        help="give up if the ring does not appear within S seconds (default: wait forever)",
    )  # fmt: skip
    g = p.add_argument_group("monitor")
    g.add_argument(
        "--status-interval", type=float, default=None, help="seconds between status lines"
    )
    g.add_argument(
        "--print-interval", type=float, default=None, help="min seconds between lines per symbol"
    )
    g = p.add_argument_group("persist")
    g.add_argument("--sqlite", default=None, help="SQLite file (default: persist.sqlite_path)")
    g.add_argument("--postgres-url", default=None, help="PostgreSQL URL (overrides SQLite)")
    g.add_argument("--batch-max", type=int, default=None, help="max rows per transaction")
    g.add_argument(
        "--max-pending", type=int, default=None,
        help="rows buffered while the database fails before reading the ring pauses "
        "(default: max(65536, 2 x batch-max))",
    )  # fmt: skip
    g = p.add_argument_group("persist / monitor")
    g.add_argument("--metrics-name", default=None, help="metrics block name ('' for none)")
    g = p.add_argument_group("risk")
    g.add_argument(
        "--exec-ring", default=None, help="execution-report ring (default: ring.exec_name)"
    )
    g.add_argument(
        "--limits-name", default=None, help="limits table name (default: risk.limits_name)"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pipeline.config import load_config_for_cli
    from pipeline.consumers import LoopOptions, StopFlag, run_consumer
    from pipeline.consumers.registry import ConsumerPluginError, check_consumer, load_factory

    cfg = load_config_for_cli(args.config, "pipeline consume")
    if cfg is None:
        return 2
    try:
        factory = load_factory(args.name)
    except ConsumerPluginError as exc:
        log.error("%s", exc, extra={"event": "consumer_start_failed", "consumer": args.name})
        return 1
    stop = StopFlag()
    stop.install()
    try:
        consumer = factory(args, cfg)
        check_consumer(args.name, consumer)
    except (OSError, RuntimeError, ValueError) as exc:  # configuration: say what, no traceback
        log.error(
            "cannot start consumer %s: %s", args.name, exc, extra={"event": "consumer_start_failed"}
        )
        return 1
    except Exception:  # a bug: keep the traceback
        log.exception(
            "cannot start consumer %s", args.name, extra={"event": "consumer_start_failed"}
        )
        return 1
    opts = LoopOptions(
        ring=args.ring or cfg.ring.name,
        reader_name=args.reader_name or args.name,
        start=args.start or DEFAULT_START.get(args.name, "head"),  # type: ignore[arg-type]
        duration_s=args.duration,
        attach_timeout_s=args.attach_timeout,
        tick_interval_s=float(getattr(consumer, "tick_interval_s", 0.25)),
    )
    log.info(
        "consumer starting",
        extra={"event": "consumer_start", "consumer": args.name, "ring": opts.ring},
    )
    return run_consumer(consumer, opts, stop)
