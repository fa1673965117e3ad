"""The one runner every RQ goes through: validate, compute over a session, write atomically with provenance.

Each RQ module provides three things (:class:`Step`):

* ``check(cfg, info) -> cfg``: validates the config against the pair's shapes (one-line :class:`MdiffError`)
  and fills in defaults that depend on them (a new frozen config, never a mutated one);
* ``compute(session, cfg, say) -> StepResult``: the pure computation over a :class:`mdiff.session.PairSession`;
  it writes nothing but activation-store caches, and returns tables whose metric and condition names are
  declared in :mod:`mdiff.schema`;
* ``figures(result, pair, cfg) -> {file name: go.Figure}``.

:func:`run_step` opens the result folder (refusing, before any work, to overwrite another run), calls them,
writes ``metrics.csv``, ``summary.json``, ``config.json`` (settings, pair, prompts, provenance), the extra
tables, maps and figures into a temporary folder and renames it into place (:class:`mdiff.io.ResultWriter`).
A run that fails or is interrupted leaves no result; its activation stores resume.
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from mdiff.io import ResultWriter, run_config
from mdiff.pairs import PairSpec
from mdiff.session import PairSession


@dataclasses.dataclass
class StepResult:
    """What one RQ computed: its tidy metrics, summary, and what ``config.json`` records about its inputs."""

    metrics: pd.DataFrame
    summary: dict[str, Any]
    shared_vocab_size: int
    tokenized_with: str
    splits: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Split name → the prepared prompts it used (``config.json`` records their summary and prompt ids)."""
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The RQ's own ``config.json`` entries."""
    tables: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)
    """Further CSV files (name → table)."""
    maps: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Fitted maps to save (path prefix inside the folder → estimator; :func:`mdiff.maps.save_map`)."""


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    check: Callable[[Any, Any], Any]
    compute: Callable[[PairSession, Any, Callable[[str, float], None]], StepResult]
    figures: Callable[[StepResult, str, Any], dict]


def write_result(writer: ResultWriter, spec: PairSpec, info, cfg, result: StepResult, figures: dict) -> None:
    """Write one RQ's result files into ``writer`` (not yet committed)."""
    from mdiff import maps

    for prefix, est in result.maps.items():
        maps.save_map(est, writer.file(prefix))
    writer.csv("metrics.csv", result.metrics)
    for name, table in result.tables.items():
        writer.csv(name, table)
    writer.json("summary.json", result.summary)
    writer.json("config.json", run_config(writer, spec, info, result.shared_vocab_size, result.tokenized_with,
                                          cfg.seed, result.splits, **result.config))
    for name, fig in figures.items():
        writer.figure(name, fig)


def run_step(step: Step, spec: PairSpec, cfg, out: str | Path, overwrite: bool = False,
             progress: Callable[[str, float], None] | None = None, session: PairSession | None = None
             ) -> dict[str, Any]:
    """Run one RQ on ``spec`` and write ``out/<pair>/<rq>/``; returns its summary (with ``path``).

    ``session``: an open session of this pair and output folder (a worker that keeps its model loaded);
    default: a new one, closed at the end."""
    say = progress or (lambda msg, frac: None)
    own = session is None
    session = session or PairSession(spec, out, replace=overwrite)
    try:
        cfg = step.check(cfg, session.info)
        session = session.with_options(cfg.seed, cfg.n, cfg.batch_size, cfg.device)
        writer = ResultWriter(Path(out) / spec.name / step.name, {"pair": spec.name, **cfg.settings()}, overwrite)
        with writer:  # refuses before any work if it would overwrite another run
            result = step.compute(session, cfg, say)
            write_result(writer, spec, session.info, cfg, result, step.figures(result, spec.name, cfg))
            path = writer.commit()
    finally:
        if own:
            session.close()
    say("done", 1.0)
    summary = dict(result.summary)
    summary["path"] = str(path)
    return summary
