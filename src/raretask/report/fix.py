"""The fix table's input: ``fix.json``, one file per fix experiment, read by the report.

The fix flow (:mod:`raretask.mixing`) writes ``fix.json`` into its output directory; ``raretask
report DIR`` shows its rows as the "Fix" table: the natural mixture, the planned mixture and a
bigger model, side by side. The format (unknown keys are errors)::

    {
      "task": "cmp",                       # the rare task the fix is about
      "note": "optional sentence shown under the table",
      "rows": [
        {"label": "natural mix",           # what this row is (free text)
         "size": "tiny",                   # model preset or any size name
         "params": 1.2e6,                  # optional: non-embedding parameters
         "frequency": 2.4e-05,             # LM: instances per training token; toy: share
                                           # of training samples (say which in "note")
         "steps": 2000,                    # optional
         "tokens": 1024000,                # optional: training tokens
         "test_accuracy": 0.02,            # null when not measured
         "task_loss": 4.1,                 # null when not measured
         "test_accuracy_sd": 0.01,         # optional: sd over seeds
         "seeds": 3, "learned_seeds": 0,   # optional: how many seeds, how many learned
         "flops": 2.6e13,                  # optional: training compute (6 N T)
         "val_loss": 4.05,                 # optional (LM): held-out background text loss
         "val_loss_framed": 4.06,          # optional (LM): the same in the row's training format
         "learned": false,                 # optional verdict
         "tasks_learned": ["1", "2"],      # optional: every task this row learns
         "gained": [], "lost": ["9"],      # optional: vs the natural-mix row
         "run": "natural"},                # optional: run directory, relative to fix.json
        ...
      ]
    }

Example
-------
>>> FixResult.model_validate({"task": "cmp", "rows": [{"label": "natural mix", "size": "tiny",
...     "frequency": 1e-5, "test_accuracy": 0.01, "task_loss": 4.2}]}).rows[0].label
'natural mix'
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from raretask.config import StrictModel, validate
from raretask.errors import UserError

FIX_FILE = "fix.json"
"""Name of the fix result file inside a directory given to ``raretask report``."""


class FixRow(StrictModel):
    """One line of the fix table: a model trained on one mixture."""

    label: str = Field(min_length=1, description="What this row is, e.g. 'planned mix'.")
    size: str = Field(min_length=1, description="Model size name (preset).")
    params: float | None = Field(None, gt=0, description="Non-embedding parameters.")
    frequency: float = Field(ge=0, allow_inf_nan=False,
                             description="The task's frequency: instances per training token "
                             "(LM) or share of training samples (toy); `note` says which.")
    steps: int | None = Field(None, ge=0, description="Optimizer steps.")
    tokens: float | None = Field(None, ge=0, description="Training tokens.")
    test_accuracy: float | None = Field(None, ge=0, le=1, description="Held-out accuracy.")
    task_loss: float | None = Field(None, ge=0, allow_inf_nan=False,
                                    description="Loss at the label on the task's instances.")
    val_loss: float | None = Field(None, ge=0, allow_inf_nan=False,
                                   description="LM: held-out background text loss (what the "
                                   "other data may lose).")
    val_loss_framed: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="LM: the same text scored in the rows' "
        "training format (val_loss_framed: the row's share of rows opens with a held-out "
        "instance), so a change is not the format's.")
    test_accuracy_sd: float | None = Field(None, ge=0, allow_inf_nan=False,
                                           description="Sample sd of the accuracy over seeds.")
    seeds: int | None = Field(None, ge=1, description="How many seeds the row's means are over.")
    learned_seeds: int | None = Field(None, ge=0, description="How many of them learned it.")
    flops: float | None = Field(None, gt=0, allow_inf_nan=False,
                                description="Training compute (6 N T); shown relative to the "
                                "first row.")
    learned: bool | None = Field(None, description="The fix flow's verdict, if it gives one.")
    tasks_learned: list[str] | None = Field(
        None, description="Every task this row's model learns (not only the rare one).")
    gained: list[str] | None = Field(
        None, description="Tasks learned here that the natural-mix row does not learn.")
    lost: list[str] | None = Field(
        None, description="Tasks the natural-mix row learns that this row does not.")
    run: str | None = Field(None, description="Run directory, relative to fix.json.")


class FixResult(StrictModel):
    """The content of ``fix.json``."""

    task: str = Field(min_length=1, description="The rare task.")
    note: str = Field("", description="A sentence shown under the table.")
    rows: list[FixRow] = Field(min_length=1, description="Natural mix, plan, bigger model, ...")


def load_fix(path: Path) -> FixResult:
    """Read and validate a ``fix.json``; a malformed file is a UserError naming it and the field."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} line {err.lineno}: invalid JSON ({err.msg})") from None
    return validate(FixResult, data, str(path))
