"""Result tables that every benchmark module hands to the end-of-run terminal summary.

pytest captures what a test or fixture prints, and ``--benchmark-only`` skips tests that do not
use the benchmark fixture, so modules do not print their tables themselves: they ``emit`` them
here and ``conftest.pytest_terminal_summary`` writes them after pytest-benchmark's own tables.
"""

from __future__ import annotations

SECTIONS: list[str] = []


def emit(text: str) -> None:
    SECTIONS.append(text.strip("\n"))
