"""The network server: the hosted API's WebSocket and REST protocol on ``/v1`` (Starlette on uvicorn).

    zimage serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--api-keys FILE] [--queue N] ...

Routes: ``/v1`` (WebSocket, and ``POST`` of a task array), ``GET /image/<uuid>.<ext>`` (``outputType: URL``
outputs, kept for their ``ttl``), ``GET /healthz`` (liveness; ``?ready=1`` answers 503 until the model is loaded).
``GET /`` (the playground page), ``GET /metrics`` (Prometheus text format).
One model instance behind a bounded queue; see README "Serving" for the protocol, the error codes and the limits.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import os
import signal
import socket
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from ..service import engine
from ..service.engine import RequestError
from . import durable, limits, playground, progress
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .protocol import ERROR_CODES, ApiError, clip, normalize_inference, parse_frame
from .tasks import PENDING, Job, Task, TaskTable, WorkQueue

log = logging.getLogger("zimage_core.server")

ORPHAN_TTL_S = 600.0  # a reconnecting client's undelivered results are kept this long for its session
MAX_ORPHANS = 1000  # sessions with undelivered results, at most
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # decoded at the edge; anything else is refused
CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)  # empty: any key is accepted, and only a loopback bind
    queue: int = 16  # tasks waiting for the model; one more is serverBusy / HTTP 429
    task_timeout_s: float = 300.0  # deadline per task, from submission (queue wait + run)
    idle_timeout_s: float = 60.0  # a WebSocket that sends nothing (clients ping every 5 s) for this long is closed
    poll_hold_s: float = 20.0  # a getResponse for a running task waits up to this long for it to finish
    registry_size: int = 10000
    registry_ttl_s: float = 3600.0  # finished tasks stay answerable (getResponse, resends) this long
    output_ttl_s: int = 3600  # URL outputs without a ttl are kept this long
    output_items: int = 10000
    output_bytes: int = 2 * 2**30  # URL outputs and uploads kept on disk, at most (oldest evicted first)
    output_dir: str | None = None
    public_url: str | None = None  # base of imageURL (default http://HOST:PORT)
    lora_dir: str | None = None  # LoRA store: lora[].model "<id>" is <lora_dir>/<id>.safetensors
    content_checker: object | None = None  # callable(PIL image) -> True when NSFW; enables safety.checkContent
    face_detector: object | None = None  # callable(PIL image) -> [(x0, y0, x1, y1, confidence)]; enables ultralytics
    results_dir: str | None = None  # durable async results (survive a restart); None: memory only (see durable.py)
    results_items: int = 1000
    results_bytes: int = 512 * 2**20
    max_frame_bytes: int = 96 * 2**20  # WebSocket frame / REST body limit (base64 images are large)
    preauth_frame_bytes: int = 64 * 2**10  # the same limit until the connection's key is checked
    max_json_depth: int = 16  # nesting of a frame (a task is 5 deep at most), checked before parsing
    max_tasks_per_frame: int = 64  # task objects in one frame, checked before parsing
    max_connections: int = 256  # open connections (HTTP + WebSocket) for any route
    health_headroom: int = 16  # more connections that may only ask /healthz
    header_timeout_s: float = 10.0  # an HTTP request's headers must arrive within this
    body_timeout_s: float = 60.0  # ... and its body within this
    http_idle_timeout_s: float = 5.0  # a kept-alive HTTP connection idle this long is closed
    auth_failures: int = 10  # failed authentications per client address per auth_window_s; more: rateLimited
    auth_window_s: float = 60.0
    held_result_bytes: int = 1 * 2**30  # finished results kept for resends/getResponse, all keys together
    held_result_bytes_per_key: int = 256 * 2**20  # ... and per API key (the result that just finished is kept)
    upload_bytes: int = 512 * 2**20  # decoded uploads kept in memory for seedImage/maskImage references
    pending_polls: int = 8  # getResponse calls one WebSocket may have waiting; more are answered at once
    metrics_key: bool = False  # /metrics needs an API key (Authorization: Bearer) when keys are configured
    log_burst: int = 20  # lines of one kind per 10 s in the log; more are counted, not written
    shutdown_grace_s: float = 30.0  # on SIGTERM the running task gets this long to finish
    outbound: engine.OutboundPolicy = field(default_factory=engine.OutboundPolicy)
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    kernels: str | None = None
    quantize: str | None = None  # "fp8": e4m3 W8A8 main layers (docs/fp8.md)

    def check(self) -> None:
        """Refuse configurations the server must not run with, in one line naming the flag: a value out of its
        range (:data:`RANGES`), no keys on a non-loopback address."""
        for name, (flag, lo, hi) in RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise SystemExit(f"zimage serve: {flag} must be a number in [{lo}, {hi}], got {clip(repr(value))}")
        deadline = self.outbound.deadline_s
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0.001 <= deadline <= 3600:
            raise SystemExit(f"zimage serve: --outbound-timeout must be a number in [0.001, 3600], got {deadline!r}")
        if self.host.startswith("[") and self.host.endswith("]"):
            self.host = self.host[1:-1]  # [::1]: the address inside the URL brackets
        if not self.api_keys and not _is_loopback(self.host):
            raise SystemExit(
                f"zimage serve: refusing to bind {self.host} without API keys; give --api-keys FILE or "
                "ZIMAGE_API_KEYS, or bind 127.0.0.1"
            )


# Settings field -> (the zimage serve flag that sets it, lowest, highest): the one range table of the server.
_DAY = 86400.0
RANGES: dict[str, tuple[str, float, float]] = {
    "port": ("--port", 1, 65535),
    "queue": ("--queue", 1, 100000),
    "task_timeout_s": ("--task-timeout", 0.001, 7 * _DAY),
    "idle_timeout_s": ("--idle-timeout", 0.001, _DAY),
    "poll_hold_s": ("poll_hold_s", 0, 3600),
    "registry_size": ("registry_size", 1, 10**7),
    "registry_ttl_s": ("registry_ttl_s", 0.001, 30 * _DAY),
    "output_ttl_s": ("--output-ttl", 1, 30 * _DAY),
    "output_items": ("output_items", 1, 10**7),
    "output_bytes": ("output_bytes", 1, 2**50),
    "max_frame_bytes": ("max_frame_bytes", 1024, 2**31),
    "preauth_frame_bytes": ("preauth_frame_bytes", 1024, 2**31),
    "max_json_depth": ("max_json_depth", 4, 1000),
    "max_tasks_per_frame": ("max_tasks_per_frame", 1, 100000),
    "shutdown_grace_s": ("--shutdown-grace", 0, _DAY),
    "max_connections": ("--max-connections", 1, 10**6),
    "health_headroom": ("health_headroom", 1, 10**6),
    "header_timeout_s": ("header_timeout_s", 0.001, 3600),
    "body_timeout_s": ("body_timeout_s", 0.001, _DAY),
    "http_idle_timeout_s": ("http_idle_timeout_s", 0.001, 3600),
    "auth_failures": ("auth_failures", 0, 10**6),
    "auth_window_s": ("auth_window_s", 0.001, _DAY),
    "held_result_bytes": ("held_result_bytes", 1, 2**50),
    "held_result_bytes_per_key": ("held_result_bytes_per_key", 1, 2**50),
    "upload_bytes": ("upload_bytes", 1, 2**50),
    "pending_polls": ("pending_polls", 0, 10**6),
    "log_burst": ("log_burst", 1, 10**6),
}


def _is_loopback(host: str) -> bool:
    """Loopback in every spelling a bind address may take: localhost (a trailing dot too), 127.x.y.z and its short
    forms (127.1, 0x7f.1), ::1 (with brackets, zeros written out, a zone) and ::ffff:127.0.0.1."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(h.split("%", 1)[0])
    except ValueError:
        try:
            ip = ipaddress.ip_address(socket.inet_aton(h))  # the inet_aton forms getaddrinfo also accepts
        except (OSError, ValueError):
            return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def decode_image(value, field_name: str):
    """A client image (base64 or data URI) decoded with the format allow-list and the library's size caps; an
    imageUUID is returned unchanged (the library resolves it). Raises RequestError naming the field."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, str) or not value.strip():
        raise RequestError(field_name, "must be a base64 image, a data URI or an imageUUID")
    value = value.strip()
    if engine.is_image_uuid(value):
        return value
    if value.lower().startswith(("http://", "https://", "ftp://", "file://")):
        raise RequestError(field_name, "fetching images from URLs is disabled; send base64, a data URI or an imageUUID")
    payload = value.split(",", 1)[1] if value[:5].lower() == "data:" and "," in value[:100] else value
    if len(payload) > engine.MAX_INPUT_BYTES * 4 // 3 + 4:
        raise RequestError(field_name, f"image is larger than {engine.MAX_INPUT_BYTES // 2**20} MiB")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        msg = f"is neither base64, a data URI nor an imageUUID (got {clip(value)!r})"
        raise RequestError(field_name, msg) from None
    try:
        with Image.open(io.BytesIO(raw), formats=INPUT_FORMATS) as im:
            if im.width * im.height > engine.MAX_INPUT_PIXELS:
                raise RequestError(
                    field_name, f"image of {im.width}x{im.height} exceeds {engine.MAX_INPUT_PIXELS} pixels"
                )
            im.seek(0)  # GIF: the first frame
            im.load()
            return im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") and "transparency" in im.info else "RGB")
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError, EOFError):
        raise RequestError(field_name, f"is not a decodable {'/'.join(INPUT_FORMATS)} image") from None


def _fingerprint(task: dict) -> str:
    return hashlib.sha256(json.dumps(task, sort_keys=True, default=str).encode()).hexdigest()


class Connection:
    """One WebSocket: serialised sends, its owner once authenticated, the sync tasks its disconnect cancels."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.owner: str | None = None
        self.session = str(uuid.uuid4())
        self.closed = False
        self.tasks: set[Task] = set()
        self.undelivered: dict[Task, dict] = {}  # sync tasks whose results this socket has not sent yet -> the task
        self.resumed: set[Task] = set()  # tasks moved here from this session's closed socket
        self.senders: set[asyncio.Task] = set()
        self.polls = 0  # getResponse calls waiting on this socket
        self.address: str | None = None  # the client's IP address (failed authentications are counted by it)
        self._lock = asyncio.Lock()

    async def send(self, frame: dict) -> None:
        if self.closed:
            return
        text = json.dumps(frame)
        async with self._lock:
            try:
                await self.ws.send_text(text)
            except Exception:  # noqa: BLE001 - a gone client: stop sending, the receive loop ends the connection
                self.closed = True

    def spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.senders.add(t)
        t.add_done_callback(self.senders.discard)


class Service:
    """The server's state: settings, the model, the image store, the task registry and the work queue."""

    def __init__(self, settings: Settings, pipe=None):
        self.settings = settings
        self.pipe = pipe
        self._key_digests = [hashlib.sha256(k.encode()).digest() for k in settings.api_keys]
        host = settings.host
        if not settings.public_url and host in ("0.0.0.0", "::", ""):
            import socket

            host = socket.gethostname()
            log.warning("imageURL base is http://%s:%d; set --public-url if clients use another", host, settings.port)
        base = settings.public_url or f"http://{host}:{settings.port}"
        folder = settings.output_dir or tempfile.mkdtemp(prefix="zimage-serve-")
        self.store = engine.ImageStore(
            folder,
            base,
            settings.output_ttl_s,
            settings.output_items,
            settings.output_bytes,
            settings.output_dir is None,
        )
        self.registry = TaskTable(settings.registry_size, settings.registry_ttl_s)
        self.registry.on_drop = self._release
        self.results = None  # durable.ResultStore when settings.results_dir is set
        if settings.results_dir:
            self.results = durable.ResultStore(
                settings.results_dir, settings.results_items, settings.results_bytes, settings.registry_ttl_s
            )
        self._persisting: set[asyncio.Future] = set()
        # (owner, connectionSessionUUID) -> (time, [(task, item)]): results a closed socket did not get, for a
        # client that reconnects with that session (authentication with connectionSessionUUID); see resume()
        self.orphans: dict[tuple[str, str], tuple[float, list]] = {}
        self.queue: WorkQueue | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self.load_error: str | None = None
        self._outbound = ThreadPoolExecutor(4, thread_name_prefix="zimage-outbound")
        self._background: set[asyncio.Task] = set()
        self.metrics = Metrics()
        self.throttle = limits.AuthThrottle(settings.auth_failures, settings.auth_window_s)
        self.held_bytes: dict[str, int] = {}  # API key id -> bytes of finished results held
        self.ray = None  # a ray_app.RayLink when this is one replica under Ray Serve

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    async def startup(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue = WorkQueue(self.settings.queue, metrics=self.metrics)
        self.metrics.track_queue(self.queue.qsize)
        self.queue.start()
        if self.pipe is not None:
            self._model_ready()
        else:
            self._spawn(self._load())

    def _model_ready(self) -> None:
        s = self.settings
        engine.limit_remembered_images(self.pipe, s.upload_bytes)
        engine.configure(self.pipe, lora_dir=s.lora_dir, content_checker=s.content_checker,
                         face_detector=s.face_detector)  # fmt: skip
        self.queue.ready.set()

    async def _load(self) -> None:
        s = self.settings
        try:
            self.pipe = await asyncio.to_thread(engine.load, s.model, s.device, s.dtype, s.kernels, s.quantize)
        except Exception as e:  # noqa: BLE001 - reported by /healthz; the server stays up and says why
            log.exception("loading the model failed")
            self.load_error = f"{type(e).__name__}: {e}"
            return
        log.info("model loaded; ready")
        self._model_ready()

    async def drain(self) -> None:
        """SIGTERM: refuse new tasks, fail the queued ones, let the running one finish within the grace period."""
        if self.draining:
            return
        self.draining = True
        log.info("shutting down: failing queued tasks, finishing the running one")
        await self.queue.drain(self.settings.shutdown_grace_s)
        await asyncio.sleep(0.2)  # let the senders deliver the last frames
        if self._persisting:  # async outcomes still being written to the durable store
            await asyncio.wait(list(self._persisting), timeout=10)

    async def shutdown(self) -> None:
        if not self.draining:
            await self.drain()
        self._outbound.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)
        return t

    # ---- authentication ----------------------------------------------------------------------------------------
    def authenticate(self, api_key, address: str | None = None) -> str:
        """The owner id (a digest) of a valid key; every configured key is compared, in constant time each. An
        address with too many recent failures is refused (``rateLimited``) before its key is looked at."""
        if self._key_digests and self.throttle.blocked(address):
            raise ApiError("rateLimited", parameter="apiKey")
        if api_key is None or api_key == "":
            raise ApiError("missingApiKey", parameter="apiKey")
        if not isinstance(api_key, str) or len(api_key) > 4096:
            self.throttle.failed(address)
            raise ApiError("invalidApiKey", parameter="apiKey")
        digest = hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).digest()  # any JSON string hashes
        if self._key_digests:
            ok = False
            for d in self._key_digests:
                ok |= hmac.compare_digest(d, digest)
            if not ok:
                self.throttle.failed(address)
                raise ApiError("invalidApiKey", parameter="apiKey")
        return digest.hex()[:32]

    def parse(self, raw, authenticated: bool):
        """A frame's tasks, its size, depth and task count checked before ``json.loads`` builds anything."""
        s = self.settings
        limit = s.max_frame_bytes if authenticated else s.preauth_frame_bytes
        if raw is None:
            raise ApiError("invalidJSON", "the frame is empty")
        if len(raw) > limit:
            raise ApiError("payloadTooLarge", f"the frame is larger than {limit} bytes" + ("" if authenticated else
                           " (before authentication)"))  # fmt: skip
        try:
            limits.scan_frame(raw, s.max_json_depth, s.max_tasks_per_frame)
        except limits.FrameRefused as e:
            raise ApiError("invalidJSON" if e.what == "depth" else "payloadTooLarge", e.message) from None
        return parse_frame(raw).tasks

    # ---- tasks -------------------------------------------------------------------------------------------------
    async def dispatch(self, owner: str, item: dict, conn: Connection | None) -> Task | list[dict]:
        """Handle one task object. Returns the data items to answer now, or a Task whose completion answers it."""
        kind = item.get("taskType")
        if kind == "ping":
            return [{"taskType": "ping", "pong": True}]
        if kind == "authentication":
            session = conn.session if conn else str(uuid.uuid4())
            return [{"taskType": "authentication", "connectionSessionUUID": session}]
        if kind == "imageInference":
            try:
                return await self.submit(owner, item, conn)
            except ApiError as e:  # rejected before it was queued
                self.metrics.task_finished("imageInference", "error", e.code)
                raise
        if kind == "getResponse":
            return await self.get_response(owner, item)
        if kind == "imageUpload":
            return await self.upload(item)
        raise ApiError("unsupportedTaskType", f"taskType {clip(kind)!r} is not supported (imageInference, "
                       "imageUpload, getResponse, authentication, ping)", "taskType")  # fmt: skip

    async def submit(self, owner: str, item: dict, conn: Connection | None) -> Task | list[dict]:
        try:
            task_dict = normalize_inference(item)
            want_progress = progress.wanted(task_dict)
        except RequestError as e:
            raise ApiError.from_request_error(e) from None
        task_uuid = task_dict.get("taskUUID")
        fp = _fingerprint(task_dict)
        async_ = task_dict.get("deliveryMethod") == "async"
        if isinstance(task_uuid, str):
            existing = self.registry.get(owner, task_uuid)
            if existing is not None and not existing.cancelled:
                if existing.fingerprint != fp:
                    raise ApiError("conflictTaskUUID", parameter="taskUUID")
                if async_ and not existing.done.is_set():
                    return [_ack(task_uuid)]
                if async_ and existing.error is not None:
                    raise existing.error
                if async_:
                    return [{**it, "status": "success"} for it in existing.items]
                if conn is not None and existing.connection is not None and not existing.done.is_set():
                    existing.connection = conn  # a reconnected client's resend: the new socket owns it now
                    conn.tasks.add(existing)
                return existing  # answered from the first run
            if existing is not None:
                self.registry.remove(existing)
            elif async_ and self.results is not None:
                record = await self._durable(owner, task_uuid)
                if record is not None:
                    if record["fingerprint"] != fp:
                        raise ApiError("conflictTaskUUID", parameter="taskUUID")
                    return self._answer_record(record)
        if self.draining:
            raise ApiError("shuttingDown")
        for f in ("webhookURL", "uploadEndpoint"):
            if f in task_dict and not self.settings.outbound.enabled:
                raise ApiError("outboundDisabled", f"{f}: outbound calls are disabled on this server", f)
        await self._wait_for_model()
        try:
            valid = engine.validate(self.pipe, task_dict)
            fields_ = engine.fields(valid)
            inputs = fields_.get("inputs", {})
            for name in ("seedImage", "maskImage"):
                if name in inputs:
                    inputs[name] = await asyncio.to_thread(decode_image, inputs[name], f"inputs.{name}")
        except RequestError as e:
            raise ApiError.from_request_error(e) from None
        hooks = {f: fields_.pop(f) for f in ("webhookURL", "uploadEndpoint") if f in fields_}
        for f, url in hooks.items():  # refused before any work, exactly as infer() does
            try:
                await asyncio.to_thread(engine.check_target, url, f, self.settings.outbound)
            except RequestError as e:
                raise ApiError.from_request_error(e) from None
        task = Task(owner, task_uuid, fp, connection=None if async_ else conn)
        self.registry.add(task)
        pipe, store = self.pipe, self.store
        deadline = time.monotonic() + self.settings.task_timeout_s
        job = Job(task, lambda step: engine.run(pipe, valid, store, step), deadline)
        if hooks:
            job.post = lambda items: self._outbound_calls(items, hooks, fields_["outputFormat"])
        if want_progress and conn is not None:
            loop = asyncio.get_running_loop()
            steps = engine.run_steps(fields_, valid.steps)
            send = lambda frame: loop.call_soon_threadsafe(lambda: conn.spawn(conn.send(frame)))  # noqa: E731
            job.on_step = progress.callback(send, task_uuid, steps, fields_["numberResults"])
        try:
            self.queue.submit(job)
        except ApiError:
            self.registry.remove(task)
            raise
        if conn is not None and not async_:
            conn.tasks.add(task)
        self._spawn(self._observe(task, async_))
        if async_ and self.ray is not None:
            self.ray.publish_result(owner, task_uuid, None, None)
        return [_ack(task_uuid)] if async_ else task

    async def _wait_for_model(self) -> None:
        """Tasks that arrive while the model loads wait for it (within the task deadline)."""
        if self.pipe is None:
            if self.load_error:
                raise ApiError("internalError", "the model failed to load; see the server log")
            try:
                await asyncio.wait_for(self.queue.ready.wait(), self.settings.task_timeout_s)
            except asyncio.TimeoutError:
                raise ApiError("timeout", "the model did not finish loading in time") from None

    async def _observe(self, task: Task, async_: bool) -> None:
        """Metrics of a finished task; under Ray, an async task's outcome is published for the other replicas."""
        await task.done.wait()
        self._hold(task)
        code = None if task.error is None else task.error.code
        outcome = "success" if task.error is None else "error"
        self.metrics.task_finished("imageInference", outcome, code, seconds=task.finished - task.created)
        self.metrics.images_generated(sum(1 for it in task.items if "imageUUID" in it))
        if async_ and self.ray is not None:
            err = None if task.error is None else task.error.item(None, None)
            self.ray.publish_result(task.owner, task.task_uuid, task.items, err)
        if async_ and self.results is not None and not task.cancelled:
            fut = asyncio.ensure_future(asyncio.to_thread(self._persist, task))
            self._persisting.add(fut)
            fut.add_done_callback(self._persisting.discard)

    def _persist(self, task: Task) -> None:
        """Write a finished async task's outcome (and its URL outputs' files) to the durable store (a thread)."""
        err = None if task.error is None else task.error.item(None, None)
        images = {}
        for it in task.items:
            name = str(it.get("imageURL", "")).rsplit("/", 1)[-1].lower()
            if name and (data := self.store.get(name)) is not None:
                images[name] = data
        try:
            self.results.put(task.owner, task.task_uuid, task.fingerprint, task.items, err, images)
        except OSError as e:
            log.warning("durable results: could not write a result: %s", e)

    async def _durable(self, owner: str, task_uuid: str) -> dict | None:
        record = await asyncio.to_thread(self.results.get, owner, task_uuid)
        if record is not None:
            for name, data in record["images"].items():  # URL outputs answer again after a restart
                stem, _, ext = name.partition(".")
                if self.store.get(name) is None and engine.is_image_uuid(stem) and ext in CONTENT_TYPES:
                    await asyncio.to_thread(self.store.put, stem, data, ext)
        return record

    @staticmethod
    def _answer_record(record: dict) -> list[dict]:
        err = record.get("error")
        if err is not None:
            e = ApiError(err["code"] if err.get("code") in ERROR_CODES else "internalError", err.get("message"),
                         err.get("parameter"))  # fmt: skip
            e.outcome = True
            raise e
        return [{**it, "status": "success"} for it in record["items"]]

    def _hold(self, task: Task) -> None:
        """Count a finished task's result bytes; past the per-key or the global budget, the oldest finished results
        are forgotten (their getResponse then answers taskNotFound). The result that just finished is kept."""
        if self.registry.get(task.owner, task.task_uuid) is not task:
            return  # already dropped from the table: nothing is held for it
        task.held = sum(len(v) for it in task.items for v in it.values() if isinstance(v, str))
        self.held_bytes[task.owner] = self.held_bytes.get(task.owner, 0) + task.held
        s = self.settings
        for old in self.registry.finished():  # oldest first
            key_over = self.held_bytes.get(task.owner, 0) > s.held_result_bytes_per_key
            total_over = sum(self.held_bytes.values()) > s.held_result_bytes
            if not (key_over or total_over):
                break
            if old is task or (not total_over and old.owner != task.owner):
                continue
            self.registry.remove(old)  # calls _release

    def _release(self, task: Task) -> None:
        held = getattr(task, "held", 0)
        if held:
            task.held = 0
            left = self.held_bytes.get(task.owner, 0) - held
            if left > 0:
                self.held_bytes[task.owner] = left
            else:
                self.held_bytes.pop(task.owner, None)

    async def get_response(self, owner: str, item: dict, hold: bool = True) -> list[dict]:
        task_uuid = item.get("taskUUID")
        if not isinstance(task_uuid, str):
            raise ApiError("invalidParameter", "taskUUID: is required", "taskUUID")
        task = self.registry.get(owner, task_uuid)
        if task is None and self.ray is not None:  # submitted to another replica
            hit = await self.ray.find_result(owner, task_uuid)
            if hit is not None:
                items, err = hit
                if items is None and err is None:
                    return [_ack(task_uuid)]
                if err is not None:
                    raise ApiError(err["code"], err["message"], err.get("parameter"))
                return [{**it, "status": "success"} for it in items]
        if task is None and self.results is not None:  # finished before a restart
            record = await self._durable(owner, task_uuid)
            if record is not None:
                return self._answer_record(record)
        if task is None:
            raise ApiError("taskNotFound", parameter="taskUUID")
        if hold:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(task.done.wait()), self.settings.poll_hold_s)
        if not task.done.is_set():
            return [_ack(task_uuid)]
        if task.error is not None:
            raise task.error
        return [{**it, "status": "success"} for it in task.items]

    async def upload(self, item: dict) -> list[dict]:
        task_uuid = item.get("taskUUID")
        try:
            image = await asyncio.to_thread(decode_image, item.get("image"), "image")
        except RequestError as e:
            raise ApiError.from_request_error(e) from None
        if isinstance(image, str):  # an imageUUID: nothing to store
            return [{"taskType": "imageUpload", "taskUUID": task_uuid, "imageUUID": image, "imageURL": image}]
        image_uuid = str(uuid.uuid4())
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        await self._wait_for_model()
        url = self.store.put(image_uuid, buf.getvalue(), "png")
        engine.remember_image(self.pipe, image_uuid, image)
        return [{"taskType": "imageUpload", "taskUUID": task_uuid, "imageUUID": image_uuid, "imageURL": url}]

    async def _outbound_calls(self, items: list[dict], hooks: dict, fmt: str) -> list[dict]:
        """uploadEndpoint: PUT each image (a failure fails the task); webhookURL: POST each item (failures logged)."""
        loop = asyncio.get_running_loop()
        policy = self.settings.outbound
        if "uploadEndpoint" in hooks:
            for it in items:
                data, ctype = self._image_bytes(it, fmt)
                try:
                    await loop.run_in_executor(
                        self._outbound,
                        engine.outbound_call,
                        policy,
                        "PUT",
                        hooks["uploadEndpoint"],
                        data,
                        ctype,
                        "uploadEndpoint",
                    )
                except engine.OutboundError as e:
                    log.warning("uploadEndpoint refused or failed: %s", e.reason)
                    raise ApiError("outboundFailed", parameter="uploadEndpoint") from None
        if "webhookURL" in hooks:
            for it in items:
                body = json.dumps(it).encode()
                fut = loop.run_in_executor(
                    self._outbound,
                    engine.outbound_call,
                    policy,
                    "POST",
                    hooks["webhookURL"],
                    body,
                    "application/json",
                    "webhookURL",
                )
                fut.add_done_callback(_log_webhook)
        return items

    def _image_bytes(self, item: dict, fmt: str) -> tuple[bytes, str]:
        ext = {"JPG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        if "imageBase64Data" in item:
            return base64.b64decode(item["imageBase64Data"]), CONTENT_TYPES[ext]
        if "imageDataURI" in item:
            return base64.b64decode(item["imageDataURI"].split(",", 1)[1]), CONTENT_TYPES[ext]
        return self.store.get(f"{item['imageUUID'].lower()}.{ext}") or b"", CONTENT_TYPES[ext]

    def disconnected(self, conn: Connection) -> None:
        conn.closed = True
        n = 0
        for task in list(conn.tasks):
            if task.connection is conn and task.status == PENDING and not task.done.is_set():
                task.cancelled = True
                task.finish(error=ApiError("cancelled"))
                n += 1
        kept = [(t, it) for t, it in conn.undelivered.items() if not t.cancelled and t.connection is conn]
        now = time.monotonic()
        for key in [k for k, (t, _) in self.orphans.items() if now - t > ORPHAN_TTL_S]:
            del self.orphans[key]
        if kept and conn.owner is not None and len(self.orphans) < MAX_ORPHANS:
            self.orphans[(conn.owner, conn.session)] = (now, kept)
        for t in list(conn.senders):
            t.cancel()
        if n:
            log.info("client disconnected: %d queued task(s) cancelled", n)

    def resume(self, conn: Connection) -> int:
        """A client that authenticated again with its earlier connectionSessionUUID: the results its closed socket
        did not get (tasks that were running, or finished while it was away) are sent on this socket instead."""
        _, kept = self.orphans.pop((conn.owner, conn.session), (0.0, []))
        for task, item in kept:
            task.connection = conn
            conn.tasks.add(task)
            conn.undelivered[task] = item
            conn.resumed.add(task)
            conn.spawn(_deliver(conn, task, item))
        return len(kept)


def _log_webhook(fut) -> None:
    exc = fut.exception()
    if isinstance(exc, engine.OutboundError):
        log.warning("webhookURL refused or failed: %s", exc.reason)
    elif exc is not None:
        log.warning("webhookURL failed: %s", type(exc).__name__)


def _ack(task_uuid: str) -> dict:
    return {"taskType": "imageInference", "taskUUID": task_uuid, "status": "processing"}


def _error_item(err: ApiError, item: dict) -> dict:
    tt, tu = item.get("taskType"), item.get("taskUUID")
    return err.item(tt if isinstance(tt, str) else None, tu if isinstance(tu, str) else None)


# ---- WebSocket ---------------------------------------------------------------------------------------------------
async def websocket_endpoint(ws: WebSocket) -> None:
    service: Service = ws.app.state.service
    s = service.settings
    limits.set_frame_limit(ws, s.preauth_frame_bytes + 1024)  # before accept: no frame arrives under the large one
    await ws.accept()
    conn = Connection(ws)
    conn.address = ws.client.host if ws.client else None
    try:
        while True:
            try:
                message = await asyncio.wait_for(ws.receive(), s.idle_timeout_s)
            except asyncio.TimeoutError:
                log.info("closing a WebSocket silent for %.0f s", s.idle_timeout_s)
                await ws.close(code=1001)
                break
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text") if message.get("text") is not None else message.get("bytes")
            try:
                size = len(text) if text is not None else 0
                if size > 2**20:  # large frames are scanned and parsed off the event loop
                    tasks = await asyncio.to_thread(service.parse, text, conn.owner is not None)
                else:
                    tasks = service.parse(text, conn.owner is not None)
            except ApiError as e:
                await conn.send({"errors": [e.item(None, None)]})
                if e.code == "payloadTooLarge" and conn.owner is None:
                    await ws.close(code=1009)
                    break
                continue
            finally:
                text = message = None  # the raw frame is not kept while its tasks run
            pongs = []
            for item in tasks:
                if item.get("taskType") == "ping":  # answered together, in one frame, after the others
                    pongs.append({"taskType": "ping", "pong": True})
                    continue
                await _handle_ws_item(service, conn, item)
                await asyncio.sleep(0)  # one frame of many tasks does not hold the event loop
            if pongs:
                await conn.send({"data": pongs})
    except Exception as e:  # noqa: BLE001 - the socket broke; clean up below
        log.warning("WebSocket ended by an error: %s", type(e).__name__)
    finally:
        service.disconnected(conn)


async def _handle_ws_item(service: Service, conn: Connection, item: dict) -> None:
    try:
        if item.get("taskType") == "authentication":
            conn.owner = service.authenticate(item.get("apiKey"), conn.address)
            limits.set_frame_limit(conn.ws, service.settings.max_frame_bytes + 1024)
            resumed = item.get("connectionSessionUUID")
            if isinstance(resumed, str) and engine.is_image_uuid(resumed):
                conn.session = resumed
            await conn.send({"data": [{"taskType": "authentication", "connectionSessionUUID": conn.session}]})
            if service.resume(conn):
                log.info("session resumed: in-flight results moved to the new socket")
            return
        if item.get("taskType") == "ping":
            await conn.send({"data": [{"taskType": "ping", "pong": True}]})
            return
        if conn.owner is None:
            raise ApiError("notAuthenticated", "send an authentication task first")
        if item.get("taskType") == "getResponse":  # may wait for the task: answer without blocking the socket
            if conn.polls >= service.settings.pending_polls:  # enough waiting already: answer now, hold nothing
                await conn.send({"data": await service.get_response(conn.owner, item, hold=False)})
                return
            conn.spawn(_answer_later(service, conn, item))
            return
        result = await service.dispatch(conn.owner, item, conn)
    except Exception as e:  # noqa: BLE001 - one bad task never ends the connection
        if not isinstance(e, ApiError):
            log.exception("task handling failed")
            e = ApiError("internalError")
        err_item = _error_item(e, item)
        if item.get("taskType") == "authentication":
            err_item["taskType"] = "authentication"
        await conn.send({"errors": [err_item]})
        return
    if isinstance(result, Task):
        if result in conn.resumed:  # a resend of a task the resumed session already delivers here: once is enough
            conn.resumed.discard(result)
            return
        conn.undelivered[result] = item
        conn.spawn(_deliver(conn, result, item))
    else:
        await conn.send({"data": result})


async def _answer_later(service: Service, conn: Connection, item: dict) -> None:
    conn.polls += 1
    try:
        await conn.send({"data": await service.get_response(conn.owner, item)})
    except ApiError as e:
        await conn.send({"errors": [_error_item(e, item)]})
    finally:
        conn.polls -= 1


async def _deliver(conn: Connection, task: Task, item: dict) -> None:
    """One data frame per finished result (the clients match them by taskUUID), or one error frame."""
    try:
        await task.done.wait()
        if task.error is not None:
            await conn.send({"errors": [_error_item(task.error, item)]})
        for it in task.items if task.error is None else ():
            await conn.send({"data": [it]})
        if not conn.closed:
            conn.undelivered.pop(task, None)
    finally:
        conn.tasks.discard(task)


# ---- REST --------------------------------------------------------------------------------------------------------
async def rest_endpoint(request: Request) -> Response:
    service: Service = request.app.state.service
    s = service.settings
    address = request.client.host if request.client else None
    key, owner = None, None
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        key = auth[7:].strip()
        try:  # a header key is checked before the body is read: the large limit is for known keys only
            owner = service.authenticate(key, address)
        except ApiError as e:
            return _rest_errors([e.item(None, None)], e.http_status)
    limit = s.max_frame_bytes if owner is not None else s.preauth_frame_bytes
    too_large = ApiError("payloadTooLarge", f"the body is larger than {limit} bytes")
    try:
        if int(request.headers.get("content-length") or 0) > limit:
            return _rest_errors([too_large.item(None, None)], 413)
    except ValueError:
        return _rest_errors([ApiError("invalidJSON", "Content-Length is not a number").item(None, None)], 400)
    body = bytearray()

    async def read() -> bool:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                return False
        return True

    try:
        if not await asyncio.wait_for(read(), s.body_timeout_s):
            return _rest_errors([too_large.item(None, None)], 413)
    except asyncio.TimeoutError:
        return _rest_errors([ApiError("timeout", "the request body did not arrive in time").item(None, None)], 408)
    except ClientDisconnect:
        return Response(status_code=499)  # nobody reads it; no traceback for a client that went away
    try:
        tasks = service.parse(body, owner is not None)
    except ApiError as e:
        return _rest_errors([e.item(None, None)], e.http_status)
    body.clear()
    if owner is None:
        for t in tasks:
            if t.get("taskType") == "authentication" and key is None:
                key = t.get("apiKey")
        try:
            owner = service.authenticate(key, address)
        except ApiError as e:
            first = tasks[0] if tasks else {}
            return _rest_errors([_error_item(e, first)], e.http_status)

    data, errors, statuses, waits = [], [], [], []
    for item in tasks:
        try:
            result = await service.dispatch(owner, item, None)
        except ApiError as e:
            errors.append(_error_item(e, item))
            statuses.append(_rest_status(e))
            continue
        if isinstance(result, Task):
            waits.append((result, item))
        else:
            data.extend(result)
    if waits:
        watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(request, [t for t, _ in waits]))
        try:
            for task, item in waits:
                await task.done.wait()
                if task.error is not None:
                    errors.append(_error_item(task.error, item))
                    statuses.append(_rest_status(task.error))
                else:
                    data.extend(task.items)
        finally:
            watcher.cancel()
    frame: dict = {}
    if data:
        frame["data"] = data
    if errors:
        frame["errors"] = errors
    status = 200 if data or not errors else statuses[0]
    return JSONResponse(frame or {"data": []}, status_code=status)


async def _cancel_on_disconnect(request: Request, tasks: list[Task]) -> None:
    while not all(t.done.is_set() for t in tasks):
        if await request.is_disconnected():
            for t in tasks:
                if t.status == PENDING and not t.done.is_set():
                    t.cancelled = True
                    t.finish(error=ApiError("cancelled"))
            return
        await asyncio.sleep(0.25)


# A task that was accepted and then failed (a fault while it ran, its deadline, its upload) has that failure as its
# recorded outcome: a resend of its taskUUID, or a getResponse, is answered with the same error, so a retry cannot
# succeed. runware-sdk retries HTTP 408, 429 and 5xx (three times by default): such outcomes are answered 422, which
# no official client retries. shuttingDown (the task never ran; another server may run it) and cancelled keep theirs.
TASK_FAILURE_STATUS = 422


def _rest_status(err: ApiError) -> int:
    if getattr(err, "outcome", False) and err.code not in ("shuttingDown", "cancelled") and err.http_status >= 500:
        return TASK_FAILURE_STATUS
    return err.http_status


def _rest_errors(items: list[dict], status: int) -> JSONResponse:
    return JSONResponse({"errors": items}, status_code=status)


# ---- images, health ----------------------------------------------------------------------------------------------
async def image_endpoint(request: Request) -> Response:
    service: Service = request.app.state.service
    name = request.path_params["name"].lower()
    stem, _, ext = name.partition(".")
    if ext not in CONTENT_TYPES or not engine.is_image_uuid(stem):
        return Response(status_code=404)
    data = service.store.get(name)
    if data is None:
        return Response(status_code=404)
    return Response(data, media_type=CONTENT_TYPES[ext], headers={"Cache-Control": "private, max-age=60"})


async def healthz(request: Request) -> Response:
    service: Service = request.app.state.service
    q = service.queue
    ready = q is not None and q.ready.is_set() and not service.draining
    body = {
        "status": "ok",
        "ready": ready,
        "draining": service.draining,
        "queued": q.qsize() if q else 0,
        "running": bool(q and q.running),
        "completed": q.completed if q else 0,
        "tasks": len(service.registry),
    }
    if service.load_error:
        body["loadError"] = clip(service.load_error, 300)
    status = 503 if "ready" in request.query_params and not ready else 200
    return JSONResponse(body, status_code=status)


async def playground_page(request: Request) -> Response:
    service: Service = request.app.state.service
    return HTMLResponse(playground.render(service.pipe), headers={"Cache-Control": "no-cache"})


async def metrics_endpoint(request: Request) -> Response:
    service: Service = request.app.state.service
    if service.settings.metrics_key and service.settings.api_keys:
        auth = request.headers.get("authorization", "")
        try:
            service.authenticate(auth[7:].strip() if auth.lower().startswith("bearer ") else None,
                                 request.client.host if request.client else None)  # fmt: skip
        except ApiError as e:
            return _rest_errors([e.item(None, None)], e.http_status)
    body = await service.ray.metrics_text() if service.ray is not None else service.metrics.render()[0]
    return Response(body, media_type=METRICS_CONTENT_TYPE)


def build_app(service: Service) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.startup()
        yield
        await service.shutdown()

    app = Starlette(
        routes=[
            WebSocketRoute("/v1", websocket_endpoint),
            Route("/v1", rest_endpoint, methods=["POST"]),
            Route("/image/{name}", image_endpoint, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/", playground_page, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.service = service
    return app


def make_server(settings: Settings, pipe=None):
    """A uvicorn server for ``settings`` whose SIGTERM/SIGINT first drains the queue (see :meth:`Service.drain`)."""
    import uvicorn

    settings.check()
    service = Service(settings, pipe)
    config = uvicorn.Config(
        build_app(service),
        host=settings.host,
        port=settings.port,
        ws_max_size=settings.max_frame_bytes + 1024,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        log_level=os.environ.get("ZIMAGE_LOG_LEVEL", "info"),
        timeout_graceful_shutdown=5,
        http=limits.guarded_http(
            settings.max_connections, settings.health_headroom, settings.header_timeout_s, settings.body_timeout_s
        ),
        timeout_keep_alive=settings.http_idle_timeout_s,
    )

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # first signal: drain, then exit; second: exit now
            if service.draining or service.loop is None:
                self.should_exit = True
                if sig == signal.SIGINT and service.draining:
                    self.force_exit = True
                return

            async def drain_then_exit():
                await service.drain()
                self.should_exit = True

            service.loop.call_soon_threadsafe(lambda: service._spawn(drain_then_exit()))

    return _Server(config), service


def serve(settings: Settings, pipe=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    server, _ = make_server(settings, pipe)
    limits.install_log_limits(settings.log_burst)
    if not settings.api_keys:
        log.warning("no API keys configured: any apiKey is accepted, and the server binds %s only", settings.host)
    server.run()
    return 0
