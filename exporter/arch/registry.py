"""Registry of source architectures, keyed by HF `architectures[0]` (or a NeMo model class): family files register
themselves with `@register`; `exporter.arch` imports them all."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    from .base import Architecture

_REGISTRY: dict[str, type[Architecture]] = {}
ArchT = TypeVar("ArchT", bound="type[Architecture]")


def register(*names: str) -> Callable[[ArchT], ArchT]:
    def decorate(cls: ArchT) -> ArchT:
        for name in names:
            if name in _REGISTRY:
                raise ValueError(f"architecture {name!r} registered twice")
            _REGISTRY[name] = cls
        return cls

    return decorate


def registered() -> dict[str, type[Architecture]]:
    return dict(_REGISTRY)


def architecture_for(hf_config: dict) -> type[Architecture]:
    names = hf_config.get("architectures") or []
    if not names:
        raise ValueError("config.json has no 'architectures' entry; cannot tell which model this is")
    try:
        return _REGISTRY[names[0]]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {names[0]!r}; supported: {sorted(_REGISTRY)}"
        ) from None
