"""`pipeline health [--json | --prometheus] [--serve-prometheus PORT]`: every component's state.

Sources (no IPC with the processes, nothing they have to answer): the metrics blocks named
``pipeline.*`` in the segment directory (``/dev/shm``, or ``PIPELINE_SHM_DIR`` as the systemd
units set it: run health as the services' user with the same value) and the tick ring's header and
readers table (:func:`pipeline.ipc.segments.ring_stats`). :func:`evaluate` is pure: snapshots plus
"now" in, a per-component verdict out, so every rule below is a unit test:

* **trading** (``pipeline.trading.metrics``): unhealthy unless ``state`` is READY and its writer
  is alive. Reported: state (name), reconnects, last_rtt_us, orders_unknown (a counter, also as
  ``orders_unknown_total``), ``orders_in_doubt`` (a gauge: orders UNKNOWN right now; older blocks
  publish it as ``orders_unknown_now``), and the rest. An order in doubt for longer than the
  trading process's ``--unknown-stale`` raises ``problem_unknown_orders_stale``: unhealthy.
* **ingest** (``pipeline.ingest.metrics``): unhealthy when its writer is dead or the last frame
  is older than ``--max-frame-age`` seconds.
* **ring**: unhealthy when the writer pid is dead; each reader's lag and missed count shown.
* any other block (persist, risk, ...): unhealthy when its writer is dead.
* **every block**, whatever its component: any field named ``problem_<x>`` with a non-zero
  value is a problem named ``<x>`` (with the value). This is how a process says "I am alive but
  half dead" (orders unknown for too long, a sink that cannot write) without health having to
  know each component's internals: the owner raises the field, health turns red.
* **every block that publishes ``heartbeat_interval_ms`` > 0**: unhealthy when its
  ``_updated_at_ns`` is older than max(3 * interval, 2 s) ("process stalled"). A writer that is
  alive by pid but no longer updates (SIGSTOPped, wedged in a syscall, its timer task dead) is
  otherwise indistinguishable from a healthy idle one. Blocks without the field keep only the
  rules above (their writers may legitimately be idle).
* a component that is *expected* (``--expect``, default ingest + trading when enabled in the
  config, and the ``bridge.*`` components its ``[bridge]`` section runs) but has no block at
  all is unhealthy ("not running").
* a segment under the prefix that the shared-memory trust rule refuses (not ours, not a regular
  file, ...) is reported as ``segment:<name>``, unhealthy with the reason: someone planted or
  broke a name we would use, and an operator should know.

Exit status: 0 all healthy, 1 something unhealthy, 2 usage/config error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pipeline.ipc.records import TICK_RING

log = logging.getLogger("pipeline.health")

BLOCK_PREFIX = "pipeline."
TRADING_BLOCK = "pipeline.trading.metrics"
INGEST_BLOCK = "pipeline.ingest.metrics"

# Trading session states (pipeline.session.State); duplicated as names so health works even
# if that module changes shape.
TRADING_STATES = {0: "DISCONNECTED", 1: "CONNECTING", 2: "AUTHENTICATING", 3: "READY",
                  4: "RECONNECTING", 5: "FAILED"}  # fmt: skip

# Field-name fallbacks: the first present wins (metrics blocks are owned by other modules).
FRAME_TIME_FIELDS = ("last_frame_ns", "last_recv_ns", "last_message_ns", "last_frame_time_ns")
RTT_FIELDS = ("last_rtt_us", "rtt_us", "rtt_smoothed_us")
RECONNECT_FIELDS = ("reconnects", "reconnects_total", "reconnect_attempts")

PROBLEM_PREFIX = "problem_"
HEARTBEAT_FIELD = "heartbeat_interval_ms"
# A heartbeat block is stale after this many intervals, and never sooner than the floor: one
# missed flush (GC pause, a busy box) must not flap the verdict.
HEARTBEAT_MISSES = 3
HEARTBEAT_FLOOR_S = 2.0


def component_name(block: str, prefix: str = BLOCK_PREFIX) -> str:
    """``pipeline.trading.metrics`` -> ``trading``; ``pipeline.persist.metrics`` -> ``persist``."""
    name = block[len(prefix) :] if block.startswith(prefix) else block
    return name[: -len(".metrics")] if name.endswith(".metrics") else name


def _first(snap: Mapping[str, Any], names: Iterable[str]) -> Any:
    for n in names:
        if n in snap:
            return snap[n]
    return None


def _number(v: Any) -> float | None:
    """A finite number from a snapshot field, else None (a torn or NaN field is not a verdict)."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float) and math.isfinite(v):
        return float(v)
    return None


def problem_fields(fields: Mapping[str, Any]) -> list[str]:
    """``problem_<x>`` fields with a non-zero value, as ``"<x>=<value>"`` problems."""
    out = []
    for k, v in fields.items():
        if k.startswith(PROBLEM_PREFIX) and len(k) > len(PROBLEM_PREFIX):
            num = _number(v)
            if num is None or num != 0:  # NaN/inf in a problem field is a problem too
                out.append(f"{k[len(PROBLEM_PREFIX) :]}={_fmt(v)}")
    return out


def heartbeat_problem(snap: Mapping[str, Any], now_ns: int) -> tuple[float | None, str | None]:
    """(age in s, problem or None) for a block that publishes ``heartbeat_interval_ms`` > 0;
    (None, None) when it does not (no heartbeat promised, no staleness rule)."""
    interval_ms = _number(snap.get(HEARTBEAT_FIELD))
    if interval_ms is None or interval_ms <= 0:
        return None, None
    updated = snap.get("_updated_at_ns")
    limit_s = max(HEARTBEAT_MISSES * interval_ms / 1000.0, HEARTBEAT_FLOOR_S)
    if not isinstance(updated, int) or updated <= 0:
        return None, "metrics never updated: process stalled"
    age_s = (now_ns - updated) / 1e9
    if age_s > limit_s:
        return age_s, f"metrics not updated for {age_s:.1f} s: process stalled"
    return age_s, None


def evaluate(
    blocks: Mapping[str, Mapping[str, Any]],
    rings: Mapping[str, Mapping[str, Any] | None],
    now_ns: int,
    *,
    expect: Iterable[str] = (),
    max_frame_age_s: float = 10.0,
    prefix: str = BLOCK_PREFIX,
    refused: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Pure verdict. ``blocks``: block name -> snapshot (with ``_writer_alive`` and
    ``_updated_at_ns``); ``rings``: ring name -> ring_stats dict (None when the ring does not
    exist); ``refused``: segment name -> why the trust rule refused to open it."""
    out: dict[str, Any] = {}
    for name, why in sorted((refused or {}).items()):
        out[f"segment:{name}"] = {"healthy": False, "problems": [f"refused: {why}"]}
    for block, snap in sorted(blocks.items()):
        comp = component_name(block, prefix)
        fields = {k: v for k, v in snap.items() if not k.startswith("_")}
        alive = bool(snap.get("_writer_alive", True))
        problems: list[str] = []
        entry: dict[str, Any] = {"block": block, "writer_alive": alive,
                                 "updated_at_ns": snap.get("_updated_at_ns")}  # fmt: skip
        if not alive:
            problems.append("writer process is dead")
        age_s, stale = heartbeat_problem(snap, now_ns)
        if age_s is not None:
            entry["metrics_age_s"] = round(age_s, 3)
        if stale and alive:  # a dead writer is already the better explanation
            problems.append(stale)
        if comp == "trading":
            code = int(fields.get("state", -1))
            state = TRADING_STATES.get(code, f"UNKNOWN({code})")
            entry.update(
                state=state,
                reconnects=_first(fields, RECONNECT_FIELDS) or 0,
                last_rtt_us=_first(fields, RTT_FIELDS),
                orders_unknown=fields.get("orders_unknown", 0),
            )
            entry["orders_unknown_total"] = entry["orders_unknown"]
            in_doubt = _first(fields, ("orders_in_doubt", "orders_unknown_now"))
            if in_doubt is not None:
                entry["orders_in_doubt"] = in_doubt
                entry["orders_unknown_now"] = in_doubt  # the older name, for existing readers
            if state != "READY":
                problems.append(f"session state {state}, not READY")
        elif comp == "ingest":
            last = _first(fields, FRAME_TIME_FIELDS)
            if last is not None:
                age = (now_ns - int(last)) / 1e9 if last else math.inf
                entry["last_frame_age_s"] = round(age, 3) if math.isfinite(age) else None
                if age > max_frame_age_s:
                    problems.append("no frame yet" if not last else f"last frame {age:.1f}s ago")
        problems.extend(problem_fields(fields))
        entry["metrics"] = fields
        entry["problems"] = problems
        entry["healthy"] = not problems
        out[comp] = entry
    for ring, stats in rings.items():
        key = f"ring:{ring}"
        if stats is None:
            out[key] = {"healthy": False, "problems": ["ring does not exist"], "readers": []}
            continue
        problems = (
            [] if stats.get("writer_alive") else [f"writer pid {stats.get('writer_pid')} is dead"]
        )
        out[key] = {
            "healthy": not problems,
            "problems": problems,
            "writer_pid": stats.get("writer_pid"),
            "writer_alive": bool(stats.get("writer_alive")),
            "generation": stats.get("generation"),
            "cursor": stats.get("cursor"),
            "capacity": stats.get("capacity"),
            "readers": [
                {k: r.get(k) for k in ("name", "pid", "lag", "missed")}
                for r in stats.get("readers", [])
            ],
        }
    for comp in expect:
        if comp not in out:
            out[comp] = {"healthy": False, "problems": ["not running (no metrics block)"]}
    return out


def bridge_components(bridge: Any) -> list[str]:
    """The NATS bridge components a config runs (``[bridge]``), by the names their metrics
    blocks give them: ``bridge.publish.<stream>``, ``bridge.mirror.<ring>``."""
    out = [f"bridge.publish.{bridge.stream}"] if bridge.publish else []
    return out + ([f"bridge.mirror.{bridge.mirror_ring}"] if bridge.mirror_ring else [])


def overall(report: Mapping[str, Any]) -> bool:
    return all(v.get("healthy", False) for v in report.values())


def collect(
    rings: Iterable[str] = (TICK_RING,),
    *,
    expect: Iterable[str] = (),
    max_frame_age_s: float = 10.0,
    prefix: str = BLOCK_PREFIX,
    now_ns: Callable[[], int] = time.time_ns,
) -> dict[str, Any]:
    """Read shared memory and :func:`evaluate` it."""
    from pipeline.ipc.segments import RingError, ring_stats

    blocks, refused = snapshot_blocks(prefix)
    ring_info: dict[str, Mapping[str, Any] | None] = {}
    for ring in rings:
        try:
            ring_info[ring] = ring_stats(ring)
        except (RingError, FileNotFoundError, OSError):
            ring_info[ring] = None
    return evaluate(
        blocks, ring_info, now_ns(), expect=expect, max_frame_age_s=max_frame_age_s,
        prefix=prefix, refused=refused,
    )  # fmt: skip


def untrusted_segments(prefix: str = BLOCK_PREFIX) -> dict[str, str]:
    """Names under ``prefix`` that the shared-memory trust rule refuses, with the reason.

    Why health looks: a scanner skips such a name silently (logged once in *its* log), so a
    file planted by another uid, or - the common operator mistake - ``pipeline health`` run as
    a different user than the services (every segment then belongs to someone else), would
    otherwise show as components "not running" with no hint why. One open per name, no retry.
    """
    from pipeline.ipc import shm

    out: dict[str, str] = {}
    for name in shm.list_names(prefix):
        try:
            fd, _st = shm.open_trusted(shm.path_of(name), os.O_RDONLY)
        except shm.UntrustedSegmentError as exc:
            out[name] = exc.reason
        except (OSError, ValueError):
            continue  # vanished or unreadable for an ordinary reason: not a trust question
        else:
            os.close(fd)
    return out


def snapshot_blocks(prefix: str = BLOCK_PREFIX) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(snapshots, refused) of every metrics block under ``prefix``.

    Unlike :func:`pipeline.ipc.metrics.snapshot_all`, a block that cannot be opened or read is not
    silently dropped: the shared-memory trust rule refusing it (foreign owner, wrong mode, not
    a regular file) or a writer that died mid-update comes back in ``refused`` with the reason,
    so health reports it once per run instead of showing a component as merely absent. A block
    that vanished between listing and attaching is skipped (its process just exited).
    """
    from pipeline.ipc.metrics import (
        MetricsBlock,
        MetricsBusyError,
        MetricsError,
        MetricsNotFoundError,
        list_blocks,
    )

    blocks: dict[str, dict[str, Any]] = {}
    refused = untrusted_segments(prefix)
    for name in list_blocks(prefix):
        try:
            block = MetricsBlock.attach(name)
        except (MetricsNotFoundError, FileNotFoundError):
            continue
        except (MetricsError, OSError) as exc:
            refused[name] = str(exc)
            continue
        try:
            snap: dict[str, Any] = dict(block.snapshot())
            snap["_writer_alive"] = block.writer_alive()
            blocks[name] = snap
        except MetricsBusyError as exc:
            refused[name] = str(exc)
        finally:
            block.close()
    return blocks, refused


# ------------------------------------------------------------------------------------------------
# rendering


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) < 1e12 else f"{v:.0f}"
    return str(v)


def render_text(report: Mapping[str, Any]) -> str:
    lines = []
    for comp, e in report.items():
        flag = "OK  " if e.get("healthy") else "FAIL"
        head = f"{flag} {_printable(comp):<24}"
        if comp == "trading" and "state" in e:
            detail = (
                f"state={e['state']} reconnects={_fmt(e['reconnects'])} "
                f"last_rtt_us={_fmt(e['last_rtt_us'])} orders_unknown={_fmt(e['orders_unknown'])}"
            )
            if "orders_in_doubt" in e:
                detail += f" orders_in_doubt={_fmt(e['orders_in_doubt'])}"
        elif comp.startswith("ring:") and "cursor" in e:
            readers = ", ".join(
                f"{_printable(r['name'])}(lag {r['lag']}, missed {r['missed']})"
                for r in e["readers"]
            )
            detail = (
                f"writer {e['writer_pid']} gen {e['generation']} cursor {e['cursor']}"
                f" readers: {readers or 'none'}"
            )
        elif comp == "ingest" and "last_frame_age_s" in e:
            detail = f"last frame {e['last_frame_age_s']}s ago"
        else:
            detail = ""
        if e.get("metrics"):
            extra = " ".join(f"{k}={_fmt(v)}" for k, v in e["metrics"].items())
            detail = f"{detail}  [{extra}]" if detail else f"[{extra}]"
        if e.get("problems"):
            detail += "  PROBLEMS: " + "; ".join(_printable(p) for p in e["problems"])
        lines.append(f"{head} {detail}".rstrip())
    status = "healthy" if overall(report) else "UNHEALTHY"
    lines.append(f"overall: {status}")
    return "\n".join(lines)


def _printable(v: object) -> str:
    """A name from another process for a text line: control characters (a newline could fake
    an extra "OK" line) shown escaped."""
    text = str(v)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def render_prometheus(report: Mapping[str, Any], symbols: Iterable[str] = ()) -> str:
    """Prometheus text exposition of the same report, written by ``prometheus-client``
    (families, units and labels: :mod:`pipeline.ops.prometheus`)."""
    from pipeline.ops.prometheus import render

    return render(report, symbols)


def serve_prometheus(
    port: int,
    make_report: Callable[[], dict[str, Any]],
    host: str = "127.0.0.1",
    symbols: Iterable[str] = (),
) -> Any:
    """Serve ``/metrics`` from a thread; returns the server (``.shutdown()``). Each scrape reads
    shared memory afresh (the library's handler: content negotiation, gzip)."""
    from http.server import ThreadingHTTPServer
    from urllib.parse import urlparse

    from prometheus_client.exposition import MetricsHandler

    from pipeline.ops.prometheus import registry_for

    base: Any = MetricsHandler.factory(registry_for(make_report, symbols))

    class Handler(base):
        def do_GET(self) -> None:
            if urlparse(self.path).path not in ("/metrics", "/"):
                self.send_error(404)
                return
            super().do_GET()

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="prometheus", daemon=True).start()
    return server


# ------------------------------------------------------------------------------------------------
# CLI


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "health",
        help="print every component's health from shared memory (exit 1 if unhealthy)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="one JSON object, a key per component")
    p.add_argument(
        "--prometheus", action="store_true",
        help="print the Prometheus text exposition once (e.g. for node_exporter's textfile "
        "collector) instead of the text view",
    )  # fmt: skip
    p.add_argument("--config", default=None, help="TOML config (ring names, what to expect)")
    p.add_argument("--ring", action="append", default=None, help="ring(s) to inspect (repeatable)")
    p.add_argument(
        "--expect", default=None,
        help="comma-separated components that must be running (default: ingest[,trading])",
    )  # fmt: skip
    p.add_argument("--max-frame-age", type=float, default=10.0, help="ingest staleness limit, s")
    p.add_argument(
        "--serve-prometheus", type=int, default=None, metavar="PORT",
        help="serve the same data as Prometheus text on 127.0.0.1:PORT/metrics until stopped",
    )  # fmt: skip
    p.add_argument("--bind", default="127.0.0.1", help="address for --serve-prometheus")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pipeline.config import load_config_for_cli

    cfg = load_config_for_cli(args.config, "pipeline health")
    if cfg is None:
        return 2
    rings = args.ring or [cfg.ring.name]
    if args.expect is None:
        expect = ["ingest"] + (["trading"] if cfg.trading.enabled else [])
        expect += bridge_components(cfg.bridge)
    else:
        expect = [e.strip() for e in args.expect.split(",") if e.strip()]

    def report() -> dict[str, Any]:
        return collect(
            rings, expect=expect, max_frame_age_s=args.max_frame_age, prefix=cfg.run.shm_prefix
        )

    symbols = list(cfg.ingest.symbols)  # names ingest's symbol ids (the ring's order)
    if args.serve_prometheus is not None:
        server = serve_prometheus(args.serve_prometheus, report, args.bind, symbols)
        host, port = server.server_address[:2]
        print(f"serving Prometheus metrics on http://{host}:{port}/metrics", flush=True)
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
        server.shutdown()
        server.server_close()
        return 0
    rep = report()
    if args.prometheus:
        sys.stdout.write(render_prometheus(rep, symbols))
    elif args.json:
        print(json.dumps(rep, sort_keys=True, default=str))
    else:
        print(render_text(rep))
    return 0 if overall(rep) else 1
