"""Figures: functions that take tidy DataFrames and return ``go.Figure``; written as self-contained HTML.

HTML files embed plotly.js (``include_plotlyjs=True``), so they open offline; no CDN is referenced.
"""

import os
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def write_html(fig: go.Figure, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)
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
        c = _COLOURS[i % len(_COLOURS)]
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
    d = metrics[metrics["metric"].isin(["cka", "cka_debiased"])].copy()
    d["series"] = d["metric"].map({"cka": "linear CKA", "cka_debiased": "debiased CKA"}) + " · " + d["hook"]
    return lines_with_ci(d, "series", f"{pair}: base vs tuned representation similarity per layer "
                                      f"(95% CI: prompt bootstrap / prompt jackknife)", "CKA")


def patch_kl_figure(metrics: pd.DataFrame, pair: str) -> go.Figure:
    d = metrics[(metrics["metric"] == "patch_kl")].copy()
    d["series"] = d["condition"] + " · " + d["hook"]
    return lines_with_ci(d, "series", f"{pair}: cross-model layer patch, KL(P_target_clean ‖ P_target_patched) "
                                      f"at the decision position (shared vocab; 95% prompt-bootstrap CI)", "KL (nats)")


def drop_figure(metrics: pd.DataFrame, pair: str, alpha_mode: str) -> go.Figure:
    """Drop per site and solver (bars with 95% CI), one panel row per α."""
    d = metrics[(metrics["metric"] == "drop")].copy()
    d["site"] = "L" + d["layer"].astype(int).astype(str) + " " + d["hook"]
    d["solver"] = d["condition"].str.split("|").str[0]
    d["alpha"] = d["condition"].str.extract(r"alpha=([0-9.]+)")[0].astype(float)
    fig = go.Figure()
    for i, ((solver, alpha), g) in enumerate(d.groupby(["solver", "alpha"], sort=True)):
        fig.add_trace(go.Bar(
            x=g["site"], y=g["value"], name=f"{solver} (α={alpha:g})",
            marker_color=_COLOURS[i % len(_COLOURS)],
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
    r2 = metrics[metrics["metric"] == "r2_val"][["layer", "hook", "condition", "value"]].rename(
        columns={"value": "r2", "condition": "solver"})
    d = metrics[metrics["metric"] == "drop"].copy()
    d["solver"] = d["condition"].str.split("|").str[0]
    d["alpha"] = d["condition"].str.extract(r"alpha=([0-9.]+)")[0].astype(float)
    d = d[d["alpha"] == d["alpha"].max()]
    j = r2.merge(d[["layer", "hook", "solver", "value"]], on=["layer", "hook", "solver"])
    fig = go.Figure(go.Scatter(
        x=j["r2"], y=j["value"], mode="markers", text="L" + j["layer"].astype(int).astype(str) + " " + j["hook"]
        + " " + j["solver"], hovertemplate="%{text}<br>R² %{x:.3f}, drop %{y:.3f}<extra></extra>"))
    fig.update_layout(template="plotly_white", title=dict(text=f"{pair}: val R² of the map vs its patch-KL drop"),
                      xaxis=dict(title=dict(text="R² (val)")), yaxis=dict(title=dict(text="drop")))
    return fig
