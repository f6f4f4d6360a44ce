"""A diffusers drop-in: change ``from diffusers import ZImagePipeline`` to
``from zimage_core.diffusers import ZImagePipeline``.

The classes here subclass diffusers' own (0.42.1) and keep their constructor, ``__call__`` / ``forward``
signatures, return types, folders and config names; our transformer, samplers, caches and kernels run underneath.
What is the same and what differs on purpose: docs/dropin.md.

This package is named ``diffusers`` inside ``zimage_core``; every import of the real library here is absolute
(``from diffusers import ...``), which always resolves to the top-level package.
"""

from .attention import ZImageAttnProcessor, set_fast_attention
from .controlnet import ZImageControlNetModel
from .transformer import ZImageTransformer2DModel


def __getattr__(name):  # the pipelines pull in transformers: import them lazily
    if name in ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline"):
        from . import pipelines

        return getattr(pipelines, name)
    if name in ("ZImageControlNetPipeline", "ZImageControlNetInpaintPipeline"):
        from . import controlnet_pipelines

        return getattr(controlnet_pipelines, name)
    raise AttributeError(name)


__all__ = [
    "ZImageAttnProcessor",
    "ZImageControlNetInpaintPipeline",
    "ZImageControlNetModel",
    "ZImageControlNetPipeline",
    "ZImageImg2ImgPipeline",
    "ZImageInpaintPipeline",
    "ZImagePipeline",
    "ZImageTransformer2DModel",
    "set_fast_attention",
]
