"""A study as units of work: what to run, keyed by what it depends on, runnable anywhere.

A *unit* is one study step (``rq1`` … ``rq4``) of one pair with its fully resolved settings. Its key is
a hash of (pair, step, settings, pair identity): the same key means the same work. :func:`run_unit` is a pure
function of its inputs (the pair, the study settings, the result folder): it re-plans the study from what the
result folder holds, checks that the step still resolves to the same key, runs the step (its runner writes the
step folder atomically: a temporary folder renamed into place), and records its *part*
``OUT/<pair>/parts/<key>.json`` last (a temporary file renamed into place). The result folder on a shared
filesystem is the only state, so a rerun re-plans and runs only what is missing, whichever executor ran the rest.

When is a unit done (:func:`plan_units`)? When the step folder its part points to, ``OUT/<pair>/<step>/``, is
present and complete (:data:`mdiff.plan.RESULT_FILES`) and its ``config.json`` records exactly the unit's settings
and pair identity (models, weights, dtype, prompt set), and its part, when there is one, records the same key,
step, settings and identity. So:

* a part whose step folder is gone, incomplete, or holds another run (other settings, another model) does not
  make the unit done: it runs again and its new part replaces the stale one;
* a step folder with the right settings but no part is done: it was written by the RQ's own command (``mdiff rq1``
  by hand), or its unit was killed between committing the folder and writing the part. Redoing that work would
  produce the same results, so users expect it kept; the study writes the missing part (marked ``adopted``);
* a part that cannot be read, or that records another key, is ignored (and rewritten).

A unit killed mid-step leaves only its runner's temporary folder (``OUT/<pair>/.<step>.tmp-<pid>``), never a half
step folder; the unit's next run removes it, and a finished study removes any left by processes that are gone.

Dependencies: RQ2 and RQ4 choose their sites from RQ1's results, RQ3 from RQ2's; RQ2 and RQ4 can run at
the same time. Executors (:mod:`mdiff.executors`) run the ready units of each wave.
"""

import dataclasses
import hashlib
import json
import os
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
    part: bool = False
    """Its part exists and matches (False for a done unit whose folder was written outside the study)."""

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


def part_path(out: str | Path, pair: str, key: str) -> Path:
    return parts_dir(out, pair) / f"{key}.json"


def read_part(out: str | Path, pair: str, key: str, step: str, settings: dict[str, Any],
              identity: str | None) -> dict[str, Any] | None:
    """The unit's part when it exists and records this key, step, settings and identity; else None."""
    try:
        part = json.loads(part_path(out, pair, key).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(part, dict):
        return None
    want = {"key": key, "pair": pair, "step": step, "folder": step, "identity": identity,
            "settings": json.loads(json.dumps(settings, default=str))}
    return part if all(part.get(k) == v for k, v in want.items()) else None


def write_part(out: str | Path, pair: str, key: str, step: str, settings: dict[str, Any], identity: str | None,
               seconds: float | None = None, adopted: bool = False) -> Path:
    """Record that the unit is done (atomically: a temporary file renamed into place)."""
    from mdiff.activations import atomic_write_text

    path = part_path(out, pair, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"key": key, "pair": pair, "step": step, "folder": step, "identity": identity,
                                        "settings": settings, "seconds": seconds, "adopted": adopted},
                                       indent=1, default=str))
    return path


def plan_units(spec, scfg, out: str | Path, info=None) -> list[Unit]:
    """The study's units and their status, resolved from the results under ``out`` now (writes nothing).

    ``done``: the step folder is present, complete and holds exactly this unit's run (see the module's docstring;
    :attr:`Unit.part` says whether its part is there too); ``ready``: its inputs are done; ``blocked``: they are
    not; ``skipped``: the plan has nothing for this step to do."""
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
        key = None if sett is None else unit_key(spec.name, step, sett, psha)
        part = False
        if st.get("skip"):
            status = SKIPPED
        elif sett is None:
            status = BLOCKED
        elif step_done(out, spec.name, step, sett, psha):
            status = DONE
            part = read_part(out, spec.name, key, step, sett, psha) is not None
        else:
            status = READY if all(status_of.get(d) == DONE for d in DEPENDS_ON[step]) else BLOCKED
        status_of[step] = status
        units.append(Unit(spec.name, step, key, sett, st["why"], status, gpus, part))
    return units


def run_unit(task: UnitTask, progress=None) -> UnitResult:
    """Run one unit where this function is called (a local process, a Ray worker, a SLURM job).

    Re-plans from the result folder and refuses to run a step whose plan no longer matches the key (the
    inputs changed under it). A unit whose step is already done (an engine's retry after the step was
    committed, or another run) only writes its part. Errors come back as a failed :class:`UnitResult` naming
    the key.
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
    from mdiff.io import pair_identity
    from mdiff.pairs import resolve_pair, with_prompts
    from mdiff.plan import StudyConfig, plan_steps, run_step, step_done

    if task.threads is not None:
        import torch

        torch.set_num_threads(task.threads)
    scfg = StudyConfig.from_dict(task.study)
    spec = with_prompts(resolve_pair(task.pair_ref), task.prompts)
    out = Path(task.out)
    psha = pair_identity(spec)
    st = next(s for s in plan_steps(spec, models.inspect_pair(spec), scfg, out, psha) if s["step"] == task.step)
    if st["cfg"] is None:
        raise MdiffError(f"unit {task.key} ({spec.name} {task.step}) cannot be planned now: {st['why']}")
    sett = {"pair": spec.name, **st["cfg"].settings()}
    if unit_key(spec.name, task.step, sett, psha) != task.key:
        raise MdiffError(f"unit {task.key} ({spec.name} {task.step}) no longer matches the plan (its inputs "
                         "changed); plan again")
    t0 = time.perf_counter()
    adopted = step_done(out, spec.name, task.step, sett, psha)
    if adopted:
        if task.step == "rq2" and not (out / spec.name / "rq2" / "winners.json").is_file():
            from mdiff.rq2 import freeze_winners

            freeze_winners(out, spec.name)
    else:
        progress = _test_die_hook(task.step, progress)
        run_step(spec, task.step, st["cfg"], out, task.overwrite,
                 progress=(lambda msg, frac: progress(f"{task.step}: {msg}", frac)) if progress else None)
    write_part(out, spec.name, task.key, task.step, sett, psha,
               None if adopted else round(time.perf_counter() - t0, 1), adopted)


TEST_DIE_VAR = "MDIFF_TEST_DIE_IN_UNIT"


def _test_die_hook(step: str, progress):
    """Test-only (tests/test_units.py), inert unless ``MDIFF_TEST_DIE_IN_UNIT=<step>:<marker file>`` is set: the
    first time ``<step>`` runs, its process dies (``os._exit(137)``, like a kill) at the step's first progress
    report, mid-step, after creating the marker file; a retry finds the marker and runs normally."""
    want = os.environ.get(TEST_DIE_VAR)
    if not want:
        return progress
    die_step, _, marker = want.partition(":")
    if die_step != step or not marker or Path(marker).exists():
        return progress

    def die(msg: str, frac: float) -> None:
        Path(marker).touch()
        os._exit(137)

    return die
