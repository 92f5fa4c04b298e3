"""The shared-memory trust rule, tried the way a hostile neighbour would (issue #11).

Foreign-uid cases run the attacker as uid 65534 with ``setpriv`` (CI runs as root); they skip,
saying why, where that is impossible. FIFO and symlink cases run the victim in a child process
with a timeout, so a regression shows as a failed test, not a hung run.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.ipc import shm
from pipeline.ipc.metrics import (
    MetricsBlock,
    MetricsLayoutError,
    MetricsUntrustedError,
    list_blocks,
)
from pipeline.ipc.records import TICK_DTYPE
from pipeline.ipc.ring import (
    RingLayout,
    RingLayoutError,
    RingReader,
    RingUntrustedError,
    RingWriter,
    WriterCore,
    format_header,
    list_rings,
)
from pipeline.trading.intake import OrderIntake
from pipeline.trading.wire import ORDER_DTYPE, OrderAction

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534
FIELDS = [("n", "<i8"), ("x", "<f8")]


def need_foreign_uid() -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not installed: cannot run the attacker as another uid")
    if os.geteuid() != 0:
        pytest.skip("not root: cannot run the attacker as another uid (CI runs as root)")


def as_nobody(script: str, *args: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run ``sh -c script`` as uid/gid 65534 with no groups (a hostile local account)."""
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "sh", "-c", script, "sh", *args],
        input=data, capture_output=True, timeout=60, check=False,
    )  # fmt: skip


def plant(path: Path, data: bytes) -> None:
    """The attacker creates ``path`` (mode 0666) holding ``data``."""
    r = as_nobody('umask 0; cat > "$1" && chmod 0666 "$1"', str(path), data=data)
    assert r.returncode == 0, r.stderr
    st = os.lstat(path)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o666)


def order_ring_bytes(client_order_id: bytes) -> bytes:
    """A well-formed order ring holding one fresh PLACE: exactly what OrderClient writes."""
    layout = RingLayout.compute(ORDER_DTYPE, 64)
    buf = bytearray(layout.total_size)
    format_header(buf, layout, writer_pid=os.getpid(), epoch_ns=time.time_ns())
    rec = (int(OrderAction.PLACE), 1, 1, 1, 7, 1.0, 1.0, time.time_ns(), b"BTCUSDT",
           client_order_id, b"", 0)  # fmt: skip
    WriterCore(buf, layout).publish(rec)
    return bytes(buf)


def file_bytes_of(name: str) -> bytes:
    return (shm.SHM_DIR / name).read_bytes()


def write_private(name: str, data: bytes, mode: int = 0o600) -> Path:
    path = shm.SHM_DIR / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


@pytest.fixture
def cleanup(shm_name: str) -> Iterator[list[str]]:
    """Names to remove after the test whoever owns them (root may unlink in sticky /dev/shm)."""
    names: list[str] = []
    try:
        yield names
    finally:
        for n in names:
            (shm.SHM_DIR / n).unlink(missing_ok=True)


def test_a_foreign_order_ring_places_no_order(shm_name: str, cleanup: list[str]) -> None:
    need_foreign_uid()
    prefix = f"{shm_name}.o."
    evil = f"{prefix}evil"
    cleanup += [evil, f"{prefix}ours"]
    plant(shm.SHM_DIR / evil, order_ring_bytes(b"evil-1"))
    intake = OrderIntake(start_time_ns=time.time_ns() - 10**9, max_order_age_s=600, prefix=prefix)
    try:
        for _ in range(3):
            assert intake.scan() == 0
            assert intake.poll(time.time_ns()) == ([], [])
        assert intake.untrusted == 1  # once per name and inode, not once per scan
        assert intake.metrics()["problem_untrusted_order_rings"] == 1
        assert shm.read_head(evil, 8) is None
        assert list_rings(prefix) == []
        with pytest.raises(RingUntrustedError, match=f"{evil}: owned by uid {NOBODY}"):
            RingReader.attach(evil)
        # The same bytes in a file of ours are a valid order ring: the refusal is the owner.
        write_private(f"{prefix}ours", order_ring_bytes(b"ours-1"))
        assert intake.scan() == 1
        cmds, _ = intake.poll(time.time_ns())
        assert [c.client_order_id for c in cmds] == ["ours-1"]
        (shm.SHM_DIR / evil).unlink()  # the operator removed the planted file: health clears
        intake.scan()
        assert intake.metrics()["problem_untrusted_order_rings"] == 0
        assert intake.metrics()["order_rings_refused"] == 1
    finally:
        intake.close()


def test_foreign_ring_and_metrics_block_are_refused_on_attach(
    shm_name: str, cleanup: list[str]
) -> None:
    need_foreign_uid()
    ring, block = f"{shm_name}.ring", f"{shm_name}.m"
    cleanup += [ring, block]
    with RingWriter.create(ring, TICK_DTYPE, 64) as w:
        ring_data = file_bytes_of(ring)
        w.close()
    with MetricsBlock.create(block, FIELDS) as m:
        block_data = file_bytes_of(block)
        m.close()
    plant(shm.SHM_DIR / ring, ring_data)
    plant(shm.SHM_DIR / block, block_data)
    with pytest.raises(RingUntrustedError, match=f"{ring}: owned by uid {NOBODY}"):
        RingReader.attach(ring, wait_s=30)  # at once, not after 30 s of retries
    with pytest.raises(MetricsUntrustedError, match=f"{block}: owned by uid {NOBODY}"):
        MetricsBlock.attach(block)
    assert list_blocks(shm_name) == []
    # A writer starting under a planted name refuses instead of clobbering or mapping it.
    with pytest.raises(RingUntrustedError):
        RingWriter.create(ring, TICK_DTYPE, 64)
    with pytest.raises(MetricsLayoutError):
        MetricsBlock.create(block, FIELDS)


def test_a_neighbour_cannot_shrink_our_ring(shm_name: str) -> None:
    """The SIGBUS attack needs write access to the mapped file: ours is 0600, so it fails."""
    need_foreign_uid()
    with RingWriter.create(shm_name, TICK_DTYPE, 64) as w:
        reader = RingReader.attach(shm_name)
        try:
            size = os.stat(shm.SHM_DIR / shm_name).st_size
            r = as_nobody('truncate -s 0 "$1" || : > "$1"', str(shm.SHM_DIR / shm_name))
            assert r.returncode != 0
            assert os.stat(shm.SHM_DIR / shm_name).st_size == size
            w.publish(np.zeros(1, TICK_DTYPE)[0])
            assert len(reader.poll()) == 1
        finally:
            reader.close()


# The victim side, in a child: each call must come back (with an error), not block.
VICTIM = textwrap.dedent(
    """
    import json, sys, time
    from pipeline.ipc import shm
    from pipeline.ipc.metrics import MetricsBlock
    from pipeline.trading.intake import OrderIntake
    from pipeline.ipc.segments import RingReader
    out = {}
    for name in sys.argv[2:]:
        for what, call in (
            ("ring", lambda: RingReader.attach(name)),
            ("metrics", lambda: MetricsBlock.attach(name)),
            ("metrics_create", lambda: MetricsBlock.create(name, [("n", "<i8")])),
        ):
            try:
                call()
                out[f"{name} {what}"] = "ATTACHED"
            except OSError as exc:
                out[f"{name} {what}"] = f"{type(exc).__name__}: {exc}"
        out[f"{name} read_head"] = repr(shm.read_head(name, 8))
    intake = OrderIntake(start_time_ns=0, prefix=sys.argv[1])
    out["intake"] = [intake.scan(), intake.scan(), intake.untrusted]
    print(json.dumps(out))
    """
)


def test_fifo_and_symlink_names_return_at_once_with_a_reason(
    shm_name: str, cleanup: list[str]
) -> None:
    prefix = f"{shm_name}.o."
    fifo, link = f"{prefix}fifo", f"{prefix}link"
    cleanup += [fifo, link]
    os.mkfifo(shm.SHM_DIR / fifo, 0o600)
    with RingWriter.create(f"{shm_name}.target", ORDER_DTYPE, 64) as target:
        # a symlink to a perfectly good ring of ours: following it is still refused
        os.symlink(shm.SHM_DIR / target.name, shm.SHM_DIR / link)
        r = subprocess.run(
            [sys.executable, "-c", VICTIM, prefix, fifo, link],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for what in ("ring", "metrics", "metrics_create"):
        assert "not a regular file (a FIFO)" in out[f"{fifo} {what}"], out
        assert "a symbolic link (never followed)" in out[f"{link} {what}"], out
        assert "Untrusted" in out[f"{fifo} {what}"]
    assert out[f"{fifo} read_head"] == out[f"{link} read_head"] == "None"
    assert out["intake"] == [0, 0, 2]  # both refused, each counted once
    assert stat.S_ISFIFO(os.lstat(shm.SHM_DIR / fifo).st_mode)  # left alone
    assert os.path.islink(shm.SHM_DIR / link)


def test_group_or_other_bits_are_refused(shm_name: str, cleanup: list[str]) -> None:
    with RingWriter.create(f"{shm_name}.src", TICK_DTYPE, 64) as w:
        data = file_bytes_of(w.name)
    cleanup.append(shm_name)
    write_private(shm_name, data, mode=0o640)
    with pytest.raises(RingUntrustedError, match="mode 0640 lets group/other in"):
        RingReader.attach(shm_name)
    assert shm.read_head(shm_name, 8) is None
    os.chmod(shm.SHM_DIR / shm_name, 0o600)
    RingReader.attach(shm_name).close()  # the same file, private: accepted


def test_a_segment_shorter_than_its_header_says_is_refused(
    shm_name: str, cleanup: list[str]
) -> None:
    with RingWriter.create(f"{shm_name}.src", TICK_DTYPE, 1024) as w:
        ring_data = file_bytes_of(w.name)
    with MetricsBlock.create(f"{shm_name}.msrc", FIELDS) as m:
        block_data = file_bytes_of(m.name)
    cleanup += [f"{shm_name}.r", f"{shm_name}.m"]
    write_private(f"{shm_name}.r", ring_data[:8192])
    write_private(f"{shm_name}.m", block_data[:128])
    with pytest.raises(RingLayoutError, match="inconsistent"):
        RingReader.attach(f"{shm_name}.r")
    with pytest.raises(MetricsLayoutError):
        MetricsBlock.attach(f"{shm_name}.m")


def test_an_order_ring_that_shrinks_is_dropped_not_polled(shm_name: str) -> None:
    """Only our own uid can do this, but a reader must still not die of SIGBUS."""
    prefix = f"{shm_name}.o."
    intake = OrderIntake(start_time_ns=0, max_order_age_s=600, prefix=prefix)
    w = RingWriter.create(f"{prefix}c", ORDER_DTYPE, 1024)
    try:
        assert intake.scan() == 1
        os.truncate(shm.SHM_DIR / w.name, 4096)  # header page stays: the writer can close
        assert intake.scan() == 0
        assert intake.shrunk == 1
        assert intake.poll(time.time_ns()) == ([], [])
        assert intake.scan() == 0  # not re-attached either
    finally:
        intake.close()
        w.close()


def test_names_with_a_trailing_newline_are_not_ours(shm_name: str, cleanup: list[str]) -> None:
    for bad in (f"{shm_name}\n", "a\n", "a\nb"):
        with pytest.raises(ValueError, match="invalid shared-memory name"):
            shm.check_name(bad)
    cleanup.append(f"{shm_name}\n")
    write_private(f"{shm_name}\n", b"x" * 64)
    assert shm.list_names(shm_name) == []


PRIVATE_DIR = textwrap.dedent(
    """
    import os, sys
    from pipeline.ipc import shm
    from pipeline.ipc.segments import RingReader, RingWriter
    from pipeline.ipc.records import TICK_DTYPE
    try:
        with RingWriter.create("r", TICK_DTYPE, 64):
            RingReader.attach("r").close()
            print(sorted(os.listdir(shm.SHM_DIR)))
    except OSError as exc:
        print(f"{type(exc).__name__}: {exc}")
    """
)


def test_private_segment_directory(tmp_path: Path) -> None:
    d = tmp_path / "segments"

    def run() -> str:
        env = {**os.environ, "PIPELINE_SHM_DIR": str(d)}
        r = subprocess.run(
            [sys.executable, "-c", PRIVATE_DIR], cwd=ROOT, env=env, capture_output=True,
            text=True, timeout=120, check=True,
        )  # fmt: skip
        return r.stdout.strip()

    assert run() == "['r']"  # created 0700 on first use, the ring lives there
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert os.listdir(d) == []
    os.chmod(d, 0o755)
    assert "PIPELINE_SHM_DIR has mode 0755: want 0700" in run()
