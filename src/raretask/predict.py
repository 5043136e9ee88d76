"""`raretask predict`: which tasks a width-N model learns, and what each one would need.

A thin layer over :mod:`raretask.theory` that gathers one row per task into an inspectable
report with a stable JSON form (the CLI's ``--json``).

Example
-------
>>> from raretask.theory import TaskSet
>>> report = predict(TaskSet.power_law(32, 32, alpha=2, beta=1.5), width=64)
>>> report.frequent_tasks, report.rows[-1].first_feature_width, report.rows[-1].learned
(6, 70, False)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from raretask.errors import UserError
from raretask.limits import MAX_PREDICT_WORK
from raretask.theory import DEFAULT_FREQUENT_MASS, TaskSet, Theory


@dataclass(frozen=True)
class TaskPrediction:
    """Theory's verdict on one task at one width."""

    task: str | int
    frequency: float
    features_kept: int
    normalized_loss: float
    first_feature_width: int
    critical_width: int
    required_frequency: float
    learned: bool


@dataclass(frozen=True)
class Prediction:
    """All tasks at one width, in input order."""

    width: int
    frequent_tasks: int
    rows: tuple[TaskPrediction, ...]

    def to_json(self) -> dict:
        """The documented JSON object: ``{"width", "frequent_tasks", "tasks": [...]}``."""
        return {"width": self.width, "frequent_tasks": self.frequent_tasks,
                "tasks": [asdict(r) for r in self.rows]}


def predict(
    tasks: TaskSet,
    width: int,
    frequent_mass: float = DEFAULT_FREQUENT_MASS,
    index_names: bool = False,
) -> Prediction:
    """Theorem 3 / Prop. 6 verdicts and required frequencies for every task at ``width``.

    Parameters
    ----------
    tasks:
        The task set (priors and spectra).
    width:
        Model width N (number of shared neurons), 1 <= N <= total features.
    frequent_mass:
        Prior mass defining the frequent set F.
    index_names:
        Report tasks by their 1-based index (ints) rather than by name: generated task sets.

    Raises :class:`~raretask.errors.UserError` when tasks x total features exceeds
    :data:`raretask.limits.MAX_PREDICT_WORK`.
    """
    work = tasks.size * tasks.total_features
    if work > MAX_PREDICT_WORK:  # each task's required frequency re-ranks every feature
        raise UserError(f"tasks x features: {tasks.size:,} tasks x {tasks.total_features:,} "
                        f"features in all = {work:,}, more than the limit of "
                        f"{MAX_PREDICT_WORK:,} (about 10 s); predict fewer tasks or features")
    th = Theory(tasks, frequent_mass)
    kept = th.features_kept(width)
    loss = th.normalized_loss(width)
    first = th.first_feature_width()
    crit = th.critical_width()
    rows = tuple(
        TaskPrediction(
            task=k + 1 if index_names else tasks.names[k],
            frequency=float(tasks.frequencies[k]),
            features_kept=int(kept[k]),
            normalized_loss=float(loss[k]),
            first_feature_width=int(first[k]),
            critical_width=int(crit[k]),
            required_frequency=th.required_frequency(k, width),
            learned=bool(kept[k] >= 1),
        )
        for k in range(tasks.size)
    )
    return Prediction(width=int(width), frequent_tasks=int(th.frequent_tasks().size), rows=rows)
