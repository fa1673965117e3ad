"""Prompt sets: JSONL loading and its errors, the Hugging Face loader, chat templating, splits."""

import json
from collections import Counter

import pytest

from mdiff import data, toy
from mdiff.data import Prompt
from mdiff.errors import MdiffError


# --------------------------------------------------------------------------- helpers
def write_jsonl(path, rows) -> str:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def toy_tok():
    """The toy pairs' base tokenizer, rebuilt from the toy recipe (no model, no cache needed)."""
    return toy.train_base_tokenizer()


# --------------------------------------------------------------------------- JSONL loading
def test_load_prompts_reads_every_field(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "kk-001", "prompt": "Наурыз мейрамы", "category": "tradition", "split": "train"},
        "",  # blank lines are skipped
        {"id": 7, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
         "choices": ["A", "B"], "answer": "A", "extra": "ignored"},
    ])
    rows = data.load_prompts(f)
    assert [r.id for r in rows] == ["kk-001", "7"]  # integer ids become strings
    a, b = rows
    assert (a.prompt, a.messages, a.category, a.split) == ("Наурыз мейрамы", None, "tradition", "train")
    assert a.choices is None and a.answer is None
    assert b.prompt is None
    assert b.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})
    assert (b.choices, b.answer, b.category, b.split) == (("A", "B"), "A", None, None)
    assert b.to_dict() == {"id": "7", "messages": [{"role": "system", "content": "be brief"},
                                                   {"role": "user", "content": "hi"}],
                           "choices": ["A", "B"], "answer": "A"}


def test_load_prompts_tolerates_a_byte_order_mark(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "a", "prompt": "x"}).encode() + b"\n")
    assert [r.id for r in data.load_prompts(p)] == ["a"]


@pytest.mark.parametrize("rows, line, needles", [
    ([{"id": "a", "prompt": "x"}, '{"id": "b", "prompt": "y"'], 2, ["malformed JSON"]),
    (['{"id": "a", prompt: "x"}'], 1, ["malformed JSON", "column"]),
    ([{"id": "a", "prompt": "x"}, {"prompt": "y"}], 2, ["missing 'id'"]),
    ([{"id": "", "prompt": "y"}], 1, ["'id' must be a non-empty string or integer"]),
    ([{"id": True, "prompt": "y"}], 1, ["'id' must be"]),
    ([{"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}], 1, ["exactly one of"]),
    ([{"id": "a", "category": "c"}], 1, ["exactly one of"]),
    ([{"id": "a", "prompt": "   "}], 1, ["'prompt' must be a non-empty string"]),
    ([{"id": "a", "prompt": 3}], 1, ["'prompt' must be a non-empty string"]),
    ([{"id": "a", "messages": []}], 1, ["'messages' must be a non-empty list"]),
    ([{"id": "a", "messages": "hi"}], 1, ["'messages' must be a non-empty list"]),
    ([{"id": "a", "messages": [{"role": "user"}]}], 1, ["messages[0] must be an object with string 'role'"]),
    ([{"id": "a", "messages": [{"role": "user", "content": "x"}, ["user", "y"]]}], 1, ["messages[1]"]),
    ([{"id": "a", "prompt": "x", "choices": "AB"}], 1, ["'choices' must be a list of strings"]),
    ([{"id": "a", "prompt": "x", "category": 3}], 1, ["'category' must be a string"]),
    ([["id", "a"]], 1, ["expected a JSON object, got list"]),
])
def test_load_prompts_errors_name_file_and_line(tmp_path, rows, line, needles):
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(MdiffError) as ei:
        data.load_prompts(f)
    msg = str(ei.value)
    assert msg.startswith(f"{f}:{line}: "), msg
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_load_prompts_duplicate_id_reports_both_lines(tmp_path):
    f = write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"},
                                             {"id": "c", "prompt": "z"}, {"id": "b", "prompt": "w"}])
    with pytest.raises(MdiffError) as ei:
        data.load_prompts(f)
    assert str(ei.value) == f"{f}:4: duplicate id 'b' (first on line 2)"


def test_load_prompts_duplicate_id_across_int_and_string(tmp_path):
    f = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "prompt": "x"}, {"id": "1", "prompt": "y"}])
    with pytest.raises(MdiffError, match=r":2: duplicate id '1' \(first on line 1\)"):
        data.load_prompts(f)


def test_load_prompts_not_utf8_names_the_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(json.dumps({"id": "a", "prompt": "x"}).encode() + b"\n"
                  + '{"id": "b", "prompt": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(MdiffError, match=rf"^{p}:2: not UTF-8 text"):
        data.load_prompts(p)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_load_prompts_empty_file(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    with pytest.raises(MdiffError, match=rf"^{p}: no prompts in the file$"):
        data.load_prompts(p)


def test_load_prompts_missing_file(tmp_path):
    with pytest.raises(MdiffError, match="prompt file not found"):
        data.load_prompts(tmp_path / "nope.jsonl")


def test_category_filter(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [
        {"id": "1", "prompt": "a", "category": "x"}, {"id": "2", "prompt": "b", "category": "y"},
        {"id": "3", "prompt": "c", "category": "x"}, {"id": "4", "prompt": "d"}])
    assert [r.id for r in data.load_prompts(f, category="x")] == ["1", "3"]
    assert [r.id for r in data.load_prompts(f, category=["y", "x"])] == ["1", "2", "3"]
    with pytest.raises(MdiffError) as ei:
        data.load_prompts(f, category="z")
    msg = str(ei.value)
    assert msg.startswith(f"{f}: no prompt has category ['z']")
    assert "categories present: None, x, y" in msg


# --------------------------------------------------------------------------- Hugging Face loader (local file)
@pytest.fixture
def hf_offline_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path


def test_load_hf_dataset_local_json_guesses_fields(hf_offline_cache):
    f = write_jsonl(hf_offline_cache / "mc.jsonl", [
        {"question": "Which city is the capital?", "choices": ["Astana", "Almaty"], "answer": "Astana",
         "category": "geo"},
        {"question": "Which instrument has two strings?", "choices": ["dombyra", "kobyz"], "answer": 0,
         "category": "music"},
        {"question": "Where is the steppe?", "choices": ["here", "there"], "answer": "here", "category": "geo"},
    ])
    rows = data.load_hf_dataset("json", split="train", data_files=f)
    assert [r.prompt for r in rows] == ["Which city is the capital?", "Which instrument has two strings?",
                                        "Where is the steppe?"]
    assert [r.id for r in rows] == ["json-00000", "json-00001", "json-00002"]  # row index: stable under filters
    assert rows[0].choices == ("Astana", "Almaty") and rows[0].answer == "Astana"
    assert rows[1].answer == 0 and rows[1].category == "music"
    geo = data.load_hf_dataset("json", split="train", data_files=f, category="geo")
    assert [(r.id, r.prompt) for r in geo] == [("json-00000", rows[0].prompt), ("json-00002", rows[2].prompt)]
    assert [r.id for r in data.load_hf_dataset("json", split="train", data_files=f, limit=2)] == \
        ["json-00000", "json-00001"]
    with pytest.raises(MdiffError, match=r"dataset json: no prompt has category \['art'\] "
                                         r"\(categories present: geo, music\)"):
        data.load_hf_dataset("json", split="train", data_files=f, category="art")


def test_load_hf_dataset_problem_field_and_id_column(hf_offline_cache):
    f = write_jsonl(hf_offline_cache / "math.jsonl", [
        {"problem": "1 + 1 = ?", "solution": "It is 2.", "answer": "2", "unique_id": "test/a/1.json"},
        {"problem": "2 + 3 = ?", "solution": "It is 5.", "answer": "5", "unique_id": "test/a/2.json"},
    ])
    rows = data.load_hf_dataset("json", split="train", data_files=f)
    assert [(r.id, r.prompt, r.answer, r.choices, r.category) for r in rows] == [
        ("test/a/1.json", "1 + 1 = ?", "2", None, None), ("test/a/2.json", "2 + 3 = ?", "5", None, None)]
    named = data.load_hf_dataset("json", split="train", data_files=f, prompt_field="solution",
                                 answer_field="solution")
    assert [(r.prompt, r.answer) for r in named] == [("It is 2.", "It is 2."), ("It is 5.", "It is 5.")]


def test_load_hf_dataset_errors(hf_offline_cache):
    f = write_jsonl(hf_offline_cache / "odd.jsonl", [{"body": "x", "n": 1}, {"body": "y", "n": 1}])
    with pytest.raises(MdiffError, match=r"no prompt field \(columns: body, n\); pass prompt_field="):
        data.load_hf_dataset("json", split="train", data_files=f)
    with pytest.raises(MdiffError, match=r"no column 'answer' for answer_field"):
        data.load_hf_dataset("json", split="train", data_files=f, prompt_field="body", answer_field="answer")
    with pytest.raises(MdiffError, match=r"column 'n' has duplicate values"):
        data.load_hf_dataset("json", split="train", data_files=f, prompt_field="body", id_field="n")
    with pytest.raises(MdiffError, match=r"^could not read dataset 'json'"):
        data.load_hf_dataset("json", split="train", data_files=str(hf_offline_cache / "missing.jsonl"))


# --------------------------------------------------------------------------- templating / tokenization
def test_plain_prompt_has_one_bos(toy_tok):
    p = Prompt(id="a", prompt="the capital of france is")
    text, special = data.render(p, toy_tok, False)
    assert (text, special) == ("the capital of france is", True)
    (ids,) = data.tokenize([p], toy_tok, False)
    bos = toy_tok.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids[1:] == toy_tok("the capital of france is", add_special_tokens=False)["input_ids"]
    # a text that already starts with the BOS string still gets exactly one BOS
    (ids2,) = data.tokenize([Prompt(id="b", prompt="<s>the capital of france is")], toy_tok, False)
    assert ids2 == ids


def test_chat_prompt_has_exactly_one_bos_at_position_0(toy_tok):
    msgs = ({"role": "system", "content": "you are a helpful assistant ."},
            {"role": "user", "content": "what is the capital of france ?"})
    p = Prompt(id="c", messages=msgs)
    text, special = data.render(p, toy_tok, True)
    assert special is False
    assert text == ("<s><|system|> you are a helpful assistant .<|end|>"
                    "<|user|> what is the capital of france ?<|end|><|assistant|>")
    (ids,) = data.tokenize([p], toy_tok, True)
    bos = toy_tok.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1
    assert toy_tok.convert_ids_to_tokens(ids[-1]) == "<|assistant|>"
    # same ids as the tokenizer's own chat tokenization
    ref = toy_tok.apply_chat_template([dict(m) for m in msgs], add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
    assert ids == list(ref)


def test_plain_prompt_with_chat_template_true_becomes_a_user_turn(toy_tok):
    (ids,) = data.tokenize([Prompt(id="d", prompt="hello there")], toy_tok, True)
    assert toy_tok.decode(ids) == "<s><|user|> hello there<|end|><|assistant|>"
    assert ids.count(toy_tok.bos_token_id) == 1 and ids[0] == toy_tok.bos_token_id


def test_chat_template_string_overrides_the_tokenizers(toy_tok):
    tpl = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
           "{% if add_generation_prompt %}[A]{% endif %}")
    p = Prompt(id="e", messages=({"role": "user", "content": "hi"},))
    text, special = data.render(p, toy_tok, tpl)
    assert (text, special) == ("<s>[user]hi[A]", False)
    (ids,) = data.tokenize([p], toy_tok, tpl)
    assert ids == toy_tok("<s>[user]hi[A]", add_special_tokens=False)["input_ids"]
    assert ids[0] == toy_tok.bos_token_id and ids.count(toy_tok.bos_token_id) == 1
    assert toy_tok.chat_template == toy.CHAT_TEMPLATE  # the override does not touch the tokenizer


def test_render_errors(toy_tok):
    p = Prompt(id="m1", messages=({"role": "user", "content": "hi"},))
    with pytest.raises(MdiffError, match="prompt 'm1' has 'messages' but the pair has chat_template = false"):
        data.render(p, toy_tok, False)
    import copy

    bare = copy.deepcopy(toy_tok)
    bare.chat_template = None
    with pytest.raises(MdiffError, match="the tokenizer has no chat template"):
        data.render(p, bare, True)


def test_pad_left():
    inp, mask = data.pad_left([[5, 6, 7], [8]], pad_id=2)
    assert inp.tolist() == [[5, 6, 7], [2, 2, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pad_id_of(toy_tok):
    assert data.pad_id_of(toy_tok) == toy_tok.pad_token_id == 2

    class NoPad:
        pad_token_id = None
        eos_token_id = 9

    assert data.pad_id_of(NoPad()) == 9


# --------------------------------------------------------------------------- splits
def _prompts(ids):
    return [Prompt(id=str(i), prompt="x") for i in ids]


def test_splits_deterministic_by_seed_and_by_prompt_id():
    ps = _prompts(range(200))
    a = data.assign_splits(ps, seed=0)
    assert a == data.assign_splits(list(reversed(ps)), seed=0)  # order does not matter
    assert a == data.assign_splits(_prompts(range(200)), seed=0)  # a fresh call: same answer
    b = data.assign_splits(ps, seed=1)
    moved = sum(a[k] != b[k] for k in a)
    assert moved > 50  # another seed is another split (about 56 % of ids change split)
    # adding prompts never moves existing ones
    bigger = data.assign_splits(_prompts(range(1000)), seed=0)
    assert all(bigger[k] == v for k, v in a.items())
    # split by prompt: a prompt's split depends on its id only
    assert data.assign_splits(_prompts([17]), seed=0) == {"17": a["17"]}


def test_explicit_split_field_wins():
    ps = _prompts(range(100))
    auto = data.assign_splits(ps, seed=0)
    pid = next(k for k, v in auto.items() if v == "train")
    ps = [Prompt(id=p.id, prompt="x", split="val") if p.id == pid else p for p in ps]
    out = data.assign_splits(ps, seed=0)
    assert out[pid] == "val"
    assert {k: v for k, v in out.items() if k != pid} == {k: v for k, v in auto.items() if k != pid}
    assert [p.id for p in data.select_split(ps, "val", seed=0)].count(pid) == 1


@pytest.mark.parametrize("fractions", [(0.6, 0.2, 0.2), (0.8, 0.0, 0.2), (0.34, 0.33, 0.33)])
def test_split_fractions_roughly_respected(fractions):
    ps = _prompts(range(3000))
    counts = Counter(data.assign_splits(ps, seed=3, fractions=fractions).values())
    for name, frac in zip(data.SPLITS, fractions, strict=True):
        assert abs(counts[name] / 3000 - frac) < 0.04, (name, counts)
    assert sum(counts.values()) == 3000


def test_select_split_partitions_the_prompts():
    ps = _prompts(range(300))
    parts = {s: [p.id for p in data.select_split(ps, s, seed=0)] for s in data.SPLITS}
    assert sorted(sum(parts.values(), []), key=int) == [p.id for p in ps]
    assert not set(parts["train"]) & set(parts["val"])
    assert data.select_split(ps, None) == ps and data.select_split(ps, "all") == ps


def test_split_errors():
    ps = _prompts(range(10))
    for bad in [(0.5, 0.5), (0.7, 0.2, 0.2), (1.2, -0.1, -0.1)]:
        with pytest.raises(MdiffError, match="split fractions must be three non-negative numbers summing to 1"):
            data.assign_splits(ps, fractions=bad)
    with pytest.raises(MdiffError, match="unknown split 'test': use train, select, val or all"):
        data.select_split(ps, "test")
    with pytest.raises(MdiffError, match="prompt '3' has split 'dev'; use one of train, select, val"):
        data.assign_splits([Prompt(id="3", prompt="x", split="dev")])
    with pytest.raises(MdiffError, match=r"the 'select' split is empty \(10 prompts, seed 0\)"):
        data.select_split(ps, "select", seed=0, fractions=(0.5, 0.0, 0.5))
