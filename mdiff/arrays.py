"""Input checks shared by the numeric modules (:mod:`mdiff.cka`, :mod:`mdiff.maps`)."""

from collections.abc import Hashable
from typing import Any

import numpy as np
import torch

from mdiff.errors import MdiffError


def as_float_array(a: Any, name: str, ndim: int | None = 2, purpose: str = "use") -> np.ndarray:
    """Validate a feature matrix; return it as a float32/float64 numpy array (no copy if possible)."""
    if isinstance(a, torch.Tensor):
        t = a.detach()
        if t.is_complex():
            raise MdiffError(f"{name} is complex ({t.dtype}); pass real-valued activations")
        if t.dtype not in (torch.float32, torch.float64):
            t = t.to(torch.float32) if t.is_floating_point() else t.to(torch.float64)
        a = t.cpu().numpy()
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as err:
        raise MdiffError(f"{name} is not an array ({type(a).__name__}: {err}); pass a numpy array or tensor") from None
    if arr.dtype.kind not in "fiub":
        raise MdiffError(f"{name} has dtype {arr.dtype}; pass a real-valued numeric array or tensor")
    if ndim is not None and arr.ndim != ndim:
        raise MdiffError(
            f"{name} must be 2-D (n_samples, d) but has shape {arr.shape}; "
            "flatten the batch and position axes into one sample axis first"
        )
    if arr.ndim == 0 or arr.shape[-1] == 0:
        raise MdiffError(f"{name} has no features (shape {arr.shape}); pass at least one feature column")
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    _check_finite(arr, name, purpose)
    return arr


def _check_finite(arr: np.ndarray, name: str, purpose: str) -> None:
    if not np.isfinite(arr).all():
        bad = ~np.isfinite(arr)
        n_bad = int(bad.sum())
        rows = int(bad.reshape(-1, arr.shape[-1]).any(axis=1).sum())
        n_rows = int(np.prod(arr.shape[:-1])) if arr.ndim > 1 else 1
        raise MdiffError(
            f"{name} contains {n_bad} NaN/inf entries (in {rows} of {n_rows} rows); "
            f"drop or repair those rows (in both models) before {purpose}"
        )


def factorize_groups(groups: Any, n: int | None) -> tuple[np.ndarray, int]:
    """Map prompt labels to codes 0..G-1; ``None`` means every row is its own prompt."""
    if groups is None:
        if n is None:
            raise MdiffError("pass groups (one prompt label per row) or n (the number of rows)")
        return np.arange(n, dtype=np.int64), int(n)
    if isinstance(groups, torch.Tensor):
        groups = groups.detach().cpu().numpy()
    g = np.asarray(groups)
    if g.ndim != 1:
        raise MdiffError(f"groups must be 1-D (one prompt label per row) but has shape {g.shape}")
    if n is not None and g.shape[0] != n:
        raise MdiffError(f"groups has length {g.shape[0]} but X has {n} rows; pass one prompt label per row")
    if g.shape[0] == 0:
        raise MdiffError("groups is empty; pass one prompt label per row")
    try:
        _, inverse = np.unique(g, return_inverse=True)
    except TypeError:  # unorderable mix of labels: number them by first appearance
        codes: dict[Hashable, int] = {}
        inverse = np.fromiter((codes.setdefault(v, len(codes)) for v in g.tolist()), dtype=np.int64)
    inverse = np.asarray(inverse, dtype=np.int64).reshape(-1)
    return inverse, int(inverse.max()) + 1


def as_float_pair(X: Any, Y: Any, what: str, purpose: str, min_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Validate paired feature matrices (same samples, in the same order, for both models; ≥ ``min_n`` rows)."""
    x = as_float_array(X, "X", 2, purpose=purpose)
    y = as_float_array(Y, "Y", 2, purpose=purpose)
    if x.shape[0] != y.shape[0]:
        raise MdiffError(
            f"X has {x.shape[0]} rows but Y has {y.shape[0]}; {what} needs the same samples "
            "(prompt positions) in the same order for both models"
        )
    if x.shape[0] < min_n:
        raise MdiffError(f"{what} needs at least {min_n} samples but got {x.shape[0]}; use more prompts")
    return x, y
