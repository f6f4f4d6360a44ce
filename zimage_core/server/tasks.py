"""The server's task table (bounded, TTL-evicted, per-key) and the bounded work queue in front of the one model.

The table records every task the server accepted (sync and async), so resends and ``getResponse`` are answered
from it; it is not the request API's async :class:`~zimage_core.service.TaskRegistry`, which runs async tasks of
the library path on its own pool (the server runs its tasks on the work queue below).

Both live on the server's event loop; only the model call runs in a worker thread. A task is keyed by (owner,
taskUUID), where the owner is a digest of the API key that submitted it, so one key never sees another's tasks.
A repeated taskUUID from the same key while the first is pending or recently done is answered from the first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .protocol import ApiError

log = logging.getLogger("zimage_core.server")

PENDING, RUNNING, SUCCESS, ERROR = "pending", "running", "success", "error"


@dataclass(eq=False)
class Task:
    owner: str
    task_uuid: str
    fingerprint: str  # digest of the request, to tell a resend from a different request with the same UUID
    created: float = field(default_factory=time.monotonic)
    status: str = PENDING
    items: list = field(default_factory=list)
    error: ApiError | None = None
    finished: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    connection: object | None = None  # the connection whose disconnect cancels it before it starts (sync tasks)
    cancelled: bool = False
    held: int = 0  # bytes of its result counted against the server's held-result budget

    def finish(self, items: list | None = None, error: ApiError | None = None) -> None:
        if self.done.is_set():
            return
        self.items, self.error = items or [], error
        if error is not None:
            error.outcome = True  # the task's recorded outcome: a resend is answered with it (see app._rest_status)
        self.status = ERROR if error else SUCCESS
        self.finished = time.monotonic()
        self.done.set()


class TaskTable:
    """The server's tasks by (owner, taskUUID): at most ``capacity``; finished ones expire ``ttl_s`` after finishing."""

    def __init__(self, capacity: int = 10000, ttl_s: float = 3600.0):
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._tasks: OrderedDict[tuple[str, str], Task] = OrderedDict()
        self.on_drop: Callable[[Task], None] | None = None  # told of each task the table forgets

    def _drop(self, key) -> None:
        task = self._tasks.pop(key)
        if self.on_drop is not None:
            self.on_drop(task)

    def finished(self) -> list[Task]:
        """The finished tasks, oldest first."""
        return [t for t in self._tasks.values() if t.done.is_set()]

    def __len__(self) -> int:
        return len(self._tasks)

    def get(self, owner: str, task_uuid: str) -> Task | None:
        self.evict()
        return self._tasks.get((owner, task_uuid.lower()))

    def add(self, task: Task) -> None:
        self.evict()
        if len(self._tasks) >= self.capacity:  # drop the oldest finished tasks before refusing
            for key in [k for k, t in self._tasks.items() if t.done.is_set()][: len(self._tasks) - self.capacity + 1]:
                self._drop(key)
        if len(self._tasks) >= self.capacity:
            raise ApiError("serverBusy", "the task registry is full; retry later")
        self._tasks[(task.owner, task.task_uuid.lower())] = task

    def remove(self, task: Task) -> None:
        key = (task.owner, task.task_uuid.lower())
        if self._tasks.get(key) is task:
            self._drop(key)

    def evict(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        old = [k for k, t in self._tasks.items() if t.finished is not None and now - t.finished > self.ttl_s]
        for k in old:
            self._drop(k)
        return len(old)


class Aborted(Exception):
    """Raised from the step callback to stop a running task (deadline passed, or shutdown grace over)."""

    def __init__(self, error: ApiError):
        self.error = error


@dataclass
class Job:
    task: Task
    run: Callable[[Callable], list]  # run(step_callback) -> response items; called in the worker thread
    deadline: float  # time.monotonic() seconds
    on_step: Callable | None = None  # called with the sampler's step info after each step (progress frames)
    post: Callable | None = None  # async post(items) -> items, run after the model (outbound calls), off the worker


def _device_sync():
    """``torch.cuda.synchronize`` when the model may run on CUDA (step times then measure device work)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return lambda: torch.cuda.synchronize() if torch.cuda.is_initialized() else None


class WorkQueue:
    """A bounded queue of jobs in front of one model; one worker thread runs them in order."""

    def __init__(self, maxsize: int, ready: asyncio.Event | None = None, metrics=None):
        self.maxsize = maxsize
        self.metrics = metrics  # service.metrics.Metrics: tasks started/stopped, step times
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="zimage-model")
        self._worker: asyncio.Task | None = None
        self.running: Job | None = None
        self.accepting = True
        self.abort_running: ApiError | None = None  # set to make the running job stop at its next step
        self.ready = ready or asyncio.Event()
        self.completed = 0
        self._posts: set[asyncio.Task] = set()

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    def qsize(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        if not self.accepting:
            raise ApiError("shuttingDown")
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise ApiError("serverBusy", f"the queue is full ({self.maxsize} tasks waiting); retry later") from None

    async def _work(self) -> None:
        await self.ready.wait()
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            task = job.task
            if task.cancelled or task.done.is_set():
                continue
            if time.monotonic() > job.deadline:
                task.finish(error=ApiError("timeout", "the task waited in the queue past its deadline"))
                continue
            task.status = RUNNING
            self.running = job
            timer = None
            if self.metrics is not None:
                self.metrics.task_started()
                timer = self.metrics.step_timer(_device_sync())

            def step(_info, job=job, timer=timer):
                if timer is not None:
                    timer.step(_info.get("i"))
                if job.on_step is not None:
                    job.on_step(_info)
                if self.abort_running is not None:
                    raise Aborted(self.abort_running)
                if time.monotonic() > job.deadline:
                    raise Aborted(ApiError("timeout", "the task ran past its deadline"))

            try:
                items = await loop.run_in_executor(self._executor, job.run, step)
                if job.post is None:
                    task.finish(items)
                else:
                    self._posts.add(t := loop.create_task(self._post(job, items)))
                    t.add_done_callback(self._posts.discard)
            except Aborted as e:
                task.finish(error=e.error)
            except ApiError as e:
                task.finish(error=e)
            except Exception as e:  # noqa: BLE001 - reported to the client as internalError, logged here
                from ..service.engine import RequestError

                if isinstance(e, RequestError):
                    task.finish(error=ApiError.from_request_error(e))
                else:
                    log.exception("task %s failed", task.task_uuid)
                    task.finish(error=ApiError("internalError", "the task failed inside the server"))
            finally:
                self.running = None
                self.completed += 1
                if self.metrics is not None:
                    self.metrics.task_stopped()

    async def _post(self, job: Job, items: list) -> None:
        try:
            job.task.finish(await job.post(items))
        except ApiError as e:
            job.task.finish(error=e)
        except Exception:  # noqa: BLE001
            log.exception("task %s: delivery failed", job.task.task_uuid)
            job.task.finish(error=ApiError("internalError", "delivering the result failed"))

    def fail_queued(self, error: ApiError) -> int:
        n = 0
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.task.done.is_set():
                job.task.finish(error=error)
                n += 1
        return n

    async def drain(self, grace_s: float) -> None:
        """Stop accepting, fail what is queued, give the running job ``grace_s`` to finish, then abort it."""
        self.accepting = False
        self.fail_queued(ApiError("shuttingDown", "the server is shutting down; the task did not start"))
        job = self.running
        if job is not None:
            try:
                await asyncio.wait_for(job.task.done.wait(), grace_s)
            except asyncio.TimeoutError:
                self.abort_running = ApiError("shuttingDown", "the server shut down while the task ran")
                await job.task.done.wait()
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
