"""What ``m2ist demo``, ``compare`` and ``bench`` take and write, checked before any work.

* **Flags**: ``--seed`` must be a seed every generator takes (0 to 2**32 - 1, numpy's range), ``--tower-cache`` a
  mode or a folder (:func:`m2ist.cache.check_tower_cache`: ``Memory`` or ``none`` are refused, not made folders),
  and a batch size must not exceed the training set (the report would claim a batch no step saw).
* **Outputs never replace what they do not own**: a report (JSON) replaces an existing file only when it is an
  earlier report of the same command, and a picture (PNG) only when one of these commands drew it (its PNG
  ``Software`` text says so) or it sits beside an earlier report of the command; the plot may not be the report's
  own path. Everything is checked before the first step, and written through a temporary file swapped in whole.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from m2ist.trainer import MAX_SEED

#: The PNG ``Software`` text of the pictures these commands draw.
PICTURE_SOFTWARE = "m2ist evidence"


# ---------------------------------------------------------------------------------------------- children
def run_child(cmd: list[str]) -> Any:
    """``subprocess.run(cmd)`` of a Python child (``compare`` and ``bench`` run each method in one), its output
    captured as text: the child writes UTF-8 (``PYTHONIOENCODING``) and the parent reads UTF-8, whatever the locale
    says (under a non-UTF-8 locale a child printing ², × or → failed, or its output was read garbled); a byte that
    is not UTF-8 is replaced, so a child's error is always shown."""
    import subprocess

    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=env, check=False)


# ---------------------------------------------------------------------------------------------- flags
def seed_value(text: str) -> int:
    """An argparse ``type``: a seed from 0 to 2**32 - 1 (numpy, which the Trainer seeds too, takes no other)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..{MAX_SEED} (2**32 - 1), the seeds numpy takes")
    return value


def tower_cache_value(text: str) -> str:
    """An argparse ``type``: ``off``, ``memory``, ``disk`` or a folder (see :func:`m2ist.cache.check_tower_cache`)."""
    from m2ist.cache import check_tower_cache

    try:
        return check_tower_cache(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def check_counts(where: str, **counts: Any) -> None:
    """Refuse a count (steps, rounds, batch size) that is not a whole number >= 1 (``warmup`` may be 0), naming
    ``where`` it was given: a run of no step measures or trains nothing, and its figures would still be printed."""
    for name, value in counts.items():
        least = 0 if name == "warmup" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{where}: {name} must be a whole number >= {least}, got {value!r}.")


def check_batch_size(batch_size: int, train_samples: int, tiny: bool) -> None:
    """Refuse a batch larger than the training set: every step would train on the whole set, fewer samples than
    the batch size the report states."""
    if batch_size > train_samples:
        raise ValueError(f"--batch-size {batch_size} is larger than the training set ({train_samples} expressions"
                         f"{' with --tiny' if tiny else ''}): every step would see those {train_samples}, not the "
                         f"{batch_size} the report would state. Use a batch size of at most {train_samples}.")


# ---------------------------------------------------------------------------------------------- outputs
def is_report(path: str | os.PathLike, keys: tuple[str, ...]) -> bool:
    """Whether ``path`` holds a JSON object with all ``keys`` (an earlier report of the command that has them)."""
    from m2ist.evaluation import json_file_is

    return json_file_is(path, lambda value: isinstance(value, dict) and all(key in value for key in keys))


def is_picture(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PNG one of these commands drew (its ``Software`` text is :data:`PICTURE_SOFTWARE`)."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == PICTURE_SOFTWARE
    except (OSError, ValueError, ImportError):
        return False


def check_outputs(report: str | os.PathLike, report_keys: tuple[str, ...], flag: str,
                  picture: str | os.PathLike | None = None) -> None:
    """Before any work: ``report`` may be written (an earlier report with ``report_keys`` may be replaced, nothing
    else), and so may ``picture`` (a PNG drawn by these commands, or one beside an earlier report); they must be two
    files. Raises an ``OSError`` or ``ValueError`` naming the path and ``flag``."""
    from m2ist.evaluation import check_output_file

    earlier = Path(report).is_file() and is_report(report, report_keys)
    try:
        check_output_file(report, replaces=lambda path: is_report(path, report_keys))
    except OSError as err:
        raise type(err)(f"{flag}: {err}") from None
    if picture is None:
        return
    if Path(picture).absolute() == Path(report).absolute():
        raise ValueError(f"{flag} {report}: the plot is written to {picture} and would replace the results; give "
                         "the results a .json name.")
    path = Path(picture)
    if path.is_file() and path.stat().st_size > 0 and not earlier and not is_picture(path):
        raise FileExistsError(f"{flag}: {path} exists and was not drawn by m2ist (its PNG text has no "
                              f"Software={PICTURE_SOFTWARE!r}), nor is it beside an earlier report: it would be "
                              "overwritten. Choose another path, or delete it first if it may go.")
    try:
        check_output_file(path, replaces=None)
    except OSError as err:
        raise type(err)(f"{flag}: the picture written beside it: {err}") from None


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """Write ``value`` as indented JSON through a temporary file swapped in whole (parent folders created)."""
    from m2ist.save_and_load import atomic_write

    path = Path(path)
    text = json.dumps(value, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def write_picture(path: str | os.PathLike, save: Callable[[str, dict[str, str]], None]) -> Path:
    """Call ``save(tmp_path, metadata)`` (write a PNG with the PNG text ``metadata``, which marks it as drawn by
    these commands) and swap the file in whole."""
    from m2ist.save_and_load import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: save(tmp, {"Software": PICTURE_SOFTWARE}))
    return path
