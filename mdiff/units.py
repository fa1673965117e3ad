"""A study as units of work: what to run, keyed by what it depends on, runnable anywhere.

A *unit* is one study step (``rq1`` … ``rq4``) of one pair with its fully resolved settings, or a *piece* of a
step that loads one model (:data:`SPLIT_STEPS`: ``rq1:side:base``, ``rq1:patch:tuned:L0-7``, ``rq2:side:tuned``
...). Its key is a hash of (pair, unit name, settings, pair identity): the same key means the same work.
:func:`run_unit` is a pure function of its inputs (the pair, the study settings, the result folder): it re-plans
the study from what the result folder holds, checks that the unit still resolves to the same key, runs it, and
records its *part* ``OUT/<pair>/parts/<key>.json`` last (a temporary file renamed into place). The result folder
on a shared filesystem is the only state, so a rerun re-plans and runs only what is missing, whichever executor
ran the rest.

A piece writes its data first (``parts/<key>.safetensors``: per-prompt arrays, metadata as JSON in the header;
RQ2's pieces write activations to the store and an empty data file), then its receipt; it is done when both are
there and record its key, name, settings and identity (a side piece: and its activation stores are complete).
The step unit of a split step runs when all its pieces are done: RQ1's reduces its pieces' parts into the result
folder without loading a model; RQ2's finds its stores complete.

When is a step unit done (:func:`plan_units`)? When the step folder its part points to, ``OUT/<pair>/<step>/``, is
present and complete (:data:`mdiff.plan.RESULT_FILES`) and its ``config.json`` records exactly the unit's settings
and pair identity (models, weights, dtype, prompt set), and its part, when there is one, records the same key,
step, settings and identity. So:

* a part whose step folder is gone, incomplete, or holds another run (other settings, another model) does not
  make the unit done: it runs again and its new part replaces the stale one;
* a step folder with the right settings but no part is done: it was written by the RQ's own command (``mdiff rq1``
  by hand), or its unit was killed between committing the folder and writing the part. Redoing that work would
  produce the same results, so users expect it kept; the study writes the missing part (marked ``adopted``);
* a part that cannot be read, or that records another key, is ignored (and rewritten).

A unit killed mid-step leaves only its runner's temporary folder (``OUT/<pair>/.<step>.tmp-<host>-<pid>``), never a half
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
from mdiff.tmpfiles import tmp_path

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
    name: str = ""
    """The unit's name: its step (``rq1``: the step's result folder) or a piece of it (``rq1:side:base``,
    ``rq1:patch:tuned:L0-7``)."""
    side: str | None = None
    """The one model the unit loads (``None``: a whole step, which loads both in turn)."""
    layers: tuple[int, ...] | None = None
    """The layers a patch unit patches."""
    loads_model: bool = True
    """False for units that only read the result folder (RQ1's and RQ4's reduces, RQ2's fits): no GPU is asked for them."""

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
    name: str = ""
    """The unit's name (:attr:`Unit.name`; empty: the step)."""
    side: str | None = None
    """The model the unit loads (executors group units by it)."""
    loads_model: bool = True
    """Whether the unit loads a model at all (executors ask no GPU for one that does not)."""


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


SPLIT_STEPS = ("rq1", "rq2", "rq4")
"""Steps the study runs partly as pieces of one model each. RQ1: ``rq1:side:<side>`` (collect that side's
activations and its behaviour diagnostics), ``rq1:patch:<target>:L<a>-<b>`` (patch a chunk of layers into one
target), then the step unit ``rq1`` reduces the pieces' parts into the result folder (no model). RQ2:
``rq2:side:<side>`` (collect that side's activations), ``rq2:fit:L<l>:<hook>`` (fit one site's maps from the
store, no model), then the step unit ``rq2`` (patches: the tuned model, then base for the reverse direction).
RQ4: ``rq4:side:base`` (the base heads' z and W_O), ``rq4:heads:L<a>-<b>`` (patch a chunk of layers' heads into
the tuned model), then the step unit ``rq4`` reduces (no model). RQ3 is one unit."""

MODEL_FREE_STEPS = ("rq1", "rq4")
"""Step units that only reduce their pieces' parts (they load no model, so no GPU is asked for them)."""


def subpart_path(out: str | Path, pair: str, key: str, kind: str = "side") -> Path:
    """A piece's data: ``parts/<key>.safetensors`` (arrays, JSON metadata in the header), or for an RQ2 fit
    piece the folder ``parts/<key>.maps/`` of its maps (:func:`mdiff.maps.save_map` files)."""
    return parts_dir(out, pair) / (f"{key}.maps" if kind == "fit" else f"{key}.safetensors")


def _data_bytes(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in sorted(path.iterdir()) if p.is_file())
    return None


def _read_subpart(out: Path, pair: str, piece: "Piece", settings: dict, identity: str | None) -> bool:
    """Whether a piece's part (receipt + data) exists and records this key, name, settings and identity."""
    try:
        part = json.loads(part_path(out, pair, piece.key).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    want = {"key": piece.key, "pair": pair, "unit": piece.name, "identity": identity,
            "settings": json.loads(json.dumps(settings, default=str))}
    if not isinstance(part, dict) or any(part.get(k) != v for k, v in want.items()):
        return False
    size = _data_bytes(subpart_path(out, pair, piece.key, piece.kind))
    return size is not None and size == part.get("data_bytes")


@dataclasses.dataclass(frozen=True)
class Piece:
    """One piece of a split step: ``side`` (collect one model's activations; RQ1: and its behaviour; RQ4: the
    base heads), ``patch`` (RQ1: patch ``layers`` into the ``side`` model; RQ4: their heads into tuned) or ``fit``
    (RQ2: fit every map of site (``layers[0]``, ``hook``) from the store, no model)."""

    name: str
    key: str
    kind: str
    side: str | None
    layers: tuple[int, ...] = ()
    hook: str | None = None

    @property
    def why(self) -> str:
        if self.kind == "side":
            if self.name.startswith("rq4"):
                return f"read the {self.side} model's heads (z, W_O)"
            return f"collect the {self.side} model's activations" + (" and behaviour" if self.name.startswith("rq1")
                                                                      else "")
        if self.kind == "patch":
            what = "the heads of layers" if self.name.startswith("rq4") else "layers"
            return f"patch {what} {self.layers[0]}-{self.layers[-1]} into the {self.side} model"
        return f"fit the maps at L{self.layers[0]} {self.hook} (no model)"


def _pieces(spec, step: str, cfg, settings: dict, psha: str, layers_per_unit: int) -> list[Piece]:
    """A split step's pieces: each side; then RQ1: each target × chunk of layers; RQ2: each site's fits (unless
    a solver needs the tuned model's unembedding)."""

    def piece(name, kind, side, layers=(), hook=None):
        return Piece(name, unit_key(spec.name, name, settings, psha), kind, side, tuple(layers), hook)

    if step == "rq4":
        from mdiff.rq4 import rq4_layers

        layers = rq4_layers(cfg)
        chunks = [tuple(layers[i:i + layers_per_unit]) for i in range(0, len(layers), layers_per_unit)]
        return [piece("rq4:side:base", "side", "base")] + [
            piece(f"rq4:heads:L{ch[0]}-{ch[-1]}", "patch", "tuned", ch) for ch in chunks]
    out = [piece(f"{step}:side:{side}", "side", side) for side in ("base", "tuned")]
    if step == "rq1":
        layers = list(cfg.layers)
        chunks = [tuple(layers[i:i + layers_per_unit]) for i in range(0, len(layers), layers_per_unit)]
        out += [piece(f"rq1:patch:{target}:L{ch[0]}-{ch[-1]}", "patch", target, ch)
                for target in ("tuned", "base") for ch in chunks]
    else:
        from mdiff.rq2 import fits_need_a_model, rq2_layers

        if not fits_need_a_model(cfg):
            out += [piece(f"rq2:fit:L{L}:{h}", "fit", None, (L,), h) for L in rq2_layers(cfg) for h in cfg.hooks]
    return out


def _stores_complete(spec, step: str, cfg, out: Path, side: str) -> bool:
    """Whether ``side``'s activation stores of a split step are complete (their manifests written; RQ4's side
    piece keeps its heads in its part, no store)."""
    from mdiff.activations import collection_dir

    if step == "rq4":
        return True
    if step == "rq1":
        from mdiff.rq1 import rq1_collections

        hooks, layers, colls = cfg.hooks, cfg.layers, rq1_collections(cfg)
    else:
        from mdiff.rq2 import rq2_collections, rq2_layers

        hooks, layers, colls = cfg.hooks, rq2_layers(cfg), rq2_collections(cfg, side)
    return all((collection_dir(out, spec.name, side, split, p.tag, hooks, layers) / "manifest.json").is_file()
               for split, p in colls)


def plan_units(spec, scfg, out: str | Path, info=None) -> list[Unit]:
    """The study's units and their status, resolved from the results under ``out`` now (writes nothing).

    ``done``: the step folder is present, complete and holds exactly this unit's run (see the module's docstring;
    :attr:`Unit.part` says whether its part is there too), or, for a piece of a step (:data:`SPLIT_STEPS`), its
    part is there; ``ready``: its inputs are done; ``blocked``: they are not; ``skipped``: the plan has nothing
    for this step to do. A step's pieces are listed only while the step itself is not done."""
    from mdiff import models
    from mdiff.io import pair_identity
    from mdiff.plan import plan_steps, step_done

    out = Path(out)
    if scfg.layers_per_unit < 1:
        raise MdiffError(f"{{option}} must be ≥ 1, got {scfg.layers_per_unit}", option="layers_per_unit")
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
        pieces_done = True
        if st.get("skip"):
            status = SKIPPED
        elif sett is None:
            status = BLOCKED
        elif step_done(out, spec.name, step, sett, psha):
            status = DONE
            part = read_part(out, spec.name, key, step, sett, psha) is not None
        else:
            inputs_done = all(status_of.get(d) == DONE for d in DEPENDS_ON[step])
            if step in SPLIT_STEPS:
                sides_done = {}
                for pc in _pieces(spec, step, st["cfg"], sett, psha, scfg.layers_per_unit):
                    done = _read_subpart(out, spec.name, pc, sett, psha)
                    if pc.kind == "side":
                        done = done and _stores_complete(spec, step, st["cfg"], out, pc.side)
                        sides_done[pc.side] = done
                        ready = inputs_done
                    else:
                        ready = inputs_done and all(sides_done.values())
                    pieces_done = pieces_done and done
                    units.append(Unit(spec.name, step, pc.key, sett, pc.why,
                                      DONE if done else READY if ready else BLOCKED, gpus if pc.side else 0, done,
                                      pc.name, pc.side, pc.layers or None, pc.side is not None))
            status = READY if inputs_done and pieces_done else BLOCKED
        status_of[step] = status
        units.append(Unit(spec.name, step, key, sett, st["why"], status, 0 if step in MODEL_FREE_STEPS else gpus,
                          part, step, loads_model=step not in MODEL_FREE_STEPS))
    return units


def run_unit(task: UnitTask, progress=None, sessions: dict | None = None) -> UnitResult:
    """Run one unit where this function is called (a local process, a Ray worker, a SLURM job).

    Re-plans from the result folder and refuses to run a step whose plan no longer matches the key (the
    inputs changed under it). A unit whose step is already done (an engine's retry after the step was
    committed, or another run) only writes its part. Errors come back as a failed :class:`UnitResult` naming
    the key. ``sessions``: the caller's cache of open :class:`mdiff.session.PairSession` objects (a worker that
    keeps its model loaded between units of the same side: it closes them when done); default: a session per
    unit, closed at its end.
    """
    t0 = time.perf_counter()
    try:
        _run(task, progress, sessions)
        return UnitResult(task.key, task.name or task.step, True, round(time.perf_counter() - t0, 1))
    except Exception as e:  # noqa: BLE001 - reported with the unit's key, never swallowed
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return UnitResult(task.key, task.name or task.step, False, round(time.perf_counter() - t0, 1),
                          f"{type(e).__name__}: {msg}" if not isinstance(e, MdiffError) else msg)


def _run(task: UnitTask, progress=None, sessions: dict | None = None) -> None:
    from mdiff import models
    from mdiff.io import pair_identity
    from mdiff.pairs import resolve_pair, with_prompts
    from mdiff.plan import StudyConfig, plan_steps, run_step, step_done

    if task.threads is not None:
        from mdiff.threads import set_threads

        set_threads(task.threads)
    scfg = StudyConfig.from_dict(task.study)
    spec = with_prompts(resolve_pair(task.pair_ref), task.prompts)
    out = Path(task.out)
    session = None
    if sessions is not None:
        from mdiff.session import PairSession

        skey = (json.dumps(spec.to_dict(), sort_keys=True, default=str), str(out.resolve()), task.overwrite)
        if skey not in sessions:
            sessions[skey] = PairSession(spec, out, replace=task.overwrite, keep_model=True)
        session = sessions[skey]
    psha = pair_identity(spec)
    info = session.info if session is not None else models.inspect_pair(spec)
    st = next(s for s in plan_steps(spec, info, scfg, out, psha) if s["step"] == task.step)
    if st["cfg"] is None:
        raise MdiffError(f"unit {task.key} ({spec.name} {task.name or task.step}) cannot be planned now: {st['why']}")
    sett = {"pair": spec.name, **st["cfg"].settings()}
    name = task.name or task.step
    if unit_key(spec.name, name, sett, psha) != task.key:
        raise MdiffError(f"unit {task.key} ({spec.name} {name}) no longer matches the plan (its inputs "
                         "changed); plan again")
    t0 = time.perf_counter()
    if name != task.step:
        _run_piece(spec, st["cfg"], scfg, out, task, sett, psha, session, progress)
        return
    adopted = step_done(out, spec.name, task.step, sett, psha)
    if adopted:
        if task.step == "rq2" and not (out / spec.name / "rq2" / "winners.json").is_file():
            from mdiff.rq2 import freeze_winners

            freeze_winners(out, spec.name)
    else:
        progress = _test_die_hook(task.step, progress)
        say = (lambda msg, frac: progress(f"{task.step}: {msg}", frac)) if progress else None
        if task.step in SPLIT_STEPS:
            _reduce(spec, st["cfg"], scfg, out, task, sett, psha, session, say)
        else:
            run_step(spec, task.step, st["cfg"], out, task.overwrite, progress=say, session=session)
    write_part(out, spec.name, task.key, task.step, sett, psha,
               None if adopted else round(time.perf_counter() - t0, 1), adopted)


def _session(spec, cfg, out: Path, task: UnitTask, session):
    from mdiff.session import PairSession

    if session is None:
        # a split step's own unit reads the stores its side pieces just collected: never collect them again
        fresh = task.overwrite and not (task.step in SPLIT_STEPS and (task.name or task.step) == task.step)
        return PairSession(spec, out, replace=fresh), True
    return session, False


def _run_piece(spec, cfg, scfg, out: Path, task: UnitTask, sett: dict, psha: str, session, progress) -> None:
    """Run one piece of a split step (one model loaded, or none) and write its part (data, then receipt)."""
    from mdiff import rq2

    pieces = {pc.name: pc for pc in _pieces(spec, task.step, cfg, sett, psha, scfg.layers_per_unit)}
    pc = pieces.get(task.name)
    if pc is None or pc.key != task.key:
        raise MdiffError(f"unit {task.key} ({spec.name} {task.name}) is not a piece of the plan; plan again")
    if _read_subpart(out, spec.name, pc, sett, psha) and (
            pc.kind != "side" or _stores_complete(spec, task.step, cfg, out, pc.side)):
        return  # done already (an engine's retry, or another run)
    die = _test_die_hook(task.name, None)
    t0 = time.perf_counter()
    session, own = _session(spec, cfg, out, task, session)
    try:
        session = session.with_options(cfg.seed, cfg.n, cfg.batch_size, cfg.device)
        if task.step == "rq1":
            tensors, meta = _rq1_piece(session, cfg, pc, die)
        elif task.step == "rq4":
            tensors, meta = _rq4_piece(spec, session, cfg, out, sett, psha, pc, pieces["rq4:side:base"], die)
        else:
            if die is not None:
                die("start", 0.0)
            cfg = rq2.check_rq2(cfg, session.info)
            if pc.kind == "side":  # collect only: the model is loaded only when some activations are missing
                rq2.rq2_side(session, cfg, pc.side)
                tensors, meta = {}, {"side": pc.side}
            else:
                _write_maps(out, spec.name, pc.key, rq2.rq2_fit(session, cfg, pc.layers[0], pc.hook))
                tensors, meta = None, None
    finally:
        if own:
            session.close()
    _write_subpart(out, spec.name, pc, sett, psha, tensors, meta, round(time.perf_counter() - t0, 1))


def _rq1_piece(session, cfg, pc: Piece, die) -> tuple[dict, dict]:
    from mdiff import rq1

    with session.model(pc.side) as m:
        if die is not None:
            die("start", 0.0)
        if pc.kind == "side":
            return _side_arrays(rq1.rq1_side(session, cfg, m, pc.side))
        return _patch_arrays(rq1.rq1_patch(session, cfg, m, pc.side, list(pc.layers)))


def _rq4_piece(spec, session, cfg, out: Path, sett: dict, psha: str, pc: Piece, side_pc: Piece, die
               ) -> tuple[dict, dict]:
    from mdiff import rq4

    cfg = rq4.check_rq4(cfg, session.info)
    if pc.kind == "patch":  # the base heads come from the side piece's part
        if not _read_subpart(out, spec.name, side_pc, sett, psha):
            raise MdiffError(f"{spec.name} {pc.name} needs {side_pc.name} ({side_pc.key}) first; plan again")
        side = _heads_side(*_load_subpart(out, spec.name, side_pc.key))
    with session.model(pc.side) as m:
        if die is not None:
            die("start", 0.0)
        if pc.kind == "side":
            return _heads_side_arrays(rq4.rq4_side(session, cfg, m))
        return _heads_arrays(rq4.rq4_heads(session, cfg, m, side, list(pc.layers)))


def _pieces_done(spec, step: str, cfg, scfg, out: Path, task: UnitTask, sett: dict, psha: str) -> list[Piece]:
    pieces = _pieces(spec, step, cfg, sett, psha, scfg.layers_per_unit)
    for pc in pieces:
        if not _read_subpart(out, spec.name, pc, sett, psha):
            raise MdiffError(f"unit {task.key} ({spec.name} {step}) is missing its piece {pc.name} ({pc.key}); "
                             "plan again")
    return pieces


def _reduce(spec, cfg, scfg, out: Path, task: UnitTask, sett: dict, psha: str, session, say) -> None:
    """The step unit of a split step: read its pieces' parts and write the step's result folder (RQ1: from
    the pieces' arrays, no model; RQ2: with the pieces' fitted maps)."""
    from mdiff import rq1, rq2
    from mdiff.runner import Step, run_step

    pieces = _pieces_done(spec, task.step, cfg, scfg, out, task, sett, psha)
    if task.step == "rq1":
        sides, patches = [], []
        for pc in pieces:
            tensors, meta = _load_subpart(out, spec.name, pc.key)
            (sides.append(_side_part(tensors, meta)) if pc.kind == "side"
             else patches.append(_patch_part(tensors, meta)))
        step = Step("rq1", rq1.check_rq1, lambda s, c, _say: rq1.reduce_rq1(s, c, sides, patches), rq1.figures_rq1)
    elif task.step == "rq4":
        from mdiff import rq4

        heads = [_heads_part(*_load_subpart(out, spec.name, pc.key)) for pc in pieces if pc.kind == "patch"]
        step = Step("rq4", rq4.check_rq4, lambda s, c, _say: rq4.reduce_rq4(s, c, heads), rq4.figures_rq4)
    else:
        fitted = {(pc.layers[0], pc.hook): _read_maps(out, spec.name, pc.key) for pc in pieces if pc.kind == "fit"}
        step = Step("rq2", rq2.check_rq2, lambda s, c, sy: rq2.compute_rq2(s, c, sy, fitted), rq2.figures_rq2)
    session, own = _session(spec, cfg, out, task, session)
    try:
        run_step(step, spec, cfg, out, task.overwrite, say, session)
    finally:
        if own:
            session.close()
    if task.step == "rq2":
        rq2.freeze_winners(out, spec.name)


def _write_maps(out: Path, pair: str, key: str, fitted: dict) -> None:
    """An RQ2 fit piece's maps into ``parts/<key>.maps/`` (written in a temporary folder, renamed into place)."""
    import shutil

    from mdiff import maps

    final = subpart_path(out, pair, key, "fit")
    tmp = tmp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = {}
    for i, (name, est) in enumerate(fitted.items()):
        maps.save_map(est, tmp / f"map-{i:03d}")
        names[name] = f"map-{i:03d}"
    (tmp / "names.json").write_text(json.dumps(names, indent=1), encoding="utf-8")
    if final.exists():  # a piece killed before its receipt: its maps are redone, never half read
        shutil.rmtree(final)
    os.replace(tmp, final)


def _read_maps(out: Path, pair: str, key: str) -> dict:
    from mdiff import maps

    d = subpart_path(out, pair, key, "fit")
    names = json.loads((d / "names.json").read_text(encoding="utf-8"))
    return {name: maps.load_map(d / prefix) for name, prefix in names.items()}


# ---------------------------------------------------------------------------------------------- piece data
def _side_arrays(part) -> tuple[dict, dict]:
    import numpy as np

    rows = [{k: v for k, v in r.items() if k != "values"} for r in part.behaviour]
    tensors = {f"behaviour.{i}": np.asarray(r["values"], np.float64) for i, r in enumerate(part.behaviour)}
    return tensors, {"side": part.side, "behaviour": rows}


def _side_part(tensors: dict, meta: dict):
    from mdiff.rq1 import SidePart

    return SidePart(meta["side"], [{**r, "values": tensors[f"behaviour.{i}"]} for i, r in enumerate(meta["behaviour"])])


def _patch_arrays(part) -> tuple[dict, dict]:
    import numpy as np

    keys = list(part.kl)
    tensors = {f"kl.{i}": np.asarray(part.kl[k], np.float64) for i, k in enumerate(keys)}
    tensors["floor"] = np.asarray(part.floor, np.float64)
    return tensors, {"target": part.target, "layers": part.layers, "keys": [list(k) for k in keys],
                     "engine": part.engine}


def _patch_part(tensors: dict, meta: dict):
    from mdiff.rq1 import PatchPart

    kl = {(int(L), h, c): tensors[f"kl.{i}"] for i, (L, h, c) in enumerate(meta["keys"])}
    return PatchPart(meta["target"], [int(x) for x in meta["layers"]], kl, tensors["floor"], meta["engine"])


def _heads_side_arrays(side) -> tuple[dict, dict]:
    tensors, meta = {}, {"layers": sorted(side.W_O), "train": side.z_tr is not None}
    for name in ("z_sel", "z_val", "z_tr", "W_O"):
        for L, v in (getattr(side, name) or {}).items():
            tensors[f"{name}.{L}"] = v.numpy()  # float32: exactly what the piece read
    return tensors, meta


def _heads_side(tensors: dict, meta: dict):
    import torch

    from mdiff.rq4 import HeadsSide

    def get(name):
        return {int(L): torch.from_numpy(tensors[f"{name}.{L}"]) for L in meta["layers"]}

    return HeadsSide(get("z_sel"), get("z_val"), get("z_tr") if meta["train"] else None, get("W_O"))


def _heads_arrays(part) -> tuple[dict, dict]:
    import numpy as np

    sel, val, chk = list(part.kl_sel), list(part.kl_val), list(part.kl_check)
    tensors = {"floor": np.asarray(part.floor, np.float64)}
    tensors.update({f"sel.{i}": np.asarray(part.kl_sel[k], np.float64) for i, k in enumerate(sel)})
    tensors.update({f"val.{i}": np.asarray(part.kl_val[k], np.float64) for i, k in enumerate(val)})
    tensors.update({f"check.{i}": np.asarray(part.kl_check[k], np.float64) for i, k in enumerate(chk)})
    return tensors, {"layers": part.layers, "sel": [list(k) for k in sel], "val": [list(k) for k in val],
                     "check": [list(k) for k in chk], "engine": part.engine,
                     "fitted_r2": [[L, s, v] for (L, s), v in part.fitted_r2.items()],
                     "head_fits": [[L, s, v] for (L, s), v in part.head_fits.items()]}


def _heads_part(tensors: dict, meta: dict):
    from mdiff.rq4 import HeadsPart

    def keyed(name):
        return {(int(k[0]), *k[1:]): tensors[f"{name}.{i}"] for i, k in enumerate(meta[name])}

    return HeadsPart([int(x) for x in meta["layers"]], tensors["floor"], keyed("sel"), keyed("check"),
                     keyed("val"), {(int(L), s): v for L, s, v in meta["fitted_r2"]},
                     {(int(L), s): v for L, s, v in meta["head_fits"]}, meta["engine"])


def _write_subpart(out: Path, pair: str, pc: Piece, settings: dict, identity: str, tensors: dict | None,
                   meta: dict | None, seconds: float) -> None:
    """A piece's data (safetensors, metadata as JSON in its header; already written for a fit piece), then its
    receipt; each atomically."""
    from safetensors.numpy import save

    from mdiff.activations import atomic_write_text

    data = subpart_path(out, pair, pc.key, pc.kind)
    if tensors is not None:
        data.parent.mkdir(parents=True, exist_ok=True)
        blob = save({k: v.reshape(-1) if v.ndim == 0 else v for k, v in tensors.items()},
                    metadata={"mdiff": json.dumps(meta, default=str)})
        tmp = tmp_path(data)
        tmp.write_bytes(blob)
        os.replace(tmp, data)
    atomic_write_text(part_path(out, pair, pc.key), json.dumps(
        {"key": pc.key, "pair": pair, "unit": pc.name, "identity": identity, "settings": settings,
         "seconds": seconds, "data": data.name, "data_bytes": _data_bytes(data)}, indent=1, default=str))


def _load_subpart(out: Path, pair: str, key: str) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(subpart_path(out, pair, key)), framework="numpy") as f:
        meta = json.loads(f.metadata()["mdiff"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


TEST_DIE_VAR = "MDIFF_TEST_DIE_IN_UNIT"


def _test_die_hook(step: str, progress):
    """Test-only (tests/test_units.py), inert unless ``MDIFF_TEST_DIE_IN_UNIT=<unit>:<marker file>`` is set: the
    first time a unit named ``<unit>`` (or a piece of it, ``<unit>:...``) runs, its process dies (``os._exit(137)``, like a kill) at the step's first progress
    report, mid-step, after creating the marker file; a retry finds the marker and runs normally."""
    want = os.environ.get(TEST_DIE_VAR)
    if not want:
        return progress
    die_step, _, marker = want.rpartition(":")
    if not (step == die_step or step.startswith(die_step + ":")) or not marker or Path(marker).exists():
        return progress

    def die(msg: str, frac: float) -> None:
        Path(marker).touch()
        os._exit(137)

    return die
