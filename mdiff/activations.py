"""Collecting activations one model at a time into an on-disk store (safetensors shards + JSON manifest).

Real pairs are too big to hold both models at once, so every analysis that needs activations of
both sides reads them from here. A collection lives in
``DIR/<pair>/activations/<side>-<split>-<positions>/``::

    settings.json            what is collected (model, revision, tokenizer hash, prompts, token ids, ...)
    shard-00000.safetensors  rows of a block of prompts: "<hook>.<layer>" tensors + row_prompt, row_pos
    ...
    manifest.json            written last: settings + the list of shards with their sha256 (a complete collection)

* **Memory-bounded**: prompts are processed a block (shard) at a time and only the chosen positions are
  kept (gathered inside the hook), so all layers of all prompts are never held at once. Within a shard,
  prompts are batched in order of length, so one long prompt does not pad a whole batch.
* **Resumable**: every shard is written atomically (temporary file, then rename); a re-run skips the
  shards already on disk and produces a store identical, bit for bit, to an uninterrupted run.
* **Never mixed**: a folder holding a collection with other settings (model, prompts, token ids, hooks,
  layers, positions, dtype...) is refused with an error, and collected again only when asked (``replace``).
* **Never stale**: the settings include a fingerprint of each model's weight files
  (:func:`mdiff.models.weights_fingerprint`: sizes, times, headers and sampled bytes), so a model changed in
  place is never read from an old collection.
* **Checked**: each shard's header holds the sha256 of its tensor bytes (a resume re-collects a shard that
  fails it) and the manifest the sha256 of each whole file, verified on read; non-finite values are refused,
  naming the shard and the rows.
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from mdiff import hooks as H
from mdiff.align import Prepared
from mdiff.config import COLLECT_HOOKS  # noqa: F401 (declared once, with the CLI options)
from mdiff.data import pad_left
from mdiff.errors import MdiffError
from mdiff.options import check_layers
from mdiff.tmpfiles import remove_stale_tmp, tmp_path

STORE_VERSION = 2


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = tmp_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _save_shard(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> str:
    """Write a safetensors file atomically and byte-for-byte reproducibly; returns the file's sha256.

    ``safetensors`` writes the ``__metadata__`` entries in hash-map order, which changes from run to run;
    the header is rewritten here with sorted metadata, so equal tensors give equal files. The metadata gains
    ``data_sha256``, the sha256 of the tensor bytes, so a shard can be checked without the manifest.
    """
    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    data = memoryview(raw)[8 + n:]
    md = {**(header.pop("__metadata__", None) or {}), "data_sha256": hashlib.sha256(data).hexdigest()}
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    ordered = {"__metadata__": dict(sorted(md.items())), **dict(entries)}
    head = json.dumps(ordered, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    prefix = len(head).to_bytes(8, "little") + head
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(prefix)
        f.write(data)
    os.replace(tmp, path)
    h = hashlib.sha256(prefix)
    h.update(data)
    _remember_sha(path, h.hexdigest())
    return h.hexdigest()


def _read_shard_check(path: Path) -> tuple[dict[str, str], bool, str]:
    """``(metadata, data_ok, file_sha256)`` of a shard, in one pass over the file.

    ``data_ok``: the tensor bytes hash to the ``data_sha256`` its header records. Raises ``ValueError`` if the
    header cannot be read.
    """
    fh = hashlib.sha256()
    dh = hashlib.sha256()
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) != 8:
            raise ValueError("truncated")
        n = int.from_bytes(first, "little")
        if n > os.fstat(f.fileno()).st_size - 8:
            raise ValueError("bad header length")
        head = f.read(n)
        fh.update(first)
        fh.update(head)
        header = json.loads(head)
        md = header.get("__metadata__") or {}
        if not isinstance(md, dict):
            raise ValueError("bad metadata")
        for block in iter(lambda: f.read(1 << 22), b""):
            fh.update(block)
            dh.update(block)
    _remember_sha(path, fh.hexdigest())
    return md, md.get("data_sha256") == dh.hexdigest(), fh.hexdigest()


_VERIFIED: dict[tuple, str] = {}
"""sha256 of shard files this process wrote or read, by (path, inode, size, times): a rewrite changes the key."""


def _sha_key(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _remember_sha(path: Path, sha: str) -> None:
    _VERIFIED[_sha_key(path)] = sha


def _file_sha256(path: Path) -> str:
    """sha256 of a file, remembered while its size and modification time stay the same."""
    key = _sha_key(path)
    if key not in _VERIFIED:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _VERIFIED[key] = h.hexdigest()
    return _VERIFIED[key]


def _nonfinite_rows(t: Tensor) -> list[int]:
    if not t.is_floating_point():
        return []
    bad = ~torch.isfinite(t.reshape(len(t), -1)).all(dim=1) if len(t) else torch.zeros(0, dtype=torch.bool)
    return bad.nonzero().flatten().tolist()


_COLLECTION_FILES = ("settings.json", "manifest.json")


def _clear_collection(path: Path) -> None:
    """Remove the files of a collection (only the ones :func:`collect` writes) so it can be collected anew."""
    for p in path.iterdir():
        if p.name in _COLLECTION_FILES or (p.name.startswith("shard-") and p.name.endswith(".safetensors")) \
                or (p.name.startswith(".") and ".tmp-" in p.name):
            p.unlink()


def collection_dir(out: str | Path, pair: str, side: str, split: str | None, positions_tag: str,
                   hooks: list[str] | None = None, layers: list[int] | None = None) -> Path:
    """Where one side's collection lives. With ``hooks``/``layers`` the folder name carries a short digest of
    them, so runs that read other sites (RQ1 on every layer, RQ2 at two probe layers ...) never collide."""
    from mdiff.pairs import check_pair_name

    check_pair_name(pair)  # OUT/<pair>/ stays inside OUT
    name = f"{side}-{split or 'all'}-{positions_tag}"
    if hooks is not None or layers is not None:
        name += "-" + _sha({"hooks": list(hooks or []), "layers": sorted(layers or [])})[:10]
    return Path(out) / pair / "activations" / name


@dataclasses.dataclass
class CollectResult:
    path: Path
    n_shards: int
    n_rows: int
    skipped_shards: int


def _rows_positions(lengths: list[int], width: int, positions: list[list[int]]) -> tuple[Tensor, Tensor | None]:
    """Padded-batch positions: ``[batch]`` when one position per prompt, else ``[batch, k]``.

    Prompts may have different numbers of positions (positions dropped as unpaired by the alignment of
    two different tokenizers): rows are then filled up to the largest ``k`` with other, distinct
    positions of the padded row, and the second value, a ``[batch, k]`` bool mask, marks the real ones.
    """
    if any(len(p) == 0 for p in positions):
        raise MdiffError("a prompt in the batch has no position to collect")
    ks = {len(p) for p in positions}
    rows = [[width - n + q for q in p] for n, p in zip(lengths, positions, strict=True)]
    if ks == {1}:
        return torch.tensor(rows, dtype=torch.long)[:, 0], None
    kmax = max(ks)
    valid = torch.tensor([[j < len(r) for j in range(kmax)] for r in rows], dtype=torch.bool)
    if len(ks) > 1:
        for r in rows:
            taken = set(r)
            r += [q for q in range(width) if q not in taken][: kmax - len(r)]  # width >= kmax always
    return torch.tensor(rows, dtype=torch.long), (None if len(ks) == 1 else valid)


def _stop_when_all_captured(capture, store: dict, n_names: int):
    """Wrap a capture hook: once every requested activation is in ``store``, end the forward pass.

    Raises TransformerBridge's own ``StopAtLayerException``, which its forward catches (as for
    ``stop_at_layer``, but also when the last needed hook sits in the last block, where ``stop_at_layer``
    would still run the final norm and the full ``[batch, pos, vocab]`` unembedding).
    """
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    def hook(tensor, hook):
        out = capture(tensor, hook=hook)
        if len(store) >= n_names:
            raise StopAtLayerException(tensor)
        return out

    return hook


def gather_batch(model, ids: list[list[int]], positions: list[list[int]], names: list[str],
                 pad_id: int, stop_at_layer: int | None = None) -> dict[str, Tensor]:
    """Run ``model`` on a left-padded batch and return each hook's activation at the given positions.

    Rows are flattened prompt-major: ``[sum_k, ...]`` (prompt 0's positions first); prompts may have
    different numbers of positions. Nothing but the gathered rows is kept.
    """
    inp, mask = pad_left(ids, pad_id)
    width = inp.shape[1]
    pos, valid = _rows_positions([len(x) for x in ids], width, positions)
    dev = next(model.parameters()).device
    store: dict[str, Tensor] = {}
    fwd = [(n, _stop_when_all_captured(H.capture_hook(store, n, positions=pos.to(dev), device="cpu"), store,
                                       len(set(names))))
           for n in names]
    with torch.no_grad():
        # the forward stops right after the last hook it needs: never the later blocks, never the unembedding
        model.run_with_hooks(inp.to(dev), attention_mask=mask.to(dev), fwd_hooks=fwd, return_type=None,
                             stop_at_layer=stop_at_layer)
    missing = [n for n in names if n not in store]
    if missing:
        raise MdiffError(f"the forward pass never reached hook {missing[0]!r} (stop_at_layer={stop_at_layer})")
    out = {}
    for n in names:
        a = store[n]
        if pos.ndim == 2:
            a = a[valid] if valid is not None else a.reshape(-1, *a.shape[2:])
        out[n] = a.contiguous()
    return out


def gather_all(model, ids: list[list[int]], positions: list[list[int]], names: list[str], pad_id: int,
               batch_size: int = 16, stop_at_layer: int | None = None) -> dict[str, Tensor]:
    """:func:`gather_batch` over the whole prompt list in batches, in memory (rows prompt-major, on the CPU)."""
    if not ids:
        raise MdiffError("no prompts to read activations from (the prompt set is empty after filtering)")
    parts: dict[str, list[Tensor]] = {n: [] for n in names}
    for s in range(0, len(ids), batch_size):
        got = gather_batch(model, ids[s:s + batch_size], positions[s:s + batch_size], names, pad_id, stop_at_layer)
        for n in names:
            parts[n].append(got[n])
    return {n: torch.cat(v) for n, v in parts.items()}




def collect(model, prepared: Prepared, side: str, hooks: list[str], layers: list[int], path: str | Path,
            meta: dict[str, Any], shard_prompts: int = 64, batch_size: int = 16,
            on_shard: Callable[[int, int], None] | None = None, _stop_after: int | None = None,
            replace: bool = False, load: Callable[[], Any] | None = None) -> CollectResult:
    """Collect ``hooks`` × ``layers`` of one side at the prepared positions into ``path`` (resumable).

    ``meta`` (model id, revision, weights fingerprint, tokenizer hash, dtype, split...) is part of the settings
    that must match for a resume; a folder holding a collection with other settings is refused, or with
    ``replace`` collected anew. A shard whose bytes fail its checksum is collected again.
    ``on_shard(done, total)`` reports progress. ``_stop_after`` simulates an interrupt (tests).
    ``model`` may be ``None`` with ``load`` a function returning it: it is then called only when a shard has to be
    collected, so a complete collection is checked without loading the model at all.
    """
    if side not in ("base", "tuned"):
        raise MdiffError(f"side must be base or tuned, got {side!r}")
    # every check before anything is written: bad input leaves no folder behind
    if not hooks or not layers:
        raise MdiffError("nothing to collect: give at least one hook and one layer")
    for h in hooks:
        if h not in COLLECT_HOOKS:
            raise MdiffError(f"unknown hook {h!r}: choose from {', '.join(COLLECT_HOOKS)}")
    if len(set(hooks)) != len(hooks) or len(set(layers)) != len(layers):
        raise MdiffError(f"hooks {list(hooks)} / layers {list(layers)} repeat an entry; list each once")
    if model is None and load is None:
        raise MdiffError("collect needs the model, or a function that loads it")
    keys = [f"{h}.{L}" for h in hooks for L in layers]
    ids = prepared.base_ids if side == "base" else prepared.tuned_ids
    positions = prepared.base_positions if side == "base" else prepared.tuned_positions
    if batch_size < 1:
        raise MdiffError(f"batch size must be ≥ 1, got {batch_size}")
    if shard_prompts < 1:
        raise MdiffError(f"shard size (prompts per shard) must be ≥ 1, got {shard_prompts}")
    settings = {
        "store_version": STORE_VERSION, "side": side, "hooks": list(hooks), "layers": list(layers),
        "prompt_ids": prepared.prompt_ids, "token_ids_sha256": _sha(ids), "positions_sha256": _sha(positions),
        "tokenized_with": prepared.tokenized_with, "shard_prompts": shard_prompts, "batch_size": batch_size,
        **meta,
    }
    if len(ids) != len(prepared) or len(positions) != len(prepared):
        raise MdiffError("the prepared prompts are inconsistent (token ids, positions and prompt ids differ in number)")
    for pid, x, p in zip(prepared.prompt_ids, ids, positions, strict=True):
        if not p or any(not 0 <= q < len(x) for q in p):
            raise MdiffError(f"prompt {pid!r}: positions {p} are not inside its {len(x)} tokens")
    fingerprint = _sha(settings)
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise MdiffError(f"cannot write activations under {parent}: it is a file, not a folder; "
                                 "choose another output folder ({option})", option="out")
            break
    sfile = path / "settings.json"
    if sfile.exists():
        try:
            old = json.loads(sfile.read_text())
        except ValueError:
            old = None
        if not isinstance(old, dict) or not isinstance(old.get("settings"), dict):
            raise MdiffError(f"{sfile} is not an mdiff collection's settings file; choose another output folder "
                             "({option}) or remove that folder", option="out")
        if old.get("fingerprint") != fingerprint and not replace:
            diff = sorted(k for k in set(old["settings"]) | set(settings) if old["settings"].get(k) != settings.get(k))
            if diff == ["weights"]:  # the same collection but the model's files changed
                from mdiff.models import describe_weights_change

                raise MdiffError(
                    f"{path} holds activations of other weights of the {side} model ({settings.get('model')}: "
                    f"{describe_weights_change(old['settings'].get('weights'), settings['weights'])} since they "
                    "were collected); rerun with {option} to collect them from the current weights", option="overwrite")
            raise MdiffError(
                f"{path} already holds activations collected with other settings (differs in: {', '.join(diff)}); "
                "choose another output folder, or rerun with {option} to collect them again", option="overwrite")
        if old.get("fingerprint") != fingerprint:
            _clear_collection(path)

    def start() -> None:  # the folder appears with the first shard: a run failing before it leaves nothing
        if not sfile.exists():
            path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(sfile, json.dumps({"fingerprint": fingerprint, "settings": settings,
                                                 "token_ids": ids, "positions": positions}, indent=1))

    if path.is_dir():
        remove_stale_tmp(path)  # a resume writes those files again
    n = len(prepared)
    blocks = [(s, min(n, s + shard_prompts)) for s in range(0, n, shard_prompts)]
    pad_id = meta.get("pad_id", 0)
    stop = max(layers) + 1
    shards, skipped, rows_total = [], 0, 0
    for i, (s, e) in enumerate(blocks):
        fname = f"shard-{i:05d}.safetensors"
        fpath = path / fname
        if fpath.exists():
            try:
                md, data_ok, sha = _read_shard_check(fpath)
                ok = data_ok and md.get("fingerprint") == fingerprint and md.get("prompt_start") == str(s)
                if ok:
                    with safe_open(str(fpath), "pt") as f:
                        rows = f.get_slice("row_prompt").get_shape()[0]
            except Exception:  # noqa: BLE001 - an unreadable or damaged shard is simply collected again
                ok, rows = False, 0
            if ok:
                shards.append({"file": fname, "prompt_start": s, "prompt_end": e, "rows": rows, "sha256": sha})
                rows_total += rows
                skipped += 1
                if on_shard:
                    on_shard(i + 1, len(blocks))
                continue
        if _stop_after is not None and i - skipped >= _stop_after:
            raise KeyboardInterrupt(f"simulated interrupt before shard {i}")
        if model is None:
            model = load()
        names = [H.hook_name(h, L, model.cfg.n_layers) for h in hooks for L in layers]
        parts: dict[str, list[Tensor]] = {k: [] for k in keys}
        row_prompt, row_pos = [], []
        by_prompt: dict[int, dict[str, Tensor]] = {}
        order = sorted(range(s, e), key=lambda j: len(ids[j]))  # batched by length: a long prompt pads only its peers
        for bs in range(0, len(order), batch_size):
            batch = order[bs:bs + batch_size]
            got = gather_batch(model, [ids[j] for j in batch], [positions[j] for j in batch], names, pad_id, stop)
            at = 0
            for j in batch:  # rows are prompt-major within the batch
                by_prompt[j] = {nme: got[nme][at:at + len(positions[j])] for nme in names}
                at += len(positions[j])
        for j in range(s, e):  # stored in prompt order
            for k, nme in zip(keys, names, strict=True):
                parts[k].append(by_prompt[j][nme])
            row_prompt += [j] * len(positions[j])
            row_pos += positions[j]
        tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
        for k, t in tensors.items():
            bad = _nonfinite_rows(t)
            if bad:
                pids = sorted({prepared.prompt_ids[row_prompt[r]] for r in bad})
                raise MdiffError(
                    f"the {side} model produced NaN/inf in {k} for {len(pids)} prompt(s) ({', '.join(pids[:5])}"
                    f"{', ...' if len(pids) > 5 else ''}) while collecting {fname}: try dtype = \"float32\" or "
                    f"\"bfloat16\" in the pair file")
        tensors["row_prompt"] = torch.tensor(row_prompt, dtype=torch.long)
        tensors["row_pos"] = torch.tensor(row_pos, dtype=torch.long)
        start()
        sha = _save_shard(tensors, fpath, {"fingerprint": fingerprint, "prompt_start": str(s), "prompt_end": str(e)})
        shards.append({"file": fname, "prompt_start": s, "prompt_end": e, "rows": len(row_prompt), "sha256": sha})
        rows_total += len(row_prompt)
        if on_shard:
            on_shard(i + 1, len(blocks))
    start()
    manifest = {"fingerprint": fingerprint, "settings": settings, "shards": shards, "n_rows": rows_total,
                "keys": keys}
    atomic_write_text(path / "manifest.json", json.dumps(manifest, indent=1))
    return CollectResult(path, len(shards), rows_total, skipped)


class ActivationSet:
    """Read side of a complete collection: ``load(hook, layer)`` concatenates that key over shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            hint = " (an interrupted collection: run the same collect again to finish it)" \
                if (self.path / "settings.json").exists() else ""
            raise MdiffError(f"no complete activation collection at {self.path}{hint}")
        self.manifest = json.loads(mf.read_text())
        self.settings = self.manifest["settings"]

    @property
    def prompt_ids(self) -> list[str]:
        return self.settings["prompt_ids"]

    def _cat(self, key: str) -> Tensor:
        parts = []
        row0 = 0
        for sh in self.manifest["shards"]:
            fpath = self.path / sh["file"]
            if not fpath.is_file():
                raise MdiffError(f"{fpath} is missing from the collection; run the same command again to collect it")
            if "sha256" not in sh:
                raise MdiffError(f"{self.path} was collected by an older mdiff without checksums; run again with "
                                 "{option} to collect it anew", option="overwrite")
            if _file_sha256(fpath) != sh["sha256"]:
                raise MdiffError(f"{fpath} is damaged (its sha256 does not match the manifest); run the same command "
                                 f"again to collect that shard anew")
            try:
                with safe_open(str(fpath), "pt") as f:
                    if (f.metadata() or {}).get("fingerprint") != self.manifest["fingerprint"]:
                        raise MdiffError(f"{fpath} belongs to another collection; refusing to mix")
                    t = f.get_tensor(key)
            except MdiffError:
                raise
            except Exception as e:  # noqa: BLE001 - a damaged file that still matches its checksum
                raise MdiffError(f"{fpath} cannot be read ({str(e).splitlines()[0][:120]}); run again with "
                                 "{option} to collect it anew", option="overwrite") from None
            bad = _nonfinite_rows(t)
            if bad:
                rows = [row0 + r for r in bad]
                raise MdiffError(f"{fpath} holds NaN/inf in {key} at {len(rows)} row(s) "
                                 f"{rows[:8]}{' ...' if len(rows) > 8 else ''} (rows of the collection); run again "
                                 "with {option} to collect it anew, in float32 if the model overflows",
                                 option="overwrite")
            parts.append(t)
            row0 += len(t)
        return torch.cat(parts)

    def load(self, hook: str, layer: int) -> Float[Tensor, "rows ..."]:
        key = f"{hook}.{layer}"
        if key not in self.manifest["keys"]:
            raise MdiffError(f"{self.path} has no {hook} at layer {layer} (collected: {', '.join(self.manifest['keys'])})")
        return self._cat(key)

    def rows(self) -> tuple[Tensor, Tensor]:
        """``(row_prompt, row_pos)``: each row's prompt index (into ``prompt_ids``) and token position."""
        return self._cat("row_prompt"), self._cat("row_pos")


def prepare_pair_prompts(spec, info, positions, split: str | None, split_seed: int = 0, n: int | None = None):
    """Load the pair's prompt set, keep one split, tokenize for both models and align positions."""
    from mdiff import align, data, models

    prompts = data.select_split(data.pair_prompts(spec), split, split_seed)
    if n is not None:
        if n < 1:
            raise MdiffError(f"{{option}} must be ≥ 1, got {n}", option="n")
        prompts = prompts[:n]
    btok = models.load_tokenizer(spec.base, spec.base_revision, "base")
    ttok = models.load_tokenizer(spec.tuned, spec.tuned_revision, "tuned")
    sv = align.shared_vocab(btok, ttok, info.base.d_vocab, info.tuned.d_vocab)
    prepared = align.prepare(prompts, btok, ttok, info.tokenizer_relation, spec.chat_template, positions,
                             spec.min_shared_ratio, shared=sv)
    prepared = check_lengths(prepared, spec)
    from mdiff.data import pad_id_of

    return prepared, pad_id_of(btok), pad_id_of(ttok), sv


def token_limit(spec) -> tuple[int | None, str]:
    """The longest prompt allowed, in tokens, and where that limit comes from."""
    from mdiff import models

    ctx = [c for c in (models.context_length(spec.base, spec.base_revision, "base"),
                       models.context_length(spec.tuned, spec.tuned_revision, "tuned")) if c]
    limits = [(min(ctx), f"the models' context of {min(ctx)} positions")] if ctx else []
    if getattr(spec, "max_tokens", None):
        limits.append((spec.max_tokens, f"max_tokens = {spec.max_tokens}"))
    return min(limits) if limits else (None, "no limit")


def check_lengths(prepared: Prepared, spec) -> Prepared:
    """Refuse (``too_long = "error"``, the default) or drop and count (``"drop"``) prompts longer than
    :func:`token_limit` under either tokenization."""
    limit, why = token_limit(spec)
    if limit is None:
        return prepared
    lengths = [max(len(b), len(t)) for b, t in zip(prepared.base_ids, prepared.tuned_ids, strict=True)]
    over = [i for i, n in enumerate(lengths) if n > limit]
    if not over:
        return prepared
    worst = max(over, key=lambda i: lengths[i])
    what = (f"{len(over)} of {len(lengths)} prompts are longer than {why} (the longest, "
            f"{prepared.prompt_ids[worst]!r}, has {lengths[worst]} tokens)")
    if getattr(spec, "too_long", "error") != "drop":
        raise MdiffError(f"{what}: shorten them, or set too_long = \"drop\" in the pair file to skip them")
    keep = [i for i in range(len(lengths)) if lengths[i] <= limit]
    if not keep:
        raise MdiffError(f"{what}: none is left to analyse")
    out = prepared.subset(keep)
    out.dropped_too_long = prepared.dropped_too_long + len(over)
    return out


def store_meta(spec, info, side: str, prepared: Prepared, positions, split: str | None, split_seed: int,
               pad_id: int) -> dict[str, Any]:
    """What identifies a collection besides its prompts and tokens: model, revision, weights, tokenizer, settings."""
    from mdiff import models

    return {"pair": spec.name, "model": spec.base if side == "base" else spec.tuned,
            "revision": spec.base_revision if side == "base" else spec.tuned_revision,
            "tokenizer_sha256": info.base_tokenizer_hash if side == "base" or prepared.tokenized_with == "shared"
            else info.tuned_tokenizer_hash,
            "tokenizer_relation": info.tokenizer_relation, "dtype": spec.dtype, "split": split or "all",
            "split_seed": split_seed, "positions": positions.to_dict(), "chat_template": spec.chat_template,
            "min_shared_ratio": spec.min_shared_ratio, "pad_id": pad_id,
            "weights": models.weights_fingerprint(*((spec.base, spec.base_revision) if side == "base"
                                                     else (spec.tuned, spec.tuned_revision)))}


def collect_pair(spec, layers: list[int], hooks: list[str], positions, split: str | None, out: str | Path,
                 sides: tuple[str, ...] = ("base", "tuned"), split_seed: int = 0, batch_size: int = 16,
                 shard_prompts: int = 64, device: str | None = None, n: int | None = None,
                 on_progress: Callable[[str, int, int], None] | None = None,
                 replace: bool = False) -> dict[str, CollectResult]:
    """Collect both sides of a pair, one model in memory at a time."""
    from mdiff import models

    info = models.inspect_pair(spec)
    n_layers = info.base.n_layers
    check_layers(layers, n_layers)
    for h in hooks:
        if h not in COLLECT_HOOKS:
            raise MdiffError(f"unknown hook {h!r}: choose from {', '.join(COLLECT_HOOKS)}")
    prepared, pad_b, pad_t, _ = prepare_pair_prompts(spec, info, positions, split, split_seed, n)
    results = {}
    for side in sides:
        meta = store_meta(spec, info, side, prepared, positions, split, split_seed, pad_b if side == "base" else pad_t)
        path = collection_dir(out, spec.name, side, split, positions.tag)
        with models.loaded(spec, side, device=device) as model:
            cb = (lambda d, t, s=side: on_progress(s, d, t)) if on_progress else None
            results[side] = collect(model, prepared, side, hooks, layers, path, meta, shard_prompts, batch_size, cb,
                                    replace=replace)
    return results
