"""Prompt sets: reading JSONL (or a Hugging Face dataset), chat templating and batched tokenization.

A prompt set is JSONL, one object a line::

    {"id": "kk-001", "prompt": "Наурыз мейрамы ...", "category": "tradition", "split": "train"}
    {"id": "kk-002", "messages": [{"role": "user", "content": "..."}], "choices": ["A", "B"], "answer": "A"}

``id`` and one of ``prompt`` / ``messages`` are required; ``category``, ``split``, ``choices`` and
``answer`` are optional. Errors name the file and the line.

Chat templating is per pair: ``chat_template = false`` uses the text as it is (the tokenizer adds its
BOS); ``true`` applies the tokenizer's own template with the generation prompt; a string is used as the
template instead. A template already writes BOS, so its output is tokenized without special tokens:
never a double BOS.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

from mdiff.errors import MdiffError

_KEYS = {"id", "prompt", "messages", "category", "split", "choices", "answer"}


@dataclasses.dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str | None = None
    messages: tuple | None = None
    category: str | None = None
    split: str | None = None
    choices: tuple | None = None
    answer: Any = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if self.messages is not None:
            d["messages"] = [dict(m) for m in self.messages]
        if self.choices is not None:
            d["choices"] = list(self.choices)
        return d


def _row_to_prompt(obj: Any, where: str) -> Prompt:
    if not isinstance(obj, dict):
        raise MdiffError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise MdiffError(f"{where}: missing 'id'")
    pid = obj["id"]
    if isinstance(pid, bool) or not isinstance(pid, (str, int)) or str(pid) == "":
        raise MdiffError(f"{where}: 'id' must be a non-empty string or integer, got {pid!r}")
    has_p, has_m = obj.get("prompt") is not None, obj.get("messages") is not None
    if has_p == has_m:
        raise MdiffError(f"{where}: give exactly one of 'prompt' (a string) or 'messages' (a chat list)")
    prompt = messages = None
    if has_p:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise MdiffError(f"{where}: 'prompt' must be a non-empty string")
    else:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise MdiffError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise MdiffError(f"{where}: messages[{j}] must be an object with string 'role' and 'content'")
        messages = tuple(dict(role=m["role"], content=m["content"]) for m in msgs)
    choices = obj.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise MdiffError(f"{where}: 'choices' must be a list of strings")
        choices = tuple(choices)
    for key in ("category", "split"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise MdiffError(f"{where}: {key!r} must be a string")
    return Prompt(id=str(pid), prompt=prompt, messages=messages, category=obj.get("category"),
                  split=obj.get("split"), choices=choices, answer=obj.get("answer"))


def load_prompts(path: str | Path, category: str | list[str] | None = None) -> list[Prompt]:
    """Read a JSONL prompt set; ``category`` keeps only those categories. Errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise MdiffError(f"prompt file not found: {path}")
    rows: list[Prompt] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as f:  # bytes, so that a non-UTF-8 line is reported with its number
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a byte-order mark
            except UnicodeDecodeError as e:
                raise MdiffError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MdiffError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            p = _row_to_prompt(obj, where)
            if p.id in seen:
                raise MdiffError(f"{where}: duplicate id {p.id!r} (first on line {seen[p.id]})")
            seen[p.id] = lineno
            rows.append(p)
    if not rows:
        raise MdiffError(f"{path}: no prompts in the file")
    return filter_category(rows, category, str(path))


def filter_category(rows: list[Prompt], category: str | list[str] | None, where: str = "prompts") -> list[Prompt]:
    if category is None:
        return rows
    cats = {category} if isinstance(category, str) else set(category)
    kept = [r for r in rows if r.category in cats]
    if not kept:
        seen = sorted({str(r.category) for r in rows})
        raise MdiffError(f"{where}: no prompt has category {sorted(cats)} (categories present: {', '.join(seen)})")
    return kept


def load_hf_dataset(name: str, split: str = "test", category: str | list[str] | None = None,
                    prompt_field: str | None = None, id_field: str | None = None,
                    category_field: str = "category", choices_field: str | None = None,
                    answer_field: str | None = None, data_files: Any = None, limit: int | None = None) -> list[Prompt]:
    """A Hugging Face dataset (hub name, local folder, or a builder such as ``"json"`` with ``data_files``) as prompts.

    The seeds use ``kz-transformers/kk-socio-cultural-bench-mc`` and MATH-500
    (``HuggingFaceH4/MATH-500``, field ``problem``). Field names are guessed when not given.
    """
    try:
        import datasets
    except ImportError:  # pragma: no cover
        raise MdiffError("the 'datasets' package is needed to read Hugging Face datasets") from None
    try:  # library code stays quiet: no "Generating train split" progress bars
        datasets.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover
        pass
    try:
        ds = datasets.load_dataset(name, split=split, data_files=data_files)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot read it"
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise MdiffError(f"could not read dataset {name!r} (split {split!r}): {msg}") from None
    cols = set(ds.column_names)
    pf = prompt_field or next((c for c in ("prompt", "question", "problem", "text", "instruction") if c in cols), None)
    if pf is None or pf not in cols:
        raise MdiffError(f"dataset {name!r}: no prompt field (columns: {', '.join(sorted(cols))}); pass prompt_field=")
    for given, what in ((id_field, "id_field"), (choices_field, "choices_field"), (answer_field, "answer_field")):
        if given is not None and given not in cols:
            raise MdiffError(f"dataset {name!r}: no column {given!r} for {what} (columns: {', '.join(sorted(cols))})")
    cf = choices_field or next((c for c in ("choices", "options") if c in cols), None)
    af = answer_field or next((c for c in ("answer", "solution", "label") if c in cols), None)
    idf = id_field
    if idf is None:  # a stable id column keeps splits stable when the dataset grows; else the row index
        guess = next((c for c in ("id", "unique_id", "idx", "question_id") if c in cols), None)
        if guess is not None and len({str(v) for v in ds[guess]}) == len(ds):
            idf = guess
    elif len({str(v) for v in ds[idf]}) != len(ds):
        raise MdiffError(f"dataset {name!r}: column {idf!r} has duplicate values; it cannot serve as the prompt id")
    rows = []
    for i, ex in enumerate(ds):
        cat = ex.get(category_field) if category_field in cols else None
        choices = ex.get(cf) if cf else None
        rows.append(Prompt(
            id=str(ex[idf]) if idf else f"{name.rsplit('/', 1)[-1]}-{i:05d}",
            prompt=str(ex[pf]), category=None if cat is None else str(cat),
            choices=tuple(str(c) for c in choices) if isinstance(choices, list) else None,
            answer=ex.get(af) if af else None))
    rows = filter_category(rows, category, f"dataset {name}")
    return rows[:limit] if limit else rows


# --------------------------------------------------------------------------- templating / tokenization
def render(p: Prompt, tokenizer, chat_template: bool | str = False) -> tuple[str, bool]:
    """The text fed to the model, and whether the tokenizer should add its special tokens (BOS)."""
    if p.messages is not None or chat_template:
        msgs = [dict(m) for m in p.messages] if p.messages is not None else [{"role": "user", "content": p.prompt}]
        if chat_template is False:
            raise MdiffError(f"prompt {p.id!r} has 'messages' but the pair has chat_template = false; "
                             f"set chat_template = true (or a template string) in the pair file")
        template = chat_template if isinstance(chat_template, str) else None
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise MdiffError("the tokenizer has no chat template: give one as a string in the pair file "
                             "(chat_template = \"...\")")
        try:
            text = tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja2's TemplateError family (SecurityError, syntax, undefined)
            if not any(c.__module__.startswith("jinja2") for c in type(e).__mro__):
                raise
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise MdiffError(f"the chat template cannot render prompt {p.id!r} ({type(e).__name__}: {first}); "
                             f"fix chat_template in the pair file (templates run in a sandbox)") from None
        return text, False  # the template writes BOS itself
    return p.prompt, True


@dataclasses.dataclass
class Encoded:
    """A left-padded batch: ``input_ids``/``attention_mask`` ``[batch, pos]`` and each row's true length."""

    input_ids: Any
    attention_mask: Any
    lengths: list[int]
    texts: list[str]


def tokenize(prompts: list[Prompt], tokenizer, chat_template: bool | str = False) -> list[list[int]]:
    """Token ids of each prompt (exactly one BOS when the tokenizer has one)."""
    out = []
    bos = getattr(tokenizer, "bos_token_id", None)
    for p in prompts:
        text, special = render(p, tokenizer, chat_template)
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        while bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        if not ids:
            raise MdiffError(f"prompt {p.id!r} tokenizes to nothing")
        out.append(list(ids))
    return out


def pad_left(ids: list[list[int]], pad_id: int):
    """Left-pad token lists into ``(input_ids, attention_mask)`` tensors."""
    import torch

    width = max(len(x) for x in ids)
    inp = torch.full((len(ids), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x):] = 1
    return inp, mask


def pad_id_of(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


# --------------------------------------------------------------------------- splits
SPLITS = ("train", "select", "val")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)


def split_of(prompt_id: str, seed: int = 0, fractions: tuple[float, ...] = DEFAULT_FRACTIONS) -> str:
    """The split of one prompt id: a pure function of (seed, id), so adding prompts never moves old ones."""
    import hashlib

    u = int.from_bytes(hashlib.sha256(f"mdiff-split:{seed}:{prompt_id}".encode()).digest()[:8], "little") / 2**64
    a, b, _ = fractions
    return "train" if u < a else "select" if u < a + b else "val"


def assign_splits(prompts: list[Prompt], seed: int = 0,
                  fractions: tuple[float, ...] = DEFAULT_FRACTIONS) -> dict[str, str]:
    """``{prompt id: split}``, split **by prompt**: an explicit ``split`` field wins, else :func:`split_of`."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise MdiffError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    out = {}
    for p in prompts:
        if p.split is not None:
            if p.split not in SPLITS:
                raise MdiffError(f"prompt {p.id!r} has split {p.split!r}; use one of {', '.join(SPLITS)}")
            out[p.id] = p.split
        else:
            out[p.id] = split_of(p.id, seed, fractions)
    return out


def select_split(prompts: list[Prompt], split: str | None, seed: int = 0,
                 fractions: tuple[float, ...] = DEFAULT_FRACTIONS) -> list[Prompt]:
    """Prompts of one split (``None`` or ``"all"``: every prompt)."""
    if split in (None, "all"):
        return list(prompts)
    if split not in SPLITS:
        raise MdiffError(f"unknown split {split!r}: use {', '.join(SPLITS)} or all")
    splits = assign_splits(prompts, seed, fractions)
    kept = [p for p in prompts if splits[p.id] == split]
    if not kept:
        raise MdiffError(f"the {split!r} split is empty ({len(prompts)} prompts, seed {seed}): add prompts")
    return kept
