"""Loading REC splits for the command line: ``--data-format`` picks one of the library's loaders
(:mod:`m2ist.data`), and a missing option is reported with the flag to add."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import CLIError

DATA_FORMATS = ("refer", "transvg", "jsonl", "csv", "coco", "hf")

SPLIT_FORMATS = ("refer", "transvg", "hf")

FILE_FORMATS = ("jsonl", "csv", "coco")

_SPLIT_NAME = re.compile(r"[\w.+-]+")

def _name_and_path(item: str) -> tuple[str, str]:
    """``NAME=PATH`` when the part before the first ``=`` is a plain name (no ``/``) and ``item`` is not itself an
    existing path; else ``item`` is the path and the split is named after its file name (``val.jsonl`` -> ``val``)."""
    name, sep, path = item.partition("=")
    if sep and path and _SPLIT_NAME.fullmatch(name) and not Path(item).exists():
        return name, path
    return Path(item).stem, item

def _eval_files(value: Any) -> dict[str, str]:
    """``{split name: file}`` of ``--eval-file`` values (``[NAME=]PATH``); two files with one split name raise."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    items = [value] if isinstance(value, str) else list(value)
    files: dict[str, str] = {}
    for item in items:
        name, path = _name_and_path(str(item))
        if name in files:
            raise CLIError(f"--eval-file {files[name]} and --eval-file {path} both make a split named {name!r}; name "
                           f"them apart with NAME=PATH, e.g. --eval-file {name}_1={files[name]} "
                           f"--eval-file {name}_2={path}.")
        files[name] = path
    return files

def absolute_path(value: Any, named: bool = False) -> Any:
    """``value`` made absolute when it is a local path that exists (``~`` expanded), anything else as given.
    ``named``: ``value`` may be ``NAME=PATH`` (an ``--eval-file``), and only its path is made absolute."""
    if not isinstance(value, str):
        return value
    name, path = _name_and_path(value) if named else ("", value)
    local = Path(path).expanduser()
    if not local.exists():
        return value
    return f"{name}={local.resolve()}" if path != value else str(local.resolve())

def data_record(data: Mapping[str, Any]) -> dict[str, Any]:
    """The data settings as results record them: local paths made absolute (``val.jsonl`` alone does not say which
    file was scored once the results are read from another folder), ``eval_files`` as ``{split: file}``."""
    from .settings import plain

    record = plain(data)
    for key in ("data_root", "image_root", "train_file"):
        if key in record:
            record[key] = absolute_path(record[key])
    if record.get("eval_files") is not None:  # the splits were loaded: the names are known to be distinct
        record["eval_files"] = {name: absolute_path(path) for name, path in _eval_files(data["eval_files"]).items()}
    return record

def _split_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part for part in re.split(r"[,\s]+", value) if part]
    return [str(v) for v in value]

def _hf_rows(data: Mapping[str, Any]) -> Any:
    try:
        import datasets
    except ImportError as err:
        raise CLIError("--data-format hf needs the `datasets` package: pip install 'm2ist[datasets]'.") from err
    source = data.get("data_root")
    if not source:
        raise CLIError("--data-format hf needs --data-root: a Hub dataset id (e.g. jxu124/refcoco) or a folder "
                       "written by Dataset.save_to_disk.")
    if Path(source).is_dir() and any((Path(source) / n).is_file() for n in ("dataset_dict.json", "dataset_info.json")):
        if data.get("dataset"):  # load_from_disk takes no configuration name: it would be ignored
            raise CLIError(f"--dataset {data['dataset']} names a configuration of a Hub dataset, but --data-root "
                           f"{source} is a folder written by save_to_disk, which has none (it would be ignored): drop "
                           "--dataset, or give the folder of the configuration you mean.")
        return datasets.load_from_disk(source)
    from m2ist.data.loaders import format_hint

    hint = format_hint(source, "hf") if Path(source).exists() else ""
    if hint:  # a local file or folder another --data-format reads: load_dataset would treat it as a Hub id or script
        raise CLIError(f"--data-format hf: --data-root {source} is no Hugging Face dataset (a Hub id, or a folder "
                       f"written by Dataset.save_to_disk).{hint}")
    return datasets.load_dataset(source, data.get("dataset"))

def _sample_limit(data: Mapping[str, Any], key: str) -> int | None:
    """``data[key]`` as a whole number >= 1, or None: a negative limit would slice samples off the end (``-1``
    drops the last one), ``2.7`` would be cut to 2 and ``0`` would empty the split."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        flag = "--" + key.replace("_", "-")
        raise CLIError(f"{flag} / data.{key} must be a whole number of expressions >= 1 (or null for all), got "
                       f"{value!r}.")
    return value

def csv_delimiter(data: Mapping[str, Any]) -> str:
    """The CSV delimiter of ``data['csv_delimiter']`` (``','`` when unset; ``tab`` or ``\\t`` for a tab): one
    character, for ``--data-format csv`` only (another format would ignore it without a word)."""
    value = data.get("csv_delimiter")
    if value is None:
        return ","
    value = "\t" if value in ("tab", "\\t") else value
    if not isinstance(value, str) or len(value) != 1 or value in "\"\r\n" or value.isalnum():
        raise CLIError(f"--csv-delimiter / data.csv_delimiter must be one character between columns, such as ';' or "
                       f"tab, got {value!r}.")
    return value


#: The data settings that only some ``--data-format`` values read (every format reads the others: ``image_root``,
#: ``train_split``, the sample limits...), with the formats that read each. ``train_file`` / ``eval_files`` are
#: refused for ``refer`` / ``hf`` by the settings layer (:mod:`m2ist.cli.settings`).
FORMAT_SETTINGS: dict[str, tuple[str, ...]] = {
    "data_root": ("refer", "transvg", "hf"),
    "dataset": ("refer", "transvg", "hf"),
    "split_by": ("refer",),
    "box_format": ("jsonl", "csv", "coco", "hf"),
    "normalized": ("jsonl", "csv", "coco", "hf"),
    "trusted": ("transvg",),
    "text_column": ("hf",),
    "hf_style": ("hf",),
    "sentence_field": ("refer", "hf"),
    "csv_delimiter": ("csv",),
}


def settings_of_other_formats(data: Mapping[str, Any]) -> list[str]:
    """The data settings given (not null, false or empty) that ``data['format']`` does not read (see
    :data:`FORMAT_SETTINGS`); none for an unknown or missing format."""
    fmt = data.get("format")
    if fmt not in DATA_FORMATS:
        return []
    return [key for key, formats in FORMAT_SETTINGS.items()
            if fmt not in formats and data.get(key) not in (None, False, "")]


def refuse_settings_of_other_formats(data: Mapping[str, Any]) -> None:
    """Refuse a data setting the chosen ``--data-format`` would ignore without a word (``--sentence-field raw`` for
    a JSONL file read the 'sent' texts, ``--box-format xyxy`` for the refer files read their COCO ``xywh`` boxes)."""
    unread = settings_of_other_formats(data)
    if unread:
        key = unread[0]
        flag = "--" + key.replace("_", "-")
        readers = ", ".join(FORMAT_SETTINGS[key])
        raise CLIError(f"{flag} / data.{key} applies to --data-format {readers}, not {data['format']}, which would "
                       f"ignore it: drop it, or pick the format that reads it.")


def _sample_key(sample: Any) -> tuple[Any, ...] | None:
    """What makes two samples the same expression: the image (its path, or the ``image_id`` of an image held in
    memory), the expression and the box; ``None`` for an in-memory image without an id."""
    image = sample.image
    if isinstance(image, str | os.PathLike):
        where: Any = os.path.normpath(os.fspath(image))
    elif sample.image_id is not None:
        where = ("image_id", sample.image_id)
    else:
        return None
    return where, sample.expression, tuple(sample.box)


def warn_evaluation_overlap(train: Sequence[Any], evaluation: Mapping[str, Sequence[Any]]) -> None:
    """Warn for each evaluation split that holds training samples (same image, expression and box): the training
    file given again as ``--eval-file``, ``--train-split val`` with ``--eval-splits val``, a file read whole as
    both. Its scores would be reported as held-out accuracy; refusing would stop a deliberate check of the fit."""
    from .loading import logger

    seen = {key for key in map(_sample_key, train) if key is not None}
    for name, samples in evaluation.items():
        shared = [sample for sample in samples if _sample_key(sample) in seen]
        if shared:
            first = shared[0]
            logger.warning("The evaluation split %r shares %d of its %d expressions with the training data (same "
                           "image, expression and box; e.g. %s %r): its scores measure the fit to the training "
                           "data, not held-out accuracy. Evaluate on other data (from a file of several splits, read "
                           "each by its name: --train-split train --eval-file val=FILE).", name, len(shared), len(samples),
                           first.image if isinstance(first.image, str | os.PathLike) else first.image_id,
                           first.expression)


def _refuse_one_split_named_twice(names: Sequence[str]) -> None:
    """Refuse evaluation split names that are one split to the loaders (``val`` and ``validation``, ``testA`` and
    ``testa``, a name repeated): it was loaded and scored once per name, a table row each, or silently once."""
    from m2ist.data.loaders import canonical_split

    seen: dict[str, str] = {}
    for name in names:
        first = seen.get(canonical_split(name))
        if first is not None:
            same = "twice" if first == name else f"twice ({first!r} and {name!r} are one split)"
            raise CLIError(f"--eval-splits / data.eval_splits names the split {first!r} {same}: give each split once.")
        seen[canonical_split(name)] = name


def eval_limit_cut_nothing(data: Mapping[str, Any], splits: Mapping[str, Sequence[Any]]) -> bool:
    """Whether ``data['max_eval_samples']`` is set and every split loaded holds fewer expressions than it: the
    splits are whole, and their scores are to be recorded (and named) as the whole splits' (a model card leaves out
    results that name a limit)."""
    limit = data.get("max_eval_samples")
    return limit is not None and all(len(samples) < limit for samples in splits.values())


def load_data_splits(data: Mapping[str, Any], role: str) -> dict[str, list]:
    """Load ``{split_name: list[RECSample]}`` for ``role`` ``"train"`` (one split) or ``"eval"`` with the loader
    of ``data['format']``; missing options raise a :class:`CLIError` that names the flag to add."""
    from m2ist.data.files import load_coco_style, load_csv, load_jsonl
    from m2ist.data.hf import from_hf_dataset
    from m2ist.data.refer import load_refer
    from m2ist.data.transvg import load_transvg_split

    fmt = data.get("format")
    if fmt is None:
        raise CLIError(f"No data format: pass --data-format {{{','.join(DATA_FORMATS)}}} (or data.format in the config).")
    if fmt not in DATA_FORMATS:
        raise CLIError(f"Unknown data format {fmt!r}; choose one of {', '.join(DATA_FORMATS)}.")
    refuse_settings_of_other_formats(data)
    delimiter = csv_delimiter(data)
    image_root = data.get("image_root")
    outside = {"allow_outside_image_root": bool(data.get("allow_outside_image_root", False))}
    if role == "train":
        files = {str(data.get("train_split", "train")): data["train_file"]} if data.get("train_file") else {}
        names = [str(data.get("train_split", "train"))]
    else:
        files = _eval_files(data.get("eval_files"))
        names = _split_list(data.get("eval_splits"))
        if files and names:  # the settings layer keeps one of them; a caller building settings itself may not
            raise CLIError(f"data.eval_splits {names} and data.eval_files {list(files)} are both set, and only the files "
                           "would be read: name each file's split with --eval-file NAME=FILE, or give only the split "
                           "names.")
        if not names and not files and fmt in SPLIT_FORMATS:
            names = ["val"]
        _refuse_one_split_named_twice(names)
    limit = _sample_limit(data, "max_train_samples" if role == "train" else "max_eval_samples")

    splits: dict[str, list] = {}
    if fmt in FILE_FORMATS:
        if not files:
            flag = "--train-file FILE" if role == "train" else "--eval-file [NAME=]FILE"
            raise CLIError(f"--data-format {fmt} reads files: pass {flag}.")
        for name, path in files.items():
            # records that name their split give the rows of the split this file is read as (--train-split, the
            # NAME of --eval-file NAME=FILE or the file's stem); a file that names none is that split whole
            options = {"image_root": image_root, "normalized": bool(data.get("normalized", False)), **outside,
                       "split": None if name.lower() == "all" else name, "split_optional": True}
            if fmt != "coco" and not data.get("box_format"):
                raise CLIError(f"--data-format {fmt} needs --box-format {{xyxy,xywh,cxcywh}}: how {path} stores boxes.")
            try:
                if fmt == "coco":
                    splits[name] = load_coco_style(path, data.get("box_format") or "xywh", **options)
                elif fmt == "csv":
                    splits[name] = load_csv(path, data["box_format"], delimiter=delimiter, **options)
                else:
                    splits[name] = load_jsonl(path, data["box_format"], **options)
            except ValueError as err:
                if role == "train" or name != Path(path).stem or "has no split" not in str(err):
                    raise
                # --eval-file data.jsonl is read as the split 'data' (its file name), which its records do not name
                raise CLIError(f"{' '.join(str(err).split())} --eval-file {path} is read as the split {name!r} (its file "
                               f"name): name the split to read, e.g. --eval-file val={path}, or all={path} for every "
                               "record.") from err
    elif fmt == "transvg" and files:
        for name, path in files.items():
            # an evaluation split named for a file (--eval-file testA=unc_val.pth) is the split its samples are
            # labelled with, so a file whose own name says another split is refused; a file named by its stem (no
            # NAME=) and the training file keep the split their file name says
            named = role != "train" and name != Path(path).stem
            splits[name] = load_transvg_split(path, data.get("dataset"), image_root, trusted=bool(data.get("trusted")),
                                              split=name if named else None, **outside)
    elif fmt == "transvg":
        if not data.get("data_root") or not data.get("dataset"):
            raise CLIError("--data-format transvg needs --data-root (the split root holding <ds>/<ds>_<split>.pth) and "
                           "--dataset (unc, unc+, gref, gref_umd, referit, flickr); or give the .pth files with "
                           "--train-file / --eval-file.")
        for name in names:
            splits[name] = load_transvg_split(data["data_root"], data["dataset"], image_root, split=name,
                                              trusted=bool(data.get("trusted")), **outside)
    elif fmt == "refer":
        if not data.get("data_root"):
            raise CLIError("--data-format refer needs --data-root: the folder holding <dataset>/refs(<split_by>).p and "
                           "instances.json.")
        for name in names:
            splits[name] = load_refer(data["data_root"], data.get("dataset") or "refcoco", data.get("split_by"),
                                      split=name, image_root=image_root,
                                      sentence_field=data.get("sentence_field") or "sent", **outside)
    else:  # hf
        rows = _hf_rows(data)
        for name in names:
            splits[name] = from_hf_dataset(rows, data.get("box_format"), image_root, split=name,
                                           style=data.get("hf_style"), text_column=data.get("text_column"),
                                           sentence_field=data.get("sentence_field") or "sent",
                                           normalized=bool(data.get("normalized", False)), **outside)
    for name, samples in splits.items():
        if not samples:
            raise CLIError(f"The {name!r} split has no samples.")
        if limit is not None:
            splits[name] = samples[:limit]
    return splits
