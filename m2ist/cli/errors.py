"""The command line's own error: a mistake the user can fix, reported in one line (exit 2), never a traceback."""

EXIT_USAGE = 2

class CLIError(Exception):
    """A mistake in the command line, a config file or the data it names: reported without a traceback (exit 2)."""
