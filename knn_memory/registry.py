"""Backends by name: ``create_backend("exact" | "faiss" | "sharded" | ..., ...)``.

A backend is found, never listed by hand: every module of :mod:`knn_memory.backends` is imported the
first time a name is looked up, and each registers its class with ``@register_backend("name")``.
Backends that live in other packages register through the ``knn_memory.backends`` entry point group
(``name = package.module:Class``). Adding a backend is therefore one module plus its registration; the
model, the CLIs (``name[:spec]``, see :func:`parse_backend_spec`) and saved memories (each backend's
:meth:`~knn_memory.backend.MemoryBackend.matching_config`) follow from the class.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings
from importlib import metadata
from typing import TypeVar

import torch

from knn_memory.backend import MemoryBackend
from knn_memory.cli import parse_option

ENTRY_POINT_GROUP = "knn_memory.backends"

_REGISTRY: dict[str, type[MemoryBackend]] = {}
_DISCOVERED = False

B = TypeVar("B", bound=type[MemoryBackend])


def register_backend(name: str):
    """Class decorator: make a :class:`MemoryBackend` subclass available under ``name``."""
    if not isinstance(name, str) or not name or ":" in name or name != name.strip():
        raise ValueError(f"a backend name must be a non-empty str without ':' or spaces, got {name!r}")

    def wrap(cls: B) -> B:
        if not (isinstance(cls, type) and issubclass(cls, MemoryBackend)):
            raise TypeError(f"register_backend({name!r}) needs a MemoryBackend subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a backend named {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _discover() -> None:
    """Import every module of :mod:`knn_memory.backends`, then the entry points (once per process)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    package = importlib.import_module("knn_memory.backends")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{package.__name__}.{info.name}")
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as err:  # a broken plugin must not take the built-in backends down with it
            warnings.warn(
                f"memory backend entry point {entry.name!r} ({entry.value}) failed to load: "
                f"{type(err).__name__}: {err}",
                RuntimeWarning,
                stacklevel=2,
            )


def available_backends() -> list[str]:
    """Names accepted by :func:`create_backend`."""
    _discover()
    return sorted(_REGISTRY)


def backend_class(name: str) -> type[MemoryBackend]:
    """The class registered as ``name``; ``ValueError`` listing the known names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, got {type(name).__name__}")
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown memory backend {name!r}; available: {available_backends()}") from None


def parse_backend_spec(text: str, name: str = "--backend") -> tuple[str, dict]:
    """``"name[:spec][:option=value...]"`` -> (backend name, constructor options).

    ``"faiss:IVF1024,Flat:nprobe=32"`` -> ``("faiss", {"index": "IVF1024,Flat", "nprobe": 32})``. The spec
    between the name and the options is the backend's own grammar (:meth:`MemoryBackend.parse_spec`;
    ``"sharded:faiss:auto"`` names an inner backend); trailing ``option=value`` parts are constructor
    options (ints, floats or words). ``ValueError`` naming ``name`` for an unknown backend or a bad spec.
    """
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str 'name[:spec][:option=value...]', got {type(text).__name__}")
    parts = text.strip().split(":")
    backend = parts[0]
    if backend not in available_backends():
        raise ValueError(
            f"{name} {text!r}: unknown memory backend {backend!r}; available: {available_backends()}"
        )
    cls = _REGISTRY[backend]
    trailing = []
    while len(parts) > 1 and "=" in parts[-1]:
        trailing.append(parse_option(parts.pop(), name))
    spec = ":".join(parts[1:]) if len(parts) > 1 else None
    if spec is not None and not spec.strip():
        raise ValueError(f"{name} {text!r}: nothing after ':' (expected {cls.spec_grammar()})")
    options = cls.parse_spec(spec, name)
    for key, value in reversed(trailing):
        if key in options:
            raise ValueError(f"{name} {text!r}: {key} is given twice")
        options[key] = value
    return backend, options


def _check_options(cls: type[MemoryBackend], options: dict) -> None:
    """``TypeError`` naming the backend and its options for an option its constructor does not take."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # the class checks its own extra options
    unknown = sorted(set(options) - set(params))
    if unknown:
        known = sorted(
            n for n, p in params.items() if n != "self" and p.kind is inspect.Parameter.KEYWORD_ONLY
        )
        raise TypeError(f"the {cls.name!r} backend takes no option(s) {unknown}; its options: {known}")


def create_backend(
    name: str,
    *,
    num_heads: int,
    head_dim: int,
    batch_size: int = 1,
    mem_dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "cpu",
    top_k: int | None = None,
    index: object = None,
    **options,
) -> MemoryBackend:
    """Build the memory backend registered as ``name``.

    Args:
        name: ``"exact"`` (dense, upstream LongLLaMA), ``"faiss"`` (top-k through one index per row and
            head), ``"sharded"`` (a memory split over the ranks of a process group), or any other
            registered name (see :func:`available_backends`).
        num_heads, head_dim, batch_size: memory geometry H, d, B.
        mem_dtype: storage dtype of keys and values; keys are rounded to it before indexing.
        device: ``"cpu"`` or ``"cuda[:N]"``.
        top_k: entries per query. ``"exact"``: None = dense attention over every entry, an int = exact
            top-k. ``"faiss"``: default 128.
        index: the backend's index: a Faiss ``index_factory`` string or ``"auto"`` for ``"faiss"``
            (default ``"Flat"``), or an index object satisfying :class:`indexes.KeyIndex`; None for
            ``"exact"``.
        **options: backend options, e.g. ``nprobe``, ``efSearch``, ``max_nprobe``, ``inner``.
    """
    cls = backend_class(name)
    _check_options(cls, options)
    return cls(
        num_heads=num_heads,
        head_dim=head_dim,
        batch_size=batch_size,
        mem_dtype=mem_dtype,
        device=device,
        top_k=top_k,
        index=index,
        **options,
    )
