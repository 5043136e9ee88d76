"""benchmarks/lm_pack.py: small LM runs packed onto one device by cells-mode torchrun, and each
re-run alone gives the same metrics rows (CPU: 2 gloo processes)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "lm_pack.py"
_spec = importlib.util.spec_from_file_location("lm_pack", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TINY = ["size=tiny", "steps=4", "batch_size=16", "eval_points=2",
        "profile.device=cpu", "rate=[0.0078125,0.001953125]", "probes=false"]


def _bench(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cell_picks_and_row_differences():
    assert bench._pick("first,last", 12) == [0, 11]
    assert bench._pick("3, 1,3", 12) == [1, 3]
    assert bench._pick("none", 12) == []
    with pytest.raises(bench.BenchError, match="--alone: cell 12 is not in the grid"):
        bench._pick("12", 12)
    with pytest.raises(bench.BenchError, match="--alone: expected cell ids"):
        bench._pick("x", 12)
    a = {(1, -1, "val_loss"): 2.0, (1, -1, "acc"): float("nan")}
    assert bench._max_abs_diff(a, dict(a)) == 0.0  # NaN equals NaN here
    assert bench._max_abs_diff(a, {**a, (1, -1, "val_loss"): 2.5}) == 0.5
    assert bench._max_abs_diff(a, {(1, -1, "val_loss"): 2.0}) == float("inf")


@pytest.mark.parametrize("args, message", [
    (["--alone", "7"], "error: --alone: cell 7 is not in the grid (0..1)"),
    (["--procs", "0"], "error: --procs: expected >= 1, got 0"),
    (["--set", "sizes=tiny"], "sizes: unknown key"),
])
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    res = _bench("--out", str(out), *[f"--set={s}" for s in TINY], *args)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert not out.exists()


@pytest.mark.slow
def test_packed_cells_equal_the_same_cells_run_alone(tmp_path):
    out = tmp_path / "pack"
    res = _bench("--out", str(out), "--procs", "2", *[f"--set={s}" for s in TINY])
    assert res.returncode == 0, res.stderr
    got = json.loads((out / "lm_pack.json").read_text())
    assert got["cells"] == 2 and got["procs"] == 2 and got["tokens"] == 2 * 4 * 16 * 128
    assert [a["cell"] for a in got["alone"]] == [0, 1]
    for a in got["alone"]:
        assert a["identical"] and a["max_abs_diff"] == 0.0 and a["rows"] > 10
    assert got["all_identical"]
    assert got["packed_tokens_per_s"] == pytest.approx(got["tokens"] / got["packed_seconds"],
                                                       rel=1e-3)
    # both runs trained: the packed grid is finished and each alone run has its one cell
    assert (out / "packed" / "log.txt").read_text().endswith("grid complete\n")
    assert json.loads((out / "alone_1" / "cells.json").read_text())[0]["rate"] == 0.001953125
