"""Typed configuration: pydantic models with unknown keys rejected, YAML/CSV in.

Every user-facing schema derives from :class:`StrictModel` (``extra="forbid"``): a misspelt key
is an error naming it, never a silently dropped setting (the olmix bug we must not repeat).
Validation failures become a one-line :class:`~raretask.errors.UserError` naming the file and
the field path (``tasks.3.frequency``) or the CSV line.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np
from pydantic import Field, ValidationError, model_validator

from raretask.errors import UserError
from raretask.limits import MAX_CELLS, MAX_TRACE_POINTS, check_grid_size
from raretask.runs.profile import PROFILE_FIELDS, Profile
from raretask.schema import (  # noqa: F401 (re-exported: the long-standing import path)
    StrictModel,
    format_validation_error,
    load_yaml,
    parse_override,
    validate,
)
from raretask.theory import DEFAULT_FREQUENT_MASS, TaskSet

# -- task files --------------------------------------------------------------------------------

PositiveFinite = Field(gt=0, allow_inf_nan=False)

FixArm = Literal["natural", "plan", "even", "burst", "big"]
"""The fix's arms, shared by the toy and LM cells (raretask.mixing.fix, raretask.mixing.fix_lm)."""
FIX_ARMS: tuple[str, ...] = get_args(FixArm)


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

Delivery = Literal["iid", "even", "burst"]


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
    rate: float | None = Field(
        None, gt=0, lt=1, allow_inf_nan=False, description="The rare task's share of the "
        "samples (None: its natural prior, pi_k ∝ k^-beta); the other tasks keep their "
        "proportions.")
    delivery: Delivery = Field(
        "iid", description="How the rare task arrives: 'iid', drawn at its share in every "
        "batch; 'even', withheld from the draws and round(batch_size x rate) samples added to "
        "every batch; 'burst', withheld, then round(every x batch_size x rate) samples at once "
        "every `every` steps (the paper's matched-frequency injection, Fig. 4; every 1 is even).")
    every: int = Field(1, ge=1, le=10**9, description="Steps between bursts, G (delivery "
                       "'burst').")
    start: int = Field(0, ge=0, le=10**9, description="Deliver only after this step (even, "
                       "burst; 0: from the first).")
    stop: int | None = Field(None, ge=1, le=10**9, description="Deliver no more after this step "
                             "(even, burst; None: to the end): what is kept afterwards is "
                             "retention.")
    rare_task: int = Field(-1, description="Index of the rare task (negative counts from the "
                           "end; default the rarest).")
    frequent_mass: float = Field(0.8, gt=0, le=1, description="Prior mass of the frequent set F.")
    arm: FixArm | None = Field(
        None, description="An arm of the fix (raretask fix; None: an ordinary cell): "
        "'natural' the mix as it is; 'plan' the planned mix (minimum KL, the rare task at "
        "`margin` x the share Theorem 3 needs at `width`), i.i.d.; 'even' the plan's share in "
        "every batch; 'burst' withheld, then `gap` steps' worth at once; 'big' the natural mix "
        "on the width it would need (`big_width`, default from the plan).")
    margin: float = Field(1.5, ge=1, le=100, allow_inf_nan=False,
                          description="Fix arms: the plan's safety factor on the share.")
    big_width: int | None = Field(None, ge=1, description="Fix arm 'big': its width (default: "
                                  "the width the natural mix needs, from the plan).")
    learned_threshold: float = Field(
        0.3, gt=0, lt=1, description="A task is learned when its normalised signal s~ reaches "
        "this (ours: 0.3; one feature of an alpha=2 task holds ~0.6 of its variance).")
    eval_points: int = Field(30, ge=2, le=1000, description="Log-spaced metric evaluations.")
    trace_every: int = Field(0, ge=0, description="Record the rare task's signal every this "
                             "many steps (0: off; 1: every step, for injection traces).")
    basis: Literal["random", "identity"] = Field(
        "random", description="Feature blocks: a random orthogonal basis (ours) or the "
        "standard basis.")
    @model_validator(mode="after")
    def _consistent(self) -> ToyCell:
        d = self.tasks * self.features
        if self.width > d:
            raise ValueError(f"width: {self.width} exceeds the total feature count "
                             f"tasks*features = {d}")
        if not -self.tasks <= self.rare_task < self.tasks:
            raise ValueError(f"rare_task: must be in [-{self.tasks}, {self.tasks})")
        if self.delivery != "burst" and self.every > 1 and self.arm is None:
            raise ValueError(f"every: only a burst delivery has a period (delivery "
                             f"{self.delivery!r})")
        if self.delivery == "iid" and (self.start or self.stop is not None):
            raise ValueError("stop: start and stop need a delivery that injects the rare task "
                             "(even or burst)")
        if self.stop is not None and self.stop <= self.start:
            raise ValueError(f"stop: {self.stop} is not after start {self.start}")
        if self.arm is not None:
            if self.delivery != "iid" or self.rate is not None or self.stop is not None \
                    or self.start:
                raise ValueError("delivery: a fix arm sets the rare task's share and delivery; "
                                 "leave rate, delivery, start and stop at their defaults")
            if self.every < 2:
                raise ValueError("every: a fix arm needs every >= 2 (the burst arm's G, and "
                                 "the window its results average over)")
            if self.trace_every < 1:
                raise ValueError("trace_every: a fix arm needs the rare task's trace (>= 1)")
        if self.big_width is not None and self.big_width > d:
            raise ValueError(f"big_width: {self.big_width} exceeds the total feature count "
                             f"tasks*features = {d}")
        points = self.steps // self.trace_every + 1 if self.trace_every else 0
        if points > MAX_TRACE_POINTS:
            raise ValueError(f"trace_every: steps {self.steps:,} / trace_every "
                             f"{self.trace_every:,} = {points:,} trace points per cell, more "
                             f"than the limit of {MAX_TRACE_POINTS:,}")
        return self

    def memory_parts(self) -> dict[str, int]:
        """Bytes one model of this cell holds while it trains (raretask.toy.trainer's buffers),
        by the field that sets each part; :func:`raretask.limits.check_group_memory` adds a
        group's cells. Float32 training, float64 metrics; an upper bound where the fix's plan
        decides (a fix arm's width and share)."""
        d, k, b = self.tasks * self.features, self.tasks, self.batch_size
        f32, f64, chunk = 4, 8, 8  # chunk: TrainSettings.rng_chunk, steps of samples drawn at once
        width = d if self.arm == "big" else max(self.width, self.big_width or 0)
        if self.arm is not None:
            share = 1.0  # the plan's share: at most all of it
        elif self.rate is not None:
            share = self.rate
        else:
            prior = np.arange(1, k + 1, dtype=float) ** -self.beta
            share = float(prior[self.rare_index] / prior.sum())
        burst = self.delivery == "burst" or self.arm is not None
        period = self.every if burst else 1
        injects = self.delivery != "iid" or self.arm is not None
        last = min(self.steps, self.stop or self.steps)
        injected = round(period * b * share) if injects and period <= last else 0
        return {
            # samples drawn `chunk` steps ahead (uniforms, inputs, task coefficients), and the
            # float64 measurement batch
            "batch_size": b * (chunk * (f64 + (d + k) * f32) + d * (2 * f64 + 3 * f32)),
            # the feature basis (d x d when random) and the encoder with Adam's moments and grad
            "features": d * d * f32 if self.basis == "random" else d * f32,
            "width": 4 * 2 * d * width * f32,
            # one injection's samples and their products
            "every" if burst else "rate": injected * d * 3 * f32,
            # the trace buffer and its rows
            "trace_every": (self.steps // self.trace_every + 1) * (f64 + 200)
            if self.trace_every else 0,
        }

    @property
    def rare_index(self) -> int:
        return self.rare_task % self.tasks

    def delivery_schedule(self):
        """The trainer's :class:`~raretask.toy.spec.Schedule` of the rare task: even and burst
        are its matched injection every 1 and every ``every`` steps."""
        from raretask.toy.spec import Schedule

        if self.delivery == "iid":
            return Schedule()
        return Schedule(kind="matched", gap=self.every if self.delivery == "burst" else 1,
                        start=self.start, stop=self.stop)

    @property
    def delivery_label(self) -> tuple[str, int]:
        """(delivery, period) as the summary rows name it: ('iid', 0), ('even', 1) or
        ('burst', every)."""
        return self.delivery, {"iid": 0, "even": 1, "burst": self.every}[self.delivery]


GridValue = Any

MOVED_KEYS: dict[str, str] = {
    k: f"an execution setting, not part of the experiment: set profile.{k} (under 'profile:', "
       f"with --set profile.{k}=VALUE or in a --profile FILE)" for k in PROFILE_FIELDS}
"""Keys an experiment config no longer takes, with the hint its error gives."""


class Grid(StrictModel):
    """An experiment: the fields of a cell model where any field may be a list (a grid axis).

    ``cells()`` expands the Cartesian product in field order (last field fastest), each cell
    validated as a ``cell_model`` (so errors name the field). Subclasses fix ``kind`` and
    ``cell_model``.

    ``variants:`` (a list of mappings) makes the experiment a union of such products: each
    variant's fields over the top-level ones give one sub-grid, and the cells are variant 0's,
    then variant 1's, ... (one recipe per task, say: T_CMP's budget beside T_ADD's, in one run
    directory); a setting two variants make is one cell, where it first appears. ``--set KEY=V``
    sets KEY in the variants that give it too.
    """

    cell_model: ClassVar[type[StrictModel]]
    moved_keys: ClassVar[dict[str, str]] = {}
    """This study's renamed fields: old key -> the hint naming the new one."""

    kind: str
    name: str = Field("experiment", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Experiment name (letters, digits, '_', '.', '-').")
    profile: Profile = Field(default_factory=Profile, exclude=True, description="How to "
                             "execute (raretask.runs.profile): never an axis, never compared "
                             "on resume.")
    axes: dict[str, list[GridValue]] = Field(default_factory=dict, exclude=True)
    fixed: dict[str, GridValue] = Field(default_factory=dict, exclude=True)
    variants: list[Any] = Field(default_factory=list, exclude=True)
    """The sub-grids of a union (``variants:``), each a Grid of this class; empty for one
    product."""

    @classmethod
    def from_dict(cls, data: Any, source: str) -> Grid:
        """Split plain YAML data into experiment settings, fixed values and list axes."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a mapping of config keys at the top")
        data = dict(data)
        if "variants" in data:
            return cls._from_variants(data, data.pop("variants"), source)
        profile = data.pop("profile", None) or {}
        if not isinstance(profile, dict):
            raise UserError(f"{source}: profile: expected a mapping of profile fields")
        profile = dict(profile)
        for key in [k for k in data if isinstance(k, str) and k.startswith("profile.")]:
            profile[key.removeprefix("profile.")] = data.pop(key)  # --set profile.FIELD=VALUE
        own = [k for k in cls.model_fields if k not in ("axes", "fixed", "profile", "variants")]
        top = {k: data[k] for k in own if k in data}
        grid = validate(cls, top, source)
        try:
            grid.profile = Profile.model_validate(profile)
        except ValidationError as err:
            raise UserError(format_validation_error(err, f"{source}: profile")
                            .replace(f"{source}: profile: ", f"{source}: profile.", 1)) from None
        fields = cls.cell_model.model_fields
        for key, value in data.items():
            if key in top:
                continue
            if key not in fields:
                if key in MOVED_KEYS or key in cls.moved_keys:
                    raise UserError(f"{source}: {key}: "
                                    f"{MOVED_KEYS.get(key) or cls.moved_keys[key]}")
                raise UserError(f"{source}: {key}: unknown key")
            if isinstance(value, list):
                if not value:
                    raise UserError(f"{source}: {key}: list is empty (an axis needs values)")
                grid.axes[key] = value
            else:
                grid.fixed[key] = value
        check_grid_size(grid.axes, source)  # from the axes' lengths: no cell is made
        for key, values in grid.axes.items():
            _check_unique(key, values, source)
        cells = list(grid.cells(source))  # validate every cell now: fail before any work
        _check_unique_validated(grid.axes, cells, source)
        return grid

    @classmethod
    def _from_variants(cls, base: dict, variants: Any, source: str) -> Grid:
        """A union of sub-grids: ``base`` with each variant's fields over it."""
        if not isinstance(variants, list) or not variants:
            raise UserError(f"{source}: variants: expected a non-empty list of mappings of "
                            "cell fields (each one sub-grid)")
        fields = cls.cell_model.model_fields
        for key in base:  # an unknown key is named where it is, not in variant 0's merge
            if (isinstance(key, str) and key not in fields and key not in cls.model_fields
                    and not key.startswith("profile")
                    and key not in MOVED_KEYS and key not in cls.moved_keys):
                raise UserError(f"{source}: {key}: unknown key")
        subs = []
        for i, variant in enumerate(variants):
            where = f"{source}: variants[{i}]"
            if not isinstance(variant, dict) or not variant:
                raise UserError(f"{where}: expected a mapping of cell fields")
            for key in variant:  # kind, name, profile and nesting belong at the top (the
                # merge below names any other unknown or renamed key under variants[i])
                if key in cls.model_fields or key == "profile":
                    raise UserError(f"{where}: {key}: set it at the top, for every variant")
            try:
                subs.append(cls.from_dict({**base, **variant}, where))
            except UserError as err:  # a value from the top is named at the top
                rest = str(err).removeprefix(f"{where}: ")
                if rest.split(":", 1)[0].split(".", 1)[0] in variant:
                    raise
                raise UserError(f"{source}: {rest} (with variants[{i}])") from None
        grid = subs[0].model_copy()
        grid.variants, grid.fixed = subs, {}
        grid.axes = {}  # every field that is an axis somewhere, in first-seen order
        for sub in subs:
            for key, values in sub.axes.items():
                grid.axes.setdefault(key, [])
                grid.axes[key] += [v for v in values if v not in grid.axes[key]]
        total = sum(math.prod(len(v) for v in sub.axes.values()) for sub in subs)
        if total > MAX_CELLS:
            raise UserError(f"{source}: variants: {len(subs)} sub-grids make {total:,} cells, "
                            f"more than the limit of {MAX_CELLS:,} cells in one grid")
        return grid

    def cells(self, source: str = "config") -> Iterator[Any]:
        if self.variants:  # a union: a setting two variants make is one cell, the first
            seen: set[str] = set()
            for sub in self.variants:
                for cell in sub.cells(source):
                    key = json.dumps(cell.model_dump(), sort_keys=True, default=repr)
                    if key not in seen:
                        seen.add(key)
                        yield cell
            return
        names = list(self.axes)
        for combo in itertools.product(*(self.axes[n] for n in names)):
            values = {**self.fixed, **dict(zip(names, combo, strict=True))}
            yield validate(self.cell_model, values, source)

    def resolved(self) -> dict[str, Any]:
        """The full config with defaults filled and values validated: what a run records.
        A union records the values all its variants share at the top and the rest (every axis
        among them, in its order) under ``variants``: read again, it numbers the cells alike."""
        if self.variants:
            top = self.model_dump(exclude={"axes", "fixed", "profile", "variants"})
            subs = [{k: v for k, v in sub.resolved().items() if k not in top}
                    for sub in self.variants]
            common = {k: v for k, v in subs[0].items()
                      if all(k in r and r[k] == v and k not in sub.axes
                             for r, sub in zip(subs, self.variants, strict=True))}
            return {**top, **common,
                    "variants": [{k: v for k, v in r.items() if k not in common} for r in subs]}
        cells = [c.model_dump() for c in self.cells()]
        body: dict[str, Any] = dict(cells[0])
        for key in self.axes:  # each axis as its validated values, in config order
            body[key] = list(dict.fromkeys(c[key] for c in cells))
        # the axes in their config order (the order that numbers the cells), so that running
        # the recorded config.yaml again numbers the cells as this grid does
        keys = list(body)
        slots = [i for i, k in enumerate(keys) if k in self.axes]
        for i, name in zip(slots, self.axes, strict=True):
            keys[i] = name
        body = {k: body[k] for k in keys}
        top = self.model_dump(exclude={"axes", "fixed", "profile", "variants"})
        return {**top, **body}


def _axis_key(value: Any) -> str:
    """A value as a grid compares it: 4 and 4.0 are one value, as in the cells they make."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(float(value))
    return json.dumps(value, sort_keys=True, default=repr)


def _check_unique(key: str, values: list, source: str) -> None:
    """An axis lists each value once: a repeated one would make two cells of one setting, which
    a run directory could not tell apart (cells.json and the rows would disagree)."""
    seen: set[str] = set()
    for v in values:
        k = _axis_key(v)
        if k in seen:
            raise UserError(f"{source}: {key}: the value {v!r} appears twice in the axis "
                            "(each value once)")
        seen.add(k)


def _check_unique_validated(axes: dict[str, list], cells: list, source: str) -> None:
    """As :func:`_check_unique`, on the values the cells hold: YAML reads ``1e-1`` as a string
    that a float field makes 0.1, so ``lr: [0.1, 1e-1]`` is one value twice."""
    stride = len(cells)
    for key, values in axes.items():
        stride //= len(values)  # cells are the product in axis order: the last varies fastest
        seen: dict[str, Any] = {}
        for i, raw in enumerate(values):
            k = _axis_key(getattr(cells[i * stride], key))
            if k in seen:
                raise UserError(f"{source}: {key}: the values {seen[k]!r} and {raw!r} are one "
                                f"value ({getattr(cells[i * stride], key)!r}) twice in the axis "
                                "(each value once)")
            seen[k] = raw


class ToyGrid(Grid):
    """A toy experiment: :class:`ToyCell` fields, any of them a list."""

    cell_model: ClassVar[type[StrictModel]] = ToyCell
    moved_keys: ClassVar[dict[str, str]] = {
        "schedule": "renamed: use delivery (iid, even or burst; 'matched' is burst)",
        "gap": "renamed: use every (the steps between bursts)",
        "count": "give the rare task's share instead: rate = count / (every x batch_size), "
                 "with delivery: burst"}

    kind: Literal["toy"] = "toy"
    name: str = Field("toy", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Experiment name (letters, digits, '_', '.', '-').")


def load_mapping(path: str | Path | None, overrides: Sequence[str] = (),
                 base: dict[str, Any] | None = None,
                 allow_empty: bool = True) -> tuple[dict[str, Any], str]:
    """(data, source): a config YAML (or ``base``) as a dict with ``--set`` overrides applied,
    and the name errors should give it. Not validated: the caller's model does that.
    ``allow_empty=False``: an empty file (or ``{}``) is an error."""
    if path is not None:
        data = load_yaml(path)
        source = str(path)
        if data is None:
            data = {}
        if data == {} and not allow_empty:  # a run of nothing but defaults: 100K steps, say
            raise UserError(f"{source}: empty config: give the experiment's fields (see the "
                            "shipped configs/ for examples)")
    else:
        data, source = dict(base or {}), "config"
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of config keys at the top")
    data = dict(data)
    if isinstance(data.get("variants"), list):  # copied: --set below writes into them too
        data["variants"] = [dict(v) if isinstance(v, dict) else v for v in data["variants"]]
    for text in overrides:
        key, value = parse_override(text)
        data[key] = value
        for variant in data.get("variants") or []:
            if isinstance(variant, dict) and key in variant:  # the command line wins
                variant[key] = value
    return data, source


def load_experiment(path: str | Path | None, overrides: Sequence[str] = (),
                    base: dict[str, Any] | None = None,
                    profile_file: str | Path | None = None) -> Grid:
    """Read an experiment YAML (or start from ``base``), apply ``--set`` overrides, validate.

    The execution profile (``grid.profile``) is the YAML's ``profile:`` block, then the fields
    of ``profile_file``, then ``--set profile.FIELD=VALUE`` overrides, each over the last."""
    from raretask.studies import DEFAULT_KIND, study

    data, source = load_mapping(path, overrides, base, allow_empty=False)
    if profile_file is not None:
        extra = load_yaml(profile_file)
        if extra is not None and not isinstance(extra, dict):
            raise UserError(f"{profile_file}: expected a mapping of profile fields")
        block = data.get("profile") or {}
        data["profile"] = {**(block if isinstance(block, dict) else {}), **(extra or {})}

    kind = data.get("kind", DEFAULT_KIND)
    try:
        return study(kind, source).grid_class.from_dict(data, source)
    except UserError as err:
        raise _name_override(err, source, [parse_override(t)[0] for t in overrides]) from None


def cell_selector(specs: Sequence[str], grid: Grid) -> Callable[[Any], bool]:
    """``--only KEY=VALUE`` (repeatable; a list value matches any of its values; several keys
    must all match): a predicate on ``grid``'s cells. A key that is not a cell field, or a
    selection no cell meets, is one line naming the option."""
    wanted: dict[str, set[str]] = {}
    fields = grid.cell_model.model_fields
    for text in specs:
        key, value = parse_override(text)
        if key not in fields:
            raise UserError(f"--only {key}: not a cell field")
        values = value if isinstance(value, list) else [value]
        wanted.setdefault(key, set()).update(_axis_key(v) for v in values)

    def selected(cell: Any) -> bool:
        return all(_axis_key(getattr(cell, k)) in vs for k, vs in wanted.items())

    if wanted and not any(selected(c) for c in grid.cells()):
        raise UserError(f"--only {' '.join(specs)}: no cell of the grid matches")
    return selected


def _name_override(err: UserError, source: str, keys: Sequence[str]) -> UserError:
    """An error about a value given with ``--set`` names ``--set KEY``, not the file, which may
    not hold that key at all (or hold another value)."""
    text, head = str(err), f"{source}: "
    if text.startswith(head):
        rest = text[len(head):]
        for key in keys:
            if rest.startswith(key) and rest[len(key):len(key) + 1] in (":", ".", " "):
                return UserError(f"--set {rest}")
    return err
