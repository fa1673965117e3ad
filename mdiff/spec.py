"""The pair specification: a plain, frozen description of a (base, tuned) pair.

It imports nothing from mdiff but its error type, so every module (models, toy, fixtures, pairs, the RQs) can
depend on it without import cycles; :mod:`mdiff.pairs` resolves names and TOML files into it.
"""

import dataclasses
import re
from typing import Any

from mdiff.errors import MdiffError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RESERVED_NAMES = ("compare",)
"""Folder names under the output folder ``OUT`` that are not pairs (``mdiff compare`` writes ``OUT/compare/``)."""


def check_pair_name(name: Any, where: str = "pair") -> str:
    """A pair name becomes the folder ``OUT/<name>/``: a plain name (letters, digits, ``.``, ``_``, ``-``).

    Anything else (``../x``, ``/abs/path``, ``a/b``, ``..``) could write outside ``OUT``, so it is refused.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith(".") or ".." in name \
            or name.lower() in RESERVED_NAMES:
        raise MdiffError(f"{where}: pair name {name!r} must be a plain folder name (letters, digits, '.', '_', '-'; "
                         f"at most 100; not {', '.join(RESERVED_NAMES)}): it becomes OUT/<name>/")
    return name


@dataclasses.dataclass(frozen=True)
class PairSpec:
    """Where the two models of a pair come from, and how to read them."""

    name: str
    base: str
    """Hub id or local directory of the base model."""
    tuned: str
    """Hub id or local directory of the fine-tuned model."""
    base_revision: str | None = None
    tuned_revision: str | None = None
    dtype: str = "float32"
    prompts: str | None = None
    """Path of a JSONL prompt set."""
    chat_template: bool | str = False
    """False: plain prompts; True: the tokenizer's chat template; a string: that Jinja template."""
    description: str = ""
    truth: dict | None = None
    """What is planted (toy pairs only)."""
    toy: bool = False
    source: str = "builtin"
    """'builtin', 'toy', or the TOML file the spec was read from."""
    min_shared_ratio: float = 0.0
    behaviour: dict | None = None
    """Optional behaviour-diagnostic settings (refusal/neutral continuations, style markers)."""
    max_tokens: int | None = None
    """Longest prompt, in tokens, besides the models' context length (``max_position_embeddings``)."""
    too_long: str = "error"
    """A prompt over the limit: ``error`` (refuse, naming how many and the longest) or ``drop`` (skip, counted)."""

    prompt_source: dict | None = None
    """A dataset the prompt set is read from when ``prompts`` is not given (see :mod:`mdiff.data`)."""

    def __post_init__(self):
        check_pair_name(self.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
