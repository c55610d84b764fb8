"""load_image / image_size: every image mode and array layout a REC source hands us, and the EXIF decision."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from m2ist.data.images import ImageLoadError, ImageNotFoundError, image_size, load_image


def _pixel(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return image.getpixel(xy)


# --------------------------------------------------------------------------- PIL modes, through files
def test_grayscale_jpeg_file_becomes_rgb_with_equal_channels(tmp_path):
    path = tmp_path / "gray.jpg"
    Image.new("L", (8, 6), 90).save(path, quality=100)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (8, 6)
    red, green, blue = _pixel(image, (3, 3))
    assert red == green == blue and abs(red - 90) <= 2


def test_palette_png_without_transparency_keeps_its_colours(tmp_path):
    path = tmp_path / "palette.png"
    Image.new("RGB", (4, 4), (200, 30, 10)).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    assert Image.open(path).mode == "P"
    assert _pixel(load_image(path)) == (200, 30, 10)


def test_palette_png_with_transparent_index_is_composited_on_white(tmp_path):
    palette_image = Image.new("P", (4, 2), 0)
    palette_image.putpalette([10, 20, 30] + [200, 0, 0] + [0] * (254 * 3))
    palette_image.putpixel((3, 1), 1)
    path = tmp_path / "transparent.png"
    palette_image.save(path, transparency=0)  # index 0 (dark blue) is fully transparent
    image = load_image(path)
    assert _pixel(image, (0, 0)) == (255, 255, 255)
    assert _pixel(image, (3, 1)) == (200, 0, 0)
    assert _pixel(load_image(path, background=(0, 0, 0)), (0, 0)) == (0, 0, 0)


def test_rgba_png_is_composited_on_white_by_default(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 255))  # opaque red
    rgba.putpixel((1, 0), (255, 0, 0, 0))  # transparent: background shows
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black over white -> mid grey
    path = tmp_path / "rgba.png"
    rgba.save(path)
    image = load_image(path)
    assert _pixel(image, (0, 0)) == (255, 0, 0)
    assert _pixel(image, (1, 0)) == (255, 255, 255)
    assert all(abs(channel - 127) <= 1 for channel in _pixel(image, (2, 0)))
    assert _pixel(load_image(path, background=(0, 0, 0)), (1, 0)) == (0, 0, 0)


def test_la_image_is_composited_on_white():
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (50, 255))
    la.putpixel((1, 0), (50, 0))
    image = load_image(la)
    assert _pixel(image, (0, 0)) == (50, 50, 50)
    assert _pixel(image, (1, 0)) == (255, 255, 255)


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=100)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    red, green, blue = _pixel(load_image(path), (4, 4))
    assert red > 240 and green < 15 and blue < 15


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path)
    assert [_pixel(image, (x, 0))[0] for x in range(4)] == [0, 64, 128, 255]


def test_32_bit_integer_image_reads_8_and_16_bit_ranges():
    eight_bit = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    assert eight_bit.mode == "I"
    assert [_pixel(load_image(eight_bit), (x, 0))[0] for x in range(3)] == [0, 100, 255]
    sixteen_bit = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32))
    assert [_pixel(load_image(sixteen_bit), (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_image_in_unit_range_is_scaled():
    image = load_image(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)))
    assert [_pixel(image, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_bilevel_image_converts():
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    image = load_image(bilevel)
    assert _pixel(image, (0, 0)) == (0, 0, 0) and _pixel(image, (1, 0)) == (255, 255, 255)


def test_rgb_pil_image_is_returned_unchanged():
    rgb = Image.new("RGB", (5, 4), (1, 2, 3))
    assert load_image(rgb) is rgb


# --------------------------------------------------------------------------- arrays
@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((2, 3), 77, dtype=np.uint8), (77, 77, 77)),
        (np.full((2, 3, 1), 77, dtype=np.uint8), (77, 77, 77)),
        (np.tile(np.array([10, 20, 30], dtype=np.uint8), (2, 3, 1)), (10, 20, 30)),
        (np.tile(np.array([10, 20, 30, 255], dtype=np.uint8), (2, 3, 1)), (10, 20, 30)),
        (np.tile(np.array([10, 20, 30, 0], dtype=np.uint8), (2, 3, 1)), (255, 255, 255)),
        (np.full((2, 3, 3), 0.5, dtype=np.float32), (128, 128, 128)),
        (np.full((2, 3), 1.0, dtype=np.float64), (255, 255, 255)),
        (np.full((2, 3), 65535, dtype=np.uint16), (255, 255, 255)),
        (np.ones((2, 3), dtype=bool), (255, 255, 255)),
    ],
    ids=["HxW", "HxWx1", "HxWx3", "HxWx4-opaque", "HxWx4-transparent", "float-rgb", "float-gray", "uint16", "bool"],
)
def test_arrays_of_every_layout_become_rgb(array, expected):
    image = load_image(array)
    assert image.mode == "RGB" and image.size == (3, 2)
    assert _pixel(image, (2, 1)) == expected


def test_float_array_outside_unit_range_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(np.full((2, 2, 3), 200.0))


def test_channels_first_array_is_refused_with_a_hint():
    with pytest.raises(ValueError, match="transpose"):
        load_image(np.zeros((3, 8, 8), dtype=np.uint8))


def test_unsupported_object_is_a_type_error():
    with pytest.raises(TypeError, match="file path, a PIL image"):
        load_image(12345)


# --------------------------------------------------------------------------- EXIF orientation
def _jpeg_with_orientation(path, orientation: int) -> None:
    """A 40x20 stored image, red in the stored top-left corner, with an EXIF Orientation tag."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=100)


def test_exif_orientation_is_ignored_by_default_so_dataset_boxes_match(tmp_path):
    path = tmp_path / "rotated.jpg"
    _jpeg_with_orientation(path, 6)
    image = load_image(path)
    assert image.size == (40, 20) == image_size(path)
    assert _pixel(image, (2, 2))[0] > 200  # stored pixel grid untouched


def test_exif_transpose_applies_the_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    _jpeg_with_orientation(path, 6)  # 6: displayed = stored rotated 90 degrees clockwise
    image = load_image(path, exif_transpose=True)
    assert image.size == (20, 40) == image_size(path, exif_transpose=True)
    assert _pixel(image, (17, 2))[0] > 200  # the stored top-left is now top-right
    assert _pixel(image, (2, 2))[2] > 200


# --------------------------------------------------------------------------- errors name the file
def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "img.jpg"
    with pytest.raises(ImageNotFoundError, match=r"nowhere/img\.jpg") as caught:
        load_image(missing)
    assert isinstance(caught.value, FileNotFoundError)
    with pytest.raises(FileNotFoundError, match=r"img\.jpg"):
        image_size(missing)


def test_unreadable_file_names_the_path(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not an image")
    with pytest.raises(ImageLoadError, match=r"broken\.jpg"):
        load_image(broken)
    with pytest.raises(ImageLoadError, match=r"broken\.jpg"):
        image_size(broken)


def test_truncated_jpeg_fails_when_loaded_and_names_the_path(tmp_path):
    full = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    truncated = tmp_path / "truncated.jpg"
    data = full.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert image_size(truncated) == (64, 64)  # the header alone is fine
    with pytest.raises(ImageLoadError, match=r"truncated\.jpg"):
        load_image(truncated)


@pytest.mark.parametrize("image", [np.zeros((0, 5, 3), np.uint8), np.zeros((5, 0), np.uint8), Image.new("RGB", (0, 0))])
def test_an_image_without_pixels_is_refused(image):
    """Letterboxing and box scaling divide by the image's size: an empty one is refused, never a ZeroDivisionError."""
    with pytest.raises(ValueError, match=r"is \d+x\d+ pixels: an image needs at least one pixel each way"):
        load_image(image)
