"""Toy grid speed: raretask's batched trainer vs a straightforward per-model PyTorch loop.

One run times both on the same device and checks that they learn the same thing:

* **reference**: each model of the grid on its own, the way one would write it first: ``U`` and
  ``D`` as parameters, autograd, ``torch.optim.Adam``, data drawn on the device every step
  (task ids by ``torch.multinomial``, ``x = basis @ z``), sign-fixed Householder QR after every
  step, PyTorch's default float32 matmuls. Its time per grid-step is the sum of every model's
  time per step (it trains them one after the other), each timed over ``--ref-steps`` steps.
* **raretask**: :class:`raretask.toy.trainer.ToyTrainer` on the whole grid, built through the
  same functions as ``raretask run`` (``build_instances`` / ``build_settings``), timed over
  ``--steps`` training steps after its warm-up (CUDA graphs are captured in the first steps).
* **agreement**: a subset (``--agree-widths`` x ``--agree-beta`` x the grid's seeds) trained
  ``--agree-steps`` steps by both, the reference fed the same seeds' inputs and initial encoder
  (paired: only the arithmetic differs: TF32, the series retraction, fused Adam, CUDA graphs);
  per (width, task) the seed-averaged normalised signals must be within 0.02 or on the same
  side of the learned threshold (0.3).

It also prints the matmul FLOPs of one grid-step of raretask's algorithm (the floor at
tensor-core rates) and the time 100K steps would take. Writes the log and a JSON of the figures
next to each other (``--out``).

    python benchmarks/toy_grid.py --device cuda            # configs/fig2_phase.yaml, 63 models
    python benchmarks/toy_grid.py --device cpu --small     # K = M = 16, widths 8..128, 45 models
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from raretask.config import load_experiment
from raretask.studies.toy import build_instances, build_settings
from raretask.toy.model import random_orthonormal
from raretask.toy.spec import TrainSettings
from raretask.toy.trainer import _BASIS, _INIT, _TRAIN, ToyTrainer, _cdf, stream_seed

ROOT = Path(__file__).resolve().parents[1]
PROFILE = None  # the experiment's execution profile (main sets it from --set profile.FIELD=...)
SMALL = ["tasks=16", "features=16", "width=[8,16,32,64,128]", "batch_size=256"]
THRESHOLD = 0.3  # learned = normalised signal >= 0.3 (the configs' learned_threshold)
TOLERANCE = 0.02
RNG_CHUNK = TrainSettings.rng_chunk  # raretask draws inputs this many steps at a time


# -- the reference: one model, written plainly ---------------------------------------------------
class ReferenceModel:
    """One toy model trained alone with autograd, torch.optim.Adam and QR after every step.

    ``paired=False`` (timing): its own generator draws the basis, the initial encoder and every
    step's data on the device. ``paired=True`` (agreement): the same basis, initial encoder and
    training inputs as raretask's instance of this seed, drawn here from the same seed streams
    (``stream_seed``; inputs ``rng_chunk`` steps at a time: uniforms for the task ids, then
    normals), so the two runs differ only by their arithmetic, not by sampling noise.
    """

    def __init__(self, pi: np.ndarray, lam: np.ndarray, width: int, seed: int, lr: float,
                 batch_size: int, device: torch.device, paired: bool = False):
        k, m = lam.shape
        self.k, self.m, self.d, self.n, self.b = k, m, k * m, width, batch_size
        self.device, self.paired = device, paired
        self.pi = torch.tensor(pi, dtype=torch.float32, device=device)
        self.lam = torch.tensor(lam, dtype=torch.float32, device=device)
        self.sqrt_lam = self.lam.sqrt()
        if paired:
            self.basis = self._seeded_orthonormal(seed, _BASIS, self.d)
            u0 = self._seeded_orthonormal(seed, _INIT, width)
            self.gen = torch.Generator(device).manual_seed(stream_seed(seed, _TRAIN))
            self.cdf = torch.tensor(_cdf(pi), device=device)
            self.chunk: list[tuple[torch.Tensor, torch.Tensor]] = []
        else:
            self.gen = torch.Generator(device).manual_seed(seed)
            self.basis = self._orthonormal(self.d, self.d)  # columns k*M.. belong to task k
            u0 = self._orthonormal(self.d, width)
        self.u = torch.nn.Parameter(u0)
        self.dec = torch.nn.Parameter(torch.zeros(k, m, width, device=device))
        self.opt = torch.optim.Adam([self.u, self.dec], lr=lr)
        self.rows = torch.arange(batch_size, device=device)

    def _orthonormal(self, rows: int, cols: int) -> torch.Tensor:
        q, r = torch.linalg.qr(torch.randn(rows, cols, generator=self.gen, device=self.device))
        return q * torch.sign(torch.diagonal(r))

    def _seeded_orthonormal(self, seed: int, stream: int, cols: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(stream_seed(seed, stream))  # raretask's CPU draw
        return random_orthonormal(self.d, cols, gen).to(self.device, torch.float32)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.paired:
            task = torch.multinomial(self.pi, self.b, replacement=True, generator=self.gen)
            return task, torch.randn(self.b, self.d, generator=self.gen, device=self.device)
        if not self.chunk:
            uni = torch.empty(RNG_CHUNK, self.b, dtype=torch.float64, device=self.device)
            z = torch.empty(RNG_CHUNK, self.b, self.d, device=self.device)
            uni.uniform_(generator=self.gen)
            z.normal_(generator=self.gen)
            tasks = torch.searchsorted(self.cdf, uni, right=True).clamp_(max=self.k - 1)
            self.chunk = list(zip(tasks, z, strict=True))[::-1]
        return self.chunk.pop()

    def step(self) -> None:
        task, z = self._batch()
        x = z @ self.basis.T
        target = self.sqrt_lam[task] * z.view(self.b, self.k, self.m)[self.rows, task]
        h = x @ self.u  # [B, N]
        pred = (h @ self.dec.view(self.d, self.n).T).view(self.b, self.k, self.m)[self.rows, task]
        loss = (pred - target).square().sum(-1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            q, r = torch.linalg.qr(self.u)
            self.u.copy_(q * torch.sign(torch.diagonal(r)))

    def signal_norm(self) -> np.ndarray:
        """[K] (s_k - N/d) / (1 - N/d), s_k = sum_j lam_kj |U^T b_kj|^2 / sum_j lam_kj."""
        with torch.no_grad():
            rows = (self.basis.T.double() @ self.u.double()).square().sum(-1).view(self.k, self.m)
            s = (self.lam.double() * rows).sum(-1) / self.lam.double().sum(-1)
            base = self.n / self.d
            return ((s - base) / (1 - base)).cpu().numpy()


def reference_models(cells, device, paired: bool = False) -> list[ReferenceModel]:
    out = []
    for c, inst in zip(cells, build_instances(cells), strict=True):
        out.append(ReferenceModel(inst.frequencies, inst.eigenvalues, c.width, c.seed, c.lr,
                                  c.batch_size, device, paired))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- timing ---------------------------------------------------------------------------------------
def time_reference(cells, device, steps: int, warmup: int = 5) -> dict[int, float]:
    """Seconds per step of every model trained alone, summed per width."""
    per_width: dict[int, float] = {}
    for c, model in zip(cells, reference_models(cells, device), strict=True):
        for _ in range(warmup):
            model.step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model.step()
        sync(device)
        per_width[c.width] = per_width.get(c.width, 0.0) + (time.perf_counter() - t0) / steps
        del model
    return per_width


def time_raretask(cells, device, steps: int, warmup: int) -> float:
    """Seconds per grid-step of the batched trainer (training only, after warm-up)."""
    settings = build_settings(cells[0], PROFILE.resolve(str(device)))
    settings = dataclasses.replace(settings, steps=warmup + steps, eval_steps=())
    trainer = ToyTrainer(build_instances(cells), settings)
    trainer.run(until=warmup)
    sync(device)
    t0 = time.perf_counter()
    trainer.run()
    sync(device)
    return (time.perf_counter() - t0) / steps


def flops_per_grid_step(cells) -> dict[str, float]:
    """Matmul FLOPs of one raretask grid-step (2 per multiply-add).

    Per model of width N (batch B, d = K M): five [B, d] x [d, N]-sized products (h = x U,
    predictions h D^T, dD, dh, dU): 10 B d N. Per distinct seed: x = z B^T, 2 B d^2. Retraction
    (series Cholesky-QR, two passes): per pass a Gram U^T U (2 d N^2; the pass-2 Gram in fp32) and
    U times an N x N polynomial (2 d N^2), plus the N x N series products (about 6 N^3).
    """
    train = sum(10 * c.batch_size * c.tasks * c.features * c.width for c in cells)
    seeds = {(c.tasks, c.features, c.seed, c.batch_size) for c in cells}
    data = sum(2 * b * (k * m) ** 2 for k, m, _, b in seeds)
    retract = sum(2 * (4 * c.tasks * c.features * c.width**2 + 6 * c.width**3) for c in cells)
    return {"train": train, "data": data, "retraction": retract,
            "total": train + data + retract}


# -- agreement ------------------------------------------------------------------------------------
def agreement(cells, device, steps: int) -> dict:
    settings = build_settings(cells[0], PROFILE.resolve(str(device)))
    settings = dataclasses.replace(settings, steps=steps, eval_steps=(steps,))
    trainer = ToyTrainer(build_instances(cells), settings)
    trainer.run()
    ours = np.zeros((len(cells), cells[0].tasks))
    for r in trainer.metrics():
        if r["metric"] == "signal_norm" and r["step"] == steps:
            ours[r["instance"], r["task"]] = r["value"]
    ref = np.zeros_like(ours)
    for i, model in enumerate(reference_models(cells, device, paired=True)):
        for _ in range(steps):
            model.step()
        ref[i] = model.signal_norm()
    rows, worst, same = [], 0.0, True
    for width in sorted({c.width for c in cells}):
        sel = [i for i, c in enumerate(cells) if c.width == width]
        a, b = ours[sel].mean(0), ref[sel].mean(0)
        diff = np.abs(a - b)
        side = (a >= THRESHOLD) == (b >= THRESHOLD)
        ok = (diff <= TOLERANCE) | side
        worst = max(worst, float(diff.max()))
        same &= bool(ok.all())
        rows.append({"width": width, "seeds": len(sel), "max_abs_diff": float(diff.max()),
                     "learned_raretask": int((a >= THRESHOLD).sum()),
                     "learned_reference": int((b >= THRESHOLD).sum()),
                     "tasks_agreeing": int(ok.sum()), "tasks": len(a)})
    return {"steps": steps, "rows": rows, "max_abs_diff": worst, "agree": same}


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "fig2_phase.yaml"))
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--small", action="store_true", help="CPU size: " + " ".join(SMALL))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed raretask grid-steps")
    ap.add_argument("--warmup", type=int, default=50, help="raretask steps before timing")
    ap.add_argument("--ref-steps", type=int, default=None, help="timed steps per reference model")
    ap.add_argument("--agree-steps", type=int, default=None)
    ap.add_argument("--agree-widths", default=None, help="comma list (default 16,64,128)")
    ap.add_argument("--agree-beta", type=float, default=1.5)
    ap.add_argument("--out", default=None, help="log path (default benchmarks/results/...)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    steps = args.steps or (2000 if cuda else 40)
    ref_steps = args.ref_steps or (50 if cuda else 5)
    agree_steps = args.agree_steps or (3000 if cuda else 600)
    widths = [int(w) for w in (args.agree_widths or ("16,64,128" if cuda else "16,64")).split(",")]
    overrides = [*(SMALL if args.small else []), *args.set]
    exp = load_experiment(args.config, overrides)
    global PROFILE
    PROFILE = exp.profile
    cells = list(exp.cells())
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"toy_grid_{device.type}{'_small' if args.small else ''}.log")
    out.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    say(f"toy grid benchmark, {date.today()}, {name}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads")
    say(f"command: python {' '.join(sys.argv)}")
    c0 = cells[0]
    say(f"grid: {len(cells)} models from {Path(args.config).name} {' '.join(overrides)}; "
        f"K={c0.tasks} M={c0.features} d={c0.tasks * c0.features} B={c0.batch_size} "
        f"widths {sorted({c.width for c in cells})}")

    torch.manual_seed(0)
    flops = flops_per_grid_step(cells)
    ours = time_raretask(cells, device, steps, args.warmup)
    say(f"raretask: {ours * 1e3:.3f} ms per grid-step (over {steps} steps after {args.warmup}; "
        f"retraction {build_settings(c0, PROFILE.resolve(str(device))).retraction}, "
        f"tf32 {build_settings(c0, PROFILE.resolve(str(device))).tf32})")
    per_width = time_reference(cells, device, ref_steps)
    ref = sum(per_width.values())
    say(f"reference: {ref * 1e3:.2f} ms per grid-step = sum over the {len(cells)} models "
        f"({ref_steps} steps each); per model-step by width: " +
        ", ".join(f"{w}: {t / sum(c.width == w for c in cells) * 1e3:.2f} ms"
                  for w, t in sorted(per_width.items())))
    speedup = ref / ours
    say(f"speed-up: {speedup:.1f}x")
    tflops = flops["total"] / ours / 1e12
    say(f"matmul FLOPs per grid-step: {flops['total'] / 1e9:.1f} G "
        f"(training {flops['train'] / 1e9:.1f}, data {flops['data'] / 1e9:.1f}, "
        f"retraction {flops['retraction'] / 1e9:.1f}); "
        f"achieved {tflops:.1f} TFLOP/s")
    if cuda:
        say(f"floor at 494.7 TFLOP/s (H100 SXM dense TF32): {flops['total'] / 494.7e12 * 1e3:.3f} "
            f"ms per grid-step ({flops['total'] / 494.7e12 * 1e5:.1f} s per 100K steps)")
    full = c0.steps
    say(f"projected {full} steps: raretask {ours * full:.0f} s ({ours * full / 60:.1f} min), "
        f"reference {ref * full:.0f} s ({ref * full / 3600:.2f} h)")

    subset = [c for c in cells if c.width in widths and math.isclose(c.beta, args.agree_beta)]
    if subset:
        agree = agreement(subset, device, agree_steps)
        say(f"agreement: {len(subset)} models (widths {widths}, beta {args.agree_beta}, seeds "
            f"averaged), {agree_steps} steps, criterion |diff| <= {TOLERANCE} or same side of "
            f"{THRESHOLD}:")
        for r in agree["rows"]:
            say(f"  width {r['width']:4d}: learned {r['learned_raretask']:2d} (raretask) vs "
                f"{r['learned_reference']:2d} (reference), max |diff| {r['max_abs_diff']:.4f}, "
                f"tasks agreeing {r['tasks_agreeing']}/{r['tasks']}")
        say(f"agreement: {'PASS' if agree['agree'] else 'FAIL'} "
            f"(max |diff| {agree['max_abs_diff']:.4f})")
    else:
        agree = None
        say("agreement: no model of the grid matches --agree-widths / --agree-beta")
    out.write_text("\n".join(lines) + "\n")
    result = {"date": str(date.today()), "device": name, "torch": torch.__version__,
              "models": len(cells), "ms_per_grid_step": ours * 1e3,
              "reference_ms_per_grid_step": ref * 1e3, "speedup": speedup,
              "flops_per_grid_step": flops, "projected_seconds": ours * full,
              "reference_projected_seconds": ref * full, "agreement": agree}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0 if agree is None or agree["agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
