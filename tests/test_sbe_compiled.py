"""The compiled SBE decoder (pipeline/binance/_sbe.c) against its reference, the pure-Python
SbeDecoder (pipeline/binance/sbe.py): for every input, the same result — tags, record tuples
(same types, floats bit for bit), DepthDiff/DepthPartial fields, skip reasons (the reference's
check order decides which fault wins) and the ``other_version_frames`` count.

The frames come from tests/test_sbe_decode.py's builders (checked there against the schema XML)
and its hostile cases, so the two files cannot drift apart; fuzzing here requires equality, not
just "no crash". Issue #18: "fuzzing that requires identical records from both".
"""

from __future__ import annotations

import dataclasses
import gc
import struct
import sys
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from pipeline.binance import sbe
from pipeline.binance import streams as st
from tests.test_sbe_decode import (
    B_HEADER,
    EDITS,
    HOSTILE,
    RECV,
    SYMBOLS,
    _valid_frames,
    bba_frame,
    diff_frame,
    m8,
    message,
    mutate,
    snapshot_frame,
    trades_frame,
)

_MOD, _WHY = sbe.load_compiled()
if _MOD is None:  # CI builds it (`make`): a skip here means the build lost the extension
    pytest.skip(f"SKIPPED LOUDLY: the compiled SBE decoder is not built: {_WHY}",
                allow_module_level=True)

I64_MAX = (1 << 63) - 1


def _pair(max_frame_bytes: int = 1 << 20) -> tuple[Any, sbe.SbeDecoder]:
    compiled, how = sbe.make_decoder(SYMBOLS, max_frame_bytes, mode="on")
    assert how == "compiled"
    return compiled, sbe.SbeDecoder(SYMBOLS, max_frame_bytes)


def canon(value: Any) -> Any:
    """``value`` with every type spelled out and floats as their exact bits (``float.hex``), so
    ``==`` cannot pass 1 for 1.0 or -0.0 for 0.0; dataclasses by class and fields."""
    if type(value) is float:
        return ("float", value.hex())
    if type(value) in (list, tuple):
        return (type(value).__name__, [canon(v) for v in value])
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__,
                [(f.name, canon(getattr(value, f.name))) for f in dataclasses.fields(value)])
    return (type(value).__name__, value)


def assert_same(frame: Any, recv: Any = RECV, *, pair: tuple[Any, sbe.SbeDecoder] | None = None
                ) -> tuple[int, Any]:
    """Both decoders on ``frame``: identical results and identical version counts."""
    compiled, python = pair or _pair()
    got, want = compiled.decode(frame, recv), python.decode(frame, recv)
    assert canon(got) == canon(want), (bytes(frame).hex() if not isinstance(frame, str)
                                       else frame)
    assert compiled.other_version_frames == python.other_version_frames
    return got  # type: ignore[no-any-return]


# ---- (a) every valid frame kind -----------------------------------------------------------------
def _valid_kinds() -> Iterator[bytes]:
    trades = [(6720857582, m8("83034.29000000"), m8("0.00062000"), 1),
              (6720857583, m8("83034.30000000"), m8("1.50000000"), 0),
              (6720857584, m8("0.00000001"), m8("92233720368.54775807"), 0)]
    yield trades_frame(1_790_649_901_913_456, trades, b"ETHUSDT")
    yield trades_frame(5, [])
    yield bba_frame(1_633_998_512_068_001, 499869768, m8("0.35210000"), m8("672.00000000"),
                    m8("0.35260000"), m8("3199.00000000"), b"NKNUSDT")
    yield snapshot_frame(1, 165284515, [(m8("0.48560000"), m8("2036.02000000"))],
                         [(m8("0.48570000"), 0)], b"FLMUSDT")
    yield snapshot_frame(1, 2, [], [])
    yield diff_frame(1_660_386_669_440_123, 22415664363, 22415664413,
                     [(m8("24488.92000000"), 0)], [], b"RUNEEUR")
    for pexp, qexp in [(-2, 3), (0, -1), (18, -18), (-18, 18), (0, 0), (5, 7)]:
        yield trades_frame(5, [(1, 12345, 7, 0), (2, I64_MAX, 2**53 + 1, 1)], pexp=pexp,
                           qexp=qexp)
        yield bba_frame(5, 9, 2**53, 2**53 + 1, I64_MAX, 0, pexp=pexp, qexp=qexp)
        yield diff_frame(5, 1, 1, [(3, 25), (2**60, 1)], [(4, 1)], pexp=pexp, qexp=qexp)
        yield snapshot_frame(5, 1, [(3, 25)], [(4, 1), (I64_MAX, I64_MAX)], pexp=pexp,
                             qexp=qexp)
    pad = b"\xee" * 8  # longer blocks and entries of a newer schema version, trailing var data
    yield trades_frame(5, [(1, 100, 200, 1), (2, 300, 400, 0)], extra_block=pad,
                       extra_entry=b"\xff" * 5, version=1)
    yield bba_frame(5, 9, 1, 2, 3, 4, extra_block=pad, version=1) + b"\x03abc"
    yield snapshot_frame(5, 9, [(1, 2)], [(3, 4), (5, 6)], extra_block=pad,
                         extra_entry=b"\x01", version=3)
    yield diff_frame(5, 8, 9, [(1, 2)], [(3, 4)], extra_block=pad, extra_entry=b"\x07" * 8,
                     version=65535) + b"\x03abc"


VALID = list(_valid_kinds())


@pytest.mark.parametrize("frame", VALID, ids=[f"valid{i}" for i in range(len(VALID))])
def test_valid_frames_decode_identically(frame: bytes) -> None:
    pair = _pair()
    got = assert_same(frame, pair=pair)
    assert got[0] in (sbe.TRADES, st.BOOK_TICKER, st.DEPTH_PARTIAL, st.DEPTH_DIFF), got
    # the same bytes as a bytearray and as memoryviews (whole, sliced out of a larger buffer)
    assert_same(bytearray(frame), pair=pair)
    assert_same(memoryview(frame), pair=pair)
    assert_same(memoryview(b"xx" + frame + b"yy")[2:-2], pair=pair)
    assert canon(pair[0].decode(memoryview(bytearray(frame)), RECV)) == canon(got)


def test_other_version_frames_are_counted_alike() -> None:
    compiled, python = _pair()
    newer = [f for f in VALID if struct.unpack_from(B_HEADER, f)[3] != 0]
    for f in [*VALID, *newer, trades_frame(5, [(1, 1, 1, 0)], version=2, pexp=40)]:
        assert_same(f, pair=(compiled, python))
    assert compiled.other_version_frames == python.other_version_frames == 2 * len(newer) + 1


def test_text_frames_and_unusual_buffers_take_the_reference_path() -> None:
    pair = _pair()
    for text in ('{"result":null,"id":7}', '{"e":"serverShutdown","E":1700000000000}',
                 "not json", ""):
        assert_same(text, pair=pair)
    f = VALID[0]
    assert_same(memoryview(f).cast("B", (1, len(f))), pair=pair)  # 2-D: the reference copies
    assert_same(memoryview(f + b"\0" * (-len(f) % 8)).cast("q"), pair=pair)  # 8-byte items
    assert_same(memoryview(f)[::2], pair=pair)  # not contiguous


def test_recv_time_is_carried_as_given() -> None:
    """The records carry the very recv time object the caller passed, as the reference does."""
    for recv in (0, -1, 2**70, RECV):
        for f in VALID[:6]:
            assert_same(f, recv)


# ---- (b) every hostile case of test_sbe_decode.py ------------------------------------------------
@pytest.mark.parametrize(("what", "frame", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_frame_is_the_same_skip(what: str, frame: bytes, reason: str) -> None:
    assert assert_same(frame) == (st.SKIP, reason)
    assert assert_same(bytearray(frame)) == (st.SKIP, reason)


def test_truncated_at_every_length_is_the_same_skip() -> None:
    pair = _pair()
    for f in _valid_frames():
        for cut in range(len(f)):
            assert assert_same(f[:cut], pair=pair)[0] == st.SKIP
    for f in VALID:  # some end in var data a newer version appended: a cut there still decodes
        for cut in range(len(f)):
            assert_same(f[:cut], pair=pair)


def test_several_faults_give_the_reference_reason() -> None:
    """Each pair of faults in one frame: the reference's check order picks the reason."""
    cases = [
        trades_frame(-5, [(-1, -1, 1, 7)], b"NOPE", pexp=-30),  # symbol before exponent
        trades_frame(-5, [(-1, 1, 1, 0)], b"BTC\xff", pexp=-30),
        trades_frame(-5, [(1, 1, 1, 0)], pexp=-30),  # exponent before numbers
        bba_frame(-5, -9, -1, 2, 3, 4, b"", qexp=99),
        bba_frame(-5, -9, -1, 2, 3, 4, qexp=99),
        diff_frame(-5, 3, 2, [(-1, -2)], [], pexp=19),
        diff_frame(-5, 3, 2, [(-1, -2)], [], b"X" * 200),
        snapshot_frame(-5, -1, [(1, 2)], [(-1, 2)], qexp=-19),
        message(10001, struct.pack("<qq", 1, 2), b"", schema=2),  # schema before template
        message(10009, b"", b"", schema=1, version=4),  # template before version count
        message(10001, b"\0" * 10, b"", version=2),  # short block, still counted
        message(10000, b"\0" * 40, b"", version=2),  # truncated block, still counted
        trades_frame(5, [(1, 1, 1, 0)], entry_len=3, count=2**32 - 1),  # short before overrun
        trades_frame(5, [(1, 1, 1, 0)], entry_len=25, count=2**32 - 1, pexp=99),
    ]
    pair = _pair()
    for f in cases:
        assert assert_same(f, pair=pair)[0] == st.SKIP


def test_oversized_frame_is_the_same_skip() -> None:
    pair = _pair(max_frame_bytes=64)
    f = diff_frame(5, 1, 2, [(1, 1)] * 4, [])
    assert len(f) > 64
    for frame in (f, bytearray(f), memoryview(f)):
        assert assert_same(frame, pair=pair) == (st.SKIP, st.OVERSIZED)
    assert assert_same(f[:64], pair=pair)[0] == st.SKIP  # just fits: truncated, not oversized


# ---- (c) fuzzing: identical results, never a crash -----------------------------------------------
@settings(max_examples=500, deadline=None)
@given(hs.binary(max_size=300))
def test_fuzz_random_bytes_identical(data: bytes) -> None:
    assert_same(data)


@settings(max_examples=800, deadline=None)
@given(hs.binary(max_size=300), hs.sampled_from([10000, 10001, 10002, 10003]),
       hs.integers(0, 3), hs.integers(0, 80))
def test_fuzz_random_bodies_behind_a_valid_header_identical(body: bytes, template: int,
                                                            version: int, block: int) -> None:
    assert_same(struct.pack(B_HEADER, block, template, 1, version) + body)


@settings(max_examples=1000, deadline=None)
@given(hs.sampled_from([*_valid_frames(), *VALID]), EDITS)
def test_fuzz_mutated_valid_frames_identical(frame: bytes, edits: list[tuple[str, int, int]]
                                             ) -> None:
    buf = mutate(frame, edits)
    assert_same(bytes(buf))
    assert_same(buf)


# mantissas where the C fast division ends and the PyLong path begins, and the int64 extremes
_EDGES = [0, 1, 2**53 - 1, 2**53, 2**53 + 1, 2**53 + 2, 2**63 - 1, 2**63 - 2, 10**18,
          10**18 + 1, 9_999_999_999_999_999, 2**62 + 1]
_extreme = hs.one_of(hs.sampled_from(_EDGES), hs.integers(0, I64_MAX),
                     hs.integers(2**53 - 2**12, 2**53 + 2**12), hs.integers(I64_MAX - 2**12,
                                                                           I64_MAX))
_any_mantissa = hs.one_of(_extreme, hs.integers(-(2**63), -1))
_lv = hs.tuples(_any_mantissa, _any_mantissa)
_exp = hs.integers(-20, 20)


@settings(max_examples=600, deadline=None)
@given(hs.one_of(hs.integers(0, I64_MAX // 1000), hs.integers(1 - 2**63, I64_MAX)),
       hs.one_of(hs.integers(0, I64_MAX), hs.integers(-(2**63), I64_MAX)), _exp, _exp,
       hs.lists(hs.tuples(hs.integers(-(2**63), I64_MAX), _extreme, _extreme,
                          hs.sampled_from([0, 1, 1, 2, 255])), max_size=6),
       hs.lists(_lv, max_size=6), hs.lists(_lv, max_size=6),
       hs.sampled_from([*(s.encode() for s in SYMBOLS), b"", b"NOPE", b"\xff"]))
def test_fuzz_events_with_extreme_mantissas_identical(
        ev_us: int, uid: int, pexp: int, qexp: int, trades: list[tuple[int, int, int, int]],
        bids: list[tuple[int, int]], asks: list[tuple[int, int]], sym: bytes) -> None:
    pair = _pair()
    assert_same(trades_frame(ev_us, trades, sym, pexp, qexp), pair=pair)
    b = bids[0] if bids else (2**53 + 1, I64_MAX)
    a = asks[0] if asks else (1, 2**53)
    assert_same(bba_frame(ev_us, uid, *b, *a, sym, pexp, qexp), pair=pair)
    assert_same(diff_frame(ev_us, uid, uid + 3 if uid < I64_MAX - 3 else uid, bids, asks, sym,
                           pexp, qexp), pair=pair)
    assert_same(snapshot_frame(ev_us, uid, bids, asks, sym, pexp, qexp), pair=pair)


@settings(max_examples=400, deadline=None)
@given(hs.integers(0, 3), hs.binary(max_size=12), hs.binary(max_size=9), hs.binary(max_size=6),
       hs.lists(hs.tuples(hs.integers(0, 9), _extreme, _extreme, hs.sampled_from([0, 1])),
                max_size=4),
       hs.lists(hs.tuples(_extreme, _extreme), max_size=4), hs.integers(-10, 10))
def test_fuzz_newer_versions_and_trailing_data_identical(
        version: int, extra_block: bytes, extra_entry: bytes, trailing: bytes,
        trades: list[tuple[int, int, int, int]], levels: list[tuple[int, int]], exp: int) -> None:
    """Longer blocks and entries (a newer schema version) and var data after the symbol: read
    at the frame's own strides by both decoders alike."""
    pair = _pair()
    kw: dict[str, Any] = {"version": version, "extra_block": extra_block}
    assert_same(trades_frame(5, trades, b"ETHUSDT", exp, -exp, extra_entry=extra_entry, **kw)
                + trailing, pair=pair)
    assert_same(bba_frame(5, 9, 1, 2, 3, 4, pexp=exp, **kw) + trailing, pair=pair)
    assert_same(snapshot_frame(5, 9, levels, levels[::-1], pexp=exp, extra_entry=extra_entry,
                               **kw) + trailing, pair=pair)
    assert_same(diff_frame(5, 8, 9, levels, [], qexp=exp, extra_entry=extra_entry, **kw)
                + trailing, pair=pair)


def test_division_is_exact_around_2_53_and_int64_max_for_every_exponent() -> None:
    """The C fast division (|m| <= 2**53) and the PyLong slow path meet here: every exponent,
    mantissas on both sides of the border, each the float Python's int/int gives."""
    pair = _pair()
    mantissas = [*range(2**53 - 40, 2**53 + 40), *range(I64_MAX - 40, I64_MAX + 1),
                 *(10**k + d for k in range(12, 19) for d in (-1, 0, 1))]
    for exp in range(-18, 19):
        levels = [(m, mantissas[-1 - i]) for i, m in enumerate(mantissas)]
        tag, val = assert_same(diff_frame(5, 1, 1, levels, [], pexp=exp, qexp=-exp), pair=pair)
        assert tag == st.DEPTH_DIFF
        want = [(sbe.decimal_value(p, exp), sbe.decimal_value(q, -exp)) for p, q in levels]
        assert [(p.hex(), q.hex()) for p, q in val.bids] == [
            (p.hex(), q.hex()) for p, q in want]


# ---- (d) no reference leaks ----------------------------------------------------------------------
def test_a_hundred_thousand_decodes_leak_no_references_or_memory() -> None:
    """Decoding the same frames over and over keeps every shared object's reference count and
    the heap flat (a leaked tuple per frame would show as ~100k objects / megabytes)."""
    compiled, _ = _pair()
    frames = [*VALID, *(h[1] for h in HOSTILE), b"\0" * 3, '{"result":null,"id":7}']
    recv = 1_700_000_000_000_000_123  # shared by every record: its count must come back
    # (the symbol ids are small ints, shared by the whole interpreter: their counts move for
    # reasons of their own, so the heap check below covers them)

    def counts() -> list[int]:
        return [sys.getrefcount(o) for o in (recv, *frames, st.DepthDiff, st.DepthPartial,
                                             *sbe.COMPILED_REASONS)]

    for f in frames:  # warm up: caches, interned results
        compiled.decode(f, recv)
    gc.collect()
    before = counts()
    tracemalloc.start()
    try:
        for f in frames:
            compiled.decode(f, recv)
        gc.collect()
        base, _ = tracemalloc.get_traced_memory()
        rounds = 100_000 // len(frames) + 1
        for _ in range(rounds):
            for f in frames:
                compiled.decode(f, recv)
        gc.collect()
        after_mem, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counts() == before
    assert after_mem - base < 64 * 1024, (base, after_mem)


def test_a_held_result_keeps_its_objects_alive() -> None:
    compiled, _ = _pair()
    held = [compiled.decode(f, RECV) for f in VALID]
    gc.collect()
    for _ in range(1000):
        for f in VALID:
            compiled.decode(f, RECV)
    gc.collect()
    assert [canon(h) for h in held] == [canon(compiled.reference.decode(f, RECV))
                                        for f in VALID]


# ---- (e) who picks which -------------------------------------------------------------------------
def test_make_decoder_modes() -> None:
    compiled, how = sbe.make_decoder(SYMBOLS, mode="auto")
    assert how == "compiled"
    assert isinstance(compiled, _MOD.Decoder)
    reference, how = sbe.make_decoder(SYMBOLS, mode="off")
    assert type(reference) is sbe.SbeDecoder
    assert how.startswith("python")
    with pytest.raises(ValueError, match="SBE decoder mode 'fast'"):
        sbe.make_decoder(SYMBOLS, mode="fast")


def test_the_bare_type_refuses_misuse_instead_of_crashing() -> None:
    bare = _MOD.Decoder.__new__(_MOD.Decoder)
    with pytest.raises(RuntimeError, match="not initialised"):
        bare.decode(VALID[0], RECV)
    compiled, _ = _pair()
    with pytest.raises(TypeError, match="2 arguments"):
        compiled.decode(VALID[0])
    with pytest.raises(RuntimeError, match="already initialised"):
        _MOD.Decoder.__init__(compiled, {}, 1, print, print, print, sbe.COMPILED_TAGS,
                              sbe.COMPILED_REASONS, (2, 3, 1))
    with pytest.raises(ValueError, match="reasons"):
        _MOD.Decoder({}, 1, print, print, print, sbe.COMPILED_TAGS, (), (2, 3, 1))
    with pytest.raises(TypeError, match="keys must be bytes"):
        _MOD.Decoder({"BTCUSDT": 0}, 1, print, print, print, sbe.COMPILED_TAGS,
                     sbe.COMPILED_REASONS, (2, 3, 1))


def test_mode_on_without_the_extension_is_a_clear_error(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setattr(sbe, "load_compiled", lambda: (None, "pipeline.binance._sbe is not "
                                                             "built (test)"))
    with pytest.raises(sbe.SbeDecoderUnavailable, match="not built"):
        sbe.make_decoder(SYMBOLS, mode="on")
    decoder, how = sbe.make_decoder(SYMBOLS, mode="auto")
    assert type(decoder) is sbe.SbeDecoder
    assert "not built" in how


@pytest.mark.parametrize(("fast_path", "compiled"), [("auto", True), ("on", True),
                                                      ("off", False)])
def test_the_ingest_picks_the_decoder_by_its_fast_path_mode(shm_name: str, fast_path: str,
                                                            compiled: bool) -> None:
    from pipeline.ipc.records import TICK_DTYPE
    from pipeline.ipc.ring import RingWriter
    from pipeline.marketdata.ingest import Ingest, IngestConfig

    syms = ["BTCUSDT", "ETHUSDT"]
    w = RingWriter.create(shm_name, TICK_DTYPE, 1 << 12, symbols=syms)
    try:
        cfg = IngestConfig(symbols=syms, streams=["aggTrade"],
                           sbe_streams=["trade", "bestBidAsk", "depth"],
                           sbe_api_key_env="SBE_KEY", fast_path=fast_path)
        ing = Ingest(cfg, w, None)
        assert isinstance(ing.sbe_decoder, _MOD.Decoder) is compiled
        assert ing._decode_sbe.__self__ is ing.sbe_decoder
        f = trades_frame(5, [(1, m8("1.50000000"), 2, 0)], b"ETHUSDT")
        assert canon(ing._decode_sbe(f, RECV)) == canon(
            sbe.SbeDecoder(syms).decode(f, RECV))
        ing._decode_sbe(bba_frame(5, 9, 1, 2, 3, 4, b"ETHUSDT", version=1), RECV)
        assert ing.sbe_decoder.other_version_frames == 1
    finally:
        w.close()


def test_ingest_fast_path_on_without_the_compiled_decoder_exits_2(shm_name: str) -> None:
    """``--fast-path on`` promises the compiled paths: with SBE streams and no compiled SBE
    decoder the real process refuses to start, saying why (import blocked for this run)."""
    import subprocess

    args = ["ingest", "--symbols", "BTCUSDT", "--streams", "aggTrade", "--sbe-streams", "trade",
            "--sbe-api-key-env", "PIPELINE_TEST_SBE_KEY", "--fast-path", "on",
            "--ring", f"{shm_name}_r", "--metrics", f"{shm_name}_m"]
    probe = (
        "import runpy, sys\n"
        "class BlockCompiledSbe:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'pipeline.binance._sbe':\n"
        "            raise ImportError('blocked by the test')\n"
        "sys.meta_path.insert(0, BlockCompiledSbe())\n"
        f"sys.argv = ['pipeline', *{args!r}]\n"
        "runpy.run_module('pipeline', run_name='__main__')\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PIPELINE_TEST_SBE_KEY": "not-a-real-key"}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--fast-path on" in proc.stderr
    assert "pipeline.binance._sbe is not built" in proc.stderr
    assert "not-a-real-key" not in proc.stderr + proc.stdout
