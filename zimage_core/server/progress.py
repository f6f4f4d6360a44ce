"""Per-step progress frames: an opt-in extension of the WebSocket protocol.

A task that carries ``"includeProgress": true`` (stripped at the server edge, so the library never sees it) gets one
frame per denoising step while it runs, before its results:

    {"data": [{"taskType": "imageInference", "taskUUID": "...", "status": "processing", "progress": 25,
               "progressDetails": {"step": 3, "steps": 12, "result": 0, "results": 1, "stepMs": 41.7}}]}

``progress`` is a number, the percentage of the task's steps done (all results together, 0 < progress <= 100,
rounded to 0.01): the official client ``runware-sdk`` hands items whose ``progress`` is a number to its
``on_progress`` callback, and ignores any other shape.

``step`` counts the steps this run executes (1 … ``steps``; image-to-image runs fewer than the request's ``steps``),
``result`` is the 0-based index of the image being generated, ``stepMs`` the wall time since the previous step of the
same result (absent on a result's first step). The item has no ``imageUUID``, so the official clients, which count
only items with one, ignore it even when they are sent; the protocol page allows a result in several frames and
says nothing of progress, hence the opt-in.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..service.engine import RequestError

FIELD = "includeProgress"


def wanted(task: dict) -> bool:
    """Pop the opt-in flag from a (normalized) task. Raises RequestError naming it unless it is a boolean."""
    value = task.pop(FIELD, False)
    if not isinstance(value, bool):
        raise RequestError(FIELD, f"must be true or false, got {type(value).__name__}")
    return value


def callback(send: Callable[[dict], None], task_uuid: str, steps: int, results: int) -> Callable[[dict], None]:
    """A step callback (called in the model's thread) that hands one progress frame per step to ``send``."""
    state = {"result": 0, "last_i": None, "last_t": None}

    def on_step(info: dict) -> None:
        i = int(info.get("i", 0))
        now = time.perf_counter()
        if state["last_i"] is not None and i <= state["last_i"]:
            state["result"] += 1
            state["last_t"] = None
        prog = {"step": i + 1, "steps": steps, "result": state["result"], "results": results}
        if state["last_t"] is not None:
            prog["stepMs"] = round((now - state["last_t"]) * 1000, 3)
        state["last_i"], state["last_t"] = i, now
        percent = round(100.0 * (state["result"] * steps + i + 1) / max(1, steps * results), 2)
        item = {
            "taskType": "imageInference",
            "taskUUID": task_uuid,
            "status": "processing",
            "progress": min(100.0, percent),
            "progressDetails": prog,
        }
        send({"data": [item]})

    return on_step
