"""A study as units of work: what to run, keyed by what it depends on, runnable anywhere.

A *unit* is one study step (``rq1`` … ``rq4``) of one pair with its fully resolved settings. Its key is
a hash of (pair, step, settings): the same key means the same work. :func:`run_unit` is a pure function of
its inputs (the pair, the study settings, the result folder): it re-plans the study from what the result
folder holds, checks that the step still resolves to the same key, runs the step (its runner writes
atomically), and records ``OUT/<pair>/parts/<key>.json`` last. The result folder on a shared filesystem is
the only state: a unit is done when its step folder holds a run with exactly its settings, so a rerun
re-plans and runs only what is missing, whichever executor ran the rest.

Dependencies: RQ2 and RQ4 choose their sites from RQ1's results, RQ3 from RQ2's; RQ2 and RQ4 can run at
the same time. Executors (:mod:`mdiff.executors`) run the ready units of each wave.
"""

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from mdiff.errors import MdiffError

DEPENDS_ON: dict[str, tuple[str, ...]] = {"rq1": (), "rq2": ("rq1",), "rq3": ("rq2",), "rq4": ("rq1",)}
"""Which steps' results each step's plan reads."""

DONE, READY, BLOCKED, SKIPPED = "done", "ready", "blocked", "skipped"


def unit_key(pair: str, step: str, settings: dict[str, Any], identity: str | None = None) -> str:
    """A stable hash of (pair, step, settings, pair identity): two units with the same key do the same work.

    ``identity``: :func:`mdiff.io.pair_identity` (models, weights, dtype, prompt set).
    """
    blob = json.dumps({"pair": pair, "step": step, "settings": settings, **({"identity": identity} if identity else {})},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Unit:
    """One step of one pair's study, as planned from the results that exist now."""

    pair: str
    step: str
    key: str | None
    """None while the step cannot be resolved yet (its inputs are not done)."""
    settings: dict[str, Any] | None
    why: str
    status: str
    gpus: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class UnitTask:
    """Everything a worker needs to run a unit (plain data: it crosses process and machine boundaries)."""

    pair_ref: str
    """What :func:`mdiff.pairs.resolve_pair` takes: a built-in name or a pair file path."""
    study: dict[str, Any]
    """The :class:`mdiff.study.StudyConfig` as a dict."""
    out: str
    step: str
    key: str
    overwrite: bool = False
    threads: int | None = None
    prompts: str | None = None
    """The prompt set the study runs on (a JSONL file), when it is not the pair's own."""


@dataclasses.dataclass
class UnitResult:
    key: str
    step: str
    ok: bool
    seconds: float
    error: str | None = None


def parts_dir(out: str | Path, pair: str) -> Path:
    return Path(out) / pair / "parts"


def plan_units(spec, scfg, out: str | Path, info=None) -> list[Unit]:
    """The study's units and their status, resolved from the results under ``out`` now."""
    from mdiff import models
    from mdiff.io import pair_identity
    from mdiff.plan import plan_steps, step_done

    out = Path(out)
    info = info or models.inspect_pair(spec)
    psha = pair_identity(spec)
    steps = {st["step"]: st for st in plan_steps(spec, info, scfg, out, psha)}
    gpus = 1 if str(scfg.device or "").startswith("cuda") else 0
    units: list[Unit] = []
    status_of: dict[str, str] = {}
    for step in ("rq1", "rq2", "rq3", "rq4"):
        st = steps[step]
        sett = None if st["cfg"] is None else {"pair": spec.name, **st["cfg"].settings()}
        if st.get("skip"):
            status = SKIPPED
        elif sett is None:
            status = BLOCKED
        elif step_done(out, spec.name, step, sett, psha):
            status = DONE
        else:
            status = READY if all(status_of.get(d) == DONE for d in DEPENDS_ON[step]) else BLOCKED
        status_of[step] = status
        units.append(Unit(spec.name, step, None if sett is None else unit_key(spec.name, step, sett, psha), sett,
                          st["why"], status, gpus))
    return units


def run_unit(task: UnitTask, progress=None) -> UnitResult:
    """Run one unit where this function is called (a local process, a Ray worker, a SLURM job).

    Re-plans from the result folder and refuses to run a step whose plan no longer matches the key (the
    inputs changed under it). Errors come back as a failed :class:`UnitResult` naming the key.
    """
    t0 = time.perf_counter()
    try:
        _run(task, progress)
        return UnitResult(task.key, task.step, True, round(time.perf_counter() - t0, 1))
    except Exception as e:  # noqa: BLE001 - reported with the unit's key, never swallowed
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return UnitResult(task.key, task.step, False, round(time.perf_counter() - t0, 1),
                          f"{type(e).__name__}: {msg}" if not isinstance(e, MdiffError) else msg)


def _run(task: UnitTask, progress=None) -> None:
    from mdiff import models
    from mdiff.activations import atomic_write_text
    from mdiff.io import pair_identity
    from mdiff.pairs import resolve_pair, with_prompts
    from mdiff.plan import StudyConfig, plan_steps, run_step

    if task.threads is not None:
        import torch

        torch.set_num_threads(task.threads)
    scfg = StudyConfig.from_dict(task.study)
    spec = with_prompts(resolve_pair(task.pair_ref), task.prompts)
    out = Path(task.out)
    st = next(s for s in plan_steps(spec, models.inspect_pair(spec), scfg, out) if s["step"] == task.step)
    if st["cfg"] is None:
        raise MdiffError(f"unit {task.key} ({spec.name} {task.step}) cannot be planned now: {st['why']}")
    sett = {"pair": spec.name, **st["cfg"].settings()}
    if unit_key(spec.name, task.step, sett, pair_identity(spec)) != task.key:
        raise MdiffError(f"unit {task.key} ({spec.name} {task.step}) no longer matches the plan (its inputs "
                         "changed); plan again")
    t0 = time.perf_counter()
    run_step(spec, task.step, st["cfg"], out, task.overwrite,
             progress=(lambda msg, frac: progress(f"{task.step}: {msg}", frac)) if progress else None)
    part = parts_dir(out, spec.name) / f"{task.key}.json"
    part.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(part, json.dumps({"key": task.key, "pair": spec.name, "step": task.step, "settings": sett,
                                        "seconds": round(time.perf_counter() - t0, 1)}, indent=1, default=str))
