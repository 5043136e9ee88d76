"""Source ``"ngram"`` of the background: an interpolated n-gram model that samples fresh text.

Fitted to a corpus's training tokens, it keeps their unigram and local statistics but never
repeats them: each row is a fresh chain with its own randomness (:mod:`raretask.lm.rng`). It is
not language beyond a few tokens, so the background loss floors at the n-gram's entropy.
:mod:`raretask.lm.background` says when to use it.
"""

from __future__ import annotations

import numpy as np

from raretask.errors import UserError
from raretask.lm.rng import mix, row_keys, uniforms


class NGramModel:
    """An interpolated n-gram model of token ids that samples fresh rows.

    P(w | h) = lam(h) P_ML(w | h) + (1 - lam(h)) P(w | h'), h' = h without its oldest token, down
    to the unigram, with Witten-Bell weights lam(h) = N(h) / (N(h) + U(h)) (N: times h was seen,
    U: distinct tokens after it; lam = 0 for an unseen h). A row starts from the n-1 tokens before
    a random position of the fitted tokens (so starts follow the corpus) and continues the chain;
    only ids seen in the corpus are ever emitted. Sampling is vectorised over rows (one numpy
    pass per position), with integer cumulative counts, so it is exact and deterministic.

    Memory: besides the counts, :meth:`fit` builds lookup tables (:meth:`_lookup_tables`) of 4
    bytes per counted n-gram occurrence (about ``order`` x the fitted tokens, which
    ``ngram_max_tokens`` caps) plus 8 bytes per distinct n-gram and context length > 1.

    Example::

        >>> ng = NGramModel(vocab_size=8192, order=3).fit(tokens)
        >>> ng.sample(n_rows=4, length=129, seed=0).shape
        (4, 129)
    """

    name = "ngram"
    rows_per_call = 4096
    """The stream samples whole steps ahead until it has this many rows per call: the numpy
    overhead of a position is paid once for all of them."""

    def __init__(self, vocab_size: int, order: int = 3):
        self.vocab_size = vocab_size
        self.order = order

    def fit(self, tokens: np.ndarray) -> NGramModel:
        """Count every k-gram (k = 1 .. order) of ``tokens``; returns self."""
        v, k_max = self.vocab_size, self.order - 1
        if self.order < 1:
            raise UserError(f"ngram_order must be >= 1, got {self.order}")
        if v**self.order >= 2**63:
            raise UserError(f"ngram_order {self.order} is too high for vocab_size {v} (int64 keys)")
        x = np.asarray(tokens, dtype=np.int64)
        n = len(x)
        if n <= self.order:
            raise UserError(f"{n} tokens are too few to fit an order-{self.order} n-gram model")
        uni = np.bincount(x, minlength=v)
        nz = np.flatnonzero(uni)
        counts, nexts, first, totals = [uni[nz]], [nz], [np.array([0])], [np.array([n])]
        grams = []  # per level k >= 1: the sorted (k+1)-gram keys, one per entry
        entries = len(nz)
        self._levels = []  # per context length k: (sorted context keys, lam, first segment id)
        n_segments = 1
        for k in range(1, k_max + 1):
            ctx = np.zeros(n - k, dtype=np.int64)
            for j in range(1, k + 1):
                ctx += x[k - j : n - j] * v ** (j - 1)
            pairs, c = np.unique(ctx * v + x[k:], return_counts=True)
            keys, start = np.unique(pairs // v, return_index=True)
            tot = np.add.reduceat(c, start)
            types = np.diff(np.append(start, len(pairs)))
            self._levels.append((keys, tot / (tot + types), n_segments))
            counts.append(c)
            grams.append(pairs)
            nexts.append(pairs % v)
            first.append(entries + start)
            totals.append(tot)
            entries += len(pairs)
            n_segments += len(keys)
        counts_all = np.concatenate(counts)
        self._cum = np.cumsum(counts_all)
        self._next = np.concatenate(nexts)
        self._seg_base = (self._cum - counts_all)[np.concatenate(first)]
        self._seg_total = np.concatenate(totals)
        self._tokens = x
        if k_max >= 1:  # the bigram level as dense [V] tables
            keys1, lam1, seg0 = self._levels[0]
            self._lam1 = np.zeros(v)
            self._lam1[keys1] = lam1
            self._seg1 = np.zeros(v, dtype=np.int64)
            self._seg1[keys1] = seg0 + np.arange(len(keys1))
        self._tables = self._lookup_tables(counts_all, [nz, *grams])
        return self

    def _lookup_tables(self, counts_all: np.ndarray, grams: list[np.ndarray]) -> dict:
        """Tables that let :meth:`rows` find each emitted entry and next context by indexing.

        * ``entry[c]``: the entry (index of ``_next``) whose cumulative range holds count ``c``,
          i.e. ``searchsorted(_cum, c, side="right")`` for every c (``np.repeat``);
        * ``after[k][e]``: after emitting entry ``e`` of level L (context of L tokens), the index
          in ``keys_k`` of the row's new k-token context, which is the last k tokens of e's
          (L+1)-gram when L + 1 >= k: ``len(keys_k)`` if that context was never seen, -1 when
          L + 1 < k (then the row looks its context up: :meth:`_find`, a binary search);
        * ``lam[k]``: ``lam_k`` with a 0 appended for "never seen".
        """
        v, k_max = self.vocab_size, self.order - 1
        entry = np.repeat(np.arange(len(counts_all), dtype=np.int32), counts_all)
        bounds = np.cumsum([0] + [len(g) for g in grams])  # entries of level L: bounds[L]..
        after, lam = {}, {}
        for k in range(2, k_max + 1):
            keys_k, lam_k, _ = self._levels[k - 1]
            nxt = np.full(len(counts_all), -1, dtype=np.int64)
            for level in range(k - 1, k_max + 1):
                nxt[bounds[level] : bounds[level + 1]] = self._find(k, grams[level] % v**k)
            after[k] = nxt
            lam[k] = np.append(lam_k, 0.0)
        return {"entry": entry, "after": after, "lam": lam}

    def _find(self, k: int, ctx: np.ndarray) -> np.ndarray:
        """Index of each k-token context in ``keys_k``, ``len(keys_k)`` where it is absent."""
        keys_k = self._levels[k - 1][0]
        i = np.minimum(np.searchsorted(keys_k, ctx), len(keys_k) - 1)
        return np.where(keys_k[i] == ctx, i, len(keys_k))

    def rows(self, keys: np.ndarray, length: int) -> np.ndarray:
        """One fresh row of ``length`` tokens per key (uint64, :func:`row_keys`): [M, length].

        All rows advance together, one position per numpy pass. At each position a row picks a
        level (``pick``: :func:`_choose_segment`) and a count within that level's segment of its
        context (``draw``); the entry holding that count is the token it emits.
        """
        v, k_max = self.vocab_size, self.order - 1
        m = len(keys)
        tables = self._tables
        entry, after, lam_of = tables["entry"], tables["after"], tables["lam"]
        ctx = self._start_contexts(keys)  # ctx[k]: last k tokens
        where = {k: self._find(k, ctx[k]) for k in range(2, k_max + 1)}  # index in keys_k
        u = uniforms(keys, 2 * length)  # [2 length, M]: row 2t picks, 2t + 1 draws
        out = np.empty((length, m), dtype=np.int64)
        for t in range(length):
            pick, draw = u[2 * t], u[2 * t + 1]
            lams, segs = [], []  # longest context first
            for k in range(k_max, 0, -1):
                if k == 1:
                    lams.append(self._lam1[ctx[1]])
                    segs.append(self._seg1[ctx[1]])
                    continue
                lams.append(lam_of[k][where[k]])  # 0 where the context was never seen
                segs.append(self._levels[k - 1][2] + where[k])  # unused where lam is 0
            seg = _choose_segment(lams, segs, pick)
            total = self._seg_total[seg]
            offset = np.minimum((draw * total).astype(np.int64), total - 1)
            e = entry[self._seg_base[seg] + offset]
            tok = self._next[e]
            out[t] = tok
            for k in range(k_max, 0, -1):
                ctx[k] = tok + v * (ctx[k] % v ** (k - 1)) if k > 1 else tok
            for k in range(2, k_max + 1):
                where[k] = after[k][e]
                miss = np.flatnonzero(where[k] < 0)  # emitted from a context shorter than k - 1
                if len(miss):
                    where[k][miss] = self._find(k, ctx[k][miss])
        return np.ascontiguousarray(out.T)

    def _start_contexts(self, keys: np.ndarray) -> list[np.ndarray]:
        """ctx[k] = the k corpus tokens before each row's seeded start, as one base-V integer."""
        v, k_max, x = self.vocab_size, self.order - 1, self._tokens
        pos = (mix(keys ^ np.uint64(0x5EED)) % np.uint64(len(x) - k_max)).astype(np.int64) + k_max
        ctx = [np.zeros(len(keys), dtype=np.int64) for _ in range(k_max + 1)]
        for k in range(1, k_max + 1):
            for j in range(1, k + 1):
                ctx[k] += x[pos - j] * v ** (j - 1)
        return ctx

    def sample(self, n_rows: int, length: int, seed: int = 0) -> np.ndarray:
        """``n_rows`` fresh rows of ``length`` tokens (rows of step 0 of a stream with ``seed``)."""
        return self.rows(row_keys(seed, 0, np.arange(n_rows)), length)


def _choose_segment(lams: list[np.ndarray], segs: list[np.ndarray],
                    pick: np.ndarray) -> np.ndarray:
    """The segment each row draws from, given every level's lam and segment (longest first).

    Level k is used with probability lam_k * prod_{j > k} (1 - lam_j): the highest level whose
    cumulative weight exceeds ``pick`` wins; the unigram (segment 0) takes the rest.
    """
    seg = np.zeros(len(pick), dtype=np.int64)
    cum, rest, thresholds = 0.0, 1.0, []
    for lam in lams:
        cum = cum + rest * lam
        rest = rest * (1.0 - lam)
        thresholds.append(cum)
    for lam_seg, threshold in zip(segs[::-1], thresholds[::-1], strict=True):
        seg = np.where(pick < threshold, lam_seg, seg)  # lower levels first, then override
    return seg


__all__ = ["NGramModel"]
