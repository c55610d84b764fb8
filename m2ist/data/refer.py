"""Loader for the ``refer`` toolkit layout (RefCOCO, RefCOCO+, RefCOCOg, RefClef).

Layout: ``<root>/<dataset>/refs(<split_by>).p`` (a pickle, often written by Python 2) and
``<root>/<dataset>/instances.json`` (COCO style, ``bbox`` = ``[x, y, w, h]`` pixels). One ref is one object with
one or more sentences; the loader returns one :class:`RECSample` per sentence.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from m2ist.config import check_flags
from m2ist.data.loaders import (
    annotated_size,
    boxes_to_xyxy,
    check_sentence_field,
    expressions_of,
    format_hint,
    image_name_of,
    index_unique,
    join_image_path,
    match_splits,
    normalize_split_request,
    parse_box,
    read_text_file,
    repair_mojibake,
    sniff_format,
    warn_without_expression,
)
from m2ist.data.safe_pickle import restricted_load
from m2ist.data.sample import RECSample

__all__ = ["DEFAULT_SPLIT_BY", "load_refer"]

#: The standard partition of each dataset (RefCOCO/+ UNC, RefCOCOg UMD).
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "unc"}
_COCO_IMAGE_DIR = Path("images") / "mscoco" / "images" / "train2014"
_REFCLEF_IMAGE_DIR = Path("images") / "saiapr_tc-12"


def _refuse_repeated_refs(refs: list[dict[str, Any]], refs_path: Path) -> None:
    """Refuse two refs with one ``ref_id``: the refer toolkit indexes refs by id (``Refs[ref_id]``, the later one
    kept), so such a file is damaged or two refs files merged; read as it is, the ref's sentences were loaded
    twice, in two splits when the copies name different ones (the same object trained on and scored)."""
    first: dict[Any, int] = {}
    for position, ref in enumerate(refs):
        ref_id = ref.get("ref_id")
        try:
            earlier = first.setdefault(ref_id, position)
        except TypeError:  # an unhashable id (a list): no duplicate can be told, and nothing keys on it
            continue
        if ref_id is not None and earlier != position:
            splits = {refs[earlier].get("split"), ref.get("split")}
            where = (f"in the splits {refs[earlier].get('split')!r} and {ref.get('split')!r}" if len(splits) > 1
                     else f"both in the split {ref.get('split')!r}")
            raise ValueError(f"{refs_path}: refs {earlier} and {position} both have ref_id {ref_id!r} ({where}); a "
                             "ref_id names one ref (the refer toolkit keeps only the last), so the file is damaged or "
                             "two refs files were merged: its sentences would be loaded twice. Use the refs file as "
                             "downloaded, or remove one of them.")


def load_refer(
    root: str | PathLike[str],
    dataset: str = "refcoco",
    split_by: str | None = None,
    split: str | Sequence[str] | None = None,
    image_root: str | PathLike[str] | None = None,
    *,
    sentence_field: str = "sent",
    allow_outside_image_root: bool = False,
) -> list[RECSample]:
    """Load a ``refer``-layout dataset as one :class:`RECSample` per sentence.

    Args:
        root: the ``refer`` data folder holding ``<dataset>/refs(<split_by>).p`` and ``<dataset>/instances.json``.
        dataset: ``refcoco``, ``refcoco+``, ``refcocog`` or ``refclef`` (the sub-folder name).
        split_by: ``unc``, ``google``, ``umd``...; defaults to :data:`DEFAULT_SPLIT_BY` for the dataset.
        split: one split (``train``, ``val``, ``testA``, ``testB``, ``test``; case-insensitive), a list of them,
            or ``None``/``"all"`` for every split.
        image_root: the folder holding the images named by ``instances.json`` ``images[].file_name`` (COCO
            ``train2014`` for RefCOCO*). Defaults to the ``refer`` toolkit's own place:
            ``<root>/images/mscoco/images/train2014`` (``<root>/images/saiapr_tc-12`` for refclef).
        sentence_field: which sentence text to use: ``sent`` (the normalised lower-case form the benchmarks
            and TransVG split files use), ``raw`` (as typed by the annotator) or ``tokens`` (the word list joined
            by spaces). Any other name is refused.
        allow_outside_image_root: accept ``file_name`` values that lead outside ``image_root``.

    Returns:
        Samples with ``box`` in ``xyxy`` pixels (converted from the annotation's ``xywh``), ``image_id`` the COCO
        image id and ``metadata`` holding ``dataset``, ``split_by``, ``split``, ``ref_id``, ``ann_id``,
        ``sent_id`` and ``category_id``.
    """
    check_flags("load_refer", allow_outside_image_root=allow_outside_image_root)
    check_sentence_field(sentence_field)
    dataset_dir = Path(root) / dataset
    if not dataset_dir.is_dir():
        present = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
        hint = format_hint(root, "refer") if Path(root).exists() else ""
        if sniff_format(root) == "refer-dataset":  # the dataset folder itself was given as the root
            hint = (f" {root} is itself a dataset folder (it holds refs(<split_by>).p): pass its parent "
                    f"{Path(root).resolve().parent} as the root and dataset={Path(root).resolve().name!r}.")
        raise FileNotFoundError(
            f"No folder {dataset_dir} for dataset {dataset!r}; {root} holds {present or 'nothing'}. "
            f"Expected the refer layout <root>/<dataset>/refs(<split_by>).p + instances.json.{hint}"
        )
    if split_by is None:
        if dataset not in DEFAULT_SPLIT_BY:
            raise ValueError(f"No default split_by for dataset {dataset!r}; pass split_by (e.g. 'unc').")
        split_by = DEFAULT_SPLIT_BY[dataset]
    refs_path = dataset_dir / f"refs({split_by}).p"
    if not refs_path.is_file():
        present = sorted(p.name for p in dataset_dir.glob("refs(*).p"))
        raise FileNotFoundError(f"No {refs_path.name} in {dataset_dir}; present refs files: {present or 'none'}.")
    instances_path = dataset_dir / "instances.json"
    if not instances_path.is_file():
        raise FileNotFoundError(f"No instances.json in {dataset_dir} (the COCO-style boxes and image names).")

    if not refs_path.is_file():
        raise ValueError(f"{refs_path} is not a regular file.")
    try:
        refs = restricted_load(refs_path)
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            MemoryError, OverflowError) as err:
        if isinstance(err, pickle.UnpicklingError) and "Refused" in str(err):
            raise
        what = "empty" if refs_path.stat().st_size == 0 else "truncated or not a pickle"
        hint = format_hint(refs_path, "refer")
        raise ValueError(f"{refs_path} is {what} ({type(err).__name__}: {err}); "
                         f"{'it is another format.' + hint if hint else 'download it again.'}") from None
    if not isinstance(refs, list):
        raise ValueError(f"{refs_path} should hold a list of ref dicts, found {type(refs).__name__}."
                         f"{format_hint(refs_path, 'refer')}")
    for position, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise ValueError(f"{refs_path} ref {position}: expected a dict (ref_id, ann_id, image_id, sentences, "
                             f"split), found {type(ref).__name__} {ref!r:.60}.")
    _refuse_repeated_refs(refs, refs_path)
    try:
        instances = json.loads(read_text_file(instances_path, "instances.json", reading="refer"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{instances_path}:{err.lineno}: not valid JSON ({err.msg})."
                         f"{format_hint(instances_path, 'refer')}") from err
    if not isinstance(instances, dict):
        raise ValueError(f"{instances_path} should hold a JSON object with 'images' and 'annotations'."
                         f"{format_hint(instances_path, 'refer')}")
    for key, needed in (("annotations", ("id", "bbox")), ("images", ("id", "file_name"))):
        entries = instances.get(key, [])
        if not isinstance(entries, list):
            raise ValueError(f"{instances_path}: '{key}' should be a list.")
        for position, entry in enumerate(entries):
            missing = [name for name in needed if not isinstance(entry, dict) or name not in entry]
            if missing:
                raise ValueError(f"{instances_path} {key}[{position}]: no {' and no '.join(map(repr, missing))}.")
    anns = index_unique(instances.get("annotations", []), "id", where=f"{instances_path} annotations")
    images = index_unique(instances.get("images", []), "id", where=f"{instances_path} images")

    requested = normalize_split_request(split)
    wanted = None
    if requested is not None:
        unnamed = [ref for ref in refs if ref.get("split") is None]
        if unnamed:  # str(None) matches no split: the ref would be left out without a word
            named = sorted({str(ref["split"]) for ref in refs if ref.get("split") is not None})
            raise ValueError(f"{refs_path} ref_id={unnamed[0].get('ref_id')}: no 'split' ({len(unnamed)} ref(s) lack "
                             f"one; the others name {named}), so split={split!r} cannot place it; the refs file may be "
                             "damaged: download it again, or load with split=None.")
        wanted = match_splits(requested, {str(ref.get("split")) for ref in refs}, source=str(refs_path))

    if image_root is None:
        image_root = Path(root) / (_REFCLEF_IMAGE_DIR if dataset == "refclef" else _COCO_IMAGE_DIR)

    rows: list[tuple[str, str, Any, dict[str, Any], tuple[int, int] | None]] = []
    raw_boxes = []
    speechless: list[str] = []  # refs whose 'sentences' is an empty list
    for ref in refs:
        if wanted is not None and str(ref.get("split")) not in wanted:
            continue
        where = f"{refs_path} ref_id={ref.get('ref_id')}"
        ann_id, image_id = ref.get("ann_id"), ref.get("image_id")
        try:
            ann, image = anns.get(ann_id), images.get(image_id)
        except TypeError:  # an id that is a list or a dict
            ann = image = None
        if ann is None:
            raise ValueError(f"{where}: ann_id {ann_id!r} is not in {instances_path}.")
        if image is None:
            raise ValueError(f"{where}: image_id {image_id!r} is not in {instances_path}.")
        if "image_id" in ann and ann["image_id"] != image_id:
            raise ValueError(
                f"{where}: the ref is on image {image_id!r} but its annotation {ann_id!r} is on image "
                f"{ann['image_id']!r} in {instances_path}: the refs file and instances.json come from different "
                "datasets (or versions). Use the instances.json shipped with this refs file."
            )
        box = parse_box(ann["bbox"], where=where)
        image_path = join_image_path(image_name_of(image["file_name"], where=where), image_root,
                                     allow_outside_image_root=allow_outside_image_root, where=where)
        size = annotated_size(image, where=f"{instances_path} image {image_id!r}")
        if ref.get("sentences") is None:
            raise ValueError(f"{where}: the ref has no 'sentences' (a list of sentence dicts); the refs file may be "
                             "damaged, download it again.")
        sent_ids = ref.get("sent_ids") or []
        expressions = expressions_of(ref["sentences"], sentence_field=sentence_field, where=where)
        if not expressions:
            speechless.append(where)
        for position, (text, sentence) in enumerate(expressions):
            text = repair_mojibake(text)
            sent_id = sentence.get("sent_id") if isinstance(sentence, dict) else None
            if sent_id is None and position < len(sent_ids):
                sent_id = sent_ids[position]
            metadata = {
                "dataset": dataset,
                "split_by": split_by,
                "split": ref.get("split"),
                "ref_id": ref.get("ref_id"),
                "ann_id": ann_id,
                "sent_id": sent_id,
                "category_id": ref.get("category_id"),
            }
            rows.append((image_path, text, image_id, metadata, size))
            raw_boxes.append(box)
    warn_without_expression(speechless, what="ref(s)", field="'sentences'", stacklevel=2)
    boxes = boxes_to_xyxy(raw_boxes, "xywh")
    return [
        RECSample(image=image, expression=text, box=box, image_id=image_id, metadata=metadata, annotated_size=size)
        for (image, text, image_id, metadata, size), box in zip(rows, boxes)
    ]
