"""Async results that survive a restart: one JSON file per finished ``deliveryMethod: async`` task, in a folder.

The task table (:mod:`.tasks`) lives in memory; a restart (a crash, or a graceful SIGTERM after its drain) loses it,
and ``getResponse`` would answer ``taskNotFound`` for work the server had acknowledged. This store keeps each async
task's outcome (its result items, or its error) on disk, written when the task finishes; the server reads it when
its table has no such task, so ``getResponse`` (and a resend of the same task) after a restart answers as before.

- Bounded: at most ``max_items`` records and ``max_bytes`` bytes of files; past either the oldest go first. A
  record larger than ``max_bytes`` is not kept (logged). Records older than ``ttl_s`` are not answered and are
  removed. Only an index (file name, size, time) is held in memory; a record is read when asked for.
- ``outputType: URL`` results: the image files of the server's image store are written into the record too, and put
  back into the store when the record is read, so the URLs answer after a restart (within the record's ``ttl_s``).
- Owner-bound like the table: the file name is a digest of (owner, taskUUID), and the record names its owner.
- Written atomically (a temporary file, then ``os.replace``): a crash leaves the old state or the new, never half.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger("zimage_core.server")

SUFFIX = ".result.json"


def default_dir(port: int) -> Path:
    """``$ZIMAGE_STATE_DIR/results/<port>`` (``$ZIMAGE_STATE_DIR`` defaults to ``$XDG_STATE_HOME/zimage``, else
    ``~/.local/state/zimage``): one folder per port, so that two servers on one machine keep their own."""
    state = os.environ.get("ZIMAGE_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "zimage"
    )
    return Path(state).expanduser() / "results" / str(int(port))


class ResultStore:
    def __init__(self, folder: str | Path, max_items: int = 1000, max_bytes: int = 512 * 2**20, ttl_s: float = 3600):
        self.folder = Path(folder).expanduser()
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._index: OrderedDict[str, tuple[int, float]] = OrderedDict()  # file name -> (bytes, finished time)
        self._lock = threading.Lock()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._load()

    # ---- index -------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        found = []
        for p in self.folder.glob("*" + SUFFIX):
            try:
                st = p.stat()
            except OSError:
                continue
            found.append((st.st_mtime, p.name, st.st_size))
        for p in self.folder.glob("*.tmp"):  # a write that a crash interrupted
            p.unlink(missing_ok=True)
        for mtime, name, size in sorted(found):
            self._index[name] = (size, mtime)
        with self._lock:
            self._evict(time.time())
        if self._index:
            log.info("durable results: %d async result(s) kept from before the restart", len(self._index))

    def _evict(self, now: float) -> None:
        """Drop expired records and the oldest past the bounds (holds the lock)."""
        for name in [n for n, (_, t) in self._index.items() if now - t > self.ttl_s]:
            self._drop(name)
        while self._index and (
            len(self._index) > self.max_items or sum(s for s, _ in self._index.values()) > self.max_bytes
        ):
            self._drop(next(iter(self._index)))

    def _drop(self, name: str) -> None:
        self._index.pop(name, None)
        (self.folder / name).unlink(missing_ok=True)

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(s for s, _ in self._index.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    @staticmethod
    def _name(owner: str, task_uuid: str) -> str:
        return hashlib.sha256(f"{owner}\0{task_uuid.lower()}".encode()).hexdigest()[:40] + SUFFIX

    # ---- records -----------------------------------------------------------------------------------------------
    def put(
        self,
        owner: str,
        task_uuid: str,
        fingerprint: str,
        items: list[dict],
        error: dict | None,
        images: dict[str, bytes] | None = None,
    ) -> bool:
        """Keep one finished task's outcome; ``images``: {store file name: bytes} of its URL outputs. False if the
        record alone is larger than the byte budget (then it is not kept)."""
        record = {
            "owner": owner,
            "taskUUID": task_uuid.lower(),
            "fingerprint": fingerprint,
            "finished": time.time(),
            "items": items,
            "error": error,
            "images": {k: base64.b64encode(v).decode() for k, v in (images or {}).items()},
        }
        data = json.dumps(record).encode()
        if len(data) > self.max_bytes:
            log.warning("durable results: a result of %d bytes exceeds the budget of %d; not kept", len(data),
                        self.max_bytes)  # fmt: skip
            return False
        name = self._name(owner, task_uuid)
        tmp = self.folder / (name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.folder / name)
        with self._lock:
            self._index.pop(name, None)
            self._index[name] = (len(data), record["finished"])
            self._evict(time.time())
        return True

    def get(self, owner: str, task_uuid: str) -> dict | None:
        """The record of (owner, taskUUID): {"fingerprint", "items", "error", "images": {name: bytes}}, or None."""
        name = self._name(owner, task_uuid)
        with self._lock:
            self._evict(time.time())
            if name not in self._index:
                return None
        try:
            record = json.loads((self.folder / name).read_bytes())
        except (OSError, ValueError):
            log.warning("durable results: an unreadable record was removed")
            with self._lock:
                self._drop(name)
            return None
        if record.get("owner") != owner or record.get("taskUUID") != task_uuid.lower():
            return None
        record["images"] = {k: base64.b64decode(v) for k, v in (record.get("images") or {}).items()}
        return record
