"""Token alignment across the two tokenizers of a pair, and the shared vocabulary (METHODS.md).

* ``identical``: token ids are shared.
* ``extends`` (base vocabulary is a prefix of the tuned one, same merges): tokenize with the **base**
  tokenizer for both models, so positions align; every config records this.
* ``different``: positions are aligned by character offsets (a position pairs with the other
  tokenizer's token ending at the same character offset; unpaired positions are dropped and counted).
  The ``last`` position always aligns.

KL between the models' next-token distributions is computed over the **shared vocabulary**: token
strings present in both vocabularies, each model's probabilities renormalised over them.
"""

import dataclasses

import numpy as np

from mdiff.errors import MdiffError


@dataclasses.dataclass(frozen=True)
class SharedVocab:
    """Index arrays so that ``base_logits[..., base_ids]`` and ``tuned_logits[..., tuned_ids]`` line up."""

    base_ids: np.ndarray
    tuned_ids: np.ndarray
    n_base: int
    n_tuned: int

    @property
    def size(self) -> int:
        return len(self.base_ids)

    @property
    def is_prefix(self) -> bool:
        """True when the shared ids are 0..k-1 on both sides (the identical/extends case)."""
        k = self.size
        return bool(np.array_equal(self.base_ids, np.arange(k)) and np.array_equal(self.tuned_ids, np.arange(k)))


def shared_vocab(base_tok, tuned_tok, n_base: int | None = None, n_tuned: int | None = None) -> SharedVocab:
    """Tokens (by string) present in both vocabularies, ordered by base id.

    ``n_base``/``n_tuned`` are the models' logit widths (``d_vocab``), which may exceed the tokenizer
    size (padded embedding matrices); ids beyond them are dropped.
    """
    bv, tv = base_tok.get_vocab(), tuned_tok.get_vocab()
    n_base = n_base or len(bv)
    n_tuned = n_tuned or len(tv)
    pairs = sorted((bi, tv[t]) for t, bi in bv.items() if t in tv and bi < n_base and tv[t] < n_tuned)
    if not pairs:
        raise MdiffError("the two tokenizers share no token: these models cannot be compared token by token")
    b, t = zip(*pairs, strict=True)
    return SharedVocab(np.asarray(b, dtype=np.int64), np.asarray(t, dtype=np.int64), n_base, n_tuned)


def restrict_logprobs(logits, ids):
    """Log-probabilities renormalised over the vocabulary subset ``ids`` (last axis)."""
    import torch

    idx = torch.as_tensor(ids, device=logits.device)
    return torch.log_softmax(logits.index_select(-1, idx).float(), dim=-1)


def kl_divergence(logp_p, logp_q):
    """KL(P ‖ Q) along the last axis from log-probabilities (float64 accumulation)."""
    p = logp_p.double()
    return (p.exp() * (p - logp_q.double())).sum(-1)
