"""The same server as N replicas on Ray Serve (optional extra: ``pip install '.[ray]'``).

    zimage serve --ray --replicas 2 [--port 8000] [other serve options]           # starts a local Ray
    serve run zimage_core.server.ray_app:app replicas=2 port=8000                  # Ray's own CLI, same app

Each replica is one Ray actor that runs the unchanged ASGI app (``server.build_app``) with its own model, queue and
task registry, on one device (``num_gpus=1`` per replica when the replicas run on CUDA; Ray sets each replica's
``CUDA_VISIBLE_DEVICES``). Ray's HTTP proxy is the one endpoint: it routes each HTTP request, and each WebSocket
connection for its whole life, to a replica with power-of-two-choices on the replicas' ongoing requests; with
``autoscale=True`` Ray adds and removes replicas on that same queue length (``target_ongoing_requests``).

What is shared and what is routed:
- **Task registry: per replica; a WebSocket connection stays on the replica it was routed to.** Sync and async tasks
  and their ``getResponse`` polls on one connection (what the official clients do) are answered by the owner. A
  ``getResponse`` that reaches another replica (a REST poll, or a poll after the client reconnected) is answered
  from the **shared result store**: a named Ray actor to which each replica publishes every async task it accepts
  and then its items or error (bounded, TTL-evicted, keyed by owner digest + taskUUID like the local registry); a
  task still running elsewhere is answered ``status: processing``.
- **``outputType: URL`` images: one folder for all replicas** (of one node): each image is written with a sidecar
  file holding its expiry, so ``GET /image/<uuid>.<ext>`` is answered by whichever replica the proxy picks.
  ``imageUpload`` UUIDs stay per replica (use them on the same WebSocket connection).
- **Metrics: per replica** (label ``replica`` = the replica's rank). Each replica pushes its exposition to a named
  hub actor every second and on every scrape; ``GET /metrics`` on any replica answers all replicas' series merged.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict

log = logging.getLogger("zimage_core.server")

HUB_NAME, HUB_NAMESPACE = "zimage_serve_hub", "zimage"
PUSH_INTERVAL_S = 1.0


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SystemExit("zimage serve --ray needs Ray Serve: pip install 'zimage-fast[ray]'") from None
    return ray, serve


class Hub:
    """Shared by the replicas: their latest metrics texts, and the items of finished async tasks."""

    def __init__(self, max_results: int = 10000, ttl_s: float = 3600.0):
        self.texts: dict[str, str] = {}
        self.results: OrderedDict[tuple[str, str], tuple[float, list, dict | None]] = OrderedDict()
        self.max_results, self.ttl_s = max_results, ttl_s

    def put_metrics(self, replica: str, text: str) -> None:
        self.texts[replica] = text

    def drop_metrics(self, replica: str) -> None:
        self.texts.pop(replica, None)

    def metrics(self) -> dict[str, str]:
        return dict(self.texts)

    def put_result(self, owner: str, task_uuid: str, items: list | None, error: dict | None) -> None:
        """``items=None``: the task is queued or running on its replica."""
        self._evict()
        key = (owner, task_uuid.lower())
        self.results[key] = (time.monotonic(), items, error)
        self.results.move_to_end(key)  # oldest first, so eviction stops at the first live entry
        while len(self.results) > self.max_results:
            self.results.popitem(last=False)

    def get_result(self, owner: str, task_uuid: str):
        self._evict()
        hit = self.results.get((owner, task_uuid.lower()))
        return None if hit is None else (hit[1], hit[2])

    def _evict(self) -> None:
        now = time.monotonic()
        while self.results and now - next(iter(self.results.values()))[0] > self.ttl_s:
            self.results.popitem(last=False)


def _hub_actor(ray):
    """The hub, created on first use (one per Ray namespace; it lives as long as the Ray cluster)."""
    return (
        ray.remote(Hub)
        .options(
            name=HUB_NAME,
            namespace=HUB_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=16,
        )
        .remote()
    )


class RayLink:
    """What a replica's server uses of Ray: the replica label, metrics push/merge, the shared async results."""

    def __init__(self, service):
        ray, serve = _ray()
        self._ray = ray
        ctx = serve.get_replica_context()
        rank = getattr(ctx, "rank", None)
        self.replica = str(getattr(rank, "rank", rank) if rank is not None else ctx.replica_tag)
        self.hub = _hub_actor(ray)
        self.service = service
        self._stop = threading.Event()
        threading.Thread(target=self._push_loop, name="zimage-metrics-push", daemon=True).start()

    def _push_loop(self) -> None:
        while not self._stop.wait(PUSH_INTERVAL_S):
            try:
                self.hub.put_metrics.remote(self.replica, self.service.metrics.render()[0].decode())
            except Exception:  # noqa: BLE001 - the hub is gone (shutdown): stop pushing
                return

    async def metrics_text(self) -> bytes:
        from .metrics import merge_exposition

        own = self.service.metrics.render()[0].decode()
        await self.hub.put_metrics.remote(self.replica, own)
        texts = await self.hub.metrics.remote()
        texts[self.replica] = own
        return merge_exposition(texts[k] for k in sorted(texts))

    def publish_result(self, owner: str, task_uuid: str, items: list | None, error: dict | None) -> None:
        """The outcome of an async task for the other replicas (``items=None``: accepted, not finished yet)."""
        self.hub.put_result.remote(owner, task_uuid, items, error)

    async def find_result(self, owner: str, task_uuid: str):
        return await self.hub.get_result.remote(owner, task_uuid)

    def close(self) -> None:
        self._stop.set()
        try:
            self.hub.drop_metrics.remote(self.replica)
        except Exception:  # noqa: BLE001 - Ray already shut down
            pass


def _shared_store(store):
    """The replica's image store made readable by every replica: same folder, expiry in a sidecar file."""
    from ..service.engine import ImageStore

    class SharedImageStore(ImageStore):
        def put(self, image_uuid: str, data: bytes, extension: str, ttl: int | None = None) -> str:
            name = f"{image_uuid.lower()}.{extension}"
            (self.folder / f"{name}.expires").write_text(repr(time.time() + (ttl or self.default_ttl)))
            return super().put(image_uuid, data, extension, ttl)

        def get(self, name: str) -> bytes | None:
            data = super().get(name)
            if data is not None:
                return data
            sidecar = self.folder / f"{name}.expires"
            try:
                if float(sidecar.read_text()) > time.time():
                    return (self.folder / name).read_bytes()
            except (OSError, ValueError):
                pass
            sidecar.unlink(missing_ok=True)
            return None

    return SharedImageStore(str(store.folder), store.base_url, store.default_ttl, store.max_items)


class ZImageReplica:
    """One replica: the server's Service and its ASGI app, built inside the replica process."""

    def __init__(self, settings_kwargs: dict):
        from .app import Service, Settings
        from .metrics import Metrics

        settings = Settings(**settings_kwargs)
        self.service = Service(settings)
        if settings.output_dir:  # one folder for all replicas (run() and app() always give one)
            self.service.store = _shared_store(self.service.store)
        self.service.ray = RayLink(self.service)
        self.service.metrics = Metrics(replica=self.service.ray.replica)

    def __serve_build_asgi_app__(self):
        from .app import build_app

        return build_app(self.service)

    def __del__(self):
        link = getattr(getattr(self, "service", None), "ray", None)
        if link is not None:
            link.close()


def deployment(
    settings_kwargs: dict,
    replicas: int = 2,
    autoscale: bool = False,
    max_replicas: int | None = None,
    target_ongoing_requests: float = 2.0,
    gpus_per_replica: float | None = None,
    cpus_per_replica: float = 1.0,
    max_ongoing_requests: int = 64,
):
    """The bound Ray Serve application. ``gpus_per_replica`` defaults to 1 when this machine has CUDA."""
    _, serve = _ray()
    if gpus_per_replica is None:
        import torch

        gpus_per_replica = 1.0 if torch.cuda.is_available() and settings_kwargs.get("device") != "cpu" else 0.0
    options: dict = {
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        # Connections and requests beyond the server's own queue are refused by the server (serverBusy), so Ray's
        # per-replica cap only needs to be above the number of concurrent WebSocket connections a replica holds.
        "max_ongoing_requests": max_ongoing_requests,
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": settings_kwargs.get("shutdown_grace_s", 30.0),
    }
    if autoscale:
        top = max(max_replicas or replicas, 1)
        options["autoscaling_config"] = {
            "min_replicas": 1,
            "initial_replicas": min(max(replicas, 1), top),
            "max_replicas": top,
            "target_ongoing_requests": target_ongoing_requests,
        }
    else:
        options["num_replicas"] = replicas
    cls = serve.deployment(name="zimage", **options)(serve.ingress()(ZImageReplica))
    return cls.bind(settings_kwargs)


def _settings_kwargs(settings) -> dict:
    """A Settings as keyword arguments a replica can rebuild it from (host/port are Ray's proxy's); without an
    ``output_dir``, a new temporary folder that all replicas share for ``outputType: URL`` images."""
    import dataclasses
    import tempfile

    kw = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    if not kw.get("output_dir"):
        kw["output_dir"] = _OWN_OUTPUTS[0] = tempfile.mkdtemp(prefix="zimage-ray-outputs-")
    return kw


_OWN_OUTPUTS: list[str | None] = [None]  # the folder run() created (removed by shutdown())


def run(settings, replicas: int = 2, autoscale: bool = False, max_replicas: int | None = None, block: bool = True):
    """Start a local Ray (or join ``RAY_ADDRESS``), deploy ``replicas`` replicas behind Ray's proxy on
    ``settings.host:settings.port``, and (``block=True``) serve until SIGINT/SIGTERM, then shut down cleanly."""
    ray, serve = _ray()
    settings.check()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(
            address=address,
            # logical CPUs: one per replica even on a machine with fewer cores (a local cluster only)
            num_cpus=None if address else max(os.cpu_count() or 1, replicas),
            include_dashboard=False,
            log_to_driver=bool(os.environ.get("ZIMAGE_RAY_LOG")),
            configure_logging=False,
        )
    serve.start(http_options={"host": settings.host, "port": settings.port}, logging_config={"log_level": "WARNING"})
    app = deployment(_settings_kwargs(settings), replicas=replicas, autoscale=autoscale, max_replicas=max_replicas)
    serve.run(app, name="zimage", route_prefix="/", blocking=False)
    log.info("Ray Serve: %d replica(s) on http://%s:%d (WebSocket /v1)", replicas, settings.host, settings.port)
    if not block:
        return
    import signal

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        shutdown()


def shutdown() -> None:
    """Delete the app (replicas drain: ``graceful_shutdown_timeout_s``), the hub, Serve and the local Ray."""
    ray, serve = _ray()
    if not ray.is_initialized():
        return
    try:
        serve.shutdown()
    finally:
        try:
            ray.kill(ray.get_actor(HUB_NAME, namespace=HUB_NAMESPACE))
        except ValueError:
            pass
        ray.shutdown()
        if _OWN_OUTPUTS[0]:
            import shutil

            shutil.rmtree(_OWN_OUTPUTS[0], ignore_errors=True)
            _OWN_OUTPUTS[0] = None


def app(args: dict):
    """Builder for ``serve run zimage_core.server.ray_app:app replicas=2 model=PATH ...``: the keys are the
    server's Settings fields (``queue``, ``model``, ``device``, ...) plus ``replicas`` and ``autoscale``. Give
    ``output_dir=FOLDER`` for the replicas' shared ``outputType: URL`` images; otherwise a temporary folder is created
    and left in place when ``serve run`` stops."""
    from .app import Settings

    args = dict(args)
    replicas = int(args.pop("replicas", 2))
    autoscale = str(args.pop("autoscale", "false")).lower() in ("1", "true", "yes")
    max_replicas = int(args.pop("max_replicas", replicas))
    settings = Settings()
    kw = _settings_kwargs(settings)
    for k, v in args.items():
        if k not in kw:
            raise ValueError(f"serve run: unknown argument {k!r}; known: {sorted(kw)} and replicas, autoscale")
        kw[k] = type(kw[k])(v) if isinstance(kw[k], (int, float)) and not isinstance(kw[k], bool) else v
    return deployment(kw, replicas=replicas, autoscale=autoscale, max_replicas=max_replicas)
