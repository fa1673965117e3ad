"""RQ4 end to end on the toy pairs: planted heads ranked first, coverage vs the random-k null, z-site blindness."""

import json
import re

import pandas as pd
import pytest
from typer.testing import CliRunner

from mdiff.cli import app

runner = CliRunner()
pytestmark = pytest.mark.slow


def _run(pair, out, *extra):
    r = runner.invoke(app, ["rq4", "--pair", pair, "--layer", "4", "--k", "1,2,4", "--bootstrap", "300",
                            "--out", str(out), *extra])
    assert r.exit_code == 0, r.output
    return out / pair / "rq4"


@pytest.fixture(scope="module")
def rq4_lowrank(toys, tmp_path_factory):
    return _run("toy-lowrank", tmp_path_factory.mktemp("rq4"), "--site", "result,z", "--source", "raw,mapped")


@pytest.fixture(scope="module")
def rq4_distributed(toys, tmp_path_factory):
    return _run("toy-distributed", tmp_path_factory.mktemp("rq4d"))


def _entry(summary, layer, site, source):
    return next(e for e in summary["layers"] if (e["layer"], e["site"], e["source"]) == (layer, site, source))


def test_planted_heads_ranked_first_and_cover_the_effect(rq4_lowrank, toys):
    truth = toys["toy-lowrank"].truth
    s = json.loads((rq4_lowrank / "summary.json").read_text())
    e = _entry(s, truth["layer"], "result", "raw")
    k = len(truth["heads"])
    assert set(e["ranking_select"][:k]) == set(truth["heads"])
    cov = e["coverage"][str(k)]
    assert sorted(cov["heads"]) == sorted(truth["heads"])
    assert cov["coverage"] >= 0.8 and cov["ci"][0] >= 0.8
    assert cov["coverage"] > cov["random_null"]["median"] + 0.5  # far above the random-k null (which holds {1,2} too)
    assert cov["null_percentile"] == 100.0
    assert cov["random_null"]["n_sets"] == 6  # C(4, 2) < 20: every 2-set is in the null
    m = pd.read_csv(rq4_lowrank / "metrics.csv")
    assert {"pair", "rq", "layer", "hook", "condition", "metric", "value", "ci_low", "ci_high", "n"} <= set(m.columns)
    rand = m[(m.layer == 4) & (m.site == "result") & (m.source == "raw") & (m.metric == "coverage")
             & (m.set == "random") & (m.k == 2)]
    assert len(rand) == 6 and rand.value.max() == pytest.approx(cov["coverage"])  # {1,2} is one of the six


def test_z_site_blindness_is_reported(rq4_lowrank, toys):
    s = json.loads((rq4_lowrank / "summary.json").read_text())
    L = toys["toy-lowrank"].truth["layer"]
    sc = s["site_check"][str(L)]
    assert sc["effect_all_z"] < 1e-5 < 0.1 < sc["effect_all_result"]
    assert "W_O" in sc["note"]
    z = _entry(s, L, "z", "raw")
    assert z["nothing_to_cover"] and "W_O" in z["verdict"] and "z site" in z["verdict"]
    assert any("W_O" in f for f in s["findings"])


def test_mapped_source_and_control_layer(rq4_lowrank, toys):
    s = json.loads((rq4_lowrank / "summary.json").read_text())
    L = toys["toy-lowrank"].truth["layer"]
    mapped = _entry(s, L, "result", "mapped")
    assert mapped["nothing_to_cover"] and "transport" in mapped["verdict"]  # W_O-only change is linear in z
    assert min(mapped["map_r2_train"]) > 0.99
    fits = mapped["map_fits"]  # default fit rows: up to 16 content positions + the decision, per train prompt
    assert len(fits) == 4 and all(f["prompts"] < f["rows"] <= 17 * f["prompts"] and f["lambda"] is not None
                                  for f in fits)
    control = _entry(s, 0, "result", "raw")
    assert control["control_layer"] and control["nothing_to_cover"]


def test_heatmap_and_coverage_figures_are_self_contained(rq4_lowrank):
    html = (rq4_lowrank / "heads_result_raw.html").read_text()
    assert not re.search(r"<script[^>]+src=", html) and "L4H1" in html and "RdBu" in html and '"zmid":0' in html
    assert "random-k median" in (rq4_lowrank / "coverage_result_raw.html").read_text()


def test_distributed_single_heads_cover_much_less(rq4_lowrank, rq4_distributed):
    low = _entry(json.loads((rq4_lowrank / "summary.json").read_text()), 4, "result", "raw")
    dist = _entry(json.loads((rq4_distributed / "summary.json").read_text()), 4, "result", "raw")
    assert not dist["nothing_to_cover"]
    # planted: two heads carry everything at toy-lowrank's L4; the trained toy-distributed change needs more
    # (how much more depends on the toy's training, which varies with library versions: 41-89% seen at k = 2)
    assert low["coverage"]["2"]["coverage"] > 0.99 and dist["coverage"]["2"]["coverage"] < 0.95
    assert dist["coverage"]["1"]["coverage"] < 0.5


@pytest.mark.parametrize("args,needle", [(["--k", "99"], "out of range 1..4"), (["--k", "0"], "out of range"),
                                         (["--k", "a"], "not a whole number"), (["--layer", "9"], "out of range 0..5"),
                                         (["--site", "attn"], "unknown"), (["--random-sets", "0"], "random-sets")])
def test_cli_bad_input(toys, tmp_path, args, needle):
    base = ["rq4", "--pair", "toy-lowrank", "--out", str(tmp_path)]
    if "--layer" not in args:
        base += ["--layer", "4"]
    r = runner.invoke(app, base + args)
    assert r.exit_code == 2 and needle in r.output, r.output
    assert not (tmp_path / "toy-lowrank" / "rq4").exists()
