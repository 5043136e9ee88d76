"""LM training throughput: raretask's model and trainer vs Hugging Face's OLMo 2, same config.

One run trains the same architecture, batch, sequence length and optimiser on one device and
times each variant:

* **raretask**: :class:`raretask.lm.trainer.LMTrainer` with :class:`LMTrainSettings` (its own
  training step: AdamW, warm-up + cosine, clipping at 1.0, bf16 autocast on CUDA), background
  batches from :class:`RandomTokens`, no task, no validation. ``--compile`` (default on CUDA)
  sets ``LMTrainSettings.compile``. The trainer evaluates once, at the last step, with no
  validation batches: that only reads the last step's loss (one host sync, which the timed region
  ends with anyway).
* **hf-eager**: ``transformers``' ``Olmo2ForCausalLM`` built from an ``Olmo2Config`` with the same
  dimensions (:func:`olmo2_config`; SDPA attention, nothing downloaded), started from the same
  weights as the trainer (:func:`hf_state_dict`), trained in a plain PyTorch loop that mirrors the
  trainer's step: the same batches (pinned, copied without blocking), AdamW with the
  ``LMTrainSettings`` defaults (lr, betas, weight decay on matrices only, fused on CUDA), the same
  learning-rate schedule, clipping at 1.0, bf16 autocast on CUDA and float32 on CPU, and the same
  loss (float32 cross-entropy of the logits).
* **hf-compiled**: the same under ``torch.compile``, over the same scope as raretask's compiled
  forward (model and loss). One difference is by design: the trainer asks its model for the loss
  alone (``return_logits=False``), while HF's forward returns the logits, as a plain HF loop
  gets them; a compiled graph that outputs the logits also receives a [B, T, V] zero gradient
  for them in the backward pass.

Each variant runs ``--warmup`` untimed steps (compilation happens there), then ``--steps`` timed
steps between two ``torch.cuda.synchronize`` calls. It reports tokens/s, MFU =
``flops_per_token * tokens/s / peak``, the peak memory (``torch.cuda.max_memory_allocated``,
reset per variant; null on CPU) and the last step's loss; each variant's model and optimiser are
freed before the next starts. ``flops_per_token`` is :meth:`ModelConfig.flops_per_token`:
6 (N + V C) + 12 L C T, whose attention term counts the **full** T x T score matrix (not the causal
half), as PaLM, nanoGPT and OLMo-core do. Before timing, a float32 forward of both models on one
batch checks that they compute the same function (``parity``).

Writes a JSON of the figures (``--out``) and the human-readable log beside it (``.log``).

    python benchmarks/lm_throughput.py --device cuda                # 300m, B 8, T 2048
    python benchmarks/lm_throughput.py --device cpu --small         # tiny preset, seconds
"""

from __future__ import annotations

import argparse
import functools
import gc
import io
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from raretask.errors import UserError
from raretask.lm import export_hf
from raretask.lm.export_hf import olmo2_config  # noqa: F401 (the parity tests read it here)
from raretask.lm.model import PRESETS, ModelConfig, Transformer, _token_losses
from raretask.lm.trainer import (
    ATTENTION_BACKENDS,
    LMTrainer,
    LMTrainSettings,
    adamw,
    check_attention,
    step_autocast,
)
from raretask.runs.profile import COMPILE_MODES

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("raretask", "hf-eager", "hf-compiled")
SMALL = {"preset": "tiny", "batch_size": 2, "seq_len": 32, "warmup": 1, "steps": 2}
FULL = {"preset": "300m", "batch_size": 8, "seq_len": 2048}
FLOPS_NOTE = ("flops_per_token = 6 (N + V C) + 12 L C T (ModelConfig.flops_per_token): the "
              "attention term counts the full T x T score matrix, not the causal half, as PaLM, "
              "nanoGPT and OLMo-core do")


# -- data -----------------------------------------------------------------------------------------
class RandomTokens:
    """Uniform random token ids [B, T + 1] on the CPU: a resumable ``BatchSource`` of its own seed.

    Every variant reads a fresh instance of the same seed, so all of them train on the same batches.
    """

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, seed: int = 0):
        self.shape = (batch_size, seq_len + 1)
        self.vocab_size = vocab_size
        self.gen = torch.Generator().manual_seed(seed)
        self.batches = 0

    def next_batch(self) -> Tensor:
        self.batches += 1
        return torch.randint(0, self.vocab_size, self.shape, generator=self.gen)

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        self.batches = state["batches"]

    @property
    def epochs(self) -> float:
        return 0.0  # an endless stream: never a pass over anything


# -- the Hugging Face model -----------------------------------------------------------------------
def hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """:func:`raretask.lm.export_hf.hf_state_dict` (the mapping ``raretask export-hf`` uses);
    an unknown name is a KeyError here, as a benchmark's bug rather than a user's input."""
    try:
        return export_hf.hf_state_dict(state)
    except UserError as err:
        raise KeyError(str(err)) from None


def build_hf(cfg: ModelConfig, state: dict[str, Tensor]) -> nn.Module:
    """``Olmo2ForCausalLM`` of :func:`olmo2_config` holding raretask's weights ``state``
    (float32, train mode, on ``state``'s device)."""
    from transformers import Olmo2ForCausalLM

    model = Olmo2ForCausalLM(olmo2_config(cfg, attn_implementation="sdpa"))
    model.load_state_dict(hf_state_dict(state), strict=True)
    return model.train()


class HFWithLoss(nn.Module):
    """HF model + raretask's loss: ``(logits [B, T, V], mean float32 cross-entropy)``.

    The same outputs and loss as ``Transformer.forward(idx, targets)``, so compiling it covers
    the same work as raretask's compiled forward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(input_ids=idx, use_cache=False).logits  # [B, T, V]
        return logits, _token_losses(logits, targets).mean()  # Transformer.forward's loss


@functools.cache
def initial_state(cfg: ModelConfig, seed: int) -> dict[str, Tensor]:
    """The weights ``LMTrainer`` starts from at ``seed`` (its CPU draw), as a CPU state dict
    (drawn once per run; callers copy from it)."""
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model.state_dict()


# -- parity ---------------------------------------------------------------------------------------
@torch.no_grad()
def parity(cfg: ModelConfig, device: torch.device, seq_len: int, seed: int) -> dict:
    """Float32 forward of raretask's model and the HF model from the same weights on one batch
    [1, seq_len]: the largest logit difference and the two losses (HF's from its own ``labels``
    loss, which shifts the labels itself)."""
    state = initial_state(cfg, seed)
    ours = Transformer(cfg)
    ours.load_state_dict(state)
    ours = ours.to(device).eval()
    hf = build_hf(cfg, state).to(device).eval()
    seq = RandomTokens(cfg.vocab_size, 1, seq_len, seed + 1).next_batch().to(device)
    logits, loss = ours(seq[:, :-1], targets=seq[:, 1:])
    out = hf(input_ids=seq, labels=seq, use_cache=False)
    diff = (logits - out.logits[:, :-1]).abs().max().item()
    result = {"batch": [1, seq_len], "dtype": "float32",
              "max_abs_logit_diff": diff, "max_abs_logit": logits.abs().max().item(),
              "loss_raretask": loss.item(), "loss_hf": out.loss.item()}
    del ours, hf, logits, out
    free(device)
    return result


# -- timing ---------------------------------------------------------------------------------------
@dataclass
class Run:
    """What one variant measured."""

    name: str
    compiled: bool
    warmup_s: float  # untimed steps, compilation included
    timed_s: float
    final_loss: float
    peak_memory_bytes: int | None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def settings_for(args, device: torch.device, compiled: bool) -> LMTrainSettings:
    total = args.warmup + args.steps
    return LMTrainSettings(steps=total, batch_size=args.batch_size, seq_len=args.seq_len,
                           device=str(device), compile=compiled, seed=args.seed,
                           compile_mode=args.compile_mode, attention=args.attention)


def time_raretask(cfg: ModelConfig, args, device: torch.device, compiled: bool) -> Run:
    settings = settings_for(args, device, compiled)
    data = RandomTokens(cfg.vocab_size, args.batch_size, args.seq_len, args.seed)
    trainer = LMTrainer(cfg, data, lambda: [], None, None, settings)
    sync(device)
    t0 = time.perf_counter()
    trainer.run(until=args.warmup)
    sync(device)
    t1 = time.perf_counter()
    trainer.run()
    sync(device)
    t2 = time.perf_counter()
    loss = float(trainer.last_loss)
    del trainer
    return Run("raretask", compiled, t1 - t0, t2 - t1, loss, None)


def time_hf(cfg: ModelConfig, args, device: torch.device, compiled: bool) -> Run:
    s = settings_for(args, device, compiled)
    model = build_hf(cfg, initial_state(cfg, args.seed)).to(device)
    opt = adamw(model.parameters(), s, device)  # the trainer's optimiser and precision
    forward = HFWithLoss(model)
    if compiled:
        forward = torch.compile(forward)
    autocast = step_autocast(device)
    data = RandomTokens(cfg.vocab_size, args.batch_size, args.seq_len, args.seed)
    losses: list[Tensor] = []

    def step(i: int) -> None:  # the trainer's step, written plainly
        batch = data.next_batch()
        if device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = s.lr_at(i)
        with autocast:
            _, loss = forward(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    sync(device)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync(device)
    t1 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    sync(device)
    t2 = time.perf_counter()
    loss = losses[-1].item()  # model and optimiser go with this frame (measure() then frees)
    return Run("hf-compiled" if compiled else "hf-eager", compiled, t1 - t0, t2 - t1, loss, None)


def measure(variant: str, cfg: ModelConfig, args, device: torch.device) -> Run:
    """One variant from a clean slate: its peak memory is its own."""
    free(device)
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if variant == "raretask":
        run = time_raretask(cfg, args, device, args.compile)
    else:
        run = time_hf(cfg, args, device, variant == "hf-compiled")
    if device.type == "cuda":
        run.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    torch._dynamo.reset()  # compiled graphs hold on to their variant's tensors
    free(device)
    return run


# -- command line ---------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's usage block is left out)
        self.exit(2, f"error: {message}\n")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = _Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true",
                    help="CPU test size: " + " ".join(f"{k}={v}" for k, v in SMALL.items()))
    ap.add_argument("--preset", default=None, help=f"model preset ({', '.join(PRESETS)}; "
                    "default 300m)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048)")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="vocabulary (default: the preset's, 50,304; the study's grids use 4,096)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (CUDA 10, CPU 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (CUDA 50, CPU 5)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " +
                    ", ".join(VARIANTS))
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile raretask's model (default: on CUDA)")
    ap.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS,
                    help="raretask's SDPA backend (auto: PyTorch's choice, as the HF variants)")
    ap.add_argument("--compile-mode", default="default",
                    choices=COMPILE_MODES,
                    help="torch.compile mode of the raretask variant")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="peak dense TFLOP/s for MFU (989: H100/H200 SXM bf16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/"
                    "lm_throughput_<device>_<preset>.json); the log is written beside it")
    args = ap.parse_args(argv)

    cuda = args.device.startswith("cuda")
    defaults = {**FULL, "warmup": 10 if cuda else 2, "steps": 50 if cuda else 5}
    if args.small:
        defaults.update(SMALL)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.compile is None:
        args.compile = cuda
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]

    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        ap.error(f"--device: {e}")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device: {args.device!r} is neither cpu nor cuda")
    try:
        check_attention(args.attention, device.type)
    except ValueError as err:
        ap.error(f"--{err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device: cuda requested but torch sees no CUDA device")
    if args.preset not in PRESETS:
        ap.error(f"--preset: unknown preset {args.preset!r} (known: {', '.join(PRESETS)})")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        ap.error(f"--variants: unknown variant(s) {', '.join(unknown) or '(none given)'} "
                 f"(known: {', '.join(VARIANTS)})")
    if len(set(args.variants)) != len(args.variants):
        ap.error(f"--variants: {','.join(args.variants)} names a variant twice")
    for name in ("batch_size", "seq_len", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: {getattr(args, name)} is not >= 1")
    if args.vocab_size is not None and args.vocab_size < 2:
        ap.error(f"--vocab-size: {args.vocab_size} is not >= 2")
    if args.warmup < 0:
        ap.error(f"--warmup: {args.warmup} is not >= 0")
    if not (args.peak_tflops > 0 and math.isfinite(args.peak_tflops)):
        ap.error(f"--peak-tflops: {args.peak_tflops} is not a positive number")
    max_len = ModelConfig.preset(args.preset).max_seq_len
    if args.seq_len > max_len:
        ap.error(f"--seq-len: {args.seq_len} exceeds preset {args.preset!r}'s max_seq_len "
                 f"{max_len}")
    if any(v.startswith("hf") for v in args.variants):
        try:
            import transformers  # noqa: F401
        except ImportError:
            ap.error("--variants: the hf variants need transformers (pip install -e '.[dev]')")
    args.device = device
    return args


def code_version() -> str | None:
    """``git describe`` of the checkout (with ``-dirty``), or None outside a git checkout."""
    try:
        res = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.strip() or None


def table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("variant", "compiled", "tokens/s", "ms/step", "MFU %", "peak GiB", "final loss",
                "warm-up s"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        mem = r["peak_memory_bytes"]
        t.add_row(r["name"], "yes" if r["compiled"] else "no", f"{r['tokens_per_s']:,.0f}",
                  f"{r['step_ms']:.2f}", f"{100 * r['mfu']:.3g}",
                  "-" if mem is None else f"{mem / 2**30:.2f}", f"{r['final_loss']:.4f}",
                  f"{r['warmup_s']:.1f}")
    return t


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = args.device
    cuda = device.type == "cuda"
    cfg = ModelConfig.preset(args.preset, **({"vocab_size": args.vocab_size}
                                              if args.vocab_size is not None else {}))
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"lm_throughput_{device.type}_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    code = code_version()
    hf_version = None
    if any(v.startswith("hf") for v in args.variants):
        import transformers

        hf_version = transformers.__version__
    say(f"LM throughput benchmark, {date.today()}, {name}, torch {torch.__version__}, "
        f"transformers {hf_version}, {torch.get_num_threads()} CPU threads, code {code}")
    say(f"command: python {' '.join(sys.argv)}")
    tokens_per_step = args.batch_size * args.seq_len
    flops = cfg.flops_per_token(args.seq_len)
    say(f"model: preset {args.preset} (C={cfg.d_model} L={cfg.n_layers} H={cfg.n_heads} "
        f"mlp={cfg.mlp_hidden} V={cfg.vocab_size}, tied {cfg.tie_embeddings}); "
        f"N = {cfg.num_params(False):,} non-embedding, {cfg.num_params(True):,} total")
    say(f"batch {args.batch_size} x {args.seq_len} = {tokens_per_step:,} tokens per step; "
        f"{'bf16 autocast' if cuda else 'float32'}; AdamW lr {LMTrainSettings.lr} betas "
        f"{LMTrainSettings.betas} wd {LMTrainSettings.weight_decay}"
        f"{' fused' if cuda else ''}; clip {LMTrainSettings.grad_clip}; "
        f"{args.warmup} warm-up + {args.steps} timed steps")
    say(f"FLOPs: {flops / 1e9:.4f} GFLOP per token; {FLOPS_NOTE}; peak {args.peak_tflops:g} "
        "TFLOP/s")

    check = None
    if any(v.startswith("hf") for v in args.variants):
        check = parity(cfg, device, args.seq_len, args.seed)
        say(f"parity (float32, one batch of {args.seq_len}): max |logit diff| "
            f"{check['max_abs_logit_diff']:.3g} (largest |logit| {check['max_abs_logit']:.3g}); "
            f"loss raretask {check['loss_raretask']:.6f}, hf {check['loss_hf']:.6f}")

    rows = []
    for variant in args.variants:
        run = measure(variant, cfg, args, device)
        tps = tokens_per_step * args.steps / run.timed_s
        row = {"name": run.name, "compiled": run.compiled, "warmup_s": run.warmup_s,
               "timed_s": run.timed_s, "step_ms": 1e3 * run.timed_s / args.steps,
               "tokens_per_s": tps, "mfu": flops * tps / (args.peak_tflops * 1e12),
               "peak_memory_bytes": run.peak_memory_bytes, "final_loss": run.final_loss}
        rows.append(row)
        mem = run.peak_memory_bytes
        say(f"{run.name}{' (compiled)' if run.compiled else ''}: {tps:,.0f} tokens/s, "
            f"{row['step_ms']:.2f} ms/step, MFU {100 * row['mfu']:.3g}%, peak memory "
            f"{'-' if mem is None else f'{mem / 2**30:.2f} GiB'}, final loss "
            f"{run.final_loss:.4f}, warm-up {run.warmup_s:.1f} s")

    ours = next((r for r in rows if r["name"] == "raretask"), None)
    hf_rows = [r for r in rows if r["name"].startswith("hf")]
    ratio = None
    if ours and hf_rows:
        best = max(hf_rows, key=lambda r: r["tokens_per_s"])
        ratio = {"raretask_over_best_hf": ours["tokens_per_s"] / best["tokens_per_s"],
                 "best_hf": best["name"]}
        say(f"raretask / {best['name']} (the faster HF variant): "
            f"{ratio['raretask_over_best_hf']:.3f}x tokens/s")
    say(f"ln(V) = {math.log(cfg.vocab_size):.4f} (the loss of a uniform guess)")

    title = f"{args.preset}, B={args.batch_size}, T={args.seq_len}, {name}"
    buf = io.StringIO()
    Console(file=buf, width=120, no_color=True).print(table(rows, title))
    say(buf.getvalue().rstrip())
    out.with_suffix(".log").write_text("\n".join(lines) + "\n")
    result = {
        "date": str(date.today()), "device": name, "device_type": device.type,
        "torch": torch.__version__, "transformers": hf_version, "code": code,
        "command": sys.argv, "preset": args.preset, "model": cfg.model_dump(),
        "batch_size": args.batch_size, "seq_len": args.seq_len,
        "tokens_per_step": tokens_per_step, "warmup": args.warmup, "steps": args.steps,
        "dtype": "bfloat16 autocast" if cuda else "float32",
        "flops_per_token": flops, "flops_note": FLOPS_NOTE, "peak_tflops": args.peak_tflops,
        "ln_vocab": math.log(cfg.vocab_size), "parity": check, "variants": rows, "ratio": ratio,
        "raretask_attention": args.attention, "raretask_compile_mode": args.compile_mode,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.log')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
