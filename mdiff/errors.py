"""The one exception type mdiff raises for bad input.

Every message is a single line that says what was wrong and how to fix it; the CLI prints it
without a traceback and exits non-zero.
"""


class MdiffError(Exception):
    """Bad input or an impossible request, reported to the user as one line."""
