"""What to train: the typed inputs of :class:`raretask.toy.trainer.ToyTrainer`.

Three frozen dataclasses, validated on construction (a :class:`~raretask.errors.UserError`, a
``ValueError``, naming the field):

* :class:`Schedule`: how the rare task reaches the model (i.i.d., matched-frequency injection as in
  the paper's Fig. 4, or the general "``count`` samples every ``gap`` batches").
* :class:`ToyInstance`: one model of a grid (width, task priors and spectra, seed, rare task,
  frequent set, schedule).
* :class:`TrainSettings`: what every instance of one trainer shares (steps, batch, Adam, eval and
  trace steps, feature basis, device, dtype, RNG chunk, retraction).

Everything an instance's numbers depend on is in its :class:`ToyInstance` plus the
:class:`TrainSettings`; which other instances share its trainer does not matter (see
:mod:`raretask.toy.trainer` for the one caveat on CUDA).

Example
-------
>>> import numpy as np
>>> inst = ToyInstance(width=4, frequencies=np.array([0.4, 0.3, 0.2, 0.1]),
...                    eigenvalues=np.tile(np.arange(1, 5.0) ** -2, (4, 1)), seed=0, rare_task=3,
...                    frequent=np.array([True, True, True, False]),
...                    schedule=Schedule("matched", gap=10))
>>> inst.dim, inst.schedule.injection_size(batch_size=64, rare_prior=0.1)
(16, 64)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from raretask.errors import UserError

_FREQ_ATOL = 1e-6
"""Tolerance on ``sum(frequencies) == 1``; the trainer renormalises exactly."""


@dataclass(frozen=True)
class Schedule:
    """How the rare task is delivered. Steps are counted from 1 (the first update is step 1).

    kind:
        ``"iid"``: every batch of ``batch_size`` samples draws its tasks from the priors pi.
        ``"matched"``: the rare task is never drawn in normal batches (the other priors are
        renormalised); after every ``gap`` steps (steps gap, 2*gap, ...) the batch gets
        ``m = round(gap * batch_size * pi_rare)`` extra rare samples, so the long-run rare share
        matches i.i.d. (paper Fig. 4, ``G = gap``).
        ``"every"``: as ``"matched"`` but with ``count`` rare samples every ``gap`` steps (the
        language-model section's "N instances every N batches").
    gap:
        Steps between injections (``"matched"``/``"every"``); must be >= 1 there, ignored for iid.
    count:
        Rare samples per injection for ``"every"``; must be >= 1 there, ignored otherwise.
    start, stop:
        Injections happen only at updates ``start < step <= stop`` (``stop`` None: to the end),
        so a task can arrive late or stop arriving (retention after the stop). Not for iid.

    Injected samples carry the same per-sample weight ``1/batch_size`` as ordinary ones (the batch
    loss is a sum over samples divided by ``batch_size``, not by the enlarged batch size), so an
    injection adds rare gradient without diluting the frequent part of that batch.
    """

    kind: Literal["iid", "matched", "every"] = "iid"
    gap: int = 0
    count: int = 0
    start: int = 0
    stop: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("iid", "matched", "every"):
            raise UserError(f"schedule.kind must be 'iid', 'matched' or 'every', got {self.kind!r}")
        if self.kind != "iid" and int(self.gap) < 1:
            raise UserError(f"schedule.gap must be >= 1 for kind {self.kind!r}, got {self.gap}")
        if self.kind == "every" and int(self.count) < 1:
            raise UserError(f"schedule.count must be >= 1 for kind 'every', got {self.count}")
        if self.kind == "iid" and (self.start or self.stop is not None):
            raise UserError("schedule.start/stop need injections (kind 'matched' or 'every')")
        if self.start < 0 or (self.stop is not None and self.stop <= self.start):
            raise UserError(f"schedule.stop must be > start >= 0, got start {self.start}, "
                            f"stop {self.stop}")

    def injection_size(self, batch_size: int, rare_prior: float) -> int:
        """Rare samples added at each injection step (0 for iid); raises if it would be < 1."""
        if self.kind == "iid":
            return 0
        if self.kind == "every":
            return int(self.count)
        m = round(self.gap * batch_size * rare_prior)
        if m < 1:
            raise UserError(
                f"schedule.gap: gap={self.gap} gives m = round(gap * batch_size * pi_rare) = "
                f"round({self.gap} * {batch_size} * {rare_prior:.6g}) = {m} rare samples per "
                f"injection; need >= 1 (gap >= {0.5 / (batch_size * rare_prior):.6g})"
                if rare_prior > 0
                else "schedule.gap: the rare task has prior 0, so 'matched' injects nothing"
            )
        return int(m)

    def injects_at(self, step: int) -> bool:
        """Whether update number ``step`` (1-based) carries an injection."""
        return (self.kind != "iid" and step % self.gap == 0 and step > self.start
                and (self.stop is None or step <= self.stop))


@dataclass(frozen=True, eq=False)
class ToyInstance:
    """One model of the grid.

    width:
        N, the number of encoder columns ("neurons"); 1 <= N <= d.
    frequencies:
        [K] task priors pi_k (non-negative, summing to 1 within 1e-6; renormalised exactly).
    eigenvalues:
        [K, M] per-task spectra lambda_{k,j} >= 0, descending along j; zero-pad a task with fewer
        than M features. d = K * M.
    seed:
        Seeds everything random about this instance: basis, initial encoder, training data,
        injected samples and measurement batches (independent streams derived with
        ``numpy.random.SeedSequence``).
    rare_task:
        Index of the task the schedule injects and the traces / rare gradients measure.
    frequent:
        [K] bool, the frequent set F (computed by the caller, e.g. ``Theory.frequent_tasks``);
        must hold positive prior mass.
    schedule:
        How the rare task is delivered (:class:`Schedule`).
    """

    width: int
    frequencies: np.ndarray
    eigenvalues: np.ndarray
    seed: int
    rare_task: int
    frequent: np.ndarray
    schedule: Schedule = field(default_factory=Schedule)

    def __post_init__(self) -> None:
        lam = np.array(self.eigenvalues, dtype=np.float64)
        if lam.ndim != 2 or lam.size == 0:
            raise UserError(f"eigenvalues must be a [K, M] array, got shape {lam.shape}")
        k, m = lam.shape
        if not np.all(np.isfinite(lam)) or np.any(lam < 0):
            raise UserError("eigenvalues must be finite numbers >= 0")
        if np.any(np.diff(lam, axis=1) > 0):
            bad = int(np.nonzero(np.any(np.diff(lam, axis=1) > 0, axis=1))[0][0])
            raise UserError(f"eigenvalues of task {bad} must be sorted descending")
        if np.any(lam.sum(axis=1) <= 0):
            bad = int(np.nonzero(lam.sum(axis=1) <= 0)[0][0])
            raise UserError(f"eigenvalues of task {bad} are all zero")
        pi = np.array(self.frequencies, dtype=np.float64)
        if pi.shape != (k,):
            raise UserError(f"frequencies: expected shape ({k},), got {pi.shape}")
        if not np.all(np.isfinite(pi)) or np.any(pi < 0):
            raise UserError("frequencies must be finite numbers >= 0")
        if abs(pi.sum() - 1.0) > _FREQ_ATOL:
            raise UserError(f"frequencies must sum to 1, got {pi.sum():.9g}")
        pi = pi / pi.sum()
        freq = np.array(self.frequent, dtype=bool)
        if freq.shape != (k,):
            raise UserError(f"frequent: expected shape ({k},), got {freq.shape}")
        if not pi[freq].sum() > 0:
            raise UserError("frequent: the frequent set holds no prior mass")
        if isinstance(self.width, bool) or int(self.width) != self.width or not (
            1 <= self.width <= k * m
        ):
            raise UserError(f"width must be an integer in [1, d={k * m}], got {self.width}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise UserError(f"seed must be an integer >= 0, got {self.seed}")
        if int(self.rare_task) != self.rare_task or not 0 <= self.rare_task < k:
            raise UserError(f"rare_task must be an integer in [0, {k}), got {self.rare_task}")
        if not isinstance(self.schedule, Schedule):
            raise UserError(f"schedule must be a Schedule, got {type(self.schedule).__name__}")
        if self.schedule.kind != "iid" and not (pi.sum() - pi[self.rare_task]) > 0:
            raise UserError("schedule: withholding the rare task leaves no other task to train on")
        for name, arr in (("frequencies", pi), ("eigenvalues", lam), ("frequent", freq)):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        for name in ("width", "seed", "rare_task"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def tasks(self) -> int:
        """K, the number of tasks."""
        return self.eigenvalues.shape[0]

    @property
    def features(self) -> int:
        """M, the (padded) features per task."""
        return self.eigenvalues.shape[1]

    @property
    def dim(self) -> int:
        """d = K * M, the input dimension."""
        return self.tasks * self.features

    def train_priors(self) -> np.ndarray:
        """[K] task distribution of ordinary batch samples: pi, or pi without the rare task."""
        pi = self.frequencies.copy()
        if self.schedule.kind != "iid":
            pi[self.rare_task] = 0.0
        return pi / pi.sum()

    def frequent_priors(self) -> np.ndarray:
        """[K] pi restricted to F and renormalised (the frequent measurement batch)."""
        pi = np.where(self.frequent, self.frequencies, 0.0)
        return pi / pi.sum()


Basis = Literal["random", "identity"]


@dataclass(frozen=True)
class TrainSettings:
    """What every instance of one :class:`~raretask.toy.trainer.ToyTrainer` shares.

    steps:
        Adam updates in the full run.
    batch_size:
        B, ordinary samples per update (injections add to it; the loss is divided by B).
    lr, betas, eps:
        Adam hyper-parameters (no weight decay; standard bias correction).
    eval_steps:
        Steps (0 .. steps) at which full metrics are recorded; sorted and de-duplicated here.
    trace_every:
        If > 0, record the rare task's normalised signal at steps 0, trace_every, 2*trace_every...
        (cheap: no host sync, a few small kernels).
    basis:
        Feature blocks B_k: columns of one random orthogonal d x d matrix drawn from the instance
        seed (``"random"``, default: Adam's coordinate-wise scaling is then not aligned with the
        features) or the standard basis (``"identity"``).
    device, dtype:
        Where and in which precision training runs; metrics are always computed in float64.
    rng_chunk:
        Training samples are drawn ``rng_chunk`` steps at a time per instance (fewer kernel
        launches). Part of the random stream: changing it changes the numbers.
    retraction:
        Name in :data:`raretask.toy.model.RETRACTIONS` mapping the encoder back to orthonormal
        columns after each Adam step (``"qr"``: sign-corrected QR, the reference;
        ``"polar_once"``: one third-order pass towards the nearest orthonormal matrix from GEMMs
        only, same span, the fast choice on GPUs, orthonormal to O(|E|^4) and corrected again at
        every step; the GPU benchmarks add their variants, benchmarks/toy_retractions.py).
    tf32:
        CUDA only: TF32 tensor cores for the float32 training matmuls (the retraction's final
        Gram matrix and all metrics stay in full precision).
    cuda_graph:
        CUDA only: replay each step as a CUDA graph (steps with injections run eagerly).
    fuse:
        CUDA only: the masked residual of the training step as one kernel compiled by
        torch.compile (same numbers up to float rounding).
    share_inputs:
        Where instances read the inputs x = B z of a seed they share, laid out with the seed
        fastest (a grid's usual order), multiply x once per seed by their encoders side by
        side instead of copying x and z per instance (:func:`raretask.toy.model.
        seed_shared_gradients`). Same numbers up to float rounding. Off by default here; the
        CUDA execution profile turns it on (its timing: benchmarks/RESULTS.md).
    group_streams:
        CUDA only: each group's gradient and retraction on its own CUDA stream, so the small
        kernels of several groups run side by side (joined before Adam and at the step's end).
        Same numbers: only the order of independent kernels changes.
    pad_width:
        With a GEMM retraction (:data:`raretask.toy.model.GEMM_RETRACTIONS`) only: instances
        of width <= pad_width (same K, M) train as one group, padded with inert zero columns to the
        widest of them (fewer, larger kernels); 0 turns it off. Numbers per instance are
        unchanged up to float rounding.
    """

    steps: int
    batch_size: int = 512
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eval_steps: tuple[int, ...] = ()
    trace_every: int = 0
    basis: Basis = "random"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    rng_chunk: int = 8
    retraction: str = "qr"
    tf32: bool = False
    cuda_graph: bool = True
    fuse: bool = True
    share_inputs: bool = False
    group_streams: bool = False
    pad_width: int = 0

    def __post_init__(self) -> None:
        from raretask.toy.model import RETRACTIONS  # local: model imports nothing from here

        if int(self.steps) != self.steps or self.steps < 0:
            raise UserError(f"steps must be an integer >= 0, got {self.steps}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise UserError(f"batch_size must be an integer >= 1, got {self.batch_size}")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"lr must be a finite number > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise UserError(f"eps must be > 0, got {self.eps}")
        evals = tuple(sorted({int(s) for s in self.eval_steps}))
        if evals and not (evals[0] >= 0 and evals[-1] <= self.steps):
            raise UserError(f"eval_steps must lie in [0, steps={self.steps}], got {evals}")
        if int(self.trace_every) != self.trace_every or self.trace_every < 0:
            raise UserError(f"trace_every must be an integer >= 0, got {self.trace_every}")
        if self.basis not in ("random", "identity"):
            raise UserError(f"basis must be 'random' or 'identity', got {self.basis!r}")
        dtype = getattr(torch, self.dtype) if isinstance(self.dtype, str) else self.dtype
        if dtype not in (torch.float32, torch.float64):
            raise UserError(f"dtype must be float32 or float64, got {self.dtype}")
        if int(self.rng_chunk) != self.rng_chunk or self.rng_chunk < 1:
            raise UserError(f"rng_chunk must be an integer >= 1, got {self.rng_chunk}")
        if self.retraction not in RETRACTIONS:
            raise UserError(
                f"retraction must be one of {sorted(RETRACTIONS)}, got {self.retraction!r}"
            )
        object.__setattr__(self, "eval_steps", evals)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))
        if int(self.pad_width) != self.pad_width or self.pad_width < 0:
            raise UserError(f"pad_width must be an integer >= 0, got {self.pad_width}")
        for name in ("steps", "batch_size", "trace_every", "rng_chunk", "pad_width"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def trace_steps(self) -> np.ndarray:
        """Steps at which the rare trace is recorded (empty when ``trace_every == 0``)."""
        if self.trace_every == 0:
            return np.zeros(0, dtype=np.int64)
        return np.arange(0, self.steps + 1, self.trace_every, dtype=np.int64)
