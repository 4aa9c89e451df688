"""How closely a memory backend agrees with the exact dense one on the same keys, values and queries.

Per head, over all queries:

* **recall@k**: share of the exact top-k entries that the backend retrieved (mean, and the 1st
  percentile over queries, i.e. the worst 1%);
* **tie-aware recall@k**: share of the k slots that hold an entry scoring at least the exact k-th
  score: equal keys (a repeated text gives many) make the exact top-k ids one arbitrary choice among
  equals, which plain recall counts as misses;
* **attention-mass recall**: share of the exact memory softmax mass (over all entries) held by the
  retrieved entries: what matters for the attention output, where recall@k weighs every key alike;
* **relative L2 error** of the memory attention output against the dense output.

Memory-only attention is used (no local keys), through the project's one softmax.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from knn_memory.attention import memory_attention
from knn_memory.backend import MemoryBackend
from knn_memory.backends.exact import ExactBackend
from knn_memory.registry import create_backend


@dataclass
class AgreementReport:
    """Agreement of one backend with the exact dense memory; every list has one entry per head."""

    k: int
    recall_mean: list[float]
    recall_p01: list[float]
    mass_recall_mean: list[float]
    mass_recall_p01: list[float]
    rel_l2_error: list[float]
    tie_recall_mean: list[float] | None = None

    def summary(self) -> dict[str, float]:
        """Means over heads of the means, and worst head for the p01 figures and the error."""
        return {
            "k": self.k,
            "recall_mean": float(sum(self.recall_mean) / len(self.recall_mean)),
            "recall_p01_worst_head": float(min(self.recall_p01)),
            "mass_recall_mean": float(sum(self.mass_recall_mean) / len(self.mass_recall_mean)),
            "mass_recall_p01_worst_head": float(min(self.mass_recall_p01)),
            "rel_l2_error_mean": float(sum(self.rel_l2_error) / len(self.rel_l2_error)),
            "rel_l2_error_worst_head": float(max(self.rel_l2_error)),
            "tie_recall_mean": None
            if self.tie_recall_mean is None
            else float(sum(self.tie_recall_mean) / len(self.tie_recall_mean)),
        }

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


def _per_head(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """x [B, H, q] -> per-head mean and 1st percentile over (B, q)."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    return flat.mean(dim=1).tolist(), torch.quantile(flat, 0.01, dim=1).tolist()


@torch.no_grad()
def compare_backends(
    candidate: MemoryBackend, reference: ExactBackend, queries: torch.Tensor, k: int | None = None
) -> AgreementReport:
    """Compare ``candidate`` with the dense ``reference`` holding the same entries.

    Args:
        candidate: any backend (top-k or dense).
        reference: an ``"exact"`` backend with ``top_k=None`` holding the same entries.
        queries: [B, H, q, d].
        k: entries per query for the candidate (default: its ``top_k``).
    """
    if not isinstance(reference, ExactBackend) or reference.top_k is not None:
        raise TypeError("reference must be a dense 'exact' backend (top_k=None)")
    if candidate.lengths.tolist() != reference.lengths.tolist():
        raise ValueError(
            f"candidate and reference hold different entries per row: "
            f"{candidate.lengths.tolist()} vs {reference.lengths.tolist()}"
        )
    if reference.is_empty:
        raise ValueError("the memories are empty: nothing to compare")
    q32 = queries.to(torch.float32)
    B, H, q, d = q32.shape
    hits = candidate.search(q32, k=k)
    kk = hits.k
    dense = reference.search(q32)
    # Exact memory softmax over all entries, re-indexed by entry id (ids count real entries only).
    n_real = int(reference.lengths.max())
    slot = torch.where(dense.ids >= 0, dense.ids, n_real)
    s_exact = torch.full((B, H, q, n_real + 1), -math.inf).scatter_(-1, slot, dense.scores)[..., :n_real]
    p_exact = torch.softmax(s_exact / math.sqrt(d), dim=-1)  # [B, H, q, n_real], 0 where a row has no entry
    # The exact top-k by score, not by probability: probabilities underflow to ties at 0. A row with
    # fewer than k entries is scored on the entries it has.
    top_scores, top_ids = torch.topk(s_exact, min(kk, n_real), dim=-1)  # [B, H, q, k']
    real_top = torch.isfinite(top_scores)
    got = hits.ids  # [B, H, q, kk]
    match = (top_ids.unsqueeze(-1) == got.unsqueeze(-2)).any(dim=-1) & real_top
    recall = match.sum(dim=-1) / real_top.sum(dim=-1).clamp_min(1)
    valid = got >= 0
    kth = top_scores.masked_fill(~real_top, math.inf).min(dim=-1, keepdim=True).values  # exact k-th score
    got_scores = torch.gather(s_exact, -1, got.clamp(0, max(n_real - 1, 0)))
    tie_hits = ((got_scores >= kth) & valid).sum(dim=-1)
    tie_recall = tie_hits / real_top.sum(dim=-1).clamp_min(1)
    mass = torch.gather(p_exact, -1, got.clamp(0, max(n_real - 1, 0))) * valid
    mass_recall = mass.sum(dim=-1)
    empty = torch.empty(B, H, 0, d)
    out_ref = memory_attention(q32, empty, empty, memory=reference)
    out_got = memory_attention(q32, empty, empty, memory=candidate, top_k=kk)
    err = (out_got - out_ref).transpose(0, 1).reshape(H, -1).norm(dim=1)
    ref_norm = out_ref.transpose(0, 1).reshape(H, -1).norm(dim=1).clamp_min(1e-30)
    r_mean, r_p01 = _per_head(recall)
    m_mean, m_p01 = _per_head(mass_recall)
    return AgreementReport(
        k=kk,
        recall_mean=r_mean,
        recall_p01=r_p01,
        mass_recall_mean=m_mean,
        mass_recall_p01=m_p01,
        rel_l2_error=(err / ref_norm).tolist(),
        tie_recall_mean=_per_head(tie_recall)[0],
    )


def measure_agreement(
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor,
    backend: str = "faiss",
    *,
    mask: torch.Tensor | None = None,
    k: int | None = None,
    mem_dtype: str = "float32",
    **backend_kwargs,
) -> AgreementReport:
    """Fill the exact backend and ``backend`` with the same entries and compare them.

    Args:
        keys, values: [B, H, n, d]; queries: [B, H, q, d]; mask: [B, n] bool or None.
        backend: registry name of the candidate; ``backend_kwargs`` go to :func:`create_backend`.
    """
    B, H, _, d = keys.shape
    geometry = {"num_heads": H, "head_dim": d, "batch_size": B, "mem_dtype": mem_dtype}
    reference = create_backend("exact", **geometry)
    candidate = create_backend(backend, **geometry, **backend_kwargs)
    for mem in (reference, candidate):
        mem.add(keys, values, mask)
    return compare_backends(candidate, reference, queries, k=k)
