"""F10: each RQ's options are declared once, in its frozen config dataclass (mdiff.config)."""

import dataclasses
import inspect

import pytest

from mdiff import cli
from mdiff import config as C
from mdiff.errors import MdiffError
from mdiff.plan import StudyConfig
from mdiff.positions import parse_positions
from mdiff.rq1 import RQ1Config
from mdiff.rq2 import RQ2Config
from mdiff.rq3 import RQ3Config
from mdiff.rq4 import RQ4Config

SHAPE = C.Shape(n_layers=6, n_heads=4, d_model=32, seed=3)
RUN = {"pair", "out_dir", "overwrite", "prompts_file", "threads"}
COMMANDS = [(cli.rq1_cmd, RQ1Config, {"stride"}), (cli.rq2_cmd, RQ2Config, {"freeze"}),
            (cli.rq3_cmd, RQ3Config, set()), (cli.rq4_cmd, RQ4Config, {"layer"}),
            (cli.collect_cmd, C.CollectConfig, set())]
# what each RQ records as its settings (config.json, unit keys): written out by hand, the reference
SETTINGS = {
    RQ1Config: ["layers", "hooks", "positions", "split", "n", "bootstrap", "seed", "behaviour", "engine"],
    RQ2Config: ["layers", "hooks", "solvers", "alphas", "alpha_mode", "fit_positions", "control_layer", "n",
                "bootstrap", "seed", "engine"],
    RQ3Config: ["layer", "hook", "ks", "methods", "target", "target_frac", "alpha", "alpha_mode", "n_null",
                "fit_positions", "n", "bootstrap", "seed", "engine"],
    RQ4Config: ["layers", "ks", "sites", "sources", "random_sets", "control_layer", "map_solver", "fit_positions",
                "n", "bootstrap", "seed", "engine"],
}


def _configs():
    pos = parse_positions("k=4", seed=2)
    return [RQ1Config([0, 2], ["resid_post", "attn_out"], pos, n=7, n_boot=50, behaviour=False),
            RQ2Config([1], ["resid_post"], ["ridge", "procrustes"], [0.5, 1.0], control_layer=0, engine="naive"),
            RQ3Config(2, ks=[1, 2, "full"], target_frac=0.8, n_null=3, fit_positions=pos),
            RQ4Config([1, 3], [1, 2], sources=["raw", "mapped"], random_sets=5),
            StudyConfig(n=40, n_boot=100, seed=1, layers_per_unit=3), C.ExecutorConfig(executor="ray", num_cpus=2),
            C.CollectConfig([0, 1], ["z"], pos, "val", "base", n=3)]


@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: type(c).__name__)
def test_round_trip_and_frozen(cfg):
    import json

    d = json.loads(json.dumps(cfg.to_dict()))  # JSON data only
    assert type(cfg).from_dict(d) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 5 if hasattr(cfg, "seed") else None  # type: ignore[misc]
    with pytest.raises(MdiffError, match="no setting bogus"):
        type(cfg).from_dict({**d, "bogus": 1})


@pytest.mark.parametrize("cls", list(SETTINGS), ids=lambda c: c.__name__)
def test_settings_keys_and_values(cls):
    cfg = next(c for c in _configs() if type(c) is cls)
    s = cfg.settings()
    assert list(s) == SETTINGS[cls]
    assert s["bootstrap"] == cfg.n_boot and s["seed"] == cfg.seed and "batch_size" not in s and "device" not in s
    if "fit_positions" in s:
        assert s["fit_positions"] == dataclasses.asdict(cfg.fit_positions)


@pytest.mark.parametrize("cmd,cls,extra", COMMANDS, ids=lambda x: getattr(x, "__name__", ""))
def test_cli_options_come_from_the_config(cmd, cls, extra):
    params = inspect.signature(cmd).parameters
    fields = {f.name: o for f, o in C.cli_fields(cls)}
    assert set(params) == set(fields) | RUN | extra  # nothing declared twice, nothing missing
    for name, o in fields.items():
        opt = params[name].annotation.__metadata__[0]
        assert opt.help == o.help  # the help text lives in the config only
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        assert (opt.param_decls or (opt.default,))[0] == C.flag_of(f)  # typer keeps the first name as default
        default = C.cli_default(f)
        assert params[name].default == (inspect.Parameter.empty if default is C.NOTSET else default)
    # the options every RQ shares are one declaration each: same help in every command
    for name in C.SHARED:
        helps = {inspect.signature(c).parameters[name].annotation.__metadata__[0].help for c, _, _ in COMMANDS
                 if name in inspect.signature(c).parameters}
        assert len(helps) == 1, name


def test_study_and_units_share_the_rq_options():
    for cmd in (cli.study_cmd, cli.units_cmd):
        params = inspect.signature(cmd).parameters
        for name in C.SHARED:
            assert params[name].annotation.__metadata__[0].help == \
                inspect.signature(cli.rq1_cmd).parameters[name].annotation.__metadata__[0].help
    ex = {f.name for f, _ in C.cli_fields(C.ExecutorConfig)}
    assert ex <= set(inspect.signature(cli.study_cmd).parameters)


def test_from_cli_parses_against_the_pair_shape():
    vals = {"layers": "all", "hooks": "resid_post,mlp_out", "positions": "k=2", "split": "all", "n": None,
            "n_boot": 10, "seed": 3, "batch_size": 4, "device": None, "behaviour": True, "engine": "fast"}
    c = RQ1Config.from_cli(vals, SHAPE)
    assert c.layers == list(range(6)) and c.hooks == ["resid_post", "mlp_out"]
    assert c.positions == parse_positions("k=2", seed=3)  # sampled positions follow the run's seed
    with pytest.raises(MdiffError, match=r"^layers: .*out of range 0\.\.5") as ei:  # the CLI shows --layers
        RQ1Config.from_cli({**vals, "layers": "0,6"}, SHAPE)
    assert ei.value.render(cli._flag).startswith("--layers: ")
    with pytest.raises(MdiffError, match="^hooks: .*'z'"):
        RQ1Config.from_cli({**vals, "hooks": "z"}, SHAPE)
    with pytest.raises(MdiffError, match="^positions 'k=0' needs K"):
        RQ1Config.from_cli({**vals, "positions": "k=0"}, SHAPE)
    c4 = RQ4Config.from_cli({"layers": "2", "ks": None, "sites": "result", "sources": "raw", "random_sets": 3,
                             "control_layer": 0, "map_solver": "ridge", "fit_positions": "upto=16", "n": None,
                             "n_boot": 10, "seed": 0, "batch_size": 4, "device": None, "engine": "fast"}, SHAPE)
    assert c4.ks == [1, 2, 4] and c4.layers == [2]  # powers of two up to the 4 heads
    c3 = RQ3Config.from_cli({"layer": 5, "ks": "2,full"}, SHAPE)
    assert c3.layer == 5 and c3.ks == [2, "full"]
    with pytest.raises(MdiffError, match="^layer: ") as ei:
        RQ3Config.from_cli({"layer": 6}, SHAPE)
    assert ei.value.render(cli._flag).startswith("--layer: ")
    with pytest.raises(MdiffError, match="^fit_positions 'upto=0' needs K") as ei:
        RQ3Config.from_cli({"layer": 5, "fit_positions": "upto=0"}, SHAPE)
    assert ei.value.render(cli._flag).startswith("--fit-positions ")
