"""One language model over the ranks of a ``torchrun`` job: DDP or FSDP2, and portable state.

* DDP replicates the model and averages gradients; FSDP2 (``fully_shard`` per block, then the
  root) keeps 1/P of every parameter, gradient and AdamW moment per rank and gathers a block's
  weights just before it runs. Parameters stay float32 (bf16 comes from the trainer's autocast),
  so both give the same numbers as one process up to summation order.
* Checkpoints are full, unsharded state keyed by parameter name (optimizer state too, through
  ``torch.distributed.checkpoint.state_dict``), so a run saved by P processes, sharded or not,
  resumes on any other number.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn


def rank_world() -> tuple[int, int]:
    """(rank, processes) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap(model: nn.Module, device: torch.device, fsdp: bool) -> nn.Module:
    """The module to train: ``model`` sharded in place (FSDP2) or a DDP wrapper around it.

    Call before building the optimizer: FSDP2 replaces the parameters by sharded DTensors.
    """
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Whole weights for calls that bypass ``forward`` (``model.logits`` in evaluation)."""
    if not is_sharded(model):
        yield
        return
    model.unshard()  # the root's own weights (embedding, final norm, head); blocks gather in hooks
    try:
        yield
    finally:
        model.reshard()


def mean(value: Tensor) -> Tensor:
    """The mean of a scalar over the ranks (the global batch's loss from each rank's)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state, whole and keyed by name; a collective when sharded (every rank
    must call it; rank 0 gets the state, the others empty dicts)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    sharded = is_sharded(model)
    # sharded: gathered to rank 0's CPU (the others get {}); else the local, already whole state
    opts = StateDictOptions(full_state_dict=sharded, cpu_offload=sharded)
    weights = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(model, optimizer, options=opts)
    return ({k: v.detach().cpu() for k, v in weights.items()}, _to_cpu(optim))


def load_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict,
                     optim: dict) -> None:
    """Load whole state from :func:`state_dicts` (every rank passes the whole state)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=is_sharded(model))
    set_model_state_dict(model, weights, options=opts)
    set_optimizer_state_dict(model, optimizer, optim, options=opts)


def _to_cpu(obj):
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
