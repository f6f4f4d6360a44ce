"""zimage_core: a minimal sampling core for Z-Image.

request -> validation -> prompt encoding (once per request, with the context refiner) -> sampler loop over the
scheduler's sigmas -> cache policy -> transformer -> ops (torch reference or Triton) -> VAE -> encoded image.
"""

from .config import PRESETS, ZImageConfig
from .model import CaptionContext, ZImageTransformer, count_parameters
from .weights import CheckpointError, load_transformer

__all__ = [
    "PRESETS",
    "CaptionContext",
    "CheckpointError",
    "ZImageConfig",
    "ZImageTransformer",
    "count_parameters",
    "load_transformer",
]
