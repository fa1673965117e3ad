"""Benchmark mdiff's linear maps: ridge over a λ grid and orthogonal Procrustes at d_model = 4096.

Synthetic residual-stream-like data (PERF.md §2): a decaying spectrum (σ_i ∝ 1/√(1+i)), a large
common mean, 4 outlier dimensions around 30, and ``y = x W_true + b + noise`` with
``W_true = 0.9 I + 0.1 G/√d`` (G Gaussian). Timed (``time.perf_counter``, one run each unless
``--reps``):

* ``RidgeMap`` with a ``--lambdas`` log grid, ``--n`` training rows and ``--holdout`` held-out rows
  (the default 4000 + 1000 rows, d = 4096 → 4096), target ``--ridge-target`` seconds. Checked
  against a direct float64 solve ``(X_cᵀX_c + λI)⁻¹X_cᵀY_c`` at the chosen λ on all rows, and its
  hold-out MSE at that λ against the training-fold direct solve.
* ``ProcrustesMap`` on ``--procrustes-n`` rows (default 5000), target ``--procrustes-target`` s.
* optionally (``--float64``) the all-float64 ridge, and (unless ``--skip-sklearn``) scikit-learn's
  ``RidgeCV`` against ``RidgeMap`` on a smaller problem (``--sklearn-n`` × ``--sklearn-d``).

Prints a table (seconds, target, pass/fail, accuracy) and exits 1 when a target is missed. Usage::

    python experiments/benchmarks/bench_maps.py [--n 4000 --d 4096 --holdout 1000 --lambdas 20 --threads 2 --skip-sklearn]
"""

import argparse
import os
import sys

import numpy as np
from _timing import blas_threads, median_time  # sibling module: these scripts run from their folder

from mdiff.maps import DEFAULT_RELATIVE_ALPHAS, ProcrustesMap, RidgeMap


def make_data(n: int, d: int, seed: int, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sigma = (1.0 / np.sqrt(1.0 + np.arange(d))).astype(np.float32)
    mean = (8.0 * rng.standard_normal(d)).astype(np.float32)
    X = rng.standard_normal((n, d), dtype=np.float32) * sigma + mean
    X[:, :4] += np.float32(30.0) * (1.0 + 0.05 * rng.standard_normal((n, 4), dtype=np.float32))
    W_true = rng.standard_normal((d, d), dtype=np.float32) * np.float32(0.1 / np.sqrt(d))
    W_true[np.diag_indices(d)] += np.float32(0.9)
    Y = X @ W_true + rng.standard_normal(d, dtype=np.float32)
    Y += np.float32(0.3) * rng.standard_normal((n, d), dtype=np.float32) * sigma
    return X.astype(dtype, copy=False), Y.astype(dtype, copy=False)


def absolute_grid(X: np.ndarray, n_train: int, n_lambdas: int) -> np.ndarray:
    """RidgeMap's default log range (relative to the mean eigenvalue of X_cᵀX_c) with ``n_lambdas`` values."""
    lo, hi = np.log10(DEFAULT_RELATIVE_ALPHAS[[0, -1]])
    Xc = X[:n_train].astype(np.float64) - X[:n_train].mean(0, dtype=np.float64)
    return np.logspace(lo, hi, n_lambdas) * float(np.vdot(Xc, Xc)) / X.shape[1]


def direct_ridge(X: np.ndarray, Y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    Xc = X.astype(np.float64) - X.mean(0, dtype=np.float64)
    Yc = Y.astype(np.float64) - Y.mean(0, dtype=np.float64)
    G = Xc.T @ Xc
    G[np.diag_indices_from(G)] += lam
    W = np.linalg.solve(G, Xc.T @ Yc)
    return W, Y.mean(0, dtype=np.float64) - X.mean(0, dtype=np.float64) @ W


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000, help="ridge training rows")
    p.add_argument("--d", type=int, default=4096, help="features (d_model), in and out")
    p.add_argument("--holdout", type=int, default=1000, help="ridge hold-out rows (for choosing λ)")
    p.add_argument("--lambdas", type=int, default=20, help="size of the λ grid")
    p.add_argument("--procrustes-n", type=int, default=5000, help="Procrustes rows")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="activation dtype")
    p.add_argument("--reps", type=int, default=1, help="timed runs per measurement (median)")
    p.add_argument("--threads", type=int, default=None, help="limit BLAS/OpenMP/torch threads (default: as set)")
    p.add_argument("--float64", action="store_true", help="also time RidgeMap(dtype='float64')")
    p.add_argument("--skip-sklearn", action="store_true", help="skip the scikit-learn RidgeCV comparison")
    p.add_argument("--sklearn-n", type=int, default=2000, help="rows for the RidgeCV comparison")
    p.add_argument("--sklearn-d", type=int, default=1024, help="features for the RidgeCV comparison")
    p.add_argument("--ridge-target", type=float, default=20.0, help="fail if the ridge fit takes longer (s)")
    p.add_argument("--procrustes-target", type=float, default=15.0, help="fail if Procrustes takes longer (s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads is not None:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        with threadpool_limits(limits=args.threads):
            return run(args)
    return run(args)


def run(args: argparse.Namespace) -> int:
    n_all = args.n + args.holdout
    X, Y = make_data(max(n_all, args.procrustes_n), args.d, args.seed, args.dtype)
    Xr, Yr = X[:n_all], Y[:n_all]
    # None = RidgeMap's default 20-λ grid (relative to the training fold's scale)
    alphas = None if args.lambdas == DEFAULT_RELATIVE_ALPHAS.size else absolute_grid(Xr, args.n, args.lambdas)
    rows: list[tuple[str, float, float | None, str]] = []
    ok = True

    small_x, small_y = make_data(300, 64, 1, args.dtype)  # warm-up (thread pools, page faults)
    RidgeMap().fit(small_x, small_y)
    ProcrustesMap().fit(small_x, small_y)

    # ---- timed fits first (back to back), checks afterwards --------------------------------------
    def fit_ridge(dtype: str) -> RidgeMap:
        return RidgeMap(alphas, holdout=args.holdout, dtype=dtype).fit(Xr, Yr)

    load_before = os.getloadavg()[0]
    t_ridge, ridge = median_time(lambda: fit_ridge("auto"), args.reps)
    Xp, Yp = X[: args.procrustes_n], Y[: args.procrustes_n]
    t_proc, proc = median_time(lambda: ProcrustesMap().fit(Xp, Yp), args.reps)
    load_after = os.getloadavg()[0]
    assert isinstance(ridge, RidgeMap) and isinstance(proc, ProcrustesMap)

    lam = ridge.alpha_
    j = int(np.flatnonzero(ridge.alphas_ == lam)[0])
    W_dir, _ = direct_ridge(Xr, Yr, lam)
    w_err = rel(ridge.W_, W_dir)
    del W_dir
    val = ridge.holdout_rows_
    train = np.setdiff1d(np.arange(n_all), val)
    W_tr, b_tr = direct_ridge(Xr[train], Yr[train], lam)
    mse_dir = float(np.square(Yr[val] - (Xr[val].astype(np.float64) @ W_tr + b_tr)).mean())
    del W_tr
    sel = "float32 selection + float64 solve" if Xr.dtype == np.float32 and Xr.size >= 1 << 20 else "float64"
    passed = t_ridge <= args.ridge_target
    ok &= passed
    rows.append((
        f"RidgeMap {args.n}+{args.holdout}x{args.d}->{args.d}, {ridge.alphas_.size} lambdas ({sel})",
        t_ridge, args.ridge_target,
        f"{'PASS' if passed else 'FAIL'} | lambda index {j}; W vs direct fp64 solve {w_err:.1e}; "
        f"hold-out MSE vs direct {abs(ridge.holdout_mse_[j] - mse_dir) / mse_dir:.1e}",
    ))
    orth = float(np.abs(proc.W_.T @ proc.W_ - np.eye(args.d)).max())
    passed = t_proc <= args.procrustes_target
    ok &= passed
    rows.append((
        f"ProcrustesMap {args.procrustes_n}x{args.d}->{args.d}", t_proc, args.procrustes_target,
        f"{'PASS' if passed else 'FAIL'} | max |WtW - I| {orth:.1e}; R2 {proc.score(Xp[:1000], Yp[:1000]):.4f}",
    ))
    if args.float64:
        t64, ridge64 = median_time(lambda: fit_ridge("float64"), args.reps)
        assert isinstance(ridge64, RidgeMap)
        j64 = int(np.flatnonzero(ridge64.alphas_ == ridge64.alpha_)[0])
        mse_gap = float(np.max(np.abs(ridge.holdout_mse_ - ridge64.holdout_mse_) / ridge64.holdout_mse_))
        rows.append((
            "RidgeMap same, dtype='float64' (all float64)", t64, None,
            f"info | lambda index {j64}; max rel. hold-out MSE diff vs float32 selection {mse_gap:.1e}",
        ))

    # ---- scikit-learn RidgeCV on a smaller problem ---------------------------------------------
    if not args.skip_sklearn:
        from sklearn.linear_model import RidgeCV

        ns, ds = args.sklearn_n, args.sklearn_d
        Xs, Ys = make_data(ns, ds, args.seed + 1, args.dtype)
        grid = absolute_grid(Xs, int(0.8 * ns), args.lambdas)
        t_sk, sk = median_time(lambda: RidgeCV(alphas=grid).fit(Xs, Ys), 1)
        t_mine, mine = median_time(lambda: RidgeMap(grid, holdout=0.2).fit(Xs, Ys), 1)
        rows.append((f"sklearn RidgeCV {ns}x{ds}->{ds}, {grid.size} lambdas (LOO)", t_sk, None,
                     f"info | alpha {sk.alpha_:.3g}"))
        rows.append(("RidgeMap same problem (hold-out 20%)", t_mine, None,
                     f"info | {t_sk / t_mine:.1f}x faster; alpha {mine.alpha_:.3g}"))

    print(
        f"mdiff maps benchmark: d={args.d} dtype={args.dtype} reps={args.reps} threads: {blas_threads(include_torch=True)}; "
        f"1-min load average {load_before:.2f} before / {load_after:.2f} after the timed fits"
    )
    width = max(len(r[0]) for r in rows)
    print(f"| {'step':<{width}} | {'seconds':>8} | {'target':>7} | result")
    print(f"|{'-' * (width + 2)}|{'-' * 10}|{'-' * 9}|{'-' * 60}")
    for name, secs, target, note in rows:
        tgt = f"{target:.0f}" if target is not None else "-"
        print(f"| {name:<{width}} | {secs:>8.2f} | {tgt:>7} | {note}")
    print("OK: all targets met" if ok else "FAIL: a target was missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
