"""The fast patching engine equals the naive one (full forwards with hooks) on both toy pairs; clean-up and errors."""

import numpy as np
import pytest
import torch

from mdiff import activations as A
from mdiff import models
from mdiff import patching as P
from mdiff.errors import MdiffError
from mdiff.hooks import head_results, hook_name
from mdiff.positions import parse_positions

KL_TOL = 1e-5
LOGIT_ATOL = 5e-5
LAYERS = (0, 3, 5)  # first, middle, last of the 6-layer toys


@pytest.fixture(scope="module")
def setups(toys):
    """Per toy pair: the tuned model, 13 prompts (not a multiple of the batch sizes below) and sources.

    Sources are the base model's activations at the decision position (the real cross-patch), and, for
    larger effects, the tuned model's own activations of *another* prompt (a shuffled source).
    """
    out = {}
    for name, spec in toys.items():
        info = models.inspect_pair(spec)
        prep, pad_b, pad_t, sv = A.prepare_pair_prompts(spec, info, parse_positions("last"), "all", 0, 13)
        names = [hook_name(h, L) for h in (*P.SITE_HOOKS, "z") for L in LAYERS]
        with models.loaded(spec, "base", "cpu") as base:
            src_base = A.gather_batch(base, prep.base_ids, prep.base_positions, names, pad_b)
            w_base = {L: base.blocks[L].attn.W_O.detach().clone() for L in LAYERS}
        tuned = models.load_model(spec, "tuned", "cpu")
        own = A.gather_batch(tuned, prep.tuned_ids, prep.tuned_positions, names, pad_t)
        perm = torch.roll(torch.arange(len(prep)), 3)
        out[name] = dict(model=tuned, ids=prep.tuned_ids, positions=prep.tuned_positions, pad=pad_t,
                         vocab=sv.tuned_ids, base=src_base, shuffled={k: v[perm] for k, v in own.items()},
                         w_base=w_base, n=len(prep))
    yield out
    for s in out.values():
        models.free(s["model"])


def _conditions(s):
    """Every site hook at three layers in both α modes, head subsets at both head sites, two sources."""
    conds = []
    for L in LAYERS:
        for h in P.SITE_HOOKS:
            b, sh = s["base"][hook_name(h, L)], s["shuffled"][hook_name(h, L)]
            conds += [P.SitePatch(L, h, b), P.SitePatch(L, h, sh), P.SitePatch(L, h, sh, 0.4, "blend"),
                      P.SitePatch(L, h, sh, 0.7, "scale")]
        zb, zs = s["base"][hook_name("z", L)], s["shuffled"][hook_name("z", L)]
        rb = head_results(zb, s["w_base"][L])
        conds += [P.HeadPatch(L, (0, 1, 2, 3), "result", rb), P.HeadPatch(L, (1,), "result", rb),
                  P.HeadPatch(L, (0, 2), "result", rb, 0.5, "scale"), P.HeadPatch(L, (3,), "z", zs),
                  P.HeadPatch(L, (1, 2), "z", zs, 0.3), P.HeadPatch(L, (0, 3), "z", zb, 0.8, "scale")]
    return conds


def _assert_same(fast, naive, conds, vocab):
    lf, ln = fast.logits(conds), naive.logits(conds)
    torch.testing.assert_close(lf, ln, atol=LOGIT_ATOL, rtol=1e-5)
    torch.testing.assert_close(fast.clean, naive.clean, atol=LOGIT_ATOL, rtol=1e-5)
    kf, kn = fast.kl(conds, vocab), naive.kl(conds, vocab)
    assert kf.shape == kn.shape == (len(conds), fast.n)
    assert np.abs(kf - kn).max() <= KL_TOL
    return kn


@pytest.fixture(scope="module")
def naive_reference(setups):
    """The naive engine's logits, clean logits and KL for :func:`_conditions`, once per pair."""
    out = {}
    for name, s in setups.items():
        conds = _conditions(s)
        naive = P.Patcher(s["model"], s["ids"], s["positions"], s["pad"], batch_size=4, engine="naive")
        out[name] = (conds, naive.logits(conds), naive.clean, naive.kl(conds, s["vocab"]))
    return out


@pytest.mark.parametrize("pair", ["toy-lowrank", "toy-distributed"])
@pytest.mark.parametrize("max_rows", [None, 6, 3])
def test_fast_equals_naive(setups, naive_reference, pair, max_rows):
    s = setups[pair]
    conds, logits, clean, kl = naive_reference[pair]
    fast = P.Patcher(s["model"], s["ids"], s["positions"], s["pad"], batch_size=4, max_rows=max_rows)
    assert fast.engine_used == "fast" and fast.fallback_reason is None
    torch.testing.assert_close(fast.logits(conds), logits, atol=LOGIT_ATOL, rtol=1e-5)
    torch.testing.assert_close(fast.clean, clean, atol=LOGIT_ATOL, rtol=1e-5)
    kf = fast.kl(conds, s["vocab"])
    assert kf.shape == kl.shape == (len(conds), s["n"])
    assert np.abs(kf - kl).max() <= KL_TOL
    assert kl.mean() > 0.05  # the patches do something (not a vacuous comparison)
    assert {c.hook for c in conds if isinstance(c, P.SitePatch)} == set(P.SITE_HOOKS)
    assert {(c.site, c.mode) for c in conds if isinstance(c, P.HeadPatch)} == \
        {(a, b) for a in P.HEAD_SITES for b in ("blend", "scale")}


def test_decision_position_not_last_and_mixed_lengths(setups):
    """Tokens after the decision position cannot matter; left-padded batches of very different lengths."""
    s = setups["toy-lowrank"]
    ids = [x + x[1:4] if i % 2 else x for i, x in enumerate(s["ids"])]  # trailing tokens after p on odd prompts
    ids[0] = ids[0][:2]  # a 2-token prompt next to long ones
    positions = [[len(x) - 1] if i % 2 == 0 else p for i, (x, p) in enumerate(zip(ids, s["positions"], strict=True))]
    conds = [c for c in _conditions(s) if c.layer in (3, 5)]
    fast = P.Patcher(s["model"], ids, positions, s["pad"], batch_size=5)
    naive = P.Patcher(s["model"], ids, positions, s["pad"], batch_size=5, engine="naive")
    _assert_same(fast, naive, conds, s["vocab"])


def test_vocabulary_subset_that_is_not_a_range(setups, naive_reference):
    """KL over a scattered vocabulary subset (the fast engine then restricts the logits instead of W_U)."""
    s = setups["toy-distributed"]
    conds = naive_reference["toy-distributed"][0][::7]
    vocab = np.arange(3, s["model"].cfg.d_vocab, 5)[::-1].copy()
    fast = P.Patcher(s["model"], s["ids"], s["positions"], s["pad"], batch_size=4)
    naive = P.Patcher(s["model"], s["ids"], s["positions"], s["pad"], batch_size=4, engine="naive")
    kf, kn = fast.kl(conds, vocab), naive.kl(conds, vocab)
    assert np.abs(kf - kn).max() <= KL_TOL and kn.mean() > 0.01


def test_decision_at_position_zero(setups):
    s = setups["toy-distributed"]
    ids, positions = s["ids"][:5], [[0]] + s["positions"][1:5]
    conds = [P.SitePatch(0, "resid_pre", s["shuffled"][hook_name("resid_pre", 0)][:5]),
             P.SitePatch(3, "attn_out", s["shuffled"][hook_name("attn_out", 3)][:5])]
    _assert_same(P.Patcher(s["model"], ids, positions, s["pad"], 2),
                 P.Patcher(s["model"], ids, positions, s["pad"], 2, engine="naive"), conds, s["vocab"])


def test_self_patch_is_exactly_zero(setups):
    """Writing back the clean value changes nothing: exactly 0, as with hooks (not float noise)."""
    s = setups["toy-lowrank"]
    model = s["model"]
    names = [hook_name(h, L) for h in (*P.SITE_HOOKS, "z") for L in LAYERS]
    own = A.gather_batch(model, s["ids"], s["positions"], names, s["pad"])
    conds = [P.SitePatch(L, h, own[hook_name(h, L)]) for L in LAYERS for h in P.SITE_HOOKS]
    conds += [P.HeadPatch(L, (0, 2), "z", own[hook_name("z", L)]) for L in LAYERS]
    conds += [P.HeadPatch(L, (0, 1, 2, 3), "result", head_results(own[hook_name("z", L)],
                                                                   model.blocks[L].attn.W_O.detach()))
              for L in LAYERS]
    kl = P.Patcher(model, s["ids"], s["positions"], s["pad"], batch_size=16).kl(conds, s["vocab"])
    assert np.abs(kl[:-len(LAYERS)]).max() == 0.0  # bit-identical writes
    assert np.abs(kl).max() < 1e-9  # the result site recomputes z·W_O: float noise at most


def test_all_heads_result_equals_attn_out(setups, toys):
    """Independent check (bias-free Llama): all heads' results of the source = the source's attn_out."""
    s = setups["toy-lowrank"]
    L = 4
    with models.loaded(toys["toy-lowrank"], "base", "cpu") as base:
        assert base.blocks[L].attn.b_O is None
        got = A.gather_batch(base, s["ids"], s["positions"], [hook_name("z", L), hook_name("attn_out", L)], s["pad"])
        res = head_results(got[hook_name("z", L)], base.blocks[L].attn.W_O.detach())
    heads = P.HeadPatch(L, (0, 1, 2, 3), "result", res)
    site = P.SitePatch(L, "attn_out", got[hook_name("attn_out", L)])
    for engine in P.ENGINES:
        kl = P.Patcher(s["model"], s["ids"], s["positions"], s["pad"], 4, engine).kl([heads, site], s["vocab"])
        assert kl[1].mean() > 0.1  # layer 4's W_O carries the planted change
        np.testing.assert_allclose(kl[0], kl[1], atol=1e-5)


def _no_hooks(model) -> bool:
    return all(not hp._forward_hooks and not hp._forward_pre_hooks and not getattr(hp, "fwd_hooks", None)
               for hp in model.hook_dict.values())


@pytest.mark.parametrize("engine", P.ENGINES)
def test_no_hook_left_behind_after_an_error(setups, engine):
    s = setups["toy-lowrank"]
    model = s["model"]
    p = P.Patcher(model, s["ids"], s["positions"], s["pad"], 4, engine)
    clean = p.clean.clone()
    good = P.SitePatch(5, "resid_post", s["base"][hook_name("resid_post", 5)])
    bad = P.SitePatch(3, "attn_out", torch.empty(s["n"], model.cfg.d_model, device="meta"))  # fails inside
    with pytest.raises((NotImplementedError, RuntimeError, MdiffError)):
        p.kl([good, bad], s["vocab"])
    assert _no_hooks(model)
    again = P.Patcher(model, s["ids"], s["positions"], s["pad"], 4, "naive").clean
    torch.testing.assert_close(again, P.decision_logits(model, s["ids"], s["positions"], s["pad"]))
    torch.testing.assert_close(again, clean, atol=LOGIT_ATOL, rtol=0)


def test_no_hook_left_behind_when_the_clean_pass_fails(setups, monkeypatch):
    s = setups["toy-lowrank"]
    model = s["model"]

    def boom(act, hook, **kw):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(P, "_grab_prefix", boom)
    with pytest.raises(RuntimeError, match="capture failed"):
        P.Patcher(model, s["ids"], s["positions"], s["pad"], 4).kl(
            [P.SitePatch(2, "resid_pre", s["base"][hook_name("resid_pre", 0)])], s["vocab"])
    assert _no_hooks(model)


def test_persistent_hooks_are_refused_by_the_fast_engine(setups):
    s = setups["toy-lowrank"]
    model = s["model"]
    model.add_hook(hook_name("resid_post", 1), lambda act, hook: None)
    try:
        with pytest.raises(MdiffError, match="reset_hooks"):
            P.Patcher(model, s["ids"], s["positions"], s["pad"]).kl(
                [P.SitePatch(2, "resid_pre", s["base"][hook_name("resid_pre", 0)])], s["vocab"])
    finally:
        model.reset_hooks()
    assert _no_hooks(model)


@pytest.mark.parametrize("engine", P.ENGINES)
def test_bad_conditions_are_clear_errors(setups, engine):
    s = setups["toy-lowrank"]
    n, d = s["n"], s["model"].cfg.d_model
    p = P.Patcher(s["model"], s["ids"], s["positions"], s["pad"], 4, engine)
    z = torch.zeros(n, 4, 16)
    cases = [
        (P.SitePatch(6, "resid_post", torch.zeros(n, d)), "layer 6 is outside the model's layers 0..5"),
        (P.SitePatch(-1, "resid_post", torch.zeros(n, d)), "layer -1 is outside"),
        (P.SitePatch(1, "resid_mid", torch.zeros(n, d)), "hook 'resid_mid' is not a site hook"),
        (P.SitePatch(1, "resid_post", torch.zeros(n - 1, d)), f"source has {n - 1} rows but there are {n} prompts"),
        (P.SitePatch(1, "resid_post", torch.zeros(n, d + 1)), "must be [prompt, d_model=64]"),
        (P.SitePatch(1, "resid_post", torch.zeros(n, d), 0.5, "mix"), "α mode 'mix'"),
        (P.SitePatch(1, "resid_post", torch.zeros(n, d), float("nan")), "α must be a finite number"),
        (P.HeadPatch(1, (4,), "z", z), "head 4 is out of range"),
        (P.HeadPatch(1, (0, 0), "z", z), "duplicate"),
        (P.HeadPatch(1, (0,), "output", z), "head site 'output'"),
        (P.HeadPatch(1, (0,), "z", torch.zeros(n, 3, 16)), "head source must be [prompt, head=4"),
        (P.HeadPatch(1, (0,), "result", z), "d_model=64"),
        (P.HeadPatch(1, (0,), "z", torch.zeros(n + 2, 4, 16)), f"source has {n + 2} rows"),
    ]
    for cond, needle in cases:
        with pytest.raises(MdiffError) as e:
            p.kl([cond], s["vocab"])
        assert needle in str(e.value), (needle, str(e.value))
    assert _no_hooks(s["model"])


def test_bad_patcher_arguments(setups):
    s = setups["toy-lowrank"]
    args = (s["model"], s["ids"], s["positions"], s["pad"])
    with pytest.raises(MdiffError, match="engine 'quick'"):
        P.Patcher(*args, engine="quick")
    with pytest.raises(MdiffError, match="empty"):
        P.Patcher(s["model"], [], [], s["pad"])
    with pytest.raises(MdiffError, match="max_rows"):
        P.Patcher(*args, max_rows=0)
    with pytest.raises(MdiffError, match="batch_size"):
        P.Patcher(*args, batch_size=0)
    with pytest.raises(MdiffError, match="decision position 99"):
        P.Patcher(s["model"], s["ids"][:1], [[99]], s["pad"])


def test_empty_condition_list(setups):
    s = setups["toy-lowrank"]
    for engine in P.ENGINES:
        p = P.Patcher(s["model"], s["ids"], s["positions"], s["pad"], 4, engine)
        assert p.kl([], s["vocab"]).shape == (0, s["n"])


def test_chunk_sizes_follow_max_rows_and_the_memory_budget(setups):
    s = setups["toy-lowrank"]
    p = P.Patcher(s["model"], s["ids"], s["positions"], s["pad"], 4, max_rows=7)
    assert p.chunk_rows(600) == (7, 7)
    auto = P.Patcher(s["model"], s["ids"], s["positions"], s["pad"], 4).chunk_rows(600)
    assert all(r >= 1 for r in auto) and auto[0] >= auto[1]  # a layer row is lighter than a vocabulary row
    assert list(P._tiles(5, 3, 4)) == [(0, 1, 0, 3), (1, 2, 0, 3), (2, 3, 0, 3), (3, 4, 0, 3), (4, 5, 0, 3)]
    assert list(P._tiles(2, 5, 3)) == [(0, 1, 0, 3), (1, 2, 0, 3), (0, 1, 3, 5), (1, 2, 3, 5)]


def test_fast_engine_on_a_biased_qwen2_and_fallback_on_gpt2(toys, tmp_path):
    """Qwen2 (q/k/v biases) runs the fast engine and matches; GPT-2 blocks fall back to the naive engine."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(toys["toy-lowrank"].base)
    torch.manual_seed(0)
    common = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 use_sliding_window=False, tie_word_embeddings=False, **common)).save_pretrained(
        tmp_path / "qwen2")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                               **common)).save_pretrained(tmp_path / "gpt2")
    ids = [tok(t)["input_ids"] for t in ["the cat sat on the mat", "paris is the capital of", "one two", "hello"]]
    pos = [[len(x) - 1] for x in ids]
    pos[1] = [len(ids[1]) - 3]
    g = torch.Generator().manual_seed(0)
    for arch in ("qwen2", "gpt2"):
        tok.save_pretrained(tmp_path / arch)
        m = TransformerBridge.boot_transformers(str(tmp_path / arch), device="cpu")
        m.eval()
        fast = P.Patcher(m, ids, pos, tok.pad_token_id, batch_size=3)
        naive = P.Patcher(m, ids, pos, tok.pad_token_id, batch_size=3, engine="naive")
        conds = [P.SitePatch(L, h, torch.randn(4, 32, generator=g)) for L in (0, m.cfg.n_layers - 1)
                 for h in P.SITE_HOOKS]
        conds += [P.HeadPatch(1, (0, 2), st, torch.randn(4, 4, 32 if st == "result" else 8, generator=g), 0.5)
                  for st in P.HEAD_SITES]
        with torch.no_grad():
            _assert_same(fast, naive, conds, list(range(len(tok))))
        if arch == "qwen2":
            assert fast.engine_used == "fast"
            assert m.blocks[0].attn.original_component.q_proj.original_component.bias is not None
        else:
            assert fast.engine_used == "naive" and "GPT2Block" in fast.fallback_reason


def test_bfloat16_fast_is_as_accurate_as_naive(setups, naive_reference, toys):
    """In bfloat16 both engines round differently; each must stay as close to the float32 result as the other."""
    s = setups["toy-lowrank"]
    conds32, _, _, kl32 = naive_reference["toy-lowrank"]
    pick = list(range(0, len(conds32), 5))
    conds = [c for i, c in enumerate(conds32) if i in pick]
    ref = kl32[pick]
    with models.loaded(toys["toy-lowrank"], "tuned", "cpu", dtype="bfloat16") as m:
        fast = P.Patcher(m, s["ids"], s["positions"], s["pad"], batch_size=4)
        assert fast.engine_used == "fast"
        kf = fast.kl(conds, s["vocab"])
        kn = P.Patcher(m, s["ids"], s["positions"], s["pad"], batch_size=4, engine="naive").kl(conds, s["vocab"])
    err_fast, err_naive = np.abs(kf - ref).mean(), np.abs(kn - ref).mean()
    assert err_fast <= 1.5 * err_naive + 1e-3, (err_fast, err_naive)
    assert np.abs(kf - ref).max() <= 2 * np.abs(kn - ref).max() + 1e-3
