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
import math
import os
import threading
import uuid
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from .. import controlnet as cn_mod
from .. import images as imgs
from ..cache import from_request
from ..errors import RequestError
from . import netpolicy
from .netpolicy import OutboundPolicy
from .outputs import FORMATS, LocalImageStore, OutputCache, data_uri, encode_image
from .request import SCHEMA, RequestArgs, resolve_window, validate_request
from .taskregistry import TaskRegistry

log = logging.getLogger("zimage_core.service")


@dataclass
class ServerConfig:
    image_store: LocalImageStore | None = None  # anything with put(image_uuid, data, extension, ttl) -> url
    price_per_device_hour: float | None = None  # USD; None: $ZIMAGE_PRICE_PER_DEVICE_HOUR or no cost field
    content_checker: Callable[[Image.Image], bool] | None = None  # returns True when NSFW
    face_detector: Callable | None = None  # image -> [(x0, y0, x1, y1, confidence)]
    lora_resolver: Callable[[str, str], object] | None = None  # (model id, field) -> LoRA weights
    controlnet_resolver: Callable[[str, str], object] | None = None  # (model id, field) -> ControlNet; None: built-in
    outbound: OutboundPolicy = field(default_factory=OutboundPolicy)  # webhookURL / uploadEndpoint: off by default
    tasks: TaskRegistry = field(default_factory=TaskRegistry)  # async tasks: bounded, evicted, owner-bound
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


def validate(pipe, request: dict, config: ServerConfig) -> RequestArgs:
    """The one validation of an ``imageInference`` task against this pipeline and configuration."""
    return validate_request(
        request,
        model_defaults=pipe.defaults,
        has_checker=config.content_checker is not None,
        has_face_detector=config.face_detector is not None,
        lora_resolver=config.lora_resolver,
        controlnet_resolver=config.controlnet_resolver or cn_mod.store_for(pipe),
    )


def infer(pipe, request: dict, config: ServerConfig | None = None, owner=None) -> list[dict]:
    """Validate and run one imageInference task. Raises RequestError for invalid requests.

    ``owner``: an opaque identity of the caller (e.g. its API key's id); an async task can only be read back by the
    same owner (:func:`get_response`)."""
    config = config or default_config(pipe)
    v = validate(pipe, request, config)
    r = v.raw
    for key in ("uploadEndpoint", "webhookURL"):  # refused before any work when the policy does not allow it
        if key in r:
            netpolicy.check_target(r[key], key, config.outbound)
    if r["deliveryMethod"] == "async":
        task = r["taskUUID"]
        config.tasks.submit(task, owner, lambda: _run(pipe, v, config))
        return [{"taskType": "imageInference", "taskUUID": task, "status": "processing"}]
    return _run(pipe, v, config)


def get_response(config: ServerConfig, task_uuid: str, owner=None) -> dict:
    """Poll an async task: {"status": "processing" | "success" | "error", "data": [...] | "error": {...}}."""
    return config.tasks.get(task_uuid, owner)


def run_validated(pipe, v: RequestArgs, config: ServerConfig) -> list[dict]:
    """Run a task that :func:`validate` accepted and build its response items (no async or outbound delivery: the
    caller, e.g. the network server, does its own)."""
    return _run(pipe, v, config)


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
    # a size derived from a seed image or an outpainted canvas must also be in the request's width/height range
    kwargs["size_range"] = (int(SCHEMA["width"].lo), int(SCHEMA["width"].hi))
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
    if r.get("controlNet"):
        resolver = config.controlnet_resolver or cn_mod.store_for(pipe)
        kwargs["controlnets"] = _controlnets(r["controlNet"], v.steps, resolver, config)
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
    deadline = config.outbound.deadline()  # one deadline for every outbound call of this request
    webhook_ok = True
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
        if "uploadEndpoint" in r:  # the reason of a failure is logged; the client learns only that it failed
            if not netpolicy.deliver(
                "PUT", r["uploadEndpoint"], data, FORMATS[fmt][1], "uploadEndpoint", config.outbound, deadline
            ):
                raise RequestError("uploadEndpoint", "the upload (HTTP PUT) did not succeed")
        config.outputs.put(image_uuid, image)
        responses.append(resp)
        if "webhookURL" in r and webhook_ok:  # one POST per result; after a failure no more (logged, not fatal)
            webhook_ok = netpolicy.deliver(
                "POST", r["webhookURL"], json.dumps(resp).encode(), "application/json", "webhookURL",
                config.outbound, deadline,
            )  # fmt: skip
    return responses


def _controlnets(entries, steps: int, resolver, config: ServerConfig) -> list:
    """The validated ``controlNet[]`` entries as ``controlnet.ControlNetInput``s (guide images decoded here)."""
    out = []
    for i, e in enumerate(entries):
        name = f"controlNet[{i}]"
        model = resolver(e["model"], f"{name}.model")
        image = imgs.load_image(e["guideImage"], f"{name}.guideImage", config.outputs)
        start, end = resolve_window(e, "", steps, f"{name}.") or (None, None)
        out.append(
            cn_mod.ControlNetInput(
                model, image, e["weight"], start, end, e["controlMode"], field=name, control_type=e.get("controlType")
            )
        )
    return out


def _refine_faces(pipe, image: Image.Image, r: dict, seed: int, config: ServerConfig) -> Image.Image:
    """ultralytics: detect faces with the configured detector, then inpaint each (box + maskPadding, feathered by
    maskBlur) at the working resolution with the refinement prompt, steps, CFG and strength, and paste it back."""
    from PIL import ImageChops, ImageDraw, ImageFilter

    u = r["ultralytics"]
    for det in config.face_detector(image):
        try:
            x0, y0, x1, y1, conf = (float(v) for v in det)
        except (TypeError, ValueError):
            log.warning("ultralytics: the face detector returned a malformed box %r; ignored", det)
            continue
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1, conf)):
            log.warning("ultralytics: the face detector returned a non-finite box; ignored")
            continue
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
        if u["maskBlur"]:  # feather outwards only: the box itself stays fully repainted, however small it is
            mask = ImageChops.lighter(mask, mask.filter(ImageFilter.GaussianBlur(u["maskBlur"])))
        try:
            image = _refine_one(pipe, image, mask, u, r, seed)
        except RequestError as e:
            raise RequestError("ultralytics", f"face refinement failed: {e.message}") from None
    return image


def _refine_one(pipe, image, mask, u, r, seed):
    return pipe.generate(
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
    "seed": "seed",
}
