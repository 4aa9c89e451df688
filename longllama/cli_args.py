"""Argument parsing shared by the command-line tools: token counts, backend names, one-line errors."""

from __future__ import annotations

from knn_memory.cli import (
    BadArguments,
    OneLineParser,
    check_writable_dir,
    check_writable_file,
    error_exit,
    parse_count,
)

__all__ = [
    "BadArguments",
    "OneLineParser",
    "check_writable_dir",
    "check_writable_file",
    "error_exit",
    "parse_backend",
    "parse_count",
    "parse_token_count",
]


def parse_token_count(text: str, name: str = "--tokens", minimum: int = 1) -> int:
    """``"4k"`` -> 4096, ``"1m"`` -> 1048576, ``"1500"`` -> 1500; ``ValueError`` naming ``name`` otherwise
    (not a number, NaN, infinite, below ``minimum`` or beyond any run: see :func:`knn_memory.cli.parse_count`)."""
    return parse_count(text, name, minimum, what="token count")


def parse_backend(text: str, name: str = "--backend") -> dict:
    """``"exact"`` or ``"faiss:<index_factory string>"`` -> model config fields (``mem_backend``, ``mem_index``)."""
    backend, _, index = text.partition(":")
    if backend == "exact" and not index:
        return {"mem_backend": "exact"}
    if backend == "faiss":
        return {"mem_backend": "faiss", "mem_index": index or "Flat"}
    raise ValueError(f"{name} {text!r} must be 'exact' or 'faiss:<index_factory string>'")
