"""A throwaway PostgreSQL cluster for tests and benchmarks (tests/test_persist.py,
benchmarks/bench_persist.py): the real server, on a free port, unix socket only, in a fresh temp
directory that is removed afterwards; never a mock of a server we can run."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

NO_SERVER = (
    "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin; "
    "install Debian's 'postgresql' package to run this"
)


def find_server_binaries() -> tuple[str, str] | None:
    """(initdb, pg_ctl): PATH first, then where Debian's postgresql packages put them."""
    debian = ":".join(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))
    search = os.pathsep.join(filter(None, [os.environ.get("PATH"), debian]))
    initdb, pg_ctl = shutil.which("initdb", path=search), shutil.which("pg_ctl", path=search)
    return (initdb, pg_ctl) if initdb and pg_ctl else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """A throwaway cluster on a free port (unix socket only) that a test may stop and start
    again: the persist consumer must survive exactly that."""

    def __init__(self, initdb: str, pg_ctl: str) -> None:
        self.pg_ctl = pg_ctl
        # Not pytest's tmp_path: that lives under a 0700 root-owned directory the server user
        # cannot enter. A fresh directory directly in the temp dir, removed at teardown.
        self.base = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
        self.data, self.sock = self.base / "data", self.base / "sock"
        self.sock.mkdir()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            # postgres refuses to run as root: run the server as an unprivileged user
            import pwd

            user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
            runuser = shutil.which("runuser")
            if user is None or runuser is None:
                shutil.rmtree(self.base, ignore_errors=True)
                pytest.skip("running as root and no 'postgres'/'nobody' user + runuser to drop to")
            pw = pwd.getpwnam(user)
            for p in (self.base, self.sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            os.chmod(self.base, 0o755)
            self.prefix = [runuser, "-u", user, "--"]
        self.port = _free_port()
        self.url = f"postgresql://pipeline@/postgres?host={self.sock}&port={self.port}"
        self._run(initdb, "-D", str(self.data), "-A", "trust", "-U", "pipeline", "--no-sync",
                  "-E", "UTF8")  # fmt: skip

    def _run(self, *argv: str) -> None:
        subprocess.run([*self.prefix, *argv], check=True, capture_output=True, timeout=120,
                       cwd=self.base)  # fmt: skip

    def start(self) -> None:
        self._run(
            self.pg_ctl, "-D", str(self.data), "-w", "-t", "60", "-l",
            str(self.base / "server.log"), "-o",
            f"-p {self.port} -k {self.sock} -c listen_addresses='' -c fsync=off"
            " -c dynamic_shared_memory_type=mmap",  # no /dev/shm segments left behind
            "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        try:
            if self.running:
                self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
