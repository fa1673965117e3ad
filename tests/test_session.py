"""F10: the pipeline layer. A PairSession holds one model at a time; RQ1 computed in pieces (one model per piece,
layers in chunks, in any order) reduces to the same numbers as RQ1 in one go; runners go through one runner."""

import json
import random

import numpy as np
import pandas as pd
import pytest

from mdiff import models
from mdiff.config import RQ1Config
from mdiff.positions import parse_positions


@pytest.fixture
def loads(monkeypatch):
    """Every model load, in order (the real loader runs)."""
    seen = []
    real = models.load_model

    def spy(spec, side, *a, **k):
        seen.append(side)
        return real(spec, side, *a, **k)

    monkeypatch.setattr(models, "load_model", spy)
    return seen


def test_session_keeps_one_model_and_reuses_it(toys, tmp_path, loads):
    from mdiff.session import PairSession

    models.reset_resident_peak()
    with PairSession(toys["toy-lowrank"], tmp_path, keep_model=True) as s:
        with s.model("base") as a:
            pass
        with s.model("base") as b:  # kept: the same model, not loaded again
            assert b is a
        with s.model("tuned"):  # the other side: base is freed first
            assert s.loaded_side == "tuned"
        assert loads == ["base", "tuned"]
    assert models.resident_models()["now"] == 0 and models.resident_models()["peak"] == 1
    with PairSession(toys["toy-lowrank"], tmp_path) as s:  # without keep_model: freed at the end of each use
        with s.model("base"):
            pass
        assert s.loaded_side is None
        with pytest.raises(RuntimeError):  # an error inside frees the model too
            with s.model("tuned"):
                raise RuntimeError("boom")
        assert s.loaded_side is None and models.resident_models()["now"] == 0


def _cfg(**kw):
    return RQ1Config(layers=list(range(6)), hooks=["resid_post", "attn_out"], positions=parse_positions("k=2"),
                     n=12, n_boot=50, **kw)


def test_rq1_in_pieces_reduces_to_rq1_in_one_go(toys, tmp_path):
    """Chunks of layers patched in separate calls (any order, shuffled) give the per-prompt KLs and the noise floor
    of one call over all layers, and the reduce gives the same metrics and summary."""
    from mdiff import rq1
    from mdiff.session import PairSession

    cfg = _cfg()
    spec = toys["toy-lowrank"]
    with PairSession(spec, tmp_path, n=cfg.n, batch_size=cfg.batch_size, keep_model=True) as s:
        with s.model("base") as m:
            sides = [rq1.rq1_side(s, cfg, m, "base")]
        with s.model("tuned") as m:
            sides.append(rq1.rq1_side(s, cfg, m, "tuned"))
            whole = [rq1.rq1_patch(s, cfg, m, "tuned")]
            chunks = [rq1.rq1_patch(s, cfg, m, "tuned", ch) for ch in ([0, 1, 2], [3, 4], [5])]
        with s.model("base") as m:
            whole.append(rq1.rq1_patch(s, cfg, m, "base"))
            chunks += [rq1.rq1_patch(s, cfg, m, "base", ch) for ch in ([0], [1, 2, 3, 4, 5])]
        for target in ("tuned", "base"):
            w = next(p for p in whole if p.target == target)
            got = {k: v for p in chunks if p.target == target for k, v in p.kl.items()}
            assert set(got) == set(w.kl) and len(got) == 6 * 2 * 3  # layers × hooks × (cross, store, self)
            for k, v in w.kl.items():
                np.testing.assert_allclose(got[k], v, rtol=1e-9, atol=1e-12)
            # one rounding error per site, seeded per site: the same error whichever chunk measures it
            def by_site(p):
                return dict(zip([(h, L) for h in cfg.hooks for L in p.layers], p.floor, strict=True))

            wf = by_site(w)
            cf = {k: v for p in chunks if p.target == target for k, v in by_site(p).items()}
            assert set(cf) == set(wf)
            for k, v in wf.items():
                np.testing.assert_allclose(cf[k], v, rtol=1e-9, atol=1e-15)
        shuffled = chunks[:]
        random.Random(0).shuffle(shuffled)
        a = rq1.reduce_rq1(s, cfg, sides, whole)
        b = rq1.reduce_rq1(s, cfg, sides[::-1], shuffled)
    cols = ["layer", "hook", "condition", "metric"]
    ma, mb = (x.metrics.sort_values(cols, kind="stable").reset_index(drop=True) for x in (a, b))
    pd.testing.assert_frame_equal(ma[cols], mb[cols])
    np.testing.assert_allclose(ma.value.astype(float), mb.value.astype(float), rtol=1e-9, atol=1e-12)
    assert a.summary["suggested_probe_layers"] == b.summary["suggested_probe_layers"]
    # a missing chunk is refused in one line, naming what is missing
    from mdiff.errors import MdiffError

    with pytest.raises(MdiffError, match="incomplete: no KL for base at layer 0"):
        rq1.reduce_rq1(s, cfg, sides, [p for p in chunks if p.layers != [0]])


def test_rq4_in_layer_chunks_reduces_to_rq4_in_one_go(toys, tmp_path):
    """RQ4's layers patched into the tuned model one per call (in any order) give the same bytes as one call over
    all of them: the engine groups conditions by layer and the rounding noise is seeded per site."""
    from mdiff import rq4
    from mdiff.config import RQ4Config
    from mdiff.errors import MdiffError
    from mdiff.session import PairSession

    cfg = RQ4Config(layers=[2, 4], ks=[1, 2], sources=["raw", "mapped"], n=24, n_boot=50, random_sets=20,
                    control_layer=0)
    assert rq4.rq4_layers(cfg) == [0, 2, 4]
    with PairSession(toys["toy-lowrank"], tmp_path, n=cfg.n, batch_size=cfg.batch_size, keep_model=True) as s:
        with s.model("base") as m:
            side = rq4.rq4_side(s, cfg, m)
        with s.model("tuned") as m:
            whole = rq4.rq4_heads(s, cfg, m, side, [0, 2, 4])
            chunks = [rq4.rq4_heads(s, cfg, m, side, [L]) for L in (4, 0, 2)]
        a, b = rq4.reduce_rq4(s, cfg, [whole]), rq4.reduce_rq4(s, cfg, chunks)
        assert a.metrics.to_csv(index=False) == b.metrics.to_csv(index=False)
        assert json.dumps(a.summary, sort_keys=True) == json.dumps(b.summary, sort_keys=True)  # NaN-safe
        L4 = next(x for x in a.summary["layers"] if (x["layer"], x["site"], x["source"]) == (4, "result", "raw"))
        assert sorted(L4["ranking_select"][:2]) == [1, 2], L4  # the planted heads rank first
        with pytest.raises(MdiffError, match=r"cover layers \[0, 4\], not \[0, 2, 4\]"):
            rq4.reduce_rq4(s, cfg, [c for c in chunks if c.layers != [2]])


def test_every_rq_runs_through_the_one_runner():
    """Each RQ declares its check, compute and figures once (a runner.Step); run_rqN is that step run."""
    import inspect

    from mdiff import rq1, rq2, rq3, rq4
    from mdiff.runner import Step

    for mod, name in ((rq1, "rq1"), (rq2, "rq2"), (rq3, "rq3"), (rq4, "rq4")):
        assert isinstance(mod.STEP, Step) and mod.STEP.name == name
        src = inspect.getsource(getattr(mod, f"run_{name}"))
        assert "run_step(STEP" in src and "ResultWriter" not in inspect.getsource(mod)


def test_executors_group_units_by_model_side_and_ask_no_gpu_for_model_free_units():
    from mdiff.executors import gpus_of, groups_of
    from mdiff.units import UnitTask

    def task(name, side, loads=True):
        return UnitTask("toy-lowrank", {"device": "cuda"}, "/tmp/x", name.split(":")[0], name, name=name, side=side,
                        loads_model=loads)

    tasks = [task("rq1:side:base", "base"), task("rq2:fit:L4:attn_out", None, False), task("rq1:side:tuned", "tuned"),
             task("rq1:patch:base:L0-7", "base"), task("rq4", None), task("rq1", None, False)]
    assert groups_of(tasks) == [[0, 3], [2], [1], [4], [5]]  # one group per side (one worker each), then singles
    assert [gpus_of(t, None) for t in tasks] == [1, 0, 1, 1, 1, 0]
    assert [gpus_of(t, 2) for t in tasks] == [2, 0, 2, 2, 2, 0]  # an override never gives GPUs to a fit/reduce
