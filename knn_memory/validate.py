"""The shared input checks of :mod:`indexes.validate`, for the layers above ``knn_memory``.

The model and the benchmarks never import ``indexes`` directly; they use the same rules (one copy of
each) through this module.
"""

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

__all__ = [
    "INT32_MAX",
    "INT64_MAX",
    "MAX_COUNT",
    "MAX_DIM",
    "MAX_K",
    "check_finite",
    "check_float",
    "check_int",
    "check_optional_int",
    "check_tensor_fits",
    "is_int",
]
