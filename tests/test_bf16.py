"""F11: numbers that hold in bf16, on a Llama-3.1-shaped planted pair (rope llama3 scaling, GQA 8/2, untied).

* ``mdiff rq1`` and ``mdiff rq4`` complete in bf16; self-patches are exactly 0; the store round trip stays
  within the run's measured noise floor; bf16 and float32 agree on the first divergent layer, the probe layers,
  the components and the top heads (planted truth: attention at ``ATTN_LAYER`` in one KV group, MLP at
  ``MLP_LAYER``);
* the fast engine and the naive loop agree in bf16 within a stated tolerance;
* float32 patch KLs agree with an independent reference (plain Hugging Face ``LlamaForCausalLM`` + PyTorch
  forward hooks + numpy float64, no TransformerLens, no mdiff code) within 1e-4 relative + 1e-8 nats;
* an MLP-only planted change is named as an MLP change in RQ1's findings.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import llama31_pair as LP  # noqa: E402

pytestmark = pytest.mark.slow

N = 96
BF16_MEAN_REL = 0.02
"""Fast vs naive engine in bf16: condition means agree within 2% (+ the run's noise tolerance)."""


def _cli(args):
    from typer.testing import CliRunner

    from mdiff.cli import app

    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def pairs(toys, tmp_path_factory):
    from mdiff import toy

    root = tmp_path_factory.mktemp("l31")
    base, prompts = str(toy.toy_dir() / "base"), str(toy.toy_dir() / "prompts-lowrank.jsonl")
    return {"bf16": LP.build(root / "bf16", base, prompts, "bfloat16"),
            "fp32": LP.build(root / "fp32", base, prompts, "float32"),
            "mlp": LP.build(root / "mlp", base, prompts, "bfloat16", variant="mlp")}


@pytest.fixture(scope="module")
def rq1_runs(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("rq1out")
    res = {}
    for key in ("bf16", "fp32", "mlp"):
        _cli(["rq1", "--pair", str(pairs[key]), "--out", str(out), "--n", str(N), "--bootstrap", "200",
              "--hooks", "resid_post,attn_out,mlp_out", "--threads", "1"])
        d = out / pairs[key].parent.name / "rq1"
        res[key] = {"summary": json.loads((d / "summary.json").read_text()),
                    "config": json.loads((d / "config.json").read_text()),
                    "per_prompt": pd.read_csv(d / "per_prompt_kl.csv"), "metrics": pd.read_csv(d / "metrics.csv"),
                    "dir": d}
    return res


def test_rq1_bf16_self_patch_exact_and_store_within_noise(rq1_runs):
    r = rq1_runs["bf16"]
    s, pp = r["summary"], r["per_prompt"]
    selfk = pp[pp.condition.str.startswith("self:")].kl
    assert len(selfk) == 2 * 3 * LP.N_LAYERS * N and (selfk == 0.0).all()
    noise = s["noise"]
    assert noise["dtype"] == "bfloat16" and noise["engine"] == "fast"
    # bf16 arithmetic is measurably noisy, and the store round trip is of that order, not zero and not large
    assert 1e-7 < noise["rounding_max_kl"] < 1e-3
    assert noise["store_roundtrip_max_kl"] <= 10 * noise["rounding_max_kl"]
    assert noise["kl_tolerance"] == pytest.approx(10 * noise["floor"])
    # no reported KL is negative beyond float64 round-off
    kl = r["metrics"][r["metrics"].metric == "patch_kl"]
    assert kl.value.min() >= -1e-12 and pp.kl.min() >= -1e-12
    assert r["config"]["engine"]["tuned"] == {"requested": "fast", "used": "fast", "fallback_reason": None}


def test_rq1_float32_noise_floor_is_tiny(rq1_runs):
    s = rq1_runs["fp32"]["summary"]
    assert s["noise"]["rounding_max_kl"] < 1e-11 and s["noise"]["kl_tolerance"] == pytest.approx(1e-10)
    pp = rq1_runs["fp32"]["per_prompt"]
    assert pp.kl.min() >= -1e-12 and (pp[pp.condition.str.startswith("self:")].kl == 0.0).all()


def test_bf16_and_float32_agree_on_the_planted_layers(rq1_runs):
    b, f = rq1_runs["bf16"]["summary"], rq1_runs["fp32"]["summary"]
    assert b["first_divergent_layer"] == f["first_divergent_layer"] == LP.ATTN_LAYER
    assert b["suggested_probe_layers"] == f["suggested_probe_layers"]
    for s in (b, f):
        comps = s["components"]
        assert comps[str(LP.ATTN_LAYER)]["component"] == "attention" and comps[str(LP.ATTN_LAYER)]["clear"]
        assert comps[str(LP.MLP_LAYER)]["component"] == "MLP" and comps[str(LP.MLP_LAYER)]["clear"]
        assert s["per_hook"]["attn_out"]["peak_layer"] == LP.ATTN_LAYER
        assert s["per_hook"]["mlp_out"]["peak_layer"] == LP.MLP_LAYER
        text = " ".join(s["findings"])
        assert f"first diverge at L{LP.ATTN_LAYER}" in text
        assert f"MLP output's base→tuned patch KL (`mlp_out`) peaks at L{LP.MLP_LAYER}" in text
        assert f"at L{LP.MLP_LAYER} the MLP carries the larger patch KL" in text
    # below the planted layer nothing is above noise, in bf16 too
    assert b["patch_kl_base_to_tuned"]["0"] <= b["noise"]["kl_tolerance"]


def test_mlp_only_change_is_named(rq1_runs):
    s = rq1_runs["mlp"]["summary"]
    L = LP.PRE_MLP_ONLY
    assert s["first_divergent_layer"] == L
    assert s["components"][str(L)]["component"] == "MLP"
    assert s["per_hook"]["attn_out"]["peak_layer"] in (None, *range(L + 1, LP.N_LAYERS))
    assert any(f"at L{L} the MLP carries the larger patch KL" in f for f in s["findings"])


def test_findings_quote_metrics(rq1_runs):
    s, m = rq1_runs["bf16"]["summary"], rq1_runs["bf16"]["metrics"]
    row = m[(m.metric == "patch_kl") & (m.hook == "mlp_out") & (m.condition == "base->tuned") & (m.layer == LP.MLP_LAYER)]
    v = float(row.value.iloc[0])
    assert any(f"{v:.3g} [" in f for f in s["findings"])


def test_fast_and_naive_agree_in_bf16(pairs):
    from mdiff import activations as A
    from mdiff import models, patching
    from mdiff.noise import NOISE_FACTOR
    from mdiff.pairs import resolve_pair
    from mdiff.positions import parse_positions

    spec = resolve_pair(str(pairs["bf16"]))
    info = models.inspect_pair(spec)
    prep, pb, pt, sv = A.prepare_pair_prompts(spec, info, parse_positions("last"), "all", 0, 48)
    sites = [(h, L) for h in ("resid_post", "attn_out", "mlp_out") for L in range(LP.N_LAYERS)]
    with models.loaded(spec, "base") as m:
        src = patching.Patcher(m, prep.base_ids, prep.base_positions, pb, 16).capture([*sites, ("z", LP.ATTN_LAYER)])
        WO = m.blocks[LP.ATTN_LAYER].attn.W_O.detach()
    from mdiff.hooks import head_results

    res = head_results(src[("z", LP.ATTN_LAYER)], WO)
    conds = [patching.SitePatch(L, h, src[(h, L)]) for h, L in sites]
    conds += [patching.HeadPatch(LP.ATTN_LAYER, hs, "result", res) for hs in [(h,) for h in range(LP.N_HEADS)]
              + [LP.GROUP_HEADS]]
    with models.loaded(spec, "tuned") as m:
        fast = patching.Patcher(m, prep.tuned_ids, prep.tuned_positions, pt, 16, "fast")
        assert fast.engine_used == "fast"
        kf = fast.kl(conds, sv.tuned_ids)
        kn = patching.Patcher(m, prep.tuned_ids, prep.tuned_positions, pt, 16, "naive").kl(conds, sv.tuned_ids)
        tol = NOISE_FACTOR * fast.noise_floor(sv.tuned_ids, sites[:LP.N_LAYERS]).max()
    assert 0 < tol < 1e-2
    mf, mn = kf.mean(1), kn.mean(1)
    assert (np.abs(mf - mn) <= BF16_MEAN_REL * mn + tol).all(), np.abs(mf - mn).max()
    assert (kf[mn == 0] == 0).all() and (kn[mn == 0] == 0).all()  # unchanged layers: exactly 0 in both engines
    assert np.abs(kf - kn).max() <= BF16_MEAN_REL * kn.max() + tol
    # the same heads rank first in both engines
    nh = LP.N_HEADS
    heads_f, heads_n = mf[-nh - 1:-1], mn[-nh - 1:-1]
    assert set(np.argsort(-heads_f)[:4]) == set(np.argsort(-heads_n)[:4]) == set(LP.GROUP_HEADS)


def test_rq4_bf16_matches_float32_with_stability_and_kv_group(pairs, tmp_path):
    outs = {}
    for key in ("bf16", "fp32"):
        _cli(["rq4", "--pair", str(pairs[key]), "--out", str(tmp_path), "--n", str(N), "--bootstrap", "200",
              "--layer", str(LP.ATTN_LAYER), "--k", "1,2,4", "--control-layer", "0", "--random-sets", "10",
              "--threads", "1"])
        outs[key] = json.loads((tmp_path / pairs[key].parent.name / "rq4" / "summary.json").read_text())
    lay = {k: next(e for e in s["layers"] if e["layer"] == LP.ATTN_LAYER) for k, s in outs.items()}
    for k in ("1", "2", "4"):
        assert lay["bf16"]["coverage"][k]["heads"] == lay["fp32"]["coverage"][k]["heads"]
    c4 = lay["bf16"]["coverage"]["4"]
    assert tuple(c4["heads"]) == LP.GROUP_HEADS and c4["kv_group"] == LP.KV_GROUP
    assert c4["stability"]["stable"] and min(c4["stability"]["head_freq"].values()) >= 0.9
    text = " ".join(outs["bf16"]["findings"])
    assert f"KV group {LP.KV_GROUP}" in text and "of select resamples' top-4" in text
    ctrl = next(e for e in outs["bf16"]["layers"] if e["layer"] == 0)
    assert ctrl["nothing_to_cover"]  # identical layer 0: within bf16 noise, coverage undefined
    assert outs["bf16"]["noise"]["dtype"] == "bfloat16"
    html = (tmp_path / pairs["bf16"].parent.name / "rq4" / "heads_result_raw.html").read_text()
    assert "in the top-k of select resamples" in html


def _hf_reference_kl(pair_dir: Path, ids: list[list[int]], pos: list[int], layer: int) -> np.ndarray:
    """Plain HF: base resid_post at ``layer`` (decoder layer output) patched into tuned at the decision position."""
    from transformers import LlamaForCausalLM

    def run(model, x, p, patch=None):
        grabbed = {}

        def hook(mod, args, output):
            hs = output[0] if isinstance(output, tuple) else output
            grabbed["h"] = hs[0, p].detach().clone()
            if patch is not None:
                hs = hs.clone()
                hs[0, p] = patch
                return (hs, *output[1:]) if isinstance(output, tuple) else hs
            return None

        h = model.model.layers[layer].register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = model(torch.tensor([x])).logits[0, p]
        finally:
            h.remove()
        return logits.double().numpy(), grabbed["h"]

    base = LlamaForCausalLM.from_pretrained(pair_dir / "base", dtype=torch.float32).eval()
    srcs = [run(base, x, p)[1] for x, p in zip(ids, pos, strict=True)]
    del base
    tuned = LlamaForCausalLM.from_pretrained(pair_dir / "tuned", dtype=torch.float32).eval()
    out = []
    for x, p, s in zip(ids, pos, srcs, strict=True):
        clean, _ = run(tuned, x, p)
        patched, _ = run(tuned, x, p, patch=s)

        def logp(z):
            z = z - z.max()
            return z - np.log(np.exp(z).sum())

        lp, lq = logp(clean), logp(patched)
        out.append(float((np.exp(lp) * (lp - lq)).sum()))
    return np.array(out)


def test_float32_patch_kl_matches_plain_hf_reference(pairs, rq1_runs):
    from transformers import AutoTokenizer

    d = rq1_runs["fp32"]["dir"]
    pp = rq1_runs["fp32"]["per_prompt"]
    act = next((d.parent / "activations").glob("tuned-all-last-*"))
    st = json.loads((act / "settings.json").read_text())
    pids = st["settings"]["prompt_ids"][:24]
    ids, pos = st["token_ids"][:24], [p[-1] for p in st["positions"][:24]]
    # the token ids are what HF's own chat template gives (no double BOS, generation prompt, decision = last)
    pair_dir = pairs["fp32"].parent
    tok = AutoTokenizer.from_pretrained(pair_dir / "base")
    prompts = {json.loads(line)["id"]: json.loads(line) for line in (pair_dir / "prompts.jsonl").read_text().splitlines()}
    for pid, x, p in zip(pids, ids, pos, strict=True):
        text = tok.apply_chat_template(prompts[pid]["messages"], add_generation_prompt=True, tokenize=False)
        assert tok(text, add_special_tokens=False)["input_ids"] == x and p == len(x) - 1
    for layer in (LP.ATTN_LAYER, LP.MLP_LAYER):
        ref = _hf_reference_kl(pair_dir, ids, pos, layer)
        got = pp[(pp.layer == layer) & (pp.hook == "resid_post") & (pp.condition == "base->tuned")].set_index("prompt_id")
        mine = got.loc[pids, "kl"].to_numpy()
        assert ref.min() > 1e-3  # a real effect to compare
        assert np.all(np.abs(mine - ref) <= 1e-4 * np.abs(ref) + 1e-8), np.abs(mine - ref).max()


def test_study_picks_rq2_sites_from_rq1_components(pairs, rq1_runs):
    """RQ1 names the MLP at a probe layer, so the study's RQ2 patches mlp_out there too (dry run, no model)."""
    from mdiff.pairs import resolve_pair
    from mdiff.study import StudyConfig, run_study

    s1 = rq1_runs["bf16"]["summary"]
    assert LP.MLP_LAYER in s1["suggested_probe_layers"] and "mlp_out" in s1["probe_components"]
    out = rq1_runs["bf16"]["dir"].parent.parent
    rec = run_study(resolve_pair(str(pairs["bf16"])), StudyConfig(n=N, n_boot=200), out, dry_run=True)
    steps = {s["step"]: s for s in rec["steps"]}
    assert steps["rq1"]["status"] == "done"
    assert "mlp_out" in steps["rq2"]["settings"]["hooks"] and f"L{LP.MLP_LAYER} MLP" in steps["rq2"]["why"]


def test_rq4_in_layer_chunks_equals_one_go_in_bf16(pairs, tmp_path):
    """A study's RQ4 units (one tuned-model call per chunk of layers) give the bytes of one call over all layers
    with the pair in bf16 too: conditions are grouped by layer and the rounding noise is seeded per site."""
    from mdiff import rq4
    from mdiff.config import RQ4Config
    from mdiff.pairs import resolve_pair
    from mdiff.session import PairSession

    spec = resolve_pair(str(pairs["bf16"]))
    assert spec.dtype == "bfloat16"
    cfg = RQ4Config(layers=[LP.ATTN_LAYER, LP.MLP_LAYER], ks=[1, 2], sources=["raw", "mapped"], n=32, n_boot=50,
                    random_sets=10, control_layer=0, batch_size=8)
    with PairSession(spec, tmp_path, n=cfg.n, batch_size=cfg.batch_size, keep_model=True) as s:
        with s.model("base") as m:
            side = rq4.rq4_side(s, cfg, m)
        with s.model("tuned") as m:
            whole = rq4.rq4_heads(s, cfg, m, side, rq4.rq4_layers(cfg))
            chunks = [rq4.rq4_heads(s, cfg, m, side, [L]) for L in reversed(rq4.rq4_layers(cfg))]
        a, b = rq4.reduce_rq4(s, cfg, [whole]), rq4.reduce_rq4(s, cfg, chunks)
    assert a.metrics.to_csv(index=False) == b.metrics.to_csv(index=False)
    assert json.dumps(a.summary, sort_keys=True) == json.dumps(b.summary, sort_keys=True)
    assert a.summary["noise"]["dtype"] == "bfloat16"
    top = next(x for x in a.summary["layers"] if (x["layer"], x["site"], x["source"]) == (LP.ATTN_LAYER, "result", "raw"))
    assert set(top["ranking_select"][:1]) <= set(LP.GROUP_HEADS), top["ranking_select"]  # the planted KV group
