"""What a run leaves in its directory: result.png, history.csv, metrics.json, the loss curve.

Every file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import csv
import io
import json
import platform
import threading
from importlib import metadata
from pathlib import Path
from typing import Sequence

from nstjax.atomic import atomic_path, write_text
from nstjax.optimize import HistoryRow

HISTORY_COLUMNS = tuple(name.rstrip("_") for name in HistoryRow._fields)
"""history.csv's columns: step, total, content, style, tv, level, temporal, frame, pass."""
_INTS = ("step", "level", "frame", "pass")


def write_history(path: Path, rows: Sequence[HistoryRow]) -> None:
    """history.csv: one row per step, step 0 first (of each pyramid level, with its level);
    losses weighted as in the objective."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for row in rows:
        writer.writerow([int(v) if name in _INTS else repr(float(v)) for name, v in zip(HISTORY_COLUMNS, row)])
    write_text(path, buf.getvalue())


def read_history(path: Path) -> list[HistoryRow]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        if tuple(header) != HISTORY_COLUMNS:
            raise ValueError(f"{path}: unexpected columns {header}")
        return [HistoryRow(*(int(v) if name in _INTS else float(v) for name, v in zip(HISTORY_COLUMNS, r)))
                for r in reader]


def snapshot_name(step: int, level: int | None = None) -> str:
    """A snapshot's file name in ``snapshots/``: ``step_NNNNNN.png``, with a pyramid
    ``level_L_step_NNNNNN.png``."""
    return (f"level_{level}_" if level is not None else "") + f"step_{step:06d}.png"


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=True) + "\n")


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that decide the numbers."""
    out = {"python": platform.python_version()}
    for name in ("nstjax", "jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def preload_plotting() -> threading.Thread:
    """Import matplotlib (a second or so) in the background while the run computes, so that the
    loss curve at its end does not wait for it."""
    def load():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401

    thread = threading.Thread(target=load, name="nstjax-preload-matplotlib", daemon=True)
    thread.start()
    return thread


def plot_history(path: Path, rows: Sequence[HistoryRow], title: str = "") -> None:
    """loss_curve.png: the weighted terms against the step, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name in ("total", "content", "style", "tv", "temporal"):
        values = [getattr(r, name) for r in rows]
        if any(v > 0 for v in values):
            ax.plot(steps, values, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (weighted)")
    ax.set_title(title)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
