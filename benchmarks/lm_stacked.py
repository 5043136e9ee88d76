"""Stacked seeds: K models of one size trained as one, the study's small steps at GPU speed?

Issue 19 (item 8) asks 45% MFU of the 60m-150m cells; alone at the grids' steps (2,048-8,192
tokens) they reach 13-35% on an H200 (RESULTS.md), because each kernel sees too few tokens, and
packing processes does not help there. The study's seeds of one setting are the same architecture
on different draws and streams, so they can be one model with a leading seed axis, as the toy
trains its instances: every weight becomes [K, ...], each matrix product is one batched GEMM
over K x the tokens and attention one call over K x the rows, and one optimiser step updates all
K (the first version, vmap over the model, ran 0.86x one model alone on an H100: RESULTS.md).
Nothing mixes between seeds (:mod:`raretask.lm.stacked` says why), so seed k follows the
trajectory ``LMTrainer`` gives it alone (``tests/test_lm_stacked.py`` pins this on the CPU).

This script measures whether that pays: tokens/s and MFU of ``LMTrainer`` alone (K = 1, the
baseline, same run) and of :class:`raretask.lm.stacked.StackedLMTrainer` over K seeds (the step a
grid runs with ``profile.stack_seeds``), at one step shape.

    python benchmarks/lm_stacked.py --device cuda --preset 150m --seq-len 128 --stack 1 3 6
    python benchmarks/lm_stacked.py --device cpu --preset tiny --batch-size 4 --seq-len 16 \
        --stack 1 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_throughput import (  # noqa: E402
    FLOPS_NOTE,
    RandomTokens,
    code_version,
    free,
    sync,
)

from raretask.lm.model import PRESETS, ModelConfig  # noqa: E402
from raretask.lm.stacked import StackedLMTrainer  # noqa: E402
from raretask.lm.trainer import LMTrainer, LMTrainSettings  # noqa: E402


def time_steps(step, warmup: int, steps: int, device: torch.device) -> tuple[float, float, Tensor]:
    """(warm-up seconds, timed seconds, last losses) of ``warmup`` then ``steps`` calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        last = step()
    sync(device)
    return t1 - t0, time.perf_counter() - t1, last


def measure(k: int, cfg: ModelConfig, args, device: torch.device) -> dict:
    """K = 1: ``LMTrainer`` itself (the baseline); K > 1: ``StackedLMTrainer`` over seeds
    0..K-1."""
    free(device)
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    settings = LMTrainSettings(steps=args.warmup + args.steps, batch_size=args.batch_size,
                               seq_len=args.seq_len, device=str(device),
                               compile=device.type == "cuda", compile_mode=args.compile_mode)
    streams = [RandomTokens(cfg.vocab_size, args.batch_size, args.seq_len, seed)
               for seed in range(k)]
    members = [LMTrainer(cfg, streams[seed], lambda: [], None, None,
                         replace(settings, seed=seed, compile=settings.compile and k == 1))
               for seed in range(k)]
    trainer = members[0]  # K = 1: the trainer's own step, as a grid cell runs it alone
    if k > 1:
        trainer = StackedLMTrainer(members, settings.compile, settings.compile_mode)
    step = trainer._train_step
    warm, timed, last = time_steps(step, args.warmup, args.steps, device)
    tokens = k * args.batch_size * args.seq_len * args.steps
    tps = tokens / timed
    row = {"stack": k, "warmup_s": warm, "timed_s": timed, "step_ms": 1e3 * timed / args.steps,
           "tokens_per_s": tps, "mfu": cfg.flops_per_token(args.seq_len) * tps
           / (args.peak_tflops * 1e12),
           "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
           if device.type == "cuda" else None,
           "final_loss": [round(float(x), 4) for x in last.reshape(-1).tolist()]}
    del trainer, members
    torch._dynamo.reset()
    free(device)
    return row


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="60m", choices=list(PRESETS))
    ap.add_argument("--batch-size", type=int, default=64, help="rows per step and seed")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=4096, help="the study's grids use 4,096")
    ap.add_argument("--stack", type=int, nargs="+", default=[1, 3, 6],
                    help="seeds trained together; 1 is LMTrainer alone, the baseline")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (CUDA 10, CPU 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (CUDA 50, CPU 3)")
    ap.add_argument("--compile-mode", default="reduce-overhead")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--out", default=None, help="JSON of the figures")
    args = ap.parse_args(argv)
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.steps = args.steps if args.steps is not None else (50 if cuda else 3)
    if min(args.stack) < 1:
        ap.error(f"--stack: seeds trained together must be >= 1, got {min(args.stack)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = args.device
    cfg = ModelConfig.preset(args.preset, vocab_size=args.vocab_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"stacked seeds, {date.today()}, {name or 'cpu'}, torch {torch.__version__}, code "
          f"{code_version()}; preset {args.preset} ({cfg.num_params(False):,} non-embedding), "
          f"{args.batch_size} x {args.seq_len} tokens a seed's step, {args.warmup} warm-up + "
          f"{args.steps} timed steps; MFU against {args.peak_tflops:g} TFLOP/s", flush=True)
    rows = []
    for k in args.stack:
        row = measure(k, cfg, args, device)
        rows.append(row)
        base = rows[0]["tokens_per_s"] if rows[0]["stack"] == 1 else None
        ratio = f", {row['tokens_per_s'] / base:.2f}x K = 1" if base else ""
        print(f"K = {k}: {row['tokens_per_s']:,.0f} tokens/s, {row['step_ms']:.2f} ms/step, "
              f"MFU {100 * row['mfu']:.1f}%{ratio}, warm-up {row['warmup_s']:.1f} s", flush=True)
    result = {"date": str(date.today()), "device": name, "torch": torch.__version__,
              "code": code_version(), "preset": args.preset, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "vocab_size": args.vocab_size,
              "flops_per_token": cfg.flops_per_token(args.seq_len), "flops_note": FLOPS_NOTE,
              "peak_tflops": args.peak_tflops, "compile_mode": args.compile_mode, "runs": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
