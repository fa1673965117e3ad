"""RQ4 building blocks: head sets, coverage, per-head maps, and head patching against independent references."""

import itertools

import numpy as np
import pytest
import torch

from mdiff import heads as HD
from mdiff import hooks as H
from mdiff import models
from mdiff.activations import gather_all, prepare_pair_prompts
from mdiff.errors import MdiffError
from mdiff.patching import HeadPatch, Patcher, SitePatch
from mdiff.positions import parse_positions


# --------------------------------------------------------------------------- pure helpers
@pytest.mark.parametrize("text,needle", [("0", "out of range 1..4"), ("99", "out of range 1..4"),
                                         ("a", "not a whole number"), ("", "empty"), ("1,,2", "empty item")])
def test_parse_ks_errors_name_the_option_and_head_count(text, needle):
    with pytest.raises(MdiffError, match=needle) as e:
        HD.parse_ks(text, 4)
    assert e.value.option == "k" and str(e.value).startswith("k") and "4 heads per layer" in str(e.value)
    assert e.value.render(lambda o: "--" + o).startswith("--k")  # the CLI shows its own flag


def test_parse_ks_ok():
    assert HD.parse_ks("4,1,2,2", 32) == [1, 2, 4]
    assert HD.parse_ks("1-3", 4) == [1, 2, 3]


def test_random_sets_distinct_deterministic_and_exhaustive_when_few():
    a = HD.random_sets(32, 4, 20, seed=0)
    assert a == HD.random_sets(32, 4, 20, seed=0) and a != HD.random_sets(32, 4, 20, seed=1)
    assert len(set(a)) == 20 and all(len(s) == 4 and len(set(s)) == 4 and max(s) < 32 for s in a)
    assert HD.random_sets(4, 2, 20, seed=0) == list(itertools.combinations(range(4), 2))  # only 6 exist


def test_coverage_ratio_and_ci_against_hand_bootstrap():
    rng = np.random.default_rng(0)
    es, ea = rng.random(30), rng.random(30) + 1
    idx = rng.integers(0, 30, size=(500, 30))
    c = HD.coverage(es, ea, idx)
    assert c.value == pytest.approx(es.sum() / ea.sum())
    ratios = np.array([es[i].mean() / ea[i].mean() for i in idx])
    assert c.ci_low == pytest.approx(np.quantile(ratios, 0.025)) and c.ci_high == pytest.approx(np.quantile(ratios, 0.975))
    assert np.isnan(HD.coverage(es, np.zeros(30), idx).value)  # nothing to cover: undefined, not inf


def test_null_percentile():
    assert HD.null_percentile(0.5, [0.1, 0.2, 0.6, 0.7]) == 50.0
    assert HD.null_percentile(1.0, [0.1, 0.2]) == 100.0
    assert np.isnan(HD.null_percentile(float("nan"), [0.1]))


def test_rank_heads_orders_by_mean_effect():
    single = np.array([[0.1, 0.1], [0.5, 0.7], [0.0, 0.0], [0.5, 0.7]])
    assert HD.rank_heads(single) == [1, 3, 0, 2]


def test_site_blindness_sentence():
    assert "W_O" in HD.site_blindness({"result": 1.0, "z": 0.0})
    assert HD.site_blindness({"result": 1.0, "z": 0.8}) is None
    assert HD.site_blindness({"result": 0.0, "z": 0.0}) is None


def test_head_maps_recover_planted_per_head_linear_maps():
    rng = np.random.default_rng(0)
    n, heads, dh, dm = 400, 3, 5, 7
    z = torch.from_numpy(rng.standard_normal((n, heads, dh)))
    M = rng.standard_normal((heads, dh, dm))
    b = rng.standard_normal((heads, dm))
    y = torch.from_numpy(np.einsum("nhd,hde->nhe", z.numpy(), M) + b)
    prior = torch.from_numpy(M + 0.3 * rng.standard_normal(M.shape))  # e.g. the base W_O: near the truth
    for hm in (HD.HeadMaps("ridge").fit(z, y, prior=prior), HD.HeadMaps("ridge-zero").fit(z, y)):
        pred = hm.transform(z).double()
        assert torch.allclose(pred, y, atol=1e-3)
        assert (hm.score(z, y) > 0.999).all()
        assert [f["rows"] for f in hm.fit_summaries()] == [n] * heads
    with pytest.raises(MdiffError, match="pass the base W_O as prior"):
        HD.HeadMaps("ridge").fit(z, y)


def test_head_maps_shrink_toward_the_raw_patch_with_few_rows():
    """3 train rows for d_head = 5: the ridge head map (prior = the source's W_O, i.e. the raw patch) stays at
    the raw patch where the data say nothing; the zero-prior map shrinks those directions to 0."""
    rng = np.random.default_rng(1)
    heads, dh, dm = 2, 5, 7
    M = rng.standard_normal((heads, dh, dm))  # tuned head output = z · M: the raw patch is exact
    z_tr, z_te = (torch.from_numpy(rng.standard_normal((n, heads, dh))) for n in (3, 200))
    y_tr, y_te = (torch.from_numpy(np.einsum("nhd,hde->nhe", z.numpy(), M)) for z in (z_tr, z_te))
    groups = np.arange(3)
    ident = HD.HeadMaps("ridge").fit(z_tr, y_tr, groups, prior=torch.from_numpy(M))
    zero = HD.HeadMaps("ridge-zero").fit(z_tr, y_tr, groups)
    assert (ident.score(z_te, y_te) > 0.999).all()
    assert (zero.score(z_te, y_te) < 0.9).all()


# --------------------------------------------------------------------------- on a toy model
@pytest.fixture(scope="module")
def lowrank_inputs(toys):
    spec = toys["toy-lowrank"]
    info = models.inspect_pair(spec)
    prep, pad_b, pad_t, sv = prepare_pair_prompts(spec, info, parse_positions("last"), "val", 0, 12)
    L = spec.truth["layer"]
    dec_b = [[p[-1]] for p in prep.base_positions]
    dec_t = [[p[-1]] for p in prep.tuned_positions]
    names = [H.hook_name("z", L), H.hook_name("attn_out", L)]
    with models.loaded(spec, "base", "cpu") as m:
        got = gather_all(m, prep.base_ids, dec_b, names, pad_b)
        W_O_base = HD.W_O_of(m, L)
    return {"spec": spec, "prep": prep, "pad_t": pad_t, "vocab": sv.tuned_ids, "L": L, "dec_t": dec_t,
            "z": got[names[0]].float(), "attn_out": got[names[1]].float(), "W_O_base": W_O_base}


def test_head_results_sum_to_attn_out_and_are_not_attn_out_slices(lowrank_inputs):
    """mdiff's heads are z_h·W_O[h] (they sum to attn_out); the seed's reshape of attn_out gives other vectors."""
    d = lowrank_inputs
    res = H.head_results(d["z"], d["W_O_base"])  # [n, head, d_model]
    assert torch.allclose(res.sum(1), d["attn_out"], atol=1e-5)  # Llama: no b_O
    n_heads, d_model = res.shape[1], res.shape[2]
    seed_slices = d["attn_out"].reshape(len(res), n_heads, d_model // n_heads)  # seed 004's "heads"
    # a head's contribution is a dense d_model vector; the seed's slice covers d_model/n_heads coordinates
    assert (res[:, 1].abs() > 1e-6).float().mean() > 0.9
    embedded = torch.zeros_like(res)
    for h in range(n_heads):
        embedded[:, h, h * (d_model // n_heads):(h + 1) * (d_model // n_heads)] = seed_slices[:, h]
    assert not torch.allclose(embedded, res, atol=1e-2)


def test_patching_all_head_results_equals_patching_attn_out(lowrank_inputs, toys):
    d = lowrank_inputs
    res = H.head_results(d["z"], d["W_O_base"])
    with models.loaded(d["spec"], "tuned", "cpu") as m:
        p = Patcher(m, d["prep"].tuned_ids, d["dec_t"], d["pad_t"], engine="naive")
        lg = p.logits([HeadPatch(d["L"], tuple(range(res.shape[1])), "result", res),
                       SitePatch(d["L"], "attn_out", d["attn_out"])])
        assert torch.allclose(lg[0], lg[1], atol=1e-4)
        kl = p.kl([HeadPatch(d["L"], tuple(range(res.shape[1])), "result", res)], d["vocab"])
        assert kl.mean() > 0.1  # the planted layer does differ


def test_w_o_only_difference_seen_by_result_site_not_by_z_site(lowrank_inputs):
    d = lowrank_inputs
    planted = tuple(d["spec"].truth["heads"])
    res = H.head_results(d["z"], d["W_O_base"])
    with models.loaded(d["spec"], "tuned", "cpu") as m:
        p = Patcher(m, d["prep"].tuned_ids, d["dec_t"], d["pad_t"], engine="naive")
        kl = HD.head_effects(p, d["L"], "result", res, [(h,) for h in range(4)], d["vocab"])
        klz = HD.head_effects(p, d["L"], "z", d["z"], [(h,) for h in range(4)], d["vocab"])
    means = kl.mean(1)
    assert set(HD.rank_heads(kl)[:len(planted)]) == set(planted)
    assert all(means[h] > 0.1 for h in planted) and all(means[h] < 1e-6 for h in range(4) if h not in planted)
    assert np.abs(klz).max() < 1e-5  # z goes through the tuned W_O, and upstream of W_O nothing changed


def test_bad_head_patches_raise_clear_errors(lowrank_inputs):
    d = lowrank_inputs
    res = H.head_results(d["z"], d["W_O_base"])
    with models.loaded(d["spec"], "tuned", "cpu") as m:
        p = Patcher(m, d["prep"].tuned_ids, d["dec_t"], d["pad_t"], engine="naive")
        with pytest.raises(MdiffError, match="head"):
            p.kl([HeadPatch(d["L"], (7,), "result", res)], d["vocab"])
        with pytest.raises(MdiffError, match="site"):
            p.kl([HeadPatch(d["L"], (1,), "nope", res)], d["vocab"])
        with pytest.raises(MdiffError, match="rows"):
            p.kl([HeadPatch(d["L"], (1,), "result", res[:3])], d["vocab"])


def test_rank_stability_matches_a_naive_loop():
    """Top-k membership frequencies over prompt resamples, against a per-resample loop with rank_heads."""
    from mdiff import stats
    from mdiff.heads import STABLE_FREQ, kv_group_of, rank_heads, rank_stability

    rng = np.random.default_rng(0)
    single = rng.gamma(2.0, 1.0, size=(6, 40)) * np.array([3, 0.5, 2.9, 0.1, 1.0, 0.2])[:, None]
    idx = stats.resample_indices(40, 300, 1)
    st = rank_stability(single, [1, 2, 3], idx)
    for k in (1, 2, 3):
        top = sorted(rank_heads(single)[:k])
        counts, same = np.zeros(6), 0
        for r in idx:
            t = rank_heads(single[:, r])[:k]
            counts[t] += 1
            same += sorted(t) == top
        assert np.allclose(st.head_freq[k], counts / len(idx))
        assert st.set_freq[k] == pytest.approx(same / len(idx))
        assert st.stable[k] == all(counts[h] / len(idx) >= STABLE_FREQ for h in top)
    assert not st.stable[1] and st.stable[2]  # heads 0 and 2 trade places, but both are always in the top-2
    assert kv_group_of((4, 5, 6, 7), 8, 2) == 1 and kv_group_of((0, 1, 2, 3), 8, 2) == 0
    assert kv_group_of((2, 3, 4, 5), 8, 2) is None and kv_group_of((4, 5, 6, 7), 8, 8) is None
    assert kv_group_of((1,), 8, 8) is None and kv_group_of((6, 7), 8, 4) == 3
