"""One word for what a language-model cell's final test accuracy means (`show`, the report,
`raretask calibrate` and the LM fix all use the one threshold :data:`LEARNED_ACCURACY`).

A T_CMP model that knows only the format (answer TOK1 or TOK2) scores ``chance_format`` ~0.505
(lm/trainer.py ``chance_levels``); below that it has not even learned the format, and calling
such a cell "not learned" would hide that. The verdicts, in the order they are tried:

* ``diverged``: training stopped at a NaN/exploded loss (``diverged_step`` set);
* ``-``: no task, or no accuracy recorded;
* ``format not learned`` (T_CMP only): test accuracy < ``chance_format`` (~0.505). T_ADD's
  format-only accuracy is the random symbol's 0.01, where 5K test instances cannot tell a model
  below chance from one at it (0.006 is 30 right answers against 50), so T_ADD never gets it;
* ``learned``: test accuracy >= :data:`LEARNED_ACCURACY` (0.9), for both tasks (our choice,
  the paper states none);
* ``not learned``: in between (the format, not the structure).

Example::

    >>> lm_verdict({"task": "cmp", "test_accuracy": 0.41, "chance_format": 0.5053})
    'format not learned'
    >>> lm_verdict({"task": "cmp", "test_accuracy": 0.862, "chance_format": 0.5053})
    'not learned'
    >>> lm_verdict({"task": "cmp", "test_accuracy": 0.93, "chance_format": 0.5053})
    'learned'
    >>> lm_verdict({"task": "add", "test_accuracy": 0.57, "chance_format": 0.01})
    'not learned'
"""

from __future__ import annotations

import math

LEARNED_ACCURACY = 0.9
"""A run learned its task at final test accuracy >= this, T_CMP and T_ADD alike. It is the
verdict of `raretask calibrate` and the LM fix, and the issue's check for T_ADD; the best T_CMP
runs reach 0.95-0.96 and T_ADD 0.93-0.98, so both tasks can reach it. (The rule before it,
halfway from ``chance_format`` to 1, called a half-generalised T_ADD model at 0.51 learned.)"""
FORMAT_NOT_LEARNED = "format not learned"


def chance_format(row: dict) -> float:
    """The row's format-only accuracy (``chance_format``), or the task's usual value when the
    row lacks it (T_CMP 0.505, T_ADD 0.01)."""
    c = row.get("chance_format")
    if c is None:
        return 0.01 if row.get("task") == "add" else 0.505
    return float(c)


def lm_verdict(row: dict) -> str:
    """The verdict of one summary row (module docstring)."""
    if row.get("diverged_step") is not None:
        return "diverged"
    acc = row.get("test_accuracy")
    if row.get("task", "none") == "none" or acc is None or not math.isfinite(acc):
        return "-"
    if row.get("task") == "cmp" and acc < chance_format(row):
        return FORMAT_NOT_LEARNED
    return "learned" if acc >= LEARNED_ACCURACY else "not learned"


def seed_learned(row: dict) -> bool:
    """True when :func:`lm_verdict` says ``learned``."""
    return lm_verdict(row) == "learned"


__all__ = ["FORMAT_NOT_LEARNED", "LEARNED_ACCURACY", "chance_format", "lm_verdict",
           "seed_learned"]
