"""Held-out toy settings (other K, features, alpha, beta, widths) agree with Theorem 3.

Slow (about 30 s each on 2 cores): run with ``make test-slow``.
"""

import pytest

from raretask.config import load_experiment
from raretask.runs.grid import GridRun, load_summary

COMMON = ["lr=0.003", "steps=6000", "batch_size=256"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "setting",
    [
        ["tasks=8", "features=8", "alpha=1.5", "beta=1.2", "width=[4,8,16,32]", "seed=[0,1]"],
        ["tasks=24", "features=8", "alpha=2.5", "beta=1.0", "width=[8,24,48]", "seed=0"],
    ],
)
def test_heldout_setting_agrees_with_theorem3(tmp_path, setting):
    GridRun(load_experiment(None, setting + COMMON), tmp_path / "run").run()
    rows = load_summary(tmp_path / "run")
    agreement = sum(r["agree"] for r in rows) / len(rows)
    assert agreement >= 0.95, agreement
