"""The imageInference request API: validation table, property-based requests, responses and delivery."""

import base64
import copy
import io
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.helpers import image_request
from zimage_core.errors import RequestError
from zimage_core.service import ServerConfig, get_response
from zimage_core.service.request import SCHEDULERS, SCHEMA

base_request = image_request


def png_b64(size=(128, 128), color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def mask_b64(size=(128, 128)) -> str:
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[32:96, 40:80] = 255
    buf = io.BytesIO()
    Image.fromarray(m).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


SEED = png_b64()

# (field the error must name, change to a valid request) — at least 40 distinct invalid requests
INVALID = [
    ("taskType", {"taskType": "imageUpscale"}),
    ("taskType", {"taskType": None}),
    ("taskUUID", {"taskUUID": "not-a-uuid"}),
    ("taskUUID", {"taskUUID": "123e4567-e89b-12d3-a456-426614174000"}),  # v1, not v4
    ("taskUUID", {"taskUUID": 12345}),
    ("model", {"model": "runware:flux@1"}),
    ("model", {"model": ""}),
    ("positivePrompt", {"positivePrompt": "a"}),
    ("positivePrompt", {"positivePrompt": "x" * 3001}),
    ("positivePrompt", {"positivePrompt": 42}),
    ("positivePrompt", {"positivePrompt": None}),
    ("negativePrompt", {"negativePrompt": "b"}),
    ("negativePrompt", {"negativePrompt": ["bad"]}),
    ("height", {"width": 512}),  # the missing one of the pair is named
    ("width", {"height": 512}),
    ("width", {"width": 520, "height": 512}),
    ("width", {"width": 112, "height": 512}),
    ("height", {"width": 512, "height": 2064}),
    ("width", {"width": "512", "height": 512}),
    ("width", {"width": 512.5, "height": 512}),
    ("steps", {"steps": 0}),
    ("steps", {"steps": 51}),
    ("steps", {"steps": True}),
    ("seed", {"seed": -1}),
    ("seed", {"seed": 2**63}),
    ("seed", {"seed": "7"}),
    ("CFGScale", {"CFGScale": 20.5}),
    ("CFGScale", {"CFGScale": -1}),
    ("CFGScale", {"CFGScale": float("nan")}),
    ("scheduler", {"scheduler": "Euler A"}),
    ("scheduler", {"scheduler": "DPMSolverMultistepInverse"}),
    ("numberResults", {"numberResults": 0}),
    ("numberResults", {"numberResults": 21}),
    ("outputType", {"outputType": "file"}),
    ("outputFormat", {"outputFormat": "TIFF"}),
    ("outputQuality", {"outputQuality": 19}),
    ("outputQuality", {"outputQuality": 100}),
    ("deliveryMethod", {"deliveryMethod": "stream"}),
    ("webhookURL", {"webhookURL": "ftp://example.com/hook"}),
    ("uploadEndpoint", {"uploadEndpoint": "not a url"}),
    ("ttl", {"ttl": 30, "outputType": "URL"}),
    ("ttl", {"ttl": 120}),  # base64Data output: ttl does not apply
    ("includeCost", {"includeCost": "yes"}),
    ("safety.mode", {"safety": {"mode": "strict"}}),
    ("safety.checkContent", {"safety": {"checkContent": True}}),  # no checker configured
    ("safety.colour", {"safety": {"colour": 1}}),
    ("strength", {"strength": 0.5}),  # no seed image
    ("strength", {"strength": 1.5, "inputs": {"seedImage": SEED}}),
    ("maskMargin", {"maskMargin": 16, "inputs": {"seedImage": SEED, "maskImage": mask_b64()}}),
    ("maskMargin", {"maskMargin": 64}),  # no mask
    ("inputs.maskImage", {"inputs": {"maskImage": mask_b64()}}),  # mask without seed image
    ("inputs.seedImage", {"inputs": {"seedImage": "definitely not base64!"}}),
    ("inputs.seedImage", {"inputs": {"seedImage": "https://example.com/a.png"}}),
    ("inputs.seedImage", {"inputs": {"seedImage": str(uuid.uuid4())}}),  # unknown earlier output
    ("inputs.seedImage", {"inputs": {"seedImage": base64.b64encode(b"not an image").decode()}}),
    ("inputs.other", {"inputs": {"other": "x"}}),
    ("outpaint", {"outpaint": {"top": 64}}),  # no seed image
    ("outpaint.top", {"outpaint": {"top": -16}, "inputs": {"seedImage": SEED}}),
    ("outpaint.middle", {"outpaint": {"middle": 16}, "inputs": {"seedImage": SEED}}),
    ("outpaint", {"outpaint": {"right": 64}, "width": 128, "height": 128, "inputs": {"seedImage": SEED}}),
    ("outpaint", {"outpaint": {"right": 8}, "inputs": {"seedImage": SEED}}),  # 136 px: not a multiple of 16
    ("acceleratorOptions.teaCache", {"acceleratorOptions": {"fbCache": True, "teaCache": True}}),
    ("acceleratorOptions.fbCacheThreshold", {"acceleratorOptions": {"fbCache": True, "fbCacheThreshold": 1.5}}),
    ("acceleratorOptions.fbCacheThreshold", {"acceleratorOptions": {"fbCacheThreshold": 0.3}}),  # cache off
    (
        "acceleratorOptions.cacheMaxConsecutiveSteps",
        {"acceleratorOptions": {"fbCache": True, "cacheMaxConsecutiveSteps": 6}},
    ),
    ("acceleratorOptions.cacheEndStep", {"steps": 10, "acceleratorOptions": {"fbCache": True, "cacheEndStep": 11}}),
    (
        "acceleratorOptions.cacheStartStep",
        {"steps": 10, "acceleratorOptions": {"fbCache": True, "cacheStartStep": 6, "cacheEndStep": 6}},
    ),
    (
        "acceleratorOptions.cacheStartStep",
        {"acceleratorOptions": {"fbCache": True, "cacheStartStep": 1, "cacheStartStepPercentage": 10}},
    ),
    (
        "acceleratorOptions.cacheEndStepPercentage",
        {"acceleratorOptions": {"dbCache": True, "cacheEndStepPercentage": 101}},
    ),
    ("acceleratorOptions.dbCacheSkipInterval", {"acceleratorOptions": {"dbCache": True, "dbCacheSkipInterval": 0}}),
    ("acceleratorOptions.cacheStartStep", {"acceleratorOptions": {"cacheStartStep": 2}}),  # no cache enabled
    ("acceleratorOptions.warp", {"acceleratorOptions": {"warp": True}}),
    ("lora", {"lora": {"model": "x"}}),
    ("lora[0].model", {"lora": [{"weight": 0.5}]}),
    ("lora[0].weight", {"lora": [{"model": "civitai:1@1", "weight": 5}]}),
    ("lora[0].transformer", {"lora": [{"model": "civitai:1@1", "transformer": "mid"}]}),
    ("lora[0].model", {"lora": [{"model": "civitai:1@1"}]}),  # no LoRA store configured
    ("controlNet[0].guideImage", {"controlNet": [{"model": "cn:1@1"}]}),
    ("controlNet[0].controlMode", {"controlNet": [{"model": "cn:1@1", "guideImage": SEED, "controlMode": "x"}]}),
    ("controlNet[0].endStep", {"steps": 8, "controlNet": [{"model": "cn:1@1", "guideImage": SEED, "endStep": 9}]}),
    ("controlNet[0].model", {"controlNet": [{"model": "cn:1@1", "guideImage": SEED}]}),  # not supported
    ("ultralytics.steps", {"ultralytics": {"steps": 0}}),
    ("ultralytics", {"ultralytics": {"steps": 10}}),  # no face detector configured
    ("promptWeighting", {"promptWeighting": "compel"}),  # unknown top-level field
]


def test_table_has_at_least_40_distinct_cases():
    assert len(INVALID) >= 40
    assert len({json.dumps(c, sort_keys=True) for _, c in INVALID}) == len(INVALID)


@pytest.mark.parametrize("field,change", INVALID, ids=[f"{i}-{f}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_request_names_the_field(tiny_pipe, field, change):
    with pytest.raises(RequestError) as e:
        tiny_pipe.infer(base_request(**change))
    assert e.value.field == field, str(e.value)
    assert isinstance(e.value, ValueError)
    assert str(e.value).startswith(field)


def test_messages_give_the_allowed_range(tiny_pipe):
    with pytest.raises(RequestError, match=r"\[1, 50\]"):
        tiny_pipe.infer(base_request(steps=99))
    with pytest.raises(RequestError, match=r"\[128, 2048\] in steps of 16"):
        tiny_pipe.infer(base_request(width=2050, height=512))
    with pytest.raises(RequestError, match="did you mean 'Euler a'"):
        tiny_pipe.infer(base_request(scheduler="Euler A"))
    with pytest.raises(RequestError, match="known: "):
        tiny_pipe.infer(base_request(model="nope"))


def _image(resp, key="imageBase64Data"):
    return Image.open(io.BytesIO(base64.b64decode(resp[key])))


def test_valid_request_response_fields(tiny_pipe):
    task = str(uuid.uuid4())
    out = tiny_pipe.infer(base_request(taskUUID=task, seed=7, numberResults=2, negativePrompt="blurry"))
    assert len(out) == 2
    for resp, seed in zip(out, (7, 8)):
        assert resp["taskType"] == "imageInference" and resp["taskUUID"] == task and resp["seed"] == seed
        assert uuid.UUID(resp["imageUUID"]).version == 4
        assert "cost" not in resp and "NSFWContent" not in resp
        assert _image(resp).size == (128, 128)
    assert out[0]["imageUUID"] != out[1]["imageUUID"]


def test_output_types_and_formats(tiny_pipe, tmp_path):
    cfg = ServerConfig()
    from zimage_core.service import LocalImageStore

    cfg.image_store = LocalImageStore(tmp_path)
    r = tiny_pipe.infer(base_request(outputType="URL", outputFormat="WEBP", seed=1), cfg)[0]
    assert r["imageURL"].startswith("file://") and r["imageURL"].endswith(".webp")
    assert Image.open(r["imageURL"][len("file://") :]).format == "WEBP"
    r = tiny_pipe.infer(base_request(outputType="dataURI", outputFormat="JPG", outputQuality=40, seed=1))[0]
    assert r["imageDataURI"].startswith("data:image/jpeg;base64,")
    r = tiny_pipe.infer(base_request(outputType="base64Data", outputFormat="PNG", seed=1))[0]
    assert _image(r).format == "PNG"


def test_ttl_removes_stored_outputs(tiny_pipe, tmp_path):
    from zimage_core.service import LocalImageStore

    store = LocalImageStore(tmp_path)
    cfg = ServerConfig(image_store=store)
    r = tiny_pipe.infer(base_request(outputType="URL", ttl=60, seed=2), cfg)[0]
    path = r["imageURL"][len("file://") :]
    import os
    import time

    assert os.path.exists(path)
    assert store.purge(now=time.time() + 61) == 1 and not os.path.exists(path)


def test_earlier_output_by_uuid_as_seed_image(tiny_pipe):
    first = tiny_pipe.infer(base_request(seed=3))[0]
    second = tiny_pipe.infer(base_request(seed=3, inputs={"seedImage": first["imageUUID"]}, strength=0.5))[0]
    assert _image(second).size == (128, 128)


def test_data_uri_seed_image_inpaint_and_outpaint(tiny_pipe):
    seed_uri = "data:image/png;base64," + SEED
    r = tiny_pipe.infer(base_request(inputs={"seedImage": seed_uri, "maskImage": mask_b64()}, maskMargin=32))[0]
    assert _image(r).size == (128, 128)
    r = tiny_pipe.infer(
        base_request(inputs={"seedImage": SEED}, outpaint={"left": 32, "top": 16}, width=160, height=144)
    )[0]
    assert _image(r).size == (160, 144)


def test_include_cost_with_and_without_price(tiny_pipe):
    r = tiny_pipe.infer(base_request(includeCost=True), ServerConfig(price_per_device_hour=3.6))[0]
    assert r["cost"] > 0
    with pytest.warns(UserWarning, match="no price"):
        r = tiny_pipe.infer(base_request(includeCost=True), ServerConfig())[0]
    assert "cost" not in r


def test_safety_checker_sets_nsfw_flag(tiny_pipe):
    cfg = ServerConfig(content_checker=lambda image: True)
    r = tiny_pipe.infer(base_request(safety={"checkContent": True}), cfg)[0]
    assert r["NSFWContent"] is True


class _Recorder(BaseHTTPRequestHandler):
    received = []

    def _handle(self):
        n = int(self.headers.get("Content-Length", 0))
        _Recorder.received.append((self.command, self.path, self.headers.get("Content-Type"), self.rfile.read(n)))
        self.send_response(200)
        self.end_headers()

    do_PUT = do_POST = _handle

    def log_message(self, *a):
        pass


@pytest.fixture
def http_server():
    _Recorder.received = []
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_webhook_and_upload_endpoint(tiny_pipe, http_server):
    from zimage_core.service.netpolicy import OutboundPolicy

    # outbound calls are off by default and loopback targets are refused: this test server enables both
    cfg = ServerConfig(outbound=OutboundPolicy(enabled=True, allow_private=True, ports=()))
    out = tiny_pipe.infer(
        base_request(numberResults=2, webhookURL=http_server + "/hook", uploadEndpoint=http_server + "/up/x.png"), cfg
    )
    puts = [r for r in _Recorder.received if r[0] == "PUT"]
    posts = [r for r in _Recorder.received if r[0] == "POST"]
    assert len(puts) == 2 and puts[0][2] == "image/png" and puts[0][3].startswith(b"\x89PNG")
    assert len(posts) == 2 and json.loads(posts[1][3])["imageUUID"] == out[1]["imageUUID"]


def test_async_delivery(tiny_pipe):
    cfg = ServerConfig()
    task = str(uuid.uuid4())
    ack = tiny_pipe.infer(base_request(taskUUID=task, deliveryMethod="async"), cfg)
    assert ack == [{"taskType": "imageInference", "taskUUID": task, "status": "processing"}]
    import time

    for _ in range(600):
        state = get_response(cfg, task)
        if state["status"] != "processing":
            break
        time.sleep(0.05)
    assert state["status"] == "success" and state["data"][0]["taskUUID"] == task


# ---- property-based: generated requests -------------------------------------------------------------------------


def _field_values(name, f):
    """A strategy of valid and invalid values for one top-level field (sizes and steps kept small to run fast)."""
    bad = st.sampled_from([None, "x", -5, 10**20, 3.5, [], {}, True])
    if name in ("width", "height"):
        return st.one_of(st.sampled_from([128, 144, 160]), st.integers(-10, 5000), bad)
    if name == "steps":
        return st.one_of(st.integers(1, 3), st.integers(-5, 80), bad)
    if name == "numberResults":
        return st.one_of(st.integers(1, 2), st.integers(-3, 30), bad)
    if name == "scheduler":
        return st.one_of(
            st.sampled_from(["Default", "Euler", "FlowMatchEulerDiscreteScheduler"]),
            st.sampled_from(SCHEDULERS),
            st.text(max_size=12),
        )
    if f.kind == "enum":
        return st.one_of(st.sampled_from(f.choices), st.text(max_size=8), bad)
    if f.kind == "bool":
        return st.one_of(st.booleans(), bad)
    if f.kind == "int":
        return st.one_of(st.integers(int(f.lo or 0) - 2, int(min(f.hi or 10**6, 10**6)) + 2), bad)
    if f.kind == "float":
        return st.one_of(st.floats(-5, 25), st.sampled_from([float("nan"), float("inf")]), bad)
    if f.kind in ("str", "uri", "uuid4"):
        return st.one_of(st.text(min_size=0, max_size=30), bad)
    return st.one_of(st.just({}), st.dictionaries(st.text(max_size=6), st.integers(), max_size=2), bad)


SKIP = {
    "taskType",
    "taskUUID",
    "model",
    "positivePrompt",
    "outputType",
    "deliveryMethod",
    "webhookURL",
    "uploadEndpoint",
    "inputs",
    "controlNet",
    "lora",
    "ultralytics",
}


@st.composite
def requests(draw):
    r = base_request(seed=draw(st.integers(0, 2**32)))
    names = [n for n in SCHEMA if n not in SKIP]
    for name in draw(st.lists(st.sampled_from(names), max_size=5, unique=True)):
        r[name] = draw(_field_values(name, SCHEMA[name]))
    if draw(st.booleans()):
        r["positivePrompt"] = draw(st.text(min_size=0, max_size=40))
    return r


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=requests())
def test_generated_requests_fail_cleanly_or_give_finite_images(tiny_pipe, req):
    try:
        out = tiny_pipe.infer(copy.deepcopy(req))
    except RequestError as e:
        top = e.field.split(".")[0].split("[")[0]
        assert top in SCHEMA or top in req, e.field
        return
    assert out, req
    for resp in out:
        arr = np.asarray(_image(resp)).astype(np.float64)
        assert np.isfinite(arr).all() and arr.max() > 0  # not all black


def test_ultralytics_refines_only_detected_faces(tiny_pipe):
    calls = []

    def detector(image):
        calls.append(image.size)
        return [(40, 30, 80, 70, 0.95), (0, 0, 10, 10, 0.2)]  # the second is below the confidence threshold

    cfg = ServerConfig(face_detector=detector)
    req = base_request(seed=21, numberResults=1)
    plain = np.asarray(_image(tiny_pipe.infer(req)[0])).astype(int)
    refined = np.asarray(
        _image(
            tiny_pipe.infer(
                {**req, "ultralytics": {"steps": 2, "strength": 0.6, "maskPadding": 4, "maskBlur": 0}}, cfg
            )[0]
        )
    ).astype(int)
    assert calls == [(128, 128)]
    box = np.zeros_like(plain, dtype=bool)
    box[30 - 4 : 70 + 4, 40 - 4 : 80 + 4] = True
    assert np.array_equal(refined[~box], plain[~box])  # outside the padded face box: untouched
    assert np.abs(refined[box] - plain[box]).mean() > 1  # inside: regenerated
