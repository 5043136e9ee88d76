"""Divergence in the toy: a NaN or exploding cell is marked with its step and frozen; the other
cells of the same batched step train on bit-exactly; `show` and the report display it."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from bench_modules import toy_retractions
from safetensors.torch import load_file, save_file

from raretask.cli import main
from raretask.config import load_experiment
from raretask.runs.grid import GridRun, load_summary
from raretask.theory import TaskSet
from raretask.toy import ToyInstance, ToyTrainer, TrainSettings
from raretask.toy.trainer import DIVERGE_FACTOR

PI = np.array([0.4, 0.3, 0.2, 0.1])
LAM = np.tile(np.arange(1, 5.0) ** -2, (4, 1))
FREQ = np.array([True, True, True, False])
SETTINGS = TrainSettings(steps=300, batch_size=64, lr=0.01, eval_steps=(0, 10, 50, 100, 300))


def _instances():
    # widths 4 twice: instances 1 and 2 share one group (one batched step)
    return [ToyInstance(w, PI, LAM, seed=s, rare_task=3, frequent=FREQ)
            for w, s in ((2, 0), (4, 1), (4, 2), (8, 0))]


def _same(a: list[dict], b: list[dict]) -> bool:
    """Equal rows, NaN equal to NaN (the step-0 gradient cosine is 0/0)."""
    def key(r):
        v = r["value"]
        return {**r, "value": "nan" if math.isnan(v) else v}
    return [key(r) for r in a] == [key(r) for r in b]


@pytest.fixture(scope="module")
def clean():
    torch.set_num_threads(1)
    tr = ToyTrainer(_instances(), SETTINGS)
    tr.run()
    return tr


def _poisoned(until: int = 20) -> ToyTrainer:
    tr = ToyTrainer(_instances(), SETTINGS)
    tr.run(until=until)
    gr, j = tr._locate(1)
    assert gr.idx == [1, 2]  # its group-mate is instance 2
    gr.params[1, j, 3, 1] = math.nan  # one decoder entry of instance 1 turns NaN
    return tr


def test_nan_instance_is_marked_and_mates_are_bit_exact(clean):
    tr = _poisoned()
    tr.run()
    assert clean.diverged() == {}
    assert tr.diverged() == {1: 50}  # the first eval step after the NaN appeared
    others = [r for r in tr.metrics() if r["instance"] != 1]
    assert _same(others, [r for r in clean.metrics() if r["instance"] != 1])
    loss = {r["step"]: r["value"] for r in tr.metrics()
            if r["instance"] == 1 and r["task"] == -1 and r["metric"] == "loss"}
    assert loss[10] == next(r["value"] for r in clean.metrics() if r["instance"] == 1
                            and r["step"] == 10 and r["metric"] == "loss")
    assert math.isnan(loss[50])  # the row at the divergence step shows it
    mean_predictor = float((PI * LAM.sum(1)).sum())
    assert loss[100] == loss[300] == pytest.approx(mean_predictor, rel=1e-12)  # frozen at 0
    model = tr.model(1)
    assert not model["U"].any() and not model["D"].any()


def test_divergence_survives_a_checkpoint(clean, tmp_path):
    tr = _poisoned()
    tr.run(until=100)
    path = tmp_path / "ckpt.safetensors"
    save_file(tr.state_dict(), str(path))
    resumed = ToyTrainer(_instances(), SETTINGS)
    resumed.load_state_dict(load_file(str(path)))
    resumed.run()
    tr.run()
    assert resumed.diverged() == tr.diverged() == {1: 50}
    assert _same(resumed.metrics(), tr.metrics())


TINY = ["name=div", "tasks=4", "features=4", "width=[2,4]", "seed=[0,1]", "beta=1.5",
        "steps=200", "batch_size=32", "eval_points=6", "profile.group_size=4"]


def _show(out, capsys, *flags) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["show", str(out), *flags])
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("div")
    GridRun(load_experiment(None, [*TINY, "lr=[0.01,10]"]), base / "mixed").run()
    GridRun(load_experiment(None, [*TINY, "lr=0.01"]), base / "calm").run()
    return base / "mixed", base / "calm"


def test_huge_lr_cells_diverge_and_are_marked(grids, capsys):
    mixed, calm = grids
    rows = load_summary(mixed)
    cells = {c["cell"]: c for c in json.loads((mixed / "cells.json").read_text())}
    metrics = pq.read_table(mixed / "metrics.parquet").to_pylist()
    eval_steps = {r["step"] for r in metrics}
    for r in rows:
        if cells[r["cell"]]["lr"] == 10:
            step = r["diverged_step"]
            assert step in eval_steps and step > 0
            assert not r["learned"] and r["signal"] == 0.0 and r["features"] == 0.0
            (loss,) = [m["value"] for m in metrics if m["cell"] == r["cell"] and m["step"] == step
                       and m["metric"] == "loss"]
            ts = TaskSet.power_law(4, 4, alpha=2.0, beta=1.5)
            loss0 = sum(p * sum(lam) for p, lam in zip(ts.frequencies, ts.spectra, strict=True))
            assert r["loss"] == 1.0  # the task's normalised loss at U = D = 0
            assert r["model_loss"] == pytest.approx(loss0, rel=1e-12)  # reset and frozen there
            assert not math.isfinite(loss) or loss > DIVERGE_FACTOR * loss0
        else:
            assert r["diverged_step"] is None
    # the calm cells' numbers equal a grid that never had the diverging cells
    key = ("width", "seed", "task")
    calm_rows = {tuple(r[k] for k in key): r for r in load_summary(calm)}
    n = 0
    for r in rows:
        if cells[r["cell"]]["lr"] == 0.01:
            ref = calm_rows[tuple(r[k] for k in key)]
            skip = {"cell", "group"}
            assert {k: v for k, v in r.items() if k not in skip} == \
                {k: v for k, v in ref.items() if k not in skip}
            n += 1
    assert n == len(calm_rows) == 16
    # show: one line per cell, the diverged ones marked; --json stays strict JSON
    text = _show(mixed, capsys)
    diverged = sorted({r["diverged_step"] for r in rows if r["diverged_step"] is not None})
    assert len(re.findall(r"diverged@\d+", text)) == 4 and f"diverged@{diverged[0]}" in text
    assert "4 cells diverged" in " ".join(text.split())
    json.loads(_show(mixed, capsys, "--json"), parse_constant=lambda c: pytest.fail(c))
    assert "diverged" in (mixed / "log.txt").read_text()


def test_report_marks_diverged_cells(grids, tmp_path, capsys):
    mixed, _ = grids
    out = tmp_path / "report.html"
    with pytest.raises(SystemExit) as exc:
        main(["report", str(mixed), "--out", str(out)])
    assert exc.value.code == 0
    page = out.read_text()
    assert len(re.findall(r"diverged@\d+", page)) == 4 and "4 cells diverged" in page


def test_series_retraction_keeps_a_diverged_instance_at_zero_without_the_mask():
    """The GPU retraction maps U = 0 to 0, so the frozen model stays frozen with no extra pass."""
    toy_retractions()  # series_qr: one of the benchmarks' GEMM retractions
    settings = TrainSettings(steps=120, batch_size=64, lr=0.01, eval_steps=(0, 10, 50, 120),
                             retraction="series_qr")
    tr = ToyTrainer(_instances(), settings)
    tr.run(until=20)
    gr, j = tr._locate(1)
    gr.params[1, j, 3, 1] = math.nan
    tr.run()
    assert tr.diverged() == {1: 50}
    model = tr.model(1)
    assert not model["U"].any() and not model["D"].any()
    assert all(np.isfinite(tr.model(i)["U"]).all() for i in (0, 2, 3))
