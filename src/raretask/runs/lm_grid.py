"""Run a language-model grid into a directory: one group per cell, checkpointed, resumable.

Layout (as the toy grid, :mod:`raretask.runs.grid`)::

    DIR/groups/gNNNN/model.safetensors        weights while the cell runs (removed after)
    DIR/groups/gNNNN/state.pt                 optimizer, data position, counters (weights_only)
    DIR/groups/gNNNN/metrics.parquet          long format: cell, step, task, metric, value
    DIR/groups/gNNNN/summary.json             the cell's final row; written last = done

Under ``torchrun`` (:mod:`raretask.runs.distributed`): in the model modes every rank runs the
same cells in the same order, rank 0 alone writes files, and all ranks resume from the same
checkpoint; in ``cells`` mode each rank trains the cells it claims, alone, and writes their files.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from raretask.errors import UserError
from raretask.lm.config import LMCell
from raretask.runs import distributed, store
from raretask.runs.distributed import Ranks
from raretask.runs.grid import GridRun, Group, Progress

TASK_ROW_METRICS = ("test_accuracy", "train_accuracy", "task_loss", "task_test_loss",
                    "val_loss", "train_loss", "tokens", "instances", "epochs")
PROBE_METRICS = ("cos_g_gr", "cos_gt_gr", "cos_gnt_gr", "order_r2", "fourier_modes")
"""Final probe values in the summary row (None when not measured; trajectories in metrics)."""


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_trainer(cell: LMCell, device: str, stream_world: tuple[int, int] | None = None,
                  fsdp: bool = False):
    """The background, task, schedule and :class:`~raretask.lm.trainer.LMTrainer` of a cell.

    ``stream_world``: (rank, processes) training this cell together (default: the process
    group's); ``fsdp``: shard the model with FSDP2 rather than DDP when processes > 1.
    """
    from raretask.lm.background import BackgroundConfig
    from raretask.lm.model import ModelConfig
    from raretask.lm.schedule import eval_schedule
    from raretask.lm.tasks import Frequency, InjectionSchedule, RareTask
    from raretask.lm.trainer import LMTrainer, LMTrainSettings

    rank, world = stream_world or _rank_world()
    corpus = [] if cell.corpus == "kjv" else [cell.corpus]
    bg = BackgroundConfig(corpus=corpus, vocab_size=cell.vocab_size, text_field=cell.text_field,
                          source=cell.source, eod_id=cell.eod_id).build()
    model_cfg = ModelConfig.preset(cell.size, vocab_size=bg.vocab_size,
                                   max_seq_len=max(cell.seq_len, 8))
    task = schedule = None
    if cell.task != "none":
        task = RareTask(cell.task, vocab_size=bg.vocab_size, eod_id=bg.eod_id, seed=cell.task_seed)
        if cell.frequency is not None and cell.every == 1:
            schedule = Frequency(cell.frequency).schedule(cell.batch_size, cell.seq_len)
        else:  # `instances`, or a frequency delivered every `every` steps (same rate)
            schedule = InjectionSchedule(cell.injection_size, cell.every, cell.mode)
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
        device=device, compile=cell.compile, compile_mode=cell.compile_mode, seed=cell.seed,
        fsdp=fsdp, deterministic=cell.deterministic, attention=cell.attention,
        probes=cell.probes, probe_k=cell.probe_k,
    )
    trainer = LMTrainer(model_cfg, stream, val_batches, task, schedule, settings,
                        world=(rank, world))
    return trainer, bg, model_cfg


class LMGridRun(GridRun):
    """A grid of language-model runs, one cell at a time."""

    CHECKPOINT_FILES = ("model.safetensors", "state.pt")

    def _check_parallel(self, ranks: Ranks) -> None:
        from raretask.lm.trainer import check_attention

        for i, cell in enumerate(self.cells):  # before anything is written
            try:
                check_attention(cell.attention, ranks.device)
            except ValueError as err:
                raise UserError(f"cell {i}: {err}") from None
        if not ranks.data_parallel:
            return
        for i, cell in enumerate(self.cells):
            if cell.batch_size % ranks.world:
                raise UserError(f"batch_size: {cell.batch_size} (cell {i}) is not divisible by "
                                f"the {ranks.world} processes that train each model together "
                                "(--parallel model); change batch_size or use --parallel cells")

    def _run_group(self, group: Group, device: str, progress: Progress | None) -> None:
        (cell_id,) = group.cell_ids
        cell: LMCell = self.cells[cell_id]
        ranks = self.ranks
        writes = ranks.writes
        trainer, bg, model_cfg = build_trainer(cell, device, ranks.data_world,
                                               fsdp=ranks.mode == "fsdp")
        gdir = self._group_dir(group)
        weights, state_path = gdir / "model.safetensors", gdir / "state.pt"
        if weights.exists() and state_path.exists():
            trainer.load_state_dict(load_checkpoint(weights, state_path))
            if writes:
                self._log(f"{group.name}: resumed from step {trainer.step}")
        started = time.perf_counter()
        last_save = started
        start_step = trainer.step

        def on_eval(step: int) -> None:
            nonlocal last_save
            now = time.perf_counter()
            due = now - last_save >= self.checkpoint_seconds and 0 < step < cell.steps
            if ranks.data_parallel:  # rank 0's clock decides: FSDP2 gathers the state collectively
                due = distributed.broadcast(due)
            if due:
                state = trainer.state_dict()
                if writes:
                    store.write_safetensors(weights, state.pop("model"))
                    _save_state(state_path, state)
                last_save = now
            if progress:
                progress({"event": "step", "group": group.name, "step": step,
                          "steps": cell.steps, "cells": 1})

        trainer.run(callback=on_eval)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        if writes:
            self._write_cell(group, cell, trainer, bg, model_cfg, seconds)
            weights.unlink(missing_ok=True)
            state_path.unlink(missing_ok=True)
            tps = (trainer.step - start_step) * cell.batch_size * cell.seq_len / max(seconds, 1e-9)
            self._log(f"{group.name}: {cell.size} {cell.task} steps {start_step}->{trainer.step}"
                      f" in {seconds:.1f}s ({tps:,.0f} tokens/s)")
            if trainer.diverged_step is not None:
                self._log(f"{group.name}: cell {group.cell_ids[0]} diverged at step "
                          f"{trainer.diverged_step} (non-finite or exploded loss); stopped there")
        if ranks.data_parallel:  # nobody starts the next cell before this one is on disk
            distributed.barrier()

    def _write_cell(self, group, cell: LMCell, trainer, bg, model_cfg, seconds: float) -> None:
        """metrics.parquet, then summary.json (last: it marks the cell done).

        The row holds only what the run determines (no wall-clock time, which is in the log),
        so a resumed run's row equals an uninterrupted one's.
        """
        from raretask.lm.trainer import chance_levels

        gdir = self._group_dir(group)
        rows = [{"cell": group.cell_ids[0], "step": r["step"], "task": 0, "metric": r["metric"],
                 "value": r["value"]} for r in trainer.metrics()]
        store.write_parquet(gdir / "metrics.parquet", rows)
        last = {}
        for r in trainer.metrics():
            if r["step"] == trainer.step:
                last[r["metric"]] = r["value"]
        tokens = trainer.step * cell.batch_size * cell.seq_len
        chance = chance_levels(trainer.task) if trainer.task is not None else {}
        summary = {
            "cell": group.cell_ids[0], "group": group.name, "kind": "lm",
            "size": cell.size, "params": model_cfg.num_params(include_embedding=False),
            "params_total": model_cfg.num_params(include_embedding=True),
            "task": cell.task, "schedule": cell.schedule_label,
            "frequency": trainer.injected / tokens if tokens else 0.0,
            "requested_frequency": cell.frequency,
            "seed": cell.seed, "steps": trainer.step, "diverged_step": trainer.diverged_step,
            **{m: last.get(m) for m in TASK_ROW_METRICS},
            "instances": trainer.injected, "tokens": tokens,  # exact counts, not float metrics
            **{m: last.get(m) for m in PROBE_METRICS},
            **{k: chance.get(k) for k in ("chance_format", "chance_copy", "chance_symbol")},
            **trainer.data.summary(), "corpus": bg.corpus_name,
        }
        store.write_json(gdir / "summary.json", [summary])


def load_checkpoint(weights, state_path) -> dict:
    """A cell's checkpoint: weights through safetensors, the rest through ``torch.load`` with
    ``weights_only=True`` (no code in the file runs); a damaged or foreign file is a UserError."""
    from safetensors.torch import load_file

    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError("not a dict")
        state["model"] = load_file(str(weights))
    except Exception as err:  # pickle refusals, truncated files, safetensors header errors
        raise UserError(f"{state_path.parent}: unreadable checkpoint ({type(err).__name__}); "
                        "delete model.safetensors and state.pt to restart the cell") from None
    return state


def _save_state(path, state: dict) -> None:
    """Non-weight state through torch.save, read back with ``weights_only=True``."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    store.write_bytes(path, buf.getvalue())
