"""Start the ranks of a parallel run: ``launch(fn, world_size)`` spawns them here (no torchrun needed), or
``torchrun --nproc-per-node N`` starts them and :func:`init_distributed` reads its environment.

``launch`` is bounded: when a rank raises or dies, the others are terminated and the error is raised here
(:class:`LaunchError`, naming the rank); past ``timeout_s`` every rank is killed (:class:`TimeoutError`).
Each rank runs ``OMP_NUM_THREADS`` = ``threads`` (default 1) intra-op threads.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .mesh import init_distributed


class LaunchError(RuntimeError):
    """A rank of a launched run failed; ``rank`` is the first failing rank, the message holds its error."""

    def __init__(self, rank: int | None, message: str):
        self.rank = rank
        super().__init__(message)


def _worker(rank, fn, world_size, init_file, out_dir, args, backend, collective_timeout_s, threads):
    torch.set_num_threads(threads)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    init_distributed(rank, world_size, f"file://{init_file}", backend, collective_timeout_s)
    try:
        result = fn(rank, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def launch(
    fn,
    world_size: int,
    args: tuple = (),
    *,
    timeout_s: float = 600.0,
    backend: str | None = None,
    collective_timeout_s: float | None = None,
    threads: int = 1,
    start_method: str = "spawn",
) -> list:
    """Run ``fn(rank, *args)`` on ``world_size`` new processes (a process group is initialised in each);
    returns the ranks' return values in rank order. ``fn`` must be importable (a module-level function).

    ``start_method="fork"`` skips each rank's imports (seconds per rank); only from a process that has not started
    CUDA or intra-op thread pools (one torch thread), as the CPU tests do."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"
    with tempfile.TemporaryDirectory(prefix="zimage-parallel-") as tmp:
        init_file = Path(tmp) / "store"
        saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        try:
            ctx = mp.start_processes(
                _worker,
                args=(fn, world_size, str(init_file), tmp, args, backend, collective_timeout_s, threads),
                nprocs=world_size,
                join=False,
                start_method=start_method,
            )
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=0.2):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"parallel run of {world_size} ranks exceeded {timeout_s:.0f} s; killed")
        except mp.ProcessRaisedException as e:
            raise LaunchError(e.error_index, f"rank {e.error_index} failed:\n{e}") from None
        except mp.ProcessExitedException as e:
            raise LaunchError(e.error_index, f"rank {e.error_index} exited with code {e.exit_code}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
