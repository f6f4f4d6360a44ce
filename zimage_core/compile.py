"""``ZImage.optimize()``: regional ``torch.compile`` of the transformer's repeated blocks, our kernels as custom ops.

What is compiled: every ``TransformerBlock`` (the 30 main layers, the 2 noise-refiner and the 2 context-refiner
blocks), each with ``nn.Module.compile`` (diffusers' ``compile_repeated_blocks`` does the same). The blocks share
one code object, so Dynamo traces it once per input signature and every layer reuses the graph; the glue around
them (patchify, RoPE lookup, the hook chain) stays eager, so step caches, ControlNet hints and sequence parallelism
(the hooks around the main layers) work unchanged. Inside a compiled block our Triton kernels are called through
their ``torch.library`` custom ops (``zimage_kernels._triton.use_custom_op``), which Inductor treats as opaque; the
matmuls,
the adaLN projections and whatever torch ops remain are Inductor's to fuse.

Shapes: ``dynamic=False``: one graph per (batch, tokens) shape, so a new resolution or caption bucket compiles
again (tens of seconds on a GPU for the block); ``torch._dynamo.config.recompile_limit`` is raised so the shapes of a
server's traffic do not fall back to eager silently.

On by default on CUDA for the command line (``zimage generate``; ``--no-compile`` turns it off) and in
``ZImage.optimize()``; ``ZIMAGE_COMPILE=0`` turns the default off everywhere. ``python -m zimage_bench ablate``
measures it
against eager in one run.
"""

from __future__ import annotations

import os

import torch

ENV = "ZIMAGE_COMPILE"
RECOMPILE_LIMIT = 64


def default_enabled(device: torch.device) -> bool:
    """Compile by default on CUDA unless ``ZIMAGE_COMPILE=0``."""
    if os.environ.get(ENV, "").strip() in ("0", "false", "no", "off"):
        return False
    return torch.device(device).type == "cuda"


def repeated_blocks(transformer) -> list[torch.nn.Module]:
    return [*transformer.context_refiner, *transformer.noise_refiner, *transformer.layers]


def compile_blocks(transformer, *, mode: str | None = None, fullgraph: bool = False, backend: str = "inductor") -> int:
    """Compile every repeated block of ``transformer`` in place; returns how many. Idempotent. ``backend="eager"``
    traces with Dynamo and runs the captured graph without code generation (tests: graph breaks, guards)."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    blocks = repeated_blocks(transformer)
    for block in blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(backend=backend, mode=mode, fullgraph=fullgraph, dynamic=False)
    return len(blocks)


def uncompile_blocks(transformer) -> None:
    """Back to eager (``nn.Module.compile`` keeps the original forward; this drops the compiled wrapper)."""
    for block in repeated_blocks(transformer):
        block._compiled_call_impl = None


def is_compiled(transformer) -> bool:
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in repeated_blocks(transformer))
