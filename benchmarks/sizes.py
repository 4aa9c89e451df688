"""Sizes as the benchmarks write them: ``"4k"`` -> 4096 on a command line, 4096 -> ``"4k"`` in a report.

Parsing is :func:`knn_memory.cli.parse_count` (the one copy of that rule), worded for a size.
"""

from __future__ import annotations

from knn_memory.cli import parse_count


def parse_size(text: str, name: str = "size") -> int:
    """``4096``, ``4k`` (4096), ``1M`` (1048576); ``ValueError`` naming ``name`` for anything else
    (not a number, NaN, inf, below 1 or beyond any run)."""
    return parse_count(text, name, minimum=1, what="size")


def format_size(n: int) -> str:
    """``n`` in the shortest exact form: 1048576 -> ``"1M"``, 4096 -> ``"4k"``, 1000 -> ``"1000"``."""
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)
