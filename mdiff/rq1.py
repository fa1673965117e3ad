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

import dataclasses
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
from mdiff.io import tidy
from mdiff.noise import KL_ABS_FLOOR, NOISE_FACTOR, NoiseFloor, is_noise
from mdiff.options import check_layers
from mdiff.pairs import PairSpec
from mdiff.positions import parse_positions
from mdiff.runner import Step, StepResult, run_step
from mdiff.schema import CKA_COND, CROSS_B2T, CROSS_T2B, cross_condition, self_condition, store_condition
from mdiff.session import PairSession

SELF_PATCH_TOL = KL_ABS_FLOOR
COMPONENT_HOOKS = {"attn_out": "attention", "mlp_out": "MLP"}


def check_rq1(cfg: RQ1Config, info) -> RQ1Config:
    """Validate RQ1's config against the pair's shapes (one-line errors before any work)."""
    stats.check_bootstrap(cfg.n_boot)
    check_layers(cfg.layers, info.base.n_layers)
    for h in cfg.hooks:
        if h not in RQ1_HOOKS:
            raise MdiffError(f"unknown hook {h!r} for RQ1: choose from {', '.join(RQ1_HOOKS)}")
    if cfg.engine not in patching.ENGINES:
        raise MdiffError(f"{{option}} must be one of {', '.join(patching.ENGINES)}, got {cfg.engine!r}",
                         option="engine")
    return cfg


def run_rq1(spec: PairSpec, cfg: RQ1Config, out: str | Path, overwrite: bool = False,
            progress: Callable[[str, float], None] | None = None, session: PairSession | None = None
            ) -> dict[str, Any]:
    """Run RQ1 and write ``out/<pair>/rq1/``; returns the summary."""
    return run_step(STEP, spec, cfg, out, overwrite, progress, session)


def figures_rq1(result: StepResult, pair: str, cfg: RQ1Config) -> dict:
    from mdiff import figures

    return {"cka.html": figures.cka_figure(result.metrics, pair),
            "patch_kl.html": figures.patch_kl_figure(result.metrics, pair)}


@dataclasses.dataclass
class SidePart:
    """What RQ1 computes with one model loaded, besides its activations (written to the store): the behaviour
    diagnostics of that side (rows with per-prompt ``values``)."""

    side: str
    behaviour: list[dict]


@dataclasses.dataclass
class PatchPart:
    """RQ1's patches into one target at some layers: per-prompt KL of each (layer, hook, condition), the
    noise floor (KL of one rounding error at each patched site) and the engine used."""

    target: str
    layers: list[int]
    kl: dict[tuple[int, str, str], np.ndarray]
    floor: np.ndarray
    engine: dict


@dataclasses.dataclass
class _Inputs:
    prep_cka: Any
    prep_dec: Any
    dec: Any
    same: bool


def rq1_collections(cfg: RQ1Config) -> list[tuple]:
    """The collections RQ1 reads of each side, ``(split, positions)`` each: the CKA positions and, when they
    are not the decision position, the decision position too (the patch sources)."""
    dec = parse_positions("last", seed=cfg.seed)
    return [(cfg.split, cfg.positions)] + ([] if cfg.positions.kind == "last" else [(cfg.split, dec)])


def _inputs(session: PairSession, cfg: RQ1Config) -> _Inputs:
    """The prompts RQ1 reads: the CKA positions and the decision position (on the same prompts)."""
    dec = parse_positions("last", seed=cfg.seed)
    prep_cka = session.prompts(cfg.split, cfg.positions)
    same = cfg.positions.kind == "last"
    prep_dec = prep_cka if same else session.prompts(cfg.split, dec)
    if prep_dec.prompt_ids != prep_cka.prompt_ids:  # the fairness filter/alignment kept other prompts
        keep = [i for i, p in enumerate(prep_dec.prompt_ids) if p in set(prep_cka.prompt_ids)]
        prep_dec = prep_dec.subset(keep)
    return _Inputs(prep_cka, prep_dec, dec, same)


def rq1_side(session: PairSession, cfg: RQ1Config, model, side: str) -> SidePart:
    """With ``side``'s model loaded: collect its activations (CKA and decision positions) into the store and
    run its behaviour diagnostics."""
    spec = session.spec
    inp = _inputs(session, cfg)
    session.collect(model, side, cfg.split, cfg.positions, cfg.hooks, cfg.layers, inp.prep_cka)
    if not inp.same:
        session.collect(model, side, cfg.split, inp.dec, cfg.hooks, cfg.layers, inp.prep_dec)
    if not cfg.behaviour:
        return SidePart(side, [])
    sv, prep_dec = session.shared_vocab, inp.prep_dec
    by_id = {p.id: p for p in data.pair_prompts(spec)}
    shared_tok = prep_dec.tokenized_with == "shared"
    tok = models.load_tokenizer(spec.base if side == "base" or shared_tok else spec.tuned,
                                spec.base_revision if side == "base" or shared_tok else spec.tuned_revision, side)
    ids = prep_dec.base_ids if side == "base" else prep_dec.tuned_ids
    vocab = sv.base_ids if side == "base" else sv.tuned_ids
    prompts = [by_id[i] for i in prep_dec.prompt_ids]
    return SidePart(side, behaviour.diagnostics(model, tok, side, prompts, ids, session.pad[side], vocab,
                                                behaviour.settings_for(spec.behaviour)))


def rq1_patch(session: PairSession, cfg: RQ1Config, model, target: str, layers: list[int] | None = None
              ) -> PatchPart:
    """With ``target``'s model loaded (both sides' activations in the store): at ``layers`` (default: all of
    ``cfg.layers``), the cross patch from the other side, the store round trip and the self-patch, with the
    noise floor. Patching a chunk of layers gives the same values as patching them all at once."""
    inp = _inputs(session, cfg)
    prep_dec, dec = inp.prep_dec, inp.dec
    layers = list(cfg.layers if layers is None else layers)
    hooks, source_side = cfg.hooks, "tuned" if target == "base" else "base"
    ids = prep_dec.base_ids if target == "base" else prep_dec.tuned_ids
    pos = prep_dec.base_positions if target == "base" else prep_dec.tuned_positions
    sv = session.shared_vocab
    vocab = sv.base_ids if target == "base" else sv.tuned_ids
    patcher = patching.Patcher(model, ids, pos, session.pad[target], batch_size=cfg.batch_size, engine=cfg.engine)
    engine = {"requested": cfg.engine, "used": patcher.engine_used, "fallback_reason": patcher.fallback_reason}
    own = patcher.capture([(h, L) for h in hooks for L in layers])
    conds, keys = [], []
    for src, cond in ((source_side, cross_condition(source_side, target)), (target, store_condition(target))):
        acts = session.acts(src, cfg.split, dec, hooks, cfg.layers)
        for h in hooks:
            for L in layers:
                conds.append(patching.SitePatch(L, h, acts.load(h, L)))
                keys.append((L, h, cond))
    for h in hooks:
        for L in layers:
            conds.append(patching.SitePatch(L, h, own[(h, L)]))
            keys.append((L, h, self_condition(target)))
    kls, floor = patcher.kl_with_noise_floor(conds, vocab, seed=cfg.seed, own=own)
    return PatchPart(target, layers, dict(zip(keys, kls, strict=True)), np.asarray(floor), engine)


def compute_rq1(session: PairSession, cfg: RQ1Config, say: Callable[[str, float], None]) -> StepResult:
    """RQ1 over ``session``, one model at a time (its activation store is the only thing written):
    :func:`rq1_side` for base then tuned, :func:`rq1_patch` into tuned then base, :func:`reduce_rq1`."""
    say("loading base", 0.05)
    with session.model("base") as m:
        say("collecting base activations and behaviour", 0.1)
        sides = [rq1_side(session, cfg, m, "base")]
    say("loading tuned", 0.3)
    with session.model("tuned") as m:
        say("collecting tuned activations and behaviour", 0.35)
        sides.append(rq1_side(session, cfg, m, "tuned"))
        say("patching base → tuned", 0.45)
        patches = [rq1_patch(session, cfg, m, "tuned")]
    say("loading base (patch target)", 0.6)
    with session.model("base") as m:
        say("patching tuned → base", 0.65)
        patches.append(rq1_patch(session, cfg, m, "base"))
    say("CKA with bootstrap CIs", 0.8)
    return reduce_rq1(session, cfg, sides, patches)


def reduce_rq1(session: PairSession, cfg: RQ1Config, sides: list[SidePart], patches: list[PatchPart]
               ) -> StepResult:
    """RQ1's result from its parts (in any order, layers in any chunks): CKA from the store, bootstrap CIs of
    the patch KLs, the noise floor and both sanity checks, the summary. Needs no model."""
    spec, hooks, layers = session.spec, cfg.hooks, cfg.layers
    inp = _inputs(session, cfg)
    prep_cka, prep_dec = inp.prep_cka, inp.prep_dec
    sv = session.shared_vocab
    kl_rows: list[dict] = []
    per_prompt: list[pd.DataFrame] = []
    by_target = {p.target: {} for p in patches}
    for p in patches:
        by_target[p.target].update(p.kl)
    missing = [(t, L) for t in ("tuned", "base") for L in layers
               if (L, hooks[0], self_condition(t)) not in by_target.get(t, {})]
    if missing:
        raise MdiffError(f"RQ1's patches are incomplete: no KL for {missing[0][0]} at layer {missing[0][1]}")
    rounding_kl = [p.floor for t in ("tuned", "base") for p in sorted((q for q in patches if q.target == t),
                                                                     key=lambda q: q.layers)]
    roundtrip_kl = []
    for target in ("tuned", "base"):
        source = "tuned" if target == "base" else "base"
        for cond in (cross_condition(source, target), store_condition(target), self_condition(target)):
            for h in hooks:
                for L in layers:
                    kl = by_target[target][(L, h, cond)]
                    if cond == store_condition(target):
                        roundtrip_kl.append(kl)
                    kl_rows.append({"layer": L, "hook": h, "condition": cond, "values": kl})
                    per_prompt.append(pd.DataFrame({"layer": L, "hook": h, "condition": cond,
                                                    "prompt_id": prep_dec.prompt_ids, "kl": kl}))
    engines: dict[str, dict] = {}
    for p in patches:
        engines.setdefault(p.target, p.engine)
    engines = {t: engines[t] for t in ("tuned", "base") if t in engines}
    beh_rows = [r for side in ("base", "tuned") for s in sides if s.side == side for r in s.behaviour]
    beh_settings = behaviour.settings_for(spec.behaviour) if cfg.behaviour else None

    def store_dir(side, pos):
        return session.store(side, cfg.split, pos, hooks, layers)

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
    config = dict(
        prompts=prep_cka.summary(), prompt_ids=prep_cka.prompt_ids, split=cfg.split,
        cka_ci="biased linear CKA: prompt (cluster) bootstrap percentile; debiased CKA: delete-one-prompt "
               "jackknife normal interval",
        patch_position="decision position (last content token)", behaviour=beh_settings, engine=engines,
        numerics={"dtype": spec.dtype, "kl": "float64 log-softmax and KL from the model's logits",
                  "self_patch": "engine's own clean values (exactly 0 required)",
                  "store_roundtrip": "own stored activations (within the measured noise floor)"})
    return StepResult(metrics, summary, sv.size, prep_cka.tokenized_with, config=config,
                      tables={"per_prompt_kl.csv": pd.concat(per_prompt, ignore_index=True)})


STEP = Step("rq1", check_rq1, compute_rq1, figures_rq1)


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
