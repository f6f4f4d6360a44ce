"""Start the server in-process (a uvicorn thread) or as a subprocess on 127.0.0.1, and a raw WebSocket client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, timeout: float = 120.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"{base}/healthz?ready=1", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"server at {base} not ready after {timeout} s")


def health(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
        return json.loads(r.read())


class ServerThread:
    """The server in a thread of this process, on the given pipeline; ``service`` is inspectable."""

    def __init__(self, pipe, **settings):
        from zimage_core.server.app import Settings, make_server

        self.port = free_port()
        settings.setdefault("shutdown_grace_s", 1.0)  # tests do not wait for a slow task at teardown
        self.settings = Settings(host="127.0.0.1", port=self.port, **settings)
        self.server, self.service = make_server(self.settings, pipe)
        self.server.config.log_level = "warning"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self.thread.start()
        wait_ready(self.base, 30)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)


@contextlib.contextmanager
def server_process(*args: str, env: dict | None = None, timeout: float = 120.0):
    """``python -m zimage_core serve`` on the default model as a subprocess; yields (Popen, base URL, port)."""
    port = free_port()
    state = tempfile.mkdtemp(prefix="zimage-state-")  # durable async results: not under the user's home
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ZIMAGE_STATE_DIR": state, **(env or {})}
    cmd = [sys.executable, "-m", "zimage_core", "serve", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout)
        yield proc, base, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        shutil.rmtree(state, ignore_errors=True)


def task(prompt: str = "a red circle", **kw) -> dict:
    t = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "runware:z-image@0",
        "positivePrompt": prompt,
        "width": 128,
        "height": 128,
        "steps": 1,
        "outputType": "base64Data",
        "outputFormat": "PNG",
    }
    t.update(kw)
    return t


class RawClient:
    """A bare protocol client (the ``websockets`` library): frames in, frames out, nothing hidden."""

    def __init__(self, url: str, api_key: str = "test-key", ping_every: float | None = 5.0):
        self.url, self.api_key, self.ping_every = url, api_key, ping_every  # the official clients ping every 5 s
        self.ws = None
        self._pinger = None

    async def __aenter__(self):
        import websockets

        self.ws = await websockets.connect(self.url, max_size=None)
        await self.send([{"taskType": "authentication", "apiKey": self.api_key}])
        self.auth = await self.recv()
        if self.ping_every:
            self._pinger = asyncio.get_running_loop().create_task(self._ping())
        return self

    async def _ping(self):
        with contextlib.suppress(Exception):
            while True:
                await asyncio.sleep(self.ping_every)
                await self.send([{"taskType": "ping", "ping": True}])

    async def __aexit__(self, *exc):
        if self._pinger is not None:
            self._pinger.cancel()
        await self.ws.close()

    async def send(self, tasks: list[dict]) -> None:
        await self.ws.send(json.dumps(tasks))

    async def recv(self, timeout: float = 60.0, pongs: bool = False) -> dict:
        """The next frame (pong answers to the background pings are skipped unless ``pongs``)."""
        end = time.monotonic() + timeout
        while True:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), max(0.01, end - time.monotonic())))
            if pongs or frame != {"data": [{"taskType": "ping", "pong": True}]}:
                return frame

    async def collect(self, uuids: set[str], per_task: dict[str, int], timeout: float = 60.0) -> dict[str, list]:
        """Frames until each taskUUID got its expected number of result items or an error: {uuid: [items]}."""
        got: dict[str, list] = {u: [] for u in uuids}
        end = time.monotonic() + timeout
        while any(not _complete(got[u], per_task.get(u, 1)) for u in uuids):
            frame = await self.recv(max(0.1, end - time.monotonic()))
            for it in frame.get("data", []) + frame.get("errors", []):
                if it.get("taskUUID") in got:
                    got[it["taskUUID"]].append(it)
        return got


def _complete(items: list, n: int) -> bool:
    return any("code" in it for it in items) or sum("imageUUID" in it for it in items) >= n
