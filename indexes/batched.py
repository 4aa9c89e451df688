"""Several indexes of one memory added to, or searched, in one compiled call.

A memory backend holds one index per (row, head) and, for every window, adds the window's keys to each
index of a row and searches each with the window's queries. For the ``"auto"`` index past its exact
phase each of those calls is small (64 keys or queries of head_dim 32: tens of microseconds of C work)
and used to cost as much again in Python around it (checks, tensor wrappers, ctypes), once per index.
:func:`add_many` and :func:`search_many` make one C call for all the indexes given instead, when every
one of them is such an index (:meth:`indexes.streaming.StreamingIndex.compiled_ivf`); otherwise they
call each index in turn. Searches of indexes that are still exact (``"Flat"``, ``"auto"`` below its
first build) over one block of keys each take one selection for all of them (:func:`_exact_many`).
Both ways run the same kernels on the same data in the same order, so the results are the same bit for
bit (``tests/test_batched_indexes.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import torch

from indexes import native
from indexes.bounded_ivf import BoundedIVF
from indexes.protocol import KeyIndex
from indexes.select import top_k
from indexes.streaming import SELECT_SCORES, StreamingIndex, pad_to_k, score_buffer
from indexes.threads import faiss_threads, fan_out

SPLIT_WORK = 1 << 21  # multiply-adds of a compiled add or search per thread it may split over
# float32 key copies that rebuilds running side by side may hold at once (256 MiB: two heads of 1M keys
# of head_dim 32); larger rebuilds run one after the other, so the peak memory of a long run is unchanged
TOGETHER_BYTES = 256 * 2**20


def all_compiled(indexes: Sequence[KeyIndex]) -> bool:
    """Whether every one of ``indexes`` is an ``"auto"`` index past its exact phase, which
    :func:`add_many` and :func:`search_many` take in one compiled call (split over threads by index)."""
    return _compiled(indexes) is not None


def _compiled(indexes: Sequence[KeyIndex]) -> list[BoundedIVF] | None:
    """The compiled ``"auto"`` index of each of ``indexes``, or None unless every one has one."""
    out = []
    for ix in indexes:
        ivf = ix.compiled_ivf() if isinstance(ix, StreamingIndex) else None
        if ivf is None:
            return None
        out.append(ivf)
    return out


def add_many(indexes: Sequence[KeyIndex], keys: torch.Tensor, threads: int = 1) -> None:
    """Add ``keys[i]`` to ``indexes[i]`` for every i.

    Args:
        indexes: the indexes (any :class:`indexes.KeyIndex`).
        keys: [len(indexes), n, d] float32, finite, contiguous, on the indexes' device (validated by
            the caller, as :meth:`KeyIndex.add_checked` takes them).
        threads: threads the compiled call may split the indexes over (``SPLIT_WORK`` each at least).
    """
    ivfs = _compiled(indexes) if len(indexes) > 1 and keys.shape[1] else None
    if ivfs is None or len({ivf.lists.dtype for ivf in ivfs}) != 1:
        for ix, x in zip(indexes, keys, strict=True):
            ix.add_checked(x)
        return
    table = np.array([ivf.compiled_add_entry() for ivf in ivfs], dtype=np.int64)  # [I, 7]
    codes = keys.to(ivfs[0].lists.dtype)  # [I, n, d]
    n = keys.shape[1]
    work = n * keys.shape[2] * sum(ivf.nlist for ivf in ivfs)  # the assignment's matmul
    _compiled_add(table, keys, codes, _parts(len(ivfs), work, threads))
    due = [ix for ix, ivf in zip(indexes, ivfs, strict=True) if ix.added_to(ivf, n)]
    if due:
        rebuild_many(due, threads)


def rebuild_many(indexes: Sequence[StreamingIndex], threads: int = 1) -> None:
    """Rebuild ``indexes`` (their rebuilds are due: every head of a row comes due at the same add).

    With several threads and more than one index, while the rebuilds' float32 copies of their keys are
    small (``TOGETHER_BYTES`` for all that run at once), they run side by side, each assigning its keys on
    one thread. Faiss's k-means does not give the same centroids on every thread count, so each runs it
    on the caller's Faiss thread count, as one after the other would: the lists are the same either way.
    Otherwise one after the other, each assigning its keys on ``threads`` threads.
    """
    width = min(len(indexes), native.split_threads(threads))
    if width > 1 and width * max(ix.rebuild_bytes() for ix in indexes) <= TOGETHER_BYTES:
        kmeans_threads = faiss.omp_get_max_threads()  # the caller's, which a rebuild here would use

        def rebuild(ix: StreamingIndex) -> None:
            with faiss_threads(kmeans_threads):
                ix.rebuild(1)

        fan_out(rebuild, indexes, width)
        return
    for ix in indexes:
        ix.rebuild(threads)


def search_many(
    indexes: Sequence[KeyIndex], queries: torch.Tensor, k: int, threads: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Search ``indexes[i]`` with ``queries[i]`` for every i.

    Args:
        indexes: the indexes (any :class:`indexes.KeyIndex`).
        queries: [len(indexes), m, d] float32, finite, contiguous, on the indexes' device (validated).
        k: neighbours per query, >= 1 (validated).
        threads: threads the compiled call may split the indexes over (``SPLIT_WORK`` each at least).

    Returns:
        scores [len(indexes), m, k] float32 and ids [len(indexes), m, k] int64, as each index's
        :meth:`KeyIndex.search_checked` gives them.
    """
    together = len(indexes) > 1 and queries.shape[1] > 0
    ivfs = _compiled(indexes) if together else None
    if ivfs is None or any(ivf.ntotal == 0 for ivf in ivfs):
        found = _exact_many(indexes, queries, k) if together else None
        if found is not None:
            return found
        results = [ix.search_checked(q, k) for ix, q in zip(indexes, queries, strict=True)]
        return torch.stack([s for s, _ in results]), torch.stack([i for _, i in results])
    m = queries.shape[1]
    table = np.array([ivf.compiled_search_entry() for ivf in ivfs], dtype=np.int64)  # [I, 5]
    scores = torch.empty(len(ivfs), m, k, dtype=torch.float32)
    ids = torch.empty(len(ivfs), m, k, dtype=torch.int64)
    stats = np.zeros((len(ivfs), 4), dtype=np.int64)
    # the first lists' scan, and the ranking's product with the boxes
    work = m * queries.shape[2] * sum(ivf.ntotal * ivf.nprobe // ivf.nlist + 2 * ivf.nlist for ivf in ivfs)
    _compiled_search(table, queries, scores, ids, stats, _parts(len(ivfs), work, threads))
    for ivf, row in zip(ivfs, stats.tolist(), strict=True):
        ivf.searched(m, row)
    return scores, ids


def _parts(heads: int, work: int, threads: int) -> int:
    """Pieces to split a compiled call over ``heads`` indexes into: one per ``SPLIT_WORK`` of its
    ``work`` (multiply-adds), at most one per index and ``threads``; one where the library cannot split
    (:func:`indexes.native.split_threads`)."""
    return max(1, min(heads, native.split_threads(threads), work // SPLIT_WORK))


def _compiled_add(table: np.ndarray, keys: torch.Tensor, codes: torch.Tensor, parts: int) -> None:
    """The C add: ``keys`` [I, n, d] float32 and their ``codes`` into the I indexes of ``table`` [I, 7],
    split by index over ``parts`` threads."""
    heads, n = keys.shape[0], keys.shape[1]
    if native.library().knn_add_heads(heads, table.ctypes.data, n, keys.data_ptr(), codes.data_ptr(), parts):
        raise MemoryError(f"out of memory adding {n} keys to each of {heads} indexes")


def _compiled_search(
    table: np.ndarray,
    queries: torch.Tensor,
    scores: torch.Tensor,
    ids: torch.Tensor,
    stats: np.ndarray,
    parts: int,
) -> None:
    """The C search: ``queries`` [I, m, d] in the I indexes of ``table`` [I, 5], into ``scores`` and ``ids``
    [I, m, k] and ``stats`` [I, 4], split by index over ``parts`` threads."""
    heads, m, k = scores.shape
    if native.library().knn_search_heads(
        heads,
        table.ctypes.data,
        m,
        queries.data_ptr(),
        k,
        scores.data_ptr(),
        ids.data_ptr(),
        stats.ctypes.data,
        parts,
    ):
        raise MemoryError(f"out of memory searching {heads} indexes")


def _exact_many(
    indexes: Sequence[KeyIndex], queries: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The exact search of indexes that hold the same number of keys in one block each
    (:meth:`StreamingIndex.exact_keys`): one matmul per index into one score buffer [I, m, n], then one
    selection over all its rows (the compiled one: row by row, as each index's own). None where they
    do not qualify, or the scores of all of them would not fit one buffer of ``SELECT_SCORES``."""
    if native.library() is None:
        return None
    views = [ix.exact_keys() if isinstance(ix, StreamingIndex) else None for ix in indexes]
    first = views[0]
    if first is None or any(v is None or v.shape != first.shape or v.dtype != first.dtype for v in views):
        return None
    heads, m, _ = queries.shape
    n = first.shape[0]
    if heads * m * n > SELECT_SCORES:
        return None
    keys = torch.stack(views).to(torch.float32)  # [I, n, d]
    scores = score_buffer(heads * m * n).view(heads, m, n)
    for i in range(heads):  # as each index's own search (a batched matmul rounds differently)
        torch.matmul(queries[i], keys[i].T, out=scores[i])
    values, positions = pad_to_k(*top_k(scores.view(heads * m, n), k), k)  # fewer keys than k: empty slots
    return values.view(heads, m, k), positions.view(heads, m, k)
