"""Benchmark mdiff's CKA: point estimate, batched prompt bootstrap, and the naive per-resample loop.

Synthetic residual-stream-like data (PERF.md §2): a decaying spectrum (σ_i ∝ 1/√(1+i)), a large
common mean, 4 outlier dimensions around 30, prompt-level correlation when there are several
positions per prompt, and tuned = 0.9·base + noise. Times are medians of ``--reps`` runs
(``time.perf_counter``). The naive bootstrap (gather ``X[idx], Y[idx]`` and recompute CKA) is run
for ``--naive`` resamples that share the batched run's weights, then extrapolated to B.

Exit status is 1 when the batched bootstrap's median time exceeds ``--target-seconds``, so the
script doubles as a performance check. Usage::

    python experiments/benchmarks/bench_cka.py [--n 2000 --d 4096 --boot 1000 --positions-per-prompt 1]
"""

import argparse
import statistics
import sys
import time

import numpy as np
from _timing import blas_threads, median_time  # sibling module: these scripts run from their folder

from mdiff.cka import (
    bootstrap_cka,
    debiased_cka,
    jackknife_debiased_cka,
    linear_cka,
    prompt_bootstrap_weights,
)


def make_data(
    n: int, d: int, positions_per_prompt: int, dtype: np.dtype, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_prompts = -(-n // positions_per_prompt)
    groups = np.repeat(np.arange(n_prompts), positions_per_prompt)[:n]
    sigma = (1.0 / np.sqrt(1.0 + np.arange(d))).astype(np.float32)
    within = rng.standard_normal((n, d), dtype=np.float32)
    if positions_per_prompt > 1:  # positions of one prompt share a prompt-level component
        within = 0.6 * rng.standard_normal((n_prompts, d), dtype=np.float32)[groups] + 0.8 * within
    mean = (8.0 * rng.standard_normal(d)).astype(np.float32)
    base = within * sigma + mean
    base[:, :4] += np.float32(30.0) * (1.0 + 0.05 * rng.standard_normal((n, 4), dtype=np.float32))
    tuned = np.float32(0.9) * base + np.float32(0.3) * rng.standard_normal((n, d), dtype=np.float32) * sigma
    return base.astype(dtype), tuned.astype(dtype), groups


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="rows (prompt positions)")
    p.add_argument("--d", type=int, default=4096, help="features (d_model)")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples B")
    p.add_argument("--positions-per-prompt", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--reps", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--naive", type=int, default=5, help="naive resamples to time and compare")
    p.add_argument("--skip-jackknife", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="limit BLAS/OpenMP threads (default: as set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-seconds", type=float, default=2.0, help="fail if the bootstrap takes longer")
    args = p.parse_args(argv)
    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=args.threads):
            return run(args)
    return run(args)


def run(args: argparse.Namespace) -> int:

    dtype = np.dtype(args.dtype)
    X, Y, groups = make_data(args.n, args.d, args.positions_per_prompt, dtype, args.seed)
    n_prompts = int(groups.max()) + 1
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)

    linear_cka(X[:256], Y[:256])  # warm-up (BLAS thread pools, page faults)
    rows: list[tuple[str, float, str, str]] = []

    t_point, value = median_time(lambda: linear_cka(X, Y), args.reps)
    exact = linear_cka(X64, Y64)
    rows.append(("linear CKA, point estimate", t_point, "", f"{abs(value - exact):.1e} vs float64"))

    weights = prompt_bootstrap_weights(groups, n_boot=args.boot, seed=args.seed)
    t_boot, res = median_time(
        lambda: bootstrap_cka(X, Y, groups=groups, n_boot=args.boot, seed=args.seed), args.reps
    )

    k = min(args.naive, args.boot)
    row_ids = np.arange(args.n)
    naive_times, naive_vals, exact_vals = [], [], []
    for b in range(k):
        idx = np.repeat(row_ids, weights[b])
        t0 = time.perf_counter()
        naive_vals.append(linear_cka(X[idx], Y[idx]))
        naive_times.append(time.perf_counter() - t0)
        exact_vals.append(linear_cka(X64[idx], Y64[idx]))
    t_naive = statistics.median(naive_times) * args.boot
    diff_naive = float(np.max(np.abs(res.samples[:k] - np.array(naive_vals))))
    diff_exact = float(np.max(np.abs(res.samples[:k] - np.array(exact_vals))))
    rows.append(
        (
            f"bootstrap B={args.boot}, batched (Grams + 5 products)",
            t_boot,
            f"{t_naive / t_boot:.0f}x",
            f"{diff_naive:.1e} vs naive, {diff_exact:.1e} vs float64",
        )
    )
    rows.append((f"bootstrap B={args.boot}, naive loop (extrapolated from {k})", t_naive, "1x", "-"))

    if not args.skip_jackknife:
        t_deb, _ = median_time(lambda: debiased_cka(X, Y), args.reps)
        rows.append(("debiased CKA, point estimate (float64)", t_deb, "", ""))
        t_jk, jk = median_time(lambda: jackknife_debiased_cka(X, Y, groups=groups), args.reps)
        rows.append((f"debiased CKA + delete-one-prompt jackknife ({n_prompts} prompts)", t_jk, "", ""))

    print(
        f"mdiff CKA benchmark: n={args.n} d={args.d} B={args.boot} positions/prompt={args.positions_per_prompt} "
        f"({n_prompts} prompts) dtype={args.dtype} reps={args.reps} threads: {blas_threads()}"
    )
    print(
        f"CKA = {res.value:.6f}, {int(res.ci * 100)}% CI [{res.ci_low:.6f}, {res.ci_high:.6f}]"
        + ("" if args.skip_jackknife else f"; debiased = {jk.value:.6f} [{jk.ci_low:.6f}, {jk.ci_high:.6f}]")
    )
    width = max(len(r[0]) for r in rows)
    print(f"| {'step':<{width}} | {'seconds':>9} | {'speed-up':>8} | max abs diff")
    print(f"|{'-' * (width + 2)}|{'-' * 11}|{'-' * 10}|{'-' * 14}")
    for name, secs, speed, diff in rows:
        print(f"| {name:<{width}} | {secs:>9.3f} | {speed:>8} | {diff}")
    ok = t_boot <= args.target_seconds
    print(f"{'OK' if ok else 'FAIL'}: bootstrap {t_boot:.3f} s vs target {args.target_seconds:.3f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
