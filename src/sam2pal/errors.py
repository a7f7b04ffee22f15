"""Errors that are the user's to fix.

An `InputError` carries a one-line message that names the offending file and says what
is wrong with it. The command line and the Snakemake scripts print it without a
traceback.
"""


class InputError(ValueError):
    """Bad user input (a file, a config value, a flag)."""


class ImageReadError(InputError):
    """An image file that cannot be decoded."""
