"""The server's one door into the library: load a model, validate a task, run it, remember an uploaded image.

Everything the server needs from ``zimage_core`` goes through these few functions, so the server does not depend on
how the library arranges its request API internally.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from ..images import MAX_INPUT_BYTES, MAX_INPUT_PIXELS, UUID_RE

__all__ = ["MAX_INPUT_BYTES", "MAX_INPUT_PIXELS", "is_image_uuid", "load", "validate", "fields", "run"]


def is_image_uuid(value: str) -> bool:
    return bool(UUID_RE.match(value))


def load(
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    kernels: str | None = None,
    quantize: str | None = None,
):
    """The pipeline the server runs: a diffusers-format folder, or the embedded default model."""
    import torch

    from ..pipeline import ZImage

    dt = getattr(torch, dtype) if dtype else None
    if model:
        return ZImage.from_pretrained(model, device=device, dtype=dt, kernel_backend=kernels, quantize=quantize)
    return ZImage.default(device=device, dtype=dt, kernel_backend=kernels, quantize=quantize)


def validate(pipe, task: dict):
    """Check one ``imageInference`` task (spec spelling); returns the validated task. Raises RequestError."""
    from .infer import default_config
    from .infer import validate as validate_task

    return validate_task(pipe, task, default_config(pipe))


def fields(valid) -> dict:
    """The validated task's fields (defaults filled in); the server may replace input images by decoded ones."""
    return valid.raw


def run(pipe, valid, image_store, step_callback: Callable | None = None) -> list[dict]:
    """Run a validated task; returns the response items. ``image_store.put(uuid, data, ext, ttl) -> url`` receives
    ``outputType: URL`` images; ``step_callback(info)`` is called after each sampler step (it may raise to abort)."""
    from dataclasses import replace

    from .infer import _run, default_config

    config = replace(default_config(pipe), image_store=image_store)
    target = _StepHook(pipe, step_callback) if step_callback is not None else pipe
    return _run(target, valid, config)


def remember_image(pipe, image_uuid: str, image: Image.Image) -> None:
    """Make an uploaded image usable as ``seedImage`` / ``maskImage`` by its imageUUID."""
    from .infer import default_config

    default_config(pipe).outputs.put(image_uuid, image)


class _StepHook:
    """The pipeline with a per-call step callback added to every ``generate`` call (for deadlines and aborts)."""

    def __init__(self, pipe, step_callback):
        self._pipe = pipe
        self._cb = step_callback

    def generate(self, *args, **kwargs):
        return self._pipe.generate(*args, step_callback=self._cb, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pipe, name)
