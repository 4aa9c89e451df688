"""One thread setting for the memory: torch's intra-op threads and Faiss's OpenMP threads together."""

from __future__ import annotations

import torch

from indexes import set_faiss_threads


def set_threads(n: int) -> None:
    """Run torch and Faiss (in the calling thread) with ``n`` threads each.

    The Faiss backend's head fan-out, where a call is large enough to use it, takes
    ``torch.get_num_threads()`` workers unless given ``workers``, so with ``n == 1`` every search runs in
    the calling thread, one thread in all.

    Raises:
        ValueError: ``n`` is not a positive int.
    """
    set_faiss_threads(n)
    torch.set_num_threads(n)
