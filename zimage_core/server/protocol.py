"""Wire protocol of the hosted API as its official clients speak it: frames, error codes, client spellings.

Every frame is JSON. Clients send an array of task objects; the server answers with one object,
``{"data": [...]}`` or ``{"errors": [...]}``. Error items carry ``code``, ``message``, ``parameter`` (the request
field at fault, when there is one), ``taskType`` and ``taskUUID`` (the clients ignore errors without it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..service.engine import RequestError

# code -> (HTTP status on REST, meaning). The one table of error codes; README "Serving" lists it.
ERROR_CODES: dict[str, tuple[int, str]] = {
    "missingApiKey": (401, "no API key was given (authentication task or Authorization: Bearer header)"),
    "invalidApiKey": (401, "the API key is not one of the server's keys"),
    "notAuthenticated": (401, "a task arrived on a WebSocket before a successful authentication task"),
    "invalidJSON": (400, "the frame or body is not a JSON array of task objects"),
    "unsupportedTaskType": (400, "taskType is not one this server runs"),
    "invalidParameter": (400, "a field is missing, malformed or out of range; `parameter` names it"),
    "outboundDisabled": (400, "webhookURL / uploadEndpoint are disabled on this server"),
    "payloadTooLarge": (413, "the frame or body is larger than the server accepts"),
    "taskNotFound": (404, "no task with this taskUUID is visible to this API key (unknown, expired or not yours)"),
    "conflictTaskUUID": (409, "this taskUUID was already used by this key for a different request"),
    "serverBusy": (429, "the queue is full; retry later"),
    "rateLimited": (429, "too many failed authentications from this address; retry later"),
    "timeout": (504, "the task did not finish before its deadline"),
    "cancelled": (499, "the task was cancelled before it started (its client disconnected)"),
    "shuttingDown": (503, "the server is shutting down and did not run (or finish) this task"),
    "outboundFailed": (502, "the upload to uploadEndpoint failed"),
    "internalError": (500, "an unexpected server fault; the message does not carry internals"),
}

MAX_QUOTE = 40  # characters of a client's bad value quoted back in a message


class ApiError(Exception):
    """An error answered to the client: a code from :data:`ERROR_CODES`, a message and optionally the field."""

    def __init__(self, code: str, message: str | None = None, parameter: str | None = None):
        assert code in ERROR_CODES, code
        self.code = code
        self.message = message or ERROR_CODES[code][1]
        self.parameter = parameter
        super().__init__(f"{code}: {self.message}")

    @property
    def http_status(self) -> int:
        return ERROR_CODES[self.code][0]

    @classmethod
    def from_request_error(cls, e: RequestError) -> ApiError:
        return cls("invalidParameter", f"{e.field}: {clip(e.message, 300)}", e.field)

    def item(self, task_type: str | None, task_uuid: str | None) -> dict:
        out = {"code": self.code, "message": self.message}
        if self.parameter:
            out["parameter"] = self.parameter
        if task_type:
            out["taskType"] = task_type
        if task_uuid:
            out["taskUUID"] = task_uuid
        return out


def clip(text, n: int = MAX_QUOTE) -> str:
    """At most ``n`` characters of ``text`` (a client's value quoted in an error message)."""
    s = text if isinstance(text, str) else repr(text)
    return s if len(s) <= n else s[:n] + f"... ({len(s)} chars)"


def quote_value(value) -> str:
    return repr(clip(value)) if isinstance(value, str) else clip(repr(value))


def data_frame(items: list[dict]) -> dict:
    return {"data": items}


def errors_frame(items: list[dict]) -> dict:
    return {"errors": items}


# ---- client spellings ------------------------------------------------------------------------------------------
# (where the clients send it, what the spec calls it). Both at once is an error naming the alias.
TOP_LEVEL_ALIASES = {"seedImage": "inputs.seedImage", "maskImage": "inputs.maskImage"}
INPUTS_ALIASES = {"mask": "maskImage"}
ACCELERATOR_ALIASES = {"fbcache": "fbCache", "cacheStopStep": "cacheEndStep"}
# Fields the clients always send that carry no meaning for this model (dropped at the edge).
CLIENT_ONLY_FIELDS = ("onPartialImages", "extraArgs")


def _drop_nulls(obj):
    if isinstance(obj, dict):
        return {k: _drop_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_nulls(v) for v in obj]
    return obj


def _move(src: dict, key: str, dst: dict, new_key: str, path_alias: str, path_spec: str) -> None:
    if key not in src:
        return
    if new_key in dst:
        raise RequestError(path_alias, f"give either {path_alias} or {path_spec}, not both")
    dst[new_key] = src.pop(key)


def normalize_inference(task: dict) -> dict:
    """An ``imageInference`` task in the spec's spelling: ``null`` means absent, client aliases mapped."""
    t = _drop_nulls(copy.copy(task))
    for f in CLIENT_ONLY_FIELDS:
        t.pop(f, None)
    for alias, spec in TOP_LEVEL_ALIASES.items():
        if alias in t:
            inputs = t.get("inputs")
            if inputs is not None and not isinstance(inputs, dict):
                raise RequestError("inputs", "must be an object")
            inputs = dict(inputs or {})
            _move(t, alias, inputs, spec.split(".", 1)[1], alias, spec)
            t["inputs"] = inputs
    if isinstance(t.get("inputs"), dict):
        inputs = dict(t["inputs"])
        for alias, spec in INPUTS_ALIASES.items():
            _move(inputs, alias, inputs, spec, f"inputs.{alias}", f"inputs.{spec}")
        t["inputs"] = inputs
    if isinstance(t.get("acceleratorOptions"), dict):
        acc = dict(t["acceleratorOptions"])
        for alias, spec in ACCELERATOR_ALIASES.items():
            _move(acc, alias, acc, spec, f"acceleratorOptions.{alias}", f"acceleratorOptions.{spec}")
        t["acceleratorOptions"] = acc
    return t


@dataclass
class Frame:
    """One parsed client frame: the task objects, or the reason it could not be parsed."""

    tasks: list[dict]


def parse_frame(text: str | bytes) -> Frame:
    import json

    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise ApiError("invalidJSON", "the frame is not valid JSON") from None
    except RecursionError:
        raise ApiError("invalidJSON", "the frame is nested too deep") from None
    if isinstance(obj, dict):  # a single task object is accepted as a one-element array
        obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(t, dict) for t in obj):
        raise ApiError("invalidJSON", "the frame must be a JSON array of task objects")
    return Frame(obj)
