"""Realise a plan: which task and which example comes at each position, rare tasks spread evenly.

:class:`MixtureSampler` is a deterministic, resumable index generator yielding
``(task, example)`` pairs; :class:`MixtureDataset` wraps it as a PyTorch ``IterableDataset`` over
one indexable dataset per task.

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

A task is never scheduled beyond its cap (``floor(max_epochs * size)`` occurrences): its slot
passes on to the other tasks, so no example is ever seen more than ``ceil(max_epochs)`` times.
Within a task, occurrence j is example ``perm_e[j mod n]`` of epoch ``e = j // n``, a fresh
permutation per (seed, task, epoch).

The state is a handful of integers (position, per-level counters, occurrences per task):
:meth:`MixtureSampler.state_dict` / :meth:`MixtureSampler.load_state_dict` continue exactly, and
the sequence does not depend on how it is chunked.

Example
-------
>>> s = MixtureSampler([0.9, 0.1], sizes=[1000, 100], total=20, seed=0)
>>> [int(t) for t in s.tasks(20)]
[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from raretask.errors import UserError

CHUNK = 4096


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
        Most passes over any task's examples (None: unlimited).
    seed:
        Seeds the per-epoch example permutations (the task sequence itself has no randomness).
    rare_share:
        Tasks at or below this share are spread as Sturmian subsequences (see the module doc).
    names:
        Task names (for messages).
    """

    def __init__(self, weights: Sequence[float], sizes: Sequence[int], total: int,
                 max_epochs: float | None = None, seed: int = 0, rare_share: float = 0.05,
                 names: Sequence[str] | None = None):
        q = np.asarray(weights, float)
        k = q.size
        names = [str(i) for i in range(k)] if names is None else [str(n) for n in names]
        if k == 0 or len(names) != k or np.any(~np.isfinite(q)) or np.any(q < 0) or q.sum() <= 0:
            raise UserError("weights: expected one share >= 0 per task, not all zero")
        n = np.asarray(sizes, dtype=np.int64)
        if n.shape != (k,) or np.any(n < 0):
            raise UserError(f"sizes: expected {k} example counts >= 0")
        for i in np.flatnonzero((q > 0) & (n == 0)):
            raise UserError(f"task {names[i]!r}: weight {q[i]:.4g} but no examples")
        if int(total) != total or total < 0:
            raise UserError(f"total must be an integer >= 0, got {total}")
        if max_epochs is not None and not max_epochs > 0:
            raise UserError(f"max_epochs must be > 0, got {max_epochs}")
        self.weights = q / q.sum()
        self.sizes, self.total, self.seed, self.names = n, int(total), int(seed), names
        self.max_epochs = max_epochs
        big = np.iinfo(np.int64).max
        self.caps = (np.array([math.floor(max_epochs * x + 1e-9) for x in n], dtype=np.int64)
                     if max_epochs is not None else np.full(k, big, dtype=np.int64))
        self.caps[self.weights == 0] = 0
        if int(np.minimum(self.caps, self.total).sum()) < self.total:
            raise UserError(f"total: {self.total:,} samples exceed what the caps allow "
                            f"({int(self.caps.sum()):,} with max_epochs {max_epochs:g})")
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
        self.load_state_dict(self._initial_state())

    # -- state ----------------------------------------------------------------------------------
    def _initial_state(self) -> dict:
        return {"position": 0, "level": [0] * len(self.rare),
                "frequent_time": 0, "occurrences": [0] * self.weights.size}

    def state_dict(self) -> dict:
        """Plain ints (JSON-safe): the position and the counters that determine the rest."""
        return {"position": self.position, "level": list(self._level),
                "frequent_time": self._ftime, "occurrences": [int(x) for x in self._occ]}

    def load_state_dict(self, state: dict) -> None:
        try:
            pos = int(state["position"])
            level = [int(x) for x in state["level"]]
            ftime = int(state["frequent_time"])
            occ = np.array([int(x) for x in state["occurrences"]], dtype=np.int64)
        except (KeyError, TypeError, ValueError):
            raise UserError("sampler state: expected position, level, frequent_time, "
                            "occurrences") from None
        if len(level) != len(self.rare) or occ.shape != self.weights.shape or \
                not 0 <= pos <= self.total:
            raise UserError("sampler state: does not match this sampler's tasks or total")
        self.position, self._level, self._ftime, self._occ = pos, level, ftime, occ

    # -- generation -----------------------------------------------------------------------------
    def tasks(self, count: int) -> np.ndarray:
        """The tasks of the next ``count`` positions (advances the state)."""
        return self._next(count)[0]

    def take(self, count: int) -> np.ndarray:
        """[n, 2] int64 (task, example) of the next ``count`` positions, n <= count at the end."""
        tasks, occ = self._next(count)
        ex = np.empty_like(tasks)
        for k in np.unique(tasks):
            sel = tasks == k
            ex[sel] = self._examples(int(k), occ[sel])
        return np.stack([tasks, ex], axis=1)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        while self.position < self.total:
            for t, e in self.take(CHUNK):
                yield int(t), int(e)

    def __len__(self) -> int:
        return self.total

    def _next(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        n = max(0, min(int(count), self.total - self.position))
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
        self.position += n
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

    def _examples(self, task: int, occurrence: np.ndarray) -> np.ndarray:
        n = int(self.sizes[task])
        epoch, within = np.divmod(occurrence, n)
        out = np.empty_like(occurrence)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = self._permutation(task, int(e))[within[sel]]
        return out

    def _permutation(self, task: int, epoch: int) -> np.ndarray:
        cached = self._perm.get(task)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(task, epoch)))
            cached = (epoch, rng.permutation(int(self.sizes[task])))
            self._perm[task] = cached
        return cached[1]


def _iterable_base():
    import torch.utils.data

    return torch.utils.data.IterableDataset


class MixtureDataset(_iterable_base()):
    """A PyTorch ``IterableDataset`` over one indexable dataset per task, in sampler order.

    The sequence is cut into blocks of ``batch_size`` positions. Under ``torch.distributed`` (or
    with ``rank`` / ``world_size`` given) rank r takes the blocks b with ``b % world_size == r``;
    in a ``DataLoader`` with ``num_workers=W`` each worker takes every W-th of its rank's blocks,
    and since the loader collects the workers' batches round-robin, the batches come out in the
    sampler's order, exactly as with ``num_workers=0``, provided ``batch_size`` here equals the
    loader's. Every worker computes the whole (cheap, integer) task sequence and loads only its
    own blocks' examples.

    Checkpoints: with ``num_workers=0`` the dataset's own :meth:`state_dict` follows the
    iteration; with workers (which iterate copies), note how many samples this rank has
    consumed and call :meth:`seek` with it on resume.

    Example
    -------
    >>> ds = MixtureDataset([["a0", "a1"], ["b0"]], weights=[0.5, 0.5], total=4)
    >>> list(ds)
    ['a1', 'b0', 'a0', 'b0']
    """

    def __init__(self, sources: Sequence, weights: Sequence[float], total: int,
                 max_epochs: float | None = None, seed: int = 0, names=None,
                 rare_share: float = 0.05, batch_size: int = 1, rank: int | None = None,
                 world_size: int | None = None):
        super().__init__()
        if int(batch_size) != batch_size or batch_size < 1:
            raise UserError(f"batch_size must be an integer >= 1, got {batch_size}")
        rank, world_size = _rank_world(rank, world_size)
        self.sources = list(sources)
        self.batch_size, self.rank, self.world_size = int(batch_size), rank, world_size
        self.sampler = MixtureSampler(weights, [len(s) for s in self.sources], total,
                                      max_epochs=max_epochs, seed=seed, names=names,
                                      rare_share=rare_share)

    def __iter__(self):
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if workers > 1 and self.batch_size == 1:
            raise UserError("MixtureDataset: with num_workers > 1 give batch_size (the "
                            "DataLoader's), so the batches keep the sampler's order")
        shards = self.world_size * workers
        mine = self.rank + self.world_size * worker
        b = self.batch_size
        chunk = b * shards * max(1, CHUNK // (b * shards))  # whole rounds of blocks
        while self.sampler.position < self.sampler.total:
            # positions advance in whole blocks (here and in seek): the next block is position // b
            first = self.sampler.position // b
            rows = self.sampler.take(chunk)  # every shard's positions: the state stays shared
            blocks = first + np.arange(len(rows)) // b
            for task, example in rows[blocks % shards == mine]:
                yield self.sources[task][example]

    def __len__(self) -> int:
        """Samples this rank yields (all its workers together)."""
        total, b = self.sampler.total, self.batch_size
        blocks = -(-total // b)
        mine = len(range(self.rank, blocks, self.world_size))
        if mine and (blocks - 1) % self.world_size == self.rank and total % b:
            return (mine - 1) * b + total % b  # the last, partial block is this rank's
        return mine * b

    def seek(self, consumed: int) -> None:
        """Continue after this rank (all its workers) has consumed ``consumed`` samples."""
        if int(consumed) != consumed or not 0 <= consumed <= len(self):
            raise UserError(f"seek: expected 0..{len(self)} samples, got {consumed}")
        done, partial = divmod(int(consumed), self.batch_size)
        # this rank's next block; a partial block is only ever the last one: then the end
        block = self.rank + done * self.world_size
        position = self.sampler.total if partial else min(block * self.batch_size,
                                                          self.sampler.total)
        self.sampler.load_state_dict(self.sampler._initial_state())
        while self.sampler.position < position:
            self.sampler.tasks(min(CHUNK * 16, position - self.sampler.position))

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


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
