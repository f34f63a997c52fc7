"""Atomic file writes: write to a temporary file beside the target, then rename.

The target is only ever replaced by a rename, after the new bytes are on disk
(fsync), so it holds either its previous content or the whole new one, also
when the write fails midway, the disk fills up, or the process is killed.
A process killed inside the write (SIGKILL, power loss) can leave its
temporary file behind: ``.<target name>.<random>.tmp<target suffix>`` beside
the target, hidden and never named like it; nstjax never reads such a file
and it is safe to delete (:func:`stale_temporaries` finds them). A write that
fails with an OSError (a full disk, an I/O error) raises
:class:`~nstjax.errors.WriteError`, naming the target.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from pathlib import Path
from typing import Iterator

from nstjax.errors import WriteError

_TMP = ".tmp"


def _temporary_affixes(path: Path) -> tuple[str, str]:
    """The prefix and suffix of ``path``'s temporary files."""
    return f".{path.name}.", _TMP + path.suffix


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; fsync and rename it onto ``path`` on success.

    On any exception (KeyboardInterrupt included) the temporary file is removed
    and ``path`` is untouched; an OSError (ENOSPC, EIO, ...) becomes a
    :class:`~nstjax.errors.WriteError` naming ``path``. With ``overwrite=False``
    an existing ``path`` raises FileExistsError first.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix, suffix = _temporary_affixes(path)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), str(path)) from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files of ``path`` left by writers that were killed (or are still writing)."""
    path = Path(path)
    prefix, suffix = _temporary_affixes(path)
    pattern = f"{glob.escape(prefix)}*{glob.escape(suffix)}"
    return sorted(p for p in path.parent.glob(pattern) if p.is_file())


def _fsync(path: Path) -> None:
    """Flush ``path``'s data to disk; a failure (EIO, ENOSPC) raises, so it is never renamed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself; best effort (not every platform or filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> None:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> None:
    write_bytes(path, text.encode("utf-8"), overwrite)
