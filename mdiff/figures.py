"""Figures: functions that take tidy DataFrames and return ``go.Figure``; written as self-contained HTML.

HTML files embed plotly.js (``include_plotlyjs=True``), so they open offline; no CDN is referenced.
"""

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from mdiff import schema as S
from mdiff.tmpfiles import tmp_path

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def write_html(fig: go.Figure, path: str | Path) -> Path:
    """A self-contained HTML figure, written atomically; its div id comes from the file name (plotly's default
    is a random uuid), so the same figure always gives the same bytes."""
    path = Path(path)
    tmp = tmp_path(path)
    div_id = "mdiff-" + re.sub(r"[^A-Za-z0-9_-]", "-", path.stem)
    fig.write_html(str(tmp), include_plotlyjs=True, full_html=True, div_id=div_id)
    os.replace(tmp, path)
    return path


def _band(fig, x, lo, hi, colour, name):
    fig.add_trace(go.Scatter(x=list(x) + list(x)[::-1], y=list(hi) + list(lo)[::-1], fill="toself",
                             fillcolor=colour, opacity=0.18, line=dict(width=0), hoverinfo="skip",
                             showlegend=False, legendgroup=name))


def lines_with_ci(df: pd.DataFrame, group: str, title: str, y_title: str) -> go.Figure:
    """One line per ``group`` value over ``layer``, with a CI band from ``ci_low``/``ci_high``."""
    fig = go.Figure()
    for i, (key, g) in enumerate(df.sort_values("layer").groupby(group, sort=False)):
        c = COLOURS[i % len(COLOURS)]
        _band(fig, g["layer"], g["ci_low"], g["ci_high"], c, str(key))
        fig.add_trace(go.Scatter(
            x=g["layer"], y=g["value"], mode="lines+markers", name=str(key), line=dict(color=c), legendgroup=str(key),
            customdata=g[["ci_low", "ci_high", "n"]].to_numpy(),
            hovertemplate="L%{x}: %{y:.4f} [%{customdata[0]:.4f}, %{customdata[1]:.4f}] n=%{customdata[2]}"
                          "<extra>" + str(key) + "</extra>"))
    fig.update_layout(title=dict(text=title), xaxis=dict(title=dict(text="layer"), dtick=1),
                      yaxis=dict(title=dict(text=y_title)), template="plotly_white", hovermode="x unified")
    return fig


def cka_figure(metrics: pd.DataFrame, pair: str) -> go.Figure:
    d = metrics[metrics["metric"].isin([S.CKA, S.CKA_DEBIASED])].copy()
    d["series"] = d["metric"].map({S.CKA: "linear CKA", S.CKA_DEBIASED: "debiased CKA"}) + " · " + d["hook"]
    return lines_with_ci(d, "series", f"{pair}: base vs tuned representation similarity per layer "
                                      f"(95% CI: prompt bootstrap / prompt jackknife)", "CKA")


def patch_kl_figure(metrics: pd.DataFrame, pair: str) -> go.Figure:
    d = metrics[(metrics["metric"] == S.PATCH_KL)].copy()
    d["series"] = d["condition"] + " · " + d["hook"]
    return lines_with_ci(d, "series", f"{pair}: cross-model layer patch, KL(P_target_clean ‖ P_target_patched) "
                                      f"at the decision position (shared vocab; 95% prompt-bootstrap CI)", "KL (nats)")


def drop_figure(metrics: pd.DataFrame, pair: str, alpha_mode: str) -> go.Figure:
    """Drop per site and solver (bars with 95% CI), one panel row per α."""
    d = metrics[(metrics["metric"] == S.DROP)].copy()
    d["site"] = "L" + d["layer"].astype(int).astype(str) + " " + d["hook"]
    parts = S.rq2_condition_parts(d["condition"])
    d["solver"], d["alpha"] = parts["solver"], parts["alpha"]
    fig = go.Figure()
    for i, ((solver, alpha), g) in enumerate(d.groupby(["solver", "alpha"], sort=True)):
        fig.add_trace(go.Bar(
            x=g["site"], y=g["value"], name=f"{solver} (α={alpha:g})",
            marker_color=COLOURS[i % len(COLOURS)],
            error_y=dict(type="data", symmetric=False, array=(g["ci_high"] - g["value"]).fillna(0),
                         arrayminus=(g["value"] - g["ci_low"]).fillna(0)),
            hovertemplate="%{x}: drop %{y:.3f}<extra>" + f"{solver} α={alpha:g}" + "</extra>"))
    fig.update_layout(barmode="group", template="plotly_white",
                      title=dict(text=f"{pair}: drop = (KL_raw − KL_mapped)/KL_raw on val, target tuned, "
                                      f"{alpha_mode} mode, raw patch at the same α (95% prompt-bootstrap CI)"),
                      yaxis=dict(title=dict(text="drop")), xaxis=dict(title=dict(text="site")))
    return fig


def r2_vs_drop_figure(metrics: pd.DataFrame, pair: str) -> go.Figure:
    """Val R² of each map against its drop at the largest α."""
    r2 = metrics[metrics["metric"] == S.R2_VAL][["layer", "hook", "condition", "value"]].rename(
        columns={"value": "r2", "condition": "solver"})
    d = metrics[metrics["metric"] == S.DROP].copy()
    parts = S.rq2_condition_parts(d["condition"])
    d["solver"], d["alpha"] = parts["solver"], parts["alpha"]
    d = d[d["alpha"] == d["alpha"].max()]
    j = r2.merge(d[["layer", "hook", "solver", "value"]], on=["layer", "hook", "solver"])
    fig = go.Figure(go.Scatter(
        x=j["r2"], y=j["value"], mode="markers", text="L" + j["layer"].astype(int).astype(str) + " " + j["hook"]
        + " " + j["solver"], hovertemplate="%{text}<br>R² %{x:.3f}, drop %{y:.3f}<extra></extra>"))
    fig.update_layout(template="plotly_white", title=dict(text=f"{pair}: val R² of the map vs its patch-KL drop"),
                      xaxis=dict(title=dict(text="R² (val)")), yaxis=dict(title=dict(text="drop")))
    return fig


def head_heatmap(metrics: pd.DataFrame, pair: str, site: str, source: str, split: str = "val") -> go.Figure:
    """Layer × head heatmap of single-head effects (KL nats), diverging scale centred at 0, hover ``L{l}H{h}``."""
    d = metrics[(metrics["metric"] == S.EFFECT) & (metrics["set"] == "single") & (metrics["site"] == site)
                & (metrics["source"] == source) & (metrics["split"] == split)].copy()
    d["head"] = d["heads"].astype(int)
    layers = sorted(d["layer"].astype(int).unique())
    heads = sorted(d["head"].unique())
    z = np.full((len(layers), len(heads)), np.nan)
    lo, hi = np.full_like(z, np.nan), np.full_like(z, np.nan)
    for r in d.itertuples():
        i, j = layers.index(int(r.layer)), heads.index(int(r.head))
        z[i, j], lo[i, j], hi[i, j] = r.value, r.ci_low, r.ci_high
    text = [[f"L{L}H{h}" for h in heads] for L in layers]
    # ranking stability (RQ4 runs record it): share of select-split resamples whose top-k holds the head

    f = metrics[(metrics["metric"] == S.TOPK_FREQ) & (metrics["site"] == site) & (metrics["source"] == source)] \
        if "metric" in metrics else metrics.iloc[0:0]
    for r in f.sort_values("k").itertuples():
        L, h = int(r.layer), int(r.heads)
        if L in layers and h in heads:
            i, j = layers.index(L), heads.index(h)
            sep = "; " if "top-" in text[i][j] else "<br>in the top-k of select resamples: "
            text[i][j] += f"{sep}top-{int(r.k)} {100 * r.value:.0f}%"
    zmax = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"H{h}" for h in heads], y=[f"L{L}" for L in layers], text=text,
        customdata=np.dstack([lo, hi]), colorscale="RdBu_r", zmid=0, zmin=-zmax or -1, zmax=zmax or 1,
        colorbar=dict(title=dict(text="KL (nats)")),
        hovertemplate="%{text}: effect %{z:.4f} [%{customdata[0]:.4f}, %{customdata[1]:.4f}]<extra></extra>"))
    fig.update_layout(template="plotly_white",
                      title=dict(text=f"{pair}: single-head patch effect, {site} site, {source} source, {split} split "
                                      f"(KL(P_tuned_clean ‖ P_patched), 95% prompt-bootstrap CI on hover)"),
                      xaxis=dict(title=dict(text="query head")), yaxis=dict(title=dict(text="layer")))
    return fig


def coverage_figure(metrics: pd.DataFrame, pair: str, site: str, source: str) -> go.Figure:
    """Coverage of the top-k heads over k with its CI, against the random-k null (5–95% band and median)."""
    d = metrics[(metrics["site"] == site) & (metrics["source"] == source) & (metrics["split"] == "val")]
    fig = go.Figure()
    for i, (L, g) in enumerate(d.groupby("layer", sort=True)):
        c = COLOURS[i % len(COLOURS)]
        top = g[(g["metric"] == S.COVERAGE) & (g["set"] == "top")].sort_values("k")
        if top["value"].isna().all():
            continue
        null = g[(g["set"] == "top") & g["metric"].isin([S.NULL_Q05, S.NULL_MEDIAN, S.NULL_Q95])]
        nb = null.pivot_table(index="k", columns="metric", values="value").sort_index()
        name = f"L{int(L)}"
        _band(fig, nb.index, nb[S.NULL_Q05], nb[S.NULL_Q95], c, name)
        fig.add_trace(go.Scatter(x=nb.index, y=nb[S.NULL_MEDIAN], mode="lines", line=dict(color=c, dash="dot"),
                                 name=f"{name} random-k median (5–95% band)", legendgroup=name))
        fig.add_trace(go.Scatter(
            x=top["k"], y=top["value"], mode="lines+markers", name=f"{name} top-k", line=dict(color=c),
            legendgroup=name, customdata=top[["ci_low", "ci_high", "heads"]].to_numpy(),
            error_y=dict(type="data", symmetric=False, array=(top["ci_high"] - top["value"]).fillna(0),
                         arrayminus=(top["value"] - top["ci_low"]).fillna(0)),
            hovertemplate="k=%{x}: coverage %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}], heads "
                          "%{customdata[2]}<extra>" + name + "</extra>"))
    fig.update_layout(template="plotly_white",
                      title=dict(text=f"{pair}: head coverage = effect(top-k) / effect(all heads), {site} site, "
                                      f"{source} source, val split (95% CI); band: random k-sets"),
                      xaxis=dict(title=dict(text="k (heads patched)"), type="log", dtick=0.30103),
                      yaxis=dict(title=dict(text="coverage")))
    return fig


def rank_figure(metrics: pd.DataFrame, pair: str) -> go.Figure:
    """drop(k) of the rank-k correction per method (95% CI), the random-subspace null range, full rank dashed."""
    fig = go.Figure()
    d = metrics[metrics["metric"] == S.DROP]
    site = ""
    for i, (method, g) in enumerate(d.groupby("method", sort=True)):
        c = COLOURS[i % len(COLOURS)]
        site = f"L{int(g['layer'].iloc[0])} {g['hook'].iloc[0]}"
        fin = g[g["k"] != "full"].assign(kk=lambda x: x["k"].astype(int)).sort_values("kk")
        nl = metrics[(metrics["metric"] == S.DROP_NULL_MEAN) & (metrics["method"] == method)].assign(
            kk=lambda x: x["k"].astype(int)).sort_values("kk")
        if len(nl):
            _band(fig, nl["kk"], nl["ci_low"], nl["ci_high"], c, method)
            fig.add_trace(go.Scatter(x=nl["kk"], y=nl["value"], mode="lines", line=dict(color=c, dash="dot"),
                                     name=f"{method}: random k-subspace null (mean, min–max band)", legendgroup=method))
        fig.add_trace(go.Scatter(
            x=fin["kk"], y=fin["value"], mode="lines+markers", name=f"{method}: drop(k)", line=dict(color=c),
            legendgroup=method, customdata=fin[["ci_low", "ci_high"]].to_numpy(),
            error_y=dict(type="data", symmetric=False, array=(fin["ci_high"] - fin["value"]).fillna(0),
                         arrayminus=(fin["value"] - fin["ci_low"]).fillna(0)),
            hovertemplate="k=%{x}: drop %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra>" + method
                          + "</extra>"))
        full = g[g["k"] == "full"]
        if len(full) and np.isfinite(full["value"].iloc[0]):
            fig.add_hline(y=float(full["value"].iloc[0]), line=dict(color=c, dash="dash"),
                          annotation_text=f"{method} full rank")
    fig.update_layout(template="plotly_white",
                      title=dict(text=f"{pair}: drop(k) of the rank-k correction W_k = I + U_k V_kᵀ at {site}, "
                                      "val split (95% prompt-bootstrap CI)"),
                      xaxis=dict(title=dict(text="rank k of the correction"), type="log", dtick=0.30103),
                      yaxis=dict(title=dict(text="drop = (KL_raw − KL_k)/KL_raw")))
    return fig
