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


# --------------------------------------------------------------------------- dataset sources
# A pair may name its prompt set as a dataset (``[prompts]`` table in a pair file, or a built-in pair's
# ``prompt_source``) instead of a JSONL file. ``materialise_source`` reads it once (from the hub, or from a
# local copy in the same schema), applies the category filter, and writes a cached JSONL plus a provenance
# record (dataset, revision or fingerprint, filters, counts kept/dropped and why); every run reads that file.
SOURCE_KEYS = {"dataset", "split", "revision", "fields", "categories", "exclude_categories", "id_prefix"}
FIELD_KEYS = {"prompt", "id", "category", "choices", "answer"}


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """Where a prompt set comes from when it is a dataset, and how its rows become prompts."""

    dataset: str
    """Hub id (``org/name``); a local copy in the same schema is given as ``dataset_dir``."""
    split: str = "train"
    revision: str | None = None
    prompt_field: str = "prompt"
    id_field: str | None = None
    """Column of a stable row id; ``None``: ``<id_prefix>-<row index>``."""
    category_field: str | None = None
    choices_fields: tuple[str, ...] | None = None
    """One list-valued column, or several columns each holding one choice (e.g. ``A``, ``B``, ``C``, ``D``)."""
    answer_field: str | None = None
    """When its value names one of ``choices_fields`` (a letter), the answer becomes that choice's text."""
    categories: tuple[str, ...] | None = None
    """Keep only these categories (case-insensitive); ``None`` keeps all."""
    exclude_categories: tuple[str, ...] = ()
    id_prefix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": self.split, "revision": self.revision,
                "fields": {"prompt": self.prompt_field, "id": self.id_field, "category": self.category_field,
                           "choices": list(self.choices_fields) if self.choices_fields else None,
                           "answer": self.answer_field},
                "categories": list(self.categories) if self.categories else None,
                "exclude_categories": list(self.exclude_categories), "id_prefix": self.id_prefix}

    def key(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def source_from_dict(d: dict[str, Any], where: str = "prompts") -> DatasetSource:
    """A :class:`DatasetSource` from a pair file's ``[prompts]`` table; errors name the key at fault."""
    if not isinstance(d, dict):
        raise MdiffError(f"{where}: must be a JSONL path or a table with dataset = \"org/name\"")
    unknown = sorted(set(d) - SOURCE_KEYS)
    if unknown:
        raise MdiffError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(SOURCE_KEYS))})")
    name = d.get("dataset")
    if not isinstance(name, str) or not name.strip():
        raise MdiffError(f"{where}: key 'dataset' (a hub id such as \"org/name\") is required")
    for k in ("split", "revision", "id_prefix"):
        if d.get(k) is not None and (not isinstance(d[k], str) or not d[k].strip()):
            raise MdiffError(f"{where}: key {k!r} must be a non-empty string")
    fields = d.get("fields", {})
    if not isinstance(fields, dict):
        raise MdiffError(f"{where}: key 'fields' must be a table such as {{prompt = \"question\"}}")
    bad = sorted(set(fields) - FIELD_KEYS)
    if bad:
        raise MdiffError(f"{where}: fields has unknown entry {bad[0]!r} (allowed: {', '.join(sorted(FIELD_KEYS))})")
    for k, v in fields.items():
        ok = isinstance(v, str) and v.strip() or (k == "choices" and isinstance(v, list) and v
                                                   and all(isinstance(x, str) and x for x in v))
        if not ok:
            raise MdiffError(f"{where}: fields.{k} must be a column name" + (" or a list of columns" if k == "choices"
                                                                            else ""))
    cats = {}
    for k in ("categories", "exclude_categories"):
        v = d.get(k)
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) and x for x in v)):
            raise MdiffError(f"{where}: key {k!r} must be a list of category names")
        cats[k] = tuple(v) if v else None
    ch = fields.get("choices")
    return DatasetSource(
        dataset=name.strip(), split=d.get("split", "train"), revision=d.get("revision"),
        prompt_field=fields.get("prompt", "prompt"), id_field=fields.get("id"),
        category_field=fields.get("category"),
        choices_fields=(ch,) if isinstance(ch, str) else tuple(ch) if ch else None,
        answer_field=fields.get("answer"), categories=cats["categories"],
        exclude_categories=cats["exclude_categories"] or (), id_prefix=d.get("id_prefix"))


def _offline_hint(src: DatasetSource, err: str) -> MdiffError:
    return MdiffError(
        f"could not read dataset {src.dataset!r} (split {src.split!r}): {err[:160]}; without the hub, download a "
        f"copy elsewhere (huggingface_hub.snapshot_download({src.dataset!r}, repo_type='dataset', local_dir=DIR)) "
        "and give that folder DIR as {option}", option="dataset_dir")


def _files_fingerprint(folder: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts
                    and not p.name.startswith(".")):
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_source(src: DatasetSource, dataset_dir: str | Path | None = None) -> tuple[list[Prompt], dict[str, Any]]:
    """Read a dataset source as prompts and a provenance record (category filter applied, reasons counted)."""
    from collections import Counter

    try:
        import datasets
    except ImportError:  # pragma: no cover
        raise MdiffError("the 'datasets' package is needed to read a dataset prompt source") from None
    try:
        datasets.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover
        pass
    where = src.dataset
    if dataset_dir is not None:
        folder = Path(dataset_dir).expanduser()
        if not folder.is_dir():
            raise MdiffError(f"{{option}} {folder} is not a folder (give a local copy of {src.dataset})",
                             option="dataset_dir")
        try:
            ds = datasets.load_dataset(str(folder), split=src.split)
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot read it"
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise MdiffError(f"could not read the local copy of {src.dataset!r} at {folder} (split {src.split!r}): "
                             f"{msg}") from None
        origin = {"local_dir": str(folder.resolve()), "fingerprint": "sha256:" + _files_fingerprint(folder)}
    else:
        try:
            ds = datasets.load_dataset(src.dataset, split=src.split, revision=src.revision)
        except Exception as e:  # noqa: BLE001
            raise _offline_hint(src, (str(e).strip().splitlines() or [type(e).__name__])[0]) from None
        origin = {"hub": src.dataset, "revision": src.revision,
                  "fingerprint": getattr(ds, "_fingerprint", None)}
    cols = set(ds.column_names)
    needed = [("prompt", src.prompt_field), ("id", src.id_field), ("category", src.category_field),
              ("answer", src.answer_field)] + [("choices", c) for c in (src.choices_fields or ())]
    for what, col in needed:
        if col is not None and col not in cols:
            raise MdiffError(f"dataset {where}: no column {col!r} for fields.{what} (columns: {', '.join(sorted(cols))})")
    if src.id_field is not None and len({str(v) for v in ds[src.id_field]}) != len(ds):
        raise MdiffError(f"dataset {where}: column {src.id_field!r} has duplicate values; it cannot be the prompt id")
    keep = {c.casefold() for c in src.categories} if src.categories else None
    drop = {c.casefold() for c in src.exclude_categories}
    prefix = src.id_prefix or src.dataset.rsplit("/", 1)[-1]
    dropped: Counter = Counter()
    seen_cats: Counter = Counter()
    seen_text: set[str] = set()
    rows: list[Prompt] = []
    for i, ex in enumerate(ds):
        cat = None if src.category_field is None or ex.get(src.category_field) is None else str(ex[src.category_field])
        seen_cats[str(cat)] += 1
        if cat is not None and cat.casefold() in drop:
            dropped[f"category {cat} excluded"] += 1
            continue
        if keep is not None and (cat is None or cat.casefold() not in keep):
            dropped["category not selected"] += 1
            continue
        text = ex.get(src.prompt_field)
        if not isinstance(text, str) or not text.strip():
            dropped["empty prompt"] += 1
            continue
        if text.strip() in seen_text:
            dropped["duplicate prompt text"] += 1
            continue
        seen_text.add(text.strip())
        choices = answer = None
        if src.choices_fields:
            if len(src.choices_fields) == 1:
                v = ex.get(src.choices_fields[0])
                choices = tuple(str(c) for c in v) if isinstance(v, list) else None
            else:
                choices = tuple(str(ex.get(c)) for c in src.choices_fields)
        if src.answer_field is not None:
            answer = ex.get(src.answer_field)
            if choices and len(src.choices_fields) > 1 and str(answer) in src.choices_fields:
                answer = choices[src.choices_fields.index(str(answer))]  # a letter names a choice column
        rows.append(Prompt(id=str(ex[src.id_field]) if src.id_field else f"{prefix}-{i:05d}",
                           prompt=text.strip(), category=cat, choices=choices,
                           answer=answer if isinstance(answer, (str, int, float)) or answer is None else str(answer)))
    if not rows:
        raise MdiffError(f"dataset {where}: no row is kept ({dict(dropped)}); categories present: "
                         f"{', '.join(sorted(seen_cats))}")
    prov = {"source": src.to_dict(), "origin": origin, "rows_read": len(ds), "kept": len(rows),
            "dropped": dict(sorted(dropped.items())), "categories_present": dict(sorted(seen_cats.items())),
            "categories_kept": dict(sorted(Counter(str(r.category) for r in rows).items()))}
    return rows, prov


def prompts_cache_path(pair_name: str, src: DatasetSource) -> Path:
    """Where a pair's dataset prompt set is materialised (under the mdiff cache dir)."""
    from mdiff.toy import cache_root

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in pair_name)
    return cache_root() / "prompts" / f"{safe}-{src.key()}.jsonl"


def materialise_source(pair_name: str, src: DatasetSource, dataset_dir: str | Path | None = None,
                       out: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Write a dataset source once as JSONL (+ ``<file>.provenance.json``); reuse it when it is there.

    An existing file made from other data (another fingerprint) is never overwritten: that is an error.
    """
    path = Path(out) if out is not None else prompts_cache_path(pair_name, src)
    pfile = path.with_name(path.name + ".provenance.json")
    if path.is_file() and pfile.is_file() and dataset_dir is None:
        return path, json.loads(pfile.read_text(encoding="utf-8"))
    rows, prov = read_source(src, dataset_dir)
    prov = {"pair": pair_name, "file": str(path), **prov}
    if path.is_file() and pfile.is_file():
        old = json.loads(pfile.read_text(encoding="utf-8"))
        if old.get("origin", {}).get("fingerprint") == prov["origin"]["fingerprint"]:
            return path, old
        raise MdiffError(f"{path} was materialised from other data (fingerprint {old.get('origin', {}).get('fingerprint')}"
                         "); remove it, or give another output file ({option})", option="out")
    path.parent.mkdir(parents=True, exist_ok=True)
    import os

    from mdiff.tmpfiles import tmp_path

    text = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rows)
    for target, body in ((path, text), (pfile, json.dumps(prov, indent=2, ensure_ascii=False))):
        tmp = tmp_path(target)
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, target)
    return path, prov


def pair_prompts(spec) -> list[Prompt]:
    """The prompt set of a pair: its JSONL file, else its dataset source (materialised once, then cached)."""
    if spec.prompts is not None:
        return load_prompts(spec.prompts)
    src = getattr(spec, "prompt_source", None)
    if src is None:
        raise MdiffError(f"pair {spec.name!r} has no prompt set: add prompts = \"file.jsonl\" to the pair file "
                         "or give a JSONL prompt set ({option} FILE)", option="prompts_file")
    path, _ = materialise_source(spec.name, source_from_dict(src, f"pair {spec.name} prompts"))
    return load_prompts(path)
