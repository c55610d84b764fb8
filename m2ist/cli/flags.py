"""Flags shared by the commands, grouped as the settings' sections (``--vision-model`` is ``model.vision_model``)."""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import enum
import re
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from m2ist.config import BOX_LOSSES, DTYPES, EXPERTS, LAYER_PAIRINGS, TAP_KINDS
from m2ist.data.loaders import SENTENCE_FIELDS

from .data import DATA_FORMATS
from .settings import COMMAND_SECTIONS, m2ist_fields
from .settings import user_path as user_path  # the argparse type of every path flag (settings.py expands settings' paths with it)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=110)

def wrap(text: str) -> str:
    return textwrap.fill(text, width=108)

def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{text} must be {'positive' if least == 1 else f'at least {least}'}")
    return value

def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number >= 1 (a count of steps, a batch size)."""
    return _int_at_least(text, 1)

def non_negative_int(text: str) -> int:
    """An argparse ``type``: a whole number >= 0 (warm-up steps, workers)."""
    return _int_at_least(text, 0)


def iou_threshold(text: str) -> float:
    """An argparse ``type``: an IoU threshold, a number in (0, 1] (``75`` for 0.75 is refused when parsed, not after
    training)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]: give IoU thresholds as fractions, e.g. 0.5 0.75")
    return value


def device_name(text: str) -> str:
    """An argparse ``type``: a device torch knows and this machine has (cpu, cuda, cuda:N, mps)."""
    from .errors import CLIError
    from .settings import check_device

    try:
        check_device(text)
    except CLIError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--device ")) from None
    return text

def _add(group, *flags: str, dest: str, **kwargs: Any) -> None:
    group.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, **kwargs)

def add_config_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """``--config``, ``--set`` (naming only ``command``'s sections) and ``--print-config``."""
    sections = COMMAND_SECTIONS[command]
    example = {"train": "training.num_train_epochs=5", "eval": "evaluation.batch_size=64",
               "predict": "evaluation.device=cpu"}[command]
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                       help="YAML or JSON config file, or a shipped config name (refcoco, refcoco+, refcocog, referit)")
    group.add_argument("--set", metavar="KEY=VALUE", action="append", default=argparse.SUPPRESS,
                       help=f"override one setting of a section ({', '.join(sections)}), e.g. --set {example} "
                            "(repeatable; explicit flags win over --set, which wins over the config file)")
    group.add_argument("--print-config", action="store_true", default=False,
                       help="print the resolved settings as JSON and exit")
    parser.set_defaults(command=command)

def add_tower_flags(parser: argparse.ArgumentParser, required_note: str, pad_token: bool = False) -> None:
    """The tower flags; ``pad_token``: also ``--pad-token`` (``m2ist train``, which builds the processor)."""
    group = parser.add_argument_group("towers")
    _add(group, "--vision-model", dest="model.vision_model", metavar="ID_OR_PATH",
         help=f"vision tower: Hub id or local folder (e.g. facebook/detr-resnet-50){required_note}")
    _add(group, "--text-model", dest="model.text_model", metavar="ID_OR_PATH",
         help=f"text tower: Hub id or local folder (e.g. bert-base-uncased){required_note}")
    _add(group, "--vision-revision", dest="model.vision_revision", metavar="REV", help="revision of the vision tower")
    _add(group, "--text-revision", dest="model.text_revision", metavar="REV", help="revision of the text tower")
    _add(group, "--trust-remote-code", dest="model.trust_remote_code", action="store_true",
         help="allow towers whose code lives in their Hub repo (runs that code)")
    if pad_token:
        _add(group, "--pad-token", dest="model.pad_token", metavar="TOKEN",
             help="for a text tower whose tokenizer has no pad token (GPT-2, LLaMA...): pad with one of its own "
                  "tokens, named by role (eos, bos, unk, sep, cls) or as written (e.g. '<|endoftext|>'); recorded in "
                  "m2ist_cli_config.yaml and saved with the processor")

def add_data_flags(parser: argparse.ArgumentParser, train: bool) -> None:
    files = "--train-file/--eval-file" if train else "--eval-file"
    group = parser.add_argument_group(
        "data", wrap("--data-format picks the loader: refer (refer API: --data-root, --dataset, --split-by), transvg "
        f"(split files: --data-root + --dataset, or {files} .pth), jsonl/csv/coco (your files: "
        f"{files}, --box-format), hf (Hugging Face datasets: --data-root id or saved folder)."))
    _add(group, "--data-format", dest="data.format", choices=DATA_FORMATS, help="dataset layout")
    _add(group, "--data-root", dest="data.data_root", metavar="PATH",
         help="refer: the refer data folder; transvg: the split root; hf: a Hub dataset id or a save_to_disk folder")
    _add(group, "--dataset", dest="data.dataset", metavar="NAME",
         help="refer: refcoco|refcoco+|refcocog|refclef; transvg: unc|unc+|gref|gref_umd|referit|flickr; hf: config name")
    _add(group, "--split-by", dest="data.split_by", metavar="NAME", help="refer: unc|google|umd (default: the dataset's)")
    _add(group, "--image-root", dest="data.image_root", metavar="DIR", help="folder the image file names are relative to")
    _add(group, "--allow-outside-image-root", dest="data.allow_outside_image_root", action="store_true",
         help="accept image paths that lead outside --image-root (refused by default)")
    if train:
        _add(group, "--train-split", dest="data.train_split", metavar="NAME", help="training split name (default: train)")
        _add(group, "--train-file", dest="data.train_file", metavar="FILE", help="jsonl/csv/coco/transvg: the training file")
    _add(group, "--eval-splits", "--splits", dest="data.eval_splits", nargs="+", action="extend", metavar="NAME",
         help="evaluation split names, e.g. val testA testB; the flag repeated adds to them"
              + ("" if train else " (default: val)"))
    _add(group, "--eval-file", dest="data.eval_files", action="append", metavar="[NAME=]FILE",
         help="jsonl/csv/coco/transvg: an evaluation file, named NAME (default: the file name; an existing path "
              "is never split at '='); repeatable, one split name each")
    _add(group, "--box-format", dest="data.box_format", choices=("xyxy", "xywh", "cxcywh"),
         help="jsonl/csv (required), coco (default xywh), hf generic rows: how the files store boxes")
    _add(group, "--csv-delimiter", dest="data.csv_delimiter", metavar="CHAR",
         help="csv: the character between columns (default: ','; 'tab' for a tab), e.g. ';' for Excel's files in "
              "locales with a decimal comma")
    _add(group, "--normalized", dest="data.normalized", action="store_true",
         help="box numbers are fractions of the image size, not pixels")
    _add(group, "--trusted", dest="data.trusted", action="store_true",
         help="transvg: allow unrestricted unpickling of the .pth files (only for files you trust)")
    _add(group, "--text-column", dest="data.text_column", metavar="NAME", help="hf: the column holding the expressions")
    _add(group, "--hf-style", dest="data.hf_style", choices=("jxu124", "lmms-lab", "generic"),
         help="hf: the row layout (default: detected)")
    _add(group, "--sentence-field", dest="data.sentence_field", choices=SENTENCE_FIELDS,
         help="refer/hf: normalised ('sent', default), raw, or the word list joined ('tokens') sentences")
    if train:
        _add(group, "--max-train-samples", dest="data.max_train_samples", type=positive_int, metavar="N",
             help="use only the first N training expressions")
        _add(group, "--skip-invalid", dest="data.skip_invalid", action="store_true",
             help="skip samples whose image cannot be read instead of stopping")
        _add(group, "--no-augment", dest="data.augment", action="store_false",
             help="train without TransVG's augmentations (crop, resize, jitter, flip, random placement)")
    _add(group, "--max-eval-samples", dest="data.max_eval_samples", type=positive_int, metavar="N",
         help="use only the first N expressions of each evaluation split")

#: Choices of M2ISTConfig's string fields (the config validates against the same tuples).
M2IST_CHOICES: dict[str, tuple[str, ...]] = {
    "experts": EXPERTS, "intra_tap": TAP_KINDS, "inter_tap": TAP_KINDS, "layer_pairing": LAYER_PAIRINGS,
    "box_loss": BOX_LOSSES, "backbone_dtype": DTYPES, "fusion_norm": ("post", "pre"), "reg_init": ("learned", "text"),
    "box_readout": ("reg", "vote"),
}
#: The short names the CLI has always had, beside the generated ``--field-name`` flags.
ALIASES: dict[str, tuple[str, ...]] = {
    "training.learning_rate": ("--lr",), "training.side_learning_rate": ("--side-lr",),
    "training.num_train_epochs": ("--epochs",), "training.per_device_train_batch_size": ("--batch-size",),
    "training.per_device_eval_batch_size": ("--eval-batch-size",),
    "training.dataloader_num_workers": ("--num-workers",), "training.resume_from_checkpoint": ("--resume",),
}
#: Flags of the ``m2ist`` command itself: a field of that name gets its section in front (``--training-debug``).
RESERVED = ("--debug", "--verbose", "--version", "--help")
_NONE_WORDS = ("none", "null")


class _ChoicesOrNone(list):
    """Choices shown with ``none``, which the flag's type has already turned into None when argparse checks it."""

    def __contains__(self, item: object) -> bool:
        return item is None or super().__contains__(item)


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.strip().lower() in _NONE_WORDS else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its error messages
    return parse


class _ListOrNone(argparse.Action):
    """A list flag of a field that may be None: ``--vision-layers none`` gives None (the help says ``| none``),
    numbers give the list; ``none`` among numbers is refused."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        repeated = hasattr(namespace, self.dest)  # the flag's default is SUPPRESS: set only by an earlier use
        earlier = getattr(namespace, self.dest, None)
        if any(value is None for value in values) or (repeated and earlier is None):
            if len(values) > 1 or repeated:
                raise argparse.ArgumentError(self, "none stands alone: give the values, or none for the default")
            values = None
        elif repeated:  # the flag repeated adds to the list, as every list flag does
            values = [*earlier, *values]
        setattr(namespace, self.dest, values)


def _yaml_value(text: str) -> Any:
    """A value read as YAML: numbers, true/false, [lists] and {mappings}; anything else stays text."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _mapping(text: str) -> dict[str, Any] | str:
    """A ``{key: value}`` mapping in JSON or YAML (a path or other text is passed on as it is)."""
    value = _yaml_value(text)
    return value if isinstance(value, dict) else text


_mapping.__name__ = "mapping"
_yaml_value.__name__ = "value"


def _members(hint: Any) -> tuple[list[Any], bool]:
    """The types a field accepts (``Optional`` and ``Literal[False]`` unwrapped) and whether None is one."""
    args = list(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
    optional = type(None) in args
    members = [a for a in args if a is not type(None) and not (typing.get_origin(a) is typing.Literal and
                                                                 typing.get_args(a) == (False,))]
    return members, optional


def _type_name(member: Any) -> str:
    origin = typing.get_origin(member)
    if origin in (list, tuple, collections.abc.Sequence):
        return f"list of {_type_name(typing.get_args(member)[0])}" if typing.get_args(member) else "list"
    if origin is dict or member is dict:
        return "mapping"
    return getattr(member, "__name__", str(member))


def flag_kwargs(f: dataclasses.Field, hint: Any, choices: Sequence[str] | None = None,
                help_text: str | None = None) -> dict[str, Any]:
    """``add_argument`` keywords for a dataclass field: the type, ``nargs``, the choices, and a help that ends with
    the type and the default."""
    members, optional = _members(hint)
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    default = default.value if isinstance(default, enum.Enum) else default
    if isinstance(default, str) and default.lower() in _NONE_WORDS:
        optional = False  # "none" is a value of its own here (report_to="none"), not None
    choices = choices or f.metadata.get("choices")
    enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
    if enums:
        choices = [e.value for e in enums[0]]
    kwargs: dict[str, Any] = {}
    member = members[0] if len(members) == 1 else None
    origin = typing.get_origin(member)
    if member is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is tuple and typing.get_args(member) and ... not in typing.get_args(member):
        kwargs.update(nargs=len(typing.get_args(member)), type=typing.get_args(member)[0], metavar="X")
    elif origin in (list, tuple, collections.abc.Sequence):
        item = (typing.get_args(member) or (str,))[0]
        # the flag alone gives an empty list only where that is the default ("no drops"); elsewhere it would be a
        # forgotten value (--experts --epochs 5), which argparse refuses as "expected at least one argument"
        empty = isinstance(default, list | tuple) and not default
        # action="extend": the flag repeated adds to the list (argparse's default kept the last values only)
        kwargs.update(nargs="*" if empty else "+", type=item if item in (int, float, str) else _yaml_value,
                      action="extend")
        if optional:
            kwargs.update(type=_none_or(kwargs["type"]), action=_ListOrNone,
                          metavar={int: "N", float: "X", str: "TEXT"}.get(kwargs["type"], "VALUE"))
    elif origin is dict or member is dict or any(typing.get_origin(m) is dict or m is dict for m in members):
        kwargs.update(type=_mapping, metavar="JSON")
    elif member in (int, float, str):
        kwargs["type"] = member
    else:  # str | bool, str | list[str], an object: read as YAML
        kwargs["type"] = str if enums or choices else _yaml_value
    if "type" in kwargs and "metavar" not in kwargs:
        kwargs["metavar"] = {int: "N", float: "X", str: "TEXT"}.get(kwargs["type"], "VALUE")
    if "type" in kwargs and optional and not kwargs.get("nargs"):
        kwargs["type"] = _none_or(kwargs["type"])
    listed = ""
    if choices:
        kwargs["choices"] = _ChoicesOrNone([*choices, "none"]) if optional else list(choices)
        if "type" in kwargs and not kwargs.get("nargs"):
            kwargs["type"] = _none_or(str) if optional else str
        if len(kwargs["choices"]) > 8:  # a long list goes into the help text, not into the usage line
            kwargs["metavar"] = "NAME"
            listed = f" Choices: {', '.join(map(str, kwargs['choices']))}."
        else:
            kwargs.pop("metavar", None)
    kind = " | ".join(_type_name(m) for m in members) + (" | none" if optional else "")
    text = " ".join((help_text or f.metadata.get("help") or "").split())
    if kwargs.get("nargs") == "*":
        listed += " The flag with no values gives an empty list (it replaces a config file's list)."
    kwargs["help"] = f"{text}{listed} [{kind}; default: {default!r}]".strip().replace("%", "%%")
    return kwargs


def _field_help(cls: type) -> dict[str, str]:
    """Per-field help from a Google-style ``Attributes:`` docstring section (for dataclasses without metadata)."""
    found: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    name = None
    for line in lines:
        match = re.match(r"^\s{4,8}(\w+): (.*)$", line)
        if match:
            name, found[match.group(1)] = match.group(1), match.group(2)
        elif name and line.strip() and line.startswith(" " * 12):
            found[name] += " " + line.strip()
        else:
            name = None
    return found


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, section: str, title: str, *,
                        fields: Mapping[str, dataclasses.Field] | None = None,
                        choices: Mapping[str, Sequence[str]] | None = None) -> argparse._ArgumentGroup:
    """One ``--kebab-name`` flag per init field of the dataclass ``cls`` (or of ``fields``), storing into
    ``section.name``; a name another flag of the parser already has gets the section in front
    (``--training-debug``). :data:`ALIASES` add the short names."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    docs = _field_help(cls)
    taken = set(parser._option_string_actions) | set(RESERVED)
    for name, f in (fields if fields is not None else dataclasses_fields(cls)).items():
        flag = f"--{name.replace('_', '-')}"
        if flag in taken or f"--no-{name.replace('_', '-')}" in taken:
            flag = f"--{section}-{name.replace('_', '-')}"
        dest = f"{section}.{name}"
        kwargs = flag_kwargs(f, hints[name], (choices or {}).get(name), docs.get(name))
        if dest == "training.resume_from_checkpoint":
            kwargs.update(nargs="?", const=True, metavar="CHECKPOINT", type=str,
                          help="resume from CHECKPOINT, or from the last checkpoint in --output-dir when no path is "
                               "given")
        extra = [alias for alias in ALIASES.get(dest, ()) if alias not in taken]
        _add(group, flag, *extra, dest=dest, **kwargs)
        taken.update((flag, *extra, f"--no-{flag[2:]}"))
    return group


def dataclasses_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The init fields of ``cls`` that settings can hold (private ones left out)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def add_m2ist_flags(parser: argparse.ArgumentParser) -> None:
    from m2ist.config import M2ISTConfig

    add_dataclass_flags(parser, M2ISTConfig, "m2ist", "M²IST model (M2ISTConfig; defaults are the paper's)",
                        fields=m2ist_fields(), choices=M2IST_CHOICES)


def add_augmentation_flags(parser: argparse.ArgumentParser) -> None:
    from m2ist.data.transforms import RECAugmentation

    add_dataclass_flags(parser, RECAugmentation, "augmentation",
                        "augmentation (RECAugmentation, TransVG's; --no-augment turns it off)")


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    from m2ist.model import METHODS
    from m2ist.trainer import TOWER_DTYPES, RECTrainingArguments

    add_dataclass_flags(parser, RECTrainingArguments, "training",
                        "training (RECTrainingArguments: transformers' TrainingArguments with the recipe's defaults)",
                        choices={"method": METHODS, "tower_dtype": TOWER_DTYPES})

def add_evaluation_flags(parser: argparse.ArgumentParser, command: str) -> None:
    group = parser.add_argument_group("inference" if command == "predict" else "evaluation")
    if command != "predict":
        _add(group, "--iou-thresholds", dest="evaluation.iou_thresholds", type=iou_threshold, nargs="+",
             action="extend", metavar="T",
             help="report Acc@T for each T (default: 0.5; IoU >= T, the TransVG criterion, not GIoU)")
        _add(group, "--output", dest="evaluation.output_file", metavar="FILE",
             help="results JSON (default: <adapter>/eval_results.json for an adapter folder, ./eval_results.json for "
                  "a Hub repo id; eval_results.first-N.json with --max-eval-samples N, eval_results.clamp-canvas.json, "
                  ".other-processor.json or .other-towers.json when scored otherwise than the card's protocol)"
             if command == "eval" else
             "results JSON of the final evaluation (default: <output-dir>/eval_results.json)")
        _add(group, "--clamp", dest="evaluation.clamp", choices=("image", "canvas"),
             help="clamp predictions to the image (default, spec) or to the padded canvas (TransVG's code)")
        _add(group, "--no-progress", dest="evaluation.progress", action="store_false", help="hide progress bars")
    if command == "train":
        _add(group, "--no-final-eval", dest="evaluation.final_eval", action="store_false",
             help="do not score the evaluation splits after training")
        return
    _add(group, "--batch-size", dest="evaluation.batch_size", type=positive_int, metavar="N",
         help=f"expressions per forward pass (default: {32 if command == 'eval' else 16})")
    _add(group, "--device", dest="evaluation.device", metavar="DEVICE",
         help="cpu, cuda, cuda:1, mps, xpu ... (default: cuda if available, else cpu)")
    if command == "eval":
        _add(group, "--num-workers", dest="evaluation.num_workers", type=non_negative_int, metavar="N",
             help="DataLoader worker processes that load the images")
        _add(group, "--save-predictions", dest="evaluation.save_predictions", action="store_true",
             help="also write every expression's predicted box and IoU to the results")

def add_adapter_flags(parser: argparse.ArgumentParser) -> None:
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


def examples(command: str) -> str:
    """The lines of :data:`EXAMPLES` that run ``command``."""
    blocks = EXAMPLES.split("\n  m2ist ")
    return "\n  m2ist ".join([blocks[0]] + [b for b in blocks[1:] if b.startswith(f"{command} ")]).rstrip() + "\n"
