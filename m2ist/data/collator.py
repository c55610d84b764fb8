"""Batch REC dataset items for a ``DataLoader`` or the Hugging Face ``Trainer`` (``data_collator=``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from m2ist.config import check_flags

if TYPE_CHECKING:
    from m2ist.processing import RECProcessor

__all__ = ["RECCollator"]


def _get(item: Any, key: str, index: int, required: bool = True) -> Any:
    """Read ``key`` from a dict item or an attribute of a :class:`~m2ist.data.sample.RECSample`-like item."""
    if isinstance(item, Mapping):
        if key in item:
            return item[key]
    elif hasattr(item, key):
        return getattr(item, key)
    if required:
        found = sorted(item) if isinstance(item, Mapping) else type(item).__name__
        raise KeyError(f"Dataset item {index} has no {key!r} (found {found}); REC items need 'image' and 'expression'.")
    return None


class RECCollator:
    """Turn a list of REC items into the batch the model's ``forward`` takes.

    Items are dicts ``{"image", "expression", "box" (x0, y0, x1, y1 pixels), "image_id", "index", ...}`` or
    :class:`~m2ist.data.sample.RECSample` objects. The batch holds ``pixel_values``, ``pixel_mask``, ``input_ids``,
    ``attention_mask`` and, when every item has a box, ``labels``.

    Args:
        processor: the :class:`~m2ist.processing.RECProcessor` to apply.
        train: apply the processor's training augmentation.
        return_geometry: also return ``image_geometry`` (B, 6) for ``processor.post_process_boxes`` and, when the
            items carry one, ``index`` (B,) long; these keys are not model inputs (evaluation sets this).
    """

    def __init__(self, processor: RECProcessor, train: bool = False, return_geometry: bool = False) -> None:
        if not callable(processor):
            raise TypeError(f"processor must be a RECProcessor, got {type(processor).__name__}.")
        check_flags("RECCollator", train=train, return_geometry=return_geometry)  # train="False" would augment
        self.processor = processor
        self.train = bool(train)
        self.return_geometry = bool(return_geometry)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(train={self.train}, return_geometry={self.return_geometry})"

    def __call__(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Collate ``items`` into a dict of tensors."""
        if len(items) == 0:
            raise ValueError("RECCollator got an empty list of items.")
        images = [_get(item, "image", i) for i, item in enumerate(items)]
        texts = [_get(item, "expression", i) for i, item in enumerate(items)]
        boxes = [_get(item, "box", i, required=False) for i, item in enumerate(items)]
        has_box = [box is not None for box in boxes]
        if any(has_box) and not all(has_box):
            missing = [i for i, flag in enumerate(has_box) if not flag]
            raise ValueError(f"Items {missing} have no box while others do; a batch needs boxes on all or none.")
        if self.train and not all(has_box):
            raise ValueError("Training batches need a 'box' on every item (the augmentation and the loss use it).")

        encoded = self.processor(
            images, texts, boxes=boxes if all(has_box) else None, train=self.train, return_tensors="pt"
        )
        batch = {key: encoded[key] for key in ("pixel_values", "pixel_mask", "input_ids", "attention_mask")}
        if "labels" in encoded:
            batch["labels"] = encoded["labels"]
        if self.return_geometry:
            batch["image_geometry"] = encoded["image_geometry"]
            indices = [_get(item, "index", i, required=False) for i, item in enumerate(items)]
            if all(isinstance(index, int) for index in indices):
                batch["index"] = torch.tensor(indices, dtype=torch.long)
        return batch
