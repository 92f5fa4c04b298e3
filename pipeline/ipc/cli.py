"""`pipeline ring ...`: look at shared-memory rings from the shell.

``pipeline ring stats NAME [--json]`` shows the writer (pid, alive, generation, cursor) and every
registered reader with its lag and missed count, reaping entries of readers that died;
``pipeline ring list [--prefix P]`` lists ring segments; ``pipeline ring tail NAME [--last N]
[--follow] [--kind K] [--symbol S] [--json]`` prints records (pipeline/ipc/tail.py). The ring
module is imported lazily so ``pipeline --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
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
    tl = sub.add_parser(
        "tail", help="print a ring's records: the last few, then new ones with --follow"
    )
    tl.add_argument("name", help="ring name (the /dev/shm file name)")
    tl.add_argument("--last", type=int, default=10, metavar="N",
                    help="start N records back (default 10; 0: only records published from now)")
    tl.add_argument("-f", "--follow", action="store_true",
                    help="keep printing new records until Ctrl-C (or --max)")
    tl.add_argument("--max", type=int, default=None, metavar="N", help="stop after N records")
    tl.add_argument("--kind", default="", metavar="K1,K2",
                    help="tick rings: only these kinds (AGG_TRADE, TRADE, BOOK_TICKER, GAP, ...)")
    tl.add_argument("--symbol", default="", metavar="S1,S2",
                    help="tick rings: only these symbols")
    tl.add_argument("--json", action="store_true", help="one JSON object per record")
    tl.set_defaults(func=_tail)


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


def _tail(args: argparse.Namespace) -> int:
    from pipeline.ipc import tail
    from pipeline.ipc.ring import RingReader
    from pipeline.ipc.segments import RingError, ring_stats

    if args.last < 0 or (args.max is not None and args.max < 1):
        print("pipeline ring tail: --last must be >= 0 and --max >= 1", file=sys.stderr)
        return 2
    try:
        st = ring_stats(args.name)
        start = max(0, int(st["cursor"]) - min(args.last, int(st["capacity"])))
        reader = RingReader.attach(args.name, f"tail{os.getpid()}", start=start, idle="low-cpu")
    except (RingError, ValueError) as exc:
        print(f"pipeline ring tail: {exc}", file=sys.stderr)
        return 1
    try:
        try:
            select = tail.record_filter(reader.dtype, reader.symbols, args.kind.split(","),
                                        args.symbol.split(","))
        except ValueError as exc:
            print(f"pipeline ring tail: {exc}", file=sys.stderr)
            return 2

        def write(line: str) -> None:
            print(line, flush=args.follow)

        tail.tail(reader, select, as_json=args.json, follow=args.follow,
                  max_records=args.max, write=write, decode=_known_decoder(reader.dtype))
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `| head`: the reader went away; say nothing more
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - no flush error at exit
    finally:
        reader.close()
    return 0


def _known_decoder(dtype: Any) -> Any:
    """The exec ring's records by their names (kind ACK, status NEW), as `pipeline order`
    prints them; other rings by their raw fields."""
    from pipeline.trading.wire import EXEC_DTYPE

    if dtype != EXEC_DTYPE:
        return None
    from pipeline.trading.client import ExecReport

    return lambda rec: ExecReport.from_record(rec).as_dict()
