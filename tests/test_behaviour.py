"""Behaviour diagnostics against hand-computed log-probabilities."""

import numpy as np
import pytest
import torch

from mdiff import behaviour, data
from mdiff.align import shared_vocab
from mdiff.errors import MdiffError
from mdiff.models import load_model, load_tokenizer


def test_settings_validation():
    s = behaviour.settings_for({"markers": "x"})
    assert s["markers"] == ["x"] and s["refusal"] == behaviour.DEFAULTS["refusal"]
    with pytest.raises(MdiffError, match="unknown behaviour setting 'marker'"):
        behaviour.settings_for({"marker": ["x"]})
    with pytest.raises(MdiffError, match="'max_new_tokens' must be a whole number"):
        behaviour.settings_for({"max_new_tokens": 0})


@pytest.mark.slow
def test_scores_match_manual_logprobs(toys):
    spec = toys["toy-lowrank"]
    model = load_model(spec, "tuned", device="cpu")
    btok, ttok = load_tokenizer(spec.base), load_tokenizer(spec.tuned)
    sv = shared_vocab(btok, ttok, 600, 612)
    prompts = data.load_prompts(spec.prompts)[:3]
    ids = data.tokenize(prompts, btok, True)
    cont = btok(" paris .", add_special_tokens=False)["input_ids"]
    got = behaviour._score(model, ids, [cont], 0, None)[:, 0]
    got_masked = behaviour._score(model, ids, [cont], 0, sv.tuned_ids)[:, 0]
    for i, p in enumerate(ids):
        seq = torch.tensor([p + cont])
        with torch.no_grad():
            logits = model(seq)[0].double()
        full = logits.log_softmax(-1)
        shared = logits[:, :600].log_softmax(-1)
        want = sum(float(full[len(p) - 1 + j, t]) for j, t in enumerate(cont))
        want_m = sum(float(shared[len(p) - 1 + j, t]) for j, t in enumerate(cont))
        assert abs(got[i] - want) < 1e-3 and abs(got_masked[i] - want_m) < 1e-3
    # a continuation using a tuned-only token has no masked score
    kz = ttok(" астана", add_special_tokens=False)["input_ids"]
    assert max(kz) >= 600
    assert np.isnan(behaviour._score(model, ids[:1], [kz], 0, sv.tuned_ids)[0, 0])
    # greedy decoding restricted to the shared vocabulary never emits a tuned-only token
    gen = behaviour.greedy(model, ids, 6, 0, sv.tuned_ids)
    assert all(t < 600 for g in gen for t in g)
    rows = behaviour.diagnostics(model, btok, "tuned", prompts, ids, 0, sv.tuned_ids,
                                 behaviour.settings_for({"refusal": [" i do not know ."], "neutral": [" paris ."],
                                                         "markers": ["."], "max_new_tokens": 4}))
    soft = [r for r in rows if r["metric"] == "soft_refusal" and r["condition"] == "tuned:unmasked"][0]["values"]
    assert soft.shape == (3,)


def _greedy_without_cache(model, prompts_ids, n_new, pad_id, vocab_ids=None):
    """The reference: every step reruns the whole left-padded sequence through the bridge (the old path)."""
    vidx = None if vocab_ids is None else torch.as_tensor(np.asarray(vocab_ids))
    cur = [list(p) for p in prompts_ids]
    gen = [[] for _ in cur]
    with torch.no_grad():
        for _ in range(n_new):
            inp, mask = data.pad_left(cur, pad_id)
            last = model(inp, attention_mask=mask)[:, -1].float()
            nxt = (vidx[last.index_select(-1, vidx).argmax(-1)] if vidx is not None else last.argmax(-1)).tolist()
            for i, t in enumerate(nxt):
                cur[i].append(int(t))
                gen[i].append(int(t))
    return gen


@pytest.mark.slow
def test_kv_cache_greedy_equals_full_recompute(toys):
    spec = toys["toy-lowrank"]
    model = load_model(spec, "tuned", device="cpu")
    btok, ttok = load_tokenizer(spec.base), load_tokenizer(spec.tuned)
    sv = shared_vocab(btok, ttok, 600, 612)
    prompts = data.load_prompts(spec.prompts)[:7]  # different lengths: left padding inside each batch
    ids = data.tokenize(prompts, btok, True)
    assert len({len(x) for x in ids}) > 1
    for vocab in (None, sv.tuned_ids):
        want = _greedy_without_cache(model, ids, 10, 0, vocab)
        assert behaviour.greedy(model, ids, 10, 0, vocab, batch_size=4) == want
    # the cached path never computes full-sequence logits: the unembedding sees one position per row
    widths = []
    h = model.original_model.lm_head.register_forward_hook(lambda m, i, o: widths.append(o.shape[1]))
    try:
        behaviour.greedy(model, ids, 3, 0, None, batch_size=8)
        behaviour._score(model, ids, [[5, 6, 7]], 0, None)
    finally:
        h.remove()
    assert widths == [1, 1, 1, 4]
