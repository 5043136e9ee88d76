"""raretask.lm.stacked: K seeds stacked on one axis train as K ``LMTrainer`` runs would, seed by
seed, and benchmarks/lm_stacked.py times it."""

from __future__ import annotations

import json

import pytest
import torch
from bench_modules import load

from raretask.lm.model import ModelConfig
from raretask.lm.stacked import StackedLMTrainer
from raretask.lm.trainer import LMTrainer, LMTrainSettings

stacked = load("lm_stacked")
CFG = ModelConfig.preset("tiny", vocab_size=128)


def _bare(seed: int, clip: float = 1.0, compile: bool = False) -> LMTrainer:
    """A trainer on random tokens with no task (the benchmark's)."""
    settings = LMTrainSettings(steps=4, batch_size=4, seq_len=16, warmup=2, grad_clip=clip,
                               seed=seed, compile=compile)
    return LMTrainer(CFG, stacked.RandomTokens(CFG.vocab_size, 4, 16, seed), lambda: [], None,
                     None, settings)


@pytest.mark.parametrize("clip", [1.0, 0.02])  # 0.02: every step clipped, by each seed's norm
def test_stacked_seeds_follow_their_own_trainer(one_thread, clip):
    seeds = [0, 3]
    together = StackedLMTrainer([_bare(seed, clip) for seed in seeds])
    losses = torch.stack([together._train_step() for _ in range(4)])  # [steps, K]
    for k, seed in enumerate(seeds):
        alone = _bare(seed, clip)
        own = torch.stack([alone._train_step() for _ in range(4)])
        torch.testing.assert_close(losses[:, k], own, rtol=1e-5, atol=1e-6)
        state = together.member(k).state_dict()["model"]
        # weights: the clip coefficient's rounding (foreach norms here, one norm a weight in
        # clip_grad_norm_ on a CPU: 1e-7 apart) reaches ~4e-6 in embedding rows whose
        # gradient is near zero, where Adam divides by the gradient's own scale
        for name, value in alone.model.state_dict().items():
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=2e-5, msg=name)
    # the seeds did not train alike (else the test could not tell them apart)
    assert (losses[:, 0] - losses[:, 1]).abs().max() > 1e-3


def test_script_writes_the_figures(one_thread, tmp_path, capsys):
    out = tmp_path / "stacked.json"
    assert stacked.main(["--device", "cpu", "--preset", "tiny", "--vocab-size", "128",
                         "--batch-size", "2", "--seq-len", "8", "--stack", "1", "2",
                         "--warmup", "1", "--steps", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["stack"] for r in result["runs"]] == [1, 2]
    for r in result["runs"]:  # tokens/s is K x rows x tokens x steps over the timed seconds
        assert r["tokens_per_s"] == pytest.approx(r["stack"] * 2 * 8 * 2 / r["timed_s"])
        assert len(r["final_loss"]) == r["stack"]
    assert "K = 2:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        stacked.parse(["--stack", "0"])
    assert stop.value.code == 2


@pytest.mark.slow
def test_compiled_stacked_step_is_one_graph_and_equals_eager(one_thread):
    """torch.compile traces vmap over functional_call whole (the GPU run compiles it): one graph,
    no break, the same losses as the eager step (~25 s of compilation on a CPU)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    runs = []
    for compiled in (True, False):
        trainer = StackedLMTrainer([_bare(k) for k in range(3)], compile=compiled)
        runs.append(torch.stack([trainer._train_step() for _ in range(3)]))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-5)


def test_stacked_cells_evaluate_and_probe_as_alone(one_thread):
    """A cell's evaluations (task accuracy, losses, the gradient probes and Fourier modes) run on
    its own trainer's model, whose weights are views into the stack: the same metrics as the
    cell trained alone, within float rounding."""
    from raretask.lm.config import LMCell
    from raretask.runs.profile import Profile
    from raretask.studies.lm import build_trainer

    def cell(seed: int) -> LMTrainer:
        return build_trainer(LMCell(size="tiny", vocab_size=512, seq_len=16, batch_size=8,
                                    steps=6, task="add", rate=1 / 16, source="ngram", seed=seed,
                                    eval_points=2, probes=True, probe_k=16),
                             Profile().resolve("cpu"), (0, 1))

    stack = StackedLMTrainer([cell(0), cell(1)])
    stack.run()
    for k in (1,):  # the second seed: a slice of the stack other than the first
        alone = cell(k)
        alone.run()
        want = {(r["step"], r["metric"]): r["value"] for r in alone.metrics()}
        got = {(r["step"], r["metric"]): r["value"] for r in stack.member(k).metrics()}
        assert got.keys() == want.keys() and {"cos_gnt_gr", "fourier_modes"} <= {
            m for _, m in got}
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
        assert stack.member(k).step == alone.step == 6
