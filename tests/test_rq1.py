"""RQ1 on the toy pairs: CKA and patch KL find the planted layer; outputs, references and bad input."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from mdiff.cli import app

runner = CliRunner()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rq1_lowrank(toys, tmp_path_factory):
    out = tmp_path_factory.mktemp("rq1")
    r = runner.invoke(app, ["rq1", "--pair", "toy-lowrank", "--hooks", "resid_post,attn_out", "--bootstrap", "300",
                            "--out", str(out), "--threads", "1"])
    assert r.exit_code == 0, r.output
    return out / "toy-lowrank" / "rq1"


def test_planted_layer_found(rq1_lowrank, toys):
    truth = toys["toy-lowrank"].truth
    L0 = truth["layer"]
    m = pd.read_csv(rq1_lowrank / "metrics.csv")
    for hook in ("resid_post", "attn_out"):
        h = m[m.hook == hook]
        cka = h[h.metric == "cka"].set_index("layer")["value"]
        for cond in ("base->tuned", "tuned->base"):
            kl = h[(h.metric == "patch_kl") & (h.condition == cond)].set_index("layer")["value"]
            for layer in range(6):
                if layer < L0:
                    assert abs(cka[layer] - 1) < 1e-6, (hook, layer)
                    assert kl[layer] < 1e-6, (hook, cond, layer)
                elif layer == L0 or hook == "resid_post":
                    assert cka[layer] < 0.95, (hook, layer)
                    assert kl[layer] > 0.1, (hook, cond, layer)
    s = json.loads((rq1_lowrank / "summary.json").read_text())
    assert s["first_divergent_layer"] == L0
    assert L0 in s["suggested_probe_layers"]
    assert s["suggested_control_layer"] < L0
    assert s["self_patch_ok"] and s["self_patch_max_kl"] < 1e-6


def test_outputs_are_tidy_and_self_contained(rq1_lowrank):
    m = pd.read_csv(rq1_lowrank / "metrics.csv")
    assert list(m.columns[:10]) == ["pair", "rq", "layer", "hook", "condition", "metric", "value", "ci_low",
                                    "ci_high", "n"]
    assert set(m.metric) == {"cka", "cka_debiased", "patch_kl", "soft_refusal", "style_markers_per_100",
                             "mc_delta_logp_per_token"}
    assert set(m.condition) >= {"base_vs_tuned", "base->tuned", "tuned->base", "self:base", "self:tuned",
                                "base:masked", "base:unmasked", "tuned:masked", "tuned:unmasked"}
    mc = m[m.metric == "mc_delta_logp_per_token"]
    assert (mc.n > 0).all() and (mc.value > 0).all()  # the trained toys prefer the correct choice
    ok = m.dropna(subset=["ci_low"])
    assert ((ok.ci_low <= ok.value + 1e-9) & (ok.value <= ok.ci_high + 1e-9)).all()
    cfg = json.loads((rq1_lowrank / "config.json").read_text())
    assert cfg["pair_info"]["tokenizer_relation"] == "extends" and cfg["tokenized_with"] == "shared"
    assert "shared vocabulary" in cfg["kl_vocabulary"]
    assert cfg["provenance"]["versions"]["transformer-lens"].startswith("4.")
    assert cfg["settings"]["bootstrap"] == 300
    for fig in ("cka.html", "patch_kl.html"):
        html = (rq1_lowrank / fig).read_text()
        assert not re.search(r"<script[^>]*src=[\"']https?://", html)  # nothing fetched: opens offline
        assert "Plotly.newPlot" in html and len(html) > 1_000_000  # plotly.js is inlined
    assert not list(rq1_lowrank.parent.glob(".rq1.tmp-*"))


def test_patch_kl_matches_manual_reference(rq1_lowrank, toys):
    """Last-layer resid_post patch = the target's final norm + unembed of the source activation."""
    from mdiff import data
    from mdiff.models import load_model

    spec = toys["toy-lowrank"]
    per = pd.read_csv(rq1_lowrank / "per_prompt_kl.csv")
    per = per[(per.layer == 5) & (per.hook == "resid_post") & (per.condition == "base->tuned")]
    ids_of = {p.id: p for p in data.load_prompts(spec.prompts)}
    prompts = [ids_of[i] for i in per.prompt_id[:8]]
    base, tuned = load_model(spec, "base", device="cpu"), load_model(spec, "tuned", device="cpu")
    kls = []
    for p in prompts:
        ids = torch.tensor([data.tokenize([p], base.tokenizer, spec.chat_template)[0]])
        with torch.no_grad():
            _, cb = base.run_with_cache(ids, names_filter=["blocks.5.hook_resid_post"])
            clean = tuned(ids)[0, -1, :600].double().log_softmax(-1)
            src = cb["blocks.5.hook_resid_post"][:, -1:]
            patched = tuned.unembed(tuned.ln_final(src))[0, -1, :600].double().log_softmax(-1)
        kls.append(float((clean.exp() * (clean - patched)).sum()))
    np.testing.assert_allclose(per.kl[:8].to_numpy(), kls, rtol=1e-4, atol=1e-6)


def test_distributed_runs_and_reports(toys, tmp_path):
    r = runner.invoke(app, ["rq1", "--pair", "toy-distributed", "--layers", "0,3,5", "--n", "40", "--bootstrap",
                            "100", "--positions", "k=2", "--out", str(tmp_path), "--threads", "1"])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "toy-distributed" / "rq1" / "summary.json").read_text())
    assert s["first_divergent_layer"] == 0  # fine-tuned everywhere: layer 0 already differs
    assert all(v < 1 - 1e-4 for v in s["cka"].values())
    assert all(v > 0 for v in s["patch_kl_base_to_tuned"].values())


@pytest.mark.parametrize("args, needle", [
    (["--layers", "6"], "out of range 0..5"),
    (["--hooks", "resid"], "unknown 'resid'"),
    (["--bootstrap", "0"], "--bootstrap must be a whole number ≥ 1"),
    (["--positions", "k=0"], "K ≥ 1"),
    (["--stride", "0"], "--stride must be ≥ 1"),
])
def test_bad_arguments(toys, tmp_path, args, needle):
    r = runner.invoke(app, ["rq1", "--pair", "toy-lowrank", "--out", str(tmp_path), *args])
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert not (tmp_path / "toy-lowrank" / "rq1").exists()


def test_never_overwrites_other_settings(toys, tmp_path):
    base = ["rq1", "--pair", "toy-lowrank", "--layers", "3,4", "--n", "24", "--bootstrap", "50", "--out", str(tmp_path)]
    assert runner.invoke(app, base).exit_code == 0
    first = (tmp_path / "toy-lowrank" / "rq1" / "metrics.csv").read_text()
    r = runner.invoke(app, [*base[:-2], "--bootstrap", "60", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "other settings" in r.output and "bootstrap" in r.output
    assert (tmp_path / "toy-lowrank" / "rq1" / "metrics.csv").read_text() == first
    r = runner.invoke(app, [*base[:-2], "--bootstrap", "60", "--out", str(tmp_path), "--overwrite"])
    assert r.exit_code == 0
    assert (tmp_path / "toy-lowrank" / "rq1.prev-1" / "metrics.csv").read_text() == first
