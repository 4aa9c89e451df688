"""Backends by name: ``create_backend("exact" | "faiss", ...)``.

A new backend is a module in ``knn_memory/`` whose class is decorated with ``@register_backend("name")``;
nothing else changes, the model included.
"""

from __future__ import annotations

from typing import TypeVar

import torch

from knn_memory.backend import MemoryBackend

_REGISTRY: dict[str, type[MemoryBackend]] = {}

B = TypeVar("B", bound=type[MemoryBackend])


def register_backend(name: str):
    """Class decorator: make a :class:`MemoryBackend` subclass available under ``name``."""

    def wrap(cls: B) -> B:
        if not (isinstance(cls, type) and issubclass(cls, MemoryBackend)):
            raise TypeError(f"register_backend({name!r}) needs a MemoryBackend subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a backend named {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_backends() -> list[str]:
    """Names accepted by :func:`create_backend`."""
    return sorted(_REGISTRY)


def backend_class(name: str) -> type[MemoryBackend]:
    """The class registered as ``name``; ``ValueError`` listing the known names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown memory backend {name!r}; available: {available_backends()}") from None


def create_backend(
    name: str,
    *,
    num_heads: int,
    head_dim: int,
    batch_size: int = 1,
    mem_dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "cpu",
    top_k: int | None = None,
    index: str | None = None,
    **index_params,
) -> MemoryBackend:
    """Build the memory backend registered as ``name``.

    Args:
        name: ``"exact"`` (dense, upstream LongLLaMA) or ``"faiss"`` (top-k through a Faiss index).
        num_heads, head_dim, batch_size: memory geometry H, d, B.
        mem_dtype: storage dtype of keys and values; keys are rounded to it before indexing.
        device: ``"cpu"`` or ``"cuda[:N]"``.
        top_k: entries per query. ``"exact"``: None = dense attention over every entry, an int = exact
            top-k. ``"faiss"``: default 128.
        index: Faiss ``index_factory`` string for ``"faiss"`` (default ``"Flat"``); must be None for
            ``"exact"``.
        **index_params: backend options, e.g. ``nprobe``, ``efSearch``, ``retrain_factor``.
    """
    cls = backend_class(name)
    return cls(
        num_heads=num_heads,
        head_dim=head_dim,
        batch_size=batch_size,
        mem_dtype=mem_dtype,
        device=device,
        top_k=top_k,
        index=index,
        **index_params,
    )
