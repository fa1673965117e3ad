"""The benchmark harness (``experiments/benchmarks/``) for the tests, imported as ``mdiff bench`` imports it."""

import importlib
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"


def harness(name: str):
    """``experiments/benchmarks/<name>.py`` imported by name, its folder on sys.path (as ``mdiff bench`` does)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)
