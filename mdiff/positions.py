"""Which token positions of a prompt are used (METHODS.md, "position set").

* ``last``: the last *content* position: the last token that is not trailing EOS/pad. For a chat
  prompt rendered with the generation prompt this is the end of the assistant header, the position
  whose next-token distribution is the model's decision.
* ``k=K``: K positions per prompt, drawn without replacement (seeded by the prompt id, so a prompt gets
  the same positions in every run) among *content* tokens only: never BOS, never special tokens, never
  chat-template or system-prompt tokens, and not the last ``m`` tokens (``exclude_last``, default 1: the decision token; chat template tokens at the end are excluded anyway).
* ``upto=K``: the same draw of K content positions (all of them when a prompt has fewer: never an
  error), **plus the decision position** (``last``): the default rows that transport maps are fit on
  (``DEFAULT_FIT_POSITIONS``). Content rows pin the map down (at d = 4096 one row per prompt leaves it
  underdetermined), and the decision position is where the maps are applied, so its distribution is
  in the fit too (train prompts only; patching and reporting use the val/select prompts).

Positions are indices into a prompt's unpadded token list.
"""

import dataclasses
import hashlib
import re

import numpy as np

from mdiff.errors import MdiffError

_K = re.compile(r"^(k|upto)\s*=\s*(\d+)$")

DEFAULT_FIT_POSITIONS = "upto=16"
"""Rows the transport maps (RQ2, RQ3, RQ4's per-head maps) are fit on by default: up to 16 chat-aware
content positions per train prompt (the seeds' protocol; never BOS, template or system tokens) plus the
prompt's decision position."""


@dataclasses.dataclass(frozen=True)
class PositionSpec:
    kind: str  # "last" | "k" | "upto"
    k: int = 1
    exclude_last: int = 1
    seed: int = 0

    @property
    def tag(self) -> str:
        return "last" if self.kind == "last" else f"{self.kind}{self.k}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_positions(text: str, seed: int = 0, exclude_last: int = 1, option: str = "positions") -> PositionSpec:
    """``last``, ``k=K`` or ``upto=K`` (K ≥ 1); errors name ``option`` (the setting, e.g. ``fit_positions``)."""
    t = text.strip().lower()
    if t == "last":
        return PositionSpec("last", 1, exclude_last, seed)
    m = _K.match(t)
    if not m:
        raise MdiffError(f"{{option}} {text!r} not understood: use 'last', 'k=K' (e.g. k=16) or 'upto=K'",
                         option=option)
    k = int(m.group(2))
    if k < 1:
        raise MdiffError(f"{{option}} {text!r} needs K ≥ 1, got {k}", option=option)
    if exclude_last < 0:
        raise MdiffError(f"exclude_last must be ≥ 0, got {exclude_last}")
    return PositionSpec(m.group(1), k, exclude_last, seed)


def content_mask(text: str, ids: list[int], offsets: list[tuple[int, int]], special_ids: set[int],
                 content_spans: list[tuple[int, int]] | None) -> np.ndarray:
    """Which tokens are content: not special, and inside a content span of ``text`` when spans are given."""
    mask = np.array([i not in special_ids for i in ids], dtype=bool)
    if content_spans is not None:
        inside = np.zeros(len(ids), dtype=bool)
        for j, (s, e) in enumerate(offsets):
            piece = text[s:e]
            if piece.strip():  # byte-level BPE tokens carry their leading space (maybe a template separator)
                s = s + len(piece) - len(piece.lstrip())
            if e <= s:  # whitespace-only tokens count when they lie wholly inside the content
                continue
            inside[j] = any(s >= a and e <= b for a, b in content_spans)
        mask &= inside
    return mask


def last_position(ids: list[int], trailing_ids: set[int]) -> int:
    j = len(ids) - 1
    while j > 0 and ids[j] in trailing_ids:
        j -= 1
    return j


def _rng_for(seed: int, prompt_id: str) -> np.random.Generator:
    h = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def select_positions(spec: PositionSpec, prompt_id: str, ids: list[int], mask: np.ndarray,
                     trailing_ids: set[int]) -> list[int]:
    """The positions of one prompt under ``spec`` (sorted)."""
    if spec.kind == "last":
        return [last_position(ids, trailing_ids)]
    usable = np.flatnonzero(mask)
    if spec.exclude_last:
        usable = usable[usable < len(ids) - spec.exclude_last]
    if spec.kind == "upto":
        last = last_position(ids, trailing_ids)
        if len(usable) > spec.k:
            usable = _rng_for(spec.seed, prompt_id).choice(usable, size=spec.k, replace=False)
        return sorted({*(int(x) for x in usable), last})
    elif len(usable) < spec.k:
        raise MdiffError(
            f"prompt {prompt_id!r} has {len(usable)} usable content positions, fewer than k={spec.k} "
            f"(excluding BOS, template tokens and the last {spec.exclude_last}); use a smaller K or longer prompts")
    chosen = _rng_for(spec.seed, prompt_id).choice(usable, size=spec.k, replace=False)
    return sorted(int(x) for x in chosen)
