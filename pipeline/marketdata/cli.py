"""`pipeline ingest` command line: one flag per :class:`IngestConfig` field, from its metadata.

Why apart from the process: ``pipeline --help`` builds every wing's parser, and a parser needs
only the config's fields and defaults, not the sockets, the ring or the cores. The flags come
from the fields' :func:`~pipeline.settings.setting` metadata, which the runner also uses to
write this command line (:func:`pipeline.settings.to_argv`), so a flag cannot be added on one
side and forgotten on the other.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline.marketdata.config import ConfigError, IngestConfig, validate
from pipeline.settings import add_arguments, values_from_args


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    """The checked :class:`IngestConfig` of parsed ``pipeline ingest`` flags."""
    return validate(IngestConfig(**values_from_args(IngestConfig, args)))


def _main(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"pipeline ingest: error: {exc}", file=sys.stderr)
        return 2
    from pipeline.marketdata.ingest import run

    return run(cfg)


def register(subparsers: Any) -> None:
    """Add the ``ingest`` subcommand."""
    p = subparsers.add_parser(
        "ingest", help="market-data streams -> shared-memory tick ring (gap-free)",
        description="Subscribe Binance market-data streams and publish ticks into a ring.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p, IngestConfig)
    p.set_defaults(func=_main)
