"""Printing results: the metrics table of ``train`` and ``eval`` (on stdout)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import CLIError

#: Extensions of files in another format than the JSON ``--output`` writes (a CSV, a table, an array, a picture).
OTHER_FORMATS = frozenset({".csv", ".tsv", ".jsonl", ".ndjson", ".yaml", ".yml", ".txt", ".md", ".html", ".xlsx",
                           ".xls", ".parquet", ".pkl", ".pickle", ".pt", ".pth", ".npy", ".npz", ".safetensors"})


def refuse_non_json_name(flag: str, path: str | Path, *, draw_hint: bool = False) -> None:
    """Refuse an output named for another format (``boxes.csv``, ``boxes.png``): it would hold JSON all the same
    (``draw_hint``: a picture's name is answered with ``--draw``, the flag that draws)."""
    from PIL import Image

    Image.init()
    suffix = Path(path).suffix.lower()
    picture = suffix in Image.registered_extensions()
    if suffix in OTHER_FORMATS or picture:
        hint = " (to draw the boxes, use --draw)" if picture and draw_hint else ""
        raise CLIError(f"{flag} {path}: the file is written as JSON whatever its name, and {suffix} names another "
                       f"format{hint}; end the name with .json.")


def print_metrics(metrics: Mapping[str, Mapping[str, Any]], stream=None) -> None:
    """The metrics table: one row per split (count, each accuracy, mean IoU)."""
    stream = stream or sys.stdout
    if not metrics:
        return
    accuracy_keys = [k for k in next(iter(metrics.values())) if k.startswith("acc@")]
    header = f"{'split':<12} {'count':>8} " + " ".join(f"{k:>9}" for k in accuracy_keys) + f" {'mIoU':>8}"
    print(header, file=stream)
    for split, values in metrics.items():
        accuracies = " ".join(f"{100 * values[k]:>8.2f}%" for k in accuracy_keys)
        print(f"{split:<12} {values['count']:>8d} {accuracies} {100 * values['miou']:>7.2f}%", file=stream)
