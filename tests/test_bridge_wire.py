"""The bridge's sans-I/O cores: wire format, batching, resume arithmetic, laps, mirror position."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from pipeline.bridge.batcher import Batch, Batcher
from pipeline.bridge.mirror_state import (
    MirrorPosition,
    PositionFile,
    StartError,
    parse_start,
    records_to_skip,
)
from pipeline.bridge.wire import (
    BridgeWireError,
    DataHeader,
    SourceMeta,
    check_prefix,
    data_headers,
    decode_records,
    layout_hash,
    parse_data_headers,
    resume_point,
)
from pipeline.ipc.records import TICK_DTYPE, Flags, Kind, agg_trade_record, book_ticker_record

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]


def ticks(n: int, seed: int = 0, first_ids: dict[int, int] | None = None) -> np.ndarray:
    """``n`` records, agg trades with per-symbol consecutive ids and some book tickers."""
    rng = random.Random(seed)
    ids = dict(first_ids or {})
    rows = []
    for i in range(n):
        sym = rng.randrange(len(SYMBOLS))
        if rng.random() < 0.3:
            rows.append((*book_ticker_record(sym, 1.0, 2.0, 3.0, 4.0, i, i), i))
        else:
            aid = ids.get(sym, 0)
            ids[sym] = aid + 1
            rows.append((*agg_trade_record(sym, 0, 10.0 + i, 1.0, aid, aid, i, i), i))
    return np.array(rows, dtype=TICK_DTYPE)


def seqs_of(b: Batch) -> np.ndarray:
    return np.frombuffer(b.payload, dtype=TICK_DTYPE)["publish_time_ns"]  # = ring seq in ticks()


# --- wire ---------------------------------------------------------------------------------------


def test_layout_hash_names_the_dtype() -> None:
    other = np.dtype([("a", "<i8"), ("b", "<f8")])
    assert layout_hash(TICK_DTYPE) == layout_hash(np.dtype(TICK_DTYPE.descr, align=True))
    assert layout_hash(TICK_DTYPE) != layout_hash(other)
    assert len(layout_hash(other)) == 16


def test_meta_round_trip_and_refusals() -> None:
    meta = SourceMeta(TICK_DTYPE, tuple(SYMBOLS), 123, 4, "pipeline.ticks")
    back = SourceMeta.decode(meta.encode())
    assert back == meta
    assert back.same_ring_shape(meta)
    assert not back.same_ring_shape(SourceMeta(TICK_DTYPE, ("BTCUSDT",), 123, 4, "x"))
    with pytest.raises(BridgeWireError, match="malformed"):
        SourceMeta.decode(b"{not json")
    with pytest.raises(BridgeWireError, match="wire version"):
        SourceMeta.decode(b'{"v": 99}')
    forged = meta.encode().replace(meta.layout.encode(), b"0" * 16)
    with pytest.raises(BridgeWireError, match="does not match its dtype"):
        SourceMeta.decode(forged)


def test_data_headers_round_trip_and_layout_mismatch_fails_loudly() -> None:
    h = data_headers(epoch_ns=7, first=10, last=20, low=9, high=21, layout=layout_hash(TICK_DTYPE),
                     meta_seq=3, expected_last_seq=41)  # fmt: skip
    assert h["Nats-Msg-Id"] == "7.10"
    assert h["Nats-Expected-Last-Sequence"] == "41"
    dh = parse_data_headers(h)
    assert dh == DataHeader(7, 10, 20, 9, layout_hash(TICK_DTYPE), 3)
    assert resume_point(h) == (7, 9, 21)
    payload = ticks(3).tobytes()
    assert len(decode_records(payload, TICK_DTYPE, dh.layout, dh)) == 3
    with pytest.raises(BridgeWireError, match="record layout"):
        decode_records(payload, TICK_DTYPE, "0" * 16, dh)
    with pytest.raises(BridgeWireError, match="whole"):
        decode_records(payload[:-1], TICK_DTYPE, dh.layout, dh)
    with pytest.raises(BridgeWireError, match="not a bridge data message"):
        parse_data_headers({"Nats-Msg-Id": "x"})
    with pytest.raises(BridgeWireError, match="Bridge-Low"):
        parse_data_headers({**h, "Bridge-Low": "nan"})
    assert resume_point({"foo": "bar"}) is None
    with pytest.raises(ValueError, match="subject prefix"):
        check_prefix("ticks.>")


# --- batching -----------------------------------------------------------------------------------


def test_batches_per_subject_in_order_cut_by_size_linger_and_idle() -> None:
    recs = ticks(500)
    b = Batcher(TICK_DTYPE, SYMBOLS, "t", max_records=16, linger_ns=1000)
    b.add(recs[:300], 0, now_ns=0)
    full = b.ready(now_ns=10)  # size only: nothing has lingered yet
    assert full
    assert all(x.count == 16 for x in full)
    assert b.ready(now_ns=999) == []
    lingered = b.ready(now_ns=1000)
    assert lingered
    assert all(x.count < 16 for x in lingered)
    b.add(recs[300:], 300, now_ns=2000)
    rest = b.ready(now_ns=2001, idle=True)
    assert b.waiting == 0
    out = full + lingered + rest
    assert sum(x.count for x in out) == 500
    subjects = {x.subject for x in out}
    assert "t.BTCUSDT.agg_trade" in subjects
    assert "t.ETHUSDT.book_ticker" in subjects
    for subject in subjects:
        got = np.concatenate([seqs_of(x) for x in out if x.subject == subject])
        assert (np.diff(got) > 0).all()  # each subject in ring order
    allseqs = np.sort(np.concatenate([seqs_of(x) for x in out]))
    assert allseqs.tolist() == list(range(500))  # each record exactly once


def test_low_is_a_true_resume_point() -> None:
    """Every record below a batch's ``low`` is in that batch or an earlier one."""
    recs = ticks(2000, seed=3)
    b = Batcher(TICK_DTYPE, SYMBOLS, "t", max_records=8, linger_ns=50)
    out: list[Batch] = []
    for start in range(0, 2000, 37):
        b.add(recs[start : start + 37], start, now_ns=start)
        out += b.ready(now_ns=start)
    out += b.ready(now_ns=10**9, idle=True)
    sent: set[int] = set()
    for x in out:
        sent.update(seqs_of(x).tolist())
        assert set(range(x.low)) <= sent
        assert max(sent) < x.high


@pytest.mark.parametrize("seed", range(12))
def test_restart_anywhere_gives_no_duplicate_and_no_hole(seed: int) -> None:
    """A publisher killed after any number of stored batches resumes from the last one's
    low/high; with the per-subject stored positions, the stream ends up with each record
    exactly once and each subject in order."""
    rng = random.Random(seed)
    n = 1500
    recs = ticks(n, seed=seed)
    b = Batcher(TICK_DTYPE, SYMBOLS, "t", max_records=rng.choice([1, 4, 16, 64]), linger_ns=30)
    out: list[Batch] = []
    pos = 0
    while pos < n:
        k = rng.randint(1, 90)
        b.add(recs[pos : pos + k], pos, now_ns=pos)
        pos += k
        out += b.ready(now_ns=pos, idle=rng.random() < 0.1)
    out += b.ready(now_ns=10**9, idle=True)
    stored = out[: rng.randrange(1, len(out))]  # the crash: only these reached the stream
    last = stored[-1]
    b2 = Batcher(TICK_DTYPE, SYMBOLS, "t", max_records=rng.choice([1, 8, 64]), linger_ns=30)
    b2.resume(last.low, last.high)
    again: list[Batch] = []
    pos = last.low
    while pos < n:
        k = rng.randint(1, 90)
        chunk = recs[pos : pos + k]
        for key in b2.unknown_keys(chunk, pos):
            subject = b2.subject_of(key)
            mine = [x for x in stored if x.subject == subject]
            b2.learn(key, mine[-1].last if mine else -1, mine[-1].payload[-96:] if mine else None)
        b2.add(chunk, pos, now_ns=pos)
        pos += k
        again += b2.ready(now_ns=pos)
    again += b2.ready(now_ns=10**9, idle=True)
    stream = stored + again
    allseqs = sorted(s for x in stream for s in seqs_of(x).tolist())
    assert allseqs == list(range(n))
    for subject in {x.subject for x in stream}:
        got = np.concatenate([seqs_of(x) for x in stream if x.subject == subject])
        assert (np.diff(got) > 0).all()
    assert b2.skipped_stored == sum(1 for x in stored for s in seqs_of(x) if s >= last.low)


def test_a_lap_becomes_gap_records_with_the_lost_ids() -> None:
    b = Batcher(TICK_DTYPE, SYMBOLS, "t", max_records=64, linger_ns=0)
    first = np.array([(*agg_trade_record(0, 0, 1.0, 1.0, i, i, 0, 0), 0) for i in range(5)],
                     dtype=TICK_DTYPE)  # fmt: skip
    b.add(first, 0, now_ns=1)
    b.ready(now_ns=1, idle=True)
    b.note_lap(100)  # records 5..104 overwritten before they were read
    later = np.array(
        [(*agg_trade_record(0, 0, 1.0, 1.0, 60 + i, 60 + i, 0, 0), 0) for i in range(3)]
        + [(*agg_trade_record(1, 0, 1.0, 1.0, 7, 7, 0, 0), 0)],
        dtype=TICK_DTYPE,
    )
    b.add(later, 105, now_ns=2)
    out = b.ready(now_ns=2, idle=True)
    btc = np.frombuffer(next(x for x in out if x.subject == "t.BTCUSDT.agg_trade").payload,
                        dtype=TICK_DTYPE)  # fmt: skip
    assert btc["kind"][0] == Kind.GAP
    assert (btc["trade_id"][0], btc["aux_id"][0]) == (5, 59)
    assert btc["flags"][0] & Flags.TRADE_IDS == 0
    assert btc["trade_id"][1:].tolist() == [60, 61, 62]
    eth = np.frombuffer(next(x for x in out if x.subject == "t.ETHUSDT.agg_trade").payload,
                        dtype=TICK_DTYPE)  # fmt: skip
    assert Kind.GAP not in eth["kind"].tolist()  # never seen before: no id to jump from
    assert b.gap_records == 1
    assert b.dropped_lapped == 100


def book_tickers(seqs: range) -> np.ndarray:
    """Book tickers only (no ids a reader could see jump), ``publish_time_ns`` = ring seq."""
    return np.array(
        [(*book_ticker_record(s % 2, 1.0, 2.0, 3.0, 4.0, s, s), s) for s in seqs], dtype=TICK_DTYPE
    )


def test_a_lap_over_book_tickers_is_one_lap_gap_between_before_and_after() -> None:
    b = Batcher(TICK_DTYPE, SYMBOLS, "t", max_records=64, linger_ns=10**9)
    b.add(book_tickers(range(10)), 0, now_ns=1)
    assert b.ready(now_ns=2) == []  # lingering: still buffered when the lap is seen
    b.note_lap(50)  # ring sequences 10..59 overwritten before they were read
    b.add(book_tickers(range(60, 65)), 60, now_ns=3)
    out = b.ready(now_ns=4, idle=True)
    lap_at = [i for i, x in enumerate(out) if x.tag == "lap"]
    assert len(lap_at) == 1
    lap = out[lap_at[0]]
    before, after = out[: lap_at[0]], out[lap_at[0] + 1 :]
    assert sorted(s for x in before for s in seqs_of(x).tolist()) == list(range(10))
    assert sorted(s for x in after for s in seqs_of(x).tolist()) == list(range(60, 65))
    rec = np.frombuffer(lap.payload, dtype=TICK_DTYPE)
    assert len(rec) == 1
    assert rec["kind"][0] == Kind.GAP
    assert rec["flags"][0] == Flags.LAPPED
    assert (rec["trade_id"][0], rec["aux_id"][0]) == (10, 59)  # 50 records, by sequence
    assert rec["recv_time_ns"][0] == 3
    assert lap.subject == "t._lap"
    assert (lap.first, lap.last, lap.low) == (10, 59, 60)  # a restart here resumes after it
    assert b.lap_gaps == 1
    assert b.gap_records == 0  # no ids jumped
    assert b.dropped_lapped == 50


def test_a_lap_seen_twice_before_a_record_is_one_range_and_ids_are_unique() -> None:
    """Two laps with no record read between them (the ring's retry poll) are one lost range;
    the lap GAP, an id GAP and a ring record all standing at one sequence get distinct
    message ids."""
    b = Batcher(TICK_DTYPE, SYMBOLS, "t", max_records=1, linger_ns=0)
    b.add(np.array([(*agg_trade_record(0, 0, 1.0, 1.0, 0, 0, 0, 0), 0)], dtype=TICK_DTYPE), 0, 0)
    first = b.ready(now_ns=0)
    b.note_lap(3)
    b.note_lap(4)
    b.add(np.array([(*agg_trade_record(0, 0, 1.0, 1.0, 9, 9, 0, 0), 8)], dtype=TICK_DTYPE), 8, 1)
    out = first + b.ready(now_ns=1)
    ids = [data_headers(epoch_ns=1, first=x.first, last=x.last, low=x.low, high=x.high,
                        layout="l", meta_seq=1, expected_last_seq=0, tag=x.tag)["Nats-Msg-Id"]
           for x in out]  # fmt: skip
    assert len(set(ids)) == len(ids) == 4, ids  # record 0, lap GAP, id GAP, record 8
    recs = [np.frombuffer(x.payload, dtype=TICK_DTYPE)[0] for x in out]
    assert [(int(r["kind"]), int(r["flags"])) for r in recs] == [
        (Kind.AGG_TRADE, 0), (Kind.GAP, Flags.LAPPED), (Kind.GAP, 0), (Kind.AGG_TRADE, 0)
    ]
    assert (recs[1]["trade_id"], recs[1]["aux_id"]) == (1, 7)  # ring sequences 1..7
    assert (recs[2]["trade_id"], recs[2]["aux_id"]) == (1, 8)  # aggregate ids 1..8
    assert [x.tag for x in out] == ["", "lap", "gap", ""]
    # low never passes an unsent record nor falls back onto a lost one (a restart there would
    # report the lost records a second time)
    assert [x.low for x in out] == [1, 8, 8, 9]


@pytest.mark.parametrize("seed", range(8))
def test_random_laps_every_record_sent_or_told_lost_once_in_place(seed: int) -> None:
    """Records of every kind with laps at random points: each ring sequence is either sent once
    or inside exactly one lap GAP; in stream order every lap GAP comes after every record read
    before the lap and before every record read after it; message ids are unique."""
    rng = random.Random(seed)
    n = 3000
    recs = ticks(n, seed=seed)
    b = Batcher(TICK_DTYPE, SYMBOLS, "t", max_records=rng.choice([1, 4, 16]), linger_ns=30)
    out: list[Batch] = []
    pos = 0
    lost: list[tuple[int, int]] = []
    while pos < n:
        if rng.random() < 0.1:
            k = rng.randint(1, 200)
            b.note_lap(min(k, n - pos))
            lost.append((pos, min(pos + k, n) - 1))
            pos += k
            continue
        k = rng.randint(1, 60)
        b.add(recs[pos : pos + k], pos, now_ns=pos)
        pos += k
        out += b.ready(now_ns=pos)
    out += b.ready(now_ns=10**9, idle=True)
    ids = [f"{x.first}.{x.tag}" for x in out]
    assert len(set(ids)) == len(ids)
    stream = [(x, r) for x in out for r in np.frombuffer(x.payload, dtype=TICK_DTYPE)]
    laps = [(i, int(r["trade_id"]), int(r["aux_id"])) for i, (x, r) in enumerate(stream)
            if r["flags"] & Flags.LAPPED]  # fmt: skip
    told = [(a, z) for _, a, z in laps]
    # told with the first record read after it: a lap at the very end is not told yet
    assert told == [r for r in _merge(lost) if r[1] < n - 1]
    assert told  # (the seeds do lap)
    real = [(i, int(r["publish_time_ns"])) for i, (x, r) in enumerate(stream)
            if r["kind"] != Kind.GAP]  # fmt: skip
    sent = sorted(s for _, s in real)
    covered = sorted(s for a, z in told for s in range(a, z + 1))
    unsent_tail = sorted(set(range(n)) - set(sent) - set(covered))
    assert len(sent) == len(set(sent))
    assert not set(sent) & set(covered)
    assert all(s > max(sent) for s in unsent_tail)  # only a lap after the last read record
    for at, a, z in laps:
        assert all(i < at for i, s in real if s < a)
        assert all(i > at for i, s in real if s > z)


@pytest.mark.parametrize("seed", range(8))
def test_lap_gaps_read_from_the_ring_are_relayed_in_place_once_across_a_restart(seed: int) -> None:
    """A mirror's ring published on (site to site): the lap GAPs it holds go out unchanged,
    each alone on ``_lap`` after every record before it and before every record after it;
    a publisher restarted anywhere sends each record and each lap GAP exactly once."""
    rng = random.Random(seed)
    n = 1500
    recs = ticks(n, seed=seed)
    lap_at = sorted(rng.sample(range(n), 6))
    for i in lap_at:  # as an upstream bridge wrote them (publish_time_ns: the ring seq here)
        recs[i] = (Kind.GAP, Flags.LAPPED, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10 * i,
                   10 * i + 3, 0, i, i)  # fmt: skip

    def run(b: Batcher, start: int, stored: list[Batch]) -> list[Batch]:
        out: list[Batch] = []
        pos = start
        while pos < n:
            k = rng.randint(1, 90)
            chunk = recs[pos : pos + k]
            for key in b.unknown_keys(chunk, pos):
                mine = [x for x in stored if x.subject == b.subject_of(key)]
                b.learn(key, mine[-1].last if mine else -1, None)
            b.add(chunk, pos, now_ns=pos)
            pos += k
            out += b.ready(now_ns=pos)
        return out + b.ready(now_ns=10**9, idle=True)

    out = run(Batcher(TICK_DTYPE, SYMBOLS, "t", max_records=8, linger_ns=30), 0, [])
    stored = out[: rng.randrange(1, len(out))]
    b2 = Batcher(TICK_DTYPE, SYMBOLS, "t", max_records=16, linger_ns=30)
    b2.resume(stored[-1].low, stored[-1].high)
    stream = stored + run(b2, stored[-1].low, stored)
    assert b2.lap_gaps == 0  # nothing was lost here: relayed, not made
    flat = [r for x in stream for r in np.frombuffer(x.payload, dtype=TICK_DTYPE)]
    seqs = [int(r["publish_time_ns"]) for r in flat]
    assert sorted(seqs) == list(range(n))  # each record and each lap GAP exactly once
    for i in lap_at:
        (x,) = [x for x in stream if x.first == i and x.subject == "t._lap"]
        assert x.payload == recs[i : i + 1].tobytes()
        p = seqs.index(i)
        assert all(s < i for s in seqs[:p])
        assert all(s > i for s in seqs[p + 1 :])
    ids = [(x.first, x.tag) for x in stream]
    assert len(set(ids)) == len(ids)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent lost ranges (laps with no record read between them) as one."""
    out: list[tuple[int, int]] = []
    for a, z in ranges:
        if out and out[-1][1] + 1 == a:
            out[-1] = (out[-1][0], z)
        else:
            out.append((a, z))
    return out


def test_any_dtype_travels_on_one_subject() -> None:
    dt = np.dtype([("x", "<i8"), ("y", "<f8")])
    b = Batcher(dt, [], "raw", max_records=3)
    b.add(np.zeros(7, dtype=dt), 0, now_ns=0)
    out = b.ready(now_ns=0, idle=True)
    assert [x.count for x in out] == [3, 3, 1]
    assert {x.subject for x in out} == {"raw.all"}


# --- the mirror's position ----------------------------------------------------------------------


def test_parse_start() -> None:
    assert parse_start("all").policy == "all"
    assert parse_start("new").policy == "new"
    assert parse_start("seq:42").seq == 42
    when = parse_start("time:2026-01-02T03:04:05Z").time
    assert when is not None
    assert when.year == 2026
    assert when.utcoffset() is not None
    for bad in ("seq:0", "seq:x", "time:yesterday", "oldest", ""):
        with pytest.raises(StartError):
            parse_start(bad)


def test_records_to_skip_uses_the_ring_left_behind() -> None:
    saved = MirrorPosition("S", next_seq=10, ring_epoch_ns=5, ring_cursor=100)
    assert records_to_skip(saved, {"epoch_ns": 5, "cursor": 164}) == 64
    assert records_to_skip(saved, {"epoch_ns": 6, "cursor": 164}) == 0  # another ring
    assert records_to_skip(saved, None) == 0
    assert records_to_skip(None, {"epoch_ns": 5, "cursor": 164}) == 0


def test_position_file_round_trip_and_refusals(tmp_path: Path) -> None:
    f = PositionFile(tmp_path / "sub" / "pos.json")
    assert f.load("S") is None
    pos = MirrorPosition("S", 10, 5, 100)
    f.save(pos)
    assert f.load("S") == pos
    with pytest.raises(ValueError, match="for stream 'S'"):
        f.load("OTHER")
    f.path.write_text("{")
    with pytest.raises(ValueError, match="unreadable"):
        f.load("S")


# --- `pipeline run` starts the bridge from the TOML config --------------------------------------


def test_run_plans_the_bridge_from_the_config(tmp_path: Path) -> None:
    from pipeline.cli import build_parser
    from pipeline.config import load_config
    from pipeline.ops.runner import RunContext, plan_components

    toml = tmp_path / "p.toml"
    toml.write_text(
        '[ring]\nname = "site.ticks"\n'
        '[bridge]\nnats_url = "nats://10.0.0.5:4222"\nstream = "SITE"\npublish = true\n'
        'mirror_ring = "remote.ticks"\nmax_age_s = 600.0\nstart = "new"\n'
    )
    cfg = load_config(toml, env={})
    assert cfg.bridge.stream == "SITE"
    ctx = RunContext(config_path=str(toml))
    have = {"sim", "ingest", "trade", "consume", "bridge"}
    comps, notes = plan_components(cfg, ctx, have)
    by = {c.name: c for c in comps}
    assert notes == []
    pub, mir = by["bridge-publish"].argv(), by["bridge-mirror"].argv()
    assert pub[pub.index("bridge") :] == ["bridge", "publish", "--ring", "site.ticks",
                                          "--config", str(toml)]  # fmt: skip
    assert mir[mir.index("bridge") :] == ["bridge", "mirror", "--config", str(toml)]
    parser = build_parser()
    for argv in (pub, mir):  # what the runner writes, our CLI reads
        ns = parser.parse_args(argv[argv.index("bridge") :])
        assert callable(ns.func)
    # not asked for: not started; not built: said so
    plain = load_config(env={})
    assert not [c for c in plan_components(plain, ctx, have)[0] if c.name.startswith("bridge")]
    _, notes = plan_components(cfg, ctx, have - {"bridge"})
    assert any("bridge publish: not available" in n for n in notes)


def test_health_rules_for_the_bridge_components() -> None:
    """Health knows the bridge by its blocks' names; a link down for long is a problem the
    publisher raises itself (problem_nats_down), and a configured bridge is expected."""
    from pipeline.bridge.config import BridgeConfig
    from pipeline.ops.health import bridge_components, evaluate

    now = 10**18
    base = {"_writer_alive": True, "_updated_at_ns": now, "heartbeat_interval_ms": 500}
    blocks = {
        "pipeline.bridge.publish.TICKS.metrics": {**base, "problem_nats_down": 0},
        "pipeline.bridge.mirror.remote.metrics": {**base, "problem_nats_down": 7},
    }
    expect = bridge_components(BridgeConfig(publish=True, mirror_ring="remote", stream="TICKS"))
    assert expect == ["bridge.publish.TICKS", "bridge.mirror.remote"]
    report = evaluate(blocks, {}, now, expect=expect)
    assert report["bridge.publish.TICKS"]["healthy"]
    assert report["bridge.mirror.remote"]["problems"] == ["nats_down=7"]
    missing = evaluate({}, {}, now, expect=expect)
    assert not missing["bridge.publish.TICKS"]["healthy"]
