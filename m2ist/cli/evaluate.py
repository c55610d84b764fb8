"""``m2ist eval``: score a saved adapter on REC splits with the TransVG protocol, to JSON."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .data import data_record, eval_limit_cut_nothing, load_data_splits
from .errors import CLIError, refuse_dash
from .flags import (
    HelpFormatter,
    add_adapter_flags,
    add_config_flags,
    add_data_flags,
    add_evaluation_flags,
    add_tower_flags,
    examples,
    wrap,
)
from .loading import default_device, info, load_adapter, local_or_hub, logger
from .report import print_metrics, refuse_non_json_name
from .settings import settings_help

#: The line ``m2ist --help`` shows for this command.
HELP = "score a saved adapter on REC splits (Acc@0.5, mean IoU) to JSON"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` and its flags to the ``m2ist`` subcommands."""
    evaluate = subparsers.add_parser(
        "eval", formatter_class=HelpFormatter, help=HELP,
        description=wrap("Evaluate a saved adapter with the TransVG protocol: one prediction per expression, "
                          "predicted box clamped to the image, correct iff IoU >= 0.5 (not GIoU). Writes metrics per "
                          "split and metadata to a JSON file.") + "\n\n" + settings_help("eval"), epilog=examples("eval"))
    add_config_flags(evaluate, "eval")
    add_adapter_flags(evaluate)
    add_data_flags(evaluate, train=False)
    add_evaluation_flags(evaluate, "eval")
    add_tower_flags(evaluate, " (default: the one recorded in the adapter)")
    return evaluate


def _results_path(adapter: str, limit: int | None, variants: Sequence[str] = ()) -> Path:
    """Where ``eval`` writes its results by default: ``eval_results.json`` (the file the adapter's model card
    reports), ``eval_results.first-N.json`` for a subsample of N expressions per split and
    ``eval_results.<variant>.json`` for a scoring other than the standard one (``clamp-canvas``, ``other-towers``,
    ``other-processor``), in the adapter's folder when it is one, else in the current folder."""
    from m2ist.card import EVAL_RESULTS_NAME

    parts = ([] if limit is None else [f"first-{limit}"]) + list(variants)
    name = EVAL_RESULTS_NAME if not parts else f"eval_results.{'.'.join(parts)}.json"
    return Path(adapter) / name if _is_folder(adapter) else Path(name)


def _is_folder(adapter: str) -> bool:
    return bool(adapter) and Path(adapter).is_dir()


def _scoring_variants(settings: dict[str, dict[str, Any]], adapter: str) -> list[str]:
    """The settings known before loading that score otherwise than the standard protocol the card reports: the
    canvas clamp, and a ``--processor`` other than the adapter's own."""
    variants = []
    clamp = settings["evaluation"].get("clamp", "image")
    if clamp != "image":
        variants.append(f"clamp-{clamp}")
    processor = settings["model"].get("processor")
    if processor and not (_is_folder(adapter) and Path(processor).expanduser().resolve()
                          == Path(adapter).expanduser().resolve()):
        variants.append("other-processor")
    return variants


def _refuse_other_adapters_results(output: Path, adapter: str) -> None:
    """The default results file of a Hub adapter lies in the current folder: refuse to replace one there that
    measured another adapter (the current folder may be an adapter's own, whose card reports it)."""
    from m2ist.evaluation import read_results

    metadata = (read_results(output) or {}).get("metadata")
    recorded = metadata.get("adapter") if isinstance(metadata, Mapping) else None
    if recorded and recorded != local_or_hub(adapter):
        raise CLIError(f"{output} holds the results of the adapter {recorded}, and --adapter {adapter} is a Hub repo "
                       f"id whose results go to the current folder by default: pass --output FILE to write them "
                       "elsewhere (or delete that file if it may go).")


def _check_scoring(evaluation: Mapping[str, Any]) -> tuple[tuple[float, ...], str]:
    """The IoU thresholds (ascending) and the clamp of the evaluation settings, checked before anything is loaded:
    a value from ``--config`` or ``--set`` that cannot be scored is refused naming the setting and its flag."""
    from m2ist.evaluation import _check_thresholds

    try:
        thresholds = tuple(sorted(_check_thresholds(evaluation.get("iou_thresholds", (0.5,)))))
    except ValueError as err:
        raise CLIError(f"evaluation.iou_thresholds (--iou-thresholds): {err}") from None
    return thresholds, check_scoring_options(evaluation)


def check_scoring_options(evaluation: Mapping[str, Any], *, command: str = "eval") -> str:
    """The clamp of the evaluation settings, with their batch size and workers checked; errors name the flags
    ``command`` has. ``m2ist train`` checks them before training too (its final evaluation failed on them after
    the whole run, and took a batch size of 0 for its default)."""
    from m2ist.evaluation import CLAMP_MODES

    clamp = evaluation.get("clamp", "image")
    if clamp not in CLAMP_MODES:
        raise CLIError(f"evaluation.clamp (--clamp) is {clamp!r}; give one of {', '.join(CLAMP_MODES)} (image: the "
                       "standard protocol).")
    for key, flag, least in (("batch_size", "--batch-size", 1), ("num_workers", "--num-workers", 0)):
        value = evaluation.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            named = f" ({flag})" if command == "eval" else ""  # `m2ist train` sets them in the config or --set only
            raise CLIError(f"evaluation.{key}{named} is {value!r}; give a whole number of at least {least}.")
    return clamp


def run(settings: dict[str, dict[str, Any]], args: argparse.Namespace) -> int:
    """Load an adapter and its processor, score the evaluation splits, write the JSON results."""
    from m2ist.card import EVAL_RESULTS_NAME, other_tower
    from m2ist.evaluation import ResultsWriteError, check_output_file, evaluate

    evaluation = settings["evaluation"]
    thresholds, clamp = _check_scoring(evaluation)
    adapter = settings["model"].get("adapter") or ""
    output = evaluation.get("output_file")
    limit = settings["data"].get("max_eval_samples")
    # a subsample's scores, or scores of another protocol, never replace the full results the adapter's card reports
    named = output is None
    variants = _scoring_variants(settings, adapter)
    if named:
        output = _results_path(adapter, limit, variants)
    refuse_dash("--output", output, "give a file name for the JSON results (the table goes to stdout).")
    check_output_file(output)  # a bad --output fails now, not after the whole evaluation
    refuse_non_json_name("--output", output)
    data = settings["data"]
    splits = load_data_splits(data, "eval")
    if eval_limit_cut_nothing(data, splits):
        # every split is shorter than the limit: these are the full splits' scores, not a subsample's, and they are
        # recorded (and named, by default) as such, so the adapter's card reports them
        logger.warning("--max-eval-samples %d is more than every split holds: the whole splits are scored.", limit)
        data = {**data, "max_eval_samples": None}
        limit = None
        if named:
            output = _results_path(adapter, None, variants)
            check_output_file(output)
    if named and adapter and not _is_folder(adapter):
        _refuse_other_adapters_results(Path(output), adapter)
    model, processor = load_adapter(settings)
    ids = getattr(model, "tower_ids", None)  # the towers loaded (--vision-model ...) against those recorded
    if isinstance(ids, dict) and other_tower({m: {"name_or_path": n, "commit": c} for m, (n, c) in ids.items()},
                                             model.config):
        variants.append("other-towers")
        if named:
            output = _results_path(adapter, limit, variants)
            check_output_file(output)
            if adapter and not _is_folder(adapter):
                _refuse_other_adapters_results(Path(output), adapter)
    if named and variants:
        logger.warning("Scoring otherwise than the standard protocol (%s): the results go to %s, not to %s, which "
                       "the adapter's model card reports.", ", ".join(variants), output, EVAL_RESULTS_NAME)
    try:
        results = evaluate(model, processor, splits, batch_size=int(evaluation.get("batch_size", 32)),
                           iou_thresholds=thresholds, output_file=output,
                           device=default_device(evaluation), progress=bool(evaluation.get("progress", True)),
                           save_predictions=bool(evaluation.get("save_predictions", False)),
                           clamp=clamp, num_workers=int(evaluation.get("num_workers", 0)),
                           metadata={"adapter": local_or_hub(adapter), "data": data_record(data)})
    except ResultsWriteError as err:  # the scores are printed before the error that says where the file went
        print_metrics(err.results["metrics"])
        raise
    print_metrics(results["metrics"])
    if named and not _is_folder(adapter):  # not beside the adapter: say where they went
        logger.warning("Wrote the results to %s (--adapter %s is a Hub repo id, not a folder, so they went to the "
                       "current folder); pass --output FILE to choose where.", Path(output).resolve(), adapter)
    else:
        info(f"Wrote {output}")
    return 0
