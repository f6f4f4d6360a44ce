"""diffusers' pipeline LoRA API (``ZImageLoraLoaderMixin``) on our run-time, per-thread LoRA application.

diffusers reads and converts the files (``lora_state_dict``: PEFT, kohya, ComfyUI..., adapter metadata) and writes
them (``save_lora_weights``): those methods are inherited unchanged. What differs is where an adapter lives: diffusers
injects PEFT layers into the transformer; here an adapter is a :class:`zimage_core.lora.LoraWeights` kept in the
transformer's :class:`AdapterSet`, and each pipeline call applies the active ones through
:func:`zimage_core.lora.apply_loras`, the same code the service uses (``lora`` in a request): for the calling thread
only and for that call only, never merged into the shared weights. The adapter set is read once at the start of a
call, so ``set_adapters`` in another thread does not change a call already running.

``fuse_lora`` does merge (that is what it is for): ``W += lora_scale · w · (alpha/r) · B·A`` into the weights, undone
exactly by ``unfuse_lora``; while adapters are fused, no adapter is applied at run time (as with PEFT's merged
layers). Not here: LoKr and DoRA files, per-block weight dicts, adapters of the text encoder (Z-Image has none).
PEFT adapters added to the transformer itself (``transformer.add_adapter``, as diffusers' own LoRA tests do) are
PEFT's layers, global as in diffusers; the pipeline methods hand them to diffusers' own implementation.
"""

from __future__ import annotations

import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

from .. import lora as lora_mod
from ..errors import RequestError

# diffusers logs "No LoRA keys associated to ..." on this logger (``diffusers.loaders.peft``); we log the same there.
_peft_logger = logging.getLogger("diffusers.loaders.peft")
_base_logger = logging.getLogger("diffusers.loaders.lora_base")
PREFIX = "transformer"


@dataclass
class AdapterSet:
    """The adapters loaded into one transformer (kept on it, so they travel with it as PEFT's do)."""

    adapters: dict[str, lora_mod.LoraWeights] = field(default_factory=dict)
    metadata: dict[str, dict] = field(default_factory=dict)
    active: dict[str, float] = field(default_factory=dict)  # name -> weight (set_adapters)
    enabled: bool = True
    fused: dict[str, float] = field(default_factory=dict)  # name -> the factor merged into the weights

    def run_list(self, scale: float = 1.0) -> list[tuple[lora_mod.LoraWeights, float, str]]:
        """(LoRA, weight, phase) to apply at run time: none while disabled or while any adapter is fused."""
        if not self.enabled or self.fused:
            return []
        return [(self.adapters[n], w * scale, "both") for n, w in self.active.items() if n in self.adapters]


def adapter_set(transformer) -> AdapterSet:
    s = transformer.__dict__.get("_zimage_adapters")
    if s is None:
        s = AdapterSet()
        transformer.__dict__["_zimage_adapters"] = s
    return s


def _peft_names(transformer) -> list[str]:
    """Names of PEFT adapters added to the transformer itself (``transformer.add_adapter``), if any."""
    return list(getattr(transformer, "peft_config", None) or {})


def _alpha_for(module: str, metadata: dict | None, rank: int) -> float:
    """The LoRA alpha of ``module`` as PEFT's LoraConfig from the file's metadata gives it (``alpha_pattern`` first,
    then ``lora_alpha``); without metadata alpha = rank (scale 1), as diffusers infers it."""
    if not metadata:
        return float(rank)
    for pattern, alpha in (metadata.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module) or re.match(pattern, module):
            return float(alpha)
    return float(metadata.get("lora_alpha", rank))


class LoraPipelineMixin:
    """The pipeline-level LoRA methods of diffusers' ``LoraBaseMixin`` / ``ZImageLoraLoaderMixin``, same signatures,
    same errors and log lines; mixed in before the diffusers pipeline class."""

    # ---- loading ----------------------------------------------------------------------------------------------
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, hotswap=False, **kwargs):
        """Load a LoRA (any format diffusers' ``lora_state_dict`` reads, with its adapter metadata) into the
        transformer's adapter set. ``hotswap=True`` replaces the weights of the existing adapter ``adapter_name``."""
        kwargs.pop("low_cpu_mem_usage", None)
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
        kwargs["return_lora_metadata"] = True
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        if not all("lora" in k or "lokr" in k for k in state_dict):
            raise ValueError("Invalid adapter checkpoint. We currently support LoRA and LoKr.")
        self.load_lora_into_transformer(
            state_dict, transformer=self.transformer, adapter_name=adapter_name, hotswap=hotswap, metadata=metadata
        )

    @classmethod
    def load_lora_into_transformer(
        cls,
        state_dict,
        transformer,
        adapter_name=None,
        _pipeline=None,
        low_cpu_mem_usage=False,
        hotswap=False,
        metadata=None,
    ):
        """diffusers' ``load_lora_into_transformer`` → ``load_lora_adapter`` (prefix ``transformer``), into our
        adapter set."""
        _base_logger.info(f"Loading {PREFIX}.")
        state_dict = {k.removeprefix(f"{PREFIX}."): v for k, v in state_dict.items() if k.startswith(f"{PREFIX}.")}
        if metadata is not None:
            metadata = {k.removeprefix(f"{PREFIX}."): v for k, v in metadata.items() if k.startswith(f"{PREFIX}.")}
        if not state_dict:
            name = type(transformer).__name__
            _peft_logger.warning(
                f"No LoRA keys associated to {name} found with the prefix={PREFIX!r}. This is safe to ignore if LoRA "
                f"state dict didn't originally have any {name} related params. You can also try specifying "
                "`prefix=None` to resolve the warning. Otherwise, open an issue if you think it's unexpected: "
                "https://github.com/huggingface/diffusers/issues/new"
            )
            return
        adapters = adapter_set(transformer)
        if adapter_name in _peft_names(transformer) and not hotswap:
            raise ValueError(
                f"Adapter name {adapter_name} already in use in the model - please select a new adapter name."
            )
        if adapter_name in adapters.adapters and not hotswap:
            raise ValueError(
                f"Adapter name {adapter_name} already in use in the model - please select a new adapter name."
            )
        if adapter_name not in adapters.adapters and hotswap:
            raise ValueError(
                f"Trying to hotswap LoRA adapter '{adapter_name}' but there is no existing adapter by that name. "
                "Please choose an existing adapter name or set `hotswap=False` to prevent hotswapping."
            )
        if any(".lokr_" in k for k in state_dict):
            raise NotImplementedError("LoKr adapters are not supported by zimage_core (LoRA only)")
        if any("lora_magnitude_vector" in k for k in state_dict) or (metadata or {}).get("use_dora"):
            raise NotImplementedError("DoRA adapters are not supported by zimage_core (LoRA only)")
        if metadata and metadata.get("use_rslora"):
            raise NotImplementedError("rsLoRA adapters (use_rslora) are not supported by zimage_core")
        if adapter_name is None:
            adapter_name = f"default_{len(adapters.adapters)}"
        weights = lora_mod.lora_from_state_dict(state_dict, adapter_name, source=f"LoRA {adapter_name!r}")
        if metadata:
            for module_name, m in weights.modules.items():
                m.alpha = _alpha_for(module_name, metadata, m.down.shape[0])
        # checks every target is a linear layer of this transformer, with matching shapes
        with lora_mod.apply_loras(transformer, [(weights, 1.0, "both")], field="lora"):
            pass
        if hotswap and adapter_name in adapters.fused:
            raise ValueError(f"Cannot hotswap adapter '{adapter_name}' while it is fused; call unfuse_lora() first")
        adapters.adapters[adapter_name] = weights
        adapters.metadata[adapter_name] = dict(metadata or {})
        if not hotswap:  # the newly loaded adapter becomes the active one, as PEFT's injection makes it
            adapters.active = {adapter_name: 1.0}

    def enable_lora_hotswap(self, **kwargs) -> None:
        """Accepted for compatibility: hotswapping here needs no preparation (ranks and alphas may differ)."""
        if kwargs.get("check_compiled") not in (None, "error", "warn", "ignore"):
            raise ValueError(
                f"check_compiled should be one of 'error', 'warn', or 'ignore', got '{kwargs['check_compiled']}' "
                "instead."
            )

    # ---- which adapters are active ----------------------------------------------------------------------------
    def set_adapters(self, adapter_names, adapter_weights=None):
        if isinstance(adapter_weights, dict):
            invalid = sorted(set(adapter_weights) - set(self._lora_loadable_modules))
            if invalid:
                _base_logger.warning(
                    f"The following components in `adapter_weights` are not part of the pipeline: {invalid}. "
                    f"Available components that are LoRA-compatible: {self._lora_loadable_modules}. So, weights "
                    "belonging to the invalid components will be removed and ignored."
                )
                adapter_weights = {k: v for k, v in adapter_weights.items() if k not in invalid}
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if len(names) != len(weights):
            raise ValueError(
                f"Length of adapter names {len(names)} is not equal to the length of the weights {len(weights)}"
            )
        adapters = adapter_set(self.transformer)
        peft = set(_peft_names(self.transformer))
        present = set(adapters.adapters) | peft
        missing = set(names) - present
        if missing:
            raise ValueError(f"Adapter name(s) {missing} not in the list of present adapters: {present}.")
        if peft:  # PEFT adapters added with transformer.add_adapter: diffusers' own method handles them
            if not set(names) <= peft:
                raise ValueError(
                    f"set_adapters({names}) mixes adapters loaded with load_lora_weights ({sorted(adapters.adapters)})"
                    f" and PEFT adapters added with transformer.add_adapter ({sorted(peft)}): use one kind at a time"
                )
            return super().set_adapters(adapter_names, adapter_weights)
        active = {}
        for i, (n, w) in enumerate(zip(names, weights)):
            if isinstance(w, dict):
                w = w.get(PREFIX)
                if isinstance(w, dict):
                    raise ValueError(f"adapter_weights[{i}]: per-block LoRA weights are not supported in Z-Image")
            w = 1.0 if w is None else w
            if (
                isinstance(w, bool)
                or not isinstance(w, (int, float))
                or not math.isfinite(float(w))
                or abs(float(w)) > lora_mod.MAX_WEIGHT
            ):
                raise RequestError(
                    f"adapter_weights[{i}]",
                    f"must be a finite number in [-{lora_mod.MAX_WEIGHT:g}, {lora_mod.MAX_WEIGHT:g}], got {w!r}",
                )
            active[n] = float(w)
        adapters.active = active

    def get_active_adapters(self) -> list[str]:
        adapters = adapter_set(self.transformer)
        if not adapters.adapters and _peft_names(self.transformer):
            return super().get_active_adapters()
        return list(adapters.active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        names = [*adapter_set(self.transformer).adapters, *_peft_names(self.transformer)]
        return {PREFIX: names} if names else {}

    def disable_lora(self):
        adapter_set(self.transformer).enabled = False
        if _peft_names(self.transformer):
            super().disable_lora()

    def enable_lora(self):
        adapter_set(self.transformer).enabled = True
        if _peft_names(self.transformer):
            super().enable_lora()

    def delete_adapters(self, adapter_names):
        adapters = adapter_set(self.transformer)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        peft = [n for n in names if n in _peft_names(self.transformer)]
        if peft:
            super().delete_adapters(peft)
        for n in names:
            if n in adapters.fused:
                raise ValueError(f"Adapter '{n}' is fused into the weights: call unfuse_lora() before deleting it")
            adapters.adapters.pop(n, None)
            adapters.metadata.pop(n, None)
            adapters.active.pop(n, None)

    def unload_lora_weights(self):
        """Remove every adapter. Fused weights stay fused (as in diffusers, where unloading keeps the base layers)."""
        adapters = adapter_set(self.transformer)
        adapters.adapters, adapters.metadata, adapters.active, adapters.fused = {}, {}, {}, {}
        if _peft_names(self.transformer):
            super().unload_lora_weights()
        self._merged_adapters = set()

    def set_lora_device(self, adapter_names, device) -> None:
        adapters = adapter_set(self.transformer)
        peft = [n for n in adapter_names if n in _peft_names(self.transformer)]
        if peft:
            super().set_lora_device(peft, device)
        for n in adapter_names:
            if n in peft:
                continue
            if n not in adapters.adapters:
                raise ValueError(
                    f"Adapter name(s) {{'{n}'}} not in the list of present adapters: {set(adapters.adapters)}."
                )
            for m in adapters.adapters[n].modules.values():
                m.down, m.up = m.down.to(device), m.up.to(device)

    # ---- fusing: the one operation that writes into the weights -----------------------------------------------
    def fuse_lora(self, components=("transformer",), lora_scale=1.0, safe_fusing=False, adapter_names=None, **kw):
        components = list(components)
        if not components:
            raise ValueError("`components` cannot be an empty list.")
        for c in components:
            if c not in self._lora_loadable_modules:
                raise ValueError(f"{c} is not found in self._lora_loadable_modules={self._lora_loadable_modules}.")
        adapters = adapter_set(self.transformer)
        peft = set(_peft_names(self.transformer))
        names = list(adapters.active) if adapter_names is None else list(adapter_names)
        present = set(adapters.adapters) | peft
        if set(names) - present:
            raise ValueError(f"Adapter name(s) {set(names) - present} not in the list of present adapters: {present}.")
        peft_merged = set()
        if peft and (adapter_names is None or set(names) & peft):
            super().fuse_lora(
                components=components,
                lora_scale=lora_scale,
                safe_fusing=safe_fusing,
                adapter_names=None if adapter_names is None else [n for n in names if n in peft],
            )
            peft_merged = set(self._merged_adapters)
        for n in [n for n in names if n not in peft]:
            if n in adapters.fused:
                continue
            factor = float(lora_scale) * adapters.active.get(n, 1.0)
            lora_mod.fuse(self.transformer, adapters.adapters[n], factor, safe=safe_fusing)
            adapters.fused[n] = factor
        self._merged_adapters = peft_merged | set(adapters.fused)

    def unfuse_lora(self, components=("transformer",), **kwargs):
        adapters = adapter_set(self.transformer)
        for n, factor in list(adapters.fused.items()):
            lora_mod.fuse(self.transformer, adapters.adapters[n], -factor)
            del adapters.fused[n]
        self._merged_adapters = set()
        if _peft_names(self.transformer):
            super().unfuse_lora(components=list(components))

    # ---- one call ---------------------------------------------------------------------------------------------
    def _lora_list(self, scale: float = 1.0):
        """The adapters of one call, read once at its start (``joint_attention_kwargs={"scale": s}`` scales them)."""
        return adapter_set(self.transformer).run_list(scale)

    @contextmanager
    def _peft_scale(self, scale: float):
        """``joint_attention_kwargs={"scale": s}`` for PEFT adapters added with ``transformer.add_adapter`` (diffusers
        scales them around the transformer's ``forward``; our pipelines call the model below it)."""
        if scale == 1.0 or not _peft_names(self.transformer):
            yield
            return
        from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

        scale_lora_layers(self.transformer, scale)
        try:
            yield
        finally:
            unscale_lora_layers(self.transformer, scale)


def lora_scale_of(joint_attention_kwargs) -> float:
    """``joint_attention_kwargs["scale"]`` (default 1.0), checked: a finite number."""
    scale = (joint_attention_kwargs or {}).get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(float(scale)):
        raise RequestError("joint_attention_kwargs.scale", f"must be a finite number, got {scale!r}")
    return float(scale)


__all__ = ["AdapterSet", "LoraPipelineMixin", "adapter_set", "lora_scale_of"]
