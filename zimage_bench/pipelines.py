"""The two pipelines under comparison, built on *identical* components, and how each configuration is run.

``load_pair(model)`` loads diffusers' ``ZImagePipeline`` (the reference) once and builds our ``ZImage`` around the
very same modules: our transformer shares the diffusers transformer's parameters (``ZImageTransformer.from_diffusers``,
no copy) and both use the same text encoder, tokenizer and VAE objects. Differences in output can only come from the
sampling code and the transformer's forward.

Models (``--model``):

- ``default``: the embedded default model (``ZImage.default()``'s folder; a small random or trained model).
- ``synthetic``: Z-Image's real transformer config (6.15 B parameters) with random weights, built directly on the
  device in the run's dtype; a 2-layer random Qwen3 with the real caption width (2560) as text encoder, so no 4 B
  text encoder is needed; the real VAE config (FLUX AE, random weights). Throughput is weight-agnostic; parity on it
  checks the implementation, not image quality. Meant for a GPU.
- ``synthetic-tiny``: the same code path at a tiny config on any device (what the CPU tests run).
- a path: a diffusers-format Z-Image folder (a real checkpoint, or one of ours).

Configurations (``Config``): ``diffusers-eager`` (the reference, SDPA attention), ``diffusers-compile``
(``torch.compile`` of the diffusers transformer), ``ours-torch`` (our sampling core, torch ops), ``ours-triton`` (our
core with the Triton op backend), ``ours-<cache>`` (our core with a step cache from ``zimage_core.cache``).
Availability is decided at run time; an unavailable one carries ``skip_reason``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zimage_core.cache import CONFIGS
from zimage_core.components import RANDOM_TRANSFORMER, SchedulerSettings, byte_level_tokenizer, small_text_encoder
from zimage_core.config import ZImageConfig
from zimage_core.model import ZImageTransformer
from zimage_core.pipeline import ZImage

from .shapes import Shape
from .timing import Clock

DEFAULT_PROMPT = "a photograph of a red fox sitting in fresh snow at golden hour, shallow depth of field"
REFERENCE = "diffusers-eager"
ALL_CONFIGS = (
    "diffusers-eager",
    "diffusers-compile",
    "ours-torch",
    "ours-batched",
    "ours-triton",
    "ours-cache",
    "ours-fp8",
)
# the request API's defaults of acceleratorOptions: fbCacheThreshold 0.25, teaCacheDistance 0.5, dbCacheThreshold 0.25.
CACHE_DEFAULTS = {f"{m}cache": cfg.threshold for m, cfg in CONFIGS.items()}  # fbcache 0.25, teacache 0.5, ...

# The real VAE (FLUX AE) config: the vae/config.json of Tongyi-MAI/Z-Image (diffusers' AutoencoderKL).
REAL_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    mid_block_add_attention=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    sample_size=1024,
    force_upcast=True,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)


# ---------------------------------------------------------------------------------------------------------------
# The pair of pipelines
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Pair:
    ref: Any  # diffusers ZImagePipeline (eager)
    ours: ZImage
    model: str  # what --model named
    model_kind: str  # zimage_fast.json "kind" ("random", "trained-small"), "real", or "synthetic-*"
    device: torch.device
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)
    fault: float = 0.0  # --inject-fault: our transformer's output is multiplied by (1 + fault)

    def describe(self) -> dict:
        cfg = self.ours.transformer.config
        return {
            "model": self.model,
            "model_kind": self.model_kind,
            "dtype": str(self.dtype).replace("torch.", ""),
            "transformer_params": sum(p.numel() for p in self.ours.transformer.parameters()),
            "transformer_dim": cfg.dim,
            "transformer_layers": cfg.n_layers,
            "notes": list(self.notes),
            **({"injected_fault": self.fault} if self.fault else {}),
        }


def _quiet_loading():
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()


def ours_from_diffusers(pipe, name: str = "z-image") -> ZImage:
    """Our ``ZImage`` over a diffusers pipeline's own modules (transformer parameters shared, not copied)."""
    sc = dict(pipe.scheduler.config)
    keys = {k: sc[k] for k in SchedulerSettings.__dataclass_fields__ if k in sc}
    ours = ZImage(
        ZImageTransformer.from_diffusers(pipe.transformer),
        pipe.text_encoder,
        pipe.tokenizer,
        pipe.vae,
        SchedulerSettings(**keys),
        name=name,
    )
    return ours


def _init_random_(module: torch.nn.Module, seed: int) -> None:
    """Random weights for a module materialised with ``to_empty``: each submodule's own ``reset_parameters`` where it
    has one (Linear: PyTorch's default init), RMSNorm weights 1, every other parameter N(0, 1) (pad tokens;
    diffusers initialises them to zeros, which would hide pad-handling bugs)."""
    torch.manual_seed(seed)
    done = set()
    for m in module.modules():
        own = list(m.parameters(recurse=False))
        if own and hasattr(m, "reset_parameters"):
            m.reset_parameters()
            done.update(id(p) for p in own)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if id(p) in done:
                continue
            if p.ndim == 1 and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_()


def synthetic_pipeline(
    config: ZImageConfig, device: torch.device, dtype: torch.dtype, *, vae: str = "real", seed: int = 0
):
    """diffusers ``ZImagePipeline`` with random weights at ``config``, built on ``device`` in ``dtype``.

    The transformer is constructed on the meta device and materialised once, in ``dtype``, on ``device`` (6.15 B
    parameters are 12.3 GB in bf16; never an fp32 copy). Text encoder: a 2-layer random Qwen3 whose hidden size is
    the transformer's caption width (2560 for the real config), over a byte-level tokenizer. VAE: the real FLUX-AE
    config (``vae="real"``) or the small test VAE (``vae="small"``), random weights.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    from zimage_core.components import small_vae

    kwargs = {k: v for k, v in config.to_dict().items() if k != "_class_name"}
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel(**kwargs)
    transformer = transformer.to(dtype).to_empty(device=device)
    _init_random_(transformer, seed)
    transformer.eval().requires_grad_(False)
    tok = byte_level_tokenizer()
    heads = max(config.cap_feat_dim // 128, 2)
    enc = small_text_encoder(config.cap_feat_dim, len(tok), layers=2, heads=heads, seed=seed + 1).to(device, dtype)
    if vae == "real":
        torch.manual_seed(seed + 2)
        vae_model = AutoencoderKL(**REAL_VAE).eval().to(device, dtype)
    else:
        vae_model = small_vae(seed=seed + 2).to(device, dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae_model, text_encoder=enc, tokenizer=tok, transformer=transformer)


def load_pair(model: str = "default", device=None, dtype=None, *, vae: str | None = None) -> Pair:
    """Load the reference pipeline for ``model`` (see the module docstring) and build ours on its components."""
    from diffusers import ZImagePipeline

    _quiet_loading()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    notes: list[str] = []
    if model in ("synthetic", "synthetic-tiny"):
        real = model == "synthetic"
        config = ZImageConfig() if real else RANDOM_TRANSFORMER
        vae = vae or ("real" if real else "small")
        ref = synthetic_pipeline(config, device, dtype, vae=vae)
        kind = "synthetic-real-dims" if real else "synthetic-tiny"
        notes.append(
            f"random weights at {'the real' if real else 'a tiny'} transformer config; text encoder: 2-layer random "
            f"Qwen3 (hidden {config.cap_feat_dim}); VAE: {vae} config, random; images are noise, parity checks the "
            "implementation only"
        )
        name = model
    else:
        if model == "default":
            from zimage_core.default_model import default_model_path

            path = default_model_path()
        else:
            path = Path(model).expanduser()
            if not (path / "model_index.json").exists():
                raise SystemExit(f"--model {model}: not a diffusers pipeline folder (no model_index.json)")
        ref = ZImagePipeline.from_pretrained(path, dtype=dtype).to(device)
        meta_path = path / "zimage_fast.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        kind = meta.get("kind", "real")
        name = str(path) if model != "default" else f"default ({path.name})"
    ref.set_progress_bar_config(disable=True)
    ours = ours_from_diffusers(ref, name=name)
    return Pair(ref=ref, ours=ours, model=name, model_kind=kind, device=device, dtype=dtype, notes=notes)


# ---------------------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Config:
    name: str
    kind: str  # "diffusers" | "ours"
    lossy: bool = False
    skip_reason: str | None = None
    pipe: Any = None  # diffusers: the pipeline object to call (eager or with a compiled transformer)
    backend: str | None = None  # ours: kernel backend ("torch", "triton", "auto")
    cache: Any = None  # ours: a zimage_core.cache.CacheConfig
    batch: bool = False  # ours: generate(batch_results=True), the results of a request as one batch
    compiled: bool = False
    info: dict = field(default_factory=dict)  # what the row should say about this configuration
    quantize: str | None = None  # ours: "fp8" runs a quantized copy of the transformer (zimage_core.fp8)

    @property
    def available(self) -> bool:
        return self.skip_reason is None


def _triton_config(pair: Pair) -> Config:
    from zimage_kernels.backend import TORCH_OPS, triton_available

    cfg = Config("ours-triton", "ours", backend="triton")
    if pair.device.type != "cuda":
        cfg.skip_reason = "needs CUDA (Triton kernels run on GPU tensors; on CPU only the test interpreter runs them)"
    elif not triton_available():
        cfg.skip_reason = "triton is not importable"
    else:
        from zimage_kernels.triton_ops import TRITON_OPS

        ops = [f.name for f in dataclasses.fields(TORCH_OPS) if f.name != "name"]
        native = [op for op in ops if getattr(TRITON_OPS, op) is not getattr(TORCH_OPS, op)]
        cfg.info["triton_ops"] = native
        cfg.info["torch_fallback_ops"] = [op for op in ops if op not in native]
    return cfg


def parse_cache_spec(spec: str | None) -> dict[str, float | None]:
    """``"fbcache=0.25,teacache"`` -> {"fbcache": 0.25, "teacache": 0.5 (the default)}; None: all three."""
    if not spec:
        return dict(CACHE_DEFAULTS)
    out = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, thr = part.partition("=")
        out[name.strip().lower()] = float(thr) if thr else CACHE_DEFAULTS.get(name.strip().lower())
    return out


def cache_configs(spec: str | None = None) -> list[Config]:
    """One ``ours-<method>`` config per cache method: ``zimage_core.cache.CacheConfig.for_method(method,
    threshold=...)``, passed as ``ZImage.generate(cache=...)``, which calls ``cache.new_state()`` per result (a
    ``StackHook`` with ``.observe``, ``.end_step(i)``, ``.summary()``). A method whose config cannot be built is a
    skip with the reason, never a failure."""
    methods = parse_cache_spec(spec)
    mod = importlib.import_module("zimage_core.cache")  # looked up at call time: tests substitute stand-ins
    cache_cls = mod.CacheConfig
    out = []
    for m, thr in methods.items():
        cfg = Config(f"ours-{m}", "ours", lossy=True, backend="auto", info={"cache_method": m, "threshold": thr})
        try:
            cfg.cache = cache_cls.for_method(m, threshold=thr) if thr is not None else cache_cls.for_method(m)
        except Exception as e:  # noqa: BLE001 - unknown method name, bad threshold, ...
            cfg.skip_reason = f"CacheConfig.for_method({m!r}, threshold={thr}) failed: {type(e).__name__}: {e}"
        out.append(cfg)
    return out


def compiled_pipeline(ref, mode: str | None = None, fullgraph: bool = False):
    """A second diffusers pipeline over the same modules with ``torch.compile`` on the transformer (static shapes:
    one compile per shape, reported as that shape's compile time)."""
    import torch._dynamo
    from diffusers import ZImagePipeline

    # Each shape of the table is a new static graph; the default limit (8) would silently fall back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = torch.compile(ref.transformer, mode=mode, fullgraph=fullgraph, dynamic=False)
    pipe = ZImagePipeline(
        scheduler=ref.scheduler,
        vae=ref.vae,
        text_encoder=ref.text_encoder,
        tokenizer=ref.tokenizer,
        transformer=compiled,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _quantized(pair: Pair, mode: str) -> ZImage:
    """``pair.ours`` with a quantized copy of its transformer (text encoder, VAE and scheduler shared), made once."""
    cache = pair.__dict__.setdefault("_quantized", {})
    if mode not in cache:
        import copy

        src = pair.ours
        q = copy.deepcopy(src.transformer).quantize(mode)
        pipe = ZImage(q, src.text_encoder, src.tokenizer, src.vae, src.scheduler, src.presets, src.default_model)
        pipe.meta = getattr(src, "meta", {})
        cache[mode] = pipe
    return cache[mode]


def make_configs(pair: Pair, names: list[str], *, cache_spec=None, compile_mode=None) -> list[Config]:
    """The configurations named (``ours-cache`` expands to one per cache method), reference first."""
    out: list[Config] = []
    for name in names:
        if name == "diffusers-eager":
            out.append(Config(name, "diffusers", pipe=pair.ref, info={"attention": "SDPA"}))
        elif name == "diffusers-compile":
            cfg = Config(name, "diffusers", compiled=True, info={"compile_mode": compile_mode or "default"})
            try:
                cfg.pipe = compiled_pipeline(pair.ref, mode=compile_mode)
            except Exception as e:  # noqa: BLE001
                cfg.skip_reason = f"torch.compile unavailable: {type(e).__name__}: {e}"
            out.append(cfg)
        elif name == "ours-torch":
            out.append(Config(name, "ours", backend="torch"))
        elif name == "ours-batched":
            out.append(
                Config(
                    name,
                    "ours",
                    backend="torch",
                    batch=True,
                    info={"note": "results batched: equal to solo runs up to rounding"},
                )
            )
        elif name == "ours-triton":
            out.append(_triton_config(pair))
        elif name == "ours-fp8":  # e4m3 W8A8 recipe, auto backend (Triton + _scaled_mm on CUDA): lossy vs bf16
            from zimage_core.fp8 import RECIPES

            info = {"quantize": "fp8", "fp8_groups": list(RECIPES["fp8"])}
            out.append(Config(name, "ours", lossy=True, backend="auto", quantize="fp8", info=info))
        elif name in ("ours-cache", "ours-caches"):
            out.extend(cache_configs(cache_spec))
        elif name.startswith("ours-") and name[5:] in CACHE_DEFAULTS:
            out.extend(cache_configs(name[5:] if cache_spec is None else cache_spec))
        else:
            raise SystemExit(f"unknown configuration {name!r}; known: {', '.join(ALL_CONFIGS)}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running one configuration on one shape
# ---------------------------------------------------------------------------------------------------------------


class Recorder:
    """Marks taken during one run: the whole call, around every transformer forward, at every step end.

    ``steps_per_seq`` is the number of scheduler steps of one denoising sequence: our pipeline runs the results of a
    request one after another (one sequence each), diffusers runs one batched sequence.
    """

    def __init__(self, clock: Clock, steps_per_seq: int, keep_steps: bool = False):
        self.clock = clock
        self.steps_per_seq = steps_per_seq
        self.keep_steps = keep_steps
        self.forwards: list[tuple] = []  # (begin, end) marks
        self.step_marks: list = []
        self.fwd_count_at_step: list[int] = []
        self.step_latents: list[torch.Tensor] = []  # fp32 CPU copies (keep_steps only)
        self.final_latents: torch.Tensor | None = None
        self._fb = None

    def forward_begin(self):
        self._fb = self.clock.mark()

    def forward_end(self):
        self.forwards.append((self._fb, self.clock.mark()))

    def step_end(self, latents: torch.Tensor):
        self.step_marks.append(self.clock.mark())
        self.fwd_count_at_step.append(len(self.forwards))
        if self.keep_steps:
            self.step_latents.append(latents.detach().to("cpu", torch.float32, copy=True))

    def forward_ms(self) -> list[float]:
        return [self.clock.ms(a, b) for a, b in self.forwards]

    def step_ms(self) -> list[float]:
        """Duration of every step: from the previous step's end, or for the first step of a sequence from the
        start of its first forward."""
        out = []
        for k, mark in enumerate(self.step_marks):
            if k % self.steps_per_seq == 0:
                idx = self.fwd_count_at_step[k - 1] if k else 0
                if idx >= len(self.forwards):
                    continue
                start = self.forwards[idx][0]
            else:
                start = self.step_marks[k - 1]
            out.append(self.clock.ms(start, mark))
        return out


@dataclass
class RunOutput:
    latents: torch.Tensor  # final fp32 latents on CPU, [n, 16, H/8, W/8]
    images: list  # PIL images
    e2e_ms: float
    stats: dict
    recorder: Recorder


@contextlib.contextmanager
def _ours_forward_hook(transformer: ZImageTransformer, rec: Recorder, fault: float):
    had = "forward_with_context" in transformer.__dict__
    orig = transformer.forward_with_context

    def timed(*args, **kwargs):
        rec.forward_begin()
        out = orig(*args, **kwargs)
        if fault:
            out = [o * (1.0 + fault) for o in out]
        rec.forward_end()
        return out

    transformer.forward_with_context = timed
    try:
        yield
    finally:
        if had:
            transformer.forward_with_context = orig
        else:
            del transformer.forward_with_context


@contextlib.contextmanager
def _module_forward_hook(module: torch.nn.Module, rec: Recorder):
    pre = module.register_forward_pre_hook(lambda m, a: rec.forward_begin())
    post = module.register_forward_hook(lambda m, a, o: rec.forward_end())
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def _set_shift(pipe, shift: float) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    if float(pipe.scheduler.config.get("shift", 1.0)) != shift or pipe.scheduler.config.get("use_dynamic_shifting"):
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, shift=shift, use_dynamic_shifting=False
        )


@torch.no_grad()
def run(
    pair: Pair, cfg: Config, shape: Shape, *, seed: int, prompt: str, keep_steps: bool = False, clock=None
) -> RunOutput:
    """One generation of ``shape`` with ``cfg``: PIL images out, as a user gets them; marks recorded on the way."""
    clock = clock or Clock(pair.device)
    n = shape.batch
    if cfg.kind == "diffusers":
        rec = Recorder(clock, steps_per_seq=shape.steps, keep_steps=keep_steps)
        pipe = cfg.pipe
        _set_shift(pipe, shape.shift)

        def on_step(_pipe, i, t, kw):
            rec.final_latents = kw["latents"]
            rec.step_end(kw["latents"])
            return {}

        clock.sync()
        start = clock.mark()
        with _module_forward_hook(pipe.transformer, rec):
            images = pipe(
                prompt=prompt,
                width=shape.width,
                height=shape.height,
                num_inference_steps=shape.steps,
                guidance_scale=shape.cfg_scale - 1.0,  # diffusers' formulation: g = CFGScale − 1
                cfg_normalization=shape.cfg_normalization,
                cfg_truncation=1.0,
                num_images_per_prompt=n,
                generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)],
                output_type="pil",
                callback_on_step_end=on_step,
            ).images
        end = clock.mark()
        clock.sync()
        latents = rec.final_latents.detach().to("cpu", torch.float32)
        stats = {"forwards": len(rec.forwards), "forward_batch": n * (2 if shape.cfg else 1)}
    else:
        rec = Recorder(clock, steps_per_seq=shape.steps, keep_steps=keep_steps)
        ours = pair.ours if not cfg.quantize else _quantized(pair, cfg.quantize)
        if cfg.backend:
            ours.transformer.set_kernel_backend(cfg.backend)

        def on_step(info):
            rec.step_end(info["x"])

        clock.sync()
        start = clock.mark()
        with _ours_forward_hook(ours.transformer, rec, pair.fault):
            res = ours.generate(
                prompt,
                width=shape.width,
                height=shape.height,
                steps=shape.steps,
                cfg_scale=shape.cfg_scale,
                cfg_normalization=shape.cfg_normalization,
                cfg_truncation=1.0,
                shift=shape.shift,
                seed=seed,
                number_results=n,
                output_type="pil",
                cache=cfg.cache,
                batch_results=cfg.batch,
                step_callback=on_step,
            )
        end = clock.mark()
        clock.sync()
        latents, images = res.latents.float(), res.images
        stats = {
            "forwards": res.stats["forwards"],
            "forward_batch": (2 if shape.cfg else 1) * (n if res.stats.get("batched") else 1),
            "batched": bool(res.stats.get("batched")),
            "timings": res.stats.get("timings", {}),
        }
        if "cache" in res.stats:
            stats["cache"] = res.stats["cache"]
    return RunOutput(latents=latents, images=images, e2e_ms=clock.ms(start, end), stats=stats, recorder=rec)


def per_step_latents(rec: Recorder, shape: Shape, kind: str) -> list[torch.Tensor]:
    """Step-by-step latents [n, C, h, w] for step 0..steps−1, whatever order the pipeline produced them in (ours:
    result by result; diffusers: batched)."""
    if kind == "diffusers":
        return rec.step_latents
    n, s = shape.batch, shape.steps
    return [torch.cat([rec.step_latents[r * s + k] for r in range(n)]) for k in range(s)]


@torch.no_grad()
def decode_float(vae, latents: torch.Tensor, device) -> torch.Tensor:
    """Float images in [0, 1], [n, 3, H, W] on CPU, decoded one at a time by the shared VAE (no 8-bit rounding):
    what the image PSNR is computed on."""
    from zimage_core.pipeline import vae_decode

    out = [vae_decode(vae, latents[i : i + 1].to(device)).float() for i in range(latents.shape[0])]
    return torch.cat([(img / 2 + 0.5).clamp(0, 1).cpu() for img in out])
