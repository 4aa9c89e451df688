"""Argument parsing shared by the command-line tools: token counts, backend names, one-line errors."""

from __future__ import annotations

from knn_memory.cli import (
    BadArguments,
    OneLineParser,
    check_writable_dir,
    check_writable_file,
    error_exit,
    parse_count,
    parse_option,
)
from knn_memory.registry import backend_class, parse_backend_spec

__all__ = [
    "BadArguments",
    "OneLineParser",
    "backend_fields",
    "backend_knobs",
    "backend_options",
    "check_writable_dir",
    "check_writable_file",
    "error_exit",
    "parse_backend",
    "parse_backend_spec",
    "parse_count",
    "parse_option",
    "parse_token_count",
    "uses_top_k",
]


def parse_token_count(text: str, name: str = "--tokens", minimum: int = 1) -> int:
    """``"4k"`` -> 4096, ``"1m"`` -> 1048576, ``"1500"`` -> 1500; ``ValueError`` naming ``name`` otherwise
    (not a number, NaN, infinite, below ``minimum`` or beyond any run: see :func:`knn_memory.cli.parse_count`)."""
    return parse_count(text, name, minimum, what="token count")


def backend_fields(backend: str, options: dict) -> dict:
    """A backend name and its constructor options -> model config fields: ``mem_backend``, ``mem_index``
    (the ``index`` option) and ``mem_index_params`` (every other option)."""
    fields: dict = {"mem_backend": backend}
    rest = dict(options)
    if "index" in rest:
        fields["mem_index"] = rest.pop("index")
    if rest:
        fields["mem_index_params"] = rest
    return fields


def backend_options(fields: dict) -> tuple[str, dict]:
    """Model config fields -> (backend name, constructor options): the inverse of :func:`backend_fields`."""
    options = dict(fields.get("mem_index_params") or {})
    if fields.get("mem_index") is not None:
        options["index"] = fields["mem_index"]
    return fields["mem_backend"], options


def backend_knobs(fields: dict, head_dim: int, knobs: dict) -> dict:
    """The entries of ``knobs`` (``nprobe``, ``efSearch``, ...) that the backend of ``fields`` takes."""
    backend, options = backend_options(fields)
    accepted = backend_class(backend).search_knobs(options, head_dim)
    return {k: v for k, v in knobs.items() if v is not None and k in accepted}


def uses_top_k(fields: dict) -> bool:
    """True when the backend named by config ``fields`` retrieves top-k entries by default (not dense)."""
    backend, options = backend_options(fields)
    return backend_class(backend).default_top_k(options) is not None


def parse_backend(text: str, name: str = "--backend") -> dict:
    """``"name[:spec]"`` (``exact``, ``faiss:IVF1024,Flat``, ``sharded:faiss:auto``, any registered
    backend) -> model config fields (:func:`backend_fields`); the spec is the backend's own grammar."""
    return backend_fields(*parse_backend_spec(text, name))
