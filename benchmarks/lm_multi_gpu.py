"""One language model on several GPUs (DDP, FSDP2) against one GPU, same global batch (issue 10).

One invocation, on one machine, runs three jobs of the same cell (a preset on the n-gram
background, T_CMP injected, no evaluations in the timed loop) and compares them:

* **one**: a single process, the whole global batch per step;
* **multi**: ``torchrun --nproc_per_node=P`` with ``--parallel ddp`` or ``fsdp``, each rank
  training its slice of the same global batch (:class:`raretask.lm.trainer.LMTrainer`'s
  data-parallel path);
* **resumed**: P processes train the first ``--stop`` steps and save a checkpoint (whole, named
  tensors: safetensors + ``torch.load(weights_only=True)``), then ONE process resumes it to the
  end: a checkpoint written on P GPUs continues on 1.

Per job: the global batch loss at every step (each rank's loss averaged over the ranks), tokens
per second over the steps after ``--warmup`` (CUDA synchronised around the timed region; the
warm-up holds torch.compile's work), peak memory. The figures: the largest |loss difference|
between multi and one, and between resumed and one, over all steps (bf16 autocast on CUDA, so
"the same curve" means within bf16 noise, not bit-equal), and multi's tokens/s over one's.

    python benchmarks/lm_multi_gpu.py --out /tmp/mg --preset 300m --parallel ddp     # 2 GPUs
    python benchmarks/lm_multi_gpu.py --out /tmp/mg --preset 1b --parallel fsdp
    python benchmarks/lm_multi_gpu.py --out /tmp/mg --device cpu --preset tiny --batch-size 8 \\
        --seq-len 32 --steps 12 --warmup 2 --stop 6 --vocab-size 512      # CPU check (gloo)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve()
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}  # NVLink multicast stays off (the machines' rule)


class BenchError(Exception):
    """A bad argument or a failed job: one line, exit 2."""


# -- the worker: one job, inside or outside torchrun ----------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args) -> None:
    from raretask.lm.config import LMCell
    from raretask.runs import distributed, store
    from raretask.runs.profile import Profile
    from raretask.studies.lm import build_trainer, load_checkpoint, save_state

    rank, world, local = distributed.env_ranks()
    mode = "single" if world == 1 else args.parallel
    device = distributed.rank_device(args.device, world, local, mode)
    total = args.steps
    cell = LMCell(size=args.preset, task="cmp", rate=1 / args.seq_len / 4, steps=total,
                  batch_size=args.batch_size, seq_len=args.seq_len, vocab_size=args.vocab_size,
                  warmup=min(10, total // 10 or 1), source="ngram", probes=False,
                  eval_points=2)
    profile = Profile(compile=args.compile, compile_mode="default").resolve(device)
    with distributed.session(mode, device):
        trainer = build_trainer(cell, profile, (rank, world), fsdp=mode == "fsdp")
        trainer.settings = dataclasses.replace(trainer.settings, eval_steps=())
        if args.resume:
            ckpt = Path(args.resume)
            trainer.load_state_dict(load_checkpoint(ckpt / "model.safetensors",
                                                    ckpt / "state.pt"))
        end = args.stop_at or total
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        first, losses, t0 = trainer.step, [], None
        for step in range(first, end):
            if step - first == args.warmup:
                _sync(device)
                t0 = time.perf_counter()
            trainer.run(until=step + 1)
            losses.append(trainer.last_loss.float())
        _sync(device)
        seconds = time.perf_counter() - t0 if t0 is not None else None
        curve = torch.stack(losses)
        if world > 1:  # the global batch's loss: each rank's mean over its equal share
            torch.distributed.all_reduce(curve, op=torch.distributed.ReduceOp.SUM)
            curve = curve / world
        if args.save:
            state = trainer.state_dict()  # a collective under FSDP2: every rank calls it
            if rank == 0:
                out = Path(args.save)
                out.mkdir(parents=True, exist_ok=True)
                store.write_safetensors(out / "model.safetensors", state.pop("model"))
                save_state(out / "state.pt", state)
        timed = end - first - args.warmup
        peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
        if rank == 0:
            tokens = timed * args.batch_size * args.seq_len
            store.write_json(Path(args.result), {
                "processes": world, "mode": mode, "device": device, "first_step": first,
                "end_step": end, "losses": curve.tolist(), "timed_steps": timed,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds if seconds and timed > 0 else None,
                "peak_memory_gib": peak / 2**30 if peak is not None else None,
                "params": trainer.model.num_params(include_embedding=True),
            })


# -- the driver ----------------------------------------------------------------------------------
def _job(args, procs: int, result: Path, log, *extra: str) -> dict:
    base = ["--worker", "--result", str(result), "--device", args.device, "--preset", args.preset,
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--parallel", args.parallel,
            "--vocab-size", str(args.vocab_size), "--compile" if args.compile else "--no-compile",
            *extra]
    if procs == 1:
        cmd = [sys.executable, str(SCRIPT), *base]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}", str(SCRIPT), *base]
    env = {**os.environ, **NCCL_ENV, "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    log.write(res.stdout + res.stderr)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"{procs}-process job failed (exit {res.returncode}): {last}")
    return json.loads(result.read_text())


def _max_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        raise BenchError(f"loss curves of {len(a)} and {len(b)} steps")
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def drive(args) -> int:
    if args.procs < 2:
        raise BenchError(f"--procs: expected >= 2, got {args.procs}")
    if not 0 < args.stop < args.steps:
        raise BenchError(f"--stop: expected 0 < stop < steps ({args.steps}), got {args.stop}")
    if args.warmup >= min(args.stop, args.steps - args.stop):
        raise BenchError(f"--warmup: {args.warmup} leaves no timed step in a job of "
                         f"{min(args.stop, args.steps - args.stop)} steps")
    if args.batch_size % args.procs:
        raise BenchError(f"--batch-size: {args.batch_size} does not divide by {args.procs} "
                         "processes (it is the global batch)")
    if args.device.startswith("cuda") and torch.cuda.device_count() < args.procs:
        raise BenchError(f"--procs: {args.procs} GPUs needed, {torch.cuda.device_count()} "
                         "visible")
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        raise BenchError(f"--out: {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "lm_multi_gpu.log", "w") as log:
        one = _job(args, 1, out / "one.json", log)
        multi = _job(args, args.procs, out / "multi.json", log)
        ckpt = out / "checkpoint"
        part = _job(args, args.procs, out / "part.json", log, "--stop-at", str(args.stop),
                    "--save", str(ckpt))
        rest = _job(args, 1, out / "rest.json", log, "--resume", str(ckpt))
        resumed = part["losses"] + rest["losses"]
        result = {
            "benchmark": "lm_multi_gpu", "date": date.today().isoformat(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "preset": args.preset, "parallel": args.parallel, "procs": args.procs,
            "global_batch": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
            "params": one["params"], "device": _device_name(args.device),
            "python": platform.python_version(), "torch": torch.__version__,
            "one_tokens_per_s": one["tokens_per_s"], "multi_tokens_per_s": multi["tokens_per_s"],
            "speedup": multi["tokens_per_s"] / one["tokens_per_s"],
            "one_peak_memory_gib": one["peak_memory_gib"],
            "multi_peak_memory_gib": multi["peak_memory_gib"],
            "max_loss_diff_multi": _max_diff(multi["losses"], one["losses"]),
            "max_loss_diff_resumed": _max_diff(resumed, one["losses"]),
            "resumed_from": f"step {args.stop} on {args.procs} processes, continued on 1",
            "final_loss_one": one["losses"][-1], "final_loss_multi": multi["losses"][-1],
        }
        lines = [
            f"{args.preset} ({one['params'] / 1e6:.2f}M parameters), global batch "
            f"{args.batch_size} x {args.seq_len}, {args.steps} steps, {result['device']}",
            f"1 process: {one['tokens_per_s']:,.0f} tokens/s; {args.procs} processes "
            f"({args.parallel}): {multi['tokens_per_s']:,.0f} tokens/s = "
            f"{result['speedup']:.2f}x",
            f"loss curves: max |multi - one| {result['max_loss_diff_multi']:.2e}, max |resumed "
            f"- one| {result['max_loss_diff_resumed']:.2e} ({result['resumed_from']}); final "
            f"{result['final_loss_one']:.4f} / {result['final_loss_multi']:.4f}",
        ]
        log.write("\n".join(lines) + "\n")
    (out / "lm_multi_gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(lines))
    return 0


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, gloo)"


def parse(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="a new or empty directory (driver)")
    ap.add_argument("--device", default="cuda", help="cuda (one GPU per process) or cpu (gloo)")
    ap.add_argument("--preset", default="300m")
    ap.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16, help="global batch in sequences")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab-size", type=int, default=8192, help="BPE trained on the KJV")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps of each job")
    ap.add_argument("--stop", type=int, default=30, help="the resumed job's checkpoint step")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the model (default: on CUDA)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    # the worker's own arguments (the driver passes them)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--stop-at", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    ap.add_argument("--resume", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        worker(args)
        return 0
    if args.out is None:
        print("error: --out: required", file=sys.stderr)
        return 2
    try:
        from raretask.lm.model import PRESETS

        if args.preset not in PRESETS:
            raise BenchError(f"--preset: unknown {args.preset!r} (known: {', '.join(PRESETS)})")
        return drive(args)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
