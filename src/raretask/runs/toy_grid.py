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
"""

from __future__ import annotations

import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from raretask import __version__
from raretask.config import ToyCell, ToyGrid
from raretask.errors import UserError
from raretask.runs import store
from raretask.theory import TaskSet, Theory

SHAPE_FIELDS = ("tasks", "features", "steps", "batch_size", "lr", "eval_points",
                "trace_every", "basis")
"""Cells must agree on these to train in one optimizer step."""


@dataclass(frozen=True)
class Group:
    """Cells trained together."""

    name: str
    cell_ids: tuple[int, ...]


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


def task_set(cell: ToyCell) -> TaskSet:
    return TaskSet.power_law(cell.tasks, cell.features, alpha=cell.alpha, beta=cell.beta)


def code_version() -> str:
    """raretask version plus the git commit when run from a checkout (logged with every run)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        rev = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"raretask {__version__}" + (f" ({rev})" if rev else "")


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: {name!r} requested but CUDA is not available")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"device: expected 'auto', 'cpu' or 'cuda[:i]', got {name!r}")
    return name


class ToyGridRun:
    """One grid in one directory.

    Parameters
    ----------
    grid:
        The validated experiment.
    out:
        Run directory (created).
    checkpoint_seconds:
        Save the running group's trainer state at most this often (wall clock).
    """

    def __init__(self, grid: ToyGrid, out: Path, checkpoint_seconds: float = 60.0):
        self.grid = grid
        self.out = Path(out)
        self.checkpoint_seconds = float(checkpoint_seconds)
        self.cells = list(grid.cells())
        self.groups = plan_groups(self.cells, grid.group_size)

    # -- bookkeeping ----------------------------------------------------------------------------
    def _group_dir(self, group: Group) -> Path:
        return self.out / "groups" / group.name

    def is_done(self, group: Group) -> bool:
        return (self._group_dir(group) / "summary.json").exists()

    def _log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.out / "log.txt", "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} {message}\n")

    def _check_or_write_config(self) -> None:
        resolved = self.grid.resolved()
        path = self.out / "config.yaml"
        if path.exists():
            old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for key in sorted(set(old) | set(resolved)):
                if old.get(key) != resolved.get(key) and key != "device":
                    raise UserError(
                        f"{path}: this directory holds another experiment ({key}: "
                        f"{old.get(key)!r} there, {resolved.get(key)!r} now); use a new --out")
        store.write_text(path, yaml.safe_dump(resolved, sort_keys=False))
        cell_table = [
            {"cell": i, "group": g.name, **self.cells[i].model_dump()}
            for g in self.groups for i in g.cell_ids
        ]
        store.write_json(self.out / "cells.json", sorted(cell_table, key=lambda r: r["cell"]))

    # -- running --------------------------------------------------------------------------------
    def run(self, progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Train every unfinished group; ``progress`` gets dicts of counters as work advances."""
        device = resolve_device(self.grid.device)
        with store.run_lock(self.out):
            self._check_or_write_config()
            todo = [g for g in self.groups if not self.is_done(g)]
            done_cells = sum(len(g.cell_ids) for g in self.groups if self.is_done(g))
            self._log(f"start: {code_version()}, python {platform.python_version()}, device "
                      f"{device}, {len(self.cells)} cells in {len(self.groups)} groups, "
                      f"{len(todo)} groups to run")
            if progress:
                progress({"event": "start", "cells_total": len(self.cells),
                          "cells_done": done_cells, "groups_todo": len(todo)})
            for group in todo:
                self._run_group(group, device, progress)
                done_cells += len(group.cell_ids)
                if progress:
                    progress({"event": "group_done", "group": group.name,
                              "cells_done": done_cells, "cells_total": len(self.cells)})
            self._merge()
            self._log("grid complete")

    def _merge(self) -> None:
        """One metrics table and one summary for the whole grid, next to the per-group files."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = [pq.read_table(p) for p in sorted(self.out.glob("groups/g*/metrics.parquet"))]
        if parts:
            store.write_parquet(self.out / "metrics.parquet", pa.concat_tables(parts))
        store.write_json(self.out / "summary.json", load_summary(self.out))

    def _instances(self, group: Group):
        from raretask.toy.spec import Schedule, ToyInstance

        out = []
        for i in group.cell_ids:
            c = self.cells[i]
            ts = task_set(c)
            th = Theory(ts, c.frequent_mass)
            frequent = np.zeros(c.tasks, dtype=bool)
            frequent[th.frequent_tasks()] = True
            out.append(ToyInstance(
                width=c.width, frequencies=ts.frequencies, eigenvalues=np.stack(ts.spectra),
                seed=c.seed, rare_task=c.rare_index, frequent=frequent,
                schedule=Schedule(kind=c.schedule, gap=c.gap, count=c.count),
            ))
        return out

    def _run_group(self, group: Group, device: str, progress) -> None:
        import torch
        from safetensors.torch import load_file

        from raretask.toy.spec import TrainSettings
        from raretask.toy.trainer import ToyTrainer

        first = self.cells[group.cell_ids[0]]
        settings = TrainSettings(
            steps=first.steps, batch_size=first.batch_size, lr=first.lr,
            eval_steps=eval_steps(first.steps, first.eval_points),
            trace_every=first.trace_every, basis=first.basis, device=device,
        )
        trainer = ToyTrainer(self._instances(group), settings)
        gdir = self._group_dir(group)
        ckpt = gdir / "checkpoint.safetensors"
        if ckpt.exists():
            trainer.load_state_dict(load_file(str(ckpt), device="cpu"))
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
        self._write_group(group, trainer)
        ckpt.unlink(missing_ok=True)
        rate = (settings.steps - start_step) / max(seconds, 1e-9)
        self._log(f"{group.name}: {len(group.cell_ids)} cells, steps {start_step}->"
                  f"{settings.steps} in {seconds:.1f}s ({rate:.0f} steps/s)")

    def _write_group(self, group: Group, trainer) -> None:
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
        store.write_json(gdir / "summary.json", self._summaries(group, rows))

    def _summaries(self, group: Group, rows: list[dict]) -> list[dict]:
        """Final per-cell, per-task rows, compared with Theorem 3."""
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
            model = {m: last.get((i, -1, m)) for m in
                     ("residual_F", "grad_norm_frequent", "grad_norm_rare", "grad_cosine", "loss")}
            for k in range(c.tasks):
                signal = last[(i, k, "signal_norm")]
                learned = bool(signal >= c.learned_threshold)
                predicted = bool(kept[k] >= 1)
                out.append({
                    "cell": i, "group": group.name, "tasks": c.tasks,
                    "features_per_task": c.features, "frequent_mass": c.frequent_mass,
                    "width": c.width, "beta": c.beta,
                    "alpha": c.alpha, "seed": c.seed, "schedule": c.schedule, "gap": c.gap,
                    "task": k + 1, "frequency": float(ts.frequencies[k]),
                    "signal": float(signal), "loss": float(last[(i, k, "loss_norm")]),
                    "features": float(last[(i, k, "features")]),
                    "predicted_features": int(kept[k]),
                    "learned": learned, "predicted_learned": predicted,
                    "agree": learned == predicted, "rare": k == c.rare_index,
                    "step": final_step[i], **model,
                })
        return out


def load_summary(out: Path) -> list[dict]:
    """All finished rows of a run directory, by cell then task."""
    out = Path(out)
    if not (out / "config.yaml").exists():
        raise UserError(f"{out}: not a raretask run directory (no config.yaml)")
    rows: list[dict] = []
    for path in sorted((out / "groups").glob("g*/summary.json")):
        rows.extend(store.read_json(path))
    rows.sort(key=lambda r: (r["cell"], r["task"]))
    return rows
