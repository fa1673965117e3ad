"""``mdiff compare``: two (or more) finished studies side by side.

Reads each pair's ``OUT/<pair>/rq1..rq4`` results and writes ``OUT/compare/<a>_vs_<b>/``: ``index.html``
(self-contained: CKA curves overlaid, patch KL, best drop per site, drop(k), head coverage curves),
``summary.md``, and ``tldr.csv``: the original study's TL;DR (seed 003: "cultural: late-layer, low-rank,
attention-centric; cognitive: early–mid drift, late causal effects, high-rank/distributed; residual
transport strong, attention transport weak") rebuilt from measured numbers, one row per claim. The
comparative sentences say which pair is lower-rank or more head-concentrated only from the numbers,
and say "no clear difference" when the numbers do not separate them.
"""

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from mdiff import figures
from mdiff import schema as S
from mdiff.activations import atomic_write_text
from mdiff.errors import MdiffError
from mdiff.report import PAGE_CSS, RQS, load_results, md_table

_COL = figures.COLOURS


def _need(res: dict, pair: str) -> None:
    missing = [r for r in RQS if r not in res]
    if missing:
        raise MdiffError(f"pair {pair!r} has no {', '.join(missing)} results: run its study first, or rerun the "
                         "comparison with {option} to run it", option="run_missing")


def pair_facts(pair: str, res: dict) -> dict[str, Any]:
    """The numbers behind each TL;DR claim, for one pair."""
    s1, s2, s3, s4 = (res[r]["summary"] for r in ("rq1", "rq2", "rq3", "rq4"))
    n_layers = len(s1["cka"])
    d_model = res["rq1"]["config"]["pair_info"]["base"]["d_model"]
    facts: dict[str, Any] = {"pair": pair, "n_layers": n_layers, "d_model": d_model}
    cka = {int(k): v for k, v in s1["cka"].items()}
    facts["cka_min_layer"] = min(cka, key=cka.get)
    facts["cka_min"] = cka[facts["cka_min_layer"]]
    facts["first_divergent_layer"] = s1["first_divergent_layer"]
    facts["largest_kl_layers"] = s1["largest_patch_kl_layers"][:2]
    kl = {int(k): v for k, v in s1["patch_kl_base_to_tuned"].items()}
    facts["kl_max_layer"] = max(kl, key=kl.get)
    facts["kl_max"] = kl[facts["kl_max_layer"]]
    by_hook: dict[str, dict] = {}
    for x in s2["sites"]:
        if x["control_site"] or x["solver"] is None:
            continue
        key = "select_drop" if x.get("select_drop") is not None else "drop"  # chosen on select, reported on val
        if x["hook"] not in by_hook or x[key] > by_hook[x["hook"]].get(key, x[key]):
            by_hook[x["hook"]] = x
    facts["best_drop"] = {h: {"layer": x["layer"], "solver": x["solver"], "drop": x["drop"], "ci": x["ci"]}
                          for h, x in by_hook.items()}
    rrr = s3["methods"].get("rrr") or next(iter(s3["methods"].values()))
    sk = rrr["smallest_k"]
    facts["rank_site"] = f"L{s3['layer']} {s3['hook']}"
    facts["rank_k"], facts["rank_k_ci"] = sk["k"], sk["k_ci"]
    facts["rank_full_drop"] = rrr["full_rank_drop"]
    main = [e for e in s4["layers"] if not e["control_layer"] and e["site"] == "result" and e["source"] == "raw"]
    e = main[0] if main else None
    facts["heads_layer"] = None if e is None else e["layer"]
    facts["head_coverage"] = {} if e is None or e["nothing_to_cover"] else {
        int(k): {"coverage": c["coverage"], "ci": c["ci"], "null_median": c["random_null"]["median"],
                 "percentile": c["null_percentile"], "heads": c["heads"]} for k, c in e["coverage"].items()}
    return facts


def _depth(L, n):
    return "early" if L < n / 3 else "mid" if L < 2 * n / 3 else "late"


def tldr_table(facts: list[dict]) -> pd.DataFrame:
    rows = []

    def row(claim, fn):
        rows.append({"claim (seed 003)": claim, **{f["pair"]: fn(f) for f in facts}})

    row("where: largest causal effect (patch KL base→tuned)", lambda f: (
        f"L{f['kl_max_layer']} of {f['n_layers']} ({_depth(f['kl_max_layer'], f['n_layers'])}), "
        f"{f['kl_max']:.3g} nats"))
    row("where: representation drift (lowest CKA)", lambda f: (
        f"L{f['cka_min_layer']} ({_depth(f['cka_min_layer'], f['n_layers'])}), CKA {f['cka_min']:.3f}; first "
        f"divergent layer {f['first_divergent_layer']}"))
    for hook in ("resid_post", "attn_out"):
        row(f"transport: best map drop at {hook}", lambda f, h=hook: (
            "—" if h not in f["best_drop"] else
            f"{100 * f['best_drop'][h]['drop']:.0f}% [{100 * f['best_drop'][h]['ci'][0]:.0f}, "
            f"{100 * f['best_drop'][h]['ci'][1]:.0f}] (L{f['best_drop'][h]['layer']}, {f['best_drop'][h]['solver']})"))
    row("rank: smallest k reaching 90% of the full-rank drop (rrr)", lambda f: (
        f"k={f['rank_k']} (CI-confirmed k={f['rank_k_ci']}) of d_model {f['d_model']} at {f['rank_site']}; "
        f"full-rank drop {100 * f['rank_full_drop']:.0f}%"))
    for k in (1, 2):
        row(f"heads: top-{k} coverage (result site, raw)", lambda f, k=k: (
            "—" if k not in f["head_coverage"] else
            f"{100 * f['head_coverage'][k]['coverage']:.0f}% [{100 * f['head_coverage'][k]['ci'][0]:.0f}, "
            f"{100 * f['head_coverage'][k]['ci'][1]:.0f}] at L{f['heads_layer']} (random-{k} median "
            f"{100 * f['head_coverage'][k]['null_median']:.0f}%)"))
    return pd.DataFrame(rows)


def comparisons(facts: list[dict]) -> list[str]:
    """Plain sentences comparing the pairs, each only as strong as its numbers."""
    if len(facts) < 2:
        return []
    a, b = facts[0], facts[1]
    out = []
    ka, kb = a["rank_k_ci"], b["rank_k_ci"]
    inf = float("inf")  # no CI-confirmed k within the sweep: higher than every k swept
    if ka == kb:
        out.append(f"Rank: no clear difference in the CI-confirmed smallest k ({a['pair']} {ka}, {b['pair']} {kb}).")
    else:
        lo, hi = (a, b) if (inf if ka is None else ka) < (inf if kb is None else kb) else (b, a)
        other = (f"k={hi['rank_k_ci']}" if hi["rank_k_ci"] is not None
                 else "no k of the sweep (its CI never reaches the target)")
        out.append(f"Rank: {lo['pair']} is lower-rank: its transport reaches 90% of the full-rank drop at "
                   f"k={lo['rank_k_ci']} (CI-confirmed) vs {other} for {hi['pair']}.")
    ca, cb = a["head_coverage"].get(2), b["head_coverage"].get(2)
    if ca is None or cb is None:
        out.append("Heads: top-2 coverage is not available for both pairs.")
    elif ca["ci"][0] > cb["ci"][1] or cb["ci"][0] > ca["ci"][1]:
        hi, lo = (a, b) if ca["coverage"] > cb["coverage"] else (b, a)
        out.append(f"Heads: {hi['pair']} is more head-concentrated: its top-2 heads cover "
                   f"{100 * hi['head_coverage'][2]['coverage']:.0f}% of the all-heads effect at L{hi['heads_layer']} "
                   f"vs {100 * lo['head_coverage'][2]['coverage']:.0f}% for {lo['pair']} at L{lo['heads_layer']} "
                   "(95% CIs do not overlap).")
    else:
        out.append(f"Heads: no clear difference in top-2 coverage ({a['pair']} {100 * ca['coverage']:.0f}%, "
                   f"{b['pair']} {100 * cb['coverage']:.0f}%; CIs overlap).")
    return out


def compare_figures(pairs: list[str], results: dict[str, dict]) -> list[tuple[str, str, go.Figure]]:
    def rq1_curves(pick) -> pd.DataFrame:
        return pd.concat([pick(results[p]["rq1"]["metrics"]).assign(pair=p) for p in pairs])

    figs = [("fig-cmp-cka", "CKA curves overlaid", figures.lines_with_ci(
                rq1_curves(lambda m: m[(m.metric == S.CKA) & (m.hook == "resid_post")]), "pair",
                "CKA per layer (resid_post, 95% CI)", "linear CKA")),
            ("fig-cmp-patch-kl", "Patch KL overlaid", figures.lines_with_ci(
                rq1_curves(lambda m: m[(m.metric == S.PATCH_KL) & (m.hook == "resid_post")
                                       & (m.condition == S.CROSS_B2T)]), "pair",
                "Cross-patch KL base→tuned per layer (resid_post, 95% CI)", "KL (nats)"))]
    f = go.Figure()
    for i, p in enumerate(pairs):
        sites = [x for x in results[p]["rq2"]["summary"]["sites"] if x["solver"] is not None]
        f.add_trace(go.Bar(x=[f"L{x['layer']} {x['hook']}" for x in sites], y=[x["drop"] for x in sites], name=p,
                           marker_color=_COL[i],
                           error_y=dict(type="data", symmetric=False, array=[x["ci"][1] - x["drop"] for x in sites],
                                        arrayminus=[x["drop"] - x["ci"][0] for x in sites])))
    f.update_layout(template="plotly_white", barmode="group", title=dict(text="Best map's drop per site (95% CI)"),
                    yaxis=dict(title=dict(text="drop")))
    figs.append(("fig-cmp-drop", "Drop per site", f))
    f = go.Figure()
    for i, p in enumerate(pairs):
        m = results[p]["rq3"]["metrics"]
        d = m[(m.metric == S.DROP) & (m.k.astype(str) != "full")]
        if "method" in d:
            d = d[d.method == ("rrr" if (d.method == "rrr").any() else d.method.iloc[0])]
        d = d.assign(kk=d.k.astype(int)).sort_values("kk")
        f.add_trace(go.Scatter(x=d.kk, y=d.value, name=f"{p} ({d.layer.iloc[0]:.0f} {d.hook.iloc[0]})",
                               mode="lines+markers", line=dict(color=_COL[i]),
                               error_y=dict(type="data", symmetric=False, array=(d.ci_high - d.value).fillna(0),
                                            arrayminus=(d.value - d.ci_low).fillna(0))))
    f.update_layout(template="plotly_white", title=dict(text="drop(k) of the rank-k correction (rrr, val, 95% CI)"),
                    xaxis=dict(title=dict(text="k"), type="log", dtick=0.30103), yaxis=dict(title=dict(text="drop")))
    figs.append(("fig-cmp-rank", "drop(k)", f))
    f = go.Figure()
    for i, p in enumerate(pairs):
        m = results[p]["rq4"]["metrics"]
        s4 = results[p]["rq4"]["summary"]
        main = [e["layer"] for e in s4["layers"] if not e["control_layer"]]
        d = m[(m.metric == S.COVERAGE) & (m.set == "top") & (m.site == "result") & (m.source == "raw")
              & (m.layer.isin(main[:1]))].sort_values("k")
        nl = m[(m.metric == S.NULL_MEDIAN) & (m.site == "result") & (m.source == "raw") & (m.layer.isin(main[:1]))]
        f.add_trace(go.Scatter(x=d.k, y=d.value, name=f"{p} top-k (L{main[0] if main else '?'})",
                               mode="lines+markers", line=dict(color=_COL[i]),
                               error_y=dict(type="data", symmetric=False, array=(d.ci_high - d.value).fillna(0),
                                            arrayminus=(d.value - d.ci_low).fillna(0))))
        f.add_trace(go.Scatter(x=nl.sort_values("k").k, y=nl.sort_values("k").value, name=f"{p} random-k median",
                               mode="lines", line=dict(color=_COL[i], dash="dot")))
    f.update_layout(template="plotly_white", title=dict(text="Head coverage vs k (result site, raw source, val)"),
                    xaxis=dict(title=dict(text="k"), type="log", dtick=0.30103), yaxis=dict(title=dict(text="coverage")))
    figs.append(("fig-cmp-coverage", "Head coverage curves", f))
    return figs


def run_compare(pairs: list[str], out: str | Path, run_missing: bool = False, study_kw: dict | None = None) -> Path:
    """Write ``OUT/compare/<a>_vs_<b>/`` (index.html, summary.md, tldr.csv, facts.json)."""
    from plotly.offline import get_plotlyjs

    if len(pairs) < 2 or len(set(pairs)) != len(pairs):
        raise MdiffError(f"{{option}} needs at least two different pairs, got {pairs}", option="pairs")
    out = Path(out)
    results = {}
    for p in pairs:
        res = load_results(out, p)
        if run_missing and not set(RQS) <= set(res):
            from mdiff.pairs import resolve_pair
            from mdiff.study import StudyConfig, run_study

            run_study(resolve_pair(p, progress=True), StudyConfig(**(study_kw or {})), out)
            res = load_results(out, p)
        _need(res, p)
        results[p] = res
    facts = [pair_facts(p, results[p]) for p in pairs]
    table = tldr_table(facts)
    sentences = comparisons(facts)
    d = out / "compare" / "_vs_".join(pairs)
    d.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>mdiff compare: {' vs '.join(html.escape(p) for p in pairs)}</h1>",
             "<h2>Seed 003's TL;DR, rebuilt from measured numbers</h2>", table.to_html(index=False, border=0),
             "<ul class='findings'>" + "".join(f"<li>{html.escape(s)}</li>" for s in sentences) + "</ul>"]
    for fid, cap, fig in compare_figures(pairs, results):
        parts.append(f"<div class='mdiff-figure' id='{fid}'><h3>{html.escape(cap)}</h3>"
                     + fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"{fid}-plot") + "</div>")
    parts.append("<p class='meta'>Each pair's own report: " + ", ".join(
        f"<code>{html.escape(str(out / p / 'report' / 'index.html'))}</code>" for p in pairs) + "</p>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>mdiff compare</title><style>" + PAGE_CSS
            + "</style><script type='text/javascript'>" + get_plotlyjs() + "</script></head><body>"
            + "\n".join(parts) + "</body></html>")
    atomic_write_text(d / "index.html", page)
    md = [f"# mdiff compare: {' vs '.join(pairs)}", "", "## Seed 003's TL;DR, rebuilt from measured numbers", "",
          md_table(table), ""] + [f"- {s}" for s in sentences]
    atomic_write_text(d / "summary.md", "\n".join(md) + "\n")
    atomic_write_text(d / "tldr.csv", table.to_csv(index=False))
    atomic_write_text(d / "facts.json", json.dumps(facts, indent=2, default=_np))
    return d / "index.html"


def _np(o):
    if isinstance(o, np.generic):
        return o.item()
    return str(o)
