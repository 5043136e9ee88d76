"""One word for what a language-model cell's final test accuracy means (`show`, the report).

A T_CMP model that knows only the format (answer TOK1 or TOK2) scores ``chance_format`` ~0.505
(lm/trainer.py ``chance_levels``); below that it has not even learned the format, and calling
such a cell "not learned" would hide that. The verdicts, in the order they are tried:

* ``diverged``: training stopped at a NaN/exploded loss (``diverged_step`` set);
* ``-``: no task, or no accuracy recorded;
* ``format not learned`` (T_CMP only): test accuracy < ``chance_format`` (~0.505). T_ADD's
  format-only accuracy is the random symbol's 0.01, where 5K test instances cannot tell a model
  below chance from one at it (0.006 is 30 right answers against 50), so T_ADD never gets it;
* ``learned``: test accuracy >= :func:`learned_threshold`, halfway from ``chance_format`` to 1
  (T_CMP ~0.753, T_ADD 0.505; our choice, the paper states none);
* ``not learned``: in between (the format, not the structure).

Example::

    >>> lm_verdict({"task": "cmp", "test_accuracy": 0.41, "chance_format": 0.5053})
    'format not learned'
    >>> lm_verdict({"task": "cmp", "test_accuracy": 0.93, "chance_format": 0.5053})
    'learned'
"""

from __future__ import annotations

import math

LEARNED_FRACTION = 0.5
"""A run learned its task at test accuracy >= chance_format + this x (1 - chance_format)."""
FORMAT_NOT_LEARNED = "format not learned"


def chance_format(row: dict) -> float:
    """The row's format-only accuracy (``chance_format``), or the task's usual value when the
    row lacks it (T_CMP 0.505, T_ADD 0.01)."""
    c = row.get("chance_format")
    if c is None:
        return 0.01 if row.get("task") == "add" else 0.505
    return float(c)


def learned_threshold(row: dict) -> float:
    """Test accuracy at which the row counts as having learned its task."""
    c = chance_format(row)
    return c + LEARNED_FRACTION * (1.0 - c)


def lm_verdict(row: dict) -> str:
    """The verdict of one summary row (module docstring)."""
    if row.get("diverged_step") is not None:
        return "diverged"
    acc = row.get("test_accuracy")
    if row.get("task", "none") == "none" or acc is None or not math.isfinite(acc):
        return "-"
    if row.get("task") == "cmp" and acc < chance_format(row):
        return FORMAT_NOT_LEARNED
    return "learned" if acc >= learned_threshold(row) else "not learned"


def seed_learned(row: dict) -> bool:
    """True when :func:`lm_verdict` says ``learned``."""
    return lm_verdict(row) == "learned"


__all__ = ["FORMAT_NOT_LEARNED", "LEARNED_FRACTION", "chance_format", "learned_threshold",
           "lm_verdict", "seed_learned"]
