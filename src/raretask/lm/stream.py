"""Streams of background batches: corpus windows or n-gram rows, seeded per step, prefetched.

A :class:`TokenStream` serves one rank's rows of each training step as a LongTensor
[batch_size, seq_len + 1] from a *source*:

* :class:`CorpusWindows` (``"corpus"``): windows of T+1 tokens at uniformly random offsets of the
  training tokens, drawn with replacement (nanoGPT's sampler). Real text, but a small corpus is
  recycled: the stream reports ``epochs`` = tokens served / training tokens.
* :class:`~raretask.lm.ngram.NGramModel` (``"ngram"``): fresh rows sampled from an n-gram model
  of the training tokens; nothing repeats, and ``epochs`` is still reported against the training
  tokens, as a size comparison.

Each row of step ``s`` draws its randomness from a hash of (seed, s, global row index) alone
(:func:`raretask.lm.rng.row_keys`), so a batch is a pure function of the step (resuming needs
only the step: :meth:`TokenStream.state_dict`) and of the **global** batch: with ``world_size``
ranks of ``batch_size`` rows each, the global batch has ``batch_size * world_size`` rows and rank
r gets the contiguous rows ``r * batch_size .. (r + 1) * batch_size - 1``; the concatenation over
ranks (all_gather order) equals the one-process batch of ``batch_size * world_size`` rows,
whatever the world size.

Sources with ``rows_per_call`` > 1 (the n-gram) sample several steps per call, whose fixed numpy
cost is then shared. With ``prefetch`` (on when a grid cell trains on a GPU) the stream samples
the next chunk of steps in a background thread while the trainer trains on the current one.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raretask.errors import UserError
from raretask.lm.ngram import NGramModel
from raretask.lm.rng import row_keys
from raretask.lm.tokens import TokenArray


class CorpusWindows:
    """Source ``"corpus"``: the window at a uniformly random offset of the training tokens."""

    name = "corpus"
    rows_per_call = 1  # gathering windows costs nothing per call: no lookahead

    def __init__(self, tokens: TokenArray):
        self.tokens = tokens

    def rows(self, keys: np.ndarray, length: int) -> np.ndarray:
        n = self.tokens.window_count(length)
        if n == 0:
            raise UserError(
                f"the training corpus ({len(self.tokens)} tokens) is shorter than one window "
                f"of {length} tokens"
            )
        return self.tokens.windows((keys % np.uint64(n)).astype(np.int64), length)


_AHEAD = 1 << 22
"""At most this many tokens per chunk of steps sampled at once (the stream holds the chunk being
served and, with prefetch, the next one)."""


class TokenStream:
    """Endless batches of background tokens for one rank: LongTensor [batch_size, seq_len + 1].

    Parameters
    ----------
    source : :class:`CorpusWindows` or a fitted :class:`NGramModel`.
    batch_size : rows per rank (B); the global batch has ``batch_size * world_size`` rows.
    seq_len : T; each row has T + 1 tokens (inputs ``x[:, :-1]``, targets ``x[:, 1:]``).
    seed : fixes every batch (module docstring: a batch is a pure function of seed and step).
    rank, world_size : this rank's rows are ``rank * B .. (rank + 1) * B - 1`` of the global batch.
    corpus_tokens : training tokens of the corpus, the denominator of :attr:`epochs`.
    prefetch : sample the next chunk of steps in a background thread while the current one is
        served, so that a GPU trainer's host thread does not wait for the sampler (off by
        default: on a CPU with no idle core the thread only competes with training). Numbers do
        not depend on it: a chunk is a pure function of its steps, and :meth:`state_dict` holds
        only the step of the next batch :meth:`next_batch` returns, never how far the thread
        has sampled.

    Example::

        >>> stream = bg.stream(batch_size=8, seq_len=64, seed=0)
        >>> x = next(stream); state = stream.state_dict()
        >>> y = next(stream); stream.load_state_dict(state); bool((next(stream) == y).all())
        True
    """

    def __init__(
        self,
        source: CorpusWindows | NGramModel,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        corpus_tokens: int = 0,
        prefetch: bool = False,
    ):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if seed < 0:
            raise UserError(f"seed must be >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside 0 .. world_size - 1 = {world_size - 1}")
        self.source = source
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.corpus_tokens = corpus_tokens
        self.prefetch = prefetch
        self.step = 0
        self._ahead: tuple[int, Tensor] = (0, torch.empty(0))
        self._pending: tuple[int, Future] | None = None  # (first step, chunk being sampled)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _rows(self, steps: range, rows: np.ndarray) -> Tensor:
        """Rows ``rows`` of each step in ``steps``: [len(steps), len(rows), T + 1]."""
        if steps.start < 0:
            raise UserError(f"step must be >= 0, got {steps.start}")
        keys = np.concatenate([row_keys(self.seed, s, rows) for s in steps])
        out = self.source.rows(keys, self.seq_len + 1)
        return torch.from_numpy(out.reshape(len(steps), len(rows), self.seq_len + 1))

    def _chunk(self, first: int) -> Tensor:
        """This rank's rows of the steps ``first ..`` that one call to the source samples."""
        row_tokens = self.batch_size * (self.seq_len + 1)
        n_steps = max(1, min(self.source.rows_per_call // self.batch_size, _AHEAD // row_tokens))
        lo = self.rank * self.batch_size
        return self._rows(range(first, first + n_steps), np.arange(lo, lo + self.batch_size))

    def batch(self, step: int) -> Tensor:
        """This rank's rows of step ``step`` (does not move the stream).

        Sources with ``rows_per_call`` > batch_size sample the following steps in the same call
        and keep them; with ``prefetch`` the chunk after that is sampled in the background. A
        batch depends on (seed, step, row) only, so neither changes a number.
        """
        first, ahead = self._ahead
        if not first <= step < first + len(ahead):
            pending, self._pending = self._pending, None
            if pending is not None and pending[0] == step:
                ahead = pending[1].result()  # the thread's chunk (re-raises its error)
            else:  # first call, resume, or a jump: sample here; a stale chunk is dropped
                ahead = self._chunk(step)
            first = step
            self._ahead = first, ahead
            if self.prefetch:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="raretask-stream")
                nxt = first + len(ahead)
                self._pending = nxt, self._pool.submit(self._chunk, nxt)
        return ahead[step - first].clone()

    def close(self) -> None:
        """Stop the prefetch thread (it also ends when the stream is garbage-collected)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._pending = None, None

    def global_batch(self, step: int) -> Tensor:
        """All ``batch_size * world_size`` rows of step ``step``, in rank order."""
        return self._rows(range(step, step + 1), np.arange(self.global_batch_size))[0]

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> Tensor:
        x = self.batch(self.step)
        self.step += 1
        return x

    def next_batch(self) -> Tensor:
        """This rank's rows of the current step, then advance (the trainer's BatchSource)."""
        return next(self)

    @property
    def tokens_served(self) -> int:
        """Training tokens served so far by all ranks: steps * global batch * seq_len (targets)."""
        return self.step * self.global_batch_size * self.seq_len

    @property
    def epochs(self) -> float:
        """tokens_served / training tokens of the corpus (see the module docstring for ngram)."""
        return self.tokens_served / self.corpus_tokens if self.corpus_tokens else 0.0

    def summary(self) -> dict[str, Any]:
        """What a run summary records about its background."""
        name = self.source.name
        if isinstance(self.source, NGramModel):
            name = f"ngram (order {self.source.order})"
        return {
            "background_source": name,
            "background_tokens": self.tokens_served,
            "corpus_tokens": self.corpus_tokens,
            "epochs": self.epochs,
            "repeats": isinstance(self.source, CorpusWindows) and self.epochs > 0,
        }

    def _identity(self) -> dict[str, Any]:
        order = getattr(self.source, "order", None)
        return {
            "source": self.source.name if order is None else f"ngram:{order}",
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "corpus_tokens": self.corpus_tokens,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: the step, plus what must match on resume."""
        return {"step": self.step, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; world size may differ, the global batch may not."""
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise UserError(
                    f"cannot resume the background stream: saved {key} {state.get(key)!r}, "
                    f"this run has {value!r}"
                )
        self.step = int(state["step"])



__all__ = ["CorpusWindows", "TokenStream"]
