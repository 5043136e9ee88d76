"""Typed configuration: pydantic models with unknown keys rejected, YAML/CSV in.

Every user-facing schema derives from :class:`StrictModel` (``extra="forbid"``): a misspelt key
is an error naming it, never a silently dropped setting (the olmix bug we must not repeat).
Validation failures become a one-line :class:`~raretask.errors.UserError` naming the file and
the field path (``tasks.3.frequency``) or the CSV line.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

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
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and first["type"] not in ("missing",):
        got = first["input"]
        if not isinstance(got, dict | list):
            msg = f"{msg}, got {got!r}"
    more = len(errors) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {loc}: {msg}{tail}"


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
