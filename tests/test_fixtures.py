"""The Llama-3.1-shaped fixtures: Llama-3's real tokenizer (from llama-models), the Sherkala-like extension,
and what the toys cannot test: BOS/special tokens, the decision position at the end of the assistant header,
the fairness filter and KL over the 128k shared vocabulary, the extended-vocabulary path."""

import numpy as np
import pytest

pytest.importorskip("llama_models")

from mdiff import align, data, fixtures  # noqa: E402
from mdiff.models import tokenizer_relation  # noqa: E402
from mdiff.positions import parse_positions  # noqa: E402

KK = "Наурыз мейрамы көктемде тойланады."


@pytest.fixture(scope="module")
def btok():
    return fixtures.llama3_tokenizer()


@pytest.fixture(scope="module")
def ttok(btok):
    return fixtures.extend_tokenizer(btok)


def test_llama3_tokenizer_is_the_hub_one(btok):
    assert len(btok) == 128_256
    assert btok("Hello world")["input_ids"] == [128000, 9906, 1917]  # as the hub's Llama-3.1 tokenizer
    ids = btok.convert_tokens_to_ids(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                      "<|eot_id|>", "<|python_tag|>", "<|reserved_special_token_247|>"])
    assert ids == [128000, 128006, 128007, 128009, 128010, 128255]
    assert (btok.bos_token_id, btok.eos_token_id) == (128000, 128009)


def test_chat_prompt_has_one_bos_and_ends_in_the_assistant_header(btok):
    p = data.Prompt(id="a", prompt="Hi")
    (ids,) = data.tokenize([p], btok, True)
    assert ids[0] == 128000 and ids.count(128000) == 1  # the template writes BOS; never a second one
    assert ids[-4:] == [128006, 78191, 128007, 271]  # <|start_header_id|>assistant<|end_header_id|>\n\n
    assert btok.decode(ids[1:5]) == "<|start_header_id|>system<|end_header_id|>\n\n"


def test_extended_tokenizer_extends_llama3(btok, ttok):
    assert len(ttok) == fixtures.EXTENDED_VOCAB == 159_766
    rel, shared = tokenizer_relation(btok, ttok)
    assert (rel, shared) == ("extends", 128_256)
    assert ttok("Hello world, 12 + 30")["input_ids"] == btok("Hello world, 12 + 30")["input_ids"]
    kk_b, kk_t = btok(KK)["input_ids"], ttok(KK)["input_ids"]
    assert max(kk_b[1:]) < 128_000 and any(i >= 128_256 for i in kk_t) and len(kk_t) < len(kk_b)
    assert ttok.decode(kk_t, skip_special_tokens=True) == KK
    assert ttok.convert_tokens_to_ids("<|eot_id|>") == 128009


# --------------------------------------------------------------------------- on the built small fixture
@pytest.fixture(scope="module")
def small():
    from mdiff.pairs import resolve_pair

    return resolve_pair("llama31-fixture-small")


@pytest.mark.slow
def test_decision_position_and_fairness_over_the_shared_vocabulary(small):
    from mdiff.models import inspect_pair, load_tokenizer

    info = inspect_pair(small)
    assert info.tokenizer_relation == "extends" and info.n_shared_tokens == 128_256
    assert (info.base.d_vocab, info.tuned.d_vocab, info.base.n_heads, info.base.n_kv_heads) == \
        (128_256, 159_766, 32, 8)
    b, t = load_tokenizer(small.base), load_tokenizer(small.tuned)
    prompts = data.load_prompts(small.prompts)
    sv = align.shared_vocab(b, t, 128_256, 159_766)
    assert sv.size == 128_256 and (sv.base_ids == sv.tuned_ids).all()
    prep = align.prepare(prompts, b, t, info.tokenizer_relation, True, parse_positions("last"), 0.0, shared=sv)
    assert prep.tokenized_with == "shared" and len(prep) == len(prompts)
    for ids, (pos,) in zip(prep.base_ids, prep.base_positions, strict=True):
        assert ids[0] == 128000 and ids.count(128000) == 1
        assert pos == len(ids) - 1 and ids[pos] == 271 and ids[pos - 1] == 128007  # end of assistant header
    # fairness: the tuned tokenizer's own ids, specials excluded, in the shared (base) vocabulary
    special = set(t.all_special_ids)
    for p, rt in zip(prompts, prep.shared_ratio_tuned, strict=True):
        text, _ = data.render(p, t, True)
        own = [i for i in t(text, add_special_tokens=False)["input_ids"] if i not in special]
        assert rt == pytest.approx(np.mean([i < 128_256 for i in own]))
    kk = [r for p, r in zip(prompts, prep.shared_ratio_tuned, strict=True) if p.id.startswith("kk")]
    en = [r for p, r in zip(prompts, prep.shared_ratio_tuned, strict=True) if p.id.startswith("en")]
    assert max(kk) < 1.0 and min(en) == 1.0
    cut = (max(kk) + 1.0) / 2
    kept = align.prepare(prompts, b, t, info.tokenizer_relation, True, parse_positions("last"), cut, shared=sv)
    assert kept.prompt_ids == [p.id for p in prompts if p.id.startswith("en")]
    assert kept.dropped_by_fairness == len(kk)


@pytest.mark.slow
def test_next_token_kl_over_the_128k_shared_vocabulary_matches_hf(small):
    import torch
    from transformers import AutoModelForCausalLM

    from mdiff.quick import next_token_comparison

    got = next_token_comparison(small, n=6, device="cpu")
    assert got["shared_vocab"] == 128_256 and got["tokenized_with"] == "base"
    # independent reference: plain transformers, float64 softmax over the first 128,256 ids
    from mdiff.models import load_tokenizer

    tok = load_tokenizer(small.base)
    ids = data.tokenize(data.load_prompts(small.prompts)[:6], tok, True)
    last = []
    for ref in (small.base, small.tuned):
        m = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            last.append(np.stack([m(torch.tensor([x])).logits[0, -1, :128_256].double().numpy() for x in ids]))
    lp = [x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
          for x in last]
    kl = (np.exp(lp[0]) * (lp[0] - lp[1])).sum(-1).mean()
    assert kl > 1e-4  # the planted change moves the decision distribution
    assert got["kl_base_tuned_mean"] == pytest.approx(kl, rel=0.05, abs=1e-5)


@pytest.mark.slow
def test_study_runs_end_to_end_on_the_llama31_fixture(small, tmp_path):
    """`mdiff study` on the Llama-3.1-shaped pair (real tokenizer, extended vocabulary, bf16, GQA): every step
    runs, RQ1 finds the planted layer, RQ4 ranks the planted heads first."""
    import json

    from typer.testing import CliRunner

    from mdiff.cli import app

    r = CliRunner().invoke(app, ["study", "--pair", "llama31-fixture-small", "--n", "16", "--bootstrap", "100",
                                 "--out", str(tmp_path), "--threads", "1"])
    assert r.exit_code == 0, r.output
    d = tmp_path / "llama31-fixture-small"
    truth = small.truth
    s1 = json.loads((d / "rq1" / "summary.json").read_text())
    assert s1["noise"]["dtype"] == "bfloat16" and s1["self_patch_max_kl"] == 0.0
    assert s1["first_divergent_layer"] == truth["layer"]
    study = json.loads((d / "study.json").read_text())
    assert [s["status"] for s in study["steps"]] == ["ran"] * 4
    s4 = json.loads((d / "rq4" / "summary.json").read_text())
    e = next(x for x in s4["layers"] if x["layer"] == truth["layer"] and x["source"] == "raw")
    assert sorted(e["coverage"]["2"]["heads"]) == sorted(truth["heads"])
    assert (d / "report" / "index.html").is_file()
