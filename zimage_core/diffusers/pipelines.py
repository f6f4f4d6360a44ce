"""``ZImagePipeline``, ``ZImageImg2ImgPipeline``, ``ZImageInpaintPipeline``: diffusers' classes, our sampling core.

Each class subclasses diffusers' own pipeline (0.42.1): the constructor, ``from_pretrained`` / ``save_pretrained``
folders, ``to``, offload, ``encode_prompt``, ``prepare_latents`` (so a generator or a list of generators draws the
very same noise) and the output type are diffusers'. ``__call__`` keeps diffusers' signature, adds keyword-only
extras (``cache=``, ``scheduler_name=``), and runs our path: prompts encoded without padding to 512 tokens, the
caption branch of the transformer once per call, our sampler over the scheduler's sigmas calling our denoiser
(``zimage_core.denoiser.Denoiser``: CFG, normalization, truncation), step caches and other model hooks, run-time
LoRA, and our VAE decode step.

The sigmas come from the pipeline's scheduler exactly as diffusers computes them (``set_timesteps`` with ``mu``,
custom ``sigmas``, Karras/exponential/beta options of ``FlowMatchEulerDiscreteScheduler``); that scheduler's Euler
step is our ``Default`` sampler. ``scheduler_name=`` picks any sampler of the API's ``scheduler`` table instead.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers import ZImageImg2ImgPipeline as _DiffusersImg2Img
from diffusers import ZImageInpaintPipeline as _DiffusersInpaint
from diffusers import ZImagePipeline as _DiffusersText2Image
from diffusers.pipelines.z_image.pipeline_output import ZImagePipelineOutput
from diffusers.pipelines.z_image.pipeline_z_image import (
    calculate_shift,
    get_default_z_image_sigmas,
    retrieve_timesteps,
)

from .. import lora as lora_mod
from .. import sampling
from ..denoiser import GenerationStats
from ..errors import RequestError
from ..fp8 import validate_quantize
from ..hooks import StackHook
from ..pipeline import ZImage, caption_capacity, check_caption_fit, vae_decode
from ..scheduler_table import UnknownSchedulerError, resolve_scheduler
from .lora import LoraPipelineMixin, lora_scale_of
from .transformer import ZImageTransformer2DModel

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# What diffusers writes into model_index.json for the transformer: saved folders load in diffusers unchanged.
TRANSFORMER_ENTRY = ("diffusers", "ZImageTransformer2DModel")


# The keyword arguments of a pipeline's ``from_pretrained`` that also apply to loading one model of its folder.
_MODEL_LOAD_KEYS = (
    "torch_dtype",
    "dtype",
    "cache_dir",
    "local_files_only",
    "revision",
    "token",
    "variant",
    "use_safetensors",
)


def load_component(kwargs: dict, name: str, model_cls: type, path) -> None:
    """Unless the caller passed ``name`` in ``kwargs`` (a pipeline's ``from_pretrained`` arguments), load the folder's
    ``name/`` subfolder as ``model_cls`` with the arguments that apply to one model, and put it there."""
    if name not in kwargs:
        model_kwargs = {k: kwargs[k] for k in _MODEL_LOAD_KEYS if k in kwargs}
        kwargs[name] = model_cls.from_pretrained(path, subfolder=name, **model_kwargs)


def as_ours(transformer):
    """Our transformer for a pipeline's ``transformer`` component: diffusers' own (as diffusers' loader builds it,
    with every ``from_pretrained`` option applied: dtype maps, variants, device maps) becomes ours on the same
    tensors; ``None`` (a pipeline built without it) stays ``None``."""
    if transformer is None or isinstance(transformer, ZImageTransformer2DModel):
        return transformer
    return ZImageTransformer2DModel.from_diffusers(transformer)


def _keyword_only(name: str, default, annotation) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


# The keyword-only parameters every drop-in ``__call__`` adds after diffusers' own.
CALL_EXTRAS = (
    _keyword_only("cache", None, Any),
    _keyword_only("scheduler_name", None, str | None),
    _keyword_only("hooks", (), Sequence[StackHook]),
)


def drop_in_call(base: type, run: Callable[[Any, dict], Any], doc: str, extra: Sequence[inspect.Parameter] = ()):
    """A ``__call__`` with exactly ``base.__call__``'s parameters (names, order, defaults, annotations), then
    :data:`CALL_EXTRAS` and ``extra`` (keyword-only), run under ``torch.no_grad()``: it binds the arguments as
    Python would, fills in the defaults, and hands ``run(self, kw)`` a dict of every parameter but ``self``."""
    params = [*inspect.signature(base.__call__).parameters.values(), *CALL_EXTRAS, *extra]
    signature = inspect.Signature(params, return_annotation=ZImagePipelineOutput | tuple)

    def __call__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        kw = dict(bound.arguments)
        kw.pop("self")
        return run(self, kw)

    __call__.__signature__ = signature
    __call__.__doc__ = doc
    return torch.no_grad()(__call__)


class _Interrupted(Exception):
    def __init__(self, latents: torch.Tensor):
        self.latents = latents


class _DropIn(LoraPipelineMixin):
    """The shared implementation; mixed in before the diffusers pipeline class it replaces."""

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer):
        transformer = as_ours(transformer)
        super().__init__(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader (the transformer becomes ours through ``__setattr__``). Extra keyword
        ``quantize="fp8"``: the transformer's main layers in e4m3 W8A8 (``zimage_core.fp8``, docs/fp8.md)."""
        quantize = validate_quantize(kwargs.pop("quantize", None))
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if quantize != "none":
            pipe.transformer.quantize(quantize)
        return pipe

    def __setattr__(self, name, value):
        """Component swapping (``pipe.transformer = ...``, ``register_modules``) keeps our transformer: diffusers'
        own is converted (same tensors), and ``model_index.json`` keeps diffusers' entry so saved folders load in
        diffusers unchanged."""
        if name == "transformer":
            value = as_ours(value)
        super().__setattr__(name, value)
        if name == "transformer" and value is not None and "_internal_dict" in self.__dict__:
            self.register_to_config(transformer=TRANSFORMER_ENTRY)

    # ---- prompts ---------------------------------------------------------------------------------------------------
    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device | None = None,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: list[torch.FloatTensor] | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        max_sequence_length: int = 512,
    ):
        """diffusers' ``encode_prompt``, except that the caller's prompt list is never modified (diffusers writes the
        chat-templated text back into it) and a single negative prompt string applies to every prompt."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        prompt_embeds = self._encode_prompt(prompts, device, prompt_embeds, max_sequence_length)
        if not do_classifier_free_guidance:
            return prompt_embeds, []
        n = len(prompt_embeds)
        if negative_prompt is None:
            negative_prompt = [""] * n
        elif isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * n
        elif len(negative_prompt) != n:
            raise RequestError("negative_prompt", f"has {len(negative_prompt)} entries for {n} prompts")
        negative_prompt_embeds = self._encode_prompt(
            negative_prompt, device, negative_prompt_embeds, max_sequence_length
        )
        return prompt_embeds, negative_prompt_embeds

    def _encode_prompt(self, prompt, device=None, prompt_embeds=None, max_sequence_length: int = 512):
        """Caption features [L_i, cap_feat_dim] per prompt; the same valid-token features as diffusers (which pads
        every prompt to ``max_sequence_length`` tokens), padded only to the longest prompt of the call."""
        if prompt_embeds is not None:
            return prompt_embeds
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        feats = ZImage.encode_prompts(self, prompts, max_sequence_length)
        # diffusers would fail deep in the RoPE lookup; refuse naming the field
        check_caption_fit([len(f) for f in feats], max_sequence_length, caption_capacity(self.transformer))
        return [f.to(device) for f in feats]

    # ---- the shared generation path ------------------------------------------------------------------------------
    def _check(self, prompt, prompt_embeds, output_type, callback_on_step_end_tensor_inputs, num_images_per_prompt):
        if prompt is None and prompt_embeds is None:
            raise RequestError("prompt", "give either prompt or prompt_embeds")
        if prompt is not None and prompt_embeds is not None:  # diffusers' text-to-image would ignore prompt silently
            raise RequestError("prompt_embeds", "give either prompt or prompt_embeds, not both")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise RequestError("prompt", f"must be a str or a list of str, got {type(prompt).__name__}")
        if output_type not in OUTPUT_TYPES:
            raise RequestError("output_type", f"must be one of {OUTPUT_TYPES}, got {output_type!r}")
        bad = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if bad:
            raise RequestError(
                "callback_on_step_end_tensor_inputs", f"must be in {self._callback_tensor_inputs}, got {bad}"
            )
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int):
            raise RequestError("num_images_per_prompt", f"must be an integer >= 1, got {num_images_per_prompt!r}")
        if num_images_per_prompt < 1:
            raise RequestError("num_images_per_prompt", f"must be >= 1, got {num_images_per_prompt}")

    def _check_size(self, height, width):
        m = self.vae_scale_factor * 2
        for name, v in (("height", height), ("width", width)):
            if v % m:
                raise RequestError(name, f"must be a multiple of {m}, got {v}")

    def _crop_region(self, image, mask_image, pad, output_type, height, width):
        """(crop box around the mask + ``pad`` px, generation height, width) for ``padding_mask_crop``."""
        from PIL import Image

        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise RequestError("padding_mask_crop", f"must be an integer >= 0 (pixels), got {pad!r}")
        if not isinstance(image, Image.Image) or not isinstance(mask_image, Image.Image):
            raise RequestError("padding_mask_crop", "needs image and mask_image as single PIL images")
        if output_type != "pil":
            raise RequestError(
                "padding_mask_crop", f"needs output_type='pil' (the crop is pasted back), got {output_type!r}"
            )
        m = self.vae_scale_factor * 2
        height = height if height is not None else image.height // m * m
        width = width if width is not None else image.width // m * m
        return self.mask_processor.get_crop_region(mask_image, width, height, pad=pad), height, width

    def _sampler(self, num_inference_steps, sigmas, image_seq_len, device, scheduler_name):
        """(spec, timesteps): diffusers' timesteps on the pipeline's scheduler; our sampler for them."""
        sched = self.scheduler
        cfg = sched.config
        mu = calculate_shift(
            image_seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        if scheduler_name is None:
            if not isinstance(sched, FlowMatchEulerDiscreteScheduler) or cfg.get("stochastic_sampling", False):
                raise RequestError(
                    "scheduler",
                    f"{type(sched).__name__} (stochastic_sampling={cfg.get('stochastic_sampling', False)}) is not "
                    "run by zimage_core: use FlowMatchEulerDiscreteScheduler, or pass scheduler_name= one of the API's "
                    "scheduler names (e.g. 'DPM++ 2M Karras')",
                )
            spec = resolve_scheduler("Default")
        else:
            try:
                spec = resolve_scheduler(scheduler_name)
            except UnknownSchedulerError as e:
                raise RequestError("scheduler_name", str(e)) from None
            if spec.schedule_name != "default" and sigmas is not None:
                raise RequestError("sigmas", f"cannot be combined with {scheduler_name!r}, which has its own schedule")
        if sigmas is None:
            sigmas = get_default_z_image_sigmas(num_inference_steps)
        timesteps, num_inference_steps = retrieve_timesteps(sched, num_inference_steps, device, sigmas=sigmas, mu=mu)
        if spec.schedule_name != "default":  # the named schedule replaces the scheduler's (shift as configured)
            shift = math.exp(mu) if cfg.get("use_dynamic_shifting", False) else float(cfg.get("shift", 1.0))
            grid = spec.sigmas(num_inference_steps, shift).to(torch.float32)
            sched.sigmas = grid.to(sched.sigmas.device)
            sched.timesteps = (grid[:-1] * cfg.num_train_timesteps).to(timesteps.device)
            timesteps = sched.timesteps
        return spec, timesteps

    def _contexts(self, prompt_embeds, negative_prompt_embeds, use_cfg):
        dtype = self.transformer.dtype
        pos = self.transformer.encode_context([p.to(dtype) for p in prompt_embeds])
        neg = self.transformer.encode_context([n.to(dtype) for n in negative_prompt_embeds]) if use_cfg else None
        return pos, neg

    def _run(
        self,
        *,
        mode: str,
        prompt,
        image=None,
        mask_image=None,
        masked_image_latents=None,
        strength: float = 1.0,
        height,
        width,
        num_inference_steps,
        sigmas,
        guidance_scale,
        cfg_normalization,
        cfg_truncation,
        negative_prompt,
        num_images_per_prompt,
        generator,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        output_type,
        return_dict,
        joint_attention_kwargs,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
        max_sequence_length,
        cache,
        scheduler_name,
        hooks=(),
        padding_mask_crop=None,
        controls=(),
    ):
        """diffusers' arguments mapped onto the shared sampling core (``zimage_core.sampling.SamplingRun``)."""
        # 1. check inputs; the seed image and mask (img2img, inpaint) and the size
        self._check(prompt, prompt_embeds, output_type, callback_on_step_end_tensor_inputs, num_images_per_prompt)
        init_image, mask, crops_coords, height, width = self._images(
            mode, image, mask_image, strength, padding_mask_crop, output_type, height, width
        )
        device = self._execution_device
        self._guidance_scale, self._joint_attention_kwargs = guidance_scale, joint_attention_kwargs
        self._cfg_normalization, self._cfg_truncation, self._interrupt = cfg_normalization, cfg_truncation, False
        use_cfg = self.do_classifier_free_guidance
        lora_scale = lora_scale_of(joint_attention_kwargs)
        loras = self._lora_list(lora_scale)  # read once, at the start of the call

        # 2. prompts (or embeddings), one per image; 3. the scheduler's sigmas and our sampler for them
        embeds = self._embeds(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, use_cfg, device, max_sequence_length
        )
        if num_images_per_prompt > 1:
            embeds = [[e for e in es for _ in range(num_images_per_prompt)] for es in embeds]
        m = self.vae_scale_factor * 2
        spec, timesteps, total_steps, t_start = self._schedule(
            mode, num_inference_steps, sigmas, (int(height) // m) * (int(width) // m), device, scheduler_name, strength
        )

        # 4. initial latents (diffusers' own prepare_latents: the same draws from the same generators)
        tensors, inpaint = self._initial_latents(
            mode, embeds, init_image, mask, masked_image_latents, timesteps, height, width, generator, latents,
            callback_on_step_end_tensor_inputs,
        )  # fmt: skip

        # 5. sample: the shared core over the scheduler's sigmas from the start step on
        stats = GenerationStats(
            scheduler=scheduler_name or "Default",
            shift=float(self.scheduler.config.get("shift", 1.0)),
            t_start=t_start,
            steps=len(timesteps),
            cfg_scale=float(guidance_scale) + 1.0,
        )
        run = sampling.SamplingRun(
            self.transformer,
            spec,
            stats=stats,
            guidance=float(guidance_scale),
            cfg_normalization=float(cfg_normalization) if cfg_normalization else 0.0,
            cfg_truncation=math.inf if cfg_truncation is None else float(cfg_truncation),
            num_steps=total_steps,
            t_start=t_start,
            hooks=hooks,
            cache=cache,
            controls=controls,
        )
        sampler_generator = generator[0] if isinstance(generator, list) else generator
        if sampler_generator is not None and sampler_generator.device.type != "cpu":
            sampler_generator = None  # our stochastic samplers draw on the CPU
        with (
            self.progress_bar(total=len(timesteps)) as progress_bar,
            lora_mod.apply_loras(self.transformer, loras, field="adapter_weights"),
            self._peft_scale(lora_scale),
        ):
            lora_mod.set_sigma(1.0)
            on_step = self._step_hook(
                run, tensors, use_cfg, inpaint, timesteps, callback_on_step_end, callback_on_step_end_tensor_inputs,
                progress_bar,
            )  # fmt: skip
            try:
                latents, _ = run.run(
                    tensors["latents"], self.scheduler.sigmas[t_start:], generator=sampler_generator, inpaint=inpaint,
                    on_step=on_step,
                )  # fmt: skip
            except _Interrupted as stop:
                latents = stop.latents
        stats.nfe_per_result = stats.forwards
        self._last_stats = stats  # what the last call did (forwards, cache decisions); not part of diffusers' API

        # 6. decode
        if output_type == "latent":
            out = latents
        else:
            out = self.image_processor.postprocess(vae_decode(self.vae, latents), output_type=output_type)
            if padding_mask_crop is not None:  # paste the repainted crop back into the untouched original
                out = [self.image_processor.apply_overlay(mask_image, image, im, crops_coords) for im in out]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (out,)
        return ZImagePipelineOutput(images=out)

    def _images(self, mode, image, mask_image, strength, padding_mask_crop, output_type, height, width):
        """(seed image tensor, mask, crop box, height, width): img2img's and inpainting's inputs preprocessed as
        diffusers does (``padding_mask_crop``: around the mask), the size checked (default 1024, or the image's)."""
        init_image = mask = crops_coords = None
        if mode != "text2img":
            if image is None:
                raise RequestError("image", f"is required by {type(self).__name__}")
            if mode == "inpaint" and mask_image is None:
                raise RequestError("mask_image", "is required for inpainting")
            if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 <= strength <= 1:
                raise RequestError("strength", f"must be in [0.0, 1.0], got {strength!r}")
            if padding_mask_crop is not None:
                crops_coords, height, width = self._crop_region(
                    image, mask_image, padding_mask_crop, output_type, height, width
                )
                init_image = self.image_processor.preprocess(
                    image, height=height, width=width, crops_coords=crops_coords, resize_mode="fill"
                )
            else:
                init_image = self.image_processor.preprocess(image)
            init_image = init_image.to(dtype=torch.float32)
            height = init_image.shape[-2] if height is None else height
            width = init_image.shape[-1] if width is None else width
        height, width = height or 1024, width or 1024
        self._check_size(height, width)
        if mode == "inpaint":
            if padding_mask_crop is not None:
                mask = self.mask_processor.preprocess(
                    mask_image, height=height, width=width, resize_mode="fill", crops_coords=crops_coords
                )
            else:
                mask = self.mask_processor.preprocess(mask_image, height=height, width=width)
        return init_image, mask, crops_coords, height, width

    def _embeds(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, use_cfg, device, max_len):
        """(prompt embeddings, negative ones: [] without CFG), one per prompt: the caller's, or encoded."""
        if prompt_embeds is not None and prompt is None:
            if use_cfg and negative_prompt_embeds is None:
                raise RequestError(
                    "negative_prompt_embeds", "is required with prompt_embeds and no prompt when guidance_scale > 0"
                )
            return prompt_embeds, (negative_prompt_embeds if use_cfg else [])
        return self.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=use_cfg,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            device=device,
            max_sequence_length=max_len,
        )

    def _schedule(self, mode, num_inference_steps, sigmas, image_seq_len, device, scheduler_name, strength):
        """(sampler, timesteps run, steps of the whole schedule, start step): img2img and inpainting start at
        diffusers' ``get_timesteps`` for ``strength``."""
        spec, timesteps = self._sampler(num_inference_steps, sigmas, image_seq_len, device, scheduler_name)
        total_steps = len(timesteps)
        if mode == "text2img":
            self.scheduler.set_begin_index(0)
        else:
            timesteps, steps_left = self.get_timesteps(total_steps, strength, device)
            if steps_left < 1:
                raise RequestError(
                    "strength", f"{strength} leaves {steps_left} of {total_steps} steps to run (need at least 1)"
                )
        self._num_timesteps = len(timesteps)
        return spec, timesteps, total_steps, total_steps - len(timesteps)

    def _initial_latents(
        self, mode, embeds, init_image, mask, masked_image_latents, timesteps, height, width, generator, latents, cb_in
    ):
        """(the tensors a step callback may read or replace, inpainting's blend or None): the first latents drawn
        by diffusers' ``prepare_latents`` (img2img, inpaint: the seed image re-noised to the first timestep) and
        inpainting's latent mask (and ``masked_image_latents`` when the callback asks for them)."""
        prompt_embeds, negative_prompt_embeds = embeds
        n, channels, device = len(prompt_embeds), self.transformer.in_channels, self._execution_device
        noise = image_latents = None
        if mode == "text2img":
            latents = self.prepare_latents(n, channels, height, width, torch.float32, device, generator, latents)
        else:
            first = timesteps[:1].repeat(n)
            args = (init_image, first, n, channels, height, width, prompt_embeds[0].dtype, device, generator, latents)
            if mode == "img2img":
                latents = self.prepare_latents(*args)
            else:
                latents, noise, image_latents = self.prepare_latents(*args)
        if mode == "inpaint":
            if "masked_image_latents" in (cb_in or ()) and masked_image_latents is None:
                masked = init_image * (mask < 0.5)
                mask, masked_image_latents = self.prepare_mask_latents(
                    mask, masked, n, height, width, prompt_embeds[0].dtype, device, generator
                )
            else:  # diffusers also VAE-encodes the masked image here, but its loop never reads the result
                lat_size = (
                    2 * (int(height) // (self.vae_scale_factor * 2)),
                    2 * (int(width) // (self.vae_scale_factor * 2)),
                )
                mask = F.interpolate(mask, size=lat_size, mode="nearest").to(device, prompt_embeds[0].dtype)
                if mask.shape[0] < n:
                    if n % mask.shape[0]:
                        raise RequestError("mask_image", f"{mask.shape[0]} masks cannot be spread over {n} images")
                    mask = mask.repeat(n // mask.shape[0], 1, 1, 1)
        tensors = {
            "latents": latents.float(),
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "mask": mask,
            "masked_image_latents": masked_image_latents,
        }
        return tensors, (sampling.Inpaint(mask, noise, image_latents) if mode == "inpaint" else None)

    def _step_hook(self, run, tensors, use_cfg, inpaint, timesteps, callback, cb_inputs, progress_bar):
        """Build the run's caption contexts from ``tensors`` and return the sampler's step hook: diffusers'
        ``callback_on_step_end`` (its replacements land in ``tensors``; replaced embeddings rebuild the contexts),
        the progress bar and the interrupt."""
        current = {}

        def set_contexts():
            current["embeds"] = (tensors["prompt_embeds"], tensors["negative_prompt_embeds"])
            run.set_contexts(*self._contexts(*current["embeds"], use_cfg))

        def on_step(info):
            i = info["i"]
            tensors["latents"] = info["x"]
            if callback is not None:
                outputs = callback(self, i, timesteps[i], {k: tensors[k] for k in cb_inputs}) or {}
                for k in ("latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents"):
                    if k in outputs:
                        tensors[k] = outputs.pop(k)
                if inpaint is not None:
                    inpaint.mask = tensors["mask"]
                pos, neg = current["embeds"]
                if tensors["prompt_embeds"] is not pos or tensors["negative_prompt_embeds"] is not neg:
                    set_contexts()  # the caption branch follows embeddings a callback replaced
            progress_bar.update()
            if self._interrupt:
                raise _Interrupted(tensors["latents"])
            return tensors["latents"]

        set_contexts()
        return on_step


class ZImagePipeline(_DropIn, _DiffusersText2Image):
    """diffusers' ``ZImagePipeline`` (text-to-image) on our transformer and sampling core."""

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer):
        super().__init__(scheduler, vae, text_encoder, tokenizer, transformer)

    __call__ = drop_in_call(
        _DiffusersText2Image,
        lambda self, kw: self._run(mode="text2img", **kw),
        """diffusers' ``ZImagePipeline.__call__``; extras: ``cache`` (a step-cache config, e.g.
        ``zimage_core.cache.FBCacheConfig``), ``scheduler_name`` (any of the API's scheduler names) and ``hooks``
        (``zimage_core.hooks.StackHook`` objects acting around the main layers of every model call).""",
    )


class ZImageImg2ImgPipeline(_DropIn, _DiffusersImg2Img):
    """diffusers' ``ZImageImg2ImgPipeline`` on our transformer and sampling core."""

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer):
        super().__init__(scheduler, vae, text_encoder, tokenizer, transformer)

    __call__ = drop_in_call(
        _DiffusersImg2Img,
        lambda self, kw: self._run(mode="img2img", **kw),
        """diffusers' ``ZImageImg2ImgPipeline.__call__``; extras as in :class:`ZImagePipeline`.""",
    )


class ZImageInpaintPipeline(_DropIn, _DiffusersInpaint):
    """diffusers' ``ZImageInpaintPipeline`` on our transformer and sampling core."""

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer):
        super().__init__(scheduler, vae, text_encoder, tokenizer, transformer)

    __call__ = drop_in_call(
        _DiffusersInpaint,
        lambda self, kw: self._run(mode="inpaint", **kw),
        """diffusers' ``ZImageInpaintPipeline.__call__``; extras as in :class:`ZImagePipeline`, and
        ``padding_mask_crop`` (pixels, as in diffusers' Stable Diffusion inpainting): work on the mask's bounding box
        grown by that margin, resized to ``height`` x ``width`` (default: the image's size rounded down to a multiple
        of 16), and paste the result back into the original image; needs single PIL inputs and ``output_type="pil"``.
        """,
        extra=(_keyword_only("padding_mask_crop", None, int | None),),
    )


__all__ = ["ZImageImg2ImgPipeline", "ZImageInpaintPipeline", "ZImagePipeline"]
