"""Cross-model activation patching at the decision position, and next-token KL.

A patch at site (layer, hook) and position p replaces the target model's activation there with a
source activation (another model's, on the same prompt, read from the activation store) and measures
``KL(P_target_clean ‖ P_target_patched)`` of the next-token distribution at the decision position,
over the pair's shared vocabulary (renormalised). Every intervention runs inside ``run_with_hooks``.
"""

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mdiff import hooks as H
from mdiff.align import kl_divergence, restrict_logprobs
from mdiff.data import pad_left


def _batches(n: int, batch_size: int):
    for s in range(0, n, batch_size):
        yield s, min(n, s + batch_size)


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
            width = inp.shape[1]
            pos = torch.tensor([width - len(x) + p[-1] for x, p in zip(ids[s:e], positions[s:e], strict=True)])
            hooks = fwd_hooks_for_batch(s, e, pos.to(dev)) if fwd_hooks_for_batch else []
            logits = model.run_with_hooks(inp.to(dev), attention_mask=mask.to(dev), fwd_hooks=hooks)
            outs.append(logits[torch.arange(e - s), pos.to(dev)].float().cpu())
    return torch.cat(outs)


def patch_logits(model, ids, positions, pad_id: int, layer: int, hook: str, source: Tensor,
                 alpha: float = 1.0, mode: str = "blend", batch_size: int = 32) -> Tensor:
    """Decision logits with ``hook`` at ``layer`` replaced at the decision position by ``source`` rows.

    ``source`` is ``[n_prompts, ...]`` (one row per prompt: the source model's activation at its aligned
    decision position).
    """
    name = H.hook_name(hook, layer, model.cfg.n_layers)
    make = H.replace_hook if mode == "blend" else H.scale_hook

    def hooks_for(s, e, pos):
        return [(name, make(source[s:e], positions=pos, alpha=alpha))]

    return decision_logits(model, ids, positions, pad_id, hooks_for, batch_size)


def kl_rows(clean: Tensor, patched: Tensor, vocab_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per-prompt ``KL(P_clean ‖ P_patched)`` over the vocabulary subset ``vocab_ids``."""
    return kl_divergence(restrict_logprobs(clean, vocab_ids), restrict_logprobs(patched, vocab_ids)).numpy()
