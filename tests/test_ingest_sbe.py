"""Issue #18: SBE connections in the ingest process.

The frame handler is tested in process with hand-built SBE frames (the layouts of
tests/test_sbe_decode.py, which checks them against the schema) on a real ring; the settings
through the real config path; the missing key through the real process (exit 2).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline.binance import sbe
from pipeline.settings import ConfigError
from tests.ingesthelpers import inproc_ingest, stale_marks
from tests.test_sbe_decode import bba_frame, diff_frame, message, snapshot_frame, trades_frame

SYMS = ["BTCUSDT", "ETHUSDT"]
RECV = 1_700_000_000_123_456_789


class _Conn:
    """What the handler reads of a connection (no socket: frames are handed in directly)."""

    sbe = True
    last_ns = 0
    first_pending = False
    shutdown_requested = False


@pytest.fixture
def ing(shm_name: str) -> Iterator[Any]:
    with inproc_ingest(shm_name, SYMS, streams=["aggTrade"],
                       sbe_streams=["trade", "bestBidAsk", "depth"], sbe_api_key_env="SBE_KEY",
                       publish_batch=1) as ing:
        yield ing


def test_sbe_shards_are_separate_and_know_they_are_sbe(ing: Any) -> None:
    json_shards = [s for s in ing.shards if not s.sbe]
    sbe_shards = [s for s in ing.shards if s.sbe]
    assert [s.streams for s in json_shards] == [["btcusdt@aggTrade", "ethusdt@aggTrade"]]
    assert len(sbe_shards) == 1
    assert sbe_shards[0].url.startswith("wss://stream-sbe.binance.com:9443/stream?streams=")
    assert "btcusdt@bestBidAsk" in sbe_shards[0].streams
    assert "btcusdt@trade" in sbe_shards[0].url


def test_trades_group_is_tracked_exactly_once(ing: Any) -> None:
    c0 = ing.ring.cursor
    frame = trades_frame(1_700_000_000_000_000, [(7, 100, 5, 1), (8, 101, 6, 0), (9, 102, 7, 1)])
    ing.handle_sbe(_Conn(), frame, RECV)
    assert ing.ring.cursor - c0 == 3
    assert ing.trade_trackers[0].last == 9
    ing.handle_sbe(_Conn(), frame, RECV)  # the same group again (a reconnect's overlap)
    assert ing.ring.cursor - c0 == 3
    ing.handle_sbe(_Conn(), trades_frame(1_700_000_000_000_100, [(10, 103, 1, 0)]), RECV)
    assert ing.ring.cursor - c0 == 4
    assert ing.trade_trackers[0].last == 10
    assert ing.c["callback_errors"] == 0


def test_best_bid_ask_dedupes_and_culled_ids_are_no_gap(ing: Any) -> None:
    c0 = ing.ring.cursor
    ing.handle_sbe(_Conn(), bba_frame(1_700_000_000_000_000, 50, 1, 2, 3, 4), RECV)
    ing.handle_sbe(_Conn(), bba_frame(1_700_000_000_000_000, 50, 1, 2, 3, 4), RECV)
    ing.handle_sbe(_Conn(), bba_frame(1_700_000_000_000_000, 57, 1, 2, 3, 4), RECV)  # culled
    assert ing.ring.cursor - c0 == 2
    assert ing.last_book_u[0] == 57
    assert ing.c["duplicates"] == 1
    assert ing.c["gaps_detected"] == 0


def test_a_newer_schema_version_is_decoded_and_shown_to_the_operator(ing: Any) -> None:
    """A version-1 frame with a longer block is decoded by its block length (not skipped: that
    would turn a venue upgrade into an outage) and counted in the metrics block."""
    from pipeline.marketdata.ingest_metrics import metric_values

    c0 = ing.ring.cursor
    ing.handle_sbe(_Conn(), bba_frame(1_700_000_000_000_000, 70, 1, 2, 3, 4, version=1,
                                      extra_block=b"\x00" * 8), RECV)
    assert ing.ring.cursor - c0 == 1
    vals = metric_values(ing)
    assert vals["sbe_other_version_frames"] == 1
    assert vals["skipped_total"] == 0


def test_depth20_records_carry_the_sbe_event_time(ing: Any, shm_name: str) -> None:
    """JSON depth20 has no event time (records say 0); SBE's does, and consumers get it."""
    from pipeline.ipc.records import Flags, Kind
    from pipeline.ipc.ring import RingReader

    with RingReader.attach(shm_name) as rd:  # from now
        ing.handle_sbe(_Conn(), snapshot_frame(1_700_000_000_000_001, 42, [(100, 1)],
                                               [(101, 2)]), RECV)
        recs = rd.poll()
    top = recs[recs["kind"] == Kind.DEPTH_TOP]
    assert len(top) == 1
    assert int(top["flags"][0]) & int(Flags.SNAPSHOT)
    assert int(top["trade_id"][0]) == 42
    assert int(top["event_time_ns"][0]) == 1_700_000_000_000_001_000


def test_depth_diff_goes_to_the_book(ing: Any) -> None:
    calls: list[Any] = []
    ing._on_diff = calls.append
    ing.handle_sbe(_Conn(), diff_frame(1_700_000_000_000_000, 10, 12, [(1, 2)], []), RECV)
    assert len(calls) == 1
    assert calls[0].first_id == 10
    assert calls[0].last_id == 12


def test_sbe_diffs_apply_only_when_provably_contiguous(ing: Any) -> None:
    """What a reconnect relies on: after a synced book, an SBE diff is applied only if it
    provably continues it (U <= last u + 1 <= u, overlap allowed); one that skipped ids (the
    diffs sent while we were away) publishes nothing and puts the book back to a snapshot."""
    from pipeline.marketdata.book import BookState

    book = ing.depth.books[0]
    ing.handle_sbe(_Conn(), diff_frame(1_700_000_000_000_000, 5, 8, [(100, 1)], []), RECV)
    assert book.state is BookState.WAIT_SNAPSHOT  # the first diff asks for a snapshot
    book.on_snapshot(8, [(1.0, 1.0)], [(2.0, 1.0)])  # what recovery.resync would feed it
    c0 = ing.ring.cursor
    ing.handle_sbe(_Conn(), diff_frame(1_700_000_000_020_000, 9, 12, [(110, 1)], []), RECV)
    assert book.update_id == 12
    c1 = ing.ring.cursor
    assert c1 > c0
    # overlapping (a rotation's two connections): 11 <= 13 <= 16, applied
    ing.handle_sbe(_Conn(), diff_frame(1_700_000_000_040_000, 11, 16, [(120, 1)], []), RECV)
    assert book.update_id == 16
    assert ing.ring.cursor > c1
    # 17 never arrived (sent while disconnected): no book published, only the word that the
    # last one is stale (at update 16), and a resync due
    from pipeline.ipc.records import Kind
    from pipeline.ipc.ring import RingReader

    with RingReader.attach(ing.ring.name) as rd:
        ing.handle_sbe(_Conn(), diff_frame(1_700_000_000_060_000, 18, 20, [(130, 1)], []), RECV)
        recs = rd.poll()
    assert recs["kind"].tolist() == [Kind.BOOK_STALE]
    assert int(recs["trade_id"][0]) == 16
    assert book.state is BookState.WAIT_SNAPSHOT
    assert book.breaks == 1
    assert ing.c["callback_errors"] == 0


@pytest.mark.parametrize(("frame", "reason"), [
    (b"\x01\x02", sbe.TRUNCATED),
    (message(10001, b"\x00" * 50, b"", schema=9), sbe.WRONG_SCHEMA),
    (message(12345, b"\x00" * 8, b""), sbe.UNKNOWN_TEMPLATE),
    (trades_frame(1, [(1, 1, 1, 0)], sym=b"NOPEUSDT"), sbe.UNKNOWN_SYMBOL),
    (trades_frame(1, [(1, 1, 1, 0)], count=1000), sbe.GROUP_OVERRUN),
])
def test_hostile_frames_are_counted_by_reason(ing: Any, frame: bytes, reason: str) -> None:
    from pipeline.marketdata.ingest_metrics import metrics_fields

    c0 = ing.ring.cursor
    ing.handle_sbe(_Conn(), frame, RECV)
    assert ing.skipped[reason] == 1
    assert sum(ing.skipped.values()) == 1
    assert ing.ring.cursor == c0
    assert ing.c["callback_errors"] == 0
    names = {n for n, _ in metrics_fields(len(SYMS))}
    assert f"skipped_{reason}" in names


def _cfg(**kw: Any) -> Any:
    from pipeline.marketdata.config import IngestConfig, validate

    return validate(IngestConfig(symbols=["BTCUSDT"], **kw))


def test_sbe_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="no aggTrade over SBE"):
        _cfg(sbe_streams=["aggTrade"], sbe_api_key_env="K")
    with pytest.raises(ConfigError, match="also in --streams"):
        _cfg(streams=["trade"], sbe_streams=["trade"], sbe_api_key_env="K")
    with pytest.raises(ConfigError, match="also in --streams"):
        _cfg(streams=["bookTicker"], sbe_streams=["bestBidAsk"], sbe_api_key_env="K")
    with pytest.raises(ConfigError, match="API key"):
        _cfg(streams=["aggTrade"], sbe_streams=["trade"])
    cfg = _cfg(streams=["aggTrade"], sbe_streams=["trade"], sbe_api_key_env="K",
               sbe_url="ws://127.0.0.1:9/stream")
    assert cfg.sbe_url == "ws://127.0.0.1:9"
    assert _cfg().sbe_streams == []  # no SBE by default


def test_sbe_without_a_key_exits_2_with_a_message(shm_name: str) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "ingest", "--symbols", "BTCUSDT",
         "--streams", "aggTrade", "--sbe-streams", "trade",
         "--sbe-api-key-env", "PIPELINE_TEST_NO_SUCH_KEY",
         "--ring", f"{shm_name}_r", "--metrics", f"{shm_name}_m"],
        capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert "PIPELINE_TEST_NO_SUCH_KEY" in proc.stderr
    assert "API key" in proc.stderr


def test_sbe_key_from_a_file_wins_over_the_variable(tmp_path: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """--sbe-api-key-file (a systemd credential, say) is read like trading's --api-key-file and
    wins over --sbe-api-key-env; an unusable source is named, the key never shown."""
    from pipeline.config import SecretFileError
    from pipeline.marketdata.config import sbe_api_key

    key = tmp_path / "sbe.key"
    key.write_text("file-key-123\n")
    key.chmod(0o600)
    monkeypatch.setenv("PIPELINE_TEST_SBE_ENV_KEY", "env-key-456")
    both = _cfg(streams=["aggTrade"], sbe_streams=["trade"], sbe_api_key_file=str(key),
                sbe_api_key_env="PIPELINE_TEST_SBE_ENV_KEY")
    assert sbe_api_key(both) == "file-key-123"
    only_env = _cfg(streams=["aggTrade"], sbe_streams=["trade"],
                    sbe_api_key_env="PIPELINE_TEST_SBE_ENV_KEY")
    assert sbe_api_key(only_env) == "env-key-456"
    key.chmod(0o644)  # every local user could read it
    with pytest.raises(SecretFileError) as err:
        sbe_api_key(both)
    assert str(key) in str(err.value)
    assert "file-key-123" not in str(err.value)


def test_sbe_key_file_readable_by_others_exits_2_naming_the_file(tmp_path: Any,
                                                                 shm_name: str) -> None:
    key = tmp_path / "sbe.key"
    key.write_text("secret-sbe-key-789\n")
    key.chmod(0o644)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "ingest", "--symbols", "BTCUSDT",
         "--streams", "aggTrade", "--sbe-streams", "trade", "--sbe-api-key-file", str(key),
         "--ring", f"{shm_name}_r", "--metrics", f"{shm_name}_m"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert str(key) in proc.stderr
    assert "API key" in proc.stderr
    assert "secret-sbe-key-789" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_sbe_and_json_trades_of_one_session_are_the_same_records(
    tmp_path: Any, shm_name: str,
) -> None:
    """Done-when of #18: JSON @trade and SBE @trade of one simulated session give the same
    trade records (ids, prices, quantities, flags, kinds) over their common id range."""
    import numpy as np
    from nacl.signing import SigningKey

    from pipeline.ipc.records import Kind
    from pipeline.sim.testing import run_sim_process
    from tests.test_ingest_integration import run_ingest

    pub = tmp_path / "pub.hex"
    pub.write_text(SigningKey.generate().verify_key.encode().hex())
    key_file = tmp_path / "sbe.key"  # the key from a file here (the cut test: a variable)
    key_file.write_text("sbe-ingest-key\n")
    key_file.chmod(0o600)
    with run_sim_process("--api-key", f"sbe-ingest-key={pub}", "--symbols",
                         ",".join(SYMS)) as sim, \
            run_ingest(sim, f"{shm_name}_json", "--streams", "trade,bookTicker",
                       symbols=SYMS) as js, \
            run_ingest(sim, f"{shm_name}_sbe", "--streams", "aggTrade", "--sbe-url", sim.sbe_url,
                       "--sbe-streams", "trade,bestBidAsk",
                       "--sbe-api-key-file", str(key_file), symbols=SYMS) as sb:
        def trades(ing: Any) -> Any:
            r = ing.records()
            return r[(r["kind"] == Kind.TRADE) & (r["symbol"] == 0)]

        def enough() -> bool:
            a, b = trades(js), trades(sb)
            return len(a) > 50 and len(b) > 50 and len(
                np.intersect1d(a["trade_id"], b["trade_id"])) > 50

        sb.wait_for(enough, 60, "50 common trade ids")
        a, b = trades(js), trades(sb)
        lo = max(a["trade_id"][0], b["trade_id"][0])
        hi = min(a["trade_id"][-1], b["trade_id"][-1])
        a = a[(a["trade_id"] >= lo) & (a["trade_id"] <= hi)]
        b = b[(b["trade_id"] >= lo) & (b["trade_id"] <= hi)]
        assert len(a) == hi - lo + 1
        for f in ("kind", "flags", "symbol", "price", "qty", "trade_id"):
            assert np.array_equal(a[f], b[f]), f
        bba = sb.records()
        assert (bba["kind"] == Kind.BOOK_TICKER).any()
        assert sb.metrics()["skipped_total"] == 0


@pytest.mark.slow
def test_sbe_connection_cut_mid_session_keeps_trades_exactly_once_and_resyncs_the_book(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, shm_name: str,
) -> None:
    """Done-when of #18: an SBE connection dropped by the venue mid-session. What Binance sent
    while we were away is lost (the simulator's @trade and 20 ms diffs go to nobody then), so:
    the book resyncs from a snapshot (BOOK_RESYNC, tops flagged RESYNCED), the @trade ids
    printed meanwhile come from REST flagged BACKFILLED, every trade id is in the ring exactly
    once and in order, and aggTrade over JSON flows on across the cut.

    Why the refusal: a reconnect within one 20 ms window in which the book did not change
    gets a first diff that is provably contiguous (U <= last u + 1 <= u), and then no resync
    is due (that is what a first run of this test saw: 20 walk actions/s per symbol, ~40 ms
    to reconnect). Holding the SBE handshake refused until the JSON aggTrade stream shows
    trades printed while SBE was down makes the loss certain rather than likely."""
    import numpy as np
    from nacl.signing import SigningKey

    from pipeline.ipc.records import Flags, Kind
    from pipeline.sim.testing import run_sim_process
    from tests.test_ingest_integration import run_ingest

    pub = tmp_path / "pub.hex"
    pub.write_text(SigningKey.generate().verify_key.encode().hex())
    monkeypatch.setenv("PIPELINE_TEST_SBE_KEY", "sbe-ingest-key")
    with run_sim_process("--api-key", f"sbe-ingest-key={pub}", "--symbols",
                         ",".join(SYMS)) as sim, \
            run_ingest(sim, f"{shm_name}_drop", "--streams", "aggTrade", "--sbe-url", sim.sbe_url,
                       "--sbe-streams", "trade,depth",
                       "--sbe-api-key-env", "PIPELINE_TEST_SBE_KEY",
                       "--rest-api-key-env", "PIPELINE_TEST_SBE_KEY", symbols=SYMS) as sb:
        def of(kind: Kind, since: int = 0) -> Any:
            r = sb.records()[since:]
            return r[(r["kind"] == kind) & (r["symbol"] == 0)]

        sb.wait_for(lambda: len(of(Kind.TRADE)) > 20, 60, "SBE trades before the cut")
        sb.wait_for(lambda: len(of(Kind.BOOK_RESYNC)) >= 1, 60, "the SBE book synced")
        assert sb.metrics()["reconnects"] == 0
        sim.fault("refuse")  # new handshakes answered 503 until turned off (REST too)
        sim.fault("drop", target="sbe")
        sb.wait_for(lambda: sb.metrics()["connect_failures"] >= 1, 60,
                    "the SBE shard down, its reconnect refused")
        sb.metrics()  # metrics first, then the ring: what the shard read before it lost the
        cut = len(sb.records())  # connection is in the ring by now
        last_live = int(of(Kind.TRADE)["trade_id"][-1])
        aggs_at_cut = len(of(Kind.AGG_TRADE))

        def printed_while_down() -> int:  # the last trade id the JSON aggTrades cover
            a = of(Kind.AGG_TRADE, cut)
            return int(a["aux_id"].max()) if len(a) else -1

        sb.wait_for(lambda: printed_while_down() >= last_live + 5, 60,
                    "trades printed while SBE is down (JSON aggTrade flows on)")
        lost_until = printed_while_down()
        sim.fault("refuse", on=False)
        sb.wait_for(lambda: len(of(Kind.BOOK_RESYNC, cut)) >= 1, 60, "the book resynced")
        sb.wait_for(lambda: int(of(Kind.TRADE)["trade_id"][-1]) > lost_until + 20, 60,
                    "live SBE trades after the cut")
        m = sb.metrics()
        recs = sb.records()
        trades = of(Kind.TRADE)
        ids = trades["trade_id"]
        assert np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))), "exactly once, in order"
        filled = trades[(trades["flags"] & Flags.BACKFILLED) != 0]["trade_id"]
        # the hole the cut left, and only it, came from REST: from the first trade after the
        # last live one up to at least the last trade the JSON stream saw printed meanwhile
        assert len(filled) > 0
        assert filled[0] == last_live + 1
        assert np.array_equal(filled, np.arange(filled[0], filled[0] + len(filled)))
        assert filled[-1] >= lost_until
        live_after = trades[(ids > last_live) & ((trades["flags"] & Flags.BACKFILLED) == 0)]
        assert int(live_after["trade_id"][0]) == filled[-1] + 1
        resync = of(Kind.BOOK_RESYNC, cut)
        assert np.all(resync["flags"] & Flags.RESYNCED), "a resync after a sequence break"
        tops = of(Kind.DEPTH_TOP, cut)
        assert np.any(tops["flags"] & Flags.RESYNCED)
        all_tops = of(Kind.DEPTH_TOP)
        assert np.all(np.diff(all_tops["trade_id"]) > 0), "book updates once each, in order"
        aggs = of(Kind.AGG_TRADE)
        assert len(aggs) > aggs_at_cut
        assert np.array_equal(aggs["trade_id"], np.arange(aggs["trade_id"][0],
                                                          aggs["trade_id"][0] + len(aggs)))
        assert not np.any(recs["kind"] == Kind.GAP)
        assert m["reconnects"] >= 1
        assert m["book_breaks"] >= 1
        assert m["skipped_total"] == 0
        assert m["trade_ids_lost"] == 0
        assert m["trades_backfilled"] >= len(filled)
        assert m["callback_errors"] == 0
        # the book was marked stale once when its connection went, until the resync
        assert stale_marks(recs, 0, ends=(Kind.BOOK_RESYNC,)) == 1
        stale = recs[(recs["kind"] == Kind.BOOK_STALE) & (recs["symbol"] == 0)]
        assert int(stale["recv_time_ns"][0]) <= int(resync["recv_time_ns"][0])
        assert m["books_stale"] >= 1


#: one frame per skip reason of the done-when list (and a few more), each injected a distinct
#: number of times so the count under its own reason shows it was told apart from the others
WIRE_HOSTILE: list[tuple[str, bytes, str, int]] = [
    ("truncated", b"\x01\x02", sbe.TRUNCATED, 1),
    ("wrong schema id", trades_frame(5, [(1, 1, 1, 0)], schema=2), sbe.WRONG_SCHEMA, 2),
    ("unknown template", message(10004, b"\0" * 18, b""), sbe.UNKNOWN_TEMPLATE, 3),
    ("absurd group count", trades_frame(5, [(1, 1, 1, 0)], count=2**31 - 1),
     sbe.GROUP_OVERRUN, 4),
    ("oversized symbol", bba_frame(5, 9, 1, 2, 3, 4, b"X" * 255), sbe.UNKNOWN_SYMBOL, 5),
    ("block shorter than the schema's", message(10001, b"\0" * 16, b"\x07BTCUSDT"),
     sbe.SHORT_BLOCK, 6),
    ("price exponent -19", trades_frame(5, [(1, 1, 1, 0)], pexp=-19), sbe.BAD_EXPONENT, 7),
]


@pytest.mark.slow
def test_hostile_sbe_frames_over_the_wire_are_counted_skipped_and_trades_go_on(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, shm_name: str,
) -> None:
    """Done-when of #18 over the wire: hostile binary frames written into a live SBE
    connection by the simulator (``POST /sim/inject`` with ``target: sbe``) are each counted
    under their own ``skipped_sbe_*`` reason by a real ingest process, which stays up and
    keeps every @trade id exactly once and in order (a hostile frame of the trade template
    between real ones is no hole and no duplicate)."""
    import numpy as np
    from nacl.signing import SigningKey

    from pipeline.ipc.records import Kind
    from pipeline.sim.testing import run_sim_process
    from tests.test_ingest_integration import run_ingest

    pub = tmp_path / "pub.hex"
    pub.write_text(SigningKey.generate().verify_key.encode().hex())
    monkeypatch.setenv("PIPELINE_TEST_SBE_KEY", "sbe-ingest-key")
    with run_sim_process("--api-key", f"sbe-ingest-key={pub}", "--symbols",
                         ",".join(SYMS)) as sim, \
            run_ingest(sim, f"{shm_name}_bad", "--streams", "aggTrade", "--sbe-url", sim.sbe_url,
                       "--sbe-streams", "trade", "--sbe-api-key-env", "PIPELINE_TEST_SBE_KEY",
                       symbols=SYMS) as sb:
        def trades() -> Any:
            r = sb.records()
            return r[(r["kind"] == Kind.TRADE) & (r["symbol"] == 0)]

        sb.wait_for(lambda: len(trades()) > 10, 60, "SBE trades")
        assert sb.metrics()["skipped_total"] == 0
        for _what, frame, _reason, n in WIRE_HOSTILE:
            got = sim.inject(target="sbe", hex=frame.hex(), count=n)
            assert got == {"ok": True, "clients": 1, "frames": n}
        total = sum(n for *_, n in WIRE_HOSTILE)
        sb.wait_for(lambda: sb.metrics()["skipped_total"] >= total, 60, "every frame counted")
        last = int(trades()["trade_id"][-1])
        sb.wait_for(lambda: int(trades()["trade_id"][-1]) > last + 20, 60, "trades after them")
        m = sb.metrics()
        for what, _frame, reason, n in WIRE_HOSTILE:
            assert m[f"skipped_{reason}"] == n, what
        assert m["skipped_total"] == total
        assert m["callback_errors"] == 0
        assert m["reconnects"] == 0  # skipped, not a reason to drop the connection
        ids = trades()["trade_id"]
        assert np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))), "exactly once, in order"
        assert not np.any(sb.records()["kind"] == Kind.GAP)
        assert sim.state()["faults"]["fired"]["inject"] == total
        with pytest.raises(RuntimeError, match="hexadecimal"):  # a 400 with the reason
            sim.inject(target="sbe", hex="not hex")


def test_binary_inject_requests_are_checked() -> None:
    """The simulator's binary inject refuses what it cannot carry out with a clear 400."""
    from pipeline.sim.faults import FaultError
    from pipeline.sim.sbe_streams import MAX_INJECT_BYTES, parse_binary_inject

    assert parse_binary_inject({"target": "sbe", "hex": "0102ff"}, 1) == b"\x01\x02\xff"
    with pytest.raises(FaultError, match="hexadecimal"):
        parse_binary_inject({"target": "sbe", "hex": "zz"}, 1)
    with pytest.raises(FaultError, match="target sbe"):
        parse_binary_inject({"hex": "01"}, 1)
    with pytest.raises(FaultError, match="give `hex`"):
        parse_binary_inject({"target": "sbe"}, 1)
    with pytest.raises(FaultError, match="not \\['stream'\\]"):
        parse_binary_inject({"target": "sbe", "hex": "01", "stream": "btcusdt@trade"}, 1)
    with pytest.raises(FaultError, match="count"):
        parse_binary_inject({"target": "sbe", "hex": "00" * 1024}, MAX_INJECT_BYTES // 1024 + 1)
