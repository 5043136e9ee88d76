"""The base of every config schema: strict pydantic models, one-line errors, safe YAML.

Kept apart from :mod:`raretask.config` so that configs defined elsewhere (the execution profile
in :mod:`raretask.runs.profile`, the LM cell) share it without importing each other.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from raretask.errors import UserError
from raretask.limits import MAX_CONFIG_BYTES, MAX_YAML_DEPTH


def _numeric(annotation: Any) -> tuple[bool, bool]:
    """(a number field, a list-of-numbers field): int or float in the annotation, never bool."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [_numeric(a) for a in args]
        return any(f[0] for f in found), any(f[1] for f in found)
    if typing.get_origin(annotation) is list and args:
        return False, _numeric(args[0])[0]
    return annotation in (int, float), False


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, values are validated on assignment, and
    a boolean is never a number (pydantic's lax mode would read ``width: true`` as 1).

    Only booleans are refused: a YAML int stays a valid float, and numbers written as strings
    stay readable (YAML 1.1 reads ``1e-3`` as a string; CSV cells are strings)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @model_validator(mode="before")
    @classmethod
    def _no_boolean_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for key, value in data.items():
            field = cls.model_fields.get(key) if isinstance(key, str) else None
            if field is None:
                continue
            number, numbers = _numeric(field.annotation)
            if (number and isinstance(value, bool)) or (
                    numbers and isinstance(value, list) and any(isinstance(v, bool)
                                                                for v in value)):
                want = "an integer" if field.annotation is int else "a number"
                raise ValueError(f"{key}: expected {want}, got a boolean ({value!r})")
        return data


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


def _height(node: Any, heights: dict[int, int], where: str, source: str) -> int:
    """Levels of mappings and lists in ``node`` (0 for a scalar), memoised by object: a YAML
    alias is walked once however often it is used. Iterative; a list that holds itself (an
    alias inside its own anchor) is one line."""
    stack, on_path = [(node, False)], set()
    while stack:
        item, done = stack.pop()
        if not isinstance(item, dict | list) or (id(item) in heights and not done):
            continue
        kids = [*item.keys(), *item.values()] if isinstance(item, dict) else item
        if done:
            on_path.discard(id(item))
            heights[id(item)] = 1 + max((heights.get(id(k), 0) for k in kids), default=0)
            if heights[id(item)] > MAX_YAML_DEPTH:
                raise UserError(f"{source}: {where}nested deeper than the limit of "
                                f"{MAX_YAML_DEPTH} levels of mappings and lists")
            continue
        if id(item) in on_path:
            raise UserError(f"{source}: {where}refers to itself (an alias inside its own "
                            "anchor)")
        on_path.add(id(item))
        stack.append((item, True))
        stack.extend((k, False) for k in kids)
    return heights.get(id(node), 0)


def check_depth(data: Any, source: str) -> Any:
    """``data`` unless it nests deeper than :data:`~raretask.limits.MAX_YAML_DEPTH` or refers
    to itself (one line naming the top-level key)."""
    heights: dict[int, int] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            if _height(value, heights, f"{key}: ", source) + 1 > MAX_YAML_DEPTH:
                raise UserError(f"{source}: {key}: nested deeper than the limit of "
                                f"{MAX_YAML_DEPTH} levels of mappings and lists")
    else:
        _height(data, heights, "", source)
    return data


def _safe_load(text: str, source: str) -> Any:
    try:
        return check_depth(yaml.safe_load(text), source)
    except RecursionError:  # the loader recurses per level: far deeper than the limit
        raise UserError(f"{source}: nested deeper than the limit of {MAX_YAML_DEPTH} levels of "
                        "mappings and lists") from None


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file safely (``yaml.safe_load``: no object construction), at most
    :data:`~raretask.limits.MAX_CONFIG_BYTES` and :data:`~raretask.limits.MAX_YAML_DEPTH` deep."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES and path.is_file():
            raise UserError(f"{path}: {size:,} bytes, more than the limit of "
                            f"{MAX_CONFIG_BYTES:,} bytes for a config file")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a file") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        return _safe_load(text, str(path))
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
        value = _safe_load(raw, f"--set {key}") if raw.strip() else ""
    except yaml.YAMLError:
        raise UserError(f"--set {key}: cannot read value {raw!r}") from None
    return key, value
