"""Errors raised on bad input."""

from __future__ import annotations

MAX_SHOWN = 60  # characters of a bad value echoed in an error message


class RequestError(ValueError):
    """A request (or ``generate`` argument) that cannot be run. ``field`` names the offending parameter (dotted
    path for nested request fields, e.g. ``acceleratorOptions.cacheEndStep``); the message gives the allowed range."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def to_dict(self) -> dict:
        return {"error": "invalid_request", "field": self.field, "message": self.message}


def show(value) -> str:
    """A bad value for an error message: short (a 5 MB string is not echoed back) and always printable (no
    int-to-str limit, no lone surrogates, no recursion into nested containers)."""
    if isinstance(value, (dict, list, tuple, set)):
        return f"a {type(value).__name__} of {len(value)} entries"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**MAX_SHOWN:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    if isinstance(value, (str, bytes)):
        text = repr(value[: 4 * MAX_SHOWN])
    else:
        try:
            text = repr(value)[: 4 * MAX_SHOWN]
        except Exception:  # noqa: BLE001 - a caller's object with a broken __repr__
            text = type(value).__name__
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."
