"""The activation store and ``mdiff collect``: batched left-padded collection, resume, refusal to mix, CLI."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from mdiff import activations as A
from mdiff import align, data, models
from mdiff.errors import MdiffError
from mdiff.positions import parse_positions

pytestmark = pytest.mark.slow

NAMES = ["blocks.0.hook_resid_post", "blocks.3.hook_resid_post", "blocks.5.hook_resid_post",
         "blocks.0.attn.hook_z", "blocks.5.attn.hook_z"]


@pytest.fixture(scope="module")
def lr(toys):
    """toy-lowrank's base model, tokenizers and prompts (loaded once)."""
    spec = toys["toy-lowrank"]
    btok = models.load_tokenizer(spec.base)
    ttok = models.load_tokenizer(spec.tuned)
    prompts = data.load_prompts(spec.prompts)
    model = models.load_model(spec, "base", device="cpu")
    yield spec, model, btok, ttok, prompts
    models.free(model)


def _prepare(lr, n, positions="last", pick=None):
    spec, _, btok, ttok, prompts = lr
    ps = pick(prompts) if pick else prompts[:n]
    return align.prepare(ps, btok, ttok, "extends", spec.chat_template, parse_positions(positions))


def _varied(prompts, n=10):
    """Prompts of many different lengths (with and without a system message)."""
    by_len = {}
    for p in prompts:
        key = (len(p.messages), len(p.messages[-1]["content"]))
        by_len.setdefault(key, p)
    out = sorted(by_len.values(), key=lambda p: p.id)[:n]
    assert len(out) == n
    return out


def _single_reference(model, ids, positions, names):
    """Unpadded, one prompt at a time, full cache: the activations at ``positions``."""
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=names)
    return {n: cache[n][0, positions] for n in names}


# --------------------------------------------------------------------------- left padding
@pytest.mark.parametrize("positions", ["last", "k=2"])
def test_left_padded_batch_equals_single_prompt_runs(lr, positions):
    spec, model, btok, _, _ = lr
    prep = _prepare(lr, 0, positions, pick=_varied)
    lengths = [len(x) for x in prep.base_ids]
    assert len(set(lengths)) >= 5  # real padding in the batch
    got = A.gather_batch(model, prep.base_ids, prep.base_positions, NAMES, data.pad_id_of(btok), stop_at_layer=6)
    k = len(prep.base_positions[0])
    assert got["blocks.0.hook_resid_post"].shape == (len(prep) * k, 64)
    assert got["blocks.5.attn.hook_z"].shape == (len(prep) * k, 4, 16)
    worst = 0.0
    for i, (ids, pos) in enumerate(zip(prep.base_ids, prep.base_positions, strict=True)):
        ref = _single_reference(model, ids, pos, NAMES)
        for n in NAMES:
            worst = max(worst, float((got[n][i * k:(i + 1) * k] - ref[n]).abs().max()))
    assert worst < 1e-5
    # the padded positions really are different from the content: the gather picked the right rows
    assert not torch.allclose(got["blocks.5.hook_resid_post"][0], got["blocks.5.hook_resid_post"][k])


def test_gather_with_different_numbers_of_positions_per_prompt(lr):
    """Prompts whose positions were partly dropped by alignment keep their remaining positions."""
    _, model, btok, _, _ = lr
    prep = _prepare(lr, 0, "last", pick=_varied)
    ids = prep.base_ids[:4]
    positions = [[2], [1, 3, 5], [len(ids[2]) - 1], [4, 6]]
    got = A.gather_batch(model, ids, positions, NAMES[:2] + NAMES[-1:], data.pad_id_of(btok))
    flat = 0
    for x, pos in zip(ids, positions, strict=True):
        ref = _single_reference(model, x, pos, NAMES[:2] + NAMES[-1:])
        for n, r in ref.items():
            assert float((got[n][flat:flat + len(pos)] - r).abs().max()) < 1e-5
        flat += len(pos)
    assert got[NAMES[0]].shape[0] == flat == 7


# --------------------------------------------------------------------------- store: resume, refuse, read
META = {"pair": "toy-lowrank", "model": "base-dir", "dtype": "float32", "pad_id": 2}


def _snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _shard_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return {p.name: load_file(str(p)) for p in sorted(path.glob("shard-*.safetensors"))}


@pytest.fixture(scope="module")
def store(lr, tmp_path_factory):
    """One uninterrupted collection (20 prompts, k=2, 4 shards) and its inputs."""
    _, model, _, _, _ = lr
    prep = _prepare(lr, 20, "k=2")
    root = tmp_path_factory.mktemp("store")
    kw = dict(hooks=["resid_post", "z"], layers=[1, 4], meta=META, shard_prompts=6, batch_size=4)
    res = A.collect(model, prep, "base", path=root / "full", **kw)
    return prep, root, kw, res


def test_uninterrupted_collection(store, lr):
    prep, root, kw, res = store
    assert (res.n_shards, res.n_rows, res.skipped_shards) == (4, 40, 0)
    aset = A.ActivationSet(root / "full")
    assert aset.prompt_ids == prep.prompt_ids
    rp, rpos = aset.rows()
    assert rp.tolist() == [i for i in range(20) for _ in range(2)]
    assert rpos.tolist() == [q for p in prep.base_positions for q in p]
    z = aset.load("z", 4)
    assert z.shape == (40, 4, 16) and aset.load("resid_post", 1).shape == (40, 64)
    # values: the single-prompt reference
    _, model, _, _, _ = lr
    for i in (0, 7, 19):
        ref = _single_reference(model, prep.base_ids[i], prep.base_positions[i],
                                ["blocks.4.attn.hook_z", "blocks.1.hook_resid_post"])
        assert float((z[2 * i:2 * i + 2] - ref["blocks.4.attn.hook_z"]).abs().max()) < 1e-5
        assert float((aset.load("resid_post", 1)[2 * i:2 * i + 2] - ref["blocks.1.hook_resid_post"]).abs().max()) \
            < 1e-5
    with pytest.raises(MdiffError, match=r"has no resid_post at layer 2 \(collected: resid_post.1, resid_post.4, "
                                         r"z.1, z.4\)"):
        aset.load("resid_post", 2)


def test_resume_after_interrupt_is_bit_for_bit(store, lr):
    prep, root, kw, _ = store
    _, model, _, _, _ = lr
    part = root / "resumed"
    with pytest.raises(KeyboardInterrupt):
        A.collect(model, prep, "base", path=part, _stop_after=1, **kw)
    assert sorted(p.name for p in part.iterdir()) == ["settings.json", "shard-00000.safetensors"]
    with pytest.raises(MdiffError, match=r"no complete activation collection .* \(an interrupted collection: run "
                                         r"the same collect again to finish it\)"):
        A.ActivationSet(part)
    # a temporary file left by a run killed while writing is cleaned up by the resume
    (part / ".shard-00001.safetensors.tmp-999999999").write_bytes(b"half")
    done = []
    res = A.collect(model, prep, "base", path=part, on_shard=lambda d, t: done.append((d, t)), **kw)
    assert (res.n_shards, res.n_rows, res.skipped_shards) == (4, 40, 1)
    assert done == [(1, 4), (2, 4), (3, 4), (4, 4)]
    full, resumed = _shard_tensors(root / "full"), _shard_tensors(part)
    assert list(full) == list(resumed) == [f"shard-0000{i}.safetensors" for i in range(4)]
    for name in full:
        assert full[name].keys() == resumed[name].keys()
        for key in full[name]:
            assert torch.equal(full[name][key], resumed[name][key]), (name, key)
    assert _snapshot(root / "full") == _snapshot(part)  # every file, byte for byte (manifest included)
    assert not [p for p in part.iterdir() if ".tmp" in p.name]
    a, b = A.ActivationSet(root / "full"), A.ActivationSet(part)
    assert torch.equal(a.load("z", 1), b.load("z", 1))


def test_rerun_of_a_complete_collection_skips_every_shard(store, lr, monkeypatch):
    prep, root, kw, _ = store
    _, model, _, _, _ = lr
    before = _snapshot(root / "full")

    def boom(*a, **k):
        raise AssertionError("a complete shard was computed again")

    monkeypatch.setattr(A, "gather_batch", boom)
    res = A.collect(model, prep, "base", path=root / "full", **kw)
    assert (res.n_shards, res.skipped_shards, res.n_rows) == (4, 4, 40)
    assert _snapshot(root / "full") == before


@pytest.mark.parametrize("change, needle", [
    (dict(layers=[1, 3]), "layers"),
    (dict(hooks=["resid_post"]), "hooks"),
    (dict(meta={**META, "model": "another-model"}), "model"),
    (dict(prep="subset"), "prompt_ids"),
    (dict(prep="k3"), "positions_sha256"),
    (dict(side="tuned"), "side"),
])
def test_refuses_to_mix_collections(store, lr, change, needle):
    prep, root, kw, _ = store
    _, model, _, _, _ = lr
    before = _snapshot(root / "full")
    kw = {**kw, **{k: v for k, v in change.items() if k not in ("prep", "side")}}
    if change.get("prep") == "subset":
        prep = prep.subset(list(range(10)))
    elif change.get("prep") == "k3":
        prep = _prepare(lr, 20, "k=3")
    with pytest.raises(MdiffError) as ei:
        A.collect(model, prep, change.get("side", "base"), path=root / "full", **kw)
    msg = str(ei.value)
    assert "already holds activations collected with other settings" in msg and needle in msg
    assert "rerun with overwrite to collect them again" in msg and ei.value.option == "overwrite"
    assert needle in msg.split("differs in: ")[1].split(")")[0].split(", ")
    assert "\n" not in msg
    assert _snapshot(root / "full") == before


def test_activation_set_refuses_a_foreign_shard(store, lr, tmp_path):
    prep, root, kw, _ = store
    _, model, _, _, _ = lr
    other = tmp_path / "other"
    A.collect(model, prep.subset(list(range(6))), "base", path=other, **{**kw, "shard_prompts": 6})
    (root / "mixed").mkdir()
    for p in (root / "full").iterdir():
        (root / "mixed" / p.name).write_bytes(p.read_bytes())
    (root / "mixed" / "shard-00000.safetensors").write_bytes((other / "shard-00000.safetensors").read_bytes())
    with pytest.raises(MdiffError, match=r"shard-00000.safetensors is damaged \(its sha256 does not match"):
        A.ActivationSet(root / "mixed").load("z", 1)
    # even with the manifest's checksum edited to match, the shard is refused as another collection's
    mf = json.loads((root / "mixed" / "manifest.json").read_text())
    mf["shards"][0]["sha256"] = hashlib.sha256((other / "shard-00000.safetensors").read_bytes()).hexdigest()
    (root / "mixed" / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(MdiffError, match="shard-00000.safetensors belongs to another collection; refusing to mix"):
        A.ActivationSet(root / "mixed").load("z", 1)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _flip_tensor_bytes(path: Path) -> None:
    """Overwrite 16 bytes inside the tensor data of a shard, leaving its header intact."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    at = 8 + n + (len(raw) - 8 - n) // 2
    raw[at:at + 16] = bytes(16)
    path.write_bytes(bytes(raw))


def test_damaged_shard_is_named_on_read_and_collected_again(store, lr, tmp_path):
    prep, root, kw, _ = store
    _, model, _, _, _ = lr
    bad = _copy(root / "full", tmp_path / "bad")
    _flip_tensor_bytes(bad / "shard-00002.safetensors")
    aset = A.ActivationSet(bad)
    with pytest.raises(MdiffError) as e:
        aset.load("resid_post", 4)
    msg = str(e.value)
    assert f"{bad / 'shard-00002.safetensors'} is damaged" in msg and "\n" not in msg
    res = A.collect(model, prep, "base", path=bad, **kw)
    assert (res.n_shards, res.skipped_shards) == (4, 3)  # only the damaged shard was collected again
    assert _snapshot(bad) == _snapshot(root / "full")


def test_nonfinite_values_name_the_shard_and_rows(store, tmp_path):
    from safetensors.torch import load_file

    _, root, _, _ = store
    bad = _copy(root / "full", tmp_path / "nan")
    f = bad / "shard-00001.safetensors"
    t = load_file(str(f))
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        md = {k: v for k, v in h.metadata().items() if k != "data_sha256"}
    t["z.4"][[3, 5]] = float("nan")
    t["z.4"][7, 0, 0] = float("inf")
    sha = A._save_shard(t, f, md)
    mf = json.loads((bad / "manifest.json").read_text())
    mf["shards"][1]["sha256"] = sha
    (bad / "manifest.json").write_text(json.dumps(mf))
    aset = A.ActivationSet(bad)
    assert torch.isfinite(aset.load("z", 1)).all()
    with pytest.raises(MdiffError) as e:
        aset.load("z", 4)
    rows_before = mf["shards"][0]["rows"]
    assert str(e.value).startswith(f"{f} holds NaN/inf in z.4 at 3 row(s) "
                                   f"{[rows_before + 3, rows_before + 5, rows_before + 7]}")


def test_a_model_producing_nan_is_refused_naming_prompts(store, lr, tmp_path, monkeypatch):
    prep, _, kw, _ = store
    _, model, _, _, _ = lr
    real = A.gather_batch

    def nan_batch(model_, ids, positions, *a, **k):
        out = real(model_, ids, positions, *a, **k)
        if prep.base_ids[3] in ids:  # the second position (2 rows per prompt) of prompt 3
            out["blocks.4.hook_resid_post"][2 * ids.index(prep.base_ids[3]) + 1] = float("nan")
        return out

    monkeypatch.setattr(A, "gather_batch", nan_batch)
    with pytest.raises(MdiffError, match=r"the base model produced NaN/inf in resid_post.4 for 1 prompt\(s\) "
                                         rf"\({prep.prompt_ids[3]}\) while collecting shard-00000.safetensors"):
        A.collect(model, prep, "base", path=tmp_path / "c" / "acts", **kw)
    assert not (tmp_path / "c").exists()  # failed before its first shard: no folder left behind


def test_activation_set_missing_folder(tmp_path):
    with pytest.raises(MdiffError, match=r"^no complete activation collection at .*nope$"):
        A.ActivationSet(tmp_path / "nope")


@pytest.mark.parametrize("hooks, layers, needle", [
    (["result"], [1], "unknown hook 'result'"),
    (["resid"], [1], "unknown hook 'resid'"),
    (["z"], [6], "6"),
    (["z"], [], "nothing to collect"),
    ([], [1], "nothing to collect"),
    (["z", "z"], [1], "repeat"),
])
def test_collect_bad_input_writes_nothing(lr, tmp_path, hooks, layers, needle):
    _, model, _, _, _ = lr
    prep = _prepare(lr, 3)
    with pytest.raises(MdiffError, match=needle):
        A.collect(model, prep, "base", hooks, layers, tmp_path / "x" / "acts", META)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- CLI
def _invoke(args):
    from typer.testing import CliRunner

    from mdiff.cli import app

    return CliRunner().invoke(app, args)


def test_cli_collect_toy_lowrank_all_layers(toys, tmp_path):
    spec = toys["toy-lowrank"]
    out = tmp_path / "res"
    r = _invoke(["collect", "--pair", "toy-lowrank", "--layers", "all", "--hooks", "resid_post,z",
                 "--positions", "last", "--split", "train", "--out", str(out), "--threads", "1"])
    assert r.exit_code == 0, r.output
    btok = models.load_tokenizer(spec.base)
    train = data.select_split(data.load_prompts(spec.prompts), "train", seed=0)
    assert len(train) == 180
    toks = [list(btok.apply_chat_template([dict(m) for m in p.messages], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]) for p in train]
    names = [f"blocks.{L}.hook_resid_post" for L in range(6)] + [f"blocks.{L}.attn.hook_z" for L in range(6)]
    assert sorted(p.name for p in (out / "toy-lowrank" / "activations").iterdir()) == \
        ["base-train-last", "tuned-train-last"]
    for side in ("base", "tuned"):
        aset = A.ActivationSet(A.collection_dir(out, "toy-lowrank", side, "train", "last"))
        assert aset.prompt_ids == [p.id for p in train]
        assert aset.settings["model"] == (spec.base if side == "base" else spec.tuned)
        assert aset.settings["tokenized_with"] == "shared"
        rp, rpos = aset.rows()
        assert rp.tolist() == list(range(180)) and rpos.tolist() == [len(t) - 1 for t in toks]
        acts = {}
        for L in range(6):
            acts[f"blocks.{L}.hook_resid_post"] = aset.load("resid_post", L)
            acts[f"blocks.{L}.attn.hook_z"] = aset.load("z", L)
            assert acts[f"blocks.{L}.hook_resid_post"].shape == (180, 64)
            assert acts[f"blocks.{L}.attn.hook_z"].shape == (180, 4, 16)
        model = models.load_model(spec, side, device="cpu")
        try:
            worst = 0.0
            for i, t in enumerate(toks):
                ref = _single_reference(model, t, [len(t) - 1], names)
                for n in names:
                    worst = max(worst, float((acts[n][i] - ref[n][0]).abs().max()))
            assert worst < 1e-5, (side, worst)
        finally:
            models.free(model)
    # the two sides differ where the planted change acts (layer 4 onwards), not before
    b = A.ActivationSet(A.collection_dir(out, "toy-lowrank", "base", "train", "last"))
    t = A.ActivationSet(A.collection_dir(out, "toy-lowrank", "tuned", "train", "last"))
    assert torch.equal(b.load("resid_post", 3), t.load("resid_post", 3))
    assert not torch.allclose(b.load("resid_post", 4), t.load("resid_post", 4))
    # a second run finds everything done
    r2 = _invoke(["collect", "--pair", "toy-lowrank", "--layers", "all", "--hooks", "resid_post,z",
                  "--positions", "last", "--split", "train", "--out", str(out), "--threads", "1"])
    assert r2.exit_code == 0 and "(3 already done)" in r2.stdout


@pytest.mark.parametrize("args, needle", [
    (["--layers", "6"], "--layers: layer 6 is out of range 0..5"),
    (["--hooks", "resid"], "--hooks: unknown 'resid'"),
    (["--positions", "k=99"], "fewer than k=99"),
    (["--split", "test"], "unknown split 'test'"),
])
def test_cli_collect_bad_input(toys, tmp_path, args, needle):
    out = tmp_path / "res"
    r = _invoke(["collect", "--pair", "toy-lowrank", "--out", str(out), "--threads", "1", *args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in r.output and not isinstance(r.exception, MdiffError)
    assert not out.exists()
    assert json.dumps(r.stdout) == '""'  # nothing on stdout


def test_collection_dirs_of_different_sites_never_collide(tmp_path):
    """RQ1 on every layer and RQ2 at two probe layers (same split/positions) write to different stores."""
    a = A.collection_dir(tmp_path, "p", "base", "all", "last", ["resid_post"], [0, 1, 2])
    b = A.collection_dir(tmp_path, "p", "base", "all", "last", ["resid_post", "attn_out"], [0, 1, 2])
    c = A.collection_dir(tmp_path, "p", "base", "all", "last", ["resid_post"], [2, 1, 0])
    assert a != b and a == c and a.parent == b.parent
    assert A.collection_dir(tmp_path, "p", "base", "all", "last").name == "base-all-last"  # `mdiff collect`'s folder


def test_replace_collects_anew_and_touches_only_collection_files(store, lr, tmp_path):
    prep, root, kw, _ = store
    _, model, _, _, _ = lr
    d = _copy(root / "full", tmp_path / "r")
    (d / "notes.txt").write_text("mine")
    sub = prep.subset(list(range(8)))
    with pytest.raises(MdiffError, match="differs in: .*prompt_ids"):
        A.collect(model, sub, "base", path=d, **kw)
    res = A.collect(model, sub, "base", path=d, replace=True, **kw)
    assert (res.n_shards, res.skipped_shards) == (2, 0)
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "notes.txt", "settings.json",
                                                   "shard-00000.safetensors", "shard-00001.safetensors"]
    assert A.ActivationSet(d).prompt_ids == sub.prompt_ids
    assert torch.equal(A.ActivationSet(d).load("z", 4), A.ActivationSet(root / "full").load("z", 4)[:16])


def test_other_weights_are_refused_naming_the_file(store, lr, tmp_path):
    prep, root, kw, _ = store
    _, model, _, _, _ = lr
    old = {"revision": None, "files": {"config.json": {"size": 1, "mtime_ns": 1, "sha256_sampled": "a"},
                                       "model.safetensors": {"size": 9, "mtime_ns": 1, "sha256_sampled": "b"}}}
    new = json.loads(json.dumps(old))
    new["files"]["model.safetensors"].update(mtime_ns=2, sha256_sampled="c")
    d = tmp_path / "w"
    A.collect(model, prep, "base", path=d, **{**kw, "meta": {**META, "weights": old}})
    with pytest.raises(MdiffError) as e:
        A.collect(model, prep, "base", path=d, **{**kw, "meta": {**META, "weights": new}})
    assert str(e.value) == (f"{d} holds activations of other weights of the base model (base-dir: model.safetensors "
                            f"(bytes, modified time) since they were collected); rerun with overwrite to collect "
                            f"them from the current weights")
    res = A.collect(model, prep, "base", path=d, replace=True, **{**kw, "meta": {**META, "weights": new}})
    assert res.skipped_shards == 0 and A.ActivationSet(d).settings["weights"] == new


def test_prompts_are_batched_by_length_and_stored_in_order(lr, tmp_path, monkeypatch):
    _, model, _, _, prompts = lr
    prep = _prepare(lr, 0, pick=lambda ps: _varied(ps, 10))
    lengths = [len(x) for x in prep.base_ids]
    assert len(set(lengths)) > 3
    real, widths = A.gather_batch, []

    def recording(model_, ids, *a, **k):
        widths.append([len(x) for x in ids])
        return real(model_, ids, *a, **k)

    monkeypatch.setattr(A, "gather_batch", recording)
    A.collect(model, prep, "base", ["resid_post"], [2], tmp_path / "s", META, shard_prompts=10, batch_size=3)
    assert [sorted(w) for w in widths] == [sorted(lengths)[i:i + 3] for i in range(0, 10, 3)]  # peers by length
    aset = A.ActivationSet(tmp_path / "s")
    assert aset.rows()[0].tolist() == list(range(10))  # stored in prompt order
    got = aset.load("resid_post", 2)
    for i in range(10):
        ref = _single_reference(model, prep.base_ids[i], prep.base_positions[i], ["blocks.2.hook_resid_post"])
        assert float((got[i] - ref["blocks.2.hook_resid_post"][0]).abs().max()) < 1e-5


@pytest.mark.parametrize("names", [["blocks.5.hook_resid_post", "blocks.5.hook_mlp_out"],
                                   ["blocks.1.hook_resid_pre", "blocks.2.attn.hook_z"]])
def test_collection_stops_after_the_last_needed_hook(lr, names):
    """No unembedding (and no later block) runs while collecting, even for the last block's hooks,
    and the values equal those of a full forward pass."""
    spec, model, *_ = lr
    prep = _prepare(lr, 5)
    inp, mask = data.pad_left(prep.base_ids, 0)
    with torch.no_grad():
        _, cache = model.run_with_cache(inp, attention_mask=mask, names_filter=lambda n: n in names)
    calls = {"lm_head": 0, "last_block": 0}
    hf = model.original_model
    hs = [hf.lm_head.register_forward_hook(lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1)),
          hf.model.layers[5].register_forward_hook(
              lambda *a: calls.__setitem__("last_block", calls["last_block"] + 1))]
    try:
        got = A.gather_batch(model, prep.base_ids, prep.base_positions, names, 0)
    finally:
        for h in hs:
            h.remove()
    assert calls["lm_head"] == 0
    assert calls["last_block"] == 0  # block 5's own hooks fire inside it: the block never returns
    width = inp.shape[1]
    rows = torch.tensor([width - len(x) + p[0] for x, p in zip(prep.base_ids, prep.base_positions, strict=True)])
    for n in names:
        want = cache[n][torch.arange(len(rows)), rows]
        assert torch.equal(got[n], want), n
