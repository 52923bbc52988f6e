"""The one error type users see: it names the file, field or value and says how to fix it."""


class EdgecoreError(Exception):
    """A problem with the user's input or environment, not a bug.

    Command-line entry points print its message without a traceback and exit with status 2.
    """
