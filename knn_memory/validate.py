"""Input checks shared by the layers above ``indexes``: the rules of :mod:`indexes.validate`, plus the
memory's own (storage dtype, attention grouping), one copy of each.

The model and the benchmarks never import ``indexes`` directly; they use the same rules through this
module.
"""

from __future__ import annotations

import torch

from indexes.validate import (
    INT32_MAX,
    INT64_MAX,
    MAX_COUNT,
    MAX_DIM,
    MAX_K,
    check_finite,
    check_float,
    check_int,
    check_optional_int,
    check_tensor_fits,
    is_int,
)

#: storage dtypes of memory keys and values, by name
MEM_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_mem_dtype(value: object, name: str = "mem_dtype") -> torch.dtype:
    """``"bfloat16"`` / ``"torch.float16"`` / ``torch.float32`` -> the torch dtype; ``ValueError`` naming
    ``name`` for anything else."""
    if isinstance(value, torch.dtype) and value in MEM_DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in MEM_DTYPES:
        return MEM_DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"{name} must be one of {list(MEM_DTYPES)}, got {value!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def check_grouping(value: object, name: str = "grouping") -> tuple[int, int] | None:
    """``None`` or a pair of positive ints ``(heads, queries)`` (the attention block size)."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(is_int(v) and v > 0 for v in value):
        raise ValueError(f"{name} must be None or a pair of positive ints (heads, queries), got {value!r}")
    return int(value[0]), int(value[1])


__all__ = [
    "INT32_MAX",
    "INT64_MAX",
    "MAX_COUNT",
    "MAX_DIM",
    "MAX_K",
    "MEM_DTYPES",
    "check_finite",
    "check_float",
    "check_grouping",
    "check_int",
    "check_mem_dtype",
    "check_optional_int",
    "check_tensor_fits",
    "dtype_name",
    "is_int",
]
