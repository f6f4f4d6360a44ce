"""A live server for tests: the real ASGI app on uvicorn in a background thread, bound to 127.0.0.1:<free port>."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(pipe, **settings):
    """Yields ``(base_url, service)``; the server stops (drains, then exits) when the block ends."""
    from zimage_core.server.app import Settings, make_server

    port = free_port()
    server, service = make_server(Settings(host="127.0.0.1", port=port, **settings), pipe)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}", service
    finally:
        server.should_exit = True
        thread.join(30)


def get(url: str, timeout: float = 30) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers.get("content-type", ""), r.read()
