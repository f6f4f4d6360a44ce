"""The standing attack suite (issue 23): what a hostile client may send, with or without a key, and what it may
cost the server. Its own tier (``attack``: ``ctest -L attack``); every server listens on 127.0.0.1, every test is
bounded in time and in the number of connections and requests it makes.

Each test states the limit it checks (docs/server-limits.md has the table). Expected codes and ranges are written
out here, not taken from the server's tables.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

from tests.server_helpers import ROOT, RawClient, ServerThread, task

pytestmark = pytest.mark.attack

KEY = "attack-key"


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _ws(url: str, **kw):
    import websockets

    return websockets.connect(url, max_size=None, open_timeout=10, **kw)


async def _recv(ws, timeout: float = 10.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


def _get(url: str, headers: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: bytes, headers: dict | None = None, timeout: float = 30.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _healthz_ms(base: str) -> float:
    t0 = time.perf_counter()
    status, _ = _get(f"{base}/healthz", timeout=10)
    assert status == 200
    return (time.perf_counter() - t0) * 1000


@pytest.fixture
def server(tiny_pipe):
    with ServerThread(tiny_pipe, api_keys=[KEY]) as s:
        yield s


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def server_log():
    """Every record the server, uvicorn and asyncio log during the test."""
    h = _Records()
    names = ("zimage_core.server", "uvicorn", "uvicorn.error", "asyncio", "websockets")
    for n in names:
        logging.getLogger(n).addHandler(h)
    yield h.records
    for n in names:
        logging.getLogger(n).removeHandler(h)


# ---- 1. budgets before work ------------------------------------------------------------------------------------
def test_a_large_frame_before_authentication_is_refused_unparsed(server):
    """Pre-auth frame limit (64 KiB): a 4 MiB frame from a socket without a key ends it (close 1009, message too
    big) instead of being parsed; the server stays healthy."""

    async def go():
        import websockets

        async with _ws(server.ws_url) as ws:
            big = json.dumps([{"taskType": "ping", "pad": "x" * (4 * 2**20)}])
            await ws.send(big)
            with pytest.raises(websockets.ConnectionClosed) as e:
                while True:
                    await _recv(ws)
            return e.value.rcvd.code if e.value.rcvd else None

    assert run(go()) == 1009
    assert server.service.queue.completed == 0 and _healthz_ms(server.base) < 2000


def test_after_authentication_large_frames_are_allowed(server):
    """The large limit applies once the key is checked: a 1 MiB frame is parsed (answered), not refused."""

    async def go():
        async with RawClient(server.ws_url, api_key=KEY, ping_every=None) as c:
            await c.send([{"taskType": "ping", "ping": True, "pad": "x" * 2**20}])
            return await c.recv(pongs=True)

    assert run(go()) == {"data": [{"taskType": "ping", "pong": True}]}


def test_deep_json_before_authentication_is_an_invalid_json_error_frame(server):
    """JSON depth limit (16), checked before parsing: 5,000 nested arrays get an invalidJSON error frame (today:
    the socket drops without one) and the connection stays usable."""

    async def go():
        async with _ws(server.ws_url) as ws:
            await ws.send("[" * 5000 + "]" * 5000)
            first = await _recv(ws)
            await ws.send(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
            return first, await _recv(ws)

    first, auth = run(go())
    assert first["errors"][0]["code"] == "invalidJSON" and "deeper than 16" in first["errors"][0]["message"]
    assert auth["data"][0]["taskType"] == "authentication"


def test_a_field_nested_hundreds_deep_inside_a_task_is_refused_as_invalid_json(server, server_log):
    """A task with a field nested 400 deep: invalidJSON before parsing (today: parsed and handed to the validator;
    a few hundred more levels reach a RecursionError, internalError and a traceback)."""
    nested: object = "x"
    for _ in range(400):
        nested = {"a": nested}

    async def go():
        async with RawClient(server.ws_url, api_key=KEY, ping_every=None) as c:
            await c.send([task(extraField=nested)])
            return await c.recv()

    frame = run(go())
    assert frame["errors"][0]["code"] == "invalidJSON", frame
    assert not [r for r in server_log if r.exc_info], [r.getMessage() for r in server_log if r.exc_info]


def test_a_frame_of_many_tasks_is_refused_and_healthz_is_not_blocked(server):
    """Task-count limit (64 per frame): a frame of 100,000 pings (about 3 MiB) is refused with payloadTooLarge
    before parsing; /healthz answers within 1 s meanwhile (today: 100,000 pongs block the loop for seconds)."""

    async def go():
        async with RawClient(server.ws_url, api_key=KEY, ping_every=None) as c:
            await c.send([{"taskType": "ping", "ping": True}] * 100_000)
            loop = asyncio.get_running_loop()
            lat = await loop.run_in_executor(None, _healthz_ms, server.base)
            return await c.recv(pongs=True), lat

    frame, lat = run(go())
    assert frame["errors"][0]["code"] == "payloadTooLarge" and "more than 64 tasks" in frame["errors"][0]["message"]
    assert lat < 1000, lat


def test_pings_in_one_frame_are_answered_in_one_frame(server):
    """64 pings in one frame (the limit) are answered by one frame of 64 pongs, not 64 sends."""

    async def go():
        async with RawClient(server.ws_url, api_key=KEY, ping_every=None) as c:
            await c.send([{"taskType": "ping", "ping": True}] * 64)
            return await c.recv(pongs=True)

    frame = run(go())
    assert frame["data"] == [{"taskType": "ping", "pong": True}] * 64


def _answer_before_body(port: int, length: int, headers: str = "") -> tuple[int, dict]:
    """Send a POST /v1's headers announcing ``length`` body bytes, and none of them: the server's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {length}\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_rest_body_without_a_key_is_held_to_the_small_limit(server):
    """REST without an Authorization header: a body announced at 1 MiB is refused (413 payloadTooLarge) before a
    byte of it is read (today: the server waits for the body, parses it, then checks the key)."""
    status, frame = _answer_before_body(server.port, 2**20)
    assert status == 413 and frame["errors"][0]["code"] == "payloadTooLarge"


def test_rest_wrong_bearer_key_is_refused_before_the_body_is_read(server):
    """REST with a wrong key in the header: 401 invalidApiKey naming apiKey, before any of the 8 MiB body."""
    status, frame = _answer_before_body(server.port, 8 * 2**20, "Authorization: Bearer wrong\r\n")
    assert status == 401
    assert frame["errors"][0]["code"] == "invalidApiKey" and frame["errors"][0]["parameter"] == "apiKey"


def test_pending_get_responses_per_connection_are_capped(tiny_pipe):
    """At most 8 getResponse calls wait per connection (poll_hold_s 20 s); the 9th and later are answered at once
    with status processing instead of each holding a waiter (today: every poll waits 20 s)."""
    with ServerThread(tiny_pipe, api_keys=[KEY], poll_hold_s=20.0) as s:

        async def go():
            async with RawClient(s.ws_url, api_key=KEY, ping_every=None) as c:
                slow = task(steps=30, width=384, height=384, deliveryMethod="async")
                await c.send([slow])
                ack = await c.recv()
                polls = [{"taskType": "getResponse", "taskUUID": slow["taskUUID"]} for _ in range(40)]
                await c.send(polls)
                quick = 0
                end = time.monotonic() + 3
                while time.monotonic() < end:
                    try:
                        frame = await c.recv(timeout=end - time.monotonic())
                    except asyncio.TimeoutError:
                        break
                    quick += sum(1 for it in frame.get("data", []) if it.get("status") == "processing")
                return ack, quick

        ack, quick = run(go(), timeout=90)
        assert ack["data"][0]["status"] == "processing"
        assert quick >= 32, quick


def _png(width: int, height: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_uploads_are_held_by_decoded_bytes(tiny_pipe):
    """Upload budget by decoded size (here 20 MB): six ~30 KB PNGs that decode to 12.6 MB each keep at most
    20 MB + one image in memory (today: all six, 75 MB)."""
    from zimage_core.service.infer import default_config

    png = _png(2048, 2048)
    assert len(png) < 200_000
    with ServerThread(tiny_pipe, api_keys=[KEY], upload_bytes=20_000_000) as s:

        async def go():
            async with RawClient(s.ws_url, api_key=KEY, ping_every=None) as c:
                for _ in range(6):
                    await c.send([{"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": png}])
                    frame = await c.recv(timeout=60)
                    assert "data" in frame, frame

        run(go(), timeout=180)
        held = default_config(tiny_pipe).outputs.nbytes
    assert held <= 20_000_000 + 2048 * 2048 * 3, held


def test_finished_results_are_held_by_bytes(tiny_pipe):
    """Held-result budget (here 300 KB per key): after several base64 results the server holds at most the budget
    plus the newest result; the oldest async task is forgotten (taskNotFound), the newest is answered."""
    with ServerThread(tiny_pipe, api_keys=[KEY], held_result_bytes_per_key=300_000) as s:

        async def go():
            async with RawClient(s.ws_url, api_key=KEY, ping_every=None) as c:
                uuids = []
                for i in range(6):
                    t = task(width=256, height=256, seed=i, deliveryMethod="async", numberResults=2)
                    await c.send([t])
                    await c.recv()
                    uuids.append(t["taskUUID"])
                    while True:  # wait until it finished
                        await c.send([{"taskType": "getResponse", "taskUUID": t["taskUUID"]}])
                        f = await c.recv(timeout=60)
                        if f.get("errors") or any(it.get("status") == "success" for it in f.get("data", [])):
                            break
                sizes = dict(s.service.held_bytes)
                await c.send([{"taskType": "getResponse", "taskUUID": uuids[0]}])
                oldest = await c.recv()
                await c.send([{"taskType": "getResponse", "taskUUID": uuids[-1]}])
                newest = await c.recv()
                return sizes, oldest, newest

        sizes, oldest, newest = run(go(), timeout=240)
    (held,) = sizes.values()
    assert held <= 300_000 + 2 * 256 * 256 * 4 * 4 // 3, held  # the budget + one result (two 256x256 PNGs)
    assert oldest["errors"][0]["code"] == "taskNotFound"
    assert "data" in newest and newest["data"][0]["status"] == "success"


# ---- 2. connections -------------------------------------------------------------------------------------------
def _raw_socket(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes the socket (EOF, or a reset) within ``seconds``; response bytes are skipped."""
    sock.settimeout(0.2)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n[{"],
    ids=["no-bytes", "partial-headers", "trickling-body"],
)
def test_half_open_connections_are_timed_out(tiny_pipe, sent):
    """Header deadline (here 1 s) and body deadline (here 2 s): a socket that sends nothing, half the headers or
    2 bytes of a 1,000-byte body is closed by the server (today: held forever)."""
    with ServerThread(tiny_pipe, api_keys=[KEY], header_timeout_s=1.0, body_timeout_s=2.0) as s:
        sock = _raw_socket(s.port)
        try:
            if sent:
                sock.sendall(sent)
            assert _closed_within(sock, 6.0)
        finally:
            sock.close()


def test_connection_cap_keeps_headroom_for_healthz(tiny_pipe):
    """Connection cap (here 20) + headroom (4, /healthz only, 1 s to send headers): 40 idle sockets do not stop
    /healthz from answering within 3 s; a task on a headroom connection gets 503 serverBusy."""
    with ServerThread(tiny_pipe, api_keys=[KEY], max_connections=20, health_headroom=4, header_timeout_s=30.0) as s:
        socks = [_raw_socket(s.port) for _ in range(40)]
        try:
            time.sleep(0.5)
            end, answered = time.monotonic() + 3.0, False
            while time.monotonic() < end and not answered:
                try:
                    answered = _get(f"{s.base}/healthz", timeout=1.5)[0] == 200
                except OSError:
                    time.sleep(0.1)
            assert answered
            busy = None
            end = time.monotonic() + 3.0
            while time.monotonic() < end and busy is None:
                try:
                    busy = _post(f"{s.base}/v1", b"[]", {"Authorization": f"Bearer {KEY}"}, timeout=1.5)
                except OSError:
                    time.sleep(0.1)
            assert busy is not None and busy[0] == 503 and busy[1]["errors"][0]["code"] == "serverBusy", busy
        finally:
            for x in socks:
                x.close()


def test_failed_authentication_is_rate_limited_per_address(server):
    """10 failed keys per address per minute; the 11th attempt, even with the right key, is rateLimited (429)."""

    async def go():
        codes = []
        async with _ws(server.ws_url) as ws:
            for i in range(12):
                await ws.send(json.dumps([{"taskType": "authentication", "apiKey": f"wrong-{i}"}]))
                codes.append((await _recv(ws))["errors"][0]["code"])
            await ws.send(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
            right = await _recv(ws)
        return codes, right

    codes, right = run(go())
    assert codes[:10] == ["invalidApiKey"] * 10 and codes[10:] == ["rateLimited"] * 2
    assert right["errors"][0]["code"] == "rateLimited"
    status, frame = _post(f"{server.base}/v1", b"[]", {"Authorization": f"Bearer {KEY}"})
    assert status == 429 and frame["errors"][0]["code"] == "rateLimited"


def test_client_caused_failures_leave_no_traceback(server, server_log):
    """A client gone mid-body, invalid UTF-8 in a text frame, a bad apiKey string: no record with a traceback."""
    sock = _raw_socket(server.port)
    sock.sendall(b"POST /v1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode())
    sock.sendall(b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n[{")
    time.sleep(0.3)
    sock.close()

    async def go():
        async with _ws(server.ws_url) as ws:
            await ws.send('[{"taskType": "authentication", "apiKey": "\\ud800"}]')
            return await _recv(ws)

    frame = run(go())
    time.sleep(0.5)
    assert frame["errors"][0]["code"] == "invalidApiKey" and frame["errors"][0]["parameter"] == "apiKey"
    assert not [r for r in server_log if r.exc_info], [r.getMessage() for r in server_log if r.exc_info]


def test_log_lines_are_rate_limited():
    """The log filter: 1,000 identical lines in a burst write at most 20; a traceback of a client-caused error
    (uvicorn's logger) is reduced to one line."""
    from zimage_core.server.limits import LogLimiter

    lim = LogLimiter(burst=20, window_s=60, no_traceback=("uvicorn",))
    rec = lambda name, exc=None: logging.LogRecord(name, logging.WARNING, "f", 1, "bad %s", ("x",), exc)  # noqa: E731
    assert sum(lim.filter(rec("zimage_core.server")) for _ in range(1000)) == 20
    try:
        raise ValueError("boom")
    except ValueError:
        r = rec("uvicorn.error", sys.exc_info())
    assert lim.filter(r) and r.exc_info is None and "ValueError: boom" in r.getMessage()


# ---- 3. errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest", "non-public"),
        ("http://10.0.0.7:8080/hook", "non-public"),
        ("http://[::1]:9/hook", "non-public"),
        ("ftp://example.com/x", "http(s)"),
    ],
)
def test_outbound_refusals_happen_at_validation_before_any_work(tiny_pipe, url, reason):
    """With outbound calls on, a webhook to a link-local, private or loopback address is invalidParameter naming
    webhookURL, answered before the task is queued (today: accepted, run, refused only in the log)."""
    from zimage_core.service.netpolicy import OutboundPolicy

    with ServerThread(tiny_pipe, api_keys=[KEY], outbound=OutboundPolicy(enabled=True)) as s:

        async def go():
            async with RawClient(s.ws_url, api_key=KEY, ping_every=None) as c:
                await c.send([task(webhookURL=url)])
                return await c.recv()

        frame = run(go())
        completed = s.service.queue.completed
    err = frame["errors"][0]
    assert err["code"] == "invalidParameter" and err["parameter"] == "webhookURL" and reason in err["message"]
    assert completed == 0


# ---- 4. operator input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["--queue", "0"], {}, "--queue"),
        (["--task-timeout", "-1"], {}, "--task-timeout"),
        (["--idle-timeout", "0"], {}, "--idle-timeout"),
        (["--output-ttl", "-5"], {}, "--output-ttl"),
        (["--port", "70000"], {}, "--port"),
        (["--port", "http"], {}, "--port"),
        ([], {"ZIMAGE_PORT": "eighty"}, "--port"),
        (["--api-keys", "/nonexistent/keys.txt"], {}, "--api-keys"),
        (["--outbound-allow-net", "10.0.0.0/33"], {}, "--outbound-allow-net"),
        (["--outbound-timeout", "-2"], {}, "--outbound-timeout"),
        (["--max-connections", "0"], {}, "--max-connections"),
        (["--host", "0.0.0.0"], {"ZIMAGE_API_KEYS": ""}, "--api-keys"),
    ],
)
def test_every_serve_flag_is_validated_in_one_line(args, env, names):
    """Each bad flag ends ``zimage serve`` before the model loads with exit status 1 and one stderr line naming
    the flag (today: --queue 0 is unbounded, negative times are accepted, others print tracebacks)."""
    import os

    e = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    e.pop("ZIMAGE_API_KEYS_FILE", None)
    r = subprocess.run(
        [sys.executable, "-m", "zimage_core", "serve", *args], cwd=ROOT, env=e, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and names in lines[0] and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1", True),
        ("0x7f.1", True),
        ("2130706433", True),
        ("127.255.0.9", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("::1", True),
        ("[::1]", True),
        ("0:0:0:0:0:0:0:1", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("128.0.0.1", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_loopback_is_recognised_in_all_its_spellings(host, loopback):
    """Without keys only a loopback bind is allowed; every spelling of loopback is one (today: 127.1 is refused)."""
    from zimage_core.server.app import Settings

    s = Settings(host=host)
    if loopback:
        s.check()
    else:
        with pytest.raises(SystemExit, match="without API keys"):
            s.check()


def test_metrics_can_require_a_key(tiny_pipe):
    """--metrics-key: /metrics without a key is 401, with a wrong key 401, with a valid Bearer key 200."""
    with ServerThread(tiny_pipe, api_keys=[KEY], metrics_key=True) as s:
        assert _get(f"{s.base}/metrics")[0] == 401
        assert _get(f"{s.base}/metrics", {"Authorization": "Bearer nope"})[0] == 401
        status, body = _get(f"{s.base}/metrics", {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and b"zimage_" in body


def test_image_urls_are_random_uuids(server):
    """URL outputs are named by version-4 UUIDs (122 random bits): distinct, and an unknown name is 404."""

    async def go():
        async with RawClient(server.ws_url, api_key=KEY, ping_every=None) as c:
            t = task(outputType="URL", numberResults=3)
            await c.send([t])
            got = await c.collect({t["taskUUID"]}, {t["taskUUID"]: 3})
            return [it["imageURL"] for it in got[t["taskUUID"]]]

    urls = run(go())
    stems = [u.rsplit("/", 1)[1].split(".")[0] for u in urls]
    assert len(set(stems)) == 3 and all(uuid.UUID(x).version == 4 for x in stems)
    assert _get(f"{server.base}/image/{uuid.uuid4()}.png")[0] == 404


# ---- 3. the library items -------------------------------------------------------------------------------------
def _library_request(**kw) -> dict:
    return {**task(steps=4), **kw}


def test_a_lora_whose_alpha_overflows_is_an_error_on_its_entry(tiny_pipe, tmp_path):
    """alpha 3e38 on a rank-4 LoRA: RequestError on lora[0].model before any step (today: FloatingPointError
    from non-finite latents after the run)."""
    import torch
    from safetensors.torch import save_file

    from zimage_core import RequestError
    from zimage_core.lora import LoraStore
    from zimage_core.service import ServerConfig

    layer = tiny_pipe.transformer.layers[0].attention.to_q
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "transformer.layers.0.attention.to_q.lora_A.weight": torch.randn(4, layer.in_features, generator=g),
            "transformer.layers.0.attention.to_q.lora_B.weight": torch.randn(layer.out_features, 4, generator=g),
            "transformer.layers.0.attention.to_q.alpha": torch.tensor(3e38),
        },
        tmp_path / "civitai_7_1.safetensors",
    )
    cfg = ServerConfig(lora_resolver=LoraStore(tmp_path))
    with pytest.raises(RequestError) as e:
        tiny_pipe.infer(_library_request(lora=[{"model": "civitai:7@1"}]), cfg)
    assert e.value.field == "lora[0].model" and "at most" in e.value.message


def test_a_window_end_percentage_that_rounds_to_step_0_names_the_end_field(tiny_pipe):
    """4 steps, cacheStartStepPercentage 0, cacheEndStepPercentage 10 (floor(0.4) = step 0): the error names the
    end field (today: the start field)."""
    from zimage_core import RequestError

    acc = {"fbCache": True, "cacheStartStepPercentage": 0, "cacheEndStepPercentage": 10}
    with pytest.raises(RequestError) as e:
        tiny_pipe.infer(_library_request(acceleratorOptions=acc))
    assert e.value.field == "acceleratorOptions.cacheEndStepPercentage"
    cn = {"model": "cn", "guideImage": _png(128, 128), "startStepPercentage": 0, "endStepPercentage": 10}
    with pytest.raises(RequestError) as e:
        tiny_pipe.infer(_library_request(controlNet=[cn]))
    assert e.value.field == "controlNet[0].endStepPercentage", e.value.field


def test_a_one_character_face_prompt_is_refused_like_the_main_prompt(tiny_pipe):
    """ultralytics.positivePrompt needs 2 characters, as positivePrompt does (today: 1 is accepted)."""
    from zimage_core import RequestError
    from zimage_core.service import ServerConfig

    cfg = ServerConfig(face_detector=lambda im: [])
    with pytest.raises(RequestError) as e:
        tiny_pipe.infer(_library_request(positivePrompt="a"), cfg)
    assert e.value.field == "positivePrompt"
    with pytest.raises(RequestError) as e:
        tiny_pipe.infer(_library_request(ultralytics={"positivePrompt": "a"}), cfg)
    assert e.value.field == "ultralytics.positivePrompt"


def test_the_library_async_registry_holds_results_by_bytes():
    """The request API's async registry (max_bytes 1,000 here): five finished results of 400 characters each keep
    at most 1,000 bytes + the newest; the oldest reads as "no task", the newest is answered."""
    from zimage_core import RequestError
    from zimage_core.service import TaskRegistry

    reg = TaskRegistry(capacity=100, ttl_s=60, max_bytes=1000)
    ids = [str(uuid.uuid4()) for _ in range(5)]
    for i, tid in enumerate(ids):
        reg.submit(tid, None, lambda i=i: [{"taskUUID": "t", "imageBase64Data": str(i) * 400}])
        end = time.monotonic() + 10
        while reg.get(tid)["status"] == "processing" and time.monotonic() < end:
            time.sleep(0.01)
    assert reg.nbytes <= 1000 + 401, reg.nbytes
    with pytest.raises(RequestError):
        reg.get(ids[0])
    assert reg.get(ids[-1])["data"][0]["imageBase64Data"] == "4" * 400
