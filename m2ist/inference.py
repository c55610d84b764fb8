"""One-call inference: image(s) + phrase(s) -> one box per phrase, and a helper that draws the boxes.

```python
from m2ist import SideTunedModel
from m2ist.processing import RECProcessor
from m2ist.inference import predict_boxes, draw_boxes

model = SideTunedModel.from_pretrained("out/refcoco")
processor = RECProcessor.from_pretrained("out/refcoco")
boxes = predict_boxes(model, ["dog.jpg"], ["the dog on the left"], processor=processor)  # (1, 4) xyxy pixels
draw_boxes("dog.jpg", boxes, texts=["the dog on the left"]).save("dog_boxes.png")
```
"""

from __future__ import annotations

import operator
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from m2ist import processing as _processing
from m2ist.config import check_flags
from m2ist.data.images import ORIENTATION_NAMES, DeferredImage, exif_orientation, image_name, load_image
from m2ist.model import non_finite_cause
from m2ist.processing import check_processor_fits, describe_differences, load_rec_image
from m2ist.save_and_load import ALL_ADAPTERS, PIPELINE

if TYPE_CHECKING:
    from m2ist.processing import RECProcessor

__all__ = ["GT_COLOR", "PALETTE", "check_finite_boxes", "draw_boxes", "predict_boxes", "resolve_processor"]

#: Colours of predicted boxes (cycled when there are several).
PALETTE: tuple[str, ...] = ("#e6194b", "#4363d8", "#f58231", "#911eb4", "#f032e6", "#9a6324", "#000075", "#808000")
#: Colour of ground-truth boxes.
GT_COLOR = "#3cb44b"
MODEL_INPUTS = ("pixel_values", "pixel_mask", "input_ids", "attention_mask")


# ---------------------------------------------------------------------------------------------- helpers
def resolve_processor(model: nn.Module, processor: RECProcessor | None) -> RECProcessor:
    """``processor`` if given, else ``model.processor``; check that it fits the model (canvas, query length, the
    tokenizer against the text tower: ``processor.check_fits``), and warn when a given one prepares inputs otherwise
    than ``model.processor`` (predict and evaluate pass here)."""
    given = processor is not None
    if processor is None:
        processor = getattr(model, "processor", None)
    if processor is None:
        raise ValueError(
            "No processor: pass processor=RECProcessor.from_pretrained(<adapter folder>) (the folder the adapter "
            "was saved to holds processor_config.json), or attach one once with `model.processor = processor`."
        )
    _check_processor_type(processor)
    check = getattr(processor, "check_fits", None)
    if callable(check):  # model.processor's normalisation is what the adapter was trained with: not warned again
        check(model, saved=processor is getattr(model, "processor", None))
    else:
        check_processor_fits(processor, model)
    if given:
        _warn_if_not_the_models_processor(model, processor)
    return processor


def _check_processor_type(processor: Any) -> None:
    """Refuse, naming the fix, a ``processor=`` that is not a processor: a folder's path (it was called:
    "'str' object is not callable") or a tokenizer (it was warned about as "another processor" and failed in
    transformers' text checks)."""
    if isinstance(processor, str | os.PathLike):
        raise TypeError(f"processor={os.fspath(processor)!r} is a path, not a processor: load it with "
                        "RECProcessor.from_pretrained(<adapter folder>) (from m2ist.processing) and pass that.")
    if not callable(processor) or not callable(getattr(processor, "post_process_boxes", None)):
        raise TypeError(f"processor must be a RECProcessor (m2ist.processing), got a {type(processor).__name__}: "
                        "build one around a tokenizer with RECProcessor(tokenizer, canvas_size=..., "
                        "max_query_len=...), or load the adapter's with RECProcessor.from_pretrained(<adapter folder>).")


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an ``int`` when it is a positive whole number of any integer type (``numpy.int64`` too: it was
    refused as "not a positive integer"); ``True``, floats and text are refused."""
    if not isinstance(value, bool | np.bool_):
        try:
            number = operator.index(value)
        except TypeError:
            number = None
        if number is not None and number >= 1:
            return number
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _warn_if_not_the_models_processor(model: nn.Module, processor: Any) -> None:
    """Warn, naming each setting, when ``processor`` prepares inputs otherwise than ``model.processor`` (the one
    saved with the adapter, restored by ``from_pretrained``): another tokenizer gives the text tower other words for
    the same ids, other statistics or a shorter ``max_query_len`` other images or phrases, and the boxes change
    silently. Skipped for a model of several adapters, where ``processor=`` is how an adapter loaded with a
    processor of its own is fed (``load_adapter`` warns of the difference). Without ``model.processor``, a
    ``max_query_len`` below the head's (``config.max_query_len``) is warned of."""
    own = getattr(model, "processor", None)
    if own is None:  # nothing saved to compare with: the head's query length is all the model records
        head_len, given_len = getattr(getattr(model, "config", None), "max_query_len", None), getattr(
            processor, "max_query_len", None)
        if isinstance(head_len, int) and isinstance(given_len, int) and given_len < head_len:
            warnings.warn(f"The processor cuts phrases to max_query_len={given_len} tokens but the model's head was "
                          f"built (and m2ist train trains it) for {head_len}: phrases longer than {given_len} tokens "
                          "lose their last words. Use the processor saved with the adapter "
                          f"(RECProcessor.from_pretrained(<adapter folder>)) or one built with max_query_len={head_len}.",
                          UserWarning, stacklevel=4)
        return
    if own is processor or not hasattr(own, "differences"):
        return
    adapters = model.list_adapters() if hasattr(model, "list_adapters") else []
    if len(adapters) > 1:
        return
    differ = describe_differences(own.differences(processor), "model.processor", "given")
    if differ:
        warnings.warn(f"The processor given prepares inputs otherwise than model.processor, the one the adapter was "
                      f"saved or attached with ({differ}), so the boxes will not be the adapter's: leave out "
                      "processor= to use model.processor, or set model.processor = processor if the adapter was "
                      "trained with this one.", UserWarning, stacklevel=4)


def model_device(model: nn.Module) -> torch.device:
    """The device the model's outputs are produced on (its ``device`` property, else its first parameter's)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in ``eval()`` and gradients off for the block; restore its train/eval mode afterwards.

    ``torch.no_grad`` rather than ``torch.inference_mode``: a module that caches a tensor during evaluation (a
    position table, say) would otherwise keep an inference tensor that breaks the next training step.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def check_finite_boxes(pred: torch.Tensor, adapter: str | None = None,
                       explain: Callable[[], str] | None = None) -> torch.Tensor:
    """``pred`` if every coordinate is finite; else a ``ValueError`` (clipping to the image would turn an inf into
    a plausible-looking edge box, and a NaN would pass through). ``explain`` (called only then) names a cause
    outside the adapter, such as frozen towers that overflow; without one the adapter's weights are blamed."""
    bad = ~torch.isfinite(pred).all(dim=-1)
    if bool(bad.any()):
        which = f"adapter {adapter!r}" if adapter is not None else "the model"
        cause = explain() if explain is not None else ""
        raise ValueError(f"{which} predicted non-finite boxes (NaN or inf) for {int(bad.sum())} of {bad.numel()} "
                         f"samples (batch positions {bad.nonzero().flatten().tolist()[:8]}): "
                         + (cause or "its weights are damaged or its training diverged. Retrain it or load an "
                            "earlier checkpoint."))
    return pred


def forward_boxes(model: nn.Module, encoded: Any, device: torch.device) -> torch.Tensor:
    """Run the model on a processed batch; return ``pred_boxes`` ``(B, 4)`` normalised ``cxcywh``, float32 on CPU."""
    inputs = {key: encoded[key].to(device) for key in MODEL_INPUTS if key in encoded}
    output = model(**inputs)
    pred = output.pred_boxes if hasattr(output, "pred_boxes") else output[0]
    return pred.detach().float().cpu()


def forward_boxes_per_adapter(model: nn.Module, encoded: Any, device: torch.device,
                              adapters: Sequence[str] | None) -> dict[str | None, torch.Tensor]:
    """:func:`forward_boxes` for every adapter in ``adapters`` on one pass of the towers
    (``model.forward_all_adapters``), ``{name: pred_boxes}``; ``None`` gives ``{None: the model's boxes}``.
    Non-finite predictions raise (:func:`check_finite_boxes`): prediction and evaluation share this check."""
    inputs = {key: encoded[key].to(device) for key in MODEL_INPUTS if key in encoded}

    def explain() -> str:
        return non_finite_cause(model, inputs)

    if adapters is None:
        return {None: check_finite_boxes(forward_boxes(model, encoded, device), explain=explain)}
    if not hasattr(model, "forward_all_adapters"):
        raise TypeError(f"adapters= needs a model with several adapters (a SideTunedModel), got {type(model).__name__}.")
    outputs = model.forward_all_adapters(**inputs, adapter_names=list(adapters))
    return {name: check_finite_boxes(output.pred_boxes.detach().float().cpu(), name, explain)
            for name, output in outputs.items()}


def resolve_adapters(model: nn.Module, adapters: str | Sequence[str] | None) -> list[str] | None:
    """``None`` (the active adapter only), ``"all"`` (every adapter of the model) or a list of adapter names."""
    if adapters is None:
        return None
    if adapters == ALL_ADAPTERS:
        if not hasattr(model, "list_adapters"):
            raise TypeError(f"adapters='all' needs a SideTunedModel, got {type(model).__name__}.")
        return model.list_adapters()
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    if not names:
        raise ValueError("adapters is empty: pass 'all' or at least one adapter name.")
    return names


class _ImageNotes:
    """What :func:`predict_boxes` read otherwise than a viewer shows it: images with an EXIF orientation (the stored
    pixels are read) and images of several frames (one is read), each named once; warned about at the end, as
    ``m2ist predict`` warns about its ``--image``."""

    def __init__(self) -> None:
        self.rotated: dict[str, int] = {}
        self.animated: dict[str, str] = {}
        self.seen: set[int] = set()

    def note(self, image: Image.Image, name: str) -> None:
        with suppress(Exception):  # an image that cannot be read: the processor's reading names the fault
            self._note(image, name)

    def _note(self, image: Image.Image, name: str) -> None:
        orientation = exif_orientation(image)
        if orientation != 1:
            self.rotated.setdefault(name, orientation)
        if getattr(image, "is_animated", False) and image.format != "MPO":  # MPO: a photo with a preview frame
            frame = image.tell()
            self.animated.setdefault(name, f"{getattr(image, 'n_frames', 2)} frames, frame {frame} read")

    def warn(self) -> None:
        def listed(found: dict[str, Any], describe: Callable[[Any], str]) -> str:
            shown = [f"{name} ({describe(value)})" for name, value in list(found.items())[:3]]
            more = f" and {len(found) - 3} more" if len(found) > 3 else ""
            return ", ".join(shown) + more

        if self.rotated:
            warnings.warn(
                f"{len(self.rotated)} image{'s carry' if len(self.rotated) > 1 else ' carries'} an EXIF orientation "
                f"tag: {listed(self.rotated, lambda tag: f'{tag}: shown {ORIENTATION_NAMES[tag]}')}. The model reads the "
                "pixels as stored, not as a photo viewer shows them, so the boxes (and a word such as 'left') are "
                "in the stored frame. To predict on the upright picture, pass "
                "m2ist.data.images.load_image(image, exif_transpose=True) and draw on that (m2ist predict: "
                "--exif-transpose).", UserWarning, stacklevel=4)
        if self.animated:
            warnings.warn(
                f"{len(self.animated)} image{'s hold' if len(self.animated) > 1 else ' holds'} several frames (an "
                f"animation, or pages): {listed(self.animated, str)}; only that frame is read. Pass the frame you "
                "mean as an image (image.seek(n), then image.convert('RGB')).", UserWarning, stacklevel=4)


def _read_noting(image: Any, notes: _ImageNotes) -> Any:
    """``image`` as the processor reads it, noting an EXIF orientation or frames (:class:`_ImageNotes`): a file
    is decoded here, once, into its stored pixel grid (what the processor would read); PIL images and encoded bytes
    are only looked at; a URL is downloaded and decoded here. Anything else (arrays, tensors, data URIs, deferred
    images, which warn themselves) is passed on;
    so is a path that cannot be opened, which the processor then names."""
    if id(image) in notes.seen:
        return image
    if isinstance(image, Image.Image):
        notes.seen.add(id(image))
        notes.note(image, image_name(image))
        return image
    if isinstance(image, bytes | bytearray | memoryview):
        notes.seen.add(id(image))
        with suppress(Exception), Image.open(BytesIO(bytes(image))) as opened:  # not an image: the processor says so
            notes.note(opened, f"<{len(image)} bytes>")
        return image
    if isinstance(image, str) and image.startswith(("http://", "https://")):  # downloaded once, here
        data = _processing.download_image(image)  # looked up now: tests (and users) may replace it
        with suppress(Exception), Image.open(BytesIO(data)) as opened:  # not an image: decoding says so
            notes.note(opened, image)
        return _processing._decode_bytes(data, f"The download of {image}")
    is_path = isinstance(image, os.PathLike) or (isinstance(image, str) and not image.startswith("data:"))
    if not is_path or isinstance(image, DeferredImage):
        return image
    try:
        opened = Image.open(image)
    except Exception:  # missing, a folder, not an image: the processor's reading names it
        return image
    with opened:
        notes.note(opened, str(image))
        return load_image(opened)


def _is_single_image(images: Any) -> bool:
    """One image (a path, URL, PIL image, encoded bytes, array, or an ``(H, W)`` / ``(H, W, C)`` / ``(C, H, W)``
    tensor as for arrays), not a list of them (``bytes`` are a sequence of ints, never a list of images)."""
    return isinstance(images, str | Path | Image.Image | np.ndarray | bytes | bytearray | memoryview) or (
        isinstance(images, torch.Tensor) and images.ndim in (2, 3))


def _pair_up(images: Any, texts: str | Sequence[str],
             notes: _ImageNotes | None = None) -> tuple[list[Any], list[str]]:
    """Broadcast one image over several phrases (or one phrase over several images); check lengths."""
    single_image = _is_single_image(images)
    if hasattr(texts, "tolist") and not isinstance(texts, str):  # a numpy array or pandas Series of phrases, as the
        texts = texts.tolist()                                   # processor takes them
    if isinstance(texts, str):
        texts = [texts]
    elif not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a phrase string or a list of phrase strings.")
    texts = list(texts)
    if single_image:
        images = [images]
    elif not isinstance(images, Sequence):
        shape = f" of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else ""
        batch = (f" A batch of {images.shape[0]} images: pass list(images), one (C, H, W) tensor each (not a "
                 "processor's normalised pixel_values: the images themselves)."
                 if isinstance(images, torch.Tensor) and images.ndim == 4 else "")
        raise TypeError(f"images must be an image (path, PIL image, or an (H, W), (H, W, C) or (C, H, W) array or "
                        f"tensor) or a list of them; got a {type(images).__name__}{shape}.{batch}")
    images = list(images)
    if not texts or not images:
        raise ValueError("Nothing to predict: pass at least one image and one phrase.")
    if len(images) == 1 and len(texts) > 1:
        first = images[0] if notes is None else _read_noting(images[0], notes)
        image = load_rec_image(first)  # decode (or download) once, reuse for every phrase
        images = [image] * len(texts)
    elif len(texts) == 1 and len(images) > 1:
        texts = texts * len(images)
    if len(images) != len(texts):
        raise ValueError(
            f"Got {len(images)} images and {len(texts)} phrases: pass one phrase per image, one image with several "
            "phrases, or several images with one phrase."
        )
    return images, texts


# ---------------------------------------------------------------------------------------------- prediction
def predict_boxes(
    model: nn.Module,
    images: Any,
    texts: str | Sequence[str],
    processor: RECProcessor | None = None,
    batch_size: int = 16,
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
    adapters: str | Sequence[str] | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Predict one box per phrase, in ``xyxy`` pixels of its original image, clipped to the image.

    Args:
        model: a REC model (:class:`~m2ist.model.SideTunedModel` or a baseline) whose ``forward`` returns
            ``pred_boxes``.
        images: a path, ``http(s)`` URL, base64 data URI, PIL image, ``(H, W[, C])`` array or tensor, or a list of
            them (a 4-D batch tensor is refused: pass ``list(batch)``). One image with several phrases is
            used for each phrase; several images with one phrase use that phrase for each. The stored pixels are
            read: a file, PIL image or encoded bytes with an EXIF orientation tag is warned about (pass
            ``m2ist.data.images.load_image(path, exif_transpose=True)`` for the upright picture, as
            ``m2ist predict --exif-transpose`` does), and so is an animated one (its first, or current, frame is
            read).
        texts: a phrase or a list of phrases.
        processor: the :class:`~m2ist.processing.RECProcessor` the model was trained with; defaults to
            ``model.processor`` when one is attached. A path or a tokenizer is refused, naming
            ``RECProcessor.from_pretrained``.
        batch_size: samples per forward pass, a positive whole number (numpy integers too).
        device: run on this device (the model is moved there); default: where the model is.
        progress: show a progress bar.
        adapters: ``None`` (the model's active adapter), ``"all"`` or a list of adapter names: every named
            adapter answers, on one pass of the frozen towers per batch.

    Returns:
        A float32 CPU tensor ``(N, 4)`` (``N = 1`` for one image and one phrase); with ``adapters``,
        ``{adapter name: (N, 4) tensor}``.

    The model runs in ``eval()`` mode without gradients; its train/eval mode is restored afterwards.
    """
    from tqdm.auto import tqdm

    batch_size = check_positive_int("batch_size", batch_size)
    check_flags("predict_boxes", progress=progress)
    processor = resolve_processor(model, processor)
    notes = _ImageNotes()
    images, texts = _pair_up(images, texts, notes)
    if device is not None:
        model.to(device)
    target = model_device(model)
    names = resolve_adapters(model, adapters)
    results: dict[str | None, list[torch.Tensor]] = {}
    starts = range(0, len(texts), batch_size)
    with eval_mode(model):
        for start in tqdm(starts, desc="predict", unit="batch", disable=not progress or len(starts) < 2):
            batch = [_read_noting(image, notes) for image in images[start : start + batch_size]]
            encoded = processor(batch, texts[start : start + batch_size], return_tensors="pt")
            for name, pred in forward_boxes_per_adapter(model, encoded, target, names).items():
                results.setdefault(name, []).append(processor.post_process_boxes(pred, encoded["image_geometry"]).float())
    notes.warn()
    if names is None:
        return torch.cat(results[None])
    return {name: torch.cat(boxes) for name, boxes in results.items()}


# ---------------------------------------------------------------------------------------------- drawing
def _as_box_list(boxes: Any, name: str, size: tuple[int, int] | None = None) -> list[list[float]]:
    """``boxes`` as a list of ``[x0, y0, x1, y1]``; with the image's ``size``, boxes that cannot be its pixels are
    refused (:func:`_frame_problem`)."""
    if boxes is None:
        return []
    if isinstance(boxes, Mapping):  # predict_boxes(..., adapters=...) gives {adapter: boxes}
        raise TypeError(f"{name} is a mapping ({', '.join(map(repr, list(boxes)[:4]))}), as predict_boxes gives with "
                        f"adapters=: draw one adapter's boxes, {name}[<adapter name>].")
    if isinstance(boxes, str | bytes):
        raise TypeError(f"{name} is text ({boxes!r}); give numbers: one (x0, y0, x1, y1) box or a list of them.")
    if isinstance(boxes, list | tuple) and len(boxes) == 0:
        return []  # no boxes, as a (0, 4) tensor
    array = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[-1] != 4:
        raise ValueError(f"{name} must be one (x0, y0, x1, y1) box or a list of them, got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite numbers.")
    inverted = np.flatnonzero((array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1]))
    if inverted.size:  # swapping its corners would draw another box (an x, y, w, h box read as corners)
        row = int(inverted[0])
        raise ValueError(f"{name}[{row}] {[round(v, 4) for v in array[row].tolist()]} has x1 < x0 or y1 < y0: boxes "
                         "are xyxy corners (as predict_boxes gives them); convert x, y, w, h boxes with "
                         "m2ist.ops.boxes.box_convert(boxes, 'xywh', 'xyxy').")
    corners = array
    if size is not None:
        width, height = size
        for row, box in enumerate(corners.tolist()):
            where = f"{name}[{row}] {[round(v, 4) for v in box]}"
            x0, y0, x1, y1 = box
            if x0 > width or y0 > height or x1 < 0 or y1 < 0:  # predict_boxes clips to the image: never this
                raise ValueError(f"{where} lies wholly outside the {width}x{height} image (is it in another frame, e.g. "
                                 "the model's canvas?): boxes are xyxy pixels of the image drawn on, as predict_boxes "
                                 "gives them; drawn, it would show no box and its label at the edge.")
            if x1 > x0 and y1 > y0 and max(box) <= 1.0 and min(x0, y0) >= 0.0 and min(width, height) > 4:
                # a warning: a poor prediction can be a box this small in a corner too
                warnings.warn(f"{where} lies within [0, 1] in a {width}x{height} image: it looks normalised, not "
                              "pixels (predict_boxes gives pixels), and is drawn as a speck in the corner.",
                              UserWarning, stacklevel=3)
    return corners.tolist()


def _is_rgb_tuple(value: Any) -> bool:
    """Whether ``value`` is one colour as numbers, ``(r, g, b)`` or ``(r, g, b, a)`` in 0..255."""
    return (isinstance(value, tuple | list) and len(value) in (3, 4)
            and all(isinstance(v, int | np.integer) and not isinstance(v, bool) and 0 <= v <= 255 for v in value))


def _colour_list(colors: Any, name: str = "colors") -> list[Any]:
    """``colors`` as a list of colours, each checked: one name, ``"#rrggbb"`` or ``(r, g, b)`` is one colour (an
    ``(r, g, b)`` tuple was read as three colours, the numbers 255, 0 and 0, and drew the second box black)."""
    from PIL import ImageColor

    listed = [colors] if isinstance(colors, str) or _is_rgb_tuple(colors) else list(colors)  # "red": not "r", "e"
    if not listed:
        raise ValueError(f"{name} must name at least one colour.")
    for colour in listed:
        if _is_rgb_tuple(colour):
            continue
        if not isinstance(colour, str):
            raise ValueError(f"{name}: {colour!r} is not a colour; give names ('red'), '#rrggbb' or (r, g, b) tuples.")
        try:
            ImageColor.getrgb(colour)
        except ValueError:
            raise ValueError(f"{name}: {colour!r} is not a colour PIL knows; give names ('red'), '#rrggbb' or "
                             "(r, g, b) tuples.") from None
    return [tuple(int(v) for v in c) if _is_rgb_tuple(c) else c for c in listed]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _resolve_font(font: Any, size: int) -> Any:
    """``font`` as a PIL font: ``None`` the default (PIL's own, of ``size``), a path a TrueType/OpenType file of
    ``size``, a PIL font as it is."""
    if font is None:
        return _font(size)
    if isinstance(font, str | os.PathLike):
        try:
            return ImageFont.truetype(os.fspath(font), size)
        except OSError as err:
            raise ValueError(f"font={os.fspath(font)!r} is not a TrueType/OpenType font file PIL can read ({err}).") from None
    if isinstance(font, ImageFont.ImageFont | ImageFont.FreeTypeFont | ImageFont.TransposedFont):
        return font
    raise TypeError(f"font must be a path to a .ttf/.otf file or a PIL font, got {type(font).__name__}.")


def _missing_glyphs(font: Any, labels: Sequence[str | None]) -> list[str]:
    """The characters of ``labels`` that ``font`` has no glyph for (drawn as its empty box, "tofu"): PIL's default
    font lacks even é, ü, ñ and €. Only a FreeType font is checked, each non-ASCII character once."""
    if not isinstance(font, ImageFont.FreeTypeFont):
        return []
    wanted = sorted({ch for label in labels if label for ch in label if ord(ch) > 126 and not ch.isspace()})

    def rendered(text: str) -> bytes:
        left, top, right, bottom = font.getbbox(text)
        canvas = Image.new("L", (max(right - left, 1) + 4, max(bottom - top, 1) + 4))
        ImageDraw.Draw(canvas).text((2 - left, 2 - top), text, fill=255, font=font)
        return canvas.tobytes()

    if not wanted:
        return []
    notdef = rendered("\U0010ffff")  # a private-use code point: no font draws it but as its empty box
    return [ch for ch in wanted if rendered(ch) == notdef]


def _label(draw: ImageDraw.ImageDraw, box: list[float], text: str, color: str, font: Any, image_size: tuple[int, int]):
    """Write ``text`` on a filled band just above the box (inside it when there is no room above)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left + 4, bottom - top + 4
    x = min(max(box[0], 0), max(image_size[0] - width, 0))
    y = box[1] - height if box[1] - height >= 0 else box[1]
    y = min(max(y, 0), max(image_size[1] - height, 0))
    draw.rectangle((x, y, x + width, y + height), fill=color)
    draw.text((x + 2 - left, y + 2 - top), text, fill="white", font=font)


def draw_boxes(
    image: Any,
    boxes: Any,
    texts: str | Sequence[str] | None = None,
    gt_boxes: Any = None,
    *,
    colors: str | Sequence[str] = PALETTE,
    gt_color: str = GT_COLOR,
    line_width: int | None = None,
    font_size: int | None = None,
    font: Any = None,
) -> Image.Image:
    """Draw predicted boxes (and, optionally, ground-truth boxes in ``gt_color``) on a copy of ``image``.

    Args:
        image: a path, URL, base64 data URI, PIL image, array or tensor (see :func:`m2ist.processing.fetch_image`).
        boxes: one ``(x0, y0, x1, y1)`` pixel box or ``(N, 4)`` boxes (e.g. from :func:`predict_boxes`), in
            pixels of ``image`` as stored: a box wholly outside the image or with ``x1 < x0`` / ``y1 < y0`` (an
            ``x, y, w, h`` box) is refused, a normalised-looking one (an area, every number in [0, 1]) warned about.
            ``[]`` or a ``(0, 4)`` tensor draws no box; a ``{adapter: boxes}`` mapping (``predict_boxes`` with
            ``adapters=``) is refused: draw one adapter's.
        texts: the phrase of each predicted box, written above it.
        gt_boxes: ground-truth ``xyxy`` pixel boxes, drawn in ``gt_color`` and labelled ``GT``.
        colors: colours of the predicted boxes, cycled (one colour name, ``"#rrggbb"`` or ``(r, g, b)`` tuple for
            all of them); a colour PIL does not know is refused, naming it.
        gt_color: colour of the ground-truth boxes.
        line_width: outline width in pixels, a positive whole number; default grows with the image (at least 2).
        font_size: label size in pixels, a positive whole number; default grows with the image.
        font: the labels' font: a path to a ``.ttf``/``.otf`` file (of ``font_size``) or a PIL font; default PIL's
            own, which lacks most letters beyond ASCII (é, ü, ñ, CJK...): labels holding such letters are drawn
            with empty boxes in their place, with a warning naming them (pass a font that has them).

    Returns:
        A new RGB :class:`PIL.Image.Image`; the input is not modified.
    """
    canvas = load_rec_image(image).copy()
    predicted = _as_box_list(boxes, "boxes", canvas.size)
    truths = _as_box_list(gt_boxes, "gt_boxes", canvas.size)
    if texts is None:
        labels: list[str | None] = [None] * len(predicted)
    else:
        labels = [texts] if isinstance(texts, str) else list(texts)
        wrong = [label for label in labels if label is not None and not isinstance(label, str)]
        if wrong:
            raise TypeError(f"texts must be phrase strings (or None for no label), got {wrong[0]!r} "
                            f"({type(wrong[0]).__name__}).")
        if len(labels) == 1 and len(predicted) > 1:
            labels = labels * len(predicted)
        if len(labels) != len(predicted):
            raise ValueError(f"Got {len(labels)} texts for {len(predicted)} boxes; pass one text per box.")
    colors = _colour_list(colors)
    gt_colors = _colour_list(gt_color, "gt_color")
    if len(gt_colors) != 1:
        raise ValueError(f"gt_color is one colour, got {len(gt_colors)}: {gt_color!r}.")
    gt_color = gt_colors[0]
    for setting, value in (("line_width", line_width), ("font_size", font_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1):
            # a negative width drew no box at all, without a word; 0 quietly meant the default
            raise ValueError(f"{setting} must be a positive whole number of pixels (or None for the default), "
                             f"got {value!r}.")
    short_side = min(canvas.size)
    line_width = int(line_width or max(2, round(short_side / 200)))
    font = _resolve_font(font, int(font_size or max(10, round(short_side / 40))))
    missing = _missing_glyphs(font, labels)
    if missing:
        warnings.warn(f"The labels' font has no glyph for {''.join(missing[:12])!r}"
                      f"{f' and {len(missing) - 12} more characters' if len(missing) > 12 else ''}: they are drawn as "
                      "empty boxes. Pass font=<path to a .ttf/.otf file that has them> (e.g. a Noto or DejaVu font).",
                      UserWarning, stacklevel=2)
    draw = ImageDraw.Draw(canvas)
    for box in truths:
        draw.rectangle(box, outline=gt_color, width=line_width)
    for index, box in enumerate(predicted):
        draw.rectangle(box, outline=colors[index % len(colors)], width=line_width)
    for box in truths:
        _label(draw, box, "GT", gt_color, font, canvas.size)
    for index, (box, text) in enumerate(zip(predicted, labels)):
        if text:
            _label(draw, box, text, colors[index % len(colors)], font, canvas.size)
    return canvas


PIPELINE.predict = predict_boxes
