"""What the benchmarks' reports share: a log that can be teed to a file, numbers and tables as
text, and JSON written atomically (a reader never sees a half-written file)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

GiB = 2**30

_TEE = []  # open files that log() writes to besides stdout


def log(*a) -> None:
    """print(*a), flushed, and the same line into the file of :func:`tee_to` if one is open."""
    text = " ".join(str(x) for x in a)
    print(text, flush=True)
    for f in _TEE:
        f.write(text + "\n")
        f.flush()


def tee_to(path: Path) -> None:
    """From now on, :func:`log` writes every line to ``path`` too (appended)."""
    _TEE.append(open(path, "a", encoding="utf-8"))


def gib(b) -> str:
    return f"{b / GiB:.2f}" if b else "-"


def fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def table(headers, rows) -> str:
    cols = [[str(h)] + [str(r[i]) for r in rows] for i, h in enumerate(headers)]
    widths = [max(len(c) for c in col) for col in cols]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plain(v):
    """A value json can write: numpy scalars and arrays as numbers and lists, paths as text,
    NaN and infinities as None (JSON has none of them)."""
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if hasattr(v, "tolist"):  # numpy scalars and arrays
        return plain(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, data) -> None:
    """``data`` as JSON at ``path``: written to a temporary file beside it, flushed to disk, then
    renamed over ``path`` (a reader sees the old file or the new one, never a part)."""
    path = Path(path)
    text = json.dumps(plain(data), indent=1, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would make it, not mkstemp's 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
