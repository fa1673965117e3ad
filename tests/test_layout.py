"""F10's layout rules, checked on the source: no import cycle between mdiff modules (lazy imports included), and
the benchmark harness lives outside the package."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _graph(pkg: Path) -> dict[str, set[str]]:
    mods = {p.stem for p in pkg.glob("*.py")}
    g: dict[str, set[str]] = {m: set() for m in mods}
    for m in mods:
        for node in ast.walk(ast.parse((pkg / f"{m}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "mdiff":
                g[m] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mdiff."):
                g[m].add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                g[m] |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mdiff.")}
        g[m] &= mods - {m}
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(g[u]):
            if state.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    return found


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "mdiff"
    pkg.mkdir()
    (pkg / "a.py").write_text("from mdiff import b\n")
    (pkg / "b.py").write_text("def f():\n    from mdiff.c import x  # a lazy import counts\n")
    (pkg / "c.py").write_text("import mdiff.a\n")
    assert _cycles(_graph(pkg)) == [["a", "b", "c", "a"]]


def test_no_import_cycle():
    assert _cycles(_graph(ROOT / "mdiff")) == []


def test_the_benchmark_harness_is_outside_the_package():
    assert not (ROOT / "mdiff" / "bench.py").exists() and not (ROOT / "mdiff" / "scale.py").exists()
    assert (ROOT / "experiments" / "benchmarks" / "engines.py").is_file()


def test_the_cli_starts_without_torch_pandas_or_sklearn():
    """Every command's options come from mdiff.config, which loads none of the heavy libraries: `mdiff --help`,
    `mdiff pairs` and a one-line input error stay fast."""
    import subprocess
    import sys

    code = ("import sys, mdiff.cli; heavy = [m for m in ('torch', 'pandas', 'sklearn', 'transformer_lens') "
            "if m in sys.modules]; print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
