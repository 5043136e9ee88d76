"""benchmarks/lm_multi_gpu.py: one model on several processes (DDP, FSDP2) follows the one-process
loss curve with the same global batch, and a checkpoint saved on 2 processes resumes on 1
(CPU, gloo)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lm_multi_gpu.py"
_spec = importlib.util.spec_from_file_location("lm_multi_gpu", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
CPU = ["--device", "cpu", "--preset", "tiny", "--batch-size", "8", "--seq-len", "32", "--steps",
       "12", "--warmup", "2", "--stop", "6", "--vocab-size", "512"]


def _bench(*args):
    env = {**os.environ, "TORCH_CPP_LOG_LEVEL": "ERROR"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "error: --preset: unknown 'huge'"),
    (["--batch-size", "7"], "error: --batch-size: 7 does not divide by 2 processes"),
    (["--stop", "12"], "error: --stop: expected 0 < stop < steps (12), got 12"),
    (["--warmup", "6"], "error: --warmup: 6 leaves no timed step in a job of 6 steps"),
    (["--procs", "1"], "error: --procs: expected >= 2, got 1"),
])
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    res = _bench("--out", str(out), *CPU, *args)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(message), res.stderr
    assert not out.exists()


def test_max_diff_refuses_curves_of_other_lengths():
    assert bench._max_diff([1.0, 2.0], [1.0, 2.5]) == 0.5
    with pytest.raises(bench.BenchError, match="loss curves of 2 and 1 steps"):
        bench._max_diff([1.0, 2.0], [1.0])


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_follow_one_and_resume_on_one(tmp_path, parallel):
    out = tmp_path / parallel
    res = _bench("--out", str(out), *CPU, "--parallel", parallel)
    assert res.returncode == 0, res.stderr
    got = json.loads((out / "lm_multi_gpu.json").read_text())
    one = json.loads((out / "one.json").read_text())
    multi = json.loads((out / "multi.json").read_text())
    assert len(one["losses"]) == len(multi["losses"]) == 12
    assert one["losses"][-1] < one["losses"][0] - 0.3  # it trained
    # float32 on CPU: the same curve up to summation order; the resumed run continues it
    assert got["max_loss_diff_multi"] < 1e-4 and got["max_loss_diff_resumed"] < 1e-4
    assert json.loads((out / "rest.json").read_text())["first_step"] == 6
    assert got["speedup"] == pytest.approx(multi["tokens_per_s"] / one["tokens_per_s"])
    assert multi["processes"] == 2 and multi["mode"] == parallel
