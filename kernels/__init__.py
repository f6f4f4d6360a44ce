"""Triton kernels for the Z-Image DiT, with one pure-torch reference per op (``kernels.reference``).

This top-level package is *ours*; Hugging Face publishes an unrelated package also imported as ``kernels``
(the hub-kernels library). ``tests/test_packaging.py`` guards that the one imported is this one.

Public API: the op switch (:func:`get_ops`, :data:`BACKENDS`) and the reference ops.
"""

from . import reference
from .backend import BACKENDS, ENV_VAR, TORCH_OPS, Ops, get_ops, resolve_backend

__all__ = ["BACKENDS", "ENV_VAR", "TORCH_OPS", "Ops", "get_ops", "reference", "resolve_backend"]
