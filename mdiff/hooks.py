"""Hook names and patch hooks for any TransformerLens model (TransformerBridge or HookedTransformer).

Everything here is a plain TransformerLens hook: a callable ``fn(act, hook)`` that returns the new
activation (or ``None`` to leave it unchanged), built with :func:`functools.partial` over a
module-level function so that its repr names what it does. Use them only inside
``model.run_with_hooks(..., fwd_hooks=[...])`` or ``with model.hooks(fwd_hooks=[...])``, which remove
them again, even when the forward pass raises. This module knows nothing about how models are
loaded; it imports nothing from mdiff except :class:`mdiff.errors.MdiffError`.

Shapes use one vocabulary: ``batch pos d_model`` (residual stream, ``attn_out``, ``mlp_out``),
``batch pos head d_head`` (``z``, per query head, so GQA models need nothing special) and
``batch pos head d_model`` (per-head results ``z_h @ W_O[h]``).

**Positions.** ``positions=None`` patches every position. An ``int`` patches that position in every
row (negative values count from the end, as in Python). A LongTensor ``[batch]`` patches one position
per row; a LongTensor ``[batch, k]`` patches ``k`` distinct positions per row.

**Sources.** A source activation is accepted in two layouts:

* full length, with the activation's own shape (``[batch, pos, ...]``); it is read at the positions;
* already gathered at the positions: ``[batch, ...]`` for an ``int`` or ``[batch]`` positions,
  ``[batch, k, ...]`` for ``[batch, k]`` positions.

A source whose shape equals the activation's is always read as full length (this only matters
when ``k == pos``). Any other shape raises :class:`MdiffError`. Sources are moved to the
activation's device and dtype inside the hook, so a cache kept on the CPU can patch a GPU model.

**α modes** (mdiff METHODS, RQ2): ``blend`` sets ``h ← (1 − α)·h + α·source`` (α = 1 is plain
replacement, α = 0 leaves ``h`` unchanged); ``scale`` sets ``h ← α·source``.

**Head sites** (mdiff METHODS, RQ4): :func:`head_z_hook` replaces ``z_h`` of chosen query heads, which
then goes through the *target's* ``W_O`` (blind to a fine-tune that changed only ``W_O``).
:func:`head_result_patch` replaces each chosen head's whole contribution ``z_h @ W_O[h]`` with the
source's (computed with the *source* model's ``W_O``), without ``set_use_attn_result``.

Example::

    from mdiff.hooks import hook_name, replace_hook, head_result_patch, head_results

    name = hook_name("resid_post", 1)                       # "blocks.1.hook_resid_post"
    _, src = source_model.run_with_cache(toks, names_filter=[name, "blocks.1.attn.hook_z"])
    last = toks.shape[1] - 1
    logits = target_model.run_with_hooks(toks, fwd_hooks=[(name, replace_hook(src[name], positions=last))])

    res = head_results(src["blocks.1.attn.hook_z"], source_model.blocks[1].attn.W_O)
    hooks = head_result_patch(1, res, heads=[0, 3], W_O_target=target_model.blocks[1].attn.W_O)
    logits = target_model.run_with_hooks(toks, fwd_hooks=hooks)
"""

import functools
import numbers
import operator
import re
from collections.abc import Callable, Hashable, MutableMapping, Sequence
from typing import Any

import einops
import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mdiff.errors import MdiffError

__all__ = [
    "HOOKS",
    "MODES",
    "Positions",
    "HookFn",
    "hook_name",
    "split_hook_name",
    "parse_hooks",
    "check_heads",
    "replace_hook",
    "scale_hook",
    "map_hook",
    "head_z_hook",
    "head_results",
    "head_result_patch",
    "capture_hook",
]

HOOKS: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out", "z", "result")
"""Short hook names that :func:`hook_name` resolves."""

MODES: tuple[str, ...] = ("blend", "scale")
"""α modes: ``blend`` is ``(1 − α)·h + α·source``, ``scale`` is ``α·source``."""

Positions = int | Int[Tensor, " batch"] | Int[Tensor, "batch k"] | None
"""``None`` (all positions), an ``int`` (same position in every row), ``[batch]`` or ``[batch, k]``."""

HookFn = Callable[..., Tensor | None]
"""A TransformerLens forward hook: ``fn(act, hook) -> Tensor | None``."""

# Short name -> TL alias suffix after "blocks.L.".
_ALIAS_SUFFIX: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "z": "attn.hook_z",
    "result": "attn.hook_result",
}
# TransformerBridge canonical suffixes (what ``hook.name`` shows inside a hook) -> short name.
_CANONICAL_SUFFIX: dict[str, str] = {
    "hook_in": "resid_pre",
    "hook_out": "resid_post",
    "attn.hook_out": "attn_out",
    "mlp.hook_out": "mlp_out",
    "attn.o.hook_in": "z",
}
_SUFFIX_TO_SHORT: dict[str, str] = {v: k for k, v in _ALIAS_SUFFIX.items()} | _CANONICAL_SUFFIX
_FULL_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")
_VALID_HOOKS = ", ".join(HOOKS)


def _short(value: Any) -> str:
    """A one-line repr: tensors as shape, dtype and device (values only when tiny)."""
    if isinstance(value, Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        text = f"Tensor{list(value.shape)} {dtype} {value.device.type}"
        return f"<{text} {value.tolist()}>" if value.numel() <= 8 else f"<{text}>"
    return repr(value)


class _Hook(functools.partial):
    """A ``functools.partial`` hook whose repr summarises bound tensors instead of printing them."""

    def __repr__(self) -> str:
        bound = [_short(a) for a in self.args] + [f"{k}={_short(v)}" for k, v in self.keywords.items()]
        return f"{type(self).__name__}({self.func.__name__}, {', '.join(bound)})"


def bind(fn: Callable[..., Tensor | None], **kwargs) -> HookFn:
    """``fn(act, hook, **kwargs)`` as a TransformerLens hook (a partial with a short repr): for hooks of your own."""
    return _Hook(fn, **kwargs)


# --------------------------------------------------------------------------------------------
# Names, layers, heads
# --------------------------------------------------------------------------------------------


def _as_index(value: Any, what: str) -> int:
    """An int from an int-like value (not bool, not float), or MdiffError."""
    if isinstance(value, bool):
        raise MdiffError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, Tensor):
        if value.ndim != 0 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise MdiffError(f"{what} must be an integer, got a tensor of shape {tuple(value.shape)}")
        return int(value.item())
    try:
        return operator.index(value)
    except TypeError:
        raise MdiffError(f"{what} must be an integer, got {value!r}") from None


def _check_layer(layer: Any, n_layers: int | None) -> int:
    layer = _as_index(layer, "layer")
    if n_layers is not None and not 0 <= layer < n_layers:
        raise MdiffError(
            f"layer {layer} is out of range: the model has {n_layers} layers, so use 0..{n_layers - 1}"
        )
    if layer < 0:
        raise MdiffError(f"layer {layer} is negative; layers are numbered from 0")
    return layer


def split_hook_name(name: str) -> tuple[str, int]:
    """Parse a full hook name into ``(short hook, layer)``.

    Accepts TL alias names (``blocks.1.hook_resid_post``, ``blocks.1.attn.hook_z``) and the
    TransformerBridge canonical names that ``hook.name`` shows inside a hook (``blocks.1.hook_out``,
    ``blocks.1.attn.o.hook_in``).
    """
    if not isinstance(name, str):
        raise MdiffError(f"hook name must be a string, got {type(name).__name__}")
    match = _FULL_NAME.match(name.strip())
    short = _SUFFIX_TO_SHORT.get(match.group(2)) if match else None
    if match is None or short is None:
        raise MdiffError(
            f"unknown hook name {name!r}; use one of {_VALID_HOOKS} or a full name such as "
            "blocks.0.hook_resid_post"
        )
    return short, int(match.group(1))


def hook_name(hook: str, layer: int | None = None, n_layers: int | None = None) -> str:
    """The TransformerLens alias name of ``hook`` at ``layer`` (``"resid_post", 1`` → ``blocks.1.hook_resid_post``).

    Args:
        hook: a short name from :data:`HOOKS`, or a full name (alias or bridge canonical), whose layer
            is then used; a ``layer`` given as well must agree with it.
        layer: the block index; required with a short name.
        n_layers: the model's number of layers, to check ``layer`` against ``0..n_layers-1``.

    ``result`` (``blocks.L.attn.hook_result``) only fires after ``model.set_use_attn_result(True)``;
    :func:`head_result_patch` patches the same quantity without it.
    """
    if not isinstance(hook, str):
        raise MdiffError(f"hook must be a string such as 'resid_post', got {type(hook).__name__}")
    text = hook.strip()
    if text.startswith("blocks."):
        short, name_layer = split_hook_name(text)
        if layer is not None and _as_index(layer, "layer") != name_layer:
            raise MdiffError(f"hook {hook!r} is at layer {name_layer} but layer={layer} was given; drop one")
        layer = name_layer
    elif text in _ALIAS_SUFFIX:
        short = text
    else:
        raise MdiffError(
            f"unknown hook {hook!r}; valid hooks are {_VALID_HOOKS} (or a full name such as "
            "blocks.0.hook_resid_post)"
        )
    if layer is None:
        raise MdiffError(f"hook {hook!r} needs a layer: call hook_name({short!r}, layer)")
    layer = _check_layer(layer, n_layers)
    return f"blocks.{layer}.{_ALIAS_SUFFIX[short]}"


def parse_hooks(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Parse ``"resid_post,attn_out"`` (or a list of names) into validated short names, in order, once each."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise MdiffError(f"hook names must be strings, got {item!r}")
        name = item.strip()
        if not name:
            continue
        if name not in _ALIAS_SUFFIX:
            raise MdiffError(f"unknown hook {name!r} in {spec!r}; valid hooks are {_VALID_HOOKS}")
        if name not in out:
            out.append(name)
    if not out:
        raise MdiffError(f"no hooks given in {spec!r}; pass a comma-separated list from {_VALID_HOOKS}")
    return tuple(out)


def check_heads(heads: int | Sequence[int] | Tensor, n_heads: int) -> tuple[int, ...]:
    """Validate query-head indices against ``0..n_heads-1``; returns them as a tuple of ints.

    Accepts one int, a sequence of ints or a 1-D integer tensor. Duplicates and an empty set are
    errors (a duplicated head would be patched twice by the result site).
    """
    n_heads = _as_index(n_heads, "n_heads")
    if isinstance(heads, Tensor):
        if heads.ndim > 1 or heads.dtype.is_floating_point or heads.dtype == torch.bool:
            raise MdiffError(
                f"heads must be a 1-D integer tensor, got {heads.dtype} of shape {tuple(heads.shape)}"
            )
        items: list[Any] = heads.reshape(-1).tolist()
    elif isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence):
        items = [heads]
    else:
        items = list(heads)
    out = tuple(_as_index(h, "head index") for h in items)
    if not out:
        raise MdiffError(f"heads is empty; pass at least one head index in 0..{n_heads - 1}")
    for h in out:
        if not 0 <= h < n_heads:
            raise MdiffError(
                f"head {h} is out of range: the layer has {n_heads} query heads, so use 0..{n_heads - 1}"
            )
    if len(set(out)) != len(out):
        raise MdiffError(f"heads {list(out)} contain duplicates; list each head once")
    return out


# --------------------------------------------------------------------------------------------
# Positions and sources
# --------------------------------------------------------------------------------------------


def _check_positions(positions: Positions) -> int | Tensor | None:
    """Factory-time checks of ``positions`` (the sequence length is only known inside the hook)."""
    if positions is None:
        return None
    if isinstance(positions, (list, tuple, np.ndarray)):
        try:
            positions = torch.as_tensor(positions)
        except (TypeError, ValueError, RuntimeError):
            raise MdiffError(f"positions must be integers, got {positions!r}") from None
    if isinstance(positions, Tensor):
        if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
            raise MdiffError(f"positions must be an integer (Long) tensor, got dtype {positions.dtype}")
        if positions.ndim == 0:
            return int(positions.item())
        if positions.ndim not in (1, 2):
            raise MdiffError(f"positions must be [batch] or [batch, k], got shape {tuple(positions.shape)}")
        if positions.ndim == 2 and positions.shape[1] == 0:
            raise MdiffError("positions has k=0 positions per row; pass at least one, or None for all")
        return positions.detach().long()
    return _as_index(positions, "positions")


def _resolve_positions(
    positions: int | Tensor | None, batch: int, seq_len: int, device: torch.device
) -> tuple[Tensor | None, bool]:
    """``positions`` as a LongTensor ``[batch, k]`` with non-negative, distinct entries (or None).

    The flag says whether a gathered source has no ``k`` axis (int or ``[batch]`` positions).
    """
    if positions is None:
        return None, False
    if isinstance(positions, int):
        pos = torch.full((batch, 1), positions, dtype=torch.long, device=device)
        single = True
    else:
        if positions.shape[0] != batch:
            raise MdiffError(
                f"positions has {positions.shape[0]} rows but the batch has {batch}; pass one row per prompt"
            )
        single = positions.ndim == 1
        pos = positions.to(device).reshape(batch, -1)
    if bool(((pos < -seq_len) | (pos >= seq_len)).any()):
        bad = pos[(pos < -seq_len) | (pos >= seq_len)][0].item()
        raise MdiffError(
            f"position {bad} is out of range for a sequence of {seq_len} tokens; use 0..{seq_len - 1}"
        )
    pos = torch.where(pos < 0, pos + seq_len, pos)
    if pos.shape[1] > 1:
        srt = pos.sort(dim=1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise MdiffError("positions repeat a position within a row; list each position once per row")
    return pos, single


def _rows(pos: Tensor) -> Tensor:
    """Row indices ``[batch, 1]`` that broadcast against ``pos`` ``[batch, k]`` in advanced indexing."""
    return torch.arange(pos.shape[0], device=pos.device).unsqueeze(1)


def _check_tensor(x: Any, what: str, min_ndim: int = 2) -> Tensor:
    if not isinstance(x, Tensor):
        raise MdiffError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise MdiffError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < min_ndim:
        raise MdiffError(
            f"{what} must have at least {min_ndim} dims ([batch, ...]), got shape {tuple(x.shape)}"
        )
    return x


def _select(
    source: Tensor, pos: Tensor | None, single: bool, batch: int, seq_len: int, n_feat: int, where: str
) -> Tensor:
    """The source at the positions, as ``[batch, k, *feat]`` (``[batch, pos, *feat]`` when pos is None)."""
    lead = tuple(source.shape[: source.ndim - n_feat])
    full = (batch, seq_len)
    if pos is None:
        if lead != full:
            raise MdiffError(
                f"source has shape {tuple(source.shape)} but the activation at {where} is "
                f"[batch={batch}, pos={seq_len}, ...]; with positions=None pass a full-length source"
            )
        return source
    if lead == full:
        idx = pos.to(source.device)
        return source[_rows(idx), idx]
    gathered = (batch,) if single else (batch, pos.shape[1])
    if lead != gathered:
        layout = "[batch, ...]" if single else "[batch, k, ...]"
        raise MdiffError(
            f"source has shape {tuple(source.shape)}; at {where} it must be full length "
            f"[batch={batch}, pos={seq_len}, ...] or gathered at the positions {layout} = {list(gathered)}"
        )
    return source.unsqueeze(1) if single else source


def _feature_check(src: Tensor, act_feat: tuple[int, ...], where: str, what: str = "source") -> None:
    feat = tuple(src.shape[2:])
    if feat != act_feat:
        raise MdiffError(
            f"{what} has feature shape {list(feat)} but the activation at {where} has {list(act_feat)}; "
            "pass an activation from the same site of a model with the same dimensions"
        )


def _mix(cur: Tensor, src: Tensor, alpha: float, mode: str) -> Tensor:
    """``blend``: (1 − α)·cur + α·src; ``scale``: α·src (exact at α = 1 and, for blend, α = 0)."""
    if mode == "scale":
        return src if alpha == 1.0 else alpha * src
    if alpha == 1.0:
        return src
    if alpha == 0.0:
        return cur
    return (1.0 - alpha) * cur + alpha * src


def _check_alpha_mode(alpha: Any, mode: Any) -> float:
    if mode not in MODES:
        raise MdiffError(f"unknown mode {mode!r}; use 'blend' ((1-a)*h + a*source) or 'scale' (a*source)")
    is_number = isinstance(alpha, numbers.Real) or (isinstance(alpha, Tensor) and alpha.numel() == 1)
    if isinstance(alpha, bool) or not is_number:
        raise MdiffError(f"alpha must be a number, got {alpha!r}")
    alpha = float(alpha)
    if alpha != alpha or alpha in (float("inf"), float("-inf")):
        raise MdiffError(f"alpha must be finite, got {alpha}")
    return alpha


def _where(hook: Any) -> str:
    """The hook point's name for messages, as the alias users register (TL 4 shows canonical names)."""
    name = getattr(hook, "name", None)
    if not isinstance(name, str):
        return "this hook point"
    match = _FULL_NAME.match(name)
    short = _SUFFIX_TO_SHORT.get(match.group(2)) if match else None
    return f"blocks.{match.group(1)}.{_ALIAS_SUFFIX[short]}" if match and short else name


# --------------------------------------------------------------------------------------------
# Hook bodies (module level, bound with functools.partial)
# --------------------------------------------------------------------------------------------


def _patch_site(
    act: Float[Tensor, "batch pos *feat"],
    hook: Any,
    *,
    source: Tensor,
    positions: int | Tensor | None,
    alpha: float,
    mode: str,
    linear_map: Callable[[Tensor], Tensor] | None = None,
) -> Float[Tensor, "batch pos *feat"]:
    """Blend or scale ``source`` (optionally mapped) into ``act`` at ``positions``."""
    where = _where(hook)
    if act.ndim < 3:
        raise MdiffError(
            f"patch hooks need a [batch, pos, ...] activation; {where} has shape {tuple(act.shape)}"
        )
    batch, seq_len = act.shape[:2]
    pos, single = _resolve_positions(positions, batch, seq_len, act.device)
    act_feat = tuple(act.shape[2:])
    if linear_map is None:
        src = _select(source, pos, single, batch, seq_len, len(act_feat), where)
        _feature_check(src, act_feat, where)
        src = src.to(device=act.device, dtype=act.dtype)
    else:
        if len(act_feat) != 1:
            raise MdiffError(
                f"map_hook needs a [batch, pos, d_model] site; {where} has shape {tuple(act.shape)}"
            )
        src = _select(source, pos, single, batch, seq_len, 1, where).to(device=act.device, dtype=act.dtype)
        src = linear_map(src)
        if not isinstance(src, Tensor):
            raise MdiffError(
                f"linear_map returned {type(src).__name__}; it must return a tensor [..., d_model]"
            )
        _feature_check(src, act_feat, where, what="the mapped source")
        src = src.to(device=act.device, dtype=act.dtype)
    if pos is None:
        return _mix(act, src, alpha, mode)
    rows = _rows(pos)
    return act.index_put((rows, pos), _mix(act[rows, pos], src, alpha, mode))


def _patch_heads_z(
    act: Float[Tensor, "batch pos head d_head"],
    hook: Any,
    *,
    source: Tensor,
    heads: tuple[int, ...],
    positions: int | Tensor | None,
    alpha: float,
    mode: str,
) -> Float[Tensor, "batch pos head d_head"]:
    """Blend or scale the source's ``z`` of ``heads`` into ``act`` (hook_z) at ``positions``."""
    where = _where(hook)
    if act.ndim != 4:
        raise MdiffError(
            f"head_z_hook needs hook_z ([batch, pos, head, d_head]); {where} has shape {tuple(act.shape)}"
        )
    batch, seq_len, n_heads, _ = act.shape
    check_heads(heads, n_heads)
    pos, single = _resolve_positions(positions, batch, seq_len, act.device)
    src = _select(source, pos, single, batch, seq_len, 2, where)
    _feature_check(src, tuple(act.shape[2:]), where, what="source z")
    idx = torch.tensor(heads, dtype=torch.long, device=act.device)
    src = src.to(device=act.device, dtype=act.dtype).index_select(2, idx)
    if pos is None:
        return act.index_copy(2, idx, _mix(act.index_select(2, idx), src, alpha, mode))
    rows = _rows(pos)
    cur = act[rows, pos]
    new = cur.index_copy(2, idx, _mix(cur.index_select(2, idx), src, alpha, mode))
    return act.index_put((rows, pos), new)


class _ZCapture:
    """Per-call hand-off of the target's ``z`` from hook_z to hook_attn_out within one forward.

    Written by the hook_z capture and cleared by the attn_out hook that consumes it, so nothing
    outlives the forward pass that produced it; every forward overwrites it before it is read.
    """

    __slots__ = ("z",)

    def __init__(self) -> None:
        self.z: Tensor | None = None

    def clear(self) -> None:
        self.z = None

    def __repr__(self) -> str:
        state = "empty" if self.z is None else f"z{list(self.z.shape)}"
        return f"_ZCapture({state})"


def _stash_z(act: Float[Tensor, "batch pos head d_head"], hook: Any, *, capture: _ZCapture) -> None:
    """Keep the target's z for the attn_out hook of the same forward; leaves ``act`` unchanged."""
    if act.ndim != 4:
        raise MdiffError(
            f"head_result_patch's capture needs hook_z ([batch, pos, head, d_head]); "
            f"{_where(hook)} has shape {tuple(act.shape)}"
        )
    capture.z = act
    return None


def _patch_heads_result(
    act: Float[Tensor, "batch pos d_model"],
    hook: Any,
    *,
    capture: _ZCapture,
    source: Tensor,
    heads: tuple[int, ...],
    W_O: Tensor,
    positions: int | Tensor | None,
    alpha: float,
    mode: str,
) -> Float[Tensor, "batch pos d_model"]:
    """Add Σ_h (new_h − z_h @ W_O[h]) to attn_out, with new_h = blend/scale of the source result."""
    z, capture.z = capture.z, None
    where = _where(hook)
    if z is None:
        raise MdiffError(
            f"the result-site hook at {where} found no captured hook_z; pass both (name, hook) pairs "
            "that head_result_patch returns in one fwd_hooks list"
        )
    if act.ndim != 3 or tuple(z.shape[:2]) != tuple(act.shape[:2]):
        raise MdiffError(
            f"hook_z {tuple(z.shape)} and attn_out {tuple(act.shape)} disagree at {where}; "
            "register head_result_patch's hooks at the same layer of one model"
        )
    batch, seq_len, d_model = act.shape
    n_heads, d_head = z.shape[2:]
    if tuple(W_O.shape) != (n_heads, d_head, d_model):
        raise MdiffError(
            f"W_O_target has shape {tuple(W_O.shape)} but this layer needs [head={n_heads}, "
            f"d_head={d_head}, d_model={d_model}]; pass target_model.blocks[layer].attn.W_O"
        )
    pos, single = _resolve_positions(positions, batch, seq_len, act.device)
    src = _select(source, pos, single, batch, seq_len, 2, where)
    _feature_check(src, (n_heads, d_model), where, what="source_result")
    idx = torch.tensor(heads, dtype=torch.long, device=act.device)
    src = src.to(device=act.device, dtype=act.dtype).index_select(2, idx)
    if pos is not None:
        rows = _rows(pos)
        z = z[rows, pos]
    own = head_results(
        z.index_select(2, idx), W_O.to(device=act.device, dtype=act.dtype).index_select(0, idx)
    )
    delta = einops.reduce(
        _mix(own, src, alpha, mode) - own, "batch pos head d_model -> batch pos d_model", "sum"
    )
    if pos is None:
        return act + delta
    return act.index_put((rows, pos), delta, accumulate=True)


def _capture(
    act: Tensor,
    hook: Any,
    *,
    store: MutableMapping[Hashable, Tensor],
    key: Hashable,
    positions: int | Tensor | None,
    device: str | torch.device | None,
) -> None:
    """Store a detached copy of ``act`` (gathered at ``positions``) as ``store[key]``."""
    x = act.detach()
    if positions is not None:
        if x.ndim < 2:
            raise MdiffError(
                f"capture with positions needs a [batch, pos, ...] activation; got {tuple(x.shape)}"
            )
        pos, single = _resolve_positions(positions, x.shape[0], x.shape[1], x.device)
        x = x[_rows(pos), pos]
        x = x.squeeze(1) if single else x
        store[key] = x if device is None else x.to(device)
    else:
        store[key] = x.clone() if device is None else x.to(device, copy=True)
    return None


# --------------------------------------------------------------------------------------------
# Public factories
# --------------------------------------------------------------------------------------------


def replace_hook(
    source: Float[Tensor, "batch ... d_model"], positions: Positions = None, alpha: float = 1.0
) -> HookFn:
    """``blend`` patch: ``h ← (1 − α)·h + α·source`` at ``positions`` (α = 1: plain replacement).

    Works on any ``[batch, pos, ...]`` site (resid_pre/post, attn_out, mlp_out, or all heads of z);
    ``source`` is full length or gathered at the positions (see the module docstring).
    """
    source = _check_tensor(source, "source")
    alpha = _check_alpha_mode(alpha, "blend")
    return _Hook(_patch_site, source=source, positions=_check_positions(positions), alpha=alpha, mode="blend")


def scale_hook(
    source: Float[Tensor, "batch ... d_model"], positions: Positions = None, alpha: float = 1.0
) -> HookFn:
    """``scale`` patch: ``h ← α·source`` at ``positions`` (an amplitude correction, METHODS RQ2)."""
    source = _check_tensor(source, "source")
    alpha = _check_alpha_mode(alpha, "scale")
    return _Hook(_patch_site, source=source, positions=_check_positions(positions), alpha=alpha, mode="scale")


class _AffineMap:
    """``x @ W_ + b_`` along the last axis, for scikit-learn-style fitted maps (W_ is d_in × d_out)."""

    __slots__ = ("W", "b")

    def __init__(self, W: Tensor, b: Tensor | None) -> None:
        self.W, self.b = W, b

    def __call__(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        y = x @ self.W.to(device=x.device, dtype=x.dtype)
        return y if self.b is None else y + self.b.to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        return f"_AffineMap(W_{list(self.W.shape)}, b_={'None' if self.b is None else list(self.b.shape)})"


def _as_map(linear_map: Any) -> Callable[[Tensor], Tensor]:
    if hasattr(linear_map, "W_"):
        try:
            W = torch.as_tensor(linear_map.W_).detach()
            b = getattr(linear_map, "b_", None)
            b = None if b is None else torch.as_tensor(b).detach()
        except (TypeError, ValueError, RuntimeError) as err:
            raise MdiffError(f"linear_map.W_ / b_ must be arrays or tensors ({err})") from None
        if W.ndim != 2:
            raise MdiffError(f"linear_map.W_ must be a 2-D (d_in, d_out) matrix, got shape {tuple(W.shape)}")
        W = W if W.dtype.is_floating_point else W.float()
        if b is not None and tuple(b.shape) != (W.shape[1],):
            raise MdiffError(
                f"linear_map.b_ has shape {tuple(b.shape)} but W_ gives d_out={W.shape[1]}; pass b_ of shape ({W.shape[1]},)"
            )
        return _AffineMap(W, b)
    if callable(linear_map):
        return linear_map
    raise MdiffError(
        f"linear_map must be callable on [..., d_model] tensors or have W_ (d_in, d_out) and optional b_; "
        f"got {type(linear_map).__name__}"
    )


def map_hook(
    source: Float[Tensor, "batch ... d_model"],
    linear_map: Any,
    positions: Positions = None,
    alpha: float = 1.0,
    mode: str = "blend",
) -> HookFn:
    """Map the source first, then blend or scale it in: ``h ← (1 − α)·h + α·M(source)`` or ``α·M(source)``.

    ``linear_map`` is a callable on ``[..., d_model]`` tensors, or an object with ``W_`` (d_in × d_out)
    and optional ``b_`` (scikit-learn style; numpy arrays or tensors), applied as ``x @ W_ + b_``.
    The map is applied to the source at the positions only, inside the hook, in the activation's dtype.
    """
    source = _check_tensor(source, "source")
    alpha = _check_alpha_mode(alpha, mode)
    return _Hook(
        _patch_site,
        source=source,
        positions=_check_positions(positions),
        alpha=alpha,
        mode=mode,
        linear_map=_as_map(linear_map),
    )


def head_z_hook(
    source_z: Float[Tensor, "batch ... head d_head"],
    heads: int | Sequence[int] | Tensor,
    positions: Positions = None,
    alpha: float = 1.0,
    mode: str = "blend",
) -> HookFn:
    """The ``z`` head site: patch ``z`` of query ``heads`` on ``blocks.L.attn.hook_z``.

    The patched ``z_h`` goes through the *target's* ``W_O``, so this site is blind to changes in
    ``W_O`` itself (use :func:`head_result_patch` for those). ``source_z`` has all heads:
    ``[batch, pos, head, d_head]`` or gathered at the positions.
    """
    source_z = _check_tensor(source_z, "source_z", min_ndim=3)
    heads = check_heads(heads, source_z.shape[-2])
    alpha = _check_alpha_mode(alpha, mode)
    return _Hook(
        _patch_heads_z,
        source=source_z,
        heads=heads,
        positions=_check_positions(positions),
        alpha=alpha,
        mode=mode,
    )


def head_results(
    z: Float[Tensor, "batch ... head d_head"], W_O: Float[Tensor, "head d_head d_model"]
) -> Float[Tensor, "batch ... head d_model"]:
    """Per-head contributions ``result_h = z_h @ W_O[h]`` (no bias), like ``hook_result``."""
    z = _check_tensor(z, "z", min_ndim=3)
    W_O = _check_tensor(W_O, "W_O", min_ndim=3)
    if W_O.ndim != 3 or z.shape[-2:] != W_O.shape[:2]:
        raise MdiffError(
            f"z {tuple(z.shape)} and W_O {tuple(W_O.shape)} do not fit: z must end in [head, d_head] "
            "and W_O be [head, d_head, d_model] of the same layer"
        )
    return einops.einsum(z, W_O.to(z), "... head d_head, head d_head d_model -> ... head d_model")


def head_result_patch(
    layer: int,
    source_result: Float[Tensor, "batch ... head d_model"],
    heads: int | Sequence[int] | Tensor,
    W_O_target: Float[Tensor, "head d_head d_model"],
    positions: Positions = None,
    alpha: float = 1.0,
    mode: str = "blend",
    n_layers: int | None = None,
) -> list[tuple[str, HookFn]]:
    """The ``result`` head site: replace each chosen head's whole contribution ``z_h @ W_O[h]``.

    Returns two ``(hook_name, fn)`` pairs to pass together in ``fwd_hooks``: a capture on
    ``blocks.L.attn.hook_z`` that keeps the target's ``z`` (unchanged) and a hook on
    ``blocks.L.hook_attn_out`` that adds ``Σ_h (new_h − z_h @ W_O_target[h])`` at the positions,
    where ``new_h = (1 − α)·r_h + α·source_result_h`` (blend) or ``α·source_result_h`` (scale).
    No ``set_use_attn_result`` is needed. Build ``source_result`` with :func:`head_results` from the
    source run's ``z`` and the *source* model's ``W_O``; ``W_O_target`` is the patched model's
    ``blocks[L].attn.W_O`` (taken as a constant). The capture state is created per call and
    cleared by the attn_out hook in every forward. If a forward aborts between the two hooks, the
    stale ``z`` is never read: the next forward's capture overwrites it first.

    Register the pair after any hook that edits this layer's ``z``: the capture sees ``z`` as
    left by the hooks registered before it.
    """
    layer = _check_layer(layer, n_layers)
    source_result = _check_tensor(source_result, "source_result", min_ndim=3)
    W_O = _check_tensor(W_O_target, "W_O_target", min_ndim=3).detach()
    if W_O.ndim != 3:
        raise MdiffError(f"W_O_target must be [head, d_head, d_model], got shape {tuple(W_O.shape)}")
    if source_result.shape[-2:] != (W_O.shape[0], W_O.shape[2]):
        raise MdiffError(
            f"source_result ends in {list(source_result.shape[-2:])} but W_O_target {tuple(W_O.shape)} "
            f"needs [head={W_O.shape[0]}, d_model={W_O.shape[2]}]; build it with head_results(z, W_O_source)"
        )
    heads = check_heads(heads, W_O.shape[0])
    alpha = _check_alpha_mode(alpha, mode)
    capture = _ZCapture()
    add = _Hook(
        _patch_heads_result,
        capture=capture,
        source=source_result,
        heads=heads,
        W_O=W_O,
        positions=_check_positions(positions),
        alpha=alpha,
        mode=mode,
    )
    return [
        (hook_name("z", layer), _Hook(_stash_z, capture=capture)),
        (hook_name("attn_out", layer), add),
    ]


def capture_hook(
    store: MutableMapping[Hashable, Tensor],
    key: Hashable,
    positions: Positions = None,
    device: str | torch.device | None = None,
) -> HookFn:
    """Store a detached copy of the activation as ``store[key]`` and leave it unchanged.

    With ``positions`` the copy is gathered: ``[batch, ...]`` for an int or ``[batch]`` positions,
    ``[batch, k, ...]`` for ``[batch, k]``. ``device`` moves the copy (e.g. ``"cpu"``).
    """
    if not isinstance(store, MutableMapping):
        raise MdiffError(f"store must be a dict-like mapping, got {type(store).__name__}")
    return _Hook(_capture, store=store, key=key, positions=_check_positions(positions), device=device)
