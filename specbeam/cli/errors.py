"""The one error the console script reports as a message, without a traceback."""


class CliError(Exception):
    """A user-facing failure: `main` prints it to stderr and exits with status 1."""
