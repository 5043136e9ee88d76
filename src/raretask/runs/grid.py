"""The run lifecycle, once for every study: a grid's groups in one directory, the lock, the
resolved config, the log, resume by group, checkpoints, progress and the merged tables.

A grid's cells are packed into groups by its study (:mod:`raretask.studies`); a group is the
unit of training and of resume and is done when its ``summary.json`` exists (written last,
atomically, after its files' hashes are in the manifest). The group plan is recorded in
``manifest.json`` (and ``cells.json``) on the first run and read back on every later one, so a
killed grid resumes into the same groups whatever the execution profile says now. Before
anything is written, the grid's limits are checked (:mod:`raretask.limits`); under the lock, the
directory's identity (:mod:`raretask.runs.manifest`), then every finished group's files.

Layout of a run directory::

    DIR/manifest.json               what the directory is (the resolved experiment, the axis order,
                                    the cells and their groups) and the sha256 of every result
                                    file (:mod:`raretask.runs.manifest`); a re-run must match it
    DIR/config.yaml                 the resolved experiment (defaults filled), for people to read
    DIR/profile.yaml                the execution profile of the last run (never compared)
    DIR/cells.json                  every cell's settings, by cell id, and its group
    DIR/log.txt                     what happened, with the code version
    DIR/groups/gNNNN/...            the study's per-group files (checkpoints while it runs,
                                    NAME.parquet tables, summary.json last)
    DIR/metrics.parquet, DIR/summary.json     all groups merged, once the grid is complete
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from raretask import __version__
from raretask.config import Grid
from raretask.errors import UserError
from raretask.limits import check_group_memory
from raretask.runs import distributed, manifest, store
from raretask.runs.distributed import Ranks
from raretask.runs.profile import PROFILE_FIELDS, Profile
from raretask.studies import study as study_for
from raretask.studies import study_of_rows
from raretask.studies.base import Group

Progress = Callable[[dict[str, Any]], None]
_MISSING = object()


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
    if not (out / "config.yaml").exists() and not (out / manifest.NAME).exists():
        raise UserError(f"{out}: not a raretask run directory (no config.yaml)")
    manifest.check_results(out)  # a result changed outside raretask is named, never read
    rows: list[dict] = []
    for path in sorted((out / "groups").glob("g*/summary.json")):
        rows.extend(_read_rows(path))
    if not rows and (out / "summary.json").exists():  # an archived run: merged files only
        rows = _read_rows(out / "summary.json")
    if rows:
        rows.sort(key=study_of_rows(rows, str(out)).sort_key)
    return rows


def cell_count(out: Path) -> int | None:
    """How many cells the grid in ``out`` has (its manifest, else ``cells.json``); None when
    neither says."""
    out = Path(out)
    recorded = manifest.read(out)
    if recorded is not None:
        return int(recorded["cells"])
    try:
        return len(store.read_json(out / "cells.json"))
    except (OSError, ValueError, TypeError):
        return None


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
    if rows:  # the fields of the rows' study, with the right types
        study_of_rows(rows, str(path)).check_rows(rows, path)
    return rows


class GridRun:
    """One grid in one directory, whatever its study.

    Parameters
    ----------
    grid:
        The validated experiment.
    out:
        Run directory (created).
    checkpoint_seconds:
        Save the running group's trainer state at most this often (wall clock).
    profile:
        How to execute (:class:`raretask.runs.profile.Profile`; default: the device's defaults).
    """

    def __init__(self, grid: Grid, out: Path, checkpoint_seconds: float = 60.0,
                 profile: Profile | None = None):
        self.grid = grid
        self.study = study_for(grid.kind)
        self.out = Path(out)
        if not (math.isfinite(checkpoint_seconds) and checkpoint_seconds >= 0):
            raise UserError(f"--checkpoint-seconds: expected a finite number of seconds >= 0, "
                            f"got {checkpoint_seconds:g}")
        self.checkpoint_seconds = float(checkpoint_seconds)
        self.profile = profile or grid.profile
        self.cells = list(grid.cells())
        self.groups = self._recorded_plan() or self.study.plan(self.cells, self.profile)
        self.ranks = Ranks()  # this process's part of a torchrun job; set by :meth:`run`

    def _recorded_plan(self) -> list[Group] | None:
        """The groups of an earlier run of this grid (its manifest, else ``cells.json``), so
        that a change of profile (group size, device) never regroups cells that already have
        files. Whether it is this grid at all, :meth:`_check_identity` decides under the lock."""
        try:
            recorded = manifest.read(self.out)
        except UserError:
            recorded = None  # named by _check_identity
        if recorded is not None:
            plan = [Group(name, tuple(ids)) for name, ids in sorted(recorded["groups"].items())]
            if sorted(i for g in plan for i in g.cell_ids) == list(range(len(self.cells))):
                return plan
            return None
        try:
            table = json.loads((self.out / "cells.json").read_text(encoding="utf-8"))
            if len(table) != len(self.cells) or any(
                    r.get(k, _MISSING) != v for r in table
                    for k, v in self.cells[r["cell"]].model_dump().items()):
                return None
            members: dict[str, list[int]] = {}
            for r in sorted(table, key=lambda r: r["cell"]):
                members.setdefault(r["group"], []).append(r["cell"])
            return [Group(name, tuple(ids)) for name, ids in sorted(members.items())]
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            return None  # no earlier run (or not this grid's): plan afresh

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
                swept += self.study.remove_checkpoint(self._group_dir(g))
        if swept:
            self._log(f"removed {swept} file(s) left by an interrupted run")
        self._recheck_results()

    def _recheck_results(self) -> None:
        """Check every finished group's files against the manifest. A group with a file changed
        outside raretask trains again (a warning names the file), and a damaged merged table is
        merged again; a group finished before manifests has its files read once, then hashed.
        """
        files = self.manifest["files"]
        bad: dict[str, tuple[str, str]] = {}
        for rel, why in manifest.damaged_results(self.out, self.manifest):
            group = manifest.group_of(rel)
            if group is None:  # a merged table: made again when the grid completes
                self._log(f"{rel}: {why}; merged again when the grid completes")
                (self.out / rel).unlink(missing_ok=True)
                files.pop(rel)
            else:
                bad.setdefault(group, (rel, why))
        for g in self.groups:
            prefix = f"groups/{g.name}/"
            if not self.is_done(g) or g.name in bad or any(k.startswith(prefix) for k in files):
                continue
            gdir = self._group_dir(g)  # finished before manifests: read once, then hash
            results = [p for p in sorted(gdir.iterdir()) if p.is_file() and p.suffix in (
                ".parquet", ".json", ".safetensors") and not store.is_temp(p.name)
                and p.name not in self.study.legacy_checkpoint]
            try:
                for p in results:
                    if p.suffix == ".parquet":
                        store.read_parquet(p)
                _read_rows(gdir / "summary.json")
            except UserError as err:
                path = getattr(err, "path", gdir / "summary.json")
                bad[g.name] = (str(Path(path).relative_to(self.out)), "unreadable")
                continue
            files.update({str(p.relative_to(self.out)): store.file_sha256(p) for p in results})
        for name, (rel, why) in sorted(bad.items()):
            message = (f"warning: {self.out / rel}: {why} (changed outside raretask); group "
                       f"{name} is trained again")
            self._log(message)
            print(message, file=sys.stderr)
            gdir = self.out / "groups" / name
            (gdir / "summary.json").unlink(missing_ok=True)  # first: the group is not done
            for rel_other in [k for k in files if manifest.group_of(k) == name]:
                (self.out / rel_other).unlink(missing_ok=True)
                files.pop(rel_other)
        manifest.write(self.out, self.manifest)

    def _record_files(self, group: str | None, hashes: dict[str, str]) -> None:
        """Add ``hashes`` (relative path -> sha256) to the manifest, replacing ``group``'s
        earlier entries. Read afresh under a lock: the ranks of a job finish groups at once."""
        lock = (store.file_lock(self.out / ".claims" / "manifest") if self.ranks.world > 1
                else contextlib.nullcontext())
        with lock:
            current = manifest.read(self.out)
            if current is None:  # pragma: no cover - written under the run lock before any group
                raise RuntimeError(f"{self.out}: no {manifest.NAME} while recording files")
            if group is not None:
                current["files"] = {k: v for k, v in current["files"].items()
                                    if manifest.group_of(k) != group}
            current["files"].update(hashes)
            manifest.write(self.out, current)

    def _check_or_write_config(self, resolved_profile) -> None:
        """Refuse a directory that holds another experiment (one line naming the first
        difference), then record this one: ``config.yaml``, ``cells.json`` and, last, the
        manifest that is its identity. Under the lock, before anything else is written."""
        current = manifest.identity(self.grid, self.cells)
        recorded = manifest.read(self.out)
        fields = self.grid.cell_model.model_fields
        if recorded is not None:
            diff = manifest.difference(recorded, current, fields, PROFILE_FIELDS)
            if diff:
                raise UserError(f"{self.out / manifest.NAME}: this directory holds another "
                                f"experiment ({diff}); use a new --out")
            files = dict(recorded["files"])
        else:
            self._check_unrecorded(current["experiment"])
            files = {}
        self._note_profile_change(resolved_profile)
        config_text = yaml.safe_dump(current["experiment"], sort_keys=False)
        cell_table = sorted(({"cell": i, "group": g.name, **self.cells[i].model_dump()}
                             for g in self.groups for i in g.cell_ids), key=lambda r: r["cell"])
        cells_text = json.dumps(cell_table, indent=1) + "\n"
        for name, text in (("config.yaml", config_text), ("cells.json", cells_text)):
            digest = manifest.sha256_text(text)
            path = self.out / name
            if name in files and (not path.exists() or store.file_sha256(path) != digest):
                message = (f"warning: {path} was removed or changed outside raretask; written "
                           f"again from {manifest.NAME} (the experiment matches)")
                self._log(message)
                print(message, file=sys.stderr)
            store.write_text(path, text)
            files[name] = digest
        self.manifest = {**current, "kind": self.grid.kind,
                         "groups": {g.name: list(g.cell_ids) for g in self.groups},
                         "files": files}
        manifest.write(self.out, self.manifest)

    def _check_unrecorded(self, resolved: dict) -> None:
        """A directory without a manifest: empty, a run made before manifests (its
        ``config.yaml`` and ``cells.json`` must match), or results nobody can place (refused).
        """
        path = self.out / "config.yaml"
        if not path.exists():
            results = [p for p in ("cells.json", "summary.json", "metrics.parquet", "groups")
                       if (self.out / p).exists()]
            if results:
                raise UserError(f"{self.out}: holds results ({results[0]}) but no {manifest.NAME}"
                                " or config.yaml to say which experiment they belong to; use a "
                                "new --out")
            return
        try:
            old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, ValueError, yaml.YAMLError, RecursionError) as err:
            raise UserError(f"{path}: unreadable ({type(err).__name__}), and no {manifest.NAME} "
                            "records the experiment; use a new --out") from None
        if not isinstance(old, dict):
            raise UserError(f"{path}: expected a mapping of config fields, and no "
                            f"{manifest.NAME} records the experiment; use a new --out")
        fields = self.grid.cell_model.model_fields
        diff = manifest.config_difference(old, resolved, fields, PROFILE_FIELDS)
        if diff is None and (self.out / "cells.json").exists():
            try:
                rows = store.read_json(self.out / "cells.json")
                diff = manifest.cells_difference(rows, self.cells, fields) if isinstance(
                    rows, list) else "cells.json: not a list of cells"
            except (OSError, ValueError) as err:
                diff = f"cells.json: unreadable ({type(err).__name__})"
        if diff:
            raise UserError(f"{path}: this directory holds another experiment ({diff}); use a "
                            "new --out")

    def _note_profile_change(self, profile) -> None:
        """A run that resumes on another kind of device continues, with a one-line warning:
        CPU and CUDA kernels round differently, so its numbers may differ from either alone."""
        path = self.out / "profile.yaml"
        try:
            old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            before = str(old.get("device", ""))
        except (OSError, yaml.YAMLError, AttributeError):
            return
        kind = "cuda" if profile.device.startswith("cuda") else "cpu"
        started = any(self.is_done(g) or self.study.has_checkpoint(self._group_dir(g))
                      for g in self.groups)
        unfinished = not all(self.is_done(g) for g in self.groups)  # else it resumes nothing
        if before and before.split(":")[0] != kind and started and unfinished:
            message = (f"warning: {self.out} was run on {before} and resumes on "
                       f"{profile.device}; its numbers may differ from a run on either alone")
            self._log(message)
            print(message, file=sys.stderr)

    def _merged(self) -> bool:
        """The grid's merged tables are on disk and recorded. Whether they are unchanged was
        checked at the start (:meth:`_recheck_results` removes a damaged one and its record),
        so a revisit of a finished grid leaves them as they are, hashes included."""
        return all((self.out / n).exists() and n in self.manifest["files"]
                   for n in manifest.MERGED)

    def _merge(self) -> None:
        """One metrics table and one summary for the whole grid, next to the per-group files."""
        import pyarrow as pa

        summary = load_summary(self.out)  # every group's files checked against the manifest
        parts = [store.read_parquet(p) for p in sorted(self.out.glob("groups/g*/metrics.parquet"))]
        hashes = {}
        if parts:
            store.write_parquet(self.out / "metrics.parquet", pa.concat_tables(parts))
            hashes["metrics.parquet"] = store.file_sha256(self.out / "metrics.parquet")
        text = json.dumps(summary, indent=1) + "\n"
        store.write_text(self.out / "summary.json", text)
        hashes["summary.json"] = manifest.sha256_text(text)
        self._record_files(None, hashes)

    # -- the lifecycle of one group -------------------------------------------------------------
    def _stack_size(self) -> int:
        return self.resolved_profile.stack_seeds or 1

    def _siblings(self, group: Group, pool: list[Group]) -> list[Group]:
        """Unfinished single-cell groups of ``pool`` that may train stacked with ``group``
        (the study's :meth:`~raretask.studies.base.Study.stack_key`, and a checkpoint in all
        of them or in none), in ``pool`` order."""
        if self._stack_size() < 2 or len(group.cell_ids) != 1:
            return []
        keys = self._stack_keys
        key = keys[group.cell_ids[0]]
        if key is None:
            return []
        resumes = self.study.has_checkpoint(self._group_dir(group))
        # the keys first: the files are looked at for the few siblings only
        return [g for g in pool if g is not group and len(g.cell_ids) == 1
                and keys[g.cell_ids[0]] == key and not self.is_done(g)
                and self.study.has_checkpoint(self._group_dir(g)) == resumes]

    @functools.cached_property
    def _stack_keys(self) -> list:
        """The study's stack key of every cell, by cell id (computed once a run)."""
        return [self.study.stack_key(c) for c in self.cells]

    def _stacks(self, groups: list[Group]) -> list[list[Group]]:
        """``groups`` in order, each with up to ``profile.stack_seeds - 1`` siblings after it."""
        left, out = list(groups), []
        while left:
            stack = [left.pop(0)]
            for g in self._siblings(stack[0], left)[: self._stack_size() - 1]:
                left.remove(g)
                stack.append(g)
            out.append(stack)
        return out

    def _run_stack(self, groups: list[Group], progress: Progress | None) -> None:
        """Build the groups' trainer (one, or a stack of single-cell groups), resume their
        checkpoints, train with timed checkpoints, then write each group's tables and summary
        rows (summary.json last) and drop its checkpoint."""
        import torch

        study, ranks = self.study, self.ranks
        cells = [[self.cells[i] for i in g.cell_ids] for g in groups]
        if len(groups) == 1:
            trainer = study.build(cells[0], self.resolved_profile, ranks)
            members = [trainer]
        else:
            trainer = study.build_stack(cells, self.resolved_profile, ranks)
            members = [trainer.member(k) for k in range(len(groups))]
        gdirs = [self._group_dir(g) for g in groups]
        for group, gdir, member in zip(groups, gdirs, members, strict=True):
            if study.has_checkpoint(gdir):
                study.load_checkpoint(gdir, member)
                if ranks.writes:
                    self._log(f"{group.name}: resumed from step {member.step}")
        if len(groups) > 1 and not trainer.align():
            if ranks.writes:
                self._log(f"{'+'.join(g.name for g in groups)}: checkpoints at different "
                          "steps; trained one by one")
            del trainer, members
            for group in groups:
                self._run_stack([group], progress)
            return
        names = groups[0].name if len(groups) == 1 else "+".join(g.name for g in groups)
        total = trainer.settings.steps
        started = last_save = time.perf_counter()
        start_step = trainer.step

        def on_eval(step: int) -> None:
            nonlocal last_save
            now = time.perf_counter()
            due = now - last_save >= self.checkpoint_seconds and 0 < step < total
            if ranks.data_parallel:  # rank 0's clock decides: FSDP2 gathers the state collectively
                due = distributed.broadcast(due)
            if due:
                for gdir, member in zip(gdirs, members, strict=True):
                    study.save_checkpoint(gdir, member, ranks.writes)
                last_save = time.perf_counter()
                if ranks.writes:  # the log shows how far a long group has come, how fast, and
                    # what the checkpoint cost (a 60m LM's is ~0.8 GB of weights and moments)
                    self._log(f"{names}: checkpoint at step {step} of {total} "
                              f"({now - started:.0f} s since step {start_step}, written in "
                              f"{last_save - now:.1f} s)")
            if progress:
                progress({"event": "step", "group": names, "step": step, "steps": total,
                          "cells": sum(len(g.cell_ids) for g in groups)})

        trainer.run(callback=on_eval)
        if self.resolved_profile.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        for group, gdir, group_cells, member in zip(groups, gdirs, cells, members, strict=True):
            self._finish(group, gdir, group_cells, member, seconds, start_step)
        if ranks.data_parallel:  # nobody starts the next cell before this one is on disk
            distributed.barrier()

    def _finish(self, group: Group, gdir: Path, cells: list, trainer, seconds: float,
                start_step: int) -> None:
        """Write a trained group's files (its hashes recorded before its summary, the done
        marker) and drop its checkpoint."""
        study = self.study
        keep = study.final_tensors(cells, trainer)
        if not self.ranks.writes:
            return
        written = []
        for name, tensors in keep.items():
            store.write_safetensors(gdir / name, tensors)
            written.append(name)
        result = study.results(group, cells, trainer, seconds, start_step)
        for name, rows in result.tables.items():
            store.write_parquet(gdir / f"{name}.parquet", rows)
            written.append(f"{name}.parquet")
        summary = json.dumps(result.rows, indent=1) + "\n"
        hashes = {f"groups/{group.name}/{n}": store.file_sha256(gdir / n) for n in written}
        hashes[f"groups/{group.name}/summary.json"] = manifest.sha256_text(summary)
        # before the done marker: every finished group has its hashes recorded
        self._record_files(group.name, hashes)
        store.write_text(gdir / "summary.json", summary)
        study.remove_checkpoint(gdir)
        for line in result.log:
            self._log(line)

    # -- running --------------------------------------------------------------------------------
    def run(self, progress: Progress | None = None, parallel: str = "auto",
            only: Callable[[Any], bool] | None = None) -> None:
        """Train every unfinished group; ``progress`` gets dicts of counters as work advances.

        Under ``torchrun``, ``parallel`` (``auto``, ``cells``, ``model``, ``ddp``, ``fsdp``) says
        how the processes share the work (:mod:`raretask.runs.distributed`); one process
        ignores it. ``only`` (a predicate on cells, ``--only``): train just the unfinished
        groups that hold a selected cell; the directory stays the whole grid, merged once a
        later run has finished the rest (a GPU call spends itself on the cells it can finish).
        """
        device = resolve_device(self.profile.device)
        rank, world, local = distributed.env_ranks()
        if parallel not in distributed.PARALLEL_CHOICES:
            raise UserError(f"--parallel: expected one of {', '.join(distributed.PARALLEL_CHOICES)}"
                            f", got {parallel!r}")
        mode = "single" if world == 1 else self.study.parallel_mode(parallel, world, self.cells,
                                                                    device)
        rank_dev = distributed.rank_device(device, world, local, mode)
        self.ranks = Ranks(rank, world, mode, rank_dev)
        self.resolved_profile = self.profile.resolve(rank_dev)
        chosen = [g for g in self.groups
                  if only is None or any(only(self.cells[i]) for i in g.cell_ids)]
        pending = [g for g in chosen if not self.is_done(g)]
        units = self._stacks(pending) if mode in ("single", "cells") else [[g] for g in pending]
        check_group_memory([("+".join(g.name for g in u), [self.cells[i] for g in u
                                                            for i in g.cell_ids]) for u in units],
                           self.resolved_profile.device,
                           shards=world if self.ranks.data_parallel else 1,
                           group_field=self.study.group_field)
        self.study.check(self.cells, self.resolved_profile, self.ranks)
        progress = progress if rank == 0 else None  # one display per job
        with distributed.session(mode, self.ranks.device), contextlib.ExitStack() as held:
            error = None
            if rank == 0:  # one lock per job: rank 0 holds it for everyone until all are done
                try:
                    store.check_run_dir(self.out)  # before the lock: nothing written
                    held.enter_context(store.run_lock(self.out))
                    self._check_or_write_config(self.resolved_profile)
                    self._sweep()
                except UserError as err:
                    error = str(err)
            distributed.raise_together(error)
            names = set(distributed.broadcast([g.name for g in chosen if not self.is_done(g)]))
            todo = [g for g in self.groups if g.name in names]
            if rank == 0:
                left = sum(not self.is_done(g) for g in self.groups) - len(todo)
                self._log(f"start: {code_version()}, python {platform.python_version()}, device "
                          f"{device}, {len(self.cells)} cells in {len(self.groups)} groups, "
                          f"{len(todo)} groups to run"
                          + (f" (--only; {left} other groups unfinished)" if only else "")
                          + (f", {world} processes ({mode})" if world > 1 else ""))
                # after the start line: what the log says began is what profile.yaml records;
                # a visit that trains nothing keeps the profile of the run that did
                if todo or not (self.out / "profile.yaml").exists():
                    store.write_text(self.out / "profile.yaml", yaml.safe_dump(
                        self.resolved_profile.model_dump(), sort_keys=False))
            if progress:
                progress({"event": "start", "cells_total": len(self.cells),
                          "cells_done": self.cells_done(), "groups_todo": len(todo),
                          "steps_todo": sum(self.cells[g.cell_ids[0]].steps for g in todo)})
            if mode == "cells":
                self._run_claimed(todo, progress)
            else:
                for stack in self._stacks(todo) if mode == "single" else [[g] for g in todo]:
                    self._run_stack(stack, progress)
                    for group in stack:
                        self._group_done(group, progress)
            distributed.barrier(poll=lambda: self._group_done(None, progress))
            if rank == 0:
                missing = [g.name for g in todo if not self.is_done(g)]
                if missing:  # a bug, not a user error: every rank offered every group
                    raise RuntimeError(f"groups not finished after all ranks stopped: {missing}")
                left = [g.name for g in self.groups if not self.is_done(g)]
                if left:  # --only: the rest waits for another run, unmerged
                    self._log(f"--only cells done; {len(left)} groups of {len(self.groups)} "
                              "left for a run without --only")
                    return
                if todo or not self._merged():  # nothing trained: the merged tables stand
                    self._merge()
                shutil.rmtree(self.out / ".claims", ignore_errors=True)
                self._log("grid complete")

    def _run_claimed(self, todo: list[Group], progress: Progress | None) -> None:
        """``cells`` mode: this rank's round-robin share first, then whatever nobody holds yet."""
        r, w = self.ranks.rank, self.ranks.world
        order = todo[r::w] + [g for i, g in enumerate(todo) if i % w != r]
        for group in order:
            with contextlib.ExitStack() as claims:
                # re-check under the claim: another rank may have finished it meanwhile
                if not claims.enter_context(self._claim(group)) or self.is_done(group):
                    continue
                stack = [group]  # with profile.stack_seeds: siblings nobody holds yet
                for other in self._siblings(group, order):
                    if len(stack) == self._stack_size():
                        break
                    if claims.enter_context(self._claim(other)) and not self.is_done(other):
                        stack.append(other)
                self._run_stack(stack, progress)
            for done in stack:
                self._group_done(done, progress)

    def _claim(self, group: Group):
        return store.claim(self.out / ".claims" / group.name)

    def cells_done(self) -> int:
        return sum(len(g.cell_ids) for g in self.groups if self.is_done(g))

    def _group_done(self, group: Group | None, progress: Progress | None) -> None:
        if progress:  # counted on disk: in cells mode other ranks finish groups too
            progress({"event": "group_done", "group": group.name if group else None,
                      "cells_done": self.cells_done(), "cells_total": len(self.cells)})
