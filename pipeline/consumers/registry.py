"""Which consumers exist: the built-ins plus every plug-in registered under the entry-point group
``pipeline.consumers``, and loading one by name with errors that name the plug-in.

The plug-in contract (what a third-party package does to add ``pipeline consume my-sink``)::

    # its pyproject.toml
    [project.entry-points."pipeline.consumers"]
    my-sink = "my_package.sink:from_args"

``from_args(args, cfg)`` gets the parsed ``pipeline consume`` flags (``args.ring``,
``args.reader_name``, ``args.metrics_name``, ``args.duration``, ...) and the loaded
:class:`pipeline.config.PipelineConfig`, and returns an object with ``on_batch(batch, reader)``,
``on_tick(reader, now)`` and ``close()`` (:class:`pipeline.consumers.Consumer`); the shared loop
(:func:`pipeline.consumers.run_consumer`) does the rest, as for the built-ins. Once installed,
the name works in ``pipeline consume NAME``, in ``run.consumers`` of the TOML config and as
``pipeline-consumer@NAME.service``.

Why a module of its own: the config loader validates ``run.consumers`` against these names
without importing any consumer (sqlite3, psycopg, a plug-in's own dependencies). Entry points are
read once per process and only when a consumer name is looked up (reading them scans every
installed distribution: tens of milliseconds that ``pipeline ingest`` should not pay).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator
from functools import cache
from importlib import metadata
from typing import Any

log = logging.getLogger("pipeline.consumer")

ENTRY_POINT_GROUP = "pipeline.consumers"

#: name -> "module:factory". Registered as entry points too (pyproject.toml); listed here as well
#: so a source checkout that was never installed still has them, and so that no plug-in can take
#: a built-in's name.
BUILTINS: dict[str, str] = {
    "monitor": "pipeline.consumers.monitor:from_args",
    "persist": "pipeline.consumers.persist:from_args",
    "risk": "pipeline.consumers.risk:from_args",
}

#: the methods :func:`pipeline.consumers.run_consumer` calls
REQUIRED_METHODS = ("on_batch", "on_tick", "close")


class ConsumerPluginError(RuntimeError):
    """A consumer could not be loaded or is not a consumer. The message names the plug-in and
    its entry point, so the operator knows which package to fix, without a traceback storm."""


@cache
def available() -> dict[str, str]:
    """Every consumer name -> its ``module:factory``, built-ins first, plug-ins sorted."""
    found = dict(BUILTINS)
    plugins: dict[str, str] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTINS:
            if ep.value != BUILTINS[ep.name]:
                log.warning(
                    "consumer plug-in %r (%s) ignored: the name belongs to a built-in consumer",
                    ep.name, ep.value,
                    extra={"event": "consumer_plugin_shadowed", "consumer": ep.name},
                )  # fmt: skip
            continue
        if ep.name in plugins and plugins[ep.name] != ep.value:
            log.warning(
                "consumer plug-in %r registered twice (%s, %s); using the first",
                ep.name, plugins[ep.name], ep.value,
                extra={"event": "consumer_plugin_duplicate", "consumer": ep.name},
            )  # fmt: skip
            continue
        plugins[ep.name] = ep.value
    found.update(sorted(plugins.items()))
    return found


def consumer_names() -> tuple[str, ...]:
    """The names ``run.consumers`` and ``pipeline consume`` accept."""
    return tuple(available())


class ConsumerNames:
    """argparse ``choices`` that read the entry points only when a name is checked or listed
    (``pipeline consume``, its help, shell completion), not when the parser is built."""

    def __contains__(self, name: object) -> bool:
        return name in available()

    def __iter__(self) -> Iterator[str]:
        return iter(available())

    def __len__(self) -> int:
        return len(available())


def load_factory(name: str) -> Callable[..., Any]:
    """The factory registered under ``name``; :class:`ConsumerPluginError` if unknown, if its
    module does not import, or if the entry point names something that cannot be called."""
    target = available().get(name)
    if target is None:
        known = ", ".join(available())
        raise ConsumerPluginError(f"unknown consumer {name!r} (installed: {known})")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a broken plug-in: name it, one line
        raise ConsumerPluginError(
            f"consumer plug-in {name!r} ({target}) failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConsumerPluginError(
                f"consumer plug-in {name!r} ({target}): {module_name} has no {attr!r}"
            )
    if not callable(obj):
        raise ConsumerPluginError(
            f"consumer plug-in {name!r} ({target}) is a {type(obj).__name__}, not a factory "
            "(a callable taking (args, cfg) and returning a consumer)"
        )
    return obj


def check_consumer(name: str, consumer: object) -> None:
    """Refuse what is not a consumer before the loop runs it (and fails on the first record)."""
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(consumer, m, None))]
    if missing:
        raise ConsumerPluginError(
            f"consumer plug-in {name!r} returned a {type(consumer).__name__} without "
            f"{', '.join(missing)}: a consumer needs {', '.join(REQUIRED_METHODS)}"
        )
