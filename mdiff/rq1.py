"""RQ1 "where": per-layer CKA with prompt-bootstrap CIs, and cross-model layer patching both ways.

Definitions: METHODS.md, section RQ1. One model is in memory at a time:

1. base loaded: its activations (CKA positions and the decision position) go to the activation store;
2. tuned loaded: its activations are stored, its clean decision logits computed, base→tuned patches
   (base activations from the store) and the tuned self-patch run;
3. base loaded again: clean logits, tuned→base patches and the base self-patch.

Two sanity checks run every time (METHODS.md: a self-patch must give KL = 0):

* ``self:<side>``: the target patched with its own clean activations, computed with the patching
  engine's own batching (:meth:`mdiff.patching.Patcher.capture`): a bit-for-bit no-op in any dtype, so
  its KL must be exactly 0 (≤ ``SELF_PATCH_TOL``, 1e-10); anything else means the hooks or the engine
  patch what they should not;
* ``store:<side>``: the target patched with its own activations read back from the activation store
  (collected in other batches): bf16 rounds those differently in the last bits, so this KL is small but
  not 0; it must stay within the run's measured noise (:mod:`mdiff.noise`), else the store does not hold
  this model's activations (stale store, changed weights, non-deterministic model).

Every "KL ≈ 0" decision of the summary uses the tolerance derived from the run's noise floor.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdiff import activations as A
from mdiff import behaviour, cka, data, models, patching, stats
from mdiff import schema as S
from mdiff.config import RQ1_HOOKS, RQ1Config  # noqa: F401 (re-exported: rq1.RQ1Config)
from mdiff.errors import MdiffError
from mdiff.io import ResultWriter, run_config, tidy
from mdiff.noise import KL_ABS_FLOOR, NOISE_FACTOR, NoiseFloor, is_noise
from mdiff.options import check_layers
from mdiff.pairs import PairSpec
from mdiff.positions import parse_positions
from mdiff.schema import CKA_COND, CROSS_B2T, CROSS_T2B, cross_condition, self_condition, store_condition

SELF_PATCH_TOL = KL_ABS_FLOOR
COMPONENT_HOOKS = {"attn_out": "attention", "mlp_out": "MLP"}


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
    if cfg.engine not in patching.ENGINES:
        raise MdiffError(f"{{option}} must be one of {', '.join(patching.ENGINES)}, got {cfg.engine!r}",
                         option="engine")
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
                  A.store_meta(spec, info, side, prep_cka, cfg.positions, cfg.split, cfg.seed, pad), batch_size=cfg.batch_size,
                  replace=writer.overwrite)
        if not same:
            A.collect(model, prep_dec, side, hooks, layers, store_dir(side, dec),
                      A.store_meta(spec, info, side, prep_dec, dec, cfg.split, cfg.seed, pad), batch_size=cfg.batch_size,
                      replace=writer.overwrite)

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

    engines: dict[str, dict] = {}
    rounding_kl: list[np.ndarray] = []
    roundtrip_kl: list[np.ndarray] = []

    def patches(model, target, source_side):
        ids = prep_dec.base_ids if target == "base" else prep_dec.tuned_ids
        pos = prep_dec.base_positions if target == "base" else prep_dec.tuned_positions
        pad = pad_b if target == "base" else pad_t
        vocab = sv.base_ids if target == "base" else sv.tuned_ids
        patcher = patching.Patcher(model, ids, pos, pad, batch_size=cfg.batch_size, engine=cfg.engine)
        engines[target] = {"requested": cfg.engine, "used": patcher.engine_used,
                           "fallback_reason": patcher.fallback_reason}
        own = patcher.capture([(h, L) for h in hooks for L in layers])
        conds, keys = [], []
        for src, cond in ((source_side, cross_condition(source_side, target)), (target, store_condition(target))):
            acts = A.ActivationSet(store_dir(src, dec))
            for h in hooks:
                for L in layers:
                    conds.append(patching.SitePatch(L, h, acts.load(h, L)))
                    keys.append((L, h, cond))
        for h in hooks:
            for L in layers:
                conds.append(patching.SitePatch(L, h, own[(h, L)]))
                keys.append((L, h, self_condition(target)))
        kls, floor = patcher.kl_with_noise_floor(conds, vocab, seed=cfg.seed, own=own)
        rounding_kl.append(floor)
        for (L, h, cond), kl in zip(keys, kls, strict=True):
            if cond == store_condition(target):
                roundtrip_kl.append(kl)
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
            rows.append({"layer": L, "hook": h, "condition": CKA_COND, "metric": S.CKA, "value": b.value,
                         "ci_low": b.ci_low, "ci_high": b.ci_high, "n": n_prompts, "n_rows": len(X)})
            if len(X) >= 4 and n_prompts >= 3:
                j = cka.jackknife_debiased_cka(X, Y, groups=groups)
                rows.append({"layer": L, "hook": h, "condition": CKA_COND, "metric": S.CKA_DEBIASED,
                             "value": j.value, "ci_low": j.ci_low, "ci_high": j.ci_high, "n": n_prompts,
                             "n_rows": len(X)})
    idx = stats.resample_indices(len(prep_dec), cfg.n_boot, cfg.seed + 1)
    for r in kl_rows:
        mean, lo, hi = stats.bootstrap_mean(r["values"], idx=idx)
        rows.append({"layer": r["layer"], "hook": r["hook"], "condition": r["condition"], "metric": S.PATCH_KL,
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
    noise = NoiseFloor.measure(spec.dtype, "+".join(sorted({e["used"] for e in engines.values()})), rounding_kl,
                               roundtrip_kl)
    summary = summarize(metrics, spec, layers, hooks, noise)
    self_max = summary["self_patch_max_kl"]
    if self_max > SELF_PATCH_TOL:
        raise MdiffError(f"self-patch sanity check failed: patching each model with its own activations gave KL "
                         f"{self_max:.3g} > {SELF_PATCH_TOL:g} (must be exactly 0): the hooks or the patching engine "
                         "change what they should not; rerun with {option} naive to compare", option="engine")
    if (noise.roundtrip_max or 0.0) > noise.roundtrip_tolerance:
        raise MdiffError(f"activation-store check failed: patching each model with its own stored activations gave "
                         f"KL {noise.roundtrip_max:.3g}, above this run's arithmetic noise "
                         f"(tolerance {noise.roundtrip_tolerance:.3g}: {NOISE_FACTOR:g} x the KL of one rounding error, "
                         f"{noise.rounding_max:.3g}); "
                         f"the store does not hold these models' activations (weights changed since it was "
                         "collected?): rerun into a fresh output folder ({option})", option="out")
    config = run_config(
        writer, spec, info, sv.size, prep_cka.tokenized_with, cfg.seed, prompts=prep_cka.summary(),
        prompt_ids=prep_cka.prompt_ids, split=cfg.split,
        cka_ci="biased linear CKA: prompt (cluster) bootstrap percentile; debiased CKA: delete-one-prompt "
               "jackknife normal interval",
        patch_position="decision position (last content token)", behaviour=beh_settings, engine=engines,
        numerics={"dtype": spec.dtype, "kl": "float64 log-softmax and KL from the model's logits",
                  "self_patch": "engine's own clean values (exactly 0 required)",
                  "store_roundtrip": "own stored activations (within the measured noise floor)"})
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


def _series(metrics: pd.DataFrame, hook: str, metric: str, condition: str, layers: list[int],
            col: str = "value") -> pd.Series:
    m = metrics[(metrics["hook"] == hook) & (metrics["metric"] == metric) & (metrics["condition"] == condition)]
    m = m[m["layer"].notna()].astype({"layer": int})
    return m.set_index("layer")[col].reindex(layers).astype(float)


def _hook_view(metrics: pd.DataFrame, hook: str, layers: list[int], tol: float) -> dict[str, Any]:
    """One hook's layer profile: CKA, patch KL both ways with CIs, its largest and first divergent layers."""
    ck = _series(metrics, hook, S.CKA, CKA_COND, layers)
    kl = _series(metrics, hook, S.PATCH_KL, CROSS_B2T, layers)
    lo = _series(metrics, hook, S.PATCH_KL, CROSS_B2T, layers, "ci_low")
    hi = _series(metrics, hook, S.PATCH_KL, CROSS_B2T, layers, "ci_high")
    kl_r = _series(metrics, hook, S.PATCH_KL, CROSS_T2B, layers)
    effect = [L for L in layers if not is_noise(kl[L], tol)]
    return {
        "cka": {int(L): float(ck[L]) for L in layers},
        "patch_kl_base_to_tuned": {int(L): float(kl[L]) for L in layers},
        "patch_kl_base_to_tuned_ci": {int(L): [float(lo[L]), float(hi[L])] for L in layers},
        "patch_kl_tuned_to_base": {int(L): float(kl_r[L]) for L in layers},
        "largest_patch_kl_layers": [int(x) for x in kl.fillna(-np.inf).sort_values(ascending=False, kind="stable").index[:3]],
        "peak_layer": int(kl.fillna(-np.inf).idxmax()) if effect else None,
        "layers_above_noise": [int(L) for L in effect],
        "first_layer_above_noise": int(effect[0]) if effect else None,
    }


def _components(views: dict[str, dict], layers: list[int], tol: float) -> dict[int, dict[str, Any]]:
    """Per layer: which component (attention = attn_out, MLP = mlp_out) carries the larger base→tuned patch KL.

    ``clear`` when the two 95% CIs do not overlap; a component whose mean KL is within the noise tolerance
    carries nothing. Needs both hooks in the run.
    """
    if not all(h in views for h in COMPONENT_HOOKS):
        return {}
    out: dict[int, dict[str, Any]] = {}
    for L in layers:
        vals = {h: views[h]["patch_kl_base_to_tuned"][L] for h in COMPONENT_HOOKS}
        cis = {h: views[h]["patch_kl_base_to_tuned_ci"][L] for h in COMPONENT_HOOKS}
        live = [h for h in COMPONENT_HOOKS if not is_noise(vals[h], tol)]
        if not live:
            continue
        top = max(live, key=lambda h: vals[h])
        other = next(h for h in COMPONENT_HOOKS if h != top)
        clear = other not in live or cis[top][0] > cis[other][1]
        peaks = [COMPONENT_HOOKS[h] for h in live if views[h]["peak_layer"] == L]
        out[int(L)] = {"component": COMPONENT_HOOKS[top] if clear else "attention and MLP",
                       "hook": top if clear else None, "clear": bool(clear),
                       "patch_kl": {COMPONENT_HOOKS[h]: vals[h] for h in COMPONENT_HOOKS},
                       "ci": {COMPONENT_HOOKS[h]: cis[h] for h in COMPONENT_HOOKS},
                       "peak_of": peaks}
    return out


def summarize(metrics: pd.DataFrame, spec: PairSpec, layers: list[int], hooks: list[str],
              noise: NoiseFloor | None = None) -> dict[str, Any]:
    """Layers of largest divergence per hook, the component at each divergent layer, probe/control layers,
    the sanity checks and the noise floor every "KL ≈ 0" decision used."""
    tol = noise.tolerance if noise is not None else KL_ABS_FLOOR
    hook = "resid_post" if "resid_post" in hooks else hooks[0]
    views = {h: _hook_view(metrics, h, layers, tol) for h in hooks}
    v = views[hook]
    ck = pd.Series(v["cka"]).reindex(layers)
    kl = pd.Series(v["patch_kl_base_to_tuned"]).reindex(layers)
    selfk = metrics[metrics["condition"].str.startswith("self:")]["max"]
    storek = metrics[metrics["condition"].str.startswith("store:")]["max"]
    by_cka = [int(x) for x in ck.sort_values(kind="stable").index[:3]]
    by_kl = v["largest_patch_kl_layers"]
    probe = sorted(by_kl[:2])
    earlier = [L for L in layers if L < min(probe)]
    control = (min(earlier, key=lambda L: (kl[L], -ck[L], L)) if earlier
               else min(layers, key=lambda L: (kl[L], L)))
    tol_cka = 1e-4
    diverged = [L for L in layers if ck[L] < 1 - tol_cka or not is_noise(kl[L], tol)]
    first = int(diverged[0]) if diverged else None
    comps = _components(views, layers, tol)
    out = {
        "pair": spec.name, "hook": hook,
        "cka": {int(L): float(ck[L]) for L in layers},
        "patch_kl_base_to_tuned": {int(L): float(kl[L]) for L in layers},
        "patch_kl_tuned_to_base": v["patch_kl_tuned_to_base"],
        "largest_divergence_layers": by_cka,
        "largest_patch_kl_layers": by_kl,
        "first_divergent_layer": first,
        "suggested_probe_layers": probe,
        "suggested_control_layer": int(control),
        "control_layer_quiet": bool(is_noise(kl[control], tol)),
        "per_hook": {h: {k: x for k, x in views[h].items() if k != "patch_kl_base_to_tuned_ci"} for h in hooks},
        "components": comps,
        "probe_components": sorted({comps[L]["hook"] for L in probe if L in comps and comps[L]["hook"]}
                                   | {h for h in COMPONENT_HOOKS if h in views and views[h]["peak_layer"] is not None
                                      and views[h]["peak_layer"] in probe}),
        "self_patch_max_kl": float(selfk.max()) if len(selfk) else 0.0,
        "self_patch_ok": bool(len(selfk) == 0 or selfk.max() <= SELF_PATCH_TOL),
        "store_roundtrip_max_kl": float(storek.max()) if len(storek) else None,
        "noise": noise.to_dict() if noise is not None else {"kl_tolerance": tol},
        "findings": _findings(views, comps, first, tol),
    }
    beh = metrics[metrics["metric"].isin(S.BEHAVIOUR_METRICS)]
    if len(beh):
        out["behaviour"] = {f"{r.metric}|{r.condition}": {"value": r.value, "ci": [r.ci_low, r.ci_high], "n": int(r.n)}
                            for r in beh.itertuples()}
    if spec.truth is not None:
        out["truth"] = spec.truth
    return out


def _fmt_kl(v: float, ci: list[float]) -> str:
    return f"{v:.3g} [{ci[0]:.3g}, {ci[1]:.3g}] nats"


def _findings(views: dict[str, dict], comps: dict[int, dict], first: int | None, tol: float) -> list[str]:
    """Sentences from the numbers: where each hook's patch KL peaks, and which component carries each peak."""
    out = []
    if first is None:
        out.append(f"No layer's base→tuned patch changes the output beyond arithmetic noise (tolerance {tol:.2g} nats).")
    else:
        out.append(f"The models first diverge at L{first}.")
    for h, name in COMPONENT_HOOKS.items():
        if h not in views:
            continue
        pk = views[h]["peak_layer"]
        if pk is None:
            out.append(f"Patching the {name} output (`{h}`) changes nothing beyond noise at any layer.")
            continue
        v = views[h]["patch_kl_base_to_tuned"][pk]
        ci = views[h]["patch_kl_base_to_tuned_ci"][pk]
        c = comps.get(pk)
        carried = ""
        if c is not None and c["clear"]:
            carried = (f"; at L{pk} the {c['component']} carries the larger patch KL (CIs apart)")
        elif c is not None:
            carried = f"; at L{pk} attention and MLP patch KLs overlap"
        if carried and first is not None and pk > first:
            carried += (f" (downstream of L{first}, where the models first diverge, a component's patch KL also "
                        "carries what changed upstream)")
        out.append(f"The {name} output's base→tuned patch KL (`{h}`) peaks at L{pk}: {_fmt_kl(v, ci)}{carried}.")
    return out
