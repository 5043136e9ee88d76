"""The solvable toy as a study plug-in: cells, groups on the instance axis, rows with Theorem 3.

Cells that share the shape of their training (task count, features, steps, batch, lr, eval
schedule, basis) are packed into groups of at most ``profile.group_size`` models, one optimizer
step training them all (the instance axis). A group leaves::

    groups/gNNNN/ckpt/                    trainer state while the group runs (removed after):
                                          state.safetensors + manifest.json, one unit
    groups/gNNNN/metrics.parquet          long format: cell, step, task, metric, value
    groups/gNNNN/traces.parquet           cell, step, rare_signal (when trace_every > 0)
    groups/gNNNN/summary.json             final per-cell, per-task rows; written last = done

A cell whose training diverges (NaN/Inf, or a loss past
:data:`raretask.toy.trainer.DIVERGE_FACTOR` times the mean predictor's, checked at eval steps) is
reset to the model that learned nothing and frozen there while its group-mates train on
unaffected; its summary rows carry ``diverged_step`` (None for every other cell) and report that
model: signal 0, loss 1, features 0, no task learned. The log names it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raretask.config import ToyCell
from raretask.errors import UserError
from raretask.runs import store
from raretask.studies.base import NUM, OPT_NUM, Group, GroupResult, ShowTable, Study, eval_steps
from raretask.theory import TaskSet, Theory

SHAPE_FIELDS = ("tasks", "features", "steps", "batch_size", "lr", "eval_points", "trace_every",
                "basis")
"""Cells must agree on these to train in one optimizer step."""


def plan_groups(cells: list[ToyCell], group_size: int) -> list[Group]:
    """Pack cells with the same training shape into groups, in config order."""
    by_shape: dict[tuple, list[int]] = {}
    for i, c in enumerate(cells):
        by_shape.setdefault(tuple(getattr(c, f) for f in SHAPE_FIELDS), []).append(i)
    groups = []
    for ids in by_shape.values():
        for start in range(0, len(ids), group_size):
            groups.append(Group(f"g{len(groups):04d}", tuple(ids[start:start + group_size])))
    return groups


def task_set(cell: ToyCell) -> TaskSet:
    """The cell's natural mix: pi_k ∝ k^-beta, spectra j^-alpha."""
    return TaskSet.power_law(cell.tasks, cell.features, alpha=cell.alpha, beta=cell.beta)


def trained_setting(cell: ToyCell):
    """(width, task priors, rare-task schedule) the cell trains with: its own fields, or what
    its fix arm sets (:func:`raretask.mixing.fix.arm_setting`)."""
    if cell.arm is None:
        return cell.width, with_rate(task_set(cell).frequencies, cell), cell.delivery_schedule()
    from raretask.mixing.fix import arm_setting

    return arm_setting(cell)


def with_rate(priors: np.ndarray, cell: ToyCell) -> np.ndarray:
    """The priors with the rare task at ``cell.rate`` and the others in their proportions (the
    minimum-KL mix with that share); unchanged when ``rate`` is None."""
    if cell.rate is None:
        return priors
    r = cell.rare_index
    out = priors * (1 - cell.rate) / (priors.sum() - priors[r])
    out[r] = cell.rate
    return out


def delivery_label(cell: ToyCell) -> tuple[str, int]:
    """(delivery, period) for the rows: the cell's own, or what its fix arm delivers."""
    if cell.arm is None:
        return cell.delivery_label
    return {"even": ("even", 1), "burst": ("burst", cell.every)}.get(cell.arm, ("iid", 0))


def build_instances(cells: list[ToyCell]):
    """The trainer's :class:`~raretask.toy.spec.ToyInstance` of each cell, in order."""
    from raretask.toy.spec import ToyInstance

    out = []
    for c in cells:
        ts = task_set(c)
        frequent = np.zeros(c.tasks, dtype=bool)  # F of the natural mix, whatever the arm
        frequent[Theory(ts, c.frequent_mass).frequent_tasks()] = True
        width, priors, schedule = trained_setting(c)
        out.append(ToyInstance(
            width=width, frequencies=priors, eigenvalues=np.stack(ts.spectra), seed=c.seed,
            rare_task=c.rare_index, frequent=frequent, schedule=schedule,
        ))
    return out


def build_settings(cell: ToyCell, profile):
    """The :class:`~raretask.toy.spec.TrainSettings` of a group led by ``cell``, run as
    ``profile`` (a resolved :class:`~raretask.runs.profile.Profile`) says."""
    from raretask.toy.spec import TrainSettings

    cuda = profile.cuda
    return TrainSettings(
        steps=cell.steps, batch_size=cell.batch_size, lr=cell.lr,
        eval_steps=eval_steps(cell.steps, cell.eval_points),
        trace_every=cell.trace_every, basis=cell.basis, device=profile.device,
        retraction=profile.retraction, tf32=profile.tf32 and cuda,
        cuda_graph=profile.cuda_graph, fuse=profile.fuse,
        share_inputs=profile.share_inputs and cuda,  # CPU: exact per instance
        group_streams=profile.group_streams and cuda, pad_width=profile.pad_width,
    )


def summary_rows(group: Group, cells: list[ToyCell], rows: list[dict],
                 diverged: dict[int, int] | None = None) -> list[dict]:
    """Final per-cell, per-task rows, compared with Theorem 3 (diverged cells: module doc).

    ``cells`` are the group's cells in ``group.cell_ids`` order; ``rows`` their metrics."""
    diverged = diverged or {}
    last: dict[tuple[int, int, str], float] = {}
    final_step: dict[int, int] = {}
    for r in rows:
        final_step[r["cell"]] = max(final_step.get(r["cell"], 0), r["step"])
    for r in rows:
        if r["step"] == final_step[r["cell"]]:
            last[(r["cell"], r["task"], r["metric"])] = r["value"]
    out = []
    for i, c in zip(group.cell_ids, cells, strict=True):
        width, priors, _ = trained_setting(c)
        delivered, period = delivery_label(c)
        ts = task_set(c)
        if c.arm is not None or c.rate is not None:  # the mix it trains on, for Theorem 3
            ts = TaskSet(ts.names, priors / priors.sum(), ts.spectra)
        kept = Theory(ts, c.frequent_mass).features_kept(width)
        # the model-level loss (sum_k pi_k loss_k, unnormalised) as model_loss: "loss" is the
        # task's normalised loss
        model = {m: last.get((i, -1, m)) for m in
                 ("residual_F", "grad_norm_frequent", "grad_norm_rare", "grad_cosine")}
        model["model_loss"] = last.get((i, -1, "loss"))
        div = diverged.get(i)
        if div is not None:  # summary.json stays strict JSON: no NaN from the frozen model
            model = {m: (v if v is not None and np.isfinite(v) else None)
                     for m, v in model.items()}
        for k in range(c.tasks):
            signal = last[(i, k, "signal_norm")] if div is None else 0.0
            learned = bool(signal >= c.learned_threshold)
            predicted = bool(kept[k] >= 1)
            out.append({
                "cell": i, "group": group.name, "tasks": c.tasks,
                "features_per_task": c.features, "frequent_mass": c.frequent_mass,
                "width": width, "beta": c.beta, "alpha": c.alpha, "seed": c.seed,
                "schedule": delivered, "gap": period, "arm": c.arm,
                "task": k + 1, "frequency": float(ts.frequencies[k]),
                "signal": float(signal),
                "loss": float(last[(i, k, "loss_norm")]) if div is None else 1.0,
                "features": float(last[(i, k, "features")]) if div is None else 0.0,
                "predicted_features": int(kept[k]),
                "learned": learned, "predicted_learned": predicted,
                "agree": learned == predicted, "rare": k == c.rare_index,
                "step": final_step[i], **model, "diverged_step": div,
            })
    return out


CHECKPOINT_STATE = "state.safetensors"
"""The trainer's whole state (:meth:`ToyTrainer.state_dict`) in a group's ``ckpt/``."""
LEGACY_CHECKPOINT = "checkpoint.safetensors"
"""A group's checkpoint before checkpoints were directories (read for compatibility)."""


def _load_state(trainer, data: bytes | None, path: Path, delete: Path) -> None:
    """``trainer.load_state_dict`` from safetensors bytes (tensors only: nothing in the file
    runs); bytes that are not the trainer's state are a UserError naming ``path``."""
    from safetensors.torch import load

    try:
        if data is None:
            raise KeyError(path.name)
        trainer.load_state_dict(load(data))
    except UserError:
        raise
    except Exception as err:  # a file damaged or made outside raretask
        raise UserError(f"{path}: unreadable checkpoint ({type(err).__name__}); delete "
                        f"{'it' if delete == path else delete} to restart group "
                        f"{delete.parent.name} from step 0") from None


class ToyStudy(Study):
    kind = "toy"
    label = "toy"
    legacy_checkpoint = (LEGACY_CHECKPOINT,)
    row_schema = {
        "cell": int, "task": int, "tasks": int, "features_per_task": int, "width": int,
        "seed": int, "gap": int, "schedule": str, "group": str, "beta": NUM, "alpha": NUM,
        "frequent_mass": NUM, "frequency": NUM, "signal": NUM, "loss": NUM, "features": NUM,
        "learned": bool, "predicted_learned": bool, "agree": bool, "rare": bool,
        "residual_F": OPT_NUM, "grad_norm_frequent": OPT_NUM, "grad_norm_rare": OPT_NUM,
        "grad_cosine": OPT_NUM}

    @property
    def grid_class(self):
        from raretask.config import ToyGrid

        return ToyGrid

    def plan(self, cells, profile):
        return plan_groups(cells, profile.group_size)

    def build(self, cells, profile, ranks):
        from raretask.toy.trainer import ToyTrainer

        return ToyTrainer(build_instances(cells), build_settings(cells[0], profile))

    def checkpoint_payload(self, state) -> dict[str, bytes]:
        from safetensors.torch import save

        return {CHECKPOINT_STATE: save(state)}  # flat tensors: all of it

    def restore(self, trainer, files: dict[str, bytes], where: Path) -> None:
        _load_state(trainer, files.get(CHECKPOINT_STATE), where / CHECKPOINT_STATE, where)

    def read_legacy_checkpoint(self, gdir: Path, trainer) -> None:
        """A ``checkpoint.safetensors`` from before checkpoint directories is read once: it was
        one file renamed into place, so it is whole (it has no hash to check)."""
        path = gdir / LEGACY_CHECKPOINT
        try:
            data = path.read_bytes()
        except OSError as err:
            raise store.io_error(path, err, "cannot read") from None
        _load_state(trainer, data, path, path)

    def results(self, group, cells, trainer, seconds, start_step) -> GroupResult:
        ids = group.cell_ids
        diverged = {ids[j]: s for j, s in trainer.diverged().items()}
        log = [f"{group.name}: cell {cell} diverged at step {step} (NaN/Inf or exploding loss); "
               "its rows report the reset model, marked diverged_step"
               for cell, step in sorted(diverged.items())]
        steps = trainer.settings.steps
        rate = (steps - start_step) / max(seconds, 1e-9)
        log.append(f"{group.name}: {len(ids)} cells, steps {start_step}->{steps} in "
                   f"{seconds:.1f}s ({rate:.0f} steps/s)")
        metrics = [{"cell": ids[r["instance"]], "step": r["step"], "task": r["task"],
                    "metric": r["metric"], "value": r["value"]} for r in trainer.metrics()]
        tables = {"metrics": metrics}
        traces = trainer.traces()
        if traces.size:
            tsteps = trainer.trace_steps()
            tables["traces"] = [{"cell": ids[j], "step": int(s), "rare_signal": float(traces[t, j])}
                                for j in range(len(ids)) for t, s in enumerate(tsteps)]
        return GroupResult(tables, summary_rows(group, cells, metrics, diverged), log)

    def check_rows(self, rows, source) -> None:
        super().check_rows(rows, source)
        rare: dict[int, int] = {}
        for r in rows:
            rare[r["cell"]] = rare.get(r["cell"], 0) + r["rare"]
        bad = [c for c, n in rare.items() if n != 1]
        if bad:
            raise UserError(f"{source}: cell {bad[0]}: expected exactly one row with rare: true")

    def sort_key(self, row):
        return (row["cell"], row["task"] if type(row.get("task")) is int else 0)

    def table(self, rows, title, all_rows=False, cells=None) -> ShowTable:
        from raretask.report.analysis import cell_digest, format_cell, overall_agreement

        if all_rows:
            cols = ["cell", "width", "beta", "alpha", "seed", "task", "frequency", "signal",
                    "loss", "learned", "predicted_learned"]
            return ShowTable(f"{title}: final metrics per cell and task", cols,
                             [[format_cell(r[c]) for c in cols] for r in rows])
        body = [[str(d.cell), str(d.width), format_cell(d.beta), format_cell(d.alpha),
                 str(d.seed), d.schedule, f"{d.learned}/{d.predicted}",
                 f"{100 * d.agreement:.0f}%",
                 f"{d.rare_signal:+.3f}" if d.diverged is None else f"diverged@{d.diverged}",
                 format_cell(d.rare_predicted)] for d in cell_digest(rows)]
        n_div = len({r["cell"] for r in rows if r.get("diverged_step") is not None})
        caption = (f"learned: tasks learned / predicted; thm: rare task predicted learned. "
                   f"Agreement over all (cell, task) pairs: {100 * overall_agreement(rows):.1f}%."
                   " --all: every task; --json: rows"
                   + (f". {n_div} cell{'s' * (n_div > 1)} diverged (diverged@step: NaN/Inf or "
                      "exploding loss; counted as learning nothing)" if n_div else ""))
        return ShowTable(f"{title}: tasks learned (s~ >= threshold) vs Theorem 3",
                         ["cell", "N", "beta", "alpha", "seed", "schedule", "learned", "agree",
                          "rare s~", "thm"], body, caption)

    def report_sections(self, runs):
        from raretask.report.build import toy_sections

        return toy_sections(runs)

    def fix_outputs(self, out):
        from raretask.mixing.fix import toy_fix_outputs

        return toy_fix_outputs(out)

    # -- calibration --------------------------------------------------------------------------
    curve_keys = ("tasks", "features_per_task", "alpha", "beta", "frequent_mass", "schedule",
                  "gap")  # "schedule"/"gap": the rows' names of delivery/every

    def cell_size(self, row):
        return float(row["width"])

    def resolve_size(self, text):
        try:
            return float(text)
        except ValueError:
            raise UserError(f"--size: a toy calibration's size is a width N, got {text!r}") \
                from None

    def learned_row(self, row, learned_accuracy):
        return bool(row["learned"])

    def theory_verdicts(self, rows, size):
        r = rows[0]
        ts = TaskSet.power_law(r["tasks"], r["features_per_task"], r["alpha"], r["beta"])
        th = Theory(ts, r["frequent_mass"])
        learned = th.learned(int(size))
        return (th.required_frequency(ts.size - 1, int(size)),
                np.array([learned[x["task"] - 1] for x in rows]))

    def observations(self, rows, run_dir, learned_accuracy):
        from raretask.config import load_yaml
        from raretask.mixing.learnability import toy_observations

        cfg = load_yaml(Path(run_dir) / "config.yaml")
        steps, batch = cfg["steps"], cfg["batch_size"]
        if not all(isinstance(v, int) and v > 0 for v in (steps, batch)):
            raise UserError(f"{run_dir}/config.yaml: steps and batch_size must be integers > 0")
        return toy_observations(rows, str(run_dir), float(steps * batch))

    def calibration_units(self, learned_accuracy):
        return ({"size": "width N", "budget": "training samples (steps x batch)",
                 "frequency": "share of samples", "tokens_per_instance": None},
                "normalised signal >= the grid's learned_threshold")

    def theory_check(self, laws, rows, excluded):
        from raretask.mixing.calibrate import calibrate_rows
        from raretask.mixing.learnability import toy_family, toy_theory_check

        theory, warnings = [], []
        for law in laws:
            family = [r for r in rows if str(r["width"]) not in excluded
                      and toy_family(r) == law.task]
            t, notes = toy_theory_check(law, calibrate_rows(family)[1])
            theory.append(t)
            warnings += notes
        return theory, warnings


STUDY = ToyStudy()
