"""The Triton implementation of the op switch (filled in by the Triton kernels; see kernels/README)."""

from __future__ import annotations

from .backend import TORCH_OPS

# Until a Triton kernel exists for an op, the Triton backend runs that op's torch reference.
TRITON_OPS = TORCH_OPS.__class__(**{**TORCH_OPS.__dict__, "name": "triton"})
