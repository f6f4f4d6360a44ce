"""``infer``: run one ``imageInference`` task and build the spec's response objects.

Pluggable server pieces live in :class:`ServerConfig` (one per pipeline unless a call passes its own, see
:func:`default_config`): where ``URL`` outputs are stored, earlier outputs by imageUUID, async tasks, the price per
device-hour for ``includeCost``, a content checker for ``safety``, a face detector for ``ultralytics``, a LoRA
resolver. Anything a request asks for that is not configured is a :class:`RequestError` naming the field, never a
silent default.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.request
import uuid
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from .. import images as imgs
from ..cache import from_request
from ..errors import RequestError
from .outputs import FORMATS, LocalImageStore, OutputCache, data_uri, encode_image
from .request import validate_request

log = logging.getLogger("zimage_core.service")


@dataclass
class ServerConfig:
    image_store: LocalImageStore | None = None  # anything with put(image_uuid, data, extension, ttl) -> url
    price_per_device_hour: float | None = None  # USD; None: $ZIMAGE_PRICE_PER_DEVICE_HOUR or no cost field
    content_checker: Callable[[Image.Image], bool] | None = None  # returns True when NSFW
    face_detector: Callable | None = None  # image -> [(x0, y0, x1, y1, confidence)]
    lora_resolver: Callable[[str, str], object] | None = None  # (model id, field) -> LoRA weights
    http_timeout_s: float = 30.0
    tasks: dict = field(default_factory=dict)  # async tasks by taskUUID
    outputs: OutputCache = field(default_factory=OutputCache)  # earlier outputs by imageUUID (seedImage references)

    def price(self) -> float | None:
        if self.price_per_device_hour is not None:
            return self.price_per_device_hour
        env = os.environ.get("ZIMAGE_PRICE_PER_DEVICE_HOUR")
        return float(env) if env else None


_DEFAULT_CONFIGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DEFAULT_LOCK = threading.Lock()


def default_config(pipe) -> ServerConfig:
    """The service configuration a pipeline uses when a call passes none: one per pipeline, created on first use
    (it holds the async tasks and earlier outputs that later requests may reference)."""
    with _DEFAULT_LOCK:
        if pipe not in _DEFAULT_CONFIGS:
            _DEFAULT_CONFIGS[pipe] = ServerConfig()
        return _DEFAULT_CONFIGS[pipe]


def _http(method: str, url: str, data: bytes, content_type: str, timeout: float) -> None:
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the URL is the caller's own endpoint
        resp.read()


def infer(pipe, request: dict, config: ServerConfig | None = None) -> list[dict]:
    """Validate and run one imageInference task. Raises RequestError for invalid requests."""
    config = config or default_config(pipe)
    v = validate_request(
        request,
        model_defaults=pipe.defaults,
        has_checker=config.content_checker is not None,
        has_face_detector=config.face_detector is not None,
        lora_resolver=config.lora_resolver,
    )
    r = v.raw
    if r["deliveryMethod"] == "async":
        task = r["taskUUID"]
        config.tasks[task] = {"status": "processing"}

        def run():
            try:
                config.tasks[task] = {"status": "success", "data": _run(pipe, v, config)}
            except Exception as e:  # reported through get_response, not lost in a thread
                config.tasks[task] = {"status": "error", "error": f"{type(e).__name__}: {e}"}

        threading.Thread(target=run, daemon=True).start()
        return [{"taskType": "imageInference", "taskUUID": task, "status": "processing"}]
    return _run(pipe, v, config)


def get_response(config: ServerConfig, task_uuid: str) -> dict:
    """Poll an async task: {"status": "processing" | "success" | "error", "data": [...] | "error": str}."""
    if task_uuid not in config.tasks:
        raise RequestError("taskUUID", f"no async task {task_uuid}")
    return config.tasks[task_uuid]


def _run(pipe, v, config: ServerConfig) -> list[dict]:
    r = v.raw
    inputs = r.get("inputs", {})
    cache = None
    if v.cache is not None:
        cache = _step_cache(v, pipe)
    t0 = pipe._sync_time()
    kwargs = dict(
        negative_prompt=r.get("negativePrompt"),
        steps=v.steps,
        cfg_scale=v.cfg_scale,
        seed=r.get("seed"),  # absent: generate draws one
        scheduler=r["scheduler"],
        number_results=r["numberResults"],
        model=r["model"],
        cache=cache,
    )
    if "width" in r:
        kwargs.update(width=r["width"], height=r["height"])
    if "seedImage" in inputs:
        kwargs.update(
            seed_image=imgs.load_image(inputs["seedImage"], "inputs.seedImage", config.outputs),
            strength=r.get("strength"),
        )
    if "maskImage" in inputs:
        kwargs["mask_image"] = imgs.load_image(inputs["maskImage"], "inputs.maskImage", config.outputs)
    if "maskMargin" in r:
        kwargs["mask_margin"] = r["maskMargin"]
    if "outpaint" in r:
        kwargs["outpaint"] = r["outpaint"]
    if r.get("lora"):
        kwargs["loras"] = [
            (config.lora_resolver(lo["model"], f"lora[{i}].model"), lo["weight"], lo["transformer"])
            for i, lo in enumerate(r["lora"])
        ]
    try:
        result = pipe.generate(r["positivePrompt"], **kwargs)
    except RequestError as e:  # generate() names its own arguments; map them back to the request's fields
        raise RequestError(_REQUEST_FIELD.get(e.field, e.field), e.message) from None
    images = result.images
    if "ultralytics" in r:
        images = [_refine_faces(pipe, im, r, s, config) for im, s in zip(images, result.seeds)]
    device_seconds = pipe._sync_time() - t0

    price = config.price() if r["includeCost"] else None
    if r["includeCost"] and price is None:
        warnings.warn(
            "includeCost: no price per device-hour is configured (ServerConfig.price_per_device_hour or "
            "$ZIMAGE_PRICE_PER_DEVICE_HOUR), so the response has no cost field",
            stacklevel=2,
        )
    fmt, quality = r["outputFormat"], r["outputQuality"]
    responses = []
    for image, s in zip(images, result.seeds):
        image_uuid = str(uuid.uuid4())
        data = encode_image(image, fmt, quality)
        resp = {"taskType": "imageInference", "taskUUID": r["taskUUID"], "imageUUID": image_uuid, "seed": s}
        if r["outputType"] == "base64Data":
            resp["imageBase64Data"] = data_uri(data, fmt).split(",", 1)[1]
        elif r["outputType"] == "dataURI":
            resp["imageDataURI"] = data_uri(data, fmt)
        else:
            store = config.image_store or LocalImageStore()
            config.image_store = store
            resp["imageURL"] = store.put(image_uuid, data, FORMATS[fmt][2], r.get("ttl"))
        safety = r.get("safety", {})
        if safety.get("checkContent") or safety.get("mode") == "fast":
            resp["NSFWContent"] = bool(config.content_checker(image))
        if price is not None:
            resp["cost"] = round(device_seconds / len(images) * price / 3600, 8)
        if "uploadEndpoint" in r:
            try:
                _http("PUT", r["uploadEndpoint"], data, FORMATS[fmt][1], config.http_timeout_s)
            except Exception as e:
                raise RequestError("uploadEndpoint", f"upload (HTTP PUT) failed: {e}") from None
        config.outputs.put(image_uuid, image)
        responses.append(resp)
        if "webhookURL" in r:  # one POST per result, as it becomes available; failures are logged, not fatal
            try:
                _http("POST", r["webhookURL"], json.dumps(resp).encode(), "application/json", config.http_timeout_s)
            except Exception as e:
                log.warning("webhookURL %s: POST failed: %s", r["webhookURL"], e)
    return responses


def _refine_faces(pipe, image: Image.Image, r: dict, seed: int, config: ServerConfig) -> Image.Image:
    """ultralytics: detect faces with the configured detector, then inpaint each (box + maskPadding, feathered by
    maskBlur) at the working resolution with the refinement prompt, steps, CFG and strength, and paste it back."""
    from PIL import ImageDraw, ImageFilter

    u = r["ultralytics"]
    for x0, y0, x1, y1, conf in config.face_detector(image):
        if conf < u["confidence"]:
            continue
        pad = u["maskPadding"]
        box = (
            max(0, int(x0) - pad),
            max(0, int(y0) - pad),
            min(image.width, int(x1) + pad),
            min(image.height, int(y1) + pad),
        )
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        mask = Image.new("L", image.size, 0)
        ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
        if u["maskBlur"]:
            mask = mask.filter(ImageFilter.GaussianBlur(u["maskBlur"]))
        image = pipe.generate(
            u.get("positivePrompt") or r["positivePrompt"],
            negative_prompt=u.get("negativePrompt") or r.get("negativePrompt"),
            seed_image=image,
            mask_image=mask,
            mask_margin=32,
            strength=u["strength"],
            steps=u["steps"],
            cfg_scale=u["CFGScale"],
            seed=seed,
            scheduler=r["scheduler"],
            model=r["model"],
        ).images[0]
    return image


def _step_cache(v, pipe):
    return from_request(v.cache, v.cache_window, v.steps, pipe, preset=v.raw["model"])


# generate() argument -> request field, for errors raised inside generate()
_REQUEST_FIELD = {
    "prompt": "positivePrompt",
    "negative_prompt": "negativePrompt",
    "cfg_scale": "CFGScale",
    "number_results": "numberResults",
    "seed_image": "inputs.seedImage",
    "mask_image": "inputs.maskImage",
    "mask_margin": "maskMargin",
}
