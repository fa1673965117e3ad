"""Naming a (base, tuned) pair: the built-in registry and TOML pair files.

A pair is given by name (a built-in, see :func:`list_pairs`) or as the path of a TOML pair file::

    # pair.toml
    name = "my-pair"                 # optional, defaults to the file name
    base = "meta-llama/Llama-3.1-8B-Instruct"     # hub id or local directory
    tuned = "../models/my-finetune"              # relative paths are relative to this file
    revision = "main"                # optional: one string for both, or {base = "...", tuned = "..."}
    dtype = "bfloat16"               # optional: float32 (default), bfloat16, float16
    prompts = "prompts.jsonl"        # optional JSONL prompt set, or a dataset source (a table):
    # [prompts]
    # dataset = "kz-transformers/kk-socio-cultural-bench-mc"   # hub id; a local copy: dataset_dir of `mdiff prompts`
    # split = "train"
    # revision = "..."               # optional: pin the dataset version
    # fields = {prompt = "question", category = "category", choices = ["A", "B", "C", "D"], answer = "answer"}
    # categories = ["culture", "tradition"]   # optional: keep only these (exclude_categories drops some)
    chat_template = true             # optional: true/false, or a Jinja template string
    max_tokens = 2048                # optional: longest prompt in tokens (the models' context always applies)
    too_long = "error"               # optional: a longer prompt is an error (default) or "drop"ped, counted

Toy pairs (``toy-lowrank``, ``toy-distributed``) are built offline on first use (see :mod:`mdiff.toy`);
their spec carries ``truth``, what was planted.
"""

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from mdiff.errors import MdiffError
from mdiff.spec import RESERVED_NAMES, PairSpec, check_pair_name  # noqa: F401 - re-exported: mdiff.pairs.PairSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DTYPES = ("float32", "bfloat16", "float16")
_TOML_KEYS = {"name", "base", "tuned", "revision", "dtype", "prompts", "chat_template", "description",
              "min_shared_ratio", "behaviour", "max_tokens", "too_long"}
TOO_LONG = ("error", "drop")

# Sherkala's chat template is published in its model card (not in its tokenizer files); reproduced as given
# there, including the stray space it emits before the BOS of the first message.
SHERKALA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role']+'<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %} {% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# The prompt sets of the study (seeds 001, 003): the Kazakh socio-cultural MC bench's questions in the
# culture / tradition / etiquette / community categories (religion excluded), used free-form with the
# chat template and the fairness filter at 0.65; the MATH-500 problems for the maths pair.
CULTURAL_SOURCE = {
    "dataset": "kz-transformers/kk-socio-cultural-bench-mc", "split": "train",
    "fields": {"prompt": "question", "category": "category", "choices": ["A", "B", "C", "D"], "answer": "answer"},
    "categories": ["culture", "tradition", "etiquette", "community"], "exclude_categories": ["religion"],
    "id_prefix": "kk-socio",
}
COGNITIVE_SOURCE = {
    "dataset": "HuggingFaceH4/MATH-500", "split": "test",
    "fields": {"prompt": "problem", "id": "unique_id", "category": "subject", "answer": "answer"},
}

BUILTIN: dict[str, PairSpec] = {
    "cultural": PairSpec(
        name="cultural",
        base="meta-llama/Llama-3.1-8B-Instruct",
        tuned="inceptionai/Llama-3.1-Sherkala-8B-Chat",
        dtype="bfloat16",
        chat_template=SHERKALA_CHAT_TEMPLATE,
        min_shared_ratio=0.65,
        prompt_source=CULTURAL_SOURCE,
        description="Kazakh cultural fine-tune; the tuned tokenizer extends Llama-3.1's vocabulary (128,256 -> 159,766).",
    ),
    "cognitive": PairSpec(
        name="cognitive",
        base="meta-llama/Llama-3.1-8B",
        tuned="nvidia/OpenMath2-Llama3.1-8B",
        dtype="bfloat16",
        chat_template=True,
        prompt_source=COGNITIVE_SOURCE,
        description="Maths fine-tune (OpenMathInstruct-2) of Llama-3.1-8B, Llama-3.1 chat format.",
    ),
}

TOY_NAMES = ("toy-lowrank", "toy-distributed")
DEFAULT_PAIR = "toy-lowrank"


def pair_names() -> list[str]:
    return [*BUILTIN, *TOY_NAMES]


def resolve_pair(pair: str, build: bool = True, progress: bool = False) -> PairSpec:
    """Turn a pair name (a built-in name or a TOML path) into a :class:`PairSpec`.

    Toy pairs are built (offline, deterministically, cached) when ``build`` is true.
    """
    if pair in BUILTIN:
        return BUILTIN[pair]
    if pair in TOY_NAMES:
        from mdiff import toy

        return toy.toy_pair(pair, build=build, progress=progress)
    from mdiff.fixtures import FIXTURE_NAMES

    if pair in FIXTURE_NAMES:  # Llama-3.1-shaped random pairs with the real tokenizer (needs llama-models)
        from mdiff import fixtures

        return fixtures.fixture_pair(pair, build=build, progress=progress)
    path = Path(pair).expanduser()
    if path.suffix == ".toml" or path.exists():
        return load_pair_file(path)
    raise MdiffError(
        f"unknown pair {pair!r}: use one of {', '.join(pair_names())} or the path of a pair .toml file"
    )


def _check_str(key: str, value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MdiffError(f"{where}: key {key!r} must be a non-empty string, got {value!r}")
    return value


def _model_ref(value: str, base_dir: Path) -> str:
    """Resolve a relative local path against the pair file's folder; leave hub ids alone."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = base_dir / p
    if candidate.exists() or value.startswith((".", "~")) or value.count("/") != 1:
        return str(candidate.resolve())
    return value  # looks like a hub id "org/name"


def load_pair_file(path: str | Path) -> PairSpec:
    """Read a pair TOML file, checking every key; errors name the file and the key at fault."""
    path = Path(path)
    if not path.is_file():
        raise MdiffError(f"pair file not found: {path} (give a built-in name: {', '.join(pair_names())})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise MdiffError(f"{path}: malformed TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise MdiffError(f"{path}: not UTF-8 text ({e.reason})") from None
    where = str(path)
    unknown = sorted(set(data) - _TOML_KEYS)
    if unknown:
        raise MdiffError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_TOML_KEYS))})")
    for key in ("base", "tuned"):
        if key not in data:
            raise MdiffError(f"{where}: missing required key {key!r} (a hub id or a local model directory)")
    base_dir = path.parent.resolve()
    base = _model_ref(_check_str("base", data["base"], where), base_dir)
    tuned = _model_ref(_check_str("tuned", data["tuned"], where), base_dir)

    rev = data.get("revision")
    if rev is None:
        base_rev = tuned_rev = None
    elif isinstance(rev, str):
        base_rev = tuned_rev = rev
    elif isinstance(rev, dict):
        extra = set(rev) - {"base", "tuned"}
        if extra:
            raise MdiffError(f"{where}: key 'revision' has unknown entry {sorted(extra)[0]!r} (use base, tuned)")
        base_rev = rev.get("base")
        tuned_rev = rev.get("tuned")
        for k, v in (("revision.base", base_rev), ("revision.tuned", tuned_rev)):
            if v is not None:
                _check_str(k, v, where)
    else:
        raise MdiffError(f"{where}: key 'revision' must be a string or a table {{base=..., tuned=...}}")

    dtype = data.get("dtype", "float32")
    if dtype not in DTYPES:
        raise MdiffError(f"{where}: key 'dtype' must be one of {', '.join(DTYPES)}, got {dtype!r}")

    prompts = data.get("prompts")
    prompt_source = None
    if isinstance(prompts, dict):
        from mdiff.data import source_from_dict

        prompt_source = source_from_dict(prompts, f"{where}: key 'prompts'").to_dict()
        prompt_source["fields"] = {k: v for k, v in prompt_source["fields"].items() if v is not None}
        prompts = None
    elif prompts is not None:
        prompts = str((base_dir / Path(_check_str("prompts", prompts, where)).expanduser()).resolve())

    chat = data.get("chat_template", False)
    if not isinstance(chat, (bool, str)):
        raise MdiffError(f"{where}: key 'chat_template' must be true, false or a template string, got {chat!r}")

    ratio = data.get("min_shared_ratio", 0.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise MdiffError(f"{where}: key 'min_shared_ratio' must be a number in [0, 1], got {ratio!r}")
    behaviour = data.get("behaviour")
    if behaviour is not None and not isinstance(behaviour, dict):
        raise MdiffError(f"{where}: key 'behaviour' must be a table")
    name = data.get("name", path.stem)
    _check_str("name", name, where)
    check_pair_name(name, f"{where}: key 'name'" if "name" in data else f"{where}: the file name (no 'name' key)")
    max_tokens = data.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise MdiffError(f"{where}: key 'max_tokens' must be a whole number ≥ 1, got {max_tokens!r}")
    too_long = data.get("too_long", "error")
    if too_long not in TOO_LONG:
        raise MdiffError(f"{where}: key 'too_long' must be one of {', '.join(TOO_LONG)}, got {too_long!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise MdiffError(f"{where}: key 'description' must be a string")
    return PairSpec(
        name=name, base=base, tuned=tuned, base_revision=base_rev, tuned_revision=tuned_rev, dtype=dtype,
        prompts=prompts, chat_template=chat, description=description, source=str(path.resolve()),
        min_shared_ratio=float(ratio), behaviour=behaviour, max_tokens=max_tokens, too_long=too_long,
        prompt_source=prompt_source,
    )


def with_prompts(spec: PairSpec, path: str | Path | None) -> PairSpec:
    """``spec`` with its prompt set replaced by the JSONL file ``path`` (``prompts_file``); ``None``: unchanged."""
    if path is None:
        return spec
    p = Path(path).expanduser()
    if not p.is_file():
        raise MdiffError(f"{{option}} {path}: no such file (give a JSONL prompt set, e.g. from `mdiff prompts`)",
                         option="prompts_file")
    return dataclasses.replace(spec, prompts=str(p.resolve()), prompt_source=None)


def list_pairs(build_toys: bool = False) -> list[dict[str, Any]]:
    """The built-in pairs as JSON-ready dicts (``name``, ``base``, ``tuned``, ``truth`` for toys...)."""
    from mdiff import toy

    rows = []
    for spec in BUILTIN.values():
        rows.append({"name": spec.name, "base": spec.base, "tuned": spec.tuned, "dtype": spec.dtype,
                     "kind": "hub", "description": spec.description})
    for name in TOY_NAMES:
        spec = toy.toy_pair(name, build=build_toys)
        rows.append({"name": name, "base": spec.base, "tuned": spec.tuned, "dtype": spec.dtype, "kind": "toy",
                     "built": toy.is_built(name), "truth": spec.truth, "description": spec.description})
    from mdiff import fixtures

    for name in fixtures.FIXTURE_NAMES:  # Llama-3.1-shaped random pairs (need llama-models to be built)
        spec = fixtures.fixture_pair(name, build=False)
        rows.append({"name": name, "base": spec.base, "tuned": spec.tuned, "dtype": spec.dtype, "kind": "fixture",
                     "built": fixtures.is_built(name), "truth": spec.truth, "description": spec.description,
                     "build_time": fixtures.BUILD_TIME[name]})
    return rows


def dumps_pairs(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)
