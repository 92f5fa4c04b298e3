"""Benchmarks only: collect ``bench_*.py`` files and print the ring-vs-baselines table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # pyproject's python_files is test_*.py (for tests/); benchmark modules are bench_*.py
    # (a bench file named on the command line is collected by pytest itself: not twice)
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from summary import SECTIONS

    try:
        from ipc_baselines import RESULTS, report
    except ImportError:
        pass
    else:
        if RESULTS:
            SECTIONS.insert(0, report())
    for section in SECTIONS:
        terminalreporter.write_line("")
        for line in section.splitlines():
            terminalreporter.write_line(line)
