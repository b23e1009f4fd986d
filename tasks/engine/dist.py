"""Where this process stands among the ranks of a stage (torchrun's environment), and the few collectives the
stages use. Every function is a no-op answer (rank 0 of 1) outside torchrun, so the stage functions run the
same code in one process and in N.
"""

from __future__ import annotations

import os
from typing import Any

from ..common import StageError


# ---------------------------------------------------------------------------------------------------------
# Where am I: read from torchrun's environment, so the stage functions need no extra arguments


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world() -> int:
    """Processes in this stage run (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def world_size(gpus: int | str, device: str) -> int:
    """How many processes `training.gpus` asks for on `device` (the config's device: auto | cpu | cuda)."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == "auto":
        return max(visible, 1) if device != "cpu" else 1
    n = int(gpus)
    if n > 1 and device != "cpu":
        if visible == 0:
            raise StageError(f"training.gpus={n} but no CUDA GPU is visible; set training.gpus=1 (device=cpu with gpus>1 runs CPU processes, for tests)")
        if n > visible:
            raise StageError(f"training.gpus={n} but only {visible} GPU(s) are visible (CUDA_VISIBLE_DEVICES); set training.gpus={visible} or auto")
    return n


def gpus_used(gpus: int | str) -> int:
    """How many GPUs a CUDA run of `training.gpus` trains on (auto = every visible one), for the probe's key: unchecked,
    `world_size` says what is wrong with a count this machine lacks when the stage runs."""
    import torch

    return max(torch.cuda.device_count(), 1) if gpus == "auto" else int(gpus)


def per_rank_accum(grad_accum: int, n: int) -> int:
    """Micro-batches per optimizer step on each rank: the global batch (micro x accum) stays the recipe's."""
    if grad_accum % n:
        raise StageError(f"training.grad_accum={grad_accum} is not a multiple of training.gpus={n}: each GPU runs grad_accum / gpus "
                         f"micro-batches so the effective batch stays micro x accum; set training.grad_accum to a multiple of {n}")
    return grad_accum // n


def smaller_micro_batch(micro_batch: int, per_rank_batch: int) -> int | None:
    """The micro-batch to try after `micro_batch` runs out of memory: the largest divisor of `per_rank_batch` (micro x
    accum on one rank) at most half of `micro_batch`, so the smaller setting trains exactly the recipe's effective batch
    (16 x 1 -> 8 x 2 -> 4 x 4; 5 x 1 -> 1 x 5, where half would be 2 x 2 or 2 x 3, four or six samples a step); None at
    1. The probe's memory search (`candidate_settings`) and stage 4's out-of-memory retry step down by it alike."""
    if micro_batch <= 1:
        return None
    return max(d for d in range(1, micro_batch // 2 + 1) if per_rank_batch % d == 0)


# ---------------------------------------------------------------------------------------------------------
# Collectives used by the stages (no-ops in a single process)


def _process_group():
    import torch.distributed as dist

    return dist if world() > 1 and dist.is_available() and dist.is_initialized() else None


def sync_max(values: list[float]) -> list[float]:
    """Element-wise max over ranks: every rank gets the same numbers (stop/save flags, clocks, timings)."""
    dist = _process_group()
    if dist is None:
        return list(values)
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank ([obj] in one process). A pickle round trip per
    call: for a rare event (a budget stop), not every step."""
    dist = _process_group()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    dist = _process_group()
    if dist is not None:
        dist.barrier()
