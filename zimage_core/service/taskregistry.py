"""Async tasks of the library path (``deliveryMethod: async``): bounded, evicted, owner-bound, on a fixed pool.

- A fixed number of worker threads (``workers``) runs the tasks; at most ``capacity`` tasks are held (queued,
  running or finished and not yet expired); a request past that is refused (``RequestError`` on ``deliveryMethod``).
- Finished tasks expire ``ttl_s`` seconds after they finish and are evicted on the next access.
- Finished results are also bounded in bytes (``max_bytes``, the size of their text: base64 images, data URIs,
  URLs): when a result would take the held total past it, the oldest finished results are evicted first; a single
  result larger than the whole budget is replaced by an error on ``numberResults`` (never held).
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
    def __init__(self, capacity: int = 256, ttl_s: float = 3600.0, workers: int = 1, max_bytes: int = 256 * 2**20):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0  # held by finished results
        self.ttl_s = ttl_s
        self.workers = workers
        self._tasks: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _evict(self, now: float) -> None:
        for key in [k for k, t in self._tasks.items() if t.get("expires", float("inf")) <= now]:
            self._drop(key)

    def _drop(self, key: str) -> None:
        self.bytes -= self._tasks.pop(key).get("bytes", 0)

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
        size = _size(result)
        if size > self.max_bytes:
            n = len(result.get("data") or [])
            msg = f"the {n} result(s) take {size} bytes, more than the {self.max_bytes} bytes this registry holds; "
            err = RequestError("numberResults", msg + "ask for fewer or smaller")
            result = {"status": "error", "error": err.to_dict()}
            size = _size(result)
        with self._lock:
            if key in self._tasks:
                finished = [k for k, t in self._tasks.items() if "bytes" in t]  # in finishing order (dict order)
                finished.sort(key=lambda k: self._tasks[k]["finished"])
                while self.bytes + size > self.max_bytes and finished:
                    self._drop(finished.pop(0))
                self._tasks[key].update(result, expires=time.monotonic() + self.ttl_s, bytes=size)
                self._tasks[key]["finished"] = time.monotonic()
                self.bytes += size

    @property
    def nbytes(self) -> int:
        """Bytes of the finished results held."""
        with self._lock:
            return self.bytes

    def get(self, task_uuid: str, owner=None) -> dict:
        if not isinstance(task_uuid, str):
            raise RequestError("taskUUID", "must be a string")
        with self._lock:
            self._evict(time.monotonic())
            task = self._tasks.get(task_uuid.lower())
            if task is None or task["owner"] != owner:
                raise RequestError("taskUUID", "no async task with this taskUUID (unknown, expired or not yours)")
            return {k: v for k, v in task.items() if k not in ("owner", "expires", "bytes", "finished")}

    def __len__(self) -> int:
        with self._lock:
            return len(self._tasks)

    def __contains__(self, task_uuid) -> bool:
        with self._lock:
            return isinstance(task_uuid, str) and task_uuid.lower() in self._tasks


def _size(obj) -> int:
    """Bytes a result holds, counted as the length of its strings (images dominate) plus 16 per other value."""
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(_size(k) + _size(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(_size(v) for v in obj) + 16
    return 16
