"""Triton kernels for the Z-Image DiT, with one pure-torch reference per op (``zimage_kernels.reference``).

Imported as ``zimage_kernels``: the name ``kernels`` belongs to Hugging Face's hub-kernels library (a dependency
of current transformers). ``tests/test_packaging.py`` guards that the installed wheel keeps both apart.

Public API: the op switch (:func:`get_ops`, :data:`BACKENDS`) and the reference ops.
"""

from . import reference
from .backend import BACKENDS, ENV_VAR, TORCH_OPS, Ops, get_ops, resolve_backend

__all__ = ["BACKENDS", "ENV_VAR", "TORCH_OPS", "Ops", "get_ops", "reference", "resolve_backend"]
