"""The mixed soak of the attack tier (issue 23, item 5): ``zimage serve`` (a subprocess on the embedded default
model, keys configured) serves the official ``runware`` client and a raw protocol client while hostile clients
run at the same time, for a bounded time (``SOAK_S``).

Hostile clients connect from 127.0.0.2 (Linux routes all of 127/8 to loopback), so the per-address limit on
failed keys throttles them, not the legitimate clients on 127.0.0.1. They: hold half-open sockets (partial
headers, no bytes, a trickling body), flood wrong keys, send 1 MiB frames before authenticating, 5,000-deep JSON,
frames of 100,000 pings, keyless REST bodies, and disconnect in the middle of REST bodies.

Checked: every legitimate task is answered exactly once (by its taskUUID) with one image; the server's RSS stays
under its RSS after the first legitimate task + ``RSS_BOUND_MB``; /healthz answers every probe, p99 under
``HEALTHZ_P99_MS`` (the measured p99 is printed); the server's log stays under ``LOG_BOUND_BYTES``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import pytest

from tests.server_helpers import ROOT, free_port, wait_ready

pytestmark = pytest.mark.attack

SOAK_S = 40.0  # hostile clients run this long; legitimate tasks are sent during it
RSS_BOUND_MB = 400  # growth over the RSS measured once the first legitimate task is done
HEALTHZ_P99_MS = 1000.0
LOG_BOUND_BYTES = 256 * 1024
KEY = "soak-key"
HOSTILE = "127.0.0.2"
MODEL = "runware:z-image@0"


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Hostiles:
    """Hostile clients in threads (each loop bounded by ``stop``), from 127.0.0.2."""

    def __init__(self, port: int):
        self.port, self.stop, self.threads, self.sent = port, threading.Event(), [], {}

    def _sock(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5, source_address=(HOSTILE, 0))

    def _loop(self, name, fn, pause: float) -> None:
        while not self.stop.is_set():
            try:
                fn()
            except Exception:  # noqa: BLE001 - the server closing on a hostile client is the point
                pass
            self.sent[name] = self.sent.get(name, 0) + 1
            self.stop.wait(pause)

    def half_open(self) -> None:
        socks = []
        for payload in (
            b"",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
            b"POST /v1 HTTP/1.1\r\nContent-Length: 99\r\n\r\n[",
        ):
            for _ in range(10):
                s = self._sock()
                if payload:
                    s.sendall(payload)
                socks.append(s)
        self.stop.wait(3.0)
        for s in socks:
            s.close()

    def ws_frames(self, frames: list[str]) -> None:
        import websockets.sync.client as ws_sync

        with ws_sync.connect(
            f"ws://127.0.0.1:{self.port}/v1", max_size=None, open_timeout=5, proxy=None, source_address=(HOSTILE, 0)
        ) as ws:
            for f in frames:
                ws.send(f)
                try:
                    ws.recv(timeout=2)
                except TimeoutError:
                    pass

    def rest(self, body: bytes, cut: bool = False) -> None:
        s = self._sock()
        try:
            n = len(body) * (10 if cut else 1)
            s.sendall(b"POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % n + body)
            if not cut:
                s.settimeout(5)
                s.recv(4096)
        finally:
            s.close()

    def start(self) -> None:
        wrong = [json.dumps([{"taskType": "authentication", "apiKey": f"guess-{i}"}]) for i in range(5)]
        jobs = [
            ("half_open", self.half_open, 0.0),
            ("wrong_keys", lambda: self.ws_frames(wrong), 0.05),
            ("big_preauth", lambda: self.ws_frames(["[" + " " * 2**20 + "]"]), 0.2),
            ("deep_json", lambda: self.ws_frames(["[" * 5000 + "]" * 5000]), 0.1),
            ("ping_flood", lambda: self.ws_frames([json.dumps([{"taskType": "ping"}] * 100_000)]), 0.3),
            ("rest_keyless", lambda: self.rest(json.dumps([{"taskType": "ping"}] * 10).encode()), 0.05),
            ("rest_cut", lambda: self.rest(b'[{"taskType": "imageInference"', cut=True), 0.05),
        ]
        for name, fn, pause in jobs:
            t = threading.Thread(target=self._loop, args=(name, fn, pause), daemon=True)
            t.start()
            self.threads.append(t)

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(20)


def test_mixed_soak_legitimate_clients_are_served_while_hostile_ones_attack(tmp_path):
    from runware import IImageInference, Runware

    keys = tmp_path / "keys.txt"
    keys.write_text(KEY + "\n")
    log_path = tmp_path / "server.log"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "zimage_core", "serve", "--port", str(port), "--api-keys", str(keys)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    hostiles = Hostiles(port)
    health_ms: list[float] = []
    rss: list[float] = []
    try:
        wait_ready(base, 120)

        async def official(n_tasks: int, answers: dict) -> None:
            client = Runware(api_key=KEY, url=f"ws://127.0.0.1:{port}/v1")
            await client.connect()
            try:
                for i in range(n_tasks):
                    tid = str(uuid.uuid4())
                    req = IImageInference(positivePrompt="a red circle", model=MODEL, width=128, height=128,
                                          steps=1, taskUUID=tid, seed=i, outputType="base64Data")  # fmt: skip
                    images = await asyncio.wait_for(client.imageInference(requestImage=req), 120)
                    answers[tid] = [im.taskUUID for im in images]
            finally:
                await client.disconnect()

        async def raw(n_tasks: int, answers: dict) -> None:
            import websockets

            async with websockets.connect(f"ws://127.0.0.1:{port}/v1", max_size=None) as ws:
                await ws.send(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
                json.loads(await ws.recv())
                tasks = [
                    {"taskType": "imageInference", "taskUUID": str(uuid.uuid4()), "model": MODEL, "steps": 1,
                     "positivePrompt": "a blue square", "width": 128, "height": 128, "seed": 100 + i}
                    for i in range(n_tasks)
                ]  # fmt: skip
                for t in tasks:
                    answers[t["taskUUID"]] = []
                await ws.send(json.dumps(tasks))
                end = time.monotonic() + SOAK_S + 120
                while any(not v for v in answers.values()) and time.monotonic() < end:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), end - time.monotonic()))
                    for it in frame.get("data", []) + frame.get("errors", []):
                        if it.get("taskUUID") in answers:
                            answers[it["taskUUID"]].append(it)
                await asyncio.sleep(2.0)  # a duplicate answer would arrive now
                while True:
                    try:
                        frame = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
                    except asyncio.TimeoutError:
                        break
                    for it in frame.get("data", []) + frame.get("errors", []):
                        if it.get("taskUUID") in answers:
                            answers[it["taskUUID"]].append(it)

        first: dict = {}
        asyncio.run(official(1, first))
        rss_start = _rss_mb(proc.pid)

        def probe():
            while not hostiles.stop.is_set():
                t0 = time.perf_counter()
                with urllib.request.urlopen(f"{base}/healthz", timeout=10) as r:
                    assert r.status == 200
                health_ms.append((time.perf_counter() - t0) * 1000)
                rss.append(_rss_mb(proc.pid))
                hostiles.stop.wait(0.2)

        prober = threading.Thread(target=probe, daemon=True)
        hostiles.start()
        prober.start()
        t0 = time.monotonic()
        official_answers: dict = {}
        raw_answers: dict = {}

        async def legit():
            await asyncio.gather(official(6, official_answers), raw(6, raw_answers))

        asyncio.run(asyncio.wait_for(legit(), SOAK_S + 180))
        hostiles.stop.wait(max(0.0, SOAK_S - (time.monotonic() - t0)))
        hostiles.join()
        prober.join(15)
        health_ok = len(health_ms) > 10
        log_bytes = log_path.stat().st_size
    finally:
        hostiles.join()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    p99 = statistics.quantiles(health_ms, n=100)[98] if len(health_ms) >= 2 else float("inf")
    print(
        f"\nsoak: {SOAK_S:.0f} s, hostile rounds {hostiles.sent}, /healthz probes {len(health_ms)}, p50 "
        f"{statistics.median(health_ms):.1f} ms, p99 {p99:.1f} ms; RSS start {rss_start:.0f} MB, max "
        f"{max(rss):.0f} MB (bound +{RSS_BOUND_MB} MB); log {log_bytes} bytes"
    )
    assert first and all(v == [k] for k, v in first.items())
    assert len(official_answers) == 6 and all(v == [k] for k, v in official_answers.items()), official_answers
    assert len(raw_answers) == 6 and all(len(v) == 1 and "imageUUID" in v[0] for v in raw_answers.values()), {
        k: [it.get("code", "ok") for it in v] for k, v in raw_answers.items()
    }
    assert all(hostiles.sent.get(k, 0) > 0 for k in ("wrong_keys", "big_preauth", "deep_json", "half_open"))
    assert health_ok and p99 < HEALTHZ_P99_MS, p99
    assert max(rss) < rss_start + RSS_BOUND_MB
    assert log_bytes < LOG_BOUND_BYTES, log_path.read_text()[-3000:]
