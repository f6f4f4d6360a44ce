"""The one place where the Gluon API of the installed Triton is resolved (the FA3 kernel imports Gluon from here).

Tested on triton 3.8 (the lock) and 3.9 (the current set), both compiled for sm_90a by ``scripts/aot_compile.py``.
Differences between them that the FA3 kernel meets:

- TMA copies: 3.8 has ``tma.async_load`` / ``tma.async_store`` and keeps ``async_copy_global_to_shared`` /
  ``async_copy_shared_to_global`` as aliases; 3.9 keeps the old names only as functions that raise
  ("has been removed"). ``tma_load`` / ``tma_store`` are the new builtins where they exist, else the old names
  (older Gluon); a Gluon kernel may call a builtin through any global name.

Everything else the kernel uses (``gl.warp_specialize([(fn, args), ...], warps, regs)``, ``NVMMADistributedLayout``,
``mbarrier``, ``warpgroup_mma``/``_wait``, host ``TensorDescriptor``) has the same signature in both.
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


def _pick(module, *names):
    for name in names:
        fn = getattr(module, name, None)
        if fn is not None:
            return name, fn
    raise ImportError(f"triton {triton.__version__}: Gluon's {module.__name__} has none of {names}")


TMA_LOAD_NAME, tma_load = _pick(tma, "async_load", "async_copy_global_to_shared")
TMA_STORE_NAME, tma_store = _pick(tma, "async_store", "async_copy_shared_to_global")

__all__ = [
    "TMA_LOAD_NAME",
    "TMA_STORE_NAME",
    "TensorDescriptor",
    "fence_async_shared",
    "gl",
    "gluon",
    "mbarrier",
    "tma",
    "tma_load",
    "tma_store",
    "warpgroup_mma",
    "warpgroup_mma_wait",
]
