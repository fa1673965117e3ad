"""Placement: one device or a split over several GPUs; the fast patching engine refuses a split model."""

import numpy as np
import pytest
import torch

from mdiff import data, models
from mdiff import patching as P
from mdiff.errors import MdiffError
from mdiff.hooks import hook_name


def test_placement_arguments():
    assert models.placement("cpu") == {"device": "cpu"}
    assert models.placement(None) == {"device": models.default_device()}
    assert models.placement("balanced") == {"device_map": "balanced"}
    assert models.placement("split:4") == {"n_devices": 4}
    assert models.placement("cpu", n_devices=2) == {"n_devices": 2}
    assert models.placement(None, device_map={"": 0}) == {"device_map": {"": 0}}
    with pytest.raises(MdiffError, match="split:N"):
        models.placement("split:two")
    with pytest.raises(MdiffError, match="n_devices must be"):
        models.placement(None, n_devices=0)


def test_default_device_is_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.default_device() == "cpu"


@pytest.mark.slow
def test_fast_engine_refuses_a_split_model_and_falls_back_to_naive(toys):
    spec = toys["toy-lowrank"]
    before = models.resident_models()["now"]
    model = models.load_model(spec, "base", device="cpu")
    assert models.resident_models()["now"] == before + 1
    try:
        prompts = data.load_prompts(spec.prompts)[:6]
        ids = data.tokenize(prompts, model.tokenizer, spec.chat_template)
        pos = [[len(x) - 1] for x in ids]
        acts = torch.randn(6, model.cfg.d_model) * 3
        conds = [P.SitePatch(4, "resid_post", acts)]
        vocab = np.arange(600)
        assert P.fast_support(model) is None
        fast = P.Patcher(model, ids, pos, 0, batch_size=3)
        want = fast.kl(conds, vocab)
        assert fast.engine_used == "fast"
        model.cfg.n_devices = 2  # what TransformerBridge records for a model split over two GPUs
        reason = P.fast_support(model)
        assert reason is not None and "split over 2 devices" in reason and "\n" not in reason
        split = P.Patcher(model, ids, pos, 0, batch_size=3)
        assert split.engine_used == "naive" and split.fallback_reason == reason
        np.testing.assert_allclose(split.kl(conds, vocab), want, rtol=1e-4, atol=1e-6)
        model.cfg.n_devices = 1
        model.original_model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "lm_head": 1}
        assert "split over 2 devices" in P.fast_support(model)
        del model.original_model.hf_device_map
        assert hook_name("resid_post", 4, model.cfg.n_layers)
    finally:
        models.free(model)
    assert models.resident_models()["now"] == before


def test_threads_limit_torch_and_blas_and_make_float64_maps_reproducible():
    """``--threads`` reaches numpy's BLAS too (OMP_NUM_THREADS cannot once numpy is imported): with 2 threads
    OpenBLAS may split a float64 solve differently, so a study sets the count in every unit."""
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    from mdiff.threads import set_threads

    try:
        threadpool_limits(limits=2)  # as numpy's pool is on a 2-core machine when nobody limits it
        set_threads(2)
        assert torch.get_num_threads() == 2
        set_threads(1)
        assert torch.get_num_threads() == 1
        assert {p["num_threads"] for p in threadpool_info()} == {1}
    finally:
        set_threads(1)
