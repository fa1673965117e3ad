"""Where a study's units run: here (``local``), on a Ray cluster (``ray``), or as SLURM job arrays (``slurm``).

Every executor takes the ready units of one wave (:class:`mdiff.units.UnitTask`, plain data) and returns one
:class:`mdiff.units.UnitResult` per unit, in order; the unit itself (:func:`mdiff.units.run_unit`) does the
work and writes its results atomically into the shared result folder, which is the only state. The
engines' own retries (Ray actor restarts and task retries, SLURM requeue on preemption) only save time:
whatever they lose, the next plan finds missing and runs again.

Units that load one model (``side``: RQ1's, RQ2's and RQ4's pieces) are grouped by that side (:func:`groups_of`): a
group runs on one worker that loads its model once and keeps it between the group's units; a whole-step unit
(it loads both models in turn, or none) runs alone.

* ``local`` (default): one after another in this process (the study's progress bar works), the model kept
  from one unit to the next of the same side;
* ``ray`` (extra ``mdiff[ray]``): one Ray actor per side group and one Ray task per whole-step unit, with
  ``num_gpus`` from the units; an actor that dies is restarted and its units retried (``max_retries``), a task
  retried; units asking for more GPUs than any node of the cluster has are refused up front (Ray would wait
  forever);
* ``slurm`` (extra ``mdiff[slurm]``): one submitit job array per wave, a job per group; ``cluster="local"`` runs
  the same jobs as local processes (tests), ``"slurm"`` submits them; a preempted job is requeued by submitit
  (its finished units are found done and skipped).
"""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mdiff.errors import MdiffError
from mdiff.units import UnitResult, UnitTask, run_unit

EXECUTORS = ("local", "ray", "slurm")


class LocalExecutor:
    """Run units here, one after another."""

    name = "local"

    def __init__(self, progress: Callable[[str, float], None] | None = None):
        self.progress = progress
        self.sessions: dict = {}
        """Open pair sessions: a model stays loaded from one unit to the next of the same side."""

    def run(self, tasks: Sequence[UnitTask]) -> list[UnitResult]:
        return [run_unit(t, self.progress, self.sessions) for t in tasks]

    def close(self) -> None:
        """Free the models the sessions keep (the executor can run more units after)."""
        _close_sessions(self.sessions)


def _close_sessions(sessions: dict) -> None:
    for s in sessions.values():
        s.close()
    sessions.clear()


class _SideWorker:
    """Runs the units of one model side, keeping that model loaded between them (a Ray actor, a SLURM job)."""

    def __init__(self):
        self.sessions: dict = {}

    def run(self, task: UnitTask) -> UnitResult:
        return run_unit(task, None, self.sessions)

    def run_all(self, tasks: Sequence[UnitTask]) -> list[UnitResult]:
        try:
            return [self.run(t) for t in tasks]
        finally:
            _close_sessions(self.sessions)

    def __call__(self, tasks: Sequence[UnitTask]) -> list[UnitResult]:  # a submitit job
        return self.run_all(tasks)

    def checkpoint(self, tasks: Sequence[UnitTask]):
        """submitit calls this on preemption or timeout: the group is submitted again (its done units are
        found done and skipped)."""
        import submitit

        return submitit.helpers.DelayedSubmission(_SideWorker(), tasks)


def groups_of(tasks: Sequence[UnitTask]) -> list[list[int]]:
    """The tasks' indices grouped by the one model they load (``side``): a group per side, then each
    whole-step unit alone (it loads both models in turn)."""
    sides: dict[str, list[int]] = {}
    alone = []
    for i, t in enumerate(tasks):
        (sides.setdefault(t.side, []) if t.side else alone).append(i)
    return [*sides.values(), *([i] for i in alone)]


class RayExecutor:
    """Run each unit as a Ray task (``address=None`` starts a local cluster of ``num_cpus`` CPUs)."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, max_retries: int = 2,
                 gpus_per_unit: int | None = None):
        try:
            import ray
        except ImportError:
            raise MdiffError("the ray executor needs Ray: pip install 'mdiff[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                kw["address"] = address
            elif num_cpus:
                kw["num_cpus"] = num_cpus
            ray.init(**kw)
        self.max_retries, self.gpus_per_unit = max_retries, gpus_per_unit

    def run(self, tasks: Sequence[UnitTask]) -> list[UnitResult]:
        ray = self.ray
        # a task runs on one node: the most GPUs a unit can get is the most that one live node has
        have = max((float(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)
        # a unit without a device runs on CUDA when its worker has one: ask Ray for the GPU then, so that Ray
        # counts it (Ray does not hide GPUs from tasks that ask for none)
        gpus = [gpus_of(t, self.gpus_per_unit, default=1 if have >= 1 else 0) for t in tasks]
        if any(g > have for g in gpus):
            raise MdiffError(f"units ask for {max(gpus)} GPU(s) each but no node of the Ray cluster has more than "
                             f"{have:g}: run on a cluster with GPUs, or on the CPU (device cpu), or ask for fewer GPUs "
                             "per unit")
        out: list[UnitResult | None] = [None] * len(tasks)
        index: dict = {}  # ref -> task index
        left: dict = {}  # actor -> number of its units not finished yet
        owner: dict = {}  # ref -> the actor running it
        for group in groups_of(tasks):
            g = max(gpus[i] for i in group)
            if tasks[group[0]].side:  # one actor per model side: it loads its model once for all its units
                actor = ray.remote(_SideWorker).options(num_cpus=1, num_gpus=g, max_restarts=self.max_retries,
                                                        max_task_retries=self.max_retries).remote()
                left[actor] = len(group)
                for i in group:
                    ref = actor.run.remote(tasks[i])
                    index[ref], owner[ref] = i, actor
            else:
                remote = ray.remote(run_unit).options(num_cpus=1, num_gpus=g, max_retries=self.max_retries)
                for i in group:
                    index[remote.remote(tasks[i])] = i
        pending = list(index)
        try:
            while pending:
                # results as they come: an actor whose units are all finished is freed at once, so that the
                # CPUs and GPUs it holds go to the units still waiting (in order, a cluster with fewer CPUs than
                # actors + tasks would wait forever)
                # (a timeout, so that Python handles signals between polls: Ctrl-C, SIGTERM, a test's deadline)
                done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                if not done:
                    continue
                ref = done[0]
                i = index[ref]
                try:
                    out[i] = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a worker lost for good: reported with the unit's key
                    t = tasks[i]
                    out[i] = UnitResult(t.key, t.name or t.step, False, 0.0, f"its Ray worker failed (retried up "
                                        f"to {self.max_retries} time(s)): {_first_line(e)}")
                actor = owner.get(ref)
                if actor is not None:
                    left[actor] -= 1
                    if not left[actor]:
                        ray.kill(actor)
                        del left[actor]
        finally:
            for actor in left:  # frees the GPUs and the models
                ray.kill(actor)
        return out


class SlurmExecutor:
    """Run each wave as a submitit job array (``cluster="slurm"``; ``"local"`` for local processes)."""

    name = "slurm"

    def __init__(self, folder: str | Path, cluster: str = "slurm", timeout_min: int = 120,
                 partition: str | None = None, gpus_per_unit: int | None = None, max_tries: int = 2,
                 mem_gb: int = 64, cpus_per_unit: int = 4):
        try:
            import submitit
        except ImportError:
            raise MdiffError("the slurm executor needs submitit: pip install 'mdiff[slurm]'") from None
        self.submitit, self.folder, self.cluster = submitit, Path(folder), cluster
        self.timeout_min, self.partition, self.gpus_per_unit, self.max_tries = (timeout_min, partition,
                                                                                 gpus_per_unit, max_tries)
        self.mem_gb, self.cpus_per_unit = mem_gb, cpus_per_unit

    def run(self, tasks: Sequence[UnitTask]) -> list[UnitResult]:
        try:
            ex = self.submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster=self.cluster)
            params: dict[str, Any] = {"timeout_min": self.timeout_min,
                                      "cpus_per_task" if self.cluster == "local" else "slurm_cpus_per_task":
                                      1 if self.cluster == "local" else self.cpus_per_unit}
            g = max([gpus_of(t, self.gpus_per_unit) for t in tasks] or [0])
            if self.cluster == "slurm":
                params.update(slurm_max_num_timeout=self.max_tries, slurm_mem=f"{self.mem_gb}G")
                if self.partition:
                    params["slurm_partition"] = self.partition
                if g:
                    params["slurm_gpus_per_node"] = g
            ex.update_parameters(**params)
            groups = groups_of(tasks)  # one job per model side (its model loaded once), one per whole step
            jobs = ex.map_array(_SideWorker(), [[tasks[i] for i in g] for g in groups])
        except Exception as e:  # noqa: BLE001 - no SLURM here, a bad parameter...: one line
            raise MdiffError(f"the slurm executor could not submit the units ({_first_line(e)}); on a machine "
                             "without SLURM run them as local processes (submitit's local cluster) or here (the "
                             "local executor)") from None
        out: list[UnitResult | None] = [None] * len(tasks)
        for group, job in zip(groups, jobs, strict=True):
            try:
                for i, r in zip(group, job.result(), strict=True):
                    out[i] = r
            except Exception as e:  # noqa: BLE001 - a job lost for good: reported with its units' keys
                what = "local submitit job" if self.cluster == "local" else "SLURM job"
                for i in group:
                    t = tasks[i]
                    out[i] = UnitResult(t.key, t.name or t.step, False, 0.0,
                                        f"its {what} {job.job_id} failed: {_job_error(e, job)}")
        return out


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _job_error(e: BaseException, job) -> str:
    """One line for a lost submitit job: why it has no result (its process died), or its error's last line."""
    from submitit.core.utils import UncompletedJobError

    if isinstance(e, UncompletedJobError):
        log = getattr(getattr(job, "paths", None), "stdout", None)
        return "it ended without a result (its process died or was killed)" + (f"; its log: {log}" if log else "")
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def gpus_of(task: UnitTask, override: int | None, default: int = 0) -> int:
    """GPUs a unit asks for: none when it loads no model, else ``override``, else 1 for a CUDA device, 0 for another device, and ``default``
    when no device was given (the worker's choice)."""
    if not task.loads_model:
        return 0  # it only reads the result folder
    if override is not None:
        return int(override)
    dev = task.study.get("device")
    if dev is None:
        return default
    return 1 if str(dev).startswith("cuda") else 0


def make_executor(name: str, out: str | Path, progress: Callable[[str, float], None] | None = None,
                  ray_address: str | None = None, num_cpus: int | None = None, slurm_cluster: str = "slurm",
                  timeout_min: int = 120, partition: str | None = None, gpus_per_unit: int | None = None,
                  mem_gb: int = 64):
    """The executor called ``name`` (one of :data:`EXECUTORS`)."""
    if name == "local":
        return LocalExecutor(progress)
    if name == "ray":
        return RayExecutor(ray_address, num_cpus, gpus_per_unit=gpus_per_unit)
    if name == "slurm":
        return SlurmExecutor(Path(out) / "_submitit", slurm_cluster, timeout_min, partition, gpus_per_unit,
                             mem_gb=mem_gb)
    raise MdiffError(f"the executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
