"""What a study costs at 8B width: RQ1 on the full-width Llama-3.1 fixture, measured step by step.

The scale benchmark (``mdiff bench`` with ``scale`` on) runs :func:`mdiff.rq1.run_rq1` on ``llama31-fixture``
(d_model 4096, d_ff 14,336, 128,256 / 159,766-id vocabularies, 2 layers, bf16) and records, for every step RQ1
reports (loading, collection, behaviour diagnostics, patching, ...):

* wall time;
* peak resident memory (RSS) of the process during the step (Linux: ``VmHWM``, reset between steps
  through ``/proc/self/clear_refs``), and peak GPU memory on CUDA;
* bytes on disk under the output folder after the step;
* the most models resident at once during the step (:func:`mdiff.models.resident_models`).

It also times one MLP-sized matmul in bfloat16 and in float32 on the device, to say which compute
dtype is faster there. The targets (issue F8) are checked and reported, not assumed.

Part of the benchmark harness in ``experiments/benchmarks/`` (source checkout only, not the installed package):
``mdiff bench --scale`` puts this folder on ``sys.path`` and imports this file as ``scale``.
"""

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _memory import proc_status, reset_peak

from mdiff.errors import MdiffError

GIB = 1024 ** 3


def _vm_hwm() -> int | None:
    """Peak RSS of this process in bytes since the last reset (Linux), else ``ru_maxrss``."""
    peak = proc_status(("VmHWM",)).get("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # noqa: BLE001
        return None


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def weights_bytes(model_dir: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def matmul_speed(device: str = "cpu", m: int = 256, k: int = 4096, n: int = 14336, repeats: int = 3) -> dict:
    """Seconds for one ``[m, k] @ [k, n]`` matmul (an MLP projection of m tokens) in bf16 and in float32."""
    import torch

    out = {}
    for name, dt in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        a = torch.randn(m, k, device=device).to(dt)
        b = torch.randn(k, n, device=device).to(dt)
        a @ b  # warm-up
        ts = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        out[name] = min(ts)
    out["faster"] = min(("bfloat16", "float32"), key=out.get)
    out["shape"] = [m, k, n]
    return out


class StepMeter:
    """Closes a step on every progress message: wall time, peak RSS/GPU memory, disk bytes, models resident."""

    def __init__(self, out_dir: Path, device: str):
        self.out_dir, self.device = out_dir, device
        self.rows: list[dict[str, Any]] = []
        self.name: str | None = None
        self.t0 = time.perf_counter()
        self.cuda = device.startswith("cuda")
        self.can_reset = reset_peak()
        import gc

        from mdiff import models

        gc.collect()
        self.baseline = models.resident_models()["now"]  # models some caller already holds: not this run's
        self._start()

    def _start(self) -> None:
        from mdiff import models

        self.t = time.perf_counter()
        reset_peak()
        models.reset_resident_peak()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def step(self, msg: str, frac: float | None = None) -> None:
        self.close()
        self.name = msg

    def close(self) -> None:
        from mdiff import models

        if self.name is not None:
            row = {"step": self.name, "seconds": round(time.perf_counter() - self.t, 2),
                   "peak_rss_gib": round((_vm_hwm() or 0) / GIB, 2),
                   "rss_after_gib": round(proc_status(("VmRSS",)).get("VmRSS", 0) / GIB, 2),
                   "disk_mib": round(_du(self.out_dir) / 2 ** 20, 1),
                   "models_resident_max": models.resident_models()["peak"] - self.baseline}
            if self.cuda:
                import torch

                row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
            self.rows.append(row)
        self.name = None
        self._start()


def run_scale(pair: str = "llama31-fixture", n: int = 16, out: str | Path = "results", device: str | None = None,
              bootstrap: int = 200, say: Callable[[str, float], None] = lambda m, f: None) -> dict[str, Any]:
    """RQ1 on every layer of ``pair`` with ``n`` prompts (behaviour diagnostics included), measured per step."""
    from mdiff import models
    from mdiff.pairs import resolve_pair
    from mdiff.positions import parse_positions
    from mdiff.rq1 import RQ1Config, run_rq1

    if n < 2:
        raise MdiffError(f"the scale benchmark needs at least 2 prompts, got {n}")
    device = device or models.default_device()
    say("building/loading the fixture", 0.0)
    spec = resolve_pair(pair, progress=False)
    info = models.inspect_pair(spec)
    out = Path(out)
    meter = StepMeter(out / spec.name, device)
    cfg = RQ1Config(layers=list(range(info.base.n_layers)), hooks=["resid_post"], positions=parse_positions("last"),
                    split="all", n=n, n_boot=bootstrap, seed=0, batch_size=16, device=device)
    t0 = time.perf_counter()

    def progress(msg: str, frac: float) -> None:
        meter.step(msg, frac)
        say(msg, frac)

    error = None
    try:
        summary = run_rq1(spec, cfg, out, overwrite=True, progress=progress)
    except MdiffError as e:  # a failed check at the end (e.g. the self-patch sanity check) still leaves timings
        summary, error = {"path": None}, str(e)
    meter.close()
    total = time.perf_counter() - t0
    wb, wt = weights_bytes(spec.base), weights_bytes(spec.tuned)
    one = max(wb, wt)
    peak = max(r["peak_rss_gib"] for r in meter.rows)
    res = {
        "pair": spec.name, "device": device, "dtype": spec.dtype, "n_prompts": n, "n_layers": info.base.n_layers,
        "d_model": info.base.d_model, "d_vocab": [info.base.d_vocab, info.tuned.d_vocab],
        "torch_threads": _threads(), "total_seconds": round(total, 1), "steps": meter.rows,
        "weights_gib": {"base": round(wb / GIB, 2), "tuned": round(wt / GIB, 2)},
        "peak_rss_gib": peak, "rss_target_gib": round(1.5 * one / GIB + 1, 2),
        "models_resident_max": max(r["models_resident_max"] for r in meter.rows),
        "rss_reset_per_step": meter.can_reset, "rq1_path": summary["path"] and str(summary["path"]),
        "rq1_error": error,
        "matmul": matmul_speed(device if device != "auto" else "cpu"),
    }
    res["meets"] = {"one_model_resident": res["models_resident_max"] <= 1,
                    "peak_rss": peak <= res["rss_target_gib"], "rq1_under_10_min": total <= 600}
    return res


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def format_scale(res: dict[str, Any]) -> str:
    """The per-step table (markdown) and the checks."""
    cols = ["step", "seconds", "peak_rss_gib", "rss_after_gib", "disk_mib", "models_resident_max"]
    if any("peak_gpu_gib" in r for r in res["steps"]):
        cols.append("peak_gpu_gib")
    lines = [f"{res['pair']}: {res['n_layers']} layers, d_model {res['d_model']}, vocab {res['d_vocab']}, "
             f"{res['dtype']} on {res['device']} ({res['torch_threads']} threads), {res['n_prompts']} prompts; "
             f"weights {res['weights_gib']} GiB", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in res["steps"]:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    m = res["matmul"]
    lines += ["", f"total {res['total_seconds']} s; peak RSS {res['peak_rss_gib']} GiB (target ≤ "
                  f"{res['rss_target_gib']} GiB); at most {res['models_resident_max']} model(s) resident; "
                  f"checks: {json.dumps(res['meets'])}"
              + (f"; RQ1 ended with an error: {res['rq1_error']}" if res.get("rq1_error") else ""),
              f"matmul {m['shape']}: bf16 {m['bfloat16'] * 1e3:.1f} ms, float32 {m['float32'] * 1e3:.1f} ms "
              f"-> {m['faster']} is faster here"]
    return "\n".join(lines)


def write_scale(res: dict[str, Any], folder: str | Path) -> Path:
    """Write ``scale-<device>-<time>.json`` and ``.md`` (new files; never overwrites)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = folder / f"scale-{res['pair']}-{res['device'].replace(':', '')}-{stamp}"
    for suffix, text in ((".json", json.dumps(res, indent=2)), (".md", format_scale(res) + "\n")):
        tmp = base.with_name(f".{base.name}{suffix}.tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, base.with_name(base.name + suffix))
    return base.with_suffix(".md")
