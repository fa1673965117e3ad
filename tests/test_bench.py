"""``run_bench`` on a few prompts: the table's fields, honest engine equivalence, bad input (no speed asserted)."""

import math

import pytest

from mdiff.bench import format_table, run_bench
from mdiff.errors import MdiffError


@pytest.mark.slow
def test_small_bench_reports_every_field(toys):
    msgs = []
    r = run_bench("toy-lowrank", n_prompts=6, repeats=1, batch_size=4, say=lambda m, f: msgs.append((m, f)))
    assert r["pair"] == "toy-lowrank" and r["layer"] == 4 and r["prompts"] == 6 and r["repeats"] == 1
    assert r["memory_method"].startswith(("VmHWM", "ru_maxrss"))
    names = [w["workload"] for w in r["workloads"]]
    assert names == ["rq4-grid", "rq2-alpha base→tuned", "rq2-alpha tuned→base"]
    grid, fwd, rev = r["workloads"]
    assert grid["conditions"] == 4 + 3 + 20 * 3 + 1  # single heads, top-k, 20 random per k, all heads
    assert fwd["conditions"] == rev["conditions"] == 4 and (fwd["target"], rev["target"]) == ("tuned", "base")
    for w in r["workloads"]:
        assert w["prompts"] == 6 and w["fast_engine_used"] == "fast"
        assert w["naive_s"] > 0 and w["fast_s"] > 0 and math.isclose(w["speedup"], w["naive_s"] / w["fast_s"])
        assert len(w["naive_times"]) == len(w["fast_times"]) == 1
        assert w["max_kl_diff"] <= 1e-5
        assert w["naive_peak_mib"] > 0 and w["fast_peak_mib"] > 0
        assert math.isclose(w["peak_ratio"], w["fast_peak_mib"] / w["naive_peak_mib"])
    assert grid["mean_kl"] > 0.01  # the planted layer-4 heads matter: a non-vacuous comparison
    table = format_table(r)
    for needle in ("rq4-grid", "speed-up", "naive MiB", "max |ΔKL|", "layer 4 of 6", "6 prompts"):
        assert needle in table
    assert msgs[-1] == ("done", 1.0)


def test_without_memory_and_bad_arguments(toys):
    r = run_bench("toy-lowrank", n_prompts=3, layer=5, repeats=1, memory=False)
    assert r["layer"] == 5 and r["memory_method"] == "not measured"
    assert all(w["peak_ratio"] is None and w["max_kl_diff"] <= 1e-5 for w in r["workloads"])
    assert "—" in format_table(r)
    for kw, needle in ((dict(layer=6), "layer 6 is out of range 0..5"), (dict(repeats=0), "repeats"),
                       (dict(n_prompts=1), "prompt count"), (dict(batch_size=0), "batch_size")):
        with pytest.raises(MdiffError, match=needle):
            run_bench("toy-lowrank", memory=False, **kw)


def test_child_payload_round_trips_without_pickle(tmp_path):
    """The workload handed to the memory child is safetensors + JSON (never a pickle on disk) and comes back equal."""
    import types

    import torch

    from mdiff import bench
    from mdiff.patching import HeadPatch, SitePatch

    src, heads = torch.randn(3, 8), torch.randn(3, 4, 8)
    w = types.SimpleNamespace(ids=[[1, 2, 3]] * 3, positions=[[2]] * 3, pad=0, vocab=[0, 1, 2],
                              conds=[SitePatch(1, "resid_post", src, 0.5), SitePatch(2, "attn_out", src, 1.0, "scale"),
                                     HeadPatch(1, (0, 2), "result", heads)])
    bench._save_payload(str(tmp_path / "w"), w, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json", "w.safetensors"]
    d = bench._load_payload(str(tmp_path / "w"))
    assert d["ids"] == w.ids and d["batch_size"] == 4 and d["vocab"].tolist() == [0, 1, 2]
    for a, b in zip(d["conds"], w.conds, strict=True):
        assert type(a) is type(b) and torch.equal(a.source, b.source)
        assert {k: v for k, v in vars(a).items() if k != "source"} == {k: v for k, v in vars(b).items() if k != "source"}
