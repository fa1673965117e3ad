"""Shared test set-up: one torch thread, offline hub, fixed seeds."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mdiff.threads import set_threads  # noqa: E402

# torch's threads and numpy's BLAS pool (sized before this file ran: a plugin imports numpy)
set_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(scope="session")
def toys():
    """The cached offline toy pairs (built once, about a minute, on first use)."""
    from mdiff import toy
    from mdiff.pairs import resolve_pair

    toy.build_toys()
    return {name: resolve_pair(name) for name in ("toy-lowrank", "toy-distributed")}


def make_tiny_llama(path, tokenizer_dir, n_layers=2, hidden=32, heads=4, kv_heads=2, vocab=None, seed=0):
    """A random tiny HF Llama saved to ``path`` with the tokenizer files of ``tokenizer_dir``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
