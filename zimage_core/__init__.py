"""zimage_core: a minimal sampling core for Z-Image.

request -> validation -> prompt encoding (once per request, with the context refiner) -> sampler loop over the
scheduler's sigmas -> cache policy -> transformer -> ops (torch reference or Triton) -> VAE -> encoded image.
"""

from .config import PRESETS, ZImageConfig
from .errors import RequestError
from .model import CaptionContext, ZImageTransformer, count_parameters
from .weights import CheckpointError, load_transformer


def __getattr__(name):  # ZImage pulls in transformers/diffusers: import it lazily
    if name in ("ZImage", "GenerationResult", "Defaults", "MODEL_PRESETS"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = [
    "ZImage",
    "RequestError",
    "PRESETS",
    "CaptionContext",
    "CheckpointError",
    "ZImageConfig",
    "ZImageTransformer",
    "count_parameters",
    "load_transformer",
]
