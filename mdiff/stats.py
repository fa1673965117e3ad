"""Small statistics shared by every RQ: prompt-bootstrap CIs of means and ratios."""

import numpy as np

from mdiff.errors import MdiffError


def check_bootstrap(n_boot: int) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise MdiffError(f"{{option}} must be a whole number ≥ 1, got {n_boot!r}", option="n_boot")
    return int(n_boot)


def resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` indices of prompts drawn with replacement (shared across metrics for paired CIs)."""
    check_bootstrap(n_boot)
    if n < 1:
        raise MdiffError("cannot bootstrap an empty sample")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_mean(values, n_boot: int = 1000, seed: int = 0, ci: float = 0.95,
                   idx: np.ndarray | None = None) -> tuple[float, float, float]:
    """Mean of per-prompt values with a percentile bootstrap CI over prompts."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise MdiffError("bootstrap_mean needs a non-empty 1-D array of per-prompt values")
    idx = resample_indices(len(v), n_boot, seed) if idx is None else idx
    means = v[idx].mean(1)
    lo, hi = np.quantile(means, [(1 - ci) / 2, (1 + ci) / 2])
    return float(v.mean()), float(lo), float(hi)


def bootstrap_ratio_drop(raw, mapped, n_boot: int = 1000, seed: int = 0, ci: float = 0.95,
                         idx: np.ndarray | None = None, eps: float = 1e-12) -> tuple[float, float, float]:
    """``(mean(raw) − mean(mapped)) / mean(raw)`` with a paired prompt-bootstrap CI (NaN when raw ≈ 0)."""
    r, m = np.asarray(raw, np.float64), np.asarray(mapped, np.float64)
    if r.shape != m.shape or r.ndim != 1 or len(r) == 0:
        raise MdiffError("raw and mapped per-prompt values must be 1-D arrays of the same length")
    if r.mean() <= eps:
        return float("nan"), float("nan"), float("nan")
    idx = resample_indices(len(r), n_boot, seed) if idx is None else idx
    rb, mb = r[idx].mean(1), m[idx].mean(1)
    ok = rb > eps
    drops = (rb[ok] - mb[ok]) / rb[ok]
    lo, hi = np.quantile(drops, [(1 - ci) / 2, (1 + ci) / 2])
    return float((r.mean() - m.mean()) / r.mean()), float(lo), float(hi)


def beats(ci_a, ci_b) -> bool:
    """The "beats" rule of every RQ: A beats B when A's CI lies wholly above B's (``low_A > high_B``).

    Touching or overlapping intervals do not beat; a NaN end (undefined drop) never beats. ``ci_b`` may
    also be a single number (e.g. the maximum of a null), compared with A's lower end.
    """
    lo_a = float(ci_a[0])
    hi_b = float(ci_b[1]) if np.ndim(ci_b) else float(ci_b)
    return bool(np.isfinite(lo_a) and np.isfinite(hi_b) and lo_a > hi_b)
