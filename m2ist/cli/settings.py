"""Settings in layers: defaults < ``--config FILE`` < ``--set key=value`` < flags, in sections (see
:data:`SETTINGS_HELP`), and the library objects built from them (``M2ISTConfig``, ``RECTrainingArguments``,
``RECAugmentation``). The shipped paper configs live in ``m2ist/configs/``."""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import enum
import json
import logging
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from m2ist.config import RepeatedKeyError, refuse_repeated_keys

from .errors import CLIError

#: Folder of the shipped configs (``refcoco.yaml``, ``refcoco+.yaml``, ``refcocog.yaml``, ``referit.yaml``).
CONFIG_DIR = Path(__file__).parent.parent / "configs"

SECTIONS = ("model", "m2ist", "data", "training", "augmentation", "evaluation")

MODEL_KEYS = ("vision_model", "text_model", "vision_revision", "text_revision", "trust_remote_code", "adapter",
              "processor", "pad_token")

DATA_KEYS = ("format", "data_root", "dataset", "split_by", "image_root", "train_split", "eval_splits", "train_file",
             "eval_files", "box_format", "normalized", "trusted", "text_column", "sentence_field", "hf_style",
             "max_train_samples", "max_eval_samples", "skip_invalid", "augment", "allow_outside_image_root", "csv_delimiter")

EVALUATION_KEYS = ("batch_size", "iou_thresholds", "output_file", "save_predictions", "clamp", "num_workers", "device",
                   "progress", "final_eval")
#: The type of each key of the sections that are not dataclasses (those take theirs from the field annotations):
#: a config file's or ``--set``'s value of another type is refused, naming the key, never used as it is.
KEY_TYPES: dict[str, dict[str, Any]] = {
    "model": {"vision_model": str | None, "text_model": str | None, "vision_revision": str | None,
              "text_revision": str | None, "trust_remote_code": bool, "adapter": str | None, "processor": str | None,
              "pad_token": str | None},
    "data": {"format": str | None, "data_root": str | None, "dataset": str | None, "split_by": str | None,
             "image_root": str | None, "train_split": str, "eval_splits": list[str] | str | None,
             "train_file": str | None, "eval_files": list[str] | dict[str, str] | str | None,
             "box_format": str | None, "normalized": bool, "trusted": bool, "text_column": str | None,
             "sentence_field": str | None, "hf_style": str | None, "max_train_samples": int | None,
             "max_eval_samples": int | None, "skip_invalid": bool, "augment": bool, "allow_outside_image_root": bool,
             "csv_delimiter": str | None},
    "evaluation": {"batch_size": int, "iou_thresholds": list[float] | float, "output_file": str | None,
                   "save_predictions": bool, "clamp": str, "num_workers": int, "device": str | None,
                   "progress": bool, "final_eval": bool},
}
#: Training keys that are not fields of ``RECTrainingArguments`` (they go to ``train()``).
_EXTRA_TRAINING_TYPES: dict[str, Any] = {"resume_from_checkpoint": str | bool | None}
# YAML 1.1 reads 1e-4 (no dot) as a string: a float field takes such a string as the number it spells.
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
#: The sections each command reads (``--set`` refuses the others; config files may hold them all).
COMMAND_SECTIONS = {"train": SECTIONS, "eval": ("model", "data", "evaluation"), "predict": ("model", "evaluation")}

_SECTION_HELP = {
    "model": "vision_model, text_model, vision_revision, text_revision, trust_remote_code, adapter, processor, "
             "pad_token",
    "m2ist": "M2ISTConfig fields (bottleneck, image_size, max_query_len, experts, ...)",
    "data": "format, data_root, dataset, split_by, image_root, train_split, eval_splits, train_file, eval_files, "
            "box_format, normalized, trusted, text_column, sentence_field, hf_style, max_train_samples, "
            "max_eval_samples, skip_invalid, augment, allow_outside_image_root, csv_delimiter",
    "training": "RECTrainingArguments fields (output_dir, num_train_epochs, per_device_train_batch_size, "
                "learning_rate, side_learning_rate, weight_decay, lr_drop_epochs, method, resume_from_checkpoint, ...)",
    "augmentation": "RECAugmentation fields (hflip_p, random_crop, jitter_p, ...)",
    "evaluation": "batch_size, iou_thresholds, output_file, save_predictions, clamp, num_workers, device, progress, "
                  "final_eval",
}
_COMMAND_KEYS = {
    ("train", "model"): "vision_model, text_model, vision_revision, text_revision, trust_remote_code, pad_token",
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


def command_keys(command: str | None, section: str) -> set[str] | None:
    """The keys of ``section`` that ``command`` reads (None: every key of the section)."""
    listed = _COMMAND_KEYS.get((command, section))
    return None if listed is None else {key.strip() for key in listed.split(",")}


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

class _WrongType(ValueError):
    """A value that is not of a key's type (the message says what was expected)."""


def _expected(hint: Any) -> str:
    """``list[int] | None`` -> "a list of whole numbers or null", for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_expected(a) for a in args))
    if origin is typing.Literal:
        return " or ".join(map(repr, args))
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list of {_expected(args[0]).removeprefix('a ')}s" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "a string"
    return {type(None): "null", bool: "true or false", int: "a whole number", float: "a number",
            str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def _typed(value: Any, hint: Any) -> Any:
    """``value`` as a value of ``hint``, or :class:`_WrongType`. Only one conversion is made: a string in
    scientific notation (YAML 1.1 reads ``1e-4`` as text) for a float field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for member in args:  # an exact match first: "1e-4" stays a string where a string is accepted
            try:
                return _typed(value, member)
            except _WrongType:
                continue
        raise _WrongType(_expected(hint))
    if origin is typing.Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise _WrongType(_expected(hint))
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            return float(value)
    elif hint is str or (isinstance(hint, type) and issubclass(hint, enum.Enum)):
        if isinstance(value, str):
            return value  # an enum's value is checked by the dataclass, which names the choices
    elif origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        if isinstance(value, list | tuple):
            if not args:
                return list(value)
            if origin is tuple and ... not in args:
                if len(value) != len(args):
                    raise _WrongType(f"a list of {len(args)} items")
                try:
                    return [_typed(item, arg) for item, arg in zip(value, args, strict=True)]
                except _WrongType:
                    raise _WrongType(_expected(hint)) from None
            try:
                return [_typed(item, args[0]) for item in value]
            except _WrongType:
                raise _WrongType(_expected(hint)) from None
    elif origin is dict or hint is dict:
        if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
            return dict(value) if len(args) != 2 else {k: _typed(v, args[1]) for k, v in value.items()}
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
    else:  # a hint this check does not know: the library object checks the value
        return value
    raise _WrongType(_expected(hint))


def _key_type(section: str, key: str) -> Any:
    """The annotated type of ``section.key`` (``Any`` when it has none)."""
    if section in KEY_TYPES:
        return KEY_TYPES[section].get(key, Any)
    if section == "training" and key in _EXTRA_TRAINING_TYPES:
        return _EXTRA_TRAINING_TYPES[key]
    cls = {"m2ist": lambda: _m2ist_class(), "training": _training_arguments_class,
           "augmentation": lambda: _augmentation_class()}[section]()
    try:
        return typing.get_type_hints(cls).get(key, Any)
    except (NameError, TypeError):  # pragma: no cover - an annotation that cannot be resolved
        return Any


def _m2ist_class() -> type:
    from m2ist.config import M2ISTConfig

    return M2ISTConfig


def _augmentation_class() -> type:
    from m2ist.data.transforms import RECAugmentation

    return RECAugmentation


def checked_value(section: str, key: str, value: Any, *, source: str) -> Any:
    """``value`` checked against the type of ``section.key``: a value of another type (``"false"`` for a boolean,
    ``no`` read by YAML as false for a string, ``null`` where none is allowed, a number for a name) raises a
    :class:`CLIError` naming ``source`` and the key."""
    hint = _key_type(section, key)
    surprise = _yaml11_surprise(value)
    if surprise is not None and (surprise is not value or _typed_ok(int(surprise), hint)):
        kind = "base-60" if ":" in surprise.text else "octal"
        raise CLIError(f"{source}: {section}.{key}: YAML 1.1 reads {surprise.text} as the {kind} number "
                       f"{surprise!r}; write the number in decimal, without leading zeros or colons.")
    try:
        return _typed(value, hint)
    except _WrongType as err:
        expected = str(err)
    if isinstance(value, bool) and _typed_ok("no", hint):
        why = " YAML reads unquoted yes/no/on/off/true/false as booleans: write the word in quotes (\"no\", \"off\")."

    elif isinstance(value, str) and value.strip().lower() in _BOOLEAN_WORDS and _typed_ok(True, hint):
        why = " Write true or false without quotes."
    elif value is None:
        why = " Remove the key to keep the default."
    elif isinstance(value, int | float) and not isinstance(value, bool) and _typed_ok("x", hint):
        why = " Write it in quotes: YAML reads an unquoted number as a number (and 0123 as octal)."
    elif isinstance(value, float) and _typed_ok(1, hint) and not _typed_ok(0.5, hint):
        why = " Write a whole number."
    else:
        why = ""
    kind = type(value).__name__ if not isinstance(value, _Yaml11Int | _Yaml11Float) else type(value).__mro__[1].__name__
    raise CLIError(f"{source}: {section}.{key} must be {expected}, got {value!r} ({kind}).{why}")


_BOOLEAN_WORDS = ("true", "false", "yes", "no", "on", "off", "y", "n", "1", "0")


def _typed_ok(value: Any, hint: Any) -> bool:
    try:
        _typed(value, hint)
    except _WrongType:
        return False
    return True


def _config_path(path: str | Path) -> Path:
    candidate = Path(path).expanduser()  # --config=~/run.yaml: no shell expands a ~ after '='
    if candidate.is_file():
        return candidate
    for name in (str(path), f"{path}.yaml", f"{path}.yml", f"{path}.json"):
        shipped = CONFIG_DIR / name
        if "/" not in str(path) and shipped.is_file():
            local = [n for n in (f"{path}.yaml", f"{path}.yml", f"{path}.json") if Path(n).is_file()]
            if local:  # a copy edited here is not what a bare name reads
                logging.getLogger("m2ist.cli").warning(
                    "--config %s reads the shipped config %s, not ./%s; pass --config ./%s to read yours.", path,
                    shipped, local[0], local[0])
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
        values = (json.loads(text, object_pairs_hook=refuse_repeated_keys) if file.suffix == ".json"
                  else yaml.load(text, Loader=_UniqueKeyLoader))  # a SafeLoader
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise CLIError(f"Cannot parse config file {file}: {' '.join(str(err).split())}") from err
    except RepeatedKeyError as err:
        raise CLIError(f"Config file {file}: the key '{err.key}' appears twice in one object; keep one (the parser "
                       "would silently drop the first).") from None
    except _RepeatedKey as err:
        raise CLIError(f"Config file {file}: {err}") from None
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
                _assign(sections, key, str(name), item, source=str(file), once=True)
        else:
            section = _section_of(str(key), source=str(file))
            _assign(sections, section, str(key), value, source=str(file), once=True)
    return sections


class _RepeatedKey(ValueError):
    """A key given twice in one mapping of a YAML config file (the parser keeps the last one silently)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping (a second ``training:`` section would
    otherwise replace the first whole, and a repeated setting would drop the first value), naming the line."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:  # before merging: keys merged in (<<: *anchor) may be overridden
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: the constructor reports it
                    continue
                if first != key_node.start_mark.line + 1:
                    raise _RepeatedKey(f"the key '{key}' appears twice in one mapping (lines {first} and "
                                       f"{key_node.start_mark.line + 1}); keep one (YAML would silently drop the "
                                       "first).")
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        return _yaml11_number(node, super().construct_yaml_int(node))

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        return _yaml11_number(node, super().construct_yaml_float(node))


class _Yaml11Int(int):
    """An int YAML 1.1 read from a leading-zero octal (``040`` is 32) or base-60 (``1:30`` is 90) scalar."""

    text = ""


class _Yaml11Float(float):
    """A float YAML 1.1 read from a base-60 scalar (``1:30.5`` is 90.5)."""

    text = ""


def _yaml11_number(node: yaml.ScalarNode, value: Any) -> Any:
    """``value``, marked with its text when YAML 1.1 read it as an octal or base-60 number nobody means."""
    digits = str(node.value).replace("_", "").lstrip("+-")
    if ":" not in digits and not (len(digits) > 1 and digits[0] == "0" and digits.isdigit()):
        return value
    marked = (_Yaml11Int if isinstance(value, int) else _Yaml11Float)(value)
    marked.text = str(node.value)
    return marked


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _UniqueKeyLoader.construct_yaml_float)


def _yaml11_surprise(value: Any) -> _Yaml11Int | _Yaml11Float | None:
    """The first number in ``value`` (a scalar, list or mapping) that YAML 1.1 read as octal or base 60."""
    if isinstance(value, _Yaml11Int | _Yaml11Float):
        return value
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, list | tuple) else ()
    return next((found for found in map(_yaml11_surprise, items) if found is not None), None)

def _section_of(key: str, *, source: str, allowed: tuple[str, ...] = SECTIONS) -> str:
    owners = [section for section, keys in _section_keys(allowed).items() if key in keys]
    if not owners:
        raise CLIError(f"{source}: unknown setting '{key}'. Use 'section.key' with a section among {', '.join(SECTIONS)} "
                       "(see `m2ist train --help`).")
    if len(owners) > 1:
        raise CLIError(f"{source}: '{key}' exists in several sections ({', '.join(owners)}); write "
                       f"{' or '.join(f'{o}.{key}' for o in owners)}.")
    return owners[0]

def _assign(settings: dict[str, Any], section: str, key: str, value: Any, *, source: str, once: bool = False) -> None:
    """Set ``settings[section][key]`` to ``value`` checked against the key's type; ``once``: refuse a key already
    set (a config file naming a setting both at the top level and in its section)."""
    if section not in SECTIONS:
        raise CLIError(f"{source}: unknown section '{section}'; sections are {', '.join(SECTIONS)}.")
    known = _section_keys((section,))[section]
    if key not in known:
        close = sorted(k for k in known if k.startswith(key[:4]))[:5]
        hint = f" Did you mean one of {close}?" if close else ""
        raise CLIError(f"{source}: '{key}' is not a {section} setting.{hint}")
    if once and key in settings.get(section, {}):
        raise CLIError(f"{source}: {section}.{key} is given twice (as '{key}' at the top level and in the "
                       f"'{section}' section); keep one.")
    settings.setdefault(section, {})[key] = checked_value(section, key, value, source=source)

def _parse_set(item: str, allowed: tuple[str, ...] = SECTIONS, command: str | None = None
               ) -> tuple[str, str, Any]:
    if "=" not in item:
        raise CLIError(f"--set expects key=value (e.g. --set training.num_train_epochs=5), got {item!r}.")
    key, raw = item.split("=", 1)
    key = key.strip().replace("-", "_")
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else ""  # a SafeLoader
    except yaml.YAMLError as err:
        raise CLIError(f"--set {item!r}: the value is not valid YAML ({err}).") from err
    if "." in key:
        section, name = key.split(".", 1)
    else:
        section, name = _section_of(key, source=f"--set {item}", allowed=allowed), key
    if section in SECTIONS and section not in allowed:
        raise CLIError(f"--set {item}: this command takes no {section} settings; its sections are "
                       f"{', '.join(allowed)}.")
    reads = command_keys(command, section)
    if reads is not None and name in _section_keys((section,))[section] and name not in reads:
        raise CLIError(f"--set {item}: `m2ist {command}` does not read {section}.{name} (it would be ignored); the "
                       f"{section} settings it reads are {', '.join(sorted(reads))}.")
    text = raw.strip()
    if section in SECTIONS and not isinstance(value, str) and text and text[0] not in "'\"[{":
        hint = _key_type(section, name)  # a bare word for a text key is that text: --set save_strategy=no
        if not _typed_ok(value, hint) and _typed_ok(text, hint):
            value = text
    return section, name, value

def resolve_settings(namespace: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Merge ``--config`` (lowest), ``--set`` and explicit flags (highest) into ``{section: {key: value}}``."""
    settings: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    origin: dict[str, tuple[int, str]] = {}  # the layer (0 config, 1 --set, 2 flag) and the words of each data key
    config = getattr(namespace, "config", None)
    from_config: dict[str, Any] = {}
    if config is not None:
        from_config = load_config_file(config)
        for section, values in from_config.items():
            settings[section].update(values)
        origin.update(dict.fromkeys(settings["data"], (0, f"the config file {config}")))
    command = getattr(namespace, "command", None)
    allowed = COMMAND_SECTIONS.get(command, SECTIONS)
    for item in getattr(namespace, "set", None) or []:
        section, name, value = _parse_set(item, allowed, command)
        _assign(settings, section, name, value, source=f"--set {item}")
        if section == "data":
            origin[name] = (1, f"--set {item}")
    for dest, value in vars(namespace).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            settings[section][name] = value
            if section == "data":
                origin[name] = (2, "--" + _FLAG_NAMES.get(name, name).replace("_", "-"))
    expand_paths(settings)
    if config is not None:
        _refuse_paths_only_beside_the_config(settings, from_config, config)
    _one_way_to_name_eval_splits(settings["data"], origin)
    _drop_settings_of_an_earlier_format(settings["data"], origin)
    if settings["evaluation"].get("device") not in (None, ""):
        check_device(settings["evaluation"]["device"])
    return settings

_FLAG_NAMES = {"eval_files": "eval_file", "format": "data_format"}

#: The settings that name local files or folders (the model ones may be Hub ids, which never start with ``~``).
PATH_KEYS: dict[str, tuple[str, ...]] = {
    "model": ("vision_model", "text_model", "adapter", "processor"),
    "data": ("data_root", "image_root", "train_file", "eval_files"),
    "training": ("output_dir", "resume_from_checkpoint", "deepspeed", "fsdp_config"),
    "evaluation": ("output_file",),
}
# $NAME or ${NAME}: an environment variable a shell would expand, and a settings file does not
_VARIABLE = re.compile(r"\$(\{\w+\}|[A-Za-z_]\w*)")


def user_path(text: str) -> str:
    """``text`` with a leading ``~`` / ``~user`` made the home folder; also an argparse ``type`` for a file or folder
    flag. A shell expands ``~`` only at the start of a word, so ``--output=~/boxes.json`` reached m2ist as written and
    created a folder named ``~``."""
    import os

    return os.path.expanduser(text) if text.startswith("~") else text


def _expand_path(section: str, key: str, value: str, named: bool = False) -> str:
    """``value`` with a leading ``~`` / ``~user`` made the home folder (a shell does so on the command line, a settings
    file or ``--output-dir=~/x`` does not: the path would be a folder named ``~`` in the working directory); a path
    that holds an environment variable (``$DATA/refcoco``), which m2ist does not expand, or that starts or ends with
    spaces, is refused unless it exists as written. ``named``: ``value`` may be ``NAME=PATH`` (``--eval-file``)."""
    import os

    path = value.split("=", 1)[1] if named and _names_a_split(value) else value
    expanded = user_path(path)
    if not os.path.lexists(expanded):
        variable = _VARIABLE.search(expanded)
        if variable:
            raise CLIError(f"{section}.{key} {path!r} holds {variable.group(0)}: m2ist does not expand environment "
                           "variables in settings (only a shell does, on the command line): write the path out, or "
                           "pass it as a flag.")
        if expanded != expanded.strip():
            raise CLIError(f"{section}.{key} {path!r} starts or ends with spaces, and no such path exists: remove "
                           "them (quoted YAML and JSON strings keep them).")
    return value[: len(value) - len(path)] + expanded


#: The path settings that name what a command writes (the others name what it reads).
_OUTPUT_KEYS = frozenset({"output_dir", "output_file"})


def _refuse_paths_only_beside_the_config(settings: Mapping[str, Mapping[str, Any]], from_config: Mapping[str, Any],
                                         config: str | Path) -> None:
    """Refuse a relative path a config file gives (and no later layer replaced) that does not exist in the working
    folder, which it is read from, but does beside the config file: the loader's "not found" named a path that
    looked right in the file (``--config exp/run.yaml`` with ``train_file: train.jsonl`` next to it)."""
    import os

    folder = _config_path(config).resolve().parent
    if folder == CONFIG_DIR.resolve():  # a shipped recipe names no local files
        return
    for section, keys in PATH_KEYS.items():
        given = from_config.get(section, {})
        for key in keys:
            if key in _OUTPUT_KEYS:  # written, not read: a new folder or file wherever the command runs
                continue
            value = settings.get(section, {}).get(key)
            if value is None or value != given.get(key):
                continue  # not from the config file: a flag or --set replaced it
            named = (section, key) == ("data", "eval_files")
            items = value.values() if isinstance(value, Mapping) else [value] if isinstance(value, str) else \
                value if isinstance(value, list) else []  # (resume_from_checkpoint: true names no path)
            for item in items:
                if not isinstance(item, str):
                    continue
                path = item.split("=", 1)[1] if named and _names_a_split(item) else item
                if not path or os.path.isabs(path) or os.path.lexists(path) or not os.path.lexists(folder / path):
                    continue
                raise CLIError(f"{section}.{key} {path!r} in the config file {config} is read from the working folder "
                               f"{Path.cwd()}, where it does not exist, while {folder / path} exists beside the config "
                               "file: write the path from the working folder (or absolute), or run m2ist from "
                               f"{folder}.")


def _names_a_split(item: str) -> bool:
    """Whether an ``eval_files`` item is ``NAME=PATH`` (as :func:`m2ist.cli.data._name_and_path` reads it)."""
    from .data import _name_and_path

    return _name_and_path(item)[1] != item


def expand_paths(settings: dict[str, dict[str, Any]]) -> None:
    """Expand ``~`` in the path settings of every layer (:data:`PATH_KEYS`, see :func:`_expand_path`)."""
    for section, keys in PATH_KEYS.items():
        values = settings.get(section, {})
        for key in keys:
            value = values.get(key)
            named = (section, key) == ("data", "eval_files")
            if isinstance(value, str):
                values[key] = _expand_path(section, key, value, named)
            elif isinstance(value, list):
                values[key] = [_expand_path(section, key, item, named) if isinstance(item, str) else item
                               for item in value]
            elif isinstance(value, Mapping):
                values[key] = {name: _expand_path(section, key, item) if isinstance(item, str) else item
                               for name, item in value.items()}


def _one_way_to_name_eval_splits(data: dict[str, Any], origin: Mapping[str, tuple[int, str]]) -> None:
    """Keep ``data.eval_files`` or ``data.eval_splits``, never both: the loaders read the files and drop the split
    names. Files given in a later layer than the names replace them (``--eval-file`` over a recipe's ``eval_splits``);
    names given as late as the files, which would be ignored, are refused, as are files for a format that reads none."""
    if data.get("format") in ("refer", "hf"):
        for key in ("eval_files", "train_file"):
            if data.get(key):
                raise CLIError(f"{origin[key][1]}: --data-format {data['format']} reads no files, so data.{key} would be "
                               "ignored; name the splits with --eval-splits / --train-split, or pick a file format.")
    if not data.get("eval_files") or not data.get("eval_splits"):
        return
    (files_layer, files), (splits_layer, splits) = origin["eval_files"], origin["eval_splits"]
    if files_layer > splits_layer:
        del data["eval_splits"]  # the later layer wins, as for any setting
        return
    raise CLIError(f"data.eval_splits (from {splits}) would be ignored: the files of data.eval_files (from {files}) are "
                   "read instead; name each file's split with --eval-file NAME=FILE, or give only the split names "
                   "(--set data.eval_files=null drops a config file's files).")


def _drop_settings_of_an_earlier_format(data: dict[str, Any], origin: Mapping[str, tuple[int, str]]) -> None:
    """Drop the data settings the format does not read that come from an earlier layer than the format (a recipe's
    ``dataset: unc`` under ``--data-format jsonl``): they belonged to the format replaced. One given as late as the
    format, or later, is left for :func:`m2ist.cli.data.refuse_settings_of_other_formats` to refuse."""
    from .data import settings_of_other_formats

    if "format" not in origin:
        return
    for key in settings_of_other_formats(data):
        if origin[key][0] < origin["format"][0]:
            del data[key]


def check_device(value: Any) -> None:
    """Refuse a ``--device`` / ``evaluation.device`` torch cannot parse, or an accelerator this machine does not
    have. ``cpu`` and this machine's accelerator (``torch.accelerator``: CUDA, MPS, XPU, ...) are accepted."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise CLIError(f"--device {value!r} is not a device: use cpu, cuda, cuda:N, mps or xpu.") from None
    if device.type == "cpu":
        return
    here = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    offer = "--device cpu" + (f" or --device {here.type}" if here is not None else "")
    if device.type not in _ACCELERATORS:
        raise CLIError(f"--device {value}: m2ist runs on cpu or on this machine's accelerator (cuda, mps, xpu, ...); "
                       f"use {offer}.")  # meta, xla...: no real tensors to evaluate
    if here is None or here.type != device.type:
        name = {"cuda": "CUDA GPU", "mps": "MPS device", "xpu": "XPU"}.get(device.type, f"{device.type} device")
        raise CLIError(f"--device {value}: no {name} is visible here; use {offer}.")
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        raise CLIError(f"--device {value}: this machine has {count} {device.type} device(s), numbered from 0.")


#: torch's accelerator device types (checked against the one this machine has).
_ACCELERATORS = ("cuda", "mps", "xpu", "npu", "hpu", "mtia", "maia", "ipu")


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
        arguments = cls(**values)
    except (TypeError, ValueError) as err:
        raise CLIError(f"Invalid training arguments: {err}") from err
    _warn_accelerate_environment(arguments)
    return arguments


def _warn_accelerate_environment(arguments: Any) -> None:
    """Warn when an ``ACCELERATE_*`` variable of the environment (left by ``accelerate config`` or a launcher) makes
    transformers train otherwise than the settings say, which is what ``m2ist_cli_config.yaml`` records: in mixed
    precision with ``fp16`` and ``bf16`` off, or on the CPU with ``use_cpu`` off."""
    import os

    from transformers.utils import strtobool

    warn = logging.getLogger("m2ist.cli").warning
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if getattr(arguments, "mixed_precision", "no") not in ("no", None) and not (arguments.fp16 or arguments.bf16):
        switch = "bf16" if precision == "bf16" else "fp16"
        warn("The environment variable ACCELERATE_MIXED_PRECISION=%s makes training run in %s mixed precision, though "
             "training.fp16 and training.bf16 are off (and are recorded so): unset it to train in float32, or pass "
             "--%s to train and record it so.", precision, precision, switch)
    try:
        on_cpu = bool(strtobool(os.environ.get("ACCELERATE_USE_CPU", "false")))
    except ValueError:
        on_cpu = False
    if on_cpu and not arguments.use_cpu:
        warn("The environment variable ACCELERATE_USE_CPU=%s makes training run on the CPU, though training.use_cpu is "
             "off (and is recorded so): unset it to train on the accelerator, or pass --use-cpu to say so.",
             os.environ["ACCELERATE_USE_CPU"])


def build_augmentation(settings: Mapping[str, Mapping[str, Any]]):
    """``RECAugmentation`` from ``settings['augmentation']``, or ``None`` when ``data.augment`` is false."""
    from m2ist.data.transforms import RECAugmentation

    if not settings.get("data", {}).get("augment", True):
        return None
    try:
        return RECAugmentation(**settings.get("augmentation", {}))
    except (TypeError, ValueError) as err:
        raise CLIError(f"Invalid augmentation settings: {err}") from err

def dump_settings(settings: Mapping[str, Mapping[str, Any]]) -> str:
    """``settings`` as the YAML of ``m2ist_cli_config.yaml``, which ``--config`` reads back to the same settings."""
    return yaml.safe_dump(plain(settings), sort_keys=False, allow_unicode=True)


def plain(value: Any) -> Any:
    """Settings as plain YAML/JSON types."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
