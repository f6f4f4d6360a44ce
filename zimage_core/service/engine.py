"""The server's one door into the library: load a model, validate a task, run it, remember an uploaded image.

Everything the network server (``zimage_core/server/``) needs from ``zimage_core`` goes through this module (the
layering test enforces it), so the server does not depend on how the library arranges its request API internally:
the error type, the outbound-call policy, the image caps, the playground's model list and the progress arithmetic
are re-exported or computed here.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from ..errors import RequestError
from ..images import MAX_INPUT_BYTES, MAX_INPUT_PIXELS, UUID_RE
from .netpolicy import OutboundError, OutboundPolicy, check_target
from .netpolicy import call as outbound_call
from .outputs import ImageStore

__all__ = [
    "MAX_INPUT_BYTES",
    "MAX_INPUT_PIXELS",
    "ImageStore",
    "OutboundError",
    "OutboundPolicy",
    "RequestError",
    "check_target",
    "configure",
    "fields",
    "is_image_uuid",
    "limit_remembered_images",
    "load",
    "model_menu",
    "outbound_call",
    "remember_image",
    "run",
    "run_steps",
    "validate",
]


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

    from .infer import default_config, run_validated

    config = replace(default_config(pipe), image_store=image_store)
    target = _StepHook(pipe, step_callback) if step_callback is not None else pipe
    return run_validated(target, valid, config)


def configure(pipe, *, lora_dir: str | None = None, content_checker=None, face_detector=None) -> None:
    """Give the server's pipeline a LoRA store (``<lora_dir>/<id>.safetensors``), a content checker (image -> True
    when NSFW; enables ``safety``) and a face detector (image -> boxes; enables ``ultralytics``)."""
    from ..lora import LoraStore
    from .infer import default_config

    config = default_config(pipe)  # the server's settings are the whole truth: what is not given is turned off
    config.lora_resolver = LoraStore(lora_dir) if lora_dir else None
    config.content_checker = content_checker
    config.face_detector = face_detector


def remember_image(pipe, image_uuid: str, image: Image.Image) -> None:
    """Make an uploaded image usable as ``seedImage`` / ``maskImage`` by its imageUUID."""
    from .infer import default_config

    default_config(pipe).outputs.put(image_uuid, image)


def run_steps(fields: dict, steps: int) -> int:
    """Steps a validated task's run executes: all of them, or the image-to-image tail
    ``steps - img2img_start(steps, strength)``."""
    from ..pipeline import DEFAULT_STRENGTH
    from ..schedules import img2img_start

    if "seedImage" not in fields.get("inputs", {}):
        return steps
    return steps - img2img_start(steps, fields.get("strength", DEFAULT_STRENGTH))


def model_menu(pipe=None) -> dict:
    """What a client may pick: ``schedulers`` (the API's names), ``models`` (id -> steps, CFGScale, width, height),
    ``defaultModel`` and ``examplePrompts`` (at most 8). ``pipe=None`` (still loading): the built-in presets."""
    from ..pipeline import MODEL_PRESETS
    from ..scheduler_table import SCHEDULER_NAMES

    presets = MODEL_PRESETS if pipe is None else pipe.presets
    models = {
        model_id: {"steps": d.steps, "CFGScale": d.cfg_scale, "width": d.width, "height": d.height}
        for model_id, d in presets.items()
    }
    return {
        "schedulers": list(SCHEDULER_NAMES),
        "models": models,
        "defaultModel": next(iter(presets)) if pipe is None else pipe.default_model,
        "examplePrompts": [] if pipe is None else list(getattr(pipe, "meta", {}).get("prompts", []))[:8],
    }


def limit_remembered_images(pipe, max_bytes: int) -> None:
    """Bound the decoded bytes of the images :func:`remember_image` keeps for this pipeline."""
    from .infer import default_config

    default_config(pipe).outputs.max_bytes = max_bytes


class _StepHook:
    """The pipeline with a per-call step callback added to every ``generate`` call (for deadlines and aborts)."""

    def __init__(self, pipe, step_callback):
        self._pipe = pipe
        self._cb = step_callback

    def generate(self, *args, **kwargs):
        return self._pipe.generate(*args, step_callback=self._cb, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pipe, name)
