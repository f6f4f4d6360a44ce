"""Validation of ``imageInference`` requests (the request API in README.md).

Every field of the spec is described once in :data:`SCHEMA` (type, range, default, enum); :func:`validate_request`
checks a request against it, applies the cross-field rules (width/height together, step windows, which options
need which inputs, ...) and returns a normalised copy with defaults filled in. Every failure is a
:class:`RequestError` whose ``field`` is the dotted path of the offending parameter and whose message gives the
allowed range.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..cache import METHODS, PRESETS, CacheConfig
from ..config import SEED_MAX
from ..controlnet.layouts import CONTROL_TYPES
from ..errors import RequestError, show
from ..scheduler_table import SCHEDULER_NAMES as SCHEDULERS

# matched with fullmatch: a trailing newline is not part of a UUID (``$`` would accept one)
UUID4_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", re.IGNORECASE)
URI_RE = re.compile(r"https?://[^\s/$.?#][^\s]*", re.IGNORECASE)
_MAX_NAME = 60  # an unknown field name longer than this is shown shortened
MAX_TTL_S = 365 * 24 * 3600  # ttl upper bound (the spec gives only the minimum, 60)


@dataclass(frozen=True)
class Field:
    kind: str  # int | float | bool | str | enum | uuid4 | uri | object | array
    required: bool = False
    default: Any = None
    lo: float | None = None
    hi: float | None = None
    multiple: int | None = None
    choices: tuple = ()
    min_len: int | None = None
    max_len: int | None = None
    fields: dict = field(default_factory=dict)  # for objects
    item: Field | None = None  # for arrays
    max_items: int | None = None


def _range_text(f: Field) -> str:
    if f.lo is not None and f.hi is not None:
        text = f"[{f.lo:g}, {f.hi:g}]"
    elif f.lo is not None:
        text = f">= {f.lo:g}"
    else:
        text = f"<= {f.hi:g}"
    return text + (f" in steps of {f.multiple}" if f.multiple else "")


WINDOW = {  # acceleratorOptions prefixes these with "cache" (cacheStartStep); controlNet uses them as startStep, ...
    "StartStep": Field("int", lo=0),
    "EndStep": Field("int", lo=1),
    "StartStepPercentage": Field("int", lo=0, hi=99),
    "EndStepPercentage": Field("int", lo=1, hi=100),
}


def _window_key(prefix: str, name: str) -> str:
    return prefix + name if prefix else name[0].lower() + name[1:]


SCHEMA: dict[str, Field] = {
    # API options
    "taskType": Field("enum", required=True, choices=("imageInference",)),
    "taskUUID": Field("uuid4", required=True),
    "outputType": Field("enum", default="URL", choices=("URL", "base64Data", "dataURI")),
    "outputFormat": Field("enum", default="JPG", choices=("JPG", "PNG", "WEBP")),
    "outputQuality": Field("int", default=95, lo=20, hi=99),
    "webhookURL": Field("uri"),
    "deliveryMethod": Field("enum", default="sync", choices=("sync", "async")),
    "uploadEndpoint": Field("uri"),
    "safety": Field("object", fields={
        "checkContent": Field("bool", default=False),
        "mode": Field("enum", default="none", choices=("none", "fast")),
    }),
    "ttl": Field("int", lo=60, hi=MAX_TTL_S),
    "includeCost": Field("bool", default=False),
    "numberResults": Field("int", default=1, lo=1, hi=20),
    "acceleratorOptions": Field("object", fields={
        **{f"cache{k}": v for k, v in WINDOW.items()},
        "cacheMaxConsecutiveSteps": Field("int", default=CacheConfig.max_consecutive, lo=1, hi=5),
        **{  # each step-cache method's switch and fields, from the cache registry (zimage_core/cache/registry.py)
            k: v
            for m in METHODS.values()
            for k, v in {
                m.switch: Field("bool", default=False),
                **{o.request: Field(o.kind, default=getattr(m.config, o.attr), lo=o.lo, hi=o.hi) for o in m.options},
            }.items()
        },
        "cachePreset": Field("enum", choices=tuple(PRESETS)),  # extension (not in the spec): a named cache preset
    }),
    # inputs
    "inputs": Field("object", fields={"seedImage": Field("str", min_len=1), "maskImage": Field("str", min_len=1)}),
    # generation parameters
    "model": Field("str", required=True, min_len=1),
    "positivePrompt": Field("str", required=True, min_len=2, max_len=3000),
    "negativePrompt": Field("str", min_len=2, max_len=3000),
    "width": Field("int", lo=128, hi=2048, multiple=16),
    "height": Field("int", lo=128, hi=2048, multiple=16),
    "seed": Field("int", lo=0, hi=SEED_MAX),
    "steps": Field("int", lo=1, hi=50),
    "scheduler": Field("enum", default="Default", choices=SCHEDULERS),
    "CFGScale": Field("float", lo=0, hi=20),
    "strength": Field("float", lo=0, hi=1),
    "maskMargin": Field("int", lo=32, hi=128),
    "outpaint": Field("object", fields={
        **{s: Field("int", lo=0, hi=4096) for s in ("top", "bottom", "left", "right")},
        "blur": Field("int", lo=0, hi=32),  # the clients' field: pixels of the original repainted along the seam
    }),
    "lora": Field("array", max_items=8, item=Field("object", fields={
        "model": Field("str", required=True, min_len=1),
        "weight": Field("float", default=1.0, lo=-4, hi=4),
        "transformer": Field("enum", default="both", choices=("high", "low", "both")),
    })),
    "controlNet": Field("array", max_items=8, item=Field("object", fields={
        "model": Field("str", required=True, min_len=1),
        "guideImage": Field("str", required=True, min_len=1),
        "weight": Field("float", default=1.0, lo=-4, hi=4),
        "controlMode": Field("enum", default="balanced", choices=("balanced", "controlnet", "prompt")),
        "controlType": Field("enum", choices=CONTROL_TYPES),  # ours, not in the spec: docs/controlnet-variants.md
        **{_window_key("", k): v for k, v in WINDOW.items()},
    })),
    "ultralytics": Field("object", fields={
        "CFGScale": Field("float", default=8.0, lo=0, hi=50),
        "confidence": Field("float", default=0.9, lo=0, hi=1),
        "maskBlur": Field("int", default=5, lo=0, hi=100),
        "maskPadding": Field("int", default=5, lo=0, hi=20),
        "negativePrompt": Field("str", min_len=2, max_len=3000),  # the main prompts' bounds
        "positivePrompt": Field("str", min_len=2, max_len=3000),
        "steps": Field("int", default=20, lo=1, hi=100),
        "strength": Field("float", default=0.3, lo=0, hi=1),
    }),
}  # fmt: skip


def _check(value, f: Field, path: str):
    """Type and range check of one value; returns the normalised value."""
    k = f.kind
    if k == "bool":
        if not isinstance(value, bool):
            raise RequestError(path, f"must be a boolean (true/false), got {show(value)}")
        return value
    if k == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                value = int(value)  # JSON clients often send 512.0
            else:
                raise RequestError(path, f"must be an integer {_range_text(f)}, got {show(value)}")
    elif k == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(path, f"must be a number {_range_text(f)}, got {show(value)}")
        try:
            value = float(value)  # an integer too large for a float (JSON 1e400 written out) overflows here
        except OverflowError:
            raise RequestError(path, f"must be a number {_range_text(f)}, got {show(value)}") from None
        if not math.isfinite(value):
            raise RequestError(path, f"must be a finite number {_range_text(f)}, got {show(value)}")
    if k in ("int", "float"):
        if (f.lo is not None and value < f.lo) or (f.hi is not None and value > f.hi):
            raise RequestError(path, f"must be {_range_text(f)}, got {show(value)}")
        if f.multiple and value % f.multiple:
            raise RequestError(path, f"must be a multiple of {f.multiple} ({_range_text(f)}), got {show(value)}")
        return value
    if k in ("str", "enum", "uuid4", "uri"):
        if not isinstance(value, str):
            raise RequestError(path, f"must be a string, got {type(value).__name__}")
        n = len(value)
        if (f.min_len is not None and n < f.min_len) or (f.max_len is not None and n > f.max_len):
            hi = f.max_len if f.max_len is not None else "inf"
            raise RequestError(path, f"length must be in [{f.min_len or 0}, {hi}] characters, got {n}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON "\ud800": a lone surrogate is not text
            raise RequestError(path, f"is not valid Unicode text (unpaired surrogate at character {e.start})") from None
        if k == "enum" and value not in f.choices:
            raise RequestError(path, _enum_message(value, f.choices))
        if k == "uuid4" and not UUID4_RE.fullmatch(value):
            raise RequestError(path, f"must be a UUID v4 (8-4-4-4-12 hex digits, version 4), got {show(value)}")
        if k == "uri" and not URI_RE.fullmatch(value):
            raise RequestError(path, f"must be an http(s) URI, got {show(value)}")
        return value
    if k == "object":
        if not isinstance(value, dict):
            raise RequestError(path, f"must be an object, got {type(value).__name__}")
        return _check_object(value, f.fields, path + ".")
    if k == "array":
        if not isinstance(value, list):
            raise RequestError(path, f"must be an array, got {type(value).__name__}")
        if f.max_items is not None and len(value) > f.max_items:
            raise RequestError(path, f"at most {f.max_items} entries, got {len(value)}")
        return [_check(v, f.item, f"{path}[{i}]") for i, v in enumerate(value)]
    raise AssertionError(k)


def _enum_message(value, choices) -> str:
    import difflib

    close = difflib.get_close_matches(value[:100], choices, n=3, cutoff=0.5) if len(value) <= 100 else []
    if not close:
        close = [c for c in choices if c.lower() == value.lower()]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    listed = ", ".join(choices) if len(choices) <= 8 else f"{len(choices)} allowed names, see the spec"
    return f"{show(value)} is not allowed ({listed}){hint}"


def _check_object(obj: dict, fields: dict[str, Field], prefix: str) -> dict:
    for key in obj:
        if not isinstance(key, str):  # Python callers: {1: ...}; JSON keys are always strings
            raise RequestError(prefix.rstrip(".") or "request", f"field names must be strings, got {show(key)}")
    unknown = sorted(k for k in obj if k not in fields)
    if unknown:
        import difflib

        name = unknown[0]
        close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6) if len(name) <= 100 else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        shown = name if len(name) <= _MAX_NAME and name.isprintable() else show(name)
        raise RequestError(prefix + shown, f"unknown field{hint}")
    out = {}
    for name, f in fields.items():
        if name not in obj or obj[name] is None:
            if f.required:
                raise RequestError(prefix + name, "is required")
            if f.default is not None:
                out[name] = f.default
            continue
        out[name] = _check(obj[name], f, prefix + name)
    return out


def resolve_window(opts: dict, prefix: str, steps: int, path: str) -> tuple[int, int] | None:
    """A half-open [start, end) step window from absolute or percentage bounds, or None if unset. Errors name the
    key the request actually used (``cacheEndStepPercentage`` when that was given)."""
    bounds, keys = {}, {}
    for b in ("Start", "End"):
        a, p = _window_key(prefix, f"{b}Step"), _window_key(prefix, f"{b}StepPercentage")
        if a in opts and p in opts:
            raise RequestError(f"{path}{a}", f"give either {a} or {p}, not both")
        if a in opts:
            bounds[b], keys[b] = opts[a], a
        elif p in opts:
            bounds[b], keys[b] = math.floor(opts[p] * steps / 100), p
    if not bounds:
        return None
    start, end = bounds.get("Start", 0), bounds.get("End", steps)
    if end > steps:
        raise RequestError(f"{path}{keys['End']}", f"must be <= steps ({steps}), got {show(end)}")
    if end < 1 and "End" in keys:  # an end percentage that rounds down to step 0: the end is at fault
        raise RequestError(
            f"{path}{keys['End']}",
            f"ends the window at step 0 of {steps} (floor({show(opts[keys['End']])} * {steps} / 100)); "
            "the end must be at least step 1",
        )
    if start >= end:
        if "End" in keys and (end <= 0 or "Start" not in keys):  # an end that rounds to step 0 is the end's fault
            raise RequestError(
                f"{path}{keys['End']}", f"must give an end step > the start step ({show(start)}), got {show(end)}"
            )
        msg = f"must be < the end step ({show(end)}), got start step {show(start)}"
        raise RequestError(f"{path}{keys['Start']}", msg)
    return start, end


@dataclass
class RequestArgs:
    raw: dict  # normalised request (defaults filled)
    steps: int
    cfg_scale: float
    cache: dict | None  # {"method": "fb"|"tea"|"db", ...} or {"preset": name} when a step cache is requested
    cache_window: tuple[int, int] | None


# The official clients' spellings of spec fields (docs/runware-protocol.md), mapped here so that every caller (the
# library's infer, the server) accepts them: acceleratorOptions.cacheDistance is the runware client's threshold of
# its fbcache (the spec's fbCacheThreshold); the JS client's top-level checkNSFW asks for the content check
# (safety.checkContent). Both spellings at once is an error naming the client's.
def _client_spellings(request: dict) -> tuple[dict, dict]:
    """The request in the spec's spelling, and {spec path: the client's path} for the fields that were renamed."""
    renamed = {}
    accel = request.get("acceleratorOptions")
    if isinstance(accel, dict) and accel.get("cacheDistance") is not None:
        if accel.get("fbCacheThreshold") is not None:
            raise RequestError(
                "acceleratorOptions.cacheDistance",
                "give either acceleratorOptions.cacheDistance or acceleratorOptions.fbCacheThreshold, not both",
            )
        accel = {k: v for k, v in accel.items() if k != "cacheDistance"} | {"fbCacheThreshold": accel["cacheDistance"]}
        request = {**request, "acceleratorOptions": accel}
        renamed["acceleratorOptions.fbCacheThreshold"] = "acceleratorOptions.cacheDistance"
    if "checkNSFW" in request:
        request = dict(request)
        value = request.pop("checkNSFW")
        if value is not None:
            if not isinstance(value, bool):
                raise RequestError("checkNSFW", f"must be a boolean (true/false), got {show(value)}")
            safety = request.get("safety")
            if safety is not None and not isinstance(safety, dict):
                raise RequestError("safety", f"must be an object, got {type(safety).__name__}")
            safety = dict(safety or {})
            if safety.get("checkContent") is not None and safety["checkContent"] != value:
                raise RequestError("checkNSFW", "give either checkNSFW or safety.checkContent, not both")
            safety["checkContent"] = value
            request["safety"] = safety
            renamed["safety.checkContent"] = "checkNSFW"
    return request, renamed


def validate_request(
    request, *, model_defaults, has_checker=False, has_face_detector=False, lora_resolver=None, controlnet_resolver=None
) -> RequestArgs:
    """Check a request dict against the spec; returns the normalised request. Raises RequestError."""
    if not isinstance(request, dict):
        raise RequestError("request", f"must be a JSON object, got {type(request).__name__}")
    request, renamed = _client_spellings(request)
    try:
        return _validate(request, model_defaults, has_checker, has_face_detector, lora_resolver, controlnet_resolver)
    except RequestError as e:  # name the field as the client spelled it
        if e.field in renamed:
            raise RequestError(renamed[e.field], e.message.replace(e.field, renamed[e.field])) from None
        raise


def _validate(request, model_defaults, has_checker, has_face_detector, lora_resolver, controlnet_resolver):
    r = _check_object(request, SCHEMA, "")
    try:
        defaults = model_defaults(r["model"])
    except RequestError:
        raise
    steps = r.get("steps", defaults.steps)
    cfg_scale = r.get("CFGScale", defaults.cfg_scale)

    if ("width" in r) != ("height" in r):
        raise RequestError("height" if "width" in r else "width", "width and height must be given together")
    inputs = r.get("inputs", {})
    seed_image = inputs.get("seedImage")
    if "maskImage" in inputs and seed_image is None:
        raise RequestError("inputs.maskImage", "needs inputs.seedImage (the image to inpaint)")
    if "maskMargin" in r and "maskImage" not in inputs:
        raise RequestError("maskMargin", "needs inputs.maskImage")
    if "outpaint" in r and seed_image is None:
        raise RequestError("outpaint", "needs inputs.seedImage (the image to extend)")
    if "strength" in r and seed_image is None:
        raise RequestError("strength", "only applies with inputs.seedImage (image-to-image, inpainting, outpainting)")
    if r["scheduler"] == "DPMSolverMultistepInverse" and seed_image is None:
        raise RequestError(
            "scheduler", "DPMSolverMultistepInverse inverts a seed image to noise: give inputs.seedImage"
        )
    if "ttl" in r and r["outputType"] != "URL":
        raise RequestError("ttl", f"only applies with outputType URL (got outputType {r['outputType']!r})")
    if r["deliveryMethod"] == "async" and r["numberResults"] < 1:
        raise RequestError("deliveryMethod", "async needs at least one result")

    safety = r.get("safety", {})
    if (safety.get("checkContent") or safety.get("mode") == "fast") and not has_checker:
        key = "checkContent" if safety.get("checkContent") else "mode"
        raise RequestError(f"safety.{key}", "no content checker is configured on this server")
    if "ultralytics" in r and not has_face_detector:
        raise RequestError("ultralytics", "no face detector is configured on this server")
    for i, lora in enumerate(r.get("lora", [])):
        if lora_resolver is None:
            raise RequestError(f"lora[{i}].model", "no LoRA store is configured on this server")
        lora_resolver(lora["model"], f"lora[{i}].model")
    for i, cn in enumerate(r.get("controlNet", [])):
        resolve_window(cn, "", steps, f"controlNet[{i}].")
        if controlnet_resolver is None:
            raise RequestError(f"controlNet[{i}].model", "no ControlNet store is configured on this server")
        controlnet_resolver(cn["model"], f"controlNet[{i}].model")

    accel = r.get("acceleratorOptions")
    cache, window = None, None
    if accel is not None:
        switches = {m.switch: m for m in METHODS.values()}
        on = [m for m in switches if accel.get(m)]
        if len(on) > 1:
            raise RequestError(f"acceleratorOptions.{on[1]}", f"only one step cache at a time (got {', '.join(on)})")
        # options given with a value; a cache switch set to false (its default) counts as not given
        given = {
            k for k, v in request["acceleratorOptions"].items() if v is not None and not (k in switches and v is False)
        }
        owners = {o.request: m.switch for m in METHODS.values() for o in m.options}
        preset = accel.get("cachePreset")
        if preset is not None and (on or given & set(owners) or "cacheMaxConsecutiveSteps" in given):
            key = sorted(on or given & {*owners, "cacheMaxConsecutiveSteps"})[0]
            raise RequestError(
                f"acceleratorOptions.{key}",
                f"cannot be combined with cachePreset ({preset!r} sets the method and its options; "
                f"give a preset or a method switch with its options)",
            )
        for key, owner in owners.items():
            if key in given and not accel.get(owner):
                raise RequestError(f"acceleratorOptions.{key}", f"has no effect without {owner}: true")
        window = resolve_window(accel, "cache", steps, "acceleratorOptions.")
        if preset is not None:
            cache = {"preset": preset}
        elif on:
            m = switches[on[0]]
            cache = {"method": m.name, "max_consecutive": accel["cacheMaxConsecutiveSteps"]}
            cache.update({o.attr: accel[o.request] for o in m.options})
        elif given - {"cacheMaxConsecutiveSteps"}:
            key = sorted(given)[0]
            raise RequestError(
                f"acceleratorOptions.{key}",
                f"has no effect without a step cache ({', '.join(switches)}: true, or cachePreset)",
            )
    return RequestArgs(r, steps, cfg_scale, cache, window)
