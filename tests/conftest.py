"""Session-wide hygiene: a run that leaks a /dev/shm segment or a child process fails."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

SHM = Path("/dev/shm")


# iceoryx2 (a benchmark baseline) keeps process-global management segments by design.
_FOREIGN_PREFIXES = ("sem.", "iox2_")


def _segments() -> set[str]:
    if not SHM.is_dir():
        return set()
    return {p.name for p in SHM.iterdir() if not p.name.startswith(_FOREIGN_PREFIXES)}


def _other_session(name: str) -> bool:
    """A `pt_<pid>_` segment of another live pytest session (developers run suites in parallel)."""
    parts = name.split("_", 2)
    if len(parts) < 3 or parts[0] != "pt" or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    return pid != os.getpid() and psutil.pid_exists(pid)


@pytest.fixture(scope="session", autouse=True)
def no_leaks() -> Iterator[None]:
    before = _segments()
    yield
    leaked_shm = sorted(n for n in _segments() - before if not _other_session(n))
    me = psutil.Process(os.getpid())
    children = [c for c in me.children(recursive=True) if c.is_running()]
    # Give dying children a moment, then kill what is left so CI is not poisoned by them.
    _gone, alive = psutil.wait_procs(children, timeout=3)
    for proc in alive:
        proc.kill()
    problems = []
    if leaked_shm:
        problems.append(f"leaked /dev/shm segments: {leaked_shm}")
        for name in leaked_shm:
            if name.startswith(f"pt_{os.getpid()}_"):  # ours for sure: do not poison the next run
                (SHM / name).unlink(missing_ok=True)
    if alive:
        problems.append(f"orphan child processes: {[(p.pid, p.name()) for p in alive]}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture
def shm_name(request: pytest.FixtureRequest) -> str:
    """A /dev/shm name unique to this test and process."""
    safe = "".join(c if c.isalnum() else "_" for c in request.node.name)[:40]
    return f"pt_{os.getpid()}_{safe}"
