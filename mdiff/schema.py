"""The results' schema: every metric and condition name an RQ writes to ``metrics.csv``, declared once.

Each RQ writes one tidy ``metrics.csv`` (:data:`mdiff.io.METRIC_COLUMNS` plus its own key columns): one row per
(site, condition, metric). The RQ modules build their rows from the names below, and the study's plan, the
report, the comparison and the figures read them back through the same names and :func:`read_metrics` /
:func:`select`, never through string literals of their own.

Conditions
----------
* RQ1: ``base_vs_tuned`` (CKA), ``<source>-><target>`` (a cross-model patch: :data:`CROSS_B2T`,
  :data:`CROSS_T2B`), ``self:<side>`` and ``store:<side>`` (the two self-patch checks), ``<side>:masked|unmasked``
  (behaviour diagnostics).
* RQ2: ``<map>|alpha=<α>|<mode>`` (:func:`rq2_condition`, read back with :func:`rq2_condition_parts`); ``<map>``
  is a solver, ``raw``, ``shuffled:<solver>`` or ``reverse:<solver>``.
* RQ3: ``<method>|k=<k>``, ``<method>|null|k=<k>``, ``raw``.
* RQ4: ``<source>|head:<h>``, ``<source>|all``, ``<source>|top-<k>``, ``<source>|random-<k>``.
"""

from pathlib import Path

import pandas as pd

from mdiff.errors import MdiffError

# ---------------------------------------------------------------- metric names
CKA = "cka"
CKA_DEBIASED = "cka_debiased"
PATCH_KL = "patch_kl"
SOFT_REFUSAL = "soft_refusal"
STYLE_MARKERS = "style_markers_per_100"
MC_DELTA_LOGP = "mc_delta_logp_per_token"
BEHAVIOUR_METRICS = (SOFT_REFUSAL, STYLE_MARKERS, MC_DELTA_LOGP)

DROP = "drop"
"""RQ2/RQ3: the share of the raw cross-patch KL a map removes (on val)."""
DROP_SELECT = "drop_select"
KL_RAW = "kl_raw"
KL_MAPPED = "kl_mapped"
R2_VAL = "r2_val"
DROP_NULL_MEAN = "drop_null_mean"

EFFECT = "effect"
EFFECT_ALL_SITE_CHECK = "effect_all_site_check"
COVERAGE = "coverage"
NULL_PERCENTILE = "null_percentile"
NULL_Q05, NULL_MEDIAN, NULL_Q95 = "null_q05", "null_median", "null_q95"
TOPK_FREQ = "topk_frequency"
"""RQ4: share of select-split resamples whose top-k (column ``k``) contains the head."""

# ---------------------------------------------------------------- condition names
CKA_COND = "base_vs_tuned"
CROSS_B2T, CROSS_T2B = "base->tuned", "tuned->base"


def cross_condition(source: str, target: str) -> str:
    return f"{source}->{target}"


def self_condition(side: str) -> str:
    """The target patched with its own engine-computed clean values (must be exactly 0)."""
    return f"self:{side}"


def store_condition(side: str) -> str:
    """The target patched with its own activations read back from the store (arithmetic noise only)."""
    return f"store:{side}"


def rq2_condition(map_name: str, alpha: float, mode: str) -> str:
    return f"{map_name}|alpha={alpha}|{mode}"


def rq2_condition_parts(conditions: pd.Series) -> pd.DataFrame:
    """``"ridge|alpha=0.5|blend"`` → columns ``solver`` (the map), ``alpha`` (float), ``mode``."""
    parts = conditions.str.split("|", n=2, expand=True).reindex(columns=[0, 1, 2])
    return pd.DataFrame({"solver": parts[0], "alpha": parts[1].str.removeprefix("alpha=").astype(float),
                         "mode": parts[2]}, index=conditions.index)


# ---------------------------------------------------------------- what each RQ writes
METRICS: dict[str, frozenset[str]] = {
    "rq1": frozenset({CKA, CKA_DEBIASED, PATCH_KL, *BEHAVIOUR_METRICS}),
    "rq2": frozenset({DROP, DROP_SELECT, KL_RAW, KL_MAPPED}),  # + the per-map fit records (rq2.FIT_METRICS)
    "rq3": frozenset({DROP, KL_RAW, KL_MAPPED, R2_VAL, DROP_NULL_MEAN}),  # + fit_rows, fit_prompts, fit_dof...
    "rq4": frozenset({EFFECT, EFFECT_ALL_SITE_CHECK, COVERAGE, NULL_PERCENTILE, NULL_Q05, NULL_MEDIAN, NULL_Q95,
                      TOPK_FREQ}),
}
"""The metrics each RQ's readers rely on (an RQ may write more, e.g. fit diagnostics)."""

REQUIRED_COLUMNS = ("condition", "metric", "value")


def read_metrics(out: str | Path, pair: str, rq: str) -> pd.DataFrame:
    """``OUT/<pair>/<rq>/metrics.csv``, checked to be an RQ result table (one line says what is wrong)."""
    f = Path(out) / pair / rq / "metrics.csv"
    try:
        df = pd.read_csv(f)
    except (OSError, ValueError) as e:
        raise MdiffError(f"{f} cannot be read ({type(e).__name__}); run {rq.upper()} on pair {pair!r} again") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise MdiffError(f"{f} is not an mdiff result table (no column {', '.join(missing)}); run {rq.upper()} "
                         f"on pair {pair!r} again")
    return df


def select(df: pd.DataFrame, metric: str, **eq) -> pd.DataFrame:
    """The rows of ``metric`` whose columns equal ``eq`` (e.g. ``hook="attn_out", condition=CROSS_B2T``)."""
    m = df["metric"] == metric
    for col, v in eq.items():
        m &= df[col] == v
    return df[m]
