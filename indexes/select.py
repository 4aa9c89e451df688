"""`top_k`: the k largest scores of each row, best first, by the fastest selection for the row's shape.

The index layer's exact top-k selects through here: the store's exact search (``"Flat"``, and
``"auto"`` while the memory is small) and the ranking of the ``"auto"`` index's lists. (The exact
backend keeps ``torch.topk``: its scores are 4-D, padded with ``-inf`` and may carry gradients.) Scores
come from a float32 matmul; selection, not the matmul, is what costs.

Measured on one core of this machine kind, 64 rows of ``n`` scores:

* ``torch.topk`` costs 0.1-0.15 ms per 1000 scores per row for k = 8 at any n; for k = 32 it costs
  0.5-1 ms for n of 1024-8192 (its heap and ``nth_element`` paths both lose there);
* ``numpy.argpartition`` (introselect), then a sort of the k selected, costs 0.2-0.7 ms for k = 32 and
  the same n, but more than ``torch.topk`` for small k, and for n beyond ~256 k;
* matmul + this selection beats ``faiss.knn`` (on its BLAS path) up to ~4096 keys per block, 1.3-2x;
  beyond that Faiss's blocked matmul and heap win (see ``indexes.streaming.SELECT_KEYS``).

So rows of ``16 k <= n <= 256 k`` with ``k >= 16`` go to the partition, the others to ``torch.topk``.
Ties are broken the same way every time for the same input, but not necessarily as another backend
breaks them.
"""

from __future__ import annotations

import numpy as np
import torch

MIN_K = 16  # smaller k: torch.topk
PARTITION_RANGE = (16, 256)  # n / k where the partition wins


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of each row of ``scores`` [m, n] (float, no NaN), best first.

    Returns (values [m, min(k, n)], positions [m, min(k, n)] int64). Off the CPU it is ``torch.topk``.
    """
    m, n = scores.shape
    k = min(k, n)
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
