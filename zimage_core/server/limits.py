"""The server's budgets and guards: what a client may cost it before (and after) it authenticates.

- :func:`scan_frame`: a frame's JSON nesting depth and task count, measured before ``json.loads`` builds anything;
- :func:`set_frame_limit`: the WebSocket's message-size limit, small until the connection authenticates;
- :class:`AuthThrottle`: failed authentications per client address, refused past a rate;
- :class:`LogLimiter`: a logging filter that rate-limits repeated lines and drops client-caused tracebacks;
- :func:`guarded_http`: uvicorn's HTTP protocol with a header/body read deadline and a cap on open connections
  that keeps headroom for ``/healthz``.

docs/server-limits.md lists every limit, its default and what it costs.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict

import numpy as np

# A JSON string literal (escapes included), matched at C speed; everything else is the frame's structure.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_OPEN, _CLOSE, _COMMA = np.zeros(256, np.int8), np.zeros(256, np.int8), np.zeros(256, bool)
_OPEN[[ord("["), ord("{")]] = 1
_CLOSE[[ord("]"), ord("}")]] = 1
_COMMA[ord(",")] = True
_CHUNK = 1 << 20


class FrameRefused(Exception):
    """The frame breaks a structural limit (``what``: ``depth`` or ``tasks``); it was not parsed."""

    def __init__(self, what: str, message: str):
        super().__init__(message)
        self.what = what
        self.message = message


def scan_frame(raw: str | bytes, max_depth: int, max_tasks: int) -> None:
    """Refuse a frame nested deeper than ``max_depth`` or holding more than ``max_tasks`` top-level items, without
    building any Python object per value (a regex drops string literals, numpy counts brackets in 1 MiB chunks).
    Malformed JSON passes here; ``json.loads`` reports it afterwards."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    skeleton = _STRING.sub(b'""', data)
    depth = 0
    items = 0
    top_is_array = None
    for start in range(0, len(skeleton), _CHUNK):
        a = np.frombuffer(skeleton, np.uint8, count=min(_CHUNK, len(skeleton) - start), offset=start)
        step = _OPEN[a].astype(np.int32) - _CLOSE[a].astype(np.int32)
        level = depth + np.cumsum(step)  # depth after each byte
        if level.size and int(level.max()) > max_depth:
            raise FrameRefused("depth", f"the frame is nested deeper than {max_depth} levels")
        if top_is_array is None:
            first = np.flatnonzero(_OPEN[a])
            if first.size:
                top_is_array = a[first[0]] == ord("[")
        if top_is_array:
            # a comma at depth 1 separates two tasks of the top-level array
            items += int(np.count_nonzero(_COMMA[a] & (level == 1)))
            if items + 1 > max_tasks:
                raise FrameRefused("tasks", f"the frame holds more than {max_tasks} tasks")
        if level.size:
            depth = int(level[-1])


def set_frame_limit(ws, limit: int) -> bool:
    """Set the message-size limit of the WebSocket under a Starlette ``WebSocket`` (uvicorn's websockets
    protocols). Returns False where the running protocol offers no such knob (then the frame is still refused after
    it arrived, by length, before it is parsed)."""
    proto = getattr(getattr(ws, "_receive", None), "__self__", None)
    conn = getattr(proto, "conn", None)  # websockets-sansio: the websockets ServerProtocol
    if conn is not None and hasattr(conn, "max_message_size"):
        conn.max_message_size = limit
        return True
    if proto is not None and hasattr(proto, "max_size"):  # the legacy websockets implementation
        proto.max_size = limit
        return True
    return False


class AuthThrottle:
    """At most ``burst`` failed authentications per client address per ``window_s`` seconds; more are refused
    without checking the key. Remembers at most ``max_addresses`` addresses (the oldest are forgotten)."""

    def __init__(self, burst: int = 10, window_s: float = 60.0, max_addresses: int = 4096):
        self.burst, self.window_s, self.max_addresses = burst, window_s, max_addresses
        self._fails: OrderedDict[str, list[float]] = OrderedDict()

    def blocked(self, address: str | None, now: float | None = None) -> bool:
        if address is None or self.burst <= 0:
            return False
        now = time.monotonic() if now is None else now
        recent = [t for t in self._fails.get(address, ()) if now - t < self.window_s]
        if recent:
            self._fails[address] = recent
        else:
            self._fails.pop(address, None)
        return len(recent) >= self.burst

    def failed(self, address: str | None, now: float | None = None) -> None:
        if address is None:
            return
        now = time.monotonic() if now is None else now
        self._fails.setdefault(address, []).append(now)
        self._fails.move_to_end(address)
        del self._fails[address][: -self.burst or None]
        while len(self._fails) > self.max_addresses:
            self._fails.popitem(last=False)


class LogLimiter(logging.Filter):
    """At most ``burst`` lines per ``window_s`` seconds for each message template of a logger; the rest are dropped
    and counted (reported with the next line that passes). Records of loggers in ``no_traceback`` lose their
    traceback (kept: the exception's type and message on the same line): those are client-caused."""

    def __init__(self, burst: int = 20, window_s: float = 10.0, no_traceback: tuple[str, ...] = ()):
        super().__init__()
        self.burst, self.window_s, self.no_traceback = burst, window_s, no_traceback
        self._seen: OrderedDict[tuple[str, str], list] = OrderedDict()  # key -> [window start, count, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = (record.name, str(record.msg)[:200])
        slot = self._seen.get(key)
        if slot is None or now - slot[0] >= self.window_s:
            dropped = slot[2] if slot else 0
            slot = [now, 0, 0]
            self._seen[key] = slot
            self._seen.move_to_end(key)
            while len(self._seen) > 1024:
                self._seen.popitem(last=False)
            if dropped:
                record.msg = f"{record.msg} [{dropped} similar lines suppressed]"
        slot[1] += 1
        if slot[1] > self.burst:
            slot[2] += 1
            return False
        if record.exc_info and record.name.startswith(self.no_traceback):
            exc = record.exc_info[1]
            record.msg = f"{record.msg} ({type(exc).__name__}: {str(exc)[:200]})"
            record.exc_info = None
            record.exc_text = None
        return True


LOGGERS = ("zimage_core.server", "uvicorn", "uvicorn.error", "uvicorn.access", "asyncio", "websockets")


def install_log_limits(burst: int = 20, window_s: float = 10.0) -> LogLimiter:
    """Put one :class:`LogLimiter` on the server's loggers, uvicorn's, asyncio's and websockets' (idempotent)."""
    limiter = LogLimiter(burst, window_s, no_traceback=("uvicorn", "asyncio", "websockets"))
    for name in LOGGERS:
        lg = logging.getLogger(name)
        for f in [f for f in lg.filters if isinstance(f, LogLimiter)]:
            lg.removeFilter(f)
        lg.addFilter(limiter)
    return limiter


def guarded_http(max_connections: int, health_headroom: int, header_timeout_s: float, body_timeout_s: float):
    """uvicorn's h11 HTTP protocol with: a deadline for the request headers (``header_timeout_s``, also for each
    next request on a kept-alive connection) and the body (``body_timeout_s``); at most ``max_connections`` open
    connections (HTTP and WebSocket together) for any route and ``health_headroom`` more that may only ask
    ``/healthz`` (anything else: 503) and get at most 1 s to send their headers; past both, a new connection is
    closed at once (its file descriptor freed)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    async def busy(scope, receive, send):
        if scope.get("type") == "websocket":
            await send({"type": "websocket.close", "code": 1013})  # try again later
            return
        body = b'{"errors":[{"code":"serverBusy","message":"too many open connections; retry later"}]}'
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    class GuardedH11(H11Protocol):
        _timer = None
        _refused = False
        _header_s = header_timeout_s

        def connection_made(self, transport):
            super().connection_made(transport)
            n = len(self.connections)  # includes this one
            if n > max_connections + health_headroom:
                self._refused = True
                transport.close()
                return
            if n > max_connections:
                inner = self.app

                async def health_only(scope, receive, send):
                    if scope.get("type") == "http" and scope.get("path") == "/healthz":
                        return await inner(scope, receive, send)
                    return await busy(scope, receive, send)

                self.app = health_only
                self._header_s = min(header_timeout_s, 1.0)  # a headroom slot is not held by an idle socket
            self._arm(self._header_s)

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            if self.transport.get_protocol() is not self or self.transport.is_closing():
                return  # upgraded to a WebSocket, or gone
            state = self.conn.their_state
            if state in (h11.IDLE, h11.SEND_BODY) and not (state is h11.IDLE and self._idle_between_requests()):
                self.transport.close()

        def _idle_between_requests(self) -> bool:
            # kept alive with no byte of the next request: uvicorn's keep-alive timer owns that wait
            return self.cycle is not None and self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            before = self.conn.their_state
            super().data_received(data)
            after = self.conn.their_state
            if after is h11.IDLE and self._timer is None:
                self._arm(self._header_s)  # bytes of a next request: its headers get the same deadline
            elif after is h11.SEND_BODY and before is not h11.SEND_BODY:
                self._arm(body_timeout_s)
            elif after not in (h11.IDLE, h11.SEND_BODY):
                self._disarm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11
