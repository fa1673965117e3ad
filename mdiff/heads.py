"""Per-head patching (RQ4): which attention heads carry the difference between two models.

Definitions: METHODS.md, section RQ4. A head's contribution at layer L is ``result_h = z_h · W_O[h]``
(``z`` is ``blocks.L.attn.hook_z``, ``[batch, pos, head, d_head]``, per *query* head, so GQA needs
nothing special); ``attn_out = Σ_h result_h (+ b_O)``. ``attn_out`` is a sum over heads, not a
concatenation: mdiff never slices it into "heads".

Two head sites, named in every output:

* ``result`` (default): the target head's whole contribution is replaced by the source head's
  ``z_h · W_O_source[h]``, so a fine-tune that changed ``W_O`` is seen;
* ``z``: only ``z_h`` is replaced; it then goes through the *target's* ``W_O``, so a change made only
  in ``W_O`` is invisible here (:func:`site_blindness` says so when it happens).

Sources: ``raw`` (the base model's heads) and ``mapped`` (per-head linear maps fit on train, base
``z_h`` → the target site's value for head h; a linear map of ``result_h = z_h · W_O[h]`` is a linear map
of ``z_h`` when ``W_O[h]`` has full rank, so the maps are fit on ``z_h`` coordinates, d_head wide).

``effect(S)`` is the mean over prompts of ``KL(P_target_clean ‖ P_target_patched)`` when only the heads
in S are patched; ``coverage(S) = effect(S) / effect(all heads)``, with a paired prompt-bootstrap CI.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mdiff import hooks as H
from mdiff import maps
from mdiff import schema as S
from mdiff.activations import gather_all
from mdiff.config import HEAD_SITES, SOURCES  # noqa: F401 (re-exported)
from mdiff.config import parse_head_counts as parse_ks  # noqa: F401 (re-exported)
from mdiff.errors import MdiffError
from mdiff.patching import HeadPatch, Patcher

EFFECT_FLOOR = 1e-10  # default tolerance; runs pass their measured one (mdiff.noise): at or below it, nothing to cover




# --------------------------------------------------------------------------- reading heads
def collect_z(model, ids: list[list[int]], positions: list[list[int]], pad_id: int, layers: Sequence[int],
              batch_size: int = 16) -> dict[int, Float[Tensor, "rows head d_head"]]:
    """``z`` of every query head at ``layers``, at the given positions (rows prompt-major), on the CPU."""
    names = {L: H.hook_name("z", L, model.cfg.n_layers) for L in layers}
    stop = max(layers) + 1
    got = gather_all(model, ids, positions, list(names.values()), pad_id, batch_size,
                     stop_at_layer=stop if stop < model.cfg.n_layers else None)
    return {L: got[n].float() for L, n in names.items()}


def W_O_of(model, layer: int) -> Float[Tensor, "head d_head d_model"]:
    """The layer's output weights per query head, detached, fp32, on the CPU."""
    return model.blocks[layer].attn.W_O.detach().float().cpu()


def site_values(z: Float[Tensor, "rows head d_head"], W_O: Float[Tensor, "head d_head d_model"] | None,
                site: str) -> Tensor:
    """What the site patches per head: ``z`` itself, or ``result_h = z_h · W_O[h]``."""
    if site not in HEAD_SITES:
        raise MdiffError(f"head site {site!r} is not one of {', '.join(HEAD_SITES)}")
    return z if site == "z" else H.head_results(z, W_O)


# --------------------------------------------------------------------------- per-head maps
class HeadMaps:
    """One linear map per query head, base ``z_h`` → the target site's value for head h (fit on train).

    ``solver`` is any :data:`mdiff.maps.MAP_NAMES` solver; estimators are kept in ``maps_``. The ridge
    solvers shrink toward a prior: ``ridge`` toward the *raw patch* (``prior`` = the base model's
    ``W_O[h]`` at the ``result`` site, the identity at the ``z`` site), so with few train rows a head map
    falls back to the raw source instead of to zero; ``ridge-zero`` toward 0. ``groups`` (the train prompt
    of each row) keep a prompt's positions in one cross-validation fold.
    """

    def __init__(self, solver: str = "ridge", random_state: int = 0):
        self.solver, self.random_state = solver, random_state

    def fit(self, z_base: Float[Tensor, "rows head d_head"], target: Float[Tensor, "rows head d"],
            groups: np.ndarray | None = None,
            prior: Float[Tensor, "head d_head d"] | None = None) -> "HeadMaps":
        if z_base.shape[:2] != target.shape[:2]:
            raise MdiffError(f"per-head maps need matching rows and heads: base z {tuple(z_base.shape)}, "
                             f"target {tuple(target.shape)}")
        if len(z_base) < 2:
            raise MdiffError("per-head maps need at least 2 training rows; add train prompts")
        n_heads, d_head, d = z_base.shape[1], z_base.shape[2], target.shape[2]
        if prior is not None and tuple(prior.shape) != (n_heads, d_head, d):
            raise MdiffError(f"the per-head prior must have shape (heads, d_head, d) = {(n_heads, d_head, d)}, "
                             f"got {tuple(prior.shape)}")
        self.maps_ = []
        for h in range(n_heads):
            kw = {}
            if self.solver == "ridge" and prior is not None:
                kw = {"prior": prior[h].double().numpy()}
            elif self.solver == "ridge" and d_head != d:
                raise MdiffError("the ridge head maps shrink toward the raw patch: pass the base W_O as prior "
                                 "for the result site, or set {option} to ridge-zero", option="map_solver")
            est = maps.make_map(self.solver, **kw)
            if "random_state" in est.get_params():
                est.set_params(random_state=self.random_state)
            self.maps_.append(est.fit(z_base[:, h].double().numpy(), target[:, h].double().numpy(), groups=groups))
        return self

    def fit_summaries(self) -> list[dict]:
        """:func:`mdiff.maps.fit_summary` of every head's map (rows, prompts, d, dof, λ)."""
        return [maps.fit_summary(m) for m in self.maps_]

    def transform(self, z_base: Float[Tensor, "rows head d_head"]) -> Float[Tensor, "rows head d"]:
        cols = [torch.from_numpy(np.asarray(m.transform(z_base[:, h].double().numpy()))).float()
                for h, m in enumerate(self.maps_)]
        return torch.stack(cols, dim=1)

    def score(self, z_base: Tensor, target: Tensor) -> np.ndarray:
        """R² per head."""
        return np.array([m.score(z_base[:, h].double().numpy(), target[:, h].double().numpy())
                         for h, m in enumerate(self.maps_)])


# --------------------------------------------------------------------------- head sets
def random_sets(n_heads: int, k: int, n_sets: int, seed: int) -> list[tuple[int, ...]]:
    """``n_sets`` distinct random k-subsets of the heads (all of them when there are fewer)."""
    total = math.comb(n_heads, k)
    if total <= n_sets:
        from itertools import combinations

        return [tuple(c) for c in combinations(range(n_heads), k)]
    rng = np.random.default_rng([seed, k])
    out: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    while len(out) < n_sets:
        s = tuple(sorted(int(h) for h in rng.choice(n_heads, size=k, replace=False)))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def head_effects(patcher: Patcher, layer: int, site: str, source: Tensor, sets: Sequence[Sequence[int]],
                 vocab_ids) -> np.ndarray:
    """Per-prompt KL for each head set: ``[set, prompt]`` (one batched engine call)."""
    return grouped_head_effects(patcher, [(layer, site, source, sets)], vocab_ids)[0]


def grouped_head_effects(patcher: Patcher, groups: Sequence[tuple[int, str, Tensor, Sequence[Sequence[int]]]],
                         vocab_ids) -> list[np.ndarray]:
    """:func:`head_effects` for many ``(layer, site, source, sets)`` groups in **one** engine call (the engine
    runs its clean pass once per call); one ``[set, prompt]`` array per group."""
    conds = [HeadPatch(L, tuple(int(h) for h in hs), site, src) for L, site, src, sets in groups for hs in sets]
    kl = patcher.kl(conds, vocab_ids)
    bounds = np.cumsum([0] + [len(g[3]) for g in groups])
    return [kl[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def rank_heads(single: np.ndarray) -> list[int]:
    """Heads by mean single-head effect, largest first (ties: lower index first)."""
    m = np.asarray(single).mean(1)
    return [int(h) for h in sorted(range(len(m)), key=lambda h: (-m[h], h))]


TOPK_FREQ = S.TOPK_FREQ
"""Metric name (:data:`mdiff.schema.TOPK_FREQ`): share of select-split resamples whose top-k contains the head."""
STABLE_FREQ = 0.9
"""A top-k set is *stable* when each of its heads is in the top-k in at least this share of prompt resamples."""


@dataclass
class RankStability:
    """How often each head lands in the top-k when the ranking prompts are resampled (bootstrap).

    ``head_freq[k][h]``: share of resamples whose top-k contains head h; ``set_freq[k]``: share whose top-k
    is exactly the reported set; ``stable[k]``: every reported member has ``head_freq ≥ STABLE_FREQ``.
    """

    head_freq: dict[int, list[float]]
    set_freq: dict[int, float]
    stable: dict[int, bool]
    n_resamples: int


def rank_stability(single: np.ndarray, ks: Sequence[int], idx: np.ndarray) -> RankStability:
    """Top-k membership frequencies of :func:`rank_heads` over prompt resamples ``idx`` ``[n_boot, n_prompts]``.

    ``single`` is ``[head, prompt]`` (per-prompt single-head effects on the ranking split). Each resample ranks
    the heads by their resampled means with the same tie rule as :func:`rank_heads` (lower index first).
    """
    x = np.asarray(single, np.float64)
    n_heads = x.shape[0]
    means = x[:, idx].mean(-1).T                                   # [n_boot, head]
    order = np.lexsort((np.broadcast_to(np.arange(n_heads), means.shape), -means), axis=-1)  # [n_boot, head]
    ranking = rank_heads(x)
    rank_of = np.empty_like(order)
    np.put_along_axis(rank_of, order, np.arange(n_heads)[None, :].repeat(len(means), 0), axis=-1)
    head_freq, set_freq, stable = {}, {}, {}
    for k in ks:
        inside = rank_of < k                                         # [n_boot, head]
        freq = inside.mean(0)
        top = sorted(ranking[:k])
        head_freq[int(k)] = [float(f) for f in freq]
        set_freq[int(k)] = float(inside[:, top].all(-1).mean())
        stable[int(k)] = bool(all(freq[h] >= STABLE_FREQ for h in top))
    return RankStability(head_freq, set_freq, stable, len(means))


def kv_group_of(heads: Sequence[int], n_heads: int, n_kv: int | None) -> int | None:
    """The KV group (GQA) whose query heads are exactly ``heads``, else None.

    Llama/Mistral-style GQA shares KV head ``g`` among query heads ``g·G .. g·G + G − 1``, ``G = n_heads / n_kv``.
    """
    if not n_kv or n_kv >= n_heads or n_heads % n_kv:
        return None
    G = n_heads // n_kv
    hs = sorted(int(h) for h in heads)
    if len(hs) != G or hs[0] % G or hs != list(range(hs[0], hs[0] + G)):
        return None
    return hs[0] // G


@dataclass
class Coverage:
    value: float
    ci_low: float
    ci_high: float


def coverage(effect_s: np.ndarray, effect_all: np.ndarray, idx: np.ndarray, ci: float = 0.95,
             floor: float = EFFECT_FLOOR) -> Coverage:
    """``mean(effect_S) / mean(effect_all)`` with a paired prompt-bootstrap CI (NaN if effect_all ≤ ``floor``,
    the run's KL noise tolerance)."""
    es, ea = np.asarray(effect_s, np.float64), np.asarray(effect_all, np.float64)
    if ea.mean() <= floor:
        return Coverage(float("nan"), float("nan"), float("nan"))
    sb, ab = es[idx].mean(1), ea[idx].mean(1)
    ok = ab > floor * 1e-3
    lo, hi = np.quantile(sb[ok] / ab[ok], [(1 - ci) / 2, (1 + ci) / 2])
    return Coverage(float(es.mean() / ea.mean()), float(lo), float(hi))


def null_percentile(value: float, null: Sequence[float]) -> float:
    """Percent of the random-k null at or below ``value`` (100: above every random set)."""
    null = np.asarray([v for v in null if np.isfinite(v)], np.float64)
    if not np.isfinite(value) or len(null) == 0:
        return float("nan")
    return float(100.0 * np.mean(null <= value))


def site_blindness(effect_all: dict[str, float], floor: float = EFFECT_FLOOR) -> str | None:
    """A sentence when the ``z`` site sees much less than the ``result`` site (a change in W_O), else None."""
    r, z = effect_all.get("result"), effect_all.get("z")
    if r is None or z is None or not np.isfinite(r) or r <= floor:
        return None
    if z < 0.1 * r:
        z = max(z, 0.0)  # a KL of -1e-9 is float round-off
        return (f"the z site sees only {100 * z / r:.1f}% of the result site's all-heads effect "
                f"({z:.3g} vs {r:.3g} nats): the difference here is in W_O (or b_O), which z patching "
                "cannot see by construction; use the result site for this layer")
    return None
