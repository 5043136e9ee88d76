"""Several processes on one grid (``torchrun``): process-group setup, ranks, the two modes.

``torchrun --nproc_per_node=P -m raretask run CONFIG --out DIR`` starts P copies of the command;
:func:`session` turns torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) into a
process group and :class:`Ranks` says what this copy does:

* ``cells``: every rank takes its share of the grid's groups, one at a time, each on its own
  device (``cuda:LOCAL_RANK`` or the CPU; with more processes than GPUs, ranks share the GPUs
  round-robin, packing small runs onto one GPU), and writes that group's files itself. A rank
  claims a group with an ``flock`` (:func:`raretask.runs.store.claim`): ranks that finish early take
  unclaimed groups, and a killed rank's claims vanish with it.
* ``ddp`` / ``fsdp`` (``model``): every rank trains the same cell on its slice of the global batch
  (DDP; FSDP2 ``fully_shard`` for presets of 1b and up on CUDA); rank 0 alone writes files.

Either way rank 0 holds the directory's run lock for the whole job, so a second invocation on
the same directory still refuses, and rank 0 alone merges the tables, after every rank is done.

The default group is NCCL in the model modes on CUDA (its collectives carry the gradients), gloo
otherwise; a second gloo group with a long timeout carries the few control messages (lock result,
work list, final barrier), because in ``cells`` mode a rank that finishes early waits at the
barrier for as long as the slowest rank trains.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from raretask.errors import UserError

Mode = Literal["single", "cells", "ddp", "fsdp"]
PARALLEL_CHOICES = ("auto", "cells", "model", "ddp", "fsdp")
FSDP_PRESETS = ("1b", "4b")
"""LM presets that ``model`` shards with FSDP2 on CUDA (a replica plus AdamW state per GPU no
longer leaves room for activations at 1b on an 80 GB card at useful batch sizes)."""

_CONTROL_TIMEOUT = timedelta(days=7)
_control: Any = None  # the gloo group for control messages, while a session is open


def _env_int(name: str, default: int) -> int:
    """An integer torchrun sets in the environment; ``default`` outside torchrun."""
    try:
        return int(os.environ.get(name, str(default)))
    except ValueError:
        raise UserError(f"{name} must be an integer (set by torchrun)") from None


def env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it."""
    world, rank, local = (_env_int(n, d) for n, d in
                          (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    return rank, max(world, 1), local


@dataclass(frozen=True)
class Ranks:
    """What this process does in the job: its rank, the world size, the mode and its device."""

    rank: int = 0
    world: int = 1
    mode: Mode = "single"
    device: str = "cpu"

    @property
    def data_parallel(self) -> bool:
        """True when the ranks train one model together (DDP or FSDP2)."""
        return self.mode in ("ddp", "fsdp")

    @property
    def data_world(self) -> tuple[int, int]:
        """(rank, world) of the data-parallel group a trainer uses; (0, 1) when it trains alone."""
        return (self.rank, self.world) if self.data_parallel else (0, 1)

    @property
    def writes(self) -> bool:
        """Whether this process writes its groups' files (everyone but non-zero model ranks)."""
        return self.rank == 0 or not self.data_parallel

    @property
    def main(self) -> bool:
        return self.rank == 0


def rank_device(device: str, world: int, local_rank: int, mode: Mode = "cells",
                gpus: int | None = None) -> str:
    """This rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` when several processes run.

    In ``cells`` mode there may be more processes than GPUs (``gpus``, default: the visible
    count): rank r then takes ``cuda:(r % gpus)``, so several small runs share one GPU (their
    kernels fill each other's launch gaps; each cell's numbers do not depend on its neighbours).
    The model modes need one GPU per process (NCCL cannot put two ranks of one group on one GPU).
    """
    if world == 1 or device == "cpu":
        return device
    if device != "cuda":
        raise UserError(f"device: {device!r} pins one GPU, but torchrun starts {world} processes; "
                        "use 'auto' or 'cuda' (each rank takes cuda:LOCAL_RANK)")
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    gpus = max(gpus, 1)
    if local_rank < gpus:
        return f"cuda:{local_rank}"
    if mode == "cells":
        return f"cuda:{local_rank % gpus}"
    raise UserError(f"--parallel {mode}: {local_rank + 1} or more processes on this node but "
                    f"{gpus} GPU(s): the model modes need one GPU per process (--parallel cells "
                    "can put several processes on one GPU)")


def share_compile_workers(local_world: int, cpus: int | None = None) -> int:
    """Set torch.compile's worker count for this process to its share of the node's CPUs.

    Inductor starts up to one compile worker per CPU in every process that compiles; P ranks on
    one node would start P times that (the suspected cause of what was measured on 2026-12-02:
    12 packed ranks on a 16-core H200 host spent a third of their CPU time in the kernel and
    finished no cell in 170 s). Returns the count set: ``cpus // local_world``, at least 1.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = max(1, (cpus or 1) // max(local_world, 1))
    import torch._inductor.config as inductor

    inductor.compile_threads = share
    return share


@contextlib.contextmanager
def session(mode: Mode, device: str) -> Iterator[None]:
    """Initialise the process group for ``mode`` on ``device`` (this rank's), and tear it down.

    Does nothing for ``single`` and when a group already exists (a caller set it up: theirs to
    destroy). Model modes on CUDA get NCCL bound to the rank's GPU; everything else gets gloo.
    """
    global _control
    import torch
    import torch.distributed as dist

    if mode != "single":  # several processes on this node share its CPUs
        share_compile_workers(_env_int("LOCAL_WORLD_SIZE", 1))
    if mode == "single" or dist.is_initialized():
        if mode != "single" and _control is None:
            _control = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)
        yield
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if mode in ("ddp", "fsdp") and device.startswith("cuda"):
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        # cells mode sends no tensors, only waits: the long timeout lets fast ranks wait
        dist.init_process_group("gloo", timeout=_CONTROL_TIMEOUT)
    try:
        _control = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)
        yield
    finally:
        _control = None
        dist.destroy_process_group()


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object); ``obj`` itself outside torchrun."""
    if not _initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def barrier(poll: Callable[[], None] | None = None, every: float = 1.0) -> None:
    """Wait for every rank, calling ``poll`` every ``every`` seconds meanwhile (progress).

    No timeout worth the name: in ``cells`` mode a rank may wait for another's whole training.
    """
    if not _initialized():
        return
    import torch.distributed as dist

    work = dist.barrier(group=_control, async_op=True)
    while poll is not None and not work.is_completed():
        time.sleep(every)
        poll()
    work.wait()


def raise_together(error: str | None) -> None:
    """Rank 0's user error, raised on every rank, so that no rank waits for one that quit."""
    error = broadcast(error)
    if error is not None:
        raise UserError(error)
