"""`ChunkedTensor`: append-only tensor storage that grows without copying what it holds.

Memory grows a window at a time. Appending into preallocated chunks keeps growth linear: no step
copies the whole memory (a ``torch.cat`` per window is O(N^2) bytes over a document and doubles the
peak at every step). Chunk capacities double from ``first`` up to ``chunk`` entries, so a small memory
stays small, a large one is held in few chunks (a gather loops over chunks, not entries), and at most
one chunk is partly filled. The unfilled tail of that chunk is allocated but never written, so the
operating system does not back it with memory (it is not resident); :attr:`ChunkedTensor.nbytes`
counts the filled entries and :attr:`ChunkedTensor.reserved_bytes` the allocation.

This is the one chunked store of the project: keys of the exact search phase (``indexes``) and the
memory backends' keys and values (``knn_memory``) all live in it.
"""

from __future__ import annotations

import torch

from indexes.validate import INT64_MAX, check_int

FIRST_CHUNK = 2048


class ChunkedTensor:
    """An append-only tensor ``[*lead, N, d]`` stored as chunks along the entry axis (dim -2).

    Args:
        lead: leading dimensions (e.g. ``(B, H)``), may be ``()``.
        dim: the last dimension d.
        dtype, device: storage dtype and device; appended tensors are cast to them.
        chunk: the largest chunk, in entries.
        first: the first chunk's capacity (then doubling up to ``chunk``); default
            ``min(chunk, 2048)``.

    In autograd mode (an appended tensor requires grad), the tensor becomes a chunk of its own,
    without a copy, so gradients flow to earlier windows as in upstream training.
    """

    def __init__(
        self,
        lead: tuple[int, ...],
        dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        chunk: int,
        first: int | None = None,
    ) -> None:
        check_int(chunk, "chunk", 1, INT64_MAX)
        self.lead = tuple(lead)
        self.dim = dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.chunk = chunk
        self.first = min(chunk, FIRST_CHUNK) if first is None else max(1, min(first, chunk))
        self.chunks: list[torch.Tensor] = []
        self.fills: list[int] = []
        self._length = 0

    @property
    def length(self) -> int:
        """Entries stored (N)."""
        return self._length

    def __len__(self) -> int:
        return self._length

    def _entry_bytes(self) -> int:
        n = self.dim * torch.empty((), dtype=self.dtype).element_size()
        for s in self.lead:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        """Bytes of the stored entries (what is written, hence resident)."""
        return self._length * self._entry_bytes()

    @property
    def reserved_bytes(self) -> int:
        """Bytes allocated, the unfilled tail of the last chunk included."""
        return sum(c.numel() * c.element_size() for c in self.chunks)

    def append(self, x: torch.Tensor) -> None:
        """Append ``x`` [*lead, n, d] (cast to the storage dtype)."""
        n = x.shape[-2]
        if n == 0:
            return
        if x.requires_grad and torch.is_grad_enabled():
            self.chunks.append(x.to(self.dtype))
            self.fills.append(n)
            self._length += n
            return
        # copy_ casts to the storage dtype as it copies (as .to() would round, with no temporary)
        pos = 0
        while pos < n:
            if (
                not self.chunks
                or self.fills[-1] >= self.chunks[-1].shape[-2]
                or self.chunks[-1].requires_grad
            ):
                cap = min(self.chunk, max(self.first, self._length))
                self.chunks.append(
                    torch.empty(*self.lead, cap, self.dim, dtype=self.dtype, device=self.device)
                )
                self.fills.append(0)
            fill = self.fills[-1]
            take = min(self.chunks[-1].shape[-2] - fill, n - pos)
            self.chunks[-1][..., fill : fill + take, :].copy_(x[..., pos : pos + take, :])
            self.fills[-1] = fill + take
            self._length += take
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

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Entries ``rows`` [m] (sorted or not, no ``-1``) of a store without lead dims -> [m, d]."""
        if self.lead:
            raise ValueError(f"rows() needs a store without lead dimensions, this one has lead {self.lead}")
        out = torch.empty(len(rows), self.dim, dtype=self.dtype, device=self.device)
        start = 0
        for view in self.views():
            stop = start + view.shape[0]
            sel = (rows >= start) & (rows < stop)
            if bool(sel.any()):
                out[sel] = view[(rows[sel] - start).to(view.device)]
            start = stop
        return out

    def index_select_lead(self, index: torch.Tensor) -> None:
        """Keep lead-0 rows ``index`` (may repeat) in every chunk."""
        index = index.to(self.device)
        self.chunks = [c.index_select(0, index) for c in self.chunks]
        self.lead = (len(index), *self.lead[1:])

    def clone(self) -> ChunkedTensor:
        """An independent copy holding the same entries (compacted into one chunk per old chunk)."""
        new = ChunkedTensor(self.lead, self.dim, self.dtype, self.device, self.chunk, self.first)
        for view in self.views():
            new.chunks.append(view.clone())
            new.fills.append(view.shape[-2])
        new._length = self._length
        return new

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` entries (0 <= n <= :attr:`length`) and forget the rest, in place.

        Chunks that still hold entries are kept as they are (no copy; later appends write into the
        kept tail of the last one), chunks left empty are dropped.
        """
        check_int(n, "n (the entries to keep)", 0, self._length)
        kept, start = 0, 0
        for i, fill in enumerate(self.fills):
            if start >= n:
                break
            self.fills[i] = min(fill, n - start)
            start += fill
            kept = i + 1
        del self.chunks[kept:], self.fills[kept:]
        self._length = n

    def mark(self) -> tuple:
        """A token of the current contents for :meth:`restore`: references to the chunks, no copy.

        Appends never write inside the filled part of a chunk, so the token stays valid across appends,
        :meth:`index_select_lead` (new chunks) and :meth:`truncate`; restoring it to an earlier mark
        and appending again overwrites what later marks hold.
        """
        return (list(self.chunks), list(self.fills), self._length, self.lead)

    def restore(self, mark: tuple) -> None:
        """Return to the contents a :meth:`mark` token recorded."""
        chunks, fills, length, lead = mark
        self.chunks, self.fills, self._length, self.lead = list(chunks), list(fills), length, lead
