"""The network server driven by the official Python client ``runware`` (unmodified, URL pointed at us) and by a raw
WebSocket client for the protocol details the client hides. In-process server on 127.0.0.1, tiny random model."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import urllib.error
import urllib.request
import uuid

import pytest
from PIL import Image
from runware import IImageInference, Runware, RunwareAPIError  # the official client, a dev dependency

from tests.server_helpers import RawClient, ServerThread, health, task

MODEL = "runware:z-image@0"


@pytest.fixture(scope="module")
def server(tiny_pipe):
    with ServerThread(tiny_pipe, queue=32, poll_hold_s=5.0) as s:
        yield s


def run(coro):
    return asyncio.run(coro)


async def _client(server) -> Runware:
    client = Runware(api_key="any-key", url=server.ws_url)
    await client.connect()
    return client


def _req(**kw) -> IImageInference:
    base = dict(positivePrompt="a red circle on blue", model=MODEL, width=128, height=128, steps=2)
    base.update(kw)
    return IImageInference(**base)


def _png(size=(128, 128), color=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


# ---- the official client ------------------------------------------------------------------------------------------
def test_text_to_image_each_output_type(server):
    async def go():
        c = await _client(server)
        try:
            url = await c.imageInference(requestImage=_req(outputType="URL", outputFormat="PNG", seed=7))
            b64 = await c.imageInference(requestImage=_req(outputType="base64Data", outputFormat="JPG", seed=7))
            uri = await c.imageInference(requestImage=_req(outputType="dataURI", outputFormat="WEBP", seed=7))
            return url, b64, uri
        finally:
            await c.disconnect()

    url, b64, uri = run(go())
    assert url[0].imageURL.startswith(server.base + "/image/") and url[0].imageURL.endswith(".png")
    with urllib.request.urlopen(url[0].imageURL, timeout=10) as r:  # served by this server, fetched remotely
        assert r.headers["Content-Type"] == "image/png"
        im = Image.open(io.BytesIO(r.read()))
    assert im.format == "PNG" and im.size == (128, 128)
    assert Image.open(io.BytesIO(base64.b64decode(b64[0].imageBase64Data))).format == "JPEG"
    assert uri[0].imageDataURI.startswith("data:image/webp;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(uri[0].imageDataURI.split(",", 1)[1]))).format == "WEBP"
    assert url[0].seed == b64[0].seed == uri[0].seed == 7


def test_number_results_gives_distinct_images_with_consecutive_seeds(server):
    async def go():
        c = await _client(server)
        try:
            return await c.imageInference(requestImage=_req(numberResults=3, seed=100, outputType="base64Data"))
        finally:
            await c.disconnect()

    images = run(go())
    assert len(images) == 3
    assert len({im.imageUUID for im in images}) == 3
    assert sorted(im.seed for im in images) == [100, 101, 102]


def test_invalid_request_is_the_clients_api_error_naming_the_parameter(server):
    async def go():
        c = await _client(server)
        try:
            with pytest.raises(RunwareAPIError) as e:
                await c.imageInference(requestImage=_req(width=130))
            with pytest.raises(RunwareAPIError) as e2:
                await c.imageInference(requestImage=_req(steps=500))
            return e.value.error_data, e2.value.error_data
        finally:
            await c.disconnect()

    err, err2 = run(go())
    assert err["code"] == "invalidParameter" and err["parameter"] == "width"
    assert "multiple of 16" in err["message"]
    assert err2["parameter"] == "steps" and "[1, 50]" in err2["message"]


def test_upload_then_image_to_image_with_the_returned_uuid(server, tmp_path):
    path = tmp_path / "seed.png"
    path.write_bytes(_png((160, 144)))

    async def go():
        c = await _client(server)
        try:
            up = await c.uploadImage(str(path))
            out = await c.imageInference(
                requestImage=_req(
                    seedImage=up.imageUUID, strength=0.5, width=None, height=None, outputType="base64Data"
                )
            )
            return up, out
        finally:
            await c.disconnect()

    up, out = run(go())
    uuid.UUID(up.imageUUID)
    with urllib.request.urlopen(up.imageURL, timeout=10) as r:
        assert Image.open(io.BytesIO(r.read())).size == (160, 144)
    im = Image.open(io.BytesIO(base64.b64decode(out[0].imageBase64Data)))
    assert im.size == (160, 144)  # image-to-image keeps the seed image's size (rounded to multiples of 16)


def test_async_delivery_then_get_response(server):
    async def go():
        c = await _client(server)
        try:
            ack = await c.imageInference(requestImage=_req(deliveryMethod="async", outputType="base64Data", seed=3))
            results = await c.getResponse(taskUUID=ack.taskUUID, numberResults=1)
            return ack, results
        finally:
            await c.disconnect()

    ack, results = run(go())
    assert ack.taskUUID and len(results) == 1
    assert results[0].taskUUID == ack.taskUUID and results[0].status == "success" and results[0].seed == 3


def test_three_concurrent_calls_on_one_connection(server):
    async def go():
        c = await _client(server)
        try:
            calls = [_req(seed=s, outputType="base64Data") for s in (11, 22, 33)]
            return await asyncio.gather(*(c.imageInference(requestImage=r) for r in calls))
        finally:
            await c.disconnect()

    out = run(go())
    assert [r[0].seed for r in out] == [11, 22, 33]
    assert len({r[0].taskUUID for r in out}) == 3


# ---- protocol details (raw frames) -------------------------------------------------------------------------------
def test_authentication_reply_has_a_session_and_no_task_uuid(server):
    async def go():
        async with RawClient(server.ws_url) as c:
            return c.auth

    auth = run(go())
    item = auth["data"][0]
    assert item["taskType"] == "authentication" and "taskUUID" not in item
    uuid.UUID(item["connectionSessionUUID"])


def test_pings_are_answered_while_inference_runs(server):
    async def go():
        async with RawClient(server.ws_url, ping_every=None) as c:
            slow = task(steps=20, width=256, height=256)
            await c.send([slow])
            await asyncio.sleep(0.05)
            await c.send([{"taskType": "ping", "ping": True}])
            first = await c.recv(pongs=True)
            rest = await c.collect({slow["taskUUID"]}, {})
            return first, rest

    first, rest = run(go())
    assert first == {"data": [{"taskType": "ping", "pong": True}]}  # before the result
    assert "imageUUID" in next(iter(rest.values()))[0]


def test_repeated_task_uuid_is_answered_from_the_first_run(server):
    t = task(seed=5)

    async def go():
        before = health(server.base)["completed"]
        async with RawClient(server.ws_url) as c:
            await c.send([t])
            await c.send([t])  # a reconnecting client re-sends in-flight tasks with the same taskUUID
            got = await c.collect({t["taskUUID"]}, {t["taskUUID"]: 2})
        async with RawClient(server.ws_url) as c2:  # resend on a new connection (same key) after completion
            await c2.send([t])
            again = await c2.collect({t["taskUUID"]}, {})
            other = dict(t, seed=6)  # same UUID, different request
            await c2.send([other])
            conflict = await c2.recv()
        return before, got, again, conflict

    before, got, again, conflict = run(go())
    items = got[t["taskUUID"]]
    assert len(items) == 2 and items[0]["imageUUID"] == items[1]["imageUUID"]
    assert again[t["taskUUID"]][0]["imageUUID"] == items[0]["imageUUID"]
    assert health(server.base)["completed"] == before + 1  # one run
    assert conflict["errors"][0]["code"] == "conflictTaskUUID"


def test_client_spellings_are_accepted_and_both_at_once_is_an_error(server):
    seed_uri = "data:image/png;base64," + base64.b64encode(_png()).decode()
    ok = task(seedImage=seed_uri, strength=0.4, acceleratorOptions=None, negativePrompt=None)
    both = task(seedImage=seed_uri, inputs={"seedImage": seed_uri}, strength=0.4)
    white = "data:image/png;base64," + base64.b64encode(_png(color=(255, 255, 255))).decode()
    mask_alias = task(inputs={"seedImage": seed_uri, "mask": white})

    async def go():
        async with RawClient(server.ws_url) as c:
            await c.send([ok, both, mask_alias])
            return await c.collect({ok["taskUUID"], both["taskUUID"], mask_alias["taskUUID"]}, {})

    got = run(go())
    assert "imageUUID" in got[ok["taskUUID"]][0]
    assert got[both["taskUUID"]][0]["parameter"] == "seedImage"
    assert got[mask_alias["taskUUID"]][0].get("imageUUID")  # inputs.mask read as inputs.maskImage


def test_image_formats_outside_the_allow_list_are_refused(server):
    bmp = base64.b64encode(_png(fmt="BMP")).decode()
    gif = base64.b64encode(_png(fmt="GIF")).decode()
    t_bmp = task(inputs={"seedImage": bmp}, strength=0.5)
    t_gif = task(inputs={"seedImage": gif}, strength=0.5)

    async def go():
        async with RawClient(server.ws_url) as c:
            await c.send([t_bmp, t_gif, {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": bmp}])
            got = await c.collect({t_bmp["taskUUID"], t_gif["taskUUID"]}, {})
            return got

    got = run(go())
    err = got[t_bmp["taskUUID"]][0]
    assert err["code"] == "invalidParameter" and err["parameter"] == "inputs.seedImage"
    assert "imageUUID" in got[t_gif["taskUUID"]][0]


def test_error_messages_quote_only_a_short_prefix_of_a_bad_value(server):
    t = task(scheduler="X" * 5000, positivePrompt="p" * 5000)

    async def go():
        async with RawClient(server.ws_url) as c:
            await c.send([t, task(inputs={"seedImage": "!" * 100000}, strength=0.5)])
            return [await c.recv(), await c.recv()]

    frames = run(go())
    for f in frames:
        e = f["errors"][0]
        assert len(e["message"]) < 400, e["message"][:500]
        assert e["parameter"] in ("positivePrompt", "inputs.seedImage", "scheduler")


def test_unknown_task_type_and_bad_frames(server):
    async def go():
        async with RawClient(server.ws_url) as c:
            await c.send([{"taskType": "videoInference", "taskUUID": "abc"}])
            a = await c.recv()
            await c.ws.send("not json")
            b = await c.recv()
            return a, b

    a, b = run(go())
    assert a["errors"][0]["code"] == "unsupportedTaskType" and a["errors"][0]["taskUUID"] == "abc"
    assert b["errors"][0]["code"] == "invalidJSON"


def test_outbound_calls_are_off_by_default(server):
    t = task(webhookURL="http://example.com/hook")

    async def go():
        async with RawClient(server.ws_url) as c:
            await c.send([t])
            return await c.recv()

    e = run(go())["errors"][0]
    assert e["code"] == "outboundDisabled" and e["parameter"] == "webhookURL" and e["taskUUID"] == t["taskUUID"]


# ---- REST -------------------------------------------------------------------------------------------------------
def _post(base, tasks, key="k", raw: bytes | None = None):
    req = urllib.request.Request(
        f"{base}/v1",
        data=raw if raw is not None else json.dumps(tasks).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_rest_sync_async_and_errors(server):
    t = task(seed=9)
    status, body = _post(server.base, [t])
    assert status == 200 and body["data"][0]["taskUUID"] == t["taskUUID"] and body["data"][0]["seed"] == 9
    a = task(deliveryMethod="async")
    status, body = _post(server.base, [a])
    assert status == 200 and body["data"][0]["status"] == "processing"
    status, body = _post(server.base, [{"taskType": "getResponse", "taskUUID": a["taskUUID"]}])
    assert status == 200 and body["data"][0]["status"] == "success" and "imageUUID" in body["data"][0]
    status, body = _post(server.base, [task(height=100)])
    assert status == 400 and body["errors"][0]["parameter"] == "height"
    status, body = _post(server.base, [t], key=None)
    assert status == 401 and body["errors"][0]["code"] == "missingApiKey"
    status, body = _post(server.base, None, raw=b"{oops")
    assert status == 400 and body["errors"][0]["code"] == "invalidJSON"


def test_healthz_and_expired_or_unknown_images(server):
    h = health(server.base)
    assert h["status"] == "ok" and h["ready"] is True
    for path in ("/image/" + str(uuid.uuid4()) + ".png", "/image/..%2Fetc%2Fpasswd.png", "/image/x.exe"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.base + path, timeout=5)
        assert e.value.code == 404


def test_url_output_ttl_is_honoured(server):
    store = server.service.store
    url = store.put(str(uuid.uuid4()), _png(), "png", ttl=60)
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
    name = url.rsplit("/", 1)[1]
    store._items[name] = 0.0  # as if its ttl had passed
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(url, timeout=5)
    assert not (store.folder / name).exists() or store.get(name) is None


# ---- keys ---------------------------------------------------------------------------------------------------------
def test_api_keys_and_per_key_visibility(tiny_pipe):
    with ServerThread(tiny_pipe, api_keys=["key-a", "key-b"], poll_hold_s=5.0) as s:

        async def go():
            import websockets

            async with websockets.connect(s.ws_url) as ws:
                await ws.send(json.dumps([{"taskType": "authentication", "apiKey": "wrong"}]))
                bad = json.loads(await ws.recv())
                await ws.send(json.dumps([task()]))
                unauth = json.loads(await ws.recv())
            a = task(deliveryMethod="async")
            async with RawClient(s.ws_url, "key-a") as ca:
                await ca.send([a])
                ack = await ca.recv()
            async with RawClient(s.ws_url, "key-b") as cb:
                await cb.send([{"taskType": "getResponse", "taskUUID": a["taskUUID"]}])
                other = await cb.recv()
            async with RawClient(s.ws_url, "key-a") as ca:
                await ca.send([{"taskType": "getResponse", "taskUUID": a["taskUUID"]}])
                mine = await ca.recv()
            return bad, unauth, ack, other, mine

        bad, unauth, ack, other, mine = run(go())
        status, _ = _post(s.base, [task()], key="wrong")
    assert bad["errors"][0]["taskType"] == "authentication" and bad["errors"][0]["code"] == "invalidApiKey"
    assert unauth["errors"][0]["code"] == "notAuthenticated"
    assert ack["data"][0]["status"] == "processing"
    assert other["errors"][0]["code"] == "taskNotFound"
    assert mine["data"][0]["status"] == "success"
    assert status == 401


def test_no_keys_means_loopback_only():
    from zimage_core.server.app import Settings

    Settings(host="127.0.0.1").check()
    Settings(host="0.0.0.0", api_keys=["k"]).check()
    with pytest.raises(SystemExit, match="without API keys"):
        Settings(host="0.0.0.0").check()


def test_cli_serve_options(monkeypatch):
    from zimage_core import cli

    seen = {}
    monkeypatch.setattr("zimage_core.server.app.serve", lambda settings: seen.setdefault("s", settings) and 0)
    monkeypatch.setenv("ZIMAGE_API_KEYS", "a, b")
    assert (
        cli.main(["serve", "--port", "9", "--queue", "3", "--allow-outbound", "--outbound-allow-net", "10.0.0.0/8"])
        == 0
    )
    st = seen["s"]
    assert (st.port, st.queue, st.api_keys, st.outbound.enabled) == (9, 3, ["a", "b"], True)
    assert st.outbound.address_allowed("10.1.2.3") and not st.outbound.address_allowed("192.168.1.1")
