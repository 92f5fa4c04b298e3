"""One simulator connection: websockets' ServerConnection plus the hooks the simulator needs.

Why a subclass: the simulator must see bytes websockets hides (a POST body, every incoming
frame for the 5 msg/s rule), hold output while black-holed, and write pre-encoded market frames
straight to the transport (:meth:`SimConnection.sim_write`), bypassing websockets' send path.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode
from websockets.protocol import State

if TYPE_CHECKING:
    from pipeline.sim.server import Simulator


class SimConnection(ServerConnection):
    """websockets' ServerConnection plus the hooks the simulator needs.

    - websockets' HTTP parser rejects request bodies; admin ``POST`` carries a JSON body, so the
      first request is buffered here, its body cut out into ``sim_body`` and the request fed on
      with ``Content-Length: 0``.
    - ``process_event`` counts every incoming frame (data, ping, pong) for the 5 msg/s rule.
    - ``send_data`` is held while black-holed (nothing leaves; flushed when it ends).
    - the ``refuse`` fault in "close" mode drops the TCP connection once the request line is
      known (so ``/sim`` admin requests still get through).
    """

    def __init__(self, sim: Simulator, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sim = sim
        self.sim_sniff: bytearray | None = bytearray()
        self.sim_body = b""
        self.sim_route: tuple[str, Any] | None = None
        self.sim_kind = ""  # "streams" | "wsapi" once accepted
        self.sim_blackholed = False
        self.sim_on_frame: Callable[[], None] | None = None

    def data_received(self, data: bytes) -> None:
        buf = self.sim_sniff
        if buf is None:
            super().data_received(data)
            return
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > 65536:  # not our business: let websockets reject it
                self.sim_sniff = None
                super().data_received(bytes(buf))
            return
        head = bytes(buf[: end + 4])
        faults = self.sim.faults
        if faults.refuse and faults.refuse_mode == "close":
            target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            if not target.startswith(b"/sim"):  # the admin API must stay reachable
                faults.count("refuse")
                self.sim_sniff = None
                self.transport.abort()
                return
        from pipeline.sim import rest_http

        if rest_http.wants(head):  # REST with keep-alive: not websockets' business
            self.sim_sniff = None
            rest_http.take_over(self, bytes(buf))
            return
        length = 0
        m = re.search(rb"(?im)^content-length:[ \t]*(\d+)[ \t]*\r\n", head)
        if m:
            length = int(m.group(1))
        if length > 1 << 20:
            self.sim_sniff = None
            super().data_received(bytes(buf))  # websockets answers 400
            return
        if len(buf) < end + 4 + length:
            return  # wait for the whole body
        self.sim_sniff = None
        if length:
            self.sim_body = bytes(buf[end + 4 : end + 4 + length])
            assert m is not None
            head = head[: m.start()] + head[m.end() :]
            rest = b""  # nothing may follow a non-upgrade request: we close after answering
        else:
            rest = bytes(buf[end + 4 :])
        super().data_received(head + rest)

    def process_event(self, event: Any) -> None:
        if (
            self.sim_on_frame is not None
            and isinstance(event, Frame)
            and event.opcode is not Opcode.CLOSE
        ):
            self.sim_on_frame()
        super().process_event(event)

    def send_data(self) -> None:
        if self.sim_blackholed:
            return
        super().send_data()

    # ---- fast path ----

    def sim_can_write(self) -> bool:
        return (
            not self.sim_blackholed
            and self.protocol.state is State.OPEN
            and not self.transport.is_closing()
        )

    def sim_write(self, data: bytes) -> bool:
        if not self.sim_can_write():
            return False
        self.transport.write(data)
        self.sim.stats["bytes_sent"] += len(data)
        return True

    def sim_blackhole(self) -> None:
        self.sim_blackholed = True
        with contextlib.suppress(Exception):
            self.transport.pause_reading()
        if self.keepalive_task is not None:
            self.keepalive_task.cancel()
            self.keepalive_task = None

    def sim_unblackhole(self) -> None:
        if not self.sim_blackholed:
            return
        self.sim_blackholed = False
        if self.transport.is_closing():
            return
        with contextlib.suppress(Exception):
            self.transport.resume_reading()
        self.send_data()
        if self.protocol.state is State.OPEN and self.keepalive_task is None:
            self.start_keepalive()
