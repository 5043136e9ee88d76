"""Where one toy grid-step's GPU time goes: per-kernel table of the batched trainer.

    python benchmarks/profile_toy_step.py [--config configs/fig2_phase.yaml] [--set k=v ...]

Runs the grid's trainer eagerly (no CUDA graph, so kernels are attributed) for a few steps
under torch.profiler and prints the kernels by total GPU time, then the graph-replayed time per
step for comparison. ``--phases`` first times each phase of a step (gradients, Adam, each
retraction, per group) and rewritings of the gradient, each replayed as a CUDA graph;
``--time-only`` prints the graph-replayed step time alone (``--set`` any cell field, or
``profile.FIELD`` for an execution setting; ``--retraction`` any of benchmarks/toy_retractions.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from toy_retractions import polar_retraction, register, series_qr_retraction

from raretask.config import load_experiment
from raretask.studies.toy import build_instances, build_settings
from raretask.toy.model import batch_gradients, fused_masked_residual, seed_shared_gradients, tf32
from raretask.toy.trainer import ToyTrainer

ROOT = Path(__file__).resolve().parents[1]


def ms_per_step(trainer: ToyTrainer, steps: int, warmup: int = 30) -> float:
    trainer.run(until=trainer.step + warmup)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.run(until=trainer.step + steps)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def graph_ms(fn, reps: int = 200) -> float:
    """ms per call of ``fn`` replayed as a CUDA graph (launch overhead excluded)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def phases(trainer: ToyTrainer) -> None:
    """ms per grid-step of each phase (gradients, Adam, each retraction), per group and all."""
    trainer.run(until=trainer.step + 20)
    groups = trainer._groups

    def grads(grs):
        def fn():  # the trainer's own gradient pass (its dispatch, settings and buffers)
            xs = trainer._inputs(0)
            for gr in grs:
                trainer._group_gradients(gr, xs, 0)
        return fn

    retractions = {"series_qr": series_qr_retraction, "polar": polar_retraction,
                   "polar_tf32": functools.partial(polar_retraction, exact_gram=False)}

    def retract(grs, name):
        def fn():
            for gr in grs:
                gr.params[0].copy_(retractions[name](gr.params[0], shift=gr.shift))
        return fn

    def variants(gr):
        """Rewritings of one group's gradient (timing only: same FLOPs, other kernels)."""
        i_n, n = len(gr.idx), gr.n
        x_seed = trainer._inputs(0)[(gr.k, gr.m)]
        x = gr.take(x_seed).contiguous()
        z = gr.take(gr.streams.z_buf[:, 0]).contiguous()
        coef, sl = gr.coef_buf[:, 0], gr.sqrt_lam
        u, d = gr.params[0], gr.params[1]
        ut, dt = u.mT.contiguous(), d.mT.contiguous()  # [I, N, d]
        gu, gd = torch.empty_like(u), torch.empty_like(d)
        gut, gdt = torch.empty_like(ut), torch.empty_like(dt)

        fused = torch.compile(fused_masked_residual, dynamic=False)

        def plain():
            batch_gradients(u, d, z, coef, sl, None, False, out=(gu, gd), x=x)

        def compiled():
            h = torch.bmm(x, u)
            g = fused(torch.bmm(h, d.mT), z, sl, coef)
            torch.bmm(g.mT, h, out=gd)
            torch.bmm(x.mT, torch.bmm(g, d), out=gu)

        def transposed():
            h = torch.bmm(x, ut.mT)
            g = fused(torch.bmm(h, dt), z, sl, coef)
            torch.bmm(h.mT, g, out=gdt)
            torch.bmm(torch.bmm(g, dt.mT).mT, x, out=gut)

        def gemms_only():
            h = torch.bmm(x, u)
            e = torch.bmm(h, d.mT)
            torch.bmm(e.mT, h, out=gd)
            torch.bmm(x.mT, torch.bmm(e, d), out=gu)

        def shared():
            seed_shared_gradients(u, d, x_seed, gr.streams.z_buf[:, 0], coef, sl, out=(gu, gd),
                                  residual=fused)

        tag = f"N={n} x {i_n}"
        extra = [(f"  grad {tag} seed-shared inputs + fused", shared)] if gr.tiled else []
        return extra + [(f"  grad {tag} x gathered, plain", plain),
                (f"  grad {tag} fused residual (compiled)", compiled),
                (f"  grad {tag} transposed params + fused", transposed),
                (f"  grad {tag} the 5 GEMMs alone", gemms_only)]

    with tf32(True):
        rows = [("x = z B^T (per seed)", lambda: trainer._inputs(0))]
        rows.append(("gradients, all groups", grads(groups)))
        rows.append(("fused Adam, all groups", trainer._opt.step))
        for name in retractions:
            rows.append((f"retraction {name}, all groups", retract(groups, name)))
        for gr in groups:
            tag = f"group N={gr.n} x {len(gr.idx)}"
            rows.append((f"  gradients {tag}", grads([gr])))
            for name in ("series_qr", "polar"):
                rows.append((f"  retraction {name} {tag}", retract([gr], name)))
            rows.extend(variants(gr))
        for label, fn in rows:
            print(f"{label:<52} {graph_ms(fn):8.3f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "fig2_phase.yaml"))
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--time-only", action="store_true", help="graph-replayed time, no profile")
    ap.add_argument("--phases", action="store_true", help="also time each phase as a graph")
    ap.add_argument("--retraction", help="any retraction, the benchmarks' variants too "
                    "(benchmarks/toy_retractions.py): overrides the profile's")
    args = ap.parse_args()
    exp = load_experiment(args.config, args.set)  # --set profile.FIELD=VALUE for execution
    cells = list(exp.cells())
    base = build_settings(cells[0], exp.profile.resolve("cuda"))
    if args.retraction:
        register()
        base = dataclasses.replace(base, retraction=args.retraction)
    if args.phases:
        settings = dataclasses.replace(base, steps=100_000, eval_steps=())
        phases(ToyTrainer(build_instances(cells), settings))
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
