"""``m2ist``: the entry point. Each command lives in its own module with ``add_parser(subparsers)`` and
``run(settings, args)``; ``demo``, ``bench`` and ``compare`` pass their arguments to the evidence modules
(:mod:`m2ist.evidence`), which parse them themselves."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import app, evaluate, predict, train
from .errors import EXIT_USAGE, CLIError
from .flags import EXAMPLES, HelpFormatter
from .settings import plain, resolve_settings
from .verbosity import configure

#: The commands parsed here: name -> module with ``add_parser(subparsers)`` and ``run(settings, args)``.
COMMAND_MODULES = {"train": train, "eval": evaluate, "predict": predict, "app": app}
COMMANDS: dict[str, Callable[[dict[str, dict[str, Any]], argparse.Namespace], int]] = {
    name: module.run for name, module in COMMAND_MODULES.items()
}
PASSTHROUGH = {
    "demo": "m2ist.evidence.demo",
    "bench": "m2ist.evidence.bench",
    "compare": "m2ist.evidence.compare",
}

PASSTHROUGH_HELP = {
    "demo": "offline end-to-end demo on synthetic data (arguments are passed to `m2ist demo --help`)",
    "bench": "memory and time of one training step per method (see `m2ist bench --help`)",
    "compare": "compare M²IST with the baselines (see `m2ist compare --help`)",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``m2ist`` argument parser with every subcommand; given ``command``, only that one gets its flags (the
    others are listed: building the training flags imports the trainer, which takes seconds)."""
    from m2ist.version import __version__

    parser = argparse.ArgumentParser(
        prog="m2ist", formatter_class=HelpFormatter, epilog=EXAMPLES,
        description="M²IST side-tuning for referring expression comprehension (image + phrase -> one box).")
    parser.add_argument("--version", action="version", version=f"m2ist {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="progress messages, transformers' warnings and third-party warnings on stderr (-vv: debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    for name, module in COMMAND_MODULES.items():
        if command is None or command == name:
            module.add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=module.HELP, add_help=False)
    for name, help_text in PASSTHROUGH_HELP.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def _run_passthrough(name: str, argv: list[str], debug: bool) -> int:
    module_name = PASSTHROUGH[name]
    if importlib.util.find_spec(module_name) is None:
        print(f"m2ist {name}: this command is not available in this installation ({module_name} is missing); "
              "update m2ist.", file=sys.stderr)
        return EXIT_USAGE
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        if debug:
            raise
        print(f"m2ist {name}: cannot start ({err}). Install the extras it needs, e.g. pip install 'm2ist[demo]'.",
              file=sys.stderr)
        return 1
    entry = getattr(module, "main", None)
    if not callable(entry):
        print(f"m2ist {name}: {module_name} has no main(argv) entry point.", file=sys.stderr)
        return 1
    try:
        code = entry(argv)
    except SystemExit as exit_:  # argparse inside the command
        code = exit_.code
    except KeyboardInterrupt:
        print(f"m2ist {name}: interrupted", file=sys.stderr)
        return 130
    except _expected_errors() as err:  # as for the other commands: one line, exit 2
        if debug:
            raise
        hint = "" if isinstance(err, CLIError) else " (run with --debug for the full traceback)"
        print(f"m2ist {name}: error: {one_line(err)}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        if debug:
            raise
        print(f"m2ist {name}: unexpected error: {type(err).__name__}: {one_line(err)} (run with --debug for the "
              "full traceback, and please report it)", file=sys.stderr)
        return 1
    return int(code or 0) if not isinstance(code, str) else 1

def _expected_errors() -> tuple[type[BaseException], ...]:
    import pickle

    return (CLIError, OSError, ValueError, ArithmeticError, pickle.UnpicklingError)

def one_line(err: BaseException) -> str:
    """An error's message on one line (whitespace and line breaks collapsed), never empty."""
    return " ".join(str(err).split()) or type(err).__name__

def _configure_logging(verbosity: int) -> None:
    configure(verbosity)

#: Exit status when stdout's reader closed the pipe: 128 + SIGPIPE, as a Unix tool killed by it reports.
EXIT_BROKEN_PIPE = 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that flushing it at exit does not raise a second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured, replaced)
        pass


@contextlib.contextmanager
def _escaping_streams() -> Iterator[None]:
    """Let stdout and stderr write the characters their encoding lacks as escapes (``M\\xb2IST``) instead of
    raising UnicodeEncodeError: an ASCII or cp1252 stream (``PYTHONIOENCODING=ascii``, ``LC_ALL=C``, a pipe on
    Windows) cannot encode "M²IST" in the help or a phrase in another script. Each stream is given back as it was."""
    changed = []
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None) or "utf-8"
        with contextlib.suppress(LookupError):
            encoding = codecs.lookup(encoding).name
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure") \
                and not encoding.startswith("utf"):
            stream.reconfigure(errors="backslashreplace")
            changed.append(stream)
    try:
        yield
    finally:
        for stream in changed:
            with contextlib.suppress(OSError, ValueError):  # a closed stream, a reader gone
                stream.reconfigure(errors="strict")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``m2ist`` command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Exit codes: 0 success, 2 a usage or input error (bad flag, missing file, invalid setting: a one-line message,
    no traceback unless ``--debug``), 1 an unexpected failure, 130 interrupted, 141 stdout's reader closed the
    pipe (nothing printed).
    """
    with _escaping_streams():
        return _main(list(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    position = 0
    while position < len(argv) and argv[position] in ("--debug", "-v", "-vv", "--verbose"):
        position += 1
    if position < len(argv) and argv[position] in PASSTHROUGH:
        _configure_logging(sum({"-v": 1, "-vv": 2, "--verbose": 1}.get(a, 0) for a in argv[:position]))
        return _run_passthrough(argv[position], argv[position + 1 :], "--debug" in argv[:position])

    parser = build_parser(argv[position] if position < len(argv) else "")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _configure_logging(args.verbose)
    try:
        settings = resolve_settings(args)
        if getattr(args, "print_config", False):
            print(json.dumps(plain(settings), indent=2))
            return 0
        return COMMANDS[args.command](settings, args)
    except KeyboardInterrupt:
        print(f"m2ist {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`m2ist predict ... | head`): quiet, as Unix tools are
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except _expected_errors() as err:
        if args.debug:
            raise
        hint = "" if isinstance(err, CLIError) else " (run with --debug for the full traceback)"
        print(f"m2ist {args.command}: error: {one_line(err)}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # a bug or a failure nobody foresaw: still one line, and a failing exit status
        if args.debug:
            raise
        print(f"m2ist {args.command}: unexpected error: {type(err).__name__}: {one_line(err)} (run with --debug for "
              "the full traceback, and please report it)", file=sys.stderr)
        return 1
