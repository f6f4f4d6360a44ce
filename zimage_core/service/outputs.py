"""Where results go: encoded image bytes, earlier outputs by imageUUID, and the ``URL`` output store."""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from PIL import Image

FORMATS = {
    "JPG": ("JPEG", "image/jpeg", "jpg"),
    "PNG": ("PNG", "image/png", "png"),
    "WEBP": ("WEBP", "image/webp", "webp"),
}


class OutputCache:
    """Earlier outputs of one ZImage by imageUUID (bounded, thread-safe), so requests can reference them."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._items: OrderedDict[str, Image.Image] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, uuid: str, image: Image.Image) -> None:
        with self._lock:
            self._items[uuid.lower()] = image
            self._items.move_to_end(uuid.lower())
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, uuid: str) -> Image.Image | None:
        with self._lock:
            return self._items.get(uuid.lower())


def encode_image(image: Image.Image, fmt: str = "PNG", quality: int = 95) -> bytes:
    pil_fmt = FORMATS[fmt][0]
    buf = io.BytesIO()
    im = image.convert("RGB") if pil_fmt == "JPEG" else image
    kwargs = {"quality": quality} if pil_fmt in ("JPEG", "WEBP") else {}
    im.save(buf, format=pil_fmt, **kwargs)
    return buf.getvalue()


def data_uri(data: bytes, fmt: str) -> str:
    return f"data:{FORMATS[fmt][1]};base64,{base64.b64encode(data).decode()}"


class LocalImageStore:
    """Default store for ``outputType: URL``: files in a local folder, returned as ``file://`` URLs.

    ``ttl`` (seconds) marks an output for removal; expired files are deleted on the next ``put`` or ``purge``.
    Folder: ``$ZIMAGE_OUTPUT_DIR``, else ``<cache>/zimage-fast/outputs``.
    """

    def __init__(self, folder: str | Path | None = None):
        from ..default_model import cache_dir

        self.folder = Path(folder or os.environ.get("ZIMAGE_OUTPUT_DIR") or cache_dir() / "outputs").expanduser()
        self._expiry: dict[Path, float] = {}
        self._lock = threading.Lock()

    def put(self, image_uuid: str, data: bytes, extension: str, ttl: int | None = None) -> str:
        expires = None if ttl is None else time.time() + float(ttl)  # computed before any file is written
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{image_uuid}.{extension}"
        path.write_bytes(data)
        with self._lock:
            if expires is not None:
                self._expiry[path] = expires
        self.purge()
        return path.resolve().as_uri()

    def purge(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self._lock:
            expired = [p for p, t in self._expiry.items() if t <= now]
            for p in expired:
                p.unlink(missing_ok=True)
                del self._expiry[p]
        return len(expired)
