"""The command line's own error: a mistake the user can fix, reported in one line (exit 2), never a traceback."""

EXIT_USAGE = 2

class CLIError(Exception):
    """A mistake in the command line, a config file or the data it names: reported without a traceback (exit 2)."""


def refuse_dash(flag: str, value: object, fix: str) -> None:
    """Refuse ``-`` as an output path: it would create a file named ``-`` rather than write to stdout."""
    if str(value).strip() == "-":
        raise CLIError(f"{flag} -: '-' is not stdout here, it would create a file named '-'; {fix}")
