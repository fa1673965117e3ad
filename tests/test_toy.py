"""The toy pairs: the planted difference is exactly where `truth` says, and the base is trained."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from mdiff import toy
from mdiff.align import kl_divergence, restrict_logprobs
from mdiff.models import load_model

pytestmark = pytest.mark.slow


def weights(d):
    return load_file(f"{d}/model.safetensors")


def test_lowrank_difference_is_where_truth_says(toys):
    spec = toys["toy-lowrank"]
    truth = spec.truth
    wb, wt = weights(spec.base), weights(spec.tuned)
    assert set(wb) == set(wt)
    L, heads, r = truth["layer"], truth["heads"], truth["rank"]
    d_head = toy.D_HEAD
    changed = []
    for name in wb:
        a, b = wb[name], wt[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            n = a.shape[0]
            assert b.shape[0] == n + len(toy.KAZAKH_TOKENS)
            assert torch.equal(a, b[:n]), name  # base vocabulary rows untouched
            continue
        if not torch.equal(a, b):
            changed.append(name)
    assert changed == [f"model.layers.{L}.self_attn.o_proj.weight"]
    delta = wt[changed[0]] - wb[changed[0]]  # [d_model, n_heads*d_head]
    total = torch.zeros(delta.shape[0], 0)
    for h in range(toy.N_HEADS):
        block = delta[:, h * d_head:(h + 1) * d_head]
        if h in heads:
            assert torch.linalg.matrix_rank(block, atol=1e-4) == r
            total = torch.cat([total, block], 1)
        else:
            assert torch.count_nonzero(block) == 0
    # all planted heads write into one shared rank-r output subspace
    assert torch.linalg.matrix_rank(total, atol=1e-4) == r


def test_distributed_changes_every_layer(toys):
    spec = toys["toy-distributed"]
    wb, wt = weights(spec.base), weights(spec.tuned)
    for layer in range(toy.N_LAYERS):
        rel = []
        for name in wb:
            if name.startswith(f"model.layers.{layer}."):
                rel.append(float((wt[name] - wb[name]).norm() / wb[name].norm()))
        assert min(rel) > 0.005, (layer, rel)


def test_base_is_trained_and_peaked(toys):
    spec = toys["toy-lowrank"]
    m = load_model(spec, "base", device="cpu")
    tok = m.tokenizer
    rows = [json.loads(line) for line in open(spec.prompts)][:64]
    texts = [tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in rows]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    with torch.no_grad():
        logp = m(enc.input_ids, attention_mask=enc.attention_mask)[:, -1].log_softmax(-1)
    top1 = logp.exp().max(-1).values.mean().item()
    assert top1 > 0.8  # a random net over 600 tokens would sit near 1/600
    acc = sum(tok.decode([int(i)]).strip() == r["answer"] for i, r in zip(logp.argmax(-1), rows, strict=True)) / len(rows)
    assert acc > 0.5


def test_planted_change_moves_predictions(toys):
    from mdiff.quick import next_token_comparison

    lr = next_token_comparison(toys["toy-lowrank"], n=64, device="cpu")
    assert lr["tokenized_with"] == "base" and lr["shared_vocab"] == 600
    assert lr["kl_base_tuned_mean"] > 0.1
    ds = next_token_comparison(toys["toy-distributed"], n=64, device="cpu")
    assert ds["kl_base_tuned_mean"] > 0.1


def test_prompt_sets_shipped(toys):
    for spec in toys.values():
        rows = [json.loads(line) for line in open(spec.prompts)]
        assert len(rows) >= 200 and len({r["id"] for r in rows}) == len(rows)


def test_build_is_deterministic(tmp_path):
    a = toy.build_toys(tmp_path / "a", steps_scale=0.01)
    b = toy.build_toys(tmp_path / "b", steps_scale=0.01)
    for sub in ("base", "lowrank", "distributed"):
        wa, wb = weights(a / sub), weights(b / sub)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), sub
        assert (a / sub / "tokenizer.json").read_text() == (b / sub / "tokenizer.json").read_text()
    assert (a / "prompts-lowrank.jsonl").read_text() == (b / "prompts-lowrank.jsonl").read_text()
    # rebuilding into an existing folder does nothing (no overwrite)
    before = (a / "build.json").read_text()
    toy.build_toys(a, steps_scale=0.01)
    assert (a / "build.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_kl_helpers_against_numpy():
    import numpy as np

    rng = random.Random(0)
    a = torch.tensor([[rng.gauss(0, 1) for _ in range(7)]])
    b = torch.tensor([[rng.gauss(0, 1) for _ in range(7)]])
    ids = np.array([0, 2, 3, 6])
    pa, pb = restrict_logprobs(a, ids), restrict_logprobs(b, ids)
    na = np.exp(a.numpy()[0, ids]) / np.exp(a.numpy()[0, ids]).sum()
    nb = np.exp(b.numpy()[0, ids]) / np.exp(b.numpy()[0, ids]).sum()
    assert abs(float(kl_divergence(pa, pb)[0]) - float((na * np.log(na / nb)).sum())) < 1e-6
