"""The study's plan: which step runs with which settings, chosen from the results that exist (no driver).

:func:`plan_steps` resolves each step's config from the earlier steps' results under ``OUT/<pair>/`` (see
:mod:`mdiff.study` for the plan itself); :func:`step_done` says whether a step's folder already holds exactly that
run; :func:`run_step` runs one step. :mod:`mdiff.units` turns the plan into units of work and :mod:`mdiff.study`
drives them; this module imports neither.
"""


import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from mdiff import schema as S
from mdiff.config import StudyConfig  # noqa: F401 (re-exported)
from mdiff.errors import MdiffError
from mdiff.io import pair_identity
from mdiff.pairs import PairSpec
from mdiff.positions import DEFAULT_FIT_POSITIONS, parse_positions

STEPS = ("rq1", "rq2", "rq3", "rq4")


def _norm(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


RESULT_FILES = ("config.json", "metrics.csv", "summary.json")
"""The files every step writes and the later steps (and the report) read: a step folder without one is not done."""


def step_done(out: Path, pair: str, rq: str, settings: dict, identity: str | None = None) -> bool:
    """True when ``OUT/<pair>/<rq>/`` holds a finished, complete run (:data:`RESULT_FILES`) with exactly these
    settings and, when given, of the same pair identity (:func:`mdiff.io.pair_identity`: models, weights, dtype,
    prompt set...). Whoever wrote it (a study's unit, or the RQ's own command) does not matter."""
    d = Path(out) / pair / rq
    cfg = d / "config.json"
    if not all((d / f).is_file() for f in RESULT_FILES):
        return False
    try:
        c = json.loads(cfg.read_text())
    except ValueError:
        return False
    if c.get("settings") != _norm(settings):
        return False
    return identity is None or c.get("pair_identity") == identity


def _summary(out: Path, pair: str, rq: str) -> dict:
    f = out / pair / rq / "summary.json"
    try:
        return json.loads(f.read_text())
    except (ValueError, OSError) as e:
        raise MdiffError(f"{f} cannot be read ({type(e).__name__}); move {f.parent} away and run the study "
                         f"again") from None


def _rq1_tolerance(out: Path, pair: str) -> float:
    """RQ1's KL noise tolerance (measured from its own noise floor; :mod:`mdiff.noise`)."""
    from mdiff.noise import KL_ABS_FLOOR

    try:
        return float(_summary(out, pair, "rq1").get("noise", {}).get("kl_tolerance", KL_ABS_FLOOR))
    except (OSError, ValueError):
        return KL_ABS_FLOOR


def best_attention_layer(out: Path, pair: str, exclude: int | None = None) -> int | None:
    """The layer with the largest base→tuned cross-patch KL at attn_out in RQ1's metrics (None when every
    attn_out patch is within RQ1's noise tolerance)."""

    m = pd.read_csv(out / pair / "rq1" / "metrics.csv")
    a = m[(m.metric == S.PATCH_KL) & (m.hook == "attn_out") & (m.condition == S.CROSS_B2T)]
    if exclude is not None and (a.layer != exclude).any():
        a = a[a.layer != exclude]
    if not len(a) or not (a.value > _rq1_tolerance(out, pair)).any():
        return None
    return int(a.loc[a.value.idxmax(), "layer"])


def _quietest_attention_layer(out: Path, pair: str, exclude: int) -> int:
    """The layer (other than ``exclude``) whose attn_out cross-patch changes the output least."""

    m = pd.read_csv(out / pair / "rq1" / "metrics.csv")
    a = m[(m.metric == S.PATCH_KL) & (m.hook == "attn_out") & (m.condition == S.CROSS_B2T) & (m.layer != exclude)]
    return int(a.loc[a.value.idxmin(), "layer"]) if len(a) else exclude


def rq3_fit_positions(rq2_solver: str, fitpos, seed: int):
    """RQ3 fits on the rows RQ2's winner was fit on: the decision position alone for a ``…@decision`` winner."""
    from mdiff.rq2 import ROW_SEP

    return parse_positions("last", seed=seed) if rq2_solver.endswith(ROW_SEP + "decision") else fitpos


def plan_steps(spec: PairSpec, info, scfg: "StudyConfig", out: Path, identity: str | None = None) -> list[dict]:
    """Each step's name, config (or None with the reason it cannot be resolved yet) and settings."""
    from mdiff.rq1 import RQ1Config
    from mdiff.rq2 import DEFAULT_SOLVERS, RQ2Config
    from mdiff.rq3 import RQ3Config, default_ks
    from mdiff.rq4 import RQ4Config

    d = info.base
    steps: list[dict] = []
    c1 = RQ1Config(layers=list(range(d.n_layers)), hooks=list(scfg.rq1_hooks),
                   positions=parse_positions("last", seed=scfg.seed), **scfg.shared())
    steps.append({"step": "rq1", "cfg": c1, "why": "every layer"})
    psha = identity or pair_identity(spec)
    rq1_ok = step_done(out, spec.name, "rq1", {"pair": spec.name, **c1.settings()}, psha)
    if not rq1_ok:
        for s in ("rq2", "rq3", "rq4"):
            steps.append({"step": s, "cfg": None, "why": "sites chosen from RQ1's results"})
        return steps
    s1 = _summary(out, spec.name, "rq1")
    probe, control = s1["suggested_probe_layers"], s1["suggested_control_layer"]
    # RQ2's sites: resid_post plus the component(s) RQ1 names at the probe layers (attention → attn_out,
    # MLP → mlp_out); attn_out when RQ1 names none (an older RQ1, or no component above noise)
    comps = [h for h in s1.get("probe_components", []) if h not in scfg.rq2_hooks]
    hooks2 = [*scfg.rq2_hooks, *comps]
    fitpos = parse_positions(DEFAULT_FIT_POSITIONS, seed=scfg.seed)  # the same fit rows as the RQ commands
    c2 = RQ2Config(layers=list(probe), hooks=hooks2, solvers=list(DEFAULT_SOLVERS),
                   alphas=list(scfg.alphas), fit_positions=fitpos, control_layer=control, **scfg.shared())
    named = {L: c["component"] for L, c in s1.get("components", {}).items() if int(L) in probe}
    steps.append({"step": "rq2", "cfg": c2, "why": f"RQ1 probe layers {probe} (largest base→tuned patch KL), "
                                                  f"control layer {control}, hooks {', '.join(hooks2)}"
                                                  + (" (RQ1 components at the probe layers: "
                                                     + ", ".join(f"L{L} {c}" for L, c in sorted(named.items())) + ")"
                                                     if named else "")})
    attn = best_attention_layer(out, spec.name)
    if attn is None:
        c4, why4 = None, "RQ1 found no attention layer whose patch changes the output (attn_out KL ≈ 0 everywhere)"
    else:
        ctrl = control if control != attn else _quietest_attention_layer(out, spec.name, exclude=attn)
        ks = [2 ** i for i in range(d.n_heads.bit_length()) if 2 ** i <= d.n_heads]
        c4 = RQ4Config(layers=[attn], ks=ks, sites=["result"], sources=list(scfg.rq4_sources),
                       random_sets=scfg.random_sets, control_layer=ctrl, fit_positions=fitpos, **scfg.shared())
        why4 = f"best attention layer L{attn} (largest attn_out patch KL in RQ1), control layer {ctrl}"
    rq2_ok = step_done(out, spec.name, "rq2", {"pair": spec.name, **c2.settings()}, psha)
    if not rq2_ok:
        steps.append({"step": "rq3", "cfg": None, "why": "RQ2's best site"})
    else:
        best = _summary(out, spec.name, "rq2").get("best_site")
        if best is None:
            steps.append({"step": "rq3", "cfg": None, "skip": True,
                          "why": "RQ2 found no site with a learned map to restrict (nothing to drop anywhere)"})
        else:
            c3 = RQ3Config(layer=int(best["layer"]), hook=best["hook"], ks=default_ks(d.d_model),
                           target_frac=0.9, alpha=float(best["alpha"]), alpha_mode=c2.alpha_mode,
                           fit_positions=rq3_fit_positions(best["solver"], fitpos, scfg.seed), **scfg.shared())
            steps.append({"step": "rq3", "cfg": c3, "why": f"RQ2's best site L{best['layer']} {best['hook']} "
                                                          f"({best['solver']}, α={best['alpha']:g})"})
    steps.append({"step": "rq4", "cfg": c4, "why": why4, **({"skip": True} if c4 is None else {})})
    return steps


def step_settings(spec, step) -> dict | None:
    """A planned step's settings as its results record them (None while it cannot be resolved)."""
    return None if step["cfg"] is None else {"pair": spec.name, **step["cfg"].settings()}


def run_step(spec: PairSpec, step: str, cfg, out: str | Path, overwrite: bool = False,
             progress: Callable[[str, float], None] | None = None, session=None) -> None:
    """Run one planned step (and pin RQ2's winners right after it); ``session``: an open
    :class:`mdiff.session.PairSession` to run it in (a worker keeping its model loaded)."""
    from mdiff.rq1 import run_rq1
    from mdiff.rq2 import freeze_winners, run_rq2
    from mdiff.rq3 import run_rq3
    from mdiff.rq4 import run_rq4

    runners = {"rq1": run_rq1, "rq2": run_rq2, "rq3": run_rq3, "rq4": run_rq4}
    runners[step](spec, cfg, out, overwrite, progress=progress, session=session)
    if step == "rq2":
        freeze_winners(Path(out), spec.name)
