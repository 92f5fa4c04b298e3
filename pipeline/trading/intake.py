"""The trading process's side of the order rings: find them, read them, decode each record.

Why apart from the client: only the trading process reads order rings, and it alone needs the
trust rule, the reaping of dead clients and the stale-record guard.

Duplicate protection at the boundary: the trading process refuses (REJECT, code
:data:`~pipeline.trading.wire.LOCAL_STALE`) any order record submitted before it started or older
than ``max_order_age_s``, so a restarted trading process never re-executes what an earlier
instance may already have sent.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from pipeline.ipc import shm
from pipeline.ipc.ring import RingLayoutError, RingReader, RingUntrustedError
from pipeline.trading.wire import (
    LOCAL_STALE,
    ORDER_DTYPE,
    ORDER_RING_PREFIX,
    SIDES,
    STP_MODES,
    TIFS,
    TYPES,
    ExecKind,
    ExecUpdate,
    OrderAction,
    OrderStatus,
)

log = logging.getLogger("pipeline.orders")


@dataclass(slots=True)
class OrderCommand:
    """A decoded order record, ready for the session."""

    action: OrderAction
    client_id: int
    client_order_id: str
    orig_client_order_id: str
    symbol: str
    side: str
    type: str
    tif: str
    price: float
    qty: float
    submit_time_ns: int
    stp: str = ""  # selfTradePreventionMode ("" = the venue's default)


def decode_order(r: Any) -> OrderCommand:
    def idx(table: tuple[str, ...], v: Any) -> str:
        i = int(v)
        return table[i] if 0 <= i < len(table) else "?"

    return OrderCommand(
        action=OrderAction(int(r["action"])),
        client_id=int(r["client_id"]),
        client_order_id=bytes(r["client_order_id"]).decode("ascii", "replace"),
        orig_client_order_id=bytes(r["orig_client_order_id"]).decode("ascii", "replace"),
        symbol=bytes(r["symbol"]).decode("utf-8", "replace"),
        side=idx(SIDES, r["side"]),
        type=idx(TYPES, r["type"]),
        tif=idx(TIFS, r["tif"]),
        price=float(r["price"]),
        qty=float(r["qty"]),
        submit_time_ns=int(r["submit_time_ns"]),
        stp=idx(STP_MODES, r["stp"]),
    )


class OrderIntake:
    """The trading process's side: finds order rings and yields their commands.

    Pure except for the ring calls; time comes in as arguments.

    Trust: a name under the prefix is attached only if it passes the shared-memory trust rule
    (:mod:`pipeline.ipc.shm`: a regular file of our uid, no group/other bits, no symlink, no FIFO);
    anything else is refused once per (name, inode), logged, counted in ``untrusted`` and not
    opened again until the name holds another file. Another uid therefore cannot place orders
    through us by planting ``pipeline.orders.<x>``.

    Dead clients: a ring whose writer died (or closed) is read to its end once, its records
    executed or rejected as stale by the usual rules, then *reaped*: closed and unlinked by us
    if the name still holds that same file (``reaped`` += 1). Every command is taken at most
    once per ring incarnation whatever happens to the name: the next sequence to read is kept
    per (name, inode, epoch), so a ring that is found again (an unlink that failed, a rescan)
    resumes where it was left instead of being re-read from its oldest record. That makes every
    action idempotent across re-reads, cancel-all, status and account included.

    Bounds: at most :data:`MAX_TRACKED` (4096) ring incarnations are remembered as read-up-to
    and as refused (oldest forgotten first).
    """

    MAX_TRACKED = 4096

    def __init__(
        self, *, start_time_ns: int, max_order_age_s: float = 5.0, prefix: str = ORDER_RING_PREFIX
    ) -> None:
        self.prefix = prefix
        self.start_time_ns = start_time_ns
        self.max_age_ns = int(max_order_age_s * 1e9)
        self.readers: dict[str, RingReader] = {}
        self.stale = 0
        self.bad = 0
        self.untrusted = 0  # names refused by the trust rule (once per name and inode)
        self.untrusted_present = 0  # of those, how many were still there at the last scan
        self.reaped = 0  # rings of dead clients drained and unlinked
        self.shrunk = 0  # rings found shorter than mapped (dropped unread, never polled)
        # (name, inode, epoch_ns) -> next sequence to read: what was taken from each incarnation
        self._done: OrderedDict[tuple[str, int, int], int] = OrderedDict()
        # name -> inode not to attach again (refused, reaped, foreign dtype, shrunk)
        self._skip: OrderedDict[str, int] = OrderedDict()
        self._refused: OrderedDict[str, int] = OrderedDict()  # name -> inode, the untrusted

    @staticmethod
    def _key(name: str, reader: RingReader) -> tuple[str, int, int]:
        return (name, reader.inode, reader.epoch_ns)

    def _remember(self, table: OrderedDict[Any, int], key: Any, value: int) -> None:
        table[key] = value
        table.move_to_end(key)
        if len(table) > self.MAX_TRACKED:
            table.popitem(last=False)

    def scan(self) -> int:
        """Attach to new order rings, reap drained rings of dead clients; returns the count."""
        present = 0
        for name in shm.list_names(self.prefix):
            if name in self.readers:
                continue
            ino = shm.current_inode(name)
            if ino is not None and self._refused.get(name) == ino:
                present += 1
            if ino is None or self._skip.get(name) == ino:
                continue
            try:
                reader = RingReader.attach(name, name=f"trading{os.getpid()}"[:24], start="oldest")
            except RingUntrustedError as exc:
                self._remember(self._skip, name, ino)  # never opened again while it is this file
                self._remember(self._refused, name, ino)
                self.untrusted += 1
                present += 1
                shm.note_refusal(exc)  # logged once per process, whoever met it first
                continue
            except (FileNotFoundError, RingLayoutError, ValueError, OSError):
                continue  # gone again, or still being created: look at the next scan
            if reader.layout.dtype != ORDER_DTYPE:
                log.warning(
                    "order ring skipped: not an order ring",
                    extra={"ring": name, "dtype": str(reader.layout.dtype)},
                )
                self._remember(self._skip, name, reader.inode)
                self.bad += 1
                reader.close()
                continue
            done = self._done.get(self._key(name, reader))
            if done is not None and done > reader.pos:
                reader.pos = done  # already taken up to there: never again
            self.readers[name] = reader
        for name, reader in list(self.readers.items()):
            if reader.shrunk():
                log.warning("order ring shrank under us: dropped unread", extra={"ring": name})
                self.shrunk += 1
                self._remember(self._skip, name, reader.inode)
                reader.close()
                del self.readers[name]
            elif not reader.writer_alive() and reader.lag <= 0:
                self._reap(name, reader)
        self.untrusted_present = present
        return len(self.readers)

    def metrics(self) -> dict[str, int]:
        """Counters for the trading process's metrics block.

        ``problem_untrusted_order_rings`` counts refused names *still present* (someone planted
        a file under the order prefix: find its owner, remove it), so health clears once it is
        gone; ``problem_order_rings_shrunk`` is cumulative (only our own uid can shrink a ring:
        something is badly wrong)."""
        return {
            "order_rings": len(self.readers),
            "orders_stale": self.stale,
            "orders_bad": self.bad,
            "order_rings_reaped": self.reaped,
            "order_rings_refused": self.untrusted,
            "problem_untrusted_order_rings": self.untrusted_present,
            "problem_order_rings_shrunk": self.shrunk,
        }

    def _reap(self, name: str, reader: RingReader) -> None:
        """A dead (or closed) client's ring, read to its end: close it and remove the name if it
        still holds this very file; remember it so it is never read again either way."""
        ino = reader.inode
        self._remember(self._done, self._key(name, reader), reader.pos)
        self._remember(self._skip, name, ino)
        reader.close()
        del self.readers[name]
        removed = False
        try:
            removed = shm.unlink_if_inode(name, ino)
        except OSError as exc:
            log.warning("order ring of a dead client not removed", extra={"ring": name,
                        "error": str(exc)})  # fmt: skip
        if removed:
            self.reaped += 1
            log.info("order ring of a dead client reaped", extra={"ring": name})

    def poll(self, now_ns: int) -> tuple[list[OrderCommand], list[ExecUpdate]]:
        """Commands to execute, and REJECTs for stale or undecodable records."""
        cmds: list[OrderCommand] = []
        rejects: list[ExecUpdate] = []
        for name, reader in self.readers.items():
            batch = reader.poll()
            if len(batch):
                self._remember(self._done, self._key(name, reader), reader.pos)
            for r in batch:
                try:
                    cmd = decode_order(r)
                except (ValueError, KeyError):
                    self.bad += 1
                    continue
                if cmd.submit_time_ns < self.start_time_ns or now_ns - cmd.submit_time_ns > (
                    self.max_age_ns
                ):
                    self.stale += 1
                    rejects.append(
                        ExecUpdate(
                            cmd.client_order_id,
                            ExecKind.REJECT,
                            OrderStatus.REJECTED,
                            symbol=cmd.symbol,
                            side=cmd.side,
                            error_code=LOCAL_STALE,
                            error_msg="stale order record not executed",
                            submit_time_ns=cmd.submit_time_ns,
                            client_id=cmd.client_id,
                        )
                    )
                    continue
                cmds.append(cmd)
        return cmds, rejects

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()
