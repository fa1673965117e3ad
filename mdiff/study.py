"""``mdiff study``: RQ1 → RQ4 on one pair, each step choosing its sites from the earlier results.

Plan (every choice is written into ``OUT/<pair>/study.json``):

1. **RQ1** on every layer (resid_post, attn_out, mlp_out): CKA and cross-patch KL.
2. **RQ2** on RQ1's probe layers (the two largest base→tuned patch KLs at resid_post) at resid_post and
   attn_out, plus ``mlp_out`` when RQ1 names the MLP as the component carrying a probe layer's change, with
   RQ1's control layer as the control site; the winners are pinned (``rq2/winners.json``).
3. **RQ3** on RQ2's best site, at the winner's α and on the winner's fit rows.
4. **RQ4** on the *best attention layer*: the layer whose ``attn_out`` cross-patch KL (base→tuned, RQ1)
   is largest, with RQ1's control layer as the control; raw and mapped sources at the ``result`` site
   (both sites' all-heads effects are always measured).

Resumable: a step whose results folder already holds a complete run with exactly the planned settings and
models is done and not run again, whether the study or the RQ's own command wrote it (the study then writes the
unit's missing part, :mod:`mdiff.units`). Each step writes atomically, so an interrupted step leaves no half
folder, only a temporary one that its next run removes, and simply runs again. ``dry_run`` prints the plan,
resolving what earlier results already determine.
"""

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mdiff import models
from mdiff.activations import atomic_write_text
from mdiff.errors import MdiffError
from mdiff.io import pair_identity
from mdiff.pairs import PairSpec
from mdiff.plan import (  # noqa: F401 - the plan's public names are the study's too
    STEPS,
    StudyConfig,
    best_attention_layer,
    plan_steps,
    run_step,
    step_done,
    step_settings,
)
from mdiff.tmpfiles import remove_stale_tmp


def run_study(spec: PairSpec, scfg: StudyConfig, out: str | Path, overwrite: bool = False, dry_run: bool = False,
              say: Callable[[str], None] | None = None,
              progress: Callable[[str, float], None] | None = None, executor=None,
              pair_ref: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """Run (or with ``dry_run`` only plan) the study; returns the plan with each step's status.

    The study is a set of units (:mod:`mdiff.units`) run in waves: each wave runs every unit whose inputs are
    done, on ``executor`` (:mod:`mdiff.executors`; default: here, in this process, one after another).
    ``pair_ref`` is what workers resolve the pair from (default: the pair's name, or its TOML file).
    """

    say = say or (lambda msg: None)
    out = Path(out)
    info = models.inspect_pair(spec)
    record: dict[str, Any] = {"pair": spec.name, "config": dataclasses.asdict(scfg), "steps": []}
    if dry_run:
        identity = pair_identity(spec)
        for st in plan_steps(spec, info, scfg, out, identity):
            sett = step_settings(spec, st)
            status = ("skipped" if st.get("skip") else "to be resolved" if sett is None
                      else "done" if step_done(out, spec.name, st["step"], sett, identity) else "to run")
            record["steps"].append({"step": st["step"], "status": status, "why": st["why"], "settings": sett})
        return record
    from mdiff.executors import LocalExecutor

    executor = executor or LocalExecutor(progress=progress)
    try:
        return _run_units(spec, scfg, out, overwrite, say, executor, pair_ref, threads, info, record)
    finally:
        close = getattr(executor, "close", None)
        if close is not None:
            close()


def _run_units(spec, scfg, out, overwrite, say, executor, pair_ref, threads, info, record):
    from mdiff import units as U
    from mdiff.report import build_report

    ref = pair_ref or (spec.name if spec.source in ("builtin", "toy", "fixture") else spec.source)
    if Path(ref).suffix == ".toml" and Path(ref).is_file():
        ref = str(Path(ref).resolve())  # workers elsewhere resolve paths against their own working directory
    entries: dict[str, dict] = {}
    failed: list[U.UnitResult] = []
    identity = pair_identity(spec)
    while True:
        units = U.plan_units(spec, scfg, out, info)
        rq2 = next(u for u in units if u.name == "rq2")
        if rq2.status == U.DONE and not (out / spec.name / "rq2" / "winners.json").is_file():
            from mdiff.rq2 import freeze_winners

            freeze_winners(out, spec.name)  # a run killed between RQ2's commit and its winners: pin them now
        for u in units:  # done without a part: written by hand (`mdiff rq1`) or killed before its part
            if u.status == U.DONE and not u.part and u.name == u.step:
                U.write_part(out, spec.name, u.key, u.step, u.settings, identity, adopted=True)
        for u in units:
            if u.name != u.step:
                continue
            if u.status == U.SKIPPED and u.step not in entries:
                entries[u.step] = {"step": u.step, "why": u.why, "settings": u.settings, "status": "skipped"}
                say(f"{u.step}: skipped — {u.why}")
            elif u.status == U.DONE and u.step not in entries:
                entries[u.step] = {"step": u.step, "why": u.why, "settings": u.settings, "status": "already done",
                                   "unit": u.key}
                say(f"{u.step}: already done ({u.why}) — kept {out / spec.name / u.step}")
        ready = [u for u in units if u.status == U.READY and u.key not in {f.key for f in failed}]
        if not ready:
            break
        for u in ready:
            say(f"{u.name}: running on {u.why}")
        tasks = [U.UnitTask(ref, scfg.to_dict(), str(out.resolve()), u.step, u.key, overwrite, threads, spec.prompts,
                            u.name, u.side, u.loads_model) for u in ready]
        for u, r in zip(ready, executor.run(tasks), strict=True):
            if not r.ok:
                failed.append(r)
                entries[u.step] = {"step": u.step, "why": u.why, "settings": u.settings, "status": "failed",
                                   "unit": u.key, "error": r.error, **({"piece": u.name} if u.name != u.step else {})}
            elif u.name == u.step:
                entries[u.step] = {"step": u.step, "why": u.why, "settings": u.settings, "status": "ran",
                                   "seconds": r.seconds, "unit": u.key}
        record["steps"] = [entries[s] for s in STEPS if s in entries]
        if (out / spec.name).is_dir():  # a first unit that failed leaves no folder behind: keep it that way
            atomic_write_text(out / spec.name / "study.json", json.dumps(record, indent=2, default=str))
    for d in (out / spec.name, U.parts_dir(out, spec.name)):  # what units killed mid-write left (never a result)
        remove_stale_tmp(d)
    if failed:
        f = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise MdiffError(f"study unit {f.key} ({spec.name} {f.step}) failed: {f.error}{more}; everything else is "
                         f"kept, rerun to retry")
    missing = [u for u in units if u.status in (U.BLOCKED, U.READY)]  # the last plan: nothing was ready
    if missing:
        u = missing[0]
        raise MdiffError(f"study step {u.step} could not be planned: {u.why} (an earlier step did not finish)")
    record["steps"] = [entries[s] for s in STEPS if s in entries]
    record["report"] = str(build_report(out, spec.name))
    atomic_write_text(out / spec.name / "study.json", json.dumps(record, indent=2, default=str))
    return record
