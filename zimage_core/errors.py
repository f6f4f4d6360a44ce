"""Errors raised on bad input."""

from __future__ import annotations


class RequestError(ValueError):
    """A request (or ``generate`` argument) that cannot be run. ``field`` names the offending parameter (dotted
    path for nested request fields, e.g. ``acceleratorOptions.cacheEndStep``); the message gives the allowed range."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def to_dict(self) -> dict:
        return {"error": "invalid_request", "field": self.field, "message": self.message}
