"""The ``"auto"`` index: a named policy that grows an inverted-file index with the memory.

A memory of N keys costs N inner products per query when searched exactly. An inverted file (IVF)
with L lists costs about L (ranking the lists' centroids) plus ``nprobe * N / L`` (scanning the
``nprobe`` best lists); with L about ``c * sqrt(N)`` both terms grow like sqrt(N). A fixed L cannot do
that: at 1M keys, IVF1024 scans ~16k keys per query at nprobe 16.

The policy (:class:`GrowthPolicy`, every field a keyword of the ``"faiss"`` backend with
``index="auto"``):

1. **Exact while small.** Below ``exact_until`` keys per head (default 8192) the search is exact: it
   costs little, needs no training, and has recall 1.
2. **Then IVF with lists ~ sqrt(N).** At ``exact_until`` keys an IVF is built with
   ``L = lists_per_sqrt * sqrt(N)`` lists (default 2, so 181 lists at 8k keys, 2048 at 1M).
3. **Rebuilt as it grows.** When the memory has grown ``regrow_factor`` times (default 2) since the
   last build, the index is rebuilt with the L of the new size, from a fresh training sample. Keys
   drift over a long document, so an old coarse quantizer also loses recall (measured 0.95 -> 0.73);
   the rebuild fixes both. Each rebuild costs about ``train_per_list * L * L * d`` (k-means) plus
   ``N * L * d`` (re-assigning every key); over a document the rebuilds form a geometric series, so
   their total is about ``regrow_factor / (regrow_factor - 1)`` times the last one.
4. **Bounded training.** The k-means sample is ``train_per_list`` keys per list (default 32, Faiss
   warns below 39 but recall measured the same) and at most ``max_train_sample`` keys, with
   ``niter`` iterations.
5. **Keys stored once.** The lists hold the keys themselves in the memory's dtype (bf16 / fp16 codes,
   or float32 for a float32 memory; :mod:`indexes.inverted_lists`), not residuals, so a key decodes to
   exactly the value it had and the scores are exact inner products of the retrieved keys. Rebuilds
   read the keys back from the lists: no second copy is kept. A full list grows by an eighth, so the
   lists hold at most ~12.5% unused room (``nbytes`` counts it), and the compiled lists grow in
   segments cut from large mapped slabs: no key is copied as a list grows and no freed hole is left
   behind, so resident memory follows ``nbytes``.
6. **Lists ranked by their boxes, scanned until certain.** Lists are ranked per query by the inner
   product their keys' bounding box allows once shrunk about its centre by ``rank_shrink`` (default
   0.25; 1: the box's own bound), not by the centroid: attention queries lie outside the keys'
   distribution, and the whole box's bound, which assumes a key at its far corner, ranks lists whose
   keys do not come close to it (:mod:`indexes.bounded_ivf`). Every query scans ``nprobe`` lists
   (default 8), then goes on list by list while some list it has not scanned has a bound (of the
   whole box) above its k-th score, up to ``max_nprobe`` lists (default 32), so most queries end with
   their exact top-k. See ``benchmarks/README.md`` for the recall on the embedded model's own queries.

On CUDA the policy stays exact (a matmul + top-k over the keys in GPU memory is the fast path there).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from indexes.validate import INT32_MAX, MAX_COUNT, check_float, check_int

AUTO = "auto"


@dataclass(frozen=True)
class GrowthPolicy:
    """Parameters of the ``"auto"`` index (see the module docstring for why each default)."""

    exact_until: int = 8192
    lists_per_sqrt: float = 2.0
    regrow_factor: float = 2.0
    nprobe: int = 8
    max_nprobe: int = 32
    rank_shrink: float = 0.25
    train_per_list: int = 32
    max_train_sample: int = 65536
    niter: int = 10
    min_lists: int = 16
    max_lists: int = 65536

    def __post_init__(self) -> None:
        check_int(self.exact_until, "exact_until", 1, 2**40)
        check_float(self.lists_per_sqrt, "lists_per_sqrt", 0.0, 1024.0, low_open=True)
        check_float(self.regrow_factor, "regrow_factor", 1.0, 1024.0, low_open=True)
        check_int(self.nprobe, "nprobe", 1, 65536)
        check_int(self.max_nprobe, "max_nprobe", 1, 65536)
        check_float(self.rank_shrink, "rank_shrink", 0.0, 1.0, low_open=True)
        check_int(self.train_per_list, "train_per_list", 1, 4096)
        check_int(self.max_train_sample, "max_train_sample", 1, INT32_MAX)
        check_int(self.niter, "niter", 1, 1000)
        check_int(self.min_lists, "min_lists", 1, MAX_COUNT)
        check_int(self.max_lists, "max_lists", self.min_lists, MAX_COUNT)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The keyword names of the policy."""
        return tuple(f.name for f in fields(cls))

    def to_dict(self) -> dict:
        return asdict(self)

    def lists_for(self, n: int) -> int:
        """Lists L for a memory of ``n`` keys: ``lists_per_sqrt * sqrt(n)``, within the bounds, at most n."""
        lists = round(self.lists_per_sqrt * math.sqrt(max(n, 1)))
        return max(1, min(n, max(self.min_lists, min(self.max_lists, lists))))

    def train_size(self, n: int, lists: int) -> int:
        """Keys sampled to train ``lists`` centroids out of ``n``."""
        return min(n, self.max_train_sample, max(lists, self.train_per_list * lists))

    def next_build(self, built_at: int) -> int:
        """The memory size at which the next build happens, given the size at the last one (0: none yet)."""
        if built_at == 0:
            return self.exact_until
        return max(built_at + 1, math.ceil(self.regrow_factor * built_at))

    def nprobe_for(self, lists: int) -> int:
        """Lists scanned per query (never more than there are)."""
        return min(self.nprobe, lists)
