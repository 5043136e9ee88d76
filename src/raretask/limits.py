"""Limits checked before anything is written: what a small input may ask of the machine.

A 1.5 KB config can ask for 10^11 cells, a burst of 10^11 samples or a trace of 10^9 points; a
few flags can ask ``predict`` for hours of sorting. Each limit below is checked where the value
is read, before a run directory (or any output) is written, and an over-limit value is one line
naming the field and the limit (:class:`~raretask.errors.UserError`, exit code 2).

The memory check compares an estimate from the shapes (each study's cell says what its model,
optimizer, batches and traces hold: ``memory_parts``) with the device's memory: the GPU's for
CUDA, the machine's physical memory for CPU. It refuses only what cannot fit at all; it is not
a promise that what passes fits beside everything else running.
"""

from __future__ import annotations

import math
import os

from raretask.errors import UserError

MAX_CELLS = 100_000
"""Cells in one grid (the product of its axes' lengths)."""
MAX_CONFIG_BYTES = 1 << 20
"""Size of a YAML config or task file (1 MiB)."""
MAX_YAML_DEPTH = 32
"""Nesting of mappings and lists in a YAML file or a ``--set`` value."""
MAX_TRACE_POINTS = 1_000_000
"""Points of a toy cell's rare-task trace (steps / trace_every)."""
MAX_PREDICT_WORK = 10_000_000
"""``predict``'s problem size, tasks x total features (about 10 s on one core; the required
frequency of each task re-ranks every feature)."""


def size_text(n: float) -> str:
    """Bytes as people read them: ``2.2 PB``, ``31.2 GB``, ``512 B``."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def device_memory(device: str) -> tuple[int, str]:
    """(bytes, what they are) of the memory a run on ``device`` trains in."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index
        props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None
                                                 else index)
        return int(props.total_memory), f"the memory of {device} ({props.name})"
    try:
        import psutil

        return int(psutil.virtual_memory().total), "this machine's memory"
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine's memory"
    except (ValueError, OSError, AttributeError):  # pragma: no cover - every Linux has both
        return 1 << 62, "unknown memory"


def check_group_memory(groups: list[tuple[str, list]], device: str, source: str = "config",
                       memory: int | None = None, shards: int = 1,
                       group_field: str = "profile.group_size") -> None:
    """Refuse (one line) a group whose cells' estimated memory exceeds the device's.

    ``groups``: (name, its cells); a cell without ``memory_parts`` counts as nothing. The line
    names the field that dominates the estimate, or ``group_field`` (the profile field that
    sets how many cells train together) when each cell fits alone but the group does not.
    ``shards``: processes that train one model together (DDP, FSDP), each holding about its
    share.
    """
    if memory is None:
        memory, what = device_memory(device)
    else:
        what = "the memory given"
    for name, cells in groups:
        parts = [{k: v // shards for k, v in c.memory_parts().items()} for c in cells
                 if hasattr(c, "memory_parts")]
        total = sum(sum(p.values()) for p in parts)
        if total <= memory:
            continue
        biggest = max(parts, key=lambda p: sum(p.values()))
        field = (group_field if sum(biggest.values()) <= memory
                 else max(biggest, key=biggest.get))
        raise UserError(
            f"{source}: {field}: group {name} ({len(cells)} cell{'s' * (len(cells) != 1)}) needs "
            f"about {size_text(total)} of memory, more than the {size_text(memory)} of {what} "
            f"(the limit); lower {field}")


def check_grid_size(axes: dict[str, list], source: str) -> int:
    """The number of cells of ``axes``; over :data:`MAX_CELLS`, one line (never materialised)."""
    n = math.prod(len(v) for v in axes.values())
    if n > MAX_CELLS:
        shape = " x ".join(f"{k} {len(v)}" for k, v in axes.items())
        raise UserError(f"{source}: grid: {len(axes)} list axes make {n:,} cells ({shape}), more "
                        f"than the limit of {MAX_CELLS:,} cells in one grid")
    return n
