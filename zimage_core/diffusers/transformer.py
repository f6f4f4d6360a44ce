"""``ZImageTransformer2DModel``: our transformer behind diffusers' model class.

Same ``register_to_config`` names, same state-dict keys, same ``forward`` signature and return type as diffusers
0.42.1's ``ZImageTransformer2DModel``, so ``from_pretrained`` / ``save_pretrained`` / ``to`` / ``from_config`` and
diffusers' pipelines work unchanged. Underneath it is :class:`zimage_core.model.ZImageTransformer` (our fused ops
through the kernel switch, the caption branch computed once per request by our pipelines).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.peft_utils import apply_lora_scale

from ..config import ZImageConfig
from ..hooks import StackHook
from ..model import ZImageTransformer


class ModelConfig(FrozenDict):
    """diffusers' frozen config dict that also answers :class:`ZImageConfig`'s fields and derived values
    (``head_dim``, ``out_channels``, ``to_dict()``...) for code written against our transformer."""

    def __getattr__(self, name):
        zconfig = self.__dict__.get("_zconfig")
        if name.startswith("__") or zconfig is None:
            raise AttributeError(name)
        return getattr(zconfig, name)


def config_property() -> property:
    """``config`` for a module of ours behind a diffusers model class: our module's ``__init__`` assigns its config
    dataclass (kept aside), reading gives diffusers' registered dict as a :class:`ModelConfig` that also answers
    the dataclass's fields."""

    def get(self) -> ModelConfig:
        cfg = ModelConfig(self.__dict__.get("_internal_dict", {}))
        cfg.__dict__["_zconfig"] = self.__dict__.get("_zconfig")
        return cfg

    def put(self, value) -> None:
        self.__dict__["_zconfig"] = value

    return property(get, put)


def sharing_weights(cls, module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]):
    """``cls`` built from the registered config of the live diffusers ``module``, holding ``state_dict``'s tensors
    (assigned, not copied), in eval mode."""
    config = {k: v for k, v in module.config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls(**config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


class ControlNetSamples(StackHook):
    """Adds ``samples[i]`` to the unified sequence after main layer ``i`` (diffusers' ``controlnet_block_samples``)."""

    def __init__(self, samples: Mapping[int, torch.Tensor]):
        self.samples = samples

    def after_layer(self, index, hidden, inp):
        hint = self.samples.get(index)
        return hidden if hint is None else hidden + hint


class ZImageTransformer2DModel(ZImageTransformer, ModelMixin, ConfigMixin, PeftAdapterMixin):
    """diffusers' ``ZImageTransformer2DModel`` (text-to-image mode), computed by our transformer.

    Differences: the Omni inputs (``siglip_feat_dim``, ``siglip_feats``, ``image_noise_mask``) are refused with an
    error; gradient checkpointing is not supported (this class is for inference).
    """

    _supports_gradient_checkpointing = False
    _no_split_modules = ["TransformerBlock"]
    _repeated_blocks = ["TransformerBlock"]
    _skip_layerwise_casting_patterns = ["t_embedder", "cap_embedder"]
    # ModelMixin's loader, not ZImageTransformer's (which returns the plain module)
    from_pretrained = ModelMixin.__dict__["from_pretrained"]

    @register_to_config
    def __init__(
        self,
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=3840,
        n_layers=30,
        n_refiner_layers=2,
        n_heads=30,
        n_kv_heads=30,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=2560,
        siglip_feat_dim=None,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[32, 48, 48],  # noqa: B006 (diffusers' default, kept for an identical signature)
        axes_lens=[1024, 512, 512],  # noqa: B006
    ) -> None:
        if siglip_feat_dim is not None:
            raise NotImplementedError(
                "siglip_feat_dim is set: this is the Z-Image Omni transformer, which zimage_core does not implement "
                "(use diffusers' own ZImageTransformer2DModel for it)"
            )
        cfg = ZImageConfig(
            all_patch_size=tuple(all_patch_size),
            all_f_patch_size=tuple(all_f_patch_size),
            in_channels=in_channels,
            dim=dim,
            n_layers=n_layers,
            n_refiner_layers=n_refiner_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            norm_eps=norm_eps,
            qk_norm=qk_norm,
            cap_feat_dim=cap_feat_dim,
            rope_theta=rope_theta,
            t_scale=t_scale,
            axes_dims=tuple(axes_dims),
            axes_lens=tuple(axes_lens),
        )
        ZImageTransformer.__init__(self, cfg)
        self._gradient_checkpointing_func = None
        # the plain attributes diffusers' class sets (its pipelines read ``transformer.in_channels``)
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.all_patch_size = all_patch_size
        self.all_f_patch_size = all_f_patch_size
        self.dim = dim
        self.n_heads = n_heads
        self.rope_theta = rope_theta
        self.t_scale = t_scale
        self.gradient_checkpointing = False
        self.axes_dims = axes_dims
        self.axes_lens = axes_lens

    # ``ZImageTransformer`` keeps its dataclass in ``self.config``; diffusers' ``config`` is the registered dict.
    config = config_property()

    @classmethod
    def from_diffusers(cls, module: torch.nn.Module, kernel_backend: str | None = None) -> ZImageTransformer2DModel:
        """This class with the weights of a live diffusers ``ZImageTransformer2DModel`` (tensors shared)."""
        model = sharing_weights(cls, module, module.state_dict())
        if kernel_backend:
            model.set_kernel_backend(kernel_backend)
        return model

    def set_attention_backend(self, backend: str) -> None:
        """diffusers' check of ``backend`` (same errors), then a warning: this transformer's attention is our op
        (Triton on CUDA, torch SDPA elsewhere), chosen with :meth:`set_kernel_backend`, not diffusers' backends."""
        super().set_attention_backend(backend)
        warnings.warn(
            f"set_attention_backend({backend!r}) has no effect on zimage_core's ZImageTransformer2DModel: its "
            "attention is zimage_core's own kernel (Triton on CUDA); choose it with "
            "set_kernel_backend('triton'|'torch'|'auto')",
            stacklevel=2,
        )

    @apply_lora_scale("joint_attention_kwargs")
    def forward(
        self,
        x: list[torch.Tensor],
        t,
        cap_feats: list[torch.Tensor],
        return_dict: bool = True,
        controlnet_block_samples: dict[int, torch.Tensor] | None = None,
        siglip_feats: list[list[torch.Tensor]] | None = None,
        image_noise_mask: list[list[int]] | None = None,
        patch_size: int = 2,
        f_patch_size: int = 1,
        joint_attention_kwargs: dict | None = None,
    ) -> Transformer2DModelOutput | tuple[list[torch.Tensor]]:
        """diffusers' forward: x a list of B latents [C, F, H, W], t [B] in [0, 1] (0 = noise), cap_feats a list of B
        unpadded caption features; returns the list of B outputs as ``Transformer2DModelOutput(sample=...)`` or
        ``(list,)``."""
        if (x and isinstance(x[0], list)) or siglip_feats is not None or image_noise_mask is not None:
            raise NotImplementedError(
                "Omni inputs (nested x lists, siglip_feats, image_noise_mask) are not supported by zimage_core"
            )
        if len(x) != len(cap_feats):
            raise ValueError(f"x has {len(x)} latents but cap_feats has {len(cap_feats)} captions")
        hooks = [ControlNetSamples(controlnet_block_samples)] if controlnet_block_samples else []
        out = self.forward_with_context(
            x, t, self.encode_context(cap_feats), patch_size=patch_size, f_patch_size=f_patch_size, hooks=hooks
        )
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


__all__ = ["ControlNetSamples", "ModelConfig", "ZImageTransformer2DModel"]
