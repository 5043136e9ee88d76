"""Batched trainer of the linear multitask toy: many instances, one Adam step.

:class:`ToyTrainer` takes :class:`~raretask.toy.spec.ToyInstance` s and one
:class:`~raretask.toy.spec.TrainSettings`, trains every instance with Adam plus a retraction, and
records exact metrics at the eval steps and the rare task's signal every ``trace_every`` steps.

Example
-------
>>> import numpy as np
>>> from raretask.toy import Schedule, ToyInstance, ToyTrainer, TrainSettings
>>> pi, lam = np.array([0.4, 0.3, 0.2, 0.1]), np.tile(np.arange(1, 5.0) ** -2, (4, 1))
>>> F = np.array([True, True, True, False])
>>> insts = [ToyInstance(w, pi, lam, seed=0, rare_task=3, frequent=F) for w in (3, 6)]
>>> tr = ToyTrainer(insts, TrainSettings(steps=20, batch_size=64, lr=1e-2, eval_steps=(0, 20)))
>>> tr.run()
>>> rows = tr.metrics()  # long format: instance, step, task (-1 = whole model), metric, value
>>> sorted({r["metric"] for r in rows if r["task"] == -1})[:3]
['grad_cosine', 'grad_norm_frequent', 'grad_norm_rare']

Choices (documented here once)
------------------------------
* **Model and loss**: see :mod:`raretask.toy.model`. Batch loss = sum over samples / batch_size;
  injected rare samples have the same per-sample weight. The loss is summed over instances, and
  Adam is elementwise, so instances never interact.
* **Init**: U = random orthonormal (sign-corrected QR of a Gaussian d x N, Haar), D = 0. The model
  starts at the mean predictor (loss_norm = 1 for every task) with a random encoder (s~ ~ 0). With
  D = 0 the encoder gradient is exactly 0 at step 0 (dL/dU = -2 (A - D U^T)^T D), so the first
  update moves D only and step-0 gradient metrics are 0 (cosine NaN). Likewise a task withheld
  until its first injection ("matched"/"every") has D_r = 0 then: that injection trains D_r only,
  and the encoder starts to feel the rare task from the second injection on.
* **Optimizer**: Adam written out (torch.optim.Adam's non-fused formula: lerp of the first moment,
  bias corrections, eps added after the square root), applied to one stacked [2, I, d, N] tensor
  holding U and D, so an update is a handful of kernels for all instances. No weight decay.
* **Retraction**: after every Adam step U <- retraction(U), by name
  (``TrainSettings.retraction``, :data:`raretask.toy.model.RETRACTIONS`): "qr" (Q of QR with
  columns multiplied by sign(diag R), continuous; the CPU default), "polar_once" (one pass
  towards the nearest orthonormal matrix, same span, four GEMM kernels; the CUDA default). Adam's
  moments are kept as they are.
* **Grouping**: instances are grouped by shape (K, M, N); each group has its own tensors with a
  leading instance axis. Padding every width to the largest with masks was rejected: QR costs
  d N^2 and the matmuls d N per instance, so padding a grid with log-spaced widths to its widest
  multiplies the work several times over, and zero columns make QR's Q arbitrary. A grid has few
  distinct widths, so there are few groups (one Python pass of ~20 kernels each per step).
* **Basis**: ``"random"``: one Haar-random orthogonal d x d matrix per instance, drawn from its
  seed (so instances with the same seed share basis, initial draw and data across widths: paired
  comparisons); ``"identity"``: the standard basis. The basis is rebuilt from the seed, never
  stored in checkpoints.
* **RNG**: every instance owns independent streams derived from its seed with
  ``numpy.random.SeedSequence(seed, spawn_key=(stream, ...))``: basis and initial U (CPU
  generator, float64, then cast: identical start on every device), training data (a device
  generator drawing ``rng_chunk`` steps of tasks and inputs at a time, [I, rng_chunk, B, d]
  floats per group; on CPU instances draw in parallel threads), injected samples (device
  generator, drawn at injection steps), and measurement batches (a fresh generator per eval step
  seeded with (seed, step): evals never touch the training streams and a value at step s does
  not depend on which other steps are evaluated). Task indices come from float64 uniforms through
  the inverse CDF (``searchsorted``). Same instances + settings give identical numbers on CPU.
* **Independence from group-mates**: an instance's random numbers and arithmetic do not depend on
  which instances share its trainer: same draws from its own generators, same tensor shapes per
  instance, and injected samples are handled in their own sub-batch (never padded to a mate's
  injection size). Tested bit-exact on CPU, including mixed widths and schedules. On CUDA,
  cuBLAS/cuSOLVER may pick another kernel for another batch count: expect last-bit differences.
* **Syncs**: the training step never reads a device value on the host (no ``.item()``); which
  instances inject at a step is known on the host from the schedules. Metrics stay on the device
  until :meth:`ToyTrainer.metrics`, :meth:`ToyTrainer.traces` or :meth:`ToyTrainer.state_dict`.
* **Divergence**: checked at every eval step, on the device (no host sync): an instance diverges
  when a parameter or its loss is NaN/Inf, or its loss exceeds :data:`DIVERGE_FACTOR` times the
  mean predictor's (U = D = 0, the loss at step 0). Its step is recorded
  (:meth:`ToyTrainer.diverged`), its parameters and Adam moments are set to 0 and kept there
  (masked after every step, so no NaN can reach a kernel again: the model that learned nothing,
  frozen). Instances never interact, so its group-mates' numbers are unchanged (tested bit-exact
  on CPU). The eval row at the divergence step holds the diverging values; later rows the frozen
  model's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from raretask.errors import UserError
from raretask.toy.model import (
    GEMM_RETRACTIONS,
    MODEL_METRICS,
    RETRACTIONS,
    TASK_METRICS,
    batch_gradients,
    exact_metrics,
    fused_masked_residual,
    random_orthonormal,
    rare_signal_norm,
    seed_shared_gradients,
    tf32,
)
from raretask.toy.spec import ToyInstance, TrainSettings

Tensor = torch.Tensor

TASK_COLUMNS = (*TASK_METRICS, "seen")
"""Per-task metric names in the order of the stored table (``seen``: samples of the task so far)."""

MODEL_COLUMNS = (*MODEL_METRICS, "grad_norm_frequent", "grad_norm_rare", "grad_cosine")
"""Per-instance metric names (task = -1) in the order of the stored table."""

DIVERGE_FACTOR = 100.0
"""An instance whose loss exceeds this multiple of the mean predictor's loss has diverged (a
healthy run stays below the mean predictor's loss after its first steps; lr = 10 passes 400x)."""

# Random streams per instance (the first entry of the SeedSequence spawn key).
_BASIS, _INIT, _TRAIN, _INJECT, _MEASURE = range(5)


def stream_seed(seed: int, *key: int) -> int:
    """A 63-bit seed for one random stream of an instance (``SeedSequence`` spawn key ``key``)."""
    state = np.random.SeedSequence(seed, spawn_key=tuple(key)).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


def _generator(device: torch.device | str, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _restore_generator(gen: torch.Generator, saved: Tensor, reseed: int) -> None:
    """Continue ``gen`` from a checkpoint's ``saved`` state, or, when the state was taken on
    another kind of device (a CPU Mersenne Twister is 5,056 bytes, a CUDA Philox 16: neither can
    continue the other's stream), restart it from ``reseed``, a seed fixed by the instance and
    the step, so that a resume after a device switch is still reproducible. The run's log warns
    that such a run's numbers may differ from a run on either device alone."""
    if saved.numel() == gen.get_state().numel():
        gen.set_state(saved)
    else:
        gen.manual_seed(reseed)


def _cdf(p: np.ndarray) -> np.ndarray:
    """Inverse-CDF table for ``searchsorted(cdf, u, right=True)`` with u in [0, 1).

    Entries from the last task of positive mass on are exactly 1, so rounding can never select a
    zero-prior task.
    """
    c = np.cumsum(p / p.sum())
    c[np.nonzero(p > 0)[0][-1] :] = 1.0
    return c


def _take(t: Tensor, sel: slice | Tensor) -> Tensor:
    return t[sel] if isinstance(sel, slice) else t.index_select(0, sel)


def _add_at(t: Tensor, sel: slice | Tensor, x: Tensor) -> None:
    """t[sel] += x along dim 0 (deterministic: each row is written once)."""
    if isinstance(sel, slice):
        t[sel] += x
    else:
        t.index_copy_(0, sel, t.index_select(0, sel) + x)


@dataclass
class _Streams:
    """Training data of the instances with the same (seed, K, M): drawn once, shared.

    An instance's training draws depend only on its seed and shape, so instances that differ in
    width, priors or schedule but share a seed read the same inputs (as they always did); drawing
    and rotating them once per seed instead of once per instance saves B d^2 per instance-step.
    """

    k: int
    m: int
    seeds: list[int]
    gens: list[torch.Generator]
    basis: Tensor | None  # [S, d, d]
    u_buf: Tensor  # [S, R, B] float64 uniforms (task draws)
    z_buf: Tensor  # [S, R, B, d] inputs in feature coordinates
    states: list[Tensor] = field(default_factory=list)  # generator states before this chunk
    x_used: bool = False  # some group reads x = z basis^T

    @property
    def dim(self) -> int:
        return self.k * self.m


@dataclass
class _Group:
    """Tensors of the instances that share (K, M, N); leading axis = instance within the group."""

    idx: list[int]  # trainer-level instance indices
    k: int
    m: int
    n: int  # width of the group's tensors (the widest instance when padded)
    widths: Tensor | None  # [I] real widths when narrower instances are padded, else None
    shift: Tensor | None  # [I, n, n] -diag(real columns) for the padded retraction, else None
    rotate: bool  # use V = B^T U (2 d^2 N) instead of the seed's shared x = B z
    basis: Tensor | None  # [I, d, d] when rotate, else None (read the streams' basis by sid)
    streams: _Streams
    sid: Tensor  # [I] int64: each instance's row in ``streams``
    sid_is_all: bool  # sid == arange(S): read the streams' tensors without copying
    tiled: bool  # sid == arange(S) repeated J > 1 times: seed_shared_gradients applies
    sqrt_lam: Tensor  # [I, 1, d]            training dtype
    lam64: Tensor  # [I, K, M]               float64
    priors64: Tensor  # [I, K]
    frequent: Tensor  # [I, K] bool
    cdf_train: Tensor  # [I, K] float64
    cdf_freq: Tensor  # [I, K] float64
    rare: Tensor  # [I] int64
    rare_coef: Tensor  # [I, K] 2/B on the rare task, training dtype
    rare_basis: Tensor  # [I, d, M]           training dtype
    rare_lam: Tensor  # [I, M]                training dtype
    sizes: list[int]  # rare samples per injection per instance
    params: Tensor  # [2, I, d, N]: params[0] = U, params[1] = D (rows task-major)
    exp_avg: Tensor  # [2, I, d, N]
    exp_avg_sq: Tensor  # [2, I, d, N]
    grad: Tensor  # [2, I, d, N]
    coef_buf: Tensor  # [I, R, B, K] 2/B on each sample's task
    count_buf: Tensor  # [I, R, K] int64 samples per task per step
    seen: Tensor  # [I, K] int64 samples seen so far
    trace_buf: Tensor  # [n_trace, I] float64
    evals: list[Tensor]  # per recorded eval: [I, len(TASK_COLUMNS) * K + len(MODEL_COLUMNS)]
    loss0: Tensor  # [I] float64 loss of the mean predictor (U = D = 0)
    diverged: Tensor  # [I] int64 eval step at which the instance diverged, -1 if it has not
    dead: Tensor  # [1, I, 1, 1] bool: diverged, parameters held at 0
    plans: dict = field(default_factory=dict)  # injection pattern -> sub-batches (cached)

    @property
    def dim(self) -> int:
        return self.k * self.m

    def take(self, t: Tensor) -> Tensor:
        """Per-instance rows [I, ...] of a per-stream tensor [S, ...]."""
        return t if self.sid_is_all else t.index_select(0, self.sid)

    def basis_of(self, sel: slice | Tensor | None = None) -> Tensor | None:
        """[I', d, d] bases of the selected instances (None: identity)."""
        if self.streams.basis is None:
            return None
        if self.basis is not None:
            return self.basis if sel is None else _take(self.basis, sel)
        sid = self.sid if sel is None else _take(self.sid, sel)
        return self.streams.basis.index_select(0, sid)


class ToyTrainer:
    """Train many toy instances in one loop.

    Parameters
    ----------
    instances:
        The models to train (any mix of widths, spectra, priors, seeds, schedules).
    settings:
        Shared settings (steps, batch, Adam, eval/trace steps, basis, device, dtype).

    Attributes
    ----------
    step:
        Updates done so far (0 .. settings.steps).

    Raises
    ------
    UserError (a ValueError):
        no instances, or a schedule that would inject fewer than one sample (names the field).
    """

    def __init__(self, instances: Sequence[ToyInstance], settings: TrainSettings):
        if len(instances) == 0:
            raise UserError("instances: at least one instance is needed")
        self.instances = tuple(instances)
        self.settings = settings
        self.step = 0
        self.device = torch.device(settings.device)
        self._retract = RETRACTIONS[settings.retraction]
        bsz = settings.batch_size
        sizes = []
        for inst in self.instances:
            if not isinstance(inst, ToyInstance):
                raise UserError(f"instances: expected ToyInstance, got {type(inst).__name__}")
            sizes.append(inst.schedule.injection_size(bsz, inst.frequencies[inst.rare_task]))
        self._sizes = sizes
        self._schedules = [inst.schedule for inst in self.instances]
        self._gen_inject = [
            _generator(self.device, stream_seed(i.seed, _INJECT)) for i in self.instances
        ]
        threads = torch.get_num_threads()
        self._pool = (
            ThreadPoolExecutor(min(threads, len(self.instances)), thread_name_prefix="toy-rng")
            if self.device.type == "cpu" and threads > 1 and len(self.instances) > 1
            else None
        )
        self._chunk: int | None = None  # index of the chunk of training samples in the buffers
        self._eval_steps: list[int] = []
        self._eval_set = set(settings.eval_steps)
        self._n_traced = 0
        self._streams: dict[tuple[int, int], _Streams] = {}
        self._stream_of: list[tuple[tuple[int, int], int]] = []  # instance -> (shape, row)
        for inst in self.instances:
            self._stream_of.append(self._stream_row(inst))
        keys: dict[tuple[int, int, int], list[int]] = {}
        pad_to = self._pad_targets()
        for i, inst in enumerate(self.instances):
            width = pad_to.get((inst.tasks, inst.features, inst.width), inst.width)
            keys.setdefault((inst.tasks, inst.features, width), []).append(i)
        self._groups = [self._build_group(idx) for idx in keys.values()]
        # CUDA: torch's fused Adam (one kernel for all of a group's U and D) and CUDA graphs of
        # the whole step; CPU: the written-out Adam below (bit-exact, tested).
        self._opt = None
        if self.device.type == "cuda":
            self._opt = torch.optim.Adam(
                [gr.params for gr in self._groups], lr=settings.lr, betas=settings.betas,
                eps=settings.eps, fused=True, capturable=True)
            for gr in self._groups:
                gr.params.grad = gr.grad
                self._opt.state[gr.params] = {
                    "step": torch.zeros((), dtype=torch.float32, device=self.device),
                    "exp_avg": gr.exp_avg, "exp_avg_sq": gr.exp_avg_sq}
        self._use_graphs = (self.device.type == "cuda" and settings.cuda_graph
                            and settings.retraction != "qr")  # cuSOLVER QR syncs the host
        # CUDA: the residual and its mask as one compiled kernel (training step only: its
        # shapes are fixed, so it compiles once per group during the eager warm-up steps)
        self._residual = (torch.compile(fused_masked_residual, dynamic=False)
                          if self.device.type == "cuda" and settings.fuse else None)
        self._group_streams = ([torch.cuda.Stream(self.device) for _ in self._groups]
                               if self.device.type == "cuda" and settings.group_streams
                               and len(self._groups) > 1 else None)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._eager_warmup = 2  # eager steps on a side stream before the first capture

    # -- construction ---------------------------------------------------------------------------
    def _pad_targets(self) -> dict[tuple[int, int, int], int]:
        """(K, M, N) -> padded width, for the instances that share one padded group.

        With the series retraction only (the GPU choice): on a GPU a group's cost is mostly per
        kernel, not per column, so widths up to ``settings.pad_width`` train as one group,
        padded with zero columns to the widest of them (padding is inert: zero columns get zero
        gradients and the shifted retraction keeps them zero). Otherwise one group per width
        (on CPU: exact numbers independent of group-mates).
        """
        s = self.settings
        if not (s.retraction in GEMM_RETRACTIONS and s.pad_width):
            return {}
        small: dict[tuple[int, int], set[int]] = {}
        for inst in self.instances:
            if inst.width <= s.pad_width:
                small.setdefault((inst.tasks, inst.features), set()).add(inst.width)
        return {(k, m, n): max(ws) for (k, m), ws in small.items() if len(ws) > 1 for n in ws}

    def _stream_row(self, inst: ToyInstance) -> tuple[tuple[int, int], int]:
        """(shape key, row) of the instance's data stream, creating the stream if new."""
        s, dev, dt = self.settings, self.device, self.settings.dtype
        key = (inst.tasks, inst.features)
        st = self._streams.get(key)
        if st is None:
            st = self._streams[key] = _Streams(k=key[0], m=key[1], seeds=[], gens=[], basis=None,
                                               u_buf=torch.empty(0), z_buf=torch.empty(0))
        if inst.seed not in st.seeds:
            st.seeds.append(inst.seed)
            st.gens.append(_generator(dev, stream_seed(inst.seed, _TRAIN)))
            n, dim = len(st.seeds), st.dim
            st.u_buf = torch.empty(n, s.rng_chunk, s.batch_size, dtype=torch.float64, device=dev)
            st.z_buf = torch.empty(n, s.rng_chunk, s.batch_size, dim, dtype=dt, device=dev)
            if s.basis == "random":
                b = random_orthonormal(dim, dim, _generator("cpu", stream_seed(inst.seed, _BASIS)))
                b = b.to(device=dev, dtype=dt).unsqueeze(0)
                st.basis = b if st.basis is None else torch.cat([st.basis, b])
        return key, st.seeds.index(inst.seed)

    def _build_group(self, idx: list[int]) -> _Group:
        s, dev, dt = self.settings, self.device, self.settings.dtype
        insts = [self.instances[i] for i in idx]
        k, m = insts[0].tasks, insts[0].features
        n = max(x.width for x in insts)
        padded = any(x.width != n for x in insts)
        dim, i_n, r, bsz = k * m, len(idx), s.rng_chunk, s.batch_size

        def stack(arrs, dtype=torch.float64):
            return torch.as_tensor(np.stack(arrs), dtype=dtype, device=dev)

        streams = self._streams[(k, m)]
        rows = [self._stream_of[i][1] for i in idx]
        sid = torch.tensor(rows, dtype=torch.int64, device=dev)
        seeds = list(range(len(streams.seeds)))  # the streams' rows
        # CPU keeps the per-instance cost rule (numbers independent of group-mates, bit-exact);
        # on CUDA the seed's x = z B^T is computed once per step for all its instances.
        rotate = s.basis == "random" and 2 * n < bsz and dev.type == "cpu"
        basis = streams.basis.index_select(0, sid) if rotate else None
        streams.x_used |= s.basis == "random" and not rotate
        params = torch.zeros(2, i_n, dim, n, device=dev, dtype=dt)
        for j, x in enumerate(insts):
            u0 = random_orthonormal(dim, x.width, _generator("cpu", stream_seed(x.seed, _INIT)))
            params[0, j, :, : x.width] = u0.to(device=dev, dtype=dt)
        widths = shift = None
        if padded:
            widths = torch.tensor([x.width for x in insts], dtype=torch.int64, device=dev)
            valid = (torch.arange(n, device=dev) < widths[:, None]).to(dt)
            shift = -torch.diag_embed(valid)
        lam64 = stack([x.eigenvalues for x in insts])
        rare = torch.tensor([x.rare_task for x in insts], dtype=torch.int64, device=dev)
        cols = (rare[:, None] * m + torch.arange(m, device=dev)).to(torch.int64)  # [I, M]
        if streams.basis is None:
            full = torch.eye(dim, dtype=dt, device=dev).expand(i_n, dim, dim)
        else:
            full = streams.basis.index_select(0, sid)
        rare_basis = torch.gather(full, 2, cols[:, None, :].expand(i_n, dim, m))
        del full
        onehot_rare = torch.nn.functional.one_hot(rare, k).to(dt)
        sizes = [self._sizes[i] for i in idx]
        n_trace = len(s.trace_steps)
        return _Group(
            idx=idx, k=k, m=m, n=n, widths=widths, shift=shift,
            rotate=rotate,
            basis=basis,
            streams=streams,
            sid=sid,
            sid_is_all=rows == seeds,
            tiled=len(rows) > len(seeds) and rows == seeds * (len(rows) // len(seeds)),
            sqrt_lam=lam64.sqrt().reshape(i_n, 1, dim).to(dt),
            lam64=lam64,
            priors64=stack([x.frequencies for x in insts]),
            frequent=stack([x.frequent for x in insts], torch.bool),
            cdf_train=stack([_cdf(x.train_priors()) for x in insts]),
            cdf_freq=stack([_cdf(x.frequent_priors()) for x in insts]),
            rare=rare,
            rare_coef=onehot_rare * (2.0 / bsz),
            rare_basis=rare_basis.contiguous(),
            rare_lam=torch.gather(lam64, 1, rare[:, None, None].expand(i_n, 1, m))[:, 0].to(dt),
            sizes=sizes,
            params=params,
            exp_avg=torch.zeros_like(params),
            exp_avg_sq=torch.zeros_like(params),
            grad=torch.zeros_like(params),
            coef_buf=torch.empty(i_n, r, bsz, k, dtype=dt, device=dev),
            count_buf=torch.empty(i_n, r, k, dtype=torch.int64, device=dev),
            seen=torch.zeros(i_n, k, dtype=torch.int64, device=dev),
            trace_buf=torch.full((n_trace, i_n), math.nan, dtype=torch.float64, device=dev),
            evals=[],
            loss0=(stack([x.frequencies for x in insts]) * lam64.sum(-1)).sum(-1),
            diverged=torch.full((i_n,), -1, dtype=torch.int64, device=dev),
            dead=torch.zeros(1, i_n, 1, 1, dtype=torch.bool, device=dev),
        )

    # -- training -------------------------------------------------------------------------------
    def run(self, until: int | None = None, callback: Callable[[int], None] | None = None) -> None:
        """Train up to step ``until`` (default ``settings.steps``).

        Records metrics at each eval step reached (including the current one if not yet
        recorded, e.g. step 0) and calls ``callback(step)`` after each, so the caller can show
        progress or checkpoint; traces are recorded every ``trace_every`` steps.
        """
        until = self.settings.steps if until is None else int(until)
        if not self.step <= until <= self.settings.steps:
            raise UserError(
                f"until must lie in [step={self.step}, steps={self.settings.steps}], got {until}"
            )
        self._record(callback)
        while self.step < until:
            self._train_step()
            self.step += 1
            self._record(callback)

    def _draw_chunk(self, chunk: int) -> None:
        """Draw ``rng_chunk`` steps of tasks and inputs for every instance."""
        jobs = [(st, j) for st in self._streams.values() for j in range(len(st.seeds))]
        for st in self._streams.values():
            st.states = [g.get_state() for g in st.gens]

        def draw(job: tuple[_Streams, int]) -> None:
            st, j = job
            st.u_buf[j].uniform_(generator=st.gens[j])
            st.z_buf[j].normal_(generator=st.gens[j])

        if self._pool is not None:  # CPU: torch's generators are serial, so draw in parallel
            list(self._pool.map(draw, jobs))
        else:
            for job in jobs:
                draw(job)
        for gr in self._groups:
            _, r, bsz = gr.streams.u_buf.shape
            i_n = len(gr.idx)
            uni = gr.take(gr.streams.u_buf).view(i_n, r * bsz)
            tasks = torch.searchsorted(gr.cdf_train, uni, right=True)
            tasks = tasks.clamp_(max=gr.k - 1).view(i_n, r, bsz, 1)
            onehot = tasks == torch.arange(gr.k, device=self.device)  # [I, R, B, K]
            torch.sum(onehot, dim=2, out=gr.count_buf)
            gr.coef_buf.copy_(onehot).mul_(2.0 / bsz)
        self._chunk = chunk

    def _train_step(self) -> None:
        r = self.settings.rng_chunk
        if self._chunk != self.step // r:
            self._draw_chunk(self.step // r)
        row, t = self.step % r, self.step + 1  # t: 1-based number of this update
        injects = [tuple(j for j in range(len(gr.idx))
                         if gr.sizes[j] and self._schedules[gr.idx[j]].injects_at(t))
                   for gr in self._groups]
        with tf32(self.settings.tf32):
            if not self._use_graphs or any(injects):
                self._step_body(row, t, injects)
            elif self._eager_warmup > 0:  # warm cuBLAS/cuSOLVER up off the capture stream
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    self._step_body(row, t, injects)
                torch.cuda.current_stream(self.device).wait_stream(side)
                self._eager_warmup -= 1
            else:
                graph = self._graphs.get(row)
                if graph is None:  # one graph per row of the drawn chunk (static addresses)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._graph_pool):
                        self._step_body(row, t, injects)
                    self._graph_pool = graph.pool()
                    self._graphs[row] = graph
                graph.replay()

    def _step_body(self, row: int, t: int, injects: list[tuple[int, ...]]) -> None:
        """One update of every group: gradients, injections, Adam, retraction.

        Reads only device tensors at fixed addresses (the drawn chunk's row ``row``) when no
        group injects, so the same kernels can be replayed as a CUDA graph; ``t`` (the 1-based
        update number) is used by the CPU Adam only.
        """
        s = self.settings
        xs = self._inputs(row)  # alive to the end: the group streams read it
        with self._fork() as on_stream:
            for i, (gr, inject) in enumerate(zip(self._groups, injects, strict=True)):
                with on_stream(i):
                    gr.seen += gr.count_buf[:, row]
                    self._group_gradients(gr, xs, row)
                    if inject:
                        self._add_injection(gr, inject)
        if self._opt is not None:
            self._opt.step()
        else:
            b1, b2 = s.betas
            bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
            for gr in self._groups:
                gr.exp_avg.lerp_(gr.grad, 1.0 - b1)
                gr.exp_avg_sq.mul_(b2).addcmul_(gr.grad, gr.grad, value=1.0 - b2)
                denom = (gr.exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(s.eps)
                gr.params.addcdiv_(gr.exp_avg, denom, value=-s.lr / bc1)
        gemm = s.retraction in GEMM_RETRACTIONS  # (padding implies a GEMM retraction)
        with self._fork() as on_stream:
            for i, gr in enumerate(self._groups):
                with on_stream(i):
                    u = gr.params[0]
                    u.copy_(self._retract(u, shift=gr.shift) if gemm else self._retract(u))
                    if not gemm:
                        # diverged instances stay at U = D = 0: Householder QR would turn U = 0
                        # back into orthonormal columns (and Cholesky into NaN); the series maps
                        # 0 to 0, so the GPU path skips this pass. D follows: h = x U = 0.
                        gr.params[0].masked_fill_(gr.dead[0], 0.0)

    @contextlib.contextmanager
    def _fork(self):
        """Run each group's work on its own CUDA stream, joined at the end (group_streams).

        A group's kernels are small (the Fig. 2 grid's Gram of 45 encoders of width 128 is 45
        output tiles for 132 SMs), so one group alone leaves most of the GPU idle; the groups
        are independent until Adam, so their kernels may run side by side. Captured into the
        step's CUDA graph as a fork and a join. Yields ``on_stream(i)`` for group i, a context
        manager (a no-op without group streams: one stream, the same order as before).
        """
        if not self._group_streams:
            yield lambda i: contextlib.nullcontext()
            return
        main = torch.cuda.current_stream(self.device)
        used = []

        def on_stream(i: int):
            stream = self._group_streams[i]
            stream.wait_stream(main)
            used.append(stream)
            return torch.cuda.stream(stream)

        yield on_stream
        for stream in used:
            main.wait_stream(stream)

    def _inputs(self, row: int) -> dict[tuple[int, int], Tensor]:
        """x = z B^T of row ``row``, once per seed, for the streams some group reads it from."""
        return {key: torch.bmm(st.z_buf[:, row], st.basis.transpose(1, 2))
                for key, st in self._streams.items() if st.x_used}

    def _group_gradients(self, gr: _Group, xs: dict[tuple[int, int], Tensor], row: int) -> None:
        """gr.grad <- the gradient of row ``row``'s ordinary batch (no injections)."""
        x = xs.get((gr.k, gr.m)) if not gr.rotate else None
        if x is not None and gr.tiled and self.settings.share_inputs:
            seed_shared_gradients(gr.params[0], gr.params[1], x, gr.streams.z_buf[:, row],
                                  gr.coef_buf[:, row], gr.sqrt_lam,
                                  out=(gr.grad[0], gr.grad[1]), residual=self._residual)
        else:
            batch_gradients(gr.params[0], gr.params[1], gr.take(gr.streams.z_buf[:, row]),
                            gr.coef_buf[:, row], gr.sqrt_lam, gr.basis, gr.rotate,
                            out=(gr.grad[0], gr.grad[1]), x=None if x is None else gr.take(x),
                            residual=self._residual)

    def _add_injection(self, gr: _Group, inject: tuple[int, ...]) -> None:
        """Add the gradient of this step's injected rare samples to ``gr.grad``.

        Computed apart from the ordinary batch, for the injecting instances only, batched over
        those with the same injection size m (one [n, m, d] batch each). Appending the rows to
        the group's batch instead would pad every instance to the largest injection, and BLAS
        rounds a sum with extra zero rows differently: an instance's numbers would then depend
        on its group-mates' schedules.
        """
        plan = gr.plans.get(inject)
        if plan is None:
            plan = gr.plans[inject] = self._injection_plan(gr, inject)
        parts, seen_add = plan
        dim, k = gr.dim, gr.k
        for m, js, sel in parts:
            zx = torch.empty(len(js), m, dim, dtype=self.settings.dtype, device=self.device)
            for a, j in enumerate(js):
                zx[a].normal_(generator=self._gen_inject[gr.idx[j]])
            coef = _take(gr.rare_coef, sel).unsqueeze(1).expand(len(js), m, k)
            basis = gr.basis_of(sel)
            gu, gd = batch_gradients(_take(gr.params[0], sel), _take(gr.params[1], sel), zx, coef,
                                     _take(gr.sqrt_lam, sel), basis, gr.rotate)
            _add_at(gr.grad[0], sel, gu)
            _add_at(gr.grad[1], sel, gd)
        gr.seen += seen_add

    def _injection_plan(self, gr: _Group, inject: tuple[int, ...]) -> tuple[list, Tensor]:
        """Sub-batches (m, instances, selector) and the [I, K] rare-count increment."""
        by_size: dict[int, list[int]] = {}
        for j in inject:
            by_size.setdefault(gr.sizes[j], []).append(j)
        parts = []
        for m, js in by_size.items():
            if js == list(range(js[0], js[-1] + 1)):
                sel: slice | Tensor = slice(js[0], js[-1] + 1)
            else:
                sel = torch.tensor(js, dtype=torch.int64, device=self.device)
            parts.append((m, js, sel))
        seen_add = torch.zeros(len(gr.idx), gr.k, dtype=torch.int64)
        for j in inject:
            seen_add[j, self.instances[gr.idx[j]].rare_task] = gr.sizes[j]
        return parts, seen_add.to(self.device)

    # -- recording ------------------------------------------------------------------------------
    def _record(self, callback: Callable[[int], None] | None) -> None:
        te = self.settings.trace_every
        if te and self.step % te == 0 and self.step // te == self._n_traced:
            for gr in self._groups:
                gr.trace_buf[self._n_traced] = rare_signal_norm(
                    gr.params[0], gr.rare_basis, gr.rare_lam, gr.dim, gr.widths
                )
            self._n_traced += 1
        if self.step in self._eval_set and (
            not self._eval_steps or self._eval_steps[-1] < self.step
        ):
            for gr in self._groups:
                gr.evals.append(self._evaluate(gr))
                self._check_divergence(gr)
            self._eval_steps.append(self.step)
            if callback is not None:
                callback(self.step)

    _LOSS_COLUMN = MODEL_COLUMNS.index("loss")

    def _check_divergence(self, gr: _Group) -> None:
        """Mark instances whose parameters or loss are non-finite or exploded (on the device)."""
        loss = gr.evals[-1][:, len(TASK_COLUMNS) * gr.k + self._LOSS_COLUMN]
        finite = torch.isfinite(gr.params).transpose(0, 1).flatten(1).all(1)
        bad = ~finite | ~torch.isfinite(loss) | (loss > DIVERGE_FACTOR * gr.loss0)
        gr.diverged.masked_fill_(bad & (gr.diverged < 0), self.step)
        gr.dead.copy_((gr.diverged >= 0).view(1, -1, 1, 1))
        for t in (gr.params, gr.exp_avg, gr.exp_avg_sq, gr.grad):
            t.masked_fill_(gr.dead, 0.0)

    def diverged(self) -> dict[int, int]:
        """{instance: eval step at which it diverged} (reads the device: call at the end)."""
        out = {}
        for gr in self._groups:
            for j, s in enumerate(gr.diverged.tolist()):
                if s >= 0:
                    out[gr.idx[j]] = int(s)
        return out

    def _evaluate(self, gr: _Group) -> Tensor:
        """[I, len(TASK_COLUMNS) * K + len(MODEL_COLUMNS)] float64 metrics of one group."""
        f64 = torch.float64
        u, d = gr.params[0].to(f64), gr.params[1].to(f64)
        basis = gr.basis_of()
        basis = None if basis is None else basis.to(f64)
        ex = exact_metrics(u, d, basis, gr.lam64, gr.priors64, gr.frequent, gr.widths)
        g_freq, g_rare = self._measure_gradients(gr, u, d, basis)
        nf, nr = g_freq.norm(dim=1), g_rare.norm(dim=1)
        cosine = (g_freq * g_rare).sum(1) / (nf * nr)
        task = [ex[name] for name in TASK_METRICS] + [gr.seen.to(f64)]
        model = [ex[name] for name in MODEL_METRICS] + [nf, nr, cosine]
        return torch.cat([torch.stack(task, 1).flatten(1), torch.stack(model, 1)], 1)

    def _measure_gradients(
        self, gr: _Group, u: Tensor, d: Tensor, basis: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Flattened dL/dU [I, d*N] of a fresh frequent-only batch and a rare-only batch.

        Drawn (float64) from a generator seeded by (instance seed, step): the training streams
        are untouched. Frequent tasks are drawn from pi restricted to F and renormalised.
        """
        bsz, dim, i_n = self.settings.batch_size, gr.dim, len(gr.idx)
        uni = torch.empty(i_n, bsz, dtype=torch.float64, device=self.device)
        z_f = torch.empty(i_n, bsz, dim, dtype=torch.float64, device=self.device)
        z_r = torch.empty_like(z_f)
        for j, i in enumerate(gr.idx):
            gen = _generator(self.device, stream_seed(self.instances[i].seed, _MEASURE, self.step))
            uni[j].uniform_(generator=gen)
            z_f[j].normal_(generator=gen)
            z_r[j].normal_(generator=gen)
        tasks = torch.searchsorted(gr.cdf_freq, uni, right=True).clamp_(max=gr.k - 1)
        onehot = tasks.unsqueeze(-1) == torch.arange(gr.k, device=self.device)
        coef_f = onehot.to(torch.float64) * (2.0 / bsz)
        coef_r = gr.rare_coef.to(torch.float64).unsqueeze(1).expand(i_n, bsz, gr.k)
        sqrt_lam = gr.lam64.sqrt().reshape(i_n, 1, dim)
        g_f, _ = batch_gradients(u, d, z_f, coef_f, sqrt_lam, basis, gr.rotate)
        g_r, _ = batch_gradients(u, d, z_r, coef_r, sqrt_lam, basis, gr.rotate)
        return g_f.flatten(1), g_r.flatten(1)

    # -- results --------------------------------------------------------------------------------
    def eval_steps(self) -> list[int]:
        """Steps whose metrics have been recorded so far."""
        return list(self._eval_steps)

    def metrics(self) -> list[dict]:
        """Recorded metrics in long format, ordered by step, then instance.

        Each row is ``{"instance": i, "step": s, "task": k, "metric": name, "value": float}``;
        ``task`` is -1 for instance-level metrics. Per task: signal, signal_norm, loss_norm,
        features, seen (samples of the task drawn so far, injections included). Per instance:
        loss (sum_k pi_k * loss_k, unnormalised), residual_F, ortho_error (max |U^T U - I|),
        grad_norm_frequent, grad_norm_rare, grad_cosine (Euclidean dL/dU of fresh batch_size
        batches of frequent-only / rare-only samples; NaN cosine when a gradient is 0).
        """
        per_instance: dict[int, np.ndarray] = {}  # instance -> [E, C]
        for gr in self._groups:
            if gr.evals:
                arr = torch.stack(gr.evals).cpu().numpy()  # [E, I, C]
                for j, i in enumerate(gr.idx):
                    per_instance[i] = arr[:, j]
        rows = []
        for e, step in enumerate(self._eval_steps):
            for i in range(len(self.instances)):
                vals, k = per_instance[i][e], self.instances[i].tasks
                for a, name in enumerate(TASK_COLUMNS):
                    for task in range(k):
                        rows.append(dict(instance=i, step=step, task=task, metric=name,
                                         value=float(vals[a * k + task])))
                base = len(TASK_COLUMNS) * k
                for a, name in enumerate(MODEL_COLUMNS):
                    rows.append(dict(instance=i, step=step, task=-1, metric=name,
                                     value=float(vals[base + a])))
        return rows

    def trace_steps(self) -> np.ndarray:
        """[n] steps of the trace points recorded so far."""
        return self.settings.trace_steps[: self._n_traced].copy()

    def traces(self) -> np.ndarray:
        """[n, n_instances] rare task's normalised signal s~_r at :meth:`trace_steps`."""
        out = np.full((self._n_traced, len(self.instances)), np.nan)
        for gr in self._groups:
            out[:, gr.idx] = gr.trace_buf[: self._n_traced].cpu().numpy()
        return out

    def model(self, i: int) -> dict[str, np.ndarray]:
        """Current parameters of instance ``i`` as float64 arrays.

        ``U`` [d, N], ``D`` [K, M, N], ``basis`` [d, d] (columns k*M.. of block k).
        """
        gr, j = self._locate(i)
        n = self.instances[i].width
        u = gr.params[0, j, :, :n].double().cpu().numpy()
        d = gr.params[1, j, :, :n].double().cpu().numpy().reshape(gr.k, gr.m, n)
        b = gr.basis_of(slice(j, j + 1))
        basis = np.eye(gr.dim) if b is None else b[0].double().cpu().numpy()
        return {"U": u, "D": d, "basis": basis}

    def _locate(self, i: int) -> tuple[_Group, int]:
        for gr in self._groups:
            if i in gr.idx:
                return gr, gr.idx.index(i)
        raise IndexError(f"instance {i} out of range [0, {len(self.instances)})")

    # -- checkpointing --------------------------------------------------------------------------
    _PER_INSTANCE = ("U", "D", "adam_avg_U", "adam_avg_D", "adam_sq_U", "adam_sq_D")

    def state_dict(self) -> dict[str, Tensor]:
        """Everything needed to resume bit-exactly, as a flat dict of contiguous CPU tensors.

        Keys: ``step`` (int64 scalar); ``meta.seeds``, ``meta.widths`` ([I] int64, checked on
        load); per instance ``instance.{i}.{U,D,adam_avg_U,adam_avg_D,adam_sq_U,adam_sq_D}``
        (training dtype; D as [K, M, N]), ``instance.{i}.rng_train`` / ``.rng_inject`` (uint8
        generator states; the train state is the one before the chunk holding the next step, which
        is redrawn on resume), ``instance.{i}.seen`` [K] int64, ``instance.{i}.diverged`` (int64
        scalar, -1 or the divergence step), ``instance.{i}.metrics``
        [E, C_i] float64; ``metrics.steps`` [E]; ``traces.values`` [n, I] and ``traces.steps``.
        The basis is not stored (rebuilt from the seed). Safe for ``safetensors.torch.save_file``.
        """
        out: dict[str, Tensor] = {
            "step": torch.tensor(self.step, dtype=torch.int64),
            "meta.seeds": torch.tensor([x.seed for x in self.instances], dtype=torch.int64),
            "meta.widths": torch.tensor([x.width for x in self.instances], dtype=torch.int64),
            "metrics.steps": torch.tensor(self._eval_steps, dtype=torch.int64),
            "traces.values": torch.from_numpy(self.traces()),
            "traces.steps": torch.from_numpy(self.trace_steps()),
        }
        chunk_now = self._chunk == self.step // self.settings.rng_chunk
        for gr in self._groups:
            evals = torch.stack(gr.evals).cpu() if gr.evals else None
            tensors = (gr.params, gr.exp_avg, gr.exp_avg_sq)
            for j, i in enumerate(gr.idx):
                p, n = f"instance.{i}.", self.instances[i].width
                for (name, t) in zip(self._PER_INSTANCE, (x[a] for x in tensors for a in (0, 1)),
                                     strict=True):
                    v = t[j, :, :n].detach().cpu().clone()  # real columns only: any grouping
                    out[p + name] = v.reshape(gr.k, gr.m, n) if name == "D" else v
                key, row = self._stream_of[i]
                st = self._streams[key]
                rng = st.states[row] if chunk_now else st.gens[row].get_state()
                out[p + "rng_train"] = rng.cpu().clone()
                out[p + "rng_inject"] = self._gen_inject[i].get_state().cpu().clone()
                out[p + "seen"] = gr.seen[j].cpu().clone()
                out[p + "diverged"] = gr.diverged[j].cpu().clone()
                n_cols = len(TASK_COLUMNS) * gr.k + len(MODEL_COLUMNS)
                out[p + "metrics"] = (
                    evals[:, j].clone() if evals is not None
                    else torch.zeros(0, n_cols, dtype=torch.float64)
                )
        return {k: v.contiguous() for k, v in out.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore a :meth:`state_dict` taken from a trainer with the same instances/settings."""
        seeds = [x.seed for x in self.instances]
        widths = [x.width for x in self.instances]
        for key, want in (("meta.seeds", seeds), ("meta.widths", widths)):
            if key not in state or state[key].tolist() != want:
                got = state[key].tolist() if key in state else None
                raise UserError(f"state_dict: {key} {got} does not match the instances {want}")
        step = int(state["step"])
        if not 0 <= step <= self.settings.steps:
            raise UserError(f"state_dict: step {step} outside [0, {self.settings.steps}]")
        dev = self.device
        for gr in self._groups:
            tensors = (gr.params, gr.exp_avg, gr.exp_avg_sq)
            for j, i in enumerate(gr.idx):
                p, n = f"instance.{i}.", self.instances[i].width
                for (name, t) in zip(self._PER_INSTANCE, (x[a] for x in tensors for a in (0, 1)),
                                     strict=True):
                    v, dst = state[p + name], t[j, :, :n]
                    if v.dtype != t.dtype or v.numel() != dst.numel():
                        raise UserError(
                            f"state_dict: {p + name} has {v.dtype} {tuple(v.shape)}, expected "
                            f"{t.dtype} with {dst.numel()} elements"
                        )
                    dst.copy_(v.reshape(dst.shape))
                key, row = self._stream_of[i]
                seed = self.instances[i].seed
                _restore_generator(self._streams[key].gens[row], state[p + "rng_train"],
                                   stream_seed(seed, _TRAIN, step))
                _restore_generator(self._gen_inject[i], state[p + "rng_inject"],
                                   stream_seed(seed, _INJECT, step))
                gr.seen[j].copy_(state[p + "seen"])
                if p + "diverged" in state:  # absent from checkpoints older than the check
                    gr.diverged[j].copy_(state[p + "diverged"])
            gr.dead.copy_((gr.diverged >= 0).view(1, -1, 1, 1))
            gr.evals = [
                torch.stack([state[f"instance.{i}.metrics"][e] for i in gr.idx]).to(dev)
                for e in range(len(state["metrics.steps"]))
            ]
            n = len(state["traces.steps"])
            gr.trace_buf.fill_(math.nan)
            gr.trace_buf[:n] = state["traces.values"][:, gr.idx].to(dev)
        self.step = step
        self._eval_steps = state["metrics.steps"].tolist()
        self._n_traced = len(state["traces.steps"])
        self._chunk = None
        for st in self._streams.values():
            st.states = []
        if self._opt is not None:
            for st in self._opt.state.values():
                st["step"].fill_(step)
