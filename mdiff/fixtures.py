"""Llama-3.1-shaped fixture pairs: the real tokenizer, the real shapes, random weights, a planted change.

The toys prove the methods at width 64 with home-trained tokenizers; the study's pairs are Llama-3.1-8B
with Llama-3's 128,256-id tokenizer (159,766 for Sherkala). These fixtures are what can be built offline
in their place:

* **Tokenizer**: Llama-3's own, made from Meta's ``llama_models/llama3/tokenizer.model`` (the
  ``llama-models`` package, a dev dependency, never vendored) by transformers' ``TikTokenConverter``:
  128,000 BPE ids + 256 special ids named as in Llama-3.1 (``<|begin_of_text|>`` = 128000 ...
  ``<|eot_id|>`` = 128009), the post-processor that adds BOS, and Llama-3.1's chat template.
* **Tuned tokenizer**: extended to 159,766 ids as Sherkala's is: 31,510 new BPE tokens (merges of
  Cyrillic pieces, appended after the base merges), so every base id keeps its meaning (relation
  ``extends``) and Kazakh text tokenizes into new, tuned-only ids.
* **Model**: Llama-3.1-8B's config (rope ``llama3`` scaling, θ = 500,000, 32 query / 8 KV heads, d_head 128,
  RMSNorm ε 1e-5, untied unembedding) with ``N_LAYERS`` layers and random bf16 weights.
  ``llama31-fixture`` has the full width (d_model 4096, d_ff 14,336: the benchmark); ``llama31-fixture-small``
  keeps the tokenizer, vocabulary, heads and rope but d_model 256 (the tests); ``llama31-8b-random`` is
  the whole 8B shape (32 layers; for the GPU script, built on the GPU when there is one).
* **Planted change**: tuned = base + a rank-2 change to ``W_O`` of query heads 3 and 17 of the last
  layer (of layer 26 in the 32-layer pair, Sherkala's depth of largest change) (one shared output subspace); the new vocabulary rows are the mean base row. Nothing else differs.

Built fixtures are cached under the mdiff cache dir (like the toys), keyed by a hash of this recipe.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from mdiff.errors import MdiffError

SEED = 31
N_LAYERS = 2
BASE_VOCAB = 128_256
EXTENDED_VOCAB = 159_766  # Sherkala's
PLANTED_HEADS = (3, 17)  # different KV groups (3 // 4 = 0, 17 // 4 = 4)
PLANTED_RANK = 2
PLANTED_SCALE = 4.0  # |ΔW_O[h]|_F relative to |W_O[h]|_F

WIDTHS = {  # name: (d_model, d_ff, d_head)
    "llama31-fixture": (4096, 14336, 128),
    "llama31-fixture-small": (256, 512, 8),
    "llama31-8b-random": (4096, 14336, 128),
}
BUILD_TIME = {"llama31-fixture": "~3 min on 2 CPU cores, 6 GB on disk", "llama31-fixture-small": "~20 s",
              "llama31-8b-random": "a few minutes on a GPU machine, 32 GB on disk"}
LAYERS = {"llama31-8b-random": 32}  # the full 8B shape (16 GB a model in bf16): for a GPU machine
FIXTURE_NAMES = tuple(WIDTHS)

LLAMA31_SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])

# Llama-3.1-Instruct's template, its no-tools path (system header with the knowledge/today dates).
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = \"\" %}{%- endif %}"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}{{- \"Today Date: 26 Jul 2024\\n\\n\" }}"
    "{{- system_message }}{{- \"<|eot_id|>\" }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

KAZAKH_TEXT = (
    "Наурыз мейрамы көктемде тойланады. Қонақ келгенде қазақтар дастарқан жаяды. Домбыра қазақтың ұлттық "
    "аспабы. Киіз үй көшпелі халықтың баспанасы. Бесбармақ ет пен қамырдан жасалады. Асар дегеніміз ауыл "
    "адамдарының бір-біріне көмегі. Үлкенді құрметтеу қазақ әдебінің негізі. Ақындар айтыста жыр айтады. "
    "Қымыз бие сүтінен ашытылады. Шілдехана сәби туғанда өтеді. Тұсаукесер баланың алғашқы қадамы. "
    "Сәлемдесу үлкенге бірінші беріледі. Жайлауда мал бағылады. Астана елдің бас қаласы."
)
PROMPTS_KK = [
    ("Наурыз мейрамы қашан тойланады?", "tradition", ["22 наурызда", "1 мамырда"], "22 наурызда"),
    ("Қонақ келгенде қазақтар не істейді?", "etiquette", ["дастарқан жаяды", "есікті жабады"], "дастарқан жаяды"),
    ("Домбыра деген не?", "culture", ["ұлттық аспап", "тағам"], "ұлттық аспап"),
    ("Асар дегеніміз не?", "community", ["ауыл көмегі", "ойын"], "ауыл көмегі"),
    ("Киіз үй туралы айтып беріңіз.", "culture", None, None),
    ("Бесбармақ қалай дайындалады?", "tradition", None, None),
    ("Үлкенді құрметтеу неге маңызды?", "etiquette", None, None),
    ("Тұсаукесер дәстүрі туралы не білесіз?", "tradition", None, None),
]
PROMPTS_EN = [
    ("What is the capital of Kazakhstan?", "culture", ["Astana", "Paris"], "Astana"),
    ("Describe the Nauryz holiday in one sentence.", "tradition", None, None),
    ("What is 12 times 7?", "math", ["84", "74"], "84"),
    ("Solve for x: 2x + 3 = 11.", "math", None, None),
    ("How many primes are there below 20?", "math", ["8", "6"], "8"),
    ("Explain why the sum of two even numbers is even.", "math", None, None),
    ("What should a guest do when entering a home?", "etiquette", None, None),
    ("Name a traditional musical instrument of Central Asia.", "culture", None, None),
]


# --------------------------------------------------------------------------- tokenizers
def llama3_tokenizer_model() -> Path:
    """Path of Meta's Llama-3 ``tokenizer.model`` shipped by the ``llama-models`` package."""
    try:
        import llama_models
    except ImportError:
        raise MdiffError("the Llama-3 fixtures need Meta's tokenizer file: pip install llama-models "
                         "(in the dev extra: pip install -e '.[dev]')") from None
    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise MdiffError(f"llama-models is installed but has no {path}; reinstall it (pip install llama-models)")
    return path


def _wrap(backend, chat_template: str):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  model_max_length=131072)
    tok.chat_template = chat_template
    return tok


def llama3_tokenizer():
    """Llama-3.1's tokenizer (128,256 ids), exactly as on the hub, from the ``llama-models`` file."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(llama3_tokenizer_model()),
                                extra_special_tokens=LLAMA31_SPECIAL).converted()
    bos = LLAMA31_SPECIAL[0]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 128000)])
    return _wrap(backend, LLAMA31_CHAT_TEMPLATE)


_CYRILLIC = re.compile(r"[\u0400-\u04FF]")


def extend_tokenizer(base_tok, n_total: int = EXTENDED_VOCAB, corpus: str = KAZAKH_TEXT):
    """A copy of ``base_tok`` with new BPE tokens up to ``n_total`` ids (Sherkala-like, relation ``extends``).

    New merges are appended after the base merges, so base text that contains no new merge tokenizes as
    before and every base id keeps its token. The first merges join the adjacent Cyrillic pieces the base
    tokenizer leaves in ``corpus`` (so Kazakh text really uses new ids), the rest join further Cyrillic
    pieces in a fixed order.
    """
    from tokenizers import Tokenizer

    backend = base_tok.backend_tokenizer
    spec = json.loads(backend.to_str())
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    n_new = n_total - len(base_tok)
    if n_new < 0:
        raise MdiffError(f"cannot extend a {len(base_tok)}-id tokenizer to {n_total} ids")
    inv = {i: t for t, i in vocab.items()}
    taken = set(vocab)
    pairs: list[tuple[str, str]] = []

    def add(a: str, b: str) -> None:
        if a + b not in taken and len(pairs) < n_new:
            taken.add(a + b)
            pairs.append((a, b))

    enc = backend.encode(corpus, add_special_tokens=False)
    words = enc.word_ids
    for j in range(len(enc.ids) - 1):
        a, b = inv[enc.ids[j]], inv[enc.ids[j + 1]]
        if words[j] == words[j + 1] and _CYRILLIC.search(base_tok.decode([enc.ids[j]]) + base_tok.decode([enc.ids[j + 1]])):
            add(a, b)
    cyr = [inv[i] for i in sorted(inv) if _CYRILLIC.search(base_tok.decode([i]))
           and not inv[i].startswith("Ġ")]
    for a in cyr:
        for b in cyr:
            if len(pairs) >= n_new:
                break
            add(a, b)
        if len(pairs) >= n_new:
            break
    if len(pairs) < n_new:  # pragma: no cover - Llama-3 has thousands of Cyrillic pieces
        raise MdiffError(f"could only make {len(pairs)} of {n_new} new tokens")
    for at in spec["added_tokens"]:  # specials in the model vocabulary too, or a reload renumbers them
        vocab[at["content"]] = at["id"]
    nxt = len(base_tok)
    for a, b in pairs:
        vocab[a + b] = nxt
        nxt += 1
    model["merges"] = model["merges"] + [[a, b] for a, b in pairs]
    new_backend = Tokenizer.from_str(json.dumps(spec))
    tok = _wrap(new_backend, base_tok.chat_template)
    if len(tok) != n_total:  # pragma: no cover
        raise MdiffError(f"extended tokenizer has {len(tok)} ids, expected {n_total}")
    return tok


# --------------------------------------------------------------------------- models
def llama31_config(d_model: int, d_ff: int, d_head: int, n_layers: int = N_LAYERS, vocab: int = BASE_VOCAB):
    """Llama-3.1-8B's config at another width/depth (heads, rope, norms, untied unembedding as in 8B)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=d_ff, num_hidden_layers=n_layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=d_head, hidden_act="silu",
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009], attention_bias=False, mlp_bias=False,
        initializer_range=0.02, dtype="bfloat16", architectures=["LlamaForCausalLM"])


def planted_layer(name: str) -> int:
    n = LAYERS.get(name, N_LAYERS)
    return 26 if n > 26 else n - 1


def _plant(model, d_head: int, seed: int, layer: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    w = model.model.layers[layer].self_attn.o_proj.weight  # [d_model, n_heads * d_head]
    d_model = w.shape[0]
    A, _ = torch.linalg.qr(torch.randn(d_model, PLANTED_RANK, generator=g, dtype=torch.float32))
    with torch.no_grad():
        for h in PLANTED_HEADS:
            cols = slice(h * d_head, (h + 1) * d_head)
            B, _ = torch.linalg.qr(torch.randn(d_head, PLANTED_RANK, generator=g, dtype=torch.float32))
            block = w[:, cols].float()
            delta = (A @ B.T).to(block.device)
            delta *= PLANTED_SCALE * block.norm() / delta.norm()
            w[:, cols] = (block + delta).to(w.dtype)


def _extend_rows(model, n_total: int) -> None:
    import torch

    emb = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings().weight.detach().clone()
    old = emb.shape[0]
    model.resize_token_embeddings(n_total, mean_resizing=False)
    with torch.no_grad():
        for mod, src in ((model.get_input_embeddings(), emb), (model.get_output_embeddings(), head)):
            mod.weight[:old] = src
            mod.weight[old:] = src.float().mean(0, keepdim=True).to(src.dtype)
    model.config.vocab_size = n_total


def fixture_prompts() -> list[dict]:
    """The fixture's prompt set: Kazakh and English chat prompts, some multiple choice (with answers)."""
    rows = []
    for tag, items in (("kk", PROMPTS_KK), ("en", PROMPTS_EN)):
        for i, (q, cat, choices, ans) in enumerate(items):
            r = {"id": f"{tag}-{i:02d}", "prompt": q, "category": cat}
            if choices:
                r["choices"], r["answer"] = choices, ans
            rows.append(r)
    return rows


def recipe_key() -> str:
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(f"{torch.__version__}|{transformers.__version__}|{tokenizers.__version__}".encode())
    return h.hexdigest()[:12]


def fixture_dir(name: str) -> Path:
    from mdiff.toy import cache_root

    if name not in WIDTHS:
        raise MdiffError(f"unknown fixture {name!r}: use one of {', '.join(FIXTURE_NAMES)}")
    return cache_root() / f"fixtures-{recipe_key()}" / name


def is_built(name: str) -> bool:
    return (fixture_dir(name) / "build.json").is_file()


def build_fixture(name: str, progress: bool = False) -> Path:
    """Build one fixture pair (base, tuned, prompts.jsonl, build.json) atomically into the cache."""
    import torch
    from transformers import LlamaForCausalLM

    from mdiff.models import quiet_transformers

    root = fixture_dir(name)
    if (root / "build.json").is_file():
        return root
    quiet_transformers()
    d_model, d_ff, d_head = WIDTHS[name]
    root.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(root) + ".lock", timeout=3600):
        if (root / "build.json").is_file():
            return root
        t0 = time.perf_counter()
        say = print if progress else (lambda *a, **k: None)
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
        state = torch.random.get_rng_state()
        old_dtype = torch.get_default_dtype()
        try:
            say(f"  {name}: tokenizers", flush=True)
            btok = llama3_tokenizer()
            ttok = extend_tokenizer(btok)
            torch.manual_seed(SEED)
            torch.set_default_dtype(torch.bfloat16)  # never materialise 8B-width fp32 weights
            n_layers = LAYERS.get(name, N_LAYERS)
            say(f"  {name}: base model (d_model {d_model}, {n_layers} layers)", flush=True)
            where = torch.device("cuda" if torch.cuda.is_available() and n_layers > N_LAYERS else "cpu")
            with where:  # random init of 8B parameters: seconds on a GPU, minutes on a CPU
                model = LlamaForCausalLM(llama31_config(d_model, d_ff, d_head, n_layers)).to(torch.bfloat16)
            model.generation_config.pad_token_id = 128009
            model.save_pretrained(tmp / "base", safe_serialization=True)
            btok.save_pretrained(tmp / "base")
            say(f"  {name}: tuned model (planted W_O change, vocabulary {EXTENDED_VOCAB})", flush=True)
            _plant(model, d_head, SEED + 1, planted_layer(name))
            _extend_rows(model, EXTENDED_VOCAB)
            model.save_pretrained(tmp / "tuned", safe_serialization=True)
            ttok.save_pretrained(tmp / "tuned")
            del model
            with open(tmp / "prompts.jsonl", "w", encoding="utf-8") as f:
                for r in fixture_prompts():
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            info = {"name": name, "recipe_key": recipe_key(), "seed": SEED, "d_model": d_model, "d_ff": d_ff,
                    "n_layers": n_layers, "built_on": str(where), "seconds": round(time.perf_counter() - t0, 1),
                    "truth": fixture_truth(name)}
            (tmp / "build.json").write_text(json.dumps(info, indent=2))
            os.replace(tmp, root)
        finally:
            torch.set_default_dtype(old_dtype)
            torch.random.set_rng_state(state)
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root


def fixture_truth(name: str = "llama31-fixture") -> dict:
    return {"layer": planted_layer(name), "heads": list(PLANTED_HEADS), "rank": PLANTED_RANK, "component": "W_O",
            "site": "result", "note": "random weights; only W_O of the listed heads changed (plus new vocabulary "
                                      "rows, the mean base row)"}


def fixture_pair(name: str, build: bool = True, progress: bool = False):
    """The :class:`~mdiff.pairs.PairSpec` of a fixture pair (built on first use)."""
    from mdiff.spec import PairSpec

    root = fixture_dir(name)
    if build and not is_built(name):
        build_fixture(name, progress=progress)
    d_model = WIDTHS[name][0]
    return PairSpec(
        name=name, base=str(root / "base"), tuned=str(root / "tuned"), dtype="bfloat16",
        prompts=str(root / "prompts.jsonl"), chat_template=True, min_shared_ratio=0.65,
        description=f"Llama-3.1-8B-shaped random pair, {LAYERS.get(name, N_LAYERS)} layers, d_model {d_model}: "
                    f"Llama-3 tokenizer, tuned tokenizer extended to {EXTENDED_VOCAB} ids, planted W_O change",
        truth=fixture_truth(name), toy=True, source="fixture",
        behaviour={"max_new_tokens": 8, "max_prompts": 16})
