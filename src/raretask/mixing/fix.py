"""Prove the fix on the solvable toy: plan the mixture, then train the small model under the
natural mix (misses the rare task), under the plan (learns it), the bigger model the natural mix
would need, and the plan's frequency delivered evenly versus in bursts.

Arms (every arm x every seed is one instance of one :class:`~raretask.toy.ToyTrainer`: one
optimizer step trains them all; instances with the same seed share basis, start and data):

========== ======= ========================= =============================================
arm        width   task shares               how the rare task arrives
========== ======= ========================= =============================================
natural    small   natural (pi_k ∝ k^-beta)  i.i.d. in every batch
plan       small   planned (min-KL)          i.i.d. in every batch
even       small   planned                   the same count in every batch ("matched", G=1)
burst      small   planned                   withheld, then G batches' worth at once
big        N_nat   natural                   i.i.d.; N_nat = width the natural mix needs
========== ======= ========================= =============================================

The plan comes from :func:`raretask.mixing.plan.make_plan` with Theorem 3 thresholds (the toy's
theory is exact, so no calibration is needed); ``N_nat`` is the plan's "model size the natural mix
would need" with the same margin: the smallest width whose required share, times the margin, is
at most the natural share (margin 1 gives :meth:`raretask.theory.Theory.first_feature_width`).
The rare task's result is its normalised signal s~, averaged over the last ``burst_gap`` steps
from the trace (so a burst arm is not judged right after an injection) and also at the end; the
frequent tasks' result is their mean normalised loss. Compute is ``6 (d + M) N`` FLOPs per
training sample (encoder and one task's decoder, forward and backward) times the samples actually
drawn (injections included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from raretask.config import StrictModel, load_mapping, validate
from raretask.errors import UserError

ARMS = ("natural", "plan", "even", "burst", "big")


class FixToyConfig(StrictModel):
    """``configs/fix_toy.yaml``: the toy setting, the small width, the plan and the training."""

    kind: str = Field("fix_toy", pattern="^fix_toy$", description="Must be 'fix_toy'.")
    name: str = Field("fix_toy", pattern=r"^[A-Za-z0-9_.-]+$", description="Experiment name.")
    tasks: int = Field(16, ge=2, le=1024, description="K tasks, pi_k ∝ k^-beta.")
    features: int = Field(16, ge=1, le=1024, description="M features per task.")
    alpha: float = Field(2.0, ge=0, le=16, description="Spectrum decay j^-alpha.")
    beta: float = Field(1.5, ge=0, le=16, description="Frequency decay.")
    width: int = Field(16, ge=1, description="N of the small model.")
    rare_task: int = Field(-1, description="Target task index (negative: from the end).")
    margin: float = Field(1.5, ge=1, le=100, description="Plan safety factor on the share.")
    big_width: int | None = Field(None, ge=1, description="Width of the big model (default: "
                                  "the width the natural mix needs, from the plan).")
    arms: list[str] = Field(default_factory=lambda: list(ARMS), min_length=1,
                            description=f"Arms to train, any of {', '.join(ARMS)}.")
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    steps: int = Field(4000, ge=1, le=10**8, description="Adam steps.")
    batch_size: int = Field(256, ge=1, le=1 << 20)
    lr: float = Field(3e-3, gt=0, le=10)
    burst_gap: int = Field(400, ge=2, description="G of the burst arm (steps between bursts).")
    learned_threshold: float = Field(0.3, gt=0, lt=1, description="Learned: s~ >= this.")
    trace_every: int = Field(10, ge=1, description="Rare-signal trace period (steps).")

    def resolved_arms(self) -> list[str]:
        for a in self.arms:
            if a not in ARMS:
                raise UserError(f"arms: unknown arm {a!r} (known: {', '.join(ARMS)})")
        return list(dict.fromkeys(self.arms))


def load_fix_config(path: Path | None, overrides: list[str] = ()) -> FixToyConfig:
    data, source = load_mapping(path, overrides)
    cfg = validate(FixToyConfig, data, source)
    cfg.resolved_arms()
    d = cfg.tasks * cfg.features
    for field in ("width", "big_width"):
        v = getattr(cfg, field)
        if v is not None and v > d:
            raise UserError(f"{source}: {field}: {v} exceeds tasks*features = {d}")
    if not -cfg.tasks <= cfg.rare_task < cfg.tasks:
        raise UserError(f"{source}: rare_task: must be in [-{cfg.tasks}, {cfg.tasks})")
    return cfg


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


def fix_toy_plan(cfg: FixToyConfig):
    """(task set, plan) for the config: Theorem 3 thresholds, target = the rare task."""
    from raretask.mixing.plan import make_plan
    from raretask.mixing.thresholds import TheoryThreshold
    from raretask.theory import TaskSet

    ts = TaskSet.power_law(cfg.tasks, cfg.features, cfg.alpha, cfg.beta)
    rare = cfg.rare_task % cfg.tasks
    thr = TheoryThreshold(ts.names, spectra=ts.spectra)
    plan = make_plan(ts.names, ts.frequencies, thr, cfg.width, targets=[ts.names[rare]],
                     margin=cfg.margin)
    return ts, plan


def run_fix_toy(cfg: FixToyConfig, progress=None) -> tuple[object, list[ArmResult]]:
    """Train every arm x seed in one trainer; returns (plan, one result per arm)."""
    import torch

    from raretask.studies.base import eval_steps
    from raretask.theory import Theory
    from raretask.toy import Schedule, ToyInstance, ToyTrainer, TrainSettings

    ts, plan = fix_toy_plan(cfg)
    rare = cfg.rare_task % cfg.tasks
    planned = np.array([t.weight for t in plan.tasks])
    natural = ts.frequencies
    big = cfg.big_width or int(np.ceil(plan.natural_size_needed))
    big = min(big, cfg.tasks * cfg.features)
    frequent = np.zeros(cfg.tasks, dtype=bool)
    frequent[Theory(ts).frequent_tasks()] = True
    lam = np.stack(ts.spectra)
    spec = {
        "natural": (cfg.width, natural, Schedule()),
        "plan": (cfg.width, planned, Schedule()),
        "even": (cfg.width, planned, Schedule("matched", gap=1)),
        "burst": (cfg.width, planned, Schedule("matched", gap=cfg.burst_gap)),
        "big": (big, natural, Schedule()),
    }
    arms = cfg.resolved_arms()
    instances, index = [], []
    for arm in arms:
        width, pi, sched = spec[arm]
        for seed in cfg.seeds:
            instances.append(ToyInstance(width=width, frequencies=pi, eigenvalues=lam, seed=seed,
                                         rare_task=rare, frequent=frequent, schedule=sched))
            index.append(arm)
    settings = TrainSettings(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                             eval_steps=eval_steps(cfg.steps, 8), trace_every=cfg.trace_every,
                             device="cpu")
    trainer = ToyTrainer(instances, settings)
    with torch.no_grad():
        trainer.run(callback=(lambda step: progress(step, cfg.steps)) if progress else None)
    final: dict[tuple[int, int, str], float] = {}
    for r in trainer.metrics():
        if r["step"] == cfg.steps:
            final[(r["instance"], r["task"], r["metric"])] = r["value"]
    traces, tsteps = trainer.traces(), trainer.trace_steps()
    window = tsteps > cfg.steps - cfg.burst_gap
    d, m = cfg.tasks * cfg.features, cfg.features
    results = []
    for arm in arms:
        ids = [i for i, a in enumerate(index) if a == arm]
        width, pi, sched = spec[arm]
        rare_avg = [float(np.mean(traces[window, i])) for i in ids]
        rare_end = [final[(i, rare, "signal_norm")] for i in ids]
        rare_loss = [final[(i, rare, "loss_norm")] for i in ids]
        seen = [sum(final[(i, k, "seen")] for k in range(cfg.tasks)) for i in ids]
        rare_seen = [final[(i, rare, "seen")] for i in ids]
        floss = [float(np.mean([final[(i, k, "loss_norm")] for k in np.flatnonzero(frequent)]))
                 for i in ids]
        learned = [sum(final[(i, k, "signal_norm")] >= cfg.learned_threshold
                       for k in range(cfg.tasks)) for i in ids]
        n_learned = sum(s >= cfg.learned_threshold for s in rare_avg)
        label = {"natural": "iid", "plan": "iid", "big": "iid", "even": "every 1 step",
                 "burst": f"every {cfg.burst_gap} steps"}[arm]
        results.append(ArmResult(
            arm=arm, width=width, schedule=label,
            rare_share=float(np.sum(rare_seen) / np.sum(seen)),
            rare_signal=float(np.mean(rare_avg)), rare_signal_final=float(np.mean(rare_end)),
            rare_learned=f"{n_learned}/{len(ids)}", rare_per_seed=rare_avg,
            rare_loss=float(np.mean(rare_loss)),
            frequent_loss=float(np.mean(floss)), tasks_learned=float(np.mean(learned)),
            samples=float(np.mean(seen)), flops=float(6 * (d + m) * width * np.mean(seen)),
        ))
    return plan, results


def fix_table(results: list[ArmResult], cfg: FixToyConfig, plan):
    from rich import box
    from rich.table import Table

    base = next((r for r in results if r.arm == "natural"), results[0])
    table = Table(title=f"Fix: K = {cfg.tasks}, beta {cfg.beta:g}, rare task "
                  f"{cfg.rare_task % cfg.tasks + 1}, {cfg.steps} steps x {cfg.batch_size}, "
                  f"{len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''}",
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
    table.caption = (
        f"plan: rare share {100 * plan.tasks[cfg.rare_task % cfg.tasks].natural:.2f}% -> "
        f"{100 * plan.tasks[cfg.rare_task % cfg.tasks].weight:.2f}% (needs "
        f"{100 * plan.tasks[cfg.rare_task % cfg.tasks].required:.2f}% x margin {cfg.margin:g}), "
        f"KL {plan.kl:.4f} nats; the natural mix needs width {plan.natural_size_needed:g} "
        f"with the same margin (Theorem 3 minimum {plan.natural_size_minimum:g}). "
        f"arrives: how the rare task reaches the batches; share: its realised share; "
        f"seeds: seeds that learned it; rare s~: normalised signal averaged over the last "
        f"{cfg.burst_gap} steps (learned: "
        f">= {cfg.learned_threshold:g}); frequent loss: mean normalised loss of the frequent "
        "tasks F (change: vs natural); cost: compute, 6 (d + M) N FLOPs per sample "
        f"drawn, relative to natural ({base.flops:.3g} FLOPs)")
    return table


def write_fix(out: Path, cfg: FixToyConfig, plan, results: list[ArmResult]) -> None:
    import yaml

    from raretask.runs import store

    store.write_text(out / "config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    store.write_json(out / "plan.json", plan.to_json())
    store.write_json(out / "results.json", [asdict(r) for r in results])
    store.write_json(out / "fix.json", fix_json(cfg, results))


def fix_json(cfg: FixToyConfig, results: list[ArmResult]) -> dict:
    """The report's ``fix.json`` (:mod:`raretask.report.fix`): one row per arm. For the toy the
    size is the width, ``frequency`` the rare task's share of samples and ``task_loss`` its
    normalised loss at the end (1 = nothing learned)."""
    rows = [{"label": f"{r.arm} ({r.schedule})", "size": f"width {r.width}",
             "frequency": r.rare_share, "steps": cfg.steps, "tokens": None,
             "test_accuracy": None, "task_loss": r.rare_loss,
             "learned": bool(r.rare_signal >= cfg.learned_threshold)} for r in results]
    return {"task": f"toy task {cfg.rare_task % cfg.tasks + 1} of {cfg.tasks}",
            "note": ("toy: frequency = the rare task's share of training samples; task loss = "
                     "its normalised loss; learned = normalised signal >= "
                     f"{cfg.learned_threshold:g} over the last {cfg.burst_gap} steps"),
            "rows": rows}
