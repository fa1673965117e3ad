"""Tests for mdiff.maps against scipy/sklearn, closed forms written here, and planted maps."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from scipy.linalg import orthogonal_procrustes
from sklearn.covariance import ledoit_wolf_shrinkage
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score

from mdiff.errors import MdiffError
from mdiff.maps import (
    MAP_NAMES,
    IdentityMap,
    LinearMap,
    LogitSubspaceMap,
    LowRankCorrectionMap,
    MeanShiftMap,
    PCAProcrustesMap,
    ProcrustesMap,
    RidgeMap,
    WhitenedProcrustesMap,
    fit_lowrank_path,
    fit_shuffled,
    fit_summary,
    load_map,
    logit_basis,
    make_map,
    map_diagnostics,
    save_map,
    shuffled_pairs_permutation,
)

# With runtime shape checking on (pytest --jaxtyping-packages=mdiff,beartype.beartype) the checker
# rejects some bad parameters before mdiff's own checks run; accept its error then, without the message.
_TYPE_CHECKED = hasattr(LinearMap.fit, "__wrapped__")


def _bad(match: str):
    if _TYPE_CHECKED:
        from jaxtyping import TypeCheckError

        return pytest.raises((MdiffError, TypeCheckError))
    return pytest.raises(MdiffError, match=match)


# ---------------------------------------------------------------------------------------------
# data and references


def rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def activations(n: int, d: int, rng: np.random.Generator, mean: float = 5.0) -> np.ndarray:
    """Residual-stream-like rows: decaying spectrum, a common offset, one outlier dimension."""
    x = rng.standard_normal((n, d)) * (2.0 / np.sqrt(1.0 + np.arange(d))) + mean * rng.standard_normal(d)
    x[:, 0] += 20.0
    return x


def centred(a: np.ndarray) -> np.ndarray:
    return a - a.mean(axis=0)


def ref_ridge(X: np.ndarray, Y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge with intercept: W = (XcᵀXc + λI)⁻¹XcᵀYc, b = ȳ − x̄W (np.linalg.solve)."""
    Xc, Yc = centred(X), centred(Y)
    W = np.linalg.solve(Xc.T @ Xc + lam * np.eye(X.shape[1]), Xc.T @ Yc)
    return W, Y.mean(0) - X.mean(0) @ W


def r2(Y: np.ndarray, P: np.ndarray) -> float:
    return float(1.0 - ((Y - P) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum())


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def fitted_examples(rng: np.random.Generator) -> dict[str, LinearMap]:
    """One fitted estimator per make_map name (small, with non-trivial options)."""
    n, d = 120, 12
    X = activations(n, d, rng)
    Y = X @ rotation(d, rng) + 0.1 * rng.standard_normal((n, d)) + 1.0
    groups = np.repeat(np.arange(30), 4)
    kw = {
        "ridge": {"standardize": "both"},
        "whiten-procrustes": {"shrinkage": "ledoit-wolf"},
        "pca-procrustes": {"q": 4, "standardize": "x"},
        "logit-subspace": {"W_U": rng.standard_normal((d, 40)), "q": 3},
        "lowrank": {"rank": 2},
    }
    return {name: make_map(name, **kw.get(name, {})).fit(X, Y, groups) for name in MAP_NAMES} | {
        "lowrank-pca": LowRankCorrectionMap(rank=3, method="pca-procrustes").fit(X, Y),
        "logit-procrustes": LogitSubspaceMap(rng.standard_normal((d, 40)), q=2, solver="procrustes").fit(X, Y),
    }


# ---------------------------------------------------------------------------------------------
# Procrustes


def test_procrustes_equals_scipy(rng):
    X = activations(200, 16, rng)
    Y = activations(200, 16, rng) + 0.5 * X
    m = ProcrustesMap().fit(X, Y)
    R, scale = orthogonal_procrustes(centred(X), centred(Y))
    np.testing.assert_allclose(m.W_, R, atol=1e-8)
    np.testing.assert_allclose(m.b_, Y.mean(0) - X.mean(0) @ R, atol=1e-8)
    np.testing.assert_allclose(m.singular_values_.sum(), scale, rtol=1e-10)
    assert m.scale_ == 1.0
    np.testing.assert_allclose(m.W_ @ m.W_.T, np.eye(16), atol=1e-10)


def test_procrustes_torch_svd_path_equals_scipy(rng):
    d = 520  # ≥ the size where the SVD goes through torch
    X = rng.standard_normal((600, d))
    Y = X @ rotation(d, rng) + rng.standard_normal((600, d))
    m = ProcrustesMap().fit(X, Y)
    np.testing.assert_allclose(m.W_, orthogonal_procrustes(centred(X), centred(Y))[0], atol=1e-8)


def test_procrustes_recovers_planted_rotation_and_offset(rng):
    n, d = 3000, 16
    Q = rotation(d, rng)
    t = rng.standard_normal(d) * 3
    X = activations(n, d, rng)
    Y = X @ Q + t + 0.02 * rng.standard_normal((n, d))
    m = ProcrustesMap().fit(X, Y)
    assert np.abs(m.W_ - Q).max() < 0.02
    assert np.abs(m.b_ - t).max() < 0.05
    X_test = activations(500, d, np.random.default_rng(7))
    assert m.score(X_test, X_test @ Q + t) > 0.999


def test_procrustes_rectangular_is_semi_orthogonal(rng):
    X = rng.standard_normal((100, 10))
    Y = X[:, :6] @ rotation(6, rng) + 0.1 * rng.standard_normal((100, 6))
    m = ProcrustesMap().fit(X, Y)
    assert m.W_.shape == (10, 6)
    np.testing.assert_allclose(m.W_.T @ m.W_, np.eye(6), atol=1e-10)


def test_scaled_procrustes_recovers_scale(rng):
    n, d = 2000, 12
    Q = rotation(d, rng)
    X = activations(n, d, rng)
    Y = 2.5 * X @ Q - 1.0 + 0.01 * rng.standard_normal((n, d))
    m = make_map("procrustes-scaled").fit(X, Y)
    assert m.scale_ == pytest.approx(2.5, rel=1e-3)
    np.testing.assert_allclose(m.W_ / m.scale_, Q, atol=5e-3)
    # the least-squares scale: Σσ / ‖Xc‖²
    _, s_sum = orthogonal_procrustes(centred(X), centred(Y))
    assert m.scale_ == pytest.approx(s_sum / (centred(X) ** 2).sum(), rel=1e-12)


def test_float32_auto_precision_close_to_float64(rng):
    n, d = 2100, 512  # ≥ 2²⁰ elements per input, so "auto" computes in float32
    X = rng.standard_normal((n, d)).astype(np.float32) + 5
    Y = (X @ rotation(d, rng)).astype(np.float32) + rng.standard_normal((n, d)).astype(np.float32)
    m32 = ProcrustesMap().fit(X, Y)
    m64 = ProcrustesMap(dtype="float64").fit(X, Y)
    assert m32.W_.dtype == np.float64
    assert np.abs(m32.W_ - m64.W_).max() < 1e-3
    out = m32.transform(X[:5])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, X[:5].astype(np.float64) @ m32.W_ + m32.b_, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# ridge


@pytest.mark.parametrize("n,d", [(200, 10), (30, 80)])  # n ≥ d (primal) and n < d (dual)
def test_ridge_fixed_lambda_equals_closed_form_and_sklearn(rng, n, d):
    X = activations(n, d, rng)
    Y = X @ rng.standard_normal((d, 7)) + rng.standard_normal((n, 7))
    lam = 3.7
    m = RidgeMap(alphas=lam).fit(X, Y)
    W, b = ref_ridge(X, Y, lam)
    np.testing.assert_allclose(m.W_, W, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(m.b_, b, rtol=1e-8, atol=1e-8)
    sk = Ridge(alpha=lam, solver="svd").fit(X, Y)
    np.testing.assert_allclose(m.W_, sk.coef_.T, atol=1e-6)
    np.testing.assert_allclose(m.b_, sk.intercept_, atol=1e-6)
    assert m.alpha_ == lam and m.holdout_mse_ is None


def test_ridge_lambda_zero_is_min_norm_least_squares(rng):
    X = rng.standard_normal((20, 50))
    Y = rng.standard_normal((20, 3))
    m = RidgeMap(alphas=0.0).fit(X, Y)
    np.testing.assert_allclose(m.W_, np.linalg.pinv(centred(X)) @ centred(Y), atol=1e-9)
    np.testing.assert_allclose(m.transform(X), Y, atol=1e-9)  # interpolates when n < d


@pytest.mark.parametrize(
    "n,d,refit",
    [(300, 12, True), (300, 12, False), (60, 100, True), (60, 100, False), (110, 100, True)],
)  # eigh of XᵀX; thin SVD of X (n < d) with a dual refit; SVD with a primal refit (n_train < d ≤ n)
def test_ridge_grid_matches_brute_force_holdout(rng, n, d, refit):
    X = activations(n, d, rng)
    Y = X @ rng.standard_normal((d, 5)) * 0.3 + 2.0 * rng.standard_normal((n, 5))
    m = RidgeMap(refit=refit, random_state=3).fit(X, Y)
    val = m.holdout_rows_
    train = np.setdiff1d(np.arange(n), val)
    assert val.size == round(0.2 * n) and m.alphas_.size == 20
    brute = []
    for lam in m.alphas_:
        W, b = ref_ridge(X[train], Y[train], lam)
        brute.append(((Y[val] - X[val] @ W - b) ** 2).mean())
    brute = np.array(brute)
    np.testing.assert_allclose(m.holdout_mse_, brute, rtol=1e-7)
    assert m.alpha_ == m.alphas_[np.argmin(brute)]
    rows = np.arange(n) if refit else train
    W, b = ref_ridge(X[rows], Y[rows], m.alpha_)
    np.testing.assert_allclose(m.W_, W, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(m.b_, b, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(m.holdout_r2_, 1 - brute * val.size * 5 / ((Y[val] - Y[val].mean(0)) ** 2).sum())


def test_ridge_float32_selection_float64_solve(rng):
    n, d = 1100, 960  # float32 inputs with ≥ 2²⁰ elements: λ chosen with a float32 eigh
    X = activations(n, d, rng).astype(np.float32)
    Y = (X @ (np.eye(d) + 0.05 * rng.standard_normal((d, d)))).astype(np.float32)
    Y += rng.standard_normal((n, d)).astype(np.float32)
    mixed = RidgeMap().fit(X, Y)
    full = RidgeMap(dtype="float64").fit(X, Y)
    assert mixed.alpha_ == full.alpha_
    np.testing.assert_allclose(mixed.holdout_mse_, full.holdout_mse_, rtol=1e-3)
    np.testing.assert_allclose(mixed.W_, full.W_, rtol=1e-9, atol=1e-12)  # both float64 solves
    W, _ = ref_ridge(X.astype(np.float64), Y.astype(np.float64), mixed.alpha_)
    np.testing.assert_allclose(mixed.W_, W, atol=1e-9)


def test_ridge_explicit_grid_and_groups(rng):
    X = rng.standard_normal((100, 8))
    Y = X @ rng.standard_normal((8, 4)) + rng.standard_normal((100, 4))
    groups = np.repeat(np.arange(25), 4)
    m = RidgeMap(alphas=[0.1, 1.0, 10.0], holdout=5).fit(X, Y, groups=groups)
    np.testing.assert_array_equal(m.alphas_, [0.1, 1.0, 10.0])
    held = np.unique(groups[m.holdout_rows_])
    assert held.size == 5 and np.isin(groups, held).sum() == m.holdout_rows_.size  # whole prompts
    assert m.alpha_ in (0.1, 1.0, 10.0)


# ---------------------------------------------------------------------------------------------
# identity prior, prompt-grouped cross-validation, degrees of freedom


@pytest.mark.parametrize("n,d", [(200, 10), (30, 80)])  # primal and dual (n < d)
def test_ridge_identity_prior_equals_ridge_of_the_correction(rng, n, d):
    X = activations(n, d, rng)
    Y = X + X @ (0.1 * rng.standard_normal((d, d))) + 0.3 * rng.standard_normal((n, d)) + 2.0
    lam = 3.7
    m = RidgeMap(alphas=lam, prior="identity").fit(X, Y)
    Xc, Dc = centred(X), centred(Y - X)  # independent reference: ‖Y_c − X_cW‖² + λ‖W − I‖²
    B = np.linalg.solve(Xc.T @ Xc + lam * np.eye(d), Xc.T @ Dc)
    np.testing.assert_allclose(m.W_, np.eye(d) + B, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(m.b_, Y.mean(0) - X.mean(0) @ (np.eye(d) + B), rtol=1e-8, atol=1e-7)
    sk = Ridge(alpha=lam, solver="svd").fit(X, Y - X)
    np.testing.assert_allclose(m.W_ - np.eye(d), sk.coef_.T, atol=1e-6)
    # the objective is minimised: a small move of W in any direction increases it
    def obj(W):
        return ((Xc @ W - centred(Y)) ** 2).sum() + lam * ((W - np.eye(d)) ** 2).sum()
    E = rng.standard_normal((d, d)) * 1e-4
    assert obj(m.W_) < obj(m.W_ + E) and obj(m.W_) < obj(m.W_ - E)


def test_ridge_identity_prior_large_lambda_is_the_mean_shift_and_zero_prior_is_not(rng):
    X = activations(50, 8, rng)
    Y = X @ rotation(8, rng) + 1.5
    ident = RidgeMap(alphas=1e12, prior="identity").fit(X, Y)
    ms = MeanShiftMap().fit(X, Y)
    np.testing.assert_allclose(ident.W_, ms.W_, atol=1e-8)
    np.testing.assert_allclose(ident.b_, ms.b_, atol=1e-6)
    zero = RidgeMap(alphas=1e12, prior="zero").fit(X, Y)
    np.testing.assert_allclose(zero.W_, 0.0, atol=1e-8)  # shrinks to the constant ȳ instead
    np.testing.assert_allclose(zero.transform(X), np.broadcast_to(Y.mean(0), Y.shape), atol=1e-6)


def test_ridge_matrix_prior_and_its_errors(rng):
    X = activations(40, 6, rng)
    W0 = rng.standard_normal((6, 9))
    Y = X @ W0 + 0.01 * rng.standard_normal((40, 9))
    m = RidgeMap(alphas=1e12, prior=W0).fit(X, Y)  # λ → ∞: the prior itself, with the best intercept
    np.testing.assert_allclose(m.W_, W0, atol=1e-8)
    lam = 0.5
    m = RidgeMap(alphas=lam, prior=W0).fit(X, Y)
    Xc = centred(X)
    B = np.linalg.solve(Xc.T @ Xc + lam * np.eye(6), Xc.T @ centred(Y - X @ W0))
    np.testing.assert_allclose(m.W_, W0 + B, atol=1e-9)
    with _bad("needs d_in == d_out"):
        RidgeMap(prior="identity").fit(X, Y)
    with _bad("prior matrix must have shape"):
        RidgeMap(prior=W0.T).fit(X, Y)
    with _bad("prior must be one of"):
        RidgeMap(prior="ones").fit(X, X)


@pytest.mark.parametrize("n,d", [(240, 10), (60, 100)])
def test_ridge_prompt_grouped_cv_matches_brute_force(rng, n, d):
    X = activations(n, d, rng)
    Y = X + X @ (0.05 * rng.standard_normal((d, d))) + rng.standard_normal((n, d))
    groups = np.repeat(np.arange(n // 4), 4)  # 4 rows (positions) per prompt
    m = RidgeMap(prior="identity", cv=5, random_state=7).fit(X, Y, groups)
    folds = m.cv_folds_
    assert m.holdout_rows_ is None and sorted(np.unique(folds)) == [0, 1, 2, 3, 4]
    for g in np.unique(groups):  # the rows of one prompt are never split across folds
        assert np.unique(folds[groups == g]).size == 1
    brute = np.zeros(m.alphas_.size)
    for f in range(5):
        tr, va = folds != f, folds == f
        for j, lam in enumerate(m.alphas_):
            W, b = ref_ridge(X[tr], (Y - X)[tr], lam)
            brute[j] += ((Y[va] - X[va] - X[va] @ W - b) ** 2).sum()
    np.testing.assert_allclose(m.holdout_mse_, brute / Y.size, rtol=1e-6)
    assert m.alpha_ == m.alphas_[np.argmin(brute)]
    W, b = ref_ridge(X, Y - X, m.alpha_)  # refit on all rows
    np.testing.assert_allclose(m.W_, np.eye(d) + W, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(m.b_, b, rtol=1e-7, atol=1e-7)
    ss = sum(((Y[folds == f] - Y[folds == f].mean(0)) ** 2).sum() for f in range(5))
    np.testing.assert_allclose(m.holdout_r2_, 1 - brute / ss, rtol=1e-6)  # R² of y, not of y − x


def test_ridge_cv_needs_two_prompts_and_caps_folds(rng):
    X = activations(12, 4, rng)
    with _bad("at least 2 prompts"):
        RidgeMap(cv=5).fit(X, X, groups=np.zeros(12))
    m = RidgeMap(cv=5).fit(X, X + 1.0, groups=np.repeat([0, 1, 2], 4))  # 3 prompts: 3 folds
    assert sorted(np.unique(m.cv_folds_)) == [0, 1, 2]
    with _bad("cv must be an integer"):
        RidgeMap(cv=1).fit(X, X)


@pytest.mark.parametrize("n,d,lam", [(200, 10, 3.0), (30, 80, 3.0), (30, 80, 0.0), (200, 10, 0.0)])
def test_ridge_dof_is_the_trace_of_the_hat_matrix(rng, n, d, lam):
    X = activations(n, d, rng)
    Y = X @ rng.standard_normal((d, 3)) + rng.standard_normal((n, 3))
    m = RidgeMap(alphas=lam).fit(X, Y)
    Xc = centred(X)
    H = Xc @ np.linalg.pinv(Xc.T @ Xc + lam * np.eye(d)) @ Xc.T
    assert m.dof_ == pytest.approx(np.trace(H), rel=1e-6)
    if lam == 0.0:
        assert m.dof_ == pytest.approx(min(n - 1, d), abs=1e-6)  # least squares: the rank of X_c
    s = fit_summary(m)
    assert s == {"rows": n, "prompts": n, "d_in": d, "d_out": 3, "dof": m.dof_, "lambda": lam,
                 "underdetermined": n < d}
    cv = RidgeMap(cv=3).fit(X, Y, groups=np.arange(n) // 2)
    Hcv = Xc @ np.linalg.pinv(Xc.T @ Xc + cv.alpha_ * np.eye(d)) @ Xc.T
    assert cv.dof_ == pytest.approx(np.trace(Hcv), rel=1e-6) and fit_summary(cv)["prompts"] == n // 2


@pytest.mark.parametrize("amp", [0.3, 1.0])
def test_identity_prior_beats_zero_prior_with_fewer_rows_than_dimensions(rng, amp):
    """The F9 regime: 40 rows < d = 64 and a near-identity truth (identity + a rank-2 correction along the
    data's main axes). A zero-prior ridge ends up worse than the identity on held-out data; shrinking the
    correction toward the identity never does, and beats the mean shift when the correction is large."""
    d, n, n_test = 64, 40, 2000
    A = rng.standard_normal((d, d)) / np.sqrt(d)
    cov = A @ A.T + 0.05 * np.eye(d)
    L = np.linalg.cholesky(cov)
    V = np.linalg.eigh(cov)[1][:, ::-1]
    W_true = np.eye(d) + amp * V[:, :2] @ rotation(d, rng)[:2]
    b_true = 0.1 * rng.standard_normal(d)

    def draw(m):
        X = rng.standard_normal((m, d)) @ L.T + 3.0
        return X, X @ W_true + b_true + 0.1 * rng.standard_normal((m, d))

    X, Y = draw(n)
    Xt, Yt = draw(n_test)
    groups = np.arange(n)
    r = {name: make_map(name).fit(X, Y, groups).score(Xt, Yt) for name in ("ridge", "ridge-zero", "identity",
                                                                           "mean-shift")}
    assert r["ridge-zero"] < r["identity"] - 0.05 if amp < 1 else r["ridge-zero"] < r["mean-shift"] - 0.05
    assert r["ridge"] > max(r["identity"], r["ridge-zero"]) + 0.05
    assert r["ridge"] >= r["mean-shift"] - 1e-3  # the mean shift is its λ → ∞ limit, inside the CV grid
    if amp == 1.0:
        assert r["ridge"] > r["mean-shift"] + 0.05
    m = make_map("ridge").fit(X, Y, groups)
    assert fit_summary(m)["underdetermined"] and m.dof_ < n


def test_every_map_records_rows_dof_and_lambda(rng):
    n, d = 120, 12
    for name, m in fitted_examples(rng).items():
        s = fit_summary(m)
        assert s["rows"] == n and s["d_in"] == d and s["dof"] is not None and s["dof"] >= 0, name
        assert (s["lambda"] is not None) == (name in ("ridge", "ridge-zero", "logit-subspace", "lowrank")), name
        assert s["prompts"] == (30 if name not in ("lowrank-pca", "logit-procrustes") else n), name
    assert fit_summary(make_map("procrustes").fit(activations(50, 6, rng), activations(50, 6, rng)))["dof"] == 2.5


def test_ridge_recovers_planted_map_to_noise_ceiling(rng):
    n, d, sigma = 2000, 30, 0.5
    W_true = rng.standard_normal((d, d)) / np.sqrt(d)
    b_true = rng.standard_normal(d)
    X = activations(n + 1000, d, rng)
    noise = sigma * rng.standard_normal((n + 1000, d))
    Y = X @ W_true + b_true + noise
    m = RidgeMap().fit(X[:n], Y[:n])
    Yt, Xt = Y[n:], X[n:]
    ceiling = r2(Yt, Yt - noise[n:])
    assert m.score(Xt, Yt) > ceiling - 0.01
    assert m.score(Xt, Yt) == pytest.approx(r2_score(Yt, m.transform(Xt), multioutput="variance_weighted"))


# ---------------------------------------------------------------------------------------------
# whitened and PCA Procrustes


def test_whitened_procrustes_singular_covariance_is_finite(rng):
    base = rng.standard_normal((50, 6))
    X = np.hstack([base, base[:, :3]])  # duplicate columns: singular covariance
    Y = np.hstack([base @ rotation(6, rng), base[:, :3]]) + 0.1 * rng.standard_normal((50, 9))
    for shrinkage in (0.1, "ledoit-wolf"):
        m = WhitenedProcrustesMap(shrinkage=shrinkage).fit(X, Y)
        assert np.isfinite(m.W_).all() and np.isfinite(m.b_).all()
        assert m.score(X, Y) > 0.5
    with pytest.raises(MdiffError, match="singular"):
        WhitenedProcrustesMap(shrinkage=0.0).fit(X, Y)
    # n < d is singular too, and fine with shrinkage
    Xw = rng.standard_normal((10, 30))
    assert np.isfinite(WhitenedProcrustesMap().fit(Xw, Xw + 1).W_).all()


def test_whitened_procrustes_definition(rng):
    X = activations(400, 8, rng)
    Y = X @ rng.standard_normal((8, 8)) + rng.standard_normal((400, 8))
    m = WhitenedProcrustesMap(shrinkage="ledoit-wolf").fit(X, Y)
    assert m.shrinkage_x_ == pytest.approx(ledoit_wolf_shrinkage(X), rel=1e-10)
    assert m.shrinkage_y_ == pytest.approx(ledoit_wolf_shrinkage(Y), rel=1e-10)

    def powers(A, alpha):
        S = np.cov(A.T, bias=True)
        S = (1 - alpha) * S + alpha * np.trace(S) / S.shape[0] * np.eye(S.shape[0])
        e, V = np.linalg.eigh(S)
        return V @ np.diag(e**-0.5) @ V.T, V @ np.diag(e**0.5) @ V.T

    ix, _ = powers(X, m.shrinkage_x_)
    iy, sy = powers(Y, m.shrinkage_y_)
    R, _ = orthogonal_procrustes(centred(X) @ ix, centred(Y) @ iy)
    np.testing.assert_allclose(m.W_, ix @ R @ sy, atol=1e-8)


def test_pca_procrustes_recovers_subspace_map(rng):
    n, d, q = 3000, 20, 3
    B = np.linalg.qr(rng.standard_normal((d, q)))[0]
    Q = rotation(d, rng)
    X = (rng.standard_normal((n, q)) * [5.0, 4.0, 3.0]) @ B.T + 0.05 * rng.standard_normal((n, d)) + 2
    Y = X @ Q + 0.05 * rng.standard_normal((n, d))
    m = PCAProcrustesMap(q=q).fit(X[:2000], Y[:2000])
    assert np.linalg.matrix_rank(m.W_, tol=1e-8) == q
    np.testing.assert_allclose(m.W_, B @ B.T @ Q, atol=0.02)
    assert m.score(X[2000:], Y[2000:]) > 0.99
    assert m.explained_variance_ratio_x_ > 0.99
    with _bad("q"):
        PCAProcrustesMap(q=21).fit(X, Y)


# ---------------------------------------------------------------------------------------------
# RQ3: rank-k corrections


def planted_correction(rng, n=4000, d=24, k=3, sigma=0.1):
    A = np.linalg.qr(rng.standard_normal((d, k)))[0] * [1.0, 0.7, 0.5][:k]
    B = np.linalg.qr(rng.standard_normal((d, k)))[0]
    X = rng.standard_normal((n, d)) + 3.0
    Y = X + X @ A @ B.T + 0.2 + sigma * rng.standard_normal((n, d))
    return X, Y, A @ B.T


def test_lowrank_rrr_recovers_planted_rank(rng):
    X, Y, C = planted_correction(rng)
    Xtr, Ytr, Xte, Yte = X[:3000], Y[:3000], X[3000:], Y[3000:]
    ranks = [1, 2, 3, 4, 6, 8, "full"]
    path = fit_lowrank_path(Xtr, Ytr, ranks)
    D = Yte - Xte
    r2_d = {k: r2(D, path[k].transform(Xte) - Xte) for k in ranks}
    errs = [((Yte - path[k].transform(Xte)) ** 2).mean() for k in ranks]
    assert all(a > b for a, b in zip(errs[:3], errs[1:3], strict=False))  # decreasing up to the planted rank
    assert all(b <= a * 1.01 for a, b in zip(errs[2:], errs[3:], strict=False))  # then flat (±noise fit)
    smallest = next(k for k in ranks if r2_d[k] >= 0.95 * r2_d["full"])
    assert smallest == 3
    m3 = path[3]
    assert m3.rank_ == 3 and m3.U_.shape == (24, 3) and m3.V_.shape == (24, 3)
    np.testing.assert_allclose(m3.W_, np.eye(24) + m3.U_ @ m3.V_.T, atol=1e-12)
    assert np.abs(m3.W_ - np.eye(24) - C).max() < 0.02
    assert np.all(np.diff(m3.component_values_) <= 1e-9)
    # the path equals separate fits
    single = LowRankCorrectionMap(rank=3).fit(Xtr, Ytr)
    np.testing.assert_allclose(single.W_, m3.W_, atol=1e-12)
    np.testing.assert_allclose(single.b_, m3.b_, atol=1e-12)
    assert path["full"].rank_ == 24


@pytest.mark.parametrize("lam", [0.0, 5.0])
def test_lowrank_rrr_equals_textbook(rng, lam):
    """Izenman's RRR (identity weight): eigenvectors of Σ_DX Σ_XX⁻¹ Σ_XD; ridge version with Σ_XX + λI."""
    n, d, k = 500, 10, 2
    X = activations(n, d, rng)
    Y = X + X @ rng.standard_normal((d, d)) * 0.3 + rng.standard_normal((n, d))
    m = LowRankCorrectionMap(rank=k, alphas=lam).fit(X, Y)
    Xc, Dc = centred(X), centred(Y - X)
    Sxx = Xc.T @ Xc + lam * np.eye(d)
    Sxd = Xc.T @ Dc
    B_full = np.linalg.solve(Sxx, Sxd)
    M = B_full.T @ (Xc.T @ Xc) @ B_full  # = Σ_DX Σ_XX⁻¹ Σ_XD for λ = 0
    e, V = np.linalg.eigh(M)
    Vk = V[:, ::-1][:, :k]
    Bk = B_full @ Vk @ Vk.T
    np.testing.assert_allclose(m.W_ - np.eye(d), Bk, atol=1e-9)
    D_hat = Xc @ Bk + (Y - X).mean(0)
    np.testing.assert_allclose(m.transform(X), X + D_hat, atol=1e-8)
    assert m.alpha_ == lam
    full = LowRankCorrectionMap(rank="full", alphas=lam).fit(X, Y)
    np.testing.assert_allclose(full.W_ - np.eye(d), B_full, atol=1e-9)


@pytest.mark.parametrize("method", ["rrr", "pca-procrustes"])
def test_lowrank_n_less_than_d(rng, method):
    X = rng.standard_normal((20, 30))
    Y = X + rng.standard_normal((20, 30))
    m = LowRankCorrectionMap(rank=2, method=method).fit(X, Y)
    assert m.rank_ == 2 and np.isfinite(m.W_).all()
    assert np.linalg.matrix_rank(m.W_ - np.eye(30), tol=1e-8) <= 2
    assert LowRankCorrectionMap(rank=50, method=method).fit(X, Y).rank_ <= 20


def test_lowrank_pca_procrustes_recovers_planted_subspace_rotation(rng):
    n, d, k = 3000, 16, 4
    P = np.linalg.qr(rng.standard_normal((d, k)))[0]
    Rk = rotation(k, rng)
    W_true = np.eye(d) + P @ (Rk - np.eye(k)) @ P.T
    X = activations(n, d, rng)
    Y = X @ W_true + 0.01 * rng.standard_normal((n, d))
    m = LowRankCorrectionMap(rank=k, method="pca-procrustes").fit(X, Y)
    assert m.rank_ == k
    np.testing.assert_allclose(m.W_, W_true, atol=0.01)
    np.testing.assert_allclose(m.V_ @ m.V_.T, P @ P.T, atol=0.01)
    np.testing.assert_allclose(m.W_, np.eye(d) + m.U_ @ m.V_.T, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# logit subspace, baselines, null


def test_logit_subspace_moves_only_the_subspace(rng):
    n, d, V, q = 1500, 16, 300, 4
    W_U = rng.standard_normal((d, V)) + 3.0  # a large common column: removed by center_unembed
    m_probe = LogitSubspaceMap(W_U, q=q)
    U = np.linalg.svd(W_U - W_U.mean(axis=1, keepdims=True))[0][:, :q]
    X = activations(n, d, rng)
    M = rng.standard_normal((q, q)) * 0.5
    Y = X + X @ U @ M @ U.T + 0.3 + 0.05 * rng.standard_normal((n, d))
    m = m_probe.fit(X, Y)
    np.testing.assert_allclose(m.basis_ @ m.basis_.T, U @ U.T, atol=1e-8)
    v = rng.standard_normal((5, d))
    v -= v @ U @ U.T  # orthogonal complement
    np.testing.assert_allclose(v @ m.W_, v, atol=1e-10)
    np.testing.assert_allclose(m.b_ @ (np.eye(d) - U @ U.T), 0, atol=1e-10)
    np.testing.assert_allclose(m.W_, np.eye(d) + U @ M @ U.T, atol=0.01)
    assert m.alpha_ is not None
    basis = logit_basis(torch.tensor(W_U), q + 2)  # float32 accumulation; first q columns are used
    np.testing.assert_allclose(basis[:, :q] @ basis[:, :q].T, U @ U.T, atol=1e-5)
    mb = LogitSubspaceMap(basis=m.basis_, q=q).fit(X, Y)
    np.testing.assert_allclose(mb.W_, m.W_, atol=1e-12)
    assert mb.basis_singular_values_ is None
    with _bad("orthonormal"):
        LogitSubspaceMap(basis=2 * m.basis_, q=q).fit(X, Y)
    mp = LogitSubspaceMap(torch.tensor(W_U, dtype=torch.float32), q=q, solver="procrustes").fit(X, X)
    np.testing.assert_allclose(mp.W_, np.eye(d), atol=1e-6)
    with _bad("pass W_U.T"):
        LogitSubspaceMap(W_U.T, q=q).fit(X, Y)
    with _bad("needs W_U"):
        LogitSubspaceMap(None, q=q).fit(X, Y)


def test_identity_and_mean_shift(rng):
    X = rng.standard_normal((50, 6))
    Y = X + np.arange(6) + 0.1 * rng.standard_normal((50, 6))
    ident = IdentityMap().fit(X, Y)
    np.testing.assert_array_equal(ident.W_, np.eye(6))
    np.testing.assert_array_equal(ident.b_, np.zeros(6))
    np.testing.assert_array_equal(ident.transform(X), X)
    ms = MeanShiftMap().fit(X, Y)
    np.testing.assert_array_equal(ms.W_, np.eye(6))
    np.testing.assert_allclose(ms.b_, (Y - X).mean(0), atol=1e-12)
    assert ms.score(X, Y) > ident.score(X, Y)
    with _bad("d_in == d_out"):
        IdentityMap().fit(X, Y[:, :4])


def test_shuffled_pairs_null(rng):
    n, d, n_tr = 3000, 8, 2400
    X = activations(n, d, rng)
    Y = X @ rng.standard_normal((d, d)) + 0.3 * rng.standard_normal((n, d))
    groups = np.repeat(np.arange(n // 4), 4)
    true = RidgeMap().fit(X[:n_tr], Y[:n_tr], groups[:n_tr])
    assert true.score(X[n_tr:], Y[n_tr:]) > 0.9
    # a spurious map's held-out R² fluctuates by about ±2·sqrt(d/n) ≈ ±0.05 around 0
    scores = []
    for seed in range(5):
        null = fit_shuffled(RidgeMap(), X[:n_tr], Y[:n_tr], groups=groups[:n_tr], random_state=seed)
        scores.append(null.score(X[n_tr:], Y[n_tr:]))
    assert max(scores) < 0.1 and np.mean(scores) < 0.03
    perm = null.shuffle_permutation_
    assert np.array_equal(np.sort(perm), np.arange(n_tr))
    assert not np.any(groups[:n_tr][perm] == groups[:n_tr])  # no row paired with its own prompt
    # a factory works too, and rows of unequal-size prompts never meet their own prompt
    uneven = np.array([0] * 5 + [1] * 2 + [2] * 3 + [3] * 6 + [4] * 4)
    p = shuffled_pairs_permutation(uneven.size, uneven, random_state=0)
    assert np.array_equal(np.sort(p), np.arange(uneven.size)) and not np.any(uneven[p] == uneven)
    assert isinstance(fit_shuffled(lambda: ProcrustesMap(), X, Y), ProcrustesMap)
    with pytest.raises(MdiffError, match="one prompt holds"):
        shuffled_pairs_permutation(6, [0, 0, 0, 0, 1, 2])


# ---------------------------------------------------------------------------------------------
# standardisation


@pytest.mark.parametrize("option", ["x", "y", "both"])
@pytest.mark.parametrize("factory", [lambda s: RidgeMap(alphas=2.0, standardize=s),
                                     lambda s: ProcrustesMap(scale=True, standardize=s)])
def test_standardize_equals_fitting_by_hand(rng, option, factory):
    X = activations(150, 7, rng)
    X[:, 3] = 4.0  # constant column keeps scale 1
    Y = X @ rng.standard_normal((7, 7)) + 10 * rng.standard_normal(7) + rng.standard_normal((150, 7))
    m = factory(option).fit(X, Y)
    mx, sx = X.mean(0), X.std(0)
    sx[3] = 1.0
    my, sy = Y.mean(0), Y.std(0)
    xs = option in ("x", "both")
    ys = option in ("y", "both")
    Xs = (X - mx) / sx if xs else X
    Ys = (Y - my) / sy if ys else Y
    hand = factory("none").fit(Xs, Ys)
    X_new = activations(20, 7, rng)
    X_new_s = (X_new - mx) / sx if xs else X_new
    pred = hand.transform(X_new_s)
    pred = pred * sy + my if ys else pred
    np.testing.assert_allclose(m.transform(X_new), pred, rtol=1e-9, atol=1e-9)
    assert (m.x_scale_ is not None) == xs and (m.y_scale_ is not None) == ys


# ---------------------------------------------------------------------------------------------
# save / load


def test_save_load_round_trip_every_estimator(rng, tmp_path):
    X_new = activations(9, 12, np.random.default_rng(5))
    for name, m in fitted_examples(rng).items():
        st_path, json_path = save_map(m, tmp_path / name)
        assert st_path.name == f"{name}.safetensors" and json_path.name == f"{name}.json"
        doc = json.loads(json_path.read_text())
        assert doc["class"] == type(m).__name__ and doc["format"] == "mdiff.maps"
        arrays = load_file(str(st_path))
        assert set(doc["arrays"]) == set(arrays) and {"W_", "b_"} <= set(arrays)
        loaded = load_map(tmp_path / name)
        assert type(loaded) is type(m)
        np.testing.assert_array_equal(loaded.W_, m.W_)
        np.testing.assert_array_equal(loaded.b_, m.b_)
        np.testing.assert_array_equal(loaded.transform(X_new), m.transform(X_new))
        for key in type(m)._scalar_attrs:
            assert getattr(loaded, key) == getattr(m, key)
        for key in type(m)._array_attrs:
            a, b = getattr(loaded, key), getattr(m, key)
            assert (a is None and b is None) or np.array_equal(a, b)
        params = {k: v for k, v in m.get_params().items() if k != "W_U"}
        assert {k: v for k, v in loaded.get_params().items() if k != "W_U"} == params
    assert sorted(p.suffix for p in tmp_path.iterdir()) == sorted([".json", ".safetensors"] * len(fitted_examples(rng)))


def test_load_refuses_bad_files(rng, tmp_path):
    m = ProcrustesMap().fit(rng.standard_normal((20, 3)), rng.standard_normal((20, 3)))
    save_map(m, tmp_path / "p.json")  # a known extension is stripped from the prefix
    doc = json.loads((tmp_path / "p.json").read_text())
    doc["class"] = "EvilMap"
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(MdiffError, match="unknown map class 'EvilMap'"):
        load_map(tmp_path / "p")
    with pytest.raises(MdiffError, match="does not exist"):
        load_map(tmp_path / "missing")
    with pytest.raises(MdiffError, match="not fitted"):
        save_map(ProcrustesMap(), tmp_path / "unfitted")


def test_loaded_logit_subspace_needs_W_U_to_refit(rng, tmp_path):
    m = fitted_examples(rng)["logit-subspace"]
    save_map(m, tmp_path / "ls")
    loaded = load_map(tmp_path / "ls")
    assert loaded.W_U is None and loaded.basis_.shape == (12, 3)
    X2 = rng.standard_normal((20, 12))
    with _bad("needs W_U"):
        loaded.fit(X2, X2)
    refit = loaded.set_params(basis=loaded.basis_).fit(X2, X2)
    np.testing.assert_allclose(refit.W_, np.eye(12), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# API and errors


def test_api_conventions(rng):
    X = rng.standard_normal((40, 5)).astype(np.float32)
    m = RidgeMap(alphas=[0.1, 1.0], holdout=0.25, random_state=2)
    assert m.get_params() == {"alphas": [0.1, 1.0], "prior": "zero", "cv": None, "holdout": 0.25, "refit": True,
                              "random_state": 2,
                              "standardize": "none", "dtype": "auto"}
    assert not hasattr(m, "W_")
    assert m.fit(X, X) is m and m.n_features_in_ == 5 and m.n_features_out_ == 5
    json.dumps(m.to_dict())
    assert m.clone().get_params() == m.get_params() and not hasattr(m.clone(), "W_")
    assert "RidgeMap(alphas=[0.1, 1.0]" in repr(m)
    t = torch.tensor(X[:3], dtype=torch.float64)
    out = m.transform(t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), X[:3].astype(np.float64) @ m.W_ + m.b_, atol=1e-12)
    bf = m.transform(torch.tensor(X[:3]).to(torch.bfloat16))
    assert bf.dtype == torch.bfloat16
    assert m.transform(X[:4].reshape(2, 2, 5)).shape == (2, 2, 5)  # leading axes are kept
    fitted_t = ProcrustesMap().fit(torch.tensor(X), torch.tensor(X) * 2)
    assert fitted_t.W_.dtype == np.float64
    with pytest.raises(MdiffError, match="unknown map 'cca'"):
        make_map("cca")
    with pytest.raises(MdiffError, match="has no parameter"):
        make_map("ridge", q=3)


def test_map_diagnostics(rng):
    X = activations(100, 6, rng)
    d = map_diagnostics(IdentityMap().fit(X, X), X, X)
    assert d["r2"] == pytest.approx(1.0) and d["cka"] == pytest.approx(1.0) and d["mean_cosine"] == pytest.approx(1.0)
    assert d["n"] == 100


def test_map_diagnostics_on_a_real_map_against_numpy(rng):
    """X ≠ Y: a fitted ridge map's diagnostics equal independent numpy/sklearn computations on x @ W + b."""
    from sklearn.metrics import mean_squared_error, r2_score

    n, d = 150, 8
    X = activations(n, d, rng)
    Y = X @ rotation(d, rng) * 0.7 + 0.5 * rng.standard_normal((n, d)) + 2.0
    m = make_map("ridge").fit(X[:100], Y[:100])
    Xv, Yv = X[100:], Y[100:]
    pred = Xv @ np.asarray(m.W_, dtype=np.float64) + np.asarray(m.b_, dtype=np.float64)
    d_ = map_diagnostics(m, Xv, Yv)
    assert d_["n"] == 50
    assert d_["mse"] == pytest.approx(mean_squared_error(Yv, pred), rel=1e-9)
    assert d_["r2"] == pytest.approx(r2_score(Yv, pred, multioutput="variance_weighted"), rel=1e-9)
    pc, yc = centred(pred), centred(Yv)
    cka_ref = np.linalg.norm(yc.T @ pc) ** 2 / (np.linalg.norm(pc.T @ pc) * np.linalg.norm(yc.T @ yc))
    assert d_["cka"] == pytest.approx(cka_ref, rel=1e-9)
    cos = (pred * Yv).sum(1) / (np.linalg.norm(pred, axis=1) * np.linalg.norm(Yv, axis=1))
    assert d_["mean_cosine"] == pytest.approx(cos.mean(), rel=1e-9)
    # not a degenerate case: the values are away from their X→X limits
    assert d_["mse"] > 0.05 and 0.3 < d_["r2"] < 0.99 and d_["cka"] < 0.999


def test_input_errors(rng):
    X = rng.standard_normal((30, 4))
    Y = rng.standard_normal((30, 4))
    bad = X.copy()
    bad[2, 1] = np.nan
    bad[5, 0] = np.inf
    bad[5, 3] = -np.inf
    with pytest.raises(MdiffError, match=r"^X contains 3 NaN/inf entries \(in 2 of 30 rows\)"):
        RidgeMap().fit(bad, Y)
    with pytest.raises(MdiffError, match=r"^Y contains 3 NaN/inf entries"):
        ProcrustesMap().fit(X, torch.tensor(bad))
    with pytest.raises(MdiffError, match="X has 30 rows but Y has 29"):
        ProcrustesMap().fit(X, Y[:29])
    with pytest.raises(MdiffError, match="at least 2 samples"):
        ProcrustesMap().fit(X[:1], Y[:1])
    with _bad("must be 2-D"):
        ProcrustesMap().fit(X[0], Y[0])
    with pytest.raises(MdiffError, match="ProcrustesMap is not fitted yet; call fit"):
        ProcrustesMap().transform(X)
    with pytest.raises(MdiffError, match="not fitted"):
        RidgeMap().score(X, Y)
    m = ProcrustesMap().fit(X, Y)
    with pytest.raises(MdiffError, match="expects 4 features"):
        m.transform(X[:, :3])
    with pytest.raises(MdiffError, match="NaN/inf"):
        m.transform(bad)
    with pytest.raises(MdiffError, match="NaN/inf"):
        m.transform(torch.tensor(bad))
    with pytest.raises(MdiffError, match="Y is constant"):
        m.score(X, np.ones_like(Y))
    with _bad("standardize must be one of"):
        ProcrustesMap(standardize="z").fit(X, Y)
    with _bad("holdout must be"):
        RidgeMap(holdout=1.5).fit(X, Y)
    with _bad("alphas must be"):
        RidgeMap(alphas=[-1.0]).fit(X, Y)
    with _bad("shrinkage must be"):
        WhitenedProcrustesMap(shrinkage=2.0).fit(X, Y)
    with _bad("rank must be"):
        LowRankCorrectionMap(rank=0).fit(X, Y)
    with _bad("method must be"):
        LowRankCorrectionMap(method="svd").fit(X, Y)


def test_matrix_prior_saves_as_a_marker_and_must_be_given_to_refit(rng, tmp_path):
    X = activations(30, 4, rng)
    W0 = rng.standard_normal((4, 6))
    m = RidgeMap(alphas=1.0, prior=W0).fit(X, X @ W0)
    save_map(m, tmp_path / "m")
    loaded = load_map(tmp_path / "m")
    assert loaded.prior == "matrix" and np.allclose(loaded.prior_, W0) and np.allclose(loaded.W_, m.W_)
    with _bad("loaded with a matrix prior"):
        loaded.fit(X, X @ W0)
    assert np.allclose(loaded.set_params(prior=loaded.prior_).fit(X, X @ W0).W_, m.W_)
