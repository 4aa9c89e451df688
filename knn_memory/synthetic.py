"""Synthetic keys, values and queries for agreement checks and benchmarks.

Three sources, from easiest to hardest for an approximate index:

* ``"clustered"``: keys and queries from the same anisotropic Gaussian mixture (256 clusters).
* ``"gaussian"``: i.i.d. N(0, 1): no structure at all, the worst case for any ANN index.
* ``"attention"``: keys and queries built from the same clustered latents through two different
  random projections (``h @ Wk`` vs ``h' @ Wq``), so queries lie outside the keys' distribution, as
  they do in real attention, which is what defeats ANN indexes trained on keys.

Real keys and queries captured from a model are the fourth source; see ``benchmarks``.
"""

from __future__ import annotations

import torch

from knn_memory.validate import INT64_MAX, MAX_COUNT, MAX_DIM, check_int

SOURCES = ("clustered", "gaussian", "attention")


def make_memory(
    source: str,
    *,
    num_heads: int,
    head_dim: int,
    n_keys: int,
    n_queries: int,
    batch_size: int = 1,
    clusters: int = 256,
    noise: float = 1.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys [B, H, n, d], values [B, H, n, d] and queries [B, H, q, d], float32, per ``source``."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
    for name, v in (
        ("num_heads", num_heads),
        ("head_dim", head_dim),
        ("batch_size", batch_size),
        ("clusters", clusters),
    ):
        check_int(v, name, 1, MAX_COUNT if name != "head_dim" else MAX_DIM)
    for name, v in (("n_keys", n_keys), ("n_queries", n_queries)):
        check_int(v, name, 0, INT64_MAX)
    g = torch.Generator().manual_seed(seed)
    B, H, d = batch_size, num_heads, head_dim
    values = torch.randn(B, H, n_keys, d, generator=g)
    if source == "gaussian":
        return torch.randn(B, H, n_keys, d, generator=g), values, torch.randn(B, H, n_queries, d, generator=g)
    centers = torch.randn(H, clusters, d, generator=g) * 3.0
    scales = torch.rand(H, 1, d, generator=g) * 1.5 + 0.25  # anisotropic per dimension
    offset = torch.randn(H, 1, d, generator=g)

    def latents(n: int) -> torch.Tensor:
        which = torch.randint(0, clusters, (B, H, n), generator=g)
        picked = torch.gather(centers.expand(B, H, clusters, d), 2, which.unsqueeze(-1).expand(B, H, n, d))
        return (picked + noise * torch.randn(B, H, n, d, generator=g)) * scales + offset

    keys_lat, query_lat = latents(n_keys), latents(n_queries)
    if source == "clustered":
        return keys_lat, values, query_lat
    w_k = torch.randn(H, d, d, generator=g) / d**0.5
    w_q = torch.randn(H, d, d, generator=g) / d**0.5
    keys = torch.einsum("bhnd,hde->bhne", keys_lat, w_k)
    queries = torch.einsum("bhnd,hde->bhne", query_lat, w_q)
    return keys, values, queries
