"""REC evaluation with the TransVG protocol: Acc@0.5 per split, mean IoU, and a JSON results file.

Protocol (TransVG, and the numbers the M²IST paper reports):

* one prediction per expression (the evaluation unit is the sentence, not the referred object);
* the predicted box is mapped back to ``xyxy`` pixels of the original image and clamped to the image;
* a prediction is correct iff its **IoU** with the ground-truth box is ``>= 0.5`` (a tie at exactly 0.5 counts);
* accuracy = correct / number of expressions; the mean IoU over expressions is reported too.

This is IoU, as in TransVG and its descendants (DARA, M²IST), **not GIoU** as in MDETR's evaluation (GIoU >= 0.5
is slightly stricter). IoU is invariant under the letterbox resize, so computing it in original pixels gives the
same value as TransVG's computation on the padded canvas.

Clamping: the spec clamps the prediction to the **image** (``clamp="image"``, the default). TransVG's code clamps
the normalised prediction to the padded **canvas** ``[0, 1]`` instead (``clamp="canvas"``); the two differ only
when a predicted box reaches into the padding, where clamping to the image gives an IoU at least as high.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
import warnings
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from m2ist.card import EVAL_RESULTS_NAME, TOWERS_USED_KEY, WEIGHTS_SHA256_KEY
from m2ist.config import check_flags
from m2ist.data.dataset import check_annotated_size, percentages_warning
from m2ist.data.images import load_image
from m2ist.data.loaders import has_visible_text
from m2ist.data.sample import RECSample
from m2ist.inference import (
    check_positive_int,
    eval_mode,
    forward_boxes_per_adapter,
    model_device,
    resolve_adapters,
    resolve_processor,
)
from m2ist.ops.boxes import box_convert, clip_boxes, looks_normalised, paired_box_iou
from m2ist.ops.defaults import on_cpu
from m2ist.save_and_load import atomic_write, tensors_sha256

if TYPE_CHECKING:
    from m2ist.processing import RECProcessor

__all__ = ["CLAMP_MODES", "HEADLINE_THRESHOLD", "RESULTS_FORMAT_VERSION", "ResultsWriteError", "accuracy_at_iou",
           "check_output_file", "evaluate", "is_results_file", "json_file_is", "metric_name", "paired_iou",
           "read_results", "replaced_results_note", "with_headline", "write_results"]

logger = logging.getLogger(__name__)

RESULTS_FORMAT_VERSION = 1
CLAMP_MODES = ("image", "canvas")
#: The threshold of the headline accuracy (Acc@0.5) an adapter's model card reports from its ``eval_results.json``.
HEADLINE_THRESHOLD = 0.5
DEFAULT_SPLIT_NAME = "eval"


# ---------------------------------------------------------------------------------------------- metrics
def metric_name(threshold: float) -> str:
    """The key of an accuracy threshold in results: ``0.5 -> "acc@0.5"``, ``0.75 -> "acc@0.75"``."""
    return f"acc@{threshold:g}"


def _scalar(value: Any) -> Any:
    """A numpy scalar or a 0-d array or tensor as a Python number; anything else as it is."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", None) == 0 else value


def _check_thresholds(thresholds: float | Sequence[float]) -> tuple[float, ...]:
    """The thresholds as distinct floats in (0, 1]; numpy and torch numbers and arrays are read as numbers."""
    thresholds = _scalar(thresholds)
    if isinstance(thresholds, str | bytes):  # "0.5" would be read letter by letter ("got '0'")
        raise ValueError(f"IoU thresholds must be numbers in (0, 1], got the text {thresholds!r}; pass numbers, "
                         "e.g. 0.5 or (0.5, 0.75).")
    try:
        values = (thresholds,) if isinstance(thresholds, int | float) else tuple(_scalar(v) for v in thresholds)
    except TypeError:
        raise ValueError(f"IoU thresholds must be a number or a sequence of numbers in (0, 1], got {thresholds!r}.") \
            from None
    if not values:
        raise ValueError("Give at least one IoU threshold, e.g. (0.5,).")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) <= 1.0:
            raise ValueError(f"IoU thresholds must be numbers in (0, 1], got {value!r}.")
    names: dict[str, float] = {}
    for value in values:  # two thresholds reported under one key: one result would overwrite the other
        other = names.setdefault(metric_name(float(value)), float(value))
        if other != float(value):
            raise ValueError(f"IoU thresholds {other!r} and {value!r} are both reported as {metric_name(other)!r}; "
                             "give thresholds that differ in their first 6 significant digits.")
    return tuple(dict.fromkeys(float(v) for v in values))


def with_headline(thresholds: float | Sequence[float]) -> tuple[float, ...]:
    """The checked ``thresholds`` with :data:`HEADLINE_THRESHOLD` added when missing: what an adapter's
    ``eval_results.json`` is scored at, so that its model card keeps its headline Acc@0.5."""
    values = _check_thresholds(thresholds)
    return values if HEADLINE_THRESHOLD in values else (HEADLINE_THRESHOLD, *values)


def _as_boxes(boxes: Any, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=torch.float64)
    if tensor.ndim == 1 and tensor.shape[0] == 4:
        tensor = tensor[None]
    if tensor.ndim != 2 or tensor.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) of (x0, y0, x1, y1) boxes, got {tuple(tensor.shape)}.")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} holds non-finite coordinates.")
    return tensor


def _check_ground_truth(gt: torch.Tensor) -> None:
    """Refuse ``xyxy`` ground-truth rows that cannot be scored: inverted (``x1 < x0``, e.g. COCO ``x, y, w, h``) or
    of zero area; each would count as a miss whatever the prediction."""
    inverted = (gt[:, 2] < gt[:, 0]) | (gt[:, 3] < gt[:, 1])
    empty = (gt[:, 2] == gt[:, 0]) | (gt[:, 3] == gt[:, 1])
    for bad, problem in ((inverted, "has x1 < x0 or y1 < y0 (is it x, y, w, h? convert it with "
                                    "m2ist.ops.boxes.box_convert(boxes, 'xywh', 'xyxy'))"),
                         (empty, "has zero area")):
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"gt_xyxy[{row}] {[round(v, 4) for v in gt[row].tolist()]} {problem}; {int(bad.sum())} "
                             f"of {gt.shape[0]} ground-truth boxes do: scoring them would count a miss without a word.")


def _check_same_frame(pred: torch.Tensor, gt: torch.Tensor) -> None:
    """Refuse boxes of two frames, where every IoU would be about 0 and the accuracy 0 without a word: predictions
    wholly within ``[0, 1]`` (the model's normalised ``pred_boxes``) against ground truth in pixels (beyond 2), and
    ground truth wholly within ``[0, 1]`` (a batch's normalised labels) against predictions in pixels (beyond 4: a
    one-pixel box in the corner is no fraction, as ``m2ist.data.dataset.check_pixel_box`` reads it). Predictions all
    at ``(0, 0, 0, 0)`` (clamped off an image's corner) are pixels, and are scored."""
    if pred.numel() == 0:
        return
    fractions = {"pred_xyxy": bool(((pred >= 0) & (pred <= 1)).all()) and bool((pred != 0).any()),
                 "gt_xyxy": bool(((gt >= 0) & (gt <= 1)).all())}
    for name, other, pixels, limit, fix in (
        ("pred_xyxy", "gt_xyxy", gt, 2.0, "give the predictions in xyxy pixels of the original image too "
         "(processor.post_process_boxes(outputs.pred_boxes, batch['image_geometry']) maps the model's normalised cx, "
         "cy, w, h there)"),
        ("gt_xyxy", "pred_xyxy", pred, 4.0, "give the ground truth in xyxy pixels of the original image too (the "
         "labels of a batch are normalised cx, cy, w, h of the canvas; score pixel predictions against the samples' "
         "boxes, as evaluate() does)"),
    ):
        largest = float(pixels.abs().max())
        if fractions[name] and largest > limit:
            raise ValueError(f"{name} lies within [0, 1] while {other} is in pixels (up to {largest:g}): {fix}.")


def _paired_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """:func:`paired_iou` without the frame check, for boxes already in one frame (``evaluate``'s clamped pixels:
    a prediction clamped into a corner may lie within [0, 1])."""
    if pred.shape[0] != gt.shape[0]:
        raise ValueError(f"Got {pred.shape[0]} predicted boxes and {gt.shape[0]} ground-truth boxes; pass one each.")
    _check_ground_truth(gt)
    return paired_box_iou(pred, gt, eps=1e-12)


@on_cpu()  # boxes given as lists are scored on the CPU whatever torch's default device
def paired_iou(pred_xyxy: Any, gt_xyxy: Any, *, check_frames: bool = True) -> torch.Tensor:
    """IoU of ``pred[i]`` with ``gt[i]`` for ``(N, 4)`` ``xyxy`` boxes, in float64 (so exact ties stay exact).

    A ground-truth box that is inverted or of zero area is refused, naming it; a predicted box with ``x1 < x0``
    (or ``y1 < y0``) is empty: IoU 0, as in the loss's GIoU. Predictions within [0, 1] (the model's normalised
    ``pred_boxes``) against ground truth in pixels are refused, and so is normalised ground truth against pixel
    predictions; ``check_frames=False`` skips that check where both are known to share a frame (a diverging model's
    normalised predictions against normalised labels may reach far past 2)."""
    check_flags("paired_iou", check_frames=check_frames)
    pred, gt = _as_boxes(pred_xyxy, "pred_xyxy"), _as_boxes(gt_xyxy, "gt_xyxy")
    if check_frames and pred.shape[0] == gt.shape[0]:
        _check_same_frame(pred, gt)
    return _paired_iou(pred, gt)


def accuracy_at_iou(pred_xyxy: Any, gt_xyxy: Any, thresholds: float | Sequence[float] = (0.5,), *,
                    check_frames: bool = True) -> dict[float, float]:
    """Fraction of predictions whose IoU with their ground-truth box is ``>= t``, for each threshold ``t``.

    Boxes are ``(N, 4)`` ``xyxy`` in one frame (e.g. original-image pixels; clamp predictions to the image first,
    as :func:`evaluate` does). This is the TransVG criterion (IoU), not MDETR's GIoU. Returns
    ``{threshold: accuracy in [0, 1]}``; an empty input, or a ground-truth box that is inverted (``x, y, w, h``
    given as ``xyxy``) or of zero area, raises; so do boxes of two frames (see :func:`paired_iou`).
    """
    values = _check_thresholds(thresholds)
    iou = paired_iou(pred_xyxy, gt_xyxy, check_frames=check_frames)
    if iou.numel() == 0:
        raise ValueError("No boxes to score: accuracy over zero expressions is undefined.")
    return {t: float((iou >= t).double().mean()) for t in values}


# ---------------------------------------------------------------------------------------------- data
class _SampleList(Dataset):
    """Every :class:`RECSample` of a list, none dropped (the denominator is the number of expressions)."""

    def __init__(self, samples: Sequence[RECSample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        where = f"Sample {index} (image_id={sample.image_id!r})"
        try:
            image = load_image(sample.image)
        except (OSError, ValueError, TypeError) as err:
            raise type(err)(f"{where}: {err}") from err
        check_annotated_size(sample, image.size, where=where)  # a resized copy would score boxes at the wrong place
        return {"image": image, "expression": sample.expression, "box": tuple(sample.box),
                "image_id": sample.image_id, "index": index, "metadata": dict(sample.metadata)}

    @property
    def source_indices(self) -> list[int]:
        """Each item's position in the list given (all kept), as :attr:`RECDataset.source_indices`."""
        return list(range(len(self.samples)))


def _as_dataset(data: Any, split: str) -> Dataset:
    if isinstance(data, str | bytes | os.PathLike):  # a str has __getitem__ and __len__: read as items "d", "a"...
        raise TypeError(f"Split {split!r}: got the path {os.fsdecode(data)!r}, not data: load it first, e.g. "
                        "m2ist.data.load_refer(...) (see docs/how-to/evaluation.md), and pass the dataset.")
    if isinstance(data, list | tuple) and data and isinstance(data[0], RECSample):
        return _SampleList(data)
    if isinstance(data, list | tuple) and data and all(isinstance(part, list | tuple | Dataset) for part in data):
        raise TypeError(f"Split {split!r}: got a {type(data).__name__} of {len(data)} datasets, not of samples: pass "
                        "several splits by name, {'val': val, 'testA': testA}, so the results say which is which.")
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return data
    raise TypeError(f"Split {split!r}: expected a RECDataset, a list of RECSample or a map-style dataset of REC items, "
                    f"got {type(data).__name__}.")


def _source_indices(data: Any) -> Sequence[int] | None:
    """Each item's position in the samples ``data`` was built from (:attr:`RECDataset.source_indices`, which differ
    from the item's own index once the dataset dropped a sample), or None when ``data`` does not say."""
    sources = getattr(data, "source_indices", None)
    if not isinstance(sources, Sequence) or isinstance(sources, str | bytes) or len(sources) != len(data):
        return None
    return sources


def _field(item: Any, key: str, index: int, split: str) -> Any:
    if isinstance(item, Mapping):
        if key in item:
            return item[key]
    elif hasattr(item, key):
        return getattr(item, key)
    raise KeyError(f"Split {split!r}, item {index}: no {key!r}. Evaluation items need 'image', 'expression' and 'box' "
                   "(xyxy pixels); a RECDataset with a transform cannot be evaluated directly.")


class _EvalCollator:
    """Process images and phrases (no augmentation) and keep the ground-truth boxes apart, unvalidated."""

    def __init__(self, processor: RECProcessor, split: str) -> None:
        self.processor = processor
        self.split = split

    def __call__(self, items: Sequence[Any]) -> dict[str, Any]:
        images, texts, boxes, image_ids, indices, metadata = [], [], [], [], [], []
        for position, item in enumerate(items):
            images.append(_field(item, "image", position, self.split))
            expression = _field(item, "expression", position, self.split)
            box = _field(item, "box", position, self.split)
            if box is None:
                raise ValueError(f"Split {self.split!r}: item {position} has no ground-truth box.")
            try:  # text ("1234" would be read digit by digit) and mappings (their keys) are never a box
                values = [] if isinstance(box, str | bytes | Mapping | AbstractSet) else [
                    float(v) for v in (box.tolist() if hasattr(box, "tolist") else box)]
            except (TypeError, ValueError):
                values = []
            image_ids.append(item.get("image_id") if isinstance(item, Mapping) else getattr(item, "image_id", None))
            indices.append(item.get("index") if isinstance(item, Mapping) else None)
            found = item.get("metadata") if isinstance(item, Mapping) else getattr(item, "metadata", None)
            metadata.append(dict(found) if isinstance(found, Mapping) else None)
            if not isinstance(expression, str):  # str(None) would score the phrase "None"
                raise TypeError(f"{self._where(position, indices[-1], image_ids[-1])}: the expression is a "
                                f"{type(expression).__name__} ({expression!r}), not text. Fix the data: every item "
                                "needs its referring phrase as a string.")
            if not has_visible_text(expression):  # the processor would name only its batch position
                raise ValueError(f"{self._where(position, indices[-1], image_ids[-1])}: the expression "
                                 f"{expression!r} is empty or shows nothing; every scored sample needs its referring "
                                 "phrase (fix or remove the sample).")
            texts.append(expression)
            if len(values) != 4:
                raise ValueError(f"{self._where(position, indices[-1], image_ids[-1])}: the ground-truth box {box!r} "
                                 "is not 4 numbers (x0, y0, x1, y1).")
            boxes.append(values)
        encoded = self.processor(images, texts, return_tensors="pt")
        gt = torch.tensor(boxes, dtype=torch.float64)
        width, height = encoded["image_geometry"][:, 0].double(), encoded["image_geometry"][:, 1].double()
        for position in range(gt.shape[0]):
            problem = _ground_truth_problem(gt[position], float(width[position]), float(height[position]))
            if problem:
                raise ValueError(f"{self._where(position, indices[position], image_ids[position])}: the ground-truth "
                                 f"box {[round(v, 4) for v in boxes[position]]} {problem} Fix the data (or its "
                                 "box_format / normalized setting): scoring it would count a miss without a word.")
        clipped_gt = clip_boxes(gt, width, height)
        clipped = [f"{self._where(row, indices[row], image_ids[row])}: {[round(v, 2) for v in boxes[row]]} in a "
                   f"{float(width[row]):g}x{float(height[row]):g} image"
                   for row in (clipped_gt != gt).any(dim=-1).nonzero().flatten().tolist()]
        return {"encoded": encoded, "gt": clipped_gt, "texts": texts, "image_ids": image_ids,
                "indices": indices, "metadata": metadata, "clipped": clipped,  # and what percentages_warning judges the split by:
                "largest": float(gt.max()), "smallest_side": float(torch.minimum(width, height).min())}

    def _where(self, position: int, index: Any, image_id: Any) -> str:
        sample = f"sample {index}" if index is not None else f"batch position {position}"
        return f"Split {self.split!r}, {sample} (image_id={image_id!r})"


def _ground_truth_problem(box: torch.Tensor, width: float, height: float) -> str:
    """Why an ``xyxy`` pixel ground-truth box cannot be scored in a ``width`` x ``height`` image ("" if it can)."""
    if not bool(torch.isfinite(box).all()):
        return "holds non-finite numbers (NaN or inf)."
    x0, y0, x1, y1 = box.tolist()
    if x1 < x0 or y1 < y0:
        return "has x1 < x0 or y1 < y0 (is it x, y, w, h rather than x0, y0, x1, y1?)."
    if x1 == x0 or y1 == y0:
        return "has zero area."
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return f"lies outside the {width:g}x{height:g} image."
    if looks_normalised((x0, y0, x1, y1), width, height):
        return (f"lies within [0, 1] in a {width:g}x{height:g} image: it looks normalised, but evaluation boxes are "
                "pixels (load with normalized=True).")
    return ""


# ---------------------------------------------------------------------------------------------- evaluate
def _to_canvas_clamped(pred: torch.Tensor) -> torch.Tensor:
    """TransVG's clamp: normalised ``cxcywh`` -> ``xyxy`` clamped to ``[0, 1]`` -> ``cxcywh``."""
    return box_convert(box_convert(pred, "cxcywh", "xyxy").clamp(0.0, 1.0), "xyxy", "cxcywh")


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _json_safe(value.item())
    return str(value)


def _model_summary(model: nn.Module, adapter: str | None = None) -> dict[str, Any]:
    """The model's class, method, settings and towers; with ``adapter``, that adapter's settings (the metrics
    reported at the top level are the first named adapter's, not necessarily the active one's)."""
    config = getattr(model, "config", None)
    if adapter is not None and adapter in getattr(model, "peft_config", {}):
        config = model.peft_config[adapter]
    keys = ("vision_model_name_or_path", "vision_revision", "vision_model_type", "text_model_name_or_path",
            "text_revision", "text_model_type", "image_size", "max_query_len", "num_vision_tokens", "bottleneck",
            "adapter_scale", "experts", "share_iea_up_projection", "intra_tap", "inter_tap", "fusion_dim",
            "fusion_layers", "backbone_dtype")
    summary: dict[str, Any] = {"class": type(model).__name__, "method": getattr(model, "method", "m2ist")}
    if config is not None:
        summary.update({key: getattr(config, key) for key in keys if hasattr(config, key)})
    counts = getattr(model, "parameter_counts", None)
    if callable(counts):
        summary["parameters"] = counts()
    used = _towers_used(model)
    if used:
        summary[TOWERS_USED_KEY] = used
    return summary


def _towers_used(model: nn.Module) -> dict[str, dict[str, str | None]]:
    """``{"vision"|"text": {"name_or_path", "commit"}}`` of the towers the model ran (identified once, when they
    were wrapped): the ones given at load (``--vision-model``) may not be those its config records, and results
    must say which produced them."""
    ids = getattr(model, "tower_ids", None)
    if not isinstance(ids, dict):
        return {}
    return {modality: {"name_or_path": name, "commit": commit} for modality, (name, commit) in ids.items()}


def _measured_weights(model: nn.Module, adapter: str | None = None) -> dict[str, str]:
    """``{"weights_sha256": ...}``: the SHA-256 of the trained tensors measured (what their weights file records),
    so a model card shows these results only beside those weights; empty for a model without an adapter's tensors.
    With ``adapter``, those of that adapter of a :class:`~m2ist.model.SideTunedModel` (active or not)."""
    adapter_state = getattr(model, "adapter_state_dict", None)
    if adapter is not None and callable(adapter_state):  # what save_pretrained writes for that adapter
        return {WEIGHTS_SHA256_KEY: tensors_sha256(adapter_state(adapter))}
    state = getattr(model, "trainable_state_dict", None)
    return {WEIGHTS_SHA256_KEY: tensors_sha256(state())} if callable(state) else {}


def _environment() -> dict[str, Any]:
    import transformers

    from m2ist.version import __version__

    return {"m2ist_version": __version__, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "python_version": platform.python_version()}


class ResultsWriteError(OSError):
    """The results could not be written where asked; ``results`` holds them, and a copy went to ``saved_to``."""

    def __init__(self, message: str, results: Mapping[str, Any], saved_to: Path | None) -> None:
        super().__init__(message)
        self.results = results
        self.saved_to = saved_to


#: Largest existing file :func:`check_output_file` reads to tell whether it is a results file it may replace.
_MAX_REPLACEABLE_BYTES = 1 << 30


def is_results_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds results in :func:`evaluate`'s format (a JSON object with a ``metrics`` mapping)."""
    return json_file_is(path, lambda value: isinstance(value, Mapping) and isinstance(value.get("metrics"), Mapping))


def json_file_is(path: str | os.PathLike, test: Callable[[Any], bool]) -> bool:
    """Whether ``path`` is a UTF-8 JSON file (at most 1 GiB) whose value passes ``test``: how the output checks
    (:func:`check_output_file`'s ``replaces``) recognise an earlier output of their own kind."""
    try:
        if os.path.getsize(path) > _MAX_REPLACEABLE_BYTES:
            return False
        with open(path, encoding="utf-8") as stream:
            return bool(test(json.load(stream)))
    except (OSError, ValueError):
        return False


def check_output_file(output_file: str | os.PathLike, *,
                      replaces: Callable[[Path], bool] | None = is_results_file) -> Path:
    """Raise an ``OSError`` naming the fix when ``output_file`` cannot become a results file (a folder, a path
    under a file, an unwritable place, a device or FIFO) or when it would overwrite a file that is not one: an
    existing non-empty file is replaced only when ``replaces(path)`` says it is an earlier output (default:
    :func:`is_results_file`; ``None`` replaces any regular file). Nothing is created. Returns it as a
    :class:`~pathlib.Path`."""
    text = os.fspath(output_file)
    path = Path(text).expanduser()
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise IsADirectoryError(f"The results file {text} is a folder; give a file name such as "
                                f"{path / 'results.json'}.")
    if path.exists() and not path.is_file():  # a device, FIFO or socket: replacing it would destroy it
        raise FileExistsError(f"The results file {text} exists and is not a regular file (a device, FIFO or socket); "
                              "give the path of a file.")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"The results file {path} exists and is not writable; choose another path.")
    if replaces is not None and path.is_file() and path.stat().st_size > 0 and not replaces(path):
        raise FileExistsError(f"The results file {text} already exists and is not an earlier results file of this "
                              "command (a data file, weights, an image?): it would be overwritten. Choose another "
                              "path, or delete it first if it may go.")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"The results file {text} cannot be created: {ancestor} is a file, not a folder. "
                                 "Choose a path inside a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"The results file {text} cannot be created: the folder {ancestor} is not writable.")
    return path


def read_results(path: str | os.PathLike) -> Mapping[str, Any] | None:
    """The results in ``path`` (:func:`evaluate`'s format), or None when it holds none (absent, unreadable, other
    JSON)."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > _MAX_REPLACEABLE_BYTES:
            return None
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, Mapping) and isinstance(value.get("metrics"), Mapping) else None


def _same_data(before: Mapping[str, Any], now: Mapping[str, Any]) -> bool:
    """Whether two results' data records describe the same data for the splits both scored: the settings alike
    but for the list of splits, and each split both name read from the same file."""
    listing = ("eval_files", "eval_splits")
    if _json_safe({k: v for k, v in before.items() if k not in listing}) != \
            _json_safe({k: v for k, v in now.items() if k not in listing}):
        return False
    files_before, files_now = before.get("eval_files"), now.get("eval_files")
    if isinstance(files_before, Mapping) and isinstance(files_now, Mapping):
        return all(_json_safe(files_before[k]) == _json_safe(files_now[k]) for k in files_before if k in files_now)
    return True


def replaced_results_note(output_file: str | os.PathLike, results: Mapping[str, Any]) -> str | None:
    """What writing ``results`` to ``output_file`` would lose, or None: the results already there scored splits
    these do not, another adapter, other data or another clamp (weights and dates are expected to change)."""
    old = read_results(Path(output_file).expanduser())
    if old is None:
        return None
    lost: list[str] = []
    gone = [str(split) for split in old["metrics"] if str(split) not in map(str, results.get("metrics", {}))]
    if gone:
        lost.append(f"the scores of split{'s' if len(gone) > 1 else ''} {', '.join(gone)}, which these results lack")
    before = old.get("metadata") if isinstance(old.get("metadata"), Mapping) else {}
    now = results.get("metadata") if isinstance(results.get("metadata"), Mapping) else {}
    if before.get("adapter") and now.get("adapter") and before["adapter"] != now["adapter"]:
        lost.append(f"the results of another adapter ({before['adapter']})")
    if isinstance(before.get("data"), Mapping) and isinstance(now.get("data"), Mapping) \
            and not _same_data(before["data"], now["data"]):
        lost.append("the results of other data (another dataset, split files or settings)")
    old_clamp = (before.get("protocol") or {}).get("clamp") if isinstance(before.get("protocol"), Mapping) else None
    new_clamp = (now.get("protocol") or {}).get("clamp") if isinstance(now.get("protocol"), Mapping) else None
    if old_clamp and new_clamp and old_clamp != new_clamp:
        lost.append(f"the results scored with clamp={old_clamp!r}")
    return " and ".join(lost) or None


def write_results(results: Mapping[str, Any], output_file: str | os.PathLike) -> Path:
    """Write ``results`` as indented JSON (parent folders created); the file is replaced in one step, through a
    temporary file of its own that a failure removes, so it is never seen half-written. Replacing results of other
    splits, adapter, data or clamp is warned about (:func:`replaced_results_note`). Return the path."""
    path = check_output_file(output_file)
    text = json.dumps(_json_safe(results), indent=2) + "\n"
    note = replaced_results_note(path, results)
    if note:
        logger.warning("Replacing %s, which held %s; write to another file (--output) to keep both.", path, note)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def evaluate(
    model: nn.Module,
    processor: RECProcessor | None,
    datasets: Mapping[str, Any] | Any,
    batch_size: int = 32,
    iou_thresholds: float | Sequence[float] = (0.5,),
    output_file: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    *,
    save_predictions: bool = False,
    clamp: str = "image",
    num_workers: int = 0,
    metadata: Mapping[str, Any] | None = None,
    adapter_names: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Score a REC model on one or more splits with the TransVG protocol (see the module docstring).

    Accuracy uses **IoU >= threshold** (TransVG), not GIoU (MDETR). Every expression counts once: nothing is
    dropped, and a ground-truth box is only clipped to its image.

    Args:
        model: the model to score; run in ``eval()`` mode without gradients, its mode restored afterwards.
        processor: the :class:`~m2ist.processing.RECProcessor` the model was trained with (its test-time
            transform is used); ``None`` uses ``model.processor``.
        datasets: ``{split_name: data}`` or one ``data`` (named ``"eval"``), where ``data`` is a
            :class:`~m2ist.data.RECDataset`, a list of :class:`~m2ist.data.sample.RECSample`, or any map-style
            dataset whose items have ``image``, ``expression`` and ``box`` (``xyxy`` pixels); a path is refused
            (load the data first). A ground-truth box reaching outside its image is clipped to it, with a warning
            per split naming the first such samples.
        batch_size: expressions per forward pass, a positive whole number (numpy integers too).
        iou_thresholds: the accuracy thresholds; each is reported as ``acc@<t>`` (``acc@0.5``, ``acc@0.75``...).
            An ``output_file`` named ``eval_results.json`` (the file an adapter's model card reads) is always
            scored at 0.5 too, so the card keeps its headline Acc@0.5.
        output_file: write the results as JSON there; checked before any scoring (a folder or an uncreatable
            path raises an ``OSError`` at once). If writing fails after scoring, a :class:`ResultsWriteError`
            holds the results and names the copy saved in the temporary folder.
        device: move the model to this device first; default: where the model is.
        progress: show a progress bar per split.
        save_predictions: also return (and write) one record per expression: index (the item's position in the
            data given), source index (its position in the samples a ``RECDataset`` was built from, which differs
            once the dataset dropped a sample; a list's own position), the sample's metadata (ref id, sentence id,
            ... where the loader kept them), image id, expression, predicted and ground-truth boxes, IoU.
        clamp: ``"image"`` (spec; default) or ``"canvas"`` (TransVG's code) — see the module docstring.
        num_workers: ``DataLoader`` workers that load and process the images (a whole number, 0 or more).
        metadata: extra entries for the results' ``metadata`` (e.g. the adapter path, the data files); a key
            that evaluate records itself (``model``, ``protocol``, ``weights_sha256``, ...) is refused.
        adapter_names: ``"all"`` or a list of a :class:`~m2ist.model.SideTunedModel`'s adapters to score together,
            on one pass of the frozen towers per batch; default: the active adapter only.

    Returns:
        ``{"metrics": {split: {"acc@0.5", "correct@0.5", "miou", "count"}}, "metadata": {...}}`` (accuracies in
        ``[0, 1]``), plus ``"predictions": {split: [...]}`` with ``save_predictions``. With ``adapter_names``,
        also ``"adapters": {name: {"metrics": ..., "weights_sha256": ..., ["predictions": ...]}}``; ``"metrics"``,
        ``metadata.model`` and ``metadata.weights_sha256`` are then the first named adapter's.
    """
    from tqdm.auto import tqdm

    thresholds = _check_thresholds(iou_thresholds)
    if output_file is not None and Path(output_file).name == EVAL_RESULTS_NAME:
        thresholds = with_headline(thresholds)  # the card reads its headline Acc@0.5 from this file
    if clamp not in CLAMP_MODES:
        raise ValueError(f"clamp must be one of {CLAMP_MODES}, got {clamp!r}.")
    batch_size = check_positive_int("batch_size", batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a whole number of data-loading processes, 0 or more, got "
                         f"{num_workers!r}.")
    check_flags("evaluate", progress=progress, save_predictions=save_predictions)
    if output_file is not None:
        check_output_file(output_file)  # before any forward pass: a bad path must not cost the evaluation
    _check_metadata(metadata)
    processor = resolve_processor(model, processor)
    if isinstance(datasets, Mapping):
        names_seen: dict[str, Any] = {}
        for name in datasets:  # {1: a, "1": b} would keep one split and drop the other without a word
            if str(name) in names_seen:
                other = names_seen[str(name)]
                raise ValueError(f"Splits {other!r} and {name!r} are both named {str(name)!r} in the results; give "
                                 "the splits distinct names.")
            names_seen[str(name)] = name
        splits = {str(name): _as_dataset(data, str(name)) for name, data in datasets.items()}
    else:
        splits = {DEFAULT_SPLIT_NAME: _as_dataset(datasets, DEFAULT_SPLIT_NAME)}
    if not splits:
        raise ValueError("No splits to evaluate: pass {split_name: dataset}.")
    for name, data in splits.items():
        if len(data) == 0:
            raise ValueError(f"Split {name!r} is empty: accuracy over zero expressions is undefined.")
    if device is not None:
        model.to(device)
    target = model_device(model)

    names = resolve_adapters(model, adapter_names)
    keys: list[str | None] = list(names) if names is not None else [None]
    metrics_by: dict[str | None, dict[str, dict[str, Any]]] = {key: {} for key in keys}
    predictions_by: dict[str | None, dict[str, list[dict[str, Any]]]] = {key: {} for key in keys}
    # batches are built, and each loader's seed drawn, on the CPU whatever torch's default device
    with eval_mode(model), on_cpu():
        for name, data in splits.items():
            loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                collate_fn=_EvalCollator(processor, name))
            ious: dict[str | None, list[torch.Tensor]] = {key: [] for key in keys}
            records: dict[str | None, list[dict[str, Any]]] = {key: [] for key in keys}
            seen, largest, smallest_side = 0, 0.0, math.inf
            sources = _source_indices(data)
            clipped: list[str] = []
            for batch in tqdm(loader, desc=f"eval {name}", unit="batch", disable=not progress, delay=2.0):  # long work only
                for key, pred in forward_boxes_per_adapter(model, batch["encoded"], target, names).items():
                    if clamp == "canvas":
                        pred = _to_canvas_clamped(pred)
                    geometry = batch["encoded"]["image_geometry"].double()
                    boxes = processor.post_process_boxes(pred.double(), geometry, clamp=clamp == "image")
                    iou = _paired_iou(boxes, batch["gt"])
                    ious[key].append(iou)
                    if save_predictions:
                        for row in range(iou.shape[0]):
                            index = seen + row if batch["indices"][row] is None else batch["indices"][row]
                            record = {"index": index}
                            if sources is not None and isinstance(index, int) and 0 <= index < len(sources):
                                record["source_index"] = sources[index]  # where the sample is in the user's list
                            if batch["metadata"][row] is not None:  # ref_id, sent_id...: what annotations key on
                                record["metadata"] = batch["metadata"][row]
                            records[key].append({
                                **record,
                                "image_id": batch["image_ids"][row],
                                "expression": batch["texts"][row],
                                "pred_box": [round(v, 3) for v in boxes[row].tolist()],
                                "gt_box": [round(v, 3) for v in batch["gt"][row].tolist()],
                                "iou": round(float(iou[row]), 6),
                            })
                seen += len(batch["gt"])
                clipped += batch.get("clipped", [])
                largest, smallest_side = max(largest, batch["largest"]), min(smallest_side, batch["smallest_side"])
            percentages = percentages_warning(seen, largest, smallest_side)
            if percentages:  # as RECDataset warns: scored as pixels, they mark the top-left corner
                warnings.warn(f"Split {name!r}: {percentages}", UserWarning, stacklevel=2)
            if clipped:  # as RECDataset warns when it clips: boxes of resized images, or xyxy read as xywh
                many = len(clipped) > 1 and len(clipped) * 4 >= len(data)  # one box is no pattern
                warnings.warn(
                    f"Split {name!r}: {len(clipped)} of {len(data)} ground-truth boxes reach outside their image and "
                    f"were clipped to it before scoring, e.g. {'; '.join(clipped[:3])}"
                    + (". So many suggest boxes in another frame: images resized after annotation, or x, y, w, h "
                       "boxes read as x0, y0, x1, y1" if many else "") + ".", UserWarning, stacklevel=2)
            for key in keys:
                all_iou = torch.cat(ious[key])
                split_metrics: dict[str, Any] = {}
                for t in thresholds:
                    correct = int((all_iou >= t).sum())
                    split_metrics[metric_name(t)] = correct / all_iou.numel()
                    split_metrics[f"correct@{t:g}"] = correct
                split_metrics["miou"] = float(all_iou.mean())
                split_metrics["count"] = int(all_iou.numel())
                metrics_by[key][name] = split_metrics
                if save_predictions:
                    predictions_by[key][name] = records[key]
                logger.info("%s%s: %s", "" if key is None else f"[{key}] ", name,
                            ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in split_metrics.items()))
    metrics, predictions = metrics_by[keys[0]], predictions_by[keys[0]]
    measured = {key: _measured_weights(model, key) for key in keys}  # hashed once each, reported twice for keys[0]

    results: dict[str, Any] = {
        "metrics": metrics,
        "metadata": {
            "format_version": RESULTS_FORMAT_VERSION,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "protocol": {
                "criterion": "IoU (TransVG), not GIoU (MDETR)",
                "iou_thresholds": list(thresholds),
                "clamp": clamp,
                "unit": "one prediction per expression",
                "accuracy": "correct / expressions",
            },
            "model": _model_summary(model, keys[0]),  # "metrics" are the first named adapter's: so is this
            **measured[keys[0]],
            "processor": (processor.flat_settings() if hasattr(processor, "flat_settings")
                          else processor.to_dict() if hasattr(processor, "to_dict") else repr(processor)),
            "batch_size": batch_size,
            "device": str(target),
            **_environment(),
            **dict(metadata or {}),
        },
    }
    if save_predictions:
        results["predictions"] = predictions
    if names is not None:
        results["adapters"] = {key: {"metrics": metrics_by[key], **measured[key],
                                     **({"predictions": predictions_by[key]} if save_predictions else {})}
                               for key in keys}
    if output_file is not None:
        _write_or_keep(results, output_file)
    return results


#: ``metadata`` entries :func:`evaluate` records itself: extra metadata may not replace them.
RECORDED_METADATA_KEYS = ("format_version", "date", "protocol", "model", WEIGHTS_SHA256_KEY, "processor", "batch_size",
                          "device", "m2ist_version", "torch_version", "transformers_version", "python_version")


def _check_metadata(metadata: Mapping[str, Any] | None) -> None:
    """Refuse extra ``metadata`` that is not a mapping or that would replace what :func:`evaluate` records (the
    model and its towers, the weights measured, the protocol): results must say what produced them."""
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping of extra entries, got {type(metadata).__name__}.")
    taken = [str(key) for key in metadata if str(key) in RECORDED_METADATA_KEYS]
    if taken:
        raise ValueError(f"metadata keys {', '.join(repr(k) for k in taken)} would replace what evaluate() records "
                         f"itself ({', '.join(RECORDED_METADATA_KEYS)}): give your entries other names, e.g. "
                         "'run_name' or 'notes'.")


def _write_or_keep(results: dict[str, Any], output_file: str | os.PathLike) -> None:
    """:func:`write_results`; if that fails after scoring, save a copy in the temporary folder and raise a
    :class:`ResultsWriteError` that holds the results and names the copy (the work is never lost)."""
    import tempfile

    try:
        write_results(results, output_file)
    except OSError as err:
        try:
            handle, name = tempfile.mkstemp(prefix="m2ist_eval_results_", suffix=".json")
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(json.dumps(_json_safe(results), indent=2) + "\n")
            saved_to: Path | None = Path(name)
        except OSError:
            saved_to = None
        where = f"they were saved to {saved_to} instead" if saved_to else "they are in this error's .results"
        metrics = json.dumps(_json_safe(results["metrics"]), separators=(",", ":"))
        raise ResultsWriteError(f"Cannot write the results to {output_file} ({err}); {where}. Metrics: {metrics}",
                                results, saved_to) from err
