"""One growing set of keys searched by inner product: exact, or through a Faiss index trained as it grows.

``StreamingIndex`` is the unit the memory backends hold per (batch row, head). Keys arrive a window
at a time and are never removed one by one.

**Where a key lives: in one place.**

* Before an index exists (``"Flat"`` always; any other spec until it has enough keys to train), keys
  live in a chunked store in ``store_dtype`` (the memory's dtype, e.g. bfloat16), searched exactly:
  each chunk is widened to float32 a block at a time, scored by one matmul and selected by
  :func:`indexes.select.top_k` (at most :data:`SELECT_SCORES` scores at a time). From
  :data:`EXACT_KERNEL_KEYS` keys on, where the compiled library runs with AVX-512, the chunks are
  searched in their own dtype by :func:`indexes.native.exact_top_k` instead, which keeps only the
  scores that can enter the top-k.
* Once an index exists, keys live in the index's own codes when those codes give the key back exactly
  (raw float32 codes: ``IVF...,Flat``, ``HNSW...``; the ``"auto"`` index's bf16 / fp16 codes), and
  retraining reads them back from there. Indexes with lossy codes (PQ, SQ8, residual scalar
  quantizers...) keep the store beside their codes: their codes rank the candidates, the store is what
  retraining reads.

**When an index is (re)built**, for a Faiss ``index_factory`` spec:

1. Until ``min_train_points`` keys are stored (39 per centroid by default), search is exact: an index
   trained on too few keys has poor recall and Faiss warns about it.
2. Then a fresh index is trained on a random sample of the keys so far and all keys are added to it.
3. Whenever the memory has grown ``retrain_factor`` times since the last training (4x by default),
   the index is rebuilt from a new sample: keys drift over a long document, and an index trained on
   the first part loses recall on the rest (measured 0.95 -> 0.73 at nprobe 32).

For ``spec="auto"`` the schedule and the list count come from :class:`indexes.growth.GrowthPolicy`
instead: exact while small, then an IVF whose list count grows like sqrt(N).
"""

from __future__ import annotations

import logging
import math
import threading
from typing import NamedTuple

import faiss
import numpy as np
import torch

from indexes import native
from indexes.bounded_ivf import BoundedIVF, check_ids, decode_lists
from indexes.chunked import ChunkedTensor
from indexes.gpu import check_gpu_limits, index_to_gpu, parse_device
from indexes.growth import AUTO, GrowthPolicy
from indexes.protocol import register_index
from indexes.select import top_k
from indexes.spec import (
    IndexSpec,
    apply_search_params,
    build_index,
    check_search_params,
    parse_spec,
)
from indexes.threads import call_threads
from indexes.validate import (
    INT64_MAX,
    MAX_DIM,
    MAX_K,
    check_finite,
    check_float,
    check_int,
    check_optional_int,
)

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1 << 20  # keys per store chunk at most (chunks double up to this)
FIRST_KEY_CHUNK = 8192  # keys in the first store chunk (then doubling)
EXACT_BLOCK = 32768  # keys widened to float32 at once by the exact search of a narrower store
# The exact search scores a block of keys against a block of queries with one matmul and selects with
# indexes.select.top_k, keeping each score matrix to at most SELECT_SCORES entries (8 MiB) by cutting
# the queries; on the CPU the matrix is written into one buffer per thread, reused: a fresh one of that
# size is mapped and zeroed by the kernel at every call (the GEMM of 128 x 100 by 100 x 32768 ran at
# 171 GFLOP/s into a new matrix, 275 into a reused one). One core, head_dim 32, k 32: 2.6-4.1x faster
# than faiss.knn on its BLAS path for 64 queries and 4096-65536 keys, 1.2-4.7x for 256-2048 queries
# (faiss.knn won beyond 4096 keys before the selection's run maxima; see
# benchmarks/results/compiled_kernels/README.md).
SELECT_SCORES = 1 << 21
# From this many keys the exact search scores in the compiled kernel (no score matrix; the queries split
# over the threads): one core, 64 queries, head_dim 32, bf16, k 32: 1.05 -> 1.05 ms at 16k keys,
# 4.8 -> 3.3 ms at 64k, 35 -> 16 ms at 256k, 89 -> 60 ms at 1M; 2048 queries over 128k float32 keys of
# head_dim 100, k 128: 0.57 -> 0.44 s. Below it the matmul and the selection are faster (0.08 against
# 0.16 ms at 1k keys: the kernel's reservoirs cost ~1.5 us per query).
EXACT_KERNEL_KEYS = 16384
_scores = threading.local()


def score_buffer(need: int) -> torch.Tensor:
    """This thread's reused CPU float32 buffer of at least ``need`` entries ([need]; valid until the
    thread's next call)."""
    buf = getattr(_scores, "buf", None)
    if buf is None or buf.numel() < need:
        buf = torch.empty(max(need, SELECT_SCORES), dtype=torch.float32)
        _scores.buf = buf
    return buf[:need]


def pad_to_k(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k results [..., <= k] padded to [..., k] with empty slots (``-inf`` scores, ``-1`` ids)."""
    if scores.shape[-1] < k:
        pad = k - scores.shape[-1]
        scores = torch.nn.functional.pad(scores, (0, pad), value=-math.inf)
        ids = torch.nn.functional.pad(ids, (0, pad), value=-1)
    return scores, ids


def _score_matrix(q: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``q @ block.T`` [m, n] float32; on the CPU into this thread's reused buffer (valid until the
    thread's next call)."""
    if q.device.type != "cpu":
        return q @ block.T
    out = score_buffer(q.shape[0] * block.shape[0]).view(q.shape[0], block.shape[0])
    return torch.matmul(q, block.T, out=out)


# faiss.knn takes its BLAS path (blocked sgemm, then a heap) only for at least this many queries, else a
# per-query SIMD loop. The faiss-cpu 1.15 wheel ships 128000, so every search here took the loop, which
# is 3-4x slower at head_dim 32 (64 x 8192: 3.4 ms against 1.2 ms; 2048 x 32768: 390 ms against 90 ms)
# and 1.1x at head_dim 100. Faiss's own default is 20. A process-wide Faiss setting, set on import.
BLAS_THRESHOLD = 20
faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
ADD_BLOCK = 65536  # keys handed to Faiss per call while (re)building an index
_STORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Specs that Faiss GPU can hold (besides "Flat", which runs as torch matmul + top-k on CUDA).
_GPU_FAMILIES = ("IVF",)


def _as_keys(x: object, dim: int, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [n, {dim}], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape [n, {dim}], got {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    check_finite(x, name)
    return x.detach().to(torch.float32).contiguous()


def _signature(index: faiss.Index) -> tuple:
    """Type, dims and code layout of an index and the indexes inside it (what a factory string fixes)."""
    owner, index = index, faiss.downcast_index(index)  # (``owner`` keeps the C++ object alive)
    # a flat index reads back as IndexFlatIP / IndexFlatL2 (the metric is compared on its own)
    kind = "IndexFlat" if isinstance(index, faiss.IndexFlat) else type(index).__name__
    sig: tuple = (kind, int(index.d), int(index.metric_type), getattr(index, "code_size", None))
    if isinstance(index, faiss.IndexPreTransform):
        chain = [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())]
        # an OPQ matrix reads back as a plain LinearTransform
        kinds = [
            "LinearTransform" if isinstance(t, faiss.LinearTransform) else type(t).__name__ for t in chain
        ]
        return (
            *sig,
            tuple((k, t.d_in, t.d_out) for k, t in zip(kinds, chain, strict=True)),
            _signature(index.index),
        )
    if isinstance(index, faiss.IndexIVF):
        return (*sig, int(index.nlist), _signature(index.quantizer))
    if getattr(index, "hnsw", None) is not None:
        return (*sig, int(index.hnsw.nb_neighbors(0)), _signature(index.storage))
    del owner
    return sig


def _check_loaded_index(index: faiss.Index, spec: IndexSpec) -> None:
    """``ValueError`` unless a deserialised index is what ``spec`` builds (type, metric, dims), with
    ids in range (IVF lists) and an HNSW graph that only links stored nodes; before any search."""
    fresh = build_index(spec)
    if _signature(index) != _signature(fresh):
        raise ValueError(
            f"saved index is a {type(faiss.downcast_index(index)).__name__} (metric {index.metric_type}, "
            f"dim {index.d}) that does not match its spec {spec.spec!r} (inner product, dim {spec.dim})"
        )
    ivf = _ivf_of(index)
    if ivf is not None:
        check_ids(ivf)
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        n = (
            int(faiss.downcast_index(index).ntotal)
            if not isinstance(index, faiss.IndexPreTransform)
            else int(index.ntotal)
        )
        links = faiss.vector_to_array(hnsw.neighbors)
        levels = faiss.vector_to_array(hnsw.levels)
        offsets = faiss.vector_to_array(hnsw.offsets)
        if (
            levels.shape[0] != n
            or offsets.shape[0] != n + 1
            or (n and (offsets[0] != 0 or offsets[-1] != links.shape[0] or np.any(np.diff(offsets) < 0)))
            or (links.size and (links.min() < -1 or links.max() >= n))
            or not -1 <= hnsw.entry_point < max(n, 1)
            or (levels.size and (levels.min() < 1 or levels.max() > hnsw.max_level + 1))
        ):
            raise ValueError("saved HNSW graph links nodes that do not exist (corrupt or edited)")


def check_k(k: object, name: str = "k") -> int:
    """``k`` as an int in [1, ``MAX_K``], or ``ValueError``/``TypeError`` naming it (as ``name``)."""
    return check_int(k, name, 1, MAX_K)


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.cpu().numpy() if x.device.type != "cpu" else x.numpy()


def _hnsw_of(index: faiss.Index) -> faiss.HNSW | None:
    """The HNSW graph of an (optionally pre-transformed) HNSW index, else None."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return getattr(index, "hnsw", None)


def _ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def _codes_are_keys(index: faiss.Index) -> bool:
    """True when ``index`` stores every key so that it decodes back exactly (no second copy needed)."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIVFFlat, faiss.IndexFlat)):
        return True
    if isinstance(index, faiss.IndexHNSWFlat):
        return True
    if isinstance(index, faiss.IndexIVFScalarQuantizer) and not index.by_residual:
        return index.sq.qtype in (faiss.ScalarQuantizer.QT_fp16, faiss.ScalarQuantizer.QT_bf16)
    return False


def _decode_all(index: faiss.Index | BoundedIVF, n: int, dim: int) -> np.ndarray:
    """Every key of an index whose codes are the keys, as float32 [n, d] in id order."""
    if isinstance(index, BoundedIVF):
        return index.decode_all()
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexIVF):
        return decode_lists(base, n, dim)
    return index.reconstruct_n(0, n)


@register_index("streaming")
class StreamingIndex:
    """Keys of one (row, head) memory, searchable by inner product.

    Args:
        dim: key dimension ``d``.
        spec: Faiss ``index_factory`` string (inner product), ``"Flat"`` (exact), or ``"auto"``
            (:mod:`indexes.growth`).
        device: ``"cpu"`` or ``"cuda[:N]"``.
        nprobe / efSearch: search-time knobs, where the index has them (``"auto"``: overrides the
            policy's ``nprobe``).
        min_train_points: keys before the first training (default: 39 per centroid).
        retrain_factor: retrain (indexes that need training) when the memory grows by this factor
            since the last training; ``None`` never retrains.
        train_sample: keys sampled for training (default: up to 256 per centroid, at least
            ``min_train_points``).
        chunk_size: keys per store chunk at most.
        seed: RNG seed of the training samples.
        store_dtype: dtype of the key store (keys are expected to be exact in it already; the memory
            backends round them to ``mem_dtype`` first).
        policy: the ``"auto"`` policy (default :class:`GrowthPolicy`'s defaults); only with ``"auto"``.
    """

    def __init__(
        self,
        dim: int,
        spec: str | IndexSpec = "Flat",
        *,
        device: str | torch.device = "cpu",
        nprobe: int | None = None,
        efSearch: int | None = None,
        min_train_points: int | None = None,
        retrain_factor: float | None = 4.0,
        train_sample: int | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        seed: int = 0,
        store_dtype: torch.dtype = torch.float32,
        policy: GrowthPolicy | None = None,
    ) -> None:
        dim = check_int(dim, "dim", 1, MAX_DIM)
        if spec == AUTO or (isinstance(spec, IndexSpec) and spec.spec == AUTO):
            policy = policy or GrowthPolicy()
            if not isinstance(policy, GrowthPolicy):
                raise TypeError(f"policy must be a GrowthPolicy, got {type(policy).__name__}")
            self.spec = IndexSpec(
                spec=AUTO,
                dim=dim,
                is_flat=False,
                needs_training=True,
                nlist=0,
                min_train_points=policy.exact_until,
                search_params=("nprobe",),
            )
        else:
            if policy is not None:
                raise ValueError(f"policy applies to index='auto' only, not {getattr(spec, 'spec', spec)!r}")
            self.spec = spec if isinstance(spec, IndexSpec) else parse_spec(spec, dim)
        if self.spec.dim != dim:
            raise ValueError(f"spec was parsed for dim={self.spec.dim}, but dim={dim}")
        self.policy = policy
        self.dim = dim
        self.device = parse_device(device)
        if self.device.type == "cuda" and not self.spec.is_flat and self.policy is None:
            if not self.spec.spec.startswith(_GPU_FAMILIES):
                raise ValueError(
                    f"index {self.spec.spec!r} has no Faiss GPU implementation; on CUDA use 'Flat', 'auto' "
                    f"or an IVF index"
                )
        self.search_params = check_search_params(self.spec, {"nprobe": nprobe, "efSearch": efSearch})
        check_optional_int(min_train_points, "min_train_points", 0, INT64_MAX)
        if retrain_factor is not None:
            check_float(retrain_factor, "retrain_factor", 1.0, 1e9, low_open=True)
        check_optional_int(train_sample, "train_sample", 1, INT64_MAX)
        check_int(chunk_size, "chunk_size", 1, 2**31)
        check_int(seed, "seed", 0, INT64_MAX)
        if store_dtype not in _STORE_DTYPES:
            raise ValueError(f"store_dtype must be one of {list(_STORE_DTYPES)}, got {store_dtype!r}")
        self.min_train_points = max(min_train_points or 0, self.spec.min_train_points)
        self.retrain_factor = retrain_factor
        self.train_sample = train_sample
        self.chunk_size = chunk_size
        self.seed = seed
        self.store_dtype = store_dtype
        self._store: ChunkedTensor | None = self._new_store()
        self._ntotal = 0
        self._index: faiss.Index | None = None
        self.trained_at = 0  # keys stored at the last training (0: never trained)
        self.trainings = 0

    def _new_store(self) -> ChunkedTensor:
        return ChunkedTensor((), self.dim, self.store_dtype, self.device, self.chunk_size, FIRST_KEY_CHUNK)

    # ------------------------------------------------------------------ state
    @property
    def ntotal(self) -> int:
        """Number of keys stored."""
        return self._ntotal

    def __len__(self) -> int:
        return self._ntotal

    @property
    def uses_index(self) -> bool:
        """True once searches go through a Faiss index rather than the exact scan."""
        return self._index is not None

    @property
    def has_store(self) -> bool:
        """True while the keys are held in the ``store_dtype`` store (exact phase, or lossy index codes)."""
        return self._store is not None

    @property
    def nlist(self) -> int:
        """Lists of the current IVF index (0 without one)."""
        if isinstance(self._index, BoundedIVF):
            return self._index.nlist
        ivf = None if self._index is None else _ivf_of(self._index)
        return 0 if ivf is None else int(ivf.nlist)

    @property
    def nbytes(self) -> int:
        """Bytes held: the key store (when there is one) plus the Faiss index's codes, ids and structure."""
        store = 0 if self._store is None else self._store.nbytes
        return store + self._index_nbytes()

    def _index_nbytes(self) -> int:
        index = self._index
        if index is None:
            return 0
        if isinstance(index, BoundedIVF):
            return index.nbytes()
        n = index.ntotal
        ivf = _ivf_of(index)
        if ivf is not None:
            return int(n * (ivf.code_size + 8) + ivf.nlist * self.dim * 4)
        hnsw = getattr(index, "hnsw", None)
        if hnsw is not None:
            storage = faiss.downcast_index(index.storage)
            links = hnsw.neighbors.size() * 4 + hnsw.levels.size() * 4 + hnsw.offsets.size() * 8
            return int(n * storage.code_size + links)
        code_size = getattr(faiss.downcast_index(index), "code_size", self.dim * 4)
        return int(n * code_size)

    def set_search_params(self, **params: int | None) -> None:
        """Change search knobs (``nprobe=``, ``efSearch=``) without rebuilding or retraining.

        ``None`` leaves a knob as it is. Raises ``ValueError`` (before changing anything) for a knob this
        index has no use for or a value that is not a positive int.
        """
        new = {**self.search_params, **check_search_params(self.spec, params)}
        self.search_params = new
        if self._index is not None:
            self._apply_params(self._index)

    def reset(self) -> None:
        """Drop every key and the index (its training too)."""
        self._store = self._new_store()
        self._ntotal = 0
        self._index = None
        self.trained_at = 0

    # ------------------------------------------------------------------ adding
    def add(self, x: torch.Tensor) -> None:
        """Append keys ``x`` [n, d] (any float dtype; stored in ``store_dtype``)."""
        self.add_checked(_as_keys(x, self.dim, "keys").to(self.device))

    def add_checked(self, x: torch.Tensor) -> None:
        """:meth:`add` for keys already validated: float32 [n, d], finite, contiguous, on the device."""
        n = x.shape[0]
        if n == 0:
            return
        before = self._ntotal
        if self._store is not None:
            self._store.append(x)
        self._ntotal += n
        if self._index is not None:
            self._index_add(self._index, x, before)
            if self._rebuild_due():
                self._build()
        elif not self.spec.is_flat and self._ntotal >= max(self._first_build_at(), 1):
            self._build()

    def compiled_ivf(self) -> BoundedIVF | None:
        """The ``"auto"`` index past its exact phase, on the CPU with compiled lists (the keys only in its
        lists), which :mod:`indexes.batched` adds to and searches together with others; else None."""
        index = self._index
        if (
            isinstance(index, BoundedIVF)
            and self._store is None
            and self.device.type == "cpu"
            and index.lists.is_native
        ):
            return index
        return None

    def exact_keys(self) -> torch.Tensor | None:
        """The stored keys [n, d] (``store_dtype``, a view) while the search is exact over one block
        of them on the CPU (one store chunk of 1..``EXACT_BLOCK`` keys) by matmul (fewer than
        ``EXACT_KERNEL_KEYS``), which :mod:`indexes.batched` searches together with others; else None."""
        if self._index is not None or self._store is None or self.device.type != "cpu":
            return None
        if self._ntotal >= EXACT_KERNEL_KEYS:  # the kernel's, in this index's own search
            return None
        views = self._store.views()
        if len(views) != 1 or views[0].shape[0] > EXACT_BLOCK:
            return None
        return views[0]

    def added_to(self, index: BoundedIVF, n: int) -> bool:
        """Count an add of ``n`` keys made straight into :meth:`compiled_ivf`. Returns whether a rebuild
        is now due, which the caller runs (:meth:`rebuild`)."""
        index.added(n)
        self._ntotal += n
        return self._rebuild_due()

    def rebuild(self, threads: int = 1) -> None:
        """Rebuild now (after :meth:`added_to` said it is due), assigning the keys to the new lists on up
        to ``threads`` threads (the same lists on any number)."""
        self._build(threads)

    def rebuild_bytes(self) -> int:
        """Bytes a rebuild holds beside the index while it runs: every key as float32."""
        return self._ntotal * self.dim * 4

    def _first_build_at(self) -> int:
        if self.policy is not None:
            if self.device.type == "cuda":
                return 2**62  # on a GPU the auto policy stays exact
            return self.policy.next_build(0)
        return self.min_train_points

    def _rebuild_due(self) -> bool:
        if self.policy is not None:
            return self._ntotal >= self.policy.next_build(self.trained_at)
        return (
            self.spec.needs_training
            and self.retrain_factor is not None
            and self._ntotal >= self.retrain_factor * self.trained_at
        )

    def _index_add(self, index: faiss.Index, x: torch.Tensor, start: int) -> None:
        """Add keys ``x`` [m, d], the keys from number ``start`` on, to ``index``.

        HNSW draws a random level for every new key from a generator that an index written to disk
        does not keep. Seeding it from (seed, ``start``) before each add makes the graph a function of
        the keys alone, so a loaded or cloned index grows exactly like the original.
        """
        if isinstance(index, BoundedIVF):
            index.add(_to_numpy(x))
            return
        hnsw = _hnsw_of(index)
        if hnsw is not None:
            hnsw.rng = faiss.RandomGenerator((self.seed * 1_000_003 + start) % (2**63))
        index.add(_to_numpy(x))

    def keys(self) -> torch.Tensor:
        """All stored keys as one [n, d] float32 tensor (a copy; for tests, saving and training)."""
        if self._store is not None:
            return self._store.full().to(torch.float32)
        cpu = self._cpu_index()
        return torch.from_numpy(_decode_all(cpu, self._ntotal, self.dim)).to(self.device)

    def _cpu_index(self) -> faiss.Index | BoundedIVF:
        if self.device.type == "cuda" and not isinstance(self._index, BoundedIVF):
            return faiss.index_gpu_to_cpu(self._index)
        return self._index

    def _train_size(self, n: int) -> int:
        if self.policy is not None:
            return self.policy.train_size(n, self.policy.lists_for(n))
        want = self.train_sample or max(self.min_train_points, 256 * max(self.spec.nlist, 1))
        return min(n, max(want, self.min_train_points))

    def _sample_rows(self, n: int) -> torch.Tensor:
        want = self._train_size(n)
        gen = torch.Generator().manual_seed(self.seed + self.trainings)
        return torch.randperm(n, generator=gen)[:want].sort().values

    def _build(self, threads: int = 1) -> None:
        n = self._ntotal
        old, store = self._index, self._store
        # Every key in float32, in id order: from the store, or decoded from the codes of the index
        # that held them (the only copy); the old index is dropped before the new one is filled.
        source = None if store is not None else _decode_all(self._cpu_index(), n, self.dim)
        self._index = None
        del old
        if self.policy is not None:
            self._index = self._build_auto(n, store, source, threads)
        else:
            self._index = self._build_spec(n, store, source)
        self.trained_at = n
        if self.device.type == "cpu" and (
            isinstance(self._index, BoundedIVF) or _codes_are_keys(self._index)
        ):
            self._store = None  # the codes are the keys now: one copy

    def _sample(
        self, rows: torch.Tensor, store: ChunkedTensor | None, source: np.ndarray | None
    ) -> np.ndarray:
        if source is not None:
            return source[rows.numpy()]
        return _to_numpy(store.rows(rows.to(self.device)).to(torch.float32).contiguous())

    def _build_auto(
        self, n: int, store: ChunkedTensor | None, source: np.ndarray | None, threads: int = 1
    ) -> BoundedIVF:
        lists = self.policy.lists_for(n)
        sample = self._sample(self._sample_rows(n), store, source)
        if source is None:
            source = _to_numpy(store.full().to(torch.float32).contiguous())
        index = BoundedIVF.build(source, sample, lists, self.store_dtype, self.policy.niter, threads)
        self.trainings += 1
        log.info("auto: built %d lists over %d keys (trained on %d)", lists, n, sample.shape[0])
        self._apply_params(index)
        return index

    def _build_spec(self, n: int, store: ChunkedTensor | None, source: np.ndarray | None) -> faiss.Index:
        index = build_index(self.spec)
        if self.spec.needs_training:
            rows = self._sample_rows(n)
            index.train(np.ascontiguousarray(self._sample(rows, store, source)))
            self.trainings += 1
            log.info("trained %s on %d of %d keys", self.spec.spec, len(rows), n)
        if self.device.type == "cuda":
            index = index_to_gpu(index, self.device.index)
        self._apply_params(index)
        start = 0
        if source is not None:
            for begin in range(0, n, ADD_BLOCK):
                self._index_add(index, torch.from_numpy(source[begin : begin + ADD_BLOCK]), begin)
        else:
            for view in store.views():
                for begin in range(0, view.shape[0], ADD_BLOCK):
                    block = view[begin : begin + ADD_BLOCK].to(torch.float32).contiguous()
                    self._index_add(index, block, start)
                    start += block.shape[0]
        return index

    def _apply_params(self, index: faiss.Index | BoundedIVF) -> None:
        if isinstance(index, BoundedIVF):
            index.nprobe = self._params_for(index)["nprobe"]
            index.max_nprobe = max(index.nprobe, self.policy.max_nprobe)
            index.rank_shrink = self.policy.rank_shrink
        else:
            apply_search_params(index, self._params_for(index))

    def _params_for(self, index: faiss.Index) -> dict[str, int]:
        """The search knobs applied to ``index``: those given, else (``"auto"``) the policy's ``nprobe``."""
        if self.policy is None:
            return dict(self.search_params)
        lists = index.nlist
        return {"nprobe": min(self.search_params.get("nprobe") or self.policy.nprobe_for(lists), lists)}

    # ------------------------------------------------------------------ search
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` keys by inner product for each query.

        Args:
            queries: [m, d], any float dtype (searched in float32).
            k: number of neighbours; more than stored gives ``-1`` ids.

        Returns:
            scores [m, k] float32 (raw q·k, ``-inf`` for empty slots) and ids [m, k] int64
            (insertion order; ``-1`` for empty slots), best first, on the index's device.
        """
        k = check_k(k)
        return self.search_checked(_as_keys(queries, self.dim, "queries").to(self.device), k)

    def search_checked(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`search` for validated input: ``q`` float32 [m, d] contiguous on the device, ``k`` >= 1."""
        m = q.shape[0]
        if self._ntotal == 0 or m == 0:
            return self._empty(m, k)
        if self._index is not None:
            if self.device.type == "cuda":
                check_gpu_limits(k, self.search_params)
            dist, ids = self._index.search(_to_numpy(q), k)
            scores = torch.from_numpy(dist).to(self.device)
            ids_t = torch.from_numpy(ids).to(self.device)
            if isinstance(self._index, BoundedIVF):  # its empty slots are -inf / -1 already
                return scores, ids_t
            return self._clean(scores, ids_t)
        return self._exact(q, k)

    def _empty(self, m: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.full((m, k), -math.inf, dtype=torch.float32, device=self.device)
        return scores, torch.full((m, k), -1, dtype=torch.int64, device=self.device)

    @staticmethod
    def _clean(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        empty = ids < 0
        if bool(empty.any()):
            scores = scores.masked_fill(empty, -math.inf)
        return scores, ids

    def _blocks(self):
        """(offset, float32 [m, d] block of at most EXACT_BLOCK keys) over the store."""
        offset = 0
        for view in self._store.views():
            for begin in range(0, view.shape[0], EXACT_BLOCK):
                yield offset + begin, view[begin : begin + EXACT_BLOCK].to(torch.float32)
            offset += view.shape[0]

    def _exact(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cpu" and self._ntotal >= EXACT_KERNEL_KEYS:
            found = native.exact_top_k(self._store.views(), q, k, call_threads())
            if found is not None:
                return found
        parts_s, parts_i = [], []
        for offset, block in self._blocks():
            rows = max(1, SELECT_SCORES // block.shape[0])  # a cut of the queries at a time
            cuts = [top_k(_score_matrix(q[r : r + rows], block), k) for r in range(0, q.shape[0], rows)]
            s, i = cuts[0] if len(cuts) == 1 else (torch.cat(part) for part in zip(*cuts, strict=True))
            parts_s.append(s)
            parts_i.append(i + offset if offset else i)
        scores = torch.cat(parts_s, dim=1) if len(parts_s) > 1 else parts_s[0]
        ids = torch.cat(parts_i, dim=1) if len(parts_i) > 1 else parts_i[0]
        if len(parts_s) > 1:
            scores, pos = top_k(scores, k)
            ids = torch.gather(ids, 1, pos)
        return pad_to_k(scores, ids, k)

    # ------------------------------------------------------------------ copies and persistence
    def clone(self) -> StreamingIndex:
        """An independent copy (keys, index and its training)."""
        new = StreamingIndex.__new__(StreamingIndex)
        new.__dict__.update(self.__dict__)
        new._store = None if self._store is None else self._store.clone()
        if isinstance(self._index, BoundedIVF):
            new._index = self._index.clone()
            new._apply_params(new._index)
        elif self._index is not None:
            new._index = self._index_from_bytes(self._index_bytes())
        return new

    def _index_bytes(self) -> np.ndarray:
        return faiss.serialize_index(self._cpu_index())

    def _index_from_bytes(self, data: np.ndarray) -> faiss.Index:
        index = faiss.deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))
        self._apply_params(index)
        if self.device.type == "cuda":
            index = index_to_gpu(index, self.device.index)
        return index

    def state(self) -> dict:
        """Everything needed to rebuild this index: settings, the key store (or None), index bytes."""
        return {
            "dim": self.dim,
            "spec": self.spec.spec,
            "search_params": dict(self.search_params),
            "min_train_points": self.min_train_points,
            "retrain_factor": self.retrain_factor,
            "train_sample": self.train_sample,
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            "store_dtype": str(self.store_dtype).removeprefix("torch."),
            "policy": None if self.policy is None else self.policy.to_dict(),
            "trained_at": self.trained_at,
            "trainings": self.trainings,
            "ntotal": self._ntotal,
            "keys": None if self._store is None else self._store.full().cpu(),
            "index": None if self._index is None else self._index_state(),
        }

    def _index_state(self) -> torch.Tensor | dict:
        if isinstance(self._index, BoundedIVF):
            return self._index.state()
        return torch.from_numpy(self._index_bytes().copy())

    @classmethod
    def from_state(cls, state: dict, device: str | torch.device = "cpu") -> StreamingIndex:
        """Rebuild from :meth:`state` without retraining (an IVF index keeps its centroids)."""
        store_dtype = getattr(torch, str(state.get("store_dtype", "float32")), None)
        policy = state.get("policy")
        new = cls(
            state["dim"],
            state["spec"],
            device=device,
            min_train_points=None if policy is not None else state["min_train_points"],
            retrain_factor=state["retrain_factor"],
            train_sample=state["train_sample"],
            chunk_size=state["chunk_size"],
            seed=state["seed"],
            store_dtype=store_dtype,
            policy=None if policy is None else GrowthPolicy(**policy),
            **state["search_params"],
        )
        keys, index_bytes = state["keys"], state["index"]
        ntotal = int(state.get("ntotal", 0 if keys is None else keys.shape[0]))
        if keys is not None:
            if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.shape[1] != new.dim:
                raise ValueError(
                    f"saved keys must be [n, {new.dim}], got {getattr(keys, 'shape', type(keys))}"
                )
            if keys.shape[0] != ntotal:
                raise ValueError(f"saved keys hold {keys.shape[0]} rows, but the saved count is {ntotal}")
            new._store.append(_as_keys(keys, new.dim, "saved keys").to(new.device))
        elif index_bytes is None:
            if ntotal:
                raise ValueError(f"saved index state has {ntotal} keys but neither keys nor an index")
        else:
            new._store = None
        new._ntotal = ntotal
        new.trained_at = int(state["trained_at"])
        new.trainings = int(state["trainings"])
        if index_bytes is not None:
            if new.policy is not None:
                if not isinstance(index_bytes, dict):
                    raise ValueError("saved 'auto' index must be a dict of its parts")
                index = BoundedIVF.from_state(index_bytes, dim=new.dim)
                new._apply_params(index)
            elif not isinstance(index_bytes, torch.Tensor):
                raise ValueError(f"saved {new.spec.spec!r} index must be a uint8 tensor of Faiss bytes")
            else:
                try:
                    index = new._index_from_bytes(index_bytes.numpy())
                except RuntimeError as err:  # Faiss cannot parse the bytes
                    reason = str(err).strip().splitlines()[-1]
                    raise ValueError(f"saved {new.spec.spec!r} index cannot be read ({reason})") from None
            if not isinstance(index, BoundedIVF):
                _check_loaded_index(index, new.spec)
            if index.ntotal != ntotal:
                raise ValueError(f"saved index holds {index.ntotal} keys but {ntotal} keys were saved")
            if index.d != new.dim:
                raise ValueError(f"saved index has dim {index.d}, expected {new.dim}")
            if keys is None and not isinstance(index, BoundedIVF) and not _codes_are_keys(index):
                raise ValueError(f"saved {new.spec.spec!r} index has lossy codes but its keys were not saved")
            new._index = index
        return new

    # ------------------------------------------------------------------ rolling back
    @property
    def can_truncate(self) -> bool:
        """True when :meth:`truncate` can remove keys from this index.

        Always in the exact phase and for the ``"auto"`` index; for a Faiss index, when Faiss can remove
        ids from it on the CPU (the IVF family, flat codes: ``Flat``, ``SQ8``, ``PQ16``..., also behind
        a pre-transform). Not for HNSW (Faiss cannot remove nodes from its graph) nor a GPU index.
        """
        return _removable(self._index)

    def truncate(self, n: int) -> None:
        """Forget every key after the first ``n`` (0 <= n <= :attr:`ntotal`), in place, without a copy.

        The store (when there is one) drops its tail and the Faiss index removes the ids >= ``n``. An
        index trained on keys past ``n`` keeps its training (its centroids stay good ones for keys of
        the same document) and the policy counts from ``n``: ``trained_at`` becomes at most ``n``, so
        the next rebuild comes when the memory has grown again by the policy's factor. An index is
        kept even when ``n`` falls below the size at which it was first built. Raises ``ValueError``,
        before changing anything, when keys would have to leave an index that cannot remove them
        (:attr:`can_truncate`).
        """
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
            raise TypeError(f"n must be an int, got {type(n).__name__} {n!r}")
        n = int(n)
        if not 0 <= n <= self._ntotal:
            raise ValueError(f"n must be in [0, {self._ntotal}] (the keys stored), got {n}")
        if n == self._ntotal:
            return
        if not self.can_truncate:
            raise ValueError(
                f"index {self.spec.spec!r} on {self.device} cannot remove keys (Faiss has no remove_ids "
                f"for it): cannot truncate {self._ntotal} keys to {n}; keep a clone() instead"
            )
        if self._store is not None:
            self._store.truncate(n)
        _remove_from(self._index, n)
        self._ntotal = n
        self.trained_at = min(self.trained_at, n)

    def mark(self) -> IndexMark:
        """A small token of the current state that :meth:`rollback` returns to exactly.

        It holds references to the store and the index (no copy of the keys), their counts and the
        training counters, and for the ``"auto"`` index a copy of its list bounds ([L, 2d], small). Keys
        added later are appended after the marked ones, so rolling back removes them; when the index
        was rebuilt in between, the marked index object (kept alive by the token) is put back.
        Only valid for an index that :attr:`can_truncate`, or that receives no keys before the
        rollback; rolling back to a mark makes the marks taken after it invalid.
        """
        bounds = self._index.bounds.clone() if isinstance(self._index, BoundedIVF) else None
        return IndexMark(self._ntotal, self.trained_at, self.trainings, self._store, self._index, bounds)

    def rollback(self, mark: IndexMark) -> None:
        """Return to the state recorded by :meth:`mark` (see there)."""
        if not isinstance(mark, IndexMark):
            raise TypeError(
                f"mark must be an IndexMark from StreamingIndex.mark(), got {type(mark).__name__}"
            )
        n, store, index = mark.ntotal, mark.store, mark.index
        if (store is not None and store.length < n) or (index is not None and index.ntotal < n):
            raise ValueError(f"the marked keys were truncated since the mark ({n} keys): cannot roll back")
        if index is not None and index.ntotal > n and not _removable(index):
            raise ValueError(
                f"index {self.spec.spec!r} on {self.device} cannot remove the {index.ntotal - n} keys added "
                f"since the mark; keep a clone() instead"
            )
        if store is not None:
            store.truncate(n)
        if index is not None:
            _remove_from(index, n)
            if mark.bounds is not None:
                index.bounds.copy_(mark.bounds)
            self._apply_params(index)
        self._store, self._index = store, index
        self._ntotal, self.trained_at, self.trainings = n, mark.trained_at, mark.trainings


class IndexMark(NamedTuple):
    """What :meth:`StreamingIndex.mark` records: counts, and references to the store and index."""

    ntotal: int
    trained_at: int
    trainings: int
    store: ChunkedTensor | None
    index: faiss.Index | BoundedIVF | None
    bounds: torch.Tensor | None  # the "auto" index's list bounds [L, 2d] (a copy)


def _removable(index: faiss.Index | BoundedIVF | None) -> bool:
    """True when keys can be removed from ``index`` (None: nothing to remove from)."""
    if index is None or isinstance(index, BoundedIVF):
        return True
    base = faiss.downcast_index(index)
    while isinstance(base, faiss.IndexPreTransform):
        base = faiss.downcast_index(base.index)
    return isinstance(base, (faiss.IndexIVF, faiss.IndexFlatCodes))


def _remove_from(index: faiss.Index | BoundedIVF | None, n: int) -> None:
    """Remove the ids >= ``n`` from ``index`` (ids are insertion order; those kept do not move)."""
    if isinstance(index, BoundedIVF):
        index.truncate(n)
    elif index is not None and index.ntotal > n:
        index.remove_ids(faiss.IDSelectorRange(n, index.ntotal))
