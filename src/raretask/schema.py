"""The base of every config schema: strict pydantic models, one-line errors, safe YAML.

Kept apart from :mod:`raretask.config` so that configs defined elsewhere (the execution profile
in :mod:`raretask.runs.profile`, the LM cell) share it without importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from raretask.errors import UserError


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
