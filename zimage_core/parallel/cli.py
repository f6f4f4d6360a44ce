"""``zimage generate --parallel ulysses=2,cfg=2 ...``: the same command on ``ulysses·ring·cfg`` ranks.

Without torchrun the command spawns the ranks itself (``launch``; one GPU each when there are enough, else gloo on
CPU). Under ``torchrun --nproc-per-node N -m zimage_core.cli generate --parallel ...`` each process is one rank.
Every rank loads the pipeline and runs the request; rank 0 writes the images and prints. Bad input fails every rank
with the same field error (exit code 2); a rank that crashes ends the run (exit code 1).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from .config import ParallelConfig
from .launch import LaunchError, launch
from .mesh import init_distributed
from .runtime import ParallelContext

START_ENV = "ZIMAGE_PARALLEL_START"  # spawn (default) or fork
TIMEOUT_ENV = "ZIMAGE_PARALLEL_RUN_TIMEOUT"  # seconds for the whole spawned run (default 3600)


def _error(message: str) -> None:
    print(f"zimage: error: {message}", file=sys.stderr)


def generate_parallel(args) -> int:
    try:
        config = ParallelConfig.parse(args.parallel)
    except ValueError as e:
        _error(f"--parallel: {e}")
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: this process is one rank
        init_distributed()
        try:
            return rank_generate(dist.get_rank(), config, args)
        finally:
            dist.destroy_process_group()
    backend = "gloo" if str(args.device or "").startswith("cpu") else None  # None: NCCL when there are enough GPUs
    try:
        codes = launch(
            rank_generate,
            config.world_size,
            (config, args),
            backend=backend,
            timeout_s=float(os.environ.get(TIMEOUT_ENV, 3600)),
            start_method=os.environ.get(START_ENV, "spawn"),
        )
    except (LaunchError, TimeoutError) as e:
        _error(str(e))
        return 1
    return max(codes)


def rank_generate(rank: int, config: ParallelConfig, args) -> int:
    from .. import cli
    from ..errors import RequestError
    from ..weights import CheckpointError

    if dist.get_backend() == "nccl":
        args.device = f"cuda:{torch.cuda.current_device()}"
    elif args.device is None:
        args.device = "cpu"
    try:
        ctx = ParallelContext(config)
        pipe = cli._load(args)
        kwargs = cli.generate_kwargs(pipe, args)
        kwargs["progress"] = kwargs["progress"] and rank == 0
        result = ctx.generate(pipe, args.prompt, **kwargs)
    except (RequestError, CheckpointError, FileNotFoundError, ValueError) as e:
        if rank == 0:
            _error(str(e))
        return 2
    if rank == 0:
        cli.write_results(result, args)
        print(f"parallel: {config.describe()} on {config.world_size} ranks ({dist.get_backend()})")
    return 0
