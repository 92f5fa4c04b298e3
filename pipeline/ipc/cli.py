"""`pipeline ring ...`: look at shared-memory rings from the shell.

``pipeline ring stats NAME [--json]`` shows the writer (pid, alive, generation, cursor) and every
registered reader with its lag and missed count, reaping entries of readers that died;
``pipeline ring list [--prefix P]`` lists ring segments. The ring module is imported lazily so
``pipeline --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "ring", help="inspect shared-memory rings", description=__doc__.split("\n\n")[1]
    )
    sub = parser.add_subparsers(dest="ring_command", metavar="ACTION")
    sub.required = True
    stats = sub.add_parser("stats", help="writer and per-reader lag of one ring")
    stats.add_argument("name", help="ring name (the /dev/shm file name)")
    stats.add_argument("--json", action="store_true", help="one JSON object on stdout")
    stats.set_defaults(func=_stats)
    lst = sub.add_parser("list", help="list ring segments in /dev/shm")
    lst.add_argument("--prefix", default="", help="only names starting with this")
    lst.set_defaults(func=_list)


def format_stats(stats: dict[str, Any], now_ns: int | None = None) -> str:
    """Human-readable ``ring_stats`` output (pure: tests call it with a fixed ``now_ns``)."""
    now = time.time_ns() if now_ns is None else now_ns
    state = "alive" if stats["writer_alive"] else ("closed" if stats["closed"] else "DEAD")
    lines = [
        f"ring {stats['name']}: generation {stats['generation']}, writer pid "
        f"{stats['writer_pid']} ({state}), cursor {stats['cursor']}, capacity "
        f"{stats['capacity']}, record {stats['record_size']} B, {stats['symbols']} symbols, "
        + (f"{stats['sleeping']} reader(s) asleep on its futex" if stats.get("wakeups")
           else "readers nap (no futex wake-ups)"),
    ]
    readers = stats["readers"]
    if not readers:
        lines.append("no readers")
        return "\n".join(lines)
    lines.append(f"{'reader':<24} {'pid':>8} {'cursor':>12} {'lag':>10} {'missed':>10} {'age':>9}")
    for r in readers:
        age_s = max(0.0, (now - r["attached_ns"]) / 1e9)
        lines.append(
            f"{r['name']:<24} {r['pid']:>8} {r['cursor']:>12} {r['lag']:>10} "
            f"{r['missed']:>10} {age_s:>8.0f}s"
        )
    return "\n".join(lines)


def _stats(args: argparse.Namespace) -> int:
    import orjson

    from pipeline.ipc.segments import RingError, ring_stats

    try:
        stats = ring_stats(args.name)
    except (RingError, ValueError) as exc:
        print(f"pipeline ring stats: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(orjson.dumps(stats).decode() + "\n")
    else:
        print(format_stats(stats))
    return 0


def _list(args: argparse.Namespace) -> int:
    from pipeline.ipc.segments import list_rings

    for name in list_rings(args.prefix):
        print(name)
    return 0
