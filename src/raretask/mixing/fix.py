"""Prove the fix on the solvable toy: plan the mixture, then train the small model under the
natural mix (misses the rare task), under the plan (learns it), the bigger model the natural mix
would need, and the plan's frequency delivered evenly versus in bursts.

The arms are an ordinary toy grid: ``arm`` is a field of :class:`~raretask.config.ToyCell`
(``configs/fix_toy.yaml`` makes it an axis, with ``seed``), so the fix runs, resumes, runs on a
GPU and shows like any grid (``raretask fix CONFIG --out DIR`` runs it, then writes this
module's table and ``fix.json``). What each arm trains
(:func:`arm_setting`):

========== ======= ========================= =============================================
arm        width   task shares               how the rare task arrives
========== ======= ========================= =============================================
natural    small   natural (pi_k ∝ k^-beta)  i.i.d. in every batch
plan       small   planned (min-KL)          i.i.d. in every batch
even       small   planned                   the same count in every batch ("matched", G=1)
burst      small   planned                   withheld, then G = ``every`` batches' worth at once
big        N_nat   natural                   i.i.d.; N_nat = width the natural mix needs
========== ======= ========================= =============================================

The plan comes from :func:`raretask.mixing.plan.make_plan` with Theorem 3 thresholds (the toy's
theory is exact, so no calibration is needed) and ``keep_learned``: every task Theorem 3 says the
natural mix teaches at ``width`` keeps ``margin`` x its required share, so the plan does not buy
the rare task with another one. ``N_nat`` is the plan's "model size the natural mix would need"
with the same margin. The rare task's result is its normalised signal s~, averaged over the last
``every`` steps from the trace (so a burst arm is not judged right after an injection) and also
at the end; every other task's is its s~ at the end (it arrives i.i.d. in every arm). A task
counts as learned under an arm when its s~, averaged over seeds, is >= ``learned_threshold``;
each arm lists the tasks it learns that the natural arm does not (gained) and those it loses.
The frequent tasks' result is also their mean normalised loss.
Compute is ``6 (d + M) N`` FLOPs per training sample (encoder and one task's decoder, forward
and backward) times the samples actually drawn (injections included).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from raretask.config import FIX_ARMS
from raretask.errors import UserError
from raretask.theory import TaskSet


@dataclass(frozen=True)
class ArmResult:
    """One arm, averaged over seeds (per-seed values in ``rare_per_seed``)."""

    arm: str
    width: int
    schedule: str
    rare_share: float
    rare_signal: float
    rare_signal_final: float
    rare_learned: str
    rare_per_seed: list[float]
    rare_loss: float
    frequent_loss: float
    tasks_learned: float
    samples: float
    flops: float
    task_signal: list[float] = field(default_factory=list)  # s~ per task, seed mean
    learned_tasks: list[str] = field(default_factory=list)
    gained: list[str] = field(default_factory=list)  # vs the natural arm
    lost: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=32)
def fix_plan(tasks: int, features: int, alpha: float, beta: float, width: int, rare: int,
             margin: float):
    """The plan of the fix's arms: minimum KL to the natural mix with Theorem 3's thresholds at
    ``width``, target the rare task, every task the natural mix teaches kept learned with the
    same margin (:func:`raretask.mixing.plan.make_plan`); the toy's theory is exact, so nothing
    is calibrated. Cached: every arm x seed of a grid shares it."""
    from raretask.mixing.plan import make_plan
    from raretask.mixing.thresholds import TheoryThreshold

    ts = TaskSet.power_law(tasks, features, alpha, beta)
    return make_plan(ts.names, ts.frequencies, TheoryThreshold(ts.names, spectra=ts.spectra),
                     width, targets=[ts.names[rare]], margin=margin, keep_learned=True)


def cell_plan(cell):
    """The plan of a toy cell's setting (:func:`fix_plan`)."""
    return fix_plan(cell.tasks, cell.features, cell.alpha, cell.beta, cell.width,
                    cell.rare_index, cell.margin)


def arm_setting(cell):
    """(width, task priors, rare-task schedule) a toy cell's fix arm trains with (the table in
    the module docstring)."""
    from raretask.toy.spec import Schedule

    natural = TaskSet.power_law(cell.tasks, cell.features, cell.alpha, cell.beta).frequencies
    plan = cell_plan(cell)
    planned = np.array([t.weight for t in plan.tasks])
    if cell.arm == "big":
        width = cell.big_width or int(np.ceil(plan.natural_size_needed))
        return min(width, cell.tasks * cell.features), natural, Schedule()
    return cell.width, *{"natural": (natural, Schedule()), "plan": (planned, Schedule()),
                         "even": (planned, Schedule("matched", gap=1)),
                         "burst": (planned, Schedule("matched", gap=cell.every))}[cell.arm]


@dataclass(frozen=True)
class FixSetting:
    """What every arm of a fix grid shares (its first cell's fields)."""

    tasks: int
    features: int
    beta: float
    rare: int
    width: int
    margin: float
    steps: int
    batch_size: int
    gap: int
    learned_threshold: float
    seeds: int


def toy_fix_results(out: Path) -> tuple[FixSetting, object, list[ArmResult]]:
    """(setting, plan, one result per arm in :data:`raretask.config.FIX_ARMS` order) of a
    finished fix grid."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raretask.runs.grid import load_summary
    from raretask.theory import Theory

    out = Path(out)
    rows = load_summary(out)
    cells = run_cells(out)
    if not rows or any(c.arm is None for c in cells):
        raise UserError(f"{out}: not a finished fix grid (every cell needs an 'arm')")
    c0 = cells[0]
    setting = FixSetting(c0.tasks, c0.features, c0.beta, c0.rare_index, c0.width, c0.margin,
                         c0.steps, c0.batch_size, c0.every, c0.learned_threshold,
                         len({c.seed for c in cells}))
    m = pq.read_table(out / "metrics.parquet").to_pydict()
    final = {(c, t, k): v for c, s, t, k, v in zip(m["cell"], m["step"], m["task"], m["metric"],
                                                    m["value"], strict=True) if s == c0.steps}
    traces = pa.concat_tables([pq.read_table(p) for p in
                               sorted(out.glob("groups/g*/traces.parquet"))]).to_pydict()
    late = {}  # the rare signal over the last `gap` steps, per cell
    for c, step, v in zip(traces["cell"], traces["step"], traces["rare_signal"], strict=True):
        if step > c0.steps - c0.every:
            late.setdefault(c, []).append(v)
    natural = TaskSet.power_law(c0.tasks, c0.features, c0.alpha, c0.beta)
    frequent = sorted(Theory(natural, c0.frequent_mass).frequent_tasks().tolist())
    d, k, rare = c0.tasks * c0.features, c0.tasks, c0.rare_index
    names = natural.names
    results = []
    for arm in [a for a in FIX_ARMS if any(c.arm == a for c in cells)]:
        ids = [i for i, c in enumerate(cells) if c.arm == arm]
        width = arm_setting(cells[ids[0]])[0]
        rare_avg = [float(np.mean(late[i])) for i in ids]
        seen = [sum(final[(i, t, "seen")] for t in range(k)) for i in ids]
        # s~ per task, averaged over seeds: the rare task's over the last `every` steps
        signal = [float(np.mean(rare_avg)) if t == rare else
                  float(np.mean([final[(i, t, "signal_norm")] for i in ids])) for t in range(k)]
        label = {"even": "every 1 step", "burst": f"every {c0.every} steps"}.get(arm, "iid")
        learned = [names[t] for t in range(k) if signal[t] >= c0.learned_threshold]
        results.append(ArmResult(
            arm=arm, width=width, schedule=label,
            rare_share=float(sum(final[(i, rare, "seen")] for i in ids) / np.sum(seen)),
            rare_signal=float(np.mean(rare_avg)),
            rare_signal_final=float(np.mean([final[(i, rare, "signal_norm")] for i in ids])),
            rare_learned=f"{sum(s >= c0.learned_threshold for s in rare_avg)}/{len(ids)}",
            rare_per_seed=rare_avg,
            rare_loss=float(np.mean([final[(i, rare, "loss_norm")] for i in ids])),
            frequent_loss=float(np.mean([np.mean([final[(i, t, "loss_norm")]
                                                  for t in frequent]) for i in ids])),
            tasks_learned=float(len(learned)), samples=float(np.mean(seen)),
            flops=float(6 * (d + c0.features) * width * np.mean(seen)),
            task_signal=signal, learned_tasks=learned, gained=[], lost=[],
        ))
    return setting, cell_plan(c0), compare_to_natural(results)


def compare_to_natural(results: list[ArmResult]) -> list[ArmResult]:
    """Each arm with the tasks it learns that the natural arm does not (gained) and the tasks
    the natural arm learns that it does not (lost); unchanged without a natural arm."""
    base = next((r for r in results if r.arm == "natural"), None)
    if base is None:
        return results
    had = set(base.learned_tasks)
    return [replace(r, gained=[t for t in r.learned_tasks if t not in had],
                    lost=[t for t in base.learned_tasks if t not in r.learned_tasks])
            for r in results]


def load_experiment_dir(out: Path):
    """The grid a run directory holds (its resolved ``config.yaml``)."""
    from raretask.config import load_experiment
    from raretask.runs import manifest

    manifest.check_copies(Path(out))  # an edited config.yaml/cells.json would mislabel the arms
    return load_experiment(out / "config.yaml")


def run_cells(out: Path) -> list:
    """The run's cells by cell id, from its ``cells.json``: the ids the metrics carry. (The
    resolved ``config.yaml`` lists the axes in field order, so enumerating it again can number
    the cells differently from the run, e.g. seed before arm.)"""
    from raretask.runs import store
    from raretask.schema import validate

    grid = load_experiment_dir(Path(out))
    path = Path(out) / "cells.json"
    try:
        table = sorted(store.read_json(path), key=lambda r: r["cell"])
        if [r["cell"] for r in table] != list(range(len(table))):
            raise ValueError("cell ids are not 0..n-1")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: missing or malformed ({err})") from None
    return [validate(grid.cell_model, {k: v for k, v in r.items() if k not in ("cell", "group")},
                     f"{path} cell {r['cell']}") for r in table]


def fix_table(results: list[ArmResult], cfg: FixSetting, plan):
    """The arms' table (the rare task, the frequent tasks' loss, compute) and, under it, every
    task each arm learns, gains and loses against the natural arm: a rich ``Group``."""
    from rich import box
    from rich.console import Group
    from rich.table import Table

    base = next((r for r in results if r.arm == "natural"), results[0])
    table = Table(title=f"Fix: K = {cfg.tasks}, beta {cfg.beta:g}, rare task "
                  f"{cfg.rare + 1}, {cfg.steps} steps x {cfg.batch_size}, "
                  f"{cfg.seeds} seed{'s' if cfg.seeds > 1 else ''}",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    for c in ("arm", "N", "arrives", "share", "rare s~", "seeds", "F loss", "change",
              "cost"):
        table.add_column(c, justify="left" if c in ("arm", "arrives") else "right",
                         no_wrap=True)
    for r in results:
        ok = r.rare_signal >= cfg.learned_threshold
        table.add_row(
            r.arm, str(r.width), r.schedule.replace(" steps", "").replace(" step", ""),
            f"{100 * r.rare_share:.2f}%",
            f"[{'green' if ok else 'red'}]{r.rare_signal:+.3f}[/]", r.rare_learned,
            f"{r.frequent_loss:.4f}", f"{r.frequent_loss - base.frequent_loss:+.4f}",
            f"{r.flops / base.flops:.2f}x")
    rare = plan.tasks[cfg.rare]
    kept = plan.constraints.get("kept", [])
    binding = ", ".join(f"{b['task']} ({b['constraint']})" for b in plan.binding) or "none"
    table.caption = (
        f"plan: rare share {100 * rare.natural:.2f}% -> {100 * rare.weight:.2f}% (needs "
        f"{100 * rare.required:.2f}% x margin {cfg.margin:g}), KL {plan.kl:.4f} nats, keeping "
        f"tasks {_ranges(kept) or 'none'} learned (Theorem 3 at width {cfg.width} learns them "
        f"under the natural mix); binding: {binding}; the natural mix needs width "
        f"{plan.natural_size_needed:g} with the same margin (Theorem 3 minimum "
        f"{plan.natural_size_minimum:g}). "
        f"arrives: how the rare task reaches the batches; share: its realised share; "
        f"seeds: seeds that learned it; rare s~: normalised signal averaged over the last "
        f"{cfg.gap} steps (learned: >= {cfg.learned_threshold:g}); F loss: mean normalised loss "
        "of the frequent tasks F (change: vs natural); cost: compute, 6 (d + M) N FLOPs per "
        f"sample drawn, relative to natural ({base.flops:.3g} FLOPs)")
    tasks = Table(title="Every task: learned under each arm", box=box.SIMPLE_HEAD,
                  pad_edge=False, padding=(0, 1))
    for c in ("arm", "learned", "tasks", "gained vs natural", "lost vs natural"):
        tasks.add_column(c, justify="right" if c == "learned" else "left",
                         no_wrap=c in ("arm", "learned"))
    for r in results:
        tasks.add_row(r.arm, f"{len(r.learned_tasks)}/{cfg.tasks}",
                      _ranges(r.learned_tasks) or "-", _task_list(r.gained, "green"),
                      _task_list(r.lost, "red"))
    tasks.caption = (f"a task is learned when its s~, averaged over the seeds, is >= "
                     f"{cfg.learned_threshold:g} (the rare task's over the last {cfg.gap} "
                     "steps, the others' at the end)")
    return Group(table, tasks)


def _task_list(tasks: list[str], colour: str) -> str:
    return f"[{colour}]{_ranges(tasks)}[/]" if tasks else "-"


def _ranges(tasks: list[str]) -> str:
    """Numbered toy task names as runs: ["1", "2", "3", "5"] -> "1-3, 5"."""
    nums = sorted(int(t) for t in tasks)
    runs: list[list[int]] = []
    for n in nums:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def toy_fix_outputs(out: Path):
    """(the fix table, the files to write beside the grid: plan.json, results.json and the
    report's fix.json) of a finished toy fix grid."""
    setting, plan, results = toy_fix_results(out)
    return fix_table(results, setting, plan), {
        "plan.json": plan.to_json(), "results.json": [asdict(r) for r in results],
        "fix.json": fix_json(setting, results)}


def fix_json(cfg: FixSetting, results: list[ArmResult]) -> dict:
    """The report's ``fix.json`` (:mod:`raretask.report.fix`): one row per arm. For the toy the
    size is the width, ``frequency`` the rare task's share of samples and ``task_loss`` its
    normalised loss at the end (1 = nothing learned); every arm's learned tasks and those it
    gains and loses against the natural arm."""
    rows = [{"label": f"{r.arm} ({r.schedule})", "size": f"width {r.width}",
             "frequency": r.rare_share, "steps": cfg.steps, "tokens": None,
             "test_accuracy": None, "task_loss": r.rare_loss,
             "learned": bool(r.rare_signal >= cfg.learned_threshold),
             "tasks_learned": r.learned_tasks, "gained": r.gained, "lost": r.lost}
            for r in results]
    return {"task": f"toy task {cfg.rare + 1} of {cfg.tasks}",
            "note": ("toy: frequency = the rare task's share of training samples; task loss = "
                     "its normalised loss; learned = normalised signal >= "
                     f"{cfg.learned_threshold:g} over the last {cfg.gap} steps (other tasks: "
                     "at the end, seed mean); gained / lost: vs the natural arm"),
            "rows": rows}
