"""LoRA adapters for the transformer, applied at run time and per request.

Formats read (safetensors only):

- diffusers / PEFT: ``[transformer.]layers.0.attention.to_q.lora_A.weight`` and ``.lora_B.weight`` (optionally a
  ``.alpha`` scalar; default alpha = rank, i.e. scale 1);
- kohya / ComfyUI: ``[diffusion_model.|lora_unet_]...lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` with
  ComfyUI module names (``attention.qkv`` fused, ``attention.out``, ``final_layer``, ``x_embedder``); a fused-qkv
  adapter is split into its q, k and v row blocks.

Adapters are never merged into the weights (FP8 layers included: the adapter runs as a bf16 side path next to the
e4m3 GEMM, on the dequantized activation; docs/fp8.md has the measurement against merge + re-quantize).
Each targeted ``nn.Linear`` gets a forward that adds
``Σ scale·(alpha/r)·B(A x)`` for the adapters active *in the calling thread*, so concurrent requests with different
LoRAs on one model never see each other's (and a model without adapters pays one dict lookup per Linear).

Phases (``lora[].transformer``): ``high`` is active while σ ≥ 0.5, ``low`` while σ < 0.5, ``both``
throughout; the pipeline's denoiser sets the current σ before each transformer call.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from .errors import RequestError
from .fp8 import FP8Linear

PHASES = ("high", "low", "both")
MAX_WEIGHT = (
    16.0  # |weight| of one adapter (the request API allows [-4, 4]); beyond it the output is numerically broken
)
# bound of one adapter's gain, |weight·alpha/r|·‖B‖·‖A‖ (Frobenius norms, an upper bound of ‖ΔW‖₂); real LoRAs are
# below ~100, and an alpha that makes it overflow the model's dtype would turn the output into NaN/inf
MAX_GAIN = 1e4
HIGH_NOISE_SIGMA = 0.5
_local = threading.local()


@dataclass
class LoraModule:
    down: torch.Tensor  # A: [r, in]
    up: torch.Tensor  # B: [out, r]
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.down.shape[0]

    @property
    def gain(self) -> float:
        """|alpha/r|·‖B‖_F·‖A‖_F in float64 (inf when it overflows): a bound of the adapter's effect per unit weight."""
        if not hasattr(self, "_gain"):
            up, down = (float(torch.linalg.matrix_norm(t.double())) for t in (self.up, self.down))
            self._gain = abs(self.scale) * up * down
        return self._gain


@dataclass
class LoraWeights:
    name: str
    modules: dict[str, LoraModule]  # our module name (e.g. "layers.0.attention.to_q") -> adapter


_SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
)
_PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model.", "lora_unet_")


def _module_name(key: str) -> tuple[str, str]:
    """(module name, part) of one LoRA tensor key; ComfyUI names become diffusers names. Kohya's flattened names
    (dots as underscores) are kept flat here and matched against the model's module names when applied."""
    match = next(((suffix, part) for suffix, part in _SUFFIXES if key.endswith(suffix)), None)
    if match is None:
        raise ValueError(f"not a LoRA tensor name: {key}")
    stem, part = key[: -len(match[0])], match[1]
    for prefix in _PREFIXES:
        if stem.startswith(prefix):
            stem = stem[len(prefix) :]
    sep = "." if "." in stem else "_"
    if stem.startswith(f"final_layer{sep}"):
        stem = f"all_final_layer{sep}2-1{sep}" + stem[len(f"final_layer{sep}") :]
    elif stem == "x_embedder":
        stem = f"all_x_embedder{sep}2-1"
    elif stem.endswith(f"{sep}attention{sep}out"):
        stem = stem[: -len("out")] + f"to_out{sep}0"
    return stem, part


def load_lora(path: str | Path, name: str | None = None) -> LoraWeights:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files must be .safetensors")
    return lora_from_state_dict(load_file(path), name or path.stem, source=str(path))


def lora_from_state_dict(raw: dict[str, torch.Tensor], name: str, source: str = "state dict") -> LoraWeights:
    """Adapters from LoRA tensors already in memory (the formats of :func:`load_lora`); ``source`` names errors."""
    path = source
    parts: dict[str, dict] = {}
    for key, t in raw.items():
        try:
            mod, part = _module_name(key)
        except ValueError:
            continue
        parts.setdefault(mod, {})[part] = t
    modules = {}
    for mod, p in parts.items():
        if "down" not in p or "up" not in p:
            raise ValueError(f"{path}: LoRA module {mod} lacks its {'up' if 'down' in p else 'down'} matrix")
        down, up = p["down"].float(), p["up"].float()
        alpha = float(p["alpha"]) if "alpha" in p else float(down.shape[0])
        if not (torch.isfinite(down).all() and torch.isfinite(up).all() and math.isfinite(alpha)):
            raise ValueError(f"{path}: LoRA module {mod} holds non-finite values (NaN/inf)")
        if mod.endswith(("attention.qkv", "attention_qkv")):  # fused qkv: up stacks the q, k, v row blocks
            stem = mod[: -len("qkv")]
            for proj, u in zip(("to_q", "to_k", "to_v"), up.chunk(3, dim=0)):
                modules[stem + proj] = LoraModule(down, u, alpha)
        else:
            modules[mod] = LoraModule(down, up, alpha)
    if not modules:
        raise ValueError(f"{path}: no LoRA tensors found")
    return LoraWeights(name, modules)


class LoraStore:
    """Resolves ``lora[].model`` identifiers to files: an explicit {id: path} map, else ``<folder>/<id>.safetensors``
    with characters other than letters, digits, ``.``, ``-`` and ``_`` replaced by ``_``."""

    def __init__(self, folder: str | Path | None = None, mapping: dict[str, str | Path] | None = None):
        self.folder = Path(folder) if folder else None
        self.mapping = dict(mapping or {})
        self._cache: dict[str, LoraWeights] = {}

    def path_for(self, model_id: str) -> Path | None:
        if model_id in self.mapping:
            return Path(self.mapping[model_id])
        if self.folder is not None:
            return self.folder / (re.sub(r"[^A-Za-z0-9._-]", "_", model_id) + ".safetensors")
        return None

    def __call__(self, model_id: str, field: str) -> LoraWeights:
        if model_id not in self._cache:
            path = self.path_for(model_id)
            if path is None or not path.exists():
                raise RequestError(field, f"unknown LoRA {model_id!r} (not in this server's LoRA store)")
            try:
                self._cache[model_id] = load_lora(path, model_id)
            except Exception as e:
                raise RequestError(field, f"LoRA {model_id!r} could not be loaded: {e}") from None
        return self._cache[model_id]


# ---- run-time application ---------------------------------------------------------------------------------------


def _lora_forward(module: nn.Linear | FP8Linear, x) -> torch.Tensor:
    if isinstance(module, FP8Linear):  # e4m3 base weights stay quantized: the adapter is a side path
        a = module.quantize_input(x)  # an Fp8Act from a fused producer passes through
        out = FP8Linear.forward(module, a)
        x = a.dequantize(out.dtype)  # the adapter reads the same (dequantized) input as the base GEMM
    else:
        out = F.linear(x, module.weight, module.bias)
    active = getattr(_local, "adapters", None)
    if not active:
        return out
    sigma = getattr(_local, "sigma", 1.0)
    for ada, weight, phase in active.get(id(module), ()):
        if phase == "high" and sigma < HIGH_NOISE_SIGMA or phase == "low" and sigma >= HIGH_NOISE_SIGMA:
            continue
        down, up = ada.down.to(x.device, x.dtype), ada.up.to(x.device, x.dtype)
        out = out + (weight * ada.scale) * F.linear(F.linear(x, down), up)
    return out


def set_sigma(sigma: float) -> None:
    """The noise level of the transformer call about to run in this thread (selects high/low adapters)."""
    _local.sigma = float(sigma)


@contextmanager
def apply_loras(model: nn.Module, loras: Sequence[tuple[LoraWeights, float, str]], field: str = "lora"):
    """Activate (LoRA, weight, phase) adapters on ``model`` for the calling thread only."""
    if not loras:
        yield
        return
    modules = dict(model.named_modules())
    flat = {n.replace(".", "_"): m for n, m in modules.items()}  # kohya's flattened names
    active: dict[int, list] = {}
    for i, (lw, weight, phase) in enumerate(loras):
        if phase not in PHASES:
            raise RequestError(f"{field}[{i}].transformer", f"must be one of {PHASES}, got {phase!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise RequestError(f"{field}[{i}].weight", f"must be a number in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")
        try:
            ok = math.isfinite(float(weight)) and abs(float(weight)) <= MAX_WEIGHT
        except OverflowError:
            ok = False
        if not ok:
            raise RequestError(f"{field}[{i}].weight", f"must be a finite number in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")
        worst = max((ada.gain for ada in lw.modules.values()), default=0.0) * abs(float(weight))
        if not worst <= MAX_GAIN:  # NaN/inf too
            raise RequestError(
                f"{field}[{i}].model",
                f"LoRA {lw.name!r} has an adapter gain of {worst:.3g} (|weight·alpha/rank|·|B|·|A|) at weight "
                f"{float(weight):g}; at most {MAX_GAIN:g} is accepted (is its alpha out of range?)",
            )
        for name, ada in lw.modules.items():
            mod = modules.get(name, flat.get(name))
            if not isinstance(mod, (nn.Linear, FP8Linear)):
                raise RequestError(
                    f"{field}[{i}].model",
                    f"LoRA {lw.name!r} targets {name!r}, which is not a "
                    "linear layer of this model (a LoRA for another architecture?)",
                )
            if ada.down.shape[1] != mod.in_features or ada.up.shape[0] != mod.out_features:
                raise RequestError(
                    f"{field}[{i}].model",
                    f"LoRA {lw.name!r}: {name} has shape "
                    f"{tuple(ada.up.shape)}x{tuple(ada.down.shape)}, the layer is "
                    f"[{mod.out_features}, {mod.in_features}]",
                )
            if not getattr(mod, "_zimage_lora", False):  # install the thread-aware forward once, permanently
                mod.forward = _lora_forward.__get__(mod)
                mod._zimage_lora = True
            active.setdefault(id(mod), []).append((ada, float(weight), phase))
    previous = getattr(_local, "adapters", None)
    _local.adapters = active
    try:
        yield
    finally:
        _local.adapters = previous


@torch.no_grad()
def fuse(model: nn.Module, lw: LoraWeights, factor: float, safe: bool = False) -> None:
    """Merge ``factor · (alpha/r) · B·A`` of every module of ``lw`` into ``model``'s weights (a negative factor
    undoes an earlier fuse). Unlike :func:`apply_loras` this changes the shared weights, for every thread: it is
    diffusers' ``fuse_lora``. ``safe``: refuse (changing nothing) if a merged weight would be non-finite."""
    modules = dict(model.named_modules())
    flat = {n.replace(".", "_"): m for n, m in modules.items()}
    merged = []
    for name, ada in lw.modules.items():
        mod = modules.get(name, flat.get(name))
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"LoRA {lw.name!r} targets {name!r}, which is not a linear layer of this model")
        w = mod.weight
        delta = (ada.up.double() @ ada.down.double()).to(w.device) * (float(factor) * ada.scale)
        new = w.double() + delta
        if safe and not torch.isfinite(new).all():
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {lw.name} seems to be broken (module {name})"
            )
        merged.append((w, new.to(w.dtype)))
    for w, new in merged:
        w.copy_(new)
