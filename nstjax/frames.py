"""A video's frames in and out: a video file (through ffmpeg), a folder or a glob of images; an
H.264 video.mp4 out. Needs the ``video`` extra (``pip install 'nstjax[video]'``: OpenCV for the
flow, imageio with imageio-ffmpeg, whose wheel ships an ffmpeg binary).

    frames, fps = read_frames("clip.mp4", (0, 40, 2))   # [(source index, RGB in [0, 1]), ...]
    write_video("video.mp4", [image, ...], fps)
"""

from __future__ import annotations

import contextlib
import glob
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from nstjax import images
from nstjax.atomic import atomic_path
from nstjax.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FOLDER_FPS = 25.0
"""The frame rate of frames given as images, unless video.fps says otherwise."""


@contextlib.contextmanager
def _ffmpeg() -> Iterator[None]:
    """imageio-ffmpeg starts ffmpeg by fork and exec: no Python runs in the child, which JAX's
    warning about forking a multithreaded process is about; it is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        yield


def require_video_extra() -> None:
    """Refuse, in one line, a video run without the video extra's packages."""
    try:
        import cv2  # noqa: F401
        import imageio.v3  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError as e:
        raise UserError(f"video needs the video extra ({e.name} is not installed): pip install 'nstjax[video]'") \
            from None


def _image_files(source: str) -> list[Path] | None:
    """The frames of a folder or a glob, sorted by name; None for a single file."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"video.input={source} is a folder without image files ({', '.join(IMAGE_SUFFIXES)})")
        return files
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(source) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"video.input={source} matches no image files")
        return files
    return None


def select(count: int, frames: Sequence) -> list[int]:
    """The source indices video.frames = (start, stop, step) selects of ``count`` frames: at least two,
    inside the source."""
    start, stop, step = frames
    for name, value in (("start", start), ("stop", stop)):
        if value is not None and not 0 <= value <= count - (name == "start"):
            raise UserError(f"video.frames {name} = {value} is outside the video's {count} frames "
                            f"(0 … {count - 1})")
    chosen = list(range(count))[slice(start, stop, step or 1)]
    if len(chosen) < 2:
        raise UserError(f"video.frames = {list(frames)} selects {len(chosen)} frame(s) of {count}: "
                        "a video needs at least two")
    return chosen


def read_frames(source: str, frames: Sequence = (None, None, 1),
                max_pixels: int | None = images.DEFAULT_MAX_PIXELS) -> tuple[list[tuple[int, np.ndarray]], float]:
    """The selected frames as (source index, RGB (H, W, 3) in [0, 1]) and the source's frame rate
    (a folder's: :data:`FOLDER_FPS`). Raises UserError for what is not a video, a selection outside
    it or too short, and frames of different sizes."""
    require_video_extra()
    files = _image_files(source)
    if files is not None:
        chosen = select(len(files), frames)
        out = [(i, images.load_image(files[i], max_pixels)) for i in chosen]
        shapes = {img.shape for _, img in out}
        if len(shapes) > 1:
            sizes = ", ".join(f"{s[1]}×{s[0]}" for s in sorted(shapes))
            raise UserError(f"video.input={source}: the frames have different sizes ({sizes}); "
                            "give frames of one size")
        return out, FOLDER_FPS
    return _read_video(source, frames, max_pixels)


def _read_video(source: str, frames: Sequence, max_pixels: int | None) -> tuple[list[tuple[int, np.ndarray]], float]:
    import imageio.v3 as iio

    path = Path(source)
    if not path.is_file():
        raise UserError(f"video.input={source} not found: give a video file, a folder or a glob of frames")
    try:
        with _ffmpeg():
            meta = iio.immeta(path, plugin="FFMPEG")
            every = [np.asarray(f) for f in iio.imiter(path, plugin="FFMPEG")]
    except Exception as e:  # imageio raises OSError, RuntimeError or its own for what ffmpeg cannot decode
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"video.input={source} is not a video ffmpeg can read ({why})") from None
    if not every:
        raise UserError(f"video.input={source} has no frames")
    h, w = every[0].shape[:2]
    if max_pixels is not None and h * w > max_pixels:
        raise UserError(f"video.input={source} has {w}×{h} frames, over image.max_pixels = {max_pixels}")
    chosen = select(len(every), frames)
    fps = float(meta.get("fps") or FOLDER_FPS)
    return [(i, every[i][..., :3].astype(np.float32) / 255.0) for i in chosen], fps


def write_video(path: Path, frames: Sequence[np.ndarray], fps: float) -> None:
    """An H.264 (yuv420p) video of RGB frames in [0, 1], written atomically; odd sizes are padded by
    one edge pixel (H.264 in yuv420p needs even sides)."""
    import imageio.v3 as iio

    stack = np.stack([images.to_uint8(f) for f in frames])
    h, w = stack.shape[1:3]
    stack = np.pad(stack, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with atomic_path(Path(path)) as tmp, _ffmpeg():
        iio.imwrite(tmp, stack, plugin="FFMPEG", extension=".mp4", fps=fps, codec="libx264",
                    pixelformat="yuv420p", macro_block_size=1)


def count_frames(path: Path) -> int:
    """The number of frames in a video file."""
    import imageio.v3 as iio

    with _ffmpeg():
        return sum(1 for _ in iio.imiter(path, plugin="FFMPEG"))
