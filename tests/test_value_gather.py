"""The gather of retrieved values: the compiled copy against the torch path, on chunked storage."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from indexes import ChunkedTensor, native
from knn_memory import storage

needs_native = pytest.mark.skipif(not native.available(), reason="compiled library not built")


def _torch_gather(views, ids, dim, dtype):
    with pytest.MonkeyPatch.context() as m:
        m.setattr(storage, "gather_rows", lambda views, ids: None)
        return storage.gather_values(views, ids, dim, dtype)


def _expected(full: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The rows of ``full`` [h, N, d] at ``ids`` [h, q, k], zeros outside 0..N-1 (by hand)."""
    h, q, k = ids.shape
    out = torch.zeros(h, q, k, full.shape[-1], dtype=full.dtype)
    for a in range(h):
        for b in range(q):
            for c in range(k):
                e = int(ids[a, b, c])
                if 0 <= e < full.shape[1]:
                    out[a, b, c] = full[a, e]
    return out


def _store(heads: int, dim: int, sizes: list[int], dtype: torch.dtype, seed: int) -> ChunkedTensor:
    gen = torch.Generator().manual_seed(seed)
    store = ChunkedTensor((heads,), dim, dtype, "cpu", chunk=64, first=4)
    for n in sizes:
        store.append(torch.randn(heads, n, dim, generator=gen))
    return store


@needs_native
@settings(max_examples=40, deadline=None)
@given(
    heads=st.integers(1, 4),
    dim=st.sampled_from([1, 3, 32, 100]),
    sizes=st.lists(st.integers(1, 70), min_size=1, max_size=6),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    head_slice=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_compiled_gather_equals_torch_and_by_hand(heads, dim, sizes, dtype, head_slice, seed):
    store = _store(heads, dim, sizes, dtype, seed)
    views = store.views()
    assert len(views) >= 1
    n = store.length
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(-2, n + 3, (heads, 5, 3), generator=gen)  # out of range both sides: zeros
    if head_slice and heads > 1:
        views = [v[1:] for v in views]  # a head slice: heads a chunk's stride apart, not packed
        ids = ids[1:]
    got = storage.gather_values(views, ids, dim, dtype)
    assert got.dtype == dtype and got.shape == (*ids.shape, dim)
    assert torch.equal(got, _torch_gather(views, ids, dim, dtype))
    assert torch.equal(got, _expected(torch.cat(views, dim=1), ids))


@needs_native
def test_gather_rows_takes_the_compiled_path_and_declines_what_it_cannot_do():
    store = _store(2, 8, [5, 9], torch.bfloat16, 0)
    views = store.views()
    ids = torch.tensor([[0, 13, -1], [4, 5, 14]])
    out = native.gather_rows(views, ids)
    assert out is not None and out.shape == (2, 3, 8)
    assert torch.equal(out[:, 2][1], torch.zeros(8, dtype=torch.bfloat16))  # id 14 of 14 entries
    assert len(views) >= 3 and torch.equal(out[0, 1], torch.cat(views, dim=1)[0, 13])  # the last chunk
    # what it leaves to the torch path
    assert native.gather_rows([], ids) is None
    assert native.gather_rows([v.float() for v in views[:1]] + views[1:], ids) is None  # mixed dtypes
    assert native.gather_rows([v.transpose(1, 2) for v in views], ids) is None  # rows not contiguous
    assert native.gather_rows(views, ids.to(torch.int32)) is None
    assert native.gather_rows(views, ids[:1]) is None  # heads disagree


def test_gather_without_entries_gives_zeros():
    ids = torch.full((2, 3, 4), -1)
    out = storage.gather_values([], ids, 5, torch.bfloat16)
    assert out.shape == (2, 3, 4, 5) and not bool(out.any())
