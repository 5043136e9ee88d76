"""One mix in both units: shares of examples and shares of tokens.

With t_k tokens per example of task k (the analysis' tokens / count), a mix with example shares
w_k puts ``w_k t_k / sum_j w_j t_j`` of its tokens on task k, and a mix with token shares v_k
draws ``(v_k / t_k) / sum_j v_j / t_j`` of its examples from it. Token-based loaders (OLMo-core,
Megatron, Mosaic by bytes) read weights as token shares, so an examples plan handed to them
unconverted gives long-document tasks more than planned and short ones less.

Example
-------
>>> to_unit([0.5, 0.5], [1.0, 3.0], "examples", "tokens")
[0.25, 0.75]
>>> to_unit([0.25, 0.75], [1.0, 3.0], "tokens", "examples")
[0.5, 0.5]
"""

from __future__ import annotations

from collections.abc import Sequence

UNITS = ("examples", "tokens")


def to_unit(shares: Sequence[float], tokens_per_example: Sequence[float], unit: str,
            to: str) -> list[float] | None:
    """``shares`` (in ``unit``) as shares of ``to``; None where the conversion is undefined (a
    task with no tokens per example, or a mix with no tokens at all)."""
    if unit == to:
        return [float(s) for s in shares]
    if unit == "examples":
        mass = [s * t for s, t in zip(shares, tokens_per_example, strict=True)]
    else:
        if any(t <= 0 for t in tokens_per_example):
            return None
        mass = [s / t for s, t in zip(shares, tokens_per_example, strict=True)]
    total = sum(mass)
    if not total > 0:
        return None
    return [m / total for m in mass]
