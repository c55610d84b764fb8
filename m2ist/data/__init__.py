"""REC data: loaders for the common dataset layouts, image decoding and a validating ``Dataset``.

Every loader returns ``list[RECSample]`` (one sample per expression, box in ``xyxy`` pixels of the original image).
"""

from m2ist.data.collator import RECCollator
from m2ist.data.dataset import RECDataset, RECDataWarning, ValidationReport
from m2ist.data.files import load_coco_style, load_csv, load_jsonl
from m2ist.data.hf import from_hf_dataset
from m2ist.data.images import DeferredImage, ImageLoadError, ImageNotFoundError, image_size, load_image
from m2ist.data.refer import load_refer
from m2ist.data.safe_pickle import restricted_load
from m2ist.data.sample import RECSample
from m2ist.data.transforms import LOCATION_WORDS, RECAugmentation, has_location_word, swap_left_right
from m2ist.data.transvg import load_transvg_split

__all__ = [
    "LOCATION_WORDS",
    "DeferredImage",
    "ImageLoadError",
    "ImageNotFoundError",
    "RECAugmentation",
    "RECCollator",
    "RECDataWarning",
    "RECDataset",
    "RECSample",
    "ValidationReport",
    "from_hf_dataset",
    "has_location_word",
    "image_size",
    "load_coco_style",
    "load_csv",
    "load_image",
    "load_jsonl",
    "load_refer",
    "load_transvg_split",
    "restricted_load",
    "swap_left_right",
]
