"""Stacked seeds: K models of one size trained as one, the study's small steps at GPU speed?

Issue 19 (item 8) asks 45% MFU of the 60m-150m cells; alone at the grids' steps (2,048-8,192
tokens) they reach 13-35% on an H200 (RESULTS.md), because each kernel sees too few tokens, and
packing processes does not help there. The study's seeds of one setting are the same architecture
on different draws and streams, so they can be one model with a leading seed axis, as the toy
trains its instances: every weight becomes [K, ...], the forward is ``torch.func.vmap`` over
``functional_call``, each matrix product a batched one over K x the tokens, and one optimiser step
updates all K. Nothing mixes between seeds: AdamW is elementwise and each seed's gradient is
clipped by its own norm (:meth:`StackedTrainer.step`), so seed k follows the trajectory
``LMTrainer`` gives it alone (``tests/test_lm_stacked.py`` pins this on the CPU).

This script measures whether that pays before the trainer grows the axis: tokens/s and MFU of
``LMTrainer`` alone (K = 1, the baseline, same run) and of K stacked seeds, at one step shape.

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
from datetime import date
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_throughput import (  # noqa: E402
    FLOPS_NOTE,
    RandomTokens,
    code_version,
    free,
    initial_state,
    sync,
)

from raretask.lm.model import PRESETS, ModelConfig, Transformer  # noqa: E402
from raretask.lm.trainer import (  # noqa: E402
    LMTrainer,
    LMTrainSettings,
    adamw,
    cuda_graphs,
    step_autocast,
)


class StackedModel(nn.Module):
    """K copies of one ``Transformer``, their weights stacked on a leading axis.

    The stacked weights are this module's parameters (``stacked.NAME`` with dots as ``__``), so a
    compiled step treats them as static (CUDA graphs do not copy them in). The RoPE tables are
    shared, not stacked.
    """

    def __init__(self, models: list[Transformer]):
        super().__init__()
        params, _ = stack_module_state(models)
        self.names = list(params)
        self.stacked = nn.ParameterDict({n.replace(".", "__"): nn.Parameter(p.detach())
                                         for n, p in params.items()})
        self.register_buffer("rope_cos", models[0].rope_cos.clone(), persistent=False)
        self.register_buffer("rope_sin", models[0].rope_sin.clone(), persistent=False)
        # functional_call supplies every tensor: the shell's own are on the meta device, and it
        # is kept out of this module's children (its parameters are not ours)
        object.__setattr__(self, "_shell", models[0].to("meta"))

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Each seed's mean loss [K] for ids and targets [K, B, T]."""
        params = {n: self.stacked[n.replace(".", "__")] for n in self.names}
        buffers = {"rope_cos": self.rope_cos, "rope_sin": self.rope_sin}

        def one(p: dict, x: Tensor, y: Tensor) -> Tensor:
            return functional_call(self._shell, (p, buffers), (x,),
                                   {"targets": y, "return_logits": False})[1]

        return vmap(one)(params, idx, targets)


class StackedTrainer:
    """``LMTrainer``'s training step (AdamW on matrices only, its learning-rate schedule, clipping,
    bf16 autocast on CUDA) for K seeds at once; no task, no evaluation (a benchmark's trainer)."""

    def __init__(self, cfg: ModelConfig, settings: LMTrainSettings, seeds: list[int],
                 data: list):
        self.settings, self.data, self.step_count = settings, data, 0
        self.device = torch.device(settings.device)
        models = []
        for seed in seeds:  # LMTrainer's draw for each seed
            model = Transformer(cfg)
            model.load_state_dict(initial_state(cfg, seed))
            models.append(model)
        self.model = StackedModel(models).to(self.device)
        # the seed axis makes every matrix 3-D: decay stays on the matrices
        self.optimizer = adamw(self.model.stacked.values(), settings, self.device, matrix_dim=3)
        self.forward = self.model
        if settings.compile:
            self.forward = torch.compile(self.model, mode=settings.compile_mode)
        self._graphs = cuda_graphs(settings, self.device)
        self._autocast = step_autocast(self.device)

    def step(self) -> Tensor:
        """One step of every seed; returns their losses [K] (on the device)."""
        s = self.settings
        batch = torch.stack([d.next_batch() for d in self.data])  # [K, B, T + 1]
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = s.lr_at(self.step_count)
        if self._graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self._autocast:
            losses = self.forward(batch[..., :-1], batch[..., 1:])
        losses.sum().backward()  # seeds share no weight: each gets its own gradient
        if s.grad_clip > 0:
            self._clip_per_seed(s.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return losses.detach()

    @torch.no_grad()
    def _clip_per_seed(self, max_norm: float) -> None:
        """``clip_grad_norm_`` of each seed's own gradient (its coefficient, 1e-6 included)."""
        grads = [p.grad for p in self.model.stacked.values() if p.grad is not None]
        squares = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0)
        coef = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)  # [K]
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))

    def seed_state(self, k: int) -> dict[str, Tensor]:
        """Seed k's weights under the ``Transformer`` state-dict names."""
        return {n: self.model.stacked[n.replace(".", "__")][k].detach()
                for n in self.model.names}


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
    """K = 1: ``LMTrainer`` itself (the baseline); K > 1: ``StackedTrainer`` over seeds 0..K-1."""
    free(device)
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    settings = LMTrainSettings(steps=args.warmup + args.steps, batch_size=args.batch_size,
                               seq_len=args.seq_len, device=str(device),
                               compile=device.type == "cuda", compile_mode=args.compile_mode)
    streams = [RandomTokens(cfg.vocab_size, args.batch_size, args.seq_len, seed)
               for seed in range(k)]
    if k == 1:
        trainer = LMTrainer(cfg, streams[0], lambda: [], None, None, settings)
        step = trainer._train_step  # the trainer's own step, as a grid cell runs it
    else:
        trainer = StackedTrainer(cfg, settings, list(range(k)), streams)
        step = trainer.step
    warm, timed, last = time_steps(step, args.warmup, args.steps, device)
    tokens = k * args.batch_size * args.seq_len * args.steps
    tps = tokens / timed
    row = {"stack": k, "warmup_s": warm, "timed_s": timed, "step_ms": 1e3 * timed / args.steps,
           "tokens_per_s": tps, "mfu": cfg.flops_per_token(args.seq_len) * tps
           / (args.peak_tflops * 1e12),
           "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
           if device.type == "cuda" else None,
           "final_loss": [round(float(x), 4) for x in last.reshape(-1).tolist()]}
    del trainer
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
