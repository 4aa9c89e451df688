"""`MemoryHits`: what a memory search returns for a block of queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    """

    scores: torch.Tensor
    ids: torch.Tensor
    values: torch.Tensor | None = None
    value_chunks: tuple[torch.Tensor, ...] | None = None

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

    def weighted_values(self, probs: torch.Tensor) -> torch.Tensor:
        """Sum of values weighted by ``probs`` [B, h, q, k] -> [B, h, q, d] (dtype of ``probs``)."""
        if self.value_chunks is None:
            assert self.values is not None
            # one batched [1, k] x [k, d] product per (b, h, q): 70-80 us for [1, 4, 64, 32] x 32 dims,
            # where the equivalent einsum took 200 us
            values = self.values.to(probs.device, probs.dtype)
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
