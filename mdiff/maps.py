"""Affine maps from base-model to tuned-model activations (RQ2 linear transport, RQ3 rank).

Convention
----------
``X`` (n × d_in) holds base activations and ``Y`` (n × d_out) the tuned model's activations at the
same n samples (row i of both: same prompt, same position). Every estimator here learns an affine
map ``ŷ = x @ W_ + b_`` with ``W_`` of shape (d_in, d_out) and ``b_`` of shape (d_out,), the
row-vector convention of :func:`mdiff.hooks.map_hook`, so a fitted map can be patched in directly.
The API follows scikit-learn: ``__init__`` only stores parameters, ``fit(X, Y, groups=None)``
returns ``self``, learned attributes end in ``_`` (``W_``, ``b_``, ``n_features_in_``,
``n_features_out_`` and the per-class ones below), ``transform(X)`` applies the map and
``score(X, Y)`` is the **variance-weighted R²** ``1 − Σ_ij (Y_ij − Ŷ_ij)² / Σ_ij (Y_ij − Ȳ_j)²``
summed over all output dimensions (sklearn's ``r2_score(..., multioutput="variance_weighted")``),
so high-variance dimensions count more. ``groups`` (one prompt label per row) is used wherever rows
are split or shuffled, so that the positions of one prompt stay together.

``X_c``, ``Y_c`` are the column-centred data with means ``x̄``, ``ȳ``; every map is fitted on
them and gets ``b_ = ȳ − x̄ W_``.

Maps (``make_map`` name → class)
--------------------------------
* ``identity`` (:class:`IdentityMap`): ``W = I``, ``b = 0``.
* ``mean-shift`` (:class:`MeanShiftMap`): ``ŷ = x + mean(y − x)``.
* ``ridge`` / ``ridge-zero`` (:class:`RidgeMap`): ridge toward a prior W₀,
  ``W_λ = W₀ + (X_cᵀX_c + λI)⁻¹X_cᵀ(Y_c − X_cW₀)``, the minimiser of ``‖Y_c − X_cW‖² + λ‖W − W₀‖²``.
  Base → tuned maps are near the identity, so ``ridge`` uses W₀ = I (``prior="identity"``: it
  regularises the *correction* y − x; λ → ∞ gives the mean shift, and with fewer rows than dimensions
  the unseen directions stay at the identity instead of collapsing to 0); ``ridge-zero`` is textbook
  ridge, W₀ = 0 (``prior="zero"``, the class default). Everything below is the W₀ = 0 fit of
  ``Y − XW₀`` on X (written Y there). With ``cv=K`` (both make_map names use K = 5) λ is chosen by
  prompt-grouped K-fold cross-validation (``groups``: a prompt's rows stay in one fold; the grid is
  relative to all rows' mean eigenvalue, and each fold uses the decomposition below); without it
  on one held-out fold. λ is on the scale of ``XᵀX`` (the same α as sklearn's ``Ridge``), and is
  chosen from a grid (default: 20 values, ``logspace(-6, 3)`` times the mean eigenvalue
  ``‖X_c‖²_F / d_in`` of the training fold's ``X_cᵀX_c``) by the squared error on a held-out fold.
  One spectral decomposition of the training fold ``X_cᵀX_c = V diag(e) Vᵀ`` serves every λ:
  with ``A = X_val V`` and ``B = Vᵀ X_cᵀ Y_c``, the hold-out error of ``W_λ = V diag(f_λ) B``,
  ``f_λ = 1/(e + λ)``, is ``‖Y_val‖² − 2 f_λ·r + f_λᵀ (AᵀA ∘ BBᵀ) f_λ`` with
  ``r_i = Σ_j (AᵀY_val)_ij B_ij`` (PERF.md §2.4), so each λ costs O(d²) after the decomposition.
  The chosen λ is then refit on all rows (training fold + hold-out; ``refit=False`` keeps the
  training fold) with one float64 Cholesky solve of ``X_cᵀX_c + λI`` (updated from the training
  fold's matrices), the only second factorisation; λ keeps its absolute value in the refit.
  **n < d**: when the training fold has fewer rows than features the decomposition is the ``eigh``
  of the n × n Gram ``X_cX_cᵀ = U diag(e) Uᵀ`` (the dual, kernel form: hold-out predictions
  ``X_valX_cᵀ U diag(f_λ) UᵀY_c``, the same formula with ``A = X_valX_cᵀU``, ``B = UᵀY_c``), and a
  final solve with n < d uses ``W = X_cᵀ(X_cX_cᵀ + λI)⁻¹Y_c``. Both equal the primal solution for
  λ > 0; λ = 0 gives the minimum-norm least-squares solution (eigenvalues below
  ``eps·max(e)·max(n, d)`` are dropped). ``dof_``, the effective degrees of freedom per output
  column ``tr(X_c(X_cᵀX_c + λI)⁻¹X_cᵀ) = m − λ‖L⁻¹‖²_F`` (L the Cholesky factor of the final m × m
  system), comes with the final solve at the cost of one triangular inverse.
* ``procrustes`` (:class:`ProcrustesMap`): ``W = U Vᵀ`` from the SVD ``X_cᵀY_c = U Σ Vᵀ``, the
  orthogonal (semi-orthogonal when d_in ≠ d_out) W minimising ``‖X_cW − Y_c‖_F`` (the same R as
  ``scipy.linalg.orthogonal_procrustes(X_c, Y_c)``). ``procrustes-scaled`` (``scale=True``) uses
  ``W = s U Vᵀ`` with the least-squares scale ``s = tr(Σ) / ‖X_cUVᵀ‖²_F``, reported as ``scale_``
  (the denominator is ``‖X_c‖²_F`` when d_in ≤ d_out, where UVᵀ has orthonormal rows).
* ``whiten-procrustes`` (:class:`WhitenedProcrustesMap`): shrunk covariances
  ``Σ_x(α) = (1 − α) Σ_x + α μ_x I`` (``Σ_x = X_cᵀX_c/n``, ``μ_x = tr(Σ_x)/d_in``; same for y), with
  α fixed or the Ledoit–Wolf estimate (as sklearn's ``ledoit_wolf_shrinkage``), then
  ``W = Σ_x^{-1/2} R Σ_y^{1/2}`` where ``R`` is the Procrustes rotation between the whitened sides
  ``X_cΣ_x^{-1/2}`` and ``Y_cΣ_y^{-1/2}``. One ``eigh`` per side gives both powers for every α (the
  shrunk matrix has the same eigenvectors), so a singular covariance is fine whenever α > 0;
  α = 0 with a singular covariance raises.
* ``pca-procrustes`` (:class:`PCAProcrustesMap`): ``P_x``, ``P_y`` = the top-q principal axes of
  each side (covariance + ``eigh`` of the top-q subset), Procrustes ``R`` (q × q) between
  ``X_cP_x`` and ``Y_cP_y``, mapped back: ``W = P_x R P_yᵀ`` (rank q).
* ``logit-subspace`` (:class:`LogitSubspaceMap`): ``Q`` (d × q) = the top-q left singular vectors
  of the tuned unembedding ``W_U`` (d_model × d_vocab; by default with its mean over the vocabulary
  removed, since softmax ignores a shift common to all logits), ``P = QQᵀ``. Only the component of
  x in span(Q) moves: a ridge (default) or Procrustes map ``z ↦ zR + c`` is fitted from ``xQ`` to
  ``yQ`` and ``ŷ = x − xP + (xQR + c)Qᵀ``, i.e. ``W = I + Q(R − I)Qᵀ``, ``b = cQᵀ``. For any v
  orthogonal to span(Q), ``vW = v``: the complement is left exactly unchanged. Compute Q once with
  :func:`logit_basis` and pass it as ``basis`` when fitting many layers.
* ``lowrank`` (:class:`LowRankCorrectionMap`, RQ3): the base → tuned map is near the identity, so
  the **correction** is restricted to rank k: ``W = I + U_k V_kᵀ``.
  ``method="rrr"``: reduced-rank (ridge) regression of ``D = y − x`` on x (Izenman 1975 with
  identity weight; Mukherjee & Zhu 2011 for the ridge version): ``B̂`` = the ridge coefficient of
  D on x (λ chosen as in ``ridge``, or fixed; λ = 0 is ordinary least squares), ``F = X_cB̂`` the
  fitted values, ``V_k`` = the top-k right singular vectors of F (top-k eigenvectors of
  ``B̂ᵀX_cᵀX_cB̂``), and ``U_k = B̂V_k``, so ``U_kV_kᵀ = B̂V_kV_kᵀ`` is the rank-k coefficient
  closest to B̂ in the fitted-value metric ``‖X_c(B̂ − B)‖_F``.
  ``method="pca-procrustes"``: ``V_k`` = the top-k principal axes of ``D``, Procrustes ``R`` (k × k)
  between ``X_cV_k`` and ``Y_cV_k``, and ``U_k = V_k(R − I)`` (the logit-subspace construction with
  the PCA basis of D). ``rank="full"`` means no truncation. :func:`fit_lowrank_path` fits many
  ranks from one decomposition.

Every fitted map records ``n_samples_`` (fit rows), ``n_groups_`` (prompts), ``dof_`` (effective
degrees of freedom per output column: ridge as above; 0 for identity and mean shift; the free
parameters of the rotation for the Procrustes family, per output column, not counting the
covariances or bases estimated without the targets) and, where a ridge is inside, ``alpha_`` (λ);
:func:`fit_summary` collects them and flags ``rows < d_in`` as underdetermined.

Controls: :func:`fit_shuffled` fits a fresh copy of an estimator on ``(X, Y[π])`` where π pairs no
row with a row of its own prompt (the shuffled-pairs null); :func:`map_diagnostics` gives R²,
CKA(mapped, tuned) and mean cosine.

Standardisation
---------------
``standardize`` ∈ {"none", "x", "y", "both"} z-scores the chosen side(s) with the fit data's mean
and standard deviation (ddof 0; a constant column keeps scale 1) before fitting, and the result is
folded back so ``W_``/``b_`` act on raw activations: with ``x_s = (x − m_x)/s_x`` and fitted
``(W_s, b_s)``, ``W_ = diag(1/s_x) W_s diag(s_y)`` and ``b_ = (b_s − (m_x/s_x)W_s) ∘ s_y + m_y``. The
statistics are kept as ``x_mean_``, ``x_scale_``, ``y_mean_``, ``y_scale_`` (None when unused).

Precision and cost (PERF.md §2.4–2.6, §4)
-----------------------------------------
Column means and sums of squares are accumulated in float64. The factorisations run in the
estimator's ``dtype``: ``"auto"`` (default) picks float32 when both inputs are float32 (or lower
precision) and each has at least 2²⁰ elements, and float64 otherwise. Ridge (also inside
``lowrank``/``logit-subspace``) uses that precision only to *choose* λ: a float32 ``eigh`` of
``XᵀX`` squares the condition number and would give W only to ~1e-3 on residual-stream-like data,
but it ranks the λ grid correctly: ``holdout_mse_`` is within ~1e-5 (relative) of the float64 value
near the chosen λ; for λ below the float32 rounding of ``XᵀX`` (the smallest grid values, where the
hold-out error is many times its minimum) the error grows, up to ~10% when n ≈ d. The returned
ridge W is always a float64 Cholesky solve at the chosen λ (~1e-14 from a direct solve); pass
``dtype="float64"`` for float64 hold-out curves. Procrustes-type maps computed in float32 are within ~1e-4
(relative) of the float64 result. Learned ``W_``/``b_`` are always stored as float64.
``transform`` computes in float64 for float64 input and in float32 otherwise (torch tensors stay
on their device and keep their dtype). Each fit does at most one d × d (or n × n) factorisation
per side or product, plus one Cholesky for the final ridge solve; large SVDs and Cholesky
factorisations go through torch (MKL), which beats scipy's bundled OpenBLAS on them. At
d = 4096 on this project's two-core CPU: a ridge fit over a 20-λ grid (4000 + 1000 rows, float32
activations) ~14 s, Procrustes on 5000 rows ~13.5 s (``experiments/benchmarks/bench_maps.py``).

Saving
------
:func:`save_map` writes ``<prefix>.safetensors`` (every learned array: ``W_``, ``b_``, bases, λ grid,
…) and ``<prefix>.json`` (class, parameters, scalar learned attributes, format and package
version), each atomically (temporary file + rename). :func:`load_map` rebuilds the estimator from a
registry of the classes here; nothing is pickled. ``LogitSubspaceMap`` keeps its basis ``basis_``
but not the (large) ``W_U`` parameter, which loads as None.

Inputs may be numpy arrays or torch tensors (any float dtype, any device); fitting copies them to
CPU numpy. Bad input raises :class:`MapError` (an :class:`mdiff.errors.MdiffError` and a ``ValueError``)
with a one-line message; using a map before ``fit`` raises :class:`MapNotFittedError` (also sklearn's
``NotFittedError``). Nothing here prints.

scikit-learn
------------
Every map is a scikit-learn estimator (``BaseEstimator`` with ``TransformerMixin`` and
``RegressorMixin``): ``get_params``/``set_params``, ``sklearn.base.clone``, ``check_is_fitted``,
``predict`` (= ``transform``) and ``fit_transform`` work, and ``score`` is the variance-weighted R²
above. Y is always 2-D (the ``multi_output`` tag, not ``single_output``); ``tests/test_maps_sklearn.py``
runs sklearn's estimator checks and lists the ones that do not apply, with reasons.
"""

import importlib.metadata as _md
import inspect
import json
import math
import os
import tempfile
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sps
import torch
from jaxtyping import Float, Shaped
from sklearn.base import BaseEstimator, RegressorMixin, TransformerMixin
from sklearn.exceptions import NotFittedError

from mdiff.arrays import as_float_array, as_float_pair, factorize_groups
from mdiff.errors import MdiffError

__all__ = [
    "DEFAULT_RELATIVE_ALPHAS",
    "IdentityMap",
    "LinearMap",
    "LogitSubspaceMap",
    "LowRankCorrectionMap",
    "MAP_NAMES",
    "MapError",
    "MapNotFittedError",
    "MeanShiftMap",
    "PCAProcrustesMap",
    "ProcrustesMap",
    "RidgeMap",
    "WhitenedProcrustesMap",
    "fit_lowrank_path",
    "fit_shuffled",
    "fit_summary",
    "load_map",
    "logit_basis",
    "make_map",
    "map_diagnostics",
    "save_map",
    "shuffled_pairs_permutation",
]

Standardize = Literal["none", "x", "y", "both"]
DType = Literal["auto", "float32", "float64"]
ArrayX = Float[np.ndarray, "n_samples d_in"] | Float[torch.Tensor, "n_samples d_in"]
ArrayY = Float[np.ndarray, "_n_samples d_out"] | Float[torch.Tensor, "_n_samples d_out"]
Groups = Shaped[np.ndarray, " _n_samples"] | Shaped[torch.Tensor, " _n_samples"] | Sequence[Hashable] | None
Alphas = float | Sequence[float] | np.ndarray | None

DEFAULT_RELATIVE_ALPHAS: np.ndarray = np.logspace(-6.0, 3.0, 20)
"""Default ridge grid, relative to the mean eigenvalue ``‖X_c‖²_F / d_in`` of the training fold."""

FORMAT = "mdiff.maps"
FORMAT_VERSION = 1

# Below this many elements per input, float32 inputs are still processed in float64 (it is cheap).
_FP32_MIN_ELEMENTS = 1 << 20
# Thin SVDs with min(shape) at least this large go through torch (MKL gesdd): on this project's CPU it
# is a little faster than scipy's bundled OpenBLAS gesdd on cross-covariances and up to 2x faster on
# slowly decaying spectra; smaller ones use scipy.
_TORCH_SVD_MIN = 512
# Columns of W_U processed at once when forming W_U W_Uᵀ.
_VOCAB_CHUNK = 8192

_M = TypeVar("_M", bound="LinearMap")


class MapError(MdiffError, ValueError):
    """Bad input or parameters for a map: an :class:`~mdiff.errors.MdiffError` (a one-line message for
    the user) that is also a ``ValueError``, as scikit-learn expects of an estimator."""


class MapNotFittedError(MapError, NotFittedError):
    """A map was used (transform, predict, score, save_map, fit_summary) before ``fit``: also
    scikit-learn's ``NotFittedError``, so sklearn tools and ``check_is_fitted`` recognise it."""


# --------------------------------------------------------------------------------------------
# input handling


def _check_dense(a: Any, name: str, what: str) -> None:
    if a is None and name == "Y":  # sklearn's wording for a supervised estimator
        raise MapError(f"{what} requires y to be passed, but the target y is None; pass Y, the tuned activations")
    if a is None:
        raise MapError(f"{name} is None; pass activations as a numpy array or torch tensor")
    if sps.issparse(a):
        raise MapError(f"{name} is a scipy sparse matrix, which {what} does not support; pass a dense array")


def _to_numpy(a: Any, name: str, ndim: int | None = 2) -> np.ndarray:
    _check_dense(a, name, "a map")
    try:
        return as_float_array(a, name, ndim, purpose="fitting or applying a map")
    except MdiffError as err:
        raise MapError(str(err)) from None


def _validate_pair(X: Any, Y: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    _check_dense(X, "X", what)
    _check_dense(Y, "Y", what)
    try:
        return as_float_pair(X, Y, what, purpose="fitting or applying a map")
    except MdiffError as err:
        raise MapError(str(err)) from None


def _resolve_dtype(dtype: str, x: np.ndarray, y: np.ndarray) -> np.dtype:
    if dtype == "float64":
        return np.dtype(np.float64)
    if dtype == "float32":
        return np.dtype(np.float32)
    if x.dtype == np.float32 and y.dtype == np.float32 and min(x.size, y.size) >= _FP32_MIN_ELEMENTS:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _centre(a: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Column-centred copy in ``dtype`` (C-contiguous) and the float64 column mean.

    The mean is accumulated in float64. For float32 output from float32 input the subtraction is
    done in float32: it adds only a constant per-column offset of at most ``eps₃₂·|mean|`` (the
    mean's rounding), whose effect on cross-products is second order, at a tenth of the cost of a
    float64 round trip.
    """
    mean = a.mean(axis=0, dtype=np.float64)
    if dtype == np.float32 and a.dtype == np.float32:
        return np.ascontiguousarray(a - mean.astype(np.float32)), mean
    centred = a.astype(np.float64, copy=True) if a.dtype != np.float64 else a.copy()
    centred -= mean
    return np.ascontiguousarray(centred, dtype=dtype), mean


def _sumsq(a: np.ndarray) -> float:
    """Sum of squares accumulated in float64 (BLAS dot of float32 arrays loses ~1e-4 at 10⁷ elements)."""
    return float(np.einsum("ij,ij->", a, a, dtype=np.float64))


def _check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise MapError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_int(value: Any, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise MapError(f"{name} must be an integer ≥ {low}, got {value!r}")
    return int(value)


def _check_fraction(value: Any, name: str, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not low <= float(value) <= high:
        raise MapError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _check_holdout(holdout: Any) -> float | int:
    if isinstance(holdout, (float, np.floating)) and 0.0 < float(holdout) < 1.0:
        return float(holdout)
    if isinstance(holdout, (int, np.integer)) and not isinstance(holdout, bool) and holdout >= 1:
        return int(holdout)
    raise MapError(
        f"holdout must be a fraction in (0, 1) or a number of prompts ≥ 1 to hold out for choosing λ, got {holdout!r}"
    )


def _check_alphas(alphas: Any) -> np.ndarray | None:
    """None → default relative grid; a number or a sequence → absolute λ values (≥ 0)."""
    if alphas is None:
        return None
    if isinstance(alphas, torch.Tensor):
        alphas = alphas.detach().cpu().numpy()
    if isinstance(alphas, bool):
        raise MapError(f"alphas must be None, a number ≥ 0 or a list of them, got {alphas!r}")
    try:
        arr = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    except (TypeError, ValueError):
        raise MapError(f"alphas must be None, a number ≥ 0 or a list of them, got {alphas!r}") from None
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise MapError(f"alphas must be None, a number ≥ 0 or a non-empty list of them, got {alphas!r}")
    return arr


# --------------------------------------------------------------------------------------------
# linear algebra


def _eigh_desc(S: np.ndarray, top: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix; ``top`` = leading subset."""
    d = S.shape[0]
    if top is not None and top < d // 2:
        e, V = sla.eigh(S, subset_by_index=[d - top, d - 1], driver="evr", check_finite=False)
    else:
        e, V = sla.eigh(S, driver="evd", check_finite=False)
        if top is not None:
            e, V = e[d - top :], V[:, d - top :]
    return e[::-1].copy(), np.ascontiguousarray(V[:, ::-1])


def _svd(M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``M = U diag(s) Vt`` in M's dtype (torch/MKL for large matrices, scipy otherwise)."""
    if min(M.shape) >= _TORCH_SVD_MIN:
        U, s, Vt = torch.linalg.svd(torch.from_numpy(np.ascontiguousarray(M)), full_matrices=False)
        return U.numpy(), s.numpy(), Vt.numpy()
    try:
        return sla.svd(M, full_matrices=False, lapack_driver="gesdd", check_finite=False)
    except np.linalg.LinAlgError:  # gesdd rarely fails to converge; gesvd is slower but robust
        return sla.svd(M, full_matrices=False, lapack_driver="gesvd", check_finite=False)


def _polar(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthogonal polar factor ``U Vᵀ`` of M (the Procrustes rotation) and M's singular values."""
    U, s, Vt = _svd(M)
    return U @ Vt, s


def _filter(e: np.ndarray, lam: float, tol: float) -> np.ndarray:
    """Ridge spectral filter ``1/(e + λ)``; directions with ``e ≤ tol`` are dropped when λ = 0."""
    if lam > 0:
        return 1.0 / (e + lam)
    out = np.zeros_like(e)
    keep = e > tol
    out[keep] = 1.0 / e[keep]
    return out


def _solve_shifted(M: np.ndarray, rhs: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """``(M + λI)⁻¹ rhs`` for symmetric PSD M (overwritten) and ``tr(M(M + λI)⁻¹)``: Cholesky, or an
    ``eigh`` pseudo-inverse when λ = 0 or ``M + λI`` is numerically singular (the minimum-norm solution).

    The trace is the ridge fit's effective degrees of freedom per output column (``M`` = XᵀX or its
    Gram XXᵀ: both give ``tr(X(XᵀX + λI)⁻¹Xᵀ)``); from the Cholesky factor it is ``m − λ‖L⁻¹‖²_F``.
    """
    m = M.shape[0]
    M.flat[:: m + 1] += lam
    if lam > 0:
        # torch's (MKL) Cholesky is ~2x faster than scipy's OpenBLAS one here; Lᵀ (upper) as a
        # Fortran-ordered view goes to LAPACK's potrs without a copy.
        L, info = torch.linalg.cholesky_ex(torch.from_numpy(M))
        if int(info) == 0:
            sol = sla.cho_solve((L.numpy().T, False), rhs, check_finite=False)
            Linv = torch.linalg.solve_triangular(L, torch.eye(m, dtype=L.dtype), upper=False)
            dof = m - lam * float(torch.sum(Linv.double() ** 2))
            return sol, float(min(max(dof, 0.0), m))
        # λ below the rounding of M: fall through to the pseudo-inverse
    e, V = sla.eigh(M, driver="evd", overwrite_a=True, check_finite=False)
    e = np.maximum(e, 0.0)
    f = _filter(e.astype(np.float64), 0.0, float(e.max(initial=0.0) * m * np.finfo(M.dtype).eps))
    dof = float(np.sum(np.maximum(e.astype(np.float64) - lam, 0.0) * f))  # Σ e₀/(e₀ + λ) over kept directions
    return V @ (f[:, None].astype(M.dtype) * (V.T @ rhs)), dof


def _ridge_direct(
    Xc: np.ndarray, Yc: np.ndarray, lam: float, G: np.ndarray | None = None, C: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """``(X_cᵀX_c + λI)⁻¹ X_cᵀY_c`` and its degrees of freedom ``tr(X_c(X_cᵀX_c + λI)⁻¹X_cᵀ)``: primal
    form if n ≥ d (or G, C given), else the dual form ``X_cᵀ(X_cX_cᵀ + λI)⁻¹Y_c``. λ = 0 gives the
    minimum-norm least-squares solution.

    ``G = X_cᵀX_c`` and ``C = X_cᵀY_c`` may be passed in (G is overwritten).
    """
    n, d = Xc.shape
    if G is not None or n >= d:
        G = Xc.T @ Xc if G is None else G
        C = Xc.T @ Yc if C is None else C
        return _solve_shifted(G, C, lam)
    sol, dof = _solve_shifted(Xc @ Xc.T, Yc, lam)
    return Xc.T @ sol, dof


def _holdout_split(n: int, groups: np.ndarray | None, holdout: float | int, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    codes, n_groups = (np.arange(n, dtype=np.int64), n) if groups is None else (groups, int(groups.max()) + 1)
    if n_groups < 2:
        raise MapError("choosing λ on a hold-out fold needs at least 2 prompts; pass a fixed alphas value or more data")
    n_hold = int(round(holdout * n_groups)) if isinstance(holdout, float) else int(holdout)
    n_hold = min(max(n_hold, 1), n_groups - 1)
    held = np.random.default_rng(seed).permutation(n_groups)[:n_hold]
    mask = np.isin(codes, held)
    train, val = np.flatnonzero(~mask), np.flatnonzero(mask)
    if train.size < 2:
        raise MapError(
            f"the training fold has {train.size} row(s) after holding out {val.size}; lower holdout or add prompts"
        )
    return train, val


def _group_folds(n: int, groups: np.ndarray | None, cv: int, seed: int | None) -> tuple[np.ndarray, int]:
    """Fold index per row for prompt-grouped K-fold CV (a prompt's rows share a fold); K ≤ the number of prompts."""
    codes, n_groups = (np.arange(n, dtype=np.int64), n) if groups is None else (groups, int(groups.max()) + 1)
    if n_groups < 2:
        raise MapError("choosing λ by cross-validation needs at least 2 prompts; pass a fixed alphas value or more data")
    k = min(int(cv), n_groups)
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    fold_of_group[np.random.default_rng(seed).permutation(n_groups)] = np.arange(n_groups) % k
    folds = fold_of_group[codes]
    for f in range(k):
        if int((folds != f).sum()) < 2:
            raise MapError(f"a cross-validation training fold has fewer than 2 rows; use fewer folds (cv < {k})")
    return folds, k


def _holdout_errors(
    x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, grid: np.ndarray | None, dt: np.dtype,
    keep: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Summed squared hold-out error of ridge (fit on ``train`` rows, predicting ``val`` rows) for every λ.

    One eigendecomposition in ``dt`` serves the whole grid (see the module docstring). ``grid`` None:
    the default grid relative to the training fold's mean eigenvalue. Returns (errors, absolute grid,
    state); with ``keep`` the state holds what a refit reuses (training-fold means, centred hold-out
    rows, and in the primal form the float64 XᵀX, XᵀY of the training fold).
    """
    f64 = np.dtype(np.float64)
    n_tr, d = train.size, x.shape[1]
    primal = n_tr >= d
    xt = x[train]
    scale = float(xt.var(axis=0, dtype=f64).sum()) * n_tr / d  # mean eigenvalue of X_cᵀX_c
    # Training fold: float64 when its XᵀX, XᵀY are reused by the final solve (primal form), else dt.
    Xt, mx = _centre(xt, f64 if primal else dt)
    del xt
    Yt, my = _centre(y[train], f64 if primal else dt)
    Xv = x[val] - mx  # float64
    Yv = y[val] - my
    Xv_s, Yv_s = Xv.astype(dt), Yv.astype(dt)
    # λ selection from one eigendecomposition in dt. Predictions on the hold-out fold are
    # A diag(1/(e + λ)) B: primal A = X_vV, B = VᵀX_tᵀY_t (XᵀX = V diag(e) Vᵀ); dual (n < d)
    # A = X_vX_tᵀU, B = UᵀY_t (X_tX_tᵀ = U diag(e) Uᵀ), the kernel form of the same predictions.
    G = C = None
    if primal:
        G = Xt.T @ Xt
        C = Xt.T @ Yt
        e, V = sla.eigh(G.astype(dt, copy=False), driver="evd", check_finite=False)
        A = Xv_s @ V
        B = V.T @ C.astype(dt, copy=False)
        del V
    else:
        K = Xt @ Xt.T
        e, U = sla.eigh(K, driver="evd", overwrite_a=True, check_finite=False)
        A = (Xv_s @ Xt.T) @ U
        B = U.T @ Yt
        del K, U
    del Xt, Yt
    if scale <= 0.0:
        raise MapError("X is constant on the training fold, so ridge has nothing to fit; check the activations")
    alphas = DEFAULT_RELATIVE_ALPHAS * scale if grid is None else grid
    e = np.maximum(e.astype(f64), 0.0)
    tol = float(e.max(initial=0.0) * max(n_tr, d) * np.finfo(dt).eps)
    P = (A.T @ A).astype(f64) * (B @ B.T).astype(f64)
    r = np.einsum("ij,ij->i", A.T @ Yv_s, B, dtype=f64)
    del A, B, Xv_s, Yv_s
    yv2 = float(np.vdot(Yv, Yv))
    errs = np.empty(alphas.size)
    for j, lam in enumerate(alphas):
        f = _filter(e, float(lam), tol)
        errs[j] = max(yv2 - 2.0 * float(f @ r) + float(f @ P @ f), 0.0)
    state = {"primal": primal, "G": G, "C": C, "mx": mx, "my": my, "Xv": Xv, "Yv": Yv} if keep else {}
    return errs, np.asarray(alphas, dtype=f64), state


def _stiefel_dof(d_in: int, d_out: int) -> float:
    """Free parameters of a (semi-)orthogonal d_in × d_out matrix, per output column."""
    lo, hi = min(d_in, d_out), max(d_in, d_out)
    return (lo * hi - lo * (lo + 1) / 2) / d_out


def _ledoit_wolf(Xc: np.ndarray, G: np.ndarray) -> float:
    """Ledoit–Wolf shrinkage toward μI for centred X with ``G = X_cᵀX_c`` (same value as sklearn's)."""
    n, d = Xc.shape
    if d == 1:
        return 0.0
    row_sq = np.einsum("ij,ij->i", Xc, Xc, dtype=np.float64)
    mu = float(row_sq.sum()) / (n * d)
    delta_ = float(np.vdot(G.astype(np.float64, copy=False), G.astype(np.float64, copy=False))) / n**2
    beta_ = float(row_sq @ row_sq)
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta <= 0 or delta <= 0 else float(beta / delta)


def _subspace_affine(R: np.ndarray, c: np.ndarray, Q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``W = I + Q(R − I)Qᵀ``, ``b = cQᵀ``: move only the span(Q) component; returns (W, b, Q(R − I))."""
    U = Q @ R - Q
    W = U @ Q.T
    W.flat[:: W.shape[0] + 1] += 1.0
    return W, c @ Q.T, U


def _check_unembed(W_U: Any, d: int, q: int) -> tuple[int, int]:
    if not isinstance(W_U, (np.ndarray, torch.Tensor)):
        raise MapError("the logit subspace needs W_U, the tuned model's unembedding (d_model, d_vocab), or a basis")
    shape = tuple(W_U.shape)
    if len(shape) != 2 or shape[0] != d:
        hint = "; pass W_U.T" if len(shape) == 2 and shape[1] == d else ""
        raise MapError(f"W_U must have shape (d_model={d}, d_vocab) but has {shape}{hint}")
    if q > min(shape):
        raise MapError(f"q = {q} exceeds min(d_model, d_vocab) = {min(shape)}")
    return shape


def _check_basis(basis: Any, d: int, q: int) -> np.ndarray:
    Q = _to_numpy(basis, "basis").astype(np.float64, copy=False)
    if Q.shape[0] != d or Q.shape[1] < q:
        raise MapError(f"basis must have shape (d_model={d}, ≥ q={q}) but has {Q.shape}")
    Q = np.ascontiguousarray(Q[:, :q])
    if np.abs(Q.T @ Q - np.eye(q)).max() > 1e-5:
        raise MapError("basis must have orthonormal columns (e.g. from logit_basis or a fitted map's basis_)")
    return Q


def _logit_basis(W_U: Any, q: int, center_unembed: bool, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Top-q left singular vectors/values of (vocab-centred) W_U, from ``W_UW_Uᵀ`` over vocab chunks."""
    d, V = W_U.shape
    np_dt = np.float64 if dt == np.float64 else np.float32

    def chunk(j: int) -> np.ndarray:
        return _to_numpy(W_U[:, j : j + _VOCAB_CHUNK], "W_U").astype(np_dt, copy=False)

    mean = np.zeros(d)
    if center_unembed:
        for j in range(0, V, _VOCAB_CHUNK):
            mean += chunk(j).sum(axis=1, dtype=np.float64)
        mean /= V
    G = np.zeros((d, d), dtype=np_dt)
    for j in range(0, V, _VOCAB_CHUNK):
        block = chunk(j)
        if center_unembed:
            block = block - mean.astype(np_dt)[:, None]
        G += block @ block.T
    e, Q = _eigh_desc(G, top=q)
    return Q.astype(np.float64), np.sqrt(np.maximum(e.astype(np.float64), 0.0))


def logit_basis(
    W_U: Float[np.ndarray, "d_model d_vocab"] | Float[torch.Tensor, "d_model d_vocab"],
    q: int,
    *,
    center_unembed: bool = True,
    dtype: DType = "auto",
) -> Float[np.ndarray, "d_model q"]:
    """The top-q left singular vectors of the unembedding (columns, by decreasing singular value).

    With ``center_unembed`` W_U's mean over the vocabulary is removed first. ``dtype="auto"``
    accumulates ``W_UW_Uᵀ`` in float32 for float32 (or lower) W_U, float64 otherwise.
    """
    _check_choice(dtype, "dtype", ("auto", "float32", "float64"))
    q = _check_int(q, "q")
    _check_unembed(W_U, int(W_U.shape[0]), q)
    low = (isinstance(W_U, torch.Tensor) and W_U.dtype != torch.float64) or (
        isinstance(W_U, np.ndarray) and W_U.dtype != np.float64
    )
    dt = np.dtype(np.float32 if dtype == "float32" or (dtype == "auto" and low) else np.float64)
    return _logit_basis(W_U, q, center_unembed, dt)[0]


# --------------------------------------------------------------------------------------------
# base class


class LinearMap(TransformerMixin, RegressorMixin, BaseEstimator):
    """Base class: an affine map ``ŷ = x @ W_ + b_`` fitted from paired activations (X → Y).

    Subclasses implement ``_fit`` on (possibly standardised) float arrays and return (W, b) in that
    space; the base class validates input, standardises, folds the standardisation back and stores
    ``W_``, ``b_`` (float64), ``n_features_in_`` and ``n_features_out_``.

    A scikit-learn estimator (``BaseEstimator``): ``get_params``/``set_params`` and
    ``sklearn.base.clone`` work, ``predict`` is ``transform`` (the regressor API; ``score`` stays the
    variance-weighted R²) and ``fit_transform(X, Y)`` is ``fit(X, Y).transform(X)``. Targets are
    always 2-D (``multi_output`` tag, no ``single_output``).
    """

    name: ClassVar[str] = ""
    """The :func:`make_map` name."""
    _square: ClassVar[bool] = False
    _array_attrs: ClassVar[tuple[str, ...]] = ()
    _scalar_attrs: ClassVar[tuple[str, ...]] = ()
    _nonjson_params: ClassVar[tuple[str, ...]] = ()

    standardize: str
    dtype: str

    def __init__(self, *, standardize: Standardize = "none", dtype: DType = "auto") -> None:
        self.standardize = standardize
        self.dtype = dtype

    def __sklearn_tags__(self):  # scikit-learn ≥ 1.6
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = False  # Y must be 2-D (n_samples, d_out)
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def __sklearn_is_fitted__(self) -> bool:
        return getattr(self, "W_", None) is not None

    # ---- parameters -----------------------------------------------------------------------

    @classmethod
    def _param_names(cls) -> list[str]:
        """Constructor parameter names in signature order (``_get_param_names`` sorts them)."""
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind != p.VAR_KEYWORD]

    def set_params(self: _M, **params: Any) -> _M:
        """Set constructor parameters; returns self. An unknown name raises :class:`MapError`."""
        valid = set(self._param_names())
        for key, value in params.items():
            if key not in valid:
                raise MapError(f"{type(self).__name__} has no parameter {key!r}; valid: {', '.join(sorted(valid))}")
            setattr(self, key, value)
        return self

    def clone(self: _M) -> _M:
        """A new, unfitted estimator with the same parameters (the same objects, not copies:
        ``sklearn.base.clone`` deep-copies array parameters such as ``W_U``)."""
        return type(self)(**self.get_params(deep=False))

    def __repr__(self) -> str:
        parts = []
        for key in self._param_names():
            value = getattr(self, key)
            if isinstance(value, (np.ndarray, torch.Tensor)):
                parts.append(f"{key}=<{type(value).__name__} {tuple(value.shape)}>")
            else:
                parts.append(f"{key}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def _check_params(self, x: np.ndarray, y: np.ndarray) -> None:
        """Validate constructor parameters against the data (subclasses extend)."""
        _check_choice(self.standardize, "standardize", ("none", "x", "y", "both"))
        _check_choice(self.dtype, "dtype", ("auto", "float32", "float64"))
        if self._square and x.shape[1] != y.shape[1]:
            raise MapError(
                f"{type(self).__name__} needs d_in == d_out (it is built around the identity) but X has "
                f"{x.shape[1]} and Y {y.shape[1]} features; use ridge or procrustes"
            )

    # ---- fitting ----------------------------------------------------------------------------

    def _reset(self) -> None:
        for key in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, key)

    def _prepare(self, X: Any, Y: Any, groups: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.dtype]:
        """Validate, set the standardisation statistics; return the arrays to fit, groups, dtype."""
        x, y = _validate_pair(X, Y, f"{type(self).__name__}.fit")
        self._check_params(x, y)
        try:
            codes = None if groups is None else factorize_groups(groups, x.shape[0])[0]
        except MdiffError as err:
            raise MapError(str(err)) from None
        dt = _resolve_dtype(self.dtype, x, y)
        self._reset()
        self.n_features_in_ = int(x.shape[1])
        self.n_features_out_ = int(y.shape[1])
        self.n_samples_ = int(x.shape[0])
        self.n_groups_ = int(x.shape[0]) if codes is None else int(codes.max()) + 1
        self.dof_ = None
        self.x_mean_ = self.x_scale_ = self.y_mean_ = self.y_scale_ = None
        if self.standardize in ("x", "both"):
            x, self.x_mean_, self.x_scale_ = _zscore(x)
        if self.standardize in ("y", "both"):
            y, self.y_mean_, self.y_scale_ = _zscore(y)
        return x, y, codes, dt

    def _finish(self, W: np.ndarray, b: np.ndarray) -> None:
        """Fold the standardisation back into (W, b) and store them as float64."""
        W = np.asarray(W, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64).reshape(-1)
        if self.x_scale_ is not None:
            b = b - (self.x_mean_ / self.x_scale_) @ W
            W = W / self.x_scale_[:, None]
        if self.y_scale_ is not None:
            W = W * self.y_scale_[None, :]
            b = b * self.y_scale_ + self.y_mean_
        self.W_ = np.ascontiguousarray(W)
        self.b_ = np.ascontiguousarray(b)

    def fit(self: _M, X: ArrayX, Y: ArrayY, groups: Groups = None) -> _M:
        """Fit the map from paired activations.

        Args:
            X: base activations, one row per sample (prompt position).
            Y: tuned activations for the same samples in the same order.
            groups: optional prompt label per row; hold-out folds (ridge λ choice) are split by prompt.

        Returns:
            self, with ``W_``, ``b_`` and the class's learned attributes set.

        Raises:
            MapError: NaN/inf, mismatched rows, fewer than 2 samples, or invalid parameters.
        """
        x, y, codes, dt = self._prepare(X, Y, groups)
        W, b = self._fit(x, y, codes, dt)
        self._finish(W, b)
        return self

    def _fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    # ---- applying ---------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not self.__sklearn_is_fitted__():
            raise MapNotFittedError(f"{type(self).__name__} is not fitted yet; call fit(X, Y) before transform or score")

    def transform(
        self, X: Float[np.ndarray, "*batch d_in"] | Float[torch.Tensor, "*batch d_in"]
    ) -> Float[np.ndarray, "*batch d_out"] | Float[torch.Tensor, "*batch d_out"]:
        """Apply ``x @ W_ + b_`` along the last axis.

        numpy input gives numpy output (float64 for float64 input, float32 otherwise); a torch tensor
        gives a tensor on the same device with the same dtype (computed in float32 for half types).
        """
        self._check_fitted()
        d = self.n_features_in_
        if isinstance(X, torch.Tensor):
            t = X.detach()
            if t.ndim < 1 or t.shape[-1] != d:
                raise MapError(f"X has shape {tuple(t.shape)} but the map expects {d} features in the last axis")
            if not t.is_floating_point():
                t = t.to(torch.float32)
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                _to_numpy(t.cpu().to(torch.float64).numpy(), "X", ndim=None)
            cdt = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
            W = torch.from_numpy(self.W_).to(device=t.device, dtype=cdt)
            b = torch.from_numpy(self.b_).to(device=t.device, dtype=cdt)
            out = t.to(cdt) @ W + b
            return out.to(t.dtype)
        x = _to_numpy(X, "X", ndim=None)
        if x.shape[-1] != d:
            raise MapError(f"X has shape {x.shape} but the map expects {d} features in the last axis")
        if x.dtype == np.float64:
            return x @ self.W_ + self.b_
        return x @ self.W_.astype(np.float32) + self.b_.astype(np.float32)

    def predict(
        self, X: Float[np.ndarray, "*batch d_in"] | Float[torch.Tensor, "*batch d_in"]
    ) -> Float[np.ndarray, "*batch d_out"] | Float[torch.Tensor, "*batch d_out"]:
        """The predicted tuned activations ``x @ W_ + b_``: the same as :meth:`transform` (scikit-learn's regressor API)."""
        return self.transform(X)

    def score(self, X: ArrayX, Y: ArrayY) -> float:
        """Variance-weighted R² of ``transform(X)`` against Y (``r2_score(multioutput="variance_weighted")``)."""
        self._check_fitted()
        x, y = _validate_pair(X, Y, "score")
        if x.shape[1] != self.n_features_in_ or y.shape[1] != self.n_features_out_:
            raise MapError(
                f"X, Y have {x.shape[1]}, {y.shape[1]} features but the map was fit on "
                f"{self.n_features_in_} → {self.n_features_out_}"
            )
        return _r2(y, x.astype(np.float64, copy=False) @ self.W_ + self.b_)

    # ---- description -------------------------------------------------------------------------

    def _json_params(self) -> dict[str, Any]:
        out = {}
        for key, value in self.get_params().items():
            out[key] = None if key in self._nonjson_params else _jsonable(value, key)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description: class, name, parameters and scalar learned attributes."""
        out: dict[str, Any] = {"class": type(self).__name__, "name": self.name, "params": self._json_params()}
        fitted = getattr(self, "W_", None) is not None
        out["fitted"] = fitted
        if fitted:
            attrs = {"n_features_in_": self.n_features_in_, "n_features_out_": self.n_features_out_}
            for key in ("n_samples_", "n_groups_", "dof_"):
                attrs[key] = _jsonable(getattr(self, key, None), key)
            for key in self._scalar_attrs:
                attrs[key] = _jsonable(getattr(self, key, None), key)
            out["attributes"] = attrs
        return out


def _zscore(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = a.mean(axis=0, dtype=np.float64)
    scale = a.std(axis=0, dtype=np.float64)
    scale[scale <= 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mean))] = 1.0
    return (a - mean) / scale, mean, scale


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    y64 = y.astype(np.float64, copy=False)
    ss_res = float(np.square(y64 - pred).sum())
    ss_tot = float(np.square(y64 - y64.mean(axis=0)).sum())
    if ss_tot <= 0.0:
        raise MapError("Y is constant over the samples, so R² is undefined; score on more varied samples")
    return 1.0 - ss_res / ss_tot


def _jsonable(value: Any, name: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, (np.ndarray, list, tuple)):
        arr = np.asarray(value)
        if arr.ndim <= 1 and arr.size <= 10_000 and arr.dtype.kind in "fiub":
            return arr.tolist()
    raise MapError(f"parameter {name} = {type(value).__name__} cannot be stored as JSON")


# --------------------------------------------------------------------------------------------
# estimators


class IdentityMap(LinearMap):
    """``ŷ = x`` (``W_ = I``, ``b_ = 0``): the no-change baseline. Needs d_in == d_out."""

    name = "identity"
    _square = True

    def __init__(self, *, standardize: Standardize = "none", dtype: DType = "auto") -> None:
        super().__init__(standardize=standardize, dtype=dtype)

    def _fit(self, x, y, groups, dt):
        d = x.shape[1]
        self.dof_ = 0.0
        return np.eye(d), np.zeros(d)


class MeanShiftMap(LinearMap):
    """``ŷ = x + mean(y − x)`` (``W_ = I``): the constant-offset baseline. Needs d_in == d_out."""

    name = "mean-shift"
    _square = True

    def __init__(self, *, standardize: Standardize = "none", dtype: DType = "auto") -> None:
        super().__init__(standardize=standardize, dtype=dtype)

    def _fit(self, x, y, groups, dt):
        shift = y.mean(axis=0, dtype=np.float64) - x.mean(axis=0, dtype=np.float64)
        self.dof_ = 0.0
        return np.eye(x.shape[1]), shift


class RidgeMap(LinearMap):
    """Ridge regression toward a prior ``W₀``, with λ chosen on held-out prompts.

    ``W = W₀ + (X_cᵀX_c + λI)⁻¹X_cᵀ(Y_c − X_cW₀)``: the minimiser of ``‖Y_c − X_cW‖² + λ‖W − W₀‖²``.

    Args:
        alphas: None (default: 20 λ, ``DEFAULT_RELATIVE_ALPHAS`` × the mean eigenvalue ``‖X_c‖²_F/d_in``
            of the training fold, or of all rows with ``cv``), a list of absolute λ values (chosen by
            hold-out error), or one number (fixed λ, fitted on all rows, no hold-out). λ = 0 gives
            minimum-norm least squares.
        prior: ``"zero"`` (W₀ = 0: textbook ridge, the ``ridge-zero`` solver), ``"identity"`` (W₀ = I:
            the penalty is on the correction ``W − I``, so a large λ gives the mean shift ``x + mean(y − x)``
            and λ → 0 least squares; the ``ridge`` solver; needs d_in == d_out), or a d_in × d_out matrix
            W₀ (e.g. a head's own W_O, so a large λ gives the raw head patch).
        cv: None: λ chosen on one hold-out fold (``holdout``); an integer K ≥ 2: by prompt-grouped K-fold
            cross-validation (every prompt's rows in one fold; errors summed over folds; K is capped at
            the number of prompts), then refit on all rows.
        holdout: fraction of prompts (float in (0, 1)) or number of prompts (int) held out to choose λ
            when ``cv`` is None (rows when no ``groups`` are passed to fit).
        refit: refit the chosen λ on all rows (one Cholesky solve); False keeps the training-fold fit
            (single hold-out only).
        random_state: seed of the hold-out split / fold assignment.
        standardize, dtype: see the module docstring. ``dtype`` sets the precision of the λ-selection
            decomposition only; every returned ``W_`` is a float64 Cholesky (or dual) solve. With a
            prior and ``standardize``, W₀ applies in the standardised space.

    Learned attributes: ``alpha_`` (chosen λ), ``alphas_`` (the absolute grid), ``holdout_mse_`` and
    ``holdout_r2_`` (per λ, mean squared error per output entry and R² of y on the hold-out rows,
    pooled over folds with ``cv``; None for a fixed λ), ``holdout_rows_`` (indices of the held-out rows;
    None with ``cv``), ``cv_folds_`` (fold of each row; None without ``cv``), ``dof_`` (effective degrees
    of freedom per output column of the final fit, ``tr(X_c(X_cᵀX_c + λI)⁻¹X_cᵀ)`` ≤ min(n − 1, d_in)).

    With n < d (training fold) the decomposition is the ``eigh`` of the n × n Gram of the centred
    training rows and the final solve uses the dual form (see the module docstring).
    """

    name = "ridge"
    _array_attrs = ("alphas_", "holdout_mse_", "holdout_r2_", "holdout_rows_", "cv_folds_", "prior_")
    _scalar_attrs = ("alpha_",)

    def __init__(
        self,
        alphas: Alphas = None,
        *,
        prior: Literal["zero", "identity", "matrix"] | np.ndarray = "zero",
        cv: int | None = None,
        holdout: float | int = 0.2,
        refit: bool = True,
        random_state: int | None = 0,
        standardize: Standardize = "none",
        dtype: DType = "auto",
    ) -> None:
        super().__init__(standardize=standardize, dtype=dtype)
        self.alphas = alphas
        self.prior = prior
        self.cv = cv
        self.holdout = holdout
        self.refit = refit
        self.random_state = random_state

    def _json_params(self) -> dict[str, Any]:
        if isinstance(self.prior, str):
            return super()._json_params()
        return {**{k: _jsonable(v, k) for k, v in self.get_params().items() if k != "prior"}, "prior": "matrix"}

    def _check_params(self, x, y):
        super()._check_params(x, y)
        _check_alphas(self.alphas)
        _check_holdout(self.holdout)
        if not isinstance(self.refit, (bool, np.bool_)):
            raise MapError(f"refit must be True or False, got {self.refit!r}")
        if self.cv is not None:
            _check_int(self.cv, "cv", low=2)
        self._prior_matrix(x.shape[1], y.shape[1])

    def _prior_matrix(self, d_in: int, d_out: int) -> np.ndarray | str | None:
        """None (zero prior), "identity", or the float64 prior matrix (validated)."""
        p = self.prior
        if isinstance(p, str):
            if p == "matrix":
                raise MapError("this ridge map was loaded with a matrix prior, which is not saved; "
                                 "set_params(prior=W0) before refitting")
            _check_choice(p, "prior", ("zero", "identity"))
            if p == "identity" and d_in != d_out:
                raise MapError(f"prior='identity' needs d_in == d_out but X has {d_in} and Y {d_out} features; "
                                 "use prior='zero' or pass a prior matrix")
            return None if p == "zero" else "identity"
        W0 = _to_numpy(p, "prior").astype(np.float64, copy=False)
        if W0.shape != (d_in, d_out):
            raise MapError(f"the prior matrix must have shape (d_in={d_in}, d_out={d_out}) but has {W0.shape}")
        return W0

    def _fit(self, x, y, groups, dt):
        W0 = self._prior_matrix(x.shape[1], y.shape[1])
        if W0 is None:
            target = y
        elif isinstance(W0, str):  # identity: regress the correction y − x (in the inputs' precision)
            target = y - x if x.dtype == y.dtype else y.astype(np.float64) - x.astype(np.float64)
        else:
            target = y.astype(np.float64) - x.astype(np.float64) @ W0
            if y.dtype == np.float32 and x.dtype == np.float32:
                target = target.astype(np.float32)
        W, b = self._fit_correction(x, target, y, groups, dt)
        if isinstance(W0, str):
            W.flat[:: W.shape[0] + 1] += 1.0
        elif W0 is not None:
            W = W + W0
        self.prior_ = None if W0 is None or isinstance(W0, str) else W0
        return W, b

    def _fit_correction(self, x, y, y_orig, groups, dt):
        """Zero-prior ridge of ``y`` on x; ``y_orig`` (the unshifted target) only enters the hold-out R²."""
        f64 = np.dtype(np.float64)
        grid = _check_alphas(self.alphas)
        self.holdout_rows_ = self.cv_folds_ = None
        if grid is not None and grid.size == 1 and not isinstance(self.alphas, (list, tuple, np.ndarray)):
            lam = float(grid[0])
            Xc, mx = _centre(x, f64)
            Yc, my = _centre(y, f64)
            W, self.dof_ = _ridge_direct(Xc, Yc, lam)
            self.alpha_, self.alphas_ = lam, grid
            self.holdout_mse_ = self.holdout_r2_ = None
            return W, my - mx @ W
        if self.cv is not None:
            return self._fit_cv(x, y, y_orig, groups, grid, dt)
        train, val = _holdout_split(x.shape[0], groups, _check_holdout(self.holdout), self.random_state)
        errs, alphas, st = _holdout_errors(x, y, train, val, grid, dt, keep=True)
        yo = y_orig[val].astype(f64, copy=False)
        ss_val = float(np.square(yo - yo.mean(axis=0)).sum())
        best = int(np.flatnonzero(errs <= errs.min())[-1])  # ties → the larger λ
        lam = float(alphas[best])
        self.alphas_ = alphas
        self.alpha_ = lam
        self.holdout_mse_ = errs / (val.size * y.shape[1])
        self.holdout_r2_ = 1.0 - errs / ss_val if ss_val > 0 else np.full(alphas.size, np.nan)
        self.holdout_rows_ = val.astype(np.int64)
        primal, G, C, mx, my, Xv, Yv = (st[k] for k in ("primal", "G", "C", "mx", "my", "Xv", "Yv"))
        # Final solve in float64 at the chosen λ.
        if not self.refit:
            Xt, _ = _centre(x[train], f64)
            Yt, _ = _centre(y[train], f64)
            W, self.dof_ = _ridge_direct(Xt, Yt, lam, G=G, C=C)
            return W, my - mx @ W
        if primal:  # update the training fold's XᵀX, XᵀY to all rows, centred at the all-row mean
            n_all = train.size + val.size
            dx = Xv.sum(axis=0) / n_all  # all-row mean minus training-fold mean
            dy = Yv.sum(axis=0) / n_all
            G += Xv.T @ Xv
            G -= n_all * np.outer(dx, dx)
            C += Xv.T @ Yv
            C -= n_all * np.outer(dx, dy)
            W, self.dof_ = _ridge_direct(x[:0], y[:0], lam, G=G, C=C)
            return W, (my + dy) - (mx + dx) @ W
        del Xv, Yv
        Xa, mxa = _centre(x, f64)
        Ya, mya = _centre(y, f64)
        W, self.dof_ = _ridge_direct(Xa, Ya, lam)
        return W, mya - mxa @ W

    def _fit_cv(self, x, y, y_orig, groups, grid, dt):
        f64 = np.dtype(np.float64)
        n, d = x.shape
        folds, k = _group_folds(n, groups, int(self.cv), self.random_state)
        if grid is None:
            scale = float(x.var(axis=0, dtype=f64).sum()) * n / d  # mean eigenvalue of X_cᵀX_c, all rows
            if scale <= 0.0:
                raise MapError("X is constant, so ridge has nothing to fit; check the activations")
            grid = DEFAULT_RELATIVE_ALPHAS * scale
        errs = np.zeros(grid.size)
        ss_val = 0.0
        for f in range(k):
            train, val = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
            errs += _holdout_errors(x, y, train, val, grid, dt)[0]
            yo = y_orig[val].astype(f64, copy=False)
            ss_val += float(np.square(yo - yo.mean(axis=0)).sum())
        best = int(np.flatnonzero(errs <= errs.min())[-1])  # ties → the larger λ
        lam = float(grid[best])
        self.alphas_ = np.asarray(grid, dtype=f64)
        self.alpha_ = lam
        self.holdout_mse_ = errs / (n * y.shape[1])
        self.holdout_r2_ = 1.0 - errs / ss_val if ss_val > 0 else np.full(grid.size, np.nan)
        self.cv_folds_ = folds
        Xa, mxa = _centre(x, f64)
        Ya, mya = _centre(y, f64)
        W, self.dof_ = _ridge_direct(Xa, Ya, lam)
        return W, mya - mxa @ W


class ProcrustesMap(LinearMap):
    """Orthogonal Procrustes ``W = U Vᵀ`` (SVD of ``X_cᵀY_c``); ``scale=True`` adds the LS scale ``scale_``.

    With d_in ≠ d_out, W is semi-orthogonal (orthonormal rows or columns). ``scale_`` is 1.0 when
    ``scale=False``; ``singular_values_`` are those of ``X_cᵀY_c``.
    """

    name = "procrustes"
    _array_attrs = ("singular_values_",)
    _scalar_attrs = ("scale_",)

    def __init__(self, scale: bool = False, *, standardize: Standardize = "none", dtype: DType = "auto") -> None:
        super().__init__(standardize=standardize, dtype=dtype)
        self.scale = scale

    def _check_params(self, x, y):
        super()._check_params(x, y)
        if not isinstance(self.scale, (bool, np.bool_)):
            raise MapError(f"scale must be True or False, got {self.scale!r}")

    def _fit(self, x, y, groups, dt):
        Xc, mx = _centre(x, dt)
        Yc, my = _centre(y, dt)
        R, s = _polar(Xc.T @ Yc)
        self.singular_values_ = s.astype(np.float64)
        self.scale_ = 1.0
        if self.scale:
            # least-squares s for fixed R: tr(RᵀX_cᵀY_c)/‖X_cR‖²_F; ‖X_cR‖_F = ‖X_c‖_F when R has
            # orthonormal rows (d_in ≤ d_out), but with d_in > d_out R projects X_c onto d_out axes.
            xx = _sumsq(Xc) if x.shape[1] <= y.shape[1] else _sumsq(Xc @ R)
            if xx <= 0.0:
                raise MapError("X is constant, so the Procrustes scale is undefined; check the activations")
            self.scale_ = float(s.sum(dtype=np.float64)) / xx
        W = R.astype(np.float64) * self.scale_
        self.dof_ = _stiefel_dof(x.shape[1], y.shape[1]) + (1.0 / y.shape[1] if self.scale else 0.0)
        return W, my - mx @ W


class WhitenedProcrustesMap(LinearMap):
    """Whiten → Procrustes → colour: ``W = Σ_x^{-1/2} R Σ_y^{1/2}`` with shrunk covariances.

    Args:
        shrinkage: α in [0, 1] for ``(1 − α)Σ + α(tr Σ/d)I`` on both sides, or ``"ledoit-wolf"``
            (estimated per side). α > 0 makes singular covariances (n < d, duplicate columns) fine.

    Learned: ``shrinkage_x_``, ``shrinkage_y_`` (the α used per side), ``singular_values_`` (of the
    whitened cross-covariance, the canonical-correlation-like spectrum).
    """

    name = "whiten-procrustes"
    _array_attrs = ("singular_values_",)
    _scalar_attrs = ("shrinkage_x_", "shrinkage_y_")

    def __init__(
        self,
        shrinkage: float | Literal["ledoit-wolf"] = 0.1,
        *,
        standardize: Standardize = "none",
        dtype: DType = "auto",
    ) -> None:
        super().__init__(standardize=standardize, dtype=dtype)
        self.shrinkage = shrinkage

    def _check_params(self, x, y):
        super()._check_params(x, y)
        if self.shrinkage != "ledoit-wolf":
            if isinstance(self.shrinkage, str):
                raise MapError(f"shrinkage must be a number in [0, 1] or 'ledoit-wolf', got {self.shrinkage!r}")
            _check_fraction(self.shrinkage, "shrinkage")

    def _side(self, Xc: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Eigenvectors Q and the shrunk eigenvalues' -1/2 and +1/2 powers of one side's covariance."""
        n, d = Xc.shape
        G = Xc.T @ Xc
        alpha = _ledoit_wolf(Xc, G) if self.shrinkage == "ledoit-wolf" else float(self.shrinkage)
        e, Q = sla.eigh(G, driver="evd", overwrite_a=True, check_finite=False)
        e = np.maximum(e.astype(np.float64), 0.0) / n
        mu = float(e.sum()) / d
        if mu <= 0.0:
            raise MapError(f"{which} is constant, so its covariance cannot be whitened; check the activations")
        shrunk = (1.0 - alpha) * e + alpha * mu
        eps = np.finfo(Xc.dtype).eps
        if shrunk.min() <= shrunk.max() * eps * math.sqrt(d):
            rank = int((e > e.max() * d * eps).sum())
            raise MapError(
                f"the shrunk covariance of {which} is numerically singular in {Xc.dtype} (rank {rank} of {d} "
                f"before shrinkage {alpha:g}); use a larger shrinkage, 'ledoit-wolf', or dtype='float64'"
            )
        return Q, shrunk**-0.5, shrunk**0.5, alpha

    def _fit(self, x, y, groups, dt):
        Xc, mx = _centre(x, dt)
        Yc, my = _centre(y, dt)
        M = Xc.T @ Yc
        Qx, ix, _, ax = self._side(Xc, "X")
        Qy, iy, sy, ay = self._side(Yc, "Y")
        del Xc, Yc
        # SVD of Σx^{-1/2} M Σy^{-1/2} = Qx [Dx^{-1/2} (QxᵀMQy) Dy^{-1/2}] Qyᵀ; only the bracket is factorised.
        N = Qx.T @ M @ Qy
        N *= ix[:, None].astype(dt)
        N *= iy[None, :].astype(dt)
        R, s = _polar(N)
        R *= ix[:, None].astype(dt)
        R *= sy[None, :].astype(dt)
        W = (Qx @ R @ Qy.T).astype(np.float64)
        self.shrinkage_x_, self.shrinkage_y_ = float(ax), float(ay)
        self.singular_values_ = s.astype(np.float64) / x.shape[0]
        self.dof_ = _stiefel_dof(x.shape[1], y.shape[1])
        return W, my - mx @ W


class PCAProcrustesMap(LinearMap):
    """Project both sides on their top-q principal axes, Procrustes there, map back: ``W = P_x R P_yᵀ``.

    Learned: ``components_x_`` (d_in × q) and ``components_y_`` (d_out × q) principal axes (columns,
    by decreasing variance), ``rotation_`` (q × q), ``explained_variance_ratio_x_`` and ``_y_`` (the
    fraction of each side's variance in its q axes).
    """

    name = "pca-procrustes"
    _array_attrs = ("components_x_", "components_y_", "rotation_")
    _scalar_attrs = ("explained_variance_ratio_x_", "explained_variance_ratio_y_")

    def __init__(self, q: int = 64, *, standardize: Standardize = "none", dtype: DType = "auto") -> None:
        super().__init__(standardize=standardize, dtype=dtype)
        self.q = q

    def _check_params(self, x, y):
        super()._check_params(x, y)
        q = _check_int(self.q, "q")
        if q > min(x.shape[1], y.shape[1]):
            raise MapError(f"q = {q} exceeds the smaller width min(d_in, d_out) = {min(x.shape[1], y.shape[1])}")

    def _fit(self, x, y, groups, dt):
        q = int(self.q)
        Xc, mx = _centre(x, dt)
        Yc, my = _centre(y, dt)
        ex, Px = _eigh_desc(Xc.T @ Xc, top=q)
        ey, Py = _eigh_desc(Yc.T @ Yc, top=q)
        tiny = np.finfo(np.float64).tiny
        self.explained_variance_ratio_x_ = float(np.clip(ex, 0, None).sum(dtype=np.float64) / max(_sumsq(Xc), tiny))
        self.explained_variance_ratio_y_ = float(np.clip(ey, 0, None).sum(dtype=np.float64) / max(_sumsq(Yc), tiny))
        R, _ = _polar((Xc @ Px).T @ (Yc @ Py))
        self.components_x_ = Px.astype(np.float64)
        self.components_y_ = Py.astype(np.float64)
        self.rotation_ = R.astype(np.float64)
        W = self.components_x_ @ self.rotation_ @ self.components_y_.T
        self.dof_ = q * (q - 1) / 2 / y.shape[1]
        return W, my - mx @ W


class LogitSubspaceMap(LinearMap):
    """Move only the component of x in the tuned unembedding's top-q left singular subspace.

    Args:
        W_U: the tuned model's unembedding, shape (d_model, d_vocab) (TransformerLens ``W_U``).
        q: subspace dimension.
        solver: ``"ridge"`` (a general q × q map, λ chosen on a hold-out fold as in
            :class:`RidgeMap`) or ``"procrustes"`` (a rotation within the subspace).
        center_unembed: remove W_U's mean over the vocabulary first (softmax ignores it).
        alphas, holdout, random_state: passed to the inner ridge.

        basis: instead of W_U, a precomputed orthonormal basis (d_model × ≥ q; its first q columns
            are used), e.g. :func:`logit_basis` or another fitted map's ``basis_``. Forming
            ``W_UW_Uᵀ`` costs 2·d_model²·d_vocab FLOPs (about 15–30 s for Llama-3-8B on two CPU
            cores), so compute the basis once and pass it for every layer.

    ``W_ = I + Q(R − I)Qᵀ``, ``b_ = cQᵀ`` with ``Q = basis_`` (d_model × q, orthonormal columns) and
    ``(R, c)`` = ``subspace_map_``, ``subspace_offset_`` the inner fit from ``xQ`` to ``yQ``;
    vectors orthogonal to span(Q) pass through unchanged. ``basis_singular_values_`` are W_U's top-q
    singular values (None when a basis was passed). A loaded map has ``W_U=None`` and
    ``basis=None``; refit it with either.
    """

    name = "logit-subspace"
    _square = True
    _nonjson_params = ("W_U", "basis")
    _array_attrs = ("basis_", "basis_singular_values_", "subspace_map_", "subspace_offset_")
    _scalar_attrs = ("alpha_",)

    def __init__(
        self,
        W_U: Float[np.ndarray, "d_model d_vocab"] | Float[torch.Tensor, "d_model d_vocab"] | None = None,
        q: int = 64,
        *,
        solver: Literal["ridge", "procrustes"] = "ridge",
        center_unembed: bool = True,
        alphas: Alphas = None,
        prior: Literal["zero", "identity"] = "zero",
        cv: int | None = None,
        holdout: float | int = 0.2,
        random_state: int | None = 0,
        basis: Float[np.ndarray, "d_model q"] | Float[torch.Tensor, "d_model q"] | None = None,
        standardize: Standardize = "none",
        dtype: DType = "auto",
    ) -> None:
        super().__init__(standardize=standardize, dtype=dtype)
        self.W_U = W_U
        self.basis = basis
        self.q = q
        self.solver = solver
        self.center_unembed = center_unembed
        self.alphas = alphas
        self.prior = prior
        self.cv = cv
        self.holdout = holdout
        self.random_state = random_state

    def _check_params(self, x, y):
        super()._check_params(x, y)
        d = x.shape[1]
        q = _check_int(self.q, "q")
        if self.basis is not None:
            _check_basis(self.basis, d, q)
        else:
            _check_unembed(self.W_U, d, q)
        _check_choice(self.solver, "solver", ("ridge", "procrustes"))
        if self.solver == "ridge":
            _check_alphas(self.alphas)
            _check_holdout(self.holdout)
            _check_choice(self.prior, "prior", ("zero", "identity"))
            if self.cv is not None:
                _check_int(self.cv, "cv", low=2)

    def _fit(self, x, y, groups, dt):
        q = int(self.q)
        if self.basis is not None:
            Q, sv = _check_basis(self.basis, x.shape[1], q), None
        else:
            Q, sv = _logit_basis(self.W_U, q, bool(self.center_unembed), dt)
        zx, zy = x @ Q, y @ Q
        if self.solver == "ridge":
            inner: LinearMap = RidgeMap(self.alphas, prior=self.prior, cv=self.cv, holdout=self.holdout,
                                        random_state=self.random_state, dtype="float64")
        else:
            inner = ProcrustesMap(dtype="float64")
        R, c = inner._fit(zx, zy, groups, np.dtype(np.float64))
        R = np.asarray(R, dtype=np.float64)
        self.alpha_ = getattr(inner, "alpha_", None)
        self.dof_ = float(inner.dof_) * q / x.shape[1]  # q of the d outputs are fitted
        self.basis_, self.basis_singular_values_ = Q, sv
        self.subspace_map_, self.subspace_offset_ = R, np.asarray(c, dtype=np.float64)
        W, b, _ = _subspace_affine(R, self.subspace_offset_, Q)
        return W, b


class LowRankCorrectionMap(LinearMap):
    """``W = I + U_k V_kᵀ``: a rank-k correction of the identity (RQ3).

    Args:
        rank: k ≥ 1, or ``"full"`` (no truncation).
        method: ``"rrr"`` (reduced-rank ridge regression of y − x on x) or ``"pca-procrustes"``
            (Procrustes within the top-k principal subspace of y − x); see the module docstring.
        alphas, holdout, random_state: the ridge λ for ``"rrr"`` (as :class:`RidgeMap`; 0.0 = OLS).

    Learned: ``rank_`` (k used: ≤ the number of axes available, min(n, d); for "full", d (rrr) or
    that number (pca-procrustes)),
    ``U_``, ``V_`` (d × k factors, ``V_`` orthonormal; for rrr "full" ``U_ = B̂`` and ``V_ = I``),
    ``alpha_`` (rrr), ``component_values_`` (per-sample RMS size of the fitted correction ``X_cB̂``
    (rrr) or of ``y − x`` (pca-procrustes) along each axis, decreasing: the spectrum to choose k
    from; None for rrr "full", which skips the decomposition).
    """

    name = "lowrank"
    _square = True
    _array_attrs = ("U_", "V_", "component_values_")
    _scalar_attrs = ("rank_", "alpha_")

    def __init__(
        self,
        rank: int | Literal["full"] = 8,
        *,
        method: Literal["rrr", "pca-procrustes"] = "rrr",
        alphas: Alphas = None,
        cv: int | None = None,
        holdout: float | int = 0.2,
        random_state: int | None = 0,
        standardize: Standardize = "none",
        dtype: DType = "auto",
    ) -> None:
        super().__init__(standardize=standardize, dtype=dtype)
        self.rank = rank
        self.method = method
        self.alphas = alphas
        self.cv = cv
        self.holdout = holdout
        self.random_state = random_state

    def _check_params(self, x, y):
        super()._check_params(x, y)
        if self.rank != "full":
            _check_int(self.rank, "rank")
        _check_choice(self.method, "method", ("rrr", "pca-procrustes"))
        _check_alphas(self.alphas)
        _check_holdout(self.holdout)
        if self.cv is not None:
            _check_int(self.cv, "cv", low=2)

    def _components(
        self, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, dt: np.dtype, need_basis: bool = True
    ) -> dict[str, Any]:
        """Everything the rank-k maps share: one ridge fit + one eigendecomposition (or one PCA)."""
        n, d = x.shape
        Xc, mx = _centre(x, dt)
        Yc, my = _centre(y, dt)
        D = Yc - Xc
        if self.method == "pca-procrustes":
            if n < d:
                _, s, Vt = _svd(D)
                e, V = s.astype(np.float64) ** 2, np.ascontiguousarray(Vt.T)
            else:
                e, V = _eigh_desc(D.T @ D)
            return {"Xc": Xc, "Yc": Yc, "mx": mx, "my": my, "V": V, "values": np.sqrt(np.maximum(e, 0.0) / n),
                    "alpha": None, "dof": None}
        del D
        ridge = RidgeMap(self.alphas, cv=self.cv, holdout=self.holdout, random_state=self.random_state)
        Bhat, _ = ridge._fit(x, y.astype(np.float64) - x, groups, dt)  # float64 solve
        comp = {"Bhat": np.asarray(Bhat, dtype=np.float64), "mx": mx, "my": my, "V": None, "values": None,
                "alpha": ridge.alpha_, "dof": ridge.dof_}
        if need_basis:  # right singular vectors of the fitted correction F = X_c B̂
            F = Xc @ Bhat.astype(dt, copy=False)
            del Xc, Yc
            if n < d:
                _, s, Vt = _svd(F)
                e, V = s.astype(np.float64) ** 2, np.ascontiguousarray(Vt.T)
            else:
                e, V = _eigh_desc(F.T @ F)
            comp["V"], comp["values"] = V, np.sqrt(np.maximum(e, 0.0) / n)
        return comp

    def _apply(self, comp: dict[str, Any], rank: int | str) -> tuple[np.ndarray, np.ndarray]:
        V = comp["V"]
        mx, my = comp["mx"], comp["my"]
        d = mx.shape[0]
        n_comp = d if V is None else V.shape[1]
        if rank == "full":
            k = d if self.method == "rrr" else n_comp
        else:
            k = min(int(rank), n_comp)
        values = comp["values"]
        self.component_values_ = None if values is None else values.astype(np.float64)
        self.alpha_ = comp["alpha"]
        self.rank_ = int(k)
        # rrr: the ridge fit B̂ that the rank-k map truncates; pca-procrustes: the k × k rotation's parameters
        self.dof_ = comp["dof"] if self.method == "rrr" else k * (k - 1) / 2 / d
        if self.method == "pca-procrustes":
            Vk = V[:, :k]
            R, _ = _polar((comp["Xc"] @ Vk).T @ (comp["Yc"] @ Vk))
            Vk64, R64 = Vk.astype(np.float64), R.astype(np.float64)
            c = my @ Vk64 - mx @ Vk64 @ R64
            W, b, U = _subspace_affine(R64, c, Vk64)
            self.U_, self.V_ = U, Vk64
            return W, b
        Bhat = comp["Bhat"]
        if rank == "full":
            U, Vk = Bhat, np.eye(d)
            Bk = Bhat
        else:
            Vk = V[:, :k].astype(np.float64)
            U = Bhat @ Vk
            Bk = U @ Vk.T
        self.U_, self.V_ = U, Vk
        W = Bk.copy()
        W.flat[:: d + 1] += 1.0
        # D̂ = (x − x̄)B_k + mean(D): ŷ = x + D̂
        b = (my - mx) - mx @ Bk
        return W, b

    def _fit(self, x, y, groups, dt):
        need_basis = not (self.method == "rrr" and self.rank == "full")
        return self._apply(self._components(x, y, groups, dt, need_basis), self.rank)


# --------------------------------------------------------------------------------------------
# registry, factory, helpers

_CLASSES: dict[str, type[LinearMap]] = {
    cls.__name__: cls
    for cls in (IdentityMap, MeanShiftMap, RidgeMap, ProcrustesMap, WhitenedProcrustesMap, PCAProcrustesMap,
                LogitSubspaceMap, LowRankCorrectionMap)
}

_FACTORY: dict[str, tuple[type[LinearMap], dict[str, Any]]] = {
    "identity": (IdentityMap, {}),
    "mean-shift": (MeanShiftMap, {}),
    "ridge": (RidgeMap, {"prior": "identity", "cv": 5}),
    "ridge-zero": (RidgeMap, {"prior": "zero", "cv": 5}),
    "procrustes": (ProcrustesMap, {}),
    "procrustes-scaled": (ProcrustesMap, {"scale": True}),
    "whiten-procrustes": (WhitenedProcrustesMap, {"shrinkage": "ledoit-wolf"}),
    "pca-procrustes": (PCAProcrustesMap, {}),
    "logit-subspace": (LogitSubspaceMap, {"prior": "identity", "cv": 5}),
    "lowrank": (LowRankCorrectionMap, {"cv": 5}),
}

MAP_NAMES: tuple[str, ...] = tuple(_FACTORY)
"""Names accepted by :func:`make_map`."""


def make_map(name: str, **kw: Any) -> LinearMap:
    """Build an unfitted estimator by name (``MAP_NAMES``); keyword arguments go to its constructor.

    ``"ridge"`` is ``RidgeMap(prior="identity", cv=5)`` (shrinks toward the identity, λ by 5-fold
    prompt-grouped CV: pass ``groups`` to fit), ``"ridge-zero"`` the same with ``prior="zero"`` (shrinks
    toward 0), ``"procrustes-scaled"`` is ``ProcrustesMap(scale=True)``, ``"whiten-procrustes"`` uses the
    Ledoit–Wolf shrinkage, ``"logit-subspace"`` an identity-prior inner ridge with 5-fold CV and
    ``"lowrank"`` 5-fold CV for its ridge.
    """
    if name not in _FACTORY:
        raise MapError(f"unknown map {name!r}; choose one of {', '.join(MAP_NAMES)}")
    cls, defaults = _FACTORY[name]
    params = {**defaults, **kw}
    valid = set(cls._param_names())
    unknown = sorted(set(params) - valid)
    if unknown:
        raise MapError(f"map {name!r} has no parameter {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    return cls(**params)


def shuffled_pairs_permutation(
    n: int, groups: Groups = None, random_state: int | None = 0
) -> np.ndarray:
    """A permutation π of the rows such that row i is never paired with a row of its own prompt.

    Prompts are put in random order with their rows contiguous, and each row is paired with the
    row ``s`` places further along (cyclically), ``s`` = the largest prompt's row count; so the
    positions of one prompt are paired with those of (at most two) other prompts. Without
    ``groups`` every row is its own prompt (a random cyclic derangement).
    """
    codes, n_groups = factorize_groups(groups, n)
    counts = np.bincount(codes, minlength=n_groups)
    s = int(counts.max())
    if 2 * s > n:
        raise MapError(
            f"one prompt holds {s} of {n} rows, so its rows cannot all be paired with other prompts; add prompts"
        )
    order = np.random.default_rng(random_state).permutation(n_groups)
    rank_of_group = np.empty(n_groups, dtype=np.int64)
    rank_of_group[order] = np.arange(n_groups)
    rows = np.argsort(rank_of_group[codes], kind="stable")  # prompts in random order, rows contiguous
    perm = np.empty(n, dtype=np.int64)
    perm[rows] = rows[(np.arange(n) + s) % n]
    return perm


def fit_summary(linear_map: LinearMap) -> dict[str, Any]:
    """How much data a fitted map saw and how many coefficients it used: ``rows`` (fit rows), ``prompts``
    (distinct groups; rows when none were passed), ``d_in``, ``d_out``, ``dof`` (effective degrees of
    freedom per output column, ``dof_``), ``lambda`` (the ridge λ chosen, None for unregularised maps)
    and ``underdetermined`` (rows < d_in: a full linear map cannot be pinned down by the data).
    """
    linear_map._check_fitted()
    rows = getattr(linear_map, "n_samples_", None)
    dof = getattr(linear_map, "dof_", None)
    lam = getattr(linear_map, "alpha_", None)
    return {"rows": rows, "prompts": getattr(linear_map, "n_groups_", None), "d_in": int(linear_map.n_features_in_),
            "d_out": int(linear_map.n_features_out_), "dof": None if dof is None else float(dof),
            "lambda": None if lam is None else float(lam),
            "underdetermined": None if rows is None else bool(rows < linear_map.n_features_in_)}


def fit_shuffled(
    estimator: LinearMap | Callable[[], LinearMap],
    X: ArrayX,
    Y: ArrayY,
    groups: Groups = None,
    random_state: int | None = 0,
) -> LinearMap:
    """The shuffled-pairs null: fit a fresh estimator on ``(X, Y[π])`` (π from :func:`shuffled_pairs_permutation`).

    ``estimator`` is an estimator (cloned, never modified) or a zero-argument factory. The fitted
    copy has ``shuffle_permutation_`` set. Score it on held-out *correctly paired* data: its R²
    should be near zero or negative.
    """
    est = estimator.clone() if isinstance(estimator, LinearMap) else estimator()
    if not isinstance(est, LinearMap):
        raise MapError(f"estimator must be a LinearMap or a factory returning one, got {type(est).__name__}")
    y = _to_numpy(Y, "Y")
    perm = shuffled_pairs_permutation(y.shape[0], groups, random_state)
    est.fit(X, y[perm], groups)
    est.shuffle_permutation_ = perm
    return est


def fit_lowrank_path(
    X: ArrayX,
    Y: ArrayY,
    ranks: Sequence[int | str],
    groups: Groups = None,
    **kw: Any,
) -> dict[int | str, LowRankCorrectionMap]:
    """Fit :class:`LowRankCorrectionMap` for every rank in ``ranks`` from one shared decomposition.

    ``kw`` are the constructor arguments (method, alphas, …). Same results as fitting each rank
    separately, at the cost of one fit.
    """
    try:
        template = LowRankCorrectionMap(**{**kw, "rank": "full"})
    except TypeError as err:
        raise MapError(f"fit_lowrank_path got an unknown argument ({err})") from None
    for r in ranks:
        if r != "full":
            _check_int(r, "rank")
    x, y, codes, dt = template._prepare(X, Y, groups)
    comp = template._components(x, y, codes, dt)
    out: dict[int | str, LowRankCorrectionMap] = {}
    for r in ranks:
        m = LowRankCorrectionMap(**{**kw, "rank": r})
        m.n_features_in_, m.n_features_out_ = template.n_features_in_, template.n_features_out_
        m.x_mean_, m.x_scale_ = template.x_mean_, template.x_scale_
        m.y_mean_, m.y_scale_ = template.y_mean_, template.y_scale_
        m.n_samples_, m.n_groups_ = template.n_samples_, template.n_groups_
        W, b = m._apply(comp, r)
        m._finish(W, b)
        out[r] = m
    return out


def map_diagnostics(linear_map: LinearMap, X: ArrayX, Y: ArrayY) -> dict[str, float | int]:
    """R², MSE, linear CKA(mapped, Y) and mean row cosine of ``transform(X)`` against Y (METHODS RQ2)."""
    from mdiff.cka import linear_cka

    linear_map._check_fitted()
    x, y = _validate_pair(X, Y, "map_diagnostics")
    pred = linear_map.transform(x.astype(np.float64, copy=False))
    y64 = y.astype(np.float64, copy=False)
    num = np.einsum("ij,ij->i", pred, y64)
    den = np.linalg.norm(pred, axis=1) * np.linalg.norm(y64, axis=1)
    cos = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return {
        "r2": _r2(y64, pred),
        "mse": float(np.square(y64 - pred).mean()),
        "cka": float(linear_cka(pred, y64)),
        "mean_cosine": float(cos.mean()),
        "n": int(x.shape[0]),
    }


# --------------------------------------------------------------------------------------------
# save / load (safetensors + JSON, never pickle)


def _paths(path_prefix: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = Path(path_prefix)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_map(linear_map: LinearMap, path_prefix: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a fitted map to ``<prefix>.safetensors`` (arrays) and ``<prefix>.json`` (everything else).

    Returns the two paths. Each file is written to a temporary name and renamed into place.
    """
    from safetensors.numpy import save as st_save

    if not isinstance(linear_map, LinearMap):
        raise MapError(f"save_map needs an mdiff.maps estimator, got {type(linear_map).__name__}")
    linear_map._check_fitted()
    st_path, json_path = _paths(path_prefix)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    names = ("W_", "b_", "x_mean_", "x_scale_", "y_mean_", "y_scale_", *linear_map._array_attrs)
    arrays = {}
    for key in names:
        value = getattr(linear_map, key, None)
        if value is not None:
            arrays[key] = np.ascontiguousarray(value)
    doc = linear_map.to_dict()
    doc.update({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mdiff_version": _package_version(),
        "arrays": sorted(arrays),
        "weights_file": st_path.name,
    })
    _atomic_write(st_path, st_save(arrays))
    _atomic_write(json_path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    return st_path, json_path


def load_map(path_prefix: str | os.PathLike[str]) -> LinearMap:
    """Rebuild a map saved by :func:`save_map` (no pickle: JSON + safetensors only)."""
    from safetensors.numpy import load_file

    st_path, json_path = _paths(path_prefix)
    for p in (json_path, st_path):
        if not p.is_file():
            raise MapError(f"{p} does not exist; pass the prefix given to save_map (without extension)")
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise MapError(f"{json_path} is not valid JSON ({err}); re-save the map") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MapError(f"{json_path} is not an mdiff map file (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("format_version") != FORMAT_VERSION:
        raise MapError(f"{json_path} has map format version {doc.get('format_version')}; this mdiff reads {FORMAT_VERSION}")
    cls = _CLASSES.get(doc.get("class"))
    if cls is None:
        raise MapError(f"{json_path} holds unknown map class {doc.get('class')!r}; known: {', '.join(_CLASSES)}")
    try:
        est = cls(**doc.get("params", {}))
    except TypeError as err:
        raise MapError(f"{json_path} has parameters {cls.__name__} does not accept ({err})") from None
    try:
        arrays = load_file(str(st_path))
    except Exception as err:  # safetensors raises its own error types
        raise MapError(f"{st_path} is not a readable safetensors file ({err}); re-save the map") from None
    missing = sorted(set(doc.get("arrays", [])) - set(arrays))
    if missing or "W_" not in arrays or "b_" not in arrays:
        raise MapError(f"{st_path} lacks arrays {', '.join(missing or ['W_', 'b_'])}; re-save the map")
    for key in ("x_mean_", "x_scale_", "y_mean_", "y_scale_", *cls._array_attrs):
        setattr(est, key, None)
    for key, value in arrays.items():
        setattr(est, key, value)
    for key, value in doc.get("attributes", {}).items():
        setattr(est, key, value)
    W, b = est.W_, est.b_
    if W.ndim != 2 or b.shape != (W.shape[1],) or W.shape != (est.n_features_in_, est.n_features_out_):
        raise MapError(f"{st_path} has W_ {W.shape} and b_ {b.shape}, inconsistent with {json_path}; re-save the map")
    return est


def _package_version() -> str | None:
    try:
        return _md.version("mdiff")
    except _md.PackageNotFoundError:
        return None
