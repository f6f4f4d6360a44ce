"""Past one GPU: sequence parallelism (Ulysses all-to-all, ring) and CFG parallelism on ``torch.distributed``.

NCCL on GPUs, gloo on CPU; no transport of our own. Parts:

- ``config.py``    :class:`ParallelConfig` (``ulysses=2,cfg=2``) and its parser.
- ``mesh.py``      process groups (``rank = cfg_index · sp + sp_rank``) and :func:`init_distributed`.
- ``attention.py`` Ulysses attention (all_to_all_single, uneven head splits or zero-head padding) and ring
                   attention (batch_isend_irecv, log-sum-exp merge).
- ``hook.py``      :class:`SequenceParallelHook`: the outermost StackHook; shards the unified sequence, swaps the
                   attention op, gathers after the main layers.
- ``runtime.py``   :class:`ParallelContext`: the pipeline's forward (CFG halves on two ranks, one all_gather per
                   step), the step cache's metric reduction, errors that fail every rank together.
- ``launch.py``    :func:`launch`: spawn N ranks here, bounded in time; or use ``torchrun``.
- the command ``zimage generate --parallel ulysses=2,cfg=2`` is part of the CLI (``zimage_core/cli.py``).
"""

from .attention import RingAttention, UlyssesAttention, head_splits
from .config import ParallelConfig
from .hook import SequenceParallelHook
from .launch import LaunchError, launch
from .mesh import Mesh, init_distributed
from .runtime import ParallelContext, ParallelError

__all__ = [
    "LaunchError",
    "Mesh",
    "ParallelConfig",
    "ParallelContext",
    "ParallelError",
    "RingAttention",
    "SequenceParallelHook",
    "UlyssesAttention",
    "head_splits",
    "init_distributed",
    "launch",
]
