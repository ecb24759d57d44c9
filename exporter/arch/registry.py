"""Registry of source architectures, keyed by HF `architectures[0]` (or a NeMo model class): family files register
themselves with `@register`; `exporter.arch` imports them all."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

from templates.ft_python.ft_checkpoint import CheckpointError

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


def architecture_for(hf_config: dict, origin: str = "config.json") -> type[Architecture]:
    """The architecture registered for `architectures[0]` of an HF config (read from `origin`); CheckpointError naming
    what was found and what is supported otherwise."""
    names = hf_config.get("architectures") or []
    if not isinstance(names, list) or not names:
        raise CheckpointError(f"{origin} has no 'architectures' entry (found {names!r}); cannot tell which model "
                              f"this is; supported: {sorted(_REGISTRY)}")
    try:
        return _REGISTRY[names[0]]
    except (KeyError, TypeError):
        raise CheckpointError(
            f"{origin}: unsupported architecture {names[0]!r}; supported: {sorted(_REGISTRY)}"
        ) from None
