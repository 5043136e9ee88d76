"""Several processes on one grid (raretask.runs.distributed): torchrun with 2 CPU ranks (gloo).

Model mode must give the numbers of one process with the same global batch (DDP, FSDP2); cells
mode must give exactly a one-process run's rows, resume after a kill, and keep the run lock.
The one-process references run in this process on one thread, as each torchrun rank does
(torchrun sets OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from raretask.cli import main
from raretask.config import load_experiment
from raretask.errors import UserError
from raretask.lm.config import LMCell
from raretask.runs import store
from raretask.runs.distributed import rank_device, share_compile_workers
from raretask.runs.grid import GridRun
from raretask.studies import study

TORCHRUN = Path(sys.executable).with_name("torchrun")
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")

LM = dict(kind="lm", size="tiny", vocab_size=512, seq_len=16, warmup=2)
if "probes" in LMCell.model_fields:  # probes cost ~3 steps per evaluation; not what is tested here
    LM["probes"] = False
# 3 instances per step over 2 ranks of 2 rows: rank 0 carries 2, rank 1 carries 1
LM_ONE = dict(LM, steps=8, batch_size=4, rate=3 / 64, eval_points=24, lr=1e-2)
LM_FOUR = dict(LM, steps=8, batch_size=4, rate=[1 / 64, 2 / 64], seed=[0, 1], eval_points=4)
TOY = dict(kind="toy", tasks=4, features=4, width=[2, 4, 8], seed=[0, 1], steps=300,
           batch_size=64, eval_points=6, profile={"group_size": 2})


def _config(tmp_path: Path, name: str, body: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _torchrun(config: Path, out: Path, *extra: str, wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "raretask", "run",
           str(config), "--out", str(out), "-q", *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _single(config: Path, out: Path) -> None:
    GridRun(load_experiment(config), out, checkpoint_seconds=60).run()


def _show(out: Path, capsys) -> list[dict]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        main(["show", str(out), "--json"])
    assert ended.value.code == 0
    rows = json.loads(capsys.readouterr().out)
    for r in rows:
        r.pop("seconds", None)  # wall clock: the one field that may differ
    return rows


def _metrics(out: Path) -> dict[tuple[int, int, str], float]:
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    return {(r["cell"], r["step"], r["metric"]): r["value"] for r in rows}


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


# -- choosing the mode (no processes) -------------------------------------------------------
@pytest.mark.parametrize(
    ("parallel", "kind", "cells", "sizes", "device", "mode"),
    [
        ("auto", "toy", 1, set(), "cpu", "cells"),
        ("auto", "lm", 4, {"tiny"}, "cpu", "cells"),
        ("auto", "lm", 1, {"tiny"}, "cpu", "ddp"),
        ("auto", "lm", 8, {"tiny", "1b"}, "cuda", "fsdp"),
        ("model", "lm", 8, {"1b"}, "cpu", "ddp"),
        ("model", "lm", 8, {"300m"}, "cuda", "ddp"),
        ("fsdp", "lm", 8, {"tiny"}, "cpu", "fsdp"),
        ("cells", "lm", 1, {"4b"}, "cuda", "cells"),
    ],
)
def test_choose_mode(parallel, kind, cells, sizes, device, mode):
    plugin = study(kind)
    grid = plugin.grid_class.from_dict(
        {"kind": kind, **({"size": sorted(sizes), "rate": 1e-3} if sizes else {})}, "test")
    chosen = list(grid.cells()) * cells
    assert plugin.parallel_mode(parallel, 2, chosen[:max(cells, 1)], device) == mode


def test_toy_grid_refuses_model_mode():
    with pytest.raises(UserError, match="--parallel: 'ddp'.*use --parallel cells"):
        study("toy").parallel_mode("ddp", 2, [], "cpu")


def test_rank_device_packs_cells_onto_fewer_gpus():
    # one process: the device as configured; CPU ranks stay on the CPU
    assert rank_device("cuda", 1, 0, "single", gpus=1) == "cuda"
    assert rank_device("cpu", 6, 5, "cells", gpus=0) == "cpu"
    # as many GPUs as processes: one each
    assert [rank_device("cuda", 2, r, m, gpus=2) for m in ("cells", "ddp") for r in (0, 1)] == \
        ["cuda:0", "cuda:1"] * 2
    # cells mode, 6 processes on 1 and on 4 GPUs: round-robin (packing small runs)
    assert {rank_device("cuda", 6, r, "cells", gpus=1) for r in range(6)} == {"cuda:0"}
    assert [rank_device("cuda", 6, r, "cells", gpus=4) for r in range(6)] == \
        ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    # the model modes need a GPU per process; a pinned GPU is refused under torchrun
    with pytest.raises(UserError, match="--parallel ddp: 2 or more processes on this node but "
                                        "1 GPU.*--parallel cells"):
        rank_device("cuda", 2, 1, "ddp", gpus=1)
    with pytest.raises(UserError, match="device: 'cuda:1' pins one GPU"):
        rank_device("cuda:1", 2, 0, "cells", gpus=2)


def test_packed_ranks_split_the_compile_workers():
    import torch._inductor.config as inductor

    saved = inductor.compile_threads  # restored by hand: monkeypatch's undo deletes the option
    try:
        assert share_compile_workers(6, cpus=16) == 2 and inductor.compile_threads == 2
        assert share_compile_workers(1, cpus=16) == 16 and inductor.compile_threads == 16
        assert share_compile_workers(32, cpus=16) == 1 and inductor.compile_threads == 1
    finally:
        inductor.compile_threads = saved


# -- user errors: one line, exit 2, nothing written -----------------------------------------
def _main_fails(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        main(argv)
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_batch_not_divisible_by_processes(tmp_path, capsys, monkeypatch):
    # what torchrun sets for rank 0 of 2: the check comes before any process group exists
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = _config(tmp_path, "odd", dict(LM_ONE, batch_size=3))
    err = _main_fails(["run", str(cfg), "--out", str(tmp_path / "r"), "--parallel", "model"],
                      capsys)
    assert "batch_size: 3 (cell 0) is not divisible by the 2 processes" in err
    assert not (tmp_path / "r").exists()


def test_bad_parallel_value(tmp_path, capsys):
    cfg = _config(tmp_path, "toy", TOY)
    err = _main_fails(["run", str(cfg), "--out", str(tmp_path / "r"), "--parallel", "gpus"],
                      capsys)
    assert "--parallel: expected one of auto, cells, model, ddp, fsdp, got 'gpus'" in err


def test_pinned_gpu_under_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _config(tmp_path, "toy", dict(TOY, profile={"group_size": 2, "device": "cuda:1"}))
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA to get past device resolution")
    err = _main_fails(["run", str(cfg), "--out", str(tmp_path / "r")], capsys)
    assert "device: 'cuda:1' pins one GPU" in err


# -- model mode: DDP (and FSDP2) equal one process ------------------------------------------
TRAJECTORY = ("train_loss", "val_loss", "task_loss", "task_test_loss", "test_accuracy",
              "train_accuracy", "tokens", "instances", "epochs", "lr")
"""What training determines; the probes read one rank's rows under torchrun, so they differ."""


def _assert_same_trajectory(single: Path, parallel: Path, rtol: float) -> float:
    a, b = _metrics(single), _metrics(parallel)
    a = {k: v for k, v in a.items() if k[2] in TRAJECTORY}
    b = {k: v for k, v in b.items() if k[2] in TRAJECTORY}
    assert a.keys() == b.keys()
    assert {k[2] for k in a} == set(TRAJECTORY)
    steps = sorted(s for (_, s, m) in a if m == "train_loss")
    assert steps == list(range(1, 9))  # a train loss at every step
    worst = 0.0
    for key, x in a.items():
        worst = max(worst, abs(b[key] - x) / max(abs(x), 1e-12))
    assert worst <= rtol, worst
    # and it trained: the loss fell, every instance was injected
    assert a[(0, 8, "train_loss")] < a[(0, 1, "train_loss")] - 0.3
    assert a[(0, 8, "instances")] == b[(0, 8, "instances")] == 24
    return worst


@needs_torchrun
def test_ddp_matches_one_process(tmp_path, one_thread, capsys):
    cfg = _config(tmp_path, "one", LM_ONE)
    _single(cfg, tmp_path / "single")
    proc = _torchrun(cfg, tmp_path / "ddp", "--parallel", "model")
    _ok(proc)
    _assert_same_trajectory(tmp_path / "single", tmp_path / "ddp", rtol=1e-5)
    s, d = _show(tmp_path / "single", capsys), _show(tmp_path / "ddp", capsys)
    assert s[0].keys() == d[0].keys()
    for key in (*TRAJECTORY[:-1], "frequency", "steps", "params", "size", "schedule"):
        value = s[0][key]
        if isinstance(value, float):
            assert d[0][key] == pytest.approx(value, rel=1e-5), key
        else:
            assert d[0][key] == value, key
    log = (tmp_path / "ddp" / "log.txt").read_text()
    assert "2 processes (ddp)" in log and "[rank 1]" not in log  # rank 0 alone writes


@needs_torchrun
@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes_on_one(tmp_path, one_thread):
    """FSDP2 on CPU/gloo; killed after a checkpoint, the run finishes in one process."""
    cfg = _config(tmp_path, "one", dict(LM_ONE, steps=8))
    _single(cfg, tmp_path / "single")
    _ok(_torchrun(cfg, tmp_path / "fsdp", "--parallel", "fsdp"))
    _assert_same_trajectory(tmp_path / "single", tmp_path / "fsdp", rtol=1e-5)
    out = tmp_path / "killed"
    proc = _torchrun(cfg, out, "--parallel", "fsdp", "--checkpoint-seconds", "0", wait=False)
    _kill_when(proc, lambda: (out / "groups" / "g0000" / "ckpt").exists())
    assert not (out / "summary.json").exists()
    _single(cfg, out)  # saved sharded by 2 processes, resumed by 1
    assert "resumed from step" in (out / "log.txt").read_text()
    _assert_same_trajectory(tmp_path / "single", out, rtol=1e-5)


# -- cells mode: exactly the one-process rows, kill and resume, the lock --------------------
@needs_torchrun
def test_cells_toy_grid_equals_one_process(tmp_path, one_thread, capsys):
    cfg = _config(tmp_path, "toy", TOY)
    _single(cfg, tmp_path / "single")
    proc = _torchrun(cfg, tmp_path / "cells")
    _ok(proc)
    rows = _show(tmp_path / "cells", capsys)
    assert len(rows) == 6 * 4
    assert rows == _show(tmp_path / "single", capsys)
    log = (tmp_path / "cells" / "log.txt").read_text()
    assert "2 processes (cells)" in log and log.count("grid complete") == 1
    assert not (tmp_path / "cells" / ".claims").exists()


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL the torchrun job (its workers, then itself) once ``ready()`` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the job never reached the kill point"
        time.sleep(0.01)
    # torchrun starts each worker in its own session: kill them by pid, then torchrun
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    proc.kill()
    proc.communicate()


@pytest.mark.slow  # 36 s: LM resume after a kill is also tested in one process (test_lm_grid)
@needs_torchrun
def test_cells_lm_grid_equals_one_process_and_resumes_after_kill(tmp_path, one_thread, capsys):
    cfg = _config(tmp_path, "lm", LM_FOUR)
    _single(cfg, tmp_path / "single")
    reference = _show(tmp_path / "single", capsys)
    assert [r["cell"] for r in reference] == [0, 1, 2, 3]

    _ok(_torchrun(cfg, tmp_path / "cells"))
    assert _show(tmp_path / "cells", capsys) == reference
    log = (tmp_path / "cells" / "log.txt").read_text()
    assert "[rank 0] g0000" in log and "[rank 1] g0001" in log  # both ranks trained cells

    # killed with one cell done and another checkpointed part-way: the re-run resumes
    out = tmp_path / "killed"
    groups = out / "groups"
    proc = _torchrun(cfg, out, "--checkpoint-seconds", "0", wait=False)
    _kill_when(proc, lambda: any(groups.glob("*/summary.json")) and any(groups.glob("*/ckpt")))
    assert not (out / "summary.json").exists()
    done_before = len(list(groups.glob("*/summary.json")))
    assert 1 <= done_before < 4
    _ok(_torchrun(cfg, out))
    log = (out / "log.txt").read_text()
    assert f"{4 - done_before} groups to run" in log and "resumed from step" in log
    assert _show(out, capsys) == reference


@needs_torchrun
def test_second_job_on_a_locked_directory_refuses(tmp_path):
    cfg = _config(tmp_path, "toy", TOY)
    out = tmp_path / "run"
    with store.run_lock(out):  # another raretask process holds the directory
        proc = _torchrun(cfg, out)  # returns at all: neither rank waits for the other
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {out}: another raretask process is running in this directory"] * 2
    assert not (out / "config.yaml").exists()
