"""The registry of serving runtimes, by name (the runtime modules register themselves with `@register`)."""

from __future__ import annotations

from typing import TypeVar

from .base import Runtime

_RUNTIMES: dict[str, Runtime] = {}
RuntimeT = TypeVar("RuntimeT", bound=type[Runtime])


def register(cls: RuntimeT) -> RuntimeT:
    if cls.name in _RUNTIMES:
        raise ValueError(f"runtime {cls.name!r} registered twice")
    _RUNTIMES[cls.name] = cls()
    return cls


def runtime_names() -> tuple[str, ...]:
    """Registered runtime names in registration order (exporter/runtimes/__init__.py imports the default first)."""
    return tuple(_RUNTIMES)


def runtime_for(name: str) -> Runtime:
    try:
        return _RUNTIMES[str(name)]
    except KeyError:
        raise ValueError(f"unknown runtime {name!r}; known: {list(_RUNTIMES)}") from None
