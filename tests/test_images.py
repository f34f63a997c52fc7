"""Image loading, resizing and saving on small files generated with Pillow in tmp_path."""

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from nstjax.errors import UserError
from nstjax.images import (DEFAULT_MAX_PIXELS, ImageError, load_image, resize_longest, resize_to,
                           save_image, to_uint8)

# A smooth 24×32 RGB gradient: lossy codecs reproduce it closely.
_Y, _X = np.mgrid[0:24, 0:32]
SMOOTH = np.stack([_X * 8, _Y * 10, 255 - _X * 4], axis=2).astype(np.uint8)


def write(tmp_path, name, im, **params):
    path = tmp_path / name
    im.save(path, **params)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(path, width, height):
    """A PNG that claims width × height RGB pixels but holds no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
                     + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b""))
    return path


def test_default_limit_is_pillows_hard_limit():
    assert DEFAULT_MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS


# --- formats and modes -------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, tolerance",
                         [(".png", 0), (".bmp", 0), (".tif", 0), (".webp", 3), (".jpg", 3)])
def test_formats_round_trip(tmp_path, suffix, tolerance):
    path = tmp_path / f"img{suffix}"
    save_image(path, SMOOTH / 255)
    assert Image.open(path).format == Image.registered_extensions()[suffix]
    img = load_image(path)
    assert img.dtype == np.float32 and img.shape == SMOOTH.shape
    assert img.min() >= 0 and img.max() <= 1
    assert np.abs(to_uint8(img).astype(int) - SMOOTH).mean() <= tolerance


@pytest.mark.parametrize("suffix, params", [(".png", {}), (".jpg", {"quality": 100, "subsampling": 0})])
def test_exif_orientation_applied(tmp_path, suffix, params):
    pixels = np.zeros((2, 4, 3), np.uint8)  # 4 wide, 2 tall, top-left corner white
    pixels[0, 0] = 255
    im = Image.fromarray(pixels)
    exif = im.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    img = load_image(write(tmp_path, f"rotated{suffix}", im, exif=exif, **params))
    assert img.shape == (4, 2, 3)
    grey = img.mean(axis=2)
    assert np.unravel_index(grey.argmax(), grey.shape) == (0, 1)  # the corner is now top-right
    assert grey[0, 1] > 0.9 and np.delete(grey.ravel(), 1).max() < 0.2


def test_grey_8_bit(tmp_path):
    img = load_image(write(tmp_path, "grey.png", Image.new("L", (3, 2), 128)))
    np.testing.assert_allclose(img, np.full((2, 3, 3), 128 / 255), atol=1e-6)


def test_one_bit(tmp_path):
    im = Image.fromarray(np.array([[True, False], [False, True]]))
    assert im.mode == "1"
    img = load_image(write(tmp_path, "bits.png", im))
    np.testing.assert_array_equal(img[..., 0], [[1, 0], [0, 1]])
    np.testing.assert_array_equal(img[..., 0], img[..., 2])


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I;16", ".tif"), ("I", ".tif")])
def test_wide_grey_scaled_by_65535(tmp_path, mode, suffix):
    values = np.array([[0, 300, 32768, 65535]], np.uint16 if mode == "I;16" else np.int32)
    im = Image.fromarray(values)
    assert im.mode == mode
    img = load_image(write(tmp_path, f"grey16{suffix}", im))
    # 300 must stay dark (300 / 65535), not clip to white as it would if taken as 8-bit.
    np.testing.assert_allclose(img[0, :, 1], [0, 300 / 65535, 32768 / 65535, 1], atol=1e-6)


def test_rgb_16_bit_png(tmp_path):
    # Pillow has no 48-bit RGB mode: it reads the high byte of each sample, so the scale stays right.
    samples = np.array([[[65535, 32768, 0], [256, 255, 1]]], ">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in samples)  # filter type 0 per row
    path = tmp_path / "rgb16.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0))
                     + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))
    np.testing.assert_allclose(load_image(path)[0], samples[0] / 65535, atol=1 / 255)


def test_float_grey_tiff_clipped(tmp_path):
    im = Image.fromarray(np.array([[0.0, 0.25, 1.5]], np.float32))
    img = load_image(write(tmp_path, "float.tif", im))
    np.testing.assert_allclose(img[0, :, 0], [0, 0.25, 1])


def test_palette(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255])
    im.putpixel((1, 0), 1)
    img = load_image(write(tmp_path, "palette.png", im))
    np.testing.assert_array_equal(img[0], [[1, 0, 0], [0, 0, 1]])


def test_palette_with_transparency_over_white(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 0, 0, 255])
    im.putpixel((1, 0), 1)
    img = load_image(write(tmp_path, "palette.png", im, transparency=0))
    np.testing.assert_array_equal(img[0], [[1, 1, 1], [0, 0, 1]])


@pytest.mark.parametrize("mode, colour", [("L", 0), ("RGB", (0, 0, 0))])
def test_transparent_colour_key_over_white(tmp_path, mode, colour):
    im = Image.new(mode, (2, 1), colour)
    im.putpixel((1, 0), 200 if mode == "L" else (200, 200, 200))
    img = load_image(write(tmp_path, "keyed.png", im, transparency=colour))
    np.testing.assert_allclose(img[0], [[1, 1, 1], [200 / 255] * 3], atol=1e-6)


@pytest.mark.parametrize("suffix, tolerance", [(".tif", 0), (".jpg", 2 / 255)])
def test_cmyk(tmp_path, suffix, tolerance):
    img = load_image(write(tmp_path, f"cmyk{suffix}", Image.new("CMYK", (8, 8), (0, 255, 255, 0))))
    np.testing.assert_allclose(img, np.broadcast_to([1, 0, 0], (8, 8, 3)), atol=tolerance)


def test_rgba_composited_on_white(tmp_path):
    img = load_image(write(tmp_path, "rgba.png", Image.new("RGBA", (2, 2), (255, 0, 0, 128))))
    a = 128 / 255
    np.testing.assert_allclose(img, np.broadcast_to([1, 1 - a, 1 - a], (2, 2, 3)), atol=1e-6)


def test_grey_alpha_composited_on_white(tmp_path):
    img = load_image(write(tmp_path, "la.png", Image.new("LA", (2, 2), (0, 128))))
    np.testing.assert_allclose(img, np.full((2, 2, 3), 1 - 128 / 255), atol=1e-6)


# --- errors ------------------------------------------------------------------------------------

def assert_image_error(path, advice, **kwargs):
    with pytest.raises(ImageError) as info:
        load_image(path, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, UserError) and info.value.exit_code == 2
    assert str(path) in message and advice in message and "\n" not in message
    return message


def test_missing_file(tmp_path):
    assert "not found" in assert_image_error(tmp_path / "nope.png", "check the path")


def test_directory(tmp_path):
    assert "directory" in assert_image_error(tmp_path, "give the path of an image file")


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").touch()
    assert "empty" in assert_image_error(tmp_path / "empty.png", "export or download it again")


def test_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("not an image\n")
    assert "not an image" in assert_image_error(tmp_path / "notes.png", "convert the file to PNG")


def test_unreadable_file(tmp_path, monkeypatch):
    path = write(tmp_path, "locked.png", Image.new("RGB", (2, 2)))

    def denied(fp, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(fp))

    monkeypatch.setattr(Image, "open", denied)
    assert "Permission denied" in assert_image_error(path, "check its permissions")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated(tmp_path, suffix, monkeypatch):
    path = write(tmp_path, f"whole{suffix}", Image.fromarray(SMOOTH))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some other library may set it
    assert "truncated or corrupt" in assert_image_error(path, "export or download it again")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_corrupt_png_data(tmp_path):
    path = write(tmp_path, "corrupt.png", Image.fromarray(SMOOTH))
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    middle = start + (len(data) - 12 - start) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))
    assert "truncated or corrupt" in assert_image_error(path, "export or download it again")


def test_over_max_pixels(tmp_path):
    path = write(tmp_path, "small.png", Image.new("RGB", (20, 20)))
    message = assert_image_error(path, "raise image.max_pixels", max_pixels=100)
    assert "20×20 = 400 pixels, over the limit of 100 (image.max_pixels)" in message
    assert load_image(path, max_pixels=400).shape == (20, 20, 3)


def test_max_pixels_checked_before_decoding(tmp_path):
    # 10^10 pixels, no data: decoding would fail or take ~30 GB; the header check stops it first,
    # with our message rather than Pillow's DecompressionBombError.
    path = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    message = assert_image_error(path, "raise image.max_pixels")
    assert f"= 10000000000 pixels, over the limit of {DEFAULT_MAX_PIXELS}" in message


def test_max_pixels_replaces_pillows_global_limit(tmp_path, monkeypatch):
    path = write(tmp_path, "small.png", Image.new("RGB", (20, 20)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # Pillow alone would refuse 400 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path, max_pixels=None).shape == (20, 20, 3)
        assert load_image(path).shape == (20, 20, 3)
    assert Image.MAX_IMAGE_PIXELS == 150


# --- resizing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, size, expected", [
    ((30, 60), 20, (10, 20)),  # landscape
    ((60, 30), 20, (20, 10)),  # portrait
    ((30, 70), 20, (9, 20)),  # 8.57 rounds to 9
    ((70, 30), 100, (100, 43)),  # upscaling, 42.86 rounds to 43
    ((5, 5), 5, (5, 5)),
])
def test_resize_longest(shape, size, expected):
    img = np.random.default_rng(0).random((*shape, 3), dtype=np.float32)
    out = resize_longest(img, size)
    assert out.shape == (*expected, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1


def test_resize_same_size_is_identity():
    img = np.random.default_rng(0).random((7, 9, 3), dtype=np.float32)
    np.testing.assert_array_equal(resize_longest(img, 9), img)


def test_resize_to_exact_shape_and_clipped():
    img = np.zeros((8, 8, 3), np.float32)
    img[:, 4:] = 1  # a hard edge: Lanczos overshoots on both sides of it
    out = resize_to(img, 13, 29)
    assert out.shape == (13, 29, 3) and out.dtype == np.float32
    assert out.min() == 0 and out.max() == 1


def test_resize_downscale_averages():
    checker = np.indices((64, 64)).sum(axis=0) % 2
    img = np.repeat(checker[..., None], 3, axis=2).astype(np.float32)
    np.testing.assert_allclose(resize_longest(img, 8), 0.5, atol=0.01)


def test_resize_rejects_empty_size():
    with pytest.raises(ValueError):
        resize_longest(np.zeros((4, 4, 3), np.float32), 0)


# --- saving ------------------------------------------------------------------------------------

def test_to_uint8_rounds_and_clips():
    np.testing.assert_array_equal(to_uint8(np.array([-1, 0, 0.2, 0.5, 1, 2])), [0, 0, 51, 128, 255, 255])


def test_save_is_png_by_default_and_atomic(tmp_path):
    img = SMOOTH / 255
    save_image(tmp_path / "out" / "result", img)  # no suffix: PNG; missing folders are made
    assert (tmp_path / "out" / "result").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    save_image(tmp_path / "out" / "result", 1 - img)  # overwrites by default
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["result"]  # no temp file left
    np.testing.assert_array_equal(to_uint8(load_image(tmp_path / "out" / "result")), 255 - SMOOTH)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_save_refuses_non_finite(tmp_path, bad):
    img = np.zeros((4, 4, 3), np.float32)
    img[1, 2, 0] = bad
    with pytest.raises(ValueError, match="non-finite"):
        save_image(tmp_path / "bad.png", img)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "keep.png"
    save_image(path, SMOOTH / 255)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_image(path, np.zeros((2, 2, 3)), overwrite=False)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
