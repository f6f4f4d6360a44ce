"""Where results go: encoded image bytes, earlier outputs by imageUUID, and the ``URL`` output store."""

from __future__ import annotations

import base64
import io
import os
import shutil
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
    """Earlier outputs of one ZImage by imageUUID (bounded in count and in decoded bytes, thread-safe), so requests
    can reference them. Past either bound the oldest go first; an image larger than ``max_bytes`` alone is kept
    until the next ``put``."""

    def __init__(self, capacity: int = 64, max_bytes: int = 1 << 30):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Image.Image] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def put(self, uuid: str, image: Image.Image) -> None:
        key = uuid.lower()
        with self._lock:
            self._items[key] = image
            self._items.move_to_end(key)
            self._sizes[key] = image.width * image.height * len(image.getbands())
            while len(self._items) > 1 and (
                len(self._items) > self.capacity or sum(self._sizes.values()) > self.max_bytes
            ):
                old, _ = self._items.popitem(last=False)
                self._sizes.pop(old, None)

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


class ImageStore:
    """``outputType: URL`` images (and the network server's uploads) as files in one folder, until they expire.

    The one image store of the package. ``base_url=None`` (the library): URLs are ``file://`` URIs, the folder is
    ``folder``, else ``$ZIMAGE_OUTPUT_DIR``, else ``<cache>/zimage-fast/outputs``. With ``base_url`` (the network
    server): URLs are ``<base_url>/image/<uuid>.<ext>``, read back with :meth:`get`. ``ttl`` (seconds; else
    ``default_ttl``; ``None``: kept) marks a file for removal; expired files are deleted on the next ``put`` or
    ``purge``; past ``max_items`` files or ``max_bytes`` bytes the oldest go first, whatever their ttl.
    """

    def __init__(
        self,
        folder: str | Path | None = None,
        base_url: str | None = None,
        default_ttl: float | None = None,
        max_items: int | None = None,
        max_bytes: int | None = None,
        owned: bool = False,
    ):
        if folder is None:
            from ..default_model import cache_dir

            folder = os.environ.get("ZIMAGE_OUTPUT_DIR") or cache_dir() / "outputs"
        self.folder = Path(folder).expanduser()
        self.base_url = None if base_url is None else base_url.rstrip("/")
        self.default_ttl = default_ttl
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._own = owned  # close() removes the folder
        self._items: OrderedDict[str, float] = OrderedDict()  # file name -> expiry (time.time(); inf: kept)
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()

    def put(self, image_uuid: str, data: bytes, extension: str, ttl: int | None = None) -> str:
        ttl = ttl or self.default_ttl
        expires = float("inf") if ttl is None else time.time() + float(ttl)  # computed before any file is written
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{image_uuid.lower()}.{extension}"
        (self.folder / name).write_bytes(data)
        with self._lock:
            self._items[name] = expires
            self._items.move_to_end(name)
            self._sizes[name] = len(data)
            while (self.max_items is not None and len(self._items) > self.max_items) or (
                self.max_bytes is not None and sum(self._sizes.values()) > self.max_bytes
            ):
                old, _ = self._items.popitem(last=False)  # the oldest goes first, whatever its ttl
                self._sizes.pop(old, None)
                (self.folder / old).unlink(missing_ok=True)
        self.purge()
        if self.base_url is None:
            return (self.folder / name).resolve().as_uri()
        return f"{self.base_url}/image/{name}"

    def get(self, name: str) -> bytes | None:
        with self._lock:
            expiry = self._items.get(name)
        if expiry is None or expiry <= time.time():
            return None
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None

    def purge(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self._lock:
            old = [n for n, t in self._items.items() if t <= now]
            for n in old:
                del self._items[n]
                self._sizes.pop(n, None)
        for n in old:
            (self.folder / n).unlink(missing_ok=True)
        return len(old)

    def close(self) -> None:
        if self._own:
            shutil.rmtree(self.folder, ignore_errors=True)


LocalImageStore = ImageStore  # the library's earlier name for the same store
