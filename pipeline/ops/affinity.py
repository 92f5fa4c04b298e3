"""CPU pinning plan for the pipeline's processes.

Why pin: ingest and trading are latency-critical single-threaded event loops; a process that
stays on one core keeps its caches warm and is not migrated in the middle of a burst. The plan
is pure (:func:`plan_cpus`), so the "fewer cores than processes" case is a unit test rather than
a surprise on a small VM; :func:`apply` is the one line of OS interaction.

Policy: components are listed in priority order (ingest, trading, simulator, consumers). With at
least as many usable CPUs as components each gets its own. Otherwise the first ``n - 1``
components get a dedicated CPU each and the rest *share* the last one, and the plan says so in
``notes`` (the runner prints it). Explicit choices (``run.cpus`` in the config) always win.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# Lower index = more deserving of a dedicated core.
PRIORITY = ("ingest", "trading", "sim", "risk", "persist", "monitor")


@dataclass(frozen=True)
class CpuPlan:
    assignment: dict[str, frozenset[int]]
    shared: bool
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"{n}->{','.join(map(str, sorted(c)))}" for n, c in self.assignment.items()]
        return " ".join(parts)


def available_cpus() -> list[int]:
    """CPUs this process may run on (respects cgroups/taskset), sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return list(range(os.cpu_count() or 1))


def _priority(name: str) -> tuple[int, str]:
    base = name.split("@", 1)[0]
    return (PRIORITY.index(base) if base in PRIORITY else len(PRIORITY), name)


def plan_cpus(
    components: Iterable[str],
    cpus: Sequence[int],
    explicit: Mapping[str, int] | None = None,
) -> CpuPlan:
    """Assign CPUs to ``components`` (pure). ``explicit`` maps a name to a fixed CPU."""
    explicit = dict(explicit or {})
    names = list(dict.fromkeys(components))
    if not cpus:
        raise ValueError("no CPUs available")
    notes: list[str] = []
    assignment: dict[str, frozenset[int]] = {}
    for name, cpu in explicit.items():
        if name in names:
            if cpu not in cpus:
                raise ValueError(f"run.cpus.{name}: CPU {cpu} not available (have {list(cpus)})")
            assignment[name] = frozenset({cpu})
    rest = sorted((n for n in names if n not in assignment), key=_priority)
    free = [c for c in cpus if c not in {next(iter(s)) for s in assignment.values()}] or list(cpus)
    shared = False
    if len(rest) <= len(free):
        for name, cpu in zip(rest, free, strict=False):
            assignment[name] = frozenset({cpu})
    else:
        shared = True
        dedicated = len(free) - 1
        for name, cpu in zip(rest[:dedicated], free[:dedicated], strict=True):
            assignment[name] = frozenset({cpu})
        pool = frozenset({free[-1]}) if dedicated >= 0 else frozenset(cpus)
        sharers = rest[max(dedicated, 0) :]
        for name in sharers:
            assignment[name] = pool
        notes.append(
            f"only {len(cpus)} CPU(s) for {len(names)} processes: "
            f"{', '.join(sharers)} share CPU {','.join(map(str, sorted(pool)))}"
        )
    ordered = {n: assignment[n] for n in names}
    return CpuPlan(assignment=ordered, shared=shared, notes=notes)


def apply(pid: int, cpus: Iterable[int]) -> bool:
    """Pin ``pid`` to ``cpus``; False (not an exception) if the OS refuses or pid is gone."""
    try:
        os.sched_setaffinity(pid, set(cpus))
        return True
    except (OSError, AttributeError):
        return False


__all__ = ["PRIORITY", "CpuPlan", "apply", "available_cpus", "plan_cpus"]
