"""Writing results: tidy metrics.csv, summary.json, config.json with provenance, HTML figures; atomically.

A results folder is written into a temporary sibling and renamed into place, so a reader never sees
half a run. An existing folder from a run with *other* settings is never overwritten silently: the
caller must ask for it (``overwrite=True``), and the old folder is then kept as ``<name>.prev``.
"""

import datetime as _dt
import importlib.metadata as _md
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from mdiff.errors import MdiffError

METRIC_COLUMNS = ["pair", "rq", "layer", "hook", "condition", "metric", "value", "ci_low", "ci_high", "n"]


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def provenance() -> dict[str, Any]:
    versions = {}
    for pkg in ("mdiff", "torch", "transformers", "transformer-lens", "numpy", "scipy", "scikit-learn", "pandas",
                "plotly", "tokenizers", "safetensors"):
        try:
            versions[pkg] = _md.version(pkg)
        except _md.PackageNotFoundError:
            versions[pkg] = None
    import torch

    return {"versions": versions, "python": sys.version.split()[0], "platform": platform.platform(),
            "git_commit": _git_commit(), "torch_threads": torch.get_num_threads(),
            "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def run_config(writer: "ResultWriter", spec, info, shared_vocab_size: int, tokenized_with: str, split_seed: int,
               splits: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """Every RQ's ``config.json`` (METHODS, Reporting): settings, pair, shapes, tokenization, prompts, provenance.

    ``splits`` maps a split name to its prepared prompts (``summary()`` and ``prompt_ids``); ``fields`` are the
    RQ's own entries.
    """
    splits = splits or {}
    return {"settings": writer.settings, "pair": spec.to_dict(), "pair_info": info.to_dict(),
            "tokenized_with": tokenized_with, **{k: p.summary() for k, p in splits.items()},
            **{f"{k}_prompt_ids": p.prompt_ids for k, p in splits.items()}, "split_seed": split_seed,
            "kl_vocabulary": f"shared vocabulary ({shared_vocab_size} ids), renormalised", **fields,
            "dtype": spec.dtype, "provenance": provenance()}


def tidy(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for c in METRIC_COLUMNS:
        if c not in df.columns:
            df[c] = None
    return df[METRIC_COLUMNS + [c for c in df.columns if c not in METRIC_COLUMNS]]


def check_destination(path: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to replace results of a run with other settings unless ``overwrite``."""
    cfg = path / "config.json"
    if not cfg.exists() or overwrite:
        return
    old = json.loads(cfg.read_text()).get("settings", {})
    if old == json.loads(json.dumps(settings)):
        return  # the same run again: deterministic, replacing it loses nothing
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    raise MdiffError(f"{path} holds results of a run with other settings (differs in: {', '.join(diff)}); "
                     f"use another --out, or --overwrite (the old folder is kept as {path.name}.prev)")


class ResultWriter:
    """Collects a run's files in a temporary folder, then moves it into place in one rename."""

    def __init__(self, path: str | Path, settings: dict[str, Any], overwrite: bool = False):
        self.path = Path(path)
        check_destination(self.path, settings, overwrite)
        self.settings = settings
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()

    def file(self, name: str) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def json(self, name: str, obj: Any) -> None:
        self.file(name).write_text(json.dumps(obj, indent=2, default=_jsonable), encoding="utf-8")

    def csv(self, name: str, df: pd.DataFrame) -> None:
        df.to_csv(self.file(name), index=False)

    def figure(self, name: str, fig) -> None:
        from mdiff.figures import write_html

        write_html(fig, self.file(name))

    def commit(self) -> Path:
        if self.path.exists():
            prev = self.path.with_name(self.path.name + ".prev")
            if prev.exists():
                shutil.rmtree(prev)
            os.replace(self.path, prev)
            os.replace(self.tmp, self.path)
            same = (prev / "config.json").exists() and json.loads((prev / "config.json").read_text()).get(
                "settings") == json.loads(json.dumps(self.settings, default=_jsonable))
            if same:
                shutil.rmtree(prev)  # identical settings: the old run is reproduced exactly
        else:
            os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:  # an interrupted or failed run leaves nothing half-written
            self.abort()
        return False


def _jsonable(o: Any):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
