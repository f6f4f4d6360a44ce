"""``ZImage``: text-to-image, image-to-image, inpainting and outpainting on our transformer and samplers.

Data path of one ``generate`` call::

    prompt ─► tokenizer + Qwen3 (hidden_states[-2]) ─► caption features      (once per request)
           ─► transformer.encode_context (cap_embedder + context refiner)    (once per request)
    seed_i ─► CPU generator ─► initial noise (or VAE-encoded seed image, re-noised to the first sigma)
           ─► sampler loop over the scheduler's sigmas ─► denoiser (CFG, hooks) ─► transformer
           ─► final fp32 latents ─► VAE decode ─► PIL image

The Z-Image conventions live in one wrapper, ``zimage_core.denoiser.Denoiser``: the model sees ``t = 1 − σ``
(computed as diffusers does), its output is negated into the flow velocity, CFG uses diffusers' formulation
``pos + g·(pos − neg)`` with ``g = CFGScale − 1``, and latents stay fp32. The hooks of every model call are
assembled in one place, ``zimage_core.sampling.SamplingRun``: the caller's ``hooks`` first, a step cache's state last.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import controlnet as cn_mod
from . import images as imgs
from . import lora as lora_mod
from . import sampling
from .components import SchedulerSettings, build_random_pipeline
from .config import SEED_MAX
from .denoiser import GenerationStats
from .errors import RequestError, show
from .fp8 import validate_quantize
from .hooks import StackHook
from .model import CaptionContext, ZImageTransformer, load_transformer
from .scheduler_table import UnknownSchedulerError, resolve_scheduler
from .schedules import img2img_start
from .weights import CheckpointError, check_safetensors_component, read_json


@dataclass(frozen=True)
class Defaults:
    """Generation defaults of a model preset. ``cfg_scale`` is the standard CFG scale (guidance off when ≤ 1)."""

    steps: int
    cfg_scale: float
    shift: float | None = None  # None (every built-in preset): the checkpoint's scheduler config decides the shift
    cfg_normalization: float = 0.0  # 0 = off; f > 0 clamps ‖pred‖ to f·‖pos‖ (diffusers' cfg_normalization)
    cfg_truncation: float = 1.0  # CFG only while t = 1 − σ ≤ this (diffusers' cfg_truncation)
    width: int = 1024
    height: int = 1024
    max_sequence_length: int = 512


DEFAULT_STRENGTH = 0.8  # image-to-image / inpainting / outpainting re-noise this fraction of the schedule

# Base model: 30 steps, CFGScale 5, CFG normalization on; turbo: 8 steps, CFGScale 1. A preset never sets the shift:
# the loaded checkpoint's scheduler/scheduler_config.json does (Z-Image 6.0, Z-Image-Turbo 3.0), as in diffusers.
MODEL_PRESETS: dict[str, Defaults] = {
    "runware:z-image@0": Defaults(steps=30, cfg_scale=5.0, cfg_normalization=1.0),
    "z-image-turbo": Defaults(steps=8, cfg_scale=1.0),
}


@dataclass
class GenerationResult:
    images: list  # PIL images (empty when output_type="latent")
    latents: torch.Tensor  # final fp32 latents before the VAE, [n, 16, H/8, W/8]
    seeds: list[int]
    stats: GenerationStats


@dataclass(frozen=True)
class _Args:
    """``generate``'s arguments after the one check, with every default resolved."""

    prompt: str
    negative_prompt: str | None
    steps: int
    cfg_scale: float
    cfg_normalization: float
    cfg_truncation: float
    max_sequence_length: int
    seeds: list[int]
    spec: object  # the scheduler table's entry: sigmas(), sample(), stochastic, requires_seed_image
    work: imgs.Work
    latent_size: tuple[int, int]
    shift: float
    sigmas: torch.Tensor  # the schedule from the start step on
    t_start: int
    output_type: str
    diffusers_compat: bool

    @property
    def guidance(self) -> float:
        return self.cfg_scale - 1.0  # standard scale s; Z-Image's own g = s − 1; CFG off when s ≤ 1


@dataclass(frozen=True)
class _Contexts:
    pos: CaptionContext
    neg: CaptionContext | None
    low: tuple[CaptionContext, CaptionContext | None] | None  # for σ < HIGH_NOISE_SIGMA with a phased caption LoRA


# ---------------------------------------------------------------------------------------------------------------
# Argument validation shared by generate() and the request API (errors name the generate() argument)
# ---------------------------------------------------------------------------------------------------------------


def _check_int(field_name, value, lo=None, hi=None, multiple=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(field_name, f"must be an integer, got {type(value).__name__} {show(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RequestError(field_name, f"must be in [{lo}, {hi}], got {show(value)}")
    if multiple and value % multiple:
        raise RequestError(field_name, f"must be a multiple of {multiple}, got {show(value)}")
    return value


def _check_float(field_name, value, lo=None, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(field_name, f"must be a finite number, got {show(value)}")
    try:
        value = float(value)  # an integer too large for a float overflows here
    except OverflowError:
        raise RequestError(field_name, f"must be a finite number, got {show(value)}") from None
    if not math.isfinite(value):
        raise RequestError(field_name, f"must be a finite number, got {show(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RequestError(field_name, f"must be in [{lo}, {hi}], got {show(value)}")
    return value


def _load_component(load: Callable, folder: Path):
    """Run a transformers/diffusers loader; its errors on a broken folder (bad JSON, missing files, wrong shapes)
    become a CheckpointError naming the folder."""
    try:
        return load()
    except CheckpointError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{folder}: cannot be loaded ({type(e).__name__}: {str(e)[:300]})") from None


class ZImage:
    """A loaded Z-Image pipeline: our transformer and sampling loop, transformers' Qwen3, diffusers' VAE."""

    def __init__(
        self,
        transformer: ZImageTransformer,
        text_encoder,
        tokenizer,
        vae,
        scheduler: SchedulerSettings | None = None,
        presets: dict[str, Defaults] | None = None,
        default_model: str = "runware:z-image@0",
        name: str = "z-image",
    ):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.scheduler = scheduler or SchedulerSettings()
        self.presets = dict(presets or MODEL_PRESETS)
        self.default_model = default_model
        self.name = name
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._image_processor = None
        self._mask_processor = None
        self.parallel = None  # a zimage_core.parallel.ParallelContext when this process is one rank of a parallel run

    # ---- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        kernel_backend: str | None = None,
        presets: dict[str, Defaults] | None = None,
        quantize: str | None = None,
    ) -> ZImage:
        """Load a diffusers-format Z-Image folder (Tongyi-MAI/Z-Image, Z-Image-Turbo or one of ours).

        device: default CUDA when available, else CPU. dtype: default bf16 on CUDA, fp32 on CPU. quantize: "none"
        (default) or "fp8" (e4m3 W8A8 main layers, docs/fp8.md).
        """
        from diffusers import AutoencoderKL
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        quantize = validate_quantize(quantize)
        path = Path(path).expanduser()
        if not (path / "model_index.json").exists():
            raise CheckpointError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        read_json(path / "model_index.json", "model index")
        for sub in ("transformer", "text_encoder", "tokenizer", "vae"):
            if not (path / sub).is_dir():
                raise CheckpointError(f"{path}: missing the {sub}/ subfolder")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        scheduler = SchedulerSettings.from_folder(path / "scheduler")
        meta_path = path / "zimage_fast.json"
        meta = read_json(meta_path, "zimage_fast.json") if meta_path.exists() else {}
        if presets is None and "defaults" in meta:
            try:
                d = Defaults(**meta["defaults"])
            except TypeError as e:
                raise CheckpointError(f"{meta_path}: invalid defaults ({str(e)[:200]})") from None
            presets = {mid: d for mid in (*MODEL_PRESETS, str(meta.get("model_id", "zimage-fast:default")))}
        for sub in ("text_encoder", "vae"):  # transformers/diffusers would unpickle a .bin: weights must be safetensors
            check_safetensors_component(path / sub)
        transformer = load_transformer(
            path / "transformer", dtype=dtype, device=device, kernel_backend=kernel_backend, quantize=quantize
        )
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a bar per component is noise; generate() has its own
        try:
            text_encoder = _load_component(
                lambda: AutoModel.from_pretrained(path / "text_encoder", dtype=dtype, use_safetensors=True),
                path / "text_encoder",
            )
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        text_encoder = text_encoder.to(device).eval()
        tokenizer = _load_component(lambda: AutoTokenizer.from_pretrained(path / "tokenizer"), path / "tokenizer")
        vae = _load_component(
            lambda: AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, use_safetensors=True),
            path / "vae",
        )
        vae = vae.to(device).eval()
        pipe = cls(transformer, text_encoder, tokenizer, vae, scheduler, presets, name=meta.get("name", path.name))
        pipe.meta = meta
        return pipe

    @classmethod
    def default(cls, device=None, dtype=None, kernel_backend=None, quantize=None) -> ZImage:
        """The embedded default model (docs/default-model.md: what it is and what it draws); fully offline."""
        from .default_model import default_model_path

        return cls.from_pretrained(
            default_model_path(), device=device, dtype=dtype, kernel_backend=kernel_backend, quantize=quantize
        )

    @classmethod
    def random(cls, folder: str | Path, seed: int = 0, **kw) -> ZImage:
        """A small random-weight pipeline written to ``folder`` (for tests and smoke runs)."""
        if not (Path(folder) / "model_index.json").exists():
            build_random_pipeline(folder, seed=seed)
        return cls.from_pretrained(folder, **kw)

    # ---- properties --------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def size_multiple(self) -> int:
        """Width/height must be multiples of this: VAE factor × patch size (16 for the real model)."""
        return self.vae_scale_factor * 2

    def defaults(self, model: str | None = None) -> Defaults:
        model = model or self.default_model
        if model not in self.presets:
            raise RequestError("model", f"unknown model {show(model)}; known: {sorted(self.presets)}")
        return self.presets[model]

    @property
    def image_processor(self):
        if self._image_processor is None:
            from diffusers.image_processor import VaeImageProcessor

            self._image_processor = VaeImageProcessor(vae_scale_factor=self.size_multiple)
            self._mask_processor = VaeImageProcessor(
                vae_scale_factor=self.size_multiple, do_normalize=False, do_binarize=True, do_convert_grayscale=True
            )
        return self._image_processor

    @property
    def mask_processor(self):
        _ = self.image_processor
        return self._mask_processor

    # ---- prompt encoding (once per request) -------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], max_sequence_length: int = 512) -> list[torch.Tensor]:
        """Caption features as diffusers computes them: Qwen3 chat template (enable_thinking=True), right padding,
        ``hidden_states[-2]``, pad tokens dropped. Prompts are padded to the longest in the batch rather than to
        ``max_sequence_length``: under the causal mask the valid tokens' features are the same, at a fraction of
        the cost (truncation at ``max_sequence_length`` is kept)."""
        texts = chat_texts(self.tokenizer, prompts)
        enc = self.tokenizer(
            texts, padding="longest", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        )
        ids, mask = enc.input_ids.to(self.text_encoder.device), enc.attention_mask.to(self.text_encoder.device).bool()
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return [hidden[i][mask[i]] for i in range(len(texts))]

    # ---- VAE ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        return self.image_processor.postprocess(vae_decode(self.vae, latents), output_type="pil")

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixel tensor in [-1, 1] -> scaled latents. With a generator: a posterior *sample* (diffusers' img2img
        consumes the generator here); without: the posterior mode (deterministic)."""
        dist = self.vae.encode(image.to(self.vae.device, self.vae.dtype)).latent_dist
        if generator is None:
            z = dist.mode()
        else:  # diffusers' DiagonalGaussianDistribution.sample: randn on the generator's device
            noise = torch.randn(dist.mean.shape, generator=generator, dtype=dist.mean.dtype).to(dist.mean.device)
            z = dist.mean + dist.std * noise
        cfg = self.vae.config
        return ((z - cfg.shift_factor) * cfg.scaling_factor).float()

    # ---- generation --------------------------------------------------------------------------------------------
    def generate(
        self, prompt: str, *, loras: Sequence | None = None, hooks: Sequence[StackHook] = (), **kwargs
    ) -> GenerationResult:
        """See :meth:`_generate`. ``loras``: [(LoraWeights, weight, "high"|"low"|"both")] active for this call only,
        in this thread only (``zimage_core.lora``). ``controlnets``: [``controlnet.ControlNetInput``]; their hints
        add. ``hooks``: extra :class:`~zimage_core.hooks.StackHook` s around
        the main layers of every model call of this request (outermost first; a step cache always runs innermost).

        Steps: check the arguments (:meth:`_check`) -> encode the prompts once (:meth:`_encode`) -> per result,
        prepare the initial latents (:meth:`_prepare_latents`) and sample them with the denoiser
        (:meth:`_sample`, ``zimage_core.denoiser``) -> decode with the VAE."""
        loras = list(loras or [])
        with lora_mod.apply_loras(self.transformer, loras):
            return self._generate(prompt, loras=loras, hooks=tuple(hooks), **kwargs)

    @torch.no_grad()
    def _generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        seed: int | None = None,
        scheduler: str = "Default",
        number_results: int = 1,
        strength: float | None = None,
        seed_image=None,
        mask_image=None,
        mask_margin: int | None = None,
        outpaint: dict | None = None,
        cfg_normalization: float | bool | None = None,
        cfg_truncation: float | None = None,
        shift: float | None = None,
        model: str | None = None,
        max_sequence_length: int | None = None,
        output_type: str = "pil",
        progress: bool = False,
        diffusers_compat: bool = False,
        batch_results: bool = False,
        cache=None,
        step_callback: Callable | None = None,
        loras: Sequence = (),
        hooks: Sequence[StackHook] = (),
        controlnets: Sequence = (),
        read_paths: bool = False,
        size_range: tuple[int, int] | None = None,
    ) -> GenerationResult:
        """Generate ``number_results`` images. Result ``i`` uses seed ``seed + i`` and reproduces alone.

        Modes: text-to-image; image-to-image (``seed_image``, ``strength`` default 0.8); inpainting (+ ``mask_image``,
        white = repaint; ``mask_margin`` crops the masked region with that margin, works at the requested size and
        pastes back); outpainting (``outpaint={"top","bottom","left","right"}`` extends the canvas; width/height, if
        given, must equal the seed image's plus the extensions).

        ``batch_results=True`` runs the results of a call as one batch (faster for several small images, like
        diffusers' ``num_images_per_prompt``): each result keeps its own seed's noise, but then matches a solo run
        only up to floating-point rounding. It applies to deterministic samplers without a step cache; stochastic
        samplers and caches always run result by result.

        ``seed_image``/``mask_image``: PIL images, base64 or data URIs; local file paths only with
        ``read_paths=True`` (off by default, so a string passed through from a client never reads a local file).
        ``size_range=(lo, hi)``: the allowed output width/height in pixels, also when they come from a seed image or
        an outpainted canvas (default: one size multiple to 4096; the request API passes its 128–2048). Sizes past
        the model's RoPE position table (2560 px for the embedded default) are refused too.

        ``diffusers_compat=True`` consumes the generator exactly like diffusers' img2img/inpaint pipelines (VAE
        posterior sample before the noise) and uses their start step ``int(N − N·strength)``; by default the VAE
        posterior mode is used (the seed's noise is then the same as text-to-image's) and the start step is
        ``N − floor(N·strength)``.
        """
        t_total = time.perf_counter()
        a = self._check(
            prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            cfg_scale=cfg_scale,
            seed=seed,
            scheduler=scheduler,
            number_results=number_results,
            strength=strength,
            seed_image=seed_image,
            mask_image=mask_image,
            mask_margin=mask_margin,
            outpaint=outpaint,
            cfg_normalization=cfg_normalization,
            cfg_truncation=cfg_truncation,
            shift=shift,
            model=model,
            max_sequence_length=max_sequence_length,
            output_type=output_type,
            diffusers_compat=diffusers_compat,
            read_paths=read_paths,
            size_range=size_range,
        )
        controls = (
            cn_mod.prepare(self, controlnets, a.work.width, a.work.height, a.steps, a.work) if controlnets else []
        )
        stats = GenerationStats(
            scheduler=scheduler, shift=a.shift, t_start=a.t_start, steps=len(a.sigmas) - 1, cfg_scale=a.cfg_scale
        )
        stats.batched = batch_results and len(a.seeds) > 1 and not a.spec.stochastic and cache is None
        t0 = self._sync_time()
        contexts = self._encode(a, loras)
        stats.timings["encode_s"] = self._sync_time() - t0
        t0 = self._sync_time()
        latents = self._sample(a, contexts, stats, cache, hooks, progress, step_callback, controls)
        stats.timings["denoise_s"] = self._sync_time() - t0
        images = []
        if a.output_type == "pil":
            t0 = self._sync_time()
            images = [a.work.finish(self.decode(latents[i : i + 1])[0]) for i in range(len(a.seeds))]
            stats.timings["decode_s"] = self._sync_time() - t0
        stats.timings["total_s"] = time.perf_counter() - t_total
        return GenerationResult(images=images, latents=latents.cpu(), seeds=a.seeds, stats=stats)

    # ---- generate, step 1: check the arguments (once) and resolve the working size and the schedule ----------------
    def _check(
        self,
        prompt,
        *,
        negative_prompt,
        width,
        height,
        steps,
        cfg_scale,
        seed,
        scheduler,
        number_results,
        strength,
        seed_image,
        mask_image,
        mask_margin,
        outpaint,
        cfg_normalization,
        cfg_truncation,
        shift,
        model,
        max_sequence_length,
        output_type,
        diffusers_compat,
        read_paths=False,
        size_range=None,
    ) -> _Args:
        preset = self.defaults(model)
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt", "must be a non-empty string")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise RequestError("negative_prompt", "must be a string")
        steps = _check_int("steps", preset.steps if steps is None else steps, 1, 1000)
        cfg_scale = _check_float("cfg_scale", preset.cfg_scale if cfg_scale is None else cfg_scale, 0, 100)
        number_results = _check_int("number_results", number_results, 1, 100)
        cfg_norm = preset.cfg_normalization if cfg_normalization is None else cfg_normalization
        cfg_norm = _check_float("cfg_normalization", float(cfg_norm), 0, 100)
        cfg_trunc = _check_float("cfg_truncation", preset.cfg_truncation if cfg_truncation is None else cfg_truncation)
        table = caption_capacity(self.transformer)
        if max_sequence_length is None:  # a default never refuses: it is clamped to what the RoPE table holds
            max_len = min(preset.max_sequence_length, table)
        else:
            max_len = _check_int("max_sequence_length", max_sequence_length, 1, 4096)
            if max_len > table:  # refused only if a caption as tokenized (truncated at max_len) cannot fit
                texts = chat_texts(self.tokenizer, [prompt] + ([negative_prompt or ""] if cfg_scale > 1.0 else []))
                check_caption_fit([len(self.tokenizer(t).input_ids) for t in texts], max_len, table)
        if seed is None:
            seed = random.randrange(2**32)
        seed = _check_int("seed", seed, 0, SEED_MAX)
        if output_type not in ("pil", "latent"):
            raise RequestError("output_type", f"must be 'pil' or 'latent', got {show(output_type)}")
        try:
            spec = resolve_scheduler(scheduler)
        except UnknownSchedulerError as e:
            raise RequestError("scheduler", str(e)) from None

        work = imgs.prepare_inputs(
            self,
            seed_image=seed_image,
            mask_image=mask_image,
            mask_margin=mask_margin,
            outpaint=outpaint,
            width=width,
            height=height,
            default_size=(preset.width, preset.height),
            allow_paths=read_paths,
        )
        if work.image is None:
            if strength is not None:
                raise RequestError("strength", "only applies with a seed image")
            if spec.requires_seed_image:
                raise RequestError("scheduler", f"{show(scheduler)} inverts a seed image to noise: give a seed image")
        m = self.size_multiple
        self._check_size(work, size_range, outpaint, seed_image, width)
        _check_int("width", work.width, m, 4096, multiple=m)
        _check_int("height", work.height, m, 4096, multiple=m)
        strength = DEFAULT_STRENGTH if strength is None else _check_float("strength", strength, 0, 1)

        h_lat, w_lat = 2 * (work.height // m), 2 * (work.width // m)
        if shift is None:  # the checkpoint's scheduler config decides, as in diffusers
            shift = preset.shift or self.scheduler.shift_for((h_lat // 2) * (w_lat // 2))
        shift = _check_float("shift", shift, 1e-3, 1e3)
        t_start = 0
        if work.image is not None:
            # N − floor(N·strength) by default; diffusers' img2img: int(N − N·strength)
            t_start = int(max(steps - steps * strength, 0)) if diffusers_compat else img2img_start(steps, strength)
        return _Args(
            prompt=prompt,
            negative_prompt=negative_prompt,
            steps=steps,
            cfg_scale=cfg_scale,
            cfg_normalization=cfg_norm,
            cfg_truncation=cfg_trunc,
            max_sequence_length=max_len,
            seeds=[(seed + i) % (SEED_MAX + 1) for i in range(number_results)],
            spec=spec,
            work=work,
            latent_size=(h_lat, w_lat),
            shift=shift,
            sigmas=spec.sigmas(steps, shift)[t_start:],
            t_start=t_start,
            output_type=output_type,
            diffusers_compat=diffusers_compat,
        )

    def max_image_size(self) -> tuple[int, int]:
        """(width, height) in pixels that the transformer's RoPE position table covers."""
        cfg = self.transformer.config
        px = self.vae_scale_factor * cfg.all_patch_size[0]
        return cfg.axes_lens[2] * px, cfg.axes_lens[1] * px

    def _check_size(self, work, size_range, outpaint, seed_image, width) -> None:
        """The working size against the allowed range and the model's position table; the error names where the size
        came from (outpaint, the seed image, or width/height)."""
        lo, hi = size_range or (self.size_multiple, 4096)
        max_w, max_h = self.max_image_size()
        origin = (
            "outpaint" if outpaint is not None else ("seed_image" if width is None and seed_image is not None else None)
        )
        for name, v, top in (("width", work.width, max_w), ("height", work.height, max_h)):
            where = f"the {name} {v} px" + {
                "outpaint": " of the outpainted canvas",
                "seed_image": " of the seed image",
            }.get(origin, "")
            if not lo <= v <= hi:
                raise RequestError(origin or name, f"{where} must be in [{lo}, {hi}]")
            if v > top:
                raise RequestError(
                    origin or name, f"{where} exceeds this model's maximum of {top} px (its RoPE position table)"
                )

    # ---- step 2: encode the prompts and the caption contexts, once per request ----------------------------------
    def _encode(self, a: _Args, loras) -> _Contexts:
        use_cfg = a.guidance > 0
        texts = [a.prompt] + ([a.negative_prompt or ""] if use_cfg else [])
        feats = [f.to(self.dtype) for f in self.encode_prompts(texts, a.max_sequence_length)]
        lora_mod.set_sigma(1.0)
        ctx = self.transformer.encode_context(feats)
        low = None
        if _phased_caption_lora(loras):  # the caption branch differs between the high- and low-noise phases
            lora_mod.set_sigma(0.0)
            low_ctx = self.transformer.encode_context(feats)
            low = (low_ctx.select([0]), low_ctx.select([1]) if use_cfg else None)
        return _Contexts(ctx.select([0]), ctx.select([1]) if use_cfg else None, low)

    # ---- step 3: prepare the initial latents of one group of results ---------------------------------------------
    def _prepare_latents(
        self, a: _Args, gens: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, noise, x0): the first sampler input, the seeds' noise and the encoded seed image (or None)."""
        x0 = None
        if a.work.image is not None:
            if a.diffusers_compat:
                x0 = torch.cat([self.encode_image(a.work.image, gi) for gi in gens]).to(self.device)
            else:
                x0 = self.encode_image(a.work.image).to(self.device).expand(len(gens), -1, -1, -1)
        shape = (1, self.transformer.config.in_channels, *a.latent_size)
        noise = torch.cat([torch.randn(shape, generator=gi, dtype=torch.float32) for gi in gens]).to(self.device)
        if x0 is None:
            return noise, noise, None
        sig = a.sigmas[0].to(self.device, torch.float32)
        return sig * noise + (1.0 - sig) * x0, noise, x0  # diffusers' scale_noise

    # ---- step 4: sample (per result, or one batch) ----------------------------------------------------------------
    def _sample(
        self, a: _Args, contexts: _Contexts, stats: GenerationStats, cache, hooks, progress, step_callback, controls=()
    ):
        finals = []
        progress_bar = None
        if progress:
            from tqdm.auto import tqdm

            runs = 1 if stats.batched else len(a.seeds)
            progress_bar = tqdm(total=stats.steps * runs, desc="denoising", unit="step")
        mask_lat = None if a.work.mask is None else a.work.mask_latents(self).to(self.device)
        for group in [a.seeds] if stats.batched else [[s] for s in a.seeds]:
            gens = [torch.Generator("cpu").manual_seed(s) for s in group]
            x, noise, x0 = self._prepare_latents(a, gens)
            rep = [0] * len(group)
            # per result: a fresh cache state that knows the schedule (absolute step indices, first/last step)
            run = sampling.SamplingRun(
                self.transformer,
                a.spec,
                stats=stats,
                guidance=a.guidance,
                cfg_normalization=a.cfg_normalization,
                cfg_truncation=a.cfg_truncation,
                num_steps=a.steps,
                t_start=a.t_start,
                hooks=hooks,
                cache=cache,
                controls=controls,
                parallel=self.parallel,
            )
            run.set_contexts(
                contexts.pos.select(rep),
                None if contexts.neg is None else contexts.neg.select(rep),
                None if contexts.low is None else tuple(c if c is None else c.select(rep) for c in contexts.low),
            )

            def on_step(info):
                if progress_bar is not None:
                    progress_bar.update(1)
                if step_callback is not None:
                    step_callback(info)

            x, stats.nfe_per_result = run.run(
                x,
                a.sigmas,
                generator=gens[0],
                x0=x0,
                inpaint=None if mask_lat is None else sampling.Inpaint(mask_lat, noise, x0),
                on_step=on_step,
            )
            finals.append(x)
        if progress_bar is not None:
            progress_bar.close()
        latents = torch.cat(finals).float()
        if not torch.isfinite(latents).all():
            raise FloatingPointError(
                "generation produced non-finite latents (NaN/inf): the model or its weights are numerically broken "
                f"for these settings (dtype {self.dtype}, scheduler {stats.scheduler!r}, steps {a.steps})"
            )
        return latents

    def optimize(self, enabled: bool = True, **compile_kw) -> ZImage:
        """Regional ``torch.compile`` of the transformer blocks (``enabled=False``: back to eager); keywords go to
        ``zimage_core.compile.compile_blocks`` (mode, fullgraph, backend). Returns self."""
        from . import compile as compile_mod

        if enabled:
            compile_mod.compile_blocks(self.transformer, **compile_kw)
        else:
            compile_mod.uncompile_blocks(self.transformer)
        return self

    def _sync_time(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ---- the request API ---------------------------------------------------------------------------------------
    def infer(self, request: dict, config=None) -> list[dict]:
        """Run one ``imageInference`` task through the service layer (``zimage_core.service.infer``; ``config``: a
        ``ServerConfig``, default one per pipeline); returns the list of response objects. The one place the library
        reaches the service: a convenience for Python callers, imported only when called."""
        from .service import infer

        return infer(self, request, config)


ZImage.generate.__doc__ = ZImage._generate.__doc__ + "\n\n" + (ZImage.generate.__doc__ or "")


def chat_texts(tokenizer, prompts: Sequence[str]) -> list[str]:
    """The prompts in Z-Image's chat template (Qwen3, generation prompt, enable_thinking=True), as diffusers does."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        for p in prompts
    ]


def caption_capacity(transformer) -> int:
    """The most caption tokens the transformer's RoPE table holds: a caption padded to a multiple of 32 takes
    positions 1..Lp on axis 0 and the image frame Lp + 1, which must stay below ``axes_lens[0]``."""
    return (transformer.config.axes_lens[0] - 2) // 32 * 32


def check_caption_fit(lengths: Sequence[int], max_len: int, table: int, field="max_sequence_length") -> None:
    """Refuse (naming ``field``) a caption of ``lengths[i]`` tokens (as tokenized, truncated at ``max_len``) that,
    padded to a multiple of 32, is longer than the ``table`` caption tokens of the model's RoPE table."""
    for n in lengths:
        n = min(n, max_len)
        if -(-n // 32) * 32 > table:
            raise RequestError(
                field,
                f"is {max_len}: a prompt's caption of {n} tokens does not fit this model's RoPE table (at most "
                f"{table} caption tokens); use max_sequence_length <= {table} (longer prompts are then truncated) "
                "or a shorter prompt",
            )


@torch.no_grad()
def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> the VAE's image tensor in [-1, 1] (unscaled and unshifted as diffusers' Z-Image does)."""
    cfg = vae.config
    z = latents.to(vae.device, vae.dtype) / cfg.scaling_factor + cfg.shift_factor
    return vae.decode(z, return_dict=False)[0]


def _phased_caption_lora(loras) -> bool:
    return any(
        phase != "both" and any(n.startswith(("cap_embedder", "context_refiner")) for n in lw.modules)
        for lw, _, phase in loras
    )


__all__ = [
    "MODEL_PRESETS",
    "Defaults",
    "GenerationResult",
    "ZImage",
    "caption_capacity",
    "chat_texts",
    "check_caption_fit",
    "vae_decode",
]
