"""RQ4 "heads": which attention heads carry the difference, at one or more layers.

Definitions: METHODS.md, section RQ4, and :mod:`mdiff.heads`. Target = tuned. For each layer, head
site (``result`` / ``z``) and source (``raw`` base heads / ``mapped`` by per-head maps fit on **train**):

1. single-head scan on the **select** split ranks the heads (mean KL when only that head is patched);
2. on **val**: every single head, the top-k heads for each k, ``random_sets`` random k-sets per k (the
   null), and all heads; ``coverage(S) = effect(S) / effect(all)`` with paired prompt-bootstrap CIs;
   each top-k's percentile within its random-k null;
3. a control layer (default 0) gets the same treatment;
4. the all-heads effect of *both* sites (raw source) at every layer, so that a change the ``z`` site
   cannot see (one in ``W_O``) is reported, never hidden.

One model in memory at a time: base (its heads' z and W_O) → tuned (targets for the maps, patches).
Every patch runs through :class:`mdiff.patching.Patcher`.
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from mdiff import heads as HD
from mdiff import schema as S
from mdiff import stats
from mdiff.config import RQ4Config  # noqa: F401 (re-exported)
from mdiff.errors import MdiffError
from mdiff.io import tidy
from mdiff.noise import NoiseFloor
from mdiff.options import check_layers
from mdiff.pairs import PairSpec
from mdiff.patching import ENGINES, Patcher
from mdiff.positions import parse_positions
from mdiff.runner import Step, StepResult, run_step
from mdiff.session import PairSession


def check_config(cfg: RQ4Config, n_layers: int, n_heads: int) -> None:
    if not cfg.layers:
        raise MdiffError("{option} is empty: give the layers to scan, e.g. 2 or 0,2,4", option="layers")
    check_layers(cfg.layers, n_layers)
    check_layers([cfg.control_layer] if cfg.control_layer is not None else [], n_layers, option="control_layer")
    if not cfg.ks:
        raise MdiffError("{option} is empty: give head counts such as 1,2,4", option="ks")
    for k in cfg.ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_heads:
            raise MdiffError(f"{{option}}: head count {k!r} is out of range 1..{n_heads} (this model has {n_heads} "
                             "heads per layer)", option="ks")
    for s in cfg.sites:
        if s not in HD.HEAD_SITES:
            raise MdiffError(f"{{option}}: unknown head site {s!r}; choose from {', '.join(HD.HEAD_SITES)}",
                             option="sites")
    for s in cfg.sources:
        if s not in HD.SOURCES:
            raise MdiffError(f"{{option}}: unknown source {s!r}; choose from {', '.join(HD.SOURCES)}",
                             option="sources")
    if isinstance(cfg.random_sets, bool) or not isinstance(cfg.random_sets, int) or cfg.random_sets < 1:
        raise MdiffError(f"{{option}} must be a whole number ≥ 1, got {cfg.random_sets!r}", option="random_sets")
    if cfg.engine not in ENGINES:
        raise MdiffError(f"{{option}} must be one of {', '.join(ENGINES)}, got {cfg.engine!r}", option="engine")
    from mdiff.maps import MAP_NAMES

    if cfg.map_solver not in MAP_NAMES:
        raise MdiffError(f"{{option}}: unknown solver {cfg.map_solver!r}; choose from {', '.join(MAP_NAMES)}",
                         option="map_solver")
    stats.check_bootstrap(cfg.n_boot)


def check_rq4(cfg: RQ4Config, info) -> RQ4Config:
    """Validate RQ4's config against the pair's shapes; the control layer defaults to layer 0."""
    if cfg.control_layer is None:
        cfg = dataclasses.replace(cfg, control_layer=0)
    check_config(cfg, info.base.n_layers, info.base.n_heads)
    return cfg


def run_rq4(spec: PairSpec, cfg: RQ4Config, out: str | Path, overwrite: bool = False,
            progress: Callable[[str, float], None] | None = None, session: PairSession | None = None
            ) -> dict[str, Any]:
    """Run RQ4 and write ``out/<pair>/rq4/``; returns the summary."""
    return run_step(STEP, spec, cfg, out, overwrite, progress, session)


def figures_rq4(result: StepResult, pair: str, cfg: RQ4Config) -> dict:
    from mdiff import figures

    figs = {}
    for site in cfg.sites:
        for source in cfg.sources:
            figs[f"heads_{site}_{source}.html"] = figures.head_heatmap(result.metrics, pair, site, source)
            figs[f"coverage_{site}_{source}.html"] = figures.coverage_figure(result.metrics, pair, site, source)
    return figs


def _fmt_heads(s) -> str:
    return "+".join(str(h) for h in s)


def rq4_layers(cfg: RQ4Config) -> list[int]:
    """The layers RQ4 scans: ``layers`` and the control layer (default 0), in order."""
    return sorted(set(cfg.layers) | {0 if cfg.control_layer is None else cfg.control_layer})


def _preps(session: PairSession, cfg: RQ4Config):
    """The select and val prompts at the decision position, and the train prompts when a source is mapped."""
    dec = parse_positions("last", seed=cfg.seed)
    prep_tr = session.prompts("train", cfg.fit_positions) if "mapped" in cfg.sources else None
    return session.prompts("select", dec), session.prompts("val", dec), prep_tr


def _zs(model, prep, side: str, session: PairSession, layers: list[int], bs: int) -> dict[int, Tensor]:
    ids = prep.base_ids if side == "base" else prep.tuned_ids
    pos = prep.base_positions if side == "base" else prep.tuned_positions
    z = HD.collect_z(model, ids, pos, session.pad[side], layers, bs)
    return {L: v.contiguous() for L, v in z.items()}


@dataclasses.dataclass
class HeadsSide:
    """What RQ4 reads from the base model (float32, contiguous, on the CPU): its heads' ``z`` on select, val and
    (for mapped sources) train, and ``W_O`` at each scanned layer."""

    z_sel: dict[int, Tensor]
    z_val: dict[int, Tensor]
    z_tr: dict[int, Tensor] | None
    W_O: dict[int, Tensor]


@dataclasses.dataclass
class HeadsPart:
    """What patching the base heads of some layers into the tuned model gives (per-prompt KLs; the analysis
    waits for every layer's noise floor: :func:`reduce_rq4`)."""

    layers: list[int]
    floor: np.ndarray
    """``[layer, prompt]``: KL of one rounding error at each layer's z (val split)."""
    kl_sel: dict[tuple[int, str, str], np.ndarray]
    """(layer, site, source) → ``[head, prompt]`` single-head effects on select."""
    kl_check: dict[tuple[int, str], np.ndarray]
    """(layer, site) → ``[prompt]`` all-heads effect of the raw source on val (the site check)."""
    kl_val: dict[tuple[int, str, str], np.ndarray]
    """(layer, site, source) → ``[set, prompt]`` effects of the val head sets (:func:`_val_sets`)."""
    fitted_r2: dict[tuple[int, str], list[float]]
    head_fits: dict[tuple[int, str], list[dict]]
    engine: dict[str, Any]


def rq4_side(session: PairSession, cfg: RQ4Config, model, say: Callable[[str, float], None] = lambda m, f: None
             ) -> HeadsSide:
    """Read the base ``model``'s heads at RQ4's layers (``z`` at the decision position, and on train for maps)."""
    prep_sel, prep_val, prep_tr = _preps(session, cfg)
    layers, bs = rq4_layers(cfg), cfg.batch_size
    say("reading the base model's heads", 0.05)
    return HeadsSide(_zs(model, prep_sel, "base", session, layers, bs), _zs(model, prep_val, "base", session, layers, bs),
                     _zs(model, prep_tr, "base", session, layers, bs) if prep_tr is not None else None,
                     {L: HD.W_O_of(model, L).contiguous() for L in layers})


def _plan(cfg: RQ4Config, layers: list[int]) -> list[tuple[int, str, str]]:
    return [(L, site, src) for L in layers for site in cfg.sites for src in cfg.sources]


def rq4_heads(session: PairSession, cfg: RQ4Config, model, side: HeadsSide, layers: list[int],
              say: Callable[[str, float], None] = lambda m, f: None) -> HeadsPart:
    """Patch the base heads of ``layers`` into the tuned ``model``: single-head scans (select), the site check
    and the head sets (val), and the noise floor at each layer. A layer's numbers do not depend on which other
    layers are patched in the same call (the engine groups conditions by layer; the rounding noise is seeded
    per site), so a study may split the layers into units."""
    prep_sel, prep_val, prep_tr = _preps(session, cfg)
    n_heads, bs, vocab = session.info.base.n_heads, cfg.batch_size, session.shared_vocab.tuned_ids
    want_map = prep_tr is not None
    WOb = side.W_O
    WOt = {L: HD.W_O_of(model, L).contiguous() for L in layers}
    zt_tr = _zs(model, prep_tr, "tuned", session, layers, bs) if want_map else None
    groups = np.repeat(np.arange(len(prep_tr)), [len(p) for p in prep_tr.base_positions]) if want_map else None
    pad_t = session.pad["tuned"]
    p_sel = Patcher(model, prep_sel.tuned_ids, prep_sel.tuned_positions, pad_t, bs, cfg.engine)
    p_val = Patcher(model, prep_val.tuned_ids, prep_val.tuned_positions, pad_t, bs, cfg.engine)
    say("noise floor (one rounding error at each layer's z)", 0.17)
    floor = p_val.noise_floor(vocab, [("z", L) for L in layers], cfg.seed)
    engine = {"requested": cfg.engine, "used": p_val.engine_used, "fallback_reason": p_val.fallback_reason}
    plan = _plan(cfg, layers)
    sources, fitted_r2, head_fits = {}, {}, {}
    for j, (L, site, source) in enumerate(plan):
        say(f"L{L} {site} sources ({source})", 0.2 + 0.1 * j / len(plan))
        if source == "raw":
            sources[(L, site, source)] = (HD.site_values(side.z_sel[L], WOb[L], site),
                                          HD.site_values(side.z_val[L], WOb[L], site))
        else:
            target = HD.site_values(zt_tr[L], WOt[L], site)
            prior = WOb[L] if site == "result" else None  # ridge shrinks toward the raw patch
            hm = HD.HeadMaps(cfg.map_solver, cfg.seed).fit(side.z_tr[L], target, groups, prior=prior)
            fitted_r2[(L, site)] = [float(x) for x in hm.score(side.z_tr[L], target)]
            head_fits[(L, site)] = hm.fit_summaries()
            sources[(L, site, source)] = (hm.transform(side.z_sel[L]), hm.transform(side.z_val[L]))
    # the engine runs the clean pass once per call: one call per split, every condition in it
    say("single-head scan (select split)", 0.35)
    singles = [(h,) for h in range(n_heads)]
    kl_sel = HD.grouped_head_effects(p_sel, [(L, site, sources[(L, site, src)][0], singles) for L, site, src in plan],
                                     vocab)
    sets = {e: _val_sets(HD.rank_heads(kl_sel[i]), cfg, n_heads) for i, e in enumerate(plan)}
    # the site check: both sites' all-heads effect with the raw source at every layer (z-site blindness)
    check = [(L, site) for L in layers for site in HD.HEAD_SITES]
    say("head sets (val split)", 0.55)
    kl_val = HD.grouped_head_effects(p_val, [(L, site, HD.site_values(side.z_val[L], WOb[L], site),
                                              [tuple(range(n_heads))]) for L, site in check]
                                     + [(e[0], e[1], sources[e][1], sets[e]["all"]) for e in plan], vocab)
    return HeadsPart(list(layers), np.asarray(floor, np.float64),
                     {e: kl_sel[i] for i, e in enumerate(plan)}, {c: kl_val[i][0] for i, c in enumerate(check)},
                     {e: kl_val[len(check) + i] for i, e in enumerate(plan)}, fitted_r2, head_fits, engine)


def reduce_rq4(session: PairSession, cfg: RQ4Config, parts: list[HeadsPart]) -> StepResult:
    """RQ4's results from the patches of every layer (no model): noise floor, rankings, coverage, CIs."""
    spec, info = session.spec, session.info
    prep_sel, prep_val, prep_tr = _preps(session, cfg)
    sv, n_heads = session.shared_vocab, info.base.n_heads
    parts = sorted(parts, key=lambda p: p.layers[0])
    layers = [L for p in parts for L in p.layers]
    if layers != rq4_layers(cfg):
        raise MdiffError(f"RQ4's patches cover layers {layers}, not {rq4_layers(cfg)}")
    kl_sel = {k: v for p in parts for k, v in p.kl_sel.items()}
    kl_val = {k: v for p in parts for k, v in p.kl_val.items()}
    kl_check = {k: v for p in parts for k, v in p.kl_check.items()}
    fitted_r2 = {k: v for p in parts for k, v in p.fitted_r2.items()}
    head_fits = {k: v for p in parts for k, v in p.head_fits.items()}
    engine = parts[0].engine
    noise = NoiseFloor.measure(spec.dtype, engine["used"], [p.floor for p in parts])
    tol = noise.tolerance
    idx = stats.resample_indices(len(prep_val), cfg.n_boot, cfg.seed + 1)
    idx_sel = stats.resample_indices(len(prep_sel), cfg.n_boot, cfg.seed + 2)
    rows: list[dict] = []
    summary_layers: list[dict] = []
    site_check: dict[int, dict] = {}
    for L in layers:
        eff = {}
        for site in HD.HEAD_SITES:
            kl = kl_check[(L, site)]
            v, lo, hi = stats.bootstrap_mean(kl, idx=idx)
            eff[site] = v
            rows.append({"layer": L, "hook": site, "condition": "raw|all", "metric": S.EFFECT_ALL_SITE_CHECK,
                         "value": v, "ci_low": lo, "ci_high": hi, "n": len(kl), "split": "val", "site": site,
                         "source": "raw"})
        site_check[L] = {"effect_all_result": eff["result"], "effect_all_z": eff["z"],
                         "note": HD.site_blindness(eff, tol)}
    for e in _plan(cfg, layers):
        L, site, source = e
        sets = _val_sets(HD.rank_heads(kl_sel[e]), cfg, n_heads)
        res = _analyse_layer(kl_sel[e], kl_val[e], sets, source, cfg, n_heads, idx, idx_sel, tol, info.base.n_kv_heads)
        for r in res["rows"]:
            rows.append({"layer": L, "hook": site, "site": site, "source": source, **r})
        summary_layers.append({"layer": L, "site": site, "source": source,
                               "control_layer": L == cfg.control_layer and L not in cfg.layers,
                               **res["summary"],
                               **({"map_r2_train": fitted_r2[(L, site)], "map_fits": head_fits[(L, site)]}
                                  if source == "mapped" else {})})
    metrics = tidy([{"pair": spec.name, "rq": "rq4", **r} for r in rows])
    summary = _summary(spec, cfg, summary_layers, site_check, tol)
    summary["noise"] = noise.to_dict()
    config = dict(train=prep_tr.summary() if prep_tr is not None else None, target="tuned",
                  position="decision position (last content token)", engine=engine,
                  ranking_stability=f"bootstrap over select prompts ({cfg.n_boot} resamples); a top-k is stable "
                                    f"when each member is in the top-k in >= {100 * HD.STABLE_FREQ:.0f}% of resamples")
    return StepResult(metrics, summary, sv.size, prep_val.tokenized_with, {"select": prep_sel, "val": prep_val},
                      config)


def compute_rq4(session: PairSession, cfg: RQ4Config, say: Callable[[str, float], None]) -> StepResult:
    """RQ4 over ``session`` (reads heads in memory; writes nothing): the base model's heads (:func:`rq4_side`),
    then every layer patched into the tuned model (:func:`rq4_heads`), then :func:`reduce_rq4` — the same
    functions a study runs as units."""
    say("loading base", 0.02)
    with session.model("base") as m:
        side = rq4_side(session, cfg, m, say)
    say("loading tuned", 0.15)
    with session.model("tuned") as m:
        part = rq4_heads(session, cfg, m, side, rq4_layers(cfg), say)
    return reduce_rq4(session, cfg, [part])


def _val_sets(ranking: list[int], cfg: RQ4Config, n_heads: int) -> dict[str, Any]:
    """The val-split head sets of one (layer, site, source): all heads, singles, top-k, random-k."""
    top = {k: tuple(sorted(ranking[:k])) for k in cfg.ks}
    rand = {k: HD.random_sets(n_heads, k, cfg.random_sets, cfg.seed) for k in cfg.ks}
    singles = [(h,) for h in range(n_heads)]
    return {"ranking": ranking, "top": top, "rand": rand,
            "all": [tuple(range(n_heads))] + singles + [top[k] for k in cfg.ks] + [s for k in cfg.ks for s in rand[k]]}


def _analyse_layer(kl_sel, kl, sets, source, cfg, n_heads, idx, idx_sel, tol, n_kv=None):
    rows: list[dict] = []
    ranking, top, rand = sets["ranking"], sets["top"], sets["rand"]
    stab = HD.rank_stability(kl_sel, cfg.ks, idx_sel)
    for h in range(n_heads):
        v, lo, hi = stats.bootstrap_mean(kl_sel[h], idx=idx_sel)
        rows.append({"condition": f"{source}|head:{h}", "metric": S.EFFECT, "value": v, "ci_low": lo, "ci_high": hi,
                     "n": kl_sel.shape[1], "split": "select", "k": 1, "heads": str(h), "set": "single",
                     "rank": ranking.index(h) + 1})
        for k in cfg.ks:
            rows.append({"condition": f"{source}|head:{h}", "metric": S.TOPK_FREQ, "value": stab.head_freq[k][h],
                         "n": stab.n_resamples, "split": "select", "k": k, "heads": str(h), "set": "single"})
    all_kl = kl[0]
    a, alo, ahi = stats.bootstrap_mean(all_kl, idx=idx)
    nothing = a <= tol
    rows.append({"condition": f"{source}|all", "metric": S.EFFECT, "value": a, "ci_low": alo, "ci_high": ahi,
                 "n": len(all_kl), "split": "val", "k": n_heads, "heads": _fmt_heads(sets["all"][0]),
                 "set": "all"})

    def record(name, s, kl_s, kind, k):
        v, lo, hi = stats.bootstrap_mean(kl_s, idx=idx)
        c = HD.coverage(kl_s, all_kl, idx, floor=tol)
        base = {"split": "val", "k": k, "heads": _fmt_heads(s), "set": kind, "n": len(kl_s)}
        rows.append({"condition": f"{source}|{name}", "metric": S.EFFECT, "value": v, "ci_low": lo, "ci_high": hi,
                     **base})
        rows.append({"condition": f"{source}|{name}", "metric": S.COVERAGE, "value": c.value, "ci_low": c.ci_low,
                     "ci_high": c.ci_high, **base})
        return v, c

    single_val = {}
    for h in range(n_heads):
        single_val[h] = record(f"head:{h}", (h,), kl[1 + h], "single", 1)
    cov = {}
    off = 1 + n_heads + len(cfg.ks)
    for i, k in enumerate(cfg.ks):
        _, c_top = record(f"top-{k}", top[k], kl[1 + n_heads + i], "top", k)
        null = []
        for j, s in enumerate(rand[k]):
            _, c = record(f"random-{k}#{j}", s, kl[off], "random", k)
            null.append(c.value)
            off += 1
        pct = HD.null_percentile(c_top.value, null) if k < n_heads else float("nan")  # k = all: no null
        finite = [v for v in null if np.isfinite(v)]
        q = (np.quantile(finite, [0.05, 0.5, 0.95]).tolist() if finite else [float("nan")] * 3)
        for metric, val in ((S.NULL_PERCENTILE, pct), (S.NULL_Q05, q[0]), (S.NULL_MEDIAN, q[1]),
                            ("null_q95", q[2]), ("null_mean", float(np.mean(finite)) if finite else float("nan"))):
            rows.append({"condition": f"{source}|top-{k}", "metric": metric, "value": val, "n": len(null),
                         "split": "val", "k": k, "heads": _fmt_heads(top[k]), "set": "top"})
        cov[k] = {"heads": list(top[k]), "coverage": c_top.value, "ci": [c_top.ci_low, c_top.ci_high],
                  "random_null": {"n_sets": len(null), "q05": q[0], "median": q[1], "q95": q[2]},
                  "null_percentile": pct,
                  # a ranking of effects that are all within noise is index order, not a finding
                  "stability": None if nothing else {"head_freq": {str(h): stab.head_freq[k][h] for h in top[k]},
                                                     "set_freq": stab.set_freq[k], "stable": stab.stable[k]},
                  "kv_group": None if nothing else HD.kv_group_of(top[k], n_heads, n_kv)}
    summary = {
        "ranking_select": ranking,
        "single_effect_select": [float(kl_sel[h].mean()) for h in range(n_heads)],
        "single_effect_val": [single_val[h][0] for h in range(n_heads)],
        "effect_all": {"value": a, "ci": [alo, ahi]},
        "nothing_to_cover": bool(nothing),
        "coverage": {str(k): v for k, v in cov.items()},
    }
    return {"rows": rows, "summary": summary}


def _stability_text(k: int, c: dict) -> str:
    """"each in the top-2 in 97%, 95% of select resamples", or the unstable members."""
    st = c["stability"]
    freqs = [(int(h), f) for h, f in st["head_freq"].items()]
    if st["stable"]:
        return (f"stable: head{'s' if len(freqs) > 1 else ''} " + ", ".join(f"{h} in {100 * f:.0f}%" for h, f in freqs)
                + f" of select resamples' top-{k}")
    weak = [(h, f) for h, f in freqs if f < HD.STABLE_FREQ]
    return ("UNSTABLE: " + ", ".join(f"head {h} is in the top-{k} in only {100 * f:.0f}%" for h, f in weak)
            + " of select resamples, so this membership is within noise")


def _summary(spec, cfg, layers, site_check, tol=HD.EFFECT_FLOOR) -> dict[str, Any]:
    findings = []
    for e in layers:
        tag = f"L{e['layer']} {e['site']} site, {e['source']} source"
        if e["nothing_to_cover"]:
            why = ""
            sc = site_check.get(e["layer"], {})
            if e["site"] == "z" and sc.get("note"):
                why = " — " + sc["note"]
            raw_all = sc.get("effect_all_" + e["site"], 0.0)
            if e["source"] == "mapped" and raw_all > tol:
                why = (f" — the raw base heads do change the output here ({raw_all:.3g} nats), "
                       "so the per-head maps transport these heads essentially fully")
            e["verdict"] = (f"{tag}: patching all heads changes nothing (effect "
                            f"{max(e['effect_all']['value'], 0.0):.2g} nats), "
                            f"so coverage is undefined{why}")
        else:
            parts = []
            for k, c in e["coverage"].items():
                if int(k) == len(e["single_effect_val"]):
                    continue  # top-n_heads is all heads: coverage 1 by definition
                group = (f" = KV group {c['kv_group']}, all the query heads that share one key/value head"
                         if c.get("kv_group") is not None else "")
                parts.append(f"top-{k} (heads {_fmt_heads(c['heads'])}{group}) covers {100 * c['coverage']:.0f}% "
                             f"[{100 * c['ci'][0]:.0f}, {100 * c['ci'][1]:.0f}] vs random-{k} median "
                             f"{100 * c['random_null']['median']:.0f}% (percentile {c['null_percentile']:.0f}; "
                             f"{_stability_text(int(k), c)})")
            e["verdict"] = f"{tag}: " + "; ".join(parts)
        findings.append(e["verdict"])
    for L, sc in sorted(site_check.items()):
        if sc["note"]:
            findings.append(f"L{L}: {sc['note']}")
    out = {"pair": spec.name, "sites": cfg.sites, "sources": cfg.sources, "ks": cfg.ks,
           "control_layer": cfg.control_layer, "layers": layers,
           "site_check": {str(k): v for k, v in site_check.items()}, "findings": findings,
           "definitions": {"effect": "mean over val prompts of KL(P_tuned_clean || P_tuned_patched) at the decision "
                                     "position, shared vocabulary; only the heads in the set are patched",
                           "coverage": "effect(set) / effect(all heads), paired prompt-bootstrap 95% CI",
                           "ranking": "single-head effects on the select split",
                           "null_percentile": "percent of random k-sets (same layer) whose coverage is <= top-k's",
                           "stability": "share of bootstrap resamples of the select prompts whose top-k contains the "
                                        f"head; a top-k is stable when every member reaches {HD.STABLE_FREQ:.0%}",
                           "kv_group": "GQA: the top-k is exactly the query heads sharing one key/value head"}}
    if spec.truth is not None:
        out["truth"] = spec.truth
    return out


def load_summary(out: str | Path, pair: str) -> dict[str, Any]:
    import json

    f = Path(out) / pair / "rq4" / "summary.json"
    if not f.is_file():
        raise MdiffError(f"no RQ4 results at {f.parent}: run RQ4 on pair {pair!r} first")
    return json.loads(f.read_text())


STEP = Step("rq4", check_rq4, compute_rq4, figures_rq4)
