"""Tests for mdiff.cka against independent, deliberately naive references written here."""

import itertools
import math

import numpy as np
import pytest
import torch
from jaxtyping import TypeCheckError

from mdiff.cka import (
    CKABootstrap,
    bootstrap_cka,
    debiased_cka,
    jackknife_debiased_cka,
    linear_cka,
    prompt_bootstrap_weights,
)
from mdiff.errors import MdiffError

# ---------------------------------------------------------------------------------------------
# independent references (float64, explicit centring matrix, formulas written term by term)


def ref_hsic_biased(K: np.ndarray, L: np.ndarray) -> float:
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(K @ H @ L @ H)) / (n - 1) ** 2


def ref_linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    K = X @ X.T  # not centred: H does the centring
    L = Y @ Y.T
    return ref_hsic_biased(K, L) / math.sqrt(ref_hsic_biased(K, K) * ref_hsic_biased(L, L))


def ref_hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. (2012), eq. (5): the unbiased HSIC estimator, term by term."""
    n = K.shape[0]
    Kt = K - np.diag(np.diag(K))
    Lt = L - np.diag(np.diag(L))
    one = np.ones(n)
    term1 = np.trace(Kt @ Lt)
    term2 = (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ Kt @ Lt @ one)
    return float(term1 + term2 - term3) / (n * (n - 3))


def ref_debiased_cka(X: np.ndarray, Y: np.ndarray) -> float:
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    K = X @ X.T
    L = Y @ Y.T
    return ref_hsic_unbiased(K, L) / math.sqrt(ref_hsic_unbiased(K, K) * ref_hsic_unbiased(L, L))


def ref_hsic_ustatistic(K: np.ndarray, L: np.ndarray) -> float:
    """HSIC_1 as the U-statistic it is (Song et al. 2012, Thm. 2): mean over distinct 4-tuples."""
    n = K.shape[0]
    total = 0.0
    count = 0
    for t, u, v, w in itertools.permutations(range(n), 4):
        total += K[t, u] * L[t, u] + K[t, u] * L[v, w] - 2.0 * K[t, u] * L[t, v]
        count += 1
    return total / count


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def related_pair(n: int, dx: int, dy: int, seed: int, offset: float = 3.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dx)) * (1.0 / np.sqrt(1.0 + np.arange(dx))) + offset
    Y = X @ rng.normal(size=(dx, dy)) / np.sqrt(dx) + 0.5 * rng.normal(size=(n, dy)) - offset
    return X, Y


WIDE = (40, 120, 90)  # n < d: Gram form under "auto"
TALL = (300, 12, 9)  # n > d: feature form under "auto"


# ---------------------------------------------------------------------------------------------
# point estimates


@pytest.mark.parametrize("fn", [linear_cka, debiased_cka])
@pytest.mark.parametrize("method", ["auto", "gram", "features"])
@pytest.mark.parametrize("shape", [WIDE, TALL])
def test_self_similarity_is_one(fn, method, shape):
    X, _ = related_pair(*shape, seed=1)
    assert fn(X, X, method=method) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("fn", [linear_cka, debiased_cka])
@pytest.mark.parametrize("shape", [WIDE, TALL])
def test_invariant_to_rotation_and_isotropic_scaling(fn, shape):
    n, dx, dy = shape
    X, Y = related_pair(*shape, seed=2)
    rng = np.random.default_rng(3)
    base = fn(X, Y)
    Qx = random_orthogonal(dx, rng)
    Qy = random_orthogonal(dy, rng)
    assert fn(X @ Qx, Y) == pytest.approx(base, abs=1e-10)
    assert fn(X, 7.5 * (Y @ Qy)) == pytest.approx(base, abs=1e-10)
    assert fn(0.01 * X @ Qx, 40.0 * Y @ Qy) == pytest.approx(base, abs=1e-10)
    # sanity: a non-orthogonal (anisotropic) map does change it
    assert abs(fn(X * np.linspace(0.1, 10.0, dx), Y) - base) > 1e-3


@pytest.mark.parametrize("fn", [linear_cka, debiased_cka])
@pytest.mark.parametrize("shape", [WIDE, TALL])
def test_gram_and_feature_forms_agree(fn, shape):
    X, Y = related_pair(*shape, seed=4)
    gram = fn(X, Y, method="gram")
    feat = fn(X, Y, method="features")
    assert gram == pytest.approx(feat, abs=1e-12)
    assert fn(X, Y) == pytest.approx(gram, abs=1e-12)


@pytest.mark.parametrize("shape", [WIDE, TALL, (25, 3, 40)])
def test_linear_cka_matches_reference(shape):
    X, Y = related_pair(*shape, seed=5)
    ref = ref_linear_cka(X, Y)
    assert 0.05 < ref < 0.999  # a non-trivial value
    for method in ("auto", "gram", "features"):
        assert linear_cka(X, Y, method=method) == pytest.approx(ref, abs=1e-10)


@pytest.mark.parametrize("shape", [WIDE, TALL, (25, 3, 40)])
def test_debiased_cka_matches_reference(shape):
    X, Y = related_pair(*shape, seed=6)
    ref = ref_debiased_cka(X, Y)
    for method in ("auto", "gram", "features"):
        assert debiased_cka(X, Y, method=method) == pytest.approx(ref, abs=1e-8)


def test_unbiased_hsic_reference_is_the_u_statistic():
    # guards the term-by-term reference itself, on raw (uncentred) tiny data
    X, Y = related_pair(7, 3, 2, seed=7)
    K, L = X @ X.T, Y @ Y.T
    assert ref_hsic_unbiased(K, L) == pytest.approx(ref_hsic_ustatistic(K, L), rel=1e-10)
    # and debiased CKA from the U-statistic agrees with mdiff
    ustat = ref_hsic_ustatistic(K, L) / math.sqrt(ref_hsic_ustatistic(K, K) * ref_hsic_ustatistic(L, L))
    assert debiased_cka(X, Y) == pytest.approx(ustat, abs=1e-10)


def test_float32_path_accuracy_on_residual_like_data():
    # large enough (n·d ≥ 2^20) that float32 Grams are used; large mean and outlier dims
    rng = np.random.default_rng(8)
    n, d = 260, 4096
    scale = (1.0 / np.sqrt(1.0 + np.arange(d))).astype(np.float32)
    X = rng.standard_normal((n, d), dtype=np.float32) * scale + rng.normal(size=d).astype(np.float32) * 5
    X[:, :4] += np.float32(30.0)
    Y = np.float32(0.9) * X + np.float32(0.05) * rng.standard_normal((n, d), dtype=np.float32)
    exact = linear_cka(X.astype(np.float64), Y.astype(np.float64))
    assert linear_cka(X, Y) == pytest.approx(exact, abs=1e-6)
    # tall float32 data takes the float32 feature form
    T = rng.standard_normal((20000, 64), dtype=np.float32) * scale[:64] + np.float32(20.0)
    U = T @ rng.standard_normal((64, 64), dtype=np.float32) + rng.standard_normal(
        (20000, 64), dtype=np.float32
    )
    assert linear_cka(T, U) == pytest.approx(linear_cka(T.astype(np.float64), U.astype(np.float64)), abs=1e-6)
    boot32 = bootstrap_cka(X, Y, n_boot=8, seed=0)
    boot64 = bootstrap_cka(X.astype(np.float64), Y.astype(np.float64), n_boot=8, seed=0)
    np.testing.assert_allclose(boot32.samples, boot64.samples, atol=1e-6)


def test_torch_inputs_match_numpy():
    X, Y = related_pair(*WIDE, seed=9)
    tx, ty = torch.from_numpy(X), torch.from_numpy(Y)
    assert linear_cka(tx, ty) == pytest.approx(linear_cka(X, Y), abs=1e-12)
    assert debiased_cka(tx.float(), ty.float()) == pytest.approx(debiased_cka(X, Y), abs=1e-5)
    xb = tx.to(torch.bfloat16)
    assert linear_cka(xb, xb) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(xb, ty) == pytest.approx(linear_cka(xb.float().numpy(), Y), abs=1e-9)


def test_debiased_cka_removes_small_sample_bias():
    deb, biased = [], []
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        X = rng.normal(size=(50, 500))
        Y = rng.normal(size=(50, 500))
        deb.append(debiased_cka(X, Y))
        biased.append(linear_cka(X, Y))
    assert abs(np.mean(deb)) < 0.05
    assert max(abs(v) for v in deb) < 0.1
    assert min(biased) > 0.3


# ---------------------------------------------------------------------------------------------
# bootstrap weights


def test_prompt_bootstrap_weights_structure():
    groups = np.repeat(np.array(["p0", "p1", "p2", "p3", "p4", "p5"]), 3)
    W = prompt_bootstrap_weights(groups, n_boot=50, seed=0)
    assert W.shape == (50, 18)
    assert np.issubdtype(W.dtype, np.integer)
    assert (W.sum(axis=1) == 18).all()  # equal-sized prompts: every resample has n rows
    per_prompt = W.reshape(50, 6, 3)
    assert (per_prompt == per_prompt[:, :, :1]).all()  # constant within a prompt
    assert (per_prompt[:, :, 0].sum(axis=1) == 6).all()  # 6 prompt draws per resample
    # unequal prompt sizes: prompt counts still sum to G, row sums vary
    g2 = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    W2 = prompt_bootstrap_weights(g2, n_boot=30, seed=1)
    first = [0, 3, 4, 6]
    assert (W2[:, first].sum(axis=1) == 4).all()
    for g in range(4):
        assert (W2[:, g2 == g] == W2[:, [first[g]]]).all()
    # groups=None: every row its own prompt
    W3 = prompt_bootstrap_weights(None, n_boot=10, seed=2, n=7)
    assert W3.shape == (10, 7) and (W3.sum(axis=1) == 7).all()


def test_determinism():
    X, Y = related_pair(40, 6, 5, seed=10)
    groups = np.repeat(np.arange(10), 4)
    a = bootstrap_cka(X, Y, groups=groups, n_boot=64, seed=5)
    b = bootstrap_cka(X, Y, groups=groups, n_boot=64, seed=5)
    c = bootstrap_cka(X, Y, groups=groups, n_boot=64, seed=6)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert not np.array_equal(a.samples, c.samples)
    np.testing.assert_array_equal(
        prompt_bootstrap_weights(groups, 20, 3), prompt_bootstrap_weights(groups, 20, 3)
    )


# ---------------------------------------------------------------------------------------------
# batched bootstrap vs the naive loop


def naive_bootstrap(X, Y, W):
    rows = np.arange(X.shape[0])
    out = []
    for w in W:
        idx = np.repeat(rows, w)  # the resample, each row as many times as its weight
        out.append(ref_linear_cka(X[idx], Y[idx]))
    return np.array(out)


@pytest.mark.parametrize(
    "groups",
    [
        None,
        np.repeat(np.arange(12), 4),
        np.array([0] * 7 + [1] * 2 + [2] * 9 + [3] * 5 + [4] * 12 + [5] * 13),
    ],
    ids=["rows", "equal-prompts", "unequal-prompts"],
)
@pytest.mark.parametrize("shape", [(48, 10, 7), (48, 80, 60)])
def test_batched_bootstrap_equals_naive_loop(groups, shape):
    X, Y = related_pair(*shape, seed=11)
    res = bootstrap_cka(X, Y, groups=groups, n_boot=20, seed=4)
    W = prompt_bootstrap_weights(groups, n_boot=20, seed=4, n=shape[0])
    np.testing.assert_allclose(res.samples, naive_bootstrap(X, Y, W), rtol=0, atol=1e-8)
    assert res.value == pytest.approx(ref_linear_cka(X, Y), abs=1e-10)
    assert res.n == shape[0]
    assert res.n_groups == (shape[0] if groups is None else len(np.unique(groups)))
    assert res.ci_low <= np.median(res.samples) <= res.ci_high
    lo, hi = np.quantile(res.samples, [0.025, 0.975])
    assert (res.ci_low, res.ci_high) == pytest.approx((lo, hi))


def test_shared_weights_give_paired_resamples(monkeypatch):
    X, Y = related_pair(36, 8, 8, seed=12)
    Z = Y + 0.3 * np.random.default_rng(0).normal(size=Y.shape)
    groups = np.repeat(np.arange(9), 4)
    W = prompt_bootstrap_weights(groups, n_boot=25, seed=9)
    a = bootstrap_cka(X, Y, groups=groups, weights=W)
    b = bootstrap_cka(X, Z, groups=groups, weights=W)
    np.testing.assert_allclose(a.samples, naive_bootstrap(X, Y, W), atol=1e-8)
    np.testing.assert_allclose(b.samples, naive_bootstrap(X, Z, W), atol=1e-8)
    # same Ω as drawing internally with that seed
    np.testing.assert_array_equal(a.samples, bootstrap_cka(X, Y, groups=groups, n_boot=25, seed=9).samples)
    # chunking does not change results
    import mdiff.cka as cka_mod

    monkeypatch.setattr(cka_mod, "_CHUNK_ELEMENTS", 36 * 4)
    np.testing.assert_allclose(bootstrap_cka(X, Y, weights=W).samples, a.samples, atol=1e-13)


def test_degenerate_resample_is_nan():
    X, Y = related_pair(6, 3, 3, seed=13)
    W = np.array([[6, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    res = bootstrap_cka(X, Y, weights=W)
    assert math.isnan(res.samples[0])
    assert res.samples[1] == pytest.approx(ref_linear_cka(X, Y), abs=1e-10)
    assert res.ci_low == pytest.approx(res.samples[1])


# ---------------------------------------------------------------------------------------------
# jackknife for debiased CKA


@pytest.mark.parametrize(
    "groups", [None, np.random.default_rng(0).integers(0, 9, size=45)], ids=["rows", "prompts"]
)
def test_jackknife_leave_one_out_values_match_recompute(groups):
    X, Y = related_pair(45, 30, 20, seed=14)
    res = jackknife_debiased_cka(X, Y, groups=groups)
    labels = np.arange(45) if groups is None else groups
    naive = np.array([ref_debiased_cka(X[labels != g], Y[labels != g]) for g in np.unique(labels)])
    np.testing.assert_allclose(res.samples, naive, rtol=0, atol=1e-9)
    assert res.value == pytest.approx(ref_debiased_cka(X, Y), abs=1e-9)
    G = len(naive)
    se = math.sqrt((G - 1) / G * np.sum((naive - naive.mean()) ** 2))
    assert res.ci_high - res.value == pytest.approx(1.959963984540054 * se, rel=1e-9)
    assert res.value - res.ci_low == pytest.approx(res.ci_high - res.value, rel=1e-12)
    assert res.n_groups == G


# ---------------------------------------------------------------------------------------------
# coverage on synthetic data with a known population CKA


def population_cka(Sxx: np.ndarray, Sxy: np.ndarray, Syy: np.ndarray) -> float:
    return float(np.sum(Sxy**2) / (np.linalg.norm(Sxx) * np.linalg.norm(Syy)))


def test_bootstrap_and_jackknife_coverage_iid():
    rng = np.random.default_rng(123)
    d, n, reps = 4, 400, 100
    S = np.diag([3.0, 2.0, 1.0, 0.5])
    A = rng.normal(size=(d, d))
    noise = 1.5
    Sxx = S @ S.T
    truth = population_cka(Sxx, Sxx @ A, A.T @ Sxx @ A + noise**2 * np.eye(d))
    hits_boot = hits_jack = 0
    for r in range(reps):
        X = rng.normal(size=(n, d)) @ S.T
        Y = X @ A + noise * rng.normal(size=(n, d))
        b = bootstrap_cka(X, Y, n_boot=300, seed=r)
        j = jackknife_debiased_cka(X, Y)
        hits_boot += b.ci_low <= truth <= b.ci_high
        hits_jack += j.ci_low <= truth <= j.ci_high
    assert 0.85 <= hits_boot / reps <= 0.99
    assert 0.85 <= hits_jack / reps <= 0.99


def test_cluster_bootstrap_coverage_with_correlated_positions():
    # 100 prompts × 4 positions sharing a prompt-level random effect: rows are not independent,
    # so only the prompt-level resampling covers at the nominal rate.
    rng = np.random.default_rng(7)
    d, G, P, reps = 4, 100, 4, 80
    Su = np.diag([3.0, 2.0, 1.0, 0.5])
    Sv = 0.5 * np.eye(d)
    A = rng.normal(size=(d, d))
    noise = 1.5
    Sxx = Su @ Su.T + Sv @ Sv.T
    truth = population_cka(Sxx, Sxx @ A, A.T @ Sxx @ A + noise**2 * np.eye(d))
    groups = np.repeat(np.arange(G), P)
    hits_cluster = hits_rows = hits_jack = 0
    for r in range(reps):
        X = (rng.normal(size=(G, d)) @ Su.T)[groups] + rng.normal(size=(G * P, d)) @ Sv.T
        E = 0.8 * rng.normal(size=(G, d))[groups] + 0.6 * rng.normal(size=(G * P, d))
        Y = X @ A + noise * E
        c = bootstrap_cka(X, Y, groups=groups, n_boot=300, seed=r)
        w = bootstrap_cka(X, Y, groups=None, n_boot=300, seed=r)
        j = jackknife_debiased_cka(X, Y, groups=groups)
        hits_cluster += c.ci_low <= truth <= c.ci_high
        hits_rows += w.ci_low <= truth <= w.ci_high
        hits_jack += j.ci_low <= truth <= j.ci_high
    assert 0.85 <= hits_cluster / reps <= 1.0
    assert 0.85 <= hits_jack / reps <= 1.0
    assert hits_rows / reps < hits_cluster / reps - 0.1  # ignoring the clustering under-covers


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_raises_mdiff_error():
    X, Y = related_pair(20, 5, 4, seed=15)
    with pytest.raises(MdiffError, match="rows"):
        linear_cka(X, Y[:-1])
    with pytest.raises(MdiffError, match="rows"):
        bootstrap_cka(X, Y[:-2], n_boot=5)
    Xn = X.copy()
    Xn[3, 2] = np.nan
    for fn in (linear_cka, debiased_cka, bootstrap_cka, jackknife_debiased_cka):
        with pytest.raises(MdiffError, match="NaN"):
            fn(Xn, Y)
    Yi = Y.copy()
    Yi[0, 0] = np.inf
    with pytest.raises(MdiffError, match="inf"):
        linear_cka(X, Yi)
    with pytest.raises(MdiffError, match="n_boot"):
        bootstrap_cka(X, Y, n_boot=0)
    with pytest.raises(MdiffError, match="n_boot"):
        prompt_bootstrap_weights(None, n_boot=0, n=20)
    with pytest.raises(MdiffError, match="at least 4"):
        debiased_cka(X[:3], Y[:3])
    with pytest.raises(MdiffError, match="at least 4"):
        jackknife_debiased_cka(X[:3], Y[:3])
    with pytest.raises(MdiffError, match="at least 4"):
        jackknife_debiased_cka(X[:6], Y[:6], groups=[0, 0, 0, 1, 1, 1])
    with pytest.raises(MdiffError, match="at least 2"):
        linear_cka(X[:1], Y[:1])
    with pytest.raises(MdiffError, match="groups has length"):
        bootstrap_cka(X, Y, groups=np.arange(19), n_boot=5)
    with pytest.raises(MdiffError, match="groups has length"):
        jackknife_debiased_cka(X, Y, groups=np.arange(21))
    for bad_ci in (0.0, 1.0, 95.0, -0.5):
        with pytest.raises(MdiffError, match="ci"):
            bootstrap_cka(X, Y, n_boot=5, ci=bad_ci)
    with pytest.raises(MdiffError, match="ci"):
        jackknife_debiased_cka(X, Y, ci=1.5)
    with pytest.raises(MdiffError, match="weights"):
        bootstrap_cka(X, Y, weights=np.ones((5, 19)))
    with pytest.raises(MdiffError, match="weights"):
        bootstrap_cka(X, Y, weights=-np.ones((5, 20)))
    # a 1-D input: mdiff says so, unless the jaxtyping test hook (--jaxtyping-packages) rejects it first
    with pytest.raises((MdiffError, TypeCheckError)) as info:
        linear_cka(X[:, 0], Y[:, 0])
    assert info.type is TypeCheckError or "2-D" in str(info.value)
    with pytest.raises(MdiffError, match="constant"):
        linear_cka(np.ones((20, 5)), Y)
    with pytest.raises((MdiffError, TypeCheckError), match="method"):
        linear_cka(X, Y, method="svd")  # type: ignore[arg-type]
    with pytest.raises(MdiffError, match="prompts"):
        bootstrap_cka(X, Y, groups=np.zeros(20), n_boot=5)


def test_result_is_frozen_and_serialisable():
    X, Y = related_pair(30, 6, 6, seed=16)
    res = bootstrap_cka(X, Y, n_boot=10, seed=0)
    assert isinstance(res, CKABootstrap)
    with pytest.raises(AttributeError):
        res.value = 0.0  # type: ignore[misc]
    d = res.to_dict()
    assert d["n_resamples"] == 10 and d["n"] == 30 and d["ci"] == 0.95
    assert set(d) >= {"value", "ci_low", "ci_high", "n_groups", "method"}
