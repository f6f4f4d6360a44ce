"""zimage_core: a minimal sampling core for Z-Image (the library; the request API is ``zimage_core.service``).

generate: check arguments -> prompt encoding (once per request, with the context refiner) -> initial latents ->
sampler loop over the scheduler's sigmas -> denoiser (CFG) -> transformer, with hooks around its main layers (step
cache, ControlNet hints, ...) -> ops (torch reference or Triton) -> VAE.
"""

from .config import PRESETS, ZImageConfig
from .denoiser import GenerationStats
from .errors import RequestError
from .hooks import StackHook
from .model import CaptionContext, ZImageTransformer, count_parameters, load_transformer
from .weights import CheckpointError


def __getattr__(name):  # ZImage pulls in transformers/diffusers: import it lazily
    if name in ("ZImage", "GenerationResult", "Defaults", "MODEL_PRESETS"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = [
    "ZImage",
    "GenerationStats",
    "RequestError",
    "StackHook",
    "PRESETS",
    "CaptionContext",
    "CheckpointError",
    "ZImageConfig",
    "ZImageTransformer",
    "count_parameters",
    "load_transformer",
]
