"""Model backends answering fitness requests in batches (see ``evomerge.fitness.requests.Backend``).

Backends import heavy libraries (torch, transformers, vllm) where they are used: importing this package
is cheap, and ``HFBackend`` is resolved on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evomerge.fitness.backends.hf import HFBackend

# Backend name -> "module:Class"; the one place a config's ``backend:`` name is resolved.
BACKENDS: dict[str, str] = {
    "hf": "evomerge.fitness.backends.hf:HFBackend",
    "vllm": "evomerge.fitness.backends.vllm:VLLMBackend",
}

__all__ = ["BACKENDS", "HFBackend", "backend_class"]


def backend_class(name: str) -> type:
    """The backend class registered under ``name``; ValueError lists the allowed names."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; allowed: {sorted(BACKENDS)}")
    module, _, attr = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def __getattr__(name: str) -> Any:
    if name == "HFBackend":
        return backend_class("hf")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
