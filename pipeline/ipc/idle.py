"""How an idle ring reader waits: spin, then naps doubling to a cap that grows once idle a while.

Pure: :func:`next_nap` is the whole schedule as a function of the time idle, testable without
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
    2. nap, starting at ``first_nap_s`` and doubling up to ``max_sleep_s`` until the period is
       ``relax_after_s`` old (a record then waits at most one nap, <= ``max_sleep_s``);
    3. keep doubling up to ``relaxed_max_sleep_s`` (a quiet feed: worst-case wake-up latency is
       one such nap, for much less CPU).

    Each nap is a wake-up costing a few us of CPU (syscall, timer, one Python loop turn; timer
    slack at 1 ns). Measured on an idle ring (benchmarks/bench_ring.py ``test_reader_idle_cpu``,
    2-core VM): ``low-latency`` (200 us cap forever) ~15% of a core, ``balanced`` (200 us for the
    first 10 ms of idleness, then up to 1 ms) ~4.4%, ``low-cpu`` (no spin, 500 us, then up to
    2 ms after 5 ms) ~3%. The price is wake-up latency once idle for a while: up to 1 ms
    (balanced) or 2 ms (low-cpu) for the first record after a quiet spell.

    ``low-latency`` is the default because it is what every reader had before (a trading client
    waiting for an order acknowledgement must not see it up to 1 ms late because the reply ring
    had been quiet); consumers that only watch market data should ask for ``balanced`` or
    ``low-cpu``.
    """

    spin_s: float = 50e-6
    first_nap_s: float = 10e-6
    max_sleep_s: float = 200e-6
    relax_after_s: float = 0.01
    relaxed_max_sleep_s: float = 1e-3

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
    "low-latency": IdlePolicy(relaxed_max_sleep_s=200e-6),
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
