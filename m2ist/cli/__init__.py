"""The ``m2ist`` command line: ``train``, ``eval`` and ``predict``, plus ``demo``, ``bench`` and ``compare``.

One module per command (:mod:`~m2ist.cli.train`, :mod:`~m2ist.cli.evaluate`, :mod:`~m2ist.cli.predict`), each
with ``add_parser(subparsers)`` and ``run(settings, args)``; they share the settings layers
(:mod:`~m2ist.cli.settings`), the flags (:mod:`~m2ist.cli.flags`), the data loading (:mod:`~m2ist.cli.data`) and
one helper that loads towers and adapters (:mod:`~m2ist.cli.loading`). :mod:`~m2ist.cli.main` dispatches.
"""

from .data import DATA_FORMATS, load_data_splits
from .errors import CLIError
from .main import PASSTHROUGH, build_parser, main
from .settings import (
    CONFIG_DIR,
    SECTIONS,
    SETTINGS_HELP,
    build_augmentation,
    build_m2ist_config,
    build_training_arguments,
    load_config_file,
    resolve_settings,
)

__all__ = [
    "CONFIG_DIR",
    "DATA_FORMATS",
    "PASSTHROUGH",
    "SECTIONS",
    "SETTINGS_HELP",
    "CLIError",
    "build_augmentation",
    "build_m2ist_config",
    "build_parser",
    "build_training_arguments",
    "load_config_file",
    "load_data_splits",
    "main",
    "resolve_settings",
]
