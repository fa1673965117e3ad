"""Loading pairs through TransformerBridge.boot_transformers(dir): shapes, tokenizers, errors, one at a time."""

import gc
import weakref

import pytest
import torch
from conftest import make_tiny_llama
from typer.testing import CliRunner

from mdiff import models
from mdiff.cli import app
from mdiff.errors import MdiffError
from mdiff.pairs import PairSpec, load_pair_file

runner = CliRunner()
pytestmark = pytest.mark.slow


def test_toml_pair_with_different_vocab_sizes_loads(toys, tmp_path):
    lr = toys["toy-lowrank"]
    p = tmp_path / "pair.toml"
    p.write_text(f'base = "{lr.base}"\ntuned = "{lr.tuned}"\ndtype = "float32"\n')
    spec = load_pair_file(p)
    base, tuned, info = models.load_pair(spec, device="cpu")
    assert base.cfg.d_vocab == 600 and tuned.cfg.d_vocab == 612
    assert info.base.d_vocab != info.tuned.d_vocab
    assert info.tokenizer_relation == "extends" and info.n_shared_tokens == 600
    assert info.base_tokenizer_hash != info.tuned_tokenizer_hash
    # raw mode: bridge logits equal the HF model's own (eager) logits
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(lr.base, attn_implementation="eager").eval()
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        assert torch.allclose(base(ids), hf(ids).logits, atol=1e-5)
    assert not any(p.requires_grad for p in base.parameters())


def test_identical_tokenizer_relation(toys):
    info = models.inspect_pair(toys["toy-distributed"])
    assert info.tokenizer_relation == "identical"
    assert info.base_tokenizer_hash == info.tuned_tokenizer_hash


def test_different_tokenizer_relation(toys, tmp_path):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(toys["toy-lowrank"].base)
    vocab = a.get_vocab()
    b = AutoTokenizer.from_pretrained(toys["toy-lowrank"].tuned)  # the base vocabulary plus new tokens
    assert models.tokenizer_relation(a, b)[0] == "extends"
    assert models.tokenizer_relation(b, a)[0] == "different"  # tuned smaller than base
    assert models.tokenizer_relation(a, a) == ("identical", len(vocab))


def _permuted_tokenizer(tok, seed=0):
    """The same tokenizer with the ids of its ordinary (non-added) tokens shuffled: same strings, same merges."""
    import json

    import numpy as np
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tok.backend_tokenizer.to_str())
    added = {t["id"] for t in spec["added_tokens"]}
    vocab = spec["model"]["vocab"]
    movable = sorted(i for i in vocab.values() if i not in added)
    perm = dict(zip(movable, np.random.default_rng(seed).permutation(movable).tolist(), strict=True))
    spec["model"]["vocab"] = {t: perm.get(i, i) for t, i in vocab.items()}
    new = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                  bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.pad_token)
    return new, sum(1 for i in movable if perm[i] == i) + len(added & set(vocab.values()))


def test_permuted_vocabulary_is_different(toys):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(toys["toy-lowrank"].base)
    p, fixed = _permuted_tokenizer(a)
    text = "what is the capital of peru ?"
    ia, ip = a(text)["input_ids"], p(text)["input_ids"]
    assert ia != ip and a.convert_ids_to_tokens(ia) == p.convert_ids_to_tokens(ip)  # the permutation is real
    assert sorted(a.get_vocab()) == sorted(p.get_vocab()) and len(p) == len(a)
    assert models.tokenizer_relation(a, p) == ("different", fixed)  # same strings, other ids: not shared
    assert models.tokenizer_relation(p, a) == ("different", fixed)
    assert fixed < len(a) // 10
    assert models.tokenizer_hash(a) != models.tokenizer_hash(p)


def test_incompatible_pair_is_refused_naming_both_values(toys, tmp_path):
    tokdir = toys["toy-lowrank"].base
    a = make_tiny_llama(tmp_path / "a", tokdir, n_layers=2)
    b = make_tiny_llama(tmp_path / "b", tokdir, n_layers=3)
    spec = PairSpec(name="x", base=a, tuned=b)
    with pytest.raises(MdiffError, match=r"n_layers differs \(base 2, tuned 3\)"):
        models.inspect_pair(spec)
    c = make_tiny_llama(tmp_path / "c", tokdir, n_layers=2, hidden=64, heads=4, kv_heads=2)
    with pytest.raises(MdiffError, match=r"d_model differs \(base 32, tuned 64\)"):
        models.inspect_pair(PairSpec(name="x", base=a, tuned=c))
    d = make_tiny_llama(tmp_path / "d", tokdir, n_layers=2, hidden=32, heads=2, kv_heads=2)
    with pytest.raises(MdiffError, match=r"n_heads differs \(base 4, tuned 2\)"):
        models.inspect_pair(PairSpec(name="x", base=a, tuned=d))
    # the CLI says it in one line, exit 2
    p = tmp_path / "bad.toml"
    p.write_text(f'base = "{a}"\ntuned = "{b}"\n')
    r = runner.invoke(app, ["info", "--pair", str(p)])
    assert r.exit_code == 2 and "n_layers differs" in r.output and "Traceback" not in r.output


def test_missing_directory_error(tmp_path):
    p = tmp_path / "pair.toml"
    p.write_text('base = "./nowhere"\ntuned = "/also/nowhere"\n')
    r = runner.invoke(app, ["info", "--pair", str(p)])
    assert r.exit_code == 2
    assert "model directory not found" in r.output and "nowhere" in r.output and "Traceback" not in r.output


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MdiffError, match="has no config.json"):
        models.read_config(str(tmp_path / "empty"), side="base")


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MdiffError, match="could not load base model 'meta-llama/Llama-3.1-8B'.*local directory"):
        models.read_config("meta-llama/Llama-3.1-8B", side="base")


def test_one_model_at_a_time_and_free(toys):
    spec = toys["toy-lowrank"]
    m = models.load_model(spec, "base", device="cpu")
    ref = weakref.ref(m)
    w = m.blocks[0].attn.W_O
    assert w.device.type == "cpu"
    models.free(m)
    del m, w
    gc.collect()
    assert ref() is None
    m = models.load_model(spec, "tuned", device="cpu", dtype="bfloat16")
    assert next(m.parameters()).dtype == torch.bfloat16
    assert m.mdiff_side == "tuned"


def test_chat_template_string_overrides(toys):
    from dataclasses import replace

    spec = replace(toys["toy-lowrank"], chat_template="{{ bos_token }}X{{ messages[0]['content'] }}")
    m = models.load_model(spec, "base", device="cpu")
    assert m.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<s>Xhi"


def test_weights_fingerprint_sees_in_place_changes_and_is_fast(tmp_path):
    import os
    import time

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")  # not a weight file: ignored
    small = d / "model.safetensors"
    small.write_bytes(b"x" * 1000)
    fp0 = models.weights_fingerprint(str(d), "main")
    assert sorted(fp0["files"]) == ["config.json", "model.safetensors"] and fp0["revision"] == "main"
    st = small.stat()
    small.write_bytes(b"x" * 500 + b"y" + b"x" * 499)  # same size, one byte, time restored
    os.utime(small, ns=(st.st_atime_ns, st.st_mtime_ns))
    fp1 = models.weights_fingerprint(str(d), "main")
    assert fp1 != fp0 and models.describe_weights_change(fp0, fp1) == "model.safetensors (bytes)"
    os.utime(small, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert models.describe_weights_change(fp1, models.weights_fingerprint(str(d), "main")) == \
        "model.safetensors (modified time)"
    assert models.describe_weights_change(fp1, models.weights_fingerprint(str(d), "v2")) == "revision 'main' -> 'v2'"
    # a 16 GB shard (sparse): header + sampled chunks only, fast; a change in a sampled chunk is seen
    big = d / "model-00001-of-00002.safetensors"
    header = b'{"w":{"dtype":"F32","shape":[4000000000],"data_offsets":[0,16000000000]}}'
    with open(big, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 16_000_000_000)
    t = time.perf_counter()
    fp2 = models.weights_fingerprint(str(d))
    assert time.perf_counter() - t < 2.0
    st = big.stat()
    with open(big, "r+b") as f:
        f.seek(st.st_size - 10)
        f.write(b"z")
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert models.describe_weights_change(fp2, models.weights_fingerprint(str(d))) == \
        "model-00001-of-00002.safetensors (bytes)"


def test_weights_fingerprint_of_a_hub_id_not_cached():
    assert models.weights_fingerprint("nobody/not-a-model") == {"revision": None, "files": None}
