"""RQ3 "rank": how low-rank is the base → tuned transport at one site.

Definitions: METHODS.md, section RQ3. The base → tuned map is close to the identity, so the rank of the
map itself says nothing; mdiff restricts the *correction*: ``W_k = I + U_k V_kᵀ``, fit on **train** by

* ``rrr``: reduced-rank regression of ``y − x`` on ``x``;
* ``pca-procrustes``: Procrustes inside the top-k principal subspace of ``y − x``

(:class:`mdiff.maps.LowRankCorrectionMap`, one decomposition for the whole k path). For each k the tuned
model is patched at the decision position of the **val** prompts with ``W_k(base)``;
``drop(k) = (KL_raw − KL_k) / KL_raw`` against the raw base patch at the same α, with a paired
prompt-bootstrap CI. Reported: drop(k) for every k, the smallest k that reaches the target (an absolute
drop, or a fraction of the full-rank drop), and the null: the full-rank correction restricted to a
*random* k-dimensional subspace and rescaled to the rank-k correction's variance on train.
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdiff import activations as A
from mdiff import hooks as H
from mdiff import maps, stats
from mdiff import schema as S
from mdiff.config import METHODS, RQ3_HOOKS, RQ3Config, default_ks  # noqa: F401 (re-exported)
from mdiff.config import parse_ranks as parse_ks  # noqa: F401 (re-exported)
from mdiff.errors import MdiffError
from mdiff.io import tidy
from mdiff.noise import NoiseFloor, is_noise
from mdiff.options import check_layers
from mdiff.pairs import PairSpec
from mdiff.patching import ENGINES, Patcher, SitePatch
from mdiff.positions import parse_positions
from mdiff.runner import Step, StepResult, run_step
from mdiff.session import PairSession

CV_FOLDS = 5  # rrr's ridge λ: prompt-grouped K-fold cross-validation on train


def check_config(cfg: RQ3Config, n_layers: int, d_model: int) -> None:
    check_layers([cfg.layer], n_layers, option="layer")
    if cfg.hook not in RQ3_HOOKS:
        raise MdiffError(f"{{option}}: unknown hook {cfg.hook!r} for RQ3; choose from {', '.join(RQ3_HOOKS)}",
                         option="hook")
    for m in cfg.methods:
        if m not in METHODS:
            raise MdiffError(f"{{option}}: unknown method {m!r}; choose from {', '.join(METHODS)}", option="methods")
    if not cfg.methods:
        raise MdiffError("{option} is empty: choose from " + ", ".join(METHODS), option="methods")
    for k in cfg.ks or []:
        if k != "full" and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_model):
            raise MdiffError(f"{{option}}: rank {k!r} is out of range 1..{d_model} (d_model) or 'full'", option="ks")
    if cfg.target is not None and cfg.target_frac is not None:
        raise MdiffError("give an absolute target drop or a fraction of the full-rank drop ({option}), not both",
                         option="target_frac")
    if cfg.target is not None and not 0 < cfg.target <= 1:
        raise MdiffError(f"{{option}} is a drop in (0, 1], got {cfg.target}", option="target")
    if cfg.target_frac is not None and not 0 < cfg.target_frac <= 1:
        raise MdiffError(f"{{option}} is a fraction in (0, 1], got {cfg.target_frac}", option="target_frac")
    if cfg.alpha_mode not in H.MODES:
        raise MdiffError(f"{{option}} must be blend or scale, got {cfg.alpha_mode!r}", option="alpha_mode")
    if not 0 < cfg.alpha <= (1 if cfg.alpha_mode == "blend" else 10):
        raise MdiffError(f"{{option}} {cfg.alpha} out of range: blend needs 0 < α ≤ 1, scale 0 < α ≤ 10",
                         option="alpha")
    if isinstance(cfg.n_null, bool) or not isinstance(cfg.n_null, int) or cfg.n_null < 0:
        raise MdiffError(f"{{option}} must be a whole number ≥ 0, got {cfg.n_null!r}", option="n_null")
    if cfg.engine not in ENGINES:
        raise MdiffError(f"{{option}} must be one of {', '.join(ENGINES)}, got {cfg.engine!r}", option="engine")
    stats.check_bootstrap(cfg.n_boot)


def check_rq3(cfg: RQ3Config, info) -> RQ3Config:
    """Validate RQ3's config against the pair's shapes; default ranks from d_model, target 0.9 × full rank."""
    d_model = info.base.d_model
    if cfg.ks is None:
        cfg = dataclasses.replace(cfg, ks=default_ks(d_model))
    if cfg.target is None and cfg.target_frac is None:
        cfg = dataclasses.replace(cfg, target_frac=0.9)
    check_config(cfg, info.base.n_layers, d_model)
    return cfg


def run_rq3(spec: PairSpec, cfg: RQ3Config, out: str | Path, overwrite: bool = False,
            progress: Callable[[str, float], None] | None = None, session: PairSession | None = None
            ) -> dict[str, Any]:
    """Run RQ3 and write ``out/<pair>/rq3/``; returns the summary."""
    return run_step(STEP, spec, cfg, out, overwrite, progress, session)


def figures_rq3(result: StepResult, pair: str, cfg: RQ3Config) -> dict:
    from mdiff import figures

    return {"drop_vs_k.html": figures.rank_figure(result.metrics, pair)}


def random_subspace_null(full: maps.LinearMap, rank_k: maps.LinearMap, X_tr: np.ndarray, k: int,
                         rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """The full-rank correction restricted to a random k-dim subspace, rescaled to rank-k's train variance.

    ``null(x) = x + c̄ + s · (c(x) − c̄) Q Qᵀ`` with ``c(x) = full(x) − x``, ``c̄`` its train mean, ``Q`` a
    random orthonormal ``d × k`` basis and ``s`` such that the centred null correction has the same total
    variance on train as the rank-k map's correction.
    """
    d = X_tr.shape[1]
    Q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    c_full = full.transform(X_tr) - X_tr
    cbar = c_full.mean(0)
    proj = (c_full - cbar) @ Q @ Q.T
    c_k = rank_k.transform(X_tr) - X_tr
    target = ((c_k - c_k.mean(0)) ** 2).sum()
    got = (proj ** 2).sum()
    s = float(np.sqrt(target / got)) if got > 0 else 0.0

    def apply(X: np.ndarray) -> np.ndarray:
        return X + cbar + s * ((full.transform(X) - X - cbar) @ Q @ Q.T)

    return apply


def smallest_k(drops: dict[Any, tuple[float, float, float]], ks: list, goal: float) -> dict[str, Any]:
    """The smallest k whose drop reaches ``goal`` (point estimate) and whose CI lower end reaches it."""
    finite = [k for k in ks if k != "full"]
    point = next((k for k in finite if np.isfinite(drops[k][0]) and drops[k][0] >= goal), None)
    sure = next((k for k in finite if np.isfinite(drops[k][1]) and drops[k][1] >= goal), None)
    return {"goal": goal, "k": point, "k_ci": sure}


def compute_rq3(session: PairSession, cfg: RQ3Config, say: Callable[[str, float], None]) -> StepResult:
    """RQ3 over ``session`` (reads activations in memory; writes nothing)."""
    spec, info = session.spec, session.info
    dec = parse_positions("last", seed=cfg.seed)
    fitpos = cfg.fit_positions
    prep_tr = session.prompts("train", fitpos)
    pad_b, pad_t, sv = session.pad["base"], session.pad["tuned"], session.shared_vocab
    prep_va = session.prompts("val", fitpos)
    prep_dec = prep_va if fitpos.kind == "last" else session.prompts("val", dec)
    L, hook = cfg.layer, cfg.hook
    name = H.hook_name(hook, L, info.base.n_layers)

    def read(model, prep, side):
        ids = prep.base_ids if side == "base" else prep.tuned_ids
        pos = prep.base_positions if side == "base" else prep.tuned_positions
        got = A.gather_all(model, ids, pos, [name], pad_b if side == "base" else pad_t, cfg.batch_size,
                           stop_at_layer=L + 1 if L + 1 < info.base.n_layers else None)
        return got[name].double().numpy()

    say("loading base", 0.02)
    with session.model("base") as m:
        say("reading base activations", 0.05)
        X_tr, X_va = read(m, prep_tr, "base"), read(m, prep_va, "base")
        X_dec = X_va if prep_dec is prep_va else read(m, prep_dec, "base")
    rows: list[dict] = []
    groups = np.repeat(np.arange(len(prep_tr)), [len(p) for p in prep_tr.base_positions])
    say("loading tuned", 0.15)
    with session.model("tuned") as m:
        say("reading tuned activations", 0.2)
        Y_tr, Y_va = read(m, prep_tr, "tuned"), read(m, prep_va, "tuned")
        patcher = Patcher(m, prep_dec.tuned_ids, prep_dec.tuned_positions, pad_t, cfg.batch_size,
                          cfg.engine)

        def cond(src: np.ndarray) -> SitePatch:
            return SitePatch(L, hook, torch.from_numpy(np.asarray(src)).float(), cfg.alpha, cfg.alpha_mode)

        tags, conds = ["raw"], [cond(X_dec)]
        fits: dict[str, dict] = {}
        rng = np.random.default_rng(cfg.seed)
        for mi, method in enumerate(cfg.methods):
            say(f"fitting the rank-k path ({method})", 0.25 + 0.2 * mi / len(cfg.methods))
            ranks = list(dict.fromkeys([*cfg.ks, "full"]))
            path = maps.fit_lowrank_path(X_tr, Y_tr, ranks, groups=groups, method=method, cv=CV_FOLDS)
            fits[method] = path
            fit = maps.fit_summary(path["full"])
            for key, metric in (("rows", "fit_rows"), ("prompts", "fit_prompts"), ("dof", "fit_dof"),
                                ("lambda", "fit_lambda")):
                if fit[key] is not None:
                    rows.append({"condition": f"{method}|k=full", "metric": metric, "value": float(fit[key]),
                                 "n": fit["rows"], "method": method, "k": "full", "split": "train"})
            for k in ranks:
                mp = path[k]
                tags.append(f"{method}|k={k}")
                conds.append(cond(mp.transform(X_dec)))
                rows.append({"condition": f"{method}|k={k}", "metric": S.R2_VAL, "value": float(mp.score(X_va, Y_va)),
                             "n": len(Y_va), "method": method, "k": str(k), "rank_used": int(mp.rank_)})
                if k == "full":
                    continue
                for j in range(cfg.n_null):
                    null = random_subspace_null(path["full"], mp, X_tr, int(mp.rank_), rng)
                    tags.append(f"{method}|null|k={k}#{j}")
                    conds.append(cond(null(X_dec)))
        say("patching", 0.5)
        kl, floor = patcher.kl_with_noise_floor(conds, sv.tuned_ids, [(hook, L)], cfg.seed)
        noise = NoiseFloor.measure(spec.dtype, patcher.engine_used, [floor])
        engine = {"requested": cfg.engine, "used": patcher.engine_used, "fallback_reason": patcher.fallback_reason}

    by_tag = dict(zip(tags, kl, strict=True))
    raw = by_tag["raw"]
    idx = stats.resample_indices(len(raw), cfg.n_boot, cfg.seed + 1)
    nothing = is_noise(float(raw.mean()), noise.tolerance)
    v, lo, hi = stats.bootstrap_mean(raw, idx=idx)
    rows.append({"condition": "raw", "metric": S.KL_RAW, "value": v, "ci_low": lo, "ci_high": hi, "n": len(raw)})
    per_method = {}
    for method in cfg.methods:
        ranks = list(dict.fromkeys([*cfg.ks, "full"]))
        drops: dict[Any, tuple[float, float, float]] = {}
        nulls: dict[Any, dict] = {}
        for k in ranks:
            t = f"{method}|k={k}"
            v, lo, hi = stats.bootstrap_mean(by_tag[t], idx=idx)
            rows.append({"condition": t, "metric": S.KL_MAPPED, "value": v, "ci_low": lo, "ci_high": hi,
                         "n": len(raw), "method": method, "k": str(k)})
            d = (float("nan"),) * 3 if nothing else stats.bootstrap_ratio_drop(raw, by_tag[t], idx=idx)
            drops[k] = d
            rows.append({"condition": t, "metric": S.DROP, "value": d[0], "ci_low": d[1], "ci_high": d[2],
                         "n": len(raw), "method": method, "k": str(k), "nothing_to_drop": nothing})
            if k == "full" or cfg.n_null == 0:
                continue
            nd = [np.nan if nothing else stats.bootstrap_ratio_drop(raw, by_tag[f"{method}|null|k={k}#{j}"], idx=idx)[0]
                  for j in range(cfg.n_null)]
            nd_arr = np.asarray(nd, float)
            nulls[k] = {"mean": float(np.nanmean(nd_arr)) if not nothing else float("nan"),
                        "min": float(np.nanmin(nd_arr)) if not nothing else float("nan"),
                        "max": float(np.nanmax(nd_arr)) if not nothing else float("nan"), "n": cfg.n_null}
            rows.append({"condition": f"{method}|null|k={k}", "metric": S.DROP_NULL_MEAN, "value": nulls[k]["mean"],
                         "ci_low": nulls[k]["min"], "ci_high": nulls[k]["max"], "n": cfg.n_null, "method": method,
                         "k": str(k), "nothing_to_drop": nothing})
        full = drops["full"][0]
        goal = cfg.target if cfg.target is not None else (cfg.target_frac or 0.9) * full
        sk = smallest_k(drops, ranks, goal) if np.isfinite(goal) else {"goal": goal, "k": None, "k_ci": None}
        sk["target"] = ("absolute drop" if cfg.target is not None else f"{cfg.target_frac:g} × full-rank drop")
        spec_vals = None
        finite = [k for k in ranks if k != "full"]
        if finite:
            cv = fits[method][max(finite)].component_values_
            spec_vals = None if cv is None else [float(x) for x in np.asarray(cv)[:64]]
        per_method[method] = {
            "drop": {str(k): {"value": drops[k][0], "ci": [drops[k][1], drops[k][2]]} for k in ranks},
            "null": {str(k): v for k, v in nulls.items()},
            "smallest_k": sk, "full_rank_drop": full, "correction_spectrum": spec_vals,
            "fit": maps.fit_summary(fits[method]["full"]),
            "beats_null": {str(k): bool(k in nulls and stats.beats(drops[k][1:], nulls[k]["max"]))
                           for k in ranks if k != "full"}}
    metrics = tidy([{"pair": spec.name, "rq": "rq3", "layer": L, "hook": hook, **r} for r in rows])
    summary = _summary(spec, cfg, per_method, nothing, float(raw.mean()))
    summary["noise"] = noise.to_dict()
    return StepResult(metrics, summary, sv.size, prep_tr.tokenized_with, {"train": prep_tr, "val": prep_va},
                      dict(target="tuned", alpha_mode=cfg.alpha_mode, engine=engine))


def _summary(spec, cfg, per_method, nothing, kl_raw) -> dict[str, Any]:
    findings = []
    warnings = []
    site = f"L{cfg.layer} {cfg.hook}"
    fit = next(iter(per_method.values()))["fit"] if per_method else None
    if fit is not None and fit["underdetermined"]:
        warnings.append(f"{site}: the rank-k maps were fit on {fit['rows']} rows ({fit['prompts']} train prompts) for "
                        f"d = {fit['d_in']} dimensions, so the full-rank correction is underdetermined and its drop "
                        f"(the target's reference) is shrunk toward the mean shift; more rows help: more train "
                        f"prompts or more fit positions per prompt (fit_positions upto=K with a larger K)")
    if nothing:
        findings.append(f"{site}: nothing to drop: patching base activations here does not change the tuned model "
                        f"(KL_raw = {kl_raw:.2g} nats)")
    else:
        for method, r in per_method.items():
            sk = r["smallest_k"]
            full = r["full_rank_drop"]
            what = (f"a drop of {sk['goal']:.2f}" if cfg.target is not None
                    else f"{100 * cfg.target_frac:.0f}% of the full-rank drop ({100 * full:.0f}%)")
            if sk["k"] is None:
                findings.append(f"{site}, {method}: no rank below full reaches {what}")
            else:
                d = r["drop"][str(sk["k"])]
                null = r["null"].get(str(sk["k"]))
                nt = (f"; a random {sk['k']}-dim subspace of matched variance removes {100 * null['mean']:.0f}% "
                      f"on average (max {100 * null['max']:.0f}%)") if null else ""
                ci = "" if sk["k_ci"] is None else f"; its CI lower end reaches it from k={sk['k_ci']}"
                beats = r["beats_null"].get(str(sk["k"]))
                bt = "" if null is None else (" — above that null (CI lower end > null max)" if beats
                                              else " — NOT clearly above that null")
                findings.append(f"{site}, {method}: rank k={sk['k']} reaches {what}: drop "
                                f"{100 * d['value']:.0f}% [{100 * d['ci'][0]:.0f}, {100 * d['ci'][1]:.0f}]{ci}{nt}{bt}")
    if fit is not None:
        lam = "" if fit["lambda"] is None else f", λ = {fit['lambda']:.3g} (rrr, {CV_FOLDS}-fold prompt-grouped CV)"
        findings.append(f"{site}: maps fit on {fit['rows']} rows from {fit['prompts']} train prompts, d = {fit['d_in']}"
                        f"{lam}; drops measured on val at the decision position")
    out = {"pair": spec.name, "layer": cfg.layer, "hook": cfg.hook, "alpha": cfg.alpha, "alpha_mode": cfg.alpha_mode,
           "kl_raw": kl_raw, "nothing_to_drop": nothing, "methods": per_method, "findings": findings,
           "warnings": warnings, "fit_positions": cfg.fit_positions.to_dict(),
           "definitions": {"drop": "(KL_raw − KL_k)/KL_raw on val at the decision position, raw patch at the same α",
                           "null": "full-rank correction restricted to a random k-dim subspace, rescaled to the "
                                   "rank-k correction's train variance"}}
    cands = [(r["smallest_k"]["k"], m) for m, r in per_method.items() if r["smallest_k"]["k"] is not None]
    out["smallest_k"] = None if not cands else {"k": min(cands)[0], "method": min(cands)[1]}
    if spec.truth is not None:
        out["truth"] = spec.truth
    return out


STEP = Step("rq3", check_rq3, compute_rq3, figures_rq3)
