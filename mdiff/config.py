"""Run configurations: each RQ's frozen config dataclass (all of them here: :class:`RQ1Config` …
:class:`RQ4Config`, :class:`StudyConfig`, :class:`ExecutorConfig`) is the single source of its options.

A field declared with :func:`option` carries everything about that input in one place:

* its **help text** and **CLI flag** (default ``--<name-with-dashes>``);
* how the CLI's text becomes the value (``parse``: ``"0,4,8"`` → ``[0, 4, 8]`` checked against the pair's
  shape) and the CLI's default in that text form (``cli_default``, e.g. ``"all"`` for every layer);
* its **settings key** (what ``config.json`` records and the study's unit keys hash; ``setting``), or that it is
  not a setting at all (``recorded=False``: batch size and device change no number).

The CLI builds every RQ command's options from these fields (:func:`cli_fields`) and turns its text into a
config with :meth:`RunConfig.from_cli`; the library, the study's plan and the executors use the same dataclass
(:meth:`RunConfig.settings`, :meth:`RunConfig.to_dict` / :meth:`RunConfig.from_dict`). Options that every RQ
shares (``n``, ``bootstrap``, ``seed``, ``batch_size``, ``device``, ``engine``) are declared once here, by the
field factories below.

This module knows nothing of the CLI library: flags and help are plain data.
"""

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from mdiff.errors import MdiffError
from mdiff.positions import DEFAULT_FIT_POSITIONS, PositionSpec, parse_positions

NOTSET: Any = object()


@dataclasses.dataclass(frozen=True)
class Shape:
    """What a CLI value is checked against: the pair's shape, and the run's seed (sampled positions use it)."""
    n_layers: int
    n_heads: int
    d_model: int
    seed: int = 0


Parser = Callable[[Any, Shape, str], Any]
"""``parse(cli_value, shape, flag) -> field value``; raises :class:`MdiffError` naming ``flag``. It receives the
CLI value as given, None included (the parsers below pass None through; one may resolve it to a default)."""


@dataclasses.dataclass(frozen=True)
class Option:
    """The metadata of one config field (see the module docstring)."""
    help: str
    flag: str | None = None
    cli_type: Any = None
    cli_default: Any = NOTSET
    parse: Parser | None = None
    setting: str | None = None
    recorded: bool = True
    cli: bool = True


def option(default: Any = NOTSET, *, help: str, default_factory: Any = NOTSET, flag: str | None = None,
           cli_type: Any = None, cli_default: Any = NOTSET, parse: Parser | None = None, setting: str | None = None,
           recorded: bool = True, cli: bool = True) -> Any:
    """A dataclass field with its :class:`Option` metadata."""
    meta = {"option": Option(help=help, flag=flag, cli_type=cli_type, cli_default=cli_default, parse=parse,
                             setting=setting, recorded=recorded, cli=cli)}
    kw: dict[str, Any] = {"metadata": meta}
    if default is not NOTSET:
        kw["default"] = default
    if default_factory is not NOTSET:
        kw["default_factory"] = default_factory
    return dataclasses.field(**kw)


def _opt(f: dataclasses.Field) -> Option:
    return f.metadata.get("option") or Option(help="", cli=False)


def flag_of(f: dataclasses.Field) -> str:
    o = _opt(f)
    return o.flag or "--" + f.name.replace("_", "-")


def cli_fields(cls) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of config class ``cls`` that are CLI options, in declaration order."""
    return [(f, _opt(f)) for f in dataclasses.fields(cls) if _opt(f).cli]


def cli_default(f: dataclasses.Field) -> Any:
    """The option's default as the CLI shows and accepts it (``NOTSET``: the option is required)."""
    o = _opt(f)
    if o.cli_default is not NOTSET:
        return o.cli_default
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return _text(f.default_factory())
    return NOTSET


def _text(v: Any) -> Any:
    if isinstance(v, PositionSpec):
        return "last" if v.kind == "last" else f"{v.kind}={v.k}"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return v


def jsonable(v: Any) -> Any:
    """A config value as JSON data (position specs as dicts, tuples as lists)."""
    if isinstance(v, PositionSpec):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


class RunConfig:
    """Methods shared by the RQ configs (frozen dataclasses whose fields are declared with :func:`option`)."""

    def settings(self) -> dict[str, Any]:
        """What the results record as this run's settings (and what decides "same run"): every recorded field,
        under its settings key."""
        return {(_opt(f).setting or f.name): jsonable(getattr(self, f.name))
                for f in dataclasses.fields(self) if _opt(f).recorded}

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON data; :meth:`from_dict` gives the same config back."""
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        kw = {}
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise MdiffError(f"{cls.__name__} has no setting {', '.join(unknown)}; "
                             f"known: {', '.join(names)}")
        for name, v in d.items():
            f = names[name]
            if isinstance(v, dict) and f.type is PositionSpec:
                v = PositionSpec(**v)
            elif isinstance(v, list) and "tuple" in str(f.type):
                v = tuple(v)
            kw[name] = v
        return cls(**kw)

    @classmethod
    def from_cli(cls, values: dict[str, Any], shape: Shape, **fixed: Any):
        """The config from the CLI's values (one per CLI field, in their CLI form), each parsed and checked
        against ``shape``; ``fixed`` gives fields that are not CLI options."""
        kw = dict(fixed)
        for f, o in cli_fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            kw[f.name] = o.parse(v, shape, flag_of(f)) if o.parse is not None else v
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# ------------------------------------------------------------------ parsers (CLI text → value)
def layer_list(text: str | None, shape: Shape, flag: str) -> list[int] | None:
    if text is None:
        return None
    from mdiff.options import parse_int_list

    return parse_int_list(str(text), flag, 0, shape.n_layers - 1, allow_all=True, what="layer")


def one_layer(v: int | None, shape: Shape, flag: str) -> int | None:
    if v is None:
        return None
    from mdiff.options import parse_int_list

    return parse_int_list(str(v), flag, 0, shape.n_layers - 1, what="layer")[0]


def choices(allowed: Sequence[str]) -> Parser:
    """A comma list, each item one of ``allowed``."""
    def parse(text: str | None, shape: Shape, flag: str) -> list[str] | None:
        if text is None:
            return None
        from mdiff.options import parse_str_list

        return parse_str_list(text, flag, tuple(allowed))
    return parse


def floats(text: str | None, shape: Shape, flag: str) -> list[float] | None:
    if text is None:
        return None
    vals = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            raise MdiffError(f"{flag} {text!r} has an empty item: use a comma list such as 0.3,0.5,1.0")
        try:
            vals.append(float(item))
        except ValueError:
            raise MdiffError(f"{flag}: {item!r} is not a number") from None
    return vals


def positions(text: str | None, shape: Shape, flag: str) -> PositionSpec | None:
    if text is None:
        return None
    from mdiff.options import setting_name

    return parse_positions(text, seed=shape.seed, option=setting_name(flag))


# ------------------------------------------------------------------ the options every RQ shares
def n_option() -> Any:
    return option(None, help="Use at most N prompts per split.", cli_type=int | None)


def bootstrap_option() -> Any:
    return option(1000, flag="--bootstrap", setting="bootstrap",
                  help="Bootstrap resamples over prompts for the CIs (≥ 1).")


def seed_option() -> Any:
    return option(0, help="Seed of the prompt splits, sampled positions, random nulls and the bootstrap.")


def batch_size_option() -> Any:
    return option(16, recorded=False, help="Prompts per forward pass.")


def device_option() -> Any:
    return option(None, recorded=False, cli_type=str | None,
                  help="Torch device (default: cuda if available, else cpu).")


def engine_option() -> Any:
    return option("fast", help="Patching engine: fast (recomputes only the decision position from the patched "
                               "layer; falls back to naive on unsupported models, and says so) or naive (one full "
                               "forward per condition). Recorded in config.json.")


def fit_positions_option() -> Any:
    return option(default_factory=lambda: parse_positions(DEFAULT_FIT_POSITIONS), cli_type=str,
                  cli_default=DEFAULT_FIT_POSITIONS, parse=positions,
                  help="Positions of the train prompts the maps are fit on: last, k=K, or upto=K (K content positions, "
                       "fewer when a prompt is shorter). Patching and every reported number stay at the decision "
                       "position on val.")


def alpha_mode_option() -> Any:
    return option("blend", help="blend: (1−α)·h_tuned + α·source; scale: α·source.")


SHARED = ("n", "n_boot", "seed", "batch_size", "device", "engine")
"""The fields every RQ config and the study's config share (same names, same meaning)."""


@dataclasses.dataclass(frozen=True)
class ExecutorConfig(RunConfig):
    """Where the study's units run (:func:`mdiff.executors.make_executor` takes these fields as keywords)."""
    executor: str = option("local", flag="--executor",
                           help="Where units run: local (here, one after another), ray (a Ray cluster; pip install "
                                "'mdiff\\[ray]'), or slurm (submitit job arrays; pip install 'mdiff\\[slurm]').")
    ray_address: str | None = option(None, cli_type=str | None,
                                     help="Ray cluster address (default: start a local one).")
    num_cpus: int | None = option(None, cli_type=int | None, help="CPUs of a local Ray cluster (default: all).")
    slurm_cluster: str = option("slurm", help="submitit cluster: slurm, or local (local processes).")
    partition: str | None = option(None, cli_type=str | None, help="SLURM partition.")
    timeout_min: int = option(120, help="SLURM time limit per unit, minutes.")
    mem_gb: int = option(64, help="SLURM memory per unit, GiB (one model in memory at a time).")

    def kwargs(self) -> dict[str, Any]:
        """The executor's keyword arguments (everything but its name)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "executor"}


# ------------------------------------------------------------------ the RQs' and the study's options
# Declared here, in a module that imports neither torch nor pandas, so that the CLI builds its commands
# without loading them (the RQ modules import these names from here).
COLLECT_HOOKS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "z")
COLLECT_SIDES = {"both": ("base", "tuned"), "base": ("base",), "tuned": ("tuned",)}
RQ1_HOOKS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
RQ2_HOOKS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
SOLVERS = ("identity", "mean-shift", "ridge", "ridge-zero", "procrustes", "procrustes-scaled", "whiten-procrustes",
           "pca-procrustes", "logit-subspace")
DEFAULT_SOLVERS = ("ridge", "ridge-zero", "procrustes", "procrustes-scaled", "whiten-procrustes")
RQ3_HOOKS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
METHODS = ("rrr", "pca-procrustes")
HEAD_SITES = ("result", "z")
SOURCES = ("raw", "mapped")


def default_ks(d_model: int) -> list[int | str]:
    """1, 2, 4, 8, … below ``d_model``, then ``"full"``."""
    ks: list[int | str] = []
    k = 1
    while k < d_model:
        ks.append(k)
        k *= 2
    return [*ks, "full"]


def parse_ranks(text: str | None, d_model: int) -> list[int | str]:
    """``"1,2,4,full"`` → ``[1, 2, 4, "full"]`` (sorted, unique; each k in 1..d_model); None → :func:`default_ks`."""
    from mdiff.options import parse_int_list

    if text is None:
        return default_ks(d_model)
    items = [x.strip() for x in text.split(",")]
    full = "full" in (x.lower() for x in items)
    rest = ",".join(x for x in items if x.lower() != "full")
    ks: list[int | str] = parse_int_list(rest, "ks", 1, d_model, what="rank k") if rest else []
    if not ks and not full:
        raise MdiffError("{option} is empty: give ranks such as 1,2,4,8,full", option="ks")
    return [*ks, *(["full"] if full else [])]


def _rank_list(text: str | None, shape: Shape, flag: str) -> list[int | str]:
    return parse_ranks(text, shape.d_model)


def parse_head_counts(text: str, n_heads: int, option: str = "k") -> list[int]:
    """``"1,2,4,8"`` → ``[1, 2, 4, 8]``; every k a whole number in ``1..n_heads`` (clear errors otherwise)."""
    from mdiff.options import parse_int_list

    try:
        return parse_int_list(text, option, 1, n_heads, what="head count")
    except MdiffError as e:
        raise MdiffError(f"{e.message} (this model has {n_heads} heads per layer)", option=e.option) from None


def one_of(allowed: Sequence[str]) -> Parser:
    """One value, one of ``allowed``."""
    def parse(v: str | None, shape: Shape, flag: str) -> str | None:
        if v is not None and v not in allowed:
            raise MdiffError(f"{flag} must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {v!r}")
        return v
    return parse


@dataclasses.dataclass(frozen=True)
class CollectConfig(RunConfig):
    """``mdiff collect``'s options, declared once."""
    layers: list[int] = option(help="Layers: all, or a comma list such as 0,2,4 (ranges a-b allowed).", cli_type=str,
                               cli_default="all", parse=layer_list)
    hooks: list[str] = option(help="Comma list of " + ", ".join(COLLECT_HOOKS) + ".", cli_type=str,
                              cli_default="resid_post", parse=choices(COLLECT_HOOKS))
    positions: PositionSpec = option(help="last (last content token) or k=K (K content positions per prompt).",
                                     cli_type=str, cli_default="last", parse=positions)
    split: str = option("train", help="train, select, val, or all (split by prompt id).")
    side: str = option("both", help="base, tuned or both (one model in memory at a time).",
                       parse=one_of(tuple(COLLECT_SIDES)))
    n: int | None = n_option()
    seed: int = seed_option()
    batch_size: int = batch_size_option()
    device: str | None = device_option()


@dataclasses.dataclass(frozen=True)
class RQ1Config(RunConfig):
    """RQ1's options, declared once (CLI flags, help, settings: :mod:`mdiff.config`)."""
    layers: list[int] = option(help="all, or a comma list such as 0,4,8 (ranges a-b allowed).", cli_type=str,
                               cli_default="all", parse=layer_list)
    hooks: list[str] = option(help="Comma list of " + ", ".join(RQ1_HOOKS) + ".", cli_type=str,
                              cli_default="resid_post", parse=choices(RQ1_HOOKS))
    positions: PositionSpec = option(help="CKA positions: last, or k=K content positions per prompt.",
                                     cli_type=str, cli_default="last", parse=positions)
    split: str = option("all", help="Prompts used: all, train, select or val.")
    n: int | None = n_option()
    n_boot: int = bootstrap_option()
    seed: int = seed_option()
    batch_size: int = batch_size_option()
    device: str | None = device_option()
    behaviour: bool = option(True, flag="--behaviour/--no-behaviour",
                             help="Also record the behaviour diagnostics (soft refusal, style markers, multiple-choice Δ logp) of each model.")
    engine: str = engine_option()


@dataclasses.dataclass(frozen=True)
class RQ2Config(RunConfig):
    """RQ2's options, declared once (CLI flags, help, settings: :mod:`mdiff.config`)."""
    layers: list[int] = option(help="Probe layers, comma list (e.g. 24,26).", cli_type=str, cli_default="4",
                               parse=layer_list)
    hooks: list[str] = option(help="Comma list of " + ", ".join(RQ2_HOOKS) + ".", cli_type=str,
                              cli_default="resid_post", parse=choices(RQ2_HOOKS))
    solvers: list[str] = option(
        help="Comma list of ridge (shrinks toward the identity), ridge-zero (toward 0), procrustes, procrustes-scaled, "
             "whiten-procrustes, pca-procrustes, logit-subspace (identity and mean-shift always run); the best is "
             "chosen on the select split, reported on val.", cli_type=str,
        cli_default=",".join(DEFAULT_SOLVERS), parse=choices(SOLVERS))
    alphas: list[float] = option(help="Comma list of α values.", cli_type=str, cli_default="1.0", parse=floats)
    alpha_mode: str = alpha_mode_option()
    fit_positions: PositionSpec = fit_positions_option()
    control_layer: int | None = option(None, help="Early-layer control site (default 0).", cli_type=int,
                                       cli_default=0, parse=one_layer)
    n: int | None = n_option()
    n_boot: int = bootstrap_option()
    seed: int = seed_option()
    batch_size: int = batch_size_option()
    device: str | None = device_option()
    engine: str = engine_option()


@dataclasses.dataclass(frozen=True)
class RQ3Config(RunConfig):
    """RQ3's options, declared once (CLI flags, help, settings: :mod:`mdiff.config`)."""
    layer: int = option(help="Layer of the site (e.g. RQ2's best site).", parse=one_layer)
    hook: str = option("resid_post", help="Hook of the site: " + ", ".join(RQ3_HOOKS) + ".")
    ks: list[int | str] | None = option(None, cli_type=str | None, parse=_rank_list,
                                        help="Ranks of the correction, e.g. 1,2,4,8,full (default: 1, 2, 4, … "
                                             "below d_model, and full).")
    methods: list[str] = option(default_factory=lambda: list(METHODS), cli_type=str, parse=choices(METHODS),
                                help="Comma list of rrr (reduced-rank regression of y−x on x) and pca-procrustes "
                                     "(Procrustes in the top-k PCA subspace of y−x).")
    target: float | None = option(None, help="Target drop, absolute (e.g. 0.3).")
    target_frac: float | None = option(None, help="Target as a fraction of the full-rank drop (default 0.9 when "
                                                  "no absolute target is given).")
    alpha: float = option(1.0, help="α of the patch (raw and mapped at the same α).")
    alpha_mode: str = alpha_mode_option()
    n_null: int = option(5, flag="--null-draws",
                         help="Random k-dim subspaces (matched variance) per k for the null.")
    fit_positions: PositionSpec = fit_positions_option()
    n: int | None = n_option()
    n_boot: int = bootstrap_option()
    seed: int = seed_option()
    batch_size: int = batch_size_option()
    device: str | None = device_option()
    engine: str = engine_option()


def _head_counts(text: str | None, shape: Shape, flag: str) -> list[int]:
    if text is None:  # powers of two up to the heads per layer
        return [2 ** i for i in range(shape.n_heads.bit_length()) if 2 ** i <= shape.n_heads]
    return parse_head_counts(text, shape.n_heads, flag)


@dataclasses.dataclass(frozen=True)
class RQ4Config(RunConfig):
    """RQ4's options, declared once (CLI flags, help, settings: :mod:`mdiff.config`)."""
    layers: list[int] = option(help="Layers whose heads are scanned, comma list (ranges a-b, or all).",
                               cli_type=str | None, cli_default=None, parse=layer_list)
    ks: list[int] = option(flag="--k", cli_type=str | None, cli_default=None, parse=_head_counts,
                           help="Head-set sizes for top-k vs random-k, e.g. 1,2,4,8 (default: powers of two up to "
                                "the heads per layer).")
    sites: list[str] = option(default_factory=lambda: ["result"], flag="--site", cli_type=str,
                              parse=choices(HEAD_SITES),
                              help="Head site(s): result (z·W_O with the source's W_O; sees W_O changes) and/or z "
                                   "(through the target's W_O); comma list.")
    sources: list[str] = option(default_factory=lambda: ["raw"], flag="--source", cli_type=str,
                                parse=choices(SOURCES),
                                help="Source(s): raw base heads and/or mapped (per-head maps fit on train); comma "
                                     "list.")
    random_sets: int = option(20, help="Random k-sets per k for the null (same layer).")
    control_layer: int | None = option(None, help="Control layer, analysed the same way (default 0).",
                                       cli_type=int, cli_default=0, parse=one_layer)
    map_solver: str = option("ridge", help="Solver of the per-head maps (for the mapped source).")
    fit_positions: PositionSpec = fit_positions_option()
    n: int | None = n_option()
    n_boot: int = bootstrap_option()
    seed: int = seed_option()
    batch_size: int = batch_size_option()
    device: str | None = device_option()
    engine: str = engine_option()


@dataclasses.dataclass(frozen=True)
class StudyConfig(RunConfig):
    """The study's options: the ones every RQ shares (declared once in :mod:`mdiff.config`, the same fields as
    the RQ configs') and the study's fixed choices, which are not CLI options."""
    n: int | None = n_option()
    n_boot: int = bootstrap_option()
    seed: int = seed_option()
    batch_size: int = batch_size_option()
    device: str | None = device_option()
    rq1_hooks: tuple[str, ...] = option(("resid_post", "attn_out", "mlp_out"), cli=False, help="RQ1's hooks.")
    rq2_hooks: tuple[str, ...] = option(("resid_post", "attn_out"), cli=False,
                                        help="RQ2's hooks (plus the component RQ1 names at a probe layer).")
    alphas: tuple[float, ...] = option((0.5, 1.0), cli=False, help="RQ2's α values.")
    random_sets: int = option(20, cli=False, help="RQ4's random k-sets per k.")
    rq4_sources: tuple[str, ...] = option(("raw", "mapped"), cli=False, help="RQ4's sources.")
    engine: str = engine_option()
    layers_per_unit: int = option(8, help="RQ1's patching runs as one unit per target model and chunk of this many "
                                          "layers, RQ4's head patching as one per chunk of its layers (units run in "
                                          "parallel on Ray or SLURM; ≥ 1).")

    def shared(self) -> dict[str, Any]:
        """The options every RQ config takes from the study (:data:`mdiff.config.SHARED`)."""
        return {k: getattr(self, k) for k in SHARED}
