"""The release artefacts work where users put them: a wheel built from this tree, installed into a
fresh virtualenv, loads the compiled fast path, ships its types and LICENSE, and reports the
version pyproject.toml declares.

Offline on purpose: the wheel is built with the build backend already in this environment
(``--no-build-isolation``) and installed with ``--no-deps``; the fresh venv borrows this
environment's dependencies (numpy, ...) through a path line in a ``.pth`` file. A path line is
not a site directory, so this environment's *editable* install of ``pipeline`` (its own ``.pth``
finder) is not picked up: ``import pipeline`` in the new venv can only be the wheel's copy, which
the test checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What a build needs from the tree (the sdist carries the same; see pyproject/setup.py).
SOURCES = ("pipeline", "pyproject.toml", "setup.py", "README.md", "LICENSE")

pytestmark = pytest.mark.slow


def _project() -> dict[str, object]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        project: dict[str, object] = tomllib.load(f)["project"]
    return project


def _copy_sources(dest: Path) -> Path:
    """A private copy of the sources: the build writes build/ and *.egg-info next to them, and
    other people's builds in the working tree must not race with this one."""
    src = dest / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(
                path, src / name,
                ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"),
            )  # fmt: skip
        else:
            shutil.copy2(path, src / name)
    return src


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which(sysconfig.get_config_var("CC").split()[0] or "cc") is None:
        pytest.skip("SKIPPED LOUDLY: no C compiler, so no wheel with the compiled fast path")
    tmp = tmp_path_factory.mktemp("dist")
    src = _copy_sources(tmp)
    out = tmp / "wheelhouse"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--wheel-dir", str(out), str(src)],
        check=True, cwd=tmp,
    )  # fmt: skip
    (built,) = out.glob("*.whl")
    return built


def test_the_wheel_carries_the_compiled_path_types_license_and_entry_points(wheel: Path) -> None:
    project = _project()
    dist = str(project["name"]).replace("-", "_")
    assert wheel.name.startswith(f"{dist}-{project['version']}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.startswith("pipeline/marketdata/_ticks.") and n.endswith(".so")]
    assert [n for n in names if n.startswith("pipeline/ipc/_futex.") and n.endswith(".so")]
    assert [n for n in names if n.startswith("pipeline/binance/_sbe.") and n.endswith(".so")]
    assert "pipeline/py.typed" in names
    assert f"{dist}-{project['version']}.dist-info/licenses/LICENSE" in names
    entry_points = zipfile.ZipFile(wheel).read(
        f"{dist}-{project['version']}.dist-info/entry_points.txt"
    ).decode()
    assert "[pipeline.consumers]" in entry_points
    assert "persist = pipeline.consumers.persist:from_args" in entry_points


def test_the_wheel_installed_in_a_fresh_venv_loads_the_compiled_fast_path(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    # the dependencies, from this environment (no network at test time)
    (site / "_borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel)],
        check=True,
    )  # fmt: skip
    probe = (
        "import json, pipeline\n"
        "from pipeline.marketdata import fastpath\n"
        "from pipeline.ipc import wake\n"
        "from pipeline.binance import sbe\n"
        "mod, why = fastpath.load()\n"
        "print(json.dumps({'file': pipeline.__file__, 'why': why, 'loaded': mod is not None,\n"
        "                  'version': pipeline.__version__, 'wake': wake.WHY,\n"
        "                  'sbe': sbe.load_compiled()[1]}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = subprocess.run(
        [str(python), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
        env=env,
    )  # fmt: skip
    report = json.loads(out.stdout)
    assert report["why"] == "compiled"
    assert report["loaded"] is True
    assert report["wake"] == "futex"  # sleeping readers are woken, not napping
    assert report["sbe"] == "compiled"  # SBE frames take the compiled decoder
    assert Path(report["file"]).is_relative_to(venv), report["file"]  # the wheel's, not the tree's
    assert report["version"] == _project()["version"]
    version = subprocess.run(
        [str(venv / "bin" / "pipeline"), "--version"], check=True, capture_output=True,
        text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert version.stdout.strip() == f"pipeline {_project()['version']}"


def test_downstream_mypy_sees_the_installed_wheel_s_types(wheel: Path, tmp_path: Path) -> None:
    """py.typed ships: a user's mypy, pointed at a venv with only the wheel installed, checks
    calls against our annotations (without the marker it would say "missing library stubs or
    py.typed marker" and treat everything as Any)."""
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    if mypy is None:
        pytest.skip("SKIPPED LOUDLY: mypy is not installed (the 'dev' extra)")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--no-deps", "--no-index", "--quiet", str(wheel)],
        check=True,
    )  # fmt: skip
    user = tmp_path / "user_code.py"
    user.write_text(
        "from pipeline import OrderClient, RingReader\n"
        "reveal_type(RingReader.attach)\n"
        "reveal_type(OrderClient)\n"
        "RingReader.attach(42)\n"  # a wrong type: only a typed package can say so
    )
    out = subprocess.run(
        [mypy, "--python-executable", str(venv / "bin" / "python"), "--no-incremental",
         "--ignore-missing-imports", "--follow-imports=silent", str(user)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert "py.typed" not in out.stdout, out.stdout
    assert 'Revealed type is "def (' in out.stdout, out.stdout
    assert 'Argument 1 to "attach" of "RingReader" has incompatible type "int"' in out.stdout, (
        out.stdout
    )
