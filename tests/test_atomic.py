"""nstjax.atomic under faults: a write that fails midway, a full disk, SIGKILL."""

import errno
import os
import pathlib
import signal
import stat
import subprocess
import sys

import pytest

from nstjax.atomic import atomic_path, stale_temporaries, write_bytes

ROOT = pathlib.Path(__file__).resolve().parent.parent
OLD, NEW = b"old content\n" * 1000, b"new content\n" * 3000


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(OLD)
    return path


def assert_untouched(target):
    assert target.read_bytes() == OLD
    assert os.listdir(target.parent) == [target.name]  # no temporary file behind


def half_then(error):
    """A Path.write_bytes that writes half of the data, then raises ``error``."""
    def write(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        raise error
    return write


@pytest.mark.parametrize("error", [RuntimeError("fails midway"),
                                   OSError(errno.ENOSPC, "No space left on device"),
                                   KeyboardInterrupt()], ids=["exception", "enospc", "interrupt"])
def test_failed_write_leaves_the_previous_file(target, monkeypatch, error):
    monkeypatch.setattr(pathlib.Path, "write_bytes", half_then(error))
    with pytest.raises(type(error)):
        write_bytes(target, NEW)
    assert_untouched(target)


def test_full_disk_found_at_fsync_leaves_the_previous_file(target, monkeypatch):
    """A filesystem with delayed allocation reports ENOSPC only when the data is flushed."""
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as e:
        write_bytes(target, NEW)
    assert e.value.errno == errno.ENOSPC
    assert_untouched(target)


def test_data_is_flushed_before_the_rename(target, monkeypatch):
    calls = []
    real = os.fsync

    def fsync(fd):
        mode = os.fstat(fd).st_mode
        calls.append(("dir" if stat.S_ISDIR(mode) else "file", target.read_bytes() == OLD))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    write_bytes(target, NEW)
    assert target.read_bytes() == NEW
    assert calls[0] == ("file", True)  # the new data is on disk while the target is still the old one
    assert ("dir", False) in calls  # then the rename itself


_WRITER = """
import sys
from nstjax.atomic import atomic_path
target, size = sys.argv[1], 1 << 20
for version in (1, 2, 3):
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        for k in range(8):
            f.write(bytes([version]) * size)
            if version == 3 and k == 4:
                f.flush()
                print("inside", flush=True)
                sys.stdin.read()  # blocks: killed here, inside the third write
"""


@pytest.mark.slow
def test_sigkill_inside_a_write_keeps_the_last_complete_file(target):
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "inside\n"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.stdin.close()
        child.stdout.close()
    assert target.read_bytes() == bytes([2]) * (8 << 20)  # the second write, whole
    # The killed write's temporary file stays: hidden, never named like the target.
    leftovers = [p for p in target.parent.iterdir() if p != target]
    assert leftovers == stale_temporaries(target) and len(leftovers) == 1
    name = leftovers[0].name
    assert name.startswith(f".{target.name}.") and name.endswith(".tmp.safetensors")
    assert leftovers[0].read_bytes()[:1] == bytes([3])


def test_overwrite_false_refuses_before_writing(target):
    with pytest.raises(FileExistsError):
        with atomic_path(target, overwrite=False):
            pytest.fail("the body must not run")
    assert_untouched(target)
