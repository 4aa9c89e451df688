"""Input checks shared by every layer: bounded ints, finite floats, values that fit a storage dtype.

One copy of each rule, used by ``indexes/``, ``knn_memory/``, ``longllama/`` and the benchmarks. Every
check raises ``TypeError`` for a value of the wrong type and ``ValueError`` for one out of range, and
its message names the argument, the value received and what was expected. Upper bounds matter: a
number handed to Faiss or to an allocator that is too large wraps (Faiss takes C ``int``) or asks for
more memory than any machine has, so each knob has a ceiling checked here, before the call.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: largest value of a C ``int`` (Faiss's ``nprobe``, ``efSearch``, ``d``, ``M``...)
INT32_MAX = 2**31 - 1
#: largest value of a C ``int64`` / ``idx_t``
INT64_MAX = 2**63 - 1
#: top-k per query at most (results are ``[B, H, q, k]``: beyond this no search can allocate them)
MAX_K = 2**20
#: vector dimension at most (keys of larger heads are not attention keys)
MAX_DIM = 2**16
#: heads, batch rows, layers and other counts that size a structure
MAX_COUNT = 2**20


def is_int(value: object) -> bool:
    """True for a Python or NumPy integer that is not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(value: object, name: str, low: int = 1, high: int = INT32_MAX) -> int:
    """``value`` as an int in ``[low, high]``.

    Raises:
        TypeError: not an int (a bool is not one).
        ValueError: outside ``[low, high]``; the message names ``name``, the value and the range.
    """
    want = "a positive int" if low == 1 else f"an int >= {low}"
    limit = f"(expected {low} <= {name} <= {high})"
    if not is_int(value):
        raise TypeError(f"{name} must be {want}, got {type(value).__name__} {value!r} {limit}")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be {want}, got {value} {limit}")
    return value


def check_optional_int(value: object, name: str, low: int = 1, high: int = INT32_MAX) -> int | None:
    """``None``, or :func:`check_int`."""
    return None if value is None else check_int(value, name, low, high)


def check_float(
    value: object,
    name: str,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float in the given range (``low_open``: ``value > low``; else ``>=``).

    Raises:
        TypeError: not a real number (a bool is not one).
        ValueError: NaN, infinite, or out of range.
    """
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    want = f"a finite number in {left}{low}, {high}{right}"
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {want}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be {want}, got {value}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        raise ValueError(f"{name} must be {want}, got {value}")
    return value


def check_tensor_fits(t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    """Refuse NaN, inf, or finite values of ``t`` that become ``inf`` when rounded to ``dtype``.

    Rounding is monotone, so rounding the smallest and largest value (one ``aminmax`` pass) the way the
    memory will round them decides for every value; the message tells the two causes apart.

    Raises:
        ValueError: ``t`` holds NaN or inf ("NaN or inf"), or a finite value beyond the range of
            ``dtype`` (names the largest magnitude, the dtype and its largest finite value).
    """
    if t.numel() == 0:
        return
    # the two ends rounded to ``dtype``: NaN and inf stay so, and a finite value that overflows
    # becomes inf; read back in one host transfer (this runs on every window's keys and values)
    ends = torch.stack(torch.aminmax(t.detach()))
    if all(math.isfinite(v) for v in ends.to(dtype).tolist()):
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")
    biggest = float(ends.abs().max())
    raise ValueError(
        f"{name} holds a finite value of magnitude {biggest:.6g} that overflows to inf in "
        f"{str(dtype).removeprefix('torch.')} (largest finite value {torch.finfo(dtype).max:.6g}); "
        f"scale it down or use a wider mem_dtype"
    )


def all_finite(t: torch.Tensor) -> bool:
    """True when tensor ``t`` holds no NaN or inf.

    For float32 and 16-bit floats this is one float64 sum, non-finite exactly when a term is (their
    values cannot overflow it), about 6x faster than ``isfinite().all()`` on a window's queries (this
    runs on every search); float64 and other dtypes take ``isfinite``.
    """
    if t.numel() == 0:
        return True
    if t.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return math.isfinite(t.sum(dtype=torch.float64).item())
    return bool(torch.isfinite(t).all())


def check_finite(t: torch.Tensor, name: str, verb: str = "contains") -> None:
    """``ValueError`` "``name`` ``verb`` NaN or inf" if tensor ``t`` holds NaN or inf."""
    if not all_finite(t):
        raise ValueError(f"{name} {verb} NaN or inf")
