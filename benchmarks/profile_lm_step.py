"""Where one LM training step's GPU time goes: kernels of raretask's trainer by category.

    python benchmarks/profile_lm_step.py [--preset 300m] [--batch-size 8] [--seq-len 2048]
        [--set fuse_projections=false] [--compile-mode default] [--steps 5]

Builds the trainer exactly as ``lm_throughput.py``'s raretask variant (compiled on CUDA, bf16
autocast, fused AdamW, random tokens), trains ``--warmup`` steps untimed (compilation), then
``--steps`` steps under torch.profiler. Prints GPU time per step by kernel category (GEMM,
attention, Triton-fused elementwise, optimiser, ...), the busy fraction of the step's wall time
and the top kernels, and writes the same to ``--out`` (text). The categories are read from
kernel names, so they are a guide; the per-step sum is exact.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_throughput import RandomTokens  # noqa: E402

from raretask.lm.model import ModelConfig  # noqa: E402
from raretask.lm.trainer import LMTrainer, LMTrainSettings  # noqa: E402
from raretask.report.lm_cost import H100_BF16_TFLOPS  # noqa: E402

CATEGORIES = (  # (category, substrings of the kernel name), first match wins
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "ampere_", "triton_tem")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "norm_kernel", "lpnorm")),
    ("cross-entropy", ("log_softmax", "nll", "cross_entropy")),
    ("triton fused", ("triton_",)),
    ("copy / cast", ("copy", "cast", "memcpy", "memset", "fill", "cat")),
    ("embedding", ("embedding", "index", "scatter", "sort", "radix")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="300m")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="ModelConfig field override, e.g. fuse_projections=false")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None, help="text file for the tables")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not torch.cuda.is_available():
        print("error: --device: this profile needs a CUDA device", file=sys.stderr)
        return 2
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = {"true": True, "false": False}.get(value.lower(), value)
    cfg = ModelConfig.preset(args.preset, **overrides)
    settings = LMTrainSettings(steps=args.warmup + args.steps, batch_size=args.batch_size,
                               seq_len=args.seq_len, device="cuda", compile=True,
                               compile_mode=args.compile_mode)
    data = RandomTokens(cfg.vocab_size, args.batch_size, args.seq_len)
    trainer = LMTrainer(cfg, data, lambda: [], None, None, settings)
    trainer.run(until=args.warmup)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        trainer.run()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.steps
    per_cat: dict[str, float] = defaultdict(float)
    kernels = []
    for ev in prof.key_averages():
        gpu_us = ev.self_device_time_total
        if gpu_us <= 0 or ev.key.startswith("ProfilerStep"):
            continue
        per_cat[category(ev.key)] += gpu_us / args.steps
        kernels.append((gpu_us / args.steps, ev.count // args.steps, ev.key))
    busy = sum(per_cat.values()) / 1e3
    tokens = args.batch_size * args.seq_len
    # MFU as lm_throughput and lm_cost count it (model.py: flops_per_token), so a category's
    # share of the step reads against the figures in RESULTS.md
    mfu = cfg.flops_per_token(args.seq_len) * tokens / wall / (H100_BF16_TFLOPS * 1e12)
    lines = [f"profile of one training step: preset {args.preset} {overrides or ''}, batch "
             f"{args.batch_size} x {args.seq_len}, compile mode {args.compile_mode}, "
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}",
             f"wall {1e3 * wall:.2f} ms/step ({tokens / wall:,.0f} tokens/s, MFU {100 * mfu:.1f}% "
             f"against {H100_BF16_TFLOPS:g} TFLOP/s, with the profiler on); GPU kernels "
             f"{busy:.2f} ms/step ({100 * busy / (1e3 * wall):.1f}% of the wall time)",
             "", f"{'category':<16}{'ms/step':>10}{'share':>8}"]
    for cat, us in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"{cat:<16}{us / 1e3:>10.2f}{100 * us / 1e3 / busy:>7.1f}%")
    lines += ["", f"{'ms/step':>8}{'calls':>7}  kernel (top {args.top})"]
    for us, calls, name in sorted(kernels, reverse=True)[:args.top]:
        lines.append(f"{us / 1e3:>8.3f}{calls:>7}  [{category(name)}] {name[:110]}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
