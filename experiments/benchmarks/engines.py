"""Benchmark of the patching engines (``mdiff bench``): naive vs fast on identical inputs, in one process.

Part of the benchmark harness in ``experiments/benchmarks/`` (source checkout only, not the installed package):
``mdiff bench`` puts this folder on ``sys.path`` and imports this file as ``engines``;
``bench_patching.py`` next to it imports it as a sibling.

Workloads, on a pair's prompt set (all of it by default, split ``all``), at one layer (default the
last-but-one), prepared as RQ1/RQ2/RQ4 prepare them (:func:`mdiff.activations.prepare_pair_prompts`, the
decision position of each prompt) with one model in memory at a time:

1. base loaded: its ``z`` and ``resid_post`` at the layer, at the decision positions
   (:func:`mdiff.activations.gather_batch`); the per-head results ``z_h · W_O_base[h]``;
2. tuned loaded: its ``resid_post`` there; then, target = tuned:

   * **rq4-grid**: ``result``-site :class:`~mdiff.patching.HeadPatch` conditions with the base heads as the
     source: the single-head scan (``n_heads``), top-k for k in 1, 2, 4 (≤ ``n_heads``; heads ranked by the
     scan), 20 random k-sets per k (drawn independently, so with few heads some sets repeat), all heads;
   * **rq2-alpha base→tuned**: :class:`~mdiff.patching.SitePatch` ``resid_post`` blend with α in
     0.25, 0.5, 0.75, 1.0 and the base activation as the source;
3. base loaded again: **rq2-alpha tuned→base**, the same sweep with the tuned activation patched into base.

Each workload is one ``Patcher(...).kl(conditions, shared_vocab)`` call from scratch (clean logits
included), timed with ``time.perf_counter`` ``repeats`` times per engine, interleaved (naive, fast, naive,
fast, ...), after one untimed warm-up call of each engine on two prompts; the medians are reported, and
the largest ``|KL_fast − KL_naive|`` over every condition, prompt and repeat.

**Peak memory** (``memory=True``): each (workload, engine) runs once more in a fresh child process
(``multiprocessing`` spawn) that loads the model, runs a two-prompt warm-up, then resets the kernel's
peak-RSS mark (``/proc/self/clear_refs``, value 5) and reports ``VmHWM − VmRSS`` measured just before the
run: the peak resident memory the evaluation added above the loaded model. Where ``clear_refs`` is not
writable (not Linux), the child reports ``ru_maxrss`` minus the RSS before the run instead, which is only
an upper bound when the model load itself peaked higher. On a CUDA ``device`` the child reports
``torch.cuda.max_memory_allocated`` above the allocation before the run (GPU memory; untested here, no GPU).
``memory_method`` says which was used.
"""

import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _memory import proc_status, reset_peak

from mdiff.errors import MdiffError
from mdiff.pairs import PairSpec

ALPHAS = (0.25, 0.5, 0.75, 1.0)
RANDOM_SETS = 20
_MIB = 2.0 ** 20


def _grid(n_heads: int, ranking: list[int], seed: int) -> list[tuple[int, ...]]:
    ks = [k for k in (1, 2, 4) if k <= n_heads]
    rng = np.random.default_rng(seed)
    sets = [(h,) for h in range(n_heads)]
    sets += [tuple(sorted(ranking[:k])) for k in ks]
    sets += [tuple(sorted(int(h) for h in rng.choice(n_heads, size=k, replace=False)))
             for k in ks for _ in range(RANDOM_SETS)]
    sets.append(tuple(range(n_heads)))
    return sets


def _gather(model, ids, positions, names, pad_id, batch_size, stop):
    import torch

    from mdiff import activations as A

    parts: dict[str, list] = {n: [] for n in names}
    for s in range(0, len(ids), batch_size):
        got = A.gather_batch(model, ids[s:s + batch_size], [[p[-1]] for p in positions[s:s + batch_size]], names,
                             pad_id, stop_at_layer=stop)
        for n in names:
            parts[n].append(got[n])
    return {n: torch.cat(v).float() for n, v in parts.items()}


def _save_payload(prefix: str, w, batch_size: int) -> None:
    """A workload for the child process as safetensors (tensors) + JSON (the rest): never a pickle on disk."""
    import torch
    from safetensors.torch import save_file

    from mdiff.patching import SitePatch

    tensors, conds, seen = {"vocab": torch.as_tensor(np.asarray(w.vocab))}, [], {}
    for c in w.conds:
        key = seen.setdefault(id(c.source), f"src{len(seen)}")
        tensors[key] = c.source.contiguous()
        conds.append({"kind": type(c).__name__, "layer": c.layer, "alpha": c.alpha, "mode": c.mode, "source": key,
                      **({"hook": c.hook} if isinstance(c, SitePatch) else {"heads": list(c.heads), "site": c.site})})
    save_file(tensors, prefix + ".safetensors")
    Path(prefix + ".json").write_text(json.dumps({"ids": w.ids, "positions": w.positions, "pad": w.pad,
                                                  "batch_size": batch_size, "conds": conds}))


def _load_payload(prefix: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    from mdiff.patching import HeadPatch, SitePatch

    t = load_file(prefix + ".safetensors")
    d = json.loads(Path(prefix + ".json").read_text())
    conds = [SitePatch(c["layer"], c["hook"], t[c["source"]], c["alpha"], c["mode"]) if c["kind"] == "SitePatch"
             else HeadPatch(c["layer"], tuple(c["heads"]), c["site"], t[c["source"]], c["alpha"], c["mode"])
             for c in d["conds"]]
    return {**d, "vocab": t["vocab"].numpy(), "conds": conds}


def _peak_child(pair, side: str, payload: str, engine: str, device: str, threads: int, conn) -> None:
    """Child process: load ``side``, warm up, reset the peak-RSS mark, run one evaluation, report the peak."""
    try:
        import gc

        import torch

        from mdiff import models
        from mdiff.pairs import resolve_pair
        from mdiff.patching import Patcher

        torch.set_num_threads(threads)
        spec = resolve_pair(pair) if isinstance(pair, str) else pair
        data = _load_payload(payload)
        ids, pos, pad, vocab, conds, bs = (data[k] for k in ("ids", "positions", "pad", "vocab", "conds",
                                                              "batch_size"))
        with models.loaded(spec, side, device) as model:
            warm = [dataclasses.replace(c, source=c.source[:2]) for c in conds[:1]]
            Patcher(model, ids[:2], pos[:2], pad, bs, engine).kl(warm, vocab)
            gc.collect()
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                Patcher(model, ids, pos, pad, bs, engine).kl(conds, vocab)
                torch.cuda.synchronize()
                peak, method = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
            else:
                method = "VmHWM after clear_refs" if reset_peak() else "ru_maxrss (upper bound)"
                before = proc_status()["VmRSS"] if sys.platform.startswith("linux") else 0
                Patcher(model, ids, pos, pad, bs, engine).kl(conds, vocab)
                if method.startswith("VmHWM"):
                    peak = proc_status()["VmHWM"]
                else:
                    scale = 1 if sys.platform == "darwin" else 1024
                    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        conn.send({"peak_bytes": max(0, peak - before), "method": method})
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def _importable_by_child() -> None:
    """spawn pickles ``_peak_child`` by module name: a fresh interpreter must import this file as ``__name__``.

    The child gets the parent's ``sys.path``, so this file's folder goes on it (``mdiff bench`` already puts it
    there; a script run from the folder has it as ``sys.path[0]``; ``__main__`` is re-run by spawn itself).
    """
    here = Path(__file__).resolve().parent
    if __name__ not in ("__main__", Path(__file__).stem):
        raise MdiffError(f"the benchmark harness was imported as {__name__!r}: import it as {Path(__file__).stem!r} "
                         f"with {here} on sys.path, so the memory child process can import it too")
    if not any(Path(p or ".").resolve() == here for p in sys.path):
        sys.path.insert(0, str(here))


def _measure_peak(pair, side: str, payload: str, engine: str, device: str) -> dict[str, Any]:
    import multiprocessing as mp

    import torch

    _importable_by_child()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_peak_child, args=(pair, side, payload, engine, device, torch.get_num_threads(), child))
    proc.start()
    child.close()
    try:
        out = parent.recv()
    except EOFError:
        out = {"error": f"the memory child exited with code {proc.exitcode}"}
    proc.join()
    if "error" in out:
        raise MdiffError(f"peak-memory measurement ({engine}, {side}) failed: {out['error']}")
    return out


@dataclasses.dataclass
class _Workload:
    name: str
    side: str
    ids: list
    positions: list
    pad: int
    vocab: np.ndarray
    conds: list


def _time_workload(model, w: _Workload, repeats: int, batch_size: int) -> dict[str, Any]:
    from mdiff.patching import Patcher

    warm = [dataclasses.replace(c, source=c.source[:2]) for c in w.conds[:2]]
    fast_used = Patcher(model, w.ids[:2], w.positions[:2], w.pad, batch_size, "fast")
    fast_used.kl(warm, w.vocab)
    Patcher(model, w.ids[:2], w.positions[:2], w.pad, batch_size, "naive").kl(warm, w.vocab)
    times: dict[str, list[float]] = {"naive": [], "fast": []}
    diff = 0.0
    for _ in range(repeats):
        out = {}
        for engine in ("naive", "fast"):
            t0 = time.perf_counter()
            out[engine] = Patcher(model, w.ids, w.positions, w.pad, batch_size, engine).kl(w.conds, w.vocab)
            times[engine].append(time.perf_counter() - t0)
        diff = max(diff, float(np.abs(out["fast"] - out["naive"]).max()))
    naive_s, fast_s = statistics.median(times["naive"]), statistics.median(times["fast"])
    return {"workload": w.name, "target": w.side, "conditions": len(w.conds), "prompts": len(w.ids),
            "naive_s": naive_s, "fast_s": fast_s, "speedup": naive_s / fast_s if fast_s > 0 else math.inf,
            "max_kl_diff": diff, "mean_kl": float(out["naive"].mean()), "fast_engine_used": fast_used.engine_used,
            "naive_times": times["naive"], "fast_times": times["fast"]}


def run_bench(pair: str | PairSpec = "toy-lowrank", n_prompts: int | None = None, layer: int | None = None,
              repeats: int = 3, batch_size: int = 32, seed: int = 0,
              say: Callable[[str, float], None] | None = None, memory: bool = True,
              device: str = "cpu") -> dict[str, Any]:
    """Time the naive and the fast patching engines on the RQ4 head grid and the RQ2 α sweep (module docstring).

    ``pair`` is a pair name, a pair ``.toml`` path or a :class:`~mdiff.pairs.PairSpec`. ``say(message, fraction)``
    reports progress. Returns ``{"pair", "layer", "n_layers", "n_heads", "prompts", "batch_size", "repeats", "device",
    "threads", "memory_method", "workloads": [row, ...]}``; each row has ``workload``, ``target``,
    ``conditions``, ``prompts``, ``naive_s``, ``fast_s``, ``speedup``, ``naive_peak_mib``,
    ``fast_peak_mib``, ``peak_ratio`` (fast / naive; ``None`` without ``memory``), ``max_kl_diff``,
    ``mean_kl``, ``fast_engine_used`` and the raw ``naive_times`` / ``fast_times``.
    """
    import torch

    from mdiff import activations as A
    from mdiff import hooks as H
    from mdiff import models
    from mdiff.pairs import resolve_pair
    from mdiff.patching import HeadPatch, Patcher, SitePatch
    from mdiff.positions import parse_positions

    say = say or (lambda msg, frac: None)
    for name, v, lo in (("repeats", repeats, 1), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise MdiffError(f"{name} must be a whole number ≥ {lo}, got {v!r}")
    if n_prompts is not None and (isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 2):
        raise MdiffError(f"the prompt count must be a whole number ≥ 2, got {n_prompts!r}")
    say("preparing prompts", 0.0)
    spec = resolve_pair(pair) if isinstance(pair, str) else pair
    info = models.inspect_pair(spec)
    n_layers, n_heads = info.base.n_layers, info.base.n_heads
    if layer is None:
        layer = max(0, n_layers - 2)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise MdiffError(f"layer {layer!r} is out of range 0..{n_layers - 1}")
    prep, pad_b, pad_t, sv = A.prepare_pair_prompts(spec, info, parse_positions("last", seed=seed), "all", seed,
                                                    n_prompts)
    if len(prep) < 2:
        raise MdiffError(f"only {len(prep)} prompt(s) survive preparation; the benchmark needs at least 2")
    z_name, r_name = H.hook_name("z", layer, n_layers), H.hook_name("resid_post", layer, n_layers)
    stop = layer + 1 if layer + 1 < n_layers else None
    rows: list[dict[str, Any]] = []
    workloads: list[_Workload] = []

    say("loading base: collecting its z and resid_post", 0.02)
    with models.loaded(spec, "base", device) as base:
        got = _gather(base, prep.base_ids, prep.base_positions, [z_name, r_name], pad_b, batch_size, stop)
        head_src = H.head_results(got[z_name], base.blocks[layer].attn.W_O.detach().float().cpu())
        base_resid = got[r_name]
    say("loading tuned", 0.08)
    with models.loaded(spec, "tuned", device) as tuned:
        tuned_resid = _gather(tuned, prep.tuned_ids, prep.tuned_positions, [r_name], pad_t, batch_size, stop)[r_name]
        ids_t, pos_t = prep.tuned_ids, prep.tuned_positions
        scan = Patcher(tuned, ids_t, pos_t, pad_t, batch_size).kl(
            [HeadPatch(layer, (h,), "result", head_src) for h in range(n_heads)], sv.tuned_ids)
        ranking = sorted(range(n_heads), key=lambda h: (-float(scan[h].mean()), h))
        grid = [HeadPatch(layer, s, "result", head_src) for s in _grid(n_heads, ranking, seed)]
        workloads.append(_Workload("rq4-grid", "tuned", ids_t, pos_t, pad_t, sv.tuned_ids, grid))
        workloads.append(_Workload("rq2-alpha base→tuned", "tuned", ids_t, pos_t, pad_t, sv.tuned_ids,
                                   [SitePatch(layer, "resid_post", base_resid, a) for a in ALPHAS]))
        for i, w in enumerate(workloads):
            say(f"timing {w.name}: {len(w.conds)} conditions × {len(w.ids)} prompts, {repeats} repeats", 0.1 + 0.4 * i)
            rows.append(_time_workload(tuned, w, repeats, batch_size))
    say("loading base (tuned→base sweep)", 0.75)
    rev = _Workload("rq2-alpha tuned→base", "base", prep.base_ids, prep.base_positions, pad_b, sv.base_ids,
                    [SitePatch(layer, "resid_post", tuned_resid, a) for a in ALPHAS])
    workloads.append(rev)
    with models.loaded(spec, "base", device) as base:
        say(f"timing {rev.name}", 0.78)
        rows.append(_time_workload(base, rev, repeats, batch_size))

    method = None
    if memory:
        with tempfile.TemporaryDirectory(prefix="mdiff-bench-") as tmp:
            for i, (w, row) in enumerate(zip(workloads, rows, strict=True)):
                payload = str(Path(tmp) / f"w{i}")
                _save_payload(payload, w, batch_size)
                for engine in ("naive", "fast"):
                    say(f"peak memory: {w.name}, {engine} (child process)", 0.85 + 0.05 * i)
                    got = _measure_peak(spec, w.side, payload, engine, device)
                    row[f"{engine}_peak_mib"] = got["peak_bytes"] / _MIB
                    method = got["method"]
                row["peak_ratio"] = row["fast_peak_mib"] / row["naive_peak_mib"] if row["naive_peak_mib"] else None
    else:
        for row in rows:
            row.update(naive_peak_mib=None, fast_peak_mib=None, peak_ratio=None)
    say("done", 1.0)
    return {"pair": spec.name, "layer": layer, "n_layers": n_layers, "n_heads": n_heads, "prompts": len(prep),
            "batch_size": batch_size, "repeats": repeats, "device": device, "threads": torch.get_num_threads(),
            "memory_method": method or "not measured", "workloads": rows}


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`run_bench`'s result (one line per workload)."""

    def mib(v):
        return "—" if v is None else f"{v:.1f}"

    head = (f"patching engines on {result['pair']}, layer {result['layer']} of {result['n_layers']}, "
            f"{result['prompts']} prompts, batch {result['batch_size']}, median of {result['repeats']} interleaved "
            f"runs, {result['threads']} torch thread(s), {result['device']}")
    cols = ["workload", "conds", "prompts", "naive s", "fast s", "speed-up", "naive MiB", "fast MiB", "fast/naive",
            "max |ΔKL|"]
    lines = []
    for r in result["workloads"]:
        ratio = "—" if r.get("peak_ratio") is None else f"{r['peak_ratio']:.2f}"
        lines.append([r["workload"], str(r["conditions"]), str(r["prompts"]), f"{r['naive_s']:.3f}",
                      f"{r['fast_s']:.3f}", f"{r['speedup']:.1f}×", mib(r.get("naive_peak_mib")),
                      mib(r.get("fast_peak_mib")), ratio, f"{r['max_kl_diff']:.1e}"])
    widths = [max(len(c), *(len(x[i]) for x in lines)) for i, c in enumerate(cols)]

    def fmt(xs):
        return "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(xs, widths, strict=True)))

    out = [head, fmt(cols), fmt(["-" * w for w in widths]), *(fmt(x) for x in lines)]
    if result["memory_method"] == "not measured":
        out.append("peak memory: not measured")
    else:
        out.append(f"peak memory: {result['memory_method']} (above the loaded model, each engine in its own child "
                   "process)")
    fell_back = [r["workload"] for r in result["workloads"] if r.get("fast_engine_used") != "fast"]
    if fell_back:
        out.append(f"note: the fast engine fell back to the naive one on: {', '.join(fell_back)}")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover - python experiments/benchmarks/engines.py
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(format_table(run_bench(say=lambda m, f: print(f"[{f:4.0%}] {m}", file=sys.stderr))))
