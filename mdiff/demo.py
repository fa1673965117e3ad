"""``make demo``: the main job on the embedded default pair."""

import json
from pathlib import Path

from rich.console import Console

from mdiff import models, toy
from mdiff.pairs import list_pairs, resolve_pair
from mdiff.quick import next_token_comparison


def run_demo(pair: str, out_dir: str, console: Console | None = None) -> dict:
    console = console or Console()
    if pair.startswith("toy-") and not toy.is_built():
        console.print(f"[bold]building the offline toy pairs[/] into {toy.toy_dir()} (about a minute)...")
    spec = resolve_pair(pair, progress=True)
    console.print(f"[bold]pairs[/]: {', '.join(r['name'] for r in list_pairs())}")
    info = models.inspect_pair(spec)
    console.print(f"[bold]{spec.name}[/]: base {spec.base}\n  tuned {spec.tuned}")
    d = info.base
    console.print(f"  shapes: {d.n_layers} layers, d_model {d.d_model}, {d.n_heads} heads ({d.n_kv_heads} kv), "
                  f"d_head {d.d_head}; vocab {info.base.d_vocab} → {info.tuned.d_vocab}; "
                  f"tokenizer relation: {info.tokenizer_relation}")
    if spec.truth:
        console.print(f"  planted truth: {json.dumps(spec.truth)}")
    cmp = next_token_comparison(spec, n=64)
    console.print(f"  next-token KL(base‖tuned) at the last position, {cmp['n_prompts']} prompts, shared vocab "
                  f"{cmp['shared_vocab']}: {cmp['kl_base_tuned_mean']:.4f} nats; top-1 agreement "
                  f"{cmp['top1_agreement']:.2f}")
    out = Path(out_dir) / spec.name
    out.mkdir(parents=True, exist_ok=True)
    result = {"pair": spec.to_dict(), "info": info.to_dict(), "comparison": cmp}
    tmp = out / "demo.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out / "demo.json")
    console.print(f"wrote {out / 'demo.json'}")
    return result
