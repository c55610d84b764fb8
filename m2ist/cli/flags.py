"""Flags shared by the commands, grouped as the settings' sections (``--vision-model`` is ``model.vision_model``)."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from typing import Any

from .data import DATA_FORMATS
from .settings import m2ist_fields


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=110)

def wrap(text: str) -> str:
    return textwrap.fill(text, width=108)

def _add(group, *flags: str, dest: str, **kwargs: Any) -> None:
    group.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, **kwargs)

def add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                       help="YAML or JSON config file, or a shipped config name (refcoco, refcoco+, refcocog, referit)")
    group.add_argument("--set", metavar="KEY=VALUE", action="append", default=argparse.SUPPRESS,
                       help="override one setting, e.g. --set training.num_train_epochs=5 (repeatable; explicit flags "
                            "win over --set, which wins over the config file)")
    group.add_argument("--print-config", action="store_true", default=False,
                       help="print the resolved settings as JSON and exit")

def add_tower_flags(parser: argparse.ArgumentParser, required_note: str) -> None:
    group = parser.add_argument_group("towers")
    _add(group, "--vision-model", dest="model.vision_model", metavar="ID_OR_PATH",
         help=f"vision tower: Hub id or local folder (e.g. facebook/detr-resnet-50){required_note}")
    _add(group, "--text-model", dest="model.text_model", metavar="ID_OR_PATH",
         help=f"text tower: Hub id or local folder (e.g. bert-base-uncased){required_note}")
    _add(group, "--vision-revision", dest="model.vision_revision", metavar="REV", help="revision of the vision tower")
    _add(group, "--text-revision", dest="model.text_revision", metavar="REV", help="revision of the text tower")
    _add(group, "--trust-remote-code", dest="model.trust_remote_code", action="store_true",
         help="allow towers whose code lives in their Hub repo (runs that code)")

def add_data_flags(parser: argparse.ArgumentParser, train: bool) -> None:
    group = parser.add_argument_group(
        "data", wrap("--data-format picks the loader: refer (refer API: --data-root, --dataset, --split-by), transvg "
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

def add_m2ist_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("M²IST model (M2ISTConfig; defaults are the paper's)")
    for name, f in m2ist_fields().items():
        kwargs = _m2ist_flag_kwargs(f)
        if kwargs is not None:
            _add(group, f"--{name.replace('_', '-')}", dest=f"m2ist.{name}", **kwargs)

def add_training_flags(parser: argparse.ArgumentParser) -> None:
    from m2ist.model import METHODS

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

def add_evaluation_flags(parser: argparse.ArgumentParser, command: str) -> None:
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
