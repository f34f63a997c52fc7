"""Style transfer in one call, for notebooks and scripts: images as paths, PIL images or arrays::

    import nstjax
    result = nstjax.stylize("photo.jpg", "painting.jpg", image={"size": 256})
    result.pil                          # the stylised image (PIL); result.image: (H, W, 3) float32 in [0, 1]
    result.history, result.metrics      # the rows of history.csv, the facts of metrics.json
    grid = nstjax.sweep("photo.jpg", "painting.jpg", grid={"loss.beta": [1e3, 1e4, 1e5]})
    grid.sheet                          # the results side by side, each labelled with its values (PIL)

Options are the CLI's config keys: Hydra override strings (``"loss.beta=1e5"``), keyword
arguments (``seed=1``; a dict for a group: ``loss={"beta": 1e5}``) and ``preset`` (a preset of
configs/experiment, default ``preview``; None: the bare defaults). A sweep's points are optimised
as the CLI's sweeps are: those that share a structure as one batched program. Every user error
is a :class:`nstjax.errors.UserError` with the CLI's one-line message.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from nstjax import build, config, images
from nstjax.errors import UserError
from nstjax.optimize import HistoryRow
from nstjax.spec import parse

ImageLike = Any
"""A path (str or os.PathLike), a PIL image, or an array (H, W), (H, W, 3) or (H, W, 4) of uint8,
or of floats in [0, 1]."""


@dataclasses.dataclass
class Result:
    """One optimised image, as :func:`stylize` returns it (and each point of a :class:`SweepResult`).

    Attributes:
        image: the result, (H, W, 3) float32 in [0, 1].
        history: one :class:`~nstjax.optimize.HistoryRow` per step, row 0 the initial image: the
            weighted terms as history.csv holds them.
        metrics: what metrics.json holds of a run: ``status``, ``reason``, ``steps``,
            ``loss_evaluations``, the final ``total``, ``content``, ``style``, ``tv``, ``temporal``,
            ``yardstick`` (``initial`` and ``final``: ``content``, ``style``, ``style_mean``),
            ``run_seconds``, ``compile_seconds``.
        overrides: the config overrides it was run with (the preset's first).
    """

    image: np.ndarray
    history: list[HistoryRow]
    metrics: dict
    overrides: list[str]

    @property
    def pil(self) -> Image.Image:
        """The image as an 8-bit RGB PIL image."""
        return Image.fromarray(images.to_uint8(self.image))

    def _repr_png_(self) -> bytes:  # Jupyter shows the image
        import io

        buf = io.BytesIO()
        self.pil.save(buf, format="PNG")
        return buf.getvalue()


@dataclasses.dataclass
class SweepResult:
    """The results of a grid, as :func:`sweep` returns them.

    Attributes:
        results: one :class:`Result` per point, in the order of ``points``.
        points: each point's swept values, ``{key: value}``, in the grid's product order (the last
            key varying fastest).
        sheet: the results side by side, labelled with their values (:func:`contact_sheet`).
    """

    results: list[Result]
    points: list[dict]
    sheet: Image.Image

    def table(self) -> list[dict]:
        """One row per point (``pandas.DataFrame(...)``-ready): its swept values, ``status``, the final
    ``total``, ``yardstick_content`` and ``yardstick_style`` (the final style mean)."""
        return [{**p, "status": r.metrics["status"], "total": r.metrics["total"],
                 "yardstick_content": r.metrics["yardstick"]["final"]["content"],
                 "yardstick_style": r.metrics["yardstick"]["final"]["style_mean"]}
                for p, r in zip(self.points, self.results)]


def _flatten(options: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Keyword options as override strings: ``loss={"beta": 1}`` → ``loss.beta=1``."""
    out = []
    for key, value in options.items():
        if isinstance(value, Mapping):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={_value(value)}")
    return out


def _value(value) -> str:
    """A Python value as Hydra override syntax."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return str(value)


def _compose(overrides: Sequence[str]):
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return config.compose(list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(config.one_line(e)) from None


def as_rgb(img: ImageLike, what: str, max_pixels: int | None = images.DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image given as a path, PIL image or array as float32 RGB (H, W, 3) in [0, 1].

    Args:
        img: the image (:data:`ImageLike`); grey is repeated to RGB, alpha composited over white.
        what: what the image is (``"content"``, ``"style"``), for the messages.
        max_pixels: a file with more pixels is refused (None: no limit).

    Raises:
        UserError: a file that cannot be read, an array of another shape, dtype or range.
    """
    if isinstance(img, (str, os.PathLike)):
        return images.load_image(Path(img), max_pixels)
    if isinstance(img, Image.Image):
        return images.pil_to_rgb(img)
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise UserError(f"the {what} array has shape {a.shape}: give (H, W), (H, W, 3) or (H, W, 4)")
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise UserError(f"the {what} array's values must be finite and in [0, 1] (or uint8)")
        a = a.astype(np.float32)
    else:
        raise UserError(f"the {what} array is {a.dtype}: give uint8 or floats in [0, 1]")
    if a.shape[2] == 4:
        a = a[..., :3] * a[..., 3:] + (1 - a[..., 3:])
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def _inputs(point, content: ImageLike, style: ImageLike | Sequence[ImageLike]) -> build.Inputs:
    """The point's inputs from the images given (resized as the CLI resizes files), checked as the CLI checks."""
    s = point.structure
    build.validate(point)  # the weights' name, the config's own files
    styles = list(style) if isinstance(style, (list, tuple)) else [style]
    c = images.resize_longest(as_rgb(content, "content", s.image.max_pixels), s.image.size)
    build.check_resized(c, "content", s.loss, "raise image.size or use shallower layers")
    st = [images.resize_longest(as_rgb(x, "style", s.image.max_pixels), s.image.style_size) for x in styles]
    for x in st:
        build.check_resized(x, "style", s.loss, "raise image.size or image.style_scale, or use shallower layers")
        build.check_loss_shapes(s, c.shape, x.shape)
    return build.Inputs(c, st)


def _overrides(preset: str | None, overrides: Sequence[str], options: Mapping[str, Any]) -> list[str]:
    return [*([f"+experiment={preset}"] if preset else []), *overrides, *_flatten(options)]


def _metrics(r) -> dict:
    last = r.history[-1]
    return {"status": r.status.value, "reason": r.reason, "steps": r.steps, "loss_evaluations": r.evaluations,
            **{name: getattr(last, name) for name in ("total", "content", "style", "tv", "temporal")},
            "yardstick": r.yardstick, "run_seconds": r.run_seconds, "compile_seconds": r.compile_seconds}


def _run(content, style, runs: list[list[str]]) -> list[Result]:
    from nstjax import transfer

    points = [parse(_compose(o)) for o in runs]
    if any(p.structure.video.enabled for p in points):
        raise UserError("video runs take their frames from video.input: use the CLI or nstjax.transfer.run_group")
    inputs = [_inputs(p, content, style) for p in points]
    done = transfer.optimize(points, inputs)
    return [Result(r.image, r.history, _metrics(r), o) for r, o in zip(done, runs)]


def stylize(content: ImageLike, style: ImageLike | Sequence[ImageLike], *overrides: str,
            preset: str | None = "preview", **options) -> Result:
    """Optimise one image: ``content`` in the style of ``style``, with the preset and options given.

    Args:
        content: the content image: a path, a PIL image or an array (:data:`ImageLike`).
        style: the style image, or a list of them (blended, ``style_blend_weights``).
        *overrides: config overrides as the command line takes them, e.g. ``"optim.steps=200"``.
        preset: a preset of configs/experiment (``+experiment=NAME``); None: the bare defaults.
        **options: config keys as keywords, ``seed=1``, or a dict per group, ``loss={"beta": 1e5}``;
            they come after ``overrides``.

    Returns:
        The optimised image, its history and its metrics.

    Raises:
        UserError: a bad key, value or image, with the CLI's one-line message; also a video
            config (``video.input``), which takes its frames from files: use the CLI.
    """
    return _run(content, style, [_overrides(preset, overrides, options)])[0]


def sweep(content: ImageLike, style: ImageLike | Sequence[ImageLike], grid: Mapping[str, Sequence], *overrides: str,
          preset: str | None = "preview", **options) -> SweepResult:
    """Optimise every point of ``grid``, the points of one structure as one batched program.

    Args:
        content: the content image, as for :func:`stylize`.
        style: the style image or images, as for :func:`stylize`.
        grid: config key → its values, e.g. ``{"loss.beta": [1e3, 1e4], "seed": [0, 1]}``; the points
            are the product of the values.
        *overrides: config overrides every point shares, as for :func:`stylize`.
        preset: as for :func:`stylize`.
        **options: config keys every point shares, as for :func:`stylize`.

    Returns:
        Each point's result, its values and the contact sheet of them all.

    Raises:
        UserError: an empty grid, or a bad key, value or image in any point (before anything runs).
    """
    if not grid or any(len(v) == 0 for v in grid.values()):
        raise UserError("grid needs at least one key with at least one value, e.g. grid={'loss.beta': [1e3, 1e4]}")
    keys = list(grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    base = _overrides(preset, overrides, options)
    results = _run(content, style, [[*base, *(f"{k}={_value(v)}" for k, v in p.items())] for p in points])
    return SweepResult(results, points, contact_sheet(results, points, keys))


def contact_sheet(results: Sequence[Result], points: Sequence[dict], keys: Sequence[str]) -> Image.Image:
    """The results in a labelled grid (:func:`nstjax.sheet.grid_sheet`): a column per value of the
    first of ``keys`` (headed by its value), a row per combination of the others (headed by theirs)."""
    from nstjax.sheet import grid_sheet

    labels = [{k: _value(p[k]) for k in keys} for p in points]
    return grid_sheet([r.pil for r in results], labels, keys).image
