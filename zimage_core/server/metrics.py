"""Prometheus metrics of the server: what ``GET /metrics`` answers, in the Prometheus text format.

One :class:`Metrics` per server process (per replica under Ray), each with its own registry, so two apps in one
process (tests) never share counters. The server calls a handful of methods:

    m = Metrics(replica="0")
    m.set_queue_depth(n)                              # tasks waiting for the model (gauge)
    m.task_started("imageInference"); m.task_stopped()  # around the model call
    m.task_finished("imageInference", "success", seconds=e2e)          # or outcome "error", code="serverBusy"
    timer = m.step_timer(); ... timer.step()          # once per denoising step (the sampler's step callback)
    m.images_generated(n)
    body, content_type = m.render()

Series (every one carries a ``replica`` label):

| name | type | meaning |
|---|---|---|
| ``zimage_queue_depth`` | gauge | tasks accepted and waiting for the model |
| ``zimage_tasks_in_progress`` | gauge | tasks running on the model now |
| ``zimage_tasks_started_total{task_type}`` | counter | tasks that started running |
| ``zimage_tasks_total{task_type,outcome,code}`` | counter | finished tasks by outcome and error code |
| ``zimage_step_seconds`` | histogram | one denoising step (between consecutive step ends of a result) |
| ``zimage_request_seconds{task_type}`` | histogram | end-to-end latency of a task, from acceptance to its last result |
| ``zimage_images_total`` | counter | images generated (``rate()`` of it is images per second) |
| ``zimage_images_per_second`` | gauge | images generated in the last ``window_s`` seconds / ``window_s`` |
| ``zimage_device_memory_bytes{device,kind}`` | gauge | CUDA ``allocated`` / ``reserved`` / ``max_allocated`` |

``outcome`` is ``success`` or ``error``; ``code`` is the protocol's error code (empty on success). The device memory
series exist only on a machine with CUDA.

:func:`merge_exposition` merges several replicas' texts into one valid exposition (one family per name).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

CONTENT_TYPE = CONTENT_TYPE_LATEST
OUTCOMES = ("success", "error")
# Denoising steps: from a toy model on a CPU (milliseconds) to a 2048² base-model step on a slow GPU (seconds).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class StepTimer:
    """Observes the time between consecutive step ends of one result into ``zimage_step_seconds``.

    The first step of a result is not observed: its interval would include prompt encoding and latent preparation.
    On CUDA the step callback runs before the device finished the step, so the caller passes ``sync`` (e.g.
    ``torch.cuda.synchronize``) to time device work rather than kernel launches.
    """

    def __init__(self, histogram, sync=None):
        self._h = histogram
        self._sync = sync
        self._last: float | None = None
        self._last_i: int | None = None

    def step(self, i: int | None = None) -> float | None:
        """Call at the end of step ``i``; a step index that does not follow the previous one starts a new result."""
        if self._sync is not None:
            self._sync()
        now = time.perf_counter()
        dt = None
        follows = self._last is not None and (i is None or self._last_i is None or i == self._last_i + 1)
        if follows:
            dt = now - self._last
            self._h.observe(dt)
        self._last, self._last_i = now, i
        return dt


class _DeviceMemoryCollector:
    """CUDA memory per device at scrape time (nothing when torch has no CUDA device)."""

    def __init__(self, replica: str):
        self.replica = replica

    def collect(self) -> Iterable[Metric]:
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency
            return
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        g = GaugeMetricFamily(
            "zimage_device_memory_bytes", "CUDA memory by device and kind", labels=["replica", "device", "kind"]
        )
        for d in range(torch.cuda.device_count()):
            dev = f"cuda:{d}"
            g.add_metric([self.replica, dev, "allocated"], float(torch.cuda.memory_allocated(d)))
            g.add_metric([self.replica, dev, "reserved"], float(torch.cuda.memory_reserved(d)))
            g.add_metric([self.replica, dev, "max_allocated"], float(torch.cuda.max_memory_allocated(d)))
        yield g


class Metrics:
    """The server's metrics in their own registry. Thread-safe (prometheus_client's metrics are)."""

    def __init__(self, replica: str = "0", window_s: float = 60.0, registry: CollectorRegistry | None = None):
        self.replica = str(replica)
        self.window_s = float(window_s)
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r, lab = self.registry, ["replica"]
        self.queue_depth = Gauge("zimage_queue_depth", "Tasks accepted and waiting for the model", lab, registry=r)
        self.in_progress = Gauge("zimage_tasks_in_progress", "Tasks running on the model now", lab, registry=r)
        self.started = Counter("zimage_tasks_started", "Tasks that started running", [*lab, "task_type"], registry=r)
        self.finished = Counter(
            "zimage_tasks",
            "Finished tasks by outcome and error code (empty code on success)",
            [*lab, "task_type", "outcome", "code"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "zimage_step_seconds", "Wall time of one denoising step", lab, buckets=STEP_BUCKETS, registry=r
        )
        self.request_seconds = Histogram(
            "zimage_request_seconds",
            "End-to-end latency of a task, from acceptance to its last result",
            [*lab, "task_type"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.images = Counter("zimage_images", "Images generated", lab, registry=r)
        self.images_rate = Gauge(
            "zimage_images_per_second",
            f"Images generated in the last {window_s:g} s divided by that window",
            lab,
            registry=r,
        )
        self.images_rate.labels(self.replica).set_function(self._images_per_second)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        for g in (self.queue_depth, self.in_progress, self.images, self.step_seconds):  # present from the start
            g.labels(self.replica)
        self.registry.register(_DeviceMemoryCollector(self.replica))

    # -- what the server calls ------------------------------------------------------------------------------------
    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.labels(self.replica).set(n)

    def track_queue(self, depth_fn) -> None:
        """Read the queue depth from ``depth_fn()`` at every scrape (instead of :meth:`set_queue_depth`)."""
        self.queue_depth.labels(self.replica).set_function(depth_fn)

    def task_started(self, task_type: str = "imageInference") -> None:
        """A task left the queue and runs on the model (pair with :meth:`task_stopped`)."""
        self.started.labels(self.replica, task_type).inc()
        self.in_progress.labels(self.replica).inc()

    def task_stopped(self) -> None:
        """The model call of a started task returned or raised."""
        self.in_progress.labels(self.replica).dec()

    def task_finished(
        self,
        task_type: str = "imageInference",
        outcome: str = "success",
        code: str | None = None,
        seconds: float | None = None,
    ) -> None:
        """A task ended, whichever way: ran, failed, was cancelled or timed out in the queue, or was rejected before
        it was queued (validation, full queue; no ``seconds`` then)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        self.finished.labels(self.replica, task_type, outcome, code or "").inc()
        if seconds is not None:
            self.request_seconds.labels(self.replica, task_type).observe(seconds)

    def step_timer(self, sync=None) -> StepTimer:
        return StepTimer(self.step_seconds.labels(self.replica), sync)

    def images_generated(self, n: int = 1, now: float | None = None) -> None:
        self.images.labels(self.replica).inc(n)
        with self._lock:
            self._recent.append((time.monotonic() if now is None else now, n))

    def _images_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.window_s

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE


class _Families:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return self.families


def merge_exposition(texts: Iterable[str]) -> bytes:
    """One exposition from several (one per replica): each metric family once, with every replica's samples.

    Concatenating the texts would repeat ``# HELP``/``# TYPE`` lines, which the text format does not allow.
    """
    merged: dict[str, Metric] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            cur = merged.get(fam.name)
            if cur is None:
                merged[fam.name] = fam
            else:
                cur.samples.extend(fam.samples)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Families(list(merged.values())))
    return generate_latest(reg)
