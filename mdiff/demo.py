"""``make demo``: the main job on the embedded default pair (builds the toys first if needed).

It describes the pair, then runs the analyses end to end into ``OUT/<pair>/``: RQ1, then RQ2 on RQ1's
suggested probe layers (with RQ1's control layer as the control site), and pins RQ2's winners.
"""

import json
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from mdiff import models, toy
from mdiff.pairs import resolve_pair
from mdiff.positions import parse_positions
from mdiff.rq1 import RQ1Config, run_rq1
from mdiff.rq2 import DEFAULT_SOLVERS, RQ2Config, freeze_winners, run_rq2


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
    cfg2 = RQ2Config(layers=s["suggested_probe_layers"], hooks=["resid_post", "attn_out"], solvers=list(DEFAULT_SOLVERS),
                     alphas=[0.5, 1.0], control_layer=s["suggested_control_layer"])
    s2 = run_rq2(spec, cfg2, out_dir, overwrite=True, progress=progress)
    console.print("[bold]RQ2 transport[/] (drop of the raw cross-patch KL on val, matched α):")
    for site in s2["sites"]:
        tag = " (control)" if site["control_site"] else ""
        console.print(f"  L{site['layer']} {site['hook']}{tag}: {site['verdict']}")
    console.print(f"results and figures: {s2['path']}/ (drop.html, r2_vs_drop.html, maps/); winners pinned in "
                  f"{freeze_winners(out_dir, spec.name)}")
    return {"rq1": s, "rq2": s2}
