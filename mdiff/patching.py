"""Cross-model activation patching at the decision position, and next-token KL.

A patch at site (layer, hook) and position p replaces the target model's activation there with a
source activation (another model's, on the same prompt, or a mapped one) and measures
``KL(P_target_clean ‖ P_target_patched)`` of the next-token distribution at the decision position
(each prompt's last chosen position), over the pair's shared vocabulary (renormalised). Every
intervention runs inside ``run_with_hooks``.

A *condition* is one patch applied to every prompt: :class:`SitePatch` (a whole hook such as
``resid_post`` or ``attn_out``) or :class:`HeadPatch` (a set of query heads at the ``result`` or
``z`` head site, METHODS RQ4). :class:`Patcher` evaluates many conditions on one prompt set:

* ``engine="naive"``: one ``run_with_hooks`` over the whole left-padded prompt batch per condition,
  as ``transformer_lens.patching`` does; the honest baseline;
* ``engine="fast"``: the engine (see its docstring) that only recomputes what a patch can change.

Both return the same numbers to float tolerance; tests check it.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mdiff import hooks as H
from mdiff.align import kl_divergence, restrict_logprobs
from mdiff.data import pad_left
from mdiff.errors import MdiffError

ENGINES = ("fast", "naive")
SITE_HOOKS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
HEAD_SITES = ("result", "z")


@dataclass(frozen=True, eq=False)
class SitePatch:
    """Replace ``hook`` at ``layer`` at each prompt's decision position with ``source[prompt]``.

    ``blend``: ``h ← (1 − α)·h + α·source``; ``scale``: ``h ← α·source``.
    """

    layer: int
    hook: str
    source: Float[Tensor, "prompt d_model"]
    alpha: float = 1.0
    mode: str = "blend"


@dataclass(frozen=True, eq=False)
class HeadPatch:
    """Patch query ``heads`` at ``layer`` at each prompt's decision position.

    ``site="result"``: ``source`` is ``[prompt, head, d_model]``, each head's whole contribution
    ``z_h @ W_O_source[h]`` (build it with :func:`mdiff.hooks.head_results` and the *source* model's
    ``W_O``); it replaces the target head's ``z_h @ W_O_target[h]``.
    ``site="z"``: ``source`` is ``[prompt, head, d_head]``; it replaces ``z_h``, which then goes
    through the *target's* ``W_O``. ``source`` holds every head; only ``heads`` are used.
    """

    layer: int
    heads: tuple[int, ...]
    site: str
    source: Tensor
    alpha: float = 1.0
    mode: str = "blend"


Condition = SitePatch | HeadPatch


def _batches(n: int, batch_size: int):
    for s in range(0, n, batch_size):
        yield s, min(n, s + batch_size)


def _decision_columns(ids, positions, width) -> Tensor:
    return torch.tensor([width - len(x) + p[-1] for x, p in zip(ids, positions, strict=True)])


def decision_logits(model, ids: list[list[int]], positions: list[list[int]], pad_id: int,
                    fwd_hooks_for_batch=None, batch_size: int = 32) -> Float[Tensor, "batch d_vocab"]:
    """Logits at each prompt's decision position (its last chosen position), optionally under patch hooks.

    ``fwd_hooks_for_batch(start, end, pos)`` returns the hooks for prompts ``start:end`` given the padded
    decision positions ``pos`` ``[batch]``.
    """
    dev = next(model.parameters()).device
    outs = []
    with torch.no_grad():
        for s, e in _batches(len(ids), batch_size):
            inp, mask = pad_left(ids[s:e], pad_id)
            pos = _decision_columns(ids[s:e], positions[s:e], inp.shape[1]).to(dev)
            hooks = fwd_hooks_for_batch(s, e, pos) if fwd_hooks_for_batch else []
            logits = model.run_with_hooks(inp.to(dev), attention_mask=mask.to(dev), fwd_hooks=hooks)
            outs.append(logits[torch.arange(e - s), pos].float().cpu())
    return torch.cat(outs)


def condition_hooks(model, cond: Condition, start: int, end: int, pos: Tensor) -> list[tuple[str, H.HookFn]]:
    """The TransformerLens hooks that apply ``cond`` to prompts ``start:end`` at padded positions ``pos``."""
    n_layers = model.cfg.n_layers
    if isinstance(cond, SitePatch):
        make = H.replace_hook if cond.mode == "blend" else H.scale_hook
        return [(H.hook_name(cond.hook, cond.layer, n_layers), make(cond.source[start:end], positions=pos,
                                                                    alpha=cond.alpha))]
    if cond.site == "z":
        return [(H.hook_name("z", cond.layer, n_layers),
                 H.head_z_hook(cond.source[start:end], cond.heads, positions=pos, alpha=cond.alpha, mode=cond.mode))]
    return H.head_result_patch(cond.layer, cond.source[start:end], cond.heads,
                               W_O_target=model.blocks[cond.layer].attn.W_O, positions=pos, alpha=cond.alpha,
                               mode=cond.mode, n_layers=n_layers)


def check_condition(cond: Condition, n_prompts: int, n_layers: int, n_heads: int) -> None:
    """Raise :class:`MdiffError` naming what is wrong with ``cond`` (layer, hook, heads, source shape)."""
    if not 0 <= cond.layer < n_layers:
        raise MdiffError(f"layer {cond.layer} is outside the model's layers 0..{n_layers - 1}")
    if cond.mode not in H.MODES:
        raise MdiffError(f"α mode {cond.mode!r} is not one of {', '.join(H.MODES)}")
    if len(cond.source) != n_prompts:
        raise MdiffError(f"source has {len(cond.source)} rows but there are {n_prompts} prompts (one row each)")
    if isinstance(cond, SitePatch):
        if cond.hook not in SITE_HOOKS:
            raise MdiffError(f"hook {cond.hook!r} is not a site hook; use one of {', '.join(SITE_HOOKS)}")
    else:
        if cond.site not in HEAD_SITES:
            raise MdiffError(f"head site {cond.site!r} is not one of {', '.join(HEAD_SITES)}")
        H.check_heads(list(cond.heads), n_heads)
        if cond.source.ndim != 3 or cond.source.shape[1] != n_heads:
            raise MdiffError(f"head source must be [prompt, head={n_heads}, ...], got {tuple(cond.source.shape)}")


class Patcher:
    """Evaluate patch conditions on one prompt set of one (target) model.

    ``ids``/``positions``/``pad_id`` are the target's tokenized prompts, chosen positions (the last one
    is the decision position) and pad id. The clean decision logits are computed once.
    """

    def __init__(self, model, ids: list[list[int]], positions: list[list[int]], pad_id: int,
                 batch_size: int = 32, engine: str = "fast", max_rows: int | None = None):
        if engine not in ENGINES:
            raise MdiffError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
        if not ids:
            raise MdiffError("no prompts to patch (the prompt set is empty after filtering)")
        self.model, self.ids, self.positions, self.pad_id = model, ids, positions, pad_id
        self.batch_size, self.engine, self.max_rows = batch_size, engine, max_rows
        self._clean: Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def clean(self) -> Float[Tensor, "prompt d_vocab"]:
        if self._clean is None:
            self._clean = decision_logits(self.model, self.ids, self.positions, self.pad_id,
                                          batch_size=self.batch_size)
        return self._clean

    def _check(self, conds: Sequence[Condition]) -> None:
        cfg = self.model.cfg
        for c in conds:
            check_condition(c, self.n, cfg.n_layers, cfg.n_heads)

    def logits(self, conds: Sequence[Condition]) -> Float[Tensor, "cond prompt d_vocab"]:
        """Decision logits under each condition."""
        self._check(conds)
        out = []
        for c in conds:
            out.append(decision_logits(self.model, self.ids, self.positions, self.pad_id,
                                       lambda s, e, pos, c=c: condition_hooks(self.model, c, s, e, pos),
                                       self.batch_size))
        return torch.stack(out) if out else torch.empty(0, self.n, 0)

    def kl(self, conds: Sequence[Condition], vocab_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Per-prompt ``KL(P_clean ‖ P_patched)`` over ``vocab_ids``: ``[cond, prompt]``."""
        clean = restrict_logprobs(self.clean, vocab_ids)
        rows = [kl_divergence(clean, restrict_logprobs(lg, vocab_ids)).numpy() for lg in self.logits(conds)]
        return np.stack(rows) if rows else np.empty((0, self.n))


def patch_logits(model, ids, positions, pad_id: int, layer: int, hook: str, source: Tensor,
                 alpha: float = 1.0, mode: str = "blend", batch_size: int = 32) -> Tensor:
    """Decision logits with ``hook`` at ``layer`` replaced at the decision position by ``source`` rows."""
    return Patcher(model, ids, positions, pad_id, batch_size, engine="naive").logits(
        [SitePatch(layer, hook, source, alpha, mode)])[0]


def kl_rows(clean: Tensor, patched: Tensor, vocab_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per-prompt ``KL(P_clean ‖ P_patched)`` over the vocabulary subset ``vocab_ids``."""
    return kl_divergence(restrict_logprobs(clean, vocab_ids), restrict_logprobs(patched, vocab_ids)).numpy()
