"""Async tasks of the library path (``deliveryMethod: async``): bounded, evicted, owner-bound, on a fixed pool.

- A fixed number of worker threads (``workers``) runs the tasks; at most ``capacity`` tasks are held (queued,
  running or finished and not yet expired); a request past that is refused (``RequestError`` on ``deliveryMethod``).
- Finished tasks expire ``ttl_s`` seconds after they finish and are evicted on the next access.
- Finished results are held up to ``max_bytes`` (their text fields, e.g. base64 images); past it the oldest finished
  tasks are forgotten first (reading one then answers "no task"); the newest is always kept.
- A ``taskUUID`` that is still held cannot be reused: the request is refused instead of overwriting another task.
- Each task belongs to the ``owner`` that submitted it (an opaque key, e.g. the API key's identity; ``None`` for a
  single-user library); reading it needs the same owner, and an unknown or foreign task reads the same ("no task").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..errors import RequestError


class TaskRegistry:
    def __init__(self, capacity: int = 256, ttl_s: float = 3600.0, workers: int = 1, max_bytes: int = 1 << 30):
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.workers = workers
        self.max_bytes = max_bytes
        self._tasks: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _evict(self, now: float) -> None:
        for key in [k for k, t in self._tasks.items() if t.get("expires", float("inf")) <= now]:
            del self._tasks[key]

    def submit(self, task_uuid: str, owner, work: Callable[[], list]) -> None:
        key = task_uuid.lower()
        with self._lock:
            self._evict(time.monotonic())
            if key in self._tasks:
                raise RequestError("taskUUID", "is already in use by another task; use a new UUID for each task")
            if len(self._tasks) >= self.capacity:
                raise RequestError(
                    "deliveryMethod", f"the server holds {self.capacity} async tasks already; retry later or use sync"
                )
            self._tasks[key] = {"owner": owner, "status": "processing"}
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="zimage-async")
        self._pool.submit(self._run, key, work)

    def _run(self, key: str, work: Callable[[], list]) -> None:
        try:
            result = {"status": "success", "data": work()}
        except RequestError as e:
            result = {"status": "error", "error": e.to_dict()}
        except Exception as e:  # noqa: BLE001 - reported through get(), never lost in a worker
            result = {"status": "error", "error": {"error": "internal_error", "message": type(e).__name__}}
        size = sum(_text_bytes(item) for item in result.get("data", ()))
        with self._lock:
            if key in self._tasks:
                self._tasks[key].update(result, expires=time.monotonic() + self.ttl_s, nbytes=size)
                self._tasks[key] = self._tasks.pop(key)  # finished order: the newest last
                held = sum(t.get("nbytes", 0) for t in self._tasks.values())
                for old in [k for k, t in self._tasks.items() if "expires" in t and k != key]:
                    if held <= self.max_bytes:
                        break
                    held -= self._tasks.pop(old).get("nbytes", 0)

    @property
    def nbytes(self) -> int:
        """Bytes of the finished results held."""
        with self._lock:
            return sum(t.get("nbytes", 0) for t in self._tasks.values())

    def get(self, task_uuid: str, owner=None) -> dict:
        if not isinstance(task_uuid, str):
            raise RequestError("taskUUID", "must be a string")
        with self._lock:
            self._evict(time.monotonic())
            task = self._tasks.get(task_uuid.lower())
            if task is None or task["owner"] != owner:
                raise RequestError("taskUUID", "no async task with this taskUUID (unknown, expired or not yours)")
            return {k: v for k, v in task.items() if k not in ("owner", "expires", "nbytes")}

    def __len__(self) -> int:
        with self._lock:
            return len(self._tasks)

    def __contains__(self, task_uuid) -> bool:
        with self._lock:
            return isinstance(task_uuid, str) and task_uuid.lower() in self._tasks


def _text_bytes(item) -> int:
    """Characters of the text a result item holds (its base64 image or data URI dominate)."""
    if isinstance(item, str):
        return len(item)
    if isinstance(item, dict):
        return sum(len(v) for v in item.values() if isinstance(v, str))
    return 0
