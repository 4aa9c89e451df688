"""The ``"exact"`` backend: dense attention over every memory entry, as upstream LongLLaMA does.

It is the reference the approximate backends are measured against. Keys and values are stored in
``mem_dtype`` (bf16 by default, as upstream) in chunked storage; scores are computed in the query's
dtype exactly as upstream's ``matmul(q, k_mem^T)``. With ``top_k`` set it returns the exact top-k
entries instead (torch ``topk``), a reference for any top-k backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from indexes import pad_to_k
from knn_memory.backend import MemoryBackend, MemoryCheckpoint
from knn_memory.hits import MemoryHits
from knn_memory.registry import register_backend
from knn_memory.storage import ChunkedTensor, compact, gather_values, stack_rows
from knn_memory.validate import INT64_MAX, check_int, check_tensor_fits

DEFAULT_CHUNK = 4096


@register_backend("exact")
class ExactBackend(MemoryBackend):
    """Dense memory: every query scores every entry of its row and head.

    Rows stay aligned (every add appends ``n`` entries to every row); padding entries are stored but
    flagged, and get a ``-inf`` score, which is what upstream's additive ``finfo.min`` mask becomes
    after its ``-1e6`` clamp and the softmax.
    """

    FREE_OPTIONS = ("batch_size", "chunk_size")

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        batch_size: int = 1,
        mem_dtype: str | torch.dtype = "bfloat16",
        device: str | torch.device = "cpu",
        top_k: int | None = None,
        index: str | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        super().__init__(
            num_heads=num_heads,
            head_dim=head_dim,
            batch_size=batch_size,
            mem_dtype=mem_dtype,
            device=device,
            top_k=top_k,
        )
        if index is not None:
            raise ValueError(f"index={index!r}: the 'exact' backend is dense and takes no Faiss index")
        check_int(chunk_size, "chunk_size", 1, INT64_MAX)
        self.chunk_size = chunk_size
        self._new_storage()

    def _new_storage(self) -> None:
        lead = (self.batch_size, self.num_heads)
        self._keys = ChunkedTensor(lead, self.head_dim, self.mem_dtype, self.device, self.chunk_size)
        self._values = ChunkedTensor(lead, self.head_dim, self.mem_dtype, self.device, self.chunk_size)
        self._mask = ChunkedTensor((self.batch_size,), 1, torch.bool, self.device, self.chunk_size)

    # ------------------------------------------------------------------ MemoryBackend
    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        mask = self._check_add(keys, values, mask)
        n = keys.shape[2]
        if mask is None:
            mask = torch.ones(self.batch_size, n, dtype=torch.bool, device=self.device)
        self._keys.append(keys)
        self._values.append(values)
        self._mask.append(mask.unsqueeze(-1))

    @property
    def entries(self) -> int:
        """Entries per row, padding included (rows are aligned)."""
        return self._keys.length

    def entry_mask(self) -> torch.Tensor:
        """[B, M] bool: True for real entries."""
        return self._mask.full().squeeze(-1)

    def search(self, queries: torch.Tensor, k: int | None = None, heads: slice | None = None) -> MemoryHits:
        k, heads = self._check_search(queries, k, heads)
        B, h, q, _ = queries.shape
        M = self.entries
        mask = self.entry_mask()  # [B, M]
        key_views = [v[:, heads] for v in self._keys.views()]
        value_views = [v[:, heads] for v in self._values.views()]
        if not value_views:  # empty memory: one empty chunk keeps d, so weighted values are [B, h, q, d]
            value_views = [torch.empty(B, h, 0, self.head_dim, dtype=self.mem_dtype, device=self.device)]
        if len(key_views) <= 1 or (torch.is_grad_enabled() and queries.requires_grad):
            parts = [torch.matmul(queries, kv.to(queries.dtype).transpose(-1, -2)) for kv in key_views]
            if not parts:
                scores = queries.new_zeros(B, h, q, 0).float()
            else:
                scores = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).float()
        else:
            scores = torch.empty(B, h, q, M, dtype=torch.float32, device=self.device)
            start = 0
            for kv in key_views:
                stop = start + kv.shape[-2]
                scores[..., start:stop] = torch.matmul(queries, kv.to(queries.dtype).transpose(-1, -2))
                start = stop
        pad = ~mask[:, None, None, :]
        if scores.requires_grad:
            scores = scores.masked_fill(pad, float("-inf"))
        else:  # scores [B, h, q, M] is ours: no second copy of the largest tensor of a dense search
            scores.masked_fill_(pad, float("-inf"))
        # ids count real entries only (the i-th real entry of a row has id i), as in every backend
        entry_ids = torch.where(mask, mask.cumsum(dim=-1) - 1, -1)  # [B, M]
        if k is None:
            ids = entry_ids[:, None, None, :].expand(B, h, q, M)
            return MemoryHits(scores=scores, ids=ids, value_chunks=tuple(value_views))
        top_scores, pos = torch.topk(scores, min(k, M), dim=-1)
        top_scores, pos = pad_to_k(top_scores, torch.where(torch.isfinite(top_scores), pos, -1), k)
        values = stack_rows(
            [
                gather_values([v[b] for v in value_views], pos[b], self.head_dim, self.mem_dtype)
                for b in range(B)
            ]
        )
        # empty slots (pos -1) read a trailing -1 column, which also covers an empty memory (M == 0)
        slot_ids = torch.nn.functional.pad(entry_ids, (0, 1), value=-1)[:, None, None, :].expand(
            B, h, q, M + 1
        )
        ids = torch.gather(slot_ids, -1, torch.where(pos >= 0, pos, M))
        return MemoryHits(scores=top_scores, ids=ids, values=values)

    def reset(self, rows: Sequence[int] | torch.Tensor | None = None) -> None:
        if rows is None:
            self._new_storage()
            return
        reset_rows = torch.tensor(self._check_rows(rows), dtype=torch.int64, device=self.device)
        # new flag tensors (bools, small) rather than writes into the old ones, which checkpoints hold
        self._mask.chunks = [chunk.index_fill(0, reset_rows, False) for chunk in self._mask.chunks]
        # rows are aligned: entries past the last real entry of every row are dropped (all of them when
        # no row keeps any), so resetting the longest rows frees their storage
        mask = self.entry_mask()
        used = mask.any(dim=0).nonzero()
        cut = int(used[-1]) + 1 if used.numel() else 0
        if cut == 0:
            self._new_storage()
        elif cut < self.entries:
            for store in (self._keys, self._values, self._mask):
                store.truncate(cut)

    def reorder(self, rows: torch.Tensor) -> None:
        rows = self._check_reorder(rows)
        for store in (self._keys, self._values, self._mask):
            store.index_select_lead(rows)
        self.batch_size = len(rows)

    def truncate(self, lengths: int | torch.Tensor) -> None:
        """Forget every entry after the first ``lengths[b]`` real entries of row b (see the interface).

        Rows are aligned, so all of them are cut at the same entry: the end of the row that keeps the
        most entries (padding counted). Real entries of other rows before that cut and after their
        own ``lengths[b]`` are flagged as padding; no row keeps an entry it was asked to forget.
        Nothing is copied but those flags, and only when some row needs them.
        """
        lengths = self._check_lengths(lengths).to(self.device)
        mask = self.entry_mask()  # [B, M]
        if torch.equal(lengths, mask.sum(dim=-1)):
            return
        # the shortest prefix of each row holding lengths[b] real entries
        ends = (mask.cumsum(dim=-1) < lengths[:, None]).sum(dim=-1) + (lengths > 0).to(torch.int64)
        cut = int(ends.max()) if ends.numel() else 0
        if cut == self.entries:
            return
        for store in (self._keys, self._values, self._mask):
            store.truncate(cut)
        forget = mask[:, :cut] & (torch.arange(cut, device=self.device)[None, :] >= ends[:, None])
        if bool(forget.any()):
            flags = (mask[:, :cut] & ~forget).unsqueeze(-1)
            self._mask = ChunkedTensor((self.batch_size,), 1, torch.bool, self.device, self.chunk_size)
            self._mask.append(flags)

    def checkpoint(self) -> MemoryCheckpoint:
        """References to the stored chunks and their fills (no copy; see the interface).

        Entries are only ever appended after the fills, reordering makes new chunks and ``reset``
        new storage or new flags, so the chunks referenced keep the entries of the checkpoint.
        """
        marks = tuple(store.mark() for store in (self._keys, self._values, self._mask))
        return MemoryCheckpoint(self, (self.batch_size, marks))

    def rollback(self, checkpoint: MemoryCheckpoint) -> None:
        self._check_checkpoint(checkpoint)
        batch_size, marks = checkpoint.state
        for store, mark in zip((self._keys, self._values, self._mask), marks, strict=True):
            store.restore(mark)
        self.batch_size = batch_size

    @property
    def lengths(self) -> torch.Tensor:
        return self.entry_mask().sum(dim=-1).to(torch.int64)

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._values.nbytes + self._mask.nbytes

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All stored entries: keys [B, H, M, d], values [B, H, M, d] (mem_dtype), mask [B, M] bool."""
        return self._keys.full(), self._values.full(), self.entry_mask()

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict:
        keys, values, mask = self.keys_values()
        return {
            "config": {**self.config(), "chunk_size": self.chunk_size},
            "keys": compact(keys.cpu()),
            "values": compact(values.cpu()),
            "valid": compact(mask.cpu()),
        }

    @classmethod
    def from_state(cls, state: dict, device: str | torch.device | None = None) -> ExactBackend:
        cfg = dict(state["config"])
        new = cls(**cfg, device=device or "cpu")
        keys, values, mask = state["keys"], state["values"], state["valid"]
        want = (new.batch_size, new.num_heads, keys.shape[2], new.head_dim)
        for name, t in (("keys", keys), ("values", values)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"saved {name} must be a floating-point tensor")
            if tuple(t.shape) != want:
                raise ValueError(f"saved {name} have shape {list(t.shape)}, expected {list(want)}")
            check_tensor_fits(t, f"saved {name}", new.mem_dtype)
        if tuple(mask.shape) != (new.batch_size, keys.shape[2]) or mask.dtype != torch.bool:
            raise ValueError(f"saved valid mask has shape {list(mask.shape)} / {mask.dtype}")
        if keys.shape[2]:
            new._keys.append(keys.to(new.device, new.mem_dtype))
            new._values.append(values.to(new.device, new.mem_dtype))
            new._mask.append(mask.to(new.device).unsqueeze(-1))
        return new
