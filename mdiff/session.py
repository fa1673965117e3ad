"""A pair in one process: its prompts per split, its activation store, and one model in memory at a time.

Every RQ's compute function works over a :class:`PairSession` instead of opening models, tokenizers and
stores itself, so the same computation runs from ``mdiff rqN``, from a study's unit in this process, or
from a Ray actor that keeps its model loaded across units (``keep_model``).

* :meth:`PairSession.prompts` prepares a split at some positions once (tokenized for both models, aligned,
  length-checked) and caches it; :attr:`pad` and :attr:`shared_vocab` come with the first preparation.
* :meth:`PairSession.store` / :meth:`PairSession.collect` / :meth:`PairSession.acts`: the activation store
  under ``OUT/<pair>/activations/`` (:mod:`mdiff.activations`; resumable, fingerprinted).
* :meth:`PairSession.model` loads one side; asking for the other side frees the first. With ``keep_model``
  the last model stays loaded for the next unit of the same side (:meth:`close` frees it).
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mdiff import activations as A
from mdiff import models
from mdiff.align import Prepared
from mdiff.pairs import PairSpec


class PairSession:
    """One pair, its output folder and the shared run options (seed, prompt count, batch size, device)."""

    def __init__(self, spec: PairSpec, out: str | Path, seed: int = 0, n: int | None = None, batch_size: int = 16,
                 device: str | None = None, replace: bool = False, keep_model: bool = False, info=None):
        self.spec, self.out, self.seed, self.n = spec, Path(out), seed, n
        self.batch_size, self.device = batch_size, device
        self.replace = replace
        """The user asked to replace earlier work: stores are collected anew (once per session)."""
        self.keep_model = keep_model
        self._info = info
        self._prepared: dict[tuple, Prepared] = {}
        self._pad: dict[str, int] = {}
        self._sv = None
        self._model: Any = None
        self._side: str | None = None
        self._replaced: set[Path] = set()

    @property
    def info(self):
        """Shapes and tokenizers of both sides (:func:`mdiff.models.inspect_pair`, read once)."""
        if self._info is None:
            self._info = models.inspect_pair(self.spec)
        return self._info

    def with_options(self, seed: int, n: int | None, batch_size: int, device: str | None) -> "PairSession":
        """Use these run options from now on (returns the session): prompts prepared under another seed or
        count are prepared again; a model loaded on another device is freed."""
        if (seed, n) != (self.seed, self.n):
            self._prepared.clear()
        if device != self.device:
            self.close()
        self.seed, self.n, self.batch_size, self.device = seed, n, batch_size, device
        return self

    # prompts ------------------------------------------------------------------------------------------------
    def prompts(self, split: str | None, positions) -> Prepared:
        """``split`` of the pair's prompt set at ``positions``, prepared for both models (cached)."""
        key = (split, positions.tag)
        if key not in self._prepared:
            prep, pad_b, pad_t, sv = A.prepare_pair_prompts(self.spec, self.info, positions, split, self.seed,
                                                            self.n)
            self._prepared[key] = prep
            self._pad = {"base": pad_b, "tuned": pad_t}
            self._sv = sv
        return self._prepared[key]

    @property
    def pad(self) -> dict[str, int]:
        """Each side's padding token id (known once some prompts were prepared)."""
        if not self._pad:
            raise RuntimeError("prepare some prompts first (PairSession.prompts)")
        return self._pad

    @property
    def shared_vocab(self):
        """The token ids both tokenizers share (:func:`mdiff.align.shared_vocab`), the KL vocabulary."""
        if self._sv is None:
            raise RuntimeError("prepare some prompts first (PairSession.prompts)")
        return self._sv

    # activation store ---------------------------------------------------------------------------------------
    def store(self, side: str, split: str | None, positions, hooks: list[str], layers: list[int]) -> Path:
        """The folder of one side's collection of ``hooks`` × ``layers`` on ``split`` at ``positions``."""
        return A.collection_dir(self.out, self.spec.name, side, split, positions.tag, hooks, layers)

    def collect(self, model, side: str, split: str | None, positions, hooks: list[str], layers: list[int],
                prepared: Prepared | None = None, load=None) -> A.CollectResult:
        """Collect (or resume, or find complete) one side's activations into :meth:`store` (``model`` may be
        ``None`` with ``load`` returning it when needed: :func:`mdiff.activations.collect`)."""
        prep = prepared if prepared is not None else self.prompts(split, positions)
        path = self.store(side, split, positions, hooks, layers)
        replace = self.replace and path not in self._replaced
        self._replaced.add(path)
        meta = A.store_meta(self.spec, self.info, side, prep, positions, split, self.seed, self.pad[side])
        return A.collect(model, prep, side, hooks, layers, path, meta, batch_size=self.batch_size, replace=replace,
                         load=load)

    def collect_side(self, side: str, jobs: list[tuple], hooks: list[str], layers: list[int]) -> bool:
        """Collect ``jobs`` (``(split, positions, prepared)`` each) of one side, loading its model only when a
        shard is missing (a complete store is checked without it); returns whether the model was loaded."""
        used = []

        def load():
            if self._side != side:
                self.close()
                self._model, self._side = models.load_model(self.spec, side, self.device), side
            used.append(side)
            return self._model

        try:
            for split, positions, prep in jobs:
                self.collect(self._model if self._side == side else None, side, split, positions, hooks, layers,
                             prep, load=load)
        finally:
            if used and not self.keep_model:
                self.close()
        return bool(used)

    def acts(self, side: str, split: str | None, positions, hooks: list[str], layers: list[int]) -> A.ActivationSet:
        return A.ActivationSet(self.store(side, split, positions, hooks, layers))

    # models -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def model(self, side: str) -> Iterator[Any]:
        """``with session.model("base") as m:`` one side; the other side is freed first (one model at a time).
        Without ``keep_model`` it is freed on exit; with it, it stays for the next use of the same side."""
        if self._side != side:
            self.close()
            self._model, self._side = models.load_model(self.spec, side, self.device), side
        try:
            yield self._model
        except BaseException:
            self.close()
            raise
        if not self.keep_model:
            self.close()

    @property
    def loaded_side(self) -> str | None:
        """The side whose model is loaded now (``None``: none)."""
        return self._side

    def close(self) -> None:
        """Free the loaded model, if any."""
        if self._model is not None:
            models.free(self._model)
        self._model, self._side = None, None

    def __enter__(self) -> "PairSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
