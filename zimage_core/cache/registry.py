"""The one list of step-cache methods and calibrators: everything else reads it.

A method is one room: its config class (``config.py``) carries a :func:`register` decorator naming

- the request switch in ``acceleratorOptions`` (``fbCache``) and the method's own request fields
  (:class:`Option`: request key, config attribute, type, range; the default is the config's),
- the CLI flag of each option (``--cache-threshold`` is shared by every method's threshold).

The request schema (``zimage_core/service/request.py``), the CLI (``zimage_core/cli.py``) and ``from_request``
build their fields, flags and configs from :data:`METHODS`; the per-request state (``state.py``) reads only the
config's class attributes (``probe``, ``accumulate``), never a method name. Adding a method is a config class with
its ``@register(...)``; nothing in the service or the CLI changes.

Calibrators (``taylorseer.py``, ``foca.py``) forecast the cached residual on a reused step; :data:`CALIBRATORS`
maps their names (a config's ``calibrator=``) to a fresh per-request instance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .foca import FoCa
from .taylorseer import TaylorSeer


@dataclass(frozen=True)
class Option:
    """One request field of a method: ``acceleratorOptions.<request>`` sets ``config.<attr>``."""

    request: str
    attr: str
    kind: str  # "float" | "int"
    lo: float
    hi: float | None = None
    cli: str | None = None  # the CLI flag (several methods may share one: --cache-threshold)
    help: str = ""


@dataclass(frozen=True)
class CacheMethod:
    name: str  # "fb": the CLI's --cache value, the config's ``method``, stats["cache"]["method"]
    config: type  # the frozen config class
    switch: str  # "fbCache": the request's on/off field
    options: tuple[Option, ...]
    summary: str

    def request_fields(self) -> list[str]:
        return [self.switch, *(o.request for o in self.options)]


METHODS: dict[str, CacheMethod] = {}


def register(name: str, *, switch: str, options: tuple[Option, ...] = (), summary: str = "") -> Callable:
    """Class decorator: record the config class under ``name`` with its request switch, options and CLI flags."""

    def deco(cls):
        cls.method = name
        METHODS[name] = CacheMethod(name, cls, switch, tuple(options), summary or (cls.__doc__ or "").split("\n")[0])
        return cls

    return deco


def method(name: str) -> CacheMethod:
    """``fb`` | ``tea`` | ``db`` (also the request switches ``fbCache``, ``teacache``, ...)."""
    key = str(name).strip().lower()
    key = key[: -len("cache")] if key.endswith("cache") and key != "cache" else key
    if key not in METHODS:
        raise ValueError(f"unknown cache method {name!r}; known: {sorted(METHODS)} (or fbCache, teaCache, ...)")
    return METHODS[key]


def cli_options() -> dict[str, Option]:
    """Every CLI flag the methods declare, once (first declaration wins; shared flags must agree on the range)."""
    out: dict[str, Option] = {}
    for m in METHODS.values():
        for o in m.options:
            if o.cli and o.cli not in out:
                out[o.cli] = o
    return out


CALIBRATORS: dict[str, Callable[[], object]] = {
    "taylorseer1": lambda: TaylorSeer(1),
    "taylorseer2": lambda: TaylorSeer(2),
    "foca": FoCa,
}


def make_calibrator(name: str | None):
    """A fresh per-request calibrator, or None."""
    if name is None:
        return None
    if name not in CALIBRATORS:
        raise ValueError(f"unknown calibrator {name!r}; known: {sorted(CALIBRATORS)}")
    return CALIBRATORS[name]()


__all__ = ["CALIBRATORS", "METHODS", "CacheMethod", "Option", "cli_options", "make_calibrator", "method", "register"]
