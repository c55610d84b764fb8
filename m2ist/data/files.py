"""Loaders for a user's own REC files: JSONL, CSV and COCO-style JSON.

Every file states its box convention through ``box_format`` (``xyxy`` | ``xywh`` | ``cxcywh``, in pixels; with
``normalized=True`` the numbers are fractions of the image width/height). Relative image paths are resolved
against ``image_root``, or against the annotation file's own folder when no root is given.

Accepted keys / columns: the image in ``image`` (or ``image_path``, ``file_name``, ``img_path``), the expression in
``text`` (or ``expression``, ``phrase``, ``sentence``, ``caption``; a list gives one sample per item), the box in
``bbox`` (or ``box``; CSV may instead use four columns named after the format, e.g. ``x0,y0,x1,y1``). Optional:
``image_id``, ``width``/``height`` (whole pixels, used for ``normalized`` boxes instead of reading the image
header; not when they are the box's own CSV columns). Other keys are kept in ``metadata``.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from m2ist.config import check_flags
from m2ist.data.images import image_size
from m2ist.data.loaders import (
    BOX_KEYS,
    IMAGE_KEYS,
    TEXT_KEYS,
    Box,
    annotated_size,
    boxes_to_xyxy,
    check_box_format,
    check_fractions,
    expressions_of,
    first_key,
    format_hint,
    image_name_of,
    index_unique,
    join_image_path,
    match_splits,
    near_miss_hint,
    normalize_split_request,
    other_texts,
    parse_box,
    read_text_file,
    refuse_duplicate_keys,
    warn_other_texts,
    warn_without_expression,
)
from m2ist.data.sample import RECSample

__all__ = ["load_coco_style", "load_csv", "load_jsonl"]

_CSV_BOX_COLUMNS = {
    "xyxy": (("x0", "y0", "x1", "y1"), ("xmin", "ymin", "xmax", "ymax")),
    "xywh": (("x", "y", "w", "h"), ("x", "y", "width", "height")),
    "cxcywh": (("cx", "cy", "w", "h"), ("cx", "cy", "width", "height")),
}


class _SampleBuilder:
    """Collects samples whose boxes are converted together at the end (one tensor op, not one per row)."""

    def __init__(self, *, box_format: str, normalized: bool) -> None:
        self.box_format = box_format
        self.normalized = normalized
        Size = tuple[int, int] | None
        self.pending: list[tuple[str, str, Any, dict[str, Any], Box, Size, Size]] = []
        self.wheres: list[str] = []  # where each pending box was read, for errors
        self._size_cache: dict[str, tuple[int, int]] = {}

    def add(
        self,
        *,
        image: str,
        texts: list[str],
        box: Box,
        image_id: Any,
        metadata: dict[str, Any],
        size: tuple[int, int] | None = None,
        where: str = "",
    ) -> None:
        annotated = size  # RECDataset checks it against the image file (downscaled copies, swapped files)
        if self.normalized:
            check_fractions([box], [where])  # before reading the image's size
        if self.normalized and size is None:
            if image not in self._size_cache:
                self._size_cache[image] = image_size(image)
            size = self._size_cache[image]
        for text in texts:
            self.pending.append((image, text, image_id, dict(metadata), box, size, annotated))
            self.wheres.append(where)

    def build(self) -> list[RECSample]:
        self._warn_duplicates()
        sizes = [entry[5] for entry in self.pending] if self.normalized else None
        boxes = boxes_to_xyxy([entry[4] for entry in self.pending], self.box_format, image_sizes=sizes,
                              wheres=self.wheres)
        return [
            RECSample(image=image, expression=text, box=box, image_id=image_id, metadata=metadata,
                      annotated_size=annotated)
            for (image, text, image_id, metadata, _, _, annotated), box in zip(self.pending, boxes)
        ]


    def _warn_duplicates(self) -> None:
        """One warning counting the samples that repeat an earlier one (same image, expression and box): a record
        written twice (two exports concatenated) weighs twice in training and counts twice in every score."""
        first: dict[tuple[Any, ...], str] = {}
        repeats: list[tuple[str, str]] = []
        for (image, text, _, _, box, _, _), where in zip(self.pending, self.wheres):
            key = (image, text, box)
            if key in first:
                repeats.append((where, first[key]))
            else:
                first[key] = where
        if repeats:
            where, original = repeats[0]
            warnings.warn(f"{len(repeats)} of {len(self.pending)} samples repeat an earlier one (same image, "
                          f"expression and box; first {where}, a copy of {original}): they weigh twice in training "
                          "and count twice in scores. Remove the repeated records.", stacklevel=4)


def _size_from(record: dict[str, Any], *, where: str, box_keys: tuple[str, ...] = ()) -> tuple[int, int] | None:
    """The image size a record states (see :func:`m2ist.data.loaders.annotated_size`)."""
    return annotated_size(record, where=where, box_keys=box_keys)


def _split_selection(found: list[tuple[str, Any]], split: str | Sequence[str] | None, *,
                     source: str, stacklevel: int = 3, split_optional: bool = False) -> set[str] | None:
    """The split values to keep (``None``: every record), from ``found`` = ``(where, split value or None)`` per record.

    With ``split=None`` a file whose records name several splits warns: all of them are loaded as one set (a
    train+val file used for training would train on the evaluation rows). A ``split`` asked of a file whose records
    name none, or of which some records name none, is refused."""
    values = sorted({str(value) for _, value in found if value is not None})
    requested = normalize_split_request(split)
    if requested is None:
        if split is None and len(values) > 1:
            warnings.warn(
                f"{source} holds records of the splits {values} (their 'split' field) and all {len(found)} are loaded "
                "as one set: training on it trains on the evaluation rows too. Pass split= (e.g. split='train') to "
                "load one of them, or split='all' to load every split without this warning.",
                stacklevel=stacklevel,
            )
        return None
    if not values and split_optional:  # a file of one split: loaded whole
        return None
    if not values:
        raise ValueError(f"{source}: split={split!r} selects records by their 'split' field, but no record has one; "
                         "pass split=None (the whole file is one split) or add a 'split' field to every record.")
    unnamed = [where for where, value in found if value is None]
    if unnamed:
        raise ValueError(f"{unnamed[0]}: no 'split' field, while other records name theirs ({values}) and split="
                         f"{split!r} selects by it; give every record a 'split'.")
    return match_splits(requested, values, source=source)


def _refuse_misnamed_split(records: Iterable[tuple[str, Any]]) -> None:
    """Refuse records (``(where, record)``) none of which has a ``split`` field but some of which spell it otherwise
    (``Split``, ``split ``): the field would be ignored, and every record read as one split whatever split is asked
    for (``--eval-file val=FILE`` scored the training rows too)."""
    records = [(where, record) for where, record in records if isinstance(record, dict)]
    if any("split" in record for _, record in records):
        return
    for where, record in records:
        hint = near_miss_hint(record, ("split",))
        if hint:
            raise ValueError(f"{where}: no 'split' field, so every record would be read as one split, whatever split "
                             f"is asked for.{hint}")


def _add_records(
    builder: _SampleBuilder,
    records: Iterable[tuple[str, dict[str, Any]]],
    *,
    image_root: Path,
    read_box: Any,
    allow_outside_image_root: bool = True,
    split: str | Sequence[str] | None = None,
    source: str = "",
    split_optional: bool = False,
    hint: Callable[[], str] = str,
) -> None:
    """Add one sample per expression of ``records`` (``(where, record)``) to ``builder``; ``hint()`` is added to the
    error for a record without an image or text key (the file may be another format, see :func:`format_hint`)."""
    records = list(records)
    if not records:  # refused here, where the cause is known ("No valid samples among 0" later would not say)
        raise ValueError(f"{source or 'The file'} holds no records (an empty file, or a CSV header alone): check the "
                         "path, or write one record per expression.")
    for where, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object with image, text and bbox; got {record!r:.80}.")
    _refuse_misnamed_split(records)
    wanted = _split_selection([(where, record.get("split")) for where, record in records], split, source=source,
                              stacklevel=4, split_optional=split_optional)
    speechless: list[str] = []  # records whose text field lists no expression
    unread: list[tuple[str, str, list[str]]] = []  # records with other texts than the one read
    for where, record in records:
        if wanted is not None and str(record.get("split")) not in wanted:
            continue
        text_key, image_key = first_key(record, TEXT_KEYS), first_key(record, IMAGE_KEYS)
        if text_key is None or image_key is None:
            raise ValueError(
                f"{where}: needs an image key (one of {list(IMAGE_KEYS)}) and a text key (one of {list(TEXT_KEYS)}); "
                f"found {sorted(record)}.{near_miss_hint(record, (*IMAGE_KEYS, *TEXT_KEYS)) or hint()}"
            )
        if others := other_texts(record, text_key):
            unread.append((where, text_key, others))
        box, box_keys = read_box(record, where)
        name = image_name_of(record[image_key], where=where)
        image = join_image_path(name, image_root, allow_outside_image_root=allow_outside_image_root, where=where)
        texts = [text for text, _ in expressions_of(record[text_key], sentence_field="sent", where=where)]
        if not texts:
            speechless.append(where)
        used = {text_key, image_key, "image_id", *box_keys}
        metadata = {key: value for key, value in record.items() if key not in used}
        metadata["source"] = where
        builder.add(
            image=image,
            texts=texts,
            box=box,
            image_id=record.get("image_id", Path(name).name),
            metadata=metadata,
            size=_size_from(record, where=where, box_keys=box_keys),
            where=where,
        )
    warn_without_expression(speechless, stacklevel=4)
    warn_other_texts(unread, fix=_RENAME_TEXT, stacklevel=3)


#: How a file that holds its referring expression under a later text key than another text is fixed.
_RENAME_TEXT = ("if another key holds it, name that key 'text' (or remove the other keys); a file's other keys stay "
                "in each sample's metadata.")


def _read_box_key(record: dict[str, Any], where: str) -> tuple[Box, tuple[str, ...]]:
    key = first_key(record, BOX_KEYS)
    if key is None:
        raise ValueError(f"{where}: no box; expected a key among {list(BOX_KEYS)}.{near_miss_hint(record, BOX_KEYS)}")
    return parse_box(record[key], where=where), (key,)


def load_jsonl(
    path: str | PathLike[str],
    box_format: str,
    image_root: str | PathLike[str] | None = None,
    *,
    normalized: bool = False,
    allow_outside_image_root: bool = False,
    split: str | Sequence[str] | None = None,
    split_optional: bool = False,
) -> list[RECSample]:
    """Load a JSON-lines file: one object per line with ``image``, ``text`` and ``bbox`` (see module docstring).

    With an ``image_root``, image paths must stay inside it unless ``allow_outside_image_root``.

    Args:
        split: keep the records whose ``split`` field names this split (or one of a list; ``val`` and
            ``validation`` are one split); ``"all"`` loads every record. ``None`` loads every record too, with a
            warning when they name several splits.
        split_optional: with ``split`` given, a file whose records name no split is loaded whole (a file of
            that one split) instead of refused: the command line's reading of ``--train-file`` / ``--eval-file``.
    """
    path = Path(path)
    check_flags(f"load_jsonl({path})", normalized=normalized, allow_outside_image_root=allow_outside_image_root,
                split_optional=split_optional)
    box_format = check_box_format(box_format, source=str(path))
    records = []
    text = read_text_file(path, "JSONL file", reading="jsonl")
    # split on "\n" only: str.splitlines() would also break at U+2028, U+2029 and U+0085 inside JSON strings
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line, object_pairs_hook=refuse_duplicate_keys)))
        except json.JSONDecodeError as err:
            hint = format_hint(path, "jsonl", text=text)
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}).{hint}") from err
        except ValueError as err:  # a key named twice
            raise ValueError(f"{path}:{number}: {err}") from None
    if len(records) == 1 and isinstance(records[0][1], list):  # a whole JSON list written on one line
        hint = format_hint(path, "jsonl", text=text)
        raise ValueError(f"{path} holds one JSON list, not one object per line.{hint}")
    builder = _SampleBuilder(box_format=box_format, normalized=normalized)
    _add_records(builder, records, image_root=Path(image_root) if image_root else path.parent, read_box=_read_box_key,
                 allow_outside_image_root=allow_outside_image_root or image_root is None, split=split,
                 source=str(path), split_optional=split_optional, hint=lambda: format_hint(path, "jsonl", text=text))
    return builder.build()


def load_csv(
    path: str | PathLike[str],
    box_format: str,
    image_root: str | PathLike[str] | None = None,
    *,
    normalized: bool = False,
    delimiter: str = ",",
    allow_outside_image_root: bool = False,
    split: str | Sequence[str] | None = None,
    split_optional: bool = False,
) -> list[RECSample]:
    """Load a CSV file with a header row: ``image``, ``text`` and ``bbox`` (``"[x, y, w, h]"`` or ``"x y w h"``)
    or four box columns named after ``box_format`` (``x0,y0,x1,y1`` / ``x,y,w,h`` / ``cx,cy,w,h``).

    Args:
        split: keep the records whose ``split`` column names this split (or one of a list; ``val`` and
            ``validation`` are one split); ``"all"`` loads every record. ``None`` loads every record too, with a
            warning when they name several splits.
        split_optional: with ``split`` given, a file whose records name no split is loaded whole (a file of
            that one split) instead of refused: the command line's reading of ``--train-file`` / ``--eval-file``.
    """
    path = Path(path)
    check_flags(f"load_csv({path})", normalized=normalized, allow_outside_image_root=allow_outside_image_root,
                split_optional=split_optional)
    box_format = check_box_format(box_format, source=str(path))

    def read_box(record: dict[str, Any], where: str) -> tuple[Box, tuple[str, ...]]:
        if first_key(record, BOX_KEYS) is not None:
            return _read_box_key(record, where)
        for columns in _CSV_BOX_COLUMNS[box_format]:
            if all(column in record for column in columns):
                return parse_box([record[column] for column in columns], where=where), columns
        names = " or ".join(",".join(columns) for columns in _CSV_BOX_COLUMNS[box_format])
        wanted = (*BOX_KEYS, *(column for columns in _CSV_BOX_COLUMNS[box_format] for column in columns))
        raise ValueError(f"{where}: no box; expected a 'bbox' column or the columns {names}."
                         f"{near_miss_hint(record, wanted)}")

    # skipinitialspace: "image, text, bbox" (spaces after the delimiter) names the columns image, text and bbox, and
    # a quoted field after a space ( "[1, 2, 3, 4]") stays one field
    text = read_text_file(path, "CSV file", reading="csv")
    if text.lstrip("\ufeff \t\r\n").startswith(("{", "[")):
        hint = format_hint(path, "csv", text=text) or " Read it with load_jsonl or load_coco_style."
        raise ValueError(f"{path} is JSON, not CSV.{hint}")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True)
    try:
        _check_delimiter(reader.fieldnames, delimiter, path=path)
        # a row of empty fields (",,," that spreadsheets leave after the data) is skipped like a blank line
        records = [(f"{path}:{reader.line_num}", _whole_row(row, reader, where=f"{path}:{reader.line_num}"))
                   for row in reader if not _empty_row(row)]
    except csv.Error as err:
        raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({err}).") from err
    builder = _SampleBuilder(box_format=box_format, normalized=normalized)
    _add_records(builder, records, image_root=Path(image_root) if image_root else path.parent, read_box=read_box,
                 allow_outside_image_root=allow_outside_image_root or image_root is None, split=split,
                 source=str(path), split_optional=split_optional, hint=lambda: format_hint(path, "csv", text=text))
    return builder.build()


def _check_delimiter(header: Sequence[str] | None, delimiter: str, *, path: Path) -> None:
    """Refuse a header read as one column that holds another usual delimiter (``image;text;bbox``: Excel writes
    ``;`` in locales with a decimal comma, and tab-separated exports are common): every row would be one field and
    the error would only say that no image column was found."""
    if not header or len(header) != 1:
        return
    other = [sep for sep in (";", "\t", ",", "|") if sep != delimiter and sep in header[0]]
    if other:
        raise ValueError(f"{path}:1: the header is the one column {header[0]!r}, so the file seems to use "
                         f"{other[0]!r} between columns, not {delimiter!r}: pass delimiter={other[0]!r} to load_csv, or "
                         f"save the file with {delimiter!r} between columns (on the command line: --csv-delimiter).")


def _empty_row(row: dict[Any, Any]) -> bool:
    """Whether a CSV row holds nothing but empty or blank fields (and no extra values)."""
    return row.get(None) is None and all(value is None or not str(value).strip() for value in row.values())


def _whole_row(row: dict[Any, Any], reader: csv.DictReader, *, where: str) -> dict[str, Any]:
    """A CSV row with exactly one value per header column. ``csv.DictReader`` files extra values under the key
    ``None`` and fills missing ones with ``None``: a text with an unquoted delimiter would silently lose its end
    (or shift the columns after it), so both are refused."""
    header = list(reader.fieldnames or [])
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise ValueError(f"{where.rsplit(':', 1)[0]}:1: the header names the column(s) {duplicated} twice; the later "
                         "column would silently replace the earlier. Rename one of them.")
    extra = row.get(None)
    missing = [name for name in header if row.get(name) is None]
    if extra is not None or missing:
        count = len(header) + len(extra) if extra is not None else len(header) - len(missing)
        raise ValueError(
            f"{where}: {count} fields, but the header has {len(header)} ({','.join(header)}). Quote a field that "
            f"contains the delimiter {reader.reader.dialect.delimiter!r} (\"the dog, left\"), or give every row all the "
            "header's columns (an empty value is fine)."
        )
    return dict(row)


def load_coco_style(
    path: str | PathLike[str],
    box_format: str = "xywh",
    image_root: str | PathLike[str] | None = None,
    *,
    normalized: bool = False,
    allow_outside_image_root: bool = False,
    split: str | Sequence[str] | None = None,
    split_optional: bool = False,
) -> list[RECSample]:
    """Load a COCO-style JSON (``images``, ``annotations``) whose expressions sit on annotations or images.

    * Expression on the annotation (``text``/``expression``/``phrase``/``sentence``/``caption``, or
      ``sentences``): one sample per annotation expression.
    * Expression on the image entry (MDETR's ``final_refcoco_*.json``: ``images[].caption``, one image entry per
      expression): the entry must have exactly one annotation, the referred box.

    ``images[].file_name`` is joined to ``image_root`` (default: the JSON's folder). ``box_format`` defaults to
    COCO's ``xywh`` pixels; ``images[].width``/``height`` are used for ``normalized`` boxes. ``split`` keeps the
    expressions whose annotation (or else image entry) names that ``split`` (``"all"``: every one; ``None``: every
    one, with a warning when they name several splits); with ``split_optional``, a file that names no split is
    loaded whole.
    """
    path = Path(path)
    check_flags(f"load_coco_style({path})", normalized=normalized, allow_outside_image_root=allow_outside_image_root,
                split_optional=split_optional)
    box_format = check_box_format(box_format, source=str(path))
    text = read_text_file(path, "COCO-style JSON", reading="coco")
    try:
        data = json.loads(text, object_pairs_hook=refuse_duplicate_keys)
    except json.JSONDecodeError as err:
        hint = format_hint(path, "coco", text=text)
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg}).{hint}") from err
    except ValueError as err:  # a key named twice
        raise ValueError(f"{path}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        raise ValueError(f"{path}: a COCO-style file needs top-level 'images' and 'annotations' lists."
                         f"{format_hint(path, 'coco', text=text)}")
    root = Path(image_root) if image_root else path.parent
    contain = not allow_outside_image_root and image_root is not None
    for position, image in enumerate(data["images"]):
        missing = [key for key in ("id", "file_name") if not isinstance(image, dict) or key not in image]
        if missing:
            raise ValueError(f"{path} images[{position}]: no {' and no '.join(repr(k) for k in missing)} "
                             "(every image entry needs an 'id' and a 'file_name').")
    for position, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise ValueError(f"{path} annotations[{position}]: not an object with an 'image_id'.")
    empty = [key for key in ("images", "annotations") if not data[key]]
    if empty:  # refused here, where the cause is known ("no expressions found" would send you looking for keys)
        raise ValueError(f"{path} holds no {' and no '.join(empty)} (its list is empty): check the path, or export the "
                         "file again with one annotation per referred object.")
    images = index_unique(data["images"], "id", where=f"{path} images")
    anns_by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for ann in data["annotations"]:
        anns_by_image[ann.get("image_id")].append(ann)

    builder = _SampleBuilder(box_format=box_format, normalized=normalized)
    speechless: list[str] = []  # entries whose text field lists no expression

    def add(ann: dict[str, Any], image: dict[str, Any], text_value: Any, where: str) -> None:
        if ann.get("bbox") is None:
            raise ValueError(f"{where}: annotation {ann.get('id')} has no bbox.")
        metadata = {"ann_id": ann.get("id"), "image_entry_id": image["id"], "category_id": ann.get("category_id")}
        if "split" in image or "split" in ann:
            metadata["split"] = ann.get("split", image.get("split"))
        texts = [text for text, _ in expressions_of(text_value, sentence_field="sent", where=where)]
        if not texts:
            speechless.append(where)
        builder.add(
            image=join_image_path(image_name_of(image["file_name"], where=where), root,
                                  allow_outside_image_root=not contain, where=where),
            texts=texts,
            box=parse_box(ann["bbox"], where=where),
            image_id=image.get("original_id", image["id"]),
            metadata=metadata,
            size=_size_from(image, where=where),
            where=where,
        )

    entries: list[tuple[dict[str, Any], dict[str, Any], Any, str]] = []  # (annotation, image, expression(s), where)
    unread: list[tuple[str, str, list[str]]] = []  # entries with other texts than the one read
    for position, ann in enumerate(data["annotations"]):
        where = f"{path} annotations[{position}]"
        text_key = first_key(ann, TEXT_KEYS)
        if text_key is None:
            continue
        if others := other_texts(ann, text_key):
            unread.append((where, text_key, others))
        image = images.get(ann.get("image_id"))
        if image is None:
            wanted = ann.get("image_id")
            alike = [key for key in images if str(key) == str(wanted)]
            hint = (f"; images has the id {alike[0]!r} ({type(alike[0]).__name__}), not {wanted!r} "
                    f"({type(wanted).__name__}): write the ids alike, both numbers or both text" if alike else "")
            raise ValueError(f"{where}: image_id {wanted!r} is not in images{hint}.")
        entries.append((ann, image, ann[text_key], where))
    for position, image in enumerate(data["images"]):
        text_key = first_key(image, TEXT_KEYS)
        if text_key is None:
            continue
        where = f"{path} images[{position}] (id {image['id']})"
        if others := other_texts(image, text_key):
            unread.append((where, text_key, others))
        candidates = [ann for ann in anns_by_image.get(image["id"], []) if first_key(ann, TEXT_KEYS) is None]
        if len(candidates) != 1:
            raise ValueError(
                f"{where}: the image entry carries the expression {image[text_key]!r} but has {len(candidates)} "
                "annotations; a REC entry needs exactly one (the referred box). Put the expression on the "
                "annotation instead."
            )
        entries.append((candidates[0], image, image[text_key], where))
    if not entries:
        keys = {key for entry in (*data["annotations"], *data["images"]) for key in entry}
        hint = near_miss_hint(sorted(keys), TEXT_KEYS) or format_hint(path, "coco", text=text)
        raise ValueError(
            f"{path}: no expressions found: none of its {len(data['annotations'])} annotation(s) and "
            f"{len(data['images'])} image entries has a text key (one of {list(TEXT_KEYS)}); put one on each "
            f"annotation or on each image entry.{hint}"
        )
    _warn_textless(data["annotations"], {id(ann) for ann, *_ in entries}, path=path)
    _refuse_misnamed_split([*((f"{path} annotations[{n}]", ann) for n, ann in enumerate(data["annotations"])),
                            *((f"{path} images[{n}]", image) for n, image in enumerate(data["images"]))])
    wanted = _split_selection([(where, ann.get("split", image.get("split"))) for ann, image, _, where in entries],
                              split, source=str(path), split_optional=split_optional)
    for ann, image, text_value, where in entries:
        if wanted is None or str(ann.get("split", image.get("split"))) in wanted:
            add(ann, image, text_value, where)
    warn_without_expression(speechless, what="annotation(s) or image entries", stacklevel=2)
    warn_other_texts(unread, fix=_RENAME_TEXT, stacklevel=2)
    if not builder.pending:
        raise ValueError(f"{path}: no expressions found: every annotation or image entry that has a text key lists no "
                         "expression (an empty list); add their referring phrases.")
    return builder.build()


def _warn_textless(annotations: list[dict[str, Any]], used: set[int], *, path: Path) -> None:
    """Count the annotations that give no sample: no text key (one of ``TEXT_KEYS``) and not the referred box of an
    image entry carrying the expression. One whose key differs from a text key by case or spaces (``Text``) is
    refused; the others are named in one warning (a file mixing REC annotations with plain COCO objects)."""
    textless = [(position, ann) for position, ann in enumerate(annotations) if id(ann) not in used]
    if not textless:
        return
    for position, ann in textless:
        hint = near_miss_hint(ann, TEXT_KEYS)
        if hint:
            raise ValueError(f"{path} annotations[{position}]: no text key (one of {list(TEXT_KEYS)}), so it would "
                             f"give no sample.{hint}")
    position, ann = textless[0]
    warnings.warn(f"{path}: {len(textless)} of {len(annotations)} annotations have no text key (one of "
                  f"{list(TEXT_KEYS)}) and are no image entry's referred box, so give no sample (first: "
                  f"annotations[{position}], id {ann.get('id')!r}): add their expressions, or remove them.",
                  stacklevel=3)
