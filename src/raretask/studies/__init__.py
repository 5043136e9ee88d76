"""The study registry: one plug-in module per experiment kind.

Everything that depends on the kind of an experiment (its grid class, how it trains, its rows,
its table, its report sections) asks this registry; nothing else compares kind strings. A new
study is one module with a ``STUDY`` object (:class:`raretask.studies.base.Study`) and one line
in :data:`STUDIES`. Modules are imported on first use, so the toy never imports LM code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from raretask.errors import UserError

if TYPE_CHECKING:
    from raretask.studies.base import Study

STUDIES: dict[str, str] = {"toy": "raretask.studies.toy", "lm": "raretask.studies.lm"}
"""Experiment kind -> the module holding its ``STUDY``."""

NOT_STUDIES: dict[str, str] = {
    "fix_toy": "'fix_toy' configs are now toy grids: write kind: toy with an 'arm' axis "
               "(configs/fix_toy.yaml) and run it with raretask fix {source} --out DIR"}
"""Kinds that are no longer experiments, with the hint their error gives."""

DEFAULT_KIND = "toy"
"""The kind of a config without ``kind:`` and of summary rows without a ``kind`` field (the toy
study's rows predate the field)."""


def study(kind: str, source: str = "config") -> Study:
    """The plug-in of ``kind``; an unknown kind is a one-line UserError naming ``source``."""
    if isinstance(kind, str) and kind in NOT_STUDIES:
        raise UserError(f"{source}: kind: {NOT_STUDIES[kind].format(source=source)}")
    if not isinstance(kind, str) or kind not in STUDIES:
        raise UserError(f"{source}: kind: unknown experiment kind {kind!r} "
                        f"(known: {', '.join(STUDIES)})")
    return importlib.import_module(STUDIES[kind]).STUDY


def study_of_rows(rows: list[dict], source: str = "rows") -> Study:
    """The plug-in whose rows these are (read from the first row's ``kind``)."""
    return study(rows[0].get("kind", DEFAULT_KIND) if rows else DEFAULT_KIND, source)


def all_studies() -> list[Study]:
    return [study(k) for k in STUDIES]
