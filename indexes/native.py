"""The compiled inverted lists (``indexes/_inverted_lists.c``), loaded with ctypes.

The installer builds the C file as an optional extension (``setup.py``): it needs a C compiler, and
an install without one still works, with :mod:`indexes.inverted_lists` falling back to its Python
lists (same results, several times slower; a warning says so once). The library is plain C with no
Python API, so one build serves every Python version of a platform. It picks AVX-512, AVX2 or plain C
at run time (:func:`isa`).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import itertools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

VERSION = 14  # knn_version() of the C file this module was written for
ISA_NAMES = ("scalar", "avx2", "avx512")

log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: list[ctypes.CDLL | None] = []  # [] until the first load attempt

_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {
    "knn_version": (ctypes.c_int, []),
    "knn_isa": (ctypes.c_int, []),
    "knn_best_isa": (ctypes.c_int, []),
    "knn_set_isa": (ctypes.c_int, [ctypes.c_int]),
    "knn_store_new": (_P, [_I, _I, _I]),
    "knn_store_free": (None, [_P]),
    "knn_store_reserve": (ctypes.c_int, [_P, _P]),
    "knn_store_add": (ctypes.c_int, [_P, _I, _P, _P, _P]),
    "knn_store_add_boxed": (ctypes.c_int, [_P, _I, _P, _P, _P, _P, _P, _P]),
    "knn_store_sizes": (None, [_P, _P]),
    "knn_store_capacities": (None, [_P, _P]),
    "knn_store_segments": (None, [_P, _P]),
    "knn_store_nbytes": (_I, [_P]),
    "knn_store_export": (None, [_P, _P, _P]),
    "knn_store_truncate": (None, [_P, _I]),
    "knn_scan": (ctypes.c_int, [_P, _I, _P, _I, _I, _I, _P, _P, _P, _P, _P]),
    "knn_search": (ctypes.c_int, [_P, _I, _P, _I, _P, _P, _I, _I, _P, _P, _P]),
    "knn_search_boxes": (ctypes.c_int, [_P, _I, _P, _I, _P, ctypes.c_double, _I, _I, _P, _P, _P]),
    "knn_gather": (None, [_I, _P, _P, _P, _I, _I, _P, _I, _P]),
    "knn_weighted_gather": (None, [_I, _P, _P, _P, _I, _I, _I, _P, _P, _I, _I, _P]),
    "knn_assign": (ctypes.c_int, [_I, _I, _P, _I, _P, _P, _P, _I]),
    "knn_topk_rows": (ctypes.c_int, [_I, _I, _P, _I, _P, _P]),
    "knn_add_heads": (ctypes.c_int, [_I, _P, _I, _P, _P, _I]),
    "knn_search_heads": (ctypes.c_int, [_I, _P, _I, _P, _I, _P, _P, _P, _I]),
    "knn_exact": (ctypes.c_int, [_I, _I, _I, _P, _I, _P, _P, _I, _P, _P]),
    "knn_openmp": (ctypes.c_int, []),
}
_forked = [False]  # True in a child forked from this process


def split_threads(threads: int) -> int:
    """The threads a compiled call asked for ``threads`` may split over (``knn_add_heads``,
    ``knn_search_heads``, ``knn_assign``): ``threads``, or 1 where the library is built without OpenMP
    or this is a forked child (the OpenMP threads of a parent do not survive ``fork``: a child's first
    parallel call would hang)."""
    lib = library()
    return threads if lib is not None and lib.knn_openmp() and not _forked[0] else 1


os.register_at_fork(after_in_child=lambda: _forked.__setitem__(0, True))


def library_path() -> Path | None:
    """Where the built library is (next to this file, named like an extension module), or None."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_inverted_lists{suffix}"
        if path.is_file():
            return path
    return None


def library() -> ctypes.CDLL | None:
    """The compiled library with its signatures declared, or None where it is missing or stale."""
    with _lock:
        if not _loaded:
            _loaded.append(_load())
        return _loaded[0]


def _load() -> ctypes.CDLL | None:
    path = library_path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        log.warning("cannot load %s (%s): the 'auto' index uses its Python lists", path.name, err)
        return None
    if not all(hasattr(lib, name) for name in _SIGNATURES) or lib.knn_version() != VERSION:
        log.warning("%s is from another version of the library: reinstall to rebuild it", path.name)
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def available() -> bool:
    """True when the compiled inverted lists are built and load."""
    return library() is not None


def isa() -> str:
    """The instruction set the compiled scan uses: ``"avx512"``, ``"avx2"``, ``"scalar"`` (or ``"none"``)."""
    lib = library()
    return "none" if lib is None else ISA_NAMES[lib.knn_isa()]


def set_isa(name: str) -> str:
    """Use at most instruction set ``name`` (one of :data:`ISA_NAMES`; for tests and benchmarks);
    returns the one in use (capped at what the CPU has). Process-wide."""
    if name not in ISA_NAMES:
        raise ValueError(f"isa must be one of {list(ISA_NAMES)}, got {name!r}")
    lib = library()
    if lib is None:
        raise RuntimeError("the compiled inverted lists are not built (reinstall with a C compiler)")
    return ISA_NAMES[lib.knn_set_isa(ISA_NAMES.index(name))]


def isas() -> tuple[str, ...]:
    """Every instruction set the compiled scan can use on this CPU, plain C first (``()`` without the library)."""
    best = best_isa()
    return () if best == "none" else ISA_NAMES[: ISA_NAMES.index(best) + 1]


def best_isa() -> str:
    """The best instruction set this CPU offers the compiled scan (``"none"`` without the library)."""
    lib = library()
    return "none" if lib is None else ISA_NAMES[lib.knn_best_isa()]


def _chunk_table(views: list[torch.Tensor], heads: int):
    """What the C gathers take of chunked storage: (count, bases, starts, head strides in bytes), or None
    where a view is not a CPU tensor [heads, m_i, d] of the first one's dtype and d with contiguous
    rows (the heads may be any stride apart)."""
    first = views[0]
    dim, dtype = first.shape[-1], first.dtype
    for v in views:
        if (
            v.device.type != "cpu"
            or v.dtype != dtype
            or v.dim() != 3
            or v.shape[0] != heads
            or v.shape[2] != dim
            or v.stride(2) != 1
            or (v.shape[1] > 1 and v.stride(1) != dim)
        ):
            return None
    size = first.element_size()
    count = len(views)
    bases = (ctypes.c_void_p * count)(*[v.data_ptr() for v in views])
    starts = (ctypes.c_int64 * (count + 1))()
    strides = (ctypes.c_int64 * count)(*[v.stride(0) * size for v in views])
    total = 0
    for i, v in enumerate(views):
        starts[i] = total
        total += v.shape[1]
    starts[count] = total
    return count, bases, starts, strides


def gather_rows(views: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor | None:
    """Rows of chunked storage by entry id, by the compiled library, or None where it cannot.

    Args:
        views: the chunks, each a CPU tensor [h, m_i, d] of one dtype whose rows are contiguous
            (``stride(-1) == 1``, ``stride(-2) == d``; the heads may be any stride apart), entries in order.
        ids: [h, n] int64 CPU entry ids; those outside ``0 .. sum(m_i) - 1`` (``-1``: empty) give zeros.

    Returns:
        [h, n, d] in the views' dtype, or None (library missing; a view on another device, of
        another dtype or layout) for the caller to gather another way.
    """
    import torch  # (only here: the loader itself needs no torch)

    lib = library()
    if lib is None or not views or ids.device.type != "cpu" or ids.dtype != torch.int64 or ids.dim() != 2:
        return None
    h, n = ids.shape
    table = _chunk_table(views, h)
    if table is None:
        return None
    dim, dtype = views[0].shape[-1], views[0].dtype
    ids = ids.contiguous()
    out = torch.empty(h, n, dim, dtype=dtype)
    lib.knn_gather(*table, h, n, ids.data_ptr(), dim * views[0].element_size(), out.data_ptr())
    return out


_KINDS = {"torch.float32": 0, "torch.bfloat16": 1, "torch.float16": 2}  # the C file's KIND_*


def weighted_rows(views: list[torch.Tensor], ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor | None:
    """The rows of entries ``ids`` summed with weights ``probs``, by the compiled library (the rows are
    read in place, never gathered), or None where it cannot.

    Args:
        views: the chunks, as :func:`gather_rows` takes them, of float32, bfloat16 or float16.
        ids: [h, q, k] int64 CPU entry ids; those outside ``0 .. sum(m_i) - 1`` (``-1``: empty) add nothing.
        probs: [h, q, k] float32 CPU weights.

    Returns:
        [h, q, d] float32: ``sum_j probs[..., j] * row(ids[..., j])``, summed in order of j in float32
        (fused multiply-adds where the CPU has AVX-512 or AVX2). None: library missing, or an argument on another
        device, of another dtype or layout.
    """
    import torch

    lib = library()
    if (
        lib is None
        or not views
        or str(views[0].dtype) not in _KINDS
        or ids.device.type != "cpu"
        or ids.dtype != torch.int64
        or ids.dim() != 3
        or probs.device.type != "cpu"
        or probs.dtype != torch.float32
        or probs.shape != ids.shape
    ):
        return None
    h, q, k = ids.shape
    table = _chunk_table(views, h)
    if table is None:
        return None
    dim = views[0].shape[-1]
    ids, probs = ids.contiguous(), probs.contiguous()
    out = torch.empty(h, q, dim, dtype=torch.float32)
    lib.knn_weighted_gather(
        *table, h, q, k, ids.data_ptr(), probs.data_ptr(), dim, _KINDS[str(views[0].dtype)], out.data_ptr()
    )
    return out


EXACT_SPLIT_WORK = 1 << 25  # multiply-adds of an exact search below which it runs on one thread
_split_pool: list[ThreadPoolExecutor] = []  # the threads of split C calls, once made (grown only)
_split_size = [0]


def run_split(call: Callable[[int, int], int], count: int, parts: int) -> list[int]:
    """Run ``call(first, rows)`` over ``count`` rows cut into ``parts`` contiguous pieces, one per thread:
    the first piece in the calling thread, the others on a pool of their own. ``call`` must be a leaf
    (a C call through ctypes, which releases the GIL) that writes only its own rows' outputs, so the
    pieces run in parallel and none waits on another. Returns each piece's return code, in order."""
    bounds = [count * i // parts for i in range(parts + 1)]
    pieces = [(a, b - a) for a, b in itertools.pairwise(bounds) if b > a]
    if len(pieces) == 1:
        return [call(*pieces[0])]
    with _lock:
        if not _split_pool or _split_size[0] < len(pieces) - 1:
            if _split_pool:
                _split_pool[0].shutdown(wait=False)  # its queued work still runs
            _split_pool[:] = [ThreadPoolExecutor(max_workers=len(pieces) - 1, thread_name_prefix="knn-split")]
            _split_size[0] = len(pieces) - 1
        pool = _split_pool[0]
    futures = [pool.submit(call, *piece) for piece in pieces[1:]]
    first = call(*pieces[0])
    return [first] + [f.result() for f in futures]


def _exact_part(lib, table, kind: int, q, k, first: int, rows: int, scores, ids) -> int:
    count, bases, starts, _ = table
    return lib.knn_exact(
        rows,
        q.shape[1],
        kind,
        q[first].data_ptr(),
        count,
        bases,
        starts,
        k,
        scores[first].data_ptr(),
        ids[first].data_ptr(),
    )


def exact_top_k(
    views: list[torch.Tensor], q: torch.Tensor, k: int, threads: int = 1
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The exact top-``k`` inner products of each query over the keys of ``views``, by the compiled
    kernel (no score matrix: ``knn_exact`` in the C file), or None where it cannot run.

    Args:
        views: the key chunks in order, each a CPU tensor [n_i, d] of float32, bfloat16 or float16 with
            contiguous rows; at most 2**31 - 1 keys in all.
        q: [m, d] float32 CPU queries, contiguous, m >= 1.
        k: >= 1.
        threads: threads to split the queries over when the search is large (``EXACT_SPLIT_WORK``).

    Returns:
        scores [m, k] float32 and ids [m, k] int64 (positions over the chunks), best first; of scores
        tied at the k-th place the earliest keys; empty slots ``-inf`` / ``-1``. None: library missing,
        the CPU without AVX-512, or an argument it does not take.
    """
    import torch

    lib = library()
    if (
        lib is None
        or not views
        or str(views[0].dtype) not in _KINDS
        or q.device.type != "cpu"
        or q.dtype != torch.float32
        or q.dim() != 2
        or not q.is_contiguous()
        or q.shape[0] == 0
        or any(v.dim() != 2 or v.shape[1] != q.shape[1] for v in views)
    ):
        return None
    table = _chunk_table([v[None] for v in views], 1)  # as one head: the chunks' layout checked there
    if table is None:
        return None
    n = table[2][table[0]]
    if n == 0 or n > 2**31 - 1:
        return None
    kind = _KINDS[str(views[0].dtype)]
    m = q.shape[0]
    scores = torch.empty(m, k, dtype=torch.float32)
    ids = torch.empty(m, k, dtype=torch.int64)
    parts = max(1, min(threads, m // 32, (m * n * q.shape[1]) // EXACT_SPLIT_WORK))
    codes = run_split(
        lambda first, rows: _exact_part(lib, table, kind, q, k, first, rows, scores, ids), m, parts
    )
    rc = -1 if -1 in codes else max(codes)
    if rc == 1:
        return None
    if rc:
        raise MemoryError(f"out of memory in the exact search of {m} queries over {n} keys")
    return scores, ids
