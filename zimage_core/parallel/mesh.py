"""Process groups of a parallel run: ranks laid out as ``rank = cfg_index · sp + sp_rank``.

With ``ulysses=2,cfg=2`` (world 4): ranks 0, 1 share the positive half's sequence, ranks 2, 3 the negative half's;
the CFG groups are {0, 2} and {1, 3} (the same sequence shard of the two halves).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .config import ParallelConfig

DEFAULT_TIMEOUT_S = 300.0


def init_distributed(
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    backend: str | None = None,
    timeout_s: float | None = None,
) -> None:
    """``init_process_group`` with our defaults: NCCL on CUDA, gloo on CPU; from torchrun's env when args are None.

    ``timeout_s`` bounds every collective (a peer that died or hangs fails the others instead of blocking them);
    default ``$ZIMAGE_PARALLEL_TIMEOUT`` or 300 s.
    """
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if timeout_s is None:
        timeout_s = float(os.environ.get("ZIMAGE_PARALLEL_TIMEOUT", DEFAULT_TIMEOUT_S))
    kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if init_method is not None:
        kwargs.update(init_method=init_method, rank=rank, world_size=world_size)
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank or 0))
        torch.cuda.set_device(local % torch.cuda.device_count())
    dist.init_process_group(**kwargs)


class Mesh:
    """The sequence-parallel and CFG groups of this rank (every rank must build the mesh, in the same order)."""

    def __init__(self, config: ParallelConfig):
        if not dist.is_initialized():
            raise RuntimeError("parallel run: torch.distributed is not initialised (use zimage_core.parallel.launch)")
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != config.world_size:
            raise ValueError(
                f"parallel config {config.describe()} needs {config.world_size} processes, the world has {world}"
            )
        self.config = config
        self.rank, self.world_size = rank, world
        sp, cfg = config.sp, config.cfg
        self.cfg_index, self.sp_rank = divmod(rank, sp)
        self.sp_group = self.cfg_group = None
        # new_group is collective over the whole world: every rank creates every group, in the same order.
        for c in range(cfg):
            group = dist.new_group([c * sp + s for s in range(sp)]) if sp > 1 else None
            if c == self.cfg_index:
                self.sp_group = group
        for s in range(sp):
            group = dist.new_group([c * sp + s for c in range(cfg)]) if cfg > 1 else None
            if s == self.sp_rank:
                self.cfg_group = group
        self.world_group = dist.group.WORLD

    @property
    def sp(self) -> int:
        return self.config.sp

    @property
    def cfg(self) -> int:
        return self.config.cfg

    def device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
