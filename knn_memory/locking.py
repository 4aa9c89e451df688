"""A readers-writer lock for one memory: many searches at once, every change alone.

:class:`~knn_memory.backend.MemoryBackend` wraps its public methods with :func:`reading` or
:func:`writing` (once, for every subclass), so a backend written without a thought for threads is
still safe: two ``add`` calls from two threads run one after the other, and a search waits for an
``add`` in progress (and the reverse) instead of reading a half-updated index. The lock is
re-entrant per thread (a writer may call other methods of the same memory, e.g. ``save`` calls
``state``; a reader may call readers). A reader that calls a writer would wait for itself: that
raises ``RuntimeError`` instead. Waiting writers go first, so a stream of searches cannot starve an
``add``.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class RWLock:
    """Readers-writer lock, re-entrant per thread, writer-preferring."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # threads holding a read
        self._writer: int | None = None  # thread ident of the writer
        self._write_depth = 0
        self._waiting_writers = 0
        self._local = threading.local()

    def _read_depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def acquire_read(self) -> None:
        me = threading.get_ident()
        depth = self._read_depth()
        if self._writer == me or depth:  # nested inside our own write or read
            self._local.depth = depth + 1
            return
        with self._cond:
            while self._writer is not None or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        self._local.depth = 1

    def release_read(self) -> None:
        depth = self._read_depth() - 1
        self._local.depth = depth
        if depth or self._writer == threading.get_ident():
            return
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self, what: str) -> None:
        me = threading.get_ident()
        if self._writer == me:
            self._write_depth += 1
            return
        if self._read_depth():
            raise RuntimeError(f"{what} changes the memory, and cannot run inside a search or save of it")
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = me
            self._write_depth = 1

    def release_write(self) -> None:
        self._write_depth -= 1
        if self._write_depth:
            return
        with self._cond:
            self._writer = None
            self._cond.notify_all()


_CREATE = threading.Lock()


def lock_of(obj: object) -> RWLock:
    """The :class:`RWLock` of ``obj`` (created on first use)."""
    lock = obj.__dict__.get("_rwlock")
    if lock is None:
        with _CREATE:
            lock = obj.__dict__.get("_rwlock")
            if lock is None:
                lock = obj.__dict__["_rwlock"] = RWLock()
    return lock


def reading(method: F) -> F:
    """Run ``method`` holding its object's lock shared."""
    if getattr(method, "_locked", False):
        return method

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        lock = lock_of(self)
        lock.acquire_read()
        try:
            return method(self, *args, **kwargs)
        finally:
            lock.release_read()

    wrapper._locked = True
    return wrapper  # type: ignore[return-value]


def writing(method: F) -> F:
    """Run ``method`` holding its object's lock exclusively."""
    if getattr(method, "_locked", False):
        return method

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        lock = lock_of(self)
        lock.acquire_write(f"{type(self).__name__}.{method.__name__}")
        try:
            return method(self, *args, **kwargs)
        finally:
            lock.release_write()

    wrapper._locked = True
    return wrapper  # type: ignore[return-value]
