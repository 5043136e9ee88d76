"""Counter-based randomness for the background streams: any row of any step on its own.

Each row of step ``s`` draws its randomness from a hash of (seed, s, global row index) alone
(:func:`row_keys`), and draw ``j`` of a row from a hash of (its key, j) (:func:`uniforms`). So a
batch is a pure function of the seed and the step, whichever rank, process or thread computes
it, and in whatever order: resuming needs only the step. The hash is SplitMix64's finaliser, in
wrapping uint64 arithmetic, vectorised with numpy.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def row_keys(seed: int, step: int, rows: np.ndarray) -> np.ndarray:
    """uint64 key of each global row of step ``step``: the only randomness a row uses."""
    k = mix(np.array([seed], dtype=np.uint64))
    k = mix(k ^ np.uint64(step))
    return mix(k ^ np.asarray(rows, dtype=np.uint64))


def uniforms(keys: np.ndarray, n: int) -> np.ndarray:
    """[n, M] float64 uniforms in [0, 1): entry [j, m] is draw j of row m, a hash of (keys[m], j).

    Laid out draw-major, so that a sampler that advances all rows one position at a time reads
    contiguous memory.
    """
    z = keys[None, :] + (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)[:, None]
    return (mix(z) >> np.uint64(11)).astype(np.float64) * 2.0**-53


__all__ = ["mix", "row_keys", "uniforms"]
