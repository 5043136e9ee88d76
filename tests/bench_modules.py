"""Benchmark scripts as modules, for the tests that check their numbers (benchmarks/ is not a
package: each script is loaded from its file once)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    """``benchmarks/NAME.py`` as the module ``bench_NAME`` (loaded once per process)."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def toy_retractions():
    """benchmarks/toy_retractions.py, its retractions registered in the library's tables."""
    module = load("toy_retractions")
    module.register()
    return module
