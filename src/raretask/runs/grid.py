"""What every experiment grid shares on disk: groups of cells, the lock, the resolved config, the
log, resume by group, and the merged tables.

A grid's cells are packed into groups (the unit of training and of resume); a group is done when
its ``summary.json`` exists (written last, atomically). Subclasses say how to plan groups, train
one group (:meth:`GridRun._run_group`) and summarise it. Group membership is a pure function of the
config, so a killed grid resumes into the same groups.
"""

from __future__ import annotations

import contextlib
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from raretask import __version__
from raretask.config import Grid
from raretask.errors import UserError
from raretask.runs import distributed, store
from raretask.runs.distributed import Ranks

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Group:
    """Cells trained together (a toy group shares one optimizer step; an LM group is one run)."""

    name: str
    cell_ids: tuple[int, ...]


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
    """'auto' -> 'cuda' when present, else 'cpu'; refuses CUDA that is not there."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: {name!r} requested but CUDA is not available")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"device: expected 'auto', 'cpu' or 'cuda[:i]', got {name!r}")
    return name


def load_summary(out: Path) -> list[dict]:
    """All finished rows of a run directory (any kind), by cell then task."""
    out = Path(out)
    if not (out / "config.yaml").exists():
        raise UserError(f"{out}: not a raretask run directory (no config.yaml)")
    rows: list[dict] = []
    for path in sorted((out / "groups").glob("g*/summary.json")):
        rows.extend(_read_rows(path))
    if not rows and (out / "summary.json").exists():  # an archived run: merged files only
        rows = _read_rows(out / "summary.json")
    rows.sort(key=lambda r: (r["cell"], r["task"] if type(r.get("task")) is int else 0))
    return rows


_NUM, _OPT_NUM = "number", "number or null"
TOY_ROW = {"cell": int, "task": int, "tasks": int, "features_per_task": int, "width": int,
           "seed": int, "gap": int, "schedule": str, "group": str, "beta": _NUM, "alpha": _NUM,
           "frequent_mass": _NUM, "frequency": _NUM, "signal": _NUM, "loss": _NUM,
           "features": _NUM, "learned": bool, "predicted_learned": bool, "agree": bool,
           "rare": bool, "residual_F": _OPT_NUM, "grad_norm_frequent": _OPT_NUM,
           "grad_norm_rare": _OPT_NUM, "grad_cosine": _OPT_NUM}
LM_ROW = {"cell": int, "kind": str, "size": str, "params": int, "task": str, "schedule": str,
          "seed": int, "steps": int, "frequency": _NUM, "test_accuracy": _OPT_NUM,
          "train_accuracy": _OPT_NUM, "task_loss": _OPT_NUM, "task_test_loss": _OPT_NUM,
          "val_loss": _OPT_NUM, "epochs": _OPT_NUM}
"""The fields (and types) of a summary row that show, the report and calibrate read."""


def _type_ok(v: Any, want: Any) -> bool:
    if want in (_NUM, _OPT_NUM):
        return (v is None and want == _OPT_NUM) or (
            isinstance(v, int | float) and not isinstance(v, bool))
    return type(v) is want


def check_rows(rows: list[dict], source: Path | str) -> None:
    """Every row has the fields of its kind with the right types, and each toy cell one rare
    task; else a one-line UserError naming the file, row and field."""
    rare: dict[int, int] = {}
    for i, r in enumerate(rows):
        schema = LM_ROW if r.get("kind") == "lm" else TOY_ROW
        for key, want in schema.items():
            if key not in r or not _type_ok(r[key], want):
                name = want if isinstance(want, str) else want.__name__
                got = f"got {r[key]!r}" if key in r else "missing"
                raise UserError(f"{source}: row {i}: {key}: expected {name}, {got}")
        if schema is TOY_ROW:
            rare[r["cell"]] = rare.get(r["cell"], 0) + r["rare"]
    bad = [c for c, n in rare.items() if n != 1]
    if bad:
        raise UserError(f"{source}: cell {bad[0]}: expected exactly one row with rare: true")


def _read_rows(path: Path) -> list[dict]:
    """A summary.json's rows; a damaged file (changed outside raretask: our writes are atomic)
    is a one-line UserError naming it."""
    try:
        rows = store.read_json(path)
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"{path}: unreadable ({type(err).__name__}); restore it or delete it "
                        "and re-run the grid") from None
    if not isinstance(rows, list) or not all(
            isinstance(r, dict) and type(r.get("cell")) is int for r in rows):
        raise UserError(f"{path}: expected a list of rows, each with an integer 'cell'")
    check_rows(rows, path)
    return rows


class GridRun:
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

    CHECKPOINT_FILES: tuple[str, ...] = ()
    """A group's files that exist only while it runs (removed once its summary.json is written)."""

    def __init__(self, grid: Grid, out: Path, checkpoint_seconds: float = 60.0):
        self.grid = grid
        self.out = Path(out)
        self.checkpoint_seconds = float(checkpoint_seconds)
        self.cells = list(grid.cells())
        self.groups = self._plan()
        self.ranks = Ranks()  # this process's part of a torchrun job; set by :meth:`run`

    # -- what subclasses provide ----------------------------------------------------------------
    def _plan(self) -> list[Group]:
        """Groups in config order (default: one cell each)."""
        return [Group(f"g{i:04d}", (i,)) for i in range(len(self.cells))]

    def _run_group(self, group: Group, device: str, progress: Progress | None) -> None:
        raise NotImplementedError

    def _merge(self) -> None:
        self._merge_tables(load_summary(self.out))

    # -- bookkeeping ----------------------------------------------------------------------------
    def _group_dir(self, group: Group) -> Path:
        return self.out / "groups" / group.name

    def is_done(self, group: Group) -> bool:
        return (self._group_dir(group) / "summary.json").exists()

    def _log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        who = f" [rank {self.ranks.rank}]" if self.ranks.world > 1 else ""
        # one short append per line: lines from several ranks interleave but stay whole
        try:
            with open(self.out / "log.txt", "a", encoding="utf-8") as fh:
                fh.write(f"{stamp}{who} {message}\n")
        except OSError as err:
            raise store.io_error(self.out / "log.txt", err) from None

    def _sweep(self) -> None:
        """Remove what killed runs left behind: temporary files of interrupted writes, and the
        checkpoints of groups that finished but were killed before deleting them. Under the lock.
        """
        swept = store.remove_stale_temps(self.out)
        for g in self.groups:
            if self.is_done(g):
                for name in self.CHECKPOINT_FILES:
                    path = self._group_dir(g) / name
                    if path.exists():
                        path.unlink()
                        swept += 1
        if swept:
            self._log(f"removed {swept} file(s) left by an interrupted run")

    def _check_or_write_config(self) -> None:
        resolved = self.grid.resolved()
        path = self.out / "config.yaml"
        if path.exists():
            old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            fields = self.grid.cell_model.model_fields
            for key in sorted(set(old) | set(resolved)):
                if key not in old and key in fields and resolved[key] == fields[key].default:
                    continue  # a field added since that run, at its default: the same experiment
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

    def _merge_tables(self, summary: list[dict]) -> None:
        """One metrics table and one summary for the whole grid, next to the per-group files."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = [pq.read_table(p) for p in sorted(self.out.glob("groups/g*/metrics.parquet"))]
        if parts:
            store.write_parquet(self.out / "metrics.parquet", pa.concat_tables(parts))
        store.write_json(self.out / "summary.json", summary)

    # -- running --------------------------------------------------------------------------------
    def _check_parallel(self, ranks: Ranks) -> None:
        """Refuse (UserError) what this grid cannot do in ``ranks.mode``; subclasses add checks."""

    def run(self, progress: Progress | None = None, parallel: str = "auto") -> None:
        """Train every unfinished group; ``progress`` gets dicts of counters as work advances.

        Under ``torchrun``, ``parallel`` (``auto``, ``cells``, ``model``, ``ddp``, ``fsdp``) says
        how the processes share the work (:mod:`raretask.runs.distributed`); one process
        ignores it.
        """
        device = resolve_device(self.grid.device)
        rank, world, local = distributed.env_ranks()
        sizes = {str(getattr(c, "size", "")) for c in self.cells}
        mode = distributed.choose_mode(parallel, world, self.grid.kind, len(self.cells), sizes,
                                       device)
        rank_dev = distributed.rank_device(device, world, local, mode)
        self.ranks = Ranks(rank, world, mode, rank_dev)
        self._check_parallel(self.ranks)
        progress = progress if rank == 0 else None  # one display per job
        with distributed.session(mode, self.ranks.device), contextlib.ExitStack() as held:
            error = None
            if rank == 0:  # one lock per job: rank 0 holds it for everyone until all are done
                try:
                    held.enter_context(store.run_lock(self.out))
                    self._check_or_write_config()
                    self._sweep()
                except UserError as err:
                    error = str(err)
            distributed.raise_together(error)
            names = set(distributed.broadcast([g.name for g in self.groups if not self.is_done(g)]))
            todo = [g for g in self.groups if g.name in names]
            if rank == 0:
                self._log(f"start: {code_version()}, python {platform.python_version()}, device "
                          f"{device}, {len(self.cells)} cells in {len(self.groups)} groups, "
                          f"{len(todo)} groups to run"
                          + (f", {world} processes ({mode})" if world > 1 else ""))
            if progress:
                progress({"event": "start", "cells_total": len(self.cells),
                          "cells_done": self._cells_done(), "groups_todo": len(todo),
                          "steps_todo": sum(getattr(self.cells[g.cell_ids[0]], "steps", 0)
                                            for g in todo)})
            if mode == "cells":
                self._run_claimed(todo, progress)
            else:
                for group in todo:
                    self._run_group(group, self.ranks.device, progress)
                    self._group_done(group, progress)
            distributed.barrier(poll=lambda: self._group_done(None, progress))
            if rank == 0:
                missing = [g.name for g in self.groups if not self.is_done(g)]
                if missing:  # a bug, not a user error: every rank offered every group
                    raise RuntimeError(f"groups not finished after all ranks stopped: {missing}")
                self._merge()
                shutil.rmtree(self.out / ".claims", ignore_errors=True)
                self._log("grid complete")

    def _run_claimed(self, todo: list[Group], progress: Progress | None) -> None:
        """``cells`` mode: this rank's round-robin share first, then whatever nobody holds yet."""
        r, w = self.ranks.rank, self.ranks.world
        order = todo[r::w] + [g for i, g in enumerate(todo) if i % w != r]
        for group in order:
            with store.claim(self.out / ".claims" / group.name) as mine:
                # re-check under the claim: another rank may have finished it meanwhile
                if not mine or self.is_done(group):
                    continue
                self._run_group(group, self.ranks.device, progress)
            self._group_done(group, progress)

    def _cells_done(self) -> int:
        return sum(len(g.cell_ids) for g in self.groups if self.is_done(g))

    def _group_done(self, group: Group | None, progress: Progress | None) -> None:
        if progress:  # counted on disk: in cells mode other ranks finish groups too
            progress({"event": "group_done", "group": group.name if group else None,
                      "cells_done": self._cells_done(), "cells_total": len(self.cells)})


def runner_for(grid: Grid, out: Path, checkpoint_seconds: float = 60.0) -> GridRun:
    """The runner class of the grid's kind."""
    if grid.kind == "lm":
        from raretask.runs.lm_grid import LMGridRun

        return LMGridRun(grid, out, checkpoint_seconds)
    from raretask.runs.toy_grid import ToyGridRun

    return ToyGridRun(grid, out, checkpoint_seconds)
