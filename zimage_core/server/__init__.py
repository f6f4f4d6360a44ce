"""The network server (``zimage serve``): the hosted API's WebSocket and REST protocol over the request API.

- ``app.py``: the ASGI app (Starlette on uvicorn), its settings, connections, authentication and the routes;
- ``protocol.py``: frames, error codes and the official clients' spellings;
- ``tasks.py``: the server's task table (by API key and taskUUID) and the bounded work queue in front of the model;
- ``limits.py``: budgets checked before work (frame depth and task count, the pre-authentication frame limit),
  the failed-authentication throttle, the log limiter, the HTTP protocol with read deadlines and a connection cap
  (docs/server-limits.md);
- ``progress.py``, ``metrics.py``, ``playground.py`` (+ ``static/``): progress frames, ``/metrics``, ``GET /``;
- ``ray_app.py``: the same app as replicas on Ray Serve.

Layers: this package sits above the request API (``zimage_core/service/``) and reaches the library only through
its one door, :mod:`zimage_core.service.engine`; nothing below imports it. Its libraries (starlette, uvicorn,
websockets, prometheus-client) come with the ``[serve]`` extra, so ``import zimage_core`` never needs them.
"""
