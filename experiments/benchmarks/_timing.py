"""Timing helpers shared by the benchmark scripts (median of repeated runs, thread report)."""

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], reps: int) -> tuple[float, object]:
    """Median wall time of ``reps`` calls of ``fn`` and the last result."""
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def blas_threads(include_torch: bool = False) -> str:
    """The BLAS/OpenMP thread counts in effect (and torch's, if asked)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover
        return "unknown"
    info = ", ".join(f"{i['internal_api']}={i['num_threads']}" for i in threadpool_info()) or "unknown"
    if include_torch:
        import torch

        info += f", torch={torch.get_num_threads()}"
    return info
