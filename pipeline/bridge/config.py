"""The ``[bridge]`` section: where the NATS server is, the stream, its retention, batching.

Kept apart from the shells so that loading a config (every process does) never imports the NATS
client. The publisher and the mirror read the same section: on the source host ``publish = true``
makes `pipeline run` start ``pipeline bridge publish``; on another host ``mirror_ring`` names the
local ring ``pipeline bridge mirror`` writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

DEFAULT_STREAM = "TICKS"
DEFAULT_PREFIX = "ticks"


def _m(doc: str, **checks: Any) -> dict[str, Any]:
    return {"doc": doc, **checks}


def default_state_dir() -> str:
    """systemd's ``StateDirectory=`` when run as a unit, else ``var/bridge``."""
    return os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "var/bridge"


@dataclass(frozen=True)
class BridgeConfig:
    nats_url: str = field(
        default="nats://127.0.0.1:4222", metadata=_m("NATS server URL (nats://HOST:PORT)")
    )
    stream: str = field(default=DEFAULT_STREAM, metadata=_m("JetStream stream name"))
    subject_prefix: str = field(
        default=DEFAULT_PREFIX, metadata=_m("subjects are <prefix>.<SYMBOL>.<kind>")
    )
    publish: bool = field(
        default=False, metadata=_m("`pipeline run` starts `pipeline bridge publish` (ring.name)")
    )
    mirror_ring: str = field(
        default="",
        metadata=_m("local ring `pipeline run` mirrors the stream into ('' for none)"),
    )
    max_age_s: float = field(
        default=3600.0, metadata=_m("stream retention by age, s (0: unlimited)", min=0.0)
    )
    max_bytes: int = field(
        default=0, metadata=_m("stream retention by size, bytes (0: unlimited)", min=0)
    )
    batch_records: int = field(default=64, metadata=_m("records per message", min=1, max=10000))
    linger_ms: float = field(
        default=1.0, metadata=_m("max wait for a batch to fill, ms", min=0.0, max=1.0)
    )
    max_in_flight: int = field(
        default=256, metadata=_m("unacknowledged messages before publishing waits", min=1)
    )
    start: str = field(
        default="all",
        metadata=_m("mirror without a saved position: all | new | seq:N | time:ISO8601"),
    )
    state_dir: str = field(
        default="", metadata=_m("mirror position files ('' : $STATE_DIRECTORY or var/bridge)")
    )
    mirror_capacity: int = field(
        default=1 << 16,
        metadata=_m("mirror ring slots (power of two)", min=1024, power_of_two=True),
    )
