"""``ZImageControlNetPipeline``, ``ZImageControlNetInpaintPipeline``: diffusers' ControlNet classes, our sampling core.

Both subclass diffusers' own (0.42.1) and run the same generation path as the other drop-in pipelines
(``pipelines._DropIn._run`` on ``sampling.SamplingRun``: our sampler, denoiser, caches and hooks); the ControlNet's
hints enter the transformer through the model hook chain (``zimage_core.controlnet.ControlHook`` after each control
place). The control image is VAE-encoded the way diffusers does it (posterior mode, ``(z - shift) * scale``, zero
channels up to ``control_in_dim``; the inpaint pipeline stacks ``[control latent, 1 - mask, masked-image latent]``),
once per distinct image rather than once per row of the batch.

Differences from diffusers, on purpose: the ControlNet is not given the transformer's modules (``from_transformer``
only remembers the transformer), so the pipeline holds one copy of them; a per-layer list for
``controlnet_conditioning_scale`` is refused with a ``RequestError`` (diffusers raises a ``TypeError`` deep inside);
a single mask is used for every image of an inpaint batch (diffusers' ``torch.cat`` fails when more than one image is
generated with one mask).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers import ZImageControlNetInpaintPipeline as _DiffusersControlNetInpaint
from diffusers import ZImageControlNetPipeline as _DiffusersControlNet
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.z_image.pipeline_output import ZImagePipelineOutput
from diffusers.pipelines.z_image.pipeline_z_image_controlnet import retrieve_latents

from .. import controlnet as cn_mod
from ..errors import RequestError
from .controlnet import CONTROLNET_ENTRY, ZImageControlNetModel
from .pipelines import TRANSFORMER_ENTRY, _DropIn, drop_in_call, load_component
from .transformer import ZImageTransformer2DModel

_ALWAYS = 2**62  # the control step window: every step (diffusers has no window)


class _ControlNetDropIn(_DropIn):
    """The ControlNet part shared by both pipelines; mixed in before the diffusers class it replaces."""

    _inpaint = False

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer, controlnet):
        if not isinstance(transformer, ZImageTransformer2DModel):  # diffusers' own transformer: same weights, ours
            transformer = ZImageTransformer2DModel.from_diffusers(transformer)
        if self._inpaint and transformer.in_channels == controlnet.config.control_in_dim:
            raise ValueError(
                f"{type(self).__name__} needs a ControlNet with the inpaint channels (control_in_dim > "
                f"{transformer.in_channels}, the Union 2.0/2.1 releases); this one has control_in_dim "
                f"{controlnet.config.control_in_dim} (Union 1.0)"
            )
        controlnet = ZImageControlNetModel.from_transformer(controlnet, transformer)  # converts diffusers' (shared)
        DiffusionPipeline.__init__(self)  # diffusers' __init__ would hang the transformer's modules on the ControlNet
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            transformer=transformer,
            controlnet=controlnet,
        )
        self.vae_scale_factor = (
            2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) is not None else 8
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        if self._inpaint:
            self.mask_processor = VaeImageProcessor(
                vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
            )
        self.register_to_config(transformer=TRANSFORMER_ENTRY, controlnet=CONTROLNET_ENTRY)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader, with ``transformer/`` and ``controlnet/`` loaded as our classes."""
        load_component(kwargs, "controlnet", ZImageControlNetModel, pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def _encode_control(self, images: torch.Tensor) -> torch.Tensor:
        lat = retrieve_latents(self.vae.encode(images.to(self.vae.dtype)), sample_mode="argmax")
        return (lat - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def _control_rows(self, t: torch.Tensor, n: int, per_prompt: int, field_name: str) -> list[torch.Tensor]:
        """One tensor per generated image, as diffusers' ``prepare_image`` repeats a batch: a single image for every
        row, otherwise one image per prompt (each repeated ``num_images_per_prompt`` times)."""
        if t.shape[0] == 1:
            return [t[0]] * n
        t = t.repeat_interleave(per_prompt, dim=0)
        if t.shape[0] != n:
            raise RequestError(
                field_name, f"has {t.shape[0] // per_prompt} images for {n // per_prompt} prompts (give 1 or one each)"
            )
        return list(t)

    def _run_controlnet(self, kw: dict) -> ZImagePipelineOutput | tuple:
        control_image = kw.pop("control_image")
        scale = kw.pop("controlnet_conditioning_scale")
        image, mask_image = kw.pop("image", None), kw.pop("mask_image", None)
        self._check(
            kw["prompt"],
            kw["prompt_embeds"],
            kw["output_type"],
            kw["callback_on_step_end_tensor_inputs"],
            kw["num_images_per_prompt"],
        )
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise RequestError(
                "controlnet_conditioning_scale", f"must be a number (one scale for every control layer), got {scale!r}"
            )
        if control_image is None:
            raise RequestError("control_image", f"is required by {type(self).__name__}")
        if self._inpaint and (image is None or mask_image is None):
            raise RequestError("image" if image is None else "mask_image", f"is required by {type(self).__name__}")
        height, width = kw["height"] or 1024, kw["width"] or 1024
        self._check_size(height, width)
        prompt = kw["prompt"]
        per_prompt = kw["num_images_per_prompt"]
        prompts = len(kw["prompt_embeds"]) if prompt is None else (1 if isinstance(prompt, str) else len(prompt))
        n = prompts * per_prompt
        device = self._execution_device
        cn_cfg = self.controlnet.config

        with torch.no_grad():
            ctl = self.prepare_image(control_image, width, height, 1, 1, device, self.vae.dtype)
            height, width = ctl.shape[-2:]
            ctl_lat = self._encode_control(ctl).unsqueeze(2)  # [k, 16, 1, h, w]
            rows = self._control_rows(ctl_lat, n, per_prompt, "control_image")
            if self._inpaint:
                mask = self.mask_processor.preprocess(mask_image, height=height, width=width)
                mask = torch.tile(mask, [1, 3, 1, 1]).to(device=device, dtype=ctl.dtype)
                init = self.prepare_image(image, width, height, 1, 1, device, self.vae.dtype)
                height, width = init.shape[-2:]
                k = max(init.shape[0], mask.shape[0])  # a single mask or image applies to every image of the batch
                init, mask = init.expand(k, *init.shape[1:]), mask.expand(k, *mask.shape[1:])
                masked_lat = self._encode_control(init * (mask < 0.5)).unsqueeze(2)
                keep = F.interpolate(1 - mask[:, :1], size=masked_lat.shape[-2:], mode="nearest").unsqueeze(2)
                keep_rows = self._control_rows(keep.to(masked_lat.dtype), n, per_prompt, "mask_image")
                masked_rows = self._control_rows(masked_lat, n, per_prompt, "image")
                rows = [torch.cat(parts) for parts in zip(rows, keep_rows, masked_rows)]
            channels = rows[0].shape[0]
            if channels > cn_cfg.control_in_dim:
                raise RequestError(
                    "controlnet", f"control_in_dim {cn_cfg.control_in_dim} < {channels} conditioning channels"
                )
            if channels < cn_cfg.control_in_dim:  # Union 2.x without the inpaint channels: zeros (as diffusers)
                rows = [torch.cat([r, r.new_zeros(cn_cfg.control_in_dim - channels, *r.shape[1:])]) for r in rows]

        spec = cn_mod.ControlNetInput(self.controlnet, None, weight=float(scale), field="controlnet_conditioning_scale")
        scales = [1.0] * len(cn_cfg.control_layers_places)
        kw.update(height=height, width=width)
        return self._run(mode="text2img", controls=[cn_mod._Prepared(spec, rows, 0, _ALWAYS, scales)], **kw)


class ZImageControlNetPipeline(_ControlNetDropIn, _DiffusersControlNet):
    """diffusers' ``ZImageControlNetPipeline`` on our transformer, ControlNet and sampling core."""

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer, controlnet):
        super().__init__(scheduler, vae, text_encoder, tokenizer, transformer, controlnet)

    __call__ = drop_in_call(
        _DiffusersControlNet,
        _ControlNetDropIn._run_controlnet,
        """diffusers' ``ZImageControlNetPipeline.__call__``; extras as in ``ZImagePipeline`` (``cache``,
        ``scheduler_name``, ``hooks``).""",
    )


class ZImageControlNetInpaintPipeline(_ControlNetDropIn, _DiffusersControlNetInpaint):
    """diffusers' ``ZImageControlNetInpaintPipeline`` on our transformer, ControlNet and sampling core. As in
    diffusers, the image and mask only condition the ControlNet (``[control, 1 - mask, masked image]`` channels);
    the sampler starts from pure noise and does not re-impose the unmasked region."""

    _inpaint = True

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer, controlnet):
        super().__init__(scheduler, vae, text_encoder, tokenizer, transformer, controlnet)

    __call__ = drop_in_call(
        _DiffusersControlNetInpaint,
        _ControlNetDropIn._run_controlnet,
        """diffusers' ``ZImageControlNetInpaintPipeline.__call__``; extras as in ``ZImagePipeline``.""",
    )


__all__ = ["ZImageControlNetInpaintPipeline", "ZImageControlNetPipeline"]
