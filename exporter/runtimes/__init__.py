"""The serving runtimes, by name: the config's `export.triton_deployment.runtime` choice is derived from here.

Adding a runtime = one module here (a `Runtime` subclass decorated with `@register`), imported below, plus its
files under templates/. See docs/architecture.md.
"""

from . import python, fastertransformer  # noqa: F401  register themselves; the default (python) first
from .base import ModelKind, ModelSettings, Require, Runtime
from .registry import register, runtime_for, runtime_names

__all__ = ["ModelKind", "ModelSettings", "Require", "Runtime", "register", "runtime_for", "runtime_names"]
