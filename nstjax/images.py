"""Image files in and out: float32 RGB arrays (H, W, 3) in [0, 1], decoded and resampled by Pillow."""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from nstjax.atomic import atomic_path
from nstjax.errors import UserError

# Pillow refuses files past 2 × Image.MAX_IMAGE_PIXELS (it only warns past Image.MAX_IMAGE_PIXELS);
# this is that hard limit, so the default refuses what Pillow itself would.
DEFAULT_MAX_PIXELS = 178_956_970

# Integer grey modes read as 0..65535 (16-bit PNG, TIFF, PGM); "I" is what older Pillow gives 16-bit PNG.
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# What a damaged file can raise while Pillow decodes it.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
_pillow_settings_lock = threading.Lock()


class ImageError(UserError):
    """An input image that cannot be used; the one-line message names the file and what to do."""


@contextlib.contextmanager
def _strict_pillow() -> Iterator[None]:
    """For one load, turn Pillow's global pixel limit off (load_image checks its own) and make
    truncated files raise (another library may have set ImageFile.LOAD_TRUNCATED_IMAGES)."""
    with _pillow_settings_lock:
        saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as float32 RGB (H, W, 3) in [0, 1]: EXIF orientation applied, alpha over white.

    ``max_pixels`` (None: no limit) is checked against the header's size before any pixel is decoded.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image file {path} not found: check the path")
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image file: give the path of an image file")
    if path.stat().st_size == 0:
        raise ImageError(f"image file {path} is empty (0 bytes): export or download it again")
    with _strict_pillow():
        try:
            with Image.open(path) as src:
                width, height = src.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageError(
                        f"image file {path} has {width}×{height} = {width * height} pixels, over the limit "
                        f"of {max_pixels} (image.max_pixels); raise image.max_pixels if you trust this file")
                src.load()
                return pil_to_rgb(ImageOps.exif_transpose(src))
        except UnidentifiedImageError:
            raise ImageError(f"{path} is not an image file Pillow can read (PNG, JPEG, WebP, TIFF, BMP, "
                             "...): check the path, or convert the file to PNG") from None
        except PermissionError as e:
            raise ImageError(f"cannot read image file {path} ({e.strerror}): check its permissions") from None
        except _DECODE_ERRORS as e:
            raise ImageError(f"image file {path} is truncated or corrupt ({_one_line(e)}): "
                             "export or download it again") from e


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Pixels of any Pillow mode as float32 RGB in [0, 1]; 16-bit grey keeps its precision."""
    if im.mode in _WIDE_GREY_MODES or im.mode == "F":
        grey = np.asarray(im, np.float32)
        if im.mode != "F":  # float images are taken as already in [0, 1]
            grey = grey / 65535
        return np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=2)
    if "A" in im.mode or "a" in im.mode or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), np.float32) / 255
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + (1 - alpha)
    return np.asarray(im.convert("RGB"), np.float32) / 255


def resize_to(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """img resampled to exactly height × width: Lanczos per channel in float32, clipped to [0, 1]."""
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize an image to {width}×{height} pixels")
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], np.float32))
                   .resize((width, height), Image.Resampling.LANCZOS))
        for c in range(img.shape[2])
    ]
    return np.clip(np.stack(channels, axis=2), 0, 1).astype(np.float32)


def resize_longest(img: np.ndarray, size: int) -> np.ndarray:
    """img scaled so its longest side is ``size`` pixels, aspect ratio kept (other side rounded)."""
    if size < 1:
        raise ValueError(f"the longest side must be at least 1 pixel, got {size}")
    height, width = img.shape[:2]
    longest = max(height, width)
    return resize_to(img, max(1, round(height * size / longest)), max(1, round(width * size / longest)))


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[0, 1] floats as uint8: round(clip(x, 0, 1) × 255)."""
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def save_image(path: str | os.PathLike, img: np.ndarray, overwrite: bool = True) -> None:
    """Write img (H, W, 3) in [0, 1] as 8-bit, atomically: PNG unless path's suffix names another format.

    A non-finite image raises ValueError and writes nothing; ``overwrite=False`` refuses an existing
    file (FileExistsError).
    """
    path = Path(path)
    bad = int(np.size(img) - np.count_nonzero(np.isfinite(img)))
    if bad:
        raise ValueError(f"refusing to save {path}: the image has {bad} non-finite values (NaN or inf)")
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    params = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    pil = Image.fromarray(to_uint8(img))
    with atomic_path(path, overwrite) as tmp:
        pil.save(tmp, format=fmt, **params)
