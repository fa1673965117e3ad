"""The study report: ``OUT/<pair>/report/index.html`` (self-contained) and ``summary.md``.

Everything in it is read back from the RQ folders (``metrics.csv``, ``summary.json``, ``config.json``);
figures are rebuilt from the tidy metrics by :mod:`mdiff.figures`. The findings are sentences generated
from those numbers (:func:`findings`); each carries the values it quotes, so tests can check every
sentence against the metrics. A sentence only says what its numbers show: "beats" needs a CI that
clears the baseline's, "nothing to drop" is said when the raw effect is ≈ 0, and so on.
"""

import dataclasses
import html
import json
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from mdiff import figures
from mdiff import schema as S
from mdiff.activations import atomic_write_text
from mdiff.errors import MdiffError
from mdiff.schema import CROSS_B2T, CROSS_T2B

RQS = ("rq1", "rq2", "rq3", "rq4")


@dataclasses.dataclass
class Finding:
    rq: str
    text: str
    values: dict[str, Any] = dataclasses.field(default_factory=dict)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _ci(lo: float, hi: float, pct: bool = True) -> str:
    return f"[{100 * lo:.0f}, {100 * hi:.0f}]" if pct else f"[{lo:.3g}, {hi:.3g}]"


def load_results(out: str | Path, pair: str) -> dict[str, dict]:
    """``{rq: {"summary", "metrics", "config", "path"}}`` for every RQ folder that exists."""
    res = {}
    for rq in RQS:
        d = Path(out) / pair / rq
        if (d / "summary.json").is_file():
            try:
                res[rq] = {"summary": json.loads((d / "summary.json").read_text()),
                           "metrics": pd.read_csv(d / "metrics.csv"),
                           "config": json.loads((d / "config.json").read_text()), "path": d}
            except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
                raise MdiffError(f"{d} cannot be read ({type(e).__name__}: {first}); move that folder away "
                                 f"and run {rq} again") from None
    return res


def _layer_list(layers: list[int]) -> str:
    layers = sorted(layers)
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}–{layers[-1]}"
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(str(x) for x in layers)


def findings(res: dict[str, dict]) -> list[Finding]:
    out: list[Finding] = []
    if "rq1" in res:
        s, m = res["rq1"]["summary"], res["rq1"]["metrics"]
        hook = s["hook"]
        if s["first_divergent_layer"] is None:
            out.append(Finding("rq1", f"Base and tuned agree at every layer measured ({hook}: CKA ≈ 1 and patch KL "
                                      "≈ 0): RQ1 finds no difference."))
        else:
            mm = m[(m.hook == hook)]
            ck = mm[mm.metric == S.CKA].set_index("layer")
            kl = mm[(mm.metric == S.PATCH_KL) & (mm.condition == CROSS_B2T)].set_index("layer")
            Lc, Lk = int(ck.value.idxmin()), int(kl.value.idxmax())
            top = s["largest_patch_kl_layers"][:2]
            out.append(Finding(
                "rq1", f"Representations first differ at layer {s['first_divergent_layer']} ({hook}). "
                       f"{_layer_list(top).capitalize()} diverge most causally: patching base activations into the "
                       f"tuned model changes its next-token distribution most at L{Lk} (KL {kl.value[Lk]:.3g} nats "
                       f"{_ci(kl.ci_low[Lk], kl.ci_high[Lk], False)}); CKA is lowest at L{Lc} "
                       f"({ck.value[Lc]:.3f} {_ci(ck.ci_low[Lc], ck.ci_high[Lc], False)}).",
                {"first_divergent_layer": s["first_divergent_layer"], "kl_layer": Lk, "kl": float(kl.value[Lk]),
                 "cka_layer": Lc, "cka": float(ck.value[Lc]), "probe_layers": top}))
            for h, name in (("attn_out", "attention"), ("mlp_out", "MLP")):
                v = s.get("per_hook", {}).get(h)
                L = None if v is None else v.get("peak_layer")
                c = s.get("components", {}).get(str(L)) if L is not None else None
                if L is None or c is None:
                    continue
                kv = v["patch_kl_base_to_tuned"][str(L)]
                who = (f"the {c['component']} carries the larger patch KL there (CIs apart)" if c["clear"]
                       else "attention and MLP patch KLs overlap there")
                first = s["first_divergent_layer"]
                if first is not None and L > first:
                    who += (f", downstream of L{first} where the models first diverge, so it also carries what "
                            "changed upstream")
                out.append(Finding("rq1", f"The {name} output's patch KL ({h}) peaks at L{L} ({kv:.3g} nats); {who}.",
                                   {"layer": L, "hook": h, "kl": kv, "component": c["component"]}))
        ok = s.get("self_patch_ok", True)
        noise = s.get("noise", {})
        if "kl_tolerance" not in noise:
            tol = ""
        elif noise["kl_tolerance"] > noise.get("abs_floor", 0.0):
            tol = (f" KL differences up to {noise['kl_tolerance']:.2g} nats are treated as arithmetic noise "
                   f"({noise.get('dtype', '')}: {noise.get('factor', 10):g} × the KL of one rounding error).")
        else:
            tol = (f" KL differences up to {noise['kl_tolerance']:.2g} nats (the absolute floor; one "
                   f"{noise.get('dtype', '')} rounding error costs far less) are treated as arithmetic noise.")
        out.append(Finding("rq1", f"Self-patch sanity check {'passes' if ok else 'FAILS'}: patching a model with its "
                                  f"own activations gives KL at most {s['self_patch_max_kl']:.1e} nats.{tol}",
                           {"self_patch_max_kl": s["self_patch_max_kl"], "ok": ok,
                            "kl_tolerance": noise.get("kl_tolerance")}))
    if "rq2" in res:
        s = res["rq2"]["summary"]
        b = s.get("best_site")
        site = None if b is None else next(x for x in s["sites"] if x["layer"] == b["layer"] and x["hook"] == b["hook"])
        if site is None:
            out.append(Finding("rq2", "No learned map could be evaluated at the probe sites (nothing to drop)."))
        else:
            ms, sh = site.get("mean_shift_drop"), site.get("shuffled_drop")
            t = (f"A {site['solver']} map removes {_pct(site['drop'])} {_ci(*site['ci'])} of the patch KL at "
                 f"L{site['layer']} {site['hook']} (α={site['alpha']:g}, {s['alpha_mode']} mode, val prompts; map, "
                 f"fit rows and α chosen on the select split); it "
                 f"{'beats' if site['beats_mean_shift'] else 'does not clearly beat'} the mean-shift baseline")
            if ms:
                t += f" ({_pct(ms['value'])} {_ci(*ms['ci'])})"
            t += f" and {'beats' if site['beats_shuffled'] else 'does not clearly beat'} the shuffled-pairs null"
            if sh:
                t += f" ({_pct(sh['value'])} {_ci(*sh['ci'])})"
            rev = site.get("reverse_drop")
            if rev and rev.get("value") is not None and rev["value"] == rev["value"]:
                t += f"; in the reverse direction (tuned → base) the same solver removes {_pct(rev['value'])}"
            out.append(Finding("rq2", t + ".", {"layer": site["layer"], "hook": site["hook"], "solver": site["solver"],
                                                "alpha": site["alpha"], "drop": site["drop"], "ci": site["ci"]}))
        for w in s.get("warnings", []):
            out.append(Finding("rq2", f"Warning: {w}.", {"warning": w}))
        for x in s["sites"]:
            if x.get("control_site"):
                out.append(Finding("rq2", f"Control site L{x['layer']} {x['hook']}: {x['verdict']}.",
                                   {"layer": x["layer"], "nothing_to_drop": x["nothing_to_drop"]}))
    if "rq3" in res:
        s = res["rq3"]["summary"]
        for f in [*s["findings"], *(f"Warning: {w}" for w in s.get("warnings", []))]:
            out.append(Finding("rq3", f + ".", {"smallest_k": s.get("smallest_k")}))
    if "rq4" in res:
        s = res["rq4"]["summary"]
        for e in s["layers"]:
            ctl = " (control layer)" if e["control_layer"] else ""
            out.append(Finding("rq4", e["verdict"].replace(" site,", f" site{ctl},", 1) + ".",
                               {"layer": e["layer"], "site": e["site"], "source": e["source"],
                                "coverage": e["coverage"], "nothing_to_cover": e["nothing_to_cover"]}))
        for L, sc in s["site_check"].items():
            if sc["note"]:
                out.append(Finding("rq4", f"L{L}: {sc['note']}.", {"layer": int(L), **sc}))
    return out


# --------------------------------------------------------------------------- tables
def rq1_table(r: dict) -> pd.DataFrame:
    m = r["metrics"]
    hook = r["summary"]["hook"]
    mm = m[m.hook == hook]
    rows = []
    for L in sorted(mm.layer.dropna().astype(int).unique()):
        g = mm[mm.layer == L]

        def get(metric, cond=None, g=g):
            x = g[(g.metric == metric) & ((g.condition == cond) if cond else True)]
            return x.iloc[0] if len(x) else None

        ck, dk = get(S.CKA), get(S.CKA_DEBIASED)
        bt, tb = get(S.PATCH_KL, CROSS_B2T), get(S.PATCH_KL, CROSS_T2B)
        rows.append({"layer": L,
                     "CKA [95% CI]": "" if ck is None else f"{ck.value:.3f} [{ck.ci_low:.3f}, {ck.ci_high:.3f}]",
                     "debiased CKA": "" if dk is None else f"{dk.value:.3f}",
                     "patch KL base→tuned": "" if bt is None else f"{bt.value:.3g} [{bt.ci_low:.3g}, {bt.ci_high:.3g}]",
                     "patch KL tuned→base": "" if tb is None else f"{tb.value:.3g}"})
    return pd.DataFrame(rows)


def rq2_table(r: dict) -> pd.DataFrame:
    rows = []
    for x in r["summary"]["sites"]:
        def fmt(d):
            return "" if not d or d.get("value") is None or d["value"] != d["value"] else \
                f"{_pct(d['value'])} {_ci(*d['ci'])}"
        rows.append({"site": f"L{x['layer']} {x['hook']}" + (" (control)" if x.get("control_site") else ""),
                     "best map": x["solver"] or "—", "α": "" if x["alpha"] is None else f"{x['alpha']:g}",
                     "drop [95% CI]": "" if x["solver"] is None else f"{_pct(x['drop'])} {_ci(*x['ci'])}",
                     "mean-shift": fmt(x.get("mean_shift_drop")), "shuffled null": fmt(x.get("shuffled_drop")),
                     "reverse": fmt(x.get("reverse_drop")), "verdict": x["verdict"]})
    return pd.DataFrame(rows)


def rq3_table(r: dict) -> pd.DataFrame:
    s = r["summary"]
    rows = []
    ks = list(next(iter(s["methods"].values()))["drop"].keys()) if s["methods"] else []
    for k in ks:
        row = {"k": k}
        for method, v in s["methods"].items():
            d = v["drop"][k]
            row[f"{method} drop [95% CI]"] = "—" if d["value"] is None or d["value"] != d["value"] else \
                f"{_pct(d['value'])} {_ci(*d['ci'])}"
            n = v["null"].get(k)
            row[f"{method} random-subspace null mean (max)"] = "" if not n else \
                f"{_pct(n['mean'])} ({_pct(n['max'])})"
        rows.append(row)
    return pd.DataFrame(rows)


def rq4_table(r: dict) -> pd.DataFrame:
    rows = []
    for e in r["summary"]["layers"]:
        for k, c in e["coverage"].items():
            rows.append({"layer": f"L{e['layer']}" + (" (control)" if e["control_layer"] else ""), "site": e["site"],
                         "source": e["source"], "k": int(k), "top-k heads": "+".join(map(str, c["heads"])),
                         "coverage [95% CI]": "undefined (effect ≈ 0)" if e["nothing_to_cover"] else
                         f"{_pct(c['coverage'])} {_ci(*c['ci'])}",
                         "random-k median (5–95%)": "" if e["nothing_to_cover"] else
                         f"{_pct(c['random_null']['median'])} ({_pct(c['random_null']['q05'])}–"
                         f"{_pct(c['random_null']['q95'])})",
                         "percentile in null": "" if e["nothing_to_cover"] else f"{c['null_percentile']:.0f}"})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- figures
def report_figures(res: dict[str, dict]) -> list[tuple[str, str, go.Figure]]:
    """``(id, caption, figure)`` for every figure the results allow."""
    pair = next(iter(res.values()))["summary"]["pair"] if res else ""
    figs: list[tuple[str, str, go.Figure]] = []
    if "rq1" in res:
        m = res["rq1"]["metrics"]
        figs.append(("fig-rq1-cka", "RQ1: CKA per layer", figures.cka_figure(m, pair)))
        figs.append(("fig-rq1-patch-kl", "RQ1: cross-patch KL per layer", figures.patch_kl_figure(m, pair)))
    if "rq2" in res:
        m, mode = res["rq2"]["metrics"], res["rq2"]["summary"]["alpha_mode"]
        figs.append(("fig-rq2-drop", "RQ2: drop per site and map", figures.drop_figure(m, pair, mode)))
        figs.append(("fig-rq2-r2-vs-drop", "RQ2: R² vs drop", figures.r2_vs_drop_figure(m, pair)))
    if "rq3" in res:
        figs.append(("fig-rq3-drop-vs-k", "RQ3: drop(k)", figures.rank_figure(res["rq3"]["metrics"], pair)))
    if "rq4" in res:
        m, s = res["rq4"]["metrics"], res["rq4"]["summary"]
        for site in s["sites"]:
            for src in s["sources"]:
                figs.append((f"fig-rq4-heads-{site}-{src}", f"RQ4: single-head effects ({site} site, {src} source)",
                             figures.head_heatmap(m, pair, site, src)))
                figs.append((f"fig-rq4-coverage-{site}-{src}", f"RQ4: coverage vs k ({site} site, {src} source)",
                             figures.coverage_figure(m, pair, site, src)))
    return figs


# --------------------------------------------------------------------------- writing
PAGE_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .5em;
text-align:left;vertical-align:top}th{background:#f4f4f4}.findings li{margin:.4em 0}.truth{background:#fff8e1;
padding:.6em 1em;border-left:4px solid #f0b400}.mdiff-figure{margin:1.5em 0}.meta{color:#666;font-size:.85em}"""


def md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return ""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


SECTIONS = {"rq1": ("RQ1 — where did the fine-tune change the model?", rq1_table),
            "rq2": ("RQ2 — how much of the change is a linear transport?", rq2_table),
            "rq3": ("RQ3 — how low-rank is that transport?", rq3_table),
            "rq4": ("RQ4 — which attention heads carry it?", rq4_table)}


def build_report(out: str | Path, pair: str) -> Path:
    """Write ``OUT/<pair>/report/index.html`` and ``summary.md`` from whatever RQ results exist."""
    from plotly.offline import get_plotlyjs

    res = load_results(out, pair)
    if not res:
        raise MdiffError(f"no results for pair {pair!r} under {Path(out) / pair}: run the study on pair {pair!r} first")
    d = Path(out) / pair / "report"
    d.mkdir(parents=True, exist_ok=True)
    fnd = findings(res)
    figs = report_figures(res)
    cfg = next(iter(res.values()))["config"]
    prov = cfg.get("provenance", {})
    truth = cfg.get("pair", {}).get("truth")
    pair_info = cfg.get("pair", {})
    parts = [f"<h1>mdiff study: {html.escape(pair)}</h1>",
             f"<p class='meta'>base <code>{html.escape(str(pair_info.get('base')))}</code> → tuned "
             f"<code>{html.escape(str(pair_info.get('tuned')))}</code>; mdiff git {html.escape(str(prov.get('git_commit')))}"
             ". Definitions: METHODS.md. Reported numbers are on the val "
             "split with 95% prompt-bootstrap CIs unless stated.</p>"]
    if truth:
        parts.append("<div class='truth'><b>Planted ground truth (toy pair, known by construction — not a finding):"
                     f"</b> {html.escape(json.dumps(truth))}</div>")
    parts.append("<h2>Findings</h2><ul class='findings'>")
    parts += [f"<li><b>{f.rq.upper()}</b> {html.escape(f.text)}</li>" for f in fnd]
    parts.append("</ul>")
    md = [f"# mdiff study: {pair}", "", f"base `{pair_info.get('base')}` → tuned `{pair_info.get('tuned')}`; "
          f"git {prov.get('git_commit')} (run times: each rq*/config.json)", ""]
    if truth:
        md += [f"> Planted ground truth (toy pair, not a finding): `{json.dumps(truth)}`", ""]
    md += ["## Findings", ""] + [f"- **{f.rq.upper()}** {f.text}" for f in fnd] + [""]
    for rq, (title, table) in SECTIONS.items():
        if rq not in res:
            continue
        tdf = table(res[rq])
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(tdf.to_html(index=False, escape=True, border=0))
        for fid, cap, fig in figs:
            if fid.startswith(f"fig-{rq}-"):
                parts.append(f"<div class='mdiff-figure' id='{fid}'><h3>{html.escape(cap)}</h3>"
                             + fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"{fid}-plot")
                             + "</div>")
        parts.append(f"<p class='meta'>files: <code>{html.escape(str(res[rq]['path']))}</code></p>")
        md += [f"## {title}", "", md_table(tdf), ""]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>mdiff study: " + html.escape(pair)
            + "</title><style>" + PAGE_CSS + "</style><script type='text/javascript'>" + get_plotlyjs()
            + "</script></head><body>" + "\n".join(parts) + "</body></html>")
    atomic_write_text(d / "index.html", page)
    atomic_write_text(d / "summary.md", "\n".join(md))
    atomic_write_text(d / "findings.json", json.dumps([dataclasses.asdict(f) for f in fnd], indent=2, default=str))
    return d / "index.html"
