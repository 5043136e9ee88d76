"""Write a plan's weights for the loaders people use.

Every writer takes the task names and weights (a :class:`~raretask.mixing.plan.Plan`) and, where
the format names data, a path per task (``path_template`` with ``{task}``, default the task name).
Formats:

``weights.json`` / ``weights.yaml``
    ``{"unit", "weights": {task: w}, "natural": {task: p}, "kl"}``.
``interleave.json``
    Arguments for ``datasets.interleave_datasets``: ``{"datasets": [task...], "probabilities":
    [...], "stopping_strategy": "all_exhausted", "seed": 0}``; load one dataset per task in that
    order and pass ``probabilities`` as they are.
``olmo_core.yaml``
    OLMo-core style source mixture: ``source_configs`` of ``source_name``, ``target_ratio``,
    ``max_repetition_ratio`` (the plan's epoch cap, 1.0 when uncapped) and ``paths``, plus
    ``requested_tokens`` when the plan's unit is tokens.
``megatron.txt``
    A Megatron-LM ``--data-path`` value: ``w1 prefix1 w2 prefix2 ...``.
``mosaicml.yaml``
    MosaicML streaming ``streams`` with ``local`` and ``proportion`` per task.

Weights are written with 12 significant digits, so every format reads back to the plan's weights
within 1e-11.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from raretask.errors import UserError
from raretask.runs import store

FORMATS = ("weights.json", "weights.yaml", "interleave.json", "olmo_core.yaml", "megatron.txt",
           "mosaicml.yaml")


def _w(x: float) -> float:
    return float(f"{x:.12g}")


def _paths(plan, template: str) -> dict[str, str]:
    if "{task}" not in template:
        raise UserError(f"--path-template: must contain '{{task}}', got {template!r}")
    return {t.task: template.replace("{task}", t.task) for t in plan.tasks}


def render(plan, fmt: str, path_template: str = "{task}") -> str:
    """The text of one export format."""
    weights = {t.task: _w(t.weight) for t in plan.tasks}
    paths = _paths(plan, path_template)
    if fmt in ("weights.json", "weights.yaml"):
        obj = {"unit": plan.unit, "size": plan.size, "kl": plan.kl, "weights": weights,
               "natural": {t.task: _w(t.natural) for t in plan.tasks}}
        if fmt == "weights.json":
            return json.dumps(obj, indent=2) + "\n"
        return yaml.safe_dump(obj, sort_keys=False)
    if fmt == "interleave.json":
        return json.dumps({"datasets": list(weights), "probabilities": list(weights.values()),
                           "stopping_strategy": "all_exhausted", "seed": 0}, indent=2) + "\n"
    if fmt == "olmo_core.yaml":
        sources = [{"source_name": t.task, "target_ratio": weights[t.task],
                    "max_repetition_ratio": float(plan.max_epochs or 1.0),
                    "paths": [paths[t.task]]} for t in plan.tasks]
        mix: dict = {"source_configs": sources, "seed": 0}
        if plan.unit == "tokens" and plan.budget is not None:
            mix["requested_tokens"] = int(plan.budget)
        return yaml.safe_dump({"source_mixture": mix}, sort_keys=False)
    if fmt == "megatron.txt":
        return " ".join(f"{weights[t.task]:.12g} {paths[t.task]}" for t in plan.tasks) + "\n"
    if fmt == "mosaicml.yaml":
        streams = {t.task: {"local": paths[t.task], "proportion": weights[t.task]}
                   for t in plan.tasks}
        return yaml.safe_dump({"streams": streams}, sort_keys=False)
    raise UserError(f"export format: unknown {fmt!r} (known: {', '.join(FORMATS)})")


def write_all(plan, out: Path, path_template: str = "{task}") -> list[Path]:
    """Render every format first (so a bad template writes nothing), then write them."""
    texts = {fmt: render(plan, fmt, path_template) for fmt in FORMATS}
    written = []
    for fmt, text in texts.items():
        store.write_text(Path(out) / fmt, text)
        written.append(Path(out) / fmt)
    return written
