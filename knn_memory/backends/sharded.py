"""The ``"sharded"`` backend: one memory split by tokens over the ranks of a ``torch.distributed`` group.

Every rank runs the same model on the same input (replicated compute) and holds a slice of the memory
(sharded memory). Whole windows go to the ranks in turn (striped): the i-th ``add`` of this memory goes to
rank ``i % world_size``, so old and recent context spread evenly. Each rank's slice is an ordinary backend
chosen by name with its own options (``inner="exact"``, or ``"faiss"`` with any index, ``"auto"``
included)::

    mem = create_backend("sharded", inner="faiss", index="auto", num_heads=32, head_dim=100)
    # model: from_pretrained(..., mem_backend="sharded", mem_index="auto", mem_index_params={"inner": "faiss"})
    # CLI:   torchrun --nproc-per-node 2 -m longllama.passkey_cli --backend sharded:faiss:auto

:func:`~knn_memory.memory_attention` attends to each rank's slice as a partial softmax state and merges
the states over the ranks (``SHARDED``; see :mod:`knn_memory.attention`): one ``all_reduce(MAX)`` of the
running max and one ``all_reduce(SUM)`` of the rescaled outputs and sums per attention block.

Top-k, two ``mode``\\ s:

* ``"union"`` (default): each query attends to every rank's top-k (``world_size * k`` entries, a superset
  of the global top-k);
* ``"global"``: the ranks first all-gather their top-k scores, and each keeps only its entries among the
  k best of all: exactly the global top-k, as one process with the same index on the same keys.

Bytes each rank hands to the collectives per query and head, independent of the memory size
(float32, ``d`` = head_dim): ``4`` (the max) + ``4 (d + 1)`` (outputs and sums), plus ``4 k`` in
``"global"`` mode (its top-k scores). A dense inner backend (``exact`` without ``top_k``) attends to every
entry, so the modes agree.

``search`` returns this rank's part (its top-k, or in ``"global"`` mode those of them in the global
top-k, the others as empty slots); it is a collective in ``"global"`` mode, as ``add`` is not.
``lengths`` are the whole memory's (every rank sees every window's padding flags), ``nbytes`` this
rank's (:meth:`nbytes_per_rank` gathers all). A memory saved on ``w`` ranks loads on ``w`` ranks only.
Every rank must build the same memory (backend, options, geometry, world size); a mismatch is refused
when the memory is built, and a rank that dies or hangs ends the others within ``timeout`` seconds.
Sharded memory is for inference: gradients do not cross ranks. Collectives run in call order, so each
rank drives its memory from one thread (a search from a second thread at the same time could pair its
collectives with another search's on the other rank).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from knn_memory.backend import MemoryBackend, MemoryCheckpoint
from knn_memory.hits import MemoryHits
from knn_memory.persistence import backend_meta, write_parts
from knn_memory.process_group import DEFAULT_TIMEOUT, ShardGroup
from knn_memory.registry import backend_class, create_backend, register_backend

MODES = ("union", "global")


@register_backend("sharded")
class ShardedBackend(MemoryBackend):
    """A memory split over the ranks of a process group, each slice an ordinary backend.

    Args (beyond :class:`MemoryBackend`'s):
        inner: the backend of each rank's slice (any registered name but ``"sharded"``).
        index: the inner backend's index (``"faiss"``: a factory string or ``"auto"``).
        mode: ``"union"`` or ``"global"`` top-k (see the module).
        timeout: seconds any collective waits for the other ranks before raising.
        **inner_options: the inner backend's options (``nprobe``, ``max_nprobe``, ...).
    """

    SHARDED = True
    FREE_OPTIONS = ("batch_size", "timeout", "workers", "chunk_size")

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        batch_size: int = 1,
        mem_dtype: str | torch.dtype = "bfloat16",
        device: str | torch.device = "cpu",
        top_k: int | None = None,
        index: object = None,
        inner: str = "exact",
        mode: str = "union",
        timeout: float = DEFAULT_TIMEOUT,
        **inner_options,
    ) -> None:
        super().__init__(
            num_heads=num_heads,
            head_dim=head_dim,
            batch_size=batch_size,
            mem_dtype=mem_dtype,
            device=device,
            top_k=top_k,
        )
        if not isinstance(inner, str) or inner == self.name:
            raise ValueError(
                f"inner must name the backend of each rank's slice (not 'sharded'), got {inner!r}"
            )
        backend_class(inner)  # ValueError listing the known names
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        self.inner = inner
        self.mode = mode
        if index is not None:
            inner_options["index"] = index
        # the slice first: a bad inner option fails here, on every rank alike, before any collective
        self.shard = create_backend(
            inner,
            num_heads=num_heads,
            head_dim=head_dim,
            batch_size=batch_size,
            mem_dtype=mem_dtype,
            device=device,
            top_k=top_k,
            **inner_options,
        )
        self.top_k = self.shard.top_k
        self.group = ShardGroup(self.device, timeout)
        self.rank, self.world_size = self.group.rank, self.group.world_size
        self._check_same_memory_on_every_rank()
        self._reset_bookkeeping()

    def _reset_bookkeeping(self) -> None:
        self._total = torch.zeros(self.batch_size, dtype=torch.int64)  # real entries per row, all ranks
        # (owner rank, real entries per row) per add, every rank's: the next window goes to rank len % world
        self._windows: list[tuple[int, torch.Tensor]] = []

    def _check_same_memory_on_every_rank(self) -> None:
        mine = {"world_size": self.world_size, "batch_size": self.batch_size, **self.matching_config()}
        everyone = self.group.all_gather_object(mine)
        for rank, theirs in enumerate(everyone):
            if theirs != mine:
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                raise ValueError(
                    f"sharded memory: rank {rank} builds another memory than rank {self.rank}: "
                    + "; ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in diff)
                )

    # ------------------------------------------------------------------ what the class declares
    @classmethod
    def spec_grammar(cls) -> str:
        return "sharded:<inner backend>[:<its spec>][:mode=global]"

    @classmethod
    def parse_spec(cls, spec: str | None, name: str = "--backend") -> dict:
        """``"faiss:auto"`` -> ``{"inner": "faiss", "index": "auto"}``; nothing: ``{"inner": "exact"}``."""
        if spec is None:
            return {"inner": "exact"}
        inner, sep, rest = spec.partition(":")
        if inner == cls.name:
            raise ValueError(f"{name} sharded:{spec}: a sharded memory cannot hold sharded memories")
        options = backend_class(inner).parse_spec(rest if sep else None, name)
        return {"inner": inner, **options}

    @classmethod
    def format_spec(cls, options: dict) -> str | None:
        inner = options.get("inner", "exact")
        spec = backend_class(inner).format_spec(options)
        return inner if spec is None else f"{inner}:{spec}"

    @classmethod
    def _inner_of(cls, options: dict) -> tuple[type[MemoryBackend], dict]:
        rest = {k: v for k, v in options.items() if k not in ("inner", "mode", "timeout")}
        return backend_class(options.get("inner", "exact")), rest

    @classmethod
    def default_top_k(cls, options: dict) -> int | None:
        inner, rest = cls._inner_of(options)
        return inner.default_top_k(rest)

    @classmethod
    def search_knobs(cls, options: dict, head_dim: int) -> tuple[str, ...]:
        inner, rest = cls._inner_of(options)
        return inner.search_knobs(rest, head_dim)

    @property
    def index(self) -> object:
        """The inner backend's index (e.g. ``"auto"``), or None for a backend without one."""
        return getattr(self.shard, "index", None)

    # ------------------------------------------------------------------ collectives for memory_attention
    def merge_max(self, t: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce_max(t.contiguous())

    def merge_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce_sum(t.contiguous())

    def set_search_params(self, **knobs: int | None) -> None:
        """The slice's search knobs (e.g. ``nprobe``), where its backend has them; every rank alike."""
        setter = getattr(self.shard, "set_search_params", None)
        if setter is None:
            raise ValueError(f"the {self.inner!r} backend of the slices has no search knobs")
        setter(**knobs)

    def nbytes_per_rank(self) -> list[int]:
        """Bytes held by each rank's slice, in rank order (a collective: every rank must call it)."""
        return [int(n) for n in self.group.all_gather_object(self.nbytes)]

    # ------------------------------------------------------------------ MemoryBackend
    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Append one window: it goes whole to the next rank in turn; every rank counts its entries."""
        mask = self._check_add(keys, values, mask)
        owner = len(self._windows) % self.world_size
        counts = (
            torch.full((self.batch_size,), keys.shape[2], dtype=torch.int64)
            if mask is None
            else mask.sum(dim=1).to("cpu", torch.int64)
        )
        if owner == self.rank:
            self.shard.add(keys, values, mask)
        self._total += counts
        self._windows.append((owner, counts))

    def search(self, queries: torch.Tensor, k: int | None = None, heads: slice | None = None) -> MemoryHits:
        """This rank's entries for each query (see the module); a collective in ``"global"`` mode."""
        k, heads = self._check_search(queries, k, heads)
        hits = self.shard.search(queries, k=k, heads=heads)
        if self.mode == "global" and not hits.dense and self.world_size > 1:
            hits = self._keep_global_top_k(hits)
        return hits

    def _keep_global_top_k(self, hits: MemoryHits) -> MemoryHits:
        """Keep the entries of ``hits`` among the k best of every rank's (the same choice on every rank)."""
        k = hits.scores.shape[-1]
        gathered = self.group.all_gather(hits.scores.contiguous())  # [w, B, h, q, k]
        everyone = gathered.permute(1, 2, 3, 0, 4).reshape(*hits.scores.shape[:-1], -1)  # rank-major
        best = everyone.topk(k, dim=-1).indices
        chosen = torch.zeros_like(everyone, dtype=torch.bool).scatter_(-1, best, True)
        mine = chosen[..., self.rank * k : (self.rank + 1) * k]
        scores = hits.scores.masked_fill(~mine, -math.inf)
        ids = hits.ids.masked_fill(~mine, -1)
        values = None if hits.values is None else hits.values.masked_fill(~mine.unsqueeze(-1), 0)
        return MemoryHits(scores=scores, ids=ids, values=values)

    def reset(self, rows: Sequence[int] | torch.Tensor | None = None) -> None:
        rows = self._check_rows(rows)
        self.shard.reset(rows)
        for r in rows:
            self._total[r] = 0
            for _, counts in self._windows:
                counts[r] = 0

    def reorder(self, rows: torch.Tensor) -> None:
        rows = self._check_reorder(rows)
        self.shard.reorder(rows)
        self._total = self._total[rows]
        self._windows = [(owner, counts[rows]) for owner, counts in self._windows]
        self.batch_size = len(rows)

    def truncate(self, lengths: int | torch.Tensor) -> None:
        """Keep the first ``lengths[b]`` real entries of each row over all ranks: each rank keeps those of its
        windows that come before that point (every rank knows every window's size)."""
        lengths = self._check_lengths(lengths)
        kept_windows = []
        mine = torch.zeros(self.batch_size, dtype=torch.int64)
        before = torch.zeros(self.batch_size, dtype=torch.int64)
        for owner, counts in self._windows:
            kept = torch.minimum(counts, (lengths - before).clamp_min(0))
            before = before + counts
            if owner == self.rank:
                mine += kept
            kept_windows.append((owner, kept))
        self.shard.truncate(mine)
        self._windows = kept_windows
        self._total = lengths.clone()

    def checkpoint(self) -> MemoryCheckpoint:
        """The slice's own checkpoint (which survives reorders), with the window bookkeeping."""
        windows = [(owner, counts.clone()) for owner, counts in self._windows]
        return MemoryCheckpoint(self, (self.shard.checkpoint(), self._total.clone(), windows))

    def rollback(self, checkpoint: MemoryCheckpoint) -> None:
        self._check_checkpoint(checkpoint)
        inner, total, windows = checkpoint.state
        self.shard.rollback(inner)
        self._total = total.clone()
        self._windows = [(owner, counts.clone()) for owner, counts in windows]
        self.batch_size = self.shard.batch_size

    @property
    def lengths(self) -> torch.Tensor:
        return self._total.clone()

    @property
    def nbytes(self) -> int:
        """Bytes held by this rank's slice (:meth:`nbytes_per_rank`: every rank's)."""
        return self.shard.nbytes

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        base = super().config()
        shard = {k: v for k, v in self.shard.config().items() if k not in base}
        return {
            **base,
            "inner": self.inner,
            "mode": self.mode,
            "timeout": self.group.timeout,
            **shard,
        }

    def state(self) -> dict:
        """This rank's state: its slice, and the bookkeeping every rank shares."""
        return {
            "config": self.config(),
            "rank": self.rank,
            "world_size": self.world_size,
            "shard": self.shard.state(),
            "total": self._total.clone(),
            "windows": [(owner, counts.clone()) for owner, counts in self._windows],
        }

    @classmethod
    def from_state(cls, state: dict, device: str | torch.device | None = None) -> ShardedBackend:
        """Rebuild this rank's part from its :meth:`state` (in a group of the same world size)."""
        config = dict(state["config"])
        new = cls(**config, device=device or "cpu")
        if state["world_size"] != new.world_size or state["rank"] != new.rank:
            raise ValueError(
                f"this state is rank {state['rank']} of a sharded memory over {state['world_size']} ranks; "
                f"this process is rank {new.rank} of {new.world_size}: load it with as many ranks "
                f"(torchrun --nproc-per-node {state['world_size']})"
            )
        shard = backend_class(new.inner).from_state(state["shard"], device=device or "cpu")
        if (shard.batch_size, shard.num_heads, shard.head_dim) != (
            new.batch_size,
            new.num_heads,
            new.head_dim,
        ):
            raise ValueError("saved slice does not have the geometry of its sharded memory's config")
        new.shard = shard
        new._total = state["total"].to(torch.int64).clone()
        new._windows = [(int(owner), counts.to(torch.int64).clone()) for owner, counts in state["windows"]]
        if len(new._total) != new.batch_size or any(len(c) != new.batch_size for _, c in new._windows):
            raise ValueError("saved window bookkeeping does not match the memory's batch size")
        return new

    def save(self, path: str | os.PathLike) -> None:
        """Write this memory to directory ``path``: every rank calls it with the same path, on a file system
        they share; each rank's state is one part (:func:`knn_memory.persistence.write_parts`)."""
        write_parts(
            path,
            {"state.pt": self.state},
            backend_meta(self),
            rank=self.rank,
            world_size=self.world_size,
            barrier=self.group.barrier,
        )
