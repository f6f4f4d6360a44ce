"""Operating the server, against a live server on 127.0.0.1 with the embedded default model at 128² and few steps:
per-step progress frames, ``GET /metrics`` moving under load (read with Prometheus' own text parser), and the
playground page driven in headless Chromium (Debian's ``chromium`` + ``chromedriver`` through Selenium, no browser
download), which keeps a screenshot under ``build/artifacts/``.

Without the browser (or without selenium) the browser test is skipped with the reason, except where
``ZIMAGE_REQUIRE_BROWSER=1`` (set by scripts/test.sh, which installs it) turns that into a failure.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.serve_live import get, live_server  # noqa: E402

MODEL = "zimage-fast:shapes-v1"
PROMPT = "a large red circle in the top left on a blue background"
ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "artifacts"


@pytest.fixture(scope="module")
def pipe():
    from zimage_core import ZImage

    return ZImage.default()


@pytest.fixture(scope="module")
def server(pipe):
    with live_server(pipe, queue=8) as (addr, service):
        yield addr, service


def scrape(addr: str) -> dict[tuple[str, tuple], float]:
    status, ctype, body = get(f"http://{addr}/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "replica")))] = s.value
    return out


def task(**kw) -> dict:
    t = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": MODEL,
        "positivePrompt": PROMPT,
        "width": 128,
        "height": 128,
        "steps": 3,
        "seed": 11,
        "outputType": "base64Data",
    }
    t.update(kw)
    return t


async def ws_run(addr: str, tasks: list[dict]) -> list[dict]:
    """Authenticate, send the tasks in one frame, collect every frame until each task has its results or an error."""
    import websockets

    frames = []
    async with websockets.connect(f"ws://{addr}/v1", max_size=None) as ws:
        await ws.send(json.dumps([{"taskType": "authentication", "apiKey": "test"}]))
        assert "connectionSessionUUID" in json.loads(await ws.recv())["data"][0]
        await ws.send(json.dumps(tasks))
        want = {t["taskUUID"]: t.get("numberResults", 1) for t in tasks}
        while want:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 120))
            frames.append(frame)
            for it in frame.get("data", []):
                if "imageUUID" in it:
                    want[it["taskUUID"]] -= 1
                    if want[it["taskUUID"]] == 0:
                        del want[it["taskUUID"]]
            for e in frame.get("errors", []):
                want.pop(e.get("taskUUID"), None)
    return frames


def test_progress_frames_one_per_step_before_the_results(server):
    addr, _ = server
    with_progress = task(numberResults=2, steps=3, includeProgress=True)
    without = task(steps=2)
    frames = asyncio.run(ws_run(addr, [with_progress, without]))
    mine = [it for f in frames for it in f.get("data", []) if it["taskUUID"] == with_progress["taskUUID"]]
    prog = [it["progressDetails"] for it in mine if "progress" in it]
    # the clients' format: a number, the percentage of all 6 steps done (runware-sdk's on_progress wants a number)
    assert [it["progress"] for it in mine if "progress" in it] == [round(100 * k / 6, 2) for k in range(1, 7)]
    # 3 steps x 2 results, in order, each before the result it belongs to
    assert [(p["result"], p["step"], p["steps"], p["results"]) for p in prog] == [
        (r, s, 3, 2) for r in range(2) for s in (1, 2, 3)
    ]
    assert all(it["status"] == "processing" and "imageUUID" not in it for it in mine if "progress" in it)
    assert "stepMs" not in prog[0] and prog[1]["stepMs"] > 0
    order = ["p" if "progress" in it else "r" for it in mine]
    assert order == ["p", "p", "p", "r", "p", "p", "p", "r"] or order == ["p"] * 6 + ["r", "r"]
    # a task that did not opt in gets no progress frames
    other = [it for f in frames for it in f.get("data", []) if it["taskUUID"] == without["taskUUID"]]
    assert [("progress" in it, "imageUUID" in it) for it in other] == [(False, True)]


def test_include_progress_must_be_a_boolean(server):
    addr, _ = server
    bad = task(includeProgress="yes")
    frames = asyncio.run(ws_run(addr, [bad]))
    errors = [e for f in frames for e in f.get("errors", [])]
    assert [(e["code"], e["parameter"], e["taskUUID"]) for e in errors] == [
        ("invalidParameter", "includeProgress", bad["taskUUID"])
    ]


def test_metrics_move_under_load_and_parse(server, pipe):
    addr, _ = server
    before = scrape(addr)
    ok = ("code", ""), ("outcome", "success"), ("task_type", "imageInference")
    bad = ("code", "invalidParameter"), ("outcome", "error"), ("task_type", "imageInference")
    lat = (("task_type", "imageInference"),)

    frames = asyncio.run(ws_run(addr, [task(steps=3), task(steps=3, seed=12), task(width=100)]))
    errors = [e for f in frames for e in f.get("errors", [])]
    assert [e["code"] for e in errors] == ["invalidParameter"] and errors[0]["parameter"] == "width"
    after = scrape(addr)

    def moved(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved(("zimage_tasks_total", ok)) == 2
    assert moved(("zimage_tasks_total", bad)) == 1
    assert moved(("zimage_tasks_started_total", lat)) == 2
    assert moved(("zimage_images_total", ())) == 2
    assert moved(("zimage_request_seconds_count", lat)) == 2
    assert moved(("zimage_request_seconds_sum", lat)) > 0
    # 3 steps per image -> 2 step intervals observed per image (the first step includes prompt encoding)
    assert moved(("zimage_step_seconds_count", ())) == 4
    assert after[("zimage_images_per_second", ())] > 0
    assert after[("zimage_queue_depth", ())] == 0 and after[("zimage_tasks_in_progress", ())] == 0


def _browser():
    """A headless Chromium driven through Debian's chromedriver; (None, reason) when it is not installed."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (pip install -e '.[dev]')"
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        return None, "Debian's chromium and chromium-driver are not installed (scripts/test.sh installs them)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        opts.add_argument(a)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a browser or driver
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=opts), ""


def test_playground_in_headless_chromium(server, pipe):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    addr, _ = server
    driver, reason = _browser()
    if driver is None:
        if os.environ.get("ZIMAGE_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    before = scrape(addr)
    try:
        driver.get(f"http://{addr}/")
        assert driver.title == "zimage-fast playground"
        Select(driver.find_element(By.ID, "model")).select_by_value(MODEL)
        for field, value in (("prompt", PROMPT), ("width", "160"), ("height", "128"), ("steps", "4"), ("seed", "7")):
            el = driver.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        Select(driver.find_element(By.ID, "scheduler")).select_by_value("Default")
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 180, poll_frequency=0.2).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error")
        )
        body = driver.find_element(By.TAG_NAME, "body")
        assert body.get_attribute("data-state") == "done", driver.find_element(By.ID, "error").text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "playground.png"
        driver.save_screenshot(str(shot))
        print(f"playground screenshot: {shot}")

        assert body.get_attribute("data-progress-frames") == "4"  # one progress frame per step
        prog = driver.find_element(By.ID, "progress")
        assert prog.get_attribute("value") == prog.get_attribute("max") == "4"
        img = driver.find_element(By.ID, "result")
        size = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
        assert size == [160, 128]
        assert driver.find_element(By.ID, "out-seed").text == "7"
        sent = json.loads(driver.find_element(By.ID, "request-json").text)
        assert len(sent) == 1 and sent[0]["positivePrompt"] == PROMPT and sent[0]["width"] == 160
        src = img.get_attribute("src")
    finally:
        driver.quit()
    assert src.startswith("data:image/png;base64,")
    page_img = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    # the page showed exactly what the library draws for these arguments (PNG is lossless)
    ref = pipe.generate(PROMPT, width=160, height=128, steps=4, seed=7, model=MODEL).images[0]
    assert page_img.shape == (128, 160, 3)
    assert np.array_equal(page_img, np.asarray(ref.convert("RGB")))
    after = scrape(addr)
    assert after[("zimage_images_total", ())] - before[("zimage_images_total", ())] == 1
