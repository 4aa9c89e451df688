"""The ``"faiss"`` backend: top-k memory entries per query through one Faiss index per (row, head).

Keys are rounded to ``mem_dtype`` and each is held once by the index layer (``indexes/``): in a
``mem_dtype`` store searched exactly, or in the codes of the Faiss index. A ``"Flat"`` index with
k >= memory size reproduces the exact backend. ``index="auto"`` grows an IVF index with the memory
(:mod:`indexes.growth`). Padding entries are never inserted. With several ``workers`` the adds and
searches of an ``"auto"`` index past its exact phase go to the compiled library in one call per row,
which splits the row's heads over that many threads (OpenMP threads of its own: a hand-off costs
microseconds); other indexes fan out over (row, head) on a thread pool with one Faiss OpenMP thread per
worker. With one worker they run in the calling thread, where Faiss and torch use all their threads. By
default a call uses several workers only when each (row, head) has at least :data:`FAN_OUT_MIN` queries
or keys: below that the pool's hand-offs cost more than they share. On this project's 2-core machine the
fastest setting for the embedded model is torch on one thread and ``workers=2`` (``longllama-passkey
--threads 1 --backend faiss:auto:workers=2``): torch's idle OpenMP threads spin on the second core and
slow the split down (``benchmarks/results/head_threads``). Values stay in ``mem_dtype`` in chunked per-row storage and only the k retrieved ones
are gathered per query.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from indexes import (
    AUTO,
    GrowthPolicy,
    KeyIndex,
    StreamingIndex,
    add_many,
    all_compiled,
    check_key_index,
    fan_out,
    index_class,
    index_kind,
    parse_device,
    parse_spec,
    search_many,
)
from knn_memory.backend import MemoryBackend, MemoryCheckpoint
from knn_memory.hits import MemoryHits
from knn_memory.locking import lock_of
from knn_memory.registry import register_backend
from knn_memory.storage import ChunkedTensor, RetrievedValues, compact, stack_rows
from knn_memory.validate import INT64_MAX, MAX_COUNT, check_int, check_optional_int, check_tensor_fits

DEFAULT_TOP_K = 128
VALUE_CHUNK_BYTES = 256 * 2**20  # the largest value chunk of a row (chunks double up to it)
FIRST_VALUE_CHUNK = 16384
POLICY_OPTIONS = tuple(n for n in GrowthPolicy.option_names() if n != "nprobe")
# Queries (search) or keys (add) per (row, head) from which the default fan-out runs. Measured with 2
# threads (benchmarks/results/passkey_threads): the embedded model (4 heads, 64-token windows) runs a
# 64k-token passkey prompt in 16.5-16.8 s without the fan-out and 23.5-29.3 s with it (19.8 s on one
# thread), 1M tokens in 418 s without and 492 s with; 32 heads x 512 queries of the "auto" index at 64k
# keys search in 4.5 s fanned out and 9.0 s not.
FAN_OUT_MIN = 256


@register_backend("faiss")
class FaissBackend(MemoryBackend):
    """Top-k memory through Faiss.

    Args (beyond :class:`MemoryBackend`'s):
        index: Faiss ``index_factory`` string, inner product (default ``"Flat"``: exact top-k), or
            ``"auto"``: exact while small, then an IVF whose list count grows with the memory, or an
            empty index object satisfying :class:`indexes.KeyIndex`, which every (row, head) clones
            (the string options below then do not apply).
        nprobe, efSearch: search-time knobs where the index has them.
        min_train_points, retrain_factor, train_sample: the streaming training policy
            (see :mod:`indexes.streaming`).
        exact_until, lists_per_sqrt, regrow_factor, train_per_list, max_train_sample, niter,
            min_lists, max_lists: the ``"auto"`` policy (:class:`indexes.GrowthPolicy`); only with
            ``index="auto"``.
        workers: threads for the (row, head) work of one call: the heads of a compiled call split
            over them, or the (row, head) fan-out (default: torch's thread count for calls of at least
            ``FAN_OUT_MIN`` queries or keys per (row, head), else 1).
        seed: RNG seed of training samples.
        value_device: where the values live: ``None`` (default) next to the keys on ``device``, or
            ``"cpu"`` to keep them in host memory while a GPU index holds the keys; only the k
            retrieved values per query then cross to ``device``.
    """

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        batch_size: int = 1,
        mem_dtype: str | torch.dtype = "bfloat16",
        device: str | torch.device = "cpu",
        top_k: int | None = None,
        index: str | KeyIndex | None = None,
        nprobe: int | None = None,
        efSearch: int | None = None,
        min_train_points: int | None = None,
        retrain_factor: float | None = 4.0,
        train_sample: int | None = None,
        workers: int | None = None,
        seed: int = 0,
        value_device: str | torch.device | None = None,
        **policy_options,
    ) -> None:
        super().__init__(
            num_heads=num_heads,
            head_dim=head_dim,
            batch_size=batch_size,
            mem_dtype=mem_dtype,
            device=device,
            top_k=DEFAULT_TOP_K if top_k is None else top_k,
        )
        index = "Flat" if index is None else index
        self._template: KeyIndex | None = None
        if not isinstance(index, str):
            self._template = check_key_index(index, "index")
            if self._template.dim != self.head_dim:
                raise ValueError(
                    f"index holds keys of dim {self._template.dim}, but head_dim={self.head_dim}"
                )
            given = {
                "nprobe": nprobe,
                "efSearch": efSearch,
                "min_train_points": min_train_points,
                "train_sample": train_sample,
                **policy_options,
            }
            given = {k: v for k, v in given.items() if v is not None}
            if retrain_factor != 4.0:
                given["retrain_factor"] = retrain_factor
            if given:
                raise ValueError(
                    f"{sorted(given)} configure an index string, not an index object ({index!r})"
                )
            index = None
        unknown = sorted(set(policy_options) - set(POLICY_OPTIONS))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown} for the 'faiss' backend")
        if policy_options and index != AUTO:
            raise ValueError(f"{sorted(policy_options)} configure index='auto' only, but index={index!r}")
        if index is None:
            self.policy = None
            self.index_spec = None
        elif index == AUTO:
            for name, given in (("min_train_points", min_train_points), ("train_sample", train_sample)):
                if given is not None:
                    raise ValueError(f"{name}={given!r} does not apply to index='auto' (its policy decides)")
            self.policy: GrowthPolicy | None = GrowthPolicy(**policy_options)
            self.index_spec = None
        else:
            self.policy = None
            self.index_spec = parse_spec(index, self.head_dim)
        self.workers = check_optional_int(workers, "workers", 1, MAX_COUNT)
        check_int(seed, "seed", 0, INT64_MAX)
        self.value_device = self.device if value_device is None else parse_device(value_device)
        if self.value_device not in (self.device, torch.device("cpu")):
            raise ValueError(
                f"value_device must be None, 'cpu' or the memory's device ({self.device}), got {value_device!r}"
            )
        self.index_options = {
            "nprobe": nprobe,
            "efSearch": efSearch,
            "min_train_points": min_train_points,
            "retrain_factor": retrain_factor,
            "train_sample": train_sample,
            "seed": seed,
        }
        # Validate the options once, on a throw-away index, before any row is built.
        self._new_index()
        self._rows: list[list[StreamingIndex]] = [self._new_row() for _ in range(self.batch_size)]
        self._values: list[ChunkedTensor] = [self._new_values() for _ in range(self.batch_size)]

    # ------------------------------------------------------------------ what the class declares
    FREE_OPTIONS = ("batch_size", "workers")

    @classmethod
    def spec_grammar(cls) -> str:
        return "faiss[:<Faiss index_factory string> | :auto]"

    @classmethod
    def parse_spec(cls, spec: str | None, name: str = "--backend") -> dict:
        """``"IVF1024,Flat"`` / ``"auto"`` -> ``{"index": ...}`` (nothing: ``"Flat"``)."""
        return {} if spec is None else {"index": spec.strip()}

    @classmethod
    def format_spec(cls, options: dict) -> str | None:
        index = options.get("index")
        return index if isinstance(index, str) else "Flat" if index is None else None

    @classmethod
    def default_top_k(cls, options: dict) -> int | None:
        return DEFAULT_TOP_K

    @classmethod
    def search_knobs(cls, options: dict, head_dim: int) -> tuple[str, ...]:
        index = options.get("index")
        if index is None or isinstance(index, str):
            return search_knobs(index or "Flat", head_dim)
        return ()

    def _new_index(self) -> KeyIndex:
        if self._template is not None:
            return self._template.clone()
        if self.policy is not None:
            options = {k: v for k, v in self.index_options.items() if k in ("nprobe", "efSearch", "seed")}
            return StreamingIndex(
                self.head_dim,
                AUTO,
                device=self.device,
                store_dtype=self.mem_dtype,
                policy=self.policy,
                **options,
            )
        return StreamingIndex(
            self.head_dim,
            self.index_spec,
            device=self.device,
            store_dtype=self.mem_dtype,
            **self.index_options,
        )

    def _new_row(self) -> list[StreamingIndex]:
        return [self._new_index() for _ in range(self.num_heads)]

    def _new_values(self) -> ChunkedTensor:
        entry = self.num_heads * self.head_dim * torch.empty((), dtype=self.mem_dtype).element_size()
        chunk = max(FIRST_VALUE_CHUNK, VALUE_CHUNK_BYTES // entry)
        return ChunkedTensor(
            (self.num_heads,), self.head_dim, self.mem_dtype, self.value_device, chunk, FIRST_VALUE_CHUNK
        )

    @property
    def index(self) -> str:
        """The Faiss factory string, ``"auto"``, or ``"<kind>"`` for an index object of a registered kind."""
        if self._template is not None:
            return f"<{getattr(type(self._template), 'index_kind', type(self._template).__name__)}>"
        return AUTO if self.policy is not None else self.index_spec.spec

    def _workers(self, per_head: int) -> int:
        """Fan-out width for a call with ``per_head`` queries or keys per (row, head)."""
        if self.workers is not None:
            return self.workers
        return torch.get_num_threads() if per_head >= FAN_OUT_MIN else 1

    def head_index(self, row: int, head: int) -> KeyIndex:
        """The index of one (row, head): for inspection and benchmarks."""
        return self._rows[row][head]

    def set_search_params(self, *, nprobe: int | None = None, efSearch: int | None = None) -> None:
        """Change ``nprobe`` / ``efSearch`` of every (row, head) index now and of those built later.

        No rebuild or retraining; ``None`` leaves a knob as it is. ``ValueError`` for a knob the index has
        no use for (e.g. ``nprobe`` on ``"HNSW32"``) or a value that is not a positive int, before anything
        changes.
        """
        knobs = {"nprobe": nprobe, "efSearch": efSearch}
        if self._template is not None:
            if not hasattr(self._template, "set_search_params"):
                raise ValueError(f"index {self.index} has no search knobs (no set_search_params)")
            self._template.set_search_params(**knobs)  # the index object checks its own knobs
            for row in self._rows:
                for ix in row:
                    ix.set_search_params(**knobs)
            return
        options = {**self.index_options, **{k: v for k, v in knobs.items() if v is not None}}
        saved, self.index_options = self.index_options, options
        try:
            self._new_index()  # validates; raises before any change
        finally:
            self.index_options = saved
        for row in self._rows:
            for ix in row:
                ix.set_search_params(**knobs)
        self.index_options = options

    # ------------------------------------------------------------------ MemoryBackend
    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        mask = self._check_add(keys, values, mask)
        # Round to the storage dtype first, so that every backend indexes the very same keys.
        keys = keys.detach().to(self.mem_dtype).to(torch.float32)
        values = values.detach()
        rows = []  # (the row's indexes, its keys [H, n, d])
        for b in range(self.batch_size):
            kb, vb = keys[b], values[b]  # [H, n, d]
            if mask is not None and not bool(mask[b].all()):
                row_mask = mask[b]
                kb, vb = kb[:, row_mask], vb[:, row_mask]
            if kb.shape[1] == 0:
                continue
            self._values[b].append(vb)
            rows.append((self._rows[b], kb.contiguous()))
        workers = self._workers(keys.shape[2])
        if workers <= 1 or all(all_compiled(indexes) for indexes, _ in rows):
            for indexes, kb in rows:  # one call per row: compiled indexes take all its heads at once
                add_many(indexes, kb, workers)
        else:
            jobs = [(ix, kb[h]) for indexes, kb in rows for h, ix in enumerate(indexes)]
            fan_out(lambda job: job[0].add_checked(job[1]), jobs, workers)

    def search(self, queries: torch.Tensor, k: int | None = None, heads: slice | None = None) -> MemoryHits:
        hits = self.search_for_attention(queries, k, heads)
        hits.gathered_values()
        return hits

    def search_for_attention(
        self, queries: torch.Tensor, k: int | None = None, heads: slice | None = None
    ) -> MemoryHits:
        k, heads = self._check_search(queries, k, heads)
        B, h, q, _ = queries.shape
        q32 = queries.detach().to(torch.float32)
        workers = self._workers(q)
        if workers <= 1 or all(all_compiled(row[heads]) for row in self._rows):
            # one call per row: compiled indexes search all its heads at once
            found = [search_many(self._rows[b][heads], q32[b].contiguous(), k, workers) for b in range(B)]
            scores, ids = stack_rows([s for s, _ in found]), stack_rows([i for _, i in found])  # [B, h, q, k]
        else:
            pairs = [(b, j) for b in range(B) for j in range(h)]
            results = fan_out(
                lambda p: self._rows[p[0]][heads.start + p[1]].search_checked(
                    q32[p[0], p[1]].contiguous(), k
                ),
                pairs,
                workers,
            )
            scores = torch.stack([s for s, _ in results]).reshape(B, h, q, k)
            ids = torch.stack([i for _, i in results]).reshape(B, h, q, k)
        retrieved = RetrievedValues(
            [[v[heads] for v in self._values[b].views()] for b in range(B)],
            ids.to(self.value_device),
            self.head_dim,
            self.mem_dtype,
            self.device,
            lock_of(self),
        )
        return MemoryHits(scores=scores, ids=ids, retrieved=retrieved)

    def reset(self, rows: Sequence[int] | torch.Tensor | None = None) -> None:
        for r in self._check_rows(rows):
            self._rows[r] = self._new_row()
            self._values[r] = self._new_values()

    def reorder(self, rows: torch.Tensor) -> None:
        rows = self._check_reorder(rows)
        seen: set[int] = set()
        indexes, values = [], []
        for r in rows.tolist():
            if r in seen:  # a duplicated beam gets its own copy, never a shared mutable index
                indexes.append([ix.clone() for ix in self._rows[r]])
                values.append(self._values[r].clone())
            else:
                indexes.append(self._rows[r])
                values.append(self._values[r])
                seen.add(r)
        self._rows, self._values = indexes, values
        self.batch_size = len(rows)

    def truncate(self, lengths: int | torch.Tensor) -> None:
        """Forget every entry after the first ``lengths[b]`` of row b (see the interface), in place.

        Each head's index drops its keys past ``lengths[b]`` (:meth:`indexes.StreamingIndex.truncate`:
        a trained index keeps its training) and the row's values their tail; nothing is copied.
        ``ValueError`` before any change where an index cannot remove keys (HNSW, a GPU index).
        """
        lengths = self._check_lengths(lengths).tolist()
        for b, n in enumerate(lengths):
            for ix in self._rows[b]:
                if n < ix.ntotal and not _can_truncate(ix):
                    raise ValueError(
                        f"index {self.index!r} on {self.device} cannot remove keys, so this memory cannot be "
                        f"truncated (row {b}: {ix.ntotal} -> {n} entries); use checkpoint()/rollback(), "
                        f"which keep a copy of such indexes"
                    )
        for b, n in enumerate(lengths):
            for ix in self._rows[b]:
                ix.truncate(n)
            self._values[b].truncate(n)

    def checkpoint(self) -> MemoryCheckpoint:
        """Marks of every (row, head) index and of the values (see the interface).

        An index that can remove keys is marked (:meth:`indexes.StreamingIndex.mark`: references, the
        ``"auto"`` index's small list bounds), so a rollback removes what was added since, and puts a
        marked index back if a rebuild replaced it. An index that cannot (HNSW, GPU) is cloned here
        once, and each rollback installs a copy of that clone: the one copy per question that such an
        index costs. The row lists are recorded too, so a rollback also undoes a reorder (beam search).
        """
        rows = tuple(
            tuple((ix, ix.mark()) if _can_truncate(ix) else (None, ix.clone()) for ix in row)
            for row in self._rows
        )
        values = tuple((v, v.mark()) for v in self._values)
        return MemoryCheckpoint(self, (rows, values))

    def rollback(self, checkpoint: MemoryCheckpoint) -> None:
        self._check_checkpoint(checkpoint)
        rows, values = checkpoint.state
        knobs = {
            k: self.index_options[k] for k in ("nprobe", "efSearch") if self.index_options[k] is not None
        }
        new_rows = []
        for row in rows:
            new_row = []
            for ix, saved in row:
                if ix is None:  # an index that cannot remove keys: a fresh copy of the saved clone
                    ix = saved.clone()
                    if knobs and self._template is None:
                        ix.set_search_params(**knobs)
                else:
                    ix.rollback(saved)
                new_row.append(ix)
            new_rows.append(new_row)
        for v, mark in values:
            v.restore(mark)
        self._rows = new_rows
        self._values = [v for v, _ in values]
        self.batch_size = len(new_rows)

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([row[0].ntotal for row in self._rows], dtype=torch.int64)

    @property
    def nbytes(self) -> int:
        keys = sum(ix.nbytes for row in self._rows for ix in row)
        return keys + sum(v.nbytes for v in self._values)

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        pinned = None if self.value_device == self.device else str(self.value_device)
        options = dict(self.index_options)
        if self._template is not None:
            options = {"seed": options["seed"]}
        elif self.policy is not None:
            options = {k: v for k, v in options.items() if k in ("nprobe", "efSearch", "seed")}
            options.update({k: v for k, v in self.policy.to_dict().items() if k != "nprobe"})
        return {
            **super().config(),
            "index": self.index,
            **options,
            "workers": self.workers,
            "value_device": pinned,
        }

    def state(self) -> dict:
        state = {
            "config": self.config(),
            "rows": [[ix.state() for ix in row] for row in self._rows],
            "values": [compact(v.full().cpu()) for v in self._values],
        }
        if self._template is not None:
            state["index_kind"] = index_kind(self._template)
            state["template"] = self._template.state()
        return state

    @classmethod
    def from_state(cls, state: dict, device: str | torch.device | None = None) -> FaissBackend:
        config = dict(state["config"])
        index_cls = StreamingIndex
        if "template" in state:
            index_cls = index_class(state["index_kind"])
            config["index"] = index_cls.from_state(state["template"], device=device or "cpu")
        new = cls(**config, device=device or "cpu")
        rows, values = state["rows"], state["values"]
        if len(rows) != new.batch_size or len(values) != new.batch_size:
            raise ValueError(
                f"saved memory has {len(rows)} rows of keys and {len(values)} of values, "
                f"its config says batch_size={new.batch_size}"
            )
        for b in range(new.batch_size):
            if len(rows[b]) != new.num_heads:
                raise ValueError(f"saved row {b} has {len(rows[b])} heads, expected {new.num_heads}")
            new._rows[b] = [index_cls.from_state(s, device=new.device) for s in rows[b]]
            n = new._rows[b][0].ntotal
            if any(ix.ntotal != n for ix in new._rows[b]):
                raise ValueError(f"saved row {b}: heads hold different numbers of keys")
            v = values[b]
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                raise ValueError(f"saved values of row {b} must be a floating-point tensor")
            check_tensor_fits(v, f"saved values of row {b}", new.mem_dtype)
            if tuple(v.shape) != (new.num_heads, n, new.head_dim):
                raise ValueError(
                    f"saved values of row {b} have shape {list(v.shape)}, expected {[new.num_heads, n, new.head_dim]}"
                )
            new._values[b].append(v.to(new.value_device, new.mem_dtype))
        return new


def _can_truncate(index: KeyIndex) -> bool:
    return bool(getattr(index, "can_truncate", False))


def search_knobs(index: str, head_dim: int) -> tuple[str, ...]:
    """Search-time knobs (``nprobe``, ``efSearch``) that the Faiss ``index`` string (or ``"auto"``) accepts."""
    if index == AUTO:
        return ("nprobe",)
    return parse_spec(index, head_dim).search_params
