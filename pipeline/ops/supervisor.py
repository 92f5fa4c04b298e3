"""Child-process supervision for `pipeline run`: restart policy, dependents, ordered shutdown.

Two layers, as everywhere in this project:

* :class:`RestartPolicy` / :class:`RestartTracker` are pure: given "this child exited with code X
  at time T after running for U seconds", they answer *restart at T+d* or *give up*. The backoff
  table (``initial * factor**n`` capped at ``max``), the reset after a stable run, and the
  start-limit (``max_restarts`` crashes within ``window``, like systemd's ``StartLimitBurst`` /
  ``StartLimitIntervalSec``) are unit-tested with plain numbers.
* :class:`Supervisor` is the thin shell: it owns :class:`subprocess.Popen` objects and a clock
  (injectable), and its caller drives it by calling :meth:`Supervisor.poll` every few tens of
  milliseconds from one thread. It never sleeps on its own except in :meth:`stop_all`.

Calling contract::

    sup = Supervisor(policy)
    sup.add(ChildSpec("sim", argv=lambda: [...], stop_order=3, capture_first_line=True))
    sup.add(ChildSpec("ingest", argv=lambda: [...], stop_order=2, depends_on=("sim",)))
    sup.start_all()                    # in insertion order; raises StartError on a bad start
    while running: sup.poll(); sleep(0.05)
    sup.stop_all()                     # SIGTERM by ascending stop_order, SIGKILL after a grace

Children run in their own process group (a terminal's Ctrl-C reaches only the supervisor, which
then stops them *in order*) and get ``PR_SET_PDEATHSIG=SIGTERM`` so that even a SIGKILLed
supervisor leaves no orphan behind.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

log = logging.getLogger("pipeline.supervisor")


# ------------------------------------------------------------------------------------------------
# pure core


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a crashed child. All times in seconds."""

    initial_s: float = 0.5
    max_s: float = 10.0
    factor: float = 2.0
    stable_after_s: float = 10.0  # a run this long resets the backoff to `initial_s`
    max_restarts: int = 10  # crashes within `window_s` before giving up (start limit)
    window_s: float = 60.0
    restart_on_success: bool = False  # exit code 0 means "done" (systemd Restart=on-failure)

    def delay(self, consecutive: int) -> float:
        """Delay before restart number ``consecutive`` (0-based) of an unstable child."""
        if consecutive <= 0:
            return self.initial_s
        return min(self.max_s, self.initial_s * self.factor**consecutive)

    def table(self, n: int) -> list[float]:
        """The first ``n`` delays; what `pipeline run --help` documents and tests pin down."""
        return [self.delay(i) for i in range(n)]


class RestartAction(enum.Enum):
    RESTART = "restart"
    DONE = "done"  # exited cleanly; stays stopped
    GIVE_UP = "give_up"  # start limit hit


@dataclass(frozen=True)
class Decision:
    action: RestartAction
    at: float = 0.0  # clock time at which to restart (RESTART only)
    delay: float = 0.0
    reason: str = ""


@dataclass
class RestartTracker:
    """Per-child restart bookkeeping. Pure: every method takes ``now`` from the caller."""

    policy: RestartPolicy
    # exit codes that mean "restarting cannot help" (systemd RestartPreventExitStatus=), e.g.
    # 2 = bad arguments/config, trading's 3 = logon rejected by the exchange
    final_codes: frozenset[int] = frozenset({2})
    consecutive: int = 0  # crashes since the last stable run
    crash_times: list[float] = field(default_factory=list)
    restarts: int = 0  # total restarts performed (reported in status / health)

    def on_exit(self, now: float, uptime: float, returncode: int) -> Decision:
        """A child exited on its own (not stopped by us). Returns what to do next."""
        if returncode == 0 and not self.policy.restart_on_success:
            return Decision(RestartAction.DONE, reason="exited 0")
        if returncode in self.final_codes:
            return Decision(
                RestartAction.GIVE_UP, reason=f"{describe_exit(returncode)}: final, not restarted"
            )
        if uptime >= self.policy.stable_after_s:
            self.consecutive = 0
        self.crash_times = [t for t in self.crash_times if now - t < self.policy.window_s]
        self.crash_times.append(now)
        if len(self.crash_times) > self.policy.max_restarts:
            return Decision(
                RestartAction.GIVE_UP,
                reason=f"{len(self.crash_times)} crashes within {self.policy.window_s:g}s",
            )
        delay = self.policy.delay(self.consecutive)
        self.consecutive += 1
        return Decision(
            RestartAction.RESTART, at=now + delay, delay=delay, reason=describe_exit(returncode)
        )

    def on_restarted(self) -> None:
        self.restarts += 1


def describe_exit(returncode: int) -> str:
    """``exited 3`` / ``killed by SIGKILL`` (Popen reports signals as negative codes)."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited {returncode}"


_SECRET_FLAGS = ("--api-key", "--password", "--postgres-url", "--token")


def redact_argv(argv: Sequence[str]) -> str:
    """The command line for a log line, with values of credential-ish flags replaced."""
    out: list[str] = []
    hide = False
    for arg in argv:
        if hide:
            out.append("<redacted>")
            hide = False
            continue
        flag, eq, _value = arg.partition("=")
        if flag in _SECRET_FLAGS:
            if eq:
                out.append(f"{flag}=<redacted>")
            else:
                out.append(arg)
                hide = True
            continue
        out.append(arg)
    return " ".join(out)


def stop_groups(specs: Iterable[ChildSpec]) -> list[list[str]]:
    """Names grouped by ascending ``stop_order``: the order :meth:`Supervisor.stop_all` uses."""
    groups: dict[int, list[str]] = {}
    for spec in specs:
        groups.setdefault(spec.stop_order, []).append(spec.name)
    return [groups[k] for k in sorted(groups)]


# ------------------------------------------------------------------------------------------------
# shell


class StartError(RuntimeError):
    """A child could not be started (or did not announce itself in time)."""


@dataclass
class ChildSpec:
    """How to run one child. ``argv`` is called at every (re)start, so it can pick up new facts
    (the simulator's fresh ports). ``stop_order``: lower stops first."""

    name: str
    argv: Callable[[], Sequence[str]]
    stop_order: int = 0
    depends_on: tuple[str, ...] = ()  # restarted (immediately) after any of these restarts
    cpus: frozenset[int] | None = None
    env: dict[str, str] | None = None
    capture_first_line: bool = False  # read one JSON line from stdout, then forward the rest
    start_timeout_s: float = 15.0
    optional: bool = False  # a failed start is reported, not fatal
    final_codes: frozenset[int] = frozenset({2})  # exit codes never restarted


@dataclass
class Child:
    spec: ChildSpec
    tracker: RestartTracker
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    state: str = "new"  # new | running | waiting | done | failed | stopped
    info: dict[str, Any] = field(default_factory=dict)  # the first-line JSON, if captured
    last_exit: str = ""
    intentional_stop: bool = False  # we stopped it to restart it (dependency); not a crash

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


_PR_SET_PDEATHSIG = 1
# Resolved once in the parent: between fork and exec the child must not dlopen (another thread
# may hold the loader lock at fork time), only call an already-bound function.
try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None


def _child_preexec() -> None:  # pragma: no cover - runs in the forked child
    """In the child before exec: die with the parent (Linux) so nothing is orphaned."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _forward(
    stream: IO[bytes],
    out: IO[bytes] | None,
    first: threading.Event | None,
    sink: dict[str, Any] | None,
) -> None:
    """Read a child's stdout: the first line (optionally) as JSON into ``sink``, the rest copied
    to ``out`` line by line so children's lines never interleave mid-line."""
    try:
        if first is not None and sink is not None:
            line = stream.readline()
            try:
                value = orjson.loads(line) if line.strip() else None
                if isinstance(value, dict):
                    sink.update(value)
                else:
                    sink["_error"] = f"first stdout line is not a JSON object: {line[:200]!r}"
            except orjson.JSONDecodeError:
                sink["_error"] = f"first stdout line is not JSON: {line[:200]!r}"
            first.set()
        for line in iter(stream.readline, b""):
            if out is not None:
                try:
                    out.write(line)
                    out.flush()
                except (OSError, ValueError):
                    out = None
    finally:
        if first is not None:
            first.set()
        stream.close()


class Supervisor:
    """Starts, watches, restarts and stops children. Drive it with :meth:`poll` from one thread."""

    def __init__(
        self,
        policy: RestartPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        stop_timeout_s: float = 5.0,
        on_event: Callable[[str, Child, str], None] | None = None,
        stdout: IO[bytes] | None = None,
    ) -> None:
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.stop_timeout_s = stop_timeout_s
        self.children: dict[str, Child] = {}
        self._on_event = on_event
        self._stdout = stdout if stdout is not None else sys.stdout.buffer
        self._threads: list[threading.Thread] = []
        self.stopping = False

    # -- setup
    def add(self, spec: ChildSpec) -> Child:
        if spec.name in self.children:
            raise ValueError(f"duplicate child name {spec.name!r}")
        child = Child(spec=spec, tracker=RestartTracker(self.policy, spec.final_codes))
        self.children[spec.name] = child
        return child

    def _event(self, what: str, child: Child, detail: str = "") -> None:
        log.info(
            "child %s: %s%s",
            child.spec.name,
            what,
            f" ({detail})" if detail else "",
            extra={"event": f"child_{what}", "child": child.spec.name, "pid": child.pid},
        )
        if self._on_event is not None:
            self._on_event(what, child, detail)

    # -- start
    def start(self, name: str) -> Child:
        """Start (or restart) one child now. Raises :class:`StartError` if it fails to start."""
        child = self.children[name]
        spec = child.spec
        argv = list(spec.argv())
        env = None if spec.env is None else {**os.environ, **spec.env}
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if spec.capture_first_line else None,
                env=env,
                start_new_session=True,
                preexec_fn=_child_preexec,  # prctl only: no locks taken between fork and exec
            )
        except OSError as exc:
            child.state = "failed"
            raise StartError(f"{name}: cannot exec {argv[0]!r}: {exc}") from exc
        child.proc = proc
        child.started_at = self.clock()
        child.restart_at = None
        child.intentional_stop = False
        child.info = {}
        child.state = "running"
        if spec.cpus:
            try:
                os.sched_setaffinity(proc.pid, spec.cpus)
            except OSError as exc:  # the process may already be gone; it will be seen as exited
                log.warning("cannot pin %s to %s: %s", name, sorted(spec.cpus), exc)
        if spec.capture_first_line:
            assert proc.stdout is not None
            first = threading.Event()
            t = threading.Thread(
                target=_forward,
                args=(proc.stdout, self._stdout, first, child.info),
                name=f"stdout-{name}",
                daemon=True,
            )
            t.start()
            self._threads.append(t)
            if not first.wait(spec.start_timeout_s) or "_error" in child.info or not child.info:
                problem = child.info.get("_error") or (
                    f"no address line within {spec.start_timeout_s:g}s"
                    if proc.poll() is None
                    else describe_exit(proc.returncode)
                )
                self._kill(child)
                child.state = "failed"
                raise StartError(f"{name}: {problem}")
        self._event("started", child, redact_argv(argv[1:])[:300])
        return child

    def start_all(self) -> None:
        """Start every child in insertion order; optional ones may fail (reported)."""
        for name, child in self.children.items():
            try:
                self.start(name)
            except StartError as exc:
                if not child.spec.optional:
                    raise
                self._event("unavailable", child, str(exc))

    # -- watch
    def poll(self) -> list[tuple[str, str]]:
        """Reap exited children, schedule/perform restarts. Returns ``(name, event)`` pairs."""
        events: list[tuple[str, str]] = []
        if self.stopping:
            return events
        now = self.clock()
        for name, child in self.children.items():
            if child.state == "running" and child.proc is not None:
                rc = child.proc.poll()
                if rc is None:
                    continue
                child.last_exit = describe_exit(rc)
                if child.intentional_stop:
                    child.state = "waiting"
                    child.restart_at = now
                    events.append((name, "exited_for_restart"))
                    continue
                decision = child.tracker.on_exit(now, now - child.started_at, rc)
                if decision.action is RestartAction.RESTART:
                    child.state = "waiting"
                    child.restart_at = decision.at
                    self._event(
                        "crashed", child, f"{decision.reason}; restart in {decision.delay:g}s"
                    )
                    events.append((name, "crashed"))
                elif decision.action is RestartAction.DONE:
                    child.state = "done"
                    self._event("done", child, decision.reason)
                    events.append((name, "done"))
                else:
                    child.state = "failed"
                    self._event("gave_up", child, decision.reason)
                    events.append((name, "gave_up"))
            elif (
                child.state == "waiting"
                and child.restart_at is not None
                and now >= child.restart_at
            ):
                try:
                    self.start(name)
                except StartError as exc:
                    # counts as another crash: same backoff/start-limit rules
                    decision = child.tracker.on_exit(now, 0.0, 1)
                    if decision.action is RestartAction.RESTART:
                        child.state = "waiting"
                        child.restart_at = decision.at
                        self._event("start_failed", child, f"{exc}; retry in {decision.delay:g}s")
                    else:
                        child.state = "failed"
                        self._event("gave_up", child, f"{exc}; {decision.reason}")
                    events.append((name, "start_failed"))
                    continue
                child.tracker.on_restarted()
                self._event("restarted", child, f"restart #{child.tracker.restarts}")
                events.append((name, "restarted"))
                self._restart_dependents(name)
        return events

    def _restart_dependents(self, name: str) -> None:
        """A dependency came back (maybe on new ports): bounce whoever depends on it."""
        for child in self.children.values():
            if name in child.spec.depends_on and child.state == "running" and child.proc:
                child.intentional_stop = True
                self._event("restarting", child, f"dependency {name} restarted")
                self._signal(child, signal.SIGTERM)

    # -- stop
    def _signal(self, child: Child, sig: int) -> None:
        if child.proc is None or child.proc.poll() is not None:
            return
        try:
            os.kill(child.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _kill(self, child: Child) -> None:
        self._signal(child, signal.SIGKILL)
        if child.proc is not None:
            try:
                child.proc.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                pass

    def kill_child(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one child as if it had crashed (fault injection, tests)."""
        self._signal(self.children[name], sig)

    def stop_all(self, timeout_s: float | None = None) -> dict[str, str]:
        """Stop every child, group by group in ascending ``stop_order``: SIGTERM, wait up to
        ``timeout_s``, then SIGKILL. Returns name -> how it ended (for the shutdown log)."""
        self.stopping = True
        timeout = self.stop_timeout_s if timeout_s is None else timeout_s
        result: dict[str, str] = {}
        for group in stop_groups(c.spec for c in self.children.values()):
            members = [self.children[n] for n in group]
            for child in members:
                self._signal(child, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for child in members:
                if child.proc is None:
                    result[child.spec.name] = "not running"
                    continue
                remaining = max(0.0, deadline - time.monotonic())
                try:
                    rc = child.proc.wait(remaining)
                    result[child.spec.name] = describe_exit(rc)
                except subprocess.TimeoutExpired:
                    self._kill(child)
                    result[child.spec.name] = f"SIGKILLed after {timeout:g}s"
                    log.warning(
                        "child %s ignored SIGTERM for %gs; killed", child.spec.name, timeout
                    )
                child.state = "stopped"
        for t in self._threads:
            t.join(timeout=2)
        return result

    def status(self) -> dict[str, dict[str, Any]]:
        """A plain snapshot (for logs and `pipeline run` status lines)."""
        return {
            name: {
                "state": c.state,
                "pid": c.pid,
                "restarts": c.tracker.restarts,
                "last_exit": c.last_exit,
            }
            for name, c in self.children.items()
        }
