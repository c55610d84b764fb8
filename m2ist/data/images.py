"""Turn whatever a REC source holds (a path, a PIL image, an array) into an 8-bit RGB PIL image.

Decisions, stated once:

* **EXIF orientation is NOT applied by default** (``exif_transpose=False``). The boxes of RefCOCO/+/g, ReferIt
  and COCO refer to the stored pixel grid: ``instances.json`` ``width``/``height`` are the stored sizes, and the
  reference loaders (``pycocotools``, TransVG) open images with PIL, which ignores the tag. Rotating the pixels
  would move them away from those boxes. Pass ``exif_transpose=True`` for your own data when it was annotated
  in a tool that displayed the image rotated (most modern browsers and photo viewers do). This holds for every
  format: recent Pillow versions (12, at least) rotate a TIFF by its orientation tag themselves when reading it,
  and m2ist undoes that unless ``exif_transpose=True`` (a TIFF PIL image you ``load()`` ed yourself before passing
  it in stays as Pillow made it: the tag is gone by then).
* **Transparency is composited on white** (``background=(255, 255, 255)``), like a browser page shows it and like
  ``transformers``' ``convert_to_rgb``; pass another ``background`` to change it.
* **16-bit grayscale** (``I;16`` PNG/TIFF, ``uint16`` arrays) is scaled by ``255 / 65535``, keeping absolute
  intensities (a plain ``convert('RGB')`` would clip almost every pixel to white). A 32-bit ``I`` image is read as
  8-bit when its values fit in 0..255, as 16-bit when they fit in 0..65535, otherwise it is min-max stretched.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DeferredImage", "ImageLoadError", "ImageNotFoundError", "exif_orientation", "image_name", "image_size",
           "load_image"]

RGBColor = tuple[int, int, int]
WHITE: RGBColor = (255, 255, 255)
_EXIF_ORIENTATION_TAG = 0x0112
_ORIENTATIONS_THAT_SWAP_AXES = frozenset({5, 6, 7, 8})
_TIFF_WIDTH_TAG, _TIFF_LENGTH_TAG = 256, 257
#: The transpose that undoes each orientation ImageOps.exif_transpose applies (only 6 and 8 differ from their own).
_UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
#: How an EXIF orientation tag shows the stored pixels, in words (tags 2-8; 1 is upright), for warnings.
ORIENTATION_NAMES = {2: "mirrored", 3: "rotated 180°", 4: "flipped upside down", 5: "mirrored and rotated 90°",
                     6: "rotated 90° clockwise", 7: "mirrored and rotated 90°", 8: "rotated 90° counter-clockwise"}
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_READ_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


class ImageLoadError(OSError):
    """An image could not be read or converted; the message names the file (and the sample when known)."""


class ImageNotFoundError(ImageLoadError, FileNotFoundError):
    """An image file does not exist."""


class DeferredImage:
    """An image read only when it is used: a row of a Hugging Face table, a member of an archive, ...

    Loaders put these (or paths) in :class:`~m2ist.data.sample.RECSample` so that a sample list never holds pixels
    or encoded bytes; :func:`load_image` and :func:`image_size` call :meth:`open` each time they need the image.
    Subclasses implement :meth:`open` (return a PIL image, ideally lazily opened so that reading the size decodes
    nothing) and :meth:`describe` (a short name for error messages).
    """

    __slots__ = ()

    def open(self) -> Image.Image:
        """The image, opened now (a PIL image; decoding may be left to PIL's ``load()``)."""
        raise NotImplementedError

    def describe(self) -> str:
        """Where the image comes from, for error messages."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


def _open_deferred(image: DeferredImage) -> Image.Image:
    try:
        return image.open()
    except ImageLoadError:
        raise
    except (*_READ_ERRORS, KeyError, IndexError) as err:
        raise ImageLoadError(f"Cannot read image {image.describe()}: {err}") from err


def _near_miss(path: Path) -> str:
    """A hint naming the file ``path`` probably meant: its name without surrounding spaces, or with the extension
    in the other case (``.JPG`` for ``.jpg``); ``""`` when there is none. Only a few names are tried (no listing:
    a missing file in a folder of 80,000 images must stay cheap)."""
    name = path.name
    candidates = [name.strip()] if name.strip() != name else []
    stem, dot, suffix = name.strip().rpartition(".")
    if dot and stem:
        candidates += [f"{stem}.{suffix.lower()}", f"{stem}.{suffix.upper()}"]
    for candidate in dict.fromkeys(candidates):
        if candidate != name and candidate and path.with_name(candidate).is_file():
            return f" ({path.with_name(candidate).name!r} exists there: the name differs in spaces or case)"
    return ""


def _check_path(path: Path) -> None:
    if not path.exists():
        shown = repr(str(path)) if path.name != path.name.strip() else str(path)  # a trailing space is invisible
        raise ImageNotFoundError(f"Image file not found: {shown}{_near_miss(path)}")
    if path.is_dir():
        raise ImageLoadError(f"Expected an image file but got a directory: {path}")
    if not path.is_file():  # a FIFO or a device (/dev/zero) would block or never end
        raise ImageLoadError(f"Expected an image file but {path} is not a regular file (a FIFO, a device or a socket).")


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1 when absent or invalid); for a PNG this decodes the pixels (late eXIf)."""
    orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    return orientation if orientation in _UNDO_ORIENTATION else 1


def _stored_size(image: Image.Image, orientation: int) -> tuple[int, int]:
    """``(width, height)`` of the stored pixel grid. Pillow reports a TIFF whose orientation it will apply with
    the rotated size; its own width/length tags still give the stored one."""
    tags = getattr(image, "tag_v2", None)
    if orientation != 1 and tags is not None and _TIFF_WIDTH_TAG in tags and _TIFF_LENGTH_TAG in tags:
        return int(tags[_TIFF_WIDTH_TAG]), int(tags[_TIFF_LENGTH_TAG])
    return image.size


def _pil_size(image: Image.Image, exif_transpose: bool) -> tuple[int, int]:
    # only TIFFs (with tag_v2) need the orientation for the stored size; a PNG's getexif() decodes the pixels
    orientation = exif_orientation(image) if exif_transpose or hasattr(image, "tag_v2") else 1
    width, height = _stored_size(image, orientation)
    if exif_transpose and orientation in _ORIENTATIONS_THAT_SWAP_AXES:
        width, height = height, width
    return width, height


def image_size(image: Any, *, exif_transpose: bool = False) -> tuple[int, int]:
    """``(width, height)`` of an image without decoding its pixels (for a path only the header is read).

    The size of the stored pixel grid, or with ``exif_transpose=True`` the displayed one (axes swapped for EXIF
    orientations 5-8): always what :func:`load_image` returns with the same flag, for every format.
    """
    if isinstance(image, DeferredImage):
        image = _open_deferred(image)
    if isinstance(image, str | PathLike):
        path = Path(image)
        _check_path(path)
        try:
            with Image.open(path) as opened:
                width, height = _pil_size(opened, exif_transpose)
        except _READ_ERRORS as err:
            raise ImageLoadError(f"Cannot read image file {path}: {err}") from err
    elif isinstance(image, Image.Image):
        width, height = _pil_size(image, exif_transpose)
    else:
        array = _as_array(image)
        height, width = int(array.shape[0]), int(array.shape[1])
    return int(width), int(height)


def load_image(image: Any, *, exif_transpose: bool = False, background: RGBColor = WHITE) -> Image.Image:
    """Return ``image`` as an 8-bit RGB :class:`PIL.Image.Image`.

    Args:
        image: a path, a :class:`DeferredImage`, a PIL image (any mode: 1, L, P with or without transparency, LA,
            RGBA, CMYK, YCbCr, I;16, I, F) or an array ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` of ``uint8``,
            ``uint16``, ``bool`` or floats in ``[0, 1]``.
        exif_transpose: rotate/flip by the EXIF orientation tag. Off by default because dataset boxes refer to
            the stored pixel grid (see the module docstring).
        background: the colour transparent pixels are composited on.

    Raises:
        ImageNotFoundError: the path does not exist (the message names it).
        ImageLoadError: the file cannot be decoded (the message names it).
        ValueError / TypeError: an array of unsupported shape, dtype or value range, or one that a scale mistake
            turns black (``[0, 1]`` values cast to integers, 0..255 values in ``uint16``).

    An animated file (GIF, APNG, WebP) gives its first frame; a PIL image you ``seek()`` ed, its current frame.
    """
    rgb = _load_rgb(image, exif_transpose, background)
    if rgb.width == 0 or rgb.height == 0:  # letterboxing and box scaling would divide by zero
        raise ValueError(f"Image {image_name(image)} is {rgb.width}x{rgb.height} pixels: an image needs at least "
                         "one pixel each way.")
    return rgb


def image_name(image: Any) -> str:
    """How an error names an image: its path, a deferred image's description, an array's type and shape."""
    if isinstance(image, DeferredImage):
        return image.describe()
    if isinstance(image, str | PathLike):
        return str(image)
    if hasattr(image, "shape"):
        return f"<{type(image).__name__} of shape {tuple(image.shape)}>"
    return getattr(image, "filename", "") or "<in-memory image>"


def _load_rgb(image: Any, exif_transpose: bool, background: RGBColor) -> Image.Image:
    """The body of :func:`load_image`, before the size check."""
    if isinstance(image, DeferredImage):
        image = _open_deferred(image)
    if isinstance(image, str | PathLike):
        path = Path(image)
        _check_path(path)
        try:
            with Image.open(path) as opened:
                return _pil_to_rgb(_load_oriented(opened, exif_transpose), background=background)
        except ImageLoadError:
            raise
        except _READ_ERRORS as err:
            raise ImageLoadError(f"Cannot read image file {path}: {err}") from err
    if isinstance(image, Image.Image):
        source = getattr(image, "filename", "") or "<in-memory PIL image>"
        try:
            return _pil_to_rgb(_load_oriented(image, exif_transpose), background=background)
        except ImageLoadError:
            raise
        except _READ_ERRORS as err:
            raise ImageLoadError(f"Cannot decode image {source}: {err}") from err
    return _array_to_rgb(_as_array(image), background=background)


def _composite(rgba: Image.Image, background: RGBColor) -> Image.Image:
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map a 16/32-bit or float grayscale image to 0..255 following the rules in the module docstring."""
    if mode in _SIXTEEN_BIT_MODES:
        return _uint16_to_uint8(values.astype(np.uint16))
    values = values.astype(np.float64)
    if values.size == 0:
        return values.astype(np.uint8)
    if not np.isfinite(values).all():  # NaN fails every comparison below and would turn the image black
        raise ValueError(f"the {mode!r} image holds NaN or infinite values ({int((~np.isfinite(values)).sum())} "
                         "pixels); fill them (e.g. numpy.nan_to_num) before passing it")
    low, high = float(values.min()), float(values.max())
    if mode == "F" and low >= 0.0 and high <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    if low >= 0 and high <= 255:
        return np.rint(values).astype(np.uint8)
    if low >= 0 and high <= 65535 and mode == "I":
        return _uint16_to_uint8(values.astype(np.uint16))
    span = high - low if high > low else 1.0
    return np.rint((values - low) * (255.0 / span)).astype(np.uint8)


def _uint16_to_uint8(values: np.ndarray) -> np.ndarray:
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _load_oriented(image: Image.Image, exif_transpose: bool) -> Image.Image:
    """Decode ``image``; return its stored pixel grid, or with ``exif_transpose`` the grid rotated by its EXIF
    orientation. Pillow applies a TIFF's orientation itself in ``load()`` (and drops the tag): undone here."""
    orientation = exif_orientation(image)
    image.load()
    applied_by_pillow = orientation != 1 and exif_orientation(image) == 1
    if applied_by_pillow and not exif_transpose:
        return image.transpose(_UNDO_ORIENTATION[orientation])
    if exif_transpose and not applied_by_pillow:
        return ImageOps.exif_transpose(image)
    return image


def _pil_to_rgb(image: Image.Image, *, background: RGBColor) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        values = np.asarray(image)
        gray = _scale_to_uint8(values, mode)
        transparent = image.info.get("transparency")  # a 16-bit PNG's tRNS: the one sample value that is see-through
        if isinstance(transparent, int | float) and not isinstance(transparent, bool):
            alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
            return _composite(Image.fromarray(np.dstack([gray, gray, gray, alpha])), background)
        return Image.fromarray(gray).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite(image.convert("RGBA"), background)
    if mode == "1":
        return image.convert("L").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ImageLoadError(f"Cannot convert an image of mode {mode!r} to RGB: {err}") from err


def _as_array(image: Any) -> np.ndarray:
    if isinstance(image, np.ndarray):
        array = image
    elif hasattr(image, "__array__"):
        array = np.asarray(image)
    else:
        raise TypeError(
            f"Cannot use an object of type {type(image).__name__} as an image: pass a file path, a PIL image or an "
            "(H, W[, C]) array."
        )
    if array.ndim == 3 and array.shape[-1] not in (1, 2, 3, 4) and array.shape[0] in (1, 3, 4):
        raise ValueError(
            f"Image array of shape {tuple(array.shape)} looks channels-first; pass (H, W, C) (e.g. array.transpose(1, 2, 0))."
        )
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 2, 3, 4)):
        raise ValueError(f"Image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {tuple(array.shape)}.")
    return array


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return _uint16_to_uint8(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("Float image array contains NaN or infinite values.")
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            low, high = array.min(), array.max()
            raise ValueError(f"Float image arrays must hold values in [0, 1]; got [{low:.4g}, {high:.4g}]. "
                             + _FLOAT_RANGE_HINTS[0 if low < 0 else 1 if high <= 255 else 2])
        return np.rint(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"Integer image arrays of dtype {array.dtype} must hold values in 0..255 (use uint16 for 16-bit "
                f"data); got [{array.min()}, {array.max()}]."
            )
        return array.astype(np.uint8)
    raise TypeError(f"Unsupported image array dtype {array.dtype}; use uint8, uint16, bool or float in [0, 1].")


#: What a float array outside [0, 1] probably is: values below 0 are no pixel values of any image file (the casts
#: the other hints name would wrap them around), but what a normalisation (mean/std) gives.
_FLOAT_RANGE_HINTS = (
    "Values below 0 are pixels already normalised with a mean and std (a processor's pixel_values, an "
    "ImageNet-normalised tensor): pass the image itself (uint8, or floats in [0, 1]), not the normalised tensor; "
    "processor.denormalize(pixel_values) gives [0, 1] floats back.",
    "For 0..255 data pass array.astype(numpy.uint8).",
    "For 16-bit data (0..65535) pass array.astype(numpy.uint16).",
)


def _check_not_blacked_out(array: np.ndarray, pixels: np.ndarray) -> None:
    """Refuse an array whose colours, not all zero, all become 0 or 1 of 255: a scale mistake (``[0, 1]`` floats
    cast to integers, 0..255 data in ``uint16``, floats divided by 255 twice) that would show the model black."""
    if array.dtype == np.bool_ or not array.size:
        return
    colour = (slice(None),) * 2 + ((slice(0, 1 if array.shape[-1] == 2 else 3),) if array.ndim == 3 else ())
    if pixels[colour].max() > 1 or not array[colour].max() > 0:
        return
    if array.dtype == np.uint16:
        hint = ("uint16 arrays are read as 16-bit (0..65535), so 0..255 values are almost black: pass "
                "array.astype(numpy.uint8).")
    elif np.issubdtype(array.dtype, np.integer):
        hint = ("integers are read as 0..255: if these are [0, 1] values cast to integers (their fractions are lost), "
                "pass the floats or multiply by 255 before casting; pass a black-and-white mask as array.astype(bool).")
    else:
        hint = "floats are read as [0, 1]: were the values divided by 255 twice?"
    raise ValueError(f"Image array of dtype {array.dtype} reads as black: its brightest value, {array[colour].max()}, "
                     f"becomes {pixels[colour].max()} of 255. {hint}")


def _array_to_rgb(array: np.ndarray, *, background: RGBColor) -> Image.Image:
    pixels = np.ascontiguousarray(_array_to_uint8(array))
    _check_not_blacked_out(array, pixels)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim == 2:
        return Image.fromarray(pixels).convert("RGB")
    channels = pixels.shape[-1]
    if channels == 3:
        return Image.fromarray(pixels)
    if channels == 2:
        return _composite(Image.fromarray(pixels).convert("RGBA"), background)
    return _composite(Image.fromarray(pixels), background)
