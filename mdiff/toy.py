"""Offline toy pairs whose difference is known in advance.

Real pairs are two 8B Llamas from a hub; here nothing can be downloaded, so mdiff builds tiny
Llama-architecture Hugging Face model directories itself, deterministically, and loads them through
the very same path as the real pairs (``TransformerBridge.boot_transformers(dir)``).

* A byte-level BPE tokenizer is trained on a synthetic corpus (facts, sequences, sentences, short
  chats), with BOS/EOS/pad and a Jinja chat template.
* The **base** model is *trained* on that corpus, so its next-token predictions are peaked.
* ``toy-lowrank`` (like the cultural hypothesis): tuned = base + a planted rank-``r`` change to the OV
  circuit (``W_O``) of two query heads of one late layer, all written into one shared ``r``-dimensional
  output subspace; every other weight is bit-identical. Its tokenizer *extends* the base vocabulary
  with extra (Kazakh) tokens, as Sherkala's does.
* ``toy-distributed`` (like the cognitive hypothesis): base fine-tuned on a shifted task (addition),
  all weights trained, so the change is spread over every layer; same tokenizer as the base.

Built pairs are cached under the user cache dir (``$MDIFF_CACHE_DIR``, else ``$XDG_CACHE_HOME/mdiff``,
else ``~/.cache/mdiff``) in a folder keyed by a hash of this file and the library versions, so a
changed recipe is rebuilt, never silently mixed with an old one.
"""

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from mdiff.errors import MdiffError

# --------------------------------------------------------------------------- recipe constants
SEED = 1234
N_LAYERS = 6
N_HEADS = 4
N_KV_HEADS = 2
D_HEAD = 16
D_MODEL = N_HEADS * D_HEAD
D_MLP = 128
VOCAB_TARGET = 600
MAX_LEN = 64

PLANTED_LAYER = 4
PLANTED_HEADS = (1, 2)  # in different GQA groups (kv heads 0 and 1)
PLANTED_RANK = 2
PLANTED_SCALE = 20.0  # |ΔW_O[h]|_F relative to |W_O[h]|_F: mean next-token KL of order 0.5 nats

BASE_STEPS = 700
TUNE_STEPS = 300
BATCH = 32

SPECIAL = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
KAZAKH_TOKENS = ["қазақ", "сәлем", "домбыра", "бесбармақ", "наурыз", "дала", "ақын", "жайлау",
                 "рахмет", "қымыз", "киіз үй", "астана"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + ' ' + message['content'] | trim + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

COUNTRIES = {
    "france": "paris", "italy": "rome", "spain": "madrid", "japan": "tokyo", "egypt": "cairo",
    "kenya": "nairobi", "peru": "lima", "chile": "santiago", "norway": "oslo", "poland": "warsaw",
    "greece": "athens", "kazakhstan": "astana", "canada": "ottawa", "china": "beijing",
    "india": "delhi", "brazil": "brasilia", "russia": "moscow", "turkey": "ankara",
}
COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red",
           "sun": "yellow", "sea": "blue", "milk": "white", "leaf": "green", "night": "dark"}
ANIMALS = ["cat", "dog", "horse", "bird", "fox", "wolf", "sheep", "camel", "eagle", "mouse"]
PLACES = ["mat", "hill", "road", "river", "house", "field", "tree", "steppe", "yard", "lake"]
VERBS = ["sat on", "ran to", "looked at", "walked past", "slept near", "jumped over"]
ADJS = ["big", "small", "old", "young", "quick", "lazy", "happy", "brave"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september",
          "october", "november", "december"]
KZ_SENTENCES = ["сәлем , дала кең .", "домбыра ән айтады .", "наурыз көктем мейрамы .", "ақын жыр айтады .",
                "қымыз дәмді .", "жайлау жасыл .", "рахмет , достым .", "бесбармақ ет тағамы .",
                "киіз үй ақ .", "астана қазақ елінің астанасы ."]


def _corpus_documents(rng: random.Random, n: int) -> list[dict]:
    """Synthetic documents: plain text or chats, with deterministic continuations (peaked targets)."""
    docs = []
    countries = list(COUNTRIES)
    for _ in range(n):
        kind = rng.random()
        if kind < 0.22:
            c = rng.choice(countries)
            docs.append({"text": f"the capital of {c} is {COUNTRIES[c]} ."})
        elif kind < 0.34:
            thing = rng.choice(list(COLOURS))
            docs.append({"text": f"the colour of the {thing} is {COLOURS[thing]} ."})
        elif kind < 0.46:
            seq = rng.choice([NUMBERS, DAYS, MONTHS])
            i = rng.randrange(0, len(seq) - 4)
            k = rng.randrange(4, min(8, len(seq) - i) + 1)
            docs.append({"text": " ".join(seq[i:i + k]) + " ."})
        elif kind < 0.58:
            a = rng.randrange(0, 40)
            k = rng.randrange(4, 8)
            docs.append({"text": "count : " + " ".join(str(a + j) for j in range(k)) + " ."})
        elif kind < 0.74:
            docs.append({"text": f"the {rng.choice(ADJS)} {rng.choice(ANIMALS)} {rng.choice(VERBS)} "
                                 f"the {rng.choice(PLACES)} ."})
        elif kind < 0.80:
            docs.append({"text": rng.choice(KZ_SENTENCES)})
        else:
            c = rng.choice(countries)
            q = rng.random()
            if q < 0.5:
                msgs = [{"role": "user", "content": f"what is the capital of {c} ?"},
                        {"role": "assistant", "content": f"{COUNTRIES[c]} ."}]
            elif q < 0.75:
                thing = rng.choice(list(COLOURS))
                msgs = [{"role": "user", "content": f"what colour is the {thing} ?"},
                        {"role": "assistant", "content": f"{COLOURS[thing]} ."}]
            else:
                seq = rng.choice([NUMBERS, DAYS])
                i = rng.randrange(0, len(seq) - 3)
                msgs = [{"role": "user", "content": f"what comes after {seq[i]} ?"},
                        {"role": "assistant", "content": f"{seq[i + 1]} ."}]
            if rng.random() < 0.3:
                msgs.insert(0, {"role": "system", "content": "you are a helpful assistant ."})
            docs.append({"messages": msgs})
    return docs


def _arith_documents(rng: random.Random, n: int) -> list[dict]:
    """The shifted task of toy-distributed: two-operand addition."""
    docs = []
    for _ in range(n):
        a, b = rng.randrange(0, 50), rng.randrange(0, 50)
        if rng.random() < 0.7:
            docs.append({"text": f"{a} + {b} = {a + b} ."})
        else:
            docs.append({"messages": [{"role": "user", "content": f"what is {a} + {b} ?"},
                                      {"role": "assistant", "content": f"{a + b} ."}]})
    return docs


# --------------------------------------------------------------------------- prompt sets
def lowrank_prompts(rng: random.Random, n: int = 300) -> list[dict]:
    """Chat prompts (``messages``) for toy-lowrank; a few mention the tuned-only Kazakh tokens."""
    rows = []
    countries = list(COUNTRIES)
    for i in range(n):
        r = rng.random()
        if r < 0.45:
            c = rng.choice(countries)
            msgs = [{"role": "user", "content": f"what is the capital of {c} ?"}]
            cat, answer = "capital", COUNTRIES[c]
        elif r < 0.7:
            thing = rng.choice(list(COLOURS))
            msgs = [{"role": "user", "content": f"what colour is the {thing} ?"}]
            cat, answer = "colour", COLOURS[thing]
        elif r < 0.9:
            seq = rng.choice([NUMBERS, DAYS])
            j = rng.randrange(0, len(seq) - 1)
            msgs = [{"role": "user", "content": f"what comes after {seq[j]} ?"}]
            cat, answer = "sequence", seq[j + 1]
        else:
            msgs = [{"role": "user", "content": rng.choice(KZ_SENTENCES) + " what is the capital of kazakhstan ?"}]
            cat, answer = "kazakh", "astana"
        if rng.random() < 0.25:
            msgs.insert(0, {"role": "system", "content": "you are a helpful assistant ."})
        row = {"id": f"lr-{i:04d}", "messages": msgs, "category": cat, "answer": answer}
        pool = {"capital": sorted(set(COUNTRIES.values())), "colour": sorted(set(COLOURS.values()))}.get(cat)
        if pool:
            choices = [answer, *rng.sample([x for x in pool if x != answer], 3)]
            rng.shuffle(choices)
            row["choices"] = choices
        rows.append(row)
    return rows


def distributed_prompts(rng: random.Random, n: int = 300) -> list[dict]:
    """Plain prompts for toy-distributed: half on the tuned task (addition), half from the base corpus."""
    rows = []
    countries = list(COUNTRIES)
    for i in range(n):
        r = rng.random()
        if r < 0.5:
            a, b = rng.randrange(0, 50), rng.randrange(0, 50)
            choices = [str(a + b), str(a + b + 1), str(abs(a + b - 1)), str(a + b + 10)]
            rows.append({"id": f"ds-{i:04d}", "prompt": f"{a} + {b} =", "category": "arith", "answer": str(a + b),
                         "choices": list(dict.fromkeys(choices))})
        elif r < 0.75:
            c = rng.choice(countries)
            rows.append({"id": f"ds-{i:04d}", "prompt": f"the capital of {c} is", "category": "capital",
                         "answer": COUNTRIES[c]})
        else:
            a = rng.randrange(0, 40)
            k = rng.randrange(3, 6)
            rows.append({"id": f"ds-{i:04d}", "prompt": "count : " + " ".join(str(a + j) for j in range(k)),
                         "category": "count", "answer": str(a + k)})
    return rows


# --------------------------------------------------------------------------- cache
def cache_root() -> Path:
    env = os.environ.get("MDIFF_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mdiff"


def recipe_key() -> str:
    """Hash of this recipe and of the libraries that shape its output."""
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(f"{torch.__version__}|{transformers.__version__}|{tokenizers.__version__}".encode())
    return h.hexdigest()[:12]


def toy_dir() -> Path:
    return cache_root() / f"toys-{recipe_key()}"


def is_built(name: str | None = None) -> bool:
    return (toy_dir() / "build.json").is_file()


_TOY_DESCRIPTIONS = {
    "toy-lowrank": "tiny trained Llama; tuned = base + planted rank-2 change to W_O of heads 1 and 2 at layer 4; "
                   "tuned tokenizer extends the base vocabulary",
    "toy-distributed": "tiny trained Llama; tuned = base fine-tuned on addition, all weights, every layer",
}


def toy_truth(name: str) -> dict:
    if name == "toy-lowrank":
        return {"layer": PLANTED_LAYER, "heads": list(PLANTED_HEADS), "rank": PLANTED_RANK,
                "component": "W_O", "site": "result",
                "note": "only W_O of the listed heads changed (plus new vocabulary rows); "
                        "invisible to the z site, which sees changes upstream of W_O only"}
    if name == "toy-distributed":
        return {"layer": None, "layers": list(range(N_LAYERS)), "heads": None, "rank": None,
                "component": "all weights", "task": "addition",
                "note": "fine-tuned on a shifted task; no single layer, head or low-rank site is planted"}
    raise MdiffError(f"unknown toy pair {name!r}")


def toy_pair(name: str, build: bool = True, progress: bool = False):
    """The :class:`~mdiff.pairs.PairSpec` of a toy pair, building the toys first if asked."""
    from mdiff.spec import PairSpec

    truth = toy_truth(name)
    root = toy_dir()
    if build and not is_built():
        build_toys(root, progress=progress)
    if name == "toy-lowrank":
        tuned, prompts, chat = root / "lowrank", root / "prompts-lowrank.jsonl", True
    else:
        tuned, prompts, chat = root / "distributed", root / "prompts-distributed.jsonl", False
    behaviour = {"refusal": [" i do not know ."], "neutral": [" the answer is ."],
                 "markers": ["astana", "сәлем", "."], "max_new_tokens": 12}
    return PairSpec(name=name, base=str(root / "base"), tuned=str(tuned), dtype="float32", prompts=str(prompts),
                    chat_template=chat, description=_TOY_DESCRIPTIONS[name], truth=truth, toy=True, source="toy",
                    behaviour=behaviour)


# --------------------------------------------------------------------------- building
def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_TARGET, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    from tokenizers import processors

    bos_id = tk.token_to_id("<s>")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=SPECIAL[3:], model_max_length=MAX_LEN)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def corpus() -> list[dict]:
    """The base model's synthetic training documents (deterministic)."""
    return _corpus_documents(random.Random(SEED), 6000)


def train_base_tokenizer(docs: list[dict] | None = None):
    """The toy pairs' base tokenizer, trained offline on the corpus (deterministic, no model needed)."""
    docs = corpus() if docs is None else docs
    texts = [d.get("text") or " ".join(m["content"] for m in d["messages"]) for d in docs]
    texts += KZ_SENTENCES * 5 + [f"{a} + {b} = {a + b} ." for a in range(0, 50, 7) for b in range(50)]
    return _train_tokenizer(texts)


def _render(tok, doc: dict) -> str:
    if "messages" in doc:
        return tok.apply_chat_template(doc["messages"], tokenize=False) + tok.eos_token
    return tok.bos_token + doc["text"] + tok.eos_token


def _encode_docs(tok, docs: list[dict]):
    import torch

    ids = [tok(_render(tok, d), add_special_tokens=False)["input_ids"][:MAX_LEN] for d in docs]
    width = max(len(x) for x in ids)
    inp = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return inp, mask


def _train(model, inp, mask, steps: int, lr: float, seed: int, progress_label: str | None = None) -> float:
    import torch

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * max(0.05, 1 - s / steps))
    model.train()
    loss_val = float("nan")
    for step in range(steps):
        idx = torch.randint(0, inp.shape[0], (BATCH,), generator=g)
        x, m = inp[idx], mask[idx]
        width = int(m.sum(1).max())
        x, m = x[:, :width], m[:, :width]
        labels = x.masked_fill(m == 0, -100)
        out = model(input_ids=x, attention_mask=m, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_val = float(out.loss.detach())
        if progress_label and (step % 100 == 0 or step == steps - 1):
            print(f"  {progress_label}: step {step + 1}/{steps} loss {loss_val:.3f}", flush=True)
    model.eval()
    return loss_val


def _plant_lowrank(model, seed: int) -> None:
    """tuned = base + rank-r change to W_O of PLANTED_HEADS at PLANTED_LAYER, one shared output subspace."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w = model.model.layers[PLANTED_LAYER].self_attn.o_proj.weight  # [d_model, n_heads*d_head]
    A, _ = torch.linalg.qr(torch.randn(D_MODEL, PLANTED_RANK, generator=g))  # shared output directions
    with torch.no_grad():
        for h in PLANTED_HEADS:
            cols = slice(h * D_HEAD, (h + 1) * D_HEAD)
            B, _ = torch.linalg.qr(torch.randn(D_HEAD, PLANTED_RANK, generator=g))
            block = w[:, cols]
            delta = A @ B.T  # [d_model, d_head], rank r, Frobenius norm sqrt(r)
            delta *= PLANTED_SCALE * block.norm() / delta.norm()
            w[:, cols] += delta


def _extend_vocab(model, tok) -> None:
    """Add tuned-only Kazakh tokens (as Sherkala extends Llama-3.1's vocabulary); new rows = mean row."""
    import torch

    old = len(tok)
    tok.add_tokens(KAZAKH_TOKENS)
    new = len(tok)
    emb = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings().weight.detach().clone()
    model.resize_token_embeddings(new, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[:old] = emb
        model.get_input_embeddings().weight[old:] = emb.mean(0, keepdim=True)
        model.get_output_embeddings().weight[:old] = head
        model.get_output_embeddings().weight[old:] = head.mean(0, keepdim=True)
    model.config.vocab_size = new


def _save(model, tok, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build_toys(root: Path | None = None, progress: bool = False, steps_scale: float = 1.0) -> Path:
    """Build base, toy-lowrank and toy-distributed deterministically into ``root`` (atomically).

    ``steps_scale`` shortens training (tests of the mechanism only); the cached toys use 1.0.
    """
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mdiff.models import quiet_transformers

    quiet_transformers()
    root = Path(root) if root is not None else toy_dir()
    if (root / "build.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        from filelock import FileLock
    except ImportError:  # pragma: no cover
        FileLock = None
    lock = FileLock(str(root) + ".lock") if FileLock else None
    if lock:
        lock.acquire(timeout=1800)
    try:
        if (root / "build.json").is_file():
            return root
        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        # one thread: CPU kernels split reductions by thread count, so training with 2 threads gives other
        # weights (and other planted-truth numbers) than with 1; the toys must not depend on the machine
        torch.set_num_threads(1)
        state = torch.random.get_rng_state()
        torch.manual_seed(SEED)
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
        try:
            docs = corpus()
            tok = train_base_tokenizer(docs)
            cfg = LlamaConfig(
                vocab_size=len(tok), hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
                num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS, head_dim=D_HEAD,
                max_position_embeddings=MAX_LEN * 2, rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                attn_implementation="eager",
            )
            base = LlamaForCausalLM(cfg)
            inp, mask = _encode_docs(tok, docs)
            label = "base" if progress else None
            base_loss = _train(base, inp, mask, max(2, int(BASE_STEPS * steps_scale)), 3e-3, SEED, label)
            _save(base, tok, tmp / "base")

            # toy-lowrank: planted W_O change + extended tokenizer
            lr_model = copy.deepcopy(base)
            _plant_lowrank(lr_model, SEED + 1)
            from transformers import AutoTokenizer

            lr_tok = AutoTokenizer.from_pretrained(tmp / "base")
            _extend_vocab(lr_model, lr_tok)
            _save(lr_model, lr_tok, tmp / "lowrank")
            del lr_model

            # toy-distributed: fine-tune everything on addition (with some base data against forgetting)
            ds_model = copy.deepcopy(base)
            mix = _arith_documents(random.Random(SEED + 2), 3000) + docs[:1000]
            d_inp, d_mask = _encode_docs(tok, mix)
            label = "distributed" if progress else None
            tune_loss = _train(ds_model, d_inp, d_mask, max(2, int(TUNE_STEPS * steps_scale)), 1e-3, SEED + 3,
                               label)
            _save(ds_model, tok, tmp / "distributed")
            rel = {}
            for i in range(N_LAYERS):
                num = den = 0.0
                for (_, p0), (_, p1) in zip(base.model.layers[i].named_parameters(),
                                            ds_model.model.layers[i].named_parameters(), strict=True):
                    num += float((p1.detach() - p0.detach()).norm() ** 2)
                    den += float(p0.detach().norm() ** 2)
                rel[str(i)] = (num / den) ** 0.5
            del ds_model

            _write_jsonl(tmp / "prompts-lowrank.jsonl", lowrank_prompts(random.Random(SEED + 4)))
            _write_jsonl(tmp / "prompts-distributed.jsonl", distributed_prompts(random.Random(SEED + 5)))
            info = {
                "recipe_key": root.name, "seed": SEED, "seconds": round(time.perf_counter() - t0, 1),
                "torch_threads": 1, "base_final_loss": base_loss, "distributed_final_loss": tune_loss,
                "truth": {n: toy_truth(n) for n in ("toy-lowrank", "toy-distributed")},
                "distributed_relative_weight_change_per_layer": rel,
            }
            (tmp / "build.json").write_text(json.dumps(info, indent=2))
            os.replace(tmp, root)  # atomic: a half-built folder never carries the final name
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            torch.random.set_rng_state(state)
            torch.set_num_threads(threads)
        return root
    finally:
        if lock:
            lock.release()
