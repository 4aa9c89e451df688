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

The bound also says when to stop: once a query's k-th best score so far exceeds the bound of the next
list in its order, no unscanned key can enter its top-k, and its result is exact. :meth:`search` scans
``nprobe`` lists for every query, then doubles the lists of the queries not yet certain, up to
``max_nprobe``.

The lists hold the keys themselves (Faiss scalar-quantizer codes in bf16 / fp16 for a memory of that
dtype, raw float32 otherwise; not residuals), so scores are exact inner products and the keys decode
back exactly for a rebuild. Keys are assigned to lists by an L2 k-means quantizer (boxes of L2 clusters
are tight). Everything is validated by the caller (:class:`indexes.streaming.StreamingIndex`).
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from indexes.select import top_k

_SQ_TYPES = {torch.bfloat16: "QT_bf16", torch.float16: "QT_fp16"}
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


class BoundedIVF:
    """IVF with exact codes and box-bound list ranking (see the module docstring).

    Build with :meth:`build`; then :meth:`add` and :meth:`search` take float32 numpy arrays.
    """

    def __init__(self, index: faiss.IndexIVF, bounds: torch.Tensor, counts: torch.Tensor) -> None:
        self.index = index  # the IVF: quantizer, lists, codes
        # [L, 2d] float32: per-channel maxima then minima of each list's keys (-EMPTY / +EMPTY while
        # empty, so an empty list's bound is hugely negative and it is ranked last)
        self.bounds = bounds
        self.counts = counts  # [L] int64 keys per list
        self.nprobe = 1  # lists every query scans
        self.max_nprobe = 1  # lists a query may scan while its top-k is not certain
        # searched queries, lists and keys they scanned, queries that reached max_nprobe
        self.stats = {"queries": 0, "lists_scanned": 0, "keys_scanned": 0, "capped": 0}
        xb = faiss.rev_swig_ptr(faiss.downcast_index(index.quantizer).get_xb(), index.nlist * index.d)
        self._centroids = torch.from_numpy(xb.reshape(index.nlist, index.d).copy())  # [L, d]
        self._half_norms = 0.5 * (self._centroids * self._centroids).sum(dim=1)  # [L]

    @property
    def hi(self) -> torch.Tensor:
        """[L, d] per-channel maxima of each list's keys."""
        return self.bounds[:, : self.d]

    @property
    def lo(self) -> torch.Tensor:
        """[L, d] per-channel minima of each list's keys."""
        return self.bounds[:, self.d :]

    # ------------------------------------------------------------------ construction
    @staticmethod
    def new_index(dim: int, lists: int, store_dtype: torch.dtype, niter: int) -> faiss.IndexIVF:
        """An untrained IVF with ``lists`` lists holding keys of ``store_dtype`` exactly."""
        quantizer = faiss.IndexFlatL2(dim)
        if store_dtype in _SQ_TYPES:
            qtype = getattr(faiss.ScalarQuantizer, _SQ_TYPES[store_dtype])
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, lists, qtype, faiss.METRIC_INNER_PRODUCT, False
            )
        else:
            index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = niter
        index.cp.min_points_per_centroid = 1  # the caller chooses the sample size
        return index

    @classmethod
    def build(
        cls, keys: np.ndarray, sample: np.ndarray, lists: int, store_dtype: torch.dtype, niter: int
    ) -> BoundedIVF:
        """Train on ``sample`` [s, d] and add ``keys`` [n, d] (float32, ids 0..n-1)."""
        dim = keys.shape[1]
        index = cls.new_index(dim, lists, store_dtype, niter)
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        bounds = torch.cat([torch.full((lists, dim), -EMPTY), torch.full((lists, dim), EMPTY)], dim=1)
        new = cls(index, bounds, torch.zeros(lists, dtype=torch.int64))
        for begin in range(0, keys.shape[0], ASSIGN_BLOCK):
            new.add(np.ascontiguousarray(keys[begin : begin + ASSIGN_BLOCK], dtype=np.float32))
        return new

    # ------------------------------------------------------------------ state
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def d(self) -> int:
        return int(self.index.d)

    @property
    def nlist(self) -> int:
        return int(self.index.nlist)

    def nbytes(self) -> int:
        """Codes and ids of every key, the centroids, and the bounds."""
        per_key = self.index.code_size + 8
        return int(self.ntotal * per_key + self.nlist * self.d * 4 * 3 + self.nlist * 8)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest centroid (L2) of each key ``x`` [n, d] -> [n] int64."""
        return torch.addmm(self._half_norms, x, self._centroids.T, alpha=-1.0).argmin(dim=1)

    def decode_all(self) -> np.ndarray:
        """Every key, float32 [n, d] in id order (exact: the codes are the keys)."""
        return decode_lists(self.index, self.ntotal, self.d)

    # ------------------------------------------------------------------ add and search
    def add(self, x: np.ndarray) -> None:
        """Append keys ``x`` [n, d] float32 (ids continue from :attr:`ntotal`)."""
        n = x.shape[0]
        if n == 0:
            return
        keys = torch.from_numpy(x)
        lists = self.assign(keys)
        assign = lists.numpy()
        self.index.add_core(n, faiss.swig_ptr(x), None, faiss.swig_ptr(assign))
        index = lists[:, None].expand(-1, self.d)
        self.bounds[:, : self.d].scatter_reduce_(0, index, keys, reduce="amax")
        self.bounds[:, self.d :].scatter_reduce_(0, index, keys, reduce="amin")
        self.counts.index_add_(0, lists, torch.ones_like(lists))

    def rank_lists(self, q: torch.Tensor, nprobe: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``nprobe`` lists of highest bound for each query ``q`` [m, d]: (bounds, lists) [m, nprobe]."""
        bound = torch.cat([torch.clamp_min(q, 0), torch.clamp_max(q, 0)], dim=1) @ self.bounds.T  # [m, L]
        return top_k(bound, nprobe)

    def _scan(
        self, q: np.ndarray, k: int, lists: torch.Tensor, bounds: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray]:
        """Faiss's scan of the given ``lists`` [m, p] for each query ``q`` [m, d] -> (scores, ids) [m, k]."""
        m, p = lists.shape
        q = np.ascontiguousarray(q, dtype=np.float32)
        assign = np.ascontiguousarray(lists.numpy(), dtype=np.int64)
        coarse = np.ascontiguousarray(bounds.numpy(), dtype=np.float32)
        scores = np.empty((m, k), dtype=np.float32)
        ids = np.empty((m, k), dtype=np.int64)
        params = faiss.SearchParametersIVF()
        params.nprobe = p  # per call (thread-safe), not the index's own field
        self.index.search_preassigned_c(
            m,
            faiss.swig_ptr(q),
            k,
            faiss.swig_ptr(assign),
            faiss.swig_ptr(coarse),
            faiss.swig_ptr(scores),
            faiss.swig_ptr(ids),
            False,
            params,
        )
        return scores, ids

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product, scanning lists in the order of their bounds (scores, ids) [m, k].

        Every query scans its :attr:`nprobe` lists of highest bound. A query whose k-th score so far is
        below the bound of the next list is done: no key left can beat it, so its top-k is exact. The
        others scan twice as many lists, up to :attr:`max_nprobe`, and are checked again.
        """
        first = min(self.nprobe, self.nlist)
        cap = max(first, min(self.max_nprobe, self.nlist))
        qt = torch.from_numpy(q)
        bounds, lists = self.rank_lists(qt, cap)
        scores, ids = self._scan(q, k, lists[:, :first], bounds[:, :first])
        stats = self.stats
        stats["queries"] += q.shape[0]
        stats["lists_scanned"] += q.shape[0] * first
        stats["keys_scanned"] += int(self.counts[lists[:, :first]].sum())
        done = first
        while done < cap:
            kth = torch.from_numpy(scores[:, k - 1])
            kth = torch.where(torch.from_numpy(ids[:, k - 1]) < 0, -torch.inf, kth)
            open_ = (bounds[:, done] >= kth).nonzero().squeeze(1)  # a key there could still enter the top-k
            if open_.numel() == 0:
                break
            upto = min(cap, 2 * done)
            stats["lists_scanned"] += open_.numel() * (upto - done)
            stats["capped"] += open_.numel() if upto == cap else 0  # queries that reached max_nprobe
            stats["keys_scanned"] += int(self.counts[lists[open_, done:upto]].sum())
            rows = open_.numpy()
            more_s, more_i = self._scan(q[rows], k, lists[open_, done:upto], bounds[open_, done:upto])
            both_s = np.concatenate([scores[rows], more_s], axis=1)
            both_i = np.concatenate([ids[rows], more_i], axis=1)
            best = np.argsort(-both_s, axis=1, kind="stable")[:, :k]
            scores[rows] = np.take_along_axis(both_s, best, axis=1)
            ids[rows] = np.take_along_axis(both_i, best, axis=1)
            done = upto
        return scores, ids

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict:
        return {
            "faiss": torch.from_numpy(faiss.serialize_index(self.index).copy()),
            "bounds": self.bounds.clone(),
            "counts": self.counts.clone(),
        }

    @classmethod
    def from_state(cls, state: dict, dim: int | None = None) -> BoundedIVF:
        """Rebuild from :meth:`state`; ``ValueError`` for bytes Faiss cannot read, another index type,
        metric or dim, lossy codes, inconsistent bounds or counts, or ids that are not 0..ntotal-1."""
        try:
            index = faiss.deserialize_index(np.ascontiguousarray(state["faiss"].numpy(), dtype=np.uint8))
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[-1]
            raise ValueError(f"saved 'auto' index cannot be read ({reason})") from None
        if not isinstance(index, (faiss.IndexIVFScalarQuantizer, faiss.IndexIVFFlat)):
            raise ValueError(
                f"saved 'auto' index is a {type(index).__name__}, expected an IVF with exact codes"
            )
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"saved 'auto' index has metric {index.metric_type}, expected inner product")
        if isinstance(index, faiss.IndexIVFScalarQuantizer) and (
            index.by_residual
            or index.sq.qtype not in (faiss.ScalarQuantizer.QT_fp16, faiss.ScalarQuantizer.QT_bf16)
        ):
            raise ValueError("saved 'auto' index has lossy codes, expected exact fp16 / bf16 / float32 codes")
        if dim is not None and index.d != dim:
            raise ValueError(f"saved 'auto' index has dim {index.d}, expected {dim}")
        bounds, counts = state["bounds"], state["counts"]
        want = (int(index.nlist), 2 * int(index.d))
        if (
            not isinstance(bounds, torch.Tensor)
            or tuple(bounds.shape) != want
            or bounds.dtype != torch.float32
        ):
            raise ValueError(f"saved list bounds must be float32 {list(want)}")
        if not bool(torch.isfinite(bounds).all()):
            raise ValueError("saved list bounds contain NaN or inf")
        if (
            not isinstance(counts, torch.Tensor)
            or tuple(counts.shape) != want[:1]
            or counts.dtype != torch.int64
        ):
            raise ValueError(f"saved list counts must be int64 [{want[0]}]")
        sizes = torch.tensor([index.invlists.list_size(i) for i in range(index.nlist)], dtype=torch.int64)
        if not torch.equal(sizes, counts):
            raise ValueError("saved list counts do not match the lists of the saved index")
        check_ids(index)
        return cls(index, bounds.clone(), counts.clone())

    def clone(self) -> BoundedIVF:
        return BoundedIVF.from_state(self.state())

    def truncate(self, n: int) -> None:
        """Remove the keys of id >= ``n`` (the caller checks 0 <= n <= :attr:`ntotal`).

        The lists hold their keys in id order, so the keys kept stay where they are. :attr:`counts`
        follow the lists; :attr:`bounds` are left as they are: a box that held the removed keys still
        holds the kept ones, so it remains an upper bound of ``q · k`` over its list (at worst a looser
        one: a list may be scanned, never missed, and a search that ends certain is still exact).
        """
        if n < self.ntotal:
            self.index.remove_ids(faiss.IDSelectorRange(n, self.ntotal))
        lists = self.index.invlists
        self.counts = torch.tensor([lists.list_size(i) for i in range(self.nlist)], dtype=torch.int64)
