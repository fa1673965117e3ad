"""How many CPU threads the numerics use: torch's intra-op pool *and* the BLAS/OpenMP pools that numpy, scipy
and scikit-learn call (through threadpoolctl).

Both matter for reproducibility: OpenBLAS splits float64 LAPACK work (eigh, SVD, solves) differently with
another thread count, which changes the last bits of a map's weights. ``OMP_NUM_THREADS`` does not help once
numpy is imported (its pool is sized at import), so a command or a unit of work sets the count here; a study run
with the same thread count gives the same bytes on any executor.
"""


def set_threads(n: int) -> None:
    """Use ``n`` threads in torch and in every BLAS/OpenMP pool loaded now (numpy's, scipy's, torch's)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(limits=n)
