"""Supervisor: pure restart policy with plain numbers, then real child processes."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.ops.affinity import apply, available_cpus, plan_cpus
from pipeline.ops.supervisor import (
    ChildSpec,
    RestartAction,
    RestartPolicy,
    RestartTracker,
    StartError,
    Supervisor,
    describe_exit,
    redact_argv,
    stop_groups,
)

PY = sys.executable

# ---------------------------------------------------------------------------------------------
# pure policy


def test_backoff_table_is_capped_exponential() -> None:
    p = RestartPolicy(initial_s=0.5, max_s=10, factor=2)
    assert p.table(7) == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_tracker_restarts_with_growing_delay_and_resets_after_stable_run() -> None:
    t = RestartTracker(RestartPolicy(initial_s=1, max_s=8, stable_after_s=30, max_restarts=100))
    d1 = t.on_exit(now=100.0, uptime=1.0, returncode=1)
    d2 = t.on_exit(now=102.0, uptime=1.0, returncode=-9)
    d3 = t.on_exit(now=105.0, uptime=1.0, returncode=1)
    assert [d.action for d in (d1, d2, d3)] == [RestartAction.RESTART] * 3
    assert [d.delay for d in (d1, d2, d3)] == [1, 2, 4]
    assert d2.at == 104.0
    assert d2.reason == "killed by SIGKILL"
    stable = t.on_exit(now=200.0, uptime=60.0, returncode=1)
    assert stable.delay == 1


def test_clean_exit_is_done_unless_configured() -> None:
    assert RestartTracker(RestartPolicy()).on_exit(0, 1, 0).action is RestartAction.DONE
    always = RestartTracker(RestartPolicy(restart_on_success=True))
    assert always.on_exit(0, 1, 0).action is RestartAction.RESTART


def test_final_exit_codes_are_not_restarted() -> None:
    t = RestartTracker(RestartPolicy(), final_codes=frozenset({2, 3}))
    d = t.on_exit(0.0, 100.0, 3)
    assert d.action is RestartAction.GIVE_UP
    assert "exited 3: final" in d.reason
    assert t.on_exit(0.0, 100.0, 4).action is RestartAction.RESTART


def test_start_limit_gives_up_within_window_only() -> None:
    t = RestartTracker(RestartPolicy(max_restarts=3, window_s=10, initial_s=0))
    for now in (0.0, 1.0, 2.0):
        assert t.on_exit(now, 0.5, 1).action is RestartAction.RESTART
    assert t.on_exit(3.0, 0.5, 1).action is RestartAction.GIVE_UP
    # crashes spread wider than the window never hit the limit
    slow = RestartTracker(RestartPolicy(max_restarts=3, window_s=10, initial_s=0))
    for i in range(20):
        assert slow.on_exit(i * 6.0, 0.5, 1).action is RestartAction.RESTART


def test_stop_groups_order_and_exit_descriptions() -> None:
    specs = [
        ChildSpec("sim", argv=list, stop_order=3),
        ChildSpec("ingest", argv=list, stop_order=2),
        ChildSpec("monitor", argv=list, stop_order=0),
        ChildSpec("persist", argv=list, stop_order=0),
        ChildSpec("trading", argv=list, stop_order=1),
    ]
    assert stop_groups(specs) == [["monitor", "persist"], ["trading"], ["ingest"], ["sim"]]
    assert describe_exit(3) == "exited 3"
    assert describe_exit(-15) == "killed by SIGTERM"


def test_redact_argv_hides_credentials() -> None:
    line = redact_argv(["trade", "--api-key", "SECRETKEY", "--x=1", "--api-key=OTHER"])
    assert "SECRETKEY" not in line
    assert "OTHER" not in line
    assert "--x=1" in line


# ---------------------------------------------------------------------------------------------
# affinity plan (pure)


def test_plan_gives_each_process_a_cpu_when_enough() -> None:
    plan = plan_cpus(["sim", "ingest", "trading", "monitor"], [0, 1, 2, 3, 4])
    assert not plan.shared
    assert not plan.notes
    cpus = [next(iter(c)) for c in plan.assignment.values()]
    assert len(set(cpus)) == 4
    assert plan.assignment["ingest"] == {0}  # priority: ingest first
    assert list(plan.assignment) == ["sim", "ingest", "trading", "monitor"]


def test_plan_shares_when_too_few_cpus_and_says_so() -> None:
    plan = plan_cpus(["sim", "ingest", "trading", "monitor"], [2, 5])
    assert plan.shared
    assert plan.assignment["ingest"] == {2}
    assert plan.assignment["trading"] == plan.assignment["sim"] == plan.assignment["monitor"] == {5}
    assert "share CPU 5" in plan.notes[0]
    assert "2 CPU(s) for 4" in plan.notes[0]
    single = plan_cpus(["ingest", "monitor"], [0])
    assert single.assignment == {"ingest": {0}, "monitor": {0}}


def test_plan_explicit_wins_and_is_checked() -> None:
    plan = plan_cpus(["ingest", "trading"], [0, 1, 2], explicit={"trading": 0})
    assert plan.assignment["trading"] == {0}
    assert plan.assignment["ingest"] != {0}
    with pytest.raises(ValueError, match=r"run\.cpus\.ingest"):
        plan_cpus(["ingest"], [0, 1], explicit={"ingest": 7})


def test_apply_pins_a_real_process() -> None:
    cpus = available_cpus()
    assert apply(os.getpid(), cpus)  # no-op pin to what we already have
    assert sorted(os.sched_getaffinity(0)) == cpus
    assert not apply(2**22 + 12345, cpus)  # no such pid: False, not an exception


# ---------------------------------------------------------------------------------------------
# real children


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _py(code: str) -> list[str]:
    return [PY, "-c", code]


def test_crashed_child_is_restarted_after_backoff() -> None:
    clock = FakeClock()
    sup = Supervisor(RestartPolicy(initial_s=5, max_restarts=5), clock=clock, stop_timeout_s=2)
    sup.add(ChildSpec("crasher", argv=lambda: _py("import sys; sys.exit(3)")))
    sup.start_all()
    child = sup.children["crasher"]
    assert child.proc is not None
    child.proc.wait(10)
    assert sup.poll() == [("crasher", "crashed")]
    assert child.state == "waiting"
    assert child.last_exit == "exited 3"
    clock.t += 4.9
    assert sup.poll() == []  # still backing off
    clock.t += 0.2
    first_pid = child.pid
    assert sup.poll() == [("crasher", "restarted")]
    assert child.pid != first_pid
    assert child.tracker.restarts == 1
    sup.stop_all()


def test_child_that_keeps_crashing_is_given_up() -> None:
    clock = FakeClock()
    sup = Supervisor(RestartPolicy(initial_s=0, max_restarts=2, window_s=60), clock=clock)
    sup.add(ChildSpec("bad", argv=lambda: _py("raise SystemExit(1)")))
    sup.start_all()
    child = sup.children["bad"]
    seen: list[str] = []
    for _ in range(10):
        assert child.proc is not None
        child.proc.wait(10)
        seen += [e for _, e in sup.poll()]
        if child.state == "failed":
            break
        seen += [e for _, e in sup.poll()]  # performs the (zero-delay) restart
    assert child.state == "failed"
    assert seen.count("restarted") == 2
    assert seen[-1] == "gave_up"
    sup.stop_all()


def test_first_line_is_captured_and_rest_forwarded() -> None:
    out = io.BytesIO()
    sup = Supervisor(stdout=out, stop_timeout_s=2)
    code = (
        # both lines in one write, so SIGTERM cannot land between them
        "import json,sys,time; sys.stdout.write(json.dumps({'rest':'http://x'}) + '\\nhello\\n');"
        "sys.stdout.flush(); time.sleep(60)"
    )
    sup.add(ChildSpec("sim", argv=lambda: _py(code), capture_first_line=True))
    sup.start_all()
    assert sup.children["sim"].info == {"rest": "http://x"}
    sup.stop_all()
    assert out.getvalue() == b"hello\n"


def test_bad_first_line_is_a_start_error() -> None:
    sup = Supervisor(stdout=io.BytesIO(), stop_timeout_s=2)
    sup.add(
        ChildSpec("sim", argv=lambda: _py("print('listening on 1234')"), capture_first_line=True)
    )
    with pytest.raises(StartError, match="not JSON"):
        sup.start_all()
    sup.stop_all()


def test_optional_child_that_cannot_start_is_reported_not_fatal() -> None:
    events: list[str] = []
    sup = Supervisor(on_event=lambda what, child, detail: events.append(what))
    sup.add(ChildSpec("ghost", argv=lambda: ["/nonexistent/binary"], optional=True))
    sup.start_all()
    assert "unavailable" in events
    sup.stop_all()


def test_ordered_shutdown_and_sigkill_escalation(tmp_path: Path) -> None:
    log = tmp_path / "order.log"
    # Each child appends its name when SIGTERM arrives, then exits; "stubborn" ignores SIGTERM.
    code = (
        "import signal,sys,time,os\n"
        "name=sys.argv[1]\n"
        "def h(*a):\n"
        "    open(sys.argv[2],'a').write(name+'\\n'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN if name=='stubborn' else h)\n"
        "open(sys.argv[2]+'.'+name,'w').close()\n"
        "time.sleep(60)\n"
    )
    # 2 s: a loaded 2-core machine can take more than 0.5 s to run a child's SIGTERM handler, and
    # a SIGKILL there would read as a wrong order
    sup = Supervisor(stop_timeout_s=2.0)
    for name, order in [("sim", 3), ("ingest", 2), ("stubborn", 1), ("monitor", 0)]:
        sup.add(ChildSpec(name, argv=[PY, "-c", code, name, str(log)].copy, stop_order=order))
    sup.start_all()
    for name in ("sim", "ingest", "stubborn", "monitor"):  # wait until each installed its handler
        for _ in range(3000):
            if Path(f"{log}.{name}").exists():
                break
            time.sleep(0.01)
        assert Path(f"{log}.{name}").exists(), f"{name} never started"
    result = sup.stop_all()
    assert log.read_text().split() == ["monitor", "ingest", "sim"]
    assert result["stubborn"].startswith("SIGKILLed")
    assert result["monitor"] == "exited 0"
    assert all(c.proc is not None and c.proc.returncode is not None for c in sup.children.values())


def test_dependents_are_restarted_when_their_dependency_restarts() -> None:
    clock = FakeClock()
    sup = Supervisor(RestartPolicy(initial_s=0), clock=clock, stop_timeout_s=2)
    sup.add(ChildSpec("sim", argv=lambda: _py("import time; time.sleep(60)")))
    sup.add(
        ChildSpec("ingest", argv=lambda: _py("import time; time.sleep(60)"), depends_on=("sim",))
    )
    try:
        sup.start_all()
        sim, ingest = sup.children["sim"], sup.children["ingest"]
        old_ingest = ingest.pid
        sup.kill_child("sim", signal.SIGKILL)
        assert sim.proc is not None
        sim.proc.wait(10)
        # How the events spread over polls depends on how fast the bounced child dies (it may
        # already be reaped in the poll that restarted its dependency): collect, then check order.
        events: list[tuple[str, str]] = []
        for _ in range(200):
            events += sup.poll()
            if ("ingest", "restarted") in events:
                break
            time.sleep(0.05)
        expected = [
            ("sim", "crashed"),
            ("sim", "restarted"),
            ("ingest", "exited_for_restart"),
            ("ingest", "restarted"),
        ]
        assert [e for e in events if e in expected] == expected
        assert ingest.pid != old_ingest
        assert ingest.tracker.consecutive == 0  # an intentional bounce is not a crash
    finally:
        sup.stop_all()


def test_children_die_with_a_killed_supervisor() -> None:
    """PR_SET_PDEATHSIG: even a SIGKILLed `pipeline run` leaves no orphan behind."""
    import psutil

    code = (
        "import sys,time; from pipeline.ops.supervisor import Supervisor, ChildSpec;"
        "s=Supervisor(); sleeper=[sys.executable, '-c', 'import time; time.sleep(60)'];"
        "s.add(ChildSpec('c', argv=lambda: sleeper));"
        "s.start_all(); print(s.children['c'].pid, flush=True); time.sleep(60)"
    )
    with subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True) as parent:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        child = psutil.Process(child_pid)
        parent.kill()
        parent.wait(10)
    assert child.wait(10) is not None or not child.is_running()
