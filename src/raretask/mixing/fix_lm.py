"""The fix's language-model half: ``raretask fix configs/fix_lm.yaml --out DIR``.

``fix_lm.yaml`` is an LM grid (:class:`raretask.lm.config.LMCell`) with an ``arm`` axis, as the
toy's fix grid has (:mod:`raretask.mixing.fix`). Every arm shares the small model (``size``),
the task and its natural rate (``rate``, instances per token); each trains:

========  ============  ============================  =====================================
arm       model         the task's rate               delivery
========  ============  ============================  =====================================
natural   ``size``      ``rate``                      i.i.d. rows (how a real corpus has it)
plan      ``size``      the plan's rate               i.i.d. rows
even      ``size``      the plan's rate               the same count every step
burst     ``size``      the plan's rate (whole        ``every`` steps' worth at once
                        bursts)
big       ``big_size``  ``rate``                      i.i.d. rows
========  ============  ============================  =====================================

The plan is ``raretask plan``'s own solver (:func:`raretask.mixing.plan.make_plan`) on the grid's
analysed mix, two sources in tokens: the background text and the task (``rate`` x tokens per
instance of the tokens), with the threshold of ``calibration``'s law for the task at the small
model's non-embedding parameters and the run's training tokens, and the target at ``margin``
times it. The plan is written beside the grid as ``plan.json``.

Results are per arm over seeds: test accuracy on the task (learned at >= 0.9,
:data:`raretask.lm.verdict.LEARNED_ACCURACY`, as in the calibration, `show` and the report), its
loss, the held-out text loss (the background's validation loss: what the plan may cost), compute
``6 N T`` (non-embedding parameters x training tokens).
Grids without an ``arm`` axis (run before it existed) are labelled by size and rate.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from rich import box
from rich.table import Table

from raretask.config import FIX_ARMS
from raretask.errors import UserError
from raretask.lm.verdict import LEARNED_ACCURACY  # the calibration's, show's and the report's


@functools.lru_cache(maxsize=32)
def _plan(task: str, rate: float, params: float, seq_len: int, tokens: float, margin: float,
          calibration: str):
    from raretask.lm.tasks import INSTANCE_LEN
    from raretask.mixing.calibrate import load_calibration
    from raretask.mixing.plan import make_plan
    from raretask.mixing.thresholds import LawThreshold

    cal = load_calibration(calibration)
    per_instance = cal.units.tokens_per_instance
    if per_instance != INSTANCE_LEN:
        raise UserError(f"calibration: {calibration} counts {per_instance} tokens per instance; "
                        f"this study's tasks have {INSTANCE_LEN} (an LM calibration from "
                        "`raretask calibrate` on LM grids)")
    law = cal.law(task, "task")
    threshold = LawThreshold(law, per_instance, "tokens", tokens, [seq_len, per_instance],
                             label=Path(calibration).name)
    share = rate * per_instance
    return make_plan(["text", task], [1 - share, share], threshold, params, targets=[task],
                     margin=margin, budget=tokens, unit="tokens")


def small_params(cell) -> float:
    from raretask.lm.model import ModelConfig

    return float(ModelConfig.preset(cell.size).num_params(include_embedding=False))


def fix_plan(cell):
    """The plan of an arm cell's setting (cached: every arm x seed of a grid shares it)."""
    return _plan(cell.task, float(cell.rate), small_params(cell), cell.seq_len,
                 float(cell.steps * cell.batch_size * cell.seq_len), float(cell.margin),
                 str(cell.calibration))


def planned_rate(cell) -> float:
    """The plan's rate for the task, in instances per token."""
    from raretask.lm.tasks import INSTANCE_LEN

    weight = next(t.weight for t in fix_plan(cell).tasks if t.task == cell.task)
    return weight / INSTANCE_LEN


def big_preset(cell) -> str:
    """The smallest preset with the non-embedding parameters the natural mix needs (the plan's
    size with the same margin), as the toy's big arm takes the width it needs."""
    from raretask.lm.model import PRESETS, ModelConfig

    needed = fix_plan(cell).natural_size_needed
    sizes = sorted((ModelConfig.preset(p).num_params(include_embedding=False), p)
                   for p in PRESETS)
    for params, name in sizes:
        if params >= needed:
            return name
    raise UserError(f"big_size: the natural mix needs {needed:.3g} non-embedding parameters, "
                    f"more than the largest preset ({sizes[-1][1]}); name one with big_size")


def resolve_arm(cell):
    """The ordinary cell an arm cell trains (itself when it has no arm); a plan the cell's
    sequences cannot carry is a one-line UserError."""
    if cell.arm is None:
        return cell
    fields = cell.model_dump()
    arm = fields.pop("arm")
    fields.update(big_size=None, calibration=None, every=1, delivery="iid")
    if arm == "big":
        fields["size"] = cell.big_size or big_preset(cell)
    elif arm != "natural":
        rate = planned_rate(cell)
        if rate * cell.seq_len > 1:
            raise UserError(f"margin: the plan's rate {rate:.4g} per token needs more than one "
                            f"instance per sequence of {cell.seq_len} tokens; lower margin or "
                            "raise seq_len")
        fields["rate"] = rate
        if arm == "even":
            fields["delivery"] = "even"
        elif arm == "burst":  # whole instances per burst, as close to the plan's rate as that
            per_step = cell.batch_size * cell.seq_len
            k = max(1, round(rate * per_step * cell.every))
            if k > cell.batch_size:
                raise UserError(f"every: a burst of {k} instances (the plan's rate x tokens per "
                                f"step x every {cell.every}) does not fit in a batch of "
                                f"{cell.batch_size} sequences")
            fields.update(delivery="burst", every=cell.every, rate=k / (per_step * cell.every))
    return type(cell).model_validate(fields)


def check_arms(cells) -> None:
    """Resolve every arm before anything is written: a plan that cannot be made, or cannot be
    delivered, fails here in one line."""
    for cell in cells:
        resolve_arm(cell)


# -- results -----------------------------------------------------------------------------------


def _legacy_labels(rows: list[dict]) -> list[str]:
    """Arms of a grid made before the ``arm`` axis: sizes and rates on the axes."""
    params = sorted({r["params"] for r in rows})
    freqs = sorted({r["requested_frequency"] or r["frequency"] for r in rows})
    out = []
    for r in rows:
        f = r["requested_frequency"] or r["frequency"]
        small = r["params"] == params[0]
        if r["schedule"] != "spread":
            out.append("burst")
        elif small:
            out.append("natural" if f == freqs[0] else "plan")
        else:
            out.append("big" if f == freqs[0] else "big + plan")
    return out


def arm_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by arm, in :data:`raretask.config.FIX_ARMS` order (other labels after)."""
    labels = [r["arm"] for r in rows] if all(r.get("arm") for r in rows) else _legacy_labels(rows)
    by: dict[str, list[dict]] = {}
    for r, lab in zip(rows, labels, strict=True):
        by.setdefault(lab, []).append(r)
    order = [a for a in FIX_ARMS if a in by] + [a for a in by if a not in FIX_ARMS]
    return {a: sorted(by[a], key=lambda r: r["seed"]) for a in order}


def _mean_sd(values: list) -> tuple[float | None, float | None]:
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None, None
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def arm_summary(rows: list[dict], learned_accuracy: float = LEARNED_ACCURACY) -> list[dict]:
    """One record per arm: settings, seeds learned, means and sds over seeds, compute."""
    out = []
    for arm, rs in arm_rows(rows).items():
        r0 = rs[0]
        acc, acc_sd = _mean_sd([r.get("test_accuracy") for r in rs])
        task_loss, _ = _mean_sd([r.get("task_loss") for r in rs])
        val, val_sd = _mean_sd([r.get("val_loss") for r in rs])
        framed, _ = _mean_sd([r.get("val_loss_framed") for r in rs])
        out.append({
            "arm": arm, "size": r0["size"], "params": float(r0["params"]),
            "rate": float(np.mean([r["frequency"] for r in rs])), "schedule": r0["schedule"],
            "seeds": [int(r["seed"]) for r in rs],
            "learned": sum((r.get("test_accuracy") or 0.0) >= learned_accuracy for r in rs),
            "test_accuracy": acc, "test_accuracy_sd": acc_sd,
            "per_seed_accuracy": [r.get("test_accuracy") for r in rs],
            "task_loss": task_loss, "val_loss": val, "val_loss_sd": val_sd,
            "val_loss_framed": framed,
            "steps": int(r0["steps"]), "tokens": float(r0["tokens"]),
            "flops": 6.0 * float(r0["params"]) * float(r0["tokens"])})
    return out


def _change(arm: dict, base: dict, key: str) -> float | None:
    """``arm[key] - base[key]``, None when either is missing."""
    if arm.get(key) is None or base.get(key) is None:
        return None
    return arm[key] - base[key]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def fix_lm_table(arms: list[dict], title: str, plan=None,
                 learned_accuracy: float = LEARNED_ACCURACY) -> Table:
    base = next((a for a in arms if a["arm"] == "natural"), arms[0])
    big = next((a for a in arms if a["arm"] == "big"), None)
    table = Table(title=f"{title}: the fix on a language model ({len(base['seeds'])} seed"
                  f"{'s' if len(base['seeds']) > 1 else ''})", box=box.SIMPLE_HEAD,
                  pad_edge=False, padding=0)  # the box's separator is the one space between columns
    framed = any(a.get("val_loss_framed") is not None for a in arms)  # rows run since it was
    columns = ["arm", "model", "rate/tok", "arrives", "learned", "test acc", "text L", "change"]
    columns += ["framed"] * framed + ["compute"]
    for c in columns:  # fold, never cut: every digit stays readable at 80 columns
        table.add_column(c, justify="left" if c in ("arm", "arrives") else "right",
                         overflow="fold")
    for a in arms:
        acc = "-" if a["test_accuracy"] is None else \
            f"{a['test_accuracy']:.2f}±{a['test_accuracy_sd']:.2f}"
        cells = [a["arm"], a["size"], f"{a['rate']:.2e}", a["schedule"],
                 f"{a['learned']}/{len(a['seeds'])}", acc, _fmt(a["val_loss"], ".3f"),
                 _fmt(_change(a, base, "val_loss"), "+.3f")]
        if framed:
            cells.append(_fmt(_change(a, base, "val_loss_framed"), "+.3f"))
        table.add_row(*cells, f"{a['flops'] / base['flops']:.3g}x")
    caption = (f"learned: seeds with test accuracy >= {learned_accuracy:g} (held-out "
               "instances, mean ± sd over seeds; its loss is in results.json); text L: "
               "held-out background text loss (change: vs natural)"
               + ("; framed: the change of the same text scored in the arm's training format "
                  "(val_loss_framed: the arm's share of rows opens with a held-out instance)"
                  if framed else "")
               + "; compute: 6 x non-embedding "
               f"params x tokens, relative to natural ({base['flops']:.3g} FLOPs; "
               + ", ".join(f"{a['size']} {a['params'] / 1e6:.3g}M" for a in
                           {a["size"]: a for a in arms}.values()) + " parameters)")
    if big is not None and big is not base:
        caption += f"; the big arm costs {big['flops'] / base['flops']:.3g}x natural"
    if plan is not None:
        t = next(t for t in plan.tasks if t.target)
        caption = (f"plan: {t.task} at {100 * t.natural:.3g}% of tokens -> {100 * t.weight:.3g}% "
                   f"(the calibrated law needs {100 * t.required:.3g}% x margin "
                   f"{plan.margin:g}); " + caption)
    table.caption = caption
    return table


def fix_lm_json(arms: list[dict], task: str, learned_accuracy: float = LEARNED_ACCURACY) -> dict:
    """The report's ``fix.json`` (:mod:`raretask.report.fix`): one row per arm, seed means."""
    return {"task": task,
            "note": (f"language model: natural vs the plan's rate vs a bigger model; bursts at "
                     f"the plan's rate; learned = test accuracy >= {learned_accuracy:g} in "
                     "every seed; test accuracy and losses are means over seeds"),
            "rows": [{"label": f"{a['arm']} ({a['schedule']})", "size": a["size"],
                      "params": a["params"], "frequency": a["rate"], "steps": a["steps"],
                      "tokens": a["tokens"], "test_accuracy": a["test_accuracy"],
                      "test_accuracy_sd": a["test_accuracy_sd"], "seeds": len(a["seeds"]),
                      "learned_seeds": a["learned"], "flops": a["flops"],
                      "task_loss": a["task_loss"], "val_loss": a["val_loss"],
                      "val_loss_framed": a.get("val_loss_framed"),
                      "learned": a["learned"] == len(a["seeds"]), "run": "."}
                     for a in arms]}


def lm_fix_outputs(out: Path):
    """(the fix table, {"fix.json", "results.json" and, for arm grids, "plan.json"}) of a
    finished LM fix grid."""
    from raretask.config import load_experiment
    from raretask.runs.grid import load_summary

    out = Path(out)
    rows = load_summary(out)
    if not rows:
        raise UserError(f"{out}: no finished cells to make a fix table of")
    cells = list(load_experiment(out / "config.yaml").cells())
    planned = [c for c in cells if c.arm in ("plan", "even", "burst")
               or (c.arm == "big" and c.big_size is None)]
    plan = fix_plan(planned[0]) if planned else None  # arms that took no plan made none
    arms = arm_summary(rows)
    files = {"fix.json": fix_lm_json(arms, rows[0]["task"]), "results.json": arms}
    if plan is not None:
        files["plan.json"] = plan.to_json()
    return fix_lm_table(arms, str(out), plan), files
