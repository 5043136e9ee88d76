"""Token arrays and the held-out split of a corpus's tokens.

A tokenised corpus is one or more flat arrays of token ids (the cached ``.bin`` of a trained
tokenizer, or the user's ``.bin`` shards), memory-mapped, never loaded whole: a
:class:`TokenArray` holds them as pieces and reads windows from them.

**Held-out tokens.** :func:`heldout_cut` finds where the training part ends: ``val_fraction`` of
the tokens, taken from the end and starting at a document boundary (the first document that
starts in the last ``val_fraction``; if the last document is longer than that, the cut falls
inside it). Training windows come only from the part before the cut, validation windows only
from the part after it.
"""

from __future__ import annotations

import numpy as np

from raretask.errors import UserError


class TokenArray:
    """A read-only sequence of token ids held as pieces (memmapped shards or slices of them).

    Windows never cross a piece boundary (shards are separate documents streams).
    """

    def __init__(self, pieces: list[np.ndarray]):
        self.pieces = [p for p in pieces if len(p)]
        self._lengths = np.array([len(p) for p in self.pieces], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._lengths)])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def slice(self, lo: int, hi: int) -> TokenArray:
        """Tokens ``lo .. hi - 1`` of the concatenation, as views (no copy)."""
        out = []
        for p, start in zip(self.pieces, self._offsets[:-1], strict=False):
            a, b = max(lo - start, 0), min(hi - start, len(p))
            if a < b:
                out.append(p[a:b])
        return TokenArray(out)

    def find(self, value: int, start: int, chunk: int = 1 << 22) -> int | None:
        """Index of the first ``value`` at or after ``start`` (None if there is none)."""
        for p, off in zip(self.pieces, self._offsets[:-1], strict=False):
            for lo in range(max(start - off, 0), len(p), chunk):
                hits = np.flatnonzero(p[lo : lo + chunk] == value)
                if len(hits):
                    return int(off + lo + hits[0])
        return None

    def window_count(self, length: int) -> int:
        """How many windows of ``length`` tokens fit inside pieces."""
        return int(np.maximum(self._lengths - length + 1, 0).sum())

    def windows(self, index: np.ndarray, length: int) -> np.ndarray:
        """Windows number ``index`` (0 .. window_count - 1, any order) as int64 [M, length]."""
        counts = np.maximum(self._lengths - length + 1, 0)
        ends = np.cumsum(counts)
        piece = np.searchsorted(ends, index, side="right")
        start = index - (ends[piece] - counts[piece])
        out = np.empty((len(index), length), dtype=np.int64)
        ar = np.arange(length)
        for i in np.unique(piece):
            rows = np.flatnonzero(piece == i)
            out[rows] = self.pieces[i][start[rows, None] + ar]
        return out

    def to_numpy(self, max_tokens: int | None = None, block: int = 1 << 20) -> np.ndarray:
        """The tokens as one int64 array; if longer than ``max_tokens``, evenly spaced blocks."""
        n = len(self)
        if max_tokens is None or n <= max_tokens:
            return np.concatenate([p.astype(np.int64) for p in self.pieces])
        block = min(block, max_tokens)
        starts = np.linspace(0, n - block, max_tokens // block).astype(np.int64)
        parts = []
        for s in starts:
            parts += [p.astype(np.int64) for p in self.slice(int(s), int(s) + block).pieces]
        return np.concatenate(parts)


def heldout_cut(tokens: TokenArray, fraction: float, eod_id: int | None) -> int:
    """Where the training part ends: the first document start in the last ``fraction``.

    Falls back to the exact token position when no document starts there (or no EOD is known).
    """
    n = len(tokens)
    if fraction == 0:
        return n
    target = int(n * (1 - fraction))
    found = tokens.find(eod_id, max(target - 1, 0)) if eod_id is not None else None
    cut = found + 1 if found is not None and found + 1 < n else target
    if not 0 < cut < n:
        raise UserError(f"the corpus has {n} tokens, too few to hold out val_fraction={fraction}")
    return cut


__all__ = ["TokenArray", "heldout_cut"]
