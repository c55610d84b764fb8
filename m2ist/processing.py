"""The REC processor: image + phrase (+ box) -> the tensors an M²IST model consumes, and back.

Geometry (TransVG): the image is resized so its long side fits a square ``canvas_size`` canvas, normalised,
and pasted on a zero canvas (centred at test time, at a random offset in training); ``pixel_mask`` marks the
real pixels. Boxes become ``labels`` = ``(cx, cy, w, h)`` normalised by the canvas size, the form the model's
``pred_boxes`` take. Each sample carries an ``image_geometry`` row (see :data:`GEOMETRY_FIELDS`): a per-axis
affine map ``canvas_pixel = original_pixel * scale + offset``, which :func:`post_process_boxes` inverts exactly.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import math
import os
import random
import re
import threading
import unicodedata
import warnings
import weakref
from collections.abc import Mapping, Sequence, Set
from io import BytesIO
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    BaseImageProcessor,
    BatchFeature,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from m2ist.data.dataset import RECDataWarning
from m2ist.data.images import ImageLoadError, load_image
from m2ist.data.loaders import box_values, has_visible_text
from m2ist.data.transforms import RECAugmentation, is_flag, is_whole_number, resize_long_side
from m2ist.model import pad_past_vocabulary
from m2ist.ops.boxes import as_box_tensor, box_convert, clip_boxes, looks_normalised
from m2ist.ops.defaults import on_cpu
from m2ist.save_and_load import PIPELINE, PROCESSOR_CONFIG_NAME, processor_setting_differences, processor_settings

__all__ = [
    "GEOMETRY_FIELDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PAD_TOKEN_ROLES",
    "PROCESSOR_CONFIG_NAME",
    "RECImageProcessor",
    "RECProcessor",
    "RECProcessorConfig",
    "boxes_to_labels",
    "download_image",
    "fetch_image",
    "load_rec_image",
    "post_process_boxes",
    "set_pad_token",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: File written by :meth:`RECProcessor.save_pretrained` next to the tokenizer files.
#: Columns of ``image_geometry`` (one row per sample): ``canvas_x = x * scale_x + offset_x`` (same for y).
GEOMETRY_FIELDS: tuple[str, ...] = ("orig_width", "orig_height", "scale_x", "scale_y", "offset_x", "offset_y")

_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder")
_warned_truncation = False
#: One lock per tokenizer, held by :meth:`RECProcessor._tokenize` while it reads the tokenizer's settings
_TOKENIZER_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_TOKENIZER_LOCKS_GUARD = threading.Lock()


def _forget_tokenizer_locks() -> None:
    """Start a forked child (a DataLoader worker) with fresh locks: one another thread of the parent held at the fork
    would stay held in the child forever, and its first phrase would wait for it."""
    global _TOKENIZER_LOCKS, _TOKENIZER_LOCKS_GUARD
    _TOKENIZER_LOCKS, _TOKENIZER_LOCKS_GUARD = weakref.WeakKeyDictionary(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_tokenizer_locks)


def _tokenizer_lock(tokenizer: Any) -> threading.Lock:
    """The lock of ``tokenizer`` (made at its first use, dropped with it): processors sharing a tokenizer take turns.
    Not an attribute of the tokenizer, which must stay picklable for DataLoader workers."""
    with _TOKENIZER_LOCKS_GUARD:
        lock = _TOKENIZER_LOCKS.get(tokenizer)
        if lock is None:
            lock = _TOKENIZER_LOCKS[tokenizer] = threading.Lock()
        return lock


# ---------------------------------------------------------------------------------------------- box geometry
#: Largest coordinate :meth:`RECProcessor.post_process_boxes` reads as normalised (the head's sigmoid boxes lie in [0, 1]).
_NORMALISED_LIMIT = 2.0


def _as_geometry(image_geometry: torch.Tensor | np.ndarray | Sequence[Sequence[float]], like: torch.Tensor,
                 name: str = "boxes"):
    """``image_geometry`` as its six columns, checked: one row per row of ``like`` (the boxes called ``name``),
    finite, the sizes positive and the scales non-zero (negative: a horizontal flip of the augmentation)."""
    geometry = as_box_tensor(image_geometry).to(like.device)
    geometry = geometry.to(torch.promote_types(like.dtype, geometry.dtype))
    if geometry.ndim != 2 or geometry.shape[-1] != len(GEOMETRY_FIELDS):
        raise ValueError(
            f"image_geometry must have shape (batch, {len(GEOMETRY_FIELDS)}) with columns {GEOMETRY_FIELDS}, "
            f"got {tuple(geometry.shape)}. Use the 'image_geometry' returned by RECProcessor."
        )
    if geometry.shape[0] != like.shape[0]:  # one row would be broadcast over every box
        raise ValueError(f"{name} has {like.shape[0]} rows but image_geometry has {geometry.shape[0]}: pass one "
                         "geometry row per box (the 'image_geometry' RECProcessor returned with the batch).")
    # a NaN, a zero scale or an image of no pixels maps every box to NaN or to one corner, silently
    bad = ~(torch.isfinite(geometry).all(-1) & (geometry[:, :2] > 0).all(-1) & (geometry[:, 2:4] != 0).all(-1))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"image_geometry[{row}] = {geometry[row].tolist()} is no image's geometry: columns "
                         f"{GEOMETRY_FIELDS} must be finite, with positive sizes and non-zero scales. Use the "
                         "'image_geometry' RECProcessor returned with the batch.")
    return geometry.unbind(-1)


def _check_normalised(pred_boxes: Any) -> None:
    """Refuse predictions far outside [0, 1] (the head's boxes are sigmoids): pixel boxes passed for the model's."""
    pred = as_box_tensor(pred_boxes)
    if not pred.numel() or pred.is_complex():
        return  # post_process_boxes names what is wrong with them
    largest = float(pred.double().nan_to_num(0.0, posinf=0.0, neginf=0.0).abs().max())  # non-finite: predict names it
    if largest > _NORMALISED_LIMIT:
        raise ValueError(f"pred_boxes hold values up to {largest:g}, but they must be the model's normalised (cx, cy, "
                         "w, h) boxes, in [0, 1] of the canvas: these look like pixel boxes, which would be clipped to "
                         "one corner of the image. Pass outputs.pred_boxes as the model returns them.")


def _canvas(canvas_size: Any) -> int:
    """``canvas_size`` checked as :class:`RECImageProcessor` checks it: 0, a negative or a NaN canvas gave all-zero or
    NaN boxes."""
    return _whole_number("canvas_size", canvas_size, _CANVAS_LIMITS)


def boxes_to_labels(
    boxes_xyxy: torch.Tensor, image_geometry: torch.Tensor | np.ndarray, canvas_size: int
) -> torch.Tensor:
    """Map ``(B, 4)`` ``xyxy`` boxes in original-image pixels to normalised ``(cx, cy, w, h)`` canvas labels."""
    canvas_size = _canvas(canvas_size)
    boxes = as_box_tensor(boxes_xyxy)
    boxes = boxes.to(torch.promote_types(boxes.dtype, torch.float32))
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes_xyxy must have shape (batch, 4) in (x0, y0, x1, y1) pixels, got {tuple(boxes.shape)}.")
    _, _, scale_x, scale_y, offset_x, offset_y = _as_geometry(image_geometry, boxes, "boxes_xyxy")
    x_a, x_b = boxes[:, 0] * scale_x + offset_x, boxes[:, 2] * scale_x + offset_x
    y_a, y_b = boxes[:, 1] * scale_y + offset_y, boxes[:, 3] * scale_y + offset_y
    canvas_xyxy = torch.stack(
        (torch.minimum(x_a, x_b), torch.minimum(y_a, y_b), torch.maximum(x_a, x_b), torch.maximum(y_a, y_b)), -1
    )
    return box_convert(canvas_xyxy, "xyxy", "cxcywh") / canvas_size


def post_process_boxes(
    pred_boxes: torch.Tensor, image_geometry: torch.Tensor | np.ndarray, canvas_size: int, clamp: bool = True
) -> torch.Tensor:
    """Map normalised ``(cx, cy, w, h)`` canvas boxes ``(B, 4)`` to ``xyxy`` pixels of the original images.

    The exact inverse of :func:`boxes_to_labels`; with ``clamp`` the result is clipped to each image. A negative
    width or height (a readout whose far edge lies before its near one) is an empty box at its centre, as the loss
    and the trainer's metrics read it: it scores IoU 0, never the box it mirrors.
    """
    clamp = _flag("clamp", clamp)  # clamp="no" would clip
    canvas_size = _canvas(canvas_size)
    pred = as_box_tensor(pred_boxes)
    pred = pred.to(torch.promote_types(pred.dtype, torch.float32))
    if pred.ndim != 2 or pred.shape[-1] != 4:
        raise ValueError(f"pred_boxes must have shape (batch, 4) in (cx, cy, w, h) form, got {tuple(pred.shape)}.")
    pred = torch.cat((pred[..., :2], pred[..., 2:].clamp(min=0)), -1)
    width, height, scale_x, scale_y, offset_x, offset_y = _as_geometry(image_geometry, pred, "pred_boxes")
    canvas = box_convert(pred * canvas_size, "cxcywh", "xyxy")
    x_a, x_b = (canvas[:, 0] - offset_x) / scale_x, (canvas[:, 2] - offset_x) / scale_x
    y_a, y_b = (canvas[:, 1] - offset_y) / scale_y, (canvas[:, 3] - offset_y) / scale_y
    boxes = torch.stack(
        (torch.minimum(x_a, x_b), torch.minimum(y_a, y_b), torch.maximum(x_a, x_b), torch.maximum(y_a, y_b)), -1
    )
    if clamp:
        boxes = clip_boxes(boxes, width, height)
    return boxes + 0.0  # turns -0.0 into 0.0


# ---------------------------------------------------------------------------------------------- inputs
def _clean_box(box: Any, width: int, height: int, index: int) -> tuple[list[float], list[float]]:
    """Validate one ``xyxy`` pixel box: ``(as given, clipped to its image)``."""
    try:
        values = list(box_values(box))
    except ValueError as err:
        raise ValueError(
            f"Box {index} must be 4 finite numbers (x0, y0, x1, y1) in pixels: {err}. Pass one box per phrase: "
            "[x0, y0, x1, y1] with a phrase string, a list of such boxes or a (B, 4) array with a list of phrases."
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"Box {index} must be 4 finite numbers (x0, y0, x1, y1) in pixels, got {values}.")
    x0, y0, x1, y1 = values
    if x1 < x0 or y1 < y0:
        raise ValueError(
            f"Box {index} {values} has x1 < x0 or y1 < y0. Boxes must be xyxy pixels of the original image; "
            "convert xywh (COCO) boxes with m2ist.ops.boxes.box_convert(boxes, 'xywh', 'xyxy')."
        )
    if x0 >= width or y0 >= height or x1 <= 0 or y1 <= 0:
        raise ValueError(f"Box {index} {values} lies outside its {width}x{height} image; boxes are xyxy pixels.")
    clipped = [min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height)]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise ValueError(f"Box {index} {values} has zero width or height; a box must cover part of its image.")
    if looks_normalised(values, width, height):  # as RECDataset and evaluate(): a 1-pixel label in the corner
        raise ValueError(f"Box {index} {values} lies within [0, 1] in a {width}x{height} image: it looks normalised, "
                         "but RECProcessor boxes are xyxy pixels; multiply it by the image width and height.")
    return values, clipped


def _shortened(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis, for a log line (a phrase may be thousands long)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _three_floats(name: str, value: Any) -> tuple[float, float, float]:
    values = [float(value)] if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"{name} must be one number or three (one per RGB channel), got {value!r}.")
    return (values[0], values[1], values[2])


#: Limits of the processor's sizes: those of M2ISTConfig's ``image_size`` and ``max_query_len``.
_CANVAS_LIMITS, _QUERY_LIMITS = (1, 16384), (2, 8192)


def _whole_number(name: str, value: Any, limits: tuple[int, int]) -> int:
    """``value`` as an int if it is a whole number within ``limits``; text, ``True``, ``7.9`` are refused (``int()``
    would read ``7.9`` as 7 and a config's ``"12"`` as 12 silently)."""
    low, high = limits
    if not is_whole_number(value) or not low <= int(value) <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r}.")
    return int(value)


def _flag(name: str, value: Any) -> bool:
    """``value`` if it is a boolean: ``bool("false")`` is ``True``."""
    if not is_flag(value):
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return bool(value)


def _normalisation(image_mean: Any, image_std: Any) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Check ``image_mean``/``image_std``: finite, for pixel values in [0, 1]. A NaN turns every pixel into NaN, an
    infinite std every image into zeros, and 0..255 statistics (``123.675``) flatten every image to one value."""
    mean, std = _three_floats("image_mean", image_mean), _three_floats("image_std", image_std)
    if not all(math.isfinite(value) for value in (*mean, *std)):
        raise ValueError(f"image_mean and image_std must be finite numbers, got {mean} and {std}.")
    if min(std) <= 0:
        raise ValueError(f"image_std must be positive, got {std}.")
    if not all(0.0 <= value <= 1.0 for value in mean) or max(std) > 1.0:
        raise ValueError(
            f"image_mean {mean} and image_std {std} must be statistics of pixel values in [0, 1] (ImageNet: mean "
            f"{IMAGENET_MEAN}, std {IMAGENET_STD}); statistics of 0..255 values (mean 123.675) would flatten every "
            "image to almost one value. Divide them by 255."
        )
    return mean, std


#: Keys transformers writes into an image processor's config beside its settings.
_BOOKKEEPING_KEYS = ("image_processor_type", "processor_class", "feature_extractor_type", "_processor_class", "auto_map")
#: What to do instead of the transformers image-processor options RECImageProcessor does not have.
_IMAGE_OPTION_HINTS = {
    "size": "the canvas is canvas_size x canvas_size (the long side is resized to it, the rest padded): set canvas_size",
    "crop_size": "RECImageProcessor never crops (a crop would cut boxes): set canvas_size",
    "do_resize": "every image is resized to the canvas (the model takes one size): set canvas_size",
    "do_center_crop": "RECImageProcessor never crops (a crop would cut boxes)",
    "do_pad": "every image is padded to the square canvas (pixel_mask marks the padding)",
    "do_normalize": "to keep raw [0, 1] pixels set image_mean=0 and image_std=1",
    "do_rescale": "uint8 input is read as 0..255 and float input must already be in [0, 1] (floats in 0..255 are "
                  "refused, never rescaled twice); pass 0..255 data as uint8",
    "rescale_factor": "uint8 input is divided by 255 and float input must be in [0, 1]",
    "do_convert_rgb": "every image is converted to RGB (transparency on white)",
    "input_data_format": "arrays are read channels-last (H, W, C); tensors (C, H, W) or (H, W, C)",
    "image_size": "the setting is canvas_size",
}


def _refuse_image_options(options: dict[str, Any], where: str) -> None:
    """Refuse keyword arguments RECImageProcessor does not read (transformers' ``size``, ``do_normalize``, a typo):
    kept as attributes, they would be saved and reloaded while every image is processed as if they were not there."""
    if not options:
        return
    hints = [f"{key}: {_IMAGE_OPTION_HINTS[key]}" for key in sorted(options) if key in _IMAGE_OPTION_HINTS]
    raise TypeError(
        f"{where} got options it does not have: {sorted(options)}. Its only settings are canvas_size, image_mean and "
        "image_std" + (f" ({'; '.join(hints)})." if hints else ".")
    )


# ---------------------------------------------------------------------------------------------- images
def _decode_bytes(data: bytes, source: str) -> Image.Image:
    """Decode an encoded file held in memory as :func:`load_image` reads the same file from disk: the stored pixel
    grid (Pillow's ``load()`` applies a TIFF's orientation tag itself; ``load_image`` undoes that only for an image it
    decodes), in RGB."""
    try:
        return load_image(Image.open(BytesIO(data)))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = str(err).removeprefix("Cannot decode image <in-memory PIL image>: ")
        raise ImageLoadError(f"{source} is not an image PIL can read ({reason}).") from err


def download_image(url: str, *, timeout: float | None = 30.0) -> bytes:
    """The bytes an ``http(s)`` URL serves (with transformers' HTTP client, ``httpx``), undecoded; an
    :class:`~m2ist.data.images.ImageLoadError` naming the URL when it cannot be fetched."""
    import httpx

    try:
        response = httpx.get(url, timeout=timeout, follow_redirects=True)
        response.raise_for_status()
    except httpx.HTTPStatusError as err:
        raise ImageLoadError(f"Could not download the image {url}: HTTP {err.response.status_code}.") from err
    except httpx.HTTPError as err:
        raise ImageLoadError(f"Could not download the image {url}: {type(err).__name__}: {err}. Check the URL "
                             "and the network, or pass a local path.") from err
    return response.content


def fetch_image(image: Any, *, timeout: float | None = 30.0) -> Any:
    """Turn a URL, a base64 data URI or a tensor into something :func:`m2ist.data.images.load_image` reads.

    * ``http://`` / ``https://`` URLs are downloaded (with transformers' HTTP client, ``httpx``);
    * ``data:image/...;base64,...`` URIs and ``bytes`` (an encoded file read into memory) are decoded;
    * ``torch.Tensor`` s become arrays read like numpy arrays: channels-first ``(C, H, W)`` ones are moved to
      ``(H, W, C)``, a shape that could be either (``(3, 10, 4)``) is refused, ``bfloat16``/``float16`` become
      float32; floats stay in ``[0, 1]``;
    * anything else (paths, PIL images, arrays) is returned as it is.

    The pixels then follow m2ist's rules for every source alike (EXIF orientation not applied, transparency on
    white; see :mod:`m2ist.data.images`), so a file and the same file served by URL give the same boxes.
    """
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        return _decode_bytes(download_image(image, timeout=timeout), f"The download of {image}")
    if isinstance(image, str) and image.startswith("data:"):
        header, _, payload = image.partition(",")
        if not header.startswith("data:image/") or not header.endswith(";base64") or not payload:
            raise ImageLoadError(f"Unsupported data URI {image[:40]!r}...: pass 'data:image/<type>;base64,<data>'.")
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as err:
            raise ImageLoadError(f"The data URI {image[:40]!r}... holds invalid base64 ({err}).") from err
        return _decode_bytes(data, "The data URI")
    if isinstance(image, bytes | bytearray | memoryview):  # an encoded file read into memory (an upload)
        return _decode_bytes(bytes(image), f"The {len(image)} bytes given as an image")
    if isinstance(image, torch.Tensor):
        return _tensor_to_array(image)
    return image


def _tensor_to_array(tensor: torch.Tensor) -> np.ndarray:
    """An image tensor as the ``(H, W[, C])`` array numpy users pass: 16-bit floats widened to float32, a
    ``(C, H, W)`` tensor moved to channels-last, a shape that reads both ways refused."""
    tensor = tensor.detach().cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    array = tensor.numpy()
    if array.ndim == 3:
        first, last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 2, 3, 4)
        if first and last:
            raise ValueError(
                f"Image tensor of shape {tuple(array.shape)} could be channels-first (C, H, W) or channels-last "
                "(H, W, C). Pass a channels-last numpy array: image.permute(1, 2, 0).numpy() for (C, H, W), "
                "image.numpy() for (H, W, C)."
            )
        if first:
            array = np.moveaxis(array, 0, -1)
    return array


def load_rec_image(image: Any) -> Image.Image:
    """An RGB PIL image from a path, URL, base64 data URI, PIL image, array or tensor (see :func:`fetch_image`)."""
    return load_image(fetch_image(image))


# ---------------------------------------------------------------------------------------------- the image processor
class RECImageProcessor(BaseImageProcessor):
    """The image half of :class:`RECProcessor`: letterbox each image onto a square canvas and normalise it.

    The image is resized (aspect kept) so its long side is ``canvas_size``, normalised with ``image_mean`` /
    ``image_std`` (values in [0, 1]) and pasted centred on a zero canvas; ``pixel_mask`` marks the real pixels and
    ``image_geometry`` maps original pixels to the canvas (see :data:`GEOMETRY_FIELDS`).

    Args:
        canvas_size: side ``S`` of the square canvas (640 in TransVG).
        image_mean / image_std: the vision tower's normalisation, one number or three.
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values", "pixel_mask"]

    def __init__(self, canvas_size: int = 640, image_mean: Sequence[float] | float = IMAGENET_MEAN,
                 image_std: Sequence[float] | float = IMAGENET_STD, **kwargs: Any) -> None:
        for key in _BOOKKEEPING_KEYS:  # written by transformers beside the settings, not settings
            kwargs.pop(key, None)
        _refuse_image_options(kwargs, "RECImageProcessor")
        super().__init__()
        self.canvas_size = _whole_number("canvas_size", canvas_size, _CANVAS_LIMITS)
        mean, std = _normalisation(image_mean, image_std)
        self.image_mean, self.image_std = list(mean), list(std)

    @on_cpu()  # a processor's tensors are the CPU's, whatever torch.set_default_device says
    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        """Letterbox a batch of images (paths, URLs, data URIs, PIL images, arrays or tensors) onto the canvas.

        Returns ``pixel_values`` (B, 3, S, S), ``pixel_mask`` (B, S, S) and ``image_geometry`` (B, 6).
        """
        _refuse_image_options(kwargs, "RECImageProcessor.preprocess")
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")
        if not isinstance(images, list | tuple):
            images = [images]
        pixel_values, pixel_mask, geometry = self.empty_batch(len(images))
        for index, image in enumerate(images):
            geometry[index] = self.letterbox(load_rec_image(image), pixel_values[index], pixel_mask[index])
        data = {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "image_geometry": geometry}
        if return_tensors != "pt":
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data, tensor_type=return_tensors)

    @classmethod
    def from_dict(cls, image_processor_dict: dict[str, Any], **kwargs: Any) -> Any:
        """Build from a saved config with ``kwargs`` as overrides, every one checked by the constructor.

        transformers' own ``from_dict`` sets an override it does not know (``canvas_size=7.9``) as an attribute,
        unchecked, and drops an unknown one (``size=512``, a typo) without a word."""
        return_unused = kwargs.pop("return_unused_kwargs", False)
        processor = cls(**{**image_processor_dict, **kwargs})
        return (processor, {}) if return_unused else processor

    def empty_batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zero ``pixel_values``, ``pixel_mask`` and ``image_geometry`` for ``batch`` samples."""
        size = self.canvas_size
        return (torch.zeros((batch, 3, size, size), dtype=torch.float32),
                torch.zeros((batch, size, size), dtype=torch.long),
                torch.zeros((batch, len(GEOMETRY_FIELDS)), dtype=torch.float32))

    def letterbox(self, image: Image.Image, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        """Resize ``image`` to the canvas, centre it, write it into ``pixel_values`` / ``pixel_mask``; return its
        geometry row."""
        width, height = image.size
        size = self.canvas_size
        resized, scale_x, scale_y = resize_long_side(image, size)
        offset_x, offset_y = (size - resized.width) // 2, (size - resized.height) // 2
        self.paste(resized, (offset_x, offset_y), pixel_values, pixel_mask)
        return torch.tensor((width, height, scale_x, scale_y, offset_x, offset_y), dtype=torch.float32)

    def paste(self, image: Image.Image, offset: tuple[int, int], pixel_values: torch.Tensor,
              pixel_mask: torch.Tensor) -> None:
        """Normalise an RGB image already at canvas scale and write it at ``offset`` (x, y) of one sample's
        ``pixel_values`` (3, S, S) and ``pixel_mask`` (S, S)."""
        # x / 255 then (x - mean) / std, folded into one multiply-add per channel
        multiplier = torch.tensor([1.0 / (255.0 * s) for s in self.image_std], dtype=torch.float32)[:, None, None]
        shift = torch.tensor([-m / s for m, s in zip(self.image_mean, self.image_std)], dtype=torch.float32)
        shift = shift[:, None, None]
        offset_x, offset_y = offset
        pixels = rearrange(torch.from_numpy(np.array(image, dtype=np.uint8)), "h w c -> c h w")
        window = (slice(offset_y, offset_y + image.height), slice(offset_x, offset_x + image.width))
        torch.addcmul(shift, pixels, multiplier, out=pixel_values[:, window[0], window[1]])
        pixel_mask[window[0], window[1]] = 1


#: The words ``pad_token=`` takes for one of the tokenizer's special tokens, by its role.
PAD_TOKEN_ROLES = ("eos", "bos", "unk", "sep", "cls")


def set_pad_token(tokenizer: PreTrainedTokenizerBase, pad_token: str) -> None:
    """Make ``pad_token`` the pad token of ``tokenizer``: a role among :data:`PAD_TOKEN_ROLES` (``"eos"``) or a token
    of its vocabulary as written (``"<|endoftext|>"``), for a tokenizer without one (GPT-2, LLaMA). A token the
    tokenizer lacks is refused (a new token would have an id past the text tower's vocabulary), and so is replacing
    the pad token a tokenizer has (the tower was trained with it); naming that same token changes nothing."""
    if not isinstance(pad_token, str) or not pad_token.strip():
        raise ValueError(f"pad_token must be a role ({', '.join(PAD_TOKEN_ROLES)}) or a token of the tokenizer, got "
                         f"{pad_token!r}.")
    word = pad_token.strip().lower().removesuffix("_token")
    if word in PAD_TOKEN_ROLES:
        token = getattr(tokenizer, f"{word}_token", None)
        if token is None:
            roles = [f"{role} ({getattr(tokenizer, f'{role}_token')!r})" for role in PAD_TOKEN_ROLES
                     if getattr(tokenizer, f"{role}_token", None) is not None]
            raise ValueError(f"pad_token {pad_token!r}: the text tower's tokenizer has no {word} token; its special "
                             f"tokens are {', '.join(roles) or 'none'}: name one of them, or a token of its vocabulary.")
        token = str(token)
    else:
        token = pad_token
        if token not in tokenizer.get_vocab():
            raise ValueError(f"pad_token {pad_token!r} is not a token of the text tower's tokenizer (a new token would "
                             f"have an id past the tower's vocabulary): name one of its special tokens by role "
                             f"({', '.join(PAD_TOKEN_ROLES)}) or a token of its vocabulary, as written.")
    current = getattr(tokenizer, "pad_token", None)
    if current is not None and str(current) != token:
        raise ValueError(f"pad_token {pad_token!r}: the text tower's tokenizer pads with {str(current)!r} already, and "
                         "the tower was trained with it: leave pad_token unset (--pad-token, model.pad_token on the "
                         "command line), which is for tokenizers without a pad token (GPT-2, LLaMA...).")
    tokenizer.pad_token = token


# ---------------------------------------------------------------------------------------------- the processor
class RECProcessor(ProcessorMixin):
    """Turn images, phrases and (optionally) boxes into the batch an M²IST model takes, and predictions back.

    A ``transformers`` processor (``ProcessorMixin``): a :class:`RECImageProcessor` and the text tower's tokenizer.
    ``save_pretrained`` writes the tokenizer files and ``processor_config.json`` (plus ``m2ist_processor.json``
    for older m2ist versions); ``AutoProcessor.from_pretrained(folder)`` finds it once ``m2ist`` is imported.

    Args:
        tokenizer: a Hugging Face tokenizer of the text tower; it adds its own special tokens (BERT's ``[CLS]``/
            ``[SEP]``, Llama's BOS, none for GPT-2): the processor adds none.
        image_processor: a :class:`RECImageProcessor`; by default one built from ``canvas_size``, ``image_mean``
            and ``image_std``.
        image_mean: per-channel mean of the vision tower's normalisation (values in [0, 1]; ImageNet's by default).
        image_std: per-channel standard deviation of that normalisation.
        canvas_size: side ``S`` of the square padded canvas (640 in TransVG).
        max_query_len: token length of every phrase, the tokenizer's special tokens included (20; 40 for RefCOCOg).
        lowercase: lower-case phrases before tokenising.
        augment: training augmentations, applied when called with ``train=True``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: RECImageProcessor | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        canvas_size: int | None = None,
        max_query_len: int = 20,
        lowercase: bool = True,
        augment: RECAugmentation | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}.")
        if getattr(tokenizer, "pad_token", None) is None:
            raise ValueError("The tokenizer has no pad token (GPT-2's and LLaMA's have none): make one of its own tokens "
                             "the pad token (RECProcessor.from_pretrained(..., pad_token='eos'), or "
                             "tokenizer.pad_token = tokenizer.eos_token before building the processor; on the command "
                             "line, m2ist train --pad-token eos); a new one (add_special_tokens({'pad_token': '[PAD]'})) "
                             "would have an id past the text tower's vocabulary.")
        settings = {"canvas_size": canvas_size, "image_mean": image_mean, "image_std": image_std}
        given = {key: value for key, value in settings.items() if value is not None}
        if image_processor is None:
            image_processor = RECImageProcessor(**{"canvas_size": 640, **given})
        elif not isinstance(image_processor, RECImageProcessor):
            raise TypeError(f"image_processor must be a RECImageProcessor, got {type(image_processor).__name__}.")
        elif given:
            raise ValueError(f"Pass {sorted(given)} to the RECImageProcessor, or no image_processor: not both.")
        max_query_len = _whole_number("max_query_len", max_query_len, _QUERY_LIMITS)  # room for [CLS] and [SEP]
        lowercase = _flag("lowercase", lowercase)
        if isinstance(augment, dict):
            augment = RECAugmentation.from_dict(augment)
        if augment is not None and not isinstance(augment, RECAugmentation):
            raise TypeError(f"augment must be a RECAugmentation or None, got {type(augment).__name__}.")
        self.max_query_len = int(max_query_len)
        self.lowercase = bool(lowercase)
        self.augment = augment
        super().__init__(tokenizer, image_processor, **kwargs)

    # the image settings live on the image processor
    @property
    def canvas_size(self) -> int:
        """Side of the square canvas (the image processor's)."""
        return self.image_processor.canvas_size

    @property
    def image_mean(self) -> tuple[float, float, float]:
        """The normalisation mean (the image processor's)."""
        return tuple(self.image_processor.image_mean)  # type: ignore[return-value]

    @property
    def image_std(self) -> tuple[float, float, float]:
        """The normalisation standard deviation (the image processor's)."""
        return tuple(self.image_processor.image_std)  # type: ignore[return-value]

    @property
    def model_input_names(self) -> list[str]:
        """The inputs the model takes (``image_geometry`` and ``labels`` are for boxes, not the model)."""
        return ["pixel_values", "pixel_mask", "input_ids", "attention_mask"]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tokenizer={type(self.tokenizer).__name__}, canvas_size={self.canvas_size}, "
            f"max_query_len={self.max_query_len}, lowercase={self.lowercase}, image_mean={self.image_mean}, "
            f"image_std={self.image_std}, augment={self.augment!r})"
        )

    # ------------------------------------------------------------------ main entry point
    @on_cpu()  # a processor's tensors are the CPU's, whatever torch.set_default_device says
    def __call__(
        self,
        images: Any = None,
        texts: str | Sequence[str] | None = None,
        boxes: Any = None,
        train: bool = False,
        return_tensors: str | None = "pt",
        rng: random.Random | torch.Generator | None = None,
        *,
        text: str | Sequence[str] | None = None,
    ) -> BatchFeature:
        """Process a batch (or one sample when ``texts`` is a string).

        Args:
            images: file paths, ``http(s)`` URLs, base64 data URIs, PIL images, arrays or tensors (one per
                phrase; see :func:`fetch_image`).
            texts: the referring phrases (``text=`` is accepted too, as in transformers' processors).
            boxes: optional ``(x0, y0, x1, y1)`` boxes in pixels of the original images (a list or ``(B, 4)``).
            train: apply ``self.augment`` (boxes required). Without ``augment`` this is the test-time transform.
            return_tensors: ``"pt"``, ``"np"`` or ``None`` (numpy).
            rng: a generator for the augmentation instead of its own.

        Returns:
            A ``BatchFeature`` with ``pixel_values`` (B, 3, S, S) float, ``pixel_mask`` (B, S, S) long,
            ``input_ids`` and ``attention_mask`` (B, L) long, ``image_geometry`` (B, 6) float and, with boxes,
            ``labels`` (B, 4) normalised ``(cx, cy, w, h)``.
        """
        if text is not None:
            if texts is not None:
                raise TypeError("Pass the phrases once: texts= or text=, not both.")
            texts = text
        if images is None or texts is None:
            raise ValueError("RECProcessor needs images and phrases: processor(images, texts[, boxes]).")
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")
        train = _flag("train", train)  # train="False" would augment
        if isinstance(texts, str):
            if isinstance(images, list | tuple) and len(images) != 1:
                raise ValueError(f"Got {len(images)} images and one phrase string: pass a list of phrases, one per "
                                 "image (m2ist.inference.predict_boxes uses one phrase for several images).")
            images, texts = (list(images) if isinstance(images, list | tuple) else [images]), [texts]
            boxes = None if boxes is None else [boxes]
        if not isinstance(images, list | tuple):
            raise TypeError("Pass a list of images with a list of phrases (or one image with one phrase string).")
        if isinstance(texts, Set | Mapping):  # any other iterable (a list, a pandas Series, a column) has an order
            raise TypeError(f"texts must be a phrase string or an ordered list of phrases, got a {type(texts).__name__}"
                            " (a set or a dict has no order to pair its phrases with the images).")
        texts = list(texts)
        if len(images) != len(texts) or not texts:
            raise ValueError(f"Got {len(images)} images and {len(texts)} phrases; pass one phrase per image.")
        if boxes is not None:
            iterable = hasattr(boxes, "tolist") or hasattr(boxes, "__iter__")
            if isinstance(boxes, Set | Mapping | str | bytes) or not iterable:
                unordered = isinstance(boxes, Set | Mapping)  # a set of boxes has no order; 5 is no box
                raise TypeError(f"boxes must be one [x0, y0, x1, y1] box per phrase, in order (a list of boxes or a "
                                f"(B, 4) array), got a value of type {type(boxes).__name__}"
                                + (": a set or a dict has no order to pair its boxes with the phrases."
                                   if unordered else "."))
            boxes = boxes.tolist() if hasattr(boxes, "tolist") else list(boxes)
            if not isinstance(boxes, list):  # a 0-d array's tolist() is a number
                raise TypeError(f"boxes must be one [x0, y0, x1, y1] box per phrase, got the number {boxes!r}.")
            if len(boxes) != len(texts):
                raise ValueError(f"Got {len(boxes)} boxes for {len(texts)} phrases; pass one box per phrase.")
        augment = self.augment if train else None
        if augment is not None and boxes is None:
            raise ValueError("Training augmentation moves the box with the image: pass boxes when train=True.")

        image_processor = self.image_processor
        size = image_processor.canvas_size
        pixel_values, pixel_mask, geometry = image_processor.empty_batch(len(texts))
        clean_boxes: list[list[float]] = []
        clipped: list[str] = []
        final_texts: list[str] = []
        for index, (image, phrase) in enumerate(zip(images, texts)):
            if not isinstance(phrase, str):
                raise TypeError(f"Phrase {index} must be a string, got {type(phrase).__name__}.")
            if not has_visible_text(phrase):
                raise ValueError(f"Phrase {index} is empty or shows nothing ({phrase!r}: only whitespace, control or "
                                 "zero-width characters); give each image a referring phrase (RECDataset drops such "
                                 "samples when it is built).")
            phrase = unicodedata.normalize("NFC", phrase)  # the same visible text gives the same tokens
            image = load_rec_image(image)
            width, height = image.size
            if boxes is not None:
                given, clean = _clean_box(boxes[index], width, height, index)
                clean_boxes.append(clean)
                if max(abs(a - b) for a, b in zip(given, clean)) > 1:  # a pixel or less out is rounding (COCO's edges)
                    clipped.append(f"box {index} {given} in a {width}x{height} image")
            if augment is not None:
                sample = augment(image, phrase, clean_boxes[index], size, rng=rng)
                phrase = sample.text
                image_processor.paste(sample.image, sample.offset, pixel_values[index], pixel_mask[index])
                geometry[index] = torch.tensor((width, height, *sample.scale, *sample.translation),
                                               dtype=torch.float32)
            else:
                geometry[index] = image_processor.letterbox(image, pixel_values[index], pixel_mask[index])
            final_texts.append(phrase.lower() if self.lowercase else phrase)
        if clipped:  # RECDataset clips (and reports) when it is built; a loop of one's own reaches here unclipped
            warnings.warn(f"Clipped {len(clipped)} of {len(texts)} boxes reaching more than a pixel outside their "
                          f"image to it, e.g. {clipped[0]}: were they annotated on another copy of the image (a "
                          "larger one, or before a crop)? Boxes are xyxy pixels of the image passed.",
                          RECDataWarning, stacklevel=2)

        tokens = self._tokenize(
            final_texts,
            padding="max_length",
            padding_side="right",  # whatever the tokenizer's default (LLaMA's pads left): the head's text positions
            truncation=True,       # count from the first token, and a phrase's features must not shift with its length
            max_length=self.max_query_len,
            return_attention_mask=True,
            return_tensors="np",
        )
        self._check_words(np.asarray(tokens["input_ids"]), np.asarray(tokens["attention_mask"]), final_texts)
        self._warn_unknown(np.asarray(tokens["input_ids"]), np.asarray(tokens["attention_mask"]), final_texts)
        self._warn_truncated(np.asarray(tokens["attention_mask"]), final_texts)
        data: dict[str, Any] = {
            "pixel_values": pixel_values,
            "pixel_mask": pixel_mask,
            "input_ids": torch.from_numpy(np.asarray(tokens["input_ids"], dtype=np.int64)),
            "attention_mask": torch.from_numpy(np.asarray(tokens["attention_mask"], dtype=np.int64)),
            "image_geometry": geometry,
        }
        if boxes is not None:
            labels = boxes_to_labels(torch.tensor(clean_boxes, dtype=torch.float64), geometry, size)
            data["labels"] = labels.to(torch.float32)
        if return_tensors != "pt":
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data, tensor_type=return_tensors)

    def _tokenize(self, texts: list[str], **kwargs: Any) -> Any:
        """``self.tokenizer(texts, **kwargs)`` as every phrase must be read, whatever the tokenizer's own settings:
        cut at its end (a tokenizer with ``truncation_side="left"`` would drop a long phrase's first words, the
        subject, while the warning says its last ones are cut), and with text that spells a special token (``[SEP]``,
        ``<pad>``, ``</s>``, ``<|endoftext|>``) read as words, never as that token (a ``<pad>`` with attention 1 in
        the middle of a phrase, an end of text before its last words)."""
        tokenizer = self.tokenizer
        # transformers takes no truncation side per call: the shared tokenizer's is set for the call, under a lock
        # of that tokenizer, so that another thread's call never runs with it half-way changed or given back
        with _tokenizer_lock(tokenizer):
            side = tokenizer.truncation_side
            if side != "right":
                tokenizer.truncation_side = "right"
            try:
                try:
                    return tokenizer(texts, split_special_tokens=True, **kwargs)
                except ValueError as error:  # a backend that never parses special tokens from text (mistral-common)
                    if "split_special_tokens" not in str(error):
                        raise
                    return tokenizer(texts, **kwargs)
            finally:
                if side != "right":
                    tokenizer.truncation_side = side

    def _check_words(self, input_ids: np.ndarray, attention_mask: np.ndarray, texts: list[str]) -> None:
        """Refuse a phrase left with no token but the tokenizer's special ones (``[CLS]``, ``[SEP]``, padding): the
        model would locate a box for no words. ``[UNK]`` counts as a word."""
        special = set(self.tokenizer.all_special_ids) - {self.tokenizer.unk_token_id}
        words = np.isin(input_ids, sorted(special), invert=True) & (attention_mask == 1)
        empty = np.flatnonzero(~words.any(axis=1))
        if empty.size:
            index = int(empty[0])
            raise ValueError(
                f"Phrase {index} {texts[index]!r} leaves no word token with max_query_len={self.max_query_len}: the "
                f"tokenizer drops all of its characters (accents or symbols only), or max_query_len leaves no room "
                "beside the special tokens. Rewrite the phrase, or raise max_query_len."
            )

    def _warn_unknown(self, input_ids: np.ndarray, attention_mask: np.ndarray, texts: list[str]) -> None:
        """Warn when every word token of a phrase is the tokenizer's unknown token (``[UNK]``): an emoji, a script
        or fullwidth letters the vocabulary lacks. The model would find a box for no word it knows; logged (not
        raised) for every batch that holds one, so that one odd phrase never stops a training run."""
        tokenizer = self.tokenizer
        unknown = tokenizer.unk_token_id
        # padding (pad = unk in some tokenizers) is told apart by its attention 0; a token the tokenizer sets around
        # every phrase is not: byte-level tokenizers (GPT-2: one token for all) read every character anyway
        roles = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id)
        if unknown is None or unknown in roles:
            return
        special = set(tokenizer.all_special_ids) - {unknown}
        words = np.isin(input_ids, sorted(special), invert=True) & (attention_mask == 1)
        only_unknown = np.flatnonzero(words.any(axis=1) & ~(words & (input_ids != unknown)).any(axis=1))
        if only_unknown.size:
            shown = ", ".join(repr(_shortened(texts[int(i)], 40)) for i in only_unknown[:3])
            logger.warning(
                "%d of %d phrases read as unknown tokens only (%s) to the tokenizer: %s. The model finds a box for "
                "no word it knows. Write them in words of the text tower's language (its vocabulary lacks these "
                "characters: emoji, another script, fullwidth letters, or a word over the tokenizer's length limit).",
                only_unknown.size, len(texts), tokenizer.unk_token, shown)

    def _warn_truncated(self, attention_mask: np.ndarray, texts: list[str]) -> None:
        """Warn (once per process) when a phrase has more tokens than ``max_query_len``: its last words are cut
        off, and the box is found for what is left (TransVG truncates too, silently)."""
        global _warned_truncation
        full = np.flatnonzero(attention_mask.sum(axis=1) >= self.max_query_len)
        if _warned_truncation or not full.size:
            return
        lengths = self._token_counts([texts[i] for i in full])
        cut = [(int(i), length) for i, length in zip(full, lengths) if length > self.max_query_len]
        if cut:
            _warned_truncation = True
            index, length = cut[0]
            logger.warning(
                "Phrase %d %r has %d tokens but max_query_len=%d keeps only the first %d (special tokens included): its "
                "last words are not read "
                "(%d of %d phrases in this batch are cut). Shorten the phrases, or, when training, raise "
                "max_query_len (TransVG uses 40 for RefCOCOg; a trained adapter keeps its own); this warning is "
                "shown once.",
                index, _shortened(texts[index]), length, self.max_query_len, self.max_query_len, len(cut), len(texts))

    # ------------------------------------------------------------------ the model it feeds
    def check_fits(self, model: Any, *, saved: bool = False) -> None:
        """Refuse, in one line naming the fix, a processor whose inputs ``model`` would misread or fail on: another
        canvas or a longer ``max_query_len`` (:func:`check_processor_fits`), a tokenizer with a token the text tower
        cannot embed (a pad token added past the vocabulary, another tower's larger vocabulary) or whose own pad token
        is not the one the tower reserves (another vocabulary: every id would mean another word). Unless ``saved``
        (the processor the adapter was saved, so trained, with), warn when the tokenizer was loaded from another Hub
        repo than the recorded text tower, or the normalisation is not the vision tower's own (its
        ``preprocessor_config.json``, when on this machine). Run where a processor meets a model:
        ``model.processor = ...``, ``predict``/``evaluate`` with ``processor=``; a few attribute reads, nothing per
        training step."""
        check_processor_fits(self, model)
        embedding = getattr(model, "text_embedding", None)
        rows, padding = embedding() if callable(embedding) else (None, None)
        config = getattr(model, "config", None)
        tower = getattr(config, "text_model_name_or_path", None)
        if isinstance(rows, int):
            self._check_vocabulary(rows, padding, tower)
        if not saved:  # the adapter's own processor: what it was trained with, whatever its name and statistics
            self._warn_if_other_tokenizer(tower)
            self._warn_if_other_statistics(getattr(config, "vision_model_name_or_path", None),
                                           getattr(config, "vision_revision", None))

    def _check_vocabulary(self, rows: int, padding: int | None, tower: str | None) -> None:
        """Refuse a tokenizer whose tokens the text tower (``rows`` embeddings, ``padding`` its padding id) cannot
        embed or reads as other words (see :meth:`check_fits`). The special tokens checked are those that reach
        ``input_ids``: the pad token, ``[UNK]`` and the ones the tokenizer puts around every phrase (read off a
        probe phrase: ``[CLS]``/``[SEP]``, BOS/EOS, a template's own tokens); a role the tokenizer never inserts (a
        BOS token set on a BERT tokenizer) is never read, so never refused."""
        tokenizer = self.tokenizer
        own = (f"AutoTokenizer.from_pretrained({tower!r})" if tower else "AutoTokenizer.from_pretrained(<text tower>)")
        fix = f"use the text tower's own tokenizer ({own}) or the processor saved with the adapter"
        roles = {name: getattr(tokenizer, f"{name}_token_id", None) for name in _TOKEN_ROLES}
        pad = roles["pad"]
        if isinstance(pad, int) and pad >= rows:
            raise ValueError(pad_past_vocabulary(pad, rows, getattr(tokenizer, "pad_token", None)))
        base = tokenizer.vocab_size
        if base > rows:
            raise ValueError(f"The tokenizer's vocabulary has {base} tokens but the text tower embeds {rows} (ids "
                             f"0..{rows - 1}): it is the tokenizer of another text tower; {fix}.")
        unknown = roles["unk"]
        for index in sorted({*self._inserted_ids(), *([unknown] if isinstance(unknown, int) else [])}):
            if index >= rows:
                self._refuse_special(index, rows, roles, fix)
        added = sorted((index, str(token)) for index, token in tokenizer.added_tokens_decoder.items()
                       if index >= rows and not getattr(token, "special", False))  # a special one is never read
        if added:                                                                   # from text (split_special_tokens)
            raise ValueError(f"Tokens added to the tokenizer ({', '.join(repr(t) for _, t in added[:3])}, ids "
                             f"{added[0][0]}..{added[-1][0]}) lie past the text tower's vocabulary (ids 0..{rows - 1}): "
                             "a phrase holding one would fail. Resize the tower before building the model "
                             "(text_model.resize_token_embeddings(len(tokenizer))) or use the tokenizer without them.")
        others = {index for name, index in roles.items() if name != "pad"}
        if padding is not None and pad is not None and pad != padding and pad not in others:
            raise ValueError(
                f"The tokenizer pads with {tokenizer.pad_token!r} (id {pad}) but the text tower reserves id {padding} "
                "for padding (its embedding's padding_idx): the tokenizer has another vocabulary (a BERT tokenizer "
                f"on a RoBERTa tower, say), so every id would be read as another word; {fix}. If it is the tower's "
                f"own tokenizer, set tokenizer.pad_token to its token of id {padding}.")

    def _inserted_ids(self) -> list[int]:
        """The ids the tokenizer adds to every phrase (``[CLS]``/``[SEP]``, BOS/EOS, a template's tokens): those of a
        probe phrase tokenized as :meth:`__call__` does, less those of its words alone."""
        probe = [_PROBE_PHRASE.lower() if self.lowercase else _PROBE_PHRASE]
        whole = list(self._tokenize(probe, truncation=False)["input_ids"][0])
        words = list(self._tokenize(probe, truncation=False, add_special_tokens=False)["input_ids"][0])
        for index in words:
            if index in whole:
                whole.remove(index)
        return [int(index) for index in whole]

    def _refuse_special(self, index: int, rows: int, roles: dict[str, Any], fix: str) -> None:
        """Refuse the special token ``index`` that reaches ``input_ids`` but lies past the tower's ``rows``
        embeddings, naming its role and how it got there."""
        tokenizer = self.tokenizer
        token = tokenizer.convert_ids_to_tokens(index)
        named = [name.upper() for name, value in roles.items() if value == index]
        what = f"{'/'.join(named)} token" if named else "special token"
        where = "adds to every phrase" if roles["unk"] != index else "puts for every unknown word"
        if index >= tokenizer.vocab_size:  # added to the tokenizer after its vocabulary
            how = ("it was added to the tokenizer (tokenizer.add_special_tokens, or a post-processor template naming "
                   "a new token) and the tower has no embedding for it. Use the tokenizer without it: "
                   f"{fix.removeprefix('use ')}")
        else:
            how = f"the tokenizer belongs to another text tower; {fix}"
        raise ValueError(f"The tokenizer's {what} {token!r} (id {index}), which it {where}, lies past the text "
                         f"tower's vocabulary (ids 0..{rows - 1}): {how}.")

    def _warn_if_other_tokenizer(self, tower: str | None) -> None:
        """Warn when the tokenizer was loaded from a Hub repo of another name than the text tower's recorded one
        (``bert-base-uncased`` and ``google-bert/bert-base-uncased`` are one). Local paths, and a tokenizer restored
        with a saved processor (named after the adapter), are not compared."""
        name = str(getattr(self.tokenizer, "name_or_path", "") or "")
        if self.tokenizer in _RESTORED_TOKENIZERS or not _hub_like(name) or not _hub_like(tower):
            return
        if name.rsplit("/", 1)[-1].lower() != str(tower).rsplit("/", 1)[-1].lower():
            warnings.warn(f"The processor's tokenizer was loaded from {name!r} but the text tower is {tower!r}: if "
                          "they have other vocabularies, the tower reads every phrase as other words. Use the tower's "
                          f"own tokenizer (AutoTokenizer.from_pretrained({tower!r})).", UserWarning, stacklevel=3)

    def _warn_if_other_statistics(self, vision: str | None, revision: str | None) -> None:
        """Warn when ``image_mean``/``image_std`` are not those of the vision tower's own ``preprocessor_config.json``
        (read only from a local folder or the Hub cache: never downloaded here)."""
        stats = _cached_tower_stats(vision, revision)
        if stats is None:
            return
        mean, std = stats
        if all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip((*self.image_mean, *self.image_std), (*mean, *std))):
            return
        warnings.warn(f"The processor normalises images with mean {self.image_mean} and std {self.image_std}, but the "
                      f"vision tower {vision!r} was trained on images normalised with mean {mean} and std {std} (its "
                      "preprocessor_config.json): it sees other colours than it learnt. Build the processor with "
                      f"RECProcessor.from_pretrained(<text tower>, {vision!r}) or image_mean={list(mean)}, "
                      f"image_std={list(std)} (an adapter trained with these statistics keeps them).",
                      UserWarning, stacklevel=3)

    def phrase_lengths(self, phrases: Sequence[str]) -> list[int]:
        """How many tokens each phrase has as the processor reads it (Unicode NFC, lower-cased when ``lowercase``,
        the tokenizer's special tokens included, text spelling a special token read as words), before it is cut at
        ``max_query_len``: a phrase longer than that loses its last words."""
        texts = [unicodedata.normalize("NFC", phrase) for phrase in phrases]
        return self._token_counts([text.lower() for text in texts] if self.lowercase else texts)

    def _token_counts(self, texts: list[str]) -> list[int]:
        """Token counts of phrases already prepared as ``__call__`` prepares them (NFC, lower-cased)."""
        return [len(ids) for ids in self._tokenize(texts, truncation=False)["input_ids"]]

    def differences(self, other: Any) -> list[tuple[str, Any, Any]]:
        """``(setting, this processor's, other's)`` for each way ``other`` prepares inputs otherwise: canvas,
        normalisation, ``max_query_len``, ``lowercase``, the tokenizer's size, and, at equal size, its vocabulary
        (a sample of ids: every 1/256th and the last 32) and how it splits :data:`_PROBE_PHRASE` (casing, accents).
        Cheap enough to run for every ``predict`` call: no file is read and nothing is cached."""
        found = processor_setting_differences(processor_settings(self), processor_settings(other))
        mine, theirs = self.tokenizer, getattr(other, "tokenizer", None)
        if found or theirs is None or mine is theirs:
            return found
        size = len(mine)
        sample = sorted({*range(0, size, max(1, size // 256)), *range(max(0, size - 32), size)})
        for index, a, b in zip(sample, mine.convert_ids_to_tokens(sample), theirs.convert_ids_to_tokens(sample)):
            if a != b:
                return [("tokenizer vocabulary", f"id {index} is {a!r}", f"id {index} is {b!r}")]
        phrase = unicodedata.normalize("NFC", _PROBE_PHRASE)
        split = [processor.tokenizer.tokenize(phrase.lower() if processor.lowercase else phrase)
                 for processor in (self, other)]
        if split[0] != split[1]:
            return [("tokenizer", f"{phrase!r} -> {split[0]}", f"{phrase!r} -> {split[1]}")]
        return []

    # ------------------------------------------------------------------ boxes
    def boxes_to_labels(self, boxes_xyxy: torch.Tensor, image_geometry: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``xyxy`` pixel boxes of the original images -> normalised ``(cx, cy, w, h)`` labels on the canvas."""
        return boxes_to_labels(boxes_xyxy, image_geometry, self.canvas_size)

    def post_process_boxes(
        self, pred_boxes: torch.Tensor, image_geometry: torch.Tensor | np.ndarray, clamp: bool = True
    ) -> torch.Tensor:
        """The model's ``pred_boxes`` (B, 4) -> ``xyxy`` pixels of the original images, clipped to each image.

        Values far outside [0, 1] are refused: the head's boxes are sigmoids, and canvas-pixel boxes passed instead
        would be clipped to one corner of the image (:func:`post_process_boxes` itself inverts any labels)."""
        _check_normalised(pred_boxes)
        return post_process_boxes(pred_boxes, image_geometry, self.canvas_size, clamp=clamp)

    def denormalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation of ``pixel_values`` (B, 3, S, S): RGB in [0, 1] (padding shows the mean colour)."""
        mean = torch.tensor(self.image_mean, dtype=pixel_values.dtype, device=pixel_values.device)
        std = torch.tensor(self.image_std, dtype=pixel_values.dtype, device=pixel_values.device)
        return pixel_values * std[:, None, None] + mean[:, None, None]

    # ------------------------------------------------------------------ save / load
    def to_dict(self) -> dict[str, Any]:
        """The processor's settings (without the tokenizer) as transformers writes them to ``processor_config.json``:
        ``image_processor`` (canvas and normalisation), ``max_query_len``, ``lowercase``, ``augment``."""
        output = super().to_dict()
        output["augment"] = None if self.augment is None else self.augment.to_dict()
        return output

    def flat_settings(self) -> dict[str, Any]:
        """The processor's settings as one flat dict (canvas, normalisation, tokens, augmentation): what
        ``m2ist_processor.json`` holds (the format of m2ist before ``processor_config.json``) and what evaluation
        results record."""
        return {
            "processor_class": type(self).__name__,
            "library": "m2ist",
            "canvas_size": self.canvas_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "max_query_len": self.max_query_len,
            "lowercase": self.lowercase,
            "augment": None if self.augment is None else self.augment.to_dict(),
        }

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """Write the tokenizer files, ``processor_config.json`` and ``m2ist_processor.json`` (which also records
        the tokenizer's size, checked by :meth:`from_pretrained`); returns the paths of the two processor files."""
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"save_pretrained needs a directory, but {directory} is a file.")
        directory.mkdir(parents=True, exist_ok=True)
        written = [str(p) for p in super().save_pretrained(str(directory), **kwargs)]
        config_path = directory / PROCESSOR_CONFIG_NAME
        settings = {**self.flat_settings(), _VOCAB_SIZE_KEY: len(self.tokenizer)}  # checked by from_pretrained
        config_path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        return [*written, str(config_path)]

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        vision_model_name_or_path: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> RECProcessor:
        """Reload a saved processor, or build one from a text tower's tokenizer (and a vision tower's normalisation).

        ``pretrained_model_name_or_path`` is a Hub repo id or a local folder. A folder written by
        :meth:`save_pretrained` (``processor_config.json``, or ``m2ist_processor.json`` of older versions) is
        restored with its settings. Otherwise it names the text tower: the tokenizer is loaded with
        ``AutoTokenizer`` and ``image_mean``/``image_std`` are read from the ``preprocessor_config.json`` of
        ``vision_model_name_or_path`` (ImageNet statistics when there is none).

        Keyword arguments ``revision``, ``token``, ``cache_dir``, ``local_files_only``, ``subfolder`` and
        ``trust_remote_code`` are passed to the Hub (``vision_revision`` sets the vision repo's revision); the
        other keyword arguments (``canvas_size``, ``max_query_len``, ``lowercase``, ``augment``, ``image_mean``,
        ``image_std``) override the processor settings. ``pad_token`` (``"eos"``, or a token as written) makes one of
        the tokenizer's own tokens its pad token, for text towers without one (GPT-2, LLaMA; see
        :func:`set_pad_token`); it is saved with the tokenizer.
        """
        for key in _AUTO_KWARGS:  # what AutoProcessor passes along; m2ist resolves files itself
            kwargs.pop(key, None)
        hub_kwargs = {key: kwargs.pop(key) for key in _HUB_KWARGS if kwargs.get(key) is not None}
        for key in _HUB_KWARGS:
            kwargs.pop(key, None)
        trust_remote_code = kwargs.pop("trust_remote_code", None)
        vision_revision = kwargs.pop("vision_revision", None)
        pad_token = kwargs.pop("pad_token", None)
        unknown = set(kwargs) - set(_SETTINGS)
        if unknown:
            raise TypeError(f"RECProcessor.from_pretrained got unexpected keyword arguments {sorted(unknown)}; it "
                            f"accepts {sorted(_SETTINGS)} and the Hub options {sorted(_HUB_KWARGS)}, "
                            "trust_remote_code, vision_revision, pad_token.")
        tokenizer_kwargs = dict(hub_kwargs)
        if trust_remote_code is not None:
            tokenizer_kwargs["trust_remote_code"] = trust_remote_code
        source = str(pretrained_model_name_or_path)

        processor: RECProcessor | None = None
        saved = _find_file(source, "processor_config.json", hub_kwargs)
        if saved is not None and json.loads(Path(saved).read_text(encoding="utf-8")).get("processor_class") == cls.__name__:
            try:
                processor = super().from_pretrained(source, **tokenizer_kwargs)
            except ValueError as err:  # a setting refused by the constructor: name the file that holds it
                raise ValueError(f"{saved}: {err}") from err
        restored = processor is not None
        legacy = _find_file(source, PROCESSOR_CONFIG_NAME, hub_kwargs)
        recorded = json.loads(Path(legacy).read_text(encoding="utf-8")) if legacy is not None else {}
        if processor is None:
            tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
            if pad_token is not None:
                set_pad_token(tokenizer, pad_token)
            settings: dict[str, Any] = {}
            if legacy is not None:
                settings = {key: recorded[key] for key in _SETTINGS if recorded.get(key) is not None}
            elif vision_model_name_or_path is None:
                logger.info("No vision model given: normalising images with ImageNet statistics.")
            try:
                processor = cls(tokenizer, **settings)
            except ValueError as err:  # a recorded setting refused: name the file that holds it
                if legacy is None:
                    raise
                raise ValueError(f"{legacy}: {err}") from err
        elif pad_token is not None:  # a saved processor pads already: the same token is accepted, another refused
            set_pad_token(processor.tokenizer, pad_token)
        if restored or legacy is not None:  # a saved processor: its tokenizer is named after the folder, not the tower
            _RESTORED_TOKENIZERS.add(processor.tokenizer)
        expected_vocab = recorded.get(_VOCAB_SIZE_KEY) if isinstance(recorded, dict) else None
        if isinstance(expected_vocab, int) and len(processor.tokenizer) != expected_vocab:
            raise ValueError(
                f"The tokenizer restored from {source} has {len(processor.tokenizer)} tokens, but the processor was "
                f"saved with {expected_vocab} ({PROCESSOR_CONFIG_NAME}): its tokenizer files (tokenizer.json, "
                "vocab.txt / vocab.json, tokenizer_config.json) are missing or damaged, and every word would become "
                "[UNK]. Copy them again from where the processor was saved."
            )
        overrides = dict(kwargs)
        if vision_model_name_or_path is not None:
            vision_kwargs = {k: v for k, v in hub_kwargs.items() if k not in ("revision", "subfolder")}
            if vision_revision is not None:
                vision_kwargs["revision"] = vision_revision
            overrides = {**_read_image_stats(str(vision_model_name_or_path), vision_kwargs), **overrides}
        return processor._with(**overrides)

    def _with(self, **overrides: Any) -> RECProcessor:
        """This processor with some settings changed (a new image processor when an image setting changes)."""
        if not overrides:
            return self
        image_keys = ("canvas_size", "image_mean", "image_std")
        image_settings = {key: overrides.pop(key, getattr(self, key)) for key in image_keys}
        settings = {"max_query_len": self.max_query_len, "lowercase": self.lowercase, "augment": self.augment,
                    **overrides}
        return type(self)(self.tokenizer, RECImageProcessor(**image_settings), **settings)


def check_processor_fits(processor: Any, model: Any) -> None:
    """Refuse a processor (any, duck-typed) whose canvas is not the model's ``image_size`` or whose
    ``max_query_len`` exceeds the head's; :meth:`RECProcessor.check_fits` adds the tokenizer's checks."""
    config = getattr(model, "config", None)
    image_size = getattr(config, "image_size", None)
    if image_size is not None and getattr(processor, "canvas_size", image_size) != image_size:
        raise ValueError(
            f"The processor pads images to a {processor.canvas_size}x{processor.canvas_size} canvas but the model was "
            f"built for image_size={image_size}: use the processor saved with the adapter, or build one with "
            f"canvas_size={image_size}."
        )
    max_query_len = getattr(config, "max_query_len", None)
    if max_query_len is not None and getattr(processor, "max_query_len", max_query_len) > max_query_len:
        raise ValueError(
            f"The processor makes {processor.max_query_len} text tokens but the model's head takes at most "
            f"max_query_len={max_query_len}: use the processor saved with the adapter, or build one with "
            f"max_query_len={max_query_len}."
        )


#: The tokenizer's special tokens the processor puts in ``input_ids`` (and ``[UNK]``), checked against the tower.
_TOKEN_ROLES = ("pad", "cls", "sep", "bos", "eos", "unk")
#: Tokenizers restored with a saved processor: named after the adapter's folder or repo, not after the text tower.
_RESTORED_TOKENIZERS: weakref.WeakSet[Any] = weakref.WeakSet()


def _hub_like(name: Any) -> bool:
    """Whether ``name`` reads as a Hub repo id (``owner/name`` or a legacy ``name``) and is no local path."""
    return (isinstance(name, str) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None
            and not os.path.exists(name))


def _cached_tower_stats(vision: Any, revision: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(image_mean, image_std)`` from the ``preprocessor_config.json`` of the vision tower ``vision`` when it is
    on this machine (a local folder, or the Hub cache at ``revision``); ``None`` when it is not, or holds none."""
    if not isinstance(vision, str) or not vision:
        return None
    if os.path.isdir(vision):
        path: Any = os.path.join(vision, "preprocessor_config.json")
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            path = try_to_load_from_cache(vision, "preprocessor_config.json", revision=revision)
        except ValueError:  # not a repo id
            return None
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    return _stats_of_file(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _stats_of_file(path: str, mtime: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The normalisation a ``preprocessor_config.json`` sets (see :func:`_image_stats`); read once per version."""
    try:
        stats = _image_stats(json.loads(Path(path).read_text(encoding="utf-8")), path)
        return (tuple(stats["image_mean"]), tuple(stats["image_std"])) if stats is not None else None
    except (OSError, ValueError, TypeError):  # a file that is no image processor's: nothing to compare
        return None


def describe_differences(found: list[tuple[str, Any, Any]], mine: str, theirs: str) -> str:
    """:meth:`RECProcessor.differences` as text, ``"key: <mine> value, <theirs> value; ..."``."""
    return "; ".join(f"{key}: {mine} {a}, {theirs} {b}" if key.startswith("tokenizer") and isinstance(a, str)
                     else f"{key}: {mine} {a!r}, {theirs} {b!r}" for key, a, b in found)


#: A phrase that tells tokenizers apart by casing, accents and word pieces (:meth:`RECProcessor.differences`).
_PROBE_PHRASE = "The LEFT Café's Zebra, über 2 dogs"
#: Key of ``m2ist_processor.json`` recording ``len(tokenizer)`` at save time (older folders lack it: not checked).
_VOCAB_SIZE_KEY = "tokenizer_vocab_size"
#: The settings ``RECProcessor.from_pretrained`` reads from a saved processor and takes as overrides.
_SETTINGS = ("canvas_size", "image_mean", "image_std", "max_query_len", "lowercase", "augment")
#: Loader options ``AutoProcessor`` / ``ProcessorMixin`` pass to ``from_pretrained`` that m2ist does not need.
_AUTO_KWARGS = ("_from_auto", "force_download", "proxies", "user_agent", "_commit_hash", "code_revision")


def _find_file(source: str, filename: str, hub_kwargs: dict[str, Any]) -> str | None:
    """Path of ``filename`` in a local folder or Hub repo, or ``None`` when it is not there."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    if os.path.isdir(source):
        path = os.path.join(source, filename)
        return path if os.path.isfile(path) else None
    try:
        return hf_hub_download(source, filename, **hub_kwargs)
    except (EntryNotFoundError, HFValidationError, OSError):
        # missing file, not a repo id, offline without a cached copy or a network error: the file is not usable
        return None


def _read_image_stats(source: str, hub_kwargs: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    """``image_mean``/``image_std`` from a vision model's ``preprocessor_config.json`` (ImageNet if absent)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    fallback = {"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}
    if os.path.isdir(source):
        path: str | None = os.path.join(source, "preprocessor_config.json")
        if not os.path.isfile(path):
            path = None
    else:
        try:
            path = hf_hub_download(source, "preprocessor_config.json", **hub_kwargs)
        except LocalEntryNotFoundError:
            logger.warning(
                "Could not read preprocessor_config.json of %s (offline and not cached); using ImageNet statistics.",
                source,
            )
            return fallback
        except EntryNotFoundError:
            path = None
    if path is None:
        logger.info("%s has no preprocessor_config.json; normalising images with ImageNet statistics.", source)
        return fallback
    stats = _image_stats(json.loads(Path(path).read_text(encoding="utf-8")), source)
    if stats is None:
        logger.info("%s's preprocessor_config.json has no image_mean/image_std; using ImageNet statistics.", source)
        return fallback
    return stats


def _image_stats(config: dict[str, Any], source: str) -> dict[str, tuple[float, float, float]] | None:
    """``image_mean``/``image_std`` a ``preprocessor_config.json`` sets (mean 0, std 1 with ``do_normalize=false``);
    ``None`` when it sets none."""
    if config.get("do_normalize") is False:
        logger.info("%s does not normalise its images (do_normalize=false); using mean 0 and std 1.", source)
        return {"image_mean": (0.0, 0.0, 0.0), "image_std": (1.0, 1.0, 1.0)}
    if "image_mean" not in config or "image_std" not in config:
        return None
    return {
        "image_mean": _three_floats("image_mean", config["image_mean"]),
        "image_std": _three_floats("image_std", config["image_std"]),
    }


class RECProcessorConfig(PretrainedConfig):
    """The key under which :class:`RECProcessor` and :class:`RECImageProcessor` are registered with transformers'
    ``AutoProcessor`` / ``AutoImageProcessor`` (an M²IST adapter has no ``config.json`` of its own)."""

    model_type = "m2ist_rec"


# Found by AutoProcessor / AutoImageProcessor once m2ist is imported: no remote code, no auto_map.
AutoImageProcessor.register(RECProcessorConfig, image_processor_classes={"pil": RECImageProcessor}, exist_ok=True)
AutoProcessor.register(RECProcessorConfig, RECProcessor, exist_ok=True)
PIPELINE.load_processor = RECProcessor.from_pretrained
