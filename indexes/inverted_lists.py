"""`InvertedLists`: the lists of the ``"auto"`` index, keys stored once, and their certified top-k scan.

List ``l`` holds the keys assigned to it as raw codes of the memory's dtype (float32, bfloat16 or
float16: a key decodes to exactly the value it had) with their ids, in insertion order. Ids are
int32 here (4 bytes per key; a head's memory holds fewer than 2**31 keys). A full list grows by an
eighth of its room (at least one block of 16 keys), so lists hold at most ~12.5% unused room;
:meth:`InvertedLists.nbytes` counts the room, not only the keys. The compiled lists never move a key
once written: a list is a few segments (the exact size reserved at a build, then each growth step), cut
in turn from large mapped slabs, so growing costs no copy and leaves no freed hole behind. Slabs of
2 MiB and more ask the kernel for transparent huge pages (``madvise``): adds write to the ends of
thousands of lists and a scan reads a few KiB of each, which with 4 KiB pages is mostly TLB misses.

:meth:`InvertedLists.scan` is the search: each query scans its lists in the order given (ranked by
:mod:`indexes.bounded_ivf`), keeping its k best inner products. After ``nprobe`` lists it stops as soon
as the largest upper bound of q·k over the lists it has not scanned is below its k-th score (no key
left can enter its top-k, so the result is exact), and it scans at most ``cap`` lists.

The work is done by the compiled library (:mod:`indexes.native`) where it is built: a fused scan
(decode + dot product + top-k candidates) that reads each code once, and once for all the queries of
a call that rank a list among their first ``nprobe``; a passkey prompt of 64k tokens took 15-17 s
instead of 29 s with Faiss's list scan (``benchmarks/results/native_lists/``). Without it, :class:`_PythonLists` does the same in torch (same results, slower). The caller
(:class:`indexes.bounded_ivf.BoundedIVF`) validates every argument.
"""

from __future__ import annotations

import ctypes
import logging
import math
from typing import NamedTuple

import numpy as np
import torch

from indexes import native

log = logging.getLogger(__name__)

KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the C file's code kinds
LANES = 16  # keys per block of the C lists; capacity is whole blocks
GROWTH = 8  # a full list of room `cap` gets max(cap // GROWTH, LANES) more, rounded up to whole blocks
LIST_HEADER = 48  # bytes of the C lists' header per list (sizes, segment count and table)
SEGMENT_HEADER = 16  # bytes of a segment's entry in its list's table (allocated 4, 8, 16, ... at a time)
MAX_DIM = 4096  # the largest key dimension the lists take (attention heads are far smaller)
_warned: list[bool] = []


class ListsShape(NamedTuple):
    """What the engines need to know of their lists."""

    nlist: int
    dim: int
    dtype: torch.dtype


def key_bytes(lists: InvertedLists | ListsShape) -> int:
    """Bytes of room one key takes in the lists: its elements (a bfloat16 key of odd dim is padded to
    even: the C lists pair elements) and its int32 id."""
    width = 2 if lists.dtype == torch.bfloat16 else 1
    return -(-lists.dim // width) * width * lists.dtype.itemsize + 4


def segment_table(segments: int) -> int:
    """Entries the C lists allocate in the table of a list of ``segments`` segments (4, 8, 16, ...)."""
    return 0 if segments == 0 else max(4, 1 << (segments - 1).bit_length())


def _ptr(x: torch.Tensor | np.ndarray) -> int:
    return x.data_ptr() if isinstance(x, torch.Tensor) else x.ctypes.data


class InvertedLists:
    """``nlist`` lists of keys of ``dim`` elements stored as ``dtype`` codes.

    ``native=None`` uses the compiled library where it is built, else the Python lists (a warning
    says so once); ``True`` requires it; ``False`` always uses the Python lists.
    """

    def __init__(self, nlist: int, dim: int, dtype: torch.dtype, native: bool | None = None) -> None:
        if dtype not in KINDS:
            raise ValueError(f"dtype must be one of {list(KINDS)}, got {dtype}")
        if not 1 <= dim <= MAX_DIM:
            raise ValueError(f"dim must be in [1, {MAX_DIM}], got {dim}")
        self.nlist, self.dim, self.dtype = int(nlist), int(dim), dtype
        lib = None if native is False else _library()
        if native and lib is None:
            raise RuntimeError("native=True but the compiled inverted lists are not built")
        # the engines get the shape, not this object: a reference back would make a cycle, and a store
        # in a cycle is freed only when the garbage collector gets to it (a rebuilt index's old lists
        # would stay resident until then)
        shape = ListsShape(self.nlist, self.dim, dtype)
        self._lists = _NativeLists(lib, shape) if lib is not None else _PythonLists(shape)

    @property
    def is_native(self) -> bool:
        """True when the compiled library holds and scans the lists."""
        return isinstance(self._lists, _NativeLists)

    @property
    def handle(self) -> int | None:
        """Address of the compiled store (for the calls that take several at once), or None."""
        return self._lists._h.value if isinstance(self._lists, _NativeLists) else None

    def reserve(self, extra: torch.Tensor) -> None:
        """Room for ``extra[l]`` more keys in list l, exactly ([nlist] int64; before a bulk add)."""
        self._lists.reserve(extra.to(torch.int64).contiguous())

    def add(self, codes: torch.Tensor, lists: torch.Tensor, ids: torch.Tensor) -> None:
        """Append keys ``codes`` [n, dim] (``dtype``) to ``lists`` [n] int64 with ``ids`` [n] int64.

        Each list must receive its ids in rising order (:meth:`truncate` relies on it)."""
        if codes.shape[0]:
            self._lists.add(codes.contiguous(), lists.contiguous(), ids.contiguous())

    def add_boxed(
        self,
        codes: torch.Tensor,
        lists: torch.Tensor,
        ids: torch.Tensor,
        keys: torch.Tensor,
        bounds: torch.Tensor,
        counts: torch.Tensor,
    ) -> None:
        """:meth:`add`, and in the same pass widen each list's box ``bounds`` [nlist, 2 dim] float32
        (maxima, then minima) to hold its new ``keys`` [n, dim] float32 and add them to ``counts``
        [nlist] int64 (both updated in place)."""
        if codes.shape[0]:
            self._lists.add_boxed(
                codes.contiguous(), lists.contiguous(), ids.contiguous(), keys.contiguous(), bounds, counts
            )

    def sizes(self) -> torch.Tensor:
        """Keys per list, [nlist] int64."""
        return self._lists.sizes()

    def capacities(self) -> torch.Tensor:
        """Keys each list has room for, [nlist] int64 (>= :meth:`sizes`)."""
        return self._lists.capacities()

    def segments(self) -> torch.Tensor:
        """Pieces of memory each list is in, [nlist] int64: one per growth step (a reserve is one)."""
        return self._lists.segments()

    def nbytes(self) -> int:
        """Bytes allocated for the lists: codes and ids of their whole capacity, the list headers and
        their segment tables (:data:`LIST_HEADER`, :data:`SEGMENT_HEADER`)."""
        return self._lists.nbytes()

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every key's codes [n, dim] (``dtype``) and ids [n] int64: list 0 first, each in insertion order."""
        return self._lists.export()

    def truncate(self, n: int) -> None:
        """Drop the keys of id >= ``n``."""
        self._lists.truncate(int(n))

    def scan(
        self, q: np.ndarray, k: int, lists: torch.Tensor, bounds: torch.Tensor, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
        """Top-``k`` of each query ``q`` [m, dim] float32 over its ranked ``lists`` [m, cap] int64.

        ``bounds`` [m, cap] float32 are the lists' upper bounds of q·k, in the same order. Returns
        scores [m, k] float32 (-inf where fewer than k keys were seen) and ids [m, k] int64 (-1
        there), best first, and (lists scanned, keys scanned, queries that scanned all ``cap`` lists
        when ``cap > nprobe``).
        """
        q = np.ascontiguousarray(q, dtype=np.float32)
        return self._lists.scan(q, k, lists.contiguous(), bounds.contiguous(), min(nprobe, lists.shape[1]))

    def search(
        self,
        q: np.ndarray,
        k: int,
        bound: torch.Tensor | None,
        cap: int,
        nprobe: int,
        rank: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
        """:meth:`scan` of each query's ``cap`` lists of largest ``rank`` [m, nlist] float32 (default: the
        ``bound`` [m, nlist] float32 itself), in that order, the lower list first on equal values (the
        ranking is done in the same pass; 1 <= ``cap`` <= nlist). With a ``rank``, the stop test at each
        place compares the k-th score with the largest bound of the lists not yet scanned
        (:func:`remaining_bounds`); ``bound`` may then be None where ``cap <= nprobe`` (no test is made)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        if bound is None and (rank is None or cap > nprobe):
            raise ValueError("InvertedLists.search needs the bound to stop a scan past nprobe lists")
        bound = None if bound is None else bound.contiguous()
        rank = None if rank is None else rank.contiguous()
        return self._lists.search(q, k, bound, cap, min(nprobe, cap), rank)

    def search_boxes(
        self, q: np.ndarray, k: int, boxes: torch.Tensor, shrink: float, cap: int, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
        """:meth:`search` with the bound and the rank of every list computed by the compiled library from
        the lists' boxes ``boxes`` [nlist, 2 dim] float32 (maxima, then minima), inside the same call:
        the bound of the box, and the rank of the box shrunk about its centre by ``shrink`` (1: ranked by
        the bound itself; see :mod:`indexes.bounded_ivf`). Compiled lists only (:attr:`is_native`)."""
        if not isinstance(self._lists, _NativeLists):
            raise RuntimeError("InvertedLists.search_boxes needs the compiled lists")
        q = np.ascontiguousarray(q, dtype=np.float32)
        return self._lists.search_boxes(q, k, boxes.contiguous(), float(shrink), cap, min(nprobe, cap))


def remaining_bounds(bound: torch.Tensor | None, lists: torch.Tensor) -> torch.Tensor:
    """For lists [m, cap] int64 in the order they are scanned, the largest ``bound`` [m, nlist] of the
    lists not scanned before each place: [m, cap] (those at that place and after, and every list outside
    the ``cap``); ``+inf`` everywhere without a bound. What the scan's stop test compares the k-th score
    with when the lists are ranked by something other than their bound."""
    m, cap = lists.shape
    if bound is None:
        return torch.full((m, cap), math.inf, dtype=torch.float32)
    placed = torch.gather(bound, 1, lists)
    after = torch.flip(torch.cummax(torch.flip(placed, [1]), dim=1).values, [1])
    outside = bound.scatter(1, lists, -math.inf).amax(dim=1, keepdim=True)
    return torch.maximum(after, outside)


def _library() -> ctypes.CDLL | None:
    lib = native.library()
    if lib is None and not _warned:
        _warned.append(True)
        log.warning(
            "the compiled inverted lists are not built (no C compiler at install?): the 'auto' index "
            "uses its Python lists, several times slower; reinstall with a C compiler to build them"
        )
    return lib


class _NativeLists:
    """The lists in the compiled library (one C store, freed with this object)."""

    def __init__(self, lib: ctypes.CDLL, owner: ListsShape) -> None:
        self._lib, self._shape = lib, owner
        handle = lib.knn_store_new(owner.nlist, owner.dim, KINDS[owner.dtype])
        if not handle:
            raise MemoryError(f"cannot allocate {owner.nlist} inverted lists")
        self._h = ctypes.c_void_p(handle)

    def __del__(self) -> None:
        handle = getattr(self, "_h", None)
        if handle is not None and handle.value:
            self._lib.knn_store_free(handle)
            self._h = None

    def reserve(self, extra: torch.Tensor) -> None:
        if self._lib.knn_store_reserve(self._h, _ptr(extra)):
            raise MemoryError("out of memory reserving inverted lists")

    def add(self, codes: torch.Tensor, lists: torch.Tensor, ids: torch.Tensor) -> None:
        n = codes.shape[0]
        if self._lib.knn_store_add(self._h, n, _ptr(codes), _ptr(lists), _ptr(ids)):
            raise MemoryError(f"out of memory adding {n} keys to inverted lists")

    def add_boxed(self, codes, lists, ids, keys, bounds, counts) -> None:
        n = codes.shape[0]
        rc = self._lib.knn_store_add_boxed(
            self._h, n, _ptr(codes), _ptr(lists), _ptr(ids), _ptr(keys), _ptr(bounds), _ptr(counts)
        )
        if rc:
            raise MemoryError(f"out of memory adding {n} keys to inverted lists")

    def sizes(self) -> torch.Tensor:
        out = torch.empty(self._shape.nlist, dtype=torch.int64)
        self._lib.knn_store_sizes(self._h, _ptr(out))
        return out

    def capacities(self) -> torch.Tensor:
        out = torch.empty(self._shape.nlist, dtype=torch.int64)
        self._lib.knn_store_capacities(self._h, _ptr(out))
        return out

    def segments(self) -> torch.Tensor:
        out = torch.empty(self._shape.nlist, dtype=torch.int64)
        self._lib.knn_store_segments(self._h, _ptr(out))
        return out

    def nbytes(self) -> int:
        return int(self._lib.knn_store_nbytes(self._h))

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(self.sizes().sum())
        codes = torch.empty(n, self._shape.dim, dtype=self._shape.dtype)
        ids = torch.empty(n, dtype=torch.int64)
        self._lib.knn_store_export(self._h, _ptr(codes), _ptr(ids))
        return codes, ids

    def truncate(self, n: int) -> None:
        self._lib.knn_store_truncate(self._h, n)

    def search(self, q, k, bound, cap, nprobe, rank):
        bp, rp = (0 if x is None else _ptr(x) for x in (bound, rank))
        return self._call("search", self._lib.knn_search, q, k, bp, rp, cap, nprobe)

    def scan(self, q, k, lists, bounds, nprobe):
        return self._call("scan", self._lib.knn_scan, q, k, lists.shape[1], nprobe, _ptr(lists), _ptr(bounds))

    def search_boxes(self, q, k, boxes, shrink, cap, nprobe):
        return self._call("search", self._lib.knn_search_boxes, q, k, _ptr(boxes), shrink, cap, nprobe)

    def _call(self, what, fn, q, k, *args):
        """``fn(store, m, q, k, *args, scores, ids, stats)``, the C search or scan -> scores, ids, stats."""
        m = q.shape[0]
        scores = np.empty((m, k), dtype=np.float32)
        ids = np.empty((m, k), dtype=np.int64)
        stats = np.zeros(4, dtype=np.int64)  # the 4th, top-k candidates, is the C scan's own (profiling)
        if fn(self._h, m, _ptr(q), k, *args, _ptr(scores), _ptr(ids), _ptr(stats)):
            raise MemoryError(f"out of memory in the inverted-list {what}")
        return scores, ids, (int(stats[0]), int(stats[1]), int(stats[2]))


class _PythonLists:
    """The same lists in torch tensors, for an install without the compiled library."""

    def __init__(self, owner: ListsShape) -> None:
        self._shape = owner
        self._codes = [torch.empty(0, owner.dim, dtype=owner.dtype) for _ in range(owner.nlist)]
        self._ids = [torch.empty(0, dtype=torch.int32) for _ in range(owner.nlist)]
        self._size = [0] * owner.nlist
        self._segments = [0] * owner.nlist  # growth steps of each list (the C lists' segments)

    def _grow(self, l: int, need: int, exact: bool) -> None:
        cap = self._ids[l].shape[0]
        if need <= cap:
            return
        new = need if exact else max(need, cap + max(cap // GROWTH, LANES))
        new = -(-new // LANES) * LANES  # whole blocks, as the C lists
        self._segments[l] += 1
        codes = torch.empty(new, self._shape.dim, dtype=self._shape.dtype)
        ids = torch.empty(new, dtype=torch.int32)
        size = self._size[l]
        codes[:size], ids[:size] = self._codes[l][:size], self._ids[l][:size]
        self._codes[l], self._ids[l] = codes, ids

    def reserve(self, extra: torch.Tensor) -> None:
        for l, more in enumerate(extra.tolist()):
            self._grow(l, self._size[l] + more, exact=True)

    def add(self, codes: torch.Tensor, lists: torch.Tensor, ids: torch.Tensor) -> None:
        order = torch.argsort(lists, stable=True)
        sorted_lists = lists[order]
        unique, counts = torch.unique_consecutive(sorted_lists, return_counts=True)
        begin = 0
        for l, c in zip(unique.tolist(), counts.tolist(), strict=True):
            rows = order[begin : begin + c]
            begin += c
            size = self._size[l]
            for j in range(c):  # one key at a time: the same growth steps as the C lists
                self._grow(l, size + j + 1, exact=False)
            self._codes[l][size : size + c] = codes[rows]
            self._ids[l][size : size + c] = ids[rows].to(torch.int32)
            self._size[l] = size + c

    def add_boxed(self, codes, lists, ids, keys, bounds, counts) -> None:
        self.add(codes, lists, ids)
        d = self._shape.dim
        index = lists[:, None].expand(-1, d)
        bounds[:, :d].scatter_reduce_(0, index, keys, reduce="amax")
        bounds[:, d:].scatter_reduce_(0, index, keys, reduce="amin")
        counts.index_add_(0, lists, torch.ones_like(lists))

    def sizes(self) -> torch.Tensor:
        return torch.tensor(self._size, dtype=torch.int64)

    def capacities(self) -> torch.Tensor:
        return torch.tensor([ids.shape[0] for ids in self._ids], dtype=torch.int64)

    def segments(self) -> torch.Tensor:
        return torch.tensor(self._segments, dtype=torch.int64)

    def nbytes(self) -> int:
        """The bytes the C lists hold for the same keys: room, list headers and segment tables."""
        tables = sum(segment_table(n) for n in self._segments)
        room = sum(ids.shape[0] for ids in self._ids) * key_bytes(self._shape)
        return room + self._shape.nlist * LIST_HEADER + tables * SEGMENT_HEADER

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self._size
        codes = torch.cat([c[:s] for c, s in zip(self._codes, n, strict=True)])
        ids = torch.cat([i[:s] for i, s in zip(self._ids, n, strict=True)]).to(torch.int64)
        return codes, ids

    def truncate(self, n: int) -> None:
        for l in range(self._shape.nlist):
            ids = self._ids[l][: self._size[l]]
            self._size[l] = int(torch.searchsorted(ids, torch.tensor(n, dtype=torch.int32)))

    def search(self, q, k, bound, cap, nprobe, rank):
        order = bound if rank is None else rank
        bounds, lists = torch.sort(order, dim=1, descending=True, stable=True)  # lower list first on ties
        lists = lists[:, :cap].contiguous()
        bounds = bounds[:, :cap] if rank is None else remaining_bounds(bound, lists)
        return self.scan(q, k, lists, bounds.contiguous(), nprobe)

    def scan(self, q, k, lists, bounds, nprobe):
        m, cap = lists.shape
        scores = np.full((m, k), -math.inf, dtype=np.float32)
        ids = np.full((m, k), -1, dtype=np.int64)
        scanned = keys = capped = 0
        qt = torch.from_numpy(q)
        for i in range(m):
            best_s = torch.empty(0)
            best_i = torch.empty(0, dtype=torch.int64)
            for j in range(cap):
                if j >= nprobe and best_s.shape[0] >= k and float(bounds[i, j]) < float(best_s[-1]):
                    break
                capped += j == cap - 1 and j >= nprobe
                l = int(lists[i, j])
                size = self._size[l]
                scanned += 1
                keys += size
                if size == 0:
                    continue
                s = self._codes[l][:size].to(torch.float32) @ qt[i]
                both_s = torch.cat([best_s, s])
                both_i = torch.cat([best_i, self._ids[l][:size].to(torch.int64)])
                best_s, pos = torch.topk(both_s, min(k, both_s.shape[0]))
                best_i = both_i[pos]
            scores[i, : best_s.shape[0]] = best_s.numpy()
            ids[i, : best_i.shape[0]] = best_i.numpy()
        return scores, ids, (scanned, keys, capped)
