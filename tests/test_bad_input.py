"""Bad input at the library's edges: each case of the hostile-client campaign that once escaped as a non-RequestError,
was accepted but wrong, or was wrongly refused. Expected outcomes come from the spec and the documented limits."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from zimage_core import RequestError
from zimage_core import images as imgs


def _b64(im: Image.Image, fmt: str, **kw) -> str:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return base64.b64encode(buf.getvalue()).decode()


def _gradient(mode="RGB", size=(64, 48)) -> Image.Image:
    arr = (np.arange(size[0] * size[1] * 3).reshape(size[1], size[0], 3) % 251).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(arr, "RGB")


# ---- image decoding ------------------------------------------------------------------------------------------------


def test_lab_tiff_mask_decodes_to_a_convertible_mode():
    lab = _gradient().convert("LAB")
    for value in (_b64(lab, "TIFF"), lab):  # as a request string and as a Python caller's PIL image
        im = imgs.load_image(value, "inputs.maskImage")
        assert im.mode in ("RGB", "RGBA", "L")
        mask = im.convert("L")
        assert mask.size == (64, 48)


def test_mime_base64_with_line_breaks_is_accepted():
    im = _gradient()
    raw = base64.b64decode(_b64(im, "PNG"))
    mime = base64.encodebytes(raw).decode()  # 76-character lines joined by \n
    assert "\n" in mime.strip()
    crlf = mime.replace("\n", "\r\n")
    for value in (mime, crlf, "data:image/png;base64," + crlf):
        out = imgs.load_image(value, "inputs.seedImage")
        assert np.array_equal(np.asarray(out), np.asarray(im))


def _eps_bytes() -> bytes:
    return (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
        b"newpath 0 0 moveto 16 0 lineto 16 16 lineto closepath fill\nshowpage\n%%EOF\n"
    )


@pytest.mark.parametrize("fmt", ["EPS", "PPM", "TGA", "PCX", "ICO", "SGI", "IM"])
def test_formats_outside_the_allow_list_are_refused(fmt):
    if fmt == "EPS":
        raw = _eps_bytes()
    else:
        buf = io.BytesIO()
        _gradient(size=(16, 16)).save(buf, format=fmt)
        raw = buf.getvalue()
    with pytest.raises(RequestError) as e:
        imgs.load_image(base64.b64encode(raw).decode(), "inputs.seedImage")
    assert e.value.field == "inputs.seedImage" and "allowed formats" in e.value.message


def test_eps_never_reaches_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin

    def boom(*a, **k):
        raise AssertionError("Ghostscript was invoked")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", boom)
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    with pytest.raises(RequestError):
        imgs.load_image(base64.b64encode(_eps_bytes()).decode(), "inputs.seedImage")


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F", "LAB", "HSV"])
def test_every_mode_decodes_to_a_convertible_mode(mode):
    im = _gradient(mode if mode not in ("I;16",) else "I")
    if mode == "I;16":
        im = _gradient("I").convert("I;16")
    saved = 0
    for fmt in imgs.INPUT_FORMATS:
        try:
            value = _b64(im, fmt)
        except (OSError, ValueError, KeyError):
            continue  # this format cannot store this mode
        saved += 1
        out = imgs.load_image(value, "inputs.seedImage")
        assert out.mode in ("RGB", "RGBA", "L"), (mode, fmt, out.mode)
        out.convert("RGB"), out.convert("L")
    assert saved >= 1 or mode in ("HSV",)
    out = imgs.load_image(im, "inputs.seedImage")  # the PIL image itself
    out.convert("RGB"), out.convert("L")


# ---- requests through ZImage.default().infer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    import torch

    from zimage_core.pipeline import ZImage

    return ZImage.default(device="cpu", dtype=torch.float32)


def _req(**kw) -> dict:
    import uuid

    r = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "runware:z-image@0",
        "positivePrompt": "a red circle",
        "width": 128,
        "height": 128,
        "steps": 1,
        "seed": 3,
        "outputType": "base64Data",
        "outputFormat": "PNG",
    }
    r.update(kw)
    return r


def _refused(pipe, request, config=None) -> RequestError:
    with pytest.raises(RequestError) as e:
        pipe.infer(request, config)
    assert len(e.value.message) < 300, e.value.message[:300]
    return e.value


SEED_128 = _b64(_gradient(size=(128, 128)), "PNG")
HUGE = 10**400  # JSON: 1 followed by 400 zeros


@pytest.mark.parametrize(
    "field,patch",
    [
        ("CFGScale", {"CFGScale": HUGE}),
        ("strength", {"strength": -HUGE, "inputs": {"seedImage": SEED_128}}),
        ("acceleratorOptions.fbCacheThreshold", {"acceleratorOptions": {"fbCache": True, "fbCacheThreshold": HUGE}}),
        ("lora[0].weight", {"lora": [{"model": "x", "weight": HUGE}]}),
        ("ultralytics.CFGScale", {"ultralytics": {"CFGScale": HUGE}}),
        ("ttl", {"ttl": HUGE, "outputType": "URL"}),
        ("seed", {"seed": 10**5000}),  # more than 4,300 digits: str() of it raises
        ("width", {"width": 10**5000, "height": 128}),
    ],
)
def test_numbers_too_large_for_a_float_are_request_errors(pipe, tmp_path, monkeypatch, field, patch):
    monkeypatch.setenv("ZIMAGE_OUTPUT_DIR", str(tmp_path))
    assert _refused(pipe, _req(**patch)).field == field
    assert not list(tmp_path.iterdir())  # nothing generated and written before the refusal (ttl)


@pytest.mark.parametrize(
    "field,patch",
    [
        ("positivePrompt", {"positivePrompt": "a \ud800 circle"}),
        ("negativePrompt", {"negativePrompt": "no \udfff"}),
        ("ultralytics.positivePrompt", {"ultralytics": {"positivePrompt": "face \ud83d"}}),
    ],
)
def test_lone_surrogates_are_request_errors(pipe, field, patch):
    e = _refused(pipe, _req(**patch))
    assert e.field == field and "surrogate" in e.message


def test_sizes_past_the_rope_table_are_request_errors(pipe):
    max_w, max_h = pipe.max_image_size()
    assert (max_w, max_h) == (2560, 2560)  # axes_lens (.., 160, 160) x patch 2 x VAE 8 of the default model
    with pytest.raises(RequestError) as e:
        pipe.generate("a red circle", width=max_w + 16, height=128, steps=1)
    assert e.value.field == "width" and "RoPE" in e.value.message
    with pytest.raises(RequestError) as e:  # a caption longer than the table's 1504 tokens (a short one would run)
        pipe.generate("a red circle " * 800, width=128, height=128, steps=1, max_sequence_length=4096)
    assert e.value.field == "max_sequence_length"


def test_python_callers_non_string_keys(pipe):
    assert _refused(pipe, {**_req(), 1: 2}).field == "request"
    assert _refused(pipe, _req(acceleratorOptions={None: True})).field == "acceleratorOptions"


def test_huge_bad_values_are_not_echoed(pipe):
    e = _refused(pipe, _req(width="5" * 5_000_000, height=128))
    assert e.field == "width" and len(str(e)) < 200
    e = _refused(pipe, _req(scheduler="x" * 100_000))
    assert e.field == "scheduler" and len(str(e)) < 300
    e = _refused(pipe, _req(**{"y" * 100_000: 1}))
    assert len(e.field) < 100


def test_nan_or_huge_lora_weight_is_a_request_error(pipe):
    import torch

    from zimage_core.lora import LoraModule, LoraWeights

    dim = pipe.transformer.config.dim
    lw = LoraWeights("t", {"layers.0.attention.to_q": LoraModule(torch.zeros(2, dim), torch.zeros(dim, 2), 2.0)})
    for w in (float("nan"), float("inf"), 1e30, 10**400):
        with pytest.raises(RequestError) as e:
            pipe.generate("a red circle", steps=1, width=128, height=128, loras=[(lw, w, "both")])
        assert e.value.field == "lora[0].weight"


def test_nan_face_box_and_small_face_box(pipe):
    from zimage_core.service import ServerConfig

    boxes = [(float("nan"), 0, 10, 10, 0.99), (60, 60, 64, 64, 0.99)]  # a NaN box, then a 4x4 face
    cfg = ServerConfig(face_detector=lambda im: boxes)
    out = pipe.infer(_req(ultralytics={"steps": 1}), cfg)
    assert len(out) == 1 and out[0]["imageBase64Data"]


@pytest.mark.parametrize(
    "size,patch,field",
    [
        ((16, 16), {}, "inputs.seedImage"),
        ((2064, 128), {}, "inputs.seedImage"),
        ((2048, 128), {"outpaint": {"left": 64, "right": 64}}, "outpaint"),
    ],
)
def test_derived_sizes_outside_the_request_range_are_refused(pipe, size, patch, field):
    seed = _b64(_gradient(size=size), "PNG")
    req = _req(inputs={"seedImage": seed}, strength=0.5, **patch)
    del req["width"], req["height"]
    e = _refused(pipe, req)
    assert e.field == field and "[128, 2048]" in e.message


def test_small_strength_runs_one_step(pipe):
    seed = _gradient(size=(128, 128))
    res = pipe.generate("a red circle", seed_image=seed, strength=0.1, steps=4, output_type="latent")
    assert res.stats.steps == 1
    res = pipe.generate("a red circle", seed_image=seed, strength=0.0, steps=4, output_type="latent")
    assert res.stats.steps == 0  # strength 0: the seed image itself, no denoising


def test_mask_of_another_aspect_ratio_is_refused_same_aspect_resized(pipe):
    mask_other = _b64(Image.new("L", (128, 64), 255), "PNG")
    e = _refused(pipe, _req(inputs={"seedImage": SEED_128, "maskImage": mask_other}))
    assert e.field == "inputs.maskImage" and "aspect ratio" in e.message
    mask_half = _b64(Image.new("L", (64, 64), 255), "PNG")
    assert pipe.infer(_req(inputs={"seedImage": SEED_128, "maskImage": mask_half}))


def test_task_uuid_with_trailing_newline_is_refused(pipe):
    import uuid

    assert _refused(pipe, _req(taskUUID=str(uuid.uuid4()) + "\n")).field == "taskUUID"


def test_fb_cache_false_is_accepted(pipe):
    assert len(pipe.infer(_req(acceleratorOptions={"fbCache": False}))) == 1
    assert len(pipe.infer(_req(acceleratorOptions={"fbCache": False, "teaCache": False, "dbCache": False}))) == 1


def test_mime_base64_seed_image_in_a_request(pipe):
    mime = base64.encodebytes(base64.b64decode(SEED_128)).decode()
    assert len(pipe.infer(_req(inputs={"seedImage": mime}, strength=0.5))) == 1


def test_controlnet_uses_the_spec_key_spellings(pipe):
    e = _refused(pipe, _req(controlNet=[{"model": "cn", "guideImage": SEED_128, "startStep": 0, "endStep": 1}]))
    assert e.field == "controlNet[0].model"  # the keys are accepted; ControlNet itself is not configured
    e = _refused(pipe, _req(controlNet=[{"model": "cn", "guideImage": SEED_128, "StartStep": 0}]))
    assert e.field == "controlNet[0].StartStep" and "startStep" in e.message


def test_misnamed_fields_are_named_right(pipe):
    assert _refused(pipe, _req(safety={"mode": "fast"})).field == "safety.mode"
    assert _refused(pipe, _req(safety={"checkContent": True})).field == "safety.checkContent"
    e = _refused(
        pipe,
        _req(
            steps=4, acceleratorOptions={"fbCache": True, "cacheStartStepPercentage": 60, "cacheEndStepPercentage": 50}
        ),
    )
    assert e.field == "acceleratorOptions.cacheStartStepPercentage"
    e = _refused(pipe, _req(steps=4, acceleratorOptions={"fbCache": True, "cacheEndStepPercentage": 0}))
    assert e.field == "acceleratorOptions.cacheEndStepPercentage"


def test_local_paths_are_read_only_on_request(pipe, tmp_path):
    path = tmp_path / "seed.png"
    _gradient(size=(128, 128)).save(path)
    e = _refused(pipe, _req(inputs={"seedImage": str(path)}, strength=0.5))  # the service: never
    assert e.field == "inputs.seedImage"
    with pytest.raises(RequestError) as e:  # the library: only with read_paths=True
        pipe.generate("a red circle", seed_image=str(path), steps=1)
    assert e.value.field == "seed_image"
    assert pipe.generate("a red circle", seed_image=str(path), steps=1, strength=0.5, read_paths=True).images


def test_outbound_calls_off_by_default_in_the_library(pipe):
    assert _refused(pipe, _req(webhookURL="https://example.com/hook")).field == "webhookURL"
    assert _refused(pipe, _req(uploadEndpoint="https://example.com/put")).field == "uploadEndpoint"


def test_upload_failure_does_not_leak_the_remote_text(pipe):
    import socketserver
    import threading

    from zimage_core.service import ServerConfig
    from zimage_core.service.netpolicy import OutboundPolicy

    class H(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.recv(1 << 20)
            self.request.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 22\r\n\r\nSECRET internal banner")

    srv = socketserver.TCPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        cfg = ServerConfig(outbound=OutboundPolicy(enabled=True, allow_private=True, ports=()))
        e = _refused(pipe, _req(uploadEndpoint=f"http://127.0.0.1:{srv.server_address[1]}/x"), cfg)
        assert e.field == "uploadEndpoint" and "SECRET" not in e.message and "403" not in e.message
    finally:
        srv.shutdown()
        srv.server_close()


def test_async_tasks_through_infer(pipe):
    import time
    import uuid

    from zimage_core.service import ServerConfig, get_response, infer

    cfg = ServerConfig()
    task = str(uuid.uuid4())
    infer(pipe, _req(taskUUID=task, deliveryMethod="async"), cfg, owner="alice")
    e = _refused(pipe, _req(taskUUID=task, deliveryMethod="async"), cfg)  # reuse while held: refused
    assert e.field == "taskUUID"
    with pytest.raises(RequestError):
        get_response(cfg, task, owner="mallory")
    for _ in range(600):
        state = get_response(cfg, task, owner="alice")
        if state["status"] != "processing":
            break
        time.sleep(0.05)
    assert state["status"] == "success"


def test_generate_huge_or_odd_arguments_are_short_request_errors(pipe):
    cases = [
        ("cfg_scale", {"cfg_scale": 10**400}),
        ("steps", {"steps": 10**5000}),
        ("seed", {"seed": -(10**5000)}),
        ("scheduler", {"scheduler": "x" * 100_000}),
        ("model", {"model": "m" * 100_000}),
        ("shift", {"shift": float("nan")}),
    ]
    for field, kw in cases:
        with pytest.raises(RequestError) as e:
            pipe.generate("a red circle", width=128, height=128, **kw)
        assert e.value.field == field and len(str(e.value)) < 400, (field, str(e.value)[:400])
    assert _refused(pipe, _req(model="m" * 100_000)).field == "model"


def test_deeply_nested_python_values_are_request_errors(pipe):
    deep: dict = {}
    node = deep
    for _ in range(50_000):  # far past the recursion limit if anything recursed into it
        node["a"] = {}
        node = node["a"]
    for patch in ({"width": deep, "height": 128}, {"lora": [deep]}, {"safety": deep}, {"outpaint": {"top": [deep]}}):
        e = _refused(pipe, _req(**patch))
        assert e.field.split(".")[0].split("[")[0] in patch and len(str(e)) < 300


def test_huge_step_window_bounds_are_request_errors(pipe):
    """Found by the fuzz campaign: a window bound of more than 4,300 digits broke the error message itself."""
    e = _refused(pipe, _req(controlNet=[{"model": "x", "guideImage": SEED_128, "startStep": 10**5000, "endStep": 1}]))
    assert e.field == "controlNet[0].startStep"
    e = _refused(pipe, _req(acceleratorOptions={"fbCache": True, "cacheEndStep": 10**5000}))
    assert e.field == "acceleratorOptions.cacheEndStep"
