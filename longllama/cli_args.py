"""Argument parsing shared by the command-line tools: token counts, backend names, one-line errors."""

from __future__ import annotations

import argparse


class BadArguments(ValueError):
    """A command-line argument was refused (the tool prints one line and exits with code 2)."""


class OneLineParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors raise :class:`BadArguments` instead of printing usage and exiting."""

    def error(self, message: str):
        raise BadArguments(message)


def parse_token_count(text: str, name: str = "--tokens", minimum: int = 1) -> int:
    """``"4k"`` -> 4096, ``"1m"`` -> 1048576, ``"1500"`` -> 1500; ``ValueError`` naming ``name`` otherwise."""
    t = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a token count such as 5000, 64k or 1m") from None
    if value < minimum:
        raise ValueError(f"{name} {text!r} is below {minimum} tokens")
    return value


def parse_backend(text: str, name: str = "--backend") -> dict:
    """``"exact"`` or ``"faiss:<index_factory string>"`` -> model config fields (``mem_backend``, ``mem_index``)."""
    backend, _, index = text.partition(":")
    if backend == "exact" and not index:
        return {"mem_backend": "exact"}
    if backend == "faiss":
        return {"mem_backend": "faiss", "mem_index": index or "Flat"}
    raise ValueError(f"{name} {text!r} must be 'exact' or 'faiss:<index_factory string>'")
