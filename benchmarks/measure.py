"""Timing, work models and memory figures shared by the benchmarks.

Work models (all *estimates*, stated as such in every table):

* **fraction of keys scanned** per query, from the index parameters: exact and ``Flat`` scan every
  key (1); an IVF index ``nprobe / nlist`` (lists assumed balanced); an HNSW graph
  ``max(efSearch, k) * M * ln(N) / (8 N)``, which is the often-quoted ``efSearch * M * ln(N) / N``
  scaled by 1/8 so that it matches Faiss's own distance counters (measured on i.i.d. keys, N = 16k-64k,
  M = 16-32, efSearch = 128-512: within about +-40%); a flat scalar-quantised or PQ scan 1;
* **search FLOP**: ``2 d`` per scanned key and query (a dot product), plus ``2 d nlist`` per query for an
  IVF coarse quantiser; this is what GFLOP/s and the ratio to the fp32 matmul ceiling are built from;
* **search bytes**: bytes of keys or codes visited. ``Flat`` and exact search read every key once per
  block of queries (Faiss's BLAS path uses 4096-query blocks, the sequential path below 20 queries reads
  every key once per query); an IVF or graph index reads the codes it visits once per query (caches
  may serve repeats, so GB/s above the read ceiling means cache reuse). This gives GB/s and the ratio
  to the memory read ceiling, the relevant figure for a decode step (one query);
* **add bytes**: bytes written per window: the float32 key copy, index codes and ids, values;
* **build FLOP** (IVF): k-means, 10 iterations over the training sample, plus assigning every key to
  a list: ``2 d nlist (10 n_train + N)``; HNSW: one graph search per insertion at efConstruction = 40.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# PeakRSS lives in longllama (the passkey tool measures with it too); the benchmarks import it from here
from longllama.tools.peak_rss import PeakRSS as PeakRSS

FAISS_QUERY_BLOCK = 4096  # faiss exhaustive search: queries per BLAS block
FAISS_SEQ_BELOW = 20  # faiss exhaustive search: fewer queries than this take the sequential path
KMEANS_ITERS = 10
HNSW_EF_CONSTRUCTION = 40
HNSW_CALIBRATION = 1 / 8


@dataclass
class Timing:
    """Wall times of repeated runs of one operation."""

    median: float
    best: float
    runs: int

    def to_dict(self, prefix: str) -> dict:
        return {f"{prefix}_s": self.median, f"{prefix}_best_s": self.best, f"{prefix}_runs": self.runs}


def time_call(
    fn: Callable[[], object],
    *,
    budget_s: float = 1.5,
    max_runs: int = 9,
    single_above_s: float = 0.5,
    sync: Callable[[], None] | None = None,
) -> Timing:
    """Time ``fn`` with ``time.perf_counter``: median of repeats for fast calls, one run for slow ones.

    The first call is timed; if it takes ``single_above_s`` or more it is the measurement (warm-up
    effects are small against it, and large points are expensive). Otherwise it counts as warm-up and
    the call is repeated (at least 3 times, at most ``max_runs``, within ``budget_s``); the median is
    reported.
    """

    def once() -> float:
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        return time.perf_counter() - t0

    first = once()
    if first >= single_above_s:
        return Timing(first, first, 1)
    runs = max(3, min(max_runs, int(budget_s / max(first, 1e-6))))
    times = [once() for _ in range(runs)]
    return Timing(statistics.median(times), min(times), len(times))


# ---------------------------------------------------------------------------------------------- index specs
def nlist_for(n_keys: int, min_points_per_list: int = 39) -> int:
    """IVF list count for a memory of ``n_keys``: the power of two nearest ``4 sqrt(N)``, lowered until
    every list gets ``min_points_per_list`` training keys (so the index trains on the memory it serves)."""
    target = 2 ** round(math.log2(4 * math.sqrt(max(n_keys, 1))))
    while target > 8 and target * min_points_per_list > n_keys:
        target //= 2
    return max(target, 8)


def resolve_index(template: str, n_keys: int) -> str:
    """A Faiss factory string with ``{nlist}`` replaced by :func:`nlist_for` (``IVF{nlist},Flat``)."""
    return template.replace("{nlist}", str(nlist_for(n_keys)))


def index_family(spec: str | None) -> str:
    """A short family name for plots: ``exact``, ``Flat``, ``IVF,Flat``, ``HNSW32``, ``IVF,SQ8``..."""
    if spec is None:
        return "exact"
    return re.sub(r"IVF\d+", "IVF", spec)


def search_knob(spec: str | None) -> str | None:
    """The search-time knob of an index: ``nprobe`` (IVF), ``efSearch`` (HNSW), or None."""
    if spec is None:
        return None
    if re.search(r"(^|,)IVF", spec):
        return "nprobe"
    if spec.startswith("HNSW"):
        return "efSearch"
    return None


def hnsw_m(spec: str) -> int:
    m = re.match(r"HNSW(\d+)", spec)
    return int(m.group(1)) if m else 32


def ivf_nlist(spec: str) -> int:
    m = re.search(r"IVF(\d+)", spec)
    return int(m.group(1)) if m else 0


def code_bytes(spec: str | None, head_dim: int, mem_dtype_bytes: int = 2) -> float:
    """Bytes per stored key that a search reads (exact backend: keys in the memory dtype)."""
    if spec is None:
        return head_dim * mem_dtype_bytes
    last = spec.split(",")[-1]
    if m := re.fullmatch(r"PQ(\d+)(?:x(\d+))?(?:np)?", last):
        return int(m.group(1)) * int(m.group(2) or 8) / 8
    if last == "SQ8":
        return head_dim
    if last == "SQ4":
        return head_dim / 2
    if last in ("SQfp16", "SQbf16"):
        return head_dim * 2
    return head_dim * 4  # Flat, HNSW32 (flat storage), IVF,Flat


def fraction_scanned(spec: str | None, n_keys: int, k: int, nprobe: int | None, ef: int | None) -> float:
    """Estimated share of the keys whose codes one query visits (see the module notes)."""
    if spec is None or search_knob(spec) is None:
        return 1.0
    if search_knob(spec) == "nprobe":
        nlist = ivf_nlist(spec)
        return min(1.0, (nprobe or 1) / nlist) if nlist else 1.0
    ef = max(ef or 16, k)
    return min(1.0, HNSW_CALIBRATION * ef * hnsw_m(spec) * math.log(max(n_keys, 2)) / n_keys)


def search_work(
    spec: str | None,
    *,
    n_keys: int,
    head_dim: int,
    heads: int,
    queries: int,
    k: int,
    nprobe: int | None,
    ef: int | None,
    index_active: bool,
    mem_dtype_bytes: int = 2,
) -> dict:
    """Estimated FLOP and bytes of one search window (all heads)."""
    active_spec = spec if index_active else ("Flat" if spec is not None else None)
    frac = fraction_scanned(active_spec, n_keys, k, nprobe, ef)
    flop = 2.0 * head_dim * frac * n_keys * queries * heads
    nlist = ivf_nlist(active_spec) if active_spec else 0
    if search_knob(active_spec) == "nprobe":
        flop += 2.0 * head_dim * nlist * queries * heads
    per_key = code_bytes(active_spec, head_dim, mem_dtype_bytes)
    if active_spec is None:  # dense torch scores: every key once per window
        passes = 1
    elif active_spec == "Flat":  # faiss exhaustive search: per query below 20 queries, else per block
        passes = queries if queries < FAISS_SEQ_BELOW else math.ceil(queries / FAISS_QUERY_BLOCK)
    else:  # codes visited once per query (flat SQ/PQ scans: frac = 1)
        passes = queries * frac
    nbytes = per_key * n_keys * heads * passes
    return {"fraction_scanned": frac, "search_flop": flop, "search_bytes": nbytes}


def build_flop(spec: str | None, n_keys: int, head_dim: int, heads: int, train_points: int) -> float | None:
    """Estimated FLOP of building the index over ``n_keys`` keys (None where no model applies)."""
    if spec is None:
        return None
    nlist = ivf_nlist(spec)
    if nlist:
        return 2.0 * head_dim * nlist * (KMEANS_ITERS * train_points + n_keys) * heads
    if spec.startswith("HNSW"):
        m = hnsw_m(spec)
        per_insert = min(n_keys, HNSW_CALIBRATION * HNSW_EF_CONSTRUCTION * m * math.log(max(n_keys, 2)))
        return 2.0 * head_dim * per_insert * n_keys * heads
    return None


# ---------------------------------------------------------------------------------------------- memory
def dtype_bytes(mem_dtype: str) -> int:
    return torch.empty(0, dtype=getattr(torch, mem_dtype)).element_size()
