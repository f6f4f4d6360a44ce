"""Issue 23 item 6: the official clients against the server. ``runware`` (0.5.24, WebSocket, in this venv),
``runware-sdk`` (1.8.0, REST and WebSocket, its own venv: see tests/test_server_sdk.py) and the JS client
``@runware/sdk-js`` (1.3.2, npm, installed into build/js on first use; Node from Debian).

Each test asserts what the client itself reports (its exceptions, its callbacks, its results), and counts what
reached the server, so that a retry or a second computation shows."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.server_helpers import ROOT, RawClient, ServerThread, server_process, task
from tests.test_server_sdk import sdk_python  # noqa: F401 - the fixture (runware-sdk in its own venv)
from zimage_core.service import engine

JS_SDK = "@runware/sdk-js@1.3.2"
T = {"taskType": "imageInference", "model": "runware:z-image@0", "width": 128, "height": 128, "steps": 2}


def _count_dispatch(service) -> list[str]:
    """Record the taskType of every task the server is handed (REST and WebSocket), in order."""
    seen: list[str] = []
    real = service.dispatch

    async def counting(owner, item, conn):
        seen.append(item.get("taskType"))
        return await real(owner, item, conn)

    service.dispatch = counting
    return seen


def _failing_run(monkeypatch, prompt: str = "please fail") -> list[int]:
    """engine.run raises for tasks with ``prompt`` (a fault inside the task); returns the list of such runs."""
    runs: list[int] = []
    real = engine.run

    def run(pipe, valid, store, step_callback=None):
        if valid.raw["positivePrompt"] == prompt:
            runs.append(1)
            raise RuntimeError("a fault inside the model call")
        return real(pipe, valid, store, step_callback)

    monkeypatch.setattr(engine, "run", run)
    return runs


def _py(python: str, script: str, *args: str, cwd: Path, timeout: float = 240) -> dict:
    path = cwd / "client.py"
    path.write_text(textwrap.dedent(script))
    r = subprocess.run([python, str(path), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- runware-sdk: failures over REST are not retried; progress reaches on_progress ------------------------------
SDK_FAIL = """
    import asyncio, json, sys
    from runware import Runware

    BASE = sys.argv[1]
    T = json.loads(sys.argv[2])

    async def main():
        out = {}
        async with Runware(api_key="k", transport="rest", http_base_url=BASE, timeout=60000) as c:
            for delivery in ("sync", "async"):
                try:
                    await c.run({**T, "positivePrompt": "please fail", "deliveryMethod": delivery, "seed": 1})
                    out[delivery] = "no error"
                except Exception as e:
                    out[delivery] = {"status": getattr(e, "status_code", None), "type": type(e).__name__,
                                     "message": str(e)[:300]}
        print(json.dumps(out))

    asyncio.run(main())
"""


def test_runware_sdk_sends_a_failing_task_once_over_rest(sdk_python, tiny_pipe, tmp_path, monkeypatch):  # noqa: F811
    runs = _failing_run(monkeypatch)
    with ServerThread(tiny_pipe, api_keys=["k"]) as s:
        seen = _count_dispatch(s.service)
        out = _py(sdk_python, SDK_FAIL, f"{s.base}/v1", json.dumps(T), cwd=tmp_path)
    # the client reports the failure (HTTP 422, not 5xx) ...
    for delivery in ("sync", "async"):
        assert out[delivery]["status"] == 422 and out[delivery]["message"] == "the task failed inside the server", out
    # ... after sending each task once and polling the failed async task once: no retries, no second run
    assert seen == ["imageInference", "imageInference", "getResponse"], seen
    assert len(runs) == 2


SDK_PROGRESS = """
    import asyncio, json, sys
    from runware import Runware, RunOptions

    WS = sys.argv[1]
    T = json.loads(sys.argv[2])

    async def main():
        seen = []
        async with Runware(api_key="k", transport="websocket", ws_base_url=WS, timeout=60000) as c:
            task = {**T, "positivePrompt": "a red circle", "steps": 4, "includeProgress": True,
                    "deliveryMethod": "sync", "seed": 3}
            r = await c.run(task, RunOptions(on_progress=lambda item: seen.append(item.get("progress"))))
        print(json.dumps({"progress": seen, "seeds": [x["seed"] for x in r]}))

    asyncio.run(main())
"""


def test_runware_sdk_progress_callback_gets_numbers(sdk_python, tiny_pipe, tmp_path):  # noqa: F811
    with ServerThread(tiny_pipe, api_keys=["k"]) as s:
        out = _py(sdk_python, SDK_PROGRESS, s.ws_url.removesuffix("/v1") + "/v1", json.dumps(T), cwd=tmp_path)
    # 4 steps of one result: 25 %, 50 %, 75 %, 100 % (the callback fires only for items whose progress is a number)
    assert out["progress"] == [25.0, 50.0, 75.0, 100.0], out
    assert out["seeds"] == [3]


# ---- durable async results: a restart (in-process, and a real SIGTERM) keeps them answerable -------------------
SDK_ASYNC = """
    import asyncio, json, sys
    from runware import Runware

    BASE, MODE = sys.argv[1], sys.argv[2]
    T = json.loads(sys.argv[3])

    async def main():
        async with Runware(api_key="k", transport="rest", http_base_url=BASE, timeout=60000) as c:
            if MODE == "submit":  # default delivery over REST: async + getResponse polls
                r = await c.run({**T, "positivePrompt": "a red circle", "seed": 8, "outputType": "URL",
                                 "outputFormat": "PNG"})
            else:
                r = await c.get_response({"taskUUID": MODE})
        print(json.dumps(r))

    asyncio.run(main())
"""


def test_async_result_survives_a_restart_runware_sdk(sdk_python, tiny_pipe, tmp_path):  # noqa: F811
    results = tmp_path / "results"
    with ServerThread(tiny_pipe, api_keys=["k"], results_dir=str(results)) as s:
        first = _py(sdk_python, SDK_ASYNC, f"{s.base}/v1", "submit", json.dumps(T), cwd=tmp_path)
    assert len(first) == 1 and first[0]["seed"] == 8
    with ServerThread(tiny_pipe, api_keys=["k"], results_dir=str(results)) as s2:  # a new process state, new port
        assert len(s2.service.registry) == 0
        again = _py(sdk_python, SDK_ASYNC, f"{s2.base}/v1", first[0]["taskUUID"], json.dumps(T), cwd=tmp_path)
        url = again[0]["imageURL"]
        name = url.rsplit("/", 1)[-1]
        with urllib.request.urlopen(f"{s2.base}/image/{name}", timeout=10) as r:  # the URL output answers too
            png = r.read()
    assert [(x["taskUUID"], x["imageUUID"], x["seed"], x["status"]) for x in again] == [
        (first[0]["taskUUID"], first[0]["imageUUID"], 8, "success")
    ]
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def _post(base: str, tasks: list[dict], key: str = "k") -> tuple[int, dict]:
    req = urllib.request.Request(
        f"{base}/v1", json.dumps(tasks).encode(), {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_async_result_survives_sigterm_of_the_server_process(tmp_path):
    results = str(tmp_path / "results")
    t = task(deliveryMethod="async", seed=21)
    with server_process("--results-dir", results, "--api-keys", _keys(tmp_path)) as (proc, base, _):
        status, ack = _post(base, [t])
        assert status == 200 and ack["data"][0]["status"] == "processing"
        for _ in range(240):
            status, body = _post(base, [{"taskType": "getResponse", "taskUUID": t["taskUUID"]}])
            if body.get("data") and body["data"][0].get("status") == "success":
                break
        before = body["data"][0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    with server_process("--results-dir", results, "--api-keys", _keys(tmp_path)) as (proc, base, _):
        status, body = _post(base, [{"taskType": "getResponse", "taskUUID": t["taskUUID"]}])
        status_other, other = _post(base, [{"taskType": "getResponse", "taskUUID": t["taskUUID"]}], key="k2")
    assert status == 200 and body["data"] == [before]
    assert before["seed"] == 21 and base64.b64decode(before["imageBase64Data"])[:4] == b"\x89PNG"
    assert status_other == 404 and other["errors"][0]["code"] == "taskNotFound"  # still bound to its key


def _keys(tmp_path: Path) -> str:
    path = tmp_path / "keys.txt"
    path.write_text("k\nk2\n")
    return str(path)


def test_durable_store_is_bounded_in_count_and_bytes(tmp_path):
    from zimage_core.server.durable import ResultStore

    store = ResultStore(tmp_path, max_items=3, max_bytes=10**9)
    uuids = [str(uuid.uuid4()) for _ in range(5)]
    for u in uuids:
        store.put("o", u, "fp", [{"taskUUID": u}], None)
    assert len(store) == 3 and [store.get("o", u) is not None for u in uuids] == [False, False, True, True, True]
    assert len(list(tmp_path.glob("*.json"))) == 3  # evicted records are deleted, not only forgotten
    small = ResultStore(tmp_path / "b", max_items=100, max_bytes=5000)
    for u in uuids:
        small.put("o", u, "fp", [{"imageBase64Data": "x" * 1500}], None)
    assert small.bytes <= 5000 and small.get("o", uuids[-1]) is not None and small.get("o", uuids[0]) is None
    assert not small.put("o", str(uuid.uuid4()), "fp", [{"imageBase64Data": "x" * 6000}], None)  # too big alone
    reopened = ResultStore(tmp_path / "b", max_items=1, max_bytes=5000)  # bounds apply to what a restart finds
    assert len(reopened) == 1 and reopened.get("o", uuids[-1]) is not None


# ---- a resumed connectionSessionUUID gets its in-flight result, computed once ----------------------------------
def test_resumed_session_gets_the_in_flight_result_on_the_new_socket(tiny_pipe):
    with ServerThread(tiny_pipe) as s:
        runs = []
        real = s.service.queue  # counted below through the queue's completed counter

        async def go():
            old = await RawClient(s.ws_url).__aenter__()
            session = old.auth["data"][0]["connectionSessionUUID"]
            t = task(steps=30, width=384, height=384, seed=5)
            await old.send([t])
            for _ in range(200):  # until the model runs it
                if s.service.queue.running is not None:
                    break
                await asyncio.sleep(0.05)
            before = real.completed
            await old.__aexit__(None, None, None)  # the connection drops mid-task
            async with RawClient(s.ws_url, ping_every=None) as new:
                await new.send([{"taskType": "authentication", "apiKey": "test-key", "connectionSessionUUID": session}])
                auth = await new.recv()
                got = await new.collect({t["taskUUID"]}, {}, timeout=120)
            runs.append(real.completed - before)
            return session, auth, t, got

        session, auth, t, got = asyncio.run(go())
    assert auth["data"][0]["connectionSessionUUID"] == session
    items = got[t["taskUUID"]]
    assert len(items) == 1 and items[0]["seed"] == 5 and "imageUUID" in items[0], items
    assert runs == [1]  # the model ran it once: the result moved, nothing was recomputed


# ---- the clients' spellings: runware 0.5.24 (outpaint.blur, cacheDistance) --------------------------------------
def test_runware_client_spellings_are_mapped(tiny_pipe):
    from runware import IAcceleratorOptions, IImageInference, IOutpaint, Runware, RunwareAPIError

    seed_png = _png(128, 128)
    with ServerThread(tiny_pipe) as s:

        async def go():
            c = Runware(api_key="any-key", url=s.ws_url)
            await c.connect()
            base = dict(positivePrompt="a red circle", model="runware:z-image@0", steps=4, seed=2, numberResults=1,
                        outputType="base64Data", outputFormat="PNG")  # fmt: skip
            out = {}
            accel = IAcceleratorOptions(fbcache=True, cacheDistance=0.5)
            req = IImageInference(**base, width=128, height=128, acceleratorOptions=accel)
            r = await c.imageInference(requestImage=req)
            out["cacheDistance"] = r[0].imageBase64Data
            for name, kw in {
                "bad_distance": dict(acceleratorOptions=IAcceleratorOptions(fbcache=True, cacheDistance=1.5),
                                     width=128, height=128),
                "bad_blur": dict(seedImage=seed_png, outpaint=IOutpaint(top=16, blur=33), strength=0.9),
            }.items():  # fmt: skip
                try:
                    await c.imageInference(requestImage=IImageInference(**base, **kw))
                    out[name] = "accepted"
                except RunwareAPIError as e:
                    out[name] = e.error_data.get("parameter") if hasattr(e, "error_data") else str(e)
            r = await c.imageInference(
                requestImage=IImageInference(
                    **base, seedImage=seed_png, outpaint=IOutpaint(top=16, blur=8), strength=0.9
                )  # fmt: skip
            )
            out["blur_size"] = _png_size(r[0].imageBase64Data)
            await c.disconnect()
            return out

        out = asyncio.run(go())
        # the reference: the same request in the spec's own spelling, over REST
        ref = task(steps=4, seed=2, acceleratorOptions={"fbCache": True, "fbCacheThreshold": 0.5})
        status, body = _post(s.base, [ref], key="any-key")
    assert status == 200 and out["cacheDistance"] == body["data"][0]["imageBase64Data"]
    assert "acceleratorOptions.cacheDistance" in str(out["bad_distance"]), out["bad_distance"]
    assert "outpaint.blur" in str(out["bad_blur"]), out["bad_blur"]
    assert out["blur_size"] == (128, 144)


def test_outpaint_blur_repaints_a_band_of_the_original():
    import numpy as np
    from PIL import Image

    from zimage_core import images as imgs

    class P:  # what prepare_inputs needs of a pipeline
        size_multiple = 16
        from diffusers.image_processor import VaeImageProcessor

        image_processor = VaeImageProcessor(vae_scale_factor=16)
        mask_processor = VaeImageProcessor(vae_scale_factor=16, do_normalize=False, do_binarize=True,
                                           do_convert_grayscale=True)  # fmt: skip

    seed = Image.new("RGB", (128, 128), (200, 30, 30))
    masks = {}
    for blur in (0, 8):
        work = imgs.prepare_inputs(P, seed_image=seed, mask_image=None, mask_margin=None,
                                   outpaint={"top": 16, "left": 32, "blur": blur}, width=None, height=None,
                                   default_size=(128, 128))  # fmt: skip
        masks[blur] = work.mask[0, 0].numpy() > 0.5
    m0, m8 = masks[0], masks[8]
    assert m0.shape == m8.shape == (144, 160)
    assert m0[:16].all() and m0[:, :32].all() and not m0[16:, 32:].any()  # blur 0: exactly the new margins
    assert m8[:24].all() and m8[:, :40].all() and not m8[24:, 40:].any()  # blur 8: and 8 px of the original
    assert np.array_equal(m8 & m0, m0)


def _png(w: int, h: int) -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (30, 120, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _png_size(b64: str) -> tuple[int, int]:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).size


# ---- the JS client: checkNSFW, getResponse after a restart ------------------------------------------------------
@pytest.fixture(scope="module")
def js_sdk() -> Path:
    folder = ROOT / "build" / "js"
    pkg = folder / "node_modules" / "@runware" / "sdk-js" / "package.json"
    if not (pkg.exists() and json.loads(pkg.read_text())["version"] == JS_SDK.rsplit("@", 1)[1]):
        if shutil.which("npm") is None or shutil.which("node") is None:
            pytest.fail("Node and npm are needed for the JS client tests (Debian: apt-get install nodejs npm)")
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "package.json").exists():
            (folder / "package.json").write_text('{"name": "zimage-js-client-tests", "private": true}')
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", JS_SDK], cwd=folder, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
        if r.returncode != 0:
            pytest.fail(f"npm install {JS_SDK} failed (needs the npm registry):\n{r.stderr[-2000:]}")
    return folder


JS = """
import { RunwareServer } from "@runware/sdk-js";
const [url, mode, arg] = process.argv.slice(2);
const out = {};
const rw = new RunwareServer({ apiKey: "k", url, shouldReconnect: false, timeoutDuration: 60000, globalMaxRetries: 1 });
await rw.ensureConnection();
const base = { positivePrompt: "a red circle", model: "runware:z-image@0", width: 128, height: 128, steps: 2,
               numberResults: 1, outputType: "base64Data", outputFormat: "PNG", seed: 6 };
try {
  if (mode === "nsfw") {
    const r = await rw.requestImages({ ...base, checkNSFW: true });
    out.items = r.map((x) => ({ NSFWContent: x.NSFWContent, seed: x.seed }));
  } else if (mode === "submit") {
    const r = await rw.requestImages({ ...base, deliveryMethod: "async" });
    out.items = r.map((x) => ({ taskUUID: x.taskUUID, status: x.status }));
  } else {
    const r = await rw.getResponse({ taskUUID: arg });
    out.items = r.map((x) => ({ taskUUID: x.taskUUID, imageUUID: x.imageUUID, seed: x.seed, status: x.status }));
  }
} catch (e) {
  out.error = e?.error ?? String(e);
}
console.log(JSON.stringify(out));
await rw.disconnect();
process.exit(0);
"""


def _js(folder: Path, *args: str) -> dict:
    script = folder / "client.mjs"
    script.write_text(JS)
    r = subprocess.run(["node", str(script), *args], capture_output=True, text=True, timeout=180, cwd=folder)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_js_client_check_nsfw(js_sdk, tiny_pipe):
    with ServerThread(tiny_pipe, api_keys=["k"], content_checker=lambda image: True) as s:
        out = _js(js_sdk, s.ws_url, "nsfw")
    assert out.get("items") == [{"NSFWContent": True, "seed": 6}], out
    with ServerThread(tiny_pipe, api_keys=["k"]) as s:  # no checker: a clear refusal naming the client's field
        out = _js(js_sdk, s.ws_url, "nsfw")
    assert out["error"]["parameter"] == "checkNSFW" and out["error"]["code"] == "invalidParameter", out


def test_js_client_get_response_after_a_restart(js_sdk, tiny_pipe, tmp_path):
    results = str(tmp_path / "results")
    with ServerThread(tiny_pipe, api_keys=["k"], results_dir=results) as s:
        t = task(deliveryMethod="async", seed=6)
        status, _ = _post(s.base, [t])
        assert status == 200
        for _ in range(200):
            status, body = _post(s.base, [{"taskType": "getResponse", "taskUUID": t["taskUUID"]}])
            if body.get("data") and body["data"][0].get("status") == "success":
                break
        before = body["data"][0]
    with ServerThread(tiny_pipe, api_keys=["k"], results_dir=results) as s:
        out = _js(js_sdk, s.ws_url, "get", t["taskUUID"])
    assert out.get("items") == [
        {"taskUUID": t["taskUUID"], "imageUUID": before["imageUUID"], "seed": 6, "status": "success"}
    ], out


# ---- zimage serve: LoRA folder, content checker, face detector -------------------------------------------------
def _serve_fails(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "zimage_core", "serve", "--port", "1", *args], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    return r.stderr.strip()


def test_serve_flags_are_checked_with_one_line_errors(tmp_path):
    assert "--lora-dir" in _serve_fails("--lora-dir", str(tmp_path / "nope"))
    assert "--content-checker" in _serve_fails("--content-checker", "no_such_module_xyz:check")
    assert "--content-checker" in _serve_fails("--content-checker", "json")  # no :CALLABLE
    assert "--face-detector" in _serve_fails("--face-detector", "json:no_such_function")
    assert "--results-items" in _serve_fails("--results-items", "0")
    (tmp_path / "h.py").write_text("def f(image):\n    return False\n")
    assert "--results-dir" in _serve_fails("--results-dir", str(tmp_path / "h.py" / "results"))  # under a file
    assert "--ray" in _serve_fails("--ray", "--content-checker", f"{tmp_path / 'h.py'}:f")


def test_serve_flags_reach_the_server(tiny_pipe, tmp_path):
    from tests.test_lora import make_adapters, write_peft
    from zimage_core.cli import _serve_extras, build_parser

    (tmp_path / "loras").mkdir()
    write_peft(tmp_path / "loras" / "mine.safetensors", make_adapters(tiny_pipe.transformer))
    (tmp_path / "hooks.py").write_text(
        "def nsfw(image):\n    return image.size == (128, 128)\n\n"
        "def faces(image):\n    return [(10, 10, 60, 60, 0.99)]\n"
    )
    args = build_parser().parse_args([
        "serve", "--lora-dir", str(tmp_path / "loras"), "--content-checker", f"{tmp_path / 'hooks.py'}:nsfw",
        "--face-detector", f"{tmp_path / 'hooks.py'}:faces", "--results-dir", str(tmp_path / "results"),
    ])  # fmt: skip
    extras = _serve_extras(args)
    with ServerThread(tiny_pipe, **extras) as s:
        req = task(seed=9, steps=2, lora=[{"model": "mine", "weight": 0.5}], safety={"checkContent": True},
                   ultralytics={"steps": 1, "strength": 0.3})  # fmt: skip
        status, body = _post(s.base, [req], key="any")
        status2, body2 = _post(s.base, [task(lora=[{"model": "not-there"}])], key="any")
    assert status == 200 and body["data"][0]["NSFWContent"] is True and body["data"][0]["seed"] == 9, body
    assert status2 == 400 and body2["errors"][0]["parameter"] == "lora[0].model"


# ---- runware-sdk over WebSocket: the 1 MiB frame limit (documented) and the way around it ------------------------
SDK_BIG = """
    import asyncio, json, sys
    from runware import Runware

    WS, BASE = sys.argv[1], sys.argv[2]
    T = {"taskType": "imageInference", "model": "runware:z-image@0", "positivePrompt": "a red circle", "width": 1024,
         "height": 1024, "steps": 1, "CFGScale": 1.0, "deliveryMethod": "sync", "seed": 1}
    B64 = {"outputType": "base64Data", "outputFormat": "PNG"}

    async def main():
        out = {}
        for name, transport, extra in (("ws_url", "websocket", {"outputType": "URL"}), ("ws_b64", "websocket", B64),
                                       ("rest_b64", "rest", B64)):
            kw = {"ws_base_url": WS} if transport == "websocket" else {"http_base_url": BASE}
            try:
                async with Runware(api_key="k", transport=transport, timeout=60000, max_retries=0, **kw) as c:
                    r = await c.run({**T, **extra})
                    out[name] = {"ok": True, "b64": len(r[0].get("imageBase64Data", ""))}
            except Exception as e:
                out[name] = {"ok": False, "error": str(e)[:200]}
        print(json.dumps(out))

    asyncio.run(main())
"""


def test_runware_sdk_websocket_frame_limit_and_the_url_way_around(sdk_python, tiny_pipe, tmp_path):  # noqa: F811
    with ServerThread(tiny_pipe, api_keys=["k"]) as s:
        out = _py(sdk_python, SDK_BIG, s.ws_url, f"{s.base}/v1", cwd=tmp_path)
    assert out["ws_url"]["ok"], out  # outputType URL: the frame carries a URL
    assert out["rest_b64"]["ok"] and out["rest_b64"]["b64"] > 2**20, out  # the same image over REST: > 1 MiB
    assert not out["ws_b64"]["ok"] and "Connection lost" in out["ws_b64"]["error"], out  # over WebSocket: lost
