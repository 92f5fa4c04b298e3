"""Log lines: journald priority prefixes when stderr is the journal, plain lines otherwise."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.logs import (
    JournalPriorityFormatter,
    JsonFormatter,
    TextFormatter,
    stderr_is_journal,
    syslog_priority,
)


@pytest.mark.parametrize(
    ("level", "priority"),
    [(logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3),
     (logging.CRITICAL, 2), (25, 6), (5, 7), (60, 2)],
)  # fmt: skip
def test_syslog_priority_of_each_level(level: int, priority: int) -> None:
    assert syslog_priority(level) == priority


def _journal_value(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}"


def test_journal_stream_must_match_the_descriptor(tmp_path: Path) -> None:
    mine, other = tmp_path / "stderr", tmp_path / "elsewhere"
    mine.touch()
    other.touch()
    with mine.open("w") as f:
        fd = f.fileno()
        assert stderr_is_journal({"JOURNAL_STREAM": _journal_value(mine)}, fd)
        # inherited from a parent whose stderr was the journal, ours is redirected: plain
        assert not stderr_is_journal({"JOURNAL_STREAM": _journal_value(other)}, fd)
        assert not stderr_is_journal({}, fd)
        for bad in ("", "12", "a:b", "1:2:3", ":"):
            assert not stderr_is_journal({"JOURNAL_STREAM": bad}, fd), bad
    assert not stderr_is_journal({"JOURNAL_STREAM": _journal_value(mine)}, -1)


def _record(level: int, msg: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("pipeline.test", level, __file__, 1, msg, None, exc_info)


def test_every_line_of_a_record_carries_the_prefix() -> None:
    fmt = JournalPriorityFormatter(TextFormatter())
    out = fmt.format(_record(logging.ERROR, "failed", exc=True))
    lines = out.splitlines()
    assert len(lines) > 2  # the traceback
    assert all(line.startswith("<3>") for line in lines), out
    line = JournalPriorityFormatter(JsonFormatter()).format(_record(logging.WARNING, "a\nb"))
    assert line.startswith("<4>{")
    assert "\n" not in line  # a JSON record stays one line
    assert json.loads(line[3:])["msg"] == "a\nb"


CHILD = """
import logging
from pipeline.logs import setup_logging
setup_logging()
log = logging.getLogger("pipeline.child")
log.debug("debug line")
log.info("info line")
log.warning("warning line", extra={"api_secret": "s3cr3t"})
log.error("error line")
log.critical("critical line")
"""


def _run_child(stderr_path: Path, journal_stream: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env.update(PIPELINE_LOG_FORMAT="json", PIPELINE_LOG_LEVEL="DEBUG")
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream
    with stderr_path.open("w") as err:
        subprocess.run([sys.executable, "-c", CHILD], env=env, stderr=err, check=True, timeout=60)
    return stderr_path.read_text().splitlines()


def test_process_under_journald_prefixes_priorities(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    path.touch()
    lines = _run_child(path, _journal_value(path))
    prefixes = [line[: line.index("{")] for line in lines]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<2>"], lines
    docs = [json.loads(line[3:]) for line in lines]
    assert [d["msg"] for d in docs] == ["debug line", "info line", "warning line", "error line",
                                        "critical line"]  # fmt: skip
    assert docs[2]["api_secret"] == "<redacted>"


def test_process_elsewhere_writes_plain_json(tmp_path: Path) -> None:
    path, other = tmp_path / "stderr", tmp_path / "journal-of-the-parent"
    other.touch()
    for stream in (None, _journal_value(other)):
        lines = _run_child(path, stream)
        assert len(lines) == 5, lines
        assert all(line.startswith("{") for line in lines), lines
        levels = [json.loads(line)["level"] for line in lines]
        assert levels == ["debug", "info", "warning", "error", "critical"]
