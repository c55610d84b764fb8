"""``m2ist eval``: score a saved adapter on REC splits with the TransVG protocol, to JSON."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .data import data_record, load_data_splits
from .errors import refuse_dash
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


def _results_path(adapter: str, limit: int | None) -> Path:
    """Where ``eval`` writes its results by default: ``eval_results.json`` (``eval_results.first-N.json`` for a
    subsample of N expressions per split), in the adapter's folder when it is one."""
    name = "eval_results.json" if limit is None else f"eval_results.first-{limit}.json"
    return Path(adapter) / name if adapter and Path(adapter).is_dir() else Path(name)


def run(settings: dict[str, dict[str, Any]], args: argparse.Namespace) -> int:
    """Load an adapter and its processor, score the evaluation splits, write the JSON results."""
    from m2ist.evaluation import ResultsWriteError, check_output_file, evaluate

    evaluation = settings["evaluation"]
    adapter = settings["model"].get("adapter") or ""
    output = evaluation.get("output_file")
    limit = settings["data"].get("max_eval_samples")
    named = output is None  # a subsample's scores never replace the full results the adapter's card reports
    if named:
        output = _results_path(adapter, limit)
    refuse_dash("--output", output, "give a file name for the JSON results (the table goes to stdout).")
    check_output_file(output)  # a bad --output fails now, not after the whole evaluation
    refuse_non_json_name("--output", output)
    data = settings["data"]
    splits = load_data_splits(data, "eval")
    if limit is not None and all(len(samples) < limit for samples in splits.values()):
        # every split is shorter than the limit: these are the full splits' scores, not a subsample's, and they are
        # recorded (and named, by default) as such, so the adapter's card reports them
        logger.warning("--max-eval-samples %d is more than every split holds: the whole splits are scored.", limit)
        data = {**data, "max_eval_samples": None}
        if named:
            output = _results_path(adapter, None)
            check_output_file(output)
    model, processor = load_adapter(settings)
    try:
        results = evaluate(model, processor, splits, batch_size=int(evaluation.get("batch_size", 32)),
                           iou_thresholds=evaluation.get("iou_thresholds", (0.5,)), output_file=output,
                           device=default_device(evaluation), progress=bool(evaluation.get("progress", True)),
                           save_predictions=bool(evaluation.get("save_predictions", False)),
                           clamp=evaluation.get("clamp", "image"), num_workers=int(evaluation.get("num_workers", 0)),
                           metadata={"adapter": local_or_hub(adapter), "data": data_record(data)})
    except ResultsWriteError as err:  # the scores are printed before the error that says where the file went
        print_metrics(err.results["metrics"])
        raise
    print_metrics(results["metrics"])
    info(f"Wrote {output}")
    return 0
