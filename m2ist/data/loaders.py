"""Conventions every REC loader shares, and one import point for all of them.

Each loader states the box convention of its source and converts to the one internal form: ``(x0, y0, x1, y1)``
in absolute pixels of the original image. The loaders themselves live in :mod:`m2ist.data.refer`,
:mod:`m2ist.data.transvg`, :mod:`m2ist.data.hf` and :mod:`m2ist.data.files`; ``from m2ist.data.loaders import
load_refer`` (and the other ``load_*`` names) works too.
"""

from __future__ import annotations

import ast
import importlib
import json
import math
import os
import re
import unicodedata
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence, Set
from numbers import Real
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from m2ist.ops.boxes import BOX_FORMATS, box_convert

Box = tuple[float, float, float, float]

#: Column / key names accepted for the referring expression, the image and the box in user data.
TEXT_KEYS = ("text", "expression", "phrase", "sentence", "sentences", "caption", "referring_expression", "ref_exp")
IMAGE_KEYS = ("image", "image_path", "file_name", "img_path", "img", "path")
BOX_KEYS = ("bbox", "box")

_LAZY_EXPORTS = {
    "load_refer": "m2ist.data.refer",
    "load_transvg_split": "m2ist.data.transvg",
    "from_hf_dataset": "m2ist.data.hf",
    "load_jsonl": "m2ist.data.files",
    "load_csv": "m2ist.data.files",
    "load_coco_style": "m2ist.data.files",
}


def __getattr__(name: str) -> Any:
    """Resolve the loader functions lazily (they import this module, so they cannot be imported at its top)."""
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_box_format(box_format: str | None, *, source: str) -> str:
    """Validate ``box_format`` (``xyxy`` | ``xywh`` | ``cxcywh``) or say how to give it."""
    if box_format is None:
        raise ValueError(
            f"{source}: the box format is unknown; pass box_format='xyxy' (corners), 'xywh' (COCO: top-left corner, "
            "width, height) or 'cxcywh' (centre, width, height), in pixels (add normalized=True for fractions of "
            "the image size)."
        )
    if box_format not in BOX_FORMATS:
        raise ValueError(f"{source}: unknown box_format {box_format!r}; expected one of {BOX_FORMATS}.")
    return box_format


_NUMBER_SPLIT = re.compile(r"[\s,;]+")
_NUMPY_SCALAR = re.compile(r"\b(?:np|numpy)\.(?:float|int|uint)(?:16|32|64|128)?\(\s*([^()\s]*)\s*\)")
_BARE_COMMA = re.compile(r"\d,\d")  # "1,2,3,4" (comma-separated) or "12,5" (a decimal comma)
_OTHER_SEPARATOR = re.compile(r"[\s;]")  # with a bare comma: "12,5, 30,0" or "1,5 2 3" cannot be told apart


def parse_box(value: Any, *, where: str) -> Box:
    """Read four numbers from a list/tuple/array/tensor or a string like ``"[1, 2, 3, 4]"`` or ``"1 2 3 4"``.

    A mapping (its keys would be read), a set (no order) and bytes are refused."""
    if isinstance(value, Mapping | Set | bytes | bytearray):
        # iterating a dict gives its keys ({"0": 10, ...} -> 0, 1, 2, 3), a set has no order, bytes are codes
        kind = f"a mapping with keys {list(value)!r:.80}" if isinstance(value, Mapping) else f"a {type(value).__name__}"
        raise ValueError(f"{where}: the box {value!r:.80} is {kind}, not four numbers in order; store it as a list "
                         "in the box_format's order, e.g. [x0, y0, x1, y1] (xyxy) or [x, y, w, h] (xywh).")
    if isinstance(value, str):
        # pandas writes a list of numpy numbers as "[np.float64(1.5), np.int64(2), ...]" (numpy 2's repr)
        text = _NUMPY_SCALAR.sub(r"\1", value).strip().strip("[]()").strip()
        if _BARE_COMMA.search(text) and _OTHER_SEPARATOR.search(text):
            raise ValueError(
                f"{where}: a box must be 4 numbers, and {value!r} is ambiguous: it has commas between digits and "
                "other separators too, and a decimal comma ('12,5' for 12.5) would be read as two numbers. Write them "
                "with a decimal point, separated by ', ' or spaces, e.g. [12.5, 30.0, 40.2, 50.1] (save the file from "
                "a program set to an English locale)."
            )
        parts = [part for part in _NUMBER_SPLIT.split(text) if part]
    elif hasattr(value, "tolist"):
        parts = value.tolist()
    elif isinstance(value, Iterable):
        parts = list(value)
    else:
        parts = [value]
    if isinstance(parts, list) and len(parts) == 1 and isinstance(parts[0], list | tuple):
        parts = list(parts[0])  # [[x, y, w, h]] -> [x, y, w, h]
    try:  # True/False are no coordinates (float(True) is 1.0)
        numbers = tuple(float(part) for part in parts) if not any(isinstance(part, bool) for part in parts) else ()
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 4:
        raise ValueError(f"{where}: a box must be 4 numbers, got {value!r}.{_decimal_comma_hint(value)}")
    return numbers  # type: ignore[return-value]


_DECIMAL_COMMA = re.compile(r"-?\d+(,\d+)?")


def _decimal_comma_hint(value: Any) -> str:
    """A hint when ``value`` holds four numbers written with a decimal comma (``"12,5 30,5 40 60"``, or four cells
    ``"12,5"``: a spreadsheet in a locale that writes ``12,5`` for 12.5), else ``""``."""
    if isinstance(value, list | tuple) and len(value) == 8 and all(isinstance(item, int) for item in value):
        return (" Eight whole numbers: a box written with decimal commas inside a JSON list ([12,5, 30,0, 40,2, 50,1]) "
                "is read as eight numbers; write it with decimal points.")
    if isinstance(value, str):
        items = [part for part in re.split(r"[\s;]+", value.strip().strip("[]()")) if part]
    elif isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        items = [item.strip() for item in value]
    else:
        return ""
    if len(items) != 4 or not all(_DECIMAL_COMMA.fullmatch(item) for item in items) or not any("," in item for item in items):
        return ""
    return (" The numbers seem to use a decimal comma ('12,5' for 12.5): write them with a point, e.g. save the "
            "file from a program set to an English locale.")


def box_values(value: Any) -> Box:
    """The four numbers of one in-memory box (a list, tuple, array or tensor of numbers) as floats.

    Text is refused (file loaders read text with :func:`parse_box`), and so is anything that is not four plain
    numbers: the ``ValueError`` says what was given instead; callers add where the box came from. The numbers may
    be non-finite (callers decide whether to drop or refuse those).
    """
    if isinstance(value, str | bytes):
        raise ValueError(f"got the text {value!r}; give four numbers, e.g. [x0, y0, x1, y1]")
    parts = value.tolist() if hasattr(value, "tolist") else value
    if not isinstance(parts, Iterable) or isinstance(parts, Mapping | Set):  # keys / no order: never the box
        raise ValueError(f"got {type(value).__name__} {value!r}, not a sequence of four numbers")
    parts = list(parts)
    if any(isinstance(part, Iterable) and not isinstance(part, str | bytes) for part in parts):
        raise ValueError(f"got a nested sequence {value!r}; one box is a flat [x0, y0, x1, y1]")
    if len(parts) != 4:
        raise ValueError(f"got {len(parts)} values {value!r}")
    if not all(isinstance(part, Real) for part in parts):
        raise ValueError(f"got {value!r}; every value must be a number")
    return tuple(float(part) for part in parts)  # type: ignore[return-value]


#: A number of a ``normalized=True`` box beyond this (or below ``-_FRACTION_LIMIT + 1``) is no fraction of its image.
_FRACTION_LIMIT = 2.0


def check_fractions(boxes: Sequence[Box], wheres: Sequence[str] | None = None) -> None:
    """Refuse ``normalized=True`` boxes holding a number outside ``[-1, 2]``: pixels loaded as fractions of the
    image would be multiplied by its size and then clipped to the whole image (or dropped) by ``RECDataset``."""
    for position, box in enumerate(boxes):
        if any(math.isfinite(value) and not -1.0 <= value <= _FRACTION_LIMIT for value in box):
            where = wheres[position] if wheres is not None else f"box {position}"
            raise ValueError(f"{where}: the box {tuple(box)} was loaded with normalized=True, but {max(box, key=abs):g} "
                             "is no fraction of the image size: these look like pixels; load them without normalized=True "
                             "(drop --normalized), or divide the numbers by the image width and height.")


def boxes_to_xyxy(
    boxes: Sequence[Box], box_format: str, *, image_sizes: Sequence[tuple[float, float]] | None = None,
    wheres: Sequence[str] | None = None,
) -> list[Box]:
    """Convert ``boxes`` given in ``box_format`` to absolute ``xyxy`` pixels.

    With ``image_sizes`` (one ``(width, height)`` per box) the input numbers are fractions of the image size, and a
    number outside ``[-1, 2]`` (pixels) is refused, naming ``wheres[i]`` (where each box was read).
    """
    if not boxes:
        return []
    if image_sizes is not None:
        check_fractions(boxes, wheres)
    tensor = torch.tensor(boxes, dtype=torch.float64)
    if image_sizes is not None:
        sizes = torch.tensor(image_sizes, dtype=torch.float64)
        tensor = tensor * torch.cat([sizes, sizes], dim=-1)
    converted = box_convert(tensor, box_format, "xyxy")
    return [tuple(row) for row in converted.tolist()]  # type: ignore[misc]


#: The texts a ``refer``-style sentence dict holds: ``sent`` (normalised, lower case: what the benchmarks and the
#: TransVG split files use), ``raw`` (as the annotator typed it) and ``tokens`` (the word list, joined by spaces).
SENTENCE_FIELDS = ("sent", "raw", "tokens")
_SENTENCE_TEXT_KEYS = ("sent", "raw", "text", "phrase")


def check_sentence_field(sentence_field: Any) -> str:
    """``sentence_field`` if it is one of :data:`SENTENCE_FIELDS`; otherwise a ``ValueError`` (a typo such as
    ``"Raw"`` would silently read ``sent``)."""
    if sentence_field not in SENTENCE_FIELDS:
        raise ValueError(f"sentence_field={sentence_field!r} is not a sentence field; use one of "
                         f"{list(SENTENCE_FIELDS)} ('sent' is the normalised text the benchmarks use).")
    return sentence_field


def _tokens_text(tokens: Any, *, where: str) -> str:
    if not isinstance(tokens, list | tuple) or not all(isinstance(token, str) for token in tokens):
        raise ValueError(f"{where}: a sentence's 'tokens' must be a list of words, got {tokens!r:.80}.")
    return " ".join(tokens)


def sentence_text(sentence: Any, *, sentence_field: str, where: str) -> str:
    """Text of one sentence: a string, or a ``refer``-style dict (``sent``/``raw``/``tokens``).

    ``sentence_field`` ``"sent"`` (the default) falls back to ``raw``, ``text``, ``phrase`` and then ``tokens`` for
    dicts without ``sent``; ``"raw"`` and ``"tokens"`` must be in every sentence dict (never silently another
    field)."""
    check_sentence_field(sentence_field)
    if isinstance(sentence, str):
        return sentence
    if isinstance(sentence, dict):
        if sentence_field == "tokens":
            if "tokens" in sentence:
                return _tokens_text(sentence["tokens"], where=where)
        elif isinstance(sentence.get(sentence_field), str):
            return sentence[sentence_field]
        if sentence_field != "sent":
            raise ValueError(f"{where}: sentence_field={sentence_field!r}, but the sentence {sentence!r:.100} has no "
                             f"{sentence_field!r} text; pass the field its sentences have (e.g. 'sent').")
        for key in _SENTENCE_TEXT_KEYS:
            if isinstance(sentence.get(key), str):
                return sentence[key]
        if sentence.get("tokens") is not None:
            return _tokens_text(sentence["tokens"], where=where)
    raise ValueError(f"{where}: cannot read a sentence from {sentence!r}; expected a string or a dict with 'sent'.")


def _columnar_sentences(value: dict[str, Any], *, where: str) -> list[dict[str, Any]] | None:
    """``{"sent": [a, b], "sent_id": [1, 2], ...}`` (how ``datasets`` returns a ``Sequence`` of sentence dicts: one
    list per field) as ``[{"sent": a, "sent_id": 1, ...}, ...]``; ``None`` for one sentence dict."""
    if not any(isinstance(value.get(key), list | tuple) for key in _SENTENCE_TEXT_KEYS):
        return None
    lengths = {key: len(item) if isinstance(item, list | tuple) else None for key, item in value.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1:
        raise ValueError(f"{where}: the sentences {value!r:.120} hold one list per field, of different lengths "
                         f"({lengths}); each field needs one entry per sentence.")
    count = next(iter(lengths.values()))
    return [{key: item[position] for key, item in value.items()} for position in range(count)]


def _python_list_of_texts(text: str) -> list[str] | None:
    """``['the dog', "a cat"]`` (a Python list of strings: how pandas writes a list column to CSV) as a list;
    ``None`` for anything else (a phrase that merely starts and ends with brackets)."""
    try:
        decoded = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return decoded if isinstance(decoded, list) and all(isinstance(item, str) for item in decoded) else None


def expressions_of(value: Any, *, sentence_field: str, where: str) -> list[tuple[str, Any]]:
    """All expressions in a text field: a string, a list of strings/sentence dicts, a JSON-encoded list, or sentence
    dicts stored one list per field (a ``datasets`` ``Sequence`` of dicts: ``{"sent": [...], "sent_id": [...]}``).

    Returns ``(text, original_item)`` pairs so callers can read ids from sentence dicts.
    """
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            try:
                decoded = json.loads(stripped)
            except json.JSONDecodeError:
                decoded = _python_list_of_texts(stripped)  # pandas writes a list column as ['a', 'b']
            if isinstance(decoded, list):
                value = decoded
        if isinstance(value, str):
            return [(value, value)]
    if isinstance(value, dict):
        columns = _columnar_sentences(value, where=where)
        if columns is None:
            return [(sentence_text(value, sentence_field=sentence_field, where=where), value)]
        value = columns
    if isinstance(value, Iterable):
        return [(sentence_text(item, sentence_field=sentence_field, where=where), item) for item in value]
    if value is None:
        return [("", None)]
    raise ValueError(f"{where}: cannot read an expression from {value!r}.")


def repair_mojibake(text: str) -> str:
    """Undo UTF-8 bytes that a Python-2 pickle stored as ``str`` and ``latin1`` decoding turned into 'Ã©'."""
    if not any("\x80" <= char <= "\xff" for char in text):
        return text
    try:
        return text.encode("latin1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


_WINDOWS_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")  # C:\ or C:/, or \\server\share


def image_name_of(value: Any, *, where: str) -> str:
    """The image path a record gives, refusing what names no file: a missing value (``null``, an empty CSV cell,
    ``NaN``) would become the path ``None`` or the image root itself, and a number (an id) is no path."""
    if isinstance(value, PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: the image is {value!r}, not a file name; give each record the image's path "
                         "(relative to the image root).")
    if _URL.match(value):  # joined to the image root it named a file nobody wrote ("<root>/https:/host/a.jpg")
        raise ValueError(f"{where}: the image {value!r} is a URL, and data files name image files: download the "
                         "images and give each record its file's path (relative to the image root). "
                         "(m2ist predict and predict_boxes read URLs.)")
    return value


#: An image name that is a URL (``https://``, ``s3://``, ``data:``), which no loader reads as a file.
_URL = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]+://|data:)")


def names_a_url(value: Any) -> bool:
    """Whether ``value`` is text naming a URL (``https://``, ``hf://``, ``s3://``, ``data:``), not a local path."""
    return isinstance(value, str) and _URL.match(value) is not None


def _posix_image_name(name: str | PathLike[str], *, where: str | None) -> str | PathLike[str]:
    """``name`` with Windows separators (``images\\a.jpg``) turned to ``/`` where ``\\`` is no separator; a Windows
    absolute path (``C:\\data\\a.jpg``, ``\\\\server\\share``) is refused: it names no file here."""
    text = os.fspath(name)
    if os.sep == "\\" or not isinstance(text, str):
        return name
    if _WINDOWS_ABSOLUTE.match(text):
        raise ValueError(f"{where + ': ' if where else ''}the image path {text!r} is a Windows absolute path, which "
                         "names no file on this system: write it relative to the image root (e.g. images/a.jpg) and "
                         "pass the folder as image_root (--image-root).")
    return text.replace("\\", "/") if "\\" in text else name


def join_image_path(name: str | PathLike[str], image_root: str | PathLike[str] | None, *,
                    allow_outside_image_root: bool = True, where: str | None = None) -> str:
    """``image_root / name`` unless ``name`` is absolute or there is no root.

    With ``allow_outside_image_root=False`` (what the loaders pass by default) a path that leads outside
    ``image_root`` (``../../etc/passwd``, an absolute path elsewhere) raises ``ValueError`` naming ``where``. The
    check is on the path as written (``..`` collapsed), so symbolic links inside the root may point anywhere.
    """
    path = Path(_posix_image_name(name, where=where))
    if image_root is None:
        return str(path)
    joined = path if path.is_absolute() else Path(image_root) / path
    if not allow_outside_image_root:
        root = os.path.normpath(os.path.abspath(image_root))
        target = os.path.normpath(os.path.abspath(joined))
        if os.path.commonpath([root, target]) != root:
            raise ValueError(f"{where + ': ' if where else ''}the image path {str(name)!r} leads outside the image root "
                             f"{image_root}. Move the image under the root, or pass allow_outside_image_root=True "
                             "(--set data.allow_outside_image_root=true) if the annotations are trusted.")
    return str(joined)


def check_regular_file(path: str | PathLike[str], what: str = "File", *, reading: str | None = None) -> Path:
    """``Path(path)`` if it is a regular file (or a link to one); otherwise ``FileNotFoundError`` (missing) or
    ``ValueError`` (a folder, a FIFO, a device: reading those could block or never end). With ``reading`` (the
    loader's format), a folder another loader reads is named (:func:`format_hint`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a FIFO, a device or a socket)"
        hint = format_hint(path, reading) if reading and path.is_dir() else ""
        raise ValueError(f"{what} {path} is {kind}; give a regular file.{hint}")
    return path


def read_text_file(path: str | PathLike[str], what: str = "File", *, encoding: str = "utf-8",
                   reading: str | None = None) -> str:
    """The text of a regular file, with an error naming the file and the line of the first byte that is not
    ``encoding`` (UTF-8; a leading byte-order mark is dropped). With ``reading`` (the loader's format), a binary
    file another loader reads (a pickle, a ``torch.save`` file, a Parquet table) is named (:func:`format_hint`)."""
    data = check_regular_file(path, what, reading=reading).read_bytes()
    try:
        return data.decode("utf-8-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        hint = format_hint(path, reading) if reading else ""
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            hint = f" It is UTF-16 text (it starts with a UTF-16 byte-order mark): save it as {encoding} instead."
        fix = f".{hint}" if hint else f"; save the file as {encoding}."
        raise ValueError(f"{path}:{line}: not {encoding} text (byte {data[err.start]:#04x} at offset {err.start}){fix}"
                         ) from None


#: How each kind of REC source that :func:`sniff_format` tells apart is read: (what it looks like, how to read it,
#: the ``--data-format`` that reads it; ``None`` for a kind no loader reads as it is).
_FORMAT_KINDS: dict[str, tuple[str, str, str | None]] = {
    "coco": ("a COCO-style JSON file", "read it with load_coco_style", "coco"),
    "instances": ("the refer toolkit's instances.json (boxes and image names, no expressions)",
                  "read it with load_refer on the folder above its dataset folder (<root>/<dataset>/instances.json "
                  "next to refs(<split_by>).p)", "refer"),
    "list": ("one JSON list of records", "write each record as a JSON object on a line of its own (JSON Lines) and "
             "read it with load_jsonl", "jsonl"),
    "jsonl": ("JSON Lines (one object per line)", "read it with load_jsonl", "jsonl"),
    "csv": ("a CSV file", "read it with load_csv", "csv"),
    "torch": ("a torch.save file (a TransVG split file, <ds>_<split>.pth)", "read it with load_transvg_split",
              "transvg"),
    "pickle": ("a Python pickle (the refer toolkit's refs(<split_by>).p)",
               "read it with load_refer on the folder above its dataset folder", "refer"),
    "table": ("a Hugging Face datasets table (Arrow or Parquet)",
              "load it with datasets.load_dataset or load_from_disk and pass it to from_hf_dataset", "hf"),
    "hf-disk": ("a folder written by datasets' save_to_disk",
                "load it with datasets.load_from_disk and pass it to from_hf_dataset (or --data-root it)", "hf"),
    "refer-root": ("the refer toolkit's data folder (<dataset>/refs(<split_by>).p)",
                   "read it with load_refer (--data-root it)", "refer"),
    "refer-dataset": ("one dataset folder of the refer toolkit (refs(<split_by>).p and instances.json)",
                      "read it with load_refer, giving the folder above it as the root and its name as the dataset",
                      "refer"),
    "transvg-root": ("a TransVG split folder (<ds>_<split>.pth files)",
                     "read it with load_transvg_split (--data-root it with --dataset)", "transvg"),
}
#: The loaders' own names for what they read (``reading`` of :func:`format_hint`).
READING_FORMATS = ("jsonl", "csv", "coco", "transvg", "refer", "hf")
_SNIFF_WHOLE_LIMIT = 64 << 20  # a larger file is judged by its first bytes
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the number a pre-zip torch.save pickles first


def _sniff_folder(path: Path) -> str | None:
    if any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
        return "hf-disk"
    if any(path.glob("refs(*).p")):
        return "refer-dataset"
    if any(path.glob("*/refs(*).p")):
        return "refer-root"
    if any(path.glob("*.pth")) or any(path.glob("*/*.pth")):
        return "transvg-root"
    if any(path.glob("*.arrow")) or any(path.glob("*.parquet")):
        return "table"
    return None


def _sniff_bytes(head: bytes, suffix: str) -> str | None:
    if head.startswith(b"PK\x03\x04"):
        return "torch" if suffix in (".pth", ".pt", ".bin") or b"data.pkl" in head else None
    if head.startswith(b"PAR1") or head.startswith(b"ARROW1") or (suffix == ".arrow" and head.startswith(b"\xff" * 4)):
        return "table"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        if head[2:4] == b"\x8a\x0a" and int.from_bytes(head[4:14], "little") == _TORCH_LEGACY_MAGIC:
            return "torch"
        return "pickle"
    if head[:4] in (b"(lp0", b"(dp0"):  # a protocol-0 pickle of a list or a dict (Python 2's default)
        return "pickle"
    return None


def _sniff_text(text: str) -> str | None:
    stripped = text.lstrip("\ufeff \t\r\n")
    first = next((line for line in stripped.split("\n") if line.strip()), "")
    try:
        whole = json.loads(stripped)
    except ValueError:
        whole = None
    if isinstance(whole, dict) and isinstance(whole.get("images"), list) and "annotations" in whole:
        entries = [entry for key in ("images", "annotations") if isinstance(whole.get(key), list)
                   for entry in whole[key]]
        spoken = any(isinstance(entry, dict) and first_key(entry, TEXT_KEYS) for entry in entries)
        return "coco" if spoken or not entries else "instances"
    if isinstance(whole, list) and whole and all(isinstance(item, dict) for item in whole):
        return "list"
    if isinstance(whole, dict) and first_key(whole, (*IMAGE_KEYS, *TEXT_KEYS, *BOX_KEYS)):
        return "jsonl"  # JSON Lines of one line
    if whole is not None:
        return None
    if first.lstrip().startswith("{"):
        try:
            return "jsonl" if isinstance(json.loads(first), dict) else None
        except ValueError:
            return None
    if not first.lstrip().startswith("[") and any(mark in first for mark in ",;\t|"):
        return "csv"
    return None


def sniff_format(path: str | PathLike[str], *, text: str | None = None) -> str | None:
    """The kind of REC source ``path`` looks like (a key of ``_FORMAT_KINDS``: ``coco``, ``instances``, ``jsonl``,
    ``list``, ``csv``, ``torch``, ``pickle``, ``table``, or a folder kind), judged by its content and never raising;
    ``None`` when it is none of them. ``text`` is the file's text when the caller has read it already."""
    path = Path(path)
    try:
        if path.is_dir():
            return _sniff_folder(path)
        if text is None:
            if not path.is_file():
                return None
            with path.open("rb") as handle:
                data = handle.read(_SNIFF_WHOLE_LIMIT + 1)
            kind = _sniff_bytes(data[:64], path.suffix.lower())
            if kind is not None:
                return kind
            text = data[:_SNIFF_WHOLE_LIMIT].decode("utf-8-sig", errors="ignore" if len(data) > _SNIFF_WHOLE_LIMIT
                                                    else "strict")
        return _sniff_text(text)
    except (OSError, UnicodeDecodeError, RecursionError):
        return None


def format_hint(path: str | PathLike[str], reading: str, *, text: str | None = None) -> str:
    """`` It looks like ...: read it with ... (--data-format ...).`` when ``path`` looks like a REC source that
    another loader than ``reading`` (one of :data:`READING_FORMATS`) reads; ``""`` when it looks like what is being
    read, or like nothing known. Every loader adds it to the error that says its input cannot be read."""
    kind = sniff_format(path, text=text)
    if kind is None:
        return ""
    what, how, data_format = _FORMAT_KINDS[kind]
    if data_format == reading and kind != "list":
        return ""
    return f" It looks like {what}: {how}" + (f" (--data-format {data_format})." if data_format else ".")


def near_miss_hint(found: Iterable[Any], wanted: Sequence[str]) -> str:
    """A hint naming the found keys that are one of ``wanted`` but for case or surrounding spaces (``'Image '``), for
    the error that says a key is missing; ``""`` when there is none."""
    misses = [(key, key.strip().lower()) for key in found
              if isinstance(key, str) and key not in wanted and key.strip().lower() in wanted]
    if not misses:
        return ""
    pairs = ", ".join(f"{key!r} is not {name!r}" for key, name in misses[:3])
    return f" Names are matched exactly ({pairs}): rename them in lower case without surrounding spaces."


def other_texts(record: Mapping[str, Any], chosen: str, keys: Sequence[str] = TEXT_KEYS) -> list[str]:
    """The keys among ``keys`` but ``chosen`` under which ``record`` holds another text than under ``chosen`` (a
    ``caption`` of the whole image beside the ``phrase``): only ``chosen`` becomes the expression."""
    return [key for key in keys if key != chosen and key in record and record[key] not in (None, "", [])
            and record[key] != record[chosen]]


def warn_other_texts(found: Sequence[tuple[str, str, list[str]]], *, fix: str, stacklevel: int = 2) -> None:
    """One warning counting the records (``(where, key read, other keys)``, see :func:`other_texts`) whose other
    text keys are not read, naming the first; nothing when ``found`` is empty. ``stacklevel`` counts from the
    caller."""
    if found:
        where, chosen, others = found[0]
        warnings.warn(f"{len(found)} record(s) hold different texts under several text keys (first at {where}: "
                      f"{chosen!r} and {', '.join(map(repr, others))}), and only {chosen!r} is read as the referring "
                      f"expression (the first of {list(TEXT_KEYS)} present): {fix}", stacklevel=stacklevel + 1)


def warn_without_expression(wheres: Sequence[str], *, what: str = "record(s)", field: str = "the text field",
                            stacklevel: int = 2) -> None:
    """One warning counting the records (refs, rows, annotations) whose text field lists no expression, so give no
    sample, and naming the first; nothing when ``wheres`` is empty. ``stacklevel`` counts from the caller."""
    if wheres:
        warnings.warn(f"{len(wheres)} {what} list no expression (an empty list in {field}, first at {wheres[0]}) and "
                      "give no sample: add their referring phrases or remove them.", stacklevel=stacklevel + 1)


def refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` ``object_pairs_hook``: an object naming one key twice is refused (JSON keeps the last value,
    so ``{"text": "dog", "text": "cat"}`` would silently lose ``"dog"``)."""
    result = dict(pairs)
    if len(result) == len(pairs):
        return result
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"the object {result!r:.80} names the key {key!r} twice and JSON keeps only the last "
                             "value; remove or rename one of them.")
        seen.add(key)
    return result  # pragma: no cover - a shorter dict has a repeated key


def first_key(row: dict[str, Any], keys: Sequence[str]) -> str | None:
    """The first of ``keys`` present in ``row`` (``None`` when none is)."""
    for key in keys:
        if key in row:
            return key
    return None


def normalize_split_request(split: str | Sequence[str] | None) -> list[str] | None:
    """``None``/``"all"`` -> ``None`` (every split); a string or a non-empty list of strings -> a list of split
    names. An empty list (which would select nothing, silently) and names that are not strings are refused."""
    if split is None:
        return None
    if isinstance(split, str):
        return None if split.lower() == "all" else [split]
    names = list(split)
    if not names:
        raise ValueError("split=[] selects no split at all; pass a split name (e.g. 'val'), a list of names, or "
                         "None / 'all' for every split.")
    wrong = [name for name in names if not isinstance(name, str)]
    if wrong:
        raise ValueError(f"split names must be strings, got {wrong[0]!r} in split={names!r}.")
    return names


_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}


def canonical_split(name: str) -> str:
    """Compare split names case-insensitively and without surrounding spaces (``" testA"`` from a CSV written
    with spaces after its commas), with ``validation``/``dev`` meaning ``val``."""
    lowered = str(name).strip().lower()
    return _SPLIT_ALIASES.get(lowered, lowered)


def match_splits(requested: list[str], available: Iterable[str], *, source: str) -> set[str]:
    """Map requested split names onto the ones ``source`` has (``testa`` -> ``testA``) or say what exists."""
    available = sorted({str(name) for name in available})
    by_canonical: dict[str, set[str]] = {}
    for name in available:  # 'val' and 'validation' (or 'testA' and 'testa') are one split: take every spelling
        by_canonical.setdefault(canonical_split(name), set()).add(name)
    chosen: set[str] = set()
    for name in requested:
        match = by_canonical.get(canonical_split(name))
        if match is None:
            raise ValueError(f"{source} has no split {name!r}; available splits: {available}.")
        chosen |= match
    return chosen


def is_finite_box(box: Sequence[float]) -> bool:
    """True when all four coordinates are finite numbers."""
    return all(math.isfinite(value) for value in box)


#: Unicode categories of characters that show nothing: controls (NUL, ESC), format characters (zero-width space
#: and joiners, byte-order mark, soft hyphen), surrogates, private-use and unassigned code points, and separators.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})


def has_visible_text(text: str) -> bool:
    """Whether ``text`` holds at least one character that shows (not whitespace, a control or a zero-width
    character): ``"\\x00"``, ``"\\u200b"`` and ``" \\t"`` have none, and a tokenizer turns them into nothing."""
    return any(unicodedata.category(char) not in _INVISIBLE_CATEGORIES for char in text)


def annotated_size(record: Any, *, where: str, box_keys: Sequence[str] = ()) -> tuple[int, int] | None:
    """The image size a record states in ``width``/``height`` (``None`` when it states none, or when those
    are the box's own columns, as in a CSV with ``x,y,width,height`` columns); whole positive pixels or an error."""
    if not isinstance(record, dict) or {"width", "height"} & set(box_keys):
        return None
    if record.get("width") in (None, "") or record.get("height") in (None, ""):
        return None
    try:
        size = float(record["width"]), float(record["height"])
    except (TypeError, ValueError):
        size = (0.0, 0.0)
    if not all(math.isfinite(value) and value >= 1 and value.is_integer() for value in size):
        raise ValueError(f"{where}: the image width/height must be whole positive numbers of pixels, got "
                         f"{record['width']!r}, {record['height']!r}. Fix them, or remove them to read the size from "
                         "the image file.")
    return int(size[0]), int(size[1])


def index_unique(entries: Iterable[dict[str, Any]], key: str, *, where: str) -> dict[Any, dict[str, Any]]:
    """``{entry[key]: entry}``, refusing two entries with one id (the later one would silently replace the earlier,
    and every record naming that id would get its image or box) and ids that cannot be looked up (lists, dicts)."""
    index: dict[Any, dict[str, Any]] = {}
    positions: dict[Any, int] = {}
    for position, entry in enumerate(entries):
        value = entry[key]
        if not isinstance(value, Hashable):
            raise ValueError(f"{where}[{position}]: '{key}' is {value!r}; an id must be a number or a string.")
        if value in index:
            raise ValueError(f"{where}: entries {positions[value]} and {position} both have {key} {value!r}; ids must "
                             "be unique (two files merged, or an entry duplicated). Remove or renumber one of them.")
        index[value] = entry
        positions[value] = position
    return index
