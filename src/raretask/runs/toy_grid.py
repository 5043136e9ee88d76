"""Run a toy grid into a directory: groups of cells trained together, checkpointed, resumable.

Layout of a run directory::

    DIR/config.yaml                 the resolved experiment (defaults filled); a re-run must match
    DIR/cells.json                  every cell's scalar settings, by cell id, and its group
    DIR/log.txt                     what happened, with the code version
    DIR/groups/gNNNN/checkpoint.safetensors   trainer state while the group runs (removed after)
    DIR/groups/gNNNN/metrics.parquet          long format: cell, step, task, metric, value
    DIR/groups/gNNNN/traces.parquet           cell, step, rare_signal (when trace_every > 0)
    DIR/groups/gNNNN/summary.json             final per-cell, per-task rows; written last = done
    DIR/metrics.parquet, DIR/summary.json     all groups merged, once the grid is complete

Cells that share the shape of their training (task count, features, steps, batch, lr, eval
schedule, basis) are packed into groups of at most ``group_size`` models, one optimizer step
training them all (the instance axis). Group membership is a pure function of the config, so a
killed grid resumes into the same groups: finished groups are skipped, an unfinished one resumes
from its checkpoint and ends with the numbers an uninterrupted run gives (CPU).

A cell whose training diverges (NaN/Inf, or a loss past
:data:`raretask.toy.trainer.DIVERGE_FACTOR` times the mean predictor's, checked at eval steps) is
reset to the model that learned nothing and frozen there while its group-mates train on
unaffected; its summary rows carry ``diverged_step`` (None for every other cell) and report that
model: signal 0, loss 1, features 0, no task learned. The log names it.
"""

from __future__ import annotations

import time

import numpy as np

from raretask.config import ToyCell
from raretask.errors import UserError
from raretask.runs import store
from raretask.runs.grid import GridRun, Group, load_summary  # noqa: F401 (re-exported)
from raretask.theory import TaskSet, Theory

SHAPE_FIELDS = ("tasks", "features", "steps", "batch_size", "lr", "eval_points",
                "trace_every", "basis", "retraction", "tf32", "cuda_graph", "fuse", "share_inputs",
                "group_streams", "pad_width")
"""Cells must agree on these to train in one optimizer step."""


def plan_groups(cells: list[ToyCell], group_size: int) -> list[Group]:
    """Pack cells with the same training shape into groups, in config order."""
    by_shape: dict[tuple, list[int]] = {}
    for i, c in enumerate(cells):
        by_shape.setdefault(tuple(getattr(c, f) for f in SHAPE_FIELDS), []).append(i)
    groups = []
    for ids in by_shape.values():
        for start in range(0, len(ids), group_size):
            groups.append(Group(f"g{len(groups):04d}", tuple(ids[start:start + group_size])))
    return groups


def eval_steps(steps: int, points: int) -> tuple[int, ...]:
    """About ``points`` log-spaced steps in [1, steps], always including the last."""
    grid = np.unique(np.round(np.geomspace(1, steps, points)).astype(int))
    return tuple(int(s) for s in np.union1d(grid, [steps]))


def resolve_retraction(name: str, device: str) -> str:
    """'auto' -> Householder QR on CPU (exact, fast enough), the GEMM-only polar factor on CUDA.

    On CUDA the retraction is latency-bound: "polar" is six kernels per group against the series
    QR's twenty (one H200, Fig. 2 grid: 0.69 against 1.10 ms per grid-step), and spans the same
    subspace, which is all the toy's metrics read. "polar_tf32" also rounds its last Gram to
    TF32 (columns orthonormal to ~3e-5, corrected again every step): 1.67 -> 1.50 ms per
    grid-step with share_inputs, the reference agreement unchanged (benchmarks/RESULTS.md).
    "polar_once" is one third-order pass of it, four kernels instead of six (orthonormal to
    O(|E|^4), re-corrected every step): 1.50 -> 1.29 ms, the agreement unchanged.
    """
    if name != "auto":
        return name
    return "polar_once" if device.startswith("cuda") else "qr"


def task_set(cell: ToyCell) -> TaskSet:
    return TaskSet.power_law(cell.tasks, cell.features, alpha=cell.alpha, beta=cell.beta)


def build_instances(cells: list[ToyCell]):
    """The trainer's :class:`~raretask.toy.spec.ToyInstance` of each cell, in order."""
    from raretask.toy.spec import Schedule, ToyInstance

    out = []
    for c in cells:
        ts = task_set(c)
        frequent = np.zeros(c.tasks, dtype=bool)
        frequent[Theory(ts, c.frequent_mass).frequent_tasks()] = True
        out.append(ToyInstance(
            width=c.width, frequencies=ts.frequencies, eigenvalues=np.stack(ts.spectra),
            seed=c.seed, rare_task=c.rare_index, frequent=frequent,
            schedule=Schedule(kind=c.schedule, gap=c.gap, count=c.count),
        ))
    return out


def build_settings(cell: ToyCell, device: str):
    """The :class:`~raretask.toy.spec.TrainSettings` shared by a group led by ``cell``."""
    from raretask.toy.spec import TrainSettings

    return TrainSettings(
        steps=cell.steps, batch_size=cell.batch_size, lr=cell.lr,
        eval_steps=eval_steps(cell.steps, cell.eval_points),
        trace_every=cell.trace_every, basis=cell.basis, device=device,
        retraction=resolve_retraction(cell.retraction, device),
        tf32=cell.tf32 and device.startswith("cuda"), cuda_graph=cell.cuda_graph, fuse=cell.fuse,
        share_inputs=cell.share_inputs and device.startswith("cuda"),  # CPU: exact per instance
        group_streams=cell.group_streams and device.startswith("cuda"),
        pad_width=cell.pad_width,
    )


class ToyGridRun(GridRun):
    """A toy grid in one directory: groups of cells trained in one optimizer step each."""

    CHECKPOINT_FILES = ("checkpoint.safetensors",)

    def _plan(self) -> list[Group]:
        return plan_groups(self.cells, self.grid.group_size)

    def _merge(self) -> None:
        """One metrics table and one summary for the whole grid, next to the per-group files."""
        self._merge_tables(load_summary(self.out))

    def _instances(self, group: Group):
        return build_instances([self.cells[i] for i in group.cell_ids])

    def _run_group(self, group: Group, device: str, progress) -> None:
        import torch
        from safetensors.torch import load_file

        from raretask.toy.trainer import ToyTrainer

        settings = build_settings(self.cells[group.cell_ids[0]], device)
        trainer = ToyTrainer(self._instances(group), settings)
        gdir = self._group_dir(group)
        ckpt = gdir / "checkpoint.safetensors"
        if ckpt.exists():
            try:  # safetensors: tensors only, nothing in the file is executed
                trainer.load_state_dict(load_file(str(ckpt), device="cpu"))
            except UserError:
                raise
            except Exception as err:  # a file damaged outside raretask (our writes are atomic)
                raise UserError(f"{ckpt}: unreadable checkpoint ({type(err).__name__}); delete "
                                f"it to restart group {group.name} from step 0") from None
            self._log(f"{group.name}: resumed from step {trainer.step}")
        started = time.perf_counter()
        last_save = started
        start_step = trainer.step

        def on_eval(step: int) -> None:
            nonlocal last_save
            now = time.perf_counter()
            if now - last_save >= self.checkpoint_seconds and step < settings.steps:
                store.write_safetensors(ckpt, trainer.state_dict())
                last_save = now
            if progress:
                progress({"event": "step", "group": group.name, "step": step,
                          "steps": settings.steps, "cells": len(group.cell_ids)})

        trainer.run(callback=on_eval)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        diverged = {group.cell_ids[j]: s for j, s in trainer.diverged().items()}
        for cell, step in sorted(diverged.items()):
            self._log(f"{group.name}: cell {cell} diverged at step {step} (NaN/Inf or exploding "
                      "loss); its rows report the reset model, marked diverged_step")
        self._write_group(group, trainer, diverged)
        ckpt.unlink(missing_ok=True)
        rate = (settings.steps - start_step) / max(seconds, 1e-9)
        self._log(f"{group.name}: {len(group.cell_ids)} cells, steps {start_step}->"
                  f"{settings.steps} in {seconds:.1f}s ({rate:.0f} steps/s)")

    def _write_group(self, group: Group, trainer, diverged: dict[int, int]) -> None:
        gdir = self._group_dir(group)
        ids = group.cell_ids
        rows = [{"cell": ids[r["instance"]], "step": r["step"], "task": r["task"],
                 "metric": r["metric"], "value": r["value"]} for r in trainer.metrics()]
        store.write_parquet(gdir / "metrics.parquet", rows)
        traces = trainer.traces()
        if traces.size:
            steps = trainer.trace_steps()
            trows = [{"cell": ids[j], "step": int(s), "rare_signal": float(traces[t, j])}
                     for j in range(len(ids)) for t, s in enumerate(steps)]
            store.write_parquet(gdir / "traces.parquet", trows)
        store.write_json(gdir / "summary.json", self._summaries(group, rows, diverged))

    def _summaries(self, group: Group, rows: list[dict],
                   diverged: dict[int, int] | None = None) -> list[dict]:
        """Final per-cell, per-task rows, compared with Theorem 3 (diverged cells: module doc)."""
        diverged = diverged or {}
        last: dict[tuple[int, int, str], float] = {}
        final_step: dict[int, int] = {}
        for r in rows:
            final_step[r["cell"]] = max(final_step.get(r["cell"], 0), r["step"])
        for r in rows:
            if r["step"] == final_step[r["cell"]]:
                last[(r["cell"], r["task"], r["metric"])] = r["value"]
        out = []
        for i in group.cell_ids:
            c = self.cells[i]
            ts = task_set(c)
            th = Theory(ts, c.frequent_mass)
            kept = th.features_kept(c.width)
            # the model-level loss (sum_k pi_k loss_k, unnormalised) as model_loss: "loss" is
            # the task's normalised loss
            model = {m: last.get((i, -1, m)) for m in
                     ("residual_F", "grad_norm_frequent", "grad_norm_rare", "grad_cosine")}
            model["model_loss"] = last.get((i, -1, "loss"))
            div = diverged.get(i)
            if div is not None:  # summary.json stays strict JSON: no NaN from the frozen model
                model = {m: (v if v is not None and np.isfinite(v) else None)
                         for m, v in model.items()}
            for k in range(c.tasks):
                signal = last[(i, k, "signal_norm")] if div is None else 0.0
                learned = bool(signal >= c.learned_threshold)
                predicted = bool(kept[k] >= 1)
                out.append({
                    "cell": i, "group": group.name, "tasks": c.tasks,
                    "features_per_task": c.features, "frequent_mass": c.frequent_mass,
                    "width": c.width, "beta": c.beta,
                    "alpha": c.alpha, "seed": c.seed, "schedule": c.schedule, "gap": c.gap,
                    "task": k + 1, "frequency": float(ts.frequencies[k]),
                    "signal": float(signal),
                    "loss": float(last[(i, k, "loss_norm")]) if div is None else 1.0,
                    "features": float(last[(i, k, "features")]) if div is None else 0.0,
                    "predicted_features": int(kept[k]),
                    "learned": learned, "predicted_learned": predicted,
                    "agree": learned == predicted, "rare": k == c.rare_index,
                    "step": final_step[i], **model, "diverged_step": div,
                })
        return out
