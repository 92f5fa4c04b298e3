"""Market data on the wire: WebSocket frames, and a whole TakerBatch encoded in one ``%``.

Why a module of its own: this is the encoding half of ``--rate max``. Byte templates and numpy
columns instead of a dict or an object per event are what let the simulator outrun a client
(~1.3 us of simulator CPU per message), and the bytes must equal the per-event encoders of
:mod:`pipeline.sim.market` framed one at a time (tests/test_sim_streams.py checks that).
Pure: no sockets, no clock.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.sim import market as mk


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final, unmasked server frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


_POW10 = np.array([10**i for i in range(19)], np.int64)
# a batch column for _frames: the row values and the length of each formatted
_Col = tuple[list[Any], npt.NDArray[np.int64]]


def _ints(col: npt.NDArray[np.int64]) -> _Col:
    """A column of non-negative ints and the length of each in decimal."""
    return col.tolist(), np.maximum(np.searchsorted(_POW10, col, side="right"), 1)


_P10_8 = 10 ** np.arange(7, -1, -1, dtype=np.int64)


def _units(col: npt.NDArray[np.int64]) -> list[_Col]:
    """A column of 1e-8 units as the two values of a ``%d.%s`` placeholder: the whole part,
    and the 8 fraction digits rendered by numpy (``%08d`` is several times slower)."""
    whole, frac = np.divmod(col, mk.SCALE)
    digits = ((frac[:, None] // _P10_8) % 10 + 48).astype(np.uint8)
    return [_ints(whole), (digits.view("S8").ravel().tolist(), np.full(len(col), 8, np.int64))]


def _prices(col: npt.NDArray[np.int64]) -> _Col:
    """A column of 1e-8 units with few distinct values (prices) as ready 8-decimal bytes."""
    uniq, inv = np.unique(col, return_inverse=True)
    strs = np.array([mk.fmt_units(x).encode() for x in uniq.tolist()], dtype=object)
    lens = np.array([len(x) for x in strs], np.int64)
    return strs[inv].tolist(), lens[inv]


_TF_OBJ = np.array([b"false", b"true"], dtype=object)


def _bools(col: npt.NDArray[np.bool_]) -> _Col:
    idx = col.astype(np.int64)
    return _TF_OBJ[idx].tolist(), 5 - idx  # false: 5 bytes, true: 4


# every frame header for payloads shorter than 4096 bytes, indexable by a numpy length array
_HDR_OBJ = np.array(
    [ws_frame(b"\0" * n)[: -n or None] for n in range(4096)],
    dtype=object,
)


def _frames(tpl: bytes, cols: list[_Col]) -> bytes:
    """All frames ``tpl % row`` for the rows of ``cols``, headers included, as ONE bytes.

    Each column is (values, their formatted lengths). The payload lengths come from the
    columns' lengths (numpy), so the frame headers are one more %s column and a single
    ``(tpl * n) % args`` formats the whole batch in C. Only %d and %s placeholders: they are
    the fast ones (``%c`` and ``%08d`` cost several times more)."""
    n = len(cols[0][0])
    if n == 0:
        return b""
    fixed = len(tpl % tuple(c[0][0] for c in cols)) - sum(int(c[1][0]) for c in cols)
    total: npt.NDArray[np.int64] = cols[0][1] + fixed
    for c in cols[1:]:
        total = total + c[1]
    if int(total.max()) >= len(_HDR_OBJ):  # not for market data: one frame at a time
        rows = zip(*(c[0] for c in cols), strict=True)
        return b"".join(ws_frame(tpl % row) for row in rows)
    cols = [(_HDR_OBJ[total].tolist(), total), *cols]
    k = len(cols)
    args: list[Any] = [None] * (n * k)
    for i, (vals, _lens) in enumerate(cols):
        args[i::k] = vals
    return ((b"%s" + tpl) * n) % tuple(args)


def micros_payload(payload: bytes) -> bytes:
    """A payload with its ``E`` and ``T`` times in microseconds (``timeUnit=MICROSECOND``)."""
    return _TIME_FIELD.sub(rb"\1\g<2>000", payload)


_TIME_FIELD = re.compile(rb'("[ET]":)(\d+)')


def batch_frames(
    b: mk.TakerBatch, kind: str, head: bytes = b"", tail: bytes = b"", micros: bool = False
) -> tuple[bytes, int]:
    """(wire frames, count) of one kind of a TakerBatch; each payload wrapped as
    ``head + payload + tail`` (the combined-stream envelope, or nothing); ``micros``: times in
    microseconds.

    Byte templates and %-formatting of ints instead of a dict or an object per event: this is
    what lets ``--rate max`` outrun a client. The bytes equal the ``encode_*`` output framed.
    """
    now, sym = b"%d" % (b.time * 1000 if micros else b.time), b.symbol.encode()
    if kind == "aggTrade":
        tpl = (
            head + b'{"e":"aggTrade","E":' + now + b',"s":"' + sym + b'","a":%d,"p":"%s",'
            b'"q":"%d.%s","f":%d,"l":%d,"T":' + now + b',"m":%s,"M":true}' + tail
        )
        n = len(b.a_price)
        cols = [
            _ints(np.arange(b.a0, b.a0 + n, dtype=np.int64)),
            _prices(b.a_price),
            *_units(b.a_qty),
            _ints(b.a_f),
            _ints(b.a_l),
            _bools(b.a_bm),
        ]
    elif kind == "trade":
        tpl = (
            head + b'{"e":"trade","E":' + now + b',"s":"' + sym + b'","t":%d,"p":"%s",'
            b'"q":"%d.%s","T":' + now + b',"m":%s,"M":true}' + tail
        )
        n = len(b.t_price)
        cols = [
            _ints(np.arange(b.t0, b.t0 + n, dtype=np.int64)),
            _prices(b.t_price),
            *_units(b.t_qty),
            _bools(b.t_bm),
        ]
    else:
        tpl = head + b'{"u":%d,"s":"' + sym + b'","b":"%s","B":"%d.%s","a":"%s","A":"%d.%s"}' + tail
        n = len(b.bt_u)
        cols = [
            _ints(b.bt_u),
            _prices(b.bt_bp),
            *_units(b.bt_bq),
            _prices(b.bt_ap),
            *_units(b.bt_aq),
        ]
    return _frames(tpl, cols), n

