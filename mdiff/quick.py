"""A first look at a pair: next-token predictions of both models on its prompts, one model at a time."""

from typing import Any

from mdiff import data, models
from mdiff.align import kl_divergence, restrict_logprobs, shared_vocab
from mdiff.errors import MdiffError
from mdiff.pairs import PairSpec


def _last_logits(model, ids: list[list[int]], batch_size: int = 32):
    import torch

    pad = data.pad_id_of(model.tokenizer)
    outs = []
    with torch.no_grad():
        for s in range(0, len(ids), batch_size):
            inp, mask = data.pad_left(ids[s:s + batch_size], pad)
            dev = next(model.parameters()).device
            logits = model(inp.to(dev), attention_mask=mask.to(dev), logits_to_keep=1)  # the last column only
            outs.append(logits[:, -1].float().cpu())
    return torch.cat(outs)


def next_token_comparison(spec: PairSpec, n: int = 32, device: str | None = None) -> dict[str, Any]:
    """KL between the base and tuned next-token distributions at the last prompt position (shared vocabulary)."""
    if n < 1:
        raise MdiffError(f"{{option}} must be ≥ 1, got {n}", option="n")
    prompts = data.pair_prompts(spec)[:n]
    info = models.inspect_pair(spec)
    base = models.load_model(spec, "base", device=device)
    btok = base.tokenizer
    base_ids = data.tokenize(prompts, btok, spec.chat_template)
    lb = _last_logits(base, base_ids)
    models.free(base)
    del base
    tuned = models.load_model(spec, "tuned", device=device)
    ttok = tuned.tokenizer
    if info.tokenizer_relation in ("identical", "extends"):
        tuned_ids = base_ids  # METHODS.md: the base tokenizer for both models
    else:
        tuned_ids = data.tokenize(prompts, ttok, spec.chat_template)
    lt = _last_logits(tuned, tuned_ids)
    models.free(tuned)
    del tuned
    sv = shared_vocab(btok, ttok, lb.shape[-1], lt.shape[-1])
    pb, pt = restrict_logprobs(lb, sv.base_ids), restrict_logprobs(lt, sv.tuned_ids)
    kl_bt = kl_divergence(pb, pt)
    kl_tb = kl_divergence(pt, pb)
    agree = (pb.argmax(-1) == pt.argmax(-1)).float()
    return {
        "n_prompts": len(prompts), "tokenized_with": "base" if tuned_ids is base_ids else "own",
        "shared_vocab": sv.size, "kl_base_tuned_mean": float(kl_bt.mean()), "kl_tuned_base_mean": float(kl_tb.mean()),
        "top1_agreement": float(agree.mean()), "base_top1_prob_mean": float(pb.exp().max(-1).values.mean()),
        "tuned_top1_prob_mean": float(pt.exp().max(-1).values.mean()),
    }
