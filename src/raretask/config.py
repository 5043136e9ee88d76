"""Typed configuration: pydantic models with unknown keys rejected, YAML/CSV in.

Every user-facing schema derives from :class:`StrictModel` (``extra="forbid"``): a misspelt key
is an error naming it, never a silently dropped setting (the olmix bug we must not repeat).
Validation failures become a one-line :class:`~raretask.errors.UserError` naming the file and
the field path (``tasks.3.frequency``) or the CSV line.
"""

from __future__ import annotations

import csv
import importlib
import itertools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raretask.errors import UserError
from raretask.theory import DEFAULT_FREQUENT_MASS, TaskSet


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line naming the first offending field: ``source: tasks.2.alpha: <reason>``."""
    errors = err.errors()
    # a misspelt key usually also makes a required one "missing": name the misspelling first
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")  # our validators' messages name the field
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and first["type"] not in ("missing",):
        got = first["input"]
        if not isinstance(got, dict | list):
            msg = f"{msg}, got {got!r}"
    more = len(errors) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {loc + ': ' if loc else ''}{msg}{tail}"


def validate(model: type[BaseModel], data: Any, source: str) -> Any:
    """``model.model_validate(data)`` with errors turned into a one-line UserError."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source)) from None


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file safely (``yaml.safe_load``: no object construction)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a file") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        reason = getattr(err, "problem", None) or "invalid YAML"
        raise UserError(f"{path}{where}: {reason}") from None


# -- task files --------------------------------------------------------------------------------

PositiveFinite = Field(gt=0, allow_inf_nan=False)


class TaskSpec(StrictModel):
    """One task: a frequency (or a count) and a spectrum (alpha + features, or eigenvalues)."""

    name: str = Field(min_length=1, description="Task name, unique in the file.")
    frequency: float | None = Field(None, ge=0, allow_inf_nan=False,
                                    description="Share of the data (normalised over tasks).")
    count: float | None = Field(None, ge=0, allow_inf_nan=False,
                                description="Number of examples; an alternative to frequency.")
    alpha: float | None = Field(None, ge=0, allow_inf_nan=False,
                                description="Spectrum exponent: lambda_j = j**-alpha.")
    features: int | None = Field(None, ge=1, le=1_000_000,
                                 description="Feature count for an alpha spectrum.")
    eigenvalues: list[float] | None = Field(None, min_length=1, max_length=1_000_000,
                                            description="Explicit spectrum (any order, >= 0).")

    @model_validator(mode="after")
    def _one_of_each(self) -> TaskSpec:
        if (self.frequency is None) == (self.count is None):
            raise ValueError("give exactly one of 'frequency' or 'count'")
        if self.eigenvalues is not None:
            if self.alpha is not None or self.features is not None:
                raise ValueError("give either 'eigenvalues' or 'alpha' with 'features', not both")
            if any(not math.isfinite(v) or v < 0 for v in self.eigenvalues):
                raise ValueError("eigenvalues must be finite numbers >= 0")
        elif self.alpha is None or self.features is None:
            raise ValueError("give 'alpha' and 'features', or 'eigenvalues'")
        return self

    @property
    def weight(self) -> float:
        return float(self.frequency if self.frequency is not None else self.count)

    def spectrum(self) -> list[float]:
        if self.eigenvalues is not None:
            return list(self.eigenvalues)
        return [j ** -float(self.alpha) for j in range(1, int(self.features) + 1)]


class TaskFile(StrictModel):
    """A YAML task file: ``tasks:`` list plus an optional ``frequent_mass``."""

    tasks: list[TaskSpec] = Field(min_length=1)
    frequent_mass: float = Field(DEFAULT_FREQUENT_MASS, gt=0, le=1)

    @model_validator(mode="after")
    def _unique_names(self) -> TaskFile:
        seen: set[str] = set()
        for t in self.tasks:
            if t.name in seen:
                raise ValueError(f"task name {t.name!r} appears twice")
            seen.add(t.name)
        return self

    def task_set(self) -> TaskSet:
        return TaskSet.from_specs(
            [t.name for t in self.tasks], [t.weight for t in self.tasks],
            [t.spectrum() for t in self.tasks],
        )


CSV_COLUMNS = ("name", "frequency", "count", "alpha", "features", "eigenvalues")


def _read_task_csv(path: Path) -> TaskFile:
    """CSV with a header of CSV_COLUMNS (any subset, any order); eigenvalues space-separated."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start})") from None
    rows = list(csv.reader(text.splitlines()))
    rows = [(i + 1, r) for i, r in enumerate(rows) if r and any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"{path}: empty file, expected a header and task rows")
    header_line, header = rows[0]
    header = [h.strip() for h in header]
    for h in header:
        if h not in CSV_COLUMNS:
            raise UserError(f"{path} line {header_line}: unknown column {h!r} "
                            f"(expected some of {', '.join(CSV_COLUMNS)})")
    if len(set(header)) != len(header):
        raise UserError(f"{path} line {header_line}: a column appears twice")
    tasks = []
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise UserError(f"{path} line {line}: expected {len(header)} fields, got {len(row)}")
        raw: dict[str, Any] = {}
        for col, cell in zip(header, row, strict=True):
            cell = cell.strip()
            if cell == "":
                continue
            if col == "eigenvalues":
                raw[col] = cell.replace(";", " ").split()
            else:
                raw[col] = cell
        try:
            tasks.append(TaskSpec.model_validate(raw))
        except ValidationError as err:
            raise UserError(format_validation_error(err, f"{path} line {line}")) from None
    if not tasks:
        raise UserError(f"{path}: no task rows after the header")
    return validate(TaskFile, {"tasks": [t.model_dump() for t in tasks]}, str(path))


def load_task_file(path: str | Path) -> TaskFile:
    """Read tasks from a ``.yaml``/``.yml`` or ``.csv`` file; errors name the field or line."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_task_csv(path)
    if suffix in (".yaml", ".yml"):
        data = load_yaml(path)
        if data is None:
            raise UserError(f"{path}: empty file, expected a 'tasks:' list")
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping with a 'tasks:' list at the top")
        return validate(TaskFile, data, str(path))
    raise UserError(f"{path}: unknown task file type {suffix!r} (use .yaml, .yml or .csv)")


# -- toy experiments -----------------------------------------------------------------------------

ScheduleKind = Literal["iid", "matched", "every"]


class ToyCell(StrictModel):
    """One model of the solvable toy: every field a scalar. A grid is a product of these.

    Defaults follow the paper where it is known (K = 32, alpha = 2, Adam, 100K steps); where it
    is silent the choice is ours and stated in the field's description.
    """

    tasks: int = Field(32, ge=2, le=4096, description="K, number of tasks (paper: 32).")
    features: int = Field(32, ge=1, le=4096, description="M, features per task (ours: 32).")
    alpha: float = Field(2.0, ge=0, le=16, allow_inf_nan=False,
                         description="Spectrum decay lambda_j = j^-alpha (paper: 2).")
    beta: float = Field(1.5, ge=0, le=16, allow_inf_nan=False,
                        description="Frequency decay pi_k ∝ k^-beta (paper: 1, 1.5, 2).")
    width: int = Field(64, ge=1, description="N, encoder columns (shared neurons).")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of init and data.")
    steps: int = Field(100_000, ge=1, le=10**9, description="Adam steps (paper: 100K).")
    batch_size: int = Field(512, ge=1, le=1 << 20, description="Samples per step (ours: 512).")
    lr: float = Field(1e-3, gt=0, le=10, allow_inf_nan=False,
                      description="Adam learning rate (ours: 1e-3).")
    schedule: ScheduleKind = Field(
        "iid", description="How the rare task arrives: 'iid' sampling at its prior; 'matched': "
        "withheld for `gap` steps then m = gap*batch*pi_r samples in one batch (Fig. 4); "
        "'every': `count` samples every `gap` steps.")
    gap: int = Field(0, ge=0, le=10**9, description="Injection gap G in steps.")
    count: int = Field(0, ge=0, le=10**9, description="Rare samples per injection ('every').")
    rare_task: int = Field(-1, description="Index of the rare task (negative counts from the "
                           "end; default the rarest).")
    frequent_mass: float = Field(0.8, gt=0, le=1, description="Prior mass of the frequent set F.")
    learned_threshold: float = Field(
        0.3, gt=0, lt=1, description="A task is learned when its normalised signal s~ reaches "
        "this (ours: 0.3; one feature of an alpha=2 task holds ~0.6 of its variance).")
    eval_points: int = Field(30, ge=2, le=1000, description="Log-spaced metric evaluations.")
    trace_every: int = Field(0, ge=0, description="Record the rare task's signal every this "
                             "many steps (0: off; 1: every step, for injection traces).")
    basis: Literal["random", "identity"] = Field(
        "random", description="Feature blocks: a random orthogonal basis (ours) or the "
        "standard basis.")
    retraction: Literal["auto", "qr", "cholesky_qr", "series_qr", "polar",
                        "polar_tf32", "polar_once"] = Field(
        "auto", description="Re-orthonormalisation after each step; the first three give the Q "
        "of the QR, 'polar' the nearest orthonormal matrix (same span), 'polar_tf32' the same "
        "with its last Gram under TF32 (orthonormal to ~3e-5), 'polar_once' one third-order "
        "pass of it (orthonormal to O(|E|^4), re-corrected each step) "
        "(auto: Householder 'qr' on CPU, GEMM-only 'polar_once' on CUDA).")
    tf32: bool = Field(True, description="CUDA: TF32 tensor cores for the training matmuls "
                       "(metrics and the retraction's final Gram stay float32/float64).")
    cuda_graph: bool = Field(True, description="CUDA: replay each step as a CUDA graph.")
    fuse: bool = Field(True, description="CUDA: the training step's masked residual as one "
                       "kernel compiled by torch.compile.")
    share_inputs: bool = Field(True, description="CUDA: multiply each seed's shared inputs "
                               "once by all its instances' encoders side by side instead of "
                               "copying the inputs per instance.")
    group_streams: bool = Field(True, description="CUDA: each width group's gradient and "
                                "retraction on its own stream, so the groups' small kernels "
                                "run side by side (same numbers).")
    pad_width: int = Field(128, ge=0, description=(
        "CUDA with a GEMM retraction (series_qr, polar, polar_tf32, polar_once): widths up "
        "to this train "
        "as one group, padded with inert zero columns to the widest of them (fewer kernels); "
        "0 = one group per width."))

    @model_validator(mode="after")
    def _consistent(self) -> ToyCell:
        d = self.tasks * self.features
        if self.width > d:
            raise ValueError(f"width: {self.width} exceeds the total feature count "
                             f"tasks*features = {d}")
        if not -self.tasks <= self.rare_task < self.tasks:
            raise ValueError(f"rare_task: must be in [-{self.tasks}, {self.tasks})")
        if self.schedule != "iid" and self.gap < 1:
            raise ValueError(f"gap: schedule '{self.schedule}' needs gap >= 1")
        if self.schedule == "every" and self.count < 1:
            raise ValueError("count: schedule 'every' needs count >= 1")
        return self

    @property
    def rare_index(self) -> int:
        return self.rare_task % self.tasks


GridValue = Any


class Grid(StrictModel):
    """An experiment: the fields of a cell model where any field may be a list (a grid axis).

    ``cells()`` expands the Cartesian product in field order (last field fastest), each cell
    validated as a ``cell_model`` (so errors name the field). Subclasses fix ``kind`` and
    ``cell_model``.
    """

    cell_model: ClassVar[type[StrictModel]]

    kind: str
    name: str = Field("experiment", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Experiment name (letters, digits, '_', '.', '-').")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu' or 'cuda[:i]'.")
    axes: dict[str, list[GridValue]] = Field(default_factory=dict, exclude=True)
    fixed: dict[str, GridValue] = Field(default_factory=dict, exclude=True)

    @classmethod
    def from_dict(cls, data: Any, source: str) -> Grid:
        """Split plain YAML data into experiment settings, fixed values and list axes."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a mapping of config keys at the top")
        own = [k for k in cls.model_fields if k not in ("axes", "fixed")]
        top = {k: data[k] for k in own if k in data}
        grid = validate(cls, top, source)
        fields = cls.cell_model.model_fields
        for key, value in data.items():
            if key in top:
                continue
            if key not in fields:
                raise UserError(f"{source}: {key}: unknown key")
            if isinstance(value, list):
                if not value:
                    raise UserError(f"{source}: {key}: list is empty (an axis needs values)")
                grid.axes[key] = value
            else:
                grid.fixed[key] = value
        list(grid.cells(source))  # validate every cell now: fail before any work
        return grid

    def cells(self, source: str = "config") -> Iterator[Any]:
        names = list(self.axes)
        for combo in itertools.product(*(self.axes[n] for n in names)):
            values = {**self.fixed, **dict(zip(names, combo, strict=True))}
            yield validate(self.cell_model, values, source)

    def resolved(self) -> dict[str, Any]:
        """The full config with defaults filled and values validated: what a run records."""
        cells = [c.model_dump() for c in self.cells()]
        body: dict[str, Any] = dict(cells[0])
        for key in self.axes:  # each axis as its validated values, in config order
            body[key] = list(dict.fromkeys(c[key] for c in cells))
        top = self.model_dump(exclude={"axes", "fixed"})
        return {**top, **body}


class ToyGrid(Grid):
    """A toy experiment: :class:`ToyCell` fields, any of them a list."""

    cell_model: ClassVar[type[StrictModel]] = ToyCell

    kind: Literal["toy"] = "toy"
    name: str = Field("toy", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Experiment name (letters, digits, '_', '.', '-').")
    group_size: int = Field(64, ge=1, le=100_000,
                            description="Most models trained together in one optimizer step.")


EXPERIMENT_KINDS: dict[str, str] = {"toy": "raretask.config:ToyGrid",
                                    "lm": "raretask.lm.config:LMGrid"}
"""Experiment kinds and their grid classes (imported on use: the toy never imports LM code)."""


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (``width=[8,16]``, ``lr=1e-2``)."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise UserError(f"--set {key}: cannot read value {raw!r}") from None
    return key, value


def load_mapping(path: str | Path | None, overrides: Sequence[str] = (),
                 base: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """(data, source): a config YAML (or ``base``) as a dict with ``--set`` overrides applied,
    and the name errors should give it. Not validated: the caller's model does that."""
    if path is not None:
        data = load_yaml(path)
        source = str(path)
        if data is None:
            data = {}
    else:
        data, source = dict(base or {}), "config"
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of config keys at the top")
    data = dict(data)
    for text in overrides:
        key, value = parse_override(text)
        data[key] = value
    return data, source


def load_experiment(path: str | Path | None, overrides: Sequence[str] = (),
                    base: dict[str, Any] | None = None) -> Grid:
    """Read an experiment YAML (or start from ``base``), apply ``--set`` overrides, validate."""
    data, source = load_mapping(path, overrides, base)
    kind = data.get("kind", "toy")
    if kind == "fix_toy":
        raise UserError(f"{source}: kind: 'fix_toy' is a fix config: run it with "
                        f"raretask fix {source} --out DIR")
    if kind not in EXPERIMENT_KINDS:
        raise UserError(f"{source}: kind: unknown experiment kind {kind!r} "
                        f"(known: {', '.join(EXPERIMENT_KINDS)})")
    module, _, cls_name = EXPERIMENT_KINDS[kind].partition(":")
    grid_cls = getattr(importlib.import_module(module), cls_name)
    return grid_cls.from_dict(data, source)
