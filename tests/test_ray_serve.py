"""Two CPU replicas of the server on Ray Serve, on 127.0.0.1, driven by the official ``runware`` client.

One test (Ray's start and the replicas' model loads dominate: ~2 minutes on the 2-core development machine):
24 requests over 4 client connections, each answered exactly once; both replicas served some (per-replica metrics,
merged at one ``/metrics``); an async task submitted over REST is answered by ``getResponse`` whichever replica
Ray routes the poll to; a URL output is served by every replica; clean shutdown (no Ray process left).

Skipped with the reason when Ray Serve is not installed, except where ``ZIMAGE_REQUIRE_RAY=1`` (scripts/test.sh
installs the ``[ray]`` extra and sets it) turns that into a failure.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
import urllib.request
import uuid

import pytest
from PIL import Image

from tests.serve_live import free_port, get

MODEL = "zimage-fast:shapes-v1"
PROMPT = "a small yellow square in the middle center on a black background"
CLIENTS, PER_CLIENT = 4, 6  # 24 requests


def _require_ray():
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        reason = "Ray Serve is not installed (pip install -e '.[ray]')"
        if os.environ.get("ZIMAGE_REQUIRE_RAY") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    pytest.importorskip("runware")


def _metrics_by_replica(addr: str) -> dict[str, dict[str, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(get(f"http://{addr}/metrics")[2].decode()):
        for s in fam.samples:
            if s.name in ("zimage_images_total", "zimage_tasks_started_total") or (
                s.name == "zimage_tasks_total" and s.labels.get("outcome") == "success"
            ):
                d = out.setdefault(s.labels["replica"], {})
                d[s.name] = d.get(s.name, 0.0) + s.value
    return out


def _rest(addr: str, tasks: list[dict]) -> dict:
    req = urllib.request.Request(
        f"http://{addr}/v1",
        data=json.dumps(tasks).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer ray-test"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


async def _client(addr: str, k: int) -> list[tuple[str, list]]:
    from runware import IImageInference, Runware

    rw = Runware(api_key="ray-test", url=f"ws://{addr}/v1", timeout=120)
    await rw.connect()
    out = []
    try:
        for i in range(PER_CLIENT):
            req = IImageInference(
                model=MODEL,
                positivePrompt=PROMPT,
                taskUUID=str(uuid.uuid4()),
                width=128,
                height=128,
                steps=2,
                seed=1000 * k + i,
                outputType="base64Data",
                numberResults=1,
            )
            out.append((req.taskUUID, await asyncio.wait_for(rw.imageInference(req), 120)))
    finally:
        await rw.disconnect()
    return out


def _ray_processes() -> list[str]:
    import subprocess

    ps = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()
    me = str(os.getpid())
    return [line for line in ps if ("raylet" in line or "gcs_server" in line) and me in line.split()[1:2]]


def test_two_replicas_on_ray_serve_official_client():
    _require_ray()
    import ray

    from zimage_core.server import ray_app
    from zimage_core.server.app import Settings

    t0 = time.monotonic()
    port = free_port()
    addr = f"127.0.0.1:{port}"
    ray_app.run(Settings(host="127.0.0.1", port=port, queue=16), replicas=2, block=False)
    try:
        deadline = time.monotonic() + 300
        while True:  # both replicas must have loaded their model: wait until Ray routes to ready ones only
            try:
                if json.loads(get(f"http://{addr}/healthz?ready=1", timeout=5)[2])["ready"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the replicas did not become ready in 300 s"
            time.sleep(1.0)

        async def drive():
            return await asyncio.gather(*[_client(addr, k) for k in range(CLIENTS)])

        results = [r for per_client in asyncio.run(drive()) for r in per_client]
        assert len(results) == CLIENTS * PER_CLIENT
        for task_uuid, images in results:  # each answered exactly once, with its own task's image
            assert len(images) == 1 and images[0].taskUUID == task_uuid and images[0].imageBase64Data

        # async over REST: accepted by one replica; polls are routed to either replica by Ray
        task_uuid = str(uuid.uuid4())
        task = {"taskType": "imageInference", "taskUUID": task_uuid, "model": MODEL, "positivePrompt": PROMPT,
                "width": 128, "height": 128, "steps": 2, "seed": 5, "outputType": "base64Data",
                "deliveryMethod": "async"}  # fmt: skip
        ack = _rest(addr, [task])
        assert ack["data"][0]["status"] == "processing", ack
        answers = []
        for _ in range(8):
            r = _rest(addr, [{"taskType": "getResponse", "taskUUID": task_uuid}])
            assert "errors" not in r, r  # never taskNotFound, whichever replica answers
            answers.append(r["data"][0])
            if answers[-1].get("status") == "success":
                break
            time.sleep(0.5)
        assert answers[-1]["status"] == "success" and answers[-1]["imageUUID"]
        for _ in range(6):  # once finished, every replica answers it
            r = _rest(addr, [{"taskType": "getResponse", "taskUUID": task_uuid}])
            assert r["data"][0]["imageUUID"] == answers[-1]["imageUUID"], r

        # outputType URL (the API's default): the image is served whichever replica the proxy picks for the GET
        url_task = {**task, "taskUUID": str(uuid.uuid4()), "deliveryMethod": "sync", "outputType": "URL", "seed": 6}
        r = _rest(addr, [url_task])
        url = r["data"][0]["imageURL"]
        assert url.startswith(f"http://{addr}/image/"), r
        bodies = {get(url)[2] for _ in range(8)}  # urllib raises on a 404
        assert len(bodies) == 1
        assert Image.open(io.BytesIO(bodies.pop())).size == (128, 128)

        time.sleep(2.5 * ray_app.PUSH_INTERVAL_S)  # every replica has pushed its latest metrics to the hub
        per = _metrics_by_replica(addr)
        assert sorted(per) == ["0", "1"], per
        served = {rep: m.get("zimage_images_total", 0) for rep, m in per.items()}
        assert all(n > 0 for n in served.values()), served  # both replicas served some
        assert sum(served.values()) == CLIENTS * PER_CLIENT + 2  # no task ran twice
        assert sum(m.get("zimage_tasks_total", 0) for m in per.values()) == CLIENTS * PER_CLIENT + 2
    finally:
        ray_app.shutdown()
    assert not ray.is_initialized()
    assert _ray_processes() == []
    print(f"ray serve test: {time.monotonic() - t0:.0f} s, images per replica {served}")
