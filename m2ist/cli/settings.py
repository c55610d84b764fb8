"""Settings in layers: defaults < ``--config FILE`` < ``--set key=value`` < flags, in sections (see
:data:`SETTINGS_HELP`), and the library objects built from them (``M2ISTConfig``, ``RECTrainingArguments``,
``RECAugmentation``). The shipped paper configs live in ``m2ist/configs/``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import CLIError

#: Folder of the shipped configs (``refcoco.yaml``, ``refcoco+.yaml``, ``refcocog.yaml``, ``referit.yaml``).
CONFIG_DIR = Path(__file__).parent.parent / "configs"

SECTIONS = ("model", "m2ist", "data", "training", "augmentation", "evaluation")

MODEL_KEYS = ("vision_model", "text_model", "vision_revision", "text_revision", "trust_remote_code", "adapter",
              "processor")

DATA_KEYS = ("format", "data_root", "dataset", "split_by", "image_root", "train_split", "eval_splits", "train_file",
             "eval_files", "box_format", "normalized", "trusted", "text_column", "sentence_field", "hf_style",
             "max_train_samples", "max_eval_samples", "skip_invalid", "augment", "allow_outside_image_root")

EVALUATION_KEYS = ("batch_size", "iou_thresholds", "output_file", "save_predictions", "clamp", "num_workers", "device",
                   "progress", "final_eval")
# M2ISTConfig fields that record the towers (filled in by the model) or are measured: never set from the CLI.
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
#: The sections each command reads (``--set`` refuses the others; config files may hold them all).
COMMAND_SECTIONS = {"train": SECTIONS, "eval": ("model", "data", "evaluation"), "predict": ("model", "evaluation")}

_SECTION_HELP = {
    "model": "vision_model, text_model, vision_revision, text_revision, trust_remote_code, adapter, processor",
    "m2ist": "M2ISTConfig fields (bottleneck, image_size, max_query_len, experts, ...)",
    "data": "format, data_root, dataset, split_by, image_root, train_split, eval_splits, train_file, eval_files, "
            "box_format, normalized, trusted, text_column, sentence_field, hf_style, max_train_samples, "
            "max_eval_samples, skip_invalid, augment, allow_outside_image_root",
    "training": "RECTrainingArguments fields (output_dir, num_train_epochs, per_device_train_batch_size, "
                "learning_rate, side_learning_rate, weight_decay, lr_drop_epochs, method, resume_from_checkpoint, ...)",
    "augmentation": "RECAugmentation fields (hflip_p, random_crop, jitter_p, ...)",
    "evaluation": "batch_size, iou_thresholds, output_file, save_predictions, clamp, num_workers, device, progress, "
                  "final_eval",
}
_COMMAND_KEYS = {
    ("eval", "model"): "adapter, processor, vision_model, text_model, vision_revision, text_revision, "
                       "trust_remote_code",
    ("predict", "model"): "adapter, processor, vision_model, text_model, vision_revision, text_revision, "
                          "trust_remote_code",
    ("eval", "data"): _SECTION_HELP["data"].replace("train_split, ", "").replace("train_file, ", "")
                      .replace("max_train_samples, ", "").replace(", skip_invalid, augment", ""),
    ("eval", "evaluation"): "batch_size, iou_thresholds, output_file, save_predictions, clamp, num_workers, device, "
                            "progress",
    ("predict", "evaluation"): "batch_size, device",
}
_SET_EXAMPLES = {"train": "--set training.lr_drop_epochs=[60]", "eval": "--set evaluation.iou_thresholds=[0.5,0.75]",
                 "predict": "--set evaluation.batch_size=8"}


def settings_help(command: str = "train") -> str:
    """How settings are layered and which keys each section of ``command`` takes (its ``--help`` shows this)."""
    import textwrap

    lines = [textwrap.fill("Settings come in layers, later ones winning: built-in defaults < --config FILE (YAML "
                           "or JSON) < --set key=value < explicit flags. The sections this command reads (a config "
                           "file may hold others, which it ignores):", width=110), ""]
    for section in COMMAND_SECTIONS[command]:
        keys = _COMMAND_KEYS.get((command, section), _SECTION_HELP[section])
        lines.append(textwrap.fill(keys, width=110, initial_indent=f"  {section + ':':<14}",
                                   subsequent_indent=" " * 16))
    lines += ["", textwrap.fill(f"--set takes section.key=value, or a bare key=value when the key belongs to one "
                                f"section only; values are read as YAML ({_SET_EXAMPLES[command]}). Shipped configs "
                                "(the paper's settings): --config refcoco, refcoco+, refcocog, referit "
                                "(m2ist/configs/*.yaml).", width=110)]
    return "\n".join(lines) + "\n"


#: How settings are layered and which keys each config-file section takes (shown by ``m2ist train --help``).
SETTINGS_HELP = settings_help("train")


def _dataclass_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}

def m2ist_fields() -> dict[str, dataclasses.Field]:
    from m2ist.config import M2ISTConfig

    return {name: f for name, f in _dataclass_fields(M2ISTConfig).items() if name not in M2ISTConfig.RECORDED_FIELDS}

def _augmentation_fields() -> dict[str, dataclasses.Field]:
    from m2ist.data.transforms import RECAugmentation

    return _dataclass_fields(RECAugmentation)

def _training_arguments_class() -> type:
    try:
        from m2ist.trainer import RECTrainingArguments
    except ImportError as err:  # pragma: no cover - the trainer ships with the package
        raise CLIError(f"The trainer cannot be imported ({err}); reinstall m2ist.") from err
    return RECTrainingArguments

def _section_keys(sections: tuple[str, ...] = SECTIONS) -> dict[str, set[str]]:
    """The keys of ``sections`` (only those asked for are computed: the training keys import the trainer)."""
    keys = {
        "model": lambda: set(MODEL_KEYS),
        "m2ist": lambda: set(m2ist_fields()),
        "data": lambda: set(DATA_KEYS),
        "training": lambda: set(_dataclass_fields(_training_arguments_class())) | {"resume_from_checkpoint"},
        "augmentation": lambda: set(_augmentation_fields()),
        "evaluation": lambda: set(EVALUATION_KEYS),
    }
    return {section: keys[section]() for section in sections if section in keys}

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
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CLIError(f"Config file {file}:{line}: not UTF-8 text (byte {data[err.start]:#04x}); save it as UTF-8."
                       ) from None
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

def _section_of(key: str, *, source: str, allowed: tuple[str, ...] = SECTIONS) -> str:
    owners = [section for section, keys in _section_keys(allowed).items() if key in keys]
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
    known = _section_keys((section,))[section]
    if key not in known:
        close = sorted(k for k in known if k.startswith(key[:4]))[:5]
        hint = f" Did you mean one of {close}?" if close else ""
        raise CLIError(f"{source}: '{key}' is not a {section} setting.{hint}")
    settings.setdefault(section, {})[key] = value

def _parse_set(item: str, allowed: tuple[str, ...] = SECTIONS) -> tuple[str, str, Any]:
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
        section, name = _section_of(key, source=f"--set {item}", allowed=allowed), key
    if section in SECTIONS and section not in allowed:
        raise CLIError(f"--set {item}: this command takes no {section} settings; its sections are "
                       f"{', '.join(allowed)}.")
    return section, name, _coerce_scalars(value)

def resolve_settings(namespace: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Merge ``--config`` (lowest), ``--set`` and explicit flags (highest) into ``{section: {key: value}}``."""
    settings: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    config = getattr(namespace, "config", None)
    if config is not None:
        for section, values in load_config_file(config).items():
            settings[section].update(values)
    command = getattr(namespace, "command", None)
    allowed = COMMAND_SECTIONS.get(command, SECTIONS)
    for item in getattr(namespace, "set", None) or []:
        section, name, value = _parse_set(item, allowed)
        _assign(settings, section, name, value, source=f"--set {item}")
    for dest, value in vars(namespace).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            settings[section][name] = value
    if settings["evaluation"].get("device") not in (None, ""):
        check_device(settings["evaluation"]["device"])
    return settings

def check_device(value: Any) -> None:
    """Refuse a ``--device`` / ``evaluation.device`` torch cannot parse, or a GPU this machine does not have."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise CLIError(f"--device {value!r} is not a device: use cpu, cuda, cuda:N or mps.") from None
    if device.type not in ("cpu", "cuda", "mps"):  # meta, xla...: no real tensors to evaluate
        raise CLIError(f"--device {value}: m2ist runs on cpu, cuda, cuda:N or mps.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {value}: no CUDA GPU is visible here; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {value}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {value}: MPS is not available here; use --device cpu.")


def build_m2ist_config(settings: Mapping[str, Mapping[str, Any]]):
    """The :class:`~m2ist.config.M2ISTConfig` of ``settings['m2ist']`` (unknown keys and bad values raise CLIError)."""
    from m2ist.config import M2ISTConfig

    values = dict(settings.get("m2ist", {}))
    unknown = sorted(set(values) - set(m2ist_fields()))
    if unknown:
        raise CLIError(f"Unknown m2ist settings {unknown}; valid ones: {sorted(m2ist_fields())}.")
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

def plain(value: Any) -> Any:
    """Settings as plain YAML/JSON types."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
