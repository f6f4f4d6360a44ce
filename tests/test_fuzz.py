"""The standing fuzz campaign: hypothesis over the whole imageInference request schema (valid requests and requests
with hostile mutations) through ``ZImage.default().infer``, and corrupted images in every mode and format through the
image decoder and the input preparation.

The rule checked for every case: the outcome is either a response or a ``RequestError`` (never another exception),
and no generated image holds a NaN. The normal tier runs ``FUZZ_REQUESTS`` + ``FUZZ_IMAGES`` cases; the ``fuzz``
tier (``-m fuzz``, run by CTest and so by ``.ci/run``) ten times as many. The statistics are printed.
"""

from __future__ import annotations

import base64
import collections
import copy
import io
import os
import random
import time
import uuid

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from zimage_core import RequestError
from zimage_core import images as imgs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

FUZZ_REQUESTS = int(os.environ.get("ZIMAGE_FUZZ_REQUESTS", 2000))  # normal tier (the variable: quick local runs)
FUZZ_IMAGES = int(os.environ.get("ZIMAGE_FUZZ_IMAGES", 600))
SLOW_FACTOR = 10  # the fuzz tier: 20,000 requests, 6,000 images


# ---- the pipeline under test ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    import dataclasses

    from zimage_core.pipeline import ZImage

    pipe = ZImage.default(device="cpu", dtype=torch.float32)
    # requests that lose their "steps" run the preset's default: keep that cheap (2 steps) so the campaign's time
    # goes into many cases rather than into a few long generations
    pipe.presets = {k: dataclasses.replace(d, steps=2) for k, d in pipe.presets.items()}
    return pipe


class Watch:
    """Wraps ``pipe.generate`` to count generated images and NaN latents."""

    def __init__(self, pipe):
        self.images = 0
        self.nan = 0
        self._generate = pipe.generate
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            result = self._generate(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
        self.images += len(result.seeds)
        if not torch.isfinite(result.latents).all():
            self.nan += 1
        return result


def _face_detector(image):
    """A stand-in detector: an ordinary small box, a box past the image (low confidence: usually skipped), and
    (sometimes) a NaN box."""
    w, h = image.size
    boxes = [(w * 0.25, h * 0.25, w * 0.25 + 20, h * 0.25 + 24, 0.95), (-10, -10, w + 50, h + 50, 0.5)]
    if int(np.asarray(image)[0, 0, 0]) % 2:
        boxes.append((float("nan"), 0, 10, float("inf"), 0.97))
    return boxes


# ---- request strategies --------------------------------------------------------------------------------------------

HOSTILE = [
    None,
    True,
    False,
    -1,
    0,
    1,
    2**63,
    2**64 + 1,
    10**400,  # JSON 1 followed by 400 zeros: too large for a float
    -(10**400),
    float("nan"),
    float("inf"),
    -float("inf"),
    1e308,
    -0.0,
    0.5,
    1.5,
    "",
    " ",
    "\ud800",  # a lone surrogate
    "a\udfffb",
    "x" * 100_000,
    "NaN",
    "512",
    "\x00",
    "http://127.0.0.1:9/x",
    "file:///etc/passwd",
    "/etc/passwd",
    "../../etc/passwd.png",
    [],
    [1, 2],
    {},
    {"a": {"b": {"c": 1}}},
    {1: 2},  # a non-string key (Python callers)
    {None: "x"},
    "9" * 5000,  # int() of this has more than 4,300 digits
    10**5000,  # str() of this raises in Python >= 3.11
]


def _png(size, color, mode="RGB", fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _mask(size, box) -> str:
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[box[1] : box[3], box[0] : box[2]] = 255
    buf = io.BytesIO()
    Image.fromarray(m).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


SEED_IMAGES = [
    _png((128, 128), (200, 30, 30)),
    _png((144, 128), (10, 200, 30)),
    _png((16, 16), (1, 2, 3)),  # smaller than the size range
    _png((128, 2064), 5, "L"),  # taller than the size range
    _png((130, 131), (40, 50, 60), fmt="JPEG"),
    "data:image/png;base64," + _png((128, 128), 7, "L"),
    base64.encodebytes(base64.b64decode(_png((128, 128), (9, 9, 9)))).decode(),  # MIME line breaks
    _png((128, 128), (1, 2, 3), "RGB")[:-40],  # truncated
    "not base64 at all!",
]
MASKS = [
    _mask((128, 128), (32, 40, 96, 90)),
    _mask((64, 64), (10, 10, 30, 30)),  # another size, same aspect
    _mask((128, 64), (10, 10, 30, 30)),  # another aspect ratio
    _mask((128, 128), (0, 0, 0, 0)),  # empty
    _png((128, 128), 255, "L"),
]

text = st.text(min_size=2, max_size=40)
small_size = st.sampled_from([128, 144])


@st.composite
def valid_requests(draw):
    """A request inside the schema, with cheap generation settings (1-2 steps, small sizes)."""
    r = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1)), version=4)),
        "model": draw(st.sampled_from(["runware:z-image@0", "z-image-turbo", "zimage-fast:shapes-v1"])),
        "positivePrompt": draw(text),
        "steps": 1,
        "outputType": draw(st.sampled_from(["base64Data", "dataURI", "URL"])),
    }
    opt = draw(st.sets(st.sampled_from(OPTIONAL), max_size=5))
    if "size" in opt:
        r["width"], r["height"] = draw(small_size), draw(small_size)
    if "negativePrompt" in opt:
        r["negativePrompt"] = draw(text)
    if "seed" in opt:
        r["seed"] = draw(st.integers(0, 2**63 - 1))
    if "CFGScale" in opt:
        r["CFGScale"] = draw(st.floats(0, 20))
    if "scheduler" in opt:
        r["scheduler"] = draw(st.sampled_from(["Default", "Euler", "FlowMatchEulerDiscreteScheduler", "DPM++ 2M"]))
    if "numberResults" in opt:
        r["numberResults"] = draw(st.sampled_from([1, 1, 1, 2]))
    if "outputFormat" in opt:
        r["outputFormat"] = draw(st.sampled_from(["JPG", "PNG", "WEBP"]))
        r["outputQuality"] = draw(st.integers(20, 99))
    if "accel" in opt:
        method = draw(st.sampled_from(["fbCache", "teaCache", "dbCache"]))
        r["acceleratorOptions"] = {method: draw(st.booleans())}
        if draw(st.booleans()):
            r["acceleratorOptions"]["cacheStartStepPercentage"] = draw(st.integers(0, 99))
    if "seedImage" in opt:
        r["inputs"] = {"seedImage": draw(st.sampled_from(SEED_IMAGES))}
        if draw(st.booleans()):
            r["strength"] = draw(st.floats(0, 1))
        if draw(st.booleans()):
            r["inputs"]["maskImage"] = draw(st.sampled_from(MASKS))
            if draw(st.booleans()):
                r["maskMargin"] = draw(st.integers(32, 128))
        elif draw(st.booleans()):
            r["outpaint"] = {draw(st.sampled_from(["top", "bottom", "left", "right"])): draw(st.sampled_from([0, 16]))}
    if "safety" in opt:
        r["safety"] = draw(st.fixed_dictionaries({}, optional={"checkContent": st.booleans(), "mode": st.just("fast")}))
    if "ultralytics" in opt:
        r["ultralytics"] = {"steps": 1, "confidence": draw(st.floats(0, 1)), "positivePrompt": draw(text)}
    if "lora" in opt:
        r["lora"] = [{"model": draw(st.text(min_size=1, max_size=8)), "weight": draw(st.floats(-4, 4))}]
    if "controlNet" in opt:
        r["controlNet"] = [{"model": "x", "guideImage": SEED_IMAGES[0], "startStep": 0, "endStep": 1}]
    if "ttl" in opt:
        r["ttl"] = draw(st.integers(60, 10**6))
        r["outputType"] = "URL"
    if "includeCost" in opt:
        r["includeCost"] = draw(st.booleans())
    if "webhookURL" in opt:
        r["webhookURL"] = "http://127.0.0.1:9/hook"
    if "uploadEndpoint" in opt:
        r["uploadEndpoint"] = "http://127.0.0.1:9/put"
    return r


OPTIONAL = [
    "size",
    "negativePrompt",
    "seed",
    "CFGScale",
    "scheduler",
    "numberResults",
    "outputFormat",
    "accel",
    "seedImage",
    "seedImage",
    "safety",
    "ultralytics",
    "lora",
    "controlNet",
    "ttl",
    "includeCost",
    "webhookURL",
    "uploadEndpoint",
]
SCHEMA_KEYS = [
    "taskType", "taskUUID", "outputType", "outputFormat", "outputQuality", "webhookURL", "deliveryMethod",
    "uploadEndpoint", "safety", "ttl", "includeCost", "numberResults", "acceleratorOptions", "inputs", "model",
    "positivePrompt", "negativePrompt", "width", "height", "seed", "steps", "scheduler", "CFGScale", "strength",
    "maskMargin", "outpaint", "lora", "controlNet", "ultralytics",
]  # fmt: skip


def hostile(rnd):
    return copy.deepcopy(rnd.choice(HOSTILE))  # a fresh copy: later mutations must not change the pool


def _paths(obj, prefix=()):
    """Every (path) to a value inside a request, for mutation."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def _delete(obj, path):
    for p in path[:-1]:
        obj = obj[p]
    del obj[path[-1]]


@st.composite
def requests(draw):
    """A valid request with 0-3 hostile mutations: a value replaced, a key deleted, a key added. Which paths are
    mutated comes from a PRNG seeded by hypothesis (its own choices favour the first entries and zero)."""
    r = draw(valid_requests())
    rnd = random.Random(f"{draw(st.integers(0, 2**32))}:{r!r}")  # str seeds are hashed: well mixed streams
    for _ in range(rnd.choice([0, 1, 1, 1, 2, 3])):
        kind = rnd.choice(["replace", "replace", "replace", "delete", "add", "add_top"])
        paths = _paths(r)
        if not paths:
            break
        path = rnd.choice(paths)
        if kind == "replace":
            value = hostile(rnd) if rnd.random() < 0.7 else draw(st.integers() | st.floats() | text)
            _set(r, path, value)
        elif kind == "delete":
            _delete(r, path)
        elif kind == "add":
            parent = r
            for p in path[:-1]:
                parent = parent[p]
            if isinstance(parent, dict):
                parent[rnd.choice([*SCHEMA_KEYS, "startStep", "StartStep", "top", 1, "x"])] = hostile(rnd)
        else:
            r[rnd.choice(SCHEMA_KEYS)] = copy.deepcopy(rnd.choice([*HOSTILE, 128, 2048, 4096]))
    if rnd.random() < 0.01:
        r = hostile(rnd)  # not even an object
    return r


# ---- the campaign --------------------------------------------------------------------------------------------------


def _safe_repr(obj) -> str:
    """repr of a fuzzed request for the report (integers past Python's int-to-str limit are summarised)."""
    try:
        return repr(obj)[:600]
    except ValueError:
        return f"<request with keys {sorted(map(str, obj))[:20] if isinstance(obj, dict) else type(obj).__name__}>"


class Stats:
    def __init__(self, name):
        self.name = name
        self.cases = 0
        self.outcomes = collections.Counter()
        self.fields = collections.Counter()
        self.escapes = []
        self.t0 = time.perf_counter()

    def report(self, capsys, extra=""):
        secs = time.perf_counter() - self.t0
        top = ", ".join(f"{f} {n}" for f, n in self.fields.most_common(12))
        with capsys.disabled():
            print(
                f"\n[fuzz] {self.name}: {self.cases} cases in {secs:.1f} s; outcomes {dict(self.outcomes)}; "
                f"escapes {len(self.escapes)}{extra}\n[fuzz]   most refused fields: {top}"
            )
            for e in self.escapes[:5]:
                print(f"[fuzz]   ESCAPE {e}")


def _run_requests(pipe, n, capsys, tmp_path, monkeypatch):
    from zimage_core.service import ServerConfig

    monkeypatch.setenv("ZIMAGE_OUTPUT_DIR", str(tmp_path / "outputs"))
    watch = Watch(pipe)
    monkeypatch.setattr(pipe, "generate", watch)
    from zimage_core.service.netpolicy import OutboundPolicy

    # outbound calls enabled towards loopback, where nothing listens on the fuzzed port (9): the delivery paths run,
    # nothing is ever reached
    outbound = OutboundPolicy(enabled=True, allow_private=True, ports=(9,), deadline_s=0.5)
    config = ServerConfig(content_checker=lambda im: False, face_detector=_face_detector, outbound=outbound)
    stats = Stats(f"requests ({n} asked)")

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests())
    def case(request):
        stats.cases += 1
        try:
            out = pipe.infer(request, config)
        except RequestError as e:
            stats.outcomes["RequestError"] += 1
            stats.fields[str(e.field).split("[")[0].split(".")[0]] += 1
            if len(e.message) > 2000:
                stats.escapes.append(f"message of {len(e.message)} characters for field {e.field}")
            return
        except Exception as e:  # noqa: BLE001 - the property under test: nothing else may escape
            stats.escapes.append(f"{type(e).__name__}: {str(e)[:200]} <- {_safe_repr(request)}")
            return
        stats.outcomes["accepted"] += 1
        for resp in out:
            data = resp.get("imageBase64Data") or (resp.get("imageDataURI") or ",").split(",", 1)[1]
            if data and not np.asarray(Image.open(io.BytesIO(base64.b64decode(data)))).size:
                stats.escapes.append(f"empty image <- {_safe_repr(request)}")

    case()
    stats.report(capsys, f"; images generated {watch.images} in {watch.seconds:.1f} s; NaN latents {watch.nan}")
    assert stats.cases >= n
    assert not stats.escapes, stats.escapes[:5]
    assert watch.nan == 0
    assert stats.outcomes["accepted"] > n // 50, "the strategy should also produce valid requests"


def test_fuzz_requests(pipe, capsys, tmp_path, monkeypatch):
    _run_requests(pipe, FUZZ_REQUESTS, capsys, tmp_path, monkeypatch)


@pytest.mark.fuzz
@pytest.mark.slow
def test_fuzz_requests_campaign(pipe, capsys, tmp_path, monkeypatch):
    _run_requests(pipe, FUZZ_REQUESTS * SLOW_FACTOR, capsys, tmp_path, monkeypatch)


# ---- corrupted images ----------------------------------------------------------------------------------------------

MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F"]
FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM", "TGA", "ICO", "PCX", "SGI", "IM", "DIB", "EPS"]


def _encoded_pool() -> list[tuple[str, str, bytes]]:
    """(mode, format, bytes) for every mode/format pair Pillow can write."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), "RGB")
    pool = []
    for mode in MODES:
        try:
            im = base.convert(mode) if mode not in ("I;16", "PA") else base.convert("I" if mode == "I;16" else "P")
            im = im.convert(mode) if mode in ("I;16", "PA") else im
        except (ValueError, OSError):
            continue
        for fmt in FORMATS:
            buf = io.BytesIO()
            try:
                im.save(buf, format=fmt)
            except Exception:  # noqa: BLE001 - this format cannot hold this mode
                continue
            pool.append((mode, fmt, buf.getvalue()))
    return pool


POOL = _encoded_pool()


class _Pipe:
    """What prepare_inputs needs of a pipeline (size multiple and the VAE image processors), without a model."""

    size_multiple = 16

    def __init__(self):
        from diffusers.image_processor import VaeImageProcessor

        self.image_processor = VaeImageProcessor(vae_scale_factor=16)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=16, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0 and len(b) > 1:
        return bytes(b[: rng.randrange(1, len(b))])  # truncated
    if kind == 1:
        for _ in range(rng.randint(1, 16)):  # flipped bytes
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 2:
        start = rng.randrange(min(len(b), 64))  # header damage
        for i in range(start, min(len(b), start + rng.randint(1, 8))):
            b[i] ^= 0xFF
        return bytes(b)
    if kind == 3:
        return bytes(b) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 512)))  # trailing garbage
    if kind == 4:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 256)))  # random bytes
    return bytes(b)  # intact


def _run_images(n, capsys):
    rng = random.Random(1234)
    pipe = _Pipe()
    stats = Stats(f"images ({len(POOL)} mode/format pairs)")
    for i in range(n):
        mode, fmt, data = POOL[i % len(POOL)]
        raw = _corrupt(data, rng)
        value = base64.b64encode(raw).decode()
        stats.cases += 1
        try:
            im = imgs.load_image(value, "inputs.seedImage")
            assert im.mode in ("RGB", "RGBA", "L"), (mode, fmt, im.mode)
            as_mask = rng.random() < 0.5
            seed = im if as_mask else value
            mask = value if as_mask else None
            work = imgs.prepare_inputs(
                pipe,
                seed_image=seed.resize((128, 128)) if as_mask else seed,
                mask_image=mask,
                mask_margin=None,
                outpaint=None,
                width=128 if as_mask else None,
                height=128 if as_mask else None,
                default_size=(128, 128),
            )
            assert torch.isfinite(work.image).all()
            stats.outcomes[f"decoded {fmt}"] += 1
        except RequestError as e:
            stats.outcomes["RequestError"] += 1
            stats.fields[e.field] += 1
        except Exception as e:  # noqa: BLE001
            stats.escapes.append(f"{type(e).__name__}: {str(e)[:200]} <- {mode} {fmt}")
    stats.report(capsys)
    assert not stats.escapes, stats.escapes[:5]
    assert sum(v for k, v in stats.outcomes.items() if k.startswith("decoded")) > n // 10
    refused = {fmt for m, fmt, d in POOL if fmt not in imgs.INPUT_FORMATS}
    assert refused and not any(f"decoded {f}" in stats.outcomes for f in refused)


def test_pool_covers_every_mode_and_allowed_format():
    written = {m for m, _, _ in POOL}
    assert written >= set(MODES) - {"HSV"}, set(MODES) - written  # no Pillow writer stores HSV
    assert {f for _, f, _ in POOL} >= set(imgs.INPUT_FORMATS)


def test_fuzz_images(capsys):
    _run_images(FUZZ_IMAGES, capsys)


@pytest.mark.fuzz
@pytest.mark.slow
def test_fuzz_images_campaign(capsys):
    _run_images(FUZZ_IMAGES * SLOW_FACTOR, capsys)
