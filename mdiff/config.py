"""Run configurations: each RQ's frozen config dataclass is the single source of its options.

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
