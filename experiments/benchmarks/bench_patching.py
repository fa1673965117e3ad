"""Benchmark mdiff's patching engines: naive (one full forward per condition) vs fast (decision position only).

Runs :func:`engines.run_bench` (``engines.py`` in this folder; workloads, timing and memory method in its
docstring) and prints :func:`engines.format_table`; exits 1 when the fast engine misses a target: speed-up on
the RQ4 grid (``--target-speedup``, default 30×), ``max |KL_fast − KL_naive|`` (1e-5) or peak memory (1.5× the
naive one). Usage::

    python experiments/benchmarks/bench_patching.py [--pair toy-lowrank --prompts N --layer L --repeats 3 --threads 1]
"""

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", default="toy-lowrank")
    p.add_argument("--prompts", type=int, default=None, help="prompt count (default: all of the pair's prompts)")
    p.add_argument("--layer", type=int, default=None, help="patched layer (default: n_layers - 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared 2-core box)")
    p.add_argument("--no-memory", action="store_true", help="skip the child-process peak-memory measurement")
    p.add_argument("--target-speedup", type=float, default=30.0)
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from engines import format_table, run_bench  # sibling module: these scripts run from their folder

    r = run_bench(args.pair, args.prompts, args.layer, args.repeats, args.batch_size, memory=not args.no_memory,
                  say=lambda msg, frac: print(f"[{frac:4.0%}] {msg}", file=sys.stderr))
    print(format_table(r))
    grid = r["workloads"][0]
    fails = []
    if grid["speedup"] < args.target_speedup:
        fails.append(f"RQ4 grid speed-up {grid['speedup']:.1f}× < {args.target_speedup:g}×")
    fails += [f"{w['workload']}: max |ΔKL| {w['max_kl_diff']:.1e} > 1e-5" for w in r["workloads"]
              if w["max_kl_diff"] > 1e-5]
    fails += [f"{w['workload']}: peak memory {w['peak_ratio']:.2f}× the naive one" for w in r["workloads"]
              if w["peak_ratio"] is not None and w["peak_ratio"] > 1.5]
    print("OK" if not fails else "FAIL: " + "; ".join(fails))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
