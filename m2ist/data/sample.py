"""The one canonical REC sample every loader produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from m2ist.data.images import DeferredImage

#: What a sample's image may be. Loaders give paths or :class:`~m2ist.data.images.DeferredImage` references (read
#: when an item is taken), so a sample list of any size holds no pixels; in-memory images are accepted too.
ImageLike = str | Path | DeferredImage | Image.Image | np.ndarray


@dataclass
class RECSample:
    """One referring expression and the one box it names.

    Attributes:
        image: a path, a :class:`~m2ist.data.images.DeferredImage` (e.g. a row of a Hugging Face dataset), a PIL
            image or an ``(H, W[, C])`` array.
        expression: the referring phrase.
        box: ``(x0, y0, x1, y1)`` in absolute pixels of the original image (``xyxy``).
        image_id: an identifier of the image (used to group expressions and in result files).
        metadata: anything else the source provides (split, ref id, category, sentence id, ...).
        annotated_size: the ``(width, height)`` the annotation file states for the image (COCO / ``instances.json``
            ``images[].width/height``, a record's ``width``/``height``), or ``None``. The box is in that image's
            pixels: :class:`~m2ist.data.RECDataset` refuses a sample whose image file has another size (a resized
            copy of the images, another file under the same name).
    """

    image: ImageLike
    expression: str
    box: tuple[float, float, float, float]
    image_id: str | int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    annotated_size: tuple[int, int] | None = None
