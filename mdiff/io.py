"""Writing results: tidy metrics.csv, summary.json, config.json with provenance, HTML figures; atomically.

A results folder is written into a temporary sibling and renamed into place, so a reader never sees
half a run. An existing folder from a run with *other* settings is never overwritten silently: the
caller must ask for it (``overwrite=True``), and the old folder is then kept as ``<name>.prev-N`` (never
deleted, never reused). A folder mdiff did not write (no readable ``config.json``) is never touched.
"""

import datetime as _dt
import filecmp
import glob
import importlib.metadata as _md
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from mdiff.errors import MdiffError
from mdiff.tmpfiles import remove_stale_tmp, tmp_path

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


def prompts_sha256(spec) -> str | None:
    """sha256 of the pair's prompt file (``None`` without one): which prompts a run used, by content."""
    import hashlib

    p = getattr(spec, "prompts", None)
    if not p or not Path(p).is_file():
        return None
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def pair_identity(spec) -> str:
    """What a result depends on besides its settings: the pair as given (models, revisions, dtype, prompts,
    filters, templates), the prompt file's content and both models' weights fingerprints. A study step is only
    "done" when this matches (a model changed in place, another dtype or prompt set means: run it again)."""
    import hashlib

    from mdiff import models

    d = {k: v for k, v in spec.to_dict().items() if k not in ("description",)}
    d["prompts_sha256"] = prompts_sha256(spec)
    d["weights"] = {side: models.weights_fingerprint(ref, rev) for side, ref, rev in
                    (("base", spec.base, spec.base_revision), ("tuned", spec.tuned, spec.tuned_revision))}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


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
            "dtype": spec.dtype, "prompts_sha256": prompts_sha256(spec),
            "pair_identity": pair_identity(spec), "provenance": provenance()}


def tidy(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for c in METRIC_COLUMNS:
        if c not in df.columns:
            df[c] = None
    return df[METRIC_COLUMNS + [c for c in df.columns if c not in METRIC_COLUMNS]]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _not_ours(path: Path) -> str | None:
    """Why ``path`` is not a results folder mdiff wrote (``None`` when it is one)."""
    if not path.is_dir():
        return "is not a folder"
    cfg = path / "config.json"
    if not cfg.is_file():
        return "has no config.json"
    try:
        old = json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "has a config.json that is not valid JSON"
    if not isinstance(old, dict) or not isinstance(old.get("settings"), dict):
        return "has a config.json without mdiff settings"
    return None


def check_destination(path: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse a destination mdiff did not write, or one holding a run with other settings unless ``overwrite``.

    A folder without a readable mdiff ``config.json`` is never moved or replaced, even with ``overwrite``: it
    may be the user's own files. An empty folder is fine (replacing it loses nothing).
    """
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    why = "is a link" if path.is_symlink() else _not_ours(path)
    if why is not None:
        raise MdiffError(f"{path} exists but {why}, so mdiff did not write it and will not touch it; "
                         "move it elsewhere, or choose another output folder ({option})", option="out")
    old = json.loads((path / "config.json").read_text(encoding="utf-8"))["settings"]
    if overwrite or old == _norm(settings):
        return  # the same run again: its results are replaced (an identical old run is dropped, any other kept)
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != _norm(settings).get(k))
    raise MdiffError(f"{path} holds results of a run with other settings (differs in: {', '.join(diff)}); "
                     f"choose another output folder, or rerun with {{option}} to replace them (the old folder is kept "
                     f"as {next_prev(path).name})", option="overwrite")


def _norm(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_jsonable))


_PREV = re.compile(r"\.prev(?:-(\d+))?$")


def next_prev(path: Path) -> Path:
    """``<name>.prev-N`` with N one more than any earlier backup of ``path`` (backups are never reused)."""
    n = 0
    for p in path.parent.glob(f"{glob.escape(path.name)}.prev*"):
        m = _PREV.fullmatch(p.name[len(path.name):])
        if m:
            n = max(n, int(m.group(1) or 0))
    return path.with_name(f"{path.name}.prev-{n + 1}")


def _config_without_time(path: Path) -> Any:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        cfg.get("provenance", {}).pop("time_utc", None)
        return cfg
    except (ValueError, UnicodeDecodeError, AttributeError, OSError):
        return None


def same_results(a: Path, b: Path) -> bool:
    """Whether two results folders hold the same files with the same bytes (``config.json``'s run time aside)."""
    def files(root: Path) -> dict[str, Path]:
        return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file() or p.is_symlink()}

    fa, fb = files(a), files(b)
    if set(fa) != set(fb):
        return False
    for rel, pa in fa.items():
        pb = fb[rel]
        if pa.is_symlink() or pb.is_symlink():
            return False
        if rel == "config.json":
            if _config_without_time(pa) != _config_without_time(pb) or _config_without_time(pa) is None:
                return False
        elif pa.stat().st_size != pb.stat().st_size or not filecmp.cmp(pa, pb, shallow=False):
            return False
    return True


def _write_error(path: Path, e: OSError) -> MdiffError:
    return MdiffError(f"cannot write results under {path}: {e.strerror or e}; choose another output folder "
                      "({option})", option="out")


class ResultWriter:
    """Collects a run's files in a temporary folder, then moves it into place in one rename.

    Nothing earlier is ever deleted: a replaced run is kept as ``<name>.prev-N`` (N = 1, 2, ...), unless its
    files are identical to the new run's (then nothing would be lost). ``say`` gets the one line that says
    what was moved where (default: printed to stderr); :attr:`moved` holds that backup's path.
    """

    def __init__(self, path: str | Path, settings: dict[str, Any], overwrite: bool = False,
                 say: Callable[[str], None] | None = None):
        self.path = Path(path)
        if ".." in self.path.parts:
            raise MdiffError(f"results path {self.path} goes up with '..'; pair names must be plain names")
        self.say = say or _say
        self.moved: Path | None = None
        self._made: list[Path] = []
        for parent in self.path.parents:
            if parent.exists() or parent.is_symlink():
                if not parent.is_dir():
                    raise MdiffError(f"cannot write results under {parent}: it is a file, not a folder; "
                                     "choose another output folder ({option})", option="out")
                break
        check_destination(self.path, settings, overwrite)
        self.settings = settings
        self.overwrite = overwrite
        """The user asked to replace earlier work (caches such as activation stores are collected anew)."""
        self._made = [p for p in reversed(self.path.parents) if not p.exists()]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp(self.path.parent, self.path.name)
            self.tmp = tmp_path(self.path)
            self.tmp.mkdir()
        except OSError as e:
            self._remove_made()
            raise _write_error(self.path.parent, e) from None

    def file(self, name: str) -> Path:
        p = (self.tmp / name)
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise MdiffError(f"result file name {name!r} must stay inside the results folder")
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
        """Move the new run into place; an earlier run is kept as ``<name>.prev-N`` (one line says so)."""
        if self.path.exists() or self.path.is_symlink():
            if self.path.is_dir() and not self.path.is_symlink() and not any(self.path.iterdir()):
                self.path.rmdir()
            else:
                why = "is a link" if self.path.is_symlink() else _not_ours(self.path)
                if why is not None:  # appeared while this run was working: still not ours to move
                    raise MdiffError(f"{self.path} {why} (it appeared during this run), so mdiff will not touch "
                                     f"it; move it elsewhere and run again")
                if same_results(self.path, self.tmp):
                    shutil.rmtree(self.path)  # byte-identical results: nothing is lost
                else:
                    prev = next_prev(self.path)
                    os.rename(self.path, prev)
                    self.moved = prev
                    self.say(f"kept the earlier results of {self.path} as {prev}")
        os.replace(self.tmp, self.path)
        return self.path

    def _remove_made(self) -> None:
        for p in reversed(self._made):  # the deepest first; only folders this writer created, only if empty
            try:
                p.rmdir()
            except OSError:
                break

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._remove_made()

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
