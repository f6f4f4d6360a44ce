"""Bounded load test: 200 requests from 16 concurrent WebSocket connections on the embedded default model (128x128,
1 step), some invalid and some cancelled by their client disconnecting. Every valid request is answered exactly once
with its own result, every invalid one with an error naming its field, and the server stays healthy."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tests.server_helpers import RawClient, ServerThread, health, task

CONNECTIONS, REQUESTS = 16, 200
INVALID = [({"width": 130}, "width"), ({"steps": 0}, "steps"), ({"scheduler": "Eulerr"}, "scheduler"),
           ({"outputQuality": 5}, "outputQuality")]  # fmt: skip


@pytest.fixture(scope="module")
def default_pipe():
    from zimage_core.pipeline import ZImage

    return ZImage.default(device="cpu")


def test_load_200_requests_16_connections(default_pipe):
    rng = random.Random(0)
    plan: list[list[tuple[dict, str | None]]] = [[] for _ in range(CONNECTIONS)]
    for i in range(REQUESTS):
        t = task(seed=1000 + i, outputType=rng.choice(["base64Data", "URL"]))
        field = None
        if i % 10 == 3:
            bad, field = INVALID[i % len(INVALID)]
            t.update(bad)
        plan[i % CONNECTIONS].append((t, field))
    cancelling = {3, 11}  # these connections disconnect right after sending: their queued tasks are cancelled

    async def connection(k: int, s: ServerThread):
        async with RawClient(s.ws_url, api_key=f"key-{k % 4}") as c:
            items = plan[k]
            for j in range(0, len(items), 3):  # frames of up to three tasks
                await c.send([t for t, _ in items[j : j + 3]])
            if k in cancelling:
                return k, {}
            mine = {t["taskUUID"] for t, _ in items}
            got = await c.collect(mine, {}, timeout=240)
            try:  # nothing more may arrive for these tasks (exactly once)
                while True:
                    f = await c.recv(timeout=0.5)
                    for it in f.get("data", []) + f.get("errors", []):
                        got.setdefault(it.get("taskUUID"), []).append(it)
            except asyncio.TimeoutError:
                pass
            return k, got

    with ServerThread(default_pipe, queue=256, registry_size=1000) as s:

        async def go():
            return await asyncio.gather(*(connection(k, s) for k in range(CONNECTIONS)))

        t0 = time.monotonic()
        results = asyncio.run(go())
        took = time.monotonic() - t0
        reg = s.service.registry
        cancelled = sum(1 for t in reg._tasks.values() if t.error is not None and t.error.code == "cancelled")
        h = health(s.base)

        async def after():
            async with RawClient(s.ws_url) as c:
                t = task(seed=1)
                await c.send([t])
                return await c.collect({t["taskUUID"]}, {})

        fresh = asyncio.run(after())

    answered = 0
    for k, got in results:
        if k in cancelling:
            continue
        for t, field in plan[k]:
            items = got[t["taskUUID"]]
            assert len(items) == 1, (t["taskUUID"], items)
            it = items[0]
            assert it["taskUUID"] == t["taskUUID"]
            if field is None:
                assert "imageUUID" in it and it["seed"] == t["seed"], it  # its own result, not another task's
                assert ("imageURL" in it) == (t["outputType"] == "URL")
            else:
                assert it["code"] == "invalidParameter" and it["parameter"] == field, it
            answered += 1
        assert set(got) == {t["taskUUID"] for t, _ in plan[k]}  # no frame for someone else's task
    assert answered == sum(len(plan[k]) for k in range(CONNECTIONS) if k not in cancelling)
    assert cancelled > 0  # some queued tasks of the disconnected clients never ran
    assert h["ready"] and h["queued"] == 0
    assert "imageUUID" in next(iter(fresh.values()))[0]
    print(f"\nload: {REQUESTS} requests, {CONNECTIONS} connections, {took:.1f} s, {cancelled} cancelled")
