"""A grid with ``profile.stack_seeds``: cells that differ only in the seed train as one stacked
model and leave the files, rows and metrics they would alone (up to float rounding); a stack cut
short resumes stacked or one by one, and a stack whose seeds stand at different steps splits."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from raretask.config import load_experiment
from raretask.lm.stacked import StackedLMTrainer
from raretask.runs.grid import GridRun, load_summary

# 2 seeds of T_ADD and one T_CMP cell: the T_CMP cell has no sibling and trains alone
GRID = ["kind=lm", "name=stk", "size=tiny", "vocab_size=512", "seq_len=16", "batch_size=8",
        "steps=12", "eval_points=3", "source=ngram", "probes=false", "seed=[0,1]",
        "variants=[{task: add, rate: 0.0625}, {task: cmp, rate: 0.0625, seed: 0}]"]
CLOSE = {"rel": 1e-4, "abs": 1e-6}


def _run(out, stack: int, checkpoint_seconds: float = 60.0) -> None:
    grid = load_experiment(None, [*GRID, f"profile.stack_seeds={stack}"])
    GridRun(grid, out, checkpoint_seconds=checkpoint_seconds).run()


def _rows(out) -> list[dict]:
    return sorted(load_summary(out), key=lambda r: r["cell"])


def _assert_same_run(got, want) -> None:
    """Rows and metrics equal, numbers within float rounding (the stack's batched kernels)."""
    rows, ref = _rows(got), _rows(want)
    assert [r["cell"] for r in rows] == [r["cell"] for r in ref] == [0, 1, 2]
    for r, e in zip(rows, ref, strict=True):
        assert r.keys() == e.keys()
        for key, value in e.items():
            if isinstance(value, float):
                assert r[key] == pytest.approx(value, **CLOSE), (r["cell"], key)
            else:
                assert r[key] == value, (r["cell"], key)
    m, e = (pq.read_table(d / "metrics.parquet").to_pylist() for d in (got, want))
    assert [(r["cell"], r["step"], r["metric"]) for r in m] == [
        (r["cell"], r["step"], r["metric"]) for r in e]
    for a, b in zip(m, e, strict=True):
        assert a["value"] == pytest.approx(b["value"], nan_ok=True, **CLOSE), a


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    out = tmp_path_factory.mktemp("alone") / "run"
    _run(out, 1)
    return out


def test_stacked_grid_equals_each_cell_alone(one_thread, alone, tmp_path):
    _run(tmp_path / "run", 2)
    _assert_same_run(tmp_path / "run", alone)
    log = (tmp_path / "run" / "log.txt").read_text()
    # the two T_ADD seeds stacked, T_CMP alone (probes: tests/test_lm_stacked.py)
    stacked = [ln.split(": ")[0].split()[-1] for ln in log.splitlines()
               if ln.endswith("; 2 seeds stacked")]
    assert stacked == ["g0000", "g0001"] and "g0002: tiny cmp steps 0->12" in log
    names = sorted(p.parent.name for p in (tmp_path / "run").glob("groups/g*/summary.json"))
    assert names == ["g0000", "g0001", "g0002"]  # each cell's own files


def _cut(monkeypatch, at: int) -> None:
    """Stop a stack's training with an error after step ``at``."""
    step = StackedLMTrainer._train_step

    def stopping(self):
        if self.step == at:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(StackedLMTrainer, "_train_step", stopping)


@pytest.mark.parametrize("resume_stack", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_cut_stack_resumes_stacked_or_alone(one_thread, alone, tmp_path, monkeypatch,
                                              resume_stack):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _cut(patch, 8)
        with pytest.raises(KeyboardInterrupt):
            _run(out, 2, checkpoint_seconds=0)
    ckpts = sorted(p.parent.name for p in out.glob("groups/g*/ckpt"))
    assert ckpts == ["g0000", "g0001"]  # every seed of the stack saved its own
    _run(out, resume_stack)  # 1: each seed's checkpoint is the one it would write alone
    _assert_same_run(out, alone)
    log = (out / "log.txt").read_text()
    for g in ("g0000", "g0001"):
        assert f"{g}: resumed from step 3" in log
    assert log.count("; 2 seeds stacked") == (2 if resume_stack == 2 else 0)


@pytest.mark.slow
def test_seeds_at_different_steps_train_one_by_one(one_thread, alone, tmp_path, monkeypatch):
    runs = {}
    for name, at in (("run", 8), ("early", 2)):  # checkpoints at steps 3 and 1
        runs[name] = tmp_path / name
        with monkeypatch.context() as patch:
            _cut(patch, at)
            with pytest.raises(KeyboardInterrupt):
                _run(runs[name], 2, checkpoint_seconds=0)
    # seed 1 goes back to the earlier visit's checkpoint: the two no longer stand at one step
    ckpt = runs["run"] / "groups" / "g0001" / "ckpt"
    shutil.rmtree(ckpt)
    shutil.copytree(runs["early"] / "groups" / "g0001" / "ckpt", ckpt)
    _run(runs["run"], 2)
    _assert_same_run(runs["run"], alone)
    log = (runs["run"] / "log.txt").read_text()
    assert "g0000: resumed from step 3" in log and "g0001: resumed from step 1" in log
    assert "g0000+g0001: checkpoints at different steps; trained one by one" in log
    assert "stacked" not in log.split("trained one by one")[1]
