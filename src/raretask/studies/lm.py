"""Language models with an injected rare task, as a study plug-in: one group per cell.

A cell's group leaves::

    groups/gNNNN/ckpt/                    the checkpoint while the cell runs (removed after),
                                          one unit (:mod:`raretask.runs.checkpoint_dir`):
        model.safetensors                 weights
        state.pt                          optimizer, data position, counters (weights_only)
        manifest.json                     both files' sizes and sha256; written last
    groups/gNNNN/metrics.parquet          long format: cell, step, task, metric, value
    groups/gNNNN/summary.json             the cell's final row; written last = done

Under ``torchrun`` (:mod:`raretask.runs.distributed`): in the model modes every rank runs the
same cells in the same order, rank 0 alone writes files, and all ranks resume from the same
checkpoint; in ``cells`` mode each rank trains the cells it claims, alone, and writes their files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from raretask.errors import UserError
from raretask.lm.config import LMCell
from raretask.runs import distributed, store
from raretask.studies.base import NUM, OPT_NUM, GroupResult, ShowTable, Study

TASK_ROW_METRICS = ("test_accuracy", "train_accuracy", "task_loss", "task_test_loss",
                    "val_loss", "val_loss_framed", "train_loss", "tokens", "instances", "epochs")
PROBE_METRICS = ("cos_g_gr", "cos_gt_gr", "cos_gnt_gr", "cos_g_gr_between", "order_r2",
                 "fourier_modes", "fourier_modes_embedding")
"""Final probe values in the summary row (None when not measured; trajectories in metrics)."""


def build_trainer(cell: LMCell, profile, stream_world: tuple[int, int] | None = None,
                  fsdp: bool = False):
    """The background, task, schedule and :class:`~raretask.lm.trainer.LMTrainer` of a cell, run
    as ``profile`` (a resolved :class:`~raretask.runs.profile.Profile`) says.

    ``stream_world``: (rank, processes) training this cell together (default: the process
    group's); ``fsdp``: shard the model with FSDP2 rather than DDP when processes > 1.
    """
    from raretask.lm.background import BackgroundConfig
    from raretask.lm.model import ModelConfig
    from raretask.lm.parallel import rank_world
    from raretask.lm.schedule import eval_schedule
    from raretask.lm.tasks import RareTask
    from raretask.lm.trainer import LMTrainer, LMTrainSettings

    rank, world = stream_world or rank_world()
    device = profile.device
    corpus = [] if cell.corpus == "kjv" else [cell.corpus]
    bg = BackgroundConfig(corpus=corpus, vocab_size=cell.vocab_size, text_field=cell.text_field,
                          source=cell.source, eod_id=cell.eod_id).build()
    model_cfg = ModelConfig.preset(cell.size, vocab_size=bg.vocab_size,
                                   max_seq_len=max(cell.seq_len, 8))
    task = schedule = None
    if cell.task != "none":
        task = RareTask(cell.task, vocab_size=bg.vocab_size, eod_id=bg.eod_id, seed=cell.task_seed)
        schedule = cell.injection_schedule()
    if cell.batch_size % world:
        raise UserError(f"batch_size: {cell.batch_size} is not divisible by the {world} "
                        "processes")
    # on an accelerator the sampler runs in a thread beside the host loop that feeds it; on a
    # CPU it would only compete with training for cores (the numbers are the same either way)
    stream = bg.stream(cell.batch_size // world, cell.seq_len, seed=cell.seed, rank=rank,
                       world_size=world, prefetch=torch.device(device).type != "cpu")
    val_tokens = 4 * cell.batch_size * cell.seq_len

    def val_batches():
        return bg.validation_batches(cell.seq_len, cell.batch_size, max_tokens=val_tokens)

    settings = LMTrainSettings(
        steps=cell.steps, batch_size=cell.batch_size, seq_len=cell.seq_len, lr=cell.lr,
        warmup=min(cell.warmup, max(cell.steps // 10, 1)),
        eval_steps=eval_schedule(cell), weight_decay=cell.weight_decay,
        device=device, compile=profile.compile, compile_mode=profile.compile_mode,
        seed=cell.seed, fsdp=fsdp, deterministic=profile.deterministic,
        attention=profile.attention, probes=cell.probes, probe_k=cell.probe_k,
    )
    trainer = LMTrainer(model_cfg, stream, val_batches, task, schedule, settings,
                        world=(rank, world))
    trainer.background, trainer.model_config = bg, model_cfg  # for the summary row
    return trainer


CHECKPOINT_WEIGHTS, CHECKPOINT_STATE = "model.safetensors", "state.pt"
"""A cell's checkpoint files (in ``ckpt/``, :mod:`raretask.runs.checkpoint_dir`)."""


def checkpoint_files(state: dict) -> dict[str, bytes]:
    """A trainer's :meth:`~raretask.lm.trainer.LMTrainer.state_dict` as the checkpoint's files:
    the weights as safetensors, the rest (optimizer, data position, counters, metrics) through
    ``torch.save``, read back with ``weights_only=True``."""
    from safetensors.torch import save

    state = dict(state)
    weights = save(state.pop("model"))
    buf = io.BytesIO()
    torch.save(state, buf)
    return {CHECKPOINT_WEIGHTS: weights, CHECKPOINT_STATE: buf.getvalue()}


def state_from_files(files: dict[str, bytes], where: Path) -> dict:
    """:func:`checkpoint_files` read back: weights through safetensors, the rest through
    ``torch.load(weights_only=True)`` (no code in the files runs); a damaged or foreign payload
    is a UserError naming ``where``."""
    from safetensors.torch import load

    try:
        payload = io.BytesIO(files[CHECKPOINT_STATE])
        state = torch.load(payload, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError("not a dict")
        state["model"] = load(files[CHECKPOINT_WEIGHTS])
    except Exception as err:  # pickle refusals, missing entries, safetensors header errors
        raise UserError(f"{where}: unreadable checkpoint ({type(err).__name__}); delete it to "
                        "restart the cell from step 0") from None
    return state


def load_checkpoint(weights: Path, state_path: Path) -> dict:
    """A checkpoint's two files read from wherever they lie (benchmarks/lm_multi_gpu.py);
    see :func:`state_from_files`."""
    try:
        files = {CHECKPOINT_WEIGHTS: weights.read_bytes(),
                 CHECKPOINT_STATE: state_path.read_bytes()}
    except OSError as err:
        raise store.io_error(err.filename or state_path, err, "cannot read") from None
    return state_from_files(files, state_path.parent)


def save_state(path: Path, state: dict) -> None:
    """Non-weight state through torch.save, read back with ``weights_only=True``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    store.write_bytes(path, buf.getvalue())


def summary_row(cell_id: int, group_name: str, cell: LMCell, trainer) -> dict:
    """The cell's final row: only what the run determines (no wall-clock time, which is in the
    log), so a resumed run's row equals an uninterrupted one's."""
    from raretask.lm.trainer import chance_levels

    last = {}
    for r in trainer.metrics():
        if r["step"] == trainer.step:
            last[r["metric"]] = r["value"]
    tokens = trainer.step * cell.batch_size * cell.seq_len
    chance = chance_levels(trainer.task) if trainer.task is not None else {}
    model_cfg = trainer.model_config
    return {
        "cell": cell_id, "group": group_name, "kind": "lm", "arm": cell.arm,
        "size": cell.size, "params": model_cfg.num_params(include_embedding=False),
        "params_total": model_cfg.num_params(include_embedding=True),
        "task": cell.task, "schedule": cell.schedule_label,
        "frequency": trainer.injected / tokens if tokens else 0.0,
        "requested_frequency": cell.requested_rate,
        "seed": cell.seed, "steps": trainer.step, "diverged_step": trainer.diverged_step,
        **{m: last.get(m) for m in TASK_ROW_METRICS},
        "instances": trainer.injected, "tokens": tokens,  # exact counts, not float metrics
        **{m: last.get(m) for m in PROBE_METRICS},
        **{k: chance.get(k) for k in ("chance_format", "chance_copy", "chance_symbol")},
        **trainer.data.summary(), "corpus": trainer.background.corpus_name,
    }


class LMStudy(Study):
    kind = "lm"
    label = "LM"
    legacy_checkpoint = ("model.safetensors", "state.pt")
    group_field = "profile.stack_seeds"
    row_schema = {
        "cell": int, "kind": str, "size": str, "params": int, "task": str, "schedule": str,
        "seed": int, "steps": int, "frequency": NUM, "test_accuracy": OPT_NUM,
        "train_accuracy": OPT_NUM, "task_loss": OPT_NUM, "task_test_loss": OPT_NUM,
        "val_loss": OPT_NUM, "epochs": OPT_NUM}

    @property
    def grid_class(self):
        from raretask.lm.config import LMGrid

        return LMGrid

    def check(self, cells, profile, ranks) -> None:
        from raretask.lm.trainer import check_attention
        from raretask.mixing.fix_lm import check_arms

        check_arms(cells)  # a fix grid's plan, before anything is written
        try:  # before anything is written
            check_attention(profile.attention, ranks.device)
        except ValueError as err:
            raise UserError(f"profile.{err}") from None
        if not ranks.data_parallel:
            return
        for i, cell in enumerate(cells):
            if cell.batch_size % ranks.world:
                raise UserError(f"batch_size: {cell.batch_size} (cell {i}) is not divisible by "
                                f"the {ranks.world} processes that train each model together "
                                "(--parallel model); change batch_size or use --parallel cells")

    def parallel_mode(self, parallel, world, cells, device) -> str:
        """``auto``: ``cells`` with at least as many cells as processes and no preset of 1b or
        up, ``model`` otherwise; ``model``: FSDP2 for presets of 1b and up on CUDA, DDP else."""
        big = bool({c.size for c in cells} & set(distributed.FSDP_PRESETS))
        if parallel == "auto":
            parallel = "cells" if len(cells) >= world and not big else "model"
        if parallel == "model":
            return "fsdp" if big and device.startswith("cuda") else "ddp"
        return parallel

    def build(self, cells, profile, ranks):
        from raretask.mixing.fix_lm import resolve_arm

        cell = resolve_arm(cells[0])  # a fix arm trains an ordinary cell
        return build_trainer(cell, profile, ranks.data_world, fsdp=ranks.mode == "fsdp")

    def stack_key(self, cell):
        """Cells that differ only in the seed (the same arm resolved alike)."""
        return json.dumps(cell.model_dump(exclude={"seed"}), sort_keys=True, default=str)

    def build_stack(self, cells, profile, ranks):
        """:class:`~raretask.lm.stacked.StackedLMTrainer` over one trainer per group, each built
        as alone but uncompiled (the stack compiles its own step)."""
        from raretask.lm.stacked import StackedLMTrainer
        from raretask.mixing.fix_lm import resolve_arm

        plain = profile.model_copy(update={"compile": False})
        members = [build_trainer(resolve_arm(group[0]), plain, (0, 1)) for group in cells]
        return StackedLMTrainer(members, profile.compile, profile.compile_mode)

    def checkpoint_payload(self, state) -> dict[str, bytes]:
        return checkpoint_files(state)

    def restore(self, trainer, files, where) -> None:
        trainer.load_state_dict(state_from_files(files, where))

    # read_legacy_checkpoint: refused. Its two files were written one after the other, so a kill
    # between them left new weights beside an old optimizer and step, which nothing can detect.

    def final_tensors(self, cells, trainer) -> dict[str, dict]:
        """``save_model``: the final weights, for ``raretask export-hf``."""
        from raretask.lm.export_hf import FINAL_WEIGHTS

        if not cells[0].save_model:
            return {}
        return {FINAL_WEIGHTS: trainer.state_dict()["model"]}  # collective under FSDP2

    def results(self, group, cells, trainer, seconds, start_step) -> GroupResult:
        from raretask.mixing.fix_lm import resolve_arm

        (arm_cell,) = cells
        cell = resolve_arm(arm_cell)
        (cell_id,) = group.cell_ids
        metrics = [{"cell": cell_id, "step": r["step"], "task": 0, "metric": r["metric"],
                    "value": r["value"]} for r in trainer.metrics()]
        tps = (trainer.step - start_step) * cell.batch_size * cell.seq_len / max(seconds, 1e-9)
        t = trainer.timing  # where the seconds went (report.lm_cost reads this line)
        stacked = getattr(trainer, "stacked", 1)  # seconds, warm-up, evaluations: the stack's
        log = [f"{group.name}: {cell.size} {cell.task} steps {start_step}->{trainer.step}"
               f" in {seconds:.1f}s ({tps:,.0f} tokens/s); first {t['warmup_steps']} steps"
               f" {t['warmup_s']:.1f}s, {t['evals']} evaluations {t['eval_s']:.1f}s"
               + (f"; {stacked} seeds stacked" if stacked > 1 else "")]
        if trainer.diverged_step is not None:
            log.append(f"{group.name}: cell {cell_id} diverged at step {trainer.diverged_step} "
                       "(non-finite or exploded loss); stopped there")
        row = summary_row(cell_id, group.name, cell, trainer) | {"arm": arm_cell.arm}
        return GroupResult({"metrics": metrics}, [row], log)

    def table(self, rows, title, all_rows=False, cells=None) -> ShowTable:
        from raretask.lm.verdict import FORMAT_NOT_LEARNED, lm_verdict
        from raretask.report.analysis import format_cell
        from raretask.report.lm_seeds import other_fields, other_text

        # rows that differ only in the seed, or in a field the table has no column for
        # (weight decay, a variant's steps), would look alike: name it
        seeds = len({r.get("seed") for r in rows}) > 1
        others = other_fields(rows, cells or {})
        also = any(others.values())
        # epochs matter where real text was recycled; an n-gram source repeats nothing
        epochs = any(r.get("repeats") for r in rows)
        cols = ["cell", "size", "params", "task", "freq/tok", "schedule", "seed", "also", "acc",
                "task L", "val L", "epochs"]
        shown = [c for c in cols if {"seed": seeds, "also": also, "epochs": epochs}.get(c, True)]
        body = []
        for r in rows:
            acc = r.get("test_accuracy")
            acc_text = "-" if acc is None else f"{acc:.3f}"
            if r.get("diverged_step") is not None:
                acc_text = f"div@{r['diverged_step']}"
            # the mark on the task keeps the acc column a plain number and 80 columns enough
            task = r["task"] + "*" * (lm_verdict(r) == FORMAT_NOT_LEARNED)
            values = dict(zip(cols, [
                str(r["cell"]), r["size"], f"{r['params'] / 1e6:.2f}M", task,
                f"{r['frequency']:.2e}", r["schedule"], str(r.get("seed", "")),
                other_text(others[r["cell"]], short=True), acc_text,
                format_cell(r.get("task_loss")), format_cell(r.get("val_loss")),
                f"{r.get('epochs', 0):.2f}"], strict=True))
            body.append([values[c] for c in shown])
        return ShowTable(
            f"{title}: language models with an injected task", shown, body,
            "acc: test accuracy, argmax over the vocabulary at LABEL, held-out 5K instances"
            + ("; task*: format not learned (accuracy below the format-only chance)"
               if any(b[3].endswith("*") for b in body) else "")
            + ("; also: what else sets the row apart (wd: weight decay, B: batch size, T: "
               "sequence length)" if also else "")
            + "; task L: loss at LABEL on the training instances; val L: background validation "
            "loss" + ("; epochs: background tokens / the corpus' training tokens (real text "
                      "recycled)" if epochs else ""), wrap=("also",))

    def report_sections(self, runs):
        from raretask.report.build import lm_sections

        return lm_sections(runs)

    def fix_outputs(self, out):
        from raretask.mixing.fix_lm import lm_fix_outputs

        return lm_fix_outputs(out)

    # -- calibration --------------------------------------------------------------------------
    curve_keys = ("task", "schedule")

    def cell_size(self, row):
        return float(row["params"])

    def resolve_size(self, text):
        """A parameter count, or a preset's non-embedding parameters (looked up at run time,
        so new presets work)."""
        from raretask.lm.model import PRESETS, ModelConfig

        try:
            return float(text)
        except ValueError:
            if text not in PRESETS:
                raise UserError(f"--size: unknown size {text!r} (presets: {', '.join(PRESETS)};"
                                " or a parameter count)") from None
            return float(ModelConfig.preset(text).num_params(include_embedding=False))

    def learned_row(self, row, learned_accuracy):
        return (row.get("test_accuracy") or 0.0) >= learned_accuracy

    def observations(self, rows, run_dir, learned_accuracy):
        from raretask.mixing.learnability import lm_observations

        return lm_observations(rows, str(run_dir), learned_accuracy)

    def calibration_units(self, learned_accuracy):
        from raretask.lm.tasks import INSTANCE_LEN

        return ({"size": "non-embedding parameters", "budget": "training tokens",
                 "frequency": "instances per token", "tokens_per_instance": INSTANCE_LEN},
                f"test accuracy >= {learned_accuracy:g}")


STUDY = LMStudy()
