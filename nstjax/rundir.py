"""A run's directory: new for every run, and gone again when the run is refused.

A run or a sweep writes only into a directory that is new or empty
(:func:`require_empty`), so nothing of an earlier run is ever changed. Hydra
creates a run's directory before nstjax has checked anything; when the run is
refused, :func:`discard` removes it again with the empty parents Hydra made for
it. :class:`HydraCallback` (``hydra.callbacks`` in configs/config.yaml) notes,
before Hydra creates it, the nearest ancestor of the run directory that already
exists, so that exactly what Hydra made is removed.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.experimental.callback import Callback

from nstjax.errors import UserError

_EXISTING: dict[str, Path] = {}
"""The nearest existing ancestor of Hydra's run directory, noted before Hydra created it."""


def first_existing(path: str | os.PathLike) -> Path:
    """``path`` itself or the nearest of its ancestors that exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def require_empty(path: str | os.PathLike, what: str = "run") -> None:
    """Refuse a directory that already holds something (an earlier run, or anything else)."""
    path = Path(path)
    if path.is_dir():
        held = sorted(p.name for p in path.iterdir())
        if held:
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            raise UserError(f"{path} is not empty (it holds {shown}): every {what} needs a new directory; "
                            f"nothing there was changed (resume={path} continues an interrupted {what})")
    elif path.exists():
        raise UserError(f"{path} is a file, not a directory: give a new directory")


def discard(path: str | os.PathLike, keep: str | os.PathLike | None = None) -> None:
    """Remove ``path`` if it is an empty directory, then its parents while they are empty, up to
    (not including) ``keep``; without ``keep``, only ``path``."""
    path = Path(path).absolute()
    keep = Path(keep).absolute() if keep is not None else path.parent
    while path != keep and keep in path.parents:
        try:
            path.rmdir()
        except OSError:  # not empty, or already gone
            if path.exists():
                return
        path = path.parent


def discard_hydra_run_dir(path: str | os.PathLike) -> None:
    """Remove Hydra's run directory ``path`` and the parents Hydra made for it, if all are empty."""
    discard(path, _EXISTING.get("run"))


class HydraCallback(Callback):
    """Notes the nearest existing ancestor of ``hydra.run.dir`` before Hydra creates it."""

    def on_run_start(self, config, **kwargs) -> None:
        try:
            _EXISTING["run"] = first_existing(config.hydra.run.dir)
        except Exception:  # noqa: BLE001 (an interpolation Hydra resolves later): remove only the dir
            _EXISTING.pop("run", None)
