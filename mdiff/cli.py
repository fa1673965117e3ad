"""The ``mdiff`` command line: one command per research question, over the library.

Errors in the user's input (:class:`~mdiff.errors.MdiffError`) are printed as one line, with no
traceback, and exit with status 2.
"""

import errno
import functools
import inspect
import json
import os
import sys
from typing import Annotated

import typer
from rich.console import Console

from mdiff.config import (
    CollectConfig,
    ExecutorConfig,
    RQ1Config,
    RQ2Config,
    RQ3Config,
    RQ4Config,
    StudyConfig,
)
from mdiff.errors import MdiffError
from mdiff.pairs import with_prompts

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    help="mdiff: mechanistic model diffing of a base LLM and its fine-tune (TransformerLens 4).",
)
console = Console(stderr=True)
out = Console()

PairOpt = Annotated[str, typer.Option("--pair", "-p", help="Built-in pair name (see `mdiff pairs`) or a pair .toml file.")]
DeviceOpt = Annotated[str | None, typer.Option(help="Torch device (default: cuda if available, else cpu).")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads of torch and of numpy/scipy's BLAS (default: their choice; 1 in tests/CI; "
                                 "give it for bit-identical results across machines and executors).")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace results of an earlier run with other settings "
                                                 "(the old folder is kept as <name>.prev-N).")]
PromptsFileOpt = Annotated[str | None, typer.Option(
    "--prompts", help="JSONL prompt set to use instead of the pair's own (e.g. the file `mdiff prompts` writes).")]


_ENV_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
               errno.ENAMETOOLONG, errno.EEXIST}


_FIXED_FLAGS = {"out": "--out", "prompts_file": "--prompts"}
"""Run options that are not config fields, whose flag is not ``--`` + the setting name."""


@functools.cache
def flag_names() -> dict[str, str]:
    """Setting name → CLI flag, where the flag is not ``--`` + the name with ``_`` → ``-``: read from the config
    dataclasses' declarations (:mod:`mdiff.config`), so each flag is written once. A setting two commands spell
    differently (RQ3's ``--ks``, RQ4's ``--k``) keeps the default spelling."""
    from mdiff.config import cli_fields, flag_of

    seen: dict[str, set[str]] = {}
    for cls in (RQ1Config, RQ2Config, RQ3Config, RQ4Config, StudyConfig, ExecutorConfig):
        for f, _ in cli_fields(cls):
            seen.setdefault(f.name, set()).add(flag_of(f).split("/", 1)[0])
    names = {k: next(iter(v)) for k, v in seen.items() if len(v) == 1 and next(iter(v)) != _default_flag(k)}
    return {**names, **_FIXED_FLAGS}


def _default_flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _flag(option: str) -> str:
    return flag_names().get(option, _default_flag(option))


def cli_errors(fn):
    """Turn MdiffError (and a full disk, a read-only folder...) into a one-line message and exit status 2;
    Ctrl-C and SIGTERM into one line and status 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            _say_interrupted()
            raise typer.Exit(130) from None
        except Exception as e:
            if _terminated and not isinstance(e, typer.Exit):
                # SIGTERM can surface as another error: an import it cut short raises ImportError
                _say_interrupted()
                raise typer.Exit(130) from None
            if isinstance(e, MdiffError):
                console.print(f"[bold red]error:[/] {e.render(_flag)}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            if isinstance(e, OSError) and e.errno in _ENV_ERRNOS:
                where = f": {e.filename}" if e.filename else ""
                console.print(f"[bold red]error:[/] {e.strerror}{where} (check --out and free space, then rerun)",
                              highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            raise

    return wrapper


_terminated = False
"""SIGTERM arrived (:func:`_terminate`)."""


_INTERRUPTED_LINE = "interrupted; rerun the same command to resume"
_said_interrupted = False


def _say_interrupted() -> None:
    global _said_interrupted
    if not _said_interrupted:
        _said_interrupted = True
        console.print(_INTERRUPTED_LINE, highlight=False, soft_wrap=True)


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise MdiffError(f"--device {device!r} is not a torch device: use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise MdiffError(f"--device {device}: {why}; use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise MdiffError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise MdiffError(f"--device {device}: MPS is not available here; use --device cpu")
    elif d.type != "cpu":
        raise MdiffError(f"--device {device}: mdiff runs on cpu, cuda or mps")


SEED_MAX = 2**31 - 1


def _setup(threads: int | None, seed: int | None = None, batch_size: int | None = None,
           device: str | None = None, n: int | None = None) -> None:
    """Check the options every command shares (each error names its option), then set threads."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise MdiffError(f"--seed must be a whole number in 0..{SEED_MAX}, got {seed}")
    if n is not None and n < 1:
        raise MdiffError(f"--n must be ≥ 1, got {n}")
    if batch_size is not None and batch_size < 1:
        raise MdiffError(f"--batch-size must be ≥ 1 (prompts per forward pass), got {batch_size}")
    _check_device(device)
    if threads is not None:
        if threads < 1:
            raise MdiffError(f"--threads must be ≥ 1, got {threads}")
        from mdiff.threads import set_threads

        set_threads(threads)


@app.command("pairs")
@cli_errors
def pairs_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list (name, base, tuned, truth...).")] = False,
    build: Annotated[bool, typer.Option(help="Build the toy pairs first if they are not cached yet.")] = False,
):
    """List the built-in pairs: the two real 8B pairs and the offline toy pairs with their planted truth."""
    from mdiff.pairs import list_pairs

    rows = list_pairs(build_toys=build)
    if as_json:
        out.print_json(json.dumps(rows)) if sys.stdout.isatty() else print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    t = Table(title="mdiff pairs")
    for col in ("name", "base", "tuned", "notes"):
        t.add_column(col, overflow="fold")
    for r in rows:
        note = r["description"]
        if r["kind"] in ("toy", "fixture"):
            note += f"  [truth: {json.dumps(r['truth'], separators=(',', ':'))}]"
            if not r["built"]:
                note += f"  (built on first use, {r.get('build_time', '~1 min')})"
        t.add_row(r["name"], r["base"], r["tuned"], note)
    out.print(t)


@app.command("prompts")
@cli_errors
def prompts_cmd(
    pair: PairOpt = "cultural",
    dataset_dir: Annotated[str | None, typer.Option(help="A local copy of the pair's dataset (same schema as on the "
                                                         "hub), e.g. from `hf download ... --local-dir DIR`.")] = None,
    out_file: Annotated[str | None, typer.Option("--out", help="Write the JSONL here instead of the mdiff cache.")]
    = None,
):
    """Materialise a pair's prompt set from its dataset source into a cached JSONL with provenance."""
    from mdiff import data
    from mdiff.pairs import resolve_pair

    spec = resolve_pair(pair, build=False)
    if spec.prompt_source is None:
        where = spec.prompts or "nothing"
        raise MdiffError(f"pair {spec.name!r} names no dataset source (its prompts: {where}); use that file directly")
    src = data.source_from_dict(spec.prompt_source, f"pair {spec.name} prompts")
    path, prov = data.materialise_source(spec.name, src, dataset_dir, out_file)
    origin = prov["origin"]
    out.print(f"[bold]{spec.name}[/]: {src.dataset} (split {src.split}"
              + (f", revision {origin['revision']}" if origin.get("revision") else "")
              + (f", local copy {origin['local_dir']}" if origin.get("local_dir") else "")
              + f"), fingerprint {origin.get('fingerprint')}", highlight=False, soft_wrap=True)
    out.print(f"  read {prov['rows_read']} rows, kept {prov['kept']}", highlight=False, soft_wrap=True)
    for why, k in prov["dropped"].items():
        out.print(f"  dropped {k}: {why}", highlight=False, soft_wrap=True)
    out.print(f"  categories kept: {json.dumps(prov['categories_kept'], ensure_ascii=False)}", highlight=False, soft_wrap=True)
    if spec.min_shared_ratio > 0:
        out.print(f"  fairness filter min_shared_ratio={spec.min_shared_ratio} is applied at run time, with both "
                  f"tokenizers", highlight=False, soft_wrap=True)
    out.print(f"wrote {path} (+ .provenance.json)", highlight=False, soft_wrap=True)


@app.command("build-toys")
@cli_errors
def build_toys_cmd(threads: ThreadsOpt = None):
    """Build the offline toy pairs (tokenizer, trained base, planted and fine-tuned variants) into the cache."""
    _setup(threads)
    from mdiff import toy

    if toy.is_built():
        out.print(f"toy pairs already built: {toy.toy_dir()}")
        return
    out.print(f"building toy pairs into {toy.toy_dir()} ...")
    root = toy.build_toys(progress=True)
    info = json.loads((root / "build.json").read_text())
    out.print(f"built in {info['seconds']} s: {root}")


@app.command("info")
@cli_errors
def info_cmd(
    pair: PairOpt = "toy-lowrank",
    load: Annotated[bool, typer.Option(help="Also load each model (one at a time) and compare next-token predictions.")] = False,
    n: Annotated[int, typer.Option(help="Prompts to compare with --load.")] = 32,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
):
    """Describe a pair: shapes, tokenizer relation and hashes; with --load, next-token KL between the models."""
    _setup(threads, device=device, n=n)
    from mdiff.models import inspect_pair
    from mdiff.pairs import resolve_pair

    spec = resolve_pair(pair, progress=True)
    info = inspect_pair(spec)
    summary = {"pair": spec.name, "base": spec.base, "tuned": spec.tuned, "dtype": spec.dtype, **info.to_dict()}
    if spec.truth is not None:
        summary["truth"] = spec.truth
    if load:
        from mdiff.quick import next_token_comparison

        summary["comparison"] = next_token_comparison(spec, n=n, device=device)
    print(json.dumps(summary, indent=2))


def collect_cmd(**kw):
    """Collect activations of both models, one at a time, into safetensors shards + a JSON manifest (resumable)."""
    from mdiff.config import Shape

    run = {p.name: kw.pop(p.name) for p in _RUN_PARAMS}
    _setup(run["threads"], seed=kw["seed"], batch_size=kw["batch_size"], device=kw["device"], n=kw["n"])
    from mdiff.activations import collect_pair
    from mdiff.config import COLLECT_SIDES
    from mdiff.models import inspect_pair
    from mdiff.pairs import resolve_pair

    spec = with_prompts(resolve_pair(run["pair"], progress=True), run["prompts_file"])
    info = inspect_pair(spec)
    cfg = CollectConfig.from_cli(kw, Shape(info.base.n_layers, info.base.n_heads, info.base.d_model, kw["seed"]))
    with _progress_bar("collect") as prog:
        def on_progress(s, done, total):
            prog.count(s, f"collect {s} shards", done, total)

        res = collect_pair(spec, cfg.layers, cfg.hooks, cfg.positions, cfg.split, run["out_dir"],
                           COLLECT_SIDES[cfg.side], cfg.seed, cfg.batch_size, device=cfg.device, n=cfg.n,
                           on_progress=on_progress, replace=run["overwrite"])
    for s, r in res.items():
        out.print(f"{s}: {r.n_rows} rows in {r.n_shards} shards ({r.skipped_shards} already done) -> {r.path}")


class _LazyProgress:
    """A rich progress bar that appears on the first update, so errors raised before any work print cleanly."""

    def __init__(self, name: str):
        self.name = name
        self.prog = None
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        return self

    def _start(self):
        if self.prog is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.prog = Progress(TextColumn("{task.description:<40}"), BarColumn(),
                                 TextColumn("{task.completed:>.0f}/{task.total:>.0f}"), TimeElapsedColumn(),
                                 console=console, transient=False)
            self.prog.start()

    def fraction(self, msg: str, frac: float) -> None:
        self.count(self.name, f"{self.name}: {msg}", round(100 * frac), 100)

    def count(self, key: str, desc: str, done: int, total: int) -> None:
        self._start()
        if key not in self.tasks:
            self.tasks[key] = self.prog.add_task(desc, total=total)
        self.prog.update(self.tasks[key], description=desc, completed=done, total=total)

    def __exit__(self, exc_type, *exc):
        if self.prog is not None:
            if exc_type is not None:  # a failed run: the one-line error stands alone
                self.prog.live.transient = True
            self.prog.stop()
        return False


def _progress_bar(name: str = "run") -> _LazyProgress:
    return _LazyProgress(name)


# ------------------------------------------------------------------ the RQ commands, built from their configs
# Each RQ's options live once, in its config dataclass (mdiff.config): flag, help, CLI default, parser, settings
# key. _rq_command turns them into Typer options, adds the options every run shares (pair, output folder,
# overwrite, prompts file, threads) and any command-only ones, and does what every RQ command does: check the
# shared options, resolve the pair, parse the options against its shape, run with a progress bar, print.
def _option_params(cfg_cls) -> list[inspect.Parameter]:
    from mdiff import config as C

    params = []
    for f, o in C.cli_fields(cfg_cls):
        default = C.cli_default(f)
        typ = o.cli_type if o.cli_type is not None else f.type
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if default is C.NOTSET else default,
            annotation=Annotated[typ, typer.Option(C.flag_of(f), help=o.help)]))
    return params


_RUN_PARAMS = [
    inspect.Parameter("pair", inspect.Parameter.KEYWORD_ONLY, default="toy-lowrank", annotation=PairOpt),
    inspect.Parameter("out_dir", inspect.Parameter.KEYWORD_ONLY, default="results", annotation=Annotated[
        str, typer.Option("--out", help="Output folder; writes OUT/<pair>/<command>/.")]),
    inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=OverwriteOpt),
    inspect.Parameter("prompts_file", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=PromptsFileOpt),
    inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ThreadsOpt),
]


def _rq_command(name: str, cfg_cls, runner, *, extra: tuple[inspect.Parameter, ...] = (), adjust=None):
    """Register ``mdiff <name>``: the config's options + the shared run options + ``extra``; the decorated function
    prints the summary: ``report(summary, spec, cfg, out_dir, **extra_values)``. ``adjust(values, extras, info)``
    may combine command-only options into the config's CLI values before they are parsed."""

    def deco(report):
        params = [*_option_params(cfg_cls), *extra, *_RUN_PARAMS]

        def command(**kw):
            from mdiff.config import Shape
            from mdiff.models import inspect_pair
            from mdiff.pairs import resolve_pair
            from mdiff.stats import check_bootstrap

            run = {p.name: kw.pop(p.name) for p in _RUN_PARAMS}
            extras = {p.name: kw.pop(p.name) for p in extra}
            _setup(run["threads"], seed=kw["seed"], batch_size=kw["batch_size"], device=kw["device"], n=kw["n"])
            check_bootstrap(kw["n_boot"])
            spec = with_prompts(resolve_pair(run["pair"], progress=True), run["prompts_file"])
            info = inspect_pair(spec)
            if adjust is not None:
                kw = adjust(kw, extras, info)
            shape = Shape(info.base.n_layers, info.base.n_heads, info.base.d_model, kw["seed"])
            cfg = cfg_cls.from_cli(kw, shape)
            with _progress_bar(name) as prog:
                summary = runner(spec, cfg, run["out_dir"], run["overwrite"], progress=prog.fraction)
            report(summary, spec, cfg, run["out_dir"], **extras)

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__name__ = report.__name__
        command.__qualname__ = report.__qualname__
        command.__doc__ = report.__doc__
        wrapped = cli_errors(command)
        app.command(name)(wrapped)
        return wrapped

    return deco


def _lazy(module: str, attr: str):
    """``module.attr``, imported when called (the CLI starts without torch)."""
    def call(*a, **k):
        import importlib

        return getattr(importlib.import_module(module), attr)(*a, **k)
    return call


def _stride_layers(values, extras, info):
    if extras["stride"] < 1:
        raise MdiffError(f"--stride must be ≥ 1, got {extras['stride']}")
    from mdiff.config import Shape, layer_list

    layers = layer_list(values["layers"], Shape(info.base.n_layers, 1, 1), "--layers")[::extras["stride"]]
    return {**values, "layers": ",".join(map(str, layers))}


@_rq_command("rq1", RQ1Config, _lazy("mdiff.rq1", "run_rq1"), adjust=_stride_layers, extra=(
    inspect.Parameter("stride", inspect.Parameter.KEYWORD_ONLY, default=1, annotation=Annotated[
        int, typer.Option(help="Keep every S-th of the chosen layers.")]),))
def rq1_cmd(summary, spec, cfg, out_dir, stride):
    """RQ1 where: CKA and debiased CKA per layer (prompt-bootstrap CIs) and cross-model layer patch KL, both ways."""
    out.print(f"[bold]RQ1 {spec.name}[/] ({summary['hook']}): largest divergence at layers "
              f"{summary['largest_divergence_layers']} (CKA), largest patch KL at {summary['largest_patch_kl_layers']}; "
              f"probe layers {summary['suggested_probe_layers']}, control layer {summary['suggested_control_layer']}; "
              f"self-patch max KL {summary['self_patch_max_kl']:.2e}; KL tolerance {summary['noise']['kl_tolerance']:.2g} "
              f"nats ({summary['noise'].get('dtype', '')} noise floor)")
    for f in summary.get("findings", []):
        out.print(f)
    out.print(f"wrote {summary['path']}")


@_rq_command("rq2", RQ2Config, _lazy("mdiff.rq2", "run_rq2"), extra=(
    inspect.Parameter("freeze", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option(help="Also pin each site's winning map and α into rq2/winners.json.")]),))
def rq2_cmd(summary, spec, cfg, out_dir, freeze):
    """RQ2 transport: fit linear maps base → tuned per site; how much of the raw cross-patch KL does the map remove?"""
    from mdiff.rq2 import freeze_winners

    for site in summary["sites"]:
        tag = " (control)" if site["control_site"] else ""
        out.print(f"L{site['layer']} {site['hook']}{tag}: {site['verdict']}")
    for w in summary.get("warnings", []):
        out.print(f"warning: {w}")
    out.print(f"wrote {summary['path']}")
    if freeze:
        out.print(f"winners pinned in {freeze_winners(out_dir, spec.name)}")


@_rq_command("rq3", RQ3Config, _lazy("mdiff.rq3", "run_rq3"))
def rq3_cmd(summary, spec, cfg, out_dir):
    """RQ3 rank: how low-rank is the transport? drop(k) of the rank-k correction W_k = I + U_k V_kᵀ, smallest k."""
    for f in summary["findings"]:
        out.print(f)
    for w in summary.get("warnings", []):
        out.print(f"warning: {w}")
    out.print(f"wrote {summary['path']}")


def _one_or_several_layers(values, extras, info):
    layer, layers = extras["layer"], values["layers"]
    if layer is not None and layers is not None:
        raise MdiffError("give --layer L or --layers L1,L2, not both")
    if layer is None and layers is None:
        raise MdiffError(f"give --layer L (0..{info.base.n_layers - 1}) or --layers L1,L2: e.g. RQ1's probe layer")
    if layer is not None:
        from mdiff.config import Shape, one_layer

        return {**values, "layers": str(one_layer(layer, Shape(info.base.n_layers, 1, 1), "--layer"))}
    return values


@_rq_command("rq4", RQ4Config, _lazy("mdiff.rq4", "run_rq4"),
             adjust=_one_or_several_layers, extra=(
    inspect.Parameter("layer", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        int | None, typer.Option(help="Layer whose heads are scanned (or --layers for several).")]),))
def rq4_cmd(summary, spec, cfg, out_dir, layer):
    """RQ4 heads: which attention heads carry the difference? Per-head patching, top-k vs random-k, coverage, heatmaps."""
    for f in summary["findings"]:
        out.print(f)
    out.print(f"wrote {summary['path']}")


def _signature(fn, params: list[inspect.Parameter]):
    """Give ``fn(**kw)`` the Typer options ``params`` (built from config fields)."""
    fn.__signature__ = inspect.Signature(params)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn


collect_cmd = app.command("collect")(cli_errors(_signature(collect_cmd, [
    *_option_params(CollectConfig), *(
        p if p.name != "out_dir" else p.replace(annotation=Annotated[str, typer.Option(
            "--out", help="Output folder; writes OUT/<pair>/activations/.")]) for p in _RUN_PARAMS)])))


def _study_params() -> list[inspect.Parameter]:
    return _option_params(StudyConfig)


def _study_config(kw: dict):
    from mdiff.stats import check_bootstrap

    _setup(kw.get("threads"), seed=kw["seed"], batch_size=kw["batch_size"], device=kw["device"], n=kw["n"])
    check_bootstrap(kw["n_boot"])
    from mdiff.config import cli_fields

    return StudyConfig(**{f.name: kw[f.name] for f, _ in cli_fields(StudyConfig)})


_OUT_STUDY = inspect.Parameter("out_dir", inspect.Parameter.KEYWORD_ONLY, default="results", annotation=Annotated[
    str, typer.Option("--out", help="Output folder; writes OUT/<pair>/{rq1..rq4,report}/.")])
_PAIR = next(p for p in _RUN_PARAMS if p.name == "pair")


def study_cmd(**kw):
    """The whole study on one pair: RQ1 → RQ2 (probe sites) → RQ3 (best site) → RQ4 (best attention layer) → report.

    Resumable: steps already done with the same settings are kept, not redone. The study runs as units of work
    (`mdiff units` shows them): locally, on Ray, or on SLURM; the result folder is the only state.
    """
    from mdiff.config import cli_fields
    from mdiff.pairs import resolve_pair
    from mdiff.study import run_study

    scfg = _study_config(kw)
    excfg = ExecutorConfig(**{f.name: kw[f.name] for f, _ in cli_fields(ExecutorConfig)})
    out_dir, pair = kw["out_dir"], kw["pair"]
    spec = with_prompts(resolve_pair(pair, progress=True), kw["prompts_file"])
    if kw["dry_run"]:
        rec = run_study(spec, scfg, out_dir, dry_run=True)
        out.print(f"[bold]plan for {spec.name}[/] (out: {out_dir}/{spec.name}/)")
        for st in rec["steps"]:
            out.print(f"  {st['step']}: {st['status']} — {st['why']}")
            if st["settings"]:
                out.print(f"      {json.dumps({k: v for k, v in st['settings'].items() if k != 'pair'})}",
                          highlight=False, soft_wrap=True)
        return
    from mdiff.executors import make_executor

    with _progress_bar("study") as prog:
        ex = make_executor(excfg.executor, out_dir, prog.fraction, **excfg.kwargs())
        rec = run_study(spec, scfg, out_dir, kw["overwrite"], say=lambda m: console.print(m, highlight=False),
                        progress=prog.fraction, executor=ex, pair_ref=pair, threads=kw["threads"])
    from mdiff.report import findings, load_results

    for f in findings(load_results(out_dir, spec.name)):
        out.print(f"[bold]{f.rq.upper()}[/] {f.text}", highlight=False, soft_wrap=True)
    out.print(f"report: {rec['report']} (and summary.md)")


def _executor_params() -> list[inspect.Parameter]:
    return _option_params(ExecutorConfig)


study_cmd = app.command("study")(cli_errors(_signature(study_cmd, [
    _PAIR, _OUT_STUDY,
    inspect.Parameter("dry_run", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option(help="Print the plan (resolving what earlier results decide) and stop.")]),
    *_study_params(), *(p for p in _RUN_PARAMS if p.name in ("overwrite", "prompts_file", "threads")),
    *_executor_params()])))


def units_cmd(**kw):
    """The study's units of work (a step, or a piece of one that loads one model): key, status (done, ready, blocked
    or skipped) and receipt (part)."""
    from mdiff.pairs import resolve_pair
    from mdiff.units import plan_units

    scfg = _study_config(kw)
    from mdiff.patching import ENGINES

    if scfg.engine not in ENGINES:
        raise MdiffError(f"--engine must be one of {', '.join(ENGINES)}, got {scfg.engine!r}")
    spec = with_prompts(resolve_pair(kw["pair"], progress=True), kw["prompts_file"])
    units = plan_units(spec, scfg, kw["out_dir"])
    if kw["as_json"]:
        print(json.dumps([u.to_dict() for u in units], indent=2, default=str))
        return
    out.print(f"[bold]units of {spec.name}[/] (out: {kw['out_dir']}/{spec.name}/)")
    for u in units:
        receipt = "part" if u.part else "-"
        out.print(f"  {u.name or u.step:22}  {u.key or '-':16}  {u.status:8}  {receipt:4}  {u.why}", highlight=False,
                  soft_wrap=True,
                  markup=False)


units_cmd = app.command("units")(cli_errors(_signature(units_cmd, [
    _PAIR, inspect.Parameter("out_dir", inspect.Parameter.KEYWORD_ONLY, default="results", annotation=Annotated[
        str, typer.Option("--out", help="Output folder of the study.")]),
    *_study_params(), *(p for p in _RUN_PARAMS if p.name == "prompts_file"),
    inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--json", help="Print the units as a JSON list.")])])))


@app.command("report")
@cli_errors
def report_cmd(
    pair: PairOpt = "toy-lowrank",
    out_dir: Annotated[str, typer.Option("--out", help="Output folder holding OUT/<pair>/rq*/.")] = "results",
):
    """Rebuild OUT/<pair>/report/index.html and summary.md from the RQ results that exist."""
    from mdiff.pairs import resolve_pair
    from mdiff.report import build_report

    name = resolve_pair(pair, build=False).name
    out.print(f"report: {build_report(out_dir, name)}")


@app.command("compare")
@cli_errors
def compare_cmd(
    pairs: Annotated[str, typer.Option(help="Comma list of pairs with finished studies, e.g. toy-lowrank,toy-distributed.")]
    = "toy-lowrank,toy-distributed",
    out_dir: Annotated[str, typer.Option("--out", help="Output folder holding OUT/<pair>/; writes OUT/compare/.")]
    = "results",
    run_missing: Annotated[bool, typer.Option(help="Run `mdiff study` first for a pair that has no results.")] = False,
    threads: ThreadsOpt = None,
):
    """Two studies side by side: CKA curves, drop per site, drop(k), head coverage, and seed 003's TL;DR table."""
    _setup(threads)
    from mdiff.compare import run_compare
    from mdiff.pairs import resolve_pair

    names = [x.strip() for x in pairs.split(",") if x.strip()]
    names = [resolve_pair(p, build=run_missing).name for p in names]
    path = run_compare(names, out_dir, run_missing=run_missing)
    out.print((path.parent / "summary.md").read_text(), highlight=False, soft_wrap=True)
    out.print(f"compare report: {path}")


def _benchmarks_dir():
    """``experiments/benchmarks/`` of the source checkout this ``mdiff`` runs from (absent from an installed wheel)."""
    from pathlib import Path

    import mdiff

    return Path(mdiff.__file__).resolve().parents[1] / "experiments" / "benchmarks"


def _load_harness(name: str):
    """Import ``experiments/benchmarks/<name>.py`` as module ``name``, that folder on ``sys.path``.

    Imported by name, not from a file spec: the memory child (multiprocessing spawn) re-imports the module by name
    and inherits this process's ``sys.path``.
    """
    import importlib
    from pathlib import Path

    folder = _benchmarks_dir()
    if not (folder / f"{name}.py").is_file():
        raise MdiffError("the benchmark harness (experiments/benchmarks/) ships with mdiff's source checkout, not the "
                         "installed package: clone the mdiff repository, `pip install -e .` in it and rerun "
                         "`mdiff bench` there")
    if not any(Path(p or ".").resolve() == folder for p in sys.path):
        sys.path.insert(0, str(folder))
    mod = importlib.import_module(name)
    if Path(mod.__file__ or "").resolve().parent != folder:
        raise MdiffError(f"module {name!r} was imported from {mod.__file__}, not from the benchmark harness in "
                         f"{folder}; rerun `mdiff bench` in a fresh process")
    return mod


@app.command("bench")
@cli_errors
def bench_cmd(
    pair: PairOpt = "toy-lowrank",
    prompts: Annotated[int | None, typer.Option("--prompts", help="Prompts to patch (default: the whole set).")]
    = None,
    layer: Annotated[int | None, typer.Option(help="Patched layer (default: the last-but-one).")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per engine, interleaved; medians are reported.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass of the naive loop.")] = 32,
    memory: Annotated[bool, typer.Option(help="Also measure each engine's peak memory in a child process.")] = True,
    device: Annotated[str, typer.Option(help="Torch device.")] = "cpu",
    scale: Annotated[bool, typer.Option(help="Instead: RQ1 on the 8B-width Llama-3.1 fixture (default pair "
                                             "llama31-fixture, 16 prompts), time / peak memory / disk / models "
                                             "resident per step.")] = False,
    out_dir: Annotated[str, typer.Option("--out", help="With --scale: output folder (RQ1 results and the "
                                                       "scale-*.json/.md table under OUT/bench-scale/).")]
    = "results",
    threads: ThreadsOpt = None,
):
    """Benchmark the patching engine against the naive loop (RQ4 head grid + RQ2 α sweep both ways)."""
    _setup(threads, batch_size=batch_size, device=device)
    harness = _load_harness("scale" if scale else "engines")  # experiments/benchmarks/{engines,scale}.py
    if scale:
        with _progress_bar("bench --scale") as prog:
            res = harness.run_scale("llama31-fixture" if pair == "toy-lowrank" else pair, n=prompts or 16,
                                    out=out_dir, device=device, say=prog.fraction)
        out.print(harness.format_scale(res), highlight=False, soft_wrap=True)
        out.print(f"wrote {harness.write_scale(res, os.path.join(out_dir, 'bench-scale'))}", highlight=False)
        return
    from mdiff.pairs import resolve_pair

    if repeats < 1:
        raise MdiffError(f"--repeats must be ≥ 1, got {repeats}")
    spec = resolve_pair(pair, progress=True)
    with _progress_bar("bench") as prog:
        res = harness.run_bench(spec, n_prompts=prompts, layer=layer, repeats=repeats, batch_size=batch_size,
                                say=prog.fraction, memory=memory, device=device)
    out.print(harness.format_table(res), highlight=False, soft_wrap=True)


@app.command("freeze")
@cli_errors
def freeze_cmd(
    pair: PairOpt = "toy-lowrank",
    out_dir: Annotated[str, typer.Option("--out", help="Output folder holding OUT/<pair>/rq2/.")] = "results",
):
    """Pin RQ2's winning map and α per site into rq2/winners.json, so RQ3/RQ4 never chase timestamps."""
    from mdiff.pairs import resolve_pair
    from mdiff.rq2 import freeze_winners

    name = resolve_pair(pair, build=False).name
    out.print(f"winners pinned in {freeze_winners(out_dir, name)}")


@app.command("demo")
@cli_errors
def demo_cmd(
    pair: PairOpt = "toy-lowrank",
    out_dir: Annotated[str, typer.Option("--out", help="Output folder.")] = "results",
    threads: ThreadsOpt = None,
):
    """The main job on the embedded default pair: build the toys if needed, then run the analyses end to end."""
    _setup(threads)
    from mdiff.demo import run_demo

    with _progress_bar("demo") as prog:
        run_demo(pair, out_dir, console=out,
                 progress=prog.fraction)


def _terminate(signum, frame):
    """SIGTERM unwinds like Ctrl-C: temporary folders removed, one line printed, status 130. Only the first
    one unwinds: a second TERM (schedulers often send several) must not interrupt the clean-up."""
    import signal

    global _terminated
    _terminated = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main() -> None:  # console-script entry point
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except KeyboardInterrupt:  # one that arrived outside a command's own handling (start-up, a second signal)
        _say_interrupted()
        _exit_interrupted()
    except SystemExit as e:
        if e.code == 130:  # ours, or typer's for an interrupt before the command ran (while parsing, importing)
            _say_interrupted()
            _exit_interrupted()
        raise


def _exit_interrupted() -> None:
    """Leave with status 130 for sure. An interrupt that lands while Python runs an import of the command can
    leave CPython's "unhandled KeyboardInterrupt" mark set even though the command handled it; the interpreter
    then kills itself with SIGINT at exit (status -2) instead of 130. The command's clean-up has run by now
    (temporary folders removed, the line printed), so run the exit handlers (a local Ray cluster's shutdown,
    logging), flush and exit directly."""
    import atexit
    import os
    import sys

    try:
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - leaving anyway, with the documented status
        pass
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
