"""When a language-model cell is evaluated: log-spaced steps, plus dense windows around injections.

Step numbers are the trainer's counter *after* a training step: evaluation "at step s" sees the
model that has taken s optimizer steps (step 0: the initial model). A burst schedule with gap g
(``every``) trains its instances in the steps with 0-based index g-1, 2g-1, ... (lm/tasks.py
``InjectionSchedule``), so the m-th injection (m = 1, 2, ...) lies between evaluation steps
``m g - 1`` (just before it) and ``m g`` (just after it), and the next one arrives after
``(m + 1) g - 1``. A **traced window** m is every evaluation step of that cycle::

    m g - 1  (before),  m g  (after),  m g + stride,  m g + 2 stride, ...,  (m + 1) g - 1  (end)

so the drop at the injection is ``loss(before) - loss(after)`` and what the gap until the next
one undoes is ``loss(end) - loss(after)`` (Fig. 8, retention between bursts:
:mod:`raretask.lm.retention`).
With ``trace_windows`` W > 0 the cell traces W such windows, their injections m spread evenly
over the complete cycles of the run (the first and the last included). A spread schedule
(``every`` 1) has a cycle of one step: its windows are pairs (m - 1, m).

Example::

    >>> from raretask.lm.config import LMCell
    >>> cell = LMCell(task="cmp", rate=8 / 40960, every=10, delivery="burst", steps=100,
    ...               eval_points=4, trace_windows=2, trace_stride=3, probes=False)
    >>> [w.steps for w in traced_windows(cell)]
    [(9, 10, 13, 16, 19), (89, 90, 93, 96, 99)]
    >>> eval_schedule(cell)
    (0, 1, 5, 9, 10, 13, 16, 19, 22, 89, 90, 93, 96, 99, 100)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raretask.lm.config import LMCell
from raretask.studies.base import eval_steps


@dataclass(frozen=True)
class TracedWindow:
    """One injection's cycle, traced densely (module docstring)."""

    injection: int
    """m: the m-th injection of the run (1-based)."""
    before: int
    """Evaluation step just before the injection: m g - 1."""
    after: int
    """Evaluation step just after it: m g."""
    end: int
    """Last step before the next injection: (m + 1) g - 1 (clipped to the run's steps)."""
    steps: tuple[int, ...]
    """Every evaluation step of the window, ascending (before, after, ..., end)."""


def traced_windows(cell: LMCell) -> list[TracedWindow]:
    """The windows ``cell`` traces densely (empty when ``trace_windows`` is 0 or no task).

    The cycle is g = ``cell.every``; windows are the complete cycles m = 1 .. M with
    (m + 1) g - 1 <= steps, ``trace_windows`` of them at m = round(linspace(1, M, W)) (fewer
    when M < W: each complete cycle once). When no cycle is complete, the first injection's
    partial window (to the last step) is traced if it falls inside the run.
    """
    if cell.trace_windows == 0 or cell.task == "none":
        return []
    g, steps, stride = cell.every, cell.steps, cell.trace_stride
    complete = (steps + 1) // g - 1  # M: largest m with (m + 1) g - 1 <= steps
    if complete >= 1:
        picks = np.unique(np.round(np.linspace(1, complete, min(cell.trace_windows, complete))))
    elif g <= steps:
        picks = np.array([1])
    else:
        return []
    windows = []
    for m in (int(x) for x in picks):
        before, after, end = m * g - 1, m * g, min((m + 1) * g - 1, steps)
        inside = range(after, end, stride)
        windows.append(TracedWindow(m, before, after, end,
                                    tuple(sorted({before, *inside, end}))))
    return windows


def eval_schedule(cell: LMCell) -> tuple[int, ...]:
    """Every evaluation step of ``cell``, ascending: 0, the ``eval_points`` log-spaced steps, and
    the steps of its :func:`traced_windows`. With ``trace_windows`` 0 this is exactly the
    schedule the grids have always used, ``(0, *eval_steps(steps, eval_points))``
    (:func:`raretask.studies.base.eval_steps`, the toy's too)."""
    base = (0, *eval_steps(cell.steps, cell.eval_points))
    dense = {s for w in traced_windows(cell) for s in w.steps}
    if not dense:
        return base
    return tuple(sorted(set(base) | dense))


__all__ = ["TracedWindow", "eval_schedule", "traced_windows"]
