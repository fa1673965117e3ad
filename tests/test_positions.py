"""Position sets: ``last`` and chat-aware, seeded ``k=K`` (METHODS.md, "position set")."""


import numpy as np
import pytest

from mdiff import align, toy
from mdiff.data import Prompt
from mdiff.errors import MdiffError
from mdiff.positions import PositionSpec, content_mask, last_position, parse_positions, select_positions


@pytest.fixture(scope="module")
def tok():
    """The toy pairs' base tokenizer, rebuilt from the toy recipe (no model, no cache needed)."""
    return toy.train_base_tokenizer()


def positions_of(prompts, tok, spec, chat=True):
    """Positions chosen for each prompt (one tokenizer for both sides)."""
    prep = align.prepare(prompts, tok, tok, "identical", chat, spec)
    return {pid: (ids, pos) for pid, ids, pos in zip(prep.prompt_ids, prep.base_ids, prep.base_positions,
                                                     strict=True)}


SYSTEM = "you are a helpful assistant ."
USER = "what is the capital of france , and what is the capital of norway ?"


def chat_prompt(pid="c1", user=USER, system=SYSTEM):
    msgs = ({"role": "system", "content": system},) if system else ()
    return Prompt(id=pid, messages=msgs + ({"role": "user", "content": user},))


def structural_span(tok, ids, opener):
    """Indices strictly between the ``opener`` special token and the next ``<|end|>`` (a message's content)."""
    toks = tok.convert_ids_to_tokens(ids)
    a = toks.index(opener)
    b = toks.index("<|end|>", a)
    return set(range(a + 1, b))


# --------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, kind, k", [("last", "last", 1), (" LAST ", "last", 1), ("k=16", "k", 16),
                                           ("K = 3", "k", 3), ("k=1", "k", 1)])
def test_parse_positions(text, kind, k):
    spec = parse_positions(text, seed=5, exclude_last=2)
    assert (spec.kind, spec.k, spec.seed, spec.exclude_last) == (kind, k, 5, 2)
    assert spec.tag == ("last" if kind == "last" else f"k{k}")
    assert spec.to_dict() == {"kind": kind, "k": k, "exclude_last": 2, "seed": 5}


@pytest.mark.parametrize("text, needle", [
    ("k=0", "needs K ≥ 1, got 0"), ("k=-1", "not understood"), ("first", "not understood"),
    ("k=", "not understood"), ("k=2.5", "not understood"), ("", "not understood"), ("16", "not understood"),
])
def test_parse_positions_errors(text, needle):
    with pytest.raises(MdiffError) as ei:
        parse_positions(text)
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_parse_positions_negative_exclude_last():
    with pytest.raises(MdiffError, match="exclude_last must be ≥ 0"):
        parse_positions("k=2", exclude_last=-1)


# --------------------------------------------------------------------------- last
def test_last_position_skips_trailing_eos_and_pad():
    assert last_position([0, 5, 6, 7], {1, 2}) == 3
    assert last_position([0, 5, 6, 1, 2, 2], {1, 2}) == 2
    assert last_position([0, 5, 1, 6, 1], {1}) == 3  # only *trailing* EOS is skipped
    assert last_position([0, 1, 1], {1}) == 0        # never below 0


def test_last_on_a_plain_prompt_with_trailing_eos_and_pad(tok):
    body = "the sky is blue ."
    n_body = len(tok(body, add_special_tokens=False)["input_ids"])
    got = positions_of([Prompt(id="p", prompt=body + "</s><pad></s>")], tok, parse_positions("last"), chat=False)
    ids, pos = got["p"]
    assert len(ids) == 1 + n_body + 3             # BOS + body + </s><pad></s>
    assert ids[-3:] == [tok.eos_token_id, tok.pad_token_id, tok.eos_token_id]
    assert pos == [n_body]                        # the body's last token (" .")
    assert tok.convert_ids_to_tokens(ids[n_body]) == "Ġ."


def test_last_on_a_chat_prompt_is_the_end_of_the_assistant_header(tok):
    ids, pos = positions_of([chat_prompt()], tok, parse_positions("last"))["c1"]
    assert pos == [len(ids) - 1]
    assert tok.convert_ids_to_tokens(ids[-1]) == "<|assistant|>"


# --------------------------------------------------------------------------- k=K
@pytest.mark.parametrize("m", [4, None])  # None: the default window (the decision token only)
def test_k_positions_lie_inside_the_user_message(tok, m):
    p = chat_prompt()
    spec_all = {}
    m_used = parse_positions("k=4").exclude_last if m is None else m
    for seed in range(60):
        spec = parse_positions("k=4", seed=seed) if m is None else parse_positions("k=4", seed=seed, exclude_last=m)
        assert spec.exclude_last == m_used
        ids, pos = positions_of([p], tok, spec)["c1"]
        assert len(pos) == 4 and pos == sorted(set(pos))
        text = tok.decode(ids)
        u0 = text.index(USER)
        offs = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for q in pos:
            assert q != 0 and ids[q] not in tok.all_special_ids
            assert q < len(ids) - m_used                            # never the last m tokens
            s, e = offs[q]
            raw = tok.decode([ids[q]])
            assert text[s:e] == raw                                # offsets agree with the decoded token
            start = s + len(raw) - len(raw.lstrip()) if raw.strip() else s  # a leading space may be the
            assert u0 <= start and e <= u0 + len(USER)             # template's; the rest is user text
        spec_all[seed] = pos
    # every usable position is reachable, nothing else: the user message tokens minus the last-m window
    # (the prompt ends "... norway ?<|end|><|assistant|>": the user text's last token is at len - 3)
    user_tokens = structural_span(tok, ids, "<|user|>")
    assert max(user_tokens) == len(ids) - 3
    usable = user_tokens - set(range(len(ids) - m_used, len(ids)))
    assert len(usable) == len(user_tokens) - max(0, m_used - 2)
    assert set().union(*map(set, spec_all.values())) == usable
    assert not set().union(*map(set, spec_all.values())) & structural_span(tok, ids, "<|system|>")
    assert len({tuple(v) for v in spec_all.values()}) > 10  # seeds really change the draw


def test_k_never_uses_bos_or_the_last_tokens_on_plain_prompts(tok):
    body = "the quick fox ran to the river"
    ids_body = tok(body, add_special_tokens=False)["input_ids"]
    n = len(ids_body)
    # with no exclusion window all n body tokens are usable, BOS never
    ids, pos = positions_of([Prompt(id="p", prompt=body)], tok,
                            parse_positions(f"k={n}", exclude_last=0), chat=False)["p"]
    assert ids[0] == tok.bos_token_id and pos == list(range(1, n + 1))
    ids, pos = positions_of([Prompt(id="p", prompt=body)], tok,
                            parse_positions(f"k={n - 2}", exclude_last=2), chat=False)["p"]
    assert pos == list(range(1, n - 1))
    with pytest.raises(MdiffError, match=f"has {n - 2} usable content positions, fewer than k={n - 1}"):
        positions_of([Prompt(id="p", prompt=body)], tok, parse_positions(f"k={n - 1}", exclude_last=2), chat=False)


def test_k_is_seeded_and_stable_per_prompt(tok):
    prompts = [chat_prompt(f"q{i}", user=f"what is the capital of {c} , said the {a} to the {b} ?",
                           system=SYSTEM if i % 2 else None)
               for i, (c, a, b) in enumerate(zip(["france", "spain", "peru", "chile", "japan", "kenya"],
                                                 ["cat", "dog", "fox", "wolf", "bird", "horse"],
                                                 ["hill", "road", "tree", "lake", "yard", "mat"], strict=True))]
    spec = parse_positions("k=3", seed=11)
    a = positions_of(prompts, tok, spec)
    assert a == positions_of(prompts, tok, spec)                      # deterministic
    assert {k: v[1] for k, v in positions_of(list(reversed(prompts)), tok, spec).items()} == \
        {k: v[1] for k, v in a.items()}                               # order-independent
    alone = positions_of([prompts[3]], tok, spec)["q3"]
    assert alone == a["q3"]                                           # a prompt's draw is its own
    b = positions_of(prompts, tok, parse_positions("k=3", seed=12))
    assert any(a[k][1] != b[k][1] for k in a)                         # another seed, another draw
    # the same id with the same usable tokens gets the same positions
    mask = np.zeros(30, dtype=bool)
    mask[5:20] = True
    ids = list(range(30))
    p1 = select_positions(PositionSpec("k", 4, 4, 7), "x", ids, mask, set())
    assert p1 == select_positions(PositionSpec("k", 4, 4, 7), "x", ids, mask, set())
    assert all(5 <= q < 20 for q in p1)


def test_k_larger_than_usable_names_the_prompt(tok):
    short = chat_prompt("tiny-1", user="what comes after monday ?", system=None)
    ids, _ = positions_of([short], tok, parse_positions("last"))["tiny-1"]
    m = parse_positions("k=1").exclude_last
    n_usable = len(structural_span(tok, ids, "<|user|>") - set(range(len(ids) - m, len(ids))))
    assert n_usable == len(tok(" what comes after monday ?", add_special_tokens=False)["input_ids"]) - max(0, m - 2)
    with pytest.raises(MdiffError) as ei:
        positions_of([chat_prompt("long-1"), short], tok, parse_positions(f"k={n_usable + 1}"))
    msg = str(ei.value)
    assert f"prompt 'tiny-1' has {n_usable} usable content positions, fewer than k={n_usable + 1}" in msg
    assert "\n" not in msg
    # exactly n_usable works
    _, pos = positions_of([short], tok, parse_positions(f"k={n_usable}"))["tiny-1"]
    assert len(pos) == n_usable


def test_content_mask_by_hand():
    text = "<s>SYS hello<e>USR big  cat<e>"
    content = "big  cat"
    a = text.index(content)
    assert a == 19
    toks = ["<s>", "SYS", " hello", "<e>", "USR", " ", "big", " ", " cat", "<e>"]
    ids = [0, 10, 11, 1, 12, 13, 14, 13, 15, 1]
    offs, at = [], 0
    for t in toks:
        offs.append((at, at + len(t)))
        at += len(t)
    assert "".join(toks) == text
    m = content_mask(text, ids, offs, special_ids={0, 1}, content_spans=[(a, a + len(content))])
    # the separator space before "big" is template; the space inside the content is content
    assert m.tolist() == [False, False, False, False, False, False, True, True, True, False]
    m_plain = content_mask(text, ids, offs, special_ids={0, 1}, content_spans=None)
    assert m_plain.tolist() == [False, True, True, False, True, True, True, True, True, False]
    # a token with a leading (template) space followed by content counts
    toks2 = ["<s>", "USR", " big", " ", " cat", "<e>"]
    text2 = "".join(toks2)
    offs2, at = [], 0
    for t in toks2:
        offs2.append((at, at + len(t)))
        at += len(t)
    a2 = text2.index(content)
    m2 = content_mask(text2, [0, 12, 14, 13, 15, 1], offs2, {0, 1}, [(a2, a2 + len(content))])
    assert m2.tolist() == [False, False, True, True, True, False]


def test_upto_takes_k_content_positions_plus_the_decision_position(tok):
    """``upto=K`` (the default fit rows of the transport maps): the k=K draw when a prompt has enough content
    tokens, all of them when it has fewer (never an error), and always the decision position."""
    assert parse_positions("upto=16").tag == "upto16" and parse_positions("UPTO = 3").kind == "upto"
    short = chat_prompt("tiny-1", user="what comes after monday ?", system=None)
    long = chat_prompt("long-1")
    ids_s, last_s = positions_of([short], tok, parse_positions("last"))["tiny-1"]
    ids_l, last_l = positions_of([long], tok, parse_positions("last"))["long-1"]
    content_s = sorted(structural_span(tok, ids_s, "<|user|>"))
    _, up = positions_of([short], tok, parse_positions("upto=100"))["tiny-1"]
    assert up == sorted({*content_s, *last_s}) and last_s[0] not in content_s  # every content token + decision
    _, k3 = positions_of([long], tok, parse_positions("k=3", seed=4))["long-1"]
    _, u3 = positions_of([long], tok, parse_positions("upto=3", seed=4))["long-1"]
    assert u3 == sorted({*k3, *last_l}) and len(u3) == 4  # the same draw as k=3, plus the decision position
    mask = np.zeros(10, dtype=bool)  # no content token at all: the decision position alone
    assert select_positions(PositionSpec("upto", 4, 1, 0), "x", list(range(10)), mask, set()) == [9]
