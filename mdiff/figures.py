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
