"""How small is zero? KL tolerances from a run's own measured noise floor, not from a fixed constant.

Every KL mdiff reports is computed in float64 from the model's logits (:func:`mdiff.align.restrict_logprobs`),
so identical logits give exactly 0. Activations that differ only by rounding still give a small positive
KL: in float32 about 1e-14 nats, in bf16 about 1e-5 (batches of other shapes round differently in the last
bits). A fixed threshold such as 1e-6 is therefore far too loose in float32 and too tight in bf16. Each run
measures its own floor instead:

* ``rounding``: at every site the run patches, the target's own activation with one rounding error added
  (each element times ``1 + δ``, ``|δ| ≤ u``, the dtype's unit round-off;
  :meth:`mdiff.patching.Patcher.rounding_conditions`): what one operation's worth of arithmetic error at
  that site does to the output;
* ``roundtrip`` (RQ1): the target patched with its *own* activations read back from the activation store
  (collected in other batches): the noise a stored source actually carries. It must stay within the
  rounding floor's tolerance, else the store does not hold this model's activations.

The tolerance for every "KL ≈ 0" decision (first divergent layer, control layers, nothing-to-drop,
nothing-to-cover) is ``max(NOISE_FACTOR × floor, KL_ABS_FLOOR)`` with ``floor`` the largest per-prompt
KL of those measurements: a mean KL under it is indistinguishable from arithmetic noise, and is
reported as such. The floor, the factor and the tolerance are recorded in each run's ``summary.json``.
"""

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np

NOISE_FACTOR = 10.0
"""A KL must exceed the largest arithmetic-only KL seen in the run by this factor to count as an effect."""
KL_ABS_FLOOR = 1e-10
"""The smallest tolerance (nats): float64 round-off of a KL over a 128k vocabulary stays far below it."""


def _max(values: Iterable[float]) -> float:
    v = np.asarray(list(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.max()) if v.size else 0.0


@dataclasses.dataclass
class NoiseFloor:
    """The arithmetic-only KLs a run measured, and the tolerance derived from them."""

    dtype: str
    engine: str
    rounding_max: float
    rounding_mean: float
    roundtrip_max: float | None = None

    @classmethod
    def measure(cls, dtype: str, engine: str, rounding: Iterable[np.ndarray],
                roundtrip: Iterable[np.ndarray] | None = None) -> "NoiseFloor":
        parts = [np.asarray(r, np.float64).ravel() for r in rounding]
        allr = np.concatenate(parts) if parts else np.zeros(0)
        rt = None
        if roundtrip is not None:
            rts = [np.asarray(r, np.float64).ravel() for r in roundtrip]
            rt = _max(np.concatenate(rts)) if rts else 0.0
        return cls(dtype, engine, _max(allr), float(np.clip(allr, 0, None).mean()) if allr.size else 0.0, rt)

    @property
    def floor(self) -> float:
        """The largest per-prompt KL that arithmetic alone produced in this run."""
        return max(self.rounding_max, self.roundtrip_max or 0.0, 0.0)

    @property
    def tolerance(self) -> float:
        return max(NOISE_FACTOR * self.floor, KL_ABS_FLOOR)

    @property
    def roundtrip_tolerance(self) -> float:
        """What a store round trip may cost: the same order as one rounding error (``NOISE_FACTOR`` × it)."""
        return max(NOISE_FACTOR * self.rounding_max, KL_ABS_FLOOR)

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "engine": self.engine, "rounding_max_kl": self.rounding_max,
                "rounding_mean_kl": self.rounding_mean, "store_roundtrip_max_kl": self.roundtrip_max,
                "floor": self.floor, "factor": NOISE_FACTOR, "abs_floor": KL_ABS_FLOOR, "kl_tolerance": self.tolerance,
                "rule": "a mean KL <= kl_tolerance = max(factor x floor, abs_floor) is reported as indistinguishable "
                        "from arithmetic noise; floor = the largest per-prompt KL of patching the target's own "
                        "activation with one rounding error of its dtype at each patched site (and, in RQ1, with its "
                        "own activations read back from the activation store)"}


def is_noise(mean_kl: float, tolerance: float) -> bool:
    """True when a mean KL cannot be told apart from arithmetic noise (NaN counts as noise)."""
    return bool(not np.isfinite(mean_kl) or mean_kl <= tolerance)
