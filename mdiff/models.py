"""Loading a pair as hooked TransformerLens models: the only module that knows TL's loading API.

Both models of a pair load through ``TransformerBridge.boot_transformers(dir_or_hub_id)`` in raw mode
(HF weights as they are, no LayerNorm folding, so both live in HF's own residual basis), with the same
dtype and device. Shapes are compared from the configs *before* any weights are read, so an
incompatible pair is refused cheaply, and the two models can be loaded one at a time
(:func:`load_model`, :func:`free`): two 8B models do not fit in 24 GB of RAM, nor on one card in fp32.
"""

import contextlib
import dataclasses
import gc
import hashlib
import io
import json
import os
import weakref
from pathlib import Path
from typing import Any, Literal

from mdiff.errors import MdiffError
from mdiff.spec import PairSpec

Side = Literal["base", "tuned"]
Relation = Literal["identical", "extends", "different"]


@dataclasses.dataclass(frozen=True)
class Dims:
    """The shapes a pair must share."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    n_kv_heads: int
    d_vocab: int
    architecture: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PairInfo:
    """What is known about a pair without holding either model: shapes and tokenizer relation."""

    base: Dims
    tuned: Dims
    tokenizer_relation: Relation
    base_tokenizer_hash: str
    tuned_tokenizer_hash: str
    n_shared_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base.to_dict(), "tuned": self.tuned.to_dict(),
                "tokenizer_relation": self.tokenizer_relation,
                "base_tokenizer_hash": self.base_tokenizer_hash, "tuned_tokenizer_hash": self.tuned_tokenizer_hash,
                "n_shared_tokens": self.n_shared_tokens}


def _torch_dtype(dtype: str):
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise MdiffError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16") from None


def _looks_local(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or ref.count("/") != 1 or os.sep == "\\" and "\\" in ref


def _check_ref(ref: str, side: str) -> None:
    p = Path(ref).expanduser()
    if p.exists():
        if not p.is_dir():
            raise MdiffError(f"{side} model {ref!r} is a file; give a model directory (with config.json) or a hub id")
        if not (p / "config.json").is_file():
            raise MdiffError(f"{side} model directory {ref} has no config.json: is it a Hugging Face model folder?")
        return
    if _looks_local(ref):
        raise MdiffError(f"{side} model directory not found: {ref} (check the path in the pair file)")


def _hub_error(ref: str, side: str, err: Exception) -> MdiffError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return MdiffError(
        f"could not load {side} model {ref!r}: {first[:200]} (no hub is reachable offline: download it and give "
        f"its local directory in a pair .toml file)")


def _weights_error(ref: str, side: str, err: Exception) -> Exception:
    """A one-line error for weights that cannot be read (corrupt, truncated, pickled), else ``err`` itself."""
    name = type(err).__name__
    first = (str(err).strip().splitlines() or [name])[0][:200]
    if name == "UnpicklingError" or "weights_only" in str(err) or "Weights only load failed" in str(err):
        return MdiffError(f"{side} model {ref}: its weights are a pickled file that the weights-only loader refuses "
                          f"(it holds objects other than tensors); convert it to safetensors from a trusted copy")
    if name in ("SafetensorError", "HeaderTooLarge") or "safetensors" in name.lower() or \
            (isinstance(err, RuntimeError) and ("PytorchStreamReader" in str(err) or "corrupt" in str(err).lower())):
        return MdiffError(f"{side} model {ref}: its weights cannot be read ({name}: {first}); the file is "
                          f"truncated or corrupt: copy or download it again")
    if isinstance(err, (OSError, ValueError)):
        return _hub_error(ref, side, err)
    return err


def read_config(ref: str, revision: str | None = None, side: str = "model"):
    """The Hugging Face config of a model (no weights read)."""
    from transformers import AutoConfig

    _check_ref(ref, side)
    try:
        return AutoConfig.from_pretrained(ref, revision=revision)
    except (OSError, ValueError) as e:
        raise _hub_error(ref, side, e) from None


def dims_of(cfg) -> Dims:
    """Shapes from an HF config (text config for multimodal wrappers)."""
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_heads = int(text.num_attention_heads)
    d_model = int(text.hidden_size)
    d_head = int(getattr(text, "head_dim", None) or d_model // n_heads)
    return Dims(n_layers=int(text.num_hidden_layers), d_model=d_model, n_heads=n_heads, d_head=d_head,
                n_kv_heads=int(getattr(text, "num_key_value_heads", None) or n_heads),
                d_vocab=int(text.vocab_size), architecture=(cfg.architectures or ["?"])[0])


def check_compatible(base: Dims, tuned: Dims) -> None:
    """Refuse a pair whose n_layers, d_model, n_heads or d_head differ, naming both values."""
    for field in ("n_layers", "d_model", "n_heads", "d_head"):
        b, t = getattr(base, field), getattr(tuned, field)
        if b != t:
            raise MdiffError(f"incompatible pair: {field} differs (base {b}, tuned {t}); mdiff compares models "
                             f"of one architecture")


def load_tokenizer(ref: str, revision: str | None = None, side: str = "model"):
    from transformers import AutoTokenizer

    _check_ref(ref, side)
    quiet_transformers()  # no "sequence length is longer than" warnings: prompt lengths are checked by mdiff
    try:
        return AutoTokenizer.from_pretrained(ref, revision=revision)
    except (OSError, ValueError) as e:
        raise _hub_error(ref, side, e) from None


def tokenizer_hash(tok) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, added tokens, normaliser...)."""
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:  # slow tokenizer
        payload = json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _merges(tok) -> list | None:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    model = json.loads(backend.to_str()).get("model", {})
    return model.get("merges")


def tokenizer_relation(base_tok, tuned_tok) -> tuple[Relation, int]:
    """How the tuned tokenizer relates to the base one, and how many token ids they share.

    ``identical``: same definition. ``extends``: every base token keeps its id in the tuned vocabulary and
    the base merges are a prefix of the tuned ones (new tokens only added), so text tokenized with the
    base tokenizer is valid for both models. ``different``: anything else (positions are then aligned by
    character offsets, see METHODS.md).
    """
    if tokenizer_hash(base_tok) == tokenizer_hash(tuned_tok):
        return "identical", len(base_tok)
    bv, tv = base_tok.get_vocab(), tuned_tok.get_vocab()
    shared = sum(1 for t, i in bv.items() if tv.get(t) == i)
    if shared == len(bv) and len(tv) >= len(bv):
        bm, tm = _merges(base_tok), _merges(tuned_tok)
        if bm is None or tm is None or tm[: len(bm)] == bm:
            return "extends", shared
    return "different", shared


def context_length(ref: str, revision: str | None = None, side: str = "model") -> int | None:
    """The positions a model can attend over (``max_position_embeddings`` or its aliases), from its config."""
    cfg = read_config(ref, revision, side)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        v = getattr(text, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def inspect_pair(spec: PairSpec) -> PairInfo:
    """Shapes and tokenizers of both sides, from configs and tokenizer files only (no weights)."""
    bcfg = read_config(spec.base, spec.base_revision, "base")
    tcfg = read_config(spec.tuned, spec.tuned_revision, "tuned")
    bd, td = dims_of(bcfg), dims_of(tcfg)
    check_compatible(bd, td)
    btok = load_tokenizer(spec.base, spec.base_revision, "base")
    ttok = load_tokenizer(spec.tuned, spec.tuned_revision, "tuned")
    rel, shared = tokenizer_relation(btok, ttok)
    return PairInfo(base=bd, tuned=td, tokenizer_relation=rel, base_tokenizer_hash=tokenizer_hash(btok),
                    tuned_tokenizer_hash=tokenizer_hash(ttok), n_shared_tokens=shared)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def quiet_transformers() -> None:
    """Library code stays quiet: no weight-loading progress bars or info logs from transformers."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_LIVE: "weakref.WeakSet" = weakref.WeakSet()  # models loaded, not freed and still referenced
_RESIDENT = {"peak": 0}


def resident_models() -> dict[str, int]:
    """Models :func:`load_model` loaded that are neither freed nor garbage: now, and the peak since the last reset."""
    now = len(_LIVE)
    _RESIDENT["peak"] = max(_RESIDENT["peak"], now)
    return {"now": now, "peak": _RESIDENT["peak"]}


def reset_resident_peak() -> None:
    _RESIDENT["peak"] = len(_LIVE)


def placement(device: str | None, device_map=None, n_devices: int | None = None) -> dict[str, Any]:
    """TransformerBridge placement arguments: one ``device``, or a split over several GPUs.

    ``device`` may name a split itself: ``auto`` / ``balanced`` / ``balanced_low_0`` / ``sequential`` (an HF
    ``device_map``) or ``split:N`` (``n_devices=N``, TL's balanced split over N CUDA devices).
    """
    if device_map is None and n_devices is None and device is not None:
        if device in DEVICE_MAPS:
            device_map = device
        elif device.startswith("split:"):
            try:
                n_devices = int(device.split(":", 1)[1])
            except ValueError:
                raise MdiffError(f"device {device!r}: use split:N with N a whole number of GPUs") from None
    if n_devices is not None:
        if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
            raise MdiffError(f"n_devices must be a whole number ≥ 1, got {n_devices!r}")
        return {"n_devices": n_devices}
    if device_map is not None:
        return {"device_map": device_map}
    return {"device": device or default_device()}


def _contiguous_input(module, args):
    return tuple(a.contiguous() if hasattr(a, "is_contiguous") and not a.is_contiguous() else a for a in args)


def _contiguous_unembedding(model) -> None:
    """Feed the unembedding contiguous rows.

    HF's ``logits_to_keep`` (used to unembed the decision position only) slices the hidden states into a
    non-contiguous view, and on CPU a bf16 ``F.linear`` on a non-contiguous input is about 300× slower
    (torch 2.13: 28 s instead of 0.09 s for 2 rows × Llama-3's 128k unembedding). A pre-hook copies the
    (few) rows first.
    """
    hf = getattr(model, "original_model", None)
    head = hf.get_output_embeddings() if hf is not None and hasattr(hf, "get_output_embeddings") else None
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)


def load_model(spec: PairSpec, side: Side, device: str | None = None, dtype: str | None = None,
               device_map=None, n_devices: int | None = None):
    """Load one side of a pair as a ``TransformerBridge`` (raw mode), in eval mode, without gradients.

    ``device_map`` / ``n_devices`` (or a ``device`` naming a split, see :func:`placement`) spread a model
    too big for one GPU over several. The returned model carries ``model.mdiff_side`` and
    ``model.mdiff_ref`` for provenance.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if side not in ("base", "tuned"):
        raise MdiffError(f"side must be 'base' or 'tuned', got {side!r}")
    ref = spec.base if side == "base" else spec.tuned
    revision = spec.base_revision if side == "base" else spec.tuned_revision
    _check_ref(ref, side)
    place = placement(device, device_map, n_devices)
    tdtype = _torch_dtype(dtype or spec.dtype)
    quiet_transformers()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = TransformerBridge.boot_transformers(ref, dtype=tdtype, revision=revision, **place)
    except Exception as e:  # noqa: BLE001 - sorted into one-line messages; anything else is re-raised
        raise _weights_error(ref, side, e) from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if isinstance(spec.chat_template, str) and model.tokenizer is not None:
        model.tokenizer.chat_template = spec.chat_template
    _contiguous_unembedding(model)
    model.mdiff_side = side
    model.mdiff_ref = ref
    _LIVE.add(model)
    _RESIDENT["peak"] = max(_RESIDENT["peak"], len(_LIVE))
    return model


def load_pair(spec: PairSpec, device: str | None = None, dtype: str | None = None):
    """Both models at once (small pairs only), after the shape check. Returns ``(base, tuned, info)``."""
    info = inspect_pair(spec)
    base = load_model(spec, "base", device, dtype)
    tuned = load_model(spec, "tuned", device, dtype)
    return base, tuned, info


def free(model) -> None:
    """Drop a model's memory: call as ``free(model); del model`` (or let the last reference go)."""
    import torch

    _LIVE.discard(model)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # TL prints "Moving model to device"
            model.to("meta")
    except Exception:  # noqa: BLE001 - freeing is best effort
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def loaded(spec: PairSpec, side: Side, device: str | None = None, dtype: str | None = None):
    """``with loaded(spec, "base") as model:`` one side of a pair, freed on exit (even after an error)."""
    model = load_model(spec, side, device, dtype)
    try:
        yield model
    finally:
        free(model)
        del model


def model_dims(model) -> Dims:
    cfg = model.cfg
    return Dims(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head,
                n_kv_heads=getattr(cfg, "n_key_value_heads", None) or cfg.n_heads, d_vocab=cfg.d_vocab,
                architecture=str(getattr(cfg, "architecture", "?")))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_SAMPLES, _CHUNK, _WHOLE = 16, 1 << 16, 4 << 20


def model_files_dir(ref: str, revision: str | None = None) -> Path | None:
    """The local folder holding a model's files: the directory itself, or its snapshot in the hub cache."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the local cache: there is nothing to fingerprint (nor to load)
        return None


def _file_fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()  # follows the hub cache's symlinks to the blobs
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= _WHOLE:
            h.update(f.read())
        else:
            if path.suffix == ".safetensors":  # the header: every tensor's name, dtype, shape and offsets
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 100 << 20)))
            for i in range(_SAMPLES):  # evenly spaced samples of the data, first and last chunk included
                f.seek((st.st_size - _CHUNK) * i // (_SAMPLES - 1))
                h.update(f.read(_CHUNK))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_sampled": h.hexdigest()}


def weights_fingerprint(ref: str, revision: str | None = None) -> dict[str, Any]:
    """A cheap fingerprint of a model's weights: per weight/index/config file its size, modification time and
    a hash of (small files) the whole file or (large ones) the safetensors header plus 16 sampled 64 KiB chunks.

    Reads about 1 MiB per weight file, so it takes milliseconds even for a 16 GB model, yet changes whenever the
    weights are rewritten in place (size, time or bytes). ``files`` is ``None`` for a hub id not in the local cache.
    """
    d = model_files_dir(ref, revision)
    if d is None:
        return {"revision": revision, "files": None}
    files = {}
    for p in sorted(d.iterdir()):
        if p.is_file() and (p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json")
                            or p.name == "config.json"):
            files[p.name] = _file_fingerprint(p)
    return {"revision": revision, "files": files}


def describe_weights_change(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """One phrase naming what changed between two :func:`weights_fingerprint` values."""
    of, nf = (old or {}).get("files") or {}, new.get("files") or {}
    if (old or {}).get("revision") != new.get("revision"):
        return f"revision {(old or {}).get('revision')!r} -> {new.get('revision')!r}"
    changed = []
    for name in sorted(set(of) | set(nf)):
        if name not in nf:
            changed.append(f"{name} removed")
        elif name not in of:
            changed.append(f"{name} added")
        else:
            what = [label for k, label in (("size", "size"), ("sha256_sampled", "bytes"), ("mtime_ns", "modified time"))
                    if of[name].get(k) != nf[name].get(k)]
            if what:
                changed.append(f"{name} ({', '.join(what)})")
    return "; ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "") or "fingerprint"
