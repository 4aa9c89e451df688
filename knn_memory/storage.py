"""The gather of retrieved values from chunked storage (or their weighted sum, read in place), batch rows
stacked into one tensor, and compact tensors for saving.

The chunked store itself is :class:`indexes.ChunkedTensor` (re-exported here).
"""

from __future__ import annotations

import torch

from indexes import ChunkedTensor
from indexes.native import gather_rows, weighted_rows
from knn_memory.locking import RWLock

__all__ = ["ChunkedTensor", "RetrievedValues", "compact", "gather_values", "stack_rows"]


def stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """The per-row results ``rows`` (B tensors of one shape) as one [B, ...] tensor: ``torch.stack``, or a
    view of the only one (batch size 1: no copy)."""
    return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)


class RetrievedValues:
    """The values of top-k hits, left in the memory's chunked storage until they are used.

    Args:
        views: per batch row, its value chunks [h, m_i, d] (the searched heads), entries in order.
        ids: [B, h, q, k] int64 entry ids on the chunks' device; ``-1`` for empty slots.
        dim, dtype: d and the storage dtype.
        device: where the gathered values go (the memory's device).
        lock: the memory's lock, held (shared) while the chunks are read.
    """

    def __init__(
        self,
        views: list[list[torch.Tensor]],
        ids: torch.Tensor,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        lock: RWLock | None = None,
    ) -> None:
        self.views = views
        self.ids = ids
        self.dim = dim
        self.dtype = dtype
        self.device = device
        self.lock = lock

    def _locked(self, read):
        if self.lock is None:
            return read()
        self.lock.acquire_read()
        try:
            return read()
        finally:
            self.lock.release_read()

    def gather(self) -> torch.Tensor:
        """[B, h, q, k, d] in the storage dtype on ``device``: only the retrieved values cross devices."""
        return self._locked(
            lambda: stack_rows(
                [gather_values(v, self.ids[b], self.dim, self.dtype) for b, v in enumerate(self.views)]
            ).to(self.device)
        )

    def weighted(self, probs: torch.Tensor) -> torch.Tensor | None:
        """``sum_j probs[..., j] * value_j`` [B, h, q, d] float32 for float32 ``probs`` [B, h, q, k] on the
        CPU, each value read where it is stored (:func:`indexes.native.weighted_rows`); None where that
        cannot be done (another device or dtype, no compiled library)."""
        if probs.dtype != torch.float32 or probs.device.type != "cpu" or self.ids.device.type != "cpu":
            return None

        def read():
            out = [weighted_rows(v, self.ids[b], probs[b]) for b, v in enumerate(self.views)]
            return None if any(o is None for o in out) else stack_rows(out)

        return self._locked(read)


def gather_values(views: list[torch.Tensor], ids: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Values of entries ``ids`` from chunked storage.

    Args:
        views: chunk views, each [h, m_i, d], entries in order.
        ids: [h, q, k] int64 entry ids; ``-1`` for empty slots.
        dim, dtype: d and the storage dtype (used when nothing is stored).

    Returns:
        [h, q, k, d] in the storage dtype, zeros in empty slots.

    On the CPU, one call of the compiled library (:func:`indexes.native.gather_rows`: a copy per
    row). Otherwise one ``index_select`` per chunk over the chunk's rows seen as one [h * capacity, d]
    matrix (the chunks grow geometrically, so there are few): the cost is ~ q*k*d plus a few small
    operations per chunk (at 1M tokens ~10 of them per chunk came to 1.4 ms per call, 12% of a
    passkey prefill, against ~0.05 ms for the compiled copy).
    """
    h, q, k = ids.shape
    flat = ids.reshape(h, q * k)
    if views and views[0].dtype == dtype:
        rows = gather_rows(views, flat)
        if rows is not None:
            return rows.view(h, q, k, dim)
    out = None
    start = 0
    for view in views:
        m = view.shape[-2]
        local = flat - start
        start += m
        inside = (local >= 0) & (local < m)
        per_head = view.stride(0) // dim  # rows from one head's entries to the next in the chunk
        if (
            view.stride(-1) == 1
            and view.stride(-2) == dim
            and view.stride(0) % dim == 0
            and per_head >= m
            and view.storage_offset() + h * per_head * dim
            <= view.untyped_storage().nbytes() // view.element_size()
        ):
            rows = torch.as_strided(view, (h * per_head, dim), (dim, 1))
            lin = (local + torch.arange(h, device=ids.device)[:, None] * per_head).reshape(-1)
        else:  # a chunk of another layout (autograd mode keeps appended tensors as they came)
            rows = view.reshape(h * m, dim)
            lin = (local + torch.arange(h, device=ids.device)[:, None] * m).reshape(-1)
        if out is None and bool(inside.all()):
            out = rows.index_select(0, lin).to(dtype)
            continue
        if out is None:
            out = torch.zeros(h * q * k, dim, dtype=dtype, device=ids.device)
        sel = inside.reshape(-1).nonzero().squeeze(1)
        if sel.numel():
            out[sel] = rows.index_select(0, lin[sel]).to(dtype)
    if out is None:
        out = torch.zeros(h * q * k, dim, dtype=dtype, device=ids.device)
    return out.view(h, q, k, dim)


def compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, with storage of exactly its own size (a copy if it is a view of a larger tensor).

    ``torch.save`` writes a view's whole underlying storage; a state meant for disk holds compact tensors.
    """
    t = t.detach()
    if (
        t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    ):
        return t
    return t.clone(memory_format=torch.contiguous_format)
