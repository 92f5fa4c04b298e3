"""What the bridge puts on JetStream, as pure functions: subjects, headers, the meta record.

A data message is the raw bytes of N ring records of one subject (the ring dtype *is* the wire
format: no re-encoding on either side) plus headers:

* ``Nats-Msg-Id`` ``<epoch>.<first seq>``: each ring record travels in exactly one message, so
  the sequence of its first record names a batch; a batch published twice (a retry after a
  lost ack) is stored once (JetStream de-duplication). A batch led by a GAP record the
  publisher made after a lap has no record of its own to be named by: ``<epoch>.<seq>.<tag>``
  (``gap``: an id GAP standing at ``seq``; ``lap``: the lap GAP of the lost sequences from
  ``seq``), so it never collides with a batch of ring records;
* ``Nats-Expected-Last-Sequence``: the stream sequence this message must follow. The publisher
  is the stream's only writer and knows it; if an earlier in-flight message was lost (a cut
  connection) every later one is refused instead of stored after a hole, so the stream is
  always a gap-free prefix of what the bridge meant to publish;
* ``Bridge-Layout``: a hash of the dtype, so a reader with another record layout fails loudly
  instead of misreading bytes;
* ``Bridge-Epoch`` (the source ring incarnation, its ``epoch_ns``), ``Bridge-First`` /
  ``Bridge-Last`` (ring sequences of the first and last record), ``Bridge-Low`` (every record
  below this ring sequence is in this message or an earlier one: where a restarted publisher
  resumes), ``Bridge-High`` (no record at or above it was sent yet) and ``Bridge-Meta``
  (stream sequence of the meta message describing the records).

A meta message (subject ``<prefix>._meta``, JSON) carries the dtype, the symbol table and the
source ring's epoch: what a mirror needs to create its ring. It is published at every (re)start
and whenever the source ring changes (a restarted writer, new symbols).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.ipc.layout import dtype_from_json, dtype_to_json
from pipeline.ipc.records import Kind

H_MSG_ID = "Nats-Msg-Id"
H_EXPECTED_LAST_SEQ = "Nats-Expected-Last-Sequence"
H_LAYOUT = "Bridge-Layout"
H_EPOCH = "Bridge-Epoch"
H_FIRST = "Bridge-First"
H_LAST = "Bridge-Last"
H_LOW = "Bridge-Low"
H_HIGH = "Bridge-High"
H_META = "Bridge-Meta"
H_KIND = "Bridge-Kind"  # "data" or "meta"

META_TOKEN = "_meta"
#: the subject token of lap GAPs (``<prefix>._lap``; see pipeline.bridge.batcher)
LAP_TOKEN = "_lap"
WIRE_VERSION = 1
#: the largest payload the bridge builds; the NATS default max_payload is 1 MiB
MAX_PAYLOAD = 1 << 20
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}")
_KIND_NAMES = {int(k): k.name.lower() for k in Kind}


class BridgeWireError(ValueError):
    """A message on the stream that this bridge cannot use: wrong layout, bad headers, a torn
    payload. Always fatal to the mirror (a silent misread would be worse)."""


def check_prefix(prefix: str) -> str:
    """A subject prefix (``ticks`` or ``site.ticks``): tokens of letters, digits, ``_``, ``-``."""
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"subject prefix {prefix!r}: dot-separated tokens of [A-Za-z0-9_-]")
    return prefix


def layout_hash(dtype: np.dtype) -> str:
    """16 hex digits naming a record layout (field names, types, offsets, size)."""
    return hashlib.sha256(dtype_to_json(dtype)).hexdigest()[:16]


def kind_token(kind: int) -> str:
    return _KIND_NAMES.get(kind, f"k{kind}")


def symbol_token(symbols: list[str], index: int) -> str:
    """The subject token of a symbol id: its name, or ``s<id>`` if the table has none that is
    a valid token (an id beyond the table, an odd name): never a subject we cannot build."""
    if 0 <= index < len(symbols) and _TOKEN_RE.fullmatch(symbols[index]):
        return symbols[index]
    return f"s{index}"


def meta_subject(prefix: str) -> str:
    return f"{prefix}.{META_TOKEN}"


@dataclass(frozen=True)
class SourceMeta:
    """The source ring as a mirror needs it: record dtype, symbol table, incarnation."""

    dtype: np.dtype
    symbols: tuple[str, ...]
    epoch_ns: int
    generation: int
    ring: str

    @property
    def layout(self) -> str:
        return layout_hash(self.dtype)

    def same_ring_shape(self, other: SourceMeta) -> bool:
        """Same dtype and symbols: a mirror ring made for one serves the other."""
        return self.dtype == other.dtype and self.symbols == other.symbols

    def encode(self) -> bytes:
        return json.dumps(
            {
                "v": WIRE_VERSION,
                "dtype": json.loads(dtype_to_json(self.dtype)),
                "layout": self.layout,
                "symbols": list(self.symbols),
                "epoch_ns": self.epoch_ns,
                "generation": self.generation,
                "ring": self.ring,
            }
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> SourceMeta:
        try:
            doc = json.loads(raw)
            if doc.get("v") != WIRE_VERSION:
                raise BridgeWireError(f"meta message of wire version {doc.get('v')!r}")
            dtype = dtype_from_json(json.dumps(doc["dtype"]).encode())
            meta = cls(
                dtype=dtype,
                symbols=tuple(str(s) for s in doc["symbols"]),
                epoch_ns=int(doc["epoch_ns"]),
                generation=int(doc["generation"]),
                ring=str(doc["ring"]),
            )
        except BridgeWireError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise BridgeWireError(f"malformed meta message: {exc}") from exc
        if meta.layout != doc.get("layout"):
            raise BridgeWireError(
                f"meta message layout {doc.get('layout')!r} does not match its dtype "
                f"({meta.layout}): written by an incompatible bridge"
            )
        return meta


def meta_headers(
    meta: SourceMeta, expected_last_seq: int, low: int, high: int
) -> dict[str, str]:
    return {
        H_MSG_ID: f"{meta.epoch_ns}.meta.{low}.{expected_last_seq}",
        H_EXPECTED_LAST_SEQ: str(expected_last_seq),
        H_KIND: "meta",
        H_LAYOUT: meta.layout,
        H_EPOCH: str(meta.epoch_ns),
        H_LOW: str(low),
        H_HIGH: str(high),
    }


def data_headers(
    *, epoch_ns: int, first: int, last: int, low: int, high: int, layout: str, meta_seq: int,
    expected_last_seq: int, tag: str = "",
) -> dict[str, str]:  # fmt: skip
    return {
        H_MSG_ID: f"{epoch_ns}.{first}.{tag}" if tag else f"{epoch_ns}.{first}",
        H_EXPECTED_LAST_SEQ: str(expected_last_seq),
        H_KIND: "data",
        H_LAYOUT: layout,
        H_EPOCH: str(epoch_ns),
        H_FIRST: str(first),
        H_LAST: str(last),
        H_LOW: str(low),
        H_HIGH: str(high),
        H_META: str(meta_seq),
    }


@dataclass(frozen=True)
class DataHeader:
    epoch_ns: int
    first: int
    last: int
    low: int
    layout: str
    meta_seq: int


def _int(headers: Mapping[str, Any], key: str) -> int:
    try:
        return int(headers[key])
    except (KeyError, TypeError, ValueError):
        raise BridgeWireError(f"header {key} missing or not an integer") from None


def is_meta(headers: Mapping[str, Any] | None) -> bool:
    return bool(headers) and headers is not None and headers.get(H_KIND) == "meta"


def parse_data_headers(headers: Mapping[str, Any] | None) -> DataHeader:
    if not headers or headers.get(H_KIND) != "data":
        raise BridgeWireError("not a bridge data message (no Bridge-Kind: data header)")
    return DataHeader(
        epoch_ns=_int(headers, H_EPOCH),
        first=_int(headers, H_FIRST),
        last=_int(headers, H_LAST),
        low=_int(headers, H_LOW),
        layout=str(headers.get(H_LAYOUT, "")),
        meta_seq=_int(headers, H_META),
    )


def resume_point(headers: Mapping[str, Any] | None) -> tuple[int, int, int] | None:
    """(source epoch, low, high) from the stream's last message (data or meta): resume reading
    the ring at ``low``; records in [low, high) may be stored already. None: not ours."""
    if not headers or headers.get(H_KIND) not in ("data", "meta"):
        return None
    return _int(headers, H_EPOCH), _int(headers, H_LOW), _int(headers, H_HIGH)


def decode_records(payload: bytes, dtype: np.dtype, layout: str, header: DataHeader) -> np.ndarray:
    """The records of a data message as a read-only structured array (no copy). Raises
    :class:`BridgeWireError` on a layout mismatch or a payload that is not whole records."""
    if header.layout != layout:
        raise BridgeWireError(
            f"record layout {header.layout!r} on the stream, {layout!r} expected: the source's "
            "dtype changed without a meta message, or another program writes this stream"
        )
    size = dtype.itemsize
    if len(payload) % size:
        raise BridgeWireError(f"payload of {len(payload)} bytes is not whole {size}-byte records")
    return np.frombuffer(payload, dtype=dtype)
