"""`top_k`: the k largest scores of each row, best first, by the fastest selection for the row's shape.

The index layer's exact top-k selects through here: the store's exact search (``"Flat"``, and
``"auto"`` while the memory is small) and the ranking of the ``"auto"`` index's lists. (The exact
backend keeps ``torch.topk``: its scores are 4-D, padded with ``-inf`` and may carry gradients.) Scores
come from a float32 matmul.

On the CPU, where the compiled library is built (:mod:`indexes.native`), one C call selects
(``knn_topk_rows``), by one of two methods that give the same result (the k largest, best first; of
scores tied at the k-th place, the earliest):

* with AVX-512 (and k >= 8, n >= k rounded up to 16): the maxima of 4 k strided groups of the row
  (fewer in a shorter row; vertical maxima, in registers for k = 32); a value t that k to 1.5 k of
  those maxima reach, by bisection from the previous row's t; the scores >= t compressed out in row
  order (about 1.2-1.5 k of them); and each candidate's place counted by vector compares (how many
  beat it), which sorts them too;
* otherwise: the maxima of runs of 16 scores; the k-th largest of them bounds the row's k-th largest
  from below, so only the runs that reach it are read again and only their scores at or above it
  become candidates, selected by bisection and sorted.

Measured on one core of this machine kind (64 rows, k = 32): 0.03 ms at n = 1024 by the first,
0.10 ms by the second, 0.67 ms by ``torch.topk``; 64 rows of 4096, k = 128: 0.19 ms, 0.70 ms and
2.6 ms. (Before the run maxima, a reservoir fed in row order took 0.34 ms at n = 1024.)

Without the library (or off the CPU, or for scores that are not float32):

* ``torch.topk`` costs 0.1-0.15 ms per 1000 scores per row for k = 8 at any n; for k = 32 it costs
  0.5-1 ms for n of 1024-8192 (its heap and ``nth_element`` paths both lose there);
* ``numpy.argpartition`` (introselect), then a sort of the k selected, costs 0.2-0.7 ms for k = 32 and
  the same n, but more than ``torch.topk`` for small k, and for n beyond ~256 k;

so rows of ``16 k <= n <= 256 k`` with ``k >= 16`` go to the partition, the others to ``torch.topk``.
Matmul + selection beats ``faiss.knn`` (on its BLAS path) for every block measured, 4096-65536 keys
and 64-2048 queries, so the exact search no longer calls it (``indexes.streaming.SELECT_SCORES``).
Ties are broken the same way every time for the same input, but not necessarily as another backend (or
the other engine) breaks them.
"""

from __future__ import annotations

import numpy as np
import torch

from indexes import native

MIN_K = 16  # smaller k: torch.topk
PARTITION_RANGE = (16, 256)  # n / k where the partition wins


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of each row of ``scores`` [m, n] (float, no NaN), best first.

    Returns (values [m, min(k, n)], positions [m, min(k, n)] int64). Off the CPU it is ``torch.topk``.
    """
    m, n = scores.shape
    k = min(k, n)
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and m and k:
        lib = native.library()
        if lib is not None:
            scores = scores.detach().contiguous()
            values = torch.empty(m, k, dtype=torch.float32)
            positions = torch.empty(m, k, dtype=torch.int64)
            if lib.knn_topk_rows(m, n, scores.data_ptr(), k, values.data_ptr(), positions.data_ptr()):
                raise MemoryError(f"out of memory selecting the top {k} of {m} rows")
            return values, positions
    low, high = PARTITION_RANGE
    if scores.device.type != "cpu" or k < MIN_K or not low * k <= n <= high * k or m == 0:
        return torch.topk(scores, k, dim=1)
    a = scores.detach().numpy()
    part = np.argpartition(a, n - k, axis=1)[:, n - k :]
    vals = np.take_along_axis(a, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return (
        torch.from_numpy(np.take_along_axis(vals, order, axis=1)),
        torch.from_numpy(np.take_along_axis(part, order, axis=1).astype(np.int64, copy=False)),
    )
