"""Prometheus exposition of `pipeline health`'s report, through ``prometheus-client``.

Why the library: the text format has rules we kept getting wrong by hand (label escaping, HELP and
TYPE lines, the ``_total`` suffix); the library writes them, its parser reads them back in the
tests, and ``promtool check metrics`` passes. The shared-memory metrics blocks stay the source of
truth: :class:`HealthCollector` reads them at scrape time (through the health report), so nothing
is cached, registered per process or kept in sync.

How a block field becomes a sample (:func:`families`):

* a field this module knows (:data:`FIELDS` per component, or a pattern in :func:`_patterned`)
  becomes its own family with HELP, TYPE (``counter`` only for values that never go down in a
  process's life), base units (``*_ns`` timestamps -> ``*_timestamp_seconds``, ``*_us``/``*_ms``
  durations -> ``*_seconds``) and labels instead of indexes folded into names
  (``conn_state_0`` -> ``pipeline_ingest_connection_state{shard="0"}``,
  ``last_agg_id_0`` -> ``pipeline_ingest_last_agg_trade_id{symbol="BTCUSDT"}``,
  ``s_BTCUSDT__pos`` -> ``pipeline_risk_position{symbol="BTCUSDT"}``);
* what every block may carry is per component: ``problem_<x>`` ->
  ``pipeline_component_problem{component,problem}``, ``heartbeat_interval_ms`` ->
  ``pipeline_component_heartbeat_interval_seconds{component}``, plus the block's writer liveness
  and last update time, and the health verdict;
* any other field (a component this module does not know, a field added after it was written)
  is exposed raw as ``pipeline_component_field{component,field}``: never lost, never breaking
  the naming rules; ``tests/test_prometheus.py`` fails until a known component's new field is
  named here.

One histogram, where a process measures a distribution itself: the trading block's order
round trip (``order_rtt_le_<N>us`` bucket counts and ``order_rtt_sum_us``; the count is their sum;
the bounds are in the field names) -> ``pipeline_trading_order_rtt_seconds``. Elsewhere the
processes publish the last or smoothed value (``rtt_us``, ``last_flush_us``): gauges in
seconds, since a histogram made from one sample per scrape would be invented.
"""

from __future__ import annotations

import math
import platform
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

COUNTER, GAUGE = "counter", "gauge"
# divisors to base units (a division is exact where a multiplication by 1e-6 is not: 5e-06)
NS, US, MS = 1e9, 1e6, 1e3

# the trading session's states (pipeline.trading.session.State), for the enum-style family
TRADING_STATES = ("DISCONNECTED", "CONNECTING", "AUTHENTICATING", "READY", "RECONNECTING",
                  "FAILED")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Family:
    """How one block field is exposed: the family, its type and help, and the factor to base
    units (``1e-9`` for a ``*_ns`` timestamp exposed in seconds)."""

    name: str
    kind: str
    help: str
    divisor: float = 1.0


def _counter(
    comp: str, fld: str, help: str, name: str | None = None, divisor: float = 1.0
) -> tuple[str, Family]:
    base = name or fld
    base = base[: -len("_total")] if base.endswith("_total") else base
    return fld, Family(f"pipeline_{comp}_{base}", COUNTER, help, divisor)


def _gauge(
    comp: str, fld: str, help: str, name: str | None = None, divisor: float = 1.0
) -> tuple[str, Family]:
    return fld, Family(f"pipeline_{comp}_{name or fld}", GAUGE, help, divisor)


def _timestamp(comp: str, fld: str, help: str) -> tuple[str, Family]:
    """``last_frame_ns`` -> ``pipeline_<comp>_last_frame_timestamp_seconds`` (0: never)."""
    stem = fld[: -len("_ns")]
    return fld, Family(f"pipeline_{comp}_{stem}_timestamp_seconds", GAUGE, help + " (0: never)", NS)


_INGEST_COUNTERS = {
    "frames_received": "WebSocket frames received (both paths).",
    "frames_decoded": "Frames decoded into records (received minus skipped and control).",
    "published": "Records published to the tick ring by this process.",
    "control_replies": "Replies to SUBSCRIBE/UNSUBSCRIBE control messages.",
    "control_errors": "Control messages the venue answered with an error.",
    "duplicates": "Records dropped as already published (overlapping connections).",
    "reconnects": "Connections re-opened after a drop.",
    "rotations": "Planned connection rotations (before the venue's 24 h limit).",
    "stalls": "Connections closed because no frame arrived in time.",
    "server_shutdowns": "serverShutdown events from the venue.",
    "connect_failures": "Connection attempts that failed.",
    "gaps_detected": "Holes found in aggregate trade ids.",
    "gaps_backfilled": "Holes filled from REST.",
    "ids_backfilled": "Trade ids recovered from REST.",
    "gaps_unrecoverable": "Holes REST could not fill.",
    "ids_lost": "Aggregate trade ids lost for good.",
    "trade_gaps": "Holes found in @trade ids (reported, not fetched).",
    "trade_ids_lost": "@trade ids lost.",
    "book_resyncs": "Order book snapshots re-fetched.",
    "books_stale": "Times a symbol's depth stopped being current (BOOK_STALE records).",
    "book_breaks": "Depth update sequence breaks.",
    "rest_requests": "REST requests made (backfill, snapshots).",
    "rest_errors": "REST requests that failed.",
    "callback_errors": "Exceptions raised by frame callbacks (logged, frame skipped).",
    "ids_far": "Ids beyond --max-id-jump from their stream's last id (held aside).",
    "id_resets": "Runs of far ids taken as a stream restart (re-based).",
    "publish_errors": "Records the ring refused to pack.",
    "book_levels_trimmed": "Book levels dropped beyond the per-side bound.",
    "frames_fast": "Frames handled by the compiled path without Python.",
    "sbe_other_version_frames": "SBE frames of another schema version, decoded by block lengths.",
    "trades_backfilled": "@trade ids fetched from REST historicalTrades.",
    "trade_gaps_backfilled": "@trade holes closed from REST.",
    "rest_waits": "REST requests that waited for the weight budget.",
    "rest_connections": "REST connections opened (keep-alive: 1 while the venue keeps it).",
}
_INGEST: dict[str, Family] = dict(
    [_counter("ingest", f, h) for f, h in _INGEST_COUNTERS.items()]
    + [
        _timestamp("ingest", "last_frame_ns", "Wall-clock time of the last frame received"),
        _gauge("ingest", "shards", "Connections (shards) configured."),
        _gauge("ingest", "symbols", "Symbols configured."),
        _gauge("ingest", "fast_path", "1 while the compiled frame path is in use."),
        _gauge("ingest", "rest_weight_used", "REST request weight used in the current window."),
        _gauge("ingest", "rest_weight_peak", "Highest REST weight used in any window."),
        _counter(
            "ingest",
            "rest_wait_ms",
            "Time REST requests spent waiting for the budget.",
            "rest_wait_seconds",
            MS,
        ),
        _counter("ingest", "rest_429", "REST answers 429 (rate limited).", "rest_rate_limited"),
        _counter("ingest", "rest_418", "REST answers 418 (IP banned).", "rest_bans"),
    ]
)

_TRADING_COUNTERS = {
    "reconnects_total": "Session reconnects.",
    "transitions_total": "Session state transitions.",
    "rollovers_total": "Planned connection rollovers (lossless).",
    "orders_sent": "Orders sent to the venue.",
    "orders_acked": "Orders the venue acknowledged.",
    "orders_rejected": "Orders the venue rejected.",
    "orders_unknown": "Orders that went UNKNOWN (timeout, -1007, disconnect) before reconcile.",
    "orders_reconciled": "UNKNOWN orders whose status was reconciled.",
    "orders_late": "Answers that arrived after their request timed out.",
    "orders_local_rejected": "Orders refused locally before reaching the venue.",
    "requests_timed_out": "Requests without an answer in time.",
    "user_data_events": "User data stream events received.",
    "protocol_errors": "Frames that broke the WebSocket API protocol.",
    "time_resyncs": "Clock offset re-measurements.",
    "user_data_duplicates": "Duplicate user data events dropped.",
    "user_data_fields_skipped": "executionReport fields the parser dropped.",
    "orders_amended": "Orders amended keeping priority.",
    "reconcile_requests": "order.status requests sent to reconcile.",
    "orders_table_full": "Orders refused because the order table was full.",
    "pretrade_rejected": "Orders refused by the exchangeInfo pre-trade rules.",
    "pretrade_loads": "exchangeInfo loads.",
    "pretrade_load_failures": "exchangeInfo loads that failed.",
    "pretrade_symbols_skipped": "exchangeInfo symbol entries that could not be parsed.",
    "pretrade_untracked": "Orders beyond the rules table, amends of untracked orders (unchecked).",
    "exec_published": "Execution records published on the exec ring.",
    "orders_stale": "Orders older than their deadline when read from an order ring.",
    "orders_risk_rejected": "Orders refused by the pre-trade risk gate.",
    "replies_sent": "Account-level replies published on the reply ring.",
    "exec_sanitized": "Execution records with fields clamped or cleaned.",
    "outbox_full_rejects": "Requests refused because a connection's outbox was full.",
    "orders_bad": "Malformed order ring entries refused.",
    "order_rings_reaped": "Order rings of dead clients removed.",
    "order_rings_refused": "Order rings refused by the shared-memory trust rule.",
    "order_wakes": "Doorbell datagrams that woke the order loop.",
    "order_wakes_foreign": "Doorbell datagrams from another uid (ignored).",
}
_TRADING: dict[str, Family] = dict(
    [_counter("trading", f, h) for f, h in _TRADING_COUNTERS.items()]
    + [
        _gauge(
            "trading",
            "state",
            "Session state: 0 DISCONNECTED, 1 CONNECTING, "
            "2 AUTHENTICATING, 3 READY, 4 RECONNECTING, 5 FAILED.",
        ),
        _timestamp("trading", "connected_since_ns", "When the primary connection opened"),
        _timestamp("trading", "authenticated_since_ns", "When session.logon succeeded"),
        _timestamp("trading", "last_ping_sent_ns", "Last WebSocket ping sent"),
        _timestamp("trading", "last_pong_ns", "Last WebSocket pong received"),
        _timestamp("trading", "last_json_ping_reply_ns", "Last answer to a JSON ping"),
        _timestamp("trading", "rate_limited_until_ns", "End of the venue's retryAfter ban"),
        _gauge("trading", "rtt_us", "Last request round trip.", "rtt_seconds", US),
        _gauge(
            "trading",
            "rtt_smoothed_us",
            "Smoothed request round trip (EWMA).",
            "rtt_smoothed_seconds",
            US,
        ),
        _gauge(
            "trading",
            "clock_offset_ms",
            "Venue clock minus local clock.",
            "clock_offset_seconds",
            MS,
        ),
        _gauge("trading", "reconnect_attempts", "Failed attempts in the current reconnect cycle."),
        _gauge("trading", "last_error_code", "Last venue error code (< 0), or -9xxx local."),
        _gauge("trading", "weight_used", "Request weight used in the venue's window."),
        _gauge("trading", "weight_limit", "Request weight limit of the venue's window."),
        _gauge("trading", "orders_used", "Orders counted in the venue's order-rate window."),
        _gauge("trading", "orders_limit", "Order-rate limit of the venue's window."),
        _gauge("trading", "user_data_subscribed", "1 while the user data stream is subscribed."),
        _gauge("trading", "orders_in_doubt", "Orders UNKNOWN right now (status not confirmed)."),
        # the older name of orders_in_doubt: the same family, used when the block has no
        # orders_in_doubt (see _OLDER_NAMES)
        _gauge(
            "trading",
            "orders_unknown_now",
            "Orders UNKNOWN right now (status not confirmed).",
            "orders_in_doubt",
        ),
        _gauge("trading", "pretrade_symbols", "Symbols with exchangeInfo rules loaded."),
        _gauge("trading", "pretrade_unchecked_filters", "Filter types kept by name only."),
        _gauge("trading", "order_rings", "Order rings attached (strategy clients)."),
        _gauge("trading", "pid", "Process id of the trading process.", "process_id"),
        _gauge("trading", "risk_inflight", "Orders in flight counted by the risk gate."),
    ]
)

_PERSIST: dict[str, Family] = dict(
    [
        _counter("persist", "inserted", "Trade rows written."),
        _counter("persist", "book_inserted", "Book top rows written."),
        _counter("persist", "duplicates", "Rows skipped as already stored."),
        _counter("persist", "skipped_resume", "Records skipped on resume (already stored)."),
        _counter("persist", "flushes", "Transactions committed."),
        _counter("persist", "missed", "Ring records overwritten before this reader read them."),
        _counter("persist", "resyncs", "Ring resyncs after falling behind or a new generation."),
        _counter("persist", "sink_errors", "Failed database calls (connect, resume, write)."),
        _counter("persist", "sink_reconnects", "Database reconnects."),
        _gauge("persist", "pending", "Rows buffered, not yet committed."),
        _timestamp("persist", "last_flush_ns", "Last commit"),
        _gauge(
            "persist",
            "last_flush_us",
            "Duration of the last commit.",
            "last_flush_duration_seconds",
            US,
        ),
        _gauge(
            "persist", "lag", "Records between the ring's cursor and this reader.", "lag_records"
        ),
        _gauge("persist", "sink_connected", "1 while the database is connected."),
        _gauge("persist", "sink_failures_in_row", "Consecutive failed database calls."),
        _gauge("persist", "paused", "1 while not reading the ring (store down or buffer full)."),
    ]
)

_MONITOR: dict[str, Family] = dict(
    [
        _counter("monitor", "records", "Ring records read."),
        _counter("monitor", "trades", "Trade records read."),
        _counter("monitor", "gaps", "GAP records read."),
        _counter("monitor", "missed", "Ring records overwritten before the monitor read them."),
        _counter("monitor", "resyncs", "Ring resyncs."),
        _gauge(
            "monitor", "lag", "Records between the ring's cursor and the monitor.", "lag_records"
        ),
        _gauge("monitor", "generation", "Ring generation the monitor reads."),
        _timestamp("monitor", "last_publish_ns", "Ring publish time of the last record read"),
        _gauge("monitor", "ring_attached", "1 while attached to the ring."),
    ]
)

_RISK: dict[str, Family] = dict(
    [
        _gauge("risk", "halt", "1 while trading is halted by the risk consumer."),
        _gauge("risk", "max_order_notional", "Largest notional one order may have."),
        _timestamp("risk", "updated_ns", "Last update of the limits table"),
        _counter("risk", "exec_records", "Execution records read."),
        _counter("risk", "fills", "Fills applied to positions."),
        _counter("risk", "ticks", "Market records read (marks)."),
        _gauge("risk", "tick_ring_attached", "1 while attached to the tick ring."),
        _gauge("risk", "block_stale_books",
               "1 while a symbol's orders are refused when its book is stale."),
    ]
)
_RISK_PER_SYMBOL = {
    "pos": ("position", "Position (base asset)."),
    "open_buy": ("open_buy_quantity", "Quantity in open buy orders."),
    "open_sell": ("open_sell_quantity", "Quantity in open sell orders."),
    "mark": ("mark_price", "Last traded price used as mark (NaN: none yet)."),
    "notional": ("notional", "Position times mark (quote asset)."),
    "max_pos": ("max_position", "Position limit."),
    "max_notional": ("max_notional", "Notional limit."),
    "book_stale": ("book_stale", "1 while the symbol's order book is stale (BOOK_STALE)."),
}

#: component kind -> field -> family (a component's kind: see :func:`kind_of`)
FIELDS: dict[str, dict[str, Family]] = {
    "ingest": _INGEST, "trading": _TRADING, "persist": _PERSIST, "monitor": _MONITOR,
    "risk": _RISK,
}  # fmt: skip

_COMPONENT_FAMILIES = {
    "healthy": Family("pipeline_component_healthy", GAUGE,
                      "1 if the component passes its `pipeline health` rules."),
    "alive": Family("pipeline_component_writer_alive", GAUGE,
                    "1 while the process that owns the component's metrics block is alive."),
    "updated": Family("pipeline_component_last_update_timestamp_seconds", GAUGE,
                      "When the component last wrote its metrics block.", NS),
    "heartbeat": Family("pipeline_component_heartbeat_interval_seconds", GAUGE,
                        "How often the component promises to write its block (stale after 3).",
                        MS),
    "problem": Family("pipeline_component_problem", GAUGE,
                      "A problem_<x> field: non-zero makes the component unhealthy."),
    "field": Family("pipeline_component_field", GAUGE,
                    "A block field no family describes yet (name it in "
                    "pipeline/ops/prometheus.py): the raw value as the block holds it."),
}  # fmt: skip
_INGEST_CONN = Family(
    "pipeline_ingest_connection_state",
    GAUGE,
    "Per shard: 0 DOWN, 1 CONNECTING, 2 UP, 3 ROTATING, 4 BACKOFF.",
)
_INGEST_LAST_AGG = Family(
    "pipeline_ingest_last_agg_trade_id",
    GAUGE,
    "Last aggregate trade id published per symbol (-1: none yet).",
)
_INGEST_SKIPPED = Family(
    "pipeline_ingest_frames_skipped",
    COUNTER,
    "Frames skipped (counted and logged, never a crash), by reason.",
)
_RING = {
    "alive": Family("pipeline_ring_writer_alive", GAUGE, "1 while the ring's writer is alive."),
    "cursor": Family("pipeline_ring_records_written", COUNTER,
                     "Records written to the ring in its current generation."),
    "capacity": Family("pipeline_ring_capacity_records", GAUGE, "Ring capacity."),
    "generation": Family("pipeline_ring_generation", GAUGE,
                         "Ring generation (a new one on every writer restart)."),
    "lag": Family("pipeline_ring_reader_lag_records", GAUGE,
                  "Records the reader is behind the writer."),
    "missed": Family("pipeline_ring_reader_missed_records", COUNTER,
                     "Records overwritten before the reader read them."),
}  # fmt: skip
_TRADING_SESSION_STATE = Family(
    "pipeline_trading_session_state",
    GAUGE,
    "1 for the trading session's current state, 0 for the others.",
)
BUILD_INFO_HELP = "The pipeline's version (value always 1)."

_INDEXED = re.compile(r"^(conn_state|last_agg_id)_(\d+)$")
_RISK_SYMBOL = re.compile(r"^s_(.+)__([a-z_]+)$")


def kind_of(component: str) -> str | None:
    """``ingest``/``trading``/``persist``/``monitor``, ``risk`` for the risk consumer's table
    (``risk.limits``), None for a component this module does not describe."""
    if component in FIELDS:
        return component
    if component == "risk.limits":
        return "risk"
    return None


def _patterned(
    kind: str | None, fld: str, symbols: Sequence[str]
) -> tuple[Family, dict[str, str]] | None:
    """Families whose index or symbol is a label rather than part of the field name."""
    if kind == "ingest":
        m = _INDEXED.match(fld)
        if m and m[1] == "conn_state":
            return _INGEST_CONN, {"shard": m[2]}
        if m:
            sid = int(m[2])
            return _INGEST_LAST_AGG, {"symbol": symbols[sid] if sid < len(symbols) else f"#{sid}"}
        if fld.startswith("skipped_") and fld != "skipped_total":
            return _INGEST_SKIPPED, {"reason": fld[len("skipped_") :]}
    if kind == "risk":
        m = _RISK_SYMBOL.match(fld)
        if m and m[2] in _RISK_PER_SYMBOL:
            name, help = _RISK_PER_SYMBOL[m[2]]
            return Family(f"pipeline_risk_{name}", GAUGE, help), {"symbol": m[1]}
    return None


#: fields that are exposed through another family or not at all (derivable: a sum of others)
_NOT_EXPOSED = {"ingest": {"skipped_total"}}
#: an older field name -> the current one: the older is exposed only from blocks without it
_OLDER_NAMES = {"orders_unknown_now": "orders_in_doubt"}


def field_family(
    component: str, fld: str, symbols: Sequence[str] = ()
) -> tuple[Family, dict[str, str]] | None:
    """The family and labels of one block field (None: not exposed, see ``_NOT_EXPOSED``).
    Pure; the tests call it for every field of every process's block."""
    kind = kind_of(component)
    if fld.startswith("problem_"):
        return _COMPONENT_FAMILIES["problem"], {
            "component": component,
            "problem": fld[len("problem_") :],
        }
    if fld == "heartbeat_interval_ms":
        return _COMPONENT_FAMILIES["heartbeat"], {"component": component}
    if kind == "trading" and fld.startswith(_ORDER_RTT_PREFIX):
        return None  # the histogram's parts (:func:`_order_rtt`)
    if kind is not None:
        if fld in _NOT_EXPOSED.get(kind, ()):
            return None
        known = FIELDS[kind].get(fld)
        if known is not None:
            return known, {}
        pat = _patterned(kind, fld, symbols)
        if pat is not None:
            return pat
    return _COMPONENT_FAMILIES["field"], {"component": component, "field": fld}


@dataclass
class _Builder:
    """Samples grouped by family; the first sample of a (family, labels) pair wins (a family
    never gets a duplicate series, which would make the whole scrape invalid)."""

    families: dict[str, tuple[Family, list[str], dict[tuple[str, ...], float]]] = field(
        default_factory=dict
    )

    def add(self, fam: Family, labels: Mapping[str, str], value: Any) -> None:
        num = _number(value)
        if num is None:
            num = math.nan  # torn or non-numeric: exposed as NaN, never as text
        entry = self.families.get(fam.name)
        if entry is None:
            entry = self.families[fam.name] = (fam, list(labels), {})
        _, names, samples = entry
        key = tuple(str(labels.get(n, "")) for n in names)
        samples.setdefault(key, num / fam.divisor if fam.divisor != 1.0 else num)

    def metrics(self) -> list[Metric]:
        out: list[Metric] = []
        for fam, names, samples in self.families.values():
            cls = CounterMetricFamily if fam.kind == COUNTER else GaugeMetricFamily
            metric = cls(fam.name, fam.help, labels=names)
            for key, value in samples.items():
                metric.add_metric(list(key), value)
            out.append(metric)
        return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        return float(v)
    return None


def families(report: Mapping[str, Any], symbols: Sequence[str] = ()) -> list[Metric]:
    """Every family of a `pipeline health` report (:func:`pipeline.ops.health.evaluate`).
    Pure: ``symbols`` names ingest's symbol ids (``cfg.ingest.symbols``, the ring's order)."""
    b = _Builder()
    hists: list[Metric] = []
    seen_hist: set[str] = set()  # one series per family: the first trading block wins
    comp_f = _COMPONENT_FAMILIES
    for comp, entry in report.items():
        b.add(comp_f["healthy"], {"component": comp}, bool(entry.get("healthy")))
        if comp.startswith("ring:"):
            _ring(b, comp[len("ring:") :], entry)
            continue
        if "block" not in entry:
            continue  # expected but absent, or a refused segment: the verdict says it
        b.add(comp_f["alive"], {"component": comp}, bool(entry.get("writer_alive")))
        if entry.get("updated_at_ns") is not None:
            b.add(comp_f["updated"], {"component": comp}, entry["updated_at_ns"])
        fields = entry.get("metrics") or {}
        for fld, value in fields.items():
            if _OLDER_NAMES.get(fld) in fields:
                continue
            found = field_family(comp, fld, symbols)
            if found is not None:
                b.add(found[0], found[1], value)
        if kind_of(comp) == "trading" and "state" in fields:
            code = fields["state"]
            for i, state in enumerate(TRADING_STATES):
                b.add(_TRADING_SESSION_STATE, {"state": state}, int(code == i))
        hist = _order_rtt(fields) if kind_of(comp) == "trading" else None
        if hist is not None and ORDER_RTT_FAMILY not in seen_hist:
            seen_hist.add(ORDER_RTT_FAMILY)
            hists.append(hist)
    return b.metrics() + hists


_ORDER_RTT_PREFIX = "order_rtt_"
_ORDER_RTT_BUCKET = re.compile(r"^order_rtt_le_(\d+)us$")
ORDER_RTT_FAMILY = "pipeline_trading_order_rtt_seconds"


def _order_rtt(fields: Mapping[str, Any]) -> Metric | None:
    """The trading block's order round-trip buckets as a Prometheus histogram (cumulative
    counts, bounds in seconds from the field names); None when the block has none or a value
    is torn (a histogram with a bad count would be worse than none for one scrape)."""
    bounds: list[tuple[float, int]] = []
    for fld, value in fields.items():
        m = _ORDER_RTT_BUCKET.match(fld)
        if m:
            n = _number(value)
            if n is None or not math.isfinite(n) or n < 0:
                return None
            bounds.append((int(m[1]) / US, int(n)))
    inf, total = _number(fields.get("order_rtt_le_inf")), _number(fields.get("order_rtt_sum_us"))
    if not bounds or inf is None or total is None or not math.isfinite(inf + total):
        return None
    buckets, running = [], 0
    for le, n in sorted(bounds):
        running += n
        buckets.append((repr(le), float(running)))
    buckets.append(("+Inf", float(running + int(inf))))
    hist = HistogramMetricFamily(
        ORDER_RTT_FAMILY,
        "Order requests (place, cancel, modify, amend): written -> answer received.",
    )
    hist.add_metric([], buckets, sum_value=total / US)
    return hist


def _ring(b: _Builder, ring: str, entry: Mapping[str, Any]) -> None:
    if "cursor" not in entry:
        return  # the ring does not exist: healthy 0 says so
    where = {"ring": ring}
    b.add(_RING["alive"], where, bool(entry.get("writer_alive")))
    for key in ("cursor", "capacity", "generation"):
        if entry.get(key) is not None:
            b.add(_RING[key], where, entry[key])
    for r in entry.get("readers") or []:
        labels = {"ring": ring, "reader": str(r.get("name", ""))}
        b.add(_RING["lag"], labels, r.get("lag"))
        b.add(_RING["missed"], labels, r.get("missed"))


def build_version() -> str:
    """The pipeline's version from its one source (``pipeline.__version__``: the package
    metadata of the installed distribution)."""
    import pipeline

    return str(getattr(pipeline, "__version__", "unknown"))


class HealthCollector:
    """A ``prometheus_client`` collector: each scrape calls ``make_report`` (which reads shared
    memory) and turns the report into families. Register it in a registry of its own
    (``CollectorRegistry(auto_describe=False)``): it has nothing to describe before a scrape."""

    def __init__(
        self, make_report: Callable[[], Mapping[str, Any]], symbols: Iterable[str] = ()
    ) -> None:
        self._make_report = make_report
        self._symbols = tuple(symbols)

    def collect(self) -> Iterator[Metric]:
        yield InfoMetricFamily(
            "pipeline_build", BUILD_INFO_HELP,
            value={"version": build_version(), "python": platform.python_version()},
        )  # fmt: skip
        yield from families(self._make_report(), self._symbols)


def registry_for(
    make_report: Callable[[], Mapping[str, Any]], symbols: Iterable[str] = ()
) -> CollectorRegistry:
    """A registry holding only :class:`HealthCollector` (no process/platform collectors: the
    scrape is about the pipeline's processes, not about the one serving it)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HealthCollector(make_report, symbols))
    return registry


def render(report: Mapping[str, Any], symbols: Iterable[str] = ()) -> str:
    """The text exposition format (0.0.4) of one report."""
    return generate_latest(registry_for(lambda: report, symbols)).decode()
