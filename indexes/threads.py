"""Thread settings for Faiss next to torch, and the thread pool that fans searches out over heads.

Faiss (OpenMP) and torch each default to one thread per core. They run one after the other here, so
both keep all cores; when many small searches run at once (one per head), each worker thread runs
Faiss with a single OpenMP thread and the pool supplies the parallelism.

`omp_set_num_threads` is per thread (OpenMP ICV semantics): a new Python thread starts with the
process default, so every pool worker sets its own count in its initializer.

A child process forked after Faiss has used several OpenMP threads hangs in its next parallel region
(the OpenMP pool does not survive ``fork``). The fork hook below makes a forked child run Faiss
single-threaded and builds a fresh thread pool there, which avoids the hang.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import faiss

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
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (Faiss threads) must be a positive int, got {n!r}")
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


def _single_threaded_worker() -> None:
    faiss.omp_set_num_threads(1)


def _get_pool(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != size:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(
                max_workers=size, thread_name_prefix="faiss-head", initializer=_single_threaded_worker
            )
            _pool_size = size
        return _pool


def fan_out(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """Apply ``fn`` to every item, in order, over a thread pool of single-threaded Faiss workers.

    With one item (or one worker) ``fn`` runs in the calling thread with Faiss's full thread count,
    which is faster for a single large search. Faiss releases the GIL inside its calls, so the
    workers run in parallel.
    """
    items = list(items)
    n_workers = min(len(items), workers or default_threads())
    if n_workers <= 1:
        return [fn(item) for item in items]
    return list(_get_pool(n_workers).map(fn, items))


def _after_fork_in_child() -> None:
    global _pool, _pool_size
    _pool = None  # the parent's worker threads do not exist in the child
    _pool_size = 0
    faiss.omp_set_num_threads(1)


os.register_at_fork(after_in_child=_after_fork_in_child)
