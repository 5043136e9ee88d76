"""What a study plug-in provides to the run lifecycle, ``show``, the report and ``calibrate``.

A study is the science of one experiment kind: its cell (what one model is trained on, with
no execution settings), how cells pack into groups, ``build(cells, profile) -> trainer``, the
rows it reports with its own verdicts (predicted vs learned), their schema, and the ``show``
table. :mod:`raretask.runs.grid` runs the lifecycle once for every study (lock, resume,
checkpoints, progress, files) through the methods every trainer shares: ``step``,
``settings.steps``, ``run(callback=)``, ``state_dict()``, ``load_state_dict()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from raretask.errors import UserError

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
    checkpoint_files: ClassVar[tuple[str, ...]]
    """A group's files that exist only while it runs (removed once its summary is written)."""

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

    def has_checkpoint(self, gdir: Path) -> bool:
        return all((gdir / n).exists() for n in self.checkpoint_files)

    def save_checkpoint(self, gdir: Path, trainer, writes: bool) -> None:
        raise NotImplementedError

    def load_checkpoint(self, gdir: Path, trainer) -> None:
        raise NotImplementedError

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

    def table(self, rows: list[dict], title: str, all_rows: bool = False) -> ShowTable:
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
