"""``make demo``: the main job on the embedded default pair (builds the toys first if needed).

It describes the pair, then runs the whole study (``mdiff study``: RQ1 → RQ2 on RQ1's probe layers →
RQ3 on RQ2's best site → RQ4 on the best attention layer) into ``OUT/<pair>/`` and writes the report
``OUT/<pair>/report/index.html`` (and ``summary.md``). Finished steps are kept on a re-run.
"""

import json
from collections.abc import Callable

from rich.console import Console

from mdiff import models, toy
from mdiff.pairs import resolve_pair
from mdiff.report import findings, load_results
from mdiff.study import StudyConfig, run_study


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
    rec = run_study(spec, StudyConfig(), out_dir, overwrite=True, say=lambda m: console.print(m, highlight=False),
                    progress=progress)
    console.print("[bold]findings[/] (generated from the numbers; the report has the figures and tables):")
    for f in findings(load_results(out_dir, spec.name)):
        console.print(f"  [bold]{f.rq.upper()}[/] {f.text}", highlight=False)
    console.print(f"report: {rec['report']} (open it in a browser; works offline) and summary.md beside it")
    return rec
