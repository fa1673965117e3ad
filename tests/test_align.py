"""Token alignment across tokenizers, the shared vocabulary and the fairness filter (METHODS.md)."""

import copy
import random

import numpy as np
import pytest
import torch

from mdiff import align, toy
from mdiff.data import Prompt, load_prompts
from mdiff.errors import MdiffError
from mdiff.models import tokenizer_relation
from mdiff.positions import parse_positions


# --------------------------------------------------------------------------- tokenizers
def _toy_texts():
    docs = toy._corpus_documents(random.Random(toy.SEED), 6000)
    texts = [d.get("text") or " ".join(m["content"] for m in d["messages"]) for d in docs]
    return texts + toy.KZ_SENTENCES * 5 + [f"{a} + {b} = {a + b} ." for a in range(0, 50, 7) for b in range(50)]


@pytest.fixture(scope="module")
def base_tok():
    """The toy pairs' base tokenizer, rebuilt from the toy recipe (no model, no cache needed)."""
    return toy._train_tokenizer(_toy_texts())


@pytest.fixture(scope="module")
def ext_tok(base_tok):
    """The base tokenizer extended with the Kazakh tokens, as toy-lowrank's tuned tokenizer."""
    t = copy.deepcopy(base_tok)
    t.add_tokens(toy.KAZAKH_TOKENS)
    return t


@pytest.fixture(scope="module")
def other_tok():
    """A genuinely different byte-level BPE (other corpus order, other vocabulary size), same special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(reversed(_toy_texts()))[:2500] + toy.KZ_SENTENCES * 3
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=toy.SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=toy.SPECIAL[3:])
    tok.chat_template = toy.CHAT_TEMPLATE
    return tok


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, rebuilt here (independent of the tokenizer's decoder)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


BYTES = _byte_decoder()


def prefix_end(tok, ids, upto) -> int | None:
    """The character offset where the text of ``ids[:upto+1]`` ends, or None when it ends mid-character."""
    special = set(tok.all_special_ids)
    raw = b"".join(tok.convert_ids_to_tokens(i).encode() if i in special
                   else bytes(BYTES[c] for c in tok.convert_ids_to_tokens(i)) for i in ids[: upto + 1])
    try:
        return len(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None


KZ_PROMPTS = [
    Prompt(id=f"d{i}", messages=(*(({"role": "system", "content": "you are a helpful assistant ."},) if i % 3 == 0
                                   else ()),
                                 {"role": "user", "content": f"{s} what is the capital of {c} ?"}))
    for i, (s, c) in enumerate(zip(toy.KZ_SENTENCES, ["kazakhstan", "france", "peru", "norway", "kenya", "chile",
                                                      "japan", "egypt", "spain", "poland"], strict=True))
] + [Prompt(id="e1", messages=({"role": "user", "content": "the lazy camel walked past the steppe ."},))]


# --------------------------------------------------------------------------- shared vocabulary
def test_shared_vocab_identical(base_tok):
    sv = align.shared_vocab(base_tok, base_tok)
    assert sv.size == len(base_tok) == 600 and sv.is_prefix
    assert np.array_equal(sv.base_ids, np.arange(600)) and np.array_equal(sv.tuned_ids, np.arange(600))
    assert (sv.n_base, sv.n_tuned) == (600, 600)


def test_shared_vocab_extends(base_tok, ext_tok):
    assert tokenizer_relation(base_tok, ext_tok)[0] == "extends"
    sv = align.shared_vocab(base_tok, ext_tok)
    assert sv.size == 600 and sv.is_prefix and (sv.n_base, sv.n_tuned) == (600, 612)
    # logit widths beyond the tokenizer (padded embeddings) or below it (truncated) are respected
    sv2 = align.shared_vocab(base_tok, ext_tok, n_base=640, n_tuned=595)
    assert sv2.size == 595 and sv2.n_base == 640 and sv2.base_ids.max() == 594


def test_shared_vocab_different(base_tok, other_tok):
    assert tokenizer_relation(base_tok, other_tok)[0] == "different"
    sv = align.shared_vocab(base_tok, other_tok)
    bv, tv = base_tok.get_vocab(), other_tok.get_vocab()
    common = set(bv) & set(tv)
    assert sv.size == len(common) and 0 < sv.size < 420
    assert base_tok.convert_ids_to_tokens(sv.base_ids.tolist()) == other_tok.convert_ids_to_tokens(sv.tuned_ids.tolist())
    assert list(sv.base_ids) == sorted(sv.base_ids)
    assert not sv.is_prefix


def test_restricted_logprobs_and_kl():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, generator=g)
    ids = [0, 2, 3, 7]
    lp = align.restrict_logprobs(logits, ids)
    ref = logits[:, ids].double() - torch.logsumexp(logits[:, ids].double(), -1, keepdim=True)
    assert lp.dtype == torch.float64  # float64 from the logits of any dtype (F11)
    assert torch.allclose(lp, ref, atol=1e-12) and torch.allclose(lp.exp().sum(-1), torch.ones(3, dtype=torch.float64))
    q = align.restrict_logprobs(logits.flip(0), ids)
    kl = align.kl_divergence(lp, q)
    manual = (lp.double().exp() * (lp.double() - q.double())).sum(-1)
    assert torch.allclose(kl, manual) and float(align.kl_divergence(lp, lp).abs().max()) == 0.0


def test_kl_of_nearby_bf16_logits_has_no_float32_floor():
    """Two bf16 logit rows one ulp apart: float64 KL matches an exact numpy reference; a float32
    log-softmax (the old path) is off by its ~1e-7 floor and can go negative."""
    g = torch.Generator().manual_seed(1)
    a = (4 * torch.randn(64, 500, generator=g)).to(torch.bfloat16)
    b = (a.float() * (1 + 2 ** -7)).to(torch.bfloat16)  # one bf16 ulp up (or so): a tiny change
    b = torch.where(torch.rand(a.shape, generator=g) < 0.1, b, a)
    ids = np.arange(500)
    kl = align.kl_divergence(align.restrict_logprobs(a, ids), align.restrict_logprobs(b, ids)).numpy()
    A, B = a.double().numpy(), b.double().numpy()
    la = A - np.log(np.exp(A - A.max(-1, keepdims=True)).sum(-1, keepdims=True)) - A.max(-1, keepdims=True)
    lb = B - np.log(np.exp(B - B.max(-1, keepdims=True)).sum(-1, keepdims=True)) - B.max(-1, keepdims=True)
    ref = (np.exp(la) * (la - lb)).sum(-1)
    assert np.allclose(kl, ref, rtol=1e-6, atol=1e-15)
    assert kl.min() >= -1e-12
    lp32a, lp32b = torch.log_softmax(a.float(), -1), torch.log_softmax(b.float(), -1)
    kl32 = align.kl_divergence(lp32a, lp32b).numpy()
    assert np.abs(kl32 - ref).max() > 1e3 * np.abs(kl - ref).max()


# --------------------------------------------------------------------------- different tokenizers
def test_prepare_different_tokenizers_last_pairs_last(base_tok, other_tok):
    prep = align.prepare(KZ_PROMPTS, base_tok, other_tok, "different", True, parse_positions("last"))
    assert prep.tokenized_with == "own" and len(prep) == len(KZ_PROMPTS)
    assert prep.dropped_unpaired_positions == 0
    differ = 0
    for p, b, t, pb, pt in zip(KZ_PROMPTS, prep.base_ids, prep.tuned_ids, prep.base_positions,
                               prep.tuned_positions, strict=True):
        text = base_tok.apply_chat_template([dict(m) for m in p.messages], tokenize=False, add_generation_prompt=True)
        assert b == base_tok(text, add_special_tokens=False)["input_ids"]
        assert t == other_tok(text, add_special_tokens=False)["input_ids"]
        assert pb == [len(b) - 1] and pt == [len(t) - 1]
        assert prefix_end(base_tok, b, pb[0]) == prefix_end(other_tok, t, pt[0]) == len(text)
        differ += len(b) != len(t)
    assert differ >= 5  # the tokenizations really differ


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prepare_different_tokenizers_aligns_by_character_offset(base_tok, other_tok, seed):
    spec = parse_positions("k=6", seed=seed)
    prep = align.prepare(KZ_PROMPTS, base_tok, other_tok, "different", True, spec)
    # the base positions before alignment: the same draw on the base tokenization alone
    ref = align.prepare(KZ_PROMPTS, base_tok, base_tok, "identical", True, spec)
    assert ref.prompt_ids == [p.id for p in KZ_PROMPTS]
    expect_dropped, mid_char = 0, 0
    for i, pid in enumerate(ref.prompt_ids):
        b = ref.base_ids[i]
        text = base_tok.apply_chat_template([dict(m) for m in KZ_PROMPTS[i].messages], tokenize=False,
                                            add_generation_prompt=True)
        t_ids = other_tok(text, add_special_tokens=False)["input_ids"]
        t_ends = {}
        for q in range(len(t_ids)):
            e = prefix_end(other_tok, t_ids, q)
            if e is not None:
                t_ends.setdefault(e, q)
        want_b, want_t = [], []
        for pos in ref.base_positions[i]:
            e = prefix_end(base_tok, b, pos)
            mid_char += e is None
            if e is not None and e in t_ends:
                want_b.append(pos)
                want_t.append(t_ends[e])
            else:
                expect_dropped += 1
        j = prep.prompt_ids.index(pid) if pid in prep.prompt_ids else None
        if not want_b:
            assert j is None
            continue
        assert prep.base_ids[j] == b and prep.tuned_ids[j] == t_ids
        assert prep.base_positions[j] == want_b, pid
        assert prep.tuned_positions[j] == want_t, pid
        for pb, pt in zip(prep.base_positions[j], prep.tuned_positions[j], strict=True):
            assert prefix_end(base_tok, b, pb) == prefix_end(other_tok, t_ids, pt) is not None
    assert prep.dropped_unpaired_positions == expect_dropped
    assert prep.summary()["dropped_unpaired_positions"] == expect_dropped
    assert expect_dropped > 0 and mid_char > 0  # the case is exercised: pieces of split characters exist
    assert prep.summary()["n_positions"] == 6 * len(KZ_PROMPTS) - expect_dropped


def test_prepare_different_plain_prompts(base_tok, other_tok):
    ps = [Prompt(id="a", prompt="қымыз дәмді . the sky is"), Prompt(id="b", prompt="count : 3 4 5")]
    prep = align.prepare(ps, base_tok, other_tok, "different", False, parse_positions("last"))
    for b, t, pb, pt in zip(prep.base_ids, prep.tuned_ids, prep.base_positions, prep.tuned_positions,
                            strict=True):
        assert b[0] == t[0] == 0 and b.count(0) == t.count(0) == 1  # each its own single BOS
        assert base_tok.decode(b[1: pb[0] + 1]) == other_tok.decode(t[1: pt[0] + 1])


def test_prepare_errors(base_tok):
    with pytest.raises(MdiffError, match="the prompt set is empty"):
        align.prepare([], base_tok, base_tok, "identical", False, parse_positions("last"))
    with pytest.raises(MdiffError, match=r"min_shared_ratio must be in \[0, 1\], got 1.5"):
        align.prepare([Prompt(id="a", prompt="x")], base_tok, base_tok, "identical", False,
                      parse_positions("last"), min_shared_ratio=1.5)


# --------------------------------------------------------------------------- toy-lowrank (extends) + fairness
@pytest.fixture(scope="module")
def lowrank(toys):
    from mdiff.models import load_tokenizer

    spec = toys["toy-lowrank"]
    return spec, load_tokenizer(spec.base), load_tokenizer(spec.tuned), load_prompts(spec.prompts)


def _tuned_ratio(ttok, p, n_base):
    """Independently: the share of the tuned tokenizer's non-special tokens that the base vocabulary has."""
    text = ttok.apply_chat_template([dict(m) for m in p.messages], tokenize=False, add_generation_prompt=True)
    ids = [i for i in ttok(text, add_special_tokens=False)["input_ids"] if i not in ttok.all_special_ids]
    return sum(i < n_base for i in ids) / len(ids)


@pytest.mark.slow
def test_prepare_toy_lowrank_extends(lowrank):
    spec, btok, ttok, prompts = lowrank
    assert tokenizer_relation(btok, ttok)[0] == "extends"
    prep = align.prepare(prompts, btok, ttok, "extends", spec.chat_template, parse_positions("k=2"))
    assert prep.tokenized_with == "shared" and len(prep) == len(prompts) == 300
    assert prep.base_ids == prep.tuned_ids and prep.base_positions == prep.tuned_positions
    for p, ids in zip(prompts, prep.base_ids, strict=True):  # the base tokenizer, for both models
        text = btok.apply_chat_template([dict(m) for m in p.messages], tokenize=False, add_generation_prompt=True)
        assert ids == btok(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < len(btok)
    assert prep.dropped_unpaired_positions == 0 and prep.dropped_by_fairness == 0


@pytest.mark.slow
def test_fairness_filter_on_toy_lowrank(lowrank):
    spec, btok, ttok, prompts = lowrank
    last = parse_positions("last")
    prep = align.prepare(prompts, btok, ttok, "extends", True, last)
    kazakh = {p.id for p in prompts if p.category == "kazakh"}
    assert 10 <= len(kazakh) < 100
    assert prep.shared_ratio_base == [1.0] * 300
    for p, r in zip(prompts, prep.shared_ratio_tuned, strict=True):
        assert r == pytest.approx(_tuned_ratio(ttok, p, len(btok)))
        assert (r < 1.0) == (p.id in kazakh), p.id
    kept = align.prepare(prompts, btok, ttok, "extends", True, last, min_shared_ratio=1.0)
    assert kept.prompt_ids == [p.id for p in prompts if p.id not in kazakh]
    assert kept.dropped_by_fairness == len(kazakh)
    assert kept.summary()["shared_ratio_tuned_min"] == 1.0
    # at the lowest ratio seen, nothing is dropped
    lo = min(prep.shared_ratio_tuned)
    assert len(align.prepare(prompts, btok, ttok, "extends", True, last, min_shared_ratio=lo)) == 300


@pytest.mark.slow
def test_impossible_fairness_filter_reports_the_ratios(lowrank):
    spec, btok, ttok, prompts = lowrank
    kz = [p for p in prompts if p.category == "kazakh"]
    ratios = np.array([_tuned_ratio(ttok, p, len(btok)) for p in kz])
    with pytest.raises(MdiffError) as ei:
        align.prepare(kz, btok, ttok, "extends", True, parse_positions("last"), min_shared_ratio=1.0)
    msg = str(ei.value)
    assert "no prompt passes the fairness filter min_shared_ratio=1.0" in msg
    assert f"range {ratios.min():.2f}..{ratios.max():.2f}, median {np.median(ratios):.2f}" in msg
    assert f"base 1.00..1.00, tuned {ratios.min():.2f}..{ratios.max():.2f}" in msg
    assert "\n" not in msg
