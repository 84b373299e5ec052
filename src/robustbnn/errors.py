"""The one exception type that the command line turns into a one-line message and exit status 2."""


class UserError(Exception):
    """Bad input from the user (missing data, bad flag value, mismatching model): no traceback."""
