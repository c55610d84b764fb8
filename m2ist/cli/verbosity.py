"""How much the command line says: results on stdout; on stderr, at the default verbosity, only errors, m2ist's
own warnings and the progress bars of long work (training, evaluation, pretraining the demo's tower).

``-v`` brings back m2ist's progress messages, transformers' warnings and its short progress bars (loading
weights) and third-party Python warnings; ``-vv`` adds debug messages and transformers' info logs.
"""

from __future__ import annotations

import argparse
import logging
import warnings

#: Libraries whose Python warnings (deprecations, "requires torchvision" notes, ...) are hidden by default.
THIRD_PARTY = ("transformers", "torch", "huggingface_hub", "accelerate", "datasets", "tqdm", "safetensors", "peft",
               "timm", "torchvision")


def configure(verbosity: int = 0) -> None:
    """Set logging, transformers' verbosity and progress bars, and warning filters for ``verbosity`` (the count
    of ``-v``)."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    logging.getLogger("m2ist").setLevel(level)
    if verbosity <= 0:
        for module in THIRD_PARTY:
            warnings.filterwarnings("ignore", module=rf"{module}(\.|$)")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.set_verbosity({0: logging.ERROR, 1: logging.WARNING}.get(max(verbosity, 0), logging.INFO))
    if verbosity <= 0:
        hf_logging.disable_progress_bar()  # "Loading weights" and the like: short work
    else:
        hf_logging.enable_progress_bar()


def configured() -> bool:
    """Whether logging was set up already (by ``m2ist`` before it hands over to ``demo``, ``bench``, ``compare``)."""
    return bool(logging.getLogger().handlers)


def add_verbosity_flag(parser: argparse.ArgumentParser) -> None:
    """``-v`` / ``--verbose`` for the commands that parse their own arguments (``demo``, ``bench``, ``compare``)."""
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="progress messages, transformers' warnings and third-party warnings (-vv: debug)")


def apply_verbosity(args: argparse.Namespace) -> None:
    """Configure output for ``args.verbose`` when run as ``python -m`` or asked for more than ``m2ist`` set up."""
    if args.verbose or not configured():
        configure(args.verbose)
