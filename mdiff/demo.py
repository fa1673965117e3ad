"""``make demo``: the main job on the embedded default pair (builds the toys first if needed).

It describes the pair, then runs the newest analyses end to end (currently RQ1) into ``OUT/<pair>/``.
"""

import json
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from mdiff import models, toy
from mdiff.pairs import resolve_pair
from mdiff.positions import parse_positions
from mdiff.rq1 import RQ1Config, run_rq1


def run_demo(pair: str, out_dir: str, console: Console | None = None,
             progress: Callable[[str, float], None] | None = None) -> dict:
    console = console or Console()
    if pair.startswith("toy-") and not toy.is_built():
        console.print(f"[bold]building the offline toy pairs[/] into {toy.toy_dir()} (about a minute)...")
    spec = resolve_pair(pair, progress=True)
    info = models.inspect_pair(spec)
    d = info.base
    console.print(f"[bold]{spec.name}[/]: {d.n_layers} layers, d_model {d.d_model}, {d.n_heads} heads "
                  f"({d.n_kv_heads} kv), d_head {d.d_head}; vocab {info.base.d_vocab} → {info.tuned.d_vocab}; "
                  f"tokenizer relation: {info.tokenizer_relation}")
    if spec.truth:
        console.print(f"  planted truth: {json.dumps({k: spec.truth[k] for k in ('layer', 'heads', 'rank') if k in spec.truth})}")
    cfg = RQ1Config(layers=list(range(d.n_layers)), hooks=["resid_post", "attn_out", "mlp_out"],
                    positions=parse_positions("last"), n_boot=1000)
    s = run_rq1(spec, cfg, out_dir, overwrite=True, progress=progress)
    console.print("[bold]RQ1 where[/] (resid_post; CKA with 95% prompt-bootstrap CI, patch KL base→tuned):")
    for L in cfg.layers:
        console.print(f"  L{L}: CKA {s['cka'][L]:.4f}   patch KL {s['patch_kl_base_to_tuned'][L]:.4f} nats"
                      f"   (tuned→base {s['patch_kl_tuned_to_base'][L]:.4f})")
    console.print(f"  first divergent layer {s['first_divergent_layer']}; probe layers {s['suggested_probe_layers']}; "
                  f"control layer {s['suggested_control_layer']}; self-patch max KL {s['self_patch_max_kl']:.1e}")
    console.print(f"results and figures: {Path(s['path'])}/ (metrics.csv, summary.json, config.json, cka.html, "
                  f"patch_kl.html)")
    return s
