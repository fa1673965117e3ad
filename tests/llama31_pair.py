"""A small Llama-3.1-shaped pair with planted changes, saved as bf16 Hugging Face model directories.

Shape of Llama-3.1 at toy width: rope ``llama3`` scaling (θ = 500,000), GQA with 8 query heads over
2 KV heads (4 query heads per KV group), untied embeddings, bf16 weights on disk. The toy tokenizer
and its chat template (from the toy base) are reused; the prompts are the toy-lowrank prompt set.

Planted (base → tuned), nothing else differs:

* layer ``ATTN_LAYER``: the value projection of KV head ``KV_GROUP``, so exactly the query heads of that
  KV group (``GROUP_HEADS``) change their ``z`` (first divergent layer = ``ATTN_LAYER``);
* layer ``MLP_LAYER``: the MLP's down projection only (an MLP-only change).
"""

import json
import shutil
from pathlib import Path

import torch

N_LAYERS = 5
N_HEADS = 8
N_KV = 2
D_HEAD = 8
ATTN_LAYER = 1
KV_GROUP = 1
GROUP_HEADS = tuple(range(KV_GROUP * N_HEADS // N_KV, (KV_GROUP + 1) * N_HEADS // N_KV))
MLP_LAYER = 3
PRE_MLP_ONLY = 2  # in the MLP-only variant the only change is the MLP at this layer


def _config(tok, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=N_HEADS * D_HEAD, intermediate_size=4 * N_HEADS * D_HEAD,
        num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_KV, head_dim=D_HEAD,
        max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def build(root: Path, toy_base: str, prompts: str, dtype: str = "bfloat16", variant: str = "attn+mlp",
          seed: int = 0) -> Path:
    """Write ``root/{base,tuned}``, ``root/prompts.jsonl`` and ``root/pair.toml``; returns the TOML path.

    ``variant``: ``"attn+mlp"`` (both planted changes) or ``"mlp"`` (only an MLP change at ``PRE_MLP_ONLY``).
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    root = Path(root)
    tok = AutoTokenizer.from_pretrained(toy_base)
    torch.manual_seed(seed)
    cfg = _config(tok, len(tok))
    cfg.initializer_range = 0.08  # peakier next-token distributions than the 0.02 default
    base = LlamaForCausalLM(cfg).float()
    tuned = LlamaForCausalLM(cfg).float()
    tuned.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        if variant == "attn+mlp":
            v = tuned.model.layers[ATTN_LAYER].self_attn.v_proj.weight  # [kv * d_head, d_model]
            rows = slice(KV_GROUP * D_HEAD, (KV_GROUP + 1) * D_HEAD)
            v[rows] += 0.25 * torch.randn(v[rows].shape, generator=g)
            d = tuned.model.layers[MLP_LAYER].mlp.down_proj.weight
            d += 0.5 * torch.randn(d.shape, generator=g)
        elif variant == "mlp":
            d = tuned.model.layers[PRE_MLP_ONLY].mlp.down_proj.weight
            d += 0.3 * torch.randn(d.shape, generator=g)
        else:
            raise ValueError(variant)
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    for name, model in (("base", base), ("tuned", tuned)):
        d = root / name
        model.to(tdtype).save_pretrained(d)
        tok.save_pretrained(d)
        tmpl = Path(toy_base) / "chat_template.jinja"
        if tmpl.exists():
            shutil.copy(tmpl, d / "chat_template.jinja")
    shutil.copy(prompts, root / "prompts.jsonl")
    pair = root / "pair.toml"
    pair.write_text(f'name = "{root.name}"\nbase = "base"\ntuned = "tuned"\ndtype = "{dtype}"\n'
                    f'prompts = "prompts.jsonl"\nchat_template = true\n')
    (root / "planted.json").write_text(json.dumps({"attn_layer": ATTN_LAYER, "kv_group": KV_GROUP,
                                                   "group_heads": GROUP_HEADS, "mlp_layer": MLP_LAYER,
                                                   "variant": variant}))
    return pair
