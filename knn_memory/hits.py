"""`MemoryHits`: what a memory search returns for a block of queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from knn_memory.storage import RetrievedValues


@dataclass
class MemoryHits:
    """Memory entries retrieved for each query, in one of two forms that share one attention path.

    Top-k form (``value_chunks is None``):
        scores: [B, h, q, k] float32 raw q·k (no 1/sqrt(d)); ``-inf`` for empty or masked slots.
        values: [B, h, q, k, d] the retrieved values (zeros in empty slots), memory dtype.
        ids:    [B, h, q, k] int64 entry ids within the row's memory; ``-1`` for empty slots.

    Dense form (``value_chunks`` given; the exact backend): every query sees every entry, so the values
    are shared across queries and never materialised as [q, M, d]:
        scores: [B, h, q, M] float32 raw q·k, ``-inf`` where the entry is padding.
        value_chunks: tuple of [B, h, m_i, d] tensors, sum(m_i) == M, in entry order.
        ids:    [B, h, q, M] int64 (a broadcast view), ``-1`` for padding entries.
        values: ``None``.

    Top-k form with the values left in the memory (``retrieved`` given;
    :meth:`MemoryBackend.search_for_attention` of the ``"faiss"`` backend): as the top-k form, but
    ``values`` is ``None`` until :meth:`gathered_values` gathers it, and :meth:`weighted_values`
    reads the values where they are stored (float32 weights on the CPU) instead of gathering them.
    """

    scores: torch.Tensor
    ids: torch.Tensor
    values: torch.Tensor | None = None
    value_chunks: tuple[torch.Tensor, ...] | None = None
    retrieved: RetrievedValues | None = None

    @property
    def dense(self) -> bool:
        """True for the dense form (values shared across queries)."""
        return self.value_chunks is not None

    def take_scores(self) -> torch.Tensor:
        """Hand the scores over to the caller, who may then free them: these hits keep an empty
        [B, h, q, 0] tensor (not a view, which would keep the storage alive); values and ids stay."""
        scores = self.scores
        self.scores = scores.new_empty(*scores.shape[:-1], 0)
        return scores

    @property
    def k(self) -> int:
        """Slots per query (k, or M for the dense form)."""
        return self.scores.shape[-1]

    def gathered_values(self) -> torch.Tensor | None:
        """The top-k values [B, h, q, k, d] (gathered now if the memory still holds them); None for the
        dense form."""
        if self.values is None and self.retrieved is not None:
            self.values = self.retrieved.gather()
        return self.values

    def weighted_values(self, probs: torch.Tensor) -> torch.Tensor:
        """Sum of values weighted by ``probs`` [B, h, q, k] -> [B, h, q, d] (dtype of ``probs``)."""
        if self.value_chunks is None:
            if self.values is None and self.retrieved is not None and not probs.requires_grad:
                # read in place: [1, 4, 64, 32] hits of 32 dims from a 100k-entry memory in ~60 us,
                # where the gather, the cast to float32 and the product below took ~145 us
                out = self.retrieved.weighted(probs)
                if out is not None:
                    return out
            values = self.gathered_values()
            assert values is not None
            # one batched [1, k] x [k, d] product per (b, h, q): 70-80 us for [1, 4, 64, 32] x 32 dims,
            # where the equivalent einsum took 200 us
            values = values.to(probs.device, probs.dtype)
            return torch.matmul(probs.unsqueeze(-2), values).squeeze(-2)
        out = None
        start = 0
        for chunk in self.value_chunks:
            stop = start + chunk.shape[-2]
            part = torch.matmul(probs[..., start:stop], chunk.to(probs.device, probs.dtype))
            out = part if out is None else out + part
            start = stop
        if out is None:
            return probs.new_zeros(*probs.shape[:-1], 0)
        return out
