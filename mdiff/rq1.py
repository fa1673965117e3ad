"""RQ1 "where": per-layer CKA with prompt-bootstrap CIs, and cross-model layer patching both ways.

Definitions: METHODS.md, section RQ1. One model is in memory at a time:

1. base loaded: its activations (CKA positions and the decision position) go to the activation store;
2. tuned loaded: its activations are stored, its clean decision logits computed, base→tuned patches
   (base activations from the store) and the tuned self-patch run;
3. base loaded again: clean logits, tuned→base patches and the base self-patch.

The self-patch (source = target) must give KL = 0 up to float error; it runs every time and its
maximum is reported (and must stay under ``SELF_PATCH_TOL``).
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdiff import activations as A
from mdiff import behaviour, cka, data, models, patching, stats
from mdiff.errors import MdiffError
from mdiff.io import ResultWriter, run_config, tidy
from mdiff.options import check_layers
from mdiff.pairs import PairSpec
from mdiff.positions import PositionSpec, parse_positions

RQ1_HOOKS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
SELF_PATCH_TOL = 1e-6


@dataclasses.dataclass
class RQ1Config:
    layers: list[int]
    hooks: list[str]
    positions: PositionSpec
    split: str = "all"
    n: int | None = None
    n_boot: int = 1000
    seed: int = 0
    batch_size: int = 16
    device: str | None = None
    behaviour: bool = True

    def settings(self) -> dict[str, Any]:
        return {"layers": self.layers, "hooks": self.hooks, "positions": self.positions.to_dict(),
                "split": self.split, "n": self.n, "bootstrap": self.n_boot, "seed": self.seed,
                "behaviour": self.behaviour}


def run_rq1(spec: PairSpec, cfg: RQ1Config, out: str | Path, overwrite: bool = False,
            progress: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    """Run RQ1 and write ``out/<pair>/rq1/``; returns the summary."""
    stats.check_bootstrap(cfg.n_boot)
    say = progress or (lambda msg, frac: None)
    info = models.inspect_pair(spec)
    n_layers = info.base.n_layers
    check_layers(cfg.layers, n_layers)
    for h in cfg.hooks:
        if h not in RQ1_HOOKS:
            raise MdiffError(f"unknown hook {h!r} for RQ1: choose from {', '.join(RQ1_HOOKS)}")
    settings = {"pair": spec.name, **cfg.settings()}
    rq1_dir = Path(out) / spec.name / "rq1"
    writer = ResultWriter(rq1_dir, settings, overwrite)  # refuses before any work if it would overwrite
    with writer:
        return _run(spec, cfg, info, out, writer, say)


def _run(spec, cfg, info, out, writer, say):
    dec = parse_positions("last", seed=cfg.seed)
    prep_cka, pad_b, pad_t, sv = A.prepare_pair_prompts(spec, info, cfg.positions, cfg.split, cfg.seed, cfg.n)
    same = cfg.positions.kind == "last"
    prep_dec = prep_cka if same else A.prepare_pair_prompts(spec, info, dec, cfg.split, cfg.seed, cfg.n)[0]
    if prep_dec.prompt_ids != prep_cka.prompt_ids:  # the fairness filter/alignment kept other prompts
        keep = [i for i, p in enumerate(prep_dec.prompt_ids) if p in set(prep_cka.prompt_ids)]
        prep_dec = prep_dec.subset(keep)
    hooks, layers = cfg.hooks, cfg.layers

    def store_dir(side, pos):
        return A.collection_dir(out, spec.name, side, cfg.split, pos.tag, hooks, layers)

    def collect(model, side):
        pad = pad_b if side == "base" else pad_t
        A.collect(model, prep_cka, side, hooks, layers, store_dir(side, cfg.positions),
                  A.store_meta(spec, info, side, prep_cka, cfg.positions, cfg.split, cfg.seed, pad), batch_size=cfg.batch_size)
        if not same:
            A.collect(model, prep_dec, side, hooks, layers, store_dir(side, dec),
                      A.store_meta(spec, info, side, prep_dec, dec, cfg.split, cfg.seed, pad), batch_size=cfg.batch_size)

    kl_rows: list[dict] = []
    per_prompt: list[pd.DataFrame] = []
    beh_rows: list[dict] = []
    beh_settings = behaviour.settings_for(spec.behaviour) if cfg.behaviour else None
    by_id = {p.id: p for p in data.pair_prompts(spec)} if cfg.behaviour else {}

    def behave(model, side):
        if not cfg.behaviour:
            return
        shared_tok = prep_dec.tokenized_with == "shared"
        tok = models.load_tokenizer(spec.base if side == "base" or shared_tok else spec.tuned,
                                    spec.base_revision if side == "base" or shared_tok else spec.tuned_revision, side)
        ids = prep_dec.base_ids if side == "base" else prep_dec.tuned_ids
        vocab = sv.base_ids if side == "base" else sv.tuned_ids
        prompts = [by_id[i] for i in prep_dec.prompt_ids]
        beh_rows.extend(behaviour.diagnostics(model, tok, side, prompts, ids, pad_b if side == "base" else pad_t,
                                              vocab, beh_settings))

    def patches(model, target, source_side):
        ids = prep_dec.base_ids if target == "base" else prep_dec.tuned_ids
        pos = prep_dec.base_positions if target == "base" else prep_dec.tuned_positions
        pad = pad_b if target == "base" else pad_t
        vocab = sv.base_ids if target == "base" else sv.tuned_ids
        conds, keys = [], []
        for src, cond in ((source_side, f"{source_side}->{target}"), (target, f"self:{target}")):
            acts = A.ActivationSet(store_dir(src, dec))
            for h in hooks:
                for L in layers:
                    conds.append(patching.SitePatch(L, h, acts.load(h, L)))
                    keys.append((L, h, cond))
        kls = patching.Patcher(model, ids, pos, pad, batch_size=cfg.batch_size).kl(conds, vocab)
        for (L, h, cond), kl in zip(keys, kls, strict=True):
            kl_rows.append({"layer": L, "hook": h, "condition": cond, "values": kl})
            per_prompt.append(pd.DataFrame({"layer": L, "hook": h, "condition": cond,
                                            "prompt_id": prep_dec.prompt_ids, "kl": kl}))

    say("loading base", 0.05)
    with models.loaded(spec, "base", cfg.device) as m:
        say("collecting base activations", 0.1)
        collect(m, "base")
        say("behaviour diagnostics (base)", 0.2)
        behave(m, "base")
    say("loading tuned", 0.3)
    with models.loaded(spec, "tuned", cfg.device) as m:
        say("collecting tuned activations", 0.35)
        collect(m, "tuned")
        say("behaviour diagnostics (tuned)", 0.4)
        behave(m, "tuned")
        say("patching base → tuned", 0.45)
        patches(m, "tuned", "base")
    say("loading base (patch target)", 0.6)
    with models.loaded(spec, "base", cfg.device) as m:
        say("patching tuned → base", 0.65)
        patches(m, "base", "tuned")

    say("CKA with bootstrap CIs", 0.8)
    rows: list[dict] = []
    bstore = A.ActivationSet(store_dir("base", cfg.positions))
    tstore = A.ActivationSet(store_dir("tuned", cfg.positions))
    groups, _ = bstore.rows()
    tgroups, _ = tstore.rows()
    if not np.array_equal(groups.numpy(), tgroups.numpy()):
        raise MdiffError("base and tuned activation rows do not line up (different prompts or positions)")
    groups = groups.numpy()
    omega = cka.prompt_bootstrap_weights(groups, cfg.n_boot, cfg.seed)
    n_prompts = len(np.unique(groups))
    for h in hooks:
        for L in layers:
            X, Y = bstore.load(h, L).double().numpy(), tstore.load(h, L).double().numpy()
            b = cka.bootstrap_cka(X, Y, groups=groups, weights=omega)
            rows.append({"layer": L, "hook": h, "condition": "base_vs_tuned", "metric": "cka", "value": b.value,
                         "ci_low": b.ci_low, "ci_high": b.ci_high, "n": n_prompts, "n_rows": len(X)})
            if len(X) >= 4 and n_prompts >= 3:
                j = cka.jackknife_debiased_cka(X, Y, groups=groups)
                rows.append({"layer": L, "hook": h, "condition": "base_vs_tuned", "metric": "cka_debiased",
                             "value": j.value, "ci_low": j.ci_low, "ci_high": j.ci_high, "n": n_prompts,
                             "n_rows": len(X)})
    idx = stats.resample_indices(len(prep_dec), cfg.n_boot, cfg.seed + 1)
    for r in kl_rows:
        mean, lo, hi = stats.bootstrap_mean(r["values"], idx=idx)
        rows.append({"layer": r["layer"], "hook": r["hook"], "condition": r["condition"], "metric": "patch_kl",
                     "value": mean, "ci_low": lo, "ci_high": hi, "n": len(r["values"]),
                     "max": float(np.max(r["values"]))})
    for r in beh_rows:
        v = r["values"]
        if len(v) == 0:
            rows.append({"layer": None, "hook": "", "condition": r["condition"], "metric": r["metric"],
                         "value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0})
            continue
        mean, lo, hi = stats.bootstrap_mean(v, cfg.n_boot, cfg.seed + 2)
        rows.append({"layer": None, "hook": "", "condition": r["condition"], "metric": r["metric"], "value": mean,
                     "ci_low": lo, "ci_high": hi, "n": len(v)})
    metrics = tidy([{"pair": spec.name, "rq": "rq1", **r} for r in rows])
    summary = summarize(metrics, spec, layers, hooks)
    self_max = summary["self_patch_max_kl"]
    if self_max > SELF_PATCH_TOL:
        raise MdiffError(f"self-patch sanity check failed: KL {self_max:.3g} > {SELF_PATCH_TOL} (hooks are not "
                         f"replacing what they should, or the model is non-deterministic)")
    config = run_config(
        writer, spec, info, sv.size, prep_cka.tokenized_with, cfg.seed, prompts=prep_cka.summary(),
        prompt_ids=prep_cka.prompt_ids, split=cfg.split,
        cka_ci="biased linear CKA: prompt (cluster) bootstrap percentile; debiased CKA: delete-one-prompt "
               "jackknife normal interval",
        patch_position="decision position (last content token)", behaviour=beh_settings)
    writer.csv("metrics.csv", metrics)
    writer.csv("per_prompt_kl.csv", pd.concat(per_prompt, ignore_index=True))
    writer.json("summary.json", summary)
    writer.json("config.json", config)
    from mdiff import figures

    writer.figure("cka.html", figures.cka_figure(metrics, spec.name))
    writer.figure("patch_kl.html", figures.patch_kl_figure(metrics, spec.name))
    path = writer.commit()
    say("done", 1.0)
    summary["path"] = str(path)
    return summary


def summarize(metrics: pd.DataFrame, spec: PairSpec, layers: list[int], hooks: list[str]) -> dict[str, Any]:
    """Layers of largest divergence, suggested probe/control layers, and the sanity checks."""
    hook = "resid_post" if "resid_post" in hooks else hooks[0]
    m = metrics[metrics["hook"] == hook]
    m = m[m["layer"].notna()].astype({"layer": int})
    ck = m[m["metric"] == "cka"].set_index("layer")["value"].reindex(layers)
    kl = m[(m["metric"] == "patch_kl") & (m["condition"] == "base->tuned")].set_index("layer")["value"].reindex(layers)
    kl_r = m[(m["metric"] == "patch_kl") & (m["condition"] == "tuned->base")].set_index("layer")["value"].reindex(layers)
    selfk = metrics[metrics["condition"].str.startswith("self:")]["max"]
    by_cka = [int(x) for x in ck.sort_values().index[:3]]
    by_kl = [int(x) for x in kl.sort_values(ascending=False).index[:3]]
    probe = sorted(by_kl[:2])
    earlier = [L for L in layers if L < min(probe)]
    control = (min(earlier, key=lambda L: (kl[L], -ck[L], L)) if earlier
               else min(layers, key=lambda L: (kl[L], L)))
    tol_cka, tol_kl = 1e-4, 1e-6
    diverged = [L for L in layers if ck[L] < 1 - tol_cka or kl[L] > tol_kl]
    out = {
        "pair": spec.name, "hook": hook,
        "cka": {int(L): float(ck[L]) for L in layers},
        "patch_kl_base_to_tuned": {int(L): float(kl[L]) for L in layers},
        "patch_kl_tuned_to_base": {int(L): float(kl_r[L]) for L in layers},
        "largest_divergence_layers": by_cka,
        "largest_patch_kl_layers": by_kl,
        "first_divergent_layer": int(diverged[0]) if diverged else None,
        "suggested_probe_layers": probe,
        "suggested_control_layer": int(control),
        "self_patch_max_kl": float(selfk.max()) if len(selfk) else 0.0,
        "self_patch_ok": bool(len(selfk) == 0 or selfk.max() <= SELF_PATCH_TOL),
    }
    beh = metrics[metrics["metric"].isin(["soft_refusal", "style_markers_per_100", "mc_delta_logp_per_token"])]
    if len(beh):
        out["behaviour"] = {f"{r.metric}|{r.condition}": {"value": r.value, "ci": [r.ci_low, r.ci_high], "n": int(r.n)}
                            for r in beh.itertuples()}
    if spec.truth is not None:
        out["truth"] = spec.truth
    return out
