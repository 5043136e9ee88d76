"""Several seeds of one language-model cell trained as one model with a seed axis.

The study trains each setting with 3 seeds: the same architecture, steps and data recipe on
different draws and streams. At the study's small steps (2,048-8,192 tokens) one model leaves a
GPU mostly idle (each kernel sees too few tokens) and packing processes does not help at 60m and
up (RESULTS.md). :class:`StackedLMTrainer` trains K such cells as one model, as the toy trains
its instances: every weight becomes [K, ...] (:class:`StackedModel`), the forward is the
model's arithmetic written for stacked weights (each matrix product one batched GEMM over K x
the tokens, one attention call over K x the rows), and one AdamW step updates all K. (The first
version ran ``torch.func.vmap`` over the model: 0.86x one model alone on an H100, RESULTS.md.)

Nothing mixes between seeds, so seed k follows the trajectory :class:`LMTrainer` gives it alone
(up to float rounding; ``tests/test_lm_stacked.py`` pins it within 1e-5 on the CPU):

* each seed's batch comes from its own :class:`LMTrainer` (stream, schedule, instances);
* the seeds' losses are summed before the backward pass, so seed k's gradient is d loss_k;
* each seed's gradient is clipped by its own norm (``clip_grad_norm_``'s rule), and AdamW is
  elementwise, its weight decay on the [K, ...] matrices exactly where a seed's are 2-D;
* the learning-rate schedule is the cells' own (they differ only in the seed).

Each seed keeps an ordinary :class:`LMTrainer` (built by the study as for a cell alone) whose
parameters are views into the stacked weights: evaluation, probes, metrics and the summary row
are that trainer's own, run on its own model. :meth:`StackedLMTrainer.member` returns seed k as
the run lifecycle sees a trainer, with a ``state_dict`` in :class:`LMTrainer`'s format (its
slice of the stacked optimizer state included): a cell's checkpoint and final weights are the
files it would have alone, so a grid may stack its seeds in one visit and train them one by one
in the next (``profile.stack_seeds``, :mod:`raretask.runs.grid`).

A seed that diverges (:meth:`LMTrainer._check_divergence`) is frozen where it diverged, as
alone: its state is kept from that evaluation on, it is fed empty rows, and its counters stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import stack_module_state

from raretask.lm.model import Transformer, apply_rotary, rms_norm
from raretask.lm.trainer import (
    WARMUP_STEPS,
    LMTrainer,
    _attention,
    _deterministic,
    adamw,
    cuda_graphs,
    step_autocast,
    to_device,
)


def _key(name: str) -> str:
    return name.replace(".", "__")  # a ParameterDict key may not hold dots


class StackedModel(nn.Module):
    """K ``Transformer`` s of one configuration, their weights stacked on a leading axis.

    The stacked weights are this module's parameters (``stacked[NAME with __ for .]``), so a
    compiled step treats them as static (CUDA graphs do not copy them in). The RoPE tables are
    shared. :meth:`alias` makes the given models' parameters views into the stacked weights.
    The forward repeats ``Transformer``'s arithmetic (OLMo-2 block: QK-norm, RoPE, SwiGLU, norms
    on the sublayer outputs) for [K, ...] weights; the tests hold each seed's losses and weights
    to its own ``LMTrainer`` run's, so the two cannot drift apart unnoticed.
    """

    def __init__(self, models: list[Transformer]):
        super().__init__()
        cfg = models[0].config
        if any(m.config != cfg for m in models):
            raise ValueError("stacked models must share one configuration")
        params, _ = stack_module_state(models)  # new [K, ...] tensors
        self.names = list(params)
        self.stacked = nn.ParameterDict({_key(n): nn.Parameter(p.detach())
                                         for n, p in params.items()})
        self.register_buffer("rope_cos", models[0].rope_cos.clone(), persistent=False)
        self.register_buffer("rope_sin", models[0].rope_sin.clone(), persistent=False)
        self.config = cfg

    def weight(self, name: str) -> nn.Parameter:
        """The stacked [K, ...] tensor of the ``Transformer`` parameter ``name``."""
        return self.stacked[_key(name)]

    @torch.no_grad()
    def alias(self, models: list[Transformer]) -> None:
        """Point each model's parameters at its slice of the stacked weights (no copy): the
        optimiser's in-place updates show in every model, and a weight loaded into a model
        lands in the stack."""
        for k, model in enumerate(models):
            for name in self.names:
                model.get_parameter(name).data = self.weight(name).data[k]

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Each seed's mean loss [K] for ids and targets [K, B, T]: ``Transformer.forward``'s
        arithmetic written for [K, ...] weights (batched GEMMs, one attention call over K x B
        rows), so every kernel sees K x the tokens of one model's."""
        cfg = self.config
        k, b, t = idx.shape
        w = self.weight
        x = w("embed.weight")[torch.arange(k, device=idx.device).view(k, 1, 1), idx]  # [K,B,T,C]
        x = x.reshape(k, b * t, cfg.d_model)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        for i in range(cfg.n_layers):
            p = f"blocks.{i}."
            h = x + _rms(self._attention(x, p, b, t, cos, sin), w(p + "attn_norm.weight"), cfg)
            x = h + _rms(self._mlp(h, p), w(p + "mlp_norm.weight"), cfg)
        head = "embed.weight" if cfg.tie_embeddings else "lm_head.weight"
        logits = _linear(_rms(x, w("norm.weight"), cfg), w(head))  # [K, B*T, V]
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1),
                                 reduction="none")
        return losses.view(k, b * t).mean(1)

    def _attention(self, x: Tensor, p: str, b: int, t: int, cos: Tensor, sin: Tensor) -> Tensor:
        cfg, w = self.config, self.weight
        k, c, h = x.shape[0], cfg.d_model, cfg.n_heads
        qkv = torch.cat([w(p + "attn.q_proj.weight"), w(p + "attn.k_proj.weight"),
                         w(p + "attn.v_proj.weight")], dim=1)  # [K, 3C, C]: one GEMM a seed
        q, kk, v = _linear(x, qkv).split(c, dim=-1)  # [K, B*T, C] each

        def heads(z: Tensor) -> Tensor:  # [K, B*T, C] -> [K*B, H, T, D]
            return z.reshape(k * b, t, h, c // h).transpose(1, 2)

        q = apply_rotary(heads(_rms(q, w(p + "attn.q_norm.weight"), cfg)), cos, sin)
        kk = apply_rotary(heads(_rms(kk, w(p + "attn.k_norm.weight"), cfg)), cos, sin)
        y = F.scaled_dot_product_attention(q, kk, heads(v), is_causal=True)  # [K*B, H, T, D]
        return _linear(y.transpose(1, 2).reshape(k, b * t, c), w(p + "attn.o_proj.weight"))

    def _mlp(self, x: Tensor, p: str) -> Tensor:
        w = self.weight
        gate_up = torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")], dim=1)
        gate, up = _linear(x, gate_up).chunk(2, dim=-1)
        return _linear(F.silu(gate) * up, w(p + "mlp.down_proj.weight"))


def _linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear`` per seed: x [K, N, in] and weight [K, out, in] -> [K, N, out] (one batched
    GEMM; autocast casts it as it casts ``F.linear``)."""
    return torch.bmm(x, weight.transpose(1, 2))


def _rms(x: Tensor, weight: Tensor, cfg) -> Tensor:
    """``RMSNorm`` per seed: x [K, N, C], weight [K, C]."""
    return rms_norm(x, weight.unsqueeze(1), cfg.norm_eps)


class StackedLMTrainer:
    """Train ``members`` (one :class:`LMTrainer` per seed of one cell, alone on one device) as
    one stacked model; ``compile``/``compile_mode`` as :class:`LMTrainSettings` (the members'
    own step is never used, so they are built without compilation).

    Example::

        >>> stack = StackedLMTrainer([build(seed) for seed in (0, 1, 2)])  # doctest: +SKIP
        >>> stack.run(callback=print); stack.member(1).state_dict()["step"]  # doctest: +SKIP
    """

    def __init__(self, members: list[LMTrainer], compile: bool = False,
                 compile_mode: str = "default"):
        if not members:
            raise ValueError("a stack needs at least one member")
        first = members[0]
        for m in members:
            if m.world != 1:
                raise ValueError("stacked seeds train alone on one device (--parallel cells)")
            if replace(m.settings, seed=0) != replace(first.settings, seed=0):
                raise ValueError("stacked members must differ in the seed only")
            if m.step != first.step:
                raise ValueError("stacked members must start at one step")
        self.members = members
        self.settings = replace(first.settings, compile=compile, compile_mode=compile_mode)
        self.device = first.device
        self.step = first.step
        self.model = StackedModel([m.model for m in members])
        self.model.alias([m.model for m in members])
        # the seed axis makes every matrix 3-D: decay stays on the matrices
        self.optimizer = adamw(self.model.stacked.values(), self.settings, self.device,
                               matrix_dim=3)
        self.forward = self.model
        if compile:
            self.forward = torch.compile(self.model, mode=compile_mode)
        self._graphs = cuda_graphs(self.settings, self.device)
        self._autocast = step_autocast(self.device)
        self._frozen: dict[int, dict] = {}  # diverged seeds: their state where they diverged
        self.timing = {"warmup_s": 0.0, "warmup_steps": 0, "eval_s": 0.0, "evals": 0}

    # -- training -----------------------------------------------------------------------------
    def _train_step(self) -> Tensor:
        s = self.settings
        rows = [m._host_batch() if k not in self._frozen else None
                for k, m in enumerate(self.members)]
        like = next(r for r in rows if r is not None)
        batch = torch.stack([torch.zeros_like(like) if r is None else r for r in rows])
        batch = to_device(batch, self.device)  # [K, B, T + 1]
        for group in self.optimizer.param_groups:
            group["lr"] = s.lr_at(self.step)
        if self._graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self._autocast:
            losses = self.forward(batch[..., :-1], batch[..., 1:])
        losses.sum().backward()  # seeds share no weight: each gets its own loss's gradient
        if s.grad_clip > 0:
            self._clip_per_seed(s.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        for k, m in enumerate(self.members):
            if k not in self._frozen:
                m.step += 1
                m.tokens += s.batch_size * s.seq_len
        return losses.detach()

    @torch.no_grad()
    def _clip_per_seed(self, max_norm: float) -> None:
        """``clip_grad_norm_`` of each seed's own gradient, as it computes it (foreach norms of
        the seed's slices, their norm, coefficient max_norm / (norm + 1e-6) capped at 1): a few
        multi-tensor kernels a seed, not one per weight."""
        grads = [p.grad for p in self.model.stacked.values() if p.grad is not None]
        for k in range(len(self.members)):
            mine = [g[k] for g in grads]
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(mine, 2.0)), 2.0)
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            torch._foreach_mul_(mine, coef)

    def run(self, until: int | None = None, callback: Callable[[int], None] | None = None) -> None:
        """Train every seed to step ``until`` (default: all steps), each evaluated by its own
        trainer at the eval steps (:meth:`LMTrainer.run`)."""
        with _deterministic(self.settings.deterministic), _attention(self.settings.attention):
            self._run(until, callback)
        for m in self.members:  # each cell's log line tells the group's seconds
            m.timing = dict(self.timing)

    def _live(self) -> list[tuple[int, LMTrainer]]:
        return [(k, m) for k, m in enumerate(self.members) if k not in self._frozen]

    def _evaluate(self, losses: Tensor | None) -> None:
        with self.members[0]._timed_eval(self.timing):  # one evaluation of every live seed
            for k, m in self._live():
                row = m._evaluate(None if losses is None else losses[k])
                m._check_divergence(row)
                if m.diverged_step is not None:
                    self._frozen[k] = self._member_state(k)

    def _run(self, until: int | None, callback: Callable[[int], None] | None) -> None:
        end = self.settings.steps if until is None else min(until, self.settings.steps)
        evals = set(self.settings.eval_steps)
        if self.step == 0 and 0 in evals and not self.members[0].records:
            self._evaluate(None)
            if callback:
                callback(0)
        while self.step < end and self._live():
            warm = self.timing["warmup_steps"] < WARMUP_STEPS
            t0 = time.perf_counter() if warm else 0.0
            losses = self._train_step()
            if warm:
                self.members[0]._sync()
                self.timing["warmup_s"] += time.perf_counter() - t0
                self.timing["warmup_steps"] += 1
            if self.step in evals:
                self._evaluate(losses)
                if callback:
                    callback(self.step)

    # -- one seed as the run lifecycle sees a trainer -------------------------------------------
    def member(self, k: int) -> StackedMember:
        return StackedMember(self, k)

    def _pairs(self, k: int):
        """(stacked parameter, seed k's parameter) for every weight."""
        model = self.members[k].model
        return [(self.model.weight(n), model.get_parameter(n)) for n in self.model.names]

    def _member_state(self, k: int) -> dict:
        """Seed k's :meth:`LMTrainer.state_dict`: its weights (views into the stack) and its
        slice of every stacked optimiser moment, lent to its own AdamW for the call."""
        if k in self._frozen:
            return self._frozen[k]
        m = self.members[k]
        own = m.optimizer.state
        for big, p in self._pairs(k):
            st = self.optimizer.state.get(big)
            if st:
                own[p] = {name: (v[k] if v.dim() == big.dim() else v).clone()
                          for name, v in st.items()}
        try:
            return m.state_dict()
        finally:
            own.clear()

    def _load_member(self, k: int, state: dict) -> None:
        """Seed k's checkpoint: weights into its slice of the stack, its optimiser moments into
        the stacked ones, and its stream, counters and metrics into its trainer."""
        m = self.members[k]
        m.load_state_dict(state)  # the weights land in the views, i.e. in the stack
        own = m.optimizer.state
        with torch.no_grad():
            for big, p in self._pairs(k):
                st = own.get(p)
                if not st:
                    continue
                dst = self.optimizer.state[big]
                for name, v in st.items():
                    if v.dim() == big.dim() - 1:  # a moment: seed k's slice of the stacked one
                        if name not in dst:
                            dst[name] = torch.zeros_like(big, dtype=v.dtype)
                        dst[name][k].copy_(v)
                    else:  # the step count, one for every seed
                        dst[name] = v.clone()
        own.clear()
        if m.diverged_step is not None:
            self._frozen[k] = self._member_state(k)

    def align(self) -> bool:
        """After loading checkpoints: whether the live seeds stand at one step (then the stack
        continues from it). Checkpoints written by separate runs may not; the grid then trains
        those cells one by one."""
        steps = {m.step for _, m in self._live()}
        if len(steps) > 1:
            return False
        self.step = steps.pop() if steps else self.step
        return True


class StackedMember:
    """Seed k of a :class:`StackedLMTrainer` as the run lifecycle and the study see a trainer:
    ``state_dict``/``load_state_dict`` in :class:`LMTrainer`'s format, everything else the
    seed's own trainer (metrics, step, timing, task, stream)."""

    def __init__(self, stack: StackedLMTrainer, k: int):
        self._stack, self._k = stack, k

    @property
    def stacked(self) -> int:
        """How many seeds train in the stack (a cell's log line says so)."""
        return len(self._stack.members)

    def __getattr__(self, name: str):
        return getattr(self._stack.members[self._k], name)

    def state_dict(self) -> dict:
        return self._stack._member_state(self._k)

    def load_state_dict(self, state: dict) -> None:
        self._stack._load_member(self._k, state)


__all__ = ["StackedLMTrainer", "StackedMember", "StackedModel"]
