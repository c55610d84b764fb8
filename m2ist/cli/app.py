"""``m2ist app``: a local web page to try adapters (:mod:`m2ist.app`; needs ``pip install "m2ist[app]"``)."""

from __future__ import annotations

import argparse
from typing import Any

from .flags import HelpFormatter, wrap

#: The line ``m2ist --help`` shows for this command.
HELP = "a local web page to try adapters: image + phrases -> boxes"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``app`` and its flags to the ``m2ist`` subcommands."""
    from m2ist import app

    parser = subparsers.add_parser(
        "app", formatter_class=HelpFormatter, help=HELP,
        description=wrap("Serve a page where you upload an image, type one expression per line and see each predicted "
                         "box drawn with its pixel coordinates and the time it took. Without --adapter it loads the "
                         "adapter `make demo` saved and offers the demo's procedural scenes as examples."))
    app.add_arguments(parser)
    return parser


def run(settings: dict[str, dict[str, Any]], args: argparse.Namespace) -> int:
    """Serve the page until interrupted."""
    from m2ist import app

    return app.run(args)
