"""Write a plan's weights for the loaders people use, in the unit each loader reads.

Every writer takes a :class:`~raretask.mixing.plan.Plan` and, where the format names data, a path
per task (``path_template`` with ``{task}``, default the task name). Loaders differ in what a
share means, so each format gets the plan converted to its unit:

* **tokens**: OLMo-core, Megatron-LM and MosaicML streaming (rows of ``sequence_length`` tokens,
  as llm-foundry's ``--concat_tokens`` writes them) sample token sequences;
* **examples**: ``datasets.interleave_datasets`` draws rows (one example each).

A plan in examples becomes token shares through each task's tokens per example
(``tokens_per_example``: ``q_k t_k / sum_j q_j t_j``, the budget ``B sum_j q_j t_j``), a plan in
tokens becomes example shares the other way (``(q_k / t_k) / sum_j q_j / t_j``). Without the
tokens per example of every task with weight, a format in the other unit is refused
(:class:`Unconvertible`, one line naming the format); :func:`render_all` skips it and says why.
Tasks with weight 0 are left out of the loader formats (Megatron refuses a zero weight, and a
source nobody samples needs no files); ``weights.json`` keeps them.

Formats:

``weights.json`` / ``weights.yaml``
    ``{"unit", "size", "kl", "weights": {task: w}, "natural": {task: p}}`` in the plan's unit,
    plus ``token_weights`` / ``example_weights`` where the other unit is known.
``interleave.json``
    For ``datasets.interleave_datasets`` (examples): ``datasets`` (task order),
    ``probabilities``, ``take`` (the budget in rows), ``stopping_strategy``, ``seed``. Repeat each
    task's dataset endlessly and take the budget (``usage`` in the file)::

        parts = [load(t).to_iterable_dataset().repeat(None) for t in cfg["datasets"]]
        mixed = interleave_datasets(parts, probabilities=cfg["probabilities"], seed=cfg["seed"],
                                    stopping_strategy=cfg["stopping_strategy"]).take(cfg["take"])

    ``stopping_strategy="all_exhausted"`` alone does not carry a budget: it stops when the last
    task first runs out, so with a budget of twice the data it yields about half of it. Its draws
    are iid; the evenly spaced order (and exact caps) need raretask's own iterable dataset,
    :class:`raretask.mixing.sampler.MixtureDataset`.
``olmo_core.yaml``
    ``source_mixture_config`` for OLMo-core's ``NumpyFSLDatasetConfig`` (ai2-olmo-core 3.0:
    ``SourceMixtureDatasetConfig``): ``source_list.sources`` of ``source_name``, ``target_ratio``
    (token shares), ``max_repetition_ratio``, ``paths``; ``requested_tokens`` (the budget in
    tokens, rounded up to whole global batches: OLMo-core spreads the instances of a partial batch
    evenly over the paths, which would bend the shares), ``global_batch_size`` (tokens; default
    one sequence) and ``seed``. ``max_repetition_ratio`` is the task's repetition cap, or, where
    the budget needs more epochs than that or there is no cap, the epochs the budget needs (rounded
    up at 1e-4): never OLMo-core's default 1.0 for a source the plan repeats, which fails its
    build with "Insufficient tokens".
``megatron.txt``
    A Megatron-LM ``--data-path`` value, token weights: ``w1 prefix1 w2 prefix2 ...``. A prefix
    that is empty, holds whitespace (Megatron splits the value on it) or starts with ``-`` (argparse
    reads it as an option) is refused.
``mosaicml.yaml``
    MosaicML streaming: ``epoch_size`` (rows of ``sequence_length`` tokens per epoch: the budget)
    and ``streams`` (llm-foundry's mapping, task -> ``local``, ``proportion``; proportions sum to
    1). ``Stream`` takes at most one of ``proportion``, ``repeat`` and ``choose``, and refuses
    ``epoch_size`` with absolute ones, so the cap is carried by ``epoch_size``: streaming derives
    each stream's rows per epoch as ``(epoch_size * proportion).astype(int64)``; the proportions
    are set so that this gives the plan's rows (largest remainders) exactly, with no random
    shortfall to hand out, so no task goes past the plan's count (and cap) by a row.

Weights in weights.json, interleave.json, olmo_core.yaml and megatron.txt carry 12 significant
digits (they read back within 1e-11); Mosaic proportions carry every digit (they must reproduce
integer row counts).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import yaml

from raretask.errors import UserError
from raretask.runs import store

FORMATS = ("weights.json", "weights.yaml", "interleave.json", "olmo_core.yaml", "megatron.txt",
           "mosaicml.yaml")
# the unit each loader's shares are read in
FORMAT_UNIT = {"interleave.json": "examples", "olmo_core.yaml": "tokens", "megatron.txt": "tokens",
               "mosaicml.yaml": "tokens"}
_READER = {"interleave.json": "datasets.interleave_datasets draws examples",
           "olmo_core.yaml": "OLMo-core mixes tokens", "megatron.txt": "Megatron blends tokens",
           "mosaicml.yaml": "MosaicML streams rows of tokens"}
DEFAULT_SEQUENCE_LENGTH = 4096


class Unconvertible(UserError):
    """The plan cannot be put in the unit a format reads (no tokens per example, no budget)."""


def _w(x: float) -> float:
    return float(f"{x:.12g}")


def _paths(plan, template: str) -> dict[str, str]:
    if "{task}" not in template:
        raise UserError(f"--path-template: must contain '{{task}}', got {template!r}")
    return {t.task: template.replace("{task}", t.task) for t in plan.tasks}


def _tokens_per_example(plan, tpe: Mapping[str, float] | None) -> dict[str, float] | None:
    """Validated tokens per example of every task with weight (None: not given)."""
    if tpe is None:
        return None
    names = {t.task for t in plan.tasks}
    for task in tpe:
        if task not in names:
            raise UserError(f"tokens_per_example: unknown task {task!r}")
    out = {}
    for t in plan.tasks:
        if t.weight <= 0:
            continue
        v = tpe.get(t.task)
        if v is None or not (math.isfinite(float(v)) and float(v) > 0):
            return None  # this task's size in tokens is unknown: no conversion
        out[t.task] = float(v)
    return out


def convert(plan, unit: str, tokens_per_example: Mapping[str, float] | None = None,
            fmt: str = "export") -> tuple[dict[str, float], float | None]:
    """The plan's weights (tasks with weight > 0) and budget in ``unit``.

    Raises :class:`Unconvertible` (naming ``fmt``) where the units differ and some task with
    weight has no tokens per example.
    """
    live = [t for t in plan.tasks if t.weight > 0]
    if unit == plan.unit:
        return {t.task: t.weight for t in live}, plan.budget
    tpe = _tokens_per_example(plan, tokens_per_example)
    if tpe is None:
        source = ("plan from an analysis with token counts, or plan --unit tokens"
                  if unit == "tokens" else "plan from an analysis with token counts")
        raise Unconvertible(
            f"{fmt}: {_READER.get(fmt, 'this format reads ' + unit)}, but the plan is in "
            f"{plan.unit} and the tokens per example of its tasks are not known ({source})")
    factor = {k: (v if unit == "tokens" else 1.0 / v) for k, v in tpe.items()}
    mass = sum(t.weight * factor[t.task] for t in live)
    shares = {t.task: t.weight * factor[t.task] / mass for t in live}
    return shares, None if plan.budget is None else plan.budget * mass


def _needs_budget(budget: float | None, fmt: str, what: str) -> float:
    if budget is None:
        raise Unconvertible(f"{fmt}: {what} needs the plan's budget, and the plan has none "
                            "(plan with --budget, or from data with counts)")
    return float(budget)


def _epochs_needed(plan, task: str, share: float, budget_unit: float, unit: str,
                   tpe: Mapping[str, float] | None) -> float | None:
    """Epochs of ``task``'s data that ``share`` of a budget (in ``unit``) takes; None: unknown."""
    t = next(t for t in plan.tasks if t.task == task)
    if t.available is None or t.available <= 0:
        return None
    avail = t.available
    if unit != plan.unit:  # availability is in the plan's unit
        avail = avail * tpe[task] if unit == "tokens" else avail / tpe[task]
    return share * budget_unit / avail


def _cap(plan, task: str) -> float | None:
    t = next(t for t in plan.tasks if t.task == task)
    cap = getattr(t, "max_epochs", None)
    return plan.max_epochs if cap is None else cap


def _apportion(total: int, shares: list[float]) -> list[int]:
    """Integers summing to ``total``, each within 1 of ``total * share`` (largest remainders)."""
    raw = [total * s for s in shares]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


def _streaming_proportions(counts: list[int]) -> list[float]:
    """Proportions from which streaming (0.13, ``Stream.apply_weights``) derives ``counts``.

    It normalises the proportions, takes ``(epoch_size * p).astype(int64)`` per stream and
    hands the shortfall to streams drawn at random; ``n / epoch_size`` can floor to ``n - 1`` in
    float64, so nudge those up an ulp at a time until every stream floors to its count.
    """
    total = sum(counts)
    n = np.asarray(counts, np.int64)
    p = n / total
    for _ in range(64):
        got = (total * (p / p.sum())).astype(np.int64)
        if np.array_equal(got, n):
            return [float(x) for x in p]
        p = np.where(got < n, np.nextafter(p, 2.0), np.where(got > n, np.nextafter(p, 0.0), p))
    raise AssertionError(f"no float proportions reproduce the counts {counts}")  # not seen


def _olmo_core(plan, paths, tpe, fmt, sequence_length, global_batch_size) -> str:
    shares, budget = convert(plan, "tokens", tpe, fmt)
    budget = _needs_budget(budget, fmt, "requested_tokens")
    gbs = sequence_length if global_batch_size is None else int(global_batch_size)
    if gbs <= 0 or gbs % sequence_length:
        raise UserError(f"{fmt}: global_batch_size {gbs} must be a positive multiple of the "
                        f"sequence length {sequence_length}")
    requested = max(1, math.ceil(budget / gbs * (1 - 1e-12))) * gbs
    tokens_tpe = _tokens_per_example(plan, tpe)
    sources = []
    for task, share in shares.items():
        src = {"source_name": task, "target_ratio": _w(share)}
        need = _epochs_needed(plan, task, share, requested, "tokens", tokens_tpe)
        if need is not None:
            # the cap, unless the (batch-rounded) budget needs a hair more; uncapped: the need
            cap = _cap(plan, task)
            need_up = math.ceil(need * 1e4 * (1 + 1e-9)) / 1e4
            limit = cap if cap is not None and need_up <= cap else need_up
            src["max_repetition_ratio"] = float(max(1.0, limit))
            if cap is not None and limit < 1:  # a cap below one epoch: a fraction of the data
                src["max_source_fraction"] = float(limit)
        src["paths"] = [paths[task]]
        sources.append(src)
    mix = {"source_list": {"sources": sources}, "requested_tokens": int(requested),
           "global_batch_size": gbs, "seed": 0}
    return yaml.safe_dump({"source_mixture_config": mix}, sort_keys=False)


def _unsafe_prefix(prefix: str) -> str | None:
    """Why Megatron's --data-path would misread ``prefix`` (None: it reads it whole)."""
    if not prefix:
        return "is empty"
    if prefix.startswith("-"):
        return "starts with '-' (argparse reads an option)"
    if prefix != "".join(prefix.split()):
        return "holds whitespace (Megatron splits on it)"
    return None


def _megatron(plan, paths, tpe, fmt, template: str = "{task}") -> str:
    shares, _ = convert(plan, "tokens", tpe, fmt)
    parts = []
    for task, share in shares.items():
        prefix = paths[task]
        why = _unsafe_prefix(prefix)
        if why is not None:
            msg = f"{fmt}: task {task!r}: the data prefix {prefix!r} {why}"
            if _unsafe_prefix(template.replace("{task}", "x")) is None:
                # the data's own task name: the other formats still hold it, so render_all
                # leaves this one out and says why instead of refusing the whole set
                raise Unconvertible(f"{msg}; rename the task (Megatron's line has no quoting)")
            raise UserError(f"{msg}; give --path-template and task names without spaces")
        parts.append(f"{_w(share):.12g} {prefix}")
    return " ".join(parts) + "\n"


def _mosaicml(plan, paths, tpe, fmt, sequence_length) -> str:
    shares, budget = convert(plan, "tokens", tpe, fmt)
    budget = _needs_budget(budget, fmt, "epoch_size")
    rows = max(1, math.ceil(budget / sequence_length * (1 - 1e-12)))
    counts = _apportion(rows, list(shares.values()))
    props = _streaming_proportions(counts)
    streams = {task: {"local": paths[task], "proportion": p}
               for task, p in zip(shares, props, strict=True)}
    return yaml.safe_dump({"epoch_size": rows, "streams": streams}, sort_keys=False)


def _interleave(plan, tpe, fmt) -> str:
    shares, budget = convert(plan, "examples", tpe, fmt)
    take = round(_needs_budget(budget, fmt, "the number of rows to take"))
    return json.dumps({
        "datasets": list(shares), "probabilities": [_w(s) for s in shares.values()],
        "take": int(take), "stopping_strategy": "first_exhausted", "seed": 0,
        "usage": "parts = [load(task).to_iterable_dataset().repeat(None) for task in datasets]; "
                 "interleave_datasets(parts, probabilities=probabilities, seed=seed, "
                 "stopping_strategy=stopping_strategy).take(take). Draws are iid; for evenly "
                 "spaced rare tasks use raretask.mixing.sampler.MixtureDataset.",
    }, indent=2) + "\n"


def _weights(plan, tpe, fmt) -> str:
    obj = {"unit": plan.unit, "size": plan.size, "kl": plan.kl,
           "weights": {t.task: _w(t.weight) for t in plan.tasks},
           "natural": {t.task: _w(t.natural) for t in plan.tasks}}
    other = "tokens" if plan.unit == "examples" else "examples"
    try:
        shares, _ = convert(plan, other, tpe, fmt)
        obj[f"{other[:-1]}_weights"] = {t.task: _w(shares.get(t.task, 0.0)) for t in plan.tasks}
    except Unconvertible:
        pass
    if fmt == "weights.json":
        return json.dumps(obj, indent=2) + "\n"
    return yaml.safe_dump(obj, sort_keys=False)


def render(plan, fmt: str, path_template: str = "{task}",
           tokens_per_example: Mapping[str, float] | None = None, *,
           sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
           global_batch_size: int | None = None) -> str:
    """The text of one export format.

    ``tokens_per_example``: each task's mean tokens per example, to convert between the plan's
    unit and the format's. ``sequence_length``: tokens per training sequence (an OLMo-core
    instance, a Mosaic row); ``global_batch_size``: OLMo-core's, in tokens (default one
    sequence). Raises :class:`Unconvertible` where the plan cannot be put in the format's unit,
    :class:`UserError` for a bad template or path.
    """
    if fmt not in FORMATS:
        raise UserError(f"export format: unknown {fmt!r} (known: {', '.join(FORMATS)})")
    if not (isinstance(sequence_length, int) and sequence_length > 0):
        raise UserError(f"sequence_length: expected a positive integer, got {sequence_length!r}")
    paths = _paths(plan, path_template)
    if fmt in ("weights.json", "weights.yaml"):
        return _weights(plan, tokens_per_example, fmt)
    if fmt == "interleave.json":
        return _interleave(plan, tokens_per_example, fmt)
    if fmt == "olmo_core.yaml":
        return _olmo_core(plan, paths, tokens_per_example, fmt, sequence_length, global_batch_size)
    if fmt == "megatron.txt":
        return _megatron(plan, paths, tokens_per_example, fmt, path_template)
    return _mosaicml(plan, paths, tokens_per_example, fmt, sequence_length)


def render_all(plan, path_template: str = "{task}",
               tokens_per_example: Mapping[str, float] | None = None,
               **options) -> tuple[dict[str, str], dict[str, str]]:
    """(the text of every format the plan can be put in, {format: why not} for the others).

    A task name Megatron cannot read (whitespace, a leading '-') leaves megatron.txt out too.
    Other errors (a bad template, an unsafe Megatron prefix from the template) raise, so a
    caller that renders first writes nothing.
    """
    texts, skipped = {}, {}
    for fmt in FORMATS:
        try:
            texts[fmt] = render(plan, fmt, path_template, tokens_per_example, **options)
        except Unconvertible as err:
            skipped[fmt] = str(err)
    return texts, skipped


def write_texts(out: Path, texts: Mapping[str, str]) -> list[Path]:
    """Write rendered formats (from :func:`render_all`) into ``out``."""
    written = []
    for fmt, text in texts.items():
        store.write_text(Path(out) / fmt, text)
        written.append(Path(out) / fmt)
    return written


def write_all(plan, out: Path, path_template: str = "{task}",
              tokens_per_example: Mapping[str, float] | None = None, **options) -> list[Path]:
    """Render every format the plan can be put in first (so a bad template writes nothing),
    then write them; formats in a unit the plan cannot be converted to are skipped (see
    :func:`render_all` for why)."""
    texts, _ = render_all(plan, path_template, tokens_per_example, **options)
    return write_texts(out, texts)
