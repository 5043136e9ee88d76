"""What a study plug-in provides to the run lifecycle, ``show``, the report and ``calibrate``.

A study is the science of one experiment kind: its cell (what one model is trained on, with
no execution settings), how cells pack into groups, ``build(cells, profile) -> trainer``, the
rows it reports with its own verdicts (predicted vs learned), their schema, and the ``show``
table. :mod:`raretask.runs.grid` runs the lifecycle once for every study (lock, resume,
checkpoints, progress, files) through the methods every trainer shares: ``step``,
``settings.steps``, ``run(callback=)``, ``state_dict()``, ``load_state_dict()``. A checkpoint is
the study's :meth:`Study.checkpoint_payload` written as one verified directory
(:mod:`raretask.runs.checkpoint_dir`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from raretask.errors import UserError
from raretask.runs import checkpoint_dir

NUM, OPT_NUM = "number", "number or null"


@dataclass(frozen=True)
class Group:
    """Cells trained together (a toy group shares one optimizer step; an LM group is one run)."""

    name: str
    cell_ids: tuple[int, ...]


@dataclass
class ShowTable:
    """A study's table of rows, formatted once: ``raretask show`` draws it with rich, the
    report as HTML, so the two never drift."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    wrap: tuple[str, ...] = ()
    """Columns of words that may wrap when the table is wider than the console."""


@dataclass
class GroupResult:
    """What a finished group leaves: named long tables (``NAME.parquet``), the summary rows
    (``summary.json``, written last) and lines for the run log."""

    tables: dict[str, list[dict]]
    rows: list[dict]
    log: list[str] = field(default_factory=list)


def eval_steps(steps: int, points: int) -> tuple[int, ...]:
    """About ``points`` log-spaced steps in [1, steps], always including the last."""
    grid = np.unique(np.round(np.geomspace(1, steps, points)).astype(int))
    return tuple(int(s) for s in np.union1d(grid, [steps]))


def _type_ok(v: Any, want: Any) -> bool:
    if want in (NUM, OPT_NUM):
        return (v is None and want == OPT_NUM) or (
            isinstance(v, int | float) and not isinstance(v, bool))
    return type(v) is want


class Study:
    """Base of the study plug-ins; :mod:`raretask.studies` maps each kind to one instance."""

    kind: ClassVar[str]
    label: ClassVar[str]
    """The study's name in messages ("toy", "LM")."""
    row_schema: ClassVar[dict[str, Any]]
    """The fields (and types) of a summary row that show, the report and calibrate read."""
    group_field: ClassVar[str] = "profile.group_size"
    """The profile field that sets how many cells train together (named when they do not fit)."""
    legacy_checkpoint: ClassVar[tuple[str, ...]] = ()
    """The files of a checkpoint written before checkpoints were one directory
    (:mod:`raretask.runs.checkpoint_dir`): :meth:`read_legacy_checkpoint` decides whether they
    are read, and they are removed with the group's checkpoint."""

    # -- the experiment -----------------------------------------------------------------------
    @property
    def grid_class(self) -> type:
        raise NotImplementedError

    def plan(self, cells: list, profile) -> list[Group]:
        """Groups in config order (default: one cell each)."""
        return [Group(f"g{i:04d}", (i,)) for i in range(len(cells))]

    def check(self, cells: list, profile, ranks) -> None:
        """Refuse (UserError) what this grid cannot do on ``ranks`` before anything is written."""

    def parallel_mode(self, parallel: str, world: int, cells: list, device: str) -> str:
        """The torchrun mode for ``--parallel`` (:mod:`raretask.runs.distributed`)."""
        if parallel not in ("auto", "cells"):
            raise UserError(f"--parallel: {parallel!r} trains one model on several processes, "
                            f"which {self.kind} grids do not do: use --parallel cells")
        return "cells"

    # -- training -----------------------------------------------------------------------------
    def build(self, cells: list, profile, ranks):
        """The trainer of one group; ``profile``: a resolved execution profile."""
        raise NotImplementedError

    def stack_key(self, cell) -> Any:
        """Cells with one key (not None) may train as one stacked model
        (:meth:`build_stack`, ``profile.stack_seeds``); default: never."""
        return None

    def build_stack(self, cells: list[list], profile, ranks):
        """One trainer for several single-cell groups (their cells, one list per group) whose
        ``member(k)`` is group k's trainer as :meth:`build` would give it."""
        raise NotImplementedError

    # -- checkpoints: one directory, written as a unit and verified on resume -----------------
    def checkpoint_payload(self, state) -> dict[str, bytes]:
        """The trainer's whole ``state_dict()`` (model, optimizer, step, RNG, data position) as
        named files; called on the writing rank only."""
        raise NotImplementedError

    def restore(self, trainer, files: dict[str, bytes], where: Path) -> None:
        """Load :meth:`checkpoint_payload`'s files (already verified against the manifest) into
        ``trainer``; a payload that does not deserialize is a UserError naming ``where``."""
        raise NotImplementedError

    def read_legacy_checkpoint(self, gdir: Path, trainer) -> None:
        """Resume from :attr:`legacy_checkpoint` files, or refuse them in one line."""
        raise UserError(f"{gdir}: a checkpoint from an older raretask "
                        f"({', '.join(self.legacy_checkpoint)}); delete those files to restart "
                        f"group {gdir.name} from step 0")

    def _has_legacy(self, gdir: Path) -> bool:
        return bool(self.legacy_checkpoint) and all(
            (gdir / n).is_file() for n in self.legacy_checkpoint)

    def has_checkpoint(self, gdir: Path) -> bool:
        return checkpoint_dir.location(gdir) is not None or self._has_legacy(gdir)

    def save_checkpoint(self, gdir: Path, trainer, writes: bool) -> None:
        state = trainer.state_dict()  # every rank: a collective under FSDP2
        if writes:
            checkpoint_dir.save(gdir, self.checkpoint_payload(state))
            for name in self.legacy_checkpoint:  # superseded by the directory just committed
                if (gdir / name).is_file():
                    (gdir / name).unlink()

    def load_checkpoint(self, gdir: Path, trainer) -> None:
        files = checkpoint_dir.read(gdir)
        if files is None:
            self.read_legacy_checkpoint(gdir, trainer)
        else:
            self.restore(trainer, files, checkpoint_dir.location(gdir))

    def remove_checkpoint(self, gdir: Path) -> int:
        """Delete the group's checkpoint (once its summary is written); returns how many
        entries went."""
        n = checkpoint_dir.remove(gdir) if gdir.is_dir() else 0
        for name in self.legacy_checkpoint:
            if (gdir / name).is_file():
                (gdir / name).unlink()
                n += 1
        return n

    def final_tensors(self, cells: list, trainer) -> dict[str, dict]:
        """Tensors a finished group keeps beside its tables: file name -> tensors (called on
        every rank, written by the writing one)."""
        return {}

    def results(self, group: Group, cells: list, trainer, seconds: float,
                start_step: int) -> GroupResult:
        raise NotImplementedError

    # -- rows ---------------------------------------------------------------------------------
    def check_rows(self, rows: list[dict], source: Path | str) -> None:
        """Every row has the schema's fields with the right types; else one line naming the
        file, row and field."""
        for i, r in enumerate(rows):
            for key, want in self.row_schema.items():
                if key not in r or not _type_ok(r[key], want):
                    name = want if isinstance(want, str) else want.__name__
                    got = f"got {r[key]!r}" if key in r else "missing"
                    raise UserError(f"{source}: row {i}: {key}: expected {name}, {got}")

    def sort_key(self, row: dict) -> tuple:
        return (row["cell"],)

    def table(self, rows: list[dict], title: str, all_rows: bool = False,
              cells: dict[int, dict] | None = None) -> ShowTable:
        """``raretask show``'s table; ``cells`` (``cells.json`` by cell id), where there is
        one, lets it name the fields that set rows apart."""
        raise NotImplementedError

    def report_sections(self, runs: list) -> list:
        """The report's sections for this study's runs (:mod:`raretask.report.build`)."""
        return []

    def fix_outputs(self, out: Path):
        """(table, {file name: JSON object}) that `raretask fix` prints and writes for a
        finished grid of this study holding the fix's arms."""
        raise UserError(f"{out}: raretask fix has no arms for {self.kind} grids")

    # -- calibration (`raretask calibrate`, `predict --calibration`, `plan`) ------------------
    curve_keys: ClassVar[tuple[str, ...]]
    """Rows that agree on these and differ only in size, seed and frequency form one curve."""

    def cell_size(self, row: dict) -> float:
        """The model size the law is fitted in (LM: non-embedding parameters; toy: width)."""
        raise NotImplementedError

    def resolve_size(self, text: str) -> float:
        """``--size`` as this study's size: a number, or a name the study knows."""
        raise NotImplementedError

    def learned_row(self, row: dict, learned_accuracy: float) -> bool:
        raise NotImplementedError

    def theory_verdicts(self, rows: list[dict], size: float):
        """(share the curve's rarest task needs at ``size``, the theory's verdict per row), or
        None for a study without a closed-form theory."""
        return None

    def observations(self, rows: list[dict], run_dir: Path, learned_accuracy: float) -> list:
        """The rows as :class:`raretask.mixing.learnability.Obs` for the law's fit."""
        raise NotImplementedError

    def calibration_units(self, learned_accuracy: float) -> tuple[dict, str]:
        """(the units of a calibration of this study, what "learned" means there)."""
        raise NotImplementedError

    def theory_check(self, laws: list, rows: list[dict], excluded: list[str]):
        """(one comparison with the closed-form theory per law, warnings); nothing without a
        theory."""
        return [], []
