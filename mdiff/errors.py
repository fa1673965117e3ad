"""The one exception type mdiff raises for bad input.

Every message is a single line that says what was wrong and how to fix it; the CLI prints it
without a traceback and exits non-zero.

A message about one input names it by its setting name (the config field or settings key, e.g. ``layers``,
``n_boot``, ``out``): it carries the placeholder ``{option}`` and ``option=<setting name>``. ``str(e)`` shows the
setting name; a front end shows its own spelling with :meth:`MdiffError.render` (the CLI turns ``layers`` into its
flag). The library itself never names a command-line flag.
"""

from collections.abc import Callable

PLACEHOLDER = "{option}"


class MdiffError(Exception):
    """Bad input or an impossible request, reported to the user as one line.

    ``MdiffError("layer {option} ...", option="layers")``: ``{option}`` stands for the offending setting, shown as
    ``layers`` by ``str(e)`` and as whatever ``flag_for("layers")`` returns by ``e.render(flag_for)``.
    """

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.message = message
        self.option = option

    def __reduce__(self):  # pickles (Ray, submitit) keep the option
        return type(self), (self.message, self.option), self.__dict__ or None

    def render(self, flag_for: Callable[[str], str]) -> str:
        """The message with ``{option}`` replaced by ``flag_for(option)`` (unchanged when there is no option)."""
        text = str(self.message)
        return text if self.option is None else text.replace(PLACEHOLDER, flag_for(self.option))

    def __str__(self) -> str:
        return self.render(str)
