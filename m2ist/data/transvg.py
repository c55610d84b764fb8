"""Loader for TransVG-family split files ``<split_root>/<ds>/<ds>_<split>.pth``.

Each file is a ``torch.save``'d list of tuples whose layout and box convention depend on the dataset:

=====================================  ==============================================  ==============
dataset (``ds``)                       row                                             box
=====================================  ==============================================  ==============
``unc``, ``unc+``, ``gref``,           ``(img_file, mask_file, bbox, phrase, attri)``  ``xywh`` pixels
``gref_umd``
``referit``                            ``(img_file, mask_file, bbox, phrase, attri)``  ``xyxy`` pixels
``flickr``                             ``(img_file, bbox, phrase)``                    ``xyxy`` pixels
=====================================  ==============================================  ==============

Image roots used by TransVG: COCO ``train2014`` (unc, unc+, gref, gref_umd), ``referit/images``,
``Flickr30k/flickr30k_images``.
"""

from __future__ import annotations

import contextlib
import glob
import pickle
import zipfile
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2ist.config import check_flags
from m2ist.data.loaders import (
    boxes_to_xyxy,
    canonical_split,
    format_hint,
    image_name_of,
    join_image_path,
    parse_box,
)
from m2ist.data.sample import RECSample

__all__ = ["TRANSVG_DATASETS", "load_transvg_split"]

#: dataset -> (row length, box format of the stored bbox)
TRANSVG_DATASETS: dict[str, tuple[int, str]] = {
    "unc": (5, "xywh"),
    "unc+": (5, "xywh"),
    "gref": (5, "xywh"),
    "gref_umd": (5, "xywh"),
    "referit": (5, "xyxy"),
    "flickr": (3, "xyxy"),
}


def _numpy_safe_globals() -> list[Any]:
    """numpy names needed to rebuild plain numeric arrays/scalars (numpy 1.x and 2.x spellings)."""
    core = getattr(np, "_core", None) or np.core
    multiarray = core.multiarray
    names: list[Any] = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    names += [
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
        (multiarray.scalar, "numpy._core.multiarray.scalar"),
    ]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 rebuilds a dtype through its DType class
    if dtypes is not None:
        names += [value for name, value in vars(dtypes).items() if name.endswith("DType") and isinstance(value, type)]
    return names


def _resolve_file(path: Path, dataset: str | None, split: str | None) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        if dataset is None or split is None:
            raise ValueError(f"{path} is a folder: pass dataset= and split= to pick <root>/<ds>/<ds>_<split>.pth, or the file.")
        for candidate in (path / dataset / f"{dataset}_{split}.pth", path / f"{dataset}_{split}.pth"):
            if candidate.is_file():
                return candidate
        for folder in (path / dataset, path):  # another spelling of the split: testa for testA, validation for val
            spelled = [file for file in sorted(folder.glob(f"{glob.escape(dataset)}_*.pth"))
                       if canonical_split(file.stem[len(dataset) + 1:]) == canonical_split(split)]
            if spelled:
                return spelled[0]
        present = sorted(str(p.relative_to(path)) for p in path.rglob("*.pth"))[:20]
        raise FileNotFoundError(
            f"No {dataset}_{split}.pth under {path} (looked in {path / dataset} and {path}); found: {present or 'none'}."
        )
    raise FileNotFoundError(f"TransVG split file not found: {path}")


def _infer_dataset_and_split(file: Path) -> tuple[str | None, str | None]:
    stem = file.stem
    if "_" not in stem:
        return None, None
    dataset, split = stem.rsplit("_", 1)
    return dataset, split


def _layout(dataset: str) -> str:
    row_length, box_format = TRANSVG_DATASETS[dataset]
    row = "(img_file, bbox, phrase)" if row_length == 3 else "(img_file, mask_file, bbox, phrase, attri)"
    return f"rows {row} with {box_format} boxes"


def _check_named_dataset(file: Path, dataset: str, named: str | None) -> None:
    """Refuse ``dataset=`` when the file's own name says another dataset whose boxes are stored another way (a
    ``referit_test.pth`` read as ``unc`` would turn every ``xyxy`` box into a wrong ``xywh`` one, without an error:
    both have 5-tuple rows). Rows of another length are refused row by row already."""
    if named is None or named == dataset or named not in TRANSVG_DATASETS:
        return
    (named_length, named_format), (length, box_format) = TRANSVG_DATASETS[named], TRANSVG_DATASETS[dataset]
    if named_length == length and named_format != box_format:
        raise ValueError(
            f"{file} is named as a {named!r} split file ({_layout(named)}), but dataset={dataset!r} reads "
            f"{_layout(dataset)}: every box would be misread. Pass dataset={named!r} (or leave it out), or rename the "
            f"file if it really holds {dataset!r} rows."
        )


def _check_named_split(file: Path, split: str | None, named_dataset: str | None, named: str | None) -> None:
    """Refuse ``split=`` when the file's own name (``<ds>_<split>.pth`` of a TransVG dataset) says another split: every
    sample would carry the wrong ``metadata["split"]`` (``unc_val.pth`` read as ``testA``). Other spellings of one
    split (``testa``, ``validation``) agree."""
    if split is None or named is None or named_dataset not in TRANSVG_DATASETS:
        return
    if canonical_split(split) != canonical_split(named):
        raise ValueError(
            f"{file} is the {named!r} split file by its name, but split={split!r} was passed: its samples would be "
            f"labelled {split!r}. Pass split={named!r} (or leave split out), or load {named_dataset}_{split}.pth for the "
            f"{split!r} split."
        )


def _load_rows(file: Path, *, trusted: bool) -> Any:
    if not file.is_file():
        raise ValueError(f"{file} is not a regular file.")
    if not zipfile.is_zipfile(file) and file.stat().st_size and file.read_bytes()[:1] != b"\x80":
        raise ValueError(f"{file} is not a torch.save file (neither a zip archive nor a pickle): corrupted, or "
                         f"another format.{format_hint(file, 'transvg')}")
    try:
        return _torch_load(file, trusted=trusted)
    except (EOFError, RuntimeError, zipfile.BadZipFile) as err:
        what = "empty" if file.stat().st_size == 0 else "truncated or corrupted"
        hint = format_hint(file, "transvg")
        raise ValueError(f"{file} is {what} ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                         f"{'it is another format.' + hint if hint else 'download it again.'}") from None


def _torch_load(file: Path, *, trusted: bool) -> Any:
    if trusted:
        return torch.load(file, map_location="cpu", weights_only=False)
    try:
        allow_numpy = (
            torch.serialization.safe_globals(_numpy_safe_globals())
            if hasattr(torch.serialization, "safe_globals")  # torch >= 2.5
            else contextlib.nullcontext()
        )
        with allow_numpy:
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0].split(" Please use")[0]
        if "global" not in reason.lower() and "unsupported" not in reason.lower():
            hint = format_hint(file, "transvg")
            raise ValueError(f"{file} is not a readable torch.save file ({reason}): "
                             f"{'another format.' + hint if hint else 'truncated or corrupted.'}") from None
        raise pickle.UnpicklingError(
            f"{file} cannot be read with torch.load(weights_only=True): it needs unrestricted unpickling, which "
            f"can run code from the file ({reason}). If you trust the file, either pass trusted=True, or convert it "
            "once: rows = torch.load(path, weights_only=False); torch.save([tuple(x.tolist() if hasattr(x, "
            "'tolist') else x for x in row) for row in rows], new_path) and load new_path."
        ) from err


def load_transvg_split(
    path: str | PathLike[str],
    dataset: str | None = None,
    image_root: str | PathLike[str] | None = None,
    *,
    split: str | None = None,
    trusted: bool = False,
    allow_outside_image_root: bool = False,
) -> list[RECSample]:
    """Load a TransVG-family split file as one :class:`RECSample` per row.

    Args:
        path: the ``<ds>_<split>.pth`` file, or the split root folder (then give ``dataset`` and ``split``; the
            file is looked up as ``<path>/<ds>/<ds>_<split>.pth`` or ``<path>/<ds>_<split>.pth``).
        dataset: ``unc``, ``unc+``, ``gref``, ``gref_umd``, ``referit`` or ``flickr``; it fixes the row layout
            and the box convention (see the module docstring). Inferred from the file name when omitted.
        image_root: the folder the rows' image file names are relative to; ``None`` keeps them as stored.
        split: the split name when ``path`` is a folder (``train``, ``val``, ``testA``, ...). With a file it is
            the split the samples are labelled with; a ``<ds>_<split>.pth`` file naming another split is refused.
        trusted: load with unrestricted unpickling. Only for files you trust: a pickle can run code. By default
            the file is read with ``torch.load(weights_only=True)`` (numeric numpy arrays allowed) and a file that
            needs more is refused with an explanation.
        allow_outside_image_root: accept image file names that lead outside ``image_root``.

    Returns:
        Samples with ``box`` in ``xyxy`` pixels, ``image_id`` the image file name and ``metadata`` holding
        ``dataset``, ``split``, ``row`` and (5-tuples) ``mask_file``.
    """
    check_flags("load_transvg_split", trusted=trusted, allow_outside_image_root=allow_outside_image_root)
    file = _resolve_file(Path(path), dataset, split)
    inferred_dataset, inferred_split = _infer_dataset_and_split(file)
    dataset = dataset or inferred_dataset
    if dataset not in TRANSVG_DATASETS:
        raise ValueError(
            f"Unknown TransVG dataset {dataset!r} for {file}; pass dataset= one of {sorted(TRANSVG_DATASETS)} "
            f"(it decides the row layout and whether boxes are xywh or xyxy).{format_hint(file, 'transvg')}"
        )
    row_length, box_format = TRANSVG_DATASETS[dataset]
    _check_named_dataset(file, dataset, inferred_dataset)
    _check_named_split(file, split, inferred_dataset, inferred_split)
    split = split or inferred_split
    rows = _load_rows(file, trusted=trusted)
    if not isinstance(rows, list | tuple):
        raise ValueError(f"{file} should hold a list of tuples, found {type(rows).__name__}."
                         f"{format_hint(file, 'transvg')}")

    images, texts, raw_boxes, metadatas = [], [], [], []
    for index, row in enumerate(rows):
        where = f"{file} row {index}"
        if not isinstance(row, list | tuple) or len(row) != row_length:
            layout = "(img_file, bbox, phrase)" if row_length == 3 else "(img_file, mask_file, bbox, phrase, attri)"
            found = f"{len(row)} fields" if isinstance(row, list | tuple) else type(row).__name__
            hint = format_hint(file, "transvg") if isinstance(row, dict) else ""
            raise ValueError(f"{where}: dataset {dataset!r} rows are {layout}, found {found}. "
                             f"{hint.strip() if hint else 'Is dataset= right for this file?'}")
        metadata: dict[str, Any] = {"dataset": dataset, "split": split, "row": index}
        if row_length == 3:
            image_file, box, phrase = row
        else:
            image_file, mask_file, box, phrase, _attributes = row
            metadata["mask_file"] = mask_file
        if not isinstance(phrase, str):
            raise ValueError(f"{where}: the phrase should be a string, found {phrase!r}.")
        images.append(join_image_path(image_name_of(image_file, where=where), image_root,
                                      allow_outside_image_root=allow_outside_image_root, where=where))
        texts.append(phrase)
        raw_boxes.append(parse_box(box, where=where))
        metadatas.append(metadata)
    boxes = boxes_to_xyxy(raw_boxes, box_format)
    return [
        RECSample(image=image, expression=text, box=box, image_id=Path(image).name, metadata=metadata)
        for image, text, box, metadata in zip(images, texts, boxes, metadatas)
    ]
