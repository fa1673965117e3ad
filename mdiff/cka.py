"""Linear CKA, debiased CKA, and confidence intervals over prompts (RQ1).

Definitions
-----------
``X`` (n × d_x) and ``Y`` (n × d_y) hold the two models' activations at the same n samples: row i
of both comes from the same prompt and position. Centre the features, ``X_c = X − 1 x̄ᵀ``, and form
the linear-kernel Gram matrices ``K = X_c X_cᵀ`` and ``L = Y_c Y_cᵀ`` (n × n).

* **Biased HSIC** (Gretton et al. 2005): ``HSIC_0(K, L) = tr(K H L H) / (n − 1)²`` with the
  centring matrix ``H = I − 11ᵀ/n``. K and L are already centred, so ``tr(KHLH) = ⟨K, L⟩_F =
  ‖X_cᵀ Y_c‖²_F``.
* **Linear CKA** (Kornblith et al. 2019):
  ``CKA = HSIC_0(K, L) / sqrt(HSIC_0(K, K) · HSIC_0(L, L)) = ‖X_cᵀY_c‖²_F / (‖X_cᵀX_c‖_F ‖Y_cᵀY_c‖_F)``.
  It lies in [0, 1], equals 1 for ``CKA(X, X)`` and is unchanged by an orthogonal rotation or an
  isotropic rescaling of either side (not by a general invertible linear map).
* **Debiased CKA**: the same ratio built from the unbiased HSIC estimator of Song et al. (2012),
  as in Kornblith's ``_debiased_dot_product_similarity_helper``. With ``K̃`` = K with its diagonal
  set to zero,
  ``HSIC_1(K, L) = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3))``.
  It needs n ≥ 4. HSIC_0 is biased upwards by O(d/n), so biased CKA of two *independent* Gaussian
  clouds with n = 50, d = 500 is about 0.9; the debiased value is about 0. HSIC_1 is unchanged by
  adding a constant to the features, so mdiff also builds it from centred Grams (for accuracy).
  Debiased CKA can be slightly negative or, in tiny samples, undefined (``HSIC_1(K, K) ≤ 0``:
  mdiff raises).

Algorithms and cost (see PERF.md §1.1, §2.2, §4)
-----------------------------------------------
Features are centred first (in float64), then one of two exact forms is used:

* **Gram form**: ``K = X_cX_cᵀ``, ``L = Y_cY_cᵀ`` (numpy uses SYRK: n²(d_x + d_y) FLOPs), then
  O(n²) reductions: ``tr(K̃L̃) = Σ K̃∘L̃`` and ``1ᵀK̃L̃1 = (K̃1)·(L̃1)``. No n×n matrix product and no
  explicit H is ever formed.
* **Feature form**: ``X_cᵀY_c``, ``X_cᵀX_c``, ``Y_cᵀY_c`` (n(d_x + d_y)² FLOPs), plus the row norms
  for the debiased correction.

``method="auto"`` picks the Gram form when ``n ≤ d_x + d_y`` (``n ≤ 2d`` for equal widths) and the
feature form otherwise. All final reductions are accumulated in float64. Inputs in float64 are
processed in float64 throughout. For biased CKA and its bootstrap, float32 (or lower) inputs with
at least 2²⁰ elements have their Grams/products computed in float32 *after* float64 centring,
which halves the cost and stays within ~1e-7 of the float64 result (PERF.md §2.2); pass float64
inputs to force float64 everywhere. Debiased CKA always uses float64, because its correction
terms cancel.

Confidence intervals
--------------------
* :func:`bootstrap_cka`: **cluster (prompt) bootstrap** of biased linear CKA. Distinct prompts are
  drawn with replacement; a resample is a multiplicity vector ``w`` over rows (every row of a
  prompt gets that prompt's draw count, see :func:`prompt_bootstrap_weights`). With the
  full-sample Grams built from globally centred features, the resample's (unnormalised) HSIC is
  exactly ``tr(K_b H L_b H) = wᵀ(K∘L)w − (2/m)Σ_i w_i(Kw)_i(Lw)_i + (wᵀKw)(wᵀLw)/m²`` with
  ``m = Σ_i w_i`` (PERF.md §1.2). Stacking the B weight vectors as Ω (B × n), five matrix products
  ``ΩK, ΩL, Ω(K∘L), Ω(K∘K), Ω(L∘L)`` give all B resamples (10·B·n² FLOPs; about 0.2–0.4 s for
  B = 1000, n = 2000 on two CPU cores), instead of recomputing CKA from features B times.
  Resamples are processed in chunks of rows so memory stays near three n × n matrices.
  The interval is the percentile interval. Pass the same ``weights`` to every call to get paired
  intervals (e.g. for CKA(layer l) − CKA(layer m)).
* :func:`jackknife_debiased_cka`: a with-replacement resample contains duplicated rows, which
  breaks the distinct-sample assumption of the U-statistic behind HSIC_1 (duplicates inflate
  it), so debiased CKA is *not* bootstrapped. Instead mdiff uses the **delete-one-prompt
  jackknife**: for each prompt g, debiased CKA of the data with g's rows removed, the jackknife
  standard error ``SE = sqrt((G−1)/G · Σ_g (θ_(g) − θ̄)²)``, and the normal interval
  ``θ̂ ± z_{(1+ci)/2} · SE`` around the full-sample value θ̂. Each leave-out subset is a 0/1
  weight vector ``w = 1 − z_g``, and its HSIC_1 follows from the full zero-diagonal Grams:
  ``tr(K̃_sL̃_s) = wᵀ(K̃∘L̃)w``, ``1ᵀK̃_s1 = wᵀK̃w``, ``1ᵀK̃_sL̃_s1 = Σ_i w_i(K̃w)_i(L̃w)_i``,
  ``n_s = Σw``. Because ``w = 1 − z_g``, every quadratic form expands into full-sample sums minus
  per-prompt sums (``wᵀMw = 1ᵀM1 − 2·Σ_{i∈g}(M1)_i + Σ_{i,j∈g}M_ij``), and ``K̃w = K̃1 − K̃z_g``
  is one sparse indicator product. All G subsets therefore cost O(n²) in total, not G·n², and
  features are never re-read.

Inputs may be numpy arrays or torch tensors (any float dtype, any device); they are copied to
CPU numpy. Bad input raises :class:`mdiff.errors.MdiffError`. Nothing here prints.
"""

import math
import statistics
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int, Real, Shaped
from scipy import sparse

from mdiff.arrays import as_float_pair, factorize_groups
from mdiff.errors import MdiffError

__all__ = [
    "CKABootstrap",
    "bootstrap_cka",
    "debiased_cka",
    "jackknife_debiased_cka",
    "linear_cka",
    "prompt_bootstrap_weights",
]

CKAMethod = Literal["auto", "gram", "features"]

# Below this many elements per input, float32 inputs are still processed in float64 (it is cheap).
_FP32_MIN_ELEMENTS = 1 << 20
# Largest (resamples × n) block handled at once in the batched bootstrap / jackknife.
_CHUNK_ELEMENTS = 1 << 22
# A resample whose centred self-HSIC is below this fraction of its uncentred one is degenerate
# (all its rows identical); its CKA is undefined and reported as NaN.
_DEGENERATE_RTOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 1e-4}


@dataclass(frozen=True, eq=False)
class CKABootstrap:
    """A CKA point estimate with a confidence interval and the resampled values behind it."""

    value: float
    """Full-sample estimate: biased linear CKA (bootstrap) or debiased CKA (jackknife)."""
    ci_low: float
    """Lower end of the interval."""
    ci_high: float
    """Upper end of the interval."""
    samples: Float[np.ndarray, " n_resamples"]
    """Bootstrap CKA values (one per resample; NaN for a degenerate resample), or the
    leave-one-prompt-out values for the jackknife."""
    n: int
    """Number of rows (samples) used."""
    n_groups: int
    """Number of distinct prompts (clusters); equals ``n`` when no groups were given."""
    ci: float = 0.95
    """Nominal coverage of the interval."""
    method: str = "prompt bootstrap, percentile interval"
    """How the interval was computed."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (without the per-resample values)."""
        return {
            "value": self.value,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "n": self.n,
            "n_groups": self.n_groups,
            "n_resamples": int(self.samples.shape[0]),
            "ci": self.ci,
            "method": self.method,
        }


# --------------------------------------------------------------------------------------------
# input handling


def _validate_pair(X: Any, Y: Any, min_n: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    return as_float_pair(X, Y, what, purpose="computing CKA", min_n=min_n)


def _check_ci(ci: float) -> float:
    if isinstance(ci, bool) or not isinstance(ci, (int, float, np.floating)) or not 0.0 < float(ci) < 1.0:
        raise MdiffError(f"ci must be a coverage level strictly between 0 and 1 (e.g. 0.95), got {ci!r}")
    return float(ci)


def _check_n_boot(n_boot: int) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise MdiffError(f"n_boot must be a positive integer number of resamples (e.g. 1000), got {n_boot!r}")
    return int(n_boot)


def _compute_dtype(x: np.ndarray, y: np.ndarray, allow_fp32: bool) -> np.dtype:
    if (
        allow_fp32
        and x.dtype == np.float32
        and y.dtype == np.float32
        and min(x.size, y.size) >= _FP32_MIN_ELEMENTS
    ):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _centre(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Subtract the column means in float64, then cast to ``dtype`` (C-contiguous)."""
    mean = a.mean(axis=0, dtype=np.float64)
    centred = a.astype(np.float64, copy=True) if a.dtype != np.float64 else a.copy()
    centred -= mean
    return np.ascontiguousarray(centred, dtype=dtype)


def _inner(a: np.ndarray, b: np.ndarray) -> float:
    """Frobenius inner product accumulated in float64."""
    if a.dtype == np.float64 and b.dtype == np.float64:
        return float(np.vdot(a, b))
    return float(np.multiply(a, b, dtype=np.float64).sum())


def _resolve_method(method: str, n: int, dx: int, dy: int) -> str:
    if method not in ("auto", "gram", "features"):
        raise MdiffError(f"method must be 'auto', 'gram' or 'features', got {method!r}")
    if method == "auto":
        return "gram" if n <= dx + dy else "features"
    return method


def _ratio(num: float, den_x: float, den_y: float, what: str) -> float:
    if den_x <= 0.0:
        raise MdiffError(
            f"{what} of X with itself is not positive (X has no usable variance); check X is not constant"
        )
    if den_y <= 0.0:
        raise MdiffError(
            f"{what} of Y with itself is not positive (Y has no usable variance); check Y is not constant"
        )
    return num / math.sqrt(den_x * den_y)


# --------------------------------------------------------------------------------------------
# point estimates


def _cka_from_grams(K: np.ndarray, L: np.ndarray) -> float:
    return _ratio(_inner(K, L), _inner(K, K), _inner(L, L), "HSIC")


def _zero_diag_grams(xc: np.ndarray, yc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    K = xc @ xc.T
    L = yc @ yc.T
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    return K, L


def _unbiased_hsic_gram(Kt: np.ndarray, Lt: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC from zero-diagonal Grams, O(n²)."""
    n = Kt.shape[0]
    rk = Kt.sum(axis=1)
    rl = Lt.sum(axis=1)
    value = _inner(Kt, Lt) + rk.sum() * rl.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(rk @ rl)
    return value / (n * (n - 3))


def _unbiased_hsic_features(cross_sq: float, a: np.ndarray, b: np.ndarray, n: int) -> float:
    """Unbiased HSIC from centred features: ``cross_sq = ‖X_cᵀY_c‖²``, ``a_i = ‖x_i‖²``, ``b_i = ‖y_i‖²``.

    Same value as :func:`_unbiased_hsic_gram` (Kornblith's ``_debiased_dot_product_similarity_helper``).
    """
    value = cross_sq - n / (n - 2) * float(a @ b) + a.sum() * b.sum() / ((n - 1) * (n - 2))
    return value / (n * (n - 3))


def linear_cka(
    X: Float[np.ndarray, "n_samples d_x"] | Float[torch.Tensor, "n_samples d_x"],
    Y: Float[np.ndarray, "_n_samples d_y"] | Float[torch.Tensor, "_n_samples d_y"],
    *,
    method: CKAMethod = "auto",
) -> float:
    """Linear CKA (biased HSIC) between two sets of activations for the same samples.

    Args:
        X: activations of model A, one row per sample (prompt position).
        Y: activations of model B for the same samples in the same order (``d_y`` may differ).
        method: ``"gram"`` (n × n Grams), ``"features"`` (d × d cross-covariances) or ``"auto"``
            (Gram form when ``n ≤ d_x + d_y``). All give the same value up to rounding.

    Returns:
        CKA in [0, 1].

    Raises:
        MdiffError: mismatched rows, NaN/inf, fewer than 2 samples, or a constant input.
    """
    x, y = _validate_pair(X, Y, min_n=2, what="linear CKA")
    n, dx = x.shape
    dy = y.shape[1]
    path = _resolve_method(method, n, dx, dy)
    dtype = _compute_dtype(x, y, allow_fp32=True)
    xc = _centre(x, dtype)
    yc = _centre(y, dtype)
    if path == "gram":
        return _cka_from_grams(xc @ xc.T, yc @ yc.T)
    cxy = xc.T @ yc
    cxx = xc.T @ xc
    cyy = yc.T @ yc
    return _ratio(_inner(cxy, cxy), _inner(cxx, cxx), _inner(cyy, cyy), "HSIC")


def debiased_cka(
    X: Float[np.ndarray, "n_samples d_x"] | Float[torch.Tensor, "n_samples d_x"],
    Y: Float[np.ndarray, "_n_samples d_y"] | Float[torch.Tensor, "_n_samples d_y"],
    *,
    method: CKAMethod = "auto",
) -> float:
    """Debiased linear CKA: the CKA ratio built from the unbiased HSIC estimator (Song et al. 2012).

    Computed in float64 in O(n²) after the Grams (Gram form) or from d × d products plus row norms
    (feature form); ``method`` chooses as in :func:`linear_cka`.

    Returns:
        Debiased CKA (≈ 0 for independent representations; may be slightly negative).

    Raises:
        MdiffError: mismatched rows, NaN/inf, fewer than 4 samples, or a non-positive debiased
        self-similarity (too few samples or a constant input).
    """
    x, y = _validate_pair(X, Y, min_n=4, what="debiased CKA")
    n, dx = x.shape
    dy = y.shape[1]
    path = _resolve_method(method, n, dx, dy)
    xc = _centre(x, np.dtype(np.float64))
    yc = _centre(y, np.dtype(np.float64))
    if path == "gram":
        Kt, Lt = _zero_diag_grams(xc, yc)
        return _ratio(
            _unbiased_hsic_gram(Kt, Lt),
            _unbiased_hsic_gram(Kt, Kt),
            _unbiased_hsic_gram(Lt, Lt),
            "debiased HSIC",
        )
    a = np.einsum("ij,ij->i", xc, xc)
    b = np.einsum("ij,ij->i", yc, yc)
    cxy = xc.T @ yc
    cxx = xc.T @ xc
    cyy = yc.T @ yc
    return _ratio(
        _unbiased_hsic_features(_inner(cxy, cxy), a, b, n),
        _unbiased_hsic_features(_inner(cxx, cxx), a, a, n),
        _unbiased_hsic_features(_inner(cyy, cyy), b, b, n),
        "debiased HSIC",
    )


# --------------------------------------------------------------------------------------------
# bootstrap


def prompt_bootstrap_weights(
    groups: Shaped[np.ndarray, " _n_samples"] | Sequence[Hashable] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    n: int | None = None,
) -> Int[np.ndarray, "n_boot n_samples"]:
    """Cluster-bootstrap multiplicities: resample prompts with replacement, weight rows by draw count.

    Each resample draws G prompts (G = number of distinct labels) uniformly with replacement;
    every row gets the number of times its prompt was drawn. Rows of one prompt therefore always
    share a weight, and a row's weight is 0 when its prompt was not drawn. With equal-sized
    prompts each row of the result sums to n.

    Args:
        groups: one prompt label per row (any hashable labels), or ``None`` when every row is its
            own prompt (then ``n`` is required).
        n_boot: number of resamples B.
        seed: seed for ``np.random.default_rng``; the same seed gives the same weights.
        n: number of rows; required when ``groups`` is ``None``, checked against it otherwise.

    Returns:
        Integer array Ω of shape (B, n). Share it across layers, hooks and model pairs (pass it as
        ``weights=`` to :func:`bootstrap_cka`) to get paired intervals.
    """
    n_boot = _check_n_boot(n_boot)
    inverse, n_groups = factorize_groups(groups, n)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    flat = draws + np.arange(n_boot, dtype=np.int64)[:, None] * n_groups
    counts = np.bincount(flat.ravel(), minlength=n_boot * n_groups).reshape(n_boot, n_groups)
    return counts[:, inverse].astype(np.int64, copy=False)


def _check_weights(weights: Any, n: int) -> np.ndarray:
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().numpy()
    w = np.asarray(weights)
    if w.ndim != 2 or w.shape[1] != n:
        raise MdiffError(
            f"weights must have shape (n_boot, {n}) (one multiplicity per row of X) but has shape {w.shape}"
        )
    if w.shape[0] < 1:
        raise MdiffError("weights has no resamples; pass at least one row (n_boot ≥ 1)")
    if w.dtype.kind not in "iuf" or not np.isfinite(w).all() or (w < 0).any():
        raise MdiffError(
            "weights must be finite non-negative multiplicities (e.g. from prompt_bootstrap_weights)"
        )
    if (w.sum(axis=1) <= 0).any():
        raise MdiffError(
            "every resample in weights needs a positive total weight; a row of all zeros was given"
        )
    return w


def _row_quadratic(W: np.ndarray, M: np.ndarray, out: np.ndarray, rows: int) -> None:
    """``out[b] = W[b] · (M W[b])`` for every resample, in chunks of ``rows``."""
    for start in range(0, W.shape[0], rows):
        wc = W[start : start + rows].astype(M.dtype)
        out[start : start + rows] = np.einsum("ij,ij->i", wc, wc @ M, dtype=np.float64)


def _weighted_cka(K: np.ndarray, L: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Biased CKA of every weighted resample, from centred full-sample Grams (5 products with Ω)."""
    n_boot, n = W.shape
    rows = max(1, _CHUNK_ELEMENTS // n)
    m = W.sum(axis=1, dtype=np.float64)  # resample sizes
    qk = np.empty(n_boot)  # wᵀKw
    ql = np.empty(n_boot)  # wᵀLw
    mkl = np.empty(n_boot)  # Σ w_i (Kw)_i (Lw)_i
    mkk = np.empty(n_boot)
    mll = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        sl = slice(start, start + rows)
        wc = W[sl].astype(K.dtype)
        kw = wc @ K
        lw = wc @ L
        qk[sl] = np.einsum("ij,ij->i", wc, kw, dtype=np.float64)
        ql[sl] = np.einsum("ij,ij->i", wc, lw, dtype=np.float64)
        mkl[sl] = np.einsum("ij,ij,ij->i", wc, kw, lw, dtype=np.float64)
        mkk[sl] = np.einsum("ij,ij,ij->i", wc, kw, kw, dtype=np.float64)
        mll[sl] = np.einsum("ij,ij,ij->i", wc, lw, lw, dtype=np.float64)
    tkl = np.empty(n_boot)  # wᵀ(K∘L)w
    tkk = np.empty(n_boot)
    tll = np.empty(n_boot)
    buf = np.multiply(K, L)
    _row_quadratic(W, buf, tkl, rows)
    np.multiply(K, K, out=buf)
    _row_quadratic(W, buf, tkk, rows)
    np.multiply(L, L, out=buf)
    _row_quadratic(W, buf, tll, rows)
    del buf
    hkl = tkl - 2.0 / m * mkl + qk * ql / m**2
    hkk = tkk - 2.0 / m * mkk + qk**2 / m**2
    hll = tll - 2.0 / m * mll + ql**2 / m**2
    rtol = _DEGENERATE_RTOL[np.dtype(K.dtype)]
    ok = (hkk > rtol * tkk) & (hll > rtol * tll)
    out = np.full(n_boot, np.nan)
    out[ok] = hkl[ok] / np.sqrt(hkk[ok] * hll[ok])
    return out


def bootstrap_cka(
    X: Float[np.ndarray, "n_samples d_x"] | Float[torch.Tensor, "n_samples d_x"],
    Y: Float[np.ndarray, "_n_samples d_y"] | Float[torch.Tensor, "_n_samples d_y"],
    groups: Shaped[np.ndarray, " _n_samples"] | Sequence[Hashable] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    weights: Real[np.ndarray, "_n_boot _n_samples"] | None = None,
) -> CKABootstrap:
    """Linear CKA with a prompt-level (cluster) bootstrap percentile interval, all resamples at once.

    Uses the exact weighted identity described in the module docstring: the full-sample Grams of
    the globally centred features are built once, then five (B × n)·(n × n) products give every
    resample's CKA. The result equals recomputing CKA on ``X[idx], Y[idx]`` for each resample.

    Args:
        X, Y: paired activations (rows = samples).
        groups: prompt label of each row; rows of one prompt are resampled together. ``None``
            treats every row as its own prompt.
        n_boot: number of resamples B (ignored when ``weights`` is given).
        seed: seed for the resampling (ignored when ``weights`` is given).
        ci: interval coverage, e.g. 0.95 for the 2.5–97.5 % percentile interval.
        weights: precomputed multiplicities Ω of shape (B, n), e.g. from
            :func:`prompt_bootstrap_weights`; share one Ω across layers for paired intervals.

    Returns:
        :class:`CKABootstrap` with ``value`` = full-sample biased linear CKA. A resample whose rows
        are all identical has undefined CKA: it is NaN in ``samples`` and left out of the interval.

    Memory: about three n × n matrices (float32 for large float32 inputs, else float64) plus
    O(B·n) for Ω.
    """
    x, y = _validate_pair(X, Y, min_n=2, what="bootstrap CKA")
    n = x.shape[0]
    ci = _check_ci(ci)
    inverse, n_groups = factorize_groups(groups, n)
    if weights is None:
        n_boot = _check_n_boot(n_boot)
        if n_groups < 2:
            raise MdiffError(
                "the prompt bootstrap needs at least 2 distinct prompts; pass more prompts or groups=None"
            )
        W = prompt_bootstrap_weights(inverse, n_boot=n_boot, seed=seed)
    else:
        W = _check_weights(weights, n)
    dtype = _compute_dtype(x, y, allow_fp32=True)
    xc = _centre(x, dtype)
    K = xc @ xc.T
    del xc
    yc = _centre(y, dtype)
    L = yc @ yc.T
    del yc
    value = _cka_from_grams(K, L)
    samples = _weighted_cka(K, L, W)
    finite = samples[np.isfinite(samples)]
    if finite.size:
        lo, hi = np.quantile(finite, [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0])
    else:
        lo = hi = math.nan
    return CKABootstrap(
        value=float(value),
        ci_low=float(lo),
        ci_high=float(hi),
        samples=samples,
        n=int(n),
        n_groups=int(n_groups),
        ci=ci,
        method=(
            "bootstrap with given weights, percentile interval"
            if weights is not None
            else "prompt bootstrap, percentile interval"
            if groups is not None
            else "bootstrap, percentile interval"
        ),
    )


# --------------------------------------------------------------------------------------------
# jackknife for debiased CKA


def _delete_one_group_debiased(
    Kt: np.ndarray, Lt: np.ndarray, inverse: np.ndarray, n_groups: int
) -> np.ndarray:
    """Debiased CKA with each prompt's rows removed in turn, from the full zero-diagonal Grams.

    Subset g has 0/1 weights ``w = 1 − z_g``; see the module docstring for the expansion.
    """
    n = Kt.shape[0]
    sizes = np.bincount(inverse, minlength=n_groups)
    m = (n - sizes).astype(np.float64)

    # wᵀMw = 1ᵀM1 − 2 Σ_{i∈g} (M1)_i + Σ_{i,j∈g} M_ij for M in {K̃, L̃, K̃∘L̃, K̃∘K̃, L̃∘L̃}.
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate(([0], np.cumsum(sizes)))
    pair_i_parts, pair_j_parts = [], []
    for s in np.unique(sizes):  # within-prompt pairs (i, j), vectorised per prompt size
        gs = np.nonzero(sizes == s)[0]
        members = order[starts[gs][:, None] + np.arange(s)[None, :]]  # (n_g of size s, s)
        pair_i_parts.append(np.repeat(members, s, axis=1).ravel())
        pair_j_parts.append(np.tile(members, (1, s)).ravel())
    pi = np.concatenate(pair_i_parts)
    pj = np.concatenate(pair_j_parts)
    pg = inverse[pi]

    def quad(rowsums: np.ndarray, pair_values: np.ndarray) -> np.ndarray:
        per_group_rows = np.bincount(inverse, weights=rowsums, minlength=n_groups)
        block = np.bincount(pg, weights=pair_values, minlength=n_groups)
        return rowsums.sum() - 2.0 * per_group_rows + block

    rk = Kt.sum(axis=1)
    rl = Lt.sum(axis=1)
    kp = Kt[pi, pj]
    lp = Lt[pi, pj]
    qk = quad(rk, kp)
    ql = quad(rl, lp)
    tkl = quad(np.einsum("ij,ij->i", Kt, Lt), kp * lp)
    tkk = quad(np.einsum("ij,ij->i", Kt, Kt), kp * kp)
    tll = quad(np.einsum("ij,ij->i", Lt, Lt), lp * lp)

    # Σ_i w_i (K̃w)_i (L̃w)_i with K̃w = K̃1 − K̃z_g; K̃z_g comes from a sparse indicator product.
    Z = sparse.csr_matrix((np.ones(n), (inverse, np.arange(n))), shape=(n_groups, n))
    mkl = np.empty(n_groups)
    mkk = np.empty(n_groups)
    mll = np.empty(n_groups)
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_groups, rows):
        stop = min(start + rows, n_groups)
        zc = Z[start:stop]
        kw = rk[None, :] - np.asarray(zc @ Kt)  # (b, n): (K̃w_g)_i
        lw = rl[None, :] - np.asarray(zc @ Lt)
        in_chunk = np.nonzero((inverse >= start) & (inverse < stop))[0]
        local = inverse[in_chunk] - start
        for prod, target in ((kw * lw, mkl), (kw * kw, mkk), (lw * lw, mll)):
            removed = np.bincount(local, weights=prod[local, in_chunk], minlength=stop - start)
            target[start:stop] = prod.sum(axis=1) - removed

    def hsic(t: np.ndarray, qa: np.ndarray, qb: np.ndarray, mid: np.ndarray) -> np.ndarray:
        return (t + qa * qb / ((m - 1) * (m - 2)) - 2.0 / (m - 2) * mid) / (m * (m - 3))

    hkl = hsic(tkl, qk, ql, mkl)
    hkk = hsic(tkk, qk, qk, mkk)
    hll = hsic(tll, ql, ql, mll)
    if (hkk <= 0).any() or (hll <= 0).any():
        raise MdiffError(
            "a leave-one-prompt-out subset has a non-positive debiased self-similarity; "
            "use more prompts for the jackknife"
        )
    return hkl / np.sqrt(hkk * hll)


def jackknife_debiased_cka(
    X: Float[np.ndarray, "n_samples d_x"] | Float[torch.Tensor, "n_samples d_x"],
    Y: Float[np.ndarray, "_n_samples d_y"] | Float[torch.Tensor, "_n_samples d_y"],
    groups: Shaped[np.ndarray, " _n_samples"] | Sequence[Hashable] | None = None,
    ci: float = 0.95,
) -> CKABootstrap:
    """Debiased CKA with a delete-one-prompt jackknife normal interval.

    Debiased CKA is not bootstrapped: duplicated rows in a with-replacement resample break the
    U-statistic. For each prompt g the debiased CKA θ_(g) without g's rows is computed from the
    full-sample zero-diagonal Grams (0/1 weights, O(n²) for all prompts together; see the module
    docstring). ``SE = sqrt((G−1)/G · Σ_g (θ_(g) − θ̄)²)`` and the interval is
    ``value ± z_{(1+ci)/2} · SE`` with ``value`` the full-sample debiased CKA.

    Args:
        X, Y: paired activations (rows = samples).
        groups: prompt label of each row; ``None`` deletes one row at a time.
        ci: interval coverage.

    Returns:
        :class:`CKABootstrap` whose ``samples`` are the G leave-one-prompt-out values.

    Raises:
        MdiffError: bad input, fewer than 2 prompts, or a leave-one-out subset with < 4 rows.
    """
    x, y = _validate_pair(X, Y, min_n=4, what="debiased CKA")
    n = x.shape[0]
    ci = _check_ci(ci)
    inverse, n_groups = factorize_groups(groups, n)
    if n_groups < 2:
        raise MdiffError("the jackknife needs at least 2 distinct prompts; pass more prompts or groups=None")
    sizes = np.bincount(inverse, minlength=n_groups)
    if n - int(sizes.max()) < 4:
        raise MdiffError(
            f"deleting the largest prompt ({int(sizes.max())} rows) leaves {n - int(sizes.max())} of {n} rows; "
            "debiased CKA needs at least 4, so use more prompts"
        )
    xc = _centre(x, np.dtype(np.float64))
    yc = _centre(y, np.dtype(np.float64))
    Kt, Lt = _zero_diag_grams(xc, yc)
    del xc, yc
    value = _ratio(
        _unbiased_hsic_gram(Kt, Lt), _unbiased_hsic_gram(Kt, Kt), _unbiased_hsic_gram(Lt, Lt), "debiased HSIC"
    )
    loo = _delete_one_group_debiased(Kt, Lt, inverse, n_groups)
    se = math.sqrt((n_groups - 1) / n_groups * float(((loo - loo.mean()) ** 2).sum()))
    z = statistics.NormalDist().inv_cdf((1.0 + ci) / 2.0)
    return CKABootstrap(
        value=float(value),
        ci_low=float(value - z * se),
        ci_high=float(value + z * se),
        samples=loo,
        n=int(n),
        n_groups=int(n_groups),
        ci=ci,
        method="delete-one-prompt jackknife, normal interval",
    )
