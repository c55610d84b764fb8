"""Loader for Hugging Face ``datasets`` tables, or any sequence of dict rows.

``datasets`` itself is optional: anything iterable that yields dict rows works (a ``datasets.Dataset``, a
``DatasetDict`` / ``{split_name: rows}`` mapping, a list of dicts). Known layouts are recognised by their columns:

* **jxu124** (``jxu124/refcoco``, ``refcocoplus``, ``refcocog``): one row per ref; ``sentences`` (a list of
  ``refer`` sentence dicts or strings), ``bbox`` in **xyxy pixels**, ``image_path`` (e.g.
  ``coco/train2014/COCO_train2014_...jpg``), ``split``. No images inside: give ``image_root``.
* **lmms-lab** (``lmms-lab/RefCOCO``, ``RefCOCOplus``, ``RefCOCOg``): images inside (``image``), ``bbox`` in
  **xywh pixels**, the referring expressions in ``answer`` (a list of strings; ``question`` holds a generic
  captioning prompt, not the expression). Evaluation splits only: there is no train split.
* anything else (**generic**): an image column (``image``/``image_path``/``file_name``), a text column
  (``text``/``expression``/``phrase``/``sentence``/``caption``, or ``text_column=``), ``bbox`` and an explicit
  ``box_format``.

Nothing is decoded while loading: the samples hold paths, or :class:`HFRowImage` references (table, row, column)
that read the image when an item is taken, so a RefCOCO-size table (120k expressions) costs no more memory than a
small one. A ``datasets.Dataset`` is read without its image columns and those are opened undecoded
(``datasets.Image(decode=False)``) row by row; the table itself stays memory-mapped. A streamed table
(``IterableDataset``) is read undecoded too: ``datasets``' decoding turns an image upright by its EXIF orientation,
while the boxes (and the same table loaded whole) are in the stored pixel grid.
"""

from __future__ import annotations

import io
import itertools
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from PIL import Image

from m2ist.config import check_flags
from m2ist.data.images import DeferredImage, ImageLoadError, image_size
from m2ist.data.loaders import (
    BOX_KEYS,
    IMAGE_KEYS,
    TEXT_KEYS,
    annotated_size,
    boxes_to_xyxy,
    canonical_split,
    check_box_format,
    check_fractions,
    check_sentence_field,
    expressions_of,
    first_key,
    format_hint,
    image_name_of,
    join_image_path,
    names_a_url,
    near_miss_hint,
    normalize_split_request,
    other_texts,
    parse_box,
    warn_other_texts,
    warn_without_expression,
)
from m2ist.data.sample import RECSample

__all__ = ["HF_STYLES", "HFRowImage", "detect_hf_style", "from_hf_dataset"]

#: style -> the box format its ``bbox`` column uses (``None``: must be given).
HF_STYLES: dict[str, str | None] = {"jxu124": "xyxy", "lmms-lab": "xywh", "generic": None}
_ID_COLUMNS = ("id", "ref_id", "ann_id", "sent_id", "category_id", "question_id", "file_name")
_PROBE_LIMIT = 8


def detect_hf_style(columns: Iterable[str]) -> str:
    """Name the known layout (``jxu124``, ``lmms-lab``) these column names belong to, else ``generic``."""
    names = set(columns)
    if {"image_path", "bbox"} <= names and names & {"sentences", "captions"}:
        return "jxu124"
    if {"image", "bbox", "answer"} <= names:
        return "lmms-lab"
    return "generic"


def _is_split_mapping(dataset: Any) -> bool:
    if not isinstance(dataset, Mapping):
        return False
    if any(key in dataset for key in BOX_KEYS):
        raise TypeError("from_hf_dataset got a single row (a dict with 'bbox'); pass a list of rows instead.")
    return True


def _peek(rows: Iterable[Any]) -> tuple[dict[str, Any] | None, Iterator[Any]]:
    iterator = iter(rows)
    try:
        first = next(iterator)
    except StopIteration:
        return None, iter(())
    return first, itertools.chain([first], iterator)


class _RelativeImagePaths:
    """Join relative image paths to ``image_root``, dropping leading folders the root already contains.

    jxu124 rows say ``coco/train2014/COCO_train2014_X.jpg`` while users point ``image_root`` at the
    ``train2014`` folder itself; the first few paths are probed to find how many leading parts to drop.
    """

    def __init__(self, image_root: str | PathLike[str] | None, allow_outside_image_root: bool = False) -> None:
        self.root = Path(image_root) if image_root is not None else None
        self.allow_outside_image_root = allow_outside_image_root

    def resolve_all(self, names: list[str | None]) -> list[str | None]:
        if self.root is None:
            return names
        relative = [name for name in names if name is not None and not Path(name).is_absolute()]
        drop = self._leading_parts_to_drop(relative)
        resolved: list[str | None] = []
        for name in names:
            if name is None or Path(name).is_absolute():
                resolved.append(name)
                continue
            parts = Path(name).parts
            resolved.append(join_image_path(Path(*parts[min(drop, len(parts) - 1) :]), self.root,
                                            allow_outside_image_root=self.allow_outside_image_root,
                                            where=f"image path {name!r}"))
        return resolved

    def _leading_parts_to_drop(self, names: list[str]) -> int:
        assert self.root is not None
        probed = list(dict.fromkeys(names))[:_PROBE_LIMIT]
        for name in probed:
            parts = Path(name).parts
            for drop in range(len(parts)):
                if self.root.joinpath(*parts[drop:]).is_file():
                    return drop
        if probed:
            warnings.warn(
                f"None of the first {len(probed)} images were found under image_root={self.root} (e.g. "
                f"{self.root / probed[0]}); check image_root.",
                stacklevel=4,
            )
        return 0


def _named_rows(rows: Iterable[Any], subset: str | None) -> Iterator[Any]:
    """``rows``, with an error raised while producing one (``datasets`` decodes images lazily) naming its index."""
    iterator = iter(rows)
    index = 0
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            split = f" of split {subset!r}" if subset is not None else ""
            message = str(err).split(" <_io.BytesIO")[0]
            raise ImageLoadError(f"row {index}{split}: cannot be read ({type(err).__name__}: {message}).") from None
        if not isinstance(row, Mapping):
            raise ValueError(f"row {index}: rows must be dicts (column -> value), got {type(row).__name__}.")
        yield row
        index += 1


class HFRowImage(DeferredImage):
    """The image in ``column`` of row ``index`` of ``rows``, read each time it is used.

    ``rows`` is a ``datasets.Dataset`` whose image column is not decoded (it yields ``{"bytes", "path"}``) or any
    indexable sequence of dict rows; the cell may hold a PIL image, encoded bytes, a path or an array. A relative
    path (a ``{"bytes": None, "path": ...}`` cell) is read under ``root`` when one is given, as the loader reads the
    paths of a path column (``from_hf_dataset``'s ``image_root``).
    """

    __slots__ = ("allow_outside_root", "column", "index", "root", "rows")

    def __init__(self, rows: Any, index: int, column: str, root: str | PathLike[str] | None = None,
                 allow_outside_root: bool = False) -> None:
        self.rows, self.index, self.column = rows, index, column
        self.root, self.allow_outside_root = root, allow_outside_root

    def open(self) -> Any:
        """The cell as a PIL image (lazily opened from its bytes: reading the size decodes nothing), path or array."""
        value = self.rows[self.index][self.column]
        if isinstance(value, bytes | bytearray):  # an encoded file in a binary column (a Parquet export)
            value = {"bytes": bytes(value)}
        if isinstance(value, dict):
            if value.get("bytes"):
                return _open_encoded(value["bytes"], self.describe())
            if value.get("path") and names_a_url(str(value["path"])):  # a Hub file (hf://...) of a datasets cell
                return _open_encoded(_remote_bytes(str(value["path"]), self.describe()), self.describe())
            if value.get("path"):
                return self._resolved(str(value["path"]))
        if isinstance(value, str | PathLike):
            return self._resolved(value)
        if isinstance(value, Image.Image) or hasattr(value, "__array__"):
            return value
        raise ValueError(f"cannot read an image from {type(value).__name__} {value!r:.80}")

    def _resolved(self, path: str | PathLike[str]) -> str | PathLike[str]:
        """``path`` under :attr:`root` when it is relative and there is a root (it was read from the working folder,
        while the same path in a column of text was read under ``image_root``)."""
        if self.root is None:
            return path
        return join_image_path(image_name_of(path, where="its path"), self.root,  # errors name the row when raised
                               allow_outside_image_root=self.allow_outside_root)

    def describe(self) -> str:
        """``row N, column 'image'``."""
        return f"row {self.index}, column {self.column!r}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.rows, self.index, self.column, self.root, self.allow_outside_root))


def _open_encoded(data: bytes, where: str) -> Image.Image:
    """``data`` (an encoded image file) opened lazily, or an error naming ``where`` (PIL names a stream)."""
    try:
        return Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        message = str(err).split(" <_io.BytesIO")[0]  # PIL names the in-memory stream, not the row
        raise ImageLoadError(f"{where}: the image bytes ({len(data)} bytes) cannot be decoded ({message}).") from None


def _remote_bytes(path: str, where: str) -> bytes:
    """The bytes of a ``datasets`` image cell that names a remote file (``hf://datasets/...`` in a streamed image
    folder), read as ``datasets`` reads it; m2ist decodes them itself (``datasets`` would turn the image upright)."""
    try:
        from datasets.download.download_config import DownloadConfig
        from datasets.utils.file_utils import xopen

        with xopen(path, "rb", download_config=DownloadConfig()) as stream:
            return stream.read()
    except ImportError as err:
        raise ImageLoadError(f"{where}: the image {path!r} is remote, and reading it needs the datasets package."
                             ) from err
    except (OSError, ValueError) as err:
        raise ImageLoadError(f"{where}: the image {path!r} cannot be read ({type(err).__name__}: {err}).") from err


def _is_image_feature(feature: Any) -> bool:
    return type(feature).__name__ == "Image" and type(feature).__module__.startswith("datasets")


def _without_decoding(rows: Any, root: str | PathLike[str] | None = None, allow_outside_root: bool = False) -> Any:
    """A ``datasets.Dataset`` read without decoding images: its image columns come out as :class:`HFRowImage`
    references into an undecoded view of the table. Other inputs are returned as they are."""
    features = getattr(rows, "features", None)
    if not isinstance(features, Mapping) or not hasattr(rows, "cast_column") or not hasattr(rows, "__getitem__"):
        return rows
    image_columns = [name for name, feature in features.items() if _is_image_feature(feature)]
    if not image_columns:
        return rows
    if not hasattr(rows, "__len__"):
        # a streaming dataset (no random access): its cells are kept as read, but read undecoded all the same, since
        # datasets' decoding turns an image upright by its EXIF orientation, and the boxes (and a map-style table of
        # the same rows) are in the stored pixel grid
        for column in image_columns:
            rows = rows.cast_column(column, type(features[column])(decode=False))
        return rows
    undecoded = {
        column: rows.select_columns([column]).cast_column(column, type(features[column])(decode=False))
        for column in image_columns
    }
    others = rows.remove_columns(image_columns)

    def generate() -> Iterator[dict[str, Any]]:
        for index, row in enumerate(others):
            yield {**row, **{column: HFRowImage(view, index, column, root, allow_outside_root)
                             for column, view in undecoded.items()}}

    return generate()


def _image_of(value: Any, *, where: str, rows: Any, index: int, column: str, root: str | PathLike[str] | None = None,
              allow_outside_root: bool = False) -> tuple[Any, str | None]:
    """``(image, relative_name)``: a deferred image, or ``(None, path)`` for a path still to resolve.

    In-memory cells (PIL images, bytes, arrays) of an indexable ``rows`` are referenced, not kept: the sample
    list then holds no pixels of its own (the user's rows still do).
    """
    if isinstance(value, DeferredImage):
        return value, None
    if isinstance(value, bytes | bytearray):  # an encoded file in a binary column (a Parquet export), as datasets'
        value = {"bytes": bytes(value)}  # Image feature stores it
    if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
        if names_a_url(str(value["path"])):  # a remote file of a datasets cell (hf://...): read now, decoded when used
            if hasattr(rows, "__getitem__") and hasattr(rows, "__len__") and not isinstance(rows, str | Mapping):
                return HFRowImage(rows, index, column, root, allow_outside_root), None
            return _open_encoded(_remote_bytes(str(value["path"]), where), where), None
        return None, image_name_of(str(value["path"]), where=where)
    if isinstance(value, str | PathLike):
        return None, image_name_of(value, where=where)
    in_memory = isinstance(value, Image.Image) or hasattr(value, "__array__") or (
        isinstance(value, dict) and value.get("bytes"))
    if not in_memory:
        raise ValueError(f"{where}: cannot read an image from {type(value).__name__} {value!r:.80}.")
    if hasattr(rows, "__getitem__") and hasattr(rows, "__len__") and not isinstance(rows, str | Mapping):
        return HFRowImage(rows, index, column, root, allow_outside_root), None
    if isinstance(value, dict):  # a one-pass iterable: keep the encoded bytes, decoded when used
        return _open_encoded(value["bytes"], where), None
    return value, None


def _row_annotated_size(row: Mapping[str, Any], *, box_key: str, where: str) -> tuple[int, int] | None:
    """The image size a row states: its ``width``/``height`` columns, or for jxu124 rows the COCO image entry in
    ``raw_image_info`` (a JSON string). RECDataset refuses an image file of another size (a downscaled copy of
    COCO would put every box in the wrong place)."""
    size = annotated_size(dict(row), where=where, box_keys=(box_key,))
    if size is not None:
        return size
    info = row.get("raw_image_info")
    if isinstance(info, str):
        try:
            info = json.loads(info)
        except json.JSONDecodeError:
            return None
    if isinstance(info, Mapping):
        return annotated_size(dict(info), where=f"{where} raw_image_info")
    return None


def _select_subsets(
    subsets: list[tuple[str | None, Iterable[Any]]],
    requested: list[str] | None,
    *,
    has_split_column: bool,
    style: str,
) -> tuple[set[str | None], set[str]]:
    """Decide which subsets to take whole and which row ``split`` values to filter the others by."""
    if requested is None:
        return {name for name, _ in subsets}, set()
    names = [name for name, _ in subsets if name is not None]
    by_canonical: dict[str, set[str | None]] = {}
    for name in names:  # {"val": ..., "validation": ...} are one split: take both
        by_canonical.setdefault(canonical_split(name), set()).add(name)
    whole: set[str | None] = set()
    row_filter: set[str] = set()
    for wanted in requested:
        key = canonical_split(wanted)
        if key in by_canonical:
            whole |= by_canonical[key]
        elif has_split_column:
            row_filter.add(key)
        elif style == "lmms-lab" and key == "train":
            raise ValueError(
                "lmms-lab RefCOCO/RefCOCO+/RefCOCOg have no train split (only val/test/testA/testB), and training "
                "on an evaluation split would contaminate every score. Train on jxu124/refcoco* (with COCO "
                "train2014 images), the refer files (load_refer) or TransVG split files (load_transvg_split)."
            )
        elif names:
            raise ValueError(f"No split {wanted!r} in this dataset; available splits: {sorted(names)}.")
        else:
            raise ValueError(
                f"Cannot select split {wanted!r}: the rows have no 'split' column. Pass the rows of that split "
                "(e.g. dataset['val']) with split=None."
            )
    return whole, row_filter


def from_hf_dataset(
    dataset: Any,
    box_format: str | None = None,
    image_root: str | PathLike[str] | None = None,
    split: str | Sequence[str] | None = None,
    *,
    style: str | None = None,
    text_column: str | None = None,
    sentence_field: str = "sent",
    normalized: bool = False,
    allow_outside_image_root: bool = False,
) -> list[RECSample]:
    """Convert Hugging Face rows (or any iterable of dict rows) to one :class:`RECSample` per expression.

    Args:
        dataset: a ``datasets.Dataset``, a ``DatasetDict`` or ``{split: rows}`` mapping, or a list of dict rows.
        box_format: the ``bbox`` convention (``xyxy``, ``xywh``, ``cxcywh``); known styles supply it, generic rows
            must. Giving one that differs from a known style's convention warns.
        image_root: folder that relative image paths (jxu124 ``image_path``) are relative to. When the rows'
            paths repeat folders the root already ends with (``coco/train2014/...`` under a ``train2014`` root)
            the overlap is dropped.
        split: a split name, a list of them, or ``None``/``"all"``. Picked by subset name for a mapping and by
            the rows' ``split`` column otherwise (``validation`` and ``val`` are the same). Asking lmms-lab data
            for ``train`` is an error: it has none, and nothing falls back to an evaluation split.
        style: ``jxu124``, ``lmms-lab`` or ``generic``; detected from the column names when omitted.
        text_column: the column holding the expression(s), overriding the style's default.
        sentence_field: for ``refer``-style sentence dicts, ``sent``, ``raw`` or ``tokens`` (any other name is
            refused).
        normalized: the box numbers are fractions of the image size (the image size is read from each image).
        allow_outside_image_root: accept relative image paths that lead outside ``image_root``.
    """
    check_flags("from_hf_dataset", normalized=normalized, allow_outside_image_root=allow_outside_image_root)
    check_sentence_field(sentence_field)
    if isinstance(dataset, str | bytes | PathLike):  # iterating a path would give its characters as rows
        hint = format_hint(dataset, "hf") if not isinstance(dataset, bytes) else ""
        raise TypeError(f"from_hf_dataset takes rows (a datasets.Dataset, a DatasetDict or a list of dicts), not the "
                        f"path {dataset!r}: load it first, e.g. datasets.load_from_disk(path) or "
                        f"datasets.load_dataset(name).{hint}")
    if type(dataset).__name__ == "DataFrame" and type(dataset).__module__.startswith("pandas"):
        dataset = dataset.to_dict("records")  # a pandas table: iterating it gives its column names, not its rows
    if _is_split_mapping(dataset):
        subsets: list[tuple[str | None, Iterable[Any]]] = [(str(name), rows) for name, rows in dataset.items()]
    else:
        subsets = [(None, dataset)]

    peeked: list[tuple[str | None, Any, Iterator[Any]]] = []
    first_row = None
    for name, rows in subsets:
        first, iterator = _peek(_without_decoding(rows, image_root, allow_outside_image_root))
        peeked.append((name, rows, iterator))
        if first_row is None and first is not None:
            first_row = first
    if first_row is None:
        raise ValueError("The dataset has no rows.")
    if not isinstance(first_row, Mapping):
        table = (f" A {type(dataset).__name__} gives its column names when iterated: pass its rows (polars: "
                 "table.to_dicts())." if isinstance(first_row, str) and hasattr(dataset, "columns") else "")
        raise TypeError(f"Rows must be dicts (column -> value); got {type(first_row).__name__}.{table}")
    columns = list(first_row.keys())

    style = style or detect_hf_style(columns)
    if style not in HF_STYLES:
        raise ValueError(f"Unknown style {style!r}; expected one of {sorted(HF_STYLES)}.")
    known_format = HF_STYLES[style]
    if box_format is not None and known_format is not None and box_format != known_format:
        warnings.warn(
            f"{style}-style rows store bbox as {known_format}, but box_format={box_format!r} was given; using "
            f"{box_format!r} as asked.",
            stacklevel=2,
        )
    box_format = check_box_format(box_format or known_format, source=f"from_hf_dataset ({style}-style rows)")

    style_text_keys = {"jxu124": ("sentences", "captions"), "lmms-lab": ("answer",)}.get(style, TEXT_KEYS)
    text_key = text_column or first_key(first_row, style_text_keys)
    if text_key is None or text_key not in first_row:
        raise ValueError(f"No expression column among {columns}; expected one of {list(TEXT_KEYS)} or pass "
                         f"text_column=.{near_miss_hint(columns, TEXT_KEYS)}")
    image_key = {"jxu124": "image_path", "lmms-lab": "image"}.get(style) or first_key(first_row, IMAGE_KEYS)
    if style == "jxu124" and "image" in first_row:
        image_key = "image"  # an export that carries the pixels too
    box_key = first_key(first_row, BOX_KEYS)
    if image_key is None or box_key is None:
        raise ValueError(
            f"Rows need an image column (one of {list(IMAGE_KEYS)}) and a box column (one of {list(BOX_KEYS)}); found "
            f"{columns}.{near_miss_hint(columns, (*IMAGE_KEYS, *BOX_KEYS))}"
        )

    requested = normalize_split_request(split)
    whole, row_filter = _select_subsets(subsets, requested, has_split_column="split" in first_row, style=style)
    relabelled: dict[str, set[str]] = {}  # subset name -> the other split names its rows' 'split' column gives

    images: list[Any] = []
    sizes_stated: list[tuple[int, int] | None] = []
    names: list[str | None] = []
    texts: list[str] = []
    raw_boxes = []
    box_wheres: list[str] = []
    image_ids: list[Any] = []
    metadatas: list[dict[str, Any]] = []
    seen_splits: set[str] = set()
    filtered_rows = 0
    speechless: list[str] = []  # rows whose text column lists no expression
    unread: list[tuple[str, str, list[str]]] = []  # rows with other texts than the column read
    check_texts = style == "generic" and text_column is None  # known styles name their column
    for subset, source, rows in peeked:
        if subset not in whole and not row_filter:
            continue
        for index, row in enumerate(_named_rows(rows, subset)):
            row_split = row.get("split", subset)
            if subset is not None and requested is not None and subset in whole and row_split is not None and (
                    canonical_split(str(row_split)) != canonical_split(subset)):
                relabelled.setdefault(subset, set()).add(str(row_split))
            where = f"row {index}" + (f" of split {subset!r}" if subset is not None else "")
            if subset not in whole:
                if row_split is None:  # str(None) would match no split: the row was left out without a word
                    raise ValueError(f"{where}: its 'split' is empty, but split={sorted(row_filter)} selects rows by "
                                     "that column; fill it in for every row (the file loaders refuse the same), or "
                                     "load without split=.")
                seen_splits.add(str(row_split))
                if canonical_split(str(row_split)) not in row_filter:
                    continue
                filtered_rows += 1
            if text_key not in row or box_key not in row or image_key not in row:
                raise ValueError(f"{where}: missing one of the columns {text_key!r}, {box_key!r}, {image_key!r}.")
            if check_texts and (others := other_texts(row, text_key)):
                unread.append((where, text_key, others))
            box = parse_box(row[box_key], where=where)
            image, name = _image_of(row[image_key], where=where, rows=source, index=index, column=image_key,
                                    root=image_root, allow_outside_root=allow_outside_image_root)
            image_id = row.get("image_id", row.get("file_name", name))
            stated = _row_annotated_size(row, box_key=box_key, where=where)
            sent_ids = row.get("sent_ids") or []
            expressions = expressions_of(row[text_key], sentence_field=sentence_field, where=where)
            if not expressions:
                speechless.append(where)
            for position, (text, item) in enumerate(expressions):
                metadata: dict[str, Any] = {"split": row_split, "row": index}
                metadata.update({key: row[key] for key in _ID_COLUMNS if key in row and key != "sent_id"})
                sent_id = item.get("sent_id") if isinstance(item, dict) else None
                if sent_id is None and position < len(sent_ids):
                    sent_id = sent_ids[position]
                if sent_id is not None:
                    metadata["sent_id"] = sent_id
                images.append(image)
                sizes_stated.append(stated)
                names.append(name)
                texts.append(text)
                raw_boxes.append(box)
                box_wheres.append(where)
                image_ids.append(image_id)
                metadatas.append(metadata)

    if speechless and not texts:  # as an empty COCO-style file: refused here, where the cause is known
        raise ValueError(f"Every row read ({len(speechless)}, first at {speechless[0]}) lists no expression in the "
                         f"column {text_key!r} (an empty list): no sample can be made; check text_column= or the "
                         "dataset's export.")
    warn_without_expression(speechless, what="row(s)", field=f"the column {text_key!r}", stacklevel=2)
    warn_other_texts(unread, fix="if another column holds it, pass text_column= (--text-column on the command line).",
                     stacklevel=2)
    if relabelled:
        found = "; ".join(f"subset {name!r} holds rows of split {sorted(values)}" for name, values in relabelled.items())
        example = sorted(next(iter(relabelled.values())))[0]
        warnings.warn(
            f"{found} (by the rows' 'split' column; jxu124/refcoco and refcocoplus call their testA subset 'test'). "
            "The samples keep their rows' split in metadata['split'], but results are reported under the name you "
            f"asked for: ask for the rows' name (split={example!r}) to report them under it.",
            stacklevel=2,
        )
    if row_filter and not filtered_rows:
        raise ValueError(f"No rows with split in {sorted(row_filter)}; the rows' split values are {sorted(seen_splits)}.")
    resolved = _RelativeImagePaths(image_root, allow_outside_image_root).resolve_all(names)
    images = [image if image is not None else path for image, path in zip(images, resolved)]
    sizes = None
    if normalized:
        check_fractions(raw_boxes, box_wheres)  # before reading every image's size
        size_cache: dict[Any, tuple[int, int]] = {}
        sizes = []
        for image in images:
            key = image if isinstance(image, str) else id(image)
            if key not in size_cache:
                size_cache[key] = image_size(image)
            sizes.append(size_cache[key])
    boxes = boxes_to_xyxy(raw_boxes, box_format, image_sizes=sizes, wheres=box_wheres)
    return [
        RECSample(image=image, expression=text, box=box, image_id=image_id, metadata=metadata, annotated_size=size)
        for image, text, box, image_id, metadata, size in zip(images, texts, boxes, image_ids, metadatas, sizes_stated)
    ]
