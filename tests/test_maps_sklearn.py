"""scikit-learn compatibility of the map estimators (mdiff.maps): sklearn's own estimator checks, clone and
get_params/set_params, sklearn tools, and planted maps recovered against numpy/scipy references."""

import inspect

import jaxtyping
import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.utils.estimator_checks import parametrize_with_checks
from sklearn.utils.validation import check_is_fitted

from mdiff.errors import MdiffError
from mdiff.maps import (
    MAP_NAMES,
    LinearMap,
    LogitSubspaceMap,
    LowRankCorrectionMap,
    MapError,
    MapNotFittedError,
    ProcrustesMap,
    RidgeMap,
    WhitenedProcrustesMap,
    load_map,
    make_map,
    save_map,
)

# ---------------------------------------------------------------------------------------------
# sklearn's estimator checks
#
# The checks use small generic data sets (at most a few hundred rows, ≤ 10 columns), and y is
# reshaped to one column because the maps declare the multi_output tag without single_output
# (Y is always 2-D). The maps below that are built around the identity (d_in == d_out) cannot fit
# those data, and the logit-subspace map needs the tuned model's unembedding; both still run the
# API checks that do not fit. Checks that do not apply are declared as expected failures
# (strict: one that starts passing fails the test, so the list stays current), each with its reason.

_CHECK_KW = {"pca-procrustes": {"q": 1}, "lowrank": {"rank": 1}}
CHECKED = [make_map(name, **_CHECK_KW.get(name, {})) for name in MAP_NAMES] + [
    RidgeMap(),  # the class default: zero prior, λ on one hold-out fold
    RidgeMap(alphas=1e-2, standardize="both"),  # fixed λ, standardised both sides
    WhitenedProcrustesMap(shrinkage=0.5),
]

_Y_1D = ("sklearn's transformer checks fit with a 1-D y; a map needs Y 2-D (n_samples, d_out) "
         "(tags: multi_output, not single_output)")
_ANY_MAP = {
    "check_complex_data": "complex X raises MapError 'X has dtype complex128; pass a real-valued ...', "
                          "not sklearn's wording 'Complex data not supported'",
    "check_dtype_object": "object arrays are refused with a MapError even when they hold numbers "
                          "(activations are float arrays or tensors)",
    "check_estimators_empty_data_messages": "X with no columns raises MapError 'X has no features ...', not "
                                            "sklearn's wording '0 feature(s) (shape=(n, 0)) while a minimum ...'",
    "check_fit2d_1sample": "one row raises MapError '... needs at least 2 samples but got 1', none of the "
                           "phrasings sklearn accepts",
    "check_fit2d_predict1d": "transform/predict act on the last axis (``*batch d_in``), so a 1-D X of d_in "
                             "values is one sample, by design; sklearn expects a ValueError",
    "check_n_features_in_after_fitting": "a wrong feature count in transform/score raises MapError "
                                         "'X has shape ... but the map expects d features', not sklearn's wording",
    "check_transformer_data_not_an_array": _Y_1D,
    "check_transformer_general": _Y_1D,
    "check_transformer_preserve_dtypes": _Y_1D,
}
_SQUARE = "the map needs d_in == d_out (it is built around the identity); the check fits a 1-column y on a wider X"
_SQUARE_CHECKS = (
    "check_dict_unchanged", "check_dont_overwrite_parameters", "check_estimators_dtypes",
    "check_estimators_fit_returns_self", "check_estimators_nan_inf", "check_estimators_overwrite_params",
    "check_estimators_pickle", "check_f_contiguous_array_estimator", "check_fit_check_is_fitted",
    "check_fit_idempotent", "check_fit_score_takes_y", "check_methods_sample_order_invariance",
    "check_methods_subset_invariance", "check_n_features_in", "check_pipeline_consistency",
    "check_positive_only_tag_during_fit", "check_readonly_memmap_input", "check_regressor_data_not_an_array",
    "check_regressor_multioutput", "check_regressors_int", "check_regressors_no_decision_function",
    "check_regressors_train",
)


def _is_square(est: LinearMap) -> bool:
    return est._square or (isinstance(est, RidgeMap) and est.prior == "identity")


def expected_failed_checks(est: LinearMap) -> dict[str, str]:
    out = dict(_ANY_MAP)
    if _is_square(est):
        out.update(dict.fromkeys(_SQUARE_CHECKS, _SQUARE))
    if isinstance(est, LogitSubspaceMap):
        out["check_fit2d_1feature"] = ("the logit-subspace map needs W_U (or a basis) whose d_model equals X's "
                                       "width; the check has none")
    if est.name == "pca-procrustes":
        out["check_regressors_train"] = ("R² > 0.5 is not expected: the principal axes are chosen without the "
                                         "target (q = 1 projects X on its top principal axis)")
    return out


@pytest.fixture
def _runtime_types_off():
    """The checks pass lists, int arrays, DataFrames and memmaps on purpose; the jaxtyping checks that
    pytest turns on for mdiff would reject those calls against the ``Float[...]`` annotations before
    mdiff's own validation runs (which accepts any real numeric array). Turned off only here."""
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


@pytest.mark.usefixtures("_runtime_types_off")
@parametrize_with_checks(CHECKED, expected_failed_checks=expected_failed_checks, xfail_strict=True)
def test_sklearn_estimator_checks(estimator, check, request):
    if request.node.get_closest_marker("xfail") is None:
        check(estimator)
        return
    try:
        check(estimator)
    except Exception as err:  # an expected failure: a one-frame report (pytest would spend minutes
        raise AssertionError(f"{type(err).__name__}: {err}") from None  # rendering sklearn's tracebacks)


# ---------------------------------------------------------------------------------------------
# clone, get_params/set_params, fitted state


def _square_data(rng, n=48, d=4):
    X = rng.standard_normal((n, d)) * np.linspace(2.0, 0.5, d) + 3.0
    Y = X @ (np.eye(d) + 0.3 * rng.standard_normal((d, d))) + 0.1 * rng.standard_normal((n, d)) - 1.0
    return X, Y, np.repeat(np.arange(n // 4), 4)


def _every_map(rng, d=4):
    """One estimator per make_map name (with parameters that fit d = 4) and a matrix-prior ridge."""
    kw = {"pca-procrustes": {"q": 2}, "lowrank": {"rank": 2},
          "logit-subspace": {"W_U": torch.tensor(rng.standard_normal((d, 30))), "q": 2}}
    maps = {name: make_map(name, **kw.get(name, {})) for name in MAP_NAMES}
    maps["ridge-matrix-prior"] = RidgeMap(alphas=[0.1, 1.0], prior=rng.standard_normal((d, d)), holdout=3)
    return maps


def _same_params(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key, va in a.items():
        vb = b[key]
        if isinstance(va, (np.ndarray, torch.Tensor)) or isinstance(vb, (np.ndarray, torch.Tensor)):
            if type(va) is not type(vb) or not np.array_equal(np.asarray(va), np.asarray(vb)):
                return False
        elif va != vb or type(va) is not type(vb):
            return False
    return True


@pytest.fixture
def rng():
    return np.random.default_rng(20261201)


def test_clone_of_a_fitted_map_is_unfitted_with_equal_params(rng):
    X, Y, groups = _square_data(rng)
    for name, m in _every_map(rng).items():
        m.fit(X, Y, groups)
        W = m.W_.copy()
        for copy in (clone(m), m.clone()):
            assert type(copy) is type(m), name
            assert _same_params(copy.get_params(), m.get_params()), name
            assert not any(k.endswith("_") and not k.startswith("_") for k in vars(copy)), name
            with pytest.raises(NotFittedError):
                check_is_fitted(copy)
            with pytest.raises(MapNotFittedError, match="not fitted yet"):
                copy.predict(X)
            np.testing.assert_array_equal(copy.fit(X, Y, groups).W_, W, err_msg=name)  # same fit as the original
        check_is_fitted(m)
        np.testing.assert_array_equal(m.W_, W, err_msg=name)  # the original is untouched
    # sklearn's clone deep-copies array parameters; the map's own clone() shares them (W_U can be large)
    m = _every_map(rng)["logit-subspace"]
    assert clone(m).W_U is not m.W_U and m.clone().W_U is m.W_U


def test_get_params_round_trip(rng):
    for name, m in _every_map(rng).items():
        params = m.get_params()
        names = [p for p in inspect.signature(type(m).__init__).parameters if p != "self"]
        assert sorted(params) == sorted(names), name
        rebuilt = type(m)(**params)
        assert _same_params(rebuilt.get_params(), params), name
        for key, value in params.items():  # __init__ stores each parameter unchanged, as the same object
            assert getattr(rebuilt, key) is value, (name, key)
        assert m.set_params(**params) is m and _same_params(m.get_params(), params)
        assert _same_params(m.get_params(deep=False), params), name  # no nested estimators
    m = RidgeMap().set_params(alphas=[1.0, 2.0], cv=3)
    assert m.get_params()["alphas"] == [1.0, 2.0] and m.get_params()["cv"] == 3
    with pytest.raises(MapError, match="has no parameter 'alpha'"):
        m.set_params(alpha=1.0)


def test_fitting_does_not_change_parameters(rng):
    X, Y, groups = _square_data(rng)
    for name, m in _every_map(rng).items():
        before = {k: (v.clone() if isinstance(v, torch.Tensor) else np.copy(v) if isinstance(v, np.ndarray) else v)
                  for k, v in m.get_params().items()}
        m.fit(X, Y, groups)
        assert _same_params(m.get_params(), before), name


def test_not_fitted_and_bad_input_errors_are_sklearn_and_mdiff_errors(rng):
    X, Y, _ = _square_data(rng)
    for name, m in _every_map(rng).items():
        with pytest.raises(NotFittedError):
            check_is_fitted(m)
        for method, args in (("transform", (X,)), ("predict", (X,)), ("score", (X, Y))):
            with pytest.raises(MapNotFittedError, match=f"{type(m).__name__} is not fitted yet") as err:
                getattr(m, method)(*args)
            assert isinstance(err.value, MdiffError) and isinstance(err.value, NotFittedError), name
    with pytest.raises(MapError, match="X has 48 rows but Y has 47") as err:
        ProcrustesMap().fit(X, Y[:-1])
    assert isinstance(err.value, ValueError) and isinstance(err.value, MdiffError)


@pytest.mark.usefixtures("_runtime_types_off")  # None and a sparse matrix are outside the annotations
def test_missing_y_and_sparse_input_get_clear_errors(rng):
    X, Y, _ = _square_data(rng)
    with pytest.raises(MapError, match="requires y to be passed, but the target y is None"):
        ProcrustesMap().fit(X, None)
    from scipy import sparse

    with pytest.raises(MapError, match="sparse matrix"):
        ProcrustesMap().fit(sparse.csr_matrix(X), Y)


def test_predict_and_fit_transform_equal_transform(rng):
    X, Y, groups = _square_data(rng)
    for name, m in _every_map(rng).items():
        out = m.fit_transform(X, Y, groups=groups)
        np.testing.assert_array_equal(out, m.transform(X), err_msg=name)
        np.testing.assert_array_equal(m.predict(X), X @ m.W_ + m.b_, err_msg=name)
        assert m.score(X, Y) == pytest.approx(r2_score(Y, m.predict(X), multioutput="variance_weighted"), rel=1e-12)


def test_loaded_map_is_fitted_for_sklearn(rng, tmp_path):
    X, Y, _ = _square_data(rng)
    m = ProcrustesMap(scale=True).fit(X, Y)
    save_map(m, tmp_path / "p")
    loaded = load_map(tmp_path / "p")
    check_is_fitted(loaded)
    fresh = clone(loaded)
    assert fresh.get_params() == m.get_params()
    with pytest.raises(NotFittedError):
        check_is_fitted(fresh)


def test_grid_search_with_prompt_groups(rng):
    """sklearn's model selection drives a map: GridSearchCV with GroupKFold, scored by the map's R²."""
    n, d = 120, 5
    X = rng.standard_normal((n, d))
    W_true = rng.standard_normal((d, 3))
    Y = X @ W_true + 0.05 * rng.standard_normal((n, 3))
    groups = np.repeat(np.arange(30), 4)
    search = GridSearchCV(RidgeMap(), {"alphas": [1e-6, 1e3]}, cv=GroupKFold(3), error_score="raise")
    search.fit(X, Y, groups=groups)
    assert search.best_params_ == {"alphas": 1e-6}
    assert search.best_estimator_.score(X, Y) > 0.99
    np.testing.assert_allclose(search.best_estimator_.W_, W_true, atol=0.05)


# ---------------------------------------------------------------------------------------------
# planted maps against independent references


def test_ridge_with_tiny_alpha_recovers_a_planted_linear_map(rng):
    n, d_in, d_out = 200, 6, 4
    X = rng.standard_normal((n, d_in)) * np.linspace(3.0, 0.3, d_in) + 2.0
    W_true = rng.standard_normal((d_in, d_out))
    b_true = rng.standard_normal(d_out)
    Y = X @ W_true + b_true
    m = RidgeMap(alphas=1e-10).fit(X, Y)
    np.testing.assert_allclose(m.W_, W_true, atol=1e-8)
    np.testing.assert_allclose(m.b_, b_true, atol=1e-8)
    X_new = rng.standard_normal((10, d_in))
    np.testing.assert_allclose(m.predict(X_new), X_new @ W_true + b_true, atol=1e-8)
    # with noise: the same as numpy's least squares with an intercept column
    Y_noisy = Y + 0.3 * rng.standard_normal((n, d_out))
    coef = np.linalg.lstsq(np.c_[X, np.ones(n)], Y_noisy, rcond=None)[0]
    m = RidgeMap(alphas=1e-10).fit(X, Y_noisy)
    np.testing.assert_allclose(m.W_, coef[:-1], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(m.b_, coef[-1], rtol=1e-7, atol=1e-9)
    assert np.abs(m.W_ - W_true).max() > 1e-3  # the noise is large enough to matter


def test_procrustes_recovers_a_planted_orthogonal_map(rng):
    n, d = 100, 5
    Q, r = np.linalg.qr(rng.standard_normal((d, d)))
    Q = Q * np.sign(np.diag(r))
    t = rng.standard_normal(d)
    X = rng.standard_normal((n, d)) * np.linspace(2.0, 0.5, d) + 1.0
    m = ProcrustesMap().fit(X, X @ Q + t)
    np.testing.assert_allclose(m.W_, Q, atol=1e-10)
    np.testing.assert_allclose(m.b_, t, atol=1e-10)
    np.testing.assert_allclose(m.predict(X[:5]), X[:5] @ Q + t, atol=1e-10)
    # noisy: the rotation equals scipy's orthogonal_procrustes on the centred data
    Y = X @ Q + t + 0.2 * rng.standard_normal((n, d))
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    R_ref, _ = orthogonal_procrustes(Xc, Yc)
    np.testing.assert_allclose(ProcrustesMap().fit(X, Y).W_, R_ref, atol=1e-10)


def test_scaled_procrustes_scale_is_least_squares_when_d_in_exceeds_d_out(rng):
    """Found by sklearn's check_regressors_train (R² 0.16 where unscaled Procrustes had 0.75): with
    d_in > d_out the rotation projects X, so the least-squares scale divides by ‖X_cR‖², not ‖X_c‖²."""
    n, d_in, d_out, s_true = 300, 8, 3, 2.5
    R_true = np.linalg.qr(rng.standard_normal((d_in, d_out)))[0]  # orthonormal columns
    Z = rng.standard_normal((n, d_in))
    X = 3.0 * np.linalg.qr(Z - Z.mean(0))[0] + 1.0  # X_cᵀX_c = 9I, so the polar factor of X_cᵀY_c is R_true
    t = rng.standard_normal(d_out)
    m = ProcrustesMap(scale=True).fit(X, s_true * X @ R_true + t)
    assert m.scale_ == pytest.approx(s_true, rel=1e-10)
    np.testing.assert_allclose(m.W_, s_true * R_true, atol=1e-9)
    # noisy: s is the closed-form minimiser of ‖s·X_cR − Y_c‖ for the fitted R
    Y = s_true * X @ R_true + t + 0.5 * rng.standard_normal((n, d_out))
    m = ProcrustesMap(scale=True).fit(X, Y)
    R = ProcrustesMap().fit(X, Y).W_
    XR, Yc = (X - X.mean(0)) @ R, Y - Y.mean(0)
    assert m.scale_ == pytest.approx(float(np.sum(XR * Yc) / np.sum(XR * XR)), rel=1e-10)
    # d_in ≤ d_out (R has orthonormal rows): the denominator is ‖X_c‖², unchanged
    m = ProcrustesMap(scale=True).fit(Y, X)
    Yc, Xc = Y - Y.mean(0), X - X.mean(0)
    sv = np.linalg.svd(Yc.T @ Xc, compute_uv=False)
    assert m.scale_ == pytest.approx(sv.sum() / np.sum(Yc * Yc), rel=1e-12)


def test_lowrank_map_is_usable_through_the_sklearn_api(rng):
    X, Y, groups = _square_data(rng)
    m = LowRankCorrectionMap(rank=2, alphas=1e-8)
    fitted = clone(m).fit(X, Y, groups)
    assert np.linalg.matrix_rank(fitted.W_ - np.eye(4)) == 2
    assert clone(fitted).get_params() == m.get_params()


def test_identity_built_maps_on_square_data(rng):
    """What the generic checks cannot run on the maps built around the identity (they need d_in == d_out),
    checked on square data for every map: fit leaves read-only inputs untouched, is idempotent, does not
    depend on the order of the rows (given the prompt labels), and float32 input gives float32 output."""
    X, Y, groups = _square_data(rng)
    perm = rng.permutation(X.shape[0])
    for name, m in _every_map(rng).items():
        Xr, Yr = X.copy(), Y.copy()
        Xr.setflags(write=False)
        Yr.setflags(write=False)
        W1 = m.fit(Xr, Yr, groups).W_.copy()
        np.testing.assert_array_equal(Xr, X, err_msg=name)
        np.testing.assert_array_equal(Yr, Y, err_msg=name)
        np.testing.assert_array_equal(m.fit(X, Y, groups).W_, W1, err_msg=name)
        shuffled = clone(m).fit(X[perm], Y[perm], groups[perm])
        np.testing.assert_allclose(shuffled.W_, W1, rtol=1e-7, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(shuffled.predict(X), m.predict(X), rtol=1e-7, atol=1e-8, err_msg=name)
        out32 = m.predict(X.astype(np.float32))
        assert out32.dtype == np.float32, name
        np.testing.assert_allclose(out32, m.predict(X), rtol=1e-5, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(m.predict(X[:7]), m.predict(X)[:7], rtol=1e-12, atol=1e-12, err_msg=name)
