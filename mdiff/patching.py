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
(sorted by length, each truncated at its decision position p and left-padded so that p is the last
column):

1. one clean ``run_with_hooks`` of the target with capture hooks only: the clean decision logits
   (HF ``logits_to_keep=1``: only the decision column is unembedded), the clean values at p of the
   hooks the conditions need (``resid_pre``/``resid_mid``/``attn_out``/``z``/``mlp_out``/
   ``resid_post``), and the post-RoPE keys and the values of the prefix positions (< p) for every
   layer a condition recomputes;
2. every condition becomes "the residual stream at p, entering layer L's attention or MLP half",
   computed from clean values (``blend``: ``(1−α)h + α·src``; ``scale``: ``α·src``; head sites:
   ``attn_out + Σ_{h∈S} (new_h − z_h·W_O[h])``, with ``new_h − z_h·W_O[h] = (new_z_h − z_h)·W_O[h]``
   at the ``z`` site). Conditions with the same entry point are stacked as rows (condition × prompt);
3. the remaining layers run on those one-position rows against the frozen prefix keys/values,
   broadcast over conditions (never copied per row), then the final norm and the unembedding, in
   chunks of at most ``max_rows`` rows.

Step 3 drives the model's own weight tensors and norm/activation modules directly (no hooks: the
patched value is set by construction), for Llama-style decoder layers (Llama, Mistral and Qwen2
without sliding windows). Other architectures, and models carrying persistent hooks, fall back to
the naive engine (:attr:`Patcher.engine_used` and :attr:`Patcher.fallback_reason` say so).
"""

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
    hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
    if hf_cfg is not None:
        if getattr(hf_cfg, "sliding_window", None) is not None and getattr(hf_cfg, "use_sliding_window", True):
            return "sliding-window attention is not supported by the fast engine"
        if getattr(hf_cfg, "attn_logit_softcapping", None) or getattr(hf_cfg, "final_logit_softcapping", None):
            return "logit soft-capping is not supported by the fast engine"
        rope = getattr(hf_cfg, "rope_parameters", None)
        if isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None:
            return "llama-4 query scaling is not supported by the fast engine"
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


_CLEAN_HOOK = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "attn_out": "hook_attn_out",
               "mlp_out": "hook_mlp_out", "resid_post": "hook_resid_post", "z": "attn.hook_z"}


def _grab_last(act: Tensor, hook: Any, *, store: dict, key: Any) -> None:
    store[key] = act[:, -1].detach().clone()
    return None


def _grab_prefix(act: Tensor, hook: Any, *, store: dict, key: Any) -> None:
    # [batch, pos, kv_head, d_head] -> the prefix (every column but the decision one) as [batch, kv_head, T, d_head]
    store[key] = act[:, :-1].detach().transpose(1, 2).contiguous()
    return None


def _mix_coefficients(conds: Sequence[Condition], head: bool) -> tuple[list[float], list[float]]:
    """Per condition ``(a, b)``: site ``new = b·clean + a·src``; heads ``Δ = a·src − b·own``."""
    a, b = [], []
    for c in conds:
        alpha = float(c.alpha)
        a.append(alpha)
        if head:
            b.append(alpha if c.mode == "blend" else 1.0)
        else:
            b.append(1.0 - alpha if c.mode == "blend" else 0.0)
    return a, b


def _has_persistent_hooks(model) -> bool:
    for hp in model.hook_dict.values():
        if hp._forward_hooks or hp._forward_pre_hooks or getattr(hp, "fwd_hooks", None):
            return True
    return False


class Patcher:
    """Evaluate patch conditions on one prompt set of one (target) model.

    ``ids``/``positions``/``pad_id`` are the target's tokenized prompts, chosen positions (the last one
    is the decision position) and pad id. The clean decision logits are computed once.

    ``engine="fast"`` (default) recomputes only the decision position from the patched layer up (see the
    module docstring); ``engine="naive"`` runs one full forward per condition and prompt batch.
    ``max_rows`` bounds how many (condition, prompt) rows the fast engine recomputes at once; ``None``
    sizes chunks so that their memory stays within one naive batch forward (see :meth:`rows_per_chunk`).
    ``batch_size`` is the number of prompts per forward in both engines.
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
        clean = restrict_logprobs(self.clean, vocab_ids)
        rows = [kl_divergence(clean, restrict_logprobs(lg, vocab_ids)).numpy() for lg in self.logits(conds)]
        return np.stack(rows) if rows else np.empty((0, self.n))

    # -------------------------------------------------------------------------------- fast engine
    def rows_per_chunk(self, n_batch: int, width: int) -> int:
        """Rows recomputed at once for a batch of ``n_batch`` prompts padded to ``width`` tokens.

        ``max_rows`` when given. Otherwise a memory budget: a naive forward of the same batch holds its
        ``[batch, pos, d_vocab]`` logits and ``[batch, head, pos, pos]`` attention scores; one fast row holds
        its logits, their log-softmax and the float64 KL terms (about ``36·d_vocab`` bytes) and its scores
        against the prefix. Chunks are sized to the naive batch's budget, so the fast engine's peak stays
        at or under the naive one's.
        """
        if self.max_rows is not None:
            return self.max_rows
        cfg = self.model.cfg
        esize = torch.empty(0, dtype=next(self.model.parameters()).dtype).element_size()
        naive_token = cfg.d_vocab * esize + 8 * cfg.n_heads * width + 6 * cfg.d_mlp * esize
        fast_row = 36 * cfg.d_vocab + 16 * cfg.n_heads * width + 6 * cfg.d_mlp * esize
        return max(n_batch, n_batch * width * naive_token // fast_row)

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
        n_layers = model.cfg.n_layers
        groups: dict[Entry, list[int]] = defaultdict(list)
        for ci, c in enumerate(conds):
            groups[_entry(c)].append(ci)
        groups = dict(sorted(groups.items()))
        needed = sorted({v for c in conds for v in _clean_values(c)}, key=lambda t: (t[1], t[0]))
        kv_layers = sorted({L for (s, ph) in groups for L in range(s + (ph == "mlp"), n_layers)})
        vocab = None if vocab_ids is None else torch.as_tensor(np.asarray(vocab_ids), device=dev)
        out_logits = torch.empty(len(conds), self.n, model.cfg.d_vocab) if want_logits else None
        out_kl = np.empty((len(conds), self.n)) if vocab is not None else None
        clean_all = torch.empty(self.n, model.cfg.d_vocab) if self._clean is None else None
        W_O = {c.layer: model.blocks[c.layer].attn.W_O.detach() for c in conds if isinstance(c, HeadPatch)}
        order = sorted(range(self.n), key=lambda i: (self.positions[i][-1], i))  # short prompts together
        with torch.no_grad():
            for s, e in _batches(self.n, self.batch_size):
                idx = order[s:e]
                caps, clean, mask_add, width = self._clean_pass(idx, needed, kv_layers)
                if clean_all is not None:
                    clean_all[idx] = clean.float().cpu()
                if not conds:
                    continue
                clean_lp = restrict_logprobs(clean, vocab) if vocab is not None else None
                pidx = torch.tensor(idx, device=dev)
                sources: dict[int, Tensor] = {}
                rows = self.rows_per_chunk(len(idx), width)
                pb = min(len(idx), rows)
                for (start, phase), cis in groups.items():
                    per = max(1, rows // pb)
                    for b0 in range(0, len(idx), pb):
                        b1 = min(len(idx), b0 + pb)
                        for c0 in range(0, len(cis), per):
                            chunk = cis[c0:c0 + per]
                            h = self._entries([conds[i] for i in chunk], caps, pidx, sources, b0, b1, W_O, dtype)
                            logits = self._resume(kern, h, start, phase, caps, mask_add, b0, b1)
                            if out_logits is not None:
                                out_logits[torch.tensor(chunk)[:, None], torch.tensor(idx[b0:b1])[None, :]] = \
                                    logits.float().cpu()
                            if out_kl is not None:
                                kl = kl_divergence(clean_lp[b0:b1].unsqueeze(0), restrict_logprobs(logits, vocab))
                                out_kl[np.ix_(chunk, idx[b0:b1])] = kl.cpu().numpy()
        if clean_all is not None:
            self._clean = clean_all
        return out_logits, out_kl

    def _clean_pass(self, idx: list[int], needed: list[tuple[str, int]], kv_layers: list[int]):
        """One clean forward of prompts ``idx``, truncated at their decision positions, with capture hooks."""
        model = self.model
        dev = _device(model)
        ids = [self.ids[i][: self.positions[i][-1] + 1] for i in idx]
        inp, mask = pad_left(ids, self.pad_id)
        store: dict[Any, Tensor] = {}
        hooks = [(f"blocks.{L}.{_CLEAN_HOOK[h]}", H._Hook(_grab_last, store=store, key=(h, L))) for h, L in needed]
        for L in kv_layers:
            hooks.append((f"blocks.{L}.attn.hook_rot_k", H._Hook(_grab_prefix, store=store, key=("k", L))))
            hooks.append((f"blocks.{L}.attn.hook_v", H._Hook(_grab_prefix, store=store, key=("v", L))))
        if kv_layers:
            hooks.append((f"blocks.{kv_layers[0]}.attn.hook_cos", H._Hook(_grab_last, store=store, key="cos")))
            hooks.append((f"blocks.{kv_layers[0]}.attn.hook_sin", H._Hook(_grab_last, store=store, key="sin")))
        logits = model.run_with_hooks(inp.to(dev), attention_mask=mask.to(dev), fwd_hooks=hooks, logits_to_keep=1)
        dtype = next(model.parameters()).dtype
        pad = (1 - mask[:, :-1].to(dev)).to(dtype) * torch.finfo(dtype).min
        return store, logits[:, -1], pad[:, None, None, :], inp.shape[1]

    def _entries(self, conds: Sequence[Condition], caps: dict, pidx: Tensor, sources: dict[int, Tensor],
                 b0: int, b1: int, W_O: dict[int, Tensor], dtype) -> Tensor:
        """The patched residual ``[cond, b1-b0, d_model]`` at each condition's entry point."""

        def src(c: Condition) -> Tensor:
            key = id(c.source)
            if key not in sources:
                sources[key] = c.source.index_select(0, pidx.to(c.source.device)).to(pidx.device, dtype)
            return sources[key][b0:b1]

        def clean(name: str, L: int) -> Tensor:
            return caps[(name, L)][b0:b1]

        sub: dict[tuple, list[int]] = defaultdict(list)
        for j, c in enumerate(conds):
            key = ("site", c.layer, c.hook) if isinstance(c, SitePatch) else ("head", c.layer, c.site, id(c.source))
            sub[key].append(j)
        parts = []
        for key, js in sub.items():
            cs = [conds[j] for j in js]
            L = key[1]
            if key[0] == "site":
                hook = key[2]
                a, b = _mix_coefficients(cs, head=False)
                S = torch.stack([src(c) for c in cs])
                new = S if all(x == 1.0 for x in a) else torch.tensor(a, dtype=dtype, device=S.device)[:, None, None] * S
                if any(x != 0.0 for x in b):
                    new = new + torch.tensor(b, dtype=dtype, device=S.device)[:, None, None] * clean(hook, L)
                if hook == "attn_out":
                    new = clean("resid_pre", L) + new
                elif hook == "mlp_out":
                    new = clean("resid_mid", L) + new
            else:
                site = key[2]
                a, b = _mix_coefficients(cs, head=True)
                w_o = W_O[L].to(dtype)
                own = torch.einsum("bhe,hed->bhd", clean("z", L), w_o)
                s = src(cs[0])
                s = torch.einsum("bhe,hed->bhd", s, w_o) if site == "z" else s
                M = torch.zeros(len(cs), w_o.shape[0], dtype=dtype, device=s.device)
                for r, c in enumerate(cs):
                    M[r, list(c.heads)] = 1.0
                at = torch.tensor(a, dtype=dtype, device=s.device)[:, None, None]
                bt = torch.tensor(b, dtype=dtype, device=s.device)[:, None, None]
                delta = at * torch.einsum("kh,bhd->kbd", M, s) - bt * torch.einsum("kh,bhd->kbd", M, own)
                new = clean("resid_mid", L) + delta
            parts.append((js, new))
        if len(parts) == 1:
            return parts[0][1]
        out = torch.empty(len(conds), *parts[0][1].shape[1:], dtype=dtype, device=parts[0][1].device)
        for js, new in parts:
            out[js] = new
        return out

    def _resume(self, kern: _Kernel, h: Tensor, start: int, phase: str, caps: dict, mask_add: Tensor,
                b0: int, b1: int) -> Tensor:
        """Run the rows ``h`` from their entry point to the decision logits ``[cond, batch, d_vocab]``."""
        m = mask_add[b0:b1]
        for L in range(start, len(kern.layers)):
            w = kern.layers[L]
            if not (L == start and phase == "mlp"):
                h = h + _attention_rows(w, w.ln1(h), caps[("k", L)][b0:b1], caps[("v", L)][b0:b1], m,
                                        caps["cos"][b0:b1], caps["sin"][b0:b1])
            h = h + _mlp_rows(w, w.ln2(h))
        return F.linear(kern.norm(h), *kern.unembed)


def patch_logits(model, ids, positions, pad_id: int, layer: int, hook: str, source: Tensor,
                 alpha: float = 1.0, mode: str = "blend", batch_size: int = 32) -> Tensor:
    """Decision logits with ``hook`` at ``layer`` replaced at the decision position by ``source`` rows."""
    return Patcher(model, ids, positions, pad_id, batch_size, engine="naive").logits(
        [SitePatch(layer, hook, source, alpha, mode)])[0]


def kl_rows(clean: Tensor, patched: Tensor, vocab_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per-prompt ``KL(P_clean ‖ P_patched)`` over the vocabulary subset ``vocab_ids``."""
    return kl_divergence(restrict_logprobs(clean, vocab_ids), restrict_logprobs(patched, vocab_ids)).numpy()
