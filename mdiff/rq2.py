"""RQ2 "transport": cross-model linear transport maps base → tuned, mapped patching, and its controls.

Definitions: METHODS.md, section RQ2 (call it cross-model linear transport, not CLT). For each site
(layer, hook) and solver, a map W is fit on the **train** split (base activations → tuned activations,
at the fit positions); everything reported is on **val**:

* diagnostics: R² on train and val, R² of the same solver fit on shuffled pairs (the null), CKA(mapped,
  tuned) and the mean cosine between mapped and tuned activations;
* mapped patch (target = tuned, at the decision position): ``KL_raw`` patches the base activation,
  ``KL_mapped`` patches ``W(base)``; ``drop = (KL_raw − KL_mapped) / KL_raw`` with a paired
  prompt-bootstrap CI. With α: ``blend`` mode patches ``(1−α)·h_tuned + α·source`` and ``scale`` mode
  ``α·source``; drop(α) is always against the raw patch **at the same α** (a blend toward the tuned
  model's own activation lowers KL for any source, so comparing with the α = 1 raw patch is an artefact).
* controls, always run: identity (drop 0 by construction), mean-shift, a map fit on shuffled pairs, an
  early-layer control site, and the reverse direction (tuned → base) for the best solver.

Where ``KL_raw`` is ≈ 0 (nothing differs at that site) the drop is reported as undefined (NaN) with
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
from mdiff import cka, maps, models, patching, stats
from mdiff.errors import MdiffError
from mdiff.io import ResultWriter, run_config, tidy
from mdiff.options import check_layers
from mdiff.pairs import PairSpec
from mdiff.positions import PositionSpec, parse_positions

RQ2_HOOKS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
SOLVERS = ("identity", "mean-shift", "ridge", "procrustes", "procrustes-scaled", "whiten-procrustes",
           "pca-procrustes", "logit-subspace")
DEFAULT_SOLVERS = ("ridge", "procrustes", "procrustes-scaled", "whiten-procrustes")
CONTROL_SOLVERS = ("identity", "mean-shift")
KL_FLOOR = 1e-6  # mean KL_raw below this: nothing to drop


@dataclasses.dataclass
class RQ2Config:
    layers: list[int]
    hooks: list[str]
    solvers: list[str]
    alphas: list[float]
    alpha_mode: str = "blend"
    fit_positions: PositionSpec = dataclasses.field(default_factory=lambda: parse_positions("last"))
    control_layer: int | None = None
    n: int | None = None
    n_boot: int = 1000
    seed: int = 0
    batch_size: int = 16
    device: str | None = None

    def settings(self) -> dict[str, Any]:
        return {"layers": self.layers, "hooks": self.hooks, "solvers": self.solvers, "alphas": self.alphas,
                "alpha_mode": self.alpha_mode, "fit_positions": self.fit_positions.to_dict(),
                "control_layer": self.control_layer, "n": self.n, "bootstrap": self.n_boot, "seed": self.seed}


def check_config(cfg: RQ2Config, n_layers: int) -> None:
    check_layers([*cfg.layers, *([cfg.control_layer] if cfg.control_layer is not None else [])], n_layers)
    for h in cfg.hooks:
        if h not in RQ2_HOOKS:
            raise MdiffError(f"unknown hook {h!r} for RQ2: choose from {', '.join(RQ2_HOOKS)}")
    for s in cfg.solvers:
        if s not in SOLVERS:
            raise MdiffError(f"unknown solver {s!r}: choose from {', '.join(SOLVERS)}")
    if cfg.alpha_mode not in ("blend", "scale"):
        raise MdiffError(f"--alpha-mode must be blend or scale, got {cfg.alpha_mode!r}")
    if not cfg.alphas:
        raise MdiffError("--alphas is empty")
    for a in cfg.alphas:
        if not (0 < a <= (1 if cfg.alpha_mode == "blend" else 10)):
            raise MdiffError(f"alpha {a} out of range: blend needs 0 < α ≤ 1, scale 0 < α ≤ 10")
    stats.check_bootstrap(cfg.n_boot)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-30)))


def run_rq2(spec: PairSpec, cfg: RQ2Config, out: str | Path, overwrite: bool = False,
            progress: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    say = progress or (lambda msg, frac: None)
    info = models.inspect_pair(spec)
    n_layers = info.base.n_layers
    if cfg.control_layer is None:
        cfg.control_layer = 0
    check_config(cfg, n_layers)
    writer = ResultWriter(Path(out) / spec.name / "rq2", {"pair": spec.name, **cfg.settings()}, overwrite)
    with writer:
        return _run(spec, cfg, info, out, writer, say)


def _run(spec, cfg, info, out, writer, say):
    dec = parse_positions("last", seed=cfg.seed)
    fitpos = cfg.fit_positions
    prep_tr, pad_b, pad_t, sv = A.prepare_pair_prompts(spec, info, fitpos, "train", cfg.seed, cfg.n)
    prep_va = A.prepare_pair_prompts(spec, info, fitpos, "val", cfg.seed, cfg.n)[0]
    prep_dec = prep_va if fitpos.kind == "last" else A.prepare_pair_prompts(spec, info, dec, "val", cfg.seed, cfg.n)[0]
    layers = sorted(set(cfg.layers) | {cfg.control_layer})
    hooks = cfg.hooks
    sites = [(L, h) for L in layers for h in hooks]

    def sdir(side, split, pos):
        return A.collection_dir(out, spec.name, side, split, pos.tag, hooks, layers)

    def collect_all(model, side):
        jobs = [(prep_tr, fitpos, "train"), (prep_va, fitpos, "val")]
        if prep_dec is not prep_va:
            jobs.append((prep_dec, dec, "val"))
        for prep, pos, split in jobs:
            A.collect(model, prep, side, hooks, layers, sdir(side, split, pos),
                      A.store_meta(spec, info, side, prep, pos, split, cfg.seed, pad_b if side == "base" else pad_t),
                      batch_size=cfg.batch_size, replace=writer.overwrite)

    rows: list[dict] = []
    fitted: dict[tuple, Any] = {}
    kl_store: dict[tuple, np.ndarray] = {}

    def load(side, split, pos, L, h):
        return A.ActivationSet(sdir(side, split, pos)).load(h, L).float().numpy()  # maps pick fp32 fast paths on big inputs

    say("loading base", 0.02)
    with models.loaded(spec, "base", cfg.device) as m:
        say("collecting base activations", 0.05)
        collect_all(m, "base")

    say("loading tuned", 0.15)
    with models.loaded(spec, "tuned", cfg.device) as m:
        W_U = m.W_U.detach().double().cpu().numpy() if "logit-subspace" in cfg.solvers else None
        say("collecting tuned activations", 0.2)
        collect_all(m, "tuned")
        groups_tr = A.ActivationSet(sdir("base", "train", fitpos)).rows()[0].numpy()
        solvers = list(dict.fromkeys([*CONTROL_SOLVERS, *cfg.solvers]))
        ids_t, pos_t = prep_dec.tuned_ids, prep_dec.tuned_positions
        conds: list[patching.SitePatch] = []
        keys: list[tuple] = []
        for si, (L, h) in enumerate(sites):
            say(f"fitting maps L{L} {h}", 0.25 + 0.4 * si / len(sites))
            Xtr, Ytr = load("base", "train", fitpos, L, h), load("tuned", "train", fitpos, L, h)
            Xva, Yva = load("base", "val", fitpos, L, h), load("tuned", "val", fitpos, L, h)
            Xdec = Xva if prep_dec is prep_va else load("base", "val", dec, L, h)
            raw_src = torch.from_numpy(Xdec).float()
            for a in cfg.alphas:
                conds.append(patching.SitePatch(L, h, raw_src, a, cfg.alpha_mode))
                keys.append((L, h, "raw", a))
            for solver in solvers:
                kw = {"W_U": W_U} if solver == "logit-subspace" else {}
                est = maps.make_map(solver, **kw).fit(Xtr, Ytr)
                fitted[(L, h, solver)] = est
                shuf = maps.fit_shuffled(lambda s=solver, k=kw: maps.make_map(s, **k), Xtr, Ytr, groups=groups_tr,
                                         random_state=cfg.seed)
                fitted[(L, h, f"shuffled:{solver}")] = shuf
                pred = est.transform(Xva)
                diag = {"r2_train": est.score(Xtr, Ytr), "r2_val": est.score(Xva, Yva),
                        "r2_val_shuffled": shuf.score(Xva, Yva),
                        "cka_mapped_tuned": cka.linear_cka(pred, Yva) if len(Yva) > 2 else float("nan"),
                        "mean_cosine": _cosine(pred, Yva)}
                for k, v in diag.items():
                    rows.append({"layer": L, "hook": h, "condition": solver, "metric": k, "value": float(v),
                                 "n": len(Yva)})
                for tag, mp in ((solver, est), (f"shuffled:{solver}", shuf)):
                    if tag.startswith("shuffled:") and solver in CONTROL_SOLVERS:
                        continue
                    src = torch.from_numpy(np.asarray(mp.transform(Xdec))).float()
                    for a in cfg.alphas:
                        conds.append(patching.SitePatch(L, h, src, a, cfg.alpha_mode))
                        keys.append((L, h, tag, a))
        say(f"patching the tuned model ({len(conds)} conditions)", 0.65)
        kls = patching.Patcher(m, ids_t, pos_t, pad_t, batch_size=cfg.batch_size).kl(conds, sv.tuned_ids)
        kl_store.update(zip(keys, kls, strict=True))

    # drops with paired bootstrap CIs
    idx = stats.resample_indices(len(prep_dec), cfg.n_boot, cfg.seed + 1)
    drop_rows = []
    for (L, h, tag, a), kl in kl_store.items():
        rows.append({"layer": L, "hook": h, "condition": f"{tag}|alpha={a}|{cfg.alpha_mode}",
                     "metric": "kl_raw" if tag == "raw" else "kl_mapped",
                     **dict(zip(("value", "ci_low", "ci_high"), stats.bootstrap_mean(kl, idx=idx), strict=True)),
                     "n": len(kl)})
        if tag == "raw":
            continue
        raw = kl_store[(L, h, "raw", a)]
        nothing = float(raw.mean()) < KL_FLOOR
        d, lo, hi = (float("nan"),) * 3 if nothing else stats.bootstrap_ratio_drop(raw, kl, idx=idx)
        r = {"layer": L, "hook": h, "condition": f"{tag}|alpha={a}|{cfg.alpha_mode}", "metric": "drop",
             "value": d, "ci_low": lo, "ci_high": hi, "n": len(kl), "solver": tag, "alpha": a,
             "nothing_to_drop": nothing}
        rows.append(r)
        drop_rows.append(r)

    drops = pd.DataFrame(drop_rows)
    best = _best_per_site(drops, cfg)

    # reverse direction (tuned → base) for each site's best solver, base as the target
    say("loading base (reverse direction)", 0.8)
    with models.loaded(spec, "base", cfg.device) as m:
        ids_b, pos_b = prep_dec.base_ids, prep_dec.base_positions
        rev_conds: list[patching.SitePatch] = []
        rev_sites = []
        for (L, h), b in best.items():
            solver = b["solver"]
            if solver is None:
                continue
            Ttr, Btr = load("tuned", "train", fitpos, L, h), load("base", "train", fitpos, L, h)
            Tdec = load("tuned", "val", dec if prep_dec is not prep_va else fitpos, L, h)
            kw = {"W_U": m.W_U.detach().double().cpu().numpy()} if solver == "logit-subspace" else {}
            rev = maps.make_map(solver, **kw).fit(Ttr, Btr)
            fitted[(L, h, f"reverse:{solver}")] = rev
            a = b["alpha"]
            rev_conds.append(patching.SitePatch(L, h, torch.from_numpy(Tdec).float(), a, cfg.alpha_mode))
            rev_conds.append(patching.SitePatch(L, h, torch.from_numpy(np.asarray(rev.transform(Tdec))).float(), a,
                                                cfg.alpha_mode))
            rev_sites.append((L, h, b))
        rev_kls = patching.Patcher(m, ids_b, pos_b, pad_b, batch_size=cfg.batch_size).kl(rev_conds, sv.base_ids) \
            if rev_conds else np.empty((0, len(prep_dec)))
        for i, (L, h, b) in enumerate(rev_sites):
            solver, a = b["solver"], b["alpha"]
            raw, mapped = rev_kls[2 * i], rev_kls[2 * i + 1]
            nothing = float(raw.mean()) < KL_FLOOR
            d, lo, hi = (float("nan"),) * 3 if nothing else stats.bootstrap_ratio_drop(raw, mapped, idx=idx)
            rows.append({"layer": L, "hook": h, "condition": f"reverse:{solver}|alpha={a}|{cfg.alpha_mode}",
                         "metric": "drop", "value": d, "ci_low": lo, "ci_high": hi, "n": len(raw),
                         "solver": f"reverse:{solver}", "alpha": a, "nothing_to_drop": nothing})
            b["reverse_drop"] = {"value": d, "ci": [lo, hi], "nothing_to_drop": nothing}

    metrics = tidy([{"pair": spec.name, "rq": "rq2", **r} for r in rows])
    summary = _summary(spec, cfg, best, metrics)
    for (L, h, tag), est in fitted.items():
        prefix = writer.file(f"maps/L{L}_{h}/{tag.replace(':', '_')}")
        maps.save_map(est, prefix)
    writer.csv("metrics.csv", metrics)
    writer.json("summary.json", summary)
    writer.json("config.json", run_config(writer, spec, info, sv.size, prep_tr.tokenized_with, cfg.seed,
                                          {"train": prep_tr, "val": prep_va}, target="tuned",
                                          alpha_mode=cfg.alpha_mode))
    from mdiff import figures

    writer.figure("drop.html", figures.drop_figure(metrics, spec.name, cfg.alpha_mode))
    writer.figure("r2_vs_drop.html", figures.r2_vs_drop_figure(metrics, spec.name))
    path = writer.commit()
    say("done", 1.0)
    summary["path"] = str(path)
    return summary


def _best_per_site(drops: pd.DataFrame, cfg: RQ2Config) -> dict[tuple, dict]:
    """The solver and α with the largest drop at each site (learned maps only, not the controls)."""
    best = {}
    for (L, h), g in drops.groupby(["layer", "hook"]):
        cand = g[g.solver.isin(cfg.solvers) & ~g.solver.isin(CONTROL_SOLVERS) & g.value.notna()]
        ms = g[(g.solver == "mean-shift")]
        if len(cand) == 0:
            best[(int(L), h)] = {"solver": None, "alpha": None, "drop": float("nan"), "ci": [float("nan")] * 2,
                                 "nothing_to_drop": bool(g.nothing_to_drop.all())}
            continue
        r = cand.loc[cand.value.idxmax()]
        msr = ms[ms.alpha == r.alpha].iloc[0] if len(ms) else None
        sh = g[g.solver == f"shuffled:{r.solver}"]
        shr = sh[sh.alpha == r.alpha].iloc[0] if len(sh) else None
        best[(int(L), h)] = {
            "solver": r.solver, "alpha": float(r.alpha), "drop": float(r.value), "ci": [float(r.ci_low), float(r.ci_high)],
            "mean_shift_drop": None if msr is None else {"value": float(msr.value), "ci": [float(msr.ci_low), float(msr.ci_high)]},
            "shuffled_drop": None if shr is None else {"value": float(shr.value), "ci": [float(shr.ci_low), float(shr.ci_high)]},
            "beats_mean_shift": bool(msr is not None and r.ci_low > msr.ci_high),
            "beats_shuffled": bool(shr is not None and r.ci_low > shr.ci_high),
            "nothing_to_drop": False,
        }
    return best


def _summary(spec, cfg, best, metrics) -> dict[str, Any]:
    sites = []
    for (L, h), b in sorted(best.items()):
        if b["solver"] is None:
            verdict = ("nothing to drop: patching base activations here does not change the tuned model "
                       "(KL_raw ≈ 0)") if b["nothing_to_drop"] else "no learned map could be evaluated"
        else:
            pct = f"{100 * b['drop']:.0f}% [{100 * b['ci'][0]:.0f}, {100 * b['ci'][1]:.0f}]"
            verdict = (f"{b['solver']} removes {pct} of the raw patch KL at α={b['alpha']:g} ({cfg.alpha_mode}); "
                       f"{'beats' if b['beats_mean_shift'] else 'does NOT beat'} the mean-shift baseline and "
                       f"{'beats' if b['beats_shuffled'] else 'does NOT beat'} the shuffled-pairs null "
                       f"(95% CIs {'not ' if b['beats_mean_shift'] and b['beats_shuffled'] else ''}overlapping)")
        sites.append({"layer": L, "hook": h, **b, "control_site": L == cfg.control_layer and L not in cfg.layers,
                      "verdict": verdict})
    real = [s for s in sites if s["solver"] is not None and not s["control_site"]]
    winner = max(real, key=lambda s: s["drop"]) if real else None
    out = {"pair": spec.name, "alpha_mode": cfg.alpha_mode, "sites": sites,
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
        raise MdiffError(f"no RQ2 results at {d}: run `mdiff rq2 --pair {pair}` first")
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
                        "beats_shuffled": site["beats_shuffled"]}
    manifest = {"pair": pair, "settings": cfg["settings"], "git_commit": cfg["provenance"]["git_commit"],
                "winners": winners}
    path = d / "winners.json"
    atomic_write_text(path, json.dumps(manifest, indent=2))
    return path
