"""The issue-19 LM configs (Fig. 5 at scale, the T_ADD grokking recipe, Fig. 8 retention): loaded
through the real config loader, their grids have what the issue asks for, and the costs written in
their headers are the ones their cells imply."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest

from raretask.config import load_experiment
from raretask.lm.model import ModelConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
H100_30 = 0.3 * 989e12  # the headers' planning rate: 30% of an H100's dense bf16 peak
NAMES = ("fig5_lm_scale", "fig5_lm_add_grok", "fig8_lm_retention", "fig5_lm_lr_scan")


def cells(name: str):
    return list(load_experiment(CONFIGS / f"{name}.yaml").cells())


def flops(name: str) -> tuple[float, dict[str, float]]:
    per = defaultdict(float)
    for c in cells(name):
        cfg = ModelConfig.preset(c.size, vocab_size=c.vocab_size, max_seq_len=c.seq_len)
        per[c.size] += cfg.flops_per_token(c.seq_len) * c.steps * c.batch_size * c.seq_len
    return sum(per.values()), dict(per)


@pytest.mark.parametrize("name", NAMES)
def test_header_cost_matches_the_cells(name):
    header = (CONFIGS / f"{name}.yaml").read_text().split("\nkind:")[0]
    total, per = flops(name)
    stated = float(re.search(r"Cost: ([0-9.]+e[0-9]+) training FLOPs", header).group(1))
    assert stated == pytest.approx(total, rel=5e-3)
    seconds = int(re.search(r"= (\d+) s at 30%", header).group(1))
    assert seconds == pytest.approx(total / H100_30, abs=1)
    for size, value in per.items():  # "150m 23.2e16" style, in units of 1e16
        m = re.search(rf"\b{size} ([0-9.]+)e16", header)
        assert float(m.group(1)) * 1e16 == pytest.approx(value, rel=0.01), size


def test_fig5_scale_grid_is_what_the_issue_asks():
    cs = cells("fig5_lm_scale")
    n = {s: ModelConfig.preset(s).num_params(False) for s in {c.size for c in cs}}
    assert max(n.values()) >= 100e6
    for task in ("cmp", "add"):  # each task: >= 4 sizes over >= 25x, >= 5 rates, 3 seeds
        mine = [c for c in cs if c.task == task]
        sizes = {c.size for c in mine}
        assert len(sizes) >= 4 and max(n[s] for s in sizes) / min(n[s] for s in sizes) >= 25
        assert len({c.rate for c in mine}) >= 5 and {c.seed for c in mine} == {0, 1, 2}
        assert all(c.probes and c.trace_windows == 0 for c in mine)
    # variant by variant: every T_CMP cell before any T_ADD one
    assert [c.task for c in cs] == ["cmp"] * 75 + ["add"] * 63
    # seed slowest: a call cut short leaves whole seeds; in each seed the largest size first
    assert [c.seed for c in cs[:75]] == [0] * 25 + [1] * 25 + [2] * 25
    assert [c.size for c in cs[:25:5]] == ["150m", "60m", "20m", "4m", "tiny"]
    assert cs[75].size == "60m"
    # each task its own budget: T_CMP fig5_lm_heatmap's, T_ADD fig5_lm_add_grok's recipe
    assert {(c.steps, c.batch_size, c.seq_len) for c in cs if c.task == "cmp"} == {(1000, 64, 128)}
    grok = cells("fig5_lm_add_grok")[0]
    assert {(c.steps, c.batch_size, c.seq_len, c.lr, c.weight_decay) for c in cs
            if c.task == "add"} == {(grok.steps, grok.batch_size, grok.seq_len, grok.lr, 0.1)}
    top = [c for c in cs if c.task == "add" and c.size == "150m"]
    assert len(top) == 3 and {c.rate for c in top} == {max(c.rate for c in cs)}


def test_lr_scan_cells_are_the_scale_grids_but_for_the_learning_rate():
    """The scan is a comparison only if its cells are fig5_lm_scale's T_CMP cells at the same
    sizes, rate and seeds in every field but lr (the grid's lr is the scan's reference)."""
    scan = cells("fig5_lm_lr_scan")
    grid = {(c.size, c.seed): c for c in cells("fig5_lm_scale")
            if c.task == "cmp" and c.rate == scan[0].rate}
    assert len(scan) == 12 and {c.size for c in scan} == {"150m", "60m"}
    reference_lr = grid["150m", 0].lr
    assert sorted({c.lr for c in scan}) == [1e-3, 6e-3] and reference_lr == 3e-3
    for c in scan:
        mine, theirs = c.model_dump(), grid[c.size, c.seed].model_dump()
        assert {k for k in mine if mine[k] != theirs[k]} == {"lr"}


def test_grok_config_contrasts_weight_decay_at_many_passes():
    cs = cells("fig5_lm_add_grok")
    assert {c.weight_decay for c in cs} == {0.1, 1.0} and {c.task for c in cs} == {"add"}
    for c in cs:
        per_step = c.rate * c.batch_size * c.seq_len
        assert per_step == 64 and c.steps * per_step / 5000 == 153.6  # passes over the train split


def test_fig8_bursts_fit_a_batch_and_are_traced():
    cs = cells("fig8_lm_retention")
    assert len(cs) == 30 and {c.every for c in cs} == {8, 32}
    for c in cs:
        assert c.injection_size <= c.batch_size and c.trace_windows == 6 and not c.probes
        assert (c.steps + 1) % c.every == 0  # the last evaluation falls just before a burst
