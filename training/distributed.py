"""Data-parallel training on PyTorch's own distributed engine (torch.distributed, launched by `torchrun`).

`torchrun` starts one process (rank) per slot and sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous
variables; `init()` joins the group (gloo on CPU: the training loop runs on the CPU) and returns a `Dist`,
and without torchrun (WORLD_SIZE unset or 1) a `Dist` of one rank whose collectives return their input, so the
same code runs single-process. Every rank trains one copy of the model on its own devices' shards; DDP averages
the gradients after each batch, so all ranks take the same optimizer steps and end with identical weights.
Decisions (validation loss, early stopping, number of batches) come from collectives and so agree everywhere;
logging, the progress bar, checkpoints and the export happen on rank 0 only.

Multi-machine (two machines, 2 ranks each; run the same command on both, any one of them as the endpoint):

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-id fleet-1 \\
        --rdzv-endpoint HOST0:29500 -m training train --data fleet.parquet/ --out bundle/ ...
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np

BACKENDS = ("auto", "gloo")  # NCCL reduces CUDA tensors only: this loop trains on the CPU


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    # -- collectives: no-ops with one rank ---------------------------------------------------------------

    def sum(self, values) -> np.ndarray:
        """Element-wise sum over ranks (float64)."""
        array = np.asarray(values, dtype=np.float64)
        if not self.enabled:
            return array
        import torch
        import torch.distributed as dist

        tensor = torch.from_numpy(array.copy())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.numpy()

    def min_int(self, value: int) -> int:
        """The smallest `value` over ranks (equal batch counts: DDP waits forever for a rank with fewer)."""
        if not self.enabled:
            return int(value)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def gather(self, array) -> list[np.ndarray]:
        """Every rank's array (same length on all), in rank order, on every rank."""
        array = np.asarray(array, dtype=np.float64)
        if not self.enabled:
            return [array]
        import torch
        import torch.distributed as dist

        parts = [torch.zeros(array.shape, dtype=torch.float64) for _ in range(self.world)]
        dist.all_gather(parts, torch.from_numpy(array.copy()))
        return [p.numpy() for p in parts]

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank (the early-stopping decision)."""
        if not self.enabled:
            return bool(flag)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([1 if flag else 0], dtype=torch.int64)
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def init(backend: str = "auto", timeout_s: float = 1800.0) -> Dist:
    """Join the process group that torchrun set up (WORLD_SIZE > 1), else a single rank.

    `auto` is gloo: the training loop computes on the CPU (NCCL reduces CUDA tensors only, so it would need the
    model on a GPU, which this loop does not do)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo" if backend == "auto" else backend, timeout=timedelta(seconds=timeout_s))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def session(backend: str = "auto"):
    """`with session() as d:` joins the group and always leaves it (a crashed rank must not leave others hanging
    longer than the timeout)."""
    d = init(backend)
    try:
        yield d
    finally:
        shutdown(d)


def assign(names: list[str], d: Dist) -> list[str]:
    """This rank's devices: the sorted names dealt round-robin (deterministic, the same on every machine)."""
    return sorted(names)[d.rank :: d.world]
