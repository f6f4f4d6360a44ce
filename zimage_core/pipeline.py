"""``ZImage``: text-to-image, image-to-image, inpainting and outpainting on our transformer and samplers.

Data path of one ``generate`` call::

    prompt ─► tokenizer + Qwen3 (hidden_states[-2]) ─► caption features      (once per request)
           ─► transformer.encode_context (cap_embedder + context refiner)    (once per request)
    seed_i ─► CPU generator ─► initial noise (or VAE-encoded seed image, re-noised to the first sigma)
           ─► sampler loop over the scheduler's sigmas ─► denoiser (CFG, cache hook) ─► transformer
           ─► final fp32 latents ─► VAE decode ─► PIL image

The Z-Image conventions live in one adapter (:meth:`ZImage._denoiser`): the model sees ``t = 1 − σ`` (computed as
diffusers does: ``(1000 − 1000σ)/1000`` in fp32), its output is negated into the flow velocity, CFG uses
diffusers' formulation ``pos + g·(pos − neg)`` with ``g = CFGScale − 1``, and latents stay fp32.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from . import images as imgs
from . import lora as lora_mod
from .api import ServerConfig
from .components import SchedulerSettings, build_random_pipeline
from .errors import RequestError
from .model import CaptionContext, ZImageTransformer
from .scheduler_table import UnknownSchedulerError, resolve_scheduler
from .schedules import img2img_start
from .weights import CheckpointError, check_safetensors_component, load_transformer, read_json

SEED_MAX = 2**63 - 1


@dataclass(frozen=True)
class Defaults:
    """Generation defaults of a model preset. ``cfg_scale`` is the standard CFG scale (guidance off when ≤ 1)."""

    steps: int
    cfg_scale: float
    shift: float | None  # None: take the shift from the checkpoint's scheduler config
    cfg_normalization: float = 0.0  # 0 = off; f > 0 clamps ‖pred‖ to f·‖pos‖ (diffusers' cfg_normalization)
    cfg_truncation: float = 1.0  # CFG only while t = 1 − σ ≤ this (diffusers' cfg_truncation)
    width: int = 1024
    height: int = 1024
    max_sequence_length: int = 512


# decisions.md: base model 30 steps, CFGScale 5, shift 6, CFG normalization on; turbo 8 steps, CFGScale 1, shift 3.
MODEL_PRESETS: dict[str, Defaults] = {
    "runware:z-image@0": Defaults(steps=30, cfg_scale=5.0, shift=6.0, cfg_normalization=1.0),
    "z-image-turbo": Defaults(steps=8, cfg_scale=1.0, shift=3.0),
}


@dataclass
class GenerationResult:
    images: list  # PIL images (empty when output_type="latent")
    latents: torch.Tensor  # final fp32 latents before the VAE, [n, 16, H/8, W/8]
    seeds: list[int]
    stats: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Argument validation shared by generate() and the request API (errors name the generate() argument)
# ---------------------------------------------------------------------------------------------------------------


def _check_int(field_name, value, lo=None, hi=None, multiple=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(field_name, f"must be an integer, got {type(value).__name__} {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RequestError(field_name, f"must be in [{lo}, {hi}], got {value}")
    if multiple and value % multiple:
        raise RequestError(field_name, f"must be a multiple of {multiple}, got {value}")
    return value


def _check_float(field_name, value, lo=None, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(field_name, f"must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RequestError(field_name, f"must be in [{lo}, {hi}], got {value}")
    return float(value)


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
        self.outputs = imgs.OutputCache()  # earlier outputs by imageUUID, for seedImage/maskImage references
        self.server = ServerConfig()  # pluggable server pieces for infer(): image store, price, checkers

    # ---- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        kernel_backend: str | None = None,
        presets: dict[str, Defaults] | None = None,
    ) -> ZImage:
        """Load a diffusers-format Z-Image folder (Tongyi-MAI/Z-Image, Z-Image-Turbo or one of ours).

        device: default CUDA when available, else CPU. dtype: default bf16 on CUDA, fp32 on CPU.
        """
        from diffusers import AutoencoderKL
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

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
        transformer = load_transformer(path / "transformer", dtype=dtype, device=device, kernel_backend=kernel_backend)
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
    def default(cls, device=None, dtype=None, kernel_backend=None) -> ZImage:
        """The embedded default model (see README: what it is and what it draws); fully offline."""
        from .default_model import default_model_path

        return cls.from_pretrained(default_model_path(), device=device, dtype=dtype, kernel_backend=kernel_backend)

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
            raise RequestError("model", f"unknown model {model!r}; known: {sorted(self.presets)}")
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
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for p in prompts
        ]
        enc = self.tokenizer(
            texts, padding="longest", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        )
        ids, mask = enc.input_ids.to(self.text_encoder.device), enc.attention_mask.to(self.text_encoder.device).bool()
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return [hidden[i][mask[i]] for i in range(len(texts))]

    # ---- the model adapter -----------------------------------------------------------------------------------
    def _denoiser(
        self,
        ctx_pos: CaptionContext,
        ctx_neg: CaptionContext | None,
        guidance: float,
        cfg_normalization: float,
        cfg_truncation: float,
        stats: dict,
        main_layers: Callable | None = None,
        ctx_low: tuple[CaptionContext, CaptionContext | None] | None = None,
    ) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """``denoise(x, sigma) -> v``: the guided flow velocity for fp32 latents x [B, C, h, w].

        ``ctx_low``: other (positive, negative) contexts for σ < 0.5, when a phased LoRA changes the caption branch.
        """
        transformer = self.transformer

        def pair(pos, neg):  # (context without CFG, batched [pos ‖ neg] context for CFG)
            if neg is None:
                return pos, None
            return pos, CaptionContext(pos.feats + neg.feats, pos.freqs + neg.freqs, pos.lens + neg.lens)

        high = pair(ctx_pos, ctx_neg)
        low = high if ctx_low is None else pair(*ctx_low)

        def denoise(x: torch.Tensor, sigma) -> torch.Tensor:
            b = x.shape[0]
            # diffusers: timesteps = σ·1000 (fp32), model t = (1000 − timestep) / 1000 (fp32)
            # computed on the host (IEEE fp32 either way) so that reading t for CFG truncation costs no device sync
            timestep = torch.tensor(float(sigma), dtype=torch.float32) * 1000
            t_host = (1000 - timestep) / 1000
            t = t_host.to(x.device).expand(b)
            lora_mod.set_sigma(float(sigma))
            single, both = high if float(sigma) >= lora_mod.HIGH_NOISE_SIGMA else low
            apply_cfg = both is not None and guidance > 0 and float(t_host) <= cfg_truncation
            xin = x.to(transformer.dtype)
            if apply_cfg:
                xin, t, ctx = xin.repeat(2, 1, 1, 1), t.repeat(2), both
            else:
                ctx = single
            out = transformer.forward_with_context(list(xin.unsqueeze(2).unbind(0)), t, ctx, main_layers=main_layers)
            stats["forwards"] += 1
            stats["sequences"] += len(out)
            if apply_cfg:
                preds = []
                for j in range(b):
                    pos, neg = out[j].float(), out[b + j].float()
                    pred = pos + guidance * (pos - neg)
                    if cfg_normalization > 0:
                        pos_norm, pred_norm = torch.linalg.vector_norm(pos), torch.linalg.vector_norm(pred)
                        max_norm = pos_norm * cfg_normalization
                        if pred_norm > max_norm:
                            pred = pred * (max_norm / pred_norm)
                    preds.append(pred)
                pred = torch.stack(preds)
            else:
                pred = torch.stack([o.float() for o in out])
            return -pred.squeeze(2)  # flow velocity, fp32 [B, C, h, w]

        return denoise

    # ---- VAE ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        cfg = self.vae.config
        z = latents.to(self.vae.device, self.vae.dtype) / cfg.scaling_factor + cfg.shift_factor
        image = self.vae.decode(z, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type="pil")

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
    def generate(self, prompt: str, *, loras: Sequence | None = None, **kwargs) -> GenerationResult:
        """See :meth:`_generate`. ``loras``: [(LoraWeights, weight, "high"|"low"|"both")] active for this call only,
        in this thread only (``zimage_core.lora``)."""
        loras = list(loras or [])
        with lora_mod.apply_loras(self.transformer, loras):
            return self._generate(prompt, loras=loras, **kwargs)

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
        read_paths: bool = False,
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

        ``diffusers_compat=True`` consumes the generator exactly like diffusers' img2img/inpaint pipelines (VAE
        posterior sample before the noise) and uses their start step ``int(N − N·strength)``; by default the VAE
        posterior mode is used (the seed's noise is then the same as text-to-image's) and the start step is
        ``N − floor(N·strength)`` (decisions.md).
        """
        t_total = time.perf_counter()
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
        max_len = _check_int("max_sequence_length", max_sequence_length or preset.max_sequence_length, 1, 4096)
        if seed is None:
            seed = random.randrange(2**32)
        seed = _check_int("seed", seed, 0, SEED_MAX)
        if output_type not in ("pil", "latent"):
            raise RequestError("output_type", f"must be 'pil' or 'latent', got {output_type!r}")
        try:
            spec = resolve_scheduler(scheduler)
        except UnknownSchedulerError as e:
            raise RequestError("scheduler", str(e)) from None
        seeds = [(seed + i) % (SEED_MAX + 1) for i in range(number_results)]

        # ---- the conditioning image(s) and the working size ----
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
        width, height = work.width, work.height
        if work.image is None:
            if strength is not None:
                raise RequestError("strength", "only applies with a seed image")
            if spec.requires_seed_image:
                raise RequestError("scheduler", f"{scheduler!r} inverts a seed image to noise: give a seed image")
        m = self.size_multiple
        _check_int("width", width, m, 4096, multiple=m)
        _check_int("height", height, m, 4096, multiple=m)
        strength = 0.8 if strength is None else _check_float("strength", strength, 0, 1)

        # ---- schedule ----
        h_lat, w_lat = 2 * (height // m), 2 * (width // m)
        shift = shift if shift is not None else (preset.shift or self.scheduler.shift_for((h_lat // 2) * (w_lat // 2)))
        shift = _check_float("shift", shift, 1e-3, 1e3)
        sigmas = spec.sigmas(steps, shift)
        t_start = 0
        if work.image is not None:
            # decisions.md: N − floor(N·strength); diffusers' img2img: int(N − N·strength)
            t_start = int(max(steps - steps * strength, 0)) if diffusers_compat else img2img_start(steps, strength)
        run_sigmas = sigmas[t_start:]

        stats = {
            "forwards": 0,
            "sequences": 0,
            "steps": len(run_sigmas) - 1,
            "nfe_per_result": 0,
            "scheduler": scheduler,
            "shift": shift,
            "t_start": t_start,
            "cfg_scale": cfg_scale,
            "timings": {},
        }
        timings = stats["timings"]

        # ---- prompt encoding and the caption context, once per request ----
        guidance = cfg_scale - 1.0  # decisions.md: standard scale s; Z-Image's own g = s − 1; off when s ≤ 1
        use_cfg = guidance > 0
        t0 = self._sync_time()
        texts = [prompt] + ([negative_prompt or ""] if use_cfg else [])
        feats = [f.to(self.dtype) for f in self.encode_prompts(texts, max_len)]
        lora_mod.set_sigma(1.0)
        ctx = self.transformer.encode_context(feats)
        ctx_pos = ctx.select([0])
        ctx_neg = ctx.select([1]) if use_cfg else None
        ctx_low = None
        if _phased_caption_lora(loras):  # the caption branch differs between the high- and low-noise phases
            lora_mod.set_sigma(0.0)
            low = self.transformer.encode_context(feats)
            ctx_low = (low.select([0]), low.select([1]) if use_cfg else None)
        timings["encode_s"] = self._sync_time() - t0

        # ---- per result: initial latents, sampler loop ----
        t0 = self._sync_time()
        finals = []
        batched = batch_results and len(seeds) > 1 and not spec.stochastic and cache is None
        stats["batched"] = batched
        progress_bar = None
        if progress:
            from tqdm.auto import tqdm

            runs = 1 if batched else number_results
            progress_bar = tqdm(total=stats["steps"] * runs, desc="denoising", unit="step")
        for group in [seeds] if batched else [[s] for s in seeds]:
            gens = [torch.Generator("cpu").manual_seed(s) for s in group]
            g = gens[0]
            x0 = None
            if work.image is not None:
                if diffusers_compat:
                    x0 = torch.cat([self.encode_image(work.image, gi) for gi in gens]).to(self.device)
                else:
                    x0 = self.encode_image(work.image).to(self.device).expand(len(group), -1, -1, -1)
            shape = (1, self.transformer.config.in_channels, h_lat, w_lat)
            noise = torch.cat([torch.randn(shape, generator=gi, dtype=torch.float32) for gi in gens]).to(self.device)
            if x0 is not None:
                sig = run_sigmas[0].to(self.device, torch.float32)
                x = sig * noise + (1.0 - sig) * x0  # diffusers' scale_noise
            else:
                x = noise
            # per result: a fresh cache state that knows the schedule (absolute step indices, first/last step)
            cache_state = cache.new_state(num_steps=steps, start_step=t_start) if cache is not None else None
            rep = [0] * len(group)
            denoise = self._denoiser(
                ctx_pos.select(rep),
                None if ctx_neg is None else ctx_neg.select(rep),
                guidance,
                cfg_norm,
                cfg_trunc,
                stats,
                main_layers=None if cache_state is None else cache_state.main_layers,
                ctx_low=None if ctx_low is None else tuple(c if c is None else c.select(rep) for c in ctx_low),
            )
            counted = _counting(denoise if cache_state is None else cache_state.observe(denoise))
            mask_lat = None if work.mask is None else work.mask_latents(self).to(self.device)

            def on_step(info, _x0=x0, _noise=noise, _mask=mask_lat, _cache=cache_state):
                out = None
                if _mask is not None:  # inpainting: re-impose the known region at the next noise level
                    sig_next = torch.as_tensor(info["sigma_next"], dtype=torch.float32, device=self.device)
                    proper = _x0 if float(sig_next) == 0 else sig_next * _noise + (1.0 - sig_next) * _x0
                    out = (1 - _mask) * proper + _mask * info["x"]
                if _cache is not None:
                    _cache.end_step(info["i"])
                if progress_bar is not None:
                    progress_bar.update(1)
                if step_callback is not None:
                    step_callback(info)
                return out

            if len(run_sigmas) > 1:
                x = spec.sample(counted, x, run_sigmas, generator=g, callback=on_step, x0=x0)
            stats["nfe_per_result"] = counted.calls
            if cache_state is not None:
                stats.setdefault("cache", []).append(cache_state.summary())
            finals.append(x)
        if progress_bar is not None:
            progress_bar.close()
        latents = torch.cat(finals).float()
        timings["denoise_s"] = self._sync_time() - t0
        if not torch.isfinite(latents).all():
            raise FloatingPointError(
                "generation produced non-finite latents (NaN/inf): the model or its weights are numerically broken "
                f"for these settings (dtype {self.dtype}, scheduler {scheduler!r}, steps {steps})"
            )

        images = []
        if output_type == "pil":
            t0 = self._sync_time()
            images = [self.decode(latents[i : i + 1])[0] for i in range(len(seeds))]
            images = [work.finish(im) for im in images]
            timings["decode_s"] = self._sync_time() - t0
        timings["total_s"] = time.perf_counter() - t_total
        return GenerationResult(images=images, latents=latents.cpu(), seeds=seeds, stats=stats)

    def _sync_time(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ---- the request API ---------------------------------------------------------------------------------------
    def infer(self, request: dict, config: ServerConfig | None = None) -> list[dict]:
        """Run one ``imageInference`` task (see ``zimage_core.api``); returns the list of response objects."""
        from .api import infer

        return infer(self, request, config)


ZImage.generate.__doc__ = ZImage._generate.__doc__ + "\n\n" + (ZImage.generate.__doc__ or "")


def _phased_caption_lora(loras) -> bool:
    return any(
        phase != "both" and any(n.startswith(("cap_embedder", "context_refiner")) for n in lw.modules)
        for lw, _, phase in loras
    )


def _counting(fn):
    def wrapped(x, sigma):
        wrapped.calls += 1
        return fn(x, sigma)

    wrapped.calls = 0
    return wrapped


__all__ = ["MODEL_PRESETS", "Defaults", "GenerationResult", "ZImage"]
