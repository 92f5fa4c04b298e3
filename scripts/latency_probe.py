#!/usr/bin/env python3
"""Attach to a running pipeline's tick ring like any consumer and break latency down by stage.

Stages, per record kind (all wall-clock ns stamps written by ingest into each record):
  exchange->recv   event_time_ns -> recv_time_ns     network + exchange/local clock offset
  recv->publish    recv_time_ns  -> publish_time_ns  our decode + ring write
  publish->seen    publish_time_ns -> time this reader polled it   shared-memory IPC
  end-to-end       event_time_ns -> seen

exchange->recv (and so end-to-end) compares two clocks: the exchange's event time (millisecond
resolution on Binance) and ours. With ``--rest-url`` the probe measures the offset once from
``/api/v3/time`` and adds an ``exchange->recv (offset-corrected)`` row; otherwise it assumes 0 and
says so. Backfilled / snapshot records (flags BACKFILLED, SNAPSHOT) carry old event times and are
counted but left out of the latency figures.

The probe never writes to the ring, so the producer cannot notice it. It waits with the ring's
idle wait of ``--idle`` (default ``balanced``: a 20 us spin, then asleep until the writer's
futex wake-up); ``--idle low-latency,balanced,low-cpu,spin`` measures each policy in turn for
``--seconds`` and reports publish->seen (and the probe's own CPU use) per policy. ``spin``
busy-polls: on a 2-core host it steals the core the producer needs and then measures its own
interference. ``--spin`` is ``--idle spin``.

``--orders N`` also submits N small LIMIT orders through the trading process (far from the market
so they rest, each cancelled right after) and reports submit -> ack and submit -> execution
report, the ack split into our time and wire time from the trading process's stamps. It refuses
unless the trading process talks to a loopback URL (the simulator), or ``--live-i-know`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.ipc.records import TICK_RING

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
PCT_KEYS = ("p50", "p90", "p99", "p99.9", "max")
STAGES = (
    "exchange->recv",
    "exchange->recv (offset-corrected)",
    "recv->publish",
    "publish->seen",
    "end-to-end",
)
ORDER_STAGES = (
    "submit->ack",
    "ack: ours",
    "ack: wire",
    "submit->exec report",
    "exec: ipc",
    "submit->cancel",
)
PENDING_RECORDS = 20_000  # polled records kept before their latencies are computed (in bulk)
REFRESH_POINTS = 50_000  # samples per stage behind the refreshing table (the final one: all)
SKIP_FLAGS = 2 | 4  # Flags.BACKFILLED | Flags.SNAPSHOT (pipeline.records)


# --- sample store ---------------------------------------------------------------------------------


@dataclass
class Reservoir:
    """Uniform sample of an unbounded stream (Vitter's algorithm R, vectorised) plus the exact
    count and max. Percentiles of a long run then weigh its whole length equally, instead of
    only its first minutes, while memory stays flat."""

    limit: int
    rng: np.random.Generator
    buf: np.ndarray = field(init=False)
    size: int = 0
    count: int = 0
    max: float = -math.inf

    def __post_init__(self) -> None:
        self.buf = np.empty(self.limit, dtype=np.float64)

    def add(self, us: np.ndarray) -> None:
        n = int(us.size)
        if n == 0:
            return
        self.max = max(self.max, float(us.max()))
        room = self.limit - self.size
        take = min(room, n)
        if take:
            self.buf[self.size : self.size + take] = us[:take]
            self.size += take
        rest = us[take:]
        if rest.size:
            # item with global index i (0-based) replaces a random slot with probability limit/(i+1)
            idx = np.arange(self.count + take, self.count + n, dtype=np.float64) + 1.0
            slots = (self.rng.random(rest.size) * idx).astype(np.int64)
            keep = slots < self.limit
            self.buf[slots[keep]] = rest[keep]
        self.count += n

    def values(self) -> np.ndarray:
        return self.buf[: self.size]


@dataclass
class StageSamples:
    """Bounded sample store (us) per (kind, stage): memory stays flat on long runs."""

    limit: int = 500_000
    seed: int = 0
    reservoirs: dict[tuple[str, str], Reservoir] = field(default_factory=dict)

    def add(self, kind: str, stage: str, us: np.ndarray) -> None:
        if us.size == 0:
            return
        key = (kind, stage)
        res = self.reservoirs.get(key)
        if res is None:
            res = self.reservoirs[key] = Reservoir(self.limit, np.random.default_rng(self.seed))
        res.add(np.asarray(us, dtype=np.float64))

    def summary(self, max_points: int | None = None) -> dict[str, dict[str, dict[str, float]]]:
        """Percentiles per kind and stage. ``max_points`` caps the samples used (the refreshing
        table uses a prefix of each reservoir, itself a uniform sample, to stay cheap)."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for (kind, stage), res in sorted(self.reservoirs.items()):
            s = summarize(res.values()[:max_points], res.count)
            s["max"] = res.max  # exact, not the sample's
            out.setdefault(kind, {})[stage] = s
        return out

    def arrays(self) -> dict[tuple[str, str], np.ndarray]:
        return {k: r.values() for k, r in self.reservoirs.items()}


def summarize(us: np.ndarray, count: int | None = None) -> dict[str, float]:
    """Percentiles of one stage in microseconds; ``count`` is how many were seen (maybe > kept)."""
    if us.size == 0:
        return {"count": 0}
    pct = np.percentile(us, PERCENTILES)
    result = {f"p{p:g}": float(v) for p, v in zip(PERCENTILES, pct, strict=True)}
    result["max"] = float(us.max())
    result["count"] = float(count if count is not None else us.size)
    return result


# --- stage math -----------------------------------------------------------------------------------


def stage_latencies(
    batch: np.ndarray, seen_ns: int, offset_ms: float | None = None
) -> dict[str, np.ndarray]:
    """Per-stage latencies (us) for one polled batch; records without a stamp are left out.

    ``offset_ms`` is exchange clock minus local clock: event times are shifted by it to get the
    corrected network stage (a record stamped E by the exchange happened at E - offset locally).
    """
    ev = batch["event_time_ns"]
    rv = batch["recv_time_ns"]
    pb = batch["publish_time_ns"]
    has_ev = ev > 0
    has_rv = rv > 0
    has_pb = pb > 0
    net = (rv[has_ev & has_rv] - ev[has_ev & has_rv]) / 1e3
    out = {
        "exchange->recv": net,
        "recv->publish": (pb[has_rv & has_pb] - rv[has_rv & has_pb]) / 1e3,
        "publish->seen": (seen_ns - pb[has_pb]) / 1e3,
        "end-to-end": (seen_ns - ev[has_ev]) / 1e3,
    }
    if offset_ms is not None:
        out["exchange->recv (offset-corrected)"] = net + offset_ms * 1e3
    return out


def split_batch(
    batch: np.ndarray, names: dict[int, str]
) -> tuple[list[tuple[str, np.ndarray]], int]:
    """(kind name, live records of that kind) per kind present, and how many records were left
    out of the latency figures because they are backfilled or snapshot records."""
    skip = (batch["flags"] & SKIP_FLAGS) != 0
    n_skip = int(skip.sum())
    live = batch[~skip] if n_skip else batch
    kinds = live["kind"]
    out = []
    for kind_id in np.unique(kinds):
        out.append((names.get(int(kind_id), f"kind{int(kind_id)}"), live[kinds == kind_id]))
    return out, n_skip


def kind_names() -> dict[int, str]:
    from pipeline.ipc.records import Kind

    return {int(k): k.name.lower() for k in Kind}


@dataclass(frozen=True)
class AckTimes:
    """Stage split of one order's round trip (us); None where a stamp is missing."""

    submit_ack: float
    ours: float | None
    wire: float | None


def ack_split(
    submit_ns: int, sent_ns: int, reply_ns: int, publish_ns: int, seen_ns: int
) -> AckTimes:
    """submit -> ack seen by us, split into our time (order ring + trading process before the
    socket, after the reply, exec ring) and wire time (socket -> reply: network + exchange).

    All stamps are this host's wall clock, so no clock offset enters."""
    total = (seen_ns - submit_ns) / 1e3
    if sent_ns > 0 and reply_ns >= sent_ns and submit_ns > 0:
        wire = (reply_ns - sent_ns) / 1e3
        return AckTimes(total, total - wire, wire)
    return AckTimes(total, None, None)


# --- output ---------------------------------------------------------------------------------------


def format_table(
    summary: dict[str, dict[str, dict[str, float]]],
    header: str,
    stages: Sequence[str] = STAGES,
) -> str:
    lines = [header, f"{'kind':<12} {'stage':<34} {'count':>9} "
             + " ".join(f"{name:>9}" for name in PCT_KEYS) + "   (us)"]
    for kind, by_stage in summary.items():
        for stage in stages:
            s = by_stage.get(stage)
            if not s or not s.get("count"):
                continue
            cells = " ".join(f"{s[k]:>9.1f}" for k in PCT_KEYS)
            lines.append(f"{kind:<12} {stage:<34} {int(s['count']):>9} {cells}")
    return "\n".join(lines)


def write_plot(samples: StageSamples, path: str, title: str = "") -> bool:
    """Latency CDF per stage (all kinds pooled); matplotlib is an optional extra.
    Returns False (and says why on stderr) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install '.[bench]')", file=sys.stderr)
        return False
    pooled: dict[str, list[np.ndarray]] = {}
    for (_kind, stage), arr in samples.arrays().items():
        pooled.setdefault(stage, []).append(arr)
    panels: list[tuple[str, Sequence[str]]] = [("market data (all kinds pooled)", STAGES)]
    if any(stage in pooled for stage in ORDER_STAGES):
        panels.append(("orders", ORDER_STAGES))
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 5), squeeze=False)
    for ax, (name, stages) in zip(axes[0], panels, strict=True):
        for stage in stages:
            if stage not in pooled:
                continue
            arr = np.sort(np.concatenate(pooled[stage]))
            arr = arr[arr > 0]  # log axis; negative offsets show in the table, not here
            if arr.size == 0:
                continue
            ax.plot(arr, np.linspace(0, 1, arr.size), label=stage, drawstyle="steps-post")
        ax.set_xscale("log")
        ax.set_xlabel("latency (us, log scale)")
        ax.set_ylabel("fraction")
        ax.set_title(f"{title or 'pipeline latency'}: {name} (CDF)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def fmt_offset(offset_ms: float | None) -> str:
    return "assumed 0 (not measured)" if offset_ms is None else f"{offset_ms:.3f} ms (measured)"


# --- clock offset ---------------------------------------------------------------------------------


def measure_clock_offset_ms(rest_url: str | None, tries: int = 5) -> float | None:
    """Exchange clock minus local clock (ms) from /api/v3/time: the midpoint of the round trip,
    taken from the fastest of ``tries`` round trips (least queueing, least asymmetry)."""
    if not rest_url:
        return None
    import urllib.request

    best: tuple[int, float] | None = None
    for _ in range(tries):
        t0 = time.time_ns()
        with urllib.request.urlopen(rest_url.rstrip("/") + "/api/v3/time", timeout=5) as resp:
            server_ms = json.loads(resp.read())["serverTime"]
        t1 = time.time_ns()
        rtt = t1 - t0
        if best is None or rtt < best[0]:
            best = (rtt, float(server_ms - (t0 + t1) / 2e6))
    assert best is not None
    return best[1]


# --- orders ---------------------------------------------------------------------------------------

LOOPBACK_HOSTS = ("localhost", "ip6-localhost")


def is_loopback_host(host: str) -> bool:
    import ipaddress

    host = host.strip("[]").lower()
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or ""


def trading_venue(cmdline: Sequence[str]) -> str:
    """The WS API URL a ``pipeline trade`` command line talks to ("" = its production default,
    "testnet" for ``--testnet``)."""
    args = list(cmdline)
    for i, a in enumerate(args):
        if a == "--wsapi-url" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--wsapi-url="):
            return a.split("=", 1)[1]
    return "testnet" if "--testnet" in args else ""


@dataclass(frozen=True)
class VenueCheck:
    loopback: bool
    why: str


def check_trading_venue(pid: int) -> VenueCheck:
    """Is the trading process ``pid`` connected to a loopback venue (the simulator)?

    Two independent looks, both must say loopback: its configured URL (command line) and the
    remote ends of its open TCP connections. Anything unknown counts as "not loopback"."""
    import psutil

    try:
        proc = psutil.Process(pid)
        cmd = proc.cmdline()
    except (psutil.Error, OSError) as exc:
        return VenueCheck(False, f"cannot inspect trading process {pid}: {exc}")
    url = trading_venue(cmd)
    if not url or url == "testnet":
        return VenueCheck(False, f"trading process {pid} uses the {url or 'production'} venue")
    if not is_loopback_host(url_host(url)):
        return VenueCheck(False, f"trading process {pid} talks to {url_host(url)!r}")
    try:
        conns = proc.net_connections(kind="inet")
    except (psutil.Error, OSError):
        conns = []
    remote = sorted({c.raddr.ip for c in conns if c.raddr})
    foreign = [ip for ip in remote if not is_loopback_host(ip)]
    if foreign:
        return VenueCheck(False, f"trading process {pid} has connections to {foreign}")
    return VenueCheck(True, f"trading process {pid} talks to {url} (loopback)")


READY = 3  # pipeline.session.State.READY


def wait_trading_ready(
    exec_ring: str, metrics_name: str, timeout_s: float
) -> tuple[int, dict[str, int | float]]:
    """Wait for the trading process: its execution ring (whose writer pid is the process to
    check) and, when its metrics block exists, session state READY. Returns (pid, metrics)."""
    from pipeline.ipc.metrics import MetricsBlock, MetricsError
    from pipeline.ipc.ring import RingError, ring_stats

    deadline = time.monotonic() + timeout_s
    why = ""
    while True:
        try:
            stats = ring_stats(exec_ring)
            if stats["writer_alive"]:
                try:
                    block = MetricsBlock.attach(metrics_name)
                except (MetricsError, OSError):
                    return int(stats["writer_pid"]), {}  # no block: the warm-up request decides
                try:
                    snap = block.snapshot()
                finally:
                    block.close()
                if int(snap.get("state", READY)) == READY:
                    return int(stats["writer_pid"]), snap
                why = f"trading session state {int(snap['state'])} (3 = ready)"
            else:
                why = f"execution ring {exec_ring!r} has no live writer"
        except (RingError, OSError):
            why = f"execution ring {exec_ring!r} not found: is `pipeline trade` running?"
        if time.monotonic() >= deadline:
            raise RuntimeError(why)
        time.sleep(0.05)


@dataclass(frozen=True)
class SymbolRules:
    tick: float = 0.01
    step: float = 0.00001
    min_qty: float = 0.00001
    min_notional: float = 5.0


def fetch_rules(rest_url: str | None, symbol: str) -> SymbolRules:
    """PRICE_FILTER / LOT_SIZE / NOTIONAL of ``symbol`` from exchangeInfo, or defaults."""
    if not rest_url:
        return SymbolRules()
    import urllib.request

    url = f"{rest_url.rstrip('/')}/api/v3/exchangeInfo?symbol={symbol}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        info = json.loads(resp.read())
    vals: dict[str, float] = {}
    for f in info["symbols"][0]["filters"]:
        if f["filterType"] == "PRICE_FILTER":
            vals["tick"] = float(f["tickSize"])
        elif f["filterType"] == "LOT_SIZE":
            vals["step"] = float(f["stepSize"])
            vals["min_qty"] = float(f["minQty"])
        elif f["filterType"] in ("NOTIONAL", "MIN_NOTIONAL"):
            vals["min_notional"] = float(f.get("minNotional", 5.0))
    return SymbolRules(**vals)


def resting_order(ref_price: float, rules: SymbolRules, below: float = 0.05) -> tuple[float, float]:
    """(price, qty) of the smallest BUY that rests ``below`` under the reference price: on the
    tick grid, on the step grid, above min qty and min notional (with 10% margin)."""
    if ref_price <= 0:
        raise ValueError("no reference price for the order symbol (pass --order-price)")
    price = math.floor(ref_price * (1 - below) / rules.tick) * rules.tick
    price = round(price, 10)
    qty = math.ceil(rules.min_notional * 1.1 / price / rules.step) * rules.step
    qty = round(max(qty, rules.min_qty), 10)
    return price, qty


def last_price(batch: np.ndarray, symbol_id: int) -> float:
    """Latest bid or trade price of ``symbol_id`` in a batch (0 if none)."""
    recs = batch[batch["symbol"] == symbol_id]
    for r in recs[::-1]:
        px = float(r["bid_price"]) or float(r["price"])
        if px > 0:
            return px
    return 0.0


def run_orders(
    args: argparse.Namespace, ref_price: float, samples: StageSamples, log: Callable[[str], None]
) -> dict[str, Any]:
    """Submit ``args.orders`` resting orders one at a time, cancel each, time every answer."""
    from pipeline.trading.client import CANCEL_ANSWERS, OrderClient

    pid, snap = wait_trading_ready(args.exec_ring, args.trading_metrics,
                                   max(args.attach_wait, args.order_timeout))
    venue = check_trading_venue(pid)
    if venue.loopback and snap.get("venue_loopback", 1) == 0:
        venue = VenueCheck(False, f"trading metrics {args.trading_metrics!r} say not loopback")
    if not venue.loopback and not args.live_i_know:
        raise SystemExit(
            f"latency_probe: refusing to send orders: {venue.why}. "
            "--orders is for the simulator; add --live-i-know to send real orders."
        )
    log(f"orders: {venue.why}")
    if args.order_price:
        price, qty = args.order_price, args.order_qty or 0.0
        if not qty:
            _p, qty = resting_order(price / 0.95, fetch_rules(args.rest_url, args.order_symbol))
    else:
        rules = fetch_rules(args.rest_url, args.order_symbol)
        price, qty = resting_order(ref_price, rules)
        qty = args.order_qty or qty
    out: dict[str, Any] = {
        "venue": venue.why, "symbol": args.order_symbol, "price": price, "qty": qty,
        "sent": 0, "acked": 0, "rejected": 0, "exec_reports": 0, "errors": [],
    }  # fmt: skip
    ack_kinds = frozenset({"ACK", "REJECT"})
    exec_kinds = frozenset({"NEW", "TRADE", "CANCELED", "EXPIRED"})
    outstanding: set[str] = set()  # placed and not yet known cancelled: cancelled on the way out
    with OrderClient.attach(f"probe{os.getpid()}", exec_ring=args.exec_ring) as oc:
        try:
            # Untimed warm-up: the trading process finds a new order ring on its next /dev/shm scan
            # (up to its scan interval), which would otherwise land in the first order's latency.
            # A status query for an id that does not exist is answered (with an error) without
            # touching any order.
            warm = oc.status(f"probewarmup{os.getpid()}", symbol=args.order_symbol)
            try:
                oc.wait(warm, timeout=args.order_timeout)
            except TimeoutError:
                raise RuntimeError(
                    f"the trading process did not answer within {args.order_timeout} s "
                    f"(exec ring {args.exec_ring!r}): is its session connected?"
                ) from None
            for _ in range(args.orders):
                coid = oc.place(symbol=args.order_symbol, side="BUY", type="LIMIT", qty=qty,
                                price=price, tif="GTC")
                out["sent"] += 1
                outstanding.add(coid)
                try:
                    ack = oc.wait(coid, timeout=args.order_timeout, kinds=ack_kinds)
                except TimeoutError as exc:
                    out["errors"].append(str(exc))
                    continue
                seen_ack = time.time_ns()
                if ack.kind == "REJECT":
                    outstanding.discard(coid)
                    out["rejected"] += 1
                    out["errors"].append(f"{ack.error_code} {ack.error_msg}")
                    continue
                out["acked"] += 1
                t = ack_split(ack.submit_time_ns, ack.sent_time_ns, ack.reply_time_ns,
                              ack.publish_time_ns, seen_ack)
                samples.add("order", "submit->ack", np.array([t.submit_ack]))
                if t.ours is not None and t.wire is not None:
                    samples.add("order", "ack: ours", np.array([t.ours]))
                    samples.add("order", "ack: wire", np.array([t.wire]))
                try:
                    rep = next((r for r in oc.reports(coid) if r.kind in exec_kinds), None)
                    if rep is None:
                        rep = oc.wait(coid, timeout=args.order_timeout, kinds=exec_kinds)
                    seen_rep = max(time.time_ns(), seen_ack)
                    out["exec_reports"] += 1
                    samples.add("order", "submit->exec report",
                                np.array([(seen_rep - rep.submit_time_ns) / 1e3]))
                    if rep.publish_time_ns > 0:
                        samples.add("order", "exec: ipc",
                                    np.array([(seen_rep - rep.publish_time_ns) / 1e3]))
                except TimeoutError:
                    out["errors"].append(f"no execution report for {coid}")
                t_cancel = time.time_ns()
                oc.cancel(coid, symbol=args.order_symbol)
                try:
                    oc.wait(coid, timeout=args.order_timeout, kinds=CANCEL_ANSWERS)
                    samples.add("order", "submit->cancel",
                                np.array([(time.time_ns() - t_cancel) / 1e3]))
                    outstanding.discard(coid)
                except TimeoutError:
                    out["errors"].append(f"cancel of {coid} unanswered")
                if args.order_interval > 0:
                    time.sleep(args.order_interval)  # pacing against exchange order rate limits
        finally:
            for coid in outstanding:  # timed out, failed or interrupted: never leave one resting
                with contextlib.suppress(Exception):
                    oc.cancel(coid, symbol=args.order_symbol)
                    oc.wait(coid, timeout=args.order_timeout, kinds=CANCEL_ANSWERS)
        out["exec_missed"] = int(oc.missed)
    out["errors"] = out["errors"][:20]
    return out


# --- main loop ------------------------------------------------------------------------------------


IDLE_CHOICES = ("low-latency", "balanced", "low-cpu", "spin")


def idle_policies(arg: str, spin: bool) -> list[str]:
    """The ``--idle`` list, checked (``--spin`` alone means ``spin``)."""
    if spin:
        return ["spin"]
    out = [p.strip() for p in arg.split(",") if p.strip()]
    bad = [p for p in out if p not in IDLE_CHOICES]
    if bad or not out:
        raise ValueError(f"--idle takes a comma list of {', '.join(IDLE_CHOICES)}; got {arg!r}")
    return out


@dataclass
class Phase:
    """What one reader (one idle policy) saw; :func:`probe` sums phases."""

    policy: str
    samples: StageSamples
    counts: dict[str, int] = field(default_factory=dict)
    received: int = 0
    excluded: int = 0
    missed: int = 0
    resyncs: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    order_ref: float = 0.0
    interrupted: bool = False


def measure(args: argparse.Namespace, policy: str, seconds: float, offset_ms: float | None,
            combined: StageSamples, order_symbol: str | None) -> Phase:
    """Read the ring for ``seconds`` as a reader of idle ``policy``; samples go into the
    phase's own store and into ``combined``."""
    from pipeline.ipc.ring import RingReader

    names = kind_names()
    reader = RingReader.attach(args.ring, name="latency-probe", wait_s=args.attach_wait,
                               idle="balanced" if policy == "spin" else policy)
    ph = Phase(policy, StageSamples(limit=args.max_samples))
    order_sid = (reader.symbols.index(order_symbol)
                 if order_symbol is not None and order_symbol in reader.symbols else -1)
    spin = policy == "spin"
    tty = sys.stdout.isatty()
    start = time.monotonic()
    cpu0 = time.process_time()
    last_print = start
    next_print = start + args.refresh
    deadline = start + seconds
    interval_received = 0
    wait = reader.wait
    poll = reader.poll
    # Batches wait here, stamped, and are turned into latencies in bulk (every refresh, or
    # every PENDING_RECORDS): per-batch numpy work (~100 us) right after each poll would keep
    # the probe from polling again, and the rest of a burst would seem to wait in the ring for
    # what was really the probe's own processing.
    pending: list[tuple[np.ndarray, int]] = []
    pending_n = 0

    def digest() -> None:
        nonlocal pending_n
        for batch, seen_ns in pending:
            per_kind, n_skip = split_batch(batch, names)
            ph.excluded += n_skip
            for kind, sub in per_kind:
                ph.counts[kind] = ph.counts.get(kind, 0) + int(sub.size)
                for stage, us in stage_latencies(sub, seen_ns, offset_ms).items():
                    ph.samples.add(kind, stage, us)
                    combined.add(kind, stage, us)
            if order_sid >= 0:
                ph.order_ref = last_price(batch, order_sid) or ph.order_ref
        pending.clear()
        pending_n = 0

    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            if args.refresh > 0 and now >= next_print:
                digest()
                rate = interval_received / max(now - last_print, 1e-9)
                table = format_table(
                    ph.samples.summary(REFRESH_POINTS),
                    f"[{policy} {now - start:5.1f}s] {ph.received} records, {rate:,.0f}/s now, "
                    f"missed {reader.missed}, clock offset {fmt_offset(offset_ms)}",
                )
                print(("\x1b[2J\x1b[H" + table) if tty else (table + "\n"), flush=True)
                last_print, next_print, interval_received = now, now + args.refresh, 0
            until = min(deadline, next_print) if args.refresh > 0 else deadline
            if not wait(max(0.0, until - now), spin=spin):
                continue
            batch = poll()
            if batch.size == 0:
                continue
            pending.append((batch, time.time_ns()))
            pending_n += int(batch.size)
            ph.received += int(batch.size)
            interval_received += int(batch.size)
            if pending_n >= PENDING_RECORDS:
                digest()
    except KeyboardInterrupt:  # Ctrl-C ends the measurement early; still report it
        ph.interrupted = True
    finally:
        digest()
        ph.seconds = time.monotonic() - start
        ph.cpu_s = time.process_time() - cpu0
        ph.missed, ph.resyncs = int(reader.missed), int(reader.resyncs)
        reader.close()
    return ph


def probe(args: argparse.Namespace) -> dict[str, Any]:
    policies = idle_policies(args.idle, args.spin)
    samples = StageSamples(limit=args.max_samples)
    offset_ms = measure_clock_offset_ms(args.rest_url)
    if args.orders and not args.order_symbol:
        from pipeline.ipc.ring import RingReader

        with RingReader.attach(args.ring, name="latency-probe", wait_s=args.attach_wait) as r:
            args.order_symbol = r.symbols[0] if r.symbols else "BTCUSDT"
    phases: list[Phase] = []
    for policy in policies:
        phases.append(measure(args, policy, args.seconds, offset_ms, samples,
                              args.order_symbol if args.orders else None))
        if phases[-1].interrupted:
            break
    counts: dict[str, int] = {}
    for ph in phases:
        for k, v in ph.counts.items():
            counts[k] = counts.get(k, 0) + v
    received = sum(ph.received for ph in phases)
    excluded = sum(ph.excluded for ph in phases)
    order_ref = next((ph.order_ref for ph in reversed(phases) if ph.order_ref), 0.0)
    elapsed = sum(ph.seconds for ph in phases)
    orders: dict[str, Any] | None = None
    if args.orders:
        if args.order_price is None and order_ref <= 0:
            raise RuntimeError(
                f"no price for {args.order_symbol} seen on ring {args.ring!r} "
                "(pass --order-price)"
            )
        orders = run_orders(args, order_ref, samples, lambda m: print(m, file=sys.stderr))
    summary = samples.summary()
    result: dict[str, Any] = {
        "ring": args.ring,
        "seconds": elapsed,
        "records": received,
        "rate_per_s": received / elapsed if elapsed > 0 else 0.0,
        "records_by_kind": counts,
        "rate_by_kind_per_s": {k: v / elapsed for k, v in counts.items()} if elapsed else {},
        "excluded_backfill_snapshot": excluded,
        "missed": sum(ph.missed for ph in phases),
        "resyncs": sum(ph.resyncs for ph in phases),
        "clock_offset_ms": offset_ms,
        "clock_offset_assumed_ms": offset_ms if offset_ms is not None else 0.0,
        "clock_offset_note": (
            "exchange->recv and end-to-end include the exchange/local clock offset and the "
            "exchange's 1 ms stamp resolution; "
            + ("offset measured from /api/v3/time (fastest of 5 round trips)"
               if offset_ms is not None else "offset not measured (pass --rest-url), assumed 0")
        ),
        "latency_us": {k: v for k, v in summary.items() if k != "order"},
        "by_idle": {
            ph.policy: {
                "seconds": ph.seconds,
                "records": ph.received,
                "missed": ph.missed,
                "probe_cpu_pct": 100.0 * ph.cpu_s / ph.seconds if ph.seconds > 0 else 0.0,
                "latency_us": ph.samples.summary(),
            }
            for ph in phases
        },
    }
    if orders is not None:
        orders["latency_us"] = summary.get("order", {})
        result["orders"] = orders
    if args.plot:
        result["plot"] = args.plot if write_plot(samples, args.plot) else None
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ring", default=TICK_RING, help=f"tick ring name (default: {TICK_RING})")
    p.add_argument("--seconds", type=float, default=30.0, help="how long to measure")
    p.add_argument("--json", help="write the raw percentiles to this file")
    p.add_argument("--plot", help="write a latency CDF PNG (needs matplotlib)")
    p.add_argument("--refresh", type=float, default=2.0, help="table refresh period, 0 = off")
    p.add_argument("--idle", default="balanced",
                   help="reader idle policy, or a comma list measured in turn for --seconds "
                        f"each: {', '.join(IDLE_CHOICES)} (default: balanced)")
    p.add_argument("--spin", action="store_true", help="busy-poll: --idle spin")
    p.add_argument("--rest-url", help="measure the clock offset against this REST endpoint")
    p.add_argument("--attach-wait", type=float, default=0.0,
                   help="wait this long (s) for the ring to appear")
    p.add_argument("--max-samples", type=int, default=500_000,
                   help="reservoir size per kind and stage")
    g = p.add_argument_group("orders (through a running `pipeline trade`)")
    g.add_argument("--orders", type=int, default=0, metavar="N",
                   help="after measuring, submit N small resting orders (each cancelled)")
    g.add_argument("--live-i-know", action="store_true",
                   help="allow --orders when the trading process is not on loopback")
    g.add_argument("--exec-ring", default="pipeline.trading.exec")
    g.add_argument("--trading-metrics", default="pipeline.trading.metrics",
                   help="the trading process's metrics block (session state)")
    g.add_argument("--order-symbol", help="default: the tick ring's first symbol")
    g.add_argument("--order-price", type=float, help="default: 5%% under the last bid seen")
    g.add_argument("--order-qty", type=float, help="default: just above min notional")
    g.add_argument("--order-timeout", type=float, default=10.0)
    g.add_argument("--order-interval", type=float, default=0.1, help="pause between orders (s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.orders < 0 or args.seconds < 0 or args.max_samples < 1:
        print("latency_probe: --orders, --seconds must be >= 0, --max-samples >= 1",
              file=sys.stderr)
        return 2
    try:
        result = probe(args)
    except (OSError, RuntimeError, ValueError) as exc:  # a missing ring is the common case
        print(f"latency_probe: {exc}", file=sys.stderr)
        return 1
    print(format_table(
        result["latency_us"],
        f"final: {result['records']} records in {result['seconds']:.1f}s "
        f"({result['rate_per_s']:,.0f}/s), missed {result['missed']}, clock offset "
        f"{fmt_offset(result['clock_offset_ms'])}",
    ))
    if len(result["by_idle"]) > 1:
        for policy, ph in result["by_idle"].items():
            print(format_table(
                ph["latency_us"],
                f"idle {policy}: {ph['records']} records in {ph['seconds']:.1f}s, missed "
                f"{ph['missed']}, probe CPU {ph['probe_cpu_pct']:.1f}% of a core",
                ("recv->publish", "publish->seen"),
            ))
    if "orders" in result:
        o = result["orders"]
        print(format_table(
            {"order": o["latency_us"]},
            f"orders: {o['sent']} sent, {o['acked']} acked, {o['rejected']} rejected, "
            f"{o['exec_reports']} execution reports ({o['symbol']} {o['qty']} @ {o['price']})",
            ORDER_STAGES,
        ))
        for err in o["errors"]:
            print(f"  order error: {err}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
