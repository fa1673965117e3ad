"""Tests for mdiff.hooks on tiny HF Llama models loaded through TransformerBridge.boot_transformers.

Three models share one architecture (3 layers, d_model 32, 4 query heads, 2 KV heads, so GQA):
``base``; ``ft``, a copy with every weight perturbed (o_proj included); and ``wo``, a copy of base
whose only change is layer-1 o_proj columns of head 2 (a difference planted purely in W_O).
"""

import functools
import types

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mdiff.errors import MdiffError
from mdiff.hooks import (
    HOOKS,
    capture_hook,
    check_heads,
    head_result_patch,
    head_results,
    head_z_hook,
    hook_name,
    map_hook,
    parse_hooks,
    replace_hook,
    scale_hook,
    split_hook_name,
)

# With runtime shape checking on (pytest --jaxtyping-packages=mdiff,beartype.beartype) the checker
# rejects some bad inputs before mdiff's own checks run; accept its error then, without the message.
_TYPE_CHECKED = hasattr(hook_name, "__wrapped__")


def _bad(match: str):
    """pytest.raises for a bad input: MdiffError with `match`, or the runtime type checker's error."""
    if _TYPE_CHECKED:
        from jaxtyping import TypeCheckError

        return pytest.raises((MdiffError, TypeCheckError))
    return pytest.raises(MdiffError, match=match)


VOCAB, D_MODEL, N_LAYERS, N_HEADS, N_KV, D_HEAD = 100, 32, 3, 4, 2, 8
BATCH, SEQ = 3, 8
ATOL = 1e-5
PLANTED_LAYER, PLANTED_HEAD = 1, 2


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer (boot_transformers insists on loading one from the model dir)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3} | {f"w{i}": i for i in range(4, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _save(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, path) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bridges(tmp_path_factory):
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(1234)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    base = LlamaForCausalLM(cfg).eval()
    ft = LlamaForCausalLM(cfg).eval()
    ft.load_state_dict(base.state_dict())
    wo = LlamaForCausalLM(cfg).eval()
    wo.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
        for layer in ft.model.layers:  # a clearly different o_proj in every layer
            layer.self_attn.o_proj.weight.add_(0.2 * torch.randn_like(layer.self_attn.o_proj.weight))
        cols = slice(PLANTED_HEAD * D_HEAD, (PLANTED_HEAD + 1) * D_HEAD)
        w = wo.model.layers[PLANTED_LAYER].self_attn.o_proj.weight  # [d_model, n_heads * d_head]
        w[:, cols] = 0.5 * torch.randn_like(w[:, cols])
    tok = _tokenizer()
    root = tmp_path_factory.mktemp("tiny_llama")
    out = {}
    for name, model in (("base", base), ("ft", ft), ("wo", wo)):
        out[name] = TransformerBridge.boot_transformers(_save(model, tok, root / name), device="cpu")
        out[name].eval()
    return types.SimpleNamespace(**out)


@pytest.fixture(scope="module")
def toks():
    g = torch.Generator().manual_seed(7)
    return torch.randint(4, VOCAB, (BATCH, SEQ), generator=g)


def _run(model, toks, fwd_hooks=()):
    with torch.no_grad():
        return model.run_with_hooks(toks, fwd_hooks=list(fwd_hooks))


def _cache(model, toks, names):
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks, names_filter=list(names))
    return logits, {n: cache[n] for n in names}


def _assert_no_hooks(model):
    hps = list(model.hook_dict.values())
    assert all(len(hp.fwd_hooks) == 0 for hp in hps)
    assert all(len(hp.bwd_hooks) == 0 for hp in hps)
    assert all(len(hp._forward_hooks) == 0 for hp in hps)  # nothing left at the torch level either


def _close(a, b, atol=ATOL):
    return torch.allclose(a, b, atol=atol, rtol=0)


def _rows_cols(positions):
    """(rows, cols) index pair for a [batch] or [batch, k] positions tensor."""
    pos = positions.reshape(positions.shape[0], -1)
    return torch.arange(pos.shape[0]).unsqueeze(1), pos


def _all_names(layer):
    return [hook_name(h, layer) for h in ("resid_post", "attn_out", "mlp_out", "z")]


# ---------------------------------------------------------------------------------------------
# names, layers, heads
# ---------------------------------------------------------------------------------------------


def test_hook_name_resolution(bridges):
    expected = {
        "resid_pre": "blocks.2.hook_resid_pre",
        "resid_post": "blocks.2.hook_resid_post",
        "attn_out": "blocks.2.hook_attn_out",
        "mlp_out": "blocks.2.hook_mlp_out",
        "z": "blocks.2.attn.hook_z",
        "result": "blocks.2.attn.hook_result",
    }
    assert set(expected) == set(HOOKS)
    for short, full in expected.items():
        assert hook_name(short, 2, n_layers=N_LAYERS) == full
        assert hook_name(full) == full  # already full
        assert hook_name(full, 2, N_LAYERS) == full
        assert full in bridges.base.hook_dict
        assert split_hook_name(full) == (short, 2)
    # canonical bridge names (what hook.name shows inside a hook) resolve to the aliases
    assert hook_name("blocks.1.hook_out") == "blocks.1.hook_resid_post"
    assert hook_name("blocks.1.attn.o.hook_in") == "blocks.1.attn.hook_z"
    assert hook_name(" resid_pre ", 0) == "blocks.0.hook_resid_pre"


def test_hook_name_inside_hook_is_canonical_and_parses(bridges, toks):
    seen = []
    _run(
        bridges.base,
        toks,
        [(hook_name("resid_post", 1), lambda a, hook: seen.append(hook.name))],
    )
    assert seen == ["blocks.1.hook_out"]  # TL 4.3: canonical, not the alias registered
    assert split_hook_name(seen[0]) == ("resid_post", 1)


def test_hook_name_errors():
    with _bad(r"unknown hook 'resid_mid'.*resid_pre, resid_post, attn_out, mlp_out, z, result"):
        hook_name("resid_mid", 0)
    with _bad(r"unknown hook name 'blocks.0.hook_foo'"):
        hook_name("blocks.0.hook_foo")
    with _bad(r"layer 3 is out of range: the model has 3 layers, so use 0\.\.2"):
        hook_name("resid_post", 3, n_layers=3)
    with _bad(r"0\.\.2"):
        hook_name("blocks.5.hook_resid_post", n_layers=3)
    with _bad("negative"):
        hook_name("z", -1)
    with _bad("needs a layer"):
        hook_name("z")
    with _bad("at layer 1 but layer=2"):
        hook_name("blocks.1.hook_resid_post", 2)
    with _bad("integer"):
        hook_name("z", 1.0)


def test_check_heads_and_parse_hooks():
    assert check_heads(2, 4) == (2,)
    assert check_heads([0, 3], 4) == (0, 3)
    assert check_heads(torch.tensor([1, 2]), 4) == (1, 2)
    with _bad(r"head 4 is out of range: the layer has 4 query heads, so use 0\.\.3"):
        check_heads([1, 4], 4)
    with _bad(r"0\.\.3"):
        check_heads(-1, 4)
    with _bad("duplicates"):
        check_heads([1, 1], 4)
    with _bad("empty"):
        check_heads([], 4)
    assert parse_hooks("resid_post,attn_out") == ("resid_post", "attn_out")
    assert parse_hooks(" z , result,z,") == ("z", "result")
    assert parse_hooks(["mlp_out"]) == ("mlp_out",)
    with _bad(r"unknown hook 'resid'.*resid_pre"):
        parse_hooks("resid_post,resid")
    with _bad("no hooks"):
        parse_hooks(" , ")


def test_hooks_are_partials_with_readable_reprs():
    src = torch.zeros(BATCH, SEQ, D_MODEL)
    fn = replace_hook(src, positions=torch.tensor([1, 2, 3]), alpha=0.5)
    assert isinstance(fn, functools.partial)
    text = repr(fn)
    assert "_patch_site" in text and "Tensor[3, 8, 32] float32" in text and "alpha=0.5" in text
    assert "[1, 2, 3]" in text and len(text) < 200
    pair = head_result_patch(
        1, torch.zeros(BATCH, SEQ, N_HEADS, D_MODEL), [0], torch.zeros(N_HEADS, D_HEAD, D_MODEL)
    )
    assert [n for n, _ in pair] == ["blocks.1.attn.hook_z", "blocks.1.hook_attn_out"]
    assert "_ZCapture(empty)" in repr(pair[1][1])


# ---------------------------------------------------------------------------------------------
# self-patching and cross-model references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("site", ["resid_post", "attn_out", "mlp_out", "z", "result"])
def test_self_patch_leaves_logits_unchanged(bridges, toks, site):
    base = bridges.base
    names = [hook_name("z" if site == "result" else site, layer) for layer in range(N_LAYERS)]
    clean, cache = _cache(base, toks, names)
    hooks = []
    for layer, name in enumerate(names):
        src = cache[name]
        if site == "z":
            hooks.append((name, head_z_hook(src, range(N_HEADS))))
        elif site == "result":
            W_O = base.blocks[layer].attn.W_O
            hooks += head_result_patch(layer, head_results(src, W_O), range(N_HEADS), W_O)
        else:
            hooks.append((name, replace_hook(src)))
    assert _close(_run(base, toks, hooks), clean)
    # the same at gathered positions, one per row
    pos = torch.tensor([SEQ - 1, 3, 0])
    rows, cols = _rows_cols(pos)
    hooks = []
    for layer, name in enumerate(names):
        src = cache[name][rows[:, 0], cols[:, 0]]
        if site == "z":
            hooks.append((name, head_z_hook(src, [0, 3], positions=pos)))
        elif site == "result":
            W_O = base.blocks[layer].attn.W_O
            hooks += head_result_patch(layer, head_results(src, W_O), [1, 2], W_O, positions=pos)
        else:
            hooks.append((name, replace_hook(src, positions=pos)))
    assert _close(_run(base, toks, hooks), clean)
    _assert_no_hooks(base)


def test_last_layer_resid_patch_equals_unembedding_source(bridges, toks):
    base, ft = bridges.base, bridges.ft
    name = hook_name("resid_post", N_LAYERS - 1)
    clean, _ = _cache(base, toks, [name])
    _, src = _cache(ft, toks, [name])
    patched = _run(base, toks, [(name, replace_hook(src[name], positions=-1))])
    with torch.no_grad():
        expected = base.unembed(base.ln_final(src[name][:, -1:]))[:, 0]
    assert _close(patched[:, -1], expected)
    assert _close(patched[:, :-1], clean[:, :-1], atol=1e-6)
    assert (patched[:, -1] - clean[:, -1]).abs().max() > 1e-2


def test_cross_patch_matches_transformer_lens_patching(bridges, toks):
    """Against transformer_lens.patching on the bridge: resid (by layer, pos) and head z (by pos, head)."""
    from transformer_lens import patching

    base, ft = bridges.base, bridges.ft
    layer, p, head = 1, 5, 3
    _, ft_cache = ft.run_with_cache(toks)
    seen = []

    def metric(logits):
        seen.append(logits.detach().clone())
        return logits.sum()

    # resid_post at layer L is resid_pre at layer L + 1
    patching.get_act_patch_resid_pre(
        base,
        toks,
        ft_cache,
        metric,
        index_axis_names=None,
        index_df=pd.DataFrame({"layer": [layer + 1], "pos": [p]}),
    )
    rp = hook_name("resid_post", layer)
    ours = _run(base, toks, [(rp, replace_hook(ft_cache[rp], positions=p))])
    assert len(seen) == 1 and _close(ours, seen[0])

    seen.clear()
    patching.get_act_patch_attn_head_out_by_pos(
        base,
        toks,
        ft_cache,
        metric,
        index_axis_names=None,
        index_df=pd.DataFrame({"layer": [layer], "pos": [p], "head": [head]}),
    )
    zn = hook_name("z", layer)
    ours = _run(base, toks, [(zn, head_z_hook(ft_cache[zn], head, positions=torch.full((BATCH,), p)))])
    assert len(seen) == 1 and _close(ours, seen[0])
    assert (ours - base(toks)).abs().max() > 1e-3  # a real change, not a no-op
    _assert_no_hooks(base)


def test_head_results_match_hook_result(bridges, toks):
    """head_results(z, W_O) against TL's own hook_result (set_use_attn_result), and Σ_h = attn_out."""
    ft = bridges.ft
    layer = 2
    names = [hook_name("z", layer), hook_name("result", layer), hook_name("attn_out", layer)]
    ft.set_use_attn_result(True)
    try:
        _, c = _cache(ft, toks, names)
    finally:
        ft.set_use_attn_result(False)
    z, res, out = c[names[0]], c[names[1]], c[names[2]]
    ours = head_results(z, ft.blocks[layer].attn.W_O)
    assert ours.shape == (BATCH, SEQ, N_HEADS, D_MODEL)
    assert _close(ours, res, atol=1e-6)
    assert _close(ours.sum(2), out)  # b_O is None on Llama
    assert _close(head_results(z[:, 3], ft.blocks[layer].attn.W_O), res[:, 3], atol=1e-6)  # gathered z


# ---------------------------------------------------------------------------------------------
# α modes and maps
# ---------------------------------------------------------------------------------------------


def _patched_act(model, toks, name, fn):
    """Logits and the activation at `name` after `fn` ran (a capture registered after it)."""
    store = {}
    logits = _run(model, toks, [(name, fn), (name, capture_hook(store, "x"))])
    return logits, store["x"]


def test_blend_alpha(bridges, toks):
    base, ft = bridges.base, bridges.ft
    layer = 1
    name = hook_name("resid_post", layer)
    clean, cb = _cache(base, toks, [name])
    _, cf = _cache(ft, toks, [name])
    h, s = cb[name], cf[name]
    pos = torch.tensor([[1, 6], [0, 7], [2, 3]])
    rows, cols = _rows_cols(pos)

    # α = 0: unchanged, exactly
    logits, act = _patched_act(base, toks, name, replace_hook(s, positions=pos, alpha=0.0))
    assert torch.equal(act, h) and _close(logits, clean, atol=1e-6)

    # α = 1 with blend equals plain replacement (set by hand with an independent hook)
    manual = h.clone()
    manual[rows, cols] = s[rows, cols]
    ref = _run(base, toks, [(name, lambda a, hook: manual)])
    logits, act = _patched_act(base, toks, name, replace_hook(s, positions=pos))
    assert torch.equal(act, manual) and _close(logits, ref)
    # and a source already gathered at the positions gives the same
    logits_g = _run(base, toks, [(name, replace_hook(s[rows, cols], positions=pos, alpha=1.0))])
    assert _close(logits_g, ref, atol=1e-6)

    # intermediate α equals (1 − α)·h + α·s at the positions, h elsewhere
    a = 0.3
    manual = h.clone()
    manual[rows, cols] = (1 - a) * h[rows, cols] + a * s[rows, cols]
    ref = _run(base, toks, [(name, lambda x, hook: manual)])
    logits, act = _patched_act(base, toks, name, replace_hook(s, positions=pos, alpha=a))
    assert _close(act, manual, atol=1e-6) and _close(logits, ref)
    assert not _close(logits, clean, atol=1e-3)

    # α over all positions
    _, act = _patched_act(base, toks, name, replace_hook(s, alpha=a))
    assert _close(act, (1 - a) * h + a * s, atol=1e-6)


def test_scale_mode(bridges, toks):
    base, ft = bridges.base, bridges.ft
    name = hook_name("mlp_out", 0)
    _, cb = _cache(base, toks, [name])
    _, cf = _cache(ft, toks, [name])
    h, s = cb[name], cf[name]
    pos = torch.tensor([4, 2, 7])
    rows, cols = _rows_cols(pos)
    manual = h.clone()
    manual[rows, cols] = 0.5 * s[rows, cols]
    ref = _run(base, toks, [(name, lambda x, hook: manual)])
    logits, act = _patched_act(base, toks, name, scale_hook(s, positions=pos, alpha=0.5))
    assert _close(act, manual, atol=1e-7) and _close(logits, ref)
    # scale at α = 1 is replacement; with all positions h = α·s everywhere
    _, act = _patched_act(base, toks, name, scale_hook(s, alpha=1.0))
    assert torch.equal(act, s)
    _, act = _patched_act(base, toks, name, scale_hook(s, alpha=2.0))
    assert _close(act, 2.0 * s, atol=1e-7)


class _Fitted:
    """A scikit-learn-style fitted map: y = x @ W_ + b_ (numpy arrays, as an estimator would store)."""

    def __init__(self, W, b=None):
        self.W_ = W
        if b is not None:
            self.b_ = b


def test_map_hook(bridges, toks):
    base, ft = bridges.base, bridges.ft
    name = hook_name("resid_post", 0)
    _, cb = _cache(base, toks, [name])
    _, cf = _cache(ft, toks, [name])
    h, s = cb[name], cf[name]
    pos = torch.tensor([[2, 5], [1, 7], [0, 4]])
    rows, cols = _rows_cols(pos)

    identity = _Fitted(np.eye(D_MODEL, dtype=np.float32), np.zeros(D_MODEL, dtype=np.float32))
    assert _close(
        _run(base, toks, [(name, map_hook(s, identity, positions=pos))]),
        _run(base, toks, [(name, replace_hook(s, positions=pos))]),
        atol=1e-6,
    )

    g = torch.Generator().manual_seed(3)
    W = torch.randn(D_MODEL, D_MODEL, generator=g) / D_MODEL**0.5
    b = torch.randn(D_MODEL, generator=g)
    mapped = s @ W + b
    manual = h.clone()
    manual[rows, cols] = mapped[rows, cols]
    ref = _run(base, toks, [(name, lambda x, hook: manual)])
    for lin in (_Fitted(W.numpy(), b.numpy()), _Fitted(W, b), lambda x: x @ W + b):
        logits, act = _patched_act(base, toks, name, map_hook(s, lin, positions=pos))
        assert _close(act, manual) and _close(logits, ref)
    # no intercept, scale mode, all positions
    _, act = _patched_act(base, toks, name, map_hook(s, _Fitted(W), alpha=0.5, mode="scale"))
    assert _close(act, 0.5 * (s @ W))
    # blend mode at α = 0.25 on a gathered source
    _, act = _patched_act(base, toks, name, map_hook(s[rows, cols], _Fitted(W, b), positions=pos, alpha=0.25))
    manual = h.clone()
    manual[rows, cols] = 0.75 * h[rows, cols] + 0.25 * mapped[rows, cols]
    assert _close(act, manual)
    assert not _close(act, h, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# per-head sites
# ---------------------------------------------------------------------------------------------


def test_z_patch_changes_attn_out_by_delta_z_times_W_O(bridges, toks):
    base, ft = bridges.base, bridges.ft
    layer = 1
    zn, an = hook_name("z", layer), hook_name("attn_out", layer)
    _, cb = _cache(base, toks, [zn, an])
    _, cf = _cache(ft, toks, [zn])
    W_O = base.blocks[layer].attn.W_O  # [head, d_head, d_model]
    for heads in ([2], [0, 3]):
        # TL's own run_with_cache inside the patched run records the patched z and attn_out
        with torch.no_grad(), base.hooks(fwd_hooks=[(zn, head_z_hook(cf[zn], heads))]):
            _, c = base.run_with_cache(toks, names_filter=[zn, an])
        others = [h for h in range(N_HEADS) if h not in heads]
        assert torch.equal(c[zn][:, :, heads], cf[zn][:, :, heads])
        assert torch.equal(c[zn][:, :, others], cb[zn][:, :, others])
        delta = c[an] - cb[an]
        expected = sum((cf[zn][:, :, h] - cb[zn][:, :, h]) @ W_O[h] for h in heads)
        assert _close(delta, expected)
        assert expected.abs().max() > 1e-2
    _assert_no_hooks(base)


def test_result_patch_all_heads_equals_attn_out_patch(bridges, toks):
    base, ft = bridges.base, bridges.ft
    layer = 1
    zn, an = hook_name("z", layer), hook_name("attn_out", layer)
    _, cf = _cache(ft, toks, [zn, an])
    res = head_results(cf[zn], ft.blocks[layer].attn.W_O)
    ref = _run(base, toks, [(an, replace_hook(cf[an]))])
    store = {}
    hooks = head_result_patch(layer, res, range(N_HEADS), base.blocks[layer].attn.W_O, n_layers=N_LAYERS)
    ours = _run(base, toks, hooks + [(an, capture_hook(store, "attn_out"))])
    assert _close(store["attn_out"], cf[an])
    assert _close(ours, ref)
    assert not _close(ours, base(toks), atol=1e-3)


def test_result_patch_with_target_W_O_equals_z_patch(bridges, toks):
    base, ft = bridges.base, bridges.ft
    layer = 2
    zn = hook_name("z", layer)
    _, cf = _cache(ft, toks, [zn])
    pos = torch.tensor([[3, 7], [5, 6], [0, 7]])
    rows, cols = _rows_cols(pos)
    W_t = base.blocks[layer].attn.W_O
    z_patch = _run(base, toks, [(zn, head_z_hook(cf[zn], [1, 2], positions=pos))])
    for src in (cf[zn], cf[zn][rows, cols]):  # full length and gathered
        result_patch = _run(
            base, toks, head_result_patch(layer, head_results(src, W_t), [1, 2], W_t, positions=pos)
        )
        assert _close(result_patch, z_patch)
    assert not _close(z_patch, base(toks), atol=1e-3)


def test_result_patch_blend_alpha_at_positions(bridges, toks):
    base, ft = bridges.base, bridges.ft
    layer, heads, a = 0, [0, 3], 0.4
    zn, an = hook_name("z", layer), hook_name("attn_out", layer)
    _, cb = _cache(base, toks, [zn, an])
    _, cf = _cache(ft, toks, [zn])
    W_t, W_s = base.blocks[layer].attn.W_O, ft.blocks[layer].attn.W_O
    pos = torch.tensor([6, 1, 3])
    rows, cols = _rows_cols(pos)
    manual = cb[an].clone()
    for h in heads:
        r_t = cb[zn][:, :, h] @ W_t[h]
        r_s = cf[zn][:, :, h] @ W_s[h]
        manual[rows, cols] += a * (r_s - r_t)[rows, cols]
    store = {}
    hooks = head_result_patch(layer, head_results(cf[zn], W_s), heads, W_t, positions=pos, alpha=a)
    _run(base, toks, hooks + [(an, capture_hook(store, "attn_out"))])
    assert _close(store["attn_out"], manual)
    # scale mode: new_h = α·r_s
    manual = cb[an].clone()
    for h in heads:
        manual[rows, cols] += (a * (cf[zn][:, :, h] @ W_s[h]) - cb[zn][:, :, h] @ W_t[h])[rows, cols]
    store = {}
    hooks = head_result_patch(
        layer, head_results(cf[zn], W_s), heads, W_t, positions=pos, alpha=a, mode="scale"
    )
    _run(base, toks, hooks + [(an, capture_hook(store, "attn_out"))])
    assert _close(store["attn_out"], manual)


def test_W_O_only_difference_seen_by_result_blind_to_z(bridges, toks):
    base, wo = bridges.base, bridges.wo
    layer = PLANTED_LAYER
    zn = hook_name("z", layer)
    clean_base, cb = _cache(base, toks, [zn])
    clean_wo, cw = _cache(wo, toks, [zn])
    assert _close(cw[zn], cb[zn], atol=1e-6)  # upstream of W_O nothing changed
    assert not _close(clean_wo, clean_base, atol=1e-2)  # but the models differ

    z_site = _run(base, toks, [(zn, head_z_hook(cw[zn], range(N_HEADS)))])
    assert _close(z_site, clean_base, atol=1e-6)  # the z site is blind to a W_O-only change

    res = head_results(cw[zn], wo.blocks[layer].attn.W_O)
    W_t = base.blocks[layer].attn.W_O
    result_site = _run(base, toks, head_result_patch(layer, res, [PLANTED_HEAD], W_t))
    assert not _close(result_site, clean_base, atol=1e-2)  # the result site sees it ...
    assert _close(result_site, clean_wo)  # ... and patching that head reproduces the tuned model
    other = _run(base, toks, head_result_patch(layer, res, [0, 1, 3], W_t))
    assert _close(other, clean_base)  # heads without the planted change: no effect


# ---------------------------------------------------------------------------------------------
# positions
# ---------------------------------------------------------------------------------------------


def test_positions_causality_and_per_row(bridges, toks):
    base, ft = bridges.base, bridges.ft
    name = hook_name("resid_post", 0)
    clean, cb = _cache(base, toks, [name])
    _, cf = _cache(ft, toks, [name])
    p = 4
    logits = _run(base, toks, [(name, replace_hook(cf[name], positions=p))])
    assert _close(logits[:, :p], clean[:, :p], atol=1e-6)  # earlier positions cannot see the patch
    assert (logits[:, p] - clean[:, p]).abs().amax(-1).min() > 1e-3

    per_row = torch.tensor([2, 5, 7])
    logits, act = _patched_act(base, toks, name, replace_hook(cf[name], positions=per_row))
    for i, q in enumerate(per_row.tolist()):
        assert _close(logits[i, :q], clean[i, :q], atol=1e-6)
        assert (logits[i, q] - clean[i, q]).abs().max() > 1e-3
        assert torch.equal(act[i, q], cf[name][i, q])
        keep = [j for j in range(SEQ) if j != q]
        assert torch.equal(act[i, keep], cb[name][i, keep])

    # negative positions count from the end; an int means "this position in every row"
    a = _run(base, toks, [(name, replace_hook(cf[name], positions=-1))])
    b = _run(base, toks, [(name, replace_hook(cf[name], positions=torch.full((BATCH,), SEQ - 1)))])
    c = _run(base, toks, [(name, replace_hook(cf[name][:, SEQ - 1], positions=SEQ - 1))])
    assert _close(a, b, atol=0) and _close(a, c, atol=0)

    # capture_hook gathers at positions and can move to a device
    store = {}
    _run(base, toks, [(name, capture_hook(store, "g", positions=per_row, device="cpu"))])
    assert torch.equal(store["g"], cb[name][torch.arange(BATCH), per_row])
    _assert_no_hooks(base)


# ---------------------------------------------------------------------------------------------
# hook lifecycle
# ---------------------------------------------------------------------------------------------


class _Boom(RuntimeError):
    pass


def _raise(act, hook):
    raise _Boom("raised inside a hook")


def test_no_hook_left_behind(bridges, toks):
    base, ft = bridges.base, bridges.ft
    layer = 1
    _, cf = _cache(ft, toks, _all_names(layer))
    W_t = base.blocks[layer].attn.W_O
    res = head_results(cf[hook_name("z", layer)], ft.blocks[layer].attn.W_O)

    def make():
        result_pair = head_result_patch(layer, res, [0, 2], W_t)
        hooks = [
            (
                hook_name("resid_post", layer),
                replace_hook(cf[hook_name("resid_post", layer)], positions=3, alpha=0.5),
            ),
            (hook_name("z", layer), head_z_hook(cf[hook_name("z", layer)], [1])),
            (hook_name("mlp_out", layer), capture_hook({}, "m")),
            *result_pair,
        ]
        return hooks, result_pair[0][1].keywords["capture"]

    hooks, capture = make()
    _run(base, toks, hooks)
    _assert_no_hooks(base)
    assert capture.z is None

    # an exception raised by a hook later in the forward
    hooks, capture = make()
    with pytest.raises(_Boom):
        _run(base, toks, hooks + [(hook_name("resid_post", N_LAYERS - 1), _raise)])
    _assert_no_hooks(base)
    assert capture.z is None

    # the same through the hooks() context manager
    hooks, capture = make()
    with (
        pytest.raises(_Boom),
        torch.no_grad(),
        base.hooks(fwd_hooks=hooks + [(hook_name("mlp_out", 2), _raise)]),
    ):
        base(toks)
    _assert_no_hooks(base)
    assert capture.z is None

    # an MdiffError raised by our own hook (bad source shape)
    with _bad("feature shape"):
        _run(base, toks, [(hook_name("resid_post", 0), replace_hook(torch.zeros(BATCH, SEQ, D_MODEL + 1)))])
    _assert_no_hooks(base)


def test_result_capture_cannot_leak_into_a_later_run(bridges, toks):
    """A forward aborted between hook_z and hook_attn_out leaves z behind; the next run overwrites it."""
    base, ft = bridges.base, bridges.ft
    layer = 1
    zn, an = hook_name("z", layer), hook_name("attn_out", layer)
    _, cf = _cache(ft, toks, [zn])
    W_t = base.blocks[layer].attn.W_O
    pair = head_result_patch(layer, head_results(cf[zn], ft.blocks[layer].attn.W_O), [3], W_t)
    capture = pair[0][1].keywords["capture"]
    ref = _run(base, toks, pair)
    other = torch.randint(4, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(11))
    with pytest.raises(_Boom):
        _run(base, other, [pair[0], (an, _raise), pair[1]])
    assert capture.z is not None  # the aborted forward's z ...
    assert _close(_run(base, toks, pair), ref, atol=0)  # ... is never used by the next forward
    assert capture.z is None
    capture.clear()
    # the attn_out hook alone (capture missing) is an error, not a silent stale read
    with _bad("no captured hook_z"):
        _run(base, toks, [pair[1]])
    _assert_no_hooks(base)


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------


def _z(*shape):
    return torch.zeros(*shape)


FACTORY_ERRORS = [
    (lambda: replace_hook([1.0, 2.0]), "must be a torch.Tensor"),
    (lambda: replace_hook(torch.zeros(BATCH, SEQ, D_MODEL, dtype=torch.long)), "floating-point"),
    (lambda: replace_hook(_z(D_MODEL)), "at least 2 dims"),
    (lambda: replace_hook(_z(BATCH, SEQ, D_MODEL), positions=torch.tensor([0.5, 1.0, 2.0])), "integer"),
    (
        lambda: replace_hook(_z(BATCH, SEQ, D_MODEL), positions=torch.zeros(BATCH, 1, 1, dtype=torch.long)),
        r"\[batch\] or \[batch, k\]",
    ),
    (lambda: replace_hook(_z(BATCH, SEQ, D_MODEL), alpha="high"), "alpha must be a number"),
    (lambda: replace_hook(_z(BATCH, SEQ, D_MODEL), alpha=float("nan")), "finite"),
    (lambda: map_hook(_z(BATCH, SEQ, D_MODEL), "not a map"), "linear_map must be callable"),
    (lambda: map_hook(_z(BATCH, SEQ, D_MODEL), _Fitted(np.zeros(D_MODEL))), "2-D"),
    (
        lambda: map_hook(_z(BATCH, SEQ, D_MODEL), _Fitted(np.zeros((D_MODEL, D_MODEL)), np.zeros(3))),
        "b_ has shape",
    ),
    (lambda: map_hook(_z(BATCH, SEQ, D_MODEL), lambda x: x, mode="add"), "unknown mode 'add'"),
    (lambda: head_z_hook(_z(BATCH, SEQ, N_HEADS, D_HEAD), [4]), r"head 4 is out of range.*0\.\.3"),
    (
        lambda: head_result_patch(1, _z(BATCH, SEQ, N_HEADS, D_MODEL), [0], _z(N_HEADS, D_MODEL)),
        "at least 3 dims",
    ),
    (
        lambda: head_result_patch(1, _z(BATCH, SEQ, N_HEADS, D_HEAD), [0], _z(N_HEADS, D_HEAD, D_MODEL)),
        "source_result ends in",
    ),
    (
        lambda: head_result_patch(
            5, _z(BATCH, SEQ, N_HEADS, D_MODEL), [0], _z(N_HEADS, D_HEAD, D_MODEL), n_layers=3
        ),
        r"0\.\.2",
    ),
    (lambda: head_results(_z(BATCH, SEQ, N_HEADS, D_HEAD), _z(N_HEADS + 1, D_HEAD, D_MODEL)), "do not fit"),
    (lambda: capture_hook([], "k"), "dict-like"),
]


@pytest.mark.parametrize("make,match", FACTORY_ERRORS)
def test_factory_errors(make, match):
    with _bad(match):
        make()


RUN_ERRORS = [
    # (hook, factory, expected message)
    (
        "resid_post",
        lambda: replace_hook(_z(BATCH, SEQ, D_MODEL + 1)),
        r"feature shape \[33\] but the activation at blocks\.1\.hook_resid_post has \[32\]",
    ),
    (
        "resid_post",
        lambda: replace_hook(_z(BATCH + 1, SEQ, D_MODEL)),
        "with positions=None pass a full-length source",
    ),
    ("resid_post", lambda: replace_hook(_z(BATCH, SEQ - 1, D_MODEL)), "full-length"),
    (
        "attn_out",
        lambda: replace_hook(
            _z(BATCH, 3, D_MODEL), positions=torch.zeros(BATCH, 2, dtype=torch.long) + torch.tensor([0, 1])
        ),
        r"gathered at the positions \[batch, k, \.\.\.\] = \[3, 2\]",
    ),
    (
        "attn_out",
        lambda: replace_hook(_z(BATCH, 2, D_MODEL), positions=torch.tensor([1, 2, 3])),
        r"gathered at the positions \[batch, \.\.\.\]",
    ),
    (
        "mlp_out",
        lambda: replace_hook(_z(BATCH, SEQ, D_MODEL), positions=SEQ),
        r"position 8 is out of range.*0\.\.7",
    ),
    (
        "mlp_out",
        lambda: replace_hook(_z(BATCH, SEQ, D_MODEL), positions=torch.tensor([[1, 1], [0, 2], [3, 4]])),
        "repeat a position",
    ),
    (
        "mlp_out",
        lambda: replace_hook(
            _z(BATCH, SEQ, D_MODEL), positions=torch.tensor([[SEQ - 1, -1], [0, 2], [3, 4]])
        ),
        "repeat a position",
    ),
    (
        "mlp_out",
        lambda: replace_hook(_z(BATCH, SEQ, D_MODEL), positions=torch.tensor([1, 2])),
        "positions has 2 rows but the batch has 3",
    ),
    (
        "resid_post",
        lambda: map_hook(_z(BATCH, SEQ, D_MODEL), _Fitted(np.zeros((D_MODEL, 5), dtype=np.float32))),
        r"mapped source has feature shape \[5\]",
    ),
    (
        "z",
        lambda: head_z_hook(_z(BATCH, SEQ, N_HEADS - 1, D_HEAD), [0]),
        r"source z has feature shape \[3, 8\]",
    ),
    (
        "z",
        lambda: head_z_hook(_z(BATCH, N_HEADS, D_HEAD), [0], positions=torch.tensor([0, 1])),
        "rows but the batch",
    ),
    ("resid_post", lambda: head_z_hook(_z(BATCH, SEQ, N_HEADS, D_HEAD), [0]), r"needs hook_z"),
]


@pytest.mark.parametrize("hook,make,match", RUN_ERRORS)
def test_bad_shapes_raise_inside_run(bridges, toks, hook, make, match):
    base = bridges.base
    with _bad(match):
        _run(base, toks, [(hook_name(hook, 1), make())])
    _assert_no_hooks(base)


def test_result_patch_bad_shapes_raise_inside_run(bridges, toks):
    base = bridges.base
    good_res = _z(BATCH, SEQ, N_HEADS, D_MODEL)
    wrong_W = _z(N_HEADS, D_HEAD + 1, D_MODEL)  # d_head does not match the layer
    with _bad("W_O_target has shape"):
        _run(base, toks, head_result_patch(1, good_res, [0], wrong_W))
    with _bad("full length"):
        _run(
            base,
            toks,
            head_result_patch(
                1, _z(BATCH, SEQ + 2, N_HEADS, D_MODEL), [0], base.blocks[1].attn.W_O, positions=2
            ),
        )
    pair = head_result_patch(1, good_res, [0], base.blocks[1].attn.W_O)
    with _bad("disagree"):  # captured z and attn_out of different batch sizes
        _run(base, toks, [pair[0], (hook_name("attn_out", 2), _swap_batch(pair[1][1]))])
    _assert_no_hooks(base)


def _swap_batch(fn):
    """Feed the result hook an attn_out with a different batch size than the captured z."""

    def wrapped(act, hook):
        return fn(act[:1], hook=hook)

    return wrapped
