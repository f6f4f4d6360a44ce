"""FP8 (e4m3) W8A8 for the transformer: which linear layers are quantized, and the module that runs them.

A quantized layer (:class:`FP8Linear`) holds ``float8_e4m3fn`` weights ``[out, in]`` with one fp32 scale per output
channel; its input is quantized per token, dynamically. Inside a transformer block the producing ops emit e4m3 +
scales directly (``rms_norm_modulate_fp8`` before q/k/v and w1/w3, ``swiglu_fp8`` before w2; see
``TransformerBlock.forward``); the attention output is quantized by ``quantize_rows`` as ``to_out``'s input. The
GEMM is ``torch._scaled_mm`` where it runs, a Triton FP8 GEMM otherwise (``zimage_kernels/fp8.py``).

Layer groups (``GROUPS``): per stage (``layers``, ``noise_refiner``, ``context_refiner``) the q/k/v projections
(``qkv``), the attention output (``out``), the FFN input (``ffn_in``: w1, w3) and output (``ffn_out``: w2); plus
``embedders`` (x/caption/timestep embedders), ``adaln`` (every adaLN modulation) and ``final`` (the final linear).
The recipe ``fp8`` (:data:`RECIPES`) quantizes the stage groups and keeps embedders, adaLN and the final layer in
the activation dtype: measured by ``python -m zimage_bench fp8`` (docs/fp8.md).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from zimage_kernels import get_ops
from zimage_kernels.backend import validate_backend
from zimage_kernels.fp8 import E4M3, Fp8Act, dequantize_weight, quantize_weight

from .errors import RequestError

QUANTIZE_CHOICES = ("none", "fp8")
STAGES = ("layers", "noise_refiner", "context_refiner")
KINDS = {
    "qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
    "out": ("attention.to_out.0",),
    "ffn_in": ("feed_forward.w1", "feed_forward.w3"),
    "ffn_out": ("feed_forward.w2",),
}
GROUPS = tuple(f"{s}.{k}" for s in STAGES for k in KINDS) + ("embedders", "adaln", "final")
RECIPES = {"fp8": tuple(f"{s}.{k}" for s in STAGES for k in KINDS)}


def validate_quantize(value, field: str = "quantize") -> str:
    """``None``/"none" -> "none"; "fp8" -> "fp8"; anything else is a RequestError naming ``field``."""
    if value is None:
        return "none"
    if not isinstance(value, str) or value.strip().lower() not in QUANTIZE_CHOICES:
        shown = value[:40] if isinstance(value, str) else type(value).__name__
        raise RequestError(field, f"must be one of {QUANTIZE_CHOICES}, got {shown!r}")
    return value.strip().lower()


def group_of(name: str) -> str | None:
    """The group (see module docstring) of the linear layer called ``name`` in the model, or None."""
    m = re.fullmatch(r"(layers|noise_refiner|context_refiner)\.\d+\.(.+)", name)
    if m:
        if m.group(2) == "adaLN_modulation.0":
            return "adaln"
        return next((f"{m.group(1)}.{k}" for k, subs in KINDS.items() if m.group(2) in subs), None)
    if name.startswith(("all_x_embedder.", "cap_embedder.", "t_embedder.")):
        return "embedders"
    if name.startswith("all_final_layer."):
        return "adaln" if ".adaLN_modulation." in name else "final"
    return None


class FP8Linear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` in e4m3 (``weight``) times per-output-channel fp32 ``weight_scale``.

    Takes a tensor (quantized per token here, with the op switch's ``quantize_rows``) or an already quantized
    :class:`~zimage_kernels.fp8.Fp8Act` (from a fused producer); returns ``out_dtype`` (the activation dtype).
    """

    takes_fp8 = True  # producers may hand it an Fp8Act

    def __init__(self, in_features: int, out_features: int, bias: bool, out_dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=E4M3, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=out_dtype, device=device)) if bias else None
        self.out_dtype = out_dtype
        self.kernel_backend: str | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> FP8Linear:
        """Quantize ``lin`` (per output channel), or take ready ``codes`` = (e4m3 [out, in], fp32 scale [out])."""
        w = lin.weight.detach()
        mod = cls(lin.in_features, lin.out_features, lin.bias is not None, w.dtype, device=w.device)
        q, s = codes if codes is not None else quantize_weight(w)
        mod.weight, mod.weight_scale = q.to(w.device), s.float().reshape(-1).to(w.device)
        if lin.bias is not None:
            mod.bias = nn.Parameter(lin.bias.detach(), requires_grad=False)
        return mod

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_weight(self.weight, self.weight_scale, dtype or self.out_dtype)

    def _apply(self, fn, recurse=True):
        # ``model.to(dtype)`` would cast the e4m3 codes (a floating dtype) too: follow the cast for the activation
        # dtype, keep the codes e4m3 (exact: every e4m3 value is a bf16/fp16/fp32 value) and the scales fp32.
        super()._apply(fn, recurse)
        if self.weight.dtype != E4M3:
            self.out_dtype = self.weight.dtype
            self.weight = self.weight.to(E4M3)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = self.weight_scale.float()
        return self

    def quantize_input(self, x) -> Fp8Act:
        """``x`` quantized per token (an Fp8Act passes through)."""
        return x if isinstance(x, Fp8Act) else get_ops(self.kernel_backend, x.device).quantize_rows(x)

    def forward(self, x) -> torch.Tensor:
        a = self.quantize_input(x)
        ops = get_ops(self.kernel_backend, a.q.device)
        return ops.fp8_linear(a, self.weight, self.weight_scale, self.bias, self.out_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, e4m3"


def takes_fp8(*modules) -> bool:
    """Whether every module accepts an Fp8Act input (so a producer may emit one for all of them)."""
    return all(getattr(m, "takes_fp8", False) for m in modules)


def as_input(x, module: nn.Module):
    """``x`` as ``module`` takes it: an Fp8Act is dequantized for a module that is not FP8."""
    if isinstance(x, Fp8Act) and not takes_fp8(module):
        return x.dequantize(module.weight.dtype)
    return x


def quantize_model(model: nn.Module, quantize: str = "fp8", groups=None, codes: dict | None = None) -> nn.Module:
    """Replace the linear layers of ``groups`` (default: the recipe ``quantize``) by :class:`FP8Linear`, in place.

    ``codes``: {layer name: (e4m3 weight, fp32 per-channel scale)} for layers that arrive already quantized (an FP8
    checkpoint), used as they are instead of re-quantizing. Returns ``model``.
    """
    quantize = validate_quantize(quantize)
    if quantize == "none":
        return model
    chosen = set(RECIPES[quantize] if groups is None else groups)
    unknown = chosen - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown FP8 layer groups {sorted(unknown)}; known: {GROUPS}")
    codes = codes or {}
    backend = getattr(model, "kernel_backend", None)
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear or group_of(name) not in chosen:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = FP8Linear.from_linear(mod, codes.get(name))
        new.kernel_backend = backend
        setattr(parent, attr, new)
    model.fp8_groups = tuple(g for g in GROUPS if g in chosen)
    return model


def set_backend(model: nn.Module, backend: str | None) -> None:
    """Propagate a kernel backend to the model's FP8 layers (``ZImageTransformer.set_kernel_backend``)."""
    backend = validate_backend(backend) if backend else None
    for mod in model.modules():
        if isinstance(mod, FP8Linear):
            mod.kernel_backend = backend


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (the weight memory of the model)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


__all__ = [
    "FP8Linear",
    "GROUPS",
    "QUANTIZE_CHOICES",
    "RECIPES",
    "as_input",
    "group_of",
    "quantize_model",
    "takes_fp8",
    "validate_quantize",
    "weight_bytes",
]
