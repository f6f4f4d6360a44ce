"""``ZImageControlNetModel``: our ControlNet (``zimage_core.controlnet``) behind diffusers' model class.

Same ``register_to_config`` names, same state-dict keys (``control_layers.*``, ``control_all_x_embedder.*``,
``control_noise_refiner.*``) and same ``forward`` signature and return type as diffusers 0.42.1's
``ZImageControlNetModel``. The transformer's modules (t embedder, x embedder, refiners, pad tokens) are not held:
our pipelines pass the transformer to the ControlNet at run time, so nothing is copied and a folder saved here holds
the control weights only. A folder diffusers saved after ``from_transformer`` (which also writes the shared
transformer tensors) loads too: those keys are ignored.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..config import ZImageConfig
from ..controlnet import SHARED_PREFIXES, ControlNetConfig, ZImageControlNet
from ..hooks import StackHook
from ..model import padded_len
from .transformer import config_property, sharing_weights

# What diffusers writes into model_index.json for the ControlNet: saved pipeline folders load in diffusers unchanged.
CONTROLNET_ENTRY = ("diffusers", "ZImageControlNetModel")


class _HintsReady(Exception):
    def __init__(self, hints):
        self.hints = hints


class _AllHints(StackHook):
    """Computes every hint from the main stream before the main layers, then stops the forward (``forward``)."""

    def __init__(self, model, transformer, x, control, scale, patch):
        self.args = model, transformer, x, control, scale, patch

    def before_stack(self, hidden, inp):
        model, transformer, x, control, scale, (p, pf) = self.args
        plens = [padded_len((xi.shape[1] // pf) * (xi.shape[2] // p) * (xi.shape[3] // p)) for xi in x]
        hints = model.hints(transformer, hidden, inp, plens, control, x, scale=scale, patch=(p, pf))
        raise _HintsReady(hints)


class ZImageControlNetModel(ZImageControlNet, ModelMixin, ConfigMixin):
    """diffusers' ``ZImageControlNetModel``, computed by ``zimage_core.controlnet.ZImageControlNet``.

    Our ControlNet pipelines accept either this class or diffusers' own (whose tensors are then shared, not copied).
    """

    _supports_gradient_checkpointing = False
    _keys_to_ignore_on_load_unexpected = [rf"^{p.rstrip('.')}" for p in SHARED_PREFIXES] + [r"^rope_embedder"]
    from_pretrained = ModelMixin.__dict__["from_pretrained"]

    @register_to_config
    def __init__(
        self,
        control_layers_places: list[int] = None,
        control_refiner_layers_places: list[int] = None,
        control_in_dim=None,
        add_control_noise_refiner: Literal["control_layers", "control_noise_refiner"] | None = None,
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        dim=3840,
        n_refiner_layers=2,
        n_heads=30,
        n_kv_heads=30,
        norm_eps=1e-5,
        qk_norm=True,
    ):
        cfg = ControlNetConfig(
            control_layers_places=tuple(control_layers_places or ()),
            control_in_dim=control_in_dim,
            control_refiner_layers_places=None
            if control_refiner_layers_places is None
            else tuple(control_refiner_layers_places),
            add_control_noise_refiner=add_control_noise_refiner,
            all_patch_size=tuple(all_patch_size),
            all_f_patch_size=tuple(all_f_patch_size),
            dim=dim,
            n_refiner_layers=n_refiner_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            norm_eps=norm_eps,
            qk_norm=qk_norm,
        )
        head_dim = dim // n_heads
        blocks = ZImageConfig(  # the block shapes only; the transformer it runs with is checked at run time
            all_patch_size=cfg.all_patch_size,
            all_f_patch_size=cfg.all_f_patch_size,
            dim=dim,
            n_layers=max(cfg.control_layers_places) + 1,
            n_refiner_layers=n_refiner_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            norm_eps=norm_eps,
            qk_norm=qk_norm,
            axes_dims=(head_dim,),
            axes_lens=(1,),
        )
        ZImageControlNet.__init__(self, cfg, blocks)
        self.gradient_checkpointing = False
        # the plain attributes diffusers' class sets
        self.control_layers_places = control_layers_places
        self.control_in_dim = control_in_dim
        self.control_refiner_layers_places = control_refiner_layers_places
        self.add_control_noise_refiner = add_control_noise_refiner
        self.__dict__["_transformer"] = None

    # ``ZImageControlNet`` keeps its dataclass in ``self.config``; diffusers' ``config`` is the registered dict.
    config = config_property()

    @property
    def dtype(self) -> torch.dtype:
        return ZImageControlNet.dtype.fget(self)

    @property
    def device(self) -> torch.device:
        return ZImageControlNet.device.fget(self)

    @classmethod
    def from_diffusers(cls, module: torch.nn.Module) -> ZImageControlNetModel:
        """This class with the weights of a live diffusers ``ZImageControlNetModel`` (tensors shared, not copied;
        the transformer's modules it may hold after ``from_transformer`` are left out)."""
        sd = {k: v for k, v in module.state_dict().items() if not k.startswith(SHARED_PREFIXES)}
        return sharing_weights(cls, module, sd)

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path_or_dict=None, **kwargs) -> ZImageControlNetModel:
        """A local release file without ``config=``: loaded offline, its layout told apart by the tensor names
        (``zimage_core.controlnet.layouts``: Union 1.0, 2.0, 2.1 and the 2.1 lite files, which diffusers' own
        detection takes for 1.0). Otherwise diffusers' single-file loader (its ``config=`` and other keyword
        arguments), converted to this class without a copy."""
        from pathlib import Path

        from diffusers import ZImageControlNetModel as _Diffusers

        from .. import controlnet as cn_mod

        src = pretrained_model_link_or_path_or_dict
        local = Path(src).expanduser() if isinstance(src, (str, Path)) else None
        if local is not None and local.suffix == ".safetensors" and local.exists() and kwargs.get("config") is None:
            tcfg = cn_mod.released_transformer_config(local)
            model = cn_mod.load_checked(
                local, tcfg, None, kwargs.get("torch_dtype") or torch.float32, "cpu",
                lambda c: cls(**{k: v for k, v in c.to_dict().items() if not k.startswith("_")}),
            )  # fmt: skip
            return model.eval()

        return cls.from_diffusers(_Diffusers.from_single_file(pretrained_model_link_or_path_or_dict, **kwargs))

    @classmethod
    def from_transformer(cls, controlnet, transformer):
        """diffusers' ``from_transformer``: remembers ``transformer`` for :meth:`forward` (not as a submodule: its
        weights stay out of this model's state dict). Our pipelines pass the transformer at run time instead."""
        if not isinstance(controlnet, ZImageControlNetModel):
            controlnet = cls.from_diffusers(controlnet)
        controlnet.__dict__["_transformer"] = transformer
        return controlnet

    def forward(
        self,
        x: list[torch.Tensor],
        t,
        cap_feats: list[torch.Tensor],
        control_context: list[torch.Tensor],
        conditioning_scale: float = 1.0,
        patch_size=2,
        f_patch_size=1,
    ) -> dict[int, torch.Tensor]:
        """diffusers' forward: ``{main layer index: hint · conditioning_scale}`` for the unified sequence (needs
        :meth:`from_transformer` first, as diffusers' does)."""
        transformer = self.__dict__.get("_transformer")
        if transformer is None:
            raise RuntimeError("call ZImageControlNetModel.from_transformer(controlnet, transformer) first")
        if len(control_context) != len(x):
            raise ValueError(f"control_context has {len(control_context)} entries for {len(x)} latents")
        from .transformer import ZImageTransformer2DModel

        if not isinstance(transformer, ZImageTransformer2DModel):
            transformer = ZImageTransformer2DModel.from_diffusers(transformer)
            self.__dict__["_transformer"] = transformer
        hook = _AllHints(
            self, transformer, list(x), list(control_context), conditioning_scale, (patch_size, f_patch_size)
        )
        try:
            transformer.forward_with_context(
                x, t, transformer.encode_context(cap_feats), patch_size=patch_size, f_patch_size=f_patch_size,
                hooks=[hook],
            )  # fmt: skip
        except _HintsReady as done:
            places = self.config.control_layers_places
            return {place: h * conditioning_scale for place, h in zip(places, done.hints)}
        raise RuntimeError("the transformer did not run its main layers")  # pragma: no cover


__all__ = ["CONTROLNET_ENTRY", "ZImageControlNetModel"]
