"""A toy pair whose change is *exactly linear* at one site, for the transport-map tests (RQ2, RQ3).

tuned = the toy base with ``W_O`` of one layer replaced by ``W_O M`` (HF: ``o_proj.weight ← Mᵀ·weight``),
``M = I + Σ_i s_i b_i a_iᵀ`` of rank ``rank``. Everything upstream of that layer's attention output is
bit-identical, so at ``blocks.L.hook_attn_out`` the tuned activation is exactly ``x M`` for the base
activation x, at every position: the true transport map is M, and its correction ``M − I`` has rank
``rank``. No component may be negligible, or "the smallest rank that removes 90% of the patch KL" would be
below the planted rank for a good reason: so the components are balanced where RQ2/RQ3 measure, the
decision position. The input directions b_i are the base activations' top principal axes there; the output
directions a_i are eigenvectors of the next-token Fisher information with respect to ``attn_out`` at the
decision position (so their logit effects do not interact), and the scales s_i give every component the
same expected KL (½ s_i² var(x·b_i) a_iᵀFa_i) in the small-change regime.
d_model = 64, so ``--n 40`` (40 train prompts) puts the fit in the prompts < dimensions regime.
"""

from pathlib import Path

import numpy as np
import torch

LAYER = 4
RANK = 2


def build_linear_pair(root: Path, rank: int = RANK, layer: int = LAYER, kl_per_component: float = 0.1,
                      n_prompts: int = 40) -> tuple[Path, dict]:
    """Write the tuned model and ``pair.toml`` under ``root``; returns (toml path, truth)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mdiff import data, toy

    toy.build_toys()
    base_dir = toy.toy_dir() / "base"
    prompts = toy.toy_dir() / "prompts-lowrank.jsonl"
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float64, attn_implementation="eager")
    model.eval()
    o_proj = model.model.layers[layer].self_attn.o_proj
    d = o_proj.weight.shape[0]
    delta = torch.zeros(1, d, dtype=torch.float64)
    xs, fisher = [], np.zeros((d, d))

    def hook(mod, inp, out):  # record the decision-position attn_out and add a perturbation there
        xs.append(out[0, -1].detach().clone())
        out = out.clone()
        out[:, -1] = out[:, -1] + delta
        return out

    h = o_proj.register_forward_hook(hook)
    eps = 1e-4
    with torch.no_grad():
        for p in data.load_prompts(str(prompts))[:n_prompts]:
            text, add_special = data.render(p, tok, True)
            ids = tok(text, add_special_tokens=add_special, return_tensors="pt")["input_ids"]
            # Jacobian of the decision logits w.r.t. the decision attn_out, by central differences
            delta = torch.cat([torch.zeros(1, d), eps * torch.eye(d), -eps * torch.eye(d)]).double()
            logits = model(input_ids=ids.expand(2 * d + 1, -1)).logits[:, -1]
            J = ((logits[1:d + 1] - logits[d + 1:]) / (2 * eps)).T.numpy()  # vocab × d
            pr = torch.softmax(logits[0], -1).numpy()
            fisher += J.T @ (pr[:, None] * J) - np.outer(J.T @ pr, J.T @ pr)
    h.remove()
    fisher /= n_prompts
    X = torch.stack(xs).numpy()  # batch row 0 of each prompt: unperturbed
    Xc = X - X.mean(0)
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    b = Vt[:rank].T  # input directions (d × r)
    var_b = s[:rank] ** 2 / len(Xc)  # var(x·b_i) at the decision position
    ev, evec = np.linalg.eigh(fisher)
    a = evec[:, ::-1][:, :rank]  # output directions: the top Fisher eigenvectors (orthonormal)
    f = ev[::-1][:rank]
    scales = np.sqrt(2 * kl_per_component / (var_b * f))  # ½ s² var(x·b) aᵀFa = kl_per_component
    M = np.eye(d) + (b * scales) @ a.T
    with torch.no_grad():
        o_proj.weight.copy_(torch.from_numpy(M.T) @ o_proj.weight)
    tuned = root / "tuned"
    model.to(torch.float32).save_pretrained(tuned, safe_serialization=True)
    tok.save_pretrained(tuned)
    toml = root / "pair.toml"
    toml.write_text(f'name = "toy-linear"\nbase = "{base_dir}"\ntuned = "{tuned}"\ndtype = "float32"\n'
                    f'prompts = "{prompts}"\nchat_template = true\n')
    return toml, {"layer": layer, "hook": "attn_out", "rank": rank, "M": M}


_BUILT: dict[str, tuple[Path, dict]] = {}


def linear_pair(tmp_path_factory) -> tuple[Path, dict]:
    """The planted pair, built once per test session (about 10 s)."""
    if "pair" not in _BUILT:
        _BUILT["pair"] = build_linear_pair(tmp_path_factory.mktemp("toy-linear"))
    return _BUILT["pair"]
