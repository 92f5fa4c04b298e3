"""The `pipeline` command: one subcommand per process or tool.

Each subcommand lives in its own module, which exposes ``register(subparsers)``; the module is
imported only when listed here, so a process pays only for what it runs. A registered parser sets
``func`` (``args -> int``) as its default.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

# Modules that contribute subcommands, in the order `pipeline --help` lists them.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "pipeline.ops.runner",
    "pipeline.sim.cli",
    "pipeline.marketdata.cli",
    "pipeline.trading.cli",
    "pipeline.consumers.cli",
    "pipeline.ipc.cli",
    "pipeline.ops.health",
    "pipeline.bridge.cli",
)

COMPLETION_SHELLS = ("bash", "zsh")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.distribution import version

    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Low-latency Binance gateway (ingest, ring, consumers, trading, simulator).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument(
        "--log-format",
        choices=("auto", "text", "json"),
        default="auto",
        help="log format: text on a terminal, JSON lines otherwise (auto)",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # not written yet; anything else is a real error
                continue
            raise
        module.register(sub)
    _register_completion(sub, parser)
    return parser


def _register_completion(sub: Any, parser: argparse.ArgumentParser) -> None:
    """`pipeline completion bash|zsh`: a static script generated from this very parser (shtab),
    so completion never drifts from the flags and a TAB press does not start Python."""
    p = sub.add_parser(
        "completion",
        help="print a bash or zsh completion script",
        description="Print a shell completion script for `pipeline`, e.g. "
        "`pipeline completion bash > /etc/bash_completion.d/pipeline` or "
        "`pipeline completion zsh > \"${fpath[1]}/_pipeline\"`.",
    )
    p.add_argument("shell", choices=COMPLETION_SHELLS, help="which shell")

    def print_script(args: argparse.Namespace) -> int:
        import shtab

        sys.stdout.write(shtab.complete(parser, shell=args.shell))
        return 0

    p.set_defaults(func=print_script)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipeline.logs import setup_logging

    setup_logging(args.log_format, args.log_level)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
