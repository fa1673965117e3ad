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
