"""Registry of SSL methods: name -> Method class. Methods never import Ray."""

from __future__ import annotations

import importlib
import importlib.util

from rayssl.methods.base import ExportedBackbone, Method, MethodConfig, ReadRequest, VolumeInfo

# name -> module path; modules are imported on first use so a method's heavy imports stay lazy.
_MODULES = {
    "voco": "rayssl.methods.voco",
    "mlsscl": "rayssl.methods.mlsscl",
    "gvsl": "rayssl.methods.gvsl",
    "drasclr": "rayssl.methods.drasclr",
    "mae": "rayssl.methods.mae",
}


def available_methods() -> list[str]:
    """Names of the methods whose module is present in this install."""
    names = []
    for name, module in _MODULES.items():
        if importlib.util.find_spec(module) is not None:
            names.append(name)
    return names


def get_method_class(name: str) -> type[Method]:
    """The Method class registered under `name`, or defined as `METHOD` in module `name` (a dotted path).

    The module form lets users bring their own method without editing rayssl; it must be importable
    on every Ray worker (installed, or shipped with `ray job submit --working-dir`).
    """
    if name in _MODULES and importlib.util.find_spec(_MODULES[name]) is not None:
        return importlib.import_module(_MODULES[name]).METHOD
    if "." in name or name not in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            module = None
        if module is not None and isinstance(getattr(module, "METHOD", None), type) and issubclass(module.METHOD, Method):
            return module.METHOD
    raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(available_methods())} "
                     f"(or a module path defining METHOD)")


__all__ = [
    "ExportedBackbone",
    "Method",
    "MethodConfig",
    "ReadRequest",
    "VolumeInfo",
    "available_methods",
    "get_method_class",
]
