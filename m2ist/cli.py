"""The ``m2ist`` command line: ``train``, ``eval`` and ``predict``, plus ``demo``, ``bench`` and ``compare``.

Settings come in layers (see :data:`SETTINGS_HELP`): defaults < ``--config FILE`` < ``--set key=value`` < flags.
The shipped paper configs live in ``m2ist/configs/``; ``--config refcoco`` finds ``refcoco.yaml`` there.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import logging
import re
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CONFIG_DIR",
    "DATA_FORMATS",
    "SECTIONS",
    "SETTINGS_HELP",
    "CLIError",
    "build_m2ist_config",
    "build_parser",
    "build_training_arguments",
    "load_config_file",
    "load_data_splits",
    "main",
    "resolve_settings",
]

logger = logging.getLogger("m2ist.cli")

#: Folder of the shipped configs (``refcoco.yaml``, ``refcoco+.yaml``, ``refcocog.yaml``, ``referit.yaml``).
CONFIG_DIR = Path(__file__).parent / "configs"
SECTIONS = ("model", "m2ist", "data", "training", "augmentation", "evaluation")
DATA_FORMATS = ("refer", "transvg", "jsonl", "csv", "coco", "hf")
SPLIT_FORMATS = ("refer", "transvg", "hf")
FILE_FORMATS = ("jsonl", "csv", "coco")
PASSTHROUGH = {
    "demo": "m2ist.demo",
    "bench": "m2ist.bench",
    "compare": "m2ist.compare",
}
PASSTHROUGH_HELP = {
    "demo": "offline end-to-end demo on synthetic data (arguments are passed to `m2ist demo --help`)",
    "bench": "memory and time of one training step per method (see `m2ist bench --help`)",
    "compare": "compare M²IST with the baselines (see `m2ist compare --help`)",
}
MODEL_KEYS = ("vision_model", "text_model", "vision_revision", "text_revision", "trust_remote_code", "adapter",
              "processor")
DATA_KEYS = ("format", "data_root", "dataset", "split_by", "image_root", "train_split", "eval_splits", "train_file",
             "eval_files", "box_format", "normalized", "trusted", "text_column", "sentence_field", "hf_style",
             "max_train_samples", "max_eval_samples", "skip_invalid", "augment")
EVALUATION_KEYS = ("batch_size", "iou_thresholds", "output_file", "save_predictions", "clamp", "num_workers", "device",
                   "progress", "final_eval")
# M2ISTConfig fields that record the towers (filled in by the model) or are measured: never set from the CLI.
_RECORDED_FIELDS = ("vision_model_name_or_path", "vision_revision", "vision_model_type", "vision_width", "vision_depth",
                    "text_model_name_or_path", "text_revision", "text_model_type", "text_width", "text_depth",
                    "config_version", "num_vision_tokens")
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
EXIT_USAGE = 2
#: How settings are layered and which keys each config-file section takes (shown by ``m2ist train --help``).
SETTINGS_HELP = """\
Settings come in layers, later ones winning: built-in defaults < --config FILE (YAML or JSON) < --set key=value <
explicit flags. A config file has these sections (all optional):

  model:        vision_model, text_model, vision_revision, text_revision, trust_remote_code, adapter, processor
  m2ist:        M2ISTConfig fields (bottleneck, image_size, max_query_len, experts, ...)
  data:         format, data_root, dataset, split_by, image_root, train_split, eval_splits, train_file, eval_files,
                box_format, normalized, trusted, text_column, sentence_field, hf_style, max_train_samples,
                max_eval_samples, skip_invalid, augment
  training:     RECTrainingArguments fields (output_dir, num_train_epochs, per_device_train_batch_size,
                learning_rate, side_learning_rate, weight_decay, lr_drop_epochs, method, resume_from_checkpoint, ...)
  augmentation: RECAugmentation fields (hflip_p, random_crop, jitter_p, ...)
  evaluation:   batch_size, iou_thresholds, output_file, save_predictions, clamp, num_workers, device, progress,
                final_eval

--set takes section.key=value, or a bare key=value when the key belongs to one section only; values are read as
YAML (--set training.lr_drop_epochs=[60]). Shipped configs (the paper's settings): --config refcoco, refcoco+,
refcocog, referit (m2ist/configs/*.yaml).
"""


class CLIError(Exception):
    """A mistake in the command line, a config file or the data it names: reported without a traceback (exit 2)."""


# ---------------------------------------------------------------------------------------------- field tables
def _dataclass_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def _m2ist_fields() -> dict[str, dataclasses.Field]:
    from m2ist.config import M2ISTConfig

    return {name: f for name, f in _dataclass_fields(M2ISTConfig).items() if name not in _RECORDED_FIELDS}


def _augmentation_fields() -> dict[str, dataclasses.Field]:
    from m2ist.data.transforms import RECAugmentation

    return _dataclass_fields(RECAugmentation)


def _training_arguments_class() -> type:
    try:
        from m2ist.trainer import RECTrainingArguments
    except ImportError as err:  # pragma: no cover - the trainer ships with the package
        raise CLIError(f"The trainer cannot be imported ({err}); reinstall m2ist.") from err
    return RECTrainingArguments


def _section_keys() -> dict[str, set[str]]:
    return {
        "model": set(MODEL_KEYS),
        "m2ist": set(_m2ist_fields()),
        "data": set(DATA_KEYS),
        "training": set(_dataclass_fields(_training_arguments_class())) | {"resume_from_checkpoint"},
        "augmentation": set(_augmentation_fields()),
        "evaluation": set(EVALUATION_KEYS),
    }


# ---------------------------------------------------------------------------------------------- config files
def _coerce_scalars(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: turn such strings into floats, recursively."""
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)
    if isinstance(value, Mapping):
        return {k: _coerce_scalars(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_coerce_scalars(v) for v in value]
    return value


def _config_path(path: str | Path) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    for name in (str(path), f"{path}.yaml", f"{path}.yml", f"{path}.json"):
        shipped = CONFIG_DIR / name
        if "/" not in str(path) and shipped.is_file():
            return shipped
    shipped_names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise CLIError(f"Config file not found: {path} (shipped configs: {', '.join(shipped_names) or 'none'}).")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file (or the name of a shipped config) into a dict of sections.

    Top-level keys are section names (see the module docstring) or bare keys that belong to one section only.
    """
    file = _config_path(path)
    text = file.read_text(encoding="utf-8")
    try:
        values = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise CLIError(f"Cannot parse config file {file}: {err}") from err
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise CLIError(f"Config file {file} must hold a mapping of sections ({', '.join(SECTIONS)}), "
                       f"found a {type(values).__name__}.")
    sections: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise CLIError(f"Config file {file}: section '{key}' must be a mapping, found {value!r}.")
            for name, item in value.items():
                _assign(sections, key, str(name), item, source=str(file))
        else:
            section = _section_of(str(key), source=str(file))
            _assign(sections, section, str(key), value, source=str(file))
    return _coerce_scalars(sections)


def _section_of(key: str, *, source: str) -> str:
    owners = [section for section, keys in _section_keys().items() if key in keys]
    if not owners:
        raise CLIError(f"{source}: unknown setting '{key}'. Use 'section.key' with a section among {', '.join(SECTIONS)} "
                       "(see `m2ist train --help`).")
    if len(owners) > 1:
        raise CLIError(f"{source}: '{key}' exists in several sections ({', '.join(owners)}); write "
                       f"{' or '.join(f'{o}.{key}' for o in owners)}.")
    return owners[0]


def _assign(settings: dict[str, Any], section: str, key: str, value: Any, *, source: str) -> None:
    if section not in SECTIONS:
        raise CLIError(f"{source}: unknown section '{section}'; sections are {', '.join(SECTIONS)}.")
    known = _section_keys()[section]
    if key not in known:
        close = sorted(k for k in known if k.startswith(key[:4]))[:5]
        hint = f" Did you mean one of {close}?" if close else ""
        raise CLIError(f"{source}: '{key}' is not a {section} setting.{hint}")
    settings.setdefault(section, {})[key] = value


def _parse_set(item: str) -> tuple[str, str, Any]:
    if "=" not in item:
        raise CLIError(f"--set expects key=value (e.g. --set training.num_train_epochs=5), got {item!r}.")
    key, raw = item.split("=", 1)
    key = key.strip().replace("-", "_")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise CLIError(f"--set {item!r}: the value is not valid YAML ({err}).") from err
    if "." in key:
        section, name = key.split(".", 1)
    else:
        section, name = _section_of(key, source=f"--set {item}"), key
    return section, name, _coerce_scalars(value)


def resolve_settings(namespace: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Merge ``--config`` (lowest), ``--set`` and explicit flags (highest) into ``{section: {key: value}}``."""
    settings: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    config = getattr(namespace, "config", None)
    if config is not None:
        for section, values in load_config_file(config).items():
            settings[section].update(values)
    for item in getattr(namespace, "set", None) or []:
        section, name, value = _parse_set(item)
        _assign(settings, section, name, value, source=f"--set {item}")
    for dest, value in vars(namespace).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            settings[section][name] = value
    return settings


# ---------------------------------------------------------------------------------------------- builders
def build_m2ist_config(settings: Mapping[str, Mapping[str, Any]]):
    """The :class:`~m2ist.config.M2ISTConfig` of ``settings['m2ist']`` (unknown keys and bad values raise CLIError)."""
    from m2ist.config import M2ISTConfig

    values = dict(settings.get("m2ist", {}))
    unknown = sorted(set(values) - set(_m2ist_fields()))
    if unknown:
        raise CLIError(f"Unknown m2ist settings {unknown}; valid ones: {sorted(_m2ist_fields())}.")
    try:
        return M2ISTConfig(**values)
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from err


def build_training_arguments(settings: Mapping[str, Mapping[str, Any]], **overrides: Any):
    """``RECTrainingArguments`` from ``settings['training']`` (without ``resume_from_checkpoint``, which goes to
    ``train()``); ``overrides`` (e.g. ``output_dir``) win."""
    cls = _training_arguments_class()
    values = {k: v for k, v in settings.get("training", {}).items() if k != "resume_from_checkpoint"}
    values.update(overrides)
    if not values.get("output_dir"):
        raise CLIError("No output folder: pass --output-dir DIR (or training.output_dir in the config file).")
    unknown = sorted(set(values) - set(_dataclass_fields(cls)))
    if unknown:
        raise CLIError(f"Unknown training arguments {unknown}: see RECTrainingArguments / transformers.TrainingArguments.")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise CLIError(f"Invalid training arguments: {err}") from err


def build_augmentation(settings: Mapping[str, Mapping[str, Any]]):
    """``RECAugmentation`` from ``settings['augmentation']``, or ``None`` when ``data.augment`` is false."""
    from m2ist.data.transforms import RECAugmentation

    if not settings.get("data", {}).get("augment", True):
        return None
    try:
        return RECAugmentation(**settings.get("augmentation", {}))
    except (TypeError, ValueError) as err:
        raise CLIError(f"Invalid augmentation settings: {err}") from err


# ---------------------------------------------------------------------------------------------- data
def _eval_files(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    items = [value] if isinstance(value, str) else list(value)
    files: dict[str, str] = {}
    for item in items:
        name, _, path = str(item).rpartition("=")
        files[name or Path(path).stem] = path
    return files


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
        return datasets.load_from_disk(source)
    return datasets.load_dataset(source, data.get("dataset"))


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
    image_root = data.get("image_root")
    if role == "train":
        files = {str(data.get("train_split", "train")): data["train_file"]} if data.get("train_file") else {}
        names = [str(data.get("train_split", "train"))]
    else:
        files = _eval_files(data.get("eval_files"))
        names = _split_list(data.get("eval_splits"))
        if not names and not files and fmt in SPLIT_FORMATS:
            names = ["val"]
    limit = data.get("max_train_samples" if role == "train" else "max_eval_samples")

    splits: dict[str, list] = {}
    if fmt in FILE_FORMATS:
        if not files:
            flag = "--train-file FILE" if role == "train" else "--eval-file [NAME=]FILE"
            raise CLIError(f"--data-format {fmt} reads files: pass {flag}.")
        for name, path in files.items():
            options = {"image_root": image_root, "normalized": bool(data.get("normalized", False))}
            if fmt == "coco":
                splits[name] = load_coco_style(path, data.get("box_format") or "xywh", **options)
            else:
                if not data.get("box_format"):
                    raise CLIError(f"--data-format {fmt} needs --box-format {{xyxy,xywh,cxcywh}}: how {path} stores boxes.")
                loader = load_jsonl if fmt == "jsonl" else load_csv
                splits[name] = loader(path, data["box_format"], **options)
    elif fmt == "transvg" and files:
        for name, path in files.items():
            splits[name] = load_transvg_split(path, data.get("dataset"), image_root, trusted=bool(data.get("trusted")))
    elif fmt == "transvg":
        if not data.get("data_root") or not data.get("dataset"):
            raise CLIError("--data-format transvg needs --data-root (the split root holding <ds>/<ds>_<split>.pth) and "
                           "--dataset (unc, unc+, gref, gref_umd, referit, flickr); or give the .pth files with "
                           "--train-file / --eval-file.")
        for name in names:
            splits[name] = load_transvg_split(data["data_root"], data["dataset"], image_root, split=name,
                                              trusted=bool(data.get("trusted")))
    elif fmt == "refer":
        if not data.get("data_root"):
            raise CLIError("--data-format refer needs --data-root: the folder holding <dataset>/refs(<split_by>).p and "
                           "instances.json.")
        for name in names:
            splits[name] = load_refer(data["data_root"], data.get("dataset") or "refcoco", data.get("split_by"),
                                      split=name, image_root=image_root,
                                      sentence_field=data.get("sentence_field") or "sent")
    else:  # hf
        rows = _hf_rows(data)
        for name in names:
            splits[name] = from_hf_dataset(rows, data.get("box_format"), image_root, split=name,
                                           style=data.get("hf_style"), text_column=data.get("text_column"),
                                           sentence_field=data.get("sentence_field") or "sent",
                                           normalized=bool(data.get("normalized", False)))
    for name, samples in splits.items():
        if not samples:
            raise CLIError(f"The {name!r} split has no samples.")
        if limit is not None:
            splits[name] = samples[: int(limit)]
    return splits


# ---------------------------------------------------------------------------------------------- helpers
def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _local_or_hub(name: str) -> str:
    """An existing local path made absolute (so the adapter records where to reload it from), else the Hub id."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _load_tower(name: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoModel

    return AutoModel.from_pretrained(_local_or_hub(name), revision=revision, trust_remote_code=trust_remote_code)


def _looks_like_repo_id(name: str) -> bool:
    """``owner/name`` with Hub-legal characters (adapters are always namespaced); paths like ``./x`` or ``a/b/c`` are not."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None and not name.startswith(("./", "../"))


def _refuse_baseline_checkpoint(folder: Path) -> None:
    """Baseline checkpoints (``--method full|adapter|lora``) hold tower tensors a side adapter cannot load: say so."""
    from safetensors import safe_open

    from m2ist.save_and_load import WEIGHTS_NAME

    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        return
    with safe_open(str(weights), "pt") as handle:
        method = (handle.metadata() or {}).get("m2ist_method")
    if method not in (None, "m2ist"):
        raise CLIError(f"{folder} holds a {method!r} baseline checkpoint, not an M²IST side adapter; eval and predict "
                       "load side adapters. In Python: model = m2ist.baselines.build_model(vision, text, config, "
                       f"method={method!r}); m2ist.trainer.load_trainable_tensors(model, {str(folder)!r}).")


def _load_adapter(settings: Mapping[str, Mapping[str, Any]]):
    """``(model, processor)`` from ``model.adapter`` (+ optional tower and processor overrides)."""
    from m2ist.model import SideTunedModel
    from m2ist.processing import PROCESSOR_CONFIG_NAME, RECProcessor

    model_settings = settings["model"]
    adapter = model_settings.get("adapter")
    if not adapter:
        raise CLIError("No adapter: pass --adapter DIR (a folder written by `m2ist train`, or a Hub repo id).")
    if Path(adapter).exists() and not Path(adapter).is_dir():
        raise CLIError(f"--adapter {adapter} is a file; give the folder that holds m2ist_config.json.")
    if not Path(adapter).exists() and not _looks_like_repo_id(adapter):
        raise CLIError(f"Adapter folder not found: {adapter} (give the --output-dir of `m2ist train`, or a Hub repo id "
                       "such as user/m2ist-refcoco).")
    _refuse_baseline_checkpoint(Path(adapter))
    trust = bool(model_settings.get("trust_remote_code", False))
    towers = {}
    for modality in ("vision", "text"):
        if model_settings.get(f"{modality}_model"):
            towers[f"{modality}_model"] = _load_tower(model_settings[f"{modality}_model"],
                                                      model_settings.get(f"{modality}_revision"), trust)
    _info(f"Loading the adapter {adapter}")
    model = SideTunedModel.from_pretrained(adapter, **towers, trust_remote_code=trust)
    source = model_settings.get("processor") or adapter
    if Path(source).is_dir() and not (Path(source) / PROCESSOR_CONFIG_NAME).is_file():
        raise CLIError(f"{source} holds no {PROCESSOR_CONFIG_NAME}: pass --processor DIR, the folder a processor was "
                       "saved to (`m2ist train` saves it next to the adapter).")
    processor = RECProcessor.from_pretrained(source, trust_remote_code=trust or None)
    model.processor = processor
    return model, processor


def _print_metrics(metrics: Mapping[str, Mapping[str, Any]], stream=None) -> None:
    stream = stream or sys.stdout
    if not metrics:
        return
    accuracy_keys = [k for k in next(iter(metrics.values())) if k.startswith("acc@")]
    header = f"{'split':<12} {'count':>8} " + " ".join(f"{k:>9}" for k in accuracy_keys) + f" {'mIoU':>8}"
    print(header, file=stream)
    for split, values in metrics.items():
        accuracies = " ".join(f"{100 * values[k]:>8.2f}%" for k in accuracy_keys)
        print(f"{split:<12} {values['count']:>8d} {accuracies} {100 * values['miou']:>7.2f}%", file=stream)


def _default_device(evaluation: Mapping[str, Any]) -> str | None:
    """``evaluation.device``, else ``cuda`` when a GPU is visible, else ``None`` (stay on the CPU)."""
    import torch

    return evaluation.get("device") or ("cuda" if torch.cuda.is_available() else None)


def _plain(value: Any) -> Any:
    """Settings as plain YAML/JSON types."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


# ---------------------------------------------------------------------------------------------- commands
def _check_train_settings(settings: Mapping[str, Mapping[str, Any]]) -> None:
    for key, flag in (("vision_model", "--vision-model"), ("text_model", "--text-model")):
        if not settings["model"].get(key):
            raise CLIError(f"train needs {flag} (a Hub id or a local folder), or model.{key} in the config file.")
    if not settings["training"].get("output_dir"):
        raise CLIError("train needs --output-dir DIR (or training.output_dir in the config file).")


def command_train(settings: dict[str, dict[str, Any]], args: argparse.Namespace) -> int:
    """Build the towers, the model and the processor, load the data, train, save, and score the evaluation splits."""
    from m2ist.baselines import build_model
    from m2ist.data.dataset import RECDataset
    from m2ist.evaluation import evaluate, write_results
    from m2ist.processing import RECProcessor
    from m2ist.trainer import train_rec

    _check_train_settings(settings)
    config = build_m2ist_config(settings)
    training_args = build_training_arguments(settings)
    augment = build_augmentation(settings)
    data = settings["data"]
    train_samples = load_data_splits(data, "train")
    eval_samples = (load_data_splits(data, "eval")
                    if data.get("eval_splits") or data.get("eval_files") else {})

    model_settings = settings["model"]
    trust = bool(model_settings.get("trust_remote_code", False))
    _info(f"Loading the vision tower {model_settings['vision_model']} and the text tower {model_settings['text_model']}")
    vision = _load_tower(model_settings["vision_model"], model_settings.get("vision_revision"), trust)
    text = _load_tower(model_settings["text_model"], model_settings.get("text_revision"), trust)
    method = settings["training"].get("method") or "m2ist"
    model = build_model(vision, text, config, method=method)
    processor = RECProcessor.from_pretrained(
        _local_or_hub(model_settings["text_model"]), _local_or_hub(model_settings["vision_model"]),
        revision=model_settings.get("text_revision"), vision_revision=model_settings.get("vision_revision"),
        trust_remote_code=trust or None, canvas_size=model.config.image_size,
        max_query_len=model.config.max_query_len, augment=augment)
    model.print_trainable_parameters()

    skip_invalid = bool(data.get("skip_invalid", False))
    train_set = RECDataset(next(iter(train_samples.values())), skip_invalid=skip_invalid)
    eval_sets = {name: RECDataset(samples, skip_invalid=skip_invalid) for name, samples in eval_samples.items()}
    _info(f"Training on {len(train_set)} expressions" +
          (f"; evaluating on {', '.join(f'{n} ({len(d)})' for n, d in eval_sets.items())}" if eval_sets else ""))
    resume = settings["training"].get("resume_from_checkpoint")
    trainer = train_rec(model, processor, train_set, eval_sets or None, training_args,
                        resume_from_checkpoint=resume if resume not in ("", False) else None)

    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))  # the trained tensors, the config and the processor
    if not trainer.is_world_process_zero():
        return 0
    (output_dir / "m2ist_cli_config.yaml").write_text(yaml.safe_dump(_plain(settings), sort_keys=False), encoding="utf-8")
    _info(f"Saved the adapter and the processor to {output_dir}")

    evaluation = settings["evaluation"]
    if eval_sets and evaluation.get("final_eval", True):
        # every expression counts (as in `m2ist eval`), unless unreadable samples are to be skipped
        results = evaluate(model, processor, eval_sets if skip_invalid else eval_samples,
                           batch_size=int(evaluation.get("batch_size", 32)),
                           iou_thresholds=evaluation.get("iou_thresholds", (0.5,)),
                           progress=evaluation.get("progress", True), clamp=evaluation.get("clamp", "image"),
                           num_workers=int(evaluation.get("num_workers", 0)),
                           metadata={"adapter": str(output_dir), "data": _plain(data)})
        path = write_results(results, evaluation.get("output_file") or output_dir / "eval_results.json")
        _print_metrics(results["metrics"])
        _info(f"Wrote {path}")
    return 0


def command_eval(settings: dict[str, dict[str, Any]], args: argparse.Namespace) -> int:
    """Load an adapter and its processor, score the evaluation splits, write the JSON results."""
    from m2ist.evaluation import evaluate

    evaluation = settings["evaluation"]
    splits = load_data_splits(settings["data"], "eval")
    model, processor = _load_adapter(settings)
    adapter = settings["model"]["adapter"]
    output = evaluation.get("output_file")
    if output is None:
        output = Path(adapter) / "eval_results.json" if Path(adapter).is_dir() else Path("eval_results.json")
    results = evaluate(model, processor, splits, batch_size=int(evaluation.get("batch_size", 32)),
                       iou_thresholds=evaluation.get("iou_thresholds", (0.5,)), output_file=output,
                       device=_default_device(evaluation), progress=bool(evaluation.get("progress", True)),
                       save_predictions=bool(evaluation.get("save_predictions", False)),
                       clamp=evaluation.get("clamp", "image"), num_workers=int(evaluation.get("num_workers", 0)),
                       metadata={"adapter": str(adapter), "data": _plain(settings["data"])})
    _print_metrics(results["metrics"])
    _info(f"Wrote {output}")
    return 0


def command_predict(settings: dict[str, dict[str, Any]], args: argparse.Namespace) -> int:
    """Predict one box per phrase and print them as JSON (optionally draw them)."""
    from m2ist.data.images import image_size
    from m2ist.inference import draw_boxes, predict_boxes

    images, texts = list(args.image), list(args.text)
    if len(images) > 1 and len(texts) > 1 and len(images) != len(texts):
        raise CLIError(f"Got {len(images)} images and {len(texts)} phrases: give one phrase per image, one image "
                       "with several phrases, or several images with one phrase.")
    for image in images:
        image_size(image)  # a missing or unreadable file fails here, before the model is loaded
    model, processor = _load_adapter(settings)
    evaluation = settings["evaluation"]
    boxes = predict_boxes(model, images if len(images) > 1 else images[0], texts, processor=processor,
                          batch_size=int(evaluation.get("batch_size", 16)), device=_default_device(evaluation))
    pairs = list(zip(images * len(texts) if len(images) == 1 else images,
                     texts * len(images) if len(texts) == 1 else texts))
    records = [{"image": str(image), "text": text, "box_xyxy": [round(v, 2) for v in box]}
               for (image, text), box in zip(pairs, boxes.tolist())]
    output = json.dumps(records, indent=2)
    print(output)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(output + "\n", encoding="utf-8")
    if args.draw:
        target = Path(args.draw)
        target.parent.mkdir(parents=True, exist_ok=True)
        by_image: dict[str, list[int]] = {}
        for index, (image, _) in enumerate(pairs):
            by_image.setdefault(str(image), []).append(index)
        for number, (image, indices) in enumerate(by_image.items()):
            path = target if len(by_image) == 1 else target.with_name(f"{target.stem}-{number}{target.suffix or '.png'}")
            drawn = draw_boxes(image, boxes[indices], texts=[pairs[i][1] for i in indices])
            drawn.save(path)
            _info(f"Drew {len(indices)} box(es) on {image} -> {path}")
    return 0


COMMANDS: dict[str, Callable[[dict[str, dict[str, Any]], argparse.Namespace], int]] = {
    "train": command_train,
    "eval": command_eval,
    "predict": command_predict,
}


# ---------------------------------------------------------------------------------------------- parser
class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=110)


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=108)


def _add(group, *flags: str, dest: str, **kwargs: Any) -> None:
    group.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, **kwargs)


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                       help="YAML or JSON config file, or a shipped config name (refcoco, refcoco+, refcocog, referit)")
    group.add_argument("--set", metavar="KEY=VALUE", action="append", default=argparse.SUPPRESS,
                       help="override one setting, e.g. --set training.num_train_epochs=5 (repeatable; explicit flags "
                            "win over --set, which wins over the config file)")
    group.add_argument("--print-config", action="store_true", default=False,
                       help="print the resolved settings as JSON and exit")


def _add_tower_flags(parser: argparse.ArgumentParser, required_note: str) -> None:
    group = parser.add_argument_group("towers")
    _add(group, "--vision-model", dest="model.vision_model", metavar="ID_OR_PATH",
         help=f"vision tower: Hub id or local folder (e.g. facebook/detr-resnet-50){required_note}")
    _add(group, "--text-model", dest="model.text_model", metavar="ID_OR_PATH",
         help=f"text tower: Hub id or local folder (e.g. bert-base-uncased){required_note}")
    _add(group, "--vision-revision", dest="model.vision_revision", metavar="REV", help="revision of the vision tower")
    _add(group, "--text-revision", dest="model.text_revision", metavar="REV", help="revision of the text tower")
    _add(group, "--trust-remote-code", dest="model.trust_remote_code", action="store_true",
         help="allow towers whose code lives in their Hub repo (runs that code)")


def _add_data_flags(parser: argparse.ArgumentParser, train: bool) -> None:
    group = parser.add_argument_group(
        "data", _wrap("--data-format picks the loader: refer (refer API: --data-root, --dataset, --split-by), transvg "
        "(split files: --data-root + --dataset, or --train-file/--eval-file .pth), jsonl/csv/coco (your files: "
        "--train-file/--eval-file, --box-format), hf (Hugging Face datasets: --data-root id or saved folder)."))
    _add(group, "--data-format", dest="data.format", choices=DATA_FORMATS, help="dataset layout")
    _add(group, "--data-root", dest="data.data_root", metavar="PATH",
         help="refer: the refer data folder; transvg: the split root; hf: a Hub dataset id or a save_to_disk folder")
    _add(group, "--dataset", dest="data.dataset", metavar="NAME",
         help="refer: refcoco|refcoco+|refcocog|refclef; transvg: unc|unc+|gref|gref_umd|referit|flickr; hf: config name")
    _add(group, "--split-by", dest="data.split_by", metavar="NAME", help="refer: unc|google|umd (default: the dataset's)")
    _add(group, "--image-root", dest="data.image_root", metavar="DIR", help="folder the image file names are relative to")
    if train:
        _add(group, "--train-split", dest="data.train_split", metavar="NAME", help="training split name (default: train)")
        _add(group, "--train-file", dest="data.train_file", metavar="FILE", help="jsonl/csv/coco/transvg: the training file")
    _add(group, "--eval-splits", "--splits", dest="data.eval_splits", nargs="+", metavar="NAME",
         help="evaluation split names, e.g. val testA testB" + ("" if train else " (default: val)"))
    _add(group, "--eval-file", dest="data.eval_files", action="append", metavar="[NAME=]FILE",
         help="jsonl/csv/coco/transvg: an evaluation file, named NAME (default: the file name); repeatable")
    _add(group, "--box-format", dest="data.box_format", choices=("xyxy", "xywh", "cxcywh"),
         help="jsonl/csv (required), coco (default xywh), hf generic rows: how the files store boxes")
    _add(group, "--normalized", dest="data.normalized", action="store_true",
         help="box numbers are fractions of the image size, not pixels")
    _add(group, "--trusted", dest="data.trusted", action="store_true",
         help="transvg: allow unrestricted unpickling of the .pth files (only for files you trust)")
    _add(group, "--text-column", dest="data.text_column", metavar="NAME", help="hf: the column holding the expressions")
    _add(group, "--hf-style", dest="data.hf_style", choices=("jxu124", "lmms-lab", "generic"),
         help="hf: the row layout (default: detected)")
    _add(group, "--sentence-field", dest="data.sentence_field", choices=("sent", "raw"),
         help="refer/hf: normalised ('sent', default) or raw sentences")
    if train:
        _add(group, "--max-train-samples", dest="data.max_train_samples", type=int, metavar="N",
             help="use only the first N training expressions")
        _add(group, "--skip-invalid", dest="data.skip_invalid", action="store_true",
             help="skip samples whose image cannot be read instead of stopping")
        _add(group, "--no-augment", dest="data.augment", action="store_false",
             help="train without TransVG's augmentations (crop, resize, jitter, flip, random placement)")
    _add(group, "--max-eval-samples", dest="data.max_eval_samples", type=int, metavar="N",
         help="use only the first N expressions of each evaluation split")


def _m2ist_flag_kwargs(f: dataclasses.Field) -> dict[str, Any] | None:
    kind = str(f.type).replace(" ", "")
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
    if kind in ("int", "int|None"):
        return {"type": int, "metavar": "N", "help": help_text}
    if kind in ("float", "float|None"):
        return {"type": float, "metavar": "X", "help": help_text}
    if kind in ("str", "str|None"):
        return {"type": str, "metavar": "NAME", "help": help_text}
    if kind == "bool":
        return {"action": argparse.BooleanOptionalAction, "help": help_text}
    if kind in ("list[str]", "list[str]|None"):
        return {"nargs": "+", "type": str, "metavar": "NAME", "help": help_text}
    if kind in ("list[int]", "list[int]|None"):
        return {"nargs": "+", "type": int, "metavar": "I", "help": help_text}
    return None  # dicts (explicit tap names): config file or --set only


def _add_m2ist_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("M²IST model (M2ISTConfig; defaults are the paper's)")
    for name, f in _m2ist_fields().items():
        kwargs = _m2ist_flag_kwargs(f)
        if kwargs is not None:
            _add(group, f"--{name.replace('_', '-')}", dest=f"m2ist.{name}", **kwargs)


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    from m2ist.baselines import METHODS

    group = parser.add_argument_group(
        "training (RECTrainingArguments; any other field via --set training.NAME=VALUE)")
    _add(group, "--output-dir", dest="training.output_dir", metavar="DIR",
         help="where checkpoints, the final adapter + processor and eval_results.json go (required)")
    _add(group, "--method", dest="training.method", choices=METHODS,
         help="m2ist (side-tuning, default) or a baseline: full fine-tuning, in-tower adapters, LoRA")
    _add(group, "--epochs", dest="training.num_train_epochs", type=float, metavar="N", help="training epochs (paper: 90)")
    _add(group, "--max-steps", dest="training.max_steps", type=int, metavar="N", help="stop after N optimizer steps")
    _add(group, "--batch-size", dest="training.per_device_train_batch_size", type=int, metavar="N",
         help="training batch size per device (paper: 64)")
    _add(group, "--eval-batch-size", dest="training.per_device_eval_batch_size", type=int, metavar="N",
         help="evaluation batch size per device during training")
    _add(group, "--gradient-accumulation-steps", dest="training.gradient_accumulation_steps", type=int, metavar="N",
         help="accumulate gradients over N batches (effective batch = batch size x N x devices)")
    _add(group, "--lr", "--learning-rate", dest="training.learning_rate", type=float, metavar="LR",
         help="learning rate of the REC head (default 1e-4)")
    _add(group, "--side-lr", "--side-learning-rate", dest="training.side_learning_rate", type=float, metavar="LR",
         help="learning rate of the side adapters / trained tower parameters (default 1e-5)")
    _add(group, "--weight-decay", dest="training.weight_decay", type=float, metavar="WD",
         help="AdamW weight decay (default 1e-4)")
    _add(group, "--lr-drop-epochs", dest="training.lr_drop_epochs", type=int, nargs="+", metavar="EPOCH",
         help="multiply the learning rates by 0.1 at these epochs (paper: 60)")
    _add(group, "--eval-strategy", dest="training.eval_strategy", choices=("no", "steps", "epoch"),
         help="when to evaluate during training")
    _add(group, "--save-strategy", dest="training.save_strategy", choices=("no", "steps", "epoch", "best"),
         help="when to write checkpoints")
    _add(group, "--seed", dest="training.seed", type=int, metavar="N", help="random seed")
    _add(group, "--num-workers", dest="training.dataloader_num_workers", type=int, metavar="N",
         help="DataLoader worker processes")
    _add(group, "--logging-steps", dest="training.logging_steps", type=float, metavar="N", help="log every N steps")
    _add(group, "--resume", dest="training.resume_from_checkpoint", nargs="?", const=True, metavar="CHECKPOINT",
         help="resume from CHECKPOINT, or from the last checkpoint in --output-dir when no path is given")


def _add_evaluation_flags(parser: argparse.ArgumentParser, command: str) -> None:
    group = parser.add_argument_group("inference" if command == "predict" else "evaluation")
    if command != "predict":
        _add(group, "--iou-thresholds", dest="evaluation.iou_thresholds", type=float, nargs="+", metavar="T",
             help="report Acc@T for each T (default: 0.5; IoU >= T, the TransVG criterion, not GIoU)")
        _add(group, "--output", dest="evaluation.output_file", metavar="FILE",
             help="results JSON (default: <adapter>/eval_results.json)" if command == "eval" else
             "results JSON of the final evaluation (default: <output-dir>/eval_results.json)")
        _add(group, "--clamp", dest="evaluation.clamp", choices=("image", "canvas"),
             help="clamp predictions to the image (default, spec) or to the padded canvas (TransVG's code)")
        _add(group, "--no-progress", dest="evaluation.progress", action="store_false", help="hide progress bars")
    if command == "train":
        _add(group, "--no-final-eval", dest="evaluation.final_eval", action="store_false",
             help="do not score the evaluation splits after training")
        return
    _add(group, "--batch-size", dest="evaluation.batch_size", type=int, metavar="N",
         help=f"expressions per forward pass (default: {32 if command == 'eval' else 16})")
    _add(group, "--device", dest="evaluation.device", metavar="DEVICE",
         help="cpu, cuda, cuda:1, mps ... (default: cuda if available, else cpu)")
    if command == "eval":
        _add(group, "--num-workers", dest="evaluation.num_workers", type=int, metavar="N",
             help="DataLoader worker processes that load the images")
        _add(group, "--save-predictions", dest="evaluation.save_predictions", action="store_true",
             help="also write every expression's predicted box and IoU to the results")


def _add_adapter_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("adapter")
    _add(group, "--adapter", dest="model.adapter", metavar="DIR_OR_ID",
         help="folder written by `m2ist train` (m2ist_config.json + m2ist_model.safetensors), or a Hub repo id")
    _add(group, "--processor", dest="model.processor", metavar="DIR",
         help="folder of the saved processor (default: the adapter folder)")


EXAMPLES = """examples:
  m2ist train --config refcoco --data-root data/split --image-root data/train2014 --output-dir out/refcoco
  m2ist train --vision-model facebook/detr-resnet-50 --text-model bert-base-uncased \\
      --data-format jsonl --train-file train.jsonl --eval-file val=val.jsonl --box-format xywh --output-dir out/mine
  m2ist eval --adapter out/refcoco --config refcoco --eval-splits val testA testB
  m2ist predict --adapter out/refcoco --image dog.jpg --text "the dog on the left" --draw dog_box.png
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``m2ist`` argument parser with every subcommand."""
    from m2ist import __version__

    parser = argparse.ArgumentParser(
        prog="m2ist", formatter_class=_Formatter, epilog=EXAMPLES,
        description="M²IST side-tuning for referring expression comprehension (image + phrase -> one box).")
    parser.add_argument("--version", action="version", version=f"m2ist {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    train = subparsers.add_parser(
        "train", formatter_class=_Formatter, help="side-tune two frozen towers on REC data and save the adapter",
        description=_wrap("Side-tune frozen vision and text towers for REC (M²IST), or train a baseline (--method). "
                          "Writes the adapter (m2ist_config.json, m2ist_model.safetensors) with the processor into "
                          "--output-dir, then scores the evaluation splits (eval_results.json).") + "\n\n" + SETTINGS_HELP,
        epilog=EXAMPLES)
    _add_common(train)
    _add_tower_flags(train, " (required)")
    _add_data_flags(train, train=True)
    _add_m2ist_flags(train)
    _add_training_flags(train)
    _add_evaluation_flags(train, "train")

    evaluate = subparsers.add_parser(
        "eval", formatter_class=_Formatter, help="score a saved adapter on REC splits (Acc@0.5, mean IoU) to JSON",
        description=_wrap("Evaluate a saved adapter with the TransVG protocol: one prediction per expression, "
                          "predicted box clamped to the image, correct iff IoU >= 0.5 (not GIoU). Writes metrics per "
                          "split and metadata to a JSON file."), epilog=EXAMPLES)
    _add_common(evaluate)
    _add_adapter_flags(evaluate)
    _add_data_flags(evaluate, train=False)
    _add_evaluation_flags(evaluate, "eval")
    _add_tower_flags(evaluate, " (default: the one recorded in the adapter)")

    predict = subparsers.add_parser(
        "predict", formatter_class=_Formatter, help="predict boxes for images and phrases, printed as JSON",
        description=_wrap("Predict one box per phrase (xyxy pixels of the original image) with a saved adapter; "
                          "prints a JSON list of {image, text, box_xyxy}. One image with several phrases, several "
                          "images with one phrase, or one phrase per image."), epilog=EXAMPLES)
    _add_common(predict)
    _add_adapter_flags(predict)
    group = predict.add_argument_group("inputs and outputs")
    group.add_argument("--image", nargs="+", required=True, metavar="PATH", help="image file(s)")
    group.add_argument("--text", nargs="+", required=True, metavar="PHRASE", help="referring phrase(s)")
    group.add_argument("--draw", metavar="OUT.png", help="also draw the boxes (one file per image: OUT-<n>.png)")
    group.add_argument("--output", metavar="FILE", help="also write the JSON to FILE")
    _add_evaluation_flags(predict, "predict")
    _add_tower_flags(predict, " (default: the one recorded in the adapter)")

    for name, help_text in PASSTHROUGH_HELP.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


# ---------------------------------------------------------------------------------------------- entry point
def _run_passthrough(name: str, argv: list[str], debug: bool) -> int:
    module_name = PASSTHROUGH[name]
    if importlib.util.find_spec(module_name) is None:
        print(f"m2ist {name}: this command is not available in this installation ({module_name} is missing); "
              "update m2ist.", file=sys.stderr)
        return EXIT_USAGE
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        if debug:
            raise
        print(f"m2ist {name}: cannot start ({err}). Install the extras it needs, e.g. pip install 'm2ist[demo]'.",
              file=sys.stderr)
        return 1
    entry = getattr(module, "main", None)
    if not callable(entry):
        print(f"m2ist {name}: {module_name} has no main(argv) entry point.", file=sys.stderr)
        return 1
    try:
        code = entry(argv)
    except SystemExit as exit_:  # argparse inside the command
        code = exit_.code
    return int(code or 0) if not isinstance(code, str) else 1


def _expected_errors() -> tuple[type[BaseException], ...]:
    import pickle

    return (CLIError, OSError, ValueError, pickle.UnpicklingError)


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("m2ist").setLevel(level)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(max(level, logging.WARNING) if verbosity < 2 else logging.INFO)
    except ImportError:  # pragma: no cover
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``m2ist`` command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Exit codes: 0 success, 2 a usage or input error (bad flag, missing file, invalid setting: a one-line message,
    no traceback unless ``--debug``), 1 an unexpected failure, 130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    position = 0
    while position < len(argv) and argv[position] in ("--debug", "-v", "-vv", "--verbose"):
        position += 1
    if position < len(argv) and argv[position] in PASSTHROUGH:
        _configure_logging(sum(a.count("v") for a in argv[:position] if a.startswith("-v")))
        return _run_passthrough(argv[position], argv[position + 1 :], "--debug" in argv[:position])

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _configure_logging(args.verbose)
    try:
        settings = resolve_settings(args)
        if args.print_config:
            print(json.dumps(_plain(settings), indent=2))
            return 0
        return COMMANDS[args.command](settings, args)
    except KeyboardInterrupt:
        print(f"m2ist {args.command}: interrupted", file=sys.stderr)
        return 130
    except _expected_errors() as err:
        if args.debug:
            raise
        print(f"m2ist {args.command}: error: {err}", file=sys.stderr)
        if not isinstance(err, CLIError):
            print("(run with --debug for the full traceback)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
