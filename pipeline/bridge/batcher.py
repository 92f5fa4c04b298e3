"""Ring records -> per-subject batches, with what a restart and a lap need to know (sans-I/O).

The publisher polls the ring and hands each poll's records to :meth:`Batcher.add` with the ring
sequence of the first; :meth:`Batcher.ready` returns the batches to publish now, in the order they
must be published: a subject's batch when it holds ``max_records`` records, when its oldest record
has waited ``linger_ns``, or every non-empty one when the ring is idle.

Why the bookkeeping lives here and not in the asyncio shell: "no duplicate and no hole" across a
restart is arithmetic on ring sequences, and arithmetic is a unit test:

* each batch carries ``low``: every record below that ring sequence is in this batch or an earlier
  one (the smallest sequence still waiting in another subject's buffer, or the next unread one).
  A restarted publisher resumes reading the ring at the stream's last ``low``;
* records between ``low`` and ``high`` (the stream's last ``high``: nothing at or above it was ever
  published) may already be stored in another subject's batch: :meth:`learn` tells the batcher the
  last stored ring sequence of a subject (the shell asks the stream for the subject's last
  message, once per subject, only while such records are being re-read), and :meth:`add` drops
  the records at or below it. Within a subject batches are published in sequence order and the
  stream stores them in that order, so a subject's stored records are exactly a prefix of it;
* a lap (the ring writer overwrote records before the publisher read them: :meth:`note_lap`) is
  told downstream twice, in the tick format:

  - one *lap GAP* per lap (``Flags.LAPPED``, subject ``<prefix>._lap``), whatever the lost records
    were (book tickers, depth, ingest's own GAPs have no ids a reader could see jump):
    ``trade_id`` .. ``aux_id`` are the source ring sequences lost, so ``aux_id - trade_id + 1``
    records (exact while the publisher runs; when a restarted publisher finds its resume point
    overwritten, the range starts at that point and may also cover up to ``high - low`` records
    that reached the stream before the restart: which of those did is per subject and the
    records are gone, so it is an upper bound then). Every buffered record from before the lap
    is cut into a batch first, so on the stream (and in a mirror's ring) the lap GAP sits
    exactly between the records read before the lap and those read after it. A lap GAP found
    *in* the ring (a mirror's ring published on to another site) is relayed the same way:
    alone, on ``_lap``, in place, byte for byte;
  - per symbol whose aggregate/trade ids jump over the lost records, an id GAP (the ids, as
    ingest reports them), placed right before the first record after the jump.

A batch that starts with a record the batcher made (a GAP) is named on the stream by the ring
sequence it stands in for plus a tag (``Batch.tag``), so its message id never equals that of a
batch of real records starting at the same sequence (JetStream would drop it as a duplicate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.bridge.wire import LAP_TOKEN, MAX_PAYLOAD, kind_token, symbol_token
from pipeline.ipc.records import Flags, Kind

_TRACKED = {int(Kind.AGG_TRADE), int(Kind.TRADE)}
_GAP = int(Kind.GAP)
_TRADE = int(Kind.TRADE)
_TRADE_IDS = int(Flags.TRADE_IDS)
_LAPPED = int(Flags.LAPPED)
#: the subject key of lap GAPs (made here, or read from a mirror's ring and relayed): above any
#: ``symbol << 8 | kind``
LAP_KEY = 1 << 24
_TICK_FIELDS = ("kind", "flags", "symbol", "trade_id", "aux_id", "recv_time_ns")


@dataclass
class Batch:
    """One message to publish: the raw bytes of ``count`` records of one subject."""

    subject: str
    payload: bytes
    count: int
    first: int  #: ring sequence of the first record
    last: int  #: ring sequence of the last record
    low: int  #: every ring record below this is in this batch or an earlier one
    high: int  #: no ring record at or above this is in this batch or an earlier one
    #: "" for a batch led by a ring record; "gap" / "lap" when it starts with a GAP record the
    #: batcher made (its message id needs the tag: ``first`` is not a record of its own)
    tag: str = ""


@dataclass
class _Buffer:
    subject: str
    key: int
    records: list[np.ndarray] = field(default_factory=list)
    seqs: list[np.ndarray] = field(default_factory=list)
    count: int = 0
    since_ns: int = 0  #: when its oldest waiting record arrived
    first_seq: int = -1  #: ring sequence of its oldest waiting record
    gap_led: bool = False  #: its oldest waiting record is an id GAP the batcher made


class Batcher:
    """Splits ring records by subject (``<prefix>.<SYMBOL>.<kind>`` for tick records, else
    ``<prefix>.all``) and cuts them into batches. Not thread-safe; one per publisher."""

    def __init__(
        self, dtype: np.dtype, symbols: list[str], prefix: str, *, max_records: int = 64,
        linger_ns: int = 1_000_000, next_seq: int = 0,
    ) -> None:  # fmt: skip
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        self.dtype = dtype
        self.symbols = list(symbols)
        self.prefix = prefix
        self.max_records = max(1, min(max_records, MAX_PAYLOAD // dtype.itemsize))
        self.linger_ns = linger_ns
        names = set(dtype.names or ())
        self.ticks = all(f in names for f in _TICK_FIELDS)
        self._buffers: dict[int, _Buffer] = {}
        self.next_seq = next_seq  #: the next ring sequence add() expects
        self.high = next_seq  #: one past the highest ring sequence in any batch so far
        # resume: records below `resume_high` may be stored already; per subject key the last
        # stored ring sequence (-1: none), learnt from the stream
        self.resume_high = next_seq
        self._stored_last: dict[int, int] = {}
        # laps: per tracked key the last trade id sent and the lap count when it was sent
        self._last_id: dict[int, int] = {}
        self._lap_at_last: dict[int, int] = {}
        self.laps = 0
        self.skipped_stored = 0  #: records dropped because the stream already holds them
        self.gap_records = 0  #: id GAP records synthesised after laps
        self.lap_gaps = 0  #: lap GAP records (one per lap seen in the ring sequences)
        self.dropped_lapped = 0  #: records the ring writer overwrote before they were read
        # batches cut outside ready(): what was buffered when a lap was seen, then its lap GAP
        self._cut_early: list[Batch] = []

    # --- restart --------------------------------------------------------------------------

    def resume(self, low: int, high: int) -> None:
        """Start over from ring sequence ``low`` after a restart: records in [low, high) may be
        stored already (dropped per subject once :meth:`learn` says how far each got)."""
        self._buffers.clear()
        self.next_seq = low
        self.high = max(low, high)
        self.resume_high = high
        self._stored_last.clear()

    def unknown_keys(self, records: np.ndarray, first_seq: int) -> list[int]:
        """Subject keys of ``records`` whose stored position :meth:`learn` must supply before
        :meth:`add` (only while re-reading records that may be stored, or after a lap)."""
        if not len(records):
            return []
        resuming = first_seq < self.resume_high
        if not resuming and not self.laps:
            return []
        keys = np.unique(self._keys(records)).tolist()
        out = []
        for k in keys:
            if resuming and k not in self._stored_last:
                out.append(k)
            elif (
                self.laps and self.ticks and (k & 0xFF) in _TRACKED
                and k not in self._last_id and k not in self._stored_last
            ):  # fmt: skip
                out.append(k)
        return out

    def learn(self, key: int, last_seq: int, last_record: bytes | None) -> None:
        """What the stream holds for subject ``key``: the ring sequence of its last stored
        record (-1: none stored from this source incarnation) and that record's bytes."""
        self._stored_last[key] = last_seq
        if (
            last_record is not None and self.ticks and (key & 0xFF) in _TRACKED
            and len(last_record) == self.dtype.itemsize and key not in self._last_id
        ):  # fmt: skip
            rec = np.frombuffer(last_record, dtype=self.dtype)[0]
            self._last_id[key] = int(rec["trade_id"])
            # sent by an earlier session: before any lap this one has seen
            self._lap_at_last[key] = self.laps - 1 if self.laps else 0

    def subject_of(self, key: int) -> str:
        if not self.ticks:
            return f"{self.prefix}.all"
        if key == LAP_KEY:
            return f"{self.prefix}.{LAP_TOKEN}"
        return f"{self.prefix}.{symbol_token(self.symbols, key >> 8)}.{kind_token(key & 0xFF)}"

    # --- records in ------------------------------------------------------------------------

    def _keys(self, records: np.ndarray) -> np.ndarray:
        return self._keys_and_laps(records)[0]

    def _keys_and_laps(self, records: np.ndarray) -> tuple[np.ndarray, bool]:
        """Each record's subject key, and whether any is a lap GAP (key ``LAP_KEY``)."""
        if not self.ticks:
            return np.zeros(len(records), dtype=np.int64), False
        kinds = records["kind"]
        keys = (records["symbol"].astype(np.int64) << 8) | kinds.astype(np.int64)
        gaps = kinds == _GAP
        if not gaps.any():
            return keys, False
        laps = gaps & ((records["flags"] & _LAPPED) != 0)  # rare: only then the flags are read
        keys[laps] = LAP_KEY
        return keys, bool(laps.any())

    def note_lap(self, missed: int) -> None:
        """The ring writer overwrote ``missed`` records before they were read: the next record
        of each traded symbol whose ids jump gets a GAP record before it. (The lap GAP itself
        comes from the ring sequences :meth:`add` is given, which are exact whoever calls this.)
        Call it before :meth:`unknown_keys` so that the symbols' last ids are learnt."""
        if missed > 0:
            self.laps += 1
            self.dropped_lapped += missed

    def add(self, records: np.ndarray, first_seq: int, now_ns: int) -> None:
        """Take the records of one poll: ring sequences ``first_seq`` .. ``first_seq + n - 1``."""
        n = len(records)
        if not n:
            return
        if first_seq > self.next_seq:
            self._lapped(self.next_seq, first_seq, now_ns)
        keys, laps = self._keys_and_laps(records)
        if laps:  # lap GAPs of an upstream bridge
            self._add_around_laps(records, keys, first_seq, now_ns)
            return
        self.next_seq = first_seq + n
        self._add_groups(records, keys, first_seq, now_ns)

    def _add_around_laps(
        self, records: np.ndarray, keys: np.ndarray, first_seq: int, now_ns: int
    ) -> None:
        """Records with lap GAPs among them: each lap GAP goes out alone after everything
        before it (as one made here would), the rest as usual."""
        prev = 0
        for i in np.flatnonzero(keys == LAP_KEY).tolist():
            seq = first_seq + i
            if i > prev:
                self.next_seq = seq
                self._add_groups(records[prev:i], keys[prev:i], first_seq + prev, now_ns)
            self.next_seq = seq
            prev = i + 1
            if first_seq < self.resume_high and self._stored_last.get(LAP_KEY, -1) >= seq:
                self.skipped_stored += 1
                continue
            for buf in self._buffers.values():
                if buf.count:
                    self._cut_early.append(self._cut(buf, buf.count))
            self.next_seq = seq + 1
            self._append(LAP_KEY, records[i : i + 1], np.array([seq], np.int64), now_ns, 0)
            self._cut_early.append(self._cut(self._buffers[LAP_KEY], 1))
        n = len(records)
        self.next_seq = first_seq + n
        if prev < n:
            self._add_groups(records[prev:], keys[prev:], first_seq + prev, now_ns)

    def _add_groups(
        self, records: np.ndarray, keys: np.ndarray, first_seq: int, now_ns: int
    ) -> None:
        """Buffer ring records ``first_seq`` .. per subject (none of them a lap GAP)."""
        n = len(records)
        seqs = np.arange(first_seq, first_seq + n, dtype=np.int64)
        if not self.ticks:
            groups = [(0, records, seqs)]
        else:
            order = np.argsort(keys, kind="stable")
            sk = keys[order]
            cuts = np.flatnonzero(np.diff(sk)) + 1
            starts = [0, *cuts.tolist()]
            ends = [*cuts.tolist(), n]
            groups = []
            for a, b in zip(starts, ends, strict=True):
                sel = order[a:b]
                groups.append((int(sk[a]), records[sel], seqs[sel]))
        resuming = first_seq < self.resume_high
        for key, recs, sq in groups:
            if resuming:
                stored = self._stored_last.get(key, -1)
                if stored >= int(sq[0]):
                    keep = sq > stored
                    self.skipped_stored += int(len(sq) - np.count_nonzero(keep))
                    recs, sq = recs[keep], sq[keep]
                    if not len(sq):
                        continue
            lead = 0
            if self.ticks and (key & 0xFF) in _TRACKED:
                recs, sq, lead = self._with_gap(key, recs, sq, now_ns)
            self._append(key, recs, sq, now_ns, lead)

    def _lapped(self, lost_from: int, next_read: int, now_ns: int) -> None:
        """Ring sequences ``lost_from .. next_read - 1`` were overwritten unread: cut what is
        buffered (all of it read before the lap), then one lap GAP naming the lost sequences."""
        for buf in self._buffers.values():
            if buf.count:
                self._cut_early.append(self._cut(buf, buf.count))
        if not self.ticks:  # no record format to tell it in: counted (note_lap) and logged only
            return
        gap = np.zeros(1, dtype=self.dtype)
        gap["kind"] = _GAP
        gap["flags"] = _LAPPED
        gap["trade_id"] = lost_from
        gap["aux_id"] = next_read - 1
        gap["recv_time_ns"] = now_ns
        if "publish_time_ns" in (self.dtype.names or ()):
            gap["publish_time_ns"] = now_ns
        self.lap_gaps += 1
        # low: every record below the first one read after the lap is sent or lost (a publisher
        # restarted on this message resumes after the lap and never reports it twice)
        self._cut_early.append(Batch(
            self.subject_of(LAP_KEY), gap.tobytes(), 1, lost_from, next_read - 1,
            low=next_read, high=max(self.high, next_read), tag="lap",
        ))  # fmt: skip

    def _with_gap(
        self, key: int, recs: np.ndarray, sq: np.ndarray, now_ns: int
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """``recs`` with an id GAP before them if the symbol's ids jumped over a lap; and how
        many records were put before them (0 or 1)."""
        last = self._last_id.get(key)
        lap_before = self._lap_at_last.get(key, self.laps)
        self._last_id[key] = int(recs["trade_id"][-1])
        self._lap_at_last[key] = self.laps
        if last is None or lap_before == self.laps:
            return recs, sq, 0
        first_id = int(recs["trade_id"][0])
        if first_id <= last + 1 or int(sq[0]) < 1:
            return recs, sq, 0
        gap = np.zeros(1, dtype=self.dtype)
        gap["kind"] = _GAP
        gap["flags"] = _TRADE_IDS if (key & 0xFF) == _TRADE else 0
        gap["symbol"] = key >> 8
        gap["trade_id"] = last + 1
        gap["aux_id"] = first_id - 1
        gap["recv_time_ns"] = now_ns
        if "publish_time_ns" in (self.dtype.names or ()):
            gap["publish_time_ns"] = now_ns
        self.gap_records += 1
        # the GAP takes the sequence just before its record (so a subject's last stored
        # sequence never covers that record); the batch it leads is tagged "gap" (its id)
        gap_seq = np.array([int(sq[0]) - 1], dtype=np.int64)
        return np.concatenate([gap, recs]), np.concatenate([gap_seq, sq]), 1

    def _append(self, key: int, recs: np.ndarray, sq: np.ndarray, now_ns: int, lead: int) -> None:
        """Buffer ``recs``, the first ``lead`` of them GAPs made here (0 or 1): the buffer's
        ``first_seq`` (what ``low`` may say) is its first ring record's, since a made GAP's
        sequence may be a lost record's; and a made GAP always leads its batch (the tag)."""
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = _Buffer(self.subject_of(key), key)
        if lead and buf.count:  # (not seen: a lap cuts every buffer first)
            self._cut_early.append(self._cut(buf, buf.count))
        if not buf.count:
            buf.since_ns = now_ns
            buf.first_seq = int(sq[lead])
            buf.gap_led = bool(lead)
        buf.records.append(recs)
        buf.seqs.append(sq)
        buf.count += len(sq)

    # --- batches out -----------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Records buffered, not yet in a batch."""
        return sum(b.count for b in self._buffers.values())

    def _low(self) -> int:
        low = self.next_seq
        for b in self._buffers.values():
            if b.count and b.first_seq < low:
                low = b.first_seq
        return low

    def ready(self, now_ns: int, idle: bool = False) -> list[Batch]:
        """The batches to publish now, in publish order (see the module docstring)."""
        out, self._cut_early = self._cut_early, []
        linger = self.linger_ns
        for buf in self._buffers.values():
            while buf.count >= self.max_records:
                out.append(self._cut(buf, self.max_records))
            if buf.count and (idle or now_ns - buf.since_ns >= linger):
                out.append(self._cut(buf, buf.count))
        return out

    def _cut(self, buf: _Buffer, n: int) -> Batch:
        recs = buf.records[0] if len(buf.records) == 1 else np.concatenate(buf.records)
        seqs = buf.seqs[0] if len(buf.seqs) == 1 else np.concatenate(buf.seqs)
        take, rest = recs[:n], recs[n:]
        first, last = int(seqs[0]), int(seqs[n - 1])
        if len(rest):
            buf.records = [rest]
            buf.seqs = [seqs[n:]]
            buf.first_seq = int(seqs[n])
        else:
            buf.records, buf.seqs = [], []
            buf.first_seq = -1
        buf.count -= n
        self.high = max(self.high, last + 1)
        payload = take.tobytes()
        tag = "gap" if buf.gap_led else ""
        buf.gap_led = False
        return Batch(buf.subject, payload, n, first, last, self._low(), self.high, tag)
