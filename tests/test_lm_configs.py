"""The shipped language-model configs (Fig. 5, 6, 9): loaded through the real config loader,
their grids have the axes each figure needs, their cost comments match their cells, and a
frequency delivered every `every` steps (matched frequency) injects what it says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from raretask.config import load_experiment, load_yaml
from raretask.errors import UserError
from raretask.lm.config import LMCell
from raretask.lm.model import PRESETS, ModelConfig
from raretask.lm.tasks import InjectionSchedule
from raretask.lm.trainer import LMTrainSettings, cuda_graphs
from raretask.runs.profile import Profile
from raretask.studies.lm import build_trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
H100_FLOPS = 0.2 * 989e12  # 20% of an H100's dense bf16 peak: the configs' stated estimate
BUDGET_S = 300  # the lead's budget per config on one H100
SIZES = ["tiny", "4m", "20m"]

# name -> (cells, axes in config order)
EXPECTED = {
    "fig5_lm_heatmap": (24, {"size": SIZES, "task": ["cmp", "add"],
                             "rate": [1 / 128, 1 / 256, 1 / 512, 1 / 1024]}),
    "fig6_lm_schedule": (18, {"size": SIZES, "rate": [1 / 512, 1 / 1024],
                              "every": [1, 2, 4]}),
    "fig9_lm_gradients": (9, {"size": SIZES, "seed": [0, 1, 2]}),
}


def load(name: str):
    return load_experiment(CONFIGS / f"{name}.yaml")


def cells(name: str) -> list[LMCell]:
    return list(load(name).cells())


def test_every_shipped_lm_config_is_checked_here():
    shipped = {p.stem for p in CONFIGS.glob("*.yaml") if load_yaml(p).get("kind") == "lm"
               and not p.stem.startswith("fix_")}  # fix_lm.yaml: tests/test_mixing_fix.py
    shipped -= {"fig5_lm_scale", "fig5_lm_add_grok", "fig8_lm_retention",  # test_lm_scale_configs
                "fig5_lm_lr_scan"}
    assert shipped == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_grid_expands_to_the_expected_cells_and_axes(name):
    grid = load(name)
    n_cells, axes = EXPECTED[name]
    assert grid.kind == "lm" and grid.name == name
    assert grid.axes == axes
    assert len(cells(name)) == n_cells
    for cell in cells(name):
        assert cell.source == "ngram"  # a background that never repeats
        assert cell.corpus == "kjv" and cell.vocab_size == 4096 and cell.seq_len == 128
        assert cell.task_seed == 0 and cell.probes


@pytest.mark.parametrize("name", list(EXPECTED))
def test_cost_comment_matches_the_cells_and_fits_the_budget(name):
    """The FLOPs and tokens written at the top of each config are those of its cells, and the
    estimate (flops_per_token x tokens at 20% of 989 TFLOP/s) stays well inside 5 minutes."""
    flops = tokens = 0
    for c in cells(name):
        t = c.steps * c.batch_size * c.seq_len
        cfg = ModelConfig.preset(c.size, vocab_size=c.vocab_size, max_seq_len=c.seq_len)
        flops += cfg.flops_per_token(c.seq_len) * t
        tokens += t
    text = (CONFIGS / f"{name}.yaml").read_text()
    stated_flops = float(re.search(r"([0-9.]+e[0-9]+) training FLOPs", text).group(1))
    stated_tokens = float(re.search(r"([0-9.]+)M in all", text).group(1)) * 1e6
    stated_s = float(re.search(r"= ([0-9]+) s at 20%", text).group(1))
    assert stated_flops == pytest.approx(flops, rel=0.01)
    assert stated_tokens == pytest.approx(tokens, rel=0.01)
    assert stated_s == pytest.approx(flops / H100_FLOPS, abs=1)
    assert flops / H100_FLOPS < BUDGET_S / 4
    # the CPU n-gram sampler serves ~1.5M tokens/s: under 200M tokens it stays below ~2.2 min
    assert tokens <= 200e6


def test_fig5_frequencies_span_every_row_down_to_one_in_eight():
    """Instances per row = frequency x seq_len: 1, 1/2, 1/4, 1/8, spread over the steps."""
    per_row = sorted({Fraction(c.rate * c.seq_len) for c in cells("fig5_lm_heatmap")})
    assert per_row == [Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), Fraction(1)]
    by_size_task = defaultdict(int)
    for c in cells("fig5_lm_heatmap"):
        assert c.schedule_label == "spread" and c.injection_size is None
        by_size_task[c.size, c.task] += 1
    assert by_size_task == {(s, t): 4 for s in SIZES for t in ("cmp", "add")}
    c = cells("fig5_lm_heatmap")[0]
    assert round(c.rate * c.batch_size * c.seq_len * c.steps) == 64_000  # instances at p=1


def test_fig6_delivers_the_same_count_in_bursts_as_spread():
    """At each frequency every schedule delivers the same instances up to one burst, and the
    last evaluation falls every - 1 steps after each schedule's last burst."""
    totals = defaultdict(dict)
    for c in cells("fig6_lm_schedule"):
        per_step = Fraction(c.rate * c.batch_size * c.seq_len)
        if c.every == 1:
            assert c.schedule_label == "spread"
            total = int(per_step * c.steps)
        else:
            k = c.injection_size
            assert k == per_step * c.every and k <= c.batch_size
            assert c.schedule_label == f"{k}/{c.every} burst"
            sched = InjectionSchedule(k, c.every, "burst")
            total = sched.total(c.steps)
            last_burst = max(s for s in range(c.steps) if sched.per_step(s))
            assert c.steps - 1 - last_burst == c.every - 1
        totals[c.size, c.rate][c.every] = total
    assert totals["4m", 1 / 512] == {1: 16368, 2: 16352, 4: 16320}
    assert totals["4m", 1 / 1024] == {1: 8184, 2: 8176, 4: 8160}
    assert len(totals) == 6


def test_fig9_measures_bursts_with_probes_on_every_size():
    for c in cells("fig9_lm_gradients"):
        assert c.task == "cmp" and c.probes and c.eval_points == 40
        assert c.probe_k <= PRESETS[c.size]["mlp_hidden"]
        assert c.schedule_label == "32/4 burst"
        assert InjectionSchedule(32, 4, "burst").total(c.steps) == 511 * 32


@pytest.mark.parametrize("name", list(EXPECTED))
def test_cpu_check_override_keeps_every_cell_valid(name):
    """The documented CPU check (`--set size=tiny --set steps=4 --set batch_size=16 ...`)."""
    grid = load_experiment(CONFIGS / f"{name}.yaml", ["size=tiny", "steps=4", "batch_size=16",
                                                      "eval_points=2", "profile.device=cpu"])
    n_cells, _ = EXPECTED[name]
    assert grid.profile.device == "cpu"
    assert len(list(grid.cells())) == n_cells // 3  # one size of three


# -- a frequency delivered every `every` steps -------------------------------------------------
def test_frequency_with_every_is_a_burst_of_the_same_rate():
    cell = LMCell(rate=1 / 2048, batch_size=64, seq_len=128, every=16, delivery="burst")
    assert cell.injection_size == 64 and cell.schedule_label == "64/16 burst"
    with pytest.raises(ValueError, match="every: only a burst delivery has a period"):
        LMCell(rate=1 / 2048, batch_size=64, seq_len=128, every=16)  # delivery: even
    assert LMCell(rate=1 / 2048, batch_size=64, seq_len=128).schedule_label == "spread"
    assert LMCell(rate=1 / 2048, batch_size=64, seq_len=128, every=3,
                  delivery="burst").injection_size == 12
    assert LMCell(rate=1 / 2048, delivery="iid").schedule_label == "iid"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(rate=1 / 3000, batch_size=64, every=4, delivery="burst"),
         r"every: 0\.000333333 per token x 64 x 128 tokens x every 4 steps = 10\.9227 "
         r"instances per injection, not a whole number >= 1"),
        (dict(rate=1 / 8192, batch_size=16, every=2, delivery="burst"),
         r"= 0\.5 instances per injection, not a whole number >= 1"),
        (dict(rate=1 / 512, batch_size=64, every=8, delivery="burst"),
         r"every: a burst of 128 instances .* does not fit in a batch of 64 sequences"),
    ],
)
def test_frequency_with_every_rejects_what_it_cannot_deliver(fields, message):
    with pytest.raises(ValueError, match=message):
        LMCell(**fields)


def test_bad_every_in_a_config_is_one_line_naming_the_field(tmp_path):
    with pytest.raises(UserError, match=r"--set every: a burst of 1024 "
                       r"instances"):
        load_experiment(CONFIGS / "fig6_lm_schedule.yaml", ["every=64"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("lmcache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RARETASK_CACHE", str(path))
        yield path


@pytest.mark.parametrize(("every", "mode", "per_step"),
                         [(1, "burst", [2, 2, 2, 2]), (4, "burst", [0, 0, 0, 8]),
                          (1, "even", [2, 2, 2, 2])])
def test_trainer_injects_the_burst_schedule(cache, one_thread, every, mode, per_step):
    """1/64 per token at 8 x 16 tokens is 2 instances per step: every step, or 8 every 4."""
    cell = LMCell(size="tiny", vocab_size=512, seq_len=16, batch_size=8, steps=12,
                  rate=1 / 64, every=every, delivery=mode, source="ngram", eval_points=2,
                  probes=False)
    trainer = build_trainer(cell, Profile().resolve("cpu"))
    assert trainer.schedule.rate == 2
    seen = []
    for step in range(1, cell.steps + 1):
        before = trainer.injected
        trainer.run(until=step)
        seen.append(trainer.injected - before)
    assert seen == per_step * 3 and trainer.injected == 24


def test_trainer_times_its_warm_up_and_evaluations_apart(cache, one_thread):
    """The log's split of a cell's seconds: every evaluation is counted once, the warm-up is
    the first WARMUP_STEPS steps of the trainer (once, however the run is cut into segments),
    and both lie inside the wall time of the run."""
    import time

    from raretask.lm.trainer import WARMUP_STEPS

    cell = LMCell(size="tiny", vocab_size=512, seq_len=16, batch_size=8, steps=12, rate=1 / 64,
                  source="ngram", eval_points=4, probes=False)
    trainer = build_trainer(cell, Profile().resolve("cpu"))
    t0 = time.perf_counter()
    trainer.run(until=2)  # inside the warm-up: two of its steps timed
    assert trainer.timing["warmup_steps"] == 2 and trainer.timing["warmup_s"] > 0
    trainer.run()
    wall = time.perf_counter() - t0
    t = trainer.timing
    assert t["evals"] == len(set(trainer.settings.eval_steps)) == len(
        {r["step"] for r in trainer.metrics()})
    assert t["warmup_steps"] == WARMUP_STEPS < cell.steps
    assert t["warmup_s"] > 0 and t["eval_s"] > 0 and t["warmup_s"] + t["eval_s"] < wall


# -- the documented CPU checks, end to end --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED))
def test_cpu_check_runs(name, tmp_path, cache):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "raretask", "run", str(CONFIGS / f"{name}.yaml"), "--out",
            str(out), "--quiet", "--set", "size=tiny", "--set", "steps=4", "--set",
            "batch_size=16", "--set", "eval_points=2", "--set", "profile.device=cpu"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([sys.executable, "-m", "raretask", "show", str(out), "--json"],
                         capture_output=True, text=True, timeout=120, env=env)
    rows = json.loads(res.stdout)
    assert len(rows) == EXPECTED[name][0] // 3
    for r in rows:
        assert r["steps"] == 4 and r["tokens"] == 4 * 16 * 128
        assert r["background_source"] == "ngram (order 3)" and r["repeats"] is False
        assert r["cos_g_gr"] is None or -1 <= r["cos_g_gr"] <= 1


# -- pre-tokenised shards through a grid cell ------------------------------------------------
def test_bin_shards_train_with_the_cells_eod_id(tmp_path, cache, one_thread):
    """A directory of uint16 .bin shards (nanoGPT layout) as the background of a cell: the cell's
    eod_id reaches the background (which refuses .bin without it)."""
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 1024, size=60_000).astype("<u2")
    tokens[499::500] = 7  # the shards' end-of-document id
    (tmp_path / "shards").mkdir()
    for i, part in enumerate(np.split(tokens, 2)):
        part.tofile(tmp_path / "shards" / f"train_{i:02d}.bin")
    base = dict(size="tiny", corpus=str(tmp_path / "shards"), vocab_size=1024, seq_len=16,
                batch_size=8, steps=6, rate=1 / 64, source="corpus", eval_points=2,
                probes=False)
    with pytest.raises(UserError, match="a pre-tokenised corpus needs eod_id"):
        build_trainer(LMCell(**base), Profile().resolve("cpu"))
    trainer = build_trainer(LMCell(**base, eod_id=7), Profile().resolve("cpu"))
    bg = trainer.background
    assert bg.eod_id == 7 and bg.tokenizer is None
    assert len(bg.train) + len(bg.val) == 60_000
    assert 7 not in set(trainer.task.symbols.tolist())  # the task never uses the EOD id
    trainer.run()
    assert trainer.data.epochs == pytest.approx(6 * 8 * 16 / len(bg.train))


def test_packed_small_grid_is_the_issues_fig5_small_end():
    """benchmarks/lm_pack_grid.yaml: 4m and 20m x 6 frequencies x 50M tokens, run with the
    deterministic profile beside it (so packed runs can equal lone ones); its cost header holds."""
    path = CONFIGS.parent / "benchmarks" / "lm_pack_grid.yaml"
    grid = load_experiment(path)
    got = list(grid.cells())
    assert grid.axes == {"size": ["4m", "20m"],
                         "rate": [2.0 ** -k for k in range(7, 13)]}
    flops = 0
    for c in got:
        tokens = c.steps * c.batch_size * c.seq_len
        assert tokens == pytest.approx(50e6, rel=1e-3)
        assert c.source == "ngram" and c.schedule_label == "spread"
        cfg = ModelConfig.preset(c.size, vocab_size=c.vocab_size, max_seq_len=c.seq_len)
        flops += cfg.flops_per_token(c.seq_len) * tokens
    text = path.read_text()
    assert float(re.search(r"([0-9.]+e[0-9]+) training FLOPs", text).group(1)) == \
        pytest.approx(flops, rel=0.01)
    assert float(re.search(r": ([0-9]+) s at 20%", text).group(1)) == \
        pytest.approx(flops / H100_FLOPS, abs=1)
    profile = load_experiment(path, profile_file=path.with_name("lm_pack_profile.yaml")) \
        .profile.resolve("cuda")
    assert profile.compile and profile.compile_mode == "reduce-overhead" and profile.deterministic
    small = load_experiment(path, ["size=tiny", "steps=4", "batch_size=16", "eval_points=2"])
    assert len(list(small.cells())) == 6


@pytest.mark.parametrize("mode, graphs", [("default", False), ("reduce-overhead", True),
                                          ("max-autotune", True),
                                          ("max-autotune-no-cudagraphs", False)])
def test_compile_modes_that_replay_cuda_graphs_mark_each_step(mode, graphs):
    # a mode that replays CUDA graphs reuses its outputs: the trainer must mark every step
    assert Profile(compile=True, compile_mode=mode).resolve("cuda").compile_mode == mode
    settings = LMTrainSettings(steps=1, batch_size=1, seq_len=8, compile=True, compile_mode=mode)
    assert cuda_graphs(settings, torch.device("cuda")) is graphs
    assert cuda_graphs(settings, torch.device("cpu")) is False
    assert cuda_graphs(LMTrainSettings(steps=1, batch_size=1, seq_len=8, compile=False,
                                       compile_mode=mode), torch.device("cuda")) is False
