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
    """Log-probabilities renormalised over the vocabulary subset ``ids`` (last axis), in float64.

    The model's logits (any dtype) are upcast *before* the log-softmax: a float32 log-softmax leaves a
    noise floor of ~1e-7 nats in every KL (self-patches of 3e-7, negative KLs of -5e-9); in float64 the
    KL of identical logits is exactly 0 and round-off stays below 1e-12.
    """
    import torch

    idx = torch.as_tensor(ids, device=logits.device)
    return torch.log_softmax(logits.index_select(-1, idx).double(), dim=-1)


def kl_divergence(logp_p, logp_q):
    """KL(P ‖ Q) along the last axis from log-probabilities (float64 accumulation)."""
    p = logp_p.double()
    return (p.exp() * (p - logp_q.double())).sum(-1)


# --------------------------------------------------------------------------- preparing a prompt set
@dataclasses.dataclass
class Prepared:
    """A prompt set tokenized for both models, with aligned positions (what every analysis consumes)."""

    prompt_ids: list[str]
    base_ids: list[list[int]]
    tuned_ids: list[list[int]]
    base_positions: list[list[int]]
    tuned_positions: list[list[int]]
    tokenized_with: str  # "shared" (one tokenization for both) | "own" (aligned by character offsets)
    shared_ratio_base: list[float]
    shared_ratio_tuned: list[float]
    dropped_unpaired_positions: int = 0
    dropped_by_fairness: int = 0
    dropped_too_long: int = 0

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def subset(self, keep: list[int]) -> "Prepared":
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        return dataclasses.replace(
            self, prompt_ids=pick(self.prompt_ids), base_ids=pick(self.base_ids), tuned_ids=pick(self.tuned_ids),
            base_positions=pick(self.base_positions), tuned_positions=pick(self.tuned_positions),
            shared_ratio_base=pick(self.shared_ratio_base), shared_ratio_tuned=pick(self.shared_ratio_tuned))

    def summary(self) -> dict:
        return {"n_prompts": len(self), "tokenized_with": self.tokenized_with,
                "n_positions": int(sum(len(p) for p in self.base_positions)),
                "dropped_unpaired_positions": self.dropped_unpaired_positions,
                "dropped_by_fairness": self.dropped_by_fairness,
                "dropped_too_long": self.dropped_too_long,
                "shared_ratio_base_min": float(min(self.shared_ratio_base)) if len(self) else None,
                "shared_ratio_tuned_min": float(min(self.shared_ratio_tuned)) if len(self) else None}


def _content_spans(text: str, messages) -> list[tuple[int, int]]:
    """Character spans of the non-system message contents inside a rendered chat."""
    spans, cursor = [], 0
    for m in messages:
        content = m["content"].strip()
        if not content:
            continue
        at = text.find(content, cursor)
        if at < 0:
            continue
        cursor = at + len(content)
        if m["role"] != "system":
            spans.append((at, at + len(content)))
    return spans


def _special_ids(tok) -> set[int]:
    return set(getattr(tok, "all_special_ids", []) or [])


def _encode(tok, text: str, add_special: bool):
    enc = tok(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    bos = getattr(tok, "bos_token_id", None)
    while bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids, offs = ids[1:], offs[1:]
    return ids, offs


def prepare(prompts, base_tok, tuned_tok, relation: str, chat_template, position_spec,
            min_shared_ratio: float = 0.0, shared: "SharedVocab | None" = None) -> Prepared:
    """Tokenize every prompt for both models and choose aligned positions (METHODS.md, token alignment).

    ``identical``/``extends``: one tokenization with the base tokenizer, fed to both models.
    ``different``: each model's own tokenizer on the same rendered text; a base position pairs with the
    tuned token ending at the same character offset, unpaired positions are dropped and counted; the
    ``last`` position always pairs. The fairness filter keeps prompts whose tokens fall in the shared
    vocabulary at ratio ≥ ``min_shared_ratio`` under both tokenizers; an empty result is an error that
    reports the ratios seen.
    """
    from mdiff import data
    from mdiff.positions import content_mask, last_position, select_positions

    if not prompts:
        raise MdiffError("the prompt set is empty")
    if not 0.0 <= min_shared_ratio <= 1.0:
        raise MdiffError(f"min_shared_ratio must be in [0, 1], got {min_shared_ratio}")
    shared = shared or shared_vocab(base_tok, tuned_tok)
    sb, st = set(shared.base_ids.tolist()), set(shared.tuned_ids.tolist())
    spec_b, spec_t = _special_ids(base_tok), _special_ids(tuned_tok)
    trail_b = {i for i in (base_tok.eos_token_id, base_tok.pad_token_id) if i is not None}
    trail_t = {i for i in (tuned_tok.eos_token_id, tuned_tok.pad_token_id) if i is not None}
    one = relation in ("identical", "extends")
    out = Prepared([], [], [], [], [], "shared" if one else "own", [], [])
    for p in prompts:
        text, add_special = data.render(p, base_tok, chat_template)
        b_ids, b_offs = _encode(base_tok, text, add_special)
        t_own, t_offs = _encode(tuned_tok, text, add_special)
        if p.messages is not None or chat_template:
            msgs = p.messages if p.messages is not None else [{"role": "user", "content": p.prompt}]
            spans = _content_spans(text, msgs)
        else:
            spans = None
        mask = content_mask(text, b_ids, b_offs, spec_b, spans)
        b_pos = select_positions(position_spec, p.id, b_ids, mask, trail_b)
        ratio_b = float(np.mean([i in sb for i in b_ids if i not in spec_b] or [1.0]))
        ratio_t = float(np.mean([i in st for i in t_own if i not in spec_t] or [1.0]))
        if one:
            t_ids, t_pos = b_ids, b_pos
        else:
            t_ids = t_own
            # the LAST token ending at an offset is the one whose prefix is complete there: byte-level BPE
            # splits a character over several tokens that share its offsets, and a piece before the
            # last one ends mid-character (its prefix text differs from the other tokenization's)
            ends = {e: j for j, (s, e) in enumerate(t_offs) if e > s}
            b_ends = {e: j for j, (s, e) in enumerate(b_offs) if e > s}
            t_last = last_position(t_ids, trail_t)
            b_last = last_position(b_ids, trail_b)
            keep_b, t_pos = [], []
            for pos in b_pos:
                e = b_offs[pos][1]
                q = t_last if pos == b_last else ends.get(e) if b_ends.get(e) == pos else None
                if q is None:
                    out.dropped_unpaired_positions += 1
                    continue
                keep_b.append(pos)
                t_pos.append(q)
            if not keep_b:
                continue
            b_pos = keep_b
        out.prompt_ids.append(p.id)
        out.base_ids.append(b_ids)
        out.tuned_ids.append(t_ids)
        out.base_positions.append(b_pos)
        out.tuned_positions.append(t_pos)
        out.shared_ratio_base.append(ratio_b)
        out.shared_ratio_tuned.append(ratio_t)
    if not len(out):
        raise MdiffError("no prompt has a position that aligns across the two tokenizers")
    keep = [i for i in range(len(out)) if min(out.shared_ratio_base[i], out.shared_ratio_tuned[i]) >= min_shared_ratio]
    if not keep:
        rb, rt = np.array(out.shared_ratio_base), np.array(out.shared_ratio_tuned)
        lo = np.minimum(rb, rt)
        raise MdiffError(
            f"no prompt passes the fairness filter min_shared_ratio={min_shared_ratio}: shared-vocabulary ratios "
            f"seen (min over both tokenizers) range {lo.min():.2f}..{lo.max():.2f}, median {np.median(lo):.2f} "
            f"(base {rb.min():.2f}..{rb.max():.2f}, tuned {rt.min():.2f}..{rt.max():.2f}); lower min_shared_ratio")
    dropped = len(out) - len(keep)
    out = out.subset(keep)
    out.dropped_by_fairness = dropped
    return out
