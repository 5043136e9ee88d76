"""Train one language model on background text with a rare task injected (PAPER.md Sec. 3).

:class:`LMTrainer` owns the model, AdamW, the background batch source and the injection
schedule; :meth:`LMTrainer.run` trains to a step and evaluates on a log-spaced schedule:

* ``train_loss``: the batch's mean next-token loss (background and task tokens alike);
* ``task_loss``: the loss at the LABEL position of the training instances (all 5K of them, the
  paper's "task loss"), and ``task_test_loss`` on the 5K held-out instances;
* ``test_accuracy``: argmax over the whole vocabulary at LABEL given TOK1 TOK2, held-out split;
* ``val_loss``: background validation loss on held-out text;
* ``val_loss_framed`` (with a task): the same text in the training rows' format: the schedule's
  long-run share of rows (instances per step / rows, at most 1) opens with a held-out instance,
  as training rows do, and only text targets are scored (not TOK2, LABEL, EOD). When every
  training row opens with an instance, plain text rows are a format the model never saw
  (``benchmarks/lm_val_format.py``); this is what the background pays in the format trained;
* ``tokens``: training tokens seen; ``instances``: task instances injected so far;
  ``epochs``: passes over the background corpus.
* with ``settings.probes``: ``cos_g_gr``, ``cos_gt_gr``, ``cos_gnt_gr`` and ``order_r2`` (T_CMP)
  or ``fourier_modes`` (T_ADD) from :func:`raretask.lm.probes.probe_metrics`. The gradient probe
  reads the batch the next injection step would train on: the next step's background with the
  schedule's count of the next training instances (all of an injection step's instances: a
  burst's ``instances``, or ceil(rate) when spread), without moving the stream or the instance
  counter, so probing never changes the run. Under ``torchrun`` it reads rank 0's rows of that
  batch, and it is skipped when the model is sharded (FSDP2); feature presence always runs.

Divergence: at each evaluation a NaN/Inf train or validation loss, or one above
``DIVERGE_FACTOR`` x ln(V), stops the run there and sets :attr:`LMTrainer.diverged_step` (kept in
checkpoints); the grid records it in the cell's summary.

Chance levels (:func:`chance_levels`) say what ``test_accuracy`` a model scores without the
task's hidden structure.

Distributed data parallel: when ``torch.distributed`` is initialised (``torchrun``), each rank
takes its slice of the same global batch and the model is wrapped in DDP (or sharded with FSDP2,
``settings.fsdp``; :mod:`raretask.lm.parallel`); injected instances go to the global batch's first
rows and ``train_loss`` is averaged over the ranks, so the trajectory equals one process with the
same global batch up to floating-point summation order. Checkpoints hold whole, named state, so a
run resumes on any number of processes.

Choices (ours): AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only, fused on CUDA), linear
warm-up then cosine decay to 10% of the peak, gradient clipping at 1.0, bf16 autocast on CUDA and
float32 on CPU, one injected instance per row (the first rows of the global batch).

Host side: a training step has no host sync. On CUDA each batch is copied from pinned memory
without blocking, the per-step loss stays on the device (it is read at evaluations only, where the
validation losses are fetched in one transfer), and a grid cell's stream samples its next chunk
of steps in a background thread (:class:`~raretask.lm.data.TokenStream` ``prefetch``).
``timing`` says where a run's seconds went: its first ``WARMUP_STEPS`` steps (compilation, graph
capture) and its evaluations, each timed between two device syncs (a cell's log line shows them).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from raretask.lm import parallel
from raretask.lm.model import ModelConfig, Transformer
from raretask.lm.tasks import (
    INSTANCE_LEN,
    LABEL_POSITION,
    N_SYMBOLS,
    InjectionSchedule,
    RareTask,
    inject,
)

ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
"""``auto``: PyTorch's own choice; the others pin ``scaled_dot_product_attention`` to one kernel."""
CUDA_ONLY_ATTENTION = ("cudnn", "efficient")

DIVERGE_FACTOR = 2.0
"""A run whose train or validation loss exceeds this multiple of ln(V) (a uniform guess) has
diverged; NaN/Inf always counts."""

WARMUP_STEPS = 3
"""Steps timed apart as a trainer's warm-up, each waited for: torch.compile traces in the first,
and reduce-overhead runs eager in the first and records its CUDA graph in the next (a cell's
log line)."""


class BatchSource(Protocol):
    """What the trainer needs from background text: global batches of windows, resumable."""

    def next_batch(self) -> Tensor:  # [B, T + 1] token ids (this rank's rows)
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    @property
    def epochs(self) -> float: ...


@dataclass(frozen=True)
class LMTrainSettings:
    """Everything about one training run that is not the model or the data."""

    steps: int
    batch_size: int  # global batch (sequences per step across all ranks)
    seq_len: int
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_steps: Sequence[int] = field(default_factory=tuple)
    eval_batches: int = 4  # background validation batches per evaluation
    probes: bool = False  # gradient cosines and feature presence at each evaluation
    probe_k: int = 64  # neurons kept by the gradient probe
    device: str = "cpu"
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode (lm/config.py LMCell.compile_mode)
    deterministic: bool = False  # deterministic CUDA kernels while training (see LMTrainer.run)
    attention: str = "auto"  # SDPA backend for the run: auto, flash, cudnn, efficient, math
    seed: int = 0
    fsdp: bool = False  # several processes: shard with FSDP2 instead of DDP (lm/parallel.py)

    def __post_init__(self) -> None:
        check_attention(self.attention, self.device)

    def lr_at(self, step: int) -> float:
        """Warm-up then cosine to ``min_lr_ratio * lr`` (step counted from 0)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        floor = self.min_lr_ratio
        return self.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class LMTrainer:
    """One model, one background stream, at most one injected task.

    Parameters
    ----------
    model_config:
        Architecture (a preset or explicit).
    data:
        Background batches (this rank's rows of each global batch).
    val_batches:
        A callable returning the validation batches [n, T + 1] (same every evaluation).
    task, schedule:
        The injected task and how many instances each step gets (global), or None for none.
    settings:
        Optimisation and evaluation settings.
    world:
        (rank, processes) training this model together; default: the torch.distributed group
        if one is initialised. ``(0, 1)`` trains alone inside a torchrun job (grid cells mode).
    """

    def __init__(
        self,
        model_config: ModelConfig,
        data: BatchSource,
        val_batches: Callable[[], Iterable[Tensor]],
        task: RareTask | None,
        schedule: InjectionSchedule | None,
        settings: LMTrainSettings,
        world: tuple[int, int] | None = None,
    ):
        self.settings = settings
        self.rank, self.world = world or parallel.rank_world()
        if settings.batch_size % self.world:
            raise ValueError(f"batch_size {settings.batch_size} is not divisible by the "
                             f"{self.world} processes")
        self.local_batch = settings.batch_size // self.world
        self.device = torch.device(settings.device)
        torch.manual_seed(settings.seed)
        gen = torch.Generator().manual_seed(settings.seed)
        self.vocab_size = model_config.vocab_size
        model = Transformer(model_config)
        model.init_weights(generator=gen)  # CPU draw: the same start on every device
        self.model = model.to(self.device)
        self.data = data
        self.val_batches = val_batches
        self.task = task
        self.schedule = schedule
        self.train_instances = task.instances("train") if task is not None else None
        self.step = 0
        self.injected = 0
        self.tokens = 0
        self.records: list[dict] = []
        self.diverged_step: int | None = None  # eval step at which training diverged
        self.last_loss: Tensor | None = None  # the last step's batch loss, on the device
        # where a visit's wall time went (the log line of a finished cell; report.lm_cost):
        # its first WARMUP_STEPS steps (compilation, CUDA-graph capture) and its evaluations
        self.timing = {"warmup_s": 0.0, "warmup_steps": 0, "eval_s": 0.0, "evals": 0}
        self.train_model = self.model
        if self.world > 1:  # before the optimizer: FSDP2 swaps the parameters for shards
            self.train_model = parallel.wrap(self.model, self.device, settings.fsdp)
        self.optimizer = adamw(self.model.parameters(), settings, self.device)
        if settings.compile:
            self.train_model = torch.compile(self.train_model, mode=settings.compile_mode)
        self._graphs = cuda_graphs(settings, self.device)
        self._autocast = step_autocast(self.device)

    # -- training -----------------------------------------------------------------------------
    def _next_instances(self, count: int) -> Tensor:
        """The next ``count`` training instances, cycling through the 5K train split in order."""
        n = self.train_instances.shape[0]
        idx = (torch.arange(count) + self.injected) % n
        self.injected += count
        return self.train_instances[idx]

    def _host_batch(self) -> Tensor:
        """This step's rows on the host [local B, T + 1]: background with the schedule's
        instances in the first rows; moves the stream and the instance counter."""
        s = self.settings
        batch = self.data.next_batch()  # [local B, T + 1]
        count = self.schedule.per_step(self.step) if self.schedule is not None else 0
        if count > s.batch_size:
            raise ValueError(f"{count} instances at step {self.step} exceed the batch of "
                             f"{s.batch_size}")
        if count:
            inst = self._next_instances(count)
            # instances go to the first rows of the global batch: this rank's share of them
            lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
            mine = inst[max(0, lo):max(0, min(hi, count))] if lo < count else inst[:0]
            batch, _ = inject(batch, mine)
        return batch

    def _train_step(self) -> Tensor:
        s = self.settings
        batch = to_device(self._host_batch(), self.device)
        idx, targets = batch[:, :-1], batch[:, 1:]
        for group in self.optimizer.param_groups:
            group["lr"] = s.lr_at(self.step)
        if self._graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self._autocast:
            _, loss = self.train_model(idx, targets=targets, return_logits=False)
        loss.backward()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += s.batch_size * s.seq_len
        return loss.detach()

    def run(self, until: int | None = None, callback: Callable[[int], None] | None = None) -> None:
        """Train to step ``until`` (default: all steps), evaluating at the eval steps.

        With ``settings.deterministic`` the run uses deterministic kernels only (on CUDA the
        flash-attention backward otherwise sums dQ with atomics, so two runs of one cell differ
        in the last bits and then drift): the same cell gives the same numbers alone or packed
        beside others on one GPU. The process-wide switch is restored afterwards.
        """
        with _deterministic(self.settings.deterministic), _attention(self.settings.attention):
            self._run(until, callback)

    def _run(self, until: int | None, callback: Callable[[int], None] | None) -> None:
        end = self.settings.steps if until is None else min(until, self.settings.steps)
        evals = set(self.settings.eval_steps)
        if self.step == 0 and 0 in evals and not self.records:
            with parallel.gathered(self.model), self._timed_eval():
                self._evaluate(None)
            if callback:
                callback(0)
        while self.step < end and self.diverged_step is None:
            # a trainer's first steps, each waited for (a run cut into segments warms up once)
            warm = self.timing["warmup_steps"] < WARMUP_STEPS
            t0 = time.perf_counter() if warm else 0.0
            loss = self.last_loss = self._train_step()
            if warm:
                self._sync()
                self.timing["warmup_s"] += time.perf_counter() - t0
                self.timing["warmup_steps"] += 1
            if self.step in evals:
                if self.world > 1:  # the global batch's loss, not this rank's slice of it
                    loss = parallel.mean(loss)
                with parallel.gathered(self.model), self._timed_eval():
                    row = self._evaluate(loss)
                self._check_divergence(row)
                if callback:
                    callback(self.step)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def _timed_eval(self, timing: dict | None = None) -> Iterator[None]:
        """Count the block as an evaluation in ``timing`` (default: this trainer's); the queued
        training steps are waited for first, so that they are not counted in it (one sync an
        evaluation, none a step)."""
        timing = self.timing if timing is None else timing
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        timing["eval_s"] += time.perf_counter() - t0
        timing["evals"] += 1

    def _check_divergence(self, row: dict[str, float]) -> None:
        """Stop at an eval step whose train or validation loss is NaN/Inf or above
        ``DIVERGE_FACTOR`` x ln(V) (a uniform guess scores ln V; training never climbs to twice
        that). The losses are the global ones, so every rank stops at the same step."""
        limit = DIVERGE_FACTOR * math.log(self.vocab_size)
        for name in ("train_loss", "val_loss"):
            v = row.get(name)
            if v is not None and not (math.isfinite(v) and v <= limit):
                self.diverged_step = self.step
                return

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def _evaluate(self, train_loss: Tensor | None) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        row = {"tokens": float(self.tokens), "instances": float(self.injected),
               "epochs": float(self.data.epochs), "lr": self.settings.lr_at(max(0, self.step - 1))}
        if train_loss is not None:
            row["train_loss"] = float(train_loss)
        with self._autocast:
            row.update(self._val_losses())
            if self.task is not None:
                logits = lambda x: self.model.logits(x)  # noqa: E731
                dev = self.device
                rows, _ = self._eval_chunks()
                row["task_loss"], row["train_accuracy"] = self.task.evaluate(
                    logits, "train", batch_size=rows, device=dev)
                row["task_test_loss"], row["test_accuracy"] = self.task.evaluate(
                    logits, "test", batch_size=rows, device=dev)
        if self.task is not None and self.settings.probes:
            row.update(self._probe())
        self.model.train(was_training)
        self.records.extend({"step": self.step, "metric": k, "value": float(v)}
                            for k, v in row.items())
        return row

    def _eval_chunks(self) -> tuple[int, int]:
        """(instances per forward pass of the task evaluation, tokens per chunk of the gradient
        probe). On a CPU (1,000, 4,096): the numbers every CPU run has had. On CUDA as many
        instances (2 tokens in, V logits out) as keep one chunk's logits within 2^27 values
        (V = 4,096: 16,384, so each split and g_r's 10K instances take one pass), because an
        evaluation runs the plain model, whose small kernels launch one by one."""
        if self.device.type != "cuda":
            return 1000, 4096
        rows = max(1000, (1 << 26) // self.vocab_size)
        return rows, 2 * rows

    def _val_losses(self) -> dict[str, float]:
        """``val_loss`` and, with a task, ``val_loss_framed`` (module docstring), in one pass
        over the validation batches: a framed batch's first round(share x rows) rows open with
        held-out instances (cycled in order) and only its text targets count. Each is the mean
        over batches of the batch's mean loss."""
        dev = self.device
        share = 0.0
        if self.task is not None and self.schedule is not None:
            share = min(1.0, float(self.schedule.rate) / self.settings.batch_size)
            held_out = self.task.instances("test")
        plain, framed, used = [], [], 0
        for b in self.val_batches():
            plain.append(self.model(b[:, :-1].to(dev), targets=b[:, 1:].to(dev))[1].float())
            rows = round(share * b.shape[0])
            if share > 0 and rows == 0:  # no row of this batch framed: the plain loss
                framed.append(plain[-1])
            elif rows:
                tokens, _ = inject(b, held_out[(torch.arange(rows) + used) % len(held_out)])
                used += rows
                text = torch.ones(b.shape[0], b.shape[1] - 1, dtype=torch.bool)
                text[:rows, : INSTANCE_LEN - 1] = False  # targets TOK2, LABEL, EOD
                framed.append(self.model(tokens[:, :-1].to(dev), targets=tokens[:, 1:].to(dev),
                                         loss_mask=text.to(dev))[1].float())
        out = {}
        for name, losses in (("val_loss", plain), ("val_loss_framed", framed)):
            if losses:  # one host sync per metric, not one per batch
                values = torch.stack(losses).tolist()
                out[name] = sum(values) / len(values)
        return out

    def _probe(self) -> dict[str, float]:
        """Probe metrics (module docstring); reads the stream and instances without moving them."""
        from raretask.lm.probes import probe_metrics

        tokens = mask = batch = None
        if not (self.world > 1 and self.settings.fsdp):
            saved = self.data.state_dict()
            batch = self.data.next_batch()
            self.data.load_state_dict(saved)
            count = 0
            s = self.schedule
            if s is not None and s.mode == "iid":  # the expected rows, rounded up
                count = math.ceil(s.row_chance * s.rows)
            elif s is not None and s.instances:
                count = s.instances if s.mode == "burst" else -(-s.instances // s.every)
            n = self.train_instances.shape[0]
            idx = (torch.arange(min(count, batch.shape[0])) + self.injected) % n
            tokens, mask = inject(batch, self.train_instances[idx])
        dtype = torch.bfloat16 if self.device.type == "cuda" else None
        # the same background without its instances: what a step between injections does
        return probe_metrics(self.model, self.task, tokens, mask, k=self.settings.probe_k,
                             chunk_tokens=self._eval_chunks()[1],
                             autocast_dtype=dtype, between=batch)

    def metrics(self) -> list[dict]:
        """Long-format rows: step, metric, value."""
        return list(self.records)

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Model, optimizer, data position, counters and metrics so far (CPU tensors/plain data).

        Whole tensors keyed by name, whatever the process count (lm/parallel.py); with FSDP2
        every rank must call it and only rank 0 gets the tensors.
        """
        weights, optim = parallel.state_dicts(self.model, self.optimizer)
        return {
            "model": weights,
            "optimizer": optim,
            "data": self.data.state_dict(),
            "step": self.step, "injected": self.injected, "tokens": self.tokens,
            "records": list(self.records), "diverged_step": self.diverged_step,
        }

    def load_state_dict(self, state: dict) -> None:
        parallel.load_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"])
        self.data.load_state_dict(state["data"])
        self.step, self.injected, self.tokens = state["step"], state["injected"], state["tokens"]
        self.records = list(state["records"])
        self.diverged_step = state.get("diverged_step")  # absent from older checkpoints


@contextlib.contextmanager
def _deterministic(on: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` for the block when ``on`` (else nothing changes).

    cuBLAS needs a fixed workspace for it (``CUBLAS_WORKSPACE_CONFIG``), read when the process
    makes its first cuBLAS handle: set here unless the user chose one.
    """
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def adamw(params: Iterable[Tensor], settings: LMTrainSettings, device: torch.device,
          matrix_dim: int = 2) -> torch.optim.AdamW:
    """The training step's optimiser: AdamW with ``settings``' lr and betas, weight decay on the
    matrices only (tensors of ``matrix_dim`` or more dimensions: 3 when a seed axis is stacked
    in front), fused on CUDA."""
    params = list(params)
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= matrix_dim],
          "weight_decay": settings.weight_decay},
         {"params": [p for p in params if p.dim() < matrix_dim], "weight_decay": 0.0}],
        lr=settings.lr, betas=settings.betas, fused=device.type == "cuda")


def to_device(batch: Tensor, device: torch.device) -> Tensor:
    """A host batch on ``device`` without blocking: on CUDA through pinned memory (from pageable
    memory CUDA may wait for the queued kernels before copying)."""
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def step_autocast(device: torch.device):
    """The training step's precision: bf16 autocast on CUDA, float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# torch.compile modes that replay the step as CUDA graphs (max-autotune: with autotuned GEMMs)
GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def cuda_graphs(settings: LMTrainSettings, device: torch.device) -> bool:
    """Whether the compiled step replays CUDA graphs. Their replays reuse the output memory, so
    each step must be marked as a new one (``torch.compiler.cudagraph_mark_step_begin``), or
    the previous step's loss, already read or dropped, may be overwritten."""
    return (settings.compile and settings.compile_mode in GRAPH_COMPILE_MODES
            and device.type == "cuda")


def check_attention(name: str, device: str) -> None:
    """ValueError unless ``name`` is a backend of :data:`ATTENTION_BACKENDS` that ``device`` has."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention: expected one of {', '.join(ATTENTION_BACKENDS)}, got "
                         f"{name!r}")
    if name in CUDA_ONLY_ATTENTION and not str(device).startswith("cuda"):
        raise ValueError(f"attention: {name!r} runs on CUDA only, device is {str(device)!r}; "
                         "use auto, flash or math")


def _attention(name: str):
    """A context that pins SDPA to the backend ``name`` (nothing for ``auto``)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([backend])


def chance_levels(task: RareTask, split: str = "test") -> dict[str, float]:
    """Test accuracies reached without the task's hidden order or map, on ``split``.

    * ``chance_symbol``: a uniformly random symbol of S, 1/100.
    * ``chance_format``: a model that has learned the format but not the structure. T_CMP: it
      answers TOK1 or TOK2 with probability 1/2 each, right on every a == b pair and on half of
      the others: 0.5 + 0.5 * (share of a == b pairs), ~0.505. T_ADD: a random symbol of S,
      1/100 (copying TOK1 or TOK2 is no better: right only when the other's value is 0).
    * ``chance_copy``: the better of always answering TOK1 or always TOK2 (T_CMP: ~0.5 + the
      split's imbalance), the most a fixed format-only rule can score.

    Example::

        >>> chance_levels(RareTask("cmp", vocab_size=512, eod_id=0))  # seed 0, test split
        {'chance_symbol': 0.01, 'chance_format': 0.5053, 'chance_copy': 0.5078}
    """
    inst = task.instances(split)
    first = (inst[:, LABEL_POSITION] == inst[:, 0]).double().mean().item()
    second = (inst[:, LABEL_POSITION] == inst[:, 1]).double().mean().item()
    symbol = 1.0 / N_SYMBOLS
    fmt = (first + second) / 2 if task.kind == "cmp" else symbol
    return {"chance_symbol": symbol, "chance_format": round(fmt, 6),
            "chance_copy": round(max(first, second), 6)}
