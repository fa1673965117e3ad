"""Cross-model activation patching at the decision position, and next-token KL.

A patch at site (layer, hook) and position p replaces the target model's activation there with a
source activation (another model's, on the same prompt, or a mapped one) and measures
``KL(P_target_clean ‖ P_target_patched)`` of the next-token distribution at the decision position
(each prompt's last chosen position), over the pair's shared vocabulary (renormalised).

A *condition* is one patch applied to every prompt: :class:`SitePatch` (a whole hook such as
``resid_post`` or ``attn_out``) or :class:`HeadPatch` (a set of query heads at the ``result`` or
``z`` head site, METHODS RQ4). :class:`Patcher` evaluates many conditions on one prompt set:

* ``engine="naive"``: one ``run_with_hooks`` over the whole left-padded prompt batch per condition,
  as ``transformer_lens.patching`` does; the honest baseline;
* ``engine="fast"``: only recomputes what a patch can change (below).

Both return the same numbers to float tolerance; ``tests/test_patching.py`` checks it.

**The fast engine.** Under causal attention a patch at layer L, position p changes nothing below L
and nothing before p, and tokens after p cannot reach the logits at p. So, per batch of prompts
(sorted by decision position, each truncated at it and left-padded so that p is the last column; a
batch holds as many prompts as fit in the token slots of one naive batch, ``batch_size`` × the widest
prompt, and at least ``batch_size``):

1. one clean ``run_with_hooks`` of the target with capture hooks only: the clean decision logits
   (HF ``logits_to_keep=1``: only the decision column is unembedded), the clean values at p of the
   hooks the conditions need (``resid_pre``/``resid_mid``/``attn_out``/``z``/``mlp_out``/
   ``resid_post``), and the post-RoPE keys and the values of the prefix positions (< p) for every
   layer a condition recomputes;
2. every condition becomes "the residual stream at p, entering layer L's attention or MLP half",
   computed from clean values (``blend``: ``(1−α)h + α·src``; ``scale``: ``α·src``; head sites:
   ``resid_mid + Σ_{h∈S} (new_h − z_h·W_O[h])``, with ``new_h − z_h·W_O[h] = (new_z_h − z_h)·W_O[h]`` at
   the ``z`` site; Llama has no ``b_O``, and a bias would cancel in these differences anyway).
   Conditions with the same entry point are stacked as rows (condition × prompt), whatever their layer
   and hook (``resid_post`` at L and ``resid_pre`` at L+1 share one);
3. the remaining layers run on those one-position rows against the frozen prefix keys/values,
   broadcast over conditions (conditions ride along the query axis of one batched matmul; nothing is
   copied per row), then the final norm and the unembedding (of the shared-vocabulary rows of ``W_U``
   only, when they are a contiguous range), in chunks of rows (``max_rows``, :meth:`Patcher.chunk_rows`).

A row whose patched residual is bit-for-bit the clean one (a self-patch, or a cross-patch below the
first layer where the models differ) gets exactly the clean logits, so KL is exactly 0 as with hooks;
the clean pass adds one masked pad column so that its values equal, bit for bit, those of padded
batches in the naive engine and in :func:`mdiff.activations.collect` (a batch without padding takes
another attention-mask path whose values differ in the last bits).

Step 3 drives the model's own weight tensors and norm/activation modules directly (no hooks: the
patched value is set by construction), for Llama-style decoder layers (Llama, Mistral and Qwen2
without sliding windows; raw mode). Other architectures fall back to the naive engine
(:attr:`Patcher.engine_used` and :attr:`Patcher.fallback_reason` say so); a model carrying persistent
hooks is refused (the fast path could not honour them).
"""

import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mdiff import hooks as H
from mdiff.align import kl_divergence, restrict_logprobs
from mdiff.data import pad_left
from mdiff.errors import MdiffError

ENGINES = ("fast", "naive")
SITE_HOOKS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
HEAD_SITES = ("result", "z")
FAST_DECODER_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
"""HF decoder layers the fast engine recomputes itself (pre-norm, RoPE, GQA, gated MLP)."""


@dataclass(frozen=True, eq=False)
class SitePatch:
    """Replace ``hook`` at ``layer`` at each prompt's decision position with ``source[prompt]``.

    ``blend``: ``h ← (1 − α)·h + α·source``; ``scale``: ``h ← α·source``.
    """

    layer: int
    hook: str
    source: Float[Tensor, "prompt d_model"]
    alpha: float = 1.0
    mode: str = "blend"


@dataclass(frozen=True, eq=False)
class HeadPatch:
    """Patch query ``heads`` at ``layer`` at each prompt's decision position.

    ``site="result"``: ``source`` is ``[prompt, head, d_model]``, each head's whole contribution
    ``z_h @ W_O_source[h]`` (build it with :func:`mdiff.hooks.head_results` and the *source* model's
    ``W_O``); it replaces the target head's ``z_h @ W_O_target[h]``.
    ``site="z"``: ``source`` is ``[prompt, head, d_head]``; it replaces ``z_h``, which then goes
    through the *target's* ``W_O``. ``source`` holds every head; only ``heads`` are used.
    """

    layer: int
    heads: tuple[int, ...]
    site: str
    source: Tensor
    alpha: float = 1.0
    mode: str = "blend"


Condition = SitePatch | HeadPatch


def _batches(n: int, batch_size: int):
    for s in range(0, n, batch_size):
        yield s, min(n, s + batch_size)


def _decision_columns(ids, positions, width) -> Tensor:
    return torch.tensor([width - len(x) + p[-1] for x, p in zip(ids, positions, strict=True)])


def _device(model) -> torch.device:
    return next(model.parameters()).device


def decision_logits(model, ids: list[list[int]], positions: list[list[int]], pad_id: int,
                    fwd_hooks_for_batch=None, batch_size: int = 32) -> Float[Tensor, "batch d_vocab"]:
    """Logits at each prompt's decision position (its last chosen position), optionally under patch hooks.

    ``fwd_hooks_for_batch(start, end, pos)`` returns the hooks for prompts ``start:end`` given the padded
    decision positions ``pos`` ``[batch]``.
    """
    dev = _device(model)
    outs = []
    with torch.no_grad():
        for s, e in _batches(len(ids), batch_size):
            inp, mask = pad_left(ids[s:e], pad_id)
            pos = _decision_columns(ids[s:e], positions[s:e], inp.shape[1]).to(dev)
            hooks = fwd_hooks_for_batch(s, e, pos) if fwd_hooks_for_batch else []
            logits = model.run_with_hooks(inp.to(dev), attention_mask=mask.to(dev), fwd_hooks=hooks)
            outs.append(logits[torch.arange(e - s), pos].float().cpu())
    return torch.cat(outs)


def condition_hooks(model, cond: Condition, start: int, end: int, pos: Tensor) -> list[tuple[str, H.HookFn]]:
    """The TransformerLens hooks that apply ``cond`` to prompts ``start:end`` at padded positions ``pos``."""
    n_layers = model.cfg.n_layers
    if isinstance(cond, SitePatch):
        make = H.replace_hook if cond.mode == "blend" else H.scale_hook
        return [(H.hook_name(cond.hook, cond.layer, n_layers), make(cond.source[start:end], positions=pos,
                                                                    alpha=cond.alpha))]
    if cond.site == "z":
        return [(H.hook_name("z", cond.layer, n_layers),
                 H.head_z_hook(cond.source[start:end], cond.heads, positions=pos, alpha=cond.alpha, mode=cond.mode))]
    return H.head_result_patch(cond.layer, cond.source[start:end], cond.heads,
                               W_O_target=model.blocks[cond.layer].attn.W_O, positions=pos, alpha=cond.alpha,
                               mode=cond.mode, n_layers=n_layers)


def check_condition(cond: Condition, n_prompts: int, n_layers: int, n_heads: int,
                    d_model: int | None = None, d_head: int | None = None) -> None:
    """Raise :class:`MdiffError` naming what is wrong with ``cond`` (layer, hook, heads, α, source shape)."""
    if not isinstance(cond, (SitePatch, HeadPatch)):
        raise MdiffError(f"a condition must be a SitePatch or a HeadPatch, got {type(cond).__name__}")
    if isinstance(cond.layer, bool) or not isinstance(cond.layer, (int, np.integer)):
        raise MdiffError(f"layer must be a whole number, got {cond.layer!r}")
    if not 0 <= cond.layer < n_layers:
        raise MdiffError(f"layer {cond.layer} is outside the model's layers 0..{n_layers - 1}")
    if cond.mode not in H.MODES:
        raise MdiffError(f"α mode {cond.mode!r} is not one of {', '.join(H.MODES)}")
    if isinstance(cond.alpha, bool) or not isinstance(cond.alpha, (int, float, np.number)) \
            or not np.isfinite(float(cond.alpha)):
        raise MdiffError(f"α must be a finite number, got {cond.alpha!r}")
    if not isinstance(cond.source, Tensor) or not cond.source.dtype.is_floating_point:
        raise MdiffError(f"source must be a floating-point torch.Tensor, got {type(cond.source).__name__}"
                         + (f" of dtype {cond.source.dtype}" if isinstance(cond.source, Tensor) else ""))
    if cond.source.ndim == 0 or len(cond.source) != n_prompts:
        rows = len(cond.source) if cond.source.ndim else 0
        raise MdiffError(f"source has {rows} rows but there are {n_prompts} prompts (one row each)")
    if isinstance(cond, SitePatch):
        if cond.hook not in SITE_HOOKS:
            raise MdiffError(f"hook {cond.hook!r} is not a site hook; use one of {', '.join(SITE_HOOKS)}")
        if cond.source.ndim != 2 or (d_model is not None and cond.source.shape[1] != d_model):
            raise MdiffError(f"a {cond.hook} source must be [prompt, d_model={d_model}], got "
                             f"{tuple(cond.source.shape)}")
    else:
        if cond.site not in HEAD_SITES:
            raise MdiffError(f"head site {cond.site!r} is not one of {', '.join(HEAD_SITES)}")
        H.check_heads(list(cond.heads), n_heads)
        if cond.source.ndim != 3 or cond.source.shape[1] != n_heads:
            raise MdiffError(f"head source must be [prompt, head={n_heads}, ...], got {tuple(cond.source.shape)}")
        width = d_model if cond.site == "result" else d_head
        if width is not None and cond.source.shape[2] != width:
            what = "d_model" if cond.site == "result" else "d_head"
            raise MdiffError(f"a {cond.site}-site source must be [prompt, head, {what}={width}], got "
                             f"{tuple(cond.source.shape)}")


# ------------------------------------------------------------------------------------------------
# Fast engine: the model's decoder layers as plain tensors
# ------------------------------------------------------------------------------------------------


def _inner(module):
    """The HF module a bridge component wraps (the module itself when it wraps nothing)."""
    inner = getattr(module, "original_component", None)
    return module if inner is None else inner


def _linear(module) -> tuple[Tensor, Tensor | None]:
    lin = _inner(module)
    return lin.weight, getattr(lin, "bias", None)


@dataclass
class _LayerWeights:
    ln1: Any
    ln2: Any
    q: tuple[Tensor, Tensor | None]
    k: tuple[Tensor, Tensor | None]
    v: tuple[Tensor, Tensor | None]
    o: tuple[Tensor, Tensor | None]
    gate: tuple[Tensor, Tensor | None]
    up: tuple[Tensor, Tensor | None]
    down: tuple[Tensor, Tensor | None]
    act: Any
    n_heads: int
    n_kv: int
    d_head: int
    scaling: float


@dataclass
class _Kernel:
    layers: list[_LayerWeights]
    norm: Any
    unembed: tuple[Tensor, Tensor | None]


def fast_support(model) -> str | None:
    """``None`` when the fast engine can recompute this model's layers itself, else the reason why not."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not len(blocks):
        return "the model has no TransformerBridge 'blocks' stack"
    # a model split over several devices (device_map / n_devices): the fast engine keeps one device
    n_dev = int(getattr(getattr(model, "cfg", None), "n_devices", None) or 1)
    dmap = getattr(getattr(model, "original_model", None), "hf_device_map", None) or {}
    n_dev = max(n_dev, len({str(d) for d in dmap.values()}))
    if n_dev > 1:
        return f"the model is split over {n_dev} devices; the fast engine runs on one device only"
    if getattr(model, "compatibility_mode", False):
        return "compatibility mode (folded/centred weights) is not supported by the fast engine; use raw mode"
    hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
    if hf_cfg is not None:
        if getattr(hf_cfg, "sliding_window", None) is not None and getattr(hf_cfg, "use_sliding_window", True):
            return "sliding-window attention is not supported by the fast engine"
        if getattr(hf_cfg, "attn_logit_softcapping", None) or getattr(hf_cfg, "final_logit_softcapping", None):
            return "logit soft-capping is not supported by the fast engine"
        rope = getattr(hf_cfg, "rope_parameters", None)
        if isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None:
            return "llama-4 query scaling is not supported by the fast engine"
        if float(getattr(hf_cfg, "partial_rotary_factor", None) or 1.0) != 1.0:
            return "partial rotary embeddings are not supported by the fast engine"
    for b in blocks:
        layer = getattr(b, "original_component", None)
        name = type(layer).__name__
        if name not in FAST_DECODER_LAYERS:
            return f"decoder layer {name} is not one of {', '.join(FAST_DECODER_LAYERS)}"
        attn = _inner(getattr(b, "attn", None))
        mlp = _inner(getattr(b, "mlp", None))
        if any(getattr(attn, n, None) is None for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return f"{name}: attention without q/k/v/o projections"
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            return f"{name}: QK-norm is not supported by the fast engine"
        if any(getattr(mlp, n, None) is None for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return f"{name}: MLP is not a gated MLP"
    for hook in ("hook_rot_k", "hook_v", "hook_cos", "hook_sin"):
        if f"blocks.0.attn.{hook}" not in model.hook_dict:
            return f"the bridge has no blocks.L.attn.{hook} hook"
    for part in ("ln_final", "unembed"):
        if getattr(model, part, None) is None:
            return f"the bridge has no {part}"
    return None


def _kernel(model) -> _Kernel:
    layers = []
    for b in model.blocks:
        attn, mlp = _inner(b.attn), _inner(b.mlp)
        n_heads = int(model.cfg.n_heads)
        n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or n_heads)
        d_head = int(getattr(attn, "head_dim", None) or model.cfg.d_head)
        layers.append(_LayerWeights(
            ln1=_inner(b.ln1), ln2=_inner(b.ln2), q=_linear(attn.q_proj), k=_linear(attn.k_proj),
            v=_linear(attn.v_proj), o=_linear(attn.o_proj), gate=_linear(mlp.gate_proj), up=_linear(mlp.up_proj),
            down=_linear(mlp.down_proj), act=mlp.act_fn, n_heads=n_heads, n_kv=n_kv, d_head=d_head,
            scaling=float(getattr(attn, "scaling", d_head ** -0.5))))
    return _Kernel(layers=layers, norm=_inner(model.ln_final), unembed=_linear(model.unembed))


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention_rows(w: _LayerWeights, x: Tensor, K: Tensor, V: Tensor, mask_add: Tensor, cos: Tensor,
                    sin: Tensor) -> Tensor:
    """Attention output at the decision position for rows ``x`` ``[cond, batch, d_model]`` (normed input).

    ``K``/``V`` ``[batch, kv_head, T, d_head]`` are the clean prefix keys (post-RoPE) and values;
    ``mask_add`` ``[batch, 1, 1, T]`` is 0 for real and ``finfo.min`` for pad columns; ``cos``/``sin``
    ``[batch, d_head]`` are the rotary tables at the decision position. The prefix is broadcast over
    conditions (conditions ride along the query axis of one batched matmul), never copied per row.
    """
    C, B, _ = x.shape
    Hq, Hk, dh = w.n_heads, w.n_kv, w.d_head
    G = Hq // Hk
    q = F.linear(x, *w.q).view(C, B, Hq, dh)
    k = F.linear(x, *w.k).view(C, B, Hk, dh)
    v = F.linear(x, *w.v).view(C, B, Hk, dh)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    q5 = q.view(C, B, Hk, G, dh).permute(1, 2, 0, 3, 4)                       # [B, Hk, C, G, dh]
    qg = q5.reshape(B, Hk, C * G, dh)
    scores = torch.matmul(qg, K.transpose(-1, -2)) * w.scaling + mask_add       # [B, Hk, C·G, T]
    own = (q5 * k.permute(1, 2, 0, 3).unsqueeze(3)).sum(-1) * w.scaling         # [B, Hk, C, G]
    probs = torch.softmax(torch.cat([scores, own.reshape(B, Hk, C * G, 1)], dim=-1), dim=-1,
                          dtype=torch.float32).to(x.dtype)
    out = torch.matmul(probs[..., :-1], V).view(B, Hk, C, G, dh)
    out = out + probs[..., -1:].view(B, Hk, C, G, 1) * v.permute(1, 2, 0, 3).unsqueeze(3)
    return F.linear(out.permute(2, 0, 1, 3, 4).reshape(C, B, Hq * dh), *w.o)


def _mlp_rows(w: _LayerWeights, x: Tensor) -> Tensor:
    return F.linear(w.act(F.linear(x, *w.gate)) * F.linear(x, *w.up), *w.down)


# entry point of a condition: (first layer recomputed, "attn" = whole layer | "mlp" = MLP half only)
Entry = tuple[int, str]


def _entry(cond: Condition) -> Entry:
    if isinstance(cond, HeadPatch) or cond.hook == "attn_out":
        return cond.layer, "mlp"
    if cond.hook == "resid_pre":
        return cond.layer, "attn"
    return cond.layer + 1, "attn"  # resid_post, mlp_out: the residual leaving layer L


def _clean_values(cond: Condition) -> list[tuple[str, int]]:
    """The clean (hook, layer) values at the decision position that ``cond``'s patched residual needs."""
    L = cond.layer
    if isinstance(cond, HeadPatch):
        return [("resid_mid", L), ("z", L)]
    return {"resid_pre": [("resid_pre", L)], "resid_post": [("resid_post", L)],
            "attn_out": [("resid_pre", L), ("attn_out", L)], "mlp_out": [("resid_mid", L), ("mlp_out", L)]}[cond.hook]


def _entry_clean(entry: Entry, n_layers: int) -> tuple[str, int]:
    """The clean residual at an entry point: what a no-op patch would hand to the remaining layers."""
    start, phase = entry
    if phase == "mlp":
        return "resid_mid", start
    return ("resid_pre", start) if start < n_layers else ("resid_post", n_layers - 1)


_CLEAN_HOOK = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "attn_out": "hook_attn_out",
               "mlp_out": "hook_mlp_out", "resid_post": "hook_resid_post", "z": "attn.hook_z"}


def _grab_last(act: Tensor, hook: Any, *, store: dict, key: Any) -> None:
    store[key] = act[:, -1].detach().clone()
    return None


def _grab_prefix(act: Tensor, hook: Any, *, store: dict, key: Any) -> None:
    # [batch, pos, kv_head, d_head] -> the prefix (every column but the decision one) as [batch, kv_head, T, d_head]
    store[key] = act[:, :-1].detach().transpose(1, 2).contiguous()
    return None


def _has_persistent_hooks(model) -> bool:
    for hp in model.hook_dict.values():
        if hp._forward_hooks or hp._forward_pre_hooks or getattr(hp, "fwd_hooks", None):
            return True
    return False


def _tiles(n_c: int, n_b: int, rows: int):
    """``(c0, c1, b0, b1)`` tiles of a ``n_c × n_b`` row grid with at most ``rows`` rows each (≥ 1 row)."""
    pb = max(1, min(n_b, rows))
    pc = max(1, rows // pb)
    for b0 in range(0, n_b, pb):
        for c0 in range(0, n_c, pc):
            yield c0, min(n_c, c0 + pc), b0, min(n_b, b0 + pb)


@dataclass
class _Run:
    """Consecutive conditions of one entry group whose patched residuals are built the same way.

    Site runs (one hook at one layer): ``new = a·source + b·clean`` (+ the clean residual the hook adds to).
    Head runs (one head site, layer, source tensor and α, mode): ``resid_mid + Σ_h M[c, h]·(a·src_h − b·own_h)``
    with the membership matrix ``M`` ``[k, head]``; ``a·src − b·own`` is formed first, so a patch that writes
    the clean value back gives exactly ``resid_mid``, as the hooks do.
    """

    kind: str
    layer: int
    hook: str
    sources: list[Tensor]
    a: Tensor
    b: Tensor | None
    members: Tensor | None
    start: int
    stop: int


def _compile_runs(conds: Sequence[Condition], n_heads: int, dtype, device) -> list[_Run]:
    runs: list[_Run] = []
    i = 0
    while i < len(conds):
        c0 = conds[i]
        key = _run_key(c0)
        j = i + 1
        while j < len(conds) and _run_key(conds[j]) == key:
            j += 1
        cs = conds[i:j]
        alpha = torch.tensor([float(c.alpha) for c in cs], dtype=dtype, device=device)
        if isinstance(c0, SitePatch):
            clean_w = torch.tensor([1.0 - float(c.alpha) if c.mode == "blend" else 0.0 for c in cs], dtype=dtype,
                                   device=device)
            runs.append(_Run("site", c0.layer, c0.hook, [c.source for c in cs], alpha,
                             clean_w if bool((clean_w != 0).any()) else None, None, i, j))
        else:
            own_w = torch.tensor([float(c0.alpha) if c0.mode == "blend" else 1.0], dtype=dtype, device=device)
            M = torch.zeros(len(cs), n_heads, dtype=dtype, device=device)
            for r, c in enumerate(cs):
                M[r, list(c.heads)] = 1.0
            runs.append(_Run("head", c0.layer, c0.site, [c0.source], alpha[:1], own_w, M, i, j))
        i = j
    return runs


def _run_key(c: Condition) -> tuple:
    if isinstance(c, SitePatch):
        return "site", c.layer, c.hook
    return "head", c.layer, c.site, id(c.source), float(c.alpha), c.mode


class Patcher:
    """Evaluate patch conditions on one prompt set of one (target) model.

    ``ids``/``positions``/``pad_id`` are the target's tokenized prompts, chosen positions (the last one
    is the decision position) and pad id. The clean decision logits are computed once.

    ``engine="fast"`` (default) recomputes only the decision position from the patched layer up (see the
    module docstring); ``engine="naive"`` runs one full forward per condition and prompt batch.
    ``batch_size`` is the number of prompts per forward in both engines. ``max_rows`` bounds how many
    (condition, prompt) rows the fast engine recomputes at once; ``None`` sizes its chunks from the memory
    of one naive batch forward (:meth:`chunk_rows`).
    """

    def __init__(self, model, ids: list[list[int]], positions: list[list[int]], pad_id: int,
                 batch_size: int = 32, engine: str = "fast", max_rows: int | None = None):
        if engine not in ENGINES:
            raise MdiffError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
        if not ids:
            raise MdiffError("no prompts to patch (the prompt set is empty after filtering)")
        if len(positions) != len(ids):
            raise MdiffError(f"{len(ids)} prompts but {len(positions)} position lists; give one per prompt")
        for i, (x, p) in enumerate(zip(ids, positions, strict=True)):
            if not p or not 0 <= p[-1] < len(x):
                raise MdiffError(f"prompt {i}: decision position {p[-1] if p else None} is not inside its "
                                 f"{len(x)} tokens")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise MdiffError(f"batch_size must be a whole number ≥ 1, got {batch_size!r}")
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
            raise MdiffError(f"max_rows must be a whole number ≥ 1 or None, got {max_rows!r}")
        self.model, self.ids, self.positions, self.pad_id = model, ids, positions, pad_id
        self.batch_size, self.engine, self.max_rows = batch_size, engine, max_rows
        self._clean: Tensor | None = None
        self.fallback_reason: str | None = fast_support(model) if engine == "fast" else None
        self._kern: _Kernel | None = None

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def engine_used(self) -> str:
        """``"fast"`` or ``"naive"`` (the fast engine falls back on an unsupported architecture)."""
        return "fast" if self.engine == "fast" and self.fallback_reason is None else "naive"

    @property
    def clean(self) -> Float[Tensor, "prompt d_vocab"]:
        if self._clean is None:
            if self.engine_used == "fast":
                self._fast([], want_logits=False, vocab_ids=None)
            else:
                self._clean = decision_logits(self.model, self.ids, self.positions, self.pad_id,
                                              batch_size=self.batch_size)
        return self._clean

    def capture(self, sites: Sequence[tuple[str, int]]) -> dict[tuple[str, int], Tensor]:
        """The target's own clean values at each prompt's decision position, ``{(hook, layer): [prompt, ...]}``.

        ``hook`` is a site hook (:data:`SITE_HOOKS`) or ``"z"`` (``[prompt, head, d_head]``). The values are
        computed with this engine's own batching and padding, so patching them back is a bit-for-bit no-op
        in any dtype: a self-patch built from them gives KL exactly 0 (values read from an activation store,
        batched otherwise, differ from these in their last bits in bf16; :meth:`noise_floor` measures how
        much that is worth).
        """
        cfg = self.model.cfg
        keys = list(dict.fromkeys((str(h), int(L)) for h, L in sites))
        for h, L in keys:
            if h not in (*SITE_HOOKS, "z"):
                raise MdiffError(f"cannot capture {h!r}: use one of {', '.join((*SITE_HOOKS, 'z'))}")
            if not 0 <= L < cfg.n_layers:
                raise MdiffError(f"layer {L} is outside the model's layers 0..{cfg.n_layers - 1}")
        out: dict[tuple[str, int], Tensor] = {}
        clean_all = torch.empty(self.n, cfg.d_vocab)
        dev = _device(self.model)

        def put(key, rows, value):
            if key not in out:
                out[key] = torch.empty((self.n, *value.shape[1:]), dtype=value.dtype)
            out[key][rows] = value.cpu()

        with torch.no_grad():
            if self.engine_used == "fast":
                for idx in self._fast_batches():
                    caps, clean, _ = self._clean_pass(idx, keys, [])
                    clean_all[idx] = clean.float().cpu()
                    for k in keys:
                        put(k, torch.tensor(idx), caps[k])
            else:
                for s, e in _batches(self.n, self.batch_size):
                    inp, mask = pad_left(self.ids[s:e], self.pad_id)
                    pos = _decision_columns(self.ids[s:e], self.positions[s:e], inp.shape[1]).to(dev)
                    store: dict[Any, Tensor] = {}
                    hooks = [(H.hook_name(h, L, cfg.n_layers), H.capture_hook(store, (h, L), positions=pos))
                             for h, L in keys]
                    logits = self.model.run_with_hooks(inp.to(dev), attention_mask=mask.to(dev), fwd_hooks=hooks)
                    clean_all[s:e] = logits[torch.arange(e - s), pos].float().cpu()
                    for k in keys:
                        put(k, slice(s, e), store[k])
        if self._clean is None:
            self._clean = clean_all
        return out

    def rounding_conditions(self, own: dict[tuple[str, int], Tensor], seed: int = 0) -> list[Condition]:
        """One condition per captured site: the target's own value with **one rounding error** added.

        Each element is multiplied by ``1 + δ``, ``δ`` uniform in ``[−u, u]`` with ``u`` the unit round-off of
        the model's dtype (half its machine epsilon), then rounded to that dtype: the size of error a single
        operation in this dtype makes. The KL such a patch causes is what arithmetic alone is worth at that site
        (:mod:`mdiff.noise`). ``z`` sites become a :class:`HeadPatch` of every head at the ``z`` site.
        """
        dtype = next(self.model.parameters()).dtype
        u = torch.finfo(dtype).eps / 2
        conds: list[Condition] = []
        for (h, L), v in own.items():
            # one generator per site, seeded from (seed, site): a site's error does not depend on which other
            # sites are measured in the same call (a study patching layers in chunks gets the same floor)
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + zlib.crc32(f"{h}.{L}".encode()))
            noise = (2 * torch.rand(v.shape, generator=g, dtype=torch.float64) - 1) * u
            pert = (v.double() * (1 + noise)).to(dtype)
            if h == "z":
                conds.append(HeadPatch(L, tuple(range(v.shape[1])), "z", pert))
            else:
                conds.append(SitePatch(L, h, pert))
        return conds

    def kl_with_noise_floor(self, conds: Sequence[Condition], vocab_ids: Sequence[int] | np.ndarray,
                            sites: Sequence[tuple[str, int]] = (), seed: int = 0,
                            own: dict[tuple[str, int], Tensor] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`kl` of ``conds`` and, in the same engine call, the noise floor: the per-prompt KL of one
        rounding error at each site (:meth:`rounding_conditions`) — ``([cond, prompt], [site, prompt])``.

        ``own``: the sites' clean values when the caller already has them (:meth:`capture`), else captured here.
        """
        rounding = self.rounding_conditions(self.capture(sites) if own is None else own, seed)
        kls = self.kl([*conds, *rounding], vocab_ids)
        return kls[:len(conds)], kls[len(conds):]

    def noise_floor(self, vocab_ids: Sequence[int] | np.ndarray, sites: Sequence[tuple[str, int]],
                    seed: int = 0) -> np.ndarray:
        """Per-prompt KL of one rounding error at each site (:meth:`rounding_conditions`): ``[site, prompt]``."""
        return self.kl_with_noise_floor([], vocab_ids, sites, seed)[1]

    def _check(self, conds: Sequence[Condition]) -> None:
        cfg = self.model.cfg
        for c in conds:
            check_condition(c, self.n, cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head)

    def logits(self, conds: Sequence[Condition]) -> Float[Tensor, "cond prompt d_vocab"]:
        """Decision logits under each condition."""
        self._check(conds)
        if self.engine_used == "fast":
            return self._fast(conds, want_logits=True, vocab_ids=None)[0]
        out = []
        for c in conds:
            out.append(decision_logits(self.model, self.ids, self.positions, self.pad_id,
                                       lambda s, e, pos, c=c: condition_hooks(self.model, c, s, e, pos),
                                       self.batch_size))
        return torch.stack(out) if out else torch.empty(0, self.n, 0)

    def kl(self, conds: Sequence[Condition], vocab_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Per-prompt ``KL(P_clean ‖ P_patched)`` over ``vocab_ids``: ``[cond, prompt]``."""
        if self.engine_used == "fast":
            self._check(conds)
            return self._fast(conds, want_logits=False, vocab_ids=vocab_ids)[1]
        self._check(conds)
        clean = restrict_logprobs(self.clean, vocab_ids)
        rows = []
        for c in conds:  # one condition's logits at a time: the naive loop's metric, as transformer_lens.patching
            lg = decision_logits(self.model, self.ids, self.positions, self.pad_id,
                                 lambda s, e, pos, c=c: condition_hooks(self.model, c, s, e, pos), self.batch_size)
            rows.append(kl_divergence(clean, restrict_logprobs(lg, vocab_ids)).numpy())
        return np.stack(rows) if rows else np.empty((0, self.n))

    # -------------------------------------------------------------------------------- fast engine
    def chunk_rows(self, n_vocab: int | None = None) -> tuple[int, int]:
        """``(layer_rows, vocab_rows)``: rows recomputed through the layers, and unembedded, at once.

        ``max_rows`` for both when given. Otherwise both are sized so that a chunk's transient memory fits
        in what one naive batch forward holds (``batch_size`` prompts at the widest naive batch's width, each
        token with its ``d_vocab`` logits and attention scores): a layer row holds a few ``d_model``/``d_mlp``
        vectors and its scores against the prefix; a vocabulary row its logits, their log-softmax and the
        float64 log-softmax and KL terms (about ``48`` bytes per shared-vocabulary id).
        """
        if self.max_rows is not None:
            return self.max_rows, self.max_rows
        cfg = self.model.cfg
        es = torch.empty(0, dtype=next(self.model.parameters()).dtype).element_size()
        width = max(max(len(x) for x in self.ids[s:e]) for s, e in _batches(self.n, self.batch_size))
        batch = min(self.batch_size, self.n)
        kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        naive_token = cfg.d_vocab * es + max(12 * cfg.n_heads * width, 5 * cfg.d_mlp * es) + 10 * cfg.d_model * es
        budget = batch * width * naive_token
        layer_row = es * (10 * cfg.d_model + 4 * (cfg.n_heads + 2 * kv) * cfg.d_head + 5 * cfg.d_mlp) \
            + 16 * cfg.n_heads * (width + 1)
        vocab_row = cfg.d_vocab * es + 48 * (n_vocab or cfg.d_vocab)
        return max(1, budget // layer_row), max(1, budget // vocab_row)

    def _fast(self, conds: Sequence[Condition], want_logits: bool,
              vocab_ids) -> tuple[Tensor | None, np.ndarray | None]:
        model = self.model
        if _has_persistent_hooks(model):
            raise MdiffError("the fast patching engine cannot see hooks left registered on the model; remove "
                             "them (model.reset_hooks()) or use engine='naive'")
        if self._kern is None:
            self._kern = _kernel(model)
        kern, dev = self._kern, _device(model)
        dtype = next(model.parameters()).dtype
        cfg = model.cfg
        groups: dict[Entry, list[int]] = defaultdict(list)
        for ci, c in enumerate(conds):
            groups[_entry(c)].append(ci)
        plans = []
        # order within a group by content, never by memory address (id(source) differs between processes, and
        # another order chunks rows differently: results would then differ in the last bits from run to run)
        first_use: dict[int, int] = {}
        for ci, c in enumerate(conds):
            first_use.setdefault(id(c.source), ci)

        def order(i: int) -> tuple:
            k = _run_key(conds[i])
            return (k[:3], (first_use[k[3]], *k[4:]) if k[0] == "head" else (), i)

        for ent in sorted(groups):
            cis = sorted(groups[ent], key=order)
            plans.append((ent, cis, _compile_runs([conds[i] for i in cis], cfg.n_heads, dtype, dev)))
        entry_clean = {ent: _entry_clean(ent, cfg.n_layers) for ent in groups}
        needed = sorted({v for c in conds for v in _clean_values(c)} | set(entry_clean.values()),
                        key=lambda t: (t[1], t[0]))
        kv_layers = sorted({L for (s, ph) in groups for L in range(s + (ph == "mlp"), cfg.n_layers)})
        vocab = None if vocab_ids is None else torch.as_tensor(np.asarray(vocab_ids), device=dev)
        layer_rows, vocab_rows = self.chunk_rows(None if vocab is None else len(vocab))
        out_logits = torch.empty(len(conds), self.n, cfg.d_vocab) if want_logits else None
        out_kl = np.empty((len(conds), self.n)) if vocab is not None else None
        clean_all = torch.empty(self.n, cfg.d_vocab) if self._clean is None else None
        W_O = {L: model.blocks[L].attn.W_O.detach().to(dtype) for L in {c.layer for c in conds
                                                                        if isinstance(c, HeadPatch)}}
        # the shared vocabulary is usually a prefix (or a contiguous range) of the target's: unembed only it
        vocab_slice = vocab is not None and len(vocab) > 0 and bool(
            (vocab == torch.arange(int(vocab[0]), int(vocab[0]) + len(vocab), device=dev)).all())
        w_u, b_u = kern.unembed
        if vocab_slice:
            lo, hi = int(vocab[0]), int(vocab[0]) + len(vocab)
            unembed_kl = (w_u[lo:hi], None if b_u is None else b_u[lo:hi])
        else:
            unembed_kl = kern.unembed
        with torch.no_grad():
            for idx in self._fast_batches():
                caps, clean, mask_add = self._clean_pass(idx, needed, kv_layers)
                if clean_all is not None:
                    clean_all[idx] = clean.float().cpu()
                if not conds:
                    continue
                if vocab is not None:
                    clean_lp = restrict_logprobs(clean, vocab)
                    clean_p = clean_lp.exp()
                    clean_ent = (clean_p * clean_lp).sum(-1)  # Σ p·log p, per prompt
                pidx = torch.tensor(idx, device=dev)
                batch_src: dict[Any, Tensor] = {}
                for (start, phase), cis, runs in plans:
                    for c0, c1, b0, b1 in _tiles(len(cis), len(idx), layer_rows):
                        h = self._entries(runs, c0, c1, b0, b1, caps, pidx, batch_src, W_O, dtype)
                        # a row whose patched residual is bitwise the clean one is the clean run: exactly
                        # the clean logits (KL 0), as with hooks, not float noise from another code path
                        noop = (h == caps[entry_clean[(start, phase)]][b0:b1]).all(-1)
                        h = kern.norm(self._resume(kern, h, start, phase, caps, mask_add, b0, b1))
                        for v0, v1, u0, u1 in _tiles(c1 - c0, b1 - b0, vocab_rows):
                            rows_c = cis[c0 + v0:c0 + v1]
                            cols = idx[b0 + u0:b0 + u1]
                            hv = h[v0:v1, u0:u1]
                            same = noop[v0:v1, u0:u1]
                            if out_logits is not None:
                                lg = F.linear(hv, *kern.unembed)
                                lg = torch.where(same[..., None], clean[b0 + u0:b0 + u1].unsqueeze(0), lg)
                                out_logits[torch.tensor(rows_c)[:, None], torch.tensor(cols)[None, :]] = \
                                    lg.float().cpu()
                            if out_kl is not None:
                                x = F.linear(hv, *unembed_kl)
                                logq = torch.log_softmax((x if vocab_slice else x.index_select(-1, vocab)).double(), -1)
                                # KL = Σ p·log p − Σ p·log q in float64 (as align.kl_divergence), one contraction
                                cross = torch.einsum("cbv,bv->cb", logq, clean_p[b0 + u0:b0 + u1])
                                kl = (clean_ent[b0 + u0:b0 + u1] - cross).masked_fill(same, 0.0)
                                out_kl[np.ix_(rows_c, cols)] = kl.cpu().numpy()
        if clean_all is not None:
            self._clean = clean_all
        return out_logits, out_kl

    def _fast_batches(self) -> list[list[int]]:
        """Prompt batches of the fast engine: sorted by decision position (little padding) and sized by tokens.

        A naive batch forward holds ``batch_size`` prompts at the widest naive batch's width; the fast engine's
        clean pass runs prompts truncated at their decision positions, so a batch takes as many of them as fit
        in the same number of token slots (``batch_size × width``), never fewer than ``batch_size``.
        """
        budget = self.batch_size * max(max(len(x) for x in self.ids[s:e]) for s, e in _batches(self.n, self.batch_size))
        order = sorted(range(self.n), key=lambda i: (self.positions[i][-1], i))
        batches, cur = [], []
        for i in order:
            width = self.positions[i][-1] + 1
            if cur and len(cur) >= self.batch_size and (len(cur) + 1) * width > budget:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    def _clean_pass(self, idx: list[int], needed: list[tuple[str, int]], kv_layers: list[int]):
        """One clean forward of prompts ``idx``, truncated at their decision positions, with capture hooks.

        Returns the captures, the clean decision logits ``[batch, d_vocab]`` and the additive pad mask of the
        prefix ``[batch, 1, 1, T]``.
        """
        model = self.model
        dev = _device(model)
        ids = [self.ids[i][: self.positions[i][-1] + 1] for i in idx]
        inp, mask = pad_left(ids, self.pad_id)
        # one more (masked) pad column: a batch with no padding takes another attention-mask path whose
        # values differ from padded batches' in the last bits; with it, the clean values equal, bit for bit,
        # those of the naive engine's (and the activation collection's) padded batches
        inp = torch.cat([torch.full((len(ids), 1), int(self.pad_id), dtype=inp.dtype), inp], dim=1)
        mask = torch.cat([torch.zeros((len(ids), 1), dtype=mask.dtype), mask], dim=1)
        store: dict[Any, Tensor] = {}
        hooks = [(f"blocks.{L}.{_CLEAN_HOOK[h]}", H.bind(_grab_last, store=store, key=(h, L))) for h, L in needed]
        for L in kv_layers:
            hooks.append((f"blocks.{L}.attn.hook_rot_k", H.bind(_grab_prefix, store=store, key=("k", L))))
            hooks.append((f"blocks.{L}.attn.hook_v", H.bind(_grab_prefix, store=store, key=("v", L))))
        if kv_layers:
            hooks.append((f"blocks.{kv_layers[0]}.attn.hook_cos", H.bind(_grab_last, store=store, key="cos")))
            hooks.append((f"blocks.{kv_layers[0]}.attn.hook_sin", H.bind(_grab_last, store=store, key="sin")))
        logits = model.run_with_hooks(inp.to(dev), attention_mask=mask.to(dev), fwd_hooks=hooks, logits_to_keep=1)
        dtype = next(model.parameters()).dtype
        pad = (1 - mask[:, :-1].to(dev)).to(dtype) * torch.finfo(dtype).min
        return store, logits[:, -1], pad[:, None, None, :]

    @staticmethod
    def _entries(runs: list[_Run], c0: int, c1: int, b0: int, b1: int, caps: dict, pidx: Tensor,
                 batch_src: dict, W_O: dict[int, Tensor], dtype) -> Tensor:
        """The patched residuals ``[c1-c0, b1-b0, d_model]`` of a group's conditions ``c0:c1``, prompts ``b0:b1``."""

        def gathered(t: Tensor) -> Tensor:  # a source's rows for this batch, once per batch
            key = id(t)
            if key not in batch_src:
                batch_src[key] = t.index_select(0, pidx.to(t.device)).to(pidx.device, dtype)
            return batch_src[key]

        parts = []
        for run in runs:
            lo, hi = max(c0, run.start), min(c1, run.stop)
            if lo >= hi:
                continue
            r0, r1 = lo - run.start, hi - run.start
            L = run.layer
            if run.kind == "site":
                key = ("stack", id(run), )
                if len({id(t) for t in run.sources}) == 1:
                    S = gathered(run.sources[0])[None]
                else:
                    if key not in batch_src:
                        batch_src[key] = torch.stack([gathered(t) for t in run.sources])
                    S = batch_src[key][r0:r1]
                new = run.a[r0:r1, None, None] * S[:, b0:b1]
                if run.b is not None:
                    new = new + run.b[r0:r1, None, None] * caps[(run.hook, L)][b0:b1]
                if run.hook == "attn_out":
                    new = caps[("resid_pre", L)][b0:b1] + new
                elif run.hook == "mlp_out":
                    new = caps[("resid_mid", L)][b0:b1] + new
            else:
                key = ("heads", id(run))
                if key not in batch_src:  # a·src_h − b·own_h per head, once per batch
                    src, own = gathered(run.sources[0]), caps[("z", L)]
                    if run.hook == "z":
                        batch_src[key] = torch.einsum("bhe,hed->bhd", run.a * src - run.b * own, W_O[L])
                    else:
                        batch_src[key] = run.a * src - run.b * torch.einsum("bhe,hed->bhd", own, W_O[L])
                X = batch_src[key][b0:b1]
                new = caps[("resid_mid", L)][b0:b1] + torch.einsum("kh,bhd->kbd", run.members[r0:r1], X)
            parts.append(new)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def _resume(kern: _Kernel, h: Tensor, start: int, phase: str, caps: dict, mask_add: Tensor,
                b0: int, b1: int) -> Tensor:
        """Run the rows ``h`` ``[cond, batch, d_model]`` from their entry point through the last layer."""
        m = mask_add[b0:b1]
        for L in range(start, len(kern.layers)):
            w = kern.layers[L]
            if not (L == start and phase == "mlp"):
                h = h + _attention_rows(w, w.ln1(h), caps[("k", L)][b0:b1], caps[("v", L)][b0:b1], m,
                                        caps["cos"][b0:b1], caps["sin"][b0:b1])
            h = h + _mlp_rows(w, w.ln2(h))
        return h


def patch_logits(model, ids, positions, pad_id: int, layer: int, hook: str, source: Tensor,
                 alpha: float = 1.0, mode: str = "blend", batch_size: int = 32) -> Tensor:
    """Decision logits with ``hook`` at ``layer`` replaced at the decision position by ``source`` rows."""
    return Patcher(model, ids, positions, pad_id, batch_size, engine="naive").logits(
        [SitePatch(layer, hook, source, alpha, mode)])[0]


def kl_rows(clean: Tensor, patched: Tensor, vocab_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per-prompt ``KL(P_clean ‖ P_patched)`` over the vocabulary subset ``vocab_ids``."""
    return kl_divergence(restrict_logprobs(clean, vocab_ids), restrict_logprobs(patched, vocab_ids)).numpy()
