"""A run directory's identity and the hashes of its results: ``DIR/manifest.json``.

``config.yaml`` and ``cells.json`` are for people to read; what a run directory *is* lives
here, so that a missing or edited ``config.yaml`` is detected, never taken as a new experiment::

    {"format": "raretask-run", "version": 1,
     "experiment": {...},          the resolved config (defaults filled), as config.yaml shows it
     "axes": ["width", "seed"],    the list axes, in the order that numbers the cells
     "cells": 6, "cells_sha256": "...",   how many cells, and the hash of their settings in order
     "groups": {"g0000": [0, 1], ...},    the group plan (kept whatever the profile says later)
     "files": {"config.yaml": "<sha256>", "groups/g0000/metrics.parquet": "<sha256>", ...}}

A group's files are hashed when it finishes, before its ``summary.json`` (the done marker) is
written, so every finished group has its hashes here. ``show``, ``report`` and a re-run check
them (:func:`damaged_results`): a file changed outside raretask is named in one line and, on a
re-run, its group is trained again instead of merged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from raretask.errors import UserError
from raretask.runs import store

NAME = "manifest.json"
FORMAT, VERSION = "raretask-run", 1
IDENTITY_KEYS = ("experiment", "axes", "cells", "cells_sha256")


def canonical(obj: Any) -> str:
    """One JSON text per value: sorted keys, no spaces (what the hashes are taken of)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def identity(grid, cells: list) -> dict[str, Any]:
    """What makes ``grid`` this experiment: its resolved config, axis order and cell list."""
    dumped = [c.model_dump() for c in cells]
    return {"experiment": grid.resolved(), "axes": list(grid.axes), "cells": len(cells),
            "cells_sha256": sha256_text(canonical(dumped))}


def read(out: Path) -> dict[str, Any] | None:
    """The manifest of run directory ``out``; None when it has none; one line when damaged."""
    path = Path(out) / NAME
    if not path.exists():
        return None
    try:
        data = store.read_json(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable ({type(err).__name__}); the run directory's identity "
                        "is lost: use a new --out") from None
    if not (isinstance(data, dict) and data.get("format") == FORMAT
            and isinstance(data.get("experiment"), dict) and isinstance(data.get("axes"), list)
            and isinstance(data.get("groups"), dict) and isinstance(data.get("files"), dict)):
        raise UserError(f"{path}: not a raretask run manifest (changed outside raretask); the "
                        "run directory's identity is lost: use a new --out")
    return data


def write(out: Path, manifest: dict[str, Any]) -> None:
    store.write_json(Path(out) / NAME, {"format": FORMAT, "version": VERSION, **{
        k: v for k, v in manifest.items() if k not in ("format", "version")}})


def config_difference(old: dict, new: dict, fields: dict, skip=frozenset()) -> str | None:
    """``"lr: 0.01 there, 0.05 now"`` for the first key where two resolved configs differ, or
    None. A key the old one lacks (a field added since) is no difference at its default."""
    for key in sorted(set(old) | set(new)):
        if key in skip:
            continue
        if key not in old and key in fields and new.get(key) == fields[key].default:
            continue
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} there, {new.get(key)!r} now"
    return None


def cells_difference(old_rows: list[dict], cells: list, fields: dict) -> str | None:
    """The first difference between a recorded cell list (``cells.json`` rows) and ``cells``."""
    if len(old_rows) != len(cells):
        return f"cells: {len(old_rows)} there, {len(cells)} now"
    by_id = {r.get("cell"): r for r in old_rows if isinstance(r, dict)}
    for i, cell in enumerate(cells):
        row = by_id.get(i)
        if row is None:
            return f"cell {i}: missing there"
        new = cell.model_dump()
        diff = config_difference({k: v for k, v in row.items() if k not in ("cell", "group")},
                                 new, fields)
        if diff:
            return f"cell {i}: {diff}"
    return None


def difference(recorded: dict, current: dict, fields: dict, skip=frozenset()) -> str | None:
    """The first way ``current`` (an :func:`identity`) is not the recorded experiment."""
    diff = config_difference(recorded["experiment"], current["experiment"], fields, skip)
    if diff:
        return diff
    if recorded["axes"] != current["axes"]:  # the same values, numbered in another order
        return (f"axes (the order that numbers the cells): {recorded['axes']!r} there, "
                f"{current['axes']!r} now")
    if recorded.get("cells") != current["cells"]:
        return f"cells: {recorded.get('cells')!r} there, {current['cells']!r} now"
    return None


def group_of(rel: str) -> str | None:
    """``groups/g0003/metrics.parquet`` -> ``g0003``; None for a top-level file."""
    parts = rel.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] == "groups" else None


MERGED = ("metrics.parquet", "summary.json")
"""The merged files of a complete grid, hashed after they are written."""


def damaged_results(out: Path, manifest: dict | None) -> list[tuple[str, str]]:
    """(relative path, why) of each recorded result that no longer matches its hash: the files
    of finished groups and the merged tables. Unfinished groups are not checked (they re-run)."""
    if manifest is None:
        return []
    out = Path(out)
    bad = []
    for rel, digest in sorted(manifest["files"].items()):
        group = group_of(rel)
        if group is None and rel not in MERGED:
            continue  # config.yaml, cells.json: the identity's copies, checked by a run
        if group is not None and not (out / "groups" / group / "summary.json").exists():
            continue
        path = out / rel
        if not path.exists():
            if group is not None:  # a merged table that is gone is merged again, not damage
                bad.append((rel, "missing"))
        elif store.file_sha256(path) != digest:
            bad.append((rel, f"does not match the sha256 recorded in {NAME}"))
    return bad


COPIES = ("config.yaml", "cells.json")
"""The identity's readable copies: a run rewrites them from here, a reader checks them."""


def check_copies(out: Path) -> None:
    """Refuse (one line) a ``config.yaml`` or ``cells.json`` that no longer matches its hash, for
    readers that take settings from them (``report``, ``fix``): an edited copy would describe
    results it did not make. A run made before manifests, or a copy that is gone, passes (a
    reader says what is missing)."""
    recorded = read(out)
    if recorded is None:
        return
    for rel in COPIES:
        path, digest = Path(out) / rel, recorded["files"].get(rel)
        if digest and path.exists() and store.file_sha256(path) != digest:
            raise UserError(f"{path}: does not match the sha256 recorded in {NAME} (changed "
                            "outside raretask); re-run the grid to write it again from "
                            f"{NAME}")


def check_results(out: Path) -> dict | None:
    """The manifest of ``out`` (None for a run made before manifests), after checking every
    recorded result (:func:`damaged_results`); the first damaged file is one line naming it."""
    manifest = read(out)
    bad = damaged_results(out, manifest)
    if bad:
        rel, why = bad[0]
        what = ("re-run the grid: its group is trained again" if group_of(rel)
                else "re-run the grid to merge it again")
        raise UserError(f"{Path(out) / rel}: {why} (changed outside raretask); {what}")
    return manifest
