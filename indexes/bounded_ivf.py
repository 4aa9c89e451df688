"""`BoundedIVF`: an inverted file whose lists are ranked, per query, by a bound on q·k over the list.

A plain IVF ranks its lists by ``q · centroid``. Attention queries lie outside the keys' distribution
(RetrievalAttention's query/key shift), and on the embedded model's own queries that ranking finds
3-27% of the exact top-32 at 8 of 512 lists. This index keeps, for every list, the per-channel minimum
and maximum of its keys (a box, as Quest does for pages) and ranks lists by the largest inner product
any point of the box can have with the query::

    bound_l(q) = sum_i max(q_i * lo_l,i, q_i * hi_l,i) = relu(q) · hi_l + min(q, 0) · lo_l

which is an upper bound of ``q · k`` for every key k of list l (one [m, 2d] x [2d, L] matmul for a
window's queries): a list whose keys can score high is
scanned even when its centroid points elsewhere. On the same queries that ranking finds 52-97% at 8
lists and 70-100% at 16 (``benchmarks/README.md``).

The bound is loose: it assumes a key at the box's far corner, which no key is. So the lists are
*ranked* by the bound of the box shrunk about its centre by :attr:`BoundedIVF.rank_shrink` (the
``"auto"`` policy's ``rank_shrink``, 0.25 by default; 1 ranks by the bound itself)::

    rank_l(q) = q · centre_l + shrink * |q| · halfwidth_l

(the same one matmul, with the queries transformed: :func:`shrunk_queries`). With the compiled lists
both products are computed by the library inside the search call itself
(:meth:`InvertedLists.search_boxes`), so they run on the threads that a row's heads are split over
(:mod:`indexes.batched`); the Python lists compute them with torch. On the embedded model's
own queries at 512k keys this finds far more of the exact top-32 in the same number of lists: at 8
lists, tie-aware recall@32 0.855 -> 0.982 and 0.657 -> 0.936 for the two memory layers; with up to
32, 0.958 -> 0.999 and 0.915 -> 0.994 (``benchmarks/results/rank_shrink/``).

The bound still says when to stop: once a query's k-th best score so far exceeds the largest bound of
the lists it has not scanned, no unscanned key can enter its top-k, and its result is exact.
:meth:`search` scans ``nprobe`` lists for every query, then goes on list by list while a query is not
yet certain, up to ``max_nprobe``.

The lists (:class:`indexes.inverted_lists.InvertedLists`) hold the keys themselves in the memory's
dtype (bfloat16, float16 or float32; not residuals), so scores are exact inner products and the keys
decode back exactly for a rebuild; the compiled scan reads each code once. Keys are assigned to lists
by an L2 k-means quantizer trained by Faiss (boxes of L2 clusters are tight). Everything is validated
by the caller (:class:`indexes.streaming.StreamingIndex`).
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from indexes.inverted_lists import KINDS, InvertedLists
from indexes.quantizer import Quantizer
from indexes.select import top_k

ASSIGN_BLOCK = 65536
EMPTY = 1e30  # placeholder bound of an empty list (finite: no inf * 0 in the bound's matmul)


def decode_lists(index: faiss.IndexIVF, n: int, dim: int) -> np.ndarray:
    """Every key of an IVF whose codes are the keys (IVF-Flat, or non-residual fp16/bf16 SQ), [n, d] by id."""
    out = np.empty((n, dim), dtype=np.float32)
    lists = index.invlists
    for list_no in range(index.nlist):
        size = lists.list_size(list_no)
        if size == 0:
            continue
        ids = faiss.rev_swig_ptr(lists.get_ids(list_no), size).copy()
        codes = faiss.rev_swig_ptr(lists.get_codes(list_no), size * lists.code_size).copy()
        if isinstance(index, faiss.IndexIVFScalarQuantizer):
            out[ids] = index.sq.decode(codes.reshape(size, lists.code_size))
        else:
            out[ids] = codes.view(np.float32).reshape(size, dim)
    return out


def check_ids(index: faiss.IndexIVF) -> None:
    """``ValueError`` unless the lists of a loaded IVF hold each id of 0..ntotal-1 exactly once."""
    lists = index.invlists
    parts = [
        faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
        for i in range(index.nlist)
        if lists.list_size(i)
    ]
    ids = np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)
    if ids.shape[0] != index.ntotal or not np.array_equal(ids, np.arange(index.ntotal)):
        raise ValueError(
            f"saved index ids are not 0..{index.ntotal - 1}, each once (out of range or repeated)"
        )


def train_centroids(sample: np.ndarray, lists: int, niter: int) -> torch.Tensor:
    """L2 k-means of ``sample`` [s, d] float32 into ``lists`` centroids -> [lists, d] float32 (Faiss)."""
    dim = sample.shape[1]
    params = faiss.ClusteringParameters()
    params.niter = niter
    params.min_points_per_centroid = 1  # the caller chooses the sample size
    clustering = faiss.Clustering(dim, lists, params)
    clustering.train(np.ascontiguousarray(sample, dtype=np.float32), faiss.IndexFlatL2(dim))
    return torch.from_numpy(faiss.vector_to_array(clustering.centroids).reshape(lists, dim).copy())


def split_queries(q: torch.Tensor) -> torch.Tensor:
    """Queries ``q`` [..., d] as ``[relu(q), min(q, 0)]`` [..., 2d]: their product with a list's
    [maxima, minima] is the list's bound (see the module docstring)."""
    return torch.cat([torch.clamp_min(q, 0), torch.clamp_max(q, 0)], dim=-1)


def shrunk_queries(split: torch.Tensor, shrink: float) -> torch.Tensor:
    """Split queries ``split`` [..., 2d] (:func:`split_queries`) whose product with a list's [maxima,
    minima] is the bound of the list's box shrunk about its centre by ``shrink`` (0 < shrink <= 1; 1:
    the box itself, and ``split`` is returned): with a = (1 + shrink) / 2 and b = (1 - shrink) / 2, the
    shrunk box is [a hi + b lo, b hi + a lo], so ``[a q+ + b q-, b q+ + a q-]`` against the stored
    bounds gives its bound in the same one matmul."""
    if shrink == 1.0:
        return split
    d = split.shape[-1] // 2
    pos, neg = split[..., :d], split[..., d:]
    a, b = (1.0 + shrink) / 2.0, (1.0 - shrink) / 2.0
    return torch.cat([a * pos + b * neg, b * pos + a * neg], dim=-1)


def list_dtype(store_dtype: torch.dtype) -> torch.dtype:
    """The dtype the lists hold keys of a ``store_dtype`` memory in: that dtype, or float32."""
    return store_dtype if store_dtype in KINDS else torch.float32


class BoundedIVF:
    """IVF with exact codes and box-bound list ranking (see the module docstring).

    Build with :meth:`build`; then :meth:`add` and :meth:`search` take float32 numpy arrays.
    """

    def __init__(
        self, centroids: torch.Tensor, lists: InvertedLists, bounds: torch.Tensor, counts: torch.Tensor
    ) -> None:
        self.lists = lists  # the keys, stored once, and the scan
        # [L, 2d] float32: per-channel maxima then minima of each list's keys (-EMPTY / +EMPTY while
        # empty, so an empty list's bound is hugely negative and it is ranked last)
        self.bounds = bounds
        self.counts = counts  # [L] int64 keys per list
        self._ntotal = int(counts.sum())
        self.nprobe = 1  # lists every query scans
        self.max_nprobe = 1  # lists a query may scan while its top-k is not certain
        self.rank_shrink = 1.0  # lists are ranked by the bound of their box shrunk by this (1: the box)
        # searched queries, lists and keys they scanned, queries that scanned max_nprobe lists
        self.stats = {"queries": 0, "lists_scanned": 0, "keys_scanned": 0, "capped": 0}
        self._quantizer = Quantizer(centroids, lists.is_native)  # the centroids keys are assigned by

    @property
    def hi(self) -> torch.Tensor:
        """[L, d] per-channel maxima of each list's keys."""
        return self.bounds[:, : self.d]

    @property
    def lo(self) -> torch.Tensor:
        """[L, d] per-channel minima of each list's keys."""
        return self.bounds[:, self.d :]

    @property
    def centroids(self) -> torch.Tensor:
        """[L, d] the k-means centroids keys are assigned by."""
        return self._quantizer.centroids

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, centroids: torch.Tensor, store_dtype: torch.dtype) -> BoundedIVF:
        """An index with the given centroids [L, d] and no keys."""
        lists, dim = centroids.shape
        bounds = torch.cat([torch.full((lists, dim), -EMPTY), torch.full((lists, dim), EMPTY)], dim=1)
        store = InvertedLists(lists, dim, list_dtype(store_dtype))
        return cls(centroids, store, bounds, torch.zeros(lists, dtype=torch.int64))

    @classmethod
    def build(
        cls,
        keys: np.ndarray,
        sample: np.ndarray,
        lists: int,
        store_dtype: torch.dtype,
        niter: int,
        threads: int = 1,
    ) -> BoundedIVF:
        """Train on ``sample`` [s, d] and add ``keys`` [n, d] (float32, ids 0..n-1), assigning them to
        lists on up to ``threads`` threads."""
        new = cls.empty(train_centroids(sample, lists, niter), store_dtype)
        x = torch.from_numpy(keys)
        blocks = range(0, x.shape[0], ASSIGN_BLOCK)
        assign = torch.cat([new.assign(x[b : b + ASSIGN_BLOCK], threads) for b in blocks])
        new.lists.reserve(torch.bincount(assign, minlength=lists))  # exact sizes: no room left unused
        for begin in range(0, x.shape[0], ASSIGN_BLOCK):
            end = begin + ASSIGN_BLOCK
            new._add(x[begin:end], assign[begin:end])
        return new

    # ------------------------------------------------------------------ state
    @property
    def ntotal(self) -> int:
        return self._ntotal

    @property
    def d(self) -> int:
        return self.lists.dim

    @property
    def nlist(self) -> int:
        return self.lists.nlist

    def nbytes(self) -> int:
        """The lists (codes and ids of their whole capacity), the centroids and their norms (padded to
        whole blocks), bounds, counts."""
        return int(self.lists.nbytes() + self._quantizer.nbytes() + self.nlist * (self.d * 4 * 2 + 8))

    def assign(self, x: torch.Tensor, threads: int = 1) -> torch.Tensor:
        """Nearest centroid (L2) of each key ``x`` [n, d] float32 -> [n] int64 (``threads``: see
        :meth:`indexes.quantizer.Quantizer.assign`)."""
        return self._quantizer.assign(x, threads)

    def decode_all(self) -> np.ndarray:
        """Every key, float32 [n, d] in id order (exact: the codes are the keys).

        The codes are widened a block at a time: a float32 copy of all of them beside the result would
        hold another 1 GiB at 8M keys of head_dim 32, at the peak of a rebuild."""
        codes, ids = self.lists.export()
        out = torch.empty(self._ntotal, self.d, dtype=torch.float32)
        for begin in range(0, ids.shape[0], ASSIGN_BLOCK):
            end = begin + ASSIGN_BLOCK
            out[ids[begin:end]] = codes[begin:end].to(torch.float32)
        return out.numpy()

    # ------------------------------------------------------------------ add and search
    def add(self, x: np.ndarray) -> None:
        """Append keys ``x`` [n, d] float32 (ids continue from :attr:`ntotal`)."""
        if x.shape[0] == 0:
            return
        keys = torch.from_numpy(x)
        self._add(keys, self.assign(keys))

    def _add(self, keys: torch.Tensor, lists: torch.Tensor) -> None:
        n = keys.shape[0]
        ids = torch.arange(self._ntotal, self._ntotal + n, dtype=torch.int64)
        codes = keys.to(self.lists.dtype)
        self.lists.add_boxed(codes, lists, ids, keys.contiguous(), self.bounds, self.counts)
        self._ntotal += n

    def compiled_add_entry(self) -> list[int]:
        """This index's row of the compiled add of several indexes at once (:mod:`indexes.batched`):
        [store, centroids, half norms, padded list count, bounds, counts, next id]. Only for compiled
        lists; the caller then calls :meth:`added`."""
        quantizer = self._quantizer.compiled_entry()
        return [self.lists.handle, *quantizer, self.bounds.data_ptr(), self.counts.data_ptr(), self._ntotal]

    def added(self, n: int) -> None:
        """Account for ``n`` keys added through :meth:`compiled_add_entry`."""
        self._ntotal += n

    def compiled_search_entry(self) -> list[int]:
        """This index's row of the compiled search of several indexes at once: [store, bounds, cap,
        nprobe, rank_shrink as the bits of a float64]; the library ranks the lists from the bounds
        itself (:meth:`InvertedLists.search_boxes`). Only for compiled lists; the caller then calls
        :meth:`searched`."""
        first, cap = self._probes()
        shrink_bits = int(np.array(self.rank_shrink, dtype=np.float64).view(np.int64))
        return [self.lists.handle, self.bounds.data_ptr(), cap, first, shrink_bits]

    def _bound_and_rank(self, split: torch.Tensor, stop_test: bool) -> tuple[torch.Tensor | None, ...]:
        """(bound, rank) [m, L] for split queries [m, 2d]: the lists' bounds, and the key that ranks them
        where it is not the bound itself (None); the bound is None where no stop test needs it."""
        if self.rank_shrink == 1.0:
            return split @ self.bounds.T, None
        rank = shrunk_queries(split, self.rank_shrink) @ self.bounds.T
        return (split @ self.bounds.T if stop_test else None), rank

    def _probes(self) -> tuple[int, int]:
        """(lists every query scans, lists a query may scan), both within the list count."""
        first = min(self.nprobe, self.nlist)
        return first, max(first, min(self.max_nprobe, self.nlist))

    def searched(self, queries: int, stats: list[int]) -> None:
        """Count a search of ``queries`` queries: ``stats`` (lists scanned, keys scanned, capped queries)."""
        totals = self.stats
        totals["queries"] += queries
        totals["lists_scanned"] += stats[0]
        totals["keys_scanned"] += stats[1]
        totals["capped"] += stats[2]

    def list_bounds(self, q: torch.Tensor) -> torch.Tensor:
        """The bound of every list for each query ``q`` [m, d]: [m, L] (one matmul)."""
        return split_queries(q) @ self.bounds.T

    def rank_lists(self, q: torch.Tensor, nprobe: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``nprobe`` lists of highest bound for each query ``q`` [m, d]: (bounds, lists) [m, nprobe]."""
        return top_k(self.list_bounds(q), nprobe)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product, scanning lists in the order of their bounds (scores, ids) [m, k].

        Every query scans its :attr:`nprobe` lists of highest bound. A query whose k-th score so far is
        below the bound of its next list is done: no key left can beat it, so its top-k is exact. The
        others go on to their next list, up to :attr:`max_nprobe` lists.
        """
        first, cap = self._probes()
        if self.lists.is_native:  # bounds and ranks computed in the same compiled call
            scores, ids, stats = self.lists.search_boxes(q, k, self.bounds, self.rank_shrink, cap, first)
        else:
            bound, rank = self._bound_and_rank(split_queries(torch.from_numpy(q)), cap > first)
            scores, ids, stats = self.lists.search(q, k, bound, cap, first, rank)
        self.searched(q.shape[0], list(stats))
        return scores, ids

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict:
        """The centroids, every key's codes and id (list by list), the bounds and the list counts."""
        codes, ids = self.lists.export()
        return {
            "centroids": self.centroids.clone(memory_format=torch.contiguous_format),
            "codes": codes,
            "ids": ids,
            "bounds": self.bounds.clone(),
            "counts": self.counts.clone(),
        }

    @classmethod
    def from_state(cls, state: dict, dim: int | None = None) -> BoundedIVF:
        """Rebuild from :meth:`state` (or the Faiss-based state of earlier versions); ``ValueError`` for
        parts of the wrong type, shape or dtype, non-finite values, counts that do not match the
        codes, or ids that are not 0..n-1 each once, rising along each list."""
        if "faiss" in state:
            state = _from_faiss_state(state)
        centroids, codes, ids = state.get("centroids"), state.get("codes"), state.get("ids")
        if (
            not isinstance(centroids, torch.Tensor)
            or centroids.dim() != 2
            or centroids.dtype != torch.float32
        ):
            raise ValueError("saved 'auto' centroids must be a float32 [lists, d] tensor")
        lists, d = centroids.shape
        if dim is not None and d != dim:
            raise ValueError(f"saved 'auto' index has dim {d}, expected {dim}")
        if not bool(torch.isfinite(centroids).all()):
            raise ValueError("saved 'auto' centroids contain NaN or inf")
        if (
            not isinstance(codes, torch.Tensor)
            or codes.dim() != 2
            or codes.shape[1] != d
            or codes.dtype not in KINDS
        ):
            raise ValueError(f"saved 'auto' codes must be a [n, {d}] tensor of one of {list(KINDS)}")
        n = codes.shape[0]
        if not bool(torch.isfinite(codes).all()):
            raise ValueError("saved 'auto' codes contain NaN or inf")
        if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != (n,) or ids.dtype != torch.int64:
            raise ValueError(f"saved 'auto' ids must be an int64 [{n}] tensor")
        bounds, counts = state.get("bounds"), state.get("counts")
        if (
            not isinstance(bounds, torch.Tensor)
            or tuple(bounds.shape) != (lists, 2 * d)
            or bounds.dtype != torch.float32
        ):
            raise ValueError(f"saved list bounds must be float32 [{lists}, {2 * d}]")
        if not bool(torch.isfinite(bounds).all()):
            raise ValueError("saved list bounds contain NaN or inf")
        if (
            not isinstance(counts, torch.Tensor)
            or tuple(counts.shape) != (lists,)
            or counts.dtype != torch.int64
        ):
            raise ValueError(f"saved list counts must be int64 [{lists}]")
        if bool((counts < 0).any()) or int(counts.sum()) != n:
            raise ValueError(
                f"saved list counts do not match the codes ({int(counts.sum())} counted, {n} codes)"
            )
        if n and not torch.equal(torch.sort(ids).values, torch.arange(n)):
            raise ValueError(f"saved index ids are not 0..{n - 1}, each once (out of range or repeated)")
        owner = torch.repeat_interleave(torch.arange(lists), counts)
        if n > 1 and bool(((ids[1:] <= ids[:-1]) & (owner[1:] == owner[:-1])).any()):
            raise ValueError("saved index ids do not rise along each list")
        new = cls.empty(centroids.clone(), codes.dtype)
        new.lists.reserve(counts)
        new.lists.add(codes, owner, ids)
        new.bounds = bounds.clone(memory_format=torch.contiguous_format)
        new.counts, new._ntotal = counts.clone(memory_format=torch.contiguous_format), n
        return new

    def clone(self) -> BoundedIVF:
        """An independent copy (the lists are copied through :meth:`state`), with the same knobs."""
        new = BoundedIVF.from_state(self.state())
        new.nprobe, new.max_nprobe, new.stats = self.nprobe, self.max_nprobe, dict(self.stats)
        new.rank_shrink = self.rank_shrink
        return new

    def __deepcopy__(self, memo: dict) -> BoundedIVF:
        return self.clone()

    def __reduce__(self) -> tuple:
        return _restore, (self.state(), self.nprobe, self.max_nprobe, self.rank_shrink)

    def truncate(self, n: int) -> None:
        """Remove the keys of id >= ``n`` (the caller checks 0 <= n <= :attr:`ntotal`).

        The lists hold their keys in id order, so the keys kept stay where they are. :attr:`counts`
        follow the lists; :attr:`bounds` are left as they are: a box that held the removed keys still
        holds the kept ones, so it remains an upper bound of ``q · k`` over its list (at worst a looser
        one: a list may be scanned, never missed, and a search that ends certain is still exact).
        """
        if n < self._ntotal:
            self.lists.truncate(n)
            self._ntotal = n
        self.counts = self.lists.sizes()


def _restore(state: dict, nprobe: int, max_nprobe: int, rank_shrink: float = 1.0) -> BoundedIVF:
    """Unpickle a :class:`BoundedIVF` (its lists live in C memory, so it pickles through its state)."""
    index = BoundedIVF.from_state(state)
    index.nprobe, index.max_nprobe, index.rank_shrink = nprobe, max_nprobe, rank_shrink
    return index


def _from_faiss_state(state: dict) -> dict:
    """The parts of an ``"auto"`` index saved by earlier versions (a Faiss IVF with fp16 / bf16 / float32
    codes, not residuals, serialised as bytes, beside bounds and counts) in today's form."""
    data = state["faiss"]
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
        raise ValueError("saved 'auto' index bytes must be a uint8 tensor")
    try:
        index = faiss.deserialize_index(np.ascontiguousarray(data.numpy()))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1]
        raise ValueError(f"saved 'auto' index cannot be read ({reason})") from None
    if not isinstance(index, (faiss.IndexIVFScalarQuantizer, faiss.IndexIVFFlat)):
        raise ValueError(f"saved 'auto' index is a {type(index).__name__}, expected an IVF with exact codes")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"saved 'auto' index has metric {index.metric_type}, expected inner product")
    dtype = torch.float32
    if isinstance(index, faiss.IndexIVFScalarQuantizer):
        kinds = {faiss.ScalarQuantizer.QT_fp16: torch.float16, faiss.ScalarQuantizer.QT_bf16: torch.bfloat16}
        if index.by_residual or index.sq.qtype not in kinds:
            raise ValueError("saved 'auto' index has lossy codes, expected exact fp16 / bf16 / float32 codes")
        dtype = kinds[index.sq.qtype]
    check_ids(index)
    dim, lists = int(index.d), int(index.nlist)
    keys = torch.from_numpy(decode_lists(index, int(index.ntotal), dim))
    sizes = [index.invlists.list_size(i) for i in range(lists)]
    ids = [
        torch.from_numpy(faiss.rev_swig_ptr(index.invlists.get_ids(i), size).copy())
        for i, size in enumerate(sizes)
        if size
    ]
    ids = torch.cat(ids) if ids else torch.empty(0, dtype=torch.int64)
    xb = faiss.rev_swig_ptr(faiss.downcast_index(index.quantizer).get_xb(), lists * dim)
    counts = state.get("counts")
    if isinstance(counts, torch.Tensor) and counts.shape == (lists,) and counts.tolist() != sizes:
        raise ValueError("saved list counts do not match the lists of the saved index")
    return {
        "centroids": torch.from_numpy(xb.reshape(lists, dim).copy()),
        "codes": keys[ids].to(dtype),
        "ids": ids,
        "bounds": state.get("bounds"),
        "counts": counts,
    }
