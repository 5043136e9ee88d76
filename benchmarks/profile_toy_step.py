"""Where one toy grid-step's GPU time goes: per-kernel table of the batched trainer.

    python benchmarks/profile_toy_step.py [--config configs/fig2_phase.yaml] [--set k=v ...]

Runs the grid's trainer eagerly (no CUDA graph, so kernels are attributed) for a few steps
under torch.profiler and prints the kernels by total GPU time, then the graph-replayed time per
step for comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from raretask.config import load_experiment
from raretask.runs.toy_grid import build_instances, build_settings
from raretask.toy.trainer import ToyTrainer

ROOT = Path(__file__).resolve().parents[1]


def ms_per_step(trainer: ToyTrainer, steps: int, warmup: int = 30) -> float:
    trainer.run(until=trainer.step + warmup)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.run(until=trainer.step + steps)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "fig2_phase.yaml"))
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--time-only", action="store_true", help="graph-replayed time, no profile")
    args = ap.parse_args()
    cells = list(load_experiment(args.config, args.set).cells())
    base = build_settings(cells[0], "cuda")
    for graph in (True,) if args.time_only else (False, True):
        settings = dataclasses.replace(base, steps=100_000, eval_steps=(), cuda_graph=graph)
        trainer = ToyTrainer(build_instances(cells), settings)
        widths = sorted({c.width for c in cells})
        print(f"{len(cells)} models, widths {widths}, cuda_graph={graph}: "
              f"{ms_per_step(trainer, 200):.3f} ms per grid-step", flush=True)
    if args.time_only:
        return
    settings = dataclasses.replace(base, steps=100_000, eval_steps=(), cuda_graph=False)
    trainer = ToyTrainer(build_instances(cells), settings)
    trainer.run(until=10)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        trainer.run(until=10 + args.steps)
        torch.cuda.synchronize()
    print(f"kernels over {args.steps} eager steps:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                    max_name_column_width=70))


if __name__ == "__main__":
    main()
