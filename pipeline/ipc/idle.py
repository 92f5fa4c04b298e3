"""How an idle ring reader waits: spin, then sleep until woken (or nap where it cannot be woken).

Pure: :func:`next_nap` is the whole nap schedule as a function of the time idle, testable without
clocks; :meth:`pipeline.ipc.segments.RingReader.wait` is the loop that follows it. A reader
chooses its trade-off by name (``attach(..., idle="low-latency" | "balanced" | "low-cpu")``) or
with an explicit :class:`IdlePolicy`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IdlePolicy:
    """How :meth:`RingReader.wait` spends an idle period: the latency / CPU trade-off.

    Phases, measured from the start of the idle period (the first ``wait`` that found nothing;
    consecutive timed-out waits continue the same period, a wait that finds data ends it):

    1. spin for ``spin_s`` (records arriving then are seen within ~1 us);
    2. with ``futex`` (and wake-ups available, see :mod:`pipeline.ipc.wake`): sleep until the
       writer's next publish wakes the reader (~10 us later), costing no CPU meanwhile;
    3. otherwise nap, starting at ``first_nap_s`` and doubling up to ``max_sleep_s`` until the
       period is ``relax_after_s`` old (a record then waits at most one nap), then keep doubling
       up to ``relaxed_max_sleep_s`` (a quiet feed: one such nap, for much less CPU).

    The profiles differ in how long they spin, i.e. what they pay in CPU at the end of every
    burst to catch the next record within ~1 us rather than a wake-up later: ``low-latency``
    50 us, ``balanced`` 20 us, ``low-cpu`` none (a longer spin buys little on a 2-core host,
    where every spinning reader takes a core from the producer). Their nap schedules (the
    fallback) are the pre-futex ones: each nap is a wake-up of a few us of CPU; an idle ring
    costs ~15%
    (``low-latency``, 200 us cap), ~4.4% (``balanced``, 200 us, then up to 1 ms after 10 ms)
    and ~3% (``low-cpu``, 500 us, then 2 ms after 5 ms) of a core that way, against ~0 asleep
    on the futex (benchmarks/bench_ring.py ``test_reader_idle_cpu``).

    ``low-latency`` is the default: a trading client waiting for an order acknowledgement
    spins through the short gap before it; consumers that only watch market data should ask
    for ``balanced`` or ``low-cpu``.
    """

    spin_s: float = 20e-6
    first_nap_s: float = 10e-6
    max_sleep_s: float = 200e-6
    relax_after_s: float = 0.01
    relaxed_max_sleep_s: float = 1e-3
    #: after spinning, sleep on the writer's futex when wake-ups are available (else naps)
    futex: bool = True

    def __post_init__(self) -> None:
        for name in ("spin_s", "first_nap_s", "max_sleep_s", "relax_after_s",
                     "relaxed_max_sleep_s"):  # fmt: skip
            v = getattr(self, name)
            if not v >= 0 or v == float("inf"):
                raise ValueError(f"IdlePolicy.{name} must be finite and >= 0, got {v!r}")
        if self.first_nap_s <= 0:
            raise ValueError(f"IdlePolicy.first_nap_s must be > 0, got {self.first_nap_s!r}")
        if self.max_sleep_s < self.first_nap_s:
            raise ValueError("IdlePolicy.max_sleep_s must be >= first_nap_s")
        if self.relaxed_max_sleep_s < self.max_sleep_s:
            raise ValueError("IdlePolicy.relaxed_max_sleep_s must be >= max_sleep_s")


IDLE_PROFILES: dict[str, IdlePolicy] = {
    "low-latency": IdlePolicy(spin_s=50e-6, relaxed_max_sleep_s=200e-6),
    "balanced": IdlePolicy(),
    "low-cpu": IdlePolicy(
        spin_s=0.0,
        first_nap_s=50e-6,
        max_sleep_s=500e-6,
        relax_after_s=0.005,
        relaxed_max_sleep_s=2e-3,
    ),
}


def idle_policy(idle: str | IdlePolicy) -> IdlePolicy:
    """A profile by name (see :data:`IDLE_PROFILES`) or an explicit policy."""
    if isinstance(idle, IdlePolicy):
        return idle
    try:
        return IDLE_PROFILES[idle]
    except KeyError:
        raise ValueError(
            f"unknown idle profile {idle!r}; choose one of {', '.join(IDLE_PROFILES)} "
            "or pass an IdlePolicy"
        ) from None


def next_nap(policy: IdlePolicy, idle_s: float, last_nap_s: float) -> float:
    """How long to sleep next (0.0 = keep spinning), ``idle_s`` into an idle period, after a nap
    of ``last_nap_s`` (0.0 before the first nap). Pure: the whole schedule of
    :meth:`RingReader.wait`, testable without clocks."""
    if idle_s < policy.spin_s:
        return 0.0
    cap = policy.max_sleep_s if idle_s < policy.relax_after_s else policy.relaxed_max_sleep_s
    nap = policy.first_nap_s if last_nap_s <= 0.0 else last_nap_s * 2
    return min(nap, cap)


def nap_schedule(policy: IdlePolicy, duration_s: float) -> list[tuple[float, float]]:
    """The ``(idle_s, nap_s)`` naps of an idle period of ``duration_s`` if every nap lasted
    exactly as asked (spinning itself not listed): documentation and tests."""
    out: list[tuple[float, float]] = []
    t = policy.spin_s
    nap = 0.0
    while t < duration_s:
        nap = next_nap(policy, t, nap)
        out.append((t, nap))
        t += nap
    return out
