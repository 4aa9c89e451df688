"""Thread settings for Faiss next to torch, and the thread pool that fans searches out over heads.

Faiss (OpenMP) and torch each default to one thread per core. They run one after the other here, so
both keep all cores; when many small searches run at once (one per head), each worker thread runs
Faiss with a single OpenMP thread and the pool supplies the parallelism.

`omp_set_num_threads` is per thread (OpenMP ICV semantics): a new Python thread starts with the
process default, so every pool worker sets its own count in its initializer.

A child process forked after Faiss has used several OpenMP threads hangs in its next parallel region
(the OpenMP pool does not survive ``fork``); torch's own OpenMP pool has the same problem. The fork
hook below makes a forked child (``os.fork``, ``multiprocessing``'s default start method on Linux,
torch ``DataLoader`` workers) run Faiss and torch single-threaded and builds a fresh thread pool
there, which avoids the hang. Children that need several threads each should be started with
:func:`fork_safe_context` (``"forkserver"``) instead.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import faiss
import torch

from indexes.validate import MAX_COUNT, check_int

T = TypeVar("T")
R = TypeVar("R")

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def default_threads() -> int:
    """Threads Faiss may use: ``OMP_NUM_THREADS`` if set, else the CPUs this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, len(os.sched_getaffinity(0)))


def set_faiss_threads(n: int) -> None:
    """Set the OpenMP thread count Faiss uses in the calling thread."""
    check_int(n, "n (Faiss threads)", 1, MAX_COUNT)
    faiss.omp_set_num_threads(n)


@contextmanager
def faiss_threads(n: int):
    """Run a block with Faiss limited to ``n`` OpenMP threads in this thread, then restore."""
    before = faiss.omp_get_max_threads()
    set_faiss_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def call_threads() -> int:
    """Threads a compiled call made from this thread may split over: the fewer of torch's intra-op
    threads and Faiss's OpenMP threads here (both are what ``knn_memory.set_threads`` sets)."""
    return max(1, min(torch.get_num_threads(), faiss.omp_get_max_threads()))


def _single_threaded_worker() -> None:
    faiss.omp_set_num_threads(1)


def _submit_all(fn: Callable[[T], R], groups: list[list[T]], size: int) -> list[Future]:
    """Submit one task per group to the shared pool, grown to at least ``size`` workers.

    The pool only grows and is never shut down while in use: several threads may fan out at once
    (concurrent searches), each with its own worker count, and submission happens under the lock
    so no caller can find its pool replaced between choosing it and submitting to it.
    """
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < size:
            old = _pool
            _pool = ThreadPoolExecutor(
                max_workers=size, thread_name_prefix="faiss-head", initializer=_single_threaded_worker
            )
            _pool_size = size
            if old is not None:
                old.shutdown(wait=False)  # its queued work still runs; nothing new goes there
        return [_pool.submit(lambda g: [fn(item) for item in g], group) for group in groups]


def fan_out(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """Apply ``fn`` to every item, in order, over a thread pool of single-threaded Faiss workers.

    At most ``workers`` (default: :func:`default_threads`) items run at once: the items are split
    into that many contiguous groups, one pool task each. With one item (or one worker) ``fn`` runs in
    the calling thread with Faiss's full thread count, which is faster for a single large search.
    Faiss releases the GIL inside its calls, so the workers run in parallel. Safe to call from
    several threads at once.
    """
    items = list(items)
    n_workers = min(len(items), workers or default_threads())
    if n_workers <= 1:
        return [fn(item) for item in items]
    size, extra = divmod(len(items), n_workers)
    groups, start = [], 0
    for g in range(n_workers):
        stop = start + size + (g < extra)
        groups.append(items[start:stop])
        start = stop
    futures = _submit_all(fn, groups, n_workers)
    return [result for future in futures for result in future.result()]


def fork_safe_context(method: str = "forkserver") -> multiprocessing.context.BaseContext:
    """A ``multiprocessing`` context whose children start clean, with all their threads.

    A forked child of a process that has run Faiss or torch multi-threaded is safe only single-threaded
    (the fork hook of this module sees to that). Workers that should search with several threads, e.g.
    ``torch.utils.data.DataLoader(..., multiprocessing_context=fork_safe_context())``, need a start method
    that does not fork the parent: ``"forkserver"`` (default; children fork from a fresh server process)
    or ``"spawn"``. Their arguments must be picklable: pass a saved memory's path
    (:func:`knn_memory.load_backend`), not a live index.

    Raises:
        ValueError: ``method`` is ``"fork"`` or not a start method of this platform.
    """
    if method == "fork" or method not in multiprocessing.get_all_start_methods():
        raise ValueError(
            f"method must be one of {[m for m in multiprocessing.get_all_start_methods() if m != 'fork']}, "
            f"got {method!r}"
        )
    return multiprocessing.get_context(method)


def _after_fork_in_child() -> None:
    global _pool, _pool_size, _pool_lock
    _pool = None  # the parent's worker threads do not exist in the child
    _pool_size = 0
    _pool_lock = threading.Lock()  # another parent thread may have held it at the fork
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)  # torch's OpenMP pool hangs in a forked child just like Faiss's


os.register_at_fork(after_in_child=_after_fork_in_child)
