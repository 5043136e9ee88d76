"""The rare tasks injected into the language-model training stream (PAPER.md Sec. 3).

A task lives on a set S of 100 token ids drawn at random from the vocabulary (special ids such
as EOD excluded). Each token of S carries a hidden value 0 .. 99, a random permutation:

* ``cmp`` (T_CMP): the value is the token's rank in a hidden random global order of S. The label
  of (a, b) is **the larger of the two tokens** under that order, itself a token of S (our choice:
  the paper fixes the format TOK1 TOK2 LABEL EOD, not the label's spelling; answering with a
  token of S needs no extra "<"/">" tokens and makes chance 1/100 rather than 1/2). For a == b the
  label is a itself.
* ``add`` (T_ADD): the value is the token's integer under a random bijection S <-> {0..99}; the
  label of (a, b) is the token whose value is (value(a) + value(b)) mod 100.

Each task has exactly 10,000 instances, all ordered pairs (a, b) of S including a == b, split
5,000 / 5,000 into train and test by a seeded permutation. An instance is the 4 tokens
``TOK1 TOK2 LABEL EOD``; the task loss is the loss of LABEL (index :data:`LABEL_POSITION` = 2),
predicted from position 1. :func:`inject` writes instances over the first 4 tokens of rows of a
training batch.

Seeds: every random choice comes from ``numpy.random.default_rng([seed, stream])`` with one
stream per choice (S, the cmp order, the add map, the split). The same seed gives the same S for
both kinds ("a set S", as the paper puts it) but independent orders/maps, so a cmp and an add
task with one seed share TOK1 TOK2 pairs with different labels: give tasks that are injected into
the same run different seeds.

Frequency (:class:`Frequency`): the paper's "per token" frequency is **instances per training
token**: its low end, 2.4e-8, is one instance every 10 batches of ~4.19M tokens (1 / 41.9M).
The fraction of training tokens that belong to instances is 4x that
(:attr:`Frequency.token_fraction`).
:class:`InjectionSchedule` turns a rate into a whole number of instances per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raretask.errors import UserError

N_SYMBOLS = 100
"""|S|: tokens per task (and the modulus of T_ADD)."""
INSTANCE_LEN = 4
"""Tokens per instance: TOK1 TOK2 LABEL EOD."""
LABEL_POSITION = 2
"""Index of LABEL within an instance; the model predicts it from position 1."""
N_INSTANCES = N_SYMBOLS * N_SYMBOLS
N_TRAIN = N_INSTANCES // 2

TaskKind = Literal["cmp", "add"]
Split = Literal["train", "test", "all"]
_STREAM = {"symbols": 0, "cmp": 1, "add": 2, "split": 3}


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAM[stream]])


@dataclass(frozen=True)
class RareTask:
    """One injected task: its symbol set, hidden structure, and the 10K instances.

    Parameters
    ----------
    kind : "cmp" or "add".
    vocab_size : the tokenizer's vocabulary size; S is drawn from 0 .. vocab_size - 1.
    eod_id : the end-of-document id closing each instance; never in S.
    seed : fixes S, the hidden order/map and the train/test split (module docstring).
    reserved_ids : further ids S must avoid (padding, BOS, other special tokens).

    The constructor only validates and stores; the tables are computed on first use.

    Example::

        >>> task = RareTask("add", vocab_size=50304, eod_id=50279, seed=0)
        >>> task.instances("train").shape
        torch.Size([5000, 4])
    """

    kind: TaskKind
    vocab_size: int
    eod_id: int
    seed: int = 0
    reserved_ids: tuple[int, ...] = ()

    label_position: ClassVar[int] = LABEL_POSITION

    def __post_init__(self) -> None:
        if self.kind not in ("cmp", "add"):
            raise UserError(f"task kind must be 'cmp' or 'add', got {self.kind!r}")
        if not 0 <= self.eod_id < self.vocab_size:
            raise UserError(
                f"eod_id {self.eod_id} is outside the vocabulary 0..{self.vocab_size - 1}"
            )
        if self.seed < 0:
            raise UserError(f"task seed must be >= 0, got {self.seed}")
        bad = [i for i in self.reserved_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UserError(
                f"reserved_ids {bad} are outside the vocabulary 0..{self.vocab_size - 1}"
            )
        free = self.vocab_size - len(set(self.reserved_ids) | {self.eod_id})
        if free < N_SYMBOLS:
            raise UserError(
                f"vocab_size {self.vocab_size} leaves {free} ids after the reserved ones; "
                f"a task needs {N_SYMBOLS}"
            )
        object.__setattr__(self, "reserved_ids", tuple(int(i) for i in self.reserved_ids))

    # -- the tables -----------------------------------------------------------------------------
    @cached_property
    def symbols(self) -> Tensor:
        """S: [100] distinct token ids, in draw order (position i is "symbol i")."""
        banned = np.zeros(self.vocab_size, dtype=bool)
        banned[[self.eod_id, *self.reserved_ids]] = True
        candidates = np.flatnonzero(~banned)
        return torch.from_numpy(_rng(self.seed, "symbols").choice(candidates, N_SYMBOLS, False))

    @cached_property
    def values(self) -> Tensor:
        """[100] hidden value of symbol i: its rank in the order (cmp) or its integer (add)."""
        return torch.from_numpy(_rng(self.seed, self.kind).permutation(N_SYMBOLS))

    def label_of(self, tok1: Tensor, tok2: Tensor) -> Tensor:
        """LABEL token for symbol *indices* ``tok1``, ``tok2`` (0..99, any equal shapes)."""
        v1, v2 = self.values[tok1], self.values[tok2]
        label_value = torch.maximum(v1, v2) if self.kind == "cmp" else (v1 + v2) % N_SYMBOLS
        symbol_of_value = torch.argsort(self.values)  # inverse permutation
        return self.symbols[symbol_of_value[label_value]]

    @cached_property
    def _all(self) -> Tensor:
        """[10000, 4] every instance; row 100 i + j is the pair (symbol i, symbol j)."""
        i = torch.arange(N_SYMBOLS).repeat_interleave(N_SYMBOLS)
        j = torch.arange(N_SYMBOLS).repeat(N_SYMBOLS)
        eod = torch.full_like(i, self.eod_id)
        return torch.stack([self.symbols[i], self.symbols[j], self.label_of(i, j), eod], dim=1)

    @cached_property
    def _order(self) -> Tensor:
        """A seeded permutation of the 10,000 rows: the first 5,000 are train, the rest test."""
        return torch.from_numpy(_rng(self.seed, "split").permutation(N_INSTANCES))

    def instances(self, split: Split = "train") -> Tensor:
        """LongTensor [n, 4] of TOK1 TOK2 LABEL EOD rows (n = 5000, or 10000 for "all").

        "train" and "test" come in the split's shuffled order (a trainer can take them
        cyclically); "all" is in pair order, row 100 i + j = (symbol i, symbol j).
        """
        if split == "all":
            return self._all.clone()
        if split not in ("train", "test"):
            raise UserError(f"split must be 'train', 'test' or 'all', got {split!r}")
        rows = self._order[:N_TRAIN] if split == "train" else self._order[N_TRAIN:]
        return self._all[rows]

    # -- evaluation -----------------------------------------------------------------------------
    def accuracy(
        self,
        logits_fn: Callable[[Tensor], Tensor],
        split: Split = "test",
        batch_size: int = 1000,
        device: torch.device | str | None = None,
    ) -> float:
        """Fraction of ``split`` whose LABEL is the argmax over the whole vocabulary.

        ``logits_fn`` maps ids [n, 2] (TOK1 TOK2 at positions 0 and 1, as in training where an
        instance opens its sequence) to logits [n, 2, V]; e.g. ``lambda x: model(x)[0]``.
        """
        logits, labels = self._label_logits(logits_fn, split, batch_size, device)
        return (logits.argmax(-1) == labels).float().mean().item()

    def loss(
        self,
        logits_fn: Callable[[Tensor], Tensor],
        split: Split = "test",
        batch_size: int = 1000,
        device: torch.device | str | None = None,
    ) -> float:
        """Mean cross-entropy of LABEL over ``split`` (the task loss); arguments as accuracy."""
        logits, labels = self._label_logits(logits_fn, split, batch_size, device)
        return F.cross_entropy(logits, labels).item()

    def evaluate(
        self,
        logits_fn: Callable[[Tensor], Tensor],
        split: Split = "test",
        batch_size: int = 1000,
        device: torch.device | str | None = None,
    ) -> tuple[float, float]:
        """(loss, accuracy) of ``split`` from one pass over its instances."""
        logits, labels = self._label_logits(logits_fn, split, batch_size, device)
        loss = F.cross_entropy(logits, labels).item()
        return loss, (logits.argmax(-1) == labels).float().mean().item()

    @torch.no_grad()
    def _label_logits(self, logits_fn, split, batch_size, device) -> tuple[Tensor, Tensor]:
        inst = self.instances(split)
        if device is not None:
            inst = inst.to(device)
        chunks = [
            logits_fn(part[:, :LABEL_POSITION])[:, LABEL_POSITION - 1].float()
            for part in inst.split(batch_size)
        ]
        return torch.cat(chunks), inst[:, LABEL_POSITION]


def inject(batch_tokens: Tensor, instances: Tensor) -> tuple[Tensor, Tensor]:
    """Write ``instances`` [m, 4] over the first 4 tokens of rows 0 .. m-1 of ``batch_tokens``.

    Returns ``(tokens, task_mask)``: a new [B, T] tensor (the input is not modified) and a bool
    [B, T] mask that is True exactly at the LABEL tokens, i.e. ``[r, 2]`` for r < m. The mask is
    aligned with the tokens it is given: with the usual ``idx, targets = tokens[:, :-1],
    tokens[:, 1:]``, pass ``loss_mask=task_mask[:, 1:]`` to get the task loss.

    The first m rows, always: the loader's rows are already in random order, so which rows carry
    an instance does not matter, and a fixed choice is trivial to check. One instance per row, as
    in the paper, so m must not exceed B.
    """
    b, t = batch_tokens.shape
    m = instances.shape[0]
    if m > b:
        raise UserError(f"{m} instances do not fit in a batch of {b} rows (one instance per row)")
    if t < INSTANCE_LEN:
        raise UserError(f"sequence length {t} is shorter than an instance ({INSTANCE_LEN} tokens)")
    tokens = batch_tokens.clone()
    tokens[:m, :INSTANCE_LEN] = instances.to(tokens)
    task_mask = torch.zeros(b, t, dtype=torch.bool, device=tokens.device)
    task_mask[:m, LABEL_POSITION] = True
    return tokens, task_mask


# -- frequencies and schedules ------------------------------------------------------------------
@dataclass(frozen=True)
class InjectionSchedule:
    """How many instances to inject at each optimizer step: ``instances`` every ``every`` steps.

    * ``mode="spread"``: the rate k / g is spread as evenly as integers allow (low discrepancy),
      ``per_step(s) = floor((s + 1) k / g) - floor(s k / g)``, so the total over the first n
      steps is floor(n k / g), within 1 of the rate times n. One instance every 10 steps lands at
      steps 9, 19, ...
    * ``mode="burst"``: all k instances at once at the last step of each window of g steps
      (steps g-1, 2g-1, ...): the paper's "N instances every N batches".
    * ``mode="iid"``: each of the ``rows`` rows of a step carries an instance with probability
      ``row_chance``, drawn from a hash of (``seed``, step, row) (:mod:`raretask.lm.rng`), so a
      step's count is the same whichever process asks and a resumed run repeats it.

    Both forms have the same long-run rate; integer arithmetic keeps them exact. Deterministic:
    nothing is drawn at random.

    Example::

        >>> s = InjectionSchedule(instances=1, every=10)
        >>> [s.per_step(i) for i in range(10)]
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    """

    instances: int
    every: int = 1
    mode: Literal["spread", "burst", "iid"] = "spread"
    start: int = 0  # inject only in steps start .. stop-1 (0-based; stop None: to the end)
    stop: int | None = None
    row_chance: float = 0.0  # iid: the chance that a row carries an instance
    rows: int = 0  # iid: rows per step
    seed: int = 0  # iid: which draws

    def __post_init__(self) -> None:
        if self.instances < 0:
            raise UserError(f"schedule instances must be >= 0, got {self.instances}")
        if self.every < 1:
            raise UserError(f"schedule every must be >= 1 step, got {self.every}")
        if self.mode not in ("spread", "burst", "iid"):
            raise UserError(f"schedule mode must be 'spread', 'burst' or 'iid', got "
                            f"{self.mode!r}")
        if self.mode == "iid" and not (0 < self.row_chance <= 1 and self.rows >= 1):
            raise UserError(f"schedule iid needs 0 < row_chance <= 1 and rows >= 1, got "
                            f"{self.row_chance}, {self.rows}")
        if self.start < 0 or (self.stop is not None and self.stop <= self.start):
            raise UserError(f"schedule stop must be > start >= 0, got start {self.start}, stop "
                            f"{self.stop}")

    @property
    def rate(self) -> Fraction:
        """Expected instances per step, exactly."""
        if self.mode == "iid":
            return Fraction(self.row_chance) * self.rows
        return Fraction(self.instances, self.every)

    def per_step(self, step: int) -> int:
        """Instances to inject at optimizer step ``step`` (0-based)."""
        k, g = self.instances, self.every
        if step < self.start or (self.stop is not None and step >= self.stop):
            return 0
        if self.mode == "iid":
            return int(np.count_nonzero(self._draws(np.array([step]))))
        if self.mode == "burst":
            return k if (step + 1) % g == 0 else 0
        return (step + 1) * k // g - step * k // g

    def _draws(self, steps: np.ndarray) -> np.ndarray:
        """iid: [len(steps), rows] whether each row of each step carries an instance."""
        from raretask.lm.rng import mix, uniforms

        key = mix(np.array([self.seed], dtype=np.uint64) ^ np.uint64(0x1D1D))  # its own stream
        rows = np.arange(self.rows, dtype=np.uint64)
        keys = mix(mix(key ^ steps.astype(np.uint64)[:, None]) ^ rows[None, :]).ravel()
        return (uniforms(keys, 1)[0] < self.row_chance).reshape(len(steps), self.rows)

    def total(self, steps: int) -> int:
        """Instances injected over steps 0 .. steps-1 (= the sum of per_step)."""
        end = max(min(steps, self.stop if self.stop is not None else steps), self.start)
        return self._upto(end) - self._upto(self.start)

    def _upto(self, steps: int) -> int:
        """Instances over steps 0 .. steps-1 without the start/stop window."""
        if self.mode == "iid":
            return int(self._draws(np.arange(steps)).sum()) if steps > 0 else 0
        if self.mode == "burst":
            return self.instances * (steps // self.every)
        return steps * self.instances // self.every


@dataclass(frozen=True)
class Frequency:
    """A task frequency in the paper's unit: ``per_token`` = instances per training token.

    For a batch of B sequences of T tokens, a step sees ``per_token * B * T`` instances on
    average; the fraction of training tokens inside instances is ``4 * per_token``.

    Example::

        >>> f = Frequency.from_instances(1, every=10, batch_size=1024, seq_len=4096)
        >>> f"{f.per_token:.2e}"
        '2.38e-08'
        >>> f.schedule(batch_size=1024, seq_len=4096)
        InjectionSchedule(instances=1, every=10, mode='spread')
    """

    per_token: float

    def __post_init__(self) -> None:
        if not 0 < self.per_token <= 1 / INSTANCE_LEN:
            raise UserError(
                f"frequency per_token must be in (0, 0.25] (instances per token), "
                f"got {self.per_token}"
            )

    @classmethod
    def from_instances(
        cls, instances: float, every: int, batch_size: int, seq_len: int
    ) -> Frequency:
        """``instances`` every ``every`` batches of ``batch_size`` x ``seq_len`` tokens."""
        return cls(instances / (every * batch_size * seq_len))

    @property
    def token_fraction(self) -> float:
        """Fraction of training tokens that belong to instances: 4 * per_token."""
        return INSTANCE_LEN * self.per_token

    def instances_per_step(self, batch_size: int, seq_len: int) -> float:
        """Expected instances per batch of ``batch_size`` x ``seq_len`` tokens."""
        return self.per_token * batch_size * seq_len

    def schedule(
        self, batch_size: int, seq_len: int, max_every: int = 1_000_000
    ) -> InjectionSchedule:
        """The spread schedule closest to this frequency: rate k / g with g <= ``max_every``.

        A frequency is only a rate; for the paper's bursts ("N every N batches") build
        ``InjectionSchedule(N, N, mode="burst")`` directly.
        """
        rate = Fraction(self.instances_per_step(batch_size, seq_len)).limit_denominator(max_every)
        if rate == 0:
            raise UserError(
                f"frequency {self.per_token:g} per token is below one instance every {max_every} "
                f"steps of {batch_size * seq_len} tokens"
            )
        if math.ceil(rate) > batch_size:
            raise UserError(
                f"frequency {self.per_token:g} per token needs {math.ceil(rate)} instances in one "
                f"step; a batch has {batch_size} rows"
            )
        return InjectionSchedule(rate.numerator, rate.denominator)


__all__ = [
    "INSTANCE_LEN",
    "LABEL_POSITION",
    "N_INSTANCES",
    "N_SYMBOLS",
    "Frequency",
    "InjectionSchedule",
    "RareTask",
    "inject",
]
