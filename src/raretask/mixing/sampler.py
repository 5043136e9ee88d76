"""Realise a plan: which task and which example comes at each position, rare tasks spread evenly.

:class:`MixtureSampler` is a deterministic, resumable index generator yielding
``(task, example)`` pairs; :class:`MixtureDataset` wraps it as a PyTorch ``IterableDataset`` over
one indexable dataset per task (or over ``(task, example index)`` pairs), and
:meth:`MixtureDataset.from_plan` builds one from ``raretask plan --out``'s ``plan.json``.

How positions get tasks (low discrepancy, not random):

1. **Rare tasks** (share <= ``rare_share``, default 5%), rarest first, each take a mechanical
   (Sturmian) subsequence of the positions still free: the i-th free position goes to task k when
   ``floor((i+1) r + 1/2) > floor(i r + 1/2)``, with ``r = q_k / (share still free)``. The rarest
   task's occurrences are as even as integers allow: over any window of W positions its count is
   ``floor(q W)`` or ``ceil(q W)``, within 1 of its expectation. Later rare tasks inherit a
   little of the earlier ones' unevenness (measured: within 1 + r of expectation).
2. **Frequent tasks** share the remaining positions by earliest-deadline-first (Tijdeman's
   chairman assignment): each one's count over any prefix of those positions is within
   1 - 1/(2F - 2) of its share (F frequent tasks). They absorb the rare tasks' rounding, so over
   a window their error can reach about 1 + (number of rare tasks) / 2; with thousands of
   expected samples per window that is noise.

**Caps and the budget.** A task is never scheduled beyond its cap (``floor(max_epochs * size)``
occurrences), so no example is seen more than ``ceil(max_epochs)`` times. A ``total`` that would
take a task more than one occurrence past its cap is beyond what the caps allow (the *budget*,
:attr:`MixtureSampler.budget`) and is refused with one line naming both, or, with
``beyond_budget="repeat"``, served by raising the caps that bind (a warning names the new
max_epochs): a capped task never silently stops appearing half-way through the run. Within the
budget, a task whose ``max_epochs * size`` is not an integer may give up its last occurrence at
the very end of the run.

**Examples.** Within a task, occurrence j is example ``perm_p[j mod n]`` of the task's pass
``p = j // n`` over its n examples: a fresh permutation per (seed, task, pass), and per
(seed, task, pass, epoch) in the dataset's epochs >= 1 (:meth:`MixtureDataset.set_epoch`).

The state is a handful of integers (position, per-level counters, occurrences per task):
:meth:`MixtureSampler.state_dict` / :meth:`MixtureSampler.load_state_dict` continue exactly,
also when taken in the middle of an iteration, and the sequence does not depend on chunking.

Example
-------
>>> s = MixtureSampler([0.9, 0.1], sizes=[1000, 100], total=20, seed=0)
>>> [int(t) for t in s.tasks(20)]
[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from raretask.errors import UserError

CHUNK = 4096
MAX_TOTAL = 2**53  # positions are int64 and shares x total floats: beyond this they lose digits


def _whole(v) -> bool:
    """An integer (a float with no fraction too, as a budget read from JSON), never a bool."""
    return not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v) and \
        int(v) == v
BEYOND_BUDGET = ("refuse", "repeat")


class MixtureSampler:
    """Deterministic, resumable ``(task, example)`` generator for fixed weights.

    Parameters
    ----------
    weights:
        Share of each task (normalised here; zero weights are never sampled).
    sizes:
        Examples available per task.
    total:
        Positions to generate (the training budget in examples).
    max_epochs:
        Most passes over any task's examples: one number for all, one per task (None entries
        uncapped), or None (unlimited).
    seed:
        Seeds the per-pass example permutations (the task sequence itself has no randomness).
    rare_share:
        Tasks at or below this share are spread as Sturmian subsequences (see the module doc).
    names:
        Task names (for messages).
    epoch:
        The dataset's epoch (one pass over ``total``): the task sequence is the same in every
        epoch; epochs >= 1 draw fresh example permutations.
    beyond_budget:
        What a ``total`` beyond what the caps allow does: ``"refuse"`` (one line naming the total
        and the budget) or ``"repeat"`` (raise the caps that bind, with a warning).

    Iterating yields the pairs from the current state to ``total`` (a cursor: a second
    ``iter()`` continues, it does not restart; :class:`MixtureDataset` has epochs).
    """

    def __init__(self, weights: Sequence[float], sizes: Sequence[int], total: int,
                 max_epochs: float | Sequence[float | None] | None = None, seed: int = 0,
                 rare_share: float = 0.05, names: Sequence[str] | None = None, epoch: int = 0,
                 beyond_budget: str = "refuse"):
        q = np.asarray(weights, float)
        k = q.size
        names = [str(i) for i in range(k)] if names is None else [str(n) for n in names]
        if q.ndim != 1 or k == 0 or len(names) != k or np.any(~np.isfinite(q)) or \
                np.any(q < 0) or q.sum() <= 0:
            raise UserError("weights: expected one share >= 0 per task, not all zero")
        n = np.asarray(sizes, dtype=np.int64)
        if n.shape != (k,) or np.any(n < 0):
            raise UserError(f"sizes: expected {k} example counts >= 0")
        for i in np.flatnonzero((q > 0) & (n == 0)):
            raise UserError(f"task {names[i]!r}: weight {q[i]:.4g} but no examples")
        if not _whole(total) or not 0 <= total <= MAX_TOTAL:
            raise UserError(f"total must be an integer from 0 to {MAX_TOTAL:,}, got {total!r}")
        if not _whole(seed):
            raise UserError(f"seed must be an integer, got {seed!r}")
        if int(epoch) != epoch or epoch < 0:
            raise UserError(f"epoch must be an integer >= 0, got {epoch}")
        if beyond_budget not in BEYOND_BUDGET:
            raise UserError(f"beyond_budget must be 'refuse' or 'repeat', got {beyond_budget!r}")
        epochs = _per_task_epochs(max_epochs, names)
        self.weights = q / q.sum()
        self.sizes, self.total, self.seed, self.names = n, int(total), int(seed), names
        self.epoch, self.max_epochs = int(epoch), max_epochs
        big = np.iinfo(np.int64).max
        self.caps = np.array([big if e is None else math.floor(e * x + 1e-9)
                              for e, x in zip(epochs, n, strict=True)], dtype=np.int64)
        self.caps[self.weights == 0] = 0
        self.budget = self._budget()
        if self.budget is not None and self.total > self.budget:
            self._beyond_budget(beyond_budget, epochs)
        pos = np.flatnonzero(self.weights > 0)
        order = pos[np.lexsort((pos, self.weights[pos]))]  # rarest first, ties by index
        rare = [int(i) for i in order if self.weights[i] <= rare_share]
        if len(rare) == len(order):
            rare = rare[:-1]  # someone must take what is left
        self.rare = rare
        self.frequent = [int(i) for i in pos if int(i) not in set(rare)]
        rest, rates = 1.0, []
        for i in rare:
            rates.append(min(1.0, self.weights[i] / rest) if rest > 0 else 1.0)
            rest -= self.weights[i]
        self.rates = rates
        fw = self.weights[self.frequent]
        self._fq = (fw / fw.sum()).tolist()
        f = len(self.frequent)
        self._delta = 1.0 / (2 * f - 2) if f > 1 else 0.0
        self._perm: dict[int, tuple[int, np.ndarray]] = {}
        self._pending = None  # (token, chunk-start state, rows handed out, chunk-end state, rows)
        self.load_state_dict(self._initial_state())

    # -- the budget -----------------------------------------------------------------------------
    def _budget(self) -> int | None:
        """The largest total the caps allow at these weights (None: unlimited). A task may end
        at most one occurrence short of ``weight x total`` (the last, at the very end), never
        more, and the capped tasks together must cover the total."""
        capped = np.flatnonzero((self.weights > 0) & (self.caps < np.iinfo(np.int64).max))
        if capped.size == 0:
            return None
        per_task = min(math.floor((self.caps[i] + 1) / self.weights[i] * (1 + 1e-12))
                       for i in capped)
        if capped.size == np.count_nonzero(self.weights):
            return min(per_task, int(self.caps[self.weights > 0].sum()))
        return per_task

    def _binding_task(self) -> int:
        capped = np.flatnonzero((self.weights > 0) & (self.caps < np.iinfo(np.int64).max))
        return int(min(capped, key=lambda i: (self.caps[i] + 1) / self.weights[i]))

    def _beyond_budget(self, mode: str, epochs: list) -> None:
        i = self._binding_task()
        need = self.weights[i] * self.total
        ep = "uncapped" if epochs[i] is None else f"max_epochs {epochs[i]:g}"
        if mode == "refuse":
            raise UserError(
                f"total: {self.total:,} samples exceed the budget of {self.budget:,} that the "
                f"caps allow (task {self.names[i]!r}: share {self.weights[i]:.4g} x total = "
                f"{need:,.0f} occurrences, {ep} x {self.sizes[i]:,} examples = {self.caps[i]:,});"
                " lower total, add data, or pass beyond_budget='repeat' to raise the caps")
        # every task gets one occurrence of room, so no task ends short and the caps cover it
        need_caps = np.ceil(self.weights * self.total).astype(np.int64) + 1
        over = (self.weights > 0) & (self.caps < need_caps)
        self.caps = np.where(over, np.maximum(self.caps, need_caps), self.caps)
        raised = float(np.max(self.caps[over] / self.sizes[over]))
        warnings.warn(
            f"MixtureSampler: total {self.total:,} exceeds the caps' budget of {self.budget:,}: "
            f"caps raised for {', '.join(repr(self.names[j]) for j in np.flatnonzero(over))} "
            f"(up to {raised:.3g} passes over their examples; beyond_budget='repeat')",
            stacklevel=3)
        self.budget = self._budget()

    # -- state ----------------------------------------------------------------------------------
    def _initial_state(self) -> dict:
        return {"position": 0, "level": [0] * len(self.rare),
                "frequent_time": 0, "occurrences": [0] * self.weights.size}

    def _raw_state(self) -> dict:
        return {"position": self._pos, "level": list(self._level),
                "frequent_time": self._ftime, "occurrences": [int(x) for x in self._occ]}

    def _set_state(self, state: dict) -> None:
        self._pos, self._level = state["position"], list(state["level"])
        self._ftime = state["frequent_time"]
        self._occ = np.array(state["occurrences"], dtype=np.int64)

    def _settle(self) -> None:
        """Make the generation state that of the pairs handed out (ends an iteration's chunk)."""
        if self._pending is None:
            return
        _, start, used, end, rows = self._pending
        self._pending = None
        if used == rows:
            self._set_state(end)
        else:  # replay the handed-out part of the chunk (task sequence only: cheap)
            self._set_state(start)
            self._next(used)

    @property
    def position(self) -> int:
        """Pairs handed out so far (by ``take`` / ``tasks`` / iteration)."""
        if self._pending is not None:
            return self._pending[1]["position"] + self._pending[2]
        return self._pos

    def state_dict(self) -> dict:
        """Plain ints (JSON-safe): the position and the counters that determine the rest. Taken
        during an iteration it is the state after the pairs the iteration has yielded."""
        self._settle()
        return self._raw_state()

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (an iteration in progress continues from it too)."""
        try:
            pos = int(state["position"])
            level = [int(x) for x in state["level"]]
            ftime = int(state["frequent_time"])
            occ = [int(x) for x in state["occurrences"]]
        except (KeyError, TypeError, ValueError):
            raise UserError("sampler state: expected position, level, frequent_time, "
                            "occurrences") from None
        if len(level) != len(self.rare) or len(occ) != self.weights.size or \
                not 0 <= pos <= self.total:
            raise UserError("sampler state: does not match this sampler's tasks or total")
        self._pending = None
        self._set_state({"position": pos, "level": level, "frequent_time": ftime,
                         "occurrences": occ})

    def _clone(self) -> MixtureSampler:
        """A sampler in the same state that moves on its own (shares nothing mutable)."""
        self._settle()
        other = copy.copy(self)
        other._perm, other._pending = {}, None
        other._set_state(self._raw_state())
        return other

    # -- generation -----------------------------------------------------------------------------
    def tasks(self, count: int) -> np.ndarray:
        """The tasks of the next ``count`` positions (advances the state)."""
        self._settle()
        return self._next(count)[0]

    def take(self, count: int) -> np.ndarray:
        """[n, 2] int64 (task, example) of the next ``count`` positions, n <= count at the end."""
        self._settle()
        tasks, occ = self._next(count)
        return np.stack([tasks, self._examples_of(tasks, occ)], axis=1)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        while True:
            self._settle()
            if self._pos >= self.total:
                return
            start = self._raw_state()
            rows = self.take(CHUNK)
            end, token = self._raw_state(), object()
            for i in range(len(rows)):
                # counted before the yield: while the consumer holds pair i, i + 1 are out
                self._pending = (token, start, i + 1, end, len(rows))
                yield int(rows[i, 0]), int(rows[i, 1])
                if self._pending is None or self._pending[0] is not token:
                    break  # the state was read or replaced meanwhile: continue from it

    def __len__(self) -> int:
        return self.total

    def _next(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        n = max(0, min(int(count), self.total - self._pos))
        out = np.full(n, -1, dtype=np.int64)
        occ = np.zeros(n, dtype=np.int64)  # occurrence number of each position's task
        free = np.arange(n)
        for lv, (k, r) in enumerate(zip(self.rare, self.rates, strict=True)):
            i = self._level[lv] + np.arange(free.size, dtype=np.float64)
            take = np.floor((i + 1) * r + 0.5) > np.floor(i * r + 0.5)
            room = int(self.caps[k] - self._occ[k])
            hits = np.flatnonzero(take)
            if hits.size > room:  # capped: later slots pass on to the next tasks
                take[hits[max(room, 0):]] = False
                hits = hits[:max(room, 0)]
            out[free[hits]] = k
            occ[free[hits]] = self._occ[k] + np.arange(hits.size)
            self._occ[k] += hits.size
            self._level[lv] += free.size
            free = free[~take]
        if free.size:
            self._frequent_fill(free, out, occ)
        self._pos += n
        return out, occ

    def _frequent_fill(self, free: np.ndarray, out: np.ndarray, occ: np.ndarray) -> None:
        """Tijdeman's earliest-deadline-first over the frequent tasks (pure Python: K small)."""
        fq, delta, ids = self._fq, self._delta, self.frequent
        counts = [int(self._occ[k]) for k in ids]
        caps = [int(self.caps[k]) for k in ids]
        t = self._ftime
        for slot in free.tolist():
            t += 1
            best, best_d = -1, math.inf
            for a in range(len(ids)):
                if counts[a] >= caps[a]:
                    continue
                if fq[a] * t - counts[a] >= delta - 1e-12:
                    d = (counts[a] + 1 - delta) / fq[a]
                    if d < best_d:
                        best, best_d = a, d
            if best < 0:  # nobody eligible (only when caps bind): the largest deficit
                open_ = [a for a in range(len(ids)) if counts[a] < caps[a]]
                if not open_:
                    raise UserError("sampler: every task reached its cap before the total")
                best = max(open_, key=lambda a: fq[a] * t - counts[a])
            out[slot] = ids[best]
            occ[slot] = counts[best]
            counts[best] += 1
        self._ftime = t
        for a, k in enumerate(ids):
            self._occ[k] = counts[a]

    def _examples_of(self, tasks: np.ndarray, occurrence: np.ndarray) -> np.ndarray:
        ex = np.empty_like(tasks)
        for k in np.unique(tasks):
            sel = tasks == k
            ex[sel] = self._examples(int(k), occurrence[sel])
        return ex

    def _examples(self, task: int, occurrence: np.ndarray) -> np.ndarray:
        n = int(self.sizes[task])
        passes, within = np.divmod(occurrence, n)
        out = np.empty_like(occurrence)
        for p in np.unique(passes):
            sel = passes == p
            out[sel] = self._permutation(task, int(p))[within[sel]]
        return out

    def _permutation(self, task: int, pass_: int) -> np.ndarray:
        cached = self._perm.get(task)
        if cached is None or cached[0] != pass_:
            key = (task, pass_) if self.epoch == 0 else (task, pass_, self.epoch)
            rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=key))
            cached = (pass_, rng.permutation(int(self.sizes[task])))
            self._perm[task] = cached
        return cached[1]


def _per_task_epochs(max_epochs, names: list[str]) -> list[float | None]:
    """``max_epochs`` as one cap (or None) per task, validated."""
    if max_epochs is None or np.ndim(max_epochs) == 0:
        epochs = [max_epochs] * len(names)
    else:
        epochs = list(max_epochs)
        if len(epochs) != len(names):
            raise UserError(f"max_epochs: expected one number (or None) per task "
                            f"({len(names)}), got {len(epochs)}")
    for name, e in zip(names, epochs, strict=True):
        if e is not None and not (isinstance(e, numbers.Real) and math.isfinite(e) and e > 0):
            raise UserError(f"max_epochs must be > 0, got {e} for task {name!r}")
    return epochs


def _iterable_base():
    import torch.utils.data

    return torch.utils.data.IterableDataset


class ExampleIndex:
    """Stands in for a task's data: item i is ``(task, i)`` (``from_plan`` without sources)."""

    def __init__(self, task: str, size: int):
        self.task, self.size = task, int(size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.task, int(i)


class MixtureDataset(_iterable_base()):
    """A PyTorch ``IterableDataset`` over one indexable dataset per task, in sampler order.

    **Blocks, ranks, workers.** The sequence is cut into blocks of ``batch_size`` positions.
    Under ``torch.distributed`` (or with ``rank`` / ``world_size`` given) rank r takes the blocks
    b with ``b % world_size == r``; in a ``DataLoader`` with ``num_workers=W`` each worker takes
    every W-th of its rank's blocks, counted from where the iteration starts, and since the
    loader collects the workers' batches round-robin (from worker 0), the batches come out in
    the sampler's order, exactly as with ``num_workers=0``, provided ``batch_size`` here equals
    the loader's. Every worker computes the whole (cheap, integer) task sequence and loads only
    its own blocks' examples.

    **Checkpoints.** The state is ``{"epoch", "consumed", "sampler", "mix"}``: ``consumed`` is
    the samples this rank's training loop has received in the epoch, ``sampler`` the sampler's
    counters where the rank's next block starts (so a resume needs no replay) and ``mix`` a
    fingerprint of the configuration (a state from another mix, rank or batch size is refused).
    With ``num_workers=0`` the dataset counts what it hands out, so ``state_dict()`` is exact at
    any point. With workers the loader iterates copies and this object does not move: count the
    samples your loop received and call ``state_dict(consumed=k)``; on resume,
    ``load_state_dict(state)`` (or just ``{"consumed": k}``) before ``iter(loader)`` makes every
    worker start deterministically at sample k + 1 (k a multiple of ``batch_size``).

    **Epochs.** Iterating again after a complete pass yields a complete new pass. The task
    sequence (and so the even spacing) is the same in every epoch; the examples repeat the same
    order unless :meth:`set_epoch` is called (as with ``DistributedSampler``), which draws fresh
    per-task permutations from (seed, epoch) - with or without workers alike.

    Example
    -------
    >>> ds = MixtureDataset([["a0", "a1"], ["b0"]], weights=[0.5, 0.5], total=4)
    >>> list(ds)
    ['a1', 'b0', 'a0', 'b0']
    """

    def __init__(self, sources: Sequence, weights: Sequence[float], total: int,
                 max_epochs: float | Sequence[float | None] | None = None, seed: int = 0,
                 names=None, rare_share: float = 0.05, batch_size: int = 1,
                 rank: int | None = None, world_size: int | None = None,
                 beyond_budget: str = "refuse"):
        super().__init__()
        if int(batch_size) != batch_size or batch_size < 1:
            raise UserError(f"batch_size must be an integer >= 1, got {batch_size}")
        rank, world_size = _rank_world(rank, world_size)
        self.sources = list(sources)
        self.batch_size, self.rank, self.world_size = int(batch_size), rank, world_size
        self.sampler = MixtureSampler(weights, [len(s) for s in self.sources], total,
                                      max_epochs=max_epochs, seed=seed, names=names,
                                      rare_share=rare_share, beyond_budget=beyond_budget)
        self.epoch, self.consumed = 0, 0
        self._known = self.sampler.state_dict()  # a sampler state to replay from (a cache)
        self._changed = 0  # bumped by load_state_dict / seek / set_epoch: iterations follow
        s = self.sampler
        self.fingerprint = hashlib.sha256(json.dumps(
            [s.weights.tolist(), s.sizes.tolist(), s.caps.tolist(), s.total, s.seed, s.rare,
             s.names, self.batch_size, self.rank, self.world_size]).encode()).hexdigest()[:16]

    @classmethod
    def from_plan(cls, plan_json, total: int | None = None, sources=None, seed: int = 0,
                  tokens_per_example=None, beyond_budget: str = "refuse",
                  **kwargs) -> MixtureDataset:
        """The dataset for ``raretask plan --out``'s ``plan.json`` (a path or its dict).

        Parameters
        ----------
        plan_json:
            The plan file or its parsed content.
        total:
            Samples in the run (examples); None: the plan's budget.
        sources:
            None: yield ``(task name, example index)`` pairs. A dict ``{task: sequence}`` or a
            list in the plan's task order: yield the examples. Tasks of weight 0 may be left out.
        seed:
            Seeds the example permutations.
        tokens_per_example:
            For a plan in tokens: mean tokens per example of each task (a dict or a list in plan
            order), to turn token shares, availability and budget into examples; default the
            plan's own ``tokens_per_example`` (written when the analysis counted tokens).
        beyond_budget:
            ``"refuse"`` a total beyond what the plan's caps allow, or ``"repeat"`` (raise them).
        kwargs:
            ``batch_size``, ``rank``, ``world_size``, ``rare_share``.
        """
        plan, raw, source = _read_plan(plan_json)
        names = [t.task for t in plan.tasks]
        weights = np.array([t.weight for t in plan.tasks], float)
        avail = [t.available for t in plan.tasks]
        # a task's own cap where the plan has per-task caps, else the plan's one
        epochs = [t.get("max_epochs") if "max_epochs" in t else plan.max_epochs
                  for t in raw["tasks"]]
        budget = plan.budget
        if plan.unit == "tokens":
            # plan --out records the analysis' tokens per example when it had token counts
            given = tokens_per_example if tokens_per_example is not None else \
                raw.get("tokens_per_example")
            tpe = _by_task(given, names, "tokens_per_example", source, weights, plan.unit)
            if tpe is None:
                raise UserError(f"{source}: the plan is in tokens and does not record tokens per "
                                "example; give tokens_per_example (each task's mean tokens per "
                                "example, e.g. tokens / examples from analysis.json)")
            per = np.array([w / t if w > 0 else 0.0 for w, t in zip(weights, tpe, strict=True)])
            budget = None if budget is None else budget * float(per.sum())  # tokens -> examples
            weights = per / per.sum()
            avail = [None if a is None or t is None else a / t
                     for a, t in zip(avail, tpe, strict=True)]
        elif tokens_per_example is not None:
            raise UserError(f"{source}: the plan is in examples; tokens_per_example is only for "
                            "a plan in tokens")
        items = _plan_sources(sources, names, weights, avail, source, plan.unit)
        if total is None:
            if budget is None:
                raise UserError(f"{source}: the plan has no budget; give total")
            total = int(math.floor(budget + 1e-6))
        return cls(items, weights, total, max_epochs=epochs, seed=seed, names=names,
                   beyond_budget=beyond_budget, **kwargs)

    # -- the rank's share of the sequence --------------------------------------------------------
    def __len__(self) -> int:
        """Samples this rank yields per epoch (all its workers together)."""
        total, b = self.sampler.total, self.batch_size
        blocks = -(-total // b)
        mine = len(range(self.rank, blocks, self.world_size))
        if mine and (blocks - 1) % self.world_size == self.rank and total % b:
            return (mine - 1) * b + total % b  # the last, partial block is this rank's
        return mine * b

    def _block_start(self, consumed: int) -> int:
        """Global position where the block holding this rank's sample ``consumed + 1`` starts
        (the total once the rank has had them all)."""
        if consumed >= len(self):
            return self.sampler.total
        block = self.rank + (consumed // self.batch_size) * self.world_size
        return block * self.batch_size

    def _sampler_at(self, position: int) -> MixtureSampler:
        """A sampler at ``position``, replayed from the cached state when it is not past it."""
        s = self.sampler._clone()
        s.epoch = self.epoch
        start = self._known if self._known["position"] <= position else \
            s._initial_state()
        s.load_state_dict(start)
        while s.position < position:
            s.tasks(min(CHUNK * 16, position - s.position))
        self._known = s.state_dict()
        return s

    # -- epochs and checkpoints ------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (fresh example permutations, same task sequence) at its first
        sample; setting the current epoch again keeps the position (so a resumed loop may call
        it at the top of every epoch)."""
        if int(epoch) != epoch or epoch < 0:
            raise UserError(f"set_epoch: expected an integer >= 0, got {epoch}")
        if int(epoch) != self.epoch:
            self.epoch, self.consumed = int(epoch), 0
            self._changed += 1

    def _check_consumed(self, consumed, what: str) -> int:
        if isinstance(consumed, bool) or not isinstance(consumed, int | np.integer) or \
                not 0 <= consumed <= len(self):
            raise UserError(f"{what}: expected 0..{len(self)} samples (this rank's per epoch), "
                            f"got {consumed!r}")
        return int(consumed)

    def state_dict(self, consumed: int | None = None) -> dict:
        """The state after ``consumed`` samples of this epoch (default: the count this object
        has handed out, exact with ``num_workers=0``; with workers, pass what your loop
        received). JSON-safe."""
        k = self.consumed if consumed is None else self._check_consumed(consumed, "state_dict")
        return {"epoch": self.epoch, "consumed": k,
                "sampler": self._sampler_at(self._block_start(k)).state_dict(),
                "mix": self.fingerprint}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue after the state's ``consumed`` samples of its epoch (``sampler``, ``epoch``
        and ``mix`` optional: a bare ``{"consumed": k}`` replays the task sequence up to k)."""
        if not isinstance(state, Mapping) or "consumed" not in state or \
                set(state) - {"epoch", "consumed", "sampler", "mix"}:
            keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise UserError(f"dataset state: expected consumed (and epoch, sampler, mix), "
                            f"got {keys}")
        if "mix" in state and state["mix"] != self.fingerprint:
            raise UserError(f"dataset state: mix {state['mix']!r} is not this dataset's "
                            f"({self.fingerprint}: other weights, sizes, total, seed, batch size "
                            "or rank)")
        k = self._check_consumed(state["consumed"], "dataset state: consumed")
        epoch = state.get("epoch", self.epoch)
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise UserError(f"dataset state: epoch must be an integer >= 0, got {epoch!r}")
        if state.get("sampler") is not None:
            probe = self.sampler._clone()
            probe.load_state_dict(state["sampler"])
            expect = self._block_start(k)
            if probe.position != expect:
                raise UserError(f"dataset state: sampler position {probe.position} does not "
                                f"match consumed {k} (expected {expect})")
            self._known = probe.state_dict()
        self.epoch, self.consumed = epoch, k
        self._changed += 1

    def seek(self, consumed: int) -> None:
        """Continue after this rank (all its workers) has consumed ``consumed`` samples of the
        current epoch (``load_state_dict({"consumed": consumed})``)."""
        self.load_state_dict({"consumed": self._check_consumed(consumed, "seek")})

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self):
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if workers > 1 and self.batch_size == 1:
            raise UserError("MixtureDataset: with num_workers > 1 give batch_size (the "
                            "DataLoader's), so the batches keep the sampler's order")
        while True:
            changed = self._changed
            for item in self._epoch_from(self.consumed, workers, worker, info is None):
                yield item
                if self._changed != changed:
                    break  # state loaded, seek or set_epoch meanwhile: continue from the new one
            else:
                if info is None:
                    self.consumed = 0  # the epoch is complete: the next iteration starts anew
                return

    def _epoch_from(self, consumed: int, workers: int, worker: int, counting: bool):
        """This worker's samples of the epoch after this rank's ``consumed`` ones."""
        b, world = self.batch_size, self.world_size
        first, skip = divmod(consumed, b)  # the rank's next block, samples of it already out
        if consumed >= len(self):
            return
        if workers > 1 and skip:
            raise UserError(f"MixtureDataset: with workers resume at a batch boundary: consumed "
                            f"{consumed} is not a multiple of batch_size {b}")
        shards = world * workers
        chunk = b * shards * max(1, CHUNK // (b * shards))  # whole rounds of blocks
        s = self._sampler_at(self._block_start(consumed))
        total = s.total
        while s.position < total:
            start = s.position
            if counting:
                self._known = s.state_dict()
            tasks, occ = s._next(chunk)  # every shard's positions: the task state is shared
            block = (start + np.arange(tasks.size)) // b
            local = (block - self.rank) // world - first  # the rank's blocks from here
            mine = np.flatnonzero((block % world == self.rank) & (local % workers == worker))
            if skip:
                mine, skip = mine[skip:], 0
            examples = s._examples_of(tasks[mine], occ[mine])
            for t, e in zip(tasks[mine].tolist(), examples.tolist(), strict=True):
                if counting:
                    self.consumed += 1  # before the yield: the consumer holds it now
                yield self.sources[t][e]


def _read_plan(plan_json):
    """(Plan, its JSON, the name used in messages) from a path or a dict."""
    from raretask.mixing.plan import Plan

    if isinstance(plan_json, Mapping):
        return Plan.from_json(dict(plan_json), "plan"), dict(plan_json), "plan"
    path = Path(plan_json)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"{path}: cannot read the plan ({err.strerror or err})") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a plan file written by raretask plan")
    return Plan.from_json(data, str(path)), data, str(path)


def _by_task(values, names: list[str], what: str, source: str, weights: np.ndarray,
             unit: str) -> list | None:
    """A dict {task: value} or a list in plan order as one value per task (None where absent)."""
    if values is None:
        return None
    if isinstance(values, Mapping):
        extra = sorted(set(map(str, values)) - set(names))
        if extra:
            raise UserError(f"{what}: unknown task {extra[0]!r} (the plan's: "
                            f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''})")
        out = [values.get(n) for n in names]
    else:
        out = list(values)
        if len(out) != len(names):
            raise UserError(f"{what}: expected {len(names)} entries (the plan's tasks, in "
                            f"order), got {len(out)}")
    for n, w, v in zip(names, weights, out, strict=True):
        if w > 0 and v is None:
            raise UserError(f"{what}: task {n!r} (weight {w:.4g}) is missing")
        if what == "tokens_per_example" and v is not None and \
                not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise UserError(f"{what}: task {n!r}: expected a number > 0, got {v!r}")
    return out


def _plan_sources(sources, names, weights, avail, source, unit) -> list:
    """One indexable per task: the user's sources (checked against the plan's counts in an
    examples plan) or :class:`ExampleIndex` over the plan's example counts."""
    if sources is None:
        items = []
        for n, w, a in zip(names, weights, avail, strict=True):
            if a is None and w > 0:
                raise UserError(f"{source}: task {n!r} has no example count in the plan (planned "
                                "without data); give sources")
            items.append(ExampleIndex(n, 0 if a is None else round(a)))
        return items
    given = _by_task(sources, names, "sources", source, weights, unit)
    items = []
    for n, a, s in zip(names, avail, given, strict=True):
        if s is None:  # a task of weight 0 left out
            items.append([])
            continue
        try:
            size = len(s)
        except TypeError:
            raise UserError(f"sources: task {n!r}: expected a sequence with len(), got "
                            f"{type(s).__name__}") from None
        if unit == "examples" and a is not None and size != round(a):
            raise UserError(f"sources: task {n!r} has {size:,} examples but the plan counted "
                            f"{round(a):,}")
        items.append(s)
    return items


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): as given, else torch.distributed's when initialised, else (0, 1)."""
    if rank is None and world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    rank, world_size = int(rank or 0), int(world_size or 1)
    if not 0 <= rank < world_size:
        raise UserError(f"rank must be in 0..world_size - 1, got rank {rank} of {world_size}")
    return rank, world_size
