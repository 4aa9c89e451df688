"""Focused Transformer crossbatch memory: which earlier windows each training row attends to.

A training batch holds D documents split into windows of W tokens, one row per window (doc-major).
In the memory layers, row ``(doc j, window w)`` attends, in one softmax, to its own causal local window
plus the whole (non-causal) windows listed in its sources, with those keys un-rotated (position 0) as
at inference:

* **positives**: earlier windows of the same document (what inference memory would hold), either all
  of them (the plain "previous windows through memory" mode) or only the last ``p``;
* **negatives**: ``n`` windows of other documents, which the model must learn to ignore (FoT).

A ``mix`` of ``(positives, negatives)`` pairs is cycled over documents, e.g. the paper's
``[(0, 0), (1, 1), (2, 1), (3, 0)]``; ``None`` positives means "all earlier windows".
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

import knn_memory


@dataclass
class CrossBatchPlan:
    """Memory sources of every training row.

    Attributes:
        sources: [R, S] int64 row indices whose whole window is memory for that row; -1 = no source.
        doc_of_row: [R] document index of each row.
        window_of_row: [R] window index of each row within its document.
    """

    sources: torch.Tensor
    doc_of_row: torch.Tensor
    window_of_row: torch.Tensor

    def memory(
        self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, mem_dtype: str | torch.dtype
    ) -> knn_memory.MemoryBackend:
        """A dense memory per row built from this layer's own keys and values of the batch.

        Args:
            keys: [R, H, W, d] un-rotated keys of every row; values: [R, H, W, d].
            mask: [R, W] bool, True for real tokens.

        Returns:
            an ``"exact"`` backend with batch R whose row r holds the windows ``sources[r]`` (gradients
            flow into them).
        """
        R, H, W, d = keys.shape
        S = self.sources.shape[1]
        src = self.sources.to(keys.device)
        take = src.clamp_min(0)
        mem_k = keys[take].permute(0, 2, 1, 3, 4).reshape(R, H, S * W, d)  # [R, H, S*W, d]
        mem_v = values[take].permute(0, 2, 1, 3, 4).reshape(R, H, S * W, d)
        entries = ((src >= 0)[:, :, None] & mask[take]).reshape(R, S * W)  # [R, S*W]
        mem = knn_memory.create_backend(
            "exact", num_heads=H, head_dim=d, batch_size=R, mem_dtype=mem_dtype, device=keys.device
        )
        if S:
            mem.add(mem_k, mem_v, entries)
        return mem


def make_plan(
    window_rows: list[tuple[int, int]],
    mix: list[tuple[int | None, int]],
    rng: random.Random,
) -> CrossBatchPlan:
    """Sources for rows ``window_rows`` [(doc, window), ...] following ``mix`` (cycled over documents)."""
    if not mix:
        raise ValueError("mix must hold at least one (positives, negatives) pair")
    for pos, neg in mix:
        if (pos is not None and (not isinstance(pos, int) or pos < 0)) or not isinstance(neg, int) or neg < 0:
            raise ValueError(
                f"mix entries must be (positives >= 0 or None, negatives >= 0), got {(pos, neg)!r}"
            )
    row_of = {dw: r for r, dw in enumerate(window_rows)}
    docs = sorted({j for j, _ in window_rows})
    all_sources = []
    for j, w in window_rows:
        pos, neg = mix[docs.index(j) % len(mix)]
        earlier = [row_of[(j, v)] for v in range(w) if (j, v) in row_of]
        if pos is not None:
            earlier = earlier[len(earlier) - pos :] if pos else []
        others = [r for r, (jj, _) in enumerate(window_rows) if jj != j]
        negatives = rng.sample(others, min(neg, len(others)))
        all_sources.append(earlier + negatives)
    width = max((len(s) for s in all_sources), default=0)
    sources = torch.full((len(window_rows), width), -1, dtype=torch.int64)
    for r, s in enumerate(all_sources):
        if s:
            sources[r, : len(s)] = torch.tensor(s)
    return CrossBatchPlan(
        sources=sources,
        doc_of_row=torch.tensor([j for j, _ in window_rows]),
        window_of_row=torch.tensor([w for _, w in window_rows]),
    )


def parse_mix(text: str) -> list[tuple[int | None, int]]:
    """``"all:0"``, ``"0:0,1:1,2:1,3:0"`` -> [(None, 0)], [(0, 0), (1, 1), (2, 1), (3, 0)]."""
    mix = []
    for part in text.split(","):
        try:
            p, n = part.strip().split(":")
            mix.append((None if p == "all" else int(p), int(n)))
        except ValueError:
            raise ValueError(
                f"mix must be comma-separated 'positives:negatives' pairs (positives may be 'all'), got {text!r}"
            ) from None
    return mix
