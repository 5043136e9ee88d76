"""Probes of a language model's inner state (PAPER.md Sec. 3: gradient interference, features).

Two kinds, both read-only: a probe never touches ``.grad``, the train/eval flag or any RNG state
of the model it looks at, so a trainer may call it between two optimizer steps.

**Gradient cosines** (:class:`GradientProbe`). Definitions:

* *Neurons.* The hidden units of block ``layer``'s SwiGLU MLP (default block 0, "the first
  layer"): ``down(silu(gate(x)) * up(x))`` has ``mlp_hidden`` of them. Neuron n owns row n of
  ``gate_proj.weight`` [H, C], row n of ``up_proj.weight`` [H, C] and column n of
  ``down_proj.weight`` [C, H]: 3 C parameters (:meth:`MLPGradient.neurons` lays them out as
  ``[gate row, up row, down column]``).
* *Reference* g_r: the gradient of the task loss, the mean cross-entropy of LABEL given
  TOK1 TOK2 over **all** 10K instances of the task (``split="all"``), accumulated over chunks of
  about ``chunk_tokens`` tokens (each chunk's sum is divided by the full count, so the result
  equals one 10K batch).
* *Selection.* A neuron's magnitude is the L2 norm of g_r over its 3 C parameters; the probe keeps
  the ``k`` (default 64) largest, ties to the lower index (:func:`top_neurons`).
* *Split.* For a training batch ``tokens`` [B, T+1] (``idx, targets = tokens[:, :-1],
  tokens[:, 1:]``) the training loss is the mean next-token loss over the B T targets (the
  trainer's loss; with ``loss_mask`` [B, T] the masked mean of ``Transformer.forward``). Task
  tokens are the targets where ``task_mask[:, 1:]`` is True; with the mask of
  :func:`~raretask.lm.tasks.inject` those are the LABEL targets only (our choice: LABEL is the
  only token of an instance the task determines; pass a wider mask to count TOK2 and EOD too).
  g_t is the gradient of (sum of the losses at task targets) / N and g_nt that of (sum at the
  other targets) / N with the training loss's N, so g = g_t + g_nt exactly.
* *Cosines.* cos(g, g_r), cos(g_t, g_r), cos(g_nt, g_r) of the flattened [k, 3 C] selections,
  in float64. A zero vector (a batch without instances has g_t = 0) gives NaN.

Gradients come from ``torch.autograd.grad`` on the three whole weight tensors (the neuron slices
are indexed afterwards), so every other parameter is left out of the backward's outputs.

**Feature presence**. Both read the residual stream at the symbol positions: each of the
100 symbols is fed as a one-token context and the output of each block at position 0 is caught
by a forward hook (:func:`symbol_states`). In a causal model position 0 sees only itself, so this
is also the state at TOK1 of every instance that starts with that symbol.

* T_CMP (:func:`order_r2`): regress the hidden order (``task.values``, the rank of each symbol)
  on the top ``n_components`` (default 50) principal components of block 0's output [100, C].
  With 100 points, 50 components and an intercept an in-sample fit explains about half the
  variance of pure noise, so the headline number ``r2`` is the **leave-one-out** R^2 (PRESS:
  1 - sum_i (e_i / (1 - h_ii))^2 / sum_i (y_i - mean y)^2, exact, no folds to seed). The
  principal components are computed once from all 100 states (unsupervised; the order is never
  used), and only the regression is left out point by point. ``r2_fit`` is the in-sample R^2.
  Components are capped at the rank of the centred states and at 98 (n - 2).
* T_ADD (:func:`fourier_modes`): for each block's output, order the 100 states by their integer
  value v, centre them over v, take the DFT over v and sum the power over the C hidden dims. The
  power of frequency k (1 <= k <= 50) is that of DFT bins k and 100 - k (bin 50 alone for
  k = 50); its share is that power over the total of bins 1..99. Frequency k is **present** when
  its share exceeds ``factor`` (default 5) times its share under a flat spectrum (2/99, or 1/99
  for k = 50), i.e. > 10/99 for k < 50: at most 9 frequencies per layer. The probe reports the
  present frequencies per layer and their union across layers; the paper's "number of Fourier
  modes" is the size of the union. The same rule on the token embeddings of the 100 symbols
  (:func:`embedding_fourier_modes`) is recorded beside it: a 64-wide model that learned T_ADD
  had three modes there (shares 0.20, 0.11, 0.053 at k = 50) and none above the threshold in
  its block outputs (peak 0.058; benchmarks/RESULTS.md).

**In training** (:func:`probe_metrics`, called by :class:`~raretask.lm.trainer.LMTrainer` at
every evaluation when ``probes`` is on): the metrics ``cos_g_gr``, ``cos_gt_gr``, ``cos_gnt_gr``
(the three cosines, measured on the batch the next injection step would train on) and
``order_r2`` (T_CMP, the leave-one-out R^2) or ``fourier_modes`` (T_ADD, the size of the union)
and ``fourier_modes_embedding`` (T_ADD, the count on the symbols' token embeddings).

Example::

    >>> from raretask.lm.model import ModelConfig
    >>> from raretask.lm.tasks import RareTask, inject
    >>> model = ModelConfig.preset("tiny").build()
    >>> task = RareTask("cmp", vocab_size=256, eod_id=0, seed=0)
    >>> tokens, mask = inject(torch.randint(1, 256, (8, 17)), task.instances("train")[:2])
    >>> cos = GradientProbe(task, k=16).measure(model, tokens, mask)
    >>> sorted(cos.as_row())
    ['cos_g', 'cos_nt', 'cos_t']
    >>> feature_presence(model, task).r2 < 0.3  # leave-one-out R^2 of the order at init
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from raretask.errors import UserError
from raretask.lm.tasks import LABEL_POSITION, RareTask, Split

DEFAULT_K = 64
"""Neurons kept by the gradient probe (paper: "top-K first-layer MLP neurons")."""
DEFAULT_COMPONENTS = 50
"""Principal components in the T_CMP regression (paper: top 50)."""
DEFAULT_FACTOR = 5.0
"""A Fourier frequency is present above this many times its flat-spectrum power share."""


# -- model access -------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """The plain Transformer inside ``torch.compile`` (``_orig_mod``) and DDP (``module``)."""
    while not hasattr(model, "blocks"):
        inner = model._modules.get("_orig_mod")
        inner = model._modules.get("module") if inner is None else inner
        if inner is None:
            raise UserError(f"{type(model).__name__} has no transformer blocks to probe")
        model = inner
    return model


def _check_layer(model: nn.Module, layer: int) -> None:
    n = len(model.blocks)
    if not 0 <= layer < n:
        raise UserError(f"probe layer must be in 0..{n - 1} for a model of {n} blocks, got {layer}")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# -- gradients ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MLPGradient:
    """A gradient w.r.t. one block's SwiGLU weights: gate [H, C], up [H, C], down [C, H]."""

    gate: Tensor
    up: Tensor
    down: Tensor

    def neuron_norms(self) -> Tensor:
        """[H] L2 norm of each neuron's 3 C entries (its gate row, up row and down column)."""
        sq = self.gate.double().pow(2).sum(1) + self.up.double().pow(2).sum(1)
        return (sq + self.down.double().pow(2).sum(0)).sqrt()

    def neurons(self, index: Tensor) -> Tensor:
        """[k, 3 C] the entries of neurons ``index`` [k]: gate row, up row, down column."""
        index = index.to(self.gate.device)
        return torch.cat([self.gate[index], self.up[index], self.down[:, index].T], dim=1)

    def __add__(self, other: MLPGradient) -> MLPGradient:
        return MLPGradient(self.gate + other.gate, self.up + other.up, self.down + other.down)


def top_neurons(reference: MLPGradient, k: int = DEFAULT_K) -> Tensor:
    """Indices [k] of the neurons with the largest ``reference`` norm, largest first.

    Ties go to the lower index (a stable sort), so the choice is deterministic.
    """
    norms = reference.neuron_norms()
    if not 1 <= k <= norms.numel():
        raise UserError(f"probe k must be in 1..{norms.numel()} (the MLP's hidden width), got {k}")
    return torch.argsort(-norms, stable=True)[:k]


def _cos(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    den = a.norm() * b.norm()
    return float("nan") if den == 0 else float(a @ b / den)


@dataclass(frozen=True)
class GradientCosines:
    """What :meth:`GradientProbe.measure` returns; ``as_row()`` gives the three cosines."""

    cos_g: float
    """cos(g, g_r): the whole batch gradient against the task reference."""
    cos_t: float
    """cos(g_t, g_r): the task tokens' part (NaN when the batch has no task token)."""
    cos_nt: float
    """cos(g_nt, g_r): the other tokens' part."""
    norms: dict[str, float]
    """L2 norms of g, g_t, g_nt, g_r on the selected neurons (keys ``g``, ``t``, ``nt``, ``r``)."""
    neurons: Tensor
    """[k] the selected hidden units of block ``layer``, largest reference norm first."""
    layer: int

    def as_row(self) -> dict[str, float]:
        return {"cos_g": self.cos_g, "cos_t": self.cos_t, "cos_nt": self.cos_nt}


@dataclass(frozen=True)
class GradientProbe:
    """Gradient cosines on the top-``k`` MLP neurons of block ``layer`` (module docstring).

    Parameters
    ----------
    task : the task whose instances define the reference gradient g_r.
    k : neurons kept (1 .. mlp_hidden).
    layer : the block whose MLP is probed (0: the first layer).
    split : the instances behind g_r: "all" (the paper: all 10K), "train" or "test".
    chunk_tokens : tokens per forward/backward: chunks of max(1, chunk_tokens // T) rows of T
        input tokens (T = 2 for the instances behind g_r, the sequence length for a training
        batch). Bounds memory (the [rows, T, V] logits dominate); the result does not depend
        on it beyond float rounding.
    autocast_dtype : run forwards under ``torch.autocast`` with this dtype (e.g. bf16 as in
        training); None (default) computes in the parameters' dtype.

    The constructor only validates and stores; :meth:`measure` does the work.

    Example::

        >>> probe = GradientProbe(task, k=64)  # doctest: +SKIP
        >>> probe.measure(model, tokens, task_mask).as_row()  # doctest: +SKIP
        {'cos_g': 0.08, 'cos_t': 0.41, 'cos_nt': 0.01}
    """

    task: RareTask
    k: int = DEFAULT_K
    layer: int = 0
    split: Split = "all"
    chunk_tokens: int = 4096
    autocast_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise UserError(f"probe k must be >= 1, got {self.k}")
        if self.layer < 0:
            raise UserError(f"probe layer must be >= 0, got {self.layer}")
        if self.chunk_tokens < 1:
            raise UserError(f"probe chunk_tokens must be >= 1, got {self.chunk_tokens}")
        if self.split not in ("all", "train", "test"):
            raise UserError(f"probe split must be 'all', 'train' or 'test', got {self.split!r}")

    def _rows(self, seq_len: int) -> int:
        return max(1, self.chunk_tokens // seq_len)

    def reference(self, model: nn.Module) -> MLPGradient:
        """g_r: the gradient of the mean LABEL loss over the ``split`` instances."""
        model = _unwrap(model)
        _check_layer(model, self.layer)
        inst = self.task.instances(self.split).to(_device(model))
        n = inst.shape[0]
        # idx = TOK1 TOK2, targets = TOK2 LABEL; only position 1 (LABEL) carries weight
        weight = torch.zeros(2, device=inst.device)
        weight[LABEL_POSITION - 1] = 1.0 / n
        chunks = (
            (
                part[:, :LABEL_POSITION],
                part[:, 1 : LABEL_POSITION + 1],
                [weight.expand(len(part), -1)],
            )
            for part in inst.split(self._rows(LABEL_POSITION))
        )
        (g_r,) = _accumulate(model, self.layer, chunks, 1, self.autocast_dtype)
        return g_r

    def split_gradient(
        self, model: nn.Module, tokens: Tensor, task_mask: Tensor, loss_mask: Tensor | None = None
    ) -> tuple[MLPGradient, MLPGradient]:
        """(g_t, g_nt) for a training batch; g = g_t + g_nt is its training-loss gradient.

        ``tokens`` [B, T+1] and ``task_mask`` [B, T+1] as :func:`~raretask.lm.tasks.inject`
        returns them; ``loss_mask`` [B, T] (aligned with the targets, as
        ``Transformer.forward``'s) restricts the training loss, None = every target.
        """
        model = _unwrap(model)
        _check_layer(model, self.layer)
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise UserError(f"tokens must be [B, T+1] with T >= 1, got {list(tokens.shape)}")
        if task_mask.shape != tokens.shape:
            raise UserError(
                f"task_mask shape {list(task_mask.shape)} differs from tokens {list(tokens.shape)}"
            )
        b, t = tokens.shape[0], tokens.shape[1] - 1
        if loss_mask is not None and tuple(loss_mask.shape) != (b, t):
            raise UserError(
                f"loss_mask must be [B, T] = {[b, t]} (aligned with the targets), "
                f"got {list(loss_mask.shape)}"
            )
        dev = _device(model)
        tokens, is_task = tokens.to(dev), task_mask[:, 1:].to(dev, torch.bool)
        counted = torch.ones_like(is_task) if loss_mask is None else loss_mask.to(dev, torch.bool)
        n = counted.sum().clamp(min=1).to(torch.float32)  # Transformer.forward's normalisation
        w_t = (is_task & counted).float() / n
        w_nt = (~is_task & counted).float() / n
        size = self._rows(t)
        chunks = (
            (tok[:, :-1], tok[:, 1:], [wt, wn])
            for tok, wt, wn in zip(
                tokens.split(size), w_t.split(size), w_nt.split(size), strict=True
            )
        )
        g_t, g_nt = _accumulate(model, self.layer, chunks, 2, self.autocast_dtype)
        return g_t, g_nt

    def measure(
        self,
        model: nn.Module,
        tokens: Tensor,
        task_mask: Tensor,
        loss_mask: Tensor | None = None,
        reference: MLPGradient | None = None,
    ) -> GradientCosines:
        """The three cosines for one training batch (see :meth:`split_gradient` for the inputs).

        ``reference`` reuses a g_r from :meth:`reference` (it must come from the same weights);
        None computes it.
        """
        if reference is None:
            reference = self.reference(model)
        g_t, g_nt = self.split_gradient(model, tokens, task_mask, loss_mask)
        neurons = top_neurons(reference, self.k)
        r, t, nt = (x.neurons(neurons).double() for x in (reference, g_t, g_nt))
        g = t + nt
        norms = {name: float(v.norm()) for name, v in (("g", g), ("t", t), ("nt", nt), ("r", r))}
        return GradientCosines(
            cos_g=_cos(g, r),
            cos_t=_cos(t, r),
            cos_nt=_cos(nt, r),
            norms=norms,
            neurons=neurons.cpu(),
            layer=self.layer,
        )


@contextlib.contextmanager
def _requiring_grad(params: Sequence[Tensor]) -> Iterator[None]:
    """Let autograd reach ``params`` even if they are frozen; restore the flags afterwards."""
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)


def _accumulate(model, layer, chunks, n_out, autocast_dtype) -> list[MLPGradient]:
    """The worker behind both gradients: sum over chunks of d(sum(losses * w_j)) / d(MLP weights).

    ``chunks`` yields ``(idx [b, t], targets [b, t], [w_1 .. w_n_out] each [b, t])``; returns
    ``n_out`` gradients, accumulated in float32. A chunk whose weight is all zero is skipped.
    """
    mlp = model.blocks[layer].mlp
    params = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    sums = [[torch.zeros_like(p, dtype=torch.float32) for p in params] for _ in range(n_out)]
    with torch.enable_grad(), _requiring_grad(params):
        for idx, targets, weights in chunks:
            live = [j for j, w in enumerate(weights) if bool(w.any())]
            if not live:
                continue
            with _autocast(idx.device, autocast_dtype):
                losses = model.token_losses(idx, targets)  # [b, t] float32
            for pos, j in enumerate(live):
                obj = (losses * weights[j]).sum()
                grads = torch.autograd.grad(obj, params, retain_graph=pos < len(live) - 1)
                for acc, g in zip(sums[j], grads, strict=True):
                    acc.add_(g.float())
    return [MLPGradient(*s) for s in sums]


# -- feature presence ---------------------------------------------------------------------------
@torch.no_grad()
def symbol_states(
    model: nn.Module,
    task: RareTask,
    layers: Sequence[int] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """[len(layers), 100, C] float32 CPU: the output of each block in ``layers`` (default all)
    at position 0, with symbol i (``task.symbols[i]``) as a one-token context; row i = symbol i.

    The states are caught by forward hooks, removed before returning.
    """
    model = _unwrap(model)
    layers = list(range(len(model.blocks))) if layers is None else list(layers)
    for layer in layers:
        _check_layer(model, layer)
    caught: dict[int, Tensor] = {}
    hooks = [
        model.blocks[layer].register_forward_hook(
            lambda _m, _inp, out, layer=layer: caught.__setitem__(layer, out[:, 0].float().cpu())
        )
        for layer in layers
    ]
    try:
        idx = task.symbols[:, None].to(_device(model))  # [100, 1]
        with _autocast(idx.device, autocast_dtype):
            model.logits(idx)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([caught[layer] for layer in layers])


@dataclass(frozen=True)
class OrderR2:
    """What :func:`order_r2` returns."""

    r2: float
    """Leave-one-out R^2 (PRESS) of the order on the principal components: the headline number."""
    r2_fit: float
    """In-sample R^2 of the same regression (optimistic: ~p/n on noise)."""
    n_components: int
    """Principal components used: min(requested, rank of the centred states, n - 2)."""


def order_r2(states: Tensor, order: Tensor, n_components: int = DEFAULT_COMPONENTS) -> OrderR2:
    """R^2 of a linear regression (with intercept) of ``order`` [n] on the top ``n_components``
    principal components of ``states`` [n, C] (module docstring: leave-one-out, fixed PCA)."""
    if n_components < 1:
        raise UserError(f"n_components must be >= 1, got {n_components}")
    x = torch.as_tensor(states).detach().cpu().double().numpy()
    y = torch.as_tensor(order).detach().cpu().double().numpy()
    n = x.shape[0]
    if x.ndim != 2 or y.shape != (n,) or n < 3:
        raise UserError(
            f"states must be [n, C] and order [n] with n >= 3, "
            f"got {list(x.shape)} and {list(y.shape)}"
        )
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    rank = int((s > s[0] * 1e-10).sum()) if s.size and s[0] > 0 else 0
    p = min(n_components, rank, n - 2)
    u = u[:, :p]  # orthonormal, orthogonal to the constant (centred): hat = 1/n + U U^T
    yc = y - y.mean()
    tss = float(yc @ yc)
    if tss == 0:
        raise UserError("order is constant: R^2 is undefined")
    resid = yc - u @ (u.T @ yc)
    leverage = 1.0 / n + (u * u).sum(1)
    press = float(((resid / (1.0 - leverage)) ** 2).sum())
    return OrderR2(r2=1.0 - press / tss, r2_fit=1.0 - float(resid @ resid) / tss, n_components=p)


@dataclass(frozen=True)
class FourierModes:
    """What :func:`fourier_modes` returns."""

    per_layer: tuple[tuple[int, ...], ...]
    """Present frequencies (1 .. n/2) of each layer, ascending."""
    union: tuple[int, ...]
    """Frequencies present in at least one layer."""
    share: Tensor
    """[layers, n/2] float64: power share of frequency k = 1 .. n/2 (column k - 1)."""

    @property
    def count(self) -> int:
        """The number of Fourier modes present across layers: ``len(union)``."""
        return len(self.union)

    @property
    def counts(self) -> tuple[int, ...]:
        """Present frequencies per layer."""
        return tuple(len(m) for m in self.per_layer)


def fourier_modes(states: Tensor, values: Tensor, factor: float = DEFAULT_FACTOR) -> FourierModes:
    """Fourier modes of ``states`` [layers, n, C] (or [n, C]) over the integer ``values`` [n]
    (a permutation of 0 .. n-1; row i has value ``values[i]``); module docstring for the rule."""
    if not factor > 0:
        raise UserError(f"factor must be > 0, got {factor}")
    x = torch.as_tensor(states).detach().cpu().double()
    x = x[None] if x.dim() == 2 else x
    v = torch.as_tensor(values).long().cpu()
    n = v.numel()
    if x.dim() != 3 or x.shape[1] != n:
        raise UserError(f"states must be [layers, n, C] with n = {n} values, got {list(x.shape)}")
    if not torch.equal(torch.sort(v).values, torch.arange(n)):
        raise UserError(f"values must be a permutation of 0..{n - 1}")
    ordered = x[:, torch.argsort(v)]  # row v = the state of value v
    ordered = ordered - ordered.mean(1, keepdim=True)
    bins = torch.fft.fft(ordered, dim=1).abs().pow(2).sum(-1)  # [layers, n]
    half = n // 2
    k = torch.arange(1, half + 1)
    power = bins[:, k] + torch.where(k < n - k, bins[:, (n - k) % n], torch.zeros_like(bins[:, k]))
    n_bins = (k < n - k).double() + 1.0  # 2 bins per frequency, 1 for k = n/2 when n is even
    total = bins[:, 1:].sum(1, keepdim=True)
    share = torch.where(total > 0, power / total.clamp(min=1e-300), torch.zeros_like(power))
    present = share > factor * n_bins / (n - 1)
    per_layer = tuple(tuple(int(f) for f in k[row]) for row in present)
    union = tuple(sorted({f for modes in per_layer for f in modes}))
    return FourierModes(per_layer=per_layer, union=union, share=share)


def embedding_fourier_modes(model: nn.Module, task: RareTask,
                            factor: float = DEFAULT_FACTOR) -> FourierModes:
    """:func:`fourier_modes` of the token embeddings of ``task``'s 100 symbols (one layer)."""
    weight = _unwrap(model).embed.weight.detach()
    return fourier_modes(weight[task.symbols.to(weight.device)][None], task.values, factor)


def feature_presence(
    model: nn.Module,
    task: RareTask,
    n_components: int = DEFAULT_COMPONENTS,
    factor: float = DEFAULT_FACTOR,
    autocast_dtype: torch.dtype | None = None,
) -> OrderR2 | FourierModes:
    """The paper's presence measure for ``task``: :class:`OrderR2` of block 0 for T_CMP,
    :class:`FourierModes` over every block for T_ADD (module docstring for both)."""
    if task.kind == "cmp":
        states = symbol_states(model, task, [0], autocast_dtype)[0]
        return order_r2(states, task.values, n_components)
    return fourier_modes(symbol_states(model, task, None, autocast_dtype), task.values, factor)


def probe_metrics(
    model: nn.Module,
    task: RareTask,
    tokens: Tensor | None = None,
    task_mask: Tensor | None = None,
    k: int = DEFAULT_K,
    autocast_dtype: torch.dtype | None = None,
    between: Tensor | None = None,
    chunk_tokens: int = 4096,
) -> dict[str, float]:
    """What a trainer records at one evaluation, as metric name -> value.

    ``cos_g_gr``, ``cos_gt_gr``, ``cos_gnt_gr``: :meth:`GradientProbe.measure` of the batch
    ``tokens`` [B, T+1] with its ``task_mask`` (left out when ``tokens`` is None, and a cosine
    that is NaN, i.e. a zero gradient, is left out too); ``cos_g_gr_between``: cos(g, g_r) of
    the batch ``between`` [B, T+1], which carries no instance (a step between injections,
    where g is all other tokens'), against the same g_r; ``order_r2`` (T_CMP) or
    ``fourier_modes`` (T_ADD): :func:`feature_presence`; ``fourier_modes_embedding`` (T_ADD):
    :func:`embedding_fourier_modes`. ``chunk_tokens``: :class:`GradientProbe`'s (memory
    against kernel launches; the result does not depend on it beyond float rounding).

    Example::

        >>> probe_metrics(model, task, tokens, mask, k=16)  # doctest: +SKIP
        {'cos_g_gr': 0.02, 'cos_gt_gr': 0.61, 'cos_gnt_gr': -0.01, 'order_r2': 0.12}
    """
    row: dict[str, float] = {}
    probe = GradientProbe(task, k=k, autocast_dtype=autocast_dtype, chunk_tokens=chunk_tokens)
    reference = probe.reference(model) if tokens is not None or between is not None else None
    if tokens is not None:
        cos = probe.measure(model, tokens, task_mask, reference=reference)
        for name, value in (("cos_g_gr", cos.cos_g), ("cos_gt_gr", cos.cos_t),
                            ("cos_gnt_gr", cos.cos_nt)):
            if value == value:  # not NaN
                row[name] = value
    if between is not None:
        cos = probe.measure(model, between, torch.zeros_like(between, dtype=torch.bool),
                            reference=reference)
        if cos.cos_g == cos.cos_g:
            row["cos_g_gr_between"] = cos.cos_g
    presence = feature_presence(model, task, autocast_dtype=autocast_dtype)
    if isinstance(presence, OrderR2):
        row["order_r2"] = presence.r2
    else:
        row["fourier_modes"] = float(presence.count)
        row["fourier_modes_embedding"] = float(embedding_fourier_modes(model, task).count)
    return row


__all__ = [
    "DEFAULT_COMPONENTS",
    "DEFAULT_FACTOR",
    "DEFAULT_K",
    "FourierModes",
    "GradientCosines",
    "GradientProbe",
    "MLPGradient",
    "OrderR2",
    "embedding_fourier_modes",
    "feature_presence",
    "fourier_modes",
    "order_r2",
    "probe_metrics",
    "symbol_states",
    "top_neurons",
]
