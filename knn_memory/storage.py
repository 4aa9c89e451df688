"""Chunked append-only tensor storage and the gather of retrieved values.

Memory grows a window at a time. Appending into fixed-size preallocated chunks keeps growth linear:
no step copies the whole memory (upstream's ``torch.cat`` per window is O(N^2) bytes over a
document and doubles peak memory at every step).
"""

from __future__ import annotations

import torch


class ChunkedTensor:
    """An append-only tensor ``[*lead, N, d]`` stored as chunks along the entry axis (dim -2).

    In autograd mode (an appended tensor requires grad), the tensor becomes a chunk of its own,
    without a copy, so gradients flow to earlier windows as in upstream training.
    """

    def __init__(self, lead: tuple[int, ...], dim: int, dtype: torch.dtype, device: torch.device, chunk: int):
        self.lead = tuple(lead)
        self.dim = dim
        self.dtype = dtype
        self.device = device
        self.chunk = chunk
        self.chunks: list[torch.Tensor] = []
        self.fills: list[int] = []

    @property
    def length(self) -> int:
        return sum(self.fills)

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.chunks)

    def append(self, x: torch.Tensor) -> None:
        """Append ``x`` [*lead, n, d] (cast to the storage dtype)."""
        n = x.shape[-2]
        if n == 0:
            return
        x = x.to(self.dtype)
        if x.requires_grad and torch.is_grad_enabled():
            self.chunks.append(x)
            self.fills.append(n)
            return
        pos = 0
        while pos < n:
            if (
                not self.chunks
                or self.fills[-1] >= self.chunks[-1].shape[-2]
                or self.chunks[-1].requires_grad
            ):
                self.chunks.append(
                    torch.empty(*self.lead, self.chunk, self.dim, dtype=self.dtype, device=self.device)
                )
                self.fills.append(0)
            fill = self.fills[-1]
            take = min(self.chunks[-1].shape[-2] - fill, n - pos)
            self.chunks[-1][..., fill : fill + take, :].copy_(x[..., pos : pos + take, :])
            self.fills[-1] = fill + take
            pos += take

    def views(self) -> list[torch.Tensor]:
        """The filled part of each chunk, [*lead, m_i, d], in order."""
        return [c[..., :f, :] for c, f in zip(self.chunks, self.fills, strict=True) if f > 0]

    def full(self) -> torch.Tensor:
        """All entries as one tensor (a copy when there are several chunks)."""
        views = self.views()
        if not views:
            return torch.empty(*self.lead, 0, self.dim, dtype=self.dtype, device=self.device)
        return views[0] if len(views) == 1 else torch.cat(views, dim=-2)

    def index_select_lead(self, index: torch.Tensor) -> None:
        """Keep lead-0 rows ``index`` (may repeat) in every chunk."""
        index = index.to(self.device)
        self.chunks = [c.index_select(0, index) for c in self.chunks]
        self.lead = (len(index), *self.lead[1:])

    def clear(self) -> None:
        self.chunks = []
        self.fills = []


def gather_values(views: list[torch.Tensor], ids: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Values of entries ``ids`` from chunked storage.

    Args:
        views: chunk views, each [h, m_i, d], entries in order.
        ids: [h, q, k] int64 entry ids; ``-1`` for empty slots.
        dim, dtype: d and the storage dtype (used when nothing is stored).

    Returns:
        [h, q, k, d] in the storage dtype, zeros in empty slots.
    """
    h, q, k = ids.shape
    out = torch.zeros(h * q * k, dim, dtype=dtype, device=ids.device)
    if not views:
        return out.view(h, q, k, dim)
    sizes = torch.tensor([v.shape[-2] for v in views], device=ids.device)
    ends = sizes.cumsum(0)  # entry id e lies in chunk c iff ends[c-1] <= e < ends[c]
    flat = ids.reshape(-1)
    head = torch.arange(h, device=ids.device).repeat_interleave(q * k)
    slot = torch.nonzero((flat >= 0) & (flat < ends[-1])).squeeze(1)  # filled slots only
    chunk = torch.bucketize(flat[slot], ends, right=True)
    # one pass over the chunks, each gathering only its own entries (cost ~ q*k*d, not chunks*q*k*d)
    order = torch.argsort(chunk, stable=True)
    slot, chunk = slot[order], chunk[order]
    counts = torch.bincount(chunk, minlength=len(views)).tolist()
    starts = (ends - sizes).tolist()
    pos = 0
    for c, n in enumerate(counts):
        if n:
            sel = slot[pos : pos + n]
            out[sel] = views[c][head[sel], flat[sel] - starts[c]].to(dtype)
            pos += n
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
