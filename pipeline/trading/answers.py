"""What the trading process writes for its clients: exec records and chunked replies.

Why apart from the process: the two rings the clients read have rules of their own (a record
out of range is published sanitized, never dropped with its batch; a reply is capped at a
quarter of its ring and becomes an error reply beyond) that are independent of connections,
timers and the session. The process hands every session update to :meth:`AnswerPublisher.publish`
(bound once, so the order path makes no extra call).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from pipeline.binance.wsapi import Response
from pipeline.ipc.ring import RingWriter
from pipeline.logs import RateLimitedLog
from pipeline.trading.riskgate import RiskGate
from pipeline.trading.session import LOCAL_INVALID, ApiReply
from pipeline.trading.wire import (
    EXEC_DTYPE,
    LOCAL_REPLY_TOO_LARGE,
    MAX_REPLY_BYTES,
    REPLY_CHUNK,
    ExecUpdate,
    exec_record,
    reply_records,
)

if TYPE_CHECKING:
    from pipeline.trading.process import TradingConfig

KEPT_UNTAGGED_REPLIES = 100  # answers to requests no client asked for (the session's own)


@dataclass(frozen=True, slots=True)
class ReplyTag:
    """Routes a generic request's answer to the client that asked (via the reply ring)."""

    client_id: int
    request_id: str
    method: str


class AnswerPublisher:
    """Writes the exec ring and the reply ring; counts what it wrote for the metrics block.

    The writers are created by :meth:`pipeline.trading.process.TradingProcess.run` and set
    here; until then (and after) nothing is written. ``risk`` hears of every exec record so the
    pre-trade check knows which of its in-flight orders the risk process could have seen.
    """

    def __init__(
        self, config: TradingConfig, *, risk: RiskGate | None, rate_limited_log: RateLimitedLog
    ) -> None:
        self.config = config
        self.exec_writer: RingWriter | None = None
        self.reply_writer: RingWriter | None = None
        self._risk = risk
        self._rl = rate_limited_log
        self.untagged: list[ApiReply] = []
        self.published = 0  # exec records
        self.replies_sent = 0
        self.sanitized = 0  # exec records published with their numbers zeroed

    def exec_array(self, execs: list[ExecUpdate], now: int) -> np.ndarray:
        """The exec records for ``execs``. One record that does not fit the dtype (a number
        out of range: a bug, since the decoders validate) must not keep the others out: it is
        published with its numbers zeroed and the error text saying so, and counted."""
        try:
            return np.array([exec_record(u, now) for u in execs], dtype=EXEC_DTYPE)
        except (OverflowError, ValueError, TypeError):
            pass
        out = np.zeros(len(execs), dtype=EXEC_DTYPE)
        for i, u in enumerate(execs):
            try:
                out[i] = exec_record(u, now)
            except (OverflowError, ValueError, TypeError):
                self.sanitized += 1
                self._rl.warning(
                    "exec_sanitized",
                    "execution record with an out-of-range number published sanitized",
                    client_order_id=u.client_order_id[:40],
                )
                out[i] = exec_record(
                    ExecUpdate(
                        u.client_order_id,
                        u.kind,
                        u.status,
                        symbol=u.symbol,
                        side=u.side,
                        client_id=u.client_id,
                        error_code=LOCAL_INVALID,
                        error_msg="record sanitized: number out of range",
                    ),
                    now,
                )
        return out

    def publish(self, updates: list[ExecUpdate | ApiReply]) -> None:
        now = time.time_ns()
        execs = [u for u in updates if isinstance(u, ExecUpdate)]
        for u in updates:
            if isinstance(u, ApiReply):
                if isinstance(u.tag, ReplyTag):
                    self.send_reply(u.tag, u.response)
                else:
                    self.untagged.append(u)
        del self.untagged[:-KEPT_UNTAGGED_REPLIES]
        writer = self.exec_writer
        if execs and writer is not None:
            recs = self.exec_array(execs, now)
            writer.publish_many(recs)
            self.published += len(recs)
            if self._risk is not None:
                cursor = writer.cursor
                for u in execs:
                    self._risk.published(u.client_order_id, u.kind, u.status, cursor)

    def send_reply(self, tag: ReplyTag, resp: Response) -> None:
        """An account-level answer, as chunked JSON on the reply ring (see :mod:`.wire`)."""
        writer = self.reply_writer
        if writer is None:
            return
        err = resp.error
        body: dict[str, Any] = {
            "request_id": tag.request_id,
            "method": tag.method,
            "ok": resp.ok,
            "status": resp.status,
            "result": resp.result,
            "error": {"code": err.code, "msg": err.msg} if err else None,
        }
        try:
            payload = orjson.dumps(body)
        except TypeError:  # not JSON-able (cannot happen for parsed JSON): say so
            body.update(result=None, error={"code": LOCAL_INVALID, "msg": "unencodable reply"})
            payload = orjson.dumps(body)
        limit = min(MAX_REPLY_BYTES, self.config.reply_capacity * REPLY_CHUNK // 4)
        if len(payload) > limit:
            msg = f"reply of {len(payload)} bytes exceeds the {limit}-byte limit; ask per symbol"
            body.update(ok=False, result=None, error={"code": LOCAL_REPLY_TOO_LARGE, "msg": msg})
            payload = orjson.dumps(body)
            self._rl.warning("reply_too_large", msg, method=tag.method)
        writer.publish_many(reply_records(tag.client_id, tag.request_id, payload))
        self.replies_sent += 1
