"""`Quantizer`: the nearest of ``L`` centroids (L2) for each key, as the ``"auto"`` index assigns keys to lists.

The centroids are held transposed, ``[d, Lp]`` with ``Lp`` the list count rounded up to a multiple of
:data:`LANES` (padding columns never win: their half norm is +inf), beside their half squared norms;
the nearest centroid of a key ``x`` is ``argmin_l |c_l|^2 / 2 - x . c_l``.

Where the compiled library is built (:mod:`indexes.native`) one C call scores a few keys at a time
against blocks of 16 centroids (with AVX-512, two blocks and 8 keys per step: 64 keys at 1448 lists
187 -> 98 us with two blocks of 4 keys, -> 47-60 us with 8 keys, which halves the reads of the
centroids; the same lists) and keeps the argmin as it goes: at 32 keys per window and 1448 lists,
torch's ``addmm`` + ``argmin`` cost ~190 us per call, most of it in the small matmul's setup and a
scalar argmin over [32, L]. Without the library, those two torch calls do it. The two engines sum in
different orders, so a key almost equidistant from two centroids may go to either: both are nearest
to rounding, and the index is exact whichever list holds a key (its bounds follow its keys).
"""

from __future__ import annotations

import torch

from indexes import native

LANES = 16  # the C kernel's centroids per block (knn_assign's ASSIGN_LANES)


class Quantizer:
    """Nearest-centroid assignment to ``centroids`` [L, d] float32 (``native``: use the compiled kernel)."""

    def __init__(self, centroids: torch.Tensor, native_kernel: bool) -> None:
        lists, dim = centroids.shape
        padded = -(-lists // LANES) * LANES
        self._ct = torch.zeros(dim, padded, dtype=torch.float32)  # [d, Lp]
        self._ct[:, :lists] = centroids.T
        self._hn = torch.full((padded,), float("inf"), dtype=torch.float32)  # [Lp]
        self._hn[:lists] = 0.5 * (centroids * centroids).sum(dim=1)
        self._lists = lists
        self._lib = native.library() if native_kernel else None

    @property
    def nlist(self) -> int:
        return self._lists

    @property
    def centroids(self) -> torch.Tensor:
        """[L, d] float32 (a view of the transposed copy)."""
        return self._ct[:, : self._lists].T

    def nbytes(self) -> int:
        """The transposed centroids and their half norms, padding included."""
        return int((self._ct.numel() + self._hn.numel()) * 4)

    def compiled_entry(self) -> tuple[int, int, int]:
        """(transposed centroids, half norms, padded list count) as the compiled assignment takes them."""
        return self._ct.data_ptr(), self._hn.data_ptr(), self._ct.shape[1]

    def assign(self, x: torch.Tensor, threads: int = 1) -> torch.Tensor:
        """Nearest centroid of each key ``x`` [n, d] float32 -> [n] int64; the compiled kernel splits
        many keys over ``threads`` threads (the same centroids)."""
        n = x.shape[0]
        if self._lib is None or n == 0:
            return torch.addmm(self._hn[: self._lists], x, self._ct[:, : self._lists], alpha=-1.0).argmin(
                dim=1
            )
        x = x.contiguous()
        out = torch.empty(n, dtype=torch.int64)
        rc = self._lib.knn_assign(
            n,
            x.shape[1],
            x.data_ptr(),
            self._ct.shape[1],
            self._ct.data_ptr(),
            self._hn.data_ptr(),
            out.data_ptr(),
            native.split_threads(threads),
        )
        if rc:
            raise MemoryError(f"out of memory assigning {n} keys to lists")
        return out
