"""``m2ist train``: build the towers, the model and the processor, load the data, train, save, score."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .data import data_record, eval_limit_cut_nothing, load_data_splits, warn_evaluation_overlap
from .errors import CLIError, refuse_dash
from .evaluate import check_scoring_options
from .flags import (
    HelpFormatter,
    add_augmentation_flags,
    add_config_flags,
    add_data_flags,
    add_evaluation_flags,
    add_m2ist_flags,
    add_tower_flags,
    add_training_flags,
    examples,
    wrap,
)
from .loading import info, load_tower, local_or_hub
from .report import print_metrics
from .settings import (
    build_augmentation,
    build_m2ist_config,
    build_training_arguments,
    dump_settings,
    settings_help,
)

#: The line ``m2ist --help`` shows for this command.
HELP = "side-tune two frozen towers on REC data and save the adapter"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train`` and its flags to the ``m2ist`` subcommands: every field of M2ISTConfig (but the recorded
    towers), RECAugmentation and RECTrainingArguments is a flag."""
    train = subparsers.add_parser(
        "train", formatter_class=HelpFormatter, help=HELP,
        usage="m2ist train --vision-model ID --text-model ID --output-dir DIR [data flags] [any flag below]",
        description=wrap("Side-tune frozen vision and text towers for REC (M²IST), or train a baseline (--method). "
                          "Writes the adapter (m2ist_config.json, m2ist_model.safetensors) with the processor into "
                          "--output-dir, then scores the evaluation splits (eval_results.json).") + "\n\n" +
        settings_help("train"),
        epilog=examples("train"))
    add_config_flags(train, "train")
    add_tower_flags(train, " (required)", pad_token=True)
    add_data_flags(train, train=True)
    add_evaluation_flags(train, "train")
    add_m2ist_flags(train)
    add_training_flags(train)
    add_augmentation_flags(train)  # after training: augmentation.seed is --augmentation-seed, --seed stays training's
    return train


def _check_train_settings(settings: Mapping[str, Mapping[str, Any]]) -> None:
    for key, flag in (("vision_model", "--vision-model"), ("text_model", "--text-model")):
        if not settings["model"].get(key):
            raise CLIError(f"train needs {flag} (a Hub id or a local folder), or model.{key} in the config file.")
    if not settings["training"].get("output_dir"):
        raise CLIError("train needs --output-dir DIR (or training.output_dir in the config file).")
    if "iou_thresholds" in settings.get("evaluation", {}):  # scored after training: refused now, not then
        from m2ist.evaluation import _check_thresholds

        try:
            _check_thresholds(settings["evaluation"]["iou_thresholds"])
        except ValueError as error:
            raise CLIError(f"evaluation.iou_thresholds: {error}") from None
    check_scoring_options(settings.get("evaluation", {}), command="train")


def recorded_settings(settings: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``settings`` as ``m2ist_cli_config.yaml`` records them: each local path of :data:`~.settings.PATH_KEYS` that
    exists made absolute, so that ``--config`` of the record (a resume) read from another working directory reads the
    same files, not others of the same relative names (or none)."""
    from .data import absolute_path as absolute
    from .settings import PATH_KEYS

    recorded = {section: dict(values) for section, values in settings.items()}
    for section, keys in PATH_KEYS.items():
        values = recorded.get(section, {})
        for key in keys:
            named = (section, key) == ("data", "eval_files")
            value = values.get(key)
            if isinstance(value, list):
                values[key] = [absolute(item, named) for item in value]
            elif isinstance(value, Mapping):
                values[key] = {name: absolute(item) for name, item in value.items()}
            elif value is not None:
                values[key] = absolute(value)
    return recorded


def _build_processor(model_settings: Mapping[str, Any], trust: bool, **settings: Any) -> Any:
    """The processor of the text tower's tokenizer (padding with ``model.pad_token`` when it is set, see
    :func:`m2ist.processing.set_pad_token`) and the vision tower's image statistics."""
    from m2ist.processing import RECProcessor

    pad_token = model_settings.get("pad_token")
    return RECProcessor.from_pretrained(
        local_or_hub(model_settings["text_model"]), local_or_hub(model_settings["vision_model"]),
        revision=model_settings.get("text_revision"), vision_revision=model_settings.get("vision_revision"),
        trust_remote_code=trust or None, pad_token=None if pad_token in (None, "") else str(pad_token), **settings)


def run(settings: dict[str, dict[str, Any]], args: argparse.Namespace) -> int:
    """Build the towers, the model and the processor, load the data, train, save, and score the evaluation splits."""
    from m2ist.card import EVAL_RESULTS_NAME, write_model_card
    from m2ist.data.dataset import RECDataset
    from m2ist.evaluation import check_output_file, evaluate, with_headline, write_results
    from m2ist.evidence.baselines import build_model
    from m2ist.model import SideTunedModel
    from m2ist.save_and_load import atomic_write
    from m2ist.trainer import train_rec

    _check_train_settings(settings)
    config = build_m2ist_config(settings)
    training_args = build_training_arguments(settings)
    augment = build_augmentation(settings)
    data = settings["data"]
    train_samples = load_data_splits(data, "train")
    eval_samples = (load_data_splits(data, "eval")
                    if data.get("eval_splits") or data.get("eval_files") else {})
    warn_evaluation_overlap(next(iter(train_samples.values())), eval_samples)
    if eval_limit_cut_nothing(data, eval_samples):  # whole splits: recorded as such, so the card reports them
        data = {**data, "max_eval_samples": None}
    evaluation = settings["evaluation"]
    results_file = Path(evaluation.get("output_file") or Path(training_args.output_dir) / "eval_results.json")
    if eval_samples and evaluation.get("final_eval", True):
        refuse_dash("--output", results_file, "give a file name for the JSON results (the table goes to stdout).")
        check_output_file(results_file)  # before training, not after it

    model_settings = settings["model"]
    trust = bool(model_settings.get("trust_remote_code", False))
    info(f"Loading the vision tower {model_settings['vision_model']} and the text tower {model_settings['text_model']}")
    vision = load_tower(model_settings["vision_model"], model_settings.get("vision_revision"), trust, role="vision tower")
    text = load_tower(model_settings["text_model"], model_settings.get("text_revision"), trust, role="text tower")
    method = settings["training"].get("method") or "m2ist"
    model = build_model(vision, text, config, method=method)
    processor = _build_processor(model_settings, trust, canvas_size=model.config.image_size,
                                 max_query_len=model.config.max_query_len, augment=augment)
    model.print_trainable_parameters()

    skip_invalid = bool(data.get("skip_invalid", False))
    train_set = RECDataset(next(iter(train_samples.values())), skip_invalid=skip_invalid)
    eval_sets = {name: RECDataset(samples, skip_invalid=skip_invalid) for name, samples in eval_samples.items()}
    info(f"Training on {len(train_set)} expressions" +
          (f"; evaluating on {', '.join(f'{n} ({len(d)})' for n, d in eval_sets.items())}" if eval_sets else ""))
    resume = settings["training"].get("resume_from_checkpoint")
    trainer = train_rec(model, processor, train_set, eval_sets or None, training_args,
                        resume_from_checkpoint=resume if resume not in ("", False) else None)

    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))  # the trained tensors, the config and the processor
    if not trainer.is_world_process_zero():
        return 0
    settings_text = dump_settings(recorded_settings(settings))
    atomic_write(output_dir / "m2ist_cli_config.yaml", lambda tmp: Path(tmp).write_text(settings_text, encoding="utf-8"))
    info(f"Saved the adapter and the processor to {output_dir}")

    if eval_sets and evaluation.get("final_eval", True):
        thresholds = evaluation.get("iou_thresholds", (0.5,))
        if results_file.name == EVAL_RESULTS_NAME:  # the card reads its headline Acc@0.5 from this file
            thresholds = with_headline(thresholds)
        # every expression counts (as in `m2ist eval`), unless unreadable samples are to be skipped
        results = evaluate(model, processor, eval_sets if skip_invalid else eval_samples,
                           # the batch evaluation during training used, unless the evaluation section sets one
                           batch_size=int(evaluation.get("batch_size") or training_args.per_device_eval_batch_size),
                           iou_thresholds=thresholds, progress=evaluation.get("progress", True),
                           clamp=evaluation.get("clamp", "image"),
                           num_workers=int(evaluation.get("num_workers", 0)),
                           device=evaluation.get("device") or None,  # default: where training left the model
                           save_predictions=bool(evaluation.get("save_predictions", False)),
                           metadata={"adapter": str(output_dir.resolve()), "data": data_record(data)})
        print_metrics(results["metrics"])  # first: the scores are shown even if the file cannot be written
        path = write_results(results, results_file)
        if isinstance(model, SideTunedModel) and path == output_dir / "eval_results.json":
            write_model_card(output_dir, model.config, model.parameter_counts())  # the card reports these results
        info(f"Wrote {path}")
    return 0
