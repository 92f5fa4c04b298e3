"""The public API is one import (`from pipeline import ...`); this pins its names so internals
can move without breaking users, and checks each name really resolves."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pipeline

PUBLIC = {
    "TICK_DTYPE",
    "TICK_RING",
    "ExecReport",
    "Flags",
    "Kind",
    "MetricsBlock",
    "OrderClient",
    "RingError",
    "RingReader",
    "RingWriter",
    "TradingNotRunningError",
}


def test_the_public_names_are_pinned_and_resolve() -> None:
    assert set(pipeline.__all__) == PUBLIC
    assert set(pipeline._EXPORTS) == PUBLIC  # every exported name has a home, and only those
    for name in PUBLIC:
        assert getattr(pipeline, name) is not None, name
    from pipeline.ipc.segments import RingReader

    assert pipeline.RingReader is RingReader


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        pipeline.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018


def test_import_pipeline_loads_nothing_else() -> None:
    """Lazy: `import pipeline` pulls in neither numpy nor any wing of the package."""
    code = (
        "import sys, pipeline; "
        "print(sorted(m for m in sys.modules if m.startswith('pipeline.') or m == 'numpy'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
