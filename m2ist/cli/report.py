"""Printing results: the metrics table of ``train`` and ``eval`` (on stdout)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any


def print_metrics(metrics: Mapping[str, Mapping[str, Any]], stream=None) -> None:
    stream = stream or sys.stdout
    if not metrics:
        return
    accuracy_keys = [k for k in next(iter(metrics.values())) if k.startswith("acc@")]
    header = f"{'split':<12} {'count':>8} " + " ".join(f"{k:>9}" for k in accuracy_keys) + f" {'mIoU':>8}"
    print(header, file=stream)
    for split, values in metrics.items():
        accuracies = " ".join(f"{100 * values[k]:>8.2f}%" for k in accuracy_keys)
        print(f"{split:<12} {values['count']:>8d} {accuracies} {100 * values['miou']:>7.2f}%", file=stream)
