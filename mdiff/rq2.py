"""RQ2 "transport": cross-model linear transport maps base → tuned, mapped patching, and its controls.

Definitions: METHODS.md, section RQ2 (call it cross-model linear transport, not CLT). For each site
(layer, hook) and solver, a map W is fit on the **train** split (base activations → tuned activations),
on two row sets: the fit positions (default ``upto=16``: up to 16 chat-aware content positions per prompt
plus its decision position, :data:`mdiff.positions.DEFAULT_FIT_POSITIONS`) and, as ``<solver>@decision``,
each train prompt's decision position alone. The solver, row set and α of each site (and the best site)
are chosen on the **select** split by the largest drop; everything reported is on **val**:

* diagnostics: R² on train and val, R² of the same solver fit on shuffled pairs (the null), CKA(mapped,
  tuned) and the mean cosine between mapped and tuned activations;
* mapped patch (target = tuned, at the decision position): ``KL_raw`` patches the base activation,
  ``KL_mapped`` patches ``W(base)``; ``drop = (KL_raw − KL_mapped) / KL_raw`` with a paired
  prompt-bootstrap CI. With α: ``blend`` mode patches ``(1−α)·h_tuned + α·source`` and ``scale`` mode
  ``α·source``; drop(α) is always against the raw patch **at the same α** (a blend toward the tuned
  model's own activation lowers KL for any source, so comparing with the α = 1 raw patch is an artefact).
* controls, always run: identity (drop 0 by construction), mean-shift (fit on the same rows as the
  chosen map), a map fit on shuffled pairs, an early-layer control site, and the reverse direction
  (tuned → base) for the best solver.
* the fit record of every map (rows, prompts, d, effective degrees of freedom, λ), and a warning when a
  site's maps had fewer rows than dimensions.

Where ``KL_raw`` is within the run's measured noise tolerance (:mod:`mdiff.noise`; nothing differs at that site) the drop is reported as undefined (NaN) with
``nothing_to_drop = true``, never as a division blow-up.

One model is in memory at a time: base (activations) → tuned (activations, fits, patches) → base
(reverse patches).
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mdiff import activations as A
from mdiff import cka, maps, patching, stats
from mdiff import schema as S
from mdiff.config import DEFAULT_SOLVERS, RQ2_HOOKS, SOLVERS, RQ2Config  # noqa: F401 (re-exported)
from mdiff.errors import MdiffError
from mdiff.io import tidy
from mdiff.noise import NoiseFloor, is_noise
from mdiff.options import check_layers
from mdiff.pairs import PairSpec
from mdiff.positions import parse_positions
from mdiff.runner import Step, StepResult, run_step
from mdiff.session import PairSession

CONTROL_SOLVERS = ("identity", "mean-shift")
ROW_SEP = "@"  # "ridge@decision": ridge fit on each train prompt's decision row only
FIT_METRICS = {"rows": "fit_rows", "prompts": "fit_prompts", "dof": "fit_dof", "lambda": "fit_lambda"}
"""maps.fit_summary key → metric name of the per-map fit record (on train)."""


def check_config(cfg: RQ2Config, n_layers: int) -> None:
    check_layers(cfg.layers, n_layers)
    check_layers([cfg.control_layer] if cfg.control_layer is not None else [], n_layers, option="control_layer")
    for h in cfg.hooks:
        if h not in RQ2_HOOKS:
            raise MdiffError(f"unknown hook {h!r} for RQ2: choose from {', '.join(RQ2_HOOKS)}")
    for s in cfg.solvers:
        if s not in SOLVERS:
            raise MdiffError(f"unknown solver {s!r}: choose from {', '.join(SOLVERS)}")
    if cfg.alpha_mode not in ("blend", "scale"):
        raise MdiffError(f"{{option}} must be blend or scale, got {cfg.alpha_mode!r}", option="alpha_mode")
    if not cfg.alphas:
        raise MdiffError("{option} is empty: give α values such as 0.5,1", option="alphas")
    if cfg.engine not in patching.ENGINES:
        raise MdiffError(f"{{option}} must be one of {', '.join(patching.ENGINES)}, got {cfg.engine!r}",
                         option="engine")
    for a in cfg.alphas:
        if not (0 < a <= (1 if cfg.alpha_mode == "blend" else 10)):
            raise MdiffError(f"alpha {a} out of range: blend needs 0 < α ≤ 1, scale 0 < α ≤ 10")
    stats.check_bootstrap(cfg.n_boot)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-30)))


def check_rq2(cfg: RQ2Config, info) -> RQ2Config:
    """Validate RQ2's config against the pair's shapes; the control layer defaults to layer 0."""
    if cfg.control_layer is None:
        cfg = dataclasses.replace(cfg, control_layer=0)
    check_config(cfg, info.base.n_layers)
    return cfg


def run_rq2(spec: PairSpec, cfg: RQ2Config, out: str | Path, overwrite: bool = False,
            progress: Callable[[str, float], None] | None = None, session: PairSession | None = None
            ) -> dict[str, Any]:
    """Run RQ2 and write ``out/<pair>/rq2/``; returns the summary."""
    return run_step(STEP, spec, cfg, out, overwrite, progress, session)


def figures_rq2(result: StepResult, pair: str, cfg: RQ2Config) -> dict:
    from mdiff import figures

    return {"drop.html": figures.drop_figure(result.metrics, pair, cfg.alpha_mode),
            "r2_vs_drop.html": figures.r2_vs_drop_figure(result.metrics, pair)}


def rq2_collections(cfg: RQ2Config, side: str) -> list[tuple]:
    """The collections RQ2 reads of one side, ``(split, positions)`` each, at its sites (the probe layers and
    the control layer × the hooks): fit positions on train and val, the decision position on val (the patch
    sources) and, for base, on select."""
    dec = parse_positions("last", seed=cfg.seed)
    fitpos = cfg.fit_positions
    out = [("train", fitpos), ("val", fitpos)]
    if fitpos.kind != "last":
        out.append(("val", dec))
    if side == "base":  # the select split only needs the patch sources
        out.append(("select", dec))
    return out


def rq2_jobs(session: PairSession, cfg: RQ2Config, side: str) -> list[tuple]:
    """:func:`rq2_collections` with their prepared prompts: ``(split, positions, prepared)`` each."""
    return [(split, pos, session.prompts(split, pos)) for split, pos in rq2_collections(cfg, side)]


def rq2_layers(cfg: RQ2Config) -> list[int]:
    return sorted(set(cfg.layers) | {cfg.control_layer})


def rq2_side(session: PairSession, cfg: RQ2Config, side: str) -> bool:
    """Collect RQ2's activations of one side (loading its model only when some are missing)."""
    return session.collect_side(side, rq2_jobs(session, cfg, side), cfg.hooks, rq2_layers(cfg))


def _fit_plan(session: PairSession, cfg: RQ2Config) -> tuple[dict, list[tuple], np.ndarray]:
    """The fit row sets (from the base train store), the (row set, solver, name) of every map a site fits, and
    the rows' prompt groups."""
    fitpos = cfg.fit_positions
    row_prompt, row_pos = (t.numpy() for t in session.acts("base", "train", fitpos, cfg.hooks, rq2_layers(cfg)).rows())
    row_sets = fit_row_sets(row_prompt, row_pos, fitpos.kind)
    solvers = list(dict.fromkeys([*CONTROL_SOLVERS, *cfg.solvers]))
    tags = [(rs, solver, solver + suffix) for rs, (suffix, _) in row_sets.items() for solver in solvers
            if not (suffix and solver == "identity")]
    return row_sets, tags, row_prompt


def _fit_site(Xtr, Ytr, groups, row_sets: dict, tags: list[tuple], seed: int, W_U=None) -> dict[str, Any]:
    """Every map of one site and its shuffled-pairs null: ``{name: map, "shuffled:" + name: null}``."""
    out = {}
    for rs, solver, name in tags:
        kw = {"W_U": W_U} if solver == "logit-subspace" else {}
        rows_fit = row_sets[rs][1]
        out[name] = maps.make_map(solver, **kw).fit(Xtr[rows_fit], Ytr[rows_fit], groups[rows_fit])
        out[f"shuffled:{name}"] = maps.fit_shuffled(lambda s=solver, k=kw: maps.make_map(s, **k), Xtr[rows_fit],
                                                    Ytr[rows_fit], groups=groups[rows_fit], random_state=seed)
    return out


def fits_need_a_model(cfg: RQ2Config) -> bool:
    """Whether RQ2's maps need the tuned model itself (``logit-subspace`` reads its unembedding)."""
    return "logit-subspace" in cfg.solvers


def rq2_fit(session: PairSession, cfg: RQ2Config, layer: int, hook: str) -> dict[str, Any]:
    """Fit every map of one site from the activation store (both sides collected), without a model:
    ``{name: map}`` with the shuffled-pairs nulls (:func:`compute_rq2` takes them as ``fitted_maps``)."""
    if fits_need_a_model(cfg):
        raise MdiffError("logit-subspace maps need the tuned model's unembedding: fit them inside RQ2's run")
    row_sets, tags, groups = _fit_plan(session, cfg)

    def load(side):
        return session.acts(side, "train", cfg.fit_positions, cfg.hooks, rq2_layers(cfg)).load(hook, layer).float().numpy()

    return _fit_site(load("base"), load("tuned"), groups, row_sets, tags, cfg.seed)


def compute_rq2(session: PairSession, cfg: RQ2Config, say: Callable[[str, float], None],
                fitted_maps: dict[tuple[int, str], dict[str, Any]] | None = None) -> StepResult:
    """RQ2 over ``session`` (its activation store is the only thing written). ``fitted_maps``: the maps of some
    sites, already fit (:func:`rq2_fit`, a study's units); the others are fit here."""
    spec = session.spec
    dec = parse_positions("last", seed=cfg.seed)
    fitpos = cfg.fit_positions
    prep_tr = session.prompts("train", fitpos)
    pad_b, pad_t, sv = session.pad["base"], session.pad["tuned"], session.shared_vocab
    prep_va = session.prompts("val", fitpos)
    prep_dec = prep_va if fitpos.kind == "last" else session.prompts("val", dec)
    prep_sel = session.prompts("select", dec)
    layers = rq2_layers(cfg)
    hooks = cfg.hooks
    sites = [(L, h) for L in layers for h in hooks]

    def sdir(side, split, pos):
        return session.store(side, split, pos, hooks, layers)

    rows: list[dict] = []
    fitted: dict[tuple, Any] = {}
    fit_info: dict[tuple, dict] = {}
    kl_store: dict[tuple, np.ndarray] = {}
    kl_sel: dict[tuple, np.ndarray] = {}

    def load(side, split, pos, L, h):
        return A.ActivationSet(sdir(side, split, pos)).load(h, L).float().numpy()  # maps pick fp32 fast paths on big inputs

    say("collecting base activations (the model is loaded only when some are missing)", 0.02)
    rq2_side(session, cfg, "base")

    say("loading tuned", 0.15)
    with session.model("tuned") as m:
        W_U = m.W_U.detach().double().cpu().numpy() if "logit-subspace" in cfg.solvers else None
        say("collecting tuned activations", 0.2)
        for split, pos, prep in rq2_jobs(session, cfg, "tuned"):
            session.collect(m, "tuned", split, pos, hooks, layers, prep)
        row_sets, tags, groups_tr = _fit_plan(session, cfg)
        val_sets = fit_row_sets(*(t.numpy() for t in A.ActivationSet(sdir("base", "val", fitpos)).rows()), fitpos.kind)
        ids_t, pos_t = prep_dec.tuned_ids, prep_dec.tuned_positions
        conds: list[patching.SitePatch] = []
        keys: list[tuple] = []
        conds_sel: list[patching.SitePatch] = []
        keys_sel: list[tuple] = []
        for si, (L, h) in enumerate(sites):
            say(f"fitting maps L{L} {h}", 0.25 + 0.4 * si / len(sites))
            Xtr, Ytr = load("base", "train", fitpos, L, h), load("tuned", "train", fitpos, L, h)
            Xva, Yva = load("base", "val", fitpos, L, h), load("tuned", "val", fitpos, L, h)
            Xdec = Xva if prep_dec is prep_va else load("base", "val", dec, L, h)
            Xsel = load("base", "select", dec, L, h)
            raw_src = torch.from_numpy(Xdec).float()
            for a in cfg.alphas:
                conds.append(patching.SitePatch(L, h, raw_src, a, cfg.alpha_mode))
                keys.append((L, h, "raw", a))
                conds_sel.append(patching.SitePatch(L, h, torch.from_numpy(Xsel).float(), a, cfg.alpha_mode))
                keys_sel.append((L, h, "raw", a))
            site_maps = (fitted_maps or {}).get((L, h))
            if site_maps is None:
                site_maps = _fit_site(Xtr, Ytr, groups_tr, row_sets, tags, cfg.seed, W_U)
            for rs, solver, name in tags:
                rows_fit = row_sets[rs][1]
                est, shuf = site_maps[name], site_maps[f"shuffled:{name}"]
                fitted[(L, h, name)] = est
                fit_info[(L, h, name)] = maps.fit_summary(est)
                fitted[(L, h, f"shuffled:{name}")] = shuf
                vr = val_sets[rs][1]  # diagnostics on the val rows of the same kind as the fit rows
                pred = est.transform(Xva[vr])
                diag = {"r2_train": est.score(Xtr[rows_fit], Ytr[rows_fit]), "r2_val": est.score(Xva[vr], Yva[vr]),
                        "r2_val_shuffled": shuf.score(Xva[vr], Yva[vr]),
                        "cka_mapped_tuned": cka.linear_cka(pred, Yva[vr]) if len(vr) > 2 else float("nan"),
                        "mean_cosine": _cosine(pred, Yva[vr])}
                for k, v in diag.items():
                    rows.append({"layer": L, "hook": h, "condition": name, "metric": k, "value": float(v),
                                 "n": len(vr)})
                for k, v in fit_info[(L, h, name)].items():
                    if k in FIT_METRICS and v is not None:
                        rows.append({"layer": L, "hook": h, "condition": name, "metric": FIT_METRICS[k],
                                     "value": float(v), "n": fit_info[(L, h, name)]["rows"], "split": "train"})
                for tag, mp in ((name, est), (f"shuffled:{name}", shuf)):
                    if tag.startswith("shuffled:") and solver in CONTROL_SOLVERS:
                        continue
                    src = torch.from_numpy(np.asarray(mp.transform(Xdec))).float()
                    for a in cfg.alphas:
                        conds.append(patching.SitePatch(L, h, src, a, cfg.alpha_mode))
                        keys.append((L, h, tag, a))
                if solver in cfg.solvers and solver not in CONTROL_SOLVERS:  # candidates, chosen on select
                    src = torch.from_numpy(np.asarray(est.transform(Xsel))).float()
                    for a in cfg.alphas:
                        conds_sel.append(patching.SitePatch(L, h, src, a, cfg.alpha_mode))
                        keys_sel.append((L, h, name, a))
        say(f"patching the tuned model on select ({len(conds_sel)} conditions)", 0.6)
        kls = patching.Patcher(m, prep_sel.tuned_ids, prep_sel.tuned_positions, pad_t,
                               batch_size=cfg.batch_size, engine=cfg.engine).kl(conds_sel, sv.tuned_ids)
        kl_sel.update(zip(keys_sel, kls, strict=True))
        say(f"patching the tuned model on val ({len(conds)} conditions, and the noise floor)", 0.65)
        p_val = patching.Patcher(m, ids_t, pos_t, pad_t, batch_size=cfg.batch_size, engine=cfg.engine)
        sites = sorted({(h, L) for (L, h, _, _) in keys})
        kls, floor = p_val.kl_with_noise_floor(conds, sv.tuned_ids, sites, cfg.seed)
        kl_store.update(zip(keys, kls, strict=True))
        noise = NoiseFloor.measure(spec.dtype, p_val.engine_used, [floor])
        engine = {"tuned": {"requested": cfg.engine, "used": p_val.engine_used,
                            "fallback_reason": p_val.fallback_reason}}
    tol = noise.tolerance

    # selection on the select split: point drop of every candidate (solver, α)
    sel_rows = []
    for (L, h, tag, a), kl in kl_sel.items():
        if tag == "raw":
            continue
        raw = kl_sel[(L, h, "raw", a)]
        nothing = is_noise(float(raw.mean()), tol)
        d = float("nan") if nothing else float((raw.mean() - kl.mean()) / raw.mean())
        r = {"layer": L, "hook": h, "condition": S.rq2_condition(tag, a, cfg.alpha_mode), "metric": S.DROP_SELECT,
             "value": d, "n": len(kl), "split": "select", "solver": tag, "alpha": a, "nothing_to_drop": nothing}
        rows.append(r)
        sel_rows.append(r)

    # drops with paired bootstrap CIs on val
    idx = stats.resample_indices(len(prep_dec), cfg.n_boot, cfg.seed + 1)
    drop_rows = []
    for (L, h, tag, a), kl in kl_store.items():
        rows.append({"layer": L, "hook": h, "condition": S.rq2_condition(tag, a, cfg.alpha_mode),
                     "metric": S.KL_RAW if tag == "raw" else S.KL_MAPPED,
                     **dict(zip(("value", "ci_low", "ci_high"), stats.bootstrap_mean(kl, idx=idx), strict=True)),
                     "n": len(kl), "split": "val"})
        if tag == "raw":
            continue
        raw = kl_store[(L, h, "raw", a)]
        nothing = is_noise(float(raw.mean()), tol)
        d, lo, hi = (float("nan"),) * 3 if nothing else stats.bootstrap_ratio_drop(raw, kl, idx=idx)
        r = {"layer": L, "hook": h, "condition": S.rq2_condition(tag, a, cfg.alpha_mode), "metric": S.DROP,
             "value": d, "ci_low": lo, "ci_high": hi, "n": len(kl), "solver": tag, "alpha": a,
             "nothing_to_drop": nothing, "split": "val"}
        rows.append(r)
        drop_rows.append(r)

    drops = pd.DataFrame(drop_rows)
    best = _best_per_site(drops, pd.DataFrame(sel_rows), cfg)
    for (L, h), b in best.items():
        b["fits"] = {name: fit_info[(L, h, name)] for _, _, name in tags if (L, h, name) in fit_info}

    # reverse direction (tuned → base) for each site's best solver, base as the target
    say("loading base (reverse direction)", 0.8)
    with session.model("base") as m:
        ids_b, pos_b = prep_dec.base_ids, prep_dec.base_positions
        rev_conds: list[patching.SitePatch] = []
        rev_sites = []
        for (L, h), b in best.items():
            solver = b["solver"]
            if solver is None:
                continue
            Ttr, Btr = load("tuned", "train", fitpos, L, h), load("base", "train", fitpos, L, h)
            Tdec = load("tuned", "val", dec if prep_dec is not prep_va else fitpos, L, h)
            base_solver, rows_fit = solver.split(ROW_SEP)[0], row_sets[_row_set_of(solver)][1]
            kw = {"W_U": m.W_U.detach().double().cpu().numpy()} if base_solver == "logit-subspace" else {}
            rev = maps.make_map(base_solver, **kw).fit(Ttr[rows_fit], Btr[rows_fit], groups_tr[rows_fit])
            fitted[(L, h, f"reverse:{solver}")] = rev
            a = b["alpha"]
            rev_conds.append(patching.SitePatch(L, h, torch.from_numpy(Tdec).float(), a, cfg.alpha_mode))
            rev_conds.append(patching.SitePatch(L, h, torch.from_numpy(np.asarray(rev.transform(Tdec))).float(), a,
                                                cfg.alpha_mode))
            rev_sites.append((L, h, b))
        p_rev = patching.Patcher(m, ids_b, pos_b, pad_b, batch_size=cfg.batch_size, engine=cfg.engine)
        rev_kls = np.empty((0, len(prep_dec)))
        rev_tol = tol
        if rev_conds:
            rev_kls, rev_floor = p_rev.kl_with_noise_floor(rev_conds, sv.base_ids,
                                                           sorted({(h, L) for L, h, _ in rev_sites}), cfg.seed)
            rev_tol = NoiseFloor.measure(spec.dtype, p_rev.engine_used, [rev_floor]).tolerance
            engine["base"] = {"requested": cfg.engine, "used": p_rev.engine_used,
                              "fallback_reason": p_rev.fallback_reason}
        for i, (L, h, b) in enumerate(rev_sites):
            solver, a = b["solver"], b["alpha"]
            raw, mapped = rev_kls[2 * i], rev_kls[2 * i + 1]
            nothing = is_noise(float(raw.mean()), rev_tol)
            d, lo, hi = (float("nan"),) * 3 if nothing else stats.bootstrap_ratio_drop(raw, mapped, idx=idx)
            rows.append({"layer": L, "hook": h, "condition": S.rq2_condition(f"reverse:{solver}", a, cfg.alpha_mode),
                         "metric": S.DROP, "value": d, "ci_low": lo, "ci_high": hi, "n": len(raw),
                         "solver": f"reverse:{solver}", "alpha": a, "nothing_to_drop": nothing, "split": "val"})
            b["reverse_drop"] = {"value": d, "ci": [lo, hi], "nothing_to_drop": nothing}

    metrics = tidy([{"pair": spec.name, "rq": "rq2", **r} for r in rows])
    summary = _summary(spec, cfg, best, metrics, {"train": len(prep_tr), "select": len(prep_sel), "val": len(prep_dec)})
    summary["noise"] = noise.to_dict()
    config = dict(target="tuned", alpha_mode=cfg.alpha_mode, engine=engine)
    return StepResult(metrics, summary, sv.size, prep_tr.tokenized_with,
                      {"train": prep_tr, "select": prep_sel, "val": prep_va}, config,
                      maps={f"maps/L{L}_{h}/{tag.replace(':', '_')}": est for (L, h, tag), est in fitted.items()})


STEP = Step("rq2", check_rq2, compute_rq2, figures_rq2)


def _best_per_site(drops: pd.DataFrame, sel: pd.DataFrame, cfg: RQ2Config) -> dict[tuple, dict]:
    """Per site, the learned solver and α with the largest drop on **select**, reported with its **val** drop."""
    best = {}
    for (L, h), g in drops.groupby(["layer", "hook"]):
        s = sel[(sel.layer == L) & (sel.hook == h)] if len(sel) else sel
        base = s.solver.str.split(ROW_SEP).str[0] if len(s) else None
        cand = s[base.isin(cfg.solvers) & ~base.isin(CONTROL_SOLVERS) & s.value.notna()] if len(s) else s
        if len(cand) == 0:
            best[(int(L), h)] = {"solver": None, "alpha": None, "drop": float("nan"), "ci": [float("nan")] * 2,
                                 "nothing_to_drop": bool(g.nothing_to_drop.all()), "chosen_on": "select"}
            continue
        c = cand.loc[cand.value.idxmax()]
        rv = g[(g.solver == c.solver) & (g.alpha == c.alpha)]
        r = rv.iloc[0]
        suffix = c.solver[len(c.solver.split(ROW_SEP)[0]):]
        ms = g[(g.solver == "mean-shift" + suffix)]  # the baseline fit on the same rows
        msr = ms[ms.alpha == r.alpha].iloc[0] if len(ms) else None
        sh = g[g.solver == f"shuffled:{r.solver}"]
        shr = sh[sh.alpha == r.alpha].iloc[0] if len(sh) else None
        finite = bool(np.isfinite(r.value))
        best[(int(L), h)] = {
            "solver": r.solver, "alpha": float(r.alpha), "drop": float(r.value), "ci": [float(r.ci_low), float(r.ci_high)],
            "chosen_on": "select", "select_drop": float(c.value), "fit_rows": _row_set_of(r.solver),
            "mean_shift_drop": None if msr is None else {"value": float(msr.value), "ci": [float(msr.ci_low), float(msr.ci_high)]},
            "shuffled_drop": None if shr is None else {"value": float(shr.value), "ci": [float(shr.ci_low), float(shr.ci_high)]},
            "beats_mean_shift": bool(finite and msr is not None and stats.beats((r.ci_low, r.ci_high),
                                                                                 (msr.ci_low, msr.ci_high))),
            "beats_shuffled": bool(finite and shr is not None and stats.beats((r.ci_low, r.ci_high),
                                                                              (shr.ci_low, shr.ci_high))),
            "nothing_to_drop": bool(r.nothing_to_drop),
        }
    return best


def fit_row_sets(row_prompt: np.ndarray, row_pos: np.ndarray, kind: str) -> dict[str, tuple[str, np.ndarray]]:
    """The train rows the maps are fit on: name → (solver-name suffix, row indices).

    ``fit``: every collected row (the fit positions). With ``upto=K`` positions (which always include the
    decision position) also ``decision``: each prompt's decision row alone (its largest position), so that
    RQ2 can choose on select between a map fit on many positions and one fit where it is applied.
    """
    sets = {"fit": ("", np.arange(len(row_prompt)))}
    if kind == "upto":
        order = np.lexsort((row_pos, row_prompt))
        last_of_prompt = np.r_[row_prompt[order][1:] != row_prompt[order][:-1], True]
        sets["decision"] = (ROW_SEP + "decision", np.sort(order[last_of_prompt]))
    return sets


def _row_set_of(tag: str) -> str:
    return "decision" if tag.endswith(ROW_SEP + "decision") else "fit"


def _fit_warning(fits: dict[str, dict], chosen: str | None = None) -> str | None:
    """One line when the maps at a site had fewer fit rows than dimensions (what would help)."""
    f = fits.get(chosen) if chosen else None
    f = f or next((v for v in fits.values() if v), None)
    if f is None or f["rows"] >= f["d_in"]:
        return None
    which = ""
    if chosen:
        reg = chosen.split("@")[0] in ("ridge", "lowrank", "logit-subspace", "mean-shift", "identity")
        which = (f" The chosen map ({chosen}) is {'regularised' if reg else 'NOT regularised toward the identity'}"
                 + ("" if reg else ": treat its drop with care, and compare it with 'ridge' at this site") + ".")
    return (f"the maps were fit on {f['rows']} rows ({f['prompts']} train prompts) for d = {f['d_in']} dimensions, "
            f"so a full linear map is underdetermined; only the regularised solvers (ridge toward the identity, "
            f"λ by prompt-grouped CV) are trustworthy here.{which} More rows help: more train prompts, or more fit "
            f"positions per prompt (fit_positions upto=K with a larger K, or longer prompts)")


def _positions_text(p) -> str:
    return "last" if p.kind == "last" else f"{p.kind}={p.k}"


def _summary(spec, cfg, best, metrics, n_prompts) -> dict[str, Any]:
    sites = []
    warnings = []
    for (L, h), b in sorted(best.items()):
        warn = _fit_warning(b.get("fits", {}), b["solver"])
        if b["solver"] is None:
            verdict = ("nothing to drop: patching base activations here does not change the tuned model "
                       "(KL_raw ≈ 0)") if b["nothing_to_drop"] else "no learned map could be evaluated"
        elif not np.isfinite(b["drop"]):
            verdict = (f"{b['solver']} was chosen on select, but on val patching base activations here does not "
                       f"change the tuned model (KL_raw ≈ 0): nothing to drop")
        else:
            pct = f"{100 * b['drop']:.0f}% [{100 * b['ci'][0]:.0f}, {100 * b['ci'][1]:.0f}]"
            fit = b["fits"].get(b["solver"], {})
            lam = "" if fit.get("lambda") is None else f", λ = {fit['lambda']:.3g}"
            verdict = (f"{b['solver']} (chosen on select) removes {pct} of the raw patch KL on val at α={b['alpha']:g} "
                       f"({cfg.alpha_mode}); {'beats' if b['beats_mean_shift'] else 'does NOT beat'} the mean-shift "
                       f"baseline and {'beats' if b['beats_shuffled'] else 'does NOT beat'} the shuffled-pairs null "
                       f"(95% CIs {'not ' if b['beats_mean_shift'] and b['beats_shuffled'] else ''}overlapping); "
                       f"fit on {fit.get('rows')} rows, d = {fit.get('d_in')}, {fit.get('dof') or 0:.3g} effective "
                       f"degrees of freedom per output{lam}")
        if warn:
            warnings.append(f"L{L} {h}: {warn}")
        sites.append({"layer": L, "hook": h, **b, "control_site": L == cfg.control_layer and L not in cfg.layers,
                      "verdict": verdict, "fit_warning": warn})
    real = [s for s in sites if s["solver"] is not None and not s["control_site"] and np.isfinite(s["drop"])]
    winner = max(real, key=lambda s: s["select_drop"]) if real else None  # the best site, also chosen on select
    out = {"pair": spec.name, "alpha_mode": cfg.alpha_mode, "sites": sites,
           "selection": (f"maps fit on train ({n_prompts['train']} prompts) at the fit positions "
                         f"({_positions_text(cfg.fit_positions)})"
                         + (f" and, as '{ROW_SEP}decision', at each prompt's decision position alone"
                            if cfg.fit_positions.kind == "upto" else "")
                         + f"; solver, fit rows and α chosen per site on the select split ({n_prompts['select']} "
                         f"prompts) by the largest drop; every reported drop and CI is on val ({n_prompts['val']} "
                         f"prompts), against the mean shift fit on the same rows"),
           "n_prompts": n_prompts, "fit_positions": cfg.fit_positions.to_dict(), "warnings": warnings,
           "best_site": None if winner is None else {k: winner[k] for k in ("layer", "hook", "solver", "alpha", "drop", "ci")}}
    if spec.truth is not None:
        out["truth"] = spec.truth
    return out


def freeze_winners(out: str | Path, pair: str) -> Path:
    """Write ``OUT/<pair>/rq2/winners.json``: per site the winning solver, α, mode and map files."""
    import json

    from mdiff.activations import atomic_write_text

    d = Path(out) / pair / "rq2"
    sfile = d / "summary.json"
    if not sfile.is_file():
        raise MdiffError(f"no RQ2 results at {d}: run RQ2 on pair {pair!r} first")
    s = json.loads(sfile.read_text())
    cfg = json.loads((d / "config.json").read_text())
    winners = {}
    for site in s["sites"]:
        if site["solver"] is None or site["control_site"]:
            continue
        key = f"L{site['layer']}_{site['hook']}"
        prefix = d / "maps" / key / site["solver"]
        winners[key] = {"layer": site["layer"], "hook": site["hook"], "solver": site["solver"], "alpha": site["alpha"],
                        "alpha_mode": s["alpha_mode"], "drop": site["drop"], "ci": site["ci"],
                        "map": str(prefix.relative_to(d)), "beats_mean_shift": site["beats_mean_shift"],
                        "beats_shuffled": site["beats_shuffled"], "fit_rows": site.get("fit_rows")}
    manifest = {"pair": pair, "settings": cfg["settings"], "git_commit": cfg["provenance"]["git_commit"],
                "winners": winners}
    path = d / "winners.json"
    atomic_write_text(path, json.dumps(manifest, indent=2))
    return path
