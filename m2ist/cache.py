"""A cache of the frozen towers' features for training: what only side-tuning allows.

M²IST's towers are frozen and no gradient crosses them, so everything the side network and the head read from
a tower (the seed, the tapped layers' outputs, the final tokens and the mask) is a pure function of the tower's
input. :class:`TowerFeatureCache` stores it the first time an input is seen and reads it back afterwards:

* **keys**: a record is keyed by the content of its input (a SHA-256 digest of one sample's ``pixel_values`` and
  ``pixel_mask``, or of its ``input_ids`` and ``attention_mask``), so an image shared by several expressions runs
  its tower once, one expression shared by several images too, and a changed processor setting (canvas size,
  normalisation, tokenizer, augmentation) can only miss, never read a stale record;
* **what changes features** beyond the input (the tower's class, a digest of its weights, a digest of its config's
  fields that can change the computation, its tap spec and the config's tap override, the layers and kinds tapped,
  the tower dtype, the cache dtype) makes the **fingerprint** (where the tower was loaded from does not), and each
  fingerprint has its own folder (``vision-<fingerprint>/``, ``text-<fingerprint>/``), so a stale cache is never
  read;
* **storage**: ``"memory"`` (RAM) or a folder of memory-mapped files (one row per record, ``bfloat16`` by
  default), each rank of a distributed run writing its own shard and reading the others', with an append-only
  index written after its row, so a cache survives a crash or a resumed run and is shared by later runs (a
  folder this process cannot write, e.g. a shared cache on a read-only mount, is read and its new records kept in
  RAM); each index line holds a CRC32 of its row, checked the first time a process reads a row it did not write,
  so a row damaged on disk is reported and computed again, never read as features; the fingerprint is the same in
  every process (no memory addresses), so later processes find the folder;
* **the towers as they are now**: cast (``set_backbone_dtype``), given other weights, or read at other layers by
  the cached adapter, the towers' records are those of the new fingerprint from the next batch on;
* **augmentation** meets the cache through a fixed number of views per image (:class:`CachedViewsCollator`):
  each epoch picks one of ``views`` deterministic augmentations of every image at random.

With ``dtype="float32"`` and no augmentation, training with the cache gives the same weights as without it:
a batch runs the towers on its missing inputs only (once each) and reads the rest back. Under mixed precision
(``bf16=True`` / ``fp16=True``) it does not: the cache runs the towers in their own dtype, outside the autocast
that an uncached step runs them under (cast the towers with ``tower_dtype`` to store lower-precision features).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import time
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .config import check_flags
from .model import DTYPES, SideTunedModel, TowerFeatureSet, _dummy_inputs, non_finite_features
from .ops.defaults import on_cpu
from .processing import load_rec_image
from .save_and_load import atomic_write
from .towers import TEXT, VISION, Tower, TowerFeatures

__all__ = ["CACHE_DTYPES", "TOWER_CACHE_MODES", "CachedViewsCollator", "TowerCacheCollator", "TowerFeatureCache",
           "cache_keys", "check_tower_cache"]

logger = logging.getLogger(__name__)

#: Bumped whenever the record layout or the keys change (it is part of every fingerprint; 2: SHA-256 keys; 3: a CRC32
#: of each disk row on its index line).
CACHE_FORMAT = 3
CACHE_DTYPES = ("bfloat16", "float16", "float32")
#: The batch entries :class:`TowerCacheCollator` adds (lists of hex digests, one per sample).
KEY_FIELDS = {VISION: "vision_cache_keys", TEXT: "text_cache_keys"}
_NUMPY_STORAGE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}
_INPUTS = {VISION: ("pixel_values", "pixel_mask"), TEXT: ("input_ids", "attention_mask")}


#: The ``tower_cache`` settings that are not folders.
TOWER_CACHE_MODES = ("off", "memory", "disk")
#: Words a careless ``tower_cache`` value may mean as a mode: taken literally they would be folders.
_MODE_WORDS = {"none", "no", "false", "null", "0", "ram", "mem", "in-memory", "true", "yes", "on", "1", "folder",
               "dir"}


def check_tower_cache(value: Any) -> str:
    """``value`` as a ``tower_cache`` setting: ``"off"``, ``"memory"``, ``"disk"`` or a folder. Raise a
    ``ValueError`` saying what to write for a value that would silently become a folder in the working directory
    though it reads as a mode: another case or spaces (``"Memory"``, ``"off "``), or a word such as ``"none"``,
    ``"false"`` or ``"ram"``. A folder of such a name is written as a path (``"./none"``)."""
    if not isinstance(value, str | os.PathLike) or not os.fspath(value).strip():
        raise ValueError(f"tower_cache must be 'off', 'memory', 'disk' or a folder, got {value!r}.")
    text = os.fspath(value)
    if text in TOWER_CACHE_MODES:
        return text
    word = text.strip().lower()
    if "/" in text or os.sep in text:  # written as a path: meant as a folder
        return text
    if word in TOWER_CACHE_MODES or word in _MODE_WORDS:
        meant = word if word in TOWER_CACHE_MODES else "memory" if word in {"ram", "mem", "in-memory"} else \
            "off" if word in {"none", "no", "false", "null", "0"} else None
        hint = f"write {meant!r}" if meant else "write 'off', 'memory' or 'disk'"
        raise ValueError(f"tower_cache={text!r} is not one of {TOWER_CACHE_MODES} (lower case, no spaces) and would be "
                         f"taken as a folder of that name: {hint}, or './{text.strip()}' for such a folder.")
    if text != text.strip():
        raise ValueError(f"The tower_cache folder {text!r} has spaces at its ends; remove them, or write it as a path "
                         f"('./{text}') if they are meant.")
    return text


# ---------------------------------------------------------------------------------------------- keys
def _digest(*arrays: torch.Tensor) -> str:
    # SHA-256 runs in hardware on most CPUs (x86 SHA extensions, ARMv8 crypto): about twice BLAKE2b's speed on
    # the 200 KB of a 128-px image, hashed every time a sample is batched; the arrays are read in place, not copied
    h = hashlib.sha256()
    for array in arrays:
        h.update(str(tuple(array.shape)).encode())
        h.update(array.detach().cpu().contiguous().numpy())
    return h.hexdigest()[:32]


def cache_keys(batch: Mapping[str, Any], modality: str) -> list[str]:
    """One content key per sample of ``batch`` for ``modality``: a digest of the tower's inputs of that sample."""
    first, second = _INPUTS[modality]
    values = batch[first]
    if modality == VISION:
        values = values.float()
    mask = batch.get(second)
    if mask is None:
        return [_digest(values[i]) for i in range(values.shape[0])]
    mask = mask.to(torch.uint8)
    return [_digest(values[i], mask[i]) for i in range(values.shape[0])]


class TowerCacheCollator:
    """Wraps a collator and adds the cache keys of every sample (``vision_cache_keys``, ``text_cache_keys``),
    computed where the batch is built (in the ``DataLoader`` workers, on CPU tensors).

    Around a :class:`~m2ist.data.collator.RECCollator`, with ``cache`` set (``RECTrainer`` sets it when it opens its
    cache), a batch of samples that were all batched before, and whose records the cache holds, is built without
    loading, letterboxing or hashing its images: the rest of each sample (token ids, labels, geometry) and its keys
    are remembered from the first time. A sample is recognised by its image (a file's path, size, modification
    time, inode and change time, or a digest of the pixels of an in-memory image), its expression, box and index,
    the view, and the processor's settings; anything else is processed as usual. The batch then has no
    ``pixel_values`` (the cache supplies the towers' features) and its ``pixel_mask`` is drawn again from the image's
    window on the canvas.
    ``skipped_batches`` counts such batches.
    """

    def __init__(self, collator: Callable[[Sequence[Any]], dict[str, Any]], cache: TowerFeatureCache | None = None) -> None:
        self.collator = collator
        self.cache = cache
        self.skipped_batches = 0
        self._remembered: dict[str, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.collator!r})"

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers get a copy without the cache's records
        return {**self.__dict__, "cache": None}

    @on_cpu()  # batches are built on the CPU (the trainer moves them), whatever torch's default device
    def __call__(self, items: Sequence[Any]) -> dict[str, Any]:
        views = self._views(items)
        identities = self._identities(items, views)
        batch = self._remembered_batch(identities)
        if batch is None:
            batch = self._collate(items, views)
            for modality, name in KEY_FIELDS.items():
                batch[name] = cache_keys(batch, modality)
            self._remember(identities, batch)
        return batch

    def _views(self, items: Sequence[Any]) -> list[int | None]:
        """The view of each item's image (none: the image as it is)."""
        return [None] * len(items)

    def _collate(self, items: Sequence[Any], views: list[int | None]) -> dict[str, Any]:
        """The wrapped collator's batch of ``items`` in their ``views``."""
        return self.collator(items)

    # ------------------------------------------------------------------ batches built from what was remembered
    def _identities(self, items: Sequence[Any], views: list[int | None]) -> list[str | None]:
        """One identity per item (``None``: not recognisable cheaply, or the cache is not there to read)."""
        processor = getattr(self.collator, "processor", None)
        if self.cache is None or processor is None or not hasattr(processor, "flat_settings"):
            return [None] * len(items)
        if all(view is None for view in views) and getattr(self.collator, "train", False) \
                and getattr(processor, "augment", None) is not None:
            return [None] * len(items)  # a random augmentation: a batch seen before is new, never rebuilt as it was
        tokenizer = getattr(processor, "tokenizer", None)
        settings = json.dumps([processor.flat_settings(), type(tokenizer).__name__,
                               getattr(tokenizer, "name_or_path", None), len(tokenizer) if tokenizer is not None else 0,
                               getattr(self.collator, "train", None), getattr(self.collator, "return_geometry", None)],
                              sort_keys=True, default=str)
        return [_sample_identity(item, settings, view) for item, view in zip(items, views, strict=True)]

    def _remembered_batch(self, identities: list[str | None]) -> dict[str, Any] | None:
        if self.cache is None or not identities or any(i is None or i not in self._remembered for i in identities):
            return None
        rows = [self._remembered[i] for i in identities]
        if not self.cache.holds_all({modality: [row[name] for row in rows] for modality, name in KEY_FIELDS.items()}):
            return None
        self.skipped_batches += 1
        batch = {key: torch.stack([row[key] for row in rows]) if isinstance(rows[0][key], torch.Tensor)
                 else [row[key] for row in rows] for key in rows[0] if key != _MASK_WINDOW}
        # the pixel mask is the image's window on the canvas (evaluation clamps boxes to it): drawn again
        height, width, dtype = rows[0][_MASK_WINDOW][1]
        mask = torch.zeros((len(rows), height, width), dtype=dtype)
        for sample, row in zip(mask, rows, strict=True):
            y0, y1, x0, x1 = row[_MASK_WINDOW][0]
            sample[y0:y1, x0:x1] = 1
        batch["pixel_mask"] = mask
        return batch

    def _remember(self, identities: list[str | None], batch: Mapping[str, Any]) -> None:
        masks = batch.get("pixel_mask")
        if masks is None or masks.ndim != 3:
            return
        for index, identity in enumerate(identities):
            window = None if identity is None else _window(masks[index])
            if window is None:
                continue
            row = {key: value[index].clone() if isinstance(value, torch.Tensor) else value[index]
                   for key, value in batch.items() if key not in _INPUTS[VISION]}
            row[_MASK_WINDOW] = (window, (masks.shape[1], masks.shape[2], masks.dtype))
            self._remembered[identity] = row


_MASK_WINDOW = "_mask_window"


def _window(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``(y0, y1, x0, x1)`` of the one rectangle a pixel mask marks (the image on its canvas), else ``None``."""
    rows, columns = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
    if len(rows) == 0:
        return None
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1
    if int(mask.count_nonzero()) != (y1 - y0) * (x1 - x0) or not bool((mask[y0:y1, x0:x1] == 1).all()):
        return None
    return y0, y1, x0, x1


def _sample_identity(item: Any, settings: str, view: int | None) -> str | None:
    """A digest of everything a ``RECCollator`` reads from ``item``, or ``None`` for an image whose identity would
    cost as much as processing it (a URL, an unknown type)."""
    get = item.get if isinstance(item, Mapping) else lambda key, default=None: getattr(item, key, default)
    image = get("image")
    h = hashlib.sha256(settings.encode())
    if isinstance(image, str | os.PathLike) and not str(image).startswith(("http://", "https://", "data:")):
        try:
            stat = os.stat(image)
        except OSError:
            return None
        # the size and modification time can both stay as they were while the pixels change (a file rewritten
        # and its time set back, ``cp -p``, ``tar x``, ``rsync -a``; a coarse clock): the inode and the change
        # time, which no tool sets back, tell the file written anew from the one that was batched
        h.update(f"path:{os.path.abspath(image)}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_dev}:{stat.st_ino}:"
                 f"{stat.st_ctime_ns}".encode())
    elif isinstance(image, Image.Image):
        # the RGB pixels the processor reads, not the stored ones: a palette image's colours are in its palette
        # (and its transparency in image.info), which tobytes() leaves out; an RGB image is not converted
        try:
            rgb = load_rec_image(image)
        except Exception:  # not decodable: processed as usual, and the processor says why
            return None
        h.update(f"pil:{rgb.mode}:{rgb.size}".encode())
        h.update(rgb.tobytes())
    elif isinstance(image, np.ndarray | torch.Tensor):
        array = image.detach().cpu().contiguous().numpy() if isinstance(image, torch.Tensor) else np.ascontiguousarray(image)
        h.update(f"array:{array.dtype}:{array.shape}".encode())
        h.update(array)
    else:
        return None
    box = get("box")
    h.update(json.dumps([get("expression"), None if box is None else [float(v) for v in box], get("index"), view],
                        default=str).encode())
    return h.hexdigest()


def _image_content_key(item: Any) -> str:
    """A digest of the content of an item's image, never of its ``image_id`` (ids are per dataset: two merged
    datasets reuse them for other images): a file's bytes (read whole, cheaper than the decoding that follows), an
    array's values, the RGB pixels of any other image (a PIL image, a Hugging Face row), a URL as written."""
    get = item.get if isinstance(item, Mapping) else lambda key, default=None: getattr(item, key, default)
    image = get("image")
    h = hashlib.sha256()
    if isinstance(image, str | os.PathLike):
        text = os.fsdecode(image)
        try:
            if text.startswith(("http://", "https://", "data:")):
                raise OSError
            with open(text, "rb") as f:
                h.update(b"file:")
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError:  # a URL, or a file the processor will fail on and say why
            h.update(f"name:{text}".encode())
    elif isinstance(image, np.ndarray | torch.Tensor):
        array = image.detach().cpu().contiguous().numpy() if isinstance(image, torch.Tensor) else np.ascontiguousarray(image)
        h.update(f"array:{array.dtype}:{array.shape}".encode())
        h.update(array.tobytes())
    else:
        try:
            rgb = load_rec_image(image)
        except Exception:  # not decodable: the processor says why
            h.update(f"undecodable:{_stable_repr(image)}".encode())
        else:
            h.update(f"pil:{rgb.mode}:{rgb.size}".encode())
            h.update(rgb.tobytes())
    return h.hexdigest()


class CachedViewsCollator(TowerCacheCollator):
    """Augmentation that a cache can hold: each image has ``views`` fixed augmentations (view ``v`` of an image is
    drawn from a generator seeded by the augmentation's seed, a digest of the image's content, never its
    ``image_id``, which merged datasets share between other images, and ``v``), and every time an item is
    batched one of its image's views is picked at random, from ``generator`` when set (``RECTrainer`` sets one per
    batch, seeded by the training seed and the batch's number, so a resumed run picks the views the uninterrupted
    one picked), else from ``torch``'s. ``collator`` must be a training ``RECCollator`` whose processor has an
    augmentation."""

    def __init__(self, collator: Any, views: int) -> None:
        super().__init__(collator)
        if not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be a positive integer, got {views!r}.")
        augment = getattr(getattr(collator, "processor", None), "augment", None)
        if augment is None or not getattr(collator, "train", False):
            raise ValueError("CachedViewsCollator needs a training RECCollator whose processor has an augmentation.")
        self.views = views
        #: the generator the views are picked from (None: torch's)
        self.generator: torch.Generator | None = None

    def _views(self, items: Sequence[Any]) -> list[int | None]:
        return [int(torch.randint(self.views, (1,), generator=self.generator).item()) for _ in items]

    def _collate(self, items: Sequence[Any], views: list[int | None]) -> dict[str, Any]:
        augment = self.collator.processor.augment
        parts = []
        for item, view in zip(items, views, strict=True):
            seed = int.from_bytes(hashlib.blake2b(f"{augment.seed}|{_image_content_key(item)}|{view}".encode(),
                                                  digest_size=8).digest(), "little")
            with augment.seeded(seed):  # the same augmentation in the main process and in every worker
                parts.append(self.collator([item]))
        return {key: torch.cat([part[key] for part in parts]) if isinstance(parts[0][key], torch.Tensor)
                else [value for part in parts for value in part[key]] for key in parts[0]}


# ---------------------------------------------------------------------------------------------- fingerprints
def _weights_digest(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


#: Tower config fields that cannot change what the tower computes, left out of the config's digest so that they
#: do not split caches: where it was loaded from, provenance, task label maps, and the dtype (recorded apart).
_INERT_CONFIG_FIELDS = frozenset({
    "_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "architectures", "auto_map",
    "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "task_specific_params",
    "tokenizer_class", "prefix", "dtype", "torch_dtype", "initializer_range", "initializer_factor", "_auto_class",
})


def _config_digest(model: nn.Module) -> str | None:
    """A digest of the tower config's fields that can change its computation (``layer_norm_eps``, ``hidden_act``,
    ``layerscale_value``..., nested configs too), without :data:`_INERT_CONFIG_FIELDS`; ``None`` for a tower without
    a transformers config. The attention implementation is not a field of ``to_dict()``: it changes the features
    by rounding only."""
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return None

    def computing(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): computing(v) for k, v in value.items() if k not in _INERT_CONFIG_FIELDS}
        if isinstance(value, list | tuple):
            return [computing(v) for v in value]
        return value

    text = json.dumps(computing(to_dict()), sort_keys=True, default=_stable_repr)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def fingerprint(tower: Tower, layers: list[int], kinds: list[str], dtype: str, extra: Mapping[str, Any]) -> dict:
    """Everything besides the input that changes what ``tower.tap(inputs, layers, kinds)`` returns. The tower's name
    and commit are not part of it: its class, weights and config are what computes, so a tower copied to another
    folder, or loaded from the Hub cache instead of a path, reads the records of the first."""
    return {
        "format": CACHE_FORMAT,
        "modality": tower.modality,
        "tower_class": type(tower.model).__name__,
        "tower_config": _config_digest(tower.model),
        "tower_weights": _weights_digest(tower.model),
        "tower_dtype": str(tower.dtype).removeprefix("torch."),
        "tap_spec": _stable_repr(tower.spec),
        "layers": list(layers),
        "kinds": list(kinds),
        "cache_dtype": dtype,
        **dict(extra),
    }


def _folder_digest(prints: Mapping[str, Any]) -> str:
    """The digest of a fingerprint that names its folder (``vision-<digest>``)."""
    return hashlib.blake2b(json.dumps(prints, sort_keys=True).encode(), digest_size=8).hexdigest()


def _stable_repr(value: Any) -> str:
    """``repr(value)`` without memory addresses: a tap spec's functions (``<function _none at 0x7f...>``) would
    otherwise give every process another fingerprint, and so another folder: nothing stored would be read again."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


# ---------------------------------------------------------------------------------------------- storage
@dataclass
class _Layout:
    """How one tower's features for one sample lie in a flat row: ``(name, shape)`` per field, in order."""

    fields: list[tuple[str, tuple[int, ...]]]

    @classmethod
    def of(cls, features: TowerFeatures, layers: list[int], kinds: list[str]) -> _Layout:
        fields = [("tokens", tuple(features.tokens.shape[1:])), ("mask", tuple(features.mask.shape[1:])),
                  ("seed", tuple(features.seed.shape[1:]))]
        for kind in kinds:
            fields += [(f"{kind}.{layer}", tuple(t.shape[1:])) for layer, t in zip(layers, features.taps[kind], strict=True)]
        return cls(fields)

    @property
    def width(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.fields)

    def pack(self, features: TowerFeatures, kinds: list[str]) -> torch.Tensor:
        """``(B, width)`` float32 rows."""
        tensors = [features.tokens, features.mask.float(), features.seed]
        for kind in kinds:
            tensors += list(features.taps[kind])
        return torch.cat([t.float().flatten(1) for t in tensors], dim=1)

    @cached_property
    def spans(self) -> list[tuple[int, int]]:
        """Each field's ``(start, end)`` columns in a row."""
        ends = np.cumsum([int(np.prod(shape)) for _, shape in self.fields]).tolist()
        return list(zip([0, *ends[:-1]], ends, strict=True))

    def unpack(self, columns: list[torch.Tensor], kinds: list[str], layers: list[int]) -> TowerFeatures:
        """The features from each field's ``(B, end - start)`` contiguous columns (a store's ``read``), shaped as
        the tower returns them. Contiguous matters: a strided view of whole rows would send the side network's
        matrix products to other kernels, which round differently (the demo's float32-cached run then drifted from
        the uncached one; with contiguous fields it does not)."""
        parts = [part.view(part.shape[0], *shape) for part, (_, shape) in zip(columns, self.fields, strict=True)]
        taps, rest = {}, parts[3:]
        for kind in kinds:
            taps[kind], rest = rest[: len(layers)], rest[len(layers):]
        return TowerFeatures(tokens=parts[0], mask=parts[1] > 0.5, seed=parts[2], taps=taps)


class _MemoryStore:
    """Rows in a growing RAM tensor."""

    def __init__(self, width: int, dtype: torch.dtype, capacity: int) -> None:
        self.rows = torch.empty((max(capacity, 1), width), dtype=dtype)
        self.index: dict[str, int] = {}

    def get(self, keys: list[str]) -> list[int | None]:
        return [self.index.get(key) for key in keys]

    def read(self, rows: list[int], spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Each span's columns of ``rows``, float32 and contiguous: one gather per field, no copy of whole rows."""
        index = torch.tensor(rows)
        return [torch.index_select(self.rows[:, start:end], 0, index).float() for start, end in spans]

    def add(self, keys: list[str], values: torch.Tensor) -> None:
        for key, value in zip(keys, values, strict=True):
            if key in self.index:
                continue
            row = len(self.index)
            if row >= self.rows.shape[0]:
                grown = torch.empty((2 * self.rows.shape[0], self.rows.shape[1]), dtype=self.rows.dtype)
                grown[:row] = self.rows[:row]
                self.rows = grown
            self.rows[row] = value.to(self.rows.dtype)
            self.index[key] = row

    def __len__(self) -> int:
        return len(self.index)


class _Shard:
    """One rank's memory-mapped rows (``rows.<rank>.bin``) and its append-only index (``index.<rank>.txt``:
    ``<key> <row> <crc32>`` lines, each written after its row is flushed). The CRC32 of a row's bytes is on the line
    that makes the row visible, so it is durable no later than the row is read; it is checked the first time this
    process reads a row it did not write itself (:meth:`intact`)."""

    def __init__(self, folder: Path, rank: int, width: int, dtype: str, writable: bool) -> None:
        self.data_path, self.index_path = folder / f"rows.{rank}.bin", folder / f"index.{rank}.txt"
        self.width, self.dtype, self.writable = width, dtype, writable
        self.storage = _NUMPY_STORAGE[dtype]
        self.itemsize = np.dtype(self.storage).itemsize
        self.index: dict[str, int] = {}
        #: each key's CRC32 as its index line gives it (``None``: the line has none, so the row cannot be trusted)
        self.crcs: dict[str, int | None] = {}
        #: keys whose rows this process wrote, or found to match their CRC32: never checked again
        self.verified: set[str] = set()
        #: how many rows this process has checked
        self.checks = 0
        self.next_row = 0
        self._index_size = 0
        self.array: np.memmap | None = None
        #: ``(device, inode)`` of the rows file :attr:`array` maps (None: none mapped yet)
        self._mapped: tuple[int, int] | None = None
        if writable:
            self._repair_index()
        self.refresh()

    def reserve(self, rows: int) -> None:
        """Grow the rows file to ``rows`` up front, its blocks allocated (see :func:`_allocate`); else it grows on
        writes."""
        if rows:
            self._ensure(max(rows, self.next_row))

    def _repair_index(self) -> None:
        """Cut a torn last line (a crash while appending) so the next append starts on a fresh line."""
        if self.index_path.exists():
            data = self.index_path.read_bytes()
            cut = data.rfind(b"\n") + 1
            if cut != len(data):
                with open(self.index_path, "r+b") as f:
                    f.truncate(cut)

    def refresh(self) -> None:
        """Read index lines added since the last call (another rank's shard grows while we train). A row is indexed
        only once it is in the data file (its writer grows the file, writes and flushes the row, then appends the
        line), so an index that names rows past the file's end means the file was truncated, replaced or deleted:
        that is reported, never read as zeros."""
        if not self.index_path.exists():
            return
        with open(self.index_path, "rb") as f:
            f.seek(self._index_size)
            data = f.read()
        end = data.rfind(b"\n") + 1
        found: dict[str, int] = {}
        crcs: dict[str, int | None] = {}
        for line in data[:end].decode("ascii", "replace").splitlines():
            parts = line.split()
            if len(parts) in (2, 3) and len(parts[0]) == 32 and parts[1].isdigit():
                found[parts[0]] = int(parts[1])
                crcs[parts[0]] = int(parts[2], 16) if len(parts) == 3 and _CRC.fullmatch(parts[2]) else None
        if found:
            self._check_covers(max(found.values()) + 1)
        self._index_size += end
        self.index.update(found)
        self.crcs.update(crcs)
        self.verified.difference_update(found)  # a key written again (its row was damaged): check the new row
        self.next_row = max([self.next_row, *(row + 1 for row in found.values())])

    def intact(self, key: str) -> bool:
        """Whether ``key``'s row holds the bytes its index line's CRC32 was taken of: checked once per process,
        never for rows this process wrote."""
        if key in self.verified:
            return True
        row = self.index[key]
        self._check_covers(row + 1)
        self._ensure(row + 1)
        self.checks += 1
        expected = self.crcs.get(key)
        if expected is None or zlib.crc32(self.array[row]) != expected:
            return False
        self.verified.add(key)
        return True

    def forget(self, key: str) -> None:
        """Drop ``key`` (its row is damaged): it is a miss from now on, and computed and stored again."""
        del self.index[key]
        self.crcs.pop(key, None)
        self.verified.discard(key)

    def _rows_in_file(self) -> int:
        return os.path.getsize(self.data_path) // (self.width * self.itemsize) if self.data_path.exists() else 0

    def _check_covers(self, rows: int) -> None:
        self._check_mapped()
        held = self._rows_in_file()
        if rows > held:
            raise ValueError(f"The tower cache in {self.data_path.parent} is damaged: {self.index_path.name} names row "
                             f"{rows - 1} but {self.data_path.name} holds {held} rows (truncated or deleted?). "
                             "Delete that folder (the run refills it) or set tower_cache='off'.")

    def _check_mapped(self) -> None:
        """Refuse to go on with a rows file that is no longer the one mapped: deleted, or replaced by another file,
        while this process uses it (its rows, checked once, are never checked again); and, for the shard this
        process writes, one cut below what it mapped (a memory-mapped write past a file's end is a SIGBUS). Growing
        a new file there would give the rows this process wrote as zeros, and read them as features."""
        if self._mapped is None:
            return
        try:
            stat = os.stat(self.data_path)
        except FileNotFoundError:
            stat = None
        if stat is None or (stat.st_dev, stat.st_ino) != self._mapped:
            raise ValueError(f"The tower cache in {self.data_path.parent} is damaged: {self.data_path.name} was "
                             f"{'deleted' if stat is None else 'replaced by another file'} while this run used it "
                             "(another run or a clean-up deleting the folder, or a copy over it?). Start the run again "
                             "(it refills what is missing) with a folder nothing else deletes, or set tower_cache='off'.")
        row_bytes = self.width * self.itemsize
        if self.writable and self.array is not None and stat.st_size // row_bytes < self.array.shape[0]:
            raise ValueError(f"The tower cache in {self.data_path.parent} is damaged: {self.data_path.name} holds "
                             f"{stat.st_size // row_bytes} rows but this run reserved {self.array.shape[0]} (truncated "
                             "while in use?). Delete that folder (the run refills it) or set tower_cache='off'.")

    def _ensure(self, rows: int) -> None:
        have = self.array.shape[0] if self.array is not None else 0
        if rows <= have:
            return
        self._check_mapped()  # never grow a new file in place of the one whose rows this process holds
        row_bytes = self.width * self.itemsize
        existing = os.path.getsize(self.data_path) // row_bytes if self.data_path.exists() else 0
        capacity = existing
        if self.writable and rows > existing:  # grow (never shrink: other processes may have written further)
            capacity = max(rows, 2 * have)
            _allocate(self.data_path, existing * row_bytes, capacity * row_bytes)
        self.array = np.memmap(self.data_path, dtype=self.storage, mode="r+" if self.writable else "r",
                               shape=(capacity, self.width))
        stat = os.stat(self.data_path)
        self._mapped = (stat.st_dev, stat.st_ino)

    def read(self, rows: list[int]) -> torch.Tensor:
        self._check_covers(max(rows) + 1)  # the file may have been cut since the index was read
        self._ensure(max(rows) + 1)
        values = np.ascontiguousarray(self.array[rows])
        if self.dtype == "bfloat16":
            return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(values).float()

    def add(self, keys: list[str], values: torch.Tensor) -> None:
        fresh = [(key, value) for key, value in zip(keys, values, strict=True) if key not in self.index]
        if not fresh:
            return
        first = self.next_row
        self._ensure(first + len(fresh))
        self._check_mapped()  # the file is still the one mapped, and whole: a write past its end is a SIGBUS
        block = torch.stack([value for _, value in fresh]).to(DTYPES[self.dtype]).cpu().contiguous()
        stored = block.view(torch.int16).numpy().view(np.uint16) if self.dtype == "bfloat16" else block.numpy()
        # the checksum goes on the index line, written (and synced) after the row: a reader sees both or neither
        crcs = [zlib.crc32(row) for row in stored]
        lines = "".join(f"{key} {first + i} {crc:08x}\n"
                        for i, ((key, _), crc) in enumerate(zip(fresh, crcs, strict=True)))
        indexed = os.path.getsize(self.index_path) if self.index_path.exists() else 0
        try:
            self.array[first: first + len(fresh)] = stored
            self.array.flush()
            with open(self.index_path, "a", encoding="ascii") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:  # the disk filled, went read-only or failed, or the folder went, mid-run
            # lines half written would name rows this process writes over next: none of them stays
            with contextlib.suppress(OSError), open(self.index_path, "r+b") as f:
                f.truncate(indexed)
            raise _io_error(err, self.data_path.parent, f"record rows in {self.index_path.name}") from None
        for i, (key, _) in enumerate(fresh):
            self.index[key], self.crcs[key] = first + i, crcs[i]
            self.verified.add(key)  # written by this process: read back without a check
        self.next_row = first + len(fresh)


def _io_error(err: OSError, folder: Path, what: str) -> OSError:
    """``err`` (the disk full, read-only, failing, or the folder gone) as an error naming the cache folder, what it
    could not do, and what to do: the raw ``OSError`` names a file and nothing else."""
    code = err.errno or 0
    return type(err)(code, f"The tower cache in {folder} could not {what} ({os.strerror(code) if code else err}): "
                           "free some space, give tower_cache another folder on a writable disk, or set "
                           "tower_cache='memory' or 'off'. The records written so far stay valid.")


#: A CRC32 on an index line: 8 hex digits.
_CRC = re.compile(r"[0-9a-f]{8}")


def _allocate(path: Path, start: int, end: int) -> None:
    """Grow ``path`` from ``start`` to ``end`` bytes with the disk blocks allocated now, so a full disk is an error
    here, naming the folder, and never a SIGBUS later when a memory-mapped write finds no block behind its page.
    Where the filesystem cannot allocate ahead, the file grows sparse (the space check up front still applies)."""
    try:
        f = open(path, "ab")  # noqa: SIM115 (closed below)
    except OSError as err:  # the disk gone read-only, or the folder deleted, mid-run
        raise _io_error(err, path.parent, f"grow {path.name}") from None
    with f:
        try:
            os.posix_fallocate(f.fileno(), start, end - start)
            return
        except AttributeError:  # no posix_fallocate on this platform
            pass
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                with contextlib.suppress(OSError):  # this writer owns the shard: give back what the call took
                    f.truncate(start)
                raise OSError(err.errno, f"The tower cache in {path.parent} could not grow {path.name} to "
                                         f"{_size(end)} ({os.strerror(err.errno)}): free some space, give tower_cache "
                                         "another folder, use tower_cache_dtype='bfloat16', or set tower_cache='off'."
                              ) from None
        try:
            f.truncate(end)
        except OSError as err:
            raise _io_error(err, path.parent, f"grow {path.name} to {_size(end)}") from None


class _RamShard:
    """The rows a run adds to a folder it cannot write, kept in RAM (a shard's interface)."""

    def __init__(self, width: int, dtype: str) -> None:
        self.store = _MemoryStore(width, DTYPES[dtype], 1)

    @property
    def index(self) -> dict[str, int]:
        return self.store.index

    def reserve(self, rows: int) -> None:
        """Nothing to reserve: RAM grows as records are added."""

    def read(self, rows: list[int]) -> torch.Tensor:
        return torch.index_select(self.store.rows, 0, torch.tensor(rows)).float()

    def add(self, keys: list[str], values: torch.Tensor) -> None:
        self.store.add(keys, values)


class _DiskStore:
    """This writer's shard (read and written) and the other shards (read), in one folder.

    A shard has one writer at a time: it holds an exclusive lock on ``lock.<shard>`` while the cache is open
    (released when it closes or its process dies). Rank ``r`` writes shard ``r``; a second writer finding it
    locked (another run on the same folder, e.g. a sweep sharing ``tower_cache=PATH``) takes the next free shard
    instead of writing over the first one's rows. Without ``fcntl`` (Windows) shards are not locked."""

    REFRESH_SECONDS = 10.0

    def __init__(self, folder: Path, width: int, dtype: str, rank: int, writable: bool = True) -> None:
        self.folder, self.width, self.dtype = folder, width, dtype
        self.rank: int | None = self._claim_shard(rank) if writable else None
        # a folder this process cannot write (a shared cache others filled, on a read-only mount): its shards are
        # read, and the records this run adds are kept in RAM
        self.own: _Shard | _RamShard = _Shard(folder, self.rank, width, dtype, writable=True) if writable else \
            _RamShard(width, dtype)
        self.others: dict[int, _Shard] = {}
        #: rows found damaged (not matching their CRC32) in this process
        self.damaged = 0
        self._last_refresh = 0.0
        self._refresh_others(force=True)

    def _claim_shard(self, rank: int) -> int:
        """Lock and return the shard this writer owns: ``rank`` if free, else the first free one above all shards
        in the folder."""
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            return rank
        taken = [int(p.name.split(".")[1]) for p in self.folder.glob("index.*.txt") if p.name.split(".")[1].isdigit()]
        candidates = itertools.chain([rank], itertools.count(max([rank, *taken]) + 1))
        for shard in candidates:
            files = (self.folder / f"index.{shard}.txt", self.folder / f"rows.{shard}.bin")
            if any(path.exists() and not os.access(path, os.W_OK) for path in files):
                continue  # another user's shard: read, never written
            try:
                descriptor = os.open(self.folder / f"lock.{shard}", os.O_RDWR | os.O_CREAT, 0o644)
            except PermissionError:
                continue
            except OSError as err:  # a full disk (no inode left) or a failing one
                raise _io_error(err, self.folder, f"create lock.{shard}") from None
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                continue
            except OSError as err:  # ENOLCK: a network filesystem without locks; unlocked, two writers collide
                os.close(descriptor)
                raise _io_error(err, self.folder, f"lock lock.{shard} (a network filesystem without locks? give "
                                                  "tower_cache a local folder)") from None
            weakref.finalize(self, os.close, descriptor)
            if shard != rank:
                logger.info("Shard %d of the tower cache in %s is in use by another run: writing shard %d.", rank,
                            self.folder, shard)
            return shard
        raise AssertionError("unreachable")

    def _refresh_others(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_refresh < self.REFRESH_SECONDS:
            return
        self._last_refresh = time.monotonic()
        for path in self.folder.glob("index.*.txt"):
            rank = int(path.name.split(".")[1]) if path.name.split(".")[1].isdigit() else None
            if rank is None or rank == self.rank:
                continue
            if rank not in self.others:
                self.others[rank] = _Shard(self.folder, rank, self.width, self.dtype, writable=False)
            else:
                self.others[rank].refresh()

    def _find(self, key: str) -> tuple[_Shard, int] | None:
        if key in self.own.index and self._intact(self.own, key):
            return self.own, self.own.index[key]
        for shard in self.others.values():
            if key in shard.index and self._intact(shard, key):
                return shard, shard.index[key]
        return None

    def _intact(self, shard: _Shard | _RamShard, key: str) -> bool:
        """Whether ``key``'s row in ``shard`` can be read: a row whose bytes do not match their CRC32 (changed on
        disk: bit rot, a partial overwrite, a copy cut short and padded) is reported once and forgotten, so it is a
        miss, computed again and stored in this writer's shard; it is never read as features."""
        if not isinstance(shard, _Shard) or shard.intact(key):
            return True
        row = shard.index[key]
        shard.forget(key)
        self.damaged += 1
        logger.warning("Row %d of %s in the tower cache does not match its checksum (damaged on disk): its features "
                       "are computed again, never read from it; %d damaged row%s in %s so far. If more follow, delete "
                       "that folder (the run refills it) or set tower_cache='off'.", row, shard.data_path, self.damaged,
                       "" if self.damaged == 1 else "s", self.folder)
        return False

    def get(self, keys: list[str]) -> list[tuple[_Shard, int] | None]:
        found = [self._find(key) for key in keys]
        if any(f is None for f in found):
            self._refresh_others()
            found = [f or self._find(key) for f, key in zip(found, keys, strict=True)]
        return found

    def read(self, locations: list[tuple[_Shard, int]], spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Each span's columns of the rows at ``locations``, in order, float32 and contiguous: one read per shard."""
        groups: dict[int, tuple[_Shard, list[int], list[int]]] = {}
        for position, (shard, row) in enumerate(locations):
            _, rows, positions = groups.setdefault(id(shard), (shard, [], []))
            rows.append(row)
            positions.append(position)
        out = torch.empty((len(locations), self.width), dtype=torch.float32)
        for shard, rows, positions in groups.values():
            out[positions] = shard.read(rows)
        return [out[:, start:end].contiguous() for start, end in spans]

    def add(self, keys: list[str], values: torch.Tensor) -> None:
        self.own.add(keys, values)

    def __len__(self) -> int:
        return len(set(self.own.index).union(*(shard.index for shard in self.others.values())))


# ---------------------------------------------------------------------------------------------- the cache
class _TowerRecords:
    """One tower's records: its fingerprint folder, layout and store."""

    def __init__(self, tower: Tower, prints: dict, name: str, layers: list[int], kinds: list[str], layout: _Layout,
                 dtype: str, location: Path | None, capacity: int, rank: int) -> None:
        self.tower, self.layers, self.kinds, self.layout, self.dtype = tower, layers, kinds, layout, dtype
        self.fingerprint = prints
        self.folder = None if location is None else location / name
        self.hits = self.misses = 0
        self.capacity = capacity
        self.writable = True
        if self.folder is None:
            self.store: _MemoryStore | _DiskStore = _MemoryStore(layout.width, DTYPES[dtype], capacity)
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(err.errno, f"The tower cache folder {self.folder} cannot be created ({os.strerror(err.errno or 0)}"
                                     "): give tower_cache a folder you can write, 'memory', or 'off'.") from None
        self.writable = os.access(self.folder, os.W_OK | os.X_OK)
        manifest = {"fingerprint": self.fingerprint, "layout": [[n, list(s)] for n, s in layout.fields],
                    "row_width": layout.width}
        path = self.folder / "manifest.json"
        if not self.writable and not path.is_file():
            raise PermissionError(f"The tower cache folder {self.folder} cannot be written (read-only or not yours) "
                                  "and holds no records for these towers: give tower_cache a folder you can write, "
                                  "'memory', or 'off'.")
        if path.exists():
            try:
                recorded = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"The tower cache in {self.folder} is damaged: {path.name} does not parse ({err}). "
                                 "Delete that folder (the run refills it) or set tower_cache='off'.") from None
            if not isinstance(recorded, dict) or recorded.get("layout") != manifest["layout"] \
                    or recorded.get("fingerprint") != self.fingerprint:
                raise ValueError(f"The tower cache in {self.folder} was written with another layout; delete that folder.")
        else:
            try:
                atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2), encoding="utf-8"))
            except OSError as err:  # a full disk: the manifest is the folder's first write
                raise _io_error(err, self.folder, f"write {path.name}") from None
        # rows reserved by reserve(), once checked
        self.store = _DiskStore(self.folder, layout.width, dtype, rank, writable=self.writable)
        if not self.writable:
            logger.warning("The tower cache in %s cannot be written (read-only or not yours): its %d records are read, "
                           "and the features it lacks are computed and kept in RAM for this run.", self.folder,
                           len(self.store))

    def stored_bytes(self) -> int:
        """Disk space the folder's rows already take (allocated blocks, an earlier run's reservation included)."""
        if self.folder is None or not self.writable:
            return 0
        return sum(path.stat().st_blocks * 512 for path in self.folder.glob("rows.*.bin"))

    def reservation(self, world_size: int = 1) -> int:
        """The rows this writer's shard should hold before filling: the rows it holds, plus its share of the expected
        records (``capacity``) that no shard of the folder holds yet: ``1 / world_size`` of them, as each rank of a
        distributed run computes the records of the samples it is given. Records another shard holds (an earlier
        run's, another rank's, another run's on a shared folder) are read from there, never stored again, so they
        take no space here. 0 for RAM and for a folder this process cannot write."""
        if not isinstance(self.store, _DiskStore) or not isinstance(self.store.own, _Shard):
            return 0
        missing = max(0, self.capacity - len(self.store))
        return self.store.own.next_row + -(-missing // max(1, world_size))

    def bytes_to_reserve(self, world_size: int = 1) -> int:
        """Disk space :meth:`reserve` takes beyond what this writer's rows file holds already."""
        if not isinstance(self.store, _DiskStore) or not isinstance(self.store.own, _Shard):
            return 0
        return max(0, self.reservation(world_size) - self.store.own._rows_in_file()) * self.bytes_per_record

    def reserve(self, world_size: int = 1) -> None:
        """Reserve this writer's rows (see :meth:`reservation`) in its shard, their disk blocks allocated now."""
        if isinstance(self.store, _DiskStore):
            self.store.own.reserve(self.reservation(world_size))

    @property
    def bytes_per_record(self) -> int:
        return self.layout.width * torch.finfo(DTYPES[self.dtype]).bits // 8

    def features(self, batch: Mapping[str, Any], keys: list[str]) -> TowerFeatures:
        found = self.store.get(keys)
        missing = [i for i, f in enumerate(found) if f is None]
        if not missing:
            self.hits += len(keys)
            return self.layout.unpack(self.store.read(found, self.layout.spans), self.kinds, self.layers)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        first, second = _INPUTS[self.tower.modality]
        if first not in batch:
            where = "the in-memory cache replaced" if self.folder is None else f"the cache folder {self.folder} changed"
            raise RuntimeError(f"The batch was built without its {first} because the tower cache held its records, but "
                               f"{len(missing)} of them are missing now: was {where} during the run? Start the run "
                               "again (a damaged cache folder can be deleted).")
        # the towers run on the missing inputs only (once each), then the whole batch is read back, so every epoch,
        # the first one too, sees the stored features. A batch of hits reads rows computed in other batches anyway,
        # so running the whole batch here would buy no exactness: float32 records equal what the tower computes in
        # any batch wherever it computes each sample independently of the others (the CPU kernels tested do)
        unique = list({keys[i]: i for i in missing}.values())
        _refuse_training_mode(self.tower)  # on a miss only: what is read back was computed under this check
        rows = torch.tensor(unique, device=batch[first].device)
        mask = batch.get(second)
        computed = self.tower.tap({first: batch[first][rows], second: None if mask is None else mask[rows]},
                                  self.layers, self.kinds)
        rounded = self.layout.pack(computed, self.kinds).to(DTYPES[self.dtype])
        # a record is written once and read every epoch after: a NaN stored would never go away. A sum is NaN or
        # infinite when any value is (and, rarely, when finite values overflow it): only then are the real tokens
        # looked at, to say where (padding may be). 20 times cheaper on a CPU than isfinite().all() over every value
        if not torch.isfinite(rounded.sum(dtype=torch.float32)):
            where = non_finite_features(computed, self.layers)
            if where:
                raise ValueError(f"The frozen {self.tower.modality} tower computed NaN or infinite features "
                                 f"({', '.join(where[:3])}) at batch positions {unique[:8]}: a float16 tower (or "
                                 "fp16 mixed precision) overflowing, or NaN weights in the tower. Run the tower in "
                                 "bfloat16 or float32, or reload it. Nothing was cached.")
            if self.dtype == "float16":
                raise ValueError(f"The {self.tower.modality} tower's features exceed float16's range (±65504): use "
                                 "tower_cache_dtype='bfloat16' or 'float32'. Nothing was cached.")
        self.store.add([keys[i] for i in unique], rounded.cpu())
        return self.layout.unpack(self.store.read(self.store.get(keys), self.layout.spans), self.kinds, self.layers)


def _refuse_training_mode(tower: Tower) -> None:
    """Refuse to store features that :meth:`Tower.tap` would compute with a sub-module in ``train()`` mode: its
    dropout draw (or its batch norm's batch statistics) would be stored once and read back every epoch, one random
    draw frozen for good. (A tower put in ``train()`` whole is tapped in ``eval()``: only a part of it put in
    ``train()``, e.g. its dropout modules for Monte-Carlo dropout, gets here.)"""
    name = tower.training_submodule()
    if name is None:
        return
    raise ValueError(f"The frozen {tower.modality} tower has modules in train() mode (e.g. {name!r}) although the "
                     "tower itself is in eval(): their dropout or batch norm draws at random, so the tower cache would "
                     "store one random draw of its features and read it back every epoch. Put the tower back in "
                     f"eval() (model.{tower.modality}_model.eval()), or set tower_cache='off'. Nothing was cached.")


class TowerFeatureCache:
    """The features a :class:`~m2ist.model.SideTunedModel`'s active adapter reads from its frozen towers, stored
    per input and read back instead of running the towers.

    Args:
        model: the model; its active adapter's layers and tap kinds are cached.
        location: ``None`` for RAM, or a folder (memory-mapped files in per-fingerprint subfolders).
        dtype: ``"bfloat16"`` (default), ``"float16"`` or ``"float32"`` (exact: training gives the same weights as
            without the cache).
        expected_images: how many image records (images × views) the run should store, for the size estimate.
        expected_texts: how many expression records.
        rank: this process's rank (each rank writes its own shard of a folder cache).
        world_size: the number of processes filling the cache together: each reserves (and asks free space for) its
            share of the expected records the folder does not hold yet, not all of them.
        check_space: refuse a folder cache that the disk cannot hold.
    """

    def __init__(self, model: SideTunedModel, location: str | os.PathLike | None = None, dtype: str = "bfloat16",
                 expected_images: int = 0, expected_texts: int = 0, rank: int = 0, world_size: int = 1,
                 check_space: bool = True) -> None:
        if not isinstance(model, SideTunedModel):
            raise TypeError(f"The tower cache needs frozen towers (a SideTunedModel), got {type(model).__name__}: the "
                            "baselines train their towers, so their features change every step.")
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"dtype must be one of {CACHE_DTYPES}, got {dtype!r}.")
        check_flags("TowerFeatureCache", check_space=check_space)
        self.model, self.dtype = model, dtype
        self.location = None if location is None else Path(location).expanduser()
        if self.location is not None:
            _check_location(self.location)
        self.adapter = model.active_adapter
        self._expected = {VISION: expected_images, TEXT: expected_texts}
        self._rank, self._world_size, self._check_space = rank, max(1, int(world_size)), check_space
        #: every tower state's records opened so far, by folder name (a state seen again reuses its records)
        self._opened: dict[str, _TowerRecords] = {}
        self._state: tuple | None = None
        self._open()

    @on_cpu()  # the records live on the CPU and the probe's inputs are drawn there, whatever torch's default device
    def _open(self) -> None:
        """Open the records of the towers' and the adapter's current state (see :meth:`_follow_towers`)."""
        model = self.model
        for modality, tower in ((VISION, model.vision_tower), (TEXT, model.text_tower)):
            if any(p.requires_grad for p in tower.model.parameters()):
                raise ValueError(f"The {modality} tower has parameters that require grad: a trained tower's features "
                                 "change every step, which no cache can hold. Freeze it (tower.requires_grad_(False)) "
                                 "or set tower_cache='off'.")
        setup = model.adapter_setups[self.adapter]
        self.vision_layers, self.text_layers, self.kinds = setup.vision_layers, setup.text_layers, setup.tap_kinds
        vision_inputs, text_inputs = _dummy_inputs(model.config, model.vision_model, model.text_model)
        probe = {VISION: model.vision_tower.tap(vision_inputs, self.vision_layers, self.kinds),
                 TEXT: model.text_tower.tap(text_inputs, self.text_layers, self.kinds)}
        layouts = {VISION: _Layout.of(probe[VISION], self.vision_layers, self.kinds),
                   TEXT: _Layout.of(probe[TEXT], self.text_layers, self.kinds)}
        size = {VISION: {"image_size": model.config.image_size}, TEXT: {"max_query_len": model.config.max_query_len}}
        for modality in size:  # token counts given there change the features, yet not the spec's repr (a lambda's)
            override = getattr(model.config, f"{modality}_taps", None)
            if override:
                size[modality]["taps_override"] = json.loads(json.dumps(override, sort_keys=True, default=str))
        itemsize = torch.finfo(DTYPES[self.dtype]).bits // 8
        self.estimate = {modality: self._expected[modality] * layouts[modality].width * itemsize for modality in layouts}
        records, fresh = {}, []
        towers = ((VISION, model.vision_tower, self.vision_layers), (TEXT, model.text_tower, self.text_layers))
        prints = {modality: fingerprint(tower, layers, self.kinds, self.dtype, size[modality])
                  for modality, tower, layers in towers}
        names = {modality: f"{modality}-{_folder_digest(prints[modality])}" for modality in prints}
        if self.location is None and self._check_space:  # before the rows are allocated
            self._check_memory(sum(self.estimate[m] for m, name in names.items() if name not in self._opened))
        for modality, tower, layers in towers:
            name = names[modality]
            if name not in self._opened:
                self._opened[name] = _TowerRecords(tower, prints[modality], name, layers, self.kinds, layouts[modality],
                                                   self.dtype, self.location, self._expected[modality], self._rank)
                fresh.append(self._opened[name])
            records[modality] = self._opened[name]
        on_disk = [r for r in fresh if r.writable]  # a read-only folder's new records go to RAM
        if self.location is not None and self._check_space and on_disk:  # what earlier runs stored needs no new space
            needed = sum(r.bytes_to_reserve(self._world_size) for r in on_disk)
            free = shutil.disk_usage(self.location).free
            if needed > 0.95 * free:
                for name in [name for name, r in self._opened.items() if r in fresh]:
                    del self._opened[name]
                raise ValueError(f"The tower cache needs about {_size(needed)} more at {self.location} but only "
                                 f"{_size(free)} is free: free some space, give tower_cache another folder, use "
                                 "tower_cache_dtype='bfloat16', or set tower_cache='off'.")
        for fresh_records in fresh:
            fresh_records.reserve(self._world_size)
        self.records = records
        self._state = self._tower_state()

    def _check_memory(self, needed: int) -> None:
        """Refuse an in-memory cache whose records, in every process of this machine, RAM cannot hold: it fills
        for the whole run and would end it hours in, killed for memory without a word of why."""
        processes = _local_processes()
        available = _available_memory()
        if available is None or needed * processes <= 0.9 * available:
            return
        each = f" ({processes} processes on this machine, each with its own)" if processes > 1 else ""
        raise ValueError(f"The in-memory tower cache needs up to {_size(needed * processes)}{each} but only "
                         f"{_size(available)} of RAM is available: use tower_cache='disk' or a folder (memory-mapped "
                         "files), tower_cache_dtype='bfloat16', or set tower_cache='off'.")

    def _tower_state(self) -> tuple:
        """What identifies the towers' current weights, cheaply (no hashing): each tower object, and each of its
        tensors' dtype, storage, in-place version (a cast, a move or a ``load_state_dict`` changes them) and
        ``requires_grad``; and the layers and tap kinds of the cached adapter."""
        model = self.model
        setup = model.adapter_setups.get(self.adapter)
        state: list[Any] = [None if setup is None else (tuple(setup.vision_layers), tuple(setup.text_layers),
                                                        tuple(setup.tap_kinds))]
        for tower in (model.vision_tower, model.text_tower):
            tensors = itertools.chain(tower.model.parameters(), tower.model.buffers())
            state.append((id(tower), id(tower.model), model.tower_ids.get(tower.modality),
                          tuple((t.dtype, t.data_ptr(), t._version, t.requires_grad) for t in tensors)))
        return tuple(state)

    def _follow_towers(self) -> None:
        """Keep the records those of the towers as they are now: after ``set_backbone_dtype``, weights loaded into
        a tower, or another set of layers for the cached adapter, the features of an input change, so they are
        read from (and stored in) the records of the new fingerprint, never from the old one's, nor stored there."""
        if self._state == self._tower_state() or self.adapter not in self.model.adapter_setups:
            return
        before = dict(self.records)
        self._open()
        for modality, records in self.records.items():
            if records is not before[modality]:
                changed = sorted(key for key in records.fingerprint
                                 if records.fingerprint[key] != before[modality].fingerprint.get(key))
                where = "RAM" if records.folder is None else str(records.folder)
                logger.warning("The %s tower or the adapter's taps changed since the tower cache was opened (%s): "
                               "its features are cached in %s from now on.", modality, ", ".join(changed), where)

    def describe(self) -> str:
        """One line: where the cache is, bytes per record, the size estimate, and what other cache folders in the
        same place take (written for other towers, layers or dtypes; nothing deletes them but you)."""
        where = "RAM" if self.location is None else str(self.location)
        line = (f"tower cache ({self.dtype}, {where}): {_size(self.bytes_per_image)} per image view, "
                f"{_size(self.bytes_per_expression)} per expression; up to {_size(self.estimate[VISION])} for images + "
                f"{_size(self.estimate[TEXT])} for expressions")
        others = self.other_folders()
        if others:
            held = sum(_disk_bytes(folder) for folder in others)
            line += (f"; {len(others)} other cache folder{'s' if len(others) > 1 else ''} there "
                     f"({', '.join(folder.name for folder in others[:3])}{', ...' if len(others) > 3 else ''}) hold "
                     f"{_size(held)} for other towers, layers or dtypes: delete those no run needs")
        return line

    def other_folders(self) -> list[Path]:
        """The cache folders at the same location that this cache does not use (sorted by name)."""
        if self.location is None or not self.location.is_dir():
            return []
        ours = {records.folder for records in self._opened.values()}
        return sorted(path for path in self.location.iterdir()
                      if path.is_dir() and path not in ours and path.name.startswith((f"{VISION}-", f"{TEXT}-"))
                      and (path / "manifest.json").is_file())

    @property
    def bytes_per_image(self) -> int:
        """Bytes stored per image (view): seed, tapped layers, final tokens and mask of the vision tower."""
        return self.records[VISION].bytes_per_record

    @property
    def bytes_per_expression(self) -> int:
        """Bytes stored per expression (the text tower's)."""
        return self.records[TEXT].bytes_per_record

    @property
    def stats(self) -> dict[str, int]:
        """Hits and misses per tower (since the cache was opened, whatever the towers' changes), the records
        stored for the towers as they are now, and the disk rows found damaged (and computed again) so far."""
        stats = {}
        for modality, current in self.records.items():
            opened = [r for r in self._opened.values() if r.tower.modality == modality]
            stats.update({f"{modality}_hits": sum(r.hits for r in opened), f"{modality}_misses": sum(r.misses for r in opened),
                          f"{modality}_records": len(current.store),
                          f"{modality}_damaged": sum(getattr(r.store, "damaged", 0) for r in opened)})
        return stats

    def holds(self, modality: str, keys: Sequence[str]) -> bool:
        """Whether the cache has the records of all ``keys`` of ``modality`` (``"vision"`` or ``"text"``) for the
        towers as they are now and the active adapter (another adapter active: ``False``)."""
        return self.holds_all({modality: keys})

    def holds_all(self, keys: Mapping[str, Sequence[str]]) -> bool:
        """:meth:`holds` for several modalities at once (``{modality: keys}``), the towers' state looked at once."""
        if self.model.active_adapter != self.adapter:
            return False
        self._follow_towers()
        return all(found is not None for modality, wanted in keys.items()
                   for found in self.records[modality].store.get(list(wanted)))

    @on_cpu()  # records are read and grown on the CPU, then moved to the model's device
    def features(self, batch: Mapping[str, Any]) -> TowerFeatureSet:
        """The batch's tower features, read from the cache or computed (and stored) on a miss. ``batch`` holds the
        model inputs and the keys of :class:`TowerCacheCollator`."""
        if self.model.active_adapter != self.adapter:
            raise ValueError(f"This tower cache was built for adapter {self.adapter!r} but {self.model.active_adapter!r} "
                             "is active; build a cache for it.")
        self._follow_towers()
        device = self.model.device
        out = {}
        for modality, records in self.records.items():
            keys = batch.get(KEY_FIELDS[modality])
            if keys is None:
                raise ValueError(f"The batch has no {KEY_FIELDS[modality]!r}: wrap the collator in TowerCacheCollator.")
            features = records.features(batch, list(keys))
            out[modality] = TowerFeatures(
                tokens=features.tokens.to(device), mask=features.mask.to(device), seed=features.seed.to(device),
                taps={kind: [t.to(device) for t in taps] for kind, taps in features.taps.items()})
        return TowerFeatureSet(out[VISION], out[TEXT], self.vision_layers, self.text_layers)


def _check_location(location: Path) -> None:
    """Refuse a cache location that no folder can be made at, saying why (``mkdir`` says "File exists" or "Not a
    directory" about the fingerprint's subfolder): the location, or the nearest of its parents that exists, is a file,
    or a link to nothing."""
    for path in (location, *location.parents):
        if path.is_symlink() and not path.exists():
            raise FileNotFoundError(errno.ENOENT, f"The tower cache location {location}: {path} is a link to "
                                                  f"{os.readlink(path)}, which does not exist. Create that folder, or "
                                                  "give tower_cache another folder, 'memory', or 'off'.")
        if path.exists():
            if not path.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"The tower cache location {location}: {path} is a file, not "
                                                        "a folder. Give tower_cache a folder, 'memory', or 'off'.")
            return


def _local_processes() -> int:
    """How many processes of the run share this machine (``torchrun``'s ``LOCAL_WORLD_SIZE``; 1 without it)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    except ValueError:
        return 1


def _available_memory() -> int | None:
    """Bytes of RAM that processes can still take (``MemAvailable``, within a container's cgroup limit); ``None``
    where the system does not say."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:  # a container's limit (cgroup v2): the machine's free memory is not the container's
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            for line in Path("/sys/fs/cgroup/memory.stat").read_text().splitlines():
                if line.startswith("inactive_file "):  # page cache the kernel gives back: not taken
                    used -= int(line.split()[1])
            room = max(0, int(limit) - used)
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available


def _disk_bytes(folder: Path) -> int:
    """Disk space the files of ``folder`` take (allocated blocks)."""
    return sum(path.stat().st_blocks * 512 for path in folder.iterdir() if path.is_file())


def _size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TB"


def expected_records(dataset: Any, views: int = 1) -> tuple[int, int]:
    """Upper bounds of the image records (unique images × views) and expression records (unique expressions, × 2
    with views for a flip that rewrites left / right) a dataset can fill; its length when items are opaque."""
    samples = getattr(dataset, "samples", dataset)
    if isinstance(samples, Sequence) and samples and hasattr(samples[0], "expression"):
        # an image_id with the file it names: ids are per dataset, and merged datasets reuse them for other files
        images = {(getattr(s, "image_id", None), os.fspath(s.image)) if isinstance(s.image, str | os.PathLike)
                  else getattr(s, "image_id", None) or id(s) for s in samples}
        texts = {s.expression for s in samples}
        return len(images) * max(views, 1), len(texts) * (2 if views > 1 else 1)
    try:
        length = len(dataset)
    except TypeError:
        return 0, 0
    return length * max(views, 1), length * (2 if views > 1 else 1)

